"""The numerical definition of SVDQuant W4A4 / W4A16, in PyTorch.

Every CUDA kernel is tested against the functions here: bit for bit where integers
are involved (INT4 codes, per-group integer sums), to float tolerance elsewhere.

Conventions (natural layout, independent of any kernel tiling):
  * a linear layer computes y = x @ W^T, x [M, K], W [N, K];
  * groups are 64 consecutive input channels (K must be a multiple of 64);
  * weight codes are signed INT4 in [-8, 7], one scale per (output channel, group),
    stored as wscales [K/64, N];
  * activation codes are INT4 per (token, group): signed in [-8, 7] with
    scale = absmax / 7, or unsigned in [0, 15] with scale = absmax / 15 for groups
    whose input is shifted to be non-negative (post-GELU, shift 0.171875);
  * packed codes hold two INT4 per byte along K, row-major [rows, K/2]: the low
    nibble is the even column, the high nibble the odd one (two's complement for
    signed codes).

Power-of-two restricted scales (the Hopper fast path, REFERENCE.md designs (c) and (d)): a
group scale that is a per-row base times 2^-j lets the tensor cores take code * 2^(J-j) as an
exact 8-bit integer operand (J the largest j allowed), so the GEMM sums all of K exactly in int32
with no per-group rescaling; the design (d) path takes code * 2^-j as an exact FP8 e4m3 operand.
  * activations (`quantize_activations_pow2`): each token's scales are atok * 2^-e[g]. This mode is
    our own definition, so it multiplies by reciprocals where the exact mode divides (1/smooth,
    1/atok): that keeps kernel 1's arithmetic at a few instructions per element;
  * weights (`pow2_weight_exponents`): a layer qualifies when every wscales[g, n] equals
    wbase[n] * 2^-f[g, n], wbase[n] the row's largest scale; the file format is unchanged.

Group rotation (optional per layer, docs/DESIGN.md#group-rotation): before quantization the
activations of every signed group are rotated, v_rot = v @ M with M a 64 x 64 orthogonal matrix
shared by the layer's signed groups, and the file stores the weight residual rotated the same way,
so the 4-bit product approximates v . R^T = v_rot . (R M)^T while the low-rank branch reads the
unrotated input. M is a butterfly (`rotate_groups`): one or more passes of six stages, strides 1, 2,
4, 8, 16, 32, each stage replacing column i by self[i] * v[i] + partner[i] * v[i ^ stride] with two
products and one sum rounded in float32, so that kernel 1 reproduces it bit for bit (strides 1-4
inside a thread's octet, 8-32 across the 8 lanes of a (token, group)). Unsigned (post-GELU) groups stay unrotated: a
rotation would turn their shift into one large coordinate.

FP8 execution (an opt-in way to run any W4A4 layer on FP8 tensor cores, docs/DESIGN.md#fp8-execution):
the layer's product, its own low-rank branch merged in, becomes one e4m3 weight matrix with a scale
per output channel (`fp8_weights`), the input is quantized to e4m3 with a scale per token
(`quantize_fp8_per_token`), and y = codes_x . codes_w^T * sx[m] * sw[n] + bias.
"""

from __future__ import annotations

import torch

GROUP_SIZE = 64
# Post-GELU inputs are shifted by this constant so that they are non-negative and
# can be quantized unsigned; tanh-GELU's minimum is about -0.17.
GELU_SHIFT = 0.171875

