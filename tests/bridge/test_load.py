"""load_bridge: a released folder and a trained file give the same kind of Bridge, with the recipe, the
adapter and both LoRAs in the official order, and the quick checks the loader node runs before a graph."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import T5EncoderModel

from support.models import write_lavibridge_folder
from x2i.bridge import (
    LaViBridgeFileError,
    LaViBridgeRecipe,
    TextAdapter,
    TextAdapterConfig,
    is_bridge,
    load_adapter,
    load_bridge,
    map_lora_pairs,
    may_be_bridge,
    probe_bridge,
    read_lora_pairs,
    save_trained_bridge,
    text_lora_targets,
    unet_lora_targets,
)

RANK = 4


def assert_same_pairs(actual, expected) -> None:
    assert len(actual) == len(expected)
    for (up, down), (want_up, want_down) in zip(actual, expected, strict=True):
        assert torch.equal(up, want_up) and torch.equal(down, want_down)


def assert_same_adapter(actual: TextAdapter, expected: TextAdapter) -> None:
    assert actual.config == expected.config and not actual.training
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(actual.state_dict()[key], value.to(actual.state_dict()[key].dtype), rtol=0, atol=0)


@pytest.fixture(scope="module")
def t5(tiny_t5) -> T5EncoderModel:
    return T5EncoderModel.from_pretrained(tiny_t5)


@pytest.fixture(scope="module")
def released(tmp_path_factory, t5):
    """A released folder under the release's name (t5_unet), rank 4, the tiny T5's text LoRA."""
    return write_lavibridge_folder(tmp_path_factory.mktemp("released") / "t5_unet", t5, "t5", adapter_in=t5.config.d_model, rank=RANK)


def _random_pairs(targets, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {t.name: tuple(torch.randn(shape, generator=g) * 0.02 for shape in t.pair_shapes(RANK)) for t in targets}


def test_released_folder_loads_as_one_bridge(released, t5):
    bridge = load_bridge(released)
    assert (bridge.name, bridge.recipe, bridge.language_model_family, bridge.trained_for) == (
        "t5_unet", LaViBridgeRecipe.T5_UNET, "t5", None)
    assert (bridge.vision_source, bridge.text_source) == ("t5_unet/lora_vis.pt", "t5_unet/lora_text.pt")
    assert_same_pairs(bridge.vision_pairs, read_lora_pairs(released / "lora_vis.pt"))
    assert_same_pairs(bridge.text_pairs, read_lora_pairs(released / "lora_text.pt"))
    assert_same_adapter(bridge.adapter, load_adapter(released / "adapter"))
    # The official order: every pair fits the layer at its position.
    assert len(map_lora_pairs(bridge.vision_pairs, unet_lora_targets(), bridge.vision_source)) == 224
    assert len(map_lora_pairs(bridge.text_pairs, text_lora_targets(t5, bridge.language_model_family), bridge.text_source)) == 4 * 2
    half = load_bridge(released, torch.float16, name="my choice")
    assert half.adapter.ff1.net[2].weight.dtype == torch.float16 and half.vision_source == "my choice/lora_vis.pt"


def test_a_renamed_release_takes_the_recipe_of_its_adapter_widths(tmp_path, t5):
    # 1024 -> 768 is t5_unet's pair whatever the intermediate width (64 here, 896 released).
    folder = write_lavibridge_folder(tmp_path / "my_bridge", t5, "t5", adapter_in=1024, rank=RANK)
    assert load_bridge(folder).recipe == LaViBridgeRecipe.T5_UNET
    odd = write_lavibridge_folder(tmp_path / "odd", t5, "t5", adapter_in=t5.config.d_model, rank=RANK)
    with pytest.raises(LaViBridgeFileError, match=r"odd: adapter 48 -> 768 matches no LaVi-Bridge recipe \(t5_unet: 1024 -> 768"):
        load_bridge(odd)


@pytest.mark.parametrize("with_text", [True, False], ids=["text LoRA", "vision only"])
def test_trained_file_loads_as_one_bridge(tmp_path, t5, with_text):
    vision = _random_pairs(unet_lora_targets(), seed=1)
    text = _random_pairs(text_lora_targets(t5, "t5"), seed=2) if with_text else {}
    torch.manual_seed(3)
    adapter = TextAdapter(TextAdapterConfig(t5.config.d_model, 64, 768))
    path = save_trained_bridge(tmp_path / "mine.safetensors", recipe="t5_unet", diffusion_model="sd1", adapter=adapter,
                               vision_lora=vision, text_lora=text, context_dim=768)
    bridge = load_bridge(path)
    assert (bridge.name, bridge.recipe, bridge.language_model_family, bridge.trained_for) == (
        "mine.safetensors", LaViBridgeRecipe.T5_UNET, "t5", "sd1")
    assert (bridge.vision_source, bridge.text_source) == ("mine.safetensors (vision LoRA)", "mine.safetensors (text LoRA)")
    half = [(up.half(), down.half()) for up, down in vision.values()]  # the file keeps LoRAs in fp16
    assert_same_pairs(bridge.vision_pairs, half)
    assert_same_pairs(bridge.text_pairs, [(up.half(), down.half()) for up, down in text.values()])
    assert_same_adapter(bridge.adapter, adapter)
    assert len(map_lora_pairs(bridge.vision_pairs, unet_lora_targets(), bridge.vision_source)) == 224


def test_a_trained_llama_file_says_its_family(tmp_path):
    adapter = TextAdapter(TextAdapterConfig(32, 16, 768))
    g = torch.Generator().manual_seed(0)
    vision = {"down_blocks.0.resnets.0.time_emb_proj": (torch.randn(320, 2, generator=g), torch.randn(2, 1280, generator=g))}
    text = {"layers.0.self_attn.q_proj": (torch.randn(32, 2, generator=g), torch.randn(2, 32, generator=g))}
    path = save_trained_bridge(tmp_path / "llama.safetensors", recipe="llama2_unet", diffusion_model="sd1", adapter=adapter,
                               vision_lora=vision, text_lora=text, context_dim=768)
    bridge = load_bridge(path)
    assert (bridge.recipe, bridge.language_model_family) == (LaViBridgeRecipe.LLAMA2_UNET, "llama")


def test_a_trained_bridge_refuses_another_diffusion_model(tmp_path, released):
    adapter = TextAdapter(TextAdapterConfig(16, 16, 4096))
    vision = {"transformer_blocks.0.attn1.to_q": (torch.zeros(1152, 2), torch.zeros(2, 1152))}
    path = save_trained_bridge(tmp_path / "pixart.safetensors", recipe="t5_transformer", diffusion_model="pixart",
                               adapter=adapter, vision_lora=vision, text_lora={}, context_dim=4096)
    bridge = load_bridge(path)
    bridge.check_diffusion_model("pixart", "PixArt-XL-2 (PixArt)")
    with pytest.raises(LaViBridgeFileError, match=r"pixart.safetensors is a LaVi-Bridge trained for PixArt-XL-2 \(diffusion_model "
                       r"'pixart', recipe t5_transformer\), but the connected MODEL is an SD1.x U-Net \(BaseModel\): connect a PixArt"):
        bridge.check_diffusion_model("sd1", "an SD1.x U-Net (BaseModel)")
    load_bridge(released).check_diffusion_model(None, "anything")  # a release says nothing: its recipe decides


def test_quick_checks_before_loading(tmp_path, released):
    assert is_bridge(released) and may_be_bridge(released)
    incomplete = tmp_path / "incomplete"
    (incomplete / "adapter").mkdir(parents=True)
    (incomplete / "lora_vis.pt").write_bytes((released / "lora_vis.pt").read_bytes())
    assert is_bridge(incomplete)
    with pytest.raises(LaViBridgeFileError, match="^incomplete lacks lora_text.pt: copy the whole released folder$"):
        probe_bridge(incomplete)
    with pytest.raises(LaViBridgeFileError, match="^shown name lacks"):
        probe_bridge(incomplete, "shown name")
    probe_bridge(released)

    other = tmp_path / "other.safetensors"
    save_file({"blocks.0.weight": torch.zeros(2, 2)}, str(other))
    assert may_be_bridge(other) and not is_bridge(other)  # a name may lead to it; the list does not show it
    with pytest.raises(LaViBridgeFileError, match="other.safetensors is not a LaVi-Bridge file of this pack"):
        probe_bridge(other)
    assert not may_be_bridge(tmp_path / "missing.safetensors") and not may_be_bridge(tmp_path)
