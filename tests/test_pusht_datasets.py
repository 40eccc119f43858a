"""PushT lowdim and image datasets on the real demonstrations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from diffusion_policy.dataset.pusht_dataset import PushTLowdimDataset
from diffusion_policy.dataset.pusht_image_dataset import PushTImageDataset

pytestmark = pytest.mark.needs_data

HORIZON, PAD_BEFORE, PAD_AFTER = 16, 1, 7
SPLIT = {"seed": 42, "val_ratio": 0.02, "max_train_episodes": 90}
VAL_EPISODES = [18, 90, 134, 157]
WINDOW = {"horizon": HORIZON, "pad_before": PAD_BEFORE, "pad_after": PAD_AFTER}


@pytest.fixture(scope="module")
def raw(pusht_zarr_path):
    root = zarr.open_group(pusht_zarr_path, mode="r")
    return {
        "root": root,
        "ends": root["meta/episode_ends"][:],
        "state": root["data/state"][:],
        "action": root["data/action"][:],
        "keypoint": root["data/keypoint"][:],
    }


@pytest.fixture(scope="module")
def lowdim(pusht_zarr_path):
    return PushTLowdimDataset(pusht_zarr_path, **WINDOW, **SPLIT)


@pytest.fixture(scope="module")
def image(pusht_zarr_path):
    return PushTImageDataset(pusht_zarr_path, **WINDOW, **SPLIT)


def _window_rows(ends: np.ndarray, episodes: np.ndarray, idx: int) -> np.ndarray:
    """Global rows of window ``idx``, counted independently of the sampler's index table."""
    for ep in np.sort(episodes):
        start = int(ends[ep - 1]) if ep > 0 else 0
        length = int(ends[ep]) - start
        n_windows = length - HORIZON + PAD_BEFORE + PAD_AFTER + 1
        if idx < n_windows:
            return start + np.clip(idx - PAD_BEFORE + np.arange(HORIZON), 0, length - 1)
        idx -= n_windows
    raise IndexError(idx)


def _n_windows(ends, episodes) -> int:
    lengths = np.diff(ends, prepend=0)[episodes]
    return int((lengths - HORIZON + PAD_BEFORE + PAD_AFTER + 1).sum())


def test_lowdim_split_and_validation(lowdim, raw):
    assert lowdim.val_episodes.tolist() == VAL_EPISODES
    assert len(lowdim.train_episodes) == 90 and not set(lowdim.train_episodes) & set(VAL_EPISODES)
    assert len(lowdim) == 10_726
    val = lowdim.get_validation_dataset()
    assert len(val) == 404 == _n_windows(raw["ends"], VAL_EPISODES)
    assert len(lowdim) == 10_726  # the copy does not touch the training set


def test_lowdim_items(lowdim, raw):
    for idx in (0, 1, 117, len(lowdim) - 1):
        item = lowdim[idx]
        assert item["obs"].shape == (HORIZON, 20) and item["obs"].dtype == torch.float32
        assert item["action"].shape == (HORIZON, 2) and item["action"].dtype == torch.float32
        rows = _window_rows(raw["ends"], lowdim.train_episodes, idx)
        expected_obs = np.concatenate([raw["keypoint"][rows].reshape(HORIZON, 18), raw["state"][rows, :2]], 1)
        np.testing.assert_array_equal(item["obs"].numpy(), expected_obs)
        np.testing.assert_array_equal(item["action"].numpy(), raw["action"][rows])
    val = lowdim.get_validation_dataset()
    np.testing.assert_array_equal(
        val[403]["action"].numpy(), raw["action"][_window_rows(raw["ends"], np.array(VAL_EPISODES), 403)]
    )


