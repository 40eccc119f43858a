"""Deployment export: export.py -> ONNX / OpenVINO IR + manifest, the torch-free runtime, eval.py --backend.

Tiny checkpoints are trained with ``train.py debug=smoke`` (state UNet), ``debug=smoke_image`` (hybrid image
UNet) and ``debug=smoke_transformer`` (state transformer), one epoch each, and exported in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffusion_policy.common.config_resolvers import register_resolvers
from diffusion_policy.deploy import ExportError, load_exported_policy
from diffusion_policy.deploy.exporter import export_checkpoint, scheduler_tables
from diffusion_policy.deploy.schedulers import DDIMSampler, DDPMSampler
from diffusion_policy.policy.samplers import use_sampler
from diffusion_policy.workspace.base_workspace import load_policy
from tests.helpers import (
    REPO_ROOT,
    assert_ok,
    assert_one_line_error,
    load_script,
    run_cli,
    train_cli,
)

BACKENDS = ("onnxruntime", "openvino")


def train_tiny(tmp_path_factory, zarr: str, name: str, *args: str) -> Path:
    run_dir = tmp_path_factory.mktemp(name) / "run"
    train_cli(run_dir, zarr, *args, "training.num_epochs=1")
    return run_dir / "checkpoints" / "latest.ckpt"


def export_tiny(tmp_path_factory, ckpt: Path, name: str) -> Path:
    register_resolvers()
    out = tmp_path_factory.mktemp(f"{name}_export") / "export"
    export_checkpoint(ckpt, out)
    return out


@pytest.fixture(scope="module")
def state_ckpt(tmp_path_factory, pusht_zarr_path) -> Path:
    return train_tiny(tmp_path_factory, pusht_zarr_path, "state", "debug=smoke")


@pytest.fixture(scope="module")
def state_export(tmp_path_factory, state_ckpt) -> Path:
    return export_tiny(tmp_path_factory, state_ckpt, "state")


# ----------------------------------------------------------------------------- numpy samplers vs diffusers
SCHEDULE = {
    "num_train_timesteps": 100,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "squaredcos_cap_v2",
    "clip_sample": True,
}


@pytest.mark.parametrize(
    "extra, steps",
    [
        ({}, 8),
        ({"prediction_type": "sample"}, 10),
        ({"timestep_spacing": "trailing", "beta_schedule": "linear"}, 7),
        ({"timestep_spacing": "linspace", "clip_sample": False, "set_alpha_to_one": False}, 16),
    ],
)
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_steps_match_diffusers(extra, steps, eta):
    config = {**SCHEDULE, **extra}
    reference = DDIMScheduler(**config)
    reference.set_timesteps(steps)
    ours = DDIMSampler(
        dict(reference.config), scheduler_tables(dict(reference.config), steps)["DDIMScheduler"], steps, eta
    )
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy())
    rng = np.random.default_rng(0)
    x_ref = torch.from_numpy(rng.standard_normal((3, 16, 2)).astype(np.float32))
    for i, t in enumerate(reference.timesteps.tolist()):
        out = (
            rng.standard_normal(x_ref.shape).astype(np.float32) * 1.5
        )  # a model output, large enough to clip
        noise = rng.standard_normal(x_ref.shape).astype(np.float32)
        kwargs = {"variance_noise": torch.from_numpy(noise)} if eta > 0 else {}
        # each step from diffusers' own previous sample, so float rounding does not accumulate
        x = ours.step(i, out, x_ref.numpy(), noise)
        x_ref = reference.step(torch.from_numpy(out), t, x_ref, eta=eta, **kwargs).prev_sample
        assert x.dtype == np.float32
        np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "extra, steps",
    [({}, 100), ({}, 10), ({"prediction_type": "sample", "variance_type": "fixed_large"}, 25)],
)
def test_ddpm_steps_match_diffusers(extra, steps):
    """DDPM draws fresh noise every step: diffusers draws it from a torch generator, ours takes it as an
    argument (the runtime draws it from a numpy Generator), so the test replays diffusers' draws."""
    config = {**SCHEDULE, "variance_type": "fixed_small", **extra}
    reference = DDPMScheduler(**config)
    reference.set_timesteps(steps)
    ours = DDPMSampler(
        dict(reference.config), scheduler_tables(dict(reference.config), steps)["DDPMScheduler"], steps
    )
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy())
    rng = np.random.default_rng(1)
    x_ref = torch.from_numpy(rng.standard_normal((2, 16, 2)).astype(np.float32))
    generator, replay = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for i, t in enumerate(reference.timesteps.tolist()):
        out = rng.standard_normal(x_ref.shape).astype(np.float32)
        noise = torch.randn(x_ref.shape, generator=replay).numpy() if t > 0 else None
        x = ours.step(i, out, x_ref.numpy(), noise)
        x_ref = reference.step(torch.from_numpy(out), t, x_ref, generator=generator).prev_sample
        np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-5, atol=1e-6)


