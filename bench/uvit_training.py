"""Intermediate-fusion U-ViT training throughput: optimiser steps per second of the U-ViT trainer's model,
the paper's four settings in one run.

    python bench/uvit_training.py --device cuda                  # batch 256, bf16, eager
    python bench/uvit_training.py --device cuda --compile        # eager and torch.compile, same run
    python bench/uvit_training.py --small --batch 4 --compile    # tiny widths on the CPU: proves the script runs

One step is what ``train uvit`` runs: the trainer's own model (:class:`training.uvit_task.UViTTrainingModel`,
U-ViT-Small of each setting with its EMA) on a batch as the caches give it (fp16 latent moments, fp16 CLIP
features: random, no data), posterior sample, n in 1..1000, ε, text drop with p 0.1, forward under bf16
autocast, ε-MSE, backward, AdamW (fused on CUDA) with U-ViT's settings, the warm-up scheduler and the EMA
update. Reports the median step time after warm-up as it/s, samples/s, an estimate of the model TFLOP/s
(3 x the forward's counted FLOPs: linear, conv and attention) and peak GPU memory, then a table beside the
paper's it/s (RTX 4090, batch 256) and the reference H100 build (``shared/design/performance.md``), each
also as a ratio to concat-early. JSON lines go to stdout and, with ``--out``, to a file.
"""

from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import replace
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
from timing import DTYPES, device_label, emit, time_training_steps  # noqa: E402

import support  # noqa: E402,F401  (imports this repository as the package x2i)
from x2i.training.uvit_task import (  # noqa: E402
    UViTOptimSettings,
    UViTTrainingModel,
    build_uvit_optimizer,
    random_batch,
    warmup_lambda,
)
from x2i.uvit import PAPER_SETTINGS, UViT, UViTConfig  # noqa: E402
from x2i.uvit.flops import uvit_cost  # noqa: E402

SETTINGS = ("concat-early", "concat-intermediate", "cross-early", "cross-intermediate")
# Paper Table 1, training it/s on one RTX 4090 at batch 256 (fp16).
PAPER_IT_S = {"concat-early": 1.81, "concat-intermediate": 2.31, "cross-early": 2.54, "cross-intermediate": 2.74}
# shared/design/performance.md: independent reference builds on one H100 80GB, torch 2.11, bf16, batch 256.
H100_REFERENCE = {
    "concat-early": (8.91, 12.63),
    "concat-intermediate": (10.00, 14.28),
    "cross-early": (9.15, 14.65),
    "cross-intermediate": (9.82, 14.92),
}


def config_for(name: str, small: bool) -> UViTConfig:
    """The paper's setting; ``small``: the same blocks and fusion at width 64 on 8x8 latents with 64-wide text."""
    config = PAPER_SETTINGS[name]
    return replace(config, width=64, heads=2, image_size=8, context_dim=64) if small else config


def build(config: UViTConfig, device: torch.device):
    torch.manual_seed(0)
    with torch.device(device):
        uvit = UViT(config)
    model = UViTTrainingModel(uvit, torch.randn(config.text_tokens, config.context_dim)).to(device).train()
    optimizer = build_uvit_optimizer(model, UViTOptimSettings())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(UViTOptimSettings().warmup_steps))
    return model, optimizer, scheduler


