"""Prebuilds the kernels with nvcc: `python setup.py build_ext --inplace` (optional).

Without it nothing is lost: svdquant/cuda.py compiles each kernel family with NVRTC at first use
and caches the result. With a CUDA torch and a CUDA toolkit this compiles every family's sources
(csrc/<family>/*.cu) with nvcc into cubins under svdquant/prebuilt/, for the GPUs torch sees or
for the list in SVDQUANT_CUDA_ARCHS (e.g. "8.6 8.9 9.0 12.0"; the Hopper family is built as
sm_90a). The cubins are named after a hash of their sources, so cuda.py loads them only while the
sources are unchanged. Where it cannot build (CPU torch, no nvcc, nvcc without its headers or a
host compiler, no GPU and no SVDQUANT_CUDA_ARCHS) it says why in one line and exits 0.

This is a plain script, not a setuptools build: the pack installs no Python extension.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

USAGE = "usage: python setup.py [-q] build_ext [--inplace]"


def _skip(reason: str) -> int:
    print(f"svdquant: no prebuilt kernels ({reason}); they are compiled at first use")
    return 0


def _capabilities(torch) -> list[tuple[int, int]] | str:
    """The GPU capabilities to build for, or why there are none."""
    listed = os.environ.get("SVDQUANT_CUDA_ARCHS", "").replace(";", " ").split()
    if listed:
        try:
            return sorted({(int(a.split(".")[0]), int(a.split(".")[1].rstrip("a"))) for a in listed})
        except (IndexError, ValueError):
            return f"SVDQUANT_CUDA_ARCHS={os.environ['SVDQUANT_CUDA_ARCHS']!r} is not a list like '8.6 9.0'"
    if not torch.cuda.is_available():
        return "no GPU visible and no SVDQUANT_CUDA_ARCHS"
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    found = shutil.which("nvcc")
    if found is None and home:
        candidate = os.path.join(home, "bin", "nvcc.exe" if sys.platform == "win32" else "nvcc")
        found = candidate if os.path.isfile(candidate) else None
    return found


def _nvcc_problem(nvcc: str, arch: str) -> str:
    """Why nvcc cannot build a device-only file here ('' when it can): it needs the toolkit's headers
    (it includes cuda_runtime.h into every file) and a host compiler to preprocess with."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cu")
        with open(source, "w") as f:
            f.write('extern "C" __global__ void probe(int* p) { *p = 1; }\n')
        run = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-o", os.path.join(tmp, "probe.cubin"), source],
                             capture_output=True, text=True)
    if run.returncode == 0:
        return ""
    lines = (run.stderr or run.stdout).strip().splitlines()
    return f"{nvcc} cannot compile here: {lines[0] if lines else 'exit status %d' % run.returncode}"


def build(quiet: bool) -> int:
    import torch

    from svdquant import cuda

    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU build")
    nvcc = _nvcc()
    if nvcc is None:
        return _skip("nvcc not found on PATH or in CUDA_HOME/CUDA_PATH")
    capabilities = _capabilities(torch)
    if isinstance(capabilities, str):
        return _skip(capabilities)
    jobs = []  # (family, source, arch, digest)
    for family, spec in cuda.FAMILIES.items():
        digest = cuda.source_hash(family)
        for capability in capabilities:
            if capability[0] >= 8 and spec.supports(capability):
                arch = cuda.target_arch(family, capability)
                jobs += [(family, source, arch, digest) for source in cuda.family_sources(family)]
    if not jobs:
        return _skip(f"no kernel family runs on {', '.join('sm_%d%d' % c for c in capabilities)}")
    problem = _nvcc_problem(nvcc, jobs[0][2])
    if problem:
        return _skip(problem)
    os.makedirs(cuda.PREBUILT_DIR, exist_ok=True)
    archs = sorted({arch for _, _, arch, _ in jobs})
    print(f"svdquant: prebuilding {len(jobs)} cubins for {', '.join(archs)} with {nvcc}", flush=True)

    def compile_one(job) -> str:
        family, source, arch, digest = job
        target = cuda.prebuilt_path(family, source, arch, digest)
        fd, tmp = tempfile.mkstemp(dir=cuda.PREBUILT_DIR, suffix=".partial")
        os.close(fd)
        folder = os.path.join(cuda.CSRC_DIR, cuda.FAMILIES[family].folder)
        command = [nvcc, "-cubin", f"-arch={arch}", *cuda.LANGUAGE_OPTIONS, "-I", folder, "-I", cuda.COMMON_DIR,
                   "-o", tmp, source]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode:
            os.remove(tmp)
            return f"{' '.join(command)}\n{run.stdout}{run.stderr}"
        os.replace(tmp, target)
        if not quiet:
            print(f"  {os.path.relpath(target, ROOT)}", flush=True)
        return ""

    workers = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        errors = [e for e in pool.map(compile_one, jobs) if e]
    # cubins of earlier sources are never loaded again (their hash differs): not kept
    for family in cuda.FAMILIES:
        for path in glob.glob(os.path.join(cuda.PREBUILT_DIR, f"{family}-*.cubin")):
            if not path.endswith(f"-{cuda.source_hash(family)}.cubin"):
                os.remove(path)
    if errors:
        print("svdquant: nvcc failed:\n" + "\n".join(errors), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    quiet = "-q" in argv or "--quiet" in argv
    commands = [a for a in argv if not a.startswith("-")]
    if commands != ["build_ext"] or any(a not in ("-q", "--quiet", "--inplace") for a in argv if a.startswith("-")):
        print(USAGE, file=sys.stderr)
        return 2
    return build(quiet)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
