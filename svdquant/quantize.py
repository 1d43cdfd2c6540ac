"""The SVDQuant algorithm for one linear layer: smoothing search, SVD low-rank, INT4 residual.

    W_s = W * s                       (s: per input channel, searched exponent alpha)
    W_s = L_up @ L_down^T + R         (rank-r truncated SVD, kept 16-bit, refitted to W_s - Q(R))
    R  -> INT4 codes, one scale per (output channel, 64 inputs), with a per-group scale search;
          the codes rounded column by column with error compensation on the calibration inputs
    y  = Q((x + h) / s) . Q(R)^T + (x @ (L_down / s)) @ L_up^T + bias'

With a group rotation (numerics.rotate_groups, M its matrix) the signed groups of the quantized
path work in the rotated frame: Q(rotate((x + h) / s)) . Q(R M)^T, with M orthogonal equal to the
product above before rounding; every step that quantizes R or simulates the path does it there.

The low-rank branch reads the unsmoothed, unshifted input, so lora_down is stored divided by s.
For shifted inputs (h != 0, post-GELU layers) the quantized path sees x + h; bias' removes the
extra term (R_q / s) @ h exactly for the quantized residual R_q.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import numerics

GROUP_SIZE = numerics.GROUP_SIZE
DEFAULT_ALPHAS = tuple(a / 10 for a in range(0, 11))
# Per-group weight clipping ratios searched for the residual's INT4 scales.
DEFAULT_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
# Power-of-two scales (Hopper format): the row base is searched at these log2 offsets above the
# largest group's scale, so that the other groups' needed scales land just under a power-of-two
# fraction of it.
POW2_BASE_OFFSETS = (0.0, 0.25, 0.5, 0.75)
MAX_CALIBRATION_TOKENS = 1024
SEARCH_POWER_ITERS = 2
FINAL_POWER_ITERS = 8
# Refits of the low-rank branch to what the quantized residual leaves, in the final decomposition
# (bench/NOTES.md#fidelity-real: lower output error on real and synthetic weights, at two more decompositions).
REFINE_ROUNDS = 2
# Error compensation of the residual's rounding (GPTQ): damping added to the Gram matrix of the
# quantized calibration inputs, as a fraction of its mean diagonal, after the shrinkage of its
# off-diagonal part (bench/NOTES.md#fidelity-compensation: without shrinkage 0.01 overfits the few
# calibration tokens and 0.5-1 is best; with it 0.3).
COMPENSATION_DAMPING = 0.3
# Learned smoothing (quantize_linear's smoothing_steps, opt-in): Adam's step size on log s.
# bench/NOTES.md#fidelity-learned-smoothing: 100 steps at 0.01 reach the plateau on all-MiniLM.
LEARNED_SMOOTHING_RATE = 0.01
LEARNED_SMOOTHING_STEPS = 100
# Group rotations of the signed input groups (quantize_linear's rotation): "none"; the fixed 64-point
# Walsh-Hadamard butterfly (bench/NOTES.md#fidelity-rotation: all-MiniLM's mean layer error -5.9% at
# no quantization cost); "learned": a butterfly of LEARNED_ROTATION_PASSES passes (12 stages, 384
# angles) learned per layer from the Hadamard (first pass) and the identity (second) by Adam on the
# calibration output error (LEARNED_ROTATION_STEPS at LEARNED_ROTATION_RATE; bench/NOTES.md#fidelity-rotation:
# two passes beat one by 0.8% of the error with the learned smoothing).
ROTATIONS = ("none", "hadamard", "learned")
DEFAULT_ROTATION = "hadamard"
LEARNED_ROTATION_PASSES = 2
LEARNED_ROTATION_STEPS = 100
LEARNED_ROTATION_RATE = 0.01


@dataclass
class W4A4Tensors:
    """The natural-layout tensors of one SVDQuant W4A4 layer (what `format` stores)."""

    qweight: torch.Tensor      # uint8 [N, K/2]
    wscales: torch.Tensor      # [K/64, N]
    smooth: torch.Tensor       # [K]
    lora_down: torch.Tensor    # [K, r]
    lora_up: torch.Tensor      # [N, r]
    bias: torch.Tensor | None  # [N]
    shift: torch.Tensor | None  # [K]
    rotation: torch.Tensor | None = None  # float32 [6P, 64, 2]

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}


def _codes_and_error(w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """INT4 codes of w [N, G, 64] at scales [N, G] (0 where the scale is 0) and each group's squared error."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    codes = numerics.round_half_even(w / safe).clamp(-8, numerics.SIGNED_MAX)
    codes = torch.where(scale.unsqueeze(-1) > 0, codes, torch.zeros_like(codes))
    return codes, (codes * scale.unsqueeze(-1) - w).square().sum(dim=-1)


