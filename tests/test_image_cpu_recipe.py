"""The 2-core CPU image recipe (``experiment=pusht_image_cpu``): its values compose onto the paper's hybrid
recipe, and it trains two tiny epochs end to end with its real hyper-parameters, only shrunk by overrides,
resuming exactly after SIGKILL. Its speed settings: bf16 autocast and the encoder in channels_last."""

from __future__ import annotations

import copy
import functools
import json
import warnings

import pytest
import torch
from hydra.utils import instantiate

from diffusion_policy.workspace.base_workspace import load_policy
from tests.helpers import (
    assert_ok,
    assert_one_line_error,
    compose_config,
    evaluate_in_process,
    run_cli,
    trained_run,
)
from tests.policy_helpers import real_batch, seeded_policy
from tests.resume_check import assert_same_training_state, kill_then_resume

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
    # measured over whole runs: 3e-4 reached 0.807 on 500 seeds (DDIM-8), 1e-3 0.679 (docs/results.md)
    assert cpu.optimizer.lr == 3e-4 and paper.optimizer.lr == 1e-4
    assert cpu.training.mixed_precision == "auto" and paper.training.mixed_precision is None
    assert cpu.training.channels_last is True and paper.training.channels_last is False
    assert cpu.shape_meta == paper.shape_meta and cpu.horizon == paper.horizon
    policy = instantiate(cpu.policy)
    n_params = sum(p.numel() for p in policy.parameters())
    assert 6e6 < n_params < 9e6, n_params  # 2.8 M encoder + 4.9 M UNet, measured with the profile script


def recipe_args(zarr: str, run_dir, *extra: str) -> list[str]:
    return [
        "train.py",
        f"--config-name={HYBRID}",
        *RECIPE,
        *SHRINK,
        f"task.dataset.zarr_path={zarr}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, pusht_zarr_path):
    return trained_run(tmp_path_factory, "cpu_image", lambda run_dir: recipe_args(pusht_zarr_path, run_dir))


@pytest.mark.needs_data
def test_cpu_image_recipe_trains_two_tiny_epochs_and_evaluates(recipe_run, tmp_path):
    run_dir = recipe_run
    logs = [json.loads(line) for line in (run_dir / "logs.json.txt").read_text().splitlines()]
    assert [r["epoch"] for r in logs if "test/mean_score" in r] == [0, 1]
    losses = [r["train_loss"] for r in logs if "train_loss" in r]
    assert len(losses) >= 4 and all(torch.isfinite(torch.tensor(losses)))
    policy, cfg = load_policy(run_dir / "checkpoints" / "latest.ckpt", "cpu")
    assert cfg.policy.obs_encoder_backbone_width == 32 and cfg.training.mixed_precision == "auto"
    assert cfg.training.channels_last is True
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # bf16 autocast keeps float32 weights
    out, latest = tmp_path / "eval", run_dir / "checkpoints" / "latest.ckpt"
    assert_ok(run_cli(["eval.py", "-c", str(latest), "-o", str(out), "-d", "cpu", "--noise-seed", "0"]))
    score = json.loads((out / "eval_log.json").read_text())["test/mean_score"]
    # with seeded noise an evaluation is reproducible: the same checkpoint evaluated again, in this process
    assert score == evaluate_in_process(latest, tmp_path / "again", noise_seed=0)["test/mean_score"]


@pytest.mark.needs_data
def test_cpu_image_recipe_resumes_exactly_after_sigkill(recipe_run, pusht_zarr_path, tmp_path):
    # channels_last converts the encoder after the checkpoint is loaded: the resumed optimizer moments and
    # weights must still continue the run exactly
    resumed = kill_then_resume(functools.partial(recipe_args, pusht_zarr_path), tmp_path / "killed", epoch=1)
    assert_same_training_state(recipe_run / "checkpoints" / "latest.ckpt", resumed)


@pytest.mark.needs_data
def test_channels_last_encoder_computes_the_same_function_and_keeps_plain_values(image_data):
    dataset, normalizer = image_data
    cfg = compose_config(HYBRID, ["debug=smoke_image"])
    plain = seeded_policy(instantiate, normalizer, cfg.policy)
    nhwc = copy.deepcopy(plain)
    assert nhwc.encoder_channels_last()
    convs = [m.weight for m in nhwc.obs_encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs), "the k x k kernels changed layout"
    batch = real_batch(dataset, range(4))
    losses = []
    for policy in (plain, nhwc):
        torch.manual_seed(7)  # same noise, timesteps and random crops on both sides
        losses.append(policy.train().compute_loss(batch))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)

    # the gradients, in float64: in float32 the deepest GroupNorm layers (3 x 3 maps) amplify rounding to
    # ~1 % either way (plain float32 against float64: 1.5 %; channels_last: 0.1 %), which would hide a bug
    obs = {k: v[:, 0].double() for k, v in batch["obs"].items()}
    grads = []
    for encoder in (plain.obs_encoder, nhwc.obs_encoder):
        encoder = copy.deepcopy(encoder).double().train()
        torch.manual_seed(7)
        features = encoder(obs)
        (features * torch.linspace(-1, 1, features.shape[-1], dtype=torch.float64)).sum().backward()
        grads.append({n: p.grad for n, p in encoder.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, grad in grads[0].items():
        torch.testing.assert_close(
            grads[1][name], grad, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
        )

    # the same keys and values; a plain policy takes them as they are
    fresh = seeded_policy(instantiate, normalizer, cfg.policy)
    fresh.load_state_dict(nhwc.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.needs_data
def test_channels_last_without_an_image_encoder_is_one_clear_error(pusht_zarr_path, tmp_path):
    proc = run_cli(
        [
            "train.py",
            "debug=smoke",
            "training.channels_last=true",
            f"task.dataset.zarr_path={pusht_zarr_path}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert_one_line_error(
        proc, "training.channels_last=true", "no image encoder", "training.channels_last=false"
    )


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
