"""The config check as a Hydra callback, run before Hydra creates the run (or sweep) directory.

The callback is declared in config: ``diffusion_policy/hydra_defaults/hydra/env/default.yaml`` fills
Hydra's ``hydra/env`` group, which Hydra reserves for such environment-wide defaults and composes into
every config, so the original's configs (``--config-dir`` / ``--config-name``, which know nothing of this
framework) are checked too. :class:`CheckedConfigDefaults` puts that file before Hydra's own empty
``hydra/env/default.yaml`` on the search path; ``train.py`` registers it, so other Hydra applications in the
same environment are left alone.

Presets (``experiment=...``, ``debug=...``) made for one root config say so under the same callback::

    hydra:
      callbacks:
        validate_config:
          _target_: diffusion_policy.common.hydra_checks.ValidateBeforeRun
          root_configs:
            experiment: [train_diffusion_transformer_lowdim_pusht_workspace]

and one composed onto another root config stops with one line naming the right ``--config-name``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hydra.experimental.callback import Callback
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import DictConfig, OmegaConf

from diffusion_policy.common.config_check import validate_config
from diffusion_policy.common.config_origin import ConfigSource
from diffusion_policy.common.errors import ConfigError, one_line

DEFAULTS_PACKAGE = "pkg://diffusion_policy.hydra_defaults"


class CheckedConfigDefaults(SearchPathPlugin):
    """Puts this framework's ``hydra/env/default.yaml`` (which declares :class:`ValidateBeforeRun`) before
    Hydra's own on the config search path."""

    def manipulate_search_path(self, search_path: Any) -> None:
        search_path.prepend(provider="diffusion_policy", path=DEFAULTS_PACKAGE)


class ConfigRejected(BaseException):
    """Carries a :class:`ConfigError` out of a Hydra callback.

    Hydra turns ordinary exceptions raised by callbacks into warnings; this one it lets through.
    """

    def __init__(self, error: ConfigError):
        super().__init__(str(error))
        self.error = error


def preset_root_problem(
    choices: Mapping[str, Any], config_name: str, root_configs: Mapping[str, Sequence[str]]
) -> str | None:
    """Why the chosen presets do not fit the root config ``config_name``, or None.

    ``choices``: Hydra's ``hydra.runtime.choices`` (group -> chosen option); ``root_configs``: group -> the
    root configs the chosen preset of that group was written for.
    """
    name = config_name.removesuffix(".yaml")
    for group, roots in root_configs.items():
        option = choices.get(group)
        if option is None or name in roots:
            continue
        fits = " or ".join(f"--config-name={r}" for r in roots)
        return (
            f"{group}={option} is a preset for {fits}, not for the root config {name}: run "
            f"python train.py --config-name={roots[0]} {group}={option}"
        )
    return None


class ValidateBeforeRun(Callback):
    """Hydra callback: the presets fit the root config, and the composed config passes
    :func:`~diffusion_policy.common.config_check.validate_config`; otherwise :class:`ConfigRejected`."""

    def __init__(self, root_configs: Mapping[str, Sequence[str]] | None = None) -> None:
        self.root_configs = dict(root_configs or {})

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check(config, kwargs.get("config_name"))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # swept values are not in this config yet; each job's workspace checks its own
        self.check(config, kwargs.get("config_name"))

    def check(self, config: DictConfig, config_name: str | None = None) -> None:
        """What Hydra runs: ``config`` is the composed config with its ``hydra`` node."""
        config_name = config_name or OmegaConf.select(config, "hydra.job.config_name", default="")
        choices = OmegaConf.select(config, "hydra.runtime.choices", default=None) or {}
        try:
            problem = preset_root_problem(choices, config_name or "", self.root_configs)
            if problem is not None:
                raise ConfigError(problem)
            validate_config(
                config, ConfigSource.from_hydra(config.hydra, config_name), skip_unresolvable=True
            )
        except ConfigError as e:
            raise ConfigRejected(e) from None


def hydra_error_line(error: BaseException) -> str:
    """A Hydra or OmegaConf error (unknown group, key or option) as one line, without the search path."""
    text = str(error).split("Config search path:")[0]
    if error.__cause__ is not None and str(error.__cause__) not in text:
        text += f" ({str(error.__cause__).splitlines()[0]})"
    return one_line(text)
