"""What ComfyUI Manager runs after cloning: install the requirements, then build the extension.

Never installs or replaces torch and never downloads binaries: the extension is compiled here,
against the torch that ComfyUI runs. If the build fails, the pack still works on its PyTorch
reference path (slowly), and the failure is printed.
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-r", os.path.join(HERE, "requirements.txt")])
    env = dict(os.environ)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=HERE, env=env)
    if build.returncode:
        print("svdquant: building the extension failed; the nodes will run on the slow PyTorch reference path. "
              "Re-run `python install.py` in this folder to see the error.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
