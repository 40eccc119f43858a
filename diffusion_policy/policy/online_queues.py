"""The online interface's state: observation history and pending actions of ``select_action``."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import torch


class OnlineQueues:
    """Observation history and pending actions for ``select_action``.

    After ``reset()`` the first observation is repeated to fill all ``n_obs_steps`` slots. Actions of one
    plan (B, n_action_steps, Da) are handed out one step at a time; an empty queue means "replan".
    """

    def __init__(self, n_obs_steps: int) -> None:
        self.n_obs_steps = n_obs_steps
        self.reset()

    def reset(self) -> None:
        self.observations: deque[dict[str, torch.Tensor]] = deque(maxlen=self.n_obs_steps)
        self.actions: deque[torch.Tensor] = deque()
        self.batch_size: int | None = None

    def add_observation(self, obs: dict[str, torch.Tensor]) -> None:
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

    def stacked_observations(self) -> dict[str, torch.Tensor]:
        """-> {key: (B, n_obs_steps, *shape)}, oldest first."""
        return {k: torch.stack([o[k] for o in self.observations], dim=1) for k in self.observations[0]}

    @property
    def needs_plan(self) -> bool:
        return not self.actions

    def add_plan(self, actions: torch.Tensor) -> None:
        """actions: (B, n_action_steps, Da), executed in order."""
        self.actions.extend(actions.unbind(dim=1))

    def pop_action(self) -> torch.Tensor:
        """-> (B, Da)."""
        return self.actions.popleft()

    def next_action(
        self, obs: dict[str, torch.Tensor], plan: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    ) -> torch.Tensor:
        """Record one step's obs {key: (B, *shape)} and return the action to execute now, (B, Da).

        ``plan(stacked_obs)`` maps {key: (B, n_obs_steps, *shape)} to (B, n_action_steps, Da); it is called
        only when the queued plan has run out.
        """
        self.add_observation(obs)
        if self.needs_plan:
            self.add_plan(plan(self.stacked_observations()))
        return self.pop_action()


def to_single_step_batch(
    obs: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], bool]:
    """One env step's observations -> ({key: (B, *shape)} on device, whether the input had a batch dim).

    Accepts tensors or numpy arrays shaped (*shape) (single env) or (B, *shape) (vectorised envs).
    """
    out, batched_flags = {}, set()
    for key, shape in shapes.items():
        if key not in obs:
            raise KeyError(f"select_action: observation '{key}' is missing (got keys {sorted(obs)})")
        value = torch.as_tensor(obs[key], device=device, dtype=dtype)
        if tuple(value.shape) == shape:
            value = value.unsqueeze(0)
            batched_flags.add(False)
        elif value.ndim == len(shape) + 1 and tuple(value.shape[1:]) == shape:
            batched_flags.add(True)
        else:
            raise ValueError(
                f"select_action: observation '{key}' has shape {tuple(value.shape)}; "
                f"expected {shape} or (B, *{shape})"
            )
        out[key] = value
    if len(batched_flags) != 1:
        raise ValueError(
            "select_action: mix of batched and unbatched observations; give all keys a batch dim or none"
        )
    return out, batched_flags.pop()
