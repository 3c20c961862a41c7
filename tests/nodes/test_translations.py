"""The translations in locales/<lang>/nodeDefs.json: complete, current and translated.

The frontend (comfyui-frontend-package 1.27) fetches them through ComfyUI's ``/i18n`` route and looks up
``nodeDefs.<node id>.display_name`` / ``.description``, ``nodeDefs.<node id>.inputs.<input id>.name`` /
``.tooltip`` and ``nodeDefs.<node id>.outputs.<output index>.name`` / ``.tooltip``, node and input ids with
``.`` replaced by ``_`` (its ``normalizeI18nKey``), output indexes as strings: the format of its own bundled
core translations. A key it does not find falls back silently to the English of the schema, so a missing
or stale entry only shows as English in a translated UI: these tests are what notices.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

LOCALES_DIR = Path(__file__).resolve().parents[2] / "locales"
SHIPPED = ("zh", "ja", "fr", "es")
LOCALES = sorted({path.parent.name for path in LOCALES_DIR.glob("*/nodeDefs.json")} | set(SHIPPED))

NODE_KEYS = {"display_name", "description", "inputs", "outputs"}
SLOT_KEYS = {"name", "tooltip"}

# What a translation keeps as it is: folder paths, file names, option values, numbers, identifiers,
# block specs, hyphenated model names with a digit, product names, upper-case type and model names.
TECHNICAL_TOKENS = [
    r"models/[a-z_]+",
    r"[\w.-]*\.(?:safetensors|ckpt|pth|pt|json|ply|obj|off|stl|glb|npy|npz|xyz|txt)\b",
    r"(?<!\w)'([^']+)'(?!\w)",  # a quoted option value or literal ('from file'), not an apostrophe
    r"\b(?:auto|fp8|fp16|fp32|bf16)\b",
    r"\b\d+(?:\.\d+)?\b",
    r"\b\w+_\w*",
    r"\b(?:input|output):(?:N|\d+(?:[-,]\d+)*)",
    r"[\w.]*\d[\w.]*(?:-[\w.]+)+|[\w.]+(?:-[\w.]+)*-[\w.]*\d[\w.]*",
    r"\b[A-Z][a-z]+[A-Z]\w*?(?=s?\b)",  # ComfyUI, GlueNet(s), PointBERT, LoRA, ControlNet
    r"\b[A-Z][A-Z0-9]{3,}\b",  # MODEL, CLIP, CLAP, ULIP, SDXL
]


def technical_tokens(english: str) -> set[str]:
    found = set()
    for pattern in TECHNICAL_TOKENS:
        for match in re.finditer(pattern, english):
            found.add(match.group(match.lastindex or 0).rstrip(".,;:"))  # not the sentence's punctuation
    return found - {""}


def i18n_key(name: str) -> str:
    """The frontend's ``normalizeI18nKey``."""
    return name.replace(".", "_")


@pytest.fixture(scope="module")
def schemas(pack) -> dict:
    """Every node's schema, from the extension's node list as ComfyUI's loader gets it."""
    nodes = asyncio.run(pack.X2IExtension().get_node_list())
    return {i18n_key(node.GET_SCHEMA().node_id): node.GET_SCHEMA() for node in nodes}


@pytest.fixture(scope="module")
def english(schemas) -> dict:
    """The English every locale translates, in the locale files' shape."""
    return {
        node_id: {
            "display_name": schema.display_name,
            "description": schema.description,
            "inputs": {i18n_key(spec.id): {"name": spec.id, "tooltip": spec.tooltip} for spec in schema.inputs},
            "outputs": {
                str(index): {"name": output.display_name or output.io_type, "tooltip": output.tooltip}
                for index, output in enumerate(schema.outputs)
            },
        }
        for node_id, schema in schemas.items()
    }


def load_locale(lang: str) -> dict:
    path = LOCALES_DIR / lang / "nodeDefs.json"
    assert path.is_file(), f"{path} is missing"
    return json.loads(path.read_text(encoding="utf-8"))


def english_texts(english: dict):
    """(where, English) of every description and tooltip."""
    for node_id, node in english.items():
        yield f"{node_id}.description", node["description"]
        for group in ("inputs", "outputs"):
            for key, slot in node[group].items():
                yield f"{node_id}.{group}.{key}.tooltip", slot["tooltip"]


