// W4A16 weight dequantization for many rows of x (any sm_80+ GPU): the 4-bit T5-XXL's linears see a
// whole prompt (hundreds of tokens), where W once in 16 bits and one cuBLAS GEMM beat a GEMV per
// few rows. W is materialized for the one call only.
//
//   W[n, k] = out(code[n, k] * wscale[g, n] + wzero[g, n]),   g = k / 64
//
// in fp32 (one rounded multiply, one rounded add) and rounded once to the output type, bit for bit
// numerics.dequantize_w4a16(...).to(out) as the reference path computes it.
// Layouts (natural format): qweight uint8 [N, K/2], byte j of a row holding code[2j] | code[2j+1] << 4;
// wscales, wzeros [K/64, N] (bf16 or fp16); W [N, K] row-major, bf16, fp16 or fp32.
// Work split: a thread owns 8 consecutive codes of a row (one 32-bit word of qweight), consecutive
// threads consecutive words of the row, so the qweight reads and the W writes are coalesced and the
// 8 threads of a group read the same scale and zero.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "launchers.h"

namespace svdq::generic {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// 8 fp32 values rounded to the output type, stored as one 16- or 32-byte row segment
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&v)[8]) {
  uint4 w;
  __nv_bfloat162 h[4] = {__floats2bfloat162_rn(v[0], v[1]), __floats2bfloat162_rn(v[2], v[3]),
                         __floats2bfloat162_rn(v[4], v[5]), __floats2bfloat162_rn(v[6], v[7])};
  memcpy(&w, h, 16);
  *reinterpret_cast<uint4*>(p) = w;
}
__device__ __forceinline__ void store8(__half* p, const float (&v)[8]) {
  uint4 w;
  __half2 h[4] = {__floats2half2_rn(v[0], v[1]), __floats2half2_rn(v[2], v[3]), __floats2half2_rn(v[4], v[5]),
                  __floats2half2_rn(v[6], v[7])};
  memcpy(&w, h, 16);
  *reinterpret_cast<uint4*>(p) = w;
}
__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  *(reinterpret_cast<float4*>(p) + 1) = make_float4(v[4], v[5], v[6], v[7]);
}

template <typename S, typename O>
__global__ void __launch_bounds__(kThreads) w4a16_dequant_kernel(const uint32_t* __restrict__ qweight,
                                                                 const S* __restrict__ wscales,
                                                                 const S* __restrict__ wzeros, O* __restrict__ w,
                                                                 int N, int K) {
  const int words = K / 8;  // per row
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= static_cast<int64_t>(N) * words) return;
  const int n = static_cast<int>(i / words), j = static_cast<int>(i % words), g = j / 8;
  const uint32_t codes = __ldg(qweight + i);
  const float scale = to_float(wscales[static_cast<int64_t>(g) * N + n]);
  const float zero = to_float(wzeros[static_cast<int64_t>(g) * N + n]);
  float v[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = __fadd_rn(__fmul_rn(static_cast<float>((codes >> (4 * e)) & 0xF), scale), zero);
  store8(w + i * 8, v);
}

template <typename S>
cudaError_t launch_out(const W4A16DequantArgs& a, cudaStream_t stream) {
  const int64_t threads = static_cast<int64_t>(a.N) * (a.K / 8);
  const unsigned blocks = static_cast<unsigned>((threads + kThreads - 1) / kThreads);
  const auto* q = reinterpret_cast<const uint32_t*>(a.qweight);
  const auto* s = static_cast<const S*>(a.wscales);
  const auto* z = static_cast<const S*>(a.wzeros);
  switch (a.out) {
    case OutType::kBF16:
      w4a16_dequant_kernel<<<blocks, kThreads, 0, stream>>>(q, s, z, static_cast<__nv_bfloat16*>(a.w), a.N, a.K);
      break;
    case OutType::kF16:
      w4a16_dequant_kernel<<<blocks, kThreads, 0, stream>>>(q, s, z, static_cast<__half*>(a.w), a.N, a.K);
      break;
    case OutType::kF32:
      w4a16_dequant_kernel<<<blocks, kThreads, 0, stream>>>(q, s, z, static_cast<float*>(a.w), a.N, a.K);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

const char* w4a16_dequant(const W4A16DequantArgs& a, cudaStream_t stream) {
  if (a.N <= 0 || a.K <= 0 || a.K % 64) return "w4a16_dequant: needs N > 0 and K a positive multiple of 64";
  if ((reinterpret_cast<uintptr_t>(a.qweight) | reinterpret_cast<uintptr_t>(a.w)) & 15)
    return "w4a16_dequant: qweight and w must start on a 16-byte boundary";
  const cudaError_t err = a.bf16_scales ? launch_out<__nv_bfloat16>(a, stream) : launch_out<__half>(a, stream);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace svdq::generic
