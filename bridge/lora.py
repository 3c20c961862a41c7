"""LaVi-Bridge LoRA files: reading them, naming their layers, checking them, merging them.

The released ``lora_vis.pt`` (vision model) and ``lora_text.pt`` (language model) carry no names: each
is ``torch.save(list)`` of fp16 tensors ``[up_0, down_0, up_1, down_1, ...]``, and pair ``i`` belongs to
the ``i``-th layer of the official traversal (walk ``model.modules()`` in registration pre-order; for
each module whose *class name* is in a target set, take each ``nn.Linear`` / ``nn.Conv2d`` descendant in
``named_modules()`` pre-order). The official loader pops tensors in that order and skips a layer whose
kind does not match the next tensor, so a wrong file desyncs silently. Here the order is rebuilt from
module *names* (no diffusers, no class names: newer class names and quantised layers do not break
it), and every pair's shape is checked against its layer before anything is merged.

The injected layer is ``y = W x + up(down(x))`` with scale 1.0 and no ``alpha / r`` factor: in ComfyUI's
"lora" patch terms ``alpha == rank``. The merged weight is ``W + strength * up.flatten(1) @ down.flatten(1)``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..weights import describe_keys, read_torch_checkpoint
from .errors import LaViBridgeFileError  # one error class for the whole bridge package (adapter, LoRA, ...)

logger = logging.getLogger(__name__)

__all__ = [
    "LaViBridgeFileError", "LoraTarget", "UNetStructure", "SD1_UNET", "SDXL_UNET", "guess_lora_source", "lora_delta",
    "map_lora_pairs", "merged_state", "pixart_lora_targets", "read_lora_pairs", "text_lora_targets",
    "unet_lora_targets",
]

LoraPair = tuple[torch.Tensor, torch.Tensor]
TextFamily = Literal["t5", "llama"]

# The class names the official scripts inject into (train/*.py, test/*.py), kept for reference and tests.
OFFICIAL_UNET_TARGET_CLASSES = frozenset({"ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"})
OFFICIAL_PIXART_TARGET_CLASSES = frozenset({"Attention", "GEGLU"})
OFFICIAL_TEXT_TARGET_CLASSES: dict[str, frozenset[str]] = {
    "t5": frozenset({"T5Attention"}),
    "llama": frozenset({"LlamaAttention"}),
}
RELEASED_RANK = 32

_FIX = "Pick the lora_vis.pt / lora_text.pt of a LaVi-Bridge release (shihaozhao/LaVi-Bridge)."


@dataclass(frozen=True)
class LoraTarget:
    """One layer a LoRA pair patches: its module name and the shapes the pair must have."""

    name: str
    kind: Literal["linear", "conv"]
    in_features: int
    out_features: int
    kernel_size: tuple[int, int] = (1, 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_features, self.in_features)
        return (self.out_features, self.in_features, *self.kernel_size)

    def pair_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(up, down) shapes of a rank-``rank`` pair for this layer, as the official classes store them."""
        if self.kind == "linear":
            return (self.out_features, rank), (rank, self.in_features)
        return (self.out_features, rank, 1, 1), (rank, self.in_features, *self.kernel_size)


# ---------------------------------------------------------------------------------------------------
# Reading


def read_lora_pairs(path: str | Path) -> list[LoraPair]:
    """The ``(up, down)`` pairs of a released ``lora_*.pt`` (read with ``weights_only``), or
    :class:`LaViBridgeFileError` saying what the file looks like instead."""
    path = Path(path)
    obj = read_torch_checkpoint(path, LaViBridgeFileError, _FIX)
    source = path.name
    if isinstance(obj, Mapping):
        raise LaViBridgeFileError(f"{source} is a dict, not a LaVi-Bridge LoRA list: {_describe_mapping(obj)}. {_FIX}")
    if not isinstance(obj, (list, tuple)):
        raise LaViBridgeFileError(
            f"{source} holds a {type(obj).__name__}, not the list [up_0, down_0, up_1, down_1, ...] a LaVi-Bridge "
            f"LoRA is saved as. {_FIX}"
        )
    bad = [i for i, t in enumerate(obj) if not isinstance(t, torch.Tensor)]
    if bad:
        raise LaViBridgeFileError(
            f"{source}: item {bad[0]} of the list is a {type(obj[bad[0]]).__name__}, not a tensor "
            f"({len(bad)} of {len(obj)} items are not tensors); a LaVi-Bridge LoRA is a list of tensors only. {_FIX}"
        )
    if not obj:
        raise LaViBridgeFileError(f"{source} is an empty list: it holds no LoRA pairs. {_FIX}")
    if len(obj) % 2:
        raise LaViBridgeFileError(
            f"{source} has {len(obj)} tensors, an odd number: a LaVi-Bridge LoRA alternates up and down tensors, "
            f"so the file is truncated or not a LaVi-Bridge LoRA. {_FIX}"
        )
    pairs = [(obj[i], obj[i + 1]) for i in range(0, len(obj), 2)]
    logger.debug("%s: %d LoRA pairs (%s)", source, len(pairs), guess_lora_source(pairs))
    return pairs


