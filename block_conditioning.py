"""Block-wise text conditioning for SD-style U-Nets: the intermediate-fusion finding on existing models.

Hu et al. (2024) find that text matters most in a diffusion network's middle blocks. An SD1.x U-Net
sees the same text in every cross-attention layer; :class:`BlockContextPatch` gives chosen blocks
another context (the prompt) while the others keep the sampler's (e.g. the empty prompt).

It is an ``attn2_patch`` in ComfyUI's convention, but nothing here imports ComfyUI: the patch is
called before each cross-attention's ``to_k``/``to_v`` as ``patch(n, context, value, extra)`` where
``extra["block"]`` is ``("input", i)``, ``("middle", 0)`` or ``("output", i)`` and
``extra["cond_or_uncond"]`` lists, for each equal-sized chunk of the batch, 0 (positive) or 1
(negative). Only the positive chunks are changed, so the negative keeps its own text everywhere and
classifier-free guidance compares like with like.

Contexts of different lengths (one 77-token CLIP chunk against a long prompt's 154) are repeated to
their least common multiple, as ComfyUI batches conditionings: attention over every key and value
repeated k times equals attention over them once, so the result is exact.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import X2IError

BlockId = tuple[str, int]
SECTIONS = ("input", "middle", "output")
DEFAULT_BLOCKS = "middle"
_ITEM = re.compile(r"^(input|middle|output)(?::(\d+)(?:-(\d+))?)?$")
# Bounds on what a spec can cost (it is parsed while ComfyUI validates a prompt): SD1.x/SD2 U-Nets have
# 12 input and 12 output blocks, SDXL 9; no U-Net ComfyUI loads has 64. The length bound also keeps
# int() of a digit string cheap.
MAX_BLOCK_INDEX = 63
MAX_SPEC_CHARS = 1000


class BlockSpecError(X2IError):
    """A blocks string that does not parse or names blocks without cross-attention."""


def format_blocks(blocks: Iterable[BlockId]) -> str:
    """``input:1,input:2,middle,output:3`` (the spec syntax, in U-Net order)."""
    order = {name: i for i, name in enumerate(SECTIONS)}
    items = sorted(set(blocks), key=lambda b: (order[b[0]], b[1]))
    return ",".join("middle" if name == "middle" else f"{name}:{index}" for name, index in items)


def parse_blocks(spec: str, available: Sequence[BlockId] | None = None) -> tuple[BlockId, ...]:
    """The blocks a spec names, in U-Net order.

    ``spec`` is a comma-separated list of ``middle``, ``input:N``, ``output:N``, ranges ``input:4-8``
    and ``input`` / ``output`` alone for every such block with cross-attention; case and spaces are
    ignored; an empty spec names no block. With ``available`` (the blocks of a real U-Net that have
    cross-attention), a named block outside it is an error: a typo would otherwise silently change
    nothing.
    """
    if not isinstance(spec, str):
        raise BlockSpecError(f"blocks must be a string like 'middle' or 'input:7,input:8,middle', got {type(spec).__name__}")
    if len(spec) > MAX_SPEC_CHARS:
        raise BlockSpecError(
            f"the blocks string has {len(spec)} characters (at most {MAX_SPEC_CHARS}): name blocks with ranges "
            "like input:4-8, or input / output for all of them"
        )
    chosen: list[BlockId] = []
    for raw in spec.split(","):
        item = raw.strip().lower().replace(" ", "")
        if not item:
            continue
        match = _ITEM.match(item)
        if match is None:
            raise BlockSpecError(
                f"cannot read block '{raw.strip()}': write middle, input:N, output:N, a range like input:4-8, "
                "or input / output for all of them, separated by commas"
            )
        name, first, last = match.group(1), match.group(2), match.group(3)
        if name == "middle":
            if first not in (None, "0") or last is not None:
                raise BlockSpecError(f"'{raw.strip()}': the U-Net has one middle block, write 'middle'")
            chosen.append(("middle", 0))
            continue
        if first is None:
            if available is not None:
                chosen.extend(b for b in available if b[0] == name)
            else:
                chosen.append((name, -1))  # "every block of this section", resolved against a model later
            continue
        lo, hi = int(first), int(last if last is not None else first)
        if hi < lo:
            raise BlockSpecError(f"'{raw.strip()}': the range runs backwards")
        if hi > MAX_BLOCK_INDEX:
            raise BlockSpecError(
                f"'{raw.strip()}': block {hi} is past the last block of any U-Net (the highest index is "
                f"{MAX_BLOCK_INDEX}; SD1.x has input:0-11 and output:0-11)"
            )
        chosen.extend((name, i) for i in range(lo, hi + 1))
    if available is not None:
        known = set(available)
        unknown = [b for b in chosen if b not in known]
        if unknown:
            raise BlockSpecError(
                f"{format_blocks(unknown)} {'has' if len(unknown) == 1 else 'have'} no cross-attention in this U-Net; "
                f"blocks with cross-attention: {format_blocks(available)}"
            )
    seen: dict[BlockId, None] = dict.fromkeys(chosen)
    return tuple(b for b in seen if b[1] >= 0 or available is None)


def cross_attention_blocks(unet: nn.Module) -> tuple[BlockId, ...]:
    """Blocks of an SD-style U-Net (``input_blocks``, ``middle_block``, ``output_blocks``, as ComfyUI's
    ``UNetModel``) holding a transformer block with cross-attention (an ``attn2``), in U-Net order."""
    if not all(hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        raise BlockSpecError(
            f"block conditioning works on SD-style U-Nets (SD1.x, SD2, SDXL), not on {type(unet).__name__}"
        )

    def has_cross_attention(module: nn.Module | None) -> bool:
        return module is not None and any(getattr(m, "attn2", None) is not None for m in module.modules())

    blocks: list[BlockId] = [("input", i) for i, m in enumerate(unet.input_blocks) if has_cross_attention(m)]
    if has_cross_attention(unet.middle_block):
        blocks.append(("middle", 0))
    blocks += [("output", i) for i, m in enumerate(unet.output_blocks) if has_cross_attention(m)]
    return tuple(blocks)


def cross_attention_width(unet: nn.Module) -> int | None:
    """The context width the U-Net's cross-attention takes (768 for SD1.x), if it can be read."""
    for module in unet.modules():
        attn2 = getattr(module, "attn2", None)
        to_k = getattr(attn2, "to_k", None)
        if to_k is not None and hasattr(to_k, "in_features"):
            return int(to_k.in_features)
    return None


