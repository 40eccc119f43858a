"""Helpers the test modules share (fixtures are in conftest.py): the environment and runner for the
command-line scripts, the one-line error check, the state-run arguments and config composition.
Policy-level helpers are in policy_helpers.py.

Test modules import these from here, never from each other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir

from diffusion_policy.common.config_resolvers import register_resolvers

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CONFIG_DIR = REPO_ROOT / "config"
# every script a test starts: one thread (2-core CI), no W&B, no display; errors as one line, not Hydra's
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
    "SDL_VIDEODRIVER": "dummy",
    "SDL_AUDIODRIVER": "dummy",
}
ENV.pop("HYDRA_FULL_ERROR", None)
N_EPOCHS = 4  # lowdim_args: rollouts at epochs 0, 2 and the last (3); epoch 1 checkpoints without a rollout


def run_cli(
    args: list[str], env: dict | None = None, timeout: float = 900, prelude: str = ""
) -> subprocess.CompletedProcess:
    """``python *args`` in the repository root. ``prelude``: Python run first, in the same process (e.g.
    making ``import dill`` fail), then the script ``args[0]`` with the rest as its arguments.
    ``timeout`` only guards against a hang (a loaded machine may be many times slower than a quiet one)."""
    cmd = [sys.executable, *args]
    if prelude:
        script, rest = args[0], args[1:]
        code = (
            f"{prelude}; import runpy, sys; sys.argv = {[script, *rest]!r}; "
            f"runpy.run_path({script!r}, run_name='__main__')"
        )
        cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def start_cli(args: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    """``python *args`` started in the repository root (``popen``: Popen's own arguments)."""
    return subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env or ENV, **popen)


def run_clis_side_by_side(commands: dict[str, list[str]], timeout: float = 600) -> dict:
    """Independent ``python *args`` runs started together (most of each is a process start); name -> result.
    ``timeout`` only guards against a hang."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    procs = {name: start_cli(args, **pipes) for name, args in commands.items()}
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=timeout)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return results


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )


def train_cli(
    run_dir: Path, zarr: str, *overrides: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python train.py *overrides`` on the dataset ``zarr``, writing into ``run_dir``, asserted to succeed;
    the finished process."""
    proc = run_cli(
        ["train.py", *overrides, f"task.dataset.zarr_path={zarr}", f"hydra.run.dir={run_dir}"], env=env
    )
    assert_ok(proc)
    return proc


def trained_run(tmp_path_factory, name: str, args_for: Callable[[Path], list[str]]) -> Path:
    """The folder of a finished ``python *args_for(run_dir)`` run in a fresh temporary folder (module-scoped
    fixtures train once and share the run)."""
    run_dir = tmp_path_factory.mktemp(name) / "run"
    assert_ok(run_cli(args_for(run_dir)))
    return run_dir


def assert_one_line_error(
    proc: subprocess.CompletedProcess, *needles: str, exit_code: int | None = None
) -> str:
    """A failed run whose stderr holds exactly one ``error:`` line, with every needle, and no traceback."""
    if exit_code is None:
        assert proc.returncode != 0, f"exit 0\nstderr:\n{proc.stderr[-3000:]}"
    else:
        assert proc.returncode == exit_code, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"expected one 'error:' line, stderr was:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def load_script(path: Path, name: str):
    """A script (eval.py, convert_checkpoint.py, ...) imported as a module, to call its functions in-process
    (torch is already imported in the test process, which saves a process start each)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


def evaluate_in_process(checkpoint: Path, output_dir: Path, **kwargs) -> dict:
    """eval.py's ``evaluate`` in this process (one torch thread, conftest's ``one_torch_thread``, as an
    eval.py subprocess runs with ENV), so that its float results and rollouts equal the subprocess's."""
    evaluate = load_script(REPO_ROOT / "eval.py", "dp_eval_cli").evaluate
    return evaluate(str(checkpoint), str(output_dir), device="cpu", **kwargs)


def lowdim_args(zarr: str, run_dir: Path | None, *extra: str) -> list[str]:
    """train.py arguments of the tiny state run (``debug=smoke``) for ``N_EPOCHS`` epochs."""
    args = [
        "train.py",
        "debug=smoke",
        f"task.dataset.zarr_path={zarr}",
        f"training.num_epochs={N_EPOCHS}",
        "training.rollout_every=2",
        "training.checkpoint_every=1",
        *extra,
    ]
    return args if run_dir is None else [*args, f"hydra.run.dir={run_dir}"]


def compose_config(name: str, overrides: list[str] = (), config_dir: Path = CONFIG_DIR):
    """A root config composed as train.py would, with the ``eval`` / ``calc`` resolvers registered."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name=name, overrides=list(overrides))
