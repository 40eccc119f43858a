"""Checkpoint files, top-k bookkeeping, the JSON log, LR schedule, devices and resolver safety (CPU, fast)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_policy.common.checkpoint_io import (
    load_checkpoint_file,
    remove_stale_temp_files,
    save_checkpoint_file,
)
from diffusion_policy.common.checkpoint_util import TopKCheckpointManager
from diffusion_policy.common.config_resolvers import register_resolvers, safe_eval
from diffusion_policy.common.device_util import resolve_device
from diffusion_policy.common.errors import CheckpointError, DeviceError
from diffusion_policy.common.json_logger import JsonLogger, read_json_log
from diffusion_policy.model.common.lr_scheduler import get_scheduler

REPO_ROOT = Path(__file__).resolve().parents[1]


def _payload(value: float = 1.0) -> dict:
    return {
        "cfg_yaml": "a: 1\n",
        "state_dicts": {"model": {"w": torch.full((3,), value)}},
        "state": {"epoch": 2, "global_step": 7, "rng": {"torch": torch.get_rng_state()}},
    }


# ----------------------------------------------------------------------------- checkpoint I/O
def test_roundtrip_keeps_tensors_and_values(tmp_path):
    path = save_checkpoint_file(_payload(3.0), tmp_path / "ckpt" / "latest.ckpt")
    loaded = load_checkpoint_file(path)
    assert torch.equal(loaded["state_dicts"]["model"]["w"], torch.full((3,), 3.0))
    assert loaded["state"]["global_step"] == 7
    assert not list(path.parent.glob(".*tmp*")), "temporary file left behind"


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_crafted_pickle_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"format": "diffusion_policy.checkpoint", "version": 1, "x": _Evil()}, path)
    with pytest.raises(CheckpointError, match="evil.ckpt") as info:
        load_checkpoint_file(path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "pwned_marker").exists()

    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match="raw.ckpt"):
        load_checkpoint_file(raw)
    assert not (tmp_path / "pwned_marker").exists()


def test_truncated_and_foreign_files_are_refused(tmp_path):
    good = save_checkpoint_file(_payload(), tmp_path / "good.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.ckpt"):
        load_checkpoint_file(truncated)

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)  # a valid torch file, not ours
    with pytest.raises(CheckpointError, match="not a diffusion_policy checkpoint"):
        load_checkpoint_file(foreign)

    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.ckpt"):
        load_checkpoint_file(text)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_file(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("torch_wraps_it", [False, True])
def test_a_full_disk_gives_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, torch_wraps_it):
    """ENOSPC mid-write (torch's zip writer turns it into a RuntimeError on close) says so in one line."""
    import errno

    import diffusion_policy.common.checkpoint_io as checkpoint_io

    target = tmp_path / "latest.ckpt"
    save_checkpoint_file(_payload(5.0), target)

    def full_disk_save(obj, f):
        f.write(b"PK\x03\x04partial")
        full = OSError(errno.ENOSPC, "No space left on device")
        if not torch_wraps_it:
            raise full
        try:
            raise full
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None

    monkeypatch.setattr(checkpoint_io.torch, "save", full_disk_save)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint_file(_payload(6.0), target)
    message = str(info.value)
    assert "\n" not in message
    assert "no space left" in message and "previous latest.ckpt is untouched" in message, message
    monkeypatch.undo()
    assert load_checkpoint_file(target)["state_dicts"]["model"]["w"][0].item() == 5.0
    assert [p.name for p in tmp_path.iterdir()] == ["latest.ckpt"]  # no temp file left behind


def test_a_different_write_failure_is_not_called_a_full_disk(tmp_path, monkeypatch):
    import diffusion_policy.common.checkpoint_io as checkpoint_io

    def broken_save(obj, f):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(checkpoint_io.torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="some other failure"):
        save_checkpoint_file(_payload(), tmp_path / "x.ckpt")


def test_sigkill_during_save_never_corrupts_the_file(tmp_path):
    """A writer killed at arbitrary moments leaves either the old or the new complete file."""
    target = tmp_path / "latest.ckpt"
    save_checkpoint_file(_payload(0.0), target)
    script = textwrap.dedent(
        f"""
        import sys, torch
        from diffusion_policy.common.checkpoint_io import save_checkpoint_file
        i = int(sys.argv[1])
        while True:  # ~8 MB per save so that kills land mid-write
            save_checkpoint_file({{"cfg_yaml": "", "state": {{}},
                                   "state_dicts": {{"model": {{"w": torch.full((2_000_000,), float(i))}}}}}},
                                 {str(target)!r})
            print(i, flush=True)
            i += 1
        """
    )
    seen_values = set()
    # each writer counts from its own start; the kill follows the n-th completed save (read from its
    # stdout), so it lands in the next write, and the file holds at least that save's value
    for start, n_saves in ((1, 1), (1001, 2)):
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(start)], cwd=REPO_ROOT, stdout=subprocess.PIPE
        )
        for _ in range(n_saves):
            assert proc.stdout.readline(), "the writer died before a save"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = load_checkpoint_file(target)  # must always be complete
        w = loaded["state_dicts"]["model"]["w"]
        assert torch.all(w == w[0])
        assert float(w[0]) >= start + n_saves - 1, "a completed save was lost"
        seen_values.add(float(w[0]))
    remove_stale_temp_files(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["latest.ckpt"]
    assert len(seen_values) == 2, "each writer replaced the file"


# ----------------------------------------------------------------------------- top-k
def test_topk_keeps_best_and_survives_resume(tmp_path):
    fmt = "epoch={epoch:04d}-test_mean_score={test_mean_score:.3f}.ckpt"
    m = TopKCheckpointManager(tmp_path, monitor_key="test_mean_score", mode="max", k=2, format_str=fmt)
    written = []
    for epoch, score in [(0, 0.1), (1, 0.5), (2, 0.3)]:
        path = m.get_ckpt_path({"epoch": epoch, "test_mean_score": score})
        assert path is not None
        Path(path).write_text("x")
        written.append(path)
    assert not Path(written[0]).exists(), "the worst checkpoint must be deleted when displaced"
    # a checkpoint epoch without a rollout is not ranked, and does not crash on the format string
    assert m.get_ckpt_path({"epoch": 3, "train_loss": 0.2}) is None

    resumed = TopKCheckpointManager(tmp_path, monitor_key="test_mean_score", mode="max", k=2, format_str=fmt)
    resumed.load_state_dict(m.state_dict())
    assert resumed.get_ckpt_path({"epoch": 4, "test_mean_score": 0.2}) is None
    path = resumed.get_ckpt_path({"epoch": 5, "test_mean_score": 0.9})
    assert path is not None and not Path(written[2]).exists(), "resumed manager must keep pruning old files"
    assert sorted(resumed.path_value_map.values()) == [0.5, 0.9]


def test_topk_min_mode_and_bad_args(tmp_path):
    m = TopKCheckpointManager(
        tmp_path, monitor_key="val_loss", mode="min", k=1, format_str="{val_loss:.2f}.ckpt"
    )
    assert m.get_ckpt_path({"val_loss": 0.5}) is not None
    assert m.get_ckpt_path({"val_loss": 0.7}) is None
    assert m.get_ckpt_path({"val_loss": 0.1}).endswith("0.10.ckpt")
    with pytest.raises(ValueError, match="mode"):
        TopKCheckpointManager(tmp_path, monitor_key="x", mode="best")


# ----------------------------------------------------------------------------- json log
def test_json_logger_truncates_partial_line_and_redone_steps(tmp_path):
    path = tmp_path / "logs.json.txt"
    with JsonLogger(path) as logger:
        for step in range(4):
            logger.log({"global_step": step, "train_loss": 1.0 / (step + 1), "video": "a.mp4", "flag": True})
    with open(path, "a") as f:
        f.write('{"global_step": 4, "train_lo')  # killed mid-write
    logger = JsonLogger(path)
    logger.start(drop_from_step=3)  # resumed from a checkpoint taken at step 3
    logger.log({"global_step": 3, "train_loss": 0.5})
    logger.stop()
    entries = read_json_log(path)
    assert [e["global_step"] for e in entries] == [0, 1, 2, 3]
    assert all(set(e) == {"global_step", "train_loss"} for e in entries), "only numbers are logged"
    assert isinstance(entries[0]["global_step"], int)


# ----------------------------------------------------------------------------- lr schedule
def test_cosine_warmup_matches_diffusers_and_does_not_rise_again():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = get_scheduler("cosine", opt, num_warmup_steps=10, num_training_steps=100)
    lrs = []
    for _ in range(160):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5)  # half-period cosine, as the original (num_cycles=0.5)
    assert max(lrs[100:]) == 0.0
    with pytest.raises(ValueError, match="lr_scheduler"):
        get_scheduler("cosine_annealing", opt, num_warmup_steps=1, num_training_steps=2)


