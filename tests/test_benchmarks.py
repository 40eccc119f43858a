"""The benchmark suite and the results plumbing: form and arithmetic, never timings.

``python -m benchmarks.run --smoke`` (tiny networks, 1-2 iterations, one short episode) must emit one
well-formed JSON line for every benchmark; the aggregation and plotting scripts are checked on a synthetic
``logs.json.txt``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ENV

REPO_ROOT = Path(__file__).resolve().parents[1]

SAMPLERS = ("ddpm100", "ddim10", "ddim16", "flow1", "flow2", "flow4")
KINDS = ("state", "image", "state_dpt", "image_dpt")
EXPECTED = (
    [f"train_{k}.{m}" for k in KINDS for m in ("optimizer_steps_per_s", "samples_per_s", "data_wait_share")]
    + [f"latency_{k}.{s}.b{b}.{q}" for k in KINDS for s in SAMPLERS for b in (1, 56) for q in ("p50", "p95")]
    + ["eval_protocol.wall_time", "eval_protocol.policy_time_share"]
    + [f"env_steps.{v}" for v in ("state", "keypoints", "image", "state_render")]
    + [
        f"deploy_{m}.{s}.b{b}.{row}"
        for m in ("state", "state_cpu", "image")
        for s in ("ddim10", "ddpm100")
        for b in (1, 56)
        for row in (
            "torch.p50",
            *(f"{be}.{q}" for be in ("onnxruntime", "openvino") for q in ("p50", "speedup")),
        )
    ]
)
UNITS = {"optimizer_steps_per_s": "steps/s", "samples_per_s": "samples/s", "data_wait_share": "fraction"}


def _env(pusht_zarr_path: str) -> dict[str, str]:
    return {**ENV, "PUSHT_ZARR": pusht_zarr_path}


def _script(name: str, *args: str, env: dict[str, str] | None = None, timeout: int = 600):
    """``python -m benchmarks.<name> ARGS`` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def smoke(pusht_zarr_path, tmp_path_factory):
    out_file = tmp_path_factory.mktemp("bench") / "smoke.jsonl"
    proc = _script(
        "run", "--smoke", "--device", "cpu", "--out", str(out_file), env=_env(pusht_zarr_path), timeout=600
    )
    assert proc.returncode == 0, f"benchmarks.run --smoke failed:\n{proc.stderr[-4000:]}"
    return proc, out_file


@pytest.mark.needs_data
def test_smoke_prints_one_valid_row_per_benchmark(smoke):
    proc, _ = smoke
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    rows = [json.loads(ln) for ln in lines]  # every stdout line is a JSON object: progress goes to stderr
    names = [r["name"] for r in rows]
    assert sorted(names) == sorted(EXPECTED), (
        f"missing {set(EXPECTED) - set(names)}, extra {set(names) - set(EXPECTED)}"
    )
    for r in rows:
        assert set(r) == {"name", "value", "unit", "config", "hardware"}, r
        assert isinstance(r["value"], float | int) and math.isfinite(r["value"]) and r["value"] >= 0, r
        assert isinstance(r["unit"], str) and r["unit"], r
        assert isinstance(r["config"], dict) and r["config"].get("mode") == "smoke", r
        assert "torch" in r["hardware"] and ("CPU" in r["hardware"] or "cuda" in r["hardware"].lower()), r
    by_name = {r["name"]: r for r in rows}
    for kind in KINDS:
        for metric, unit in UNITS.items():
            assert by_name[f"train_{kind}.{metric}"]["unit"] == unit
        assert 0.0 <= by_name[f"train_{kind}.data_wait_share"]["value"] <= 1.0
        steps = by_name[f"train_{kind}.optimizer_steps_per_s"]
        samples = by_name[f"train_{kind}.samples_per_s"]["value"]
        assert samples == pytest.approx(steps["value"] * steps["config"]["batch_size"])
        for s in SAMPLERS:
            for b in (1, 56):
                p50 = by_name[f"latency_{kind}.{s}.b{b}.p50"]
                assert p50["unit"] == "ms" and p50["config"]["batch_size"] == b
                assert p50["value"] <= by_name[f"latency_{kind}.{s}.b{b}.p95"]["value"]
    assert by_name["latency_state.ddim10.b1.p50"]["config"]["num_inference_steps"] == 10
    assert by_name["latency_state.ddpm100.b1.p50"]["config"]["num_inference_steps"] == 100
    assert by_name["latency_state.flow2.b56.p50"]["config"]["num_inference_steps"] == 2
    assert "transformer" in by_name["latency_state_dpt.ddim10.b1.p50"]["config"]["recipe"]
    assert "transformer" in by_name["train_image_dpt.optimizer_steps_per_s"]["config"]["recipe"]
    ev = by_name["eval_protocol.wall_time"]
    assert ev["unit"] == "s" and ev["config"]["policy_calls"] >= 1
    assert 0.0 <= by_name["eval_protocol.policy_time_share"]["value"] <= 1.0
    assert by_name["env_steps.state_render"]["config"]["render_calls"] > 0


