"""The shipped U-ViT and block-conditioning workflows in a real ComfyUI server.

U-ViT: a tiny random U-ViT (64-pixel images) under the name the workflow uses, with the CLIP ViT-L/14
text encoder and the KL-f8 VAE taken out of the random SD1.5 test checkpoint into the files the
workflow names; sampled by stock KSampler. Block conditioning: the workflow as shipped on the random
SD1.5 checkpoint."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from support.comfy_server import WORKFLOWS_DIR, ComfyServer, shipped_workflow_prompt
from support.workflow_models import SD_IN_WRONG_FOLDER, UVIT_FILE, UVIT_TEST_SIZE

UVIT_WORKFLOW = "uvit_text_to_image.json"
BLOCK_WORKFLOW = "block_conditioning_sd15.json"
LONG_PROMPT = " ".join(["a red double-decker bus driving down a wet city street at dusk next to tall glass buildings"] * 6)


def _node(prompt: dict, class_type: str) -> dict:
    return next(n for n in prompt.values() if n["class_type"] == class_type)


def _errors(entry: dict) -> list[dict]:
    return [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]


def _run_to_error(server: ComfyServer, prompt: dict) -> dict:
    status, body = server.queue(prompt)
    assert status == 200, body
    entry = server.wait(body["prompt_id"], timeout=600)
    assert entry["status"]["status_str"] == "error"
    return _errors(entry)[0]


# --- U-ViT text to image ----------------------------------------------------------------------------


def test_shipped_uvit_workflow_samples_with_ksampler(uvit_models, comfy_server: ComfyServer):
    prompt = shipped_workflow_prompt(UVIT_WORKFLOW, comfy_server, size=UVIT_TEST_SIZE, steps=3)
    assert {n["class_type"] for n in prompt.values()} >= {"X2IUViTLoader", "CLIPLoader", "VAELoader", "KSampler", "SaveImage"}
    assert _node(prompt, "CLIPLoader")["inputs"]["type"] == "stable_diffusion"
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = comfy_server.output_files(entry)
    assert len(images) == 1
    with Image.open(images[0]) as image:
        assert image.size == (UVIT_TEST_SIZE, UVIT_TEST_SIZE)
    assert f"U-ViT {UVIT_FILE}: cross-intermediate" in comfy_server.log_tail(400_000)


def test_a_long_prompt_samples_from_its_first_clip_chunk(uvit_models, comfy_server: ComfyServer):
    prompt = shipped_workflow_prompt(UVIT_WORKFLOW, comfy_server, size=UVIT_TEST_SIZE, steps=2)
    positive = next(n for n in prompt.values() if n["class_type"] == "CLIPTextEncode" and n["inputs"]["text"])
    positive["inputs"]["text"] = LONG_PROMPT
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert "(2 CLIP chunks); this U-ViT reads one chunk of 77 tokens" in comfy_server.log_tail(400_000)


def test_uvit_bad_inputs_are_named(uvit_models, comfy_server: ComfyServer):
    prompt = shipped_workflow_prompt(UVIT_WORKFLOW, comfy_server, size=2 * UVIT_TEST_SIZE, steps=2)
    error = _run_to_error(comfy_server, prompt)
    assert "latent is 16×16 but this U-ViT was trained on 8×8 latents (64×64 images" in error["exception_message"]

    prompt = shipped_workflow_prompt(UVIT_WORKFLOW, comfy_server, size=UVIT_TEST_SIZE, steps=2)
    _node(prompt, "X2IUViTLoader")["inputs"]["uvit_name"] = SD_IN_WRONG_FOLDER
    status, body = comfy_server.queue(prompt)
    assert status == 400
    assert "a Stable Diffusion U-Net or checkpoint (load it with Load Checkpoint), not a U-ViT" in json.dumps(body["node_errors"])


# --- block-wise conditioning on SD1.5 ---------------------------------------------------------------


def test_shipped_block_conditioning_workflow_samples(comfy_server: ComfyServer):
    prompt = shipped_workflow_prompt(BLOCK_WORKFLOW, comfy_server)
    block = _node(prompt, "X2IBlockConditioning")
    assert block["inputs"]["blocks"] == "middle"
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len(comfy_server.output_files(entry)) == 1
    assert "Block conditioning: middle attend to conditioning_blocks" in comfy_server.log_tail(400_000)


def test_block_conditioning_names_bad_blocks(comfy_server: ComfyServer):
    prompt = shipped_workflow_prompt(BLOCK_WORKFLOW, comfy_server)
    _node(prompt, "X2IBlockConditioning")["inputs"]["blocks"] = "centre"
    status, body = comfy_server.queue(prompt)
    assert status == 400 and "cannot read block 'centre'" in json.dumps(body["node_errors"])

    _node(prompt, "X2IBlockConditioning")["inputs"]["blocks"] = "middle,output:0"
    error = _run_to_error(comfy_server, prompt)
    assert error["node_type"] == "X2IBlockConditioning"
    assert "output:0 has no cross-attention in this U-Net; blocks with cross-attention: input:1," in error["exception_message"]


# --- the shipped files ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [UVIT_WORKFLOW, BLOCK_WORKFLOW])
def test_workflow_layout(name):
    """Nodes apart (title bars included), links left to right, VAE Decode 220×50 with Save Image to its
    right, a thumbnail beside it."""
    workflow = json.loads((WORKFLOWS_DIR / name).read_text(encoding="utf-8"))
    title_bar = 30
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - title_bar, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in workflow["nodes"]}
    ids = sorted(boxes)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            ax0, ay0, ax1, ay1 = boxes[a]
            bx0, by0, bx1, by1 = boxes[b]
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, (name, a, b)
    for _, source, _, target, _, _ in workflow["links"]:
        assert boxes[source][2] < boxes[target][0], (name, source, target)
    by_type = {n["type"]: n for n in workflow["nodes"]}
    assert by_type["VAEDecode"]["size"] == [220, 50]
    assert by_type["SaveImage"]["pos"][0] > by_type["VAEDecode"]["pos"][0] + 220
    assert workflow["extra"]["ds"]["offset"] == [40, 60]
    assert (WORKFLOWS_DIR / name).with_suffix(".jpg").is_file()
