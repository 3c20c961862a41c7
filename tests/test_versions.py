"""The supported Python, torch and transformers: declared in one place each, checked when ComfyUI loads the pack,
stated in the README, and tested at the floor by CI's compatibility run (.ci/compat)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import x2i

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: tomli, which requirements-train.txt installs there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _loaded_by_comfyui(torch_version: str, transformers_version: str) -> subprocess.CompletedProcess:
    """What ComfyUI's loader does, with these versions imported: `comfy`, torch and transformers are imported,
    then the pack's __init__.py runs (fake modules, so no real torch is replaced)."""
    code = (
        "import sys, types\n"
        "def fake(name, version):\n"
        "    module = types.ModuleType(name); module.__version__ = version; sys.modules[name] = module\n"
        "fake('comfy', ''); fake('comfyui_version', '0.3.64')\n"
        f"fake('torch', {torch_version!r}); fake('transformers', {transformers_version!r})\n"
        "sys.path.insert(0, 'tests'); import support\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


def test_an_older_torch_gets_one_clear_message_when_comfyui_loads_the_pack():
    done = _loaded_by_comfyui("2.5.1+cu124", "5.23.0")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "ImportError: ComfyUI-X2I needs torch 2.6 or newer, but this Python has torch 2.5.1+cu124; torch is "
        "ComfyUI's own, so update it the way ComfyUI was installed: the desktop app's or the portable build's "
        "updater, or pip install --upgrade torch torchvision torchaudio --index-url "
        "https://download.pytorch.org/whl/<your build, e.g. cu128> in the Python that runs ComfyUI. Then restart ComfyUI."
    )


def test_an_older_transformers_gets_one_clear_message_when_comfyui_loads_the_pack():
    done = _loaded_by_comfyui("2.11.0+cu130", "4.46.3")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "ImportError: ComfyUI-X2I needs transformers 4.57.3 or newer, but this Python has transformers 4.46.3; run "
        'pip install --upgrade "transformers>=4.57.3" in the Python that runs ComfyUI. Then restart ComfyUI.'
    )


def test_both_too_old_are_named_in_the_one_message():
    done = _loaded_by_comfyui("2.4.0", "4.45.2")
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ComfyUI-X2I needs torch 2.6 or newer, but this Python has torch 2.4.0;")
    assert "; and transformers 4.57.3 or newer, but this Python has transformers 4.45.2;" in last


@pytest.mark.parametrize(("torch_version", "transformers_version"), [
    ("2.6.0", "4.57.3"), ("2.6.0+cu124", "4.57.6"), ("2.11.0+cu130", "5.23.0"), ("2.10.0", "5.0.0"),
    ("2.9.1+rocm7.2.1", "4.57.3"),  # ComfyUI desktop for Windows AMD
])
def test_the_supported_versions_load(torch_version, transformers_version):
    done = _loaded_by_comfyui(torch_version, transformers_version)
    assert done.returncode == 0, done.stderr
    x2i.check_dependency_versions(torch_version, transformers_version)


def test_the_pack_without_comfyui_checks_nothing_at_import():
    # The trainer's command line and the tests import the pack without ComfyUI; the model code reports an old
    # torch itself where it matters (weights.read_torch_checkpoint, for pickled checkpoints).
    code = (
        "import sys, types; t = types.ModuleType('torch'); t.__version__ = '2.4.0'; sys.modules['torch'] = t; "
        "sys.path.insert(0, 'tests'); import support"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)


def test_this_environment_is_supported():
    x2i.check_dependency_versions()


def _requirement(lines: list[str], name: str) -> str:
    found = [re.split(r"\s+#", line)[0].strip() for line in lines if re.match(rf"{name}\s*[<>=!~]", line)]
    assert len(found) == 1, (name, found)
    return found[0]


def test_the_floors_are_declared_where_installers_read_them():
    floor = f"transformers>={x2i.MINIMUM_TRANSFORMERS}"
    assert _requirement((ROOT / "requirements.txt").read_text().splitlines(), "transformers") == floor
    assert _requirement(PYPROJECT["project"]["dependencies"], "transformers") == floor
    compat = (ROOT / "requirements-compat.txt").read_text().splitlines()
    assert _requirement(compat, "transformers") == f"transformers=={x2i.MINIMUM_TRANSFORMERS}"  # CI tests the floor itself
    assert PYPROJECT["project"]["requires-python"] == ">=3.10"
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py310"
    # torch is the user's: never a requirement of the pack, but a floor the load-time check holds.
    assert "torch" not in (ROOT / "requirements.txt").read_text().split("#")[0]
    assert x2i.MINIMUM_TORCH == "2.6"


def test_the_trainer_floor_is_declared_separately():
    train = (ROOT / "requirements-train.txt").read_text().splitlines()
    assert _requirement(train, "transformers") == "transformers>=5"
    assert "transformers>=5" in PYPROJECT["project"]["optional-dependencies"]["train"]


def test_the_readme_states_the_supported_ranges():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    for stated in ("Python 3.10", "3.13", f"torch {x2i.MINIMUM_TORCH}", f"transformers {x2i.MINIMUM_TRANSFORMERS}",
                   "transformers 5", "ComfyUI 0.3.64"):
        assert stated in install, stated
