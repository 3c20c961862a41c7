"""Image–caption data for the LaVi-Bridge trainer, and its optional VAE-latent cache.

Sources:

- **the official format**: a text file with ``image_path<TAB>caption`` per line; relative paths are
  resolved against the file's folder;
- **a folder of images with sidecar captions**: ``cat.jpg`` + ``cat.txt`` (searched recursively).

A pair that cannot be used (missing or unreadable image, missing or empty caption, a line without a
tab, undecodable text) is skipped and counted by reason, the first few reasons logged; an empty result
is an error. Images go through the official transform — Resize(512), CenterCrop(512), ToTensor,
Normalize(0.5, 0.5) — and the official RandomHorizontalFlip(0.5) happens in the training model
(:mod:`.bridge_task`) on the training process's RNG, so it is resumable and survives latent caching.

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
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bridge.language_models import LaViBridgeRecipe, tokenize_for_bridge
from ..weights import save_safetensors_atomic, write_text_atomic
from .runtime import TrainingError, write_error_text

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CACHE_FORMAT = "x2i.bridge-latents/1"
CACHE_INDEX = "index.json"
MAX_LOGGED_SKIPS = 5
LATENT_TENSORS = frozenset({"mean", "std"})
EMPTY_SHARD_TENSORS = frozenset({"empty"})
LATENT_DTYPE = "F16"  # as safetensors headers name torch.float16


class BridgeDataError(TrainingError, ValueError):
    """A dataset or latent cache the bridge and U-ViT trainers cannot use (missing, empty, unreadable,
    unwritable). A :class:`TrainingError`, so the command line prints it as one ``error:`` line wherever
    it is raised, also from a loader worker while training."""


@dataclass(frozen=True)
class ImageCaption:
    image: Path
    caption: str
    # File size and modification time (ns), part of the latent cache key.
    size: int = 0
    mtime_ns: int = 0


@dataclass
class ScanReport:
    """What a scan found: pairs kept, and skipped pairs counted by reason (the first ones described)."""

    source: str
    seen: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < MAX_LOGGED_SKIPS:
            message = f"{where}: {reason}"
            self.examples.append(message)
            logger.warning("skipped %s", message)

    @property
    def kept(self) -> int:
        return self.seen - sum(self.skipped.values())

    def counts(self, prefix: str = "") -> dict[str, int]:
        out = {f"{prefix}pairs_found": self.seen, f"{prefix}pairs_usable": self.kept}
        out.update({f"{prefix}skipped_{reason.replace(' ', '_')}": n for reason, n in sorted(self.skipped.items())})
        return out


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _read_tsv(path: Path, report: ScanReport) -> list[tuple[Path, str, str]]:
    """``(image path, caption, where)`` of each line that names both."""
    try:
        raw_lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise BridgeDataError(f"cannot read the caption file {path}: {exc}") from exc
    root = path.parent
    out = []
    for number, raw in enumerate(raw_lines, start=1):
        where = f"{path.name} line {number}"
        if not raw.strip():
            continue  # blank lines are layout, not pairs
        report.seen += 1
        line = _decode(raw)
        if line is None:
            report.skip("undecodable text", where)
            continue
        image, tab, caption = line.rstrip("\r\n").partition("\t")
        caption = caption.strip()
        if not tab:
            report.skip("no tab", where)
        elif not image.strip():
            report.skip("empty image path", where)
        elif not caption:
            report.skip("empty caption", where)
        else:
            image_path = Path(os.path.expanduser(image.strip()))
            out.append((image_path if image_path.is_absolute() else root / image_path, caption, where))
    return out


def _read_folder(folder: Path, report: ScanReport) -> list[tuple[Path, str, str]]:
    out = []
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for image in images:
        report.seen += 1
        where = str(image.relative_to(folder))
        sidecar = image.with_suffix(".txt")
        if not sidecar.is_file():
            report.skip("missing caption", where)
            continue
        text = _decode(sidecar.read_bytes())
        if text is None:
            report.skip("undecodable text", where)
        elif not text.strip():
            report.skip("empty caption", where)
        else:
            out.append((image, " ".join(text.split()), where))
    return out


def _probe_image(path: Path) -> tuple[str | None, int, int]:
    """(why unusable or None, size, mtime_ns): the header is read, not the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        stat = path.stat()
    except OSError:
        return "missing image", 0, 0
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return "unreadable image", stat.st_size, stat.st_mtime_ns
    if width < 1 or height < 1:
        return "unreadable image", stat.st_size, stat.st_mtime_ns
    return None, stat.st_size, stat.st_mtime_ns


