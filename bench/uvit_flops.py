"""Parameters and GFLOPs of the intermediate-fusion U-ViT settings (paper Table 1 and two ablations).

    python bench/uvit_flops.py                 # markdown table
    python bench/uvit_flops.py --json          # one JSON line per setting
    python bench/uvit_flops.py --batch 4 --json --out bench/results.jsonl

U-ViT-Small on 32×32×4 latents with 77×768 CLIP text. FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` on the meta device (nothing is computed), per sample:

- ``gflops``: 2 per multiply-add over every Linear and Conv2d (the paper's stated convention);
  attention products (QKᵀ, AV) are listed separately as ``attention_gflops``.
- ``paper_convention_gflops``: ``gflops`` plus the layers outside the transformer blocks (patch and
  context embeddings, head, final conv: 0.069 GF) counted once more. This reproduces every value the
  paper prints to its two decimals, so that is how its counter must have treated them; the pack reports
  ``gflops``, which counts each layer once and is within 0.3% of the paper.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
from timing import emit  # noqa: E402

import support  # noqa: E402,F401  (imports this repository as the package x2i)
from x2i.uvit.config import PAPER_SETTINGS  # noqa: E402
from x2i.uvit.flops import uvit_cost  # noqa: E402

# Paper Table 1 (GFLOPs as printed; parameters as printed in millions) and the ablation settings.
PAPER = {
    "concat-early": (45, 29.56),
    "concat-intermediate": (48, 25.84),
    "cross-early": (45, 23.82),
    "cross-intermediate": (48, 23.66),
    "cross-intermediate[1,0]": (48, None),
    "cross-intermediate[0,4]": (45, None),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1, help="batch size of the counted forward (FLOPs are per sample)")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a markdown table")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)

    rows = []
    for name, config in PAPER_SETTINGS.items():
        cost = uvit_cost(config, batch=args.batch)
        paper_params_m, paper_gflops = PAPER[name]
        row = {"benchmark": "uvit_flops", "setting": name, "n_text": config.n_text, "n_image": config.n_image, **cost.to_dict()}
        row["paper_params_m"] = paper_params_m
        row["paper_gflops"] = paper_gflops
        row["vs_paper_pct"] = None if paper_gflops is None else round(100 * (cost.gflops / paper_gflops - 1), 3)
        rows.append(row)

    for row in rows:
        if args.json:
            emit(row, args.out)  # stdout, and the file when given
        elif args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    if not args.json:
        lines = [
            "| setting | [N_text, N_image] | params | GFLOPs (linear+conv) | paper GFLOPs | vs paper | paper convention | attention GFLOPs |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            paper = "–" if r["paper_gflops"] is None else f"{r['paper_gflops']:.2f}"
            delta = "–" if r["vs_paper_pct"] is None else f"{r['vs_paper_pct']:+.2f}%"
            lines.append(
                f"| {r['setting']} | [{r['n_text']},{r['n_image']}] | {r['params']:,} | {r['gflops']:.3f} | {paper} | "
                f"{delta} | {r['paper_convention_gflops']:.3f} | {r['attention_gflops']:.3f} |"
            )
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
