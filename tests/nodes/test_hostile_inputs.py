"""Graphs from strangers: names that climb out of ComfyUI's folders, numbers past their limits and choices
that are not offered are refused by ComfyUI's own validation of the pack's nodes (``execution.validate_inputs``,
what ``/prompt`` runs) and again when a node executes; symlinks a user placed inside a model folder keep
working. No message echoes a file's contents."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from support.models import random_state_dict, translator_noln_layout, write_lavibridge_folder

SECRET = "TOPSECRET-7f3a 1 2 3"


@pytest.fixture(scope="module")
def world(comfy, pack, installed, tiny_xlmr, tiny_t5, tiny_clap, tmp_path_factory):
    """Model folders holding one good file each, an input folder with a cloud and a symlink to a cloud kept
    elsewhere, and - outside every ComfyUI folder - a secret, a model folder, a bridge and a cloud."""
    import folder_paths
    from transformers import T5EncoderModel

    import nodes
    import x2i

    models = comfy["models"]
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text(SECRET + "\n")
    cloud = np.random.default_rng(0).random((600, 3)).astype(np.float32)
    np.save(outside / "cloud.npy", cloud)
    shutil.copytree(tiny_xlmr, outside / "xlm-roberta-outside")
    t5 = T5EncoderModel.from_pretrained(tiny_t5)
    write_lavibridge_folder(outside / "t5_unet", t5, "t5", adapter_in=t5.config.d_model)
    shutil.copytree(tiny_clap, outside / "clap-outside")
    torch.save(random_state_dict(translator_noln_layout(77, 64, 768, depth=1)), outside / "gluenet_French_outside.ckpt")

    for name in ("lavi_bridge", "audio_encoders", "point_encoders", "diffusion_models"):
        (models / name).mkdir(exist_ok=True)
        paths, extensions = folder_paths.folder_names_and_paths.get(name, ([], set()))
        folder_paths.folder_names_and_paths[name] = ([str(models / name), *paths], extensions or {".safetensors", ".pt", ".pth", ".ckpt"})
    write_lavibridge_folder(models / "lavi_bridge" / "t5_unet", t5, "t5", adapter_in=t5.config.d_model)
    shutil.copytree(tiny_clap, models / "audio_encoders" / "clap-tiny", dirs_exist_ok=True)
    # A user's symlinks: a model folder on another disk, and a cloud kept elsewhere.
    linked_encoder = models / "text_encoders" / "xlm-roberta-linked"
    if not linked_encoder.exists():
        linked_encoder.symlink_to(outside / "xlm-roberta-outside", target_is_directory=True)
    inputs = tmp_path_factory.mktemp("input")
    np.save(inputs / "chair.npy", cloud)
    (inputs / "linked.npy").symlink_to(outside / "cloud.npy")
    folder_paths.set_input_directory(str(inputs))

    extension = asyncio.run(x2i.comfy_entrypoint())
    for node in asyncio.run(extension.get_node_list()):  # as ComfyUI's custom-node loader registers them
        nodes.NODE_CLASS_MAPPINGS[node.GET_SCHEMA().node_id] = node
    return {"outside": outside, "inputs": inputs, "models": models}


def comfy_refuses(node_id: str, **inputs) -> str:
    """ComfyUI's own validation of one node with these widget values; the joined error text (fails if it passes)."""
    import execution

    valid, errors, _ = asyncio.run(execution.validate_inputs("hostile", {"1": {"class_type": node_id, "inputs": inputs}}, "1", {}))
    assert not valid, f"{node_id} accepted {inputs}"
    text = " | ".join(f"{error['message']}: {error['details']}" for error in errors)
    assert "TOPSECRET" not in text
    return text


def comfy_accepts(node_id: str, **inputs) -> None:
    import execution

    valid, errors, _ = asyncio.run(execution.validate_inputs("fine", {"1": {"class_type": node_id, "inputs": inputs}}, "1", {}))
    assert valid, errors


def climbing_names(world, target: str) -> list[str]:
    """Ways of naming ``outside/<target>``: relative from each model folder depth, and absolute."""
    absolute = str(world["outside"] / target)
    return [os.path.relpath(absolute, world["inputs"]), "../" * 12 + absolute.lstrip("/"), absolute]


# --- names ----------------------------------------------------------------------------------------------


def test_point_cloud_names_cannot_leave_the_input_folder_and_symlinks_inside_it_work(world, pack):
    for name in climbing_names(world, "secret.txt") + climbing_names(world, "cloud.npy"):
        message = comfy_refuses("X2IPointCloudLoader", file=name, surface_points=10000, preview_up_axis="y")
        assert "not found in ComfyUI's input folder" in message
        with pytest.raises(FileNotFoundError, match="not found in ComfyUI's input folder"):
            pack.X2IPointCloudLoader.execute(name, 10000, "y")
    comfy_accepts("X2IPointCloudLoader", file="linked.npy", surface_points=10000, preview_up_axis="y")
    cloud = pack.X2IPointCloudLoader.execute("linked.npy", 10000, "y").result[0]
    assert len(cloud) == 600


def test_model_folder_names_cannot_leave_their_folders_and_symlinks_inside_them_work(world, pack):
    for node_id, name_input in (("X2ITextEncoderLoader", "encoder_name"), ("X2ILanguageModelLoader", "model_name")):
        for name in climbing_names(world, "xlm-roberta-outside"):
            assert f"{name_input}: " in comfy_refuses(node_id, **{name_input: name, "dtype": "auto"})
        comfy_accepts(node_id, **{name_input: "xlm-roberta-linked", "dtype": "auto"})
    with pytest.raises(FileNotFoundError, match="not found in x2i_text_encoders, text_encoders"):
        pack.X2ITextEncoderLoader.execute(climbing_names(world, "xlm-roberta-outside")[0], "auto")
    encoder = pack.X2ITextEncoderLoader.execute("xlm-roberta-linked", "auto").result[0]
    assert encoder.model.hidden_size == 64
    for name in climbing_names(world, "clap-outside"):
        assert "encoder_name: " in comfy_refuses("X2IAudioEncoderLoader", encoder_name=name, dtype="auto")
        with pytest.raises(FileNotFoundError):
            pack.X2IAudioEncoderLoader.execute(name, "auto")