# ----------------------------------------------------------------------------- devices
def test_device_resolver():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(DeviceError, match="training.device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(DeviceError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


# ----------------------------------------------------------------------------- resolvers
@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("2-1", 1),
        ("2-1+0", 1),
        (" 20*2 if True else None", 40),
        ("20 if False else None", None),
        ("2 if False or True else 20 + 2", 2),
        ("(3 + 1) // 2 ** 1 % 5", 2),
        ("not 1 < 2 <= 2", False),
        ("7 / 2", 3.5),
        ("-3", -3),
    ],
)
def test_safe_eval_accepts_config_arithmetic(expr, expected):
    assert safe_eval(expr) == expected


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('true')",
        "open('x')",
        "[1, 2]",
        "(1).real",
        "lambda: 1",
        "9**9**9",
        "'a'",
        "x",
    ],
)
def test_safe_eval_rejects_everything_else(expr):
    with pytest.raises(ValueError, match="config expression"):
        safe_eval(expr)


def test_resolvers_register_idempotently_and_replace_python_eval():
    OmegaConf.register_new_resolver("eval", eval, replace=True)  # what the original does
    register_resolvers()
    register_resolvers()
    cfg = OmegaConf.create(
        {
            "n": 2,
            "g": True,
            "a": "${eval:'${n}-1'}",
            "b": "${eval: 20*${n} if ${g} else None}",
            "c": "${calc:'${n}+1'}",
            "bad": "${eval:'__import__(\"os\").getcwd()'}",
        }
    )
    assert (cfg.a, cfg.b, cfg.c) == (1, 40, 3)
    with pytest.raises(Exception, match="not allowed"):
        _ = cfg.bad
