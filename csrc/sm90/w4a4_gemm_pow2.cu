// Fast kernel 2: W4A4 GEMM for power-of-two scales, fused with the low-rank up projection and bias
// (sm_90a). Designs (c) + (d) of REFERENCE.md on INT8 tensor cores:
//
//   wscale[g, n] = wbase[n] * 2^-f[g, n]   f in [0, 4] (the layer's weights, numerics.pow2_weight_exponents)
//   ascale[m, g] = atok[m] * 2^-e[m, g]    e in [0, 3] (kernel 1 in pow2 mode with int8 operands)
//   y[m, n] = atok[m] * wbase[n] * 2^-7 * sum_k (code_a 2^(3-e)) (code_w 2^(4-f)) + lora_act . lora_up[n] + bias[n]
//
// which equals the exact path's sum_g ascale * wscale * (integer group sum) term by term. Both
// operands are integers that fit s8 (weights in [-128, 112], activations in [-64, 120]), so the
// s8 wgmma sums the whole of K exactly in s32 (|product| <= 15360, K <= 131072): no per-group
// rescaling and no fp32 promotion, unlike FP8 whose wgmma accumulator keeps fewer bits than fp32.
// The accumulator registers are all a consumer needs across K, so a CTA tile spans up to 256 tokens
// (the weight expansion, most of a consumer's instructions, is amortized over more tokens).
//
// Tiles and roles as in w4a4_gemm.cu: a CTA owns 128 output channels x kTileT tokens (transposed
// product: wgmma M = channels, N = tokens); consumer warpgroups 0 and 1 own 64 channels each,
// warpgroup 2 is the TMA producer (a ring of full/empty mbarriers).
//  * A (weights) from registers: each thread reads its 2 rows x 8 packed bytes of the natural
//    qweight tile ([128][32] bytes per group) and looks the nibbles up in the s8 table of its row's
//    exponent f (common.cuh int4_lookup; the 5 tables, one per f, sit in shared memory).
//    The k permutation is kernel 1's (act_quant.cu), so fragment registers need no shuffling.
//  * B (activation operands, s8 bytes [tokens][64] per group) is TMA-loaded with the 64-byte swizzle.
//  * f: a [128] byte row of the exponent tensor wexp [K/64, n_al] per group, in the same stage.
// Persistent: one CTA per SM walks the tiles (channel tiles of a token tile consecutively, so that
// concurrent CTAs share activation tiles in L2), with one continuous ring of stages, so the producer
// fills the next tile's stages while the consumers run the previous tile's epilogue. With 256-token
// tiles, the last token rows may run as 128-token half tiles where that evens out the last round
// (make_schedule in svdquant/families/sm90.py).
// Stages of a tile: K/64 main stages, then ceil(rank/32) low-rank stages (lora_act and lora_up
// chunks of 32 ranks) whose bf16/fp16 wgmma accumulate into the scaled fp32 tile, then + bias and a
// transposed 16-byte-row store through shared memory. The epilogue has the fp32 tile with known (channel,
// token) coordinates in registers, the place to fuse an activation or the next layer's quantization.
// Rows past M and channels past N are zero-filled by TMA and never stored.
#include "gemm_tile.cuh"

