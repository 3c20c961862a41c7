"""The shipped GlueGen workflows, run unmodified (but for size and steps) in a real ComfyUI server."""

from __future__ import annotations

import json

import pytest

from support.comfy_server import ComfyServer, shipped_workflow_prompt


def _nodes_of(prompt: dict, class_type: str) -> list[dict]:
    return [node for node in prompt.values() if node["class_type"] == class_type]


@pytest.mark.parametrize("workflow", ["gluegen_multilingual.json", "gluegen_t5_english.json"])
def test_shipped_workflow_makes_an_image(workflow, gluegen_models, comfy_server: ComfyServer):
    prompt = shipped_workflow_prompt(workflow, comfy_server)
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success"
    images = comfy_server.output_files(entry)
    assert len(images) == 1 and images[0].stat().st_size > 0
    if workflow == "gluegen_multilingual.json":
        assert "GlueNet router: 'fr' via detected" in comfy_server.log_tail(200_000)


def test_a_file_that_is_not_a_gluenet_fails_validation(gluegen_models, comfy_server: ComfyServer):
    prompt = shipped_workflow_prompt("gluegen_t5_english.json", comfy_server)
    _nodes_of(prompt, "X2IGlueNetLoader")[0]["inputs"]["gluenet_name"] = "not_a_gluenet.safetensors"
    status, body = comfy_server.queue(prompt)
    assert status == 400
    messages = json.dumps(body["node_errors"])
    assert "not_a_gluenet.safetensors" in messages and "not a GlueNet" in messages


def test_a_gluenet_for_another_encoder_is_refused_with_both_widths(gluegen_models, comfy_server: ComfyServer):
    prompt = shipped_workflow_prompt("gluegen_t5_english.json", comfy_server)
    _nodes_of(prompt, "X2IGlueNetLoader")[0]["inputs"]["gluenet_name"] = "gluenet_French_clip_overnorm_over3_noln.ckpt"
    status, body = comfy_server.queue(prompt)
    assert status == 200, body
    entry = comfy_server.wait(body["prompt_id"], timeout=600)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "X2IGlueGenTextEncode"
    assert "expects 77 tokens x 1024 channels, but text encoder 't5-v1_1-large' gives 77 x 48" in errors[0]["exception_message"]
