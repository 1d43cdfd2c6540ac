// Whole-K kernel 2 of the sm80 family for power-of-two scales: the W4A4 GEMM on INT8 mma.sync over
// all of K in int32, fused with the low-rank up projection, bias and an optional GELU (any sm_80 or
// newer GPU; the fast path of the INT8 variant, w4a4_gemm.cu's kInt8 instantiation on exact layers).
//
//   wscale[g, n] = wbase[n] * 2^-f[g, n]   f in [0, 4] (numerics.pow2_weight_exponents)
//   ascale[m, g] = atok[m] * 2^-e[m, g]    e in [0, 3] (kernel 1 in pow2 mode, act_quant_pow2_s8_*)
//   y[m, n] = act(atok[m] * wbase[n] * 2^-7 * sum_k (code_a 2^(3-e)) (code_w 2^(4-f))
//                 + sum_r lora_act[m, r] * lora_up[n, r] + bias[n]),
//   act = tanh-GELU on channels n >= gelu_from (none where gelu_from < 0), identity elsewhere; with a
//   residual, the stored value is residual[m, n] + gate[m / gate_rows, n] * y[m, n] (FLUX's gated
//   residual streams, each product and sum rounded to 16 bits as PyTorch's ops do: numerics.gated_residual),
//
// which is the per-group sum of w4a4_gemm.cu term by term. Both operands are integers that fit s8
// (weights in [-128, 112], activations in [-64, 120]; |product| <= 15360), so mma.sync m16n8k32 s8
// sums all of K exactly in int32 for K <= 131072: no per-group promotion (w4a4_gemm.cu's two FFMA
// per accumulator and group, most of its issue slots) and int32 accumulators only, one float scale
// per (token, channel) in the epilogue.
//
// Operands:
//   codes [M, K] s8 bytes from kernel 1 (act_quant.cu, pow2_s8 mode: inside each 32-column half of
//     a group, the even columns' bytes then the odd ones', mma k32 slot order), atok [m_al] fp32;
//   qweight [N, K/2] packed INT4 in its natural layout (low nibble = even column), the one copy of
//     the weights: expanded on chip, per packed word w of 8 codes of channel n, into the two s8 words
//     lo = the even codes * 2^(4-f), hi = the odd codes * 2^(4-f): (w << 4) & 0xF0F0F0F0 and
//     w & 0xF0F0F0F0 are 16 * code per byte; a logical shift right by f divides each byte by 2^f
//     (the low 4 bits of every byte are zero, so no bit crosses a byte for f <= 4), and the top f
//     bits of the negative bytes are set again from a sign-replicating prmt masked by fill(f). The
//     k32 slots of lo / hi are those of kernel 1's byte order, so every product is summed once.
//   wexp [K/64, n_al] uint8 (f per group and channel, rows padded to n_al = N rounded up to 16),
//   wbase [N] fp32, lora_act [M, rank], lora_up [N, rank], bias [N] (16-bit, y's dtype), y [M, N].
//
// Work split: a tile is kTileM tokens x kTileN channels, tile t = token tile t % tiles_m, channel
// tile t / tiles_m (tiles_m = ceil(M / kTileM)). A CTA's warps each own 128 tokens x 32 channels
// of its tile (8 x 4 mma tiles): each weight word is expanded by one warp of the CTA only, and a
// warp's expansion (8 packed words per thread and group) is spread over 64 MMAs; the A fragments
// (s8 from kernel 1, no expansion) come from ldmatrix as they are. 128 int32 accumulators per
// thread.
//
// Data-parallel + stream-K: CTAs 0 .. dp_tiles - 1 each run tile b over all of K (the full waves);
// the remaining tiles (those of the partial last wave, svdquant/families/sm80.py's stream_k_plan)
// are each shared by `splits` consecutive CTAs, CTA dp_tiles + splits s + i taking tile dp_tiles + s
// over groups [i G / splits, (i + 1) G / splits) (G = K/64), so that the last wave fills the GPU's
// CTA slots. Each of a stream-K tile's CTAs takes a ticket from the tile's counter
// (stream_k_counters[s], arrivals in the low 16 bits); all but the last to arrive store their int32
// accumulators to sk_partials (slot `ticket` of the tile's splits - 1, 64 KB each, in fragment
// order: int4 v of thread t at [v][t]), announce it (+1 << 16, release) and exit; the last waits
// for the splits - 1 announcements (acquire), adds the partial sums to its own, sets the counter
// back to 0 and runs the epilogue. Integer sums: the result is bit for bit the data-parallel one
// in any arrival order. Waiting is only on CTAs that already hold a ticket (past their main loop),
// so no order of CTA dispatch can deadlock. The counters are a module variable: zero when the
// module is loaded, zero after every launch, so no launch needs a memset (nor does a CUDA graph);
// launches that overlap in time on one GPU (two streams at once) would share them: stream-K
// launches on one GPU must run one after another.
//
// Stages: K/64 main stages (a stream-K CTA: those of its slice; codes [kTileM][64 B], qweight
// [kTileN][32 B], wexp [kTileN B]), then rank/16 low-rank stages (lora_act [kTileM][32 B] and
// lora_up [kTileN][32 B] in the codes and qweight slots; a stream-K CTA that exits at the exchange
// has loaded the first of them in vain), whose bf16/fp16 MMAs accumulate into the scaled fp32
// accumulators. Stages flow through a kStages-deep cp.async ring in dynamic shared memory (128 x
// 128 x 3 stages: 37 KB, two CTAs fit the 100 KB of an sm_86/89/120 SM); codes rows are stored
// with chunk c of row r at c ^ ((r / 2) % 4), the 32-byte rows as w4a4_gemm.cu's, so that ldmatrix
// is conflict-free. Rows past M and N are zero-filled and never stored. A group runs as its two k32
// half-steps, pipelined by one in registers: a half-step's 32 MMAs per warp issue while the next
// half-step's operands (8 A fragments, the 4 n tiles' weight words of that half expanded) load into
// the registers the half-step before used. In the middle of group g, before group g + 1's first half
// loads, the CTA waits for stage g + 1 and meets at a barrier: every warp then holds all of group g's
// operands, so g's ring slot takes stage g + 3; stages g + 2 and g + 3 are in flight (kStages - 1)
// while g's second half-step and g + 1's first compute.
//
// Entry points: w4a4_gemm_pow2_int8_{bf16,fp16}(const uint8_t* codes, const float* atok,
//   const uint8_t* qweight, const uint8_t* wexp, const float* wbase, const T* lora_act,
//   const T* lora_up, const T* bias, T* y, int M, int N, int K, int n_al, int rank, int gelu_from,
//   const T* residual, const T* gate, int gate_rows, int dp_tiles, int splits, int* sk_partials);
//   residual [M, N] or null, gate [B, N], gate_rows: y = residual + gate * y (sm80.cuh store_tiles;
//   y may be the residual).
//   grid dp_tiles + splits * (stream-K tiles), block kThreads, kStages * kStageBytes of dynamic
//   shared memory; sk_partials [stream-K tiles][splits - 1][kTileM x kTileN] int32 (unused without
//   stream-K tiles). Requires K % 64 == 0, K <= 131072, N % 8 == 0, rank % 16 == 0 and, where there
//   are stream-K tiles, 2 <= splits <= K/64 and at most kMaxStreamKTiles of them.
#include "sm80.cuh"

