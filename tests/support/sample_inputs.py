"""The sample inputs the pack ships in workflows/inputs/ (copied into ComfyUI's input folder when the pack
loads), made here from scratch so they are the pack's own: a bark-like sound and a chair mesh.

Run as a script to write them again: ``python tests/support/sample_inputs.py workflows/inputs``."""

from __future__ import annotations

import math
import sys
import wave
from pathlib import Path

import numpy as np
import trimesh

BARK_FILE = "dog_bark.wav"
CHAIR_FILE = "chair.ply"


def write_wav(path: Path, seconds: float = 2.0, rate: int = 22050, pitch: float = 620.0) -> Path:
    """Stereo 16-bit bursts of a tone with a little noise at 22.05 kHz, like a dog barking 2.5 times a second
    (LoadAudio resamples it to 44.1 kHz for GlueGen)."""
    t = np.arange(int(seconds * rate)) / rate
    bursts = (np.sin(2 * math.pi * 2.5 * t) > 0.6).astype(np.float64)
    tone = np.sin(2 * math.pi * pitch * t) * bursts + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    stereo = np.stack([tone, 0.7 * tone], axis=1)
    pcm = (stereo / np.abs(stereo).max() * 30000).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return path


def chair_mesh() -> trimesh.Trimesh:
    """A chair of six boxes: seat, back and four legs (1 unit wide, the seat at height 0.5)."""
    def box(extents, centre):
        return trimesh.creation.box(extents=extents, transform=trimesh.transformations.translation_matrix(centre))

    legs = [box((0.1, 0.5, 0.1), (x, 0.25, z)) for x in (-0.45, 0.45) for z in (-0.45, 0.45)]
    return trimesh.util.concatenate([box((1.0, 0.1, 1.0), (0, 0.5, 0)), box((1.0, 1.0, 0.1), (0, 1.0, -0.45)), *legs])


def write_chair(path: Path) -> Path:
    chair_mesh().export(path)
    return path


def write_samples(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_wav(folder / BARK_FILE), write_chair(folder / CHAIR_FILE)]


if __name__ == "__main__":
    for written in write_samples(Path(sys.argv[1])):
        sys.stdout.write(f"{written} {written.stat().st_size} bytes\n")
