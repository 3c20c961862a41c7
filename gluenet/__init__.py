"""GlueNet: translators from a new encoder's feature space into Stable Diffusion's CLIP text space."""

from .checkpoint import GlueNetFileError, load_gluenet, probe_gluenet_file, save_gluenet
from .config import GlueNetConfig, GlueNetConfigError
from .modules import GlueNet
from .routing import GlueNetRouter, LanguageRoutingError

__all__ = [
    "GlueNet",
    "GlueNetConfig",
    "GlueNetConfigError",
    "GlueNetFileError",
    "GlueNetRouter",
    "LanguageRoutingError",
    "load_gluenet",
    "probe_gluenet_file",
    "save_gluenet",
]
