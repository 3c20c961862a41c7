"""Source encoders whose features GlueNets and LaVi-Bridge adapters translate."""

from .text import HFTextEncoder, TextEncoderFolderError, list_encoder_folders, load_text_encoder

__all__ = ["HFTextEncoder", "TextEncoderFolderError", "list_encoder_folders", "load_text_encoder"]
