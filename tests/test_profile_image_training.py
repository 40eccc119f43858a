"""benchmarks.profile_image_training: the form of its rows in --smoke mode, never its timings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def prof():
    from benchmarks import profile_image_training

    return profile_image_training


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        assert set(row) == {"name", "value", "unit", "config", "hardware"}
        assert isinstance(row["value"], float) and math.isfinite(row["value"]) and row["value"] >= 0
        assert row["hardware"].startswith("CPU ")
    return rows


@pytest.mark.needs_data
def test_smoke_profile_rows(prof, pusht_zarr_path, tmp_path):
    out = tmp_path / "profile.jsonl"
    assert prof.main(["--smoke", "--threads", "1", "--zarr", pusht_zarr_path, "--out", str(out)]) == 0
    rows = {r["name"]: r for r in _rows(out)}
    expected = [f"profile.{s}.ms" for s in prof.STAGES]
    expected += ["profile.step.ms", "profile.optimizer_steps_per_s", "profile.samples_per_s"]
    assert sorted(rows) == sorted(expected)
    shares = [rows[f"profile.{s}.ms"]["config"]["share"] for s in prof.STAGES]
    assert sum(shares) == pytest.approx(1.0, abs=1e-3)
    # the stages the hooks see must all have run: a broken hook reads as zero time
    for stage in (
        "data",
        "crop",
        "encoder_fwd",
        "unet_fwd",
        "backward_unet",
        "backward_enc",
        "optimizer",
        "ema",
    ):
        assert rows[f"profile.{stage}.ms"]["value"] > 0, stage
    config = rows["profile.step.ms"]["config"]
    assert config["batch_size"] == 4 and config["crop_shape"] == [48, 48] and config["down_dims"] == [16, 32]
    assert config["params_encoder"] > 0 and config["params_unet"] > 0
    step = rows["profile.step.ms"]["value"]
    assert rows["profile.samples_per_s"]["value"] == pytest.approx(4 * 1e3 / step)
    assert rows["profile.optimizer_steps_per_s"]["unit"] == "steps/s"


@pytest.mark.needs_data
def test_smoke_ab_rows(prof, pusht_zarr_path, tmp_path):
    out = tmp_path / "ab.jsonl"
    argv = ["--smoke", "--threads", "1", "--zarr", pusht_zarr_path, "--out", str(out), "--repeats", "2"]
    argv += ["--ab", "baseline,uint8,bf16", "--variant", "small=policy.crop_shape=[40,40] @adamw_foreach"]
    assert prof.main(argv) == 0
    rows = {r["name"]: r for r in _rows(out)}
    for v in ("baseline", "uint8", "bf16", "small"):
        for metric, unit in (("step_ms", "ms"), ("speedup", "x"), ("samples_per_s", "samples/s")):
            assert rows[f"ab.{v}.{metric}"]["unit"] == unit
        config = rows[f"ab.{v}.step_ms"]["config"]
        assert config["reference"] == "baseline" and len(config["round_ms"]) == 2
        assert set(config["stage_ms"]) == set(prof.STAGES)
    assert rows["ab.baseline.speedup"]["value"] == pytest.approx(1.0)
    small = rows["ab.small.step_ms"]["config"]
    assert small["crop_shape"] == [40, 40] and small["tweaks"] == {"adamw_foreach": True}


def test_variant_parsing(prof):
    v = prof.parse_variant("w2=@workers=2 policy.down_dims=[8,16]", ["a=1"])
    assert v.name == "w2" and v.tweaks == {"workers": 2} and v.overrides == ["a=1", "policy.down_dims=[8,16]"]
    assert prof.parse_variant("channels_last", []).tweaks == {"channels_last": True}
    with pytest.raises(SystemExit, match="unknown tweak @warp"):
        prof.parse_variant("x=@warp", [])
    with pytest.raises(SystemExit, match="not a built-in"):
        prof.parse_variant("nonsense", [])
    with pytest.raises(SystemExit, match="needs a count"):
        prof.parse_variant("x=@threads", [])
