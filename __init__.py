"""ComfyUI entry point of the SVDQuant node pack: registers the nodes, nothing else.

The nodes use ComfyUI's V3 schema (comfy_api.latest), so ComfyUI calls `comfy_entrypoint`. This
module must not define NODE_CLASS_MAPPINGS: ComfyUI loads a module that has them the old way and
silently ignores the entry point. The nodes are imported inside the entry point, so importing the
pack outside ComfyUI (the engine on its own, its tests, pytest collecting the repository root)
imports nothing of ComfyUI.
"""


async def comfy_entrypoint():
    from .nodes import SVDQuantExtension, log_kernels

    log_kernels()  # ComfyUI calls the entry point once, at start-up
    return SVDQuantExtension()
