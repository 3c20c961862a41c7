"""LaVi-Bridge training (``train bridge``): a language model joined to a frozen SD1.x or SDXL U-Net or PixArt by
a TextAdapter and LoRA in both models, with the official objective and settings.

Trainable: the vision LoRA (SD1.x: ResnetBlock2D conv1 / time_emb_proj / conv2 / conv_shortcut, attn1 /
attn2 q, k, v, out, ff.net.0.proj; PixArt: attn1 / attn2 q, k, v, out), the text LoRA (T5 SelfAttention
q, k, v, o; Llama self_attn q, k, v, o_proj) and the adapter; every base weight stays frozen. LoRA:
rank 32, alpha = rank (scale 1.0: ``y = W x + up(down(x))``), dropout 0.1, down ~ N(0, 1/r), up = 0.
Objective: ε-MSE at uniform ``t`` in [0, 1000) on VAE latents × 0.18215, the official RandomHorizontalFlip
drawn per sample. AdamW (0.9, 0.999), weight decay 1e-2, constant LR: 1e-4 for the vision LoRA and the
adapter (2e-5 with PixArt), 5e-6 for the text LoRA; gradient clipping 1.0.

SDXL (no official bridge; trained as the SD1.x U-Net recipe, Zhao et al. 2024 applied to SDXL): the adapter
``TextAdapter(lm hidden, int_dim, 2048, pooled_dim=1280)`` also makes SDXL's pooled text vector with its pooled
head, trained jointly by the ε-MSE; the U-Net's size conditioning (``time_ids``: original height and width,
crop top and left, target height and width, as diffusers' ``train_text_to_image_sdxl.py`` computes them) comes
from each image's geometry, recorded when the latent cache is built (:mod:`.latent_cache`); the vision LoRA sits
on the layers LaVi-Bridge's rule selects in the SDXL U-Net (ResnetBlock2D, Attention, GEGLU), the same rank and
dropout; latents × 0.13025 from a float32 VAE; SD1's noise schedule (SDXL base's is the same); vision and adapter
LR 1e-4.

Output (``run.output_dir``): ``<name>.safetensors`` (this pack's bridge file, :mod:`..bridge.trained`)
and ``<name>/`` in the released layout (``lora_vis.pt``, ``lora_text.pt``, ``adapter/``; not for SDXL, whose
pooled head the released layout has no place for).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bridge.adapter import TextAdapter, TextAdapterConfig
from ..bridge.language_models import LaViBridgeRecipe, family_of_hf_folder, load_language_model
from ..bridge.lora import LoraTarget, text_lora_targets
from ..bridge.trained import recipe_for, save_trained_bridge, write_released_layout
from ..weights import DTYPES
from .bridge_data import CachedLatentDataset, CaptionTokenizer, ImageCaptionDataset
from .bridge_model import (
    BridgeTrainingModel,
    build_bridge_optimizer,
    enable_activation_checkpointing,
    inject_lora,
    lora_pairs,
    zero_pairs,
)
from .bridge_settings import (
    BridgeDataSettings,
    BridgeExportSettings,
    BridgeLoraSettings,
    BridgeModelSettings,
    BridgeOptimSettings,
    resolved_learning_rates,
)
from .cache_settings import LATENT_CACHE_RENAMED, LatentCacheSettings
from .config import ConfigError, as_dict
from .diffusion_models import DiffusionModel, check_single_file, detect_kind, load_diffusion_model
from .diffusion_validation import eps_mse_metrics, held_out_eps_mse
from .distributed import Distributed
from .errors import TrainingError
from .image_data import (
    BridgeDataError,
    ImageCaption,
    held_out_count,
    image_transform,
    load_image_with_geometry,
    scan_sources,
    split_validation,
    subset,
)
from .latent_cache import CACHE_FORMAT, GEOMETRY_CACHE_FORMAT, LatentCache, cache_key
from .task import TrainingTask

logger = logging.getLogger(__name__)

# Validation: every held-out sample at these timesteps with fixed noise, unflipped, posterior mean.
VALIDATION_TIMESTEPS = (50, 250, 500, 750, 950)
VALIDATION_BATCH = 8


# ---------------------------------------------------------------------------------------------------
# SDXL's samples: each with the size numbers its U-Net reads


class SizedImageCaptionDataset(ImageCaptionDataset):
    """:class:`.bridge_data.ImageCaptionDataset` whose samples also hold SDXL's ``time_ids`` ``[6]``: the
    decoded image's :func:`.image_data.crop_geometry` at ``resolution`` (an image that stopped decoding is
    replaced by the next one, with that one's geometry)."""

    def __init__(self, items: Sequence[ImageCaption], transform: Callable, tokenize: CaptionTokenizer, resolution: int) -> None:
        super().__init__(items, transform, tokenize)
        self.resolution = resolution

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for offset in range(len(self.items)):
            item = self.items[(index + offset) % len(self.items)]
            try:
                pixels, geometry = load_image_with_geometry(item.image, self.transform, self.resolution)
            except (OSError, ValueError, SyntaxError) as exc:
                self.decode_failures += 1
                logger.warning("image %s no longer decodes (%s); using the next one", item.image, exc)
                continue
            ids, mask = self.tokenize(item.caption)
            return {"pixels": pixels, "input_ids": ids, "attention_mask": mask, "time_ids": geometry.time_ids(self.resolution)}
        raise BridgeDataError("no image of the dataset decodes any more")


