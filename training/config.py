"""Trainer configuration: a TOML or JSON file of sections, overridden from the command line.

A config file holds one table per section (``[run]``, ``[data]``, ``[model]`` …); each trainer reads
its sections into explicit dataclasses, so a misspelt key is an error instead of a silently ignored
setting.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import X2IError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(X2IError):
    """A config file, override or value the trainer cannot use."""


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        elif path.suffix.lower() == ".toml":
            raw = tomllib.loads(text)
        else:
            raise ConfigError(f"config file {path} must end in .toml or .json")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be parsed: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a table of sections")
    return raw


def _parse_value(text: str) -> Any:
    # TOML literals give numbers, booleans, quoted strings and lists; anything else is a bare string
    # (paths, names) so `--set data.source=/data/en.txt` needs no quoting.
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {override!r} must look like section.key=value (e.g. run.batch_size=64)")
    table = raw
    for part in parts[:-1]:
        child = table.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
        table = child
    table[parts[-1]] = _parse_value(value.strip())


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The config file's sections (or an empty config) with ``section.key=value`` overrides applied."""
    raw = _read_file(Path(path)) if path else {}
    for override in overrides:
        apply_override(raw, override)
    return raw


def move_keys(raw: Mapping[str, Any], moves: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """``raw`` (a table of sections) with every key named on the left of ``moves`` (``"section.key"``) moved
    to the name on its right, and the old names found. Settings keep working under the names they had
    before a rename; a key given under both names is a :class:`ConfigError`."""
    out = {name: dict(values) if isinstance(values, Mapping) else values for name, values in raw.items()}
    found = []
    for old, new in moves.items():
        (old_section, old_key), (new_section, new_key) = old.split(".", 1), new.split(".", 1)
        values = out.get(old_section)
        if not isinstance(values, dict) or old_key not in values:
            continue
        target = out.setdefault(new_section, {})
        if not isinstance(target, dict):
            continue  # section() names the ill-typed section
        if new_key in target:
            raise ConfigError(f"{old} is the old name of {new} and both are set; keep only {new}")
        target[new_key] = values.pop(old_key)
        found.append(old)
    return out, found


def differing_leaves(old: Any, new: Any, missing: Any = None) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` of every leaf where two trees of settings differ (sorted by key
    at each level); a key only one side has is ``missing`` on the other."""
    if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
        return [] if old == new else [("", old, new)]
    found = []
    for key in sorted(set(old) | set(new)):
        for path, a, b in differing_leaves(old.get(key, missing), new.get(key, missing), missing):
            found.append((f"{key}.{path}" if path else str(key), a, b))
    return found


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if origin in (list, tuple, Sequence):
        (item, *_) = typing.get_args(annotation) or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin in (dict, Mapping):
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def section(raw: Mapping[str, Any], name: str, cls: type[T]) -> T:
    """Build the dataclass ``cls`` from ``raw[name]``: unknown keys and ill-typed values are errors."""
    values = raw.get(name, {})
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{name}] must be a table of settings, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"[{name}] has unknown setting(s) {', '.join(unknown)}; valid settings: {', '.join(sorted(known))}")
    kwargs = {}
    for key, value in values.items():
        if not _matches(value, hints[key]):
            raise ConfigError(f"[{name}] {key} = {value!r} is not a valid {_describe(hints[key])}")
        kwargs[key] = float(value) if hints[key] is float else value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        missing = [f for f, spec in known.items() if f not in kwargs and spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING]
        raise ConfigError(f"[{name}] needs {', '.join(f'{m} = …' for m in missing) or 'more settings'} ({exc})") from exc
    except ValueError as exc:
        raise ConfigError(f"[{name}] {exc}") from exc


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "choice (" + " | ".join(repr(a) for a in typing.get_args(annotation)) + ")"
    return getattr(annotation, "__name__", str(annotation))


def as_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain JSON-ready dict (how configs are saved into checkpoints and metadata)."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))
