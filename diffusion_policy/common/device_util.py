"""Turn ``training.device`` (cuda, cuda:N, cpu, mps, auto) into a ``torch.device`` or a clear error."""

from __future__ import annotations

import torch

from diffusion_policy.common.errors import DeviceError


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(spec: str | torch.device | None, option: str = "training.device") -> torch.device:
    """auto -> cuda:0, else mps, else cpu. Asking for a device that is not there raises ``DeviceError``,
    whose message names the setting as ``option`` (a config key, or a command-line flag such as --device)."""
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise DeviceError(f"{option}={spec!r} is not a device; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"{option}={spec} requested but CUDA is not available (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda}); use {option}=cpu or {option}=auto"
            )
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"{option}={spec} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise DeviceError(f"{option}={spec} requested but MPS is not available; use cpu or auto")
        return device
    raise DeviceError(f"{option}={spec!r} is not supported; use cpu, cuda, cuda:N, mps or auto")
