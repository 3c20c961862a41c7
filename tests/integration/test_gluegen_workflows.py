"""The shipped GlueGen workflows, run unmodified (but for size and steps) in a real ComfyUI server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from comfy_harness import ComfyServer
from safetensors.torch import save_file
from ui_workflow import ui_to_api

from gluenet import GlueNetConfig, save_gluenet
from gluenet.modules import GlueNet
from x2i_testing import make_t5_encoder_folder, make_xlm_roberta_folder, official_layout, random_state_dict

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
LANGUAGES = ("Chinese", "French", "Italian", "Japanese", "Spanish")
T5_HIDDEN = 48


@pytest.fixture(scope="session")
def gluegen_models(comfy_models_dir: Path) -> Path:
    """The files the shipped workflows name, as tiny real-architecture stand-ins.

    The multilingual GlueNets are full-size released-format checkpoints (77x1024 -> 768), so the
    stand-in XLM-R is 1024 wide (one layer) like xlm-roberta-large.
    """
    encoders = comfy_models_dir / "text_encoders"
    make_xlm_roberta_folder(encoders / "xlm-roberta-large", hidden=1024, layers=1, heads=8)
    make_t5_encoder_folder(encoders / "t5-v1_1-large", d_model=T5_HIDDEN)
    gluenets = comfy_models_dir / "gluenet"
    released = gluenets / "gluenet_French_clip_overnorm_over3_noln.ckpt"
    torch.save(random_state_dict(official_layout("Translator_noln(77,1024,768,2,5)"), seed=7), released)
    for language in LANGUAGES:
        target = gluenets / f"gluenet_{language}_clip_overnorm_over3_noln.ckpt"
        if not target.exists():
            os.link(released, target)
    config = GlueNetConfig("translator_noln", num_tokens=77, in_dim=T5_HIDDEN, out_dim=768, depth=2, encoder_hint="t5-v1_1-large")
    torch.manual_seed(0)
    save_gluenet(GlueNet(config), gluenets / "gluenet_t5-v1_1-large_sd15.safetensors")
    # A LoRA sitting in the wrong folder: a valid safetensors file that is not a GlueNet.
    save_file({"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(4, 2)}, str(gluenets / "not_a_gluenet.safetensors"))
    return comfy_models_dir


def _load(name: str, server: ComfyServer) -> dict:
    prompt = ui_to_api(json.loads((WORKFLOWS / name).read_text(encoding="utf-8")), server.object_info())
    # Keep the test fast on a 2-core CPU: tiny image, two steps. Everything else is as shipped.
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"].update(steps=2)
    return prompt


def _nodes_of(prompt: dict, class_type: str) -> list[dict]:
    return [node for node in prompt.values() if node["class_type"] == class_type]


@pytest.mark.parametrize("workflow", ["gluegen_multilingual.json", "gluegen_t5_english.json"])
def test_shipped_workflow_makes_an_image(workflow, gluegen_models, comfy_server: ComfyServer):
    prompt = _load(workflow, comfy_server)
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success"
    images = comfy_server.output_files(entry)
    assert len(images) == 1 and images[0].stat().st_size > 0
    if workflow == "gluegen_multilingual.json":
        assert "GlueNet router: 'fr' via detected" in comfy_server.log_tail(200_000)


def test_a_file_that_is_not_a_gluenet_fails_validation(gluegen_models, comfy_server: ComfyServer):
    prompt = _load("gluegen_t5_english.json", comfy_server)
    _nodes_of(prompt, "X2IGlueNetLoader")[0]["inputs"]["gluenet_name"] = "not_a_gluenet.safetensors"
    status, body = comfy_server.queue(prompt)
    assert status == 400
    messages = json.dumps(body["node_errors"])
    assert "not_a_gluenet.safetensors" in messages and "not a GlueNet" in messages


def test_a_gluenet_for_another_encoder_is_refused_with_both_widths(gluegen_models, comfy_server: ComfyServer):
    prompt = _load("gluegen_t5_english.json", comfy_server)
    _nodes_of(prompt, "X2IGlueNetLoader")[0]["inputs"]["gluenet_name"] = "gluenet_French_clip_overnorm_over3_noln.ckpt"
    status, body = comfy_server.queue(prompt)
    assert status == 200, body
    entry = comfy_server.wait(body["prompt_id"], timeout=600)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "X2IGlueGenTextEncode"
    assert "expects 77 tokens x 1024 channels, but text encoder 't5-v1_1-large' gives 77 x 48" in errors[0]["exception_message"]
