"""GlueGen's AudioCLIP input convention, against an independent numpy reference, and every bad input.

The reference re-states, on numpy float32 arrays, what AudioCLIP's ``UrbanSound8K._load_worker``
and its test-time transforms (``RandomPadding(176400, train=False)``) do after resampling: duplicate
mono, keep the first 176,400 samples, ``scale(wav, wav.min(), wav.max(), -32768, 32767)`` over the
whole clip, centre-pad with the channel means of the first and last samples. Resampling is checked
against tones computed directly at 44.1 kHz.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from support.cost import cost_of
from x2i.encoders.audio_input import (
    GLUEGEN_CLIP_SAMPLES,
    KAISER_BEST,
    MAX_RESAMPLE_KERNEL,
    SILENT_VALUE,
    AudioInputError,
    check_waveform,
    pad_like_gluegen,
    resample,
    resample_kernel_values,
    scale_to_int16_range,
    to_gluegen_waveform,
)

LENGTH = GLUEGEN_CLIP_SAMPLES


def reference_clip(wav: np.ndarray) -> np.ndarray:
    """One ``[C, T]`` float32 clip already at 44.1 kHz, C in (1, 2), to GlueGen's ``[2, 176400]``."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.shape[0] == 1:
        wav = np.concatenate((wav, wav), axis=0)
    wav = wav[:, :LENGTH]
    low, high = wav.min(), wav.max()
    wav = (((wav - low) * np.float32(65535.0)) / (high - low) + np.float32(-32768.0)).astype(np.float32)
    if wav.shape[-1] < LENGTH:
        left = int(round(0.5 * (LENGTH - wav.shape[-1])))
        right = LENGTH - left - wav.shape[-1]
        first, last = wav[:, 0].mean(dtype=np.float32), wav[:, -1].mean(dtype=np.float32)
        wav = np.concatenate(
            (np.full((2, left), first, np.float32), wav, np.full((2, right), last, np.float32)), axis=-1
        )
    return wav


def reference(batch: np.ndarray) -> np.ndarray:
    return np.stack([reference_clip(clip) for clip in batch])


def noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def tone(t: np.ndarray, end: float, freqs: tuple[float, ...], fade: float = 0.05) -> np.ndarray:
    """A sum of tones at times ``t`` (s), with raised-cosine fades in from 0 and out to ``end``, so
    resampling has no edge transients; zero after ``end``. float64."""
    x = sum(np.sin(2 * np.pi * f * t + k) / (k + 1) for k, f in enumerate(freqs))
    ramp = np.clip(np.minimum(t, end - t) / fade, 0, 1)
    return x * (0.5 - 0.5 * np.cos(np.pi * ramp))


