"""Regenerate ``lavibridge_adapter_golden.safetensors``, ``lavibridge_adapter_config.json`` and
``lavibridge_adapter_layouts.json`` with the official LaVi-Bridge ``TextAdapter``.

The recipe is the one ``lavibridge_adapter_README.md`` documents. Run outside CI, against a checkout of
ShihaoZhaoZSH/LaVi-Bridge at the commit below (its ``modules/adapters.py`` is imported, never copied):

    python tests/data/make_lavibridge_adapter_golden.py --official /path/to/LaVi-Bridge [--out DIR] [--check]

Needs torch, safetensors and diffusers (the official class is a diffusers ``ModelMixin``; the golden was
made with diffusers 0.42.1, whose version ends up in the config and the metadata).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import golden_tools  # noqa: E402

REPO, COMMIT = "ShihaoZhaoZSH/LaVi-Bridge", "5a725f379f153991b36f307e099de01500f364c2"
SOURCE = f"{REPO} @ {COMMIT}, modules/adapters.py"
ARGS = [16, 12, 8]
INPUT_SHAPE = (2, 5, 16)
# The released adapters: (in_dim, int_dim, out_dim).
RELEASED = {"t5_unet": [1024, 896, 768], "llama2_unet": [4096, 2432, 768], "t5_transformer": [1024, 2560, 4096]}


def main(argv: list[str] | None = None) -> None:
    args = golden_tools.parse_args(__doc__.splitlines()[0], REPO, COMMIT, argv)
    golden_tools.use_official(args.official)
    import diffusers
    from modules.adapters import TextAdapter  # the official class

    torch.manual_seed(0)
    model = TextAdapter(*ARGS)
    golden_tools.rerandomise(model)
    model.eval()
    x = torch.randn(INPUT_SHAPE)
    with torch.no_grad():
        y = model(x).sample
        y64 = model.double()(x.double()).sample
    model.float()
    golden_tools.say(f"TextAdapter{tuple(ARGS)}: max |y| = {y.abs().max().item():.3g}, "
                     f"float32 vs float64 {(y.double() - y64).abs().max().item():.2g}")
    tensors = {f"state.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tensors["input"], tensors["output"] = x, y.contiguous()
    metadata = {"source": SOURCE, "args": json.dumps(ARGS), "torch": torch.__version__, "diffusers": diffusers.__version__}
    golden = args.stage / "lavibridge_adapter_golden.safetensors"
    save_file(tensors, str(golden), metadata=metadata)

    # The config.json the official class's save_pretrained writes.
    config = args.stage / "lavibridge_adapter_config.json"
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        # Byte for byte as committed: the same text without diffusers' final newline.
        config.write_text((Path(folder) / "config.json").read_text().rstrip("\n"))

    layouts, counts = {}, {}
    for name, dims in RELEASED.items():
        with torch.device("meta"):
            released = TextAdapter(*dims)
        layouts[name] = {k: list(v.shape) for k, v in released.state_dict().items()}
        counts[name] = sum(p.numel() for p in released.parameters())
    layout_file = args.stage / "lavibridge_adapter_layouts.json"
    layout_file.write_text(json.dumps({"source": SOURCE, "args": RELEASED, "param_counts": counts, "layouts": layouts}, indent=1))
    golden_tools.finish(args, [golden, config, layout_file])


if __name__ == "__main__":
    main()
