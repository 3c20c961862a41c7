"""SDXL's text conditioning as a GlueNet target (training/sdxl_targets.py, target.kind = "sdxl").

The faithfulness test builds ComfyUI's own SDXL text path (comfy/sdxl_clip.py SDXLClipModel, its weights put
through comfy.supported_models.SDXL.process_clip_state_dict) from the same file and compares. The files have
SDXL's real widths (CLIP-L 768, bigG 1280) but a reduced depth and the small vocabulary of
make_clip_tokenizer, so ComfyUI's tokenizer cannot be used: both sides get the same token ids.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from support.training import (
    SMALL_CLIP_VOCAB,
    make_clip_text_folder,
    make_clip_tokenizer,
    write_sd1_checkpoint,
    write_sdxl_checkpoint,
)
from x2i.training.gluenet_sources import target_encode_fn
from x2i.training.sdxl_targets import SDXLTextTarget
from x2i.training.targets import (
    TargetError,
    TargetSettings,
    load_target_encoder,
    pack_target,
    peek_target_width,
    unpack_target,
)

# ComfyUI asserts abs(layer_idx) < num_layers: layer_idx -2 needs at least 3 layers.
LAYERS = 3
TEXTS = ["a red cat in a garden", "", "x" * 200]  # a caption, an empty one, one truncated to 77 tokens


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    tensors = write_sdxl_checkpoint(root / "sdxl_base.safetensors", layers=LAYERS)
    make_clip_tokenizer(root / "tokenizer")
    settings = TargetSettings(kind="sdxl", clip=str(root / "sdxl_base.safetensors"), tokenizer=str(root / "tokenizer"))
    return root, tensors, load_target_encoder(settings)


def comfy_ids(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """ComfyUI's padding, independently of the pack: SDTokenizer pads CLIP-L with the end token,
    SDXLClipGTokenizer (pad_with_end=False) bigG with 0."""
    ids = tokenizer(text, truncation=True, max_length=77)["input_ids"]
    return ids + [tokenizer.eos_token_id] * (77 - len(ids)), ids + [0] * (77 - len(ids))


@pytest.fixture(scope="module")
def comfy_sdxl_clip(sdxl):
    """ComfyUI's SDXLClipModel on the CPU in float32, the reduced depth and small vocabulary given through
    ComfyUI's own per-model config overrides, the file's weights converted by ComfyUI."""
    if not os.environ.get("COMFYUI_PATH"):
        pytest.skip("COMFYUI_PATH is not set: the faithfulness test needs a ComfyUI checkout (see README)")
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    import comfy.cli_args

    if "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = True  # must precede comfy.model_management
    import comfy.sdxl_clip
    import comfy.supported_models

    root, tensors, target = sdxl
    tokenizer = target.tokenizer
    depth_and_vocab = {"num_hidden_layers": LAYERS, "vocab_size": SMALL_CLIP_VOCAB,
                       "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    model = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float32, model_options={
        "clip_l_model_config": depth_and_vocab, "clip_g_model_config": depth_and_vocab})
    # SDXLClipModel's special tokens with the small vocabulary's start and end ids.
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert model.clip_l.special_tokens == {"start": 49406, "end": 49407, "pad": 49407}
    assert model.clip_g.special_tokens == {"start": 49406, "end": 49407, "pad": 0}
    model.clip_l.special_tokens = {"start": start, "end": end, "pad": end}
    model.clip_g.special_tokens = {"start": start, "end": end, "pad": 0}
    assert (model.clip_l.layer, model.clip_l.layer_idx, model.clip_l.layer_norm_hidden_state) == ("hidden", -2, False)
    assert (model.clip_g.layer, model.clip_g.layer_idx, model.clip_g.layer_norm_hidden_state) == ("hidden", -2, False)
    state = comfy.supported_models.SDXL(comfy.supported_models.SDXL.unet_config).process_clip_state_dict(dict(tensors))
    for key in [k for k in state if k.endswith("token_embedding.weight")]:
        # ComfyUI's CLIPEmbeddings always has 49408 rows; the ids used are below SMALL_CLIP_VOCAB.
        rows = model.state_dict()[key].shape[0]
        state[key] = torch.cat([state[key], state[key].new_zeros(rows - SMALL_CLIP_VOCAB, state[key].shape[1])])
    loaded = model.load_state_dict(state, strict=False)
    # SDXL files hold no CLIP-L projection (ComfyUI leaves it unused: the pooled vector is bigG's).
    assert set(loaded.missing_keys) == {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"}
    return model


@pytest.mark.comfy
def test_sdxl_target_is_comfyui_sdxl_conditioning(sdxl, comfy_sdxl_clip):
    _, _, target = sdxl
    assert isinstance(target, SDXLTextTarget)
    assert (target.hidden_size, target.pooled_dim, target.item_shape) == (2048, 1280, (78, 2048))
    tokens, pooled = target.encode(TEXTS)
    assert tokens.shape == (3, 77, 2048) and pooled.shape == (3, 1280) and tokens.dtype == torch.float32
    ids_l, ids_g = target.token_ids(TEXTS)
    for i, text in enumerate(TEXTS):
        comfy_l, comfy_g = comfy_ids(target.tokenizer, text)
        assert ids_l[i].tolist() == comfy_l and ids_g[i].tolist() == comfy_g
        with torch.no_grad():
            expected, expected_pooled = comfy_sdxl_clip.encode_token_weights(
                {"l": [[(t, 1.0) for t in comfy_l]], "g": [[(t, 1.0) for t in comfy_g]]})
        assert expected.shape == (1, 77, 2048) and expected_pooled.shape == (1, 1280)
        torch.testing.assert_close(tokens[i], expected[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(pooled[i], expected_pooled[0], atol=1e-5, rtol=0)


def test_pack_round_trip():
    tokens, pooled = torch.randn(2, 77, 2048), torch.randn(2, 1280)
    packed = pack_target(tokens, pooled)
    assert packed.shape == (2, 78, 2048)
    assert torch.equal(packed[:, 77, :1280], pooled) and not packed[:, 77, 1280:].any()
    out_tokens, out_pooled = unpack_target(packed, 1280)
    assert torch.equal(out_tokens, tokens) and torch.equal(out_pooled, pooled)
    one_tokens, one_pooled = unpack_target(packed[1], 1280)  # one cached item
    assert torch.equal(one_tokens, tokens[1]) and torch.equal(one_pooled, pooled[1])
    sd1 = torch.randn(3, 77, 768)
    assert pack_target(sd1, None) is sd1
    same, none = unpack_target(sd1, 0)
    assert same is sd1 and none is None
    with pytest.raises(TargetError, match="does not match target.kind"):
        unpack_target(packed, 0)
    with pytest.raises(TargetError, match="cannot pack"):
        pack_target(torch.randn(2, 77, 768), torch.randn(2, 1280))


def test_trainer_encode_fn_packs_sdxl_targets(sdxl):
    root, _, target = sdxl
    features, errors = target_encode_fn(target)(TEXTS)
    assert features.shape == (3, 78, 2048) and errors == [None, None, None]
    tokens, pooled = unpack_target(features, target.pooled_dim)
    expected_tokens, expected_pooled = target.encode(TEXTS)
    torch.testing.assert_close(tokens, expected_tokens, atol=0, rtol=0)
    torch.testing.assert_close(pooled, expected_pooled, atol=0, rtol=0)
    clip = str(root / "sdxl_base.safetensors")
    assert peek_target_width(TargetSettings(kind="sdxl", clip=clip)) == 768 + 1280
    assert peek_target_width(TargetSettings(kind="sd1", clip=clip)) is None  # the SD1 load says what the file is


def test_sdxl_ckpt_is_read_like_safetensors(tmp_path: Path):
    tensors = write_sdxl_checkpoint(tmp_path / "sdxl.safetensors", layers=1, seed=3)
    torch.save({"state_dict": {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}}, tmp_path / "sdxl.ckpt")
    make_clip_tokenizer(tmp_path / "tokenizer")
    outputs = []
    for name in ("sdxl.safetensors", "sdxl.ckpt"):
        target = load_target_encoder(TargetSettings(kind="sdxl", clip=str(tmp_path / name), tokenizer=str(tmp_path / "tokenizer")))
        outputs.append(target.encode(TEXTS[:1]))
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)


def test_sdxl_refusals(tmp_path: Path, sdxl):
    make_clip_tokenizer(tmp_path / "tokenizer")

    def load(kind: str, name: str):
        return load_target_encoder(TargetSettings(kind=kind, clip=str(tmp_path / name), tokenizer=str(tmp_path / "tokenizer")))

    write_sdxl_checkpoint(tmp_path / "refiner.safetensors", refiner=True)
    with pytest.raises(TargetError, match=r"refiner\.safetensors is an SDXL refiner checkpoint .*conditioning is "
                       r"1280-wide bigG only.*Use an SDXL base checkpoint"):
        load("sdxl", "refiner.safetensors")
    write_sdxl_checkpoint(tmp_path / "clip_l_only.safetensors", without_open_clip=True)
    with pytest.raises(TargetError, match=r"has SDXL's CLIP ViT-L but not its OpenCLIP ViT-bigG \(no "
                       r"'conditioner\.embedders\.1\.model\.\*' keys\).*Use a complete SDXL base checkpoint"):
        load("sdxl", "clip_l_only.safetensors")
    base = str(sdxl[0] / "sdxl_base.safetensors")
    with pytest.raises(TargetError, match=r"sdxl_base\.safetensors has no SD1\.x text encoder .*It looks like SDXL "
                       r"\(two text encoders\): set target\.kind = \"sdxl\""):
        load_target_encoder(TargetSettings(kind="sd1", clip=base, tokenizer=str(tmp_path / "tokenizer")))
    write_sd1_checkpoint(tmp_path / "sd15.safetensors")
    with pytest.raises(TargetError, match=r"sd15\.safetensors is an SD1\.x checkpoint .*target\.kind = \"sdxl\": SDXL "
                       r"targets come from an SDXL single file.*set target\.kind = \"sd1\""):
        load("sdxl", "sd15.safetensors")
    make_clip_text_folder(tmp_path / "clip-folder")
    with pytest.raises(TargetError, match=r"target\.clip is a folder \(clip-folder\): SDXL targets come from an SDXL "
                       r"single file"):
        load("sdxl", "clip-folder")
    # The width check before any load stays silent on what the load refuses, rather than misreporting a width.
    for name in ("clip-folder", "clip_l_only.safetensors", "refiner.safetensors"):
        assert peek_target_width(TargetSettings(kind="sdxl", clip=str(tmp_path / name))) is None
