// Kernel 2 of the sm80 family: SVDQuant W4A4 GEMM fused with the low-rank up projection, bias and
// an optional GELU (any sm_80 or newer GPU; mma.sync, cp.async, ldmatrix).
//
//   y[m, n] = act(sum_g ascale[g, m] * wscale[g, n] * sum_{k in g} code[m, k] * w[n, k]
//                 + sum_r lora_act[m, r] * lora_up[n, r] + bias[n]),
//   act = tanh-GELU on channels n >= gelu_from (none where gelu_from < 0), identity elsewhere; with a
//   residual, the stored value is residual[m, n] + gate[m / gate_rows, n] * y[m, n] (FLUX's gated
//   residual streams, each product and sum rounded to 16 bits as PyTorch's ops do: numerics.gated_residual).
//
// One source, two tensor-core instantiations (template parameter kInt8) on the same operands:
//  * INT4: mma.sync m16n8k64 s4.s4 (u4.s4 for unsigned activation groups): one MMA per 64-group
//    and 16x8 tile. Native on sm_80/86/89; the H100 emulates it (correct, slow).
//  * INT8: mma.sync m16n8k32 s8.s8 on the same INT4 codes, two MMAs per 64-group. Each packed word
//    (8 codes of one row) becomes two s8 words: signed codes as 16 * code by a mask
//    (lo = (w << 4) & 0xF0F0F0F0 holds codes 0, 2, 4, 6, hi = w & 0xF0F0F0F0 codes 1, 3, 5, 7),
//    unsigned activation codes as they are ((w << 0) & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F). The
//    first MMA takes lo as k slots 0..3 and hi as slots 16..19 of the words of columns 0..31, the
//    second those of columns 32..63; both operands are split the same way, so every product
//    code[m, k] * w[n, k] is summed exactly once. The factor 256 (16 for unsigned groups) goes into
//    the activation scale (exact: a power of two).
//
// Operands, all in their natural layouts (no repacked copy of the weights):
//   codes [M, K/2] and qweight [N, K/2]: packed INT4, low nibble = even column (numerics.pack_int4);
//     with mma's row.col layout both are K-contiguous per row, so one 16-byte ldmatrix row is 32
//     codes: ldmatrix.x4 of a [16 rows][32 bytes] group tile yields exactly the m16n8k64 A fragment
//     (row r, words k 8q .. 8q + 7 and 32 + 8q ..) and of an [8 rows][32 bytes] tile pair the B
//     fragments; the same loads serve the 16-bit low-rank operands (m16n8k16 fragments).
//   ascales [K/64, m_al] fp32 (kernel 1), wscales [K/64, N] 16-bit, group_shift [K/64] fp32 or null
//     (a group is unsigned exactly where its shift is positive), lora_act [M, rank], lora_up
//     [N, rank], bias [N] (16-bit, x's dtype), y [M, N].
//
// Promotion (per 64-group and accumulator, two FMAs and no int->float conversion): each tile's first
// MMA of a group starts from the accumulator 0x4B400000 (the bits of 1.5 * 2^23), so the int32
// result is the bits of the float 1.5 * 2^23 + p for the group's integer sum p (|p| < 2^22);
// t = fma(that float, ws, -1.5 * 2^23 * ws) is p * ws rounded once (the product 1.5 * 2^23 * ws is
// exact for a 16-bit scale below 2^100), and out = fma(t, ascale / factor, out).
//
// Work split: a CTA of 128 threads owns 128 tokens x 128 channels; its 4 warps each own 64 tokens x
// 64 channels (4 x 8 mma tiles, 128 fp32 accumulators per thread). Stages: K/64 main stages (the
// group's codes [128][32 B], qweight [128][32 B], ascales [128], wscales [128]), then rank/16
// low-rank stages (lora_act [128][16] and lora_up [128][16] in the codes and qweight slots), whose
// bf16/fp16 MMAs accumulate into the same fp32 registers. Stages flow through a kStages-deep
// cp.async ring (16-byte chunks, chunk c of row r at chunk c ^ ((r / 4) % 2): conflict-free
// ldmatrix); rows past M and N are zero-filled and never stored.
//
// Entry points: w4a4_gemm_{int4,int8}_{bf16,fp16}(const uint8_t* codes, const float* ascales,
//   const float* group_shift, const uint8_t* qweight, const T* wscales, const T* lora_act,
//   const T* lora_up, const T* bias, T* y, int M, int N, int K, int m_al, int rank, int gelu_from,
//   const T* residual, const T* gate, int gate_rows); residual [M, N] or null, gate [B, N], gate_rows:
//   y = residual + gate * y (sm80.cuh store_tiles; y may be the residual).
//   grid (ceil(M / 128), ceil(N / 128)), block 128, no dynamic shared memory. Requires K % 64 == 0,
//   N % 8 == 0, rank % 16 == 0, m_al = M rounded up to a multiple of 4.
#include "sm80.cuh"

