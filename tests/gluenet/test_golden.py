"""Same weights in, same numbers out: the pack's GlueNets against outputs of the official classes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from support import DATA_DIR
from support.models import RELEASED_SOUND_ARGS, RELEASED_TEXT_ARGS, official_layout
from support.precision import NETWORK_HALF, assert_close_in_half
from x2i.gluenet import GlueNet, GlueNetConfig
from x2i.gluenet.checkpoint import build_gluenet, detect_architecture

GOLDEN = DATA_DIR / "gluenet_golden.safetensors"

# prefix -> (architecture, expected config fields from the official constructor args)
CASES = {
    "translator_noln": ("translator_noln", dict(num_tokens=8, in_dim=16, out_dim=12, mult=2, depth=2)),
    "translator": ("translator", dict(num_tokens=8, in_dim=16, out_dim=12, mult=2, depth=2)),
    "translator_same": ("translator", dict(num_tokens=8, in_dim=16, out_dim=16, mult=2, depth=2)),
    "translator_w_head": ("translator_w_head", dict(num_tokens=4, num_tokens_out=6, in_dim=8, out_dim=12, mult=4, depth=5)),
    "translator_attn": ("translator_attn", dict(num_tokens=8, in_dim=16, out_dim=12, mult=2, depth=2, attn_heads=8, attn_dim_head=64)),
}


def _golden_case(prefix: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    with safe_open(str(GOLDEN), framework="pt") as f:
        state = {k[len(prefix) + len(".state."):]: f.get_tensor(k) for k in f.keys() if k.startswith(f"{prefix}.state.")}
        return state, f.get_tensor(f"{prefix}.input"), f.get_tensor(f"{prefix}.output")


@pytest.mark.device
@pytest.mark.parametrize("prefix", sorted(CASES))
def test_official_outputs_are_reproduced(prefix, device):
    state, x, expected = _golden_case(prefix)
    architecture, fields = CASES[prefix]
    detected = detect_architecture(state)
    assert detected.architecture == architecture
    for name, value in fields.items():
        assert getattr(detected, name) == value, name
    model = build_gluenet(detected, state, prefix).to(device)
    with torch.no_grad():
        y = model(x.to(device))
    assert y.shape == expected.shape and y.device.type == device.type
    torch.testing.assert_close(y.cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.device
@pytest.mark.parametrize("prefix", sorted(CASES))
def test_bfloat16_stays_close_to_the_official_float32_outputs(prefix, device):
    state, x, expected = _golden_case(prefix)
    model = build_gluenet(detect_architecture(state), state, prefix).to(device=device, dtype=NETWORK_HALF)
    with torch.no_grad():
        y = model(x.to(device=device, dtype=NETWORK_HALF))
    assert y.dtype == NETWORK_HALF
    assert_close_in_half(y, expected, NETWORK_HALF, prefix)


def test_golden_file_records_its_provenance():
    with safe_open(str(GOLDEN), framework="pt") as f:
        metadata = f.metadata()
    assert "salesforce/GlueGen" in metadata["source"]
    assert json.loads(metadata["translator_w_head.args"]) == [4, 6, 8, 12, 4, 5]


def _shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def test_released_multilingual_layout_matches_official_keys_and_shapes():
    t, d, d_out, mult, depth = RELEASED_TEXT_ARGS
    config = GlueNetConfig("translator_noln", num_tokens=t, in_dim=d, out_dim=d_out, mult=mult, depth=depth)
    with torch.device("meta"):
        model = GlueNet(config)
    layout = official_layout("Translator_noln(77,1024,768,2,5)")
    assert _shapes(model) == layout
    assert len(layout) == 132
    assert sum(p.numel() for p in model.parameters()) == 50_179_776


def test_released_sound_layout_matches_official_keys_and_shapes():
    t, t_out, d, d_out, mult, depth = RELEASED_SOUND_ARGS
    config = GlueNetConfig(
        "translator_w_head", num_tokens=t, num_tokens_out=t_out, in_dim=d, out_dim=d_out, mult=mult, depth=depth
    )
    with torch.device("meta"):
        model = GlueNet(config)
    layout = official_layout("Translator_w_head(16,77,64,768,4,5)")
    assert _shapes(model) == layout
    assert len(layout) == 168
    assert sum(p.numel() for p in model.parameters()) == 57_865_983


@pytest.mark.parametrize(
    ("layout_name", "expected"),
    [
        ("Translator_noln(77,1024,768,2,5)", dict(architecture="translator_noln", num_tokens=77, in_dim=1024, out_dim=768, mult=2, depth=5)),
        ("Translator_w_head(16,77,64,768,4,5)", dict(architecture="translator_w_head", num_tokens=16, num_tokens_out=77, in_dim=64, out_dim=768, mult=4, depth=5)),
    ],
)
def test_released_layouts_are_detected_from_shapes(layout_name, expected):
    shapes = {k: torch.empty(v, device="meta") for k, v in official_layout(layout_name).items()}
    config = detect_architecture(shapes)
    for name, value in expected.items():
        assert getattr(config, name) == value, name