def _describe_mapping(obj: Mapping) -> str:
    keys = [str(k) for k in obj]
    what = "an unknown dict"
    if any(k.startswith(("blocks.", "tail.", "in_blocks.", "trans.")) for k in keys):
        what = "a GlueGen GlueNet state_dict (load it with the GlueNet loader)"
    elif any("lora_down" in k or "lora_A" in k or "lora_unet_" in k or "lora.down" in k for k in keys):
        what = "a named (state_dict) LoRA such as kohya/diffusers/PEFT save, not LaVi-Bridge's positional list"
    elif any(k.startswith(("norm1.", "ff1.", "ff2.")) for k in keys):
        what = "a LaVi-Bridge TextAdapter state_dict (the adapter/ folder), not a LoRA"
    elif any(k in ("state_dict", "model", "module", "optimizer") for k in keys):
        what = "a training checkpoint"
    return f"{what}; {describe_keys(keys)}"


# ---------------------------------------------------------------------------------------------------
# Target lists, in the official positional order


Depth = int | tuple[int, ...]  # one block's transformer depth: the same for every layer, or one per layer


def _tuples(value: object) -> object:
    """JSON lists (nested too) as tuples, so a config read from a file compares and hashes like one written here."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _per_layer(depth: Depth, count: int) -> tuple[int, ...]:
    return tuple(depth) if isinstance(depth, tuple) else (depth,) * count


@dataclass(frozen=True)
class UNetStructure:
    """What decides an SD-style ``UNet2DConditionModel``'s LoRA layers (diffusers ``config.json`` fields).

    Defaults are SD1.x (v1.4 / v1.5, the U-Net LaVi-Bridge was trained on). ``transformer_layers_per_block`` is one
    number, or one per down block, each a number or one per layer of the block (diffusers' forms; SDXL: 1, 2, 10).
    Up blocks take them reversed, as diffusers builds them, unless ``reverse_transformer_layers_per_block`` gives
    theirs (one per up block, each a number or one per layer: diffusers' field for asymmetric U-Nets such as
    SSD-1B). The mid block takes the last down block's depth unless ``mid_transformer_layers`` says otherwise
    (SDXL-family models ComfyUI loads, whose middle depth can differ); -1 there is ComfyUI's middle block of one
    resnet and no attention (SSD-1B, Segmind-Vega). ``mid_block_type`` None: no mid block (KOALA-700M).
    """

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[Depth, ...] = 1
    mid_transformer_layers: int | None = None
    reverse_transformer_layers_per_block: tuple[Depth, ...] | None = None

    _DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
    _UP = ("CrossAttnUpBlock2D", "UpBlock2D")
    _MID = ("UNetMidBlock2DCrossAttn", None)

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> UNetStructure:
        """From a diffusers U-Net ``config.json`` dict; missing fields keep their diffusers defaults."""
        known = {
            "block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "mid_block_type",
            "cross_attention_dim", "transformer_layers_per_block", "reverse_transformer_layers_per_block",
        }
        kwargs = {k: _tuples(v) for k, v in config.items() if k in known and v is not None}
        if "mid_block_type" in config and config["mid_block_type"] is None:  # diffusers' U-Net without a mid block
            kwargs["mid_block_type"] = None
        for key in ("layers_per_block", "cross_attention_dim"):
            if not isinstance(kwargs.get(key, 1), int):
                raise LaViBridgeFileError(
                    f"U-Net config: per-block '{key}' ({kwargs[key]!r}) is not supported (one int per field): use the "
                    "U-Net's own config.json"
                )
        return cls(**kwargs)

    @classmethod
    def from_comfy_config(cls, unet_config: Mapping[str, object]) -> UNetStructure:
        """The structure of a U-Net as ComfyUI detected it (``model.model.model_config.unet_config`` of an SD-style
        ``UNetModel``, the form of ``comfy/model_detection.py``), in diffusers' terms: its targets are the diffusers
        module names that ``comfy.utils.unet_to_diffusers`` maps onto that model's weights.

        ``model_channels`` x ``channel_mult`` -> ``block_out_channels``; ``num_res_blocks`` (the same at every level)
        -> ``layers_per_block``; ``transformer_depth`` (one per input resnet) -> each down block's depth, a block
        without transformers being a ``DownBlock2D``; ``transformer_depth_output`` (one per output resnet, which
        ComfyUI's output blocks take from the end) -> the up blocks'; ``transformer_depth_middle`` ->
        ``mid_transformer_layers`` (-2: no mid block); ``context_dim`` -> ``cross_attention_dim``. Depths are
        written in their shortest form, so SD1.5's config gives :data:`SD1_UNET` and SDXL base's :data:`SDXL_UNET`.
        Pure data: no ComfyUI import.
        """
        where = "this MODEL's U-Net config (ComfyUI's unet_config)"
        missing = [key for key in ("model_channels", "channel_mult", "num_res_blocks", "transformer_depth",
                                   "transformer_depth_output", "transformer_depth_middle", "context_dim")
                   if unet_config.get(key) is None]
        if missing:
            raise LaViBridgeFileError(
                f"{where} has no {', '.join(missing)}: it is not an SD-style U-Net with cross-attention (SD1.x, SDXL), "
                "which LaVi-Bridge's U-Net LoRA is for"
            )
        for key in ("disable_self_attentions", "num_attention_blocks"):
            value = unet_config.get(key)
            if value is not None and (key == "num_attention_blocks" or any(value)):
                raise LaViBridgeFileError(f"{where}: {key} = {value!r} is not supported; LaVi-Bridge LoRA targets "
                                          "assume every transformer has its self-attention (SD1.x, SDXL)")
        try:
            mult = [int(m) for m in unet_config["channel_mult"]]
            channels = tuple(int(unet_config["model_channels"]) * m for m in mult)
            levels = len(mult)
            res = unet_config["num_res_blocks"]
            res = [int(res)] * levels if isinstance(res, int) else [int(r) for r in res]
            depth_in, depth_out = (unet_config[key] for key in ("transformer_depth", "transformer_depth_output"))
            depth_in = [int(depth_in)] * sum(res) if isinstance(depth_in, int) else [int(d) for d in depth_in]
            depth_out = [int(depth_out)] * (sum(res) + levels) if isinstance(depth_out, int) else [int(d) for d in depth_out]
            middle, context = int(unet_config["transformer_depth_middle"]), unet_config["context_dim"]
        except (TypeError, ValueError) as exc:
            raise LaViBridgeFileError(f"{where} is not in ComfyUI's U-Net form ({exc})") from None
        if len(res) != levels or len(set(res)) != 1:
            raise LaViBridgeFileError(
                f"{where}: num_res_blocks {res} for {levels} levels; LaVi-Bridge LoRA targets need the same number of "
                "resnets in every down block (one layers_per_block, as diffusers' SD1.x and SDXL U-Nets)"
            )
        layers = res[0]
        if len(depth_in) != levels * layers or len(depth_out) != levels * (layers + 1):
            raise LaViBridgeFileError(
                f"{where}: {len(depth_in)} input and {len(depth_out)} output transformer depths for {levels} levels of "
                f"{layers} resnets (expected {levels * layers} and {levels * (layers + 1)})"
            )
        if not isinstance(context, int) or isinstance(context, bool):
            raise LaViBridgeFileError(f"{where}: context_dim {context!r} is not one width; LaVi-Bridge needs cross-attention")
        if middle < -2:
            raise LaViBridgeFileError(f"{where}: transformer_depth_middle {middle} is not ComfyUI's (-2, -1 or a depth)")
        down = [tuple(depth_in[i * layers:(i + 1) * layers]) for i in range(levels)]
        from_end = depth_out[::-1]  # ComfyUI's output blocks pop their depth from the end of the list
        up = [tuple(from_end[i * (layers + 1):(i + 1) * (layers + 1)]) for i in range(levels)]
        down_types = tuple("CrossAttnDownBlock2D" if any(d) else "DownBlock2D" for d in down)
        up_types = tuple("CrossAttnUpBlock2D" if any(d) else "UpBlock2D" for d in up)
        # A block without transformers has no depth that matters; give it the others' common one (diffusers'
        # default 1 when they differ), so the depths collapse to one number wherever they can.
        crossed = {d for block in down + up if any(block) for d in block}
        filler = crossed.pop() if len(crossed) == 1 else 1

        def short(block: tuple[int, ...]) -> Depth:
            return (block[0] if len(set(block)) == 1 else block) if any(block) else filler

        per_down = tuple(short(d) for d in down)
        structure = cls(
            block_out_channels=channels, layers_per_block=layers, down_block_types=down_types, up_block_types=up_types,
            mid_block_type=None if middle == -2 else "UNetMidBlock2DCrossAttn", cross_attention_dim=context,
            transformer_layers_per_block=per_down[0] if len(set(per_down)) == 1 else per_down,
        )
        if any(isinstance(d, tuple) for d in per_down) or structure._effective_up() != tuple(
                block if any(block) else (0,) * (layers + 1) for block in up):
            structure = replace(structure, reverse_transformer_layers_per_block=tuple(short(u) for u in up))
        if middle != -2 and middle != structure.layer_depths()[2]:
            structure = replace(structure, mid_transformer_layers=middle)
        return structure

    def layer_depths(self) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...], int]:
        """Transformer depth of every layer of each down block, of each up block, and the mid block's (-1: one
        resnet, no attention)."""
        n, layers = len(self.block_out_channels), self.layers_per_block
        per_block = self.transformer_layers_per_block
        down = per_block if isinstance(per_block, tuple) else (per_block,) * n
        up = self.reverse_transformer_layers_per_block or tuple(reversed(down))
        mid = self.mid_transformer_layers
        if mid is None:
            mid = _per_layer(down[-1], layers)[0]
        return tuple(_per_layer(d, layers) for d in down), tuple(_per_layer(d, layers + 1) for d in up), mid

    def depths(self) -> tuple[tuple[Depth, ...], tuple[Depth, ...], int]:
        """Transformer depth of each down block, each up block (a number, or one per layer), and the mid block."""
        per_block = self.transformer_layers_per_block
        down = per_block if isinstance(per_block, tuple) else (per_block,) * len(self.block_out_channels)
        return down, self.reverse_transformer_layers_per_block or tuple(reversed(down)), self.layer_depths()[2]

    def _effective_up(self) -> tuple[tuple[int, ...], ...]:
        """Each up block's per-layer depths, zero in a block without attention."""
        return tuple(depths if kind == "CrossAttnUpBlock2D" else (0,) * len(depths)
                     for kind, depths in zip(self.up_block_types, self.layer_depths()[1], strict=True))

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise LaViBridgeFileError(
                f"U-Net config: {n} block_out_channels but {len(self.down_block_types)} down and "
                f"{len(self.up_block_types)} up block types; they must agree. Use the model's own config.json."
            )
        unknown = [t for t in self.down_block_types if t not in self._DOWN] + [
            t for t in self.up_block_types if t not in self._UP
        ]
        if unknown or self.mid_block_type not in self._MID:
            raise LaViBridgeFileError(
                f"U-Net config: block types {unknown or [self.mid_block_type]} are not supported; only the SD1.x/SD2/SDXL "
                f"blocks {self._DOWN + self._UP + ('UNetMidBlock2DCrossAttn',)} are. Use an SD1.x or SDXL U-Net."
            )
        per_block, reverse = self.transformer_layers_per_block, self.reverse_transformer_layers_per_block
        for field_name, blocks, layers in (("transformer_layers_per_block", per_block, self.layers_per_block),
                                           ("reverse_transformer_layers_per_block", reverse, self.layers_per_block + 1)):
            if blocks is None or isinstance(blocks, int):
                continue
            if len(blocks) != n:
                raise LaViBridgeFileError(f"U-Net config: {len(blocks)} {field_name} for {n} blocks; use the model's own config.json")
            wrong = [b for b in blocks if isinstance(b, tuple) and len(b) != layers]
            if wrong:
                raise LaViBridgeFileError(f"U-Net config: {field_name} {wrong[0]!r} for blocks of {layers} layers; "
                                          "use the model's own config.json")
        if isinstance(per_block, tuple) and reverse is None and any(isinstance(b, tuple) for b in per_block):
            raise LaViBridgeFileError("U-Net config: per-layer transformer_layers_per_block needs "
                                      "reverse_transformer_layers_per_block (as diffusers asks); use the model's own config.json")
        depths = [d for blocks in self.layer_depths()[:2] for block in blocks for d in block]
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in depths) or self.layer_depths()[2] < -1:
            raise LaViBridgeFileError(f"U-Net config: transformer depths must be whole numbers from 0 (mid block: from -1), "
                                      f"got {self.transformer_layers_per_block!r}, {reverse!r}, {self.mid_transformer_layers!r}")

