// W4A16 GEMV for a few rows of x (any sm_80+ GPU): the AdaLN modulation linears, which run on one
// row per image, so reading the 4-bit weights once is the whole cost.
//
//   y[m, n] = sum_k x[m, k] * (code[n, k] * wscale[g, n] + wzero[g, n]) + bias[n],   g = k / 64
//
// computed in fp32 from the stored codes and 16-bit scales (numerics.dequantize_w4a16 without the
// reference path's rounding of W to 16 bits), for M <= 8.
// Layouts (natural format, svdquant/format.py): qweight uint8 [N, K/2], byte j of a row holding
// code[2j] | code[2j + 1] << 4 (unsigned codes 0..15); wscales, wzeros [K/64, N]; x [M, K]; y [M, N].
//
// Work split: a CTA of kWarps warps owns kR consecutive rows n (4 for one or two rows of x, else 2;
// each x value converted serves all kR), and its warps split K: a row is read in 512-byte steps,
// warp w taking steps w, w + kWarps, ..., and in a step lane l takes bytes [512 s + 16 l, +16), the
// 32 codes of columns [1024 s + 32 l, +32), half of group 16 s + l / 2. Small CTAs over all of N
// keep enough loads in flight to stream the weights.
// Per code, a shift and a LOP3 build the float 1 + c/16 (the code in the top mantissa bits of 1.0)
// and one FFMA per row of x accumulates s' = sum x (1 + c/16). With xs = sum x over the same 32
// columns, sum x c = 16 (s' - xs), so each half group adds
//   16 wscale s' + (wzero - 16 wscale) xs
// to the row's fp32 sum; lanes, then warps, are reduced at the end.
//
// Entry points (host side: svdquant/families/w4a16.py), one per dtype and row bucket:
//   w4a16_gemv_<bf16|fp16>_m<1|2|4|8>(const T* x, const uint8_t* qweight, const T* wscales,
//                                    const T* wzeros, const T* bias /* or null */, T* y, int M, int N, int K)
// the _mB kernel takes 1 <= M <= B rows (B = 1, 2, 4, 8); grid ceil(N / R) CTAs of 128 threads, R = 4 rows
// of W per CTA for B <= 2, else 2. x and qweight start on 16-byte boundaries; K is a multiple of 64.
#include "device.cuh"

