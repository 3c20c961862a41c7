"""Audio as GlueGen fed it to AudioCLIP: 44.1 kHz, first 4 s, min-max to the int16 range, two channels.

GlueGen's sound scripts read UrbanSound8K with AudioCLIP's dataset code and test-time transforms
(``audioclip/utils/datasets/us8k.py`` and ``protocols/audioclip-us8k*.json`` in salesforce/GlueGen):

1. ``soundfile.read(dtype="float32")``, ``librosa.resample(wav, sr, 44100)`` (librosa 0.7's default
   ``kaiser_best`` filter, resampy);
2. a mono file is duplicated to two channels (``mono=False``); stereo stays as it is;
3. the first 4 s are kept (``wav[:, :176400]``);
4. ``scale(wav, wav.min(), wav.max(), -32768, 32767)``: min and max of the **whole clip, all
   channels together** (so the balance between left and right survives);
5. a shorter clip is padded to 176,400 samples **centred**, with ``round(0.5 * missing)`` samples
   on the left (Python rounding), filled with the mean over channels of the clip's first sample on
   the left and of its last sample on the right (``RandomPadding(train=False)``), not with zeros.

:func:`to_gluegen_waveform` reproduces this on tensors. Its own decisions, where the official code
has no answer or fails:

- **Resampling** is torchaudio's windowed-sinc resampler with resampy's ``kaiser_best`` parameters
  (filter width 64, roll-off 0.9476, Kaiser beta 14.77). Band-limited audio agrees with resampy to
  about 1e-4 relative; only content in the last 5% below the lower Nyquist frequency differs.
  Only the first 4 s plus a 0.1 s margin, far wider than the filter, are resampled.
- **Integer input** (int16 PCM, int32, uint8, ...) is taken as is: min-max scaling makes the result
  independent of the input's scale and offset, so no division by 32768 is needed.
- **More than two channels** (5.1, 7.1, ambisonics): averaged to mono, then duplicated, with a
  warning. The network was trained on two channels and sums its per-channel features, so feeding
  six channels would change what the GlueNet sees.
- **Silent or constant clips** (min == max; the official scaling divides by zero and yields NaN)
  become -0.5 everywhere: the value AudioCLIP's own input scaling maps to exactly 0, so the network
  sees digital silence. A warning names the clip.
- **Empty audio** (no samples, channels or clips), **NaN or infinite samples** (the count is given),
  complex or boolean tensors and sample rates outside 4-768 kHz raise :class:`AudioInputError`.
- **Odd sample rates** cost bounded memory: the exact resampler's filter bank grows with the product
  of the two rates divided by their common divisor squared (96,001 Hz to 44.1 kHz would take 32 GiB),
  so a rate whose bank would exceed :data:`MAX_RESAMPLE_KERNEL` values is resampled as the nearest
  multiple of 100 Hz, with a warning naming the pitch error (under 0.2% above 25 kHz). Every standard
  rate (8-384 kHz) is resampled exactly.
- **Very short clips** (even shorter than one 1654-sample analysis frame) are valid: padding to
  176,400 samples makes them full-length clips.
"""

from __future__ import annotations

import logging
import math

import torch

from ..errors import X2IError

logger = logging.getLogger(__name__)

GLUEGEN_SAMPLE_RATE = 44100
GLUEGEN_CLIP_SECONDS = 4
GLUEGEN_CLIP_SAMPLES = GLUEGEN_SAMPLE_RATE * GLUEGEN_CLIP_SECONDS  # 176,400
GLUEGEN_CHANNELS = 2
INT16_MIN, INT16_MAX = -32768.0, 32767.0
# What (x + 32768) * 2 / 65535 - 1, AudioCLIP's own input scaling, maps to exactly 0.
SILENT_VALUE = -0.5
# resampy's "kaiser_best" filter (librosa 0.7's default), as torchaudio parameters.
KAISER_BEST = {
    "lowpass_filter_width": 64,
    "rolloff": 0.9475937167399596,
    "resampling_method": "sinc_interp_kaiser",
    "beta": 14.769656459379492,
}
# Rates the encoders take: below 4 kHz nothing a sound GlueNet learned survives; no recorder goes past 768 kHz.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 4_000, 768_000
# Values in the resampler's filter bank (float64 while it is built): every standard rate needs under 0.4M.
MAX_RESAMPLE_KERNEL = 1 << 22  # 32 MiB; a rate rounded to 100 Hz needs at most 4.8M


