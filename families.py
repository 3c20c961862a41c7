"""The model families whose conditioning the pack produces, and what that conditioning is.

A GlueNet or a bridge is made for one family: SD1.x reads ``[B, 77, 768]`` CLIP ViT-L/14 tokens; SDXL reads
``[B, 77, 2048]`` tokens (CLIP ViT-L/14 penultimate 768 ‖ OpenCLIP ViT-bigG/14 penultimate 1280), a pooled
``[B, 1280]`` bigG vector and its size/crop micro-conditioning (Podell et al. 2023, SDXL §2.2). The numbers here
are the ones ComfyUI's model detection and ``CLIPTextEncodeSDXL`` use.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import X2IError


@dataclass(frozen=True)
class Family:
    key: str  # written into files ("sd1", "sdxl")
    name: str  # said to users
    token_width: int  # width of the cross-attention tokens
    pooled_dim: int  # 0: the family reads no pooled vector
    adm_in_channels: int | None  # the U-Net's class-embedding input (pooled + size embeddings), None for SD1


SD1 = Family("sd1", "SD1.x", 768, 0, None)
SDXL = Family("sdxl", "SDXL", 2048, 1280, 2816)
FAMILIES: dict[str, Family] = {family.key: family for family in (SD1, SDXL)}

# What core CLIPTextEncodeSDXL writes by default beside the pooled vector: generate as if for a 1024² image,
# uncropped (SDXL's base resolution; the U-Net embeds these numbers).
SDXL_SIZE_CONDITIONING = {"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024, "target_height": 1024}


def family(key: str) -> Family:
    """The family named ``key`` in a file, or an error saying which are known."""
    try:
        return FAMILIES[key]
    except KeyError:
        raise X2IError(
            f"unknown model family {key!r} (this ComfyUI-X2I knows {', '.join(FAMILIES)}); update the node pack"
        ) from None


def family_of_unet(context_dim: int | None, adm_in_channels: int | None) -> Family | None:
    """The family whose conditioning a U-Net of this cross-attention width and class-embedding input reads."""
    for candidate in FAMILIES.values():
        if candidate.token_width == context_dim and candidate.adm_in_channels == adm_in_channels:
            return candidate
    return None
