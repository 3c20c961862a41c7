"""Loading Hugging Face text encoders (XLM-Roberta, T5, BERT, CLIP text, ...) and language models (T5,
Llama, ...) as X2I encoders."""

from __future__ import annotations

import comfy.model_management as mm
from comfy_api.v0_0_2 import io

from ..encoders import list_encoder_folders, load_text_encoder
from .common import (
    CATEGORY,
    DTYPE_CHOICES,
    DTYPE_TOOLTIP,
    ENCODER_OUTPUT_TOOLTIP,
    TEXT_ENCODER_FOLDERS,
    X2IEncoder,
    X2INode,
    encoder_dtype,
    encoder_patcher,
    model_folder_paths,
    resolve_encoder_folder,
)


def _load_managed(folder_name: str, dtype: str):
    """A Hugging Face folder from models/x2i_text_encoders (or models/text_encoders), loaded offline and handed to ComfyUI's model management."""
    module = load_text_encoder(resolve_encoder_folder(folder_name), dtype=encoder_dtype(dtype, mm.text_encoder_device()))
    return encoder_patcher(module)


class X2ITextEncoderLoader(X2INode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="X2ITextEncoderLoader",
            display_name="X2I Text Encoder Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads a Hugging Face text encoder folder (XLM-Roberta, T5, BERT, CLIP text...) offline "
            "from models/x2i_text_encoders, for GlueNets and LaVi-Bridge adapters.",
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
                    tooltip=DTYPE_TOOLTIP,
                ),
            ],
            outputs=[X2IEncoder.Output(display_name="encoder", tooltip=ENCODER_OUTPUT_TOOLTIP)],
        )

    @classmethod
    def execute(cls, encoder_name: str, dtype: str) -> io.NodeOutput:
        return io.NodeOutput(_load_managed(encoder_name, dtype))


class X2ILanguageModelLoader(X2INode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="X2ILanguageModelLoader",
            display_name="X2I Language Model Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads a Hugging Face language model folder (T5, Llama, BERT...) offline from "
            "models/x2i_text_encoders for LaVi-Bridge.",
            inputs=[
                io.Combo.Input("model_name", options=list_encoder_folders(model_folder_paths(TEXT_ENCODER_FOLDERS)),
                               tooltip="A Hugging Face folder (config.json, tokenizer, weights), e.g. t5-large or Llama-2-7b-hf."),
                io.Combo.Input("dtype", options=list(DTYPE_CHOICES), default="auto", tooltip=DTYPE_TOOLTIP),
            ],
            outputs=[X2IEncoder.Output(display_name="language_model", tooltip="The language model, for X2I LaVi-Bridge Loader.")],
        )

    @classmethod
    def execute(cls, model_name: str, dtype: str) -> io.NodeOutput:
        return io.NodeOutput(_load_managed(model_name, dtype))