namespace svdq::sm80 {
namespace {

// CTA tile and ring depth: host constants of the same values in svdquant/families/sm80.py
// (_POW2_TILE_M, _POW2_TILE_N, _POW2_STAGES, _POW2_WARP_M).
constexpr int kTileM = 128;  // tokens per CTA: a multiple of kWarpM
constexpr int kTileN = 128;  // channels per CTA: a multiple of 64
constexpr int kStages = 3;
constexpr int kWarpM = 128;  // tokens per warp, 128 or 64 (_POW2_WARP_M)
constexpr int kWarpsM = kTileM / kWarpM, kWarpsN = kTileN / 32;  // warps of kWarpM tokens x 32 channels
constexpr int kThreads = 32 * kWarpsM * kWarpsN;
// CTAs per SM the registers allow: a 128-token warp holds 128 int32 accumulators per thread (255
// registers: 8 warps per SM), a 64-token warp 64 (128 registers: 16 warps per SM).
constexpr int kMinBlocks = (kWarpM == 128 ? 8 : 16) * 32 / kThreads;
// Stage layout (bytes): codes [kTileM][64] (or lora_act [kTileM][32]), qweight [kTileN][32] (or
// lora_up), wexp [kTileN].
constexpr int kOffW = kTileM * 64;
constexpr int kOffExp = kOffW + kTileN * 32;
constexpr int kStageBytes = kOffExp + kTileN;
static_assert(kStages * kStageBytes >= kStagingBytes<kTileM, kTileN>, "the epilogue stages its tile in the ring");
// 16-byte copies per thread and stage: codes, qweight (and lora_up), lora_act
constexpr int kCodeCopies = kTileM * 4 / kThreads, kWCopies = kTileN * 2 / kThreads, kActCopies = kTileM * 2 / kThreads;

// Byte offset of 16-byte chunk `chunk` (0..3) of row `row` in a [rows][64-byte] tile.
__device__ __forceinline__ int tile64_offset(int row, int chunk) { return row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4); }
// Byte offset of 16-byte chunk `chunk` (0, 1) of row `row` in a [rows][32-byte] tile.
__device__ __forceinline__ int tile32_offset(int row, int chunk) { return row * 32 + ((chunk ^ ((row >> 2) & 1)) << 4); }

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// The byte mask of the top f bits of every byte (f in [0, 4]), which the sign fills after >> f.
__device__ __forceinline__ uint32_t sign_fill(uint32_t f) { return prmt(0xE0C08000u, 0xF0u, f * 0x1111u); }

// A packed weight word (8 codes of one channel) -> the s8 words of its even and odd codes times 2^(4-f).
__device__ __forceinline__ void expand_pow2(uint32_t w, uint32_t f, uint32_t fill, uint32_t& lo, uint32_t& hi) {
  const uint32_t w4 = w << 4;
  lo = ((w4 & 0xF0F0F0F0u) >> f) | (prmt(w4, 0u, 0xBA98u) & fill);
  hi = ((w & 0xF0F0F0F0u) >> f) | (prmt(w, 0u, 0xBA98u) & fill);
}

// blockIdx.x, read anew at each call (a value the compiler cannot reuse from an earlier read).
__device__ __forceinline__ int cta_index() {
  int cta;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(cta));
  return cta;
}

