"""The VAE-latent cache of the bridge and U-ViT trainers.

**Latent cache**: the VAE encodes every image once, unflipped and flipped, and the posterior's mean and
standard deviation go to safetensors shards (fp16, with metadata); training then samples the latent
exactly as ``vae.encode(x).latent_dist.sample()`` would, without running the VAE. A cache is reused
only when its key (the pairs with their file sizes and times, the transform, the VAE's weights) is
identical; each process encodes its own shards, an interrupted build continues shard by shard.

Every shard is checked whenever the cache is judged complete or read, from its header alone (no tensor
is read): readable and not truncated, the cache's key and format in its metadata, ``mean`` and ``std``
(or ``empty`` for a shard with no decodable image), one row per image it lists, fp16
``[n, 2, C, h, w]`` with the latent shape the index records. A shard that fails is named in the log and
encoded again; one found only when the cache is read is refused with a :class:`BridgeDataError` that
names it. An image whose latents are NaN or infinite (after the fp16 conversion) is skipped and counted,
never cached; values are not scanned at open (a multi-TB cache would be read end to end at every
start), but every row read for training is checked, and a shard changed on disk after its build is
named when its first bad row is read.

**Crop geometry** (SDXL's micro-conditioning): a cache built with ``geometry_resolution`` also records, for every
image it keeps, its size before resizing and the offset of its crop (:func:`.image_data.crop_geometry`) in a
``geometry`` tensor (int32 ``[n, 4]``: original height, width, crop top, left) of each shard: format
``x2i.bridge-latents/2``, a key of its own. Caches without it (SD1.x, PixArt, U-ViT) keep format 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..weights import save_safetensors_atomic, write_text_atomic
from .distributed import Distributed
from .errors import writing
from .image_data import BridgeDataError, CropGeometry, ImageCaption, load_image, load_image_with_geometry
from .shards import INDEX_FILE, ShardHandles, UnreadableShard, read_index, shard_file, shard_header

logger = logging.getLogger(__name__)

CACHE_FORMAT = "x2i.bridge-latents/1"
# Format 1 plus each kept image's crop geometry (SDXL's micro-conditioning).
GEOMETRY_CACHE_FORMAT = "x2i.bridge-latents/2"
LATENT_TENSORS = frozenset({"mean", "std"})
GEOMETRY_TENSOR = "geometry"
GEOMETRY_DTYPE = "I32"  # as safetensors headers name torch.int32
EMPTY_SHARD_TENSORS = frozenset({"empty"})
LATENT_DTYPE = "F16"  # as safetensors headers name torch.float16


def cache_key(items: Sequence[ImageCaption], settings: dict[str, Any], vae_fingerprint: str, cache_format: str = CACHE_FORMAT) -> str:
    """What a cache's files must carry to be reused: the format, the settings, the VAE, every pair with its
    file size and time. ``cache_format``: :data:`GEOMETRY_CACHE_FORMAT` for a cache that records crop geometry."""
    digest = hashlib.sha256(json.dumps({"format": cache_format, "settings": settings, "vae": vae_fingerprint}, sort_keys=True).encode())
    for item in items:
        digest.update(f"{item.image}\t{item.caption}\t{item.size}\t{item.mtime_ns}\n".encode())
    return digest.hexdigest()


@torch.no_grad()
def encode_both_flips(vae: nn.Module, pixels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std of ``pixels`` ``[B, 3, H, W]`` unflipped and flipped: two
    ``[B, 2, C, h, w]`` fp16 tensors on the CPU."""
    param = next(vae.parameters())
    pixels = pixels.to(device=device, dtype=param.dtype)
    posterior = vae.encode(torch.cat([pixels, pixels.flip(-1)])).latent_dist
    n = len(pixels)
    mean = torch.stack([posterior.mean[:n], posterior.mean[n:]], dim=1)
    std = torch.stack([posterior.std[:n], posterior.std[n:]], dim=1)
    return mean.to("cpu", torch.float16), std.to("cpu", torch.float16)


@dataclass
class CacheState:
    state: str  # "complete", "broken", "partial", "stale", "absent"
    shards_done: int
    shards_total: int
    # "<shard file>: <what is wrong>" for each shard a "broken" cache cannot use.
    problems: list[str] = field(default_factory=list)


