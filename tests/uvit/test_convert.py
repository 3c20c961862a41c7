"""The convert-uvit command: upstream .pth files (either token order) to this pack's safetensors, run
on the pack's folder without ComfyUI; the converted file loads into the same network."""

from __future__ import annotations

import subprocess
import sys

import torch

from support import REPO_ROOT
from x2i.uvit import UViT, UViTConfig, load_uvit, load_uvit_state_dict
from x2i.uvit.checkpoint import LAYOUT_UVIT, from_pack_layout

CONFIG = UViTConfig(image_size=8, patch_size=2, width=128, depth=4, heads=2, context_dim=32)  # 77 tokens: what .pth files imply


def run(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT), "convert-uvit", *args], cwd=cwd, capture_output=True, text=True)


def test_convert_uvit_writes_the_same_network_from_either_layout(tmp_path):
    torch.manual_seed(0)
    model = UViT(CONFIG).eval()
    torch.save(from_pack_layout(model.state_dict(), CONFIG, LAYOUT_UVIT), tmp_path / "mscoco_uvit_small.pth")
    torch.save(model.state_dict(), tmp_path / "nnet_ema.pth")
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = model(x, t, text)
    for source in ("mscoco_uvit_small.pth", "nnet_ema.pth"):
        out = tmp_path / f"{source}.safetensors"
        result = run(source, str(out), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "concat-early U-ViT, width 128, 5 blocks, 8×8 latents" in result.stderr
        loaded = load_uvit_state_dict(out)
        assert loaded.layout == "x2i" and loaded.config == CONFIG
        with torch.no_grad():
            torch.testing.assert_close(load_uvit(out)(x, t, text), expected)


def test_convert_uvit_refuses_other_files_with_a_message(tmp_path):
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "sd.ckpt")
    result = run("sd.ckpt", "out.safetensors", cwd=tmp_path)
    assert result.returncode == 1 and "a Stable Diffusion U-Net or checkpoint" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out.safetensors").exists()
    assert run("sd.ckpt", "out.pth", cwd=tmp_path).returncode == 2
