"""The sections of a U-ViT config (``train uvit --help`` lists them with their defaults) and the network
they resolve to; the ``[text]`` section is :class:`.targets.TargetSettings`, ``[cache]``
:class:`.cache_settings.UViTCacheSettings`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..uvit import PAPER_SETTINGS, UViTConfig, UViTConfigError
from .config import ConfigError
from .image_data import ImageCaptionSettings
from .settings import check_file_name, setting


@dataclass
class UViTDataSettings(ImageCaptionSettings):
    """Image-caption pairs: a text file of 'image_path<TAB>caption' lines (relative paths from the file's folder)
    or a folder of images with .txt captions; lines naming the same image are its several captions."""

    validation_source: str = setting("", "held-out pairs in the same formats; empty: hold out validation_count images of source")
    validation_count: int = setting(64, "images of source held out for validation when validation_source is empty (0: none)")
    resolution: int = setting(256, "images are resized (shorter side) and center-cropped to this many pixels (256: 32x32 latents)")
    random_flip: bool = setting(False, "flip half the samples horizontally (U-ViT's MS-COCO recipe does not)")


@dataclass
class UViTModelSettings:
    """The network: a preset (the paper's four settings and two ablations) with any field overridden, and the
    frozen VAE whose latents it models. Unset fields keep the preset's values."""

    preset: str = setting("cross-intermediate", "concat-early | concat-intermediate | cross-early | cross-intermediate | "
                          "cross-intermediate[1,0] | cross-intermediate[0,4]; empty: U-ViT-Small defaults")
    conditioning: Literal["concat", "cross"] | None = setting(None, "text joins the sequence (concat) or is attended to (cross)")
    fusion: Literal["early", "intermediate"] | None = setting(None, "text in every block (early) or only the middle ones")
    n_image: int | None = setting(None, "image-only blocks on each side of the middle (intermediate fusion)")
    n_text: int | None = setting(None, "text-only blocks before the text joins (intermediate fusion)")
    image_size: int | None = setting(None, "latent side (resolution / the VAE's downsampling: 32 for 256 px through KL-f8)")
    patch_size: int | None = setting(None, "latent patch side")
    width: int | None = setting(None, "token width")
    depth: int | None = setting(None, "blocks on both sides of the middle block (12: 13 blocks)")
    heads: int | None = setting(None, "attention heads")
    mlp_ratio: float | None = setting(None, "MLP width / token width")
    qkv_bias: bool | None = setting(None, "bias in the q/k/v projections")
    context_dim: int | None = setting(None, "text feature width (768: CLIP ViT-L/14)")
    text_tokens: int | None = setting(None, "text tokens (77: one CLIP chunk)")
    mlp_time_embed: bool | None = setting(None, "time token through an MLP")
    final_conv: bool | None = setting(None, "3x3 convolution after the head")
    long_skip: bool | None = setting(None, "U-Net-style long skips")
    vae: str = setting("", "SD's KL-f8 VAE: a VAE file or diffusers folder, or an SD1.x checkpoint / diffusers folder holding one")
    vae_dtype: Literal["fp32", "fp16", "bf16"] = setting("fp32", "dtype of the VAE while building the latent cache")

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

    p_uncond: float = setting(0.1, "probability that a sample's text is replaced by the empty caption's (classifier-free guidance)")
    latent_scale: float = setting(0.23010, "VAE latents are multiplied by this (U-ViT's MS-COCO value; SD's own is 0.18215)")

    def __post_init__(self) -> None:
        if not 0 <= self.p_uncond <= 1:
            raise ValueError(f"p_uncond must be in [0, 1], got {self.p_uncond}")
        if self.latent_scale <= 0:
            raise ValueError("latent_scale must be positive")


@dataclass
class UViTOptimSettings:
    """AdamW with a linear warm-up then a constant learning rate, and an EMA of the weights."""

    lr: float = setting(2e-4, "learning rate after the warm-up")
    weight_decay: float = setting(0.03, "AdamW weight decay (on every weight, as U-ViT)")
    betas: list[float] = setting(doc="AdamW betas", factory=lambda: [0.9, 0.9])
    eps: float = setting(1e-8, "AdamW epsilon")
    warmup_steps: int = setting(5000, "linear warm-up steps, lr x min(step / warmup_steps, 1) (0: none)")
    ema_decay: float = setting(0.9999, "EMA of the weights after every optimiser step")

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

    name: str = setting("uvit", "file name of the trained U-ViT (models/diffusion_models/<name>.safetensors in ComfyUI)")
    weights: Literal["ema", "raw", "both"] = setting("ema", "ema: the EMA weights (as U-ViT samples); raw: the trained ones; "
                                                            "both: <name>.safetensors (EMA) and <name>-raw.safetensors")

    def __post_init__(self) -> None:
        check_file_name(self.name)
