"""The example configs shipped in training/examples/ resolve through the CLI (every section and key
known, values well typed) — a newcomer's first command must not fail on the example itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "training" / "examples").glob("*.toml"))


def test_there_is_an_example_for_every_kind():
    assert {path.name.split("_")[0] for path in EXAMPLES} == {"gluenet", "bridge", "uvit"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_resolves(path: Path):
    kind = path.name.split("_")[0]
    child = subprocess.run([sys.executable, str(ROOT), "train", kind, "--config", str(path), "--print-config"],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    resolved = json.loads(child.stdout)
    assert resolved["run"]["output_dir"].startswith("runs/")
