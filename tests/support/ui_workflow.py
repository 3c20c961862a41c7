"""Convert a UI-format (litegraph) workflow into ComfyUI's API prompt format.

Mirrors ``graphToPrompt`` of the ComfyUI frontend (comfyui-frontend-package
1.27, bundled with ComfyUI 0.3.64), so tests can run the workflows a pack ships
in ``example_workflows/`` through ``POST /prompt`` without a browser:

* frontend-only ("virtual") nodes -- Note, MarkdownNote, Reroute,
  PrimitiveNode -- emit nothing; links through a Reroute are followed, a
  PrimitiveNode's value is copied into the widget it drives (the frontend's
  ``applyToGraph``); any other type missing from ``/object_info`` is an error
  (usually: the pack failed to import -- see the server log);
* muted (mode 2) and bypassed (mode 4) nodes emit nothing; a link out of a
  bypassed node is re-routed to the bypassed node's input of the same type;
* ``widgets_values`` is a positional list over the node's widgets, which the
  frontend creates from the node definition: required then optional inputs of
  widget types, in ``input_order``; INT inputs with ``control_after_generate``
  (or, lacking that key, named ``seed``/``noise_seed``) are followed by a
  "control after generate" widget, COMBOs with ``control_after_generate`` by
  that plus a filter-list widget, and media-upload COMBOs add an upload button
  after the required inputs. Those extra widgets are saved in the workflow but
  never sent to the server -- except the audio player that Comfy.AudioWidget adds to
  the core audio nodes, which is sent as ``"audioUI": ""`` (graphToPrompt skips only
  widgets whose *options* say ``serialize: false``; that one sets the flag on itself);
* a widget that is also linked keeps its slot in ``widgets_values``; the link wins;
* list values are wrapped as ``{"__value__": [...]}`` as the frontend does.

Not supported: subgraphs and group nodes (raise ``UnsupportedWorkflowError``),
dynamic-prompt expansion (``{a|b}`` is sent verbatim) and widgets that a
node's own JavaScript extension adds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("x2i.tests.ui_workflow")

ApiPrompt = dict[str, dict[str, Any]]

MODE_NEVER = 2  # "muted"
MODE_BYPASS = 4

# Node types registered by the frontend itself, never by the server.
VIRTUAL_NODE_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
# Input types the frontend renders as widgets (comfy widgets registry).
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
LEGACY_SEED_NAMES = frozenset({"seed", "noise_seed"})
MEDIA_UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload", "audio_upload")
# Comfy.AudioWidget adds a DOM "audioUI" widget to exactly these core nodes; graphToPrompt sends its value "".
AUDIO_UI_WIDGET = "audioUI"
AUDIO_UI_NODES = frozenset({"LoadAudio", "SaveAudio", "PreviewAudio", "SaveAudioMP3", "SaveAudioOpus"})


class UnsupportedWorkflowError(ValueError):
    """The workflow uses a frontend feature this converter does not model."""


@dataclass(frozen=True)
class WidgetSlot:
    """One entry of a node's ``widgets_values``; ``name`` is None for UI-only widgets."""

    name: str | None


@dataclass(frozen=True)
class Link:
    origin_id: str
    origin_slot: int
    type: str


# ---------------------------------------------------------------- widgets


def _is_widget_input(spec: list[Any]) -> bool:
    type_, options = spec[0], _options(spec)
    if options.get("forceInput"):
        return False  # socket only: the frontend creates no widget for it
    if isinstance(type_, list):
        return True  # legacy COMBO: the option list itself
    return type_ in WIDGET_TYPES or bool(options.get("widgetType"))


def _options(spec: list[Any]) -> dict[str, Any]:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _is_combo(spec: list[Any]) -> bool:
    return isinstance(spec[0], list) or spec[0] == "COMBO"


def _control_widget_count(name: str, spec: list[Any]) -> int:
    """How many UI-only widgets follow this widget (see the frontend's useIntWidget/addComboWidget)."""
    options = _options(spec)
    if spec[0] == "INT":
        # `control_after_generate ?? name in [seed, noise_seed]`: an explicit False wins.
        control = options.get("control_after_generate")
        enabled = name in LEGACY_SEED_NAMES if control is None else bool(control)
        return 1 if enabled else 0
    if _is_combo(spec) and options.get("control_after_generate"):
        return 2  # control mode + combo filter list
    return 0