def repeat_tokens(context: torch.Tensor, length: int) -> torch.Tensor:
    """``context`` [B, T, C] with its tokens repeated to ``length`` (a multiple of T)."""
    tokens = context.shape[1]
    if length % tokens:
        raise ValueError(f"cannot repeat {tokens} tokens to {length}")
    return context if length == tokens else context.repeat(1, length // tokens, 1)


def replace_positive_rows(
    context: torch.Tensor, replacement: torch.Tensor, cond_or_uncond: Sequence[int] | None, rows: int | None = None
) -> torch.Tensor:
    """``context`` [R, T, C] with the rows of its positive chunks (``cond_or_uncond[i] == 0``) replaced
    by ``replacement`` [1 or R/chunks, T', C]; token counts are brought to lcm(T, T') by repetition.

    ``rows`` is the batch of the attention's queries (a context of batch 1 is broadcast to it);
    ``cond_or_uncond=None`` (a caller that does not say) treats every row as positive."""
    rows = context.shape[0] if rows is None else rows
    if context.shape[0] != rows:
        if context.shape[0] != 1:
            raise X2IError(f"context has batch {context.shape[0]} but the attention has {rows} rows")
        context = context.expand(rows, -1, -1)
    if replacement.shape[-1] != context.shape[-1]:
        raise X2IError(
            f"the block conditioning is {replacement.shape[-1]} wide but this cross-attention takes "
            f"{context.shape[-1]}-wide text: encode it with the same CLIP as the sampler's prompt"
        )
    flags = [0] if not cond_or_uncond else list(cond_or_uncond)
    if rows % len(flags):
        raise X2IError(f"{rows} rows do not split into {len(flags)} cond/uncond chunks")
    per_chunk = rows // len(flags)
    if replacement.shape[0] not in (1, per_chunk):
        raise X2IError(
            f"the block conditioning has batch {replacement.shape[0]} but each prompt runs a batch of {per_chunk}: "
            "give one conditioning (it is shared) or one per latent"
        )
    replacement = replacement.to(device=context.device, dtype=context.dtype).expand(per_chunk, -1, -1)
    length = math.lcm(context.shape[1], replacement.shape[1])
    pieces = [
        repeat_tokens(replacement if flag == 0 else context[i * per_chunk : (i + 1) * per_chunk], length)
        for i, flag in enumerate(flags)
    ]
    return torch.cat(pieces, dim=0)


class BlockContextPatch:
    """ComfyUI ``attn2_patch``: in ``blocks``, the positive chunks attend to ``context`` instead.

    Other blocks, the negative chunks, and self-attention are left alone. ``to(device)`` is what
    ComfyUI's ModelPatcher calls on patches when it moves the model.
    """

    def __init__(self, context: torch.Tensor, blocks: Iterable[BlockId]) -> None:
        if context.ndim != 3:
            raise X2IError(f"block conditioning must be [batch, tokens, width], got shape {tuple(context.shape)}")
        self.context = context
        self.blocks = frozenset(blocks)

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra: dict[str, Any]):
        block = extra.get("block")
        if block is None or (block[0], block[1]) not in self.blocks or context is None:
            return n, context, value
        replaced = replace_positive_rows(context, self.context, extra.get("cond_or_uncond"), rows=n.shape[0])
        return n, replaced, replaced

    def to(self, device: torch.device | str) -> BlockContextPatch:
        self.context = self.context.to(device)
        return self

    def __repr__(self) -> str:
        return f"BlockContextPatch({format_blocks(self.blocks) or 'no blocks'}, context {tuple(self.context.shape)})"
