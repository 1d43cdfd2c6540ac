// Kernel 1: SVDQuant activation quantization fused with the low-rank down projection (sm_90a).
//
// One read of x [M, K] (16-bit) feeds both outputs:
//   codes   [M, K]      INT4 codes as e4m3 bytes, in the order kernel 2 consumes (below);
//   ascales [K/64, m_al] per-(token, 64-group) scales, rounded to x's dtype, stored as fp32;
//   lora_act [M, rank]   x @ lora_down, fp32 accumulation (tensor-core mma), stored in x's dtype.
//
// Numerics are those of numerics.quantize_activations, bit for bit:
//   v = (x + shift) / smooth (fp32, IEEE division); unsigned groups (shift > 0) clamp v at 0;
//   scale = dtype(amax / qmax), qmax = 7 or 15; code = clamp(rint(v / scale)), 0 where scale == 0.
// Both divisions use a correctly rounded reciprocal and one Markstein correction step
// (q = n*r; q += (n - q*d)*r), which returns the correctly rounded quotient whenever the quotient
// is a normal number: checked exhaustively on the host for bf16 numerators against every bf16
// divisor and on 2e8 random fp32 pairs. Quotients outside [2^-100, 2^100] take __fdiv_rn.
// Rounding ties therefore break exactly as in the reference (rint = round half to even).
//
// Layout of `codes` (kernel 2 reads it with TMA and feeds it to wgmma as the B operand):
//   codes[m, 64 g + p] = e4m3(code[m, 64 g + perm(p)]),   perm(32 s + 16 h + 4 q + j) = 16 q + 8 s + 2 j + h
//   (s, h in {0, 1}; q, j in [0, 4)). Over the two k32 steps of a group, lane q of a wgmma A
//   fragment row holds k positions {32 s + 16 h + 4 q + j}; the permutation maps them onto the 16
//   consecutive natural columns 16q..16q+15, i.e. bytes 8q..8q+7 of the natural packed weight row,
//   with the even nibbles of a packed word on h = 0 and the odd ones on h = 1. Kernel 2 therefore
//   reads qweight in its natural layout and splits nibbles straight into fragment registers.
//   Integer codes are exact in e4m3 (-8..15).
//
// Work split: a CTA owns 32 tokens and a slice of up to 128 ranks (grid.y; only slice 0 writes
// codes and scales), and streams K in chunks of 128 columns through a 4-stage cp.async pipeline.
// Quantization: 8 threads per (token, group), 8 columns each. Low-rank: mma.m16n8k16 on the x
// tile and the lora_down tile, each warp one 16-token half and every 4th 8-rank column block.
#include <cuda_fp8.h>

#include <algorithm>

#include "common.cuh"
#include "launchers.h"

namespace svdq::sm90 {
namespace {

constexpr int kTokens = 32;
constexpr int kChunk = 128;
constexpr int kStages = 4;
constexpr int kThreads = 256;
constexpr int kRankSlice = 128;
// x tile rows are padded by 16 bytes so that ldmatrix rows fall in distinct bank groups.
constexpr int kXStride = kChunk * 2 + 16;
constexpr int kXTileBytes = kTokens * kXStride;

__host__ __device__ int lora_stride(int ranks) { return ranks * 2 + 16; }  // bytes per row of the lora_down tile
__host__ __device__ int stage_bytes(int ranks) { return kXTileBytes + (ranks ? kChunk * lora_stride(ranks) : 0); }

// m16n8k16 tensor-core product with fp32 accumulation, A row-major and B column-major fragments.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                            const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  // src-size 0 fills the 16 bytes with zeros (rows past M, columns past K)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(p)));
}

// n / d rounded to nearest even, given inv = 1/d rounded to nearest (see the file comment).
__device__ __forceinline__ float div_rn(float n, float d, float inv) {
  float q = __fmul_rn(n, inv);
  q = __fmaf_rn(__fmaf_rn(-q, d, n), inv, q);
  if (!(fabsf(q) >= 0x1p-100f && fabsf(q) <= 0x1p100f)) q = (n == 0.f) ? 0.f : __fdiv_rn(n, d);
  return q;
}

__device__ __forceinline__ uint32_t e4m3x4(float a, float b, float c, float d) {
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(c, d), __NV_SATFINITE, __NV_E4M3);
  return lo | (hi << 16);
}

