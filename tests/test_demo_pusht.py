"""demo_pusht.py: headless collection with scripted mouse and key events (SDL dummy driver), the recorded
file's layout, training on it, and appends that survive interruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pygame
import pytest
import zarr

from diffusion_policy.common.episode_append import append_episode, open_for_append
from diffusion_policy.common.errors import RunInterrupted
from diffusion_policy.common.replay_buffer import ReplayBuffer
from diffusion_policy.env.pusht.demo_collector import DemoCollector, PygameInput
from diffusion_policy.env.pusht.pusht_env import PushTEnv
from diffusion_policy.env.pusht.pusht_keypoints_env import PushTKeypointsEnv
from tests.helpers import ENV, assert_ok, run_cli

REPO_ROOT = Path(__file__).resolve().parents[1]


def motion(pos) -> pygame.event.Event:
    return pygame.event.Event(pygame.MOUSEMOTION, pos=tuple(pos), rel=(0, 0), buttons=(0, 0, 0))


def key(k: int, up: bool = False) -> pygame.event.Event:
    return pygame.event.Event(pygame.KEYUP if up else pygame.KEYDOWN, key=k, mod=0)


class ScriptedInput(PygameInput):
    """Posts one scripted tick of events into pygame's queue per poll, then reads the queue as the real
    input does; after the script, closes the window."""

    def __init__(self, ticks: list[list[pygame.event.Event]]):
        super().__init__()
        self.ticks = list(ticks)

    def poll(self):
        events = self.ticks.pop(0) if self.ticks else [pygame.event.Event(pygame.QUIT)]
        for event in events:
            pygame.event.post(event)
        return super().poll()


class NoWaitClock:
    def __init__(self):
        self.ticks = 0

    def tick(self, hz: int) -> None:
        self.ticks += 1


def agent_start(seed: int) -> np.ndarray:
    return PushTEnv.sample_state(seed)[:2]


def push_path(start: np.ndarray, n: int) -> list[np.ndarray]:
    """Mouse positions from the agent's start, 6 px to the right per tick."""
    return [start + np.array([6.0 * i, 0.0]) for i in range(n)]


def scripted_session() -> tuple[list[list[pygame.event.Event]], list[np.ndarray]]:
    """Seed 0: 15 recorded steps, Enter. Seed 1: a false start kept away from the agent, 5 steps and R
    (retry, nothing saved), then 6 steps, Space held for 3 ticks, 6 more steps, Enter. Then Q."""
    ticks: list[list[pygame.event.Event]] = []
    path0 = push_path(agent_start(0), 15)
    ticks += [[motion(p)] for p in path0] + [[key(pygame.K_RETURN)]]
    start1 = agent_start(1)
    ticks += [[motion(start1 + 200 if start1[0] < 256 else start1 - 200)]] * 2  # far away: not recording
    ticks += [[motion(p)] for p in push_path(start1, 5)] + [[key(pygame.K_r)]]
    path1 = push_path(start1, 12)
    ticks += [[motion(p)] for p in path1[:6]]
    ticks += [[key(pygame.K_SPACE)], [motion(path1[6])], [], [key(pygame.K_SPACE, up=True)]]  # paused
    ticks += [[motion(p)] for p in path1[6:]] + [[key(pygame.K_RETURN)], [key(pygame.K_q)]]
    # the tick that releases Space records a step at the mouse position it left: path1[6]
    expected_actions = [*path0, *path1[:6], path1[6], *path1[6:]]
    return ticks, expected_actions


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demos.zarr"
    ticks, _ = scripted_session()
    lines: list[str] = []
    collector = DemoCollector(out, clock=NoWaitClock(), input_source=None, log=lines.append)
    collector.input = ScriptedInput(ticks)
    try:
        assert collector.run() == 2
    finally:
        collector.close()
    assert any("retry" in ln for ln in lines) and lines[-1].startswith("quit; 2 episodes")
    return out


def test_headless_collection_has_the_original_keys_and_shapes(collected):
    _, expected_actions = scripted_session()
    root = zarr.open_group(str(collected), mode="r")
    assert root.metadata.zarr_format == 2
    n = len(expected_actions)
    assert n == 28
    np.testing.assert_array_equal(root["meta/episode_ends"][:], [15, 28])
    shapes = {k: (tuple(a.shape), a.dtype) for k, a in root["data"].arrays()}
    assert shapes == {
        "img": ((n, 96, 96, 3), np.uint8),
        "state": ((n, 5), np.float32),
        "keypoint": ((n, 9, 2), np.float32),
        "action": ((n, 2), np.float32),
        "n_contacts": ((n, 1), np.float32),
    }
    np.testing.assert_array_equal(root["data/action"][:], np.float32(expected_actions))
    state = root["data/state"][:]
    assert np.all((state[:, 4] >= 0) & (state[:, 4] < 2 * np.pi))


