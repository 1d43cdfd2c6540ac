"""The engine's own FLUX.1 transformer forward, for running without ComfyUI.

Used for tiny models, tests, the quantizer's calibration and the demo. It has ComfyUI's module
names and computes what comfy/ldm/flux computes (the ComfyUI tests compare the two on the same
state dict), without ComfyUI's patch points, ControlNet, reference latents and attention masks.
Every linear layer is made by `make_linear(in_features, out_features, bias)`, so one model class
runs dense (`nn.Linear`) or with the layers a file stores (`linear.LoadedLinear`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..linear import LoadedLinear
from .arch import TIMESTEP_DIM, FluxConfig
from .fusion import fuse_gated_residuals, fuse_mlp_gelu, fuse_single_block_concat

LinearFactory = Callable[[int, int, bool], nn.Module]
NORM_EPS = 1e-6


def timestep_embedding(t: torch.Tensor, dim: int = TIMESTEP_DIM, max_period: int = 10000,
                       time_factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of timesteps t [B] in [0, 1] (cos half, then sin half)."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """Rotation matrices [..., n, dim/2, 2, 2] for positions pos [..., n] on one RoPE axis."""
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=pos.device)
    omega = 1.0 / (theta ** scale)
    angles = torch.einsum("...n,d->...nd", pos.to(torch.float32), omega)
    rot = torch.stack([torch.cos(angles), -torch.sin(angles), torch.sin(angles), torch.cos(angles)], dim=-1)
    return rot.reshape(*rot.shape[:-1], 2, 2).to(torch.float32)


def attention(q, k, v, pe: torch.Tensor) -> torch.Tensor:
    """RoPE on q and k [B, heads, L, D], scaled dot-product attention, heads merged: [B, L, heads * D]."""
    def rotate(x):
        pairs = x.to(pe.dtype).reshape(*x.shape[:-1], -1, 1, 2)
        return (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).reshape(x.shape).type_as(v)

    out = F.scaled_dot_product_attention(rotate(q), rotate(k), v)
    b, heads, length, d = out.shape
    return out.transpose(1, 2).reshape(b, length, heads * d)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(1 + scale) * LayerNorm(x) + shift (LayerNorm without affine parameters)."""
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=NORM_EPS), 1 + scale)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int, make_linear: LinearFactory):
        super().__init__()
        self.in_layer = make_linear(in_dim, hidden, True)
        self.out_layer = make_linear(hidden, hidden, True)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x):
        return F.rms_norm(x, self.scale.shape, weight=self.scale.to(x.dtype), eps=NORM_EPS)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, make_linear: LinearFactory):
        super().__init__()
        self.qkv = make_linear(dim, 3 * dim, qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = make_linear(dim, dim, True)


class Modulation(nn.Module):
    """lin(silu(vec)) split into (shift, scale, gate) chunks, two sets for a double block."""

    def __init__(self, dim: int, double: bool, make_linear: LinearFactory):
        super().__init__()
        self.chunks = 6 if double else 3
        self.lin = make_linear(dim, self.chunks * dim, True)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.chunks, dim=-1)


