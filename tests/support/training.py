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
    (``</w>``), plus CLIP's start/end tokens; pads with the end token like SD1's. Written as files first and
    loaded with ``from_pretrained``, which every supported transformers has (transformers 4's constructor
    wants file paths, 5's the vocabulary itself)."""
    import tempfile

    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    scratch = tempfile.TemporaryDirectory() if folder is None else None
    folder = Path(scratch.name) if scratch is not None else folder
    folder.mkdir(parents=True, exist_ok=True)
    # vocab.json + merges.txt as openai/clip-vit-large-patch14 and ComfyUI's sd1_tokenizer ship them.
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 77,
    }), encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    if scratch is not None:
        scratch.cleanup()
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


# SDXL's text encoders at their real widths (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14; ComfyUI's
# sd1_clip_config.json and clip_config_bigg.json), with the depth and vocabulary the tests choose.
SDXL_CLIP_L = {"width": 768, "intermediate": 3072}
SDXL_CLIP_G = {"width": 1280, "intermediate": 5120, "projection": 1280}
SDXL_POSITIONS = 77
SMALL_CLIP_VOCAB = 514  # make_clip_tokenizer's: 2 x 256 byte-level characters + start + end


def _sdxl_random(shapes: dict[str, tuple[int, ...]], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded values by name: LayerNorm weights near 1, everything else small, so every tensor matters."""
    out = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=generator)
        is_norm = ".ln_" in key or "layer_norm" in key or "ln_final" in key
        out[key] = 1 + 0.1 * value if is_norm and key.endswith("weight") else 0.02 * value
    return out


def _clip_l_shapes(layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """CLIP ViT-L in transformers names, below ``text_model.``."""
    w, f = SDXL_CLIP_L["width"], SDXL_CLIP_L["intermediate"]
    shapes = {"embeddings.token_embedding.weight": (vocab, w), "embeddings.position_embedding.weight": (SDXL_POSITIONS, w)}
    for n in range(layers):
        p = f"encoder.layers.{n}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{p}self_attn.{name}.weight": (w, w), f"{p}self_attn.{name}.bias": (w,)})
        shapes.update({f"{p}layer_norm1.weight": (w,), f"{p}layer_norm1.bias": (w,), f"{p}layer_norm2.weight": (w,),
                       f"{p}layer_norm2.bias": (w,), f"{p}mlp.fc1.weight": (f, w), f"{p}mlp.fc1.bias": (f,),
                       f"{p}mlp.fc2.weight": (w, f), f"{p}mlp.fc2.bias": (w,)})
    shapes.update({"final_layer_norm.weight": (w,), "final_layer_norm.bias": (w,)})
    return shapes


def _open_clip_g_shapes(layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """OpenCLIP ViT-bigG's text tower in open_clip names (``text_projection`` stored [width, proj])."""
    w, f, proj = SDXL_CLIP_G["width"], SDXL_CLIP_G["intermediate"], SDXL_CLIP_G["projection"]
    shapes = {"token_embedding.weight": (vocab, w), "positional_embedding": (SDXL_POSITIONS, w)}
    for n in range(layers):
        p = f"transformer.resblocks.{n}."
        shapes.update({f"{p}ln_1.weight": (w,), f"{p}ln_1.bias": (w,), f"{p}attn.in_proj_weight": (3 * w, w),
                       f"{p}attn.in_proj_bias": (3 * w,), f"{p}attn.out_proj.weight": (w, w), f"{p}attn.out_proj.bias": (w,),
                       f"{p}ln_2.weight": (w,), f"{p}ln_2.bias": (w,), f"{p}mlp.c_fc.weight": (f, w), f"{p}mlp.c_fc.bias": (f,),
                       f"{p}mlp.c_proj.weight": (w, f), f"{p}mlp.c_proj.bias": (w,)})
    shapes.update({"ln_final.weight": (w,), "ln_final.bias": (w,), "text_projection": (w, proj)})
    return shapes


def write_sdxl_checkpoint(path: Path, layers: int = 1, seed: int = 0, refiner: bool = False,
                          without_open_clip: bool = False) -> dict[str, torch.Tensor]:
    """An SDXL single file in the original SGM layout, fp16 on disk: CLIP ViT-L under
    ``conditioner.embedders.0.transformer.text_model.`` (with its int64 ``position_ids``, as released) and
    OpenCLIP ViT-bigG under ``conditioner.embedders.1.model.`` (with ``logit_scale``), at their real widths,
    ``layers`` deep, with :func:`make_clip_tokenizer`'s vocabulary; plus U-Net/VAE decoys. ``refiner``: the
    refiner's layout (bigG alone, under ``conditioner.embedders.0.model.``); ``without_open_clip``: CLIP-L
    alone. Returns every tensor written, by file key, as float32 values of what is on disk."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    if not refiner:
        prefix = "conditioner.embedders.0.transformer.text_model."
        clip_l = _sdxl_random(_clip_l_shapes(layers, SMALL_CLIP_VOCAB), generator)
        tensors.update({prefix + k: v.half() for k, v in clip_l.items()})
        tensors[prefix + "embeddings.position_ids"] = torch.arange(SDXL_POSITIONS).unsqueeze(0)
    if not without_open_clip:
        prefix = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
        clip_g = _sdxl_random(_open_clip_g_shapes(layers, SMALL_CLIP_VOCAB), generator)
        tensors.update({prefix + k: v.half() for k, v in clip_g.items()})
        tensors[prefix + "logit_scale"] = torch.tensor(4.6052).half()
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3).half()
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


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


def rewrite_shard(path: Path, change) -> None:
    """The cache shard re-saved with ``change(tensors, metadata)`` applied, as another tool or bit rot would leave it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k).clone() for k in handle.keys()}  # not views of the file rewritten below
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


