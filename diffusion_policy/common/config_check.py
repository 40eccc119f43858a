"""The config check: the schema, then the rules across keys, as one :class:`ConfigError` line.

A failure names the key, the value, what is allowed and where the value came from, e.g.::

    training.num_epochs=-1 is not allowed: an integer >= 1 (set on the command line: training.num_epochs=-1)

``train.py`` runs it through the Hydra callback ``hydra_checks.ValidateBeforeRun`` before Hydra creates the
run directory; every training workspace runs it again when it is built, which covers sweeps, ``eval.py``
and library use.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from pydantic import ValidationError

from diffusion_policy.common.config_origin import ConfigSource, dotted_key, trace
from diffusion_policy.common.config_rules import CROSS_KEY_RULES
from diffusion_policy.common.config_schema import CHECKED_KEYS, RunConfig, field_description
from diffusion_policy.common.errors import ConfigError, one_line

_ABSENT = object()


def validate_config(
    cfg: DictConfig, source: ConfigSource | None = None, skip_unresolvable: bool = False
) -> None:
    """Raise a one-line :class:`ConfigError` if a framework value is wrong; ``cfg`` may be unresolved.

    ``skip_unresolvable``: if a checked block cannot be resolved yet (Hydra's own ``${hydra:...}`` values
    exist only once the job runs), check nothing and leave it all to the workspace's check.
    """
    source = source or ConfigSource()
    raw = OmegaConf.to_container(cfg, resolve=False)
    data: dict[str, Any] = {}
    for key in CHECKED_KEYS:
        try:
            node = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
            if isinstance(node, DictConfig | ListConfig):
                node = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as e:
            missing = getattr(e, "full_key", None) or key
            raise ConfigError(
                f"{missing} is not set (???): give it a value ({source.origin(missing)})"
            ) from None
        except OmegaConfBaseException as e:
            if skip_unresolvable:
                return
            detail = one_line(str(e).split("\n")[0])
            raise ConfigError(f"{key} cannot be resolved: {detail} ({source.origin(key)})") from None
        if node is _ABSENT:
            continue
        parent = data
        *head, last = key.split(".")
        for h in head:
            parent = parent.setdefault(h, {})
        parent[last] = node
    runner = data.get("task", {}).get("env_runner")
    if isinstance(runner, dict) and "_target_" not in runner:
        # what debug=fast / smoke / smoke_image do to a task without a simulator: they add rollout sizes
        raise ConfigError(
            f"task.env_runner has settings {sorted(runner)} but no _target_: a task without a simulator "
            "needs task.env_runner: null, and its smoke run is debug=smoke_no_sim (debug=fast/smoke/"
            f"smoke_image add rollout settings) ({source.origin('task.env_runner')})"
        )
    try:
        RunConfig.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        parts = ["_target_" if p == "target" else p for p in first["loc"]]
        allowed = field_description(first, parts)
        origins = {
            dotted_key(trace(raw, ["_target_" if p == "target" else p for p in err["loc"]])) for err in errors
        }
        others = len(origins) - 1
        more = f" (and {others} more problem{'s' if others > 1 else ''})" if others > 0 else ""
        raise ConfigError(
            _message(raw, parts, first.get("input"), allowed, source, first["type"]) + more
        ) from None
    for rule in CROSS_KEY_RULES:
        violation = rule(data)
        if violation is not None:
            parts = violation.key.split(".")
            message = _message(
                raw, parts, violation.value, violation.allowed, source, "rule", violation.related
            )
            raise ConfigError(message)


def _message(raw, parts, value, allowed, source, kind, related=()) -> str:
    origin = trace(raw, parts)
    key, origin_key = dotted_key(parts), dotted_key(origin)
    via = f" (used as {key})" if origin_key != key else ""
    where = source.origin(origin_key, *(dotted_key(trace(raw, r.split("."))) for r in related))
    if kind == "missing":
        return f"{origin_key} is missing{via}: it must be {allowed} ({where})"
    return f"{origin_key}={value!r}{via} is not allowed: {allowed} ({where})"
