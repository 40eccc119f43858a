"""Execution under inference delay: the four modes, RTC's guided sampling, eval.py's --delay/--execution."""

from __future__ import annotations

import json
import math
import threading

import gymnasium as gym
import numpy as np
import pytest
import torch

from diffusion_policy.common.chunk_execution import ChunkExecutor, ExecutionSpec, rtc_weights
from diffusion_policy.deploy.controller import RealTimeController
from diffusion_policy.env_runner.vector_rollout import Episode, VectorRollout
from diffusion_policy.gym_util.multistep_wrapper import MultiStepWrapper
from diffusion_policy.model.common.normalizer import LinearNormalizer
from diffusion_policy.model.diffusion.conditional_unet1d import ConditionalUnet1D
from diffusion_policy.model.diffusion.flow_matching import FlowMatchingScheduler
from diffusion_policy.policy.chunk_guidance import output_from_estimate, path_coefficients
from diffusion_policy.policy.diffusion_unet_lowdim_policy import DiffusionUnetLowdimPolicy
from tests.helpers import assert_ok, assert_one_line_error, evaluate_in_process, run_cli
from tests.policy_helpers import ddim, ddpm

S, H, DA = 8, 15, 2  # executed steps, chunk length (horizon 16 - To 2 + 1), action dim of PushT


def chunk(call: int, length: int = H) -> np.ndarray:
    """A recognisable chunk: action (call, index) at each index."""
    return np.stack([np.full(length, float(call)), np.arange(length, dtype=float)], axis=-1)[None]


# ----------------------------------------------------------------------------- the spec's checks
@pytest.mark.parametrize(
    "mode, delay, overlap, chunk_length, needle",
    [
        ("sync", 2, None, H, "sync means the world waits"),
        ("async", -1, None, H, "delay=-1 must be an integer >= 0"),
        ("async", 8, None, H, "at or past the executed horizon n_action_steps=8"),
        ("rtc", 3, 2, H, "overlap=2 must be an integer from the delay (3)"),
        ("ensemble", 1, 8, H, "overlap=8 must be an integer from the delay (1) to chunk_length"),
        ("async", 2, None, S, "predicts 8 from the current step (0 past them"),
        ("rtc", 1, None, S, "horizon too short or pred_action_steps_only"),
        ("sync", 0, 3, H, "overlap=3 means nothing for execution 'sync'"),
        ("later", 0, None, H, "is not one of"),
    ],
)
def test_spec_refuses_what_cannot_run(mode, delay, overlap, chunk_length, needle):
    with pytest.raises(ValueError) as info:
        ExecutionSpec(mode, delay, S, chunk_length, overlap)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_default_overlaps_follow_the_papers():
    assert ExecutionSpec("async", 3, S, H).resolved_overlap == 3
    assert ExecutionSpec("ensemble", 0, S, H).resolved_overlap == H - S
    assert ExecutionSpec("rtc", 2, S, H).resolved_overlap == H - S
    assert ExecutionSpec("async", 0, S, H).is_sync_equivalent
    assert not ExecutionSpec("rtc", 0, S, H).is_sync_equivalent


def test_rtc_weights_freeze_the_delay_then_decay_to_zero():
    w = rtc_weights(delay=2, overlap=7, length=H)
    assert w.shape == (H,)
    assert (w[:2] == 1).all() and (w[7:] == 0).all()
    assert (np.diff(w[2:8]) < 0).all() and 0 < w[6] < w[2] < 1
    # the paper's formula at one index: c = (7 - 3) / (7 - 2 + 1)
    c = 4 / 6
    assert w[3] == pytest.approx(c * math.expm1(c) / (math.e - 1))


