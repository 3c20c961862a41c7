"""The GlueGen text path end to end, against an independent reference of the official math."""

from __future__ import annotations

import pytest
import torch

from support.models import reference_gluegen_text
from support.precision import ENCODER_HALF, assert_close_in_half
from x2i.encoders import load_text_encoder
from x2i.gluenet import GlueNetConfig, load_gluenet, save_gluenet
from x2i.gluenet.modules import GlueNet

PROMPTS = ["Peinture impressionniste d'un jardin d'après-midi", "un chat assis sur un tapis rouge", ""]


@pytest.mark.device
def test_encoder_plus_released_gluenet_equals_official_recipe(tiny_xlmr, small_text_gluenet_ckpt, small_text_gluenet_state, device):
    encoder = load_text_encoder(tiny_xlmr).to(device)
    gluenet = load_gluenet(small_text_gluenet_ckpt).to(device)
    with torch.no_grad():
        got = gluenet.translate(encoder.encode(PROMPTS))
    expected = reference_gluegen_text(tiny_xlmr, small_text_gluenet_state, PROMPTS)
    assert got.shape == (3, 77, 768) and got.device.type == device.type
    got = got.cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # Different prompts give different conditionings; the empty one is a valid unconditional.
    assert not torch.allclose(got[0], got[1], atol=1e-3)
    assert torch.isfinite(got[2]).all()


@pytest.mark.device
def test_float16_encoder_as_comfyui_runs_it_on_a_gpu_stays_close(tiny_xlmr, small_text_gluenet_ckpt, small_text_gluenet_state, device):
    """dtype "auto" on a GPU: the encoder in ComfyUI's text-encoder precision, the GlueNet in float32."""
    encoder = load_text_encoder(tiny_xlmr, dtype=ENCODER_HALF).to(device)
    gluenet = load_gluenet(small_text_gluenet_ckpt).to(device)
    with torch.no_grad():
        got = gluenet.translate(encoder.encode(PROMPTS))
    assert got.dtype == torch.float32
    assert_close_in_half(got, reference_gluegen_text(tiny_xlmr, small_text_gluenet_state, PROMPTS), ENCODER_HALF, "XLM-R + GlueNet")


def test_mismatched_widths_name_both_sides(tiny_xlmr, tmp_path):
    config = GlueNetConfig("translator_noln", num_tokens=77, in_dim=1024, out_dim=768, depth=1, encoder_hint="xlm-roberta-large")
    path = tmp_path / "gluenet_wide.safetensors"
    save_gluenet(GlueNet(config), path)
    gluenet = load_gluenet(path)
    encoder = load_text_encoder(tiny_xlmr)
    with pytest.raises(ValueError, match=r"trained on xlm-roberta-large\) expects 77 tokens x 1024 .* gives 77 x 64"):
        gluenet.check_source(encoder.max_length, encoder.hidden_size, "text encoder 'xlm-roberta-tiny'")
    with pytest.raises(ValueError, match="expects 77 tokens x 1024"):
        gluenet.translate(encoder.encode(["gatto"]))
