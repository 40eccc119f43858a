"""Sequence windows, edge padding, episode masks and the train/val split."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from diffusion_policy.common.replay_buffer import ReplayBuffer
from diffusion_policy.common.sampler import (
    SequenceSampler,
    create_indices,
    downsample_mask,
    get_val_mask,
    split_episodes,
)

LENGTHS = (5, 9, 3, 12)


def _step_buffer(lengths=LENGTHS) -> ReplayBuffer:
    """Buffer whose data is the global step index, so windows show exactly which rows they read."""
    rb = ReplayBuffer.create_empty_numpy()
    start = 0
    for n in lengths:
        steps = np.arange(start, start + n)
        rb.add_episode({"step": steps, "pair": np.stack([steps, -steps], axis=1).astype(np.float32)})
        start += n
    return rb


def _expected_windows(lengths, seq, pad_before, pad_after, mask=None):
    """Brute force: every start offset in [-pad_before, L - seq + pad_after], rows clipped to the episode."""
    out = []
    start = 0
    for i, n in enumerate(lengths):
        if mask is None or mask[i]:
            for offset in range(-pad_before, n - seq + pad_after + 1):
                out.append(start + np.clip(offset + np.arange(seq), 0, n - 1))
        start += n
    return out


@pytest.mark.parametrize(("seq", "pad_before", "pad_after"), [(4, 0, 0), (4, 1, 2), (6, 2, 5), (1, 0, 0)])
def test_windows_match_brute_force(seq, pad_before, pad_after):
    rb = _step_buffer()
    sampler = SequenceSampler(rb, seq, pad_before=pad_before, pad_after=pad_after)
    expected = _expected_windows(LENGTHS, seq, pad_before, pad_after)
    assert len(sampler) == len(expected)
    for i, rows in enumerate(expected):
        sample = sampler.sample_sequence(i)
        np.testing.assert_array_equal(sample["step"], rows)
        np.testing.assert_array_equal(sample["pair"][:, 1], -rows.astype(np.float32))


def test_windows_per_episode_and_edge_replication():
    seq, pad_before, pad_after = 4, 1, 2
    idx = create_indices(np.cumsum(LENGTHS), seq, np.ones(len(LENGTHS), bool), pad_before, pad_after)
    episode_of_row = np.searchsorted(np.cumsum(LENGTHS), idx[:, 0], side="right")
    counts = np.bincount(episode_of_row, minlength=len(LENGTHS))
    np.testing.assert_array_equal(counts, [n - seq + pad_before + pad_after + 1 for n in LENGTHS])

    sampler = SequenceSampler(_step_buffer(), seq, pad_before=pad_before, pad_after=pad_after)
    # First window of episode 1 (rows 5..13): starts one step early, frame 0 repeated.
    first = sampler.sample_sequence(counts[0])["step"]
    np.testing.assert_array_equal(first, [5, 5, 6, 7])
    # Last window of episode 1 runs pad_after steps past the end, last frame repeated.
    last = sampler.sample_sequence(counts[0] + counts[1] - 1)["step"]
    np.testing.assert_array_equal(last, [12, 13, 13, 13])
    np.testing.assert_array_equal(idx[counts[0]], [5, 8, 1, 4])


def test_episode_mask_and_short_episodes():
    mask = np.array([False, True, False, True])
    sampler = SequenceSampler(_step_buffer(), 4, pad_before=1, pad_after=2, episode_mask=mask)
    expected = _expected_windows(LENGTHS, 4, 1, 2, mask)
    assert len(sampler) == len(expected)
    all_rows = np.concatenate([sampler.sample_sequence(i)["step"] for i in range(len(sampler))])
    assert set(all_rows) <= set(range(5, 14)) | set(range(17, 29))
    # Episodes shorter than the window minus the pads give no windows.
    assert len(SequenceSampler(_step_buffer(), 8, episode_mask=np.array([False, False, True, False]))) == 0
    assert len(SequenceSampler(_step_buffer(), 4, episode_mask=np.zeros(4, bool))) == 0
    with pytest.raises(ValueError, match="episode_mask"):
        create_indices(np.array([3, 5]), 2, np.ones(3, bool))


def test_pads_are_clamped_to_sequence_length():
    seq = 3
    clamped = create_indices(np.array([6]), seq, np.ones(1, bool), pad_before=10, pad_after=10)
    direct = create_indices(np.array([6]), seq, np.ones(1, bool), pad_before=seq - 1, pad_after=seq - 1)
    np.testing.assert_array_equal(clamped, direct)


def test_key_first_k_returns_leading_window_steps():
    rb = _step_buffer()
    full = SequenceSampler(rb, 6, pad_before=2, pad_after=5, keys=["step", "pair"])
    first_k = SequenceSampler(
        rb, 6, pad_before=2, pad_after=5, keys=["step", "pair"], key_first_k={"step": 2}
    )
    assert len(full) == len(first_k)
    for i in range(len(full)):
        a, b = full.sample_sequence(i), first_k.sample_sequence(i)
        assert b["step"].shape == (2,)
        np.testing.assert_array_equal(b["step"], a["step"][:2])
        np.testing.assert_array_equal(b["pair"], a["pair"])
    with pytest.raises(ValueError, match="key_first_k"):
        SequenceSampler(rb, 6, keys=["pair"], key_first_k={"step": 2})
    with pytest.raises(KeyError, match="'nope'"):
        SequenceSampler(rb, 6, keys=["nope"])


def test_zarr_backend_samples_equal_numpy():
    numpy_rb = _step_buffer()
    zarr_rb = numpy_rb.save_to_store(zarr.storage.MemoryStore())
    a = SequenceSampler(numpy_rb, 5, pad_before=1, pad_after=4)
    b = SequenceSampler(zarr_rb, 5, pad_before=1, pad_after=4)
    for i in range(0, len(a), 3):
        np.testing.assert_array_equal(a.sample_sequence(i)["pair"], b.sample_sequence(i)["pair"])


def test_val_mask_and_downsample():
    assert not get_val_mask(10, 0.0).any()
    assert get_val_mask(10, 0.01).sum() == 1  # at least one
    assert get_val_mask(10, 0.99).sum() == 9  # at most n - 1
    np.testing.assert_array_equal(get_val_mask(50, 0.1, seed=3), get_val_mask(50, 0.1, seed=3))
    assert get_val_mask(50, 0.1, seed=3).sum() == 5
    mask = np.zeros(20, bool)
    mask[::2] = True
    down = downsample_mask(mask, 4, seed=1)
    assert down.sum() == 4 and not (down & ~mask).any()
    np.testing.assert_array_equal(downsample_mask(mask, None), mask)
    np.testing.assert_array_equal(downsample_mask(mask, 50), mask)
    with pytest.raises(ValueError, match="val_ratio=1.0"):
        split_episodes(10, 1.0, None, 0)


@pytest.mark.needs_data
def test_pusht_split_numbers(pusht_zarr_path):
    episode_ends = zarr.open_group(pusht_zarr_path, mode="r")["meta/episode_ends"][:]
    train_mask, val_mask = split_episodes(len(episode_ends), 0.02, 90, seed=42)
    assert np.nonzero(val_mask)[0].tolist() == [18, 90, 134, 157]
    assert train_mask.sum() == 90 and not (train_mask & val_mask).any()
    train = create_indices(episode_ends, 16, train_mask, pad_before=1, pad_after=7)
    val = create_indices(episode_ends, 16, val_mask, pad_before=1, pad_after=7)
    assert len(train) == 10_726
    assert len(val) == 404