__device__ __forceinline__ void load8(float (&v)[8], const float* p) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

// Quantizes one (token, group) octet: 8 consecutive columns starting at k (a multiple of 8).
template <typename T>
__device__ __forceinline__ void quantize_octet(const ActQuantArgs& a, const uint8_t* xrow, int tok, int k,
                                               int t8) {
  using H = Half<T>;
  const uint4 raw = *reinterpret_cast<const uint4*>(xrow);
  const T* xv = reinterpret_cast<const T*>(&raw);
  float sm[8], inv[8], v[8];
  load8(sm, a.smooth + k);
  load8(inv, a.inv_smooth + k);
  bool uns = false;
  if (a.shift) {
    float sh[8];
    load8(sh, a.shift + k);
    uns = sh[0] > 0.f;  // a group is all shifted or not at all (numerics.unsigned_groups_from_shift)
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = __fadd_rn(H::to_float(xv[e]), sh[e]);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = H::to_float(xv[e]);
  }
  float amax = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    v[e] = div_rn(v[e], sm[e], inv[e]);
    if (uns) v[e] = fmaxf(v[e], 0.f);
    amax = fmaxf(amax, fabsf(v[e]));
  }
  // the 8 lanes of a (token, group) are consecutive lanes of one warp
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
  const float scale = H::round(__fdiv_rn(amax, uns ? 15.f : 7.f));
  const float lo = uns ? 0.f : -8.f, hi = uns ? 15.f : 7.f;
  float c[8];
  if (scale > 0.f) {
    const float inv_scale = __frcp_rn(scale);
#pragma unroll
    for (int e = 0; e < 8; ++e) c[e] = fminf(fmaxf(rintf(div_rn(v[e], scale, inv_scale)), lo), hi);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) c[e] = 0.f;
  }
  if (tok < a.M) {
    // natural columns 8 t8 + e of the group go to p = 32 s + 16 h + 4 q + j with
    // q = t8 / 2, s = t8 % 2, e = 2 j + h: one word of even columns, one of odd columns
    uint8_t* dst = a.codes + static_cast<size_t>(tok) * a.K + (k & ~63) + 32 * (t8 & 1) + 4 * (t8 >> 1);
    *reinterpret_cast<uint32_t*>(dst) = e4m3x4(c[0], c[2], c[4], c[6]);
    *reinterpret_cast<uint32_t*>(dst + 16) = e4m3x4(c[1], c[3], c[5], c[7]);
  }
  if (t8 == 0 && tok < a.m_al) a.ascales[static_cast<size_t>(k / 64) * a.m_al + tok] = tok < a.M ? scale : 0.f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) act_quant_kernel(const ActQuantArgs a) {
  using H = Half<T>;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int tok0 = blockIdx.x * kTokens;
  const int r0 = blockIdx.y * kRankSlice;
  const int ranks = a.rank ? min(kRankSlice, a.rank - r0) : 0;  // this CTA's rank slice
  const int lstride = lora_stride(ranks);
  const int sbytes = stage_bytes(ranks);
  const int nchunks = (a.K + kChunk - 1) / kChunk;
  const T* x = static_cast<const T*>(a.x);
  const T* down = static_cast<const T*>(a.lora_down);

  auto load_chunk = [&](int c) {
    uint8_t* xs = smem + (c % kStages) * sbytes;
    const int k0 = c * kChunk;
    for (int p = tid; p < kTokens * (kChunk / 8); p += kThreads) {
      const int row = p / (kChunk / 8), k = k0 + 8 * (p % (kChunk / 8));
      const bool ok = tok0 + row < a.M && k < a.K;
      cp_async16(xs + row * kXStride + (k - k0) * 2, ok ? x + static_cast<size_t>(tok0 + row) * a.K + k : x, ok);
    }
    const int per_row = ranks / 8;
    for (int p = tid; p < kChunk * per_row; p += kThreads) {
      const int row = p / per_row, col = 8 * (p % per_row);
      const bool ok = k0 + row < a.K;
      cp_async16(xs + kXTileBytes + row * lstride + col * 2,
                 ok ? down + static_cast<size_t>(k0 + row) * a.rank + r0 + col : down, ok);
    }
  };

#pragma unroll
  for (int c = 0; c < kStages - 1; ++c) {
    if (c < nchunks) load_chunk(c);
    cp_async_commit();
  }

  const int mt = warp & 1, nbase = warp >> 1, n8 = ranks / 8;  // low-rank: 16-token half, 8-rank blocks
  const int tl = tid / 8, t8 = tid % 8;                         // quantization: token row, column octet
  float acc[4][4] = {};
  for (int c = 0; c < nchunks; ++c) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // chunk c landed for every thread, and chunk c-1's stage is free for reuse
    if (c + kStages - 1 < nchunks) load_chunk(c + kStages - 1);
    cp_async_commit();

    const uint8_t* xs = smem + (c % kStages) * sbytes;
    if (blockIdx.y == 0) {
#pragma unroll
      for (int gi = 0; gi < kChunk / 64; ++gi) {
        const int k = c * kChunk + 64 * gi + 8 * t8;
        if (c * kChunk + 64 * gi < a.K)  // K is a multiple of 64: uniform over the warp
          quantize_octet<T>(a, xs + tl * kXStride + (64 * gi + 8 * t8) * 2, tok0 + tl, k, t8);
      }
    }
    if (n8) {
      const uint8_t* ls = xs + kXTileBytes;
#pragma unroll
      for (int ks = 0; ks < kChunk / 16; ++ks) {
        uint32_t af[4];
        ldmatrix_x4(af, xs + (16 * mt + (lane & 15)) * kXStride + (16 * ks + 8 * (lane >> 4)) * 2);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int nt = nbase + 4 * i;
          if (nt < n8) {
            uint32_t bf[2];
            ldmatrix_x2_trans(bf, ls + (16 * ks + (lane & 15)) * lstride + nt * 16);
            mma_m16n8k16<T>(acc[i], af, bf);
          }
        }
      }
    }
  }

  if (n8) {
    T* out = static_cast<T*>(a.lora_act);
    const int g = lane / 4, q = lane % 4;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int nt = nbase + 4 * i;
      if (nt >= n8) continue;
      const int col = r0 + 8 * nt + 2 * q;
      const int ta = tok0 + 16 * mt + g, tb = ta + 8;
      if (ta < a.M) *reinterpret_cast<uint32_t*>(out + static_cast<size_t>(ta) * a.rank + col) = H::pack2(acc[i][0], acc[i][1]);
      if (tb < a.M) *reinterpret_cast<uint32_t*>(out + static_cast<size_t>(tb) * a.rank + col) = H::pack2(acc[i][2], acc[i][3]);
    }
  }
}

}  // namespace

