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

Decisions on bad input:

- Parallel files of different line counts: :class:`DataError` naming both files and both counts
  (nothing lines up after the first missing line, so no model trained on them would be right).
- Empty lines (on either side): the pair is skipped and counted.
- Undecodable UTF-8: by default :class:`DataError` naming the file, the line and the byte offset.
  A file that is not UTF-8 is nearly always wholly in another encoding (GBK, Latin-1); skipping would
  silently drop most of it and decoding with replacement characters would train on garbage. Set
  ``on_bad_line = "skip"`` to skip and count such lines instead (malformed TSV/JSONL rows too).
- Missing files listed in metadata: skipped and counted. Unreadable audio or point clouds are found
  when the encoder reads them (see :mod:`training.features`): skipped, counted, the first reasons logged.

Lines are split on ``\\n`` only (``\\r\\n`` accepted), never on the other Unicode line breaks
``str.splitlines`` knows: a stray U+2028 inside a caption must not shift every following pair.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

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
US8K_CSV = Path("metadata") / "UrbanSound8K.csv"
# What libsndfile (soundfile) reads; other files in a class folder are ignored.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".w64", ".caf", ".opus")
# How many examples of each skip reason are logged before only counting.
LOGGED_EXAMPLES = 5


def setting(default: Any = None, doc: str = "", factory: Callable[[], Any] | None = None) -> Any:
    """A config dataclass field with the help text ``train gluenet --help`` prints next to it."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": doc})
    return field(default=default, metadata={"help": doc})


class DataError(ValueError):
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


def hash_strings(strings: Iterable[str]) -> str:
    """sha256 of a sequence of strings (length-prefixed, so ``["ab", "c"]`` and ``["a", "bc"]`` differ)."""
    digest = hashlib.sha256()
    for text in strings:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


class _SkipLog:
    """Counts skipped items by reason and logs the first few of each."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def skip(self, reason: str, detail: str) -> None:
        self.counter[reason] += 1
        if self.counter[reason] <= LOGGED_EXAMPLES:
            logger.warning("skipped (%s): %s", reason.replace("_", " "), detail)
        elif self.counter[reason] == LOGGED_EXAMPLES + 1:
            logger.warning("further '%s' skips are only counted", reason.replace("_", " "))


# ---- parallel text -------------------------------------------------------------------------------


def _raw_lines(path: Path) -> list[bytes]:
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # UTF-8 byte order mark, written by some Windows editors
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line does not start another
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _line_offsets(lines: Sequence[bytes]) -> Iterator[int]:
    offset = 0
    for line in lines:
        yield offset
        offset += len(line) + 1


def _decode(line: bytes, path: Path, number: int, offset: int, on_bad: str, skips: _SkipLog) -> str | None:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"{path}, line {number} (byte {offset + exc.start} of the file)"
        if on_bad == "skip":
            skips.skip("undecodable", where)
            return None
        raise DataError(
            f"{where} is not valid UTF-8 ({exc.reason}). Convert the file to UTF-8 (e.g. iconv -f GBK -t UTF-8), "
            "or set data.on_bad_line = \"skip\" to skip and count such lines"
        ) from exc


def read_parallel_files(source: Path, target: Path, on_bad: str, skipped: Counter) -> list[tuple[str, str]]:
    """Line-aligned UTF-8 files to (source, target) pairs; see the module docstring for bad input."""
    source_lines, target_lines = _raw_lines(source), _raw_lines(target)
    if len(source_lines) != len(target_lines):
        raise DataError(
            f"parallel files are not line-aligned: {source} has {len(source_lines)} lines, {target} has "
            f"{len(target_lines)}. Each line of one must be the translation of the same line of the other"
        )
    skips = _SkipLog(skipped)
    pairs = []
    rows = zip(source_lines, _line_offsets(source_lines), target_lines, _line_offsets(target_lines), strict=True)
    for number, (src, src_at, tgt, tgt_at) in enumerate(rows, start=1):
        src_text = _decode(src, source, number, src_at, on_bad, skips)
        tgt_text = _decode(tgt, target, number, tgt_at, on_bad, skips)
        if src_text is None or tgt_text is None:
            continue
        _add_pair(pairs, src_text, tgt_text, f"line {number}", skips)
    return pairs


