"""LaVi-Bridge: a language model joins the user's own SD1.x, SDXL or PixArt MODEL through an adapter plus LoRA in both.

A bridge is a released folder (``models/lavi_bridge/<name>/`` with ``lora_vis.pt``, ``lora_text.pt``,
``adapter/``) or a ``.safetensors`` file written by this pack's bridge trainer (``bridge/trained.py``:
named LoRA tensors, the adapter and the recipe in one file). The U-Net LoRA becomes ordinary
ModelPatcher patches on a clone of the MODEL, so every sampler, other LoRAs and ControlNet keep
working and the weights are merged once (no per-step cost); the language-model LoRA is patched onto a
clone of the language model the same way (a trained bridge without one leaves the language model as is).
The U-Net LoRA's layers come from the connected MODEL's own U-Net as ComfyUI detected it (SD1.x, or any SDXL-family
U-Net: SDXL, SSD-1B, Segmind-Vega ...); a bridge trained for SDXL also makes SDXL's pooled vector (its adapter's
pooled head) and the size conditioning of core CLIPTextEncodeSDXL.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import comfy.latent_formats
import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch
from comfy_api.v0_0_2 import io

from ..bridge import (
    Bridge,
    LaViBridgeFileError,
    LaViBridgeRecipe,
    check_widths,
    encode_prompt_for_bridge,
    is_bridge,
    load_bridge,
    map_lora_pairs,
    may_be_bridge,
    pixart_lora_targets,
    probe_bridge,
    text_lora_targets,
    unet_lora_targets,
)
from ..bridge.load import TRAINED_BRIDGE_SUFFIX, diffusion_model_name
from ..bridge.lora import UNetStructure, named_lora_state_dict
from ..encoders import HFTextEncoder
from ..errors import X2IError, X2IFileNotFoundError
from ..families import FAMILIES, Family
from ..paths import disk_state, find_in_folders
from .common import (
    CATEGORY,
    X2IEncoder,
    X2INode,
    encoder_patcher,
    encoder_with,
    load_fully,
    model_family,
    require_valid,
    to_conditioning,
)

logger = logging.getLogger(__name__)

LAVI_BRIDGE_FOLDER = "lavi_bridge"
BridgeType = io.Custom("X2I_BRIDGE")
PIXART_CONTEXT_DIM = 4096  # T5-XXL width that PixArt's frozen caption projection expects
PIXART_ALPHA_CAPTION_TOKENS = 120  # PixArt-α's y_embedding length (PixArt-Σ: 300)
QUALITY_SUFFIX_TOOLTIP = "Append the official ', best quality, extremely detailed, 4k resolution' to the prompt."
BRIDGE_NAME_TOOLTIP = (
    "A released LaVi-Bridge folder (lora_vis.pt, lora_text.pt, adapter/) or a trained .safetensors bridge "
    "from this pack's bridge trainer, in models/lavi_bridge."
)


@dataclass(frozen=True)
class LoadedBridge:
    """The X2I_BRIDGE value: the LoRA-patched language model, the adapter, how to tokenise, and the family of the
    bridged U-Net (SD1.x, SDXL: what its conditioning is checked against when sampling; None: PixArt)."""

    language_model: comfy.model_patcher.ModelPatcher
    adapter: comfy.model_patcher.ModelPatcher
    recipe: LaViBridgeRecipe
    family: Family | None = None


def _bridge_names() -> list[str]:
    """Released folders and trained bridge files in models/lavi_bridge (see :func:`..bridge.is_bridge`)."""
    found = set()
    for root in folder_paths.get_folder_paths(LAVI_BRIDGE_FOLDER):
        if os.path.isdir(root):
            found.update(name for name in os.listdir(root) if is_bridge(os.path.join(root, name)))
    return sorted(found)


def _resolve_bridge(name: str) -> Path:
    """The released folder or the trained ``.safetensors`` file called ``name`` in models/lavi_bridge."""
    path = find_in_folders(folder_paths.get_folder_paths(LAVI_BRIDGE_FOLDER), name, may_be_bridge)
    if path is not None:
        return Path(path)
    raise X2IFileNotFoundError(
        f"LaVi-Bridge '{name}' not found in models/{LAVI_BRIDGE_FOLDER}: it takes released folders (with an adapter/ "
        f"subfolder) and trained {TRAINED_BRIDGE_SUFFIX} bridge files"
    )


def _unet_config(model) -> dict:
    return getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}


def _diffusion_kind(model) -> str | None:
    """``"pixart"``, the family of an SD-style U-Net (``"sd1"``: 768-wide context; ``"sdxl"``: 2048-wide context and
    2816-wide class embedding, :func:`.common.model_family`), or None for any other MODEL."""
    unet_config = _unet_config(model)
    if str(unet_config.get("image_model", "")).startswith("pixart"):
        return "pixart"
    family, _ = model_family(model)
    if family is not None and "num_res_blocks" in unet_config:
        return family.key
    return None


def _describe_model(model) -> str:
    kind = _diffusion_kind(model)
    _, name = model_family(model)
    if kind:
        return diffusion_model_name(kind, f"ComfyUI's {name}")
    return f"{name} with context width {_unet_config(model).get('context_dim')}"


def _vision_side(model, bridge: Bridge) -> tuple[list, dict, int, Family | None]:
    """(LoRA targets in the official order, diffusers name -> ComfyUI weight key, text context width, family) of the
    connected MODEL, through ComfyUI's own key converters (PixArt's fused qkv / kv as offsets); a bridge for another
    diffusion model is refused naming both."""
    unet_config = _unet_config(model)
    kind = _diffusion_kind(model)
    recipe = bridge.recipe
    bridge.check_diffusion_model(kind, _describe_model(model))  # a trained bridge names what it was trained for
    if bridge.diffusion_model == "pixart":
        if kind != "pixart":
            raise X2IError(
                f"{recipe.value} bridges T5 to PixArt-XL-2, but the connected MODEL is {_describe_model(model)}: "
                "connect a PixArt checkpoint (or use t5_unet / llama2_unet with SD1.x, or a bridge trained for SDXL)"
            )
        targets = pixart_lora_targets(unet_config.get("depth", 28), unet_config.get("hidden_size", 1152))
        converted = comfy.utils.pixart_to_diffusers(unet_config, output_prefix="diffusion_model.")
        return (targets, {k[: -len(".weight")]: v for k, v in converted.items() if k.endswith(".weight")},
                PIXART_CONTEXT_DIM, None)
    if kind != bridge.diffusion_model:  # a release for SD1.x (trained files were refused above)
        raise X2IError(
            f"{recipe.value} is for SD1.x U-Nets (768-wide text context), but the connected MODEL is "
            f"{_describe_model(model)}: connect an SD1.x checkpoint"
            + (", or use a LaVi-Bridge trained for SDXL" if kind == "sdxl" else "")
        )
    structure = UNetStructure.from_comfy_config(unet_config)  # the MODEL's own U-Net (SDXL, SSD-1B, Vega ...)
    converted = comfy.utils.unet_to_diffusers(unet_config)
    key_map = {k[: -len(".weight")]: f"diffusion_model.{v}" for k, v in converted.items() if k.endswith(".weight")}
    return unet_lora_targets(structure), key_map, structure.cross_attention_dim, FAMILIES[kind]


def _check_pooled(bridge: Bridge, family: Family | None) -> None:
    """A bridge to SDXL makes SDXL's pooled vector with its adapter's pooled head; one to SD1.x or PixArt has none."""
    wanted = family.pooled_dim if family is not None else 0
    has = bridge.adapter.config.pooled_dim
    if has != wanted:
        raise LaViBridgeFileError(
            f"{bridge.name}: its adapter makes "
            + (f"a {has}-wide pooled vector" if has else "no pooled vector")
            + f", but {family.name if family else 'PixArt'} reads "
            + (f"a {wanted}-wide one" if wanted else "none")
            + ": the file does not fit the diffusion model it names; export it again with this pack's bridge trainer"
        )


def _pixart_alpha_latents(model) -> None:
    """Give a PixArt-α MODEL that ComfyUI took for PixArt-Σ its SD latent scale again, on the clone.

    ComfyUI 0.3.64 tells α from Σ by the micro-condition embedder, which PixArt-XL-2-512x512 (the
    model t5_transformer was trained on) lacks, so it gets Σ's SDXL latent scale (0.13025 instead
    of 0.18215). Its 120-token caption embedding (Σ has 300) says it is α.
    """
    unet_config = model.model.model_config.unet_config
    if unet_config.get("image_model") == "pixart_sigma" and unet_config.get("model_max_length") == PIXART_ALPHA_CAPTION_TOKENS:
        model.add_object_patch("latent_format", comfy.latent_formats.SD15())
        logger.info("LaVi-Bridge: PixArt-α checkpoint (120 caption tokens) loaded as PixArt-Σ; using the SD latent scale it was trained with")


def _patched(patcher, mapped: dict, key_map: dict[str, str], strength: float):
    missing = sorted(set(mapped) - set(key_map))
    if missing:
        raise X2IError(f"{len(missing)} LoRA layers have no weight in this model (e.g. {missing[0]})")
    patches = comfy.lora.load_lora(named_lora_state_dict(mapped), {name: key_map[name] for name in mapped})
    clone = patcher.clone()
    added = clone.add_patches(patches, strength)
    if len(added) != len(mapped):
        raise X2IError(f"only {len(added)} of {len(mapped)} LoRA layers found a weight to patch in this model")
    return clone


class X2ILaViBridgeLoader(X2INode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="X2ILaViBridgeLoader",
            display_name="X2I LaVi-Bridge Loader",
            category=f"{CATEGORY}/loaders",
            description="Applies a LaVi-Bridge (a released folder models/lavi_bridge/<name>/ with lora_vis.pt, lora_text.pt, "
            "adapter/, or a trained .safetensors bridge from this pack's bridge trainer) to your SD1.x, SDXL or PixArt MODEL "
            "and to the language model. The MODEL keeps working with every sampler, LoRA and ControlNet.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x MODEL (t5_unet, llama2_unet), an SDXL MODEL (a bridge trained for "
                               "SDXL) or PixArt-XL-2 (t5_transformer)."),
                X2IEncoder.Input("language_model", tooltip="The bridge's language model, from X2I Language Model Loader."),
                io.Combo.Input("bridge_name", options=_bridge_names(), tooltip=BRIDGE_NAME_TOOLTIP),
                io.Float.Input("unet_strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="Scale of the LoRA in the diffusion model (1: as trained)."),
                io.Float.Input("text_strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="Scale of the LoRA in the language model (1: as trained)."),
            ],
            outputs=[
                io.Model.Output(tooltip="A clone of the MODEL with the bridge's LoRA, for KSampler."),
                BridgeType.Output(display_name="bridge", tooltip="The bridged language model and adapter, for X2I LaVi-Bridge Text Encode."),
            ],
        )

    @classmethod
    def check_inputs(cls, bridge_name: str, **_) -> str | None:
        try:
            probe_bridge(_resolve_bridge(bridge_name), bridge_name)
        except (FileNotFoundError, LaViBridgeFileError) as exc:
            return str(exc)
        return None

    @classmethod
    def fingerprint_inputs(cls, bridge_name: str, **_) -> tuple | None:
        try:
            return disk_state(str(_resolve_bridge(bridge_name)))
        except FileNotFoundError:
            return None

    @classmethod
    def execute(cls, model, language_model, bridge_name: str, unet_strength: float, text_strength: float) -> io.NodeOutput:
        require_valid(cls, unet_strength=unet_strength, text_strength=text_strength)  # linked values skip validation
        path = _resolve_bridge(bridge_name)
        lm: HFTextEncoder = encoder_with(language_model, "encode", "X2I Language Model Loader")
        bridge = load_bridge(path, name=bridge_name)
        targets, key_map, context_dim, family = _vision_side(model, bridge)
        check_widths(bridge.adapter, lm.hidden_size, context_dim)
        _check_pooled(bridge, family)
        vision_pairs = map_lora_pairs(bridge.vision_pairs, targets, bridge.vision_source)
        bridged_model = _patched(model, vision_pairs, key_map, unet_strength)
        if bridge.recipe == LaViBridgeRecipe.T5_TRANSFORMER:
            _pixart_alpha_latents(bridged_model)
        if bridge.text_pairs:
            text_targets = text_lora_targets(lm.transformer, bridge.language_model_family)
            text_pairs = map_lora_pairs(bridge.text_pairs, text_targets, bridge.text_source)
            text_keys = {name: f"transformer.{name}.weight" for name in text_pairs}
            bridged_lm = _patched(language_model, text_pairs, text_keys, text_strength)
        else:
            logger.info("LaVi-Bridge %s has no language-model LoRA: the language model is used as it is", bridge_name)
            bridged_lm = language_model
        return io.NodeOutput(bridged_model, LoadedBridge(bridged_lm, encoder_patcher(bridge.adapter), bridge.recipe, family))


class X2ILaViBridgeTextEncode(X2INode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="X2ILaViBridgeTextEncode",
            display_name="X2I LaVi-Bridge Text Encode",
            category=f"{CATEGORY}/lavibridge",
            description="Encodes a prompt with the bridged language model and adapter into conditioning for the "
            "bridged MODEL. Use it for the negative prompt too.",
            inputs=[
                BridgeType.Input("bridge", tooltip="From X2I LaVi-Bridge Loader."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="The prompt (or the negative prompt)."),
                io.Boolean.Input("quality_suffix", default=False, tooltip=QUALITY_SUFFIX_TOOLTIP),
            ],
            outputs=[io.Conditioning.Output(tooltip="Conditioning for the bridged MODEL: 77 × 768 for SD1.x; 77 × 2048 plus the "
                                             "pooled vector and 1024² size conditioning for SDXL; 120 × 4096 for PixArt.")],
        )

    @classmethod
    def execute(cls, bridge: LoadedBridge, text: str, quality_suffix: bool) -> io.NodeOutput:
        mm.throw_exception_if_processing_interrupted()
        load_fully([bridge.language_model, bridge.adapter])
        lm: HFTextEncoder = bridge.language_model.model
        features = encode_prompt_for_bridge(bridge.recipe, lm, lm.tokenizer, text, add_prompt_suffix=quality_suffix)
        adapter = bridge.adapter.model
        param = next(adapter.parameters())
        family = bridge.family
        with torch.inference_mode():
            tokens = adapter(features.to(device=param.device, dtype=param.dtype))
            # SDXL: the pooled vector from the adapter's own tokens, as the bridge was trained.
            pooled = adapter.pooled(tokens) if family is not None and family.pooled_dim else None
        return io.NodeOutput(to_conditioning(tokens, pooled, family))
