"""W4A4 GEMM benchmark on the GPU: cuBLAS bf16, FP8 scaled_mm, and our sm_90a kernels, side by side.

    python bench/gemm.py [--json PATH] [--tokens M ...] [--shapes-only | --bands]

Rows: the FLUX.1 linear shapes of shared/REFERENCE.md at M = 4608 (1024x1024 image + 512 text
tokens), and M = 256 and 1024 for small images; the K = 12288 and 15360 layers have FLUX's shifted
(unsigned) GELU input columns. Columns (median time per call):
  bf16      cuBLAS `a @ b.t()` in bf16
  fp8       torch._scaled_mm e4m3 with rowwise scales (fp8f: with fast accumulation)
  exact path (any weight scales, design (a)), rank 32:
    k2      kernel 2 alone (W4A4 GEMM + low-rank up + bias), inputs from kernel 1
    k1      kernel 1 alone (quantize + low-rank down)
    k1+k2   both (what a layer costs); lr: low-rank share, k1+k2 at rank 32 over rank 0, minus 1
    k2d, k1+k2d: the same weights with power-of-two activation scales (design (d) alone: kernel 1
            in pow2 mode, kernel 2 with per-token scales, one FMA per accumulator per group)
  fast path (power-of-two weight and activation scales, designs (c) + (d)), rank 32:
    k2f     fast kernel 2 alone (INT8 tensor cores, exact int32 sums over K), token tile and
            half tiles chosen by M and N (t128 / t256: every tile of that size)
    k1p     kernel 1 in pow2 mode alone
    k1+k2f  both; lrf: low-rank share
  group rotation (issue 15: kernel 1 rotates each signed 64-group by numerics.hadamard_rotation; the
  same layers and inputs), each with its cost over the unrotated time in %:
    k1r, k1+k2r     kernel 1 alone and the whole layer, exact path
    k1pr, k1+k2fr   kernel 1 in pow2 mode alone and the whole layer, fast path
    k1g, k1pg       kernel 1 alone (exact, pow2 mode) with a random butterfly instead: the
                    coefficient path that rotations other than the Hadamard one take
    k1g2, k1pg2     the same with a random butterfly of two passes (12 stages, as the quantizer's
                    learned rotation)
A LoRA row set at M = 4608, N = K = 3072 times the fast k1+k2 at ranks 32, 32+64 and 32+64+128; a
GELU row set times the fast kernel 2 of the layers that feed a GELU with it fused into the epilogue
and followed by PyTorch's; an accuracy row gives the fast kernel 2's relative error against float64;
a host row gives the time Python takes to issue one layer call (svdquant/families/sm90.py through
svdquant.cuda) at M = 256, against the GPU time of the call (--shapes-only: the FLUX shape rows alone).
--bands instead times the fast kernel 2 alone per FLUX shape with its whole tiles in bands of 1, 2, 3, 4, 6,
9 and all token rows ("chosen": the band sm90.make_schedule picks), beside cuBLAS bf16 and FP8 with
fast accumulation.
Every variant is timed as CUDA-graph replays of back-to-back calls cycling through enough input
sets (>= 3x the L2 size) that no operand stays in L2; TOPS count 2*M*N*K.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from record import write_result  # noqa: E402
from svdquant import kernels, numerics  # noqa: E402
from svdquant.families import sm90  # noqa: E402
from svdquant.linear import SVDQLinear  # noqa: E402

# (N, K) of the FLUX.1 linears: proj, qkv, mlp up, mlp down, single-block qkv+mlp, single-block proj
FLUX_SHAPES = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (21504, 3072), (3072, 15360)]
TOKENS = [4608, 256, 1024]
RANK = 32
LORA_RANKS = [32, 32 + 64, 32 + 64 + 128]
# (N, first GELU channel) of the FLUX layers whose output feeds a GELU: the double blocks' MLP input
# layer (the one flux.fusion.fuse_mlp_gelu fuses), and the single blocks' linear1, whose columns after q, k, v
# are the MLP's
GELU_LAYERS = [(12288, 0), (21504, 9216)]


def time_calls(calls, target_ms: float = 30.0, replays: int = 10) -> float:
    """Median time of one call (ms): CUDA-graph replays of the calls, cycled."""
    for call in calls:  # warm-up: cuBLAS handles, kernel attributes
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for call in calls:
        call()
    end.record()
    end.synchronize()
    per_call = start.elapsed_time(end) / len(calls)
    rounds = max(1, min(200, math.ceil(target_ms / max(per_call, 1e-3) / len(calls))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for call in calls:
                call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (rounds * len(calls)))
    del graph
    return statistics.median(times)


# Where a FLUX linear's input is shifted (GELU output, quantized unsigned): from this input column
# on, for the MLP down projections (K = 12288) and the single blocks' output linear (K = 15360:
# [attention 3072 | MLP 12288]).
FLUX_SHIFT_FROM = {12288: 0, 15360: 3072}


def random_layer(n: int, k: int, rank: int, gen: torch.Generator, pow2: bool = False,
                 dtype: torch.dtype = torch.bfloat16) -> SVDQLinear:
    """Random SVDQuant layer; pow2: power-of-two weight scales (the fast path's format). Input
    columns shift like the FLUX layer with this K (FLUX_SHIFT_FROM)."""
    dev = "cuda"
    if pow2:  # bases large enough that base * 2^-4 is exact in fp16 too
        base = (torch.rand(n, generator=gen, device=dev) * 0.02 + 0.04).to(dtype).float()
        exps = torch.randint(0, numerics.POW2_WEIGHT_MAX_EXP + 1, (k // 64, n), generator=gen, device=dev)
        wscales = (base * torch.exp2(-exps.float())).to(dtype)
    else:
        wscales = (torch.rand(k // 64, n, generator=gen, device=dev) * 0.02 + 1e-3).to(dtype)
    layer = SVDQLinear.from_tensors({
        "qweight": torch.randint(0, 256, (n, k // 2), generator=gen, device=dev, dtype=torch.uint8),
        "wscales": wscales,
        "smooth": (torch.rand(k, generator=gen, device=dev) + 0.5).to(dtype),
        "lora_down": (torch.randn(k, rank, generator=gen, device=dev) * 0.05).to(dtype),
        "lora_up": (torch.randn(n, rank, generator=gen, device=dev) * 0.05).to(dtype),
        "bias": torch.randn(n, generator=gen, device=dev).to(dtype),
    } | ({"shift": (torch.arange(k, device=dev) >= FLUX_SHIFT_FROM[k]).to(dtype) * numerics.GELU_SHIFT}
         if k in FLUX_SHIFT_FROM else {}))
    layer.pow2_activations = pow2
    assert layer.pow2_weights == pow2
    return layer


def l2_size() -> int:
    """The GPU's L2 cache in bytes (50 MiB where torch does not say)."""
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)


