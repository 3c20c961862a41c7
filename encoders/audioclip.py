"""AudioCLIP's audio branch (ESResNeXt-fbsp), the sound encoder GlueGen's sound GlueNet was trained on.

A re-implementation of the audio half of AudioCLIP (Guzhov et al., 2022) that loads the released
``AudioCLIP-Full-Training.pt`` / ``AudioCLIP-Partial-Training.pt`` files strictly: every key under
``audio.`` maps one to one (370 tensors, 32.1M parameters, BatchNorm running statistics included).

What the network computes, for ``[B, C, T]`` waveforms in the int16 range (GlueGen: ``C = 2``,
``T = 176,400`` = 4 s at 44.1 kHz, see :mod:`encoders.audio_input`):

1. ``x' = (x + 32768) * 2 / 65535 - 1``, each channel framed on its own (1654-sample frames, hop
   561, zero padding split around the signal so frames cover it), Blackman-Harris window;
2. the *frequency B-spline* layer ("fbsp"), a learnable replacement of the DFT: 1025 complex filters
   with learnt centre frequency ``fc``, bandwidth ``fb`` and shape power ``m`` over the frame
   zero-padded to 2048; the first 1023 bins form three 341-bin bands, the three "RGB" channels;
3. ``10 * log10(power)`` (powers of 0 floored to 1e-18);
4. a ResNeXt-50 32x4d with five attention gates, run once per audio channel; the 2048 pooled
   features of the channels are *summed*; ``fc`` projects to 1024;
5. AudioCLIP's ``forward(audio=...)`` divides by the L2 norm (no logit scale touches the features);
   that unit vector is what GlueGen reshapes to ``[B, 16, 64]`` for the GlueNet.

Differences from the official code are in evaluation order only, never in the maths: the audio
channels of a batch go through the backbone as one batch (BatchNorm is per sample in eval mode),
the DFT filters are built once per weight version and cached (with the analysis window folded in,
restricted to the bins and samples that reach the output), and framing is a strided view. The
front end (filters, spectrogram, log) always runs in float32, whatever dtype the backbone is cast
to: the learnt centre frequencies (up to ~1024) and phases ``fc * t`` (up to ~3200 rad) do not
survive half precision, and the official forward also casts its input to float32.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import X2IError
from ..weights import describe_keys, read_torch_checkpoint, state_dict_mismatch, unwrap_state_dict
from .audio_input import GLUEGEN_CLIP_SAMPLES, GLUEGEN_SAMPLE_RATE, to_gluegen_waveform

logger = logging.getLogger(__name__)

AUDIO_PREFIX = "audio."
# A few keys that only the audio branch has; used to recognise files that hold it without the prefix.
SIGNATURE_KEYS = ("fbsp.fc", "fbsp.fb", "fbsp.m", "layer1.0.conv1.weight", "att1.conv_depth.weight")
# 4-term Blackman-Harris coefficients (scipy.signal.windows.blackmanharris).
BLACKMAN_HARRIS = (0.35875, 0.48829, 0.14128, 0.01168)


class AudioCLIPFileError(X2IError):
    """A file that cannot be used as AudioCLIP's audio branch; the message names the problem and the fix."""


