"""GlueNet translators: the official GlueGen MLP-mixer family, re-implemented with the same
parameter names so that the released ``state_dict`` files load strictly.

Tensors are ``[batch, tokens, width]`` throughout. A mixer block runs a channel MLP (``net_sen``,
over the width) and then a token MLP (``net_tok``, over the tokens, on the transposed tensor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import X2IError
from ..pooling import PooledHead
from .config import GlueNetConfig
from .scaling import clip_tensor_norm


def _mlp(in_features: int, hidden: int, out_features: int, *, layer_norm: bool, trailing_gelu: bool = False) -> nn.Sequential:
    """Three Linear layers with GELUs between them, in the official index layout.

    With ``layer_norm`` every Linear is followed by a LayerNorm (indices 0,1,2 | 3,4,5 | 6,7);
    without, the layout is Linear/GELU/Linear/GELU/Linear (0,2,4) and optionally a trailing GELU.
    """
    if layer_norm:
        layers: list[nn.Module] = [
            nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, out_features), nn.LayerNorm(out_features),
        ]
    else:
        layers = [
            nn.Linear(in_features, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, out_features),
        ]
        if trailing_gelu:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class MixerBlock(nn.Module):
    """One GlueNet mixer: channel MLP then token MLP.

    Covers the official ``translator_base`` (``layer_norm=True``), ``translator_base_noln``
    (``layer_norm=False``) and ``translator_tok_dim`` (``residual=False``, token count may change;
    without LayerNorm its channel MLP ends in a GELU).
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        dim_out: int,
        mult: int,
        *,
        num_tokens_out: int | None = None,
        layer_norm: bool = True,
        residual: bool = True,
        trailing_gelu: bool = False,
    ) -> None:
        super().__init__()
        num_tokens_out = num_tokens if num_tokens_out is None else num_tokens_out
        self.net_tok = _mlp(num_tokens, num_tokens * mult, num_tokens_out, layer_norm=layer_norm)
        self.net_sen = _mlp(dim, dim * mult, dim_out, layer_norm=layer_norm, trailing_gelu=trailing_gelu)
        # The official blocks add residuals only when the width is kept.
        self.residual = residual and dim == dim_out and num_tokens == num_tokens_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net_sen(x)
        if self.residual:
            y = y + x
        z = self.net_tok(y.transpose(1, 2))
        if self.residual:
            z = z + y.transpose(1, 2)
        return z.transpose(1, 2)