def _quantize_weight_int4_pow2(w: torch.Tensor, scale_dtype: torch.dtype):
    """quantize_weight_int4 with pow2_scales=True on w [N, G, 64]: (codes [N, G, 64], scales [N, G])."""
    need = w.abs().amax(dim=-1) / numerics.SIGNED_MAX
    top = need.amax(dim=1)
    best_err = torch.full_like(top, float("inf"))
    best_codes, best_scale = torch.zeros_like(w), torch.zeros_like(need)
    for offset in POW2_BASE_OFFSETS:
        base = (top * 2.0 ** offset).to(scale_dtype).float()
        # the largest exponent whose scale the storage dtype holds exactly (fp16 has few
        # subnormal bits); base * 2^-j is exact for j up to it
        max_exp = torch.zeros_like(base, dtype=torch.int64)
        for j in range(1, numerics.POW2_WEIGHT_MAX_EXP + 1):
            step = base * 2.0 ** -j
            max_exp = torch.where((max_exp == j - 1) & (step.to(scale_dtype).float() == step), j, max_exp)
        base_g, max_g = base.unsqueeze(1), max_exp.unsqueeze(1)
        # the smallest power-of-two fraction covering each group's absmax, and the next one down
        # (clipping the largest weights by up to half) as the clipping candidate
        exps = torch.minimum(numerics.pow2_exponents(base_g, need, numerics.POW2_WEIGHT_MAX_EXP), max_g)
        codes, err = _codes_and_error(w, base_g * torch.exp2(-exps.float()))
        clip_scale = base_g * torch.exp2(-torch.minimum(exps + 1, max_g).float())
        clip_codes, clip_err = _codes_and_error(w, clip_scale)
        better = clip_err < err
        codes = torch.where(better.unsqueeze(-1), clip_codes, codes)
        scale = torch.where(better, clip_scale, base_g * torch.exp2(-exps.float()))
        row_err = torch.minimum(err, clip_err).sum(dim=1)
        keep = row_err < best_err
        best_err = torch.where(keep, row_err, best_err)
        best_codes = torch.where(keep[:, None, None], codes, best_codes)
        best_scale = torch.where(keep[:, None], scale, best_scale)
    return best_codes, best_scale


def quantize_weight_int4(weight: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16,
                         clip_ratios=DEFAULT_CLIP_RATIOS, group_size: int = GROUP_SIZE, pow2_scales: bool = False):
    """Signed INT4 weight quantization per (row, group) with a per-group clipping search.

    For each candidate ratio c the scale is c * absmax / 7 (rounded to scale_dtype) and codes
    are rint(w / scale) clamped to [-8, 7]; each group keeps the candidate with the least
    squared error. Returns (codes int8 [N, K], wscales [K / group_size, N]).

    pow2_scales=True makes the Hopper fast-path format (numerics.pow2_weight_exponents): every
    scale of row n is base[n] * 2^-j, j in [0, numerics.POW2_WEIGHT_MAX_EXP]. The base is searched
    at POW2_BASE_OFFSETS above the row's largest needed scale absmax / 7 (least row error wins); each
    group takes the smallest power-of-two fraction of the base that covers its absmax (j capped), or the next
    one down when that clips to a smaller error (clip_ratios is not used).
    """
    n, k = weight.shape
    groups = k // group_size
    w = weight.float().reshape(n, groups, group_size)
    if pow2_scales:
        codes, scale = _quantize_weight_int4_pow2(w, scale_dtype)
        return codes.to(torch.int8).reshape(n, k), scale.t().to(scale_dtype).contiguous()
    amax = w.abs().amax(dim=-1)
    best_err = torch.full_like(amax, float("inf"))
    best_scale = torch.zeros_like(amax)
    for ratio in clip_ratios:
        scale = (amax * ratio / numerics.SIGNED_MAX).to(scale_dtype).float()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
        deq = numerics.round_half_even(w / safe).clamp(-8, numerics.SIGNED_MAX) * scale.unsqueeze(-1)
        err = (deq - w).square().sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    safe = torch.where(best_scale > 0, best_scale, torch.ones_like(best_scale)).unsqueeze(-1)
    codes = numerics.round_half_even(w / safe).clamp(-8, numerics.SIGNED_MAX)
    codes = torch.where(best_scale.unsqueeze(-1) > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.int8).reshape(n, k), best_scale.t().to(scale_dtype).contiguous()


