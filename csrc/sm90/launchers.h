// Host entry points of the sm_90a kernels, callable from plain C++ (bindings.cpp) without CUDA
// headers beyond the runtime API. Each returns nullptr on success or a static error message.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace svdq::sm90 {

enum class DType { kBF16, kF16 };

// Kernel 1 (act_quant.cu): quantize the activations of an SVDQuant layer and compute the low-rank
// down projection from the same read of x.
struct ActQuantArgs {
  DType dtype;                // of x, lora_down and lora_act
  const void* x;              // [M, K] row-major
  const float* smooth;        // [K] fp32 copy of the layer's smooth
  const float* inv_smooth;    // [K] 1 / smooth in fp32, correctly rounded
  const float* shift;         // [K] fp32, or nullptr (all groups signed); shift > 0 marks an unsigned group
  const void* lora_down;      // [K, rank] row-major (unused when rank == 0)
  uint8_t* codes;             // out [M, K]: e4m3 bytes of the INT4 codes, K permuted per group (act_quant.cu)
  float* ascales;             // out [K/64, m_al]: the group scales (rounded to dtype) as fp32
  void* lora_act;             // out [M, rank] in dtype: x @ lora_down accumulated in fp32
  int M, K, rank, m_al;       // m_al = round_up(M, 4); ascales rows M..m_al-1 are written as 0
  int ksplits;                // from act_quant_plan: CTAs along K per 32-token block
  float* partials;            // [ksplits, plan.m_pad, rank] fp32 workspace (ksplits > 1 and rank > 0)
  int* counters;              // [plan.counters] zero-filled; left zero-filled
};
// How kernel 1 splits K across CTAs for this size on the current device, and the workspace it needs.
struct ActQuantPlan {
  int ksplits;
  int m_pad;                  // tokens rounded up to the 32-token blocks
  long long partial_floats;   // size of `partials` (0: not needed)
  int counters;               // size of `counters` (0: not needed)
};
ActQuantPlan act_quant_plan(int M, int K, int rank);
const char* act_quant(const ActQuantArgs& args, cudaStream_t stream);

// Kernel 2 (w4a4_gemm.cu): y = sum_g ascale * wscale * (codes . qweight) + lora_act @ lora_up^T + bias.
struct W4A4GemmArgs {
  DType dtype;                // of wscales, lora_act, lora_up, bias and y
  const uint8_t* codes;       // [M, K] from act_quant
  const float* ascales;       // [K/64, m_al] from act_quant
  const void* lora_act;       // [M, rank] from act_quant
  const uint8_t* qweight;     // [N, K/2] natural layout: signed INT4 pairs, low nibble = even column
  const void* wscales;        // [K/64, N]
  const void* lora_up;        // [N, rank]
  const void* bias;           // [N] or nullptr
  void* y;                    // out [M, N] row-major
  int M, N, K, rank, m_al;
};
const char* w4a4_gemm(const W4A4GemmArgs& args, cudaStream_t stream);

}  // namespace svdq::sm90