namespace svdq::sm80 {
namespace {

constexpr int kTile = 128;  // tokens and channels per CTA
constexpr int kThreads = 128;
constexpr int kStages = 5;
// Stage layout (bytes): codes [128][32] (or lora_act [128][16] 16-bit), qweight [128][32] (or
// lora_up), ascales [128] fp32, wscales [128] 16-bit.
constexpr int kOffW = kTile * 32;
constexpr int kOffAs = kOffW + kTile * 32;
constexpr int kOffWs = kOffAs + kTile * 4;
constexpr int kStageBytes = kOffWs + kTile * 2;
constexpr float kMagic = 12582912.f;  // 1.5 * 2^23
constexpr int kMagicBits = 0x4B400000;

// Byte offset of 16-byte chunk `chunk` (0, 1) of row `row` in a [rows][32-byte] tile.
__device__ __forceinline__ int tile_offset(int row, int chunk) { return row * 32 + ((chunk ^ ((row >> 2) & 1)) << 4); }

// Two s8 words (codes 0, 2, 4, 6 and 1, 3, 5, 7 of the packed word w): shift 4, mask 0xF0F0F0F0 for
// signed codes (times 16), shift 0, mask 0x0F0F0F0F for unsigned ones.
__device__ __forceinline__ void expand_s8(uint32_t w, int shift, uint32_t mask, uint32_t& lo, uint32_t& hi) {
  lo = (w << shift) & mask;
  hi = (w >> (4 - shift)) & mask;
}

// One 64-group of the main loop for a warp: its 4 x 8 tiles' MMAs and their promotion into out.
// a: the warp's A fragments (packed INT4 words from ldmatrix); st: the stage in shared memory.
template <typename T, bool kInt8, bool kUnsigned>
__device__ __forceinline__ void group_step(const uint8_t* st, const uint32_t (&a)[4][4], float (&out)[4][8][4], int wm,
                                           int wn, int lane) {
  const int gid = lane / 4, q = lane % 4;
  const int magic[4] = {kMagicBits, kMagicBits, kMagicBits, kMagicBits};
  // INT8: weights are 16 * code, activations 16 * code (signed) or code (unsigned)
  constexpr float kFactor = kInt8 ? (kUnsigned ? 1.f / 16.f : 1.f / 256.f) : 1.f;
  float as[4][2];  // the accumulators' token scales (rows gid and gid + 8 of m tile i) / the factor
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    as[i][0] = reinterpret_cast<const float*>(st + kOffAs)[wm + 16 * i + gid] * kFactor;
    as[i][1] = reinterpret_cast<const float*>(st + kOffAs)[wm + 16 * i + gid + 8] * kFactor;
  }
  uint32_t ae[4][2][4];  // INT8: the A words of the two k32 MMAs
  if constexpr (kInt8) {
    constexpr int kShift = kUnsigned ? 0 : 4;
    constexpr uint32_t kMask = kUnsigned ? 0x0F0F0F0Fu : 0xF0F0F0F0u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      expand_s8(a[i][0], kShift, kMask, ae[i][0][0], ae[i][0][2]);
      expand_s8(a[i][1], kShift, kMask, ae[i][0][1], ae[i][0][3]);
      expand_s8(a[i][2], kShift, kMask, ae[i][1][0], ae[i][1][2]);
      expand_s8(a[i][3], kShift, kMask, ae[i][1][1], ae[i][1][3]);
    }
  }
  const int b_off = kOffW + tile_offset(wn + lane % 8 + 8 * (lane / 16), (lane / 8) % 2);
#pragma unroll
  for (int jj = 0; jj < 4; ++jj) {
    uint32_t b[4];  // b0, b1 of n tile 2 jj, then of 2 jj + 1
    ldmatrix_x4(b, st + b_off + 16 * 32 * jj);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = 2 * jj + h;
      float w0, w1;  // the scales of channels wn + 8 j + 2 q and + 1
      Half<T>::unpack2(reinterpret_cast<const uint32_t*>(st + kOffWs)[(wn + 8 * j) / 2 + q], w0, w1);
      const float n0 = -kMagic * w0, n1 = -kMagic * w1;
      uint32_t be[2][2];
      if constexpr (kInt8) {
        expand_s8(b[2 * h], 4, 0xF0F0F0F0u, be[0][0], be[0][1]);
        expand_s8(b[2 * h + 1], 4, 0xF0F0F0F0u, be[1][0], be[1][1]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        int d[4];
        if constexpr (kInt8) {
          mma_m16n8k32_s8(d, ae[i][0], be[0][0], be[0][1], magic);
          mma_m16n8k32_s8(d, ae[i][1], be[1][0], be[1][1], d);
        } else {
          mma_m16n8k64_s4<kUnsigned>(d, a[i], b[2 * h], b[2 * h + 1], magic);
        }
        out[i][j][0] = fmaf(fmaf(__int_as_float(d[0]), w0, n0), as[i][0], out[i][j][0]);
        out[i][j][1] = fmaf(fmaf(__int_as_float(d[1]), w1, n1), as[i][0], out[i][j][1]);
        out[i][j][2] = fmaf(fmaf(__int_as_float(d[2]), w0, n0), as[i][1], out[i][j][2]);
        out[i][j][3] = fmaf(fmaf(__int_as_float(d[3]), w1, n1), as[i][1], out[i][j][3]);
      }
    }
  }
}

