"""Intermediate-fusion U-ViT training (``train uvit``): a text-to-image U-ViT from image–caption data, with
the recipe of the paper (Hu, Jia, Rostami 2024, Table 3), which is U-ViT's MS-COCO recipe.

Data: image–caption listings (the bridge trainer's formats); every image is encoded once by SD's KL-f8
VAE (posterior mean and std, :class:`.bridge_data.LatentCache`) and every distinct caption once by
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

import copy
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..uvit import PAPER_SETTINGS, SamplingConvention, UViT, UViTConfig, UViTConfigError, save_uvit
from .bridge_data import BridgeDataError, LatentCache, cache_key, image_transform, scan_pairs, split_validation
from .config import ConfigError, as_dict, section
from .diffusion_validation import held_out_eps_mse
from .features import FeatureCache, FeatureCacheError, fingerprint_path
from .gluenet_data import hash_strings
from .runtime import Distributed, TrainingError, TrainingTask
from .targets import TARGET_TOKENS, TargetError, TargetSettings, default_tokenizer_folder, peek_target_width
from .uvit_data import CaptionedImage, CaptionTable, LatentTextDataset, group_by_image

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Held-out ε-MSE: every validation image (posterior mean, unflipped, first caption) at these U-ViT times
# (1..1000) with noise from a fixed seed, so the figure depends on the weights only.
VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)
VALIDATION_SEED = 1234
VALIDATION_BATCH = 64
TRANSFORM = "Resize(shorter side, bilinear), CenterCrop, ToTensor, Normalize(0.5, 0.5)"


def _help(text: str, default: Any = MISSING, **kwargs) -> Any:
    if "default_factory" in kwargs:
        return field(default_factory=kwargs["default_factory"], metadata={"help": text})
    if default is MISSING:
        return field(metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class UViTDataSettings:
    """Image-caption pairs: a text file of 'image_path<TAB>caption' lines (relative paths from the file's folder)
    or a folder of images with .txt captions; lines naming the same image are its several captions."""

    source: str = _help("the training pairs: a TSV file or a folder")
    validation_source: str = _help("held-out pairs in the same formats; empty: hold out validation_count images of source", "")
    validation_count: int = _help("images of source held out for validation when validation_source is empty (0: none)", 64)
    resolution: int = _help("images are resized (shorter side) and center-cropped to this many pixels (256: 32x32 latents)", 256)
    random_flip: bool = _help("flip half the samples horizontally (U-ViT's MS-COCO recipe does not)", False)
    cache_dir: str = _help("folder of the latent and CLIP caches (empty: <run.output_dir>/cache); share it between runs", "")
    text_cache_dtype: Literal["fp32", "fp16", "bf16"] = _help("storage of the cached CLIP features (fp16: 118 KB a caption)", "fp16")
    cache_batch_size: int = _help("images / captions per VAE / CLIP call while building the caches", 32)
    cache_shard_size: int = _help("images per latent-cache shard (the unit of work each process encodes)", 1024)
    scan_workers: int = _help("threads checking the image files before training", 8)

    def __post_init__(self) -> None:
        if not str(self.source).strip():
            raise ValueError("source must name the training pairs (a TSV file or a folder of images with .txt captions)")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.validation_count < 0:
            raise ValueError("validation_count must not be negative")
        if min(self.cache_batch_size, self.cache_shard_size, self.scan_workers) < 1:
            raise ValueError("cache_batch_size, cache_shard_size and scan_workers must be at least 1")


@dataclass
class UViTModelSettings:
    """The network: a preset (the paper's four settings and two ablations) with any field overridden, and the
    frozen VAE whose latents it models. Unset fields keep the preset's values."""

    preset: str = _help("concat-early | concat-intermediate | cross-early | cross-intermediate | "
                        "cross-intermediate[1,0] | cross-intermediate[0,4]; empty: U-ViT-Small defaults", "cross-intermediate")
    conditioning: Literal["concat", "cross"] | None = _help("text joins the sequence (concat) or is attended to (cross)", None)
    fusion: Literal["early", "intermediate"] | None = _help("text in every block (early) or only the middle ones", None)
    n_image: int | None = _help("image-only blocks on each side of the middle (intermediate fusion)", None)
    n_text: int | None = _help("text-only blocks before the text joins (intermediate fusion)", None)
    image_size: int | None = _help("latent side (resolution / the VAE's downsampling: 32 for 256 px through KL-f8)", None)
    patch_size: int | None = _help("latent patch side", None)
    width: int | None = _help("token width", None)
    depth: int | None = _help("blocks on both sides of the middle block (12: 13 blocks)", None)
    heads: int | None = _help("attention heads", None)
    mlp_ratio: float | None = _help("MLP width / token width", None)
    qkv_bias: bool | None = _help("bias in the q/k/v projections", None)
    context_dim: int | None = _help("text feature width (768: CLIP ViT-L/14)", None)
    text_tokens: int | None = _help("text tokens (77: one CLIP chunk)", None)
    mlp_time_embed: bool | None = _help("time token through an MLP", None)
    final_conv: bool | None = _help("3x3 convolution after the head", None)
    long_skip: bool | None = _help("U-Net-style long skips", None)
    vae: str = _help("SD's KL-f8 VAE: a VAE file or diffusers folder, or an SD1.x checkpoint / diffusers folder holding one", "")
    vae_dtype: Literal["fp32", "fp16", "bf16"] = _help("dtype of the VAE while building the latent cache", "fp32")

    def __post_init__(self) -> None:
        if self.preset and self.preset not in PAPER_SETTINGS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PAPER_SETTINGS)} (or '' for U-ViT-Small defaults)")


