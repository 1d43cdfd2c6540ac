// What the two kernel-2 variants (w4a4_gemm.cu, w4a4_gemm_pow2.cu) share: the CTA's channel tile,
// thread roles, stage ring barriers, the low-rank up stage and the epilogue.
//
// A CTA owns kTileN = 128 output channels x kTileT tokens; consumer warpgroups 0 and 1 own 64
// channels each (thread accumulator element i: channel row + 8 ((i / 2) % 2), token 8 (i / 4) +
// 2 q + i % 2, with row = 64 wg + 16 wi + lane / 4 and q = lane % 4), warpgroup 2 is the TMA producer.
#pragma once

#include "common.cuh"

namespace svdq::sm90 {

constexpr int kTileN = 128;     // channels per CTA
constexpr int kLoraChunk = 32;  // ranks per low-rank stage: one 64-byte swizzled row
constexpr int kThreads = 384;   // two consumer warpgroups and the producer's
// Output staging tile [kTileT tokens][kTileN channels] 16-bit, rows padded by 16 bytes so that the
// transposing stmatrix stores hit distinct bank groups.
constexpr int kEpiStride = kTileN * 2 + 16;

// The stage ring's barriers: `full` completes when the producer's TMA bytes land, `empty` when all
// eight consumer warps have released the stage. Thread 0 initialises them before the CTA's first sync.
template <int kStages>
__device__ __forceinline__ void init_ring(uint64_t* full, uint64_t* empty) {
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 8);  // one arrival per consumer warp
    }
    mbar_init_fence();
  }
}

__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, 256;" ::: "memory"); }