# -- the convention at 44.1 kHz -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channels", "samples"),
    [(2, 200_000), (1, 200_000), (2, LENGTH), (1, 50_000), (2, 176_399), (2, 176_397), (1, 100), (2, 1)],
)
def test_matches_the_reference_at_441_khz(channels, samples):
    x = noise(3, channels, samples, seed=samples)
    x[1] *= 0.01  # quiet clip: min-max is per clip, so it still spans the full range
    x[2, :, : samples // 2] += 3.0  # DC step
    if samples == 1:
        x[1] = 0.0
    got = to_gluegen_waveform(x, 44100)
    assert got.shape == (3, 2, LENGTH) and got.dtype == torch.float32 and got.is_contiguous()
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = reference(x.numpy())
    for i in range(3):
        if float(x[i].max()) == float(x[i].min()):  # 0/0 in the official scaling; silence here
            expected[i] = SILENT_VALUE
    np.testing.assert_array_equal(got.numpy(), expected)


def test_min_max_spans_both_channels_together():
    left = torch.linspace(-1, 1, 1000)
    x = torch.stack((left, 0.5 * left))[None]
    got = to_gluegen_waveform(x, 44100)[0]
    start = int(round(0.5 * (LENGTH - 1000)))
    core = got[:, start:start + 1000]
    assert core[0].min() == -32768 and core[0].max() == 32767
    # The quieter channel keeps its level relative to the louder one (not stretched on its own):
    # 0.5 maps to (1.5 * 65535) / 2 - 32768.
    assert abs(float(core[1].max()) - 16383.25) < 0.01 and abs(float(core[1].min()) + 16384.25) < 0.01


def test_short_clips_are_centred_and_padded_with_edge_values_not_zeros():
    x = torch.tensor([[[0.0, 1.0, 2.0, 3.0]], [[3.0, 2.0, 1.0, 0.0]]])  # mono, 4 samples
    got = to_gluegen_waveform(x, 44100)
    left = int(round(0.5 * (LENGTH - 4)))
    assert torch.equal(got[0, :, :left], torch.full((2, left), -32768.0))
    assert torch.equal(got[0, :, left + 4:], torch.full((2, LENGTH - left - 4), 32767.0))
    assert torch.equal(got[1, 0, left:left + 4], torch.tensor([32767.0, 10922.0, -10923.0, -32768.0]))
    # Python's round: 0.5 * 3 missing samples -> 2 on the left, 1 on the right.
    odd = pad_like_gluegen(torch.zeros(1, 2, LENGTH - 3) + torch.arange(LENGTH - 3.0))
    assert odd[0, 0, :3].tolist() == [0.0, 0.0, 0.0] and odd[0, 0, -2:].tolist() == [LENGTH - 4.0, LENGTH - 4.0]


def test_integer_pcm_gives_the_float_result():
    pcm = (noise(2, 2, 30_000, seed=5) * 8000).round().clamp(-32768, 32767)
    as_float = to_gluegen_waveform(pcm / 32768.0, 44100)
    torch.testing.assert_close(to_gluegen_waveform(pcm.to(torch.int16), 44100), as_float, atol=0.02, rtol=0)
    torch.testing.assert_close(to_gluegen_waveform(pcm.to(torch.int32), 44100), as_float, atol=0.02, rtol=0)
    unsigned = ((pcm / 256).round() + 128).clamp(0, 255)  # 8-bit WAV is offset binary: 128 is silence
    torch.testing.assert_close(
        to_gluegen_waveform(unsigned.to(torch.uint8), 44100), to_gluegen_waveform(unsigned - 128, 44100), atol=0.02, rtol=0
    )


def test_shapes_numpy_and_dtypes_are_accepted():
    x = noise(2, 10_000)
    expected = to_gluegen_waveform(x[None], 44100)
    assert torch.equal(to_gluegen_waveform(x, 44100), expected)  # [C, T]
    assert torch.equal(to_gluegen_waveform(x.numpy(), 44100), expected)
    assert torch.equal(to_gluegen_waveform(x[:1][0], 44100), to_gluegen_waveform(x[:1][None], 44100))  # [T] is mono
    torch.testing.assert_close(to_gluegen_waveform(x.double(), 44100.0), expected)
    assert check_waveform(x).shape == (1, 2, 10_000)


# -- channels -------------------------------------------------------------------------------------


def test_more_than_two_channels_are_averaged_to_mono_with_a_warning(caplog):
    x = noise(2, 8, 20_000, seed=8)
    with caplog.at_level(logging.WARNING, logger="encoders.audio_input"):
        got = to_gluegen_waveform(x, 44100)
    assert "8 channels" in caplog.text and "averaged to mono" in caplog.text
    assert torch.equal(got[:, 0], got[:, 1])
    np.testing.assert_allclose(got.numpy(), reference(x.mean(dim=1, keepdim=True).numpy()), atol=0.02, rtol=0)


def test_stereo_stays_stereo():
    x = noise(1, 2, 20_000, seed=9)
    got = to_gluegen_waveform(x, 44100)
    assert not torch.equal(got[:, 0], got[:, 1])


# -- silence and invalid audio --------------------------------------------------------------------


def test_silent_and_constant_clips_become_digital_silence(caplog):
    x = torch.zeros(3, 2, 30_000)
    x[1] = 0.25  # constant (DC) clip
    x[2] = noise(2, 30_000, seed=2)
    with caplog.at_level(logging.WARNING, logger="encoders.audio_input"):
        got = to_gluegen_waveform(x, 44100)
    assert torch.isfinite(got).all()
    assert torch.equal(got[:2], torch.full((2, 2, LENGTH), SILENT_VALUE))
    # -0.5 is what AudioCLIP's (x + 32768) * 2 / 65535 - 1 maps to exactly 0.0.
    assert ((torch.tensor(SILENT_VALUE) + 32768.0) * 2.0) / 65535.0 - 1.0 == 0.0
    assert got[2].min() == -32768 and got[2].max() == 32767
    assert "[0, 1]" in caplog.text and "silent" in caplog.text
    assert torch.equal(scale_to_int16_range(torch.zeros(1, 1, 5)), torch.full((1, 1, 5), SILENT_VALUE))
    # Zeros stay exactly zero through resampling; a DC offset would not (edge ripple, as in the official code).
    assert torch.equal(to_gluegen_waveform(torch.zeros(1, 1, 9000), 8000), torch.full((1, 2, LENGTH), SILENT_VALUE))


def test_nan_and_infinite_samples_are_refused_with_counts():
    x = noise(1, 2, 1000)
    x[0, 0, 5] = x[0, 1, 7] = float("nan")
    x[0, 0, 9] = float("-inf")
    with pytest.raises(AudioInputError, match=r"2 NaN and 1 infinite samples \(of 2000\).*nan_to_num"):
        to_gluegen_waveform(x, 44100)


@pytest.mark.parametrize(
    ("shape", "message"),
    [((1, 2, 0), "0 samples"), ((0,), "0 samples"), ((0, 2, 100), "no clips"), ((1, 0, 100), "no channels")],
)
def test_empty_audio_is_refused(shape, message):
    with pytest.raises(AudioInputError, match=message):
        to_gluegen_waveform(torch.zeros(shape), 44100)


@pytest.mark.parametrize(
    ("waveform", "rate", "message"),
    [
        (torch.zeros(1, 1, 1, 10), 44100, r"\[batch, channels, samples\]"),
        (torch.ones(1, 2, 10, dtype=torch.bool), 44100, "real numbers"),
        (torch.ones(1, 2, 10, dtype=torch.complex64), 44100, "real numbers"),
        ("a.wav", 44100, "tensor of samples"),
        (torch.ones(1, 2, 10), 0, "positive whole number"),
        (torch.ones(1, 2, 10), -8000, "positive whole number"),
        (torch.ones(1, 2, 10), 44100.5, "positive whole number"),
        (torch.ones(1, 2, 10), float("nan"), "positive whole number"),
        (torch.ones(1, 2, 10), "fast", "number of Hz"),
        (torch.ones(1, 2, 10), 3999, "3999 Hz is outside 4000-768000 Hz"),
        (torch.ones(1, 2, 10), 10**12, "is outside 4000-768000 Hz"),
    ],
)
def test_other_bad_inputs_are_refused(waveform, rate, message):
    with pytest.raises(AudioInputError, match=message):
        to_gluegen_waveform(waveform, rate)


def test_audio_input_error_is_a_value_error():
    assert issubclass(AudioInputError, ValueError)


def test_the_encoder_refuses_bad_audio_before_running_the_network():
    from x2i.encoders.audioclip import AudioCLIPAudioEncoder, ESResNeXtFBSP

    with torch.device("meta"):
        network = ESResNeXtFBSP()
    with pytest.raises(AudioInputError, match="0 samples"):
        AudioCLIPAudioEncoder(network).encode_audio(torch.zeros(1, 2, 0), 44100)


# -- resampling -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "seconds"), [(8000, 5.0), (48000, 4.5), (192000, 5.0), (22050, 1.0), (16000, 0.3)])
def test_resampled_tones_match_tones_computed_at_441_khz(rate, seconds):
    freqs = (440.0, 1250.0, 3100.0) if rate > 8000 else (300.0, 1000.0)
    count = int(round(rate * seconds))
    end = (count - 1) / rate
    source = torch.from_numpy(tone(np.arange(count) / rate, end, freqs)).float()[None, None]
    got = to_gluegen_waveform(source, rate)[0]
    # The same sound sampled directly at 44.1 kHz, through the reference convention.
    samples = math.ceil(count * 44100 / rate)
    expected = reference_clip(tone(np.arange(samples) / 44100, end, freqs)[None].astype(np.float32))
    # Kaiser-windowed sinc with 64 zero crossings: within 1e-5 of full scale (65535) observed.
    np.testing.assert_allclose(got.numpy(), expected, atol=65535 * 5e-5, rtol=0)


def test_cropping_before_resampling_changes_nothing():
    x = noise(1, 2, 192000 * 6, seed=3)  # 6 s at 192 kHz
    whole = torchaudio_resample(x, 192000)[..., :LENGTH]
    torch.testing.assert_close(to_gluegen_waveform(x, 192000), scale_to_int16_range(whole), atol=0.05, rtol=0)


def torchaudio_resample(x: torch.Tensor, rate: int) -> torch.Tensor:
    import torchaudio.functional

    return torchaudio.functional.resample(x, rate, 44100, **KAISER_BEST)


def test_resample_is_the_kaiser_best_filter_and_keeps_length():
    x = noise(2, 8000, seed=4)
    out = resample(x, 8000)
    assert out.shape == (2, math.ceil(8000 * 44100 / 8000))
    assert resample(x, 44100) is x
    assert KAISER_BEST == {"lowpass_filter_width": 64, "rolloff": 0.9475937167399596,
                           "resampling_method": "sinc_interp_kaiser", "beta": 14.769656459379492}


# -- bounded work ---------------------------------------------------------------------------------

STANDARD_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 176400, 192000, 352800, 384000)