class AudioInputError(X2IError):
    """Audio that cannot be encoded; the message names the problem and the fix."""


def check_waveform(waveform) -> torch.Tensor:
    """``waveform`` as a ``[B, C, T]`` tensor (not copied), or :class:`AudioInputError`.

    Accepts ``[B, C, T]`` (ComfyUI's AUDIO), ``[C, T]`` (one clip) and ``[T]`` (one mono clip), float
    or integer samples, torch tensors or numpy arrays.
    """
    if not isinstance(waveform, torch.Tensor):
        try:
            waveform = torch.as_tensor(waveform)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise AudioInputError(
                f"audio must be a tensor of samples, got {type(waveform).__name__}: connect a Load Audio output"
            ) from exc
    if waveform.dtype == torch.bool or waveform.is_complex():
        raise AudioInputError(
            f"audio samples must be real numbers, got dtype {waveform.dtype}: pass the decoded waveform, not a mask or a spectrum"
        )
    if waveform.ndim == 1:
        waveform = waveform[None, None]
    elif waveform.ndim == 2:
        waveform = waveform[None]
    elif waveform.ndim != 3:
        raise AudioInputError(
            f"audio must be shaped [batch, channels, samples] or [channels, samples], got {tuple(waveform.shape)}"
        )
    batch, channels, samples = waveform.shape
    if samples == 0:
        raise AudioInputError("the audio has 0 samples: the clip is empty; load a file with sound in it (or check trimming)")
    if channels == 0 or batch == 0:
        raise AudioInputError(f"the audio has no {'channels' if channels == 0 else 'clips'} (shape {tuple(waveform.shape)}): load a non-empty clip")
    if waveform.is_floating_point():
        finite = torch.isfinite(waveform)
        if not bool(finite.all()):
            nan = int(torch.isnan(waveform).sum())
            inf = int((~finite).sum()) - nan
            raise AudioInputError(
                f"the audio has {nan} NaN and {inf} infinite samples (of {waveform.numel()}): the decoder or an earlier "
                "node produced invalid values; re-export the file, or clean it (e.g. torch.nan_to_num) before encoding"
            )
    return waveform


def check_sample_rate(sample_rate) -> int:
    try:
        rate = float(sample_rate)
    except (TypeError, ValueError) as exc:
        raise AudioInputError(f"sample rate must be a number of Hz, got {sample_rate!r}") from exc
    if not math.isfinite(rate) or rate <= 0 or rate != int(rate):
        raise AudioInputError(f"sample rate must be a positive whole number of Hz, got {sample_rate!r}: pass the rate the audio was decoded at")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioInputError(
            f"sample rate {int(rate)} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz: the audio was decoded at a "
            "wrong rate, or is not audio; re-export it at a standard rate (44.1 or 48 kHz)"
        )
    return int(rate)


def resample_kernel_values(source_rate: int, target_rate: int) -> int:
    """Values in torchaudio's exact ``kaiser_best`` filter bank from ``source_rate`` to ``target_rate``:
    ``[target/g, 2 * width + source/g]`` with ``g`` their greatest common divisor."""
    g = math.gcd(source_rate, target_rate)
    source, target = source_rate // g, target_rate // g
    width = math.ceil(KAISER_BEST["lowpass_filter_width"] * source / (min(source, target) * KAISER_BEST["rolloff"]))
    return target * (2 * width + source)


