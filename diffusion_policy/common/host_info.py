"""What the machine offers this process: its usable CPU cores and the CPU's model name. No torch import, so
environment worker processes can use it cheaply."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path


def usable_cpu_count() -> int:
    """The cores this process may run on: its affinity mask (which taskset, cgroups' cpusets and container
    limits narrow), falling back to ``os.cpu_count()`` where the platform has no affinity call."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