def measure(name: str, config: UViTConfig, args, compiled: bool) -> dict:
    device = torch.device(args.device)
    model, optimizer, scheduler = build(config, device)
    runner = torch.compile(model) if compiled else model
    batch = random_batch(config, args.batch, device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step() -> torch.Tensor:
        with autocast:
            loss = runner(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss.detach()

    timed = time_training_steps(step, device, args.warmup + (args.compile_warmup if compiled else 0), args.steps)
    median = timed.median_s
    cost = uvit_cost(config, batch=1)
    flops_per_sample = 3 * (cost.linear_conv_flops + cost.attention_flops)  # forward + backward ≈ 3 forwards
    row = {
        "bench": "uvit_training", "setting": name, "mode": "compile" if compiled else "eager", "device": device_label(device),
        "size": "small (--small)" if args.small else "U-ViT-Small (paper)", "batch": args.batch, "precision": args.dtype,
        "params": cost.params, "gflops_per_sample_fwd": round((cost.linear_conv_flops + cost.attention_flops) / 1e9, 3),
        "step_ms": round(median * 1000, 2), "it_per_s": round(1 / median, 3), "samples_per_s": round(args.batch / median, 1),
        "model_tflop_s": round(flops_per_sample * args.batch / median / 1e12, 3), "warmup_s": round(timed.warmup_s, 1), "steps": args.steps,
        "last_loss": round(float(timed.last), 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    return row


def release(device: torch.device) -> None:
    """Between settings: the previous model, its optimiser state and compiled graphs go."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(rows: list[dict]) -> str:
    """Measured it/s and ratios to concat-early beside the paper's and the H100 reference's."""
    by = {(r["setting"], r["mode"]): r for r in rows}
    modes = [m for m in ("eager", "compile") if any(r["mode"] == m for r in rows)]

    def ratio(value: float | None, base: float | None) -> str:
        return "–" if not value or not base else f"{value / base:.2f}"

    head = ["setting"]
    for mode in modes:
        head += [f"{mode} it/s", f"{mode} ratio"]
    head += ["paper it/s (4090)", "paper ratio", "H100 ref eager", "H100 ref compile", "H100 ref ratio (compile)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in SETTINGS:
        if not any(r["setting"] == name for r in rows):
            continue
        cells = [name]
        for mode in modes:
            row, base = by.get((name, mode)), by.get(("concat-early", mode))
            cells += [f"{row['it_per_s']:.3f}" if row else "–", ratio(row and row["it_per_s"], base and base["it_per_s"])]
        eager_ref, compile_ref = H100_REFERENCE[name]
        cells += [f"{PAPER_IT_S[name]:.2f}", ratio(PAPER_IT_S[name], PAPER_IT_S["concat-early"]), f"{eager_ref:.2f}",
                  f"{compile_ref:.2f}", ratio(compile_ref, H100_REFERENCE["concat-early"][1])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="autocast precision (default bf16, as the trainer on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 256; 4 with --small)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the training model (same run)")
    parser.add_argument("--only-compile", action="store_true", help="time torch.compile only")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 5 with --small)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 2 with --small)")
    parser.add_argument("--compile-warmup", type=int, default=5, help="extra untimed steps for compiled runs (recompiles settle)")
    parser.add_argument("--small", action="store_true", help="width 64 on 8x8 latents: checks the script on any machine")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    args.batch = args.batch or (4 if args.small else 256)
    args.steps = args.steps or (5 if args.small else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.small else 5)
    if args.dtype not in DTYPES:
        parser.error(f"--dtype must be one of {sorted(DTYPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    modes = [True] if args.only_compile else [False, True] if args.compile else [False]
    rows = []
    for compiled in modes:
        for name in args.settings:
            row = measure(name, config_for(name, args.small), args, compiled)
            release(torch.device(args.device))
            emit(row, args.out)
            rows.append(row)
    sys.stdout.write("\n" + table(rows) + "\n")
    if {"concat-early", "cross-intermediate"} <= set(args.settings):
        for mode in sorted({r["mode"] for r in rows}):
            early = next(r for r in rows if r["mode"] == mode and r["setting"] == "concat-early")
            inter = next(r for r in rows if r["mode"] == mode and r["setting"] == "cross-intermediate")
            sys.stdout.write(f"{mode}: cross-intermediate / concat-early = {inter['it_per_s'] / early['it_per_s']:.2f} "
                             f"(paper {PAPER_IT_S['cross-intermediate'] / PAPER_IT_S['concat-early']:.2f}, H100 reference compiled "
                             f"{H100_REFERENCE['cross-intermediate'][1] / H100_REFERENCE['concat-early'][1]:.2f})\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