namespace svdq::sm90 {
namespace {

constexpr int kExps = 5;   // weight exponents f = 0..4

// Shared-memory layout for a token tile of kTileT (bytes). Main stage: activation operands
// [kTileT][64] (swizzled), packed weights [kTileN][32], exponents [kTileN]. Low-rank stage:
// lora_act [kTileT][32] and lora_up [kTileN][32] (16-bit, swizzled) in the operand and weight slots.
// Then the output staging tile [kTileT tokens][kTileN channels] 16-bit (rows padded by 16 bytes so
// that the transposing stmatrix stores hit distinct bank groups), the s8 tables, the tile's
// token and channel scales, and the barriers.
template <int kTileT>
struct Layout {
  static constexpr int kStages = kTileT == 256 ? 6 : 8;  // 256: as many as fit beside the staging tile
  static constexpr int kOffAct = 0;
  static constexpr int kOffW = kOffAct + kTileT * 64;
  static constexpr int kOffExp = kOffW + kTileN * kLoraChunk * 2;
  static constexpr int kStageBytes = (kOffExp + kTileN + 1023) / 1024 * 1024;
  static constexpr uint32_t kMainTx = kTileT * 64 + kTileN * 32 + kTileN;
  static constexpr uint32_t kLoraTx = (kTileT + kTileN) * kLoraChunk * 2;
  static constexpr int kOffEpi = kStages * kStageBytes;
  static constexpr int kOffLut = kOffEpi + kTileT * kEpiStride;  // uint4 [kExps]
  static constexpr int kOffTok = kOffLut + kExps * 16;            // float [kTileT]: atok of the tile's tokens
  static constexpr int kOffBase = kOffTok + kTileT * 4;           // float [kTileN]: wbase of the tile's channels
  static constexpr int kOffBar = kOffBase + kTileN * 4;
  static constexpr int kSmemBytes = kOffBar + 2 * kStages * 8 + 1024;  // + slack to align the base to 1024
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one CTA");
};

template <int kN>
__device__ __forceinline__ void wgmma_s8_rs(int (&d)[kN / 2], const uint32_t (&a)[4], uint64_t desc_b, uint32_t scale_d) {
  if constexpr (kN == 128)
    wgmma_m64n128k32_s8_rs(d, a, desc_b, scale_d);
  else
    wgmma_m64n256k32_s8_rs(d, a, desc_b, scale_d);
}

// The schedule's tile `tile`: the first big_tiles are kTileT-token tiles over the first big_tiles / tiles_n
// token rows, taken in bands of band_rows rows: within a band the channel tile changes slowest, so that
// the CTAs of one round share both the band's activation rows and their weight tiles in L2 (band_rows 1:
// each weight tile is read again for every token row). The rest are half tiles of kTileT / 2 tokens over
// the token rows after them, channel tile fastest. Half tiles even out the last round of a persistent
// schedule whose tile count is just over a multiple of the CTA count (sm90.py: half_rows).
struct TileCoords {
  int ch0, tok0;
  bool half;
};
template <int kTileT>
__device__ __forceinline__ TileCoords tile_coords(int tile, int tiles_n, int big_tiles, int band_rows) {
  if (tile < big_tiles) {
    const int band = tile / (band_rows * tiles_n), row0 = band * band_rows;
    const int rows = min(band_rows, big_tiles / tiles_n - row0), t = tile - row0 * tiles_n;
    return {t / rows * kTileN, (row0 + t % rows) * kTileT, false};
  }
  const int t = tile - big_tiles;
  return {t % tiles_n * kTileN, big_tiles / tiles_n * kTileT + t / tiles_n * (kTileT / 2), true};
}

template <typename T, int kTileT>
__device__ __forceinline__ void w4a4_gemm_pow2(const TensorMap& tm_act, const TensorMap& tm_w, const TensorMap& tm_exp,
                                               const TensorMap& tm_lact, const TensorMap& tm_lup,
                                               const TensorMap& tm_act_half, const TensorMap& tm_lact_half,
                                               const float* __restrict__ atok, const float* __restrict__ wbase,
                                               const T* __restrict__ bias, T* y, int M, int m_al, int N, int K,
                                               int rank, int gelu_from, const T* residual, const T* gate,
                                               int gate_rows, int tiles_n, int big_tiles, int tiles, int band_rows) {
  using L = Layout<kTileT>;
  constexpr int kStages = L::kStages, kStageBytes = L::kStageBytes, kOffAct = L::kOffAct, kOffW = L::kOffW;
  constexpr int kOffExp = L::kOffExp;
  extern __shared__ uint8_t smem_raw[];
  // offset (not an integer round trip) so that the compiler keeps shared-memory loads
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kOffBar);
  uint64_t* empty = full + kStages;
  uint4* lut = reinterpret_cast<uint4*>(smem + L::kOffLut);
  float* tok_scale = reinterpret_cast<float*>(smem + L::kOffTok);
  float* ch_base = reinterpret_cast<float*>(smem + L::kOffBase);
  const int groups = K / 64;
  const int iters = groups + (rank + kLoraChunk - 1) / kLoraChunk;  // stages per tile
  const int wg = threadIdx.x / 128;

