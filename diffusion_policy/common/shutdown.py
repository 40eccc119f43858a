"""Stop a run cleanly on SIGINT (Ctrl-C) or SIGTERM.

The first signal only records itself. The training loop, the validation loop and the rollouts call
:func:`raise_if_requested` between steps, so the step in progress finishes and the run unwinds through its
``finally`` blocks (env workers closed, loggers flushed) by ``errors.RunInterrupted``.
Nothing of the unfinished epoch is saved: ``latest.ckpt`` keeps the last completed checkpoint, which is
exactly what an uninterrupted run had at that point, so a resumed run ends with the same weights.
A second signal stops at once (the atomic checkpoint writes keep ``latest.ckpt`` intact even then).

Signals are process-wide, so the state is module-level; only the main thread can install handlers, and
elsewhere :func:`stop_signals_handled` leaves the handlers as they are.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from diffusion_policy.common.errors import RunInterrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: int | None = None


def _on_signal(signum: int, frame) -> None:
    global _requested
    if _requested is not None:
        raise RunInterrupted(signum, forced=True)
    _requested = signum


def requested() -> int | None:
    """The stop signal received since the handlers were installed, or None."""
    return _requested


def raise_if_requested(sync=None) -> None:
    """Raise :class:`RunInterrupted` if a stop signal arrived.

    ``sync``: a callable that turns this process's flag into the flag of all processes (data-parallel
    ranks must stop at the same step, or the others wait forever in the next all-reduce).
    """
    flag = _requested is not None
    if sync is not None:
        flag = sync(flag)
    if flag:
        raise RunInterrupted(_requested if _requested is not None else signal.SIGTERM)


@contextlib.contextmanager
def stop_signals_handled() -> Iterator[None]:
    """Within this block SIGINT / SIGTERM request a stop instead of killing the process."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _requested = None
    for s in STOP_SIGNALS:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _requested = None


def ignore_interrupts_in_worker(*_args) -> None:
    """For worker processes (data loader ``worker_init_fn``, env workers): leave Ctrl-C to the parent.

    A terminal sends SIGINT to the whole process group; a worker that died of it would turn a clean stop
    into a worker failure. SIGTERM gets its default back (a forked worker inherits the parent's handler),
    so the parent can always terminate its workers.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
