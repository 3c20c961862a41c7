"""ULIP PointBERT: sampling rules of the CUDA kernel, key layouts and full-size outputs of the official
code (tests/data/pointbert_*), checkpoint loading, and the input convention of ``encode_points``."""

from __future__ import annotations

import json
import logging
import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from support import DATA_DIR
from support.models import fake_ulip_checkpoint, official_pointbert_layout, splitmix_uniform, stripped_pointbert_layout
from support.precision import ENCODER_HALF, assert_close_in_half
from x2i.encoders.pointbert import (
    CUDA_FPS_MIN_NORM_SQ,
    ULIP_DEFAULT_RGB,
    PointBERT,
    PointBERTCheckpointError,
    PointBERTConfig,
    PointBERTEncoder,
    build_pointbert,
    detect_config,
    farthest_point_sample,
    group_points,
    knn,
    load_ulip_pointbert,
)
from x2i.encoders.pointcloud import PointCloudError

GOLDEN = DATA_DIR / "pointbert_golden.safetensors"
LAYOUTS = DATA_DIR / "pointbert_official_layouts.json"
PRESETS = {"ulip1": PointBERTConfig.ulip1, "ulip2_colored": PointBERTConfig.ulip2_colored, "ulip2_xyz": PointBERTConfig.ulip2_xyz}
TINY = PointBERTConfig(variant="tiny", num_points=256, depth=1, width=48, heads=2, num_groups=64, group_size=32, encoder_dims=32, output_dim=16)
TINY_COLORED = PointBERTConfig(
    variant="tiny_colored", num_points=256, in_channels=6, depth=1, width=48, heads=2, num_groups=64, group_size=32, encoder_dims=32, output_dim=16
)


# --- deterministic weights: the golden file was produced by feeding these to the official classes ---------