SD1_UNET = UNetStructure()
# SDXL base 1.0's U-Net (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json).
SDXL_UNET = UNetStructure(
    block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
)


def _transformer_targets(prefix: str, dim: int, context_dim: int, depth: int) -> list[LoraTarget]:
    # BasicTransformerBlock registers attn1 before attn2 before ff; Attention registers to_q, to_k, to_v,
    # to_out (to_out.0 Linear); FeedForward.net.0 is GEGLU whose proj doubles the 4x inner width.
    out: list[LoraTarget] = []
    for t in range(depth):
        block = f"{prefix}.transformer_blocks.{t}"
        for attn, kv_dim in (("attn1", dim), ("attn2", context_dim)):
            out += [
                LoraTarget(f"{block}.{attn}.to_q", "linear", dim, dim),
                LoraTarget(f"{block}.{attn}.to_k", "linear", kv_dim, dim),
                LoraTarget(f"{block}.{attn}.to_v", "linear", kv_dim, dim),
                LoraTarget(f"{block}.{attn}.to_out.0", "linear", dim, dim),
            ]
        out.append(LoraTarget(f"{block}.ff.net.0.proj", "linear", dim, 8 * dim))
    return out


def _resnet_targets(prefix: str, in_ch: int, out_ch: int, temb_dim: int) -> list[LoraTarget]:
    # ResnetBlock2D registers conv1, time_emb_proj, conv2, then conv_shortcut (1x1, only when the width changes).
    out = [
        LoraTarget(f"{prefix}.conv1", "conv", in_ch, out_ch, (3, 3)),
        LoraTarget(f"{prefix}.time_emb_proj", "linear", temb_dim, out_ch),
        LoraTarget(f"{prefix}.conv2", "conv", out_ch, out_ch, (3, 3)),
    ]
    if in_ch != out_ch:
        out.append(LoraTarget(f"{prefix}.conv_shortcut", "conv", in_ch, out_ch, (1, 1)))
    return out


