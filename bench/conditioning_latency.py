"""Conditioning latency: XLM-R-large + GlueNet (the GlueGen multilingual path) versus SD1.5's own
CLIP text encoder, measured in the same process on the same device; with ``--sdxl``, an SDXL GlueNet (77 x 2048
and its pooled head) versus SDXL's two text encoders (CLIP ViT-L + OpenCLIP ViT-bigG, ComfyUI's SDXLClipModel).

    python bench/conditioning_latency.py --device cpu
    python bench/conditioning_latency.py --device cuda --dtype fp16
    COMFYUI_PATH=/path/to/ComfyUI python bench/conditioning_latency.py   # adds ComfyUI's own SD1 CLIP
    COMFYUI_PATH=/path/to/ComfyUI python bench/conditioning_latency.py --sdxl

Weights are random (real sizes: XLM-R large 24x1024, GlueNet 77x1024->768 depth 5, CLIP ViT-L/14
text 12x768); latency does not depend on the values. Each figure is the median of ``--repeats``
timed calls of one prompt (tokenisation included) after warm-up. Writes a JSON line to stdout and,
with ``--out``, to a file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
from timing import DTYPES, device_label, emit, median_ms  # noqa: E402

import support  # noqa: E402,F401  (imports this repository as the package x2i)
from x2i.encoders.text import HFTextEncoder  # noqa: E402
from x2i.gluenet import GlueNet, GlueNetConfig  # noqa: E402

PROMPT = "Peinture impressionniste d'un jardin d'après-midi, lumière douce, couleurs vives"


def build_gluegen(device: torch.device, dtype: torch.dtype, sdxl: bool = False) -> Callable[[], torch.Tensor]:
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from support.models import make_xlm_roberta_folder

    # The tokenizer is a small one trained on the fly; tokenising one prompt costs the same order.
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(make_xlm_roberta_folder(Path(tmp) / "tok", hidden=32, layers=1))
    config = XLMRobertaConfig(  # xlm-roberta-large
        vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
    )
    model = XLMRobertaModel(config).to(device=device, dtype=dtype).eval()
    encoder = HFTextEncoder(model, tokenizer, "xlm-roberta-large (random)")
    family = {"target": "sdxl", "out_dim": 2048, "pooled_dim": 1280} if sdxl else {"out_dim": 768}
    gluenet_config = GlueNetConfig("translator_noln", num_tokens=77, in_dim=1024, mult=2, depth=5, input_divisor=3.0, **family)
    gluenet = GlueNet(gluenet_config).to(device=device, dtype=dtype).eval()
    return lambda: gluenet.translate_with_pooled(encoder.encode([PROMPT]))


def build_clip_transformers(device: torch.device, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

    config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
    model = CLIPTextModel(config).to(device=device, dtype=dtype).eval()
    comfy = os.environ.get("COMFYUI_PATH")
    if comfy is None:
        raise RuntimeError("needs COMFYUI_PATH for the CLIP tokenizer files ComfyUI ships")
    tokenizer = CLIPTokenizerFast.from_pretrained(Path(comfy) / "comfy" / "sd1_tokenizer")

    def run() -> torch.Tensor:
        tokens = tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return model(input_ids=tokens["input_ids"].to(device)).last_hidden_state

    return run


def build_clip_comfyui(device: torch.device, dtype: torch.dtype, sdxl: bool = False) -> Callable[[], torch.Tensor]:
    """ComfyUI's own SD1 CLIP, or SDXL's two text encoders (what CLIPTextEncode runs), with random weights."""
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    import comfy.cli_args

    comfy.cli_args.args.cpu = device.type == "cpu"
    import comfy.sd1_clip
    import comfy.sdxl_clip

    if sdxl:
        tokenizer, model = comfy.sdxl_clip.SDXLTokenizer(), comfy.sdxl_clip.SDXLClipModel(device=device, dtype=dtype)
    else:
        tokenizer, model = comfy.sd1_clip.SD1Tokenizer(), comfy.sd1_clip.SD1ClipModel(device=device, dtype=dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.eval()

    def run() -> torch.Tensor:
        return model.encode_token_weights(tokenizer.tokenize_with_weights(PROMPT))[0]

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sdxl", action="store_true", help="an SDXL GlueNet against SDXL's CLIP-L + bigG")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)

    result: dict[str, object] = {
        "device": device_label(device),
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "repeats": args.repeats,
    }
    if args.sdxl:
        gluegen, clip = "gluegen_xlmr_large_sdxl_gluenet_ms", "clip_l_bigg_comfyui_ms"
        timings = {gluegen: lambda d, t: build_gluegen(d, t, sdxl=True)}
        if os.environ.get("COMFYUI_PATH"):
            timings[clip] = lambda d, t: build_clip_comfyui(d, t, sdxl=True)
    else:
        gluegen, clip = "gluegen_xlmr_large_gluenet_ms", "clip_l_comfyui_ms"
        timings = {gluegen: build_gluegen}
        if os.environ.get("COMFYUI_PATH"):
            timings[clip] = build_clip_comfyui
            timings["clip_l_transformers_ms"] = build_clip_transformers
    for name, builder in timings.items():
        fn = builder(device, dtype)
        result[name] = round(median_ms(fn, device, args.warmup, args.repeats), 2)
        del fn
    if clip in result:
        result["ratio_gluegen_over_clip"] = round(result[gluegen] / result[clip], 2)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