__device__ __forceinline__ void stmatrix_x4_trans(void* p, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.x4.trans.m8n8.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(smem_u32(p)),
               "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// acc (64 channels x kN tokens of this warpgroup) += one low-rank stage: lora_up [kTileN][32] in the
// stage at lora_up_tile (this warpgroup's 64 rows) times lora_act [kN][32] at lora_act_tile, both
// 16-bit K-major and 64-byte swizzled; waits for the wgmma to complete.
template <typename T, int kN>
__device__ __forceinline__ void lowrank_up_chunk(float (&acc)[kN / 2], const uint8_t* lora_up_tile,
                                                 const uint8_t* lora_act_tile) {
  constexpr bool kBF16 = Half<T>::kIsBF16;
  const uint64_t da = desc_k_sw64(lora_up_tile), db = desc_k_sw64(lora_act_tile);
  wgmma_fence();
#pragma unroll
  for (int k16 = 0; k16 < 2; ++k16) {  // ranks 16 k16 .. 16 k16 + 15 of the chunk: +32 bytes each
    if constexpr (kN == 128)
      kBF16 ? wgmma_m64n128k16_bf16_ss(acc, da + 2 * k16, db + 2 * k16)
            : wgmma_m64n128k16_f16_ss(acc, da + 2 * k16, db + 2 * k16);
    else
      kBF16 ? wgmma_m64n256k16_bf16_ss(acc, da + 2 * k16, db + 2 * k16)
            : wgmma_m64n256k16_f16_ss(acc, da + 2 * k16, db + 2 * k16);
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(acc);
}

// 2^x by the special-function unit (ex2.approx: relative error ~2^-22, +inf past 2^128)
__device__ __forceinline__ float exp2f_approx(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// GELU with the tanh approximation (torch.nn.functional.gelu(approximate="tanh")), written as
// 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3): one exp2 and one
// reciprocal (relative errors ~2^-22), no cancellation for negative x (the denominator is >= 1),
// and x / inf = -0 where e^(-2u) overflows. The hardware tanh (tanh.approx.f32, ~2^-11) would be
// one special-function op instead of two, but its error exceeds fp16's rounding for x < 0.
__device__ __forceinline__ float gelu_tanh(float x) {
  constexpr float kC1 = -2.f * 0.7978845608028654f * 1.4426950408889634f;  // -2 sqrt(2/pi) log2(e)
  constexpr float kC3 = kC1 * 0.044715f;
  const float e = exp2f_approx(x * fmaf(kC3, x * x, kC1));
  return __fdividef(x, 1.f + e);
}

// Epilogue of a consumer warpgroup's tile (accumulator layout above): + bias, GELU on channels from
// gelu_from on (none where gelu_from < 0; FLUX's MLP input layers, whose next layer takes
// GELU(y)), round to T, transpose through the staging tile epi, 16-byte row stores of y [M, N];
// rows past M and channels past N are not stored. With a residual [M, N] (FLUX's gated residual
// streams, numerics.gated_residual) each stored value is residual + T(gate * y), rounded to T, gate
// [B, N] the row of token m's batch m / gate_rows; y may be the residual itself (each element is read
// and written by one thread). Ends with the staging tile fully read (both consumer warpgroups
// synchronised). Further element-wise steps belong here, in fp32, before the rounding.
template <typename T, int kTileT>
__device__ __forceinline__ void store_tile(float (&acc)[kTileT / 2], uint8_t* epi, const T* __restrict__ bias,
                                           T* y, int ch0, int tok0, int M, int N, int gelu_from, const T* residual,
                                           const T* __restrict__ gate, int gate_rows) {
  const int wg = threadIdx.x / 128, wi = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int row = 64 * wg + 16 * wi + lane / 4;
  float b0 = 0.f, b1 = 0.f;
  if (bias) {
    if (ch0 + row < N) b0 = to_float(bias[ch0 + row]);
    if (ch0 + row + 8 < N) b1 = to_float(bias[ch0 + row + 8]);
  }
  // acc[i] belongs to channel row where i % 4 < 2, to row + 8 otherwise (the layout above)
#pragma unroll
  for (int i = 0; i < kTileT / 2; ++i) acc[i] += (i % 4) < 2 ? b0 : b1;
  if (gelu_from >= 0 && ch0 + kTileN > gelu_from) {  // the tile has channels past gelu_from
    const bool g0 = ch0 + row >= gelu_from, g1 = ch0 + row + 8 >= gelu_from;
#pragma unroll
    for (int i = 0; i < kTileT / 2; ++i)
      if ((i % 4) < 2 ? g0 : g1) acc[i] = gelu_tanh(acc[i]);
  }
  const int mi = lane / 8;  // the 8x8 matrix whose row address this lane supplies
#pragma unroll
  for (int j = 0; j < kTileT / 8; j += 2) {  // token blocks j, j + 1 (8 tokens each) x channel halves
    const uint32_t r[4] = {pack2_rn<T>(acc[4 * j + 0], acc[4 * j + 1]),
                           pack2_rn<T>(acc[4 * j + 2], acc[4 * j + 3]),
                           pack2_rn<T>(acc[4 * j + 4], acc[4 * j + 5]),
                           pack2_rn<T>(acc[4 * j + 6], acc[4 * j + 7])};
    const int tok = 8 * (j + (mi >> 1)) + lane % 8;
    const int ch = 64 * wg + 16 * wi + 8 * (mi & 1);
    stmatrix_x4_trans(epi + tok * kEpiStride + ch * 2, r);
  }
  consumers_sync();
  constexpr int kChunks = kTileT * (kTileN / 8);  // 16-byte chunks of the tile, 256 threads storing them
  if (!residual) {
    for (int i = threadIdx.x; i < kChunks; i += 256) {
      const int t = i / (kTileN / 8), c8 = i % (kTileN / 8);
      const int tok = tok0 + t, ch = ch0 + 8 * c8;
      if (tok < M && ch < N)
        *reinterpret_cast<uint4*>(y + static_cast<size_t>(tok) * N + ch) =
            *reinterpret_cast<const uint4*>(epi + t * kEpiStride + c8 * 16);
    }
  } else {
    // kBatch chunks' residual and gate loads in flight at once: y may be the residual, so the compiler keeps
    // each store after every load before it, and one chunk at a time would wait for each load in turn
    constexpr int kBatch = 8;
    for (int i0 = threadIdx.x; i0 < kChunks; i0 += 256 * kBatch) {
      uint4 r[kBatch], g[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int i = i0 + 256 * u, t = i / (kTileN / 8), ch = ch0 + 8 * (i % (kTileN / 8)), tok = tok0 + t;
        if (i < kChunks && tok < M && ch < N) {
          r[u] = *reinterpret_cast<const uint4*>(residual + static_cast<size_t>(tok) * N + ch);
          g[u] = __ldg(reinterpret_cast<const uint4*>(gate + static_cast<size_t>(tok / gate_rows) * N + ch));
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int i = i0 + 256 * u, t = i / (kTileN / 8), c8 = i % (kTileN / 8), tok = tok0 + t, ch = ch0 + 8 * c8;
        if (i < kChunks && tok < M && ch < N) {
          float v[8], rv[8], gv[8];
          unpack8<T>(*reinterpret_cast<const uint4*>(epi + t * kEpiStride + c8 * 16), v);
          unpack8<T>(r[u], rv);
          unpack8<T>(g[u], gv);
#pragma unroll
          for (int e = 0; e < 8; ++e) v[e] = __fadd_rn(rv[e], round_to<T>(__fmul_rn(v[e], gv[e])));
          *reinterpret_cast<uint4*>(y + static_cast<size_t>(tok) * N + ch) = pack8<T>(v);
        }
      }
    }
  }
  consumers_sync();
}

}  // namespace svdq::sm90
