"""Evaluate a checkpoint in simulation: rebuild its policy and env runner from the checkpoint alone.

    python eval.py -c data/outputs/.../checkpoints/latest.ckpt -o data/eval/run1 [-d cpu] [--overwrite]
    python eval.py -c CKPT -o data/eval/run1_ddpm --sampler ddpm      # same weights, 100-step DDPM sampling
    python eval.py -c FLOW_CKPT -o data/eval/run1_fm2 --inference-steps 2  # flow matching, 2 Euler steps
    python eval.py -c CKPT -o data/eval/run1_500 --n-test 500         # 500 test seeds, 95% interval
    python eval.py -c EXPORT_DIR -o data/eval/run1_ov --backend openvino  # a directory written by export.py
    python eval.py -c CKPT -o data/eval/run1_rtc4 --delay 4 --execution rtc  # 4 steps of inference delay, RTC

Writes OUTPUT_DIR/eval_log.json (metrics, 95% intervals over the test seeds, and video paths under
OUTPUT_DIR/media/). Rollout settings (seeds, number of episodes, ...) are the checkpoint's own
task.env_runner config unless --n-test is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from diffusion_policy.common.chunk_execution import GUIDANCE_METHODS, MODES, ExecutionSpec
from diffusion_policy.common.cli_args import add_checkpoint_and_output_dir, add_overwrite
from diffusion_policy.common.config_resolvers import register_resolvers
from diffusion_policy.common.errors import CheckpointError, ConfigError, DeviceError, one_line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="eval.py",
        description="Roll out the policy stored in a training checkpoint with the env runner from its config "
        "and write OUTPUT_DIR/eval_log.json plus rollout videos (OUTPUT_DIR/media/*.mp4).",
        epilog="Example: python eval.py -c data/outputs/2025.01.01/12.00.00_train_diffusion_unet_lowdim_"
        "pusht_lowdim/checkpoints/latest.ckpt -o data/eval/pusht_lowdim -d cpu",
    )
    add_checkpoint_and_output_dir(
        parser,
        checkpoint_help="checkpoint file (.ckpt) written by train.py, or with --backend "
        "onnxruntime/openvino an export directory written by export.py",
        output_help="directory for eval_log.json and videos; must be empty or missing unless --overwrite",
    )
    parser.add_argument(
        "-d", "--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)"
    )
    parser.add_argument(
        "--sampler",
        choices=("ddpm", "ddim", "euler", "midpoint", "heun"),
        default=None,
        help="diffusion-trained checkpoints: ddpm or ddim over the trained noise schedule (DDPM: all 100 "
        "steps unless --inference-steps; DDIM: the checkpoint's steps unless given); flow-matching "
        "checkpoints: the ODE solver euler, midpoint or heun (the last two call the network twice per step)",
    )
    parser.add_argument(
        "--inference-steps",
        type=int,
        default=None,
        metavar="N",
        help="number of denoising (DDPM/DDIM) or ODE (flow matching) steps for sampling "
        "(default: the checkpoint's, or all for --sampler ddpm)",
    )
    parser.add_argument(
        "--n-test",
        type=int,
        default=None,
        metavar="N",
        help="evaluate on N test seeds from the checkpoint's test_start_seed (the original: 100000) and "
        "no train seeds, instead of the checkpoint's own protocol (50 test + 6 train seeds); the mean "
        "score is reported with its 95%% confidence interval (about +/-0.04 at N=50, +/-0.01 at N=500)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="torch (default): -c is a checkpoint; onnxruntime / openvino: -c is an export directory "
        "(export.py), run by the torch-free runtime in diffusion_policy.deploy",
    )
    parser.add_argument(
        "--noise-seed",
        type=int,
        default=None,
        metavar="S",
        help="draw the initial noise of every policy call from one generator seeded S (torch.randn on the "
        "CPU, in call order), the same in every backend: with DDIM (eta 0) the rollouts of a checkpoint "
        "and of its export then differ only by float rounding",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="inference threads of the onnxruntime / openvino backend (default: the runtime's own choice)",
    )
    parser.add_argument(
        "--delay",
        type=int,
        default=0,
        metavar="D",
        help="inference delay in control steps: D steps pass between the observation a chunk is computed "
        "from and the first step it can act on (default 0: the world waits for inference, the original's "
        "protocol); needs --execution async, ensemble or rtc",
    )
    parser.add_argument(
        "--execution",
        choices=MODES,
        default="sync",
        help="how chunks are executed while the next one is computed: sync (the world waits; delay 0), "
        "async (run the old chunk for D steps, then switch), ensemble (ACT's temporal ensembling of "
        "overlapping chunks), rtc (real-time chunking: the new chunk's first D actions frozen to the old "
        "chunk's, the rest of the overlap guided toward it)",
    )
    parser.add_argument(
        "--overlap",
        type=int,
        default=None,
        metavar="K",
        help="steps of the previous chunk past its executed n_action_steps that are still used (from D "
        "to the chunk's spare length; default: D for async, all of them for ensemble and rtc)",
    )
    parser.add_argument(
        "--rtc-method",
        choices=GUIDANCE_METHODS,
        default="guidance",
        help="rtc only: guidance (RTC's gradient guidance of the denoised estimate, default) or inpaint "
        "(soft inpainting along the sampling path, no gradients)",
    )
    add_overwrite(parser, "write into OUTPUT_DIR even if it is not empty (never prompts)")
    return parser.parse_args(argv)


BACKENDS = ("torch", "onnxruntime", "openvino")


class SeededNoise:
    """The initial noise of every policy call, (B, T, Da) from one CPU ``torch.Generator``: the torch policy
    receives the generator (its sampling loop draws the initial trajectory with ``torch.randn`` from it), an
    exported policy receives the same draw as an array, so both start every call from the same noise."""

    def __init__(self, seed: int) -> None:
        import torch

        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, shape: tuple[int, ...]):
        import torch

        return torch.randn(shape, generator=self.generator, dtype=torch.float32)


class TorchPolicyWithNoise:
    """A torch policy whose ``predict_action`` draws its noise from a :class:`SeededNoise`."""

    def __init__(self, policy, noise: SeededNoise) -> None:
        self.policy, self.noise = policy, noise

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def predict_action(self, obs_dict, **kwargs):
        return self.policy.predict_action(obs_dict, generator=self.noise.generator, **kwargs)


class ExportedPolicyAdapter:
    """The env runners' torch interface (tensors in, tensors out, ``device``) over an exported policy."""

    def __init__(self, exported, noise: SeededNoise | None = None) -> None:
        import torch

        self.exported, self.noise = exported, noise
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def reset(self) -> None:
        self.exported.reset()

    @property
    def chunk_start(self) -> int:
        return self.exported.chunk_start

    @property
    def chunk_length(self) -> int:
        return self.exported.chunk_length

    def predict_action(self, obs_dict):
        import numpy as np
        import torch

        np_obs = {k: v.detach().to("cpu").numpy() for k, v in obs_dict.items()}
        initial = None
        if self.noise is not None:
            batch = next(iter(np_obs.values())).shape[0]
            shape = (batch, self.exported.trajectory_length, self.exported.action_dim)
            initial = self.noise.draw(shape).numpy()
        out = self.exported.predict_action(np_obs, noise=initial)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def load_exported(
    export_dir: str,
    backend: str,
    sampler: str | None,
    inference_steps: int | None,
    threads: int | None,
    noise_seed: int | None,
):
    """(runner-facing adapter, config, sampler label) for an export directory."""
    from omegaconf import OmegaConf

    from diffusion_policy.deploy import load_exported_policy

    exported = load_exported_policy(export_dir, backend, threads=threads, seed=noise_seed)
    if sampler is not None or inference_steps is not None:
        try:
            exported.set_sampler(sampler, inference_steps)
        except ValueError as e:
            raise ConfigError(f"--sampler/--inference-steps: {e}") from None
    cfg = OmegaConf.create(exported.manifest["config_yaml"])
    noise = SeededNoise(noise_seed) if noise_seed is not None else None
    return ExportedPolicyAdapter(exported, noise), cfg, exported.sampler_label()


