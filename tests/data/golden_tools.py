"""Shared plumbing of the golden generators ``tests/data/make_*_golden.py`` (run by hand, outside CI).

Each generator imports the **official** classes from a checkout of the official repository (``--official``;
nothing of it is copied into this repository), builds the weights and inputs its markdown describes
(reusing the recipes of ``tests/support`` and of the test modules), runs the official forward and writes
its golden files. They are first written to a staging folder, then moved to ``--out`` (default: this
folder, i.e. regenerate in place), except where ``--out`` already holds a file with the same content:
that file is left untouched (safetensors stores its metadata in a hash map, so two runs can differ in
the order of the header's metadata entries and nothing else). ``--check`` compares every new file with
the committed one of the same name in this folder and reports, per tensor, bit-identical or the max abs
difference; the exit status is 1 when anything differs.

Not a test module (no ``test_`` prefix): pytest does not collect it; ruff lints it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent
TESTS_DIR = DATA_DIR.parent
REPO_ROOT = TESTS_DIR.parent


def say(message: str) -> None:
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def parse_args(description: str, repo: str, commit: str, argv: list[str] | None = None, **extra) -> argparse.Namespace:
    """``--official`` (a checkout of ``repo`` at ``commit``), ``--out`` and ``--check``; ``extra``: more
    options as ``name=dict(kwargs of add_argument)``. The generator writes into ``args.stage`` (a
    temporary folder); :func:`finish` moves the files to ``args.out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--official", type=Path, required=True,
                        help=f"a checkout (or an export) of {repo} at commit {commit}")
    parser.add_argument("--out", type=Path, default=DATA_DIR,
                        help="folder the golden files go to (default: tests/data, i.e. regenerate in place)")
    parser.add_argument("--check", action="store_true",
                        help="compare the new files with the committed ones in tests/data; exit 1 if anything differs")
    for name, kwargs in extra.items():
        parser.add_argument(f"--{name.replace('_', '-')}", **kwargs)
    args = parser.parse_args(argv)
    args.official = args.official.resolve()
    if not args.official.is_dir():
        parser.error(f"--official {args.official}: not a folder")
    check_commit(args.official, commit)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.stage = Path(tempfile.mkdtemp(prefix="golden-"))
    return args


def check_commit(checkout: Path, commit: str) -> None:
    """Warn (not fail: an export made with `git archive` has no history) when the checkout is at another commit."""
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True)
    lines = done.stdout.split()
    if done.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != checkout.resolve():
        say(f"note: {checkout} is not a git checkout; make sure it is an export of commit {commit}")
    elif lines[1] != commit:
        say(f"WARNING: {checkout} is at {lines[1]}; the goldens were made at {commit}")


def use_tests_package() -> None:
    """Make ``support`` importable, which imports this repository as the package ``x2i``."""
    if str(TESTS_DIR) not in sys.path:
        sys.path.append(str(TESTS_DIR))
    import support  # noqa: F401


def load_test_module(relative: str):
    """A test module of ``tests/`` (e.g. ``"encoders/test_audioclip.py"``), for the recipes it defines,
    imported under a private name so that its folder's name cannot shadow an official package."""
    use_tests_package()
    path = TESTS_DIR / relative
    name = "_golden_recipe_" + path.stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def use_official(path: Path) -> None:
    """Put a folder of the official checkout first on ``sys.path``."""
    sys.path.insert(0, str(path))


def write_json(path: Path, data, indent: int | None = 1) -> None:
    path.write_text(json.dumps(data, indent=indent) + "\n")


# ---- comparison ------------------------------------------------------------------------------------


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def same_content(new: Path, old: Path) -> bool:
    """Same bytes, or the same parsed JSON / safetensors header (whatever its order) and tensor bytes."""
    if new.read_bytes() == old.read_bytes():
        return True
    if new.suffix == ".safetensors":
        return _safetensors_parts(new) == _safetensors_parts(old)
    if new.suffix == ".json":
        return json.loads(new.read_text()) == json.loads(old.read_text())
    return False


