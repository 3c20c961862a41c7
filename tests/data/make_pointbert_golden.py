"""Regenerate ``pointbert_golden.safetensors`` and ``pointbert_official_layouts.json`` with the official ULIP code.

The recipe is the one ``pointbert_golden.md`` documents: the official ``PointTransformer`` /
``PointTransformer_Colored`` built from the official yaml configs, ``pc_projection`` and ``encode_pc`` of
``models/ULIP_models.py``, weights from ``deterministic_state(layout, seed=1)`` of
``tests/encoders/test_pointbert.py``. Run outside CI, against a checkout of salesforce/ULIP at the commit
below (imported, never copied):

    python tests/data/make_pointbert_golden.py --official /path/to/ULIP [--out DIR] [--check]

Needs torch, numpy, PyYAML, easydict, timm (``DropPath``; the identity in ``eval()``) and matplotlib
(``misc.py`` imports it). pointnet2_ops' CUDA ``furthest_point_sample`` is replaced by the literal CPU
emulation of the kernel the markdown describes (``reference_cuda_fps`` of the test module) and its
``gather_operation`` by ``torch.gather``; ``knn_cuda`` (imported, unused by ``Group``), and what only
ULIP's data/CLIP code imports (``open_clip``, ``data.dataset_3d``, ``termcolor`` when missing) are stubs.

The input point clouds (a chair-like mesh surface, a sphere shell with a cluster at the origin, a coloured
torus with a grey cluster) are stored data: their construction was not recorded, so they are read from
``--points`` (default: the committed golden) and the official code is re-run on them.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import golden_tools  # noqa: E402

REPO, COMMIT = "salesforce/ULIP", "f194ddbfc1219ee1030e866b8be62d77539a3642"
FILES = ["models/pointbert/point_encoder.py", "models/pointbert/dvae.py", "models/pointbert/misc.py", "models/ULIP_models.py"]
WEIGHT_SEED = 1
YAML_8K = "models/pointbert/PointTransformer_8192point.yaml"
YAML_10K = "models/pointbert/ULIP_2_PointBERT_10k_colored_pointclouds.yaml"
# variant: (official encoder class, yaml, projection width, ULIP model class whose encode_pc is used)
VARIANTS = {
    "ulip1": ("PointTransformer", YAML_8K, 512, "ULIP_WITH_IMAGE"),
    "ulip2_colored": ("PointTransformer_Colored", YAML_10K, 1280, "ULIP2_WITH_OPENCLIP"),
    "ulip2_xyz": ("PointTransformer", YAML_10K, 1280, "ULIP2_WITH_OPENCLIP"),
}
GOLDEN_VARIANTS = ["ulip1", "ulip2_colored"]


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *args, **kwargs: None})


def _stub(name: str, **attributes) -> types.ModuleType:
    module = _StubModule(name)
    module.__path__ = []
    module.__dict__.update(attributes)
    sys.modules[name] = module
    parent, _, leaf = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], leaf, module)
    return module


class CudaFPSEmulation:
    """pointnet2_ops.pointnet2_utils on the CPU: the kernel's picks, recorded for the golden."""

    def __init__(self, reference_cuda_fps):
        self.reference = reference_cuda_fps
        self.picks: list[torch.Tensor] = []

    def furthest_point_sample(self, xyz: torch.Tensor, number: int) -> torch.Tensor:
        idx = self.reference(xyz.detach().cpu(), number)
        self.picks.append(idx)
        return idx.to(torch.int32)

    @staticmethod
    def gather_operation(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """[B, C, N] gathered at [B, M] -> [B, C, M]."""
        idx = idx.long().unsqueeze(1).expand(-1, features.shape[1], -1)
        return torch.gather(features, 2, idx)


def import_official(checkout: Path, fps: CudaFPSEmulation):
    golden_tools.use_official(checkout)
    for name in ("termcolor", "easydict", "timm"):
        try:
            __import__(name)
        except ImportError:
            if name != "termcolor":
                raise SystemExit(f"the official code needs {name}: pip install {name}") from None
            _stub(name, colored=lambda text, *args, **kwargs: text)
    _stub("pointnet2_ops")
    _stub("pointnet2_ops.pointnet2_utils", furthest_point_sample=fps.furthest_point_sample,
          gather_operation=fps.gather_operation)
    _stub("knn_cuda")
    _stub("open_clip")
    # ULIP_models star-imports data.dataset_3d for its own torch and np (and datasets it does not need here).
    import data  # noqa: F401  (official namespace package)

    _stub("data.dataset_3d", torch=torch, np=np)
    from models import ULIP_models  # noqa: I001  (official)
    from models.pointbert import point_encoder
    from utils.config import cfg_from_yaml_file

    return point_encoder, ULIP_models, cfg_from_yaml_file


class ULIPPointTower(nn.Module):
    """The point half of ULIP's model classes: their ``point_encoder`` and ``pc_projection`` attributes,
    the only ones the official ``encode_pc`` reads (the image/text towers are left out)."""

    def __init__(self, encoder: nn.Module, projection_width: int):
        super().__init__()
        self.point_encoder = encoder
        self.pc_projection = nn.Parameter(torch.empty(768, projection_width))


def build(variant: str, checkout: Path, point_encoder, cfg_from_yaml_file) -> ULIPPointTower:
    class_name, yaml_file, width, _ = VARIANTS[variant]
    config = cfg_from_yaml_file(str(checkout / yaml_file))
    args = types.SimpleNamespace(evaluate_3d=True)  # do not load the pretraining checkpoint
    return ULIPPointTower(getattr(point_encoder, class_name)(config.model, args=args), width)


def main(argv: list[str] | None = None) -> None:
    args = golden_tools.parse_args(
        __doc__.splitlines()[0], REPO, COMMIT, argv,
        points=dict(type=Path, default=golden_tools.DATA_DIR / "pointbert_golden.safetensors",
                    help="a safetensors file holding <variant>.points (default: the committed golden)"),
    )
    recipes = golden_tools.load_test_module("encoders/test_pointbert.py")
    fps = CudaFPSEmulation(recipes.reference_cuda_fps)
    point_encoder, ULIP_models, cfg_from_yaml_file = import_official(args.official, fps)
    torch.set_num_threads(min(torch.get_num_threads(), 2))

    layouts, counts = {}, {}
    for variant in VARIANTS:
        model = build(variant, args.official, point_encoder, cfg_from_yaml_file)
        layouts[variant] = {k: list(v.shape) for k, v in model.state_dict().items()}
        counts[variant] = sum(p.numel() for p in model.parameters())
    source = {"repo": REPO, "commit": COMMIT, "files": FILES}
    layout_path = args.stage / "pointbert_official_layouts.json"
    layout_path.write_text(json.dumps({"param_counts": counts, "source": source, **layouts}, indent=1, sort_keys=True))

    with safe_open(str(args.points), framework="pt") as handle:
        points = {variant: handle.get_tensor(f"{variant}.points") for variant in GOLDEN_VARIANTS}
    tensors = {}
    for variant in GOLDEN_VARIANTS:
        model = build(variant, args.official, point_encoder, cfg_from_yaml_file)
        # The weights are a function of the key *without* the ``point_encoder.`` prefix (the key the pack's
        # PointBERT and its test use), so the test regenerates the very same tensors for its model.
        stripped = {k.removeprefix("point_encoder."): v for k, v in layouts[variant].items()}
        state = recipes.deterministic_state(stripped, seed=WEIGHT_SEED)
        model.load_state_dict({("pc_projection" if k == "pc_projection" else f"point_encoder.{k}"): v
                               for k, v in state.items()}, strict=True)
        model.eval()
        encode_pc = getattr(ULIP_models, VARIANTS[variant][3]).encode_pc  # the official function
        fps.picks.clear()
        with torch.no_grad():
            features = model.point_encoder(points[variant])
            embed = encode_pc(model, points[variant])
        centre_idx = fps.picks[0]
        assert all(torch.equal(p, centre_idx) for p in fps.picks)
        golden_tools.say(f"{variant}: features {tuple(features.shape)} max |y| {features.abs().max().item():.3g}, "
                         f"embed {tuple(embed.shape)} max |y| {embed.abs().max().item():.3g}")
        tensors.update({f"{variant}.points": points[variant], f"{variant}.centre_idx": centre_idx,
                        f"{variant}.features": features, f"{variant}.embed": embed})
    metadata = {"source": json.dumps(source), "weights": "deterministic_state(layout, seed=1) in tests/test_pointbert.py"}
    golden = args.stage / "pointbert_golden.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(golden), metadata=metadata)
    golden_tools.finish(args, [golden, layout_path])


if __name__ == "__main__":
    main()