def input_sets(m: int, n: int, k: int, l2_bytes: int) -> int:
    set_bytes = (m * k + n * k) * 2  # the largest variant's operands (bf16)
    return max(2, min(16, math.ceil(3 * l2_bytes / set_bytes)))


def shape_inputs(m: int, n: int, k: int, l2_bytes: int):
    """What a FLUX shape's row starts from (here and in bench/gemm_sm80.py): the generator seeded by the
    shape, the row with the count of input sets and cuBLAS bf16's time, and each set's bf16 operands
    a [M, K] and b [N, K]. Returns (gen, row, a, b)."""
    gen = torch.Generator(device="cuda").manual_seed(m * 31 + n * 7 + k)
    sets = input_sets(m, n, k, l2_bytes)
    row = {"M": m, "N": n, "K": k, "input_sets": sets}
    a = [torch.randn(m, k, generator=gen, device="cuda").bfloat16() for _ in range(sets)]
    b = [torch.randn(n, k, generator=gen, device="cuda").bfloat16() for _ in range(sets)]
    row["bf16_ms"] = time_calls([lambda i=i: a[i] @ b[i].t() for i in range(sets)])
    return gen, row, a, b


def fp8_times(a: list, b: list, modes=(("fp8_ms", False), ("fp8_fast_ms", True))) -> dict:
    """cuBLAS FP8 (torch._scaled_mm, e4m3 operands, rowwise scales) over the input sets a [M, K] and
    b [N, K]: {key: ms} for each (key, fast accumulation) of modes."""
    (m, _), n = a[0].shape, b[0].shape[0]
    a8 = [t.to(torch.float8_e4m3fn) for t in a]
    b8 = [t.to(torch.float8_e4m3fn) for t in b]
    sa = torch.rand(m, 1, device="cuda") + 0.5
    sb = torch.rand(1, n, device="cuda") + 0.5
    return {key: time_calls([lambda i=i: torch._scaled_mm(a8[i], b8[i].t(), scale_a=sa, scale_b=sb,
                                                           out_dtype=torch.bfloat16, use_fast_accum=fast)
                             for i in range(len(a))])
            for key, fast in modes}


