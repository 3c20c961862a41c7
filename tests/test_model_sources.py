"""Every model file a shipped workflow loads has a source a user can find, without ComfyUI.

A loader's file is covered by a ``properties.models`` entry (what ComfyUI's frontend reads to list missing
models: ``{"name", "url", "directory"}``, used only when ``name`` equals one of the node's widget values) or by
a line of the workflow's note naming the file with a URL or "no public download". The README's table in
"Where model files go" names every file the workflows use, with the same direct links.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))

# The model folder (ComfyUI folder key) each loader reads its first widget's file or folder from.
CORE_LOADERS = {
    "CheckpointLoaderSimple": "checkpoints",
    "VAELoader": "vae",
    "CLIPLoader": "text_encoders",
    "UNETLoader": "diffusion_models",
    "LoraLoaderModelOnly": "loras",
}
X2I_LOADERS = {
    "X2ITextEncoderLoader": "text_encoders",
    "X2ILanguageModelLoader": "text_encoders",
    "X2IGlueNetLoader": "gluenet",
    "X2IAudioEncoderLoader": "audio_encoders",
    "X2IPointCloudEncoderLoader": "point_encoders",
    "X2ILaViBridgeLoader": "lavi_bridge",
    "X2IUViTLoader": "diffusion_models",
}
LOADERS = {**CORE_LOADERS, **X2I_LOADERS}
# Loaders of the user's own inputs (ComfyUI's input/ folder), not of models.
INPUT_LOADERS = {"X2IPointCloudLoader"}
NOTE_TYPES = {"Note", "MarkdownNote"}
# Direct single-file links on hosts that keep them (a Hugging Face file, a GitHub release asset): a note giving
# one for a loader's exact file must put it in the node's metadata too, or the frontend never sees it.
DIRECT_URL = re.compile(r"https://(?:huggingface\.co/[^\s)]+/resolve/|github\.com/[^\s)]+/releases/download/)[^\s)]+")
README_SECTION = "## Where model files go"
SOURCES_SUBSECTION = "### Where each model comes from"


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _loaders(workflow: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """``(node, file)`` for every node that loads a model file or folder named by its first widget."""
    found = []
    for node in workflow["nodes"]:
        if node["type"] in LOADERS:
            values = node.get("widgets_values") or []
            assert values and isinstance(values[0], str) and values[0].strip(), (node["type"], values)
            found.append((node, values[0]))
    return found


def _note(workflow: dict[str, Any]) -> str:
    notes = [node["widgets_values"][0] for node in workflow["nodes"] if node["type"] in NOTE_TYPES]
    assert len(notes) == 1, f"expected one note, found {len(notes)}"
    return notes[0]


def _url_file(url: str) -> str:
    parts = urlsplit(url)
    assert parts.query in ("", "download=true"), url
    return unquote(parts.path.rsplit("/", 1)[-1])


def _note_sources(note: str, name: str) -> list[str]:
    """The note's lines naming ``name`` with a URL or "no public download"."""
    return [line for line in note.splitlines()
            if name in line and ("https://" in line or "no public download" in line.lower())]


def _readme_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split(README_SECTION, 1)[1]
    return section.split("\n## ", 1)[0]


def _sources_table() -> list[str]:
    """The rows (header first) of the table under "### Where each model comes from"."""
    subsection = _readme_section().split(SOURCES_SUBSECTION, 1)[1]
    lines = subsection.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("|"))
    end = next((index for index in range(start, len(lines)) if not lines[index].startswith("|")), len(lines))
    return lines[start:end]


def uncovered_loaders(workflow: dict[str, Any]) -> list[str]:
    """``type: file`` of every loader whose file has neither a metadata entry nor a source line in the note."""
    note = _note(workflow)
    missing = []
    for node, name in _loaders(workflow):
        listed = any(entry.get("name") == name for entry in node.get("properties", {}).get("models", []))
        if not (listed or _note_sources(note, name)):
            missing.append(f"{node['type']}: {name}")
    return missing


