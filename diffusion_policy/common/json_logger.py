"""``logs.json.txt``: one JSON object of numbers per line, as the original writes it."""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Any


def _numbers_only(data: dict[str, Any]) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Number):
            continue
        out[k] = int(v) if isinstance(v, numbers.Integral) else float(v)
    return out


class JsonLogger:
    """Append-only line log that survives being killed mid-write.

    On ``start()`` an existing file is kept, a partial last line (from a kill) is cut off, and with
    ``drop_from_step`` the lines of steps a resumed run is about to redo are dropped too.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = None
        self.last_log: dict[str, Any] | None = None

    def start(self, drop_from_step: int | None = None) -> None:
        lines: list[str] = []
        if self.path.exists():
            raw = self.path.read_bytes()
            complete = raw[: raw.rfind(b"\n") + 1]
            for line in complete.decode("utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if drop_from_step is not None and entry.get("global_step", -1) >= drop_from_step:
                    continue
                lines.append(line)
                self.last_log = entry
            if len(complete) != len(raw) or drop_from_step is not None:
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(line + "\n" for line in lines))
                os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 -- kept open for the whole run

    def log(self, data: dict[str, Any]) -> None:
        entry = _numbers_only(data)
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        self.last_log = entry

    def get_last_log(self) -> dict[str, Any] | None:
        return self.last_log

    def stop(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonLogger:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def read_json_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete entries of a ``logs.json.txt``."""
    entries = []
    for line in Path(path).read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries
