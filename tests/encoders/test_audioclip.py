"""AudioCLIP's audio branch against the official code (AndreyGuzhov/AudioCLIP), and its checkpoint loading.

Golden data (``tests/data/audioclip_*``, provenance in ``tests/data/audioclip_README.md``) was made by
running the official ``ESResNeXtFBSP`` class (built with the keyword arguments ``AudioCLIP()`` uses)
and the official ``AudioCLIP.forward(audio=...)`` on CPU, torch 2.11. Weights are full size and are
regenerated here from a seed (:func:`seeded_audio_weights`); only what a seed cannot give is stored:
the official Blackman-Harris window and the BatchNorm running statistics, which were calibrated
with one train-mode pass of the official network so that every layer sees O(1) activations and the
attention gates are not saturated (random statistics would hide errors behind 0/1 sigmoids).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from support import DATA_DIR
from support.models import seeded_audio_weights
from support.precision import ENCODER_HALF, assert_close_in_half
from x2i.encoders.audioclip import (
    AudioCLIPAudioConfig,
    AudioCLIPAudioEncoder,
    AudioCLIPFileError,
    ESResNeXtFBSP,
    blackman_harris_window,
    load_audioclip_audio,
    normalize_embedding,
)

LAYOUT_FILE = DATA_DIR / "audioclip_official_layout.json"
GOLDEN_FILE = DATA_DIR / "audioclip_golden.safetensors"

WEIGHT_SEED = 0
CALIBRATION_SEED = 100  # seeded_clips(3, 100): the BatchNorm calibration input (not needed by the tests)
SPECTROGRAM_SEED, SPECTROGRAM_SAMPLES = 200, 4000
FORWARD_SEED = 300  # seeded_clips(2, 300): two full-length stereo clips

# Float32 tolerance for the unit-norm embeddings (entries up to ~0.12). Float32 cannot resolve the
# deep spectral valleys of tonal audio (Blackman-Harris side lobes sit ~90 dB down), so the
# official float32 forward is itself ~1.2e-3 away from its float64 forward (golden metadata
# "official_fp32_vs_fp64"). Ours builds bit-identical filters and shares that rounding, so it
# agrees with the official float32 output far more closely: 2.5e-5 observed (x86-64, 2 threads).
# 1e-4 leaves room for other CPUs' kernels and still fails on any real error (a wrong band, bin,
# gate or channel sum moves entries by >1e-2); exactness of the maths is the float64 test's job
# (ours and the official agree there to ~5e-14).
EMBEDDING_ATOL = 1e-4
# AudioCLIP in float16 (what dtype "auto" gives on a GPU; the front end stays float32) against float32:
# 0.034-0.054 relative error of the raw embedding on these weights (cosine >= 0.998), layer by layer
# 0.04 after layer1, then ~2x per stage: 50 convolutions and five multiplicative attention gates
# amplify rounding. bfloat16 measures 0.21 (cosine 0.976), which is why float16 is what "auto" picks.
AUDIOCLIP_FP16_TOLERANCE = 0.1


@contextlib.contextmanager
def single_thread():
    """Small inputs run faster on one thread, and float64 grouped convolutions (a per-group loop of
    tiny parallel regions) can stall for minutes on a busy 2-core machine when run on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def official_layout() -> dict:
    return json.loads(LAYOUT_FILE.read_text())


