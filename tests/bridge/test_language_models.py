"""LaVi-Bridge language-model features against an independent rewrite of the official scripts' calls.

The references below repeat what ``test/t5_unet.py``, ``test/llama2_unet.py`` and
``test/t5_transformer.py`` (ShihaoZhaoZSH/LaVi-Bridge @ 5a725f3) do, with transformers' own
classes and tokenizer padding, on tiny real-architecture folders.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from support.models import CORPUS, make_llama_folder
from support.precision import ENCODER_HALF, assert_close_in_half
from x2i.bridge.errors import LaViBridgeFileError
from x2i.bridge.language_models import (
    OFFICIAL_PROMPT_SUFFIX,
    LaViBridgeRecipe,
    attended_tokens,
    encode_for_bridge,
    encode_prompt_for_bridge,
    family_of_hf_config,
    family_of_hf_folder,
    family_of_recipe,
    load_language_model,
    text_config,
    tokenize_for_bridge,
)

LONG = " ".join(CORPUS[:2] * 12)  # far beyond 120 tokens for both tiny tokenizers
PROMPTS = ["a photo of an astronaut riding a horse on mars", "", "un chat assis", LONG]


# ---- independent references of the official calls ----

def official_t5(folder: Path, prompts: list[str], max_length: int, with_mask: bool):
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = T5EncoderModel.from_pretrained(folder).eval()
    inputs = tokenizer(prompts, padding="max_length", max_length=max_length, add_special_tokens=True,
                       return_tensors="pt", truncation=True)
    with torch.no_grad():
        if with_mask:  # t5_transformer.py
            return model(inputs.input_ids, attention_mask=inputs.attention_mask)[0], inputs.input_ids, inputs.attention_mask
        return model(input_ids=inputs.input_ids)[0], inputs.input_ids, None  # t5_unet.py


def official_llama(folder: Path, prompts: list[str], dtype: torch.dtype):
    from transformers import AutoTokenizer, LlamaForCausalLM

    # AutoTokenizer: the folder's tokenizer.json in every transformers (4's LlamaTokenizer class is the
    # sentencepiece one, which needs a tokenizer.model the tiny folder does not have).
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    tokenizer.pad_token = "[PAD]"
    # Llama-2's tokenizer pads on the right (the slow LlamaTokenizer the script used, and the hub
    # config); transformers 5's LlamaTokenizer class defaults to the left, so say it.
    tokenizer.padding_side = "right"
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt", truncation=True).input_ids
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1].to(torch.float32), ids


# ---- T5 -> U-Net ----

def test_t5_unet_matches_official(tiny_t5):
    encoder = load_language_model(tiny_t5, "t5_unet")
    features, mask = encode_for_bridge("t5_unet", encoder.transformer, encoder.tokenizer, PROMPTS)
    expected, ids, _ = official_t5(tiny_t5, PROMPTS, 77, with_mask=False)
    ours_ids, _ = tokenize_for_bridge("t5_unet", encoder.tokenizer, PROMPTS)
    assert mask is None
    assert torch.equal(ours_ids, ids)
    assert ids[3, -1] == encoder.tokenizer.eos_token_id  # truncation keeps EOS
    assert features.dtype == torch.float32 and features.shape == (4, 77, 48)
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=1e-5)


def test_t5_unet_uses_no_mask_so_padding_changes_the_text_features(tiny_t5):
    # Without a mask, T5's bidirectional attention sees the padding: features differ from masked ones.
    encoder = load_language_model(tiny_t5, "t5_unet")
    unmasked, _ = encode_for_bridge("t5_unet", encoder, encoder.tokenizer, PROMPTS[:1])
    masked, _ = encode_for_bridge("t5_transformer", encoder, encoder.tokenizer, PROMPTS[:1])
    assert not torch.allclose(unmasked[:, :5], masked[:, :5], atol=1e-4)


def test_full_t5_checkpoint_is_reduced_to_its_encoder(tiny_t5):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    features, _ = encode_for_bridge(LaViBridgeRecipe.T5_UNET, model, tokenizer, PROMPTS[:2])
    expected, _, _ = official_t5(tiny_t5, PROMPTS[:2], 77, with_mask=False)
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=1e-5)


# ---- T5 -> PixArt ----

def test_t5_pixart_matches_official_and_returns_the_mask(tiny_t5):
    encoder = load_language_model(tiny_t5, "t5_transformer")
    features, mask = encode_for_bridge("t5_transformer", encoder.transformer, encoder.tokenizer, PROMPTS)
    expected, _, expected_mask = official_t5(tiny_t5, PROMPTS, 120, with_mask=True)
    assert features.shape == (4, 120, 48)
    assert torch.equal(mask, expected_mask)
    assert mask[1].sum() == 1  # "" is just </s>
    assert mask[3].sum() == 120
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=1e-5)


def test_pixart_prompt_features_are_the_real_tokens_only(tiny_t5):
    encoder = load_language_model(tiny_t5, "t5_transformer")
    features, mask = encode_for_bridge("t5_transformer", encoder, encoder.tokenizer, PROMPTS)
    kept = attended_tokens(features, mask)
    assert [k.shape[1] for k in kept] == mask.sum(1).tolist()
    for i, text in enumerate(PROMPTS):
        single = encode_prompt_for_bridge("t5_transformer", encoder, encoder.tokenizer, text)
        torch.testing.assert_close(single, features[i : i + 1, : int(mask[i].sum())], atol=1e-6, rtol=1e-5)
    # U-Net recipes have no mask: every one of the 77 positions is kept.
    assert encode_prompt_for_bridge("t5_unet", encoder, encoder.tokenizer, PROMPTS[0]).shape == (1, 77, 48)


def test_cross_attention_with_the_mask_equals_attention_over_the_kept_tokens(tiny_t5):
    # PixArt's official call attends over all 120 tokens with padded keys masked; ComfyUI's
    # conditioning has no mask, so the bridge hands over only the kept tokens. Same attention.
    import torch.nn.functional as F

    encoder = load_language_model(tiny_t5, "t5_transformer")
    features, mask = encode_for_bridge("t5_transformer", encoder, encoder.tokenizer, PROMPTS)
    g = torch.Generator().manual_seed(0)
    heads, head_dim, queries = 4, 16, 9
    to_k = torch.randn(48, heads * head_dim, generator=g) / 7
    to_v = torch.randn(48, heads * head_dim, generator=g) / 7
    query = torch.randn(len(PROMPTS), heads, queries, head_dim, generator=g)

    def split(x):  # [B, T, heads * d] -> [B, heads, T, d]
        return x.unflatten(-1, (heads, head_dim)).transpose(1, 2)

    keys, values = split(features @ to_k), split(features @ to_v)
    masked = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask.bool()[:, None, None, :])
    unmasked = F.scaled_dot_product_attention(query, keys, values)
    for i, tokens in enumerate(attended_tokens(features, mask)):
        kept = F.scaled_dot_product_attention(query[i : i + 1], split(tokens @ to_k), split(tokens @ to_v))
        torch.testing.assert_close(kept, masked[i : i + 1], atol=1e-5, rtol=1e-5)
        if mask[i].sum() < 120:  # the padding would change the result if it were kept unmasked
            assert not torch.allclose(kept, unmasked[i : i + 1], atol=1e-3)


def test_attended_tokens_checks_the_mask_shape():
    with pytest.raises(ValueError, match=r"mask \(1, 77\) does not match features \(1, 120, 8\)"):
        attended_tokens(torch.zeros(1, 120, 8), torch.ones(1, 77))


# ---- Llama -> U-Net ----

def test_llama_tokens_are_bos_text_then_unk_padding(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids, mask = tokenize_for_bridge("llama2_unet", tokenizer, PROMPTS)
    _, expected = official_llama(tiny_llama, PROMPTS, torch.float32)
    assert torch.equal(ids, expected)
    assert (ids[:, 0] == 1).all()  # BOS
    assert ids[1].tolist() == [1] + [0] * 76  # "" -> BOS + '[PAD]', which resolves to <unk> = 0
    assert 2 not in ids.tolist()[0]  # no EOS
    assert mask[3].sum() == 77 and mask[1].sum() == 1
    assert tokenizer.pad_token is None  # the tokenizer was not modified


def test_llama_features_match_official_in_float32(tiny_llama):
    encoder = load_language_model(tiny_llama, "llama2_unet", dtype=torch.float32)
    features, mask = encode_for_bridge("llama2_unet", encoder.transformer, encoder.tokenizer, PROMPTS)
    expected, _ = official_llama(tiny_llama, PROMPTS, torch.float32)
    assert mask is None
    assert features.shape == (4, 77, 32)
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=1e-5)


def test_llama_runs_in_float16_by_default_like_the_official_inference(tiny_llama):
    encoder = load_language_model(tiny_llama, "llama2_unet")
    assert encoder.dtype == torch.float16
    features, _ = encode_for_bridge("llama2_unet", encoder, encoder.tokenizer, PROMPTS[:2])
    expected, _ = official_llama(tiny_llama, PROMPTS[:2], torch.float16)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, expected, atol=2e-3, rtol=2e-3)


def test_llama_tokenizer_without_add_bos_still_gets_bos(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    folder = make_llama_folder(tmp_path / "llama-nobos", add_bos_token=False)
    ours, _ = tokenize_for_bridge("llama2_unet", AutoTokenizer.from_pretrained(folder), PROMPTS)
    reference, _ = tokenize_for_bridge("llama2_unet", AutoTokenizer.from_pretrained(tiny_llama), PROMPTS)
    assert torch.equal(ours, reference)


# ---- every recipe on the device, in float32 and in the float16 that "auto" gives on a GPU ----

RECIPE_FOLDERS = {"t5_unet": "tiny_t5", "t5_transformer": "tiny_t5", "llama2_unet": "tiny_llama"}


def official_features(recipe: str, folder: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The official call on the CPU in float32: features, and the mask where the recipe keeps one."""
    if recipe == "llama2_unet":
        return official_llama(folder, PROMPTS, torch.float32)[0], None
    features, _, mask = official_t5(folder, PROMPTS, 120 if recipe == "t5_transformer" else 77, with_mask=recipe == "t5_transformer")
    return features, mask