const char* act_quant(const ActQuantArgs& a, cudaStream_t stream) {
  if (a.M <= 0 || a.K <= 0 || a.K % 64) return "act_quant: K must be a positive multiple of 64 and M positive";
  if (a.rank < 0 || a.rank % 16 || a.rank > 1024) return "act_quant: rank must be a multiple of 16 in [0, 1024]";
  if (a.m_al < a.M || a.m_al % 4) return "act_quant: m_al must be M rounded up to a multiple of 4";
  for (const void* p : {a.x, static_cast<const void*>(a.smooth), static_cast<const void*>(a.inv_smooth),
                        static_cast<const void*>(a.shift), a.lora_down, static_cast<const void*>(a.codes),
                        static_cast<const void*>(a.ascales), static_cast<const void*>(a.lora_act)})
    if (reinterpret_cast<uintptr_t>(p) & 15) return "act_quant: every tensor must start on a 16-byte boundary";
  const int smem = kStages * stage_bytes(std::min(a.rank, kRankSlice));
  const dim3 grid((a.m_al + kTokens - 1) / kTokens, a.rank ? (a.rank + kRankSlice - 1) / kRankSlice : 1);
  auto kernel = a.dtype == DType::kBF16 ? act_quant_kernel<__nv_bfloat16> : act_quant_kernel<__half>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err == cudaSuccess) {
    kernel<<<grid, kThreads, smem, stream>>>(a);
    err = cudaGetLastError();
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace svdq::sm90
