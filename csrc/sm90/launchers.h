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
  bool pow2;                  // power-of-two restricted scales (numerics.quantize_activations_pow2)
  bool int8_operands;         // pow2 only: codes as s8 bytes of code * 2^(3-e) (for w4a4_gemm_pow2)
  const void* x;              // [M, K] row-major
  const float* smooth;        // [K] fp32 copy of the layer's smooth
  const float* inv_smooth;    // [K] 1 / smooth in fp32, correctly rounded
  const float* shift;         // [K/64] one shift per group (kernels.group_shifts), or nullptr; > 0 marks an unsigned group
  const void* lora_down;      // [rank, K]: lora_down repacked by kernels.lora_down_sm90 (act_quant.cu)
  uint8_t* codes;             // out [M, K]: e4m3 bytes of the INT4 codes (pow2: of code * 2^-e, or s8), K permuted per group
  float* ascales;             // out: [K/64, m_al] group scales (pow2: [1, m_al] token scales), rounded to dtype, fp32
  void* lora_act;             // out [M, rank] in dtype: x @ lora_down accumulated in fp32
  int M, K, rank, m_al;       // m_al = round_up(M, 4); ascales rows M..m_al-1 are written as 0
};
const char* act_quant(const ActQuantArgs& args, cudaStream_t stream);

// Kernel 2 (w4a4_gemm.cu): y = sum_g ascale * wscale * (codes . qweight) + lora_act @ lora_up^T + bias.
struct W4A4GemmArgs {
  DType dtype;                // of wscales, lora_act, lora_up, bias and y
  const uint8_t* codes;       // [M, K] from act_quant
  const float* ascales;       // [ascale_rows, m_al] from act_quant
  const void* lora_act;       // [M, rank] from act_quant
  const uint8_t* qweight;     // [N, K/2] natural layout: signed INT4 pairs, low nibble = even column
  const void* wscales;        // [K/64, N]
  const void* lora_up;        // [N, rank]
  const void* bias;           // [N] or nullptr
  void* y;                    // out [M, N] row-major
  int M, N, K, rank, m_al;
  int ascale_rows;            // K/64 (per-group scales) or 1 (per-token scales of pow2 mode)
  int gelu_from;              // y[:, gelu_from:] = GELU(tanh approximation) of the above; < 0: none
};
const char* w4a4_gemm(const W4A4GemmArgs& args, cudaStream_t stream);

// Fast kernel 2 (w4a4_gemm_pow2.cu), for power-of-two weight scales wscales[g, n] = wbase[n] * 2^-wexp[g, n]
// and pow2-mode activations with int8 operands:
// y = atok[m] * wbase[n] * 2^-7 * sum_k (code_a 2^(3-e))(code_w 2^(4-wexp)) + lora_act @ lora_up^T + bias.
struct W4A4Pow2GemmArgs {
  DType dtype;                // of lora_act, lora_up, bias and y
  const uint8_t* codes;       // [M, K] from act_quant in pow2 mode with int8 operands
  const float* atok;          // [m_al] from act_quant in pow2 mode
  const void* lora_act;       // [M, rank] from act_quant
  const uint8_t* qweight;     // [N, K/2] natural layout
  const uint8_t* wexp;        // [K/64, n_al] exponents in [0, 4], n_al = round_up(N, 16)
  const float* wbase;         // [N] row bases
  const void* lora_up;        // [N, rank]
  const void* bias;           // [N] or nullptr
  void* y;                    // out [M, N] row-major
  int M, N, K, rank, m_al, n_al;
  int tile_t;                 // tokens per CTA tile: 128, 256, or 0 (chosen by M and N)
  int half_rows;              // 256-token tiles: the last half_rows token rows as 128-token tiles; -1: chosen
  int gelu_from;              // y[:, gelu_from:] = GELU(tanh approximation) of the above; < 0: none
};
const char* w4a4_gemm_pow2(const W4A4Pow2GemmArgs& args, cudaStream_t stream);

}  // namespace svdq::sm90
