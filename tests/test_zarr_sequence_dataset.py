"""ZarrSequenceDataset (any zarr by shape_meta) and a task without a simulator.

The generic dataset on an imported robomimic file gives the same windows, normalizer and shuffled batches as
PushTImageDataset on the PushT zarr the file was written from; a task with ``env_runner: null`` trains,
reports validation loss and action error, and keeps its top-k checkpoints by validation loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_policy.common.replay_buffer import ReplayBuffer
from diffusion_policy.dataset.importers.robomimic import open_robomimic
from diffusion_policy.dataset.importers.writer import write_episodes
from diffusion_policy.dataset.pusht_image_dataset import PushTImageDataset
from diffusion_policy.dataset.zarr_sequence_dataset import ZarrSequenceDataset
from tests import format_fixtures as ff
from tests.helpers import assert_ok, assert_one_line_error, run_cli

N_EPISODES = 6
SHAPE_META = {
    "obs": {"image": {"shape": [3, 96, 96], "type": "rgb"}, "agent_pos": {"shape": [2], "type": "low_dim"}},
    "action": {"shape": [2]},
}
WINDOW = {"horizon": 16, "pad_before": 1, "pad_after": 7, "n_obs_steps": 2, "seed": 42}


@pytest.fixture(scope="module")
def pusht_subset(pusht_zarr_path, tmp_path_factory) -> Path:
    """The first episodes of the real PushT zarr, in its own layout (float32 img)."""
    src = ReplayBuffer.create_from_path(pusht_zarr_path, mode="r")
    end = int(src.episode_ends[N_EPISODES - 1])
    data = {k: np.asarray(src[k][:end]) for k in ("img", "state", "action", "keypoint")}
    buffer = ReplayBuffer({"data": data, "meta": {"episode_ends": src.episode_ends[:N_EPISODES].copy()}})
    path = tmp_path_factory.mktemp("subset") / "pusht_subset.zarr"
    buffer.save_to_path(path)
    return path


@pytest.fixture(scope="module")
def imported(pusht_subset, tmp_path_factory) -> Path:
    """That subset written as a robomimic file, PushT's validation episode as mask/valid, imported back."""
    reference = PushTImageDataset(str(pusht_subset), val_ratio=0.2, max_train_episodes=4, **WINDOW)
    tmp = tmp_path_factory.mktemp("imported")
    ff.write_robomimic(
        tmp / "pusht.hdf5", ff.pusht_episodes(str(pusht_subset), N_EPISODES), list(reference.val_episodes)
    )
    write_episodes(open_robomimic(tmp / "pusht.hdf5"), tmp / "pusht.zarr")
    return tmp / "pusht.zarr"


def assert_same_sample(a: dict, b: dict) -> None:
    assert a["obs"].keys() == b["obs"].keys()
    for key in a["obs"]:
        torch.testing.assert_close(a["obs"][key], b["obs"][key], rtol=0, atol=0)
    torch.testing.assert_close(a["action"], b["action"], rtol=0, atol=0)


@pytest.mark.needs_data
@pytest.mark.parametrize("use_file_split", [True, False])
def test_same_split_as_pusht(pusht_subset, imported, use_file_split):
    """The file's split (mask/valid) and a split drawn with the same seed both give PushT's episodes."""
    reference = PushTImageDataset(str(pusht_subset), val_ratio=0.2, max_train_episodes=4, **WINDOW)
    generic = ZarrSequenceDataset(
        str(imported),
        SHAPE_META,
        val_ratio=0.2,
        max_train_episodes=4,
        use_file_split=use_file_split,
        **WINDOW,
    )
    np.testing.assert_array_equal(generic.train_mask, reference.train_mask)
    np.testing.assert_array_equal(generic.val_mask, reference.val_mask)
    assert reference.val_mask.sum() > 0 and reference.train_mask.sum() == 4


@pytest.mark.needs_data
def test_same_windows_normalizer_and_batches_as_pusht(pusht_subset, imported):
    reference = PushTImageDataset(str(pusht_subset), val_ratio=0.2, max_train_episodes=4, **WINDOW)
    generic = ZarrSequenceDataset(str(imported), SHAPE_META, val_ratio=0.2, max_train_episodes=4, **WINDOW)
    assert len(generic) == len(reference) > 0
    # shuffled batches as the training loop draws them (its data generator is seeded with training.seed);
    # one pass covers every training window
    loaders = [
        torch.utils.data.DataLoader(
            ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(42)
        )
        for ds in (reference, generic)
    ]
    for ref_batch, gen_batch in zip(*loaders, strict=True):
        assert_same_sample(gen_batch, ref_batch)
    ref_val, gen_val = reference.get_validation_dataset(), generic.get_validation_dataset()
    assert len(gen_val) == len(ref_val) > 0
    for i in range(0, len(ref_val), 7):
        assert_same_sample(gen_val[i], ref_val[i])
    ref_state = reference.get_normalizer().state_dict()
    gen_state = generic.get_normalizer().state_dict()
    assert ref_state.keys() == gen_state.keys()
    for key, value in ref_state.items():
        torch.testing.assert_close(gen_state[key], value, rtol=0, atol=0)
    torch.testing.assert_close(generic.get_all_actions(), reference.get_all_actions())