def test_unsupported_scheduler_settings_are_named():
    with pytest.raises(ValueError, match="fixed_small_log"):
        DDPMSampler({**SCHEDULE, "variance_type": "fixed_small_log"}, {}, 10)
    with pytest.raises(ValueError, match="v_prediction"):
        DDIMSampler({**SCHEDULE, "prediction_type": "v_prediction"}, {}, 10)


# ----------------------------------------------------------------------------- parity with the torch policy
def random_obs(shapes: dict, n_obs_steps: int, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Raw observations in the training data's range: images in [0, 1], positions in PushT pixels."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.rand(batch, n_obs_steps, *s, generator=g) * (1.0 if len(s) == 3 else 500.0)
        for k, s in shapes.items()
    }


def check_ddim_parity(ckpt: Path, export_dir: Path, steps: int = 8) -> list[float]:
    """DDIM (eta 0) from the same initial noise: the runtime's actions equal the torch policy's within
    1e-5 of the action range (fp32 graphs, different kernels; PushT's range is ~500 px -> 0.005 px)."""
    policy, _ = load_policy(ckpt, "cpu")
    use_sampler(policy, "ddim", steps)
    stats = policy.normalizer["action"].get_input_stats()
    tolerance = 1e-5 * float((stats["max"] - stats["min"]).max())
    worst = []
    for backend in BACKENDS:
        runtime = load_exported_policy(export_dir, backend)
        runtime.set_sampler("ddim", steps, eta=0.0)
        for batch in (1, 3):
            obs = random_obs(runtime.obs_shapes, runtime.n_obs_steps, batch, seed=batch)
            shape = (batch, runtime.trajectory_length, runtime.action_dim)
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(batch))
            expected = policy.predict_action(obs, noise=noise)
            got = runtime.predict_action({k: v.numpy() for k, v in obs.items()}, noise=noise.numpy())
            for key in ("action", "action_pred"):
                assert got[key].shape == tuple(expected[key].shape)
                diff = float(np.abs(got[key] - expected[key].numpy()).max())
                assert diff <= tolerance, f"{backend} batch {batch} {key}: {diff} > {tolerance}"
            worst.append(diff)
    return worst


@pytest.mark.needs_data
def test_state_unet_export_matches_torch_ddim(state_ckpt, state_export):
    manifest = json.loads((state_export / "manifest.json").read_text())
    assert manifest["conditioning"] == "global_cond" and manifest["obs_shapes"] == {"obs": [20]}
    assert {"action", "obs"} <= set(manifest["normalizer"]) and "pad_before" in manifest["config_yaml"]
    assert manifest["scheduler"]["config"]["beta_schedule"] == "squaredcos_cap_v2"
    assert {p.name for p in state_export.iterdir()} == {
        "manifest.json",
        "denoiser.onnx",
        "denoiser.xml",
        "denoiser.bin",
    }
    check_ddim_parity(state_ckpt, state_export)


# family: (root config, debug preset, what its manifest must say)
EXPORTED_FAMILIES = {
    "image_unet": (
        "train_diffusion_unet_hybrid_workspace",
        "smoke_image",
        lambda m: m["obs_type"] == "image" and set(m["graphs"]) == {"denoiser", "obs_encoder"},
    ),
    "transformer": (
        "train_diffusion_transformer_lowdim_pusht_workspace",
        "smoke_transformer",
        lambda m: m["conditioning"] == "cond",
    ),
}


