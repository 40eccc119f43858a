"""Benchmark suite: training throughput, inference latency, evaluation wall time and env speed.

Every result is one JSON object per line on stdout::

    {"name": ..., "value": ..., "unit": ..., "config": {...}, "hardware": "..."}

Progress goes to stderr. The recipes are composed from the shipped Hydra configs under ``config/`` and
built with ``hydra.utils.instantiate``, so a number always describes the recipe that training uses.

    python -m benchmarks.run                 # full measurement (meant for a GPU; hours on a CPU)
    python -m benchmarks.run --quick         # under 5 minutes on a 2-core CPU, fewer repeats
    python -m benchmarks.run --smoke         # tiny networks, 1-2 iterations: a correctness check
    python -m benchmarks.run --only train_state,env_steps --out results.jsonl --device cuda:0

See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.measure import (
    Recorder,
    TimedPolicy,
    hardware_string,
    log,
    percentile_ms,
    set_threads,
    sync,
    timed_calls,
)
from benchmarks.recipes import (
    SEED,
    RecipeTraining,
    cli_device,
    compose_recipe,
    endless,
    find_pusht_zarr,
    headless_env,
    n_params,
    write_subset_zarr,
)
from diffusion_policy.common.pytorch_util import seed_everything

STATE_RECIPE = "train_diffusion_unet_lowdim_workspace"
IMAGE_RECIPE = "train_diffusion_unet_hybrid_workspace"
STATE_DPT_RECIPE = "train_diffusion_transformer_lowdim_pusht_workspace"
IMAGE_DPT_RECIPE = "train_diffusion_transformer_hybrid_workspace"

# (label, config group policy/noise_scheduler=<group>, num_inference_steps). DDPM-100 is the paper's
# sampler; DDIM-10/16 are the fast samplers of the paper's real-robot setup; flow matching with 1, 2 and 4
# Euler steps is the few-step option (one denoiser call per step, like DDIM). Latency does not depend on
# the weights, so every sampler is timed on the same freshly built network.
SAMPLERS = (
    ("ddpm100", "ddpm", 100),
    ("ddim10", "ddim", 10),
    ("ddim16", "ddim", 16),
    ("flow1", "flow_matching", 1),
    ("flow2", "flow_matching", 2),
    ("flow4", "flow_matching", 4),
)
SAMPLER_BY_LABEL = {s[0]: s for s in SAMPLERS}
LATENCY_BATCHES = (1, 56)

# Smoke mode shrinks the networks; everything else (dataset, sampler, runner) stays the shipped code.
TINY_STATE = ["policy.model.down_dims=[16,32]", "policy.model.diffusion_step_embed_dim=16"]
TINY_IMAGE = [
    "policy.down_dims=[16,32]",
    "policy.diffusion_step_embed_dim=16",
    "policy.crop_shape=[48,48]",
]
TINY_DPT_STATE = ["policy.model.n_layer=1", "policy.model.n_head=2", "policy.model.n_emb=16"]
TINY_DPT_IMAGE = ["policy.n_layer=1", "policy.n_head=2", "policy.n_emb=16", "policy.crop_shape=[48,48]"]


@dataclass(frozen=True)
class RecipeKind:
    """One benchmarked recipe: its config, whether it reads images, and its smoke-mode shrink."""

    config_name: str
    obs: str  # "state" or "image"
    tiny: tuple[str, ...]


KINDS = {
    "state": RecipeKind(STATE_RECIPE, "state", tuple(TINY_STATE)),
    "image": RecipeKind(IMAGE_RECIPE, "image", tuple(TINY_IMAGE)),
    "state_dpt": RecipeKind(STATE_DPT_RECIPE, "state", tuple(TINY_DPT_STATE)),
    "image_dpt": RecipeKind(IMAGE_DPT_RECIPE, "image", tuple(TINY_DPT_IMAGE)),
}

MODES = ("full", "quick", "smoke")
# How hard each benchmark works in each mode: (full, quick, smoke); benchmarks/README.md, "Modes and duration"
EFFORT = {
    "train_warmup": (10, 1, 1),
    "train_steps": (50, 1, 1),
    "train_batch_size": (None, None, 4),  # None: the recipe's batch size
    "latency_warmup": (3, 1, 0),  # DDIM-10 calls once per batch size, before any sampler is timed
    "sampler_warmup": (2, 0, 0),  # untimed calls per sampler
    "latency_repeats": (20, 2, 1),
    "ddpm_repeats": (None, 1, None),  # timed DDPM-100 calls, if fewer than latency_repeats
    "env_episodes": (20, 10, 1),
    "env_max_steps": (None, None, 20),
    "deploy_repeats": (20, 5, 1),  # timed predict_action calls per backend in bench_deploy (DDIM)
    "deploy_ddpm_repeats": (5, 2, 1),  # ... with DDPM-100
}
TOO_SLOW = "left out in --quick: tens of seconds to minutes per call on a CPU; run without --quick"
# --quick leaves these "<sampler>.b<batch>" cases out, per recipe kind (latency) and deploy model
QUICK_LATENCY_SKIP = {
    "state": ("ddpm100.b56", "ddim16.b56"),
    "image": ("ddpm100.b1", "ddpm100.b56", "ddim10.b56", "ddim16.b56"),
    "state_dpt": ("ddpm100.b56", "ddim16.b56"),
    "image_dpt": ("ddpm100.b1", "ddpm100.b56", "ddim16.b56"),
}
QUICK_DEPLOY_SKIP = {"state": ("ddpm100.b56",), "image": ("ddpm100.b1", "ddpm100.b56", "ddim10.b56")}
SHORT_EVAL = {  # runner overrides: quick 1 + 2 episodes of 300 steps, smoke 1 + 1 of 16 steps in one env
    "quick": ["task.env_runner.n_train=1", "task.env_runner.n_test=2"],
    "smoke": [
        "task.env_runner.n_train=1",
        "task.env_runner.n_test=1",
        "task.env_runner.max_steps=16",
        "task.env_runner.n_envs=1",
    ],
}


@dataclass
class Plan:
    """How hard each benchmark works in one mode (see ``EFFORT``)."""

    mode: str
    train_warmup: int
    train_steps: int
    train_batch_size: int | None
    latency_warmup: int
    sampler_warmup: int
    latency_repeats: int
    ddpm_repeats: int | None
    env_episodes: int
    env_max_steps: int | None
    deploy_repeats: int
    deploy_ddpm_repeats: int
    # recipe kind / deploy model -> the "<sampler>.b<batch>" cases left out in this mode
    latency_skip: dict[str, tuple[str, ...]] = field(default_factory=dict)
    deploy_skip: dict[str, tuple[str, ...]] = field(default_factory=dict)
    eval_runner_overrides: list[str] = field(default_factory=list)
    eval_sampler: str | None = None  # None: the recipe's own sampler
    tiny: bool = False
    image_subset_episodes: int | None = None  # smoke: a small copy of the first episodes

    def skipped(self, table: dict[str, tuple[str, ...]], what: str, sampler: str, batch: int) -> str | None:
        """Why this mode leaves the case out, or None when it is measured."""
        return TOO_SLOW if f"{sampler}.b{batch}" in table.get(what, ()) else None


def make_plan(mode: str) -> Plan:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use full, quick or smoke")
    plan = Plan(mode, **{key: values[MODES.index(mode)] for key, values in EFFORT.items()})
    if mode == "quick":
        plan.latency_skip, plan.deploy_skip = QUICK_LATENCY_SKIP, QUICK_DEPLOY_SKIP
    if mode != "full":
        plan.eval_runner_overrides, plan.eval_sampler = SHORT_EVAL[mode], "ddim10"
    if mode == "smoke":
        plan.tiny, plan.image_subset_episodes = True, 2
    return plan


# ----------------------------------------------------------------------------------------------------
# recipes


class Recipes:
    """Composes the shipped configs once per process and caches datasets, which are costly to load."""

    def __init__(self, plan: Plan, device: torch.device, zarr_path: Path, workdir: Path):
        self.plan = plan
        self.device = device
        self.zarr_path = zarr_path
        self.workdir = workdir
        self._datasets: dict[str, Any] = {}
        self._image_zarr: Path | None = None

    def _image_zarr_path(self) -> Path:
        if self.plan.image_subset_episodes is None:
            return self.zarr_path
        if self._image_zarr is None:
            log(f"writing a {self.plan.image_subset_episodes}-episode subset of the dataset (smoke mode)")
            self._image_zarr = write_subset_zarr(
                self.zarr_path, self.workdir / "pusht_subset.zarr", self.plan.image_subset_episodes
            )
        return self._image_zarr

    def compose(self, kind: str, overrides: tuple[str, ...] | list[str] = ()) -> Any:
        recipe = KINDS[kind]
        if recipe.obs == "state":
            base = [f"task.dataset.zarr_path={self.zarr_path}"]
        else:
            base = ["task=pusht_image", f"task.dataset.zarr_path={self._image_zarr_path()}"]
        tiny = list(recipe.tiny) if self.plan.tiny else []
        return compose_recipe(recipe.config_name, base + tiny + list(overrides))

    def scheduler(self, kind: str, sampler: str) -> tuple[Any, int]:
        """The sampler as the shipped ``policy/noise_scheduler`` group builds it, with the step count set."""
        from hydra.utils import instantiate

        _, group, steps = SAMPLER_BY_LABEL[sampler]
        cfg = self.compose(kind, [f"policy/noise_scheduler={group}", f"policy.num_inference_steps={steps}"])
        return instantiate(cfg.policy.noise_scheduler), int(cfg.policy.num_inference_steps)

    def dataset(self, kind: str, cfg: Any) -> Any:
        from hydra.utils import instantiate

        if kind not in self._datasets:
            t0 = time.perf_counter()
            self._datasets[kind] = instantiate(cfg.task.dataset)
            log(f"{kind} dataset: {len(self._datasets[kind])} windows in {time.perf_counter() - t0:.1f}s")
        return self._datasets[kind]

    def policy(self, kind: str, cfg: Any, sampler: str | None = None) -> Any:
        """The recipe's policy with a normalizer, moved to the device; ``sampler`` swaps DDPM/DDIM."""
        from hydra.utils import instantiate

        seed_everything(SEED)
        policy = instantiate(cfg.policy)
        policy.set_normalizer(self.dataset(kind, cfg).get_normalizer())
        if sampler is not None:
            self.set_sampler(kind, policy, sampler)
        return policy.to(self.device).eval()

    def set_sampler(self, kind: str, policy: Any, sampler: str) -> None:
        """Swap the sampling scheduler of a built policy (training is unaffected; weights stay)."""
        for attr in ("noise_scheduler", "num_inference_steps"):
            if not hasattr(policy, attr):
                raise SystemExit(
                    f"{type(policy).__name__} has no attribute {attr!r}; cannot swap the sampler"
                )
        policy.noise_scheduler, policy.num_inference_steps = self.scheduler(kind, sampler)


