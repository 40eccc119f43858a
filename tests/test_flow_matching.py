"""Flow matching: the ODE solvers against closed-form flows, a toy mixture learned through the policies' own
loss and sampling loop, construction errors, sampler switching, and every policy family trained, evaluated
at several step counts, resumed and exported with ``policy/noise_scheduler=flow_matching``."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_policy.deploy import load_exported_policy
from diffusion_policy.deploy.exporter import export_checkpoint
from diffusion_policy.deploy.schedulers import FlowSampler
from diffusion_policy.model.diffusion.flow_matching import FlowMatchingScheduler
from diffusion_policy.policy.denoising import conditional_sample, diffusion_loss
from diffusion_policy.policy.samplers import sampler_label, use_sampler
from diffusion_policy.workspace.base_workspace import load_policy
from tests.helpers import (
    assert_ok,
    assert_one_line_error,
    evaluate_in_process,
    lowdim_args,
    run_cli,
    train_cli,
    trained_run,
)
from tests.resume_check import assert_same_training_state, kill_then_resume

FLOW = "policy/noise_scheduler=flow_matching"
SOLVERS = ("euler", "midpoint", "heun")


def integrate(scheduler: FlowMatchingScheduler, velocity, x1: torch.Tensor, steps: int) -> torch.Tensor:
    """Run the scheduler's loop from x1 (time 1) with velocity(x, t in [0, 1])."""
    scheduler.set_timesteps(steps)
    x = x1
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, float(t) / scheduler.config.num_train_timesteps), t, x).prev_sample
    return x


# ----------------------------------------------------------------------------- solvers vs closed form
def gaussian_flow(mu: float, s: float):
    """The exact flow-matching velocity for data N(mu, s^2) and noise N(0, 1) on the straight path
    x_t = (1 - t) x0 + t e: E[e - x0 | x_t = x], linear in x. Its ODE carries x1 to x0 = mu + s * x1."""

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        var = (1 - t) ** 2 * s**2 + t**2
        return -mu + (t - (1 - t) * s**2) / var * (x - (1 - t) * mu)

    return velocity