def golden() -> dict[str, torch.Tensor]:
    with safe_open(str(GOLDEN_FILE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def golden_metadata() -> dict[str, str]:
    with safe_open(str(GOLDEN_FILE), framework="pt") as f:
        return f.metadata()


def seeded_clips(batch: int, seed: int, samples: int = 176400, channels: int = 2) -> torch.Tensor:
    """Deterministic int16-range float32 ``[batch, channels, samples]`` "audio": six enveloped tones
    (40 Hz - 20 kHz) per channel plus a little noise, min-max scaled per clip like GlueGen's input."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    t = torch.arange(samples, dtype=f64) / 44100
    shape = (batch, channels, 6, 1)
    freq = 40.0 * 2.0 ** (torch.rand(shape, generator=g, dtype=f64) * 9)
    phase = torch.rand(shape, generator=g, dtype=f64) * 2 * math.pi
    amplitude = torch.rand(shape, generator=g, dtype=f64)
    envelope_rate = torch.rand(shape, generator=g, dtype=f64) * 3
    envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * envelope_rate * t + 2 * phase)
    x = (amplitude * envelope * torch.sin(2 * math.pi * freq * t + phase)).sum(2)
    x = x + 0.05 * torch.randn((batch, channels, samples), generator=g, dtype=f64)
    low, high = x.amin((1, 2), keepdim=True), x.amax((1, 2), keepdim=True)
    return ((x - low) / (high - low) * 65535.0 - 32768.0).float()


def golden_weights() -> dict[str, torch.Tensor]:
    """The weights the golden outputs were computed with: seeded, plus the stored window and statistics."""
    state = seeded_audio_weights(official_layout()["audio_keys"], WEIGHT_SEED)
    stored = golden()
    for key in state:
        if f"weights.{key}" in stored:
            state[key] = stored[f"weights.{key}"]
    return state


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return golden_weights()


@pytest.fixture(scope="module")
def network(weights) -> ESResNeXtFBSP:
    model = ESResNeXtFBSP()
    model.load_state_dict(weights, strict=True)
    return model.eval().requires_grad_(False)


@pytest.fixture
def network_on_device(network, device) -> ESResNeXtFBSP:
    yield network.to(device)
    network.to("cpu")


# -- architecture ---------------------------------------------------------------------------------


def test_state_dict_layout_is_the_official_audio_branch():
    layout = official_layout()
    model = ESResNeXtFBSP()
    ours = model.state_dict()
    assert list(ours) == list(layout["audio_keys"])  # same keys, same order
    assert {k: list(v.shape) for k, v in ours.items()} == layout["audio_keys"]
    assert len(ours) == layout["num_tensors"] == 370
    assert sum(p.numel() for p in model.parameters()) == layout["num_parameters"] == 32_104_771
    assert sum(v.numel() for v in ours.values()) == layout["num_values"]
    assert ours["layer1.0.bn1.num_batches_tracked"].dtype == torch.int64
    # The whole released AudioCLIP state_dict: the audio branch is exactly the 'audio.' part.
    assert layout["full_checkpoint_num_tensors"] == 861
    assert set(layout["full_checkpoint_audio_keys"]) == {f"audio.{k}" for k in ours}


def test_config_matches_audioclip_defaults():
    cfg = AudioCLIPAudioConfig()
    assert (cfg.n_fft, cfg.hop_length, cfg.win_length, cfg.n_bins, cfg.band_height, cfg.used_bins) == (2048, 561, 1654, 1025, 341, 1023)
    assert (cfg.layers, cfg.groups, cfg.width_per_group, cfg.embed_dim, cfg.sample_rate) == ((3, 4, 6, 3), 32, 4, 1024, 44100)
    assert cfg.num_frames(176400) == 313 and cfg.num_frames(100) == 1 and cfg.num_frames(1655) == 2


def test_window_is_scipys_periodic_blackman_harris():
    official = golden()["weights.window"]  # scipy.signal.get_window('blackmanharris', 1654, fftbins=True)
    torch.testing.assert_close(blackman_harris_window(1654), official, atol=1e-7, rtol=0)
    from scipy import signal  # in requirements-test.txt: the window must equal scipy's, always checked
    torch.testing.assert_close(
        blackman_harris_window(1654), torch.from_numpy(signal.get_window("blackmanharris", 1654, fftbins=True)).float(),
        atol=1e-7, rtol=0,
    )


# -- front end ------------------------------------------------------------------------------------


def test_fbsp_filters_equal_the_official_materialised_weights(network):
    data = golden()
    rows = data["filters.rows"].tolist()
    weight_re, weight_im = network.fbsp.filters(2048)
    # Same float32 operations in the same order: equal to the last bit on x86; allow 2 ulp elsewhere.
    torch.testing.assert_close(weight_re[rows], data["filters.values"][..., 0], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(weight_im[rows], data["filters.values"][..., 1], atol=1e-7, rtol=1e-6)
    assert not torch.isnan(weight_re).any() and not torch.isnan(weight_im).any()


def test_log_power_spectrogram_matches_the_official_one(network):
    data = golden()
    x = data["spectrogram.input"]  # [1, 2, 4000] int16-range
    expected = data["spectrogram.decibels"]  # official [1, 2, 3, 341, 6]
    got = network.log_power_spectrogram(x)
    assert got.shape == (2, 3, 341, 6)
    got = got.reshape(expected.shape)
    # Low-power bins carry float32 cancellation noise: the official float32 decibels are up to
    # "spectrogram_fp32_vs_fp64" (0.19) dB from its own float64 ones. Ours shares the bit-identical
    # filters, so it is within 1.2e-3 dB of the official float32 result (observed) and within 5e-6 dB
    # for bins less than 20 dB below the peak. The float64 test below is the exact check.
    assert (got - expected).abs().max() <= 1e-2
    loud = expected > expected.amax() - 20
    torch.testing.assert_close(got[loud], expected[loud], atol=1e-4, rtol=0)


def test_float64_spectrogram_and_forward_are_the_official_maths(weights):
    """In float64 rounding noise vanishes: any difference left would be a difference in the maths."""
    data = golden()
    model = ESResNeXtFBSP()
    model.load_state_dict(weights)
    model = model.double().eval()
    with torch.no_grad(), single_thread():
        decibels = model.log_power_spectrogram(data["spectrogram.input"].double())
        torch.testing.assert_close(decibels.reshape(data["spectrogram.decibels_fp64"].shape),
                                   data["spectrogram.decibels_fp64"], atol=1e-8, rtol=0)
        embedding = model(data["spectrogram.input"].double())
    torch.testing.assert_close(embedding, data["float64.embedding"], atol=1e-10, rtol=1e-9)


# -- whole network --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forward_clips() -> torch.Tensor:
    clips = seeded_clips(2, FORWARD_SEED)
    probe = golden()["forward.input_probe"]
    # Guards against a change of torch's generator or sin(): the golden outputs belong to these clips.
    assert torch.allclose(clips[:, :, :64].reshape(-1), probe, atol=0.05, rtol=0), "seeded_clips no longer reproduces the golden input"
    return clips


@pytest.mark.device
def test_forward_matches_the_official_network(network_on_device, forward_clips, device):
    data = golden()
    with torch.no_grad():
        raw = network_on_device(forward_clips.to(device)).cpu()
    assert raw.shape == (2, 1024) and raw.dtype == torch.float32
    norm = data["forward.embedding"].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(raw / norm, data["forward.embedding"] / norm, atol=EMBEDDING_ATOL, rtol=0)
    # AudioCLIP.forward(audio=...)[0][0][0]: what GlueGen's FrozenAudioCLIPEmbedder feeds the GlueNet.
    torch.testing.assert_close(normalize_embedding(raw), data["forward.normalized"], atol=EMBEDDING_ATOL, rtol=0)
    # The two clips and the two channels of each really differ (a broken channel sum would show).
    assert (data["forward.normalized"][0] - data["forward.normalized"][1]).abs().max() > 1e-2


@pytest.mark.device
def test_encode_audio_applies_gluegen_input_and_matches_the_official_output(network_on_device, forward_clips, device):
    # Already 44.1 kHz, 4 s, stereo and min-max scaled: the input convention changes the clips only by
    # float32 rounding of the rescaling, so the official outputs still hold. max_batch=1 exercises chunking.
    encoder = AudioCLIPAudioEncoder(network_on_device, name="AudioCLIP-Full-Training.pt", max_batch=1)
    got = encoder.encode_audio(forward_clips, 44100)  # CPU audio in, as ComfyUI's AUDIO arrives
    assert got.device.type == device.type
    got = got.cpu()
    assert got.shape == (2, 1024) and got.dtype == torch.float32
    torch.testing.assert_close(got, golden()["forward.normalized"], atol=EMBEDDING_ATOL, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)
    assert encoder.output_dim == 1024 and encoder.name == "AudioCLIP-Full-Training.pt"
    encoder.device = torch.device("cpu")  # ComfyUI's ModelPatcher assigns it


@pytest.mark.device
def test_float16_as_comfyui_runs_it_on_a_gpu_stays_close_to_float32(weights, forward_clips, device):
    # The whole 4 s clips on a GPU; one second of one clip on the CPU, where float16 convolutions are slow.
    clips = forward_clips if device.type == "cuda" else forward_clips[:1, :, :44100]
    model = ESResNeXtFBSP()
    model.load_state_dict(weights)
    model.eval().to(device)
    with torch.no_grad():
        reference = model(clips.to(device))
        model.to(ENCODER_HALF)
        half = model(clips.to(device))
    assert half.dtype == ENCODER_HALF
    assert_close_in_half(half, reference, ENCODER_HALF, "AudioCLIP", tolerance=AUDIOCLIP_FP16_TOLERANCE)


def test_digital_silence_gives_a_finite_embedding(network):
    from x2i.encoders.audio_input import SILENT_VALUE

    silence = torch.full((1, 2, 4000), SILENT_VALUE)  # what the input convention makes of a silent clip
    with torch.no_grad():
        assert torch.equal(network.log_power_spectrogram(silence), torch.full((2, 3, 341, 6), -180.0))
        embedding = normalize_embedding(network(silence))
    assert torch.isfinite(embedding).all()


def test_channels_last_and_reduced_precision_keep_the_front_end_float32(weights):
    x = golden()["spectrogram.input"]  # [1, 2, 4000]: 6 frames, cheap
    model = ESResNeXtFBSP()
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad(), single_thread():
        reference = normalize_embedding(model(x))
        model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(normalize_embedding(model(x)), reference, atol=2e-6, rtol=0)
        model.to(torch.bfloat16)
        assert model.conv1.weight.dtype == torch.bfloat16
        for tensor in (model.window, model.fbsp.m, model.fbsp.fb, model.fbsp.fc):
            assert tensor.dtype == torch.float32  # centre frequencies up to 1024 do not survive bf16
        torch.testing.assert_close(model.fbsp.fc, weights["fbsp.fc"])
        half = normalize_embedding(model(x))
    assert half.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(half, reference).min() > 0.99


def test_filter_cache_follows_weight_changes_and_training_gets_gradients(weights):
    model = ESResNeXtFBSP()
    model.load_state_dict(weights)
    model.eval()
    x = golden()["spectrogram.input"]
    with torch.no_grad():
        before = model.log_power_spectrogram(x)
        assert torch.equal(model.log_power_spectrogram(x), before)  # cached filters: same result
        model.fbsp.fc.add_(3.0)  # in-place change bumps the version counter
        shifted = model.log_power_spectrogram(x)
        assert not torch.allclose(shifted, before)
        model.load_state_dict(weights)
        torch.testing.assert_close(model.log_power_spectrogram(x), before, atol=0, rtol=0)
    model.train()
    model.log_power_spectrogram(x).mean().backward()
    for p in (model.fbsp.m, model.fbsp.fb, model.fbsp.fc):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# -- checkpoints ----------------------------------------------------------------------------------


DECOYS = {
    "visual.conv1.weight": (4, 3, 3, 3),
    "transformer.resblocks.0.attn.in_proj_weight": (6, 2),
    "token_embedding.weight": (5, 2),
    "logit_scale": (),
    "logit_scale_ai": (),
    "logit_scale_at": (),
}


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory, weights) -> Path:
    """A file shaped like AudioCLIP-Full-Training.pt: a flat state_dict, the audio branch under
    'audio.' with the official names and shapes, among image/text/logit-scale keys (small decoys)."""
    state = {name: torch.randn(shape) for name, shape in DECOYS.items()}
    state.update({f"audio.{k}": v for k, v in weights.items()})
    path = tmp_path_factory.mktemp("audioclip") / "AudioCLIP-Full-Training.pt"
    torch.save(state, path)
    return path


def _assert_loaded(encoder: AudioCLIPAudioEncoder, weights: dict[str, torch.Tensor]) -> None:
    loaded = encoder.network.state_dict()
    assert set(loaded) == set(weights)
    for key, value in weights.items():
        assert torch.equal(loaded[key], value), key
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_full_checkpoint_loads_strictly_and_ignores_image_and_text_weights(full_checkpoint, weights):
    encoder = load_audioclip_audio(full_checkpoint)
    _assert_loaded(encoder, weights)
    assert encoder.name == "AudioCLIP-Full-Training.pt"
    assert encoder.output_dim == 1024 and encoder.device == torch.device("cpu")
    assert encoder.dtype == torch.float32


def test_loading_and_running_under_inference_mode_like_comfyui(full_checkpoint, weights):
    # ComfyUI runs nodes under torch.inference_mode(): parameters become inference tensors, which
    # have no version counter for the filter cache to watch.
    x = golden()["spectrogram.input"]
    with torch.inference_mode():
        encoder = load_audioclip_audio(full_checkpoint)
        assert encoder.network.fbsp.fc.is_inference()
        first = encoder.network.log_power_spectrogram(x)
        assert torch.equal(encoder.network.log_power_spectrogram(x), first)
        encoder.network.load_state_dict({**weights, "fbsp.fc": weights["fbsp.fc"] + 3.0})
        assert not torch.allclose(encoder.network.log_power_spectrogram(x), first)
        encoder.to(torch.bfloat16)
        assert encoder.network.fbsp.fc.dtype == torch.float32 and encoder.dtype == torch.bfloat16


@pytest.mark.parametrize("wrapping", ["audio_only", "state_dict", "module_prefix"])
def test_other_layouts_of_the_audio_branch_load(tmp_path, weights, wrapping):
    if wrapping == "audio_only":
        obj = dict(weights)
    elif wrapping == "state_dict":
        obj = {"state_dict": {f"audio.{k}": v for k, v in weights.items()}, "epoch": 3}
    else:
        obj = {f"module.audio.{k}": v for k, v in weights.items()}
    path = tmp_path / "AudioCLIP-Partial-Training.pt"
    torch.save(obj, path)
    _assert_loaded(load_audioclip_audio(path), weights)


def test_a_gluenet_file_is_refused_with_a_clear_message(tmp_path):
    from support.models import random_state_dict, translator_noln_layout

    path = tmp_path / "gluenet_sound2img_audioclip_us8k.ckpt"
    torch.save(random_state_dict(translator_noln_layout(4, 8, 6, depth=1)), path)
    with pytest.raises(AudioCLIPFileError) as info:
        load_audioclip_audio(path)
    message = str(info.value)
    assert "not an AudioCLIP checkpoint" in message and "audio.fbsp.fc" in message
    assert "GlueNet" in message and "blocks.0" in message  # what was found, and where it belongs


def test_mismatched_audio_weights_are_listed(tmp_path, weights):
    state = {f"audio.{k}": v for k, v in weights.items() if k != "att5.bn.running_var"}
    state["audio.extra.weight"] = torch.zeros(1)
    state["audio.fc.weight"] = torch.zeros(527, 2048)  # the AudioSet classifier ESRNXFBSP.pt
    state["audio.fc.bias"] = torch.zeros(527)
    path = tmp_path / "ESRNXFBSP.pt"
    torch.save(state, path)
    with pytest.raises(AudioCLIPFileError) as info:
        load_audioclip_audio(path)
    message = str(info.value)
    assert "missing 1 (e.g. att5.bn.running_var)" in message
    assert "unexpected 1 (e.g. extra.weight)" in message
    assert "fc.weight: file (527, 2048) vs model (1024, 2048)" in message
    assert "not AudioCLIP's 1024-d audio embedding" in message


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(AudioCLIPFileError, match="not found"):
        load_audioclip_audio(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(AudioCLIPFileError, match="could not be read as a safe PyTorch checkpoint"):
        load_audioclip_audio(garbage)
    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], a_list)
    with pytest.raises(AudioCLIPFileError, match="holds a list, not a state_dict"):
        load_audioclip_audio(a_list)
    clip_only = tmp_path / "CLIP.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1), "transformer.x": torch.zeros(1)}, clip_only)
    with pytest.raises(AudioCLIPFileError, match="no audio branch"):
        load_audioclip_audio(clip_only)


def test_golden_data_records_its_provenance():
    metadata = golden_metadata()
    assert "AndreyGuzhov/AudioCLIP" in metadata["source"]
    assert json.loads(metadata["seeds"]) == {
        "weights": WEIGHT_SEED, "calibration": CALIBRATION_SEED, "spectrogram": SPECTROGRAM_SEED,
        "forward": FORWARD_SEED,
    }
    assert sum(p.stat().st_size for p in DATA_DIR.glob("audioclip_*")) < 1_500_000