def unet_lora_targets(unet_config: UNetStructure | Mapping[str, object] = SD1_UNET) -> list[LoraTarget]:
    """The layers of ``lora_vis.pt`` for a U-Net, in the official order, with diffusers names.

    ``UNet2DConditionModel`` registers ``conv_in, time_proj, time_embedding, down_blocks, up_blocks,
    mid_block``: the mid block comes *last*. Inside each block ``attentions`` precede ``resnets``.
    SD1.x gives 224 layers (166 Linear, 58 Conv).
    """
    cfg = unet_config if isinstance(unet_config, UNetStructure) else UNetStructure.from_config(unet_config)
    channels = cfg.block_out_channels
    temb = 4 * channels[0]
    ctx, layers = cfg.cross_attention_dim, cfg.layers_per_block
    down_depths, up_depths, mid_depth = cfg.layer_depths()
    targets: list[LoraTarget] = []

    skip_channels = [channels[0]]  # conv_in's output, then every down resnet / downsampler output
    out_ch = channels[0]
    for i, block_type in enumerate(cfg.down_block_types):
        in_ch, out_ch = out_ch, channels[i]
        prefix = f"down_blocks.{i}"
        if block_type == "CrossAttnDownBlock2D":
            for j in range(layers):
                targets += _transformer_targets(f"{prefix}.attentions.{j}", out_ch, ctx, down_depths[i][j])
        for j in range(layers):
            targets += _resnet_targets(f"{prefix}.resnets.{j}", in_ch if j == 0 else out_ch, out_ch, temb)
            skip_channels.append(out_ch)
        if i < len(channels) - 1:  # the downsampler's conv is outside every target class
            skip_channels.append(out_ch)

    reversed_channels = list(reversed(channels))
    prev_out = reversed_channels[0]
    for i, block_type in enumerate(cfg.up_block_types):
        out_ch = reversed_channels[i]
        prefix = f"up_blocks.{i}"
        if block_type == "CrossAttnUpBlock2D":
            for j in range(layers + 1):
                targets += _transformer_targets(f"{prefix}.attentions.{j}", out_ch, ctx, up_depths[i][j])
        for j in range(layers + 1):
            skip = skip_channels.pop()
            in_ch = prev_out if j == 0 else out_ch
            targets += _resnet_targets(f"{prefix}.resnets.{j}", in_ch + skip, out_ch, temb)
        prev_out = out_ch

    if cfg.mid_block_type is None:
        return targets
    mid = channels[-1]
    if mid_depth >= 0:
        targets += _transformer_targets("mid_block.attentions.0", mid, ctx, mid_depth)
    for j in range(2 if mid_depth >= 0 else 1):  # -1: ComfyUI's middle block of one resnet
        targets += _resnet_targets(f"mid_block.resnets.{j}", mid, mid, temb)
    return targets


