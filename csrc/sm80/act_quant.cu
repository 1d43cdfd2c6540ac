// Kernel 1 of the sm80 family: SVDQuant activation quantization fused with the low-rank down
// projection (any sm_80 or newer GPU; mma.sync, cp.async, ldmatrix).
//
// One read of x [M, K] (16-bit) from device memory feeds every output:
//   codes    [M, K/2]     INT4 codes packed two per byte in the natural layout of numerics.pack_int4
//                         (low nibble = even column; two's complement in signed groups, 0..15 in
//                         unsigned ones): the layout kernel 2 (w4a4_gemm.cu) reads;
//   ascales  [K/64, m_al] fp32 per-(token, group) scales, token-contiguous per group (kernel 2 loads
//                         one group's scales of 128 tokens with 16-byte copies); m_al = M rounded up
//                         to a multiple of 4, rows M..m_al-1 are not written (kernel 2 never stores
//                         the outputs of those tokens);
//   lora_act [M, rank]    x @ lora_down, fp32 accumulation (mma.sync m16n8k16), stored in x's dtype.
//
// With `norm` (numerics.modulated_layer_norm, docs/DESIGN.md#producer-quantization) x holds a LayerNorm's
// input h and kernel 1 quantizes x = dtype(fma(dtype((h - mean) * rstd), mult, add)) (mult, add [B, K] per
// batch of mod_rows tokens; none: x = the LayerNorm alone): the norm prologue below computes each token's
// statistics before pass 1 and rewrites every x tile that lands in the ring in place, so that everything
// after it reads x as if it had come from memory. With `norm_out` it also stores x [M, K] there (the low-rank
// input of ranks above kernels.KERNEL1_MAX_RANK, which the host computes with cuBLAS).
// x may also be the concatenation of two 16-bit tensors along K (FLUX's single blocks: the attention output and
// linear1's GELU columns, docs/DESIGN.md#producer-quantization): each group's tile is copied from the tensor that
// holds its columns, where it lies (rows may be strided), so the concatenation is never written.
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
//          the scale written for the group is atok * 2^-e (exact in fp32), so kernel 2 takes both
//          modes' scales alike;
//   codes clamped to [-8, 7] or [0, 15]; 0 where the scale is 0.
// Pow2 mode with s8 operands (act_quant_pow2_s8_*, for w4a4_gemm_pow2.cu, the whole-K INT8 kernel 2):
//   the same codes, written as the s8 bytes code * 2^(3 - e) ([-64, 56] signed, [0, 120] unsigned)
//   into codes [M, K], and one scale per token, atok, into ascales [1, m_al] (the 2^-e is in the
//   bytes). Inside each 32-column half c of a group the bytes are in mma.sync k32 slot order:
//   byte 32 c + 4 q + j holds column 32 c + 8 q + 2 j, byte 32 c + 16 + 4 q + j column 32 c + 8 q +
//   2 j + 1 (q, j < 4): the even and odd codes of an octet, the order in which kernel 2 splits each
//   packed weight word into two s8 words, so a plain ldmatrix of 32 bytes is an A fragment.
// Divisions use a correctly rounded reciprocal and one Markstein correction step
// (q = n*r; q += (n - q*d)*r), which returns the correctly rounded quotient whenever the quotient
// is a normal number (the sm90 family's kernel 1 documents the checks); quotients outside
// [2^-100, 2^100] take __fdiv_rn, and so does need = amax / qmax where amax is outside that range.
// Codes are rounded by adding 1.5 * 2^23 to the clamped value (half to even, as rintf), whose low
// byte is then the code as a two's-complement byte.
//
// Work split: a CTA of 256 threads (8 warps, two halves of 4) owns 16 tokens and walks all of K two
// 64-groups at a time, half h quantizing the pair's group h; each group's x tile
// [16][64] (2 KB), lora_t tile [rank][64], 1/smooth, smooth and shift come in through a kStages-deep
// cp.async ring (one group per stage, loaded by the half that quantizes it; 16-byte chunks, chunk c of
// row r stored at chunk c ^ (r % 8), so that ldmatrix reads are conflict-free): no global load waits
// inside the loops. Two groups per step halve the dependent instruction chain a 16-token block waits
// on (bench/NOTES.md#sm80-k1-pass2-ring).
// Quantization: thread t of a half owns the octet of columns 8 (t % 8) .. +7 of token t / 8 (the
// chunk it copied itself); the 8 threads of a token take a group's amax by three shuffles. Pow2 mode
// runs two passes over x through the same ring, without a gap between them (the ring's positions
// 0 .. G-1 are pass 1's groups, pass 2's follow from the next even position): pass 1 keeps each
// thread's largest |v| of signed and of unsigned groups in two registers, which the two halves
// exchange once through shared memory and which give the token's largest need (a correctly rounded
// division is monotonic, so max_g amax_g / q = (max_g amax_g) / q for each q); pass 2 stages x,
// 1/smooth and the shift again, in reverse group order (the groups pass 1 read last are the likeliest
// still in L2), and writes the codes and scales.
// Rotation: the Hadamard one by sums and differences; any other (the *_coefficients entry points)
// reads its coefficients (3 KiB per pass) from device memory (L1-resident), so that shared memory
// and occupancy are those of the unrotated kernel.
// Low-rank, from the unrotated x tile: ranks 8 c .. 8 c + 7 on one warp (c = 0, 1, 2, 3 on warps 0,
// 4, 1, 5), both groups of each pair in K order (rank <= 32; the host computes larger ranks with one
// cuBLAS GEMM and runs this kernel with rank 0), mma.m16n8k16 with
// A = the x tile (ldmatrix.x4 from the ring) and B = lora_down in the layout lora_t [rank, K]
// (lora_down transposed, rank padded to a multiple of 16 with zero rows: kernel 2's rank step), also
// by ldmatrix from the ring (L2-resident: every CTA reads all of it).
// Each output is summed by one warp in K order, so lora_act is deterministic.
// Norm prologue: before the ring's first positions are issued, each thread reads its octets of its token from
// device memory (the groups its half quantizes, in reverse order, four loads in flight) and the statistics are
// numerics.modulated_layer_norm's: per group, float32 sums of h and of h*h (each product rounded), each octet
// summed in column order, then the 8 octets' sums by xor-shuffles 1, 2, 4 (((o0 + o1) + (o2 + o3)) + ((o4 + o5) +
// (o6 + o7)), numerics._group_sums; done as a reduce-scatter, so that each lane ends with one of 4 groups' 8
// sums); then the group sums totalled in float64 (exact, so in any order: each lane its share, shuffles over the
// token's lanes, the two halves through shared memory), one conversion and one float64 addition per lane and 4
// groups, so that GPUs with slow float64 (1/64 of fp32 on sm_86, sm_89, sm_120) run it at memory speed. Each
// token's mean and rstd are derived as numerics does (float64, each operation rounded, then float32) into shared
// memory. Every x tile is then rewritten where it lands, pass 1 and pass 2 alike: after advance's barrier each
// thread rewrites its own chunk (the one it copied and quantizes), with mult and add from the stage (the rows of
// the CTA's first and last batch, copied with the group; a token of any other batch, where mod_rows < 16, reads
// its own from device memory); in pass 1 with a low-rank branch a second barrier follows, since the low-rank mma
// reads every token's rows. Rows past M stay zero. norm_out: in pass 1 only (pow2 mode's pass 2 rewrites the same
// values again), each thread stores the chunk it rewrote, 16 bytes, the 8 threads of a token 128 contiguous ones.
//
// Entry points (one per dtype, mode and rotation path): act_quant_{exact,pow2,pow2_s8}_{bf16,fp16}
// and the same names + _coefficients (
//   const T* x [M, K] (rows ldx elements apart; with x2 its first 64 x2_group columns), const T* x2, int ldx2,
//   int x2_group (x's columns from 64 x2_group on: x2's from 0, rows ldx2 apart; one tensor: x2 = x, x2_group =
//   K / 64; never with norm), const float* smooth [K], const float* inv_smooth [K] (1/smooth, correctly
//   rounded), const float* group_shift [K/64] or null (one shift per group, kernels.group_shifts),
//   int rotation_passes (0: no rotation; the Hadamard rotation is one pass), const float4*
//   rotation_coef [192 rotation_passes] (the *_coefficients entry points: the rotation's
//   coefficients in kernels.rotation_coefficients' layout, 16-byte aligned; the others rotate by the
//   Hadamard rotation and take null), const T* lora_t [rank, K] or null,
//   uint8_t* codes, float* ascales, T* lora_act [M, rank] or null, int M, int K, int rank, int m_al,
//   int norm (nonzero: the norm prologue, x being the LayerNorm's input), const T* mod_mult, const T* mod_add
//   ([B, K], or null: no modulation), int mod_rows (tokens per batch, M = B mod_rows), double eps,
//   T* norm_out ([M, K], 16-byte aligned, or null: with norm, where to store x as well));
//   grid (ceil(M / 16)), block 256, no dynamic shared memory.
//   Requires K % 64 == 0, rank % 16 == 0, rank <= 32. pow2_s8: codes is [M, K] bytes,
//   ascales [1, m_al].
#include "sm80.cuh"