@pytest.mark.needs_data
@pytest.mark.parametrize("family", EXPORTED_FAMILIES)
def test_export_matches_torch_ddim(family, tmp_path_factory, pusht_zarr_path):
    config, debug, manifest_ok = EXPORTED_FAMILIES[family]
    ckpt = train_tiny(tmp_path_factory, pusht_zarr_path, family, f"--config-name={config}", f"debug={debug}")
    export_dir = export_tiny(tmp_path_factory, ckpt, family)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert manifest_ok(manifest), {k: manifest.get(k) for k in ("obs_type", "graphs", "conditioning")}
    check_ddim_parity(ckpt, export_dir)


@pytest.mark.needs_data
def test_ddpm_matches_torch_in_distribution(state_ckpt, state_export):
    """DDPM draws noise at every step, so only the distribution can match: N samples of one observation
    from each side. The difference of two independent sample means has standard error sqrt(2 / N) * std;
    5 standard errors (plus a float floor) leave a false-alarm rate far below 1e-5 per dimension. The sample
    std has relative standard error ~ 1 / sqrt(2N), so the two stds agree within 5 * sqrt(2) / sqrt(2N).
    A sampler that forgot the noise or mis-scaled it (std off by 2x) fails both checks."""
    n = 400
    policy, _ = load_policy(state_ckpt, "cpu")
    use_sampler(policy, "ddpm", 100)
    obs = random_obs({"obs": (20,)}, policy.n_obs_steps, 1, seed=0)["obs"].expand(n, -1, -1).contiguous()
    torch_actions = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(0))["action"]
    torch_actions = torch_actions.numpy().reshape(n, -1)
    runtime = load_exported_policy(state_export, "onnxruntime", seed=0)
    runtime.set_sampler("ddpm", 100)
    ours = runtime.predict_action({"obs": obs.numpy()})["action"].reshape(n, -1)
    std = torch_actions.std(axis=0)
    assert std.min() > 1.0, "DDPM samples of an untrained net should spread (px)"
    mean_tol = 5 * np.sqrt(2 / n) * std + 1e-3
    np.testing.assert_array_less(np.abs(ours.mean(axis=0) - torch_actions.mean(axis=0)), mean_tol)
    ratio = ours.std(axis=0) / std
    assert np.all(np.abs(ratio - 1) < 5 / np.sqrt(n)), ratio


# ----------------------------------------------------------------------------- online interface
@pytest.mark.needs_data
def test_select_action_repeats_first_obs_and_replans_every_n_action_steps(state_export):
    runtime = load_exported_policy(state_export, "onnxruntime", seed=0)
    calls = []
    predict = runtime.predict_action

    def recording(obs_dict, noise=None):
        calls.append(obs_dict["obs"].copy())
        out = predict(obs_dict, noise)
        calls[-1] = (calls[-1], out["action"].copy())
        return out

    runtime.predict_action = recording
    Ta, To = runtime.n_action_steps, runtime.n_obs_steps
    steps = [np.full((20,), float(i), dtype=np.float32) for i in range(Ta + 2)]
    runtime.reset()
    actions = [runtime.select_action(o) for o in steps]
    assert len(calls) == 2 and actions[0].shape == (2,)
    first_obs, first_plan = calls[0]
    assert first_obs.shape == (1, To, 20) and np.all(first_obs == 0.0), "first obs fills every slot"
    np.testing.assert_array_equal(np.stack(actions[:Ta]), first_plan[0])
    assert calls[1][0][0, :, 0].tolist() == [float(Ta - 1), float(Ta)], (
        "replan at step Ta from the last To obs"
    )
    runtime.reset()
    batched = runtime.select_action(np.zeros((3, 20), dtype=np.float32))
    assert batched.shape == (3, 2)


@pytest.mark.needs_data
def test_runtime_imports_and_runs_without_torch(state_export):
    """In a process where torch and diffusers cannot be imported, the runtime loads and samples."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "torchvision"):
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Block())
import numpy as np
from diffusion_policy.deploy import load_exported_policy
for backend in ("onnxruntime", "openvino"):
    policy = load_exported_policy({str(state_export)!r}, backend, seed=0)
    out = policy.predict_action({{"obs": np.zeros((2, 2, 20), np.float32)}})
    assert out["action"].shape == (2, 8, 2) and np.isfinite(out["action_pred"]).all()
    policy.reset()
    assert policy.select_action(np.zeros(20, np.float32)).shape == (2,)
assert not any(m.split(".")[0] in ("torch", "diffusers") for m in sys.modules), "torch was imported"
print("ok")
"""
    proc = run_cli(["-c", code])
    assert_ok(proc)
    assert proc.stdout.strip().endswith("ok")