namespace svdq {
namespace {

constexpr int kWarps = 4;

// 1 + c/16 for nibble e of w, as a float: the nibble moved to mantissa bits 19..22 of 1.0f
template <int e>
__device__ __forceinline__ float nibble_float(uint32_t w) {
  const uint32_t moved = e <= 4 ? w << (19 - 4 * e) : w >> (4 * e - 19);
  return __uint_as_float((moved & 0x00780000u) | 0x3F800000u);
}

template <typename T, int kM, int kR>
__device__ __forceinline__ void w4a16_gemv(const T* __restrict__ x, const uint8_t* __restrict__ qweight,
                                           const T* __restrict__ wscales, const T* __restrict__ wzeros,
                                           const T* __restrict__ bias, T* __restrict__ y, int M, int N, int K) {
  __shared__ float partial[kWarps][kR][kM];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row_bytes = K / 2, steps = (row_bytes + 511) / 512;
  const int n0 = blockIdx.x * kR;
  // Warp w takes steps w, w + kWarps, ...; the loads of its next step (weights, scales, zero
  // points) are in flight while it computes the current one.
  struct Fetch {
    uint4 w[kR];
    T sc[kR], zr[kR];
  };
  auto fetch = [&](int step, Fetch& f) {
    const int off = 512 * step + 16 * lane;
    if (off >= row_bytes) return;
#pragma unroll
    for (int j = 0; j < kR; ++j) {
      const int n = min(n0 + j, N - 1);
      f.w[j] = __ldg(reinterpret_cast<const uint4*>(qweight + static_cast<size_t>(n) * row_bytes + off));
      f.sc[j] = wscales[static_cast<size_t>(off / 32) * N + n];
      f.zr[j] = wzeros[static_cast<size_t>(off / 32) * N + n];
    }
  };
  float acc[kR][kM];
#pragma unroll
  for (int j = 0; j < kR; ++j)
#pragma unroll
    for (int m = 0; m < kM; ++m) acc[j][m] = 0.f;
  Fetch next;
  if (warp < steps) fetch(warp, next);
  for (int step = warp; step < steps; step += kWarps) {
    const Fetch cur = next;
    if (step + kWarps < steps) fetch(step + kWarps, next);
    const int off = 512 * step + 16 * lane;
    if (off >= row_bytes) continue;
    const int col = 2 * off;  // first column of the lane's 32
    float sp[kR][kM], sx[kM];
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      sx[m] = 0.f;
#pragma unroll
      for (int j = 0; j < kR; ++j) sp[j][m] = 0.f;
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // word q: columns col + 8q .. +7
      float f[kR][8];
#pragma unroll
      for (int j = 0; j < kR; ++j) {
        const uint32_t w = q == 0 ? cur.w[j].x : q == 1 ? cur.w[j].y : q == 2 ? cur.w[j].z : cur.w[j].w;
        f[j][0] = nibble_float<0>(w), f[j][1] = nibble_float<1>(w), f[j][2] = nibble_float<2>(w);
        f[j][3] = nibble_float<3>(w), f[j][4] = nibble_float<4>(w), f[j][5] = nibble_float<5>(w);
        f[j][6] = nibble_float<6>(w), f[j][7] = nibble_float<7>(w);
      }
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        if (m < M) {
          const uint4 v = __ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K + col + 8 * q));
          const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const float xv = to_float(h[e]);
            sx[m] += xv;
#pragma unroll
            for (int j = 0; j < kR; ++j) sp[j][m] = fmaf(xv, f[j][e], sp[j][m]);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kR; ++j) {
      const float sc16 = 16.f * to_float(cur.sc[j]), zr = to_float(cur.zr[j]) - sc16;
#pragma unroll
      for (int m = 0; m < kM; ++m) acc[j][m] = fmaf(sc16, sp[j][m], fmaf(zr, sx[m], acc[j][m]));
    }
  }
  // reduce over the lanes, then over the warps
#pragma unroll
  for (int j = 0; j < kR; ++j)
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      float v = acc[j][m];
#pragma unroll
      for (int d = 16; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
      if (lane == 0) partial[warp][j][m] = v;
    }
  __syncthreads();
  const int j = threadIdx.x / kM, m = threadIdx.x % kM, n = n0 + j;
  if (threadIdx.x < kR * kM && m < M && n < N) {
    float out = bias ? to_float(bias[n]) : 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) out += partial[w][j][m];
    y[static_cast<size_t>(m) * N + n] = from_float<T>(out);
  }
}

}  // namespace
}  // namespace svdq

#define SVDQ_W4A16_GEMV(NAME, T, M, R)                                                                    \
  extern "C" __global__ void __launch_bounds__(32 * svdq::kWarps)                                        \
      NAME(const T* __restrict__ x, const uint8_t* __restrict__ qweight, const T* __restrict__ wscales,     \
           const T* __restrict__ wzeros, const T* __restrict__ bias, T* __restrict__ y, int m, int n, int k) { \
    svdq::w4a16_gemv<T, M, R>(x, qweight, wscales, wzeros, bias, y, m, n, k);                             \
  }
SVDQ_W4A16_GEMV(w4a16_gemv_bf16_m1, svdq::bfloat16, 1, 4)
SVDQ_W4A16_GEMV(w4a16_gemv_bf16_m2, svdq::bfloat16, 2, 4)
SVDQ_W4A16_GEMV(w4a16_gemv_bf16_m4, svdq::bfloat16, 4, 2)
SVDQ_W4A16_GEMV(w4a16_gemv_bf16_m8, svdq::bfloat16, 8, 2)
SVDQ_W4A16_GEMV(w4a16_gemv_fp16_m1, svdq::float16, 1, 4)
SVDQ_W4A16_GEMV(w4a16_gemv_fp16_m2, svdq::float16, 2, 4)
SVDQ_W4A16_GEMV(w4a16_gemv_fp16_m4, svdq::float16, 4, 2)
SVDQ_W4A16_GEMV(w4a16_gemv_fp16_m8, svdq::float16, 8, 2)
