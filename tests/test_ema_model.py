"""EMAModel: the original's decay schedule and copy rules, and a resumable step counter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from diffusion_policy.model.diffusion.ema_model import EMAModel


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)


def perturb(model: nn.Module, amount: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount)
        model.bn.running_mean.add_(amount)


def test_decay_schedule():
    ema = EMAModel(Net(), power=0.75)
    assert ema.get_decay(0) == 0.0
    assert ema.get_decay(1) == 0.0
    assert ema.get_decay(2) == pytest.approx(1 - 2**-0.75)
    assert ema.get_decay(10_001) == pytest.approx(1 - 10_001**-0.75)
    assert 0.9989 < ema.get_decay(10_001) < 0.9991
    assert ema.get_decay(10_000_000) == 0.9999  # max_value cap
    shifted = EMAModel(Net(), update_after_step=5, power=0.75, min_value=0.5)
    assert shifted.get_decay(6) == 0.0
    assert shifted.get_decay(7) == 0.5  # 1 - 2**-0.75 = 0.405 raised to min_value
    assert EMAModel(Net(), inv_gamma=2.0, power=1.0).get_decay(5) == pytest.approx(1 - 1 / 3)


def test_step_averages_trainable_and_copies_the_rest():
    torch.manual_seed(0)
    live = Net()
    ema = EMAModel(copy.deepcopy(live), power=0.75)
    assert not ema.averaged_model.training
    assert not any(p.requires_grad for p in ema.averaged_model.parameters())

    perturb(live, 1.0)
    ema.step(live)  # step 0: decay 0 -> straight copy
    assert ema.decay == 0.0 and ema.optimization_step == 1
    torch.testing.assert_close(ema.averaged_model.lin.weight, live.lin.weight)

    ema.step(live)
    ema.step(live)  # step 2: first real average
    before = copy.deepcopy(ema.averaged_model)
    perturb(live, 1.0)
    ema.step(live)
    decay = ema.get_decay(3)
    assert ema.decay == decay and 0 < decay < 1
    expected = decay * before.lin.weight + (1 - decay) * live.lin.weight
    torch.testing.assert_close(ema.averaged_model.lin.weight, expected)
    # BatchNorm affine params and frozen params are copied, not averaged
    torch.testing.assert_close(ema.averaged_model.bn.weight, live.bn.weight)
    torch.testing.assert_close(ema.averaged_model.frozen, live.frozen)
    # buffers are not touched (original behaviour): running stats keep their initial zeros
    assert torch.count_nonzero(ema.averaged_model.bn.running_mean) == 0


def test_state_dict_round_trip_continues_the_same_decay():
    torch.manual_seed(0)
    live = Net()
    ema = EMAModel(copy.deepcopy(live), power=0.75)
    for i in range(7):
        perturb(live, 0.1 * i)
        ema.step(live)
    state = ema.state_dict()
    assert state["optimization_step"] == 7
    assert state["decay"] == pytest.approx(ema.get_decay(6))

    resumed = EMAModel(copy.deepcopy(ema.averaged_model), power=0.75)
    resumed.load_state_dict(state)
    assert resumed.optimization_step == 7 and resumed.decay == ema.decay
    perturb(live, 0.5)
    ema.step(live)
    resumed.step(live)
    assert resumed.decay == ema.decay == pytest.approx(1 - 7**-0.75)
    torch.testing.assert_close(resumed.averaged_model.lin.weight, ema.averaged_model.lin.weight)

    # a fresh EMA without the state would restart the warmup and just copy the live weights
    fresh = EMAModel(copy.deepcopy(ema.averaged_model), power=0.75)
    fresh.step(live)
    assert fresh.decay == 0.0


def test_load_rejects_other_hyper_parameters():
    state = EMAModel(Net(), power=0.75).state_dict()
    with pytest.raises(ValueError, match="power=0.75"):
        EMAModel(Net(), power=2 / 3).load_state_dict(state)


def test_foreach_update_matches_the_originals_per_parameter_loop():
    """The shipped multi-tensor lerp gives the original's per-parameter result (ema * decay, then
    + (1 - decay) * live, one tensor at a time) over a run of steps, to float rounding."""
    torch.manual_seed(0)
    live = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    live.add_module("bn", nn.BatchNorm1d(5))
    ema = EMAModel(copy.deepcopy(live), power=0.75)
    reference = copy.deepcopy(live)
    reference.requires_grad_(False)
    for step in range(12):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ema.step(live)
        decay = ema.get_decay(step)
        with torch.no_grad():
            for module, ref_module in zip(live.modules(), reference.modules()):
                for p, r in zip(module.parameters(recurse=False), ref_module.parameters(recurse=False)):
                    if isinstance(module, nn.BatchNorm1d):
                        r.copy_(p)
                    else:
                        r.mul_(decay)
                        r.add_(p, alpha=1 - decay)
    assert ema.decay > 0.5  # the run got past the copy-only warm-up
    for (name, got), (_, want) in zip(
        ema.averaged_model.named_parameters(), reference.named_parameters(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
