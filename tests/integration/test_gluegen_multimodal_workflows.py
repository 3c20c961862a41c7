"""The shipped sound, point-cloud and sound+text workflows in a real ComfyUI server: core LoadAudio on a
generated WAV, a generated PLY, released-format AudioCLIP / GlueNet / ULIP files (random weights)."""

from __future__ import annotations

import pytest

from support.comfy_server import shipped_workflow_prompt


@pytest.mark.parametrize(
    ("workflow", "images"),
    [("gluegen_sound_to_image.json", 1), ("gluegen_pointcloud_to_image.json", 1), ("gluegen_sound_text_mix.json", 3)],
)
def test_shipped_multimodal_workflow_makes_images(workflow, images, multimodal_models, multimodal_inputs, comfy_server):
    entry = comfy_server.run(shipped_workflow_prompt(workflow, comfy_server))
    assert entry["status"]["status_str"] == "success"
    saved = comfy_server.output_files(entry)
    assert len(saved) == images and all(p.stat().st_size > 0 for p in saved)
    if workflow == "gluegen_pointcloud_to_image.json":
        previews = [item for out in entry["outputs"].values() for item in out.get("images", []) if item["type"] == "temp"]
        assert len(previews) >= 1  # the loader's rendered preview reached the UI


def test_a_text_gluenet_on_sound_names_both_sizes(multimodal_models, multimodal_inputs, gluegen_models, comfy_server):
    prompt = shipped_workflow_prompt("gluegen_sound_to_image.json", comfy_server)
    loader = next(n for n in prompt.values() if n["class_type"] == "X2IGlueNetLoader")
    loader["inputs"]["gluenet_name"] = "gluenet_French_clip_overnorm_over3_noln.ckpt"
    status, body = comfy_server.queue(prompt)
    assert status == 200, body
    entry = comfy_server.wait(body["prompt_id"], timeout=600)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "X2IGlueGenAudioEncode"
    assert "expects an embedding of 77 x 1024 = 78848 values, but encoder 'AudioCLIP-Full-Training.pt' gives 1024" in errors[0]["exception_message"]
