"""Checkpoint -> export directory (ONNX graphs, OpenVINO IR, manifest.json). Needs torch; the runtime
does not.

What is exported is what the sampling loop calls, and nothing of the loop itself:

- ``denoiser.onnx``: (sample (B, T, D) f32, timestep (B,) int64 (float32 for flow matching), condition)
  -> model output (B, T, D),
  where condition is the UNet's ``global_cond`` (B, To * F) or the transformer's ``cond`` tokens (B, To, F);
- ``obs_encoder.onnx`` (image policies): one normalized frame per row, one input per obs key
  (N, *shape) -> features (N, F).

Normalisation, the noise schedule, the DDIM / DDPM / flow ODE loop and the action window live in the
manifest and run in numpy (:mod:`diffusion_policy.deploy.runtime`). Inpainting and local-condition
modes are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffusion_policy.deploy.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, ExportError
from diffusion_policy.deploy.runtime import check_step_kwargs
from diffusion_policy.deploy.schedulers import make_sampler

ONNX_OPSET = 17
FORMATS = ("onnx", "openvino")


class DenoiserGraph(nn.Module):
    """The policy's denoiser with its condition as one positional input (names fixed for the runtime)."""

    def __init__(self, model: nn.Module, condition_kw: str) -> None:
        super().__init__()
        self.model = model
        self.condition_kw = condition_kw

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.model(sample, timestep, **{self.condition_kw: condition})


