// Kernel 1: SVDQuant activation quantization fused with the low-rank down projection (sm_90a).
//
// One read of x [M, K] (16-bit) from device memory feeds every output:
//   codes    [M, K]      e4m3 bytes of the INT4 codes (pow2 mode: of code * 2^-e, exact in e4m3, or
//                        with int8_operands the s8 bytes of code * 2^(3-e) for the fast kernel 2),
//                        k permuted inside each 64-group in the order kernel 2 consumes (below);
//   ascales  exact mode: [K/64, m_al] per-(token, group) scales rounded to x's dtype, as fp32;
//            pow2 mode:  [1, m_al] per-token scales atok rounded to x's dtype, as fp32;
//            rows M..m_al-1 are written as 0;
//   lora_act [M, rank]   x @ lora_down, fp32 accumulation (tensor-core mma), stored in x's dtype.
//
// With `norm` (numerics.modulated_layer_norm, docs/DESIGN.md#producer-quantization) the tensor map
// holds a LayerNorm's input h and kernel 1 quantizes x = dtype(fma(dtype((h - mean) * rstd), mult, add))
// (mult, add [B, K] per batch of mod_rows tokens; none: x = the LayerNorm alone): the norm prologue
// below computes each token's statistics over the cluster and rewrites the resident x slice in place,
// so that everything after it reads x as if it had come from memory.
// x may also be the concatenation of two 16-bit tensors along K (FLUX's single blocks: the attention
// output and linear1's GELU columns, docs/DESIGN.md#producer-quantization): each group's TMA load
// reads its box from the piece that holds those columns, where it lies (rows may be strided), so the
// concatenation is never written.
//
// Numerics are those of numerics.quantize_activations (exact mode) and
// numerics.quantize_activations_pow2 (pow2 mode), bit for bit:
//   exact: v = (x + shift) / smooth (fp32, IEEE division); pow2: v = (x + shift) * (1 / smooth);
//   unsigned groups (shift > 0) clamp v at 0; with a rotation, signed groups (shift <= 0) are
//   rotated (numerics.rotate_groups, device.cuh's rotate_octet: the Hadamard rotation by sums and
//   differences, any other by its coefficients) before everything below reads v;
//   need = amax / qmax (qmax = 7 or 15, IEEE division);
//   exact: scale = dtype(need), code = rint(v / scale);
//   pow2:  atok = dtype(max over the token's groups of need), e the largest in [0, 3] such that
//          atok * 2^-e >= need (0 if none), code = rint(v * (2^e / atok)) (0 if atok < 2^-100);
//   codes clamped to [-8, 7] or [0, 15]; 0 where the scale is 0.
// The pow2 mode is our own definition and multiplies where the exact mode must divide like the
// reference engine: a few instructions per element instead of ~40 (bench/NOTES.md#v13).
// Divisions use a correctly rounded reciprocal and one Markstein correction step
// (q = n*r; q += (n - q*d)*r), which returns the correctly rounded quotient whenever the quotient
// is a normal number: checked exhaustively on the host for bf16 numerators against every bf16
// divisor and on 2e8 random fp32 pairs. Quotients outside [2^-100, 2^100] take __fdiv_rn.
// Rounding ties therefore break exactly as in the reference (rint = round half to even).
//
// Layout of `codes` (kernel 2 reads it with TMA and feeds it to wgmma as the B operand):
//   codes[m, 64 g + p] = e4m3(code[m, 64 g + perm(p)]),   perm(32 s + 16 h + 4 q + j) = 16 q + 8 s + 4 h + j
//   (s, h in {0, 1}; q, j in [0, 4)). Over the two k32 steps of a group, lane q of a wgmma A
//   fragment row holds k positions {32 s + 16 h + 4 q + j}; the permutation maps them onto the 16
//   consecutive natural columns 16q..16q+15, i.e. bytes 8q..8q+7 of the natural packed weight row:
//   the word of step s holds columns 16q + 8s .. +7, its low half (columns 0..3 of the word) going
//   to h = 0 and its high half to h = 1. Kernel 2 therefore reads qweight in its natural layout and
//   turns each packed word into two fragment registers with a table lookup.
//
// Work split: a cluster of cs CTAs owns 32 tokens; CTA c of it owns groups [c * gpc, (c+1) * gpc)
// of K (make_plan in svdquant/families/sm90.py picks cs and gpc). Its x slice, 32 tokens x gpc
// groups, is TMA-loaded once (one 32 x 64 box and mbarrier per group, 128-byte swizzle) and stays
// in shared memory, with the group's 1/smooth and (exact mode) smooth (bulk copies on the same
// mbarrier). As each group lands, pass 1 quantizes it (exact mode: codes and scales; pow2 mode:
// the group's need) and the low-rank mma consumes it. In pow2 mode the cluster then takes each
// token's largest need through distributed shared memory and pass 2 writes the codes from the
// shared-memory copy of x (no second read of x from memory). Exchanges push: each CTA stores its
// per-token maxima and its low-rank partials straight into the shared memory of the CTA that owns
// them (an inbox per rank block, two alternating), so one cluster barrier per rank block suffices
// and every read after it is local.
// Quantization: 8 threads per (token, group), 8 columns each; the Hadamard rotation by sums and
// differences, any other (the *_coefficients entry points) by its coefficients (3 KiB per pass) read from
// device memory (L1-resident), so that shared memory and occupancy are those of the unrotated
// kernel; pass 2 in pow2 mode rotates v again.
// Low-rank, from the unrotated x slice: mma.m16n8k16, warp w takes the 16-token half w % 2 and the
// 8-rank tiles w / 2 + 4 i, i < kTiles; ranks are processed in blocks of 32 * kTiles, one sweep over
// the resident x slice each. The B fragments come straight from L2 (no shared-memory staging, no
// block-wide barrier per group), one group ahead, from lora_down repacked at load time
// (kernel1_lora_down in svdquant/families/sm90.py) so that a lane's fragments of a group are 32
// contiguous bytes:
//   lora_p[n, 64 g + 16 q + 4 s + 2 h + e] = lora_down[64 g + 16 s + 8 h + 2 q + e, n]
//   (q, s in [0, 4), h, e in {0, 1}): lane q of the 8-rank tile holding rank n reads its b0 = (h 0)
//   and b1 = (h 1) registers of the four k16 steps s of group g in order.
// Each CTA sums the partials of its share of the outputs in CTA order, so the result is deterministic.
// Norm prologue: once the whole slice has landed, the 8 lanes of each (token, group) sum h and
// float32(h^2) over the group in float32 (numerics._group_sums' order: each lane its octet, then
// xor-shuffles), each thread totals its token's groups in float64 (exact), every CTA pushes its
// per-token pair to every CTA of the cluster (a [cs][32] double2 inbox), one cluster barrier, and each
// CTA derives mean and rstd as numerics does (float64, each operation rounded) and rewrites its slice.
#include "common.cuh"