def deterministic_state(layout: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Non-trivial weights for a PointBERT key layout, a pure function of (key, shape, seed)."""
    state = {}
    for key in sorted(layout):
        shape = tuple(layout[key])
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0, dtype=torch.long)
            continue
        n = int(np.prod(shape)) if shape else 1
        u = splitmix_uniform(n, seed * 1_000_003 + (zlib.crc32(key.encode()) << 20)).reshape(shape)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "running_var":
            values = 1.0 + 0.5 * u
        elif leaf == "running_mean":
            values = 0.2 * u
        elif leaf == "weight" and len(shape) == 1:  # LayerNorm / BatchNorm scale
            values = 1.0 + 0.2 * u
        elif leaf == "bias":
            values = 0.1 * u
        elif key in ("cls_token", "cls_pos"):
            values = 0.5 * u
        else:  # Linear / Conv1d weights and pc_projection: variance 1 / fan_in
            fan_in = shape[0] if key == "pc_projection" else int(np.prod(shape[1:]))
            values = u * np.sqrt(3.0 / fan_in)
        state[key] = torch.from_numpy(values.astype(np.float32))
    return state


def golden(variant: str) -> dict[str, torch.Tensor]:
    with safe_open(str(GOLDEN), framework="pt") as f:
        return {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(f"{variant}.")}


def tiny_encoder(config: PointBERTConfig = TINY, seed: int = 3) -> PointBERTEncoder:
    layout = {k: list(v.shape) for k, v in PointBERT(config).state_dict().items()}
    return build_pointbert(config, deterministic_state(layout, seed), name=config.variant)


# --- an independent reference of pointnet2_ops' furthest_point_sampling_kernel --------------------------


def reference_cuda_fps(xyz: torch.Tensor, m: int, skip_near_origin: bool = True) -> torch.Tensor:
    """Literal emulation of the kernel: each thread scans k = t, t+T, ... keeping its first maximum
    (strict >), skips |p|² <= 1e-3, then the shared-memory tournament keeps the lower slot on ties."""
    out = []
    for cloud in xyz.float().numpy():
        n = cloud.shape[0]
        threads = max(min(1 << int(math.log(float(n)) / math.log(2.0)), 512), 1)
        rounds = -(-n // threads)
        x, y, z = (cloud[:, i] for i in range(3))
        eligible = (x * x + y * y + z * z).astype(np.float64) > 1e-3 if skip_near_origin else np.ones(n, bool)
        temp = np.full(n, 1e10, dtype=np.float32)
        k_of = np.arange(rounds * threads).reshape(rounds, threads)
        picks, old = [0], 0
        for _ in range(1, m):
            d = (x - x[old]) * (x - x[old]) + (y - y[old]) * (y - y[old]) + (z - z[old]) * (z - z[old])
            temp = np.where(eligible, np.minimum(d, temp), temp)
            scan = np.full(rounds * threads, -np.inf)
            scan[:n] = np.where(eligible, temp, -np.inf)
            scan = scan.reshape(rounds, threads)
            top = scan.max(axis=0)
            first = np.argmax(scan == top[None], axis=0)
            dists = np.where(np.isfinite(top), top, -1.0)
            dists_i = np.where(np.isfinite(top), k_of[first, np.arange(threads)], 0)
            step = threads // 2
            while step >= 1:
                v1, v2 = dists[:step].copy(), dists[step : 2 * step].copy()
                i1, i2 = dists_i[:step].copy(), dists_i[step : 2 * step].copy()
                dists[:step], dists_i[:step] = np.maximum(v1, v2), np.where(v2 > v1, i2, i1)
                step //= 2
            old = int(dists_i[0])
            picks.append(old)
        out.append(picks)
    return torch.tensor(out, dtype=torch.long)


def textbook_fps(xyz: torch.Tensor, m: int) -> torch.Tensor:
    """Greedy farthest-first traversal from index 0 (one cloud, no ties expected)."""
    chosen, nearest = [0], np.full(xyz.shape[0], np.inf)
    pts = xyz.double().numpy()
    for _ in range(1, m):
        nearest = np.minimum(nearest, ((pts - pts[chosen[-1]]) ** 2).sum(-1))
        chosen.append(int(nearest.argmax()))
    return torch.tensor(chosen)


def _grid(side: int = 9) -> torch.Tensor:
    axis = torch.linspace(-1, 1, side)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(1, -1, 3)


# --- sampling and grouping ----------------------------------------------------------------------


def test_fps_starts_at_index_zero_and_is_deterministic():
    xyz = torch.randn(3, 2000, 3, generator=torch.Generator().manual_seed(0))
    first = farthest_point_sample(xyz, 256)
    assert first.shape == (3, 256) and first.dtype == torch.long
    assert (first[:, 0] == 0).all()
    assert torch.equal(first, farthest_point_sample(xyz, 256))
    assert all(len(set(row.tolist())) == 256 for row in first)  # never picks a point twice


def test_fps_is_batched_consistently():
    xyz = torch.randn(4, 1500, 3, generator=torch.Generator().manual_seed(1))
    batched = farthest_point_sample(xyz, 128, min_norm_sq=CUDA_FPS_MIN_NORM_SQ)
    singles = torch.cat([farthest_point_sample(xyz[i : i + 1], 128, min_norm_sq=CUDA_FPS_MIN_NORM_SQ) for i in range(4)])
    assert torch.equal(batched, singles)


def test_fps_without_ties_is_farthest_first_traversal():
    xyz = torch.rand(1, 3000, 3, generator=torch.Generator().manual_seed(2)) + 1.0
    assert torch.equal(farthest_point_sample(xyz, 200)[0], textbook_fps(xyz[0], 200))


@pytest.mark.parametrize(
    "case",
    ["random_8192", "random_1000", "random_300", "random_40_all", "grid_ties", "grid_shuffled", "duplicates", "near_origin"],
)
@pytest.mark.device
def test_fps_matches_the_cuda_kernel(case, device):
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    if case.startswith("random"):
        n = int(case.split("_")[1])
        xyz = torch.randn(2, n, 3, generator=gen) * 0.5
    elif case == "grid_ties":
        xyz = _grid()
    elif case == "grid_shuffled":
        xyz = _grid()[:, torch.randperm(729, generator=gen)]
    elif case == "duplicates":  # a small cloud repeated up to 8192 points, as encode_points does
        xyz = torch.randn(1, 100, 3, generator=gen)[:, torch.arange(8192) % 100]
    else:  # a dense cluster inside the kernel's skipped ball around the origin
        xyz = torch.cat([torch.randn(1, 64, 3, generator=gen) * 0.005, torch.randn(1, 2000, 3, generator=gen)], dim=1)
    m = min(512, xyz.shape[1])
    ours = farthest_point_sample(xyz.to(device), m, min_norm_sq=CUDA_FPS_MIN_NORM_SQ)
    assert ours.device.type == device.type
    assert torch.equal(ours.cpu(), reference_cuda_fps(xyz, m))  # the same indices on every device


def test_fps_tie_rule_is_the_kernels_not_lowest_index():
    # On a grid many distances are exactly equal; the kernel's thread tournament decides them.
    xyz = _grid()
    lowest_index = textbook_fps(xyz[0], 128)
    assert not torch.equal(farthest_point_sample(xyz, 128)[0], lowest_index)
    assert torch.equal(farthest_point_sample(xyz, 128), reference_cuda_fps(xyz, 128, skip_near_origin=False))


def test_fps_never_picks_points_near_the_origin_after_the_first():
    gen = torch.Generator().manual_seed(5)
    shell = F.normalize(torch.randn(1, 500, 3, generator=gen), dim=-1)  # hollow: the origin cluster is far from it
    xyz = torch.cat([shell[:, :1], torch.randn(1, 50, 3, generator=gen) * 0.005, shell[:, 1:]], 1)
    idx = farthest_point_sample(xyz, 200, min_norm_sq=CUDA_FPS_MIN_NORM_SQ)
    assert not bool(((xyz[0, idx[0, 1:]] ** 2).sum(-1) <= CUDA_FPS_MIN_NORM_SQ).any())
    plain = farthest_point_sample(xyz, 200)
    assert bool(((xyz[0, plain[0, 1:]] ** 2).sum(-1) <= CUDA_FPS_MIN_NORM_SQ).any())


def test_fps_rejects_bad_requests():
    with pytest.raises(ValueError, match=r"\[B, N, 3\]"):
        farthest_point_sample(torch.zeros(10, 3), 4)
    with pytest.raises(ValueError, match="cannot pick 11"):
        farthest_point_sample(torch.zeros(1, 10, 3), 11)


def test_knn_finds_nearest_including_the_point_itself():
    gen = torch.Generator().manual_seed(6)
    points = torch.rand(2, 500, 3, generator=gen)
    query = points[:, :20]
    idx = knn(query, points, 8)
    brute = torch.cdist(query.double(), points.double()).topk(8, largest=False).indices
    assert idx.shape == (2, 20, 8)
    assert (idx[:, :, 0] == torch.arange(20)).all()
    assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(idx.reshape(-1, 8), brute.reshape(-1, 8), strict=True))


def test_grouping_subtracts_centres_and_keeps_raw_rgb():
    gen = torch.Generator().manual_seed(7)
    xyz = torch.randn(1, 300, 3, generator=gen)
    rgb = torch.rand(1, 300, 3, generator=gen)
    local, centres = group_points(torch.cat([xyz, rgb], -1), 16, 8)
    assert local.shape == (1, 16, 8, 6) and centres.shape == (1, 16, 3)
    centre_idx = farthest_point_sample(xyz, 16, min_norm_sq=CUDA_FPS_MIN_NORM_SQ)[0]
    assert torch.equal(centres[0], xyz[0, centre_idx])
    nearest = knn(centres, xyz, 8)[0]
    torch.testing.assert_close(local[0, ..., :3], xyz[0, nearest] - centres[0, :, None])
    assert torch.equal(local[0, ..., 3:], rgb[0, nearest])
    assert torch.equal(local[0, :, 0, :3], torch.zeros(16, 3))  # each centre is its own nearest neighbour


# --- the official network: layouts and outputs ----------------------------------------------------


@pytest.mark.parametrize("variant", sorted(PRESETS))
def test_key_layout_equals_official(variant):
    ours = {k: list(v.shape) for k, v in PointBERT(PRESETS[variant]()).state_dict().items()}
    assert ours == stripped_pointbert_layout(variant)
    assert set(official_pointbert_layout(variant)) == {f"point_encoder.{k}" for k in ours if k != "pc_projection"} | {"pc_projection"}


def test_layout_file_records_its_provenance():
    data = json.loads(LAYOUTS.read_text())
    assert data["source"]["repo"] == "salesforce/ULIP" and len(data["source"]["commit"]) == 40
    for variant in PRESETS:
        params = sum(math.prod(s) for k, s in official_pointbert_layout(variant).items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
        assert params == data["param_counts"][variant]


def full_size_model(variant: str, device: torch.device, dtype: torch.dtype = torch.float32) -> PointBERT:
    model = PointBERT(PRESETS[variant]()).eval()
    model.load_state_dict(deterministic_state(stripped_pointbert_layout(variant), seed=1), strict=True)
    return model.to(device=device, dtype=dtype)


@pytest.mark.device
@pytest.mark.parametrize("variant", ["ulip1", "ulip2_colored"])
def test_full_size_forward_matches_official(variant, device):
    """Full-size ULIP-1 / ULIP-2 colored with deterministic weights against outputs of the official classes."""
    data = golden(variant)
    config = PRESETS[variant]()
    model = full_size_model(variant, device)
    points = data["points"].to(device)
    assert points.shape[1:] == (config.num_points, config.in_channels)
    centre_idx = farthest_point_sample(points[..., :3], config.num_groups, min_norm_sq=config.fps_min_norm_sq)
    assert torch.equal(centre_idx.cpu(), data["centre_idx"])
    with torch.inference_mode():
        features = model.forward_features(points)
        embed = features @ model.pc_projection
    # float32 vs float32 (different kernels: SDPA vs explicit softmax); observed max |diff| ~3e-6 at |y| ~4.
    torch.testing.assert_close(features.cpu(), data["features"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(embed.cpu(), data["embed"], atol=1e-4, rtol=1e-4)


@pytest.mark.device
def test_full_size_float16_as_comfyui_runs_it_on_a_gpu_stays_close_to_float32(device):
    data = golden("ulip2_colored")
    model = full_size_model("ulip2_colored", device, ENCODER_HALF)
    with torch.inference_mode():  # geometry (FPS, kNN, centring) in float32, the transformer in float16
        embed = model.forward_features(data["points"].to(device)) @ model.pc_projection
    assert embed.dtype == ENCODER_HALF
    assert_close_in_half(embed, data["embed"], ENCODER_HALF, "ULIP-2 PointBERT")


def test_golden_file_records_its_provenance():
    with safe_open(str(GOLDEN), framework="pt") as f:
        metadata = f.metadata()
    source = json.loads(metadata["source"])
    assert source["repo"] == "salesforce/ULIP" and "models/pointbert/point_encoder.py" in source["files"]


# --- checkpoints ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ulip1_checkpoint(tmp_path_factory):
    checkpoint, point_state = fake_ulip_checkpoint("ulip1")
    path = tmp_path_factory.mktemp("ulip") / "ULIP-PointBERT-8k-xyz-pc-slip_vit_b-shapenet-pretrained.pt"
    torch.save(checkpoint, path)
    return path, point_state


def test_released_ulip1_layout_loads(ulip1_checkpoint):
    path, point_state = ulip1_checkpoint
    encoder = load_ulip_pointbert(path)
    assert encoder.config == PointBERTConfig.ulip1()
    assert (encoder.output_dim, encoder.num_points, encoder.in_channels) == (512, 8192, 3)
    assert encoder.name == path.stem and encoder.device == torch.device("cpu") and not encoder.training
    loaded = encoder.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in point_state.items())
    assert not any(p.requires_grad for p in encoder.parameters())


@pytest.mark.parametrize("variant", ["ulip2_colored", "ulip2_xyz"])
def test_ulip2_variants_are_detected_from_shapes(variant):
    _, point_state = fake_ulip_checkpoint(variant)
    assert detect_config(point_state) == PRESETS[variant]()


def test_released_ulip2_layout_loads_from_a_bare_state_dict(tmp_path):
    # A ULIP-2 file may hold the OpenCLIP tower too (ignored); here without the "module." prefix.
    checkpoint, point_state = fake_ulip_checkpoint("ulip2_colored", seed=1)
    state = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    state["open_clip_model.visual.proj"] = torch.zeros(4, 4)
    path = tmp_path / "ulip2.pt"
    torch.save({"state_dict": state}, path)
    encoder = load_ulip_pointbert(path)
    assert encoder.config == PointBERTConfig.ulip2_colored() and encoder.output_dim == 1280


def test_resaved_safetensors_loads(tmp_path):
    encoder = tiny_encoder()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(path))
    loaded = load_ulip_pointbert(path)
    assert loaded.config.depth == 1 and loaded.output_dim == 16


def _save(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"blocks.0.net_sen.0.weight": torch.zeros(2, 2), "tail.net_sen.0.weight": torch.zeros(2, 2)}, "GlueNet Loader"),
        ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, "models/checkpoints"),
        ({"base_model": {"transformer_q.cls_token": torch.zeros(1)}}, "Point-BERT pre-training"),
        ({"state_dict": {"module.point_encoder.sa1.conv.weight": torch.zeros(2)}}, "another 3D backbone"),
    ],
)
def test_wrong_files_are_named(tmp_path, state, message):
    with pytest.raises(PointBERTCheckpointError, match=message):
        load_ulip_pointbert(_save(tmp_path, "wrong.pt", state))


def test_missing_projection_is_refused(tmp_path):
    _, point_state = fake_ulip_checkpoint("ulip1")
    del point_state["pc_projection"]
    with pytest.raises(PointBERTCheckpointError, match="pc_projection"):
        load_ulip_pointbert(_save(tmp_path, "backbone.pt", {"state_dict": {f"module.point_encoder.{k}": v for k, v in point_state.items()}}))


def test_wrong_shapes_are_listed(tmp_path):
    _, point_state = fake_ulip_checkpoint("ulip1")
    point_state["blocks.blocks.3.mlp.fc1.weight"] = torch.zeros(100, 384)
    with pytest.raises(PointBERTCheckpointError, match=r"wrong shapes 1 .*blocks\.blocks\.3\.mlp\.fc1\.weight"):
        load_ulip_pointbert(_save(tmp_path, "bad.pt", point_state))


class _Custom:
    """Stands for arbitrary pickled code that weights_only loading refuses."""


def test_unsafe_pickle_is_refused_with_the_fix(tmp_path):
    path = _save(tmp_path, "unsafe.pt", {"state_dict": {}, "extra": _Custom()})
    with pytest.raises(PointBERTCheckpointError, match=r"never loaded.*safetensors copy of its state_dict"):
        load_ulip_pointbert(path)


def test_truncated_and_missing_files(tmp_path, ulip1_checkpoint):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ulip1_checkpoint[0].read_bytes()[:5000])
    with pytest.raises(PointBERTCheckpointError, match="could not be read"):
        load_ulip_pointbert(truncated)
    with pytest.raises(PointBERTCheckpointError, match="not found"):
        load_ulip_pointbert(tmp_path / "absent.pt")
    with pytest.raises(PointBERTCheckpointError, match="holds a list"):
        load_ulip_pointbert(_save(tmp_path, "list.pt", [torch.zeros(1)]))


# --- encode_points: ULIP's input convention ----------------------------------------------------------


def reference_prepare(cloud: torch.Tensor, num_points: int) -> torch.Tensor:
    """FPS from index 0 (plain, on raw coordinates) when larger, then ULIP's pc_norm; repeat when smaller."""
    if cloud.shape[0] > num_points:
        cloud = cloud[textbook_fps(cloud[:, :3], num_points)]
    xyz = cloud[:, :3].double()
    xyz = xyz - xyz.mean(0)
    xyz = xyz / xyz.norm(dim=-1).max()
    out = torch.cat([xyz.float(), cloud[:, 3:]], -1)
    return out[torch.arange(num_points) % out.shape[0]]


def test_encode_points_output_contract():
    encoder = tiny_encoder()
    points = torch.rand(3, 500, 3, generator=torch.Generator().manual_seed(8))
    out = encoder.encode_points(points)
    assert out.shape == (3, 16) and out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    raw = encoder.encode_points(points, normalize=False)
    torch.testing.assert_close(F.normalize(raw, dim=-1), out)
    with torch.inference_mode():
        torch.testing.assert_close(raw, encoder.model(encoder.prepare_points(points)))
    torch.testing.assert_close(encoder.encode_points(points[0]), out[:1])  # one cloud [N, C] is a batch of one


def test_input_convention_subsample_normalise_repeat():
    encoder = tiny_encoder()
    gen = torch.Generator().manual_seed(9)
    large = torch.rand(1, 450, 3, generator=gen) * 7 + 3
    prepared = encoder.prepare_points(large)
    assert prepared.shape == (1, 256, 3)
    torch.testing.assert_close(prepared[0], reference_prepare(large[0], 256), atol=1e-6, rtol=0)
    assert prepared[0].norm(dim=-1).max().item() == pytest.approx(1.0, abs=1e-6)
    # Above 2 x num_points: a seeded random choice (order kept) first, then the same FPS.
    huge = torch.rand(1, 5000, 3, generator=gen)
    keep = torch.randperm(5000, generator=torch.Generator().manual_seed(0))[:512].sort().values
    torch.testing.assert_close(encoder.prepare_points(huge)[0], reference_prepare(huge[0, keep], 256), atol=1e-6, rtol=0)
    small = torch.rand(1, 100, 3, generator=gen) - 5
    torch.testing.assert_close(encoder.prepare_points(small)[0], reference_prepare(small[0], 256), atol=1e-6, rtol=0)
    exact = torch.rand(1, 256, 3, generator=gen)
    torch.testing.assert_close(encoder.prepare_points(exact)[0], reference_prepare(exact[0], 256), atol=1e-6, rtol=0)


def test_embedding_ignores_position_and_scale():
    encoder = tiny_encoder()
    points = torch.rand(1, 400, 3, generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(encoder.encode_points(points * 20 + 5), encoder.encode_points(points), atol=2e-5, rtol=1e-4)


def test_colour_channels_follow_ulip():
    gen = torch.Generator().manual_seed(11)
    xyz = torch.rand(1, 300, 3, generator=gen)
    rgb = torch.rand(1, 300, 3, generator=gen)
    colored = tiny_encoder(TINY_COLORED)
    prepared = colored.prepare_points(xyz)
    assert prepared.shape == (1, 256, 6) and (prepared[..., 3:] == ULIP_DEFAULT_RGB).all()
    assert not torch.allclose(colored.encode_points(torch.cat([xyz, rgb], -1)), colored.encode_points(xyz))
    plain = tiny_encoder()
    torch.testing.assert_close(plain.encode_points(torch.cat([xyz, rgb], -1)), plain.encode_points(xyz))
    with pytest.raises(PointCloudError, match="0..1"):
        colored.encode_points(torch.cat([xyz, rgb * 255], -1))


def test_non_finite_points_are_dropped(caplog):
    encoder = tiny_encoder()
    points = torch.rand(2, 300, 3, generator=torch.Generator().manual_seed(12))
    broken = points.clone()
    broken[0, ::7, 1] = float("nan")
    broken[1, 5] = float("inf")
    with caplog.at_level(logging.WARNING, logger="encoders.pointbert"):
        out = encoder.encode_points(broken)
    assert "NaN/Inf" in caplog.text
    expected = torch.cat([encoder.encode_points(points[0][torch.isfinite(broken[0]).all(-1)]), encoder.encode_points(points[1][torch.isfinite(broken[1]).all(-1)])])
    torch.testing.assert_close(out, expected)
    broken[0, 20:] = float("nan")
    with pytest.raises(PointCloudError, match="only 17 finite points"):
        encoder.encode_points(broken)


@pytest.mark.parametrize(
    ("points", "message"),
    [
        (torch.rand(1, 31, 3), "at least 32"),
        (torch.ones(1, 100, 3), "same position"),
        (torch.rand(1, 100, 4), r"\[batch, N, 3\]"),
        (torch.rand(0, 100, 3), "no point clouds"),
    ],
)
def test_bad_inputs_are_refused(points, message):
    with pytest.raises(PointCloudError, match=message):
        tiny_encoder().encode_points(points)


def test_huge_clouds_are_cut_before_fps():
    encoder = PointBERTEncoder(PointBERTConfig.ulip1())  # geometry only; the network is not run
    cloud = torch.rand(1, 3_000_000, 3, generator=torch.Generator().manual_seed(13))
    first = encoder.prepare_points(cloud)
    assert first.shape == (1, 8192, 3)
    assert torch.equal(first, encoder.prepare_points(cloud))  # deterministic


def test_runs_in_bfloat16_with_float32_geometry():
    encoder = tiny_encoder()
    points = torch.rand(2, 300, 3, generator=torch.Generator().manual_seed(14))
    reference = encoder.encode_points(points)
    out = encoder.to(torch.bfloat16).encode_points(points)
    assert out.dtype == torch.float32
    assert F.cosine_similarity(out, reference).min().item() > 0.98
