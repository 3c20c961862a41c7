"""Builders for the GlueNet-trainer tests: tiny target and source encoders in their real formats,
and generated data whose answer is known (a word-for-word "translation", sounds per class, shapes
with captions)."""

from __future__ import annotations

import csv
import json
import math
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import support  # noqa: F401  (imports this repository as the package x2i)
from support import REPO_ROOT

# ---- CLIP (the target) -----------------------------------------------------------------------------


def make_clip_tokenizer(folder: Path | None = None):
    """A CLIP BPE tokenizer without merges: every byte-level character, plain and word-final
    (``</w>``), plus CLIP's start/end tokens; pads with the end token like SD1's."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        # vocab.json + merges.txt as openai/clip-vit-large-patch14 and ComfyUI's sd1_tokenizer ship them.
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 77,
        }), encoding="utf-8")
    return tokenizer


def make_clip_text_model(hidden: int = 32, layers: int = 1, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=514, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), max_position_embeddings=77, hidden_act="quick_gelu",  # OpenAI CLIP: 64-wide heads
        bos_token_id=512, eos_token_id=513, pad_token_id=513,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def make_clip_text_folder(folder: Path, hidden: int = 32, layers: int = 1, seed: int = 0) -> Path:
    """A Hugging Face CLIPTextModel folder (config, weights, tokenizer)."""
    model = make_clip_text_model(hidden, layers, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    make_clip_tokenizer(folder)
    return folder


def write_sd1_checkpoint(path: Path, hidden: int = 32, layers: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """An SD1.x-style single file: the CLIP text encoder under ``cond_stage_model.transformer.`` plus
    U-Net/VAE decoys; returns the CLIP state_dict (CLIPTextModel keys)."""
    from safetensors.torch import save_file

    model = make_clip_text_model(hidden, layers, seed)
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    # The released SD1.x layout: cond_stage_model.transformer.text_model.* (transformers 4 names).
    tensors = {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v.half() for k, v in state.items()}
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3).half()
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return {k: v.half().float() for k, v in state.items()}


# ---- parallel text whose translation is a function ----------------------------------------------

COLOURS = {"rouge": "red", "bleu": "blue", "vert": "green", "jaune": "yellow", "noir": "black", "blanc": "white"}
ANIMALS = {"chat": "cat", "chien": "dog", "cheval": "horse", "oiseau": "bird", "lapin": "rabbit", "poisson": "fish"}
PLACES = {"au jardin": "in a garden", "sur la plage": "on a beach", "en ville": "in a city", "dans la neige": "in the snow",
          "sous la pluie": "in the rain"}


def parallel_corpus() -> list[tuple[str, str]]:
    """Every (French, English) caption of animal x colour x place: 180 pairs, English a word-for-word
    function of the French."""
    pairs = []
    for animal_fr, animal_en in ANIMALS.items():
        for colour_fr, colour_en in COLOURS.items():
            for place_fr, place_en in PLACES.items():
                pairs.append((f"un {animal_fr} {colour_fr} {place_fr}", f"a {colour_en} {animal_en} {place_en}"))
    return pairs


def write_parallel_files(folder: Path, pairs: list[tuple[str, str]]) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    source, target = folder / "captions.fr", folder / "captions.en"
    source.write_text("".join(f"{s}\n" for s, _ in pairs), encoding="utf-8")
    target.write_text("".join(f"{t}\n" for _, t in pairs), encoding="utf-8")
    return source, target


# ---- sounds per class ----------------------------------------------------------------------------

SOUND_CLASSES = {"dog_bark": 220.0, "siren": 880.0, "drilling": 3000.0, "jackhammer": 55.0}


def synth_clip(frequency: float, seed: int, rate: int = 16000, seconds: float = 0.5) -> np.ndarray:
    """A tone of ``frequency`` with a random phase, amplitude and a little noise: one class, many clips."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    tone = rng.uniform(0.3, 0.9) * np.sin(2 * math.pi * frequency * (1 + rng.uniform(-0.03, 0.03)) * t + rng.uniform(0, 6.28))
    return (tone + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)