namespace svdq::sm90 {
namespace {

constexpr int kTokens = 32;
constexpr int kThreads = 256;
constexpr int kXBoxBytes = kTokens * 128;  // one group of the x slice: [32 tokens][64 x 16-bit], swizzled
constexpr int kMaxClusterCtas = 16;        // non-portable cluster size (H100: up to 16)
constexpr int kPow2MaxExp = 3;             // pow2 mode: e in [0, 3] (numerics.POW2_ACT_MAX_EXP)

// Low-rank outputs of a rank block: [32 tokens][rank_block] as float2 pairs, CTA c of the cluster
// owning pairs [c * share, (c + 1) * share); its inbox holds [cs][share] pairs from every CTA.
__device__ __forceinline__ int pair_share(int rank_block, int cs) { return (kTokens * rank_block / 2 + cs - 1) / cs; }

// A group's parameters in shared memory: 1/smooth (fp32) at byte 0 and, exact mode only, smooth at
// 256 (the group's shift is one float, read from memory). Loading only what a launch reads keeps
// kernel 1 in pow2 mode at K = 15360 (15 groups per CTA) at three CTAs per SM instead of two
// (bench/NOTES.md#v20).
__device__ __forceinline__ int param_bytes(bool pow2) { return pow2 ? 256 : 512; }

// Shared-memory layout of a CTA (offsets from a 1024-byte aligned base); _act_quant_smem_bytes in
// sm90.py computes the same total for the launch.
struct SmemLayout {
  int params, inbox, inbox_pairs, need, tmax, bars, shift, stats, total;
};
__device__ __forceinline__ SmemLayout smem_layout(int gpc, int rank_block, int blocks, int cs, int pbytes,
                                                  bool norm) {
  SmemLayout s;
  s.params = gpc * kXBoxBytes;                                   // x slice at 0
  s.inbox = s.params + gpc * pbytes;                             // [gpc][param_bytes]
  s.inbox_pairs = cs * pair_share(rank_block, cs);               // float2 per inbox
  s.need = s.inbox + (blocks > 1 ? 2 : 1) * s.inbox_pairs * 8;   // low-rank inboxes
  s.tmax = s.need + gpc * kTokens * 4;                           // pow2: need [gpc][32]
  s.bars = s.tmax + kMaxClusterCtas * kTokens * 4;               // pow2: largest need [cs][32]
  s.shift = s.bars + gpc * 8;                                    // the groups' shifts [gpc]
  s.stats = (s.shift + gpc * 4 + 15) / 16 * 16;                  // norm: (s1, s2) [cs][32] double2
  s.total = norm ? s.stats + cs * kTokens * 16 : s.shift + gpc * 4;
  return s;
}

__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); }