def scan_pairs(source: str | os.PathLike[str], workers: int = 8) -> tuple[list[ImageCaption], ScanReport]:
    """The usable image–caption pairs of a TSV file or a folder, in file order, and the skip report.

    Every image's header is opened (in ``workers`` threads) so that missing and unreadable files are
    counted before training; raises :class:`BridgeDataError` when nothing is usable.
    """
    source = Path(os.path.expanduser(str(source)))
    report = ScanReport(str(source))
    if source.is_file():
        candidates = _read_tsv(source, report)
        what = "lines 'image_path<TAB>caption'"
    elif source.is_dir():
        candidates = _read_folder(source, report)
        what = f"images ({', '.join(IMAGE_SUFFIXES)}) with a .txt caption of the same name"
    else:
        raise BridgeDataError(
            f"data source {source} does not exist: give a text file of 'image_path<TAB>caption' lines or a folder of "
            "images with .txt captions"
        )
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        probes = list(pool.map(lambda item: _probe_image(item[0]), candidates))
    items = []
    for (image, caption, where), (why, size, mtime) in zip(candidates, probes, strict=True):
        if why:
            report.skip(why, f"{where} ({image})")
        else:
            items.append(ImageCaption(image, caption, size, mtime))
    if not items:
        reasons = ", ".join(f"{n} {r}" for r, n in report.skipped.most_common()) or "none found"
        raise BridgeDataError(f"{source} holds no usable image-caption pairs ({reasons}); it should hold {what}")
    if report.skipped:
        logger.warning(
            "%s: %d of %d pairs skipped (%s)", source.name, sum(report.skipped.values()), report.seen,
            ", ".join(f"{r}: {n}" for r, n in report.skipped.most_common()),
        )
    return items, report


# ---------------------------------------------------------------------------------------------------
# Images and captions


def image_transform(resolution: int = 512) -> Callable:
    """The official transform without its flip: Resize (shorter side), CenterCrop, ToTensor,
    Normalize(0.5, 0.5) → ``[3, res, res]`` in [-1, 1]."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])


def load_image(path: Path, transform: Callable) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        return transform(image.convert("RGB"))


class CaptionTokenizer:
    """A caption → ``(input_ids [T], attention_mask [T])`` exactly as the recipe tokenises prompts."""

    def __init__(self, recipe: LaViBridgeRecipe | str, tokenizer) -> None:
        self.recipe = LaViBridgeRecipe(recipe)
        self.tokenizer = tokenizer

    def __call__(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = tokenize_for_bridge(self.recipe, self.tokenizer, [caption])
        return ids[0], mask[0]


class ImageCaptionDataset(torch.utils.data.Dataset):
    """``{"pixels": [3, H, W], "input_ids": [T], "attention_mask": [T]}`` per pair, decoded on demand.

    An image that stopped decoding since the scan (truncated, replaced) is replaced by the next
    decodable one and counted in ``decode_failures`` (of this process) with a warning.
    """

    def __init__(self, items: Sequence[ImageCaption], transform: Callable, tokenize: CaptionTokenizer) -> None:
        self.items = list(items)
        self.transform = transform
        self.tokenize = tokenize
        self.decode_failures = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for offset in range(len(self.items)):
            item = self.items[(index + offset) % len(self.items)]
            try:
                pixels = load_image(item.image, self.transform)
            except (OSError, ValueError, SyntaxError) as exc:
                self.decode_failures += 1
                logger.warning("image %s no longer decodes (%s); using the next one", item.image, exc)
                continue
            ids, mask = self.tokenize(item.caption)
            return {"pixels": pixels, "input_ids": ids, "attention_mask": mask}
        raise BridgeDataError("no image of the dataset decodes any more")


# ---------------------------------------------------------------------------------------------------
# Latent cache


def cache_key(items: Sequence[ImageCaption], settings: dict[str, Any], vae_fingerprint: str) -> str:
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "settings": settings, "vae": vae_fingerprint}, sort_keys=True).encode())
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


def open_latent_shard(path: Path):
    """A ``safe_open`` handle on a latent shard, or :class:`BridgeDataError` naming it."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # replaced or removed while training
        raise BridgeDataError(
            f"latent cache shard {path.name} can no longer be read ({type(exc).__name__}: {str(exc)[:160]}); delete it and "
            "run again to encode it again"
        ) from exc


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


