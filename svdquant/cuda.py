"""The one module that talks to NVRTC and the CUDA driver (ctypes; no compiler or toolkit needed).

Kernel sources (csrc/<family>/*.cu, device code only, plus csrc/common/*.cuh) are compiled for the
GPU's architecture into cubins, one per source file, and loaded into torch's context of the device:

    f = cuda.function("w4a16", "w4a16_gemv_bf16_m1", x.device)
    f.launch(grid, block, (x, qweight, ..., m, n, k), smem=0)

A family's cubins come from, in this order: svdquant/prebuilt/ (nvcc, `python setup.py build_ext`),
the on-disk cache of earlier NVRTC compiles, or NVRTC now (one log line; the result is cached).
Both file names carry a hash of the family's sources, csrc/common and the language options, so a
changed source never loads a stale cubin. NVRTC comes from the CUDA wheels torch depends on
(nvidia-cuda-nvrtc), torch/lib on Windows, or a CUDA toolkit (CUDA_HOME / CUDA_PATH).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import logging
import os
import re
import struct
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

log = logging.getLogger("svdquant")

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CSRC_DIR = os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")
COMMON_DIR = os.path.join(CSRC_DIR, "common")
PREBUILT_DIR = os.path.join(PACKAGE_DIR, "prebuilt")


@dataclass(frozen=True)
class Family:
    """A kernel family: the sources in csrc/<folder> and the GPUs they compile for."""

    folder: str
    # compiled for sm_XYa (architecture-specific features such as wgmma), not sm_XY
    arch_specific: bool = False
    # the (major, minor) capabilities the sources compile for; None: any sm_80 or newer
    capabilities: tuple[tuple[int, int], ...] | None = None

    def supports(self, capability: tuple[int, int]) -> bool:
        if self.capabilities is not None:
            return tuple(capability) in self.capabilities
        return capability[0] >= 8


FAMILIES: dict[str, Family] = {
    "sm90": Family("sm90", arch_specific=True, capabilities=((9, 0),)),
    "sm80": Family("sm80"),
    "w4a16": Family("generic"),
    # FP8 execution's input quantization; runs where cuBLAS has the FP8 GEMM with per-token scales it
    # feeds (torch._scaled_mm's row-wise scaling: Hopper)
    "fp8": Family("fp8", capabilities=((9, 0),)),
}

# The architectures CI compiles every family for (each family: those of them it supports).
CI_CAPABILITIES = ((8, 0), (8, 6), (8, 9), (9, 0), (12, 0))

# Language options, part of every cubin's key. IEEE-exact math (no --use_fast_math): the kernels
# are tested bit for bit against svdquant/numerics.py. setup.py passes the same ones to nvcc.
LANGUAGE_OPTIONS = ("-std=c++17", "-lineinfo")
# NVRTC only: unannotated functions are device functions, as nvcc takes a lambda inside a kernel
# (NVRTC 13.0, the one torch's CUDA 13.0 wheels bring, otherwise rejects such lambdas as host code)
NVRTC_OPTIONS = ("-default-device",)


class CudaError(RuntimeError):
    """A CUDA driver call failed (the message names the call, the kernel and the driver's error)."""


class NvrtcError(RuntimeError):
    """NVRTC is missing or failed; a compile error carries NVRTC's log and the source file's name."""


def target_arch(family: str, capability: tuple[int, int]) -> str:
    """The architecture a family is compiled for on a GPU of this capability ("sm_90a", "sm_86")."""
    major, minor = capability
    return f"sm_{major}{minor}" + ("a" if FAMILIES[family].arch_specific else "")


def family_sources(family: str) -> list[str]:
    """The family's translation units (each becomes one cubin), sorted."""
    return sorted(glob.glob(os.path.join(CSRC_DIR, FAMILIES[family].folder, "*.cu")))



def source_hash(family: str) -> str:
    """Hash of everything a family's cubins are made from: its folder's files, csrc/common's and the
    language options (16 hex digits)."""
    h = hashlib.sha256(" ".join(LANGUAGE_OPTIONS + NVRTC_OPTIONS).encode())
    folders = (os.path.join(CSRC_DIR, FAMILIES[family].folder), COMMON_DIR)
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "*"))):
            if os.path.isfile(path) and path.endswith((".cu", ".cuh", ".h")):
                h.update(os.path.relpath(path, CSRC_DIR).replace(os.sep, "/").encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read() + b"\0")
    return h.hexdigest()[:16]