OVERRIDABLE = ("conditioning", "fusion", "n_image", "n_text", "image_size", "patch_size", "width", "depth", "heads", "mlp_ratio",
               "qkv_bias", "context_dim", "text_tokens", "mlp_time_embed", "final_conv", "long_skip")


def resolve_uvit_config(settings: UViTModelSettings) -> UViTConfig:
    """The preset's config with the given fields replaced (a changed fusion drops the preset's n_image/n_text)."""
    base = (PAPER_SETTINGS[settings.preset] if settings.preset else UViTConfig()).to_dict()
    base.pop("extra", None)
    changes = {name: getattr(settings, name) for name in OVERRIDABLE if getattr(settings, name) is not None}
    if "fusion" in changes and changes["fusion"] != base["fusion"]:
        for name in ("n_image", "n_text"):
            if name not in changes:
                base[name] = None
    if "mlp_ratio" in changes:
        changes["mlp_ratio"] = float(changes["mlp_ratio"])
    try:
        return UViTConfig(**{**base, **changes})
    except UViTConfigError as exc:
        raise ConfigError(f"[model] {exc}") from exc


@dataclass
class UViTDiffusionSettings:
    """The diffusion objective: ε-prediction on SD's scaled-linear β (0.00085-0.012, 1000 steps, ComfyUI's
    'linear'), times n = 1..1000 as U-ViT counts them; these are fixed and written into the output."""

    p_uncond: float = _help("probability that a sample's text is replaced by the empty caption's (classifier-free guidance)", 0.1)
    latent_scale: float = _help("VAE latents are multiplied by this (U-ViT's MS-COCO value; SD's own is 0.18215)", 0.23010)

    def __post_init__(self) -> None:
        if not 0 <= self.p_uncond <= 1:
            raise ValueError(f"p_uncond must be in [0, 1], got {self.p_uncond}")
        if self.latent_scale <= 0:
            raise ValueError("latent_scale must be positive")


@dataclass
class UViTOptimSettings:
    """AdamW with a linear warm-up then a constant learning rate, and an EMA of the weights."""

    lr: float = _help("learning rate after the warm-up", 2e-4)
    weight_decay: float = _help("AdamW weight decay (on every weight, as U-ViT)", 0.03)
    betas: list[float] = _help("AdamW betas", default_factory=lambda: [0.9, 0.9])
    eps: float = _help("AdamW epsilon", 1e-8)
    warmup_steps: int = _help("linear warm-up steps, lr x min(step / warmup_steps, 1) (0: none)", 5000)
    ema_decay: float = _help("EMA of the weights after every optimiser step", 0.9999)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ValueError("lr and eps must be positive and weight_decay not negative")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must not be negative")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class UViTExportSettings:
    """What the run writes into run.output_dir (at the end, and when interrupted)."""

    name: str = _help("file name of the trained U-ViT (models/diffusion_models/<name>.safetensors in ComfyUI)", "uvit")
    weights: Literal["ema", "raw", "both"] = _help("ema: the EMA weights (as U-ViT samples); raw: the trained ones; "
                                                   "both: <name>.safetensors (EMA) and <name>-raw.safetensors", "ema")

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\") or self.name.startswith("."):
            raise ValueError(f"name must be a plain file name, got {self.name!r}")


# ---------------------------------------------------------------------------------------------------
# The objective


