"""The shipped workflows in ComfyUI's real web frontend (the comfyui-frontend-package the server serves),
driven in headless Chromium by playwright-core (tests/integration/frontend/drive.mjs).

Every ``workflows/*.json`` opens with no missing node and no error shown; the frontend's own
``app.graphToPrompt()`` gives exactly the API prompt ``support.ui_workflow.ui_to_api`` makes from the file,
which is what the other integration tests sample, so those runs stand for the frontend's; and one workflow
per family, shrunk in the frontend's widgets and queued by its Queue command, makes its image.

Needs Chromium (``/usr/bin/chromium`` or ``$X2I_CHROMIUM``), Node.js and ``npm ci`` run in
tests/integration/frontend; ``.ci/run`` installs them and sets ``X2I_REQUIRE_FRONTEND=1``, which turns a
missing browser into a failure instead of a skip. ``X2I_SCREENSHOTS=<folder>`` also saves each workflow as the
frontend shows it (the README's pictures come from ``X2I_SCREENSHOTS=docs/images``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from support.comfy_server import PACK_NAME, WORKFLOWS_DIR, ComfyServer
from support.ui_workflow import ui_to_api
from support.workflow_models import shrunk_size

DRIVER_DIR = Path(__file__).resolve().parent / "frontend"
DRIVER = DRIVER_DIR / "drive.mjs"
DRIVER_TIMEOUT_S = 600
WORKFLOWS = sorted(p.name for p in WORKFLOWS_DIR.glob("*.json"))
# One per family (GlueGen text and multimodal, GlueGen on SDXL, LaVi-Bridge on SD and PixArt, U-ViT, block
# conditioning): the other runs sample ui_to_api's prompts, which the graphToPrompt test proves equal to the frontend's.
QUEUED = ["gluegen_multilingual.json", "gluegen_sound_text_mix.json", "gluegen_multilingual_sdxl.json",
          "lavibridge_t5_pixart.json", "lavibridge_t5_sd15.json", "uvit_text_to_image.json", "block_conditioning_sd15.json"]
QUEUED_STEPS = 2
# The shipped T5 workflow with its GlueNet loader renamed to a type no pack registers: proves the driver
# sees what the frontend shows for a missing node, so an empty report above means something.
BROKEN = "broken_copy_of_gluegen_t5_english.json"
UNKNOWN_TYPE = "X2INoSuchNode"


def _browser() -> tuple[str, str] | None:
    chromium = os.environ.get("X2I_CHROMIUM", "/usr/bin/chromium")
    node = shutil.which("node")
    if not (Path(chromium).is_file() and node and (DRIVER_DIR / "node_modules" / "playwright-core").is_dir()):
        return None
    return chromium, node


def _require_browser() -> tuple[str, str]:
    found = _browser()
    if found:
        return found
    reason = ("the frontend tests need Chromium (apt-get install chromium, or X2I_CHROMIUM), Node.js and "
              "`npm ci --prefix tests/integration/frontend`")
    if os.environ.get("X2I_REQUIRE_FRONTEND") == "1":
        pytest.fail(f"X2I_REQUIRE_FRONTEND=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _graph(name: str) -> dict[str, Any]:
    if name == BROKEN:
        graph = _graph("gluegen_t5_english.json")
        next(node for node in graph["nodes"] if node["type"] == "X2IGlueNetLoader")["type"] = UNKNOWN_TYPE
        return graph
    return json.loads((WORKFLOWS_DIR / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def frontend(gluegen_models, multimodal_models, multimodal_inputs, sdxl_bridge_models, lavibridge_models, pixart_models, uvit_models,
             comfy_server: ComfyServer) -> dict[str, Any]:
    """One browser session over every shipped workflow (with all the models they name in place): the
    driver's report (see drive.mjs)."""
    chromium, node = _require_browser()
    plan = {
        "url": comfy_server.url, "chromium": chromium,
        "workflows": [{"name": name, "graph": _graph(name)} for name in [*WORKFLOWS, BROKEN]],
        "screenshots": str(Path(os.environ["X2I_SCREENSHOTS"]).resolve()) if os.environ.get("X2I_SCREENSHOTS") else None,
        "queue": [{"name": name, "graph": _graph(name), "size": shrunk_size(name), "steps": QUEUED_STEPS} for name in QUEUED],
    }
    result = subprocess.run([node, str(DRIVER)], input=json.dumps(plan), capture_output=True, text=True,
                            cwd=DRIVER_DIR, timeout=DRIVER_TIMEOUT_S, check=False)
    if result.returncode != 0:
        pytest.fail(f"the frontend driver failed:\n{result.stderr[-6000:]}\n--- server log ---\n{comfy_server.log_tail()}",
                    pytrace=False)
    report = json.loads(result.stdout)
    assert report["startup"] == [], f"the frontend showed errors before any workflow was opened: {report['startup']}"
    return report


