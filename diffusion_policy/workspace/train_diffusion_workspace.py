"""The diffusion-policy training recipe, shared by the state (lowdim) and image (hybrid) workspaces.

``run()`` reads top to bottom as the recipe: seed -> data and normalizer -> lr schedule, EMA, top-k ->
resume -> env runner and loggers -> per epoch: train, validate, roll out, action MSE on a training batch,
log, checkpoint.

Which model each step uses (as in the original):
- training, validation loss: the live model ``self.model`` (validation in train mode, without gradients);
- rollouts and the action MSE: the EMA copy ``self.ema_model`` when ``training.use_ema`` (else the live
  model).

Fixed with respect to the original: resume restores the EMA step, LR schedule, top-k ranking, RNG and data
order, and stops at ``num_epochs`` in total; the last epoch always rolls out and checkpoints;
``latest.ckpt`` is written atomically; checkpoint epochs without a rollout no longer crash the top-k;
per-phase timings are logged.

Not in the original: the config is checked against ``common.config_check`` when the workspace is built, and
SIGINT / SIGTERM stop ``run()`` between two steps, dropping the unfinished epoch (``common.shutdown``).
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import signal
import time
import traceback
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from diffusion_policy.common import distributed, hold_point, shutdown
from diffusion_policy.common.checkpoint_util import TopKCheckpointManager
from diffusion_policy.common.config_check import validate_config
from diffusion_policy.common.config_origin import ConfigSource
from diffusion_policy.common.device_util import resolve_device
from diffusion_policy.common.errors import ConfigError, RunInterrupted, WorkerDiedError, one_line
from diffusion_policy.common.json_logger import JsonLogger
from diffusion_policy.common.pytorch_util import (
    check_compile_backend,
    compile_seconds,
    dict_apply,
    eager_networks,
    optimizer_to,
    resolve_mixed_precision,
    seed_everything,
    training_autocast,
    warn_if_bf16_is_emulated,
)
from diffusion_policy.common.rules import accumulation_fits_epoch, enforce
from diffusion_policy.common.wandb_logger import WandbLogger
from diffusion_policy.model.common.lr_scheduler import get_scheduler
from diffusion_policy.workspace.base_workspace import BaseWorkspace


def build(node: DictConfig, what: str, **kwargs) -> Any:
    """``hydra.utils.instantiate`` whose construction errors become a one-line ``ConfigError``."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, (FileNotFoundError, ValueError, TypeError, KeyError)):
            target = node.get("_target_", "?") if isinstance(node, DictConfig) else "?"
            raise ConfigError(f"{what} ({target}): {cause}") from cause
        raise ConfigError(f"{what}: {one_line(e)}") from e


