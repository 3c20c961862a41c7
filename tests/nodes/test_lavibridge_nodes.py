"""LaVi-Bridge nodes inside ComfyUI: the U-Net LoRA becomes patches whose merged weights are exactly
W + s * up @ down on ComfyUI's own SD1.5 MODEL, the text LoRA lands on the language model, and the
conditioning equals the official path (features -> adapter)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import T5EncoderModel

from support.lora_patches import (
    assert_lora_merged,
    assert_state_equal,
    identity_weight_map,
    official_pixart_names,
    official_sd1_names,
    official_text_names,
    pixart_weight_map,
    sd1_weight_map,
    snapshot,
)
from support.models import write_lavibridge_folder
from support.sd15_unet import SD15_UNET, seeded_weight
from x2i.bridge import LaViBridgeRecipe, encode_for_bridge, load_adapter, read_lora_pairs, unet_lora_targets


@pytest.fixture(scope="module")
def sd15_model(comfy):
    import comfy.model_detection
    import comfy.model_patcher

    model = comfy.model_detection.model_config_from_unet_config(SD15_UNET).get_model({})
    with torch.no_grad():  # ComfyUI's constructors skip initialisation
        for name, p in model.named_parameters():
            p.copy_(seeded_weight(name, p.shape))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@pytest.fixture(scope="module")
def bridge_files(comfy, tiny_t5):
    import folder_paths

    models = comfy["models"]
    (models / "lavi_bridge").mkdir(exist_ok=True)
    folder_paths.folder_names_and_paths["lavi_bridge"] = ([str(models / "lavi_bridge")], set())
    shutil.copytree(tiny_t5, models / "text_encoders" / "t5-large", dirs_exist_ok=True)
    t5 = T5EncoderModel.from_pretrained(tiny_t5)
    return write_lavibridge_folder(models / "lavi_bridge" / "t5_unet", t5, "t5", adapter_in=t5.config.d_model)


def assert_bridge_merges_exactly_and_unloads(model, lm, bridged, bridge, vision: dict, unet_strength: float, text: dict,
                                             text_strength: float, weight_map) -> None:
    """Loaded, every vision LoRA target of ``bridged`` (``vision``: official module name -> (up, down), in the
    official order) is W + unet_strength * up @ down against the full tensor, every other tensor of the
    diffusion model unchanged, and the same for the language model's text LoRA; unloaded, both whole
    state dicts are the originals again, bit for bit."""
    import comfy.model_management as mm

    unet_before, lm_before = snapshot(model.model.diffusion_model.state_dict()), snapshot(lm.model.state_dict())
    mm.load_models_gpu([bridged, bridge.language_model])
    try:
        assert_lora_merged(unet_before, bridged.model.diffusion_model.state_dict(), list(vision), list(vision.values()),
                           unet_strength, weight_map)
        assert_lora_merged(lm_before, bridge.language_model.model.state_dict(), list(text), list(text.values()), text_strength,
                           identity_weight_map(list(text), prefix="transformer."))
    finally:  # a failure leaves no patched model behind for the next test
        mm.unload_all_models()
    assert_state_equal(model.model.diffusion_model.state_dict(), unet_before, "the U-Net after unloading")
    assert_state_equal(lm.model.state_dict(), lm_before, "the language model after unloading")


def test_unet_lora_patches_merge_exactly_and_stack(pack, sd15_model, bridge_files):
    lm = pack.X2ILanguageModelLoader.execute("t5-large", "fp32").result[0]
    assert "t5_unet" in pack.X2ILaViBridgeLoader.define_schema().inputs[2].options
    bridged, bridge = pack.X2ILaViBridgeLoader.execute(sd15_model, lm, "t5_unet", 0.7, 0.5).result
    assert bridged is not sd15_model and len(bridged.patches) == 224
    names, text_names = official_sd1_names(), official_text_names(lm.model.transformer, "t5")
    vision = dict(zip(names, read_lora_pairs(bridge_files / "lora_vis.pt"), strict=True))  # the release's positional order
    text = dict(zip(text_names, read_lora_pairs(bridge_files / "lora_text.pt"), strict=True))
    assert_bridge_merges_exactly_and_unloads(sd15_model, lm, bridged, bridge, vision, 0.7, text, 0.5,
                                             sd1_weight_map(sd15_model.model.model_config.unet_config))


def test_text_encode_is_the_official_path_through_the_bridged_language_model(pack, sd15_model, bridge_files):
    lm = pack.X2ILanguageModelLoader.execute("t5-large", "fp32").result[0]
    _, bridge = pack.X2ILaViBridgeLoader.execute(sd15_model, lm, "t5_unet", 1.0, 1.0).result
    (conditioning,) = pack.X2ILaViBridgeTextEncode.execute(bridge, "a red cube on a blue sphere", False).result
    tokens = conditioning[0][0]
    assert tokens.shape == (1, 77, 768)
    # The same with the text LoRA off must differ: the language-model LoRA is really applied.
    _, plain = pack.X2ILaViBridgeLoader.execute(sd15_model, lm, "t5_unet", 1.0, 0.0).result
    (unpatched,) = pack.X2ILaViBridgeTextEncode.execute(plain, "a red cube on a blue sphere", False).result
    assert not torch.allclose(tokens, unpatched[0][0], atol=1e-6)
    # Reference: official features of the unpatched model, then the adapter.
    adapter = load_adapter(bridge_files / "adapter")
    features, _ = encode_for_bridge(LaViBridgeRecipe.T5_UNET, lm.model, lm.model.tokenizer, ["a red cube on a blue sphere"])
    with torch.no_grad():
        torch.testing.assert_close(unpatched[0][0], adapter(features.cpu()), atol=1e-5, rtol=1e-5)


def test_a_bridge_on_the_wrong_model_is_refused(pack, comfy, bridge_files, tiny_xlmr):
    import comfy.model_detection
    import comfy.model_patcher

    lm = pack.X2ILanguageModelLoader.execute("t5-large", "fp32").result[0]
    sd2 = dict(SD15_UNET, context_dim=1024, num_head_channels=64, use_linear_in_transformer=True)
    sd2.pop("num_heads")
    model = comfy.model_detection.model_config_from_unet_config(sd2)
    assert model is not None
    patcher = comfy.model_patcher.ModelPatcher(model.get_model({}), load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="for SD1.x U-Nets .* context width 1024"):
        pack.X2ILaViBridgeLoader.execute(patcher, lm, "t5_unet", 1.0, 1.0)


def test_missing_bridge_files_fail_validation(pack, bridge_files):
    assert pack.X2ILaViBridgeLoader.validate_inputs(bridge_name="t5_unet", unet_strength=1.0, text_strength=1.0) is True
    assert "not found in models/lavi_bridge" in pack.X2ILaViBridgeLoader.validate_inputs(bridge_name="llama2_unet", unet_strength=1.0, text_strength=1.0)
    (bridge_files / "lora_text.pt").rename(bridge_files / "lora_text.bak")
    try:
        assert pack.X2ILaViBridgeLoader.validate_inputs(bridge_name="t5_unet", unet_strength=1.0, text_strength=1.0) == "t5_unet lacks lora_text.pt: copy the whole released folder"
    finally:
        (bridge_files / "lora_text.bak").rename(bridge_files / "lora_text.pt")


def test_llama_bridge_patches_every_attention_projection(pack, comfy, sd15_model, tmp_path_factory):
    import comfy.model_management as mm
    from transformers import AutoModel

    from support.models import make_llama_folder

    models = comfy["models"]
    llama = make_llama_folder(models / "text_encoders" / "llama-2-7b-tiny")
    write_lavibridge_folder(models / "lavi_bridge" / "llama2_unet", AutoModel.from_pretrained(llama), "llama", adapter_in=32, seed=4)
    lm = pack.X2ILanguageModelLoader.execute("llama-2-7b-tiny", "fp32").result[0]
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    _, bridge = pack.X2ILaViBridgeLoader.execute(sd15_model, lm, "llama2_unet", 1.0, 1.0).result
    assert bridge.recipe == LaViBridgeRecipe.LLAMA2_UNET
    text_keys = [k for k in bridge.language_model.patches if ".self_attn." in k]
    assert len(text_keys) == len(bridge.language_model.patches) == 4 * lm.model.transformer.config.num_hidden_layers
    (conditioning,) = pack.X2ILaViBridgeTextEncode.execute(bridge, "a cat", False).result
    assert conditioning[0][0].shape == (1, 77, 768) and torch.isfinite(conditioning[0][0]).all()
    mm.load_models_gpu([bridge.language_model])
    changed = [k for k in text_keys if not torch.equal(bridge.language_model.model.state_dict()[k].cpu(), before[k].cpu())]
    assert changed == text_keys
    mm.unload_all_models()


PIXART_ALPHA = {
    "image_model": "pixart_alpha", "num_heads": 16, "patch_size": 2, "hidden_size": 1152, "in_channels": 4,
    "depth": 28, "model_max_length": 120, "input_size": 64, "pe_interpolation": 1, "micro_condition": True,
}


@pytest.fixture(scope="module")
def pixart_model(comfy):
    import comfy.model_detection
    import comfy.model_patcher

    model = comfy.model_detection.model_config_from_unet_config(PIXART_ALPHA).get_model({})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def test_pixart_bridge_lands_on_fused_qkv_and_drops_padding(pack, comfy, pixart_model, sd15_model, bridge_files, tiny_t5):
    t5 = T5EncoderModel.from_pretrained(tiny_t5)
    folder = write_lavibridge_folder(comfy["models"] / "lavi_bridge" / "t5_transformer", t5, "t5", adapter_in=t5.config.d_model,
                                     seed=7, pixart=True)
    lm = pack.X2ILanguageModelLoader.execute("t5-large", "fp32").result[0]
    bridged, bridge = pack.X2ILaViBridgeLoader.execute(pixart_model, lm, "t5_transformer", 0.5, 0.8).result
    # 8 LoRA layers per block land on 5 ComfyUI weights: q, k, v share the fused qkv, k and v the fused kv.
    assert len(bridged.patches) == 5 * 28
    assert len(bridged.patches["diffusion_model.blocks.0.attn.qkv.weight"]) == 3
    assert len(bridged.patches["diffusion_model.blocks.0.cross_attn.kv_linear.weight"]) == 2
    vision = dict(zip(official_pixart_names(28), read_lora_pairs(folder / "lora_vis.pt"), strict=True))
    text = dict(zip(official_text_names(lm.model.transformer, "t5"), read_lora_pairs(folder / "lora_text.pt"), strict=True))
    # Each of q / k / v (k / v) checked as its own row block of the fused weight, against its own pair.
    assert_bridge_merges_exactly_and_unloads(pixart_model, lm, bridged, bridge, vision, 0.5, text, 0.8, pixart_weight_map(PIXART_ALPHA))
    (conditioning,) = pack.X2ILaViBridgeTextEncode.execute(bridge, "a cat", False).result
    tokens = conditioning[0][0]
    tokenized = encode_for_bridge(LaViBridgeRecipe.T5_TRANSFORMER, lm.model, lm.model.tokenizer, ["a cat"])[1]
    assert tokens.shape == (1, int(tokenized.sum()), 4096)  # only the prompt's tokens, as masked attention sees them
    with pytest.raises(ValueError, match="t5_transformer bridges T5 to PixArt-XL-2, but the connected MODEL is"):
        pack.X2ILaViBridgeLoader.execute(sd15_model, lm, "t5_transformer", 1.0, 1.0)
    with pytest.raises(ValueError, match="t5_unet is for SD1.x U-Nets"):
        pack.X2ILaViBridgeLoader.execute(pixart_model, lm, "t5_unet", 1.0, 1.0)


def test_released_pixart_512_layout_loads_bridges_and_gets_its_sd_latent_scale(pack, comfy, bridge_files, tiny_t5, tmp_path):
    # PixArt-XL-2-512x512 (the model t5_transformer was trained on) as "Load Diffusion Model" reads it;
    # ComfyUI counts its blocks from the keys, and takes it for PixArt-Σ (no micro-condition embedder).
    import comfy.model_management as mm
    from comfy import latent_formats, sd

    from support.models import write_pixart_checkpoint, write_pixart_lora_vis

    model = sd.load_diffusion_model(str(write_pixart_checkpoint(tmp_path / "PixArt-XL-2-512x512.safetensors", depth=2)))
    config = model.model.model_config.unet_config
    assert (config["image_model"], config["depth"], config["model_max_length"], config["input_size"]) == ("pixart_sigma", 2, 120, 64)
    assert isinstance(model.get_model_object("latent_format"), latent_formats.SDXL)
    t5 = T5EncoderModel.from_pretrained(tiny_t5)
    folder = write_lavibridge_folder(comfy["models"] / "lavi_bridge" / "t5_transformer", t5, "t5", adapter_in=t5.config.d_model,
                                     seed=7, pixart=True)
    lm = pack.X2ILanguageModelLoader.execute("t5-large", "fp32").result[0]
    with pytest.raises(ValueError, match="lora_vis.pt"):  # 28 blocks of LoRA for a 2-block model
        pack.X2ILaViBridgeLoader.execute(model, lm, "t5_transformer", 1.0, 1.0)
    write_pixart_lora_vis(folder, depth=2, seed=7)
    try:
        bridged, _ = pack.X2ILaViBridgeLoader.execute(model, lm, "t5_transformer", 1.0, 1.0).result
    finally:
        write_lavibridge_folder(folder, t5, "t5", adapter_in=t5.config.d_model, seed=7, pixart=True)
    assert len(bridged.patches) == 5 * 2
    assert isinstance(bridged.get_model_object("latent_format"), latent_formats.SD15)
    assert isinstance(model.get_model_object("latent_format"), latent_formats.SDXL)  # the input MODEL is untouched
    mm.load_models_gpu([bridged])  # what KSampler's process_latent_in then sees
    assert isinstance(bridged.model.latent_format, latent_formats.SD15)
    mm.unload_all_models()
    assert isinstance(model.model.latent_format, latent_formats.SDXL)


# ---------------------------------------------------------------------------------------------------
# Trained bridges: this pack's .safetensors bridge file (bridge/trained.py), next to the released folders


def _random_lora(targets, rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {t.name: tuple(torch.randn(shape, generator=g) * 0.02 for shape in t.pair_shapes(rank)) for t in targets}


@pytest.fixture(scope="module")
def trained_files(comfy, bridge_files, tiny_t5, small_text_gluenet_ckpt):
    """Bridge files as the trainer exports them (diffusers / transformers module names in the official
    order, rank 8, fp16 LoRA, fp32 adapter), a GlueNet and a broken file in models/lavi_bridge."""
    from x2i.bridge import TextAdapter, TextAdapterConfig, pixart_lora_targets, save_trained_bridge, text_lora_targets
    from x2i.gluenet.convert import convert

    folder = comfy["models"] / "lavi_bridge"
    t5 = T5EncoderModel.from_pretrained(tiny_t5)
    text = _random_lora(text_lora_targets(t5, "t5"), 8, seed=11)
    torch.manual_seed(12)
    sd1 = {"recipe": "t5_unet", "diffusion_model": "sd1", "adapter": TextAdapter(TextAdapterConfig(t5.config.d_model, 64, 768)),
           "vision_lora": _random_lora(unet_lora_targets(), 8, seed=13), "context_dim": 768, "language_model": "t5-tiny"}
    files = {
        "sd1": save_trained_bridge(folder / "t5_sd15_trained.safetensors", text_lora=text, **sd1),
        "vision_only": save_trained_bridge(folder / "t5_sd15_vision_only.safetensors", text_lora={}, **sd1),
        "pixart": save_trained_bridge(
            folder / "t5_pixart_trained.safetensors", recipe="t5_transformer", diffusion_model="pixart",
            adapter=TextAdapter(TextAdapterConfig(t5.config.d_model, 64, 4096)), vision_lora=_random_lora(pixart_lora_targets(), 8, seed=14),
            text_lora=text, context_dim=4096,
        ),
        "gluenet": folder / "gluenet_fr.safetensors",
        "broken": folder / "broken.safetensors",
    }
    convert(small_text_gluenet_ckpt, files["gluenet"])
    files["broken"].write_bytes(b"not a safetensors file")
    return files


def test_trained_bridge_files_are_listed_next_to_released_folders(pack, sd15_model, trained_files):
    from x2i.bridge import LaViBridgeFileError

    loader = pack.X2ILaViBridgeLoader
    options = loader.define_schema().inputs[2].options
    assert {"t5_unet", "t5_sd15_trained.safetensors", "t5_sd15_vision_only.safetensors", "t5_pixart_trained.safetensors"} <= set(options)
    assert "gluenet_fr.safetensors" not in options and "broken.safetensors" not in options
    for name in ("t5_sd15_trained.safetensors", "t5_pixart_trained.safetensors", "t5_unet"):
        assert loader.validate_inputs(bridge_name=name, unet_strength=1.0, text_strength=1.0) is True
    message = loader.validate_inputs(bridge_name="gluenet_fr.safetensors", unet_strength=1.0, text_strength=1.0)
    assert "not a LaVi-Bridge file of this pack" in message and "X2I GlueNet Loader" in message
    assert "not a readable safetensors file" in loader.validate_inputs(bridge_name="broken.safetensors", unet_strength=1.0, text_strength=1.0)
    assert "not found in models/lavi_bridge" in loader.validate_inputs(bridge_name="missing.safetensors", unet_strength=1.0, text_strength=1.0)
    lm = pack.X2ILanguageModelLoader.execute("t5-large", "fp32").result[0]
    with pytest.raises(LaViBridgeFileError, match="looks like a GlueNet of this pack"):  # a graph sent past validation
        loader.execute(sd15_model, lm, "gluenet_fr.safetensors", 1.0, 1.0)


def test_trained_sd1_bridge_patches_merge_exactly_and_conditioning_is_the_trained_path(pack, comfy, sd15_model, trained_files):
    import comfy.model_management as mm

    from x2i.bridge import load_trained_bridge, map_lora_pairs, merged_state, text_lora_targets

    lm = pack.X2ILanguageModelLoader.execute("t5-large", "fp32").result[0]
    bridged, bridge = pack.X2ILaViBridgeLoader.execute(sd15_model, lm, "t5_sd15_trained.safetensors", 0.7, 1.0).result
    assert bridged is not sd15_model and len(bridged.patches) == 224 and bridge.recipe == LaViBridgeRecipe.T5_UNET
    trained = load_trained_bridge(trained_files["sd1"])
    names, text_names = official_sd1_names(), official_text_names(lm.model.transformer, "t5")
    assert list(trained.vision_lora) == names and list(trained.text_lora) == text_names  # the file's order is the official one
    assert_bridge_merges_exactly_and_unloads(sd15_model, lm, bridged, bridge, trained.vision_lora, 0.7, trained.text_lora, 1.0,
                                             sd1_weight_map(sd15_model.model.model_config.unet_config))

    prompt = "a red cube on a blue sphere"
    assert len(bridge.language_model.patches) == len(trained.text_lora)
    (conditioning,) = pack.X2ILaViBridgeTextEncode.execute(bridge, prompt, False).result
    tokens = conditioning[0][0]
    assert tokens.shape == (1, 77, 768)
    _, plain = pack.X2ILaViBridgeLoader.execute(sd15_model, lm, "t5_sd15_trained.safetensors", 0.7, 0.0).result
    (unpatched,) = pack.X2ILaViBridgeTextEncode.execute(plain, prompt, False).result
    assert (tokens - unpatched[0][0]).abs().max() > 1e-3  # the text LoRA is really applied
    mm.unload_all_models()
    # Reference: a fresh T5 with the file's text LoRA merged (W + up @ down), official features, the file's adapter.
    t5 = T5EncoderModel.from_pretrained(comfy["models"] / "text_encoders" / "t5-large")
    text = map_lora_pairs(trained.text_pairs(), text_lora_targets(t5, "t5"))
    t5.load_state_dict(merged_state(t5.state_dict(), text), strict=False)
    features, _ = encode_for_bridge(LaViBridgeRecipe.T5_UNET, t5, lm.model.tokenizer, [prompt])
    with torch.no_grad():
        torch.testing.assert_close(tokens, trained.adapter(features), atol=1e-5, rtol=1e-5)


def test_trained_bridge_without_text_lora_leaves_the_language_model_alone(pack, sd15_model, trained_files):
    from x2i.bridge import load_trained_bridge

    lm = pack.X2ILanguageModelLoader.execute("t5-large", "fp32").result[0]
    bridged, bridge = pack.X2ILaViBridgeLoader.execute(sd15_model, lm, "t5_sd15_vision_only.safetensors", 1.0, 1.0).result
    assert len(bridged.patches) == 224
    assert bridge.language_model is lm and not lm.patches
    (conditioning,) = pack.X2ILaViBridgeTextEncode.execute(bridge, "a cat", False).result
    features, _ = encode_for_bridge(LaViBridgeRecipe.T5_UNET, lm.model, lm.model.tokenizer, ["a cat"])
    with torch.no_grad():
        torch.testing.assert_close(conditioning[0][0], load_trained_bridge(trained_files["vision_only"]).adapter(features.cpu()),
                                   atol=1e-5, rtol=1e-5)


def test_trained_bridge_for_another_diffusion_model_is_refused(pack, sd15_model, pixart_model, trained_files):

    from x2i.bridge import LaViBridgeFileError, load_trained_bridge

    lm = pack.X2ILanguageModelLoader.execute("t5-large", "fp32").result[0]
    with pytest.raises(LaViBridgeFileError, match=r"t5_pixart_trained.safetensors is a LaVi-Bridge trained for PixArt-XL-2 "
                       r"\(diffusion_model 'pixart'.*connected MODEL is an SD1.x U-Net"):
        pack.X2ILaViBridgeLoader.execute(sd15_model, lm, "t5_pixart_trained.safetensors", 1.0, 1.0)
    with pytest.raises(LaViBridgeFileError, match=r"trained for an SD1.x U-Net .*diffusion_model 'sd1'.*connected MODEL is PixArt-XL-2"):
        pack.X2ILaViBridgeLoader.execute(pixart_model, lm, "t5_sd15_trained.safetensors", 1.0, 1.0)
    # On PixArt the same file lands on ComfyUI's fused qkv / kv weights, each of q, k, v on its own rows.
    bridged, bridge = pack.X2ILaViBridgeLoader.execute(pixart_model, lm, "t5_pixart_trained.safetensors", 0.5, 1.0).result
    assert len(bridged.patches) == 5 * 28 and bridge.recipe == LaViBridgeRecipe.T5_TRANSFORMER
    trained = load_trained_bridge(trained_files["pixart"])
    assert list(trained.vision_lora) == official_pixart_names(28)
    assert_bridge_merges_exactly_and_unloads(pixart_model, lm, bridged, bridge, trained.vision_lora, 0.5, trained.text_lora, 1.0,
                                             pixart_weight_map(PIXART_ALPHA))