def cubin_name(family: str, source: str, arch: str, source_digest: str) -> str:
    """File name of a source's prebuilt cubin (nvcc); the NVRTC cache adds the NVRTC version."""
    stem = os.path.splitext(os.path.basename(source))[0]
    return f"{family}-{stem}-{arch}-{source_digest}.cubin"


def cache_dir() -> str:
    """Where NVRTC's cubins are kept between runs: SVDQUANT_CACHE_DIR, else the user's cache folder."""
    if os.environ.get("SVDQUANT_CACHE_DIR"):
        return os.environ["SVDQUANT_CACHE_DIR"]
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "svdquant", "kernels")


# ---- NVRTC ---------------------------------------------------------------------------------------

def _torch_cuda_major() -> int | None:
    return int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None


def _nvrtc_major(path: str) -> int | None:
    """The CUDA major a library file is for, from its name (libnvrtc.so.13, nvrtc64_120_0.dll)."""
    name = os.path.basename(path)
    m = re.match(r"nvrtc64_(\d+)\d_", name) or re.search(r"\.so\.(\d+)", name)
    return int(m.group(1)) if m else None


def nvrtc_candidates() -> list[str]:
    """NVRTC libraries found here, best first: SVDQUANT_NVRTC, then those of the CUDA major torch was
    built with (torch's own), then the rest in search order (pip's CUDA wheels, torch/lib, CUDA_HOME
    / CUDA_PATH, /usr/local/cuda)."""
    if os.environ.get("SVDQUANT_NVRTC"):
        return [os.environ["SVDQUANT_NVRTC"]]
    roots = [os.path.dirname(os.path.dirname(torch.__file__))] + [p for p in sys.path if os.path.isdir(p)]
    patterns = []
    for root in dict.fromkeys(roots):
        for sub in ("nvidia/cu*/lib", "nvidia/cuda_nvrtc/lib", "nvidia/cu*/bin", "nvidia/cu*/bin/x86_64",
                    "nvidia/cuda_nvrtc/bin", "torch/lib"):
            patterns += [os.path.join(root, sub, "libnvrtc.so*"), os.path.join(root, sub, "libnvrtc-*.so*"),
                         os.path.join(root, sub, "nvrtc64_*.dll")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            for sub in ("lib64", "lib", "bin", os.path.join("bin", "x64"), os.path.join("lib", "x64")):
                patterns += [os.path.join(home, sub, "libnvrtc.so*"), os.path.join(home, sub, "nvrtc64_*.dll")]
    found = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern), reverse=True):  # newest version first
            name = os.path.basename(path)
            if "builtins" in name or ".alt." in name or path in found:
                continue
            found.append(path)
    major = _torch_cuda_major()
    return sorted(found, key=lambda p: major is not None and _nvrtc_major(p) != major)


class _Nvrtc:
    def __init__(self, path: str):
        self.path = path
        # NVRTC opens its builtins library by name at the first compile; some wheels' libnvrtc has no
        # search path to its own folder, so the builtins beside it are loaded first (then found by name)
        folder = os.path.dirname(path)
        for builtins in sorted(glob.glob(os.path.join(folder, "libnvrtc-builtins.so.*"))
                               + glob.glob(os.path.join(folder, "nvrtc-builtins64_*.dll"))):
            if ".alt." not in os.path.basename(builtins):
                ctypes.CDLL(builtins)
        self.lib = lib = ctypes.CDLL(path)
        vp, sz, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
        for name, args in {
            "nvrtcVersion": [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)],
            "nvrtcCreateProgram": [ctypes.POINTER(vp), cp, cp, ctypes.c_int, vp, vp],
            "nvrtcCompileProgram": [vp, ctypes.c_int, ctypes.POINTER(cp)],
            "nvrtcGetProgramLogSize": [vp, ctypes.POINTER(sz)],
            "nvrtcGetProgramLog": [vp, cp],
            "nvrtcGetCUBINSize": [vp, ctypes.POINTER(sz)],
            "nvrtcGetCUBIN": [vp, cp],
            "nvrtcDestroyProgram": [ctypes.POINTER(vp)],
        }.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        lib.nvrtcGetErrorString.argtypes, lib.nvrtcGetErrorString.restype = [ctypes.c_int], cp
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)

    def check(self, result: int, what: str) -> None:
        if result:
            raise NvrtcError(f"{what}: {self.lib.nvrtcGetErrorString(result).decode()}")

    def compile(self, source_path: str, options: list[str]) -> bytes:
        with open(source_path, "rb") as f:
            source = f.read()
        lib, prog = self.lib, ctypes.c_void_p()
        name = os.path.basename(source_path).encode()
        self.check(lib.nvrtcCreateProgram(ctypes.byref(prog), source, name, 0, None, None), "nvrtcCreateProgram")
        try:
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            result = lib.nvrtcCompileProgram(prog, len(options), opts)
            if result:
                size = ctypes.c_size_t()
                lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
                text = ctypes.create_string_buffer(size.value)
                lib.nvrtcGetProgramLog(prog, text)
                raise NvrtcError(f"NVRTC {self.version[0]}.{self.version[1]} could not compile {source_path} "
                                 f"({' '.join(options)}): {lib.nvrtcGetErrorString(result).decode()}\n"
                                 f"{text.value.decode(errors='replace')}")
            size = ctypes.c_size_t()
            self.check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            cubin = ctypes.create_string_buffer(size.value)
            self.check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
            return cubin.raw
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