def resample(waveform: torch.Tensor, sample_rate: int, target_rate: int = GLUEGEN_SAMPLE_RATE) -> torch.Tensor:
    """``[..., T]`` float audio from ``sample_rate`` to ``target_rate`` with resampy's ``kaiser_best``
    filter (what GlueGen's librosa used); ``ceil(T * target / sample_rate)`` samples out. A rate whose
    exact filter bank would exceed :data:`MAX_RESAMPLE_KERNEL` values is taken as its nearest multiple of
    100 Hz (see the module docstring)."""
    if sample_rate == target_rate:
        return waveform
    source_rate = sample_rate
    if resample_kernel_values(sample_rate, target_rate) > MAX_RESAMPLE_KERNEL:
        source_rate = max(100, round(sample_rate / 100) * 100)
        logger.warning(
            "audio at %d Hz: resampling it exactly to %d Hz would need a filter bank of %d values; resampling it as "
            "%d Hz instead (pitch off by %.3f%%). Re-export it at a standard rate to avoid this.",
            sample_rate, target_rate, resample_kernel_values(sample_rate, target_rate), source_rate,
            100 * abs(source_rate - sample_rate) / sample_rate,
        )
        if source_rate == target_rate:
            return waveform
    import torchaudio.functional  # lazily: only resampling needs torchaudio

    return torchaudio.functional.resample(waveform, source_rate, target_rate, **KAISER_BEST)


def scale_to_int16_range(clips: torch.Tensor) -> torch.Tensor:
    """Per-clip min-max of ``[B, C, T]`` float32 to [-32768, 32767], over all channels and samples.

    Same float32 operations as AudioCLIP's ``scale()``; constant clips become :data:`SILENT_VALUE`.
    """
    low = clips.amin(dim=(1, 2), keepdim=True)
    high = clips.amax(dim=(1, 2), keepdim=True)
    span = high - low
    silent = span == 0
    if bool(silent.any()):
        logger.warning(
            "AudioCLIP input: clip(s) %s are silent (every sample equal); encoding them as digital silence",
            silent.flatten().nonzero().flatten().tolist(),
        )
    scaled = ((clips - low) * (INT16_MAX - INT16_MIN)) / torch.where(silent, 1.0, span) + INT16_MIN
    return torch.where(silent, SILENT_VALUE, scaled)


def pad_like_gluegen(clips: torch.Tensor, length: int = GLUEGEN_CLIP_SAMPLES) -> torch.Tensor:
    """Centre ``[B, C, T]`` clips shorter than ``length``: the left pad holds the channel mean of the
    first sample, the right pad that of the last sample (AudioCLIP's test-time ``RandomPadding``)."""
    batch, channels, samples = clips.shape
    if samples >= length:
        return clips
    left = int(round(0.5 * (length - samples)))
    right = length - left - samples
    first = clips[:, :, 0].mean(dim=1)[:, None, None].expand(batch, channels, left)
    last = clips[:, :, -1].mean(dim=1)[:, None, None].expand(batch, channels, right)
    return torch.cat((first, clips, last), dim=-1)


def to_gluegen_waveform(waveform, sample_rate: int) -> torch.Tensor:
    """``[B, C, T]`` or ``[C, T]`` audio at any rate to ``[B, 2, 176400]`` float32 int16-range clips,
    GlueGen's AudioCLIP input (see the module docstring for every step and decision).

    Runs on the input's device; raises :class:`AudioInputError` for unusable audio.
    """
    clips = check_waveform(waveform)
    rate = check_sample_rate(sample_rate)
    clips = clips.to(torch.float32)
    channels = clips.shape[1]
    if channels > GLUEGEN_CHANNELS:
        logger.warning(
            "AudioCLIP input has %d channels; AudioCLIP was trained on mono/stereo, so they are averaged to mono",
            channels,
        )
        clips = clips.mean(dim=1, keepdim=True)
    if rate != GLUEGEN_SAMPLE_RATE:
        # Resampling the whole file only to keep 4 s wastes time on long files; the kept samples only
        # depend on input within the filter's reach (under 300 samples even from 192 kHz).
        needed = math.ceil(GLUEGEN_CLIP_SAMPLES * rate / GLUEGEN_SAMPLE_RATE) + rate // 10 + 1024
        clips = resample(clips[..., :needed], rate, GLUEGEN_SAMPLE_RATE)
    clips = clips[..., :GLUEGEN_CLIP_SAMPLES]
    if clips.shape[1] == 1:
        clips = clips.expand(-1, GLUEGEN_CHANNELS, -1)
    clips = scale_to_int16_range(clips)
    return pad_like_gluegen(clips).contiguous()
