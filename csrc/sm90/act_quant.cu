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
// Work split: a CTA owns 32 tokens, a slice of up to 128 ranks (grid.y; only slice 0 writes codes
// and scales) and a range of K (grid.z, sized by act_quant_plan so that ~3 CTAs run per SM even at
// small M), streamed in chunks of 128 columns through a 3-stage cp.async pipeline. Quantization:
// 8 threads per (token, group), 8 columns each. Low-rank: mma.m16n8k16 on the x tile and the
// lora_down tile, each warp one 16-token half and every 4th 8-rank column block. With several K
// ranges, each CTA stores its fp32 low-rank partial and the last CTA of a (token block, rank slice)
// to finish (atomic counter) sums the partials in K order, so the result is deterministic.
#include <cuda_fp8.h>

#include <algorithm>

#include "common.cuh"
#include "launchers.h"

namespace svdq::sm90 {
namespace {

constexpr int kTokens = 32;
constexpr int kChunk = 128;
constexpr int kStages = 2;  // one chunk in flight per CTA, 4 CTAs per SM
constexpr int kThreads = 256;
constexpr int kRankSlice = 128;
constexpr int kCtasPerSm = 4;  // 256 threads x 64 registers; 4 x 41 KB of shared memory at rank 32
// x tile rows are padded by 16 bytes so that ldmatrix rows fall in distinct bank groups.
constexpr int kXStride = kChunk * 2 + 16;
constexpr int kXTileBytes = kTokens * kXStride;

// Stage: x tile [32][kXStride], then smooth, 1/smooth and shift of the chunk's columns (fp32),
// then the lora_down tile [128][lora_stride].
constexpr int kParamBytes = 3 * kChunk * 4;
__host__ __device__ int lora_stride(int ranks) { return ranks * 2 + 16; }  // bytes per row of the lora_down tile
__host__ __device__ int stage_bytes(int ranks) {
  return kXTileBytes + kParamBytes + (ranks ? kChunk * lora_stride(ranks) : 0);
}

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

// n / d rounded to nearest even, given inv = 1/d rounded to nearest: exact when the quotient is a
// normal number (see the file comment); callers check that.
__device__ __forceinline__ float div_fast(float n, float d, float inv) {
  const float q = __fmul_rn(n, inv);
  return __fmaf_rn(__fmaf_rn(-q, d, n), inv, q);
}

// IEEE division for the rare cases div_fast does not cover; out of line so that the fast path
// stays small.
__device__ __noinline__ float div_exact(float n, float d) { return n == 0.f ? 0.f : __fdiv_rn(n, d); }

// The same for a single value, checked.
__device__ __forceinline__ float div_rn(float n, float d, float inv) {
  const float q = div_fast(n, d, inv);
  return fabsf(q) >= 0x1p-100f && fabsf(q) <= 0x1p100f ? q : div_exact(n, d);
}

__device__ __forceinline__ uint32_t e4m3x4(float a, float b, float c, float d) {
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(c, d), __NV_SATFINITE, __NV_E4M3);
  return lo | (hi << 16);
}

__device__ __forceinline__ void load8(float (&v)[8], const float* p) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

// Quantizes one (token, group) octet: 8 consecutive columns starting at k (a multiple of 8).
// params: this octet's smooth, then 1/smooth and shift at +kChunk and +2 kChunk floats (shared memory).
template <typename T>
__device__ __forceinline__ void quantize_octet(const ActQuantArgs& a, const uint8_t* xrow, const float* params,
                                               int tok, int k, int t8) {
  using H = Half<T>;
  const uint4 raw = *reinterpret_cast<const uint4*>(xrow);
  const T* xv = reinterpret_cast<const T*>(&raw);
  float sm[8], inv[8], n[8], v[8];
  load8(sm, params);
  load8(inv, params + kChunk);
  bool uns = false;
  if (a.shift) {
    float sh[8];
    load8(sh, params + 2 * kChunk);
    uns = sh[0] > 0.f;  // a group is all shifted or not at all (numerics.unsigned_groups_from_shift)
#pragma unroll
    for (int e = 0; e < 8; ++e) n[e] = __fadd_rn(H::to_float(xv[e]), sh[e]);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) n[e] = H::to_float(xv[e]);
  }
  float lo = INFINITY, hi = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    v[e] = div_fast(n[e], sm[e], inv[e]);
    lo = fminf(lo, fabsf(v[e]));
    hi = fmaxf(hi, fabsf(v[e]));
  }
  if (!(lo >= 0x1p-100f && hi <= 0x1p100f)) {  // a zero, tiny or huge quotient: divide exactly
    hi = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      v[e] = div_exact(n[e], sm[e]);
      hi = fmaxf(hi, fabsf(v[e]));
    }
  }
  float amax = hi;
  if (uns) {  // warp-uniform: a warp quantizes one group of 4 tokens
    amax = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      v[e] = fmaxf(v[e], 0.f);
      amax = fmaxf(amax, v[e]);
    }
  }
  // the 8 lanes of a (token, group) are consecutive lanes of one warp
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
  const float scale = H::round(uns ? div_rn(amax, 15.f, 1.f / 15.f) : div_rn(amax, 7.f, 1.f / 7.f));
  const float qlo = uns ? 0.f : -8.f, qhi = uns ? 15.f : 7.f;
  float c[8];
  if (scale >= 0x1p-100f) {
    // A normal scale is amax / qmax rounded to 8 (bf16) or 11 (fp16) significant bits, so
    // |v / scale| <= qmax * (1 + 2^-9) and rint already lies in [lo, hi] (unsigned v >= 0): the
    // reference's clamp is a no-op here. A quotient too small to be normal rounds to code 0 either way.
    const float inv_scale = __frcp_rn(scale);
#pragma unroll
    for (int e = 0; e < 8; ++e) c[e] = rintf(div_fast(v[e], scale, inv_scale));
  } else if (scale > 0.f) {
#pragma unroll
    for (int e = 0; e < 8; ++e) c[e] = fminf(fmaxf(rintf(div_exact(v[e], scale)), qlo), qhi);
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
__global__ void __launch_bounds__(kThreads, kCtasPerSm) act_quant_kernel(const ActQuantArgs a) {
  using H = Half<T>;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ bool last_split;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int tok0 = blockIdx.x * kTokens;
  const int r0 = blockIdx.y * kRankSlice;
  const int ranks = a.rank ? min(kRankSlice, a.rank - r0) : 0;  // this CTA's rank slice
  const int lstride = lora_stride(ranks);
  const int sbytes = stage_bytes(ranks);
  const int per_split = ((a.K + kChunk - 1) / kChunk + a.ksplits - 1) / a.ksplits;
  const int c0 = blockIdx.z * per_split;                                   // this CTA's chunks:
  const int nchunks = min(per_split, (a.K + kChunk - 1) / kChunk - c0);    // c0 .. c0 + nchunks - 1
  const T* x = static_cast<const T*>(a.x);
  const T* down = static_cast<const T*>(a.lora_down);

  // Chunk-invariant load assignments (16-byte cp.async pieces), so the loop only adds offsets.
  const int xr = tid / 16, xc = tid % 16;  // x rows xr and xr + 16, piece xc
  const bool xok0 = tok0 + xr < a.M, xok1 = tok0 + xr + 16 < a.M;
  const T* xsrc0 = x + static_cast<size_t>(xok0 ? tok0 + xr : 0) * a.K + 8 * xc;
  const T* xsrc1 = x + static_cast<size_t>(xok1 ? tok0 + xr + 16 : 0) * a.K + 8 * xc;
  const float* psrc = tid < 32 ? a.smooth : tid < 64 ? a.inv_smooth : a.shift;  // 32 pieces each
  const bool pload = tid < (a.shift ? 96 : 64);
  const int per_row = ranks / 8;                                    // lora_down pieces per row
  const int rows_per_pass = per_row ? kThreads / per_row : kChunk;  // rows loaded per pass
  const int lr = per_row ? tid / per_row : 0, lc = per_row ? tid % per_row : 0;
  const bool lload = per_row && lr < rows_per_pass;
  const T* lsrc = down + r0 + 8 * lc;

  auto load_chunk = [&](int c) {  // c counts from this CTA's first chunk
    uint8_t* xs = smem + (c % kStages) * sbytes;
    const int k0 = (c0 + c) * kChunk;
    const bool kok = k0 + 8 * xc < a.K;
    cp_async16(xs + xr * kXStride + xc * 16, xsrc0 + k0, xok0 && kok);
    cp_async16(xs + (xr + 16) * kXStride + xc * 16, xsrc1 + k0, xok1 && kok);
    if (pload) {
      const bool ok = k0 + 4 * (tid % 32) < a.K;
      cp_async16(xs + kXTileBytes + (tid / 32) * kChunk * 4 + (tid % 32) * 16, ok ? psrc + k0 + 4 * (tid % 32) : psrc,
                 ok);
    }
    if (lload) {
      uint8_t* ls = xs + kXTileBytes + kParamBytes + lc * 16;
      for (int row = lr; row < kChunk; row += rows_per_pass) {
        const bool ok = k0 + row < a.K;
        cp_async16(ls + row * lstride, ok ? lsrc + static_cast<size_t>(k0 + row) * a.rank : down, ok);
      }
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
    const int k0 = (c0 + c) * kChunk;
    if (blockIdx.y == 0) {
#pragma unroll
      for (int gi = 0; gi < kChunk / 64; ++gi) {
        if (k0 + 64 * gi < a.K)  // K is a multiple of 64: uniform over the warp
          quantize_octet<T>(a, xs + tl * kXStride + (64 * gi + 8 * t8) * 2,
                            reinterpret_cast<const float*>(xs + kXTileBytes) + 64 * gi + 8 * t8, tok0 + tl,
                            k0 + 64 * gi + 8 * t8, t8);
      }
    }
    // Low-rank: the tile guard is warp-uniform and outside the k loop (a guard around each
    // ldmatrix/mma costs a reconvergence block per instruction); the x fragments are reloaded
    // per rank tile, which only happens for ranks above 32.
    const uint8_t* ls = xs + kXTileBytes + kParamBytes;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int nt = nbase + 4 * i;
      if (nt >= n8) break;
#pragma unroll
      for (int ks = 0; ks < kChunk / 16; ++ks) {
        uint32_t af[4], bf[2];
        ldmatrix_x4(af, xs + (16 * mt + (lane & 15)) * kXStride + (16 * ks + 8 * (lane >> 4)) * 2);
        ldmatrix_x2_trans(bf, ls + (16 * ks + (lane & 15)) * lstride + nt * 16);
        mma_m16n8k16<T>(acc[i], af, bf);
      }
    }
  }
  if (!n8) return;

  T* out = static_cast<T*>(a.lora_act);
  const int g = lane / 4, q = lane % 4;
  if (a.ksplits == 1) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int nt = nbase + 4 * i;
      if (nt >= n8) continue;
      const int col = r0 + 8 * nt + 2 * q;
      const int ta = tok0 + 16 * mt + g, tb = ta + 8;
      if (ta < a.M) *reinterpret_cast<uint32_t*>(out + static_cast<size_t>(ta) * a.rank + col) = H::pack2(acc[i][0], acc[i][1]);
      if (tb < a.M) *reinterpret_cast<uint32_t*>(out + static_cast<size_t>(tb) * a.rank + col) = H::pack2(acc[i][2], acc[i][3]);
    }
    return;
  }
  // Several K ranges: store this CTA's fp32 partial, then the last CTA to arrive sums them in K order.
  const int m_pad = gridDim.x * kTokens;
  float* part = a.partials + static_cast<size_t>(blockIdx.z) * m_pad * a.rank;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int nt = nbase + 4 * i;
    if (nt >= n8) continue;
    const int col = r0 + 8 * nt + 2 * q;
    const int ta = tok0 + 16 * mt + g;
    *reinterpret_cast<float2*>(part + static_cast<size_t>(ta) * a.rank + col) = make_float2(acc[i][0], acc[i][1]);
    *reinterpret_cast<float2*>(part + static_cast<size_t>(ta + 8) * a.rank + col) = make_float2(acc[i][2], acc[i][3]);
  }
  __threadfence();
  __syncthreads();
  int* counter = a.counters + blockIdx.x * gridDim.y + blockIdx.y;
  if (tid == 0) last_split = atomicAdd(counter, 1) == a.ksplits - 1;
  __syncthreads();
  if (!last_split) return;
  __threadfence();
  for (int i = tid; i < kTokens * ranks / 2; i += kThreads) {
    const int t = i / (ranks / 2), col = r0 + 2 * (i % (ranks / 2));
    if (tok0 + t >= a.M) continue;
    float2 sum = make_float2(0.f, 0.f);
    for (int z = 0; z < a.ksplits; ++z) {
      const float2 p = __ldcg(reinterpret_cast<const float2*>(a.partials + (static_cast<size_t>(z) * m_pad + tok0 + t) * a.rank + col));
      sum.x += p.x, sum.y += p.y;
    }
    *reinterpret_cast<uint32_t*>(out + static_cast<size_t>(tok0 + t) * a.rank + col) = H::pack2(sum.x, sum.y);
  }
  if (tid == 0) *counter = 0;  // leave the counters zeroed
}

}  // namespace

