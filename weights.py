"""Reading and writing weight files safely, one way for every model of the pack.

Pickled checkpoints are read with ``torch.load(weights_only=True)`` only; strict loads report every
missing, unexpected or wrongly shaped tensor; this pack's own files are written as safetensors,
atomically (a temp file in the same folder, then a rename), so an interrupted save never leaves a
corrupt file behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

# The dtype names the pack's settings and node inputs use, and the torch dtype each means.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def describe_keys(keys: Iterable[str], limit: int = 5) -> str:
    """``"N tensors (a, b, c, ...)"``: enough of a file's keys to recognise what it is."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} tensors ({shown}{', ...' if len(keys) > limit else ''})"


# torch.load(weights_only=True) runs code from a crafted file before torch 2.6 (CVE-2025-32434).
SAFE_PICKLE_TORCH = (2, 6)
# What torch.save writes under the names checkpoints are released with.
TORCH_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def torch_reads_pickles_safely(version: str | None = None) -> bool:
    """Whether this torch's ``weights_only`` unpickler is safe (torch >= 2.6; ``version`` for tests)."""
    match = re.match(r"(\d+)\.(\d+)", version or torch.__version__)
    return match is not None and (int(match.group(1)), int(match.group(2))) >= SAFE_PICKLE_TORCH


def read_torch_checkpoint(
    path: Path, error: type[Exception], fix: str, allowed_globals: Iterable[type] = ()
) -> object:
    """``torch.load(weights_only=True)`` on the CPU (memory-mapped when the format allows), or
    ``error`` naming the file, the cause and ``fix``. ``allowed_globals`` are plain-data classes some
    releases pickle beside their weights (ULIP saves its argparse ``Namespace``). Refused outright on a
    torch whose unpickler is not safe (before 2.6)."""
    if not torch_reads_pickles_safely():
        raise error(
            f"{path.name} is a pickled checkpoint, and this torch {torch.__version__} cannot read pickles safely "
            "(torch.load(weights_only=True) can run code from a crafted file before torch 2.6, CVE-2025-32434). "
            "Upgrade torch to 2.6 or newer in ComfyUI's Python, or use a .safetensors copy of the file."
        )
    allowed = list(allowed_globals)
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    errors: list[Exception] = []
    for mmap in (True, False):  # mmap needs the zip format; legacy files take the second try
        try:
            with safe_globals(allowed) if safe_globals and allowed else contextlib.nullcontext():
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...
            errors.append(exc)
    exc = errors[-1]
    raise error(
        f"{path.name} could not be read as a safe PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:300]}). "
        f"It may be truncated or hold pickled code, which is never loaded. {fix}"
    ) from exc


def unwrap_state_dict(obj: object) -> object:
    """The tensors of a checkpoint: ``{"state_dict": ...}`` unwrapped, DDP's ``module.`` prefix removed."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], limit: int = 3) -> str | None:
    """``None`` when ``found`` has exactly the keys and shapes of ``expected``; else what differs."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    parts = [
        f"missing {len(missing)} (e.g. {', '.join(missing[:limit])})" if missing else "",
        f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:limit])})" if unexpected else "",
        f"wrong shapes {len(wrong)} (e.g. {'; '.join(wrong[:limit])})" if wrong else "",
    ]
    details = "; ".join(part for part in parts if part)
    return details or None


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def build_and_load(factory: Callable[[], ModuleT], state_dict: Mapping[str, torch.Tensor], error: type[Exception],
                   what: str) -> ModuleT:
    """``factory()`` with ``state_dict`` loaded strictly. The module is first built on the meta device and
    its keys and shapes compared with the file's, so a file whose metadata describes a huge network is
    refused (``error``: ``"{what}: <what differs>"``) before anything is allocated; the real module then
    costs no more than the weights the file holds."""
    with torch.device("meta"):
        expected = factory().state_dict()
    details = state_dict_mismatch(expected, state_dict)
    if details:
        raise error(f"{what}: {details}")
    model = factory()
    model.load_state_dict(state_dict, strict=True)
    return model


ConfigT = TypeVar("ConfigT")


def config_from_json(cls: type[ConfigT], text: str | Mapping[str, Any], error: type[Exception], what: str) -> ConfigT:
    """A config dataclass (with an ``extra`` dict field) from the JSON this pack writes into file metadata.

    Fields a newer version added are kept in ``extra`` rather than dropped or guessed at, so an older
    pack still loads the file and can say what it does not know."""
    if isinstance(text, str):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise error(f"{what} metadata is not valid JSON: {exc}") from exc
    else:
        raw = dict(text)
    if not isinstance(raw, dict):
        raise error(f"{what} metadata must be a JSON object")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raw = {k: v for k, v in raw.items() if k in known} | {"extra": {**raw.get("extra", {}), **{k: raw[k] for k in unknown}}}
    try:
        return cls(**raw)
    except TypeError as exc:
        raise error(f"{what} metadata is incomplete: {exc}") from exc


def read_json_object(path: Path, error: type[Exception], where: str, fix: str = "") -> dict[str, Any]:
    """The JSON object in ``path`` (a ``config.json``), or ``error`` saying ``where`` is unreadable, not JSON
    or another JSON value, followed by ``fix``."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{where} is not readable JSON ({exc}){fix}") from exc
    if not isinstance(raw, dict):
        raise error(f"{where} holds a {type(raw).__name__}, not an object{fix}")
    return raw


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Have ``write(tmp)`` fill a temp file beside ``path``, flush it to disk, then rename it over ``path``:
    a crash or a full disk leaves either the old file or the complete new one, never a torn one. Any
    failure of the write (``SafetensorError``, pickling, a full disk) comes out as an ``OSError`` naming
    ``path``, after the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file should be as readable as any other
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and not isinstance(exc, OSError):
            raise OSError(f"cannot write {path} ({type(exc).__name__}: {exc})") from exc
        raise
    return path


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` to ``path`` as safetensors with ``metadata``, atomically (:func:`write_atomic`)."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(cpu, str(tmp), metadata=dict(metadata)))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """``path`` holds ``text`` (UTF-8), written atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def torch_save_atomic(obj: object, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to ``path``, atomically (:func:`write_atomic`); for the released pickle layouts."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def copy_missing_files(source_dir: str | os.PathLike[str], target_dir: str | os.PathLike[str]) -> list[str]:
    """Copy each file of ``source_dir`` that ``target_dir`` lacks, atomically; never overwrite. Returns the
    names copied. A file that cannot be written is logged and skipped: samples are a convenience."""
    copied = []
    for source in sorted(Path(source_dir).iterdir()):
        target = Path(target_dir) / source.name
        if not source.is_file() or target.exists():
            continue
        try:
            write_atomic(target, lambda tmp, source=source: shutil.copyfile(source, tmp))
        except OSError as exc:
            logger.warning("could not copy the sample %s to %s: %s", source.name, target_dir, exc)
            continue
        copied.append(source.name)
    return copied