// A counter per stream-K tile (the work split above); sm80.py's STREAM_K_MAX_TILES.
constexpr int kMaxStreamKTiles = 4096;
__device__ int stream_k_counters[kMaxStreamKTiles];

// Stream-K exchange: the ticket (relaxed), the announcement of stored partial sums (release, as
// seen by the waiting CTA's acquire) and the partial sums' loads from L2 (never a stale L1 line).
__device__ __forceinline__ int atomic_add_gpu(int* p, int v) {
  int old;
  asm volatile("atom.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}
__device__ __forceinline__ void red_add_release_gpu(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ int load_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void store_v4(int* p, const int (&v)[4]) {
  asm volatile("st.global.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3])
               : "memory");
}
__device__ __forceinline__ void load_l2_v4(const int* p, int& a, int& b, int& c, int& d) {
  asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];" : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "l"(p) : "memory");
}

template <typename T>
__device__ __forceinline__ void w4a4_gemm_pow2(const uint8_t* __restrict__ codes, const float* __restrict__ atok,
                                               const uint8_t* __restrict__ qweight, const uint8_t* __restrict__ wexp,
                                               const float* __restrict__ wbase, const T* __restrict__ lora_act,
                                               const T* __restrict__ lora_up, const T* __restrict__ bias,
                                               T* y, int M, int N, int K, int n_al, int rank, int gelu_from,
                                               const T* residual, const T* __restrict__ gate, int gate_rows,
                                               int dp_tiles, int splits, int* __restrict__ sk_partials) {
  constexpr int kMT = kWarpM / 16, kNT = 4;  // mma tiles of a warp
  extern __shared__ __align__(128) uint8_t ring[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  // This CTA's tile, its first token and channel, and its groups [first_group, first_group + groups)
  // (the work split above).
  const int tiles_m = (M + kTileM - 1) / kTileM;
  auto tile_origin = [&](int cta, int& tok, int& ch) {
    const int tile = cta < dp_tiles ? cta : dp_tiles + (cta - dp_tiles) / splits;
    tok = tile % tiles_m * kTileM;
    ch = tile / tiles_m * kTileN;
  };
  int tok0, ch0, first_group = 0, groups = K / 64;
  tile_origin(blockIdx.x, tok0, ch0);
  if (static_cast<int>(blockIdx.x) >= dp_tiles) {
    const int slice = (blockIdx.x - dp_tiles) % splits;
    first_group = slice * groups / splits;
    groups = (slice + 1) * groups / splits - first_group;
  }
  const int iters = groups + rank / 16;
  const int wm = (warp % kWarpsM) * kWarpM, wn = (warp / kWarpsM) * 32;

  // Stage copies, sources computed once and advanced a stage at a time (w4a4_gemm.cu's scheme).
  // Codes: thread t copies chunk t % 4 of rows t / 4 + (kThreads / 4) i; qweight, lora_up and
  // lora_act: chunk t % 2 of rows t / 2 + (kThreads / 2) i; threads 0 .. kTileN / 16 - 1 copy 16
  // channels' wexp each. Row steps keep the swizzles (multiples of 8 rows).
  const int cr = tid / 4, cc = tid % 4;
  const int c_dst = tile64_offset(cr, cc);  // row cr + (kThreads / 4) i: + kThreads / 4 * 64 * i
  const int r0 = tid / 2, hf = tid % 2;
  const int w_dst = tile32_offset(r0, hf);  // row r0 + (kThreads / 2) i: + kThreads / 2 * 32 * i
  bool cv[kCodeCopies], av[kActCopies], nv[kWCopies];
  const uint8_t* c_src[kCodeCopies];  // codes, then lora_act (the first kActCopies)
  const uint8_t* w_src[kWCopies];     // qweight, then lora_up
#pragma unroll
  for (int i = 0; i < kCodeCopies; ++i) {
    const int tok = tok0 + cr + kThreads / 4 * i;
    cv[i] = tok < M;
    c_src[i] = codes + static_cast<size_t>(cv[i] ? tok : 0) * K + 64 * first_group + 16 * cc;
  }
#pragma unroll
  for (int i = 0; i < kActCopies; ++i) av[i] = tok0 + r0 + kThreads / 2 * i < M;
#pragma unroll
  for (int i = 0; i < kWCopies; ++i) {
    const int ch = ch0 + r0 + kThreads / 2 * i;
    nv[i] = ch < N;
    w_src[i] = qweight + static_cast<size_t>(nv[i] ? ch : 0) * (K / 2) + 32 * first_group + 16 * hf;
  }
  const bool copies_exp = tid < kTileN / 16, exp_valid = ch0 + 16 * tid < n_al;
  const uint8_t* e_src = wexp + static_cast<size_t>(first_group) * n_al + (exp_valid ? ch0 + 16 * tid : 0);
  int next = 0, next_slot = 0;  // the next stage to load and its ring slot

  auto advance = [&]() {
    cp_async_commit();
    ++next;
    next_slot = next_slot == kStages - 1 ? 0 : next_slot + 1;
  };
  // A stage's 32-byte rows of qweight (group stages) or lora_up (low-rank stages), from w_src.
  auto copy_w_rows = [&](uint8_t* st) {
#pragma unroll
    for (int i = 0; i < kWCopies; ++i) {
      cp_async16(st + kOffW + w_dst + kThreads / 2 * 32 * i, w_src[i], nv[i]);
      w_src[i] += 32;
    }
  };
  auto load_group = [&]() {
    uint8_t* st = ring + next_slot * kStageBytes;
#pragma unroll
    for (int i = 0; i < kCodeCopies; ++i) {
      cp_async16(st + c_dst + kThreads / 4 * 64 * i, c_src[i], cv[i]);
      c_src[i] += 64;
    }
    copy_w_rows(st);
    if (copies_exp) {
      cp_async16(st + kOffExp + 16 * tid, e_src, exp_valid);
      e_src += n_al;
    }
    advance();
  };
  // Low-rank stages read lora_act and lora_up through c_src[0 .. kActCopies - 1] and w_src, set at
  // the switch.
  auto load_low_rank = [&]() {
    if (next < iters) {
      uint8_t* st = ring + next_slot * kStageBytes;
#pragma unroll
      for (int i = 0; i < kActCopies; ++i) {
        cp_async16(st + w_dst + kThreads / 2 * 32 * i, c_src[i], av[i]);
        c_src[i] += 32;
      }
      copy_w_rows(st);
    }
    advance();
  };
  auto switch_to_low_rank = [&]() {
#pragma unroll
    for (int i = 0; i < kActCopies; ++i) {
      const int tok = tok0 + r0 + kThreads / 2 * i;
      c_src[i] = reinterpret_cast<const uint8_t*>(lora_act + static_cast<size_t>(av[i] ? tok : 0) * rank + 8 * hf);
    }
#pragma unroll
    for (int i = 0; i < kWCopies; ++i) {
      const int ch = ch0 + r0 + kThreads / 2 * i;
      w_src[i] = reinterpret_cast<const uint8_t*>(lora_up + static_cast<size_t>(nv[i] ? ch : 0) * rank + 8 * hf);
    }
  };

  int acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;
  for (int s = 0; s < kStages - 1; ++s) {
    if (next < groups) {
      load_group();
    } else {
      if (next == groups && rank) switch_to_low_rank();
      load_low_rank();
    }
  }

  // ldmatrix row addresses of this lane. Codes (m tile i, k32 half c): row wm + 16 i + lane % 8 +
  // 8 ((lane / 8) % 2), chunk 2 c + lane / 16; lora_up (n tiles 2 jj, 2 jj + 1: both halves of
  // each): row wn + 16 jj + lane % 8 + 8 (lane / 16), chunk (lane / 8) % 2; lora_act (m tile i):
  // row as the codes', chunk lane / 16 of the 32-byte rows. Offsets repeat every 16 rows.
  const int a_row = wm + lane % 8 + 8 * ((lane / 8) % 2);
  const int a_off0 = tile64_offset(a_row, lane / 16), a_off1 = tile64_offset(a_row, 2 + lane / 16);
  const int l_off = tile32_offset(a_row, lane / 16);
  const int b_off = kOffW + tile32_offset(wn + lane % 8 + 8 * (lane / 16), (lane / 8) % 2);
  const int gid = lane / 4, q = lane % 4;

  // A group stage runs as its two k32 half-steps, pipelined by one: the operands of a half-step (the
  // kMT A fragments, ldmatrix as they are, and the kNT n tiles' weights of that half, expanded) are
  // loaded into registers while the MMAs of the half-step before issue. One half-step's B: one
  // ldmatrix.x4 whose matrix j is n tile j's 32-byte rows at chunk `half` (lane l: row wn + l).
  struct HalfStep {
    uint32_t a[kMT][4];
    uint32_t b[kNT][2];  // n tile j: b0 (even codes), b1 (odd codes)
  };
  // The exponents f of this thread's kNT channels and their sign fills: read with a group's first
  // half-step, kept for its second.
  uint32_t exps[kNT], fills[kNT];
  auto load_half = [&](HalfStep& h, const uint8_t* st, int half) {
    uint32_t w[kNT];
    ldmatrix_x4(w, st + kOffW + tile32_offset(wn + lane, half));
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      if (half == 0) {
        exps[j] = st[kOffExp + wn + 8 * j + gid];
        fills[j] = sign_fill(exps[j]);
      }
      expand_pow2(w[j], exps[j], fills[j], h.b[j][0], h.b[j][1]);
    }
#pragma unroll
    for (int i = 0; i < kMT; ++i) ldmatrix_x4(h.a[i], st + (half ? a_off1 : a_off0) + 16 * 64 * i);
  };
  auto mma_half = [&](const HalfStep& h) {
#pragma unroll
    for (int i = 0; i < kMT; ++i)
#pragma unroll
      for (int j = 0; j < kNT; ++j) mma_m16n8k32_s8(acc[i][j], h.a[i], h.b[j][0], h.b[j][1], acc[i][j]);
  };

  // Group `it` in ring slot `slot` but the last: its first half-step's MMAs while its second half's
  // operands load; then, once stage it + 1 has landed and every warp holds all of group it's
  // operands (the barrier), its slot takes stage it + 3 (`refill`), and its second half-step's MMAs
  // issue while the first half of group it + 1 loads. The last group's second half loads nothing.
  HalfStep first, second;  // operands of a group's k32 halves 0 and 1
  int it = 0, slot = 0;    // the group computed and its ring slot
  auto group = [&](auto refill) {
    load_half(second, ring + slot * kStageBytes, 1);
    mma_half(first);
    slot = slot == kStages - 1 ? 0 : slot + 1;
    cp_async_wait<kStages - 2>();
    __syncthreads();
    refill();
    load_half(first, ring + slot * kStageBytes, 0);
    mma_half(second);
  };
  auto refill_low_rank = [&]() {
    if (next == groups && rank) switch_to_low_rank();
    load_low_rank();
  };
  // Group 0's first half-step loads as a group's second half-step would load it: stage 0 landed,
  // stage kStages - 1 into the free slot.
  cp_async_wait<kStages - 2>();
  __syncthreads();
  if (next < groups) {
    load_group();
  } else {
    refill_low_rank();
  }
  load_half(first, ring, 0);
  // Steady state: the stage loaded is a group; then the groups but the last while the low-rank
  // stages (or none) load; then the last group.
  for (; next < groups; ++it) group(load_group);
  for (; it < groups - 1; ++it) group(refill_low_rank);
  load_half(second, ring + slot * kStageBytes, 1);
  mma_half(first);
  mma_half(second);
  slot = slot == kStages - 1 ? 0 : slot + 1;
  ++it;

  if (static_cast<int>(blockIdx.x) >= dp_tiles) {  // a stream-K tile's exchange (opening comment)
    const int sk_tile = (blockIdx.x - dp_tiles) / splits;
    // The ticket is passed to the CTA's threads through the first stage's wexp bytes, which no
    // low-rank stage loads into, once every warp is done with the last group stage: a static
    // __shared__ variable instead made the data-parallel CTAs slower (bench/NOTES.md#sm80-dp-ab).
    int& ticket = *reinterpret_cast<int*>(ring + kOffExp);
    int* counter = stream_k_counters + sk_tile;
    int* partials = sk_partials + static_cast<size_t>(sk_tile) * (splits - 1) * (kTileM * kTileN);
    __syncthreads();
    if (tid == 0) ticket = atomic_add_gpu(counter, 1) & 0xFFFF;
    __syncthreads();
    const int my_ticket = ticket;
    if (my_ticket < splits - 1) {
      int* slot_sums = partials + static_cast<size_t>(my_ticket) * (kTileM * kTileN) + 4 * tid;
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j)
          store_v4(slot_sums + 4 * kThreads * (kNT * i + j), acc[i][j]);
      __syncthreads();
      if (tid == 0) red_add_release_gpu(counter, 1 << 16);
      cp_async_wait<0>();
      return;
    }
    if (tid == 0) {
      while (load_acquire_gpu(counter) >> 16 != splits - 1) {
      }
      *counter = 0;
    }
    __syncthreads();
    for (int s = 0; s < splits - 1; ++s) {
      const int* slot_sums = partials + static_cast<size_t>(s) * (kTileM * kTileN) + 4 * tid;
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          int p[4];
          load_l2_v4(slot_sums + 4 * kThreads * (kNT * i + j), p[0], p[1], p[2], p[3]);
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][j][e] += p[e];
        }
    }
  }

  // The tile's origin computed again from a fresh read of the CTA index: kept live across the main
  // loops, ptxas (at 255 registers) would spill it.
  tile_origin(cta_index(), tok0, ch0);

  // out[i][j] holds tokens wm + 16 i + gid (+ 8 for elements 2, 3), channels wn + 8 j + 2 q + {0, 1}:
  // the integer sums times atok[token] * wbase[channel] * 2^-7, the scales left out of the operands.
  float out[kMT][kNT][4];
  {
    float wb[kNT][2];
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const int ch = ch0 + wn + 8 * j + 2 * q;
      wb[j][0] = ch < N ? __ldg(wbase + ch) * 0x1p-7f : 0.f;
      wb[j][1] = ch < N ? __ldg(wbase + ch + 1) * 0x1p-7f : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
#pragma unroll
      for (int hrow = 0; hrow < 2; ++hrow) {
        const int tok = tok0 + wm + 16 * i + gid + 8 * hrow;
        const float ta = tok < M ? __ldg(atok + tok) : 0.f;
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          out[i][j][2 * hrow] = __int2float_rn(acc[i][j][2 * hrow]) * (ta * wb[j][0]);
          out[i][j][2 * hrow + 1] = __int2float_rn(acc[i][j][2 * hrow + 1]) * (ta * wb[j][1]);
        }
      }
    }
  }

  // Low-rank stages: out += lora_act . lora_up^T, 16 ranks a stage.
  for (; it < iters; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    load_low_rank();
    const uint8_t* st = ring + slot * kStageBytes;
#pragma unroll
    for (int jj = 0; jj < kNT / 2; ++jj) {
      uint32_t b[4];
      ldmatrix_x4(b, st + b_off + 16 * 32 * jj);
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
        uint32_t a[4];
        ldmatrix_x4(a, st + l_off + 16 * 32 * i);
        mma_m16n8k16<T>(out[i][2 * jj], a, b[0], b[1]);
        mma_m16n8k16<T>(out[i][2 * jj + 1], a, b[2], b[3]);
      }
    }
    slot = slot == kStages - 1 ? 0 : slot + 1;
  }
  cp_async_wait<0>();
  uint32_t yv[kMT][2][kNT];
  pack_tiles<T>(out, bias, ch0 + wn, N, gelu_from, lane, yv);
  store_tiles_staged<T, kMT, kNT, kTileM, kTileN, kThreads>(yv, y, tok0 + wm, ch0 + wn, M, N, residual, gate,
                                                           gate_rows, ring);
}

}  // namespace
}  // namespace svdq::sm80

#define SVDQ_W4A4_GEMM_POW2_ENTRY(NAME, T)                                                                      \
  extern "C" __global__ void __launch_bounds__(svdq::sm80::kThreads, svdq::sm80::kMinBlocks)              \
      NAME(const uint8_t* codes, const float* atok, const uint8_t* qweight, const uint8_t* wexp,               \
           const float* wbase, const T* lora_act, const T* lora_up, const T* bias, T* y, int M, int N, int K,  \
           int n_al, int rank, int gelu_from, const T* residual, const T* gate, int gate_rows, int dp_tiles,      \
           int splits, int* sk_partials) {                                                                      \
    svdq::sm80::w4a4_gemm_pow2<T>(codes, atok, qweight, wexp, wbase, lora_act, lora_up, bias, y, M, N, K, n_al, \
                                  rank, gelu_from, residual, gate, gate_rows, dp_tiles, splits, sk_partials);  \
  }

SVDQ_W4A4_GEMM_POW2_ENTRY(w4a4_gemm_pow2_int8_bf16, svdq::bfloat16)
SVDQ_W4A4_GEMM_POW2_ENTRY(w4a4_gemm_pow2_int8_fp16, svdq::float16)
