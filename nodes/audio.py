"""Sound to image: AudioCLIP or CLAP embeddings through a sound GlueNet into conditioning for its model family (SD1.x, SDXL)."""

from __future__ import annotations

import os
from pathlib import Path

import comfy.model_management as mm
import folder_paths
from comfy_api.v0_0_2 import io

from ..encoders.audioclip import load_audioclip_audio
from ..encoders.clap import is_clap_folder, load_clap_audio
from ..encoders.text import list_encoder_folders
from ..paths import find_in_folders
from .common import (
    CATEGORY,
    CONDITIONING_OUTPUT_TOOLTIP,
    DTYPE_CHOICES,
    DTYPE_TOOLTIP,
    ENCODER_INPUT_TOOLTIP,
    ENCODER_OUTPUT_TOOLTIP,
    GLUENET_INPUT_TOOLTIP,
    GlueNetType,
    LoadedGlueNet,
    X2IEncoder,
    X2INode,
    embedding_encoder_and_gluenet,
    encoder_dtype,
    encoder_patcher,
    translate_to_conditioning,
)

AUDIO_ENCODER_FOLDER = "audio_encoders"


def _audio_encoder_choices() -> list[str]:
    files = [name for name in folder_paths.get_filename_list(AUDIO_ENCODER_FOLDER) if name.lower().endswith((".pt", ".pth", ".ckpt"))]
    roots = folder_paths.get_folder_paths(AUDIO_ENCODER_FOLDER)
    folders = [name for name in list_encoder_folders(roots) if any(is_clap_folder(Path(root) / name) for root in roots)]
    return sorted(files) + folders


class X2IAudioEncoderLoader(X2INode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="X2IAudioEncoderLoader",
            display_name="X2I Audio Encoder Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads a sound encoder from models/audio_encoders: the audio branch of AudioCLIP "
            "(AudioCLIP-Full-Training.pt, what GlueGen's sound GlueNet was trained on) or a CLAP folder.",
            inputs=[
                io.Combo.Input("encoder_name", options=_audio_encoder_choices(),
                               tooltip="AudioCLIP-Full-Training.pt or a Hugging Face CLAP folder in models/audio_encoders."),
                io.Combo.Input("dtype", options=list(DTYPE_CHOICES), default="auto", tooltip=DTYPE_TOOLTIP),
            ],
            outputs=[X2IEncoder.Output(display_name="encoder", tooltip=ENCODER_OUTPUT_TOOLTIP)],
        )

    @classmethod
    def execute(cls, encoder_name: str, dtype: str) -> io.NodeOutput:
        torch_dtype = encoder_dtype(dtype, mm.text_encoder_device())
        folder = find_in_folders(folder_paths.get_folder_paths(AUDIO_ENCODER_FOLDER), encoder_name, os.path.isdir)
        if folder is not None:
            return io.NodeOutput(encoder_patcher(load_clap_audio(folder, dtype=torch_dtype)))
        path = folder_paths.get_full_path_or_raise(AUDIO_ENCODER_FOLDER, encoder_name)
        module = load_audioclip_audio(path).to(torch_dtype)
        module.name = os.path.basename(path)
        return io.NodeOutput(encoder_patcher(module))


class X2IGlueGenAudioEncode(X2INode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="X2IGlueGenAudioEncode",
            display_name="X2I GlueGen Audio Encode",
            category=f"{CATEGORY}/gluegen",
            description="Turns sound (from Load Audio) into SD1.x or SDXL conditioning through a sound GlueNet. One "
            "conditioning per clip of the batch. For the negative, use CLIP Text Encode with an empty prompt.",
            inputs=[
                X2IEncoder.Input("encoder", tooltip=ENCODER_INPUT_TOOLTIP),
                GlueNetType.Input("gluenet", tooltip=GLUENET_INPUT_TOOLTIP),
                io.Audio.Input("audio", tooltip="Sound from Load Audio: any rate and channel count; the first 4 s are used."),
            ],
            outputs=[io.Conditioning.Output(tooltip=CONDITIONING_OUTPUT_TOOLTIP)],
        )

    @classmethod
    def execute(cls, encoder, gluenet: LoadedGlueNet, audio: dict) -> io.NodeOutput:
        audio_encoder, gluenet = embedding_encoder_and_gluenet(encoder, gluenet, "encode_audio", "X2I Audio Encoder Loader")
        waveform, sample_rate = audio["waveform"], int(audio["sample_rate"])
        return io.NodeOutput(
            translate_to_conditioning(encoder, gluenet, lambda: audio_encoder.encode_audio(waveform, sample_rate))
        )
