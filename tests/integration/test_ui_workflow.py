"""ui_to_api against the live server's node definitions (no sampling, so cheap)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from support.comfy_server import WORKFLOWS_DIR, ComfyServer
from support.ui_workflow import UnsupportedWorkflowError, ui_to_api

KSAMPLER_WIDGETS = [7, "randomize", 3, 6.5, "euler", "karras", 0.8]


@pytest.fixture(scope="module")
def object_info(comfy_server: ComfyServer) -> dict[str, Any]:
    return comfy_server.object_info()


def _node(node_id: int, type_: str, inputs: Sequence[tuple[str, str, int | None]] = (),
          widgets: list[Any] | None = None, mode: int = 0,
          outputs: Sequence[str] = ()) -> dict[str, Any]:
    """A UI node; inputs are (name, type, link id); a STRING/INT-typed input gets a widget marker."""
    ui_inputs = [{"name": name, "type": input_type, "link": link,
                  **({"widget": {"name": name}} if input_type in ("INT", "STRING") else {})}
                 for name, input_type, link in inputs]
    return {"id": node_id, "type": type_, "mode": mode, "inputs": ui_inputs,
            "outputs": [{"name": o, "type": o, "links": []} for o in outputs],
            "widgets_values": widgets if widgets is not None else []}


def _workflow(nodes: list[dict[str, Any]], links: list[list[Any]]) -> dict[str, Any]:
    return {"nodes": nodes, "links": links, "version": 0.4}


def test_reroute_primitive_bypass_and_mute(object_info: dict[str, Any]) -> None:
    ui = _workflow(
        nodes=[
            _node(1, "CheckpointLoaderSimple", widgets=["x.safetensors"],
                  outputs=["MODEL", "CLIP", "VAE"]),
            _node(2, "Reroute", [("", "*", 1)], outputs=["CLIP"]),
            _node(3, "CLIPTextEncode", [("clip", "CLIP", 2)], widgets=["hello"],
                  outputs=["CONDITIONING"]),
            _node(4, "EmptyLatentImage", widgets=[64, 64, 1], outputs=["LATENT"]),
            _node(5, "LatentUpscaleBy", [("samples", "LATENT", 3)],
                  widgets=["nearest-exact", 1.5], mode=4, outputs=["LATENT"]),
            _node(6, "PrimitiveNode", widgets=[1234, "fixed"], outputs=["INT"]),
            _node(7, "KSampler", [("model", "MODEL", 5), ("positive", "CONDITIONING", 6),
                                  ("negative", "CONDITIONING", 7), ("latent_image", "LATENT", 4),
                                  ("seed", "INT", 8)], widgets=KSAMPLER_WIDGETS),
            _node(8, "VAEDecode", [("samples", "LATENT", None), ("vae", "VAE", None)], mode=2),
            {"id": 9, "type": "Note", "mode": 0, "widgets_values": ["just a note"]},
        ],
        links=[[1, 1, 1, 2, 0, "*"], [2, 2, 0, 3, 0, "CLIP"], [3, 4, 0, 5, 0, "LATENT"],
               [4, 5, 0, 7, 3, "LATENT"], [5, 1, 0, 7, 0, "MODEL"], [6, 3, 0, 7, 1, "CONDITIONING"],
               [7, 3, 0, 7, 2, "CONDITIONING"], [8, 6, 0, 7, 4, "INT"]],
    )

    prompt = ui_to_api(ui, object_info)

    assert sorted(prompt, key=int) == ["1", "3", "4", "7"]  # reroute, bypass, primitive, mute, note gone
    assert prompt["3"]["inputs"] == {"text": "hello", "clip": ["1", 1]}  # through the Reroute
    assert prompt["7"]["inputs"] == {
        "seed": 1234,  # the PrimitiveNode's value, not the stale widget value 7
        "steps": 3, "cfg": 6.5, "sampler_name": "euler", "scheduler": "karras", "denoise": 0.8,
        "model": ["1", 0], "positive": ["3", 0], "negative": ["3", 0],
        "latent_image": ["4", 0],  # the bypassed upscale forwards its LATENT input
    }


def test_linked_widget_input_keeps_its_widget_slot(object_info: dict[str, Any]) -> None:
    ui = _workflow(
        nodes=[
            _node(1, "PrimitiveInt", widgets=[99, "fixed"], outputs=["INT"]),
            _node(2, "KSampler", [("seed", "INT", 1)], widgets=KSAMPLER_WIDGETS),
        ],
        links=[[1, 1, 0, 2, 0, "INT"]],
    )

    inputs = ui_to_api(ui, object_info)["2"]["inputs"]

    assert inputs["seed"] == ["1", 0]
    assert inputs["steps"] == 3 and inputs["denoise"] == 0.8


def test_core_audio_nodes_send_the_audio_players_empty_value(object_info: dict[str, Any]) -> None:
    """What frontend 1.27.10's graphToPrompt sends (test_frontend.py compares the two on the shipped workflows)."""
    ui = _workflow(nodes=[_node(1, "LoadAudio", widgets=["bark.wav", None, None], outputs=["AUDIO"])], links=[])

    assert ui_to_api(ui, object_info)["1"]["inputs"] == {"audio": "bark.wav", "audioUI": ""}


def test_unknown_node_type_is_an_error(object_info: dict[str, Any]) -> None:
    ui = _workflow(nodes=[_node(1, "NoSuchNodeAnywhere")], links=[])

    with pytest.raises(UnsupportedWorkflowError, match="NoSuchNodeAnywhere"):
        ui_to_api(ui, object_info)


@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS_DIR.glob("*.json")))
def test_every_shipped_workflow_converts_with_all_required_inputs(name: str, object_info: dict[str, Any]) -> None:
    ui = json.loads((WORKFLOWS_DIR / name).read_text(encoding="utf-8"))

    prompt = ui_to_api(ui, object_info)

    assert prompt, name
    for node_id, node in prompt.items():
        required = object_info[node["class_type"]]["input"].get("required", {})
        assert set(required) <= set(node["inputs"]), (name, node_id, set(required) - set(node["inputs"]))
        for value in node["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                assert value[0] in prompt, (name, node_id, value)
