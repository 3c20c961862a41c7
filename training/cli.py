"""`train` subcommand: python path/to/ComfyUI-X2I train <kind> --config FILE [--set section.key=value …]."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from ..errors import X2IError
from .config import ConfigError, load_config, section
from .loop import train
from .settings import RunSettings, apply_run_defaults
from .task import TrainingTask

# kind -> (module, class): imported on demand so `train gluenet` never imports diffusers.
TASKS: dict[str, tuple[str, str]] = {
    "gluenet": (".gluenet_task", "GlueNetTask"),
    "bridge": (".bridge_task", "BridgeTask"),
    "uvit": (".uvit_task", "UViTTask"),
}

DESCRIPTION = """\
Train a model that this pack's ComfyUI nodes load.

  gluenet   a GlueNet: translates a new encoder's features (multilingual/T5 text, AudioCLIP/CLAP sound,
            ULIP point clouds) into Stable Diffusion's CLIP text space (GlueGen)
  bridge    a LaVi-Bridge: adapter + LoRA joining a language model (T5, Llama) to an SD1.x U-Net or PixArt
  uvit      an intermediate-fusion U-ViT text-to-image model (CLIP ViT-L/14 text, SD's KL-f8 latents)

Settings come from a TOML or JSON file of sections ([run], [data], [model] …) and --set overrides.
`train <kind> --help` lists every setting of that kind with its default.

Examples:
  python ComfyUI-X2I train gluenet --config fr.toml --dry-run          # check the data, print counts
  python ComfyUI-X2I train gluenet --config fr.toml --set run.batch_size=64
  torchrun --nproc_per_node 4 ComfyUI-X2I train bridge --config t5_sd15.toml
An interrupted run (Ctrl+C, SIGTERM, a crash) continues from its last checkpoint with the same command.
"""


def task_class(kind: str) -> type[TrainingTask]:
    module_name, class_name = TASKS[kind]
    return getattr(importlib.import_module(module_name, __package__), class_name)


def _default_text(spec: dataclasses.Field) -> str:
    if spec.default is not dataclasses.MISSING:
        return json.dumps(spec.default) if spec.default is not None else "(none)"
    if spec.default_factory is not dataclasses.MISSING:
        return json.dumps(spec.default_factory())
    return "(required)"


def describe_sections(sections: dict[str, type], run_defaults: dict[str, Any]) -> str:
    """Every setting of a kind: section, key, default and what it does (from the fields' metadata)."""
    lines = []
    for name, cls in {"run": RunSettings, **sections}.items():
        lines.append(f"[{name}]")
        if cls.__doc__:
            lines.append(textwrap.indent(textwrap.fill(" ".join(cls.__doc__.split()), 96), "  # "))
        for spec in dataclasses.fields(cls):
            if not spec.init:
                continue
            default = json.dumps(run_defaults[spec.name]) if name == "run" and spec.name in run_defaults else _default_text(spec)
            help_text = spec.metadata.get("help", "")
            lines.append(f"  {spec.name} = {default}" + (f"    # {help_text}" if help_text else ""))
        lines.append("")
    return "\n".join(lines)


def _parser(kind: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python ComfyUI-X2I train {kind}" if kind else "python ComfyUI-X2I train",
        description=DESCRIPTION if kind is None else f"Train a {kind} (settings below; --set overrides the file).",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if kind is None:
        parser.add_argument("kind", choices=sorted(TASKS), help="what to train")
        return parser
    parser.add_argument("--config", help="TOML or JSON file of settings (sections as listed below)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set run.batch_size=64 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="check the data and print counts; train nothing")
    parser.add_argument("--resume", default="auto", metavar="auto|never|CHECKPOINT",
                        help="auto (default): continue from the newest checkpoint in run.output_dir if there is one; "
                             "never: refuse to touch a folder that holds one; or a checkpoint file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    return parser


def error_line(exc: BaseException) -> str:
    """The message of a refused run on one line. An error raised in a DataLoader worker (a cache shard
    found broken while training) reaches the main process with the worker's whole traceback in its
    message; its last line is the original message."""
    text = str(exc)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split("\n"))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        _parser().parse_args(argv or ["--help"])
        return 2
    kind = argv[0]
    if kind not in TASKS:
        _parser().parse_args(argv[:1])  # exits with argparse's "invalid choice" message
    cls = task_class(kind)
    sections = dict(cls.SECTIONS)
    args = _parser(kind, describe_sections(sections, cls.run_defaults({}))).parse_args(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        raw = load_config(args.config, args.overrides)
        unknown = sorted(set(raw) - {"run", *sections})
        if unknown:
            raise ConfigError(f"unknown section(s) {', '.join(f'[{u}]' for u in unknown)}; {kind} reads "
                              + ", ".join(f"[{s}]" for s in ("run", *sections)))
        raw["run"] = apply_run_defaults(raw.get("run", {}), cls.run_defaults(raw))
        settings = section(raw, "run", RunSettings)
        task = cls.from_config(raw)
        if args.print_config:
            sys.stdout.write(json.dumps({"run": dataclasses.asdict(settings), **task.config()}, indent=2) + "\n")
            return 0
        result = train(task, settings, resume=args.resume, dry_run=args.dry_run)
    except X2IError as exc:  # everything the pack reports to a user; anything else is a bug and keeps its traceback
        sys.stderr.write(f"error: {error_line(exc)}\n")
        return 2
    if result.dry_run is not None:
        sys.stdout.write(json.dumps(result.dry_run, indent=2, default=str) + "\n")
        return 0
    state = "interrupted" if result.interrupted else "finished"
    sys.stdout.write(f"{state} at step {result.step}; wrote {', '.join(map(str, result.exported)) or 'nothing'}\n")
    return 130 if result.interrupted else 0
