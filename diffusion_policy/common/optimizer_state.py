"""Optimizer state placed on parameters by name, not by position.

``torch.optim.Optimizer.state_dict()`` keys each parameter's state (AdamW's ``exp_avg``, ``exp_avg_sq``,
``step``) by the parameter's position in its param groups, and ``load_state_dict()`` hands it back by
position. The position of a parameter follows the order in which its module registered submodules, and that
order has differed between the original code and this one; a state loaded by position then sits on the wrong
tensors (or, where shapes differ, is refused). So every position is given a name before loading:

- checkpoints this framework writes store the names, as ``param_groups[i]["param_names"]`` (the key torch
  itself uses for optimizers built from named parameters);
- files without names (the original's checkpoints, and this framework's from before names were stored) are
  named from their own model state dict. A group that was built in ``parameters()`` order (every UNet
  policy's single group, the image encoder group of the hybrid transformer) follows the order of that
  module's entries in the saved state dict, buffers and parameters outside the optimizer left out. A group
  built in another order, i.e. the transformer's decay / no-decay groups, which the original and this code
  both list sorted by name, is built the same way on both sides, so its names are this code's own.

:func:`place_by_name` then re-keys the saved state onto this optimizer's positions and refuses, in one line,
a name or a shape that does not match.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from diffusion_policy.common.errors import CheckpointError

NAMES_KEY = "param_names"


def group_param_names(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> list[list[str]]:
    """The name (in ``module.named_parameters()``) of every parameter of every group of ``optimizer``."""
    name_of = {id(p): name for name, p in module.named_parameters()}
    names = []
    for index, group in enumerate(optimizer.param_groups):
        missing = [tuple(p.shape) for p in group["params"] if id(p) not in name_of]
        if missing:
            raise ValueError(
                f"optimizer group {index} holds a parameter of shape {list(missing[0])} that "
                f"{type(module).__name__} does not have"
            )
        names.append([name_of[id(p)] for p in group["params"]])
    return names


def with_param_names(
    state_dict: dict[str, Any], optimizer: torch.optim.Optimizer, module: torch.nn.Module
) -> dict[str, Any]:
    """``optimizer.state_dict()`` with each group's parameter names stored beside its positions."""
    groups = [
        {**group, NAMES_KEY: names}
        for group, names in zip(state_dict["param_groups"], group_param_names(optimizer, module), strict=True)
    ]
    return {**state_dict, "param_groups": groups}


def _in_module_order(names: list[str], position: dict[str, int]) -> bool:
    return all(position[a] < position[b] for a, b in zip(names, names[1:]))


def _saved_names(groups: list, current: list, position: dict, saved_keys: Iterable, source: str) -> list:
    """The parameter name at every position of the saved groups: stored, or inferred (module docstring)
    from ``current`` (this optimizer's names per group) and the saved model state dict's key order."""
    if all(NAMES_KEY in g for g in groups):
        return [list(g[NAMES_KEY]) for g in groups]
    saved_position = {key: i for i, key in enumerate(saved_keys)}
    names = []
    for group in current:
        if _in_module_order(group, position):
            absent = [n for n in group if n not in saved_position]
            if absent:
                raise CheckpointError(
                    f"checkpoint {source}: its model state has no parameter '{absent[0]}', which the "
                    "optimizer of this code holds"
                )
            group = sorted(group, key=saved_position.__getitem__)
        names.append(group)
    return names


def place_by_name(
    saved: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    module: torch.nn.Module,
    saved_model_keys: Iterable[str],
    source: str = "checkpoint",
) -> dict[str, Any]:
    """``saved`` (an optimizer state dict) re-keyed so that ``optimizer.load_state_dict`` puts every
    parameter's state on the parameter of the same name in ``module``, and each group's hyperparameters
    on the group that holds the same parameters."""
    current = group_param_names(optimizer, module)
    saved_groups = saved["param_groups"]
    if len(saved_groups) != len(current):
        raise CheckpointError(
            f"checkpoint {source}: its optimizer has {len(saved_groups)} parameter groups where this code "
            f"builds {len(current)}"
        )
    position = {name: i for i, (name, _) in enumerate(module.named_parameters())}
    names = _saved_names(saved_groups, current, position, saved_model_keys, source)
    group_of = {name: g for g, group in enumerate(current) for name in group}
    for g, (group, group_names) in enumerate(zip(saved_groups, names)):
        if len(group["params"]) != len(group_names):
            raise CheckpointError(
                f"checkpoint {source}: optimizer group {g} holds {len(group['params'])} parameters but "
                f"names {len(group_names)}"
            )
        for name in group_names:
            if group_of.get(name) != g:
                where = (
                    "not in this code's optimizer" if name not in group_of else f"in group {group_of[name]}"
                )
                raise CheckpointError(
                    f"checkpoint {source}: parameter '{name}' is in optimizer group {g} of the file but "
                    f"{where} here"
                )
        if len(set(group_names)) != len(current[g]):
            absent = sorted(set(current[g]) - set(group_names))
            raise CheckpointError(
                f"checkpoint {source}: optimizer group {g} of the file has no state slot for parameter "
                f"'{absent[0] if absent else '?'}'"
            )

    params = dict(module.named_parameters())
    index = {name: i for i, name in enumerate(n for group in current for n in group)}
    state = {}
    for group, group_names in zip(saved_groups, names):
        for saved_index, name in zip(group["params"], group_names):
            if saved_index not in saved["state"]:
                continue  # never stepped (no gradient yet), as torch leaves it
            entry = saved["state"][saved_index]
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != params[name].shape:
                    raise CheckpointError(
                        f"checkpoint {source}: optimizer state '{key}' of parameter '{name}' has shape "
                        f"{list(value.shape)} where the parameter has {list(params[name].shape)}"
                    )
            state[index[name]] = entry
    param_groups = [
        {**{k: v for k, v in group.items() if k != NAMES_KEY}, "params": [index[n] for n in group_names]}
        for group, group_names in zip(saved_groups, current)
    ]
    return {**saved, "state": state, "param_groups": param_groups}
