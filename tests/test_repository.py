"""Packaging rules of a ComfyUI node pack, and the suite's own lint pass."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Development", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_commands():
    commands = _readme_commands()
    assert commands == ["python -m pip install -r requirements-test.txt", "python -m pytest"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    positions = [ci.index(command) for command in commands]
    assert positions == sorted(positions)


def test_ci_runs_the_node_and_workflow_tests_against_the_shared_comfyui():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'COMFYUI="$(cd .. && pwd)/shared/comfyui"' in ci
    install = ci.index('python -m pip install -r "$COMFYUI/requirements.txt"')
    assert install < ci.index('export COMFYUI_PATH="$COMFYUI"') < ci.index("python -m pytest")
    assert ci.index("python -m pip install -r requirements-test.txt") < install  # torch pinned before ComfyUI's "torch"


def test_runtime_requirements_do_not_pin_torch_but_tests_do():
    runtime = (ROOT / "requirements.txt").read_text().splitlines()
    assert not [line for line in runtime if re.match(r"\s*(torch|torchaudio|torchvision)\b", line)]
    test = (ROOT / "requirements-test.txt").read_text()
    for pin in ("torch==2.11.0", "torchaudio==2.11.0", "torchvision==0.26.0", "-r requirements-train.txt"):
        assert pin in test
    assert "-r requirements.txt" in (ROOT / "requirements-train.txt").read_text()


def test_pyproject_follows_registry_rules():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    name = project["project"]["name"]
    assert "comfyui" not in name.lower() and name[0].isalpha()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["project"]["version"])
    assert {"PublisherId", "DisplayName", "Icon"} <= set(project["tool"]["comfy"])
    def names(lines):
        return {re.split(r"[<>=!~ ;]", line)[0] for line in lines if line and not line.startswith(("#", "-r"))}

    assert names((ROOT / "requirements.txt").read_text().splitlines()) == names(project["project"]["dependencies"])
    train = names((ROOT / "requirements-train.txt").read_text().splitlines())
    assert train == names(project["project"]["optional-dependencies"]["train"])
    assert not [line for line in (ROOT / "requirements-train.txt").read_text().splitlines() if re.match(r"\s*torch", line)]


def test_model_code_imports_without_comfyui():
    code = (
        "import sys; sys.path.insert(0, 'tests'); import support; import x2i.gluenet, x2i.encoders, x2i.bridge, x2i.weights, x2i.training.cli, x2i.uvit, x2i.uvit.convert, x2i.uvit.block_conditioning; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_node_ids_in_shipped_workflows_exist():
    declared = set(re.findall(r'node_id="(X2I\w+)"', "".join(p.read_text() for p in (ROOT / "nodes").glob("*.py"))))
    for workflow in (ROOT / "workflows").glob("*.json"):
        types = {node["type"] for node in json.loads(workflow.read_text(encoding="utf-8"))["nodes"]}
        x2i = {t for t in types if t.startswith("X2I")}
        assert x2i and x2i <= declared, (workflow.name, x2i - declared)


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: python -m pip install -r requirements-test.txt")
    result = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
