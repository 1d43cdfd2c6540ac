"""ComfyUI nodes of the pack, V3 schema: the only code that imports comfy.* and folder_paths.

Every node of the pack is listed here; the pack's root __init__ hands this extension to ComfyUI.
"""

import logging

from comfy_api.latest import ComfyExtension, io

from ..svdquant import kernels
from .loader import SVDQuantFluxLoader
from .lora import SVDQuantLoraStack
from .quantizer import SVDQuantFluxQuantizer
from .text_encoder import SVDQuantFluxTextEncoders

log = logging.getLogger("svdquant")


def log_kernels() -> None:
    """One start-up log line saying which kernels the 4-bit layers will use here (or why none)."""
    try:
        status = kernels.kernels_status()
    except Exception as exc:  # noqa: BLE001 - start-up must go on; the line says what failed
        log.warning("svdquant: could not tell which kernels will be used (%s: %s)", type(exc).__name__, exc)
        return
    log.info("svdquant: %s", "; ".join(f"{key}: {value}" for key, value in status.items()))


class SVDQuantExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SVDQuantFluxLoader, SVDQuantLoraStack, SVDQuantFluxQuantizer, SVDQuantFluxTextEncoders]
