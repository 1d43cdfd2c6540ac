// Kernel 2: SVDQuant W4A4 GEMM fused with the low-rank up projection and bias (sm_90a).
//
//   y[m, n] = sum_g ascale[g, m] * wscale[g, n] * sum_{k in g} code[m, k] * w[n, k]
//             + sum_r lora_act[m, r] * lora_up[n, r] + bias[n]
//
// Design (a) of REFERENCE.md: FP8 e4m3 wgmma on the INT4 codes, one fp32 partial per 64-group
// (each group's first wgmma starts with accumulate off), promoted into the fp32 output with
// ascale * wscale (one multiply and one FMA per accumulator per group).
//
// The kernel computes the transposed product: a CTA owns 128 output channels x 128 tokens, and
// each of its two consumer warpgroups owns 64 channels (wgmma M = channels, N = tokens).
//  * A (weights) comes from registers: each thread reads its 2 rows x 8 packed bytes of the
//    natural qweight tile (TMA-loaded as [128][32] bytes per group, no repacking anywhere) and
//    expands the nibbles to e4m3 on chip with a prmt table lookup (common.cuh int4_lookup). The
//    byte for code c is that of c * 2^-9 (e4m3 bytes 0x00..0x08 are exactly n * 2^-9); the 2^9 goes
//    into the weight scale. The k order inside a group is permuted so that each packed word's
//    columns 0..3 and 4..7 land in fragment registers unmoved (act_quant.cu documents the
//    permutation; kernel 1 writes the activation codes in the same order).
//  * Activation scales: per (token, group) [K/64, m_al], or per token [1, m_al] when kernel 1 ran
//    in pow2 mode (its codes then carry the 2^-e of each group, exactly: within a group they share
//    it, so the group's FP8 sum stays an exact integer times a power of two). With per-token scales
//    (design (d)) the promotion is one FMA with the weight scale, and the token's scale multiplies
//    the tile once before the low-rank term (kTokenScales).
//  * B (activation codes, e4m3 bytes [tokens][64] per group) is TMA-loaded with the 64-byte swizzle.
//  * The 64-channel rows of a warpgroup are exactly one output quantization group of the next
//    layer: the epilogue has the fp32 tile in registers with known (channel, token) coordinates,
//    so an activation (GELU) and per-(token, 64-channel) amax/quantize for the next layer can be
//    applied to `out` before the store without changing the main loop.
//
// Warp specialization: warpgroup 2 is the producer (one thread issues TMA into an 8-stage ring
// of full/empty mbarriers); warpgroups 0 and 1 consume. While one consumer warpgroup promotes its
// partials, the other one's wgmma keeps the tensor cores busy.
// Pipeline stages: K/64 main stages (codes, weights, ascales, wscales of one group), then
// ceil(rank/32) low-rank stages (lora_act and lora_up chunks of 32 ranks), whose bf16/fp16 wgmma
// accumulate straight into the output registers.
// Rows past M and channels past N are zero-filled by TMA and never stored.
#include "gemm_tile.cuh"

namespace svdq::sm90 {
namespace {

constexpr int kTileT = 128;  // tokens per CTA
constexpr int kStages = 8;
// Stage layout (bytes). Main stage: codes [kTileT][64] (swizzled), packed weights [kTileN][32],
// ascales [kTileT] fp32, wscales [kTileN] 16-bit. Low-rank stage: lora_act [kTileT][32] and
// lora_up [kTileN][32] (16-bit, swizzled) in the codes and weights slots.
constexpr int kOffAct = 0;
constexpr int kOffW = kOffAct + kTileT * 64;
constexpr int kOffAs = kOffW + kTileN * kLoraChunk * 2;
constexpr int kOffWs = kOffAs + kTileT * 4;
constexpr int kStageBytes = (kOffWs + kTileN * 2 + 1023) / 1024 * 1024;
constexpr uint32_t kMainTx = kTileT * 64 + kTileN * 32 + kTileT * 4 + kTileN * 2;
constexpr uint32_t kMainTxTokenScales = kMainTx - kTileT * 4;  // no per-group activation scales
constexpr uint32_t kLoraTx = (kTileT + kTileN) * kLoraChunk * 2;
constexpr int kEpiBytes = kTileT * kEpiStride;
constexpr int kBarOffset = kStages * kStageBytes + kEpiBytes;
constexpr int kSmemBytes = kBarOffset + 2 * kStages * 8 + 1024;  // + slack to align the base to 1024
static_assert(kSmemBytes <= 227 * 1024, "shared memory of one CTA");

template <typename T, bool kTokenScales>
__device__ __forceinline__ void w4a4_gemm(const TensorMap& tm_act, const TensorMap& tm_w, const TensorMap& tm_as,
                                          const TensorMap& tm_ws, const TensorMap& tm_lact, const TensorMap& tm_lup,
                                          const float* __restrict__ atok, const T* __restrict__ bias, T* y, int M,
                                          int m_al, int N, int K, int rank, int gelu_from, const T* residual,
                                          const T* gate, int gate_rows) {
  extern __shared__ uint8_t smem_raw[];
  // offset (not an integer round trip) so that the compiler keeps shared-memory loads
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kBarOffset);
  uint64_t* empty = full + kStages;
  const int groups = K / 64;
  const int iters = groups + (rank + kLoraChunk - 1) / kLoraChunk;
  const int ch0 = blockIdx.x * kTileN, tok0 = blockIdx.y * kTileT;
  const int wg = threadIdx.x / 128;

