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
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffusion_policy.common.config_resolvers import register_resolvers
from diffusion_policy.common.errors import CheckpointError, ConfigError, DeviceError

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
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        sys.exit(2)
    except ImportError as e:
        print(
            f"error: _target_={cfg.get('_target_')!r} cannot be imported ({e})", file=sys.stderr, flush=True
        )
        sys.exit(2)


def _one_line(e: BaseException) -> str:
    text = str(e).split("Config search path:")[0]
    if e.__cause__ is not None and str(e.__cause__) not in text:
        text += f" ({str(e.__cause__).splitlines()[0]})"
    return " ".join(text.split())


def cli() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    user_wants_traces = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # let Hydra's config errors (unknown group, key or option) reach us, to print them as one line
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        if user_wants_traces:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    cli()