@pytest.mark.device
@pytest.mark.parametrize("recipe", sorted(RECIPE_FOLDERS))
def test_every_recipe_matches_official_on_the_device(recipe, request, device):
    folder = request.getfixturevalue(RECIPE_FOLDERS[recipe])
    encoder = load_language_model(folder, recipe, dtype=torch.float32).to(device)
    features, mask = encode_for_bridge(recipe, encoder, encoder.tokenizer, PROMPTS)
    assert features.device.type == device.type and features.dtype == torch.float32
    expected, expected_mask = official_features(recipe, folder)
    torch.testing.assert_close(features.cpu(), expected, atol=1e-5, rtol=1e-4)
    assert (mask is None and expected_mask is None) or torch.equal(mask.cpu(), expected_mask)


@pytest.mark.device
@pytest.mark.parametrize("recipe", sorted(RECIPE_FOLDERS))
def test_every_recipe_in_float16_stays_close_to_official_float32(recipe, request, device):
    folder = request.getfixturevalue(RECIPE_FOLDERS[recipe])
    encoder = load_language_model(folder, recipe, dtype=ENCODER_HALF).to(device)
    features, _ = encode_for_bridge(recipe, encoder, encoder.tokenizer, PROMPTS)
    assert_close_in_half(features, official_features(recipe, folder)[0], ENCODER_HALF, recipe)