def test_the_filter_bank_estimate_is_torchaudios():
    from torchaudio.functional.functional import _get_sinc_resample_kernel

    for source, target in ((8000, 44100), (44100, 48000), (22050, 48000), (96000, 44100)):
        kernel, _ = _get_sinc_resample_kernel(source, target, math.gcd(source, target), dtype=torch.float32, **KAISER_BEST)
        assert kernel.shape[0] * kernel.shape[-1] <= resample_kernel_values(source, target)
        assert kernel.shape[0] * kernel.shape[-1] > 0.9 * resample_kernel_values(source, target)


def test_standard_rates_resample_exactly():
    for rate in STANDARD_RATES:
        for target in (44100, 48000):  # AudioCLIP's and CLAP's rates
            assert resample_kernel_values(rate, target) <= MAX_RESAMPLE_KERNEL, (rate, target)


def test_an_odd_rate_costs_bounded_memory_and_is_resampled_as_its_nearest_100_hz(caplog):
    # A 2 KB WAV at 96,001 Hz: the exact filter bank would hold 4.2e9 float64 values (32 GiB).
    assert resample_kernel_values(96001, 44100) > 1000 * MAX_RESAMPLE_KERNEL
    x = noise(1, 2, 1000, seed=9)
    with caplog.at_level(logging.WARNING):
        out = resample(x, 96001)
    assert "resampling it as 96000 Hz instead (pitch off by 0.001%)" in caplog.text
    assert torch.equal(out, resample(x, 96000))
    cost = cost_of("to_gluegen_waveform(torch.randn(1, 2, 1000), 96001)",
                   setup="import torch\nfrom x2i.encoders.audio_input import to_gluegen_waveform")
    assert cost["error"] is None and cost["peak_mib"] < 200 and cost["seconds"] < 20, cost
