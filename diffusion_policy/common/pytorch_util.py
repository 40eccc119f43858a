"""Small helpers for seeding, nested dicts of tensors, optimizer state and mixed-precision training."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed the global RNGs a run draws from: torch (all devices), numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def dict_apply(x: dict[str, Any], func: Callable[[Any], Any]) -> dict[str, Any]:
    """Apply ``func`` to every leaf of a (possibly nested) dict, keeping its structure."""
    return {k: dict_apply(v, func) if isinstance(v, dict) else func(v) for k, v in x.items()}


def optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device | str) -> torch.optim.Optimizer:
    """Move an optimizer's state tensors (e.g. Adam moments) to ``device`` in place."""
    for state in optimizer.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                state[k] = v.to(device=device)
    return optimizer


# training.mixed_precision -> autocast dtype (None, the default, is float32 throughout)
MIXED_PRECISION_DTYPES = {"bf16": torch.bfloat16}


def resolve_mixed_precision(device: torch.device | str, mixed_precision: str | None) -> str | None:
    """``training.mixed_precision`` for ``device``: ``"auto"`` becomes ``"bf16"`` where the hardware computes
    bfloat16 natively (:func:`has_native_bf16`) and ``None`` (float32) elsewhere or when torch cannot tell;
    ``None`` and ``"bf16"`` stay as they are."""
    if mixed_precision == "auto":
        return "bf16" if has_native_bf16(device) else None
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISION_DTYPES:
        raise ValueError(f"mixed_precision={mixed_precision!r}: choose null (float32), 'bf16' or 'auto'")
    return mixed_precision


def training_autocast(device: torch.device | str, mixed_precision: str | None) -> torch.autocast:
    """The autocast context of a training forward pass: ``None`` = float32 (off), ``"bf16"`` = bfloat16,
    ``"auto"`` = bfloat16 where the device has bfloat16 units, else float32.

    Only the forward runs in reduced precision; backward follows the recorded graph and the weights, their
    gradients, the optimizer and the EMA stay float32. No loss scaling: bfloat16 has float32's range.
    The returned context can be entered again and again (once per step).
    """
    dtype = MIXED_PRECISION_DTYPES.get(resolve_mixed_precision(device, mixed_precision))
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def has_native_bf16(device: torch.device | str) -> bool | None:
    """Whether ``device`` computes bfloat16 in hardware; ``None`` when torch cannot tell.

    CPU: AVX-512-BF16 or AMX (without them bfloat16 math is emulated through float32 conversions, which can
    cost more time than the narrower type saves). CUDA: compute capability 8.0 or newer.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return None
    # private helpers of torch.cpu (present since torch 2.3); absent -> unknown, never a false alarm
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    probes = [getattr(torch.cpu, name, None) for name in names]
    if any(p is None for p in probes):
        return None
    return any(p() for p in probes)


def warn_if_bf16_is_emulated(device: torch.device | str, mixed_precision: str | None) -> bool:
    """Warn when bfloat16 autocast is asked for on hardware without bfloat16 units; True if it warned."""
    if mixed_precision != "bf16" or has_native_bf16(device) is not False:
        return False
    warnings.warn(
        f"training.mixed_precision=bf16 on a {torch.device(device).type} without native bfloat16 "
        "(CPU: AVX-512-BF16 or AMX; GPU: compute capability 8.0+): it is emulated and may be slower than "
        "float32; set training.mixed_precision=null (or compare: python -m benchmarks.profile_image_training "
        "--ab baseline,bf16)",
        RuntimeWarning,
        stacklevel=2,
    )
    return True


def check_compile_backend(device: torch.device | str) -> None:
    """Raise a one-line error when ``torch.compile`` cannot build kernels for ``device``.

    On a CPU, inductor writes C++ and needs a compiler (``$CXX``, ``g++``, ``c++`` or ``clang++``); without
    one the first training step would fail deep inside torch instead.
    """
    if getattr(torch.compiler, "set_stance", None) is None:
        raise RuntimeError(
            f"training.compile=true needs torch >= 2.6 (torch.compiler.set_stance), this is "
            f"{torch.__version__}: upgrade torch or set training.compile=false"
        )
    if torch.device(device).type != "cpu":
        return
    candidates = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    if not any(c and shutil.which(c) for c in candidates):
        raise RuntimeError(
            "training.compile=true on a CPU needs a C++ compiler for torch.compile's CPU backend (inductor) "
            "and none was found ($CXX, g++, c++, clang++): install one (e.g. apt-get install g++) or set "
            "training.compile=false"
        )


def compile_seconds() -> float:
    """Seconds this process has spent in torch.compile so far: graph capture and code generation of the
    forward graphs, plus the backward graphs, which torch compiles lazily at their first backward.

    Read from torch's own timers (``torch._dynamo.utils.compilation_time_metrics``); 0.0 when this torch
    version does not keep them.
    """
    metrics = getattr(getattr(torch._dynamo, "utils", None), "compilation_time_metrics", None) or {}
    return float(
        sum(metrics.get("_compile.compile_inner", ())) + sum(metrics.get("backward._backward_impl", ()))
    )


def eager_networks():
    """A context in which compiled modules run their eager code: evaluation (other batch sizes, no
    gradients) would otherwise compile each new shape again. A no-op on torch < 2.6, which cannot do this
    (``training.compile`` refuses such a torch)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
