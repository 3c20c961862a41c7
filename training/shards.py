"""The files both kinds of cache are made of (:mod:`.features`, :mod:`.latent_cache`): ``shard-NNNNN.safetensors``
in the cache's folder, checked from their headers alone, read through per-process handles, and the
``index.json`` written when every shard is done."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

INDEX_FILE = "index.json"


class UnreadableShard(Exception):
    """A shard whose header cannot be read (the message says why); the caches say what to do."""


def shard_file(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}.safetensors"


def shard_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[list[int], str]]]:
    """A shard's metadata and ``{tensor: (shape, safetensors dtype)}``, from its header alone (no tensor is
    read). ``safe_open`` refuses a header that does not cover the file exactly, so a truncated or extended
    shard raises :class:`UnreadableShard` here."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: (list(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype()) for name in handle.keys()}
    except Exception as exc:  # SafetensorError, OSError: the file cannot be used, whatever the cause
        raise UnreadableShard(f"unreadable or truncated ({type(exc).__name__}: {str(exc)[:160]})") from exc
    return metadata, tensors


def read_index(folder: Path) -> dict[str, Any] | None:
    """The folder's ``index.json``, or ``None`` when there is none that reads as a table."""
    try:
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) else None


class ShardHandles:
    """Read-only ``safe_open`` handles on a complete cache's shards, opened on first use. They belong to the
    process that opened them: a forked DataLoader worker opens its own (an mmap handle must not cross a
    fork) and a pickled copy starts with none. A shard that can no longer be opened (replaced or removed
    while training) is ``error``: ``<what> <file> can no longer be read (…)``."""

    def __init__(self, folder: Path, what: str, error: type[Exception]) -> None:
        self.folder = Path(folder)
        self.what, self.error = what, error
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def __getitem__(self, k: int):
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            from safetensors import safe_open

            path = shard_file(self.folder, k)
            try:
                self._handles[k] = safe_open(str(path), framework="pt")
            except Exception as exc:
                raise self.error(
                    f"{self.what} {path.name} can no longer be read ({type(exc).__name__}: {str(exc)[:160]}); delete it and "
                    "run again to encode it again"
                ) from exc
        return self._handles[k]
