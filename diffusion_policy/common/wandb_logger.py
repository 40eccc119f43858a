"""Weights & Biases for a training run: online, offline or disabled, never requiring an account.

``logging.mode`` picks the mode (the ``WANDB_MODE`` environment variable wins, as in wandb itself). ``online``
without credentials warns and runs offline (sync later with ``wandb sync``). Rollout videos arrive from the
env runners as mp4 paths and are wrapped in ``wandb.Video`` here, so no other module imports wandb.
"""

from __future__ import annotations

import logging
import os
import secrets
import string
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")
# wandb.init arguments the original's `logging` block may carry; anything else there is ignored
_INIT_KEYS = ("project", "name", "tags", "group", "entity", "notes", "job_type")


def effective_mode(requested: str | None) -> str:
    mode = os.environ.get("WANDB_MODE") or requested or "offline"
    if mode == "dryrun":
        mode = "offline"
    if mode not in MODES:
        raise ValueError(f"logging.mode={mode!r}: use one of {', '.join(MODES)}")
    if mode == "online":
        import wandb

        if not wandb.login(prompt=False, verify=False):
            log.warning("logging.mode=online but no W&B credentials were found; logging offline instead")
            print("warning: logging.mode=online but no W&B credentials found; W&B runs offline", flush=True)
            mode = "offline"
    return mode


class WandbLogger:
    """Thin wrapper around one wandb run; a no-op when disabled."""

    def __init__(
        self,
        logging_cfg: dict[str, Any],
        output_dir: str | os.PathLike,
        config: dict[str, Any],
        run_id: str | None = None,
    ):
        self.mode = effective_mode(logging_cfg.get("mode"))
        self.run = None
        self.run_id = run_id or logging_cfg.get("id")
        if self.mode == "disabled":
            return
        import wandb

        kwargs = {k: logging_cfg[k] for k in _INIT_KEYS if logging_cfg.get(k) is not None}
        if self.run_id is None:
            # secrets, not random: drawing an id must not shift the training RNG streams
            self.run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            dir=str(output_dir),
            config=config,
            mode=self.mode,
            id=self.run_id,
            resume="allow",  # the id is kept in the checkpoint: a resumed run continues its W&B run
            **kwargs,
        )
        self.run.config.update({"output_dir": str(output_dir)}, allow_val_change=True)

    def log(self, data: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        import wandb

        converted = {}
        for k, v in data.items():
            if isinstance(v, str) and v.endswith(".mp4"):
                if Path(v).is_file():
                    converted[k] = wandb.Video(v, format="mp4")
            else:
                converted[k] = v
        self.run.log(converted, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