def _ordered_inputs(node_def: dict[str, Any], section: str) -> Iterator[tuple[str, list[Any]]]:
    specs: dict[str, list[Any]] = node_def.get("input", {}).get(section, {}) or {}
    order = node_def.get("input_order", {}).get(section) or list(specs)
    for name in order:
        if name in specs:
            yield name, specs[name]


def widget_slots(class_type: str, node_def: dict[str, Any]) -> list[WidgetSlot]:
    """The frontend's widget list for a node class, in ``widgets_values`` order."""
    slots: list[WidgetSlot] = []
    for section in ("required", "optional"):
        has_media_upload = False
        for name, spec in _ordered_inputs(node_def, section):
            if not _is_widget_input(spec):
                continue
            slots.append(WidgetSlot(name))
            slots.extend(WidgetSlot(None) for _ in range(_control_widget_count(name, spec)))
            has_media_upload |= any(_options(spec).get(flag) for flag in MEDIA_UPLOAD_FLAGS)
        if section == "required":
            # Frontend extensions append these to the *required* inputs of the definition.
            if class_type in AUDIO_UI_NODES:
                slots.append(WidgetSlot(None))
            if has_media_upload:
                slots.append(WidgetSlot(None))
    return slots


def _widget_inputs(node: dict[str, Any], node_def: dict[str, Any]) -> dict[str, Any]:
    values = node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, dict):
        # Some nodes (e.g. VHS) serialise their widgets by name.
        return {name: values[name] for name in _widget_names(node_def) if name in values}
    slots = widget_slots(node["type"], node_def)
    if len(values) < sum(slot.name is not None for slot in slots):
        log.warning("node %s (%s): %d widget values for %d widgets",
                    node["id"], node["type"], len(values), len(slots))
    # Surplus values (widgets added by a node's own JS extension) are ignored.
    inputs = {slot.name: value for slot, value in zip(slots, values, strict=False) if slot.name is not None}
    if node["type"] in AUDIO_UI_NODES:
        inputs[AUDIO_UI_WIDGET] = ""
    return inputs


def _widget_names(node_def: dict[str, Any]) -> list[str]:
    return [name for section in ("required", "optional")
            for name, spec in _ordered_inputs(node_def, section) if _is_widget_input(spec)]


# ---------------------------------------------------------------- links


def _parse_links(ui: dict[str, Any]) -> dict[int, Link]:
    """Links are `[id, origin_id, origin_slot, target_id, target_slot, type]` (schema 0.4) or dicts (1.0)."""
    links: dict[int, Link] = {}
    for raw in ui.get("links", []) or []:
        if isinstance(raw, dict):
            link_id, origin_id, origin_slot, link_type = (
                raw["id"], raw["origin_id"], raw["origin_slot"], raw.get("type", "*"))
        else:
            link_id, origin_id, origin_slot, _, _, link_type = raw
        links[int(link_id)] = Link(str(origin_id), int(origin_slot), str(link_type))
    return links


@dataclass
class _Graph:
    nodes: dict[str, dict[str, Any]]
    links: dict[int, Link]
    object_info: dict[str, Any]

    @staticmethod
    def is_virtual(node: dict[str, Any]) -> bool:
        return node["type"] in VIRTUAL_NODE_TYPES

    def resolve_input(self, node: dict[str, Any], slot: int, want_type: str,
                      seen: frozenset[tuple[str, int]] = frozenset()) -> list[Any] | None:
        """Follow the link into input `slot`; returns [origin_id, origin_slot] or None."""
        inputs = node.get("inputs") or []
        link_id = inputs[slot].get("link") if slot < len(inputs) else None
        if link_id is None:
            return None
        link = self.links.get(int(link_id))
        if link is None:
            raise UnsupportedWorkflowError(f"node {node['id']}: dangling link {link_id}")
        return self.resolve_output(link.origin_id, link.origin_slot, want_type, seen)

    def resolve_output(self, node_id: str, slot: int, want_type: str,
                       seen: frozenset[tuple[str, int]]) -> list[Any] | None:
        if (node_id, slot) in seen:
            raise UnsupportedWorkflowError(f"link cycle through node {node_id}")
        seen = seen | {(node_id, slot)}
        node = self.nodes.get(node_id)
        if node is None:
            raise UnsupportedWorkflowError(f"link from unknown node {node_id}")
        if node.get("mode") == MODE_BYPASS:
            index = _bypass_input_index(node, slot, want_type)
            return None if index < 0 else self.resolve_input(node, index, want_type, seen)
        if self.is_virtual(node):
            # Reroute passes its input through; PrimitiveNode has no inputs, so the
            # link vanishes and its value reaches the target via widgets (see _primitive_value).
            if node.get("inputs"):
                return self.resolve_input(node, slot, want_type, seen)
            return None
        # Muted nodes still resolve to themselves, as in the frontend: the server
        # then reports the missing node.
        return [node_id, slot]

    def primitive_value(self, link_id: int) -> tuple[bool, Any]:
        """(True, value) when `link_id` comes straight from a PrimitiveNode."""
        link = self.links.get(int(link_id))
        origin = self.nodes.get(link.origin_id) if link else None
        if origin is None or origin["type"] != "PrimitiveNode":
            return False, None
        values = origin.get("widgets_values") or [None]
        return True, values[0]


