"""The flow-matching ODE solvers, written once for torch tensors and numpy arrays.

Sampling integrates dx/dt = v(x, t) from t = 1 (noise) to t = 0 on the grid t_i = 1 - i / N with Euler (one
velocity evaluation per step), midpoint or Heun (two). Only ``+``, ``*`` and ``.clip`` touch the arrays, so
the training scheduler (:class:`diffusion_policy.model.diffusion.flow_matching.FlowMatchingScheduler`, torch)
and the exported runtime (:class:`diffusion_policy.deploy.schedulers.FlowSampler`, numpy) run the same
code. No torch or numpy import here: the runtime must not pull in torch.
"""

from __future__ import annotations

from typing import Any

SOLVER_EVALUATIONS = {"euler": 1, "midpoint": 2, "heun": 2}


class FlowODE:
    """N steps of ``solver`` from t = 1 to 0; ``times`` lists the evaluation times in [0, 1] in the order
    :meth:`step` takes the velocities (N for Euler, 2N for midpoint and Heun).

    Args:
        solver: ``"euler"``, ``"midpoint"`` or ``"heun"``.
        num_steps: N >= 1.
        clip_range: clamp the final state to [-clip_range, clip_range] (None: no clamp).
    """

    def __init__(self, solver: str, num_steps: int, clip_range: float | None = None) -> None:
        if solver not in SOLVER_EVALUATIONS:
            raise ValueError(f"flow solver={solver!r} is not one of {list(SOLVER_EVALUATIONS)}")
        if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"num_inference_steps={num_steps!r} must be an integer >= 1")
        n = int(num_steps)
        self.solver, self.num_steps, self.clip_range = solver, n, clip_range
        self.per_step = SOLVER_EVALUATIONS[solver]
        # float32 dt and times equal those of torch.linspace(1, 0, n + 1, float64) for every n <= 1000
        self.grid = [1.0 - i / n for i in range(n)] + [0.0]
        starts, ends = self.grid[:-1], self.grid[1:]
        if solver == "euler":
            self.times = list(starts)
        elif solver == "midpoint":
            self.times = [t for a, b in zip(starts, ends) for t in (a, (a + b) / 2)]
        else:
            self.times = [t for a, b in zip(starts, ends) for t in (a, b)]
        self._pending: tuple[Any, Any] | None = None

    @property
    def num_evaluations(self) -> int:
        return len(self.times)

    def step(self, i: int, velocity: Any, sample: Any) -> Any:
        """Evaluation ``i`` (index into ``times``, called in order): the velocity at (sample, times[i]) ->
        the state at the next evaluation time (the next grid point after a whole step)."""
        k, stage = divmod(i, self.per_step)
        dt = self.grid[k + 1] - self.grid[k]
        if self.solver == "euler":
            prev = sample + dt * velocity
        elif stage == 0:
            # first evaluation of a two-stage step: remember where the step started
            self._pending = (sample, velocity)
            prev = sample + (dt / 2 if self.solver == "midpoint" else dt) * velocity
        else:
            start, first = self._pending
            self._pending = None
            prev = start + dt * velocity if self.solver == "midpoint" else start + dt / 2 * (first + velocity)
        if self.clip_range is not None and i == self.num_evaluations - 1:
            prev = prev.clip(-self.clip_range, self.clip_range)
        return prev
