"""The frozen encoders a GlueNet is trained on, as batch functions for :mod:`training.features`.

Each modality reads its items exactly as the pack's nodes do at inference, so a trained GlueNet sees
the same features in ComfyUI as in training:

- text: the encoder's tokenizer with GlueGen's settings (77 tokens, truncation, padding to 77,
  attention mask passed), ``last_hidden_state`` for every position;
- audio: the file decoded with soundfile (libsndfile: WAV, FLAC, OGG, MP3 ...), then the encoder's
  own input convention (AudioCLIP: :func:`encoders.to_gluegen_waveform`, 44.1 kHz, first 4 s, min-max
  to the int16 range, two channels; CLAP: its feature extractor) and the L2-normalised embedding.
  Only the start of a file that the convention keeps is decoded (:func:`audio_frames_needed`): a
  10-minute recording costs what its first seconds cost, and the features are those of the whole file;
- point clouds: :func:`encoders.load_point_cloud` (meshes sampled on the surface with a fixed seed)
  and ``encode_points`` (ULIP's FPS, unit sphere, L2-normalised embedding).

An item the encoder cannot use is reported as ``"<reason>: <detail>"`` and the cache skips it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import X2IError
from ..weights import DTYPES
from .features import EncodeFn
from .gluenet_data import AudioClip
from .settings import setting

logger = logging.getLogger(__name__)


class SourceEncoderError(X2IError):
    """A source encoder that cannot be loaded for this modality."""


@dataclass
class SourceSettings:
    """The ``[source]`` section: the frozen encoder whose features the GlueNet translates."""

    encoder: str = setting("", "text: a Hugging Face folder (xlm-roberta-large, t5 ...); audio: AudioCLIP-Full-Training.pt "
                           "or a CLAP folder; point_cloud: a ULIP PointBERT .pt")
    dtype: Literal["fp32", "fp16", "bf16"] = setting("fp32", "what the encoder runs in while the feature cache is built")
    max_length: int = setting(77, "text: tokens per sentence (GlueGen: 77)")


def resolve_path(value: str, base: Path | None) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() or base is None else base / path


def load_source_encoder(modality: str, settings: SourceSettings, base: Path | None = None) -> torch.nn.Module:
    """The frozen source encoder for ``modality``, on the CPU in ``settings.dtype``."""
    from ..encoders import load_audioclip_audio, load_clap_audio, load_text_encoder, load_ulip_pointbert

    if not settings.encoder:
        raise SourceEncoderError(f"set source.encoder: the frozen {modality} encoder the GlueNet translates from")
    path = resolve_path(settings.encoder, base)
    if not path.exists():
        raise SourceEncoderError(f"source.encoder not found: {path}")
    dtype = DTYPES[settings.dtype]
    if modality == "text":
        if not path.is_dir():
            raise SourceEncoderError(f"a text source encoder is a Hugging Face folder (config.json, tokenizer, weights); {path} is a file")
        return load_text_encoder(path, dtype=dtype, max_length=settings.max_length)
    if modality == "audio":
        encoder = load_clap_audio(path, dtype=dtype) if path.is_dir() else load_audioclip_audio(path).to(dtype)
        encoder.name = path.name
        return encoder
    if path.is_dir():
        raise SourceEncoderError(f"a point-cloud source encoder is a ULIP PointBERT checkpoint file; {path} is a folder")
    encoder = load_ulip_pointbert(path).to(dtype)
    encoder.name = path.name
    return encoder


def source_item_shape(modality: str, encoder: torch.nn.Module) -> tuple[int, ...]:
    """Shape of one item's features: ``[tokens, width]`` for text, ``[embedding]`` otherwise."""
    if modality == "text":
        return (encoder.max_length, encoder.hidden_size)
    return (int(encoder.output_dim),)


