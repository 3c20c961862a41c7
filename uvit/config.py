"""Explicit configuration of an intermediate-fusion U-ViT (Hu, Jia, Rostami 2024; Bao et al. 2023)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from ..errors import X2IError
from ..weights import config_from_json

Fusion = Literal["early", "intermediate"]
Conditioning = Literal["concat", "cross"]
FUSIONS: tuple[str, ...] = ("early", "intermediate")
CONDITIONINGS: tuple[str, ...] = ("concat", "cross")

# The paper's intermediate fusion, written [N_text, N_image] = [1, 4] in its ablation.
PAPER_N_IMAGE = 4
PAPER_N_TEXT = 1


# Bounds on a configuration read from file metadata, far past U-ViT-Huge (1152 wide, depth 28, 64²
# latents): a small file must not describe a network that takes minutes or gigabytes to build.
LIMITS = {
    "image_size": (1, 1024), "patch_size": (1, 64), "in_channels": (1, 64), "width": (1, 8192), "heads": (1, 256),
    "context_dim": (1, 16384), "text_tokens": (1, 4096), "depth": (0, 256), "n_image": (0, 128), "n_text": (0, 128),
}


class UViTConfigError(X2IError):
    """A U-ViT configuration that cannot describe a working network."""


@dataclass(frozen=True)
class UViTConfig:
    """Shape of a text-to-image U-ViT and where its text enters.

    Sizes follow U-ViT's own convention: ``depth`` counts the blocks on both sides of the middle block,
    so ``depth=12`` is 6 in-blocks + 1 mid-block + 6 out-blocks = 13 blocks on the image path
    (:attr:`num_blocks`), joined by ``depth // 2`` long skips.

    Tokens: ``(image_size // patch_size)**2`` image patches, one time token (the sinusoidal embedding of
    t, optionally through an MLP) and ``text_tokens`` text tokens (``Linear(context_dim, width)`` of the
    CLIP ViT-L/14 ``last_hidden_state``), with one learned position embedding over all of them.

    - ``conditioning="concat"``: text tokens join the sequence; joint blocks are self-attention over
      image + time + text, and text tokens are updated too.
    - ``conditioning="cross"``: joint blocks take queries from the image + time tokens only and
      keys/values from image + time + text (``q``: width→width, ``kv``: width→2·width, the same number
      of parameters as ``qkv``); the residual and MLP act on image + time tokens, text is never updated.
    - ``fusion="early"``: every block is joint (U-ViT's text-to-image model).
    - ``fusion="intermediate"``: the first and last ``n_image`` blocks on the image path see image +
      time tokens only; ``n_text`` extra text-only self-attention blocks process the text before it
      joins the middle blocks (the paper: ``n_image=4``, ``n_text=1``; the ablations [1,0] and [0,4]
      are ``n_text=1, n_image=0`` and ``n_text=0, n_image=4``).

    ``n_image`` and ``n_text`` default to 0 for early and to the paper's 4 and 1 for intermediate fusion.
    """

    conditioning: Conditioning = "concat"
    fusion: Fusion = "early"
    n_image: int | None = None
    n_text: int | None = None
    image_size: int = 32  # latent side (256-pixel images through SD's KL-f8)
    patch_size: int = 2
    in_channels: int = 4
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    context_dim: int = 768
    text_tokens: int = 77
    mlp_time_embed: bool = False
    final_conv: bool = True
    long_skip: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONINGS:
            raise UViTConfigError(f"unknown conditioning {self.conditioning!r}; expected one of {', '.join(CONDITIONINGS)}")
        if self.fusion not in FUSIONS:
            raise UViTConfigError(f"unknown fusion {self.fusion!r}; expected one of {', '.join(FUSIONS)}")
        early = self.fusion == "early"
        if self.n_image is None:
            object.__setattr__(self, "n_image", 0 if early else PAPER_N_IMAGE)
        if self.n_text is None:
            object.__setattr__(self, "n_text", 0 if early else PAPER_N_TEXT)
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise UViTConfigError(f"U-ViT {name} must be a whole number from {low} to {high}, got {value!r}")
        if self.depth % 2:
            raise UViTConfigError(f"U-ViT depth counts the blocks on both sides of the middle block and must be even, got {self.depth}")
        if early and (self.n_image or self.n_text):
            raise UViTConfigError(
                f"early fusion has no image-only or text-only blocks (got n_image={self.n_image}, n_text={self.n_text}); "
                "use fusion='intermediate'"
            )
        if not early and not (self.n_image or self.n_text):
            raise UViTConfigError("intermediate fusion needs n_image > 0 or n_text > 0 (both 0 is early fusion)")
        if 2 * self.n_image > self.depth:
            raise UViTConfigError(
                f"n_image={self.n_image} image-only blocks per side need depth >= {2 * self.n_image}, got depth={self.depth}"
            )
        if self.image_size % self.patch_size:
            raise UViTConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise UViTConfigError(f"width {self.width} is not divisible by heads {self.heads}")
        hidden = self.width * self.mlp_ratio
        if self.mlp_ratio <= 0 or not math.isclose(hidden, round(hidden)):
            raise UViTConfigError(f"mlp_ratio {self.mlp_ratio} must give an integer MLP width (width {self.width})")

    # --- derived sizes ---------------------------------------------------------------------------

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_blocks(self) -> int:
        """Blocks on the image path (in + mid + out), 13 for U-ViT-Small."""
        return self.depth + 1

    @property
    def n_joint(self) -> int:
        """Joint (text-seeing) blocks on each side of the middle block."""
        return self.depth // 2 - int(self.n_image or 0)

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def name(self) -> str:
        """``concat-early``, ``cross-intermediate``, ... with ``[n_text,n_image]`` when not the paper's."""
        label = f"{self.conditioning}-{self.fusion}"
        if self.fusion == "intermediate" and (self.n_text, self.n_image) != (PAPER_N_TEXT, PAPER_N_IMAGE):
            label += f"[{self.n_text},{self.n_image}]"
        return label

    # --- presets and serialisation ---------------------------------------------------------------

    @classmethod
    def paper(cls, conditioning: Conditioning = "concat", fusion: Fusion = "early", **overrides: Any) -> UViTConfig:
        """U-ViT-Small on 32×32×4 latents (MS-COCO 256²) as in the paper's Table 1: width 512, 13 blocks,
        8 heads, patch 2, CLIP ViT-L/14 text (77×768)."""
        return cls(conditioning=conditioning, fusion=fusion, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> UViTConfig:
        return config_from_json(cls, raw, UViTConfigError, "U-ViT config")

    @classmethod
    def from_json(cls, text: str) -> UViTConfig:
        return config_from_json(cls, text, UViTConfigError, "U-ViT config")


# The paper's Table 1 settings and the two ablations of its Table 4 (cross-attention, [N_text, N_image]).
PAPER_SETTINGS: dict[str, UViTConfig] = {
    "concat-early": UViTConfig.paper("concat", "early"),
    "concat-intermediate": UViTConfig.paper("concat", "intermediate"),
    "cross-early": UViTConfig.paper("cross", "early"),
    "cross-intermediate": UViTConfig.paper("cross", "intermediate"),
    "cross-intermediate[1,0]": UViTConfig.paper("cross", "intermediate", n_text=1, n_image=0),
    "cross-intermediate[0,4]": UViTConfig.paper("cross", "intermediate", n_text=0, n_image=4),
}


@dataclass(frozen=True)
class SamplingConvention:
    """How a U-ViT checkpoint was trained, i.e. what a sampler must reproduce (U-ViT's MS-COCO recipe).

    - ε-prediction on SD's "scaled linear" β schedule: ``betas = linspace(√0.00085, √0.012, 1000)²``
      (ComfyUI's ``beta_schedule="linear"``);
    - U-ViT numbers its times n = 1..1000 where ComfyUI's discrete index is 0..999, so the network
      gets ``index + timestep_offset``;
    - latents are SD's KL-f8 latents times ``latent_scale`` (U-ViT's MS-COCO value 0.23010, not SD's
      0.18215).
    """

    prediction: str = "eps"
    beta_schedule: str = "linear"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    num_timesteps: int = 1000
    timestep_offset: int = 1
    latent_scale: float = 0.23010

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SamplingConvention:
        try:
            raw = json.loads(text)
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in raw.items() if k in known})
        except (json.JSONDecodeError, TypeError, AttributeError) as exc:
            raise UViTConfigError(f"U-ViT sampling metadata is not valid: {exc}") from exc
