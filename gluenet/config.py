"""Explicit configuration of a GlueNet translator and its input/output convention."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..errors import X2IError
from ..families import FAMILIES, SD1, family
from ..weights import config_from_json

Architecture = Literal["translator", "translator_noln", "translator_w_head", "translator_attn"]
ARCHITECTURES: tuple[str, ...] = ("translator", "translator_noln", "translator_w_head", "translator_attn")

OutputScaling = Literal["tensor_norm_half", "none"]
OUTPUT_SCALINGS: tuple[str, ...] = ("tensor_norm_half", "none")


class GlueNetConfigError(X2IError):
    """A GlueNet configuration that cannot describe a working translator."""


# Bounds on a configuration read from a file's metadata, far past any real translator (the released ones
# are 77 tokens, 1024 wide, depth 5): a 300-byte file must not describe a network that takes minutes or
# gigabytes to build before its weights are checked.
LIMITS = {"num_tokens": 4096, "num_tokens_out": 4096, "in_dim": 16384, "out_dim": 16384, "mult": 16, "depth": 64,
          "attn_heads": 128, "attn_dim_head": 512}


@dataclass(frozen=True)
class GlueNetConfig:
    """Shape of the translator network plus how features enter and leave it.

    The four architectures are the official GlueGen classes:

    - ``translator``: ``Translator`` — ``depth`` residual mixer blocks and a mixer tail with LayerNorm.
    - ``translator_noln``: ``Translator_noln`` — the same with a LayerNorm-free tail (the released
      multilingual GlueNets).
    - ``translator_w_head``: ``Translator_w_head`` — 3 mixer blocks on the source grid, a token/width
      changing mixer, ``depth - 3`` blocks on the target grid and two LayerNorm-free tails (the
      released sound GlueNet).
    - ``translator_attn``: ``Translator_attn`` — GlueNet-Trans: one pre-norm transformer layer before
      the ``translator`` stack.
    """

    architecture: Architecture
    num_tokens: int
    in_dim: int
    out_dim: int
    mult: int = 2
    depth: int = 5
    num_tokens_out: int | None = None
    attn_heads: int = 8
    attn_dim_head: int = 64
    # Official multilingual recipe: XLM-R features are divided by 3 before the network ("over3").
    input_divisor: float = 1.0
    # Official recipe: the output is multiplied by tensor_norm / 2 ("overnorm").
    output_scaling: OutputScaling = "tensor_norm_half"
    language: str | None = None
    encoder_hint: str | None = None
    # The model family whose conditioning the GlueNet produces (families.py): "sd1" (the released GlueNets)
    # or "sdxl" (77 x 2048 tokens plus a pooled vector from the pooled head).
    target: str = SD1.key
    # Per-token norms for 'tensor_norm_half' when they are not CLIP ViT-L/14's (SDXL: measured on the
    # training targets, as GlueGen measured CLIP's); None: the official CLIP ViT-L/14 values.
    output_norm: tuple[float, ...] | None = None
    # The pooled head's output width (SDXL: 1280) and the mean norm of the pooled vectors it was trained on
    # (it predicts pooled / pooled_norm, a unit-scale target like the tokens').
    pooled_dim: int = 0
    pooled_norm: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise GlueNetConfigError(
                f"unknown GlueNet architecture {self.architecture!r}; expected one of {', '.join(ARCHITECTURES)}"
            )
        if self.output_scaling not in OUTPUT_SCALINGS:
            raise GlueNetConfigError(
                f"unknown output_scaling {self.output_scaling!r}; expected one of {', '.join(OUTPUT_SCALINGS)}"
            )
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if value is None and name == "num_tokens_out":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
                raise GlueNetConfigError(f"GlueNet {name} must be a whole number from 1 to {limit}, got {value!r}")
        if self.architecture == "translator_w_head" and self.depth < 3:
            raise GlueNetConfigError("translator_w_head needs depth >= 3 (three input-side blocks)")
        if self.input_divisor <= 0:
            raise GlueNetConfigError(f"input_divisor must be positive, got {self.input_divisor}")
        if self.output_scaling == "tensor_norm_half" and self.tokens_out != 77:
            raise GlueNetConfigError(
                "output_scaling 'tensor_norm_half' is defined for 77 CLIP tokens only; "
                f"this GlueNet outputs {self.tokens_out} tokens (use output_scaling='none')"
            )
        if self.target not in FAMILIES:
            raise GlueNetConfigError(f"GlueNet target {self.target!r} is not a model family this pack knows "
                                     f"({', '.join(FAMILIES)}); update the node pack")
        if self.output_norm is not None:
            object.__setattr__(self, "output_norm", tuple(float(v) for v in self.output_norm))
            if len(self.output_norm) != self.tokens_out or not all(0 < v < 1e6 for v in self.output_norm):
                raise GlueNetConfigError(f"output_norm must be {self.tokens_out} positive numbers, one per output token")
        expected = family(self.target)
        if expected.pooled_dim:
            if (self.out_dim, self.pooled_dim, self.tokens_out) != (expected.token_width, expected.pooled_dim, 77):
                raise GlueNetConfigError(
                    f"a GlueNet for {expected.name} outputs 77 x {expected.token_width} tokens and a {expected.pooled_dim}-wide "
                    f"pooled vector, this one {self.tokens_out} x {self.out_dim} and {self.pooled_dim}"
                )
            if not 0 < self.pooled_norm < 1e6:
                raise GlueNetConfigError(f"pooled_norm must be positive, got {self.pooled_norm}")
        elif self.pooled_dim:
            raise GlueNetConfigError(f"a GlueNet for {expected.name} has no pooled head (pooled_dim 0), got {self.pooled_dim}")

    @property
    def family(self):
        return family(self.target)

    @property
    def tokens_out(self) -> int:
        """Number of tokens the translator emits."""
        if self.architecture == "translator_w_head" and self.num_tokens_out is not None:
            return self.num_tokens_out
        return self.num_tokens

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GlueNetConfig:
        return config_from_json(cls, text, GlueNetConfigError, "GlueNet config")
