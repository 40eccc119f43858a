"""``training.compile=true``: torch.compile of the policy's networks for the training steps.

- every network of the five PushT recipes traces into one graph (no graph breaks);
- a tiny compiled run trains, logs its compile time, checkpoints with the usual keys, resumes exactly after
  SIGKILL and evaluates; its checkpoint loads strictly into an uncompiled policy;
- a compiled step gives the eager step's loss, gradients and update from the same state and batch.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hydra.utils import instantiate

from diffusion_policy.common import pytorch_util
from diffusion_policy.common.checkpoint_io import load_checkpoint_file
from diffusion_policy.common.json_logger import read_json_log
from diffusion_policy.workspace.base_workspace import load_policy
from tests.helpers import (
    compose_config,
    evaluate_in_process,
    trained_run,
)
from tests.policy_helpers import HORIZON, pusht_data, real_batch, seeded_policy
from tests.resume_check import assert_same_training_state, kill_then_resume

# (root config, overrides): the tiny versions of the five PushT recipes
RECIPES = {
    "unet_lowdim": ("train_diffusion_unet_lowdim_workspace", ["debug=smoke"]),
    "transformer_lowdim": ("train_diffusion_transformer_lowdim_pusht_workspace", ["debug=smoke_transformer"]),
    "unet_hybrid": ("train_diffusion_unet_hybrid_workspace", ["debug=smoke_image"]),
    "unet_image": ("train_diffusion_unet_image_workspace", ["debug=smoke_image"]),
    "transformer_hybrid": ("train_diffusion_transformer_hybrid_workspace", ["debug=smoke_transformer_image"]),
}
N_EPOCHS = 2


def tiny_policy(kind: str, request, batch_size: int = 4):
    """The recipe's tiny policy (seeded weights, the dataset's normalizer) and a real batch."""
    config_name, overrides = RECIPES[kind]
    cfg = compose_config(config_name, overrides)
    image = not kind.endswith("lowdim")
    if cfg.horizon == HORIZON:
        dataset, normalizer = request.getfixturevalue("image_data" if image else "lowdim_data")
    else:
        dataset, normalizer = pusht_data(request.getfixturevalue("pusht_zarr_path"), image, cfg.horizon)
    return seeded_policy(instantiate, normalizer, cfg.policy), real_batch(dataset, range(batch_size))


# ----------------------------------------------------------------------------- graph breaks
@pytest.mark.needs_data
@pytest.mark.parametrize("kind", list(RECIPES))
def test_every_network_compiles_into_one_graph(kind, request):
    policy, batch = tiny_policy(kind, request)
    policy.train()
    networks = {name: getattr(policy, name) for name in ("obs_encoder", "model") if hasattr(policy, name)}
    inputs = {}

    def keep_inputs(name):
        def hook(_module, args, kwargs, _output):
            inputs.setdefault(name, (args, kwargs))  # returns None: the output stays as it is

        return hook

    hooks = [net.register_forward_hook(keep_inputs(name), with_kwargs=True) for name, net in networks.items()]
    policy.compute_loss(batch)
    for h in hooks:
        h.remove()
    try:
        for name, net in networks.items():
            args, kwargs = inputs[name]
            explained = torch._dynamo.explain(net)(*args, **kwargs)
            reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
            assert explained.graph_break_count == 0, f"{kind} {name}: graph breaks: {reasons}"
            assert explained.graph_count == 1
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- a compiled run, end to end
def compiled_args(zarr: str, run_dir, *extra: str) -> list[str]:
    return [
        "train.py",
        "debug=smoke",
        "training.compile=true",
        f"task.dataset.zarr_path={zarr}",
        f"training.num_epochs={N_EPOCHS}",
        "training.rollout_every=1",
        "training.checkpoint_every=1",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory, pusht_zarr_path):
    return trained_run(tmp_path_factory, "compiled", functools.partial(compiled_args, pusht_zarr_path))


@pytest.mark.needs_data
def test_compiled_run_logs_compile_time_and_saves_plain_keys(compiled_run):
    logs = read_json_log(compiled_run / "logs.json.txt")
    epoch_ends = [e for e in logs if "time/compile_s" in e]
    assert [e["epoch"] for e in epoch_ends] == list(range(N_EPOCHS))
    assert epoch_ends[0]["time/compile_s"] > 0, "the first epoch compiles"
    assert epoch_ends[0]["time/compile_s"] <= epoch_ends[0]["time/step_s"]
    assert all("test/mean_score" in e for e in epoch_ends)
    payload = load_checkpoint_file(compiled_run / "checkpoints" / "latest.ckpt")
    cfg = compose_config("train_diffusion_unet_lowdim_workspace", ["debug=smoke"])
    expected = set(instantiate(cfg.policy).state_dict())
    for part in ("model", "ema_model"):
        keys = set(payload["state_dicts"][part])
        assert not any("_orig_mod" in k for k in keys), part
        assert expected <= keys and all(k.startswith("normalizer.") for k in keys - expected), part


@pytest.mark.needs_data
def test_compiled_checkpoint_loads_uncompiled_and_evaluates(compiled_run, lowdim_data, tmp_path):
    checkpoint = compiled_run / "checkpoints" / "latest.ckpt"
    policy, _ = load_policy(checkpoint)  # a strict load into a policy nobody compiled
    assert not any(getattr(m, "_compiled_call_impl", None) for m in policy.modules())
    live = load_checkpoint_file(checkpoint)["state_dicts"]["ema_model"]
    for key, value in policy.state_dict().items():
        assert torch.equal(value, live[key]), key
    # outputs: those of the weights the run wrote (a compiled and an eager step agree: see the step test)
    dataset, _ = lowdim_data
    obs = real_batch(dataset, range(3))["obs"][:, : policy.n_obs_steps]
    with torch.no_grad():
        actions = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(0))["action"]
    assert actions.shape == (3, policy.n_action_steps, 2) and torch.isfinite(actions).all()
    result = evaluate_in_process(checkpoint, tmp_path / "eval")
    assert 0.0 <= result["test/mean_score"] <= 1.0


@pytest.mark.needs_data
def test_compiled_run_resumes_exactly_after_sigkill(compiled_run, pusht_zarr_path, tmp_path):
    resumed = kill_then_resume(
        functools.partial(compiled_args, pusht_zarr_path), tmp_path / "killed", epoch=1
    )
    assert_same_training_state(compiled_run / "checkpoints" / "latest.ckpt", resumed)


# ----------------------------------------------------------------------------- same step as eager
@pytest.mark.needs_data
def test_compiled_step_equals_the_eager_step(compiled_run, request):
    # after the compiled run, at its batch size (16): inductor's on-disk cache then already holds the kernels
    eager, batch = tiny_policy("unet_lowdim", request, batch_size=16)
    compiled = copy.deepcopy(eager)
    assert compiled.compile_networks() == ["model"]
    results = []
    # the noise and diffusion steps are drawn outside the compiled network (eagerly), so one seed gives both
    # sides the same ones; the UNet itself draws nothing
    for policy in (eager, compiled):
        policy.train()
        # SGD: an update linear in the gradient (Adam's first step divides it by its own size, which turns
        # float noise in a near-zero gradient into a full-size step)
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
        torch.manual_seed(7)
        loss = policy.compute_loss(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        optimizer.step()
        results.append((loss.detach(), grads, copy.deepcopy(policy.state_dict())))
    torch._dynamo.reset()
    (loss_e, grads_e, state_e), (loss_c, grads_c, state_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and grads_e
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)
    assert state_c.keys() == state_e.keys()
    for key in state_e:
        torch.testing.assert_close(state_c[key], state_e[key], rtol=1e-4, atol=1e-5, msg=key)


# ----------------------------------------------------------------------------- errors
def test_no_cpu_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(pytorch_util.shutil, "which", lambda _name: None)
    with pytest.raises(RuntimeError, match=r"C\+\+ compiler.*training.compile=false"):
        pytorch_util.check_compile_backend("cpu")
    pytorch_util.check_compile_backend("cuda")  # triton brings its own compiler: nothing to check here
    monkeypatch.delattr(torch.compiler, "set_stance")  # a torch before 2.6
    with pytest.raises(RuntimeError, match=r"torch >= 2.6.*training.compile=false"):
        pytorch_util.check_compile_backend("cuda")
    with pytorch_util.eager_networks():  # evaluation still runs, as a no-op context
        pass