def describe_source_settings(modality: str, settings: SourceSettings, surface_points: int) -> dict[str, Any]:
    """The settings the cached features depend on (part of the cache fingerprint)."""
    out: dict[str, Any] = {"modality": modality, "dtype": settings.dtype}
    if modality == "text":
        out.update(max_length=settings.max_length, tokenizer="truncation, padding=max_length, attention mask")
    elif modality == "audio":
        out.update(reader="soundfile float32", convention="encoder input convention, L2-normalised")
    else:
        out.update(surface_points=surface_points, seed=0, convention="ULIP FPS, unit sphere, L2-normalised")
    return out


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _tokens(encoder: torch.nn.Module, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Truncated and padded to the encoder's length (the official recipe's). The tokenizer is called
    directly: HFTextEncoder.tokenize logs every long prompt, which would flood a log over millions of captions."""
    return encoder.tokenizer(list(texts), truncation=True, max_length=encoder.max_length, padding="max_length", return_tensors="pt")


def text_encode_fn(encoder: torch.nn.Module) -> EncodeFn:
    """Batches of strings to ``[n, max_length, hidden]``, the way the X2I text nodes encode a prompt."""
    filled = {"count": 0}

    @torch.inference_mode()
    def encode(texts: Sequence[str]) -> tuple[torch.Tensor, list[str | None]]:
        tokens = _tokens(encoder, texts)
        device = _device_of(encoder.transformer)
        mask = tokens["attention_mask"]
        filled["count"] += int((mask.sum(dim=1) == encoder.max_length).sum())
        features = encoder(tokens["input_ids"].to(device), mask.to(device)).float()
        return features, [None] * len(texts)

    encode.filled = filled  # type: ignore[attr-defined]  # how many texts used all positions (possibly truncated)
    return encode


def audio_frames_needed(encoder: torch.nn.Module, rate: int) -> int | None:
    """How many frames at ``rate`` the encoder's input convention looks at (``None``: all of them).

    AudioCLIP (:func:`encoders.to_gluegen_waveform`) keeps 4 s at 44.1 kHz, resampled from
    ``ceil(176400 * rate / 44100) + rate // 10 + 1024`` input samples (the resampler's margin; the same
    expression as there, so the samples it keeps are those of the whole file); CLAP
    (``ClapAudioEncoder.prepare``) crops to its extractor's first ``max_length_s`` seconds.
    """
    from ..encoders import AudioCLIPAudioEncoder, ClapAudioEncoder
    from ..encoders.audio_input import GLUEGEN_CLIP_SAMPLES, GLUEGEN_SAMPLE_RATE

    if isinstance(encoder, AudioCLIPAudioEncoder):
        return math.ceil(GLUEGEN_CLIP_SAMPLES * rate / GLUEGEN_SAMPLE_RATE) + rate // 10 + 1024
    if isinstance(encoder, ClapAudioEncoder):
        return int(encoder.feature_extractor.max_length_s * rate)
    return None


def read_audio_file(path: Path, frames_needed: Callable[[int], int | None] | None = None) -> tuple[torch.Tensor, int]:
    """``[1, channels, samples]`` float32 and the sample rate, read with soundfile (libsndfile).

    ``frames_needed(rate)``: how many frames to decode from the start (``None``: the whole file); the
    rest of the file is never decoded.
    """
    try:
        import soundfile
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SourceEncoderError("reading audio files needs the soundfile package: pip install soundfile") from exc
    with soundfile.SoundFile(str(path)) as handle:
        rate = int(handle.samplerate)
        needed = frames_needed(rate) if frames_needed is not None else None
        data = handle.read(frames=-1 if needed is None else needed, dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy()).unsqueeze(0), rate


def audio_encode_fn(encoder: torch.nn.Module) -> EncodeFn:
    """Batches of :class:`AudioClip` to ``[n, embedding]``; unreadable or unusable clips are reported."""
    from ..encoders import AudioCLIPAudioEncoder, AudioInputError, to_gluegen_waveform

    @torch.inference_mode()
    def encode(clips: Sequence[AudioClip]) -> tuple[torch.Tensor, list[str | None]]:
        errors: list[str | None] = [None] * len(clips)
        decoded: dict[int, tuple[torch.Tensor, int]] = {}
        for i, clip in enumerate(clips):
            try:
                decoded[i] = read_audio_file(clip.path, lambda rate: audio_frames_needed(encoder, rate))
            except SourceEncoderError:
                raise
            except Exception as exc:  # soundfile.LibsndfileError, RuntimeError, ...
                errors[i] = f"unreadable_audio: {type(exc).__name__}: {str(exc)[:200]}"
        out = torch.zeros(len(clips), int(encoder.output_dim))
        if isinstance(encoder, AudioCLIPAudioEncoder):
            # GlueGen's convention per clip (lengths and rates differ), then one batched network call:
            # exactly what encode_audio does chunk by chunk.
            prepared = {}
            for i, (waveform, rate) in decoded.items():
                try:
                    prepared[i] = to_gluegen_waveform(waveform, rate)
                except AudioInputError as exc:
                    errors[i] = f"unusable_audio: {exc}"
            if prepared:
                order = sorted(prepared)
                encoder.apply_memory_format()
                device = _device_of(encoder)
                batch = torch.cat([prepared[i] for i in order])
                embeddings = torch.cat([encoder(chunk.to(device)) for chunk in batch.split(encoder.max_batch)])
                out[order] = embeddings.float().cpu()
        else:
            for i, (waveform, rate) in decoded.items():
                try:
                    out[i] = encoder.encode_audio(waveform, rate)[0].float().cpu()
                except (AudioInputError, ValueError) as exc:
                    errors[i] = f"unusable_audio: {exc}"
        return out, errors

    return encode


def point_cloud_encode_fn(encoder: torch.nn.Module, surface_points: int) -> EncodeFn:
    """Batches of cloud/mesh paths to ``[n, embedding]``, clouds of one size encoded together."""
    from ..encoders import PointCloudError, load_point_cloud

    @torch.inference_mode()
    def encode(paths: Sequence[Path]) -> tuple[torch.Tensor, list[str | None]]:
        errors: list[str | None] = [None] * len(paths)
        clouds: dict[int, torch.Tensor] = {}
        for i, path in enumerate(paths):
            try:
                clouds[i] = load_point_cloud(path, surface_points=surface_points).to_tensor()
            except Exception as exc:  # PointCloudError, trimesh / numpy parse errors
                errors[i] = f"unreadable_point_cloud: {type(exc).__name__}: {str(exc)[:200]}"
        out = torch.zeros(len(paths), int(encoder.output_dim))
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, cloud in clouds.items():
            by_shape.setdefault(tuple(cloud.shape), []).append(i)
        for group in by_shape.values():
            try:
                out[group] = encoder.encode_points(torch.stack([clouds[i] for i in group])).float().cpu()
            except PointCloudError:
                for i in group:  # find which cloud the encoder refuses, keep the rest
                    try:
                        out[i] = encoder.encode_points(clouds[i].unsqueeze(0))[0].float().cpu()
                    except PointCloudError as exc:
                        errors[i] = f"unusable_point_cloud: {exc}"
        return out, errors

    return encode


def source_encode_fn(modality: str, encoder: torch.nn.Module, surface_points: int = 10000) -> EncodeFn:
    if modality == "text":
        return text_encode_fn(encoder)
    if modality == "audio":
        return audio_encode_fn(encoder)
    return point_cloud_encode_fn(encoder, surface_points)


def target_encode_fn(encoder: torch.nn.Module) -> EncodeFn:
    """Captions to CLIP's ``[n, 77, width]`` SD1 conditioning (no attention mask: see :mod:`training.targets`);
    for an SDXL target, its tokens and pooled vector packed as ``[n, 78, 2048]`` (:func:`training.targets.pack_target`)."""
    from .sdxl_targets import SDXLTextTarget
    from .targets import pack_target

    if isinstance(encoder, SDXLTextTarget):

        def encode_sdxl(texts: Sequence[str]) -> tuple[torch.Tensor, list[str | None]]:
            tokens, pooled = encoder.encode(texts)
            return pack_target(tokens, pooled), [None] * len(texts)

        return encode_sdxl

    @torch.inference_mode()
    def encode(texts: Sequence[str]) -> tuple[torch.Tensor, list[str | None]]:
        tokens = _tokens(encoder, texts)
        features = encoder(tokens["input_ids"].to(_device_of(encoder.transformer))).float()
        return features, [None] * len(texts)

    return encode