class _SelfAttention(nn.Module):
    """x-transformers' ``Attention`` (no bias on q/k/v), computed with fused SDPA."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t(x).view(b, n, self.heads, -1).transpose(1, 2) for t in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _FeedForward(nn.Module):
    """x-transformers' ``FeedForward`` (mult 4, GELU, no GLU); index 1 is a parameter-free Dropout."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU()), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerLayers(nn.Module):
    """x-transformers' ``AttentionLayers(dim, depth)`` with its defaults: pre-norm, layer types
    ('a', 'f') per depth, residual add, no final norm. Keys: ``layers.{i}.0`` norm, ``layers.{i}.1``
    attention or feed-forward (index 2, the parameter-free residual, is folded into ``forward``)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), _SelfAttention(dim, heads, dim_head)]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), _FeedForward(dim)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, layer in self.layers:
            x = x + layer(norm(x))
        return x


def _run_residual_stack(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    # Official stacks wrap each block in an outer residual followed by GELU.
    for block in blocks:
        x = F.gelu(block(x) + x)
    return x


class GlueNet(nn.Module):
    """A GlueNet translator built from an explicit :class:`GlueNetConfig`.

    ``forward`` is the bare network (the official ``model(x)``); :meth:`translate` applies the
    file's input/output convention and is what conditioning code should call.
    """

    def __init__(self, config: GlueNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        if c.architecture == "translator_w_head":
            t_out = c.tokens_out
            self.in_blocks = nn.ModuleList(MixerBlock(c.num_tokens, c.in_dim, c.in_dim, c.mult) for _ in range(3))
            self.trans = MixerBlock(c.num_tokens, c.in_dim, c.out_dim, c.mult, num_tokens_out=t_out, residual=False)
            self.out_blocks = nn.ModuleList(MixerBlock(t_out, c.out_dim, c.out_dim, c.mult) for _ in range(c.depth - 3))
            tail = dict(layer_norm=False, residual=False, trailing_gelu=True)
            self.tail_1 = MixerBlock(t_out, c.out_dim, c.out_dim, c.mult, **tail)
            self.tail_2 = MixerBlock(t_out, c.out_dim, c.out_dim, c.mult, **tail)
        else:
            if c.architecture == "translator_attn":
                self.attn = TransformerLayers(c.in_dim, 1, c.attn_heads, c.attn_dim_head)
            self.blocks = nn.ModuleList(MixerBlock(c.num_tokens, c.in_dim, c.in_dim, c.mult) for _ in range(c.depth))
            self.tail = MixerBlock(c.num_tokens, c.in_dim, c.out_dim, c.mult, layer_norm=c.architecture != "translator_noln")
        if c.pooled_dim:
            self.pooled_head = PooledHead(c.out_dim, c.pooled_dim)
        # Not persistent: the released state_dicts do not carry it and must load strictly (it comes from the config).
        self.register_buffer("output_scale", clip_tensor_norm(c.output_norm) / 2, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.architecture == "translator_w_head":
            x = _run_residual_stack(self.in_blocks, x)
            x = self.trans(x)
            x = _run_residual_stack(self.out_blocks, x)
            return self.tail_2(self.tail_1(x) + x)
        if self.config.architecture == "translator_attn":
            x = self.attn(x)
        x = _run_residual_stack(self.blocks, x)
        return self.tail(x)

    @property
    def input_shape(self) -> tuple[int, int]:
        return (self.config.num_tokens, self.config.in_dim)

    @property
    def output_shape(self) -> tuple[int, int]:
        return (self.config.tokens_out, self.config.out_dim)

    def check_source(self, num_tokens: int, width: int, source: str = "the encoder") -> None:
        """Raise a clear error when a source of ``num_tokens`` x ``width`` features cannot feed this GlueNet."""
        expected_tokens, expected_width = self.input_shape
        if (num_tokens, width) == (expected_tokens, expected_width):
            return
        hint = f" (trained on {self.config.encoder_hint})" if self.config.encoder_hint else ""
        raise X2IError(
            f"GlueNet input mismatch: this GlueNet{hint} expects {expected_tokens} tokens x {expected_width} "
            f"channels, but {source} gives {num_tokens} x {width}. Load the encoder this GlueNet was trained "
            f"for, or a GlueNet trained for this encoder (width {width})."
        )

    def check_embedding(self, size: int, source: str = "the encoder") -> None:
        """Raise a clear error when a ``size``-long embedding cannot be reshaped into this GlueNet's input."""
        tokens, width = self.input_shape
        if size != tokens * width:
            hint = f" (trained on {self.config.encoder_hint})" if self.config.encoder_hint else ""
            raise X2IError(
                f"GlueNet input mismatch: this GlueNet{hint} expects an embedding of {tokens} x {width} = "
                f"{tokens * width} values, but {source} gives {size}. Load the encoder this GlueNet was trained "
                "for, or a GlueNet trained for this encoder."
            )

    def as_tokens(self, features: torch.Tensor, source: str = "the encoder") -> torch.Tensor:
        """``[B, T, D]`` token features as they are, or ``[B, T*D]`` embeddings (sound, point clouds)
        reshaped row-major to ``[B, T, D]`` as GlueGen does (AudioCLIP's 1024 -> 16 x 64)."""
        if features.ndim == 2:
            self.check_embedding(features.shape[1], source)
            return features.reshape(features.shape[0], *self.input_shape)
        if features.ndim != 3:
            raise X2IError(f"GlueNet expects [batch, tokens, channels] features, got shape {tuple(features.shape)}")
        self.check_source(features.shape[1], features.shape[2], source)
        return features

    def translate(self, features: torch.Tensor, source: str = "the encoder") -> torch.Tensor:
        """Source-encoder features ``[B, T, D_in]`` (or ``[B, T*D_in]`` embeddings) to target
        conditioning ``[B, T_out, D_out]``, with the official scaling:
        ``GlueNet(features / input_divisor) * tensor_norm / 2``."""
        return self.translate_with_pooled(features, source)[0]

    def translate_with_pooled(self, features: torch.Tensor, source: str = "the encoder") -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`translate`'s tokens and, for a GlueNet with a pooled head (SDXL), the pooled vector
        ``[B, pooled_dim]`` at the target's scale; ``None`` otherwise."""
        param = next(self.parameters())
        x = self.as_tokens(features, source).to(device=param.device, dtype=param.dtype)
        if self.config.input_divisor != 1.0:
            x = x / self.config.input_divisor
        y = self(x)
        pooled = self.pooled_head(y) * self.config.pooled_norm if self.config.pooled_dim else None
        if self.config.output_scaling == "tensor_norm_half":
            y = y * self.output_scale.to(device=y.device, dtype=y.dtype)
        return y, pooled