def read_latent_row(handle, path: Path, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``row``'s posterior mean and std ``[2, C, h, w]`` fp16, checked for NaN and infinities: one
    comparison per value read (see the module docstring for why values are not scanned at open)."""
    mean = handle.get_slice("mean")[row: row + 1][0]
    std = handle.get_slice("std")[row: row + 1][0]
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise BridgeDataError(
            f"latent cache shard {path.name} holds NaN or infinite values (row {row}); the file changed after it was "
            "built. Delete it and run again to encode it again"
        )
    return mean, std


class LatentRows:
    """Rows of a complete latent cache's shards for training: each process (a forked loader worker too)
    opens its own read-only handles, and every row read is checked (:func:`read_latent_row`)."""

    def __init__(self, folder: Path) -> None:
        self.handles = ShardHandles(folder, "latent cache shard", BridgeDataError)

    def read(self, shard: int, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        return read_latent_row(self.handles[shard], shard_file(self.handles.folder, shard), row)

    def read_geometry(self, shard: int, row: int) -> CropGeometry:
        """Row ``row``'s crop geometry (a cache built with ``geometry_resolution``)."""
        values = self.handles[shard].get_slice(GEOMETRY_TENSOR)[row: row + 1][0].tolist()
        if min(values) < 0 or min(values[:2]) < 1:
            raise BridgeDataError(
                f"latent cache shard {shard_file(self.handles.folder, shard).name} holds an impossible crop geometry {values} "
                f"(row {row}); the file changed after it was built. Delete it and run again to encode it again"
            )
        return CropGeometry(*values)


class LatentCache:
    """Shards ``shard-XXXXX.safetensors`` (``mean``/``std`` ``[n, 2 (unflipped, flipped), C, h, w]`` fp16, the
    kept pair indices, the undecodable and the non-finite ones in metadata) and ``index.json`` written
    when all are done.

    ``geometry_resolution``: also record every kept image's :class:`.image_data.CropGeometry` for this training
    resolution (the one the transform crops to) in a ``geometry`` tensor: format
    :data:`GEOMETRY_CACHE_FORMAT`, whose ``key`` comes from ``cache_key(..., cache_format=GEOMETRY_CACHE_FORMAT)``."""

    def __init__(self, folder: str | os.PathLike[str], items: Sequence[ImageCaption], key: str, shard_size: int = 1024,
                 geometry_resolution: int | None = None) -> None:
        self.folder = Path(folder)
        self.items = list(items)
        self.key = key
        self.shard_size = shard_size
        self.geometry_resolution = geometry_resolution
        self.format = GEOMETRY_CACHE_FORMAT if geometry_resolution else CACHE_FORMAT
        self.tensors = LATENT_TENSORS | {GEOMETRY_TENSOR} if geometry_resolution else LATENT_TENSORS
        self.num_shards = (len(self.items) + shard_size - 1) // shard_size
        # Items whose latents were NaN or infinite (skipped), as read_index() found them.
        self.non_finite: list[int] = []

    def shard_path(self, shard: int) -> Path:
        return shard_file(self.folder, shard)

    def _inspect(self, shard: int, latent_shape: Sequence[int] | None = None) -> tuple[dict[str, str] | None, str | None, list[int] | None]:
        """``(metadata, None, latent shape or None)`` for a usable shard, ``(None, what is wrong, None)``
        otherwise; from the header alone (see the module docstring)."""
        path = self.shard_path(shard)
        if not path.is_file():
            return None, "missing", None
        try:
            metadata, header = shard_header(path)
        except UnreadableShard as exc:
            return None, str(exc), None
        if metadata.get("format") != self.format or metadata.get("key") != self.key:
            return None, "from another dataset, VAE or setting (its key differs from this cache's)", None
        try:
            kept, skipped, non_finite = (json.loads(metadata.get(name, "[]")) for name in ("kept", "skipped", "non_finite"))
            listed = sorted(int(i) for i in [*kept, *skipped, *non_finite])
        except (TypeError, ValueError):
            return None, "metadata without readable lists of its images", None
        first = shard * self.shard_size
        if metadata.get("shard") != str(shard) or listed != list(range(first, min(first + self.shard_size, len(self.items)))):
            return None, f"metadata that lists other images than shard {shard}'s", None
        if not kept:
            if set(header) != EMPTY_SHARD_TENSORS:
                return None, f"the tensors {sorted(header)} for no image", None
            return metadata, None, None
        if set(header) != self.tensors:
            return None, f"the tensors {sorted(header)}, not {sorted(self.tensors)}", None
        shape, dtype = header["mean"]
        if header["std"] != (shape, dtype) or dtype != LATENT_DTYPE or len(shape) != 5 or shape[:2] != [len(kept), 2]:
            return None, (
                f"mean {dtype} {shape} and std {header['std'][1]} {header['std'][0]}; expected {LATENT_DTYPE} "
                f"[{len(kept)}, 2, C, h, w] for both"
            ), None
        if latent_shape is not None and shape[2:] != list(latent_shape):
            return None, f"{shape[2:]} latents where the cache holds {list(latent_shape)}", None
        if GEOMETRY_TENSOR in self.tensors and header[GEOMETRY_TENSOR] != ([len(kept), 4], GEOMETRY_DTYPE):
            found_shape, found_dtype = header[GEOMETRY_TENSOR]
            return None, f"geometry {found_dtype} {found_shape}; expected {GEOMETRY_DTYPE} [{len(kept)}, 4]", None
        return metadata, None, shape[2:]

    def _read_index(self) -> dict[str, Any] | None:
        return read_index(self.folder)

    def _index_problems(self, index: dict[str, Any]) -> list[str]:
        """``"<shard file>: <what is wrong>"`` for each shard of an index of this key that cannot be used."""
        kept_lists = index.get("kept")
        if not isinstance(kept_lists, list) or len(kept_lists) != self.num_shards:
            return [f"{INDEX_FILE}: lists another number of shards than {self.num_shards}"]
        latent_shape = index.get("latent_shape")  # absent from indexes written before it was recorded
        problems = []
        for shard in range(self.num_shards):
            metadata, problem, shape = self._inspect(shard, latent_shape)
            latent_shape = latent_shape or shape
            if problem is None and json.loads(metadata["kept"]) != kept_lists[shard]:
                problem = f"lists other images than {INDEX_FILE}"
            if problem is not None:
                problems.append(f"{self.shard_path(shard).name}: {problem}")
        return problems

    def state(self) -> CacheState:
        """complete (index written for this key, every shard usable), broken (index of this key, but some
        shards are not usable: named in ``problems``, encoded again on use), partial (some shards of this
        key), stale (another dataset's or VAE's files, rebuilt on use) or absent."""
        index = self._read_index()
        if index is not None and index.get("key") == self.key:
            problems = self._index_problems(index)
            if not problems:
                return CacheState("complete", self.num_shards, self.num_shards)
            return CacheState("broken", max(0, self.num_shards - len(problems)), self.num_shards, problems)
        done = sum(1 for s in range(self.num_shards) if self._inspect(s)[1] is None)
        if done:
            return CacheState("partial", done, self.num_shards)
        stale = index is not None or (self.folder / INDEX_FILE).is_file() or (
            self.folder.is_dir() and any(self.folder.glob("shard-*.safetensors")))
        return CacheState("stale" if stale else "absent", 0, self.num_shards)

    def build(self, load_vae: Callable[[], nn.Module], transform: Callable, dist: Distributed, batch_size: int) -> None:
        """Every process encodes its missing or unusable shards (loading the VAE only if it has any), then
        rank 0 writes the index; every process must call this, whatever it finds on disk."""
        if self.missing_shards(dist.rank, dist.world_size):
            built = self.build_shards(load_vae(), transform, dist.device, dist.rank, dist.world_size, batch_size)
            logger.info("latent cache: this process encoded %d shard(s)", built)
        dist.barrier()
        if dist.is_main and self.state().state != "complete":
            self.write_index()
        dist.barrier()

    def missing_shards(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """This process's shards (``s % world_size == rank``) not yet written for this key, or not usable."""
        return [s for s in range(rank, self.num_shards, world_size) if self._inspect(s)[1] is not None]

    @torch.no_grad()
    def build_shards(
        self, vae: nn.Module, transform: Callable, device: torch.device, rank: int = 0, world_size: int = 1, batch_size: int = 16,
    ) -> int:
        """Encode this process's missing or unusable shards (shard ``s`` belongs to rank ``s % world_size``);
        returns how many. A shard that exists but cannot be used is named in the log."""
        missing = []
        for shard in range(rank, self.num_shards, world_size):
            problem = self._inspect(shard)[1]
            if problem is None:
                continue
            missing.append(shard)
            if problem != "missing":
                logger.warning("latent cache: %s: %s; encoding it again", self.shard_path(shard).name, problem)
        with writing("latent cache", "free disk space or set cache.dir to another folder, then run again (finished shards are kept)",
                     BridgeDataError):
            self.folder.mkdir(parents=True, exist_ok=True)
            for shard in missing:
                self._build_shard(shard, vae, transform, device, batch_size)
        return len(missing)

    def _build_shard(self, shard: int, vae: nn.Module, transform: Callable, device: torch.device, batch_size: int) -> None:
        first = shard * self.shard_size
        pending: list[tuple[int, torch.Tensor]] = []
        kept: list[int] = []
        skipped: list[int] = []
        non_finite: list[int] = []
        means: list[torch.Tensor] = []
        stds: list[torch.Tensor] = []
        geometry: dict[int, CropGeometry] = {}
        indices = list(range(first, min(first + self.shard_size, len(self.items))))
        for position, index in enumerate(indices):
            try:
                if self.geometry_resolution:
                    pixels, geometry[index] = load_image_with_geometry(self.items[index].image, transform, self.geometry_resolution)
                else:
                    pixels = load_image(self.items[index].image, transform)
                pending.append((index, pixels))
            except (OSError, ValueError, SyntaxError) as exc:
                skipped.append(index)
                logger.warning("latent cache: %s does not decode (%s); skipped", self.items[index].image, exc)
            if pending and (len(pending) == batch_size or position == len(indices) - 1):
                mean, std = encode_both_flips(vae, torch.stack([pixels for _, pixels in pending]), device)
                # Checked as stored (fp16): an overflow becomes inf only there.
                finite = torch.isfinite(mean.flatten(1)).all(dim=1) & torch.isfinite(std.flatten(1)).all(dim=1)
                for (index_in_batch, _), ok in zip(pending, finite.tolist(), strict=True):
                    if ok:
                        kept.append(index_in_batch)
                    else:
                        non_finite.append(index_in_batch)
                        logger.warning("latent cache: %s gives NaN or infinite latents; skipped", self.items[index_in_batch].image)
                means.append(mean[finite])
                stds.append(std[finite])
                pending.clear()
        tensors = {"mean": torch.cat(means), "std": torch.cat(stds)} if kept else {"empty": torch.zeros(0)}
        if kept and self.geometry_resolution:
            tensors[GEOMETRY_TENSOR] = torch.tensor(
                [[g.original_height, g.original_width, g.crop_top, g.crop_left] for g in map(geometry.__getitem__, kept)], dtype=torch.int32)
        metadata = {
            "format": self.format, "key": self.key, "shard": str(shard), "kept": json.dumps(kept), "skipped": json.dumps(skipped),
            "non_finite": json.dumps(non_finite),
        }
        save_safetensors_atomic(tensors, self.shard_path(shard), metadata)
        logger.info("latent cache: shard %d/%d (%d images)", shard + 1, self.num_shards, len(kept))

    def write_index(self) -> None:
        """After every shard is written (call on one process only). Every shard is checked; one that
        fails was changed by something else since this run wrote it, and is named, not rebuilt."""
        kept, skipped, non_finite = [], [], []
        latent_shape = None
        for shard in range(self.num_shards):
            metadata, problem, shape = self._inspect(shard, latent_shape)
            if problem is not None:
                raise BridgeDataError(
                    f"latent cache shard {self.shard_path(shard)}: {problem}; delete it and run again to encode it again"
                )
            latent_shape = latent_shape or shape
            kept.append(json.loads(metadata["kept"]))
            skipped.extend(json.loads(metadata["skipped"]))
            non_finite.extend(json.loads(metadata.get("non_finite", "[]")))
        index = {
            "format": self.format, "key": self.key, "count": sum(map(len, kept)), "latent_shape": latent_shape, "kept": kept,
            "skipped": skipped, "non_finite": non_finite,
        }
        with writing("latent cache", "free disk space or choose another cache folder, then run again (the shards are kept)",
                     BridgeDataError):
            write_text_atomic(self.folder / INDEX_FILE, json.dumps(index))

    def read_index(self) -> tuple[list[tuple[int, int, int]], list[int]]:
        """``[(item index, shard, row)]`` of the cached samples, and the item indices that did not decode
        (those with non-finite latents go to :attr:`non_finite`). Every shard's header is checked first."""
        index = self._read_index()
        if index is None:
            raise BridgeDataError(f"latent cache {self.folder} has no readable {INDEX_FILE}; build it first (or delete the folder)")
        if index.get("key") != self.key:
            raise BridgeDataError(f"latent cache {self.folder} belongs to another dataset or VAE; delete it or choose another folder")
        problems = self._index_problems(index)
        if problems:
            more = f"; {len(problems) - 3} more" if len(problems) > 3 else ""
            raise BridgeDataError(
                f"latent cache {self.folder}: {'; '.join(problems[:3])}{more}; delete the shard file(s) named and run again: "
                "the trainer encodes exactly those again"
            )
        self.non_finite = list(index.get("non_finite", []))
        locations = [(item, shard, row) for shard, kept in enumerate(index["kept"]) for row, item in enumerate(kept)]
        return locations, list(index["skipped"])