def fast_kernel2(a: list, n: int, k: int, gen: torch.Generator):
    """The fast kernel 2 over the input sets a: a random rank-RANK power-of-two layer per set, kernel 1
    run once on each; returns k2(i, **options), sm90.w4a4_gemm_pow2 on set i's operands."""
    layers = [random_layer(n, k, RANK, gen, pow2=True) for _ in a]
    ops = [lay.w4a4_kernel() for lay in layers]
    stage1 = [sm90.act_quant(x, *sm90.kernel1_inputs(op), True, True) for x, op in zip(a, ops)]
    weights = [sm90.pow2_weight_operands(op) for op in ops]

    def k2(i: int, **options):
        lay = layers[i]
        return sm90.w4a4_gemm_pow2(*stage1[i], lay.qweight, *weights[i], lay.lora_up, lay.bias, **options)

    return k2


def bench_shape(m: int, n: int, k: int, l2_bytes: int) -> dict:
    gen, row, a, b = shape_inputs(m, n, k, l2_bytes)
    sets, flops = row["input_sets"], 2.0 * m * n * k

    row.update(fp8_times(a, b))
    del b

    rotation = numerics.hadamard_rotation().cuda()
    angles = torch.rand(2 * numerics.ROTATION_STAGES, numerics.GROUP_SIZE // 2,
                        generator=torch.Generator().manual_seed(1)) * 2 * math.pi
    # kernel 1 with the Hadamard rotation (its own path) and with random butterflies of one and two
    # passes (the coefficient path)
    rotations = {"rot": kernels.kernel1_rotation(rotation, rotation.device),
                 "general": kernels.kernel1_rotation(numerics.butterfly_rotation(angles[:numerics.ROTATION_STAGES]),
                                                     rotation.device),
                 "general2": kernels.kernel1_rotation(numerics.butterfly_rotation(angles), rotation.device)}
    for tag, pow2 in (("", False), ("f", True)):
        layers = [random_layer(n, k, RANK, gen, pow2) for _ in range(sets)]
        layers0 = [random_layer(n, k, 0, gen, pow2) for _ in range(sets)]
        ops, ops0 = [lay.w4a4_kernel() for lay in layers], [lay.w4a4_kernel() for lay in layers0]

        def k1(i):
            return sm90.act_quant(a[i], *sm90.kernel1_inputs(ops[i]), pow2, pow2)

        stage1 = [k1(i) for i in range(sets)]

        def k2(i, tile_t=0, half_rows=-1):
            codes, ascales, lora_act = stage1[i]
            lay = layers[i]
            if pow2:
                wexp, wbase = sm90.pow2_weight_operands(ops[i])
                return sm90.w4a4_gemm_pow2(codes, ascales, lora_act, lay.qweight, wexp, wbase, lay.lora_up, lay.bias,
                                           None, tile_t, half_rows)
            return sm90.w4a4_gemm(codes, ascales, lora_act, lay.qweight, lay.wscales, lay.lora_up, lay.bias)

        k1_key = "k1p" if pow2 else "k1"
        row[f"k2{tag}_ms"] = time_calls([lambda i=i: k2(i) for i in range(sets)])
        if pow2:
            for tile_t in (128, 256):  # every tile of one size (no half tiles)
                row[f"k2f_t{tile_t}_ms"] = time_calls([lambda i=i: k2(i, tile_t, 0) for i in range(sets)])
        row[f"{k1_key}_ms"] = time_calls([lambda i=i: k1(i) for i in range(sets)])
        for name, kernel1_rotation in rotations.items():
            row[f"{k1_key}_{name}_ms"] = time_calls([lambda i=i: sm90.act_quant(
                a[i], *sm90.kernel1_inputs(ops[i]), pow2, pow2, kernel1_rotation) for i in range(sets)])
            row[f"{k1_key}_{name}_share"] = row[f"{k1_key}_{name}_ms"] / row[f"{k1_key}_ms"] - 1.0
        if not pow2:  # design (d) alone on the same layers
            stage1_pow2 = [sm90.act_quant(a[i], *sm90.kernel1_inputs(ops[i]), True) for i in range(sets)]
            row["k2d_ms"] = time_calls([lambda i=i: sm90.w4a4_gemm(
                *stage1_pow2[i], layers[i].qweight, layers[i].wscales, layers[i].lora_up, layers[i].bias)
                for i in range(sets)])
            for lay in layers:
                lay.pow2_activations = True
            ops_pow2_act = [lay.w4a4_kernel() for lay in layers]
            row["k1k2d_ms"] = time_calls([lambda i=i: sm90.svdq_linear(a[i], ops_pow2_act[i])
                                          for i in range(sets)])
            for lay in layers:
                lay.pow2_activations = False
            del stage1_pow2, ops_pow2_act
        row[f"k1k2{tag}_ms"] = time_calls([lambda i=i: sm90.svdq_linear(a[i], ops[i])
                                           for i in range(sets)])
        row[f"k1k2{tag}_r0_ms"] = time_calls([lambda i=i: sm90.svdq_linear(a[i], ops0[i])
                                              for i in range(sets)])
        row[f"lowrank{tag}_share"] = row[f"k1k2{tag}_ms"] / row[f"k1k2{tag}_r0_ms"] - 1.0
        for lay in layers:  # the same layers with a group rotation
            lay.rotation = rotation
        ops_rot = [lay.w4a4_kernel() for lay in layers]
        row[f"k1k2{tag}_rot_ms"] = time_calls([lambda i=i: sm90.svdq_linear(a[i], ops_rot[i]) for i in range(sets)])
        row[f"k1k2{tag}_rot_share"] = row[f"k1k2{tag}_rot_ms"] / row[f"k1k2{tag}_ms"] - 1.0
        del layers, layers0, ops, ops0, ops_rot, stage1

    for key in ("bf16", "fp8", "fp8_fast", "k2", "k1k2", "k2d", "k1k2d", "k2f", "k1k2f"):
        row[key + "_tops"] = flops / (row[key + "_ms"] * 1e-3) / 1e12
    for key in ("k2", "k1k2", "k2d", "k1k2d", "k2f", "k1k2f"):
        row[key + "_speedup_vs_bf16"] = row["bf16_ms"] / row[key + "_ms"]
    del a
    torch.cuda.empty_cache()
    return row


