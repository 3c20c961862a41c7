"""Images by value in a real ComfyUI server: the same seed gives the same pixels, a different prompt or GlueNet
gives a different image, a bridged MODEL samples a different image than the unbridged one, and a bridge at
unet_strength 0 the unbridged one, pixel for pixel.

Each case re-samples: ComfyUI caches only the nodes of the previous prompt, so an image is recomputed after a
prompt with another seed or text ran in between."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from support.comfy_server import ComfyServer, shipped_workflow_prompt
from x2i.gluenet import GlueNetConfig, save_gluenet
from x2i.gluenet.modules import GlueNet

OTHER_GLUENET = "gluenet_t5-v1_1-large_sd15_other.safetensors"


def _node(prompt: dict, class_type: str) -> tuple[str, dict]:
    return next((i, n) for i, n in prompt.items() if n["class_type"] == class_type)


def _image(server: ComfyServer, prompt: dict) -> np.ndarray:
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success"
    (path,) = server.output_files(entry)
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    assert pixels.std() > 1.0, "a flat image says nothing about its conditioning"
    return pixels


def _differ(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and float(np.abs(a - b).mean()) > 0.5


@pytest.fixture(scope="module")
def other_gluenet(gluegen_models):
    """A second T5 GlueNet with other weights, beside the one gluegen_t5_english.json names."""
    config = GlueNetConfig("translator_noln", num_tokens=77, in_dim=48, out_dim=768, depth=2, encoder_hint="t5-v1_1-large")
    torch.manual_seed(1)
    save_gluenet(GlueNet(config), gluegen_models / "gluenet" / OTHER_GLUENET)
    return OTHER_GLUENET


def test_gluegen_images_follow_the_seed_the_prompt_and_the_gluenet(gluegen_models, other_gluenet, comfy_server: ComfyServer):
    base = shipped_workflow_prompt("gluegen_t5_english.json", comfy_server, steps=1)
    _, sampler = _node(base, "KSampler")
    sampler["inputs"]["seed"] = 7
    first = _image(comfy_server, base)

    other_text = copy.deepcopy(base)
    positive = other_text[_node(other_text, "KSampler")[1]["inputs"]["positive"][0]]
    positive["inputs"]["text"] = "a completely different scene: three yellow boats at night"
    assert _differ(_image(comfy_server, other_text), first)

    other_net = copy.deepcopy(base)
    _node(other_net, "X2IGlueNetLoader")[1]["inputs"]["gluenet_name"] = other_gluenet
    assert _differ(_image(comfy_server, other_net), first)

    assert np.array_equal(_image(comfy_server, base), first)  # re-sampled: the same seed, the same pixels


def test_a_bridged_model_samples_another_image_than_the_unbridged_one(lavibridge_t5_models, comfy_server: ComfyServer):
    bridged = shipped_workflow_prompt("lavibridge_t5_sd15.json", comfy_server, steps=1)
    _node(bridged, "KSampler")[1]["inputs"]["seed"] = 3
    with_bridge = _image(comfy_server, bridged)

    plain = copy.deepcopy(bridged)  # the same conditioning, the checkpoint's own MODEL
    checkpoint_id, _ = _node(plain, "CheckpointLoaderSimple")
    _node(plain, "KSampler")[1]["inputs"]["model"] = [checkpoint_id, 0]
    without_bridge = _image(comfy_server, plain)
    assert _differ(with_bridge, without_bridge)

    off = copy.deepcopy(bridged)  # unet_strength 0: the bridge's LoRA adds nothing to the MODEL
    _node(off, "X2ILaViBridgeLoader")[1]["inputs"]["unet_strength"] = 0.0
    assert np.array_equal(_image(comfy_server, off), without_bridge)  # re-sampled after the bridged MODEL: the same pixels
