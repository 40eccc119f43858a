"""Train a policy: ``python train.py [--config-name=NAME] [group=option ...] [key=value ...]``.

Examples (see README):
    python train.py experiment=quickstart
    python train.py --config-name=train_diffusion_unet_hybrid_workspace training.device=cuda:0
    python train.py --config-dir=. --config-name=image_pusht_diffusion_policy_cnn.yaml training.device=cpu
    python train.py -m training.seed=42,43,44 [hydra/launcher=joblib|ray|submitit_slurm|submitit_local]
    torchrun --nproc_per_node=2 train.py ...
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from diffusion_policy.common.config_resolvers import register_resolvers
from diffusion_policy.common.errors import (
    CheckpointError,
    ConfigError,
    DeviceError,
    RunInterrupted,
    SweepJobFailed,
    WorkerDiedError,
    one_line,
)
from diffusion_policy.common.hydra_checks import CheckedConfigDefaults, ConfigRejected, hydra_error_line
from diffusion_policy.common.sweep_metrics import TABLE_MD, is_multirun, wandb_names, write_table

register_resolvers()
# config/hydra/launcher/{ray,submitit_*}.yaml carry the plugins' option names so that
# `hydra/launcher=ray` gets the project's settings; Hydra 1.3 then checks them against the plugin's schema and
# warns that this matching is deprecated. The files are complete on their own, so they work without it too.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")

KNOWN_ERRORS = (ConfigError, CheckpointError, DeviceError, FileNotFoundError)


@hydra.main(config_path="config", config_name="train_diffusion_unet_lowdim_workspace", version_base=None)
def main(cfg: DictConfig) -> None:
    register_resolvers()  # again: launcher plugins (joblib) may run this function in a fresh process
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    in_sweep = is_multirun(hydra_cfg)
    if in_sweep and cfg.get("logging") is not None:
        # jobs of one sweep share a W&B group named after the sweep; each run is named by its overrides
        group, name = wandb_names(hydra_cfg)
        with open_dict(cfg):
            cfg.logging.name = name
            if cfg.logging.get("group") is None:
                cfg.logging.group = group
    # resolve once so every ${now:} in the config gets the same timestamp
    OmegaConf.resolve(cfg)

    def fail(message: str, exit_code: int) -> None:
        message = one_line(message)
        if in_sweep:
            # a failed job must not end the sweep: Hydra records it, the launcher goes on with the others
            raise SweepJobFailed(
                message, exit_code, str(Path(str(hydra_cfg.sweep.dir)).absolute() / TABLE_MD)
            )
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(exit_code)

    try:
        workspace_cls = hydra.utils.get_class(cfg._target_)
        workspace_cls(cfg).run()
    except KNOWN_ERRORS as e:
        fail(str(e), 2)
    except WorkerDiedError as e:
        fail(str(e), 1)
    except RunInterrupted as stop:
        # also in a sweep: the process ends, so a scheduler that requeues the job (SLURM) starts it again
        # and it resumes from latest.ckpt
        print(f"interrupted: {stop}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except ImportError as e:
        fail(f"_target_={cfg.get('_target_')!r} cannot be imported ({e})", 2)


def cli() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    user_wants_traces = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # let Hydra's config errors (unknown group, key or option) reach us, to print them as one line
    os.environ["HYDRA_FULL_ERROR"] = "1"
    # composes the config check into every config, the original's too (see common/hydra_checks.py)
    Plugins.instance().register(CheckedConfigDefaults)
    try:
        main()
    except SweepJobFailed as failed:
        # raised by the sweeper once every job of the sweep has ended (Hydra then skips on_multirun_end, so
        # the table is finalised here); the table names all failed jobs
        if failed.table and Path(failed.table).parent.is_dir():
            write_table(Path(failed.table).parent, final=True)
        print(f"error: a sweep job failed: {failed} (every job's outcome: {failed.table})", file=sys.stderr)
        sys.exit(failed.exit_code)
    except ConfigRejected as rejected:
        print(f"error: {one_line(rejected.error)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as e:
        if user_wants_traces:
            raise
        print(f"error: {hydra_error_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        # Ctrl-C before training began (training itself stops through RunInterrupted)
        print("interrupted: SIGINT received before training started; nothing to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