# ----------------------------------------------------------------------------------------------------
# benchmarks


def bench_train(kind: str, recipes: Recipes, rec: Recorder) -> None:
    """Optimizer steps/s of the shipped recipe: data loading and the workspace's own training step
    (forward, backward, optimizer, LR schedule, EMA)."""
    plan, device = recipes.plan, recipes.device
    overrides = []
    if plan.train_batch_size is not None:
        overrides.append(f"dataloader.batch_size={plan.train_batch_size}")
    if plan.tiny:
        overrides.append("dataloader.num_workers=0")
    cfg = recipes.compose(kind, overrides)
    dataset = recipes.dataset(kind, cfg)
    training, loader = RecipeTraining.build(cfg, dataset, device, recipes.workdir / f"train_{kind}")
    it = endless(loader)
    n_total = plan.train_warmup + plan.train_steps
    data_wait = 0.0
    t_start = 0.0
    for step in range(n_total):
        if step == plan.train_warmup:
            sync(device)
            t_start, data_wait = time.perf_counter(), 0.0
        t0 = time.perf_counter()
        batch = next(it)
        data_wait += time.perf_counter() - t0
        loss_value = training.step(batch).item()  # the loop logs it every step: its sync is part of the cost
        sync(device)
        if step < plan.train_warmup or step % max(1, plan.train_steps // 5) == 0:
            log(f"train_{kind} step {step + 1}/{n_total} loss {loss_value:.4f}")
    elapsed = time.perf_counter() - t_start
    steps_per_s = plan.train_steps / elapsed
    config = {
        "recipe": KINDS[kind].config_name,
        "mode": plan.mode,
        "device": str(device),
        "batch_size": loader.batch_size,
        "num_workers": loader.num_workers,
        "persistent_workers": loader.persistent_workers,
        "pin_memory": loader.pin_memory,
        "params": n_params(training.model),
        "warmup_steps": plan.train_warmup,
        "measured_steps": plan.train_steps,
        "seconds": round(elapsed, 3),
        "step": "next(batch), to(device), compute_loss, backward, AdamW, LR schedule, EMA, loss.item()",
        "precision": cfg.training.get("mixed_precision") or "fp32",
        "tiny_networks": plan.tiny,
    }
    prefix = f"train_{kind}"
    rec.emit(f"{prefix}.optimizer_steps_per_s", steps_per_s, "steps/s", config)
    rec.emit(f"{prefix}.samples_per_s", steps_per_s * loader.batch_size, "samples/s", config)
    rec.emit(f"{prefix}.data_wait_share", data_wait / elapsed, "fraction", config)


def latency_obs(kind: str, dataset: Any, batch: int, n_obs_steps: int, device: torch.device) -> dict:
    """Real observations from the dataset, cut to the policy's (B, To, ...) input."""
    rng = np.random.default_rng(SEED)
    idx = rng.choice(len(dataset), size=batch, replace=len(dataset) < batch)
    items = [dataset[int(i)] for i in idx]
    if KINDS[kind].obs == "state":
        obs = torch.stack([item["obs"][:n_obs_steps] for item in items])
        return {"obs": obs.to(device)}
    keys = items[0]["obs"].keys()
    return {k: torch.stack([item["obs"][k][:n_obs_steps] for item in items]).to(device) for k in keys}


def bench_latency(kind: str, recipes: Recipes, rec: Recorder) -> None:
    """Wall time of one predict_action call (an 8-action chunk) per sampler and batch size."""
    plan, device = recipes.plan, recipes.device
    cfg = recipes.compose(kind)
    policy = recipes.policy(kind, cfg)
    dataset = recipes.dataset(kind, cfg)
    n_obs_steps = int(cfg.n_obs_steps)
    for batch in LATENCY_BATCHES:
        obs = latency_obs(kind, dataset, batch, n_obs_steps, device)
        if plan.latency_warmup and not all(
            plan.skipped(plan.latency_skip, kind, label, batch) for label, *_ in SAMPLERS
        ):
            # first calls at a batch size pay for allocations and kernel selection, whatever the sampler
            recipes.set_sampler(kind, policy, "ddim10")
            with torch.inference_mode():
                for _ in range(plan.latency_warmup):
                    policy.predict_action(obs)
            sync(device)
        for label, _, steps in SAMPLERS:
            name = f"latency_{kind}.{label}.b{batch}"
            config = {
                "recipe": KINDS[kind].config_name,
                "mode": plan.mode,
                "device": str(device),
                "sampler": label,
                "num_inference_steps": steps,
                "batch_size": batch,
                "params": n_params(policy),
                "tiny_networks": plan.tiny,
            }
            skip = plan.skipped(plan.latency_skip, kind, label, batch)
            if skip:
                log(f"{name}: skipped ({skip})")
                for q in ("p50", "p95"):
                    rec.emit(f"{name}.{q}", None, "ms", {**config, "skipped": skip})
                continue
            recipes.set_sampler(kind, policy, label)
            repeats = plan.latency_repeats
            if label.startswith("ddpm") and plan.ddpm_repeats is not None:
                repeats = min(repeats, plan.ddpm_repeats)
            with torch.inference_mode():
                call = functools.partial(policy.predict_action, obs)
                times, out = timed_calls(call, repeats, plan.sampler_warmup, device)
            if tuple(out["action"].shape[:1]) != (batch,):
                raise RuntimeError(f"{name}: predict_action returned action {tuple(out['action'].shape)}")
            config.update(
                warmup_calls_per_batch=plan.latency_warmup,
                warmup_calls=plan.sampler_warmup,
                repeats=len(times),
            )
            log(f"{name}: p50 {percentile_ms(times, 50):.1f} ms over {len(times)} calls")
            rec.emit(f"{name}.p50", percentile_ms(times, 50), "ms", config)
            rec.emit(f"{name}.p95", percentile_ms(times, 95), "ms", config)
    del policy


# (model label, recipe kind, extra overrides): the paper's state UNet, the CPU recipe's small UNet and the
# paper's hybrid image UNet (ResNet-18 encoder + UNet)
DEPLOY_MODELS = (
    ("state", "state", ()),
    ("state_cpu", "state", ("experiment=pusht_lowdim_cpu",)),
    ("image", "image", ()),
)
DEPLOY_SAMPLERS = (("ddim10", "ddim", 10), ("ddpm100", "ddpm", 100))
DEPLOY_BACKENDS = ("torch", "onnxruntime", "openvino")


def deploy_call(
    backend: str, policy, runtimes: dict, obs: dict, np_obs: dict, noise: np.ndarray
) -> np.ndarray:
    """One predict_action of the torch policy or an exported runtime, from the same initial noise."""
    if backend == "torch":
        # the torch loop draws its initial trajectory with torch.randn from this generator: `noise` again
        generator = torch.Generator().manual_seed(SEED)
        return policy.predict_action(obs, generator=generator)["action"].numpy()
    return runtimes[backend].predict_action(np_obs, noise=noise)["action"]


def denoiser_call_ms(torch_denoiser, runtimes: dict, batch: int, repeats: int) -> dict[str, float]:
    """Mean time of one bare denoiser call per backend over ``max(repeats, 3)`` calls after the Timer's own
    warm-up calls, at the process's thread count (zeros in; the cost does not depend on values)."""
    from torch.utils.benchmark import Timer

    runtime = runtimes["onnxruntime"]
    F = runtime.manifest["feature_dim"]
    To = runtime.n_obs_steps
    cond_shape = (batch, To * F) if runtime.conditioning == "global_cond" else (batch, To, F)
    x = np.zeros((batch, runtime.trajectory_length, runtime.action_dim), np.float32)
    t = np.full((batch,), 10, np.int64)
    c = np.zeros(cond_shape, np.float32)
    tx, tt, tc = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c)
    calls = {
        "torch": lambda: torch_denoiser(tx, tt, tc),
        **{b: (lambda r=r: r.denoiser(x, t, c)) for b, r in runtimes.items()},
    }
    out = {}
    with torch.inference_mode():
        for backend, call in calls.items():
            timer = Timer("call()", globals={"call": call}, num_threads=torch.get_num_threads())
            out[backend] = timer.timeit(max(repeats, 3)).mean * 1e3
    return out


