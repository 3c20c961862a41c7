"""The shipped LaVi-Bridge workflows in a real ComfyUI server (released-format bridge files, random
weights), sampled by KSampler, then with a second ordinary LoRA stacked on the bridged MODEL.

The PixArt workflow runs on a 2-block PixArt-XL-2-512x512 (the released key layout; ComfyUI counts
the blocks from the keys, and the bridge's LoRA list is written for 2 blocks) so a CPU samples it
in seconds, with the SD VAE taken from the SD1.5 test checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, T5EncoderModel

from support.comfy_server import ComfyServer, shipped_workflow_prompt
from support.models import (
    make_llama_folder,
    write_lavibridge_folder,
    write_pixart_checkpoint,
    write_pixart_lora_vis,
    write_vae_from_checkpoint,
)

SECOND_LORA = "second_lora.safetensors"
# A kohya-style LoRA on one cross-attention layer, named the way ComfyUI maps SD1.x LoRAs.
SECOND_LORA_KEY = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
PIXART_TEST_DEPTH = 2
# ComfyUI's PixArt derives its position-embedding base size from round(latent side / 64): at least
# 33 latent pixels, or it divides by zero. 320 px is the smallest round size above that.
PIXART_TEST_SIZE = 320


@pytest.fixture(scope="session")
def lavibridge_models(lavibridge_t5_models: Path) -> Path:
    """lavibridge_t5_models (conftest) plus the Llama-2 bridge and a second, ordinary LoRA."""
    comfy_models_dir = lavibridge_t5_models
    llama_folder = make_llama_folder(comfy_models_dir / "text_encoders" / "Llama-2-7b-hf")
    llama = AutoModel.from_pretrained(llama_folder)
    write_lavibridge_folder(comfy_models_dir / "lavi_bridge" / "llama2_unet", llama, "llama", adapter_in=llama.config.hidden_size, seed=1)
    save_file(
        {f"{SECOND_LORA_KEY}.lora_up.weight": torch.randn(320, 4) * 0.01,
         f"{SECOND_LORA_KEY}.lora_down.weight": torch.randn(4, 768) * 0.01,
         f"{SECOND_LORA_KEY}.alpha": torch.tensor(4.0)},
        str(comfy_models_dir / "loras" / SECOND_LORA),
    )
    return comfy_models_dir


@pytest.fixture(scope="session")
def pixart_models(lavibridge_models: Path, sd15_checkpoint: Path) -> Path:
    """The files lavibridge_t5_pixart.json names: the PixArt transformer, the SD VAE, the t5_transformer bridge."""
    write_pixart_checkpoint(lavibridge_models / "diffusion_models" / "PixArt-XL-2-512x512.safetensors", depth=PIXART_TEST_DEPTH)
    write_vae_from_checkpoint(sd15_checkpoint, lavibridge_models / "vae" / "vae-ft-ema-560000-ema-pruned.safetensors")
    t5 = T5EncoderModel.from_pretrained(lavibridge_models / "text_encoders" / "t5-large")
    folder = write_lavibridge_folder(lavibridge_models / "lavi_bridge" / "t5_transformer", t5, "t5", adapter_in=t5.config.d_model,
                                     seed=2, pixart=True)
    write_pixart_lora_vis(folder, depth=PIXART_TEST_DEPTH, seed=2)
    return lavibridge_models


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
