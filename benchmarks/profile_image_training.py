"""Where one image-training optimizer step spends its time, and what cheap changes to it buy.

    python benchmarks/profile_image_training.py                 # paper hybrid recipe: per-stage profile
    python benchmarks/profile_image_training.py policy.down_dims=[64,128,256] dataloader.batch_size=128
    python benchmarks/profile_image_training.py --ab baseline,channels_last,adamw_fused policy.down_dims=[...]
    python benchmarks/profile_image_training.py --ab baseline \\
        --variant 'crop76=policy.crop_shape=[76,76]' --variant 'b128=dataloader.batch_size=128'
    python benchmarks/profile_image_training.py --smoke             # tiny network, 1-2 steps: plumbing only

The recipe is composed from the shipped Hydra configs (``--config-name``, default the paper's hybrid image
recipe) with the positional Hydra overrides applied, and built with ``hydra.utils.instantiate`` on the real
PushT image dataset, as ``benchmarks/run.py`` does. One step is what the training loop does: next batch
from the recipe's ``DataLoader``, ``compute_loss``, ``backward``, ``optimizer.step`` + ``zero_grad``, LR
schedule, EMA update, ``loss.item()``.

Stages of a step (wall time, ms; forward/backward hooks, no profiler):
  data            next(loader): dataset __getitem__ (uint8 frames -> float) and collation, or the wait for a
                  loader worker; plus the (no-op on CPU) move to the device
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
import copy
import os
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from run import (  # noqa: E402
    CONFIG_DIR,
    IMAGE_RECIPE,
    Recorder,
    find_pusht_zarr,
    hardware_string,
    log,
    n_params,
    seed_everything,
    write_subset_zarr,
)

from diffusion_policy.common.config_resolvers import register_resolvers  # noqa: E402

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
# tweaks: changes to the step that no config key expresses today, measured to decide whether to adopt them
TWEAKS = (
    "channels_last",
    "adamw_foreach",
    "adamw_fused",
    "uint8",
    "ema_muladd",
    "ema_loop",
    "workers",
    "threads",
    "bf16",
)
COUNT_TWEAKS = ("workers", "threads")
BUILTIN_VARIANTS = {
    "baseline": "",
    "channels_last": "@channels_last",
    "adamw_foreach": "@adamw_foreach",
    "adamw_fused": "@adamw_fused",
    "uint8": "@uint8",
    "ema_muladd": "@ema_muladd",
    "ema_loop": "@ema_loop",
    "workers0": "@workers=0",
    "workers1": "@workers=1",
    "workers2": "@workers=2",
    "threads1": "@threads=1",
    "threads2": "@threads=2",
    "bf16": "@bf16",
}
TWEAK_HELP = """tweaks (@name in a --variant, or the built-in variant of that name):
  @channels_last   encoder weights (live and EMA) in channels_last memory format
  @adamw_foreach   the recipe's optimizer with foreach=True (torch's CPU default is the per-tensor loop)
  @adamw_fused     the recipe's optimizer with fused=True
  @uint8           the dataset hands out uint8 frames; the batch becomes float / 255 after collation
  @ema_muladd      EMA update as _foreach_mul_ + _foreach_add_ (the shipped one is one _foreach_lerp_)
  @ema_loop        EMA update as a per-parameter Python loop (the original's way), for reference
  @workers=N       N loader worker processes (started untimed at every round, stopped after it)
  @threads=N       torch.set_num_threads(N) while this variant runs
  @bf16            forward pass (encoder, UNet, loss) in bfloat16 autocast, as training.mixed_precision=bf16
                   does; the backward follows the autocast graph, weights and optimizer stay float32
"""


# ----------------------------------------------------------------------------------------------------
# timing of one step by stage


class StageClock:
    """Forward hooks on the encoder, its crop modules and the UNet, and a gradient hook on the encoder's
    output, that time-stamp the stages of one training step."""

    def __init__(self, policy: torch.nn.Module) -> None:
        from diffusion_policy.model.vision.crop_randomizer import CropRandomizer

        self.marks: dict[str, float] = {}
        self.crop_s = 0.0
        self._crop_t0 = 0.0
        self.handles = []
        enc, unet = policy.obs_encoder, policy.model
        self.handles.append(enc.register_forward_pre_hook(lambda *_: self._mark("enc0")))
        self.handles.append(enc.register_forward_hook(self._encoder_done))
        self.handles.append(unet.register_forward_pre_hook(lambda *_: self._mark("unet0")))
        self.handles.append(unet.register_forward_hook(lambda *_: self._mark("unet1")))
        for module in enc.modules():
            if isinstance(module, CropRandomizer):
                self.handles.append(module.register_forward_pre_hook(self._crop_start))
                self.handles.append(module.register_forward_hook(self._crop_end))

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

    def reset(self) -> None:
        self.marks.clear()
        self.crop_s = 0.0

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class ReferenceEMA:
    """``EMAModel.step`` done another way, for reference; measured only. ``muladd``: ``_foreach_mul_`` +
    ``_foreach_add_`` (the shipped update before it became one ``_foreach_lerp_``); ``loop``: the original's
    per-parameter loop (two kernels per tensor)."""

    def __init__(self, ema: Any, kind: str) -> None:
        self.ema, self.kind = ema, kind

    @torch.no_grad()
    def step(self, model: torch.nn.Module) -> None:
        from torch.nn.modules.batchnorm import _BatchNorm

        ema = self.ema
        ema.decay = ema.get_decay(ema.optimization_step)
        averaged, live = [], []
        for module, ema_module in zip(model.modules(), ema.averaged_model.modules()):
            copy_all = isinstance(module, _BatchNorm)
            for p, e in zip(module.parameters(recurse=False), ema_module.parameters(recurse=False)):
                if copy_all or not p.requires_grad:
                    e.copy_(p)
                elif self.kind == "loop":
                    e.mul_(ema.decay)
                    e.add_(p.detach(), alpha=1 - ema.decay)
                else:
                    averaged.append(e)
                    live.append(p.detach())
        if averaged:
            torch._foreach_mul_(averaged, ema.decay)
            torch._foreach_add_(averaged, live, alpha=1 - ema.decay)
        ema.optimization_step += 1


class Uint8Frames(torch.utils.data.Dataset):
    """A PushTImageDataset that hands out uint8 frames (To, 3, H, W); the step converts the batch."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

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
    model: Any = None
    ema: Any = None
    optimizer: Any = None
    lr_scheduler: Any = None
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

    def __init__(self, config_name: str, zarr_path: Path) -> None:
        self.config_name = config_name
        self.zarr_path = zarr_path
        self._datasets: dict[str, Any] = {}

    def compose(self, overrides: list[str]) -> Any:
        from hydra import compose, initialize_config_dir

        if not (CONFIG_DIR / f"{self.config_name}.yaml").exists():
            raise SystemExit(
                f"--config-name {self.config_name}: no {self.config_name}.yaml under {CONFIG_DIR}"
            )
        register_resolvers()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return compose(
                config_name=self.config_name,
                overrides=[f"task.dataset.zarr_path={self.zarr_path}", *overrides],
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
        from diffusers.optimization import get_scheduler
        from hydra.utils import instantiate
        from torch.utils.data import DataLoader

        v.cfg = cfg = self.compose(v.overrides)
        if "obs_encoder" not in cfg.policy and "crop_shape" not in cfg.policy:
            raise SystemExit(f"{self.config_name}: not an image recipe (its policy has no image encoder)")
        dataset = self.dataset(cfg)
        seed_everything()
        model = instantiate(cfg.policy)
        if not hasattr(model, "obs_encoder"):
            raise SystemExit(
                f"{type(model).__name__} has no obs_encoder; this script profiles image policies"
            )
        model.set_normalizer(dataset.get_normalizer())
        ema_model = copy.deepcopy(model)
        if v.tweaks.get("channels_last"):
            model.obs_encoder.to(memory_format=torch.channels_last)
            ema_model.obs_encoder.to(memory_format=torch.channels_last)
        opt_kwargs = {}
        if v.tweaks.get("adamw_foreach"):
            opt_kwargs["foreach"] = True
        if v.tweaks.get("adamw_fused"):
            opt_kwargs["fused"] = True
        if "_target_" not in cfg.optimizer:
            raise SystemExit(
                "the recipe builds its optimizer from policy.get_optimizer; use a UNet image recipe"
            )
        v.optimizer = instantiate(cfg.optimizer, params=model.parameters(), **opt_kwargs)
        v.lr_scheduler = get_scheduler(
            cfg.training.lr_scheduler,
            optimizer=v.optimizer,
            num_warmup_steps=cfg.training.lr_warmup_steps,
            num_training_steps=10**6,
        )
        v.ema = instantiate(cfg.ema, model=ema_model) if cfg.training.use_ema else None
        if v.ema is not None and v.tweaks.get("ema_muladd"):
            v.ema = ReferenceEMA(v.ema, "muladd")
        elif v.ema is not None and v.tweaks.get("ema_loop"):
            v.ema = ReferenceEMA(v.ema, "loop")
        model.train()
        v.model = model
        v.clock = StageClock(model)

        kwargs = dict(cfg.dataloader)
        kwargs["pin_memory"] = False  # CPU: nothing to pin for
        if "workers" in v.tweaks:
            kwargs["num_workers"] = v.tweaks["workers"]
        v.num_workers = int(kwargs.get("num_workers", 0))
        kwargs["persistent_workers"] = False
        if v.num_workers == 0:
            kwargs.pop("prefetch_factor", None)
        v.batch_size = int(kwargs["batch_size"])
        source = Uint8Frames(dataset) if v.tweaks.get("uint8") else dataset
        v.loader = DataLoader(source, **kwargs)
        v.threads = v.tweaks.get("threads")


def batches(v: Variant) -> Iterator[Any]:
    while True:
        yield from v.loader


def start_round(v: Variant) -> None:
    """A fresh iterator when there are workers (their start-up, untimed, as every epoch pays it)."""
    if v.it is None or v.num_workers > 0:
        t0 = time.perf_counter()
        v.it = batches(v)
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
    from diffusion_policy.common.pytorch_util import dict_apply, training_autocast

    clock = v.clock
    clock.reset()
    t0 = time.perf_counter()
    if v.pending is not None:
        batch, v.pending = v.pending, None
    else:
        batch = next(v.it)
    if v.tweaks.get("uint8"):
        batch["obs"]["image"] = batch["obs"]["image"].float().div_(255.0)
    batch = dict_apply(batch, lambda x: x.to("cpu"))
    t1 = time.perf_counter()
    with training_autocast("cpu", "bf16" if v.tweaks.get("bf16") else None):
        loss = v.model.compute_loss(batch)
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    v.optimizer.step()
    v.optimizer.zero_grad(set_to_none=True)
    v.lr_scheduler.step()
    t4 = time.perf_counter()
    if v.ema is not None:
        v.ema.step(v.model)
    t5 = time.perf_counter()
    loss.item()
    t6 = time.perf_counter()
    m = clock.marks
    enc = m["enc1"] - m["enc0"]
    unet = m["unet1"] - m["unet0"]
    back_unet = m.get("enc_grad", t3) - t2
    stages = {
        "data": t1 - t0,
        "crop": clock.crop_s,
        "encoder_fwd": enc - clock.crop_s,
        "unet_fwd": unet,
        "loss_other": (t2 - t1) - enc - unet,
        "backward_unet": back_unet,
        "backward_enc": (t3 - t2) - back_unet,
        "optimizer": t4 - t3,
        "ema": t5 - t4,
        "other": t6 - t5,
    }
    return t6 - t0, stages


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
    policy = v.model
    return {
        "recipe": builder.config_name,
        "overrides": v.overrides,
        "tweaks": v.tweaks,
        "batch_size": v.batch_size,
        "num_workers": v.num_workers,
        "threads": v.threads if v.threads is not None else torch.get_num_threads(),
        "params_encoder": n_params(policy.obs_encoder),
        "params_unet": n_params(policy.model),
        "crop_shape": list(v.cfg.policy.get("crop_shape") or []) or None,
        "down_dims": list(v.cfg.policy.down_dims),
        "max_train_episodes": v.cfg.task.dataset.get("max_train_episodes"),
        "optimizer": type(v.optimizer).__name__,
    }


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


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
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    zarr_path = find_pusht_zarr(args.zarr)
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
            zarr_path = write_subset_zarr(zarr_path, workdir / "pusht_subset.zarr", 2)
        builder = Builder(args.config_name, zarr_path)
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