def test_bridge_and_weight_file_names_cannot_leave_their_folders(world, pack):
    for name in climbing_names(world, "t5_unet"):
        assert "not found in models/lavi_bridge" in pack.X2ILaViBridgeLoader.validate_inputs(
            bridge_name=name, unet_strength=1.0, text_strength=1.0, model=None, language_model=None)
        with pytest.raises(FileNotFoundError, match="not found in models/lavi_bridge"):
            pack.X2ILaViBridgeLoader.execute(None, None, name, 1.0, 1.0)
    assert pack.X2ILaViBridgeLoader.validate_inputs(bridge_name="t5_unet", unet_strength=1.0, text_strength=1.0) is True
    for name in climbing_names(world, "gluenet_French_outside.ckpt"):
        assert "not found in models/gluenet" in comfy_refuses("X2IGlueNetLoader", gluenet_name=name, language="from file")
    for name in climbing_names(world, "gluenet_French_outside.ckpt"):
        assert "encoder_name: " in comfy_refuses("X2IPointCloudEncoderLoader", encoder_name=name, dtype="auto")
        assert "not found in models/diffusion_models" in comfy_refuses("X2IUViTLoader", uvit_name=name, weight_dtype="default")


# --- numbers and choices --------------------------------------------------------------------------------


@pytest.mark.parametrize(("node_id", "inputs", "message"), [
    ("X2IPointCloudLoader", dict(file="chair.npy", surface_points=10**10, preview_up_axis="y"),
     "surface_points must be from 512 to 1000000, got 10000000000"),
    ("X2IPointCloudLoader", dict(file="chair.npy", surface_points=10000, preview_up_axis="w"),
     "preview_up_axis: 'w' is not one of the choices (y, z)"),
    ("X2ITextEncoderLoader", dict(encoder_name="xlm-roberta-tiny", dtype="fp64"), "dtype: 'fp64' is not one of the choices"),
    ("X2IGlueNetLoader", dict(gluenet_name="gluenet_French_clip_overnorm_over3_noln.ckpt", language="klingon"),
     "language: 'klingon' is not one of the choices"),
    ("X2IUViTLoader", dict(uvit_name=123, weight_dtype="default"), "uvit_name must be one of the choices, got int '123'"),
])
def test_numbers_and_choices_past_the_schema_are_refused_by_comfyui_validation(world, node_id, inputs, message):
    assert message in comfy_refuses(node_id, **inputs)


def test_numbers_that_arrive_through_links_are_checked_when_the_node_runs(world, pack):
    """ComfyUI validates only widget values; a number from another node's output reaches execute unchecked."""
    assert "unet_strength must be from -4.0 to 4.0, got 1000000000.0" in pack.X2ILaViBridgeLoader.validate_inputs(
        bridge_name="t5_unet", unet_strength=1e9, text_strength=1.0)
    with pytest.raises(ValueError, match=r"unet_strength must be from -4.0 to 4.0, got 1000000000.0"):
        pack.X2ILaViBridgeLoader.execute(None, None, "t5_unet", 1e9, 1.0)
    with pytest.raises(ValueError, match="k must be from 0 to 38, got 1000000"):
        pack.X2ITopKFusion.execute([[torch.zeros(1, 77, 8), {}]], [[torch.zeros(1, 77, 8), {}]], 10**6)


def test_a_huge_block_spec_is_refused_at_once(world, pack):
    import time

    started = time.perf_counter()
    assert "block 3000000 is past the last block" in pack.X2IBlockConditioning.validate_inputs(blocks="input:0-3000000")
    assert time.perf_counter() - started < 0.5


def test_a_gluenet_or_bridge_replaced_on_disk_is_loaded_again(world, pack):
    """ComfyUI caches a loader's output by its inputs plus fingerprint_inputs: the file's state must be in it."""
    shared = world["models"] / "gluenet" / "gluenet_French_clip_overnorm_over3_noln.ckpt"
    gluenet = Path(shutil.copy(shared, shared.with_name("gluenet_French_replaced.ckpt")))  # other tests read the shared one
    before = pack.X2IGlueNetLoader.fingerprint_inputs(gluenet_name=gluenet.name, language="from file")
    replacement = gluenet.with_name("replacement.tmp")
    torch.save(random_state_dict(translator_noln_layout(77, 64, 768, depth=2), seed=5), replacement)
    os.replace(replacement, gluenet)
    assert pack.X2IGlueNetLoader.fingerprint_inputs(gluenet_name=gluenet.name, language="from file") != before

    bridge = world["models"] / "lavi_bridge" / "t5_unet"
    before = pack.X2ILaViBridgeLoader.fingerprint_inputs(bridge_name="t5_unet", unet_strength=1.0, text_strength=1.0)
    lora = bridge / "lora_vis.pt"
    lora.write_bytes(lora.read_bytes())  # a fresh copy: same name, new file
    os.utime(lora, ns=(lora.stat().st_atime_ns, lora.stat().st_mtime_ns + 10**9))
    assert pack.X2ILaViBridgeLoader.fingerprint_inputs(bridge_name="t5_unet", unet_strength=1.0, text_strength=1.0) != before
