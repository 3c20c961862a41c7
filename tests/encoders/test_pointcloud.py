"""Point-cloud files (written here with trimesh and numpy), the refusals of bad input, and the preview."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch
import trimesh

from support.cost import cost_of
from x2i.encoders.pointcloud import (
    MIN_POINTS,
    PointCloud,
    PointCloudError,
    load_point_cloud,
    normalize_to_unit_sphere,
    render_preview,
)

RNG = np.random.default_rng(0)


def _cloud(n: int = 500) -> np.ndarray:
    return RNG.normal(size=(n, 3)).astype(np.float32)


def _rgb_u8(n: int) -> np.ndarray:
    return RNG.integers(0, 256, size=(n, 3), dtype=np.uint8)


# --- formats ---------------------------------------------------------------------------------------


def test_ply_point_cloud_with_and_without_colour(tmp_path):
    xyz, rgb = _cloud(), _rgb_u8(500)
    trimesh.PointCloud(xyz, colors=np.c_[rgb, np.full(500, 255, np.uint8)]).export(tmp_path / "coloured.ply")
    trimesh.PointCloud(xyz).export(tmp_path / "plain.ply")
    coloured = load_point_cloud(tmp_path / "coloured.ply")
    assert coloured.source == "coloured.ply" and coloured.points.dtype == torch.float32
    np.testing.assert_allclose(coloured.points.numpy(), xyz, rtol=0, atol=0)
    np.testing.assert_allclose(coloured.colors.numpy(), rgb / 255.0, atol=1e-6)
    plain = load_point_cloud(tmp_path / "plain.ply")
    assert plain.colors is None and plain.points.shape == (500, 3)
    assert plain.to_tensor().shape == (500, 3) and coloured.to_tensor().shape == (500, 6)


def test_ply_mesh_with_vertex_colours_is_sampled_with_colours(tmp_path):
    mesh = trimesh.creation.icosphere(subdivisions=2)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.tile([255, 0, 0, 255], (len(mesh.vertices), 1)).astype(np.uint8))
    mesh.export(tmp_path / "red_sphere.ply")
    cloud = load_point_cloud(tmp_path / "red_sphere.ply", surface_points=2000)
    assert len(cloud) == 2000
    np.testing.assert_allclose(cloud.colors.numpy(), np.tile([1.0, 0.0, 0.0], (2000, 1)), atol=1e-6)


@pytest.mark.parametrize("suffix", [".obj", ".stl", ".off", ".glb"])
def test_meshes_are_sampled_on_the_surface_deterministically(tmp_path, suffix):
    path = tmp_path / f"cube{suffix}"
    trimesh.creation.box(extents=(1, 1, 1)).export(path)
    cloud = load_point_cloud(path, surface_points=3000, seed=0)
    assert cloud.points.shape == (3000, 3) and cloud.colors is None
    # Every sample lies on a face of the unit cube: one coordinate is at +-0.5.
    assert np.allclose(np.abs(cloud.points.numpy()).max(axis=1), 0.5, atol=1e-5)
    assert torch.equal(load_point_cloud(path, surface_points=3000, seed=0).points, cloud.points)
    assert not torch.equal(load_point_cloud(path, surface_points=3000, seed=1).points, cloud.points)


def test_mesh_with_face_colours(tmp_path):
    mesh = trimesh.creation.box()
    mesh.visual = trimesh.visual.ColorVisuals(mesh, face_colors=np.tile([0, 0, 255, 255], (len(mesh.faces), 1)).astype(np.uint8))
    mesh.export(tmp_path / "blue.ply")
    cloud = load_point_cloud(tmp_path / "blue.ply", surface_points=500)
    np.testing.assert_allclose(cloud.colors.numpy(), np.tile([0.0, 0.0, 1.0], (500, 1)), atol=1e-6)


def test_textured_glb_takes_colours_from_the_texture(tmp_path):
    from PIL import Image

    mesh = trimesh.creation.box()
    mesh.visual = trimesh.visual.TextureVisuals(uv=RNG.random((len(mesh.vertices), 2)), image=Image.new("RGB", (4, 4), (0, 200, 0)))
    mesh.export(tmp_path / "textured.glb")
    cloud = load_point_cloud(tmp_path / "textured.glb", surface_points=200)
    np.testing.assert_allclose(cloud.colors.numpy(), np.tile([0.0, 200 / 255, 0.0], (200, 1)), atol=1e-6)


def test_npy_arrays(tmp_path):
    xyz = _cloud()
    np.save(tmp_path / "xyz.npy", xyz)
    np.save(tmp_path / "xyzrgb.npy", np.c_[xyz, RNG.uniform(0, 255, size=(500, 3))].astype(np.float32))
    np.save(tmp_path / "xyzrgb01.npy", np.c_[xyz, np.full((500, 3), 0.25)].astype(np.float32))
    assert load_point_cloud(tmp_path / "xyz.npy").colors is None
    assert 0.0 <= load_point_cloud(tmp_path / "xyzrgb.npy").colors.min() and load_point_cloud(tmp_path / "xyzrgb.npy").colors.max() <= 1.0
    assert torch.allclose(load_point_cloud(tmp_path / "xyzrgb01.npy").colors, torch.tensor(0.25))
    np.save(tmp_path / "wrong.npy", np.zeros((500, 5), np.float32))
    with pytest.raises(PointCloudError, match=r"\[N, C\]"):
        load_point_cloud(tmp_path / "wrong.npy")


def test_pickled_npy_is_refused_with_the_fix(tmp_path):
    np.save(tmp_path / "objaverse.npy", np.array({"xyz": _cloud(), "rgb": np.zeros((500, 3))}, dtype=object), allow_pickle=True)
    with pytest.raises(PointCloudError, match=r"np\.savez"):
        load_point_cloud(tmp_path / "objaverse.npy")


@pytest.mark.parametrize("key", ["points", "xyz", "pos", "arr_0"])
def test_npz_keys(tmp_path, key):
    xyz = _cloud()
    np.savez(tmp_path / "cloud.npz", **{key: xyz})
    np.testing.assert_array_equal(load_point_cloud(tmp_path / "cloud.npz").points.numpy(), xyz)


def test_npz_with_separate_colours_and_unknown_keys(tmp_path):
    xyz, rgb = _cloud(), _rgb_u8(500)
    np.savez(tmp_path / "coloured.npz", xyz=xyz, rgb=rgb)
    np.testing.assert_allclose(load_point_cloud(tmp_path / "coloured.npz").colors.numpy(), rgb / 255.0, atol=1e-6)
    np.savez(tmp_path / "other.npz", a=xyz, b=xyz)
    with pytest.raises(PointCloudError, match="points, xyz, pos"):
        load_point_cloud(tmp_path / "other.npz")


def test_text_formats(tmp_path):
    xyz = np.round(_cloud(), 5)
    (tmp_path / "plain.xyz").write_text("\n".join(" ".join(f"{v:.5f}" for v in row) for row in xyz) + "\n")
    np.testing.assert_allclose(load_point_cloud(tmp_path / "plain.xyz").points.numpy(), xyz, atol=1e-6)
    rgb01 = np.round(RNG.uniform(size=(500, 3)), 4)
    (tmp_path / "comma.txt").write_text("# x,y,z,r,g,b\n" + "\n".join(",".join(f"{v:.5f}" for v in row) for row in np.c_[xyz, rgb01]))
    cloud = load_point_cloud(tmp_path / "comma.txt")
    np.testing.assert_allclose(cloud.colors.numpy(), rgb01, atol=1e-6)
    rgb255 = _rgb_u8(500)
    (tmp_path / "scan.pts").write_text("500\n" + "\n".join(f"{x} {y} {z} 17 {r} {g} {b}" for (x, y, z), (r, g, b) in zip(xyz, rgb255, strict=True)))
    np.testing.assert_allclose(load_point_cloud(tmp_path / "scan.pts").colors.numpy(), rgb255 / 255.0, atol=1e-6)


def test_text_with_normals_is_read_as_xyz(tmp_path):
    # ModelNet40's resampled .txt files (ULIP's test data): x,y,z,nx,ny,nz.
    xyz = _cloud()
    normals = xyz / np.linalg.norm(xyz, axis=1, keepdims=True)
    (tmp_path / "airplane_0001.txt").write_text("\n".join(",".join(f"{v:.6f}" for v in row) for row in np.c_[xyz, normals]))
    assert load_point_cloud(tmp_path / "airplane_0001.txt").colors is None


def test_ragged_or_non_numeric_text_is_refused(tmp_path):
    (tmp_path / "ragged.xyz").write_text("1 2 3\n" * 40 + "1 2\n")
    with pytest.raises(PointCloudError, match="line 41"):
        load_point_cloud(tmp_path / "ragged.xyz")
    (tmp_path / "words.xyz").write_text("1 2 x\n" * 40)
    with pytest.raises(PointCloudError, match="not all values are numbers"):
        load_point_cloud(tmp_path / "words.xyz")


# --- refusals and repairs ----------------------------------------------------------------------------


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "cloud.las").write_bytes(b"LASF")
    with pytest.raises(PointCloudError, match=r"unsupported .*\.ply"):
        load_point_cloud(tmp_path / "cloud.las")
    with pytest.raises(PointCloudError, match="not found"):
        load_point_cloud(tmp_path / "absent.ply")


@pytest.mark.parametrize("suffix", [".ply", ".npy", ".npz", ".glb"])
def test_corrupt_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"\x00garbage\xff" * 50)
    with pytest.raises(PointCloudError, match="corrupt"):
        load_point_cloud(path)


def test_too_few_points(tmp_path):
    np.save(tmp_path / "few.npy", _cloud(MIN_POINTS - 1))
    with pytest.raises(PointCloudError, match="at least 32"):
        load_point_cloud(tmp_path / "few.npy")
    np.save(tmp_path / "enough.npy", _cloud(MIN_POINTS))
    assert len(load_point_cloud(tmp_path / "enough.npy")) == MIN_POINTS


def test_nan_points_are_dropped_with_a_warning(tmp_path, caplog):
    xyz = _cloud(200)
    xyz[::10, 0] = np.nan
    xyz[5, 2] = np.inf
    rgb = _rgb_u8(200)
    np.savez(tmp_path / "nan.npz", points=xyz, rgb=rgb)
    with caplog.at_level(logging.WARNING, logger="encoders.pointcloud"):
        cloud = load_point_cloud(tmp_path / "nan.npz")
    assert "dropped 21 points with NaN/Inf" in caplog.text
    keep = np.isfinite(xyz).all(axis=1)
    np.testing.assert_array_equal(cloud.points.numpy(), xyz[keep])
    np.testing.assert_allclose(cloud.colors.numpy(), rgb[keep] / 255.0, atol=1e-6)
    xyz[30:] = np.nan
    np.save(tmp_path / "mostly_nan.npy", xyz)
    with pytest.raises(PointCloudError, match="NaN/Inf"):
        load_point_cloud(tmp_path / "mostly_nan.npy")


def test_identical_points_are_refused(tmp_path):
    np.save(tmp_path / "same.npy", np.ones((100, 3), np.float32))
    with pytest.raises(PointCloudError, match="same position"):
        load_point_cloud(tmp_path / "same.npy")


def test_faceless_obj_uses_its_vertices(tmp_path, caplog):
    xyz = np.round(_cloud(100), 4)
    (tmp_path / "vertices.obj").write_text("".join(f"v {x} {y} {z}\n" for x, y, z in xyz))
    with caplog.at_level(logging.WARNING, logger="encoders.pointcloud"):
        cloud = load_point_cloud(tmp_path / "vertices.obj")
    assert "no faces" in caplog.text
    np.testing.assert_allclose(cloud.points.numpy(), xyz, atol=1e-6)


def test_empty_and_degenerate_meshes_are_refused(tmp_path):
    (tmp_path / "empty.stl").write_text("solid empty\nendsolid empty\n")
    with pytest.raises(PointCloudError, match="no geometry|empty"):
        load_point_cloud(tmp_path / "empty.stl")
    flat = trimesh.Trimesh(vertices=[[0, 0, 0], [1, 0, 0], [2, 0, 0]], faces=[[0, 1, 2]], process=False)
    flat.export(tmp_path / "flat.off")
    with pytest.raises(PointCloudError, match="zero surface area"):
        load_point_cloud(tmp_path / "flat.off")


def test_huge_clouds_are_cut_deterministically(tmp_path):
    xyz = np.random.default_rng(1).random((10_000_000, 3), dtype=np.float32)
    np.save(tmp_path / "huge.npy", xyz)
    del xyz
    start = time.perf_counter()
    cloud = load_point_cloud(tmp_path / "huge.npy")
    elapsed = time.perf_counter() - start
    assert len(cloud) == 1_000_000
    assert torch.equal(cloud.points, load_point_cloud(tmp_path / "huge.npy").points)
    assert elapsed < 15  # ~1 s on two idle cores; generous for busy CI machines
    small = load_point_cloud(tmp_path / "huge.npy", max_points=5000, seed=3)
    assert len(small) == 5000


def test_normalize_to_unit_sphere():
    points = torch.from_numpy(_cloud()) * 13 + 4
    unit = normalize_to_unit_sphere(points)
    torch.testing.assert_close(unit.mean(0), torch.zeros(3), atol=1e-6, rtol=0)
    assert unit.norm(dim=-1).max().item() == pytest.approx(1.0, abs=1e-6)
    batched = normalize_to_unit_sphere(torch.stack([points, points * 2]))
    torch.testing.assert_close(batched[1], unit)
    with pytest.raises(PointCloudError, match="same position"):
        normalize_to_unit_sphere(torch.ones(10, 3))


# --- preview --------------------------------------------------------------------------------------------


def _torus(n: int, coloured: bool) -> PointCloud:
    mesh = trimesh.creation.torus(major_radius=1.0, minor_radius=0.35)
    points = torch.from_numpy(trimesh.sample.sample_surface(mesh, n, seed=0)[0].astype(np.float32))
    colors = torch.tensor([[0.9, 0.1, 0.1]]).expand(n, 3).contiguous() if coloured else None
    return PointCloud(points=points, colors=colors, source="torus")


def test_preview_is_a_readable_image():
    image = render_preview(_torus(10_000, coloured=False), size=256)
    assert image.shape == (256, 256, 3) and image.dtype == torch.float32
    assert 0.0 <= image.min().item() and image.max().item() <= 1.0
    background = image[0, 0]
    drawn = (image - background).abs().sum(-1) > 0.05
    assert 0.15 < drawn.float().mean().item() < 0.9  # the shape fills a good part of the frame
    assert not drawn[128, 128]  # the torus hole shows the background


def test_preview_uses_the_clouds_colours():
    image = render_preview(_torus(10_000, coloured=True), size=128)
    drawn = (image - image[0, 0]).abs().sum(-1) > 0.05
    pixels = image[drawn]
    assert (pixels[:, 0] > 2 * pixels[:, 1]).float().mean() > 0.95  # red dominates where points are drawn
    uncoloured = render_preview(_torus(10_000, coloured=False), size=128)
    assert not torch.allclose(image, uncoloured)


def test_preview_is_fast_for_100k_points():
    cloud = _torus(100_000, coloured=False)
    render_preview(cloud)
    start = time.perf_counter()
    render_preview(cloud)
    assert time.perf_counter() - start < 2.0  # ~0.15 s on two idle cores


def test_preview_stands_z_up_models_upright():
    # A thin vertical pole along z: drawn z-up it is tall and narrow; drawn y-up it lies down.
    t = torch.linspace(-1, 1, 2000)
    pole = PointCloud(points=torch.stack([t * 0.05, t * 0.05, t], dim=1), colors=None, source="pole")

    def ink_extent(image: torch.Tensor) -> tuple[int, int]:
        ink = (image - image[0, 0]).abs().sum(-1) > 0.05
        rows, cols = ink.any(1).nonzero(), ink.any(0).nonzero()
        return int(rows.max() - rows.min()), int(cols.max() - cols.min())

    height, width = ink_extent(render_preview(pole, size=128, up_axis="z"))
    assert height > 3 * width
    height, width = ink_extent(render_preview(pole, size=128, up_axis="y"))
    assert width > height
    with pytest.raises(PointCloudError, match="up axis must be one of y, z"):
        render_preview(pole, up_axis="x")


# --- bounded work ----------------------------------------------------------------------------------


def test_an_array_header_claiming_too_many_points_is_refused_before_any_data_is_read(tmp_path):
    path = tmp_path / "bomb.npy"
    with open(path, "wb") as f:  # 128 bytes claiming 10^11 points (2.4 TB of float64)
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10**11, 3)})
    with pytest.raises(PointCloudError, match=r"bomb.npy: an array of shape \(100000000000, 3\) is over the limit of 10,000,000 points"):
        load_point_cloud(path)


def test_npz_members_are_checked_by_header_and_only_the_needed_ones_read(tmp_path):
    import zipfile

    path = tmp_path / "cloud.npz"
    xyz = _cloud()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("xyz.npy", "w") as member:
            np.lib.format.write_array(member, xyz)
        with archive.open("junk.npy", "w", force_zip64=True) as member:  # 300 MB of zeros in ~300 KB
            np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": (300 << 20,)})
            for _ in range(300):
                member.write(bytes(1 << 20))
    assert path.stat().st_size < 2 << 20
    np.testing.assert_array_equal(load_point_cloud(path).points.numpy(), xyz)
    cost = cost_of(f"load_point_cloud({str(path)!r})", setup="from x2i.encoders.pointcloud import load_point_cloud")
    assert cost["error"] is None and cost["peak_mib"] < 60 and cost["seconds"] < 10, cost

    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("points.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "<f8", "fortran_order": False, "shape": (10**9, 3)})
    with pytest.raises(PointCloudError, match=r"bomb.npz: 'points': an array of shape \(1000000000, 3\) is over the limit"):
        load_point_cloud(bomb)


def test_text_clouds_cost_about_their_array_not_fifty_times_their_size(tmp_path):
    path = tmp_path / "scan.xyz"
    rows = np.random.default_rng(0).random((400_000, 6))
    np.savetxt(path, rows, fmt="%.6f")  # 400k points with colours, ~21 MB of text
    cloud = load_point_cloud(path)
    np.testing.assert_allclose(cloud.points.numpy(), rows[:, :3], atol=1e-6)
    cost = cost_of(f"load_point_cloud({str(path)!r})", setup="from x2i.encoders.pointcloud import load_point_cloud")
    # Measured: 43 MiB (the 19 MB float64 array and its float32 copy); parsed into lists of strings it took 278 MiB.
    assert cost["error"] is None and cost["peak_mib"] < 150, cost


def test_oversized_files_and_sample_counts_are_refused_naming_the_limit(tmp_path):
    big = tmp_path / "big.ply"
    with open(big, "wb") as f:
        f.truncate(600 << 20)  # sparse: nothing is written or read
    with pytest.raises(PointCloudError, match=r"big.ply is 600 MiB, over the limit of 512 MiB per point-cloud file"):
        load_point_cloud(big)
    (tmp_path / "ok.xyz").write_text("\n".join(" ".join(f"{v:.4f}" for v in row) for row in _cloud()))
    with pytest.raises(PointCloudError, match=r"surface_points must be from 32 to 1,000,000, got 10000000000"):
        load_point_cloud(tmp_path / "ok.xyz", surface_points=10**10)
