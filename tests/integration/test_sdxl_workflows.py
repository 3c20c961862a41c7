"""The shipped SDXL workflows in a real ComfyUI server, sampled by KSampler on a random-weight SDXL-family
checkpoint (Segmind Vega's depths, SDXL's widths: tests/support/sdxl_checkpoint.py): multilingual text through
a router of SDXL GlueNets with a negative prompt, sound, and T5 through a LaVi-Bridge trained for SDXL. A GlueNet
for SD1.x on the SDXL model is refused when sampling starts and the SDXL bridge on SD1.5 when it loads, each
naming both, and the server keeps serving."""

from __future__ import annotations

import pytest

from support.comfy_server import ComfyServer, shipped_workflow_prompt

SDXL_WORKFLOWS = ["gluegen_multilingual_sdxl.json", "gluegen_sound_to_image_sdxl.json", "lavibridge_t5_sdxl.json"]


@pytest.mark.parametrize("workflow", SDXL_WORKFLOWS)
def test_shipped_sdxl_workflow_makes_an_image(workflow, sdxl_bridge_models, multimodal_inputs, comfy_server: ComfyServer):
    entry = comfy_server.run(shipped_workflow_prompt(workflow, comfy_server))
    assert entry["status"]["status_str"] == "success"
    images = comfy_server.output_files(entry)
    assert len(images) == 1 and images[0].stat().st_size > 0
    if workflow == "gluegen_multilingual_sdxl.json":
        assert "GlueNet router: 'fr' via detected" in comfy_server.log_tail(200_000)


def test_an_sd1_gluenet_on_the_sdxl_model_is_refused_naming_both(sdxl_models, comfy_server: ComfyServer):
    prompt = shipped_workflow_prompt("gluegen_multilingual_sdxl.json", comfy_server)
    for node in prompt.values():
        if node["class_type"] == "X2IGlueNetLoader":
            language = "Chinese" if "Chinese" in node["inputs"]["gluenet_name"] else "French"
            node["inputs"]["gluenet_name"] = f"gluenet_{language}_clip_overnorm_over3_noln.ckpt"  # released, SD1.x
    status, body = comfy_server.queue(prompt)
    assert status == 200, body
    entry = comfy_server.wait(body["prompt_id"], timeout=600)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "KSampler"
    assert ("This X2I conditioning (from a GlueNet or a LaVi-Bridge) is for SD1.x (768-wide tokens), but the model is "
            "Segmind_Vega, an SDXL model (2048-wide + 1280-wide pooled): use one made for SDXL, or an SD1.x checkpoint"
            ) in errors[0]["exception_message"]
    # The server keeps serving: the shipped workflow runs right after.
    assert comfy_server.run(shipped_workflow_prompt("gluegen_multilingual_sdxl.json", comfy_server))["status"]["status_str"] == "success"


def test_the_sdxl_bridge_on_an_sd15_checkpoint_is_refused_naming_both(sdxl_bridge_models, sd15_checkpoint,
                                                                       comfy_server: ComfyServer):
    prompt = shipped_workflow_prompt("lavibridge_t5_sdxl.json", comfy_server)
    next(n for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple")["inputs"]["ckpt_name"] = (
        "v1-5-pruned-emaonly.safetensors")
    status, body = comfy_server.queue(prompt)
    assert status == 200, body
    entry = comfy_server.wait(body["prompt_id"], timeout=600)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "X2ILaViBridgeLoader"
    message = errors[0]["exception_message"]
    assert "t5_sdxl.safetensors is a LaVi-Bridge trained for an SDXL U-Net" in message and "SD1.x" in message, message
