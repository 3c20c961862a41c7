"""Regenerate ``uvit_golden.safetensors`` and ``uvit_official_layouts.json`` with the official U-ViT classes.

The recipe is the one ``uvit_golden.md`` documents. Two official repositories are involved, both imported
(never copied), each as its own package (``fork`` and ``baofff``: both name theirs ``libs``):

- zizhao-hu/U-ViT (``--official``): ``libs/uvit_t2i.py`` and ``libs/uvit_t2i_cross.py``: the six ``fork_*``
  golden cases, the ``paper`` layouts and their costs;
- baofff/U-ViT (``--official-baofff``): ``libs/uvit_t2i.py``: the ``uvit_concat_early`` case and the
  ``uvit_mscoco_small`` layout (``configs/mscoco_uvit_small.py``'s arguments, read with ml_collections).

Run outside CI, against checkouts at the commits below:

    python tests/data/make_uvit_golden.py --official /path/to/zizhao-hu-U-ViT \\
        --official-baofff /path/to/baofff-U-ViT [--out DIR] [--check]

Needs torch, einops, safetensors and ml_collections. Without xformers installed both repositories run
their ``flash`` attention (``scaled_dot_product_attention``), as the golden was made.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import golden_tools  # noqa: E402

FORK_REPO, FORK_COMMIT = "zizhao-hu/U-ViT", "3088884089fddbadf63ac1a4b980b10cb697ddfe"
UVIT_REPO, UVIT_COMMIT = "baofff/U-ViT", "ce551708dc9cde9818d2af7d84dfadfeb7bd9034"
SOURCE = {
    "fork": f"{FORK_REPO}@{FORK_COMMIT} libs/uvit_t2i.py, libs/uvit_t2i_cross.py, libs/timm.py",
    "uvit": f"{UVIT_REPO}@{UVIT_COMMIT} libs/uvit_t2i.py, libs/timm.py",
}
TINY_ARGS = dict(img_size=32, patch_size=2, in_chans=4, embed_dim=128, depth=4, num_heads=2, mlp_ratio=2,
                 qkv_bias=False, mlp_time_embed=False, clip_dim=32, num_clip_token=77)
# case -> (official module, constructor overrides); the order of the metadata and of the runs.
GOLDEN_CASES = {
    "fork_concat_early": ("fork.uvit_t2i", dict(c=0, v=0)),
    "fork_concat_intermediate": ("fork.uvit_t2i", dict(c=1, v=1)),
    "fork_cross_early": ("fork.uvit_t2i_cross", dict(c=0, v=0)),
    "fork_cross_intermediate": ("fork.uvit_t2i_cross", dict(c=1, v=1)),
    "fork_cross_text_only": ("fork.uvit_t2i_cross", dict(c=2, v=0)),
    "fork_concat_image_only": ("fork.uvit_t2i", dict(c=0, v=2)),
    "uvit_concat_early": ("baofff.uvit_t2i", dict(qkv_bias=True, mlp_time_embed=True)),
}
INPUT_T = [37.0, 912.5]
# U-ViT-Small, the paper's settings (concat/cross × early/intermediate and the cross ablations).
PAPER_ARGS = dict(img_size=32, patch_size=2, in_chans=4, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4,
                  qkv_bias=False, mlp_time_embed=False, clip_dim=768, num_clip_token=77)
PAPER_CLASSES = {
    "concat-early": ("fork.uvit_t2i", 0, 0),
    "concat-intermediate": ("fork.uvit_t2i", 1, 4),
    "cross-early": ("fork.uvit_t2i_cross", 0, 0),
    "cross-intermediate": ("fork.uvit_t2i_cross", 1, 4),
    "cross-intermediate[1,0]": ("fork.uvit_t2i_cross", 1, 0),
    "cross-intermediate[0,4]": ("fork.uvit_t2i_cross", 0, 4),
}


def import_package(name: str, folder: Path):
    """``folder`` (an official ``libs``) as the package ``name``, so that its relative imports work."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


def official_class(path: str):
    module = importlib.import_module(path)
    return module.UViT