_nvrtc_lib: _Nvrtc | None = None
_nvrtc_failure = ""
_lock = threading.RLock()


def nvrtc() -> _Nvrtc:
    """The NVRTC library (loaded once); NvrtcError saying what was tried when none loads."""
    global _nvrtc_lib, _nvrtc_failure
    with _lock:
        if _nvrtc_lib is None and not _nvrtc_failure:
            tried = []
            for path in nvrtc_candidates():
                try:
                    _nvrtc_lib = _Nvrtc(path)
                    break
                except (OSError, AttributeError, NvrtcError) as exc:
                    tried.append(f"{path}: {exc}")
            else:
                _nvrtc_failure = ("NVRTC not found (a CUDA build of torch brings it: pip package "
                                  "nvidia-cuda-nvrtc on Linux, torch/lib on Windows; or set SVDQUANT_NVRTC)"
                                  + ("; tried " + "; ".join(tried) if tried else ""))
        if _nvrtc_lib is None:
            raise NvrtcError(_nvrtc_failure)
        return _nvrtc_lib


def compile_options(family: str, arch: str) -> list[str]:
    folder = os.path.join(CSRC_DIR, FAMILIES[family].folder)
    return [f"--gpu-architecture={arch}", *LANGUAGE_OPTIONS, *NVRTC_OPTIONS, f"--include-path={folder}",
            f"--include-path={COMMON_DIR}"]