@dataclass(frozen=True)
class AudioCLIPAudioConfig:
    """The audio branch as ``AudioCLIP()`` builds it (``model/audioclip.py`` defaults of the official code)."""

    sample_rate: int = GLUEGEN_SAMPLE_RATE  # what the released weights were trained on
    clip_samples: int = GLUEGEN_CLIP_SAMPLES  # GlueGen's 4 s clips (the network accepts any length)
    n_fft: int = 2048
    hop_length: int = 561
    win_length: int = 1654
    # Periodic window, as scipy.signal.get_window("blackmanharris", 1654, fftbins=True) gives.
    window: str = "blackmanharris"
    normalized: bool = True  # fbsp filters divided by sqrt(n_fft)
    num_bands: int = 3  # 1025 bins -> 3 x 341 ("RGB"); the last 2 bins are dropped
    input_min: float = -32768.0
    input_max: float = 32767.0
    log10_eps: float = 1e-18
    fbsp_eps: float = 1e-8
    stem_width: int = 64
    layers: tuple[int, ...] = (3, 4, 6, 3)
    groups: int = 32
    width_per_group: int = 4
    expansion: int = 4
    # Depthwise kernel of attention gates att1..att5 (padding keeps the size).
    attention_kernels: tuple[tuple[int, int], ...] = ((3, 1), (1, 5), (3, 1), (1, 5), (3, 5))
    embed_dim: int = 1024

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def band_height(self) -> int:
        return self.n_bins // self.num_bands

    @property
    def used_bins(self) -> int:
        return self.band_height * self.num_bands

    @property
    def feature_dim(self) -> int:
        return 512 * self.expansion

    def num_frames(self, num_samples: int) -> int:
        """Frames the official framing gives for ``num_samples`` (at least one, padding the tail)."""
        if num_samples <= self.win_length:
            return 1
        return 1 + -(-(num_samples - self.win_length) // self.hop_length)


def blackman_harris_window(length: int, periodic: bool = True) -> torch.Tensor:
    """Float32 4-term Blackman-Harris window, computed in float64 like scipy's ``general_cosine``."""
    n = length + 1 if periodic else length
    fac = torch.linspace(-math.pi, math.pi, n, dtype=torch.float64)
    window = sum(a * torch.cos(k * fac) for k, a in enumerate(BLACKMAN_HARRIS))
    return window[:length].to(torch.float32)


def front_end_dtype(reference: torch.Tensor) -> torch.dtype:
    """float64 for a float64 module (reference runs), float32 otherwise, never half precision."""
    return torch.float64 if reference.dtype == torch.float64 else torch.float32


class FrequencyBSpline(nn.Module):
    """The learnable filter bank ("fbsp", official ``LinearFBSP``) that replaces the DFT.

    Filter ``k`` over ``n`` input samples, ``t = pi * linspace(-1, 1, n) + 1e-8``:
    ``sqrt(fb_k) * sinc(fb_k * t / (m_k + 1e-8)) ** m_k * exp(-i * fc_k * t)``, divided by
    ``sqrt(n)`` when normalised. The power is complex (``|w| ** m * exp(i * m * arg w)``), because
    negative side lobes of the sinc raised to a fractional ``m`` are complex, as in the official code.
    """

    def __init__(self, out_features: int, normalized: bool = True, eps: float = 1e-8) -> None:
        super().__init__()
        self.out_features = out_features
        self.normalized = normalized
        self.eps = eps
        self.m = nn.Parameter(torch.zeros(out_features))
        self.fb = nn.Parameter(torch.ones(out_features))
        self.fc = nn.Parameter(torch.arange(out_features, dtype=torch.float32))
        # AudioCLIP builds the layer with bias=False, which still registers an empty 'fbsp.bias';
        # it is kept (and ignored) so the released files load strictly.
        self.bias = nn.Parameter(torch.empty(0))

    def filters(self, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Real and imaginary filter weights, each ``[out_features, in_features]`` in float32 (float64
        when the module is float64).

        The operations follow the official ones step by step so float32 results agree bit for bit
        (except where the official code yields NaN: a sinc sample of exactly 0, which never occurs
        for the released weights).
        """
        dtype = front_end_dtype(self.fc)
        m, fb, fc = (p.to(dtype).reshape(-1, 1) for p in (self.m, self.fb, self.fc))
        t = math.pi * torch.linspace(-1.0, 1.0, in_features, dtype=dtype, device=m.device).reshape(1, -1) + self.eps
        kernel_re, kernel_im = torch.cos(fc * t), -torch.sin(fc * t)
        x = fb * t / (m + self.eps)
        sinc = torch.where(x == 0, torch.ones_like(x), torch.sin(x) / x)
        magnitude = (sinc**2) ** 0.5
        phase = torch.atan2(torch.zeros_like(sinc), sinc)  # pi on negative lobes, 0 elsewhere
        amplitude = (magnitude**2) ** (0.5 * m)
        win_re, win_im = amplitude * torch.cos(m * phase), amplitude * torch.sin(m * phase)
        scale = fb.sqrt()
        weight_re = scale * (win_re * kernel_re - win_im * kernel_im)
        weight_im = scale * (win_re * kernel_im + win_im * kernel_re)
        if self.normalized:
            weight_re, weight_im = weight_re / in_features**0.5, weight_im / in_features**0.5
        return weight_re, weight_im

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``[..., in_features]`` real frames to ``[..., out_features, 2]`` (real, imaginary)."""
        weight_re, weight_im = self.filters(frames.shape[-1])
        return torch.stack((F.linear(frames, weight_re), F.linear(frames, weight_im)), dim=-1)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, normalized={self.normalized}"


class Bottleneck(nn.Module):
    """ResNeXt bottleneck (stride on the grouped 3x3 conv), key names as in torchvision."""

    def __init__(self, in_channels: int, planes: int, stride: int, groups: int, width_per_group: int, expansion: int) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        out_channels = planes * expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class AttentionGate(nn.Module):
    """Official ``Attention2d``: max-pool the stage input to the stage output's size, depthwise conv,
    pointwise conv, BatchNorm, sigmoid; the result multiplies the stage output."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int]) -> None:
        super().__init__()
        padding = (kernel_size[0] // 2, kernel_size[1] // 2)
        self.conv_depth = nn.Conv2d(in_channels, in_channels, kernel_size, padding=padding, groups=in_channels)
        self.conv_point = nn.Conv2d(in_channels, out_channels, 1)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) != tuple(size):  # same size: adaptive max pooling is the identity
            x = F.adaptive_max_pool2d(x, size)
        return torch.sigmoid(self.bn(self.conv_point(self.conv_depth(x))))


class ESResNeXtFBSP(nn.Module):
    """AudioCLIP's audio branch; ``state_dict()`` keys are the released ``audio.*`` keys without the prefix.

    ``forward(audio [B, C, T])`` (int16-range values, any float dtype) returns the raw ``[B, 1024]``
    embedding, the official ``ESResNeXtFBSP.forward`` in eval mode; :func:`normalize_embedding` gives
    what ``AudioCLIP(audio=...)`` returns. Call ``.eval()``: BatchNorm uses its running statistics.
    """

    def __init__(self, config: AudioCLIPAudioConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or AudioCLIPAudioConfig()
        if config.window != "blackmanharris":
            raise X2IError(f"only the Blackman-Harris window of the released AudioCLIP is supported, got {config.window!r}")
        self.register_buffer("window", blackman_harris_window(config.win_length))
        self.conv1 = nn.Conv2d(config.num_bands, config.stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(config.stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = config.stem_width
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), config.layers, strict=True), start=1):
            out_channels = planes * config.expansion
            stage = [
                Bottleneck(in_channels if j == 0 else out_channels, planes, 2 if (j == 0 and index > 1) else 1,
                           config.groups, config.width_per_group, config.expansion)
                for j in range(blocks)
            ]
            self.add_module(f"layer{index}", nn.Sequential(*stage))
            self.add_module(f"att{index}", AttentionGate(in_channels, out_channels, config.attention_kernels[index - 1]))
            in_channels = out_channels
        self.att5 = AttentionGate(in_channels, in_channels, config.attention_kernels[4])
        self.fc = nn.Linear(config.feature_dim, config.embed_dim)
        self.fbsp = FrequencyBSpline(config.n_bins, normalized=config.normalized, eps=config.fbsp_eps)
        self._reset_parameters()
        self._filter_cache: tuple[tuple, torch.Tensor] | None = None
        # load_state_dict copies in place; under inference mode (ComfyUI runs nodes in it) the
        # parameters are inference tensors without version counters, so clear the cache explicitly.
        self.register_load_state_dict_post_hook(lambda module, _incompatible: module.clear_filter_cache())

    def _reset_parameters(self) -> None:
        # The official initialisation; released weights overwrite it.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # -- precision: the front end stays float32 ---------------------------------------------------

    def _front_end_tensors(self) -> dict[str, torch.Tensor]:
        return {"window": self.window, "m": self.fbsp.m, "fb": self.fbsp.fb, "fc": self.fbsp.fc, "bias": self.fbsp.bias}

    def _apply(self, fn, recurse: bool = True):
        # .to(dtype) / .half() / .bfloat16() must not round the filter bank (see the module docstring):
        # after the conversion, put the float32 values back, on whatever device fn moved them to.
        before = {name: t.data for name, t in self._front_end_tensors().items()}
        super()._apply(fn, recurse)
        for name, tensor in self._front_end_tensors().items():
            if tensor.dtype in (torch.float16, torch.bfloat16):
                tensor.data = before[name].to(device=tensor.device, dtype=torch.float32)
        self._filter_cache = None
        return self

    def clear_filter_cache(self) -> None:
        self._filter_cache = None

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    # -- front end --------------------------------------------------------------------------------

    @torch.compiler.disable
    def spectrogram_filters(self) -> torch.Tensor:
        """``[2 * used_bins, win_length]`` float32: the fbsp filters of the kept bins, restricted to
        the samples a frame occupies inside the zero-padded ``n_fft`` window, times the analysis
        window (real rows first, then imaginary). Cached while the weights do not change and no
        gradient is wanted (training rebuilds it every call so gradients reach ``m``, ``fb``, ``fc``).

        The cache notices new tensors (``.to()``, assignment), ``load_state_dict`` and in-place edits
        of ordinary tensors; inference tensors have no version counter, so after editing those in
        place call :meth:`clear_filter_cache`.
        """
        cfg = self.config
        tensors = (self.fbsp.m, self.fbsp.fb, self.fbsp.fc, self.window)
        cacheable = not torch.is_grad_enabled()
        key = tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.device) for t in tensors)
        if cacheable and self._filter_cache is not None and self._filter_cache[0] == key:
            return self._filter_cache[1]
        weight_re, weight_im = self.fbsp.filters(cfg.n_fft)
        left = (cfg.n_fft - cfg.win_length) // 2
        window = self.window.to(weight_re.dtype)
        span = slice(left, left + cfg.win_length)
        filters = torch.cat(
            (weight_re[: cfg.used_bins, span] * window, weight_im[: cfg.used_bins, span] * window), dim=0
        ).contiguous()
        if cacheable:
            self._filter_cache = (key, filters)
        return filters

    def frames(self, audio: torch.Tensor) -> torch.Tensor:
        """``[B, C, T]`` int16-range audio to ``[B * C, frames, win_length]`` float32 frames of the
        [-1, 1]-scaled signal (a strided view of one padded copy)."""
        cfg = self.config
        x = audio.reshape(-1, audio.shape[-1]).to(front_end_dtype(self.fbsp.fc))
        x = ((x - cfg.input_min) * 2.0) / (cfg.input_max - cfg.input_min) - 1.0
        num_samples = x.shape[-1]
        padded = (cfg.num_frames(num_samples) - 1) * cfg.hop_length + cfg.win_length
        if padded > num_samples:  # zeros of the scaled signal, split like the official framing
            extra = padded - num_samples
            x = F.pad(x, (extra // 2, extra - extra // 2))
        return x.unfold(-1, cfg.win_length, cfg.hop_length)

    def log_power_spectrogram(self, audio: torch.Tensor) -> torch.Tensor:
        """``[B, C, T]`` int16-range audio to ``[B * C, 3, 341, frames]`` float32 decibels."""
        cfg = self.config
        if audio.ndim != 3:
            raise X2IError(f"AudioCLIP expects audio shaped [batch, channels, samples], got {tuple(audio.shape)}")
        frames = self.frames(audio)
        n, num_frames = frames.shape[0], frames.shape[1]
        spec = F.linear(frames, self.spectrogram_filters()).view(n, num_frames, 2, cfg.used_bins)
        power = spec[:, :, 0].square() + spec[:, :, 1].square()
        power = torch.where(power > 0.0, power, cfg.log10_eps)
        decibels = torch.log10(power).mul_(10.0)
        # [n, frames, bins] -> [n, bands, band_height, frames]: bin b*341 + h is band b, row h.
        return decibels.transpose(1, 2).reshape(n, cfg.num_bands, cfg.band_height, num_frames)

    # -- backbone ---------------------------------------------------------------------------------

    def features(self, decibels: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` decibel images to ``[N, 2048]`` gated, pooled features."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(decibels))))
        for index in range(1, 5):
            stage_input = x
            x = getattr(self, f"layer{index}")(x)
            x = x * getattr(self, f"att{index}")(stage_input, x.shape[-2:])
        pooled = F.adaptive_avg_pool2d(x, 1)
        pooled = pooled * self.att5(x, pooled.shape[-2:])
        return torch.flatten(pooled, 1)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        batch, channels = audio.shape[0], audio.shape[1]
        decibels = self.log_power_spectrogram(audio).to(self.dtype)
        if self.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            decibels = decibels.contiguous(memory_format=torch.channels_last)
        else:
            decibels = decibels.contiguous()
        features = self.features(decibels).view(batch, channels, -1).sum(dim=1)
        return self.fc(features)


def normalize_embedding(embedding: torch.Tensor) -> torch.Tensor:
    """``AudioCLIP.forward``'s ``features / features.norm(dim=-1)``, in float32.

    The floor only matters for an all-zero embedding (NaN in the official code)."""
    embedding = embedding.float()
    return embedding / embedding.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


class AudioCLIPAudioEncoder(nn.Module):
    """AudioCLIP's audio branch plus GlueGen's input convention, as one module ComfyUI can manage.

    ``encode_audio(waveform [B, C, T], sample_rate) -> [B, 1024]`` float32 unit vectors, what
    GlueGen's ``FrozenAudioCLIPEmbedder`` feeds to the sound GlueNet. ``device`` is a plain attribute
    because ComfyUI's ModelPatcher assigns it; the weights' own device is what runs.
    """

    def __init__(self, network: ESResNeXtFBSP, name: str = "AudioCLIP", max_batch: int = 16,
                 channels_last: bool = True) -> None:
        super().__init__()
        self.network = network
        self.name = name
        self.device = torch.device("cpu")
        self.output_dim = network.config.embed_dim
        self.sample_rate = network.config.sample_rate
        self.max_batch = max_batch
        # Channels-last weights and activations: cuDNN's and oneDNN's fast layout for these convolutions
        # (15-35% faster on a 2-thread CPU already).
        self.channels_last = channels_last

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Int16-range ``[B, C, T]`` audio to L2-normalised ``[B, 1024]`` float32 (``AudioCLIP(audio=...)``)."""
        return normalize_embedding(self.network(audio))

    def apply_memory_format(self) -> None:
        """Lay the convolution weights out as ``channels_last`` says (a no-op when they already are)."""
        is_channels_last = self.network.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        if self.channels_last != is_channels_last:
            self.network.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    @torch.inference_mode()
    def encode_audio(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Any-rate ``[B, C, T]`` (or ``[C, T]``) audio to ``[B, 1024]`` float32 AudioCLIP embeddings.

        The input goes through :func:`encoders.audio_input.to_gluegen_waveform` (44.1 kHz, first 4 s,
        per-clip min-max to the int16 range, two channels, 176,400 samples), then the network in
        chunks of ``max_batch`` clips on the weights' device and dtype.
        """
        clips = to_gluegen_waveform(waveform, sample_rate)
        device = self.network.conv1.weight.device
        self.apply_memory_format()
        outputs = [self(chunk.to(device, non_blocking=True)) for chunk in clips.split(self.max_batch)]
        return torch.cat(outputs).float()


# -- loading --------------------------------------------------------------------------------------


def _read_checkpoint(path: Path) -> Mapping[str, torch.Tensor]:
    fix = "Re-download AudioCLIP-Full-Training.pt from the AudioCLIP release."
    obj = unwrap_state_dict(read_torch_checkpoint(path, AudioCLIPFileError, fix))
    if not isinstance(obj, Mapping):
        raise AudioCLIPFileError(
            f"{path.name} holds a {type(obj).__name__}, not a state_dict: pick AudioCLIP-Full-Training.pt or "
            "AudioCLIP-Partial-Training.pt from the AudioCLIP release"
        )
    return obj


def audio_state_dict(state_dict: Mapping[str, object], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The audio branch of a whole-AudioCLIP ``state_dict`` (keys under ``audio.``, prefix removed),
    or ``state_dict`` itself when it holds only the audio branch; other keys (``visual.*``,
    ``transformer.*``, logit scales) are ignored."""
    audio = {k[len(AUDIO_PREFIX):]: v for k, v in state_dict.items() if isinstance(k, str) and k.startswith(AUDIO_PREFIX)}
    if not audio and all(key in state_dict for key in SIGNATURE_KEYS):
        audio = dict(state_dict)
    if not audio:
        hint = ""
        if any(isinstance(k, str) and (k.startswith(("in_blocks.", "blocks.", "tail.", "trans."))) for k in state_dict):
            hint = " This looks like a GlueNet: load it with X2I GlueNet Loader (models/gluenet)."
        elif any(isinstance(k, str) and k.startswith(("visual.", "transformer.")) for k in state_dict):
            hint = " It has CLIP image/text weights but no audio branch: use AudioCLIP-Full-Training.pt or AudioCLIP-Partial-Training.pt, not CLIP.pt."
        raise AudioCLIPFileError(
            f"{source} is not an AudioCLIP checkpoint: found {describe_keys(state_dict)}, expected the audio "
            f"branch under 'audio.' (e.g. 'audio.fbsp.fc', 'audio.layer1.0.conv1.weight', 'audio.fc.weight'), as in "
            f"AudioCLIP-Full-Training.pt / AudioCLIP-Partial-Training.pt.{hint}"
        )
    not_tensors = [k for k, v in audio.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise AudioCLIPFileError(f"{source}: audio entries that are not tensors: {', '.join(not_tensors[:5])}")
    return audio


def load_audio_branch(network: ESResNeXtFBSP, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strictly load an audio-branch ``state_dict`` into ``network``, listing every mismatch."""
    details = state_dict_mismatch(network.state_dict(), state_dict, limit=8)
    if details:
        hint = "Use the released AudioCLIP-Full-Training.pt or AudioCLIP-Partial-Training.pt."
        if "fc.weight" in state_dict and tuple(state_dict["fc.weight"].shape)[0] != network.config.embed_dim:
            hint = (f"Its fc has {tuple(state_dict['fc.weight'].shape)[0]} outputs: this is an ESResNeXt classifier "
                    "(e.g. the AudioSet-pretrained ESRNXFBSP.pt), not AudioCLIP's 1024-d audio embedding. " + hint)
        raise AudioCLIPFileError(f"{source}: weights do not fit AudioCLIP's audio branch: {details}. {hint}")
    network.load_state_dict(state_dict, strict=True)


def load_audioclip_audio(path: str | os.PathLike[str], max_batch: int = 16) -> AudioCLIPAudioEncoder:
    """Load the audio branch of a released AudioCLIP checkpoint onto the CPU, in float32, eval mode.

    Accepts ``AudioCLIP-Full-Training.pt`` / ``AudioCLIP-Partial-Training.pt`` (flat state_dicts with
    ``audio.*`` among the image and text keys), a file holding only the audio branch (no prefix) and
    either wrapped in ``{"state_dict": ...}``. Read with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioCLIPFileError(f"AudioCLIP file not found: {path}")
    audio = audio_state_dict(_read_checkpoint(path), path.name)
    # Built without initialising (every tensor is overwritten by the strict load below): saves the
    # ~0.5 s of random initialisation of 32M parameters.
    with torch.device("meta"):
        network = ESResNeXtFBSP()
    network.to_empty(device="cpu")
    load_audio_branch(network, audio, path.name)
    network.eval().requires_grad_(False)
    logger.info("Loaded AudioCLIP audio branch from %s (%d tensors)", path.name, len(audio))
    encoder = AudioCLIPAudioEncoder(network, name=path.name, max_batch=max_batch)
    encoder.apply_memory_format()
    return encoder.eval()
