"""Results that survive interruption: one JSON line per finished sample, appended and synced."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

__all__ = ["ResultStore"]


class ResultStore:
    """``path`` holds one record per line; a record is identified by its ``key`` and ``label``.

    A run killed mid-write leaves at most one partial last line, which is ignored (and its sample
    recomputed); every complete line is kept.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # the torn last line of an interrupted run
        self._done = {(r.get("key"), r.get("label")) for r in self.records}

    def done(self, key: str, label: str) -> bool:
        return (key, label) in self._done

    def add(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True)
        with open(self.path, "a+", encoding="utf-8") as handle:
            # After a torn write the file may not end in a newline; start a fresh line first.
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(handle.tell() - 1)
                if handle.read(1) != "\n":
                    handle.write("\n")
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(record)
        self._done.add((record["key"], record["label"]))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)
