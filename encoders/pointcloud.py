"""Point clouds from files, their normalisation, and a preview image.

Formats: ``.ply`` (point clouds and meshes), ``.obj`` / ``.off`` / ``.stl`` / ``.glb`` / ``.gltf``
meshes (read with trimesh and sampled uniformly on the surface with a fixed seed), ``.npy`` /
``.npz`` arrays and ``.xyz`` / ``.txt`` / ``.pts`` text. Colours are kept when present, as 0..1.

Decisions on awkward input (each refusal is a :class:`PointCloudError` naming the fix):

- NaN/Inf coordinates: those points are dropped with a warning; if fewer than 32 remain, refused.
- Fewer than 32 points: refused (PointBERT groups 32 neighbours around each centre).
- All points identical: refused (a cloud without extent cannot be scaled to the unit sphere).
- More than ``max_points`` (default 1,000,000): a seeded random choice (order kept) cuts the cloud;
  farthest point sampling over millions of points would take many seconds.
- A mesh file with vertices but no faces (an ``.obj`` of ``v`` lines): its vertices are the points,
  with a warning; an empty mesh is refused.

Every file costs bounded time and memory, whatever it claims: files over :data:`MAX_FILE_BYTES`, arrays
of more than :data:`MAX_FILE_POINTS` points and more than :data:`MAX_SURFACE_POINTS` surface samples are
refused naming the limit; ``.npy``/``.npz`` shapes are read from their headers before any data (only the
needed ``.npz`` members are ever decompressed); text is parsed line by line into a compact array.
"""

from __future__ import annotations

import array
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import X2IError

logger = logging.getLogger(__name__)

MIN_POINTS = 32
DEFAULT_MAX_POINTS = 1_000_000
# What one file may cost. ULIP clouds are 8-10k points and ShapeNet/Objaverse meshes a few MB; scans run
# to millions of points. 10M points of 6 float64 columns are 480 MB, the most any file can make us hold.
MAX_FILE_BYTES = 512 << 20
MAX_FILE_POINTS = 10_000_000
MAX_SURFACE_POINTS = 1_000_000
MESH_SUFFIXES = (".ply", ".obj", ".off", ".stl", ".glb", ".gltf")
ARRAY_SUFFIXES = (".npy", ".npz")
TEXT_SUFFIXES = (".xyz", ".txt", ".pts")
SUFFIXES = MESH_SUFFIXES + ARRAY_SUFFIXES + TEXT_SUFFIXES
NPZ_POINT_KEYS = ("points", "xyz", "pos")
NPZ_COLOR_KEYS = ("colors", "rgb", "color", "colours")


class PointCloudError(X2IError):
    """A point cloud that cannot be used; the message names the problem and the fix."""


@dataclass
class PointCloud:
    """``points`` ``[N, 3]`` float32, ``colors`` ``[N, 3]`` float32 in 0..1 or None, ``source`` (file name)."""

    points: torch.Tensor
    colors: torch.Tensor | None
    source: str

    def __post_init__(self) -> None:
        if self.points.dim() != 2 or self.points.shape[-1] != 3:
            raise PointCloudError(f"{self.source}: points must be [N, 3], got {tuple(self.points.shape)}")
        if self.colors is not None and tuple(self.colors.shape) != tuple(self.points.shape):
            raise PointCloudError(
                f"{self.source}: colors must be [N, 3] like points {tuple(self.points.shape)}, got {tuple(self.colors.shape)}"
            )

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def to_tensor(self) -> torch.Tensor:
        """``[N, 3]`` or, with colours, ``[N, 6]`` (xyz then rgb), what ``encode_points`` takes."""
        return self.points if self.colors is None else torch.cat([self.points, self.colors], dim=-1)


def normalize_to_unit_sphere(points: torch.Tensor) -> torch.Tensor:
    """Centre ``[..., N, 3]`` points at their centroid and scale so the farthest is at distance 1 (ULIP's pc_norm)."""
    centred = points - points.mean(dim=-2, keepdim=True)
    radius = centred.norm(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1)
    if not bool(torch.isfinite(radius).all()):
        raise PointCloudError("point coordinates contain NaN or Inf: drop those points first (load_point_cloud does)")
    if bool((radius <= 0).any()):
        raise PointCloudError(
            "all points are at the same position, so the cloud has no extent to scale to the unit sphere: "
            "check the file (a degenerate export?) and give a cloud with at least two distinct points"
        )
    return centred / radius


