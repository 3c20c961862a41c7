"""Intermediate-fusion U-ViT training (``train uvit``): a text-to-image U-ViT from image–caption data, with
the recipe of the paper (Hu, Jia, Rostami 2024, Table 3), which is U-ViT's MS-COCO recipe.

Data: image–caption listings (the bridge trainer's formats); every image is encoded once by SD's KL-f8
VAE (posterior mean and std, :class:`.latent_cache.LatentCache`) and every distinct caption once by
CLIP ViT-L/14 (``last_hidden_state`` 77×768, :mod:`.targets`), plus the empty caption. A training
sample is an image with one of its captions drawn per epoch (U-ViT draws one of MS-COCO's five).

Objective (U-ViT ``LSimple`` on ``stable_diffusion_beta_schedule``): latents z = posterior sample ×
0.23010; n uniform in {1, …, 1000}; x_n = √ᾱ_n z + √(1-ᾱ_n) ε with ᾱ_n = ∏_{i≤n} (1-β_i) and
β = linspace(√0.00085, √0.012, 1000)² (ComfyUI's "linear"); the network sees t = n; loss = MSE(ε̂, ε).
With probability p_uncond = 0.1 a sample's text is the empty caption's CLIP features (classifier-free
guidance). Every random draw (flip, posterior sample, n, ε, text drop, in that order) comes from the
training process's RNG, which checkpoints hold: a resumed run repeats an uninterrupted one exactly.

Optimiser: AdamW lr 2e-4, weight decay 0.03 on every weight, betas (0.9, 0.9); linear warm-up over
5,000 steps (U-ViT's ``min(step / warmup, 1)``) then constant; EMA 0.9999 of the weights after every
optimiser step, kept as buffers inside the training model so checkpoints hold it. Seed 1234, batch 256,
1M steps; bf16 autocast on CUDA (the paper used fp16).

Output: ``<name>.safetensors`` in this pack's U-ViT format (:func:`..uvit.save_uvit`: config and
sampling convention in the metadata), the EMA weights by default, which X2IUViTLoader loads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..uvit import SamplingConvention, UViT, save_uvit
from ..weights import DTYPES
from .cache_settings import UVIT_CACHE_RENAMED, UViTCacheSettings, cache_folder
from .config import ConfigError, as_dict
from .diffusion_validation import eps_mse_metrics, held_out_eps_mse
from .distributed import Distributed
from .errors import TrainingError
from .features import FeatureCache
from .fingerprints import fingerprint_path, hash_strings
from .image_data import held_out_count, image_transform, scan_sources, split_validation
from .latent_cache import LatentCache, cache_key
from .shards import shard_header
from .targets import TARGET_TOKENS, TargetSettings, peek_target_width, tokenizer_folder
from .task import TrainingTask
from .uvit_data import CaptionedImage, CaptionTable, LatentTextDataset, group_by_image
from .uvit_model import (
    UViTTrainingModel,
    buffer_copy,
    build_uvit_optimizer,
    random_batch,
    uvit_alphas_cumprod,
    warmup_lambda,
)
from .uvit_settings import (
    UViTDataSettings,
    UViTDiffusionSettings,
    UViTExportSettings,
    UViTModelSettings,
    UViTOptimSettings,
    resolve_uvit_config,
)

logger = logging.getLogger(__name__)

# Held-out ε-MSE: every validation image (posterior mean, unflipped, first caption) at these U-ViT times
# (1..1000) with noise from a fixed seed, so the figure depends on the weights only.
VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)
VALIDATION_BATCH = 64
TRANSFORM = "Resize(shorter side, bilinear), CenterCrop, ToTensor, Normalize(0.5, 0.5)"


# ---------------------------------------------------------------------------------------------------
# The task


def _vae_downsampling(path: Path) -> int:
    """The VAE's spatial factor without loading it: from a diffusers config, else SD's KL-f8."""
    for config in (path / "vae" / "config.json", path / "config.json"):
        if config.is_file():
            try:
                levels = len(json.loads(config.read_text(encoding="utf-8"))["block_out_channels"])
            except (OSError, ValueError, KeyError, TypeError):
                break
            return 2 ** (levels - 1)
    return 8


class UViTTask(TrainingTask):
    kind = "uvit"
    SECTIONS: Mapping[str, type] = {
        "data": UViTDataSettings,
        "model": UViTModelSettings,
        "text": TargetSettings,
        "diffusion": UViTDiffusionSettings,
        "optim": UViTOptimSettings,
        "cache": UViTCacheSettings,
        "export": UViTExportSettings,
    }
    RENAMED = UVIT_CACHE_RENAMED
    # The paper's Table 3: seed 1234, batch 256, 1M steps (bf16 autocast on CUDA through precision "auto").
    RUN_DEFAULTS: Mapping[str, Any] = {
        "seed": 1234, "batch_size": 256, "max_steps": 1_000_000, "checkpoint_every": 5000, "validate_every": 5000,
        "log_every": 50, "num_workers": 4,
    }

    def __init__(
        self,
        data: UViTDataSettings,
        model: UViTModelSettings,
        text: TargetSettings,
        diffusion: UViTDiffusionSettings | None = None,
        optim: UViTOptimSettings | None = None,
        export: UViTExportSettings | None = None,
        cache: UViTCacheSettings | None = None,
        *,
        output_dir: str = "",
        seed: int = 0,
    ) -> None:
        self.data = data
        self.model_settings = model
        self.text = text
        self.diffusion = diffusion or UViTDiffusionSettings()
        self.optim = optim or UViTOptimSettings()
        self.export_settings = export or UViTExportSettings()
        self.cache = cache or UViTCacheSettings()
        self.output_dir = output_dir
        self.seed = seed
        self.uvit_config = resolve_uvit_config(model)
        self.sampling = SamplingConvention(latent_scale=self.diffusion.latent_scale)
        self._counts: dict[str, int | str] = {}
        self._train: LatentTextDataset | None = None
        self._val: LatentTextDataset | None = None
        self.empty_context: torch.Tensor | None = None
        self.captions: CaptionTable | None = None

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> UViTTask:
        run = raw.get("run", {})
        return cls(**cls.read_sections(raw), output_dir=str(run.get("output_dir", "")), seed=int(run.get("seed", 0)))

    def config(self) -> dict[str, Any]:
        data, cache = as_dict(self.data), as_dict(self.cache)
        data.pop("scan_workers")  # where and how fast, not what is trained on
        for key in ("dir", "encode_batch_size"):
            cache.pop(key)
        return {
            "data": data,
            "model": {**as_dict(self.model_settings), "resolved": self.uvit_config.to_dict()},
            "text": as_dict(self.text),
            "diffusion": as_dict(self.diffusion),
            "optim": as_dict(self.optim),
            "cache": cache,
            "export": as_dict(self.export_settings),
        }

    # -- data ----------------------------------------------------------------------------------------------

    def _path(self, value: str, what: str) -> Path:
        if not value:
            raise ConfigError(f"set {what}")
        path = Path(os.path.expanduser(value))
        if not path.exists():
            raise ConfigError(f"{what} {path} does not exist")
        return path

    def _scan(self) -> tuple[list[CaptionedImage], list[int], list[int]]:
        """All images (training source first), and which of them train and validate."""
        pairs, val_pairs, counts = scan_sources(self.data)
        self._counts.update(counts)
        images = group_by_image(pairs)
        if self.data.validation_source:
            val_images = group_by_image(val_pairs)
            return images + val_images, list(range(len(images))), list(range(len(images), len(images) + len(val_images)))
        count = held_out_count(self.data.validation_count, len(images), "images")
        train_idx, val_idx = split_validation(count, len(images))
        return images, train_idx, val_idx

    def _caches(self, images: Sequence[CaptionedImage], table: CaptionTable, vae: Path, clip: Path) -> tuple[LatentCache, FeatureCache]:
        root = cache_folder(self.cache.dir, self.output_dir, "cache", "the latent and CLIP caches need a folder")
        settings = {"resolution": self.data.resolution, "transform": TRANSFORM, "vae_dtype": self.model_settings.vae_dtype,
                    "shard_size": self.cache.shard_size}
        items = [image.image for image in images]
        key = cache_key(items, settings, json.dumps(fingerprint_path(vae), sort_keys=True))
        latents = LatentCache(root / "latents", items, key, self.cache.shard_size)
        text_fp = {
            "role": "uvit-text", "clip": fingerprint_path(clip), "tokenizer": fingerprint_path(tokenizer_folder(self.text)),
            "clip_dtype": self.text.dtype, "settings": "77 tokens, padded with the end token, no attention mask, last_hidden_state",
            "captions": hash_strings(table.captions), "count": len(table),
        }
        text = FeatureCache(root, "clip-text", text_fp, len(table), self.cache.dtype)
        return latents, text

    def prepare(self, dist: Distributed, log: logging.Logger, *, dry_run: bool = False) -> None:
        c = self.uvit_config
        if self.text.kind != "sd1":
            raise ConfigError(f"text.kind = {self.text.kind!r}: a U-ViT reads SD1.x's CLIP ViT-L/14 text features "
                              "(text.kind = \"sd1\"); SDXL's two encoders are a GlueNet target")
        vae_path = self._path(self.model_settings.vae, "model.vae (SD's KL-f8 VAE, or a checkpoint holding it)")
        clip_path = self._path(self.text.clip, "text.clip (an SD1.x checkpoint or a Hugging Face CLIP folder)")
        factor = _vae_downsampling(vae_path)
        if self.data.resolution // factor != c.image_size:
            raise ConfigError(
                f"data.resolution {self.data.resolution} through the VAE's {factor}x downsampling gives "
                f"{self.data.resolution // factor}x{self.data.resolution // factor} latents, but the U-ViT takes "
                f"{c.image_size}x{c.image_size} (model.image_size); set resolution = {c.image_size * factor} or model.image_size"
            )
        if c.text_tokens != TARGET_TOKENS:
            raise ConfigError(f"model.text_tokens is {c.text_tokens}; CLIP's SD1 conditioning has {TARGET_TOKENS} tokens")
        width = peek_target_width(self.text)
        if width is not None and width != c.context_dim:
            raise ConfigError(f"text.clip gives {width}-wide features but the U-ViT takes {c.context_dim} (model.context_dim)")

        images, train_idx, val_idx = self._scan()
        table = CaptionTable(images)
        self.captions = table
        latent_cache, text_cache = self._caches(images, table, vae_path, clip_path)
        latent_state, text_state = latent_cache.state(), text_cache.state()
        with torch.device("meta"):
            params = sum(p.numel() for p in UViT(c).parameters())
        self._counts.update({
            "images": len(images), "captions": len(table) - 1, "train_images": len(train_idx), "validation_images": len(val_idx),
            "latent_cache": f"{latent_state.state} ({latent_state.shards_done} of {latent_state.shards_total} shards)",
            "text_cache": text_state, "uvit": f"{c.name}, {params:,} parameters",
        })
        if dry_run:
            return
        dist.barrier()  # every process has read the cache states before any builds

        devices = [dist.device] if dist.device.type == "cuda" else []
        # Encoders run outside the training RNG: a run that reuses the caches draws what one that built them draws.
        with torch.random.fork_rng(devices=devices):
            latent_cache.build(lambda: self._load_vae(vae_path, dist), image_transform(self.data.resolution), dist,
                               self.cache.encode_batch_size)
            if text_state != "complete":
                from .gluenet_sources import target_encode_fn
                from .targets import load_target_encoder

                encoder = load_target_encoder(self.text).to(dist.device)
                text_cache.build(table.captions, target_encode_fn(encoder), (c.text_tokens, encoder.hidden_size), dist,
                                 self.cache.encode_batch_size, state=text_state)
                del encoder
            if dist.device.type == "cuda":
                torch.cuda.empty_cache()
        locations, undecodable = latent_cache.read_index()
        text = text_cache.open()
        if tuple(text.item_shape) != (c.text_tokens, c.context_dim):
            raise TrainingError(f"the CLIP cache holds {list(text.item_shape)} features; the U-ViT takes [{c.text_tokens}, {c.context_dim}]")
        self._check_latents(latent_cache)
        self.empty_context = text[table.empty_id].float().clone()

        places = {item: (shard, row) for item, shard, row in locations}
        train = [i for i in train_idx if i in places]
        val = [i for i in val_idx if i in places]
        ids = [table.image_caption_ids(image) for image in images]
        self._train = LatentTextDataset(latent_cache.folder, [places[i] for i in train], [ids[i] for i in train], text, self.seed)
        self._val = LatentTextDataset(latent_cache.folder, [places[i] for i in val], [ids[i] for i in val], text, fixed_caption=True)
        self._counts.update({
            "latent_cache": f"complete ({len(locations)} images)", "text_cache": text_cache.state(),
            "skipped_undecodable_image": len(undecodable), "train_images": len(train), "validation_images": len(val),
        })
        if latent_cache.non_finite:
            self._counts["skipped_non_finite_latents"] = len(latent_cache.non_finite)

    def _load_vae(self, path: Path, dist: Distributed) -> nn.Module:
        from .diffusion_models import load_vae

        return load_vae(path, DTYPES[self.model_settings.vae_dtype]).to(dist.device)

    def _check_latents(self, cache: LatentCache) -> None:
        c = self.uvit_config
        for shard in range(cache.num_shards):
            _, tensors = shard_header(cache.shard_path(shard))
            if "mean" not in tensors:
                continue
            _, _, channels, height, width = tensors["mean"][0]
            if (channels, height, width) != (c.in_channels, c.image_size, c.image_size):
                raise TrainingError(
                    f"the VAE gives {channels}x{height}x{width} latents; the U-ViT takes {c.in_channels}x{c.image_size}x{c.image_size}: "
                    "match data.resolution and model.image_size / in_channels to the VAE"
                )
            return

    def describe(self) -> dict[str, int | str]:
        return dict(self._counts)

    def train_dataset(self) -> LatentTextDataset:
        if self._train is None:
            raise TrainingError("prepare() must run before train_dataset()")
        return self._train

    def validation_dataset(self) -> LatentTextDataset:
        if self._val is None:
            raise TrainingError("prepare() must run before validation_dataset()")
        return self._val

    # -- model ---------------------------------------------------------------------------------------------

    def build_model(self, dist: Distributed) -> UViTTrainingModel:
        if self.empty_context is None:
            raise TrainingError("prepare() must run before build_model()")
        # Initialised from the run's seed alone (the same weights on every process, whatever prepare did).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            uvit = UViT(self.uvit_config)
        model = UViTTrainingModel(
            uvit, self.empty_context, p_uncond=self.diffusion.p_uncond, ema_decay=self.optim.ema_decay,
            latent_scale=self.diffusion.latent_scale, random_flip=self.data.random_flip, sampling=self.sampling,
        )
        logger.info("U-ViT %s: %s trainable parameters", self.uvit_config.name, f"{sum(p.numel() for p in uvit.parameters()):,}")
        return model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return build_uvit_optimizer(model, self.optim)

    def build_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(self.optim.warmup_steps))

    # -- validation ----------------------------------------------------------------------------------------

    def validate(self, model: UViTTrainingModel) -> dict[str, float]:
        """Held-out ε-MSE of the weights and of their EMA at fixed times with fixed noise (deterministic)."""
        if self._val is None or len(self._val) == 0:
            return {}
        device = model.sqrt_alpha_bar.device
        per_t = held_out_eps_mse(
            self._val, self.collate, lambda batch: model.latents(batch, train=False),
            {name: (lambda latents, noise, steps, batch, network=network: model.per_sample_loss(network, latents, noise, steps, batch["context"]))
             for name, network in (("raw", model.uvit), ("ema", model.ema))},
            timesteps=VALIDATION_TIMESTEPS, batch_size=VALIDATION_BATCH, device=device,
        )
        return eps_mse_metrics(per_t, VALIDATION_TIMESTEPS)

    # -- export --------------------------------------------------------------------------------------------

    def export(self, model: UViTTrainingModel, output_dir: Path) -> list[Path]:
        choice = self.export_settings.weights
        name = self.export_settings.name
        outputs = []
        if choice in ("ema", "both"):
            outputs.append(("ema", model.ema, Path(output_dir) / f"{name}.safetensors"))
        if choice in ("raw", "both"):
            outputs.append(("raw", model.uvit, Path(output_dir) / (f"{name}-raw.safetensors" if choice == "both" else f"{name}.safetensors")))
        written = []
        for weights, network, path in outputs:
            training = {"kind": self.kind, "weights": weights, **self.config()}
            save_uvit(network, path, self.sampling, {"x2i.training": json.dumps(training, default=str)})
            written.append(path)
        return written


__all__ = [
    "UViTTask",
    "UViTTrainingModel",
    "build_uvit_optimizer",
    "buffer_copy",
    "random_batch",
    "resolve_uvit_config",
    "uvit_alphas_cumprod",
    "warmup_lambda",
]