template <typename T, bool kInt8>
__device__ __forceinline__ void w4a4_gemm(const uint8_t* __restrict__ codes, const float* __restrict__ ascales,
                                          const float* __restrict__ group_shift, const uint8_t* __restrict__ qweight,
                                          const T* __restrict__ wscales, const T* __restrict__ lora_act,
                                          const T* __restrict__ lora_up, const T* __restrict__ bias, T* y, int M,
                                          int N, int K, int m_al, int rank, int gelu_from, const T* residual,
                                          const T* __restrict__ gate, int gate_rows) {
  __shared__ __align__(128) uint8_t ring[kStages * kStageBytes];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int tok0 = blockIdx.x * kTile, ch0 = blockIdx.y * kTile;
  const int groups = K / 64, iters = groups + rank / 16;
  const int wm = 64 * (warp % 2), wn = 64 * (warp / 2);  // the warp's tokens and channels in the tile

  // Stage copies. Thread t copies chunk half t % 2 of rows t / 2 and t / 2 + 64 of the codes and
  // qweight tiles, from sources that advance 32 bytes a stage (one group of INT4 codes, or 16 ranks
  // of the 16-bit low-rank operands: the sources switch to lora_act and lora_up once, at stage
  // K/64); threads 0..31 copy 4 tokens' ascales, 32..47 8 channels' wscales. Addresses are computed
  // once, and the main loop is split where the sources switch, so that no stage recomputes them
  // (bench/NOTES.md#sm80-static-budget).
  const int r0 = tid / 2, hf = tid % 2;
  const int dst0 = tile_offset(r0, hf);  // row r0 + 64: dst0 + 64 * 32 (same swizzle)
  bool tv[2], cv[2];
  const uint8_t* a_src[2];
  const uint8_t* w_src[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int tok = tok0 + r0 + 64 * i, ch = ch0 + r0 + 64 * i;
    tv[i] = tok < M, cv[i] = ch < N;
    a_src[i] = codes + static_cast<size_t>(tv[i] ? tok : 0) * (K / 2) + 16 * hf;
    w_src[i] = qweight + static_cast<size_t>(cv[i] ? ch : 0) * (K / 2) + 16 * hf;
  }
  const bool copies_scales = tid < 48, is_as = tid < 32;
  const int sc_dst = is_as ? kOffAs + 16 * tid : kOffWs + 16 * (tid - 32);
  const bool sc_valid = is_as ? tok0 + 4 * tid < M : ch0 + 8 * (tid - 32) < N;
  const uint8_t* sc_src = is_as ? reinterpret_cast<const uint8_t*>(ascales + (sc_valid ? tok0 + 4 * tid : 0))
                                : reinterpret_cast<const uint8_t*>(wscales + (sc_valid ? ch0 + 8 * (tid - 32) : 0));
  const size_t sc_stride = is_as ? static_cast<size_t>(m_al) * 4 : static_cast<size_t>(N) * 2;
  int next = 0, next_slot = 0;  // the next stage to load and its ring slot

  // Copies the next stage (group or low-rank; none past the last) and commits.
  auto load_stage = [&](bool group) {
    if (group || next < iters) {
      uint8_t* st = ring + next_slot * kStageBytes;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        cp_async16(st + dst0 + 64 * 32 * i, a_src[i], tv[i]);
        cp_async16(st + kOffW + dst0 + 64 * 32 * i, w_src[i], cv[i]);
        a_src[i] += 32;
        w_src[i] += 32;
      }
      if (group && copies_scales) {
        cp_async16(st + sc_dst, sc_src, sc_valid);
        sc_src += sc_stride;
      }
    }
    cp_async_commit();
    ++next;
    next_slot = next_slot == kStages - 1 ? 0 : next_slot + 1;
  };
  auto switch_to_low_rank = [&]() {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int tok = tok0 + r0 + 64 * i, ch = ch0 + r0 + 64 * i;
      a_src[i] = reinterpret_cast<const uint8_t*>(lora_act + static_cast<size_t>(tv[i] ? tok : 0) * rank + 8 * hf);
      w_src[i] = reinterpret_cast<const uint8_t*>(lora_up + static_cast<size_t>(cv[i] ? ch : 0) * rank + 8 * hf);
    }
  };

  float out[4][8][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) out[i][j][e] = 0.f;
  for (int s = 0; s < kStages - 1; ++s) {
    if (next == groups && rank) switch_to_low_rank();
    load_stage(next < groups);
  }

  // ldmatrix row addresses of this lane: A (m16 tile i): row wm + 16 i + lane % 8 + 8 ((lane / 8) % 2),
  // chunk lane / 16; B (n8 tiles 2 jj, 2 jj + 1): row wn + 16 jj + lane % 8 + 8 (lane / 16), chunk
  // (lane / 8) % 2. Offsets repeat every 16 rows, so one per operand.
  const int a_off = tile_offset(wm + lane % 8 + 8 * ((lane / 8) % 2), lane / 16);
  const int b_off = kOffW + tile_offset(wn + lane % 8 + 8 * (lane / 16), (lane / 8) % 2);

  // A group stage's MMAs and promotion (group g in shared memory at st).
  auto group = [&](int g, const uint8_t* st) {
    uint32_t a[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) ldmatrix_x4(a[i], st + a_off + 16 * 32 * i);
    const float shift = group_shift ? __ldg(group_shift + g) : 0.f;
    // warp-uniform: one code path per group kind, so that the expansion's shift and mask and the
    // INT4 mma type are constants
    if (shift > 0.f) {
      group_step<T, kInt8, true>(st, a, out, wm, wn, lane);
    } else {
      group_step<T, kInt8, false>(st, a, out, wm, wn, lane);
    }
  };
  // A low-rank stage's MMAs (16 ranks).
  auto low_rank = [&](const uint8_t* st) {
    uint32_t a[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) ldmatrix_x4(a[i], st + a_off + 16 * 32 * i);
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      uint32_t b[4];
      ldmatrix_x4(b, st + b_off + 16 * 32 * jj);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        mma_m16n8k16<T>(out[i][2 * jj], a[i], b[0], b[1]);
        mma_m16n8k16<T>(out[i][2 * jj + 1], a[i], b[2], b[3]);
      }
    }
  };

  int it = 0, slot = 0;  // the stage computed and its ring slot
  // Steady state: the stage loaded and the stage computed are groups.
  for (; next < groups; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    load_stage(true);
    group(it, ring + slot * kStageBytes);
    slot = slot == kStages - 1 ? 0 : slot + 1;
  }
  if (next == groups && rank) switch_to_low_rank();
  // The last stages: the stage loaded is low-rank or none.
  for (; it < iters; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    load_stage(false);
    const uint8_t* st = ring + slot * kStageBytes;
    if (it < groups) {
      group(it, st);
    } else {
      low_rank(st);
    }
    slot = slot == kStages - 1 ? 0 : slot + 1;
  }
  cp_async_wait<0>();

  // out[i][j] holds tokens wm + 16 i + gid (+ 8 for elements 2, 3), channels wn + 8 j + 2 q + {0, 1}
  uint32_t yv[4][2][8];
  pack_tiles<T>(out, bias, ch0 + wn, N, gelu_from, lane, yv);
  store_tiles<T>(yv, y, tok0 + wm, ch0 + wn, M, N, residual, gate, gate_rows, lane);
}

}  // namespace
}  // namespace svdq::sm80

