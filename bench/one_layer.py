"""One FLUX-shaped layer call per Hopper path (exact, then fast), twice, for a profiler:

    ncu -k regex:"act_quant|w4a4" --launch-skip 4 --launch-count 4 python bench/one_layer.py [M N K]

The first round warms up (kernel load or NVRTC compile, kernel attributes, tensor maps); the second
is the one to profile.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm import RANK, random_layer, sm90  # noqa: E402


def main() -> None:
    m, n, k = (int(v) for v in sys.argv[1:4]) if len(sys.argv) == 4 else (4608, 3072, 3072)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, generator=gen, device="cuda").bfloat16()
    ops = [random_layer(n, k, RANK, gen, pow2).w4a4_kernel() for pow2 in (False, True)]
    for _ in range(2):
        for op in ops:
            sm90.svdq_linear(x, op)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
