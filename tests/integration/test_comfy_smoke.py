"""Harness self-test: a core-nodes-only txt2img workflow runs on the test server."""

from __future__ import annotations

from typing import Any

from support.comfy_server import ComfyServer
from support.ui_workflow import ui_to_api

# Saved-by-the-frontend shape (schema 0.4): links are
# [id, origin_id, origin_slot, target_id, target_slot, type]; widget inputs also
# appear in "inputs" with a "widget" key and link null, as frontend 1.27 saves them.
TXT2IMG_UI: dict[str, Any] = {
    "last_node_id": 7,
    "last_link_id": 9,
    "nodes": [
        {"id": 4, "type": "CheckpointLoaderSimple", "mode": 0, "inputs": [],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]},
                     {"name": "CLIP", "type": "CLIP", "links": [3, 5]},
                     {"name": "VAE", "type": "VAE", "links": [8]}],
         "widgets_values": ["v1-5-pruned-emaonly.safetensors"]},
        {"id": 6, "type": "CLIPTextEncode", "mode": 0,
         "inputs": [{"name": "clip", "type": "CLIP", "link": 3},
                    {"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": None}],
         "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [4]}],
         "widgets_values": ["a watercolor fox in the snow"]},
        {"id": 7, "type": "CLIPTextEncode", "mode": 0,
         "inputs": [{"name": "clip", "type": "CLIP", "link": 5}],
         "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [6]}],
         "widgets_values": ["blurry, low quality"]},
        {"id": 5, "type": "EmptyLatentImage", "mode": 0, "inputs": [],
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [2]}],
         "widgets_values": [64, 64, 1]},
        {"id": 3, "type": "KSampler", "mode": 0,
         "inputs": [{"name": "model", "type": "MODEL", "link": 1},
                    {"name": "positive", "type": "CONDITIONING", "link": 4},
                    {"name": "negative", "type": "CONDITIONING", "link": 6},
                    {"name": "latent_image", "type": "LATENT", "link": 2}],
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [7]}],
         # seed, control_after_generate (UI only), steps, cfg, sampler, scheduler, denoise
         "widgets_values": [42, "fixed", 2, 7.0, "euler", "normal", 1.0]},
        {"id": 8, "type": "VAEDecode", "mode": 0,
         "inputs": [{"name": "samples", "type": "LATENT", "link": 7},
                    {"name": "vae", "type": "VAE", "link": 8}],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [9]}],
         "widgets_values": []},
        {"id": 9, "type": "SaveImage", "mode": 0,
         "inputs": [{"name": "images", "type": "IMAGE", "link": 9}],
         "outputs": [],
         "widgets_values": ["x2i_smoke"]},
    ],
    "links": [
        [1, 4, 0, 3, 0, "MODEL"],
        [2, 5, 0, 3, 3, "LATENT"],
        [3, 4, 1, 6, 0, "CLIP"],
        [4, 6, 0, 3, 1, "CONDITIONING"],
        [5, 4, 1, 7, 0, "CLIP"],
        [6, 7, 0, 3, 2, "CONDITIONING"],
        [7, 3, 0, 8, 0, "LATENT"],
        [8, 4, 2, 8, 1, "VAE"],
        [9, 8, 0, 9, 0, "IMAGE"],
    ],
    "groups": [],
    "config": {},
    "extra": {},
    "version": 0.4,
}


def test_core_txt2img_workflow_saves_a_png(comfy_server: ComfyServer) -> None:
    prompt = ui_to_api(TXT2IMG_UI, comfy_server.object_info())

    # The conversion itself: widgets by name, UI-only control value dropped, links as [id, slot].
    assert prompt["3"]["inputs"] == {
        "seed": 42, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
        "latent_image": ["5", 0],
    }

    entry = comfy_server.run(prompt, timeout=300)

    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    images = comfy_server.output_files(entry)
    assert len(images) == 1
    assert images[0].suffix == ".png"
    assert images[0].is_file()
