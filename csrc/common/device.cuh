// Device helpers every kernel family shares. Self-contained: NVRTC, which compiles the kernels at run
// time (svdquant/cuda.py), has no headers at all, so 16-bit float conversions are PTX `cvt` and the
// fixed-width integers are typedefs; under nvcc (setup.py's prebuilt cubins) the same names come
// from <cstdint>, so both compilers see identical types.
#pragma once

#ifdef __CUDACC_RTC__
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef unsigned long long uintptr_t;
#else
#include <cstdint>
#endif

namespace svdq {

// 16-bit floats as their bits, so that kernels template on the storage type without cuda_bf16.h /
// cuda_fp16.h. Both are 2 bytes, like __nv_bfloat16 and __half.
struct bfloat16 {
  uint16_t bits;
};
struct float16 {
  uint16_t bits;
};

__device__ __forceinline__ float to_float(bfloat16 v) { return __uint_as_float(static_cast<uint32_t>(v.bits) << 16); }
__device__ __forceinline__ float to_float(float16 v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
}

// round to nearest even, as torch's .to(bfloat16 / float16) does
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ bfloat16 from_float<bfloat16>(float v) {
  bfloat16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
  return r;
}
template <>
__device__ __forceinline__ float16 from_float<float16>(float v) {
  float16 r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
  return r;
}

// two floats rounded to a packed pair, lo in the low 16 bits (the first element in memory)
template <typename T>
__device__ __forceinline__ uint32_t pack2_rn(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2_rn<bfloat16>(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <>
__device__ __forceinline__ uint32_t pack2_rn<float16>(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// A generic address of shared memory as the 32-bit shared-window address PTX instructions take.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Facts about the two 16-bit element types the kernels take (bfloat16, float16).
template <typename T>
struct Half;

template <>
struct Half<bfloat16> {
  static constexpr bool kIsBF16 = true;
  static constexpr float kMinNormal = 0x1p-126f;
  // the two values of a packed pair (low half first): bf16 is the top half of a float
  static __device__ __forceinline__ void unpack2(uint32_t w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xFFFF0000u);
  }
};

template <>
struct Half<float16> {
  static constexpr bool kIsBF16 = false;
  static constexpr float kMinNormal = 0x1p-14f;
  static __device__ __forceinline__ void unpack2(uint32_t w, float& lo, float& hi) {
    lo = to_float(float16{static_cast<uint16_t>(w & 0xFFFFu)});
    hi = to_float(float16{static_cast<uint16_t>(w >> 16)});
  }
};

// the float nearest to v in T, as a float (round to nearest even, like torch's .to(T))
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// The 8 values of 16 bytes of T (an octet: 8 consecutive columns) as floats, and back (rounded to
// nearest even).
template <typename T>
__device__ __forceinline__ void unpack8(uint4 raw, float (&v)[8]) {
  Half<T>::unpack2(raw.x, v[0], v[1]);
  Half<T>::unpack2(raw.y, v[2], v[3]);
  Half<T>::unpack2(raw.z, v[4], v[5]);
  Half<T>::unpack2(raw.w, v[6], v[7]);
}
template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&v)[8]) {
  return make_uint4(pack2_rn<T>(v[0], v[1]), pack2_rn<T>(v[2], v[3]), pack2_rn<T>(v[4], v[5]), pack2_rn<T>(v[6], v[7]));
}

// numerics.modulated_layer_norm, the part every kernel-1 norm prologue shares (how each gathers a
// token's sums is its own). A token's mean and 1 / sqrt(var + eps) from its float64 totals of h and
// of h^2 over its K columns, each float64 operation rounded as the reference's, then rounded to float.
__device__ __forceinline__ float2 layer_norm_stats(double sum, double squares, int K, double eps) {
  const double mean = __ddiv_rn(sum, static_cast<double>(K));
  const double var = fmax(__dadd_rn(__ddiv_rn(squares, static_cast<double>(K)), -__dmul_rn(mean, mean)), 0.0);
  return make_float2(__double2float_rn(mean), __double2float_rn(__ddiv_rn(1.0, __dsqrt_rn(__dadd_rn(var, eps)))));
}
// One octet of h normalized with its token's (mean, rstd), each value rounded to T (the LayerNorm's
// output dtype); then, modulated, fma(x, mult, add) with the octet's modulation rows, rounded once.
template <typename T>
__device__ __forceinline__ void layer_norm_octet(float (&v)[8], float2 stats) {
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = round_to<T>(__fmul_rn(__fsub_rn(v[e], stats.x), stats.y));
}
template <typename T>
__device__ __forceinline__ void modulate_octet(float (&v)[8], uint4 mult_raw, uint4 add_raw) {
  float mult[8], add[8];
  unpack8<T>(mult_raw, mult);
  unpack8<T>(add_raw, add);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = __fmaf_rn(v[e], mult[e], add[e]);
}

// The group rotation (numerics.rotate_groups) of one octet, the layout of both families' kernel 1:
// 8 consecutive lanes own one (token, 64-group), lane t8 (= lane % 8) holding natural columns
// 8 t8 .. 8 t8 + 7 in v[0..7]. Stage s (strides 1, 2, 4, 8, 16, 32) sets column i to
// fl(fl(rot[s][i][0] * v[i]) + fl(rot[s][i][1] * v[i ^ 2^s])) with separately rounded products and
// sum (never an FMA of two inexact terms, which would round once and differ from the reference):
// strides 1, 2, 4 pair registers of the octet, strides 8, 16, 32 pair this lane with lane ^ 1, 2, 4,
// which computes its own columns from the same two values (fp addition commutes, so both sides
// match the reference). Every lane of the warp must call it together (full-mask shuffles), with
// v's of signed groups only; the caller keeps that warp-uniform (a warp covers one group).
// A rotation of several passes runs stage n with stride 2^(n mod 6).
// The host decides once per layer how kernel 1 rotates (kernels.kernel1_rotation): not at all, the
// Hadamard rotation (rotate_octet_hadamard, one pass) or any other by its coefficients
// (rotate_octet_coefficients, any number of passes, in separate entry points: see rotate_octet).
constexpr int kRotationStages = 6;  // numerics.ROTATION_STAGES

// numerics.hadamard_rotation(), whose coefficients are +-1 in stages 0-4 (low side, bit s of i clear:
// (+1, +1); high side: (-1, +1)) and +-1/8 in stage 5: the products by +-1 are exact, so stages 0-4
// are one rounded sum or difference per value (the high side's fl(-v[i] + v[j]) as a fused
// multiply-add by -1, exact in the product); stage 5 keeps both products by 1/8, which round for
// subnormal results. Bit for bit rotate_octet_coefficients on the same rotation.
__device__ __forceinline__ void rotate_octet_hadamard(float (&v)[8], int t8) {
#pragma unroll
  for (int s = 0; s < 3; ++s) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (e >> s & 1) continue;
      const float lo = v[e], hi = v[e | 1 << s];
      v[e] = __fadd_rn(lo, hi);
      v[e | 1 << s] = __fsub_rn(lo, hi);
    }
  }
