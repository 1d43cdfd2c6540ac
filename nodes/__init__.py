"""ComfyUI nodes of the pack (the only code that imports comfy.* and folder_paths)."""

import folder_paths  # noqa: F401  (fails outside ComfyUI; the pack's __init__ handles that)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