# ----------------------------------------------------------------------------- executed actions
@pytest.mark.parametrize("delay", [0, 1, 3, 7])
def test_async_runs_the_old_chunk_for_delay_steps_then_the_new_one_from_index_delay(delay):
    executor = ChunkExecutor(ExecutionSpec("async", delay, S, H), batch_size=1)
    rows = np.array([0])
    first = executor.execute(chunk(0), rows)[0]
    assert first.tolist() == chunk(0)[0, :S].tolist(), "the first chunk starts at its index 0"
    for call in (1, 2, 3):
        executed = executor.execute(chunk(call), rows)[0]
        old = [[call - 1, S + k] for k in range(delay)]
        new = [[call, k] for k in range(delay, S)]
        assert executed.tolist() == old + new


def test_sync_and_zero_overlap_modes_execute_the_first_actions_of_every_chunk():
    for mode in ("sync", "async", "ensemble", "rtc"):
        executor = ChunkExecutor(ExecutionSpec(mode, 0, S, H, overlap=0), batch_size=1)
        for call in range(3):
            assert executor.guide(np.array([0])) is None
            assert executor.execute(chunk(call), np.array([0]))[0].tolist() == chunk(call)[0, :S].tolist()


def test_ensemble_averages_available_chunks_with_acts_weights():
    spec = ExecutionSpec("ensemble", 2, S, H, ensemble_decay=0.5)  # overlap 7
    executor = ChunkExecutor(spec, batch_size=1)
    executor.execute(chunk(10), np.array([0]))
    executed = executor.execute(chunk(20), np.array([0]))[0]
    # steps 0-1: the new chunk does not exist yet; 2-6: old index 8+k and new index k; 7: the new one only
    old_w, new_w = 1.0, math.exp(-0.5)
    for k in range(S):
        if k < 2:
            expected = [10, S + k]
        elif k < 7:
            expected = [
                (10 * old_w + 20 * new_w) / (old_w + new_w),
                ((S + k) * old_w + k * new_w) / (old_w + new_w),
            ]
        else:
            expected = [20, k]
        assert executed[k] == pytest.approx(expected), k


def test_rtc_guide_is_the_old_chunks_overlap_with_its_weights():
    spec = ExecutionSpec("rtc", 3, S, H)
    executor = ChunkExecutor(spec, batch_size=2)
    rows = np.array([0, 1])
    assert executor.guide(rows) is None, "nothing to follow before the first chunk"
    executor.execute(np.concatenate([chunk(1), chunk(2)]), rows)
    target, weights = executor.guide(np.array([1]))
    assert target.shape == (1, H, DA)
    assert target[0, :7].tolist() == chunk(2)[0, S:].tolist() and (target[0, 7:] == 0).all()
    assert weights.tolist() == rtc_weights(3, 7, H).tolist()


class RecordingEnv(gym.Env):
    """A 1-D world that records every action it is given; observation = the step count."""

    metadata = {"render_modes": []}
    recorded: list[list[float]] = []

    def __init__(self):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (DA,), np.float64)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2), {}

    def step(self, action):
        RecordingEnv.recorded.append(np.asarray(action).tolist())
        self.t += 1
        return np.array([self.t, 0.0]), 0.0, False, False, {}

    def stop_recording(self):
        pass


def recording_episode_env():
    return MultiStepWrapper(RecordingEnv(), n_obs_steps=2, n_action_steps=S, max_episode_steps=4 * S)


class CountingPolicy:
    """Returns chunk(call) in ``action_pred`` after one past step, as a To = 2 policy does."""

    device, dtype, chunk_start = torch.device("cpu"), torch.float32, 1

    def reset(self):
        self.calls = 0

    def predict_action(self, obs_dict):
        pred = torch.from_numpy(np.concatenate([np.full((1, 1, DA), -1.0), chunk(self.calls)], axis=1))
        self.calls += 1
        return {"action": pred[:, 1 : 1 + S], "action_pred": pred}


