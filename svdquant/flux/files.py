"""Reading SVDQuant FLUX files: this pack's natural files and nunchaku-format files (docs/DESIGN.md#format)."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import format as fmt
from . import nunchaku_import
from .arch import FluxConfig, check_tensors, config_from_tensors

NOT_FLUX = ("not an SVDQuant FLUX model (neither this pack's format nor nunchaku's single-file INT4 FLUX format); "
            "unquantized FLUX files load with ComfyUI's Load Diffusion Model node")


def load_flux(path, device: str | torch.device = "cpu") -> tuple[fmt.QuantizedModel, FluxConfig]:
    """Read an SVDQuant FLUX model: our natural file or a nunchaku-format single file.

    Returns the model in natural layout with ComfyUI names, and its configuration (stored in the
    file, else inferred from the tensor shapes). Raises FormatError naming the file otherwise.
    """
    path = Path(path)
    metadata = fmt.read_header(path)
    if fmt.is_natural_file(metadata):
        model = fmt.load_model(path, device)
        if model.model_type != "flux":
            raise fmt.FormatError(path, f"an SVDQuant {model.model_type or 'unknown'} model, not a FLUX model")
    elif nunchaku_import.is_nunchaku_file(path, metadata):
        model = nunchaku_import.import_model(path, metadata, device)
    else:
        raise fmt.FormatError(path, NOT_FLUX)
    try:
        cfg = (FluxConfig.from_dict(model.model_config) if model.model_config
               else config_from_tensors(model.tensors, model.layers))
        check_tensors(cfg, model.tensors, model.layers)
    except (ValueError, TypeError) as exc:
        raise fmt.FormatError(path, f"not a usable FLUX model: {exc}") from None
    model.model_config = cfg.to_dict()
    return model, cfg


@fmt.remembered_per_file(missing="no such file")
def file_problem(path) -> str | None:
    """Why `load_flux` cannot read the file, from its safetensors header alone (None: it can: this
    pack's FLUX files of the format version it reads, and nunchaku-format FLUX files)."""
    header = fmt.read_header_only(path)
    if header is None:
        return "not a readable safetensors file"
    metadata, names = header
    if fmt.is_natural_file(metadata):
        version = metadata.get("format_version")
        if version not in fmt.READ_VERSIONS:
            return (f"unsupported format version {version!r} (this pack reads {' and '.join(fmt.READ_VERSIONS)}); "
                    "update the pack")
        if metadata.get("model_type") != "flux":
            return f"an SVDQuant {metadata.get('model_type') or 'unknown'} model, not a FLUX model"
        return None
    if nunchaku_import.SIGNATURE_KEY in names:
        return None
    return NOT_FLUX
