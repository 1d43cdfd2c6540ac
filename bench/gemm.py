"""W4A4 GEMM benchmark on the GPU: cuBLAS bf16, FP8 scaled_mm, and our sm_90a kernels, side by side.

    python bench/gemm.py [--json PATH]

Rows: the FLUX.1 linear shapes of shared/REFERENCE.md at M = 4608 (1024x1024 image + 512 text
tokens), and M = 256 and 1024 for small images. Columns (median time per call):
  bf16      cuBLAS `a @ b.t()` in bf16
  fp8       torch._scaled_mm e4m3 with rowwise scales (fp8f: with fast accumulation)
  k2        our kernel 2 alone (W4A4 GEMM + rank-32 low-rank up + bias), inputs from kernel 1
  k1        our kernel 1 alone (quantize + rank-32 low-rank down)
  k1+k2     both (what a layer costs), rank 32; r0: the same with rank 0
  lr        low-rank share: k1+k2 at rank 32 over rank 0, minus 1
Every variant is timed as CUDA-graph replays of back-to-back calls cycling through enough input
sets (>= 3x the L2 size) that no operand stays in L2; TOPS count 2*M*N*K.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from svdquant import kernels  # noqa: E402
from svdquant.linear import SVDQLinear  # noqa: E402

# (N, K) of the FLUX.1 linears: proj, qkv, mlp up, mlp down, single-block qkv+mlp, single-block proj
FLUX_SHAPES = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (21504, 3072), (3072, 15360)]
TOKENS = [4608, 256, 1024]
RANK = 32


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


def random_layer(n: int, k: int, rank: int, gen: torch.Generator) -> SVDQLinear:
    dev = "cuda"
    return SVDQLinear.from_tensors({
        "qweight": torch.randint(0, 256, (n, k // 2), generator=gen, device=dev, dtype=torch.uint8),
        "wscales": (torch.rand(k // 64, n, generator=gen, device=dev) * 0.02 + 1e-3).bfloat16(),
        "smooth": (torch.rand(k, generator=gen, device=dev) + 0.5).bfloat16(),
        "lora_down": (torch.randn(k, rank, generator=gen, device=dev) * 0.05).bfloat16(),
        "lora_up": (torch.randn(n, rank, generator=gen, device=dev) * 0.05).bfloat16(),
        "bias": torch.randn(n, generator=gen, device=dev).bfloat16(),
    })


def bench_shape(m: int, n: int, k: int, l2_bytes: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(m * 31 + n * 7 + k)
    set_bytes = (m * k + n * k) * 2  # the largest variant's operands (bf16)
    sets = max(2, min(16, math.ceil(3 * l2_bytes / set_bytes)))
    flops = 2.0 * m * n * k
    row = {"M": m, "N": n, "K": k, "input_sets": sets}

    a = [torch.randn(m, k, generator=gen, device="cuda").bfloat16() for _ in range(sets)]
    b = [torch.randn(n, k, generator=gen, device="cuda").bfloat16() for _ in range(sets)]
    row["bf16_ms"] = time_calls([lambda i=i: a[i] @ b[i].t() for i in range(sets)])

    a8 = [t.to(torch.float8_e4m3fn) for t in a]
    b8 = [t.to(torch.float8_e4m3fn) for t in b]
    sa = torch.rand(m, 1, device="cuda") + 0.5
    sb = torch.rand(1, n, device="cuda") + 0.5
    for key, fast in (("fp8_ms", False), ("fp8_fast_ms", True)):
        row[key] = time_calls([lambda i=i: torch._scaled_mm(a8[i], b8[i].t(), scale_a=sa, scale_b=sb,
                                                             out_dtype=torch.bfloat16, use_fast_accum=fast)
                               for i in range(sets)])
    del a8, b8, b

    layers = [random_layer(n, k, RANK, gen) for _ in range(sets)]
    layers0 = [random_layer(n, k, 0, gen) for _ in range(sets)]
    c_ext = kernels._C
    stage1 = [c_ext.act_quant_sm90(a[i], *kernels._sm90_layer_inputs(layers[i]), layers[i].lora_down)
              for i in range(sets)]

    def k2(i):
        codes, ascales, lora_act = stage1[i]
        lay = layers[i]
        return c_ext.w4a4_gemm_sm90(codes, ascales, lora_act, lay.qweight, lay.wscales, lay.lora_up, lay.bias)

    def k1(i):
        return c_ext.act_quant_sm90(a[i], *kernels._sm90_layer_inputs(layers[i]), layers[i].lora_down)

    row["k2_ms"] = time_calls([lambda i=i: k2(i) for i in range(sets)])
    row["k1_ms"] = time_calls([lambda i=i: k1(i) for i in range(sets)])
    row["k1k2_ms"] = time_calls([lambda i=i: kernels.svdq_linear_sm90(a[i], layers[i]) for i in range(sets)])
    row["k1k2_r0_ms"] = time_calls([lambda i=i: kernels.svdq_linear_sm90(a[i], layers0[i]) for i in range(sets)])

    for key in ("bf16", "fp8", "fp8_fast", "k2", "k1k2"):
        row[key + "_tops"] = flops / (row[key + "_ms"] * 1e-3) / 1e12
    row["k1k2_speedup_vs_bf16"] = row["bf16_ms"] / row["k1k2_ms"]
    row["k2_speedup_vs_bf16"] = row["bf16_ms"] / row["k2_ms"]
    row["lowrank_share"] = row["k1k2_ms"] / row["k1k2_r0_ms"] - 1.0
    del a, layers, layers0, stage1
    torch.cuda.empty_cache()
    return row


def git_commit() -> str:
    if os.environ.get("SVDQ_COMMIT"):
        return os.environ["SVDQ_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "bench/results"), "gemm.json"))
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    args = parser.parse_args()
    if not torch.cuda.is_available() or not kernels.sm90_kernels_built():
        sys.exit("bench/gemm.py needs a CUDA GPU and the extension built with the sm_90a kernels")
    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, "L2_cache_size", 50 * 2**20)
    rows = []
    header = (f"{'M':>5} {'N':>6} {'K':>6} | {'bf16 us':>8} {'TFLOPS':>6} | {'fp8 us':>7} {'x':>5} | {'fp8f us':>7} "
              f"{'x':>5} | {'k2 us':>7} {'TOPS':>5} {'x':>5} | {'k1 us':>6} | {'k1+k2 us':>8} {'TOPS':>5} {'x':>5} | "
              f"{'r0 us':>7} {'lr %':>5}")
    print(header, flush=True)
    for m in args.tokens:
        for n, k in FLUX_SHAPES:
            r = bench_shape(m, n, k, l2_bytes)
            rows.append(r)
            print(f"{m:>5} {n:>6} {k:>6} | {r['bf16_ms'] * 1e3:>8.1f} {r['bf16_tops']:>6.0f} | "
                  f"{r['fp8_ms'] * 1e3:>7.1f} {r['bf16_ms'] / r['fp8_ms']:>5.2f} | "
                  f"{r['fp8_fast_ms'] * 1e3:>7.1f} {r['bf16_ms'] / r['fp8_fast_ms']:>5.2f} | "
                  f"{r['k2_ms'] * 1e3:>7.1f} {r['k2_tops']:>5.0f} {r['k2_speedup_vs_bf16']:>5.2f} | "
                  f"{r['k1_ms'] * 1e3:>6.1f} | {r['k1k2_ms'] * 1e3:>8.1f} {r['k1k2_tops']:>5.0f} "
                  f"{r['k1k2_speedup_vs_bf16']:>5.2f} | {r['k1k2_r0_ms'] * 1e3:>7.1f} {r['lowrank_share'] * 100:>5.1f}",
                  flush=True)
    result = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "rank": RANK,
        "method": "CUDA-graph replay of back-to-back calls over rotating input sets (>= 3x L2), median of 10",
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
