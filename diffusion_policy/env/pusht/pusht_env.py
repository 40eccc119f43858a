"""PushT: push a T-shaped block onto a fixed goal pose with a circular, PD-controlled agent.

A re-implementation of the simulator the PushT demonstrations were recorded in, on the gymnasium
API. Physics, reset distribution, reward and rendering reproduce the original exactly, including
the quirks the recorded data depends on (all kept on purpose, do not "fix" them):

- ``space.damping = 0``: all dynamic velocity is removed every substep, so the block only moves
  while it is pushed (quasi-static pushing).
- the T's moment of inertia adds the bar's moment twice (3000 instead of bar + stem);
- the T's centre of gravity is the unweighted mean of the two boxes' centroids, (0, 45);
- contacts are frictionless (the original set ``friction`` on the Body, where it does nothing);
- the reset angle is Gaussian (``randn * 2pi - pi``), drawn with ``np.random.RandomState(seed)``;
- with ``legacy=True`` (what the dataset and the runners use) the block position is set before its
  angle, so the rotation about the COG moves the body origin;
- one physics substep is run right after the state is set.

Units: pixels in a 512x512 window, y pointing down; angles in radians.
"""

from __future__ import annotations

import math
import os
from typing import Any

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import cv2  # noqa: E402
import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import pygame  # noqa: E402
import pymunk  # noqa: E402
import shapely.geometry as sg  # noqa: E402
from gymnasium import spaces  # noqa: E402

from diffusion_policy.env.pusht.pymunk_override import DrawOptions  # noqa: E402

WINDOW_SIZE = 512
SIM_HZ = 100
CONTROL_HZ = 10
K_P = 100.0
K_V = 20.0
GOAL_POSE = (256.0, 256.0, math.pi / 4)
SUCCESS_THRESHOLD = 0.95
# Targets are absolute pixels and, as in the original, are not clipped; any finite target within
# one window beyond each edge is accepted (the kinematic agent simply moves there). Recorded demo
# actions lie in [0, 512]. Anything further out is almost surely a unit/normalisation bug.
ACTION_LOW = -float(WINDOW_SIZE)
ACTION_HIGH = 2.0 * WINDOW_SIZE

TEE_SCALE = 30
TEE_LENGTH = 4
AGENT_RADIUS = 15
WALL_RADIUS = 2
WALLS = (((5, 506), (5, 5)), ((5, 5), (506, 5)), ((506, 5), (506, 506)), ((5, 506), (506, 506)))
COLORS = {
    "agent": pygame.Color("RoyalBlue"),
    "block": pygame.Color("LightSlateGray"),
    "goal": pygame.Color("LightGreen"),
    "wall": pygame.Color("LightGray"),
}
RENDER_MODES = ("rgb_array",)


def tee_vertices(scale: float = TEE_SCALE, length: float = TEE_LENGTH) -> tuple[list, list]:
    """Body-local vertices of the T: the bar (120x30) and the stem (30x90) for the default scale."""
    half = length * scale / 2
    bar = [(-half, scale), (half, scale), (half, 0), (-half, 0)]
    stem = [
        (-scale / 2, scale),
        (-scale / 2, length * scale),
        (scale / 2, length * scale),
        (scale / 2, scale),
    ]
    return bar, stem


def pose_body(pose: tuple[float, float, float]) -> pymunk.Body:
    """A free body whose transform places local coordinates at ``pose`` (used for the goal)."""
    body = pymunk.Body(1, pymunk.moment_for_box(1, (50, 100)))
    body.position = (float(pose[0]), float(pose[1]))
    body.angle = float(pose[2])
    return body


def body_to_shapely(body: pymunk.Body, shapes) -> sg.MultiPolygon:
    """The union of ``shapes`` (convex polys) placed with ``body``'s transform, as shapely geometry."""
    polys = []
    for shape in shapes:
        verts = [body.local_to_world(v) for v in shape.get_vertices()]
        polys.append(sg.Polygon([*verts, verts[0]]))
    return sg.MultiPolygon(polys)