# ----------------------------------------------------------------------------- eval.py --backend
@pytest.mark.needs_data
def test_eval_backends_give_torch_actions_with_shared_noise(state_ckpt, state_export, tmp_path):
    """eval.py --noise-seed: the policy eval.py builds for each backend returns the torch policy's actions
    for the same observations, call after call (every call draws the next initial noise from the seed), so
    their rollouts differ only by float rounding. (The rollouts' rewards are not compared: contact
    dynamics can amplify a 1e-5 action difference.)"""
    eval_cli = load_script(REPO_ROOT / "eval.py", "dp_eval_cli")
    policy, _ = load_policy(state_ckpt, "cpu")
    use_sampler(policy, "ddim", 4)
    stats = policy.normalizer["action"].get_input_stats()
    tolerance = 1e-5 * float((stats["max"] - stats["min"]).max())
    # batches of the sizes a rollout makes, one after another, through one noise stream per policy
    calls = [random_obs({"obs": (20,)}, policy.n_obs_steps, b, seed=i) for i, b in enumerate((3, 3, 1, 2))]
    reference = eval_cli.TorchPolicyWithNoise(policy, eval_cli.SeededNoise(3))
    expected = [reference.predict_action(obs) for obs in calls]
    assert not torch.allclose(expected[0]["action"], expected[1]["action"], atol=1.0), "fresh noise per call"
    for backend in BACKENDS:
        adapter, _, label = eval_cli.load_exported(str(state_export), backend, "ddim", 4, None, 3)
        assert label == "DDIMScheduler-4"
        for i, (obs, want) in enumerate(zip(calls, expected, strict=True)):
            got = adapter.predict_action(obs)
            for key in ("action", "action_pred"):
                diff = float((got[key] - want[key]).abs().max())
                assert diff <= tolerance, f"{backend} call {i} {key}: {diff} > {tolerance}"
    # and through the command line: every backend evaluates and says which backend and sampler it used
    seeds = {}
    for backend in ("torch", *BACKENDS):
        source = state_ckpt if backend == "torch" else state_export
        out = tmp_path / backend
        args = ["eval.py", "-c", str(source), "-o", str(out), "--backend", backend, "-d", "cpu"]
        assert_ok(run_cli([*args, "--sampler", "ddim", "--inference-steps", "4", "--noise-seed", "3"]))
        log = json.loads((out / "eval_log.json").read_text())
        assert log["eval/backend"] == backend and log["eval/sampler"] == "DDIMScheduler-4"
        seeds[backend] = sorted(k for k in log if "sim_max_reward" in k)
    assert seeds["torch"] and all(seeds[b] == seeds["torch"] for b in BACKENDS)


@pytest.mark.needs_data
def test_exported_policies_run_under_delay_and_refuse_rtc(state_export, tmp_path):
    """An export runs the async and ensemble modes (the chunk comes from the manifest's window); rtc, whose
    guidance differentiates the denoiser, is refused in one line with nothing written."""
    base = ["eval.py", "-c", str(state_export), "--backend", "onnxruntime", "--n-test", "2"]
    out = tmp_path / "ensemble"
    assert_ok(run_cli([*base, "-o", str(out), "--delay", "2", "--execution", "ensemble"]))
    log = json.loads((out / "eval_log.json").read_text())
    assert (log["eval/execution"], log["eval/delay"], log["eval/overlap"]) == ("ensemble", 2, 7)
    proc = run_cli([*base, "-o", str(tmp_path / "rtc"), "--delay", "2", "--execution", "rtc"])
    assert_one_line_error(proc, "--execution rtc needs the torch backend", exit_code=2)
    assert not (tmp_path / "rtc").exists()