def with_test_seeds(runner_cfg, n_test: int):
    """A copy of the env-runner config that rolls out ``n_test`` test seeds (from test_start_seed) only."""
    from omegaconf import OmegaConf, open_dict

    if n_test < 1:
        raise ConfigError(f"--n-test={n_test} must be >= 1")
    runner_cfg = OmegaConf.create(OmegaConf.to_container(runner_cfg, resolve=True))
    with open_dict(runner_cfg):
        runner_cfg.n_test = n_test
        runner_cfg.n_test_vis = min(int(runner_cfg.get("n_test_vis", 0)), n_test)
        runner_cfg.n_train = 0
        runner_cfg.n_train_vis = 0
    return runner_cfg


def execution_spec(policy, runner_cfg, mode: str, delay: int, overlap: int | None, backend: str):
    """The execution spec of --execution/--delay/--overlap for this policy and runner (None: the original's
    protocol); a combination that cannot run raises ConfigError naming the option."""
    if mode == "sync" and delay == 0 and overlap in (None, 0):
        return None
    if mode == "rtc" and backend != "torch":
        raise ConfigError(
            f"--execution rtc needs the torch backend (its guidance differentiates the denoiser); "
            f"--backend {backend} runs sync, async and ensemble"
        )
    if runner_cfg.get("n_latency_steps", 0):
        raise ConfigError(
            f"--delay/--execution: the checkpoint's env runner has n_latency_steps="
            f"{runner_cfg.n_latency_steps} (the original's observation latency), which is not combined with "
            "an inference delay"
        )
    try:
        return ExecutionSpec(mode, delay, int(runner_cfg.n_action_steps), int(policy.chunk_length), overlap)
    except ValueError as e:
        raise ConfigError(f"--execution {mode} --delay {delay}: {e}") from None


