"""ComfyUI node classes of X2I: thin wrappers over gluenet/, encoders/ and friends."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .common import GLUENET_EXTENSIONS, GLUENET_FOLDER, TEXT_ENCODER_FOLDERS, register_model_folder
from .gluegen import X2IGlueGenTextEncode, X2IGlueNetLoader, X2IGlueNetRouter
from .text_encoders import X2ITextEncoderLoader

register_model_folder(GLUENET_FOLDER, GLUENET_EXTENSIONS)
for _folder in TEXT_ENCODER_FOLDERS:
    register_model_folder(_folder, ())


class X2IExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [X2ITextEncoderLoader, X2IGlueNetLoader, X2IGlueNetRouter, X2IGlueGenTextEncode]
