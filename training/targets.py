"""The target side of GlueNet training: SD1.x's CLIP ViT-L/14 text encoder and its features.

The target of a caption is exactly what SD1.x is conditioned on: CLIP's ``last_hidden_state``
(after the final LayerNorm) for the caption tokenised to 77 tokens, padded with the end token, run
without an attention mask (CLIP's causal mask already hides the padding from the real tokens), as
the official GlueGen training and ldm's ``FrozenCLIPEmbedder`` do.

Where the encoder comes from:

- an **SD1.x single-file checkpoint** (``.safetensors`` or ``.ckpt``): the keys under
  ``cond_stage_model.transformer.`` become a transformers ``CLIPTextModel`` whose config is read from
  the shapes (ViT-L/14: 12 layers, width 768, 77 positions). Its tokenizer is not in the file: it
  comes from ``target.tokenizer``, by default ComfyUI's ``comfy/sd1_tokenizer`` found next to the
  pack when installed as ``ComfyUI/custom_nodes/<pack>``;
- a **Hugging Face CLIP folder** (``openai/clip-vit-large-patch14`` or a ``CLIPTextModel`` folder)
  with its own tokenizer.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from ..errors import X2IError
from ..weights import DTYPES, describe_keys, read_torch_checkpoint, state_dict_mismatch, unwrap_state_dict
from .settings import setting

if TYPE_CHECKING:
    from ..encoders.text import HFTextEncoder

logger = logging.getLogger(__name__)

SD1_CLIP_PREFIX = "cond_stage_model.transformer."
TARGET_TOKENS = 77
# ComfyUI's copy of openai/clip-vit-large-patch14's tokenizer, relative to the ComfyUI folder.
COMFY_SD1_TOKENIZER = Path("comfy") / "sd1_tokenizer"


class TargetError(X2IError):
    """A target encoder that cannot produce SD1.x conditioning for this GlueNet."""


@dataclass
class TargetSettings:
    """The ``[target]`` section: where CLIP's text encoder comes from."""

    clip: str = setting("", "an SD1.x checkpoint (.safetensors/.ckpt) or a Hugging Face CLIP folder")
    tokenizer: str = setting("", "a CLIP tokenizer folder (vocab.json + merges.txt); default: ComfyUI's comfy/sd1_tokenizer")
    dtype: Literal["fp32", "fp16", "bf16"] = setting("fp32", "what CLIP runs in while the feature cache is built")


def default_tokenizer_folder(pack_root: Path | None = None) -> Path | None:
    """ComfyUI's ``comfy/sd1_tokenizer`` when this pack sits in ``ComfyUI/custom_nodes/<pack>``."""
    root = pack_root or Path(__file__).resolve().parents[1]
    candidate = root.parent.parent / COMFY_SD1_TOKENIZER
    return candidate if (candidate / "vocab.json").is_file() else None


def tokenizer_folder(settings: TargetSettings) -> str | None:
    """The tokenizer folder a target's features depend on, for cache fingerprints: ``target.tokenizer``,
    ``None`` for a CLIP folder (its own tokenizer, fingerprinted with it), else ComfyUI's default one."""
    if settings.tokenizer:
        return str(Path(settings.tokenizer).expanduser())
    if Path(settings.clip).expanduser().is_dir():
        return None
    folder = default_tokenizer_folder()
    return str(folder) if folder else None


def _load_tokenizer(folder: str, pack_root: Path | None = None):
    from transformers import CLIPTokenizer

    path = Path(folder).expanduser() if folder else default_tokenizer_folder(pack_root)
    if path is None:
        raise TargetError(
            "an SD1.x checkpoint holds no tokenizer: set target.tokenizer to a CLIP tokenizer folder (vocab.json + "
            "merges.txt, e.g. ComfyUI/comfy/sd1_tokenizer or openai/clip-vit-large-patch14); it is found "
            "automatically when this pack is installed in ComfyUI/custom_nodes"
        )
    if not (path / "vocab.json").is_file() or not (path / "merges.txt").is_file():
        raise TargetError(f"{path} is not a CLIP tokenizer folder (needs vocab.json and merges.txt)")
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)