# ---- shared behaviour ----

def test_official_prompt_suffix_is_optional(tiny_t5):
    encoder = load_language_model(tiny_t5, "t5_unet")
    plain, _ = tokenize_for_bridge("t5_unet", encoder.tokenizer, ["city"])
    suffixed, _ = tokenize_for_bridge("t5_unet", encoder.tokenizer, ["city"], add_prompt_suffix=True)
    by_hand, _ = tokenize_for_bridge("t5_unet", encoder.tokenizer, ["city" + OFFICIAL_PROMPT_SUFFIX])
    assert OFFICIAL_PROMPT_SUFFIX == ", best quality, extremely detailed, 4k resolution"
    assert torch.equal(suffixed, by_hand) and not torch.equal(plain, suffixed)


def test_recipes_name_the_released_pairs():
    assert {r.value for r in LaViBridgeRecipe} == {"t5_unet", "llama2_unet", "t5_transformer"}
    assert text_config("t5_transformer").max_length == 120
    assert text_config("llama2_unet").adapter.in_dim == 4096
    with pytest.raises(ValueError, match="unknown LaVi-Bridge recipe 'sdxl'"):
        text_config("sdxl")


def test_wrong_model_family_is_refused(tiny_t5, tiny_llama):
    with pytest.raises(LaViBridgeFileError, match="needs Llama-2-7B"):
        load_language_model(tiny_t5, "llama2_unet")
    with pytest.raises(LaViBridgeFileError, match="needs t5-large"):
        load_language_model(tiny_llama, "t5_unet", dtype=torch.float32)


def test_one_family_from_a_recipe_a_config_or_a_folder(tiny_t5, tiny_llama, tmp_path):
    assert [family_of_recipe(r) for r in LaViBridgeRecipe] == ["t5", "llama", "t5"]
    assert (family_of_hf_folder(tiny_t5), family_of_hf_folder(tiny_llama)) == ("t5", "llama")
    for model_type, is_encoder_decoder in (("t5", True), ("mt5", False), ("umt5", True)):
        assert family_of_hf_config({"model_type": model_type, "is_encoder_decoder": is_encoder_decoder}, "x") == "t5"
    assert family_of_hf_config({"model_type": "mistral"}, "x") == "llama"
    with pytest.raises(LaViBridgeFileError, match="bart-base is a bart encoder-decoder; LaVi-Bridge bridges T5 encoders"):
        family_of_hf_config({"model_type": "bart", "is_encoder_decoder": True}, "bart-base")
    with pytest.raises(LaViBridgeFileError, match="has no config.json: give a Hugging Face model folder"):
        family_of_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LaViBridgeFileError, match="config.json is not readable JSON"):
        family_of_hf_folder(tmp_path)


def test_truncation_is_logged(tiny_t5, caplog):
    encoder = load_language_model(tiny_t5, "t5_unet")
    with caplog.at_level("WARNING"):
        tokenize_for_bridge("t5_unet", encoder.tokenizer, [LONG])
    assert "only the first 77 are used" in caplog.text
