"""Train a policy: ``python train.py [--config-name=NAME] [group=option ...] [key=value ...]``.

Examples (see README):
    python train.py experiment=quickstart
    python train.py --config-name=train_diffusion_unet_hybrid_workspace training.device=cuda:0
    python train.py --config-dir=. --config-name=image_pusht_diffusion_policy_cnn.yaml training.device=cpu
    python train.py -m training.seed=42,43,44 [hydra/launcher=joblib]
    torchrun --nproc_per_node=2 train.py ...
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffusion_policy.common.config_resolvers import register_resolvers
from diffusion_policy.common.errors import (
    CheckpointError,
    ConfigError,
    DeviceError,
    RunInterrupted,
    WorkerDiedError,
    one_line,
)
from diffusion_policy.common.hydra_checks import CheckedConfigDefaults, ConfigRejected, hydra_error_line

register_resolvers()

KNOWN_ERRORS = (ConfigError, CheckpointError, DeviceError, FileNotFoundError)


@hydra.main(config_path="config", config_name="train_diffusion_unet_lowdim_workspace", version_base=None)
def main(cfg: DictConfig) -> None:
    register_resolvers()  # again: launcher plugins (joblib) may run this function in a fresh process
    # resolve once so every ${now:} in the config gets the same timestamp
    OmegaConf.resolve(cfg)
    try:
        workspace_cls = hydra.utils.get_class(cfg._target_)
        workspace_cls(cfg).run()
    except KNOWN_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except WorkerDiedError as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(1)
    except RunInterrupted as stop:
        print(f"interrupted: {stop}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except ImportError as e:
        print(
            f"error: _target_={cfg.get('_target_')!r} cannot be imported ({e})", file=sys.stderr, flush=True
        )
        sys.exit(2)


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