  init_ring<kStages>(full, empty);
  __syncthreads();

  if (wg == 2) {  // producer
    setmaxnreg_dec<40>();
    if (threadIdx.x == 256) {
      tma_prefetch_desc(&tm_act);
      tma_prefetch_desc(&tm_w);
      int s = 0;
      uint32_t ph = 0;
      for (int it = 0; it < iters; ++it) {
        mbar_wait(&empty[s], ph ^ 1);
        uint8_t* st = smem + s * kStageBytes;
        if (it < groups) {
          mbar_expect_tx(&full[s], kTokenScales ? kMainTxTokenScales : kMainTx);
          tma_load_2d(st + kOffAct, &tm_act, &full[s], 64 * it, tok0);
          tma_load_2d(st + kOffW, &tm_w, &full[s], 32 * it, ch0);
          if (!kTokenScales) tma_load_2d(st + kOffAs, &tm_as, &full[s], tok0, it);
          tma_load_2d(st + kOffWs, &tm_ws, &full[s], ch0, it);
        } else {
          const int r = kLoraChunk * (it - groups);
          mbar_expect_tx(&full[s], kLoraTx);
          tma_load_2d(st + kOffAct, &tm_lact, &full[s], r, tok0);
          tma_load_2d(st + kOffW, &tm_lup, &full[s], r, ch0);
        }
        if (++s == kStages) s = 0, ph ^= 1;
      }
    }
    return;
  }

  setmaxnreg_inc<232>();
  const int wi = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, q = lane % 4;
  // accumulator element i of this thread: channel row + 8 * ((i / 2) % 2), token 8 * (i / 4) + 2 * q + i % 2
  const int row = 64 * wg + 16 * wi + lane / 4;
  float out[64];  // the 64 x 128 output tile of this warpgroup
#pragma unroll
  for (int i = 0; i < 64; ++i) out[i] = 0.f;

  auto stage_ptr = [&](int st) { return smem + st * kStageBytes; };
  const uint4 lut = int4_lut_2m9();
  auto load_weights = [&](int g, uint32_t (&f)[2][4]) {
    const uint8_t* st = stage_ptr(g % kStages);
    // bytes 8q..8q+7 of the two rows: natural columns 16q..16q+15 of the group
    const uint2 w0 = *reinterpret_cast<const uint2*>(st + kOffW + row * 32 + 8 * q);
    const uint2 w1 = *reinterpret_cast<const uint2*>(st + kOffW + (row + 8) * 32 + 8 * q);
    // fragments of the two k32 steps: {row lo, row+8 lo, row hi, row+8 hi}
    int4_lookup(w0.x, lut, f[0][0], f[0][2]);
    int4_lookup(w1.x, lut, f[0][1], f[0][3]);
    int4_lookup(w0.y, lut, f[1][0], f[1][2]);
    int4_lookup(w1.y, lut, f[1][1], f[1][3]);
  };
  auto wait_full = [&](int g) { mbar_wait(&full[g % kStages], (g / kStages) & 1); };
  // One half-step: group g's product for 64 tokens (half 0: tokens 0..63, half 1: 64..127).
  auto issue_half = [&](int g, const uint32_t (&f)[2][4], float (&acc)[32], int half) {
    const uint64_t desc = desc_k_sw64(stage_ptr(g % kStages) + kOffAct + half * 64 * 64);
    wgmma_fence();
    wgmma_m64n64k32_e4m3_rs(acc, f[0], desc, 0);
    wgmma_m64n64k32_e4m3_rs(acc, f[1], desc + 2, 1);  // +32 bytes along K
    wgmma_commit();
  };
  float ws0, ws1;  // this thread's two weight scales of the group being promoted, times 2^9
  auto load_wscales = [&](int g) {
    const T* ws = reinterpret_cast<const T*>(stage_ptr(g % kStages) + kOffWs);
    ws0 = to_float(ws[row]) * 512.f;
    ws1 = to_float(ws[row + 8]) * 512.f;
  };
  auto promote_half = [&](int g, const float (&acc)[32], int half) {
    const uint8_t* st = stage_ptr(g % kStages);
    const float2* as = reinterpret_cast<const float2*>(st + kOffAs) + 32 * half;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float* o = out + 32 * half + 4 * j;
      if constexpr (kTokenScales) {  // the token scale comes once, after the last group
        o[0] = fmaf(acc[4 * j + 0], ws0, o[0]);
        o[1] = fmaf(acc[4 * j + 1], ws0, o[1]);
        o[2] = fmaf(acc[4 * j + 2], ws1, o[2]);
        o[3] = fmaf(acc[4 * j + 3], ws1, o[3]);
      } else {
        const float2 sa = as[4 * j + q];  // tokens 64 half + 8j + 2q, +1
        o[0] = fmaf(acc[4 * j + 0], sa.x * ws0, o[0]);
        o[1] = fmaf(acc[4 * j + 1], sa.y * ws0, o[1]);
        o[2] = fmaf(acc[4 * j + 2], sa.x * ws1, o[2]);
        o[3] = fmaf(acc[4 * j + 3], sa.y * ws1, o[3]);
      }
    }
  };

