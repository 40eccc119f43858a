"""How the benchmarks measure and report: device sync, timed calls, percentiles, the hardware string and
the JSON-line rows ``{name, value, unit, config, hardware}`` every benchmark prints."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from diffusion_policy.common.host_info import cpu_model_name, usable_cpu_count


def log(msg: str) -> None:
    """Progress goes to stderr, so that stdout holds only result rows."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def hardware_string(device: torch.device) -> str:
    cpu = f"{cpu_model_name()} ({usable_cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        return f"{gpu} + CPU {cpu}; torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU {cpu}; torch {torch.__version__}"


def set_threads(threads: int | None) -> None:
    """``--threads N``: torch's CPU threads (None keeps torch's choice, which follows OMP_NUM_THREADS)."""
    if threads is None:
        return
    if threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def load_avg() -> list[float] | None:
    """The 1/5/15-minute load average: the numbers are only as clean as the machine was idle."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(
    call: Callable[[], Any], repeats: int, warmup: int, device: torch.device
) -> tuple[list[float], Any]:
    """Wall seconds of each of ``repeats`` calls after ``warmup`` untimed ones, the device synchronised
    around every call, and the last call's result. (``torch.utils.benchmark.Timer`` reports means over
    blocks of calls and adds its own warm-up calls to every measurement; the rows here are percentiles over
    a fixed number of single calls.)"""
    times, result = [], None
    for i in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        result = call()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, result


def percentile_ms(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1e3, q))


class TimedPolicy:
    """Forwards to a policy, times ``predict_action`` and counts calls and sampled rows.

    ``mode``: ``"batched"`` passes the batch through; ``"pad"`` samples for ``pad_to`` rows (the running
    episodes plus copies of the first, standing in for finished ones) and returns the running rows;
    ``"per_row"`` calls the policy once per row.
    """

    def __init__(self, policy: Any, device: torch.device, mode: str = "batched", pad_to: int = 0):
        self.policy, self.device, self.mode, self.pad_to = policy, device, mode, pad_to
        self.calls = self.rows = 0
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    def reset(self) -> None:
        self.policy.reset()

    def _call(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        self.rows += next(iter(obs.values())).shape[0]
        return self.policy.predict_action(obs)

    def predict_action(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sync(self.device)
        t0 = time.perf_counter()
        n = next(iter(obs.values())).shape[0]
        if self.mode == "pad" and n < self.pad_to:
            fill = self.pad_to - n
            padded = {k: torch.cat([v, v[:1].expand(fill, *v.shape[1:])]) for k, v in obs.items()}
            out = {k: v[:n] for k, v in self._call(padded).items()}
        elif self.mode == "per_row":
            parts = [self._call({k: v[i : i + 1] for k, v in obs.items()}) for i in range(n)]
            out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        else:
            out = self._call(obs)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


class Recorder:
    """Collects result rows, prints each to stdout as it is made and optionally to a file."""

    def __init__(self, hardware: str, out_path: str | None):
        self.hardware = hardware
        self.rows: list[dict[str, Any]] = []
        self._out = open(out_path, "w") if out_path else None  # noqa: SIM115 (closed in close())

    def emit(self, name: str, value: float | None, unit: str, config: dict[str, Any]) -> None:
        row = {"name": name, "value": value, "unit": unit, "config": config, "hardware": self.hardware}
        line = json.dumps(row, sort_keys=False, default=str)
        print(line, flush=True)
        if self._out:
            self._out.write(line + "\n")
            self._out.flush()
        self.rows.append(row)

    def close(self) -> None:
        if self._out:
            self._out.close()
