"""Collect PushT demonstrations with the mouse in a pygame window (``demo_pusht.py``).

The original's workflow and recording: episode ``i`` starts from ``reset(seed=i)`` (legacy layout, as the
published demonstrations), recording starts once the mouse comes within 30 px of the agent, and from then
on the agent follows the mouse at ``control_hz``. Each recorded step holds the frame and state *before* the
step and the action applied in it:

- ``img`` uint8 (96, 96, 3): the observation render (no action marker);
- ``state`` float32 (5,): agent x, y, block x, y, block angle in [0, 2pi) (the published file's range);
- ``keypoint`` float32 (9, 2): the block keypoints;
- ``action`` float32 (2,): the mouse position, the agent's target;
- ``n_contacts`` float32 (1,): contacts during the step that led to this state.

An episode ends when the block covers the goal (> 95 %) or on Enter, and is then appended to the output
zarr (``common.episode_append``: an interrupted append never corrupts the file). Keys: Space (hold) pauses,
R restarts the episode (same seed, nothing saved), Q or closing the window quits (the current unsaved
episode is dropped).

The event source and the clock are arguments, so the loop runs headless (SDL's dummy video driver) with
scripted events and no waiting.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import numpy as np  # noqa: E402
import pygame  # noqa: E402

from diffusion_policy.common.episode_append import append_episode, open_for_append  # noqa: E402
from diffusion_policy.env.pusht.pusht_env import WINDOW_SIZE  # noqa: E402
from diffusion_policy.env.pusht.pusht_keypoints_env import PushTKeypointsEnv  # noqa: E402

START_RADIUS = 30  # px: the mouse must come this close to the agent to start recording (the original's)
N_BLOCK_KEYPOINTS = 9
KEYS = ("img", "state", "keypoint", "action", "n_contacts")


class PygameInput:
    """Keyboard and mouse from pygame's event queue; the mouse position follows MOUSEMOTION events."""

    def __init__(self) -> None:
        self.mouse = pygame.mouse.get_pos()

    def poll(self) -> tuple[list[pygame.event.Event], tuple[float, float]]:
        events = pygame.event.get()
        for event in events:
            if event.type == pygame.MOUSEMOTION:
                self.mouse = event.pos
        return events, self.mouse


class DemoCollector:
    """Runs the collection loop; ``run()`` returns the number of episodes saved in this session."""

    def __init__(
        self,
        output: str | Path,
        render_size: int = 96,
        control_hz: int = 10,
        clock=None,
        input_source: PygameInput | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.output = Path(output)
        self.render_size = render_size
        self.control_hz = control_hz
        self.log = log
        self.buffer, dropped = open_for_append(self.output)
        if dropped:
            log(f"{self.output}: dropped {dropped} steps of an episode whose saving was interrupted")
        pygame.init()
        self.screen = pygame.display.set_mode((WINDOW_SIZE, WINDOW_SIZE))
        self.clock = clock if clock is not None else pygame.time.Clock()
        self.input = input_source if input_source is not None else PygameInput()
        self.env = PushTKeypointsEnv(
            legacy=True,
            render_size=render_size,
            render_action=False,
            **PushTKeypointsEnv.generate_keypoint_manager_params(),
        )

    def run(self) -> int:
        saved = 0
        while True:
            outcome = self.collect_episode()
            if outcome == "quit":
                return saved
            saved += outcome == "saved"

    def collect_episode(self) -> str:
        """One episode of seed ``n_episodes``: 'saved', 'retry' or 'quit'."""
        seed = self.buffer.n_episodes
        obs, info = self.env.reset(seed=seed)
        img = self.env.render()
        steps: list[dict[str, np.ndarray]] = []
        paused = engaged = False
        self.log(f"seed {seed}: move the mouse onto the blue agent to start")
        while True:
            self.show(
                seed, "paused" if paused else ("recording" if engaged else "move onto the agent"), len(steps)
            )
            events, mouse = self.input.poll()
            finish = False
            for event in events:
                if event.type == pygame.QUIT or (event.type == pygame.KEYDOWN and event.key == pygame.K_q):
                    self.log(f"quit; {self.buffer.n_episodes} episodes in {self.output}")
                    return "quit"
                if event.type == pygame.KEYDOWN and event.key == pygame.K_r:
                    self.log(f"seed {seed}: retry")
                    return "retry"
                if event.type == pygame.KEYDOWN and event.key == pygame.K_SPACE:
                    paused = True
                elif event.type == pygame.KEYUP and event.key == pygame.K_SPACE:
                    paused = False
                elif event.type == pygame.KEYDOWN and event.key in (pygame.K_RETURN, pygame.K_KP_ENTER):
                    finish = True
            if finish and steps:
                return self.save(seed, steps)
            if paused:
                self.clock.tick(self.control_hz)
                continue
            agent = self.env.agent.position
            if not engaged and math.dist(mouse, (agent[0], agent[1])) < START_RADIUS:
                engaged = True
            if engaged:
                action = np.asarray(mouse, dtype=np.float64)
                steps.append(self.record(obs, info, img, action))
                obs, _, done, _, info = self.env.step(action)
            else:
                done = False
            img = self.env.render()
            self.clock.tick(self.control_hz)
            if done:
                return self.save(seed, steps)

    @staticmethod
    def record(obs: np.ndarray, info: dict, img: np.ndarray, action: np.ndarray) -> dict[str, np.ndarray]:
        block = info["block_pose"]
        state = [*info["pos_agent"], block[0], block[1], block[2] % (2 * np.pi)]
        keypoint = obs.reshape(2, -1)[0].reshape(-1, 2)[:N_BLOCK_KEYPOINTS]
        return {
            "img": img,
            "state": np.float32(state),
            "keypoint": np.float32(keypoint),
            "action": np.float32(action),
            "n_contacts": np.float32([info["n_contacts"]]),
        }

    def save(self, seed: int, steps: list[dict[str, np.ndarray]]) -> str:
        episode = {k: np.stack([s[k] for s in steps]) for k in KEYS}
        append_episode(self.buffer, episode)
        self.log(
            f"seed {seed}: saved {len(steps)} steps ({self.buffer.n_episodes} episodes in {self.output})"
        )
        return "saved"

    def show(self, seed: int, status: str, n_steps: int) -> None:
        self.screen.blit(self.env.canvas, (0, 0))
        pygame.display.set_caption(
            f"PushT demo | seed {seed} | {status} | {n_steps} steps | Enter: save, R: retry"
        )
        pygame.display.flip()

    def close(self) -> None:
        self.env.close()
        pygame.display.quit()