def _class_and_inputs(prompt: dict[str, Any]) -> dict[str, Any]:
    # graphToPrompt adds each node's title under _meta, which the server ignores.
    return {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in prompt.items()}


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_opens_with_no_missing_node_or_error(name: str, frontend: dict[str, Any]) -> None:
    opened = frontend["opened"][name]
    assert opened["missing"] == [], f"{name}: the frontend reports missing nodes {opened['missing']}"
    assert opened["messages"] == [], f"{name}: the frontend showed {opened['messages']}"


def test_a_missing_node_is_seen_as_the_user_sees_it(frontend: dict[str, Any]) -> None:
    opened = frontend["opened"][BROKEN]

    assert opened["missing"] == [UNKNOWN_TYPE]
    assert any(UNKNOWN_TYPE in message for message in opened["messages"]), opened["messages"]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_frontend_prompt_equals_the_converters(name: str, frontend: dict[str, Any], comfy_server: ComfyServer) -> None:
    expected = ui_to_api(_graph(name), comfy_server.object_info())

    assert _class_and_inputs(frontend["opened"][name]["prompt"]) == _class_and_inputs(expected)


@pytest.mark.parametrize("name", QUEUED)
def test_a_run_queued_in_the_frontend_makes_its_image(name: str, frontend: dict[str, Any], comfy_server: ComfyServer) -> None:
    queued = frontend["queued"][name]
    assert queued["missing"] == [] and queued["messages"] == [], queued
    assert queued["status"] == 200, queued["body"]

    entry = comfy_server.wait(queued["body"]["prompt_id"], timeout=DRIVER_TIMEOUT_S)

    assert entry["status"]["status_str"] == "success", entry["status"]
    images = comfy_server.output_files(entry)
    assert images, entry["outputs"]
    size = shrunk_size(name)
    for image in images:
        with Image.open(image) as opened:
            assert opened.size == (size, size), (name, image.name, opened.size)
    prompt = entry["prompt"][2]
    sampler_steps = [node["inputs"]["steps"] for node in prompt.values() if node["class_type"] == "KSampler"]
    assert sampler_steps and set(sampler_steps) == {QUEUED_STEPS}, sampler_steps


def test_the_server_serves_each_nodes_help_page_where_the_frontend_looks(comfy_server: ComfyServer) -> None:
    """fetchCustomNodeHelp asks /extensions/<pack folder>/docs/<NodeId>/<locale>.md, then <NodeId>.md."""
    docs = Path(__file__).resolve().parents[2] / "web" / "docs"
    node_ids = [page.stem for page in docs.glob("*.md")]
    assert len(node_ids) == 15
    for node_id in node_ids:
        status, english = comfy_server._request("GET", f"/extensions/{PACK_NAME}/docs/{node_id}.md")
        assert (status, english) == (200, (docs / f"{node_id}.md").read_text(encoding="utf-8")), node_id
        status, chinese = comfy_server._request("GET", f"/extensions/{PACK_NAME}/docs/{node_id}/zh.md")
        assert (status, chinese) == (200, (docs / node_id / "zh.md").read_text(encoding="utf-8")), node_id
