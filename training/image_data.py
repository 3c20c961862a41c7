"""Image–caption data, the bridge and U-ViT trainers' common input: listings scanned and checked before
training, and images read the way the official recipes read them.

Sources:

- **the official format**: a text file with ``image_path<TAB>caption`` per line; relative paths are
  resolved against the file's folder;
- **a folder of images with sidecar captions**: ``cat.jpg`` + ``cat.txt`` (searched recursively).

A pair that cannot be used (missing or unreadable image, missing or empty caption, a line without a
tab, undecodable text) is skipped and counted by reason, the first few reasons logged; an empty result
is an error. Images go through the official transform — Resize(512), CenterCrop(512), ToTensor,
Normalize(0.5, 0.5) — and the official RandomHorizontalFlip(0.5) happens in the training model
(:mod:`.bridge_model`, :mod:`.uvit_model`) on the training process's RNG, so it is resumable and survives latent caching.
Where each crop comes from — the image's size before resizing, the crop's offset — is :func:`crop_geometry`: SDXL's
U-Net reads it as its size conditioning (:meth:`CropGeometry.time_ids`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import TrainingError
from .settings import setting

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_LOGGED_SKIPS = 5


class BridgeDataError(TrainingError):
    """An image-caption dataset or latent cache the bridge and U-ViT trainers cannot use (missing, empty, unreadable,
    unwritable). A :class:`TrainingError`, so the command line prints it as one ``error:`` line wherever
    it is raised, also from a loader worker while training."""


@dataclass
class ImageCaptionSettings:
    """Image-caption pairs: a text file of 'image_path<TAB>caption' lines (the official format; relative paths
    are resolved against the file's folder) or a folder of images with .txt captions of the same name."""

    source: str = setting(doc="the training pairs: a TSV file or a folder")
    validation_source: str = setting("", "held-out pairs in the same formats; empty: hold out validation_count pairs of source")
    validation_count: int = setting(16, "pairs of source held out for validation when validation_source is empty (0: none)")
    resolution: int = setting(512, "images are resized (shorter side) and center-cropped to this many pixels")
    scan_workers: int = setting(8, "threads checking the image files before training")

    def __post_init__(self) -> None:
        if not str(self.source).strip():
            raise ValueError("source must name the training pairs (a TSV file or a folder of images with .txt captions)")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {self.resolution}")
        if self.validation_count < 0:
            raise ValueError("validation_count must not be negative")
        if self.scan_workers < 1:
            raise ValueError("scan_workers must be at least 1")


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


def scan_sources(settings: ImageCaptionSettings) -> tuple[list[ImageCaption], list[ImageCaption], dict[str, int]]:
    """The pairs of ``data.source`` and of ``data.validation_source`` (none when it is empty), and what the
    scans counted (the validation source's counts prefixed ``validation_``)."""
    train, report = scan_pairs(settings.source, settings.scan_workers)
    if not settings.validation_source:
        return train, [], report.counts()
    val, val_report = scan_pairs(settings.validation_source, settings.scan_workers)
    return train, val, {**report.counts(), **val_report.counts("validation_")}


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


@dataclass(frozen=True)
class CropGeometry:
    """Where an image's training crop comes from, as SDXL's micro-conditioning states it (Podell et al. 2023,
    §2.2; diffusers' ``train_text_to_image_sdxl.py``): the image's size before resizing, and the top-left
    corner of the crop in the resized image."""

    original_height: int
    original_width: int
    crop_top: int
    crop_left: int

    def time_ids(self, resolution: int) -> torch.Tensor:
        """SDXL's ``time_ids`` ``[6]`` (float32): original (height, width), crop (top, left), target (height,
        width), the target being the square training resolution, as diffusers' SDXL training computes them."""
        return torch.tensor([self.original_height, self.original_width, self.crop_top, self.crop_left, resolution, resolution],
                            dtype=torch.float32)


def crop_geometry(width: int, height: int, resolution: int) -> CropGeometry:
    """The geometry of :func:`image_transform` on a ``width`` x ``height`` image: torchvision's Resize (shorter
    side to ``resolution``, the longer truncated to an int) and CenterCrop (offsets rounded), computed as
    torchvision computes them, so it is exactly the crop the pixels went through."""
    if width < 1 or height < 1:
        raise ValueError(f"an image of {width} x {height} pixels has no crop")
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resolution * long / short)
    new_width, new_height = (resolution, new_long) if width <= height else (new_long, resolution)
    return CropGeometry(height, width, int(round((new_height - resolution) / 2.0)), int(round((new_width - resolution) / 2.0)))


def load_image_with_geometry(path: Path, transform: Callable, resolution: int) -> tuple[torch.Tensor, CropGeometry]:
    """:func:`load_image`, and the :func:`crop_geometry` of the decoded image at ``resolution`` (the one
    ``transform`` crops to)."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
        return transform(rgb), crop_geometry(rgb.width, rgb.height, resolution)


def held_out_count(count: int, total: int, what: str) -> int:
    """``data.validation_count``, at most a fifth of the ``total`` pairs or images (``what``) found."""
    if count and count * 5 > total:
        smaller = total // 5
        logger.warning("data.validation_count %d is over a fifth of the %d %s; holding out %d", count, total, what, smaller)
        return smaller
    return count


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
