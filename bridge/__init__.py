"""LaVi-Bridge: a language model (T5, Llama) bridged to a diffusion model (SD1.x or SDXL U-Net, PixArt) by an
adapter and LoRA in both models. This package reads the released files, reads and writes this pack's
trained bridge file (``trained.py``), loads either as one bridge (``load.py``) and reproduces the official
text features; the ComfyUI nodes (``nodes/lavibridge.py``) wrap it."""

from .adapter import RELEASED_ADAPTERS, TextAdapter, TextAdapterConfig, check_widths, load_adapter
from .errors import LaViBridgeFileError
from .language_models import (
    OFFICIAL_PROMPT_SUFFIX,
    LaViBridgeRecipe,
    attended_tokens,
    encode_for_bridge,
    encode_prompt_for_bridge,
    family_of_hf_config,
    family_of_hf_folder,
    family_of_recipe,
    load_language_model,
)
from .load import Bridge, is_bridge, load_bridge, may_be_bridge, probe_bridge
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
from .trained import (
    TrainedBridge,
    is_trained_bridge_file,
    load_trained_bridge,
    read_trained_bridge_metadata,
    save_trained_bridge,
    write_released_layout,
)

__all__ = [
    "OFFICIAL_PROMPT_SUFFIX",
    "RELEASED_ADAPTERS",
    "LaViBridgeFileError",
    "Bridge",
    "LaViBridgeRecipe",
    "LoraTarget",
    "TextAdapter",
    "TextAdapterConfig",
    "TrainedBridge",
    "UNetStructure",
    "attended_tokens",
    "check_widths",
    "encode_for_bridge",
    "encode_prompt_for_bridge",
    "family_of_hf_config",
    "family_of_hf_folder",
    "family_of_recipe",
    "is_bridge",
    "is_trained_bridge_file",
    "load_adapter",
    "load_bridge",
    "load_language_model",
    "load_trained_bridge",
    "lora_delta",
    "map_lora_pairs",
    "may_be_bridge",
    "merged_state",
    "pixart_lora_targets",
    "probe_bridge",
    "read_lora_pairs",
    "read_trained_bridge_metadata",
    "save_trained_bridge",
    "text_lora_targets",
    "unet_lora_targets",
    "write_released_layout",
]
