"""This pack's LaVi-Bridge file: everything a trained bridge needs in one safetensors file.

A released LaVi-Bridge is a folder (``adapter/``, positional ``lora_vis.pt`` / ``lora_text.pt``) whose
recipe (which language model, how many tokens, attention mask or not) is only implied by its name.
This format names every tensor and says the rest in its metadata, so a bridge for any language-model
size or any adapter width loads without guessing:

- tensors ``vision.<module>.lora_up.weight`` / ``vision.<module>.lora_down.weight`` for the diffusion
  model (diffusers module names: ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` for an
  SD1.x U-Net, ``transformer_blocks.0.attn1.to_q`` for PixArt), the same under ``text.`` for the
  language model (``encoder.block.0.layer.0.SelfAttention.q`` for T5, ``layers.0.self_attn.q_proj`` for
  Llama), and ``adapter.<key>`` for the :class:`TextAdapter`;
- metadata ``format`` = ``x2i.lavibridge``, ``format_version``, ``recipe`` (how prompts are tokenised and
  encoded: ``t5_unet``, ``llama2_unet``, ``t5_transformer``), ``language_model_family``, ``max_length``,
  ``use_attention_mask``, ``diffusion_model`` (``sd1`` / ``pixart`` / ``sdxl``), ``context_dim``, ``adapter_config``
  (with ``pooled_dim`` for SDXL, whose adapter has a pooled head: tensors ``adapter.pooled_head.*``),
  ``lora_rank``, ``lora_scale`` (always 1.0: ``y = W x + up(down(x))``, ComfyUI's alpha = rank),
  ``vision_layers`` / ``text_layers`` (module names in the official positional order, so the pairs map
  with :func:`map_lora_pairs` exactly like a released file), and ``training_config`` (JSON).

:func:`write_released_layout` writes the released folder layout from the same pieces, for the
official LaVi-Bridge code and for the loader of released folders.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..weights import build_and_load, describe_keys, save_safetensors_atomic, torch_save_atomic, write_text_atomic
from .adapter import CONFIG_FILE, OFFICIAL_CLASS_NAME, TextAdapter, TextAdapterConfig
from .errors import LaViBridgeFileError
from .language_models import LaViBridgeRecipe, family_of_recipe, text_config

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "TrainedBridge", "is_trained_bridge_file", "load_trained_bridge",
    "read_trained_bridge_metadata", "save_trained_bridge", "write_released_layout",
]

FORMAT_NAME = "x2i.lavibridge"
# 1: bridges to SD1.x and PixArt. 2: bridges to SDXL (a pooled head in the adapter); written only for those, so
# every pack that reads version 1 still reads the SD1.x and PixArt bridges trained today, and an older pack
# says to update when it meets an SDXL bridge.
FORMAT_VERSION = "1"
FORMAT_VERSION_SDXL = "2"
SUPPORTED_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_SDXL)
DIFFUSION_MODELS = ("sd1", "pixart", "sdxl")
# What each names, for messages.
DIFFUSION_MODEL_NAMES = {"sd1": "an SD1.x U-Net (768-wide text context)", "pixart": "PixArt-XL-2",
                         "sdxl": "an SDXL U-Net (2048-wide text context + 1280-wide pooled)"}
LANGUAGE_MODEL_FAMILIES = ("t5", "llama")
# The recipe each (language model, diffusion model) pair is trained and prompted with.
RECIPES: dict[tuple[str, str], LaViBridgeRecipe] = {
    ("t5", "sd1"): LaViBridgeRecipe.T5_UNET,
    ("llama", "sd1"): LaViBridgeRecipe.LLAMA2_UNET,
    ("t5", "pixart"): LaViBridgeRecipe.T5_TRANSFORMER,
    # SDXL reads 77 tokens like SD1.x: the language model is prompted as for the U-Net recipes.
    ("t5", "sdxl"): LaViBridgeRecipe.T5_UNET,
    ("llama", "sdxl"): LaViBridgeRecipe.LLAMA2_UNET,
}
UP, DOWN = "lora_up.weight", "lora_down.weight"
ADAPTER_WEIGHTS = "diffusion_pytorch_model.safetensors"
# The metadata diffusers' save_pretrained gives its safetensors weights.
DIFFUSERS_WEIGHTS_METADATA = {"format": "pt"}
# Written into adapter/config.json like diffusers' save_pretrained does, so the official
# ``TextAdapter.from_pretrained`` reads it as well as this pack's ``load_adapter``.
DIFFUSERS_VERSION_TAG = "0.24.0"

LoraPair = tuple[torch.Tensor, torch.Tensor]
_FIX = "Pick a .safetensors file written by this pack's bridge trainer (python ComfyUI-X2I train bridge)."


def recipe_for(family: str, diffusion_model: str) -> LaViBridgeRecipe:
    """The recipe of a (language-model family, diffusion model) pair, or a clear error."""
    try:
        return RECIPES[(family, diffusion_model)]
    except KeyError:
        pairs = ", ".join(f"{f} -> {d} ({r.value})" for (f, d), r in RECIPES.items())
        raise LaViBridgeFileError(
            f"there is no LaVi-Bridge recipe for a {family} language model with a {diffusion_model} diffusion model; "
            f"the recipes are {pairs}"
        ) from None


@dataclass(frozen=True)
class TrainedBridge:
    """A loaded bridge file: the adapter, both LoRAs by module name (official order), and the recipe."""

    recipe: LaViBridgeRecipe
    language_model_family: str
    diffusion_model: str
    adapter: TextAdapter
    vision_lora: dict[str, LoraPair]
    text_lora: dict[str, LoraPair]
    rank: int
    max_length: int
    use_attention_mask: bool
    context_dim: int
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def adapter_config(self) -> TextAdapterConfig:
        return self.adapter.config

    @property
    def training_config(self) -> dict:
        raw = self.metadata.get("training_config")
        return json.loads(raw) if raw else {}

    def vision_pairs(self) -> list[LoraPair]:
        """The vision pairs in the official positional order (what ``lora_vis.pt`` holds)."""
        return list(self.vision_lora.values())

    def text_pairs(self) -> list[LoraPair]:
        """The language-model pairs in the official positional order (what ``lora_text.pt`` holds)."""
        return list(self.text_lora.values())


def _check_pair(source: str, name: str, up: torch.Tensor, down: torch.Tensor, rank: int | None) -> int:
    if up.dim() not in (2, 4) or down.dim() != up.dim():
        raise LaViBridgeFileError(
            f"{source}: LoRA layer {name} has up {list(up.shape)} and down {list(down.shape)}; a pair is two matrices "
            "(Linear) or two kernels (Conv2d)"
        )
    r = int(down.shape[0])
    if int(up.shape[1]) != r or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise LaViBridgeFileError(f"{source}: LoRA layer {name}: up {list(up.shape)} does not fit down {list(down.shape)}")
    if rank is not None and r != rank:
        raise LaViBridgeFileError(f"{source}: LoRA layer {name} has rank {r}, the file says rank {rank}")
    return r


def save_trained_bridge(
    path: str | os.PathLike[str],
    *,
    recipe: LaViBridgeRecipe | str,
    diffusion_model: str,
    adapter: TextAdapter,
    vision_lora: Mapping[str, LoraPair],
    text_lora: Mapping[str, LoraPair],
    context_dim: int,
    language_model: str = "",
    training_config: Mapping | None = None,
    lora_dtype: torch.dtype = torch.float16,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a bridge in this pack's format, atomically. ``vision_lora`` / ``text_lora`` map module names to
    ``(up, down)`` in the official positional order (dict order is kept); ``text_lora`` may be empty (a
    bridge trained without a language-model LoRA). LoRA tensors are stored in ``lora_dtype`` (fp16, as the
    release), the adapter in float32."""
    recipe = LaViBridgeRecipe(recipe)
    if diffusion_model not in DIFFUSION_MODELS:
        raise ValueError(f"diffusion_model must be one of {DIFFUSION_MODELS}, got {diffusion_model!r}")
    family = family_of_recipe(recipe)
    if recipe_for(family, diffusion_model) != recipe:
        raise ValueError(f"recipe {recipe.value} is not the recipe of a {family} bridge to {diffusion_model}")
    if not vision_lora:
        raise ValueError("a bridge needs its vision LoRA")
    if adapter.config.out_dim != context_dim:
        raise ValueError(f"adapter gives {adapter.config.out_dim}-wide features but context_dim is {context_dim}")
    if bool(adapter.config.pooled_dim) != (diffusion_model == "sdxl"):
        raise ValueError(f"a bridge to {diffusion_model} {'needs' if diffusion_model == 'sdxl' else 'has no'} pooled head, "
                         f"the adapter's pooled_dim is {adapter.config.pooled_dim}")
    rank = None
    tensors: dict[str, torch.Tensor] = {}
    for prefix, pairs in (("vision", vision_lora), ("text", text_lora)):
        for name, (up, down) in pairs.items():
            rank = _check_pair(str(path), name, up, down, rank)
            tensors[f"{prefix}.{name}.{UP}"] = up.detach().to("cpu", lora_dtype)
            tensors[f"{prefix}.{name}.{DOWN}"] = down.detach().to("cpu", lora_dtype)
    tensors.update({f"adapter.{k}": v.detach().to("cpu", torch.float32) for k, v in adapter.state_dict().items()})
    config = text_config(recipe)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION_SDXL if diffusion_model == "sdxl" else FORMAT_VERSION,
        "recipe": recipe.value,
        "language_model_family": family,
        "language_model": language_model,
        "max_length": str(config.max_length),
        "use_attention_mask": json.dumps(config.use_attention_mask),
        "diffusion_model": diffusion_model,
        "context_dim": str(context_dim),
        "adapter_config": json.dumps({"in_dim": adapter.config.in_dim, "int_dim": adapter.config.int_dim, "out_dim": adapter.config.out_dim,
                                      **({"pooled_dim": adapter.config.pooled_dim} if adapter.config.pooled_dim else {})}),
        "lora_rank": str(rank),
        "lora_scale": "1.0",
        "vision_layers": json.dumps(list(vision_lora)),
        "text_layers": json.dumps(list(text_lora)),
        "training_config": json.dumps(training_config or {}, default=str),
    }
    metadata.update(extra_metadata or {})
    path = Path(path)
    save_safetensors_atomic(tensors, path, metadata)
    logger.info("Wrote LaVi-Bridge %s (%s, %d vision + %d text LoRA layers, rank %s)", path.name, recipe.value, len(vision_lora), len(text_lora), rank)
    return path


