"""The target side of GlueNet training: the text conditioning of SD1.x (CLIP ViT-L/14) or SDXL, and its features.

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

With ``target.kind = "sdxl"`` the target is instead what ComfyUI's CLIPTextEncode gives an SDXL base model
(two encoders from an SDXL single file, ``[77, 2048]`` tokens plus a 1280-wide pooled vector), loaded by
:mod:`training.sdxl_targets`, where its conventions are spelled out. The feature cache keeps one tensor per
caption, so SDXL's pooled vector is packed as a 78th row (:func:`pack_target`, :func:`unpack_target`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from ..errors import X2IError
from ..weights import DTYPES, describe_keys, read_torch_checkpoint, state_dict_mismatch, unwrap_state_dict
from .settings import setting

if TYPE_CHECKING:
    from ..encoders.text import HFTextEncoder
    from .sdxl_targets import SDXLTextTarget

logger = logging.getLogger(__name__)

SD1_CLIP_PREFIX = "cond_stage_model.transformer."
# The original SGM layout of SDXL single files (what ComfyUI's supported_models.SDXL / SDXLRefiner read):
# base: CLIP ViT-L (transformers names) and OpenCLIP ViT-bigG (open_clip names); refiner: bigG alone.
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_CLIP_G_PREFIX = "conditioner.embedders.0.model."
TARGET_TOKENS = 77
# ComfyUI's copy of openai/clip-vit-large-patch14's tokenizer, relative to the ComfyUI folder.
COMFY_SD1_TOKENIZER = Path("comfy") / "sd1_tokenizer"


class TargetError(X2IError):
    """A target encoder that cannot produce the conditioning (SD1.x or SDXL) this GlueNet is trained for."""


@dataclass
class TargetSettings:
    """The ``[target]`` section: which model's text conditioning, and where its encoder comes from."""

    kind: Literal["sd1", "sdxl"] = setting(
        "sd1", "sd1: CLIP ViT-L/14, [77, 768]; sdxl: CLIP ViT-L + OpenCLIP ViT-bigG of an SDXL base file, [77, 2048] + pooled 1280")
    clip: str = setting("", "an SD1.x checkpoint (.safetensors/.ckpt) or a Hugging Face CLIP folder; kind sdxl: an SDXL base checkpoint")
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


def _load_tokenizer(folder: str, pack_root: Path | None = None, holder: str = "an SD1.x checkpoint"):
    from transformers import CLIPTokenizer

    path = Path(folder).expanduser() if folder else default_tokenizer_folder(pack_root)
    if path is None:
        raise TargetError(
            f"{holder} holds no tokenizer: set target.tokenizer to a CLIP tokenizer folder (vocab.json + "
            "merges.txt, e.g. ComfyUI/comfy/sd1_tokenizer or openai/clip-vit-large-patch14); it is found "
            "automatically when this pack is installed in ComfyUI/custom_nodes"
        )
    if not (path / "vocab.json").is_file() or not (path / "merges.txt").is_file():
        raise TargetError(f"{path} is not a CLIP tokenizer folder (needs vocab.json and merges.txt)")
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)


def _read_checkpoint_tensors(path: Path, prefixes: tuple[str, ...], fix: str) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Every key of a single-file checkpoint and the tensors under ``prefixes``, without reading the rest of
    a .safetensors file into memory (``fix``: what to do when a pickled checkpoint cannot be read safely)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                keys = list(handle.keys())
                state = {k: handle.get_tensor(k) for k in keys if k.startswith(prefixes)}
        except Exception as exc:
            raise TargetError(f"{path.name} is not a readable safetensors file ({exc})") from exc
    else:
        obj = unwrap_state_dict(read_torch_checkpoint(path, TargetError, fix))
        if not isinstance(obj, Mapping):
            raise TargetError(f"{path.name} holds a {type(obj).__name__}, not a checkpoint state_dict")
        keys = [k for k in obj if isinstance(k, str)]
        state = {k: obj[k] for k in keys if k.startswith(prefixes)}
    return keys, state


