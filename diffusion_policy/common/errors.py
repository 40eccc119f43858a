"""Errors the command-line entry points turn into a one-line message and a non-zero exit.

Each is a ``ValueError``/``RuntimeError`` subclass so library callers can catch them the usual way; only
``RunInterrupted`` (a stop signal) is, like ``KeyboardInterrupt``, a ``BaseException``.
"""

from __future__ import annotations


def one_line(error: BaseException | str) -> str:
    """The text of ``error`` on one line: every run of whitespace, newlines included, as one space."""
    return " ".join(str(error).split())


def first_line(error: BaseException | str) -> str:
    """The first line of ``error``'s text, whitespace folded (library messages can run for lines)."""
    return one_line(str(error).split("\n")[0])


class ConfigError(ValueError):
    """A config value (or the dataset it points to) does not fit what the code needs."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: foreign, truncated, unsafe, or built for other code."""


class DeviceError(RuntimeError):
    """The requested torch device does not exist on this machine."""


class WorkerDiedError(RuntimeError):
    """A data-loader or env worker process died (killed, out of memory, crashed) while the run needed it."""


class RunInterrupted(BaseException):
    """SIGINT / SIGTERM stopped the run between two steps (see ``diffusion_policy.common.shutdown``).

    A ``BaseException``, like ``KeyboardInterrupt``, so that code catching ``Exception`` lets it through.
    ``detail`` is filled in by the training loop (what was saved, how to resume).
    """

    def __init__(self, signum: int, forced: bool = False, detail: str = ""):
        super().__init__(signum, forced, detail)
        self.signum = int(signum)
        self.forced = forced
        self.detail = detail

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (130, 143)."""
        return 128 + self.signum

    def __str__(self) -> str:
        import signal

        how = "stopped at once (second signal)" if self.forced else "stopped between two steps"
        text = f"{signal.Signals(self.signum).name} received: {how}"
        return f"{text}; {self.detail}" if self.detail else text


class SweepJobFailed(RuntimeError):
    """A sweep job ended with one of the errors above (``message`` is its one line).

    Inside a sweep, ``train.py`` raises this instead of exiting, so Hydra records the job as failed and
    the launcher goes on with the other jobs (an exit would end a basic/joblib sweep, or a Ray worker).
    """

    def __init__(self, message: str, exit_code: int, table: str = ""):
        super().__init__(message, exit_code, table)
        self.message = message
        self.exit_code = exit_code
        self.table = table  # the sweep's multirun_metrics.md, for the final one-line error

    def __str__(self) -> str:
        return self.message
