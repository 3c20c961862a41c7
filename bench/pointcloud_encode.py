"""Point-cloud encoding: ULIP PointBERT ``encode_points`` latency (batch 1) and throughput (batch 16).

    python bench/pointcloud_encode.py                                  # CPU, fp32 and bf16
    python bench/pointcloud_encode.py --device cuda --variant ulip2_colored
    python bench/pointcloud_encode.py --dtypes fp32 --repeats 5 --out bench/results.jsonl

Weights are random at the real sizes (ULIP-1: 8192 xyz points, depth 12; ULIP-2: 10k xyz+rgb points,
depth 18); latency does not depend on the values. The input is a raw cloud of ``--points`` points
(default 10000, what load_point_cloud samples from a mesh), so the timings include ULIP's input
convention (FPS down to the model's point count when larger, normalisation) and the grouping FPS.
``prepare_ms`` and ``network_ms`` split the batch-1 latency. Each figure is a median of
``--repeats`` timed calls after warm-up. Writes one JSON line to stdout and, with ``--out``, to a file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
from timing import DTYPES, device_label, emit, median_ms  # noqa: E402

import support  # noqa: E402,F401  (imports this repository as the package x2i)
from x2i.encoders.pointbert import PointBERTConfig, PointBERTEncoder  # noqa: E402

VARIANTS = {"ulip1": PointBERTConfig.ulip1, "ulip2_colored": PointBERTConfig.ulip2_colored, "ulip2_xyz": PointBERTConfig.ulip2_xyz}


def random_encoder(config: PointBERTConfig, device: torch.device, dtype: torch.dtype) -> PointBERTEncoder:
    """PyTorch's default (fan-in scaled) init, like a trained model's activation ranges. Tiny weights
    (e.g. N(0, 0.02) everywhere) drive the CPU into denormal floats and time that instead."""
    torch.manual_seed(0)
    encoder = PointBERTEncoder(config, name=f"{config.variant} (random)")
    with torch.no_grad():
        model = encoder.model
        torch.nn.init.normal_(model.pc_projection, std=config.feature_dim**-0.5)  # ULIP's own init
        torch.nn.init.normal_(model.cls_token, std=0.02)
        torch.nn.init.normal_(model.cls_pos, std=1.0)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    encoder.device = device
    return encoder.to(device=device, dtype=dtype).eval()


def bench(variant: str, device: torch.device, dtype: torch.dtype, points: int, batch: int, warmup: int, repeats: int) -> dict:
    config = VARIANTS[variant]()
    encoder = random_encoder(config, device, dtype)
    generator = torch.Generator().manual_seed(1)
    # Surface-like clouds: points on a unit sphere with some thickness, colours when the model takes them.
    cloud = torch.nn.functional.normalize(torch.randn(batch, points, 3, generator=generator), dim=-1)
    cloud = cloud * (0.8 + 0.2 * torch.rand(batch, points, 1, generator=generator))
    if config.in_channels == 6:
        cloud = torch.cat([cloud, torch.rand(batch, points, 3, generator=generator)], dim=-1)
    cloud = cloud.to(device)
    one = cloud[:1]
    prepared = encoder.prepare_points(one)
    result = {
        "latency_ms_b1": median_ms(lambda: encoder.encode_points(one), device, warmup, repeats),
        "prepare_ms_b1": median_ms(lambda: encoder.prepare_points(one), device, warmup, repeats),
        "network_ms_b1": median_ms(lambda: encoder.model(prepared), device, warmup, repeats),
    }
    batch_ms = median_ms(lambda: encoder.encode_points(cloud), device, max(1, warmup // 2), max(1, repeats // 4))
    result[f"throughput_clouds_per_s_b{batch}"] = batch / (batch_ms / 1000)
    return {k: round(v, 2) for k, v in result.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="ulip1")
    parser.add_argument("--points", type=int, default=10000, help="points per raw input cloud")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    result: dict[str, object] = {
        "bench": "pointcloud_encode",
        "device": device_label(device),
        "torch": torch.__version__, "variant": args.variant, "input_points": args.points, "repeats": args.repeats,
    }
    for name in args.dtypes.split(","):
        result[name] = bench(args.variant, device, DTYPES[name.strip()], args.points, args.batch, args.warmup, args.repeats)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