def uvit_alphas_cumprod(sampling: SamplingConvention | None = None) -> torch.Tensor:
    """ᾱ_n for n = 0..N in float64, ᾱ_0 = 1 (U-ViT's ``cum_alphas``): index n is U-ViT's time n and
    ComfyUI's discrete index n - 1."""
    s = sampling or SamplingConvention()
    if s.beta_schedule != "linear":
        raise ValueError(f"only SD's scaled-linear ('linear') schedule is implemented, not {s.beta_schedule!r}")
    betas = torch.linspace(s.linear_start**0.5, s.linear_end**0.5, s.num_timesteps, dtype=torch.float64) ** 2
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def buffer_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are buffers (same names, values, callable the same way):
    state that checkpoints hold and no optimiser or DDP reducer sees."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:  # a missing bias stays a None parameter, as the layer expects
                del sub._parameters[name]
                sub.register_buffer(name, param.detach().clone())
    return clone


class UViTTrainingModel(nn.Module):
    """The U-ViT, its EMA (buffers) and the objective; ``forward(batch)`` is one training step's loss."""

    def __init__(
        self,
        uvit: UViT,
        empty_context: torch.Tensor,
        *,
        p_uncond: float = 0.1,
        ema_decay: float = 0.9999,
        latent_scale: float = SamplingConvention.latent_scale,
        random_flip: bool = False,
        sampling: SamplingConvention | None = None,
    ) -> None:
        super().__init__()
        sampling = sampling or SamplingConvention()
        self.uvit = uvit
        self.ema = buffer_copy(uvit)
        self.p_uncond = float(p_uncond)
        self.ema_decay = float(ema_decay)
        self.latent_scale = float(latent_scale)
        self.random_flip = random_flip
        self.num_timesteps = sampling.num_timesteps
        alphas_cumprod = uvit_alphas_cumprod(sampling)
        # Derived, not trained: rebuilt by the task, never checkpointed.
        self.register_buffer("sqrt_alpha_bar", alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alpha_bar", (1 - alphas_cumprod).sqrt().float(), persistent=False)
        self.register_buffer("empty_context", empty_context.detach().float().clone(), persistent=False)
        self._pairs = [name for name, _ in uvit.named_parameters()]
        # DDP must not broadcast these every step: the EMA is updated identically on every process, the
        # others are constants.
        self._ddp_params_and_buffers_to_ignore = [f"ema.{name}" for name in self._pairs] + [
            "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar", "empty_context"]

    # -- pieces --------------------------------------------------------------------------------------------

    def latents(self, batch: Mapping[str, torch.Tensor], train: bool) -> torch.Tensor:
        """Scaled latents: training samples the posterior (and flips half when ``random_flip``); validation
        takes the unflipped posterior mean."""
        mean, std = batch["latent_mean"], batch["latent_std"]  # [B, 2 (unflipped, flipped), C, h, w]
        rows = torch.arange(mean.shape[0], device=mean.device)
        pick = torch.zeros_like(rows)
        if train and self.random_flip:
            pick = (torch.rand(mean.shape[0], device=mean.device) < 0.5).long()
        mean, std = mean[rows, pick].float(), std[rows, pick].float()
        if train:
            mean = mean + std * torch.randn(mean.shape, device=mean.device)
        return mean * self.latent_scale

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_n = √ᾱ_n z + √(1-ᾱ_n) ε for U-ViT times n in 1..N."""
        a = self.sqrt_alpha_bar[timesteps].view(-1, 1, 1, 1)
        s = self.sqrt_one_minus_alpha_bar[timesteps].view(-1, 1, 1, 1)
        return a * latents + s * noise

    def per_sample_loss(self, network: nn.Module, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                        context: torch.Tensor) -> torch.Tensor:
        """ε-MSE per sample ``[B]`` (float32) of ``network`` (the U-ViT or its EMA)."""
        prediction = network(self.noisy(latents, noise, timesteps), timesteps, context)
        return (prediction.float() - noise).pow(2).flatten(1).mean(1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        latents = self.latents(batch, train=True)
        count = latents.shape[0]
        timesteps = torch.randint(1, self.num_timesteps + 1, (count,), device=latents.device)
        noise = torch.randn(latents.shape, device=latents.device)
        context = batch["context"]
        drop = torch.rand(count, device=latents.device) < self.p_uncond
        context = torch.where(drop[:, None, None], self.empty_context.to(context.dtype), context)
        return {"loss": self.per_sample_loss(self.uvit, latents, noise, timesteps, context).mean()}

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema ← decay·ema + (1 - decay)·weights (U-ViT's ``ema``), after every optimiser step."""
        params = dict(self.uvit.named_parameters())
        buffers = dict(self.ema.named_buffers())
        torch._foreach_lerp_([buffers[n] for n in self._pairs], [params[n].detach() for n in self._pairs], 1.0 - self.ema_decay)


def build_uvit_optimizer(model: UViTTrainingModel, settings: UViTOptimSettings) -> torch.optim.Optimizer:
    """AdamW over every U-ViT weight (fused on CUDA), the EMA updated after each step."""
    params = list(model.uvit.parameters())
    fused = all(p.device.type == "cuda" for p in params)
    optimizer = torch.optim.AdamW(
        params, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps, weight_decay=settings.weight_decay, fused=fused or None,
    )
    optimizer.register_step_post_hook(lambda *_: model.update_ema())
    return optimizer


def warmup_lambda(warmup_steps: int):
    """U-ViT's ``customized_lr_scheduler``: lr × min(step / warmup, 1) (the first step has lr 0)."""
    if warmup_steps <= 0:
        return lambda step: 1.0
    return lambda step: min(step / warmup_steps, 1.0)


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
        "export": UViTExportSettings,
    }
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
        parts = {name: section(raw, name, settings) for name, settings in cls.SECTIONS.items()}
        run = raw.get("run", {})
        return cls(**parts, output_dir=str(run.get("output_dir", "")), seed=int(run.get("seed", 0)))

    def config(self) -> dict[str, Any]:
        data = as_dict(self.data)
        for key in ("cache_dir", "cache_batch_size", "scan_workers"):  # where and how fast, not what is trained on
            data.pop(key)
        return {
            "data": data,
            "model": {**as_dict(self.model_settings), "resolved": self.uvit_config.to_dict()},
            "text": as_dict(self.text),
            "diffusion": as_dict(self.diffusion),
            "optim": as_dict(self.optim),
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

    def _cache_root(self) -> Path:
        if self.data.cache_dir:
            return Path(os.path.expanduser(self.data.cache_dir))
        if not self.output_dir:
            raise ConfigError("set data.cache_dir or run.output_dir: the latent and CLIP caches need a folder")
        return Path(self.output_dir) / "cache"

    def _tokenizer_folder(self) -> str | None:
        if self.text.tokenizer:
            return str(Path(self.text.tokenizer).expanduser())
        if Path(self.text.clip).expanduser().is_dir():
            return None  # the folder's own tokenizer, fingerprinted with the folder
        folder = default_tokenizer_folder()
        return str(folder) if folder else None

    def _scan(self) -> tuple[list[CaptionedImage], list[int], list[int]]:
        """All images (training source first), and which of them train and validate."""
        pairs, report = scan_pairs(self.data.source, self.data.scan_workers)
        self._counts.update(report.counts())
        images = group_by_image(pairs)
        if self.data.validation_source:
            val_pairs, val_report = scan_pairs(self.data.validation_source, self.data.scan_workers)
            self._counts.update(val_report.counts("validation_"))
            val_images = group_by_image(val_pairs)
            return images + val_images, list(range(len(images))), list(range(len(images), len(images) + len(val_images)))
        count = self.data.validation_count
        if count and count * 5 > len(images):
            logger.warning("data.validation_count %d is over a fifth of the %d images; holding out %d", count, len(images), len(images) // 5)
            count = len(images) // 5
        train_idx, val_idx = split_validation(count, len(images))
        return images, train_idx, val_idx

    def _caches(self, images: Sequence[CaptionedImage], table: CaptionTable, vae: Path, clip: Path) -> tuple[LatentCache, FeatureCache]:
        root = self._cache_root()
        settings = {"resolution": self.data.resolution, "transform": TRANSFORM, "vae_dtype": self.model_settings.vae_dtype,
                    "shard_size": self.data.cache_shard_size}
        items = [image.image for image in images]
        key = cache_key(items, settings, json.dumps(fingerprint_path(vae), sort_keys=True))
        latents = LatentCache(root / "latents", items, key, self.data.cache_shard_size)
        text_fp = {
            "role": "uvit-text", "clip": fingerprint_path(clip), "tokenizer": fingerprint_path(self._tokenizer_folder()),
            "clip_dtype": self.text.dtype, "settings": "77 tokens, padded with the end token, no attention mask, last_hidden_state",
            "captions": hash_strings(table.captions), "count": len(table),
        }
        text = FeatureCache(root, "clip-text", text_fp, len(table), self.data.text_cache_dtype)
        return latents, text

    def prepare(self, dist: Distributed, log: logging.Logger, *, dry_run: bool = False) -> None:
        try:
            self._prepare(dist, log, dry_run)
        except (BridgeDataError, TargetError, FeatureCacheError) as exc:
            raise TrainingError(str(exc)) from exc
        except ValueError as exc:  # the VAE loader's DiffusionModelError and the encoders' own file errors
            if isinstance(exc, ConfigError):
                raise
            raise TrainingError(str(exc)) from exc

    def _prepare(self, dist: Distributed, log: logging.Logger, dry_run: bool) -> None:
        c = self.uvit_config
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
            if latent_cache.missing_shards(dist.rank, dist.world_size):
                from .diffusion_models import load_vae

                vae = load_vae(vae_path, DTYPES[self.model_settings.vae_dtype]).to(dist.device)
                built = latent_cache.build_shards(vae, image_transform(self.data.resolution), dist.device, dist.rank,
                                                  dist.world_size, self.data.cache_batch_size)
                log.info("latent cache: this process encoded %d shard(s)", built)
                del vae
            dist.barrier()
            if dist.is_main and latent_cache.state().state != "complete":
                latent_cache.write_index()
            dist.barrier()
            if text_state != "complete":
                from .gluenet_sources import target_encode_fn
                from .targets import load_target_encoder

                encoder = load_target_encoder(self.text).to(dist.device)
                text_cache.build(table.captions, target_encode_fn(encoder), (c.text_tokens, encoder.hidden_size), dist,
                                 self.data.cache_batch_size, state=text_state)
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

    def _check_latents(self, cache: LatentCache) -> None:
        from safetensors import safe_open

        c = self.uvit_config
        for shard in range(cache.num_shards):
            with safe_open(str(cache.shard_path(shard)), framework="pt") as handle:
                if "mean" not in handle.keys():
                    continue
                _, _, channels, height, width = handle.get_slice("mean").get_shape()
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

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Held-out ε-MSE of the weights and of their EMA at fixed times with fixed noise (deterministic)."""
        if self._val is None or len(self._val) == 0:
            return {}
        base: UViTTrainingModel = model.module if hasattr(model, "module") else model
        device = base.sqrt_alpha_bar.device
        per_t = held_out_eps_mse(
            self._val, self.collate, lambda batch: base.latents(batch, train=False),
            {name: (lambda latents, noise, steps, batch, network=network: base.per_sample_loss(network, latents, noise, steps, batch["context"]))
             for name, network in (("raw", base.uvit), ("ema", base.ema))},
            timesteps=VALIDATION_TIMESTEPS, seed=VALIDATION_SEED, batch_size=VALIDATION_BATCH, device=device,
        )
        raw, ema = per_t["raw"], per_t["ema"]
        metrics = {"val_eps_mse": float(raw.mean()), "val_eps_mse_ema": float(ema.mean())}
        metrics.update({f"val_eps_mse_t{t}": float(v) for t, v in zip(VALIDATION_TIMESTEPS, raw, strict=True)})
        return metrics

    # -- export --------------------------------------------------------------------------------------------

    def export(self, model: nn.Module, output_dir: Path) -> list[Path]:
        base: UViTTrainingModel = model.module if hasattr(model, "module") else model
        choice = self.export_settings.weights
        name = self.export_settings.name
        outputs = []
        if choice in ("ema", "both"):
            outputs.append(("ema", base.ema, Path(output_dir) / f"{name}.safetensors"))
        if choice in ("raw", "both"):
            outputs.append(("raw", base.uvit, Path(output_dir) / (f"{name}-raw.safetensors" if choice == "both" else f"{name}.safetensors")))
        written = []
        for weights, network, path in outputs:
            training = {"kind": self.kind, "weights": weights, **self.config()}
            save_uvit(network, path, self.sampling, {"x2i.training": json.dumps(training, default=str)})
            written.append(path)
        return written


def random_batch(config: UViTConfig, batch: int, device: torch.device | str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch as the caches give it (fp16 latent moments for both flips, fp16 CLIP features), random: for benchmarks."""
    generator = torch.Generator().manual_seed(seed)
    size = (batch, 2, config.in_channels, config.image_size, config.image_size)
    return {
        "latent_mean": (4 * torch.randn(size, generator=generator)).half().to(device),
        "latent_std": (0.05 * torch.rand(size, generator=generator)).half().to(device),
        "context": torch.randn(batch, config.text_tokens, config.context_dim, generator=generator).half().to(device),
    }


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
