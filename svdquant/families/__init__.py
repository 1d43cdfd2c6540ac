"""Host side of each kernel family (argument checks, grid and shared-memory sizes, launches through
svdquant.cuda): sm90.py for csrc/sm90, sm80.py for csrc/sm80, w4a16.py for csrc/generic.

Each module names every kernel entry point it launches in `KERNELS` (CI compiles every family and
checks them against the cubins: tests/test_runtime_compile.py)."""