def _what_else(path: Path, metadata: Mapping[str, str], keys: Sequence[str]) -> str:
    if metadata.get("format") == "x2i.gluenet":
        return "a GlueNet of this pack (load it with the X2I GlueNet Loader)"
    if "x2i.checkpoint" in metadata:
        return (
            "a training checkpoint (run.output_dir/checkpoints/...), which holds optimiser state; use the exported "
            "bridge file next to it instead"
        )
    if any("lora_unet_" in k or "lora_A" in k or "lora_te" in k for k in keys):
        return "a named LoRA for another loader (kohya / diffusers / PEFT), not a LaVi-Bridge"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "a Stable Diffusion checkpoint"
    return f"an unknown safetensors file ({describe_keys(keys)})"


def read_trained_bridge_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a bridge file (no tensors read), or :class:`LaViBridgeFileError` saying what it is."""
    path = Path(path)
    if not path.is_file():
        raise LaViBridgeFileError(f"LaVi-Bridge file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
    except Exception as exc:
        raise LaViBridgeFileError(
            f"{path.name} is not a readable safetensors file ({type(exc).__name__}: {str(exc)[:200]}); it may be truncated, "
            f"or a released lora_*.pt (pick the released folder instead). {_FIX}"
        ) from exc
    if metadata.get("format") != FORMAT_NAME:
        raise LaViBridgeFileError(f"{path.name} is not a LaVi-Bridge file of this pack: it looks like {_what_else(path, metadata, keys)}. {_FIX}")
    if metadata.get("format_version") not in SUPPORTED_VERSIONS:
        raise LaViBridgeFileError(
            f"{path.name} has LaVi-Bridge format version {metadata.get('format_version')!r}; this ComfyUI-X2I reads "
            f"versions {', '.join(SUPPORTED_VERSIONS)}. Update the node pack."
        )
    return metadata


def is_trained_bridge_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a bridge file of this pack (for listing files; never raises)."""
    try:
        read_trained_bridge_metadata(path)
    except LaViBridgeFileError:
        return False
    return True


