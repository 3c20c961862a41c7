"""LaVi-Bridges for SDXL in the nodes: the U-Net LoRA's layers come from the connected MODEL's own U-Net as ComfyUI
detected it (UNetStructure.from_comfy_config, mapped to ComfyUI's weights by comfy.utils.unet_to_diffusers), every
merged weight is W + s * up @ down as the layer's forward sees it and unloading restores it; Text Encode gives SDXL
CONDITIONING (the adapter's 77 x 2048 tokens, its pooled head's 1280-wide vector, CLIPTextEncodeSDXL's size keys, the
family hook) that KSampler's sampling runs on the bridged SDXL model; a bridge or its conditioning on a model of the
other family is refused naming both."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import T5EncoderModel

from support.comfy_sampling import narrow_model, sample_latent
from support.lora_patches import (
    as_forward_sees,
    assert_lora_merged,
    assert_state_equal,
    identity_weight_map,
    snapshot,
    unet_weight_map,
)
from support.models import write_lavibridge_folder
from x2i.bridge import (
    LaViBridgeFileError,
    LaViBridgeRecipe,
    TextAdapter,
    TextAdapterConfig,
    UNetStructure,
    encode_for_bridge,
    load_trained_bridge,
    map_lora_pairs,
    merged_state,
    save_trained_bridge,
    text_lora_targets,
    unet_lora_targets,
)
from x2i.bridge.lora import SD1_UNET, SDXL_UNET
from x2i.families import SD1, SDXL, SDXL_SIZE_CONDITIONING

pytestmark = pytest.mark.usefixtures("one_thread")

RANK = 4
SDXL_BRIDGE = "t5_sdxl_trained.safetensors"
SD1_BRIDGE = "t5_sd1_narrow_trained.safetensors"
ODD_POOLED_BRIDGE = "t5_sdxl_pooled640.safetensors"
PROMPT = "a red cube on a blue sphere"


def _random_lora(targets, rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {t.name: tuple(torch.randn(shape, generator=g) * 0.02 for shape in t.pair_shapes(rank)) for t in targets}


@pytest.fixture(scope="module")
def sdxl_unet(comfy):
    return narrow_model("sdxl")


@pytest.fixture(scope="module")
def sd1_unet(comfy):
    return narrow_model("sd1", seed=1)


@pytest.fixture(scope="module")
def bridges(comfy, tiny_t5, sdxl_unet, sd1_unet):
    """Trained bridges as the trainer exports them (rank-4 fp16 LoRA for every target of the narrow U-Net's own
    structure and of the tiny T5, fp32 adapter): for SDXL (pooled head 1280), for SD1.x, and one for SDXL whose
    pooled head is 640 wide; the released t5_unet folder, in models/lavi_bridge."""
    import folder_paths

    models = comfy["models"]
    folder = models / "lavi_bridge"
    folder.mkdir(exist_ok=True)
    folder_paths.folder_names_and_paths["lavi_bridge"] = ([str(folder)], set())
    shutil.copytree(tiny_t5, models / "text_encoders" / "t5-large", dirs_exist_ok=True)
    t5 = T5EncoderModel.from_pretrained(tiny_t5)
    width = t5.config.d_model
    text = _random_lora(text_lora_targets(t5, "t5"), RANK, seed=21)
    sdxl_targets = unet_lora_targets(UNetStructure.from_comfy_config(sdxl_unet.model.model_config.unet_config))
    sd1_targets = unet_lora_targets(UNetStructure.from_comfy_config(sd1_unet.model.model_config.unet_config))
    torch.manual_seed(22)
    sdxl = {"recipe": "t5_unet", "diffusion_model": "sdxl", "vision_lora": _random_lora(sdxl_targets, RANK, seed=23),
            "text_lora": text, "context_dim": 2048, "language_model": "t5-tiny"}
    files = {
        "sdxl": save_trained_bridge(folder / SDXL_BRIDGE, adapter=TextAdapter(TextAdapterConfig(width, 64, 2048, pooled_dim=1280)), **sdxl),
        "odd_pooled": save_trained_bridge(folder / ODD_POOLED_BRIDGE, adapter=TextAdapter(TextAdapterConfig(width, 64, 2048, pooled_dim=640)),
                                          **sdxl),
        "sd1": save_trained_bridge(
            folder / SD1_BRIDGE, recipe="t5_unet", diffusion_model="sd1", adapter=TextAdapter(TextAdapterConfig(width, 64, 768)),
            vision_lora=_random_lora(sd1_targets, RANK, seed=24), text_lora=text, context_dim=768, language_model="t5-tiny",
        ),
    }
    if not (folder / "t5_unet").is_dir():  # what test_lavibridge_nodes.py writes, the same call: identical files
        write_lavibridge_folder(folder / "t5_unet", t5, "t5", adapter_in=width)
    return files


@pytest.fixture(scope="module")
def language_model(pack, bridges):
    return pack.X2ILanguageModelLoader.execute("t5-large", "fp32").result[0]


def encode(pack, bridge, text: str) -> list:
    return pack.X2ILaViBridgeTextEncode.execute(bridge, text, False).result[0]


# ---- UNetStructure.from_comfy_config against ComfyUI's own model detection ----


def _diffusers_detected(config: dict) -> dict:
    """ComfyUI's unet_config for diffusers' U-Net of ``config`` (built on the meta device), by its own detection."""
    import comfy.model_detection
    import diffusers

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**config)
    detected = comfy.model_detection.unet_config_from_diffusers_unet(unet.state_dict())
    assert detected is not None
    return detected


def _keys_detected(levels: list[list[int]], channels: int = 320, context: int = 2048, adm: int = 2816) -> dict:
    """ComfyUI's unet_config for the SDXL-family U-Net whose down blocks have these transformer depths (one per
    resnet): its own detection of diffusers keys, given only the keys and shapes it reads (meta tensors)."""
    import comfy.model_detection

    state = {"conv_in.weight": torch.empty(channels, 4, 3, 3, device="meta"),
             "add_embedding.linear_1.weight": torch.empty(4 * channels, adm, device="meta")}
    for i, level in enumerate(levels):
        for j, depth in enumerate(level):
            state[f"down_blocks.{i}.resnets.{j}.conv1.weight"] = torch.empty(1, device="meta")
            for t in range(depth):
                state[f"down_blocks.{i}.attentions.{j}.transformer_blocks.{t}.attn2.to_k.weight"] = torch.empty(
                    channels * 2**i, context, device="meta")
    detected = comfy.model_detection.unet_config_from_diffusers_unet(state)
    assert detected is not None, levels
    return detected


def test_from_comfy_config_of_comfyuis_sd15_and_sdxl_detection_is_their_diffusers_structure(comfy):
    from x2i.training.diffusion_models import SD1_UNET_CONFIG, SDXL_UNET_CONFIG

    sd15 = UNetStructure.from_comfy_config(_diffusers_detected(SD1_UNET_CONFIG))
    sdxl = UNetStructure.from_comfy_config(_diffusers_detected(SDXL_UNET_CONFIG))
    assert sd15 == SD1_UNET and unet_lora_targets(sd15) == unet_lora_targets(SD1_UNET)
    assert sdxl == SDXL_UNET and unet_lora_targets(sdxl) == unet_lora_targets(SDXL_UNET)


LORA_LEAVES = r"\.(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.0\.proj|in_layers\.2|emb_layers\.1|out_layers\.3|skip_connection)\.weight$"


@pytest.mark.parametrize("name, levels, count", [
    ("SDXL", [[0, 0], [2, 2], [10, 10]], 692),
    ("SSD_1B", [[0, 0], [2, 2], [4, 4]], 365),  # up depths (4, 4, 10), (2, 1, 1); a middle block of one resnet
    ("Segmind_Vega", [[0, 0], [1, 1], [2, 2]], 194),  # a middle block of one resnet
    ("KOALA_700M", [[0], [2], [5]], 224),  # one resnet per block, no middle block
])
def test_from_comfy_config_targets_are_every_lora_layer_of_comfyuis_sdxl_family_unets(comfy, name, levels, count):
    """On ComfyUI's own U-Net of each detected config (meta device), every target lands through
    comfy.utils.unet_to_diffusers on a weight of the target's shape, and every layer the official rule patches
    (attention q/k/v/out, GEGLU proj, resnet convs, time projection, shortcut) is a target exactly once."""
    import re

    import comfy.ops
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = _keys_detected(levels)
    with torch.device("meta"):
        unet = UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)
    shapes = {key: tuple(value.shape) for key, value in unet.state_dict().items()}
    to_comfy = comfy.utils.unet_to_diffusers(config)
    targets = unet_lora_targets(UNetStructure.from_comfy_config(config))
    landed = [to_comfy[f"{target.name}.weight"] for target in targets]
    wrong = [(t.name, key, shapes.get(key), t.weight_shape) for t, key in zip(targets, landed, strict=True) if shapes.get(key) != t.weight_shape]
    assert not wrong, f"{name}: {len(wrong)} targets miss their weight, e.g. {wrong[:3]}"
    assert len(targets) == count and len(set(landed)) == count
    assert sorted(landed) == sorted(key for key in shapes if re.search(LORA_LEAVES, key))


def test_from_comfy_config_refuses_what_it_cannot_describe():
    with pytest.raises(LaViBridgeFileError, match="has no transformer_depth, .*not an SD-style U-Net"):
        UNetStructure.from_comfy_config({"model_channels": 320, "channel_mult": [1, 2], "num_res_blocks": [2, 2],
                                         "context_dim": 768, "transformer_depth_middle": 1})
    with pytest.raises(LaViBridgeFileError, match=r"num_res_blocks \[2, 1\] for 2 levels"):
        UNetStructure.from_comfy_config({"model_channels": 320, "channel_mult": [1, 2], "num_res_blocks": [2, 1],
                                         "transformer_depth": [1, 1, 1], "transformer_depth_output": [1] * 5,
                                         "transformer_depth_middle": 1, "context_dim": 768})


# ---- The loader on an SDXL MODEL ----


def test_sdxl_bridge_patches_merge_exactly_as_the_forward_sees_them_and_unloading_restores(pack, comfy, sdxl_unet, bridges,
                                                                                          language_model):
    mm = comfy["mm"]
    lm = language_model
    bridged, bridge = pack.X2ILaViBridgeLoader.execute(sdxl_unet, lm, SDXL_BRIDGE, 0.7, 0.5).result
    trained = load_trained_bridge(bridges["sdxl"])
    assert bridged is not sdxl_unet and len(bridged.patches) == len(trained.vision_lora)
    assert bridge.family is SDXL and bridge.recipe == LaViBridgeRecipe.T5_UNET
    assert len(bridge.language_model.patches) == len(trained.text_lora)
    unet_config = sdxl_unet.model.model_config.unet_config
    unet_before, lm_before = snapshot(sdxl_unet.model.diffusion_model.state_dict()), snapshot(lm.model.state_dict())
    mm.load_models_gpu([bridged, bridge.language_model])
    try:
        assert_lora_merged(unet_before, as_forward_sees(bridged), list(trained.vision_lora), list(trained.vision_lora.values()),
                           0.7, unet_weight_map(unet_config))
        assert_lora_merged(lm_before, bridge.language_model.model.state_dict(), list(trained.text_lora),
                           list(trained.text_lora.values()), 0.5, identity_weight_map(list(trained.text_lora), prefix="transformer."))
    finally:  # a failure leaves no patched model behind for the next test
        mm.unload_all_models()
    assert_state_equal(sdxl_unet.model.diffusion_model.state_dict(), unet_before, "the SDXL U-Net after unloading")
    assert_state_equal(as_forward_sees(sdxl_unet), unet_before, "the SDXL U-Net's layers after unloading")
    assert_state_equal(lm.model.state_dict(), lm_before, "the language model after unloading")


def test_text_encode_gives_sdxl_conditioning_from_the_adapter_and_its_pooled_head(pack, comfy, sdxl_unet, bridges,
                                                                                  language_model):
    from x2i.nodes.common import FAMILY_HOOKS

    lm = language_model
    _, bridge = pack.X2ILaViBridgeLoader.execute(sdxl_unet, lm, SDXL_BRIDGE, 1.0, 1.0).result
    (tokens, options), = encode(pack, bridge, PROMPT)
    assert tokens.shape == (1, 77, 2048) and options["pooled_output"].shape == (1, 1280)
    assert tokens.dtype == options["pooled_output"].dtype == torch.float32
    assert {k: options[k] for k in SDXL_SIZE_CONDITIONING} == SDXL_SIZE_CONDITIONING
    assert options["hooks"] is FAMILY_HOOKS["sdxl"]
    _, plain = pack.X2ILaViBridgeLoader.execute(sdxl_unet, lm, SDXL_BRIDGE, 1.0, 0.0).result
    assert (tokens - encode(pack, plain, PROMPT)[0][0]).abs().max() > 1e-3  # the text LoRA is really applied
    comfy["mm"].unload_all_models()
    # Reference: a fresh T5 with the file's text LoRA merged (W + up @ down), official features, the file's adapter.
    trained = load_trained_bridge(bridges["sdxl"])
    t5 = T5EncoderModel.from_pretrained(comfy["models"] / "text_encoders" / "t5-large")
    t5.load_state_dict(merged_state(t5.state_dict(), map_lora_pairs(trained.text_pairs(), text_lora_targets(t5, "t5"))), strict=False)
    features, _ = encode_for_bridge(LaViBridgeRecipe.T5_UNET, t5, lm.model.tokenizer, [PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(tokens, trained.adapter(features), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(options["pooled_output"], trained.adapter.pooled(tokens), atol=1e-5, rtol=1e-5)


def test_sdxl_bridge_conditioning_samples_on_the_bridged_sdxl_model(pack, sdxl_unet, bridges, language_model):
    bridged, bridge = pack.X2ILaViBridgeLoader.execute(sdxl_unet, language_model, SDXL_BRIDGE, 1.0, 1.0).result
    positive, negative = encode(pack, bridge, PROMPT), encode(pack, bridge, "")
    seen = []

    def record(apply_model, args):
        seen.append((args["c"]["c_crossattn"].shape, args["c"]["y"].detach().clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = bridged.clone()
    model.set_model_unet_function_wrapper(record)
    latent = sample_latent(model, positive, negative, steps=2, cfg=5.0)
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
    assert [shape for shape, _ in seen] == [(2, 77, 2048)] * 2  # positive and negative in one batch per step
    pooled = [c[0][1]["pooled_output"][0] for c in (positive, negative)]
    for _, y in seen:  # SDXL's class embedding reads each conditioning's pooled vector, then the size embeddings
        assert y.shape == (2, 2816)
        matches = sorted(i for row in y for i, p in enumerate(pooled) if (row[:1280] - p.to(row)).abs().max() < 1e-6)
        assert matches == [0, 1]


def test_sd1_bridge_on_sd1_gives_sd1_conditioning_with_its_family_hook(pack, sd1_unet, bridges, language_model):
    from x2i.nodes.common import FAMILY_HOOKS

    bridged, bridge = pack.X2ILaViBridgeLoader.execute(sd1_unet, language_model, SD1_BRIDGE, 1.0, 1.0).result
    assert len(bridged.patches) == len(load_trained_bridge(bridges["sd1"]).vision_lora) and bridge.family is SD1
    conditioning = encode(pack, bridge, PROMPT)
    (tokens, options), = conditioning
    assert tokens.shape == (1, 77, 768) and "pooled_output" not in options and options["hooks"] is FAMILY_HOOKS["sd1"]
    assert torch.isfinite(sample_latent(bridged, conditioning, conditioning, steps=1)).all()


# ---- Refusals, naming both sides ----

SDXL_MODEL = "an SDXL U-Net (2048-wide text context + 1280-wide pooled; ComfyUI's SDXL)"
SD1_MODEL = "an SD1.x U-Net (768-wide text context; ComfyUI's SD15)"


@pytest.mark.parametrize("bridge_name, unet, error, message", [
    (SDXL_BRIDGE, "sd1", LaViBridgeFileError,
     f"{SDXL_BRIDGE} is a LaVi-Bridge trained for an SDXL U-Net (2048-wide text context + 1280-wide pooled; diffusion_model "
     f"'sdxl', recipe t5_unet), but the connected MODEL is {SD1_MODEL}: connect an SDXL checkpoint or pick a bridge trained "
     "for this MODEL"),
    (SD1_BRIDGE, "sdxl", LaViBridgeFileError,
     f"{SD1_BRIDGE} is a LaVi-Bridge trained for an SD1.x U-Net (768-wide text context; diffusion_model 'sd1', recipe "
     f"t5_unet), but the connected MODEL is {SDXL_MODEL}: connect an SD1.x checkpoint or pick a bridge trained for this MODEL"),
    ("t5_unet", "sdxl", ValueError,
     f"t5_unet is for SD1.x U-Nets (768-wide text context), but the connected MODEL is {SDXL_MODEL}: connect an SD1.x "
     "checkpoint, or use a LaVi-Bridge trained for SDXL"),
    (ODD_POOLED_BRIDGE, "sdxl", LaViBridgeFileError,
     f"{ODD_POOLED_BRIDGE}: its adapter makes a 640-wide pooled vector, but SDXL reads a 1280-wide one: the file does not fit "
     "the diffusion model it names; export it again with this pack's bridge trainer"),
], ids=["sdxl-bridge-on-sd1", "sd1-bridge-on-sdxl", "released-t5_unet-on-sdxl", "pooled-640-on-sdxl"])
def test_a_bridge_for_the_other_family_is_refused_naming_both(pack, sdxl_unet, sd1_unet, bridges, language_model,
                                                               bridge_name, unet, error, message):
    model = {"sd1": sd1_unet, "sdxl": sdxl_unet}[unet]
    with pytest.raises(error) as refused:
        pack.X2ILaViBridgeLoader.execute(model, language_model, bridge_name, 1.0, 1.0)
    assert str(refused.value) == message
    assert not model.patches  # the connected MODEL is left as it was


@pytest.mark.parametrize("bridge_name, unet, message", [
    (SDXL_BRIDGE, "sd1", r"is for SDXL \(2048-wide tokens \+ 1280-wide pooled\), but the model is SD15, an SD1\.x model "
                         r"\(768-wide\): use one made for SD1\.x, or an SDXL checkpoint"),
    (SD1_BRIDGE, "sdxl", r"is for SD1\.x \(768-wide tokens\), but the model is SDXL, an SDXL model \(2048-wide \+ 1280-wide "
                         r"pooled\): use one made for SDXL, or an SD1\.x checkpoint"),
])
def test_bridge_conditioning_sampled_on_the_other_family_is_refused_by_the_family_hook(pack, sdxl_unet, sd1_unet, bridges,
                                                                                      language_model, bridge_name, unet, message):
    own, other = {"sd1": (sdxl_unet, sd1_unet), "sdxl": (sd1_unet, sdxl_unet)}[unet]
    _, bridge = pack.X2ILaViBridgeLoader.execute(own, language_model, bridge_name, 1.0, 1.0).result
    conditioning = encode(pack, bridge, PROMPT)
    with pytest.raises(ValueError, match=message):
        sample_latent(other, conditioning, conditioning, steps=1)