class SizedCachedLatentDataset(CachedLatentDataset):
    """:class:`.bridge_data.CachedLatentDataset` whose samples also hold SDXL's ``time_ids`` ``[6]``, from the crop
    geometry the cache recorded for each image (a cache built with ``geometry_resolution``)."""

    def __init__(self, cache: LatentCache, locations: Sequence[tuple[int, int, int]], tokenize: CaptionTokenizer) -> None:
        if not cache.geometry_resolution:
            raise TrainingError("an SDXL dataset needs a latent cache that records crop geometry")
        super().__init__(cache, locations, tokenize)
        self.resolution = cache.geometry_resolution

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(index)
        sample["time_ids"] = self.rows.read_geometry(*self.places[index]).time_ids(self.resolution)
        return sample


# ---------------------------------------------------------------------------------------------------
# The task


def _fingerprint_path(path: Path) -> list:
    """What identifies a model's weights for the latent cache key without reading them: names, sizes, times."""
    if path.is_file():
        stat = path.stat()
        return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    folder = path / "vae" if (path / "vae").is_dir() else path
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir()) if p.is_file()]


class BridgeTask(TrainingTask):
    kind = "bridge"
    SECTIONS: Mapping[str, type] = {
        "data": BridgeDataSettings,
        "model": BridgeModelSettings,
        "lora": BridgeLoraSettings,
        "optim": BridgeOptimSettings,
        "cache": LatentCacheSettings,
        "export": BridgeExportSettings,
    }
    RUN_DEFAULTS: Mapping[str, Any] = {"grad_clip": 1.0}
    RENAMED = LATENT_CACHE_RENAMED

    def __init__(
        self,
        data: BridgeDataSettings,
        model: BridgeModelSettings,
        lora: BridgeLoraSettings | None = None,
        optim: BridgeOptimSettings | None = None,
        export: BridgeExportSettings | None = None,
        cache: LatentCacheSettings | None = None,
    ) -> None:
        self.data = data
        self.model_settings = model
        self.lora = lora or BridgeLoraSettings()
        self.optim = optim or BridgeOptimSettings()
        self.export_settings = export or BridgeExportSettings()
        self.cache = cache or LatentCacheSettings()
        self._counts: dict[str, int | str] = {}
        self._train: torch.utils.data.Dataset | None = None
        self._val: torch.utils.data.Dataset | None = None
        self.diffusion: DiffusionModel | None = None
        self.language_model: nn.Module | None = None
        self.recipe: LaViBridgeRecipe | None = None
        self.family = ""
        self.diffusion_kind = ""
        self._vision_targets: list[LoraTarget] = []
        self._text_targets: list[LoraTarget] = []

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> BridgeTask:
        return cls(**cls.read_sections(raw))

    def config(self) -> dict[str, Any]:
        return {
            "data": as_dict(self.data),
            "model": as_dict(self.model_settings),
            "lora": as_dict(self.lora),
            "optim": as_dict(self.optim),
            # The folder too, as when these were [data] keys: a resumed run reads the latents it started with.
            "cache": as_dict(self.cache),
            "export": as_dict(self.export_settings),
        }

    # -- data ------------------------------------------------------------------------------------------

    def _resolve_models(self) -> None:
        settings = self.model_settings
        diffusion_path = Path(os.path.expanduser(settings.diffusion_model))
        lm_path = Path(os.path.expanduser(settings.language_model))
        if not diffusion_path.exists():
            raise ConfigError(f"model.diffusion_model {diffusion_path} does not exist")
        if not lm_path.is_dir():
            raise ConfigError(f"model.language_model {lm_path} is not a folder: give a Hugging Face model folder")
        try:
            detected = detect_kind(diffusion_path)
            if diffusion_path.is_file() and settings.kind != "pixart":
                # Checked as the kind asked for (from its header): the refusal names what the file is.
                detected = detected if settings.kind == "auto" else settings.kind
                check_single_file(diffusion_path, detected)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if settings.kind != "auto" and settings.kind != detected:
            raise ConfigError(f"model.kind = {settings.kind!r} but {diffusion_path.name} is a {detected} model")
        self.diffusion_kind = detected
        try:
            self.family = family_of_hf_folder(lm_path)
            self.recipe = recipe_for(self.family, self.diffusion_kind)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self._diffusion_path, self._lm_path = diffusion_path, lm_path

    def prepare(self, dist: Distributed, log: logging.Logger, *, dry_run: bool = False) -> None:
        self._resolve_models()
        train_items, val_items, counts = scan_sources(self.data)
        self._counts.update(counts)
        self._counts.update({"recipe": self.recipe.value, "diffusion_model": self.diffusion_kind, "language_model": self.family})
        items = train_items + val_items
        # SDXL's U-Net reads each image's size and crop: the cache records them (a format and key of its own).
        sdxl = self.diffusion_kind == "sdxl"
        cache = None
        if self.cache.dir:
            vae_source = Path(os.path.expanduser(self.model_settings.vae)) if self.model_settings.vae else self._diffusion_path
            settings = {"resolution": self.data.resolution, "dtype": self.model_settings.diffusion_model_dtype,
                        "shard_size": self.cache.shard_size}
            key = cache_key(items, settings, json.dumps(_fingerprint_path(vae_source)), GEOMETRY_CACHE_FORMAT if sdxl else CACHE_FORMAT)
            cache = LatentCache(os.path.expanduser(self.cache.dir), items, key, self.cache.shard_size,
                                geometry_resolution=self.data.resolution if sdxl else None)
            state = cache.state()
            self._counts["latent_cache"] = f"{state.state} ({state.shards_done} of {state.shards_total} shards)"
        if dry_run:
            self._counts.update(self._split_counts(len(train_items), len(val_items)))
            return

        dtype = DTYPES[self.model_settings.language_model_dtype]
        lm = load_language_model(self._lm_path, self.recipe, dtype=dtype)
        self.language_model, tokenizer = lm.transformer, lm.tokenizer
        self.diffusion = load_diffusion_model(
            self._diffusion_path, self.diffusion_kind, DTYPES[self.model_settings.diffusion_model_dtype],
            vae=os.path.expanduser(self.model_settings.vae) or None,
        )
        tokenize = CaptionTokenizer(self.recipe, tokenizer)
        transform = image_transform(self.data.resolution)
        if cache is not None:
            cache.build(lambda: self.diffusion.vae.to(dist.device), transform, dist, self.cache.encode_batch_size)
            locations, undecodable = cache.read_index()
            self._counts["latent_cache"] = f"complete ({len(locations)} samples)"
            self._counts["skipped_undecodable_image"] = len(undecodable)
            if cache.non_finite:
                self._counts["skipped_non_finite_latents"] = len(cache.non_finite)
            self.diffusion.vae = None  # training reads latents; the VAE is not needed any more
            dataset: torch.utils.data.Dataset = (
                SizedCachedLatentDataset(cache, locations, tokenize) if sdxl else CachedLatentDataset(cache, locations, tokenize))
            kept_items = [item for item, _, _ in locations]
            n_train = sum(1 for i in kept_items if i < len(train_items))
            # Items are train first, then validation: the kept order keeps that split.
            train_idx, val_idx = list(range(n_train)), list(range(n_train, len(kept_items)))
        else:
            dataset = (SizedImageCaptionDataset(items, transform, tokenize, self.data.resolution) if sdxl
                       else ImageCaptionDataset(items, transform, tokenize))
            train_idx, val_idx = list(range(len(train_items))), list(range(len(train_items), len(items)))
        if not val_items:
            chosen_train, chosen_val = split_validation(self._validation_count(len(train_idx)), len(train_idx))
            train_idx, val_idx = [train_idx[i] for i in chosen_train], [train_idx[i] for i in chosen_val]
        self._train, self._val = subset(dataset, train_idx), subset(dataset, val_idx)
        self._counts.update({"train_samples": len(train_idx), "validation_samples": len(val_idx)})

    def _validation_count(self, total: int) -> int:
        return held_out_count(self.data.validation_count, total, "pairs")

    def _split_counts(self, n_train: int, n_val: int) -> dict[str, int]:
        if n_val:
            return {"train_samples": n_train, "validation_samples": n_val}
        held = self._validation_count(n_train)
        return {"train_samples": n_train - held, "validation_samples": held}

    def describe(self) -> dict[str, int | str]:
        return dict(self._counts)

    def train_dataset(self) -> torch.utils.data.Dataset:
        if self._train is None:
            raise TrainingError("prepare() must run before train_dataset()")
        return self._train

    # -- model -----------------------------------------------------------------------------------------

    def adapter_config(self) -> TextAdapterConfig:
        """Language-model hidden size -> ``int_dim`` -> the diffusion context; for SDXL also the pooled head's
        width (1280: ``TextAdapterConfig(lm_hidden, int_dim, 2048, pooled_dim=1280)``)."""
        in_dim = int(self.language_model.config.hidden_size)
        out_dim = self.diffusion.context_dim
        return TextAdapterConfig(in_dim, self.model_settings.adapter_int_dim or (in_dim + out_dim) // 2, out_dim,
                                 pooled_dim=self.diffusion.pooled_dim)

    def build_model(self, dist: Distributed) -> BridgeTrainingModel:
        if self.diffusion is None or self.language_model is None:
            raise TrainingError("prepare() must run before build_model()")
        # The official positional order, checked against the plain models before peft wraps their layers.
        self._vision_targets = self.diffusion.lora_targets()
        self._text_targets = text_lora_targets(self.language_model, self.family)
        if self.lora.vision:
            inject_lora(self.diffusion.denoiser, self._vision_targets, self.lora.rank, self.lora.dropout)
        if self.lora.text:
            inject_lora(self.language_model, self._text_targets, self.lora.rank, self.lora.dropout)
        adapter = TextAdapter(self.adapter_config())
        if self.model_settings.gradient_checkpointing:
            self.diffusion.denoiser.enable_gradient_checkpointing()
            if self.lora.text:
                enable_activation_checkpointing(self.language_model)
        model = BridgeTrainingModel(self.language_model, adapter, self.diffusion, self.recipe, self.lora.text)
        # Frozen parts stay in eval mode (no dropout in the base models); train() only reaches the LoRA and adapter.
        model.to(dist.device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("bridge model: %s trainable parameters (%s)", f"{trainable:,}", self.recipe.value)
        return model

    def _lr(self) -> tuple[float, float, float]:
        return resolved_learning_rates(self.optim, self.diffusion_kind)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return build_bridge_optimizer(model, self.optim, self.diffusion_kind)

    def build_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int):
        if not self.optim.warmup_steps:
            return None
        warmup = self.optim.warmup_steps
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))

    # -- validation --------------------------------------------------------------------------------------

    def validate(self, model: BridgeTrainingModel) -> dict[str, float]:
        """Held-out ε-MSE at fixed timesteps with fixed noise (deterministic for given weights)."""
        if not self._val or len(self._val) == 0:
            return {}
        device = next(model.adapter.parameters()).device
        per_t = held_out_eps_mse(
            self._val, self.collate, lambda batch: model.latents(batch, train=False), {"eps": model.loss},
            timesteps=VALIDATION_TIMESTEPS, batch_size=VALIDATION_BATCH, device=device,
        )
        return eps_mse_metrics(per_t, VALIDATION_TIMESTEPS)

    # -- export ----------------------------------------------------------------------------------------

    def export(self, model: BridgeTrainingModel, output_dir: Path) -> list[Path]:
        vision_targets, text_targets = self._vision_targets, self._text_targets
        rank = self.lora.rank
        vision = lora_pairs(model.denoiser, vision_targets) if self.lora.vision else {
            t.name: pair for t, pair in zip(vision_targets, zero_pairs(vision_targets, rank), strict=True)}
        text = lora_pairs(model.language_model, text_targets) if self.lora.text else {}
        vision_lr, adapter_lr, text_lr = self._lr()
        training = {
            **self.config(),
            "resolved": {"recipe": self.recipe.value, "diffusion_model": self.diffusion_kind, "language_model_family": self.family,
                         "vision_lr": vision_lr, "adapter_lr": adapter_lr, "text_lr": text_lr},
        }
        name = self.export_settings.name
        written = [save_trained_bridge(
            Path(output_dir) / f"{name}.safetensors",
            recipe=self.recipe, diffusion_model=self.diffusion_kind, adapter=model.adapter, vision_lora=vision, text_lora=text,
            context_dim=self.diffusion.context_dim, language_model=self._lm_path.name, training_config=training,
        )]
        if self.export_settings.released_layout and model.adapter.config.pooled_dim:
            logger.info("export.released_layout: no released layout for a bridge to SDXL (it has no place for the adapter's "
                        "pooled head); %s.safetensors holds the bridge", name)
        elif self.export_settings.released_layout:
            text_list = list(text.values()) or zero_pairs(text_targets, rank)
            written.append(write_released_layout(
                Path(output_dir) / name, adapter=model.adapter, vision_pairs=list(vision.values()), text_pairs=text_list,
            ))
        return written
