"""LaVi-Bridge LoRA files: reading, official positional order, shape checks, and merging faithfully."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from support import DATA_DIR
from x2i.bridge.lora import (
    OFFICIAL_PIXART_TARGET_CLASSES,
    OFFICIAL_UNET_TARGET_CLASSES,
    SDXL_UNET,
    LaViBridgeFileError,
    LoraTarget,
    UNetStructure,
    lora_delta,
    map_lora_pairs,
    merged_state,
    pixart_lora_targets,
    read_lora_pairs,
    text_lora_targets,
    unet_lora_targets,
)
from x2i.training.diffusion_models import (  # diffusers configs of SD1.5's and SDXL's U-Nets
    SD1_UNET_CONFIG,
    SDXL_UNET_CONFIG,
)

GOLDEN = DATA_DIR / "lavibridge_lora_golden.safetensors"

# PixArt-alpha/PixArt-XL-2-512x512 transformer/config.json.
PIXART_512_CONFIG = {
    "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 72, "caption_channels": 4096,
    "cross_attention_dim": 1152, "dropout": 0.0, "in_channels": 4, "norm_elementwise_affine": False,
    "norm_eps": 1e-06, "norm_num_groups": 32, "norm_type": "ada_norm_single", "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000, "num_layers": 28, "only_cross_attention": False, "out_channels": 8,
    "patch_size": 2, "sample_size": 64, "upcast_attention": False, "use_additional_conditions": False,
    "use_linear_projection": False,
}


def official_order(model: nn.Module, target_classes: frozenset[str]) -> list[tuple[str, str, tuple[int, ...]]]:
    """The release's positional rule, written from its description: for each module (registration
    pre-order) whose class name is a target, each Linear/Conv2d descendant in named_modules() order."""
    names = {id(m): n for n, m in model.named_modules()}
    return [
        (names[id(m)], "linear" if isinstance(m, nn.Linear) else "conv", tuple(m.weight.shape))
        for ancestor in model.modules()
        if type(ancestor).__name__ in target_classes
        for _, m in ancestor.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]


def as_triples(targets: list[LoraTarget]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(t.name, t.kind, t.weight_shape) for t in targets]


def random_pairs(targets: list[LoraTarget], rank: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for t in targets:
        up_shape, down_shape = t.pair_shapes(rank)
        pairs.append(((torch.randn(up_shape, generator=g) * 0.01).half(), (torch.randn(down_shape, generator=g) / rank).half()))
    return pairs


def save_released(pairs, path: Path) -> Path:
    """As the official save_lora_weight writes it: torch.save of a flat fp16 list, up first."""
    torch.save([t for pair in pairs for t in pair], path)
    return path


# ---- Target lists against the official traversal of real diffusers models ----


def test_sd15_unet_targets_match_the_official_traversal_exactly():
    import diffusers  # in requirements-test.txt: the real diffusers traversal is the reference
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SD1_UNET_CONFIG)
    assert [n for n, _ in unet.named_children()][:6] == [
        "conv_in", "time_proj", "time_embedding", "down_blocks", "up_blocks", "mid_block"
    ]
    targets = unet_lora_targets(SD1_UNET_CONFIG)
    assert as_triples(targets) == official_order(unet, OFFICIAL_UNET_TARGET_CLASSES)
    assert as_triples(unet_lora_targets()) == as_triples(targets)  # SD1.x is the default
    assert len(targets) == 224
    assert sum(t.kind == "linear" for t in targets) == 166 and sum(t.kind == "conv" for t in targets) == 58
    assert targets[0].name == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert targets[5].name == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert targets[5].pair_shapes(32) == ((320, 32), (32, 768))
    assert targets[-1].name == "mid_block.resnets.1.conv2"
    shortcut = next(t for t in targets if t.name.endswith("conv_shortcut"))
    assert shortcut.pair_shapes(32) == ((640, 32, 1, 1), (32, 320, 1, 1))


def test_sdxl_unet_targets_match_the_official_traversal_exactly():
    """SDXL base: per-block transformer depths (1, 2, 10), reversed in the up blocks, 10 in the mid block."""
    import diffusers  # in requirements-test.txt: the real diffusers traversal is the reference
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SDXL_UNET_CONFIG)
    targets = unet_lora_targets(SDXL_UNET_CONFIG)
    assert as_triples(targets) == official_order(unet, OFFICIAL_UNET_TARGET_CLASSES)
    assert as_triples(unet_lora_targets(SDXL_UNET)) == as_triples(targets)
    # 70 transformer blocks x 9 layers; 17 resnets x (conv1, time_emb_proj, conv2); 11 width-changing shortcuts.
    assert len(targets) == 70 * 9 + 17 * 3 + 11
    assert next(t for t in targets if t.name.endswith("attn2.to_k")).pair_shapes(32) == ((640, 32), (32, 2048))
    assert targets[-1].name == "mid_block.resnets.1.conv2"


def test_tiny_unet_variant_also_matches():
    """Another block layout (2 levels, 1 layer per block, 2 transformer layers, 64-wide context)."""
    import diffusers  # in requirements-test.txt: the real diffusers traversal is the reference
    config = {
        "block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 64, "norm_num_groups": 8,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "transformer_layers_per_block": 2, "attention_head_dim": 8,
    }
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**config)
    assert as_triples(unet_lora_targets(config)) == official_order(unet, OFFICIAL_UNET_TARGET_CLASSES)


@pytest.mark.parametrize("class_name", ["Transformer2DModel", "PixArtTransformer2DModel"])
def test_pixart_targets_match_the_official_traversal(class_name):
    import diffusers  # in requirements-test.txt: the real diffusers traversal is the reference
    config = dict(PIXART_512_CONFIG)
    if class_name == "PixArtTransformer2DModel":
        config = {k: v for k, v in config.items() if k not in ("only_cross_attention", "use_linear_projection")}
    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**config)
    official = official_order(model, OFFICIAL_PIXART_TARGET_CLASSES)
    assert as_triples(pixart_lora_targets()) == official
    assert len(official) == 224 and {shape for *_, shape in official} == {(1152, 1152)}


def test_unsupported_unet_configs_are_refused_with_the_reason():
    with pytest.raises(LaViBridgeFileError, match="SD1.x"):
        unet_lora_targets({"down_block_types": ["DownBlock2D"] * 3 + ["CrossAttnDownBlock2D"], "up_block_types":
                           ["UpBlock2D"] * 4, "mid_block_type": "UNetMidBlock2D"})
    with pytest.raises(LaViBridgeFileError, match="transformer_layers_per_block"):
        UNetStructure.from_config({"transformer_layers_per_block": [1, 2, 10]})


# ---- Text models: name-based lists vs the official class-based rule ----


def _tiny_t5(model_cls_name: str = "T5EncoderModel") -> nn.Module:
    import transformers

    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4)
    return getattr(transformers, model_cls_name)(config).eval()


def _tiny_llama(model_cls_name: str = "LlamaForCausalLM") -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2)
    return getattr(transformers, model_cls_name)(config).eval()


def test_t5_targets_follow_the_official_order_and_ignore_the_decoder():
    encoder = _tiny_t5()
    targets = text_lora_targets(encoder, "t5")
    assert as_triples(targets) == official_order(encoder, frozenset({"T5Attention"}))
    assert [t.name for t in targets[:4]] == [f"encoder.block.0.layer.0.SelfAttention.{x}" for x in "qkvo"]
    # A full T5Model keeps the same names (encoder. prefix); its decoder attention is not a target.
    assert [t.name for t in text_lora_targets(_tiny_t5("T5Model"), "t5")] == [t.name for t in targets]
    # A bare encoder stack has no prefix: names always key the given module's own state_dict.
    stack_names = [t.name for t in text_lora_targets(encoder.encoder, "t5")]
    assert stack_names == [t.name.removeprefix("encoder.") for t in targets]


def test_llama_targets_follow_the_official_order_including_gqa_shapes():
    model = _tiny_llama()
    targets = text_lora_targets(model, "llama")
    assert as_triples(targets) == official_order(model, frozenset({"LlamaAttention"}))
    assert targets[1].name == "model.layers.0.self_attn.k_proj" and targets[1].weight_shape == (16, 32)
    assert [t.name for t in text_lora_targets(model.model, "llama")] == [t.name.removeprefix("model.") for t in targets]


def test_text_targets_refuse_the_wrong_family():
    with pytest.raises(LaViBridgeFileError, match="no t5 attention layers"):
        text_lora_targets(_tiny_llama(), "t5")


# ---- Numerical faithfulness against the official injection (golden) ----


def _golden(family: str):
    with safe_open(GOLDEN, framework="pt") as f:
        meta = f.metadata()
        tensors = {k.removeprefix(f"{family}."): f.get_tensor(k) for k in f.keys() if k.startswith(f"{family}.")}
    return meta, tensors


@pytest.mark.parametrize("family", ["t5", "llama"])
@pytest.mark.device
def test_merged_weights_reproduce_the_official_injection(family, tmp_path, device):
    import transformers

    meta, golden = _golden(family)
    config_cls = transformers.T5Config if family == "t5" else transformers.LlamaConfig
    torch.manual_seed(int(meta[f"{family}.seed"]))
    model = getattr(transformers, meta[f"{family}.model_class"])(config_cls(**json.loads(meta[f"{family}.config"])))
    model = model.float().eval()
    fingerprint = sum(p.double().abs().sum() for p in model.state_dict().values() if p.is_floating_point())
    assert float(fingerprint) == pytest.approx(float(meta[f"{family}.base_fingerprint"]), rel=1e-9), (
        "the seeded tiny model no longer matches the golden one (transformers init changed?): regenerate "
        "tests/data/lavibridge_lora_golden.safetensors as tests/data/lavibridge_golden.md describes"
    )
    n = len(json.loads(meta[f"{family}.positional_names"]))
    path = save_released([(golden[f"lora.{i}.up"], golden[f"lora.{i}.down"]) for i in range(n)], tmp_path / "lora_text.pt")

    targets = text_lora_targets(model, family)
    assert [t.name for t in targets] == json.loads(meta[f"{family}.positional_names"])
    mapped = map_lora_pairs(read_lora_pairs(path), targets, source=path.name)
    model.to(device)  # the base weights on the device, the LoRA pairs read on the CPU: merged where the weights are
    model.load_state_dict(merged_state(model.state_dict(), mapped, strength=1.0), strict=False)

    ids = golden["input_ids"].to(device)
    with torch.no_grad():
        if family == "t5":
            out = model(input_ids=ids).last_hidden_state
        else:
            out = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert (golden["official_output"] - golden["base_output"]).abs().max() > 0.5  # the LoRA matters
    assert out.device.type == device.type
    torch.testing.assert_close(out.cpu(), golden["official_output"], rtol=1e-4, atol=1e-4)


# ---- Full-size SD1.5 lora_vis.pt in the released format ----


@pytest.fixture(scope="module")
def sd15_lora_vis(tmp_path_factory) -> tuple[Path, list]:
    pairs = random_pairs(unet_lora_targets(), rank=32, seed=5)
    return save_released(pairs, tmp_path_factory.mktemp("lavi") / "lora_vis.pt"), pairs


def test_released_sd15_lora_vis_maps_by_position(sd15_lora_vis):
    path, pairs = sd15_lora_vis
    read = read_lora_pairs(path)
    assert len(read) == 224 and all(up.dtype == torch.float16 for up, _ in read)
    mapped = map_lora_pairs(read, unet_lora_targets(), source=path.name)
    up, down = mapped["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert torch.equal(up, pairs[5][0]) and torch.equal(down, pairs[5][1]) and tuple(down.shape) == (32, 768)
    assert list(mapped)[-1] == "mid_block.resnets.1.conv2" and torch.equal(mapped[list(mapped)[-1]][0], pairs[-1][0])


def test_a_missing_pair_is_refused_with_the_counts(sd15_lora_vis):
    _, pairs = sd15_lora_vis
    targets = unet_lora_targets()
    with pytest.raises(LaViBridgeFileError, match=r"223 LoRA pairs but the model has 224") as info:
        map_lora_pairs(pairs[:5] + pairs[6:], targets, source="lora_vis.pt")
    # pair 5 (to_k) gets to_v's pair (same shapes); pair 6 (to_v) gets to_out.0's: the first misfit.
    assert f"by position, pair 6 (0-based; list items 12, 13) does not fit layer {targets[6].name}" in str(info.value)


def test_a_removed_pair_desyncs_and_is_refused_at_the_first_misfit_index(sd15_lora_vis, tmp_path):
    """The official loader would silently shift every later pair; the count and shapes catch it."""
    _, pairs = sd15_lora_vis
    shifted = pairs[:5] + pairs[6:] + [pairs[5]]  # count kept, order broken from index 5 on
    with pytest.raises(LaViBridgeFileError) as info:
        map_lora_pairs(shifted, unet_lora_targets(), source="lora_vis.pt")
    message = str(info.value)
    # pair 5 (to_k) now holds to_v's pair, same shapes; pair 6 (to_v) holds to_out.0's: 320 wide, not 768.
    assert "pair 6 " in message and "attn2.to_v" in message and "expected down [32, 768], found [32, 320]" in message


def test_an_sd2_context_is_named_in_the_error(sd15_lora_vis):
    _, pairs = sd15_lora_vis
    changed = list(pairs)
    changed[5] = (pairs[5][0], torch.zeros(32, 1024, dtype=torch.float16))
    with pytest.raises(LaViBridgeFileError) as info:
        map_lora_pairs(changed, unet_lora_targets(), source="lora_vis.pt")
    message = str(info.value)
    assert "pair 5" in message and "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in message
    assert "expected down [32, 768], found [32, 1024]" in message and "1024-wide context (SD2.x" in message


def test_a_pixart_file_for_a_unet_says_pixart():
    pairs = random_pairs(pixart_lora_targets(), rank=32)
    with pytest.raises(LaViBridgeFileError, match=r"pair 0 .*PixArt-XL-2"):
        map_lora_pairs(pairs, unet_lora_targets(), source="lora_vis.pt")


# ---- Reading: what is not a LaVi-Bridge list ----


@pytest.mark.parametrize(
    ("obj", "pattern"),
    [
        ({"blocks.0.net_sen.0.weight": torch.zeros(2, 2), "tail.net_sen.0.weight": torch.zeros(2)}, "GlueNet"),
        ({"unet.down.lora_down.weight": torch.zeros(2, 2)}, "named .*LoRA"),
        ({"norm1.weight": torch.zeros(2), "ff1.net.0.proj.weight": torch.zeros(2, 2)}, "TextAdapter"),
        ([torch.zeros(2, 4), torch.zeros(4, 2), torch.zeros(2, 4)], "odd number"),
        ([torch.zeros(2, 4), "down"], "item 1 of the list is a str"),
        (torch.zeros(3), "holds a Tensor"),
        ([], "empty"),
    ],
)
def test_files_that_are_not_a_lora_list_are_refused(tmp_path, obj, pattern):
    path = tmp_path / "lora_vis.pt"
    torch.save(obj, path)
    with pytest.raises(LaViBridgeFileError, match=pattern):
        read_lora_pairs(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_not_loaded(tmp_path):
    path = tmp_path / "lora_vis.pt"
    path.write_bytes(pickle.dumps(print))
    with pytest.raises(LaViBridgeFileError, match="safe PyTorch checkpoint"):
        read_lora_pairs(path)


# ---- Merging math ----


def test_conv_delta_equals_the_injected_conv_path():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    down, up = torch.randn(4, 6, 3, 3, generator=g), torch.randn(8, 4, 1, 1, generator=g)
    x = torch.randn(2, 6, 5, 5, generator=g)
    injected = conv(x) + torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, padding=1), up)
    merged = merged_state({"c.weight": conv.weight.detach()}, {"c": (up, down)}, strength=1.0)["c.weight"]
    torch.testing.assert_close(torch.nn.functional.conv2d(x, merged, conv.bias, padding=1), injected)


def test_merged_state_keeps_the_base_dtype_and_scales_by_strength():
    base = torch.randn(8, 6).half()
    up, down = torch.randn(8, 4).half(), torch.randn(4, 6).half()
    out = merged_state({"l.weight": base}, {"l": (up, down)}, strength=0.5)["l.weight"]
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), (base.float() + 0.5 * lora_delta(up, down)).half().float())
    with pytest.raises(LaViBridgeFileError, match="no weight 'other.weight'"):
        merged_state({"l.weight": base}, {"other": (up, down)})
