"""Where a config value came from, for the one-line message that rejects it.

A value is traced through plain ``${a.b}`` interpolations to the key that holds it, and that key to the
command-line override that set it or, failing that, to the config it was composed from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class ConfigSource:
    """Where a config came from: the command-line overrides, and words for everything else."""

    overrides: tuple[str, ...] = ()
    description: str = "the config"

    @classmethod
    def from_hydra(
        cls, hydra_node: DictConfig | None = None, config_name: str | None = None, default: str = "the config"
    ) -> ConfigSource:
        """From Hydra's ``hydra`` node (default: the running job's); ``default`` describes a plain config."""
        if hydra_node is None:
            from hydra.core.hydra_config import HydraConfig

            if not HydraConfig.initialized():
                return cls(description=default)
            hydra_node = HydraConfig.get()
        overrides = tuple(OmegaConf.to_container(hydra_node.overrides.task, resolve=False))
        name = config_name or OmegaConf.select(hydra_node, "job.config_name", default=None) or "the config"
        groups = set(OmegaConf.select(hydra_node, "runtime.choices", default={}) or {})
        chosen = [o for o in overrides if _override_key(o) in groups]
        where = f"config {name}" + (f" with {' '.join(chosen)}" if chosen else "")
        return cls(overrides=overrides, description=where)

    def origin(self, key: str, *related: str) -> str:
        """Which command-line override set ``key`` (or, for a rule across keys, one of ``related``)."""
        for candidate in (key, *related):
            for override in self.overrides:
                k = _override_key(override)
                if candidate == k or candidate.startswith((k + ".", k + "[")):
                    return f"set on the command line: {override}"
        return f"from {self.description}"


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


_SIMPLE_INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")


def trace(raw: Any, parts: list[Any]) -> list[Any]:
    """The key a value at ``parts`` really comes from, following plain ``${a.b}`` interpolations."""
    for _ in range(20):  # interpolation chains are short; this bounds a cycle
        node, redirected = raw, None
        for i, part in enumerate(parts):
            if isinstance(node, str) and (m := _SIMPLE_INTERPOLATION.match(node)):
                redirected = m.group(1).split(".") + parts[i:]
                break
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                return parts
        else:
            if isinstance(node, str) and (m := _SIMPLE_INTERPOLATION.match(node)):
                redirected = m.group(1).split(".")
        if redirected is None:
            return parts
        parts = redirected
    return parts


def dotted_key(parts: list[Any]) -> str:
    """``["a", "b", 0]`` -> ``"a.b[0]"``."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out