# --- reading -----------------------------------------------------------------------------------


def _colors_0_1(colors: np.ndarray, source: str) -> np.ndarray | None:
    """Colour columns to float 0..1: uint8 or values above 1 are read as 0..255."""
    if colors.dtype == np.uint8:
        return colors.astype(np.float32) / 255.0
    colors = colors.astype(np.float32)
    finite = colors[np.isfinite(colors)]
    if finite.size == 0:
        return None
    low, high = float(finite.min()), float(finite.max())
    if low < 0 or high > 255:
        logger.warning("%s: colour values %.3g..%.3g are neither 0..1 nor 0..255; colours ignored", source, low, high)
        return None
    return colors / 255.0 if high > 1.0 else colors


def _split_columns(array: np.ndarray, source: str, text: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """``[N, 3]`` xyz; ``[N, 6]`` xyz + rgb (or normals, ignored); ``[N, 4]`` xyz + intensity; ``[N, 7]`` PTS xyz i rgb."""
    if array.ndim != 2 or array.shape[1] not in ((3, 4, 6, 7) if text else (3, 6)):
        allowed = "3 (xyz), 4 (xyz intensity), 6 (xyz rgb) or 7 (xyz intensity rgb)" if text else "3 (xyz) or 6 (xyz rgb)"
        raise PointCloudError(
            f"{source}: expected an array of shape [N, C] with C = {allowed}, got {tuple(array.shape)}; "
            "re-save the points as such an array"
        )
    xyz = array[:, :3]
    if array.shape[1] in (3, 4):
        return xyz, None
    extra = array[:, 3:6] if array.shape[1] == 6 else array[:, 4:7]
    if array.shape[1] == 6 and extra.dtype != np.uint8:
        finite = extra[np.isfinite(extra).all(axis=1)].astype(np.float64)
        # ModelNet40's resampled .txt files (ULIP's own test data) carry unit normals in columns 4-6.
        if finite.size and (finite.min() < 0 or np.allclose(np.linalg.norm(finite, axis=1), 1.0, atol=1e-3)):
            logger.info("%s: columns 4-6 look like normals, not colours; using xyz only", source)
            return xyz, None
    return xyz, _colors_0_1(extra, source)


def _check_magic(path: Path, magic: bytes, kind: str) -> None:
    with open(path, "rb") as f:
        head = f.read(len(magic))
    if head != magic:
        raise PointCloudError(f"{path.name} is unreadable or corrupt (not a {kind} file); re-export it")


def _check_array_header(shape: tuple[int, ...], dtype: np.dtype, source: str) -> None:
    """Refuse an array by its header: pickled objects, or more than :data:`MAX_FILE_POINTS` rows."""
    if dtype.hasobject:
        raise PointCloudError(
            f"{source} holds pickled Python objects (ULIP's Objaverse .npy files are dicts), which are not "
            "loaded for safety: re-save the arrays, e.g. np.savez('cloud.npz', xyz=d['xyz'], rgb=d['rgb'])"
        )
    rows = shape[0] if shape else 1
    if rows > MAX_FILE_POINTS or int(np.prod(shape, dtype=np.int64)) > 8 * MAX_FILE_POINTS:
        raise PointCloudError(
            f"{source}: an array of shape {tuple(shape)} is over the limit of {MAX_FILE_POINTS:,} points per file; "
            "subsample the cloud before saving it"
        )


def _read_array(handle, source: str) -> np.ndarray:
    """One ``.npy`` stream: header checked first, then exactly the data it declares (no pickles)."""
    version = np.lib.format.read_magic(handle)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _fortran, dtype = read_header(handle)
    _check_array_header(shape, dtype, source)
    handle.seek(0)  # read_array reads the header again (a zip member rewinds by decompressing its first bytes)
    return np.lib.format.read_array(handle, allow_pickle=False)


def _read_npy(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    _check_magic(path, b"\x93NUMPY", ".npy")
    try:
        with open(path, "rb") as handle:
            array_ = _read_array(handle, path.name)
    except PointCloudError:
        raise
    except Exception as exc:
        raise PointCloudError(f"{path.name} is unreadable or corrupt ({exc}); re-export it") from exc
    return _split_columns(np.asarray(array_), path.name)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    _check_magic(path, b"PK", ".npz (zip)")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name.removesuffix(".npy"): name for name in archive.namelist() if name.endswith(".npy")}
            key = next((k for k in NPZ_POINT_KEYS if k in members), None)
            if key is None and len(members) == 1:
                key = next(iter(members))
            if key is None:
                raise PointCloudError(
                    f"{path.name}: no point array found (keys: {', '.join(sorted(members)) or 'none'}); "
                    f"name it one of {', '.join(NPZ_POINT_KEYS)} (shape [N, 3] or [N, 6])"
                )
            color_key = next((k for k in NPZ_COLOR_KEYS if k in members), None)
            arrays = {}
            for name in dict.fromkeys(k for k in (key, color_key) if k is not None):  # only what is used
                if archive.getinfo(members[name]).file_size > MAX_FILE_BYTES:
                    raise PointCloudError(
                        f"{path.name}: '{name}' unpacks to {archive.getinfo(members[name]).file_size:,} bytes, over the "
                        f"limit of {MAX_FILE_BYTES:,}; subsample the cloud before saving it"
                    )
                with archive.open(members[name]) as handle:
                    arrays[name] = _read_array(handle, f"{path.name}: '{name}'")
    except PointCloudError:
        raise
    except Exception as exc:
        raise PointCloudError(f"{path.name} is unreadable or corrupt ({exc}); re-export it") from exc
    xyz, colors = _split_columns(arrays[key], path.name)
    if colors is None and color_key is not None:
        rgb = arrays[color_key]
        if rgb.shape != xyz.shape:
            raise PointCloudError(f"{path.name}: '{color_key}' has shape {rgb.shape}, expected {xyz.shape} like '{key}'")
        colors = _colors_0_1(rgb, path.name)
    return xyz, colors


def _read_text(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``x y z [r g b]`` lines (commas allowed; ``#``/``//`` comments; a leading point count in .pts) into
    one float64 array, line by line: memory is the array itself, not a list of strings per value."""
    values = array.array("d")
    columns = None
    rows = 0
    try:
        with open(path, encoding="utf-8", errors="strict") as handle:
            for line_number, line in enumerate(handle, start=1):
                tokens = line.replace(",", " ").split()
                if not tokens or tokens[0].startswith(("#", "//")):
                    continue
                if columns is None and len(tokens) == 1:
                    continue  # .pts files may start with the point count
                if columns is None:
                    columns = len(tokens)
                elif len(tokens) != columns:
                    raise PointCloudError(
                        f"{path.name}: line {line_number} has {len(tokens)} values, the first point line has {columns}; fix the file"
                    )
                if rows >= MAX_FILE_POINTS:
                    raise PointCloudError(
                        f"{path.name} has more than {MAX_FILE_POINTS:,} points, the limit per file; subsample the cloud"
                    )
                try:
                    values.extend(float(token) for token in tokens)
                except ValueError as exc:
                    raise PointCloudError(
                        f"{path.name}: line {line_number}: not all values are numbers ({exc}); expected 'x y z' or "
                        "'x y z r g b' per line"
                    ) from exc
                rows += 1
    except (OSError, UnicodeDecodeError) as exc:
        raise PointCloudError(f"{path.name} is unreadable or corrupt as text ({exc}); export it as ASCII x y z [r g b]") from exc
    if not rows:
        raise PointCloudError(f"{path.name} has no point lines; expected 'x y z' or 'x y z r g b' per line")
    return _split_columns(np.frombuffer(values, dtype=np.float64).reshape(rows, columns), path.name, text=True)


def _mesh_colors(mesh, faces: np.ndarray, barycentric: np.ndarray) -> np.ndarray | None:
    visual = getattr(mesh, "visual", None)
    kind = getattr(visual, "kind", None)
    if kind == "vertex":
        vertex = np.asarray(visual.vertex_colors)[:, :3].astype(np.float32) / 255.0
        corners = vertex[mesh.faces[faces]]  # [n, 3 corners, 3 rgb]
        return (corners * barycentric[:, :, None]).sum(axis=1)
    if kind == "face":
        return np.asarray(visual.face_colors)[faces, :3].astype(np.float32) / 255.0
    if kind == "texture":
        try:
            # The texture sampled at each vertex's UV, then interpolated like vertex colours.
            vertex = np.asarray(visual.to_color().vertex_colors)[:, :3].astype(np.float32) / 255.0
        except Exception:  # textures are optional; a bad one should not lose the geometry
            logger.warning("could not read the mesh texture; colours ignored")
            return None
        if len(vertex) != len(mesh.vertices):
            return None
        corners = vertex[mesh.faces[faces]]
        return (corners * barycentric[:, :, None]).sum(axis=1)
    return None


def _read_mesh(path: Path, surface_points: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        import trimesh
    except ImportError as exc:
        raise PointCloudError(f"reading {path.suffix} files needs trimesh: pip install trimesh") from exc
    try:
        loaded = trimesh.load(path, process=False)
    except Exception as exc:
        raise PointCloudError(f"{path.name} is unreadable or corrupt as {path.suffix} ({type(exc).__name__}: {exc}); re-export it") from exc
    if isinstance(loaded, trimesh.Scene):
        geometries = [g for g in loaded.dump() if isinstance(g, (trimesh.Trimesh, trimesh.PointCloud))]
        meshes = [g for g in geometries if isinstance(g, trimesh.Trimesh) and len(g.faces)]
        if meshes:
            loaded = trimesh.util.concatenate(meshes) if len(meshes) > 1 else meshes[0]
        elif geometries:
            loaded = geometries[0]
        else:
            raise PointCloudError(f"{path.name} holds no geometry; export the model with its mesh")
    if isinstance(loaded, trimesh.PointCloud):
        if path.suffix.lower() != ".ply":
            logger.warning("%s has no faces: using its %d vertices as the point cloud", path.name, len(loaded.vertices))
        colors = getattr(loaded, "colors", None)
        colors = np.asarray(colors)[:, :3] if colors is not None and len(colors) == len(loaded.vertices) else None
        return np.asarray(loaded.vertices), (None if colors is None else _colors_0_1(colors.astype(np.uint8), path.name))
    if not isinstance(loaded, trimesh.Trimesh):
        raise PointCloudError(f"{path.name}: trimesh read a {type(loaded).__name__}, not a mesh or point cloud; re-export it")
    vertices = np.asarray(loaded.vertices)
    if len(loaded.faces) == 0:
        if len(vertices) == 0:
            raise PointCloudError(f"{path.name} is an empty mesh (no vertices, no faces); re-export the model")
        logger.warning("%s has no faces: using its %d vertices as the point cloud", path.name, len(vertices))
        colors = None
        if getattr(loaded.visual, "kind", None) == "vertex":
            colors = _colors_0_1(np.asarray(loaded.visual.vertex_colors)[:, :3].astype(np.uint8), path.name)
        return vertices, colors
    if not float(loaded.area) > 0:
        raise PointCloudError(f"{path.name}: every face is degenerate (zero surface area), so no surface to sample; re-export the mesh")
    points, faces, barycentric = trimesh.sample.sample_surface(loaded, surface_points, seed=seed, return_barycentric=True)
    return np.asarray(points), _mesh_colors(loaded, np.asarray(faces), np.asarray(barycentric))


def _finish(xyz: np.ndarray, colors: np.ndarray | None, source: str, max_points: int, seed: int) -> PointCloud:
    points = torch.from_numpy(np.ascontiguousarray(xyz, dtype=np.float32))
    rgb = None if colors is None else torch.from_numpy(np.ascontiguousarray(colors, dtype=np.float32)).clamp_(0, 1)
    finite = torch.isfinite(points).all(dim=1)
    if not bool(finite.all()):
        kept = int(finite.sum())
        if kept < MIN_POINTS:
            raise PointCloudError(
                f"{source}: only {kept} of {len(points)} points have finite coordinates (the rest are NaN/Inf); "
                f"at least {MIN_POINTS} are needed: fix the export"
            )
        logger.warning("%s: dropped %d points with NaN/Inf coordinates", source, len(points) - kept)
        points = points[finite]
        rgb = None if rgb is None else rgb[finite]
    if rgb is not None and not bool(torch.isfinite(rgb).all()):
        logger.warning("%s: colours contain NaN/Inf; colours ignored", source)
        rgb = None
    if len(points) < MIN_POINTS:
        raise PointCloudError(
            f"{source} has {len(points)} points; PointBERT groups {MIN_POINTS} neighbours, so at least {MIN_POINTS} "
            "are needed: export a denser cloud (or the mesh, which is sampled)"
        )
    if bool((points == points[0]).all()):
        raise PointCloudError(
            f"{source}: all {len(points)} points are at the same position, so the cloud has no shape to normalise; "
            "check the export"
        )
    if len(points) > max_points:
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(points), generator=generator)[:max_points].sort().values
        logger.warning("%s: %d points cut to %d by a seeded random choice (max_points)", source, len(points), max_points)
        points = points[keep]
        rgb = None if rgb is None else rgb[keep]
    return PointCloud(points=points.contiguous(), colors=None if rgb is None else rgb.contiguous(), source=source)


def load_point_cloud(
    path: str | os.PathLike[str], surface_points: int = 10000, seed: int = 0, max_points: int = DEFAULT_MAX_POINTS
) -> PointCloud:
    """Read a point cloud (or sample a mesh surface: ``surface_points`` points, fixed ``seed``) from ``path``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise PointCloudError(f"{path.name}: unsupported point cloud file type; use one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise PointCloudError(f"point cloud file not found: {path}")
    if not MIN_POINTS <= surface_points <= MAX_SURFACE_POINTS:
        raise PointCloudError(f"surface_points must be from {MIN_POINTS} to {MAX_SURFACE_POINTS:,}, got {surface_points}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise PointCloudError(
            f"{path.name} is {size / 2**20:.0f} MiB, over the limit of {MAX_FILE_BYTES >> 20} MiB per point-cloud file; "
            "decimate the mesh or subsample the cloud"
        )
    if suffix == ".npy":
        xyz, colors = _read_npy(path)
    elif suffix == ".npz":
        xyz, colors = _read_npz(path)
    elif suffix in TEXT_SUFFIXES:
        xyz, colors = _read_text(path)
    else:
        xyz, colors = _read_mesh(path, surface_points, seed)
    if not np.issubdtype(np.asarray(xyz).dtype, np.number):
        raise PointCloudError(f"{path.name}: coordinates are not numbers ({xyz.dtype})")
    return _finish(np.asarray(xyz), colors, path.name, max_points, seed)


# --- preview -----------------------------------------------------------------------------------

_BACKGROUND = np.array([0.955, 0.955, 0.945], dtype=np.float32)
# Depth colour ramp for uncoloured clouds, near to far (warm to cool, all dark enough for a light background).
_DEPTH_RAMP = np.array(
    [[0.93, 0.45, 0.18], [0.80, 0.26, 0.38], [0.50, 0.20, 0.55], [0.20, 0.25, 0.55], [0.10, 0.30, 0.45]], dtype=np.float32
)
_LIGHT = np.array([-0.45, -0.55, 0.70], dtype=np.float32)  # screen space: from the upper left, towards the viewer


def _view_rotation(yaw_deg: float = 35.0, pitch_deg: float = 25.0) -> np.ndarray:
    """A 3/4 view of a y-up model: turn about the vertical axis, then tilt so the top is visible."""
    yaw, pitch = np.radians(yaw_deg), np.radians(pitch_deg)
    turn = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    tilt = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    return (tilt @ turn).astype(np.float32)


UP_AXES = ("y", "z")


def render_preview(cloud: PointCloud, size: int = 512, up_axis: str = "y") -> torch.Tensor:
    """A ``[size, size, 3]`` float 0..1 image of ``cloud``: orthographic 3/4 view of the model standing
    on its ``up_axis`` (y for OBJ/glTF/ShapeNet, z for scans and CAD), depth-tested sphere splats, the
    cloud's colours (else a warm-near / cool-far depth ramp), light background.
    """
    if size < 16:
        raise PointCloudError(f"preview size must be at least 16 pixels, got {size}")
    if up_axis not in UP_AXES:
        raise PointCloudError(f"preview up axis must be one of {', '.join(UP_AXES)}, got {up_axis!r}")
    points = cloud.points.detach().float().cpu().numpy()
    if up_axis == "z":
        points = points[:, [0, 2, 1]] * np.array([1.0, 1.0, -1.0], dtype=np.float32)  # z up -> y up, right-handed
    finite = np.isfinite(points).all(axis=1)
    points = points[finite]
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = _BACKGROUND
    if len(points) == 0:
        return torch.from_numpy(image)
    view = (points - points.mean(axis=0)) @ _view_rotation().T  # x right, y up, z towards the viewer
    screen = view[:, :2] * np.array([1.0, -1.0], dtype=np.float32)
    low, high = screen.min(axis=0), screen.max(axis=0)
    extent = float(max((high - low).max(), 1e-12))
    scale = size * 0.86 / extent
    pix = (screen - (low + high) / 2) * scale + size / 2
    depth = -view[:, 2]  # larger = farther
    span = float(max(depth.max() - depth.min(), 1e-12))
    near_far = (depth - depth.min()) / span
    if cloud.colors is not None:
        base = cloud.colors.detach().float().cpu().numpy()[finite]
    else:
        pos = near_far * (len(_DEPTH_RAMP) - 1)
        i0 = np.clip(np.floor(pos).astype(np.int64), 0, len(_DEPTH_RAMP) - 2)
        frac = (pos - i0)[:, None]
        base = _DEPTH_RAMP[i0] * (1 - frac) + _DEPTH_RAMP[i0 + 1] * frac
    # Splat radius from the point density on screen: denser clouds get smaller dots.
    covered = max(float(np.prod(np.maximum(high - low, extent * 0.05))) * scale * scale, 1.0)
    radius = float(np.clip(1.2 * np.sqrt(covered / len(points)), 1.0, max(2.0, size / 80)))
    r = int(np.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    inside = (dx * dx + dy * dy) <= (radius + 0.5) ** 2
    dx, dy = dx[inside].astype(np.float32), dy[inside].astype(np.float32)
    bulge = np.sqrt(np.clip(1 - (dx * dx + dy * dy) / (radius + 0.5) ** 2, 0, 1))  # sphere impostor height
    normal = np.stack([dx / (radius + 0.5), dy / (radius + 0.5), bulge], axis=1)
    shade = 0.55 + 0.45 * np.clip(normal @ (_LIGHT / np.linalg.norm(_LIGHT)), 0, 1)  # [offsets]
    cx = np.floor(pix[:, 0]).astype(np.int64)[:, None] + dx.astype(np.int64)[None]
    cy = np.floor(pix[:, 1]).astype(np.int64)[:, None] + dy.astype(np.int64)[None]
    world_radius = radius / scale
    entry_depth = depth[:, None] - world_radius * bulge[None]
    valid = (cx >= 0) & (cx < size) & (cy >= 0) & (cy < size)
    pixel = torch.from_numpy((cy * size + cx)[valid])
    entry_depth_t = torch.from_numpy(entry_depth[valid].astype(np.float32))
    # Depth test: the nearest entry of each pixel wins (ties: the later entry, deterministic).
    nearest = torch.full((size * size,), float("inf")).scatter_reduce(0, pixel, entry_depth_t, reduce="amin")
    wins = entry_depth_t <= nearest[pixel]
    entry_id = torch.arange(len(pixel))
    winner = torch.full((size * size,), -1, dtype=torch.long).scatter_reduce(0, pixel[wins], entry_id[wins], reduce="amax")
    drawn = winner >= 0
    point_of_entry, offset_of_entry = np.nonzero(valid)
    chosen = winner[drawn].numpy()
    fog = 1.0 - 0.30 * near_far[point_of_entry[chosen]]  # farther points fade slightly
    color = base[point_of_entry[chosen]] * (shade[offset_of_entry[chosen]] * fog)[:, None]
    flat = image.reshape(-1, 3)
    flat[drawn.numpy()] = np.clip(color, 0, 1)
    return torch.from_numpy(image)
