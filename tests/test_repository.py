"""Packaging rules of a ComfyUI node pack, and the suite's own lint pass."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: tomli, which requirements-train.txt installs there
    import tomli as tomllib

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


def test_ci_opens_the_workflows_in_the_real_frontend():
    ci = (ROOT / ".ci" / "run").read_text()
    pytest_at = ci.index("python -m pytest")
    assert ci.index("apt-get install -y -qq chromium") < pytest_at
    assert ci.index("npm ci --prefix tests/integration/frontend") < pytest_at
    assert ci.index("export X2I_REQUIRE_FRONTEND=1") < pytest_at  # a missing browser fails, never skips


def test_ci_runs_the_compatibility_slice_after_the_main_suite():
    """The oldest supported transformers in a venv of its own (keeping torch), and Python 3.10 and 3.13."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci.index(".ci/compat") > ci.index("python -m pytest")
    compat = (ROOT / ".ci" / "compat").read_text()
    assert "python -m venv --system-site-packages" in compat  # torch and ComfyUI's requirements stay the main run's
    assert '-m pip install -q -r requirements-compat.txt' in compat
    assert "for minor in 3.10 3.13; do" in compat and ".ci/python_versions.py" in compat
    slice_ = compat[compat.index("-m pytest"):]
    for folder in ("tests/gluenet", "tests/encoders", "tests/bridge", "tests/uvit", "tests/nodes", "tests/test_weights.py"):
        assert folder in slice_
    assert "tests/training" not in slice_ and "tests/integration" not in slice_  # the trainer is supported on transformers 5 only
    assert "/.compat/" in (ROOT / ".gitignore").read_text().splitlines()  # the venv stays out of git and ruff


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
        "import sys; sys.path.insert(0, 'tests'); import support; import x2i.gluenet, x2i.encoders, x2i.bridge, x2i.weights, x2i.training.cli, x2i.uvit, x2i.uvit.convert, x2i.block_conditioning, x2i.errors, x2i.paths; "
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


def test_registry_metadata_and_the_load_time_version_check_agree():
    import x2i

    comfy = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["comfy"]
    assert comfy["requires-comfyui"] == f">={x2i.MINIMUM_COMFYUI}"
    assert comfy["Icon"].endswith("/docs/icon.png") and (ROOT / "docs" / "icon.png").is_file()
    x2i.check_comfyui_version(x2i.MINIMUM_COMFYUI)
    x2i.check_comfyui_version("0.4.0")
    with pytest.raises(ImportError, match=r"needs ComfyUI 0\.3\.64 or newer, but this is ComfyUI 0\.3\.9: .* Update ComfyUI"):
        x2i.check_comfyui_version("0.3.9")


def test_an_older_comfyui_gets_one_clear_message_when_it_loads_the_pack():
    # What ComfyUI's loader does: `comfy` is imported, then the pack's __init__.py runs.
    code = (
        "import sys, types; sys.modules['comfy'] = types.ModuleType('comfy'); "
        "version = types.ModuleType('comfyui_version'); version.__version__ = '0.3.40'; sys.modules['comfyui_version'] = version; "
        "sys.path.insert(0, 'tests'); import support"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "ImportError: ComfyUI-X2I needs ComfyUI 0.3.64 or newer, but this is ComfyUI 0.3.40: its node API lacks what "
        "the pack's nodes use. Update ComfyUI (git pull, ComfyUI-Manager's 'Update ComfyUI', or the desktop app's "
        "updater), then restart."
    )


def test_the_registry_archive_holds_what_users_run_and_no_tests():
    """The files `comfy node pack` puts in the archive: git-tracked, minus .comfyignore (comfy-cli's matcher)."""
    from pathspec import PathSpec

    patterns = [line.strip() for line in (ROOT / ".comfyignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    with warnings.catch_warnings():  # pathspec 1 deprecates the "gitwildmatch" that comfy-cli still packs with
        warnings.simplefilter("ignore", DeprecationWarning)
        ignored = PathSpec.from_lines("gitwildmatch", patterns)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    tracked = [path for path in tracked if (ROOT / path).is_file()]  # comfy-cli skips what the work tree lacks
    packed = [path for path in tracked if not ignored.match_file(path)]

    assert not [path for path in packed if path.startswith(("tests/", "bench/", ".ci/"))]
    runtime = [path for path in tracked if path.endswith(".py") and not path.startswith(("tests/", "bench/", ".ci/"))]
    assert set(runtime) <= set(packed)
    shipped = {path for path in tracked if path.startswith(("workflows/", "locales/", "docs/", "web/"))}
    assert {path for path in shipped if not path.startswith("docs/images/")} <= set(packed)  # README pictures stay out
    assert {"requirements.txt", "requirements-train.txt", "LICENSE", "README.md", "pyproject.toml"} <= set(packed)
    assert sum((ROOT / path).stat().st_size for path in packed) < 2_000_000


def test_nodes_use_a_versioned_node_api():
    """comfy_api.latest changes without notice; a versioned module keeps its meaning across ComfyUI updates."""
    sources = {path: path.read_text(encoding="utf-8") for path in [ROOT / "__init__.py", *(ROOT / "nodes").glob("*.py")]}
    assert not [path for path, text in sources.items() if re.search(r"^\s*(from|import) comfy_api\.latest", text, re.M)]
    using_the_api = [text for text in sources.values() if "comfy_api" in text]
    assert using_the_api and all("from comfy_api.v0_0_2 import" in text for text in using_the_api)


def test_test_modules_have_unique_names():
    """pytest imports test modules by basename (no __init__.py in tests/): two equal names stop collection."""
    names = [path.name for path in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({name for name in names if names.count(name) > 1}) == []