#define SVDQ_W4A4_GEMM_ENTRY(NAME, T, INT8)                                                                     \
  extern "C" __global__ void __launch_bounds__(svdq::sm80::kThreads, 2)                                       \
      NAME(const uint8_t* codes, const float* ascales, const float* group_shift, const uint8_t* qweight,        \
           const T* wscales, const T* lora_act, const T* lora_up, const T* bias, T* y, int M, int N, int K,     \
           int m_al, int rank, int gelu_from, const T* residual, const T* gate, int gate_rows) {                \
    svdq::sm80::w4a4_gemm<T, INT8>(codes, ascales, group_shift, qweight, wscales, lora_act, lora_up, bias, y, M, \
                                   N, K, m_al, rank, gelu_from, residual, gate, gate_rows);                     \
  }

SVDQ_W4A4_GEMM_ENTRY(w4a4_gemm_int4_bf16, svdq::bfloat16, false)
SVDQ_W4A4_GEMM_ENTRY(w4a4_gemm_int4_fp16, svdq::float16, false)
SVDQ_W4A4_GEMM_ENTRY(w4a4_gemm_int8_bf16, svdq::bfloat16, true)
SVDQ_W4A4_GEMM_ENTRY(w4a4_gemm_int8_fp16, svdq::float16, true)
