"""How much faster the training step gets with torch.compile, bf16 autocast and fused AdamW, each
measured against fp32 eager (the original's step) in the same process.

    python -m benchmarks.train_speed                                  # paper state + image recipes
    python -m benchmarks.train_speed --recipes state --variants fp32,bf16,compile,fused,fastest
    python -m benchmarks.train_speed --recipes state --loss-steps 500   # and the loss after 500 steps
    python -m benchmarks.train_speed --recipes state_cpu,image_cpu      # the 2-core CPU recipes
    python -m benchmarks.train_speed --smoke                            # tiny networks: plumbing only

Each recipe is composed from the shipped configs (as ``benchmarks.run``) and every variant is the same
recipe with Hydra overrides, built by the workspace class the config names (same seed, so the same initial
weights and data order), on the recipe's own ``DataLoader`` over the real PushT data. A step is what
``train.py`` does: next batch, the workspace's ``train_step`` (to the device, loss under the variant's
autocast, backward, optimizer, LR schedule, EMA), ``loss.item()``.

Timing: each variant first takes ``--warmup`` untimed steps (the first one compiles, for the compiled
variants: its wall time and torch's compile time are reported), then ``--repeats`` rounds of ``--steps``
timed steps, every variant once per round, the order rotating each round, so that other load on the
machine falls on all variants alike. The speedup is the first variant's step time over the variant's,
paired per round, median over the rounds.

Loss (``--loss-steps N``): the first and the last variant are each trained N steps from a fresh
build (same seed, same data order); the row is the mean training loss over the last 10 % of the steps and
the difference between the two. Diffusion losses are noisy from batch to batch: compare with the
spread (``config.loss_sd_last``) before reading anything into a difference.

Variants (``--variants``, comma-separated; first = reference):
  shipped         the recipe exactly as configured
  original        fp32 eager with the UNet's plain convs: this code's step before issue 25, which equals the
                  original's (0.99x on the paper state recipe)
  fp32            fp32 eager as shipped: on a CPU the UNet's wide convs train as matrix products
                  (``conv1d_components.TemporalConv1d``)
  bf16            training.mixed_precision=bf16 (forward in bfloat16 autocast; weights, optimizer, EMA fp32)
  compile         training.compile=true (torch.compile of the denoiser and the observation encoder)
  fused           ++optimizer.fused=true (UNet recipes; the transformer recipes build their own AdamW)
  channels_last   training.channels_last=true (image recipes: the encoder's weights in NHWC)
  compile_channels_last  compile + channels_last
  fastest         compile + bf16 + fused
  fastest_graphs  fastest with training.compile_mode=reduce-overhead (CUDA graphs; CUDA only)

Every result is one JSON line ``{name, value, unit, config, hardware}`` (as ``run.py``) on stdout,
progress on stderr. ``config`` has the load average before and after: numbers are only as clean as the
machine was idle. Name the CPU's flags (``lscpu``) with any absolute time you quote.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import recipes
from benchmarks.measure import Recorder, hardware_string, load_avg, log, set_threads, sync
from benchmarks.recipes import RecipeTraining, cli_device
from benchmarks.run import (
    IMAGE_DPT_RECIPE,
    IMAGE_RECIPE,
    STATE_DPT_RECIPE,
    STATE_RECIPE,
    TINY_DPT_IMAGE,
    TINY_DPT_STATE,
    TINY_IMAGE,
    TINY_STATE,
)
from diffusion_policy.common.pytorch_util import compile_seconds
from diffusion_policy.model.diffusion.conv1d_components import set_conv_matmul

# name -> (config, overrides that make it the recipe, tiny-network overrides for --smoke)
RECIPES = {
    "state": (STATE_RECIPE, [], TINY_STATE),
    "image": (IMAGE_RECIPE, ["task=pusht_image"], TINY_IMAGE),
    "state_cpu": (STATE_RECIPE, ["experiment=pusht_lowdim_cpu"], TINY_STATE),
    "image_cpu": (IMAGE_RECIPE, ["task=pusht_image", "experiment=pusht_image_cpu"], TINY_IMAGE),
    "state_dpt": (STATE_DPT_RECIPE, [], TINY_DPT_STATE),
    "image_dpt": (IMAGE_DPT_RECIPE, [], TINY_DPT_IMAGE),
}
BF16 = "training.mixed_precision=bf16"
COMPILE = "training.compile=true"
FUSED = "++optimizer.fused=true"
CHANNELS_LAST = "training.channels_last=true"
PLAIN_CONV = "@plain_conv"  # not an override: the UNet's convs without the CPU matrix-product path
FP32_EAGER = ["training.mixed_precision=null", "training.compile=false"]
VARIANTS = {
    "shipped": [],
    "original": [*FP32_EAGER, PLAIN_CONV],
    "fp32": FP32_EAGER,
    "bf16": [BF16],
    "compile": [COMPILE],
    "fused": [FUSED],
    "channels_last": [CHANNELS_LAST],
    "compile_channels_last": [COMPILE, CHANNELS_LAST],
    "fastest": [COMPILE, BF16, FUSED],
    "fastest_graphs": [COMPILE, BF16, FUSED, "training.compile_mode=reduce-overhead"],
}
DEFAULT_VARIANTS = {"state": "original,fp32,bf16,compile,fastest", "image": "original,fastest"}


@dataclass
class Variant:
    name: str
    overrides: list[str]
    training: RecipeTraining | None = None
    it: Any = None
    batch_size: int = 0
    warmup_s: list[float] = field(default_factory=list)
    compile_s: float = 0.0
    round_ms: list[float] = field(default_factory=list)


def check_variant(name: str, device: torch.device) -> None:
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    if name == "fastest_graphs" and device.type != "cuda":
        raise SystemExit("variant fastest_graphs (CUDA graphs) needs --device cuda")


def variant_overrides(name: str, cfg_optimizer: Any, device: torch.device) -> list[str]:
    check_variant(name, device)
    overrides = list(VARIANTS[name])
    if FUSED in overrides and "_target_" not in cfg_optimizer:
        if name == "fused":
            raise SystemExit("variant fused: this recipe builds its optimizer itself (transformer recipes)")
        overrides.remove(FUSED)
    return overrides


class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device, workdir: Path, rec: Recorder) -> None:
        self.args, self.device, self.workdir, self.rec = args, device, workdir, rec
        self.zarr = recipes.find_pusht_zarr(args.zarr)
        self.datasets: dict[str, Any] = {}
        if args.smoke:
            self.zarr = recipes.write_subset_zarr(self.zarr, workdir / "pusht_subset.zarr", 2)

    def compose(self, recipe: str, overrides: list[str]) -> Any:
        config_name, base, tiny = RECIPES[recipe]
        extra = [*tiny, "dataloader.batch_size=4", "task.dataset.val_ratio=0"] if self.args.smoke else []
        cfg = recipes.compose_recipe(
            config_name,
            [*base, f"task.dataset.zarr_path={self.zarr}", *extra, *self.args.overrides, *overrides],
        )
        if self.device.type != "cuda" or self.args.smoke:
            cfg.dataloader.num_workers = 0  # on a CPU, loader workers take cores from the step
        return cfg

    def dataset(self, recipe: str, cfg: Any) -> Any:
        from hydra.utils import instantiate

        if recipe not in self.datasets:
            t0 = time.perf_counter()
            self.datasets[recipe] = instantiate(cfg.task.dataset)
            n = len(self.datasets[recipe])
            log(f"{recipe}: dataset of {n} windows in {time.perf_counter() - t0:.1f}s")
        return self.datasets[recipe]

    def build(self, recipe: str, name: str) -> tuple[Variant, Any]:
        """Variant ``name`` of ``recipe``, its training built (fresh weights from the recipe's seed); and its
        config."""
        v = Variant(name, variant_overrides(name, self.compose(recipe, []).optimizer, self.device))
        cfg = self.compose(recipe, [o for o in v.overrides if o != PLAIN_CONV])
        v.training, loader = RecipeTraining.build(
            cfg, self.dataset(recipe, cfg), self.device, self.workdir / f"{recipe}_{v.name}"
        )
        if PLAIN_CONV in v.overrides:
            for model in (v.training.model, v.training.workspace.ema_model):
                if model is not None:
                    set_conv_matmul(model, None)
        v.it = recipes.endless(loader)
        v.batch_size = loader.batch_size
        return v, cfg

    def step(self, v: Variant) -> tuple[float, float]:
        """One training step; (wall seconds, loss)."""
        t0 = time.perf_counter()
        loss = v.training.step(next(v.it)).item()
        sync(self.device)
        return time.perf_counter() - t0, loss

    def warm_up(self, recipe: str, v: Variant) -> None:
        c0 = compile_seconds()
        for _ in range(self.args.warmup):
            v.warmup_s.append(self.step(v)[0])
        v.compile_s = compile_seconds() - c0
        log(
            f"{recipe} {v.name}: warm-up steps {[round(s, 2) for s in v.warmup_s]} s"
            + (f" (torch.compile {v.compile_s:.1f}s)" if v.compile_s else "")
        )

    def speed(self, recipe: str, names: list[str]) -> None:
        a, load0 = self.args, load_avg()
        variants = []
        for name in names:
            v, cfg = self.build(recipe, name)
            self.warm_up(recipe, v)
            variants.append(v)
        for r in range(a.repeats):
            for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
                v.round_ms.append(statistics.median(self.step(v)[0] for _ in range(a.steps)) * 1e3)
            log(
                f"{recipe} round {r + 1}/{a.repeats}: "
                + ", ".join(f"{v.name} {v.round_ms[-1]:.0f} ms" for v in variants)
            )
        ref, load1 = variants[0], load_avg()
        for v in variants:
            ratios = [x / y for x, y in zip(ref.round_ms, v.round_ms)]
            step_ms = statistics.median(v.round_ms)
            config = {
                "recipe": RECIPES[recipe][0],
                "recipe_overrides": RECIPES[recipe][1] + list(a.overrides),
                "variant_overrides": v.overrides,
                "device": str(self.device),
                "batch_size": v.batch_size,
                "params": recipes.n_params(v.training.model),
                "down_dims": list(cfg.policy.get("down_dims") or cfg.policy.model.get("down_dims") or []),
                "reference": ref.name,
                "repeats": a.repeats,
                "steps_per_repeat": a.steps,
                "round_ms": [round(x, 1) for x in v.round_ms],
                "speedup_per_round": [round(x, 3) for x in ratios],
                "warmup_s": [round(x, 2) for x in v.warmup_s],
                "compile_s": round(v.compile_s, 1),
                "load_avg_before": load0,
                "load_avg_after": load1,
                "smoke": a.smoke,
            }
            speedup = statistics.median(ratios)
            log(f"{recipe} {v.name:15s} {step_ms:9.1f} ms/step  x{speedup:.3f} vs {ref.name}")
            prefix = f"train_speed.{recipe}.{v.name}"
            self.rec.emit(f"{prefix}.step_ms", step_ms, "ms", config)
            self.rec.emit(f"{prefix}.optimizer_steps_per_s", 1e3 / step_ms, "steps/s", config)
            self.rec.emit(f"{prefix}.speedup", speedup, "x", config)
        for v in variants:
            v.training = v.it = None  # free the memory before the next recipe

    def loss(self, recipe: str, names: list[str]) -> None:
        """Train the first and the last variant for --loss-steps steps each (fresh builds) and compare."""
        n = self.args.loss_steps
        tail = max(1, n // 10)
        results = {}
        for name in dict.fromkeys([names[0], names[-1]]):
            v, _ = self.build(recipe, name)
            losses, t0 = [], time.perf_counter()
            for i in range(n):
                losses.append(self.step(v)[1])
                if (i + 1) % max(1, n // 10) == 0:
                    log(f"{recipe} {name}: {i + 1}/{n} steps, loss {np.mean(losses[-tail:]):.4f}")
            results[name] = (losses, time.perf_counter() - t0, v.overrides)
            v.training = v.it = None
        ref_losses = results[names[0]][0]
        for name, (losses, wall, overrides) in results.items():
            config = {
                "recipe": RECIPES[recipe][0],
                "variant_overrides": overrides,
                "steps": n,
                "loss_sd_last": round(float(np.std(losses[-tail:])), 5),
                "mean_last_minus_reference": round(
                    float(np.mean(losses[-tail:]) - np.mean(ref_losses[-tail:])), 5
                ),
                "wall_s": round(wall, 1),
                "loss_every_10": [round(float(np.mean(losses[i : i + 10])), 5) for i in range(0, n, 10)],
                "smoke": self.args.smoke,
            }
            self.rec.emit(
                f"train_speed.{recipe}.{name}.loss_last_{tail}_of_{n}",
                float(np.mean(losses[-tail:])),
                "loss",
                config,
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every recipe and variant")
    p.add_argument("--recipes", default="state,image", help=f"comma-separated, from {', '.join(RECIPES)}")
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated, first = reference (default: state recipes original,fp32,bf16,compile,fastest; "
        "image recipes original,fastest, which keeps two 263M-parameter trainings in memory, not five)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 3; smoke 1)")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 3; smoke 2)")
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per variant, compile included (default 2)"
    )
    p.add_argument(
        "--loss-steps", type=int, default=0, help="also train the first and last variant N steps each"
    )
    p.add_argument("--device", default="auto", help="auto (first GPU, else CPU), cpu, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--smoke", action="store_true", help="tiny networks, batch 4, 2 episodes: plumbing only")
    p.add_argument(
        "--zarr", default=None, help="pusht_cchi_v7_replay.zarr (default data/pusht/... or $PUSHT_ZARR)"
    )
    p.add_argument("--out", default=None, help="also write the JSON lines to this file")
    args = p.parse_args(argv)
    args.recipe_list = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for r in args.recipe_list:
        if r not in RECIPES:
            raise SystemExit(f"unknown recipe {r!r}; choose from {', '.join(RECIPES)}")
    args.steps = args.steps or (1 if args.smoke else 3)
    args.repeats = args.repeats or (2 if args.smoke else 3)
    if min(args.steps, args.repeats, args.warmup + 1) < 1 or args.loss_steps < 0:
        raise SystemExit("--steps and --repeats must be >= 1, --warmup and --loss-steps >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    recipes.headless_env()
    args = parse_args(argv)
    set_threads(args.threads)
    device = cli_device(args.device)
    plan = {}
    for recipe in args.recipe_list:
        spec = args.variants or DEFAULT_VARIANTS[recipe.split("_")[0]]
        plan[recipe] = names = [n.strip() for n in spec.split(",") if n.strip()]
        if len(set(names)) != len(names) or not names:
            raise SystemExit(f"--variants must name distinct variants, got {spec!r}")
        for name in names:
            check_variant(name, device)
    workdir = Path(tempfile.mkdtemp(prefix="dp_train_speed_"))
    rec = Recorder(hardware_string(device), args.out)
    log(f"hardware: {rec.hardware}; load average {load_avg()}")
    try:
        bench = Bench(args, device, workdir, rec)
        for recipe, names in plan.items():
            bench.speed(recipe, names)
            if args.loss_steps:
                bench.loss(recipe, names)
    finally:
        rec.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
