"""Hugging Face text encoders loaded offline from folders, tokenised like the official recipe."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from support.precision import ENCODER_HALF, assert_close_in_half
from x2i.encoders import TextEncoderFolderError, list_encoder_folders, load_text_encoder

PROMPTS = ["Peinture impressionniste d'un jardin", "a photo of an astronaut riding a horse on mars", ""]


def official_features(folder, texts: list[str], mask: bool = True) -> torch.Tensor:
    """GlueGen's call, on the CPU in float32: 77 tokens, max_length padding, last_hidden_state."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).float().eval()
    if model.config.is_encoder_decoder:
        model = model.get_encoder()
    tokens = tokenizer(texts, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"] if mask else None)["last_hidden_state"]


@pytest.fixture(scope="module")
def tiny_clip_text(tmp_path_factory):
    from support.training import make_clip_text_folder

    return make_clip_text_folder(tmp_path_factory.mktemp("encoders") / "clip-text-tiny", hidden=48)


@pytest.fixture(params=["tiny_xlmr", "tiny_t5", "tiny_clip_text"])
def encoder_folder(request):
    return request.getfixturevalue(request.param)


@pytest.mark.device
def test_encoders_match_the_official_call_on_the_device(encoder_folder, device):
    encoder = load_text_encoder(encoder_folder).to(device)
    got = encoder.encode(PROMPTS)
    assert got.device.type == device.type and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), official_features(encoder_folder, PROMPTS), atol=1e-5, rtol=1e-4)


@pytest.mark.device
def test_float16_encoders_stay_close_to_float32(encoder_folder, device):
    """What dtype "auto" gives on a GPU (ComfyUI's text-encoder precision)."""
    encoder = load_text_encoder(encoder_folder, dtype=ENCODER_HALF).to(device)
    assert encoder.dtype == ENCODER_HALF
    got = encoder.encode(PROMPTS)
    assert_close_in_half(got, official_features(encoder_folder, PROMPTS), ENCODER_HALF, encoder.name)


def test_xlm_roberta_features_match_the_official_call(tiny_xlmr):
    encoder = load_text_encoder(tiny_xlmr)
    texts = ["Peinture impressionniste d'un jardin", ""]
    got = encoder.encode(texts)
    tokenizer = AutoTokenizer.from_pretrained(tiny_xlmr)
    tokens = tokenizer(texts, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
    expected = official_features(tiny_xlmr, texts)
    assert got.shape == (2, 77, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    # All 77 positions go in, padding included, and padding differs from content.
    assert tokens["attention_mask"][1].sum() == 2
    assert not torch.allclose(got[0, 1], got[0, 70])


def test_long_prompts_warn_and_keep_the_first_77_tokens(tiny_xlmr, caplog):
    encoder = load_text_encoder(tiny_xlmr)
    long_prompt = " ".join(["un chat assis sur un tapis rouge"] * 30)
    with caplog.at_level(logging.WARNING):
        features = encoder.encode([long_prompt])
    assert "only the first 77 are used" in caplog.text
    assert features.shape == (1, 77, 64)
    # The first 77 tokens, closing </s> included, as GlueGen's truncating tokenizer call gives them.
    torch.testing.assert_close(features, official_features(tiny_xlmr, [long_prompt]))
    assert not torch.allclose(features, official_features(tiny_xlmr, [" ".join(["un chat assis sur un tapis rouge"] * 2)]), atol=1e-3)


def test_requested_dtype_is_used(tiny_xlmr):
    encoder = load_text_encoder(tiny_xlmr, dtype=torch.bfloat16)
    assert encoder.dtype == torch.bfloat16
    assert encoder.encode(["gatto"]).dtype == torch.float32


def test_t5_folder_loads_its_encoder_only(tiny_t5):
    encoder = load_text_encoder(tiny_t5)
    assert type(encoder.transformer).__name__ == "T5EncoderModel"
    assert encoder.hidden_size == 48
    assert encoder.encode(["a photo of an astronaut riding a horse on mars"]).shape == (1, 77, 48)


def test_folder_without_tokenizer_says_what_to_copy(tiny_xlmr, tmp_path):
    broken = tmp_path / "xlmr-no-tokenizer"
    shutil.copytree(tiny_xlmr, broken)
    for name in ("tokenizer.json", "sentencepiece.bpe.model"):
        (broken / name).unlink(missing_ok=True)
    with pytest.raises(TextEncoderFolderError, match="has no tokenizer.*copy the tokenizer files"):
        load_text_encoder(broken)


def test_folder_without_weights_or_config(tiny_xlmr, tmp_path):
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_xlmr, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(TextEncoderFolderError, match="has no weights"):
        load_text_encoder(no_weights)
    with pytest.raises(TextEncoderFolderError, match="no config.json"):
        load_text_encoder(tmp_path)


def test_encoder_folders_are_listed_up_to_two_levels(tiny_xlmr, tmp_path):
    (tmp_path / "google").mkdir()
    shutil.copytree(tiny_xlmr, tmp_path / "google" / "xlmr")
    shutil.copytree(tiny_xlmr, tmp_path / "xlm-roberta-large")
    (tmp_path / "clip_l.safetensors").write_bytes(b"")
    assert list_encoder_folders([tmp_path, tmp_path / "missing"]) == ["google/xlmr", "xlm-roberta-large"]


def test_code_shipped_in_a_model_folder_is_never_run(tiny_xlmr, tmp_path):
    import json

    folder = tmp_path / "remote-code"
    shutil.copytree(tiny_xlmr, folder)
    marker = tmp_path / "ran"
    (folder / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "configuration_evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TextEncoderFolderError, match="code shipped in a model folder is never run"):
        load_text_encoder(folder)
    assert not marker.exists()


def test_a_huge_prompt_is_refused_before_it_is_tokenised(tiny_xlmr, tiny_t5):
    from x2i.bridge.language_models import encode_prompt_for_bridge, load_language_model
    from x2i.encoders.text import MAX_PROMPT_CHARS

    encoder = load_text_encoder(tiny_xlmr)
    assert encoder.encode(["a" * MAX_PROMPT_CHARS]).shape == (1, 77, 64)  # at the limit: read, cut to 77 tokens
    message = r"the prompt has 5,000,000 characters, over the limit of 50,000; only its first 77 tokens are used"
    with pytest.raises(ValueError, match=message):
        encoder.encode(["un chat " * 625_000])
    bridge_lm = load_language_model(tiny_t5, "t5_unet")
    with pytest.raises(ValueError, match=message):
        encode_prompt_for_bridge("t5_unet", bridge_lm, bridge_lm.tokenizer, "un chat " * 625_000)
