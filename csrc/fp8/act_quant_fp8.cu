// FP8 execution's input quantization (docs/DESIGN.md#fp8-execution; any sm_89 or newer GPU: the e4m3
// conversion instruction): per token (row m of x [M, K], bf16 or fp16)
//
//   amax[m] = max_k |x[m, k]|,   codes[m, k] = e4m3(x[m, k] * (448 / amax[m])),   scales[m] = amax[m] / 448,
//
// the product in fp32 (448 / amax an IEEE division), converted once to e4m3 by round to nearest even
// with saturation; a token whose amax is 0 gets 0 codes and scale. numerics.quantize_fp8_per_token
// bit for bit. The codes feed cuBLAS's FP8 GEMM (torch._scaled_mm) with the scales per row.
// Layouts: x [M, K] row-major, codes [M, K] bytes row-major, scales [M] fp32.
//
// Work split: one CTA of kThreads threads per token; thread t reads the 16-byte chunks t, t + kThreads,
// ... of the row (8 values each) for the amax, the CTA takes the largest (warp shuffles, then shared
// memory), and the same threads read their chunks again (from L1/L2: the row was just read) and store
// 8 codes each as one 8-byte word.
//
// Entry points: fp8_act_quant_{bf16,fp16}(const T* x, uint8_t* codes, float* scales, int M, int K);
// grid (M), block kThreads. Requires K % 8 == 0 and x, codes on 16- and 8-byte boundaries.
#include "device.cuh"

namespace svdq {
namespace {

constexpr int kThreads = 256;
constexpr float kE4M3Max = 448.f;  // numerics.E4M3_MAX

// two floats as e4m3 bytes (round to nearest even, saturating), lo in the low byte
__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

template <typename T>
__device__ __forceinline__ void fp8_act_quant(const T* __restrict__ x, uint8_t* __restrict__ codes,
                                              float* __restrict__ scales, int K) {
  __shared__ float warp_max[kThreads / 32];
  const int tid = threadIdx.x, chunks = K / 8;
  const uint4* row = reinterpret_cast<const uint4*>(x + static_cast<size_t>(blockIdx.x) * K);
  float amax = 0.f;
  for (int c = tid; c < chunks; c += kThreads) {
    float v[8];
    unpack8<T>(__ldg(row + c), v);
#pragma unroll
    for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(v[e]));
  }
#pragma unroll
  for (int d = 16; d > 0; d /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
  if (tid % 32 == 0) warp_max[tid / 32] = amax;
  __syncthreads();
  amax = warp_max[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) amax = fmaxf(amax, warp_max[w]);
  const float inv = amax > 0.f ? __fdiv_rn(kE4M3Max, amax) : 0.f;
  if (tid == 0) scales[blockIdx.x] = __fdiv_rn(amax, kE4M3Max);
  uint2* out = reinterpret_cast<uint2*>(codes + static_cast<size_t>(blockIdx.x) * K);
  for (int c = tid; c < chunks; c += kThreads) {
    float v[8];
    unpack8<T>(__ldg(row + c), v);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = __fmul_rn(v[e], inv);
    out[c] = make_uint2(e4m3x2(v[0], v[1]) | e4m3x2(v[2], v[3]) << 16, e4m3x2(v[4], v[5]) | e4m3x2(v[6], v[7]) << 16);
  }
}

}  // namespace
}  // namespace svdq

#define SVDQ_FP8_ACT_QUANT_ENTRY(NAME, T)                                                                   \
  extern "C" __global__ void __launch_bounds__(svdq::kThreads)                                           \
      NAME(const T* x, uint8_t* codes, float* scales, int M, int K) {                                      \
    if (static_cast<int>(blockIdx.x) < M) svdq::fp8_act_quant<T>(x, codes, scales, K);                      \
  }

SVDQ_FP8_ACT_QUANT_ENTRY(fp8_act_quant_bf16, svdq::bfloat16)
SVDQ_FP8_ACT_QUANT_ENTRY(fp8_act_quant_fp16, svdq::float16)