  // Half-steps 2g (tokens 0..63) and 2g+1 (64..127) of group g are issued in order, each its own
  // wgmma commit group, into three rotating accumulators: half-step i uses acc[i % 3], group g's
  // weight fragments frag[g % 3]. While half-step i is promoted, i+1 and i+2 are in flight, so
  // each warpgroup keeps the tensor cores fed by itself; promoting i frees acc[i % 3] for i+3.
  // The kind of a step (how many wgmmas remain to issue) is a compile-time constant so that ptxas
  // sees the same wgmma groups in flight on every path (otherwise it serializes all wgmmas).
  float acc0[32], acc1[32], acc2[32];
  uint32_t frag0[2][4], frag1[2][4], frag2[2][4];
  using Full = IntConstant<0>;     // issue half-steps 2g+3 and 2g+4
  using PreLast = IntConstant<1>;  // g = groups - 2: issue 2g+3 only
  using Last = IntConstant<2>;     // g = groups - 1: nothing left to issue
  auto step = [&](int g, float (&lo)[32], float (&hi)[32], const uint32_t (&frag_next)[2][4],
                  uint32_t (&frag_after)[2][4], auto kind) {
    constexpr int kKind = decltype(kind)::value;
    load_wscales(g);
    wgmma_wait<kKind == 2 ? 1 : 2>();
    fence_regs(lo);
    promote_half(g, lo, 0);
    if constexpr (kKind != 2) issue_half(g + 1, frag_next, lo, 1);
    wgmma_wait<kKind == 2 ? 0 : 2>();
    fence_regs(hi);
    promote_half(g, hi, 1);
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[g % kStages]);
    if constexpr (kKind == 0) {
      wait_full(g + 2);
      load_weights(g + 2, frag_after);
      issue_half(g + 2, frag_after, hi, 0);
    }
  };
  // group g mod 3 == 0: halves in acc0, acc1, frag0; 1: acc2, acc0, frag1; 2: acc1, acc2, frag2
  wait_full(0);
  load_weights(0, frag0);
  issue_half(0, frag0, acc0, 0);
  issue_half(0, frag0, acc1, 1);
  if (groups == 1) {
    step(0, acc0, acc1, frag1, frag2, Last{});
  } else {
    wait_full(1);
    load_weights(1, frag1);
    issue_half(1, frag1, acc2, 0);
    int g = 0;
    for (; g + 3 <= groups - 2; g += 3) {
      step(g, acc0, acc1, frag1, frag2, Full{});
      step(g + 1, acc2, acc0, frag2, frag0, Full{});
      step(g + 2, acc1, acc2, frag0, frag1, Full{});
    }
    switch (groups - 2 - g) {
      case 0:
        step(g, acc0, acc1, frag1, frag2, PreLast{});
        step(g + 1, acc2, acc0, frag2, frag0, Last{});
        break;
      case 1:
        step(g, acc0, acc1, frag1, frag2, Full{});
        step(g + 1, acc2, acc0, frag2, frag0, PreLast{});
        step(g + 2, acc1, acc2, frag0, frag1, Last{});
        break;
      default:
        step(g, acc0, acc1, frag1, frag2, Full{});
        step(g + 1, acc2, acc0, frag2, frag0, Full{});
        step(g + 2, acc1, acc2, frag0, frag1, PreLast{});
        step(g + 3, acc0, acc1, frag1, frag2, Last{});
        break;
    }
  }

  if constexpr (kTokenScales) {  // out *= atok[token]
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int t = tok0 + 8 * j + 2 * q;  // tokens t, t + 1 (m_al is a multiple of 4, t is even)
      const float2 sa = t < m_al ? *reinterpret_cast<const float2*>(atok + t) : make_float2(0.f, 0.f);
      out[4 * j + 0] *= sa.x;
      out[4 * j + 1] *= sa.y;
      out[4 * j + 2] *= sa.x;
      out[4 * j + 3] *= sa.y;
    }
  }

  for (int it = groups; it < iters; ++it) {  // low-rank up: out += lora_act . lora_up^T
    wait_full(it);
    const uint8_t* st = stage_ptr(it % kStages);
    lowrank_up_chunk<T, kTileT>(out, st + kOffW + wg * 64 * kLoraChunk * 2, st + kOffAct);
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[it % kStages]);
  }

  store_tile<T, kTileT>(out, smem + kStages * kStageBytes, bias, y, ch0, tok0, M, N, gelu_from, residual, gate,
                        gate_rows);
}

}  // namespace
}  // namespace svdq::sm90