def bench_lora(m: int, n: int, k: int, l2_bytes: int) -> dict:
    """Fast k1+k2 at rank 32 (the model's own branch) and with LoRAs concatenated onto it."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    sets = input_sets(m, n, k, l2_bytes)
    a = [torch.randn(m, k, generator=gen, device="cuda").bfloat16() for _ in range(sets)]
    row = {"M": m, "N": n, "K": k, "input_sets": sets}
    for rank in LORA_RANKS:
        ops = [random_layer(n, k, rank, gen, pow2=True).w4a4_kernel() for _ in range(sets)]
        row[f"k1k2f_r{rank}_ms"] = time_calls([lambda i=i: sm90.svdq_linear(a[i], ops[i])
                                               for i in range(sets)])
        del ops
    torch.cuda.empty_cache()
    return row


def bench_gelu(m: int, n: int, k: int, gelu_from: int, l2_bytes: int) -> dict:
    """An MLP input layer (fast path, rank 32) whose output channels from gelu_from on feed a tanh
    GELU: the GELU fused into kernel 2's epilogue against kernel 2 followed by PyTorch's GELU."""
    gen = torch.Generator(device="cuda").manual_seed(13)
    sets = input_sets(m, n, k, l2_bytes)
    a = [torch.randn(m, k, generator=gen, device="cuda").bfloat16() for _ in range(sets)]
    k2 = fast_kernel2(a, n, k, gen)
    row = {"M": m, "N": n, "K": k, "gelu_from": gelu_from, "input_sets": sets}
    row["k2f_ms"] = time_calls([lambda i=i: k2(i) for i in range(sets)])
    row["k2f_gelu_fused_ms"] = time_calls([lambda i=i: k2(i, gelu_from=gelu_from) for i in range(sets)])
    row["k2f_then_torch_gelu_ms"] = time_calls([
        lambda i=i: torch.nn.functional.gelu(k2(i)[:, gelu_from:], approximate="tanh") for i in range(sets)])
    del a, k2
    torch.cuda.empty_cache()
    return row


def fast_path_error(m: int, n: int, k: int) -> dict:
    """Relative error of the fast kernel 2 against float64 on the same operands; fp16 output, whose
    rounding (rel_err_fp16_output) is 8x finer than bf16's."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(m, k, generator=gen, device="cuda").half()
    layer = random_layer(n, k, 0, gen, pow2=True, dtype=torch.float16)
    op = layer.w4a4_kernel()
    codes, atok, lora_act = sm90.act_quant(x, *sm90.kernel1_inputs(op), True, True)
    wexp, wbase = sm90.pow2_weight_operands(op)
    a = sm90.act_operands_to_natural(codes, int8_operands=True).double()
    w = numerics.unpack_int4(layer.qweight, signed=True).double() * torch.exp2(
        -wexp[:, :n].double()).t().repeat_interleave(64, dim=1)
    ref = atok[0, :m].double()[:, None] * (a @ w.t()) * wbase.double()[None, :] + layer.bias.double()
    row = {"M": m, "N": n, "K": k}
    y = sm90.w4a4_gemm_pow2(codes, atok, lora_act, layer.qweight, wexp, wbase, layer.lora_up, layer.bias, None)
    row["rel_err"] = float((y.double() - ref).norm() / ref.norm())
    row["rel_err_fp16_output"] = float((ref.half().double() - ref).norm() / ref.norm())  # rounding alone
    return row


