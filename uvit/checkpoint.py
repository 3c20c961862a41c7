"""Reading and writing U-ViT checkpoints.

Three layouts load, each into the same network with identical outputs:

- **this pack's format** (``x2i``): safetensors with the :class:`UViTConfig` (and the
  :class:`SamplingConvention`) as JSON metadata; keys are the network's own names;
- **the intermediate-fusion authors' code** (``fork``, zizhao-hu/U-ViT ``libs/uvit_t2i.py`` and
  ``libs/uvit_t2i_cross.py``): the same key names (``image_blocks``, ``caption_blocks``,
  ``joint_blocks``, ``mid_block``, ``joint_skip_blocks``, ``image_skip_blocks``), tokens in
  [image, time, text] order;
- **the original U-ViT text-to-image model** (``uvit``, baofff/U-ViT ``libs/uvit_t2i.py``, e.g. the
  released ``mscoco_uvit_small.pth``): ``in_blocks``/``mid_block``/``out_blocks``, tokens in
  [time, text, image] order. It is concat-early fusion; the blocks map one to one and the position
  embedding is permuted into [image, time, text] (self-attention, LayerNorm and MLP treat tokens
  independently of their order, so the outputs are the same).

Upstream files are plain state dicts saved with ``torch.save`` (``nnet.pth``, ``nnet_ema.pth``); they
are read with ``torch.load(weights_only=True)``. The architecture (concat/cross, early/intermediate,
``n_image``/``n_text``, depth, width, patch, channels, MLP ratio, bias, time MLP, final conv) is read
from their keys and shapes. Two things shapes cannot tell are assumed as in every released U-ViT:
64-wide attention heads (``heads = width // 64``) and 77 text tokens; pass ``heads``/``text_tokens``
to override.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import X2IError
from ..weights import (
    TORCH_PICKLE_SUFFIXES,
    describe_keys,
    read_torch_checkpoint,
    save_safetensors_atomic,
    state_dict_mismatch,
    unwrap_state_dict,
)
from .config import SamplingConvention, UViTConfig, UViTConfigError
from .model import UViT

logger = logging.getLogger(__name__)

FORMAT_NAME = "x2i.uvit"
FORMAT_VERSION = "1"
SUFFIXES = (".safetensors", *TORCH_PICKLE_SUFFIXES)

LAYOUT_PACK = "x2i"
LAYOUT_FORK = "fork"
LAYOUT_UVIT = "uvit"
LAYOUTS = {
    LAYOUT_PACK: "this pack's U-ViT safetensors",
    LAYOUT_FORK: "intermediate-fusion U-ViT (zizhao-hu/U-ViT uvit_t2i / uvit_t2i_cross), tokens [image, time, text]",
    LAYOUT_UVIT: "U-ViT text-to-image (baofff/U-ViT uvit_t2i), tokens [time, text, image]",
}
DEFAULT_HEAD_DIM = 64
DEFAULT_TEXT_TOKENS = 77
# Prefixes a state dict may carry: DDP's (``unwrap_state_dict``) and ComfyUI's saved-model prefix.
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_FORK_LISTS = ("image_blocks", "caption_blocks", "joint_blocks", "joint_skip_blocks", "image_skip_blocks")
_EXPECTED = (
    "expected a text-to-image U-ViT: 'patch_embed.proj.weight', 'context_embed.weight', 'pos_embed', "
    "'mid_block.attn.qkv.weight' (or '.attn.q.weight'/'.attn.kv.weight' for cross-attention), and "
    "'in_blocks.N.*'/'out_blocks.N.*' (U-ViT uvit_t2i) or 'joint_blocks.N.*'/'joint_skip_blocks.N.*' "
    "(intermediate-fusion uvit_t2i / uvit_t2i_cross)"
)


class UViTFileError(X2IError):
    """A file or state dict that cannot be used as a U-ViT; the message names the problem and the fix."""


@dataclass(frozen=True)
class LoadedUViT:
    """A checkpoint read into this pack's key layout, before any network is built."""

    config: UViTConfig
    state_dict: dict[str, torch.Tensor]
    layout: str  # where it came from: "x2i", "fork" or "uvit"
    sampling: SamplingConvention


