"""The one rule for turning a name from a node input into a path, and what tells that the file behind it changed.

A name becomes a path only as ComfyUI's ``folder_paths.get_full_path`` makes one, so no input reaches outside
ComfyUI's model and input folders; pure standard library, no ComfyUI needed."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable


def contained(root: str, name: str) -> str:
    """``root`` joined with ``name`` the way ComfyUI's ``folder_paths.get_full_path`` does it: the name is
    normalised as if it started at ``/``, so ``..`` and absolute paths cannot climb out of ``root``, while
    a symlink a user placed inside ``root`` (a model folder on another disk) is followed as usual."""
    return os.path.join(root, os.path.relpath(os.path.join("/", name), "/"))


def find_in_folders(roots: Iterable[str], name: str, accept: Callable[[str], bool]) -> str | None:
    """The first ``contained(root, name)`` that ``accept`` takes (``os.path.isfile``, a folder test...)."""
    if not isinstance(name, str) or not name or "\0" in name:
        return None
    return next((path for root in roots if accept(path := contained(root, name))), None)


def disk_state(path: str | None) -> tuple | None:
    """What changes when a file or model folder is replaced on disk (every file's name, size and mtime), for
    ``fingerprint_inputs``: ComfyUI re-runs a loader when it changes, not only when the chosen name does."""
    if path is None or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        stat = os.stat(path)
        return (stat.st_size, stat.st_mtime_ns)
    state = []
    for folder, _, files in os.walk(path, followlinks=True):
        for name in sorted(files):
            stat = os.stat(os.path.join(folder, name))
            state.append((os.path.relpath(os.path.join(folder, name), path), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(state))