# A cache file is the cubin's SHA-256 then the cubin, so a truncated or damaged file is detected
# (and recompiled) before the driver sees it.
def _read_cache(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    digest, cubin = data[:32], data[32:]
    return cubin if len(data) > 32 and hashlib.sha256(cubin).digest() == digest else None


def _write_cache(path: str, cubin: bytes) -> None:
    """Temp file + rename, so a reader never sees half a file; an unwritable cache is only a warning."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".partial")
        with os.fdopen(fd, "wb") as f:
            f.write(hashlib.sha256(cubin).digest() + cubin)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("svdquant: could not write the kernel cache %s (%s); kernels compile again next start", path, exc)


def cache_path(family: str, source: str, arch: str, digest: str, version: tuple[int, int]) -> str:
    name = cubin_name(family, source, arch, digest)
    return os.path.join(cache_dir(), name[: -len(".cubin")] + f"-nvrtc{version[0]}.{version[1]}.cubin")


def prebuilt_path(family: str, source: str, arch: str, digest: str) -> str:
    return os.path.join(PREBUILT_DIR, cubin_name(family, source, arch, digest))


def _read_prebuilt(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data if data[:4] == b"\x7fELF" else None


def compile_family(family: str, arch: str, *, use_cache: bool = True) -> dict[str, bytes]:
    """source file -> cubin for every source of the family, by NVRTC (the on-disk cache first unless
    use_cache is False; fresh compiles are written to it). Needs no GPU."""
    lib = nvrtc()
    return _compile_missing(family, arch, _cache_entries(family, arch, lib.version) if use_cache else {})


def _cache_entries(family: str, arch: str, version: tuple[int, int]) -> dict[str, bytes]:
    """source -> cubin for the family's sources the NVRTC cache holds intact."""
    digest, entries = source_hash(family), {}
    for src in family_sources(family):
        cubin = _read_cache(cache_path(family, src, arch, digest, version))
        if cubin is not None:
            entries[src] = cubin
    return entries


def _compile_missing(family: str, arch: str, cubins: dict[str, bytes]) -> dict[str, bytes]:
    """`cubins` completed with NVRTC compiles of the family's other sources (written to the cache),
    in source order."""
    lib, digest, sources = nvrtc(), source_hash(family), family_sources(family)
    missing = [src for src in sources if src not in cubins]
    if missing:
        cubins = dict(cubins)
        options = compile_options(family, arch)
        # NVRTC releases the GIL: the sources compile in parallel
        with ThreadPoolExecutor(max_workers=max(1, min(len(missing), os.cpu_count() or 1))) as pool:
            for src, cubin in zip(missing, pool.map(lambda s: lib.compile(s, options), missing)):
                cubins[src] = cubin
                _write_cache(cache_path(family, src, arch, digest, lib.version), cubin)
    return {src: cubins[src] for src in sources}


def cubin_kernels(cubin: bytes) -> set[str]:
    """Names of the kernel entry points (global function symbols) in a cubin's ELF symbol table."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        raise ValueError("not a 64-bit ELF cubin")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names = set()
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        strtab = sections[link][4]
        for pos in range(offset, offset + size, entsize):
            st_name, st_info = struct.unpack_from("<IB", cubin, pos)
            if st_info >> 4 == 1 and st_info & 0xF == 2:  # STB_GLOBAL, STT_FUNC
                end = cubin.index(b"\0", strtab + st_name)
                names.add(cubin[strtab + st_name:end].decode())
    return names


def _stored_cubins(family: str, arch: str) -> tuple[dict[str, bytes], str | None]:
    """The family's cubins for `arch` that need no compiling: (all of them, "prebuilt") from
    svdquant/prebuilt/, (all of them, "cached") from the NVRTC cache, else (those the cache holds,
    None). NvrtcError when NVRTC would be needed and cannot be found."""
    digest, sources = source_hash(family), family_sources(family)
    prebuilt = {s: _read_prebuilt(prebuilt_path(family, s, arch, digest)) for s in sources}
    if sources and all(c is not None for c in prebuilt.values()):
        return prebuilt, "prebuilt"
    cached = _cache_entries(family, arch, nvrtc().version)
    return cached, "cached" if len(cached) == len(sources) else None


def cubin_origin(family: str, arch: str) -> str:
    """Where cuda.function would take this family's cubins for `arch` from now: "prebuilt", "cached"
    or "compile" (NVRTC at first use); NvrtcError when it would need NVRTC and there is none."""
    return _stored_cubins(family, arch)[1] or "compile"


# ---- CUDA driver ---------------------------------------------------------------------------------

CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED = 14
CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4

# cuTensorMapEncodeTiled's enums (cuda.h)
TENSOR_MAP_DATA_TYPE_UINT8 = 0
TENSOR_MAP_DATA_TYPE_UINT16 = 1
TENSOR_MAP_DATA_TYPE_UINT32 = 2
TENSOR_MAP_DATA_TYPE_INT32 = 3
TENSOR_MAP_DATA_TYPE_UINT64 = 4
TENSOR_MAP_DATA_TYPE_INT64 = 5
TENSOR_MAP_DATA_TYPE_FLOAT16 = 6
TENSOR_MAP_DATA_TYPE_FLOAT32 = 7
TENSOR_MAP_DATA_TYPE_FLOAT64 = 8
TENSOR_MAP_DATA_TYPE_BFLOAT16 = 9
TENSOR_MAP_INTERLEAVE_NONE = 0
TENSOR_MAP_INTERLEAVE_16B = 1
TENSOR_MAP_INTERLEAVE_32B = 2
TENSOR_MAP_SWIZZLE_NONE = 0
TENSOR_MAP_SWIZZLE_32B = 1
TENSOR_MAP_SWIZZLE_64B = 2
TENSOR_MAP_SWIZZLE_128B = 3
TENSOR_MAP_L2_PROMOTION_NONE = 0
TENSOR_MAP_L2_PROMOTION_L2_64B = 1
TENSOR_MAP_L2_PROMOTION_L2_128B = 2
TENSOR_MAP_L2_PROMOTION_L2_256B = 3
TENSOR_MAP_FLOAT_OOB_FILL_NONE = 0
TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA = 1

# torch dtypes -> TENSOR_MAP_DATA_TYPE_*
TENSOR_MAP_DTYPES = {
    torch.uint8: TENSOR_MAP_DATA_TYPE_UINT8, torch.int8: TENSOR_MAP_DATA_TYPE_UINT8,
    torch.float16: TENSOR_MAP_DATA_TYPE_FLOAT16, torch.bfloat16: TENSOR_MAP_DATA_TYPE_BFLOAT16,
    torch.float32: TENSOR_MAP_DATA_TYPE_FLOAT32, torch.int32: TENSOR_MAP_DATA_TYPE_INT32,
}


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint * 16)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem_bytes", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


class TensorMap(ctypes.Structure):
    """A CUtensorMap (128 opaque bytes), passed by value to a `const __grid_constant__ TensorMap`."""

    _fields_ = [("opaque", ctypes.c_uint64 * 16)]


class _Driver:
    def __init__(self):
        self.lib = lib = ctypes.WinDLL("nvcuda.dll") if sys.platform == "win32" else ctypes.CDLL("libcuda.so.1")
        vp, ip, u = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint
        pvp, pint = ctypes.POINTER(vp), ctypes.POINTER(ctypes.c_int)
        u64p, u32p = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32)
        for name, symbol, args in (
            ("init", "cuInit", [u]),
            ("driver_version", "cuDriverGetVersion", [pint]),
            ("primary_ctx_retain", "cuDevicePrimaryCtxRetain", [pvp, ip]),
            ("ctx_get_current", "cuCtxGetCurrent", [pvp]),
            ("ctx_push", "cuCtxPushCurrent_v2", [vp]),
            ("ctx_pop", "cuCtxPopCurrent_v2", [pvp]),
            ("module_load_data", "cuModuleLoadData", [pvp, ctypes.c_char_p]),
            ("module_get_function", "cuModuleGetFunction", [pvp, vp, ctypes.c_char_p]),
            ("func_set_attribute", "cuFuncSetAttribute", [vp, ip, ip]),
            ("launch", "cuLaunchKernel", [vp, u, u, u, u, u, u, u, vp, vp, vp]),
            ("launch_ex", "cuLaunchKernelEx", [ctypes.POINTER(_LaunchConfig), vp, vp, vp]),
            ("max_active_clusters", "cuOccupancyMaxActiveClusters", [pint, vp, ctypes.POINTER(_LaunchConfig)]),
            ("tensor_map_encode_tiled", "cuTensorMapEncodeTiled",
             [ctypes.POINTER(TensorMap), ip, u, vp, u64p, u64p, u32p, u32p, ip, ip, ip, ip]),
            ("get_error_name", "cuGetErrorName", [ip, ctypes.POINTER(ctypes.c_char_p)]),
            ("get_error_string", "cuGetErrorString", [ip, ctypes.POINTER(ctypes.c_char_p)]),
        ):
            fn = getattr(lib, symbol)
            fn.argtypes, fn.restype = args, ctypes.c_int
            setattr(self, name, fn)
        self.check(self.init(0), "cuInit")
        version = ctypes.c_int()
        self.check(self.driver_version(ctypes.byref(version)), "cuDriverGetVersion")
        self.version = (version.value // 1000, version.value % 1000 // 10)

    def error_text(self, result: int) -> str:
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        self.get_error_name(result, ctypes.byref(name))
        self.get_error_string(result, ctypes.byref(text))
        return f"{(name.value or b'CUDA_ERROR_%d' % result).decode()} ({(text.value or b'').decode()})"

    def check(self, result: int, what: str) -> None:
        if result:
            raise CudaError(f"{what} failed: {self.error_text(result)}")


_driver_lib: _Driver | None = None


def driver() -> _Driver:
    """The CUDA driver library (loaded once)."""
    global _driver_lib
    if _driver_lib is not None:
        return _driver_lib
    with _lock:
        if _driver_lib is None:
            try:
                _driver_lib = _Driver()
            except (OSError, AttributeError) as exc:
                raise CudaError(f"the CUDA driver library could not be loaded: {exc}") from exc
        return _driver_lib


def _raw_stream(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


_raw_stream_of = getattr(torch._C, "_cuda_getCurrentRawStream", _raw_stream)
_INT32 = (-(2**31), 2**31 - 1)


def _param(arg):
    """A kernel argument as a ctypes object (Function.launch's conversions)."""
    kind = type(arg)  # exact types first: this runs for every argument of every launch
    if kind is torch.Tensor:
        return ctypes.c_void_p(arg.data_ptr())
    if kind is int and _INT32[0] <= arg <= _INT32[1]:
        return ctypes.c_int32(arg)
    if isinstance(arg, torch.Tensor):
        return ctypes.c_void_p(arg.data_ptr())
    if arg is None:
        return ctypes.c_void_p(0)
    if isinstance(arg, int):  # bool included
        if not _INT32[0] <= arg <= _INT32[1]:
            raise OverflowError(f"kernel argument {arg} does not fit a 32-bit int (pass ctypes.c_int64)")
        return ctypes.c_int32(arg)
    if isinstance(arg, float):
        return ctypes.c_float(arg)
    if isinstance(arg, ctypes._SimpleCData) or isinstance(arg, (ctypes.Structure, ctypes.Array)):
        return arg
    raise TypeError(f"unsupported kernel argument type {type(arg).__name__}")


def _dims(value, what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(dims) <= 3 or any(d < 1 for d in dims):
        raise ValueError(f"{what} must be 1-3 positive ints, got {value}")
    return dims + (1,) * (3 - len(dims))


class Function:
    """A kernel entry point loaded on one GPU."""

    def __init__(self, name: str, handle: ctypes.c_void_p, context: ctypes.c_void_p, device_index: int, origin: str):
        self.name, self.handle, self.context, self.device_index, self.origin = name, handle, context, device_index, origin
        self._smem_limit = 48 * 1024  # the default dynamic shared memory limit
        self._non_portable = False

    def __repr__(self) -> str:
        return f"<cuda.Function {self.name} on cuda:{self.device_index} ({self.origin})>"

    def _prepare(self, smem: int, cluster: tuple[int, int, int] | None) -> None:
        d = _driver_lib
        if smem > self._smem_limit:
            d.check(d.func_set_attribute(self.handle, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
                    f"{self.name}: setting {smem} bytes of dynamic shared memory")
            self._smem_limit = smem
        if cluster is not None and cluster[0] * cluster[1] * cluster[2] > 8 and not self._non_portable:
            d.check(d.func_set_attribute(self.handle, CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1),
                    f"{self.name}: allowing non-portable cluster sizes")
            self._non_portable = True

    @staticmethod
    def _config(grid, block, smem, stream, cluster, attribute) -> _LaunchConfig:
        attribute.id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        attribute.value[0], attribute.value[1], attribute.value[2] = cluster
        return _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), smem, stream,
                             ctypes.pointer(attribute), 1)

    def _in_context(self, call):
        """call() with this function's context current (the current one when it already is)."""
        d = driver()
        current = ctypes.c_void_p()
        d.ctx_get_current(ctypes.byref(current))
        if current.value == self.context.value:
            return call()
        d.check(d.ctx_push(self.context), f"{self.name}: cuCtxPushCurrent")
        try:
            return call()
        finally:
            d.ctx_pop(ctypes.byref(current))

    def launch(self, grid, block, args, *, smem: int = 0, cluster=None, stream=None) -> None:
        """Launch on `stream` (None: torch's current stream of this function's device; a torch.cuda.Stream
        or a raw handle). args: tensors (data pointers), None (null), int/bool (32-bit int), float
        (32-bit float) or ctypes objects (as they are)."""
        grid, block = _dims(grid, "grid"), _dims(block, "block")
        cluster = None if cluster is None else _dims(cluster, "cluster")
        self._prepare(smem, cluster)
        if stream is None:
            stream = _raw_stream_of(self.device_index)
        elif isinstance(stream, torch.cuda.Stream):
            stream = stream.cuda_stream
        params = [_param(a) for a in args]
        pointers = (ctypes.c_void_p * max(1, len(params)))(*map(ctypes.addressof, params))
        d = driver()
        if cluster is None:
            result = self._in_context(lambda: d.launch(self.handle, *grid, *block, smem, stream, pointers, None))
        else:
            attribute = _LaunchAttribute()
            config = self._config(grid, block, smem, stream, cluster, attribute)
            result = self._in_context(lambda: d.launch_ex(ctypes.byref(config), self.handle, pointers, None))
        if result:
            raise CudaError(f"launching {self.name} (grid {grid}, block {block}, cluster {cluster}, smem {smem}) "
                            f"failed: {d.error_text(result)}")

    def max_active_clusters(self, grid, block, cluster, *, smem: int = 0) -> int:
        """How many clusters of this shape the GPU can run at once (cuOccupancyMaxActiveClusters); 0 when
        it cannot co-schedule one."""
        grid, block, cluster = _dims(grid, "grid"), _dims(block, "block"), _dims(cluster, "cluster")
        self._prepare(smem, cluster)
        attribute, count, d = _LaunchAttribute(), ctypes.c_int(), driver()
        config = self._config(grid, block, smem, None, cluster, attribute)
        result = self._in_context(lambda: d.max_active_clusters(ctypes.byref(count), self.handle, ctypes.byref(config)))
        if result:
            return 0
        return count.value


@dataclass
class _LoadedFamily:
    functions: dict[str, ctypes.c_void_p]  # entry name -> CUfunction
    context: ctypes.c_void_p
    origin: str  # "prebuilt", "cached" or "compiled"


_loaded: dict[tuple[str, int], _LoadedFamily] = {}
_functions: dict[tuple[str, str, int], Function] = {}


def _family_cubins(family: str, arch: str) -> tuple[dict[str, bytes], str]:
    """(source -> cubin, origin) from prebuilt files, else the cache, else NVRTC now."""
    if not family_sources(family):
        raise NvrtcError(f"no kernel sources for the {family} family in {os.path.join(CSRC_DIR, FAMILIES[family].folder)}")
    cubins, origin = _stored_cubins(family, arch)
    if origin is not None:
        return cubins, origin
    log.info("svdquant: compiling %s kernels for %s (first use, cached in %s)", family, arch, cache_dir())
    start = time.perf_counter()
    cubins = _compile_missing(family, arch, cubins)
    log.info("svdquant: compiled %s kernels for %s in %.1f s", family, arch, time.perf_counter() - start)
    return cubins, "compiled"


def _load_family(family: str, index: int) -> _LoadedFamily:
    capability = torch.cuda.get_device_capability(index)
    if not FAMILIES[family].supports(capability):
        raise NvrtcError(f"the {family} family has no kernels for sm_{capability[0]}{capability[1]} GPUs")
    arch = target_arch(family, capability)
    cubins, origin = _family_cubins(family, arch)
    torch.cuda.synchronize(index)  # torch has made its (primary) context on this device
    d = driver()
    context = ctypes.c_void_p()
    d.check(d.primary_ctx_retain(ctypes.byref(context), index), f"cuDevicePrimaryCtxRetain({index})")
    functions = {}
    d.check(d.ctx_push(context), "cuCtxPushCurrent")
    try:
        for source, cubin in cubins.items():
            module = ctypes.c_void_p()
            result = d.module_load_data(ctypes.byref(module), cubin)
            if result and origin != "compiled":  # a damaged prebuilt or cached cubin: compile it afresh
                log.warning("svdquant: %s cubin of %s did not load (%s); compiling it", origin, source, d.error_text(result))
                cubin = nvrtc().compile(source, compile_options(family, arch))
                _write_cache(cache_path(family, source, arch, source_hash(family), nvrtc().version), cubin)
                result = d.module_load_data(ctypes.byref(module), cubin)
            d.check(result, f"loading {os.path.basename(source)} ({arch}, {origin})")
            for name in sorted(cubin_kernels(cubin)):
                handle = ctypes.c_void_p()
                d.check(d.module_get_function(ctypes.byref(handle), module, name.encode()), f"cuModuleGetFunction({name})")
                functions[name] = handle
    finally:
        d.ctx_pop(ctypes.byref(ctypes.c_void_p()))
    return _LoadedFamily(functions, context, origin)


def device_index(device: torch.device) -> int:
    """The index of a CUDA device (torch's current one where the device names none)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _loaded_family(family: str, index: int) -> _LoadedFamily:
    loaded = _loaded.get((family, index))
    if loaded is None:
        with _lock:
            loaded = _loaded.get((family, index))
            if loaded is None:
                loaded = _loaded[(family, index)] = _load_family(family, index)
    return loaded


def load(family: str, device: torch.device) -> str:
    """Load the family's kernels on a GPU now (compiling them if needed); returns where they came from:
    "prebuilt", "cached" or "compiled". NvrtcError / CudaError when they cannot be had."""
    return _loaded_family(family, device_index(device)).origin


def function(family: str, name: str, device: torch.device) -> Function:
    """Kernel `name` of `family` on a GPU (compiled or loaded on the first call per family and GPU)."""
    index = device_index(device)
    key = (family, name, index)
    fn = _functions.get(key)
    if fn is None:
        with _lock:
            loaded = _loaded_family(family, index)
            if name not in loaded.functions:
                raise CudaError(f"no kernel {name} in the {family} family's cubins "
                                f"(it has {', '.join(sorted(loaded.functions)) or 'none'})")
            fn = _functions[key] = Function(name, loaded.functions[name], loaded.context, index, loaded.origin)
    return fn


def loaded_origin(family: str, index: int) -> str | None:
    """"prebuilt", "cached" or "compiled" once the family is loaded on GPU `index`, else None."""
    loaded = _loaded.get((family, index))
    return loaded.origin if loaded else None


def tensor_map(data_type: int, global_address, global_dims, global_strides, box_dims, element_strides=None, *,
               interleave: int = TENSOR_MAP_INTERLEAVE_NONE, swizzle: int = TENSOR_MAP_SWIZZLE_NONE,
               l2_promotion: int = TENSOR_MAP_L2_PROMOTION_NONE,
               oob_fill: int = TENSOR_MAP_FLOAT_OOB_FILL_NONE) -> TensorMap:
    """cuTensorMapEncodeTiled with the driver's arguments: rank = len(global_dims); dims innermost
    first; global_strides in bytes, rank - 1 of them (the innermost is the element size);
    global_address a tensor (its data pointer) or an int. The map lives in a 128-byte aligned buffer."""
    rank = len(global_dims)
    if len(global_strides) != rank - 1 or len(box_dims) != rank:
        raise ValueError(f"a rank-{rank} tensor map takes {rank - 1} global strides and {rank} box dims")
    element_strides = (1,) * rank if element_strides is None else tuple(element_strides)
    address = global_address.data_ptr() if isinstance(global_address, torch.Tensor) else int(global_address)
    buffer = ctypes.create_string_buffer(ctypes.sizeof(TensorMap) + 128)
    tensor_map_ = TensorMap.from_buffer(buffer, -ctypes.addressof(buffer) % 128)
    d = driver()
    result = d.tensor_map_encode_tiled(
        ctypes.byref(tensor_map_), data_type, rank, address, (ctypes.c_uint64 * rank)(*global_dims),
        (ctypes.c_uint64 * max(1, rank - 1))(*global_strides), (ctypes.c_uint32 * rank)(*box_dims),
        (ctypes.c_uint32 * rank)(*element_strides), interleave, swizzle, l2_promotion, oob_fill)
    if result:
        raise CudaError(f"cuTensorMapEncodeTiled(type {data_type}, dims {tuple(global_dims)}, strides "
                        f"{tuple(global_strides)}, box {tuple(box_dims)}, swizzle {swizzle}) failed: {d.error_text(result)}")
    return tensor_map_


def prebuilt_archs() -> dict[str, list[str]]:
    """family -> the architectures svdquant/prebuilt/ holds current cubins of every source for."""
    out = {}
    for family in FAMILIES:
        digest, sources = source_hash(family), family_sources(family)
        archs = set()
        for path in glob.glob(os.path.join(PREBUILT_DIR, f"{family}-*-{digest}.cubin")):
            archs.add(os.path.basename(path)[: -len(f"-{digest}.cubin")].rsplit("-", 1)[1])
        out[family] = sorted(a for a in archs if sources and all(
            os.path.isfile(prebuilt_path(family, s, a, digest)) for s in sources))
    return out


def status() -> dict:
    """What this module can do here (for `python -m svdquant info` and bug reports)."""
    info: dict = {"torch_cuda": torch.version.cuda, "cache_dir": cache_dir(), "prebuilt": prebuilt_archs()}
    try:
        lib = nvrtc()
        info["nvrtc"] = f"{lib.version[0]}.{lib.version[1]} ({lib.path})"
    except NvrtcError as exc:
        info["nvrtc"] = f"unavailable: {exc}"
    try:
        info["driver"] = "CUDA %d.%d" % driver().version
    except CudaError as exc:
        info["driver"] = f"unavailable: {exc}"
    info["loaded"] = {f"{family} on cuda:{index}": entry.origin for (family, index), entry in sorted(_loaded.items())}
    return info