def bench_deploy(recipes: Recipes, rec: Recorder) -> None:
    """``predict_action`` latency of the same policy in torch eager and exported (export.py's graphs run by
    the torch-free runtime under onnxruntime and OpenVINO), per sampler and batch size, all backends at the
    process's thread count (``--threads``), measured one after another in this run. Also records each
    backend's speedup over torch and its largest action difference from torch for DDIM-10 from the same
    initial noise."""
    from omegaconf import OmegaConf

    from diffusion_policy.deploy import load_exported_policy
    from diffusion_policy.deploy.exporter import DenoiserGraph, export_policy

    plan = recipes.plan
    threads = torch.get_num_threads()
    for model, kind, overrides in DEPLOY_MODELS:
        cfg = recipes.compose(kind, list(overrides))
        policy = recipes.policy(kind, cfg).to("cpu")
        dataset = recipes.dataset(kind, cfg)
        export_dir = recipes.workdir / f"export_{model}"
        t0 = time.perf_counter()
        export_policy(policy, OmegaConf.to_yaml(cfg), export_dir)
        log(f"deploy_{model}: exported in {time.perf_counter() - t0:.1f}s")
        runtimes = {b: load_exported_policy(export_dir, b, threads=threads) for b in DEPLOY_BACKENDS[1:]}
        for batch in LATENCY_BATCHES:
            obs = latency_obs(kind, dataset, batch, int(cfg.n_obs_steps), torch.device("cpu"))
            np_obs = {k: v.numpy() for k, v in obs.items()}
            denoiser_ms = denoiser_call_ms(
                DenoiserGraph(policy.model, runtimes["onnxruntime"].conditioning),
                runtimes,
                batch,
                plan.deploy_repeats,
            )
            for label, group, steps in DEPLOY_SAMPLERS:
                skip = plan.skipped(plan.deploy_skip, model, label, batch)
                if skip:
                    log(f"deploy_{model}.{label}.b{batch}: skipped ({skip})")
                    for backend in DEPLOY_BACKENDS:
                        name = f"deploy_{model}.{label}.b{batch}.{backend}"
                        config = {"mode": plan.mode, "backend": backend, "batch_size": batch, "skipped": skip}
                        rec.emit(f"{name}.p50", None, "ms", config)
                        if backend != "torch":
                            rec.emit(f"{name}.speedup", None, "x", config)
                    continue
                recipes.set_sampler(kind, policy, label)
                for runtime in runtimes.values():
                    runtime.set_sampler(group, steps, eta=0.0)
                shape = (batch, runtimes["onnxruntime"].trajectory_length, policy.action_dim)
                noise = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
                noise_np = noise.numpy()

                args = (policy, runtimes, obs, np_obs, noise_np)
                repeats = plan.deploy_ddpm_repeats if group == "ddpm" else plan.deploy_repeats
                p50 = {}
                actions = {}
                for backend in DEPLOY_BACKENDS:
                    call = functools.partial(deploy_call, backend, *args)
                    with torch.inference_mode():
                        # untimed first call: allocations, kernel choice, OpenVINO's compile per batch size;
                        # every call starts from the same noise, so the last call's actions are the first's
                        times, actions[backend] = timed_calls(call, repeats, 1, torch.device("cpu"))
                    p50[backend] = percentile_ms(times, 50)
                    name = f"deploy_{model}.{label}.b{batch}.{backend}"
                    config = {
                        "recipe": KINDS[kind].config_name,
                        "overrides": list(overrides),
                        "mode": plan.mode,
                        "device": "cpu",
                        "backend": backend,
                        "sampler": label,
                        "num_inference_steps": steps,
                        "batch_size": batch,
                        "threads": threads,
                        "params": n_params(policy),
                        "repeats": repeats,
                        "tiny_networks": plan.tiny,
                        # one denoiser call at this batch size: x steps, the floor of predict_action
                        "denoiser_call_ms": denoiser_ms[backend],
                    }
                    if backend != "torch" and group == "ddim":
                        diff = float(np.abs(actions[backend] - actions["torch"]).max())
                        config["max_abs_action_diff_vs_torch"] = diff
                    log(f"{name}: p50 {p50[backend]:.2f} ms over {repeats} calls")
                    rec.emit(f"{name}.p50", p50[backend], "ms", config)
                    if backend != "torch":
                        rec.emit(f"{name}.speedup", p50["torch"] / p50[backend], "x", config)


