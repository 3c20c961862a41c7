"""AudioCLIP audio branch speed: batch-1 latency and batch-16 throughput of this pack's encoder.

    python bench/audio_encode.py --device cpu
    python bench/audio_encode.py --device cuda --dtype bf16
    python bench/audio_encode.py --device cuda --dtype fp16 --compile

Times ``AudioCLIPAudioEncoder.forward`` (fbsp spectrogram, ResNeXt backbone with attention, sum over
channels, fc, L2 normalisation) on ready GlueGen clips ``[B, 2, 176400]`` already on the device, as
the reference table in shared/design/performance.md does for the official code. ``encode_audio_ms``
adds the input convention for one 4 s stereo 48 kHz clip coming from the CPU (resampling, min-max,
transfer). Weights are random at the real size (32.1M parameters); the time does not depend on the
values. Each figure is the median of ``--repeats`` timed calls after warm-up. Writes one JSON line to
stdout and, with ``--out``, appends it to a file.
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
from x2i.encoders.audioclip import AudioCLIPAudioEncoder, ESResNeXtFBSP  # noqa: E402

CLIP_SAMPLES = 176400


def build_encoder(device: torch.device, dtype: torch.dtype, channels_last: bool, compile_: bool) -> AudioCLIPAudioEncoder:
    torch.manual_seed(0)
    network = ESResNeXtFBSP()
    with torch.no_grad():  # a trained-looking filter bank (fractional powers, shifted centres)
        network.fbsp.m.uniform_(0.2, 2.5)
        network.fbsp.fb.uniform_(0.5, 2.0)
        network.fbsp.fc.add_(torch.rand_like(network.fbsp.fc) - 0.5)
        # BatchNorm statistics from one train-mode pass, as training leaves them: with the initial 0/1
        # statistics activations explode, the attention sigmoids saturate and the products underflow
        # to subnormal floats, which makes CPU convolutions several times slower than with real weights.
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None
        network.train()(torch.rand(2, 2, CLIP_SAMPLES // 4) * 65535 - 32768)
    network = network.eval().requires_grad_(False).to(device=device, dtype=dtype)
    encoder = AudioCLIPAudioEncoder(network, name="AudioCLIP (random)", channels_last=channels_last)
    encoder.apply_memory_format()
    if compile_:
        network.compile(mode="max-autotune-no-cudagraphs" if device.type == "cuda" else None)
    return encoder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=16, help="batch of the throughput figure")
    parser.add_argument("--channels-last", choices=("on", "off"), default="on", help="the encoder's default: on")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (front-end filters stay eager)")
    parser.add_argument("--warmup", type=int, default=None, help="default: 5 on CUDA, 1 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default: 30 on CUDA, 3 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    repeats = args.repeats if args.repeats is not None else (30 if cuda else 3)
    channels_last = args.channels_last == "on"

    encoder = build_encoder(device, dtype, channels_last, args.compile)
    generator = torch.Generator().manual_seed(1)
    one = (torch.rand(1, 2, CLIP_SAMPLES, generator=generator) * 65535 - 32768).to(device)
    many = (torch.rand(args.batch, 2, CLIP_SAMPLES, generator=generator) * 65535 - 32768).to(device)
    raw_48k = torch.randn(1, 2, 4 * 48000, generator=generator)

    batch1 = median_ms(lambda: encoder(one), device, warmup, repeats)
    batched = median_ms(lambda: encoder(many), device, warmup, repeats)
    encode = median_ms(lambda: encoder.encode_audio(raw_48k, 48000), device, warmup, repeats)
    result = {
        "bench": "audioclip_audio_encode",
        "device": device_label(device),
        "dtype": str(dtype).removeprefix("torch."),
        "channels_last": channels_last,
        "compile": args.compile,
        "torch": torch.__version__,
        "repeats": repeats,
        "batch1_ms": round(batch1, 2),
        f"batch{args.batch}_ms": round(batched, 2),
        f"batch{args.batch}_clips_per_s": round(args.batch * 1000 / batched, 1),
        "encode_audio_48k_batch1_ms": round(encode, 2),
    }
    if cuda:
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
