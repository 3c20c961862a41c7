"""Point cloud to image: files to POINT_CLOUD, ULIP PointBERT embeddings through a GlueNet."""

from __future__ import annotations

import os

import comfy.model_management as mm
import folder_paths
from comfy_api.v0_0_2 import io, ui

from ..encoders.pointbert import load_ulip_pointbert
from ..encoders.pointcloud import SUFFIXES, UP_AXES, PointCloud, load_point_cloud, render_preview
from ..errors import X2IFileNotFoundError
from ..paths import find_in_folders
from .common import (
    CATEGORY,
    CONDITIONING_OUTPUT_TOOLTIP,
    DTYPE_CHOICES,
    DTYPE_TOOLTIP,
    ENCODER_INPUT_TOOLTIP,
    ENCODER_OUTPUT_TOOLTIP,
    GLUENET_INPUT_TOOLTIP,
    GlueNetType,
    LoadedGlueNet,
    PointCloudType,
    X2IEncoder,
    X2INode,
    embedding_encoder_and_gluenet,
    encoder_dtype,
    encoder_patcher,
    translate_to_conditioning,
)

POINT_ENCODER_FOLDER = "point_encoders"
POINT_ENCODER_EXTENSIONS = (".pt", ".pth", ".ckpt", ".safetensors")


def _input_point_clouds() -> list[str]:
    """Point-cloud files in ComfyUI's input folder and its 3d/ subfolder (where core's 3D uploads go).

    Two fixed folders, not a recursive walk: the schema is rebuilt on every /object_info request and
    input folders can hold thousands of files."""
    root = folder_paths.get_input_directory()
    found = []
    for sub in ("", "3d"):
        folder = os.path.join(root, sub)
        if os.path.isdir(folder):
            found += [
                f"{sub}/{entry.name}" if sub else entry.name
                for entry in os.scandir(folder)
                if entry.is_file() and entry.name.lower().endswith(SUFFIXES)
            ]
    return sorted(found)


def _input_file(name: str) -> str | None:
    """A point-cloud file the loader lists, inside ComfyUI's input folder (never outside it)."""
    return find_in_folders([folder_paths.get_input_directory()], name, os.path.isfile)


class X2IPointCloudLoader(X2INode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="X2IPointCloudLoader",
            display_name="X2I Load Point Cloud",
            category=f"{CATEGORY}/loaders",
            description="Reads a point cloud or mesh from ComfyUI's input folder (.ply, .obj, .off, .stl, .glb, .npy, "
            ".npz, .xyz, .txt); meshes are sampled on their surface. Centred and scaled to the unit sphere; colours kept.",
            inputs=[
                io.Combo.Input("file", options=_input_point_clouds(), tooltip="A point cloud or mesh in ComfyUI's input folder."),
                io.Int.Input("surface_points", default=10000, min=512, max=1_000_000, tooltip="Points sampled on a mesh surface."),
                io.Combo.Input("preview_up_axis", options=list(UP_AXES), default="y", tooltip="y for OBJ/glTF/ShapeNet models, z for scans and CAD."),
            ],
            outputs=[
                PointCloudType.Output(display_name="point_cloud", tooltip="The points (and colours), for X2I GlueGen Point Cloud Encode."),
                io.Image.Output(display_name="preview", tooltip="A rendering of the cloud, to check it before encoding."),
            ],
        )

    @classmethod
    def check_inputs(cls, file: str, **_) -> str | None:
        if _input_file(file) is None:
            return f"point cloud file '{file}' not found in ComfyUI's input folder"
        return None

    @classmethod
    def fingerprint_inputs(cls, file: str, surface_points: int, preview_up_axis: str) -> float | None:
        # Re-read when the file changes on disk, not only when its name changes.
        path = _input_file(file)
        return os.path.getmtime(path) if path is not None else None

    @classmethod
    def execute(cls, file: str, surface_points: int, preview_up_axis: str) -> io.NodeOutput:
        path = _input_file(file)
        if path is None:
            raise X2IFileNotFoundError(f"point cloud file '{file}' not found in ComfyUI's input folder")
        cloud = load_point_cloud(path, surface_points=surface_points)
        preview = render_preview(cloud, up_axis=preview_up_axis).unsqueeze(0)
        return io.NodeOutput(cloud, preview, ui=ui.PreviewImage(preview, cls=cls))


class X2IPointCloudEncoderLoader(X2INode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="X2IPointCloudEncoderLoader",
            display_name="X2I Point Cloud Encoder Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads ULIP's PointBERT point-cloud encoder (ULIP-1 or ULIP-2) from models/point_encoders.",
            inputs=[
                io.Combo.Input("encoder_name", options=folder_paths.get_filename_list(POINT_ENCODER_FOLDER),
                               tooltip="A ULIP PointBERT checkpoint in models/point_encoders (ULIP-1 or ULIP-2)."),
                io.Combo.Input("dtype", options=list(DTYPE_CHOICES), default="auto", tooltip=DTYPE_TOOLTIP),
            ],
            outputs=[X2IEncoder.Output(display_name="encoder", tooltip=ENCODER_OUTPUT_TOOLTIP)],
        )

    @classmethod
    def execute(cls, encoder_name: str, dtype: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(POINT_ENCODER_FOLDER, encoder_name)
        module = load_ulip_pointbert(path).to(encoder_dtype(dtype, mm.text_encoder_device()))
        module.name = os.path.basename(path)
        return io.NodeOutput(encoder_patcher(module))


class X2IGlueGenPointCloudEncode(X2INode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="X2IGlueGenPointCloudEncode",
            display_name="X2I GlueGen Point Cloud Encode",
            category=f"{CATEGORY}/gluegen",
            description="Turns a point cloud into SD1.x or SDXL conditioning through a point-cloud GlueNet (train one with "
            "this pack's trainer: none was released).",
            inputs=[
                X2IEncoder.Input("encoder", tooltip=ENCODER_INPUT_TOOLTIP),
                GlueNetType.Input("gluenet", tooltip=GLUENET_INPUT_TOOLTIP),
                PointCloudType.Input("point_cloud", tooltip="From X2I Load Point Cloud."),
            ],
            outputs=[io.Conditioning.Output(tooltip=CONDITIONING_OUTPUT_TOOLTIP)],
        )

    @classmethod
    def execute(cls, encoder, gluenet: LoadedGlueNet, point_cloud: PointCloud) -> io.NodeOutput:
        point_encoder, gluenet = embedding_encoder_and_gluenet(encoder, gluenet, "encode_points", "X2I Point Cloud Encoder Loader")
        # A colour encoder given an xyz-only cloud gets ULIP's own grey, as ULIP does for ModelNet40.
        points = point_cloud.to_tensor()
        return io.NodeOutput(
            translate_to_conditioning(encoder, gluenet, lambda: point_encoder.encode_points(points.unsqueeze(0)))
        )