  init_ring<kStages>(full, empty);
  if (threadIdx.x < kExps) lut[threadIdx.x] = int4_lut_s8(threadIdx.x);
  __syncthreads();

  if (wg == 2) {  // producer: 24 registers, so that the consumers get 240 (2 x 128 x 240 + 128 x 24 <= 64K)
    setmaxnreg_dec<24>();
    if (threadIdx.x == 256) {
      tma_prefetch_desc(&tm_act);
      tma_prefetch_desc(&tm_w);
      int s = 0;
      uint32_t ph = 0;
      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const TileCoords tc = tile_coords<kTileT>(tile, tiles_n, big_tiles, band_rows);
        const int unloaded = tc.half ? kTileT / 2 : 0;  // token rows of the stage a half tile leaves out
        for (int it = 0; it < iters; ++it) {
          mbar_wait(&empty[s], ph ^ 1);
          uint8_t* st = smem + s * kStageBytes;
          if (it < groups) {
            mbar_expect_tx(&full[s], L::kMainTx - unloaded * 64);
            tma_load_2d(st + kOffAct, tc.half ? &tm_act_half : &tm_act, &full[s], 64 * it, tc.tok0);
            tma_load_2d(st + kOffW, &tm_w, &full[s], 32 * it, tc.ch0);
            tma_load_2d(st + kOffExp, &tm_exp, &full[s], tc.ch0, it);
          } else {
            const int r = kLoraChunk * (it - groups);
            mbar_expect_tx(&full[s], L::kLoraTx - unloaded * kLoraChunk * 2);
            tma_load_2d(st + kOffAct, tc.half ? &tm_lact_half : &tm_lact, &full[s], r, tc.tok0);
            tma_load_2d(st + kOffW, &tm_lup, &full[s], r, tc.ch0);
          }
          if (++s == kStages) s = 0, ph ^= 1;
        }
      }
    }
    return;
  }

  setmaxnreg_inc<240>();
  const int wi = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, q = lane % 4;
  // accumulator element i of this thread: channel row + 8 * ((i / 2) % 2), token 8 * (i / 4) + 2 * q + i % 2
  const int row = 64 * wg + 16 * wi + lane / 4;
  int base = 0;  // ring position of the current tile's first stage: the tile's stage g is base + g