def evaluate(
    checkpoint: str,
    output_dir: str,
    device: str = "auto",
    payload: dict | None = None,
    sampler: str | None = None,
    inference_steps: int | None = None,
    n_test: int | None = None,
    backend: str = "torch",
    noise_seed: int | None = None,
    threads: int | None = None,
    execution: str = "sync",
    delay: int = 0,
    overlap: int | None = None,
    rtc_method: str = "guidance",
) -> dict:
    import torch

    from diffusion_policy.common.device_util import resolve_device
    from diffusion_policy.common.score_stats import split_summary
    from diffusion_policy.policy.samplers import sampler_label, use_sampler
    from diffusion_policy.workspace.base_workspace import load_policy
    from diffusion_policy.workspace.train_diffusion_workspace import build

    if backend == "torch":
        torch_device = resolve_device(device)
        policy, cfg = load_policy(checkpoint, torch_device, payload=payload)
        if sampler is not None or inference_steps is not None:
            try:
                use_sampler(policy, sampler, inference_steps)
            except ValueError as e:
                raise ConfigError(f"--sampler/--inference-steps: {e}") from None
        label = sampler_label(policy)
        policy.guide_method = rtc_method
        if noise_seed is not None:
            policy = TorchPolicyWithNoise(policy, SeededNoise(noise_seed))
    else:
        policy, cfg, label = load_exported(checkpoint, backend, sampler, inference_steps, threads, noise_seed)

    runner_cfg = cfg.task.env_runner
    if runner_cfg is None:
        raise ConfigError(
            f"{checkpoint}: its task has no simulator (task.env_runner: null), so there is nothing to roll "
            "out; its validation metrics (val_loss, val_action_mse_error) are in the run's logs.json.txt"
        )
    if n_test is not None:
        runner_cfg = with_test_seeds(runner_cfg, n_test)
    spec = execution_spec(policy, runner_cfg, execution, delay, overlap, backend)

    # created only now: a checkpoint that fails above leaves no trace
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    env_runner = build(runner_cfg, "task.env_runner", output_dir=output_dir)
    try:
        with torch.no_grad():
            runner_log = env_runner.run(policy) if spec is None else env_runner.run(policy, execution=spec)
    finally:
        if hasattr(env_runner, "close"):
            env_runner.close()
    json_log = {
        k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
        for k, v in runner_log.items()
    }
    json_log.update(split_summary(runner_log, "test/"))
    json_log["eval/sampler"] = label
    json_log["eval/backend"] = backend
    json_log["eval/execution"] = execution
    json_log["eval/delay"] = delay
    json_log["eval/overlap"] = 0 if spec is None else spec.resolved_overlap
    if execution == "rtc":
        json_log["eval/rtc_method"] = rtc_method
    with open(Path(output_dir) / "eval_log.json", "w") as f:
        json.dump(json_log, f, indent=2, sort_keys=True)
    return json_log


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    register_resolvers()
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        print(f"error: output dir {out} exists and is not a directory", file=sys.stderr)
        return 2
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        print(f"error: output dir {out} is not empty; pass --overwrite or choose another -o", file=sys.stderr)
        return 2
    if args.backend == "torch" and Path(args.checkpoint).is_dir():
        print(
            f"error: {args.checkpoint} is a directory; pass a .ckpt file, or an export directory with "
            "--backend onnxruntime|openvino",
            file=sys.stderr,
        )
        return 2
    if args.backend == "torch" and not Path(args.checkpoint).is_file():
        print(f"error: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    from diffusion_policy.deploy.manifest import ExportError

    try:
        payload = None
        if args.backend == "torch":
            from diffusion_policy.common.checkpoint_io import load_checkpoint_file
            from diffusion_policy.common.device_util import resolve_device

            resolve_device(args.device)
            payload = load_checkpoint_file(args.checkpoint)
        else:
            from diffusion_policy.deploy.manifest import read_manifest

            if Path(args.checkpoint).is_file():
                raise ExportError(
                    f"--backend {args.backend} needs an export directory (export.py -c CKPT -o DIR), "
                    f"not the file {args.checkpoint}"
                )
            read_manifest(args.checkpoint)
        log = evaluate(
            args.checkpoint,
            str(out),
            args.device,
            payload,
            args.sampler,
            args.inference_steps,
            args.n_test,
            args.backend,
            args.noise_seed,
            args.threads,
            args.execution,
            args.delay,
            args.overlap,
            args.rtc_method,
        )
    except (CheckpointError, ConfigError, DeviceError, ExportError, FileNotFoundError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    scores = {
        k: v
        for k, v in log.items()
        if k.endswith(("mean_score", "success_rate"))
        or k in ("eval/sampler", "eval/backend", "eval/execution", "eval/delay")
    }
    print(json.dumps(scores, indent=2, sort_keys=True))
    if "test/n_episodes" in log:
        print(
            f"test/mean_score {log['test/mean_score']:.3f} "
            f"(95% CI {log['test/mean_score_ci95_low']:.3f}-{log['test/mean_score_ci95_high']:.3f}), "
            f"test/success_rate {log['test/success_rate']:.3f} "
            f"(95% CI {log['test/success_rate_ci95_low']:.3f}-{log['test/success_rate_ci95_high']:.3f}) "
            f"over {log['test/n_episodes']} test seeds {log['test/first_seed']}-{log['test/last_seed']}"
        )
    print(f"wrote {out / 'eval_log.json'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    sys.exit(main())
