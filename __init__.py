"""ComfyUI entry point of the SVDQuant node pack: registers the nodes, nothing else.

Outside ComfyUI (no `comfy` package to import) the pack imports cleanly and registers nothing,
so the engine in `svdquant/` can be used and tested on its own.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

# ComfyUI imports this folder as a package. Imported as a plain module (pytest collecting the
# repository root of a clone whose folder name is not a module name) there is nothing to register.
if __package__:
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
    except ModuleNotFoundError as exc:
        if exc.name not in ("comfy", "folder_paths") and not (exc.name or "").startswith("comfy."):
            raise

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
