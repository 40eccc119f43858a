"""Parameter order: every policy registers its parameters in the original's order, and optimizer state is
placed on parameters by name, whatever order a checkpoint was written in.

``fixtures/original_parameter_order.json`` is data taken from the original code (see its ``_source``):
the names of ``named_parameters()`` of each of the five PushT policies at tiny sizes, and the transformer
policies' optimizer groups. AdamW state in the original's checkpoints is stored by position in that order.

``fixtures/checkpoint_unet_lowdim_before_parameter_reorder.ckpt`` was written by this framework before its
UNet took the original's order (commit 07b2296, ``python train.py debug=smoke
policy.model.down_dims=[8,16] policy.model.diffusion_step_embed_dim=8``, the top-k file of epoch 0): its
optimizer state is in the old order (step encoder, mid, down, up, final) and it stores no names.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from torch import nn

from diffusion_policy.common.checkpoint_io import load_checkpoint_file, save_checkpoint_file
from diffusion_policy.common.config_resolvers import register_resolvers
from diffusion_policy.common.errors import CheckpointError
from diffusion_policy.common.optimizer_state import group_param_names, place_by_name, with_param_names
from tests.helpers import ENV

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
ORIGINAL = json.loads((FIXTURES / "original_parameter_order.json").read_text())["policies"]
OLD_ORDER_CKPT = FIXTURES / "checkpoint_unet_lowdim_before_parameter_reorder.ckpt"
OLD_ORDER_OVERRIDES = [
    "debug=smoke",
    "policy.model.down_dims=[8,16]",
    "policy.model.diffusion_step_embed_dim=8",
]

register_resolvers()


def build_workspace(config_name: str, overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    return get_class(cfg._target_)(cfg, output_dir=str(output_dir))


# ----------------------------------------------------------------------------- the original's order
@pytest.mark.parametrize("kind", list(ORIGINAL))
def test_named_parameters_follow_the_originals_order(kind, tmp_path):
    entry = ORIGINAL[kind]
    workspace = build_workspace(entry["config_name"], entry["overrides"], tmp_path)
    policy = workspace.model
    assert f"{type(policy).__module__}.{type(policy).__name__}" == entry["policy"]
    assert [name for name, _ in policy.named_parameters()] == entry["named_parameters"]
    # the state dict lists the same parameters in the same order (buffers in between)
    params = set(entry["named_parameters"])
    assert [k for k in policy.state_dict() if k in params] == entry["named_parameters"]
    # the optimizer's groups hold the original's names in the original's order
    groups = entry.get("optimizer_groups", [entry["named_parameters"]])
    assert group_param_names(workspace.optimizer, policy) == groups


# ----------------------------------------------------------------------------- placing state by name
class _Net(nn.Module):
    """Two layers of different shapes, registered in the order given."""

    def __init__(self, order: tuple[str, str]):
        super().__init__()
        layers = {"a": nn.Linear(3, 4), "b": nn.Linear(4, 2)}
        for name in order:
            setattr(self, name, layers[name])


def _stepped(order: tuple[str, str]) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = _Net(("a", "b"))  # same initial weights whatever the registration order
    if order != ("a", "b"):
        reordered = _Net(order)
        reordered.load_state_dict(net.state_dict())
        net = reordered
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net.b(net.a(torch.ones(5, 3))).square().sum().backward()
    opt.step()
    return net, opt


def test_state_from_another_registration_order_lands_on_the_same_names():
    written, written_opt = _stepped(("b", "a"))  # the writer registered b first
    saved, saved_keys = written_opt.state_dict(), list(written.state_dict())
    assert saved_keys[0].startswith("b.")
    reader, reader_opt = _stepped(("a", "b"))
    reader_opt.load_state_dict(place_by_name(saved, reader_opt, reader, saved_keys))
    got = dict(reader.named_parameters())
    want = dict(written.named_parameters())
    for name in want:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(reader_opt.state[got[name]][key], written_opt.state[want[name]][key]), name
    # position alone would have put b's moments on a's weight: torch accepts that only to fail later
    with pytest.raises(RuntimeError):
        reader_opt.load_state_dict(saved)
        reader_opt.step()


def test_stored_names_win_over_the_state_dict_order():
    written, written_opt = _stepped(("b", "a"))
    named = with_param_names(written_opt.state_dict(), written_opt, written)
    assert named["param_groups"][0]["param_names"][0] == "b.weight"
    reader, reader_opt = _stepped(("a", "b"))
    # a model state dict in some unrelated order does not matter once names are stored
    placed = place_by_name(named, reader_opt, reader, saved_model_keys=sorted(written.state_dict()))
    assert "param_names" not in placed["param_groups"][0]
    reader_opt.load_state_dict(placed)
    assert torch.equal(
        reader_opt.state[reader.a.weight]["exp_avg"], written_opt.state[written.a.weight]["exp_avg"]
    )


def test_mismatched_state_is_refused_in_one_line():
    written, written_opt = _stepped(("b", "a"))
    saved = written_opt.state_dict()
    reader, reader_opt = _stepped(("a", "b"))
    # the file's model order says a came first, but its moments are b's: the shapes tell
    with pytest.raises(CheckpointError, match=r"'exp_avg' of parameter 'a.weight' has shape \[2, 4\]") as e:
        place_by_name(saved, reader_opt, reader, saved_model_keys=list(reader.state_dict()), source="f.ckpt")
    assert "\n" not in str(e.value) and "f.ckpt" in str(e.value)
    # a name this code does not have
    named = with_param_names(saved, written_opt, written)
    named["param_groups"][0]["param_names"][0] = "c.weight"
    with pytest.raises(CheckpointError, match="parameter 'c.weight' is in optimizer group 0 of the file but"):
        place_by_name(named, reader_opt, reader, saved_model_keys=[])
    # a different number of groups
    two_groups = torch.optim.AdamW([{"params": reader.a.parameters()}, {"params": reader.b.parameters()}])
    with pytest.raises(CheckpointError, match="1 parameter groups where this code builds 2"):
        place_by_name(saved, two_groups, reader, saved_model_keys=list(written.state_dict()))


def test_parameters_keep_their_group():
    # the transformer's decay / no-decay groups: a parameter's state and hyperparameters stay in its group
    net, _ = _stepped(("a", "b"))
    decay = [net.a.weight, net.b.weight]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": [net.a.bias, net.b.bias]}])
    net.b(net.a(torch.ones(5, 3))).square().sum().backward()
    opt.step()
    named = with_param_names(opt.state_dict(), opt, net)
    assert named["param_groups"][0]["param_names"] == ["a.weight", "b.weight"]
    fresh = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": [net.a.bias, net.b.bias]}])
    fresh.load_state_dict(place_by_name(named, fresh, net, saved_model_keys=[]))
    assert fresh.param_groups[0]["weight_decay"] == 0.1 and fresh.param_groups[1]["weight_decay"] == 0.01
    swapped = copy.deepcopy(named)
    swapped["param_groups"][0]["param_names"][1] = "b.bias"
    swapped["param_groups"][1]["param_names"][1] = "b.weight"
    with pytest.raises(
        CheckpointError, match="parameter 'b.bias' is in optimizer group 0 of the file but in group 1"
    ):
        place_by_name(swapped, fresh, net, saved_model_keys=[])


def test_checkpoints_store_parameter_names(tmp_path):
    entry = ORIGINAL["tlowdim"]
    workspace = build_workspace(entry["config_name"], entry["overrides"], tmp_path)
    path = workspace.save_checkpoint(path=tmp_path / "named.ckpt")
    groups = load_checkpoint_file(path)["state_dicts"]["optimizer"]["param_groups"]
    assert [g["param_names"] for g in groups] == entry["optimizer_groups"]


# ----------------------------------------------------------------------------- checkpoints of the old order
def old_order_workspace(workdir: Path):
    return build_workspace("train_diffusion_unet_lowdim_workspace", OLD_ORDER_OVERRIDES, workdir)


def fixture_param_names(old: dict, trained: list[str]) -> list[str]:
    """The parameter name at each position of the old-order fixture's optimizer state, given the names the
    optimizer trains. The file holds no names; a module's state dict lists parameters in registration order,
    the order ``parameters()`` handed them to the optimizer, so position k belongs to the k-th trained
    parameter of the saved model state."""
    trained = set(trained)
    return [key for key in old["state_dicts"]["model"] if key in trained]


def test_checkpoint_written_before_the_reorder_puts_adam_state_on_its_parameters(tmp_path):
    """Bit for bit: every parameter gets the AdamW moments the old-order file stored at its old position."""
    old = load_checkpoint_file(OLD_ORDER_CKPT)
    workspace = old_order_workspace(tmp_path)
    workspace.load_checkpoint(OLD_ORDER_CKPT)
    params = dict(workspace.model.named_parameters())
    (trained,) = group_param_names(workspace.optimizer, workspace.model)
    old_order = fixture_param_names(old, trained)
    assert sorted(old_order) == sorted(trained) and old_order != trained  # really another order
    saved = old["state_dicts"]["optimizer"]["state"]
    assert set(saved) <= set(range(len(old_order))) and len(saved) > len(old_order) // 2
    for position, name in enumerate(old_order):
        placed = workspace.optimizer.state.get(params[name], {})
        if position not in saved:  # never had a gradient (e.g. _dummy_variable): no state, then or now
            assert not placed, name
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            assert placed[key].shape == params[name].shape, name
            assert torch.equal(placed[key], saved[position][key]), (name, key)
        assert float(placed["step"]) == float(saved[position]["step"])


@pytest.mark.needs_data
def test_checkpoint_written_before_the_reorder_resumes_to_the_end(pusht_zarr_path, tmp_path):
    """The old-order fixture (epoch 1 of a 2-epoch run) resumed by train.py ends where an uninterrupted run
    ends (epoch, step count, optimizer names, EMA and LR-schedule state), with the weights and moments of the
    same state resumed from a file that stores parameter names.

    The weights are not compared with the uninterrupted run: the fixture's first epoch ran on the machine that
    wrote it, and AdamW turns another CPU's last-bit differences into differences of the order of the
    learning rate (measured: 9e-5 on an AMD EPYC). The named reference starts from the fixture's own state,
    so both second epochs run here; where the moments land is checked bit for bit by the test above."""
    old = load_checkpoint_file(OLD_ORDER_CKPT)
    assert list(old["state_dicts"]["model"])[1].startswith("model.diffusion_step_encoder.")
    assert "param_names" not in old["state_dicts"]["optimizer"]["param_groups"][0]
    assert old["state"]["epoch"] == 1

    def train(run_dir: Path) -> dict:
        args = [*OLD_ORDER_OVERRIDES, f"task.dataset.zarr_path={pusht_zarr_path}", f"hydra.run.dir={run_dir}"]
        proc = subprocess.run(
            [sys.executable, "train.py", *args], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return load_checkpoint_file(run_dir / "checkpoints" / "latest.ckpt")

    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copyfile(OLD_ORDER_CKPT, resumed_dir / "checkpoints" / "latest.ckpt")
    # the same file with each position's name stored (fixture_param_names)
    named_dir = tmp_path / "named"
    named_payload = copy.deepcopy(old)
    fresh = old_order_workspace(tmp_path / "fresh")
    (trained,) = group_param_names(fresh.optimizer, fresh.model)
    named_group = named_payload["state_dicts"]["optimizer"]["param_groups"][0]
    named_group["param_names"] = fixture_param_names(old, trained)
    save_checkpoint_file(named_payload, named_dir / "checkpoints" / "latest.ckpt")
    resumed, uninterrupted, named = train(resumed_dir), train(tmp_path / "uninterrupted"), train(named_dir)
    assert resumed["state"]["epoch"] == uninterrupted["state"]["epoch"] == named["state"]["epoch"] == 2
    assert resumed["state"]["global_step"] == uninterrupted["state"]["global_step"]
    for part in ("model", "ema_model"):
        for key, want in named["state_dicts"][part].items():
            torch.testing.assert_close(resumed["state_dicts"][part][key], want, rtol=1e-5, atol=1e-6)
    got_opt, want_opt = resumed["state_dicts"]["optimizer"], uninterrupted["state_dicts"]["optimizer"]
    assert got_opt["param_groups"][0]["param_names"] == want_opt["param_groups"][0]["param_names"]
    assert sorted(got_opt["state"]) == sorted(want_opt["state"])
    for index, want in named["state_dicts"]["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got_opt["state"][index][key], want[key], rtol=1e-5, atol=1e-7)
    assert resumed["state_dicts"]["ema"] == uninterrupted["state_dicts"]["ema"]
    assert (
        resumed["state_dicts"]["lr_scheduler"]["last_epoch"]
        == uninterrupted["state_dicts"]["lr_scheduler"]["last_epoch"]
    )
