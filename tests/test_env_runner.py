"""PushT runners: scores, n_envs independence, videos, worker failures, wrappers (real dataset)."""

from __future__ import annotations

import os

import av
import numpy as np
import pytest
import torch
import zarr

from diffusion_policy.env.pusht.pusht_env import PushTEnv
from diffusion_policy.env_runner.pusht_image_runner import PushTImageRunner
from diffusion_policy.env_runner.pusht_keypoints_runner import PushTKeypointsRunner
from diffusion_policy.gym_util.multistep_wrapper import MultiStepWrapper

TRAIN_SEEDS = range(6)
N_OBS, N_ACT = 2, 8


@pytest.fixture(scope="module")
def demos(pusht_zarr_path):
    root = zarr.open_group(pusht_zarr_path, mode="r")
    ends = root["meta/episode_ends"][:7]
    starts = np.concatenate([[0], ends[:-1]])
    state = root["data/state"][: ends[-1]]
    action = root["data/action"][: ends[-1]]
    return [{"state": state[s:e], "action": action[s:e]} for s, e in zip(starts, ends)]


class ReplayPolicy:
    """Plays back the recorded actions of demos 0..5, chunk by chunk, from what the runner hands it.

    It never peeks at runner internals: on the first call after ``reset`` each row is identified by its
    observed agent position, which equals exactly one demo's first recorded state (seed i reproduces
    demo i). Later calls identify rows through ``past_action`` (runner built with past_action=True): the
    last action it sent to a row is unique to that row's demo. This stays correct while finished episodes
    drop out of the batch. Past the end of a demo it repeats the demo's last action.
    """

    def __init__(self, demos, n_action_steps):
        self.demos = demos
        self.n_action_steps = n_action_steps
        self.device = torch.device("cpu")
        self.reset()

    def reset(self):
        self.counter = {}  # demo index -> next step
        self.last_sent = {}  # demo index -> last action sent (float32)

    def _identify(self, obs_dict):
        rows = []
        if "past_action" not in obs_dict:
            agent_pos = obs_dict["obs"][:, -1, 18:20].numpy()
            for pos in agent_pos:
                dist = [np.abs(d["state"][0, :2] - pos).max() for d in self.demos]
                ep = int(np.argmin(dist))
                assert dist[ep] < 1e-3, f"observation {pos} matches no demo start"
                rows.append(ep)
        else:
            for last in obs_dict["past_action"][:, -1].numpy():
                eps = [ep for ep, sent in self.last_sent.items() if np.array_equal(sent, last)]
                assert len(eps) == 1, f"past action {last} identifies {eps}"
                rows.append(eps[0])
        assert len(set(rows)) == len(rows), "two rows claim the same demo"
        return rows

    def predict_action(self, obs_dict):
        rows = self._identify(obs_dict)
        out = np.zeros((len(rows), self.n_action_steps, 2), dtype=np.float32)
        for i, ep in enumerate(rows):
            actions = self.demos[ep]["action"]
            t = self.counter.get(ep, 0)
            idx = np.minimum(np.arange(t, t + self.n_action_steps), len(actions) - 1)
            out[i] = actions[idx]
            self.counter[ep] = t + self.n_action_steps
            self.last_sent[ep] = out[i, -1].copy()
        return {"action": torch.from_numpy(out)}


class HashPolicy:
    """Deterministic, random-looking policy: each row's actions depend only on that row's observation."""

    def __init__(self, key="obs", n_action_steps=N_ACT, bad_value=None):
        self.key = key
        self.n_action_steps = n_action_steps
        self.bad_value = bad_value
        self.device = torch.device("cpu")

    def reset(self):
        pass

    def predict_action(self, obs_dict):
        x = obs_dict[self.key].reshape(len(obs_dict[self.key]), -1).double()
        phase = (x * (torch.arange(x.shape[1], dtype=torch.float64) * 0.37 + 0.1)).sum(-1, keepdim=True)
        t = torch.arange(self.n_action_steps, dtype=torch.float64)
        action = torch.stack(
            [256 + 200 * torch.sin(phase * 0.01 + t * 0.3), 256 + 200 * torch.cos(phase * 0.013 + t * 0.2)],
            -1,
        ).float()
        if self.bad_value is not None:
            action[-1] = self.bad_value
        return {"action": action}