def test_recorded_steps_replay_in_the_simulator(collected):
    """Episode i starts from seed i; frame, state and keypoints are those before each step's action."""
    buffer = ReplayBuffer.copy_from_path(collected)
    env = PushTKeypointsEnv(legacy=True, render_action=False)
    for i in range(buffer.n_episodes):
        ep = buffer.get_episode(i)
        obs, info = env.reset(seed=i)
        for t in range(len(ep["action"])):
            if t == 0:
                np.testing.assert_array_equal(ep["img"][0], env.render())
            np.testing.assert_allclose(ep["state"][t, :2], info["pos_agent"], atol=1e-3)
            np.testing.assert_allclose(ep["keypoint"][t], obs[:18].reshape(9, 2), atol=1e-3)
            obs, _, _, _, info = env.step(ep["action"][t].astype(np.float64))


def test_smoke_training_reads_the_collected_file(collected, tmp_path):
    proc = run_cli(
        ["train.py", "debug=smoke", f"task.dataset.zarr_path={collected}", f"hydra.run.dir={tmp_path}"]
    )
    assert_ok(proc)
    assert (tmp_path / "checkpoints" / "latest.ckpt").is_file()


def test_help_lists_the_controls():
    proc = subprocess.run(
        [sys.executable, "demo_pusht.py", "--help"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True
    )
    assert proc.returncode == 0
    for word in ("-o, --output", "Enter", "retry", "Space", "quit", "task.dataset.zarr_path"):
        assert word in proc.stdout


# ---------------------------------------------------------------- interrupted appends
def episode(n: int, offset: float = 0.0) -> dict[str, np.ndarray]:
    return {
        "img": np.full((n, 96, 96, 3), int(offset) % 256, dtype=np.uint8),
        "state": np.full((n, 5), offset, dtype=np.float32),
        "action": np.arange(n * 2, dtype=np.float32).reshape(n, 2) + offset,
    }


def test_append_interrupted_before_its_commit_leaves_the_saved_episodes(tmp_path, monkeypatch):
    path = tmp_path / "d.zarr"
    buffer, _ = open_for_append(path)
    append_episode(buffer, episode(7, 1.0))

    def killed(self, ends):  # the process dies after the data arrays grew, before episode_ends did
        raise SystemExit("killed")

    monkeypatch.setattr(ReplayBuffer, "_set_episode_ends", killed)
    with pytest.raises(SystemExit):
        append_episode(buffer, episode(5, 2.0))
    monkeypatch.undo()
    assert zarr.open_group(str(path), mode="r")["data/action"].shape[0] == 12  # the partial tail is on disk
    buffer, dropped = open_for_append(path)
    assert dropped == 5 and buffer.n_episodes == 1
    np.testing.assert_array_equal(buffer.get_episode(0)["action"], episode(7, 1.0)["action"])
    append_episode(buffer, episode(4, 3.0))
    again = ReplayBuffer.copy_from_path(path)
    np.testing.assert_array_equal(again.episode_ends, [7, 11])
    np.testing.assert_array_equal(again.get_episode(1)["state"], episode(4, 3.0)["state"])


def test_append_interrupted_inside_its_commit_leaves_the_saved_episodes(tmp_path):
    path = tmp_path / "d.zarr"
    buffer, _ = open_for_append(path)
    append_episode(buffer, episode(7))
    append_episode(buffer, episode(3))
    # what a kill between episode_ends' two files leaves: data grown, the index one longer, its value unset
    root = zarr.open_group(str(path), mode="r+")
    for arr in root["data"].arrays():
        arr[1].resize((14, *arr[1].shape[1:]))
    root["meta/episode_ends"].resize((3,))
    buffer, dropped = open_for_append(path)
    assert dropped == 4 and buffer.n_episodes == 2 and buffer.n_steps == 10
    append_episode(buffer, episode(2))
    np.testing.assert_array_equal(ReplayBuffer.copy_from_path(path).episode_ends, [7, 10, 12])


def test_ctrl_c_during_an_append_waits_for_it(tmp_path, monkeypatch):
    path = tmp_path / "d.zarr"
    buffer, _ = open_for_append(path)
    real = ReplayBuffer.add_episode

    def add_with_ctrl_c(self, data, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # handled synchronously: the handler runs before the next line
        return real(self, data, **kwargs)

    monkeypatch.setattr(ReplayBuffer, "add_episode", add_with_ctrl_c)
    with pytest.raises(RunInterrupted):
        append_episode(buffer, episode(6))
    monkeypatch.undo()
    np.testing.assert_array_equal(ReplayBuffer.copy_from_path(path).episode_ends, [6])


def test_output_that_is_not_a_replay_buffer_is_refused(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("mine\n")
    proc = subprocess.run(
        [sys.executable, "demo_pusht.py", "-o", str(other)],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "not a zarr directory" in proc.stderr
    assert other.read_text() == "mine\n"
