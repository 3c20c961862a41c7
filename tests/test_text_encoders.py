"""Hugging Face text encoders loaded offline from folders, tokenised like the official recipe."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from x2i.encoders import TextEncoderFolderError, list_encoder_folders, load_text_encoder


def test_xlm_roberta_features_match_the_official_call(tiny_xlmr):
    encoder = load_text_encoder(tiny_xlmr)
    texts = ["Peinture impressionniste d'un jardin", ""]
    got = encoder.encode(texts)
    tokenizer = AutoTokenizer.from_pretrained(tiny_xlmr)
    model = AutoModel.from_pretrained(tiny_xlmr).float().eval()
    tokens = tokenizer(texts, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        expected = model(**tokens)["last_hidden_state"]
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
