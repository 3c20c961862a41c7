"""Source encoders whose features GlueNets and LaVi-Bridge adapters translate.

Every encoder is an ``nn.Module`` with a plain ``device`` attribute (ComfyUI's ModelPatcher sets it),
a ``name``, and one encode method: ``encode(texts)`` for text, ``encode_audio(waveform, rate)`` for
sound, ``encode_points(points)`` for point clouds.
"""

from .audio_input import AudioInputError, to_gluegen_waveform
from .audioclip import AudioCLIPAudioEncoder, AudioCLIPFileError, load_audioclip_audio
from .clap import ClapAudioEncoder, load_clap_audio
from .pointbert import PointBERTCheckpointError, PointBERTConfig, PointBERTEncoder, load_ulip_pointbert
from .pointcloud import PointCloud, PointCloudError, load_point_cloud, normalize_to_unit_sphere, render_preview
from .text import HFTextEncoder, TextEncoderFolderError, list_encoder_folders, load_text_encoder

__all__ = [
    "AudioCLIPAudioEncoder",
    "AudioCLIPFileError",
    "AudioInputError",
    "ClapAudioEncoder",
    "HFTextEncoder",
    "PointBERTCheckpointError",
    "PointBERTConfig",
    "PointBERTEncoder",
    "PointCloud",
    "PointCloudError",
    "TextEncoderFolderError",
    "list_encoder_folders",
    "load_audioclip_audio",
    "load_clap_audio",
    "load_point_cloud",
    "load_ulip_pointbert",
    "load_text_encoder",
    "normalize_to_unit_sphere",
    "render_preview",
    "to_gluegen_waveform",
]