namespace svdq::sm80 {
namespace {

constexpr int kTokens = 16;
constexpr int kHalfThreads = 128;  // a thread per octet of the CTA's 16 tokens x 64 columns
constexpr int kThreads = 2 * kHalfThreads;
constexpr int kStages = 6;  // even: a step reads a pair of positions
constexpr int kAhead = kStages - 2;  // positions in flight beyond the pair a step reads
// three CTAs per SM (M = 4608 on the H100's 132 SMs is 288 CTAs): 80 registers at most, where ptxas's own
// choice for 256 threads spilled sm_90's coefficient path
constexpr int kMinBlocks = 3;
// Stage layout (bytes): x [16][128] | lora_t [32 ranks][128] | 1/smooth [64] fp32 | smooth [64] fp32 | shift |
// norm: mult, add [2][64] 16-bit each (the CTA's first and last batch)
// (pow2 pass 2 stages x, 1/smooth, the shift, mult and add only, at the same offsets)
constexpr int kOffLora = kTokens * 128;
constexpr int kOffParams = kOffLora + 32 * 128;
constexpr int kOffMod = kOffParams + 512 + 128;
constexpr int kStageBytes = kOffMod + 512;
constexpr int kPow2MaxExp = 3;  // numerics.POW2_ACT_MAX_EXP
constexpr float kRoundingBias = 0x1.8p23f;  // v + 1.5 * 2^23 rounds v (|v| < 2^22) to an integer, half to even

// Byte offset of 16-byte chunk `chunk` of row `row` in a [16][128-byte] x tile (see the file comment).
__device__ __forceinline__ int tile_offset(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

// n / d rounded to nearest even, given inv = 1/d rounded to nearest: exact when the quotient is a
// normal number (see the file comment); callers check that.
__device__ __forceinline__ float div_fast(float n, float d, float inv) {
  const float q = __fmul_rn(n, inv);
  return __fmaf_rn(__fmaf_rn(-q, d, n), inv, q);
}

// IEEE division for the rare cases div_fast does not cover; out of line so that the fast path
// stays small.
__device__ __noinline__ float div_exact(float n, float d) { return n == 0.f ? 0.f : __fdiv_rn(n, d); }

// need = amax / qmax (amax >= 0, not NaN), correctly rounded: the quotient of an amax in
// [2^-100, 2^100] by 7 or 15 is normal.
__device__ __forceinline__ float group_need(float amax, bool uns) {
  const float qmax = uns ? 15.f : 7.f;
  return amax >= 0x1p-100f && amax <= 0x1p100f ? div_fast(amax, qmax, uns ? 1.f / 15.f : 1.f / 7.f)
                                               : div_exact(amax, qmax);
}

__device__ __forceinline__ void load8(float (&v)[8], const float* p) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

// The largest of the 8 lanes' values of a (token, group): they are consecutive lanes of one warp.
__device__ __forceinline__ float octet_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
}

__device__ __forceinline__ float exp2i(int e) { return __int_as_float((127 + e) << 23); }  // 2^e, |e| < 127

// v of an octet (its 16 bytes of x; 1/smooth and smooth of its 8 columns): exact mode
// v = (x + shift) / smooth, dividing exactly where a quotient is zero, tiny or huge; pow2 mode
// v = (x + shift) * (1 / smooth). Unsigned groups (shift > 0) clamp v at 0; signed ones are rotated
// where passes > 0 (rotate_octet<kCoefficients>, coef: its coefficients; t8: the octet in its group).
// Returns max |v| (0 if every v is NaN). Every lane of the warp calls it together (the rotation's
// shuffles).
template <typename T, bool kPow2, bool kCoefficients>
__device__ __forceinline__ float octet_values(uint4 raw, const float* smooth, const float* inv_smooth, float shift,
                                              int passes, const float4* coef, int t8, float (&v)[8]) {
  float n[8], inv[8];
  unpack8<T>(raw, n);
  if (shift != 0.f) {
#pragma unroll
    for (int e = 0; e < 8; ++e) n[e] = __fadd_rn(n[e], shift);
  }
  load8(inv, inv_smooth);
  if constexpr (kPow2) {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = __fmul_rn(n[e], inv[e]);
  } else {
    float sm[8], lo = __int_as_float(0x7F800000), hi = 0.f;
    load8(sm, smooth);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      v[e] = div_fast(n[e], sm[e], inv[e]);
      // a zero numerator's quotient is right up to its sign, which no code or amax sees
      lo = fminf(lo, n[e] != 0.f ? fabsf(v[e]) : 1.f);
      hi = fmaxf(hi, fabsf(v[e]));
    }
    if (!(lo >= 0x1p-100f && hi <= 0x1p100f)) {  // a tiny or huge quotient
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = div_exact(n[e], sm[e]);
    }
  }
  if (shift > 0.f) {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = fmaxf(v[e], 0.f);
  } else if (passes > 0) {  // warp-uniform: a warp covers one group
    rotate_octet<kCoefficients>(v, coef, passes, t8);
  }
  // a tree, not a chain: fmaxf drops NaN operands either way
  const float m01 = fmaxf(fabsf(v[0]), fabsf(v[1])), m23 = fmaxf(fabsf(v[2]), fabsf(v[3]));
  const float m45 = fmaxf(fabsf(v[4]), fabsf(v[5])), m67 = fmaxf(fabsf(v[6]), fabsf(v[7]));
  return fmaxf(fmaxf(fmaxf(m01, m23), fmaxf(m45, m67)), 0.f);
}

// c clamped to the group's code range [qlo, qhi] and rounded to an integer k, half to even (as
// rintf; rounding and clamping to integer bounds commute, NaN clamps to qlo): a float whose low byte
// is k as a two's-complement byte.
__device__ __forceinline__ uint32_t code_bits(float c, float qlo, float qhi) {
  return __float_as_uint(__fadd_rn(fminf(fmaxf(c, qlo), qhi), kRoundingBias));
}

// The low bytes of the even (e = 0) or odd (e = 1) elements of b: b[e], b[e + 2], b[e + 4], b[e + 6].
__device__ __forceinline__ uint32_t gather_bytes(const uint32_t (&b)[8], int e) {
  return __byte_perm(__byte_perm(b[e], b[e + 2], 0x0040), __byte_perm(b[e + 4], b[e + 6], 0x0040), 0x5410);
}

// Eight values' codes (code_bits) packed as numerics.pack_int4.
__device__ __forceinline__ uint32_t pack_codes(const float (&c)[8], bool uns) {
  const float qlo = uns ? 0.f : -8.f, qhi = uns ? 15.f : 7.f;
  uint32_t b[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) b[e] = code_bits(c[e], qlo, qhi);
  // byte j: even element's low nibble | odd element's low nibble << 4
  return (gather_bytes(b, 0) & 0x0F0F0F0Fu) | ((gather_bytes(b, 1) << 4) & 0xF0F0F0F0u);
}

// Exact mode: v / scale for an octet, as the reference computes it before rounding (0 for a zero scale).
__device__ __forceinline__ void octet_quotients(const float (&v)[8], float scale, float (&c)[8]) {
  if (scale >= 0x1p-100f && scale <= 0x1p100f) {
    // |v| <= amax and scale ~ amax / qmax: the quotient is at most ~qmax * 2^10 (fp16 subnormal
    // scales), and one too small to be normal rounds to code 0 either way
    const float inv_scale = __frcp_rn(scale);
#pragma unroll
    for (int e = 0; e < 8; ++e) c[e] = div_fast(v[e], scale, inv_scale);
  } else if (scale > 0.f) {
#pragma unroll
    for (int e = 0; e < 8; ++e) c[e] = div_exact(v[e], scale);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) c[e] = 0.f;
  }
}