// m16n8k16 tensor-core product with fp32 accumulation, A row-major and B column-major fragments.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_m16n8k16<bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<float16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of 128-byte rows written by TMA with
// CU_TENSOR_MAP_SWIZZLE_128B (the tile starts on a 1024-byte boundary).
__device__ __forceinline__ int swz128(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

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
  uint32_t r;  // e4m3x2: the first source goes to the upper byte
  asm("{.reg .b16 lo, hi;\n"
      "cvt.rn.satfinite.e4m3x2.f32 lo, %2, %1;\n"
      "cvt.rn.satfinite.e4m3x2.f32 hi, %4, %3;\n"
      "mov.b32 %0, {lo, hi};}"
      : "=r"(r)
      : "f"(a), "f"(b), "f"(c), "f"(d));
  return r;
}

__device__ __forceinline__ void load8(float (&v)[8], const float* p) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

// x + shift of one (token, group) octet: natural columns 8 t8 .. 8 t8 + 7 of the group, from its
// 16-byte chunk of the swizzled x box; shift: the group's shift (0 for none). A group is unsigned
// exactly where its shift is positive (numerics.unsigned_groups_from_shift), returned in `uns`.
template <typename T>
__device__ __forceinline__ void octet_inputs(const uint8_t* chunk, float shift, int t8, float (&n)[8], bool& uns) {
  unpack8<T>(*reinterpret_cast<const uint4*>(chunk), n);
  uns = shift > 0.f;
  if (shift != 0.f) {
#pragma unroll
    for (int e = 0; e < 8; ++e) n[e] = __fadd_rn(n[e], shift);
  }
}

// v of an octet: exact mode v = (x + shift) / smooth, dividing exactly where a quotient is zero,
// tiny or huge; pow2 mode v = (x + shift) * (1 / smooth). prm: the group's parameters
// (param_bytes). Unsigned groups clamp v at 0 (`uns`, as octet_inputs); signed ones are rotated
// where passes > 0 (rotate_octet<kCoefficients>, coef: its coefficients). Returns max |v|. Every lane
// of the warp calls it together (the rotation's shuffles).
template <typename T, bool kPow2, bool kCoefficients>
__device__ __forceinline__ float octet_values(const uint8_t* chunk, const uint8_t* prm, float shift, int t8,
                                              int passes, const float4* coef, float (&v)[8], bool& uns) {
  float n[8], inv[8];
  octet_inputs<T>(chunk, shift, t8, n, uns);
  load8(inv, reinterpret_cast<const float*>(prm) + 8 * t8);
  float hi = 0.f;
  if constexpr (kPow2) {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = __fmul_rn(n[e], inv[e]);
    if (!uns) {
#pragma unroll
      for (int e = 0; e < 8; ++e) hi = fmaxf(hi, fabsf(v[e]));
    }
  } else {
    float sm[8], lo = infinity();
    load8(sm, reinterpret_cast<const float*>(prm + 256) + 8 * t8);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      v[e] = div_fast(n[e], sm[e], inv[e]);
      lo = fminf(lo, fabsf(v[e]));
      hi = fmaxf(hi, fabsf(v[e]));
    }
    if (!(lo >= 0x1p-100f && hi <= 0x1p100f)) {  // a zero, tiny or huge quotient
      hi = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        v[e] = div_exact(n[e], sm[e]);
        hi = fmaxf(hi, fabsf(v[e]));
      }
    }
  }
  if (uns) {  // warp-uniform: a warp covers one group of 4 tokens
    hi = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      v[e] = fmaxf(v[e], 0.f);
      hi = fmaxf(hi, v[e]);
    }
  } else if (passes > 0) {
    rotate_octet<kCoefficients>(v, coef, passes, t8);
    hi = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) hi = fmaxf(hi, fabsf(v[e]));
  }
  return hi;
}

// The largest of the 8 lanes' values of a (token, group): they are consecutive lanes of one warp.
__device__ __forceinline__ float octet_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
}