def _add_pair(pairs: list[tuple[str, str]], source: str, target: str, where: str, skips: _SkipLog) -> None:
    source, target = source.strip(), target.strip()
    if not source or not target:
        skips.skip("empty_line", f"{where}: {'source' if not source else 'target'} side is empty")
        return
    pairs.append((source, target))


def read_pairs_file(path: Path, settings: GlueNetDataSettings, skipped: Counter) -> list[tuple[str, str]]:
    """A ``.tsv`` or ``.jsonl`` file of (source, target) pairs."""
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".jsonl"):
        raise DataError(f"pairs_file {path.name} must be .tsv (source<TAB>target) or .jsonl ({{\"source\", \"target\"}})")
    skips = _SkipLog(skipped)
    lines = _raw_lines(path)
    pairs: list[tuple[str, str]] = []
    src_col, tgt_col = settings.tsv_columns
    src_key, tgt_key = settings.jsonl_keys
    for number, (line, offset) in enumerate(zip(lines, _line_offsets(lines), strict=True), start=1):
        text = _decode(line, path, number, offset, settings.on_bad_line, skips)
        if text is None:
            continue
        if not text.strip():
            skips.skip("empty_line", f"{path.name} line {number}")
            continue
        problem = None
        if suffix == ".tsv":
            columns = text.split("\t")
            if len(columns) <= max(src_col, tgt_col):
                problem = f"has {len(columns)} tab-separated column(s); tsv_columns = {settings.tsv_columns} needs {max(src_col, tgt_col) + 1}"
            else:
                source, target = columns[src_col], columns[tgt_col]
        else:
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                problem = f"is not JSON ({exc.msg})"
            else:
                if not isinstance(row, dict) or not isinstance(row.get(src_key), str) or not isinstance(row.get(tgt_key), str):
                    problem = f"needs string fields {src_key!r} and {tgt_key!r}"
                else:
                    source, target = row[src_key], row[tgt_key]
        if problem is not None:
            if settings.on_bad_line == "skip":
                skips.skip("malformed", f"{path.name} line {number} {problem}")
                continue
            raise DataError(f"{path}, line {number} {problem} (set data.on_bad_line = \"skip\" to skip and count such rows)")
        _add_pair(pairs, source, target, f"{path.name} line {number}", skips)
    return pairs


# ---- audio with labels ---------------------------------------------------------------------------


def label_prompt_words(label: str, settings: GlueNetDataSettings) -> list[str]:
    """The words a label's prompts are made of: configured synonyms, the official UrbanSound8K ones,
    or the label itself (underscores as spaces)."""
    spaced = label.replace("_", " ").strip()
    for key in (label, spaced):
        if key in settings.label_prompts:
            words = [w for w in settings.label_prompts[key] if w.strip()]
            if not words:
                raise DataError(f"label_prompts[{key!r}] is empty")
            return words
    if settings.official_label_prompts and spaced.lower() in OFFICIAL_US8K_LABEL_PROMPTS:
        return list(OFFICIAL_US8K_LABEL_PROMPTS[spaced.lower()])
    return [spaced]


def class_prompts(label: str, settings: GlueNetDataSettings) -> list[str]:
    """Every prompt of a class: each template with each synonym (duplicates kept: they weigh the draw)."""
    return [template.format(word) for template in settings.prompt_templates for word in label_prompt_words(label, settings)]


def list_urbansound8k(root: Path, settings: GlueNetDataSettings, skipped: Counter) -> list[AudioClip]:
    csv_path = root / US8K_CSV
    skips = _SkipLog(skipped)
    wanted = set(settings.train_folds) | set(settings.val_folds)
    clips = []
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"slice_file_name", "fold", "class"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{csv_path} lacks the UrbanSound8K column(s) {', '.join(sorted(missing))}")
        for number, row in enumerate(reader, start=2):
            try:
                fold = int(row["fold"])
            except (TypeError, ValueError):
                skips.skip("malformed", f"{csv_path.name} row {number}: fold {row['fold']!r} is not a number")
                continue
            if fold not in wanted:
                continue
            path = root / "audio" / f"fold{fold}" / row["slice_file_name"]
            if not path.is_file():
                skips.skip("missing_file", str(path))
                continue
            clips.append(AudioClip(path, row["class"].strip(), fold))
    return clips