def _bypass_input_index(node: dict[str, Any], slot: int, want_type: str) -> int:
    """Which input a bypassed node forwards to output `slot` (frontend #getBypassSlotIndex, exact types only)."""
    inputs = node.get("inputs") or []
    if want_type in ("*", ""):
        return slot if len(inputs) > slot else 0
    outputs = node.get("outputs") or []
    output_type = outputs[slot].get("type") if slot < len(outputs) else None
    if slot < len(inputs) and inputs[slot].get("type") in (output_type, "*") \
            and inputs[slot].get("type") in (want_type, "*"):
        return slot
    return next((i for i, inp in enumerate(inputs) if inp.get("type") == want_type), -1)


# ---------------------------------------------------------------- conversion


def _check_supported(ui: dict[str, Any]) -> None:
    subgraphs = (ui.get("definitions") or {}).get("subgraphs") or []
    if subgraphs:
        raise UnsupportedWorkflowError("subgraphs are not supported")
    if (ui.get("extra") or {}).get("groupNodes"):
        raise UnsupportedWorkflowError("group nodes are not supported")


def _wrap(value: Any) -> Any:
    # The frontend wraps list values so the server does not read them as links.
    return {"__value__": value} if isinstance(value, list) else value


def _convert_node(node: dict[str, Any], graph: _Graph) -> dict[str, Any]:
    node_def = graph.object_info[node["type"]]
    inputs = {name: _wrap(value) for name, value in _widget_inputs(node, node_def).items()}
    for slot, ui_input in enumerate(node.get("inputs") or []):
        link_id = ui_input.get("link")
        if link_id is None:
            continue
        is_primitive, value = graph.primitive_value(link_id)
        if is_primitive:
            inputs[ui_input["name"]] = _wrap(value)
            continue
        resolved = graph.resolve_input(node, slot, ui_input.get("type", "*"))
        if resolved is not None:
            inputs[ui_input["name"]] = resolved
    return {
        "inputs": inputs,
        "class_type": node["type"],
        "_meta": {"title": node.get("title") or node_def.get("display_name") or node["type"]},
    }


def ui_to_api(ui_workflow: dict[str, Any], object_info: dict[str, Any]) -> ApiPrompt:
    """Convert a saved UI workflow to the prompt dict ``POST /prompt`` expects.

    ``object_info`` is the server's ``GET /object_info`` answer; it decides
    which nodes are real and how ``widgets_values`` map onto input names.
    """
    _check_supported(ui_workflow)
    nodes = {str(node["id"]): node for node in ui_workflow.get("nodes", [])}
    graph = _Graph(nodes, _parse_links(ui_workflow), object_info)
    prompt: ApiPrompt = {}
    for node_id, node in nodes.items():
        if graph.is_virtual(node) or node.get("mode") in (MODE_NEVER, MODE_BYPASS):
            continue
        if node["type"] not in object_info:
            # Fail here rather than send a prompt the server rejects less clearly.
            raise UnsupportedWorkflowError(
                f"node {node_id}: type {node['type']!r} is not in object_info (node pack not loaded?)")
        prompt[node_id] = _convert_node(node, graph)
    return prompt
