"""Frozen encoders run once: their features go to safetensors shards on disk, and every epoch reads them.

A cache is one folder (``<cache dir>/<name>/``) of ``shard-NNNNN.safetensors`` files (``features``
``[n, ...]`` and ``valid`` ``[n]``) and an ``index.json`` written last. Its *fingerprint* names what
the features depend on: the encoder (path plus size and modification time of every weight file, or
their sha256 with ``cache.verify = "sha256"``), the data (sha256 of the listing, in order), the
encoder settings, the storage dtype and a format version. An index with the same fingerprint is
reused; any difference is logged by name and the cache is rebuilt.

Every shard is checked whenever the cache is judged complete or opened, from its header alone (no
tensor is read, so the check costs what listing the folder does): readable and not truncated (a
safetensors header must cover the whole file), the cache's fingerprint key in its metadata, exactly
``features`` and ``valid``, the row count, shapes and dtype the index implies. A shard that fails is
named in the log and is the only one encoded again ("broken" state); where the trainer cannot rebuild
(a cache checked again after it was built), a :class:`FeatureCacheError` names the shard and says to
delete it.

Building is shared by the ranks of a distributed run: shard ``k`` is encoded and written by rank
``k % world_size`` (distinct files, each written atomically), then rank 0 checks every shard and writes
the index while the others wait at a barrier. A build that was interrupted resumes: shards that
already carry the fingerprint are kept.

Items the encoder cannot read (a broken sound file, a cloud with too few points) are stored as zeros
with ``valid = 0``, counted by reason, and their first few reasons logged; training never sees them.
So are items whose features are NaN or infinite (after conversion to the storage dtype, so an fp16
overflow counts too): reason ``non-finite features``. Values are not scanned when a cache is opened (a
multi-TB cache would be read end to end at every start); instead every row read for training is
checked (:class:`ShardedFeatures`), which costs one comparison per value already in memory, and a shard
changed on disk after its build is named when its first bad row is read.

Reading is memory-mapped (``safetensors.safe_open``): a sample costs one slice of one shard, so
caches far larger than memory train at disk speed.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..weights import DTYPES, save_safetensors_atomic, write_text_atomic
from .distributed import Distributed
from .errors import TrainingError, writing
from .fingerprints import changed_fields, fingerprint_key
from .shards import INDEX_FILE, ShardHandles, UnreadableShard, read_index, shard_file, shard_header

logger = logging.getLogger(__name__)

CACHE_FORMAT = "x2i.feature_cache/1"
SHARD_BYTES = 256 * 2**20  # ~256 MiB of features per shard when shard_size is 0 (auto)
LOG_EVERY_S = 15.0
LOGGED_EXAMPLES = 5
# The same dtypes as safetensors headers name them (checked without reading a tensor).
HEADER_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
SHARD_TENSORS = frozenset({"features", "valid"})
NON_FINITE = "non-finite features"

# encode(items) -> (features [n, *item_shape] float32 on any device, per-item error or None)
EncodeFn = Callable[[Sequence[Any]], tuple[torch.Tensor, list[str | None]]]


class FeatureCacheError(TrainingError):
    """A cache that cannot be built or read (disk, permissions, corrupt shards). A :class:`TrainingError`,
    so the command line prints it as one ``error:`` line wherever it is raised, also from a loader
    worker while training."""


class FeatureCache:
    """One cache folder: its state, how to build it, how to read it."""

    def __init__(self, root: Path, name: str, fingerprint: dict[str, Any], num_items: int, dtype: str = "fp32",
                 shard_size: int = 0) -> None:
        self.folder = Path(root) / name
        self.name = name
        self.num_items = int(num_items)
        self.dtype = dtype
        self.torch_dtype = DTYPES[dtype]
        self.shard_size_setting = int(shard_size)
        # The item shape follows from the encoder (fingerprinted), so it is not part of the key: the
        # key must be known before any encoder is loaded, to reuse a cache without loading one.
        self.fingerprint = {
            **fingerprint, "cache_format": CACHE_FORMAT, "num_items": self.num_items, "dtype": dtype,
            "shard_size": self.shard_size_setting,
        }
        self.key = fingerprint_key(self.fingerprint)

    def shard_size_for(self, item_shape: Sequence[int]) -> int:
        if self.shard_size_setting:
            return self.shard_size_setting
        item_bytes = max(1, math.prod(item_shape)) * self.torch_dtype.itemsize
        return max(1, min(1 << 16, SHARD_BYTES // item_bytes))

    def shard_path(self, k: int) -> Path:
        return shard_file(self.folder, k)

    def _read_index(self) -> dict[str, Any] | None:
        return read_index(self.folder)

    def shard_problem(self, k: int, count: int | None, item_shape: Sequence[int] | None) -> str | None:
        """What is wrong with shard ``k`` for this cache (``None``: usable), from its header alone.

        ``count`` (rows) and ``item_shape`` (one item's shape) as the index or the build says them; ``None``
        where they are not known yet (counting the shards an interrupted build finished): then the shard
        only has to agree with its own metadata.
        """
        path = self.shard_path(k)
        if not path.is_file():
            return "missing"
        try:
            meta, header = shard_header(path)
        except UnreadableShard as exc:
            return str(exc)
        if meta.get("cache_key") != self.key:
            return "from another build (its fingerprint key differs from this cache's)"
        if set(header) != SHARD_TENSORS:
            return f"holds the tensors {sorted(header)}, not {sorted(SHARD_TENSORS)}"
        if count is None:
            count = int(meta["count"]) if str(meta.get("count", "")).isdigit() else -1
        if meta.get("shard") != str(k) or meta.get("count") != str(count):
            return f"says it is shard {meta.get('shard')} of {meta.get('count')} rows; expected shard {k} of {count} rows"
        features_shape, features_dtype = header["features"]
        if features_dtype != HEADER_DTYPES[self.dtype]:
            return f"stores features as {features_dtype}, the cache as {HEADER_DTYPES[self.dtype]}"
        expected = [count, *item_shape] if item_shape is not None else [count, *features_shape[1:]]
        if features_shape != expected:
            return f"holds features of shape {features_shape}, expected {expected}"
        if header["valid"] != ([count], "U8"):
            return f"holds valid as {header['valid'][1]} {header['valid'][0]}, expected U8 [{count}]"
        return None

    def _index_problems(self, index: dict[str, Any]) -> list[str]:
        """``"<shard file>: <what is wrong>"`` for every shard the index lists that cannot be used."""
        try:
            num_shards, shard_size = int(index["num_shards"]), int(index["shard_size"])
            item_shape = [int(s) for s in index["item_shape"]]
        except (KeyError, TypeError, ValueError):
            return [f"{INDEX_FILE}: unreadable"]
        if shard_size < 1 or num_shards != max(1, math.ceil(self.num_items / shard_size)):
            return [f"{INDEX_FILE}: lists {num_shards} shards of {shard_size} for {self.num_items} items"]
        problems = []
        for k in range(num_shards):
            problem = self.shard_problem(k, min(shard_size, self.num_items - k * shard_size), item_shape)
            if problem is not None:
                problems.append(f"{self.shard_path(k).name}: {problem}")
        return problems

    def state(self) -> str:
        """``complete``, ``missing``, ``partial (k shards)``, ``broken (<shard>: <problem>; ...)`` or
        ``stale (<changed fields>)``. Every shard's header is checked (see the module docstring)."""
        index = self._read_index()
        if index is not None and index.get("key") == self.key:
            problems = self._index_problems(index)
            if not problems:
                return "complete"
            more = f"; {len(problems) - 3} more" if len(problems) > 3 else ""
            return f"broken ({'; '.join(problems[:3])}{more})"
        done = 0
        for path in self.folder.glob("shard-*.safetensors"):
            k = path.stem.removeprefix("shard-")
            if k.isdigit() and self.shard_problem(int(k), None, None) is None:
                done += 1
        if done:
            return f"partial ({done} shard(s) done)"
        if index is not None:
            changed = changed_fields(index.get("fingerprint", {}), self.fingerprint)
            return f"stale ({', '.join(changed[:6]) or 'format'} changed)"
        return "missing"

    def build(self, items: Sequence[Any], encode: EncodeFn, item_shape: Sequence[int], ranks: Distributed | None = None,
              batch_size: int = 32, state: str | None = None) -> None:
        """Encode ``items`` into the cache unless it is complete; every rank must call this. Shards
        that already hold this cache's features (checked as :meth:`state` does) are kept; only missing
        or broken ones are encoded.

        ``state``: :meth:`state` as this rank read it before any rank started building (after the
        caller's barrier); read here, followed by a barrier, if not given.
        """
        ranks = ranks or Distributed()
        if len(items) != self.num_items:
            raise FeatureCacheError(f"{self.name}: {len(items)} items given for a cache of {self.num_items}")
        if state is None:
            state = self.state()
            ranks.barrier()  # every rank has read the state before rank 0 may change the folder
        if state == "complete":
            logger.info("feature cache %s: reused (%s, %d items)", self.name, self.folder, self.num_items)
            return
        self.item_shape = tuple(int(s) for s in item_shape)
        self.shard_size = self.shard_size_for(self.item_shape)
        self.num_shards = max(1, math.ceil(self.num_items / self.shard_size))
        if ranks.is_main:
            logger.info("feature cache %s: %s -> building %d items in %d shard(s) at %s", self.name, state,
                        self.num_items, self.num_shards, self.folder)
        with self._writing("finished shards are kept"):
            if ranks.is_main:
                self.folder.mkdir(parents=True, exist_ok=True)
                (self.folder / INDEX_FILE).unlink(missing_ok=True)  # never a valid-looking index over a half rebuild
            ranks.barrier()
            mine = [k for k in range(self.num_shards) if k % ranks.world_size == ranks.rank]
            todo = []
            for k in mine:
                problem = self.shard_problem(k, self._shard_len(k), self.item_shape)
                if problem is None:
                    continue
                todo.append(k)
                if problem != "missing":
                    logger.warning("feature cache %s: %s: %s; encoding it again", self.name, self.shard_path(k).name, problem)
            progress = _Progress(self.name, sum(self._shard_len(k) for k in mine))
            progress.advance(sum(self._shard_len(k) for k in mine if k not in todo), resumed=True)
            for k in todo:
                self._build_shard(k, items, encode, batch_size, progress)
        ranks.barrier()
        if ranks.is_main:
            self._write_index()
        ranks.barrier()

    def _writing(self, kept: str):
        return writing(f"feature cache {self.name}", f"free disk space or set cache.dir to another folder, then run again ({kept})",
                       FeatureCacheError)

    def _shard_len(self, k: int) -> int:
        return min(self.shard_size, self.num_items - k * self.shard_size)

    def _build_shard(self, k: int, items: Sequence[Any], encode: EncodeFn, batch_size: int, progress: _Progress) -> None:
        start = k * self.shard_size
        count = self._shard_len(k)
        features = torch.zeros((count, *self.item_shape), dtype=self.torch_dtype)
        valid = torch.zeros(count, dtype=torch.uint8)
        reasons: Counter = Counter()
        examples: list[str] = []
        for offset in range(0, count, batch_size):
            chunk = items[start + offset: start + min(count, offset + batch_size)]
            encoded, errors = encode(chunk)
            if tuple(encoded.shape) != (len(chunk), *self.item_shape):
                raise FeatureCacheError(
                    f"{self.name}: the encoder gave features of shape {tuple(encoded.shape[1:])}, expected {self.item_shape}"
                )
            stored = encoded.detach().to("cpu", self.torch_dtype)
            # Checked as stored: a value beyond fp16's range becomes inf only here.
            finite = torch.isfinite(stored.reshape(len(chunk), -1)).all(dim=1)
            features[offset: offset + len(chunk)] = stored
            for j, error in enumerate(errors):
                if error is None and not finite[j]:
                    error = f"{NON_FINITE}: the encoder gave NaN or infinite values (stored as {self.dtype})"
                if error is None:
                    valid[offset + j] = 1
                    continue
                features[offset + j] = 0
                reason = error.split(":", 1)[0]
                reasons[reason] += 1
                if len(examples) < LOGGED_EXAMPLES:
                    examples.append(f"{_describe_item(chunk[j])}: {error}")
                progress.failed(_describe_item(chunk[j]), error)
            progress.advance(len(chunk))
        metadata = {
            "format": CACHE_FORMAT, "cache_key": self.key, "shard": str(k), "start": str(start), "count": str(count),
            "skipped": json.dumps(dict(reasons)), "examples": json.dumps(examples),
        }
        save_safetensors_atomic({"features": features, "valid": valid}, self.shard_path(k), metadata)

    def _write_index(self) -> None:
        """Check every shard (all ranks' work), then write the index; rank 0 only."""
        from safetensors import safe_open

        reasons: Counter = Counter()
        examples: list[str] = []
        num_valid = 0
        for k in range(self.num_shards):
            path = self.shard_path(k)
            # Written moments ago by this run; a shard that fails now was changed by something else
            # (another run sharing the folder, a full disk on another rank), so it is named, not rebuilt.
            problem = self.shard_problem(k, self._shard_len(k), self.item_shape)
            if problem is None:
                try:
                    with safe_open(str(path), framework="pt") as handle:
                        meta = handle.metadata() or {}
                        valid = handle.get_tensor("valid")
                except Exception as exc:
                    problem = f"unreadable ({type(exc).__name__}: {str(exc)[:160]})"
            if problem is not None:
                raise FeatureCacheError(
                    f"feature cache {self.name}: {path.name}: {problem}; delete {path} and run again to encode it again"
                )
            num_valid += int(valid.sum())
            reasons.update(json.loads(meta.get("skipped", "{}")))
            examples += json.loads(meta.get("examples", "[]"))
        for k in range(self.num_shards, self.num_shards + 100_000):  # leftovers of a larger earlier build
            if not self.shard_path(k).is_file():
                break
            self.shard_path(k).unlink()
        index = {
            "key": self.key, "fingerprint": self.fingerprint, "num_items": self.num_items, "num_valid": num_valid,
            "num_shards": self.num_shards, "shard_size": self.shard_size, "item_shape": list(self.item_shape),
            "skipped": dict(reasons), "examples": examples[:LOGGED_EXAMPLES],
        }
        with self._writing("the shards are kept"):
            write_text_atomic(self.folder / INDEX_FILE, json.dumps(index, indent=1))
        if reasons:
            logger.warning("feature cache %s: %d of %d items unusable and skipped (%s)", self.name,
                           self.num_items - num_valid, self.num_items, ", ".join(f"{r}: {c}" for r, c in sorted(reasons.items())))
        logger.info("feature cache %s: complete, %d items (%d usable)", self.name, self.num_items, num_valid)

    def summary(self) -> dict[str, Any]:
        """The index's counts (after :meth:`build`)."""
        index = self._read_index() or {}
        return {"num_items": index.get("num_items", 0), "num_valid": index.get("num_valid", 0), "skipped": index.get("skipped", {})}

    def open(self) -> ShardedFeatures:
        """The complete cache for reading; every shard's header is checked first (:meth:`state`)."""
        index = self._read_index()
        state = self.state()
        if state.startswith("broken"):
            raise FeatureCacheError(
                f"feature cache {self.name} at {self.folder} is {state}; delete the shard file(s) named and run again: "
                "the trainer encodes exactly those again"
            )
        if state != "complete" or index is None:
            raise FeatureCacheError(f"feature cache {self.name} at {self.folder} is not complete; build it first")
        return ShardedFeatures(self.folder, self.num_items, int(index["shard_size"]), int(index["num_shards"]), self.name)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _describe_item(item: Any) -> str:
    text = str(getattr(item, "path", item))  # a sound clip by its file; texts and paths as they are
    return text if len(text) <= 80 else text[:77] + "..."


class _Progress:
    """Logs items/s and the time left every ``LOG_EVERY_S`` seconds, and the first failures."""

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total, self.done, self.fresh = name, total, 0, 0
        self.started = self.last = time.monotonic()
        self.failures = 0

    def failed(self, item: str, error: str) -> None:
        self.failures += 1
        if self.failures <= LOGGED_EXAMPLES:
            logger.warning("feature cache %s: skipped %s (%s)", self.name, item, error)
        elif self.failures == LOGGED_EXAMPLES + 1:
            logger.warning("feature cache %s: further unreadable items are only counted", self.name)

    def advance(self, count: int, resumed: bool = False) -> None:
        self.done += count
        self.fresh += 0 if resumed else count
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_S or self.done == self.total:
            rate = self.fresh / max(now - self.started, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            logger.info("feature cache %s: %d/%d (%.1f%%), %.1f items/s, %.0f s left", self.name, self.done,
                        self.total, 100 * self.done / max(self.total, 1), rate, left)
            self.last = now


class ShardedFeatures:
    """Read-only, memory-mapped view of a complete cache: ``features[i]`` is item ``i``; ``valid`` [N] bool.

    Every row read is checked for NaN and infinities (one comparison per value already read; a scan
    of the whole cache at open would read a multi-TB cache end to end at every start). The cache
    never stores such a row as valid, so one means the shard changed on disk after it was built: a
    :class:`FeatureCacheError` names the shard.
    """

    def __init__(self, folder: Path, num_items: int, shard_size: int, num_shards: int, name: str = "") -> None:
        self.folder = folder
        self.name = name or folder.name
        self.num_items = num_items
        self.shard_size = shard_size
        self.starts = [k * shard_size for k in range(num_shards)]
        self.handles = ShardHandles(folder, f"feature cache {self.name}: shard", FeatureCacheError)
        from safetensors import safe_open

        valid = []
        for k in range(num_shards):
            with safe_open(str(shard_file(folder, k)), framework="pt") as handle:
                valid.append(handle.get_tensor("valid").bool())
                if k == 0:
                    self.item_shape = tuple(handle.get_slice("features").get_shape()[1:])
        self.valid = torch.cat(valid)

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num_items:
            raise IndexError(f"feature index {i} out of range ({self.num_items})")
        k = bisect.bisect_right(self.starts, i) - 1
        row = self.handles[k].get_slice("features")[i - self.starts[k]]
        if not torch.isfinite(row).all():
            raise FeatureCacheError(
                f"feature cache {self.name}: shard {shard_file(self.folder, k).name} holds NaN or infinite values (row {i - self.starts[k]}, "
                f"item {i}); the file changed after it was built. Delete it and run again to encode it again"
            )
        return row

    def gather(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([self[int(i)] for i in indices]) if len(indices) else torch.empty(0, *self.item_shape)