@pytest.mark.parametrize("delay", [0, 3])
def test_a_rollout_executes_what_the_executor_says(delay):
    """Through the env workers: the recorded env actions are the old chunk's for ``delay`` steps after
    each observation, then the new chunk's from index ``delay``."""
    RecordingEnv.recorded = []
    rollout = VectorRollout(recording_episode_env, n_episodes=1, n_envs=1)
    try:
        rollout.run(
            CountingPolicy(),
            [Episode(seed=0, prefix="test/")],
            obs_to_policy=lambda obs: {"obs": obs.astype(np.float32)},
            n_obs_steps=2,
            execution=ExecutionSpec("async", delay, S, H),
        )
    finally:
        rollout.close()
    expected = [[0, k] for k in range(S)]
    for call in (1, 2, 3):
        expected += [[call - 1, S + k] for k in range(delay)] + [[call, k] for k in range(delay, S)]
    assert RecordingEnv.recorded == expected


# ----------------------------------------------------------------------------- RTC's guided sampling
class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser for data ~ N(0, I): E[x0 | x] = alpha * x / (alpha^2 + sigma^2) on the sampler's
    path, returned as the scheduler's prediction type. A toy with a known right answer: unguided samples are
    standard normal, so a pull toward the target shows up clearly."""

    def __init__(self, scheduler):
        super().__init__()
        self.scheduler = scheduler
        self.unused = torch.nn.Parameter(torch.zeros(1))  # the policy reads its device and dtype

    def forward(self, x, t, **conditions):
        alpha, sigma = path_coefficients(self.scheduler, float(t.reshape(-1)[0]))
        x0 = alpha * x / (alpha**2 + sigma**2)
        return output_from_estimate(self.scheduler, x0, x, alpha, sigma)


def toy_policy(scheduler, model=None, **kwargs) -> DiffusionUnetLowdimPolicy:
    torch.manual_seed(0)
    if model is None:
        model = ConditionalUnet1D(
            input_dim=DA,
            global_cond_dim=2 * 4,
            diffusion_step_embed_dim=16,
            down_dims=[16, 32],
            kernel_size=3,
        )
    policy = DiffusionUnetLowdimPolicy(
        model=model,
        noise_scheduler=scheduler,
        horizon=16,
        obs_dim=4,
        action_dim=DA,
        n_action_steps=S,
        n_obs_steps=2,
        obs_as_global_cond=True,
        oa_step_convention=True,  # as the PushT configs: the chunk starts at index To - 1
        **kwargs,
    )
    normalizer = LinearNormalizer()
    normalizer.fit({"obs": torch.randn(64, 4), "action": torch.rand(64, DA) * 4 - 2}, mode="limits")
    policy.set_normalizer(normalizer)
    return policy.eval()


SAMPLERS = {
    "ddim-8": lambda: ddim(),
    "ddpm-100": lambda: ddpm(),
    "flow-euler-4": lambda: FlowMatchingScheduler(num_train_timesteps=100),
}


@pytest.mark.parametrize("method", ["guidance", "inpaint"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_rtc_freezes_the_prefix_and_pulls_the_overlap_toward_the_old_chunk(sampler, method):
    kwargs = {"num_inference_steps": 8} if sampler == "ddim-8" else {}
    if sampler.startswith("flow"):
        kwargs = {"num_inference_steps": 4}
    scheduler = SAMPLERS[sampler]()
    policy = toy_policy(scheduler, GaussianDenoiser(scheduler), **kwargs)
    policy.guide_method = method
    obs = {"obs": torch.randn(3, 2, 4)}
    noise = torch.randn(3, 16, DA, generator=torch.Generator().manual_seed(1))
    target = torch.rand(3, H, DA, generator=torch.Generator().manual_seed(2)) * 2 - 1
    weights = rtc_weights(delay=3, overlap=7, length=H)
    free = policy.predict_action(obs, torch.Generator().manual_seed(3), noise.clone())["action_pred"][:, 1:]
    guided = policy.predict_action(
        obs, torch.Generator().manual_seed(3), noise.clone(), guide=(target, weights)
    )
    guided = guided["action_pred"][:, 1:]
    assert torch.equal(guided[:, :3], target[:, :3]), "the frozen prefix is the old chunk's, exactly"
    soft = slice(3, 7)
    gap_free = (free[:, soft] - target[:, soft]).abs().mean().item()
    gap_guided = (guided[:, soft] - target[:, soft]).abs().mean().item()
    print(f"{sampler} {method}: |chunk - old| over the soft overlap {gap_free:.3f} -> {gap_guided:.3f}")
    assert gap_guided < 0.8 * gap_free, (gap_free, gap_guided)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_an_empty_overlap_is_plain_sampling_given_the_same_noise(sampler):
    policy = toy_policy(SAMPLERS[sampler]())
    obs = {"obs": torch.randn(2, 2, 4)}
    noise = torch.randn(2, 16, DA)
    plain = policy.predict_action(obs, torch.Generator().manual_seed(3), noise.clone())
    empty = (torch.zeros(2, H, DA), np.zeros(H))
    guided = policy.predict_action(obs, torch.Generator().manual_seed(3), noise.clone(), guide=empty)
    assert torch.equal(plain["action_pred"], guided["action_pred"])


def test_a_guide_of_the_wrong_shape_is_refused():
    policy = toy_policy(ddim(), num_inference_steps=2)
    with pytest.raises(ValueError, match=r"expected \(1, 15, 2\) / \(15,\)"):
        policy.predict_action({"obs": torch.randn(1, 2, 4)}, guide=(torch.zeros(1, 8, DA), np.zeros(8)))


# ----------------------------------------------------------------------------- eval.py
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, pusht_zarr_path):
    """One epoch of the smoke state run; rollouts of 2 test seeds."""
    run_dir = tmp_path_factory.mktemp("rt") / "run"
    args = [
        "train.py",
        "debug=smoke",
        f"task.dataset.zarr_path={pusht_zarr_path}",
        "training.num_epochs=1",
        "training.rollout_every=100",
        f"hydra.run.dir={run_dir}",
    ]
    assert_ok(run_cli(args))
    return run_dir / "checkpoints" / "latest.ckpt"


def per_seed(log: dict) -> dict:
    return {k: v for k, v in log.items() if "sim_max_reward_" in k}


@pytest.mark.needs_data
def test_every_mode_at_delay_zero_gives_todays_per_seed_scores(tiny_checkpoint, tmp_path):
    today = evaluate_in_process(tiny_checkpoint, tmp_path / "today", noise_seed=7, n_test=4)
    assert len(per_seed(today)) == 4
    for mode in ("sync", "async", "ensemble", "rtc"):
        log = evaluate_in_process(
            tiny_checkpoint, tmp_path / mode, noise_seed=7, n_test=4, execution=mode, delay=0, overlap=0
        )
        assert per_seed(log) == per_seed(today), mode
        assert (log["eval/execution"], log["eval/delay"], log["eval/overlap"]) == (mode, 0, 0)


@pytest.mark.needs_data
def test_eval_cli_records_delay_and_execution(tiny_checkpoint, tmp_path):
    out = tmp_path / "rtc"
    proc = run_cli(
        ["eval.py", "-c", str(tiny_checkpoint), "-o", str(out), "-d", "cpu", "--n-test", "2"]
        + ["--delay", "2", "--execution", "rtc", "--rtc-method", "inpaint"]
    )
    assert_ok(proc)
    log = json.loads((out / "eval_log.json").read_text())
    assert (log["eval/execution"], log["eval/delay"], log["eval/overlap"]) == ("rtc", 2, 7)
    assert log["eval/rtc_method"] == "inpaint"
    assert 0.0 <= log["test/mean_score"] <= 1.0 and len(per_seed(log)) == 2


@pytest.mark.needs_data
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--delay", "2"], "sync means the world waits"),
        (["--delay", "-1", "--execution", "async"], "delay=-1 must be an integer >= 0"),
        (["--delay", "8", "--execution", "async"], "at or past the executed horizon n_action_steps=8"),
        (["--delay", "2", "--execution", "rtc", "--overlap", "9"], "overlap=9 must be an integer from"),
    ],
)
def test_eval_cli_refuses_bad_combinations_in_one_line_and_writes_nothing(
    tiny_checkpoint, tmp_path, args, needle
):
    out = tmp_path / "never"
    proc = run_cli(["eval.py", "-c", str(tiny_checkpoint), "-o", str(out), "-d", "cpu", *args])
    assert_one_line_error(proc, needle, exit_code=2)
    assert not out.exists()


# ----------------------------------------------------------------------------- the real-time controller
class SimClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class GatedPolicy:
    """A chunked policy whose every inference after the first waits for the test to release it.

    ``started`` is set once inference has begun (the controller read its clock before calling), so the test
    can move the simulated clock without racing the inference thread. The first call takes ``first_latency``
    simulated seconds (the control loop waits for it)."""

    n_action_steps, n_obs_steps, chunk_start, chunk_length = S, 2, 1, H
    obs_shapes = {"obs": (4,)}

    def __init__(self, clock: SimClock, first_latency: float):
        self.clock, self.first_latency = clock, first_latency
        self.calls = 0
        self.windows = []
        self.started = threading.Event()
        self.release = threading.Event()

    def predict_action(self, obs_dict):
        self.windows.append(obs_dict["obs"].copy())
        call, self.calls = self.calls, self.calls + 1
        if call == 0:
            self.clock.t += self.first_latency
        else:
            self.started.set()
            assert self.release.wait(timeout=600), "the test never released the inference"
            self.release.clear()
        pred = np.concatenate([np.full((1, 1, DA), -1.0), chunk(call)], axis=1)
        return {"action": pred[:, 1 : 1 + S], "action_pred": pred}


def drive(controller, policy, clock, n_ticks, latency, hz=10.0):
    """Tick the controller at ``hz`` on the simulated clock; every inference after the first finishes
    ``latency`` seconds after it started. Returns the executed actions."""
    executed, pending = [], None
    for tick in range(n_ticks):
        now = tick / hz
        if pending is not None and now >= pending - 1e-9:
            clock.t = pending
            policy.release.set()
            assert controller.wait_idle(timeout=600)
            pending = None
        clock.t = now
        executed.append(controller.step(np.full(4, float(tick))).tolist())
        if tick > 0 and tick % S == 0:  # this step asked for a chunk: wait until its inference has begun
            assert policy.started.wait(timeout=600)
            policy.started.clear()
            pending = now + latency
    return executed


@pytest.mark.parametrize("latency, expected_delay", [(0.25, 3), (0.3, 3), (0.05, 1)])
def test_controller_derives_its_delay_from_the_measured_latency(latency, expected_delay):
    clock = SimClock()
    policy = GatedPolicy(clock, first_latency=0.0)
    with RealTimeController(policy, control_hz=10, execution="async", clock=clock) as controller:
        executed = drive(controller, policy, clock, n_ticks=3 * S, latency=latency)
        assert controller.latency_s == pytest.approx(latency)
        assert controller.delay_steps == expected_delay
        thread = controller._thread
    assert not thread.is_alive(), "stop() ends the inference thread"
    # the first chunk acts at once; each later one from the first tick after it arrived, at that index
    expected = [[0, k] for k in range(S)]
    for call in (1, 2):
        expected += [[call - 1, S + k] for k in range(expected_delay)]
        expected += [[call, k] for k in range(expected_delay, S)]
    assert executed == expected
    # the observation window handed to inference is the last n_obs_steps ticks' (the first repeated)
    assert policy.windows[0][0, :, 0].tolist() == [0, 0] and policy.windows[1][0, :, 0].tolist() == [7, 8]


def test_controller_ensembles_chunks_as_the_simulation_does():
    clock = SimClock()
    policy = GatedPolicy(clock, first_latency=0.0)
    with RealTimeController(policy, control_hz=10, execution="ensemble", clock=clock) as controller:
        executed = drive(controller, policy, clock, n_ticks=2 * S, latency=0.2)
    simulated = ChunkExecutor(ExecutionSpec("ensemble", 2, S, H), batch_size=1)
    expected = [simulated.execute(chunk(call), np.array([0]))[0].tolist() for call in (0, 1)]
    np.testing.assert_allclose(np.array(executed), np.array(expected[0] + expected[1]), rtol=0, atol=1e-12)


def test_controller_rtc_freezes_what_runs_during_inference():
    scheduler = ddim()
    policy = toy_policy(scheduler, GaussianDenoiser(scheduler), num_inference_steps=4)
    clock = SimClock()
    seen_guides = []
    original = policy.predict_action

    def timed_predict_action(obs, **kwargs):
        seen_guides.append(kwargs.get("guide"))
        clock.t += 0.2  # the control loop waits on the first call and is idle during the others (below)
        return original(obs, **kwargs)

    policy.predict_action = timed_predict_action
    with RealTimeController(policy, control_hz=10, execution="rtc", clock=clock) as controller:
        for tick in range(2 * S):
            assert controller.wait_idle(timeout=600)
            clock.t = max(clock.t, tick / 10)
            controller.step(np.zeros(4))
        assert controller.wait_idle(timeout=600)
        assert controller.delay_steps == 2
    assert seen_guides[0] is None, "nothing to follow before the first chunk"
    target, weights = seen_guides[1]
    assert weights[:2].tolist() == [1.0, 1.0] and 0 < weights[2] < 1 and weights[7:].sum() == 0


def test_controller_reports_an_inference_error_on_the_next_step():
    class Broken(GatedPolicy):
        def predict_action(self, obs_dict):
            raise ValueError("camera unplugged")

    controller = RealTimeController(
        Broken(SimClock(), 0.0), control_hz=10, execution="async", clock=SimClock()
    )
    with (
        controller,
        pytest.raises(RuntimeError, match="policy inference failed: ValueError: camera unplugged"),
    ):
        controller.step(np.zeros(4))


def test_controller_refuses_sync_and_rtc_without_torch():
    with pytest.raises(ValueError, match="stops the robot"):
        RealTimeController(GatedPolicy(SimClock(), 0.0), control_hz=10, execution="sync")
    with pytest.raises(ValueError, match="needs a torch policy"):
        RealTimeController(GatedPolicy(SimClock(), 0.0), control_hz=10, execution="rtc")


@pytest.mark.needs_data
def test_realtime_sweep_writes_cells_latency_and_plot(tiny_checkpoint, tmp_path):
    out = tmp_path / "sweep"
    args = ["-m", "benchmarks.realtime_sweep", "--ckpt", f"tiny={tiny_checkpoint}", "--delays", "0,2"]
    args += ["--modes", "sync,async,rtc", "--n-test", "2", "--latency-repeats", "1", "--threads", "1"]
    proc = run_cli([*args, "--out", str(out), "--plot", str(out / "delay.png")])
    assert_ok(proc)
    rows = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["delay"], r["overlap"]) for r in rows] == [
        ("sync", 0, 0),
        ("rtc", 0, 7),
        ("async", 2, 2),
        ("rtc", 2, 7),
    ]
    assert all(r["n_episodes"] == 2 for r in rows)
    latency = json.loads((out / "latency.json").read_text())["rows"]
    assert [r["backend"] for r in latency] == ["torch", "torch + rtc guidance", "onnxruntime", "openvino"]
    assert all(r["ms_b1"] > 0 and r["delay"] == math.ceil(r["ms_b1"] / 100 - 1e-9) for r in latency)
    assert (out / "delay.png").stat().st_size > 10_000