def lookup(locale: dict, where: str):
    """``locale`` at a dotted path (node ids, input ids and indexes have no dots), or None."""
    value = locale
    for part in where.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def test_every_node_input_and_output_has_an_english_tooltip(schemas):
    assert len(schemas) == 15
    missing = []
    for node_id, schema in schemas.items():
        if not (schema.display_name and schema.description):
            missing.append(f"{node_id}: display_name / description")
        missing += [f"{node_id}.inputs.{spec.id}" for spec in schema.inputs if not (spec.tooltip or "").strip()]
        missing += [f"{node_id}.outputs.{index}" for index, output in enumerate(schema.outputs)
                    if not (output.tooltip or "").strip()]
    assert not missing, f"no English tooltip: {missing}"


def test_the_shipped_locales_are_there():
    assert set(SHIPPED) <= {path.parent.name for path in LOCALES_DIR.glob("*/nodeDefs.json")}


@pytest.mark.parametrize("lang", LOCALES)
def test_locale_is_complete_and_has_no_stale_keys(lang, english):
    locale = load_locale(lang)
    problems = []
    problems += [f"missing node {node_id}" for node_id in english.keys() - locale.keys()]
    problems += [f"stale node {node_id}" for node_id in locale.keys() - english.keys()]
    for node_id in english.keys() & locale.keys():
        node, en = locale[node_id], english[node_id]
        if not isinstance(node, dict):
            problems.append(f"{node_id} is not an object")
            continue
        problems += [f"{node_id}: unknown key {key!r}" for key in node.keys() - NODE_KEYS]
        for key in ("display_name", "description"):
            if not (isinstance(node.get(key), str) and node[key].strip()):
                problems.append(f"{node_id}.{key} missing or empty")
        for group in ("inputs", "outputs"):
            slots = node.get(group)
            if not isinstance(slots, dict):
                problems.append(f"{node_id}.{group} missing")
                continue
            problems += [f"{node_id}.{group}.{key} missing" for key in en[group].keys() - slots.keys()]
            problems += [f"{node_id}.{group}.{key} stale (no such {group[:-1]})" for key in slots.keys() - en[group].keys()]
            for key in en[group].keys() & slots.keys():
                slot = slots[key]
                if not isinstance(slot, dict):
                    problems.append(f"{node_id}.{group}.{key} is not an object")
                    continue
                problems += [f"{node_id}.{group}.{key}: unknown key {k!r}" for k in slot.keys() - SLOT_KEYS]
                problems += [f"{node_id}.{group}.{key}.{k} missing or empty" for k in sorted(SLOT_KEYS)
                             if not (isinstance(slot.get(k), str) and slot[k].strip())]
    assert not problems, f"locales/{lang}/nodeDefs.json:\n" + "\n".join(problems)


@pytest.mark.parametrize("lang", LOCALES)
def test_descriptions_and_tooltips_are_translated_not_copied(lang, english):
    locale = load_locale(lang)
    copied = [where for where, text in english_texts(english) if lookup(locale, where) == text]
    assert not copied, f"locales/{lang}: English copied instead of translated: {copied}"


@pytest.mark.parametrize("lang", LOCALES)
def test_translations_keep_the_technical_tokens(lang, english):
    """File names, folder paths, option values, numbers and model names stay as they are: a translation
    without them is stale (the English changed) or unfaithful."""
    locale = load_locale(lang)
    lost = []
    for where, text in english_texts(english):
        translated = lookup(locale, where)
        if isinstance(translated, str):
            lost += [f"{where}: {token!r}" for token in sorted(technical_tokens(text)) if token not in translated]
    assert not lost, f"locales/{lang}: technical tokens of the English missing from the translation:\n" + "\n".join(lost)


@pytest.mark.parametrize("lang", LOCALES)
def test_a_shared_tooltip_is_translated_the_same_way_everywhere(lang, english):
    """The tooltips shared through nodes/common.py (dtype, encoder, GlueNet, conditioning) read the same on
    every node of a language."""
    locale = load_locale(lang)
    by_english: dict[str, set] = {}
    for where, text in english_texts(english):
        if where.endswith(".tooltip") and isinstance(lookup(locale, where), str):
            by_english.setdefault(text, set()).add(lookup(locale, where))
    varied = {text: sorted(found) for text, found in by_english.items() if len(found) > 1}
    assert not varied, f"locales/{lang}: one English tooltip, several translations: {varied}"
