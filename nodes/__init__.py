"""ComfyUI node classes of X2I: thin wrappers over gluenet/, encoders/ and friends."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

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


class X2IExtension(ComfyExtension):
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