# ----------------------------------------------------------------------------- one-line errors
@pytest.mark.needs_data
def test_export_cli_errors_are_one_line_and_touch_nothing(state_ckpt, state_export, tmp_path):
    assert_one_line_error(
        run_cli(["export.py", "-c", str(tmp_path / "missing.ckpt"), "-o", str(tmp_path / "x")]),
        "does not exist",
        exit_code=2,
    )
    assert not (tmp_path / "x").exists()
    assert_one_line_error(
        run_cli(["export.py", "-c", str(state_ckpt), "-o", str(tmp_path / "x"), "--format", "tflite"]),
        "unsupported --format tflite",
        exit_code=2,
    )
    before = {p.name: p.read_bytes() for p in state_export.iterdir()}
    assert_one_line_error(
        run_cli(["export.py", "-c", str(state_ckpt), "-o", str(state_export), "--format", "onnx"]),
        "not empty",
        "--overwrite",
        exit_code=2,
    )
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert_one_line_error(
        run_cli(["export.py", "-c", str(state_ckpt), "-o", str(other), "--overwrite"]),
        "no manifest.json",
        exit_code=2,
    )
    assert (other / "keep.txt").read_text() == "mine"
    assert {p.name: p.read_bytes() for p in state_export.iterdir()} == before
    # without the extra installed: one line saying what to install
    code = (
        "import sys, runpy; sys.modules['openvino'] = None; "
        f"sys.argv = ['export.py', '-c', {str(state_ckpt)!r}, '-o', {str(tmp_path / 'y')!r}]; "
        "runpy.run_path('export.py', run_name='__main__')"
    )
    assert_one_line_error(run_cli(["-c", code]), "openvino", 'pip install -e ".[export]"', exit_code=2)
    # eval.py: an export dir needs an export backend, an export backend needs an export dir
    assert_one_line_error(
        run_cli(["eval.py", "-c", str(other), "-o", str(tmp_path / "e1"), "--backend", "openvino"]),
        "not a policy export",
        exit_code=2,
    )
    assert_one_line_error(
        run_cli(["eval.py", "-c", str(state_ckpt), "-o", str(tmp_path / "e2"), "--backend", "onnxruntime"]),
        "export directory",
        exit_code=2,
    )
    assert_one_line_error(
        run_cli(["eval.py", "-c", str(state_export), "-o", str(tmp_path / "e3")]), "directory", exit_code=2
    )
    assert not any((tmp_path / e).exists() for e in ("e1", "e2", "e3"))
    with pytest.raises(ExportError, match="backend"):
        load_exported_policy(state_export, "tensorrt")


@pytest.mark.needs_data
def test_overwrite_replaces_a_previous_export(state_ckpt, tmp_path):
    register_resolvers()
    out = tmp_path / "export"
    export_checkpoint(state_ckpt, out, formats=("onnx",))
    assert not (out / "denoiser.xml").exists()
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(state_ckpt, out, formats=("onnx",))
    export_checkpoint(state_ckpt, out, formats=("openvino",), overwrite=True)
    assert (out / "denoiser.xml").exists() and not (out / "denoiser.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export"], "no temporary directory is left behind"
    with pytest.raises(ExportError, match="no ONNX"):
        load_exported_policy(out, "onnxruntime")


def test_inpainting_policies_are_refused_with_the_reason():
    from diffusion_policy.deploy.exporter import describe_policy
    from diffusion_policy.model.diffusion.conditional_unet1d import ConditionalUnet1D
    from diffusion_policy.policy.diffusion_unet_lowdim_policy import DiffusionUnetLowdimPolicy

    model = ConditionalUnet1D(input_dim=22, diffusion_step_embed_dim=8, down_dims=[8, 16])
    policy = DiffusionUnetLowdimPolicy(
        model,
        DDPMScheduler(**SCHEDULE),
        horizon=16,
        obs_dim=20,
        action_dim=2,
        n_action_steps=8,
        n_obs_steps=2,
    )
    with pytest.raises(ExportError, match="inpainting"):
        describe_policy(policy)


@pytest.mark.needs_data
def test_openvino_serves_any_batch_size_after_its_static_compiles(state_export):
    """OpenVINO compiles a static model for the first few batch sizes, then one dynamic-batch model."""
    ov_policy = load_exported_policy(state_export, "openvino", seed=0)
    ort_policy = load_exported_policy(state_export, "onnxruntime", seed=0)
    for batch in (5, 4, 3, 2, 1, 6):
        obs = {"obs": random_obs({"obs": (20,)}, 2, batch, seed=batch)["obs"].numpy()}
        noise = np.random.default_rng(batch).standard_normal((batch, 16, 2), dtype=np.float32)
        got = ov_policy.predict_action(obs, noise=noise)["action"]
        np.testing.assert_allclose(got, ort_policy.predict_action(obs, noise=noise)["action"], atol=5e-3)
    assert len(ov_policy.denoiser.requests) == 4 and ov_policy.denoiser.dynamic is not None
