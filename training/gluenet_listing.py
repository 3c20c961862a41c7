"""Reading a GlueNet's training data into a :class:`.gluenet_data.GlueNetListing`: the files of each
modality listed and checked before any encoder runs (what the data is: :mod:`.gluenet_data`).

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
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .gluenet_data import (
    OFFICIAL_US8K_LABEL_PROMPTS,
    AudioClip,
    DataError,
    GlueNetDataSettings,
    GlueNetListing,
)

logger = logging.getLogger(__name__)

US8K_CSV = Path("metadata") / "UrbanSound8K.csv"
# What libsndfile (soundfile) reads; other files in a class folder are ignored.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".w64", ".caf", ".opus")
# How many examples of each skip reason are logged before only counting.
LOGGED_EXAMPLES = 5


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