class EncoderGraph(nn.Module):
    """obs encoder {key: (N, *shape)} -> (N, F) with the keys as positional inputs, in manifest order."""

    def __init__(self, encoder: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self.keys = keys

    def forward(self, *values: torch.Tensor) -> torch.Tensor:
        return self.encoder(dict(zip(self.keys, values)))


def describe_policy(policy: nn.Module) -> dict[str, Any]:
    """The policy facts the runtime needs, or an ExportError naming what is not supported."""
    name = type(policy).__name__
    if getattr(policy, "obs_as_local_cond", False):
        raise ExportError(f"{name} with obs_as_local_cond=True is not supported by export (global cond only)")
    if hasattr(policy, "obs_as_global_cond"):
        if not policy.obs_as_global_cond:
            raise ExportError(
                f"{name} samples by inpainting (obs_as_global_cond=False), which export does not support"
            )
        conditioning = "global_cond"
    elif hasattr(policy, "obs_as_cond"):
        if not policy.obs_as_cond:
            raise ExportError(
                f"{name} samples by inpainting (obs_as_cond=False), which export does not support"
            )
        conditioning = "cond"
    else:
        raise ExportError(f"{name} is not a diffusion policy this exporter knows")
    image = hasattr(policy, "obs_encoder")
    if image:
        for module in policy.obs_encoder.modules():
            if getattr(module, "fixed_crop_in_eval", True) is False:
                raise ExportError(
                    f"{name} crops images at random in eval (eval_fixed_crop=False); "
                    "export needs a deterministic encoder"
                )
    if image:
        obs_shapes = {k: list(v) for k, v in policy.obs_shapes.items()}
        feature_dim = int(policy.obs_feature_dim)
    else:
        obs_shapes = {"obs": [int(policy.obs_dim)]}
        feature_dim = int(policy.obs_dim)
    pred_only = bool(getattr(policy, "pred_action_steps_only", False))
    action_start = int(getattr(policy, "action_start", policy.n_obs_steps - 1))
    sched = policy.noise_scheduler
    scheduler: dict[str, Any] = {"class": type(sched).__name__, "config": _jsonable(dict(sched.config))}
    if scheduler["class"] != "FlowMatchingScheduler":
        scheduler["tables"] = scheduler_tables(dict(sched.config), int(policy.num_inference_steps))
    return {
        "policy_class": f"{type(policy).__module__}.{name}",
        "obs_type": "image" if image else "lowdim",
        "obs_shapes": obs_shapes,
        "feature_dim": feature_dim,
        "action_dim": int(policy.action_dim),
        "horizon": int(policy.horizon),
        "n_obs_steps": int(policy.n_obs_steps),
        "n_action_steps": int(policy.n_action_steps),
        "action_start": action_start,
        "pred_action_steps_only": pred_only,
        "trajectory_length": int(policy.n_action_steps if pred_only else policy.horizon),
        "conditioning": conditioning,
        "scheduler": scheduler,
        "sampler": {
            "class": type(sched).__name__,
            "num_inference_steps": int(policy.num_inference_steps),
            # DDIM's eta (diffusers' default 0: deterministic given the initial noise); unused by DDPM
            "eta": float(dict(getattr(policy, "kwargs", {})).get("eta", 0.0)),
            "step_kwargs": _jsonable(dict(getattr(policy, "kwargs", {}))),
        },
    }


# every step count up to this gets its timesteps table (plus the training count and the exported one), so the
# runtime can switch DDIM / DDPM step counts as the torch policies' use_sampler does
TABLE_STEP_COUNTS = 128


def scheduler_tables(config: dict[str, Any], exported_steps: int) -> dict[str, Any]:
    """What the numpy DDIM / DDPM samplers need, taken from diffusers' own schedulers built from ``config``:
    per class ``{"alphas_cumprod": [...], "final_alpha_cumprod": float, "timesteps": {"<n>": [...]}}``."""
    import inspect

    from diffusers import DDIMScheduler, DDPMScheduler

    n_train = int(config["num_train_timesteps"])
    counts = sorted({*range(1, min(n_train, TABLE_STEP_COUNTS) + 1), n_train, int(exported_steps)})
    tables = {}
    for cls in (DDIMScheduler, DDPMScheduler):
        accepted = inspect.signature(cls.__init__).parameters
        scheduler = cls(**{k: v for k, v in config.items() if k in accepted})
        timesteps = {}
        for n in counts:
            scheduler.set_timesteps(n)
            timesteps[str(n)] = scheduler.timesteps.tolist()
        final = getattr(scheduler, "final_alpha_cumprod", scheduler.alphas_cumprod[0])
        tables[cls.__name__] = {
            "alphas_cumprod": scheduler.alphas_cumprod.tolist(),
            "final_alpha_cumprod": float(final),
            "timesteps": timesteps,
        }
    return tables


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return np.asarray(x).tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def normalizer_params(policy: nn.Module, keys: list[str]) -> dict[str, dict[str, list[float]]]:
    """{field: {"scale": [...], "offset": [...]}}; ``normalize(x) = x * scale + offset`` (last dims)."""
    out = {}
    for key in keys:
        params = policy.normalizer.params_dict[key]
        out[key] = {
            "scale": params["scale"].detach().cpu().double().flatten().tolist(),
            "offset": params["offset"].detach().cpu().double().flatten().tolist(),
        }
    return out


def _onnx_export(module: nn.Module, args: tuple, path: Path, inputs: list[str], output: str) -> None:
    dynamic = {name: {0: "batch"} for name in inputs}
    dynamic[output] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the TorchScript-based exporter: the dynamo one needs onnxscript, which is not a dependency
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=[output],
            dynamic_axes=dynamic,
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _to_openvino(onnx_path: Path, xml_path: Path) -> None:
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=False)


