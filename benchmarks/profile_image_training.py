"""Where one image-training optimizer step spends its time, and what cheap changes to it buy.

    python -m benchmarks.profile_image_training                 # paper hybrid recipe: per-stage profile
    python -m benchmarks.profile_image_training policy.down_dims=[64,128,256] dataloader.batch_size=128
    python -m benchmarks.profile_image_training --ab baseline,channels_last,adamw_fused policy.down_dims=[...]
    python -m benchmarks.profile_image_training --ab baseline \\
        --variant 'crop76=policy.crop_shape=[76,76]' --variant 'b128=dataloader.batch_size=128'
    python -m benchmarks.profile_image_training --smoke             # tiny network, 1-2 steps: plumbing only

The recipe is composed from the shipped Hydra configs (``--config-name``, default the paper's hybrid image
recipe) with the positional Hydra overrides applied, and built with ``hydra.utils.instantiate`` on the real
PushT image dataset, as ``benchmarks.run`` does. One step is what the training loop does: next batch from
the recipe's ``DataLoader``, then the workspace's own ``train_step`` (``compute_loss``, ``backward``,
``optimizer.step`` + ``zero_grad``, LR schedule, EMA update), then ``loss.item()``.

Stages of a step (wall time, ms; module, gradient and optimizer hooks, no profiler):
  data            next(loader): dataset __getitem__ (uint8 frames -> float) and collation, or the wait for a
                  loader worker; plus the (no-op on CPU) move to the device and entering autocast
  crop            the random-crop augmentation inside the encoder (CropRandomizer modules)
  encoder_fwd     the observation encoder's forward, crop excluded
  unet_fwd        the ConditionalUnet1D forward
  loss_other      the rest of compute_loss: normalisation, noise, add_noise, MSE
  backward_unet   backward from the loss until the gradient reaches the encoder's output
  backward_enc    the rest of backward (through the encoder)
  optimizer       optimizer.step, zero_grad and the LR-scheduler step
  ema             EMAModel.step
  other           loss.item() and what the hooks do not cover

Modes:
  (default)   per-stage profile: ``--warmup`` untimed steps, then ``--steps`` timed ones; median per stage
  --ab LIST   interleaved A/B: the variants of LIST (built-in names, see --list-variants) and of every
              ``--variant NAME=TOKENS`` are each built once, then run ``--repeats`` rounds of
              ``--steps`` timed steps each, rotating the order every round so that the load of other
              processes falls on all of them alike. Reports each variant's median step time over the
              rounds and its speedup over the first variant (first / variant, per round, median).
              TOKENS are Hydra overrides and @tweaks, whitespace-separated.

Every result is one JSON line ``{name, value, unit, config, hardware}`` (as ``run.py``) on stdout; progress
goes to stderr. ``config`` includes the load average before and after the run: the numbers are only as
clean as the machine was idle.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import recipes
from benchmarks.measure import Recorder, hardware_string, load_avg, log, set_threads
from benchmarks.recipes import RecipeTraining
from benchmarks.run import IMAGE_RECIPE
from diffusion_policy.model.diffusion.ema_model import EMAModel

STAGES = (
    "data",
    "crop",
    "encoder_fwd",
    "unet_fwd",
    "loss_other",
    "backward_unet",
    "backward_enc",
    "optimizer",
    "ema",
    "other",
)
# --smoke: the shipped recipe with a tiny UNet, a small crop, batch 4, in-process data, 2 episodes of data
SMOKE_OVERRIDES = (
    "policy.down_dims=[16,32]",
    "policy.diffusion_step_embed_dim=16",
    "policy.crop_shape=[48,48]",
    "dataloader.batch_size=4",
    "dataloader.num_workers=0",
)
# tweaks: changes to the step, measured to decide whether to adopt them. Flags (@name) and counts (@name=N);
# each flag is also a built-in variant of the same name
FLAG_TWEAKS = ("channels_last", "adamw_foreach", "adamw_fused", "uint8", "ema_muladd", "ema_loop", "bf16")
COUNT_TWEAKS = ("workers", "threads")
TWEAKS = FLAG_TWEAKS + COUNT_TWEAKS
# the tweaks that config keys express: they become these Hydra overrides of the recipe
TWEAK_OVERRIDES = {
    "adamw_foreach": "++optimizer.foreach=true",
    "adamw_fused": "++optimizer.fused=true",
    "bf16": "training.mixed_precision=bf16",
}
BUILTIN_VARIANTS = {
    "baseline": "",
    **{name: f"@{name}" for name in FLAG_TWEAKS},
    **{f"workers{n}": f"@workers={n}" for n in (0, 1, 2)},
    **{f"threads{n}": f"@threads={n}" for n in (1, 2)},
}
TWEAK_HELP = """tweaks (@name in a --variant, or the built-in variant of that name):
  @channels_last   encoder weights (live and EMA) in channels_last memory format
  @adamw_foreach   the recipe's optimizer with foreach=True (torch's CPU default is the per-tensor loop):
                   the override ++optimizer.foreach=true
  @adamw_fused     the recipe's optimizer with fused=True (++optimizer.fused=true)
  @uint8           the dataset hands out uint8 frames; the batch becomes float / 255 after collation
  @ema_muladd      EMA update as _foreach_mul_ + _foreach_add_ (the shipped EMAModel's is one _foreach_lerp_)
  @ema_loop        EMA update as a per-parameter loop (the original's way), for reference
  @workers=N       N loader worker processes (started untimed at every round, stopped after it)
  @threads=N       torch.set_num_threads(N) while this variant runs
  @bf16            training.mixed_precision=bf16: forward pass (encoder, UNet, loss) in bfloat16 autocast;
                   the backward follows the autocast graph, weights and optimizer stay float32
"""


# ----------------------------------------------------------------------------------------------------
# timing of one step by stage


class StageClock:
    """Hooks that time-stamp the stages of one training step: forward pre/post hooks on the loss module
    (``compute_loss`` starts and ends), forward hooks on the encoder, its crop modules and the UNet, a
    gradient hook on the encoder's output (the UNet part of backward is done), an optimizer step pre-hook
    (backward is done) and a stamp around the EMA update."""

    def __init__(self, training: RecipeTraining) -> None:
        from diffusion_policy.model.vision.crop_randomizer import CropRandomizer

        self.marks: dict[str, float] = {}
        self.crop_s = 0.0
        self._crop_t0 = 0.0
        self.handles = []
        policy, loss_module = training.model, training.train_module
        enc, unet = policy.obs_encoder, policy.model
        for module, key in ((loss_module, "loss"), (enc, "enc"), (unet, "unet")):
            self.handles.append(module.register_forward_pre_hook(lambda *_, k=f"{key}0": self._mark(k)))
        self.handles.append(loss_module.register_forward_hook(lambda *_: self._mark("loss1")))
        self.handles.append(enc.register_forward_hook(self._encoder_done))
        self.handles.append(unet.register_forward_hook(lambda *_: self._mark("unet1")))
        for module in enc.modules():
            if isinstance(module, CropRandomizer):
                self.handles.append(module.register_forward_pre_hook(self._crop_start))
                self.handles.append(module.register_forward_hook(self._crop_end))
        self.handles.append(
            training.workspace.optimizer.register_step_pre_hook(lambda *_: self._mark("backward1"))
        )
        if training.workspace.ema is not None:
            training.workspace.ema = StampedEMA(training.workspace.ema, self._mark)

    def _mark(self, key: str) -> None:
        self.marks[key] = time.perf_counter()

    def _crop_start(self, *_: Any) -> None:
        self._crop_t0 = time.perf_counter()

    def _crop_end(self, *_: Any) -> None:
        self.crop_s += time.perf_counter() - self._crop_t0

    def _encoder_done(self, _module: Any, _inputs: Any, output: torch.Tensor) -> None:
        self._mark("enc1")
        if output.requires_grad:
            # fires when backward has produced d(loss)/d(features): the UNet part of backward is done
            output.register_hook(lambda grad: self._mark("enc_grad"))

    def stages(self, t0: float, t_step: float) -> dict[str, float]:
        """Seconds per stage of the step that began at ``t0`` (``next(loader)``), whose ``train_step``
        returned at ``t_step``; "other" runs from there to now (``loss.item()``)."""
        m, now = self.marks, time.perf_counter()
        ema1 = m.get("ema1", t_step)
        ema0 = m.get("ema0", ema1)
        backward1 = m.get("backward1", ema0)  # no optimizer step on an accumulating batch
        enc, unet = m["enc1"] - m["enc0"], m["unet1"] - m["unet0"]
        back_unet = m.get("enc_grad", backward1) - m["loss1"]
        return {
            "data": m["loss0"] - t0,
            "crop": self.crop_s,
            "encoder_fwd": enc - self.crop_s,
            "unet_fwd": unet,
            "loss_other": (m["loss1"] - m["loss0"]) - enc - unet,
            "backward_unet": back_unet,
            "backward_enc": (backward1 - m["loss1"]) - back_unet,
            "optimizer": ema0 - backward1,
            "ema": ema1 - ema0,
            "other": now - ema1,
        }

    def reset(self) -> None:
        self.marks.clear()
        self.crop_s = 0.0

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class StampedEMA:
    """The workspace's EMA, time-stamped at the start and end of each update."""

    def __init__(self, ema: EMAModel, mark: Any) -> None:
        self.ema, self.mark = ema, mark

    def step(self, model: torch.nn.Module) -> None:
        self.mark("ema0")
        self.ema.step(model)
        self.mark("ema1")


class MulAddEMA(EMAModel):
    """Measured alternative to the shipped ``EMAModel.blend`` (one ``_foreach_lerp_``): ``_foreach_mul_`` +
    ``_foreach_add_``, the shipped update before it became a lerp."""

    def blend(self, averaged: list[torch.Tensor], live: list[torch.Tensor]) -> None:
        torch._foreach_mul_(averaged, self.decay)
        torch._foreach_add_(averaged, live, alpha=1 - self.decay)


class LoopEMA(EMAModel):
    """Measured alternative to the shipped ``EMAModel.blend``: the original's per-parameter loop (two
    kernels per tensor)."""

    def blend(self, averaged: list[torch.Tensor], live: list[torch.Tensor]) -> None:
        for e, p in zip(averaged, live, strict=True):
            e.mul_(self.decay)
            e.add_(p, alpha=1 - self.decay)


EMA_TWEAKS = {"ema_muladd": MulAddEMA, "ema_loop": LoopEMA}


class Uint8Frames(torch.utils.data.Dataset):
    """A PushTImageDataset that hands out uint8 frames (To, 3, H, W); the step converts the batch."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def get_normalizer(self) -> Any:
        return self.dataset.get_normalizer()

    def __getitem__(self, idx: int) -> dict:
        """-> as PushTImageDataset's item, but "image" is uint8 (To, 3, H, W) in [0, 255]."""
        sample = self.dataset.sampler.sample_sequence(idx)
        return {
            "obs": {
                "image": torch.from_numpy(np.ascontiguousarray(np.moveaxis(sample["img"], -1, 1))),
                "agent_pos": torch.from_numpy(sample["state"][:, :2].astype(np.float32)),
            },
            "action": torch.from_numpy(sample["action"].astype(np.float32)),
        }


# ----------------------------------------------------------------------------------------------------
# building a variant


@dataclass
class Variant:
    """One configuration under test: its recipe (Hydra overrides) plus step-level tweaks."""

    name: str
    overrides: list[str]
    tweaks: dict[str, Any]
    cfg: Any = None
    training: RecipeTraining | None = None
    loader: Any = None
    clock: StageClock | None = None
    it: Iterator | None = None
    pending: Any = None
    batch_size: int = 0
    num_workers: int = 0
    threads: int | None = None
    worker_start_s: list[float] = field(default_factory=list)
    round_ms: list[float] = field(default_factory=list)
    stage_ms: dict[str, list[float]] = field(default_factory=dict)


def parse_tokens(tokens: list[str], name: str) -> tuple[list[str], dict[str, Any]]:
    """Whitespace-split TOKENS -> (Hydra overrides, {tweak: True or count})."""
    overrides, tweaks = [], {}
    for tok in tokens:
        if tok.startswith("@"):
            key, _, value = tok[1:].partition("=")
            if key not in TWEAKS:
                raise SystemExit(f"variant {name}: unknown tweak @{key}; choose from {list(TWEAKS)}")
            if key in COUNT_TWEAKS:
                if not value.isdigit():
                    raise SystemExit(f"variant {name}: @{key} needs a count, e.g. @{key}=2")
                tweaks[key] = int(value)
            else:
                tweaks[key] = True
        else:
            overrides.append(tok)
    return overrides, tweaks


def parse_variant(spec: str, base: list[str]) -> Variant:
    """``NAME=TOKENS`` or a built-in name -> Variant; TOKENS: Hydra overrides and @tweaks, added to the
    ``base`` tokens (the command line's positional ones) that every variant shares."""
    if "=" in spec.split()[0] and not spec.startswith("@"):
        name, _, tokens = spec.partition("=")
    elif spec in BUILTIN_VARIANTS:
        name, tokens = spec, BUILTIN_VARIANTS[spec]
    else:
        raise SystemExit(
            f"variant {spec!r}: not a built-in ({', '.join(BUILTIN_VARIANTS)}) and not NAME=TOKENS"
        )
    name = name.strip()
    if not name.replace("_", "").replace("-", "").isalnum():
        raise SystemExit(f"variant name {name!r}: use letters, digits, '_' and '-' only")
    overrides, tweaks = parse_tokens([*base, *shlex.split(tokens)], name)
    return Variant(name, overrides, tweaks)


class Builder:
    """Composes configs and caches the datasets (loading the frames takes seconds)."""

    def __init__(self, config_name: str, zarr_path: Path, workdir: Path) -> None:
        self.config_name = config_name
        self.zarr_path = zarr_path
        self.workdir = workdir
        self._datasets: dict[str, Any] = {}

    def compose(self, overrides: list[str]) -> Any:
        return recipes.compose_recipe(
            self.config_name, [f"task.dataset.zarr_path={self.zarr_path}", *overrides]
        )

    def dataset(self, cfg: Any) -> Any:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        key = OmegaConf.to_yaml(cfg.task.dataset, resolve=True)
        if key not in self._datasets:
            t0 = time.perf_counter()
            self._datasets[key] = instantiate(cfg.task.dataset)
            log(f"dataset: {len(self._datasets[key])} windows in {time.perf_counter() - t0:.1f}s")
        return self._datasets[key]

    def build(self, v: Variant) -> None:
        """The recipe's workspace with the variant's overrides (tweaks that config keys express included),
        then the tweaks no config key expresses."""
        tweak_overrides = [TWEAK_OVERRIDES[t] for t in TWEAK_OVERRIDES if v.tweaks.get(t)]
        v.cfg = cfg = self.compose([*v.overrides, *tweak_overrides])
        if "obs_encoder" not in cfg.policy and "crop_shape" not in cfg.policy:
            raise SystemExit(f"{self.config_name}: not an image recipe (its policy has no image encoder)")
        if "_target_" not in cfg.optimizer and (v.tweaks.get("adamw_foreach") or v.tweaks.get("adamw_fused")):
            raise SystemExit(
                "the recipe builds its optimizer from policy.get_optimizer; @adamw_* needs a UNet recipe"
            )
        dataset = self.dataset(cfg)
        loader_changes = {"persistent_workers": False}  # start_round / end_round start and stop the workers
        if "workers" in v.tweaks:
            loader_changes["num_workers"] = v.tweaks["workers"]
        source = Uint8Frames(dataset) if v.tweaks.get("uint8") else dataset
        v.training, v.loader = RecipeTraining.build(
            cfg, source, torch.device("cpu"), self.workdir / v.name, loader_changes
        )
        workspace = v.training.workspace
        if not hasattr(workspace.model, "obs_encoder"):
            raise SystemExit(
                f"{type(workspace.model).__name__} has no obs_encoder; this script profiles image policies"
            )
        if v.tweaks.get("channels_last"):
            for model in (workspace.model, workspace.ema_model):
                if model is not None:
                    model.obs_encoder.to(memory_format=torch.channels_last)
        for tweak, ema_class in EMA_TWEAKS.items():
            if v.tweaks.get(tweak) and workspace.ema is not None:
                ema_kwargs = {k: x for k, x in cfg.ema.items() if k != "_target_"}
                workspace.ema = ema_class(workspace.ema_model, **ema_kwargs)
        v.clock = StageClock(v.training)
        v.num_workers = v.loader.num_workers
        v.batch_size = v.loader.batch_size
        v.threads = v.tweaks.get("threads")


def start_round(v: Variant) -> None:
    """A fresh iterator when there are workers (their start-up, untimed, as every epoch pays it)."""
    if v.it is None or v.num_workers > 0:
        t0 = time.perf_counter()
        v.it = recipes.endless(v.loader)
        v.pending = next(v.it)  # first batch of the round: worker start-up, not a steady-state step
        if v.num_workers > 0:
            v.worker_start_s.append(time.perf_counter() - t0)
    else:
        v.pending = None


def end_round(v: Variant) -> None:
    if v.num_workers > 0:
        # stop the workers so that they do not run while the other variants are timed
        v.it.close()
        v.it = None


def one_step(v: Variant) -> tuple[float, dict[str, float]]:
    """One training step; returns its wall time (s) and per-stage times (s)."""
    v.clock.reset()
    t0 = time.perf_counter()
    if v.pending is not None:
        batch, v.pending = v.pending, None
    else:
        batch = next(v.it)
    if v.tweaks.get("uint8"):
        batch["obs"]["image"] = batch["obs"]["image"].float().div_(255.0)
    loss = v.training.step(batch)
    t_step = time.perf_counter()
    loss.item()
    stages = v.clock.stages(t0, t_step)
    return time.perf_counter() - t0, stages


def run_steps(v: Variant, n: int) -> tuple[list[float], dict[str, list[float]]]:
    prev = torch.get_num_threads()
    if v.threads is not None:
        torch.set_num_threads(v.threads)
    try:
        start_round(v)
        times, stages = [], {s: [] for s in STAGES}
        for _ in range(n):
            dt, st = one_step(v)
            times.append(dt)
            for k, x in st.items():
                stages[k].append(x)
        end_round(v)
    finally:
        torch.set_num_threads(prev)
    return times, stages


def describe(v: Variant, builder: Builder) -> dict[str, Any]:
    policy = v.training.model
    return {
        "recipe": builder.config_name,
        "overrides": v.overrides,
        "tweaks": v.tweaks,
        "batch_size": v.batch_size,
        "num_workers": v.num_workers,
        "threads": v.threads if v.threads is not None else torch.get_num_threads(),
        "params_encoder": recipes.n_params(policy.obs_encoder),
        "params_unet": recipes.n_params(policy.model),
        "crop_shape": list(v.cfg.policy.get("crop_shape") or []) or None,
        "down_dims": list(v.cfg.policy.down_dims),
        "max_train_episodes": v.cfg.task.dataset.get("max_train_episodes"),
        "optimizer": type(v.training.workspace.optimizer).__name__,
    }


# ----------------------------------------------------------------------------------------------------
# modes


def profile(builder: Builder, v: Variant, args: argparse.Namespace, rec: Recorder, load0: Any) -> None:
    builder.build(v)
    log(f"profile {v.name}: {args.warmup} warm-up + {args.steps} timed steps at batch {v.batch_size}")
    run_steps(v, args.warmup)
    times, stages = run_steps(v, args.steps)
    step_ms = statistics.median(times) * 1e3
    medians = {s: statistics.median(x) * 1e3 for s, x in stages.items()}
    total = sum(medians.values())
    config = describe(v, builder) | {
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "load_avg_before": load0,
        "load_avg_after": load_avg(),
        "step_ms_all": [round(t * 1e3, 1) for t in times],
    }
    for s in STAGES:
        share = medians[s] / total if total > 0 else 0.0
        log(f"  {s:14s} {medians[s]:9.1f} ms  {share:6.1%}")
        rec.emit(f"profile.{s}.ms", medians[s], "ms", config | {"share": round(share, 4)})
    rate = 1e3 / step_ms
    log(f"  {'step':14s} {step_ms:9.1f} ms  = {rate:.3f} steps/s, {v.batch_size * rate:.1f} samples/s")
    rec.emit("profile.step.ms", step_ms, "ms", config)
    rec.emit("profile.optimizer_steps_per_s", 1e3 / step_ms, "steps/s", config)
    rec.emit("profile.samples_per_s", v.batch_size * 1e3 / step_ms, "samples/s", config)


def ab(
    builder: Builder, variants: list[Variant], args: argparse.Namespace, rec: Recorder, load0: Any
) -> None:
    for v in variants:
        builder.build(v)
        log(f"ab: built {v.name} (batch {v.batch_size}, overrides {v.overrides}, tweaks {v.tweaks})")
        run_steps(v, args.warmup)
    n = len(variants)
    for r in range(args.repeats):
        order = variants[r % n :] + variants[: r % n]
        for v in order:
            times, stages = run_steps(v, args.steps)
            v.round_ms.append(statistics.median(times) * 1e3)
            for s, x in stages.items():
                v.stage_ms.setdefault(s, []).append(statistics.median(x) * 1e3)
        log(
            f"ab round {r + 1}/{args.repeats}: "
            + ", ".join(f"{v.name} {v.round_ms[-1]:.0f} ms" for v in variants)
        )
    ref = variants[0]
    load1 = load_avg()
    for v in variants:
        ratios = [a / b for a, b in zip(ref.round_ms, v.round_ms)]
        step_ms = statistics.median(v.round_ms)
        stage_medians = {s: round(statistics.median(x), 2) for s, x in v.stage_ms.items()}
        config = describe(v, builder) | {
            "reference": ref.name,
            "repeats": args.repeats,
            "steps_per_repeat": args.steps,
            "warmup_steps": args.warmup,
            "round_ms": [round(x, 1) for x in v.round_ms],
            "speedup_per_round": [round(x, 3) for x in ratios],
            "stage_ms": stage_medians,
            "worker_start_s": round(statistics.median(v.worker_start_s), 3) if v.worker_start_s else None,
            "load_avg_before": load0,
            "load_avg_after": load1,
        }
        speedup = statistics.median(ratios)
        log(
            f"{v.name:16s} {step_ms:8.0f} ms/step  {1e3 / step_ms:6.3f} steps/s  "
            f"{v.batch_size * 1e3 / step_ms:7.1f} samples/s  x{speedup:.3f} vs {ref.name}"
        )
        rec.emit(f"ab.{v.name}.step_ms", step_ms, "ms", config)
        rec.emit(f"ab.{v.name}.optimizer_steps_per_s", 1e3 / step_ms, "steps/s", config)
        rec.emit(f"ab.{v.name}.samples_per_s", v.batch_size * 1e3 / step_ms, "samples/s", config)
        rec.emit(f"ab.{v.name}.speedup", speedup, "x", config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, epilog=TWEAK_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides and @tweaks for the recipe (all variants)")
    p.add_argument(
        "--config-name", default=IMAGE_RECIPE, help=f"recipe under config/ (default {IMAGE_RECIPE})"
    )
    p.add_argument(
        "--ab", default=None, help="comma-separated built-in variants to interleave (first = reference)"
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=TOKENS",
        help="a variant: whitespace-separated Hydra overrides and @tweaks (repeatable; joins --ab)",
    )
    p.add_argument("--list-variants", action="store_true", help="print the built-in variants and exit")
    p.add_argument("--steps", type=int, default=None, help="timed steps (per round with --ab); default 5")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (per variant); default 2")
    p.add_argument("--repeats", type=int, default=5, help="--ab rounds (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--smoke", action="store_true", help="tiny network, 2 episodes, 1 warm-up + 1 step per stage"
    )
    p.add_argument(
        "--zarr", default=None, help="pusht_cchi_v7_replay.zarr (default data/pusht/... or $PUSHT_ZARR)"
    )
    p.add_argument("--out", default=None, help="also write the JSON lines to this file")
    args = p.parse_args(argv)
    if args.list_variants:
        for name, spec in BUILTIN_VARIANTS.items():
            print(f"{name:14s} {spec or '(the recipe as configured)'}")
        raise SystemExit(0)
    args.steps = args.steps if args.steps is not None else (1 if args.smoke else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    if args.smoke:
        args.repeats = min(args.repeats, 2)
    for what in ("steps", "repeats"):
        if getattr(args, what) < 1:
            raise SystemExit(f"--{what} must be >= 1")
    if args.warmup < 0:
        raise SystemExit("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    recipes.headless_env()
    args = parse_args(argv)
    set_threads(args.threads)
    zarr_path = recipes.find_pusht_zarr(args.zarr)
    base = list(args.overrides)
    if args.smoke:
        base = [*SMOKE_OVERRIDES, "task.dataset.val_ratio=0", *base]
    specs = [s.strip() for s in (args.ab or "").split(",") if s.strip()] + list(args.variant)
    variants = [parse_variant(s, base) for s in specs] or [Variant("recipe", *parse_tokens(base, "recipe"))]
    if len({v.name for v in variants}) != len(variants):
        raise SystemExit(f"variant names must be unique: {[v.name for v in variants]}")
    workdir = Path(tempfile.mkdtemp(prefix="dp_profile_img_"))
    rec = Recorder(hardware_string(torch.device("cpu")), args.out)
    load0 = load_avg()
    log(f"hardware: {rec.hardware}; load average {load0}")
    try:
        if args.smoke:
            log("smoke: a 2-episode copy of the dataset")
            zarr_path = recipes.write_subset_zarr(zarr_path, workdir / "pusht_subset.zarr", 2)
        builder = Builder(args.config_name, zarr_path, workdir)
        t0 = time.perf_counter()
        if len(variants) >= 2:
            ab(builder, variants, args, rec, load0)
        else:
            profile(builder, variants[0], args, rec, load0)
        log(f"done in {time.perf_counter() - t0:.1f}s; load average {load_avg()}")
    finally:
        rec.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