def mscoco_uvit_small_args(checkout: Path) -> dict:
    spec = importlib.util.spec_from_file_location("_baofff_mscoco_uvit_small", checkout / "configs" / "mscoco_uvit_small.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    nnet = module.get_config().nnet.to_dict()
    assert nnet.pop("name") == "uvit_t2i"
    return nnet


def layout_of(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def official_cost(model: torch.nn.Module, args: dict) -> dict[str, int]:
    from x2i.uvit.flops import measure  # the pack's counter, pointed at the official class

    x = torch.zeros(1, args["in_chans"], args["img_size"], args["img_size"], device="meta")
    t = torch.full((1,), 500.0, device="meta")
    context = torch.zeros(1, args["num_clip_token"], args["clip_dim"], device="meta")
    cost = measure(model.eval(), (x, t, context))
    return {"params": cost.params, "linear_conv_flops": cost.linear_conv_flops, "attention_flops": cost.attention_flops}


def main(argv: list[str] | None = None) -> None:
    args = golden_tools.parse_args(
        __doc__.splitlines()[0], FORK_REPO, FORK_COMMIT, argv,
        official_baofff=dict(type=Path, required=True, help=f"a checkout of {UVIT_REPO} at {UVIT_COMMIT}"),
    )
    args.official_baofff = args.official_baofff.resolve()
    golden_tools.check_commit(args.official_baofff, UVIT_COMMIT)
    golden_tools.use_tests_package()
    deterministic_state = golden_tools.load_test_module("uvit/test_uvit_checkpoint.py").deterministic_state
    import_package("fork", args.official / "libs")
    import_package("baofff", args.official_baofff / "libs")
    torch.set_num_threads(1)  # tiny models: one thread, as the tests run them

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor(INPUT_T)
    tensors = {"input.x": x, "input.t": t, "input.context": context}
    metadata = {"source": f"{SOURCE['fork']}; {SOURCE['uvit']}"}
    tiny = {}
    for case, (module, overrides) in GOLDEN_CASES.items():
        case_args = dict(TINY_ARGS, **overrides)
        model = official_class(module)(**case_args)
        tiny[case] = layout_of(model)
        model.load_state_dict(deterministic_state(tiny[case]), strict=True)
        model.eval()
        with torch.no_grad():
            y = model(x, t, context)
        golden_tools.say(f"{case}: {module}.UViT max |y| = {y.abs().max().item():.3g}")
        tensors[f"{case}.output"] = y.contiguous()
        metadata[f"{case}.class"] = f"{module}.UViT"
        metadata[f"{case}.args"] = json.dumps(case_args)
    golden = args.stage / "uvit_golden.safetensors"
    save_file(tensors, str(golden), metadata=metadata)

    paper, costs, counts = {}, {}, {}
    for name, (module, c, v) in PAPER_CLASSES.items():
        with torch.device("meta"):
            model = official_class(module)(**PAPER_ARGS, c=c, v=v)
        paper[name] = layout_of(model)
        costs[name] = official_cost(model, PAPER_ARGS)
        counts[name] = costs[name]["params"]
    mscoco_args = mscoco_uvit_small_args(args.official_baofff)
    with torch.device("meta"):
        model = official_class("baofff.uvit_t2i")(**mscoco_args)
    mscoco = layout_of(model)
    costs["uvit_mscoco_small"] = official_cost(model, mscoco_args)
    counts["uvit_mscoco_small"] = costs["uvit_mscoco_small"]["params"]
    layouts = {
        "official_cost": costs,
        "paper": paper,
        "paper_args": PAPER_ARGS,
        "paper_classes": {name: {"class": f"{module}.UViT", "c": c, "v": v} for name, (module, c, v) in PAPER_CLASSES.items()},
        "param_counts": counts,
        "source": SOURCE,
        "tiny": tiny,
        "uvit_mscoco_small": mscoco,
    }
    layout_path = args.stage / "uvit_official_layouts.json"
    layout_path.write_text(json.dumps(layouts, sort_keys=True, separators=(",", ":")) + "\n")
    golden_tools.finish(args, [golden, layout_path])


if __name__ == "__main__":
    main()