// Exact mode: rint(v / scale) for an octet, as the reference computes it (clamp, 0 for a zero
// scale); scale is rounded to the 16-bit dtype T.
template <typename T>
__device__ __forceinline__ void octet_codes(const float (&v)[8], float scale, bool uns, float (&c)[8]) {
  if (scale >= Half<T>::kMinNormal && scale >= 0x1p-100f && scale <= 0x1p100f) {
    // A scale >= need * (1 - 2^-9) (need = amax / qmax; only rounding to a normal dtype value makes
    // it smaller, by at most 2^-9 relative) gives |v / scale| <= qmax * (1 + 2^-8), so rint lies in
    // [lo, hi] already (unsigned v >= 0): the reference's clamp is a no-op here. A quotient too
    // small to be normal rounds to code 0 either way.
    const float inv_scale = __frcp_rn(scale);
#pragma unroll
    for (int e = 0; e < 8; ++e) c[e] = rintf(div_fast(v[e], scale, inv_scale));
  } else if (scale > 0.f) {
    const float qlo = uns ? 0.f : -8.f, qhi = uns ? 15.f : 7.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) c[e] = fminf(fmaxf(rintf(div_exact(v[e], scale)), qlo), qhi);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) c[e] = 0.f;
  }
}

// Byte 0 of each float's bits: for v + 1.5 * 2^23 with v an integer in [-128, 127], the s8 byte of v
// (the addition puts v's two's complement in the low mantissa bits).
__device__ __forceinline__ uint32_t low_bytes4(float a, float b, float c, float d) {
  const uint32_t lo = prmt(__float_as_uint(a), __float_as_uint(b), 0x0040u);
  const uint32_t hi = prmt(__float_as_uint(c), __float_as_uint(d), 0x0040u);
  return prmt(lo, hi, 0x5410u);
}

// Stores an octet's 8 operand bytes (natural columns 8 t8 .. 8 t8 + 7 of a group, 4 per word):
// columns 0..3 go to p = 32 s + 4 q + j, columns 4..7 to p + 16, with q = t8 / 2, s = t8 % 2 (see
// perm above); row_t8 is the token's codes row plus this lane's offset 32 s + 4 q.
__device__ __forceinline__ void store_octet(uint8_t* row_t8, int g, uint32_t lo, uint32_t hi) {
  *reinterpret_cast<uint32_t*>(row_t8 + 64 * g) = lo;
  *reinterpret_cast<uint32_t*>(row_t8 + 64 * g + 16) = hi;
}

__device__ __forceinline__ float exp2i(int e) { return __int_as_float((127 + e) << 23); }  // 2^e, |e| < 127

// The kernel's inputs besides the x tensor map (the entry points' parameters, documented there).
struct ActQuantParams {
  const void* mod_mult;  // norm: [B, K] (null: the LayerNorm alone)
  const void* mod_add;
  int mod_rows;          // norm: tokens per batch
  bool norm;
  void* norm_out;        // norm: where to store the layer's input x [M, K] too (null: nowhere)
  double eps;
  const float* smooth;
  const float* inv_smooth;
  const float* shift;
  int rotation_passes;
  const float4* rotation_coef;
  const void* lora_down;
  uint8_t* codes;
  float* ascales;
  void* lora_act;
  int M, K, rank, m_al;
  bool int8_operands;
  int x2_group;          // groups from this one on come from the second piece of x (K / 64: one piece)
};

// The norm prologue (see the file comment): rewrites this CTA's x slice (ng groups at smem) in place from
// h to x. Called by every thread after the slice's loads were issued, with the cluster's start arrival
// pending; leaves a fresh arrival pending for the first exchange of act_quant.
template <typename T>
__device__ __forceinline__ void norm_prologue(uint8_t* smem, double2* stats, uint64_t* xbar,
                                              const ActQuantParams& a, int ng, int g0, int tok, int tl, int t8,
                                              int xoff, int crank, int cs) {
  double s1 = 0.0, s2 = 0.0;
  for (int g = 0; g < ng; ++g) {
    mbar_wait(&xbar[g], 0);
    float h[8];
    unpack8<T>(*reinterpret_cast<const uint4*>(smem + g * kXBoxBytes + xoff), h);
    float o1 = h[0], o2 = __fmul_rn(h[0], h[0]);
#pragma unroll
    for (int e = 1; e < 8; ++e) {
      o1 = __fadd_rn(o1, h[e]);
      o2 = __fadd_rn(o2, __fmul_rn(h[e], h[e]));
    }
#pragma unroll
    for (int d = 1; d < 8; d <<= 1) {  // the group's sums: every lane of the octet holds them
      o1 = __fadd_rn(o1, __shfl_xor_sync(0xffffffffu, o1, d));
      o2 = __fadd_rn(o2, __shfl_xor_sync(0xffffffffu, o2, d));
    }
    s1 = __dadd_rn(s1, static_cast<double>(o1));
    s2 = __dadd_rn(s2, static_cast<double>(o2));
  }
  cluster_wait();  // every CTA of the cluster has started
  for (int j = t8; j < cs; j += 8) *map_shared_rank(stats + crank * kTokens + tl, j) = make_double2(s1, s2);
  cluster_sync();
  cluster_arrive_relaxed();  // re-armed for act_quant's first exchange
  double t1 = 0.0, t2 = 0.0;
  for (int j = 0; j < cs; ++j) {
    const double2 p = stats[j * kTokens + tl];
    t1 = __dadd_rn(t1, p.x);
    t2 = __dadd_rn(t2, p.y);
  }
  const float2 token = layer_norm_stats(t1, t2, a.K, a.eps);  // mean, rstd
  if (tok < a.M) {  // rows past M stay zero
    const size_t row = a.mod_mult ? static_cast<size_t>(tok / a.mod_rows) * a.K : 0;
    for (int g = 0; g < ng; ++g) {
      uint8_t* chunk = smem + g * kXBoxBytes + xoff;
      float h[8];
      unpack8<T>(*reinterpret_cast<const uint4*>(chunk), h);
      layer_norm_octet<T>(h, token);
      if (a.mod_mult) {
        const size_t col = row + 64 * (g0 + g) + 8 * t8;
        modulate_octet<T>(h, __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(a.mod_mult) + col)),
                          __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(a.mod_add) + col)));
      }
      const uint4 x = pack8<T>(h);
      *reinterpret_cast<uint4*>(chunk) = x;
      if (a.norm_out)
        *reinterpret_cast<uint4*>(static_cast<T*>(a.norm_out) + static_cast<size_t>(tok) * a.K + 64 * (g0 + g) +
                                  8 * t8) = x;
    }
  }
  __syncthreads();  // the slice is x for every warp (the low-rank mma reads other tokens' rows)
}