def list_class_folders(root: Path, skipped: Counter) -> list[AudioClip]:
    clips = []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
        if not files:
            _SkipLog(skipped).skip("empty_class_folder", str(folder))
        clips += [AudioClip(path, folder.name) for path in files]
    return clips


# ---- point clouds with captions --------------------------------------------------------------------


def _captions(text: str) -> list[str]:
    return [line.strip() for line in text.split("\n") if line.strip()]


def list_point_cloud_folder(root: Path, skipped: Counter) -> list[tuple[Path, list[str]]]:
    """Clouds with a sidecar ``<stem>.txt`` caption file. In a folder, ``.txt`` files are captions,
    never clouds (list clouds stored as .txt in a CSV/JSONL listing)."""
    from ..encoders.pointcloud import SUFFIXES

    skips = _SkipLog(skipped)
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        if suffix == ".txt" or suffix not in SUFFIXES:
            continue
        sidecar = path.with_suffix(".txt")
        if not sidecar.is_file():
            skips.skip("no_caption", f"{path} has no {sidecar.name}")
            continue
        try:
            captions = _captions(sidecar.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise DataError(f"caption file {sidecar} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
        if not captions:
            skips.skip("empty_line", f"{sidecar} holds no caption")
            continue
        entries.append((path, captions))
    return entries


def list_point_cloud_file(listing: Path, settings: GlueNetDataSettings, skipped: Counter) -> list[tuple[Path, list[str]]]:
    """A ``.csv`` (header ``path,caption``) or ``.jsonl`` listing; relative paths are relative to the listing."""
    skips = _SkipLog(skipped)
    suffix = listing.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise DataError(f"point_cloud_list {listing.name} must be .csv (path,caption) or .jsonl ({{\"path\", \"caption\"}})")
    if not listing.is_file():
        raise DataError(f"point-cloud listing not found: {listing}")
    rows: list[tuple[int, object, object]] = []
    try:
        text = listing.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{listing} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not {"path", "caption"} <= set(reader.fieldnames or ()):
            raise DataError(f"{listing} needs a header with the columns path and caption, found {reader.fieldnames}")
        rows = [(number, row["path"], row["caption"]) for number, row in enumerate(reader, start=2)]
    else:
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                if settings.on_bad_line == "skip":
                    skips.skip("malformed", f"{listing.name} line {number}: {exc.msg}")
                    continue
                raise DataError(f"{listing}, line {number} is not JSON ({exc.msg})") from exc
            rows.append((number, row.get("path") if isinstance(row, dict) else None, row.get("caption") if isinstance(row, dict) else None))
    grouped: dict[Path, list[str]] = {}
    for number, path_value, caption in rows:
        captions = [caption] if isinstance(caption, str) else caption
        if not isinstance(path_value, str) or not path_value or not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            if settings.on_bad_line == "skip":
                skips.skip("malformed", f"{listing.name} row {number}")
                continue
            raise DataError(f"{listing}, row {number} needs a path and a caption (text, or a list of texts for JSONL)")
        path = Path(path_value)
        path = path if path.is_absolute() else listing.parent / path
        if not path.is_file():
            skips.skip("missing_file", str(path))
            continue
        kept = [c.strip() for c in captions if c.strip()]
        if not kept:
            skips.skip("empty_line", f"{listing.name} row {number}: empty caption")
            continue
        grouped.setdefault(path, []).extend(kept)
    return list(grouped.items())


# ---- the listing ----------------------------------------------------------------------------------


def _split_groups(num_groups: int, fraction: float, seed: int) -> list[bool]:
    """A deterministic choice of ``round(fraction * n)`` held-out groups (at least one when asked for any)."""
    if fraction <= 0 or num_groups < 2:
        return [False] * num_groups
    count = min(num_groups - 1, max(1, round(fraction * num_groups)))
    order = torch.randperm(num_groups, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return [i in held for i in range(num_groups)]


def _resolve(path: str, base: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or base is None else base / p


def build_listing(settings: GlueNetDataSettings, seed: int = 0, base: Path | None = None) -> GlueNetListing:
    """Read and check the data described by ``settings``; nothing is encoded. ``base``: the folder
    relative paths in the config are relative to (the config file's folder)."""
    skipped: Counter = Counter()
    modality = settings.modality
    if modality == "text":
        if settings.pairs_file and (settings.source_file or settings.target_file):
            raise DataError("give either data.pairs_file or data.source_file + data.target_file, not both")
        if settings.pairs_file:
            pairs = read_pairs_file(_resolve(settings.pairs_file, base), settings, skipped)
        elif settings.source_file and settings.target_file:
            pairs = read_parallel_files(
                _resolve(settings.source_file, base), _resolve(settings.target_file, base), settings.on_bad_line, skipped
            )
        else:
            raise DataError(
                "text GlueNets need data.source_file and data.target_file (line-aligned) or data.pairs_file (.tsv/.jsonl)"
            )
        if settings.max_samples:
            pairs = pairs[: settings.max_samples]
        sources = [p[0] for p in pairs]
        targets = [p[1] for p in pairs]
        samples = [(i, (i,)) for i in range(len(pairs))]
        val = _split_groups(len(pairs), settings.val_fraction, seed)
        listing = GlueNetListing(modality, sources, targets, samples, val, skipped)
    elif modality == "audio":
        if not settings.audio_dir:
            raise DataError("audio GlueNets need data.audio_dir (an UrbanSound8K folder or one sub-folder per class)")
        root = _resolve(settings.audio_dir, base)
        if not root.is_dir():
            raise DataError(f"audio folder not found: {root}")
        is_us8k = (root / US8K_CSV).is_file()
        clips = list_urbansound8k(root, settings, skipped) if is_us8k else list_class_folders(root, skipped)
        if settings.max_samples:
            clips = clips[: settings.max_samples]
        labels = sorted({clip.label for clip in clips})
        target_texts: list[str] = []
        candidates: dict[str, tuple[int, ...]] = {}
        index: dict[str, int] = {}
        for label in labels:
            ids = []
            for prompt in class_prompts(label, settings):
                if prompt not in index:
                    index[prompt] = len(target_texts)
                    target_texts.append(prompt)
                ids.append(index[prompt])
            candidates[label] = tuple(ids[:1] if settings.prompt_choice == "first" else ids)
        samples = [(i, candidates[clip.label]) for i, clip in enumerate(clips)]
        if is_us8k and settings.val_folds:
            val = [clip.fold in settings.val_folds for clip in clips]
        else:
            val = _split_groups(len(clips), settings.val_fraction, seed)
        listing = GlueNetListing(modality, clips, target_texts, samples, val, skipped, labels)
    else:
        if bool(settings.point_cloud_dir) == bool(settings.point_cloud_list):
            raise DataError("point-cloud GlueNets need exactly one of data.point_cloud_dir or data.point_cloud_list")
        if settings.point_cloud_dir:
            root = _resolve(settings.point_cloud_dir, base)
            if not root.is_dir():
                raise DataError(f"point-cloud folder not found: {root}")
            entries = list_point_cloud_folder(root, skipped)
        else:
            entries = list_point_cloud_file(_resolve(settings.point_cloud_list, base), settings, skipped)
        sources = []
        target_texts = []
        samples = []
        groups = []
        for cloud_index, (path, captions) in enumerate(entries):
            if settings.max_samples and len(samples) >= settings.max_samples:
                break
            sources.append(path)
            for caption in captions[: settings.max_samples - len(samples) if settings.max_samples else None]:
                samples.append((cloud_index, (len(target_texts),)))
                target_texts.append(caption)
                groups.append(cloud_index)
        # Split by cloud: captions of one cloud never sit on both sides.
        held = _split_groups(len(sources), settings.val_fraction, seed)
        val = [held[g] for g in groups]
        listing = GlueNetListing(modality, sources, target_texts, samples, val, skipped)
    if not listing.samples:
        raise DataError(f"no usable {modality} samples found (skipped: {dict(skipped) or 'none'})")
    if listing.num_train == 0:
        raise DataError("every sample is held out for validation: lower data.val_fraction or change the folds")
    logger.info("GlueNet data: %s", listing.describe())
    return listing
