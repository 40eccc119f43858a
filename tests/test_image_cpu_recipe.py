"""The 2-core CPU image recipe (``experiment=pusht_image_cpu``): its values compose onto the paper's hybrid
recipe, and it trains two tiny epochs end to end with its real hyper-parameters, only shrunk by overrides."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hydra.utils import instantiate

from diffusion_policy.workspace.base_workspace import load_policy
from tests.helpers import assert_ok, compose_config, evaluate_in_process, run_cli

HYBRID = "train_diffusion_unet_hybrid_workspace"
RECIPE = ["experiment=pusht_image_cpu"]
# sizes only: the recipe's network, optimizer, sampler and loader settings stay as shipped
SHRINK = [
    "training.num_epochs=2",
    "training.max_train_steps=2",
    "training.max_val_steps=1",
    "training.rollout_every=1",
    "training.checkpoint_every=1",
    "task.dataset.max_train_episodes=2",
    "task.env_runner.n_train=1",
    "task.env_runner.n_train_vis=0",
    "task.env_runner.n_test=1",
    "task.env_runner.n_test_vis=0",
    "task.env_runner.max_steps=16",
    "task.env_runner.n_envs=1",
    "training.device=cpu",
    "logging.mode=disabled",
]


def test_cpu_image_recipe_is_the_paper_recipe_shrunk():
    paper, cpu = compose_config(HYBRID), compose_config(HYBRID, RECIPE)
    assert cpu.policy._target_ == paper.policy._target_
    assert cpu.policy.obs_encoder_backbone_width == 32 and list(cpu.policy.down_dims) == [64, 128, 256]
    assert cpu.policy.noise_scheduler._target_.endswith("DDIMScheduler")
    assert cpu.optimizer.fused is True and cpu.dataloader.num_workers == 0
    assert cpu.training.mixed_precision == "auto" and paper.training.mixed_precision is None
    assert cpu.shape_meta == paper.shape_meta and cpu.horizon == paper.horizon
    policy = instantiate(cpu.policy)
    n_params = sum(p.numel() for p in policy.parameters())
    assert 6e6 < n_params < 9e6, n_params  # 2.8 M encoder + 4.9 M UNet, measured with the profile script


@pytest.mark.needs_data
def test_cpu_image_recipe_trains_two_tiny_epochs_and_evaluates(pusht_zarr_path, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train.py", f"--config-name={HYBRID}", *RECIPE, *SHRINK]
    args += [f"task.dataset.zarr_path={pusht_zarr_path}", f"hydra.run.dir={run_dir}"]
    assert_ok(run_cli(args))
    logs = [json.loads(line) for line in (run_dir / "logs.json.txt").read_text().splitlines()]
    assert [r["epoch"] for r in logs if "test/mean_score" in r] == [0, 1]
    losses = [r["train_loss"] for r in logs if "train_loss" in r]
    assert len(losses) >= 4 and all(torch.isfinite(torch.tensor(losses)))
    policy, cfg = load_policy(run_dir / "checkpoints" / "latest.ckpt", "cpu")
    assert cfg.policy.obs_encoder_backbone_width == 32 and cfg.training.mixed_precision == "auto"
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # bf16 autocast keeps float32 weights
    out, latest = tmp_path / "eval", run_dir / "checkpoints" / "latest.ckpt"
    assert_ok(run_cli(["eval.py", "-c", str(latest), "-o", str(out), "-d", "cpu", "--noise-seed", "0"]))
    score = json.loads((out / "eval_log.json").read_text())["test/mean_score"]
    # with seeded noise an evaluation is reproducible: the same checkpoint evaluated again, in this process
    assert score == evaluate_in_process(latest, tmp_path / "again", noise_seed=0)["test/mean_score"]


def test_training_autocast_runs_the_forward_in_bfloat16_only_when_asked():
    from diffusion_policy.common.pytorch_util import training_autocast

    conv, x = torch.nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8)
    with training_autocast("cpu", "bf16"):
        y = conv(x)
    assert y.dtype == torch.bfloat16 and conv.weight.dtype == torch.float32
    y.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32
    with training_autocast("cpu", None):
        assert conv(x).dtype == torch.float32
    reused = training_autocast("cpu", "bf16")  # built once per epoch, entered at every step
    for _ in range(2):
        with reused:
            assert conv(x).dtype == torch.bfloat16
        assert conv(x).dtype == torch.float32
    with pytest.raises(ValueError, match="fp16"):
        training_autocast("cpu", "fp16")


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "mixed_precision", "warns"),
    [
        (False, False, "bf16", True),
        (True, False, "bf16", False),
        (False, True, "bf16", False),
        (False, False, None, False),
    ],
)
def test_bf16_on_a_cpu_without_bfloat16_units_warns(monkeypatch, avx512_bf16, amx, mixed_precision, warns):
    from diffusion_policy.common import pytorch_util

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pytorch_util.warn_if_bf16_is_emulated("cpu", mixed_precision) is warns
        assert pytorch_util.warn_if_bf16_is_emulated("cpu", "auto") is False, "auto never picks emulated bf16"
    # auto: bf16 exactly where the hardware has it, float32 elsewhere
    native = avx512_bf16 or amx
    assert pytorch_util.resolve_mixed_precision("cpu", "auto") == ("bf16" if native else None)
    assert pytorch_util.training_autocast("cpu", "auto").fast_dtype == torch.bfloat16 or not native
    assert pytorch_util.training_autocast("cpu", "auto")._enabled is native
    assert len(caught) == int(warns)
    if warns:
        assert "training.mixed_precision=null" in str(caught[0].message)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert pytorch_util.has_native_bf16("cpu") is None  # a torch without the probe: no false alarm
    assert pytorch_util.resolve_mixed_precision("cpu", "auto") is None  # unknown hardware: float32
