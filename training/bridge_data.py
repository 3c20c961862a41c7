"""The LaVi-Bridge trainer's samples: image–caption pairs (:mod:`.image_data`) with the caption tokenised
exactly as the recipe tokenises prompts, as pixels decoded on demand or as cached VAE latents
(:mod:`.latent_cache`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from ..bridge.language_models import LaViBridgeRecipe, tokenize_for_bridge
from .image_data import BridgeDataError, ImageCaption, load_image
from .latent_cache import LatentCache, LatentRows

logger = logging.getLogger(__name__)


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


class CachedLatentDataset(torch.utils.data.Dataset):
    """``{"latent_mean", "latent_std": [2, C, h, w] float32 (unflipped, flipped), "input_ids", "attention_mask"}``."""

    def __init__(self, cache: LatentCache, locations: Sequence[tuple[int, int, int]], tokenize: CaptionTokenizer) -> None:
        self.rows = LatentRows(cache.folder)
        self.captions = [cache.items[item].caption for item, _, _ in locations]
        self.places = [(shard, row) for _, shard, row in locations]
        self.tokenize = tokenize

    def __len__(self) -> int:
        return len(self.places)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        mean, std = self.rows.read(*self.places[index])
        ids, mask = self.tokenize(self.captions[index])
        return {"latent_mean": mean.float(), "latent_std": std.float(), "input_ids": ids, "attention_mask": mask}
