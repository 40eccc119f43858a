"""Policy-level helpers the test modules share (fixtures built from them are in conftest.py): the PushT
window sizes and shape_meta, the original's PushT schedulers, real batches, a fixed-noise loss and counts."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn
from torch.utils.data import default_collate

HORIZON, TO, TA = 16, 2, 8
SHAPE_META = {
    "obs": {"image": {"shape": [3, 96, 96], "type": "rgb"}, "agent_pos": {"shape": [2], "type": "low_dim"}},
    "action": {"shape": [2]},
}


def ddpm(prediction_type: str = "epsilon") -> DDPMScheduler:
    # the original's PushT scheduler block
    return DDPMScheduler(
        num_train_timesteps=100,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="squaredcos_cap_v2",
        variance_type="fixed_small",
        clip_sample=True,
        prediction_type=prediction_type,
    )


def ddim() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=100,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
    )


def pusht_data(zarr: str, image: bool = False, horizon: int = HORIZON):
    """(dataset, normalizer): 90 PushT state episodes, or 2 image episodes (their frames are decoded into
    RAM), in windows of ``horizon``."""
    from diffusion_policy.dataset.pusht_dataset import PushTLowdimDataset
    from diffusion_policy.dataset.pusht_image_dataset import PushTImageDataset

    windows = {"horizon": horizon, "pad_before": TO - 1, "pad_after": TA - 1, "seed": 42, "val_ratio": 0.02}
    if image:
        dataset = PushTImageDataset(zarr, max_train_episodes=2, n_obs_steps=TO, **windows)
    else:
        dataset = PushTLowdimDataset(zarr, max_train_episodes=90, **windows)
    return dataset, dataset.get_normalizer()


def seeded_policy(build, normalizer, *args, **kwargs):
    """``build(*args, **kwargs)`` under torch seed 0 (reproducible weights), with ``normalizer`` set."""
    torch.manual_seed(0)
    policy = build(*args, **kwargs)
    policy.set_normalizer(normalizer)
    return policy


def real_batch(dataset, indices) -> dict:
    return default_collate([dataset[int(i)] for i in indices])


def count_model_calls(policy) -> list[int]:
    calls = []
    policy.model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def fixed_noise_loss(policy, batches) -> float:
    # same noise/timesteps/crops before and after training, so the comparison is not luck
    with torch.no_grad():
        losses = []
        for i, batch in enumerate(batches):
            torch.manual_seed(1000 + i)
            losses.append(policy.compute_loss(batch).item())
    return float(np.mean(losses))


def assert_training_lowers_loss(
    policy, batches, optimizer, n_steps: int, factor: float, label: str, after_first_backward=None
) -> None:
    """``n_steps`` optimizer steps over ``batches`` in turn must bring the fixed-noise loss below ``factor``
    times its value before; ``after_first_backward()`` checks the first step's gradients."""
    before = fixed_noise_loss(policy, batches)
    assert np.isfinite(before)
    for step in range(n_steps):
        loss = policy.compute_loss(batches[step % len(batches)])
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        if step == 0 and after_first_backward is not None:
            after_first_backward()
        optimizer.step()
    after = fixed_noise_loss(policy, batches)
    print(f"{label}: fixed-noise loss {before:.3f} -> {after:.3f}")
    assert after < factor * before, (before, after)


def assert_image_policy_learns(policy, dataset, label: str) -> None:
    """16 AdamW steps on two batches of 4 windows of the image data lower the fixed-noise loss by 15% (a
    real signal: the comparison is paired, same noise, timesteps and crops), and the first step's gradients
    reach the image encoder. Every parameter trains, encoder included; steps are few because the ResNet's
    backward pass dominates on CPU."""
    batches = [real_batch(dataset, [0, 29, 58, 87]), real_batch(dataset, [116, 145, 174, 203])]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=2e-3)

    def encoder_gets_gradients():
        grads = [p.grad for p in policy.obs_encoder.parameters() if p.numel()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)

    assert_training_lowers_loss(policy, batches, optimizer, 16, 0.85, label, encoder_gets_gradients)


def n_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
