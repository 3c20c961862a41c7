"""Intermediate-fusion U-ViT (Hu, Jia, Rostami 2024): a ViT diffusion backbone with long skips whose
text enters only its middle blocks, plus U-ViT's early fusion; pure PyTorch, no ComfyUI needed."""

from .checkpoint import (
    LoadedUViT,
    UViTFileError,
    build_uvit,
    convert_uvit_file,
    load_uvit,
    load_uvit_state_dict,
    probe_uvit_file,
    save_uvit,
)
from .config import PAPER_SETTINGS, SamplingConvention, UViTConfig, UViTConfigError
from .model import UViT, UViTInputError, timestep_embedding

__all__ = [
    "PAPER_SETTINGS",
    "LoadedUViT",
    "SamplingConvention",
    "UViT",
    "UViTConfig",
    "UViTConfigError",
    "UViTFileError",
    "UViTInputError",
    "build_uvit",
    "convert_uvit_file",
    "load_uvit",
    "load_uvit_state_dict",
    "probe_uvit_file",
    "save_uvit",
    "timestep_embedding",
]
