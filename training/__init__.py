"""The pack's trainers: GlueNets, LaVi-Bridges and U-ViTs, from one machine to many GPUs.

    python path/to/ComfyUI-X2I train gluenet --config my_gluenet.toml
    torchrun --nproc_per_node 8 path/to/ComfyUI-X2I train bridge --config my_bridge.toml

Everything here runs without ComfyUI; what it writes loads in the pack's nodes.
"""

from .config import ConfigError, load_config, section
from .distributed import Distributed
from .errors import TrainingError
from .loop import TrainResult, train
from .settings import RunSettings
from .task import TrainingTask

__all__ = [
    "ConfigError",
    "Distributed",
    "RunSettings",
    "TrainResult",
    "TrainingError",
    "TrainingTask",
    "load_config",
    "section",
    "train",
]