def export_policy(
    policy: nn.Module,
    cfg_yaml: str,
    out_dir: Path,
    formats: tuple[str, ...] = FORMATS,
    source: str = "",
    shape_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ONNX graphs (always: OpenVINO converts from them), OpenVINO IR if asked, and the manifest into
    ``out_dir`` (created; must not exist). Returns the manifest."""
    manifest = describe_policy(policy)
    sampler = manifest["sampler"]
    try:
        # the runtime must be able to sample with this schedule: refuse now rather than at load time
        check_step_kwargs(sampler["step_kwargs"])
        make_sampler(
            sampler["class"],
            manifest["scheduler"]["config"],
            sampler["num_inference_steps"],
            sampler["eta"],
            manifest["scheduler"].get("tables"),
        )
    except ValueError as e:
        raise ExportError(f"{manifest['policy_class'].rsplit('.', 1)[-1]}: {e}") from None
    policy = policy.to("cpu").eval()
    To, F, D = manifest["n_obs_steps"], manifest["feature_dim"], manifest["action_dim"]
    T = manifest["trajectory_length"]
    B = 2  # traced batch; the batch axis is dynamic
    out_dir.mkdir(parents=True)
    graphs: dict[str, dict[str, Any]] = {}

    if manifest["conditioning"] == "global_cond":
        condition = torch.zeros(B, To * F)
    else:
        condition = torch.zeros(B, To, F)
    denoiser = DenoiserGraph(policy.model, manifest["conditioning"]).eval()
    names = ["sample", "timestep", "condition"]
    # flow matching feeds continuous times: its graph takes float32 timesteps, diffusion's int64 steps
    flow = manifest["scheduler"]["class"] == "FlowMatchingScheduler"
    timestep = torch.full((B,), 10.0) if flow else torch.full((B,), 10, dtype=torch.long)
    args = (torch.randn(B, T, D), timestep, condition)
    with torch.no_grad():
        _onnx_export(denoiser, args, out_dir / "denoiser.onnx", names, "model_output")
    graphs["denoiser"] = {"onnx": "denoiser.onnx", "inputs": names, "output": "model_output"}

    if manifest["obs_type"] == "image":
        keys = list(manifest["obs_shapes"])
        encoder = EncoderGraph(policy.obs_encoder, keys).eval()
        frames = tuple(torch.rand(B, *manifest["obs_shapes"][k]) for k in keys)
        with torch.no_grad():
            _onnx_export(encoder, frames, out_dir / "obs_encoder.onnx", keys, "features")
        graphs["obs_encoder"] = {"onnx": "obs_encoder.onnx", "inputs": keys, "output": "features"}

    if "openvino" in formats:
        for name, graph in graphs.items():
            _to_openvino(out_dir / graph["onnx"], out_dir / f"{name}.xml")
            graph["openvino"] = f"{name}.xml"
    if "onnx" not in formats:
        for graph in graphs.values():
            (out_dir / graph.pop("onnx")).unlink()

    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        **manifest,
        "normalizer": normalizer_params(policy, ["action", *manifest["obs_shapes"]]),
        "shape_meta": shape_meta,
        "graphs": graphs,
        "formats": sorted(formats),
        "onnx_opset": ONNX_OPSET,
        "exported_with": {"torch": torch.__version__},
        "source_checkpoint": source,
        "config_yaml": cfg_yaml,
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return manifest


def export_checkpoint(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, formats=FORMATS, overwrite: bool = False
) -> dict[str, Any]:
    """Export a training checkpoint (EMA weights) into ``out_dir`` atomically: everything is written to a
    temporary sibling directory and renamed at the end, so a failure leaves ``out_dir`` as it was."""
    from diffusion_policy.common.config_resolvers import register_resolvers
    from diffusion_policy.common.errors import CheckpointError
    from diffusion_policy.workspace.base_workspace import load_policy

    out = Path(out_dir)
    check_output_dir(out, overwrite)
    register_resolvers()
    if not Path(checkpoint).is_file():
        raise ExportError(f"checkpoint {checkpoint} does not exist")
    try:
        policy, cfg = load_policy(checkpoint, "cpu")
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    from omegaconf import OmegaConf

    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    shape_meta = cfg.get("shape_meta") or cfg.get("task", {}).get("shape_meta")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = export_policy(
            policy,
            cfg_yaml,
            tmp / "export",
            tuple(formats),
            str(checkpoint),
            OmegaConf.to_container(shape_meta, resolve=True) if shape_meta is not None else None,
        )
        if out.exists():
            old = tmp / "old"
            out.rename(old)
        (tmp / "export").rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty directory without ``overwrite``; with it, only a previous export (or an
    empty directory) may be replaced, never arbitrary data."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"output dir {out} is not empty; pass --overwrite or choose another -o")
        if not (out / MANIFEST_NAME).is_file():
            raise ExportError(
                f"output dir {out} is not empty and holds no {MANIFEST_NAME}; refusing to replace it"
            )
