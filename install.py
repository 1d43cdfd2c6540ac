"""What ComfyUI Manager runs after cloning: install the missing requirements, then prebuild the
kernels where a CUDA toolkit is present.

Never installs or replaces torch and never fails for want of a compiler: without one the kernels
are compiled for the GPU at first use by NVRTC (which CUDA builds of torch bring) and cached, so a
clone (or ComfyUI Manager) and a restart of ComfyUI is the whole install.
"""

import importlib.metadata
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    from packaging.requirements import InvalidRequirement, Requirement
except ImportError:  # pip's own copy
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement


def missing_requirements(path: str) -> list[str]:
    """The lines of a requirements file that the running Python does not satisfy."""
    missing = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                req = Requirement(line)
            except InvalidRequirement:
                missing.append(line)
                continue
            if req.marker is not None and not req.marker.evaluate():
                continue
            try:
                installed = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                missing.append(line)
                continue
            if not req.specifier.contains(installed, prereleases=True):
                missing.append(line)
    return missing


def main() -> int:
    missing = missing_requirements(os.path.join(HERE, "requirements.txt"))
    if missing:
        subprocess.check_call([sys.executable, "-m", "pip", "install", *missing])
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=HERE)
    if build.returncode:
        print("svdquant: prebuilding the kernels failed (above); they are compiled at first use instead",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
