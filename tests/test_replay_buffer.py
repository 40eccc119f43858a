"""ReplayBuffer on zarr 3: episodes in and out, zarr v2 writing, layout validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from diffusion_policy.common.replay_buffer import ReplayBuffer


def _episode(length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "obs": rng.normal(size=(length, 3, 2)).astype(np.float32),
        "action": rng.integers(0, 100, size=(length, 2)).astype(np.int64),
    }


def _make(backend: str) -> ReplayBuffer:
    return ReplayBuffer.create_empty_numpy() if backend == "numpy" else ReplayBuffer.create_empty_zarr()


def _assert_same(a: ReplayBuffer, b: ReplayBuffer) -> None:
    assert sorted(a.keys()) == sorted(b.keys())
    np.testing.assert_array_equal(a.episode_ends, b.episode_ends)
    for key in a:
        x, y = np.asarray(a[key][:]), np.asarray(b[key][:])
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("backend", ["numpy", "zarr"])
def test_add_get_drop_pop_episode(backend):
    rb = _make(backend)
    assert rb.backend == backend and rb.n_episodes == 0 and rb.n_steps == 0
    episodes = [_episode(n, seed) for seed, n in enumerate((5, 3, 7))]
    for ep in episodes:
        rb.add_episode(ep)
    assert rb.n_episodes == 3 and rb.n_steps == 15
    np.testing.assert_array_equal(rb.episode_ends, [5, 8, 15])
    np.testing.assert_array_equal(rb.episode_lengths, [5, 3, 7])
    np.testing.assert_array_equal(rb.get_episode_idxs(), [0] * 5 + [1] * 3 + [2] * 7)
    for i, ep in enumerate(episodes):
        got = rb.get_episode(i)
        for key in ep:
            np.testing.assert_array_equal(got[key], ep[key])
    np.testing.assert_array_equal(rb.get_episode(-2)["obs"], episodes[1]["obs"])
    assert rb.get_episode_slice(2) == slice(8, 15)

    popped = rb.pop_episode()
    np.testing.assert_array_equal(popped["action"], episodes[2]["action"])
    assert rb.n_episodes == 2 and rb["obs"].shape == (8, 3, 2)
    rb.drop_episode()
    assert rb.n_episodes == 1 and rb.n_steps == 5 and rb["action"].shape == (5, 2)
    rb.add_episode(episodes[2])
    np.testing.assert_array_equal(rb.episode_ends, [5, 12])
    np.testing.assert_array_equal(rb.get_episode(1)["obs"], episodes[2]["obs"])
    with pytest.raises(IndexError, match="out of range"):
        rb.get_episode(2)


@pytest.mark.parametrize("backend", ["numpy", "zarr"])
def test_add_episode_rejects_bad_input(backend):
    rb = _make(backend)
    rb.add_episode(_episode(4, 0))
    with pytest.raises(ValueError, match="one length"):
        rb.add_episode({"obs": np.zeros((3, 3, 2)), "action": np.zeros((4, 2))})
    with pytest.raises(ValueError, match="differ from the buffer's keys"):
        rb.add_episode({"obs": np.zeros((3, 3, 2))})
    with pytest.raises(ValueError, match="per-step shape"):
        rb.add_episode({"obs": np.zeros((3, 4)), "action": np.zeros((3, 2))})
    assert rb.n_episodes == 1 and rb.n_steps == 4


def test_numpy_get_episode_copy_is_independent():
    rb = ReplayBuffer.create_empty_numpy()
    rb.add_episode(_episode(4, 0))
    ep = rb.get_episode(0, copy=True)
    ep["obs"][:] = 0
    assert np.any(rb["obs"][:] != 0)


def test_save_writes_compressed_zarr_v2_and_reads_back(tmp_path):
    rb = ReplayBuffer.create_empty_numpy()
    for seed, n in enumerate((6, 9, 4)):
        rb.add_episode(_episode(n, seed))
    path = tmp_path / "buf.zarr"
    on_disk = rb.save_to_path(path, chunks={"obs": (5, 3, 2)})
    assert on_disk.backend == "zarr"

    # Plain zarr v2 metadata files, readable by zarr 2 (the original's tooling).
    assert (path / ".zgroup").exists() and not (path / "zarr.json").exists()
    meta = json.loads((path / "data" / "obs" / ".zarray").read_text())
    assert meta["zarr_format"] == 2 and meta["chunks"] == [5, 3, 2]
    assert meta["compressor"]["id"] == "blosc"
    assert meta["compressor"]["cname"] == "zstd" and meta["compressor"]["shuffle"] == 2  # bit-shuffle
    ends_meta = json.loads((path / "meta" / "episode_ends" / ".zarray").read_text())
    assert ends_meta["dtype"] == "<i8" and ends_meta["chunks"] == [3]

    _assert_same(rb, ReplayBuffer.copy_from_path(path))
    _assert_same(rb, ReplayBuffer.create_from_path(path))
    subset = ReplayBuffer.copy_from_path(path, keys=["action"])
    assert subset.backend == "numpy" and subset.keys() == ["action"]
    np.testing.assert_array_equal(subset.episode_ends, [6, 15, 19])
    with pytest.raises(KeyError, match="'nope'"):
        ReplayBuffer.copy_from_path(path, keys=["nope"])


def test_save_compressor_options_and_zarr_format_3(tmp_path):
    rb = ReplayBuffer.create_empty_numpy()
    rb.add_episode(_episode(10, 1))
    lz4 = rb.save_to_path(tmp_path / "lz4.zarr", compressors="default")
    assert lz4.get_compressors()["obs"].cname == "lz4"
    raw = rb.save_to_path(tmp_path / "raw.zarr", compressors=None)
    assert raw.get_compressors()["obs"] is None
    mixed = rb.save_to_path(tmp_path / "mixed.zarr", compressors={"obs": None, "action": "disk"})
    assert mixed.get_compressors() == {"obs": None, "action": mixed.get_compressors()["action"]}
    assert mixed.get_compressors()["action"].cname == "zstd"
    v3 = rb.save_to_path(tmp_path / "v3.zarr", zarr_format=3)
    assert (tmp_path / "v3.zarr" / "zarr.json").exists()
    _assert_same(rb, ReplayBuffer.copy_from_path(tmp_path / "v3.zarr"))
    _assert_same(rb, v3)
    with pytest.raises(ValueError, match="'zip'"):
        rb.save_to_path(tmp_path / "bad.zarr", compressors="zip")
    with pytest.raises(FileExistsError):
        rb.save_to_path(tmp_path / "raw.zarr", if_exists="raise")


def test_zarr_to_zarr_copy_and_append_on_disk(tmp_path):
    rb = ReplayBuffer.create_empty_numpy()
    rb.add_episode(_episode(7, 3))
    rb.save_to_path(tmp_path / "a.zarr")
    copied = ReplayBuffer.copy_from_path(tmp_path / "a.zarr", store=str(tmp_path / "b.zarr"))
    assert copied.backend == "zarr"
    _assert_same(rb, copied)
    # Reopen writable and append: the change persists on disk.
    appendable = ReplayBuffer.create_from_path(tmp_path / "b.zarr", mode="a")
    extra = _episode(2, 4)
    appendable.add_episode(extra)
    reread = ReplayBuffer.copy_from_path(tmp_path / "b.zarr")
    np.testing.assert_array_equal(reread.episode_ends, [7, 9])
    np.testing.assert_array_equal(reread.get_episode(1)["action"], extra["action"])
    fresh = ReplayBuffer.create_from_path(tmp_path / "new.zarr", mode="a")
    assert fresh.n_episodes == 0 and (tmp_path / "new.zarr" / ".zgroup").exists()


@pytest.mark.needs_data
def test_reads_original_pusht_layout(pusht_zarr_path):
    rb = ReplayBuffer.create_from_path(pusht_zarr_path)
    assert rb.backend == "zarr"
    assert sorted(rb.keys()) == ["action", "img", "keypoint", "n_contacts", "state"]
    assert rb.n_episodes == 206 and rb.n_steps == 25650
    lengths = rb.episode_lengths
    assert lengths.min() == 49 and lengths.max() == 246
    assert rb["img"].shape == (25650, 96, 96, 3)
    ep = rb.get_episode(3)
    assert ep["action"].shape == (lengths[3], 2)
    np.testing.assert_array_equal(ep["state"], rb["state"][rb.episode_ends[2] : rb.episode_ends[3]])


def _write_group(path, with_ends: bool, action_len: int) -> None:
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    data = root.create_group("data")
    data.create_array("action", data=np.zeros((action_len, 2), np.float32))
    meta = root.create_group("meta")
    if with_ends:
        meta.create_array("episode_ends", data=np.array([4, 10], np.int64))


def test_wrong_layout_rejected_with_message(tmp_path):
    no_ends = tmp_path / "no_ends.zarr"
    _write_group(no_ends, with_ends=False, action_len=10)
    with pytest.raises(ValueError, match=r"no_ends\.zarr.*missing 'meta/episode_ends'.*data/<key>") as err:
        ReplayBuffer.create_from_path(no_ends)
    assert "\n" not in str(err.value)
    short = tmp_path / "short.zarr"
    _write_group(short, with_ends=True, action_len=9)
    with pytest.raises(ValueError, match=r"short\.zarr.*data/action has 9 steps.*episode_ends\[-1\] is 10"):
        ReplayBuffer.copy_from_path(short)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="not a zarr group"):
        ReplayBuffer.create_from_path(tmp_path / "empty_dir")
    with pytest.raises(ValueError, match="missing 'meta/episode_ends'"):
        ReplayBuffer({"data": {"a": np.zeros(3)}, "meta": {}})


def test_missing_path_says_how_to_get_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.zarr.*pusht\.zip.*task\.dataset\.zarr_path"):
        ReplayBuffer.copy_from_path(tmp_path / "nowhere.zarr")