class LatentCache:
    """Shards ``shard-XXXXX.safetensors`` (``mean``/``std`` ``[n, 2 (unflipped, flipped), C, h, w]`` fp16, the
    kept pair indices, the undecodable and the non-finite ones in metadata) and ``index.json`` written
    when all are done."""

    def __init__(self, folder: str | os.PathLike[str], items: Sequence[ImageCaption], key: str, shard_size: int = 1024) -> None:
        self.folder = Path(folder)
        self.items = list(items)
        self.key = key
        self.shard_size = shard_size
        self.num_shards = (len(self.items) + shard_size - 1) // shard_size
        # Items whose latents were NaN or infinite (skipped), as read_index() found them.
        self.non_finite: list[int] = []

    def shard_path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.safetensors"

    def _inspect(self, shard: int, latent_shape: Sequence[int] | None = None) -> tuple[dict[str, str] | None, str | None, list[int] | None]:
        """``(metadata, None, latent shape or None)`` for a usable shard, ``(None, what is wrong, None)``
        otherwise; from the header alone (see the module docstring)."""
        from safetensors import safe_open

        path = self.shard_path(shard)
        if not path.is_file():
            return None, "missing", None
        try:
            # safe_open refuses a header that does not cover the file exactly: a truncated shard fails here.
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                header = {name: (list(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
        except Exception as exc:  # SafetensorError, OSError: the file cannot be used, whatever the cause
            return None, f"unreadable or truncated ({type(exc).__name__}: {str(exc)[:160]})", None
        if metadata.get("format") != CACHE_FORMAT or metadata.get("key") != self.key:
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
        if set(header) != LATENT_TENSORS:
            return None, f"the tensors {sorted(header)}, not {sorted(LATENT_TENSORS)}", None
        shape, dtype = header["mean"]
        if header["std"] != (shape, dtype) or dtype != LATENT_DTYPE or len(shape) != 5 or shape[:2] != [len(kept), 2]:
            return None, (
                f"mean {dtype} {shape} and std {header['std'][1]} {header['std'][0]}; expected {LATENT_DTYPE} "
                f"[{len(kept)}, 2, C, h, w] for both"
            ), None
        if latent_shape is not None and shape[2:] != list(latent_shape):
            return None, f"{shape[2:]} latents where the cache holds {list(latent_shape)}", None
        return metadata, None, shape[2:]

    def _read_index(self) -> dict[str, Any] | None:
        try:
            index = json.loads((self.folder / CACHE_INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return index if isinstance(index, dict) else None

    def _index_problems(self, index: dict[str, Any]) -> list[str]:
        """``"<shard file>: <what is wrong>"`` for each shard of an index of this key that cannot be used."""
        kept_lists = index.get("kept")
        if not isinstance(kept_lists, list) or len(kept_lists) != self.num_shards:
            return [f"{CACHE_INDEX}: lists another number of shards than {self.num_shards}"]
        latent_shape = index.get("latent_shape")  # absent from indexes written before it was recorded
        problems = []
        for shard in range(self.num_shards):
            metadata, problem, shape = self._inspect(shard, latent_shape)
            latent_shape = latent_shape or shape
            if problem is None and json.loads(metadata["kept"]) != kept_lists[shard]:
                problem = f"lists other images than {CACHE_INDEX}"
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
        stale = index is not None or (self.folder / CACHE_INDEX).is_file() or (
            self.folder.is_dir() and any(self.folder.glob("shard-*.safetensors")))
        return CacheState("stale" if stale else "absent", 0, self.num_shards)

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
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for shard in missing:
                self._build_shard(shard, vae, transform, device, batch_size)
        except OSError as exc:
            raise BridgeDataError(
                f"latent cache: {write_error_text(exc)}; free disk space or set data.latent_cache (data.cache_dir for "
                "U-ViT) to another folder, then run again (finished shards are kept)"
            ) from exc
        return len(missing)

    def _build_shard(self, shard: int, vae: nn.Module, transform: Callable, device: torch.device, batch_size: int) -> None:
        first = shard * self.shard_size
        pending: list[tuple[int, torch.Tensor]] = []
        kept: list[int] = []
        skipped: list[int] = []
        non_finite: list[int] = []
        means: list[torch.Tensor] = []
        stds: list[torch.Tensor] = []
        indices = list(range(first, min(first + self.shard_size, len(self.items))))
        for position, index in enumerate(indices):
            try:
                pending.append((index, load_image(self.items[index].image, transform)))
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
        metadata = {
            "format": CACHE_FORMAT, "key": self.key, "shard": str(shard), "kept": json.dumps(kept), "skipped": json.dumps(skipped),
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
            "format": CACHE_FORMAT, "key": self.key, "count": sum(map(len, kept)), "latent_shape": latent_shape, "kept": kept,
            "skipped": skipped, "non_finite": non_finite,
        }
        try:
            write_text_atomic(self.folder / CACHE_INDEX, json.dumps(index))
        except OSError as exc:
            raise BridgeDataError(
                f"latent cache: {write_error_text(exc)}; free disk space or choose another cache folder, then run again "
                "(the shards are kept)"
            ) from exc

    def read_index(self) -> tuple[list[tuple[int, int, int]], list[int]]:
        """``[(item index, shard, row)]`` of the cached samples, and the item indices that did not decode
        (those with non-finite latents go to :attr:`non_finite`). Every shard's header is checked first."""
        index = self._read_index()
        if index is None:
            raise BridgeDataError(f"latent cache {self.folder} has no readable {CACHE_INDEX}; build it first (or delete the folder)")
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


class CachedLatentDataset(torch.utils.data.Dataset):
    """``{"latent_mean", "latent_std": [2, C, h, w] float32 (unflipped, flipped), "input_ids", "attention_mask"}``."""

    def __init__(self, cache: LatentCache, locations: Sequence[tuple[int, int, int]], tokenize: CaptionTokenizer) -> None:
        self.folder = cache.folder
        self.captions = [cache.items[item].caption for item, _, _ in locations]
        self.places = [(shard, row) for _, shard, row in locations]
        self.tokenize = tokenize
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.places)

    def __getstate__(self) -> dict[str, Any]:  # open handles stay in the process that opened them
        return {**self.__dict__, "_handles": {}}

    def _path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.safetensors"

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = open_latent_shard(self._path(shard))
        return self._handles[shard]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shard, row = self.places[index]
        mean, std = read_latent_row(self._handle(shard), self._path(shard), row)
        ids, mask = self.tokenize(self.captions[index])
        return {"latent_mean": mean.float(), "latent_std": std.float(), "input_ids": ids, "attention_mask": mask}


def split_validation(count: int, total: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): ``count`` indices held out by a seeded permutation, both sorted."""
    if count <= 0:
        return list(range(total)), []
    if count >= total:
        raise BridgeDataError(f"data.validation_count = {count} leaves nothing to train on ({total} usable pairs)")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[count:]), sorted(order[:count])


def subset(dataset: torch.utils.data.Dataset, indices: Iterable[int]) -> torch.utils.data.Subset:
    return torch.utils.data.Subset(dataset, list(indices))
