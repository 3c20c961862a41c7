"""LaVi-Bridge training throughput: optimiser steps per second of the bridge trainer's model.

    python bench/bridge_training.py --device cuda                      # SD1.5 U-Net + T5-Large, 512 px, batch 8, bf16
    python bench/bridge_training.py --device cuda --compile --latents vae
    python bench/bridge_training.py --device cuda --sdxl               # SDXL base U-Net + T5-Large, 1024 px, batch 4, bf16
    python bench/bridge_training.py --small                            # tiny models on the CPU: proves the script runs
    python bench/bridge_training.py --small --sdxl                     # a tiny SDXL-shaped U-Net on the CPU

One step is what ``train bridge`` runs: T5 (+ LoRA) -> TextAdapter -> U-Net (+ LoRA) forward under bf16
autocast, ε-MSE, backward, gradient clipping 1.0, AdamW with the official learning rates. The models are
the trainer's own (``training.bridge_task``), with random weights at the real sizes, built from explicit
configs (SD1.5's U-Net and VAE, T5-Large's encoder), so nothing is downloaded. ``--latents cached``
(default) feeds latents as the latent cache does; ``--latents vae`` encodes 512 px images with the SD VAE
every step, as a run without the cache. ``--sdxl``: SDXL base's U-Net (its diffusers config) and VAE (run in
float32, as the trainer runs it), the adapter with its pooled head feeding SDXL's pooled vector, and each sample's
six size numbers (``time_ids``). Reports the median step time after warm-up as it/s and
samples/s, and the peak GPU memory. Writes one JSON line to stdout and, with ``--out``, to a file.

Needs torch, transformers, diffusers (>= 0.30) and peft (>= 0.13): ``pip install -r requirements-train.txt``.
On a machine without internet, install those wheels from a local folder (``pip download`` them elsewhere).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
from timing import DTYPES, device_label, emit, time_training_steps  # noqa: E402

# T5-Large (google-t5/t5-large), the released T5 bridges' language model: its encoder half.
T5_LARGE = {
    "vocab_size": 32128, "d_model": 1024, "d_kv": 64, "d_ff": 4096, "num_layers": 24, "num_heads": 16,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu", "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
}
SMALL_T5 = {**T5_LARGE, "vocab_size": 512, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4}
SMALL_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8,
}
# An SDXL-shaped U-Net, small: the trainer tests' (SDXL's 2048 context, pooled text + size embedding).
from support.bridge_training import TINY_SDXL_UNET_CONFIG as SMALL_SDXL_UNET  # noqa: E402

SMALL_VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [8, 16, 16, 16], "latent_channels": 4,
    "layers_per_block": 1, "norm_num_groups": 8, "scaling_factor": 0.18215,
}
NEEDS = "torch, transformers, diffusers>=0.30 and peft>=0.13 (pip install -r requirements-train.txt)"


def _imports():
    missing = []
    for name in ("diffusers", "peft", "transformers"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        sys.stderr.write(
            f"bench/bridge_training.py needs {NEEDS}; missing: {', '.join(missing)}. Without internet, install the wheels "
            "from a folder: pip install --no-index --find-links WHEELS diffusers peft accelerate\n"
        )
        raise SystemExit(2)
    import support  # noqa: F401  (imports this repository as the package x2i)


def build(args, device: torch.device):
    """The trainer's model (LoRA in both models, adapter) at the requested size, and its optimiser."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from x2i.bridge import TextAdapter, TextAdapterConfig, text_lora_targets
    from x2i.bridge.language_models import LaViBridgeRecipe
    from x2i.training.bridge_task import (
        BridgeOptimSettings,
        BridgeTrainingModel,
        build_bridge_optimizer,
        enable_activation_checkpointing,
        inject_lora,
    )
    from x2i.training.diffusion_models import (
        SD1_UNET_CONFIG,
        SD1_VAE_CONFIG,
        SDXL_UNET_CONFIG,
        SDXL_VAE_CONFIG,
        DiffusionModel,
        make_scheduler,
    )

    kind = "sdxl" if args.sdxl else "sd1"
    if args.sdxl:
        small_vae = {**SMALL_VAE, "scaling_factor": 0.13025, "force_upcast": True}
        unet_config, vae_config = (SMALL_SDXL_UNET, small_vae) if args.small else (SDXL_UNET_CONFIG, SDXL_VAE_CONFIG)
    else:
        unet_config, vae_config = (SMALL_UNET, SMALL_VAE) if args.small else (SD1_UNET_CONFIG, SD1_VAE_CONFIG)
    t5_config = SMALL_T5 if args.small else T5_LARGE
    torch.manual_seed(0)
    with torch.device(device):  # initialised where they run: no 1 GB copy from the CPU
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config) if args.latents == "vae" else None
        t5 = T5EncoderModel(T5Config(**t5_config))
    for module in (unet, vae, t5):
        if module is not None:
            module.requires_grad_(False).eval()
    # The VAE in float32 (SDXL's as the trainer keeps it; SD1's as this script always built it), under bf16 autocast.
    diffusion = DiffusionModel(kind, unet, vae, make_scheduler(kind), vae_config["scaling_factor"], unet_config["cross_attention_dim"], "random")
    vision_targets = diffusion.lora_targets()
    text_targets = text_lora_targets(t5, "t5")
    inject_lora(unet, vision_targets, args.rank, 0.1)
    if args.text_lora:
        inject_lora(t5, text_targets, args.rank, 0.1)
    hidden, context = t5_config["d_model"], unet_config["cross_attention_dim"]
    adapter = TextAdapter(TextAdapterConfig(hidden, (hidden + context) // 2, context, pooled_dim=diffusion.pooled_dim))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.text_lora:
            enable_activation_checkpointing(t5)
    model = BridgeTrainingModel(t5, adapter, diffusion, LaViBridgeRecipe.T5_UNET, args.text_lora).to(device).train()
    optimizer = build_bridge_optimizer(model, BridgeOptimSettings(), kind)  # the task's groups and official LRs
    counts = {
        "vision_lora_layers": len(vision_targets), "text_lora_layers": len(text_targets) if args.text_lora else 0,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
    }
    return model, optimizer, counts


def make_batch(args, device: torch.device, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(2, vocab, (args.batch, 77), generator=g),
        "attention_mask": torch.ones(args.batch, 77, dtype=torch.long),
    }
    if args.latents == "cached":
        size = args.resolution // 8
        batch["latent_mean"] = torch.randn(args.batch, 2, 4, size, size, generator=g)
        batch["latent_std"] = torch.rand(args.batch, 2, 4, size, size, generator=g) * 0.01
    else:
        batch["pixels"] = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=g) * 2 - 1
    if args.sdxl:  # a 4:3 landscape photo, resized and centre-cropped to the training square (image_data.crop_geometry)
        res = args.resolution
        batch["time_ids"] = torch.tensor([[res * 3 // 4, res, 0, res // 6, res, res]] * args.batch, dtype=torch.float32)
    return {k: v.to(device) for k, v in batch.items()}


def bench(args) -> dict:
    device = torch.device(args.device)
    model, optimizer, counts = build(args, device)
    runner = torch.compile(model) if args.compile else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = make_batch(args, device, 512 if args.small else T5_LARGE["vocab_size"])
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step() -> float:
        with autocast:
            loss = runner(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        return loss.item()

    timed = time_training_steps(step, device, args.warmup, args.steps)
    median = timed.median_s
    return {
        "bench": "bridge_training",
        "device": device_label(device),
        "models": ("tiny SDXL-shaped (--small --sdxl)" if args.sdxl else "tiny (--small)") if args.small else
                  f"{'SDXL base' if args.sdxl else 'SD1.5'} U-Net + T5-Large encoder (random weights)",
        "diffusion_model": "sdxl" if args.sdxl else "sd1",
        "resolution": args.resolution, "batch": args.batch, "precision": args.dtype, "compile": args.compile,
        "latents": args.latents, "text_lora": args.text_lora, "gradient_checkpointing": args.gradient_checkpointing,
        "rank": args.rank, **counts,
        "step_ms": round(median * 1000, 1), "it_per_s": round(1 / median, 3), "samples_per_s": round(args.batch / median, 2),
        "warmup_s": round(timed.warmup_s, 1), "steps": args.steps, "last_loss": round(timed.last, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=f"Needs {NEEDS}.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="autocast precision (default bf16, as the trainer on CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training model")
    parser.add_argument("--sdxl", action="store_true", help="SDXL base's U-Net and VAE instead of SD1.5's (default 1024 px, batch 4)")
    parser.add_argument("--batch", type=int, default=None, help="default 8, 4 with --sdxl (2 with --small)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 512, 1024 with --sdxl; 64 with --small)")
    parser.add_argument("--latents", choices=("cached", "vae"), default="cached", help="latents from the cache, or the VAE every step")
    parser.add_argument("--no-text-lora", dest="text_lora", action="store_false", help="train without the T5 LoRA")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 5 with --small)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5, 10 with --compile; 2 with --small)")
    parser.add_argument("--small", action="store_true", help="tiny models at 64 px: checks the script on any machine")
    parser.add_argument("--out", type=Path, help="also append the JSON line to this file")
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.small else 4 if args.sdxl else 8)
    args.resolution = args.resolution or (64 if args.small else 1024 if args.sdxl else 512)
    args.steps = args.steps or (5 if args.small else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.small else 10 if args.compile else 5)
    if args.resolution % 8:
        parser.error("--resolution must be a multiple of 8")
    if args.dtype not in DTYPES:
        parser.error(f"--dtype must be one of {sorted(DTYPES)}")
    _imports()
    emit(bench(args), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
