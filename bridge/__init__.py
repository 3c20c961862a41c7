"""LaVi-Bridge: a language model (T5, Llama) bridged to a diffusion model (SD1.x U-Net, PixArt) by an
adapter and LoRA in both models. This package reads the released files and reproduces the official
text features; the ComfyUI nodes (``nodes/lavibridge.py``) wrap it."""

from .adapter import RELEASED_ADAPTERS, TextAdapter, TextAdapterConfig, check_widths, load_adapter
from .errors import LaViBridgeFileError
from .language_models import (
    OFFICIAL_PROMPT_SUFFIX,
    LaViBridgeRecipe,
    attended_tokens,
    encode_for_bridge,
    encode_prompt_for_bridge,
    load_language_model,
)
from .lora import (
    LoraTarget,
    UNetStructure,
    lora_delta,
    map_lora_pairs,
    merged_state,
    pixart_lora_targets,
    read_lora_pairs,
    text_lora_targets,
    unet_lora_targets,
)

__all__ = [
    "OFFICIAL_PROMPT_SUFFIX",
    "RELEASED_ADAPTERS",
    "LaViBridgeFileError",
    "LaViBridgeRecipe",
    "LoraTarget",
    "TextAdapter",
    "TextAdapterConfig",
    "UNetStructure",
    "attended_tokens",
    "check_widths",
    "encode_for_bridge",
    "encode_prompt_for_bridge",
    "load_adapter",
    "load_language_model",
    "lora_delta",
    "map_lora_pairs",
    "merged_state",
    "pixart_lora_targets",
    "read_lora_pairs",
    "text_lora_targets",
    "unet_lora_targets",
]
