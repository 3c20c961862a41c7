"""LaVi-Bridge sampling cost: the bridged SD1.5 MODEL against the unpatched one, in ComfyUI, in one run.

    COMFYUI_PATH=/path/to/ComfyUI python bench/lavibridge_sampling.py --device cuda --dtype fp16
    COMFYUI_PATH=/path/to/ComfyUI python bench/lavibridge_sampling.py --device cpu --size 256 --steps 4
    COMFYUI_PATH=/path/to/ComfyUI python bench/lavibridge_sampling.py --device cpu --small   # quick smoke run

Builds in-process, with random weights of the real sizes: ComfyUI's own SD1.5 U-Net (its model
detection config), T5-Large's encoder (24 layers of 1024) and a released-format ``t5_unet`` bridge
(224 U-Net LoRA pairs and 96 T5 LoRA pairs of rank 32, adapter 1024 -> 896 -> 768), then goes
through the pack's own nodes (X2I LaVi-Bridge Loader and Text Encode) and ComfyUI's
``comfy.sample.sample`` (what KSampler runs; euler, normal schedule, CFG 7.5, fixed seed).

Measures:

- ``s_per_it``: seconds per sampling step of each MODEL, the median of the intervals between
  successive step callbacks, so loading and LoRA merging (done once, before the first step) are
  left out; the two MODELs alternate (ABBA), ``--repeats`` runs each after one warm-up run.
  ``ratio_bridged_over_unpatched`` is the figure to hold to <= 1.02 (the LoRA is merged into the
  weights, so a step should cost the same).
- ``peak_mb``: CUDA: ``torch.cuda.max_memory_allocated`` over each timed sampling call (loading
  and merging included); CPU: the process RSS sampled at every step of the warm-up runs (unpatched
  first). ``unpatched_copies_mb``: what ComfyUI keeps of the LoRA-patched weights to unpatch them,
  as for any LoRA: host memory, on the GPU's offload device (CPU) or, on CPU, next to the model.
- ``encode_ms``: one prompt through the bridged T5 and the adapter (tokenisation included), the
  median of ``--encode-repeats`` calls.

``--small`` keeps the real U-Net (the bridge's LoRA list is fixed to SD1.x's layers) but shrinks T5
(2 layers of 48) and the adapter, and defaults to 64 px and 3 steps. Writes one JSON line to stdout
and, with ``--out``, to a file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
from timing import DTYPES, device_label, emit, median_ms, synchronize  # noqa: E402

import support.models  # noqa: E402  (importing support imports this repository as the package x2i)

PROMPT = "a red cube on top of a blue sphere, to the left of a green cone, studio photo"
NEGATIVE = "blurry, low quality"
SEED = 42
CFG = 7.5
# T5-Large (the original t5-large LaVi-Bridge used: ReLU feed-forward of 4096).
T5_LARGE = {"vocab_size": 32128, "d_model": 1024, "d_kv": 64, "d_ff": 4096, "num_layers": 24, "num_heads": 16,
            "feed_forward_proj": "relu"}
T5_SMALL = {"vocab_size": 32128, "d_model": 48, "d_kv": 12, "d_ff": 96, "num_layers": 2, "num_heads": 4,
            "feed_forward_proj": "relu"}
ADAPTER_INT = {False: 896, True: 64}


def import_comfy(path: str, device: torch.device):
    sys.path.insert(0, path)  # first, so that ComfyUI's top-level modules (nodes, utils) win over same-named folders
    import comfy.cli_args

    comfy.cli_args.args.cpu = device.type == "cpu"  # must precede comfy.model_management
    import comfy.model_management

    if device.type == "cuda" and comfy.model_management.get_torch_device().type != "cuda":
        raise SystemExit("--device cuda, but ComfyUI found no CUDA device")
    return importlib.import_module("x2i.nodes")


def build_unet(dtype: torch.dtype):
    """ComfyUI's SD1.5 MODEL (its detection config), random weights, managed like a loaded checkpoint."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher

    from support.sd15_unet import SD15_UNET

    config = comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ComfyUI's constructors skip initialisation
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02 + (1.0 if param.ndim == 1 else 0.0))
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def build_language_model(folder: Path, small: bool, dtype: torch.dtype):
    """T5's encoder of the real (or --small) size behind the pack's HFTextEncoder, and a tokenizer."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from x2i.encoders import HFTextEncoder
    from x2i.nodes.common import encoder_patcher

    tokenizer = AutoTokenizer.from_pretrained(support.models.make_t5_encoder_folder(folder / "tokenizer", d_model=32, layers=1))
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(**(T5_SMALL if small else T5_LARGE))).eval()
    encoder = HFTextEncoder(t5.to(dtype), tokenizer, "t5-large (random)", max_length=77, use_attention_mask=False)
    return encoder_patcher(encoder), t5


def write_bridge(folder: Path, t5, small: bool) -> None:
    """A released-format t5_unet folder: LoRA lists of the real shapes, the adapter at its real widths."""
    from x2i.bridge import TextAdapter, TextAdapterConfig

    support.models.write_lavibridge_folder(folder, t5, "t5", adapter_in=t5.config.d_model)
    widths = {"in_dim": t5.config.d_model, "int_dim": ADAPTER_INT[small], "out_dim": 768}
    torch.manual_seed(1)
    adapter = TextAdapter(TextAdapterConfig(**widths))
    (folder / "adapter" / "config.json").write_text(json.dumps({"_class_name": "TextAdapter", "_diffusers_version": "0.24.0", **widths}))
    torch.save(adapter.state_dict(), folder / "adapter" / "diffusion_pytorch_model.bin")


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def sample_once(model, positive, negative, size: int, steps: int, device: torch.device) -> tuple[list[float], float]:
    """(seconds of each step after the first, peak memory in MiB) of one comfy.sample.sample call."""
    import comfy.sample

    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, SEED)
    stamps: list[float] = []
    rss = [rss_mb()]

    def on_step(step, x0, x, total_steps) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())
        if device.type != "cuda":
            rss.append(rss_mb())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    comfy.sample.sample(model, noise, steps, CFG, "euler", "normal", positive, negative, latent,
                        callback=on_step, disable_pbar=True, seed=SEED)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else max(rss)
    return [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)], peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 512; 64 with --small)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps per run (default 20; 3 with --small)")
    parser.add_argument("--repeats", type=int, default=4, help="timed sampling runs per MODEL, after one warm-up each")
    parser.add_argument("--encode-repeats", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="tiny T5 and adapter, 64 px, 3 steps: a quick CPU smoke run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        sys.stderr.write("skipped: set COMFYUI_PATH to a ComfyUI checkout (this benchmark samples with ComfyUI in-process)\n")
        return 0
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    size = args.size or (64 if args.small else 512)
    steps = args.steps or (3 if args.small else 20)
    if steps < 2:
        parser.error("--steps must be at least 2 (a step's time is the interval between two step callbacks)")
    nodes = import_comfy(comfy_path, device)
    import comfy.model_management as mm
    import folder_paths

    with tempfile.TemporaryDirectory() as tmp:
        folder_paths.folder_names_and_paths["lavi_bridge"] = ([str(Path(tmp) / "lavi_bridge")], set())
        language_model, t5 = build_language_model(Path(tmp), args.small, dtype)
        write_bridge(Path(tmp) / "lavi_bridge" / "t5_unet", t5, args.small)
        unet = build_unet(dtype)
        bridged, bridge = nodes.X2ILaViBridgeLoader.execute(unet, language_model, "t5_unet", 1.0, 1.0).result

    def encode(text: str):
        return nodes.X2ILaViBridgeTextEncode.execute(bridge, text, False).result[0]

    positive, negative = encode(PROMPT), encode(NEGATIVE)
    encode_ms = median_ms(lambda: encode(PROMPT), device, warmup=2, repeats=args.encode_repeats)
    mm.unload_all_models()

    models = {"unpatched": unet, "bridged": bridged}
    step_times: dict[str, list[float]] = {name: [] for name in models}
    peaks: dict[str, float] = {}
    # Warm-up (load, merge the LoRA, first kernels), unpatched first: on CPU, where the RSS of a process
    # hardly shrinks, these two peaks are the memory figures.
    for name, model in models.items():
        _, peaks[name] = sample_once(model, positive, negative, size, steps, device)
    backup_mb = sum(b.weight.nbytes for b in bridged.backup.values()) / 2**20  # unpatched copies kept while bridged
    if device.type == "cuda":
        peaks = {}
    for repeat in range(args.repeats):
        order = list(models.items()) if repeat % 2 == 0 else list(models.items())[::-1]  # ABBA: drift cancels
        for name, model in order:
            times, peak = sample_once(model, positive, negative, size, steps, device)
            step_times[name] += times
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), peak)
    s_per_it = {name: statistics.median(times) for name, times in step_times.items()}

    result: dict[str, object] = {
        "device": device_label(device), "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "small": args.small, "size": size, "steps": steps, "repeats": args.repeats, "sampler": "euler/normal", "cfg": CFG,
        "lora_patches": len(bridged.patches),
        "unpatched_s_per_it": round(s_per_it["unpatched"], 4),
        "bridged_s_per_it": round(s_per_it["bridged"], 4),
        "ratio_bridged_over_unpatched": round(s_per_it["bridged"] / s_per_it["unpatched"], 3),
        "peak_memory": "cuda max_memory_allocated" if device.type == "cuda" else "process RSS",
        "unpatched_peak_mb": round(peaks["unpatched"]),
        "bridged_peak_mb": round(peaks["bridged"]),
        "peak_ratio_bridged_over_unpatched": round(peaks["bridged"] / peaks["unpatched"], 3),
        "unpatched_copies_mb": round(backup_mb),
        "encode_ms": round(encode_ms, 1),
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