ActQuantPlan act_quant_plan(int M, int K, int rank) {
  static int sms = [] {
    int device = 0, count = 132;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
      count = 132;
    return count;
  }();
  ActQuantPlan plan{};
  const int m_al = (M + 3) / 4 * 4;
  const int blocks = (m_al + kTokens - 1) / kTokens;
  const int slices = rank ? (rank + kRankSlice - 1) / kRankSlice : 1;
  const int chunks = (K + kChunk - 1) / kChunk;
  // as many K ranges as fit in one wave of kCtasPerSm CTAs per SM (a second, partial wave would
  // nearly double the time), each with at least one chunk
  int splits = std::min(chunks, std::max(1, kCtasPerSm * sms / (blocks * slices)));
  splits = (chunks + (chunks + splits - 1) / splits - 1) / ((chunks + splits - 1) / splits);  // no empty CTAs
  plan.ksplits = splits;
  plan.m_pad = blocks * kTokens;
  plan.partial_floats = splits > 1 && rank ? static_cast<long long>(splits) * plan.m_pad * rank : 0;
  plan.counters = splits > 1 && rank ? blocks * slices : 0;
  return plan;
}

const char* act_quant(const ActQuantArgs& a, cudaStream_t stream) {
  if (a.M <= 0 || a.K <= 0 || a.K % 64) return "act_quant: K must be a positive multiple of 64 and M positive";
  if (a.rank < 0 || a.rank % 16 || a.rank > 1024) return "act_quant: rank must be a multiple of 16 in [0, 1024]";
  if (a.m_al < a.M || a.m_al % 4) return "act_quant: m_al must be M rounded up to a multiple of 4";
  if (a.ksplits < 1 || (a.ksplits > 1 && a.rank && (!a.partials || !a.counters)))
    return "act_quant: ksplits and the workspace must come from act_quant_plan";
  for (const void* p : {a.x, static_cast<const void*>(a.smooth), static_cast<const void*>(a.inv_smooth),
                        static_cast<const void*>(a.shift), a.lora_down, static_cast<const void*>(a.codes),
                        static_cast<const void*>(a.ascales), static_cast<const void*>(a.lora_act),
                        static_cast<const void*>(a.partials)})
    if (reinterpret_cast<uintptr_t>(p) & 15) return "act_quant: every tensor must start on a 16-byte boundary";
  const int smem = kStages * stage_bytes(std::min(a.rank, kRankSlice));
  const dim3 grid((a.m_al + kTokens - 1) / kTokens, a.rank ? (a.rank + kRankSlice - 1) / kRankSlice : 1, a.ksplits);
  auto kernel = a.dtype == DType::kBF16 ? act_quant_kernel<__nv_bfloat16> : act_quant_kernel<__half>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err == cudaSuccess) {
    kernel<<<grid, kThreads, smem, stream>>>(a);
    err = cudaGetLastError();
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace svdq::sm90