SIGNED_MAX = 7
UNSIGNED_MAX = 15
# Largest power-of-two steps between a group scale and its row's base: the fast kernel's s8
# operands are weight code * 2^(4 - f) in [-128, 112] and activation code * 2^(3 - e) in [-64, 120]
# (unsigned codes reach 15). On the synthetic outlier layer (bench/fidelity.py) the restriction
# from 9 steps to these changed the relative error by under 0.0002.
POW2_WEIGHT_MAX_EXP = 4
POW2_ACT_MAX_EXP = 3
# A row whose pow2 base scale is below this quantizes to zero codes (1/base stays finite after
# the 2^POW2_ACT_MAX_EXP factor).
POW2_MIN_BASE = 2.0**-100
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
# The group rotation's butterfly: a pass of ROTATION_STAGES stages, stage s pairing columns i and
# i ^ 2^s of a group. A layer's rotation tensor is float32 [passes * ROTATION_STAGES, GROUP_SIZE, 2]:
# per stage and column, the factor of the column's own value and that of its partner's.
ROTATION_STAGES = 6
# The largest finite FP8 e4m3 value: fp8 execution scales each token and each weight row to it.
E4M3_MAX = 448.0


def _check_groups(k: int, group_size: int) -> int:
    if group_size <= 0 or k % group_size:
        raise ValueError(f"input width {k} is not a multiple of the group size {group_size}")
    return k // group_size


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties to even (what CUDA's rintf / cvt.rni do)."""
    return torch.round(x)  # torch.round rounds half to even


def quantize_groups(
    x: torch.Tensor,
    unsigned: torch.Tensor | bool = False,
    scale_dtype: torch.dtype = torch.bfloat16,
    group_size: int = GROUP_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 quantization of the last dimension in groups.

    x: float tensor [..., K] (any float dtype; computed in float32).
    unsigned: bool or bool tensor [K / group_size] choosing the unsigned mode per group.
    Returns (codes int8 [..., K], scales [..., K / group_size] in scale_dtype).

    Definition (what kernels reproduce):
      amax  = max |v| over the group (float32), unsigned groups clamp v at 0 first;
      scale = round_to_scale_dtype(amax / qmax)            (qmax 7 or 15, IEEE division);
      code  = clamp(rint(v / float(scale)), lo, hi)         (lo, hi = -8, 7 or 0, 15);
      a group whose scale is 0 (all zero, or underflow) gets code 0.
    """
    k = x.shape[-1]
    groups = _check_groups(k, group_size)
    v = x.float().reshape(*x.shape[:-1], groups, group_size)
    unsigned_groups = torch.as_tensor(unsigned, dtype=torch.bool, device=x.device).expand(groups)
    u = unsigned_groups.unsqueeze(-1)
    v = torch.where(u, v.clamp_min(0.0), v)
    qmax = torch.where(unsigned_groups, float(UNSIGNED_MAX), float(SIGNED_MAX))
    lo = torch.where(unsigned_groups, 0.0, -8.0).unsqueeze(-1)
    hi = torch.where(unsigned_groups, float(UNSIGNED_MAX), float(SIGNED_MAX)).unsqueeze(-1)
    amax = v.abs().amax(dim=-1)
    scale = (amax / qmax).to(scale_dtype)
    scale_f = scale.float().unsqueeze(-1)
    safe = torch.where(scale_f > 0, scale_f, torch.ones_like(scale_f))
    codes = round_half_even(v / safe)
    codes = torch.minimum(torch.maximum(codes, lo), hi)
    codes = torch.where(scale_f > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.int8).reshape(x.shape), scale


def _shifted_smoothed(x: torch.Tensor, smooth: torch.Tensor, shift: torch.Tensor | None,
                      reciprocal: bool = False) -> torch.Tensor:
    """(x + shift) / smooth in float32, or (x + shift) * (1 / smooth) with `reciprocal`."""
    v = x.float()
    if shift is not None:
        v = v + shift.float()
    return v * torch.reciprocal(smooth.float()) if reciprocal else v / smooth.float()


def rotate_groups(v: torch.Tensor, rotation: torch.Tensor, rotated_groups: torch.Tensor) -> torch.Tensor:
    """The group rotation of v float32 [..., K] (see the module comment): in each group g with
    rotated_groups[g] (bool [K / 64]), stage s = 0..5 in order sets
    v[i] = fl(fl(rotation[s, i, 0] * v[i]) + fl(rotation[s, i, 1] * v[i ^ 2^s])) for every column
    i of the group (float32, each operation rounded once: no fused multiply-add); the other groups
    are returned as they are. A rotation of several passes (rotation [6P, 64, 2]) runs stage n with
    stride 2^(n mod 6)."""
    k = v.shape[-1]
    groups = _check_groups(k, GROUP_SIZE)
    w = v.reshape(*v.shape[:-1], groups, GROUP_SIZE)
    coef = rotation.to(device=v.device, dtype=torch.float32)
    columns = torch.arange(GROUP_SIZE, device=v.device)
    out = w
    for stage in range(coef.shape[0]):
        partner = out[..., columns ^ (1 << stage % ROTATION_STAGES)]
        out = out * coef[stage, :, 0] + partner * coef[stage, :, 1]
    rotated = torch.as_tensor(rotated_groups, dtype=torch.bool, device=v.device).unsqueeze(-1)
    return torch.where(rotated, out, w).reshape(v.shape)


def rotation_matrix(rotation: torch.Tensor) -> torch.Tensor:
    """The 64 x 64 matrix M of a rotation tensor, float64: rotate_groups(v) = v @ M up to rounding."""
    m = torch.eye(GROUP_SIZE, dtype=torch.float64)
    coef = rotation.to(device="cpu", dtype=torch.float64)
    columns = torch.arange(GROUP_SIZE)
    for stage in range(coef.shape[0]):
        m = m * coef[stage, :, 0] + m[:, columns ^ (1 << stage % ROTATION_STAGES)] * coef[stage, :, 1]
    return m


def butterfly_rotation(angles: torch.Tensor) -> torch.Tensor:
    """The rotation tensor (float32 [6P, 64, 2]) of one 2 x 2 rotation per pair and stage: angles
    [6P, 32], pair p of stage n (stride 2^s, s = n mod 6) joining column i (bit s clear; p = i with bit
    s removed) and j = i + 2^s as (v[i], v[j]) <- (cos t v[i] - sin t v[j], sin t v[i] + cos t v[j]). All angles pi/4
    give the Walsh-Hadamard transform up to signs (`hadamard_rotation` is its exact form)."""
    angles = angles.to(torch.float64)
    out = torch.empty(angles.shape[0], GROUP_SIZE, 2, dtype=torch.float64)
    for stage in range(angles.shape[0]):
        stride = 1 << stage % ROTATION_STAGES
        low = torch.tensor([i for i in range(GROUP_SIZE) if not i & stride])
        t = angles[stage]
        out[stage, low, 0], out[stage, low, 1] = torch.cos(t), -torch.sin(t)
        out[stage, low + stride, 0], out[stage, low + stride, 1] = torch.cos(t), torch.sin(t)
    return out.float()


def hadamard_rotation() -> torch.Tensor:
    """The 64-point Walsh-Hadamard transform as a rotation tensor: (v[i], v[j]) <- (v[i] + v[j],
    v[i] - v[j]) in the first five stages and the same times 1/8 in the last, so that its matrix is
    exactly orthogonal (entries +-1/8) and every stage but the last is one exact sum or difference
    (kernel 1 computes those without the factors: the same numbers)."""
    out = torch.empty(ROTATION_STAGES, GROUP_SIZE, 2)
    for stage in range(ROTATION_STAGES):
        factor = 0.125 if stage == ROTATION_STAGES - 1 else 1.0
        high = torch.tensor([i >> stage & 1 for i in range(GROUP_SIZE)], dtype=torch.bool)
        out[stage, :, 0] = torch.where(high, -factor, factor)  # own value: + for i, - for j = i + 2^s
        out[stage, :, 1] = factor
    return out


def _rotated(v: torch.Tensor, rotation: torch.Tensor | None, unsigned_groups: torch.Tensor) -> torch.Tensor:
    return v if rotation is None else rotate_groups(v, rotation, ~unsigned_groups)


def pow2_exponents(top: torch.Tensor, need: torch.Tensor, max_exp: int) -> torch.Tensor:
    """The largest j in [0, max_exp] with top * 2^-j >= need (0 where none is), as int64.

    top broadcasts against need; both float32. Multiplying by 2^-j is exact in float32 for the
    16-bit scales used here, so the comparison is exact.
    """
    j = torch.zeros(torch.broadcast_shapes(top.shape, need.shape), dtype=torch.int64, device=need.device)
    for i in range(1, max_exp + 1):
        j = torch.where(top * 2.0 ** -i >= need, i, j)
    return j


def quantize_groups_pow2(
    v: torch.Tensor,
    unsigned: torch.Tensor | bool = False,
    scale_dtype: torch.dtype = torch.bfloat16,
    group_size: int = GROUP_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group quantization of the last dimension with each row's scales restricted to top * 2^-e.

    v: float tensor [..., K] (computed in float32). Returns (codes int8 [..., K],
    top [...] in scale_dtype, exps uint8 [..., K / group_size]).

    Definition (what kernel 1's pow2 mode reproduces):
      need[g] = amax[g] / qmax[g]  (float32, as in quantize_groups, before rounding);
      top     = round_to_scale_dtype(max_g need[g]);
      e[g]    = the largest e in [0, POW2_ACT_MAX_EXP] with top * 2^-e >= need[g] (0 where none: the group
                whose need top rounded below);
      scale   = top * 2^-e (float32, exact);
      code    = clamp(rint(v * (2^e / top)), lo, hi), 1 / top rounded to float32 (times 2^e: exact);
                0 in rows whose top is below POW2_MIN_BASE.
    Multiplying by a reciprocal instead of dividing is what makes this definition cheap on the GPU.
    """
    k = v.shape[-1]
    groups = _check_groups(k, group_size)
    v = v.float().reshape(*v.shape[:-1], groups, group_size)
    unsigned_groups = torch.as_tensor(unsigned, dtype=torch.bool, device=v.device).expand(groups)
    v = torch.where(unsigned_groups.unsqueeze(-1), v.clamp_min(0.0), v)
    qmax = torch.where(unsigned_groups, float(UNSIGNED_MAX), float(SIGNED_MAX))
    lo = torch.where(unsigned_groups, 0.0, -8.0).unsqueeze(-1)
    hi = torch.where(unsigned_groups, float(UNSIGNED_MAX), float(SIGNED_MAX)).unsqueeze(-1)
    need = v.abs().amax(dim=-1) / qmax
    top = need.amax(dim=-1).to(scale_dtype)
    top_f = top.float().unsqueeze(-1)
    exps = pow2_exponents(top_f, need, POW2_ACT_MAX_EXP)
    inv_top = torch.where(top_f >= POW2_MIN_BASE, torch.reciprocal(top_f), torch.zeros_like(top_f))
    mult = (inv_top * torch.exp2(exps.float())).unsqueeze(-1)
    codes = torch.minimum(torch.maximum(round_half_even(v * mult), lo), hi)
    return codes.to(torch.int8).reshape(*v.shape[:-2], k), top, exps.to(torch.uint8)


def pow2_scales(top: torch.Tensor, exps: torch.Tensor) -> torch.Tensor:
    """The group scales top[..., None] * 2^-exps of the pow2 quantizers, float32 (exact)."""
    return top.float().unsqueeze(-1) * torch.exp2(-exps.float())


def pow2_weight_exponents(wscales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(wbase float32 [N], exps uint8 [G, N]) when every group scale of wscales [G, N] equals
    wbase[n] * 2^-exps[g, n] exactly, wbase[n] being row n's largest scale and exps in
    [0, POW2_WEIGHT_MAX_EXP]; None otherwise (the layer then takes the exact path). A row whose scales
    are all zero has base 0 and exponents 0."""
    s = wscales.float()
    if s.numel() == 0 or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        return None
    base = s.amax(dim=0)
    ratio = torch.where(s > 0, base / torch.where(s > 0, s, torch.ones_like(s)), torch.ones_like(s))
    exps = torch.log2(ratio).round().clamp(0, POW2_WEIGHT_MAX_EXP)
    zero_row = base == 0
    exact = (base * torch.exp2(-exps) == s) | zero_row
    if not bool(exact.all()):
        return None
    return base, torch.where(zero_row, 0.0, exps).to(torch.uint8)


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """codes [..., K] times their group's scale [..., K / group_size], in float32."""
    k = codes.shape[-1]
    groups = _check_groups(k, group_size)
    v = codes.float().reshape(*codes.shape[:-1], groups, group_size) * scales.float().unsqueeze(-1)
    return v.reshape(codes.shape)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack INT4 codes (signed [-8, 7] or unsigned [0, 15]) two per byte along the last dim.

    Returns uint8 [..., K / 2]: byte j = (code[2j] & 0xF) | (code[2j + 1] << 4).
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of columns ({codes.shape[-1]})")
    c = codes.to(torch.int16)
    if c.numel() and (int(c.min()) < -8 or int(c.max()) > 15):
        raise ValueError("INT4 codes must lie in [-8, 15]")
    nib = (c & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [..., K / 2] -> int8 [..., K]."""
    p = packed.to(torch.uint8)
    lo = (p & 0xF).to(torch.int8)
    hi = (p >> 4).to(torch.int8)
    codes = torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    if signed:
        codes = torch.where(codes >= 8, codes - 16, codes)
    return codes


def unsigned_groups_from_shift(shift: torch.Tensor | None, k: int, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """Per-group unsigned flags [K / group_size] from a layer's input shift [K] (None: all signed).

    A group is unsigned exactly where its shift is positive; a group must be all shifted or
    all unshifted.
    """
    groups = _check_groups(k, group_size)
    if shift is None:
        return torch.zeros(groups, dtype=torch.bool)
    positive = (shift.float() > 0).reshape(groups, group_size).cpu()
    if not bool((positive.all(dim=1) | ~positive.any(dim=1)).all()):
        raise ValueError("an input shift must cover whole groups of 64 channels")
    return positive.all(dim=1)


def quantize_activations(
    x: torch.Tensor,
    smooth: torch.Tensor,
    shift: torch.Tensor | None = None,
    unsigned_groups: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel 1's quantization: v = (x + shift) / smooth in float32, the signed groups rotated
    (rotate_groups) where the layer has a rotation, then quantize_groups.

    x [M, K] (bf16/fp16); smooth [K]; shift [K] or None; rotation [6P, 64, 2] or None.
    Returns codes int8 [M, K] and scales [M, K / 64] in x's dtype.
    """
    if unsigned_groups is None:
        unsigned_groups = unsigned_groups_from_shift(shift, x.shape[-1])
    unsigned_groups = unsigned_groups.to(x.device)
    v = _rotated(_shifted_smoothed(x, smooth, shift), rotation, unsigned_groups)
    return quantize_groups(v, unsigned_groups, scale_dtype=x.dtype)


def quantize_activations_pow2(
    x: torch.Tensor,
    smooth: torch.Tensor,
    shift: torch.Tensor | None = None,
    unsigned_groups: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel 1's restricted (pow2) mode: v = (x + shift) * (1 / smooth) in float32, the signed
    groups rotated where the layer has a rotation, then quantize_groups_pow2.

    Returns codes int8 [M, K], atok [M] in x's dtype (each token's largest group scale) and
    exps uint8 [M, K / 64]; the group scales are pow2_scales(atok, exps).
    """
    if unsigned_groups is None:
        unsigned_groups = unsigned_groups_from_shift(shift, x.shape[-1])
    unsigned_groups = unsigned_groups.to(x.device)
    v = _rotated(_shifted_smoothed(x, smooth, shift, reciprocal=True), rotation, unsigned_groups)
    return quantize_groups_pow2(v, unsigned_groups, scale_dtype=x.dtype)


def w4a4_gemm_reference(
    act_codes: torch.Tensor,
    act_scales: torch.Tensor,
    weight_codes: torch.Tensor,
    wscales: torch.Tensor,
    group_size: int = GROUP_SIZE,
    rows_per_chunk: int = 512,
) -> torch.Tensor:
    """y[m, n] = sum_g ascale[m, g] * wscale[g, n] * (sum_{k in g} qa[m, k] * qw[n, k]), float32.

    Each group's sum of code products is an exact integer (|sum| <= 64 * 15 * 8); it is
    computed with float32 products and sums, which are exact for such integers, then
    scaled by ascale * wscale (float32) and accumulated over groups in float32.
    act_codes [M, K] int8, act_scales [M, G], weight_codes [N, K] int8, wscales [G, N].
    """
    m, k = act_codes.shape
    n = weight_codes.shape[0]
    groups = _check_groups(k, group_size)
    w = weight_codes.float().reshape(n, groups, group_size).permute(1, 2, 0)  # [G, 64, N]
    ws = wscales.float()  # [G, N]
    out = torch.empty(m, n, dtype=torch.float32, device=act_codes.device)
    for start in range(0, m, rows_per_chunk):
        a = act_codes[start:start + rows_per_chunk].float()
        rows = a.shape[0]
        a = a.reshape(rows, groups, group_size).transpose(0, 1)  # [G, rows, 64]
        sums = torch.bmm(a, w)  # [G, rows, N], exact integers
        scale = act_scales[start:start + rows].float().t().unsqueeze(-1) * ws.unsqueeze(1)
        out[start:start + rows] = (sums * scale).sum(dim=0)
    return out


def gelu_channels(y: torch.Tensor, gelu_from: int | None) -> torch.Tensor:
    """y with GELU (tanh approximation) applied in place to its channels (last dimension) from
    gelu_from on, in y's precision; None leaves y as it is. What a layer with
    `SVDQLinear.gelu_from` set outputs before the rounding to its dtype."""
    if gelu_from is not None:
        y[..., gelu_from:] = torch.nn.functional.gelu(y[..., gelu_from:], approximate="tanh")
    return y


def gated_residual(residual: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """FLUX's gated residual stream, residual + gate * y, as PyTorch's two 16-bit ops compute it (ComfyUI's
    `img + apply_mod(y, gate)`): the product rounded to y's dtype, then the sum rounded, each in float32. gate
    broadcasts against y (FLUX: [B, 1, N] against [B, L, N])."""
    product = (y.float() * gate.float()).to(y.dtype)
    return (residual.float() + product.float()).to(y.dtype)


def lowrank_reference(x: torch.Tensor, lora_down: torch.Tensor, lora_up: torch.Tensor) -> torch.Tensor:
    """(x @ lora_down) @ lora_up^T in float32: x [M, K], lora_down [K, r], lora_up [N, r]."""
    return (x.float() @ lora_down.float()) @ lora_up.float().t()


def _group_sums(v: torch.Tensor) -> torch.Tensor:
    """Sums of v [..., K] (float32) over each 64-group in kernel 1's order, float32 [..., K/64]: each octet
    of 8 columns summed in column order, then the 8 octets pairwise ((o0 + o1) + (o2 + o3)) + ((o4 + o5) +
    (o6 + o7)), every addition rounded (the lanes of a (token, group) exchange by xor-shuffles 1, 2, 4)."""
    octets = v.reshape(*v.shape[:-1], -1, 8, 8)
    s = octets[..., 0]
    for j in range(1, 8):
        s = s + octets[..., j]
    s = s[..., 0::2] + s[..., 1::2]
    s = s[..., 0::2] + s[..., 1::2]
    return s[..., 0] + s[..., 1]


def modulated_layer_norm(x: torch.Tensor, mult: torch.Tensor | None, add: torch.Tensor | None,
                         eps: float) -> torch.Tensor:
    """LayerNorm without affine parameters over x's last dimension, then `ln * mult + add` (FLUX's
    modulated norm: `torch.addcmul(shift, norm(x), 1 + scale)`), bit for bit as kernel 1's prologue
    computes it, in x's dtype. x [B, L, K]; mult, add [B, K] or [B, 1, K] in x's dtype, or None (no
    modulation). Per token: float32 sums of x and of float32(x^2) over each 64-group (_group_sums' order),
    their totals over the groups in float64 (exact, so in any order, unless the group sums span more
    than about 2^20), then in float64 with each operation rounded mean = s1 / K, var = max(s2 / K -
    mean^2, 0), rstd = 1 / sqrt(var + eps); then in float32 ln = dtype((x - float32(mean)) *
    float32(rstd)) and out = dtype(fma(ln, mult, add)), the fma's one float32 rounding. PyTorch's own
    LayerNorm and addcmul differ from it only in rounding. Float64 only where it is a few operations per
    group: GPUs without fast float64 (consumer cards run it at 1/64 of float32) compute it at memory speed."""
    if x.dim() != 3:
        raise ValueError(f"modulated_layer_norm takes x [B, L, K], not {tuple(x.shape)}")
    b, _, k = x.shape
    wide = x.float()
    mean = _group_sums(wide).double().sum(-1, keepdim=True) / k
    var = (_group_sums(wide * wide).double().sum(-1, keepdim=True) / k - mean * mean).clamp_min(0)
    rstd = 1 / torch.sqrt(var + eps)
    ln = ((wide - mean.float()) * rstd.float()).to(x.dtype)
    if mult is None:
        return ln
    # the product of two 16-bit values is exact in float32, so product + add rounds once, as the fma
    return (ln.float() * mult.reshape(b, 1, k).float() + add.reshape(b, 1, k).float()).to(x.dtype)


def dequantize_w4a16(
    codes_u4: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor, group_size: int = GROUP_SIZE
) -> torch.Tensor:
    """W4A16 weight: W[n, k] = code[n, k] * wscales[g, n] + wzeros[g, n], g = k // 64, float32.

    codes_u4 uint8/int8 [N, K] in [0, 15]; wscales, wzeros [K / group_size, N].
    """
    return dequantize_groups(codes_u4, wscales.t()) + wzeros.float().t().repeat_interleave(group_size, dim=1)


def quantize_w4a16(weight: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16, group_size: int = GROUP_SIZE):
    """Asymmetric 4-bit weight quantization (min/max per (row, group)), for weight-only layers.

    Returns (codes uint8 [N, K] in [0, 15], wscales [G, N], wzeros [G, N]) with
    W ~ code * scale + zero; zero = min rounded so that W's min and max are both reachable.
    """
    n, k = weight.shape
    groups = _check_groups(k, group_size)
    w = weight.float().reshape(n, groups, group_size)
    wmin = w.amin(dim=-1).clamp_max(0.0)
    wmax = w.amax(dim=-1).clamp_min(0.0)
    scale = ((wmax - wmin) / UNSIGNED_MAX).to(scale_dtype)
    scale_f = scale.float()
    safe = torch.where(scale_f > 0, scale_f, torch.ones_like(scale_f))
    # an integer zero point keeps 0.0 exactly representable (padding, pruned weights)
    zero_point = round_half_even(-wmin / safe).clamp(0, UNSIGNED_MAX)
    zeros = (-zero_point * scale_f).to(scale_dtype)
    codes = round_half_even(w / safe.unsqueeze(-1) + zero_point.unsqueeze(-1)).clamp(0, UNSIGNED_MAX)
    codes = torch.where(scale_f.unsqueeze(-1) > 0, codes, zero_point.unsqueeze(-1))
    return codes.to(torch.uint8).reshape(n, k), scale.t().contiguous(), zeros.t().contiguous()


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 execution's input quantization: per token (row of x [M, K]) amax = max |x| (exact in
    float32), codes = e4m3(x * (448 / amax)) (float32 product, one rounding to nearest even,
    saturating), scale = amax / 448 (float32 division); a token whose amax is 0 gets 0 codes and
    scale. Returns codes float8_e4m3fn [M, K] and scales float32 [M, 1]."""
    v = x.float()
    amax = v.abs().amax(dim=-1, keepdim=True)
    # tensor by tensor: torch takes a Python scalar divisor or dividend through a reciprocal
    e4m3_max = torch.full_like(amax, E4M3_MAX)
    inv = torch.where(amax > 0, e4m3_max / amax, torch.zeros_like(amax))
    return (v * inv).to(torch.float8_e4m3fn), amax / e4m3_max


def unrotated_residual(residual: torch.Tensor, rotation: torch.Tensor | None,
                       rotated_groups: torch.Tensor | None) -> torch.Tensor:
    """A rotated layer's dequantized residual [N, K] (float32) in the input's own basis: each rotated
    group's columns times M^T (M = rotation_matrix(rotation), orthogonal); residual itself without a
    rotation."""
    if rotation is None:
        return residual
    back = rotation_matrix(rotation).t().float().to(residual.device)
    grouped = residual.reshape(residual.shape[0], -1, GROUP_SIZE)
    rotated = rotated_groups.to(residual.device).view(1, -1, 1)
    return torch.where(rotated, grouped @ back, grouped).reshape(residual.shape)


def fp8_weights(qweight: torch.Tensor, wscales: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor,
                lora_up: torch.Tensor, bias: torch.Tensor | None, shift: torch.Tensor | None,
                rotation: torch.Tensor | None = None,
                chunk_floats: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A W4A4 layer as FP8 execution runs it: the dense weight its product approximates, in the input's
    own basis, W = dequantize(Q(R)) / smooth + lora_up @ lora_down^T (float32; a rotated layer's signed
    groups of dequantize(Q(R)) turned back by M^T, M = rotation_matrix(rotation); lora_down [K, r] and
    lora_up [N, r] hold the branch to merge), as e4m3 codes with one scale per output channel
    (quantize_fp8_per_token of W's rows), and the bias with the input shift's share,
    bias + shift @ (dequantize(Q(R)) / smooth)^T (the quantized path reads x + shift; the branch reads x).
    Returns codes float8_e4m3fn [N, K], scales float32 [N] and the bias float32 [N] (None without
    bias or shift). Computed on qweight's device a block of output channels at a time, each of its float32
    temporaries at most chunk_floats values (16 MiB by default), so that making them fits the little memory a
    model manager leaves beside the weights it loads (bench/NOTES.md#fp8-offloaded-layers)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    codes = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=qweight.device)
    scales = torch.empty(n, dtype=torch.float32, device=qweight.device)
    shifted = None if shift is None else torch.empty(n, dtype=torch.float32, device=qweight.device)
    smooth, down_t = smooth.float(), lora_down.float().t()
    shift = None if shift is None else shift.float()
    rotated = None if rotation is None else ~unsigned_groups_from_shift(shift, k).to(qweight.device)
    rows_per_chunk = max(1, chunk_floats // k)
    for start in range(0, n, rows_per_chunk):
        rows = slice(start, min(n, start + rows_per_chunk))
        residual = dequantize_groups(unpack_int4(qweight[rows], signed=True), wscales[:, rows].t())
        residual = unrotated_residual(residual, rotation, rotated) / smooth
        if shift is not None:
            shifted[rows] = residual @ shift
        w = residual + lora_up[rows].float() @ down_t
        codes[rows], row_scales = quantize_fp8_per_token(w)
        scales[rows] = row_scales.squeeze(1)
    if shifted is None:
        return codes, scales, None if bias is None else bias.float()
    return codes, scales, shifted if bias is None else bias.float() + shifted


def fp8_linear_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                         gelu_from: int | None = None) -> torch.Tensor:
    """FP8 execution of a layer from fp8_weights' (codes [N, K], scales [N], bias [N]) on x [M, K]:
    y = (qx * sx) . (codes * scales)^T + bias in float32, GELU on channels from gelu_from on, in x's dtype."""
    qx, sx = quantize_fp8_per_token(x)
    y = (qx.float() * sx) @ (codes.float() * scales.unsqueeze(1)).t()
    if bias is not None:
        y += bias.float()
    return gelu_channels(y, gelu_from).to(x.dtype)