  auto stage_ptr = [&](int g) { return smem + (base + g) % kStages * kStageBytes; };
  auto wait_full = [&](int g) { mbar_wait(&full[(base + g) % kStages], ((base + g) / kStages) & 1); };
  auto release = [&](int g) {
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[(base + g) % kStages]);
  };
  // Group g's weights of this thread's two rows, looked up in their rows' tables: the fragments of
  // the two k32 steps, {row lo, row+8 lo, row hi, row+8 hi}.
  auto load_weights = [&](int g, uint32_t (&f)[2][4]) {
    const uint8_t* st = stage_ptr(g);
    // bytes 8q..8q+7 of the two rows: natural columns 16q..16q+15 of the group
    const uint2 w0 = *reinterpret_cast<const uint2*>(st + kOffW + row * 32 + 8 * q);
    const uint2 w1 = *reinterpret_cast<const uint2*>(st + kOffW + (row + 8) * 32 + 8 * q);
    const uint4 t0 = lut[st[kOffExp + row]], t1 = lut[st[kOffExp + row + 8]];
    int4_lookup(w0.x, t0, f[0][0], f[0][2]);
    int4_lookup(w1.x, t1, f[0][1], f[0][3]);
    int4_lookup(w0.y, t0, f[1][0], f[1][2]);
    int4_lookup(w1.y, t1, f[1][1], f[1][3]);
  };

  // One tile of kT tokens (kTileT, or kTileT / 2 for the half tiles at the end of the schedule).
  auto run_tile = [&](auto tile_tokens, int ch0, int tok0) {
    constexpr int kT = decltype(tile_tokens)::value;
    constexpr int kAcc = kT / 2;  // accumulator registers per thread: 64 channels x kT tokens
    // the tile's scale factors, once the previous tile's epilogue is done with them
    consumers_sync();
    if (threadIdx.x < kTileN) ch_base[threadIdx.x] = ch0 + threadIdx.x < N ? wbase[ch0 + threadIdx.x] : 0.f;
    for (int t = threadIdx.x; t < kT; t += 256) tok_scale[t] = tok0 + t < m_al ? atok[tok0 + t] : 0.f;

    // Main loop: group g+1's weights are expanded while group g's wgmmas run, into the fragment set
    // that group g-1 used (complete after wait<1>). The loop is unrolled by two so that the set of
    // each step is known at compile time; every step keeps the same wgmma pipeline shape (one group
    // issued, wait<1>), which ptxas needs to leave the wgmmas asynchronous.
    // s32: the exact sum over all of K of this warpgroup's 64 x kT tile. Zeroed (the first wgmma
    // ignores it) so that its registers are free while the previous tile's float copy is in use.
    int acc[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0;
    uint32_t frag[2][2][4];
    auto step = [&](int g, const uint32_t (&cur)[2][4], uint32_t (&next)[2][4]) {
      const uint64_t desc = desc_k_sw64(stage_ptr(g) + kOffAct);
      wgmma_fence();
      wgmma_s8_rs<kT>(acc, cur[0], desc, g > 0 ? 1u : 0u);
      wgmma_s8_rs<kT>(acc, cur[1], desc + 2, 1);  // +32 bytes along K
      wgmma_commit();
      wgmma_wait<1>();
      if (g > 0) release(g - 1);
      if (g + 1 < groups) {
        wait_full(g + 1);
        load_weights(g + 1, next);
      }
  };
  wait_full(0);
  load_weights(0, frag[0]);
  int g = 0;
  for (; g + 2 <= groups; g += 2) {
    step(g, frag[0], frag[1]);
    step(g + 1, frag[1], frag[0]);
  }
  if (g < groups) step(g, frag[0], frag[1]);
  wgmma_wait<0>();
  fence_regs(acc);
  release(groups - 1);

  // sum = acc * atok[token] * wbase[channel] * 2^-7: the scale factors left out of the s8 operands
  consumers_sync();  // every consumer thread's scale loads have landed
  float sum[kAcc];
  {
    const float b0 = ch_base[row] * 0x1p-7f, b1 = ch_base[row + 8] * 0x1p-7f;
    const float2* ts = reinterpret_cast<const float2*>(tok_scale);
#pragma unroll
    for (int j = 0; j < kT / 8; ++j) {
      const float2 t = ts[4 * j + q];  // tokens 8j + 2q, +1
      sum[4 * j + 0] = __int2float_rn(acc[4 * j + 0]) * (t.x * b0);
      sum[4 * j + 1] = __int2float_rn(acc[4 * j + 1]) * (t.y * b0);
      sum[4 * j + 2] = __int2float_rn(acc[4 * j + 2]) * (t.x * b1);
      sum[4 * j + 3] = __int2float_rn(acc[4 * j + 3]) * (t.y * b1);
    }
  }

  for (int it = groups; it < iters; ++it) {  // low-rank up: sum += lora_act . lora_up^T
    wait_full(it);
    const uint8_t* st = stage_ptr(it);
    lowrank_up_chunk<T, kT>(sum, st + kOffW + wg * 64 * kLoraChunk * 2, st + kOffAct);
    release(it);
  }

  store_tile<T, kT>(sum, smem + kStages * kStageBytes, bias, y, ch0, tok0, M, N, gelu_from, residual, gate,
                    gate_rows);
  };

  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x, base += iters) {
    const TileCoords tc = tile_coords<kTileT>(tile, tiles_n, big_tiles, band_rows);
    if constexpr (kTileT == 256) {
      if (tc.half) {
        run_tile(IntConstant<kTileT / 2>{}, tc.ch0, tc.tok0);
        continue;
      }
    }
    run_tile(IntConstant<kTileT>{}, tc.ch0, tc.tok0);
  }
}

}  // namespace
}  // namespace svdq::sm90

