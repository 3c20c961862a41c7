"""The U-ViT backbone with early or intermediate text fusion, by concatenation or cross-attention.

Plain PyTorch; layers come from ``operations`` (ComfyUI's ``comfy.ops`` namespaces: an object with
``Linear``, ``LayerNorm`` and ``Conv2d`` classes) or from ``torch.nn``. Module names follow the
authors' public code (zizhao-hu/U-ViT ``libs/uvit_t2i.py`` and ``libs/uvit_t2i_cross.py``), so their
state dicts load unchanged; tokens are in their order, [image, time, text].

Timesteps: the network takes U-ViT's discrete time n in 1..1000 (its training draws n uniformly
from {1, ..., 1000}, and its β_n is the n-th of SD's 1000 betas), a float tensor [B]. A sampler
that counts 0..999 (ComfyUI's ``model_sampling.timestep``) passes ``t + 1``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import X2IError
from .config import UViTConfig

logger = logging.getLogger(__name__)

CLIP_HINT = "CLIP ViT-L/14 features: Load CLIP with clip_l and type stable_diffusion, then CLIP Text Encode"


class UViTInputError(X2IError):
    """Inputs that do not fit the network; the message names what was given and what was expected."""


def fit_text_context(context: torch.Tensor, config: UViTConfig) -> torch.Tensor:
    """A text conditioning ``[B, T, C]`` as this U-ViT takes it: exactly ``text_tokens`` tokens of ``context_dim``.

    ComfyUI encodes a long prompt as several 77-token CLIP chunks (154, 231, ... tokens). U-ViT has
    position embeddings for one chunk and was trained on captions CLIP truncated to 77 tokens, so
    the first chunk is used (with a warning) — the same text the training recipe would have seen.
    A narrower or wider conditioning is another text encoder's and is refused.
    """
    if context.ndim != 3:
        raise UViTInputError(f"U-ViT conditioning must be [batch, tokens, width], got shape {tuple(context.shape)}")
    tokens, width = context.shape[1], context.shape[2]
    if width != config.context_dim:
        hint = CLIP_HINT if config.context_dim == 768 else "the text encoder this U-ViT was trained with"
        raise UViTInputError(
            f"the conditioning is {width} wide but this U-ViT takes {config.context_dim}-wide text ({hint}); "
            "an SDXL, SD2 or T5 text encoder gives other widths"
        )
    if tokens < config.text_tokens:
        raise UViTInputError(
            f"the conditioning has {tokens} tokens but this U-ViT takes exactly {config.text_tokens} "
            f"({CLIP_HINT} gives {config.text_tokens})"
        )
    if tokens > config.text_tokens:
        logger.warning(
            "U-ViT: the prompt is %d tokens long (%s CLIP chunks); this U-ViT reads one chunk of %d tokens, as in "
            "its training, so only the first %d are used",
            tokens, f"{tokens / config.text_tokens:g}", config.text_tokens, config.text_tokens,
        )
        context = context[:, : config.text_tokens]
    return context


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """U-ViT's sinusoidal embedding ``[cos(t·f), sin(t·f)]`` of ``timesteps`` [B], in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class Attention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention``.

    ``fused=True`` (concat models): one ``qkv`` projection, self-attention over ``x``.
    ``fused=False`` (cross models): ``q`` from ``x``, ``kv`` from ``cat[x, context]`` (just ``x`` when
    there is no context, i.e. self-attention with separate projections); the output has ``x``'s tokens.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool, fused: bool, ops: Any, factory: dict[str, Any]) -> None:
        super().__init__()
        self.heads = heads
        self.fused = fused
        if fused:
            self.qkv = ops.Linear(dim, dim * 3, bias=qkv_bias, **factory)
        else:
            self.q = ops.Linear(dim, dim, bias=qkv_bias, **factory)
            self.kv = ops.Linear(dim, dim * 2, bias=qkv_bias, **factory)
        self.proj = ops.Linear(dim, dim, **factory)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, dim = x.shape
        head_dim = dim // self.heads
        if self.fused:
            if context is not None:
                raise ValueError("a fused-qkv attention has no separate context")
            q, k, v = self.qkv(x).view(batch, length, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q(x).view(batch, length, self.heads, head_dim).transpose(1, 2)
            source = x if context is None else torch.cat([x, context], dim=1)
            k, v = self.kv(source).view(batch, source.shape[1], 2, self.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # the default scale is U-ViT's head_dim ** -0.5
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, ops: Any, factory: dict[str, Any]) -> None:
        super().__init__()
        self.fc1 = ops.Linear(dim, hidden, **factory)
        self.act = nn.GELU()
        self.fc2 = ops.Linear(hidden, dim, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; out-blocks first merge their long skip with ``skip_linear``.

    With ``context`` (cross models), attention reads keys/values from ``cat[x, context]`` (both through
    ``norm1``) while the residual and MLP update only ``x``.
    """

    def __init__(self, config: UViTConfig, skip: bool, ops: Any, factory: dict[str, Any]) -> None:
        super().__init__()
        dim = config.width
        self.norm1 = ops.LayerNorm(dim, **factory)
        self.attn = Attention(dim, config.heads, config.qkv_bias, config.conditioning == "concat", ops, factory)
        self.norm2 = ops.LayerNorm(dim, **factory)
        self.mlp = Mlp(dim, config.mlp_hidden, ops, factory)
        self.skip_linear = ops.Linear(2 * dim, dim, **factory) if skip else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x), None if context is None else self.norm1(context))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: UViTConfig, ops: Any, factory: dict[str, Any]) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = ops.Conv2d(config.in_channels, config.width, kernel_size=p, stride=p, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class UViT(nn.Module):
    """Text-to-image U-ViT: ε-prediction on latents [B, C, H, W] from time and text tokens.

    ``UViT(config)`` or ``UViT(**config_fields)`` (how ComfyUI's ``BaseModel`` builds its network from
    ``unet_config``); ``dtype``, ``device`` and ``operations`` as ComfyUI passes them. Weights are
    initialised as U-ViT does (truncated normal 0.02 for Linear weights and the position embedding)
    unless ``init_weights=False``; by default they are left to the caller when ``operations`` is given
    (ComfyUI's ops skip initialisation; a checkpoint is loaded next).
    """

    def __init__(
        self,
        config: UViTConfig | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        operations: Any = None,
        init_weights: bool | None = None,
        **config_fields: Any,
    ) -> None:
        super().__init__()
        if config is None:
            config = UViTConfig.from_dict(config_fields)
        elif config_fields:
            raise TypeError(f"pass either a UViTConfig or its fields, not both (got {sorted(config_fields)})")
        self.config = config
        ops = operations if operations is not None else nn
        factory: dict[str, Any] = {"dtype": dtype, "device": device}
        c = config

        self.patch_embed = PatchEmbed(c, ops, factory)
        self.time_embed: nn.Module = (
            nn.Sequential(ops.Linear(c.width, 4 * c.width, **factory), nn.SiLU(), ops.Linear(4 * c.width, c.width, **factory))
            if c.mlp_time_embed
            else nn.Identity()
        )
        self.context_embed = ops.Linear(c.context_dim, c.width, **factory)
        # Order [image patches, time, text tokens], as in the authors' code.
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1 + c.text_tokens, c.width, device=device, dtype=dtype))

        def blocks(n: int, skip: bool = False) -> nn.ModuleList:
            return nn.ModuleList(Block(c, skip, ops, factory) for _ in range(n))

        skip = c.long_skip
        self.image_blocks = blocks(c.n_image)
        self.caption_blocks = blocks(c.n_text)
        self.joint_blocks = blocks(c.n_joint)
        self.mid_block = Block(c, False, ops, factory)
        self.joint_skip_blocks = blocks(c.n_joint, skip)
        self.image_skip_blocks = blocks(c.n_image, skip)

        self.norm = ops.LayerNorm(c.width, **factory)
        self.decoder_pred = ops.Linear(c.width, c.patch_size**2 * c.in_channels, **factory)
        self.final_layer: nn.Module = (
            ops.Conv2d(c.in_channels, c.in_channels, 3, padding=1, **factory) if c.final_conv else nn.Identity()
        )

        if init_weights is None:
            init_weights = operations is None
        if init_weights and torch.device(device or "cpu").type != "meta":
            self.reset_parameters()

    @property
    def dtype(self) -> torch.dtype:
        """The weights' storage dtype (what ComfyUI's ``BaseModel.get_dtype`` reads)."""
        return self.pos_embed.dtype

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """U-ViT's initialisation: Linear weights and the position embedding ~ trunc-normal(0.02),
        Linear biases 0, LayerNorms 1/0; convolutions keep PyTorch's default."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                nn.Conv2d.reset_parameters(module)

    # --- inputs ----------------------------------------------------------------------------------

    def _check_inputs(self, x: torch.Tensor, timesteps: Any, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise UViTInputError(f"U-ViT latent must be a [B, C, H, W] tensor, got {getattr(x, 'shape', type(x).__name__)}")
        batch, channels, height, width = x.shape
        if channels != c.in_channels:
            raise UViTInputError(
                f"latent has {channels} channels but this U-ViT expects {c.in_channels} "
                f"({'latents of the SD1.x KL-f8 VAE' if c.in_channels == 4 else 'its training latents'})"
            )
        if (height, width) != (c.image_size, c.image_size):
            raise UViTInputError(
                f"latent is {height}×{width} but this U-ViT was trained on {c.image_size}×{c.image_size} latents "
                f"({c.image_size * 8}×{c.image_size * 8} images through an 8× VAE); its position embedding "
                "has no other sizes"
            )
        if context is None:
            raise UViTInputError("U-ViT needs a text conditioning (context), got none")
        if context.ndim != 3:
            raise UViTInputError(f"text conditioning must be [B, tokens, width], got shape {tuple(context.shape)}")
        if context.shape[-1] != c.context_dim:
            raise UViTInputError(
                f"text conditioning is {context.shape[-1]} wide but this U-ViT expects {c.context_dim} "
                f"({'CLIP ViT-L/14 features, e.g. CLIPTextEncode with an SD1.x CLIP' if c.context_dim == 768 else 'its training text features'})"
            )
        if context.shape[1] != c.text_tokens:
            raise UViTInputError(
                f"text conditioning has {context.shape[1]} tokens but this U-ViT has position embeddings for "
                f"exactly {c.text_tokens} (one CLIP chunk; shorten the prompt to one chunk)"
            )
        if context.shape[0] != batch:
            if context.shape[0] != 1:
                raise UViTInputError(f"text conditioning has batch {context.shape[0]} but the latent has batch {batch}")
            context = context.expand(batch, -1, -1)
        t = torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0 or t.numel() == 1:
            t = t.reshape(1).expand(batch)
        if t.shape != (batch,):
            raise UViTInputError(f"timesteps must be [B] = [{batch}] (or one value), got shape {tuple(t.shape)}")
        return t, context

    # --- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """ε for latents ``x`` [B, C, H, W] at U-ViT times ``timesteps`` [B] (1..1000, see the module
        docstring) given text ``context`` [B, 77, 768]. Extra ComfyUI keywords (``control``,
        ``transformer_options``, ...) are accepted and ignored."""
        c = self.config
        timesteps, context = self._check_inputs(x, timesteps, context)
        h = self.patch_embed(x)
        length = h.shape[1]
        pos = self.pos_embed.to(device=h.device, dtype=h.dtype)
        time_token = self.time_embed(timestep_embedding(timesteps, c.width).to(h.dtype))
        image = torch.cat([h, time_token[:, None]], dim=1) + pos[:, : length + 1]
        text = self.context_embed(context.to(h.dtype)) + pos[:, length + 1 :]

        skips: list[torch.Tensor] = []
        for block in self.image_blocks:
            image = block(image)
            skips.append(image)
        for block in self.caption_blocks:
            text = block(text)

        if c.conditioning == "concat":
            tokens = torch.cat([image, text], dim=1)
            for block in self.joint_blocks:
                tokens = block(tokens)
                skips.append(tokens)
            tokens = self.mid_block(tokens)
            for block in self.joint_skip_blocks:
                tokens = block(tokens, skip=skips.pop())
            image = tokens[:, : length + 1]
        else:
            for block in self.joint_blocks:
                image = block(image, text)
                skips.append(image)
            image = self.mid_block(image, text)
            for block in self.joint_skip_blocks:
                image = block(image, text, skip=skips.pop())
        for block in self.image_skip_blocks:
            image = block(image, skip=skips.pop())

        # Time (and text) tokens are dropped before the head: per-token layers, so the same numbers as
        # U-ViT's "head on every token, then slice" without the wasted work.
        out = self.decoder_pred(self.norm(image[:, :length]))
        p, side = c.patch_size, c.image_size // c.patch_size
        out = out.view(out.shape[0], side, side, p, p, c.in_channels).permute(0, 5, 1, 3, 2, 4)
        out = out.reshape(out.shape[0], c.in_channels, side * p, side * p)
        return self.final_layer(out)