@pytest.mark.parametrize("solver, order", [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_solvers_converge_to_the_exact_flow_at_their_order(solver, order):
    mu, s = 0.7, 0.3
    x1 = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).reshape(-1, 1, 1)
    exact = mu + s * x1
    scheduler = FlowMatchingScheduler(solver=solver, clip_sample=False)
    errors = [
        float((integrate(scheduler, gaussian_flow(mu, s), x1, n) - exact).abs().max()) for n in (8, 16, 32)
    ]
    assert errors[-1] < (6e-2 if order == 1 else 2e-3), errors
    # halving the step divides the error by at least about 2 ** order (Euler: by no more than that)
    for coarse, fine in zip(errors, errors[1:]):
        assert coarse / fine > 2 ** (order - 0.3), (solver, errors)
        assert order > 1 or coarse / fine < 2**1.4, (solver, errors)


def test_one_euler_step_is_exact_for_a_point_mass_and_matches_the_linear_field_formula():
    # data = a single point: every path is straight, so one Euler step lands on it from any noise
    target = torch.tensor([0.25, -0.5], dtype=torch.float64).reshape(1, 1, 2)
    x1 = torch.randn(5, 1, 2, dtype=torch.float64)
    out = integrate(FlowMatchingScheduler(), lambda x, t: (x - target) / t, x1, 1)
    torch.testing.assert_close(out, target.expand_as(out))
    # dx/dt = a x from t = 1 to 0: per step Euler multiplies by 1 - a h, midpoint/Heun by 1 - a h + (a h)^2/2
    a, n = 0.7, 4
    h = 1 / n
    for solver, factor in (("euler", 1 - a * h), ("heun", 1 - a * h + (a * h) ** 2 / 2)):
        got = integrate(FlowMatchingScheduler(solver=solver), lambda x, t: a * x, torch.ones(1, 1, 1), n)
        assert math.isclose(float(got), factor**n, rel_tol=1e-6), solver
    assert abs(factor**n - math.exp(-a)) < 3e-3


@pytest.mark.parametrize("solver", SOLVERS)
def test_numpy_runtime_solver_matches_torch_step_for_step(solver):
    torch_sched = FlowMatchingScheduler(solver=solver)
    ours = FlowSampler(dict(torch_sched.config), 3)
    torch_sched.set_timesteps(3)
    np.testing.assert_allclose(ours.timesteps, torch_sched.timesteps.numpy())
    rng = np.random.default_rng(0)
    x_t = x_n = rng.standard_normal((2, 4, 3)).astype(np.float32) * 2
    x_t = torch.from_numpy(x_t)
    for i, t in enumerate(torch_sched.timesteps):
        velocity = np.sin(x_n + float(t))  # any state- and time-dependent field
        x_t = torch_sched.step(torch.from_numpy(velocity), t, x_t).prev_sample
        x_n = ours.step(i, velocity, x_n)
        np.testing.assert_allclose(x_n, x_t.numpy(), atol=1e-6)
    assert np.abs(x_n).max() <= 1.0, "the final sample is clipped to the normalized range"


def test_training_time_distributions():
    torch.manual_seed(0)
    n = 20000
    means = {}
    for sampling in ("uniform", "beta", "logit_normal"):
        t = FlowMatchingScheduler(time_sampling=sampling).sample_timesteps(n) / 100
        assert t.dtype == torch.float32 and t.shape == (n,)
        assert float(t.min()) >= 0 and float(t.max()) <= 1
        means[sampling] = float(t.mean())
    assert abs(means["uniform"] - 0.5) < 0.01
    # pi0's Beta(1.5, 1) on [0.001, 1] has mean 0.001 + 0.999 * 0.6: noisy times are favoured
    assert abs(means["beta"] - (0.001 + 0.999 * 0.6)) < 0.01
    t = FlowMatchingScheduler(time_sampling="logit_normal").sample_timesteps(n) / 100
    middle = float(((t > 0.25) & (t < 0.75)).float().mean())
    assert abs(means["logit_normal"] - 0.5) < 0.01 and middle > 0.6  # uniform would give 0.5


# ----------------------------------------------------------------------------- a toy mixture, learned
class ToyVelocity(nn.Module):
    """(B, 1, 2) points and (B,) times in [0, 100] -> (B, 1, 2) velocity."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype).reshape(-1, 1).expand(x.shape[0], 1) / 100
        return self.net(torch.cat([x[:, 0], t], dim=1)).unsqueeze(1)


def test_toy_mixture_is_sampled_with_four_euler_steps():
    """Three Gaussian modes with weights 0.5 / 0.3 / 0.2, trained for 600 steps through the policies' own
    ``diffusion_loss`` and sampled through ``conditional_sample``. With 4 Euler steps each mode's mass must be
    within 0.05 of its weight and most samples (measured: 67 %) within 0.3 of a mode centre (mode std 0.05);
    a 600-step net with 4 steps still leaves a share between modes (16 steps: 82 %; 1 step: 3 %, with the
    masses off by 0.24)."""
    torch.manual_seed(0)
    centres = torch.tensor([[-0.6, -0.4], [0.6, -0.4], [0.0, 0.6]])
    weights = torch.tensor([0.5, 0.3, 0.2])

    def data(n: int) -> torch.Tensor:
        idx = torch.multinomial(weights, n, replacement=True)
        return (centres[idx] + 0.05 * torch.randn(n, 2)).unsqueeze(1)

    model, scheduler = ToyVelocity(), FlowMatchingScheduler()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(600):
        loss = diffusion_loss(model, scheduler, data(256))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        samples = conditional_sample(
            model, scheduler, 4, torch.zeros(4000, 1, 2), generator=torch.Generator().manual_seed(1)
        )[:, 0]
    dist = torch.cdist(samples, centres)
    nearest = dist.argmin(dim=1)
    mass = torch.bincount(nearest, minlength=3).float() / len(samples)
    assert torch.all((mass - weights).abs() < 0.05), mass
    assert float((dist.min(dim=1).values < 0.3).float().mean()) > 0.6


# ----------------------------------------------------------------------------- construction errors
@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"time_sampling": "gamma"}, "time_sampling='gamma'"),
        ({"solver": "rk4"}, "solver='rk4'"),
        ({"variance_type": "fixed_small"}, "variance_type"),
        ({"beta_schedule": "linear"}, "beta_schedule"),
        ({"prediction_type": "epsilon"}, "prediction_type='epsilon'"),
        ({"num_train_timesteps": 0}, "num_train_timesteps=0"),
        ({"logit_std": -1.0}, "logit_std=-1.0"),
    ],
)
def test_bad_scheduler_settings_fail_at_construction(kwargs, needle):
    with pytest.raises(ValueError, match=".*") as info:
        FlowMatchingScheduler(**kwargs)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_zero_or_negative_steps_fail_when_the_policy_is_built():
    from diffusion_policy.model.diffusion.conditional_unet1d import ConditionalUnet1D
    from diffusion_policy.policy.diffusion_unet_lowdim_policy import DiffusionUnetLowdimPolicy

    model = ConditionalUnet1D(
        input_dim=2, global_cond_dim=40, down_dims=[16, 32], diffusion_step_embed_dim=16
    )
    common = {"horizon": 16, "obs_dim": 20, "action_dim": 2, "n_action_steps": 8, "n_obs_steps": 2}
    common["obs_as_global_cond"] = True
    for steps in (0, -3):
        with pytest.raises(ValueError, match=f"num_inference_steps={steps}"):
            DiffusionUnetLowdimPolicy(model, FlowMatchingScheduler(), num_inference_steps=steps, **common)
    with pytest.raises(ValueError, match="eta"):
        DiffusionUnetLowdimPolicy(model, FlowMatchingScheduler(), eta=0.0, **common)
    policy = DiffusionUnetLowdimPolicy(model, FlowMatchingScheduler(), **common)
    assert policy.num_inference_steps == 10  # None: the default count, not num_train_timesteps


def test_inpainting_keeps_the_known_observations_under_flow_matching():
    from diffusion_policy.model.common.normalizer import LinearNormalizer
    from diffusion_policy.model.diffusion.conditional_unet1d import ConditionalUnet1D
    from diffusion_policy.policy.diffusion_unet_lowdim_policy import DiffusionUnetLowdimPolicy

    torch.manual_seed(0)
    model = ConditionalUnet1D(input_dim=2 + 20, down_dims=[16, 32], diffusion_step_embed_dim=16)
    policy = DiffusionUnetLowdimPolicy(
        model, FlowMatchingScheduler(solver="heun"), 16, 20, 2, 8, 2, num_inference_steps=3
    )
    normalizer = LinearNormalizer()
    normalizer.fit({"obs": torch.rand(100, 20) * 500, "action": torch.rand(100, 2) * 500})
    policy.set_normalizer(normalizer)
    obs = torch.rand(3, 2, 20) * 500
    batch = {"obs": torch.rand(3, 16, 20) * 500, "action": torch.rand(3, 16, 2) * 500}
    loss = policy.compute_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    out = policy.predict_action({"obs": obs})
    assert out["action"].shape == (3, 8, 2) and torch.isfinite(out["action_pred"]).all()
    # the sampled trajectory's observation channels are held at the given observations (up to the
    # normalize/unnormalize round trip); the later, unobserved steps are predicted
    torch.testing.assert_close(out["obs_pred"][:, :2], obs, rtol=1e-5, atol=1e-3)
    assert not torch.allclose(out["obs_pred"][:, 2:4], obs, atol=1.0)


# ----------------------------------------------------------------------------- end to end
def flow_args(zarr: str, run_dir: Path, *extra: str) -> list[str]:
    """The state smoke run of tests/test_train_e2e.py, trained with flow matching."""
    return lowdim_args(zarr, run_dir, FLOW, *extra)


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, pusht_zarr_path) -> Path:
    return trained_run(tmp_path_factory, "flow", functools.partial(flow_args, pusht_zarr_path))


@pytest.mark.needs_data
def test_state_flow_policy_trains_and_evaluates_at_several_step_counts(flow_run, tmp_path):
    ckpt = flow_run / "checkpoints" / "latest.ckpt"
    policy, cfg = load_policy(ckpt, "cpu")
    assert type(policy.noise_scheduler).__name__ == "FlowMatchingScheduler"
    assert sampler_label(policy) == f"FlowMatchingScheduler-euler-{cfg.policy.num_inference_steps}"
    for args, label in (
        (["--inference-steps", "1"], "FlowMatchingScheduler-euler-1"),
        (["--inference-steps", "2", "--n-test", "2", "--noise-seed", "0"], "FlowMatchingScheduler-euler-2"),
        (["--sampler", "heun", "--inference-steps", "2"], "FlowMatchingScheduler-heun-2"),
    ):
        out = tmp_path / label
        assert_ok(run_cli(["eval.py", "-c", str(ckpt), "-o", str(out), "-d", "cpu", *args]))
        log = json.loads((out / "eval_log.json").read_text())
        assert log["eval/sampler"] == label and 0.0 <= log["test/mean_score"] <= 1.0
    # with seeded noise the ODE sampler is deterministic: the same evaluation again, in this process
    again = evaluate_in_process(ckpt, tmp_path / "again", inference_steps=2, n_test=2, noise_seed=0)
    assert again["eval/sampler"] == "FlowMatchingScheduler-euler-2"
    seeded = json.loads((tmp_path / "FlowMatchingScheduler-euler-2" / "eval_log.json").read_text())
    assert again["test/mean_score"] == seeded["test/mean_score"]
    proc = run_cli(["eval.py", "-c", str(ckpt), "-o", str(tmp_path / "bad"), "--sampler", "ddim"])
    assert_one_line_error(proc, "flow matching", "euler")
    assert not (tmp_path / "bad").exists()


@pytest.mark.needs_data
def test_flow_select_action_and_sampler_switching(flow_run):
    policy, cfg = load_policy(flow_run / "checkpoints" / "latest.ckpt", "cpu")
    policy.reset()
    obs = torch.rand(cfg.obs_dim) * 400
    actions = [policy.select_action(obs) for _ in range(cfg.n_action_steps + 1)]
    assert all(a.shape == (cfg.action_dim,) and torch.isfinite(a).all() for a in actions)
    assert use_sampler(policy, "midpoint", 3) == "FlowMatchingScheduler-midpoint-3"
    assert use_sampler(policy, None, 5) == "FlowMatchingScheduler-midpoint-5"
    with pytest.raises(ValueError, match="flow matching"):
        use_sampler(policy, "ddpm")
    # deterministic given the initial noise: same generator seed, same plan
    batch = {"obs": torch.rand(2, cfg.n_obs_steps, cfg.obs_dim) * 400}
    a = policy.predict_action(batch, generator=torch.Generator().manual_seed(3))["action"]
    b = policy.predict_action(batch, generator=torch.Generator().manual_seed(3))["action"]
    assert torch.equal(a, b)


@pytest.mark.needs_data
def test_flow_resume_after_sigkill_ends_with_identical_weights(flow_run, pusht_zarr_path, tmp_path):
    resumed = kill_then_resume(functools.partial(flow_args, pusht_zarr_path), tmp_path / "killed")
    assert_same_training_state(flow_run / "checkpoints" / "latest.ckpt", resumed)


@pytest.mark.needs_data
@pytest.mark.parametrize(
    "config, debug",
    [
        ("train_diffusion_unet_hybrid_workspace", "smoke_image"),
        ("train_diffusion_transformer_lowdim_pusht_workspace", "smoke_transformer"),
    ],
)
def test_image_and_transformer_policies_train_with_flow_matching(config, debug, pusht_zarr_path, tmp_path):
    run_dir = tmp_path / "run"
    train_cli(
        run_dir, pusht_zarr_path, f"--config-name={config}", f"debug={debug}", FLOW, "training.num_epochs=1"
    )
    ckpt = run_dir / "checkpoints" / "latest.ckpt"
    out = tmp_path / "eval"
    assert_ok(run_cli(["eval.py", "-c", str(ckpt), "-o", str(out), "-d", "cpu", "--inference-steps", "2"]))
    assert json.loads((out / "eval_log.json").read_text())["eval/sampler"] == "FlowMatchingScheduler-euler-2"


@pytest.mark.needs_data
def test_flow_setting_errors_from_the_command_line_are_one_line(pusht_zarr_path, tmp_path):
    for override, needle in (
        ("+policy.noise_scheduler.variance_type=fixed_small", "variance_type"),
        ("policy.noise_scheduler.time_sampling=gamma", "time_sampling='gamma'"),
        ("policy.num_inference_steps=0", "num_inference_steps=0"),
    ):
        run_dir = tmp_path / override.split("=")[0].strip("+")
        proc = run_cli(flow_args(pusht_zarr_path, run_dir, override))
        assert_one_line_error(proc, needle)
        assert not (run_dir / "checkpoints").exists()


@pytest.mark.needs_data
def test_exported_flow_policy_matches_torch(flow_run, tmp_path):
    ckpt = flow_run / "checkpoints" / "latest.ckpt"
    export_dir = tmp_path / "export"
    manifest = export_checkpoint(ckpt, export_dir)
    assert manifest["scheduler"]["class"] == "FlowMatchingScheduler"
    policy, _ = load_policy(ckpt, "cpu")
    stats = policy.normalizer["action"].get_input_stats()
    tolerance = 1e-5 * float((stats["max"] - stats["min"]).max())
    obs = torch.rand(3, policy.n_obs_steps, policy.obs_dim) * 400
    noise = torch.randn((3, policy.horizon, policy.action_dim), generator=torch.Generator().manual_seed(5))
    for backend in ("onnxruntime", "openvino"):
        runtime = load_exported_policy(export_dir, backend)
        for solver, steps in (("euler", 2), ("heun", 3)):
            use_sampler(policy, solver, steps)
            runtime.set_sampler(solver, steps)
            assert runtime.sampler_label() == sampler_label(policy)
            expected = policy.predict_action({"obs": obs}, noise=noise)
            got = runtime.predict_action({"obs": obs.numpy()}, noise=noise.numpy())
            diff = float(np.abs(got["action_pred"] - expected["action_pred"].numpy()).max())
            assert diff <= tolerance, f"{backend} {solver}: {diff} > {tolerance}"
        with pytest.raises(ValueError, match="flow matching"):
            runtime.set_sampler("ddim", 4)


@pytest.mark.needs_data
def test_sampler_sweep_writes_cells_plot_and_continues(flow_run, tmp_path):
    """benchmarks.sampler_sweep on a tiny flow checkpoint: one row per step count with a confidence
    interval and a latency, a plot, and a second call that finds every cell done."""
    ckpt = flow_run / "checkpoints" / "latest.ckpt"
    out, png = tmp_path / "sweep", tmp_path / "sweep.png"
    args = ["-m", "benchmarks.sampler_sweep", "--ckpt", f"flow={ckpt}", "--steps", "1,2", "--n-test", "2"]
    args += ["--latency-repeats", "1", "--out", str(out), "--plot", str(png)]
    assert_ok(run_cli(args))
    rows = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert [(r["sampler"], r["steps"]) for r in rows] == [("euler", 1), ("euler", 2)]
    for r in rows:
        assert (
            r["n_episodes"] == 2 and r["mean_score_ci95_low"] <= r["mean_score"] <= r["mean_score_ci95_high"]
        )
        assert r["latency_ms_b1"] > 0 and r["sampler_label"] == f"FlowMatchingScheduler-euler-{r['steps']}"
    assert png.stat().st_size > 10_000
    again = run_cli(args)
    assert_ok(again)
    assert "evaluating" not in again.stderr and len((out / "cells.jsonl").read_text().splitlines()) == 2
    bad = run_cli(["-m", "benchmarks.sampler_sweep", "--ckpt", "nolabel", "--out", str(tmp_path / "x")])
    assert bad.returncode != 0 and "LABEL=PATH" in bad.stderr
