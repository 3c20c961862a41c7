"""GlueGen nodes: GlueNet files in, CONDITIONING for the GlueNet's model family (SD1.x or SDXL) out."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.v0_0_2 import io

from ..encoders import HFTextEncoder
from ..errors import X2IError
from ..gluenet import GlueNetFileError, GlueNetRouter, load_gluenet, probe_gluenet_file
from ..gluenet.checkpoint import LANGUAGE_NAMES
from ..paths import disk_state
from .common import (
    CATEGORY,
    CONDITIONING_OUTPUT_TOOLTIP,
    ENCODER_INPUT_TOOLTIP,
    GLUENET_FOLDER,
    GLUENET_INPUT_TOOLTIP,
    GLUENET_OUTPUT_TOOLTIP,
    GlueNetType,
    LoadedGlueNet,
    X2IEncoder,
    X2INode,
    encoder_patcher,
    encoder_with,
    translate_to_conditioning,
)

logger = logging.getLogger(__name__)

LANGUAGE_CODES = sorted(set(LANGUAGE_NAMES.values()))
FROM_FILE = "from file"
ROUTER_SLOTS = 5


class X2IGlueNetLoader(X2INode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="X2IGlueNetLoader",
            display_name="X2I GlueNet Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads a GlueNet translator from models/gluenet: a released GlueGen .ckpt or a "
            ".safetensors trained or converted with this pack.",
            inputs=[
                io.Combo.Input("gluenet_name", options=folder_paths.get_filename_list(GLUENET_FOLDER),
                               tooltip="A released GlueGen .ckpt or this pack's .safetensors in models/gluenet."),
                io.Combo.Input(
                    "language",
                    options=[FROM_FILE, *LANGUAGE_CODES],
                    default=FROM_FILE,
                    tooltip="Language this GlueNet was trained for, used by the GlueNet Router. 'from file' reads it "
                    "from the file name (gluenet_French_...) or its metadata.",
                ),
            ],
            outputs=[GlueNetType.Output(display_name="gluenet", tooltip=GLUENET_OUTPUT_TOOLTIP)],
        )

    @classmethod
    def check_inputs(cls, gluenet_name: str, **_) -> str | None:
        path = folder_paths.get_full_path(GLUENET_FOLDER, gluenet_name)
        if path is None:
            return f"GlueNet file '{gluenet_name}' not found in models/{GLUENET_FOLDER}"
        if path.lower().endswith(".safetensors"):
            try:
                probe_gluenet_file(path)
            except GlueNetFileError as exc:
                return str(exc)
        return None

    @classmethod
    def fingerprint_inputs(cls, gluenet_name: str, **_) -> tuple | None:
        return disk_state(folder_paths.get_full_path(GLUENET_FOLDER, gluenet_name))

    @classmethod
    def execute(cls, gluenet_name: str, language: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(GLUENET_FOLDER, gluenet_name)
        model = load_gluenet(path)
        tag = model.config.language if language == FROM_FILE else language
        return io.NodeOutput(LoadedGlueNet(encoder_patcher(model), os.path.basename(path), tag))


class X2IGlueNetRouter(X2INode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="X2IGlueNetRouter",
            display_name="X2I GlueNet Router (language)",
            category=f"{CATEGORY}/gluegen",
            description="Holds GlueNets for several languages and picks the one matching each prompt, with an "
            "offline language detector; or always the language you choose.",
            inputs=[
                *(GlueNetType.Input(f"gluenet_{i}", optional=True, tooltip="A GlueNet Loader for one language.")
                  for i in range(1, ROUTER_SLOTS + 1)),
                io.Combo.Input(
                    "language",
                    options=["auto", *LANGUAGE_CODES],
                    default="auto",
                    tooltip="auto: detect each prompt's language among the connected GlueNets.",
                ),
            ],
            outputs=[GlueNetType.Output(display_name="gluenet", tooltip=GLUENET_OUTPUT_TOOLTIP)],
        )

    @classmethod
    def execute(cls, language: str, **slots: LoadedGlueNet | None) -> io.NodeOutput:
        entries: dict[str, LoadedGlueNet] = {}
        for slot in sorted(slots):
            loaded = slots[slot]
            if loaded is None:
                continue
            if loaded.language is None:
                raise X2IError(
                    f"GlueNet '{loaded.name}' ({slot}) has no language: set 'language' on its X2I GlueNet Loader"
                )
            if loaded.language in entries:
                raise X2IError(
                    f"two GlueNets for '{loaded.language}' ({entries[loaded.language].name} and {loaded.name}): "
                    "connect one per language"
                )
            entries[loaded.language] = loaded
        families = {loaded.name: loaded.patcher.model.config.family.name for loaded in entries.values()}
        if len(set(families.values())) > 1:
            listed = ", ".join(f"{name} ({name_of_family})" for name, name_of_family in families.items())
            raise X2IError(f"the GlueNet Router's GlueNets are for different model families: {listed}; connect GlueNets "
                           "made for the model you sample with")
        return io.NodeOutput(GlueNetRouter(entries, language=language))


class X2IGlueGenTextEncode(X2INode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="X2IGlueGenTextEncode",
            display_name="X2I GlueGen Text Encode",
            category=f"{CATEGORY}/gluegen",
            description="Encodes a prompt with the X2I text encoder and translates it through a GlueNet into "
            "conditioning for the GlueNet's model family: SD1.x, or SDXL with its pooled vector (official recipe: "
            "GlueNet(features / 3) x tensor_norm / 2). An empty prompt is the unconditional.",
            inputs=[
                X2IEncoder.Input("encoder", tooltip=ENCODER_INPUT_TOOLTIP),
                GlueNetType.Input("gluenet", tooltip=GLUENET_INPUT_TOOLTIP),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="Prompt in the GlueNet's language."),
            ],
            outputs=[io.Conditioning.Output(tooltip=CONDITIONING_OUTPUT_TOOLTIP)],
        )

    @classmethod
    def execute(cls, encoder, gluenet: LoadedGlueNet | GlueNetRouter, text: str) -> io.NodeOutput:
        text_encoder: HFTextEncoder = encoder_with(encoder, "encode", "X2I Text Encoder Loader")
        if isinstance(gluenet, GlueNetRouter):
            route = gluenet.route(text)
            logger.info("GlueNet router: '%s' via %s for %.40r", route.language, route.reason, text)
            gluenet = route.target
        translator = gluenet.patcher.model
        translator.check_source(
            text_encoder.max_length, text_encoder.hidden_size, f"text encoder '{text_encoder.name}'"
        )
        return io.NodeOutput(translate_to_conditioning(encoder, gluenet, lambda: text_encoder.encode([text])))