# ---- the loop's promises on real kinds: two processes train as one, a killed run resumes exactly ------


class PerSampleDraws:
    """While entered, ``torch.rand`` / ``randn`` / ``randint`` give row ``i`` of every draw (its first dimension
    is the batch) from a generator seeded by the row's place in the *global* batch (``first_row + i``) and the
    draw's number in this forward: a sample then gets the same flip, posterior sample, timestep and noise
    whichever process trains it. (The loop seeds each process differently, so without this two processes draw
    other noise than one, and only the expected gradient would agree.)"""

    def __init__(self, first_row: int) -> None:
        self.first_row = first_row
        self.draws = 0

    def _per_row(self, original, size_last: bool):
        def draw(*args, generator=None, device=None, **kwargs):
            assert generator is None, "a draw with its own generator is already deterministic"
            if size_last:  # randint(low, high, size)
                *lead, size = args
            else:  # rand(*size) / rand(size)
                lead, size = [], args[0] if len(args) == 1 and not isinstance(args[0], int) else args
            size = tuple(size)
            number, self.draws = self.draws, self.draws + 1
            rows = [original(*lead, size[1:], generator=torch.Generator().manual_seed(10_000 * (self.first_row + i) + number), **kwargs)
                    for i in range(size[0])]
            return torch.stack(rows).to(device)
        return draw

    def __enter__(self) -> PerSampleDraws:
        self.saved = {name: getattr(torch, name) for name in ("rand", "randn", "randint")}
        torch.rand = self._per_row(self.saved["rand"], False)
        torch.randn = self._per_row(self.saved["randn"], False)
        torch.randint = self._per_row(self.saved["randint"], True)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.saved.items():
            setattr(torch, name, original)


