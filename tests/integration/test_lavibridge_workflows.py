"""The shipped LaVi-Bridge workflows in a real ComfyUI server (released-format bridge files, random
weights), sampled by KSampler, then with a second ordinary LoRA stacked on the bridged MODEL.

The PixArt workflow runs on a 2-block PixArt-XL-2-512x512 (the released key layout; ComfyUI counts
the blocks from the keys, and the bridge's LoRA list is written for 2 blocks) so a CPU samples it
in seconds, with the SD VAE taken from the SD1.5 test checkpoint."""

from __future__ import annotations

import pytest

from support.comfy_server import ComfyServer, shipped_workflow_prompt
from support.workflow_models import PIXART_TEST_SIZE, SECOND_LORA


@pytest.mark.parametrize("workflow", ["lavibridge_t5_sd15.json", "lavibridge_llama2_sd15.json"])
def test_shipped_lavibridge_workflow_samples_with_ksampler(workflow, lavibridge_models, comfy_server: ComfyServer):
    entry = comfy_server.run(shipped_workflow_prompt(workflow, comfy_server))
    assert entry["status"]["status_str"] == "success"
    assert len(comfy_server.output_files(entry)) == 1


def test_a_second_lora_stacks_on_the_bridged_model(lavibridge_models, comfy_server: ComfyServer):
    prompt = shipped_workflow_prompt("lavibridge_t5_sd15.json", comfy_server)
    bridge_id = next(i for i, n in prompt.items() if n["class_type"] == "X2ILaViBridgeLoader")
    sampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")
    prompt["900"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": [bridge_id, 0], "lora_name": SECOND_LORA, "strength_model": 0.8}}
    sampler["inputs"]["model"] = ["900", 0]
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success"
    assert len(comfy_server.output_files(entry)) == 1
    assert "lora key not loaded" not in comfy_server.log_tail(400_000)


def test_shipped_pixart_workflow_samples_with_ksampler(pixart_models, comfy_server: ComfyServer):
    prompt = shipped_workflow_prompt("lavibridge_t5_pixart.json", comfy_server, size=PIXART_TEST_SIZE)
    assert {n["class_type"] for n in prompt.values()} >= {"UNETLoader", "VAELoader", "X2ILaViBridgeLoader", "KSampler"}
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success"
    assert len(comfy_server.output_files(entry)) == 1
    log = comfy_server.log_tail(400_000)
    assert "loaded as PixArt-Σ; using the SD latent scale" in log
    assert "lora key not loaded" not in log
