"""The FLUX.1 architecture: configuration, every layer and how it is quantized, checks of a state dict.

Module names are ComfyUI's (= Black Forest Labs'), so a state dict checked here loads into
ComfyUI's own FLUX model and into `flux.model.Flux` alike. Which layers are quantized:
  W4A4 (SVDQuant): the attention qkv and output projections and both MLP linears of every
    double block (image and text streams), a single block's fused linear1 ([qkv; mlp_in]
    along N) and linear2 ([attention out | mlp_out] along K);
  W4A16: the AdaLN modulation linears (`img_mod.lin`, `txt_mod.lin`, `modulation.lin`);
  16-bit: embedders (img_in, txt_in, time_in, vector_in, guidance_in), the final layer and
    the q/k RMSNorm scales.
Inputs that are tanh-GELU outputs (img_mlp.2, txt_mlp.2, the MLP columns of linear2) are
quantized unsigned after a shift of `numerics.GELU_SHIFT`.

FLUX.1 schnell and dev share the architecture; dev has the guidance embedder (guidance_in).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..linear import DENSE, W4A4, W4A16

TIMESTEP_DIM = 256  # width of the sinusoidal timestep / guidance embeddings
FLUX_AXES_DIM = (16, 56, 56)  # RoPE axes of every FLUX.1 model (head dim 128)


@dataclass(frozen=True)
class FluxConfig:
    """ComfyUI's FLUX parameters (comfy.ldm.flux.model.FluxParams); defaults are FLUX.1-dev's."""

    in_channels: int = 16
    out_channels: int = 16
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = FLUX_AXES_DIM
    theta: int = 10000
    patch_size: int = 2
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"RoPE axes {list(self.axes_dim)} do not add up to the head dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def variant(self) -> str:
        """'dev' (guidance-distilled, has a guidance embedder) or 'schnell' (timestep-distilled)."""
        return "dev" if self.guidance_embed else "schnell"

    def to_dict(self) -> dict:
        """ComfyUI's unet config for this model (JSON-compatible)."""
        out = dataclasses.asdict(self)
        out["axes_dim"] = list(self.axes_dim)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "FluxConfig":
        """From a ComfyUI FLUX config; keys ComfyUI adds around the parameters are ignored."""
        values = {k: v for k, v in values.items() if k not in ("image_model", "disable_unet_model_creation")}
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown FLUX config keys {sorted(unknown)}")
        return cls(**values)


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer of the architecture and how the quantizer treats it."""

    in_features: int
    out_features: int
    bias: bool
    kind: str                                # W4A4, W4A16 or DENSE
    gelu_columns: tuple[int, int] | None = None  # input columns [start, end) that are GELU outputs


def linear_layers(cfg: FluxConfig) -> dict[str, LinearSpec]:
    """Every linear layer of the model, by ComfyUI module name, in forward order."""
    h, m = cfg.hidden_size, cfg.mlp_hidden
    patch = cfg.patch_size * cfg.patch_size
    layers = {"img_in": LinearSpec(cfg.in_channels * patch, h, True, DENSE),
              "time_in.in_layer": LinearSpec(TIMESTEP_DIM, h, True, DENSE),
              "time_in.out_layer": LinearSpec(h, h, True, DENSE)}
    if cfg.guidance_embed:
        layers["guidance_in.in_layer"] = LinearSpec(TIMESTEP_DIM, h, True, DENSE)
        layers["guidance_in.out_layer"] = LinearSpec(h, h, True, DENSE)
    layers["vector_in.in_layer"] = LinearSpec(cfg.vec_in_dim, h, True, DENSE)
    layers["vector_in.out_layer"] = LinearSpec(h, h, True, DENSE)
    layers["txt_in"] = LinearSpec(cfg.context_in_dim, h, True, DENSE)
    for i in range(cfg.depth):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            layers[f"{p}_mod.lin"] = LinearSpec(h, 6 * h, True, W4A16)
            layers[f"{p}_attn.qkv"] = LinearSpec(h, 3 * h, cfg.qkv_bias, W4A4)
            layers[f"{p}_attn.proj"] = LinearSpec(h, h, True, W4A4)
            layers[f"{p}_mlp.0"] = LinearSpec(h, m, True, W4A4)
            layers[f"{p}_mlp.2"] = LinearSpec(m, h, True, W4A4, gelu_columns=(0, m))
    for i in range(cfg.depth_single_blocks):
        p = f"single_blocks.{i}"
        layers[f"{p}.modulation.lin"] = LinearSpec(h, 3 * h, True, W4A16)
        layers[f"{p}.linear1"] = LinearSpec(h, 3 * h + m, True, W4A4)
        layers[f"{p}.linear2"] = LinearSpec(h + m, h, True, W4A4, gelu_columns=(h, h + m))
    layers["final_layer.adaLN_modulation.1"] = LinearSpec(h, 2 * h, True, DENSE)
    layers["final_layer.linear"] = LinearSpec(h, patch * cfg.out_channels, True, DENSE)
    return layers


# In-block name of a fused [q; k; v] layer -> the layer reading its V rows through the attention
# (nunchaku imports fold a smoothing factor between the two: lora.output_divisors).
V_ROWS_READ_BY = {"img_attn.qkv": "img_attn.proj", "txt_attn.qkv": "txt_attn.proj", "linear1": "linear2"}


def norm_scales(cfg: FluxConfig) -> dict[str, int]:
    """The q/k RMSNorm scale tensors (the only parameters outside linear layers) and their sizes."""
    names = []
    for i in range(cfg.depth):
        names += [f"double_blocks.{i}.{s}_attn.norm.{q}_norm.scale" for s in ("img", "txt") for q in ("query", "key")]
    for i in range(cfg.depth_single_blocks):
        names += [f"single_blocks.{i}.norm.{q}_norm.scale" for q in ("query", "key")]
    return {name: cfg.head_dim for name in names}


def dense_shapes(cfg: FluxConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the unquantized model: name -> shape."""
    shapes = {}
    for name, spec in linear_layers(cfg).items():
        shapes[f"{name}.weight"] = (spec.out_features, spec.in_features)
        if spec.bias:
            shapes[f"{name}.bias"] = (spec.out_features,)
    shapes.update({name: (size,) for name, size in norm_scales(cfg).items()})
    return shapes