def pixart_lora_targets(num_layers: int = 28, inner_dim: int = 1152) -> list[LoraTarget]:
    """The layers of a PixArt ``lora_vis.pt``: attn1 then attn2 ``to_q, to_k, to_v, to_out.0`` of each
    block (PixArt-XL-2: 28 blocks, 1152 wide, cross-attention already projected to 1152; its MLP uses
    tanh-GELU, so the official ``GEGLU`` target matches nothing)."""
    return [
        LoraTarget(f"transformer_blocks.{i}.{attn}.{leaf}", "linear", inner_dim, inner_dim)
        for i in range(num_layers)
        for attn in ("attn1", "attn2")
        for leaf in ("to_q", "to_k", "to_v", "to_out.0")
    ]


# Name patterns of the official text targets. Names, not classes: transformers renames attention classes
# (LlamaSdpaAttention, ...) and quantised layers are not nn.Linear, but the module names are stable.
_TEXT_PATTERNS: dict[str, tuple[re.Pattern[str], tuple[str, ...]]] = {
    "t5": (re.compile(r"^(?P<prefix>(?:.*\.)?)block\.(?P<i>\d+)\.layer\.0\.SelfAttention\.(?P<leaf>[qkvo])$"),
           ("q", "k", "v", "o")),
    "llama": (re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<i>\d+)\.self_attn\.(?P<leaf>[qkvo]_proj)$"),
              ("q_proj", "k_proj", "v_proj", "o_proj")),
}