def bench_eval(recipes: Recipes, rec: Recorder) -> None:
    """Wall time of the PushT evaluation protocol (runner.run) with the state recipe's policy."""
    from hydra.utils import instantiate

    plan, device = recipes.plan, recipes.device
    cfg = recipes.compose("state", plan.eval_runner_overrides)
    sampler = plan.eval_sampler
    policy = recipes.policy("state", cfg, sampler)
    sampler_desc = sampler or type(policy.noise_scheduler).__name__ + f"-{policy.num_inference_steps}"

    timed = TimedPolicy(policy, device)
    out_dir = recipes.workdir / "eval_protocol"
    out_dir.mkdir(parents=True, exist_ok=True)
    runner_cfg = cfg.task.env_runner
    t0 = time.perf_counter()
    runner = instantiate(runner_cfg, output_dir=str(out_dir))
    t_built = time.perf_counter()
    seed_everything(SEED)
    try:
        with torch.inference_mode():
            result = runner.run(timed)
        t_run = time.perf_counter() - t_built
    finally:
        close = getattr(runner, "close", None)
        if callable(close):
            close()
    n_episodes = int(runner_cfg.n_train) + int(runner_cfg.n_test)
    config = {
        "recipe": STATE_RECIPE,
        "mode": plan.mode,
        "device": str(device),
        "policy": f"state UNet policy, untrained weights, sampler {sampler_desc}",
        "episodes": n_episodes,
        "n_train": int(runner_cfg.n_train),
        "n_test": int(runner_cfg.n_test),
        "max_steps": int(runner_cfg.max_steps),
        "n_action_steps": int(cfg.n_action_steps),
        "n_envs": getattr(runner, "n_envs", runner_cfg.get("n_envs")),
        "videos": min(int(runner_cfg.get("n_train_vis", 0)), int(runner_cfg.n_train))
        + min(int(runner_cfg.get("n_test_vis", 0)), int(runner_cfg.n_test)),
        "runner_build_s": round(t_built - t0, 3),
        "policy_calls": timed.calls,
        "policy_share": round(timed.seconds / t_run, 4) if t_run > 0 else None,
        "test_mean_score": result.get("test/mean_score"),
        "note": "untrained policy: episodes rarely end early, so this is the full 300-step worst case",
        "tiny_networks": plan.tiny,
    }
    log(f"eval_protocol: {n_episodes} episodes in {t_run:.1f}s ({timed.calls} policy calls)")
    rec.emit("eval_protocol.wall_time", t_run, "s", config)
    share = timed.seconds / t_run if t_run > 0 else None
    rec.emit("eval_protocol.policy_time_share", share, "fraction", config)
    del policy


