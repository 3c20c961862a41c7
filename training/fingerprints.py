"""What identifies the inputs of a cache without reading them twice: weight files and folders by their
paths, sizes and modification times (or content hashes), and data listings by a hash of their entries."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .config import differing_leaves


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_path(path: str | os.PathLike[str] | None, verify: str = "stat") -> dict[str, Any] | None:
    """What identifies a weight file or model folder: its path and, per file, size and mtime (or sha256)."""
    if path is None:
        return None
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    entries = []
    for file in files:
        stat = file.stat()
        entry: dict[str, Any] = {"name": file.relative_to(path).as_posix() if file != path else file.name, "size": stat.st_size}
        if verify == "sha256":
            entry["sha256"] = _sha256_file(file)
        else:
            entry["mtime_ns"] = stat.st_mtime_ns
        entries.append(entry)
    return {"path": str(path), "files": entries}


def fingerprint_key(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def hash_strings(strings: Iterable[str]) -> str:
    """sha256 of a sequence of strings (length-prefixed, so ``["ab", "c"]`` and ``["a", "bc"]`` differ)."""
    digest = hashlib.sha256()
    for text in strings:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def changed_fields(old: Any, new: Any) -> list[str]:
    """Names of the fingerprint fields that changed (for the 'rebuilding because' log line)."""
    return [key or "value" for key, _, _ in differing_leaves(old, new)]
