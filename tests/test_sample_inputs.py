"""The sample inputs in workflows/inputs/: made by tests/support/sample_inputs.py, readable by the pack's own
loaders, and copied into ComfyUI's input folder without ever overwriting a user's file."""

from __future__ import annotations

import os
from pathlib import Path

import soundfile
import torch
import trimesh

from support import REPO_ROOT
from support.sample_inputs import BARK_FILE, CHAIR_FILE, chair_mesh, write_wav
from x2i.encoders.audio_input import to_gluegen_waveform
from x2i.encoders.pointcloud import load_point_cloud
from x2i.weights import copy_missing_files

SAMPLES = REPO_ROOT / "workflows" / "inputs"


def test_the_shipped_sound_is_the_generated_one_and_reads_as_gluegen_input(tmp_path: Path) -> None:
    assert (SAMPLES / BARK_FILE).read_bytes() == write_wav(tmp_path / BARK_FILE).read_bytes()
    samples, rate = soundfile.read(SAMPLES / BARK_FILE, dtype="float32", always_2d=True)
    assert (rate, samples.shape) == (22050, (44100, 2))

    waveform = to_gluegen_waveform(torch.from_numpy(samples.T).unsqueeze(0), rate)

    assert waveform.shape[-1] == 4 * 44100  # GlueGen's 4 s at 44.1 kHz, the 2 s sound padded
    assert waveform.abs().max() > 1000  # scaled to the int16 range, as GlueGen feeds AudioCLIP


def test_the_shipped_chair_is_the_generated_mesh_and_loads_as_a_point_cloud() -> None:
    shipped = trimesh.load(SAMPLES / CHAIR_FILE, force="mesh")
    made = chair_mesh()
    # PLY stores float32 vertices and trimesh merges duplicates on load: the same surface, not the same arrays.
    assert len(shipped.faces) == len(made.faces) == 72
    assert torch.allclose(torch.tensor(shipped.bounds), torch.tensor(made.bounds), atol=1e-6)
    assert abs(shipped.area - made.area) < 1e-5

    cloud = load_point_cloud(SAMPLES / CHAIR_FILE, surface_points=2048)

    assert cloud.points.shape == (2048, 3)
    low, high = torch.tensor(made.bounds, dtype=torch.float32)
    assert bool((cloud.points >= low - 1e-5).all() and (cloud.points <= high + 1e-5).all())  # on the chair's surface
    assert cloud.points[:, 1].max() > 1.4 and cloud.points[:, 1].min() < 0.1  # sampled from the legs to the back's top


def test_samples_are_copied_once_and_never_over_a_users_file(tmp_path: Path) -> None:
    (tmp_path / CHAIR_FILE).write_text("the user's own chair")

    assert copy_missing_files(SAMPLES, tmp_path) == [BARK_FILE]
    assert (tmp_path / BARK_FILE).read_bytes() == (SAMPLES / BARK_FILE).read_bytes()
    assert (tmp_path / CHAIR_FILE).read_text() == "the user's own chair"
    assert copy_missing_files(SAMPLES, tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == sorted([BARK_FILE, CHAIR_FILE])  # no temp files left behind