def _count_blocks(tensors, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in tensors if k.startswith(prefix)}
    if indices != set(range(len(indices))):
        raise ValueError(f"{prefix}N blocks are not numbered 0..{len(indices) - 1}")
    return len(indices)


def config_from_tensors(tensors: dict, layers: dict) -> FluxConfig:
    """Infer the configuration from tensor shapes (for files without a stored config)."""
    def width(name: str) -> tuple[int, int]:  # (out, in) of a dense or quantized layer
        if name in layers:
            return int(layers[name]["out"]), int(layers[name]["in"])
        if f"{name}.weight" not in tensors:
            raise ValueError(f"no tensor {name}.weight: not a FLUX transformer")
        return tuple(tensors[f"{name}.weight"].shape)

    hidden, patch_in = width("img_in")
    patch = FluxConfig.patch_size
    depth = _count_blocks(tensors, "double_blocks.")
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    if norm not in tensors:
        raise ValueError(f"no tensor {norm}: not a FLUX transformer")
    head_dim = tensors[norm].shape[0]
    if head_dim != sum(FLUX_AXES_DIM):
        raise ValueError(f"head dim {head_dim} has no known RoPE axes; the file needs a stored model config")
    mlp = width("double_blocks.0.img_mlp.0")[0] if depth else width("single_blocks.0.linear1")[0] - 3 * hidden
    return FluxConfig(
        in_channels=patch_in // patch ** 2, out_channels=width("final_layer.linear")[0] // patch ** 2,
        vec_in_dim=width("vector_in.in_layer")[1], context_in_dim=width("txt_in")[1], hidden_size=hidden,
        mlp_ratio=mlp / hidden, num_heads=hidden // head_dim, depth=depth,
        depth_single_blocks=_count_blocks(tensors, "single_blocks."),
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in tensors if depth else FluxConfig.qkv_bias,
        guidance_embed="guidance_in.in_layer.weight" in tensors)


def check_tensors(cfg: FluxConfig, tensors: dict, layers: dict) -> None:
    """Every tensor the architecture needs is there with its shape, and nothing else is.

    A linear layer may be dense or quantized (its own tensors were checked against its
    description by `format`); only its width is compared here.
    """
    specs = linear_layers(cfg)
    for name, desc in layers.items():
        spec = specs.get(name)
        if spec is None:
            raise ValueError(f"quantized layer {name} is not a linear layer of this FLUX model")
        if (int(desc["in"]), int(desc["out"])) != (spec.in_features, spec.out_features):
            raise ValueError(f"quantized layer {name} is {desc['out']}x{desc['in']}, the model needs "
                             f"{spec.out_features}x{spec.in_features}")
        if spec.bias and not desc.get("bias"):
            raise ValueError(f"quantized layer {name} has no bias, the model needs one")
    expected = {k: v for k, v in dense_shapes(cfg).items() if k.rsplit(".", 1)[0] not in layers}
    for key, shape in expected.items():
        if key not in tensors:
            raise ValueError(f"missing tensor {key}")
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"tensor {key} has shape {tuple(tensors[key].shape)}, the model needs {shape}")
    quantized = tuple(f"{name}." for name in layers)
    extra = sorted(k for k in tensors if k not in expected and not k.startswith(quantized))
    if extra:
        raise ValueError(f"tensors that are not part of this FLUX model: {', '.join(extra[:5])}"
                         + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