def first_step_gradient_task(kind: str, raw: dict, record_to: Path):
    """The ``kind``'s task from ``raw``, changed only where randomness would make one process differ from two:

    - every dropout off (its masks come from each process's own stream);
    - the forward's draws per sample (:class:`PerSampleDraws`);
    - trainable tensors that start at zero (LoRA's up) set to small fixed values, so that their partners'
      gradients (LoRA's down) are not 0 = 0 by construction;

    and its optimiser saves the first step's gradients (what ``optimizer.step`` sees, after the loop's
    backward and the process group's reduction) to ``record_to/gradients-<rank>.safetensors``."""
    from safetensors.torch import save_file
    from torch import nn

    from x2i.training.cli import task_class

    class FirstStepGradients(task_class(kind)):
        def build_model(self, dist):
            model = super().build_model(dist)
            self.rank = dist.rank
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for _, param in sorted(model.named_parameters()):
                    if param.requires_grad and not param.any():
                        param.copy_(0.02 * torch.randn(param.shape, generator=generator))
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
            forward = model.forward

            def per_sample_forward(batch):
                rows = len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))
                with PerSampleDraws(dist.rank * rows) as draws:
                    terms = forward(batch)
                model.draws_per_step = draws.draws
                return terms

            model.forward = per_sample_forward
            return model

        def build_optimizer(self, model):
            optimizer = super().build_optimizer(model)
            names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}

            def record(opt, args, kwargs):
                path = Path(record_to) / f"gradients-{self.rank}.safetensors"
                if path.exists():
                    return
                grads = {names[id(p)]: (p.grad if p.grad is not None else torch.full_like(p, float("nan"))).detach().clone()
                         for group in opt.param_groups for p in group["params"]}
                grads["draws_per_step"] = torch.tensor(model.draws_per_step)
                Path(record_to).mkdir(parents=True, exist_ok=True)
                save_file(grads, str(path))

            optimizer.register_step_pre_hook(record)
            return optimizer

    return FirstStepGradients.from_config(raw)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _first_step_worker(rank: int, world_size: int, port: int, kind: str, raw: dict, record_to: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    _first_step_run(kind, raw, Path(record_to))


def _first_step_run(kind: str, raw: dict, record_to: Path):
    from x2i.training import RunSettings, section, train

    task = first_step_gradient_task(kind, raw, record_to)
    return train(task, section(raw, "run", RunSettings), resume="never")


def first_step_gradients(kind: str, raw: dict, output: Path, processes: int) -> dict[str, torch.Tensor]:
    """The gradients of every trainable tensor at the first step of ``kind`` trained from ``raw`` (its
    ``[run]`` made a one-step CPU fp32 run without clipping, writing to ``output``) by ``processes`` gloo
    processes (1: this process); with 2, both ranks' gradients must be identical, and rank 0's are returned."""
    import copy

    from safetensors.torch import load_file

    raw = copy.deepcopy(raw)
    raw["run"] = {**raw.get("run", {}), "output_dir": str(output), "max_steps": 1, "device": "cpu", "backend": "gloo",
                  "precision": "fp32", "grad_clip": 0.0, "num_workers": 0, "validate_every": 1000}
    if processes == 1:
        from x2i.training import Distributed, RunSettings, section, train

        train(first_step_gradient_task(kind, raw, output), section(raw, "run", RunSettings), resume="never", dist=Distributed())
    else:
        import torch.multiprocessing as mp

        mp.start_processes(_first_step_worker, args=(processes, free_port(), kind, raw, str(output)), nprocs=processes,
                           start_method="spawn")
    found = [load_file(str(output / f"gradients-{rank}.safetensors")) for rank in range(processes)]
    for other in found[1:]:
        assert other.keys() == found[0].keys()
        assert all(torch.equal(other[k], found[0][k]) for k in other), "the ranks step with different gradients"
    return found[0]


def assert_same_gradients(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor], tolerance: float = 1e-6,
                          zero_by_design: dict[str, str] | None = None, zero_tolerance: float = 0.0) -> dict[str, float]:
    """Every tensor's gradient of two processes equals one process's: ``|two - one| <= tolerance * max|one|``
    elementwise (the tensor's own scale: summing a global batch in two halves changes the rounding, nothing
    else). ``zero_by_design`` maps a tensor whose true gradient is 0 (e.g. a bias a BatchNorm removes) to the
    tensor whose scale its rounding noise is measured against: both runs must give it at most
    ``zero_tolerance`` of that scale. Returns each tensor's largest difference relative to its scale."""
    zero_by_design = zero_by_design or {}
    assert one.keys() == two.keys()
    assert one.pop("draws_per_step", None) == two.pop("draws_per_step", None)
    errors = {}
    for name in one:
        assert torch.isfinite(one[name]).all(), f"{name} has no gradient"
        if name in zero_by_design:
            scale = one[zero_by_design[name]].abs().max().item()
            limit = zero_tolerance * scale
            assert one[name].abs().max().item() <= limit and two[name].abs().max().item() <= limit, f"{name} is not 0 up to rounding"
            errors[name] = (two[name] - one[name]).abs().max().item() / scale
            continue
        scale = one[name].abs().max().item()
        assert scale > 0, f"the gradient of {name} is exactly 0: the comparison would prove nothing"
        errors[name] = (two[name] - one[name]).abs().max().item() / scale
        assert errors[name] <= tolerance, f"{name}: two processes differ from one by {errors[name]:.3g} of its largest gradient"
    return errors


