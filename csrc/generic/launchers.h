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

}  // namespace svdq::generic
