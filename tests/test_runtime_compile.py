"""The run-time compile path without a GPU (CI's check, issue 14): every source of every kernel
family compiles through NVRTC for each architecture we support (sm_80, sm_86, sm_89, sm_90(a),
sm_120; a family only for those it declares in cuda.FAMILIES), and each cubin set holds every entry
point the family's host module launches. Plus the on-disk cache: a hit compiles nothing, a changed
source or shared header compiles afresh, a damaged entry is recompiled, a compile error names the
file. Skipped only where no NVRTC library is found (CI installs nvidia-cuda-nvrtc)."""

from __future__ import annotations

import glob
import importlib
import os
import struct

import pytest

from svdquant import cuda

_glob = glob.glob  # the real one, for the tests that filter it


@pytest.fixture(autouse=True)
def nvrtc_library():
    try:
        return cuda.nvrtc()
    except cuda.NvrtcError as exc:
        pytest.skip(str(exc))


CASES = [(family, cuda.target_arch(family, capability)) for family, spec in cuda.FAMILIES.items()
         for capability in cuda.CI_CAPABILITIES if spec.supports(capability)]


def _cubin_sm(cubin: bytes) -> int:
    """The SM version a cubin's ELF header says it is for (e_flags bits 8-15)."""
    return (struct.unpack_from("<I", cubin, 0x30)[0] >> 8) & 0xFF


def test_every_family_is_compiled_for_every_supported_architecture():
    assert ("sm90", "sm_90a") in CASES and ("sm80", "sm_120") in CASES and ("w4a16", "sm_86") in CASES
    assert not any(family == "sm90" and arch != "sm_90a" for family, arch in CASES)


@pytest.mark.parametrize("family,arch", CASES)
def test_family_compiles_with_every_entry_point(family, arch, tmp_path, monkeypatch):
    monkeypatch.setenv("SVDQUANT_CACHE_DIR", str(tmp_path))
    cubins = cuda.compile_family(family, arch, use_cache=False)
    sources = cuda.family_sources(family)
    assert sources and list(cubins) == sources
    entries = set()
    for source, cubin in cubins.items():
        assert _cubin_sm(cubin) == int(arch[3:].rstrip("a")), source
        entries |= cuda.cubin_kernels(cubin)
    launched = set(importlib.import_module(f"svdquant.families.{family}").KERNELS)
    assert launched and not launched - entries, f"not in the {family} cubins: {sorted(launched - entries)}"


# ---- the cache, on a family of two tiny sources -----------------------------------------------------

KERNEL = '#include "tiny.cuh"\nextern "C" __global__ void %s(float* y) { y[threadIdx.x] = svdq_tiny_value(); }\n'


@pytest.fixture
def tiny_family(tmp_path, monkeypatch):
    """A family 'tiny' in its own csrc tree (sources tiny/a.cu, tiny/b.cu, common/tiny.cuh), its cache
    in tmp_path/cache; returns (csrc dir, list of the sources NVRTC compiled, in order)."""
    csrc = tmp_path / "csrc"
    (csrc / "tiny").mkdir(parents=True)
    (csrc / "common").mkdir()
    (csrc / "tiny" / "a.cu").write_text(KERNEL % "tiny_a")
    (csrc / "tiny" / "b.cu").write_text(KERNEL % "tiny_b")
    (csrc / "common" / "tiny.cuh").write_text("__device__ inline float svdq_tiny_value() { return 1.5f; }\n")
    monkeypatch.setattr(cuda, "CSRC_DIR", str(csrc))
    monkeypatch.setattr(cuda, "COMMON_DIR", str(csrc / "common"))
    monkeypatch.setitem(cuda.FAMILIES, "tiny", cuda.Family("tiny"))
    monkeypatch.setenv("SVDQUANT_CACHE_DIR", str(tmp_path / "cache"))
    compiled = []
    compile_source = cuda._Nvrtc.compile

    def counting(self, source, options):
        compiled.append(os.path.basename(source))
        return compile_source(self, source, options)

    monkeypatch.setattr(cuda._Nvrtc, "compile", counting)
    return csrc, compiled


def test_cache_hit_compiles_nothing(tiny_family):
    _, compiled = tiny_family
    assert cuda.cubin_origin("tiny", "sm_86") == "compile"
    first = cuda.compile_family("tiny", "sm_86")
    assert sorted(compiled) == ["a.cu", "b.cu"]
    assert cuda.cubin_origin("tiny", "sm_86") == "cached"
    assert cuda.compile_family("tiny", "sm_86") == first and len(compiled) == 2
    assert {name for c in first.values() for name in cuda.cubin_kernels(c)} == {"tiny_a", "tiny_b"}
    # another architecture is another entry
    cuda.compile_family("tiny", "sm_89")
    assert len(compiled) == 4