template <typename T, bool kPow2, int kTiles, bool kCoefficients>
__device__ __forceinline__ void act_quant(const TensorMap& tm_x, const TensorMap& tm_x2, const ActQuantParams& a,
                                          int gpc) {
  constexpr int kRankBlock = 32 * kTiles;
  const int crank = cluster_ctarank(), cs = cluster_nctarank();
  extern __shared__ uint8_t smem_raw[];
  // offset (not an integer round trip) so that the compiler keeps shared-memory loads
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  const int g0 = crank * gpc, ng = min(gpc, a.K / 64 - g0);  // this CTA's groups (the plan makes ng >= 1)
  const int tok0 = blockIdx.y * kTokens;
  const int rank_block = a.rank ? min(kRankBlock, a.rank) : 0;
  const int blocks = a.rank ? (a.rank + kRankBlock - 1) / kRankBlock : 1;  // one sweep of x per rank block
  const int pbytes = param_bytes(kPow2);
  const SmemLayout lay = smem_layout(gpc, rank_block, blocks, cs, pbytes, a.norm);
  const uint8_t* params = smem + lay.params;
  float2* inbox = reinterpret_cast<float2*>(smem + lay.inbox);
  float* need_s = reinterpret_cast<float*>(smem + lay.need);
  float* tmax_s = reinterpret_cast<float*>(smem + lay.tmax);
  uint64_t* xbar = reinterpret_cast<uint64_t*>(smem + lay.bars);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const bool exchange = a.rank || kPow2 || a.norm;  // anything to exchange within the cluster
  // Stores into another CTA's shared memory need that CTA to have started: its arrival here is
  // waited for just before this CTA's first such store.
  if (exchange) cluster_arrive_relaxed();

  if (tid == 0) {
    for (int g = 0; g < ng; ++g) mbar_init(&xbar[g], 1);
    mbar_init_fence();
  }
  __syncthreads();
  if (tid == 0) {
    for (int g = 0; g < ng; ++g) {
      mbar_expect_tx(&xbar[g], kXBoxBytes + pbytes);
      const int gk = g0 + g;
      if (gk < a.x2_group)
        tma_load_2d(smem + g * kXBoxBytes, &tm_x, &xbar[g], 64 * gk, tok0);
      else
        tma_load_2d(smem + g * kXBoxBytes, &tm_x2, &xbar[g], 64 * (gk - a.x2_group), tok0);
      uint8_t* dst = smem + lay.params + g * pbytes;
      bulk_load(dst, a.inv_smooth + 64 * gk, 256, &xbar[g]);
      if (!kPow2) bulk_load(dst + 256, a.smooth + 64 * gk, 256, &xbar[g]);
    }
  }
  // the groups' shifts (one per group: kernels.group_shifts; 0 without one), read while the TMA
  // loads are in flight
  float* shift_s = reinterpret_cast<float*>(smem + lay.shift);
  if (tid >= 32 && tid < 32 + ng) shift_s[tid - 32] = a.shift ? a.shift[g0 + tid - 32] : 0.f;
  __syncthreads();

  const int tl = tid / 8, t8 = tid % 8, tok = tok0 + tl;  // quantization: token row, column octet
  const int xoff = swz128(tl, t8);                         // the octet's chunk in a group's x box
  if (a.norm)
    norm_prologue<T>(smem, reinterpret_cast<double2*>(smem + lay.stats), xbar, a, ng, g0, tok, tl, t8, xoff, crank,
                     cs);
  uint8_t* const codes_t8 = a.codes + static_cast<size_t>(tok) * a.K + 64 * g0 + 32 * (t8 & 1) + 4 * (t8 >> 1);
  const int mt = warp & 1, nbase = warp >> 1;             // low-rank: 16-token half, first 8-rank tile
  const int q = lane % 4, g8 = lane / 4;
  const T* lora_p = static_cast<const T*>(a.lora_down);
  float tmax = 0.f;  // pow2: this token's largest need over the CTA's groups
  for (int blk = 0; blk < blocks; ++blk) {
    float acc[kTiles][4];
#pragma unroll
    for (int i = 0; i < kTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    const int n8 = a.rank ? min(kRankBlock, a.rank - blk * kRankBlock) / 8 : 0;  // 8-rank tiles of the block
    // this lane's B fragments of one group: words 2s, 2s + 1 = b0, b1 of k16 step s
    uint32_t bfrag[kTiles][8];
    auto load_b = [&](int g, uint32_t (&b)[kTiles][8]) {
#pragma unroll
      for (int i = 0; i < kTiles; ++i) {
        const int nt = nbase + 4 * i;
        if (nt < n8) {
          const uint4* src = reinterpret_cast<const uint4*>(
              lora_p + static_cast<size_t>(blk * kRankBlock + 8 * nt + g8) * a.K + 64 * (g0 + g) + 16 * q);
          *reinterpret_cast<uint4*>(&b[i][0]) = __ldg(src);
          *reinterpret_cast<uint4*>(&b[i][4]) = __ldg(src + 1);
        }
      }
    };
    for (int g = 0; g < ng; ++g) {
      if (n8) load_b(g, bfrag);  // in flight during pass 1
      const uint8_t* xbox = smem + g * kXBoxBytes;
      if (blk == 0) {  // pass 1, as the group lands
        mbar_wait(&xbar[g], 0);
        float v[8];
        bool uns;
        const float amax =
            octet_max(octet_values<T, kPow2, kCoefficients>(xbox + xoff, params + g * pbytes, shift_s[g], t8,
                                                            a.rotation_passes, a.rotation_coef, v, uns));
        const float need = uns ? div_rn(amax, 15.f, 1.f / 15.f) : div_rn(amax, 7.f, 1.f / 7.f);
        if constexpr (kPow2) {
          if (t8 == 0) need_s[g * kTokens + tl] = need;
          tmax = fmaxf(tmax, need);
        } else {
          const float scale = round_to<T>(need);
          float c[8];
          octet_codes<T>(v, scale, uns, c);
          if (tok < a.M) store_octet(codes_t8, g, e4m3x4(c[0], c[1], c[2], c[3]), e4m3x4(c[4], c[5], c[6], c[7]));
          if (t8 == 0 && tok < a.m_al) a.ascales[static_cast<size_t>(g0 + g) * a.m_al + tok] = tok < a.M ? scale : 0.f;
        }
      }
      if (n8) {
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
          uint32_t af[4];
          const int row = 16 * mt + (lane & 15);
          ldmatrix_x4(af, xbox + swz128(row, 2 * ks + (lane >> 4)));
#pragma unroll
          for (int i = 0; i < kTiles; ++i) {
            if (nbase + 4 * i < n8) {  // warp-uniform
              const uint32_t bf[2] = {bfrag[i][2 * ks], bfrag[i][2 * ks + 1]};
              mma_m16n8k16<T>(acc[i], af, bf);
            }
          }
        }
      }
    }

    // End of a sweep: push this CTA's per-token largest need (pow2, first sweep) to every CTA and
    // its low-rank partials to their owners, then one cluster barrier; every read after it is local.
    if (!exchange) break;
    if (blk == 0) cluster_wait();  // every CTA of the cluster has started
    const int half_width = n8 * 4, share = pair_share(n8 * 8, cs);
    float2* box = inbox + (blk & 1) * lay.inbox_pairs;
#pragma unroll
    for (int i = 0; i < kTiles; ++i) {
      const int nt = nbase + 4 * i;
      if (nt < n8) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int p = (16 * mt + g8 + 8 * h) * half_width + 4 * nt + q, owner = p / share;
          *map_shared_rank(box + crank * share + p - owner * share, owner) =
              make_float2(acc[i][2 * h], acc[i][2 * h + 1]);
        }
      }
    }
    if (kPow2 && blk == 0)
      for (int j = t8; j < cs; j += 8) *map_shared_rank(tmax_s + crank * kTokens + tl, j) = tmax;
    cluster_sync();
    if constexpr (kPow2) {
      if (blk == 0) {  // pass 2: the codes, from the shared-memory copy of x
        float m = 0.f;
        for (int j = t8; j < cs; j += 8) m = fmaxf(m, tmax_s[j * kTokens + tl]);
        const float atok = round_to<T>(octet_max(m));
        const float inv_atok = atok >= 0x1p-100f ? __frcp_rn(atok) : 0.f;
        if (crank == 0 && t8 == 0 && tok < a.m_al) a.ascales[tok] = tok < a.M ? atok : 0.f;
        for (int g = 0; g < ng; ++g) {
          const float need = need_s[g * kTokens + tl];
          // e = the largest in [0, 3] with atok * 2^-e >= need: lanes t8 < 3 test e = t8 + 1, and
          // the tests are monotone in e, so e is their count
          const bool ok = t8 < kPow2MaxExp && atok * exp2i(-(t8 + 1)) >= need;
          const uint32_t votes = (__ballot_sync(0xffffffffu, ok) >> (lane & 24)) & 0xFFu;
          const int e = __popc(votes);
          // code = rint(v * 2^e / atok), v = (x + shift) * (1 / smooth), rotated: the reference's clamp to [qlo, qhi]
          // binds only at 0 for the negative v of unsigned groups (which it clamps at 0 first),
          // because atok >= need * (1 - 2^-9) and 2^e / atok <= 1 / need keep |v * mult| under
          // qmax * (1 + 2^-8)
          float n[8], inv[8], c[8];
          bool uns;
          const uint8_t* prm = params + g * pbytes;
          octet_inputs<T>(smem + g * kXBoxBytes + xoff, shift_s[g], t8, n, uns);
          load8(inv, reinterpret_cast<const float*>(prm) + 8 * t8);
#pragma unroll
          for (int k = 0; k < 8; ++k) n[k] = __fmul_rn(n[k], inv[k]);  // v
          if (a.rotation_passes > 0 && !uns)  // warp-uniform
            rotate_octet<kCoefficients>(n, a.rotation_coef, a.rotation_passes, t8);
          const float mult = __fmul_rn(inv_atok, exp2i(e)), qlo = uns ? 0.f : -8.f;  // mult is exact
#pragma unroll
          for (int k = 0; k < 8; ++k) c[k] = fmaxf(rintf(__fmul_rn(n[k], mult)), qlo);
          if (tok >= a.M) continue;
          if (a.int8_operands) {  // s8 bytes of code * 2^(3-e)
            const float step = exp2i(kPow2MaxExp - e), magic = 0x1.8p23f;
            store_octet(codes_t8, g,
                        low_bytes4(fmaf(c[0], step, magic), fmaf(c[1], step, magic), fmaf(c[2], step, magic),
                                   fmaf(c[3], step, magic)),
                        low_bytes4(fmaf(c[4], step, magic), fmaf(c[5], step, magic), fmaf(c[6], step, magic),
                                   fmaf(c[7], step, magic)));
          } else {  // e4m3 bytes of code * 2^-e
            const float step = exp2i(-e);
            store_octet(codes_t8, g, e4m3x4(c[0] * step, c[1] * step, c[2] * step, c[3] * step),
                        e4m3x4(c[4] * step, c[5] * step, c[6] * step, c[7] * step));
          }
        }
      }
    }
    if (a.rank) {  // this CTA's share of the block's outputs, summed over the cluster in CTA order
      T* out = static_cast<T*>(a.lora_act);
      const int p0 = crank * share, count = min(share, kTokens * half_width - p0);
      for (int i = tid; i < count; i += kThreads) {
        const int p = p0 + i, t = p / half_width, col = 2 * (p % half_width);
        if (tok0 + t >= a.M) continue;
        float2 sum = make_float2(0.f, 0.f);
        for (int j = 0; j < cs; ++j) {
          const float2 v = box[j * share + i];
          sum.x += v.x, sum.y += v.y;
        }
        *reinterpret_cast<uint32_t*>(out + static_cast<size_t>(tok0 + t) * a.rank + blk * kRankBlock + col) =
            pack2_rn<T>(sum.x, sum.y);
      }
    }
  }
}

}  // namespace
}  // namespace svdq::sm90