def _features(module: nn.Module) -> tuple[int, int]:
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[1]), int(weight.shape[0])
    raise LaViBridgeFileError(f"text encoder layer of type {type(module).__name__} has no 2-D weight to patch.")


def text_lora_targets(model: nn.Module, family: TextFamily) -> list[LoraTarget]:
    """The layers of ``lora_text.pt`` for a loaded transformers model, in the official order.

    - ``"t5"``: ``block.{i}.layer.0.SelfAttention.{q,k,v,o}`` of the *encoder* only (the release used
      ``T5EncoderModel``; a full ``T5Model``'s ``decoder.`` layers are left out).
    - ``"llama"``: ``layers.{i}.self_attn.{q,k,v,o}_proj``.

    Names are exactly as ``model.named_modules()`` gives them, whatever the prefix: ``encoder.block...``
    for ``T5EncoderModel`` / ``T5Model``, ``block...`` for a bare ``T5Stack``, ``model.layers...`` for
    ``LlamaForCausalLM``, ``layers...`` for ``LlamaModel``; so they key that model's own ``state_dict``.
    """
    if family not in _TEXT_PATTERNS:
        raise ValueError(f"unknown text family {family!r}; LaVi-Bridge text LoRAs exist for {sorted(_TEXT_PATTERNS)}")
    pattern, leaves = _TEXT_PATTERNS[family]
    found: dict[tuple[int, int], tuple[str, nn.Module]] = {}
    prefixes: set[str] = set()
    for name, module in model.named_modules():
        m = pattern.match(name)
        if not m or m.group("prefix").startswith("decoder.") or ".decoder." in m.group("prefix"):
            continue
        prefixes.add(m.group("prefix"))
        found[(int(m.group("i")), leaves.index(m.group("leaf")))] = (name, module)
    if not found:
        raise LaViBridgeFileError(
            f"{type(model).__name__} has no {family} attention layers named like "
            f"'{pattern.pattern}'; pass the {'T5 encoder' if family == 't5' else 'Llama model'} this LoRA was made for."
        )
    if len(prefixes) > 1:
        raise LaViBridgeFileError(f"{type(model).__name__} holds several {family} stacks ({sorted(prefixes)}); pass one.")
    num_layers = max(i for i, _ in found) + 1
    missing = [(i, leaves[j]) for i in range(num_layers) for j in range(len(leaves)) if (i, j) not in found]
    if missing:
        raise LaViBridgeFileError(f"{type(model).__name__}: attention layers missing, e.g. layer {missing[0]}.")
    targets = []
    for key in sorted(found):
        name, module = found[key]
        in_f, out_f = _features(module)
        targets.append(LoraTarget(name, "linear", in_f, out_f))
    return targets