BAND_ROWS = [1, 2, 3, 4, 6, 9, 1000]  # token rows per band of the fast kernel 2's schedule (1000: one band)


def bench_bands(m: int, n: int, k: int, l2_bytes: int) -> dict:
    """The fast kernel 2 alone with its whole tiles in bands of token rows (BAND_ROWS, then as chosen: 0;
    token tile and half tiles as chosen), next to cuBLAS bf16 and FP8 with fast accumulation."""
    gen, row, a, b = shape_inputs(m, n, k, l2_bytes)
    row.update(fp8_times(a, b, (("fp8_fast_ms", True),)))
    del b
    k2 = fast_kernel2(a, n, k, gen)
    for rows in (*BAND_ROWS, 0):
        row[f"k2f_b{rows}_ms" if rows else "k2f_ms"] = time_calls([lambda i=i, rows=rows: k2(i, band_rows=rows)
                                                                    for i in range(len(a))])
    del a, k2
    torch.cuda.empty_cache()
    return row


def host_time(m: int, n: int, k: int, calls: int = 200) -> dict:
    """Host time to issue one layer call (fast and exact path: kernel 1 + kernel 2 launches, checks,
    tensor maps) with the GPU idle ahead of it, against the call's GPU time (CUDA-graph replay)."""
    gen = torch.Generator(device="cuda").manual_seed(17)
    x = torch.randn(m, k, generator=gen, device="cuda").bfloat16()
    row = {"M": m, "N": n, "K": k, "calls": calls}
    for tag, pow2 in (("", False), ("f", True)):
        op = random_layer(n, k, RANK, gen, pow2).w4a4_kernel()
        row[f"k1k2{tag}_gpu_ms"] = time_calls([lambda: sm90.svdq_linear(x, op)])
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):  # fewer launches than the launch queue holds: the host never waits
            sm90.svdq_linear(x, op)
        row[f"k1k2{tag}_host_ms"] = (time.perf_counter() - start) * 1e3 / calls
        torch.cuda.synchronize()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "bench/results"), "gemm.json"))
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--shapes-only", action="store_true",
                        help="only the FLUX shape rows (no LoRA, GELU, accuracy and host rows)")
    parser.add_argument("--bands", action="store_true",
                        help="only the fast kernel 2 with its tiles in bands of token rows (BAND_ROWS), per FLUX shape")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        sys.exit("bench/gemm.py needs an sm_90 GPU")
    l2_bytes = l2_size()
    rows = []
    method = "CUDA-graph replay of back-to-back calls over rotating input sets (>= 3x L2), median of 10"
    if args.bands:
        print(f"{'M':>5} {'N':>6} {'K':>6} | {'bf16 us':>8} {'fp8f us':>8} | k2f us, bands of "
              + " ".join(f"{b:>7}" for b in BAND_ROWS) + f" | {'chosen':>7}", flush=True)
        for m in args.tokens:
            for n, k in FLUX_SHAPES:
                r = bench_bands(m, n, k, l2_bytes)
                rows.append(r)
                print(f"{m:>5} {n:>6} {k:>6} | {r['bf16_ms'] * 1e3:>8.1f} {r['fp8_fast_ms'] * 1e3:>8.1f} | "
                      + " " * 16 + " ".join(f"{r[f'k2f_b{b}_ms'] * 1e3:>7.1f}" for b in BAND_ROWS)
                      + f" | {r['k2f_ms'] * 1e3:>7.1f}", flush=True)
        write_result(args.json, rank=RANK, method=method, band_rows=BAND_ROWS, rows=rows)
        return
    header = (f"{'M':>5} {'N':>6} {'K':>6} | {'bf16 us':>8} | {'fp8 x':>5} {'fp8f x':>6} | {'k2 us':>7} {'k1 us':>6} "
              f"{'k1+k2':>7} {'x':>5} {'lr%':>5} | {'k2d':>7} {'k1+k2d':>7} | {'k2f us':>7} {'TOPS':>5} "
              f"{'t128':>6} {'t256':>6} "
              f"{'k1p us':>6} {'k1+k2f':>7} {'TOPS':>5} {'x':>5} {'lrf%':>5} | "
              f"{'k1r us':>6} {'%':>5} {'k1+k2r':>7} {'%':>5} {'k1pr us':>7} {'%':>5} {'k1+k2fr':>7} {'%':>5} "
              f"{'k1g us':>6} {'%':>5} {'k1pg us':>7} {'%':>5} {'k1g2 us':>7} {'%':>5} {'k1pg2 us':>8} {'%':>5}")
    print(header, flush=True)
    for m in args.tokens:
        for n, k in FLUX_SHAPES:
            r = bench_shape(m, n, k, l2_bytes)
            rows.append(r)
            print(f"{m:>5} {n:>6} {k:>6} | {r['bf16_ms'] * 1e3:>8.1f} | {r['bf16_ms'] / r['fp8_ms']:>5.2f} "
                  f"{r['bf16_ms'] / r['fp8_fast_ms']:>6.2f} | {r['k2_ms'] * 1e3:>7.1f} {r['k1_ms'] * 1e3:>6.1f} "
                  f"{r['k1k2_ms'] * 1e3:>7.1f} {r['k1k2_speedup_vs_bf16']:>5.2f} {r['lowrank_share'] * 100:>5.1f} | "
                  f"{r['k2d_ms'] * 1e3:>7.1f} {r['k1k2d_ms'] * 1e3:>7.1f} | "
                  f"{r['k2f_ms'] * 1e3:>7.1f} {r['k2f_tops']:>5.0f} "
                  f"{r['k2f_t128_ms'] * 1e3:>6.1f} {r['k2f_t256_ms'] * 1e3:>6.1f} "
                  f"{r['k1p_ms'] * 1e3:>6.1f} {r['k1k2f_ms'] * 1e3:>7.1f} {r['k1k2f_tops']:>5.0f} "
                  f"{r['k1k2f_speedup_vs_bf16']:>5.2f} {r['lowrankf_share'] * 100:>5.1f} | " +
                  " ".join(f"{r[key + '_ms'] * 1e3:>{w}.1f} {r[key + '_share'] * 100:>5.1f}"
                           for key, w in (("k1_rot", 6), ("k1k2_rot", 7), ("k1p_rot", 7), ("k1k2f_rot", 7),
                                          ("k1_general", 6), ("k1p_general", 7), ("k1_general2", 7),
                                          ("k1p_general2", 8))), flush=True)
    if args.shapes_only:
        write_result(args.json, rank=RANK, method=method, rows=rows)
        return
    lora = bench_lora(4608, 3072, 3072, l2_bytes)
    print("LoRA, fast k1+k2 at M=4608 N=K=3072: " +
          ", ".join(f"rank {rank}: {lora[f'k1k2f_r{rank}_ms'] * 1e3:.1f} us" for rank in LORA_RANKS), flush=True)
    gelu = [bench_gelu(4608, n, 3072, gelu_from, l2_bytes) for n, gelu_from in GELU_LAYERS]
    for r in gelu:
        print(f"GELU on channels {r['gelu_from']}.. of M={r['M']} N={r['N']} K={r['K']}: fast k2 "
              f"{r['k2f_ms'] * 1e3:.1f} us, with the GELU fused {r['k2f_gelu_fused_ms'] * 1e3:.1f} us, "
              f"then PyTorch's GELU {r['k2f_then_torch_gelu_ms'] * 1e3:.1f} us", flush=True)
    accuracy = fast_path_error(4608, 3072, 3072)
    print("fast kernel 2 vs float64 at M=4608 N=K=3072: " +
          ", ".join(f"{key} {value:.2e}" for key, value in accuracy.items() if key.startswith("rel_err")), flush=True)
    host = host_time(256, 3072, 3072)
    print(f"host time per layer call at M=256 N=K=3072: exact {host['k1k2_host_ms'] * 1e3:.1f} us "
          f"(GPU {host['k1k2_gpu_ms'] * 1e3:.1f} us), fast {host['k1k2f_host_ms'] * 1e3:.1f} us "
          f"(GPU {host['k1k2f_gpu_ms'] * 1e3:.1f} us)", flush=True)
    write_result(args.json, rank=RANK, method=method, rows=rows, lora=lora, gelu=gelu, fast_path_accuracy=accuracy,
                 host=host)


if __name__ == "__main__":
    main()