def build_policy_optimizer(policy: torch.nn.Module, node: DictConfig) -> torch.optim.Optimizer:
    """``policy.get_optimizer(**node)``, as the original's transformer workspaces build their optimizer
    (AdamW with the policy's own weight-decay groups); bad keys or values become a one-line ConfigError."""
    if "_target_" in node:
        raise ConfigError(
            f"optimizer has _target_={node._target_!r}, but {type(policy).__name__} builds its own optimizer "
            "from get_optimizer(...) arguments (learning_rate, weight_decay, betas, ...); remove _target_"
        )
    kwargs = OmegaConf.to_container(node, resolve=True)
    try:
        return policy.get_optimizer(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optimizer {kwargs}: {type(policy).__name__}.get_optimizer failed: {e}") from None


def all_ranks_flag(device: torch.device):
    """A ``sync`` for :func:`shutdown.raise_if_requested`: true on every rank once any rank's flag is."""

    def sync(flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    return sync


def loader_worker_death_cause(error: RuntimeError) -> str:
    """torch's message for a dead data-loader worker, with the signal that killed it.

    torch names the signal only when its SIGCHLD handler sees the death first; when its queue timeout does,
    the message just says "exited unexpectedly", and the worker objects (with their exit codes) are left
    in the raising frame.
    """
    lines = str(error).strip().splitlines()
    cause = lines[0] if lines else f"{type(error).__name__} while receiving a batch"
    tb = error.__traceback__
    seen = set()
    while tb is not None:
        local = tb.tb_frame.f_locals
        # torch's own list of dead workers, or (an EOF mid-transfer) the loader iterator's workers
        workers = local.get("failed_workers") or getattr(local.get("self"), "_workers", None) or ()
        for worker in workers:
            code = getattr(worker, "exitcode", None)
            if code is not None and code < 0 and worker.pid not in seen:
                seen.add(worker.pid)
                cause += f" (pid {worker.pid}: killed by {signal.Signals(-code).name})"
        tb = tb.tb_next
    if "Killed" in cause or "SIGKILL" in cause:
        cause += "; SIGKILL often means the machine ran out of memory"
    return cause


def from_dead_loader_worker(error: BaseException) -> bool:
    """torch's dead-worker error, or the EOF / reset a worker killed while it was handing over a batch leaves
    in the data loader's receiving end."""
    if isinstance(error, RuntimeError) and str(error).startswith("DataLoader worker"):
        return True
    if not isinstance(error, (EOFError, ConnectionError)):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return any(f"torch{os.sep}utils{os.sep}data" in frame.filename for frame in frames)


def stops_cleanly(run):
    """Wrap ``run``: SIGINT / SIGTERM and dead workers end it with one line saying what was saved.

    See ``diffusion_policy.common.shutdown``: a stop signal lets the current step finish, drops the
    unfinished epoch and leaves ``latest.ckpt`` as the last completed checkpoint wrote it.
    """

    @functools.wraps(run)
    def wrapper(self, *args, **kwargs):
        with shutdown.stop_signals_handled():
            try:
                return run(self, *args, **kwargs)
            except RunInterrupted as stop:
                stop.detail = self.resume_hint()
                raise
            except WorkerDiedError as e:
                raise WorkerDiedError(f"{e}; {self.resume_hint()}") from e
            except Exception as e:
                signum = shutdown.requested()
                if signum is not None:
                    # a worker hit by the same Ctrl-C, or a pipe it closed: part of the stop, not a failure
                    raise RunInterrupted(signum, detail=self.resume_hint()) from e
                if from_dead_loader_worker(e):
                    cause = loader_worker_death_cause(e)
                    raise WorkerDiedError(
                        f"a data loader worker died during epoch {self.epoch} ({cause}); {self.resume_hint()}"
                    ) from e
                raise

    return wrapper


class TrainDiffusionWorkspace(BaseWorkspace):
    state_attrs: ClassVar[tuple[str, ...]] = (
        "model",
        "ema_model",
        "optimizer",
        "lr_scheduler",
        "ema",
        "topk_manager",
    )
    value_attrs: ClassVar[tuple[str, ...]] = ("epoch", "global_step", "wandb_run_id")
    optimizer_modules: ClassVar[dict[str, str]] = {"optimizer": "model"}
    dataset_base: ClassVar[type] = object

    def __init__(self, cfg: DictConfig, output_dir: str | os.PathLike | None = None):
        # before anything is built or written: a bad value fails here with one line naming it
        validate_config(cfg, ConfigSource.from_hydra(default=f"the config given to {type(self).__name__}"))
        super().__init__(cfg, output_dir=output_dir)
        seed_everything(cfg.training.seed)
        self.model = build(cfg.policy, "policy")
        self.ema_model = copy.deepcopy(self.model) if cfg.training.use_ema else None
        self.optimizer = self.build_optimizer(cfg)
        # built in run(), where the data (and so the schedule length) is known
        self.lr_scheduler = None
        self.ema = None
        self.topk_manager = None
        self.epoch = 0
        self.global_step = 0
        self.wandb_run_id: str | None = None
        # the epoch count latest.ckpt holds, once this process saved or resumed it (for the stop message)
        self.saved_epoch: int | None = None
        self.stop_sync = None  # set in run() for data-parallel runs
        # drives the shuffling of the training data; its state is checkpointed so a resumed run sees the
        # same order
        self.data_generator = torch.Generator().manual_seed(int(cfg.training.seed))

    def build_optimizer(self, cfg: DictConfig) -> torch.optim.Optimizer:
        """``cfg.optimizer`` instantiated over all policy parameters (the UNet recipes).

        The transformer workspaces override this: their policies build AdamW with weight-decay groups.
        """
        return build(cfg.optimizer, "optimizer", params=self.model.parameters())

    @property
    def eval_policy(self):
        return self.ema_model if self.ema_model is not None else self.model

    # ================================================================== the recipe
    @stops_cleanly
    def run(self) -> None:
        cfg = self.resolved_run_config()
        device, dist_info = self.setup_device(cfg)
        seed_everything(cfg.training.seed + dist_info.rank)
        if cfg.training.get("deterministic", False):
            torch.use_deterministic_algorithms(True, warn_only=True)

        # ===== data and normalizer =====
        dataset = build(cfg.task.dataset, "task.dataset")
        self.check_dataset(dataset, cfg)
        train_loader = self.make_loader(dataset, cfg.dataloader, device, dist_info, train=True)
        val_loader = self.make_loader(
            dataset.get_validation_dataset(), cfg.val_dataloader, device, dist_info, name="val_dataloader"
        )
        self.set_normalizer(dataset.get_normalizer())
        sampling_batch = self.fixed_training_batch(dataset, cfg)
        # A task without a simulator (task.env_runner: null) is judged on held-out episodes instead of
        # rollouts: a fixed validation batch feeds val_action_mse_error (see evaluate()).
        has_runner = cfg.task.get("env_runner") is not None
        val_sampling_batch = None if has_runner else self.fixed_validation_batch(val_loader.dataset, cfg)

        # ===== lr schedule, EMA, top-k =====
        steps_per_epoch = len(train_loader)
        if cfg.training.max_train_steps is not None:
            steps_per_epoch = min(steps_per_epoch, cfg.training.max_train_steps)
        enforce(
            accumulation_fits_epoch(
                cfg.training.gradient_accumulate_every, cfg.training.max_train_steps, len(train_loader)
            ),
            ConfigError,
            block="training",
        )
        self.build_lr_scheduler_and_ema(cfg, steps_per_epoch)
        ckpt_dir = Path(self.output_dir) / "checkpoints"
        self.topk_manager = TopKCheckpointManager(save_dir=ckpt_dir, **cfg.checkpoint.topk)

        # ===== resume =====
        latest = self.checkpoint_path("latest")
        resumed_rng = None
        if latest.is_file() and not cfg.training.resume:
            raise ConfigError(
                f"{self.output_dir} already holds checkpoints/latest.ckpt; pass training.resume=True to "
                "continue that run, or choose a new hydra.run.dir"
            )
        if cfg.training.resume and latest.is_file():
            # RNG states are put back only right before the loop: building the runner and loggers below
            # may draw random numbers, and an uninterrupted run did that before its first epoch, not here
            resumed_rng = self.load_checkpoint(latest, restore_rng=False)["state"]["rng"]
            self.saved_epoch = self.epoch
            if dist_info.is_main:
                print(
                    f"Resuming from {latest} at epoch {self.epoch} (global step {self.global_step})",
                    flush=True,
                )

        # ===== env runner and loggers (rank 0 only) =====
        env_runner = json_logger = wandb_logger = None
        if dist_info.is_main:
            if has_runner:
                env_runner = build(cfg.task.env_runner, "task.env_runner", output_dir=self.output_dir)
            json_logger = JsonLogger(Path(self.output_dir) / "logs.json.txt")
            # a resumed run redoes the steps after its checkpoint: drop their old log lines
            json_logger.start(drop_from_step=self.global_step if resumed_rng is not None else None)
            wandb_logger = WandbLogger(
                OmegaConf.to_container(cfg.logging, resolve=True),
                self.output_dir,
                config=OmegaConf.to_container(cfg, resolve=True),
                run_id=self.wandb_run_id,
            )
            self.wandb_run_id = wandb_logger.run_id

        # ===== device =====
        self.to_device(device)
        train_module = self.training_module(cfg, device, dist_info)
        if dist_info.is_main:
            precision = cfg.training.get("mixed_precision")
            warn_if_bf16_is_emulated(device, precision)
            if precision == "auto":
                chosen = resolve_mixed_precision(device, precision) or "float32"
                print(f"training.mixed_precision=auto: {chosen} on this {device.type}", flush=True)
        # data-parallel ranks agree on a stop at every check, so none is left waiting in an all-reduce
        self.stop_sync = all_ranks_flag(device) if dist_info.enabled else None

        def log(data: dict[str, Any]) -> None:
            if dist_info.is_main:
                json_logger.log(data)
                wandb_logger.log(data, step=self.global_step)

        # ===== training loop =====
        t = cfg.training
        if resumed_rng is not None:
            self.set_rng_state(resumed_rng)
        try:
            while self.epoch < t.num_epochs:
                hold_point.hold_if_asked(self.epoch)  # tests only: stop a run at a known epoch
                shutdown.raise_if_requested(self.stop_sync)
                epoch_start = time.perf_counter()
                is_last_epoch = self.epoch == t.num_epochs - 1
                if isinstance(train_loader.sampler, DistributedSampler):
                    train_loader.sampler.set_epoch(self.epoch)
                step_log = self.train_epoch(train_module, train_loader, device, cfg, log)

                if dist_info.is_main:
                    with eager_networks():  # compiled for the training step's shapes only
                        step_log.update(
                            self.evaluate(
                                cfg,
                                device,
                                val_loader,
                                env_runner,
                                sampling_batch,
                                is_last_epoch,
                                val_sampling_batch,
                            )
                        )
                step_log["time/epoch_s"] = time.perf_counter() - epoch_start
                log(step_log)
                metrics = dict(step_log)
                self.global_step += 1
                self.epoch += 1

                if dist_info.is_main and ((self.epoch - 1) % t.checkpoint_every == 0 or is_last_epoch):
                    tic = time.perf_counter()
                    self.save_checkpoints(cfg, metrics)
                    print(
                        f"epoch {self.epoch - 1}: checkpoint in {time.perf_counter() - tic:.2f}s", flush=True
                    )
                distributed.barrier(dist_info)
        finally:
            if env_runner is not None and hasattr(env_runner, "close"):
                env_runner.close()
            if json_logger is not None:
                json_logger.stop()
            if wandb_logger is not None:
                wandb_logger.finish()
            distributed.cleanup(dist_info)

    # ================================================================== steps
    def set_normalizer(self, normalizer) -> None:
        """The dataset's normalizer on the live model and its EMA copy."""
        self.model.set_normalizer(normalizer)
        if self.ema_model is not None:
            self.ema_model.set_normalizer(normalizer)

    def build_lr_scheduler_and_ema(self, cfg: DictConfig, steps_per_epoch: int) -> None:
        """The LR schedule over the whole run's optimizer steps, and the EMA of the live model (when
        ``training.use_ema``)."""
        self.lr_scheduler = get_scheduler(
            cfg.training.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=cfg.training.lr_warmup_steps,
            num_training_steps=(steps_per_epoch * cfg.training.num_epochs)
            // cfg.training.gradient_accumulate_every,
        )
        if self.ema_model is not None:
            self.ema = build(cfg.ema, "ema", model=self.ema_model)

    def to_device(self, device: torch.device) -> None:
        """The live model, its EMA copy and the optimizer's state onto ``device``."""
        self.model.to(device)
        if self.ema_model is not None:
            self.ema_model.to(device)
        optimizer_to(self.optimizer, device)

    def training_module(self, cfg: DictConfig, device: torch.device, dist_info) -> torch.nn.Module:
        """What the training steps call: the live model, its image encoder in channels_last memory format
        (and the EMA copy's) when ``training.channels_last``, its networks compiled in place when
        ``training.compile``, wrapped for data-parallel training when there are several processes.

        Compiled in place (``nn.Module.compile``), so the EMA copy, checkpoints and evaluation see the
        usual modules and state-dict keys."""
        if cfg.training.get("channels_last", False):
            models = [m for m in (self.model, self.ema_model) if m is not None]
            if not all(getattr(m, "encoder_channels_last", lambda: False)() for m in models):
                raise ConfigError(
                    f"training.channels_last=true, but {type(self.model).__name__} has no image encoder "
                    "with 2D convolutions; set training.channels_last=false"
                )
        if cfg.training.get("compile", False):
            try:
                check_compile_backend(device)
            except RuntimeError as e:
                raise ConfigError(str(e)) from None
            if not hasattr(self.model, "compile_networks"):
                raise ConfigError(
                    f"training.compile=true, but {type(self.model).__name__} has no compile_networks(); "
                    "set training.compile=false"
                )
            names = self.model.compile_networks(mode=cfg.training.get("compile_mode", "default"))
            if dist_info.is_main:
                print(f"training.compile: {', '.join(names)} compiled at the first training step", flush=True)
        return distributed.wrap_for_training(self.model, dist_info, device)

    def train_step(
        self, train_module, batch: dict, device, autocast, batch_idx: int, accumulate_every: int
    ) -> torch.Tensor:
        """One training iteration: ``batch`` to ``device``, the loss under ``autocast``, backward; after every
        ``accumulate_every``-th batch of the epoch an optimizer step, ``zero_grad`` and an LR-schedule step;
        then the EMA update. Returns the loss tensor, unscaled and not yet read back (``.item()``)."""
        batch = dict_apply(batch, lambda x: x.to(device, non_blocking=True))
        with autocast:
            raw_loss = train_module(batch)
        (raw_loss / accumulate_every).backward()
        if (batch_idx + 1) % accumulate_every == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.model)
        return raw_loss

    def resume_hint(self) -> str:
        """What a stopped run left behind and how to continue it, for the one-line stop message."""
        latest = self.checkpoint_path("latest")
        if not latest.is_file():
            return f"epoch {self.epoch} was not finished and no checkpoint was written yet"
        n = self.saved_epoch
        held = f" (saved after {n} epoch{'s' if n != 1 else ''})" if n is not None else ""
        return (
            f"the unfinished epoch {self.epoch} was dropped; {latest}{held} is intact; resume with the same "
            f"command and hydra.run.dir={self.output_dir}"
        )

    def resolved_run_config(self) -> DictConfig:
        """A copy of the config with ``training.debug`` applied (the original's debug switch)."""
        cfg = copy.deepcopy(self.cfg)
        if cfg.training.debug:
            cfg.training.num_epochs = 2
            cfg.training.max_train_steps = 3
            cfg.training.max_val_steps = 3
            cfg.training.rollout_every = 1
            cfg.training.checkpoint_every = 1
            cfg.training.val_every = 1
            cfg.training.sample_every = 1
        return cfg

    def setup_device(self, cfg: DictConfig) -> tuple[torch.device, distributed.DistInfo]:
        device = resolve_device(cfg.training.device)
        dist_info = distributed.env_dist_info()
        device = distributed.local_device(device, dist_info)
        dist_info = distributed.init_distributed(device)
        if dist_info.enabled:
            # every rank resolved its own ${now:} run dir; all must use rank 0's (checkpoints, resume)
            self._output_dir = distributed.broadcast_object(self.output_dir, dist_info)
        return device, dist_info

    def make_loader(
        self,
        dataset,
        loader_cfg: DictConfig,
        device,
        dist_info,
        train: bool = False,
        name: str = "dataloader",
    ) -> DataLoader:
        kwargs = OmegaConf.to_container(loader_cfg, resolve=True)
        shuffle = bool(kwargs.pop("shuffle", False))
        if device.type != "cuda":
            kwargs["pin_memory"] = False  # only meaningful for host-to-GPU copies
        if kwargs.get("num_workers", 0) == 0:
            kwargs["persistent_workers"] = False
        else:
            kwargs.setdefault("worker_init_fn", shutdown.ignore_interrupts_in_worker)
        try:
            if train and dist_info.enabled:
                sampler = DistributedSampler(
                    dataset,
                    num_replicas=dist_info.world_size,
                    rank=dist_info.rank,
                    shuffle=shuffle,
                    seed=int(self.cfg.training.seed),
                )
                return DataLoader(dataset, sampler=sampler, **kwargs)
            generator = self.data_generator if (train and shuffle) else None
            return DataLoader(dataset, shuffle=shuffle, generator=generator, **kwargs)
        except (TypeError, ValueError) as e:
            # keys the schema lets through (the original's extras) go straight to torch
            raise ConfigError(f"{name}: torch's DataLoader refuses {kwargs}: {e}") from None

    def train_epoch(self, train_module, loader, device, cfg, log) -> dict[str, Any]:
        """One pass over the training data; logs every step but the last (the epoch summary extends it)."""
        t = cfg.training
        self.model.train()
        n_batches = len(loader) if t.max_train_steps is None else min(len(loader), t.max_train_steps)
        accum = t.gradient_accumulate_every
        autocast = training_autocast(device, t.get("mixed_precision"))
        losses: list[float] = []
        data_s = step_s = 0.0
        compiled_s = compile_seconds()
        step_log: dict[str, Any] = {}
        tic = time.perf_counter()
        bar = tqdm(
            loader,
            total=n_batches,
            desc=f"epoch {self.epoch}",
            leave=False,
            mininterval=t.tqdm_interval_sec,
            disable=not distributed.env_dist_info().is_main,
        )
        for batch_idx, batch in enumerate(bar):
            data_s += time.perf_counter() - tic
            tic = time.perf_counter()
            loss = self.train_step(train_module, batch, device, autocast, batch_idx, accum).item()
            losses.append(loss)
            step_s += time.perf_counter() - tic
            bar.set_postfix(loss=loss, refresh=False)
            step_log = {
                "train_loss": loss,
                "global_step": self.global_step,
                "epoch": self.epoch,
                "lr": self.lr_scheduler.get_last_lr()[0],
            }
            # after the step, so the optimizer, EMA and LR schedule stay in step with each other
            shutdown.raise_if_requested(self.stop_sync)
            if batch_idx == n_batches - 1:
                break
            log(step_log)
            self.global_step += 1
            tic = time.perf_counter()
        bar.close()
        step_log["train_loss"] = float(np.mean(losses))
        step_log["time/data_s"] = data_s
        step_log["time/step_s"] = step_s  # compile time included
        if t.get("compile", False):
            step_log["time/compile_s"] = compile_seconds() - compiled_s
            if step_log["time/compile_s"] > 1.0 and distributed.env_dist_info().is_main:
                print(
                    f"epoch {self.epoch}: torch.compile took {step_log['time/compile_s']:.1f}s of the "
                    f"{step_s:.1f}s of training steps",
                    flush=True,
                )
        return step_log

    @torch.no_grad()
    def evaluate(
        self, cfg, device, val_loader, env_runner, sampling_batch, is_last_epoch, val_sampling_batch=None
    ) -> dict[str, Any]:
        """Validation loss, rollouts and action MSE, each on its own cadence; rank 0 only.

        Without an env runner there are no rollouts; ``val_action_mse_error`` (the same action MSE on a
        fixed batch of validation windows) is reported at the ``sample_every`` cadence instead."""
        t = cfg.training
        out: dict[str, Any] = {}
        policy = self.eval_policy
        policy.eval()

        if self.epoch % t.val_every == 0:
            tic = time.perf_counter()
            val_losses = []
            for batch_idx, batch in enumerate(val_loader):
                if t.max_val_steps is not None and batch_idx >= t.max_val_steps:
                    break
                shutdown.raise_if_requested()
                batch = dict_apply(batch, lambda x: x.to(device, non_blocking=True))
                val_losses.append(self.model.compute_loss(batch).item())
            if val_losses:
                out["val_loss"] = float(np.mean(val_losses))
            out["time/val_s"] = time.perf_counter() - tic

        if env_runner is not None and (self.epoch % t.rollout_every == 0 or is_last_epoch):
            shutdown.raise_if_requested()  # the rollout checks again at every policy call
            tic = time.perf_counter()
            out.update(env_runner.run(policy))
            out["time/rollout_s"] = time.perf_counter() - tic

        if self.epoch % t.sample_every == 0:
            shutdown.raise_if_requested()
            tic = time.perf_counter()
            batch = dict_apply(sampling_batch, lambda x: x.to(device, non_blocking=True))
            result = policy.predict_action(self.sampling_obs(batch))
            out["train_action_mse_error"] = self.action_mse(result, batch).item()
            if val_sampling_batch is not None:
                batch = dict_apply(val_sampling_batch, lambda x: x.to(device, non_blocking=True))
                result = policy.predict_action(self.sampling_obs(batch))
                out["val_action_mse_error"] = self.action_mse(result, batch).item()
            out["time/sample_s"] = time.perf_counter() - tic
        return out

    def save_checkpoints(self, cfg: DictConfig, metrics: dict[str, Any]) -> None:
        """latest.ckpt, plus a top-k copy when this epoch's ``monitor_key`` makes the top k."""
        topk_path = self.topk_manager.get_ckpt_path({k.replace("/", "_"): v for k, v in metrics.items()})
        latest = None
        if cfg.checkpoint.save_last_ckpt:
            latest = self.save_checkpoint(tag="latest")
            self.saved_epoch = self.epoch
        if topk_path is not None:
            if latest is None:
                self.save_checkpoint(path=topk_path)
            else:
                tmp = Path(topk_path).with_name(f".{Path(topk_path).name}.tmp-{os.getpid()}")
                shutil.copyfile(latest, tmp)
                os.replace(tmp, topk_path)

    # ================================================================== RNG incl. data order
    def rng_state(self) -> dict[str, Any]:
        return super().rng_state() | {"data": self.data_generator.get_state()}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        super().set_rng_state(state)
        if "data" in state:
            self.data_generator.set_state(state["data"])

    # ================================================================== hooks for the two observation types
    def check_dataset(self, dataset, cfg: DictConfig) -> None:
        """Fail early with one line when the data does not look like what the config promises."""
        if not isinstance(dataset, self.dataset_base):
            raise ConfigError(
                f"task.dataset builds {type(dataset).__name__}, but {type(self).__name__} needs a "
                f"{self.dataset_base.__name__}"
            )
        if len(dataset) == 0:
            raise ConfigError("task.dataset has no training samples; check max_train_episodes / val_ratio")

    def fixed_training_batch(self, dataset, cfg: DictConfig) -> dict[str, Any]:
        """A fixed, seeded batch of training windows for the action-MSE diagnostic.

        The original reuses the first shuffled batch of the run; a fixed seeded draw is the same kind of
        sample but survives resume unchanged and does not disturb the training data order.
        """
        g = torch.Generator().manual_seed(int(cfg.training.seed))
        n = min(len(dataset), int(cfg.dataloader.batch_size))
        idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
        return torch.utils.data.default_collate([dataset[i] for i in idx])

    def fixed_validation_batch(self, val_dataset, cfg: DictConfig) -> dict[str, Any]:
        """The same kind of fixed batch from the validation windows, for a task without env runner."""
        if len(val_dataset) == 0:
            raise ConfigError(
                "task.env_runner is null, so the run is judged on validation episodes, but task.dataset has "
                "none; set task.dataset.val_ratio > 0 (or give the zarr a meta/val_mask split)"
            )
        return self.fixed_training_batch(val_dataset, cfg)

    def sampling_obs(self, batch: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def action_mse(self, result: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        return F.mse_loss(result["action_pred"], batch["action"])


def check_shape(actual: tuple[int, ...], expected: tuple[int, ...], what: str) -> None:
    if tuple(actual) != tuple(expected):
        raise ConfigError(
            f"dataset {what} has shape {list(actual)} per step but the config's shape_meta says "
            f"{list(expected)}; "
            "fix shape_meta (task.shape_meta / obs_dim / action_dim) or the dataset"
        )
