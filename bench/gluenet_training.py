"""GlueNet training throughput with cached features: samples/s, model FLOPs, MFU, and the time for
GlueGen's 18M-caption run.

    python bench/gluenet_training.py --device cuda                         # batch 256 and 1024, eager, bf16
    python bench/gluenet_training.py --device cuda --compile
    python bench/gluenet_training.py --device cpu --batch 4 --warmup 1 --steps 3   # proves it runs anywhere

One step is what ``train gluenet`` runs on cached features: the trainer's own objective
(``training.gluenet_objective.GlueNetObjective``) with the GlueNet-5RM multilingual layout —
encoder ``Translator_noln(77, 1024, 768, mult 2, depth 5)`` (XLM-R large -> CLIP-L), reconstruction
decoder ``Translator_noln(77, 768, 1024, 2, 5)``, and the token discriminator unless
``--no-discriminator`` — forward under bf16 autocast, the official weighted MSE + reconstruction +
adversarial loss, backward, and the trainer's Adam step (``GlueNetTask.build_optimizer``). Inputs are
random tensors shaped like the cache (``[B, 77, 1024]`` source, ``[B, 77, 768]`` target, stored fp16
as with ``cache.dtype = "fp16"``), already on the device; ``--loader`` also times reading that many
samples from a real on-disk cache through the trainer's dataset and a DataLoader (CPU side).

Model FLOPs are counted, not assumed: every ``nn.Linear`` call of one forward at batch 1 adds
2 x in x out x rows; a training step is 3x the forward (backward = 2x). Encoder + decoder give
39.33 GFLOP per training sample (the reference 39.3); the discriminator adds 0.14. MFU = samples/s x FLOPs
per sample / the card's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s; ``--peak-tflops`` for others).
Writes one JSON line to stdout and, with ``--out``, to a file.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
from timing import device_label, emit, time_training_steps  # noqa: E402

import support  # noqa: E402,F401  (imports this repository as the package x2i)
from x2i.gluenet import GlueNetConfig  # noqa: E402
from x2i.training.gluenet_objective import GlueNetLossSettings, GlueNetObjective  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}
GLUEGEN_CAPTIONS = 18_000_000  # the paper's T5-3B -> LDM run
OFFICIAL_EPOCHS = 4
TOKENS, SOURCE_WIDTH, TARGET_WIDTH = 77, 1024, 768


def gluenet_5rm() -> GlueNetConfig:
    """The released multilingual GlueNet's layout: Translator_noln(77, 1024, 768, mult 2, depth 5)."""
    return GlueNetConfig("translator_noln", num_tokens=TOKENS, in_dim=SOURCE_WIDTH, out_dim=TARGET_WIDTH, mult=2, depth=5,
                         input_divisor=3.0)