def _read_checkpoint_clip(path: Path) -> dict[str, torch.Tensor]:
    """The CLIP text tensors of a single-file checkpoint, without reading the rest of it into memory."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                keys = list(handle.keys())
                state = {k: handle.get_tensor(k) for k in keys if k.startswith(SD1_CLIP_PREFIX)}
        except Exception as exc:
            raise TargetError(f"{path.name} is not a readable safetensors file ({exc})") from exc
    else:
        fix = "Convert a trusted checkpoint to .safetensors, or point target.clip at a Hugging Face CLIP folder."
        obj = unwrap_state_dict(read_torch_checkpoint(path, TargetError, fix))
        if not isinstance(obj, Mapping):
            raise TargetError(f"{path.name} holds a {type(obj).__name__}, not a checkpoint state_dict")
        keys = list(obj)
        state = {k: v for k, v in obj.items() if isinstance(k, str) and k.startswith(SD1_CLIP_PREFIX)}
    if not state:
        hint = ""
        if any(k.startswith("cond_stage_model.model.") for k in keys):
            hint = " It looks like SD2.x (OpenCLIP ViT-H text encoder, width 1024); GlueNets target SD1.x's CLIP ViT-L/14."
        elif any(k.startswith("conditioner.embedders.") for k in keys):
            hint = " It looks like SDXL (two text encoders); GlueNets target SD1.x's CLIP ViT-L/14."
        raise TargetError(
            f"{path.name} has no SD1.x text encoder (no '{SD1_CLIP_PREFIX}*' keys; found {describe_keys(keys)}).{hint}"
        )
    # SD1 files name the tensors 'text_model.embeddings...' (a few early ones 'embeddings...'); keep the
    # names below text_model, the layout transformers 5's CLIPTextModel uses.
    return {key[len(SD1_CLIP_PREFIX):].removeprefix("text_model."): value for key, value in state.items()}


def clip_config_from_state(state: Mapping[str, torch.Tensor], source: str):
    """A ``CLIPTextConfig`` read from the shapes of a CLIP text state_dict (keys below ``text_model.``;
    OpenAI CLIP: quick GELU, 64-wide heads)."""
    from transformers import CLIPTextConfig

    try:
        vocab, width = state["embeddings.token_embedding.weight"].shape
        positions = state["embeddings.position_embedding.weight"].shape[0]
        intermediate = state["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise TargetError(f"{source}: the CLIP text encoder lacks {exc.args[0]}; the checkpoint is incomplete") from exc
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64), max_position_embeddings=positions, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=1,
    )


def load_clip_from_checkpoint(path: Path, tokenizer_folder: str = "", dtype: torch.dtype = torch.float32,
                              pack_root: Path | None = None) -> HFTextEncoder:
    """The CLIP text encoder of an SD1.x single-file checkpoint, as an :class:`HFTextEncoder`."""
    from transformers import CLIPTextModel

    from ..encoders.text import HFTextEncoder

    state = {k: v for k, v in _read_checkpoint_clip(path).items() if not k.endswith("position_ids")}
    config = clip_config_from_state(state, path.name)
    model = CLIPTextModel(config)
    if any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 4 nests the tower
        state = {f"text_model.{k}": v for k, v in state.items()}
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    problem = state_dict_mismatch(expected, state)
    if problem:
        raise TargetError(f"{path.name}: the text encoder does not fit a CLIP text model: {problem}")
    model.load_state_dict(state, strict=False)
    model.to(dtype).eval().requires_grad_(False)
    tokenizer = _load_tokenizer(tokenizer_folder, pack_root)
    if len(tokenizer) > config.vocab_size:
        raise TargetError(
            f"tokenizer has {len(tokenizer)} tokens but {path.name}'s CLIP has {config.vocab_size} embeddings: "
            "use the tokenizer of this checkpoint's CLIP"
        )
    logger.info("Target: CLIP text encoder of %s (%d layers, width %d)", path.name, config.num_hidden_layers, config.hidden_size)
    return HFTextEncoder(model, tokenizer, f"{path.name} (CLIP)", max_length=TARGET_TOKENS, use_attention_mask=False)


def load_target_encoder(settings: TargetSettings, base: Path | None = None, pack_root: Path | None = None) -> HFTextEncoder:
    """SD1.x's CLIP text encoder from a checkpoint or a folder, set up to give SD1 conditioning."""
    # Imported here: a run whose caches are complete never needs transformers (seconds of start-up).
    from ..encoders.text import load_text_encoder
    if not settings.clip:
        raise TargetError("set target.clip to an SD1.x checkpoint or a Hugging Face CLIP folder")
    path = Path(settings.clip).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    dtype = DTYPES[settings.dtype]
    if path.is_dir():
        encoder = load_text_encoder(path, dtype=dtype, max_length=TARGET_TOKENS)
        if encoder.transformer.config.model_type not in ("clip", "clip_text_model"):
            raise TargetError(
                f"{path.name} is a '{encoder.transformer.config.model_type}' model; the target must be CLIP's text encoder"
            )
        if settings.tokenizer:
            encoder.tokenizer = _load_tokenizer(settings.tokenizer, pack_root)
        encoder.use_attention_mask = False  # SD1 conditioning: no padding mask
    elif path.is_file():
        encoder = load_clip_from_checkpoint(path, settings.tokenizer, dtype, pack_root)
    else:
        raise TargetError(f"target.clip not found: {path}")
    positions = encoder.transformer.config.max_position_embeddings
    if positions < TARGET_TOKENS:
        raise TargetError(f"{encoder.name} has {positions} positions; SD1 conditioning needs {TARGET_TOKENS}")
    tokenizer = encoder.tokenizer
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        logger.warning(
            "%s: the tokenizer pads with %r, SD1.x's with the end token %r; targets will differ from SD1 conditioning",
            encoder.name, tokenizer.pad_token, tokenizer.eos_token,
        )
    return encoder


def check_target_width(target_width: int, gluenet_out_dim: int, target_name: str) -> None:
    """The GlueNet must output the target's width; a mismatch is a config error, not a silent reshape."""
    if target_width != gluenet_out_dim:
        raise TargetError(
            f"target width mismatch: {target_name} gives {target_width}-wide features but the GlueNet is configured "
            f"to output {gluenet_out_dim} (model.out_dim). SD1.x's CLIP ViT-L/14 is 768 wide; use an SD1.x checkpoint "
            "or set model.out_dim to the target's width"
        )


def peek_target_width(settings: TargetSettings, base: Path | None = None) -> int | None:
    """The target encoder's width without loading it (config.json, or the checkpoint's header);
    None when it cannot be told cheaply. Lets a width mismatch fail before any encoder runs."""
    if not settings.clip:
        return None
    path = Path(settings.clip).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    try:
        if path.is_dir():
            import transformers

            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            return int(getattr(config, "text_config", config).hidden_size)
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                for key in (f"{SD1_CLIP_PREFIX}text_model.embeddings.token_embedding.weight",
                            f"{SD1_CLIP_PREFIX}embeddings.token_embedding.weight"):
                    if key in handle.keys():
                        return int(handle.get_slice(key).get_shape()[1])
    except Exception:  # the real load reports the problem with its full message
        return None
    return None
