"""ComfyUI nodes of the pack, V3 schema: the only code that imports comfy.* and folder_paths.

Every node of the pack is listed here; the pack's root __init__ hands this extension to ComfyUI.
"""

from comfy_api.latest import ComfyExtension, io

from .loader import SVDQuantFluxLoader
from .lora import SVDQuantLoraStack
from .quantizer import SVDQuantFluxQuantizer
from .text_encoder import SVDQuantFluxTextEncoders


class SVDQuantExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SVDQuantFluxLoader, SVDQuantLoraStack, SVDQuantFluxQuantizer, SVDQuantFluxTextEncoders]
