"""GlueNets from this pack's trainer, loaded by the nodes inside ComfyUI: text (with the router's
language from the file), sound and point clouds give SD1.x CONDITIONING equal to the trained network, and a text
GlueNet trained for SDXL gives SDXL CONDITIONING (tokens and pooled vector) equal to it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from support.models import make_clap_folder
from support.training import (
    make_clip_tokenizer,
    parallel_corpus,
    write_parallel_files,
    write_point_cloud_folder,
    write_sd1_checkpoint,
    write_sdxl_checkpoint,
    write_small_ulip_checkpoint,
    write_urbansound8k,
)
from x2i.training import Distributed, RunSettings, section, train
from x2i.training.gluenet_task import GlueNetTask


def train_gluenet(root: Path, name: str, data: dict, source: str, model: dict | None = None, sdxl: bool = False) -> Path:
    """A few steps of a real run with the SD1-wide (768) toy CLIP target, or the real-width SDXL one; returns the
    exported file."""
    target = {"kind": "sdxl", "clip": str(root / "sdxl.safetensors")} if sdxl else {"clip": str(root / "sd15.safetensors")}
    raw = {
        "run": {"output_dir": str(root / name), "max_steps": 3, "batch_size": 4, "precision": "fp32", "device": "cpu"},
        "data": data,
        "source": {"encoder": source},
        "target": {**target, "tokenizer": str(root / "sd1_tokenizer")},
        "model": {"depth": 3 if data["modality"] != "text" else 1, "mult": 1, **(model or {})},
        "export": {"name": name},
    }
    result = train(GlueNetTask.from_config(raw), section(raw, "run", RunSettings), dist=Distributed())
    return result.exported[0]


@pytest.fixture(scope="module")
def trained(comfy, tiny_xlmr, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread beats two on a shared machine
    try:
        return _train_all(comfy, tiny_xlmr, tmp_path_factory.mktemp("trained_gluenets"))
    finally:
        torch.set_num_threads(threads)


def _train_all(comfy, tiny_xlmr, root: Path) -> Path:
    write_sd1_checkpoint(root / "sd15.safetensors", hidden=768)
    make_clip_tokenizer(root / "sd1_tokenizer")
    models = comfy["models"]
    for folder in ("audio_encoders", "point_encoders"):
        (models / folder).mkdir(exist_ok=True)
        comfy["folder_paths"].folder_names_and_paths[folder] = ([str(models / folder)], {".pt", ".ckpt", ".pth", ".safetensors"})
    source, target = write_parallel_files(root / "text", parallel_corpus()[:24])
    text_data = {"modality": "text", "source_file": str(source), "target_file": str(target)}
    files = {"text": train_gluenet(root, "gluenet_trained_fr", text_data, str(tiny_xlmr), {"language": "fr"})}
    write_sdxl_checkpoint(root / "sdxl.safetensors", layers=2)
    files["sdxl"] = train_gluenet(root, "gluenet_trained_fr_sdxl", text_data, str(tiny_xlmr), {"language": "fr"}, sdxl=True)
    clap = make_clap_folder(models / "audio_encoders" / "clap-tiny", projection_dim=32)
    us8k = write_urbansound8k(root / "us8k", clips_per_fold=1, folds=3)
    files["audio"] = train_gluenet(root, "gluenet_trained_sound", {"modality": "audio", "audio_dir": str(us8k)}, str(clap),
                                   {"token_width": 8})
    ulip = write_small_ulip_checkpoint(models / "point_encoders" / "ulip_small.pt")
    clouds = write_point_cloud_folder(root / "clouds", per_shape=2)
    files["points"] = train_gluenet(root, "gluenet_trained_points", {"modality": "point_cloud", "point_cloud_dir": str(clouds)}, str(ulip))
    shutil.copytree(tiny_xlmr, models / "text_encoders" / "xlm-roberta-tiny", dirs_exist_ok=True)
    for path in files.values():
        shutil.copy(path, models / "gluenet" / path.name)
    return root


def test_trained_text_gluenet_in_the_loader_router_and_encode_nodes(pack, trained):
    loader = pack.X2IGlueNetLoader
    assert loader.validate_inputs(gluenet_name="gluenet_trained_fr.safetensors", language="from file") is True
    gluenet = loader.execute("gluenet_trained_fr.safetensors", "from file").result[0]
    assert gluenet.language == "fr"  # from the file's metadata, for the router
    encoder = pack.X2ITextEncoderLoader.execute("xlm-roberta-tiny", "auto").result[0]
    router = pack.X2IGlueNetRouter.execute("auto", gluenet_1=gluenet).result[0]
    prompt = "un chat rouge au jardin"
    (conditioning,) = pack.X2IGlueGenTextEncode.execute(encoder, router, prompt).result
    tokens = conditioning[0][0]
    assert tokens.shape == (1, 77, 768) and torch.isfinite(tokens).all()
    model = gluenet.patcher.model
    with torch.no_grad():
        expected = model.translate(encoder.model.encode([prompt]))  # GlueNet(XLM-R / 3) x tensor_norm / 2
    torch.testing.assert_close(tokens, expected.cpu(), atol=1e-5, rtol=1e-5)


def test_trained_sound_gluenet_gives_conditioning(pack, trained):
    gluenet = pack.X2IGlueNetLoader.execute("gluenet_trained_sound.safetensors", "from file").result[0]
    encoder = pack.X2IAudioEncoderLoader.execute("clap-tiny", "fp32").result[0]
    waveform = torch.sin(torch.linspace(0, 2000, 16000))[None, None].repeat(2, 1, 1) * torch.tensor([0.3, 0.8])[:, None, None]
    (conditioning,) = pack.X2IGlueGenAudioEncode.execute(encoder, gluenet, {"waveform": waveform, "sample_rate": 16000}).result
    tokens = conditioning[0][0]
    assert tokens.shape == (2, 77, 768) and torch.isfinite(tokens).all()
    with torch.no_grad():
        expected = gluenet.patcher.model.translate(encoder.model.encode_audio(waveform, 16000))
    torch.testing.assert_close(tokens, expected.cpu(), atol=1e-5, rtol=1e-5)


def test_trained_point_cloud_gluenet_gives_conditioning(pack, trained, comfy, tmp_path):
    import folder_paths

    folder_paths.set_input_directory(str(tmp_path))
    shutil.copy(trained / "clouds" / "sphere-0.npy", tmp_path / "ball.npy")
    cloud = pack.X2IPointCloudLoader.execute("ball.npy", 4096, "y").result[0]
    encoder = pack.X2IPointCloudEncoderLoader.execute("ulip_small.pt", "fp32").result[0]
    gluenet = pack.X2IGlueNetLoader.execute("gluenet_trained_points.safetensors", "from file").result[0]
    (conditioning,) = pack.X2IGlueGenPointCloudEncode.execute(encoder, gluenet, cloud).result
    tokens = conditioning[0][0]
    assert tokens.shape == (1, 77, 768) and torch.isfinite(tokens).all()
    with torch.no_grad():
        expected = gluenet.patcher.model.translate(encoder.model.encode_points(cloud.to_tensor().unsqueeze(0)))
    torch.testing.assert_close(tokens, expected.cpu(), atol=1e-5, rtol=1e-5)


def test_trained_sdxl_gluenet_gives_sdxl_conditioning_equal_to_the_network(pack, trained):
    from x2i.families import SDXL_SIZE_CONDITIONING

    gluenet = pack.X2IGlueNetLoader.execute("gluenet_trained_fr_sdxl.safetensors", "from file").result[0]
    assert gluenet.language == "fr" and gluenet.patcher.model.config.family.name == "SDXL"
    encoder = pack.X2ITextEncoderLoader.execute("xlm-roberta-tiny", "auto").result[0]
    router = pack.X2IGlueNetRouter.execute("auto", gluenet_1=gluenet).result[0]
    prompt = "un chien bleu sur la plage"
    ((tokens, options),) = pack.X2IGlueGenTextEncode.execute(encoder, router, prompt).result[0]
    assert tokens.shape == (1, 77, 2048) and options["pooled_output"].shape == (1, 1280)
    assert {k: options[k] for k in SDXL_SIZE_CONDITIONING} == SDXL_SIZE_CONDITIONING
    with torch.no_grad():
        expected_tokens, expected_pooled = gluenet.patcher.model.translate_with_pooled(encoder.model.encode([prompt]))
    torch.testing.assert_close(tokens, expected_tokens.cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(options["pooled_output"], expected_pooled.cpu(), atol=1e-5, rtol=1e-5)
