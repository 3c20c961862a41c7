"""Loading Hugging Face text encoders (XLM-Roberta, T5, BERT, CLIP text, ...) as X2I encoders."""

from __future__ import annotations

import comfy.model_management as mm
from comfy_api.latest import io

from ..encoders import list_encoder_folders, load_text_encoder
from .common import (
    CATEGORY,
    DTYPE_CHOICES,
    TEXT_ENCODER_FOLDERS,
    X2IEncoder,
    encoder_dtype,
    encoder_patcher,
    model_folder_paths,
    resolve_encoder_folder,
)


class X2ITextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="X2ITextEncoderLoader",
            display_name="X2I Text Encoder Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads a Hugging Face text encoder folder (XLM-Roberta, T5, BERT, CLIP text...) offline "
            "from models/text_encoders, for GlueNets and LaVi-Bridge adapters.",
            inputs=[
                io.Combo.Input(
                    "encoder_name",
                    options=list_encoder_folders(model_folder_paths(TEXT_ENCODER_FOLDERS)),
                    tooltip="A folder with config.json, tokenizer files and weights, e.g. xlm-roberta-large.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=list(DTYPE_CHOICES),
                    default="auto",
                    tooltip="auto: ComfyUI's text-encoder precision on GPU, fp32 on CPU.",
                ),
            ],
            outputs=[X2IEncoder.Output(display_name="encoder")],
        )

    @classmethod
    def execute(cls, encoder_name: str, dtype: str) -> io.NodeOutput:
        folder = resolve_encoder_folder(encoder_name)
        module = load_text_encoder(folder, dtype=encoder_dtype(dtype, mm.text_encoder_device()))
        return io.NodeOutput(encoder_patcher(module))
