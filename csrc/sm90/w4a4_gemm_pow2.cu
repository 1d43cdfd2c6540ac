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
// (make_schedule).
// Stages of a tile: K/64 main stages, then ceil(rank/32) low-rank stages (lora_act and lora_up
// chunks of 32 ranks) whose bf16/fp16 wgmma accumulate into the scaled fp32 tile, then + bias and a
// transposed 16-byte-row store through shared memory. The epilogue has the fp32 tile with known (channel,
// token) coordinates in registers, the place to fuse an activation or the next layer's quantization.
// Rows past M and channels past N are zero-filled by TMA and never stored.
#include <algorithm>

#include "gemm_tile.cuh"
#include "launchers.h"

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

// The schedule's tile `tile`: the first big_tiles are kTileT-token tiles (token row tile / tiles_n,
// channel tile tile % tiles_n); the rest are half tiles of kTileT / 2 tokens over the token rows
// after them, in the same order. Half tiles even out the last round of a persistent schedule whose
// tile count is just over a multiple of the CTA count (host: half_rows).
struct TileCoords {
  int ch0, tok0;
  bool half;
};
template <int kTileT>
__device__ __forceinline__ TileCoords tile_coords(int tile, int tiles_n, int big_tiles) {
  if (tile < big_tiles) return {tile % tiles_n * kTileN, tile / tiles_n * kTileT, false};
  const int t = tile - big_tiles;
  return {t % tiles_n * kTileN, big_tiles / tiles_n * kTileT + t / tiles_n * (kTileT / 2), true};
}

template <typename T, int kTileT>
__global__ void __launch_bounds__(kThreads, 1)
    w4a4_gemm_pow2_kernel(const __grid_constant__ CUtensorMap tm_act, const __grid_constant__ CUtensorMap tm_w,
                          const __grid_constant__ CUtensorMap tm_exp, const __grid_constant__ CUtensorMap tm_lact,
                          const __grid_constant__ CUtensorMap tm_lup, const __grid_constant__ CUtensorMap tm_act_half,
                          const __grid_constant__ CUtensorMap tm_lact_half, const float* __restrict__ atok,
                          const float* __restrict__ wbase, const T* __restrict__ bias, T* __restrict__ y, int M,
                          int m_al, int N, int K, int rank, int gelu_from, int tiles_n, int big_tiles, int tiles) {
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
        const TileCoords tc = tile_coords<kTileT>(tile, tiles_n, big_tiles);
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

  store_tile<T, kT>(sum, smem + kStages * kStageBytes, bias, y, ch0, tok0, M, N, gelu_from);
  };

  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x, base += iters) {
    const TileCoords tc = tile_coords<kTileT>(tile, tiles_n, big_tiles);
    if constexpr (kTileT == 256) {
      if (tc.half) {
        run_tile(std::integral_constant<int, kTileT / 2>{}, tc.ch0, tc.tok0);
        continue;
      }
    }
    run_tile(std::integral_constant<int, kTileT>{}, tc.ch0, tc.tok0);
  }
}

// A CTA's time is taken as its count of whole tiles plus kHalfTileCost per half tile: a 128-token
// tile took 0.74 of a 256-token tile's time (M = 4608, N = K = 3072, rounds of 132 tiles). Half
// tiles are used only where this model predicts at least kMinHalfTileGain: at a predicted 2%
// (M = 4608, N = 12288, K = 3072) they measured 4% slower (bench/NOTES.md).
constexpr double kHalfTileCost = 0.75;
constexpr double kMinHalfTileGain = 0.05;

struct Schedule {
  int big_tiles, tiles, ctas;
};

// The persistent schedule: CTA b runs tiles b, b + ctas, ... With 256-token tiles, the last
// half_rows token rows run as 128-token half tiles; half_rows < 0 takes the count (up to 4) that
// gives the shortest longest CTA by the cost above, e.g. 3.75 instead of 4 tile times for 432
// tiles on 132 SMs.
Schedule make_schedule(int M, int tiles_n, int tile_t, int half_rows) {
  const int sms = sm_count(), rows = (M + tile_t - 1) / tile_t;
  auto plan = [&](int h) {
    const int big_rows = rows - h, small_rows = h ? (M - big_rows * tile_t + tile_t / 2 - 1) / (tile_t / 2) : 0;
    Schedule s{big_rows * tiles_n, (big_rows + small_rows) * tiles_n, 0};
    s.ctas = std::min(s.tiles, sms);
    return s;
  };
  auto longest = [](const Schedule& s) {
    double worst = 0;
    for (int b = 0; b < s.ctas; ++b) {
      const int whole = s.big_tiles > b ? (s.big_tiles - b + s.ctas - 1) / s.ctas : 0;
      const int all = (s.tiles - b + s.ctas - 1) / s.ctas;
      worst = std::max(worst, whole + (all - whole) * kHalfTileCost);
    }
    return worst;
  };
  if (tile_t != 256) return plan(0);
  if (half_rows >= 0) return plan(std::min(half_rows, rows));
  const Schedule whole = plan(0);
  Schedule best = whole;
  double best_time = longest(whole);
  for (int h = 1; h <= std::min(rows, 4); ++h) {
    const Schedule s = plan(h);
    const double t = longest(s);
    if (t < best_time - 1e-9) best = s, best_time = t;
  }
  return best_time <= longest(whole) * (1 - kMinHalfTileGain) ? best : whole;
}