def test_the_loader_lists_cover_every_loader_the_pack_defines():
    declared = set()
    for source in (ROOT / "nodes").glob("*.py"):
        declared |= set(re.findall(r"^class (X2I\w*Loader)\b", source.read_text(encoding="utf-8"), re.M))
    assert declared == set(X2I_LOADERS) | INPUT_LOADERS
    used = {node["type"] for path in WORKFLOWS for node in _load(path)["nodes"] if node["type"].endswith("Loader")}
    assert used <= set(LOADERS) | INPUT_LOADERS, used - set(LOADERS) - INPUT_LOADERS


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_every_loader_names_where_its_file_comes_from(path: Path):
    workflow = _load(path)
    assert _loaders(workflow)
    assert uncovered_loaders(workflow) == []


def test_a_loader_without_a_source_is_reported():
    workflow = _load(ROOT / "workflows" / "uvit_text_to_image.json")
    vae = next(node for node in workflow["nodes"] if node["type"] == "VAELoader")
    name = vae["widgets_values"][0]
    assert uncovered_loaders(workflow) == []

    del vae["properties"]["models"]
    note = next(node for node in workflow["nodes"] if node["type"] in NOTE_TYPES)
    note["widgets_values"][0] = "\n".join(line for line in note["widgets_values"][0].splitlines() if name not in line)

    assert uncovered_loaders(workflow) == [f"VAELoader: {name}"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_model_metadata_is_what_the_frontend_reads(path: Path):
    """ComfyUI's frontend (1.27) keeps ``properties.models`` entries whose ``name`` is one of the node's widget
    values, checks ``directory`` against the server's model folders and ``name`` against the files there, and its
    schema needs ``url`` to be a URL."""
    workflow = _load(path)
    loaders = {id(node): name for node, name in _loaders(workflow)}
    for node in workflow["nodes"]:
        entries = node.get("properties", {}).get("models")
        if entries is None:
            continue
        assert id(node) in loaders, f"{node['type']} is not a model loader but has properties.models"
        name = loaders[id(node)]
        assert isinstance(entries, list) and len(entries) == 1, entries
        entry = entries[0]
        assert set(entry) == {"name", "url", "directory"}, entry
        assert entry["name"] == name, (entry["name"], name)
        assert entry["url"].startswith("https://") and " " not in entry["url"], entry["url"]
        assert _url_file(entry["url"]) == name, (entry["url"], name)
        assert entry["directory"] == LOADERS[node["type"]], (node["type"], entry["directory"])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_every_note_lists_its_models_with_their_sources(path: Path):
    workflow = _load(path)
    note = _note(workflow)
    assert "### Models" in note
    for node, name in _loaders(workflow):
        assert _note_sources(note, name), f"the note names no source for {name}"
        for url in (match.rstrip(".,;") for match in DIRECT_URL.findall(note)):
            if _url_file(url) == name:
                urls = [entry["url"] for entry in node.get("properties", {}).get("models", [])]
                assert url in urls, f"{name}: the note's {url} is missing from the node's properties.models"


def test_the_readme_table_names_every_workflow_file_and_link():
    assert "downloads nothing" in _readme_section()
    rows = "\n".join(_sources_table())
    for path in WORKFLOWS:
        for node, name in _loaders(_load(path)):
            assert f"`{name}`" in rows or f"`{name}/`" in rows, f"{path.name}: the README's table does not name {name}"
            for entry in node.get("properties", {}).get("models", []):
                assert entry["url"] in rows, f"{path.name}: the README's table lacks {entry['url']}"


def test_the_readme_table_gives_each_model_a_source_licence_and_size():
    header, rule, *rows = _sources_table()
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert any("source" in column for column in columns) and "licence" in columns and "size" in columns, header
    assert rule.startswith("|---") and rows
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == len(columns) and all(cells), row
        assert "https://" in row or "no public download" in row, row
