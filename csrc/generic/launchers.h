// Host entry points of the kernels that run on any sm_80+ GPU, callable from plain C++
// (bindings.cpp). Each returns nullptr on success or a static error message.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace svdq::generic {

// The most rows of x the W4A16 GEMV takes; more rows go to a dequantize + GEMM path.
constexpr int kMaxGemvRows = 8;

// W4A16 GEMV (w4a16_gemv.cu): y [M, N] = x [M, K] @ W^T + bias, W from 4-bit codes and group scales.
struct W4A16GemvArgs {
  bool bf16;                // dtype of x, wscales, wzeros, bias and y (else fp16)
  const void* x;            // [M, K] row-major
  const uint8_t* qweight;   // [N, K/2] natural packing, unsigned codes
  const void* wscales;      // [K/64, N]
  const void* wzeros;       // [K/64, N]
  const void* bias;         // [N] or nullptr
  void* y;                  // [M, N]
  int M, N, K;
};
const char* w4a16_gemv(const W4A16GemvArgs& a, cudaStream_t stream);

// W4A16 dequantization (w4a16_dequant.cu): W [N, K] = code * wscales[g, n] + wzeros[g, n] in fp32,
// rounded once to the output type (numerics.dequantize_w4a16), for a GEMM over many rows of x.
enum class OutType { kBF16, kF16, kF32 };
struct W4A16DequantArgs {
  bool bf16_scales;         // dtype of wscales and wzeros (else fp16)
  OutType out;              // dtype of w
  const uint8_t* qweight;   // [N, K/2] natural packing, unsigned codes
  const void* wscales;      // [K/64, N]
  const void* wzeros;       // [K/64, N]
  void* w;                  // out [N, K]
  int N, K;
};
const char* w4a16_dequant(const W4A16DequantArgs& a, cudaStream_t stream);

}  // namespace svdq::generic
