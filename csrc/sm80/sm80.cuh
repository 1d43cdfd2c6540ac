// Device helpers of the sm80 family (act_quant.cu, w4a4_gemm.cu, w4a4_gemm_pow2.cu): cp.async,
// ldmatrix, the mma.sync shapes the kernels use and kernel 2's epilogue (the 16-bit element types
// are csrc/common/device.cuh's).
//
// Self-contained device code for NVRTC (no CUDA or C++ standard headers; csrc/common/device.cuh has
// the fixed-width integers). Every instruction here exists on sm_80 and later, so the family
// compiles for sm_80, sm_86, sm_89, sm_90 and sm_120 alike; each wrapper is one PTX instruction.
#pragma once

#include "device.cuh"

namespace svdq::sm80 {

// ---- asynchronous copies global -> shared (cp.async, sm_80+) ------------------------------------
// 16 bytes; bytes past `valid` (0 or 16) are zero-filled without reading global memory.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
// 4 bytes (cached in L1: small per-group parameters).
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// ---- ldmatrix and mma.sync ---------------------------------------------------------------------
// Four 8x8 b16 matrices; lane l supplies the address of row l % 8 of matrix l / 8, and receives in
// r[i] the 32-bit word (l % 4) of row l / 4 of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// d = a . b + c with int32 sums: a 16x64 row-major INT4 (signed, or unsigned with kUnsignedA), b 64x8
// column-major signed INT4.
template <bool kUnsignedA>
__device__ __forceinline__ void mma_m16n8k64_s4(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                                const int (&c)[4]) {
  if constexpr (kUnsignedA) {
    asm(
        "mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]));
  } else {
    asm(
        "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]));
  }
}

// d = a . b + c with int32 sums: a 16x32 row-major s8, b 32x8 column-major s8.
__device__ __forceinline__ void mma_m16n8k32_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                                const int (&c)[4]) {
  asm(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]));
}

// d += a . b with fp32 accumulation: a 16x16 row-major, b 16x8 column-major, both T (bf16 or fp16).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (Half<T>::kIsBF16) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ---- kernel 2's epilogue -----------------------------------------------------------------------
// GELU with the tanh approximation (torch.nn.functional.gelu(approximate="tanh")), the formula of
// the sm90 family's epilogue: x / (1 + e^(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3), one ex2.approx
// and one fast reciprocal (relative errors ~2^-22); no cancellation for negative x.
__device__ __forceinline__ float gelu_tanh(float x) {
  constexpr float kC1 = -2.f * 0.7978845608028654f * 1.4426950408889634f;  // -2 sqrt(2/pi) log2(e)
  constexpr float kC3 = kC1 * 0.044715f;
  float e;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x * fmaf(kC3, x * x, kC1)));
  return __fdividef(x, 1.f + e);
}

// Kernel 2's epilogue in two steps: pack_tiles rounds a warp's fp32 mma tiles (+ bias, GELU) to T
// pairs, half their registers; store_tiles (from the registers) or store_tiles_staged (through shared
// memory, in 16-byte chunks) writes them into y [M, N], or with a residual [M, N] (FLUX's gated residual
// streams, numerics.gated_residual) residual + T(gate * y), rounded to T, gate [B, N] the row of token
// t's batch t / gate_rows. y may be the residual itself: each element is read and then written by one
// thread, and since the compiler keeps every store after the loads before it, the residual is loaded in
// batches ahead of their stores. Tokens past M and channels past N (N % 8 == 0) are not stored.
// The whole-K kernel stages (bench/NOTES.md#sm80-staged-epilogue); in the per-group kernel ptxas then
// allocates its main loop worse (more spills for sm_89), so it stores from registers.
//
// out[i][j] and yv[i][hrow][j] hold tokens tok + 16 i + lane / 4 + 8 hrow (out: hrow = element / 2) and
// channels ch + 8 j + 2 (lane % 4) + {0, 1}, (tok, ch) the warp's first token and channel.
template <typename T, int kMT, int kNT>
__device__ __forceinline__ void pack_tiles(const float (&out)[kMT][kNT][4], const T* __restrict__ bias, int ch, int N,
                                           int gelu_from, int lane, uint32_t (&yv)[kMT][2][kNT]) {
  const int q = lane % 4;
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    const int c = ch + 8 * j + 2 * q;
    float b0 = 0.f, b1 = 0.f;
    if (bias && c < N) Half<T>::unpack2(__ldg(reinterpret_cast<const uint32_t*>(bias + c)), b0, b1);
    const bool g0 = gelu_from >= 0 && c >= gelu_from, g1 = gelu_from >= 0 && c + 1 >= gelu_from;
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
#pragma unroll
      for (int hrow = 0; hrow < 2; ++hrow) {
        float v0 = out[i][j][2 * hrow] + b0, v1 = out[i][j][2 * hrow + 1] + b1;
        if (g0) v0 = gelu_tanh(v0);
        if (g1) v1 = gelu_tanh(v1);
        yv[i][hrow][j] = pack2_rn<T>(v0, v1);
      }
    }
  }
}

// residual + T(gate * y) for 2 values of T packed in each word
template <typename T>
__device__ __forceinline__ uint32_t gated2(uint32_t y, uint32_t residual, uint32_t gate) {
  float y0, y1, r0, r1, g0, g1;
  Half<T>::unpack2(y, y0, y1);
  Half<T>::unpack2(residual, r0, r1);
  Half<T>::unpack2(gate, g0, g1);
  return pack2_rn<T>(__fadd_rn(r0, round_to<T>(__fmul_rn(y0, g0))), __fadd_rn(r1, round_to<T>(__fmul_rn(y1, g1))));
}

