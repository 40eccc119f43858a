"""Per-field affine normalizers whose parameters live in the module's state_dict.

A ``LinearNormalizer`` holds one field per data key (``"action"``, ``"obs"``, ``"agent_pos"``, ...);
each field is a per-dimension map ``y = x * scale + offset`` plus the statistics it was fitted on.
State-dict keys follow the original layout, ``params_dict.<field>.scale|offset`` and
``params_dict.<field>.input_stats.min|max|mean|std``, so normalizers saved by the original load here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

DEFAULT_KEY = "_default"
STAT_NAMES = ("min", "max", "mean", "std")

ArrayLike = torch.Tensor | np.ndarray


def _as_tensor(x: ArrayLike, name: str = "input") -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _tree_to_parameter_dict(tree: dict[str, Any]) -> nn.ParameterDict:
    out = nn.ParameterDict()
    for k, v in tree.items():
        out[k] = _tree_to_parameter_dict(v) if isinstance(v, dict) else _frozen(v)
    return out


class DictOfTensorMixin(nn.Module):
    """Holds a (nested) ``nn.ParameterDict`` that a fresh instance can rebuild from any state_dict.

    ``nn.Module.load_state_dict`` only copies into parameters that already exist, so an empty
    normalizer would reject a fitted one's entries; rebuilding the dict from the flat keys first
    makes ``LinearNormalizer().load_state_dict(sd)`` work without knowing the fields in advance.
    """

    def __init__(self, params_dict: nn.ParameterDict | None = None) -> None:
        super().__init__()
        self.params_dict = nn.ParameterDict() if params_dict is None else params_dict

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters())).device

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        root = prefix + "params_dict."
        tree: dict[str, Any] = {}
        for key, value in state_dict.items():
            if not key.startswith(root):
                continue
            *parents, leaf = key[len(root) :].split(".")
            node = tree
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value.detach().clone()
        if tree:
            # Keep the current device when the module was already moved (policy.to("cuda") then load).
            current = next(iter(self.params_dict.parameters()), None)
            rebuilt = _tree_to_parameter_dict(tree)
            if current is not None:
                rebuilt = rebuilt.to(current.device)
            self.params_dict = rebuilt
            self.params_dict.requires_grad_(False)
        # With no entries the existing fields stay, and the child ParameterDicts report them missing.
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _affine(x: ArrayLike, params: nn.ParameterDict, forward: bool, field: str) -> torch.Tensor:
    x = _as_tensor(x, f"value for normalizer field {field!r}")
    scale = params["scale"]
    offset = params["offset"]
    x = x.to(device=scale.device, dtype=scale.dtype)
    d = scale.shape[0]
    if d > 1:
        # The field's dims must be the product of some trailing dims of x; anything else would
        # reshape silently into the wrong layout.
        trailing = 1
        for size in reversed(x.shape):
            trailing *= size
            if trailing >= d:
                break
        if trailing != d:
            raise ValueError(
                f"normalizer field {field!r} has {d} dims but got input of shape {tuple(x.shape)}; "
                f"its trailing dims must multiply to {d}"
            )
    src_shape = x.shape
    x = x.reshape(-1, d)
    x = x * scale + offset if forward else (x - offset) / scale
    return x.reshape(src_shape)


class SingleFieldLinearNormalizer(DictOfTensorMixin):
    """Affine normalizer for one array: ``normalize(x) = x * scale + offset`` over the last dims."""

    @torch.no_grad()
    def fit(
        self,
        data: ArrayLike,
        last_n_dims: int = 1,
        dtype: torch.dtype = torch.float32,
        mode: str = "limits",
        output_max: float = 1.0,
        output_min: float = -1.0,
        range_eps: float = 1e-4,
        fit_offset: bool = True,
    ) -> None:
        """Fits ``scale`` / ``offset`` per dimension of the last ``last_n_dims`` dims of ``data``: ``limits``
        maps [min, max] onto [output_min, output_max], ``gaussian`` to zero mean and unit std; dims whose
        range (or std) is below ``range_eps`` are kept constant."""
        if mode not in ("limits", "gaussian"):
            raise ValueError(f"normalizer mode={mode!r} is unknown; use 'limits' or 'gaussian'")
        if last_n_dims < 0:
            raise ValueError(f"last_n_dims={last_n_dims} must be >= 0")
        if not output_max > output_min:
            raise ValueError(f"output_max={output_max} must be greater than output_min={output_min}")
        x = _as_tensor(data, "normalizer fit data").detach().to(dtype=dtype)
        if x.numel() == 0:
            raise ValueError(f"cannot fit a normalizer on empty data of shape {tuple(x.shape)}")
        if last_n_dims > x.ndim:
            raise ValueError(f"last_n_dims={last_n_dims} exceeds the data's {x.ndim} dims {tuple(x.shape)}")
        dim = int(np.prod(x.shape[x.ndim - last_n_dims :])) if last_n_dims > 0 else 1
        x = x.reshape(-1, dim)

        x_min = x.min(dim=0).values
        x_max = x.max(dim=0).values
        x_mean = x.mean(dim=0)
        x_std = x.std(dim=0)

        if mode == "limits":
            if fit_offset:
                in_range = x_max - x_min
                const = in_range < range_eps
                in_range = torch.where(const, torch.full_like(in_range, output_max - output_min), in_range)
                scale = (output_max - output_min) / in_range
                offset = output_min - scale * x_min
                # Constant dims map to the middle of the output range.
                offset = torch.where(const, (output_max + output_min) / 2 - x_min, offset)
            else:
                out_abs = min(abs(output_min), abs(output_max))
                in_abs = torch.maximum(x_min.abs(), x_max.abs())
                in_abs = torch.where(in_abs < range_eps, torch.full_like(in_abs, out_abs), in_abs)
                scale = out_abs / in_abs
                offset = torch.zeros_like(x_mean)
        else:
            # ~(std >= eps) also catches the NaN std of a single sample.
            std = torch.where(~(x_std >= range_eps), torch.ones_like(x_std), x_std)
            scale = 1.0 / std
            offset = -x_mean * scale if fit_offset else torch.zeros_like(x_mean)

        stats = {"min": x_min, "max": x_max, "mean": x_mean, "std": x_std}
        self.params_dict = _tree_to_parameter_dict({"scale": scale, "offset": offset, "input_stats": stats})

    @classmethod
    def create_fit(cls, data: ArrayLike, **kwargs) -> SingleFieldLinearNormalizer:
        obj = cls()
        obj.fit(data, **kwargs)
        return obj

    @classmethod
    def create_manual(
        cls,
        scale: ArrayLike,
        offset: ArrayLike,
        input_stats_dict: dict[str, ArrayLike],
    ) -> SingleFieldLinearNormalizer:
        scale_t = _as_tensor(scale, "scale").flatten()
        offset_t = _as_tensor(offset, "offset").flatten().to(scale_t.dtype)
        if scale_t.shape != offset_t.shape:
            raise ValueError(
                f"scale {tuple(scale_t.shape)} and offset {tuple(offset_t.shape)} differ in shape"
            )
        missing = [k for k in STAT_NAMES if k not in input_stats_dict]
        if missing:
            raise ValueError(f"input_stats_dict lacks {missing}; it needs {list(STAT_NAMES)}")
        stats = {}
        for k in STAT_NAMES:
            v = _as_tensor(input_stats_dict[k], f"input_stats_dict[{k!r}]").flatten().to(scale_t.dtype)
            if v.shape != scale_t.shape:
                raise ValueError(
                    f"input_stats_dict[{k!r}] has shape {tuple(v.shape)}, expected {tuple(scale_t.shape)}"
                )
            stats[k] = v
        params = _tree_to_parameter_dict({"scale": scale_t, "offset": offset_t, "input_stats": stats})
        return cls(params)

    @classmethod
    def create_identity(cls, dtype: torch.dtype = torch.float32) -> SingleFieldLinearNormalizer:
        one = torch.tensor([1.0], dtype=dtype)
        zero = torch.tensor([0.0], dtype=dtype)
        stats = {"min": -one, "max": one.clone(), "mean": zero.clone(), "std": one.clone()}
        return cls.create_manual(one, zero, stats)

    def _check_fitted(self) -> None:
        if "scale" not in self.params_dict:
            raise RuntimeError("SingleFieldLinearNormalizer is not fitted; call fit() or load a state_dict")

    def normalize(self, x: ArrayLike) -> torch.Tensor:
        """x: (..., *field_shape) -> same shape, normalized."""
        self._check_fitted()
        return _affine(x, self.params_dict, True, "single")

    def unnormalize(self, x: ArrayLike) -> torch.Tensor:
        """x: (..., *field_shape) -> same shape, mapped back to data units."""
        self._check_fitted()
        return _affine(x, self.params_dict, False, "single")

    def get_input_stats(self) -> nn.ParameterDict:
        self._check_fitted()
        return self.params_dict["input_stats"]

    def get_output_stats(self) -> dict[str, torch.Tensor]:
        return {k: self.normalize(v) for k, v in self.get_input_stats().items()}

    def forward(self, x: ArrayLike) -> torch.Tensor:
        return self.normalize(x)


class LinearNormalizer(DictOfTensorMixin):
    """A normalizer with one field per key.

    ``fit(dict)`` fits one field per key; ``fit(tensor)`` fits the ``"_default"`` field that
    tensor inputs to ``normalize``/``unnormalize`` use.
    """

    @torch.no_grad()
    def fit(self, data: dict[str, ArrayLike] | ArrayLike, **options: Any) -> None:
        """Fits each field as :meth:`SingleFieldLinearNormalizer.fit` does, with the same ``options``
        (``last_n_dims``, ``dtype``, ``mode``, ``output_max``, ``output_min``, ``range_eps``, ``fit_offset``)
        and defaults; a field's fitting lives there only, so the two cannot drift apart."""
        items = data.items() if isinstance(data, dict) else [(DEFAULT_KEY, data)]
        for key, value in items:
            self._check_key(key)
            self.params_dict[key] = SingleFieldLinearNormalizer.create_fit(value, **options).params_dict

    @staticmethod
    def _check_key(key: Any) -> None:
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(f"normalizer key {key!r} must be a non-empty str without '.'")

    def _field(self, key: str) -> nn.ParameterDict:
        if key not in self.params_dict:
            known = sorted(self.params_dict.keys())
            hint = " (a bare tensor needs a normalizer fitted on a tensor)" if key == DEFAULT_KEY else ""
            raise KeyError(f"normalizer has no field {key!r}{hint}; known fields: {known}")
        return self.params_dict[key]

    def _map(self, x: dict[str, ArrayLike] | ArrayLike, forward: bool):
        if isinstance(x, dict):
            return {k: _affine(v, self._field(k), forward, k) for k, v in x.items()}
        return _affine(x, self._field(DEFAULT_KEY), forward, DEFAULT_KEY)

    def normalize(self, x: dict[str, ArrayLike] | ArrayLike) -> dict[str, torch.Tensor] | torch.Tensor:
        """Tensor (..., D) via the ``_default`` field, or a dict mapping each key with its own field."""
        return self._map(x, True)

    def unnormalize(self, x: dict[str, ArrayLike] | ArrayLike) -> dict[str, torch.Tensor] | torch.Tensor:
        """Inverse of ``normalize``; same input forms."""
        return self._map(x, False)

    def forward(self, x):
        return self.normalize(x)

    def __getitem__(self, key: str) -> SingleFieldLinearNormalizer:
        return SingleFieldLinearNormalizer(self._field(key))

    def __setitem__(self, key: str, value: SingleFieldLinearNormalizer) -> None:
        self._check_key(key)
        if not isinstance(value, SingleFieldLinearNormalizer):
            raise TypeError(
                f"normalizer[{key!r}] must be a SingleFieldLinearNormalizer, got {type(value).__name__}"
            )
        value._check_fitted()
        self.params_dict[key] = value.params_dict

    def __contains__(self, key: object) -> bool:
        return key in self.params_dict

    def keys(self) -> list[str]:
        return list(self.params_dict.keys())

    def get_input_stats(self) -> dict[str, Any]:
        if not self.params_dict:
            raise RuntimeError("LinearNormalizer is empty; call fit() or load a state_dict")
        if DEFAULT_KEY in self.params_dict:
            return self.params_dict[DEFAULT_KEY]["input_stats"]
        return {k: v["input_stats"] for k, v in self.params_dict.items()}

    def get_output_stats(self) -> dict[str, Any]:
        if DEFAULT_KEY in self.params_dict:
            return {k: self.normalize(v) for k, v in self.get_input_stats().items()}
        return {
            key: {k: _affine(v, self.params_dict[key], True, key) for k, v in stats.items()}
            for key, stats in self.get_input_stats().items()
        }
