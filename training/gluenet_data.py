"""What a GlueNet learns from: pairs of a *source* (what the new encoder reads) and *target* captions
(what SD1.x's CLIP text encoder reads), listed and checked before any encoder runs.

Naming: the **source** is the GlueNet's input side (foreign-language text, a sound, a point cloud);
the **target** is CLIP's side (an English caption or a class prompt). The official GlueGen scripts
call these the other way round; only the names differ.

Three kinds of data:

- **Parallel text** (``modality = "text"``): two line-aligned UTF-8 files (``source_file``,
  ``target_file``), or one ``pairs_file``: ``.tsv`` (columns chosen by ``tsv_columns``) or
  ``.jsonl`` (``{"source": ..., "target": ...}``).
- **Audio with labels** (``modality = "audio"``): an UrbanSound8K folder (``metadata/UrbanSound8K.csv``
  and ``audio/foldN/``; folds selectable, fold 1 held out for validation by default, as GlueGen did)
  or one sub-folder per class. The target of a clip is CLIP of a class prompt built from templates
  (``"a vivid photo of {}"``, the official ones) and label synonyms (the official ones for the ten
  UrbanSound8K classes), one drawn at random each time the clip is seen, as the official script does.
- **Point clouds with captions** (``modality = "point_cloud"``): a folder of clouds, each with a
  sidecar ``<name>.txt`` caption file (one caption per line), or a ``.csv`` (``path,caption``) /
  ``.jsonl`` (``{"path": ..., "caption": ...}``) listing. Clouds are read with the pack's
  :func:`encoders.load_point_cloud`.

How the files are read, and what happens to bad input: :mod:`.gluenet_listing`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import X2IError
from .settings import setting

Modality = Literal["text", "audio", "point_cloud"]
MODALITIES: tuple[str, ...] = ("text", "audio", "point_cloud")

# GlueGen's sound script (train_gluenet_sound_text.py): its six templates, the duplicate included
# (it doubles that template's share of the random draws).
OFFICIAL_PROMPT_TEMPLATES: tuple[str, ...] = (
    "a vivid photo of {}",
    "a vivid rendering of {}",
    "the vivid photo of {}",
    "a vivid photo of {}",
    "a good photo of {}",
    "a vivid illustration of {}",
)
# The official synonyms for the ten UrbanSound8K classes (keys are the CSV's class names with
# underscores as spaces).
OFFICIAL_US8K_LABEL_PROMPTS: dict[str, tuple[str, ...]] = {
    "jackhammer": ("jackhammer", "pneumatic drill", "concrete breaker", "demolition hammer"),
    "drilling": ("a machine is drilling", "a machine is piercing", "a machine is perforating", "a machine is reaming"),
    "siren": ("patrol car, driving", "ambulance, driving", "fire truck, driving", "fire alarm"),
    "car horn": ("car horning", "automobile horning", "car beeping"),
    "street music": (
        "street music, artists are performing", "sidewalk music, artists are performing",
        "outdoor music, artists are performing",
    ),
    "engine idling": ("engine is idling", "engine is running", "parked engine is running"),
    "dog bark": ("dog is barking", "dogs are barking", "puppy is barking", "doggy is barking"),
    "children playing": ("children are playing",),
    "air conditioner": ("air conditioner",),
    "gun shot": ("gun is shoting", "gunfire"),
}


class DataError(X2IError):
    """Training data that cannot be used as given; the message names the file, the place and the fix."""


@dataclass
class GlueNetDataSettings:
    """The ``[data]`` section of a GlueNet training config."""

    modality: Modality = setting("text", "text | audio | point_cloud: what the GlueNet translates from")
    # -- parallel text
    source_file: str = setting("", "text: one sentence per line in the new encoder's language (the GlueNet's input)")
    target_file: str = setting("", "text: the same sentences, line for line, as CLIP should read them (English)")
    pairs_file: str = setting("", "text: instead of the two files, a .tsv or .jsonl holding both sides")
    tsv_columns: list[int] = setting(doc="text: [source column, target column] of the .tsv", factory=lambda: [0, 1])
    jsonl_keys: list[str] = setting(doc="text: [source key, target key] of each .jsonl line", factory=lambda: ["source", "target"])
    on_bad_line: Literal["error", "skip"] = setting("error", "undecodable UTF-8 or malformed rows: stop with the file and line, or skip and count")
    # -- audio with class labels
    audio_dir: str = setting("", "audio: an UrbanSound8K folder (metadata/UrbanSound8K.csv + audio/foldN) or one sub-folder per class")
    train_folds: list[int] = setting(doc="audio, UrbanSound8K: folds to train on", factory=lambda: list(range(2, 11)))
    val_folds: list[int] = setting(doc="audio, UrbanSound8K: held-out folds (GlueGen: 1); [] uses val_fraction", factory=lambda: [1])
    prompt_templates: list[str] = setting(doc="audio: class prompt templates, '{}' is the label (default: the official six)",
                                          factory=lambda: list(OFFICIAL_PROMPT_TEMPLATES))
    label_prompts: dict[str, list[str]] = setting(doc="audio: {label: [synonyms]} put into the templates", factory=dict)
    official_label_prompts: bool = setting(True, "audio: use GlueGen's synonyms for the ten UrbanSound8K classes")
    prompt_choice: Literal["random", "first"] = setting("random", "audio: a random prompt of the class each epoch (official), or always the first")
    # -- point clouds with captions
    point_cloud_dir: str = setting("", "point_cloud: a folder of clouds/meshes, each with a <name>.txt caption file (one caption per line)")
    point_cloud_list: str = setting("", "point_cloud: or a .csv (path,caption) / .jsonl ({\"path\", \"caption\"}) listing")
    surface_points: int = setting(10000, "point_cloud: points sampled on a mesh's surface")
    # -- split and size
    val_fraction: float = setting(0.02, "share of samples held out for validation (by cloud for point clouds), seeded by run.seed")
    val_max_samples: int = setting(512, "validation metrics use at most this many held-out samples")
    max_samples: int = setting(0, "0: all; else only the first N usable pairs (quick experiments)")

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {self.modality!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if len(self.tsv_columns) != 2 or min(self.tsv_columns) < 0:
            raise ValueError(f"tsv_columns must be two column indices [source, target], got {self.tsv_columns}")
        if len(self.jsonl_keys) != 2:
            raise ValueError(f"jsonl_keys must be two keys [source, target], got {self.jsonl_keys}")
        for template in self.prompt_templates:
            if template.count("{}") != 1:
                raise ValueError(f"prompt template {template!r} must hold exactly one '{{}}' for the label")
        if not self.prompt_templates:
            raise ValueError("prompt_templates must not be empty (the official ones are the default)")


@dataclass(frozen=True)
class AudioClip:
    path: Path
    label: str
    fold: int | None = None


@dataclass
class GlueNetListing:
    """Everything found in the data, before any encoder runs.

    ``sources``: what the source encoder reads, one entry each (str for text, :class:`AudioClip` for
    sound, ``Path`` for point clouds). ``target_texts``: every distinct caption or prompt CLIP reads.
    ``samples[i] = (source index, candidate target indices)``: one candidate for pairs; a class's
    prompts for labelled audio, of which training draws one. ``val`` marks held-out samples.
    """

    modality: str
    sources: list
    target_texts: list[str]
    samples: list[tuple[int, tuple[int, ...]]]
    val: list[bool]
    skipped: Counter = field(default_factory=Counter)
    labels: list[str] = field(default_factory=list)  # audio classes, in order

    @property
    def num_train(self) -> int:
        return sum(1 for v in self.val if not v)

    @property
    def num_val(self) -> int:
        return sum(1 for v in self.val if v)

    @property
    def multi_target(self) -> bool:
        """True when samples choose among several targets (class prompts): the targets then form a small bank."""
        return self.modality == "audio"

    def source_keys(self) -> list[str]:
        """Stable text keys of the sources, for hashing (file paths with size and mtime, or the text itself)."""
        if self.modality == "text":
            return list(self.sources)
        keys = []
        for source in self.sources:
            path = source.path if isinstance(source, AudioClip) else source
            stat = path.stat()
            keys.append(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
        return keys

    def describe(self) -> dict[str, int | str]:
        counts: dict[str, int | str] = {
            "modality": self.modality,
            "samples": len(self.samples),
            "train_samples": self.num_train,
            "val_samples": self.num_val,
            "sources": len(self.sources),
            "target_texts": len(self.target_texts),
        }
        if self.labels:
            counts["classes"] = len(self.labels)
        for reason, count in sorted(self.skipped.items()):
            counts[f"skipped_{reason}"] = count
        return counts
