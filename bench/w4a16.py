"""W4A16 GEMV benchmark on the GPU: the kernel, the dequantize + GEMM path, and cuBLAS bf16 on a
dense copy of the weight, side by side.

    python bench/w4a16.py [--json PATH]

Rows: the FLUX.1 AdaLN modulation linears (K = 3072 -> N = 18432 in double blocks, 9216 in
single blocks) and the T5-XXL feed-forward shapes (4096 -> 10240 -> 4096), at M = 1, 2, 4, 8 rows
of x. Columns (median time per call, CUDA-graph replay over rotating weight sets, >= 3x L2):
  bf16     cuBLAS x @ W^T with W stored dense in bf16 (4x the memory)
  deq      the path for many rows: W dequantized to bf16 (PyTorch ops), then cuBLAS
  gemv     csrc/generic/w4a16_gemv.cu; GB/s counts the 4-bit weights, scales and zero points read
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gemm import l2_size, time_calls  # noqa: E402
from record import write_result  # noqa: E402
from svdquant import kernels, numerics  # noqa: E402
from svdquant.families import w4a16  # noqa: E402
from svdquant.linear import W4A16Linear  # noqa: E402

SHAPES = [(18432, 3072), (9216, 3072), (10240, 4096), (4096, 10240)]  # (N, K)
ROWS = [1, 2, 4, 8]


def random_layer(n: int, k: int, gen: torch.Generator) -> W4A16Linear:
    g = k // numerics.GROUP_SIZE
    scales = torch.rand(g, n, generator=gen, device="cuda") * 0.01 + 1e-3
    return W4A16Linear.from_tensors({
        "qweight": torch.randint(0, 256, (n, k // 2), generator=gen, device="cuda", dtype=torch.uint8),
        "wscales": scales.bfloat16(),
        "wzeros": (-8 * scales).bfloat16(),
        "bias": torch.randn(n, generator=gen, device="cuda").bfloat16(),
    })


def bench_shape(n: int, k: int, l2_bytes: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    sets = max(2, math.ceil(3 * l2_bytes / (n * k * 2)))  # the dense bf16 weights are the largest
    layers = [random_layer(n, k, gen) for _ in range(sets)]
    dense = [numerics.dequantize_w4a16(numerics.unpack_int4(lay.qweight, signed=False), lay.wscales,
                                       lay.wzeros).bfloat16() for lay in layers]
    weight_bytes = n * k // 2 + 2 * (k // 64) * n * 2
    rows = []
    for m in ROWS:
        x = torch.randn(m, k, generator=gen, device="cuda").bfloat16()
        row = {"M": m, "N": n, "K": k, "input_sets": sets}
        row["bf16_ms"] = time_calls([lambda i=i: torch.nn.functional.linear(x, dense[i], layers[i].bias)
                                     for i in range(sets)])
        row["deq_ms"] = time_calls([lambda i=i: kernels.w4a16_linear_reference(x, layers[i].qweight, layers[i].wscales,
                                                                               layers[i].wzeros, layers[i].bias)
                                    for i in range(sets)])
        row["gemv_ms"] = time_calls([lambda i=i: w4a16.gemv(x, layers[i].qweight, layers[i].wscales, layers[i].wzeros,
                                                           layers[i].bias)
                                     for i in range(sets)])
        row["gemv_GBps"] = weight_bytes / (row["gemv_ms"] * 1e-3) / 1e9
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "bench/results"), "w4a16.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        sys.exit("bench/w4a16.py needs an sm_80+ CUDA GPU")
    l2_bytes = l2_size()
    print(f"{'M':>2} {'N':>6} {'K':>6} | {'bf16 us':>8} {'deq us':>8} {'gemv us':>8} | {'GB/s':>6} "
          f"{'x bf16':>6} {'x deq':>6}", flush=True)
    rows = []
    for n, k in SHAPES:
        for r in bench_shape(n, k, l2_bytes):
            rows.append(r)
            print(f"{r['M']:>2} {n:>6} {k:>6} | {r['bf16_ms'] * 1e3:>8.1f} {r['deq_ms'] * 1e3:>8.1f} "
                  f"{r['gemv_ms'] * 1e3:>8.1f} | {r['gemv_GBps']:>6.0f} {r['bf16_ms'] / r['gemv_ms']:>6.2f} "
                  f"{r['deq_ms'] / r['gemv_ms']:>6.1f}", flush=True)
    write_result(args.json,
                 method="CUDA-graph replay of back-to-back calls over rotating weight sets (>= 3x L2), median of 10",
                 rows=rows)


if __name__ == "__main__":
    main()
