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
//
// Entry points (host side: svdquant/families/w4a16.py), one per scale dtype S and output dtype O:
//   w4a16_dequant_<bf16|fp16>_to_<bf16|fp16|fp32>(const uint32_t* qweight, const S* wscales,
//                                                 const S* wzeros, O* w, int N, int K)
// grid ceil(N K / 8 / 256) CTAs of 256 threads; qweight and w start on 16-byte boundaries; K is a
// multiple of 64.
#include "device.cuh"

namespace svdq {
namespace {

constexpr int kThreads = 256;

// 8 fp32 values rounded to the output type, stored as one 16- or 32-byte row segment
template <typename O>
__device__ __forceinline__ void store8(O* p, const float (&v)[8]) {
  *reinterpret_cast<uint4*>(p) =
      make_uint4(pack2_rn<O>(v[0], v[1]), pack2_rn<O>(v[2], v[3]), pack2_rn<O>(v[4], v[5]), pack2_rn<O>(v[6], v[7]));
}
__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  *(reinterpret_cast<float4*>(p) + 1) = make_float4(v[4], v[5], v[6], v[7]);
}

template <typename S, typename O>
__device__ __forceinline__ void w4a16_dequant(const uint32_t* __restrict__ qweight, const S* __restrict__ wscales,
                                              const S* __restrict__ wzeros, O* __restrict__ w, int N, int K) {
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

}  // namespace
}  // namespace svdq

#define SVDQ_W4A16_DEQUANT(NAME, S, O)                                                                       \
  extern "C" __global__ void __launch_bounds__(svdq::kThreads)                                              \
      NAME(const uint32_t* __restrict__ qweight, const S* __restrict__ wscales, const S* __restrict__ wzeros, \
           O* __restrict__ w, int n, int k) {                                                                \
    svdq::w4a16_dequant<S, O>(qweight, wscales, wzeros, w, n, k);                                            \
  }
SVDQ_W4A16_DEQUANT(w4a16_dequant_bf16_to_bf16, svdq::bfloat16, svdq::bfloat16)
SVDQ_W4A16_DEQUANT(w4a16_dequant_bf16_to_fp16, svdq::bfloat16, svdq::float16)
SVDQ_W4A16_DEQUANT(w4a16_dequant_bf16_to_fp32, svdq::bfloat16, float)
SVDQ_W4A16_DEQUANT(w4a16_dequant_fp16_to_bf16, svdq::float16, svdq::bfloat16)
SVDQ_W4A16_DEQUANT(w4a16_dequant_fp16_to_fp16, svdq::float16, svdq::float16)
SVDQ_W4A16_DEQUANT(w4a16_dequant_fp16_to_fp32, svdq::float16, float)
