"""The shipped sound, point-cloud and sound+text workflows in a real ComfyUI server: core LoadAudio on a
generated WAV, a generated PLY, released-format AudioCLIP / GlueNet / ULIP files (random weights)."""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from comfy_harness import ComfyServer, shipped_workflow_prompt

from x2i.gluenet import GlueNetConfig, save_gluenet
from x2i.gluenet.modules import GlueNet
from x2i_testing import audioclip_full_checkpoint, fake_ulip_checkpoint, official_layout, random_state_dict


def _write_wav(path: Path, seconds: float = 2.5, rate: int = 22050) -> None:
    """A stereo 16-bit bark-like burst pattern at 22.05 kHz (LoadAudio must resample it to 44.1 kHz)."""
    t = np.arange(int(seconds * rate)) / rate
    bursts = (np.sin(2 * math.pi * 2.5 * t) > 0.6).astype(np.float64)
    tone = np.sin(2 * math.pi * 620 * t) * bursts + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    stereo = np.stack([tone, 0.7 * tone], axis=1)
    pcm = (stereo / np.abs(stereo).max() * 30000).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())


@pytest.fixture(scope="session")
def multimodal_models(comfy_models_dir: Path) -> Path:
    audio_encoders = comfy_models_dir / "audio_encoders"
    audioclip_full_checkpoint(audio_encoders / "AudioCLIP-Full-Training.pt")
    gluenets = comfy_models_dir / "gluenet"
    torch.save(random_state_dict(official_layout("Translator_w_head(16,77,64,768,4,5)"), seed=11),
               gluenets / "gluenet_sound2img_audioclip_us8k.ckpt")
    checkpoint, _ = fake_ulip_checkpoint("ulip1", seed=2)
    torch.save(checkpoint, comfy_models_dir / "point_encoders" / "pointbert_ULIP-1.pt")
    # No point-cloud GlueNet was released: a trainer-made one for ULIP-1's 512-d embedding (16 x 32).
    config = GlueNetConfig("translator_w_head", num_tokens=16, num_tokens_out=77, in_dim=32, out_dim=768, mult=2, depth=3)
    torch.manual_seed(0)
    save_gluenet(GlueNet(config), gluenets / "gluenet_pointbert_ulip1_sd15.safetensors")
    return comfy_models_dir


@pytest.fixture(scope="session")
def multimodal_inputs(comfy_server: ComfyServer) -> Path:
    inputs = comfy_server.input_dir
    inputs.mkdir(parents=True, exist_ok=True)
    _write_wav(inputs / "dog_bark.wav")
    chair = trimesh.util.concatenate([
        trimesh.creation.box(extents=(1.0, 0.1, 1.0), transform=trimesh.transformations.translation_matrix((0, 0.5, 0))),
        trimesh.creation.box(extents=(1.0, 1.0, 0.1), transform=trimesh.transformations.translation_matrix((0, 1.0, -0.45))),
        *(trimesh.creation.box(extents=(0.1, 0.5, 0.1), transform=trimesh.transformations.translation_matrix((x, 0.25, z)))
          for x in (-0.45, 0.45) for z in (-0.45, 0.45)),
    ])
    points, _ = trimesh.sample.sample_surface(chair, 6000, seed=0)
    trimesh.PointCloud(points).export(inputs / "chair.ply")
    return inputs


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
