"""Run an exported policy with numpy and onnxruntime or OpenVINO: no torch, no diffusers.

    from diffusion_policy.deploy import load_exported_policy

    policy = load_exported_policy("data/export/pusht_state", backend="openvino")
    policy.reset()
    action = policy.select_action(obs)  # one env step's raw obs -> one raw action; replans every Ta steps
    out = policy.predict_action({"obs": obs_batch})  # (B, To, Do) -> {"action": (B, Ta, Da), ...}

The sampling loop mirrors the torch policies' (``diffusion_policy/policy/denoising.py``): normalise
the first To observations, encode them (image policies), denoise Gaussian noise with DDIM or DDPM or integrate
the flow-matching ODE (:mod:`diffusion_policy.deploy.schedulers`), unnormalise and cut the executed window.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_policy.common.flow_ode import SOLVER_EVALUATIONS
from diffusion_policy.common.online_queues import OnlineQueues, check_step_keys, check_window, step_is_batched
from diffusion_policy.deploy.manifest import ExportError, read_manifest
from diffusion_policy.deploy.schedulers import FlowSampler, make_sampler

BACKENDS = ("onnxruntime", "openvino")


def check_step_kwargs(step_kwargs: Mapping[str, Any]) -> None:
    """The runtime implements the scheduler steps with diffusers' defaults plus DDIM's ``eta`` only."""
    unsupported = sorted(k for k in step_kwargs if k != "eta")
    if unsupported:
        raise ExportError(
            f"scheduler step arguments {unsupported} are not supported by the runtime (only eta)"
        )


class _Affine:
    """One normalizer field: ``normalize(x) = x * scale + offset`` over trailing dims of total size d."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.scale = np.asarray(params["scale"], dtype=np.float32)
        self.offset = np.asarray(params["offset"], dtype=np.float32)
        self.inv_scale = (1.0 / np.asarray(params["scale"], dtype=np.float64)).astype(np.float32)

    def _flat(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(-1, self.scale.shape[0])

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return (self._flat(x) * self.scale + self.offset).reshape(x.shape)

    def unnormalize(self, x: np.ndarray) -> np.ndarray:
        # division, as the torch normalizer does, so results agree to the last bit where possible
        return ((self._flat(x) - self.offset) / self.scale).reshape(x.shape)


class _OrtGraph:
    def __init__(self, path: Path, threads: int | None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return self.session.run(None, dict(zip(self.inputs, arrays)))[0]


class _OpenVINOGraph:
    """Compiled per input batch size: static shapes skip the dynamic-shape first-call cost and get faster
    kernels. A rollout whose batch shrinks as episodes end would compile once per size, so after
    ``MAX_STATIC`` sizes further sizes share one dynamic-batch model."""

    MAX_STATIC = 4

    def __init__(self, path: Path, threads: int | None) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.model = self.core.read_model(str(path))
        self.config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self.requests: dict[int, Any] = {}
        self.dynamic: Any = None

    def _compile(self, model: Any) -> Any:
        try:
            compiled = self.core.compile_model(model, "CPU", self.config)
        except RuntimeError:
            # OpenVINO's snippets code generator refuses some static shapes (e.g. Mish at batch 1)
            compiled = self.core.compile_model(model, "CPU", {**self.config, "SNIPPETS_MODE": "DISABLE"})
        return compiled.create_infer_request()

    def _request(self, batch: int) -> Any:
        request = self.requests.get(batch)
        if request is not None:
            return request
        if len(self.requests) < self.MAX_STATIC:
            model = self.model.clone()
            model.reshape({p.get_any_name(): [batch, *list(p.get_partial_shape())[1:]] for p in model.inputs})
            request = self.requests[batch] = self._compile(model)
            return request
        if self.dynamic is None:
            self.dynamic = self._compile(self.model)
        return self.dynamic

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        request = self._request(arrays[0].shape[0])
        # share_inputs: no copy of the inputs; the output is copied because the request reuses its buffer
        results = request.infer(list(arrays), share_inputs=True)
        return np.array(results[0], copy=True)


def _load_graph(export_dir: Path, graph: Mapping[str, Any], backend: str, threads: int | None):
    if backend == "onnxruntime":
        if "onnx" not in graph:
            raise ExportError(f"{export_dir} has no ONNX graphs (exported without --format onnx)")
        return _OrtGraph(export_dir / graph["onnx"], threads)
    if "openvino" not in graph:
        raise ExportError(f"{export_dir} has no OpenVINO IR (exported without --format openvino)")
    return _OpenVINOGraph(export_dir / graph["openvino"], threads)


class ExportedPolicy:
    """An exported diffusion policy: the torch policies' ``predict_action`` / ``reset`` / ``select_action``
    on numpy arrays (float32)."""

    def __init__(
        self,
        export_dir: str | os.PathLike,
        backend: str = "openvino",
        threads: int | None = None,
        seed: int | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ExportError(f"backend {backend!r} is not one of {list(BACKENDS)}")
        self.export_dir = Path(export_dir)
        self.manifest = m = read_manifest(self.export_dir)
        self.backend = backend
        self.obs_shapes = {k: tuple(v) for k, v in m["obs_shapes"].items()}
        self.obs_type = m["obs_type"]
        self.action_dim = m["action_dim"]
        self.horizon = m["horizon"]
        self.n_obs_steps = m["n_obs_steps"]
        self.n_action_steps = m["n_action_steps"]
        self.action_start = m["action_start"]
        self.pred_action_steps_only = m["pred_action_steps_only"]
        self.trajectory_length = m["trajectory_length"]
        # as the torch policies: where in action_pred the current step's action is, and how many follow
        self.chunk_start = 0 if self.pred_action_steps_only else self.action_start
        self.chunk_length = self.trajectory_length - self.chunk_start
        self.conditioning = m["conditioning"]
        self.normalizer = {k: _Affine(v) for k, v in m["normalizer"].items()}
        self.denoiser = _load_graph(self.export_dir, m["graphs"]["denoiser"], backend, threads)
        self.obs_encoder = None
        if self.obs_type == "image":
            self.obs_encoder = _load_graph(self.export_dir, m["graphs"]["obs_encoder"], backend, threads)
        check_step_kwargs(m["sampler"].get("step_kwargs", {}))
        self.set_sampler(m["sampler"]["class"], m["sampler"]["num_inference_steps"], m["sampler"]["eta"])
        self.rng = np.random.default_rng(seed)
        self._timestep_cache: dict[int, list[np.ndarray]] = {}
        self._queues = OnlineQueues(self.n_obs_steps, np.stack)

    # ---------------- settings ----------------
    def set_sampler(
        self, scheduler_class: str | None = None, num_inference_steps: int | None = None, eta=None
    ):
        """Sample with ``"DDIMScheduler"`` / ``"DDPMScheduler"`` (or ``"ddim"`` / ``"ddpm"``) over the trained
        noise schedule; None keeps the current choice (DDPM: all training steps when switching to it).
        A flow-matching export takes an ODE solver instead: ``"euler"``, ``"midpoint"`` or ``"heun"``."""
        aliases = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler"}
        trained = self.manifest["scheduler"]["class"]
        flow = trained == "FlowMatchingScheduler"
        current = getattr(self, "sampler", None)
        if flow:
            config = dict(self.manifest["scheduler"]["config"])
            if scheduler_class in SOLVER_EVALUATIONS:
                config["solver"] = scheduler_class
            elif scheduler_class not in (None, trained):
                raise ValueError(
                    f"sampler {scheduler_class!r}: this policy was trained with flow matching; "
                    f"use one of {list(SOLVER_EVALUATIONS)}"
                )
            elif current is not None:
                config["solver"] = current.solver
            if num_inference_steps is None:
                num_inference_steps = current.num_inference_steps
            self.sampler = make_sampler(trained, config, int(num_inference_steps))
            self._timestep_cache = {}
            return
        if scheduler_class in SOLVER_EVALUATIONS or scheduler_class == "FlowMatchingScheduler":
            raise ValueError(
                f"sampler {scheduler_class!r} is a flow-matching solver; this policy was trained as a "
                "diffusion model (use ddpm or ddim)"
            )
        current_cls = type(current).__name__.replace("Sampler", "Scheduler") if current is not None else None
        cls = aliases.get(scheduler_class, scheduler_class) or current_cls
        if num_inference_steps is None:
            # as the torch policies' use_sampler: DDPM walks every training step, DDIM keeps its count
            if cls == "DDPMScheduler" and scheduler_class is not None:
                num_inference_steps = self.manifest["scheduler"]["config"]["num_train_timesteps"]
            else:
                num_inference_steps = current.num_inference_steps
        if eta is None:
            eta = getattr(current, "eta", 0.0)
        scheduler = self.manifest["scheduler"]
        self.sampler = make_sampler(
            cls, scheduler["config"], int(num_inference_steps), eta, scheduler.get("tables")
        )
        self._timestep_cache = {}

    def sampler_label(self) -> str:
        """As the torch ``sampler_label``: ``"DDIMScheduler-8"``, ``"FlowMatchingScheduler-euler-2"``."""
        if isinstance(self.sampler, FlowSampler):
            return f"FlowMatchingScheduler-{self.sampler.solver}-{self.sampler.num_inference_steps}"
        name = type(self.sampler).__name__.replace("Sampler", "Scheduler")
        return f"{name}-{self.sampler.num_inference_steps}"

    # ---------------- inference ----------------
    def _timesteps(self, batch: int) -> list[np.ndarray]:
        """(B,) timestep inputs for every denoiser call (int64 steps; float32 times for flow matching),
        built once per batch size."""
        steps = self._timestep_cache.get(batch)
        if steps is None:
            dtype = self.sampler.timesteps.dtype
            steps = [np.full((batch,), t, dtype=dtype) for t in self.sampler.timesteps.tolist()]
            self._timestep_cache[batch] = steps
        return steps

    def _features(self, obs_dict: Mapping[str, Any]) -> tuple[np.ndarray, int]:
        """Raw obs {key: (B, >=To, *shape)} -> normalized per-frame features (B, To, F)."""
        To = self.n_obs_steps
        flat = []
        batch = None
        for key, shape in self.obs_shapes.items():
            if key not in obs_dict:
                raise KeyError(f"observation '{key}' is missing (got keys {sorted(obs_dict)})")
            value = np.asarray(obs_dict[key], dtype=np.float32)
            check_window(key, value.shape, shape, To)
            batch = value.shape[0]
            value = self.normalizer[key].normalize(np.ascontiguousarray(value[:, :To]))
            flat.append(value.reshape(batch * To, *shape))
        if self.obs_encoder is None:
            return flat[0].reshape(batch, To, -1), batch
        return self.obs_encoder(*flat).reshape(batch, To, -1), batch

    def predict_action(self, obs_dict: Mapping[str, Any], noise: np.ndarray | None = None) -> dict[str, Any]:
        """obs_dict[key]: (B, >=To, *shape) raw -> {"action": (B, Ta, Da), "action_pred": (B, T, Da)} raw.

        ``noise``: the initial trajectory (B, T, Da) (standard normal); drawn from ``self.rng`` when None.
        DDPM (and DDIM with eta > 0) draw their per-step noise from ``self.rng``.
        """
        if "past_action" in obs_dict:
            raise ValueError("obs_dict['past_action'] is not supported by exported policies")
        features, B = self._features(obs_dict)
        condition = features.reshape(B, -1) if self.conditioning == "global_cond" else features
        condition = np.ascontiguousarray(condition, dtype=np.float32)
        shape = (B, self.trajectory_length, self.action_dim)
        if noise is None:
            x = self.rng.standard_normal(shape, dtype=np.float32)
        else:
            x = np.asarray(noise, dtype=np.float32)
            if x.shape != shape:
                raise ValueError(f"noise has shape {x.shape}; expected {shape}")
            x = x.copy()
        sampler = self.sampler
        for i, t in enumerate(self._timesteps(B)):
            out = self.denoiser(x, t, condition)
            step_noise = self.rng.standard_normal(shape, dtype=np.float32) if sampler.stochastic else None
            x = sampler.step(i, out, x, step_noise)
        action_pred = self.normalizer["action"].unnormalize(x)
        if self.pred_action_steps_only:
            action = action_pred
        else:
            action = action_pred[:, self.action_start : self.action_start + self.n_action_steps]
        return {"action": action, "action_pred": action_pred}

    # ---------------- online ----------------
    def reset(self) -> None:
        """Start a new episode for :meth:`select_action` (clears the observation and action queues)."""
        self._queues.reset()

    def select_action(self, obs: Any) -> np.ndarray:
        """One control step: obs[key] (*shape) or (B, *shape) (a state policy also takes the bare array) ->
        action (Da,) or (B, Da). The first observation after ``reset()`` fills all To slots; a new chunk is
        sampled every ``n_action_steps`` calls, when the planned actions run out."""
        if not isinstance(obs, Mapping):
            obs = {"obs": obs}
        check_step_keys(obs, self.obs_shapes)
        step = {k: np.asarray(obs[k], dtype=np.float32) for k in self.obs_shapes}
        batched = step_is_batched(step, self.obs_shapes)
        if not batched:
            step = {k: v[None] for k, v in step.items()}
        action = self._queues.next_action(step, lambda stacked: self.predict_action(stacked)["action"])
        return action if batched else action[0]


def load_exported_policy(
    export_dir: str | os.PathLike,
    backend: str = "openvino",
    threads: int | None = None,
    seed: int | None = None,
) -> ExportedPolicy:
    """An export directory written by ``export.py`` -> :class:`ExportedPolicy` on ``backend``
    (``"openvino"`` or ``"onnxruntime"``). ``threads``: inference threads (None: the runtime's default;
    1 is often fastest at batch 1 on a busy machine). ``seed`` seeds the sampling noise."""
    return ExportedPolicy(export_dir, backend, threads, seed)
