"""The trainer's own error, and how a failed write becomes one: a full disk, a quota or a permission names
the file it could not write and what to do, on one ``error:`` line of the command line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import X2IError

RERUN = "free disk space (or point run.output_dir elsewhere) and run the same command again"


class TrainingError(X2IError):
    """A run that cannot start or continue, with what to do about it."""


def write_error_text(exc: OSError) -> str:
    """``cannot write <path> (<why>)`` for an ``OSError`` raised while writing (``weights.write_atomic``'s
    already reads so; a plain one names its file and the system's reason)."""
    text = str(exc)
    if text.startswith("cannot write"):
        return text
    if exc.filename is not None:
        return f"cannot write {exc.filename} ({exc.strerror or text})"
    return f"cannot write ({text})"


@contextlib.contextmanager
def writing(what: str, fix: str = RERUN, error: type[TrainingError] = TrainingError) -> Iterator[None]:
    """An ``OSError`` (full disk, permissions, quota) while writing ``what`` becomes ``error``:
    ``<what>: cannot write <path> (<why>); <fix>``. What was written before stays intact: every file of a
    run is written atomically."""
    try:
        yield
    except OSError as exc:
        raise error(f"{what}: {write_error_text(exc)}; {fix}") from exc