def write_sound_folders(root: Path, clips_per_class: int = 6, rate: int = 16000) -> Path:
    """One folder per class of WAV files."""
    import soundfile

    for c, (label, frequency) in enumerate(SOUND_CLASSES.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(clips_per_class):
            soundfile.write(str(root / label / f"{label}-{i}.wav"), synth_clip(frequency, 100 * c + i, rate), rate)
    return root


def write_urbansound8k(root: Path, clips_per_fold: int = 2, folds: int = 3, rate: int = 16000) -> Path:
    """The UrbanSound8K layout: metadata/UrbanSound8K.csv and audio/foldN/<fsID>-<classID>-0-<i>.wav."""
    import soundfile

    rows = []
    for fold in range(1, folds + 1):
        (root / "audio" / f"fold{fold}").mkdir(parents=True, exist_ok=True)
        for class_id, (label, frequency) in enumerate(SOUND_CLASSES.items()):
            for i in range(clips_per_fold):
                name = f"{1000 * fold + i}-{class_id}-0-{i}.wav"
                soundfile.write(str(root / "audio" / f"fold{fold}" / name), synth_clip(frequency, 1000 * fold + 10 * class_id + i, rate), rate)
                rows.append({"slice_file_name": name, "fsID": 1000 * fold + i, "start": 0.0, "end": 0.5, "salience": 1,
                             "fold": fold, "classID": class_id, "class": label})
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    with (root / "metadata" / "UrbanSound8K.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


# ---- point clouds with captions ------------------------------------------------------------------


def shape_points(kind: str, seed: int, count: int = 1024, rotate: bool = False) -> np.ndarray:
    """Points on a sphere, a cube's surface, a flat disc or a thin rod, randomly scaled, upright as in
    an aligned dataset such as ShapeNet (``rotate``: a random orientation)."""
    rng = np.random.default_rng(seed)
    if kind == "sphere":
        p = rng.standard_normal((count, 3))
        p /= np.linalg.norm(p, axis=1, keepdims=True)
    elif kind == "cube":
        p = rng.uniform(-1, 1, (count, 3))
        axis = rng.integers(0, 3, count)
        p[np.arange(count), axis] = np.sign(rng.uniform(-1, 1, count))
    elif kind == "disc":
        r, a = np.sqrt(rng.uniform(0, 1, count)), rng.uniform(0, 2 * np.pi, count)
        p = np.stack([r * np.cos(a), r * np.sin(a), 0.02 * rng.standard_normal(count)], axis=1)
    else:  # rod
        p = np.stack([0.05 * rng.standard_normal(count), 0.05 * rng.standard_normal(count), rng.uniform(-1, 1, count)], axis=1)
    if rotate:
        p = p @ np.linalg.qr(rng.standard_normal((3, 3)))[0]
    return (p * rng.uniform(0.5, 2.0)).astype(np.float32)


SHAPE_CAPTIONS = {"sphere": "a round ball", "cube": "a square box", "disc": "a flat plate", "rod": "a long stick"}


def write_point_cloud_folder(root: Path, per_shape: int = 6) -> Path:
    """``<shape>-<i>.npy`` clouds, each with a sidecar ``.txt`` caption."""
    root.mkdir(parents=True, exist_ok=True)
    for s, (kind, caption) in enumerate(SHAPE_CAPTIONS.items()):
        for i in range(per_shape):
            np.save(root / f"{kind}-{i}.npy", shape_points(kind, 100 * s + i))
            (root / f"{kind}-{i}.txt").write_text(f"{caption}\n", encoding="utf-8")
    return root


def write_small_ulip_checkpoint(path: Path, depth: int = 1, width: int = 48, output_dim: int = 256, seed: int = 0) -> Path:
    """A ULIP-style checkpoint (``state_dict`` with ``module.point_encoder.*`` and ``module.pc_projection``)
    of a small PointBERT: ``depth`` blocks of ``width``, projected to ``output_dim``."""
    from x2i.encoders.pointbert import PointBERT, PointBERTConfig

    torch.manual_seed(seed)
    model = PointBERT(PointBERTConfig(variant="ulip1_custom", num_points=8192, depth=depth, width=width, output_dim=output_dim))
    with torch.no_grad():
        model.pc_projection.normal_(0, 0.05)
    state = {("module.pc_projection" if k == "pc_projection" else f"module.point_encoder.{k}"): v for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "state_dict": state}, path)
    return path


# ---- configs -------------------------------------------------------------------------------------


def write_config(path: Path, raw: dict) -> Path:
    """A JSON config file (the trainer reads TOML or JSON)."""
    path.write_text(json.dumps(raw, indent=1), encoding="utf-8")
    return path


# ---- the command line on a full disk ------------------------------------------------------------


def _limit_file_size(limit: int):
    def apply() -> None:  # in the child, before exec: both survive it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def run_cli_on_a_full_disk(kind: str, config: Path, limit: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python <repo> train <kind> --config <config>`` where no file may grow past ``limit`` bytes: every
    write past it fails as on a full disk (also for root, whom permissions do not stop)."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT), "train", kind, "--config", str(config)], capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout, preexec_fn=_limit_file_size(limit),
    )


def cli_error_line(argv: list[str], capsys) -> str:
    """Run ``train`` in this process with ``argv``; it must refuse with exit status 2 and print exactly one
    ``error:`` line (no traceback). Returns that line."""
    from x2i.training.cli import main

    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err[-4000:]
    (line,) = error_lines(err)
    return line


def error_lines(stderr: str) -> list[str]:
    """The lines the command line printed as its own errors; a traceback would be a crash, not an error line."""
    assert "Traceback" not in stderr, stderr[-4000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]
