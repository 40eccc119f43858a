"""The export directory's manifest: names and the one-line error type. No torch, no numpy-heavy imports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT_NAME = "diffusion_policy_export"
FORMAT_VERSION = 2  # 2: DDIM / DDPM tables from diffusers in the manifest
MANIFEST_NAME = "manifest.json"


class ExportError(RuntimeError):
    """A one-line, user-facing problem with an export or an export directory."""


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """Read and check ``DIR/manifest.json``; an ExportError when DIR is not an export of this format."""
    path = Path(export_dir)
    if not path.is_dir():
        raise ExportError(f"export dir {path} does not exist or is not a directory")
    file = path / MANIFEST_NAME
    if not file.is_file():
        raise ExportError(
            f"{path} is not a policy export: it has no {MANIFEST_NAME} (write one with export.py)"
        )
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{file} is not readable JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ExportError(f"{file} is not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ExportError(
            f"{file} has format version {manifest.get('version')}; this code reads version {FORMAT_VERSION} "
            "(export the checkpoint again with export.py)"
        )
    return manifest