def test_any_number_of_rgb_and_low_dim_keys(tmp_path):
    rng = np.random.default_rng(0)
    lengths = [12, 9, 15]
    buffer = ReplayBuffer.create_empty_numpy()
    for n in lengths:
        buffer.add_episode(
            {
                "front": rng.integers(0, 256, (n, 32, 40, 3), dtype=np.uint8),
                "wrist": rng.integers(0, 256, (n, 24, 24, 3), dtype=np.uint8),
                "joints": rng.normal(size=(n, 7)).astype(np.float32),
                "keypoint": rng.normal(size=(n, 4, 2)).astype(np.float32),
                "action": rng.normal(size=(n, 7)).astype(np.float32),
            }
        )
    buffer.update_meta({"val_mask": np.array([False, True, False])})
    path = tmp_path / "multi.zarr"
    buffer.save_to_path(path)
    meta = {
        "obs": {
            "front": {"shape": [3, 32, 40], "type": "rgb"},
            "wrist": {"shape": [3, 24, 24], "type": "rgb"},
            "joints": {"shape": [7], "type": "low_dim"},
            "keypoint": {"shape": [4, 2], "type": "low_dim"},
        },
        "action": {"shape": [7]},
    }
    ds = ZarrSequenceDataset(str(path), meta, horizon=8, pad_before=1, pad_after=3, n_obs_steps=2)
    assert list(ds.val_episodes) == [1] and list(ds.train_episodes) == [0, 2]  # the file's split
    assert len(ds) == (12 - 8 + 5) + (15 - 8 + 5)
    sample = ds[3]
    assert sample["obs"]["front"].shape == (2, 3, 32, 40) and sample["obs"]["wrist"].shape == (2, 3, 24, 24)
    assert sample["obs"]["joints"].shape == (8, 7) and sample["obs"]["keypoint"].shape == (8, 4, 2)
    assert sample["action"].shape == (8, 7) and sample["obs"]["front"].dtype == torch.float32
    # window 3 of episode 0 starts at step 2 (one padded step before the episode): frames 2, 3 in CHW / 255
    np.testing.assert_allclose(
        sample["obs"]["front"][0].numpy(), np.moveaxis(buffer["front"][2], -1, 0) / 255.0
    )
    np.testing.assert_array_equal(sample["obs"]["joints"].numpy(), buffer["joints"][2:10])
    assert ds.replay_buffer["front"].dtype == np.uint8
    normalizer = ds.get_normalizer()
    assert set(normalizer.params_dict) == {"front", "wrist", "joints", "keypoint", "action"}


@pytest.mark.needs_data
def test_shape_meta_that_does_not_fit_the_file(imported):
    missing = {**SHAPE_META, "obs": {**SHAPE_META["obs"], "wrist": {"shape": [3, 96, 96], "type": "rgb"}}}
    with pytest.raises(ValueError, match=r"data/wrist is missing \(shape_meta names it\)"):
        ZarrSequenceDataset(str(imported), missing)
    wrong = {**SHAPE_META, "obs": {**SHAPE_META["obs"], "image": {"shape": [96, 96, 3], "type": "rgb"}}}
    with pytest.raises(ValueError, match=r"rgb frames are stored \(H, W, C\)"):
        ZarrSequenceDataset(str(imported), wrong)


# ---------------------------------------------------------------- a task without a simulator
def no_sim_args(zarr: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train.py",
        "--config-name=train_diffusion_unet_hybrid_workspace",
        "task=custom_zarr",
        "debug=smoke_no_sim",
        f"task.dataset.zarr_path={zarr}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@pytest.mark.needs_data
def test_task_without_simulator_trains_validates_and_keeps_topk(imported, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(no_sim_args(imported, run_dir, "training.num_epochs=3", "checkpoint.topk.k=2"))
    assert_ok(proc)
    epochs = [json.loads(ln) for ln in (run_dir / "logs.json.txt").read_text().splitlines()]
    epochs = [e for e in epochs if "val_loss" in e]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    for e in epochs:
        assert np.isfinite(e["val_loss"]) and np.isfinite(e["val_action_mse_error"])
        assert not any(k.startswith("test") for k in e)
    best = sorted(epochs, key=lambda e: e["val_loss"])[:2]
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("epoch=*.ckpt"))
    assert kept == sorted(f"epoch={e['epoch']:04d}-val_loss={e['val_loss']:.4f}.ckpt" for e in best)
    assert (run_dir / "checkpoints" / "latest.ckpt").is_file()
    proc = run_cli(
        ["eval.py", "-c", str(run_dir / "checkpoints" / "latest.ckpt"), "-o", str(tmp_path / "eval")]
    )
    assert_one_line_error(proc, "no simulator (task.env_runner: null)")
    assert not (tmp_path / "eval").exists()


@pytest.mark.needs_data
def test_task_without_simulator_refuses_test_metrics_and_rollout_settings(imported, tmp_path):
    proc = run_cli(no_sim_args(imported, tmp_path / "a", "checkpoint.topk.monitor_key=test_mean_score"))
    assert_one_line_error(proc, "checkpoint.topk.monitor_key=test_mean_score", "task.env_runner is null")
    proc = run_cli([*no_sim_args(imported, tmp_path / "b"), "debug=smoke_image"])
    assert_one_line_error(proc, "no _target_", "debug=smoke_no_sim")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