def test_lowdim_normalizer_and_actions(lowdim):
    normalizer = lowdim.get_normalizer()
    assert sorted(normalizer.keys()) == ["action", "obs"]
    corners = normalizer.normalize({"action": torch.tensor([[12.0, 25.0], [511.0, 511.0]])})["action"]
    torch.testing.assert_close(corners, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    obs_stats = normalizer["obs"].get_input_stats()
    assert obs_stats["min"].shape == (20,)
    torch.testing.assert_close(obs_stats["min"][18:], torch.tensor([13.456, 32.938]), atol=1e-3, rtol=0)
    torch.testing.assert_close(obs_stats["max"][18:], torch.tensor([496.146, 510.958]), atol=1e-3, rtol=0)
    batch = torch.stack([lowdim[i]["obs"] for i in range(0, len(lowdim), 500)])
    normed = normalizer.normalize({"obs": batch})["obs"]
    assert normed.min() >= -1 - 1e-5 and normed.max() <= 1 + 1e-5
    gauss = lowdim.get_normalizer(mode="gaussian")
    assert gauss["action"].get_input_stats()["mean"].shape == (2,)
    actions = lowdim.get_all_actions()
    assert actions.shape == (25650, 2) and actions.dtype == torch.float32


def test_image_split_memory_and_normalizer(image, raw):
    assert image.val_episodes.tolist() == VAL_EPISODES
    assert len(image) == 10_726
    val = image.get_validation_dataset()
    assert len(val) == 404
    img = image.replay_buffer["img"]
    # Only the 94 used episodes are held, as uint8 HWC.
    assert image.replay_buffer.n_episodes == 94 and img.dtype == np.uint8 and img.shape[1:] == (96, 96, 3)
    assert img.shape[0] == np.diff(raw["ends"], prepend=0)[np.r_[image.train_episodes, VAL_EPISODES]].sum()
    assert img.nbytes < 0.7e9
    normalizer = image.get_normalizer()
    assert sorted(normalizer.keys()) == ["action", "agent_pos", "image"]
    corners = normalizer.normalize({"action": torch.tensor([[12.0, 25.0], [511.0, 511.0]])})["action"]
    torch.testing.assert_close(corners, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    torch.testing.assert_close(
        normalizer["agent_pos"].get_input_stats()["max"], torch.from_numpy(raw["state"][:, :2].max(0))
    )
    assert normalizer["image"].normalize(torch.ones(1, 3, 96, 96)).min().item() == 1.0
    assert image.get_all_actions().shape == (25650, 2)


def test_image_items_equal_raw_frames(image, raw):
    val = image.get_validation_dataset()
    for ds, episodes, idx in (
        (image, image.train_episodes, 0),
        (image, image.train_episodes, 5000),
        (val, np.array(VAL_EPISODES), 403),
    ):
        item = ds[idx]
        rows = _window_rows(raw["ends"], episodes, idx)
        frames = item["obs"]["image"]
        assert frames.shape == (HORIZON, 3, 96, 96) and frames.dtype == torch.float32
        assert frames.min() >= 0 and frames.max() <= 1
        expected = np.moveaxis(raw["root"]["data/img"][rows[0] : rows[-1] + 1], -1, 1) / np.float32(255)
        np.testing.assert_array_equal(frames.numpy(), expected[rows - rows[0]])
        agent_pos = item["obs"]["agent_pos"]
        assert agent_pos.shape == (HORIZON, 2) and agent_pos.dtype == torch.float32
        np.testing.assert_array_equal(agent_pos.numpy(), raw["state"][rows, :2])
        np.testing.assert_array_equal(item["action"].numpy(), raw["action"][rows])


def test_image_small_config_with_n_obs_steps(pusht_zarr_path, raw):
    small = PushTImageDataset(
        pusht_zarr_path, **WINDOW, seed=42, val_ratio=0.02, max_train_episodes=2, n_obs_steps=2
    )
    assert len(small.train_episodes) == 2 and small.replay_buffer.n_episodes == 6
    assert len(small) == _n_windows(raw["ends"], small.train_episodes)
    item = small[0]
    assert item["obs"]["image"].shape == (2, 3, 96, 96)
    assert item["obs"]["agent_pos"].shape == (HORIZON, 2) and item["action"].shape == (HORIZON, 2)
    rows = _window_rows(raw["ends"], small.train_episodes, 0)
    assert rows[0] == rows[1]  # the first window is padded before the episode
    expected = np.moveaxis(raw["root"]["data/img"][rows[0] : rows[0] + 1], -1, 1) / np.float32(255)
    np.testing.assert_array_equal(item["obs"]["image"].numpy(), np.concatenate([expected, expected]))


def test_bad_arguments(pusht_zarr_path, tmp_path):
    with pytest.raises(ValueError, match="n_obs_steps=3"):
        PushTImageDataset(pusht_zarr_path, horizon=2, n_obs_steps=3)
    with pytest.raises(ValueError, match="horizon=0"):
        PushTLowdimDataset(pusht_zarr_path, horizon=0)
    with pytest.raises(ValueError, match="max_train_episodes=0"):
        PushTLowdimDataset(pusht_zarr_path, max_train_episodes=0)
    with pytest.raises(FileNotFoundError, match="pusht.zip"):
        PushTImageDataset(str(tmp_path / "missing.zarr"))
    with pytest.raises(KeyError, match="'keypoints'"):
        PushTLowdimDataset(pusht_zarr_path, obs_key="keypoints")
