"""Kernel 1's norm prologue on the GPU (issue 17 item 1): the LayerNorm + modulation that feeds FLUX's qkv, MLP and
single-block linear1 layers, computed by PyTorch before the layer against inside sm90 kernel 1, side by side.

    python bench/norm_prologue.py [--json PATH]

Rows: K = 3072 (FLUX's hidden size), M = 4608 (a single block at 1024x1024), 4096 (a double block's image
stream) and 512 (its text stream), N of the layer (9216 qkv, 12288 MLP input, 21504 single-block linear1).
Columns (median time per call, CUDA-graph replays over rotating input sets, as bench/gemm.py):
  ln+mod    PyTorch's layer_norm + addcmul (what ComfyUI's eager FLUX runs)
  k1 / k1n  kernel 1 alone on the normalized input / on the LayerNorm's input with the prologue
            (fast path: pow2 mode with the fast kernel 2's s8 operands; exact path: exact mode)
  layer / fused  ln+mod then the layer's two kernels / the layer called with kernels.ModulatedNorm
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm import input_sets, l2_size, random_layer, time_calls  # noqa: E402
from record import write_result  # noqa: E402

from svdquant import kernels  # noqa: E402
from svdquant.families import sm90  # noqa: E402

K = 3072
SHAPES = [(4608, 21504), (4096, 9216), (4096, 12288), (512, 9216), (512, 12288)]


def bench(m: int, n: int, fast: bool, l2_bytes: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(m + n + fast)
    layer = random_layer(n, K, 32, gen, pow2=fast)
    kernel = layer.w4a4_kernel()
    sets = input_sets(m, n, K, l2_bytes)
    h = [(torch.randn(1, m, K, generator=gen, device="cuda") * 2 + 0.5).bfloat16() for _ in range(sets)]
    mult = [(1 + 0.3 * torch.randn(1, 1, K, generator=gen, device="cuda")).bfloat16() for _ in range(sets)]
    add = [(0.5 * torch.randn(1, 1, K, generator=gen, device="cuda")).bfloat16() for _ in range(sets)]
    norms = [kernels.ModulatedNorm(mult[i], add[i], 1e-6) for i in range(sets)]

    def ln_mod(i):
        return torch.addcmul(add[i], torch.nn.functional.layer_norm(h[i], (K,), eps=1e-6), mult[i])

    x = [ln_mod(i).reshape(m, K) for i in range(sets)]
    inputs = sm90.kernel1_inputs(kernel)
    rotation = kernel.kernel1_rotation()
    row = {"M": m, "N": n, "K": K, "path": "fast" if fast else "exact", "input_sets": sets}
    row["ln_mod_ms"] = time_calls([lambda i=i: ln_mod(i) for i in range(sets)])
    row["k1_ms"] = time_calls([lambda i=i: sm90.act_quant(x[i], *inputs, fast, fast, rotation) for i in range(sets)])
    row["k1_norm_ms"] = time_calls([lambda i=i: sm90.act_quant(h[i].reshape(m, K), *inputs, fast, fast, rotation,
                                                               norms[i]) for i in range(sets)])
    row["layer_ms"] = time_calls([lambda i=i: kernel(ln_mod(i).reshape(m, K)) for i in range(sets)])
    row["fused_ms"] = time_calls([lambda i=i: kernel(h[i].reshape(m, K), norms[i]) for i in range(sets)])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "bench/results"), "norm_prologue.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        sys.exit("bench/norm_prologue.py needs an sm_90 GPU")
    l2_bytes, rows = l2_size(), []
    print(f"{'path':>5} {'M':>5} {'N':>6} | {'ln+mod':>7} {'k1':>6} {'sum':>7} {'k1n':>6} {'saved':>6} | "
          f"{'layer':>7} {'fused':>7} {'x':>5}   (us)", flush=True)
    with torch.no_grad():
        for fast in (True, False):
            for m, n in SHAPES:
                r = bench(m, n, fast, l2_bytes)
                rows.append(r)
                us = {key: r[key] * 1e3 for key in ("ln_mod_ms", "k1_ms", "k1_norm_ms", "layer_ms", "fused_ms")}
                print(f"{r['path']:>5} {m:>5} {n:>6} | {us['ln_mod_ms']:>7.1f} {us['k1_ms']:>6.1f} "
                      f"{us['ln_mod_ms'] + us['k1_ms']:>7.1f} {us['k1_norm_ms']:>6.1f} "
                      f"{us['ln_mod_ms'] + us['k1_ms'] - us['k1_norm_ms']:>6.1f} | {us['layer_ms']:>7.1f} "
                      f"{us['fused_ms']:>7.1f} {r['layer_ms'] / r['fused_ms']:>5.2f}", flush=True)
    write_result(args.json, K=K, rank=32, method="CUDA-graph replay over rotating input sets (>= 3x L2), median of 10",
                 rows=rows)


if __name__ == "__main__":
    main()