// Eight values' codes (code_bits) as the s8 bytes code * 2^shift: the even columns' bytes in lo, the
// odd ones' in hi (the file comment's slot order).
__device__ __forceinline__ void pack_s8(const float (&c)[8], bool uns, int shift, uint32_t& lo, uint32_t& hi) {
  const float qlo = uns ? 0.f : -8.f, qhi = uns ? 15.f : 7.f;
  uint32_t b[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) b[e] = code_bits(c[e], qlo, qhi);
  // shifting the packed word moves each byte's top bits into the next byte's low `shift` bits: masked off
  const uint32_t keep = ~(((1u << shift) - 1u) * 0x01010101u);
  lo = (gather_bytes(b, 0) << shift) & keep;
  hi = (gather_bytes(b, 1) << shift) & keep;
}

template <typename T, bool kPow2, bool kS8, bool kCoefficients>
__device__ __forceinline__ void act_quant(const T* __restrict__ x, int ldx, const T* __restrict__ x2, int ldx2,
                                          int x2_group, const float* __restrict__ smooth,
                                          const float* __restrict__ inv_smooth, const float* __restrict__ group_shift,
                                          int rotation_passes, const float4* __restrict__ rotation_coef,
                                          const T* __restrict__ lora_t,
                                          uint8_t* __restrict__ codes, float* __restrict__ ascales,
                                          T* __restrict__ lora_act, int M, int K, int rank, int m_al, bool norm,
                                          const T* __restrict__ mod_mult, const T* __restrict__ mod_add, int mod_rows,
                                          double eps, T* __restrict__ norm_out) {
  __shared__ __align__(128) uint8_t ring[kStages * kStageBytes];
  __shared__ float2 half_amax[2][kHalfThreads];  // pow2: each thread's largest |v| (signed, unsigned groups) of pass 1
  __shared__ double2 half_stats[2][kTokens];     // norm: each half's (sum h, sum h^2) of each token
  __shared__ float2 token_norm[kTokens];         // norm: each token's float32 mean and rstd
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int half = tid / kHalfThreads, t = tid % kHalfThreads;
  const int tok0 = blockIdx.x * kTokens;
  const int groups = K / 64;
  const int row = t / 8, t8 = t % 8;  // this thread's octet: token row, columns 8 t8 .. +7 of a group
  const int tok = tok0 + row;
  const bool tok_valid = tok < M;
  const size_t row_at = tok_valid ? tok : 0;
  const uint8_t* x_row = reinterpret_cast<const uint8_t*>(x) + row_at * ldx * 2;
  const int my_chunk = tile_offset(row, t8);
  // Ring positions: 0 .. G-1 pass 1's groups; pow2 mode: pass 2 from the even position pass2_start on (a
  // position between them, where G is odd, holds nothing), its groups in reverse order
  const int pass2_start = kPow2 ? (groups + 1) / 2 * 2 : groups;
  const int positions = kPow2 ? pass2_start + groups : groups;

  const uint8_t* x_src = x_row + t8 * 16;  // this thread's chunk of group 0
  // groups x2_group .. G-1: this thread's chunk of group x2_group, in x2 (one piece: x2_group = G)
  const uint8_t* x2_src = reinterpret_cast<const uint8_t*>(x2) + row_at * ldx2 * 2 + t8 * 16;
  // this thread's chunks of a lora_t tile: c = t + 128 j (j = 0, 1) of [32 ranks][8], where the rank c / 8 < rank
  const uint8_t* lora_src[2];
  int lora_dst[2];
  bool lora_copy[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int c = t + kHalfThreads * j, r = c / 8, ch = c % 8;
    lora_copy[j] = r < rank;
    lora_src[j] = lora_copy[j] ? reinterpret_cast<const uint8_t*>(lora_t + static_cast<size_t>(r) * K) + ch * 16 : nullptr;
    lora_dst[j] = kOffLora + tile_offset(r, ch);
  }
  // norm with modulation: threads t 64..95 copy the stage's mult and add rows, chunk t - 64 of [mult, add][first,
  // last batch][8 chunks]; mod_src: the thread's chunk of group 0. A token of the first or last batch reads its
  // octets at mod_at of a stage, any other (mod_rows < 16) from device memory (mod_at -1).
  const T* mod_src = nullptr;
  int mod_at = -1;
  if (norm && mod_mult) {
    const int first_batch = tok0 / mod_rows, last_batch = (min(tok0 + kTokens, M) - 1) / mod_rows;
    if (t >= 64 && t < 96) {
      const int c = t - 64;
      mod_src = (c < 16 ? mod_mult : mod_add) + static_cast<size_t>(c / 8 % 2 ? last_batch : first_batch) * K +
                8 * (c % 8);
    }
    const int batch = tok / mod_rows;
    if (tok_valid && (batch == first_batch || batch == last_batch))
      mod_at = kOffMod + (batch == first_batch ? 0 : 128) + 16 * t8;
  }

  // Ring position q into stage `stage`, by the half that quantizes it: x tile (thread t: its own chunk),
  // lora_t tile (pass 1), 1/smooth and smooth (threads t 0..15, 16..31; smooth in exact mode only), the
  // group's shift (thread t 32), mult and add (threads t 64..95, norm with modulation).
  auto load_position = [&](int q, int stage) {
    if (q < groups || (q >= pass2_start && q < positions)) {
      const bool pass1 = q < groups;
      const int g = pass1 ? q : positions - 1 - q;
      uint8_t* st = ring + stage * kStageBytes;
      cp_async16(st + my_chunk, g < x2_group ? x_src + g * 128 : x2_src + (g - x2_group) * 128, tok_valid);
      if (pass1) {
#pragma unroll
        for (int j = 0; j < 2; ++j)
          if (lora_copy[j]) cp_async16(st + lora_dst[j], lora_src[j] + g * 128, true);
      }
      if (t < 16) {
        cp_async16(st + kOffParams + 16 * t, inv_smooth + 64 * g + 4 * t, true);
      } else if (t < 32) {
        if (!kPow2) cp_async16(st + kOffParams + 256 + 16 * (t - 16), smooth + 64 * g + 4 * (t - 16), true);
      } else if (t == 32 && group_shift) {
        cp_async4(st + kOffParams + 512, group_shift + g);
      }
      if (mod_src) cp_async16(st + kOffMod + 16 * (t - 64), mod_src + 64 * g, true);
    }
    cp_async_commit();
  };

  // The norm prologue's statistics (see the file comment), before the ring's first positions are issued (issued
  // first, they made ptxas spill the coefficient paths' main loop on sm_90)
  if (norm) {
    // this thread's share of its token's float64 totals: sum h (t8 even) or sum h^2 (t8 odd) over groups
    double total = 0.0;
    // this half's groups (those of its parity) from the last down, like pass 2: the ring's first positions then
    // stage the groups read last, the likeliest still in L2. Every lane runs the loop (the shuffles); rows past M
    // sum zeros.
    const int last = groups - 1 - (groups - 1 + half) % 2;  // -1 where the half has none
    for (int i = half; i < groups; i += 8) {  // 4 of the half's groups, the i-th last and the 3 before it
      uint4 raw[4];
#pragma unroll
      for (int j = 0; j < 4; ++j)
        raw[j] = tok_valid && i + 2 * j < groups
                     ? __ldg(reinterpret_cast<const uint4*>(x_src + (last - (i - half + 2 * j)) * 128))
                     : make_uint4(0u, 0u, 0u, 0u);
      // Each group's sums of h and of h^2 over its 8 octets, numerics._group_sums' tree ((o0 + o1) + (o2 + o3)) +
      // ((o4 + o5) + (o6 + o7)) as a reduce-scatter over the octet's lanes: at distance d a lane keeps half of
      // its values (the half its bit d selects) and adds the partner's copy of that half, so that every addition
      // is the tree's (commuted: the same bits) and each lane ends with one of the 8 finished sums, converted and
      // added in float64 once. Distance 1 group by group: the sum of h to the even lane, of h^2 to the odd one
      // (part[j]: the octet pair's sum for group j); then distances 2 and 4 across the 4 groups.
      float part[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float h[8];
        unpack8<T>(raw[j], h);
        float sum = h[0], squares = __fmul_rn(h[0], h[0]);  // the octet's, in column order
#pragma unroll
        for (int e = 1; e < 8; ++e) {
          sum = __fadd_rn(sum, h[e]);
          squares = __fadd_rn(squares, __fmul_rn(h[e], h[e]));
        }
        const bool odd = t8 & 1;
        part[j] = __fadd_rn(odd ? squares : sum, __shfl_xor_sync(0xffffffffu, odd ? sum : squares, 1));
      }
#pragma unroll
      for (int d = 2, n = 2; d < 8; d <<= 1, n >>= 1) {
        const bool upper = t8 & d;
#pragma unroll
        for (int v = 0; v < n; ++v) {
          const float keep = upper ? part[v + n] : part[v], send = upper ? part[v] : part[v + n];
          part[v] = __fadd_rn(keep, __shfl_xor_sync(0xffffffffu, send, d));
        }
      }
      total = __dadd_rn(total, static_cast<double>(part[0]));  // exact
    }
    // the 4 lanes of each parity hold the 4 groups' shares: their totals (exact, so in any order)
    total = __dadd_rn(total, __shfl_xor_sync(0xffffffffu, total, 2));
    total = __dadd_rn(total, __shfl_xor_sync(0xffffffffu, total, 4));
    if (t8 < 2) reinterpret_cast<double*>(&half_stats[half][row])[t8] = total;
    __syncthreads();
    const double2 a = half_stats[0][row], b = half_stats[1][row];
    // in shared memory rather than registers, which the coefficient paths have none to spare of
    if (half == 0 && t8 == 0) token_norm[row] = layer_norm_stats(__dadd_rn(a.x, b.x), __dadd_rn(a.y, b.y), K, eps);
  }

  // a pair of positions p, p + 1 (p even) per step, half h quantizing p + h; position q in stage q % kStages
#pragma unroll
  for (int q = half; q < kAhead; q += 2) load_position(q, q);
  int stage = 0;  // the stage of the pair's first position
  auto advance = [&](int p) {
    cp_async_wait<kAhead / 2 - 1>();  // this thread's copies of position p + half
    __syncthreads();
    // position p + kAhead + half into the stage of p - 2 + half, which the previous step read
    load_position(p + kAhead + half, (stage == 0 ? kStages : stage) - 2 + half);
    uint8_t* tile = ring + stage * kStageBytes;
    stage = stage + 2 == kStages ? 0 : stage + 2;
    return tile;
  };

  // norm: this thread's chunk of stage st (group g) rewritten from h to x; returns the chunk
  auto normalize = [&](uint8_t* st, int g) {
    uint4* chunk = reinterpret_cast<uint4*>(st + my_chunk);
    float v[8];
    unpack8<T>(*chunk, v);
    layer_norm_octet<T>(v, token_norm[row]);
    if (mod_mult) {
      uint4 mult_raw, add_raw;
      if (mod_at >= 0) {
        mult_raw = *reinterpret_cast<const uint4*>(st + mod_at);
        add_raw = *reinterpret_cast<const uint4*>(st + mod_at + 256);
      } else {
        const size_t col = static_cast<size_t>(tok / mod_rows) * K + 64 * g + 8 * t8;
        mult_raw = __ldg(reinterpret_cast<const uint4*>(mod_mult + col));
        add_raw = __ldg(reinterpret_cast<const uint4*>(mod_add + col));
      }
      modulate_octet<T>(v, mult_raw, add_raw);
    }
    const uint4 x_chunk = pack8<T>(v);
    *chunk = x_chunk;
    return x_chunk;
  };

  // the low-rank chains (ranks 8 c .. 8 c + 7, c < rank / 8) on warps 0, 4, 1, 5: one per half in each pair
  const int chain = 2 * (warp % 4) + warp / 4;
  const bool lora_warp = 8 * chain < rank;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  float amax_signed = 0.f, amax_unsigned = 0.f;  // pow2 mode: this thread's largest |v| so far
  // ldmatrix rows of the lane's B fragments: rank 8 chain + lane % 8, chunks 4 h + lane / 8 (h = 0, 1)
  const int b_off = kOffLora + tile_offset(8 * chain + lane % 8, lane / 8);
  const int b_off_hi = kOffLora + tile_offset(8 * chain + lane % 8, 4 + lane / 8);
  auto lora_group = [&](const uint8_t* tile) {
    uint32_t b[8];  // b0, b1 of the four k16 steps
    ldmatrix_x4(*reinterpret_cast<uint32_t(*)[4]>(b), tile + b_off);
    ldmatrix_x4(*reinterpret_cast<uint32_t(*)[4]>(b + 4), tile + b_off_hi);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {  // k16 steps of the group
      uint32_t a[4];
      ldmatrix_x4(a, tile + tile_offset(lane % 8 + 8 * ((lane / 8) % 2), 2 * kk + lane / 16));
      mma_m16n8k16<T>(acc, a, b[2 * kk], b[2 * kk + 1]);
    }
  };

  for (int p = 0; p < pass2_start; p += 2) {
    uint8_t* tile = advance(p);
    const int g = p + half;
    if (norm) {
      if (g < groups && tok_valid) {
        const uint4 x_chunk = normalize(tile + half * kStageBytes, g);
        // at x_src's offset from x (this thread's chunk of group 0 in an [M, K] tensor): from a pointer that is
        // live anyway, where tok * K cost sm_90's coefficient paths a spill
        if (norm_out) {
          const ptrdiff_t at = x_src - reinterpret_cast<const uint8_t*>(x) + g * 128;
          *reinterpret_cast<uint4*>(reinterpret_cast<uint8_t*>(norm_out) + at) = x_chunk;
        }
      }
      if (rank) __syncthreads();  // the low-rank mma reads the rows other threads rewrote
    }
    if (g < groups) {  // this half's group
      const uint8_t* own = tile + half * kStageBytes;
      const float* params = reinterpret_cast<const float*>(own + kOffParams);
      const float shift = group_shift ? params[128] : 0.f;
      const bool uns = shift > 0.f;
      float v[8];
      const float hi = octet_values<T, kPow2, kCoefficients>(*reinterpret_cast<const uint4*>(own + my_chunk),
                                                             params + 64 + 8 * t8, params + 8 * t8, shift,
                                                             rotation_passes, rotation_coef, t8, v);
      if constexpr (kPow2) {
        if (uns)
          amax_unsigned = fmaxf(amax_unsigned, hi);
        else
          amax_signed = fmaxf(amax_signed, hi);
      } else {
        const float scale = round_to<T>(group_need(octet_max(hi), uns));
        float c[8];
        octet_quotients(v, scale, c);
        if (tok_valid) {
          *reinterpret_cast<uint32_t*>(codes + static_cast<size_t>(tok) * (K / 2) + 32 * g + 4 * t8) = pack_codes(c, uns);
          if (t8 == 0) ascales[static_cast<size_t>(g) * m_al + tok] = scale;
        }
      }
    }
    if (lora_warp) {  // both groups of the pair, in K order
      lora_group(tile);
      if (p + 1 < groups) lora_group(tile + kStageBytes);
    }
  }

  if (lora_warp) {  // acc: rows lane / 4 and lane / 4 + 8, ranks 8 chain + 2 (lane % 4) + {0, 1}
    const int r = 8 * chain + 2 * (lane % 4);
    const int t_lo = tok0 + lane / 4, t_hi = t_lo + 8;
    if (t_lo < M)
      *reinterpret_cast<uint32_t*>(lora_act + static_cast<size_t>(t_lo) * rank + r) = pack2_rn<T>(acc[0], acc[1]);
    if (t_hi < M)
      *reinterpret_cast<uint32_t*>(lora_act + static_cast<size_t>(t_hi) * rank + r) = pack2_rn<T>(acc[2], acc[3]);
  }

  if constexpr (kPow2) {  // pass 2: codes and scales from the token's atok
    half_amax[half][t] = make_float2(amax_signed, amax_unsigned);
    __syncthreads();
    const float2 other = half_amax[1 - half][t];  // both halves combine the same two values alike
    const float atok = round_to<T>(fmaxf(group_need(octet_max(fmaxf(amax_signed, other.x)), false),
                                         group_need(octet_max(fmaxf(amax_unsigned, other.y)), true)));
    const float inv_atok = atok >= 0x1p-100f ? __frcp_rn(atok) : 0.f;
    // rows past M compute on zeros and store nothing (the shuffles need every lane)
    for (int p = pass2_start; p < positions; p += 2) {
      uint8_t* tile = advance(p) + half * kStageBytes;
      const int q = p + half;
      if (q >= positions) continue;
      const int g = positions - 1 - q;
      if (norm && tok_valid) normalize(tile, g);
      const float* params = reinterpret_cast<const float*>(tile + kOffParams);
      const float shift = group_shift ? params[128] : 0.f;
      const bool uns = shift > 0.f;
      float v[8];
      const float need = group_need(
          octet_max(octet_values<T, true, kCoefficients>(*reinterpret_cast<const uint4*>(tile + my_chunk), nullptr,
                                                         params + 8 * t8, shift, rotation_passes, rotation_coef, t8,
                                                         v)),
          uns);
      int e = 0;
#pragma unroll
      for (int j = 1; j <= kPow2MaxExp; ++j) e = atok * exp2i(-j) >= need ? j : e;
      const float mult = inv_atok * exp2i(e);
      float c[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) c[j] = __fmul_rn(v[j], mult);
      if (!tok_valid) continue;
      if constexpr (kS8) {
        uint32_t lo, hi;
        pack_s8(c, uns, kPow2MaxExp - e, lo, hi);
        uint8_t* dst = codes + static_cast<size_t>(tok) * K + 64 * g + 32 * (t8 / 4) + 4 * (t8 % 4);
        *reinterpret_cast<uint32_t*>(dst) = lo;
        *reinterpret_cast<uint32_t*>(dst + 16) = hi;
      } else {
        *reinterpret_cast<uint32_t*>(codes + static_cast<size_t>(tok) * (K / 2) + 32 * g + 4 * t8) = pack_codes(c, uns);
        if (t8 == 0) ascales[static_cast<size_t>(g) * m_al + tok] = atok * exp2i(-e);
      }
    }
    if (kS8 && tok_valid && half == 0 && t8 == 0) ascales[tok] = atok;
  }
  cp_async_wait<0>();
}

}  // namespace
}  // namespace svdq::sm80

