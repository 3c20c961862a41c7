"""CLAP's audio tower (transformers ``ClapModel``) as a GlueGen sound encoder.

A maintained alternative to AudioCLIP: any CLAP folder written by ``save_pretrained`` (for instance
laion/clap-htsat-unfused) loads offline. Only the audio tower and its projection are loaded; the
embedding is L2-normalised like CLAP's contrastive space (and like AudioCLIP's, which GlueGen uses).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from .audio_input import check_sample_rate, check_waveform, resample
from .text import OFFLINE_NO_REMOTE_CODE, TextEncoderFolderError

logger = logging.getLogger(__name__)


class ClapAudioEncoder(nn.Module):
    """``encode_audio(waveform [B, C, T], sample_rate) -> [B, projection_dim]``, L2-normalised."""

    def __init__(self, model: nn.Module, feature_extractor, name: str) -> None:
        super().__init__()
        self.model = model
        self.feature_extractor = feature_extractor
        self.name = name
        self.output_dim = int(model.config.projection_dim)
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.device = torch.device("cpu")

    def prepare(self, waveform: torch.Tensor, sample_rate: int) -> dict[str, torch.Tensor]:
        """Mono, the first ``max_length_s`` seconds, resampled to CLAP's rate, then CLAP's own feature
        extractor (log-mel). Cropping first keeps the extractor from taking a random window of a long
        clip ('rand_trunc'), so the same sound always gives the same conditioning."""
        sample_rate = check_sample_rate(sample_rate)
        waveform = check_waveform(waveform).float().mean(dim=1)
        waveform = waveform[:, : int(self.feature_extractor.max_length_s * sample_rate)]
        waveform = resample(waveform, sample_rate, self.sample_rate)
        features = self.feature_extractor(
            [clip.cpu().numpy() for clip in waveform], sampling_rate=self.sample_rate, return_tensors="pt"
        )
        return {k: v for k, v in features.items() if k in ("input_features", "is_longer")}

    @torch.inference_mode()
    def encode_audio(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        param = next(self.model.parameters())
        inputs = self.prepare(waveform, sample_rate)
        inputs["input_features"] = inputs["input_features"].to(device=param.device, dtype=param.dtype)
        if "is_longer" in inputs:
            inputs["is_longer"] = inputs["is_longer"].to(param.device)
        embeds = self.model(**inputs).audio_embeds
        return F.normalize(embeds.float(), dim=-1)


CLAP_MODEL_TYPES = ("clap", "clap_audio_model")


def is_clap_folder(folder: Path) -> bool:
    """A Hugging Face folder whose config names a CLAP model (read as JSON; no model is loaded)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") in CLAP_MODEL_TYPES


def load_clap_audio(folder: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> ClapAudioEncoder:
    """Load the audio tower of a local CLAP folder (config, preprocessor_config.json, weights), offline."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise TextEncoderFolderError(f"{folder.name} has no config.json: put a whole Hugging Face CLAP folder in models/audio_encoders")
    if not (folder / "preprocessor_config.json").is_file():
        raise TextEncoderFolderError(
            f"{folder.name} has no preprocessor_config.json (CLAP's audio feature extractor settings): copy it from the "
            "model's Hugging Face repository into this folder"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(folder, **OFFLINE_NO_REMOTE_CODE)
    except (OSError, ValueError, KeyError) as exc:
        raise TextEncoderFolderError(f"{folder.name}: config.json is not a CLAP config ({str(exc)[:300]})") from exc
    if config.model_type not in CLAP_MODEL_TYPES:
        raise TextEncoderFolderError(f"{folder.name} is a '{config.model_type}' model, not CLAP")
    dtype_kwarg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = transformers.ClapAudioModelWithProjection.from_pretrained(folder, local_files_only=True, **{dtype_kwarg: dtype})
    extractor = transformers.ClapFeatureExtractor.from_pretrained(folder, local_files_only=True)
    model.eval().requires_grad_(False)
    logger.info("Loaded CLAP audio tower %s (projection %d, %s)", folder.name, model.config.projection_dim, dtype)
    return ClapAudioEncoder(model, extractor, folder.name)