def quantize_weight_w4a16(weight: torch.Tensor, bias: torch.Tensor | None = None,
                          dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A dense linear's weight [N, K] (any float dtype) as the tensors of a W4A16 layer (natural
    format: qweight, wscales, wzeros in dtype, and bias if given), by numerics.quantize_w4a16."""
    codes, wscales, wzeros = numerics.quantize_w4a16(weight, scale_dtype=dtype)
    out = {"qweight": numerics.pack_int4(codes), "wscales": wscales, "wzeros": wzeros}
    if bias is not None:
        out["bias"] = bias.to(dtype)
    return out


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s[k] = act_absmax^alpha / weight_absmax^(1 - alpha), normalised to geometric mean 1."""
    a = act_absmax.float().clamp_min(1e-5)
    w = weight_absmax.float().clamp_min(1e-5)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    return s / s.log().mean().exp()


def _low_rank(weight: torch.Tensor, rank: int, power_iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors (up [N, r], down [K, r]) of weight [N, K] by randomized truncated SVD.

    A seeded Gaussian range finder with `power_iters` subspace iterations (Halko et al.), then
    an exact SVD of the small projected matrix: a full SVD of a 3072 x 12288 weight costs
    seconds per candidate, this costs milliseconds and converges to the same top-r subspace.
    """
    n, k = weight.shape
    if rank == 0:
        return weight.new_zeros(n, 0), weight.new_zeros(k, 0)
    width = min(rank + 16, n, k)
    gen = torch.Generator(device=weight.device).manual_seed(0)
    q = torch.linalg.qr(weight @ torch.randn(k, width, device=weight.device, generator=gen)).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(weight.t() @ q).Q
        q = torch.linalg.qr(weight @ q).Q
    u, sv, vh = torch.linalg.svd(q.t() @ weight, full_matrices=False)
    return (q @ u[:, :rank]) * sv[:rank], vh[:rank].t()


def _compensated_codes(residual: torch.Tensor, wscales: torch.Tensor, inputs: torch.Tensor,
                       damping: float = COMPENSATION_DAMPING) -> torch.Tensor:
    """INT4 codes [N, K] of residual [N, K] at the fixed group scales wscales [K/64, N], rounded one
    input column at a time, each column's rounding error spread over the columns not yet rounded
    through the inverse (shrunk, damped) Gram matrix of inputs [tokens, K] (GPTQ, Frantar et al. 2022): what
    the quantized path multiplies, so that inputs @ Q(R)^T stays close to inputs @ R^T. Fixed scales
    keep the format's constraints (power-of-two scales included); updated weights beyond a group's
    range are clamped to its codes."""
    n, k = residual.shape
    tokens = inputs.shape[0]
    gram = inputs.t() @ inputs / tokens
    diagonal = gram.diagonal().clone()
    # Ledoit-Wolf shrinkage of the off-diagonal part towards 0: by the sampling noise the tokens
    # leave in it against its size, so that inputs without real correlations (fewer tokens than
    # columns) round to nearest instead of following noise.
    energy = inputs.square()
    off_diagonal = torch.linalg.vector_norm(gram).square() - diagonal.square().sum()
    noise = ((energy.sum(dim=1).square().sum() - energy.square().sum()) / tokens - off_diagonal) / tokens
    gram *= 1.0 - (noise / off_diagonal.clamp_min(1e-30)).clamp(0.0, 1.0)
    gram.diagonal().copy_(diagonal + damping * diagonal.mean().clamp_min(1e-12))
    # Upper Cholesky factor of the inverse Gram matrix, each row divided by its diagonal: row j says
    # how column j's rounding error moves the columns after it.
    spread = torch.linalg.cholesky(gram)
    del gram
    spread = torch.linalg.cholesky(torch.cholesky_inverse(spread), upper=True)
    spread /= spread.diagonal().clone().unsqueeze(1)
    # Columns as contiguous rows, a few in-place ops per column: on a GPU the loop over K columns
    # costs kernel launches, not arithmetic.
    w = residual.t().contiguous()
    scale = wscales.float().repeat_interleave(GROUP_SIZE, dim=0)  # [K, N]
    inverse = torch.where(scale > 0, torch.reciprocal(scale), torch.zeros_like(scale))  # code 0 where the scale is 0
    codes = torch.empty_like(w)
    errors = w.new_empty(GROUP_SIZE, n)
    for start in range(0, k, GROUP_SIZE):
        end = start + GROUP_SIZE
        block = spread[start:end, start:end]
        for i, j in enumerate(range(start, end)):
            torch.mul(w[j], inverse[j], out=codes[j])
            codes[j].round_().clamp_(-8, numerics.SIGNED_MAX)  # round half to even, as numerics rounds
            torch.addcmul(w[j], codes[j], scale[j], value=-1.0, out=errors[i])
            w[j + 1:end].addr_(block[i, i + 1:], errors[i], alpha=-1.0)
        w[end:].addmm_(spread[start:end, end:].t(), errors, alpha=-1.0)
    return codes.t()


@dataclass
class _Rotation:
    """A layer's group rotation as the quantizer applies it: the stored tensor, its matrix M (float32)
    and the groups it turns (the signed ones)."""

    tensor: torch.Tensor | None  # None while a rotation is being learned (only `turned` is used then)
    matrix: torch.Tensor
    groups: torch.Tensor

    @classmethod
    def of(cls, rotation: torch.Tensor | None, unsigned: torch.Tensor) -> "_Rotation | None":
        if rotation is None:
            return None
        matrix = numerics.rotation_matrix(rotation).float().to(unsigned.device)
        return cls(rotation.float().cpu(), matrix, ~unsigned)

    def turned(self, r: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """r [rows, K] with the columns of each turned group times M (inverse: times M^T): the residual
        in the rotated frame (M orthogonal), or activations rotated in float32 without the kernel's
        rounding order (what the straight-through learning differentiates)."""
        g = r.reshape(r.shape[0], -1, GROUP_SIZE)
        turned = g @ (self.matrix.t() if inverse else self.matrix)
        return torch.where(self.groups.view(1, -1, 1), turned, g).reshape(r.shape)

    def activations(self, v: torch.Tensor) -> torch.Tensor:
        """v [tokens, K] rotated as kernel 1 rotates it (numerics.rotate_groups)."""
        return numerics.rotate_groups(v, self.tensor, self.groups)


def _turned(r: torch.Tensor, rotation: _Rotation | None, inverse: bool = False) -> torch.Tensor:
    return r if rotation is None else rotation.turned(r, inverse)


def _butterfly_matrix(angles: torch.Tensor) -> torch.Tensor:
    """numerics.rotation_matrix(numerics.butterfly_rotation(angles)) in float32 on angles' device,
    differentiable in the angles [6P, 32]."""
    columns = torch.arange(GROUP_SIZE, device=angles.device)
    m = torch.eye(GROUP_SIZE, device=angles.device)
    for stage in range(angles.shape[0]):
        s = stage % numerics.ROTATION_STAGES
        pair = (columns & ((1 << s) - 1)) | ((columns >> (s + 1)) << s)
        t = angles[stage, pair]
        high = (columns >> s & 1).bool()
        m = m * torch.cos(t) + m[:, columns ^ (1 << s)] * torch.where(high, torch.sin(t), -torch.sin(t))
    return m


def _decompose(w: torch.Tensor, s: torch.Tensor, rank: int, power_iters: int, dtype: torch.dtype,
               pow2: bool = False, refine_rounds: int = 0, inputs: torch.Tensor | None = None,
               rotation: _Rotation | None = None):
    """Split w * s into a rank-r branch and an INT4 residual; low-rank factors rounded to dtype.

    refine_rounds: after the first split, the branch is refitted that many times to what the
    quantized residual leaves (rank-r SVD of w * s - Q(R)) and the residual requantized.
    inputs: what the quantized path multiplies by the residual on the calibration tokens [tokens, K]
    (the dequantized activations less h / s, which the bias' removes); where given, the final
    residual's codes are rounded with error compensation on them (_compensated_codes).
    rotation: the residual is quantized in the rotated frame (codes and scales of R M)."""
    w_s = w * s
    up, down_s = _low_rank(w_s, rank, power_iters)
    codes, wscales = quantize_weight_int4(_turned(w_s - up @ down_s.t(), rotation), scale_dtype=dtype,
                                          pow2_scales=pow2)
    for _ in range(refine_rounds if rank else 0):
        quantized = _turned(numerics.dequantize_groups(codes, wscales.t()), rotation, inverse=True)
        up, down_s = _low_rank(w_s - quantized, rank, power_iters)
        codes, wscales = quantize_weight_int4(_turned(w_s - up @ down_s.t(), rotation), scale_dtype=dtype,
                                              pow2_scales=pow2)
    lora_down = (down_s / s.unsqueeze(1)).to(dtype).float()
    up = up.to(dtype).float()
    if inputs is not None:
        # the residual the 16-bit branch leaves as stored (its factors rounded to dtype)
        residual = _turned(w_s - up @ (lora_down * s.unsqueeze(1)).t(), rotation)
        codes = _compensated_codes(residual, wscales, inputs).to(torch.int8)
    return codes, wscales, lora_down, up


def _ste_quantize_groups(v: torch.Tensor, unsigned: torch.Tensor) -> torch.Tensor:
    """v [rows, K] quantized per (row, group of 64) at absmax / 7 (unsigned groups: clamped at 0,
    absmax / 15) and dequantized, rounding passed straight through to the gradient; float32 scales
    (the stored scales' 16-bit rounding is left out of the learning)."""
    rows, k = v.shape
    g = v.reshape(rows, k // GROUP_SIZE, GROUP_SIZE)
    u = unsigned.view(1, -1, 1)
    g = torch.where(u, g.clamp_min(0.0), g)
    top = torch.where(u, float(numerics.UNSIGNED_MAX), float(numerics.SIGNED_MAX))
    scale = g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / top
    scaled = g / scale
    codes = scaled + (torch.round(scaled) - scaled).detach()
    codes = torch.maximum(torch.minimum(codes, top), torch.where(u, 0.0, -8.0))
    return (codes * scale).reshape(rows, k)


def _outside_inference(*tensors):
    """The tensors, those made in inference mode copied: ComfyUI runs nodes in inference mode, whose
    tensors autograd cannot record (the CLI's need no copy)."""
    return tuple(t.clone() if t is not None and t.is_inference() else t for t in tensors)


def _ste_output_error(v, shift, unsigned, residual, target, s, rotation: _Rotation | None) -> torch.Tensor:
    """The mean squared output error on the calibration tokens of the quantized path that splits the
    residual W - L [N, K] between v / s (v = x + h) and (W - L) * s, both quantized (in the rotated
    frame where a rotation is given) with the rounding passed straight through; target = x (W - L)^T.
    The rotation turns only unshifted groups, so the shift's share is never turned."""
    act = _ste_quantize_groups(_turned(v / s, rotation), unsigned)
    if shift is not None:
        act = act - shift / s
    no_groups = torch.zeros(residual.shape[1] // GROUP_SIZE, dtype=torch.bool, device=residual.device)
    return (act @ _ste_quantize_groups(_turned(residual * s, rotation), no_groups).t() - target).square().mean()


def _least_error(parameter: torch.Tensor, rate: float, steps: int, error) -> torch.Tensor:
    """`steps` Adam steps at `rate` on the leaf tensor `parameter` for the scalar error(parameter);
    returns the parameter's value (detached) of the least error seen, the start included."""
    optimizer = torch.optim.Adam([parameter], lr=rate)
    best_err, best = None, parameter.detach().clone()
    for step in range(steps + 1):
        err = error(parameter)
        if best_err is None or err.item() < best_err:
            best_err, best = err.item(), parameter.detach().clone()
        if step == steps:
            break
        optimizer.zero_grad()
        err.backward()
        optimizer.step()
    return best


def _learned_smoothing(w, x, s, shift, unsigned, lora_down, lora_up, steps: int,
                       rotation: _Rotation | None = None) -> torch.Tensor:
    """s [K] refined per channel by `steps` Adam steps on the calibration tokens' output error of the
    quantized path (_ste_output_error), the branch (lora_down, lora_up, unsmoothed) held fixed
    (OmniQuant's learnable equivalent transformation, scaling only). Returns the s of the least error
    seen."""
    with torch.inference_mode(False), torch.enable_grad():
        w, x, s, unsigned, lora_down, lora_up, shift = _outside_inference(w, x, s, unsigned, lora_down, lora_up,
                                                                          shift)
        if rotation is not None:
            rotation = _Rotation(*_outside_inference(rotation.tensor, rotation.matrix, rotation.groups))
        residual = w - lora_up @ lora_down.t()
        target = x @ residual.t()
        v = x if shift is None else x + shift
        offset = _least_error(torch.zeros_like(s, requires_grad=True), LEARNED_SMOOTHING_RATE, steps,
                              lambda offset: _ste_output_error(v, shift, unsigned, residual, target,
                                                               s * offset.exp(), rotation))
    return s * offset.exp()


def _learned_rotation(w, x, s, shift, unsigned, lora_down, lora_up, steps: int) -> torch.Tensor:
    """The rotation tensor (numerics.butterfly_rotation) of the butterfly angles (LEARNED_ROTATION_PASSES
    passes) learned by `steps` Adam steps from the first pass at pi/4 and the others at 0 (the
    Hadamard's error: passes of pi/4 would be another matrix) on the calibration tokens' output error
    of the quantized path (_ste_output_error), s and the branch held fixed. Returns the least error's."""
    with torch.inference_mode(False), torch.enable_grad():
        w, x, s, unsigned, lora_down, lora_up, shift = _outside_inference(w, x, s, unsigned, lora_down, lora_up,
                                                                          shift)
        residual = w - lora_up @ lora_down.t()
        # (W - L) * s / s, not W - L: the target the measured learned rotations were learned on
        # (bench/NOTES.md#fidelity-rotation); the learning follows differences in the last bit
        target = x @ (residual * s / s).t()
        v = x if shift is None else x + shift
        angles = torch.zeros(LEARNED_ROTATION_PASSES * numerics.ROTATION_STAGES, GROUP_SIZE // 2, device=w.device)
        angles[:numerics.ROTATION_STAGES] = torch.pi / 4
        best = _least_error(angles.requires_grad_(True), LEARNED_ROTATION_RATE, steps,
                            lambda angles: _ste_output_error(v, shift, unsigned, residual, target, s,
                                                             _Rotation(None, _butterfly_matrix(angles), ~unsigned)))
    return numerics.butterfly_rotation(best.cpu())


def _dequantized_activations(x, smooth, shift, unsigned, dtype, pow2=False, rotation=None) -> torch.Tensor:
    """The quantized path's activations as the engine quantizes them, dequantized to float32
    [tokens, K]: INT4 codes of (x + h) / s (its signed groups rotated where rotation is given) times
    their scales.

    pow2: with the restricted activation scales, which a file of power-of-two weight scales turns on
    for its layers at load (file_options.apply_file_options)."""
    v = x.float() if shift is None else x.float() + shift
    if pow2:
        v = v * torch.reciprocal(smooth)
        v = v if rotation is None else rotation.activations(v)
        codes, top, exps = numerics.quantize_groups_pow2(v, unsigned, scale_dtype=dtype)
        return numerics.dequantize_groups(codes, numerics.pow2_scales(top, exps))
    v = v / smooth
    v = v if rotation is None else rotation.activations(v)
    codes, scales = numerics.quantize_groups(v, unsigned, scale_dtype=dtype)
    return numerics.dequantize_groups(codes, scales)


def _simulate(x, weight_codes, wscales, lora_down, lora_up, smooth, shift, unsigned, dtype, pow2=False,
              rotation=None):
    """Fake-quantized forward in float32 (dequantized operands): what the layer will compute, less
    its bias' (for shifted inputs it still holds the (R_q / s) @ h that the bias' removes). With a
    rotation both operands of the product are in the rotated frame."""
    act = _dequantized_activations(x, smooth, shift, unsigned, dtype, pow2, rotation)
    w = numerics.dequantize_groups(weight_codes, wscales.t())
    return act @ w.t() + (x.float() @ lora_down) @ lora_up.t()


def quantize_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    calibration: torch.Tensor,
    rank: int = 32,
    shift: torch.Tensor | None = None,
    smooth: bool = True,
    alphas=DEFAULT_ALPHAS,
    dtype: torch.dtype = torch.bfloat16,
    pow2_scales: bool = False,
    refine_rounds: int = REFINE_ROUNDS,
    compensate: bool = True,
    smoothing_steps: int = 0,
    rotation: str = DEFAULT_ROTATION,
) -> W4A4Tensors:
    """Quantize one linear layer (weight [N, K], bias [N] or None) with SVDQuant.

    calibration: inputs the layer sees, [tokens, K] (at most MAX_CALIBRATION_TOKENS are used,
    evenly spaced). shift: [K] input shift for unsigned groups (post-GELU inputs), or None.
    smooth=False keeps s = 1; rank=0 drops the low-rank branch. pow2_scales: power-of-two weight
    group scales (quantize_weight_int4's pow2_scales), the format of the Hopper fast path; the
    smoothing search then simulates the restricted activation scales the layer runs with. Returns
    the natural tensors in `dtype`. Everything runs on weight's device, in float32.
    refine_rounds: _decompose's, in the final decomposition (the smoothing search compares
    unrefined splits; 0 gives SVDQuant's own split). compensate: the final residual's codes rounded
    with error compensation on the calibration inputs (_compensated_codes) instead of to nearest.
    smoothing_steps: after the search, s refined per channel by that many gradient steps on the
    calibration output error (_learned_smoothing; LEARNED_SMOOTHING_STEPS is the tested setting),
    then the final split made for it; 0 (the default) keeps the searched s.
    rotation: one of ROTATIONS, the group rotation of the signed input groups (numerics.rotate_groups),
    stored with the layer; every step above then works in the rotated frame ("learned": the search and
    the learned smoothing with the Hadamard, then the butterfly learned (_learned_rotation) before the
    final split). A layer with no signed group gets none.
    """
    n, k = weight.shape
    if k % GROUP_SIZE:
        raise ValueError(f"input width {k} is not a multiple of {GROUP_SIZE}")
    if not 0 <= rank <= min(n, k):
        raise ValueError(f"rank {rank} out of range for a {n}x{k} layer")
    if rotation not in ROTATIONS:
        raise ValueError(f"unknown rotation {rotation!r} (one of {', '.join(ROTATIONS)})")
    device = weight.device
    w = weight.float()
    x = calibration.reshape(-1, k).to(device=device, dtype=torch.float32)
    if x.shape[0] > MAX_CALIBRATION_TOKENS:
        x = x[torch.linspace(0, x.shape[0] - 1, MAX_CALIBRATION_TOKENS, device=device).long()]
    h = None if shift is None else shift.to(device=device, dtype=torch.float32)
    unsigned = numerics.unsigned_groups_from_shift(h, k).to(device)
    # the learned rotation starts where the Hadamard is: the smoothing search and learning run with it
    turn = (_Rotation.of(numerics.hadamard_rotation(), unsigned)
            if rotation != "none" and not bool(unsigned.all()) else None)
    reference = x @ w.t()

    x_in = x if h is None else x + h
    act_absmax = x_in.abs().amax(dim=0)
    weight_absmax = w.abs().amax(dim=0)
    candidates = alphas if smooth else (None,)
    best_err, best_s = None, None
    for alpha in candidates:
        s = torch.ones(k, device=device) if alpha is None else smoothing_factors(act_absmax, weight_absmax, alpha)
        s = s.to(dtype).float()  # the stored smooth is what the engine divides by
        parts = _decompose(w, s, rank, SEARCH_POWER_ITERS, dtype, pow2_scales, rotation=turn)
        err = (_simulate(x, *parts, s, h, unsigned, dtype, pow2_scales, turn) - reference).square().sum()
        if best_err is None or err < best_err:
            best_err, best_s = err, s
    s = best_s
    if smoothing_steps and smooth:
        _, _, lora_down, lora_up = _decompose(w, s, rank, FINAL_POWER_ITERS, dtype, pow2_scales, refine_rounds,
                                              rotation=turn)
        s = _learned_smoothing(w, x, s, h, unsigned, lora_down, lora_up, smoothing_steps,
                               turn).to(dtype).float()
    if rotation == "learned" and turn is not None:
        _, _, lora_down, lora_up = _decompose(w, s, rank, FINAL_POWER_ITERS, dtype, pow2_scales, refine_rounds,
                                              rotation=turn)
        turn = _Rotation.of(_learned_rotation(w, x, s, h, unsigned, lora_down, lora_up, LEARNED_ROTATION_STEPS),
                            unsigned)
    inputs = None
    if compensate:
        inputs = _dequantized_activations(x, s, h, unsigned, dtype, pow2_scales, turn)
        if h is not None:  # h is 0 in the rotated groups, so h / s needs no turning
            inputs -= h / s
    codes, wscales, lora_down, lora_up = _decompose(w, s, rank, FINAL_POWER_ITERS, dtype, pow2_scales, refine_rounds,
                                                    inputs, turn)

    b = torch.zeros(n, device=device) if bias is None else bias.float()
    if h is not None:  # h is 0 in the rotated groups: their (turned) residual columns add nothing
        residual_q = numerics.dequantize_groups(codes, wscales.t())
        b = b - (residual_q / s) @ h
    has_bias = bias is not None or h is not None
    return W4A4Tensors(
        qweight=numerics.pack_int4(codes),
        wscales=wscales,
        smooth=s.to(dtype),
        lora_down=lora_down.to(dtype),
        lora_up=lora_up.to(dtype),
        bias=b.to(dtype) if has_bias else None,
        shift=None if h is None else h.to(dtype),
        rotation=None if turn is None else turn.tensor,
    )


def relative_output_error(layer: W4A4Tensors, weight: torch.Tensor, bias: torch.Tensor | None,
                          x: torch.Tensor, pow2_scales: bool = False) -> float:
    """||y_q - y|| / ||y|| on inputs x [tokens, K]: y_q what the quantized layer computes (its
    stored tensors; with pow2_scales the power-of-two activation scales such a file runs with),
    from dequantized float32 operands; y = x W^T + bias in float32. On weight's device."""
    device, dtype = weight.device, layer.smooth.dtype
    x = x.to(device=device, dtype=torch.float32)
    shift = None if layer.shift is None else layer.shift.float()
    unsigned = numerics.unsigned_groups_from_shift(shift, x.shape[1]).to(device)
    codes = numerics.unpack_int4(layer.qweight, signed=True)
    out = _simulate(x, codes, layer.wscales, layer.lora_down.float(), layer.lora_up.float(), layer.smooth.float(),
                    shift, unsigned, dtype, pow2_scales, _Rotation.of(layer.rotation, unsigned))
    if layer.bias is not None:
        out += layer.bias.float()
    ref = x @ weight.float().t()
    if bias is not None:
        ref += bias.float()
    return float((out - ref).norm() / ref.norm())