#define SVDQ_ACT_QUANT_ENTRY(NAME, T, POW2, S8, COEFFICIENTS)                                                       \
  extern "C" __global__ void __launch_bounds__(svdq::sm80::kThreads, svdq::sm80::kMinBlocks)                        \
      NAME(const T* x, int ldx, const T* x2, int ldx2, int x2_group, const float* smooth, const float* inv_smooth,  \
           const float* group_shift, int rotation_passes, const float4* rotation_coef, const T* lora_t,              \
           uint8_t* codes, float* ascales, T* lora_act, int M, int K, int rank, int m_al, int norm,                 \
           const void* mod_mult, const void* mod_add, int mod_rows, double eps, void* norm_out) {                   \
    svdq::sm80::act_quant<T, POW2, S8, COEFFICIENTS>(                                                               \
        x, ldx, x2, ldx2, x2_group, smooth, inv_smooth, group_shift, rotation_passes, rotation_coef, lora_t, codes,  \
        ascales, lora_act, M, K, rank, m_al, norm != 0, static_cast<const T*>(mod_mult),                            \
        static_cast<const T*>(mod_add), mod_rows, eps, static_cast<T*>(norm_out));                                   \
  }
#define SVDQ_ACT_QUANT_ENTRIES(NAME, T, POW2, S8)   \
  SVDQ_ACT_QUANT_ENTRY(NAME, T, POW2, S8, false) \
  SVDQ_ACT_QUANT_ENTRY(NAME##_coefficients, T, POW2, S8, true)

SVDQ_ACT_QUANT_ENTRIES(act_quant_exact_bf16, svdq::bfloat16, false, false)
SVDQ_ACT_QUANT_ENTRIES(act_quant_exact_fp16, svdq::float16, false, false)
SVDQ_ACT_QUANT_ENTRIES(act_quant_pow2_bf16, svdq::bfloat16, true, false)
SVDQ_ACT_QUANT_ENTRIES(act_quant_pow2_fp16, svdq::float16, true, false)
SVDQ_ACT_QUANT_ENTRIES(act_quant_pow2_s8_bf16, svdq::bfloat16, true, true)
SVDQ_ACT_QUANT_ENTRIES(act_quant_pow2_s8_fp16, svdq::float16, true, true)