def count_forward_flops(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """FLOPs of one forward, per top-level child (encoder, decoder, discriminator): 2 per multiply-add
    of every ``nn.Linear`` call (other ops are a rounding error next to them)."""
    totals: dict[str, float] = {}
    handles = []
    for child_name, child in model.named_children():
        for module in child.modules():
            if isinstance(module, nn.Linear):
                def hook(mod, inputs, output, name=child_name):
                    rows = inputs[0].numel() // mod.in_features
                    totals[name] = totals.get(name, 0.0) + 2.0 * rows * mod.in_features * mod.out_features
                handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return totals


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if all(part in name for part in key.split()):
            return value
    return None


def make_batch(batch_size: int, device: torch.device, generator: torch.Generator) -> dict[str, torch.Tensor]:
    # Cached-feature shaped: XLM-R large hidden states and CLIP-L conditioning, stored in fp16.
    source = torch.randn(batch_size, TOKENS, SOURCE_WIDTH, generator=generator).half()
    target = (torch.randn(batch_size, TOKENS, TARGET_WIDTH, generator=generator) * 0.8).half()
    return {"source": source.to(device), "target": target.to(device)}


def time_steps(batch_size: int, args, device: torch.device) -> dict[str, float]:
    from x2i.training.gluenet_task import gluenet_optimizer

    torch.manual_seed(0)
    loss = GlueNetLossSettings(adversarial=not args.no_discriminator)
    model = GlueNetObjective(gluenet_5rm(), loss, "text").to(device)
    optimizer = gluenet_optimizer(model, lr=1e-4, betas=[0.9, 0.999])  # the trainer's (official Adam; fused on CUDA)
    runner = torch.compile(model) if args.compile else model
    batch = make_batch(batch_size, device, torch.Generator().manual_seed(1))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else torch.autocast(device.type, enabled=False)

    def step() -> None:
        with autocast:
            terms = runner(batch)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()

    median = time_training_steps(step, device, args.warmup, args.steps).median_s
    out = {"step_ms": round(median * 1000, 2), "samples_per_s": round(batch_size / median, 1)}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def time_loader(samples: int, batch_size: int, workers: int) -> float:
    """Samples/s through the trainer's dataset (memory-mapped shards) and a DataLoader, on the CPU."""
    from x2i.training.features import FeatureCache
    from x2i.training.gluenet_task import GlueNetTrainingSet

    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        caches = {}
        for name, width in (("source", SOURCE_WIDTH), ("target", TARGET_WIDTH)):
            cache = FeatureCache(Path(tmp), name, {"bench": name}, samples, dtype="fp16")
            cache.build(list(range(samples)), lambda items, w=width: (torch.randn(len(items), TOKENS, w, generator=generator),
                                                                     [None] * len(items)), (TOKENS, width), batch_size=256)
            caches[name] = cache.open()
        dataset = GlueNetTrainingSet(caches["source"], caches["target"], [(i, (i,)) for i in range(samples)], list(range(samples)), 0)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)
        start = time.perf_counter()
        count = sum(batch["source"].shape[0] for batch in loader)
        return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024], help="global batch sizes to time")
    parser.add_argument("--compile", action="store_true", help="torch.compile the objective (run.compile = true)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--no-discriminator", action="store_true", help="encoder + decoder only (loss.adversarial = false)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU (known GPUs are detected)")
    parser.add_argument("--loader", type=int, default=0, metavar="N", help="also time reading N cached samples from disk")
    parser.add_argument("--loader-workers", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    probe = GlueNetObjective(gluenet_5rm(), GlueNetLossSettings(adversarial=not args.no_discriminator), "text")
    flops = count_forward_flops(probe, make_batch(1, torch.device("cpu"), torch.Generator().manual_seed(0)))
    del probe
    forward = sum(flops.values())
    train_flops = 3 * forward
    peak = peak_tflops(device, args.peak_tflops)
    result: dict[str, object] = {
        "device": device_label(device), "torch": torch.__version__, "precision": args.precision, "compile": args.compile,
        "layout": "GlueNet-5RM multilingual: Translator_noln(77,1024,768,2,5) + decoder (77,768,1024,2,5)"
        + ("" if args.no_discriminator else " + discriminator"),
        "gflop_per_sample_forward": {k: round(v / 1e9, 3) for k, v in flops.items()},
        "gflop_per_sample_train": round(train_flops / 1e9, 2),
        "gflop_per_sample_train_encoder_decoder": round(3 * (flops["encoder"] + flops.get("decoder", 0)) / 1e9, 2),
        "peak_bf16_tflops": peak,
        "runs": [],
    }
    for batch_size in args.batch:
        timing = time_steps(batch_size, args, device)
        rate = timing["samples_per_s"]
        epoch_h = GLUEGEN_CAPTIONS / rate / 3600
        entry = {"batch": batch_size, **timing, "achieved_tflops": round(rate * train_flops / 1e12, 2),
                 "mfu": round(rate * train_flops / (peak * 1e12), 4) if peak else None,
                 "hours_per_18m_caption_epoch": round(epoch_h, 2),
                 "hours_official_4_epochs": round(OFFICIAL_EPOCHS * epoch_h, 2)}
        result["runs"].append(entry)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.loader:
        result["loader_samples_per_s"] = round(time_loader(args.loader, min(args.batch), args.loader_workers), 1)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
