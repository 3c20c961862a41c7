"""Image–caption data for the U-ViT trainer: one sample per image, its captions drawn per epoch.

The listings are the bridge trainer's (:func:`.image_data.scan_pairs`: ``image_path<TAB>caption``
files or folders of images with ``.txt`` sidecars); lines naming the same image are its several
captions, as MS-COCO's five per image. U-ViT's MS-COCO recipe trains on images and draws one of the
image's captions at every access; here the draw is a function of (seed, epoch, image), so a resumed
run sees the captions an uninterrupted one sees.

Both encoders run once: the SD VAE's posterior (mean and std, unflipped and flipped) goes to the bridge
trainer's latent cache (:class:`.latent_cache.LatentCache`) and CLIP's ``last_hidden_state`` of every
distinct caption, plus the empty caption (classifier-free guidance), to a feature cache
(:class:`.features.FeatureCache`). Training reads memory-mapped slices of both.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .features import ShardedFeatures
from .image_data import ImageCaption
from .latent_cache import LatentRows


@dataclass(frozen=True)
class CaptionedImage:
    """An image (with the file size and time that key the latent cache) and its distinct captions."""

    image: ImageCaption
    captions: tuple[str, ...]


def group_by_image(pairs: Sequence[ImageCaption]) -> list[CaptionedImage]:
    """Pairs naming the same image file become one image with several captions (first-seen order;
    a caption repeated for the same image counts once)."""
    order: dict[Path, ImageCaption] = {}
    captions: dict[Path, dict[str, None]] = {}
    for pair in pairs:
        key = Path(os.path.abspath(pair.image))
        if key not in order:
            # The latent cache is keyed by images only: captions live in the text cache.
            order[key] = ImageCaption(pair.image, "", pair.size, pair.mtime_ns)
            captions[key] = {}
        captions[key].setdefault(pair.caption, None)
    return [CaptionedImage(order[key], tuple(captions[key])) for key in order]


class CaptionTable:
    """Distinct captions in first-seen order, the empty caption last (the unconditional context)."""

    def __init__(self, images: Sequence[CaptionedImage]) -> None:
        ids: dict[str, int] = {}
        for image in images:
            for caption in image.captions:
                ids.setdefault(caption, len(ids))
        self.captions = [*ids, ""]
        self.ids = ids
        self.empty_id = len(self.captions) - 1

    def __len__(self) -> int:
        return len(self.captions)

    def image_caption_ids(self, image: CaptionedImage) -> list[int]:
        return [self.ids[c] for c in image.captions]


def caption_choices(counts: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """Which caption each image shows in ``epoch``: uniform over its ``counts``, a function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_777)
    draw = torch.rand(len(counts), generator=generator, dtype=torch.float64)
    return torch.minimum((draw * counts).long(), counts - 1)


class LatentTextDataset(torch.utils.data.Dataset):
    """``{"latent_mean", "latent_std": [2 (unflipped, flipped), C, h, w] fp16, "context": [77, width]}`` per image.

    ``places``: the image's (shard, row) in the latent cache; ``caption_ids``: its captions' rows in the
    text cache. Training draws one caption per image per epoch (:meth:`set_epoch`); ``fixed_caption``
    (validation) always shows the first. Every row read is checked for NaN and infinities (a
    :class:`.image_data.BridgeDataError` or :class:`.features.FeatureCacheError` names the shard).
    """

    def __init__(
        self,
        latent_folder: Path,
        places: Sequence[tuple[int, int]],
        caption_ids: Sequence[Sequence[int]],
        text: ShardedFeatures,
        seed: int = 0,
        fixed_caption: bool = False,
    ) -> None:
        if len(places) != len(caption_ids):
            raise ValueError(f"{len(places)} latents but {len(caption_ids)} caption lists")
        self.rows = LatentRows(latent_folder)
        self.places = list(places)
        self.caption_ids = [list(ids) for ids in caption_ids]
        self.counts = torch.tensor([len(ids) for ids in self.caption_ids], dtype=torch.long)
        self.text = text
        self.seed = seed
        self.fixed_caption = fixed_caption
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.choices = torch.zeros_like(self.counts) if self.fixed_caption else caption_choices(self.counts, self.seed, epoch)

    def __len__(self) -> int:
        return len(self.places)

    def caption_id(self, index: int) -> int:
        return self.caption_ids[index][int(self.choices[index])]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        mean, std = self.rows.read(*self.places[index])
        return {"latent_mean": mean, "latent_std": std, "context": self.text[self.caption_id(index)]}
