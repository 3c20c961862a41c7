"""Reading and writing GlueNet files.

Two formats load:

- the **released GlueGen checkpoints** (``gluenet_*.ckpt``): a flat ``state_dict`` saved with
  ``torch.save``; the architecture and sizes are read from the keys and shapes, the input/output
  convention from the official recipe and the file name;
- **this pack's format**: safetensors whose metadata carries the :class:`GlueNetConfig` as JSON.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import X2IError
from ..weights import (
    TORCH_PICKLE_SUFFIXES,
    build_and_load,
    describe_keys,
    read_torch_checkpoint,
    save_safetensors_atomic,
    unwrap_state_dict,
)
from .config import GlueNetConfig, GlueNetConfigError
from .modules import GlueNet

logger = logging.getLogger(__name__)

FORMAT_NAME = "x2i.gluenet"
# 1: SD1.x GlueNets. 2: GlueNets with a target family and a pooled head (SDXL); written only for those, so
# every pack that reads version 1 still reads the SD1 files trained today, and an older pack says to update
# when it meets an SDXL file instead of failing on the pooled head's weights.
FORMAT_VERSION = "1"
FORMAT_VERSION_SDXL = "2"
SUPPORTED_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_SDXL)
SUFFIXES = (".safetensors", *TORCH_PICKLE_SUFFIXES)

# Language names as they appear in released file names (gluenet_French_clip_...), to ISO 639-1.
LANGUAGE_NAMES: dict[str, str] = {
    "chinese": "zh", "french": "fr", "italian": "it", "japanese": "ja", "spanish": "es",
    "german": "de", "portuguese": "pt", "russian": "ru", "korean": "ko", "arabic": "ar",
    "hindi": "hi", "dutch": "nl", "polish": "pl", "turkish": "tr", "vietnamese": "vi",
    "indonesian": "id", "thai": "th", "swedish": "sv", "greek": "el", "czech": "cs",
    "english": "en",
}


class GlueNetFileError(X2IError):
    """A file that cannot be used as a GlueNet; the message names the problem and the fix."""


def _count(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    return tuple(state_dict[key].shape)


def detect_architecture(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> GlueNetConfig:
    """Infer the network shape of an official-format GlueNet ``state_dict`` from keys and shapes.

    Only the network is described (no output scaling); :func:`official_config` adds the convention.
    """
    sd = state_dict
    if "trans.net_sen.0.weight" in sd and "in_blocks.0.net_tok.0.weight" in sd:
        t_in = _shape(sd, "in_blocks.0.net_tok.0.weight")[1]
        d_in = _shape(sd, "in_blocks.0.net_sen.0.weight")[1]
        return GlueNetConfig(
            architecture="translator_w_head",
            num_tokens=t_in,
            in_dim=d_in,
            out_dim=_shape(sd, "trans.net_sen.6.weight")[0],
            num_tokens_out=_shape(sd, "trans.net_tok.6.weight")[0],
            mult=_shape(sd, "in_blocks.0.net_sen.0.weight")[0] // d_in,
            depth=3 + _count(sd, "out_blocks"),
            output_scaling="none",
        )
    if "tail.net_sen.0.weight" in sd and "tail.net_tok.0.weight" in sd:
        t_in = _shape(sd, "tail.net_tok.0.weight")[1]
        d_in = _shape(sd, "tail.net_sen.0.weight")[1]
        if "tail.net_sen.7.weight" in sd:
            out_key, architecture = "tail.net_sen.6.weight", "translator"
        elif "tail.net_sen.4.weight" in sd:
            out_key, architecture = "tail.net_sen.4.weight", "translator_noln"
        else:
            raise GlueNetFileError(f"{source}: GlueNet tail layout not recognised: {describe_keys(sd)}")
        heads, dim_head = 8, 64
        if any(k.startswith("attn.") for k in sd):
            if architecture != "translator":
                raise GlueNetFileError(f"{source}: a GlueNet-Trans file must have a LayerNorm tail (official Translator_attn)")
            if _count(sd, "attn.layers") != 2:
                raise GlueNetFileError(f"{source}: only one transformer layer (official Translator_attn depth=1) is supported")
            inner = _shape(sd, "attn.layers.0.1.to_q.weight")[0]
            # Head count is not recoverable from shapes; the official class uses x-transformers' 8.
            heads, dim_head, architecture = 8, inner // 8, "translator_attn"
        return GlueNetConfig(
            architecture=architecture,
            num_tokens=t_in,
            in_dim=d_in,
            out_dim=_shape(sd, out_key)[0],
            mult=_shape(sd, "tail.net_sen.0.weight")[0] // d_in,
            depth=_count(sd, "blocks"),
            attn_heads=heads,
            attn_dim_head=dim_head,
            output_scaling="none",
        )
    raise GlueNetFileError(
        f"{source} is not a GlueNet checkpoint: found {describe_keys(sd)}, expected GlueGen translator keys "
        "such as 'blocks.0.net_sen.0.weight' and 'tail.net_sen.0.weight' (multilingual) or "
        "'in_blocks.0...' and 'trans...' (sound). Pick a gluenet_*.ckpt or a GlueNet .safetensors file."
    )


def language_from_filename(name: str) -> str | None:
    """ISO 639-1 code of a released file name such as ``gluenet_French_clip_overnorm_over3_noln.ckpt``."""
    for part in re.split(r"[_\-. ]+", Path(name).stem.lower()):
        if part in LANGUAGE_NAMES:
            return LANGUAGE_NAMES[part]
    return None


def official_config(network: GlueNetConfig, filename: str = "") -> GlueNetConfig:
    """Add the official GlueGen input/output convention to a detected network shape.

    Text GlueNets were trained on XLM-R features divided by 3 ("over3"); every released GlueNet's
    output is multiplied by tensor_norm / 2 ("overnorm").
    """
    is_sound = network.architecture == "translator_w_head"
    hint = None
    if is_sound and (network.num_tokens, network.in_dim) == (16, 64):
        hint = "AudioCLIP audio embedding (1024 reshaped to 16x64)"
    elif not is_sound and network.in_dim == 1024:
        hint = "xlm-roberta-large"
    values = {k: getattr(network, k) for k in network.__dataclass_fields__}
    values.update(
        input_divisor=1.0 if is_sound else 3.0,
        output_scaling="tensor_norm_half" if network.tokens_out == 77 else "none",
        language=None if is_sound else language_from_filename(filename),
        encoder_hint=hint,
    )
    return GlueNetConfig(**values)


def build_gluenet(config: GlueNetConfig, state_dict: Mapping[str, torch.Tensor], source: str) -> GlueNet:
    """Construct the network and load ``state_dict`` strictly, with a readable error on mismatch (checked
    on the meta device first, so nothing is allocated for a network the weights do not fill)."""
    model = build_and_load(lambda: GlueNet(config), state_dict, GlueNetFileError,
                           f"{source}: weights do not fit a {config.architecture} GlueNet")
    return model.eval().requires_grad_(False)


def _load_torch_pickle(path: Path) -> dict[str, torch.Tensor]:
    fix = "Re-download it, or convert a trusted file to safetensors (see the README)."
    obj = unwrap_state_dict(read_torch_checkpoint(path, GlueNetFileError, fix))
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__
        raise GlueNetFileError(
            f"{path.name} holds a {kind}, not a GlueNet state_dict"
            + (" (LaVi-Bridge lora_*.pt files are lists; load them with the LaVi-Bridge nodes)" if kind == "list" else "")
        )
    return dict(obj)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise GlueNetFileError(f"{path.name} is not a readable safetensors file ({exc})") from exc
    return tensors, metadata


def config_from_metadata(metadata: Mapping[str, str]) -> GlueNetConfig | None:
    if metadata.get("format") != FORMAT_NAME:
        return None
    version = metadata.get("format_version", "")
    if version not in SUPPORTED_VERSIONS:
        raise GlueNetFileError(
            f"GlueNet file format version {version!r} is not supported by this ComfyUI-X2I "
            f"(supports {', '.join(SUPPORTED_VERSIONS)}); update the node pack"
        )
    try:
        return GlueNetConfig.from_json(metadata["config"])
    except (KeyError, GlueNetConfigError) as exc:
        raise GlueNetFileError(f"GlueNet metadata is broken: {exc}") from exc


def load_gluenet(path: str | os.PathLike[str]) -> GlueNet:
    """Load a released ``.ckpt`` or a pack ``.safetensors`` GlueNet onto the CPU, in float32."""
    path = Path(path)
    if not path.is_file():
        raise GlueNetFileError(f"GlueNet file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        state_dict, metadata = read_safetensors(path)
        config = config_from_metadata(metadata)
        if config is None:
            config = official_config(detect_architecture(state_dict, path.name), path.name)
    elif path.suffix.lower() in TORCH_PICKLE_SUFFIXES:
        state_dict = _load_torch_pickle(path)
        config = official_config(detect_architecture(state_dict, path.name), path.name)
    else:
        raise GlueNetFileError(f"{path.name}: unsupported GlueNet file type; use one of {', '.join(SUFFIXES)}")
    state_dict = {k: v.float() for k, v in state_dict.items()}
    model = build_gluenet(config, state_dict, path.name)
    logger.info("Loaded GlueNet %s (%s, %s -> %s)", path.name, config.architecture, model.input_shape, model.output_shape)
    return model


def save_gluenet(model: GlueNet, path: str | os.PathLike[str], extra_metadata: Mapping[str, str] | None = None) -> None:
    """Write ``model`` in this pack's format, atomically (temp file in the same folder, then rename)."""
    plain_sd1 = model.config.target == "sd1" and not model.config.pooled_dim and model.config.output_norm is None
    version = FORMAT_VERSION if plain_sd1 else FORMAT_VERSION_SDXL
    metadata = {"format": FORMAT_NAME, "format_version": version, "config": model.config.to_json()}
    metadata.update(extra_metadata or {})
    save_safetensors_atomic(model.state_dict(), path, metadata)


def probe_gluenet_file(path: str | os.PathLike[str]) -> GlueNetConfig:
    """Read only what is needed to tell whether ``path`` is a usable GlueNet; raises GlueNetFileError."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                config = config_from_metadata(metadata)
                if config is not None:
                    return config
                shapes = {k: _ShapeOnly(f.get_slice(k).get_shape()) for k in f.keys()}
        except GlueNetFileError:
            raise
        except Exception as exc:
            raise GlueNetFileError(f"{path.name} is not a readable safetensors file ({exc})") from exc
        return official_config(detect_architecture(shapes, path.name), path.name)  # type: ignore[arg-type]
    return load_gluenet(path).config


class _ShapeOnly:
    """Stands in for a tensor where only ``.shape`` is read (safetensors header probing)."""

    def __init__(self, shape: list[int]) -> None:
        self.shape = tuple(shape)
