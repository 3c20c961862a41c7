"""ComfyUI-X2I: new condition encoders (other languages, T5, sound, point clouds, LLMs) for the
diffusion models you already have, through GlueGen's GlueNets, LaVi-Bridge and intermediate fusion.

Only this module and ``nodes/`` know about ComfyUI; the model code imports and runs without it.
"""


async def comfy_entrypoint():
    # Imported lazily so that the model packages stay importable without ComfyUI.
    from .nodes import X2IExtension

    return X2IExtension()