def _report_safetensors(new: Path, old: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(new), framework="pt") as a, safe_open(str(old), framework="pt") as b:
        new_keys, old_keys = set(a.keys()), set(b.keys())
        if new_keys != old_keys:
            say(f"  tensors only in the new file: {sorted(new_keys - old_keys)[:10]}")
            say(f"  tensors only in the committed file: {sorted(old_keys - new_keys)[:10]}")
        worst, worst_key, exact = 0.0, None, 0
        for key in sorted(new_keys & old_keys):
            x, y = a.get_tensor(key), b.get_tensor(key)
            if x.shape != y.shape or x.dtype != y.dtype:
                say(f"  {key}: {tuple(x.shape)} {x.dtype}, committed {tuple(y.shape)} {y.dtype}")
                continue
            if torch.equal(x, y):
                exact += 1
                continue
            diff = (x.double() - y.double()).abs().max().item()
            say(f"  {key}: max abs diff {diff:.3g} (max |committed| {y.double().abs().max().item():.3g})")
            if diff >= worst:
                worst, worst_key = diff, key
        say(f"  {exact}/{len(new_keys & old_keys)} tensors bit-identical" + (f"; worst {worst_key}: {worst:.3g}" if worst_key else ""))
        meta_new, meta_old = a.metadata() or {}, b.metadata() or {}
        for key in sorted(set(meta_new) | set(meta_old)):
            if meta_new.get(key) != meta_old.get(key):
                say(f"  metadata {key!r}: {meta_new.get(key)!r}, committed {meta_old.get(key)!r}")


def _report_json(new: Path, old: Path) -> None:
    def walk(x, y, where):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), key=str):
                if k not in x or k not in y:
                    say(f"  {where}{k}: only in the {'new' if k in x else 'committed'} file")
                else:
                    walk(x[k], y[k], f"{where}{k}.")
        elif x != y:
            say(f"  {where.rstrip('.')}: {str(x)[:120]}, committed {str(y)[:120]}")

    walk(json.loads(new.read_text()), json.loads(old.read_text()), "")


def compare_with_committed(paths: list[Path]) -> bool:
    """Report, per new file, how it compares with the committed file of the same name in tests/data."""
    all_same = True
    for new in paths:
        old = DATA_DIR / new.name
        if not old.exists():
            say(f"check {new.name}: no committed file to compare with")
            all_same = False
        elif new.read_bytes() == old.read_bytes():
            say(f"check {new.name}: byte-identical to the committed file")
        elif same_content(new, old):
            say(f"check {new.name}: same content as the committed file (bit-identical tensors and values; "
                "only the byte order of the header/text differs)")
        else:
            say(f"check {new.name}: DIFFERENT from the committed file")
            if new.suffix == ".safetensors":
                _report_safetensors(new, old)
            elif new.suffix == ".json":
                _report_json(new, old)
            all_same = False
    return all_same


def finish(args: argparse.Namespace, paths: list[Path]) -> None:
    """Compare (``--check``), then move the staged files to ``--out``, keeping files of the same content."""
    same = compare_with_committed(paths) if args.check else True
    for path in paths:
        target = args.out / path.name
        if target.exists() and same_content(path, target):
            say(f"{target}: same content, left untouched")
        else:
            shutil.move(str(path), target)
            say(f"{target}: written")
    shutil.rmtree(args.stage, ignore_errors=True)
    if not same:
        sys.exit(1)


def rerandomise(model: torch.nn.Module) -> None:
    """LayerNorm weight 1 + 0.2·N(0,1), bias 0.2·N(0,1); Linear biases += 0.1·N(0,1) (global RNG, module order)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
                module.bias.copy_(0.2 * torch.randn_like(module.bias))
            elif isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.add_(0.1 * torch.randn_like(module.bias))