def _split_heads(qkv: torch.Tensor, num_heads: int):
    b, length, _ = qkv.shape
    return qkv.view(b, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4)


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig, make_linear: LinearFactory):
        super().__init__()
        h, m = cfg.hidden_size, cfg.mlp_hidden
        self.num_heads = cfg.num_heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(h, True, make_linear))
            setattr(self, f"{stream}_attn", SelfAttention(h, cfg.num_heads, cfg.qkv_bias, make_linear))
            setattr(self, f"{stream}_mlp", nn.Sequential(make_linear(h, m, True), nn.GELU(approximate="tanh"),
                                                         make_linear(m, h, True)))

    def forward(self, img, txt, vec, pe):
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)

        img_q, img_k, img_v = _split_heads(self.img_attn.qkv(modulate(img, img_shift1, img_scale1)), self.num_heads)
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)
        txt_q, txt_k, txt_v = _split_heads(self.txt_attn.qkv(modulate(txt, txt_shift1, txt_scale1)), self.num_heads)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)

        attn = attention(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2),
                         torch.cat((txt_v, img_v), dim=2), pe)
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp(modulate(img, img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(txt, txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Attention and MLP in parallel: linear1 = [qkv; mlp_in], linear2 = [attention out | mlp_out]."""

    def __init__(self, cfg: FluxConfig, make_linear: LinearFactory):
        super().__init__()
        h, m = cfg.hidden_size, cfg.mlp_hidden
        self.hidden_size, self.mlp_hidden, self.num_heads = h, m, cfg.num_heads
        self.linear1 = make_linear(h, 3 * h + m, True)
        self.linear2 = make_linear(h + m, h, True)
        self.norm = QKNorm(cfg.head_dim)
        self.modulation = Modulation(h, False, make_linear)
        self.mlp_act = nn.GELU(approximate="tanh")  # a module, as ComfyUI's (fusion.fuse_single_block_concat)

    def forward(self, x, vec, pe):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(modulate(x, shift, scale)), [3 * self.hidden_size, self.mlp_hidden], dim=-1)
        q, k, v = _split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, pe), self.mlp_act(mlp)), dim=2))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, cfg: FluxConfig, make_linear: LinearFactory):
        super().__init__()
        h = cfg.hidden_size
        self.linear = make_linear(h, cfg.patch_size ** 2 * cfg.out_channels, True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), make_linear(h, 2 * h, True))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale))


def dense_linear(dtype: torch.dtype = torch.bfloat16, device=None) -> LinearFactory:
    """A factory of ordinary `nn.Linear` layers (the unquantized model)."""
    def make(in_features: int, out_features: int, bias: bool) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
    return make


def loaded_linear(dtype: torch.dtype | None = None) -> LinearFactory:
    """A factory of layers that become at load what the state dict stores (dense, W4A4, W4A16)."""
    def make(in_features: int, out_features: int, bias: bool) -> nn.Module:
        return LoadedLinear(in_features, out_features, bias=bias, dtype=dtype)
    return make


class Flux(nn.Module):
    """FLUX.1 transformer: latent [B, C, H, W] + text embeddings -> flow prediction [B, C, H, W]."""

    def __init__(self, cfg: FluxConfig, make_linear: LinearFactory):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.img_in = make_linear(cfg.in_channels * cfg.patch_size ** 2, h, True)
        self.time_in = MLPEmbedder(TIMESTEP_DIM, h, make_linear)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, h, make_linear)
        self.guidance_in = MLPEmbedder(TIMESTEP_DIM, h, make_linear) if cfg.guidance_embed else nn.Identity()
        self.txt_in = make_linear(cfg.context_in_dim, h, True)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg, make_linear) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg, make_linear) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(cfg, make_linear)

    def _positions(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([rope(ids[..., i], d, self.cfg.theta) for i, d in enumerate(self.cfg.axes_dim)],
                         dim=-3).unsqueeze(1)

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
              guidance: torch.Tensor | None = None):
        """What the blocks take: (img tokens [B, L_img, hidden], txt tokens [B, L_txt, hidden], vec
        [B, hidden], RoPE pe) for forward's arguments; the quantizer runs the blocks one at a time on it."""
        b, c, height, width = x.shape
        p = self.cfg.patch_size
        x = F.pad(x, (0, (p - width % p) % p, 0, (p - height % p) % p), mode="circular")
        h_len, w_len = x.shape[2] // p, x.shape[3] // p
        img = x.reshape(b, c, h_len, p, w_len, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h_len * w_len, c * p * p)

        img_ids = torch.zeros(h_len, w_len, 3, device=x.device, dtype=x.dtype)
        img_ids[..., 1] += torch.arange(h_len, device=x.device, dtype=x.dtype)[:, None]
        img_ids[..., 2] += torch.arange(w_len, device=x.device, dtype=x.dtype)[None, :]
        img_ids = img_ids.reshape(1, -1, 3).expand(b, -1, -1)
        txt_ids = torch.zeros(b, context.shape[1], 3, device=x.device, dtype=x.dtype)
        pe = self._positions(torch.cat((txt_ids, img_ids), dim=1))

        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timestep).to(img.dtype))
        if self.cfg.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(img.dtype))
        vec = vec + self.vector_in(y[:, :self.cfg.vec_in_dim])
        txt = self.txt_in(context)
        return img, txt, vec, pe

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W] latents, timestep [B] (sigma in [0, 1]), context [B, L, context_in_dim],
        y [B, vec_in_dim] pooled text vector, guidance [B] (dev models; ignored by schnell)."""
        b, _, height, width = x.shape
        p = self.cfg.patch_size
        img, txt, vec, pe = self.embed(x, timestep, context, y, guidance)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        img = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            img = block(img, vec, pe)
        img = self.final_layer(img[:, txt.shape[1]:], vec)

        h_len, w_len = -(-height // p), -(-width // p)
        out = img.reshape(b, h_len, w_len, -1, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, -1, h_len * p, w_len * p)[:, :, :height, :width]


def from_tensors(cfg: FluxConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> Flux:
    """The model holding a file's tensors as they are stored (quantized layers stay quantized),
    the W4A4 MLP input layers applying the GELU (fusion.fuse_mlp_gelu, fusion.fuse_single_block_concat) and the
    layers feeding the gated residual streams adding into them (fusion.fuse_gated_residuals); float tensors
    converted to dtype when given."""
    model = Flux(cfg, loaded_linear(dtype))
    model.load_state_dict(tensors, strict=True)
    fuse_mlp_gelu(model)
    fuse_single_block_concat(model)
    fuse_gated_residuals(model)
    return model.requires_grad_(False)


def sample_euler(model: nn.Module, noise: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                 steps: int, guidance: float | None = None) -> torch.Tensor:
    """Rectified-flow Euler sampling from pure noise with FLUX.1 schnell's linear sigma schedule."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    b = noise.shape[0]
    guidance_t = None if guidance is None else torch.full((b,), guidance, dtype=noise.dtype, device=noise.device)
    x = noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((b,), sigma, dtype=noise.dtype, device=noise.device)
        x = x + (sigma_next - sigma) * model(x, t, context, y, guidance_t)
    return x
