"""ComfyUI entry point of the SVDQuant node pack: registers the nodes, nothing else.

Outside ComfyUI (no `comfy` package to import) the pack imports cleanly and registers nothing,
so the engine in `svdquant/` can be used and tested on its own.
"""

if not __package__:
    # Imported as a plain module, not as ComfyUI's custom-node package: pytest does this with the
    # checkout's root when the checkout's directory is no Python identifier (comfyui-svdquant).
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    except ModuleNotFoundError as exc:
        if exc.name not in ("comfy", "folder_paths") and not (exc.name or "").startswith("comfy."):
            raise
        NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
