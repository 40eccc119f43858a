"""Observation history and pending actions of the online ``select_action`` interface, and the checks on one
step's observations: written once for torch tensors (the policies) and numpy arrays (the exported runtime).
Arrays are only indexed, stacked with the ``stack`` function each side passes in, and read for ``.shape``;
no torch or numpy import here."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any


def check_window(key: str, shape: tuple[int, ...], expected: tuple[int, ...], n_steps: int) -> None:
    """A batched observation window (B, >=n_steps, *expected) of ``key``, given its ``shape``."""
    if len(shape) != len(expected) + 2 or shape[1] < n_steps or tuple(shape[2:]) != tuple(expected):
        raise ValueError(
            f"observation '{key}' has shape {tuple(shape)}; expected (B, >={n_steps}, *{list(expected)})"
        )


def check_step_keys(obs: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
    missing = [k for k in shapes if k not in obs]
    if missing:
        raise KeyError(f"select_action: observation '{missing[0]}' is missing (got keys {sorted(obs)})")


def step_is_batched(obs: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether one env step's observations {key: (*shape) or (B, *shape)} carry a batch dimension; one-line
    errors for a wrong shape or a mix of both."""
    flags = set()
    for key, shape in shapes.items():
        got = tuple(obs[key].shape)
        if got == tuple(shape):
            flags.add(False)
        elif len(got) == len(shape) + 1 and got[1:] == tuple(shape):
            flags.add(True)
        else:
            raise ValueError(
                f"select_action: observation '{key}' has shape {got}; "
                f"expected {tuple(shape)} or (B, *{tuple(shape)})"
            )
    if len(flags) != 1:
        raise ValueError(
            "select_action: mix of batched and unbatched observations; give all keys a batch dim or none"
        )
    return flags.pop()


class OnlineQueues:
    """Observation history and pending actions for ``select_action``.

    After ``reset()`` the first observation is repeated to fill all ``n_obs_steps`` slots. Actions of one
    plan (B, n_action_steps, Da) are handed out one step at a time; an empty queue means "replan".
    ``stack(list of arrays, axis)`` is ``torch.stack`` or ``numpy.stack``.
    """

    def __init__(self, n_obs_steps: int, stack: Callable[..., Any]) -> None:
        self.n_obs_steps = n_obs_steps
        self.stack = stack
        self.reset()

    def reset(self) -> None:
        self.observations: deque[dict[str, Any]] = deque(maxlen=self.n_obs_steps)
        self.actions: deque[Any] = deque()
        self.batch_size: int | None = None

    def add_observation(self, obs: dict[str, Any]) -> None:
        """obs[key]: (B, *shape) for one time step."""
        batch = next(iter(obs.values())).shape[0]
        if self.batch_size is None:
            self.batch_size = batch
        elif batch != self.batch_size:
            raise ValueError(
                f"select_action got batch size {batch} after {self.batch_size}; call reset() first"
            )
        if not self.observations:
            self.observations.extend([obs] * self.n_obs_steps)
        else:
            self.observations.append(obs)

    def stacked_observations(self) -> dict[str, Any]:
        """-> {key: (B, n_obs_steps, *shape)}, oldest first."""
        return {k: self.stack([o[k] for o in self.observations], 1) for k in self.observations[0]}

    @property
    def needs_plan(self) -> bool:
        return not self.actions

    def add_plan(self, actions: Any) -> None:
        """actions: (B, n_action_steps, Da), executed in order."""
        self.actions.extend(actions[:, i] for i in range(actions.shape[1]))

    def pop_action(self) -> Any:
        """-> (B, Da)."""
        return self.actions.popleft()

    def next_action(self, obs: dict[str, Any], plan: Callable[[dict[str, Any]], Any]) -> Any:
        """Record one step's obs {key: (B, *shape)} and return the action to execute now, (B, Da).

        ``plan(stacked_obs)`` maps {key: (B, n_obs_steps, *shape)} to (B, n_action_steps, Da); it is called
        only when the queued plan has run out.
        """
        self.add_observation(obs)
        if self.needs_plan:
            self.add_plan(plan(self.stacked_observations()))
        return self.pop_action()