def _read_checkpoint_clip(path: Path) -> dict[str, torch.Tensor]:
    """The CLIP text tensors of an SD1.x single-file checkpoint, without reading the rest of it into memory."""
    fix = "Convert a trusted checkpoint to .safetensors, or point target.clip at a Hugging Face CLIP folder."
    keys, state = _read_checkpoint_tensors(path, (SD1_CLIP_PREFIX,), fix)
    if not state:
        hint = ""
        if any(k.startswith("cond_stage_model.model.") for k in keys):
            hint = " It looks like SD2.x (OpenCLIP ViT-H text encoder, width 1024); GlueNets target SD1.x's CLIP ViT-L/14."
        elif any(k.startswith("conditioner.embedders.") for k in keys):
            hint = (" It looks like SDXL (two text encoders): set target.kind = \"sdxl\" to target SDXL's conditioning"
                    " (an SDXL base checkpoint; a refiner's bigG-only conditioning is not a target).")
        raise TargetError(
            f"{path.name} has no SD1.x text encoder (no '{SD1_CLIP_PREFIX}*' keys; found {describe_keys(keys)}).{hint}"
        )
    # SD1 files name the tensors 'text_model.embeddings...' (a few early ones 'embeddings...'); keep the
    # names below text_model, the layout transformers 5's CLIPTextModel uses.
    return {key[len(SD1_CLIP_PREFIX):].removeprefix("text_model."): value for key, value in state.items()}


def clip_config_from_state(state: Mapping[str, torch.Tensor], source: str, hidden_act: str = "quick_gelu",
                           projection_dim: int | None = None):
    """A ``CLIPTextConfig`` read from the shapes of a CLIP text state_dict (keys below ``text_model.``;
    64-wide heads). ``hidden_act``: OpenAI CLIP's quick GELU, or ``"gelu"`` for OpenCLIP (SDXL's bigG);
    ``projection_dim``: the width of ``text_projection`` for a ``CLIPTextModelWithProjection``."""
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
        num_attention_heads=max(1, width // 64), max_position_embeddings=positions, hidden_act=hidden_act,
        layer_norm_eps=1e-5, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=1,
        **({"projection_dim": projection_dim} if projection_dim else {}),
    )