def test_changed_source_or_header_compiles_afresh(tiny_family):
    csrc, compiled = tiny_family
    cuda.compile_family("tiny", "sm_80")
    digest = cuda.source_hash("tiny")
    (csrc / "tiny" / "a.cu").write_text(KERNEL % "tiny_a" + "// changed\n")
    assert cuda.source_hash("tiny") != digest
    cuda.compile_family("tiny", "sm_80")
    assert len(compiled) == 4  # the family's hash covers every source
    digest = cuda.source_hash("tiny")
    (csrc / "common" / "tiny.cuh").write_text("__device__ inline float svdq_tiny_value() { return 2.5f; }\n")
    assert cuda.source_hash("tiny") != digest
    cuda.compile_family("tiny", "sm_80")
    assert len(compiled) == 6


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_cache_entry_is_recompiled(tiny_family, damage):
    _, compiled = tiny_family
    good = cuda.compile_family("tiny", "sm_86")
    version = cuda.nvrtc().version
    path = cuda.cache_path("tiny", cuda.family_sources("tiny")[0], "sm_86", cuda.source_hash("tiny"), version)
    data = open(path, "rb").read()
    damaged = {"truncated": data[: len(data) // 2], "garbage": data[:40] + b"\xff" * (len(data) - 40), "empty": b""}
    with open(path, "wb") as f:
        f.write(damaged[damage])
    assert cuda.compile_family("tiny", "sm_86") == good
    assert compiled == ["a.cu", "b.cu", "a.cu"]
    assert open(path, "rb").read() == data  # rewritten whole


def test_unwritable_cache_still_compiles(tiny_family, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SVDQUANT_CACHE_DIR", str(blocker / "kernels"))
    cubins = cuda.compile_family("tiny", "sm_86")
    assert len(cubins) == 2 and "could not write the kernel cache" in caplog.text


def test_compile_error_names_the_file_and_carries_the_log(tiny_family):
    csrc, _ = tiny_family
    (csrc / "tiny" / "b.cu").write_text('extern "C" __global__ void tiny_b(float* y) { y[0] = undeclared_name; }\n')
    with pytest.raises(cuda.NvrtcError, match=r"(?s)b\.cu.*undeclared_name"):
        cuda.compile_family("tiny", "sm_86")


def test_source_hash_and_names_are_stable():
    digest = cuda.source_hash("w4a16")
    assert digest == cuda.source_hash("w4a16") and len(digest) == 16
    source = cuda.family_sources("w4a16")[0]
    name = cuda.cubin_name("w4a16", source, "sm_86", digest)
    assert name == f"w4a16-{os.path.splitext(os.path.basename(source))[0]}-sm_86-{digest}.cubin"
    assert cuda.cache_path("w4a16", source, "sm_86", digest, (13, 5)).endswith(name[:-6] + "-nvrtc13.5.cubin")


def test_launch_arguments_convert_as_the_contract_says():
    import ctypes

    import torch

    t = torch.zeros(3)
    assert cuda._param(t).value == t.data_ptr() and cuda._param(None).value is None
    assert type(cuda._param(7)) is ctypes.c_int32 and cuda._param(-(2**31)).value == -(2**31)
    assert type(cuda._param(True)) is ctypes.c_int32 and cuda._param(True).value == 1
    assert type(cuda._param(0.5)) is ctypes.c_float and cuda._param(0.5).value == 0.5
    wide, tensor_map = ctypes.c_int64(2**40), cuda.TensorMap()
    assert cuda._param(wide) is wide and cuda._param(tensor_map) is tensor_map
    assert ctypes.sizeof(tensor_map) == 128
    with pytest.raises(OverflowError):
        cuda._param(2**31)
    with pytest.raises(TypeError):
        cuda._param("x")


def test_nvrtc_is_found_where_windows_torch_keeps_it(tmp_path, monkeypatch):
    """ComfyUI portable on Windows: torch/lib holds nvrtc64_<major><minor>_0.dll and its builtins DLL,
    a CUDA wheel may hold another. The library of torch's CUDA major comes first, builtins never."""
    site = tmp_path / "site-packages"
    for rel in ("torch/lib/nvrtc64_120_0.dll", "torch/lib/nvrtc64_130_0.dll", "torch/lib/nvrtc-builtins64_130.dll",
                "nvidia/cu13/bin/x86_64/nvrtc64_130_0.dll", "torch/__init__.py"):
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(b"")
    monkeypatch.delenv("SVDQUANT_NVRTC", raising=False)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cuda.torch, "__file__", str(site / "torch" / "__init__.py"))
    monkeypatch.setattr(cuda.torch.version, "cuda", "13.0")
    monkeypatch.setattr(cuda.sys, "path", [str(site)])
    monkeypatch.setattr(cuda.glob, "glob", lambda pattern: [p for p in _glob(pattern) if p.startswith(str(site))])
    found = [os.path.relpath(p, site).replace(os.sep, "/") for p in cuda.nvrtc_candidates()]
    assert found == ["nvidia/cu13/bin/x86_64/nvrtc64_130_0.dll", "torch/lib/nvrtc64_130_0.dll",
                     "torch/lib/nvrtc64_120_0.dll"]
    assert [cuda._nvrtc_major(p) for p in found] == [13, 13, 12]


def test_cache_lives_in_the_user_cache_folder_on_windows_and_linux(tmp_path, monkeypatch):
    monkeypatch.delenv("SVDQUANT_CACHE_DIR", raising=False)
    monkeypatch.setattr(cuda.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "Local"))
    assert cuda.cache_dir() == os.path.join(str(tmp_path / "Local"), "svdquant", "kernels")
    monkeypatch.setattr(cuda.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cuda.cache_dir() == os.path.join(str(tmp_path / "xdg"), "svdquant", "kernels")