class PushTEnv(gym.Env):
    """State-observation PushT.

    Observation: float64 (5,) ``[agent_x, agent_y, block_x, block_y, block_angle mod 2pi]``.
    Action: float (2,) absolute target position of the agent in pixels (see ``ACTION_LOW/HIGH``).
    Reward: ``clip(coverage / 0.95, 0, 1)`` where coverage is the fraction of the goal T covered by
    the block; the episode terminates when coverage > 0.95 (``info["is_success"]``).

    ``reset(seed=s)`` places agent and block deterministically from ``s`` (episode ``i`` of the
    demonstrations was recorded with seed ``i`` and ``legacy=True``). ``reset()`` without a seed draws a
    fresh layout seed from the env's generator, so repeated unseeded resets differ but are reproducible
    after a seeded one. ``options={"reset_to_state": state5}`` overrides the layout for one reset.
    """

    metadata = {"render_modes": list(RENDER_MODES), "render_fps": CONTROL_HZ}
    reward_range = (0.0, 1.0)

    def __init__(
        self,
        legacy: bool = False,
        block_cog: tuple[float, float] | None = None,
        damping: float | None = None,
        render_action: bool = True,
        render_size: int = 96,
        reset_to_state: np.ndarray | None = None,
        render_mode: str | None = "rgb_array",
    ):
        if render_mode not in (*RENDER_MODES, None):
            raise ValueError(f"unknown render_mode {render_mode!r}; PushT supports {RENDER_MODES} (or None)")
        if not isinstance(render_size, int | np.integer) or render_size <= 0:
            raise ValueError(f"render_size must be a positive int, got {render_size!r}")
        if reset_to_state is not None:
            reset_to_state = self._check_state(reset_to_state, "reset_to_state")
        self.legacy = bool(legacy)
        self.block_cog = block_cog
        self.damping = damping
        self.render_action = render_action
        self.render_size = int(render_size)
        self.reset_to_state = reset_to_state
        self.render_mode = render_mode
        self.window_size = WINDOW_SIZE
        self.sim_hz = SIM_HZ
        self.control_hz = CONTROL_HZ
        self.k_p, self.k_v = K_P, K_V
        self.success_threshold = SUCCESS_THRESHOLD
        self.goal_pose = np.array(GOAL_POSE)

        ws = float(WINDOW_SIZE)
        self.observation_space = spaces.Box(
            low=np.zeros(5), high=np.array([ws, ws, ws, ws, 2 * np.pi]), shape=(5,), dtype=np.float64
        )
        self.action_space = spaces.Box(low=0.0, high=ws, shape=(2,), dtype=np.float64)

        self.space: pymunk.Space | None = None
        self.latest_action: np.ndarray | None = None
        self._layout_seed: int | None = None
        self._goal_geom: sg.MultiPolygon | None = None
        self._goal_points: list[list[tuple[int, int]]] | None = None
        self._canvas: pygame.Surface | None = None

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        state = options.pop("reset_to_state", None)
        if options:
            raise ValueError(f"unknown reset option(s) {sorted(options)}; PushT accepts 'reset_to_state'")
        if seed is None:
            seed = int(self.np_random.integers(0, 2**31 - 1))
        self._layout_seed = int(seed)

        self._setup()
        if self.block_cog is not None:
            self.block.center_of_gravity = tuple(self.block_cog)
        if self.damping is not None:
            self.space.damping = self.damping
        if state is None:
            state = self.reset_to_state
        if state is None:
            state = self.sample_state(self._layout_seed)
        else:
            state = self._check_state(state, "reset_to_state")
        self._set_state(state)
        self.latest_action = None
        coverage = self._coverage()
        return self._get_obs(), self._get_info(coverage)

    def step(self, action):
        if self.space is None:
            raise RuntimeError("PushT: call reset() before step()")
        ax, ay = self._check_action(action)
        self.latest_action = np.array([ax, ay])
        self.n_contact_points = 0
        dt = 1.0 / self.sim_hz
        agent, space = self.agent, self.space
        k_p, k_v = self.k_p, self.k_v
        for _ in range(self.sim_hz // self.control_hz):
            # PD control on the kinematic agent; same float64 operation order as the recording
            px, py = agent.position
            vx, vy = agent.velocity
            acc_x = k_p * (ax - px) + k_v * (0.0 - vx)
            acc_y = k_p * (ay - py) + k_v * (0.0 - vy)
            agent.velocity = (vx + acc_x * dt, vy + acc_y * dt)
            space.step(dt)
        coverage = self._coverage()
        reward = float(np.clip(coverage / self.success_threshold, 0.0, 1.0))
        terminated = bool(coverage > self.success_threshold)
        return self._get_obs(), reward, terminated, False, self._get_info(coverage)

    def render(self):
        if self.render_mode is None:
            raise RuntimeError("PushT: render() needs render_mode='rgb_array' (the env was built with None)")
        if self.space is None:
            raise RuntimeError("PushT: call reset() before render()")
        return self._render_frame(draw_action=self.render_action)

    def close(self):
        self.space = None
        self._canvas = None

    @property
    def canvas(self) -> pygame.Surface | None:
        """The full-size (512x512) drawing of the last ``render()``, e.g. to show in a window."""
        return self._canvas

    # ------------------------------------------------------------------ state
    @staticmethod
    def sample_state(seed: int) -> np.ndarray:
        """Initial ``[agent_x, agent_y, block_x, block_y, block_angle]`` for ``seed`` (legacy generator)."""
        rs = np.random.RandomState(seed=seed)
        return np.array(
            [
                rs.randint(50, 450),
                rs.randint(50, 450),
                rs.randint(100, 400),
                rs.randint(100, 400),
                rs.randn() * 2 * np.pi - np.pi,
            ]
        )

    @staticmethod
    def _check_state(state, name: str) -> np.ndarray:
        arr = np.asarray(state, dtype=np.float64)
        if arr.shape != (5,) or not np.all(np.isfinite(arr)):
            raise ValueError(
                f"{name} must be 5 finite numbers [agent_x, agent_y, block_x, block_y, angle], got {state!r}"
            )
        return arr

    @staticmethod
    def _check_action(action) -> tuple[float, float]:
        if action is None:
            raise ValueError("PushT action is None; pass the agent's target position as 2 numbers (pixels)")
        arr = np.asarray(action)
        if arr.shape != (2,):
            raise ValueError(
                f"PushT action must have shape (2,) (target x, y in pixels), got shape {arr.shape}"
            )
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"PushT action must be numeric, got dtype {arr.dtype}")
        ax, ay = float(arr[0]), float(arr[1])
        if not (math.isfinite(ax) and math.isfinite(ay)):
            raise ValueError(f"PushT action must be finite, got {arr.tolist()}")
        if not (ACTION_LOW <= ax <= ACTION_HIGH and ACTION_LOW <= ay <= ACTION_HIGH):
            raise ValueError(
                f"PushT action {arr.tolist()} is out of range [{ACTION_LOW:g}, {ACTION_HIGH:g}]; actions are "
                "absolute pixel targets in the 512x512 window (did you forget to unnormalize?)"
            )
        return ax, ay

    def _set_state(self, state: np.ndarray) -> None:
        state = [float(v) for v in state]
        self.agent.position = (state[0], state[1])
        # pymunk rotates about the COG, so the order matters (see module docstring)
        if self.legacy:
            self.block.position = (state[2], state[3])
            self.block.angle = state[4]
        else:
            self.block.angle = state[4]
            self.block.position = (state[2], state[3])
        self.space.step(1.0 / self.sim_hz)

    def _get_obs(self) -> np.ndarray:
        ax, ay = self.agent.position
        bx, by = self.block.position
        return np.array([ax, ay, bx, by, self.block.angle % (2 * np.pi)])

    def _get_info(self, coverage: float) -> dict[str, Any]:
        n_substeps = self.sim_hz // self.control_hz
        return {
            "pos_agent": np.array(self.agent.position),
            "vel_agent": np.array(self.agent.velocity),
            "block_pose": np.array([*self.block.position, self.block.angle]),
            "goal_pose": self.goal_pose.copy(),
            "n_contacts": int(math.ceil(self.n_contact_points / n_substeps)),
            "coverage": float(coverage),
            "is_success": bool(coverage > self.success_threshold),
        }

    # ------------------------------------------------------------------ physics setup
    def _setup(self) -> None:
        # creation order matches the original: it fixes body/shape order inside Chipmunk
        self.space = pymunk.Space()
        self.space.gravity = (0, 0)
        self.space.damping = 0
        walls = []
        for a, b in WALLS:
            wall = pymunk.Segment(self.space.static_body, a, b, WALL_RADIUS)
            wall.color = COLORS["wall"]
            walls.append(wall)
        self.space.add(*walls)
        self.agent = self._add_agent((256, 400), AGENT_RADIUS)
        self.block = self._add_tee((256, 300), 0)
        self.space.on_collision(0, 0, post_solve=self._count_contacts)
        self.n_contact_points = 0

    def _count_contacts(self, arbiter: pymunk.Arbiter, space: pymunk.Space, data: Any) -> None:
        self.n_contact_points += len(arbiter.contact_point_set.points)

    def _add_agent(self, position, radius) -> pymunk.Body:
        body = pymunk.Body(body_type=pymunk.Body.KINEMATIC)
        body.position = position
        shape = pymunk.Circle(body, radius)
        shape.color = COLORS["agent"]
        self.space.add(body, shape)
        return body

    def _add_tee(self, position, angle, mask: int | None = None) -> pymunk.Body:
        if mask is None:
            mask = pymunk.ShapeFilter.ALL_MASKS()
        mass = 1
        bar, stem = tee_vertices()
        # the original used the bar's vertices for the stem's moment too; the data depends on it
        moment = pymunk.moment_for_poly(mass, vertices=bar) + pymunk.moment_for_poly(mass, vertices=bar)
        body = pymunk.Body(mass, moment)
        shapes = [pymunk.Poly(body, bar), pymunk.Poly(body, stem)]
        for shape in shapes:
            shape.color = COLORS["block"]
            shape.filter = pymunk.ShapeFilter(mask=mask)
        body.center_of_gravity = (shapes[0].center_of_gravity + shapes[1].center_of_gravity) / 2
        body.position = position
        body.angle = angle
        self.space.add(body, *shapes)
        return body

    # ------------------------------------------------------------------ reward
    def _goal_geometry(self) -> sg.MultiPolygon:
        if self._goal_geom is None:
            self._goal_geom = body_to_shapely(pose_body(GOAL_POSE), self.block.shapes)
        return self._goal_geom

    def _coverage(self) -> float:
        goal = self._goal_geometry()
        block = body_to_shapely(self.block, self.block.shapes)
        return goal.intersection(block).area / goal.area

    # ------------------------------------------------------------------ rendering
    def _render_frame(self, draw_action: bool) -> np.ndarray:
        """uint8 (render_size, render_size, 3) RGB: 512x512 pygame drawing resized bilinearly."""
        if self._canvas is None:
            self._canvas = pygame.Surface((WINDOW_SIZE, WINDOW_SIZE))
        canvas = self._canvas
        canvas.fill((255, 255, 255))
        if self._goal_points is None:
            goal = pose_body(GOAL_POSE)
            self._goal_points = []
            for shape in self.block.shapes:
                pts = [goal.local_to_world(v) for v in shape.get_vertices()]
                pts = [(round(p[0]), round(p[1])) for p in pts]
                self._goal_points.append([*pts, pts[0]])
        for pts in self._goal_points:
            pygame.draw.polygon(canvas, COLORS["goal"], pts)
        self.space.debug_draw(DrawOptions(canvas))
        # resize the raw 32-bit pixels, then pick RGB on the small image: bilinear resizing is
        # per channel, so this equals resizing an RGB copy and skips a 1 MB conversion per frame
        raw = np.frombuffer(canvas.get_buffer(), dtype=np.uint8).reshape(WINDOW_SIZE, WINDOW_SIZE, 4)
        small = cv2.resize(raw, (self.render_size, self.render_size))
        del raw  # releases the surface lock held by the buffer
        img = np.ascontiguousarray(small[..., self._rgb_channels(canvas)])
        if draw_action and self.latest_action is not None:
            self._draw_action_marker(img)
        return img

    @staticmethod
    def _rgb_channels(canvas: pygame.Surface) -> list[int]:
        """Byte positions of R, G, B inside one 32-bit pixel of ``canvas``."""
        shifts = canvas.get_shifts()[:3]
        if canvas.get_bytesize() != 4 or any(sh % 8 for sh in shifts):
            raise RuntimeError(
                f"unexpected pygame surface format {canvas.get_bitsize()} bit, shifts {shifts}"
            )
        if np.little_endian:
            return [sh // 8 for sh in shifts]
        return [3 - sh // 8 for sh in shifts]

    def _draw_action_marker(self, img: np.ndarray) -> None:
        # the original scaled by a hard-coded 96; scaling by the image size keeps the marker on the
        # target at any render_size (identical at 96)
        size = img.shape[0]
        coord = (self.latest_action / WINDOW_SIZE * size).astype(np.int32)
        cv2.drawMarker(
            img,
            (int(coord[0]), int(coord[1])),
            color=(255, 0, 0),
            markerType=cv2.MARKER_CROSS,
            markerSize=int(8 / 96 * size),
            thickness=max(1, int(1 / 96 * size)),
        )
