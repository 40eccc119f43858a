"""LinearNormalizer / SingleFieldLinearNormalizer: fitted values, round trips, state_dict, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from diffusion_policy.common.normalize_util import get_image_range_normalizer
from diffusion_policy.model.common.normalizer import LinearNormalizer, SingleFieldLinearNormalizer


@pytest.fixture(scope="module")
def pusht_actions(pusht_zarr_path) -> np.ndarray:
    return zarr.open_group(pusht_zarr_path, mode="r")["data/action"][:]


def _random_data(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "obs": torch.randn(500, 4, 3, generator=g) * 5 + 2,
        "action": torch.rand(500, 2, generator=g) * 100 - 30,
    }


@pytest.mark.needs_data
def test_pusht_action_limits(pusht_actions):
    normalizer = LinearNormalizer()
    normalizer.fit({"action": pusht_actions}, mode="limits")
    stats = normalizer["action"].get_input_stats()
    torch.testing.assert_close(stats["min"], torch.tensor([12.0, 25.0]))
    torch.testing.assert_close(stats["max"], torch.tensor([511.0, 511.0]))
    out = normalizer.normalize({"action": np.array([[12.0, 25.0], [511.0, 511.0]])})["action"]
    torch.testing.assert_close(out, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    normed = normalizer["action"].normalize(pusht_actions)
    assert normed.min().item() == pytest.approx(-1.0, abs=1e-6)
    assert normed.max().item() == pytest.approx(1.0, abs=1e-6)


def test_limits_maps_each_dim_to_output_range():
    data = _random_data()
    normalizer = LinearNormalizer()
    normalizer.fit(data, last_n_dims=1, mode="limits", output_min=-2.0, output_max=3.0)
    normed = normalizer.normalize(data)
    assert normed["obs"].shape == data["obs"].shape
    for key in data:
        flat = normed[key].reshape(-1, data[key].shape[-1])
        torch.testing.assert_close(flat.min(0).values, torch.full((flat.shape[1],), -2.0))
        torch.testing.assert_close(flat.max(0).values, torch.full((flat.shape[1],), 3.0))


def test_last_n_dims_fits_per_element():
    data = _random_data()["obs"]  # (500, 4, 3)
    normalizer = LinearNormalizer()
    normalizer.fit(data, last_n_dims=2)
    assert normalizer["_default"].params_dict["scale"].shape == (12,)
    normed = normalizer.normalize(data)
    torch.testing.assert_close(normed.amin(dim=0), torch.full((4, 3), -1.0))
    scalar = LinearNormalizer()
    scalar.fit(data, last_n_dims=0)
    assert scalar["_default"].params_dict["scale"].shape == (1,)
    assert scalar.normalize(data).min().item() == pytest.approx(-1.0)


def test_gaussian_mode():
    data = _random_data()
    normalizer = LinearNormalizer()
    normalizer.fit(data, mode="gaussian")
    normed = normalizer.normalize(data)["obs"].reshape(-1, 3)
    torch.testing.assert_close(normed.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed.std(0), torch.ones(3), atol=1e-5, rtol=0)
    no_offset = LinearNormalizer()
    no_offset.fit(data, mode="gaussian", fit_offset=False)
    assert torch.all(no_offset["obs"].params_dict["offset"] == 0)
    torch.testing.assert_close(no_offset["obs"].params_dict["scale"], 1 / data["obs"].reshape(-1, 3).std(0))


def test_limits_without_offset_is_symmetric():
    x = torch.tensor([[-4.0, 1.0], [2.0, 3.0]])
    normalizer = SingleFieldLinearNormalizer.create_fit(x, fit_offset=False)
    torch.testing.assert_close(normalizer.params_dict["scale"], torch.tensor([1 / 4, 1 / 3]))
    assert torch.all(normalizer.params_dict["offset"] == 0)


def test_constant_dims_use_range_eps():
    x = torch.stack([torch.linspace(0, 10, 50), torch.full((50,), 7.0), 7.0 + 1e-6 * torch.arange(50)], dim=1)
    for fit_offset in (True, False):
        normalizer = SingleFieldLinearNormalizer.create_fit(x, range_eps=1e-3, fit_offset=fit_offset)
        scale = normalizer.params_dict["scale"]
        assert torch.isfinite(scale).all()
        normed = normalizer.normalize(x)
        if fit_offset:
            assert scale[1].item() == pytest.approx(1.0) and scale[2].item() == pytest.approx(1.0)
            torch.testing.assert_close(normed[:, 1], torch.zeros(50))
        torch.testing.assert_close(normalizer.unnormalize(normed), x)
    gauss = SingleFieldLinearNormalizer.create_fit(x, mode="gaussian", range_eps=1e-3)
    assert gauss.params_dict["scale"][1].item() == 1.0
    torch.testing.assert_close(gauss.normalize(x)[:, 1], torch.zeros(50))


def test_round_trip_dict_tensor_and_numpy():
    data = _random_data()
    normalizer = LinearNormalizer()
    normalizer.fit(data)
    back = normalizer.unnormalize(normalizer.normalize(data))
    for key in data:
        torch.testing.assert_close(back[key], data[key], atol=1e-4, rtol=1e-5)
    default = LinearNormalizer()
    default.fit(data["action"].numpy())
    arr = np.random.default_rng(0).normal(size=(3, 7, 2))  # float64 numpy in, float32 torch out
    out = default.normalize(arr)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (3, 7, 2)
    torch.testing.assert_close(default.unnormalize(out), torch.from_numpy(arr).float(), atol=1e-5, rtol=1e-5)


def test_params_frozen_in_state_dict_and_follow_to():
    normalizer = LinearNormalizer()
    normalizer.fit(_random_data())
    assert all(not p.requires_grad for p in normalizer.parameters())
    keys = set(normalizer.state_dict().keys())
    for field in ("obs", "action"):
        assert {f"params_dict.{field}.scale", f"params_dict.{field}.offset"} <= keys
        assert {f"params_dict.{field}.input_stats.{s}" for s in ("min", "max", "mean", "std")} <= keys
    normalizer.to(torch.float64)
    assert normalizer["action"].params_dict["scale"].dtype == torch.float64
    assert normalizer.normalize({"action": torch.zeros(1, 2)})["action"].dtype == torch.float64


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.normalizer = LinearNormalizer()


def test_state_dict_round_trip_into_fresh_instances():
    data = _random_data()
    src = _Holder()
    src.normalizer.fit(data)
    src.normalizer["image"] = get_image_range_normalizer()
    dst = _Holder()
    result = dst.load_state_dict(src.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sorted(dst.normalizer.keys()) == ["action", "image", "obs"]
    for key in ("obs", "action"):
        torch.testing.assert_close(dst.normalizer.normalize(data)[key], src.normalizer.normalize(data)[key])
    assert all(not p.requires_grad for p in dst.normalizer.parameters())
    assert dst.normalizer["image"].normalize(torch.ones(1)).item() == 1.0
    single = SingleFieldLinearNormalizer()
    single.load_state_dict(src.normalizer["obs"].state_dict())
    torch.testing.assert_close(single.normalize(data["obs"]), src.normalizer.normalize(data)["obs"])


def test_loads_original_key_layout():
    # A hand-built dict with the original checkpoint's flat key names.
    sd = {
        "params_dict.action.scale": torch.tensor([2 / 499, 2 / 486]),
        "params_dict.action.offset": torch.tensor([-1 - 24 / 499, -1 - 50 / 486]),
        "params_dict.action.input_stats.min": torch.tensor([12.0, 25.0]),
        "params_dict.action.input_stats.max": torch.tensor([511.0, 511.0]),
        "params_dict.action.input_stats.mean": torch.tensor([250.0, 300.0]),
        "params_dict.action.input_stats.std": torch.tensor([100.0, 90.0]),
    }
    normalizer = LinearNormalizer()
    normalizer.load_state_dict(sd)
    out = normalizer.normalize({"action": torch.tensor([[12.0, 25.0], [511.0, 511.0]])})["action"]
    torch.testing.assert_close(out, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    torch.testing.assert_close(normalizer.get_input_stats()["action"]["max"], torch.tensor([511.0, 511.0]))


def test_strict_load_reports_missing_normalizer():
    fitted = _Holder()
    fitted.normalizer.fit(_random_data())
    sd = {k: v for k, v in fitted.state_dict().items() if not k.startswith("normalizer.")}
    with pytest.raises(RuntimeError, match="normalizer.params_dict"):
        fitted.load_state_dict(sd, strict=True)


def test_getitem_view_and_setitem_share_parameters():
    normalizer = LinearNormalizer()
    normalizer.fit(_random_data())
    view = normalizer["action"]
    assert view.params_dict["scale"] is normalizer.params_dict["action"]["scale"]
    other = LinearNormalizer()
    other["act"] = view
    x = torch.randn(5, 2)
    torch.testing.assert_close(
        other.normalize({"act": x})["act"], normalizer.normalize({"action": x})["action"]
    )
    assert "act" in other and "action" not in other


def test_errors_name_the_problem():
    normalizer = LinearNormalizer()
    normalizer.fit(_random_data())
    with pytest.raises(KeyError, match=r"'agent_pos'.*\['action', 'obs'\]"):
        normalizer.normalize({"agent_pos": torch.zeros(2)})
    with pytest.raises(KeyError, match="_default"):
        normalizer.normalize(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="'action' has 2 dims"):
        normalizer.normalize({"action": torch.zeros(4, 3)})
    with pytest.raises(ValueError, match="mode='minmax'"):
        normalizer.fit(torch.zeros(3, 2), mode="minmax")
    with pytest.raises(TypeError, match="list"):
        normalizer.fit({"x": [1.0, 2.0]})


def test_identity_and_manual():
    identity = SingleFieldLinearNormalizer.create_identity()
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(identity.normalize(x), x)
    with pytest.raises(ValueError, match="lacks"):
        SingleFieldLinearNormalizer.create_manual(torch.ones(2), torch.zeros(2), {"min": torch.zeros(2)})


def test_image_range_normalizer():
    normalizer = get_image_range_normalizer()
    img = torch.rand(2, 3, 3, 96, 96)
    img[0, 0, 0, 0, 0] = 0.0
    img[0, 0, 0, 0, 1] = 1.0
    out = normalizer.normalize(img)
    assert out.shape == img.shape
    torch.testing.assert_close(out, img * 2 - 1)
    assert out[0, 0, 0, 0, 0].item() == -1.0 and out[0, 0, 0, 0, 1].item() == 1.0
    torch.testing.assert_close(normalizer.unnormalize(out), img)
    stats = normalizer.get_input_stats()
    assert stats["min"].item() == 0.0 and stats["max"].item() == 1.0
    assert stats["mean"].item() == 0.5 and stats["std"].item() == pytest.approx(math.sqrt(1 / 12))