#pragma unroll
  for (int s = 3; s < kRotationStages - 1; ++s) {
    const float own = t8 >> (s - 3) & 1 ? -1.f : 1.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = __fmaf_rn(own, v[e], __shfl_xor_sync(0xffffffffu, v[e], 1 << (s - 3)));
  }
  const float own = t8 & 4 ? -0.125f : 0.125f;
#pragma unroll
  for (int e = 0; e < 8; ++e)
    v[e] = __fadd_rn(__fmul_rn(own, v[e]), __fmul_rn(0.125f, __shfl_xor_sync(0xffffffffu, v[e], 4)));
}

// Any rotation, by its coefficients coef (kernels.rotation_coefficients' layout, in device memory):
// 192 float4 per pass, pass p's float4 (4 s + j) * 8 + t8 holding rot[6 p + s][8 t8 + 2 j][0..1],
// rot[6 p + s][8 t8 + 2 j + 1][0..1], so that for each (s, j) the 8 lanes of a token read 128
// consecutive bytes and the warp's other tokens the same ones: 3 KiB per pass that every CTA reads,
// L1-resident after the first group. The passes are a runtime loop around the unrolled stages
// (registers indexed at compile time only).
__device__ __forceinline__ void rotate_octet_coefficients(float (&v)[8], const float4* __restrict__ coef, int passes,
                                                          int t8) {
#pragma unroll 1
  for (int pass = 0; pass < passes; ++pass, coef += kRotationStages * 32) {
#pragma unroll
    for (int s = 0; s < kRotationStages; ++s) {
      float p[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) p[e] = s < 3 ? v[e ^ (1 << s)] : __shfl_xor_sync(0xffffffffu, v[e], 1 << (s - 3));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float4 c = __ldg(coef + (4 * s + j) * 8 + t8);
        v[2 * j] = __fadd_rn(__fmul_rn(c.x, v[2 * j]), __fmul_rn(c.y, p[2 * j]));
        v[2 * j + 1] = __fadd_rn(__fmul_rn(c.z, v[2 * j + 1]), __fmul_rn(c.w, p[2 * j + 1]));
      }
    }
  }
}

// The rotation of one octet of a signed group: by its coefficients coef (passes >= 1 of them) in
// kernel 1's entry points for kernels.ROTATION_COEFFICIENTS (kCoefficients), the Hadamard one (one
// pass) in the others. Separate entry points, because the coefficient path's registers (its loads
// in flight) would otherwise set every launch's occupancy.
template <bool kCoefficients>
__device__ __forceinline__ void rotate_octet(float (&v)[8], const float4* coef, int passes, int t8) {
  if constexpr (kCoefficients)
    rotate_octet_coefficients(v, coef, passes, t8);
  else
    rotate_octet_hadamard(v, t8);
}

// A CUtensorMap as a kernel parameter (`const __grid_constant__ svdq::TensorMap`), encoded on the
// host by svdquant.cuda.tensor_map. Aligned to 128 bytes like CUDA 13's CUtensorMap, so that the
// descriptors sit in parameter space where cuda.h puts them (bench/NOTES.md#sm90-nvrtc).
struct alignas(128) TensorMap {
  unsigned long long opaque[16];
};

}  // namespace svdq