# ---------------------------------------------------------------------------------------------------
# Checking and mapping


def guess_lora_source(pairs: Sequence[LoraPair]) -> str:
    """A human guess of what a positional LoRA list was trained for, from its count and shapes."""
    if not pairs:
        return "an empty list"
    n = len(pairs)
    up0, down0 = pairs[0]
    width = up0.shape[0]
    convs = sum(1 for up, _ in pairs if up.dim() == 4)
    if convs and n > 5:
        ctx = pairs[5][1].shape[-1] if pairs[5][1].dim() == 2 else None
        kind = {768: "SD1.x", 1024: "SD2.x"}.get(ctx, "an unknown")
        return f"a U-Net lora_vis.pt ({n} pairs, {convs} conv) for a {ctx}-wide context ({kind} U-Net)"
    if n == 224 and width == 1152:
        return "a PixArt-XL-2 lora_vis.pt (224 Linear pairs, 1152 wide)"
    if width == 1024 and n % 4 == 0:
        return f"a T5 lora_text.pt for {n // 4} layers, 1024 wide (T5-Large encoder)"
    if width == 4096 and n % 4 == 0:
        return f"a Llama lora_text.pt for {n // 4} layers, 4096 wide (Llama-2-7B)"
    return f"{n} pairs, first up {list(up0.shape)} / down {list(down0.shape)}"


def _misfit(i: int, pair: LoraPair, target: LoraTarget, rank: int) -> str | None:
    """Why pair ``i`` cannot patch ``target``, or ``None`` when its shapes fit."""
    up, down = pair
    want_up, want_down = target.pair_shapes(rank)
    if tuple(up.shape) == want_up and tuple(down.shape) == want_down:
        return None
    which, found, want = ("up", up, want_up) if tuple(up.shape) != want_up else ("down", down, want_down)
    return (
        f"pair {i} (0-based; list items {2 * i}, {2 * i + 1}) does not fit layer {target.name} "
        f"({target.kind} {list(target.weight_shape)}): expected {which} {list(want)}, found {list(found.shape)} "
        f"(up {list(up.shape)}, down {list(down.shape)}, rank {rank})"
    )


