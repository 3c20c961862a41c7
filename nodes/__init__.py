"""ComfyUI node classes of X2I: thin wrappers over gluenet/, encoders/ and friends."""

from __future__ import annotations

import logging
from pathlib import Path

import folder_paths
from comfy_api.v0_0_2 import ComfyExtension, io
from typing_extensions import override

from ..weights import copy_missing_files
from .audio import AUDIO_ENCODER_FOLDER, X2IAudioEncoderLoader, X2IGlueGenAudioEncode
from .block_conditioning import X2IBlockConditioning
from .common import GLUENET_EXTENSIONS, GLUENET_FOLDER, TEXT_ENCODER_FOLDERS, register_model_folder
from .fusion import X2ITopKFusion
from .gluegen import X2IGlueGenTextEncode, X2IGlueNetLoader, X2IGlueNetRouter
from .lavibridge import LAVI_BRIDGE_FOLDER, X2ILaViBridgeLoader, X2ILaViBridgeTextEncode
from .pointcloud import (
    POINT_ENCODER_EXTENSIONS,
    POINT_ENCODER_FOLDER,
    X2IGlueGenPointCloudEncode,
    X2IPointCloudEncoderLoader,
    X2IPointCloudLoader,
)
from .text_encoders import X2ILanguageModelLoader, X2ITextEncoderLoader
from .uvit import X2IUViTLoader

register_model_folder(GLUENET_FOLDER, GLUENET_EXTENSIONS)
register_model_folder(POINT_ENCODER_FOLDER, POINT_ENCODER_EXTENSIONS)
register_model_folder(LAVI_BRIDGE_FOLDER, ())
register_model_folder(AUDIO_ENCODER_FOLDER, (".pt", ".pth", ".ckpt"))
for _folder in TEXT_ENCODER_FOLDERS:
    register_model_folder(_folder, ())

logger = logging.getLogger(__name__)
# The sound and point cloud the shipped workflows name, so they run with only the models missing.
SAMPLE_INPUTS = Path(__file__).resolve().parents[1] / "workflows" / "inputs"


class X2IExtension(ComfyExtension):
    @override
    async def on_load(self) -> None:
        input_dir = folder_paths.get_input_directory()
        copied = copy_missing_files(SAMPLE_INPUTS, input_dir)
        if copied:
            logger.info("X2I: copied the sample inputs %s into %s", ", ".join(copied), input_dir)

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            X2ITextEncoderLoader,
            X2IGlueNetLoader,
            X2IGlueNetRouter,
            X2IGlueGenTextEncode,
            X2IAudioEncoderLoader,
            X2IGlueGenAudioEncode,
            X2IPointCloudLoader,
            X2IPointCloudEncoderLoader,
            X2IGlueGenPointCloudEncode,
            X2ITopKFusion,
            X2ILanguageModelLoader,
            X2ILaViBridgeLoader,
            X2ILaViBridgeTextEncode,
            X2IUViTLoader,
            X2IBlockConditioning,
        ]