# ---- the command line, stopped and killed ---------------------------------------------------------


def cli_command(kind: str, config: Path) -> list[str]:
    return [sys.executable, str(REPO_ROOT), "train", kind, "--config", str(config)]


def cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def start_cli(kind: str, config: Path) -> subprocess.Popen:
    return subprocess.Popen(cli_command(kind, config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())


def last_logged_step(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(line)["step"] for line in lines if '"train"' in line and line.endswith("}")), default=0)  # not a torn last line


def wait_for(predicate, process: subprocess.Popen, timeout: float = 300.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the run ended early ({process.returncode}): {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.01)


def checkpoint_steps(output_dir: Path) -> list[int]:
    from x2i.training.checkpoints import checkpoint_files

    return [int(p.stem.split("-")[1]) for p in checkpoint_files(output_dir)]


def stop_kill_and_resume(kind: str, config: Path, output: Path, total_steps: int, checkpoint_every: int, exported: list[str],
                         stop_signal: int = signal.SIGINT) -> dict:
    """``train <kind> --config config`` three times, as a user would run it:

    1. ``stop_signal`` (Ctrl+C) once, mid-run: the run checkpoints the step it stopped at, exports (files
       ``exported``), exits 130;
    2. the same command resumes, and is SIGKILLed once a periodic checkpoint past the stop exists and a step
       past that checkpoint has been logged (nothing saved at the kill);
    3. the same command resumes from that periodic checkpoint to the end (exit 0).

    Returns the positions the two resumptions started from."""
    from x2i.training.checkpoints import checkpoint_files, read_checkpoint

    first = start_cli(kind, config)
    wait_for(lambda: last_logged_step(output) >= 2, first)
    first.send_signal(stop_signal)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 130, err[-3000:]
    _, header = read_checkpoint(checkpoint_files(output)[-1])
    stopped = header["position"]
    assert 2 <= stopped["step"] < total_steps and "interrupted at step" in out, (stopped, out)
    assert f"{signal.Signals(stop_signal).name} received: saving a checkpoint" in err
    assert all((output / name).exists() for name in exported)  # the stopped run's model is usable

    second = start_cli(kind, config)
    periodic = (stopped["step"] // checkpoint_every + 1) * checkpoint_every
    wait_for(lambda: last_logged_step(output) > periodic and periodic in checkpoint_steps(output), second)
    second.kill()
    second.communicate(timeout=60)
    assert second.returncode == -signal.SIGKILL
    last = checkpoint_files(output)[-1]
    _, header = read_checkpoint(last)
    killed = header["position"]
    assert periodic <= killed["step"] < total_steps and killed["step"] % checkpoint_every == 0, killed

    third = subprocess.run(cli_command(kind, config), capture_output=True, text=True, env=cli_env(), timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"resumed from {last} at step {killed['step']}" in third.stderr
    return {"stopped": stopped, "killed": killed}


def assert_same_final_state(expected_dir: Path, found_dir: Path, exported: list[str]) -> None:
    """The final checkpoints of two runs hold equal tensors (``torch.equal``): every trainable tensor and buffer
    (an EMA too), the optimiser's moments and every process's random streams; and equal optimiser, scheduler
    and position headers. The exported files (names in ``exported``) hold equal tensors too."""
    from safetensors.torch import load_file

    from x2i.training.checkpoints import checkpoint_files, read_checkpoint

    expected, expected_header = read_checkpoint(checkpoint_files(expected_dir)[-1])
    found, found_header = read_checkpoint(checkpoint_files(found_dir)[-1])
    assert expected.keys() == found.keys()
    assert any(k.startswith("optimizer.") for k in expected) and any(k.startswith("model.") for k in expected)
    different = [k for k in expected if not torch.equal(expected[k], found[k])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ: {different[:6]}"
    for part in ("position", "optimizer", "scheduler", "rng"):
        assert expected_header[part] == found_header[part], part
    for name in exported:
        a, b = load_file(str(expected_dir / name)), load_file(str(found_dir / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