template <typename T, int kTileT>
cudaError_t launch(const W4A4Pow2GemmArgs& a, cudaStream_t stream) {
  const CUtensorMapDataType half =
      a.dtype == DType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  CUtensorMap maps[7] = {};  // act, w, exp, lact, lup, and act, lact in half tiles
  bool ok = make_map(&maps[0], CU_TENSOR_MAP_DATA_TYPE_UINT8, a.codes, a.K, a.M, a.K, 64, kTileT,
                     CU_TENSOR_MAP_SWIZZLE_64B) &&
            make_map(&maps[5], CU_TENSOR_MAP_DATA_TYPE_UINT8, a.codes, a.K, a.M, a.K, 64, kTileT / 2,
                     CU_TENSOR_MAP_SWIZZLE_64B) &&
            make_map(&maps[1], CU_TENSOR_MAP_DATA_TYPE_UINT8, a.qweight, a.K / 2, a.N, a.K / 2, 32, kTileN,
                     CU_TENSOR_MAP_SWIZZLE_NONE) &&
            make_map(&maps[2], CU_TENSOR_MAP_DATA_TYPE_UINT8, a.wexp, a.n_al, a.K / 64, a.n_al, kTileN, 1,
                     CU_TENSOR_MAP_SWIZZLE_NONE);
  if (ok && a.rank)
    ok = make_map(&maps[3], half, a.lora_act, a.rank, a.M, a.rank * 2ull, kLoraChunk, kTileT,
                  CU_TENSOR_MAP_SWIZZLE_64B) &&
         make_map(&maps[6], half, a.lora_act, a.rank, a.M, a.rank * 2ull, kLoraChunk, kTileT / 2,
                  CU_TENSOR_MAP_SWIZZLE_64B) &&
         make_map(&maps[4], half, a.lora_up, a.rank, a.N, a.rank * 2ull, kLoraChunk, kTileN,
                  CU_TENSOR_MAP_SWIZZLE_64B);
  if (!ok) return cudaErrorInvalidValue;
  auto kernel = w4a4_gemm_pow2_kernel<T, kTileT>;
  constexpr int smem = Layout<kTileT>::kSmemBytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const int tiles_n = (a.N + kTileN - 1) / kTileN;
  const Schedule sc = make_schedule(a.M, tiles_n, kTileT, a.half_rows);
  kernel<<<sc.ctas, kThreads, smem, stream>>>(maps[0], maps[1], maps[2], maps[3], maps[4], maps[5], maps[6], a.atok,
                                              a.wbase, static_cast<const T*>(a.bias), static_cast<T*>(a.y), a.M,
                                              a.m_al, a.N, a.K, a.rank, a.gelu_from, tiles_n, sc.big_tiles, sc.tiles);
  return cudaGetLastError();
}

// tile_t 0: 256-token tiles when they give at least half of the SMs a tile, else 128. 256 expands
// each weight for twice the tokens and measured faster wherever that held (M = 256..4608 at the
// FLUX shapes, bench/NOTES.md), even with fewer tiles than SMs; 192 never measured best.
int token_tile(const W4A4Pow2GemmArgs& a) {
  if (a.tile_t) return a.tile_t;
  const int tiles = (a.N + kTileN - 1) / kTileN * ((a.M + 255) / 256);
  return 2 * tiles >= sm_count() ? 256 : 128;
}

template <typename T>
cudaError_t launch_for(const W4A4Pow2GemmArgs& a, cudaStream_t stream) {
  return token_tile(a) == 256 ? launch<T, 256>(a, stream) : launch<T, 128>(a, stream);
}

}  // namespace

const char* w4a4_gemm_pow2(const W4A4Pow2GemmArgs& a, cudaStream_t stream) {
  if (a.M <= 0 || a.N <= 0 || a.N % 8 || a.K <= 0 || a.K % 64)
    return "w4a4_gemm_pow2: needs M > 0, N a multiple of 8 and K a multiple of 64";
  if (a.rank < 0 || a.rank % 16) return "w4a4_gemm_pow2: rank must be a multiple of 16";
  if (a.m_al < a.M || a.m_al % 4) return "w4a4_gemm_pow2: m_al must be M rounded up to a multiple of 4";
  if (a.n_al < a.N || a.n_al % 16) return "w4a4_gemm_pow2: n_al must be N rounded up to a multiple of 16";
  if (a.K > 131072) return "w4a4_gemm_pow2: K must be at most 131072 (exact int32 accumulation)";
  for (const void* p : {static_cast<const void*>(a.codes), static_cast<const void*>(a.atok), a.lora_act,
                        static_cast<const void*>(a.qweight), static_cast<const void*>(a.wexp),
                        static_cast<const void*>(a.wbase), a.lora_up, static_cast<const void*>(a.y)})
    if (p && !aligned16(p)) return "w4a4_gemm_pow2: every tensor must start on a 16-byte boundary";
  if (a.tile_t != 0 && a.tile_t != 128 && a.tile_t != 256) return "w4a4_gemm_pow2: tile_t must be 0, 128 or 256";
  if (!tensor_map_encoder()) return "w4a4_gemm_pow2: cuTensorMapEncodeTiled is not available from the driver";
  const cudaError_t err =
      a.dtype == DType::kBF16 ? launch_for<__nv_bfloat16>(a, stream) : launch_for<__half>(a, stream);
  if (err == cudaErrorInvalidValue) return "w4a4_gemm_pow2: cuTensorMapEncodeTiled rejected a tensor";
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace svdq::sm90
