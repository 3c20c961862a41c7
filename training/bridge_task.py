"""LaVi-Bridge training (``train bridge``): a language model joined to a frozen SD1.x U-Net or PixArt by
a TextAdapter and LoRA in both models, with the official objective and settings.

Trainable: the vision LoRA (SD1.x: ResnetBlock2D conv1 / time_emb_proj / conv2 / conv_shortcut, attn1 /
attn2 q, k, v, out, ff.net.0.proj; PixArt: attn1 / attn2 q, k, v, out), the text LoRA (T5 SelfAttention
q, k, v, o; Llama self_attn q, k, v, o_proj) and the adapter; every base weight stays frozen. LoRA:
rank 32, alpha = rank (scale 1.0: ``y = W x + up(down(x))``), dropout 0.1, down ~ N(0, 1/r), up = 0.
Objective: ε-MSE at uniform ``t`` in [0, 1000) on VAE latents × 0.18215, the official RandomHorizontalFlip
drawn per sample. AdamW (0.9, 0.999), weight decay 1e-2, constant LR: 1e-4 for the vision LoRA and the
adapter (2e-5 with PixArt), 5e-6 for the text LoRA; gradient clipping 1.0.

Output (``run.output_dir``): ``<name>.safetensors`` (this pack's bridge file, :mod:`..bridge.trained`)
and ``<name>/`` in the released layout (``lora_vis.pt``, ``lora_text.pt``, ``adapter/``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..bridge.adapter import TextAdapter, TextAdapterConfig
from ..bridge.language_models import LaViBridgeRecipe, load_language_model, text_config
from ..bridge.lora import LoraTarget, text_lora_targets
from ..bridge.trained import recipe_for, save_trained_bridge, write_released_layout
from .bridge_data import (
    CachedLatentDataset,
    CaptionTokenizer,
    ImageCaption,
    ImageCaptionDataset,
    LatentCache,
    cache_key,
    image_transform,
    scan_pairs,
    split_validation,
    subset,
)
from .config import ConfigError, as_dict, section
from .diffusion_models import DiffusionModel, detect_kind, load_diffusion_model
from .diffusion_validation import held_out_eps_mse
from .runtime import Distributed, TrainingError, TrainingTask

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OFFICIAL_LR = {"sd1": 1e-4, "pixart": 2e-5}
# Validation: every held-out sample at these timesteps with fixed noise, unflipped, posterior mean.
VALIDATION_TIMESTEPS = (50, 250, 500, 750, 950)
VALIDATION_SEED = 1234
VALIDATION_BATCH = 8
ADAPTER_NAME = "default"


def _help(text: str, default: Any = dataclasses.MISSING, **kwargs) -> Any:
    if default is dataclasses.MISSING and "default_factory" not in kwargs:
        return field(metadata={"help": text})
    if "default_factory" in kwargs:
        return field(default_factory=kwargs["default_factory"], metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class BridgeDataSettings:
    """Image-caption pairs: a text file of 'image_path<TAB>caption' lines (the official format; relative paths
    are resolved against the file's folder) or a folder of images with .txt captions of the same name."""

    source: str = _help("the training pairs: a TSV file or a folder")
    validation_source: str = _help("held-out pairs in the same formats; empty: hold out validation_count pairs of source", "")
    validation_count: int = _help("pairs of source held out for validation when validation_source is empty (0: none)", 16)
    resolution: int = _help("images are resized (shorter side) and center-cropped to this many pixels", 512)
    latent_cache: str = _help("a folder for VAE latents encoded once (both flips); empty: encode every step", "")
    cache_batch_size: int = _help("images per VAE call while building the latent cache", 16)
    cache_shard_size: int = _help("images per latent-cache shard (the unit of work each process encodes)", 1024)
    scan_workers: int = _help("threads checking the image files before training", 8)

    def __post_init__(self) -> None:
        if not str(self.source).strip():
            raise ValueError("source must name the training pairs (a TSV file or a folder of images with .txt captions)")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {self.resolution}")
        for name in ("validation_count",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if min(self.cache_batch_size, self.cache_shard_size, self.scan_workers) < 1:
            raise ValueError("cache_batch_size, cache_shard_size and scan_workers must be at least 1")


@dataclass
class BridgeModelSettings:
    """The frozen models: the diffusion model (SD1.x single file or diffusers folder; PixArt diffusers folder)
    and the language model (a Hugging Face folder: T5 / mT5 encoder, or a Llama-style decoder)."""

    diffusion_model: str = _help("SD1.x .safetensors/.ckpt, or a diffusers folder with unet/ or transformer/ and vae/")
    language_model: str = _help("Hugging Face folder of the language model (config, tokenizer, weights)")
    kind: Literal["auto", "sd1", "pixart"] = _help("the diffusion model's kind (auto: from the path)", "auto")
    vae: str = _help("a VAE file or folder to use instead of the diffusion model's own (empty: its own)", "")
    adapter_int_dim: int = _help("the adapter's middle width (0: (in + out) / 2, as every released adapter)", 0)
    language_model_dtype: Literal["fp32", "bf16", "fp16"] = _help("dtype of the frozen language-model weights", "fp32")
    diffusion_model_dtype: Literal["fp32", "bf16", "fp16"] = _help("dtype of the frozen U-Net / PixArt and VAE weights", "fp32")
    gradient_checkpointing: bool = _help("recompute activations in the backward pass (less memory, ~30% slower)", False)

    def __post_init__(self) -> None:
        for name in ("diffusion_model", "language_model"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"{name} must name a file or folder")
        if self.adapter_int_dim < 0:
            raise ValueError("adapter_int_dim must not be negative")


@dataclass
class BridgeLoraSettings:
    """LoRA in both models: alpha = rank (scale 1.0, as the release), down ~ N(0, 1/rank), up = 0."""

    rank: int = _help("LoRA rank", 32)
    dropout: float = _help("dropout on the LoRA branch", 0.1)
    vision: bool = _help("train a LoRA in the U-Net / PixArt", True)
    text: bool = _help("train a LoRA in the language model (off: the language model runs without gradients)", True)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError("rank must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")


@dataclass
class BridgeOptimSettings:
    """AdamW with a constant learning rate (after an optional linear warm-up)."""

    lr: float = _help("learning rate of the vision LoRA (0: official, 1e-4 for SD1.x, 2e-5 for PixArt)", 0.0)
    adapter_lr: float = _help("learning rate of the adapter (0: the same as lr)", 0.0)
    text_lr: float = _help("learning rate of the text LoRA", 5e-6)
    weight_decay: float = _help("AdamW weight decay", 1e-2)
    betas: list[float] = _help("AdamW betas", default_factory=lambda: [0.9, 0.999])
    eps: float = _help("AdamW epsilon", 1e-8)
    warmup_steps: int = _help("linear warm-up steps (0: none, as the official)", 0)

    def __post_init__(self) -> None:
        if min(self.lr, self.adapter_lr, self.text_lr, self.weight_decay) < 0:
            raise ValueError("learning rates and weight decay must not be negative")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must not be negative")


@dataclass
class BridgeExportSettings:
    """What the run writes into run.output_dir."""

    name: str = _help("file and folder name of the trained bridge", "lavibridge")
    released_layout: bool = _help("also write <name>/ in the released layout (lora_vis.pt, lora_text.pt, adapter/)", True)

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\") or self.name.startswith("."):
            raise ValueError(f"name must be a plain file name, got {self.name!r}")


# ---------------------------------------------------------------------------------------------------
# LoRA (peft) on exact module names


def inject_lora(model: nn.Module, targets: Sequence[LoraTarget], rank: int, dropout: float) -> None:
    """peft LoRA on exactly ``targets`` (module names), alpha = rank, down ~ N(0, 1/rank), up = 0; afterwards
    only the LoRA weights of ``model`` are trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    pattern = "^(?:" + "|".join(re.escape(t.name) for t in targets) + ")$"
    config = LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=dropout, target_modules=pattern, init_lora_weights="gaussian", bias="none"
    )
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    modules = dict(model.named_modules())
    for target in targets:
        layer = modules[target.name]
        if not hasattr(layer, "lora_A") or ADAPTER_NAME not in layer.lora_A:
            raise TrainingError(f"peft did not put a LoRA on {target.name}")
        layer.lora_A[ADAPTER_NAME].requires_grad_(True)
        layer.lora_B[ADAPTER_NAME].requires_grad_(True)
    injected = sum(1 for m in model.modules() if hasattr(m, "lora_A") and ADAPTER_NAME in getattr(m, "lora_A", {}))
    if injected != len(targets):
        raise TrainingError(f"peft put LoRA on {injected} layers, the recipe has {len(targets)}")


def lora_pairs(model: nn.Module, targets: Sequence[LoraTarget]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (up, down)}`` in the targets' (official) order, as the release stores them (scale 1.0)."""
    modules = dict(model.named_modules())
    out = {}
    for target in targets:
        layer = modules[target.name]
        if layer.scaling[ADAPTER_NAME] != 1.0:
            raise TrainingError(f"LoRA on {target.name} has scale {layer.scaling[ADAPTER_NAME]}, not 1.0")
        out[target.name] = (layer.lora_B[ADAPTER_NAME].weight.detach(), layer.lora_A[ADAPTER_NAME].weight.detach())
    return out


def enable_activation_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant (the base weights are frozen)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def zero_pairs(targets: Sequence[LoraTarget], rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All-zero pairs (no change to the model) for a released layout trained without that LoRA."""
    return [(torch.zeros(t.pair_shapes(rank)[0]), torch.zeros(t.pair_shapes(rank)[1])) for t in targets]


# ---------------------------------------------------------------------------------------------------
# The model the runtime trains


class BridgeTrainingModel(nn.Module):
    """Language model (+ text LoRA) → adapter → U-Net / PixArt (+ vision LoRA); ``forward(batch)`` gives the
    ε-MSE of one training step. Frozen weights keep ``requires_grad=False`` (the runtime checkpoints only
    the trainable ones)."""

    def __init__(
        self,
        language_model: nn.Module,
        adapter: TextAdapter,
        diffusion: DiffusionModel,
        recipe: LaViBridgeRecipe,
        train_text: bool,
    ) -> None:
        super().__init__()
        self.language_model = language_model
        self.adapter = adapter
        self.denoiser = diffusion.denoiser
        self.vae = diffusion.vae  # None when the latents come from the cache
        self.diffusion = _Plain(diffusion)
        self.recipe = recipe
        self.text = text_config(recipe)
        self.train_text = train_text
        self.num_timesteps = int(diffusion.scheduler.config.num_train_timesteps)

    def train(self, mode: bool = True) -> BridgeTrainingModel:
        """Dropout of the frozen base models stays off (T5 has 0.1): they are fixed feature extractors, as at
        inference; the LoRA dropout and the adapter's dropout train."""
        super().train(mode)
        if mode:
            for name, module in self.named_modules():
                if isinstance(module, nn.Dropout) and "lora_dropout" not in name and not name.startswith("adapter."):
                    module.eval()
        return self

    # -- pieces ------------------------------------------------------------------------------------------

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Adapter output (the diffusion model's context) and the mask the recipe passes on (PixArt) or None."""
        mask = attention_mask if self.text.use_attention_mask else None
        with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
            if self.text.decoder_only:
                features = self.language_model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
            else:
                features = self.language_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        param = next(self.adapter.parameters())
        return self.adapter(features.to(param.dtype)), mask

    def latents(self, batch: Mapping[str, torch.Tensor], train: bool) -> torch.Tensor:
        """Scaled VAE latents: training flips half the samples (official RandomHorizontalFlip) and samples
        the posterior; validation takes the unflipped posterior mean."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]  # [B, 2 (unflipped, flipped), C, h, w]
            rows = torch.arange(mean.shape[0], device=mean.device)
            pick = (torch.rand(mean.shape[0], device=mean.device) < 0.5).long() if train else torch.zeros_like(rows)
            mean, std = mean[rows, pick].float(), std[rows, pick].float()
            latents = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype) if train else mean
        else:
            if self.vae is None:
                raise TrainingError("the batch holds pixels but the model has no VAE (latent cache mismatch)")
            pixels = batch["pixels"]
            if train:
                flip = torch.rand(pixels.shape[0], device=pixels.device) < 0.5
                pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
            param = next(self.vae.parameters())
            with torch.no_grad():
                posterior = self.vae.encode(pixels.to(param.dtype)).latent_dist
                latents = (posterior.sample() if train else posterior.mean).float()
        # Contiguous: a CPU VAE may hand back channels-last latents, and noise must not depend on memory layout.
        return latents.contiguous() * self.diffusion.value.scaling_factor

    def loss(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample ε-MSE ``[B]``."""
        diffusion = self.diffusion.value
        noisy = diffusion.scheduler.add_noise(latents, noise, timesteps)
        context, mask = self.encode_text(batch["input_ids"], batch["attention_mask"])
        param = next(self.denoiser.parameters())
        pred = diffusion.predict_noise(noisy.to(param.dtype), timesteps, context.to(param.dtype), mask, denoiser=self.denoiser)
        return F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        latents = self.latents(batch, train=True)
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(0, self.num_timesteps, (latents.shape[0],), device=latents.device)
        return {"loss": self.loss(latents, noise, timesteps, batch).mean()}


class _Plain:
    """Holds an object out of ``nn.Module`` registration (its modules are registered on the model itself)."""

    def __init__(self, value: Any) -> None:
        self.value = value


def resolved_learning_rates(optim: BridgeOptimSettings, kind: str) -> tuple[float, float, float]:
    """(vision LoRA, adapter, text LoRA) learning rates, 0 meaning the official value."""
    vision = optim.lr or OFFICIAL_LR[kind]
    return vision, optim.adapter_lr or vision, optim.text_lr


def build_bridge_optimizer(model: nn.Module, optim: BridgeOptimSettings, kind: str) -> torch.optim.Optimizer:
    """AdamW over three groups — vision LoRA, adapter, text LoRA — with their learning rates."""
    base = model.module if hasattr(model, "module") else model
    vision_lr, adapter_lr, text_lr = resolved_learning_rates(optim, kind)
    groups = [
        {"params": [p for p in base.denoiser.parameters() if p.requires_grad], "lr": vision_lr, "name": "vision_lora"},
        {"params": [p for p in base.adapter.parameters() if p.requires_grad], "lr": adapter_lr, "name": "adapter"},
        {"params": [p for p in base.language_model.parameters() if p.requires_grad], "lr": text_lr, "name": "text_lora"},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, betas=tuple(optim.betas), weight_decay=optim.weight_decay, eps=optim.eps)


# ---------------------------------------------------------------------------------------------------
# The task


def _language_model_family(folder: Path) -> str:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model.language_model {folder} has no config.json: give a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config_file} is not readable JSON ({exc})") from exc
    model_type = str(config.get("model_type", ""))
    if model_type in ("t5", "mt5", "umt5"):
        return "t5"
    if config.get("is_encoder_decoder"):
        raise ConfigError(f"{folder.name} is a {model_type} encoder-decoder; LaVi-Bridge bridges T5 encoders or Llama-style decoders")
    return "llama"


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
        "export": BridgeExportSettings,
    }
    RUN_DEFAULTS: Mapping[str, Any] = {"grad_clip": 1.0}

    def __init__(
        self,
        data: BridgeDataSettings,
        model: BridgeModelSettings,
        lora: BridgeLoraSettings | None = None,
        optim: BridgeOptimSettings | None = None,
        export: BridgeExportSettings | None = None,
    ) -> None:
        self.data = data
        self.model_settings = model
        self.lora = lora or BridgeLoraSettings()
        self.optim = optim or BridgeOptimSettings()
        self.export_settings = export or BridgeExportSettings()
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
        return cls(**{name: section(raw, name, settings) for name, settings in cls.SECTIONS.items()})

    def config(self) -> dict[str, Any]:
        return {
            "data": as_dict(self.data),
            "model": as_dict(self.model_settings),
            "lora": as_dict(self.lora),
            "optim": as_dict(self.optim),
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
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if settings.kind != "auto" and settings.kind != detected:
            raise ConfigError(f"model.kind = {settings.kind!r} but {diffusion_path.name} is a {detected} model")
        self.diffusion_kind = detected
        self.family = _language_model_family(lm_path)
        try:
            self.recipe = recipe_for(self.family, self.diffusion_kind)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self._diffusion_path, self._lm_path = diffusion_path, lm_path

    def _scan(self) -> tuple[list[ImageCaption], list[ImageCaption]]:
        train_items, report = scan_pairs(self.data.source, self.data.scan_workers)
        self._counts.update(report.counts())
        if self.data.validation_source:
            val_items, val_report = scan_pairs(self.data.validation_source, self.data.scan_workers)
            self._counts.update(val_report.counts("validation_"))
            return train_items, val_items
        return train_items, []

    def prepare(self, dist: Distributed, log: logging.Logger, *, dry_run: bool = False) -> None:
        self._resolve_models()
        train_items, val_items = self._scan()
        self._counts.update({"recipe": self.recipe.value, "diffusion_model": self.diffusion_kind, "language_model": self.family})
        items = train_items + val_items
        cache = None
        if self.data.latent_cache:
            vae_source = Path(os.path.expanduser(self.model_settings.vae)) if self.model_settings.vae else self._diffusion_path
            settings = {"resolution": self.data.resolution, "dtype": self.model_settings.diffusion_model_dtype,
                        "shard_size": self.data.cache_shard_size}
            key = cache_key(items, settings, json.dumps(_fingerprint_path(vae_source)))
            cache = LatentCache(os.path.expanduser(self.data.latent_cache), items, key, self.data.cache_shard_size)
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
            # Every process takes the same path (no collective depends on what one process sees on disk).
            if cache.missing_shards(dist.rank, dist.world_size):
                self.diffusion.vae.to(dist.device)
                built = cache.build_shards(self.diffusion.vae, transform, dist.device, dist.rank, dist.world_size, self.data.cache_batch_size)
                log.info("latent cache: this process encoded %d shard(s)", built)
            dist.barrier()
            if dist.is_main and cache.state().state != "complete":
                cache.write_index()
            dist.barrier()
            locations, undecodable = cache.read_index()
            self._counts["latent_cache"] = f"complete ({len(locations)} samples)"
            self._counts["skipped_undecodable_image"] = len(undecodable)
            if cache.non_finite:
                self._counts["skipped_non_finite_latents"] = len(cache.non_finite)
            self.diffusion.vae = None  # training reads latents; the VAE is not needed any more
            dataset: torch.utils.data.Dataset = CachedLatentDataset(cache, locations, tokenize)
            kept_items = [item for item, _, _ in locations]
            n_train = sum(1 for i in kept_items if i < len(train_items))
            # Items are train first, then validation: the kept order keeps that split.
            train_idx, val_idx = list(range(n_train)), list(range(n_train, len(kept_items)))
        else:
            dataset = ImageCaptionDataset(items, transform, tokenize)
            train_idx, val_idx = list(range(len(train_items))), list(range(len(train_items), len(items)))
        if not val_items:
            chosen_train, chosen_val = split_validation(self._validation_count(len(train_idx)), len(train_idx))
            train_idx, val_idx = [train_idx[i] for i in chosen_train], [train_idx[i] for i in chosen_val]
        self._train, self._val = subset(dataset, train_idx), subset(dataset, val_idx)
        self._counts.update({"train_samples": len(train_idx), "validation_samples": len(val_idx)})

    def _validation_count(self, total: int) -> int:
        count = self.data.validation_count
        if count and count * 5 > total:
            smaller = total // 5
            logger.warning("data.validation_count %d is over a fifth of the %d pairs; holding out %d", count, total, smaller)
            return smaller
        return count

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
        in_dim = int(self.language_model.config.hidden_size)
        out_dim = self.diffusion.context_dim
        return TextAdapterConfig(in_dim, self.model_settings.adapter_int_dim or (in_dim + out_dim) // 2, out_dim)

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

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Held-out ε-MSE at fixed timesteps with fixed noise (deterministic for given weights)."""
        if not self._val or len(self._val) == 0:
            return {}
        base = model.module if hasattr(model, "module") else model
        device = next(base.adapter.parameters()).device
        per_t = held_out_eps_mse(
            self._val, self.collate, lambda batch: base.latents(batch, train=False), {"eps": base.loss},
            timesteps=VALIDATION_TIMESTEPS, seed=VALIDATION_SEED, batch_size=VALIDATION_BATCH, device=device,
        )["eps"]
        metrics = {"val_eps_mse": float(per_t.mean())}
        metrics.update({f"val_eps_mse_t{t}": float(v) for t, v in zip(VALIDATION_TIMESTEPS, per_t, strict=True)})
        return metrics

    # -- export ----------------------------------------------------------------------------------------

    def export(self, model: nn.Module, output_dir: Path) -> list[Path]:
        base = model.module if hasattr(model, "module") else model
        vision_targets, text_targets = self._vision_targets, self._text_targets
        rank = self.lora.rank
        vision = lora_pairs(base.denoiser, vision_targets) if self.lora.vision else {
            t.name: pair for t, pair in zip(vision_targets, zero_pairs(vision_targets, rank), strict=True)}
        text = lora_pairs(base.language_model, text_targets) if self.lora.text else {}
        vision_lr, adapter_lr, text_lr = self._lr()
        training = {
            **self.config(),
            "resolved": {"recipe": self.recipe.value, "diffusion_model": self.diffusion_kind, "language_model_family": self.family,
                         "vision_lr": vision_lr, "adapter_lr": adapter_lr, "text_lr": text_lr},
        }
        name = self.export_settings.name
        written = [save_trained_bridge(
            Path(output_dir) / f"{name}.safetensors",
            recipe=self.recipe, diffusion_model=self.diffusion_kind, adapter=base.adapter, vision_lora=vision, text_lora=text,
            context_dim=self.diffusion.context_dim, language_model=self._lm_path.name, training_config=training,
        )]
        if self.export_settings.released_layout:
            text_list = list(text.values()) or zero_pairs(text_targets, rank)
            written.append(write_released_layout(
                Path(output_dir) / name, adapter=base.adapter, vision_pairs=list(vision.values()), text_pairs=text_list,
            ))
        return written