// Entry points: act_quant_<exact|pow2>_<bf16|fp16>_tiles<1|2>[_coefficients], the mode, the dtype of
// x, lora_down and lora_act, the 8-rank tiles per warp (rank blocks of 32 or 64; 4 CTAs per SM with
// one tile, 64 registers with a few bytes spilled, 3 with two) and the rotation path (none or
// Hadamard; _coefficients: any rotation by its coefficients). Launched as a grid of clusters
// (cs, round_up(M, 4) / 32 rounded up) of cs CTAs along x, 256 threads, dynamic shared memory as
// sm90.py computes it. Parameters:
//   tm_x        tensor map of x [M, K] 16-bit (with norm: of the LayerNorm's input h), box 64 columns x
//               32 rows, 128-byte swizzle; of its first piece [M, 64 x2_group] where x is a concatenation
//   tm_x2, x2_group  x's columns from 64 x2_group on come from tm_x2 (its columns from 0, same box and swizzle):
//               x is the concatenation of two tensors along K, each read where it is; x2_group = K / 64 and
//               tm_x2 = tm_x for one tensor (never with norm)
//   smooth      [K] fp32 copy of the layer's smooth (read in exact mode only)
//   inv_smooth  [K] 1 / smooth in fp32, correctly rounded
//   shift       [K/64] one shift per group, or null; > 0 marks an unsigned group
//   rotation_passes  0: no rotation; else the Hadamard one (one pass), or (_coefficients)
//               rotation_coef's rotation of rotation_passes passes
//   rotation_coef [192 rotation_passes] float4 the _coefficients entry points' rotation in
//               kernels.rotation_coefficients' layout (16-byte aligned); null for the others
//   lora_down   [rank, K] lora_down repacked by sm90.kernel1_lora_down (above)
//   codes       out [M, K] operand bytes (see above)
//   ascales     out [K/64, m_al] (exact) or [1, m_al] (pow2) fp32
//   lora_act    out [M, rank] 16-bit
//   M, K, rank, m_al (= round_up(M, 4)), int8_operands (pow2: s8 operands for the fast kernel 2),
//   gpc         groups of 64 columns per CTA
//   norm        nonzero: the norm prologue, with mod_mult, mod_add [B, K] 16-bit (null: no modulation),
//               mod_rows tokens per batch (M = B mod_rows) and the LayerNorm's eps; norm_out [M, K] 16-bit or
//               null: where to store x as well (for a low-rank GEMM of ranks kernel 1 does not take)
#define SVDQ_ACT_QUANT(NAME, T, POW2, TILES, COEFFICIENTS)                                                           \
  extern "C" __global__ void __launch_bounds__(256, TILES == 1 ? 4 : 3)                                              \
      NAME(const __grid_constant__ svdq::TensorMap tm_x, const __grid_constant__ svdq::TensorMap tm_x2,               \
           int x2_group, const float* smooth, const float* inv_smooth, const float* shift, int rotation_passes,      \
           const float4* rotation_coef, const void* lora_down, uint8_t* codes, float* ascales, void* lora_act,       \
           int M, int K, int rank, int m_al, int int8_operands, int gpc, int norm, const void* mod_mult,             \
           const void* mod_add, int mod_rows, double eps, void* norm_out) {                                          \
    const svdq::sm90::ActQuantParams params{mod_mult,  mod_add,       mod_rows,   norm != 0,  norm_out, eps,         \
                                            smooth,    inv_smooth,    shift,      rotation_passes, rotation_coef,    \
                                            lora_down, codes,         ascales,    lora_act,   M,        K,           \
                                            rank,      m_al,          int8_operands != 0, x2_group};                \
    svdq::sm90::act_quant<svdq::T, POW2, TILES, COEFFICIENTS>(tm_x, tm_x2, params, gpc);                             \
  }
