"""A LaVi-Bridge on disk, in either of its two forms, loaded as one :class:`Bridge`.

- A released folder (Zhao et al., 2024, HuggingFace ``shihaozhao/LaVi-Bridge``): ``lora_vis.pt`` and
  ``lora_text.pt`` (positional LoRA lists, :mod:`.lora`) and ``adapter/`` (:mod:`.adapter`). Its recipe
  is only implied: by the folder's name when the release's is kept, else by the adapter's widths.
- This pack's trained ``.safetensors`` file (:mod:`.trained`), which names its recipe and the diffusion
  model it was trained for.

Either way the LoRAs come out as ``(up, down)`` pairs in the official positional order, to be checked
against the connected models' layers with :func:`.lora.map_lora_pairs`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import RELEASED_ADAPTERS, TextAdapter, load_adapter
from .errors import LaViBridgeFileError
from .language_models import LaViBridgeRecipe, family_of_recipe
from .lora import LoraPair, read_lora_pairs
from .trained import (
    DIFFUSION_MODEL_NAMES,
    RELEASED_ADAPTER_FOLDER,
    RELEASED_TEXT_LORA,
    RELEASED_VISION_LORA,
    is_trained_bridge_file,
    load_trained_bridge,
    read_trained_bridge_metadata,
)

__all__ = [
    "RELEASED_DIFFUSION_MODELS", "TRAINED_BRIDGE_SUFFIX", "Bridge", "diffusion_model_name", "is_bridge", "load_bridge",
    "may_be_bridge", "probe_bridge", "released_recipe",
]

TRAINED_BRIDGE_SUFFIX = ".safetensors"
# The diffusion model a released folder's recipe was trained for (a release names none: SD 1.4, PixArt-XL-2-512x512).
RELEASED_DIFFUSION_MODELS = {
    LaViBridgeRecipe.T5_UNET: "sd1", LaViBridgeRecipe.LLAMA2_UNET: "sd1", LaViBridgeRecipe.T5_TRANSFORMER: "pixart",
}
# The checkpoint to connect for a bridge to each diffusion model, for messages.
CHECKPOINT_NAMES = {"sd1": "an SD1.x", "sdxl": "an SDXL", "pixart": "a PixArt"}


def diffusion_model_name(key: str, detail: str | None = None) -> str:
    """How messages name diffusion model ``key`` (``"sd1"``, ``"sdxl"``, ``"pixart"``), with ``detail`` inside its
    parentheses: ``an SDXL U-Net (2048-wide text context + 1280-wide pooled; ComfyUI's SDXL)``."""
    name = DIFFUSION_MODEL_NAMES.get(key, key)
    if not detail:
        return name
    return f"{name[:-1]}; {detail})" if name.endswith(")") else f"{name} ({detail})"


@dataclass(frozen=True)
class Bridge:
    """A loaded bridge: its recipe, the adapter, and both LoRAs as pairs in the official positional order
    (``text_pairs`` empty: a trained bridge without a language-model LoRA)."""

    name: str
    recipe: LaViBridgeRecipe
    adapter: TextAdapter
    language_model_family: str
    vision_pairs: Sequence[LoraPair]
    text_pairs: Sequence[LoraPair]
    vision_source: str  # how messages name where each LoRA comes from
    text_source: str
    trained_for: str | None = None  # a trained file's "sd1" / "sdxl" / "pixart"; None: a release, implied by its recipe

    @property
    def diffusion_model(self) -> str:
        """``"sd1"``, ``"sdxl"`` or ``"pixart"``: what the file says it was trained for, or what a release's recipe was."""
        return self.trained_for or RELEASED_DIFFUSION_MODELS[self.recipe]

    def check_diffusion_model(self, kind: str | None, connected: str) -> None:
        """Refuse a trained bridge on another diffusion model than its own (``kind``: ``"sd1"``, ``"sdxl"``,
        ``"pixart"`` or None for any other; ``connected`` describes it), naming both and the checkpoint to connect.
        A release's recipe is checked against the MODEL where its LoRA targets are made (the nodes)."""
        if self.trained_for is None or kind == self.trained_for:
            return
        wanted = diffusion_model_name(self.trained_for, f"diffusion_model '{self.trained_for}', recipe {self.recipe.value}")
        raise LaViBridgeFileError(
            f"{self.name} is a LaVi-Bridge trained for {wanted}, but the connected MODEL is {connected}: connect "
            f"{CHECKPOINT_NAMES.get(self.trained_for, 'a matching')} checkpoint or pick a bridge trained for this MODEL"
        )


def released_recipe(folder: Path, adapter: TextAdapter) -> LaViBridgeRecipe:
    """The recipe of a released folder: the release's folder name when kept (t5_unet, llama2_unet,
    t5_transformer), else the released pair with the adapter's widths."""
    pair = folder.name if folder.name in RELEASED_ADAPTERS else adapter.config.released_pair
    if pair is None:
        raise LaViBridgeFileError(
            f"{folder.name}: adapter {adapter.config.in_dim} -> {adapter.config.out_dim} matches no LaVi-Bridge recipe "
            f"({', '.join(f'{r}: {c.in_dim} -> {c.out_dim}' for r, c in RELEASED_ADAPTERS.items())})"
        )
    return LaViBridgeRecipe(pair)


def _load_released(folder: Path, name: str, dtype: torch.dtype) -> Bridge:
    adapter = load_adapter(folder / RELEASED_ADAPTER_FOLDER, dtype)
    recipe = released_recipe(folder, adapter)
    return Bridge(
        name=name,
        recipe=recipe,
        adapter=adapter,
        language_model_family=family_of_recipe(recipe),
        vision_pairs=read_lora_pairs(folder / RELEASED_VISION_LORA),
        text_pairs=read_lora_pairs(folder / RELEASED_TEXT_LORA),
        vision_source=f"{name}/{RELEASED_VISION_LORA}",
        text_source=f"{name}/{RELEASED_TEXT_LORA}",
    )


def _load_trained(path: Path, name: str, dtype: torch.dtype) -> Bridge:
    trained = load_trained_bridge(path, dtype)
    return Bridge(
        name=name,
        recipe=trained.recipe,
        adapter=trained.adapter,
        language_model_family=trained.language_model_family,
        vision_pairs=trained.vision_pairs(),
        text_pairs=trained.text_pairs(),
        vision_source=f"{name} (vision LoRA)",
        text_source=f"{name} (text LoRA)",
        trained_for=trained.diffusion_model,
    )


def load_bridge(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, *, name: str | None = None) -> Bridge:
    """A released folder or a trained ``.safetensors`` file as a :class:`Bridge`; the adapter comes back
    on the CPU in ``dtype``, frozen, in eval mode. ``name`` is how messages call the bridge (default: the
    folder's or file's name)."""
    path = Path(path)
    name = name or path.name
    return _load_trained(path, name, dtype) if path.is_file() else _load_released(path, name, dtype)


def _is_released_folder(path: str | os.PathLike[str]) -> bool:
    return os.path.isdir(os.path.join(path, RELEASED_ADAPTER_FOLDER))


def may_be_bridge(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has a bridge's form (a folder with ``adapter/``, or a ``.safetensors`` file), before
    its content is read: what a bridge's name may lead to; :func:`probe_bridge` says what is wrong with it."""
    return _is_released_folder(path) or (str(path).endswith(TRAINED_BRIDGE_SUFFIX) and os.path.isfile(path))


def is_bridge(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a released folder (with ``adapter/``) or a trained bridge file (checked by its
    metadata only): what a bridge list shows. Never raises."""
    return _is_released_folder(path) or (str(path).endswith(TRAINED_BRIDGE_SUFFIX) and is_trained_bridge_file(path))


def probe_bridge(path: str | os.PathLike[str], name: str | None = None) -> None:
    """Raise :class:`LaViBridgeFileError` if a bridge cannot load, from a quick look: a trained file's
    metadata (saying what the file is when it is no bridge), a released folder's LoRA files."""
    path = Path(path)
    if path.is_file():
        read_trained_bridge_metadata(path)
        return
    missing = [file for file in (RELEASED_VISION_LORA, RELEASED_TEXT_LORA) if not (path / file).is_file()]
    if missing:
        raise LaViBridgeFileError(f"{name or path.name} lacks {' and '.join(missing)}: copy the whole released folder")
