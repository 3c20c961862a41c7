"""Regenerate ``gluenet_golden.safetensors`` and ``gluenet_official_layouts.json`` with the official GlueGen classes.

The recipe is the one ``gluenet_golden.md`` documents.

Run outside CI, against a checkout of salesforce/GlueGen at the commit below (nothing is copied from it):

    python tests/data/make_gluenet_golden.py --official /path/to/GlueGen [--out DIR] [--check]

Needs torch, safetensors and einops (``x_transformer.py`` imports it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import golden_tools  # noqa: E402

REPO, COMMIT = "salesforce/GlueGen", "4159352d888d3cafb8f6ac666f0275dce0d885ce"
FILE = "stable-diffusion/ldm/modules/encoders/translators.py"

# prefix -> (official class, constructor args, input shape)
CASES = {
    "translator_noln": ("Translator_noln", [8, 16, 12, 2, 2], (2, 8, 16)),
    "translator": ("Translator", [8, 16, 12, 2, 2], (2, 8, 16)),
    "translator_same": ("Translator", [8, 16, 16, 2, 2], (2, 8, 16)),
    "translator_w_head": ("Translator_w_head", [4, 6, 8, 12, 4, 5], (2, 4, 8)),
    "translator_attn": ("Translator_attn", [8, 16, 12, 2, 2], (2, 8, 16)),
}
# The classes behind the released checkpoints, full size, built on the meta device.
LAYOUTS = {
    "Translator_noln(77,1024,768,2,5)": ("Translator_noln", [77, 1024, 768, 2, 5]),
    "Translator_w_head(16,77,64,768,4,5)": ("Translator_w_head", [16, 77, 64, 768, 4, 5]),
}


def golden_case(translators, prefix: str) -> dict[str, torch.Tensor]:
    name, args, shape = CASES[prefix]
    torch.manual_seed(0)
    model = getattr(translators, name)(*args)
    golden_tools.rerandomise(model)
    model.eval()
    x = torch.randn(shape)
    with torch.no_grad():
        y = model(x)
    tensors = {f"{prefix}.state.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tensors[f"{prefix}.input"] = x
    tensors[f"{prefix}.output"] = y.contiguous()
    golden_tools.say(f"{prefix}: {name}{tuple(args)} max |y| = {y.abs().max().item():.4g}")
    return tensors


def write_layouts(translators, path: Path) -> None:
    layouts, counts = {}, {}
    for label, (name, args) in LAYOUTS.items():
        with torch.device("meta"):
            model = getattr(translators, name)(*args)
        layouts[label] = {k: list(v.shape) for k, v in model.state_dict().items()}
        counts[label] = sum(p.numel() for p in model.parameters())
    # One key per line with its shape inline, as the committed file is laid out.
    lines = ["{"]
    for label, layout in layouts.items():
        lines.append(f" {json.dumps(label)}: {{")
        lines.append(",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in layout.items()))
        lines.append(" },")
    lines.append(' "param_counts": ' + json.dumps(counts, indent=1).replace("\n", "\n "))
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = golden_tools.parse_args(__doc__.splitlines()[0], REPO, COMMIT, argv)
    golden_tools.use_official(args.official / "stable-diffusion")
    from ldm.modules.encoders import translators  # the official module

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    tensors: dict[str, torch.Tensor] = {}
    for prefix in CASES:
        tensors.update(golden_case(translators, prefix))
    metadata = {f"{prefix}.args": json.dumps(case[1], separators=(",", ":")) for prefix, case in CASES.items()}
    metadata["source"] = f"{REPO} @ {COMMIT}, {FILE}"
    golden = args.stage / "gluenet_golden.safetensors"
    save_file(tensors, str(golden), metadata=metadata)
    layouts = args.stage / "gluenet_official_layouts.json"
    write_layouts(translators, layouts)
    golden_tools.finish(args, [golden, layouts])


if __name__ == "__main__":
    main()