#define SVDQ_ACT_QUANT_ENTRIES(NAME, T, POW2, TILES) \
  SVDQ_ACT_QUANT(NAME, T, POW2, TILES, false)        \
  SVDQ_ACT_QUANT(NAME##_coefficients, T, POW2, TILES, true)

SVDQ_ACT_QUANT_ENTRIES(act_quant_exact_bf16_tiles1, bfloat16, false, 1)
SVDQ_ACT_QUANT_ENTRIES(act_quant_exact_bf16_tiles2, bfloat16, false, 2)
SVDQ_ACT_QUANT_ENTRIES(act_quant_pow2_bf16_tiles1, bfloat16, true, 1)
SVDQ_ACT_QUANT_ENTRIES(act_quant_pow2_bf16_tiles2, bfloat16, true, 2)
SVDQ_ACT_QUANT_ENTRIES(act_quant_exact_fp16_tiles1, float16, false, 1)
SVDQ_ACT_QUANT_ENTRIES(act_quant_exact_fp16_tiles2, float16, false, 2)
SVDQ_ACT_QUANT_ENTRIES(act_quant_pow2_fp16_tiles1, float16, true, 1)
SVDQ_ACT_QUANT_ENTRIES(act_quant_pow2_fp16_tiles2, float16, true, 2)