class RecordingPolicy(HashPolicy):
    """HashPolicy that records the shapes and dtypes of every input it receives."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def predict_action(self, obs_dict):
        self.seen.append({k: (tuple(v.shape), v.dtype) for k, v in obs_dict.items()})
        return super().predict_action(obs_dict)


def direct_replay(actions, seed, max_steps):
    """Max reward, success and step count of an open-loop replay in a plain env (the reference)."""
    env = PushTEnv(legacy=True, render_mode=None)
    env.reset(seed=seed)
    best, n = 0.0, 0
    for k in range(max_steps):
        _, reward, terminated, _, _ = env.step(actions[min(k, len(actions) - 1)])
        best, n = max(best, reward), k + 1
        if terminated:
            return best, True, n
    return best, False, n


def n_video_frames(path):
    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


def keypoint_runner(tmp_path, **kwargs):
    args = {
        "output_dir": str(tmp_path), "n_train": 6, "n_train_vis": 0, "train_start_seed": 0, "n_test": 0,
        "n_test_vis": 0, "legacy_test": True, "max_steps": 300, "n_obs_steps": N_OBS, "n_action_steps": N_ACT,
        "n_envs": 1, "tqdm_interval_sec": 60,
    }  # fmt: skip
    args.update(kwargs)
    return PushTKeypointsRunner(**args)


@pytest.mark.needs_data
def test_replay_policy_scores_the_demonstrations_max_rewards(demos, tmp_path):
    # one runner per demo with max_steps = demo length: the rollout is exactly the demonstration
    for seed in TRAIN_SEEDS:
        length = len(demos[seed]["action"])
        runner = keypoint_runner(
            tmp_path, n_train=1, train_start_seed=seed, max_steps=length, past_action=True
        )
        log = runner.run(ReplayPolicy(demos, N_ACT))
        runner.close()
        # the demonstration's max reward: replaying exactly its recorded actions in a plain env
        expected, _, _ = direct_replay(demos[seed]["action"], seed, length)
        assert log[f"train/sim_max_reward_{seed}"] == expected
        assert 0.9 < expected <= 1.0


@pytest.mark.needs_data
def test_batched_replay_and_videos(demos, tmp_path):
    # all six demos at once (300 steps, the last action held after a demo ends), with videos for two;
    # finished episodes leave the batch, which the policy's row identification would catch
    runner = keypoint_runner(tmp_path, n_train_vis=2, past_action=True)
    log = runner.run(ReplayPolicy(demos, N_ACT))
    runner.close()
    ref = [direct_replay(demos[s]["action"], s, 300) for s in TRAIN_SEEDS]
    for seed, (best, _, _) in zip(TRAIN_SEEDS, ref):
        assert log[f"train/sim_max_reward_{seed}"] == best
    assert log["train/mean_score"] == pytest.approx(np.mean([r[0] for r in ref]))
    assert log["train/success_rate"] == pytest.approx(np.mean([r[1] for r in ref]))
    assert "test/mean_score" not in log  # no test episodes requested
    for seed in (0, 1):
        path = log[f"train/sim_video_{seed}"]
        assert isinstance(path, str) and path.startswith(os.path.join(str(tmp_path), "media"))
        assert path.endswith(".mp4")
        assert n_video_frames(path) == ref[seed][2]
    assert "train/sim_video_2" not in log


def test_scores_do_not_depend_on_n_envs(tmp_path):
    kwargs = {
        "n_train": 2,
        "n_test": 3,
        "test_start_seed": 100000,
        "max_steps": 48,
        "n_train_vis": 1,
        "n_test_vis": 0,
    }
    logs = {}
    for n_envs in (1, 2):
        runner = keypoint_runner(tmp_path / f"n{n_envs}", n_envs=n_envs, **kwargs)
        assert runner.n_envs == n_envs
        logs[n_envs] = runner.run(HashPolicy())
        runner.close()
    scores = {n: {k: v for k, v in log.items() if "video" not in k} for n, log in logs.items()}
    assert scores[1] == scores[2]
    assert set(scores[1]) == {
        "train/sim_max_reward_0", "train/sim_max_reward_1", "test/sim_max_reward_100000",
        "test/sim_max_reward_100001", "test/sim_max_reward_100002", "train/mean_score", "test/mean_score",
        "train/success_rate", "test/success_rate",
    }  # fmt: skip
    assert len({v for k, v in scores[1].items() if "sim_max_reward" in k}) > 1  # not a constant policy
    for log in logs.values():
        assert n_video_frames(log["train/sim_video_0"]) == 48


def test_image_runner_parallel_matches_in_process(tmp_path):
    kwargs = {
        "n_train": 1, "n_train_vis": 1, "n_test": 2, "n_test_vis": 1, "legacy_test": True,
        "test_start_seed": 100000, "max_steps": 24, "n_obs_steps": N_OBS, "n_action_steps": N_ACT,
        "tqdm_interval_sec": 60,
    }  # fmt: skip
    logs = {}
    for n_envs in (1, 2):
        runner = PushTImageRunner(output_dir=str(tmp_path / f"n{n_envs}"), n_envs=n_envs, **kwargs)
        policy = RecordingPolicy(key="agent_pos")
        logs[n_envs] = runner.run(policy)
        runner.close()
        assert policy.seen[0] == {
            "image": ((3, N_OBS, 3, 96, 96), torch.float32),
            "agent_pos": ((3, N_OBS, 2), torch.float32),
        }
    for key in ("train/sim_max_reward_0", "test/sim_max_reward_100000", "test/sim_max_reward_100001"):
        assert logs[1][key] == logs[2][key]
    for log in logs.values():
        for key in ("train/sim_video_0", "test/sim_video_100000"):
            assert n_video_frames(log[key]) == 24
        assert "test/sim_video_100001" not in log


def test_lowdim_policy_inputs_and_latency(tmp_path):
    runner = keypoint_runner(tmp_path, n_train=2, max_steps=16, n_latency_steps=1)
    policy = RecordingPolicy(n_action_steps=N_ACT + 1)
    runner.run(policy)
    runner.close()
    seen = policy.seen
    assert seen[0] == {"obs": ((2, N_OBS, 20), torch.float32), "obs_mask": ((2, N_OBS, 20), torch.bool)}
    assert len(seen) == 2  # 16 steps / 8 executed actions per call (the first of 9 is dropped)


def test_videos_of_a_reused_runner_are_not_overwritten(tmp_path):
    runner = keypoint_runner(tmp_path, n_train=1, n_train_vis=1, max_steps=8)
    first = runner.run(HashPolicy())["train/sim_video_0"]
    second = runner.run(HashPolicy())["train/sim_video_0"]
    runner.close()
    again = keypoint_runner(tmp_path, n_train=1, n_train_vis=1, max_steps=8)
    third = again.run(HashPolicy())["train/sim_video_0"]
    again.close()
    assert len({first, second, third}) == 3
    assert all(os.path.exists(p) for p in (first, second, third))


def test_failing_worker_fails_the_run_with_its_message(tmp_path):
    runner = keypoint_runner(tmp_path, n_train=2, n_test=2, max_steps=16, n_envs=2)
    with pytest.raises(RuntimeError) as err:
        runner.run(HashPolicy(bad_value=1e6))  # the last row's actions are absurd -> env raises
    message = str(err.value)
    assert "out of range" in message and "pusht_env.py" in message  # worker's message and traceback
    # the runner recovers: the next run starts fresh workers
    log = runner.run(HashPolicy())
    runner.close()
    fresh = keypoint_runner(tmp_path, n_train=2, n_test=2, max_steps=16, n_envs=2)
    expected = fresh.run(HashPolicy())
    fresh.close()
    assert log["test/mean_score"] == expected["test/mean_score"], "the recovered runner scores as a fresh one"


def test_bad_policy_output_and_arguments(tmp_path):
    runner = keypoint_runner(tmp_path, n_train=2, max_steps=8)

    class WrongBatch(HashPolicy):
        def predict_action(self, obs_dict):
            return {"action": super().predict_action(obs_dict)["action"][:1]}

    with pytest.raises(RuntimeError, match="shape"):
        runner.run(WrongBatch())
    with pytest.raises(RuntimeError, match="finite"):
        runner.run(HashPolicy(bad_value=float("nan")))
    runner.close()
    with pytest.raises(ValueError, match="n_obs_steps"):
        keypoint_runner(tmp_path, n_obs_steps=0)
    with pytest.raises(ValueError, match="n_train"):
        keypoint_runner(tmp_path, n_train=0, n_test=0)
    with pytest.raises(ValueError, match="n_envs"):
        keypoint_runner(tmp_path, n_envs=0)


def test_multistep_wrapper_contract():
    env = MultiStepWrapper(
        PushTEnv(legacy=True, render_mode=None), n_obs_steps=3, n_action_steps=4, max_episode_steps=6
    )
    obs, _ = env.reset(seed=0)
    assert obs.shape == (3, 5) and np.array_equal(obs[0], obs[2])  # padded by repeating the first obs
    chunk = np.tile([[300.0, 300.0]], (4, 1))
    obs, reward, terminated, truncated, _ = env.step(chunk)
    assert not (terminated or truncated) and len(env.reward) == 4
    assert not np.array_equal(obs[1], obs[2])
    obs, reward2, terminated, truncated, _ = env.step(chunk)
    assert truncated and len(env.reward) == 6  # stops at max_episode_steps mid-chunk
    assert reward2 == max(env.reward)  # aggregated as max over the whole episode
    with pytest.raises(RuntimeError, match="reset"):
        env.step(chunk)
    with pytest.raises(ValueError, match="chunk"):
        env.reset(seed=0)
        env.step(np.array([1.0, 2.0]))