@pytest.mark.needs_data
def test_out_file_holds_the_same_rows(smoke):
    proc, out_file = smoke
    stdout_rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
    file_rows = [json.loads(ln) for ln in out_file.read_text().splitlines()]
    assert file_rows == stdout_rows


@pytest.mark.needs_data
def test_train_speed_compares_variants_and_losses(pusht_zarr_path, tmp_path):
    out_file = tmp_path / "speed.jsonl"
    args = ["--smoke", "--recipes", "state", "--variants", "original,fp32,bf16", "--loss-steps", "4"]
    proc = _script("train_speed", *args, "--out", str(out_file), env=_env(pusht_zarr_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert rows == {r["name"]: r for r in map(json.loads, out_file.read_text().splitlines())}
    for variant in ("original", "fp32", "bf16"):
        speedup = rows[f"train_speed.state.{variant}.speedup"]
        assert (
            speedup["unit"] == "x" and speedup["value"] > 0 and speedup["config"]["reference"] == "original"
        )
        step_ms = rows[f"train_speed.state.{variant}.step_ms"]["value"]
        steps_per_s = rows[f"train_speed.state.{variant}.optimizer_steps_per_s"]["value"]
        assert math.isclose(steps_per_s, 1e3 / step_ms)
    assert rows["train_speed.state.original.speedup"]["value"] == 1.0
    assert (
        "training.mixed_precision=bf16"
        in rows["train_speed.state.bf16.speedup"]["config"]["variant_overrides"]
    )
    # the loss check trains the first and the last variant
    losses = {n: r for n, r in rows.items() if ".loss_last_" in n}
    assert set(losses) == {f"train_speed.state.{v}.loss_last_1_of_4" for v in ("original", "bf16")}
    ref = losses["train_speed.state.original.loss_last_1_of_4"]
    other = losses["train_speed.state.bf16.loss_last_1_of_4"]
    assert math.isclose(
        other["config"]["mean_last_minus_reference"], other["value"] - ref["value"], abs_tol=1e-4
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--recipes", "nope"], "unknown recipe 'nope'"),
        (["--recipes", "state", "--variants", "fp32,warp"], "unknown variant 'warp'"),
        (["--recipes", "state", "--variants", "original,fastest_graphs"], "needs --device cuda"),
    ],
)
def test_train_speed_rejects_unknown_names(args, needle):
    from benchmarks import train_speed

    with pytest.raises(SystemExit, match=needle):  # before anything is built
        train_speed.main(["--smoke", "--device", "cpu", *args])


@pytest.mark.needs_data
def test_only_rejects_unknown_benchmark(pusht_zarr_path):
    proc = _script("run", "--smoke", "--only", "env_steps,no_such_bench", env=_env(pusht_zarr_path))
    assert proc.returncode != 0
    assert "no_such_bench" in proc.stderr and proc.stdout == ""


def _write_log(
    path: Path,
    scores: list[float],
    successes: list[float],
    resume_rewrite: dict | None = None,
    elapsed_key: bool = True,
) -> None:
    """A log shaped like the training loop's: per-step rows, then an epoch-end row; rollout every 5 epochs."""
    lines = []
    step = 0
    for epoch in range(5 * len(scores)):
        for _ in range(2):
            lines.append({"train_loss": 1.0 / (epoch + 1), "global_step": step, "epoch": epoch, "lr": 1e-4})
            step += 1
        end = {
            "train_loss": 1.0 / (epoch + 1),
            "val_loss": 1.5 / (epoch + 1),
            "global_step": step,
            "epoch": epoch,
        }
        if elapsed_key:
            end["wall_time"] = 60.0 * (epoch + 1)
        else:  # our training loop logs each epoch's duration instead
            end["time/epoch_s"] = 30.0
        if epoch % 5 == 0:
            end["test/mean_score"] = scores[epoch // 5]
            end["test/success_rate"] = successes[epoch // 5]
            end["train/mean_score"] = scores[epoch // 5]
        lines.append(end)
        step += 1
    if resume_rewrite:  # a resumed run re-logs an epoch: the later row counts
        lines.append(resume_rewrite)
    text = (
        "\n".join(json.dumps(x) for x in lines) + '\n{"train_loss": 0.1, "glob'
    )  # torn line of a killed run
    path.write_text(text)


@pytest.fixture()
def two_seeds(tmp_path):
    a, b = tmp_path / "seed42", tmp_path / "seed43"
    a.mkdir()
    b.mkdir()
    # seed 42: 12 evaluations with scores 0.00 .. 0.55; max 0.55, last 10 = mean(0.10..0.55) = 0.325
    _write_log(a / "logs.json.txt", [i / 20 for i in range(12)], [i / 40 for i in range(12)])
    # seed 43: first evaluation 0.97, then 0.9 except the evaluation at epoch 40 which is re-logged as 0.7
    scores_b = [0.97] + [0.9] * 10
    rewrite = {
        "train_loss": 0.5,
        "global_step": 10_000,
        "epoch": 40,
        "test/mean_score": 0.7,
        "test/success_rate": 0.1,
    }
    _write_log(b / "logs.json.txt", scores_b, [0.5] * 11, rewrite, elapsed_key=False)
    return a, b


def test_aggregate_metrics_numbers(two_seeds):
    a, b = two_seeds
    proc = _script("aggregate_metrics", str(a), str(b / "logs.json.txt"), "--label", "demo", "--json")
    assert proc.returncode == 0, proc.stderr
    row, payload = proc.stdout.split("\n", 1)
    result = json.loads(payload)
    ra, rb = result["runs"]
    assert ra["max"] == pytest.approx(0.55)
    assert ra["last10"] == pytest.approx(sum(i / 20 for i in range(2, 12)) / 10)
    assert ra["success_last10"] == pytest.approx(sum(i / 40 for i in range(2, 12)) / 10)
    assert ra["evaluations"] == 12 and ra["optimizer_steps"] == 60 * 3
    assert ra["wall_time_h"] == pytest.approx(60 * 60 / 3600)
    # the re-logged epoch 40 (0.7) replaces the 0.9 logged there first; the torn last line is ignored
    assert rb["max"] == pytest.approx(0.97)
    assert rb["last10"] == pytest.approx((0.9 * 9 + 0.7) / 10)
    assert rb["evaluations"] == 11
    assert rb["wall_time_h"] == pytest.approx(55 * 30 / 3600)  # sum of time/epoch_s over 55 epochs
    agg = result["aggregate"]
    assert agg["seeds"] == 2
    assert agg["max"] == pytest.approx((0.55 + 0.97) / 2)
    assert agg["last10"] == pytest.approx((ra["last10"] + rb["last10"]) / 2)
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    assert cells[0] == "demo" and cells[1] == "2"
    assert cells[2].startswith(f"{(0.55 + 0.97) / 2:.3f} ± ")
    assert cells[3].startswith(f"{agg['last10']:.3f} ± ")


def test_aggregate_metrics_rejects_log_without_scores(tmp_path):
    log = tmp_path / "logs.json.txt"
    log.write_text(json.dumps({"train_loss": 1.0, "global_step": 0, "epoch": 0}) + "\n")
    proc = _script("aggregate_metrics", str(log))
    assert proc.returncode != 0 and "test/mean_score" in proc.stderr


def test_plot_learning_curves_writes_png(two_seeds, tmp_path):
    a, b = two_seeds
    out = tmp_path / "plots" / "curves.png"
    proc = _script("plot_learning_curves", str(a), str(b), "--labels", "s42,s43", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image

    h, w = matplotlib.image.imread(str(out)).shape[:2]
    assert h > 400 and w > 600


def _write_ramp_video(path, n_frames: int) -> None:
    """An mp4 whose frame i is uniformly grey level 20 * i (easy to recognise after h264)."""
    from diffusion_policy.gym_util.video_recorder import VideoRecorder

    rec = VideoRecorder(fps=10, crf=10)
    rec.start(str(path))
    for i in range(n_frames):
        rec.write_frame(np.full((32, 48, 3), 20 * i, dtype=np.uint8))
    rec.stop()


def test_video_filmstrip_keeps_first_last_and_evenly_spaced_frames(tmp_path):
    from PIL import Image

    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    _write_ramp_video(a, 10)
    _write_ramp_video(b, 3)  # fewer frames than asked: all of them, the rest of the row stays white
    out = tmp_path / "strip.png"
    proc = _script("video_filmstrip", str(a), str(b), "--frames", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    img = np.asarray(Image.open(out).convert("RGB")).astype(float)
    gap = 2
    assert img.shape == (2 * 32 + gap, 4 * 48 + gap * 3, 3)

    def tile(r, c):
        return img[r * (32 + gap) : r * (32 + gap) + 32, c * (48 + gap) : c * (48 + gap) + 48].mean()

    # 10 frames, 4 kept: indices 0, 3, 6, 9 -> grey 0, 60, 120, 180 (h264 at crf 10: within a few levels)
    for c, level in enumerate((0, 60, 120, 180)):
        assert abs(tile(0, c) - level) < 6, (c, tile(0, c))
    for c, level in enumerate((0, 20, 40)):
        assert abs(tile(1, c) - level) < 6, (c, tile(1, c))
    assert tile(1, 3) == 255.0


def test_video_filmstrip_names_a_missing_video(tmp_path):
    proc = _script("video_filmstrip", str(tmp_path / "nope.mp4"), "--out", str(tmp_path / "s.png"))
    assert proc.returncode == 2 and "no such video" in proc.stderr and "nope.mp4" in proc.stderr
    assert not (tmp_path / "s.png").exists()
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    proc = _script("video_filmstrip", str(tmp_path / "junk.mp4"), "--out", str(tmp_path / "s.png"))
    assert proc.returncode == 2 and "junk.mp4" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s.png").exists()