// Entry points: w4a4_gemm_<group|token>_scales_<bf16|fp16>, the activation scales (per (group,
// token) from kernel 1's exact mode, per token from its pow2 mode) and the dtype of wscales,
// lora_act, lora_up, bias and y. Grid (ceil(N / 128), ceil(M / 128)), 384 threads, kSmemBytes of
// dynamic shared memory (sm90.py: EXACT_GEMM_SMEM_BYTES). Parameters:
//   tm_act   codes [M, K] uint8, box 64 x 128 rows, 64-byte swizzle
//   tm_w     qweight [N, K/2] uint8, box 32 x 128 rows
//   tm_as    ascales [K/64, m_al] fp32, box 128 x 1 (group scales only; token scales: any map)
//   tm_ws    wscales [K/64, N] 16-bit, box 128 x 1
//   tm_lact  lora_act [M, rank] 16-bit, box 32 x 128 rows, 64-byte swizzle (rank 0: any map)
//   tm_lup   lora_up [N, rank] 16-bit, box 32 x 128 rows, 64-byte swizzle (rank 0: any map)
//   atok     ascales as a pointer (token scales: [1, m_al])
//   bias     [N] or null;  y  out [M, N] row-major
//   M, m_al (= round_up(M, 4)), N, K, rank, gelu_from (< 0: no GELU)
//   residual [M, N] or null, gate [B, N], gate_rows  y = residual + gate * y (gemm_tile.cuh store_tile; y may be
//            residual)
#define SVDQ_W4A4_GEMM(NAME, T, TOKEN_SCALES)                                                                          \
  extern "C" __global__ void __launch_bounds__(svdq::sm90::kThreads, 1)                                                \
      NAME(const __grid_constant__ svdq::TensorMap tm_act, const __grid_constant__ svdq::TensorMap tm_w,               \
           const __grid_constant__ svdq::TensorMap tm_as, const __grid_constant__ svdq::TensorMap tm_ws,               \
           const __grid_constant__ svdq::TensorMap tm_lact, const __grid_constant__ svdq::TensorMap tm_lup,            \
           const float* __restrict__ atok, const svdq::T* __restrict__ bias, svdq::T* y, int M, int m_al, int N,       \
           int K, int rank, int gelu_from, const svdq::T* residual, const svdq::T* gate, int gate_rows) {              \
    svdq::sm90::w4a4_gemm<svdq::T, TOKEN_SCALES>(tm_act, tm_w, tm_as, tm_ws, tm_lact, tm_lup, atok, bias, y,           \
                                                       M, m_al, N, K, rank, gelu_from, residual, gate, gate_rows);     \
  }

SVDQ_W4A4_GEMM(w4a4_gemm_group_scales_bf16, bfloat16, false)
SVDQ_W4A4_GEMM(w4a4_gemm_token_scales_bf16, bfloat16, true)
SVDQ_W4A4_GEMM(w4a4_gemm_group_scales_fp16, float16, false)
SVDQ_W4A4_GEMM(w4a4_gemm_token_scales_fp16, float16, true)
