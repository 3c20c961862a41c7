"""The help page ComfyUI's frontend shows for each node, checked against the node's live schema.

The frontend (comfyui-frontend-package 1.27, ComfyUI 0.3.64) fetches ``/extensions/<pack folder>/docs/<NodeId>/<locale>.md``
and falls back to ``/extensions/<pack folder>/docs/<NodeId>.md``; ``/extensions/<pack folder>/`` serves the pack's
``WEB_DIRECTORY`` (``./web``). So every node has ``web/docs/<NodeId>.md`` in English (what ``en`` and any locale without
a page gets) and ``web/docs/<NodeId>/<locale>.md`` for each locale the pack translates (``locales/<locale>/nodeDefs.json``).

Every page follows one layout, which is what makes a missing or stale page fail here:

- its first line is ``# <display name>``: the schema's in English, ``locales/<locale>/nodeDefs.json``'s in a translation;
- its first two Markdown tables are the inputs and the outputs, one row per schema input / output, in schema order.
  The first cell of an input row holds the input's id in backticks (ids are not translated; the display name is
  accepted too) and, in a translation, the locale's name for that input; the first cell of an output row holds the
  output's id, display name or type in backticks and the locale's name for it; the second cell is the ComfyUI type
  (``COMBO``, ``INT``, ``X2I_ENCODER``...). Adding, removing, renaming, reordering or retyping an input or output, or
  renaming one in ``locales/``, fails the pages that still describe the old schema;
- it names a shipped ``workflows/<name>.json`` that uses the node, and links the paper's or encoder's GitHub repository;
- it is plain Markdown (markdown-it renders it): no HTML, no images.

The first test needs no ComfyUI (node ids are read from ``nodes/*.py``), but like everything in tests/nodes it is
skipped without COMFYUI_PATH (see conftest.py).
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "web" / "docs"
LOCALES = sorted(path.parent.name for path in (ROOT / "locales").glob("*/nodeDefs.json"))
ENGLISH = "en"
# Where the pack's methods and encoders come from; every page links at least one.
SOURCES = (
    "https://github.com/salesforce/GlueGen",
    "https://github.com/ShihaoZhaoZSH/LaVi-Bridge",
    "https://github.com/zizhao-hu/U-ViT",
    "https://github.com/baofff/U-ViT",
    "https://github.com/AndreyGuzhov/AudioCLIP",
    "https://github.com/salesforce/ULIP",
    "https://github.com/LAION-AI/CLAP",
)
MIN_LINES, MAX_LINES, MIN_CHARS, MIN_SECTIONS = 15, 50, 800, 5  # ~25-40 lines: short, not a stub
LOCALE_FILE = re.compile(r"[a-z]{2}(-[A-Z]{2})?\.md")  # zh.md, ja.md, zh-TW.md: the frontend's locale codes
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)
TABLE_SEPARATOR = re.compile(r"\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?")


def declared_node_ids() -> list[str]:
    """Every ``node_id="..."`` of an ``io.Schema`` in nodes/*.py, read without importing ComfyUI."""
    ids = []
    for path in sorted((ROOT / "nodes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.keyword) and node.arg == "node_id" and isinstance(node.value, ast.Constant):
                ids.append(node.value.value)
    return ids


NODE_IDS = declared_node_ids()


def page_path(node_id: str, locale: str) -> Path:
    return DOCS / f"{node_id}.md" if locale == ENGLISH else DOCS / node_id / f"{locale}.md"


@cache
def locale_defs(locale: str) -> dict:
    if locale == ENGLISH:
        return {}
    return json.loads((ROOT / "locales" / locale / "nodeDefs.json").read_text(encoding="utf-8"))


@cache
def workflow_node_types() -> dict[str, set[str]]:
    """Shipped workflow file name -> the node types it holds."""
    return {
        path.name: {node.get("type") for node in json.loads(path.read_text(encoding="utf-8")).get("nodes", [])}
        for path in sorted((ROOT / "workflows").glob("*.json"))
    }


def split_row(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def tables(text: str) -> list[list[list[str]]]:
    """The page's Markdown tables in order, each as its body rows (header and separator dropped), cells split."""
    found, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            block.append(line)
            continue
        if len(block) >= 2 and TABLE_SEPARATOR.fullmatch(block[1].strip()):
            found.append([split_row(row) for row in block[2:]])
        block = []
    return found


def code_names(cell: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", cell)


@pytest.fixture(scope="module")
def schemas(pack) -> dict:
    """node id -> schema, for the node classes of the extension's node list (what ComfyUI registers)."""
    nodes = asyncio.run(pack.X2IExtension().get_node_list())
    return {schema.node_id: schema for schema in (node.define_schema() for node in nodes)}


def test_every_page_belongs_to_a_node():
    """No orphan page: web/docs holds ``<NodeId>.md`` and ``<NodeId>/<locale>.md`` for node ids declared in nodes/."""
    assert NODE_IDS and len(NODE_IDS) == len(set(NODE_IDS)), f"node ids in nodes/*.py: {NODE_IDS}"
    known = set(NODE_IDS)
    problems = []
    for path in sorted(DOCS.iterdir()):
        if path.is_file():
            if path.suffix != ".md" or path.stem not in known:
                problems.append(f"{path.name}: not <NodeId>.md for a node id in nodes/")
        elif path.name not in known:
            problems.append(f"{path.name}/: no node has this id")
        else:
            problems += [f"{path.name}/{page.name}: not <locale>.md" for page in sorted(path.iterdir())
                         if not (page.is_file() and LOCALE_FILE.fullmatch(page.name))]
    assert not problems, "\n".join(problems)


def test_the_pages_cover_the_extensions_node_list(schemas):
    """The node ids the page tests run for (read from nodes/) are exactly the nodes the extension registers."""
    assert sorted(schemas) == sorted(NODE_IDS)
    assert {"zh", "ja", "fr", "es"} <= set(LOCALES), LOCALES


@pytest.mark.parametrize("locale", [ENGLISH, *LOCALES])
@pytest.mark.parametrize("node_id", NODE_IDS)
def test_the_help_page_describes_the_node(schemas, node_id, locale):
    assert node_id in schemas, f"{node_id} is declared in nodes/ but not in X2IExtension.get_node_list()"
    schema, path = schemas[node_id], page_path(node_id, locale)
    where = path.relative_to(ROOT)
    assert path.is_file(), f"{where} is missing"
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    body = [line for line in lines if line.strip()]
    sections = [line for line in lines if line.startswith("## ")]
    assert MIN_LINES <= len(body) and len(lines) <= MAX_LINES, f"{where}: {len(body)} non-blank of {len(lines)} lines"
    assert len(text) >= MIN_CHARS, f"{where}: {len(text)} characters, a stub"
    assert len(sections) >= MIN_SECTIONS, f"{where}: {len(sections)} sections, expected what / inputs / outputs / ..."

    translated = locale_defs(locale).get(node_id, {})
    title = translated.get("display_name", schema.display_name)
    assert lines[0] == f"# {title}", f"{where}: the first line should be '# {title}'"

    found = tables(text)
    assert len(found) >= 2, f"{where}: expected an inputs table and an outputs table"
    for kind, specs, rows in (("input", schema.inputs, found[0]), ("output", schema.outputs, found[1])):
        assert len(rows) == len(specs), f"{where}: {len(rows)} {kind} rows, the node has {len(specs)} {kind}s"
        for index, (spec, row) in enumerate(zip(specs, rows, strict=True)):
            io_type = str(spec.get_io_type())
            names = {spec.id, spec.display_name} | ({io_type} if kind == "output" else set())
            assert set(code_names(row[0])) & (names - {None}), (
                f"{where}: {kind} row {index + 1} ({row[0]!r}) should name {spec.id or spec.display_name or io_type} "
                "in backticks")
            assert len(row) >= 3 and io_type in code_names(row[1]) + [row[1]], (
                f"{where}: {kind} row {index + 1} should give the type {io_type}, got {row[1:2]}")
            key = spec.id if kind == "input" else str(index)
            local_name = translated.get(f"{kind}s", {}).get(key, {}).get("name")
            assert local_name is None or local_name in row[0], (
                f"{where}: {kind} row {index + 1} should show the locale's name {local_name!r} (locales/{locale})")

    named = re.findall(r"workflows/([\w.-]+\.json)", text)
    missing = sorted(set(named) - set(workflow_node_types()))
    assert not missing, f"{where} names workflows that do not exist: {missing}"
    assert any(node_id in workflow_node_types()[name] for name in named), (
        f"{where} should name a shipped workflow that uses {node_id}")
    assert any(source in text for source in SOURCES), f"{where} should link the paper's repository"

    prose = CODE.sub("", text)
    assert not re.search(r"<[A-Za-z!/]", prose), f"{where}: HTML in the page (the frontend renders plain Markdown)"
    assert "![" not in prose, f"{where}: images in the page"