def _metadata_field(source: str, metadata: Mapping[str, str], key: str, parse=str):
    if key not in metadata:
        raise LaViBridgeFileError(f"{source}: metadata lacks '{key}'; the file is damaged or was edited. {_FIX}")
    try:
        return parse(metadata[key])
    except (ValueError, TypeError) as exc:
        raise LaViBridgeFileError(f"{source}: metadata '{key}' = {metadata[key][:100]!r} is not valid ({exc}). {_FIX}") from exc


def _json(text: str):
    return json.loads(text)


def load_trained_bridge(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> TrainedBridge:
    """Load a bridge file strictly: every listed layer has both tensors, one rank, no stray tensors, the
    adapter fits its config; the adapter comes back frozen in eval mode, in ``dtype``. LoRA tensors keep
    their stored dtype (map them with :func:`map_lora_pairs` against the model's targets before use)."""
    path = Path(path)
    source = path.name
    metadata = read_trained_bridge_metadata(path)
    recipe_name = _metadata_field(source, metadata, "recipe")
    try:
        recipe = LaViBridgeRecipe(recipe_name)
    except ValueError:
        raise LaViBridgeFileError(
            f"{source}: recipe {recipe_name!r} is unknown to this ComfyUI-X2I (knows {', '.join(r.value for r in LaViBridgeRecipe)}); "
            "update the node pack"
        ) from None
    diffusion_model = _metadata_field(source, metadata, "diffusion_model")
    family = _metadata_field(source, metadata, "language_model_family")
    if recipe_for(family, diffusion_model) != recipe:
        raise LaViBridgeFileError(f"{source}: recipe {recipe.value} does not belong to a {family} bridge to {diffusion_model}")
    adapter_config = _metadata_field(source, metadata, "adapter_config", _json)
    try:
        config = TextAdapterConfig(**{k: adapter_config[k] for k in ("in_dim", "int_dim", "out_dim")},
                                   pooled_dim=adapter_config.get("pooled_dim", 0))
    except (KeyError, TypeError, AttributeError) as exc:
        raise LaViBridgeFileError(f"{source}: adapter_config {adapter_config!r} lacks in_dim/int_dim/out_dim. {_FIX}") from exc
    vision_names = _metadata_field(source, metadata, "vision_layers", _json)
    text_names = _metadata_field(source, metadata, "text_layers", _json)
    rank = _metadata_field(source, metadata, "lora_rank", int)
    context_dim = _metadata_field(source, metadata, "context_dim", int)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def pairs(prefix: str, names: Sequence[str]) -> dict[str, LoraPair]:
        out: dict[str, LoraPair] = {}
        for name in names:
            up, down = tensors.pop(f"{prefix}.{name}.{UP}", None), tensors.pop(f"{prefix}.{name}.{DOWN}", None)
            if up is None or down is None:
                raise LaViBridgeFileError(f"{source}: {prefix} LoRA layer {name} is listed but its tensors are missing. {_FIX}")
            _check_pair(source, name, up, down, rank)
            out[name] = (up, down)
        return out

    vision = pairs("vision", vision_names)
    text = pairs("text", text_names)
    if not vision:
        raise LaViBridgeFileError(f"{source}: the file lists no vision LoRA layers. {_FIX}")
    adapter_state = {k[len("adapter."):]: tensors.pop(k) for k in [k for k in tensors if k.startswith("adapter.")]}
    if tensors:
        raise LaViBridgeFileError(f"{source}: {describe_keys(tensors)} are not listed in its metadata; the file was edited. {_FIX}")
    try:
        adapter = build_and_load(lambda: TextAdapter(config), {k: v.float() for k, v in adapter_state.items()},
                                 LaViBridgeFileError, f"{source}: the adapter weights do not fit its adapter_config {adapter_config}")
    except LaViBridgeFileError as exc:
        raise LaViBridgeFileError(f"{exc}. {_FIX}") from None
    adapter = adapter.to(dtype).eval().requires_grad_(False)
    if config.out_dim != context_dim:
        raise LaViBridgeFileError(f"{source}: the adapter gives {config.out_dim}-wide features but context_dim is {context_dim}")
    if bool(config.pooled_dim) != (diffusion_model == "sdxl"):
        raise LaViBridgeFileError(f"{source}: a bridge to {diffusion_model} with adapter pooled_dim {config.pooled_dim}; the file was "
                                  f"edited. {_FIX}")
    config_text = text_config(recipe)
    max_length = _metadata_field(source, metadata, "max_length", int)
    use_mask = _metadata_field(source, metadata, "use_attention_mask", _json)
    if (max_length, use_mask) != (config_text.max_length, config_text.use_attention_mask):
        raise LaViBridgeFileError(
            f"{source}: max_length {max_length} / attention mask {use_mask} differ from recipe {recipe.value} "
            f"({config_text.max_length} / {config_text.use_attention_mask}); the file was edited. {_FIX}"
        )
    logger.info(
        "Loaded LaVi-Bridge %s (%s, adapter %d -> %d -> %d, %d vision + %d text LoRA layers, rank %d)",
        source, recipe.value, config.in_dim, config.int_dim, config.out_dim, len(vision), len(text), rank,
    )
    return TrainedBridge(
        recipe=recipe,
        language_model_family=family,
        diffusion_model=diffusion_model,
        adapter=adapter,
        vision_lora=vision,
        text_lora=text,
        rank=rank,
        max_length=max_length,
        use_attention_mask=use_mask,
        context_dim=context_dim,
        metadata=metadata,
    )


# ---------------------------------------------------------------------------------------------------
# The released folder layout

RELEASED_ADAPTER_FOLDER = "adapter"
RELEASED_VISION_LORA = "lora_vis.pt"
RELEASED_TEXT_LORA = "lora_text.pt"


def write_released_layout(
    folder: str | os.PathLike[str],
    *,
    adapter: TextAdapter,
    vision_pairs: Sequence[LoraPair],
    text_pairs: Sequence[LoraPair],
) -> Path:
    """``folder/lora_vis.pt``, ``folder/lora_text.pt`` (``torch.save`` of fp16 ``[up_0, down_0, up_1, ...]``
    in the official positional order, as the release) and ``folder/adapter/`` (``config.json`` +
    ``diffusion_pytorch_model.safetensors``, as diffusers' ``save_pretrained`` writes them). Every file is
    written atomically and flushed to disk (:func:`..weights.write_atomic`): a full disk leaves the
    previous file or none, never a torn one or a temp file, and comes out as an ``OSError`` naming it."""
    folder = Path(folder)
    (folder / RELEASED_ADAPTER_FOLDER).mkdir(parents=True, exist_ok=True)

    def flat(pairs: Sequence[LoraPair]) -> list[torch.Tensor]:
        # clone(): a view would drag its whole storage into the file.
        return [t.detach().to("cpu", torch.float16).contiguous().clone() for pair in pairs for t in pair]

    torch_save_atomic(flat(vision_pairs), folder / RELEASED_VISION_LORA)
    torch_save_atomic(flat(text_pairs), folder / RELEASED_TEXT_LORA)
    config = {
        "_class_name": OFFICIAL_CLASS_NAME,
        "_diffusers_version": DIFFUSERS_VERSION_TAG,
        "in_dim": adapter.config.in_dim,
        "int_dim": adapter.config.int_dim,
        "out_dim": adapter.config.out_dim,
    }
    adapter_state = {k: v.detach().to("cpu", torch.float32) for k, v in adapter.state_dict().items()}
    save_safetensors_atomic(adapter_state, folder / RELEASED_ADAPTER_FOLDER / ADAPTER_WEIGHTS, DIFFUSERS_WEIGHTS_METADATA)
    write_text_atomic(folder / RELEASED_ADAPTER_FOLDER / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    logger.info("Wrote released LaVi-Bridge layout %s (%d vision, %d text LoRA pairs)", folder, len(vision_pairs), len(text_pairs))
    return folder


def export_released_layout(bridge: TrainedBridge, folder: str | os.PathLike[str]) -> Path:
    """A pack bridge file's content as a released folder (``lora_vis.pt``, ``lora_text.pt``, ``adapter/``)."""
    if not bridge.text_lora:
        raise LaViBridgeFileError(
            "this bridge was trained without a language-model LoRA, and the released layout always has lora_text.pt; "
            "use the pack file"
        )
    return write_released_layout(folder, adapter=bridge.adapter, vision_pairs=bridge.vision_pairs(), text_pairs=bridge.text_pairs())