def load_clip_weights(model: nn.Module, tower: Mapping[str, torch.Tensor], source: str,
                      extra: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """``model`` (a transformers CLIP text model) with ``tower`` (keys below ``text_model.``) and ``extra``
    (top-level keys such as ``text_projection.weight``) loaded, or a :class:`TargetError` naming what differs."""
    if any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 4 nests the tower
        tower = {f"text_model.{k}": v for k, v in tower.items()}
    state = {**tower, **(extra or {})}
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    problem = state_dict_mismatch(expected, state)
    if problem:
        raise TargetError(f"{source}: the text encoder does not fit a CLIP text model: {problem}")
    model.load_state_dict(state, strict=False)
    return model


def load_clip_from_checkpoint(path: Path, tokenizer_folder: str = "", dtype: torch.dtype = torch.float32,
                              pack_root: Path | None = None) -> HFTextEncoder:
    """The CLIP text encoder of an SD1.x single-file checkpoint, as an :class:`HFTextEncoder`."""
    from transformers import CLIPTextModel

    from ..encoders.text import HFTextEncoder

    state = {k: v for k, v in _read_checkpoint_clip(path).items() if not k.endswith("position_ids")}
    config = clip_config_from_state(state, path.name)
    model = load_clip_weights(CLIPTextModel(config), state, path.name)
    model.to(dtype).eval().requires_grad_(False)
    tokenizer = _load_tokenizer(tokenizer_folder, pack_root)
    if len(tokenizer) > config.vocab_size:
        raise TargetError(
            f"tokenizer has {len(tokenizer)} tokens but {path.name}'s CLIP has {config.vocab_size} embeddings: "
            "use the tokenizer of this checkpoint's CLIP"
        )
    logger.info("Target: CLIP text encoder of %s (%d layers, width %d)", path.name, config.num_hidden_layers, config.hidden_size)
    return HFTextEncoder(model, tokenizer, f"{path.name} (CLIP)", max_length=TARGET_TOKENS, use_attention_mask=False)


def load_target_encoder(settings: TargetSettings, base: Path | None = None,
                        pack_root: Path | None = None) -> HFTextEncoder | SDXLTextTarget:
    """SD1.x's CLIP text encoder from a checkpoint or a folder, set up to give SD1 conditioning; with
    ``kind = "sdxl"``, SDXL's two text encoders from an SDXL base checkpoint (:mod:`training.sdxl_targets`)."""
    # Imported here: a run whose caches are complete never needs transformers (seconds of start-up).
    from ..encoders.text import load_text_encoder
    if not settings.clip:
        what = "an SDXL base checkpoint" if settings.kind == "sdxl" else "an SD1.x checkpoint or a Hugging Face CLIP folder"
        raise TargetError(f"set target.clip to {what}")
    path = Path(settings.clip).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    dtype = DTYPES[settings.dtype]
    if settings.kind == "sdxl":
        from .sdxl_targets import load_sdxl_target

        if path.is_dir():
            raise TargetError(
                f"target.kind = \"sdxl\" but target.clip is a folder ({path.name}): SDXL targets come from an SDXL single "
                "file (.safetensors/.ckpt holding both text encoders, e.g. sd_xl_base_1.0.safetensors), not a Hugging Face "
                "folder. Point target.clip at an SDXL base checkpoint, or set target.kind = \"sd1\" for a CLIP folder"
            )
        if not path.is_file():
            raise TargetError(f"target.clip not found: {path}")
        return load_sdxl_target(path, settings.tokenizer, dtype, pack_root)
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


# One cache tensor per caption (one cache, one encoder pass): SDXL's pooled vector rides as a 78th row.
def pack_target(tokens: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
    """``[..., 77, width]`` tokens and ``[..., pooled_dim]`` pooled (``pooled_dim <= width``) as one
    ``[..., 78, width]`` tensor: row 77 holds the pooled vector in its first ``pooled_dim`` values, zeros
    after. Without a pooled vector (SD1) the tokens are the packed target."""
    if pooled is None:
        return tokens
    if tokens.shape[-2] != TARGET_TOKENS or pooled.shape[-1] > tokens.shape[-1] or pooled.shape[:-1] != tokens.shape[:-2]:
        raise TargetError(
            f"cannot pack tokens {list(tokens.shape)} with pooled {list(pooled.shape)}: expected [..., {TARGET_TOKENS}, width] "
            "and [..., pooled_dim] with pooled_dim <= width"
        )
    row = tokens.new_zeros(*tokens.shape[:-2], 1, tokens.shape[-1])
    row[..., 0, : pooled.shape[-1]] = pooled.to(tokens.dtype)
    return torch.cat([tokens, row], dim=-2)


def unpack_target(packed: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(tokens [..., 77, width], pooled [..., pooled_dim])`` of a :func:`pack_target` tensor; a 77-row
    tensor (SD1, ``pooled_dim = 0``) is its own tokens, with pooled ``None``."""
    rows, width = packed.shape[-2], packed.shape[-1]
    if rows == TARGET_TOKENS:
        return packed, None
    if rows != TARGET_TOKENS + 1 or not 0 < pooled_dim <= width:
        raise TargetError(
            f"a packed target is [..., {TARGET_TOKENS}, width] (SD1) or [..., {TARGET_TOKENS + 1}, width] with a pooled row "
            f"(SDXL, pooled_dim 1..width); got {list(packed.shape)} with pooled_dim {pooled_dim}: the feature cache does not "
            "match target.kind (rebuild it, or set target.kind to the model the cache was built for)"
        )
    return packed[..., :TARGET_TOKENS, :], packed[..., TARGET_TOKENS, :pooled_dim]


def check_target_width(target_width: int, gluenet_out_dim: int, target_name: str) -> None:
    """The GlueNet must output the target's width; a mismatch is a config error, not a silent reshape."""
    if target_width != gluenet_out_dim:
        raise TargetError(
            f"target width mismatch: {target_name} gives {target_width}-wide features but the GlueNet is configured "
            f"to output {gluenet_out_dim} (model.out_dim). SD1.x's CLIP ViT-L/14 is 768 wide (SDXL's conditioning 2048, "
            "target.kind = \"sdxl\"); use a checkpoint of the model the GlueNet is for, or set model.out_dim to the target's width"
        )


def peek_target_width(settings: TargetSettings, base: Path | None = None) -> int | None:
    """The target encoder's width without loading it (config.json, or the checkpoint's header);
    None when it cannot be told cheaply. Lets a width mismatch fail before any encoder runs."""
    if not settings.clip:
        return None
    path = Path(settings.clip).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if settings.kind == "sdxl" and path.is_dir():
        return None  # not an SDXL single file: the load refuses it with the fix
    try:
        if path.is_dir():
            import transformers

            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            return int(getattr(config, "text_config", config).hidden_size)
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                if settings.kind == "sdxl":  # the two encoders side by side: 768 + 1280
                    keys = set(handle.keys())
                    parts = (f"{SDXL_CLIP_L_PREFIX}text_model.embeddings.token_embedding.weight",
                             f"{SDXL_CLIP_G_PREFIX}token_embedding.weight")
                    return sum(int(handle.get_slice(k).get_shape()[1]) for k in parts) if keys.issuperset(parts) else None
                for key in (f"{SD1_CLIP_PREFIX}text_model.embeddings.token_embedding.weight",
                            f"{SD1_CLIP_PREFIX}embeddings.token_embedding.weight"):
                    if key in handle.keys():
                        return int(handle.get_slice(key).get_shape()[1])
    except Exception:  # the real load reports the problem with its full message
        return None
    return None