// From the registers: all of the thread's residual words load before its first store.
template <typename T, int kMT, int kNT>
__device__ __forceinline__ void store_tiles(uint32_t (&yv)[kMT][2][kNT], T* y, int tok, int ch, int M, int N,
                                            const T* residual, const T* __restrict__ gate, int gate_rows, int lane) {
  const int gid = lane / 4, q = lane % 4;
  if (residual) {
    uint32_t rw[kMT][2][kNT];
#pragma unroll
    for (int i = 0; i < kMT; ++i)
#pragma unroll
      for (int hrow = 0; hrow < 2; ++hrow) {
        const int t = tok + 16 * i + gid + 8 * hrow;
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          const int c = ch + 8 * j + 2 * q;
          rw[i][hrow][j] = t < M && c < N ? *reinterpret_cast<const uint32_t*>(residual + static_cast<size_t>(t) * N + c)
                                          : 0u;
        }
      }
#pragma unroll
    for (int i = 0; i < kMT; ++i)
#pragma unroll
      for (int hrow = 0; hrow < 2; ++hrow) {
        const int t = tok + 16 * i + gid + 8 * hrow;
        const T* gate_row = gate + static_cast<size_t>(gate_rows >= M ? 0 : t / gate_rows) * N;
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          const int c = ch + 8 * j + 2 * q;
          if (t < M && c < N)
            yv[i][hrow][j] = gated2<T>(yv[i][hrow][j], rw[i][hrow][j],
                                       __ldg(reinterpret_cast<const uint32_t*>(gate_row + c)));
        }
      }
  }
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int hrow = 0; hrow < 2; ++hrow) {
      const int t = tok + 16 * i + gid + 8 * hrow;
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const int c = ch + 8 * j + 2 * q;
        if (t < M && c < N) *reinterpret_cast<uint32_t*>(y + static_cast<size_t>(t) * N + c) = yv[i][hrow][j];
      }
    }
}

// Bytes of shared memory store_tiles_staged stages a kTileM x kTileN tile of T in (rows padded by 16
// bytes: conflict-free 4-byte writes of 8 rows x 16 bytes, 16-byte reads along a row).
template <int kTileM, int kTileN>
constexpr int kStagingBytes = kTileM * (2 * kTileN + 16);

// Through shared memory, called by every thread of the CTA (kThreads): each warp's values go into
// staging (kStagingBytes, the caller's ring once every warp is done with it), then the CTA's
// kTileM x kTileN tile (the one holding the warp's; tiles start at multiples of their size) is stored
// in 16-byte chunks, with a residual kBatch chunks' loads ahead of their stores.
template <typename T, int kMT, int kNT, int kTileM, int kTileN, int kThreads>
__device__ __forceinline__ void store_tiles_staged(const uint32_t (&yv)[kMT][2][kNT], T* y, int tok, int ch, int M,
                                                   int N, const T* residual, const T* __restrict__ gate,
                                                   int gate_rows, uint8_t* staging) {
  constexpr int kRowBytes = 2 * kTileN + 16, kChunksN = kTileN / 8, kChunks = kTileM * kChunksN;
  const int gid = threadIdx.x % 32 / 4, q = threadIdx.x % 4;
  const int tok0 = tok / kTileM * kTileM, ch0 = ch / kTileN * kTileN, wm = tok - tok0, wn = ch - ch0;
  __syncthreads();  // every warp is done with the ring
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int hrow = 0; hrow < 2; ++hrow)
#pragma unroll
      for (int j = 0; j < kNT; ++j)
        *reinterpret_cast<uint32_t*>(staging + (wm + 16 * i + gid + 8 * hrow) * kRowBytes + 2 * (wn + 8 * j + 2 * q)) =
            yv[i][hrow][j];
  __syncthreads();
  auto chunk = [&](int i) {
    return *reinterpret_cast<const uint4*>(staging + i / kChunksN * kRowBytes + 16 * (i % kChunksN));
  };
  if (!residual) {
#pragma unroll 4
    for (int i = threadIdx.x; i < kChunks; i += kThreads) {
      const int t = tok0 + i / kChunksN, c = ch0 + 8 * (i % kChunksN);
      if (t < M && c < N) *reinterpret_cast<uint4*>(y + static_cast<size_t>(t) * N + c) = chunk(i);
    }
    return;
  }
  constexpr int kBatch = 8;
  for (int i0 = threadIdx.x; i0 < kChunks; i0 += kThreads * kBatch) {
    uint4 r[kBatch], g[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + kThreads * u, t = tok0 + i / kChunksN, c = ch0 + 8 * (i % kChunksN);
      if (i < kChunks && t < M && c < N) {
        r[u] = *reinterpret_cast<const uint4*>(residual + static_cast<size_t>(t) * N + c);
        g[u] = __ldg(reinterpret_cast<const uint4*>(gate + static_cast<size_t>(t / gate_rows) * N + c));
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + kThreads * u, t = tok0 + i / kChunksN, c = ch0 + 8 * (i % kChunksN);
      if (i < kChunks && t < M && c < N) {
        const uint4 v = chunk(i);
        *reinterpret_cast<uint4*>(y + static_cast<size_t>(t) * N + c) =
            make_uint4(gated2<T>(v.x, r[u].x, g[u].x), gated2<T>(v.y, r[u].y, g[u].y),
                       gated2<T>(v.z, r[u].z, g[u].z), gated2<T>(v.w, r[u].w, g[u].w));
      }
    }
  }
}

}  // namespace svdq::sm80
