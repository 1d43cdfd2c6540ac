"""What the run-time compile path costs on this GPU, side by side (svdquant/cuda.py, issue 14):

    python bench/kernel_startup.py [--json PATH]

  cold      first use: a fresh process loads each family the GPU runs with an empty NVRTC cache
            (NVRTC compiles every source of the family, then the driver loads the cubins)
  warm      the next start: a fresh process, the same cache (no compile)
  prebuilt  a fresh process with svdquant/prebuilt/ cubins (from `python setup.py build_ext`), if any
  sass      whether the prebuilt (nvcc) and NVRTC cubins of each source hold the same machine code
            (cuobjdump -sass, headers dropped): same code, same speed
and the host time of one Function.launch (Python + driver, no GPU wait) of a small kernel.
Each start is measured in its own process (torch and its CUDA context made before the clock starts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from record import write_result  # noqa: E402
from svdquant import cuda  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# one process's start: seconds to load each family the GPU runs (cuda.load), and where it came from
START = """
import json, sys, time, torch
torch.zeros(1, device="cuda")
from svdquant import cuda
out = {}
for family in sys.argv[1:]:
    start = time.perf_counter()
    origin = cuda.load(family, torch.device("cuda"))
    out[family] = (time.perf_counter() - start, origin)
print(json.dumps(out))
"""


def start(families: list[str], cache: str, use_prebuilt: bool) -> dict:
    env = dict(os.environ, SVDQUANT_CACHE_DIR=cache)
    hidden = os.path.join(ROOT, "svdquant", "prebuilt.hidden")
    prebuilt = cuda.PREBUILT_DIR
    moved = not use_prebuilt and os.path.isdir(prebuilt)
    if moved:
        os.rename(prebuilt, hidden)
    try:
        run = subprocess.run([sys.executable, "-c", START, *families], cwd=ROOT, env=env, capture_output=True,
                             text=True)
    finally:
        if moved:
            os.rename(hidden, prebuilt)
    if run.returncode:
        sys.exit(f"a start failed:\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def sass(path: str, data: bytes | None = None) -> list[str]:
    """cuobjdump -sass of a cubin, without the header lines that name the producer or the file."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(data if data is not None else open(path, "rb").read())
    try:
        text = subprocess.run(["cuobjdump", "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(f.name)
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith(("arch", "code version",
                                                                                              "host", "compile_size", "producer", "identifier"))
            and "Fatbin" not in line]


def launch_host_us(n: int = 2000) -> float:
    """Host time of one Function.launch of the 1-row bf16 W4A16 GEMV on a tiny layer."""
    dev = torch.device("cuda")
    fn = cuda.function("w4a16", "w4a16_gemv_bf16_m1", dev)
    x = torch.zeros(1, 64, dtype=torch.bfloat16, device=dev)
    q = torch.zeros(8, 32, dtype=torch.uint8, device=dev)
    s = torch.zeros(1, 8, dtype=torch.bfloat16, device=dev)
    y = torch.empty(1, 8, dtype=torch.bfloat16, device=dev)
    args = (x, q, s, s, None, y, 1, 8, 64)
    for _ in range(100):
        fn.launch(2, 128, args)
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(n):
        fn.launch(2, 128, args)
    host = (time.perf_counter() - begin) / n * 1e6
    torch.cuda.synchronize()
    return host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "bench/results"), "kernel_startup.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernel_startup.py needs a CUDA GPU")
    capability = torch.cuda.get_device_capability()
    families = [f for f, spec in cuda.FAMILIES.items() if spec.supports(capability)]
    cache = tempfile.mkdtemp(prefix="svdquant-kernels-")
    try:
        cold = start(families, cache, use_prebuilt=False)
        warm = start(families, cache, use_prebuilt=False)
        has_prebuilt = all(a in cuda.prebuilt_archs()[f] for f in families
                           for a in [cuda.target_arch(f, capability)])
        prebuilt = start(families, cache, use_prebuilt=True) if has_prebuilt else {}
        rows = []
        lib = cuda.nvrtc()
        for family in families:
            arch = cuda.target_arch(family, capability)
            row = {"family": family, "arch": arch, "cold_s": cold[family][0], "warm_s": warm[family][0],
                   "cold_origin": cold[family][1], "warm_origin": warm[family][1]}
            if prebuilt:
                row["prebuilt_s"], row["prebuilt_origin"] = prebuilt[family]
            if has_prebuilt and shutil.which("cuobjdump"):
                digest, same = cuda.source_hash(family), []
                for source, nvrtc_cubin in cuda.compile_family(family, arch, use_cache=False).items():
                    same.append(sass(cuda.prebuilt_path(family, source, arch, digest)) == sass("", nvrtc_cubin))
                row["same_sass"] = all(same)
            rows.append(row)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    host_us = launch_host_us()
    print(f"{torch.cuda.get_device_name()}, NVRTC {lib.version[0]}.{lib.version[1]}, driver CUDA "
          f"{'%d.%d' % cuda.driver().version}")
    print(f"{'family':<7} {'arch':<7} | {'cold s':>7} {'warm s':>7} {'prebuilt s':>10} | {'same SASS':>9}")
    for r in rows:
        print(f"{r['family']:<7} {r['arch']:<7} | {r['cold_s']:>7.2f} {r['warm_s']:>7.3f} "
              f"{r.get('prebuilt_s', float('nan')):>10.3f} | {str(r.get('same_sass', '-')):>9}")
    print(f"all families: cold {sum(r['cold_s'] for r in rows):.1f} s, warm {sum(r['warm_s'] for r in rows):.3f} s; "
          f"one Function.launch {host_us:.1f} us of host time")
    write_result(args.json, method="fresh process per start, cuda.load per family; launch: mean of 2000",
                 rows=rows, launch_host_us=host_us, nvrtc=f"{lib.version[0]}.{lib.version[1]}")


if __name__ == "__main__":
    main()