// Entry points: w4a4_gemm_pow2_t<128|256>_<bf16|fp16>, the token tile and the dtype of lora_act,
// lora_up, bias and y. Persistent: a grid of min(tiles, SMs) CTAs, 384 threads, Layout<kTileT>::kSmemBytes
// of dynamic shared memory (sm90.py: _pow2_gemm_smem_bytes). Parameters:
//   tm_act, tm_act_half    codes [M, K] uint8 (int8 operands), box 64 x kTileT (half: kTileT / 2) rows,
//                          64-byte swizzle
//   tm_w                   qweight [N, K/2] uint8, box 32 x 128 rows
//   tm_exp                 wexp [K/64, n_al] uint8, box 128 x 1
//   tm_lact, tm_lact_half  lora_act [M, rank] 16-bit, box 32 x kTileT (half: kTileT / 2) rows, 64-byte
//                          swizzle (rank 0: any map)
//   tm_lup                 lora_up [N, rank] 16-bit, box 32 x 128 rows, 64-byte swizzle (rank 0: any map)
//   atok [m_al], wbase [N] fp32;  bias [N] or null;  y  out [M, N] row-major
//   M, m_al, N, K, rank, gelu_from (< 0: no GELU), residual [M, N] or null, gate [B, N], gate_rows
//   (y = residual + gate * y, gemm_tile.cuh store_tile; y may be residual), and the schedule (sm90.py
//   make_schedule): tiles_n channel tiles, the first big_tiles of the tiles whole kTileT-token tiles in
//   bands of band_rows token rows (>= 1), the rest half tiles
#define SVDQ_W4A4_GEMM_POW2(NAME, T, TILE_T)                                                                           \
  extern "C" __global__ void __launch_bounds__(svdq::sm90::kThreads, 1)                                                \
      NAME(const __grid_constant__ svdq::TensorMap tm_act, const __grid_constant__ svdq::TensorMap tm_w,               \
           const __grid_constant__ svdq::TensorMap tm_exp, const __grid_constant__ svdq::TensorMap tm_lact,            \
           const __grid_constant__ svdq::TensorMap tm_lup, const __grid_constant__ svdq::TensorMap tm_act_half,        \
           const __grid_constant__ svdq::TensorMap tm_lact_half, const float* __restrict__ atok,                       \
           const float* __restrict__ wbase, const svdq::T* __restrict__ bias, svdq::T* y, int M, int m_al,         \
           int N, int K, int rank, int gelu_from, const svdq::T* residual, const svdq::T* gate, int gate_rows,         \
           int tiles_n, int big_tiles, int tiles, int band_rows) {                                                     \
    svdq::sm90::w4a4_gemm_pow2<svdq::T, TILE_T>(tm_act, tm_w, tm_exp, tm_lact, tm_lup, tm_act_half,                    \
                                                      tm_lact_half, atok, wbase, bias, y, M, m_al, N, K, rank,         \
                                                      gelu_from, residual, gate, gate_rows, tiles_n, big_tiles,        \
                                                      tiles, band_rows);                                               \
  }

SVDQ_W4A4_GEMM_POW2(w4a4_gemm_pow2_t128_bf16, bfloat16, 128)
SVDQ_W4A4_GEMM_POW2(w4a4_gemm_pow2_t256_bf16, bfloat16, 256)
SVDQ_W4A4_GEMM_POW2(w4a4_gemm_pow2_t128_fp16, float16, 128)
SVDQ_W4A4_GEMM_POW2(w4a4_gemm_pow2_t256_fp16, float16, 256)