def map_lora_pairs(
    pairs: Sequence[LoraPair], targets: Sequence[LoraTarget], source: str = "LoRA file"
) -> dict[str, LoraPair]:
    """``{module name: (up, down)}`` after checking the count and every shape (one rank for all pairs).

    Fails on the first misfit with its index, layer, expected and found shapes, and a guess of what the
    file was trained for; a count mismatch also names the first index where the positions stop fitting.
    """
    guess = guess_lora_source(pairs)
    rank = int(pairs[0][1].shape[0]) if pairs and pairs[0][1].dim() else 0
    # strict=False on purpose: with a count mismatch, the first positional misfit still helps the user.
    misfits = (_misfit(i, pair, target, rank) for i, (pair, target) in enumerate(zip(pairs, targets, strict=False)))
    first = next((why for why in misfits if why), None)
    if len(pairs) != len(targets):
        raise LaViBridgeFileError(
            f"{source} has {len(pairs)} LoRA pairs but the model has {len(targets)} LoRA layers "
            f"(first {targets[0].name if targets else '-'}, last {targets[-1].name if targets else '-'})"
            f"{'; by position, ' + first if first else ''}. It looks like {guess}. Pick the file trained for this "
            "model (lora_vis.pt for the diffusion model, lora_text.pt for the language model) of the same release."
        )
    if first:
        raise LaViBridgeFileError(
            f"{source}: {first}. The file has {len(pairs)} pairs and looks like {guess}; it was not trained for "
            "this model, or a pair is missing before this one. Pick the matching LaVi-Bridge release."
        )
    mapped = {target.name: pair for pair, target in zip(pairs, targets, strict=True)}
    logger.debug("%s: %d LoRA pairs of rank %d mapped", source, len(mapped), rank)
    return mapped


# ---------------------------------------------------------------------------------------------------
# Merging


def lora_delta(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``up.flatten(1) @ down.flatten(1)`` in fp32, shaped like the layer's weight (scale 1.0, no alpha/r).

    For a conv pair (down: the layer's kernel, up: 1x1) this is exactly the kernel of ``up(down(x))``.
    """
    delta = up.flatten(1).float() @ down.flatten(1).float()
    if down.dim() == 4:
        return delta.reshape(up.shape[0], *down.shape[1:])
    return delta


def merged_state(
    base_weights: Mapping[str, torch.Tensor], mapped: Mapping[str, LoraPair], strength: float = 1.0
) -> dict[str, torch.Tensor]:
    """``{"<module>.weight": W + strength * delta}`` for every mapped layer, in each base weight's dtype
    and device (computed in fp32). ``base_weights`` is a ``state_dict`` (keys ``<module>.weight``) whose
    module names are those of the targets; the result loads with ``load_state_dict(strict=False)``."""
    out: dict[str, torch.Tensor] = {}
    for name, (up, down) in mapped.items():
        key = f"{name}.weight"
        if key not in base_weights:
            raise LaViBridgeFileError(
                f"the model has no weight '{key}' for LoRA layer {name}; the LoRA names are diffusers/transformers "
                "module names, so pass that model's state_dict (convert ComfyUI/LDM keys first)."
            )
        weight = base_weights[key]
        delta = lora_delta(up.to(weight.device), down.to(weight.device))
        if tuple(delta.shape) != tuple(weight.shape):
            raise LaViBridgeFileError(
                f"LoRA layer {name}: delta {list(delta.shape)} does not match the weight {list(weight.shape)}; "
                "the LoRA was mapped against a different model."
            )
        out[key] = (weight.float() + strength * delta).to(weight.dtype)
    return out


def named_lora_state_dict(mapped: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mapped pairs in the common named LoRA layout: ``<module>.lora_up.weight``, ``<module>.lora_down.weight``
    and ``<module>.alpha`` = rank, so loaders that scale by alpha / rank (ComfyUI's among them) apply
    LaVi-Bridge's unscaled ``up @ down``."""
    state: dict[str, torch.Tensor] = {}
    for name, (up, down) in mapped.items():
        state[f"{name}.lora_up.weight"] = up
        state[f"{name}.lora_down.weight"] = down
        state[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return state