def replay_env(
    make_env: Callable[[], Any],
    actions: np.ndarray,
    ends: np.ndarray,
    n_episodes: int,
    max_steps: int | None,
    render: bool,
) -> tuple[int, float, int]:
    """Replay the first demonstrations open-loop (episode i was recorded from seed i)."""
    env = make_env()
    steps, elapsed, render_calls = 0, 0.0, 0
    starts = np.concatenate([[0], ends[:-1]])
    try:
        for ep in range(n_episodes):
            acts = actions[starts[ep] : ends[ep]]
            if max_steps is not None:
                acts = acts[:max_steps]
            t0 = time.perf_counter()
            env.reset(seed=ep)
            for a in acts:
                env.step(a)
                if render:
                    env.render()
                    render_calls += 1
            elapsed += time.perf_counter() - t0
            steps += len(acts)
    finally:
        env.close()
    return steps, elapsed, render_calls


def bench_env(recipes: Recipes, rec: Recorder) -> None:
    """PushT env steps/s replaying real demonstration actions, with and without rendering."""
    import zarr

    from diffusion_policy.env.pusht.pusht_env import PushTEnv
    from diffusion_policy.env.pusht.pusht_image_env import PushTImageEnv
    from diffusion_policy.env.pusht.pusht_keypoints_env import PushTKeypointsEnv

    plan = recipes.plan
    root = zarr.open_group(str(recipes.zarr_path), mode="r")
    ends = np.asarray(root["meta/episode_ends"][: plan.env_episodes]).astype(np.int64)
    actions = np.asarray(root["data/action"][: int(ends[-1])]).astype(np.float64)

    variants = [
        ("state", "PushTEnv, no rendering", lambda: PushTEnv(legacy=True, render_mode=None), False),
        (
            "keypoints",
            "PushTKeypointsEnv (state policy's env), no rendering",
            lambda: PushTKeypointsEnv(legacy=True, render_mode=None),
            False,
        ),
        (
            "image",
            "PushTImageEnv: renders the 96x96 observation every step",
            lambda: PushTImageEnv(legacy=True),
            False,
        ),
        (
            "state_render",
            "PushTEnv + render() every step (what a video frame costs)",
            lambda: PushTEnv(legacy=True, render_mode="rgb_array"),
            True,
        ),
    ]
    for label, desc, make_env, render in variants:
        steps, elapsed, render_calls = replay_env(
            make_env, actions, ends, plan.env_episodes, plan.env_max_steps, render
        )
        config = {
            "env": desc,
            "mode": plan.mode,
            "episodes": plan.env_episodes,
            "steps": steps,
            "render_calls": render_calls,
            "seconds": round(elapsed, 3),
            "actions": "demonstration actions replayed open-loop from each episode's seed",
            "processes": 1,
        }
        log(f"env_steps.{label}: {steps / elapsed:.0f} steps/s")
        rec.emit(f"env_steps.{label}", steps / elapsed, "steps/s", config)


