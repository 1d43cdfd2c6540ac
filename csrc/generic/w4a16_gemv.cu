// W4A16 GEMV for a few rows of x (any sm_80+ GPU): the AdaLN modulation linears, which run on one
// row per image, so reading the 4-bit weights once is the whole cost.
//
//   y[m, n] = sum_k x[m, k] * (code[n, k] * wscale[g, n] + wzero[g, n]) + bias[n],   g = k / 64
//
// computed in fp32 from the stored codes and 16-bit scales (numerics.dequantize_w4a16 without the
// reference path's rounding of W to 16 bits), for M <= kMaxRows.
// Layouts (natural format, svdquant/format.py): qweight uint8 [N, K/2], byte j of a row holding
// code[2j] | code[2j + 1] << 4 (unsigned codes 0..15); wscales, wzeros [K/64, N]; x [M, K]; y [M, N].
//
// Work split: a CTA of 8 warps owns kRowsPerCta consecutive rows n, warp w taking rows w, w + 8, ...
// A row is read in 512-byte steps; lane l takes bytes [512 s + 16 l, +16), i.e. the 32 codes of
// columns [1024 s + 32 l, +32), half of group 16 s + l / 2.
// Per code, a shift and a LOP3 build the float 1 + c/16 (the code in the top mantissa bits of 1.0)
// and one FFMA per row of x accumulates s' = sum x (1 + c/16). With xs = sum x over the same 32
// columns (computed once per CTA, in shared memory), sum x c = 16 (s' - xs), so each half group adds
//   16 wscale s' + (wzero - 16 wscale) xs
// to the row's fp32 sum; the lanes' sums are then reduced with shuffles.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "launchers.h"

namespace svdq::generic {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerCta = 32;

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }

// 1 + c/16 for nibble e of w, as a float: the nibble moved to mantissa bits 19..22 of 1.0f
template <int e>
__device__ __forceinline__ float nibble_float(uint32_t w) {
  const uint32_t moved = e <= 4 ? w << (19 - 4 * e) : w >> (4 * e - 19);
  return __uint_as_float((moved & 0x00780000u) | 0x3F800000u);
}

template <typename T, int kM>
__global__ void __launch_bounds__(kThreads) w4a16_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qweight,
                                                             const T* __restrict__ wscales, const T* __restrict__ wzeros,
                                                             const T* __restrict__ bias, T* __restrict__ y, int M, int N,
                                                             int K) {
  extern __shared__ float xs[];  // [kM][K / 32]: sums of x over 32-column chunks (0 for rows >= M)
  const int chunks = K / 32;
  for (int i = threadIdx.x; i < kM * chunks; i += kThreads) {
    const int m = i / chunks, c = i % chunks;
    float s = 0.f;
    if (m < M) {
      const uint4* p = reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K + 32 * c);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint4 v = __ldg(p + j);
        const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int e = 0; e < 8; ++e) s += to_float(h[e]);
      }
    }
    xs[i] = s;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row_bytes = K / 2;
  for (int r = warp; r < kRowsPerCta; r += kThreads / 32) {
    const int n = blockIdx.x * kRowsPerCta + r;
    if (n >= N) break;  // warp-uniform
    const uint8_t* wrow = qweight + static_cast<size_t>(n) * row_bytes;
    float acc[kM];
#pragma unroll
    for (int m = 0; m < kM; ++m) acc[m] = 0.f;
    for (int off = 16 * lane; off < row_bytes; off += 512) {
      const uint4 packed = __ldg(reinterpret_cast<const uint4*>(wrow + off));
      const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
      const int col = 2 * off, g = off / 32;  // first column of the 32, its group
      float sp[kM];
#pragma unroll
      for (int m = 0; m < kM; ++m) sp[m] = 0.f;
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // word q: columns col + 8q .. +7
        const float f[8] = {nibble_float<0>(words[q]), nibble_float<1>(words[q]), nibble_float<2>(words[q]),
                            nibble_float<3>(words[q]), nibble_float<4>(words[q]), nibble_float<5>(words[q]),
                            nibble_float<6>(words[q]), nibble_float<7>(words[q])};
#pragma unroll
        for (int m = 0; m < kM; ++m) {
          if (m < M) {
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K + col + 8 * q));
            const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
            for (int e = 0; e < 8; ++e) sp[m] = fmaf(to_float(h[e]), f[e], sp[m]);
          }
        }
      }
      const float sc16 = 16.f * to_float(wscales[static_cast<size_t>(g) * N + n]);
      const float zr = to_float(wzeros[static_cast<size_t>(g) * N + n]) - sc16;
#pragma unroll
      for (int m = 0; m < kM; ++m) acc[m] = fmaf(sc16, sp[m], fmaf(zr, xs[m * chunks + off / 16], acc[m]));
    }
#pragma unroll
    for (int m = 0; m < kM; ++m) {
#pragma unroll
      for (int d = 16; d > 0; d /= 2) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], d);
    }
    if (lane < M) {  // lane m writes row m (M <= 32)
      float v = 0.f;
#pragma unroll
      for (int m = 0; m < kM; ++m) v = m == lane ? acc[m] : v;
      if (bias) v += to_float(bias[n]);
      y[static_cast<size_t>(lane) * N + n] = from_float<T>(v);
    }
  }
}

template <typename T, int kM>
cudaError_t launch(const W4A16GemvArgs& a, cudaStream_t stream) {
  const size_t smem = sizeof(float) * kM * (a.K / 32);
  auto kernel = w4a16_gemv_kernel<T, kM>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int grid = (a.N + kRowsPerCta - 1) / kRowsPerCta;
  kernel<<<grid, kThreads, smem, stream>>>(static_cast<const T*>(a.x), a.qweight, static_cast<const T*>(a.wscales),
                                           static_cast<const T*>(a.wzeros), static_cast<const T*>(a.bias),
                                           static_cast<T*>(a.y), a.M, a.N, a.K);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_rows(const W4A16GemvArgs& a, cudaStream_t stream) {
  if (a.M == 1) return launch<T, 1>(a, stream);
  if (a.M == 2) return launch<T, 2>(a, stream);
  if (a.M <= 4) return launch<T, 4>(a, stream);
  return launch<T, 8>(a, stream);
}

}  // namespace

const char* w4a16_gemv(const W4A16GemvArgs& a, cudaStream_t stream) {
  if (a.M <= 0 || a.M > kMaxGemvRows) return "w4a16_gemv: M must be in [1, 8]";
  if (a.N <= 0 || a.K <= 0 || a.K % 64) return "w4a16_gemv: needs N > 0 and K a positive multiple of 64";
  for (const void* p : {a.x, static_cast<const void*>(a.qweight)})
    if (reinterpret_cast<uintptr_t>(p) & 15) return "w4a16_gemv: x and qweight must start on a 16-byte boundary";
  const cudaError_t err = a.bf16 ? launch_rows<__nv_bfloat16>(a, stream) : launch_rows<__half>(a, stream);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace svdq::generic
