"""CLAP's audio tower as a sound encoder: offline, deterministic, equal to transformers' own path."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchaudio.functional
from transformers import ClapFeatureExtractor, ClapModel

from support.precision import ENCODER_HALF, assert_close_in_half
from x2i.encoders.audio_input import AudioInputError
from x2i.encoders.clap import load_clap_audio
from x2i.encoders.text import TextEncoderFolderError


def _reference(folder, mono_48k: list[np.ndarray]) -> torch.Tensor:
    model = ClapModel.from_pretrained(folder).eval()
    extractor = ClapFeatureExtractor.from_pretrained(folder)
    inputs = extractor(mono_48k, sampling_rate=48000, return_tensors="pt")
    with torch.no_grad():
        out = model.get_audio_features(**inputs)
    out = out if torch.is_tensor(out) else out.pooler_output
    return F.normalize(out, dim=-1)


def stereo_clips() -> torch.Tensor:
    return torch.randn(2, 2, 48000 * 3, generator=torch.Generator().manual_seed(0)) * 0.1


@pytest.mark.device
def test_stereo_48k_clip_matches_clap_model(tiny_clap, device):
    encoder = load_clap_audio(tiny_clap).to(device)
    stereo = stereo_clips()
    got = encoder.encode_audio(stereo, 48000)
    assert got.device.type == device.type
    got = got.cpu()
    expected = _reference(tiny_clap, [clip.mean(0).numpy() for clip in stereo])
    assert got.shape == (2, 32) and encoder.output_dim == 32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))


@pytest.mark.device
def test_float16_as_comfyui_runs_it_on_a_gpu_stays_close_to_float32(tiny_clap, device):
    stereo = stereo_clips()
    got = load_clap_audio(tiny_clap, dtype=ENCODER_HALF).to(device).encode_audio(stereo, 48000)
    assert_close_in_half(got, _reference(tiny_clap, [clip.mean(0).numpy() for clip in stereo]), ENCODER_HALF, "CLAP")


def test_other_rates_are_resampled_and_long_clips_are_deterministic(tiny_clap):
    encoder = load_clap_audio(tiny_clap)
    clip = torch.sin(torch.linspace(0, 4000, 44100 * 14))[None, None] * 0.3
    first = encoder.encode_audio(clip, 44100)
    assert torch.equal(first, encoder.encode_audio(clip, 44100))  # no random 10 s window
    head = clip[..., : 44100 * 10].mean(1)
    resampled = torchaudio.functional.resample(head, 44100, 48000, lowpass_filter_width=64, rolloff=0.9475937167399596,
                                               resampling_method="sinc_interp_kaiser", beta=14.769656459379492)
    torch.testing.assert_close(first, _reference(tiny_clap, [resampled[0].numpy()]), atol=1e-5, rtol=1e-4)


def test_bad_audio_and_folders_are_refused(tiny_clap, tmp_path):
    encoder = load_clap_audio(tiny_clap)
    with pytest.raises(AudioInputError, match="0 samples"):
        encoder.encode_audio(torch.zeros(1, 1, 0), 48000)
    no_extractor = tmp_path / "clap-no-extractor"
    shutil.copytree(tiny_clap, no_extractor)
    (no_extractor / "preprocessor_config.json").unlink()
    with pytest.raises(TextEncoderFolderError, match="preprocessor_config.json"):
        load_clap_audio(no_extractor)


def test_a_text_model_folder_is_not_taken_for_clap(tiny_xlmr, tmp_path):
    folder = tmp_path / "xlmr"
    shutil.copytree(tiny_xlmr, folder)
    (folder / "preprocessor_config.json").write_text("{}")
    with pytest.raises(TextEncoderFolderError, match="is a 'xlm-roberta' model, not CLAP"):
        load_clap_audio(folder)


def test_clap_folders_are_told_apart_from_other_model_folders(tiny_clap, tiny_xlmr, tmp_path):
    from x2i.encoders.clap import is_clap_folder

    assert is_clap_folder(tiny_clap)
    assert not is_clap_folder(tiny_xlmr)
    assert not is_clap_folder(tmp_path)