BENCHMARKS: dict[str, Callable[[Recipes, Recorder], None]] = {
    "env_steps": bench_env,
    "train_state": lambda r, rec: bench_train("state", r, rec),
    "train_image": lambda r, rec: bench_train("image", r, rec),
    "latency_state": lambda r, rec: bench_latency("state", r, rec),
    "latency_image": lambda r, rec: bench_latency("image", r, rec),
    "train_state_dpt": lambda r, rec: bench_train("state_dpt", r, rec),
    "train_image_dpt": lambda r, rec: bench_train("image_dpt", r, rec),
    "latency_state_dpt": lambda r, rec: bench_latency("state_dpt", r, rec),
    "latency_image_dpt": lambda r, rec: bench_latency("image_dpt", r, rec),
    "eval_protocol": bench_eval,
    "deploy": bench_deploy,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer repeats, smaller eval (<5 min, 2-core CPU)")
    mode.add_argument("--smoke", action="store_true", help="tiny nets, 1-2 iterations: checks plumbing")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda:0 (default: auto)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {','.join(BENCHMARKS)}")
    p.add_argument("--out", default=None, help="also write the JSON lines to this file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--zarr", default=None, help="path of pusht_cchi_v7_replay.zarr (default: data/pusht/...)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    headless_env()
    args = parse_args(argv)
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            raise SystemExit(f"--only: unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    plan = make_plan("quick" if args.quick else "smoke" if args.smoke else "full")
    device = cli_device(args.device)
    set_threads(args.threads)
    seed_everything(SEED)
    rec = Recorder(hardware_string(device), args.out)
    workdir = Path(tempfile.mkdtemp(prefix="dp_bench_"))
    recipes = Recipes(plan, device, find_pusht_zarr(args.zarr), workdir)
    log(f"mode {plan.mode}, device {device}, hardware: {rec.hardware}")
    t_all = time.perf_counter()
    try:
        for name in names:
            t0 = time.perf_counter()
            log(f"--- {name}")
            seed_everything(SEED)
            BENCHMARKS[name](recipes, rec)
            log(f"--- {name} done in {time.perf_counter() - t0:.1f}s")
    finally:
        rec.close()
        shutil.rmtree(workdir, ignore_errors=True)
    log(f"all done in {time.perf_counter() - t_all:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