# --- detection -----------------------------------------------------------------------------------


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = unwrap_state_dict(state_dict)
    if not isinstance(sd, Mapping):
        raise UViTFileError(f"a U-ViT checkpoint must be a state dict, got {type(sd).__name__}")
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def _count(keys: set[str], name: str) -> int:
    pattern = re.compile(rf"^{re.escape(name)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _shape(sd: Mapping[str, torch.Tensor], key: str, source: str = "checkpoint") -> tuple[int, ...]:
    if key not in sd:
        raise UViTFileError(f"{source} is missing '{key}'; {_EXPECTED}")
    return tuple(sd[key].shape)


def detect_layout(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> str:
    """``"uvit"`` (in_blocks/out_blocks) or ``"fork"`` (this pack's and the authors' names)."""
    keys = set(state_dict)
    has_uvit = any(k.startswith(("in_blocks.", "out_blocks.")) for k in keys)
    has_fork = any(k.startswith(tuple(f"{n}." for n in _FORK_LISTS)) for k in keys)
    if has_uvit and has_fork:
        raise UViTFileError(f"{source} mixes U-ViT's in_blocks/out_blocks with the fork's joint_blocks; {_EXPECTED}")
    core = {"patch_embed.proj.weight", "pos_embed"} <= keys and any(k.startswith("mid_block.") for k in keys)
    if not core:
        if any(k.startswith(("input_blocks.", "model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
            hint = "a Stable Diffusion U-Net or checkpoint (load it with Load Checkpoint), not a U-ViT"
        else:
            hint = "not a U-ViT"
        raise UViTFileError(f"{source} is {hint}: found {describe_keys(sorted(keys))}; {_EXPECTED}")
    if "context_embed.weight" not in keys:
        if "label_emb.weight" in keys or not (has_uvit or has_fork):
            raise UViTFileError(
                f"{source} is a class-conditional or unconditional U-ViT (libs/uvit.py: no 'context_embed' for text); "
                "only text-to-image U-ViTs load here"
            )
        raise UViTFileError(f"{source} is missing 'context_embed.weight' (the text projection); {_EXPECTED}")
    return LAYOUT_UVIT if has_uvit else LAYOUT_FORK


def detect_config(
    state_dict: Mapping[str, torch.Tensor],
    *,
    heads: int | None = None,
    text_tokens: int | None = None,
    source: str = "checkpoint",
) -> tuple[UViTConfig, str]:
    """The :class:`UViTConfig` and layout of an upstream-format state dict, from its keys and shapes."""
    sd = state_dict
    layout = detect_layout(sd, source)
    keys = set(sd)
    width, in_channels, patch, patch_w = _shape(sd, "patch_embed.proj.weight", source)
    if patch != patch_w:
        raise UViTFileError(f"{source}: non-square patch embedding {patch}×{patch_w} is not a U-ViT")
    context_dim = _shape(sd, "context_embed.weight", source)[1]

    if "mid_block.attn.qkv.weight" in keys:
        conditioning = "concat"
    elif "mid_block.attn.q.weight" in keys and "mid_block.attn.kv.weight" in keys:
        conditioning = "cross"
    else:
        raise UViTFileError(f"{source}: mid_block has neither 'attn.qkv' (concat) nor 'attn.q' + 'attn.kv' (cross) weights; {_EXPECTED}")
    if layout == LAYOUT_UVIT:
        if conditioning != "concat":
            raise UViTFileError(f"{source}: U-ViT's in_blocks/out_blocks layout only exists with concatenated text (attn.qkv)")
        n_in, n_out = _count(keys, "in_blocks"), _count(keys, "out_blocks")
        if n_in != n_out:
            raise UViTFileError(f"{source}: {n_in} in_blocks but {n_out} out_blocks; a U-ViT has as many of each")
        n_image, n_text, n_joint = 0, 0, n_in
    else:
        n_image, n_text, n_joint = _count(keys, "image_blocks"), _count(keys, "caption_blocks"), _count(keys, "joint_blocks")
        for first, second in (("image_blocks", "image_skip_blocks"), ("joint_blocks", "joint_skip_blocks")):
            a, b = _count(keys, first), _count(keys, second)
            if a != b:
                raise UViTFileError(f"{source}: {a} {first} but {b} {second}; each in-block needs its skip block")

    mlp_hidden = _shape(sd, "mid_block.mlp.fc1.weight", source)[0]
    qkv_bias = any(k.startswith("mid_block.attn.") and k.endswith(("qkv.bias", ".q.bias", "kv.bias")) for k in keys)
    if heads is None:
        if width % DEFAULT_HEAD_DIM:
            raise UViTFileError(
                f"{source}: width {width} is not a multiple of U-ViT's 64-wide heads, and the head count cannot be "
                "read from the weights; give the number of heads"
            )
        heads = width // DEFAULT_HEAD_DIM
    tokens = _shape(sd, "pos_embed", source)
    if len(tokens) != 3 or tokens[0] != 1 or tokens[2] != width:
        raise UViTFileError(f"{source}: pos_embed has shape {tokens}, expected [1, tokens, {width}]")
    text_tokens = DEFAULT_TEXT_TOKENS if text_tokens is None else text_tokens
    num_patches = tokens[1] - 1 - text_tokens
    side = math.isqrt(max(num_patches, 0))
    if num_patches <= 0 or side * side != num_patches:
        raise UViTFileError(
            f"{source}: pos_embed has {tokens[1]} positions, which is not 1 time + {text_tokens} text + a square "
            "number of image patches; give the number of text tokens if the model was not trained on CLIP's 77"
        )
    try:
        config = UViTConfig(
            conditioning=conditioning,
            fusion="early" if n_image == 0 and n_text == 0 else "intermediate",
            n_image=n_image,
            n_text=n_text,
            image_size=side * patch,
            patch_size=patch,
            in_channels=in_channels,
            width=width,
            depth=2 * (n_joint + n_image),
            heads=heads,
            mlp_ratio=mlp_hidden / width,
            qkv_bias=qkv_bias,
            context_dim=context_dim,
            text_tokens=text_tokens,
            mlp_time_embed="time_embed.0.weight" in keys,
            final_conv="final_layer.weight" in keys,
            long_skip=any(k.endswith(".skip_linear.weight") for k in keys),
        )
    except UViTConfigError as exc:
        raise UViTFileError(f"{source}: the weights describe no valid U-ViT: {exc}") from exc
    return config, layout


# --- layout conversion ---------------------------------------------------------------------------


def _split_pos(pos: torch.Tensor, first: int, second: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pos[:, :first], pos[:, first : first + second], pos[:, first + second :]


def to_pack_layout(state_dict: Mapping[str, torch.Tensor], layout: str, config: UViTConfig) -> dict[str, torch.Tensor]:
    """Rename an upstream state dict into this pack's keys; U-ViT's [time, text, image] position
    embedding becomes [image, time, text]."""
    if layout in (LAYOUT_FORK, LAYOUT_PACK):
        return dict(state_dict)
    if layout != LAYOUT_UVIT:
        raise X2IError(f"unknown U-ViT layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("in_blocks."):
            key = "joint_blocks." + key[len("in_blocks.") :]
        elif key.startswith("out_blocks."):
            key = "joint_skip_blocks." + key[len("out_blocks.") :]
        elif key == "pos_embed" and value.ndim == 3 and value.shape[1] == config.num_patches + 1 + config.text_tokens:
            time, text, image = _split_pos(value, 1, config.text_tokens)
            value = torch.cat([image, time, text], dim=1)
        out[key] = value
    return out


def from_pack_layout(state_dict: Mapping[str, torch.Tensor], config: UViTConfig, layout: str) -> dict[str, torch.Tensor]:
    """This pack's state dict in an upstream layout (the inverse of :func:`to_pack_layout`)."""
    if layout in (LAYOUT_FORK, LAYOUT_PACK):
        return dict(state_dict)
    if layout != LAYOUT_UVIT:
        raise X2IError(f"unknown U-ViT layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if config.conditioning != "concat" or config.fusion != "early":
        raise UViTFileError(f"U-ViT's uvit_t2i layout holds concat-early models only, not {config.name}")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("joint_blocks."):
            key = "in_blocks." + key[len("joint_blocks.") :]
        elif key.startswith("joint_skip_blocks."):
            key = "out_blocks." + key[len("joint_skip_blocks.") :]
        elif key == "pos_embed":
            image, time, text = _split_pos(value, config.num_patches, 1)
            value = torch.cat([time, text, image], dim=1)
        out[key] = value
    return out


def expected_shapes(config: UViTConfig) -> dict[str, torch.Tensor]:
    """The network's state dict on the meta device (keys and shapes, no memory)."""
    return UViT(config, device="meta", init_weights=False).state_dict()


def check_state_dict(config: UViTConfig, state_dict: Mapping[str, torch.Tensor], source: str, layout: str = LAYOUT_PACK) -> None:
    details = state_dict_mismatch(expected_shapes(config), state_dict)
    if details:
        raise UViTFileError(f"{source}: weights do not fit a {config.name} U-ViT ({LAYOUTS[layout]}): {details}")


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    heads: int | None = None,
    text_tokens: int | None = None,
    source: str = "checkpoint",
) -> tuple[UViTConfig, dict[str, torch.Tensor], str]:
    """Detect, rename and check an upstream state dict: ``(config, pack state dict, layout)``."""
    sd = _strip_prefixes(state_dict)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UViTFileError(f"{source}: entries that are not tensors ({', '.join(map(str, bad[:3]))}); a U-ViT file is a plain state dict")
    config, layout = detect_config(sd, heads=heads, text_tokens=text_tokens, source=source)
    converted = to_pack_layout(sd, layout, config)
    check_state_dict(config, converted, source, layout)
    return config, converted, layout


# --- files ---------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise UViTFileError(f"{path.name} is not a readable safetensors file ({exc})") from exc
    return tensors, metadata


def _read_torch_pickle(path: Path) -> dict[str, torch.Tensor]:
    fix = "Use the nnet.pth / nnet_ema.pth of a U-ViT run, or convert a trusted file to safetensors."
    obj = unwrap_state_dict(read_torch_checkpoint(path, UViTFileError, fix))
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__
        hint = ""
        if isinstance(obj, Mapping) and ("state" in obj and "param_groups" in obj):
            hint = " (an optimizer state: pick nnet.pth or nnet_ema.pth from the same folder)"
        raise UViTFileError(f"{path.name} holds a {kind}{hint}, not a U-ViT state dict")
    return dict(obj)


def _config_from_metadata(metadata: Mapping[str, str], source: str) -> tuple[UViTConfig, SamplingConvention] | None:
    if metadata.get("format") != FORMAT_NAME:
        return None
    version = metadata.get("format_version", "")
    if version != FORMAT_VERSION:
        raise UViTFileError(f"{source}: U-ViT file format version {version!r} is not supported (supports {FORMAT_VERSION}); update the node pack")
    try:
        config = UViTConfig.from_json(metadata["config"])
        sampling = SamplingConvention.from_json(metadata["sampling"]) if "sampling" in metadata else SamplingConvention()
    except (KeyError, UViTConfigError) as exc:
        raise UViTFileError(f"{source}: U-ViT metadata is broken: {exc}") from exc
    return config, sampling


def load_uvit_state_dict(path: str | os.PathLike[str], *, heads: int | None = None, text_tokens: int | None = None) -> LoadedUViT:
    """Read any supported U-ViT file into this pack's layout (tensors in the file's dtype, on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise UViTFileError(f"U-ViT file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
        pack = _config_from_metadata(metadata, path.name)
        if pack is not None:
            config, sampling = pack
            if heads is not None and heads != config.heads:
                raise UViTFileError(f"{path.name}: the file says {config.heads} heads, not {heads}")
            tensors = _strip_prefixes(tensors)
            check_state_dict(config, tensors, path.name)
            return LoadedUViT(config, tensors, LAYOUT_PACK, sampling)
    elif suffix in TORCH_PICKLE_SUFFIXES:
        tensors = _read_torch_pickle(path)
    else:
        raise UViTFileError(f"{path.name}: unsupported U-ViT file type; use one of {', '.join(SUFFIXES)}")
    config, converted, layout = convert_state_dict(tensors, heads=heads, text_tokens=text_tokens, source=path.name)
    return LoadedUViT(config, converted, layout, SamplingConvention())


def build_uvit(config: UViTConfig, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint", **model_kwargs) -> UViT:
    """Construct the network and load a pack-layout ``state_dict`` strictly, with a readable error on mismatch."""
    check_state_dict(config, state_dict, source)
    model = UViT(config, init_weights=False, **model_kwargs)
    model.load_state_dict(state_dict, strict=True)
    return model


def load_uvit(
    path: str | os.PathLike[str],
    *,
    heads: int | None = None,
    text_tokens: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> UViT:
    """Load any supported U-ViT file as an eval-mode network (float32 on the CPU by default)."""
    loaded = load_uvit_state_dict(path, heads=heads, text_tokens=text_tokens)
    state = {k: v.to(dtype) for k, v in loaded.state_dict.items()}
    model = build_uvit(loaded.config, state, Path(path).name, device=device, dtype=dtype)
    logger.info("Loaded U-ViT %s (%s, %s layout)", Path(path).name, loaded.config.name, loaded.layout)
    return model.eval()


def save_uvit(
    model: UViT,
    path: str | os.PathLike[str],
    sampling: SamplingConvention | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``model`` in this pack's format, atomically (temp file in the same folder, then rename)."""
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_json(),
        "sampling": (sampling or SamplingConvention()).to_json(),
    }
    metadata.update(extra_metadata or {})
    save_safetensors_atomic(model.state_dict(), path, metadata)


def convert_uvit_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, heads: int | None = None) -> UViTConfig:
    """An upstream ``.pth`` (either layout) as this pack's safetensors; returns the detected config."""
    loaded = load_uvit_state_dict(src, heads=heads)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": loaded.config.to_json(),
        "sampling": loaded.sampling.to_json(),
        "converted_from": f"{Path(src).name} ({loaded.layout} layout)",
    }
    save_safetensors_atomic(loaded.state_dict, dst, metadata)
    return loaded.config


class _ShapeOnly:
    """Stands in for a tensor where only ``.shape`` is read (safetensors header probing)."""

    def __init__(self, shape: list[int]) -> None:
        self.shape = tuple(shape)
        self.ndim = len(shape)


def probe_uvit_file(path: str | os.PathLike[str], *, heads: int | None = None) -> UViTConfig:
    """The config of a U-ViT file, reading only a safetensors header where possible; raises UViTFileError."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return load_uvit_state_dict(path, heads=heads).config
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            pack = _config_from_metadata(f.metadata() or {}, path.name)
            if pack is not None:
                return pack[0]
            shapes = {k: _ShapeOnly(f.get_slice(k).get_shape()) for k in f.keys()}
    except UViTFileError:
        raise
    except Exception as exc:
        raise UViTFileError(f"{path.name} is not a readable safetensors file ({exc})") from exc
    shapes = _strip_prefixes(shapes)  # type: ignore[arg-type]
    config, _ = detect_config(shapes, heads=heads, source=path.name)  # type: ignore[arg-type]
    return config
