// Python bindings of the svdquant._C extension.
//
// Always built: build_info() (what this build contains). Kernel entry points are compiled
// and registered only for the architectures the build targets (setup.py defines SVDQ_WITH_CUDA
// when it compiles the sm_80+ kernels in csrc/generic/, SVDQ_WITH_SM90A for the Hopper family in
// csrc/sm90/).
#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <vector>

#ifdef SVDQ_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "generic/launchers.h"
#endif
#ifdef SVDQ_WITH_SM90A
#include "sm90/launchers.h"
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["archs"] = std::string(SVDQ_BUILD_ARCHS);
  std::vector<std::string> kernels;
#ifdef SVDQ_WITH_CUDA
  kernels.push_back("w4a16_gemv");
  kernels.push_back("w4a16_dequant");
#endif
#ifdef SVDQ_WITH_SM90A
  kernels.push_back("act_quant_sm90");
  kernels.push_back("w4a4_gemm_sm90");
  kernels.push_back("w4a4_gemm_pow2_sm90");
#endif
  info["kernels"] = kernels;
  return info;
}

#ifdef SVDQ_WITH_CUDA
// Error messages are assembled as std::string, numbers through std::to_string: formatting a number
// with an iostream inside this extension crashed the process (segfault) instead of raising, on the
// H100 machine (g++ 13.3, torch 2.11). So no number, shape or device goes through c10::str here.
std::string num(int64_t v) { return std::to_string(v); }

std::string shape_str(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + num(shape[i]);
  return out + "]";
}

void check_half(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              std::string(name) + " must be bfloat16 or float16, got " + c10::toString(t.scalar_type()));
}

void check_tensor(const at::Tensor& t, const at::Tensor& like, const char* name, at::ScalarType dtype,
                  std::vector<int64_t> shape) {
  TORCH_CHECK(t.device() == like.device(),
              std::string(name) + " must be on " + like.device().str() + ", not " + t.device().str());
  TORCH_CHECK(t.scalar_type() == dtype,
              std::string(name) + " must be " + c10::toString(dtype) + ", got " + c10::toString(t.scalar_type()));
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape),
              std::string(name) + " must have shape " + shape_str(shape) + ", got " + shape_str(t.sizes()));
  TORCH_CHECK(t.is_contiguous(), std::string(name) + " must be contiguous");
}

// W4A16 GEMV: y [M, N] = x [M, K] @ W^T + bias for M <= 8, W[n, k] = code * wscales[g, n] + wzeros[g, n].
at::Tensor w4a16_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& wscales,
                      const at::Tensor& wzeros, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && qweight.dim() == 2, "x must be a 2-D CUDA tensor, qweight 2-D");
  check_half(x, "x");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(K % 64 == 0, "the input width " + num(K) + " is not a multiple of 64");
  TORCH_CHECK(M >= 1 && M <= svdq::generic::kMaxGemvRows,
              "w4a16_gemv takes 1 to " + num(svdq::generic::kMaxGemvRows) + " rows, got " + num(M));
  check_tensor(x, x, "x", x.scalar_type(), {M, K});
  check_tensor(qweight, x, "qweight", at::kByte, {N, K / 2});
  check_tensor(wscales, x, "wscales", x.scalar_type(), {K / 64, N});
  check_tensor(wzeros, x, "wzeros", x.scalar_type(), {K / 64, N});
  if (bias) check_tensor(*bias, x, "bias", x.scalar_type(), {N});
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({M, N}, x.options());
  svdq::generic::W4A16GemvArgs a{};
  a.bf16 = x.scalar_type() == at::kBFloat16;
  a.x = x.data_ptr();
  a.qweight = qweight.data_ptr<uint8_t>();
  a.wscales = wscales.data_ptr();
  a.wzeros = wzeros.data_ptr();
  a.bias = bias ? bias->data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.M = static_cast<int>(M), a.N = static_cast<int>(N), a.K = static_cast<int>(K);
  const char* err = svdq::generic::w4a16_gemv(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
  return y;
}

// W4A16 dequantization into out [N, K] (bf16, fp16 or fp32) from the natural 4-bit tensors.
at::Tensor w4a16_dequant(const at::Tensor& qweight, const at::Tensor& wscales, const at::Tensor& wzeros,
                         const at::Tensor& out) {
  TORCH_CHECK(qweight.is_cuda() && qweight.dim() == 2, "qweight must be a 2-D CUDA tensor");
  check_half(wscales, "wscales");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  TORCH_CHECK(K % 64 == 0, "the input width " + num(K) + " is not a multiple of 64");
  const auto out_dtype = out.scalar_type();
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf || out_dtype == at::kFloat,
              "out must be bfloat16, float16 or float32");
  check_tensor(qweight, qweight, "qweight", at::kByte, {N, K / 2});
  check_tensor(wscales, qweight, "wscales", wscales.scalar_type(), {K / 64, N});
  check_tensor(wzeros, qweight, "wzeros", wscales.scalar_type(), {K / 64, N});
  check_tensor(out, qweight, "out", out_dtype, {N, K});
  const c10::cuda::CUDAGuard guard(qweight.device());
  if (N == 0) return out;
  svdq::generic::W4A16DequantArgs a{};
  a.bf16_scales = wscales.scalar_type() == at::kBFloat16;
  a.out = out_dtype == at::kBFloat16 ? svdq::generic::OutType::kBF16
          : out_dtype == at::kHalf   ? svdq::generic::OutType::kF16
                                     : svdq::generic::OutType::kF32;
  a.qweight = qweight.data_ptr<uint8_t>();
  a.wscales = wscales.data_ptr();
  a.wzeros = wzeros.data_ptr();
  a.w = out.data_ptr();
  a.N = static_cast<int>(N), a.K = static_cast<int>(K);
  const char* err = svdq::generic::w4a16_dequant(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
  return out;
}
#endif

#ifdef SVDQ_WITH_SM90A
namespace sm90 = svdq::sm90;

sm90::DType half_dtype(const at::Tensor& t, const char* name) {
  check_half(t, name);
  return t.scalar_type() == at::kBFloat16 ? sm90::DType::kBF16 : sm90::DType::kF16;
}

// Kernel 1: x [M, K] -> (codes uint8 [M, K], ascales fp32, lora_act [M, rank]); ascales is
// [K/64, round_up(M, 4)] (per group), or [1, round_up(M, 4)] (per token) when pow2. lora_down_p is
// lora_down [K, rank] repacked by kernels.lora_down_sm90: [rank, K]; shift: one fp32 value per
// 64-group (kernels.group_shifts). int8_operands (pow2 only): codes for the fast kernel 2 (s8 bytes)
// instead of e4m3 bytes.
std::vector<at::Tensor> act_quant_sm90(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& inv_smooth,
                                       const c10::optional<at::Tensor>& shift, const at::Tensor& lora_down_p,
                                       bool pow2, bool int8_operands) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "x must be a 2-D CUDA tensor");
  const auto dtype = half_dtype(x, "x");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 64 == 0, "the input width " + num(K) + " is not a multiple of 64");
  TORCH_CHECK(lora_down_p.dim() == 2, "lora_down_p must be 2-D");
  TORCH_CHECK(pow2 || !int8_operands, "int8_operands needs pow2");
  const int64_t rank = lora_down_p.size(0);
  check_tensor(x, x, "x", x.scalar_type(), {M, K});
  check_tensor(smooth, x, "smooth", at::kFloat, {K});
  check_tensor(inv_smooth, x, "inv_smooth", at::kFloat, {K});
  if (shift) check_tensor(*shift, x, "shift", at::kFloat, {K / 64});
  check_tensor(lora_down_p, x, "lora_down_p", x.scalar_type(), {rank, K});
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m_al = (M + 3) / 4 * 4;
  auto codes = at::empty({M, K}, x.options().dtype(at::kByte));
  auto ascales = at::empty({pow2 ? 1 : K / 64, m_al}, x.options().dtype(at::kFloat));
  auto lora_act = at::empty({M, rank}, x.options());
  if (M == 0) return {codes, ascales, lora_act};
  sm90::ActQuantArgs a{};
  a.dtype = dtype;
  a.pow2 = pow2;
  a.int8_operands = int8_operands;
  a.x = x.data_ptr();
  a.smooth = smooth.data_ptr<float>();
  a.inv_smooth = inv_smooth.data_ptr<float>();
  a.shift = shift ? shift->data_ptr<float>() : nullptr;
  a.lora_down = lora_down_p.data_ptr();
  a.codes = codes.data_ptr<uint8_t>();
  a.ascales = ascales.data_ptr<float>();
  a.lora_act = lora_act.data_ptr();
  a.M = static_cast<int>(M), a.K = static_cast<int>(K), a.rank = static_cast<int>(rank), a.m_al = static_cast<int>(m_al);
  const char* err = sm90::act_quant(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
  return {codes, ascales, lora_act};
}

// Kernel 2's gelu_from: output channels from it on pass through GELU (tanh approximation) in the
// epilogue; negative (or N and beyond) for none.
int gelu_channel(int64_t gelu_from, int64_t N) {
  return gelu_from < 0 || gelu_from >= N ? -1 : static_cast<int>(gelu_from);
}

// The checks both kernel-2 variants share (codes [M, K], lora_act [M, r], natural qweight [N, K/2],
// lora_up [N, r], bias [N]); returns the output y [M, N] (`out` where given).
at::Tensor checked_gemm_output(const at::Tensor& codes, const at::Tensor& lora_act, const at::Tensor& qweight,
                               const at::Tensor& lora_up, const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& out, at::ScalarType st) {
  const int64_t M = codes.size(0), K = codes.size(1), N = qweight.size(0), rank = lora_up.size(1);
  TORCH_CHECK(K % 64 == 0, "the input width " + num(K) + " is not a multiple of 64");
  TORCH_CHECK(N % 8 == 0, "the output width " + num(N) + " is not a multiple of 8");
  check_tensor(codes, codes, "codes", at::kByte, {M, K});
  check_tensor(lora_act, codes, "lora_act", st, {M, rank});
  check_tensor(qweight, codes, "qweight", at::kByte, {N, K / 2});
  check_tensor(lora_up, codes, "lora_up", st, {N, rank});
  if (bias) check_tensor(*bias, codes, "bias", st, {N});
  at::Tensor y = out ? *out : at::empty({M, N}, codes.options().dtype(st));
  check_tensor(y, codes, "out", st, {M, N});
  return y;
}

// Kernel 2: y [M, N] = W4A4 product of kernel 1's outputs with the natural-layout weights + low rank + bias,
// then GELU on the channels from gelu_from on (gelu_channel).
at::Tensor w4a4_gemm_sm90(const at::Tensor& codes, const at::Tensor& ascales, const at::Tensor& lora_act,
                          const at::Tensor& qweight, const at::Tensor& wscales, const at::Tensor& lora_up,
                          const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& out,
                          int64_t gelu_from) {
  TORCH_CHECK(codes.is_cuda() && codes.dim() == 2, "codes must be a 2-D CUDA tensor");
  TORCH_CHECK(qweight.dim() == 2 && lora_up.dim() == 2 && ascales.dim() == 2, "qweight, lora_up and ascales are 2-D");
  const auto dtype = half_dtype(wscales, "wscales");
  const auto st = wscales.scalar_type();
  const int64_t M = codes.size(0), K = codes.size(1), N = qweight.size(0), rank = lora_up.size(1);
  const int64_t m_al = (M + 3) / 4 * 4;
  at::Tensor y = checked_gemm_output(codes, lora_act, qweight, lora_up, bias, out, st);
  const int64_t ascale_rows = ascales.size(0);
  TORCH_CHECK(ascale_rows == K / 64 || ascale_rows == 1, "ascales must have K/64 rows (per group) or 1 (per token)");
  check_tensor(ascales, codes, "ascales", at::kFloat, {ascale_rows, m_al});
  check_tensor(wscales, codes, "wscales", st, {K / 64, N});
  const c10::cuda::CUDAGuard guard(codes.device());
  if (M == 0) return y;
  sm90::W4A4GemmArgs a{};
  a.dtype = dtype;
  a.codes = codes.data_ptr<uint8_t>();
  a.ascales = ascales.data_ptr<float>();
  a.lora_act = lora_act.data_ptr();
  a.qweight = qweight.data_ptr<uint8_t>();
  a.wscales = wscales.data_ptr();
  a.lora_up = lora_up.data_ptr();
  a.bias = bias ? bias->data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.M = static_cast<int>(M), a.N = static_cast<int>(N), a.K = static_cast<int>(K), a.rank = static_cast<int>(rank);
  a.m_al = static_cast<int>(m_al);
  a.ascale_rows = static_cast<int>(ascale_rows);
  a.gelu_from = gelu_channel(gelu_from, N);
  const char* err = sm90::w4a4_gemm(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
  return y;
}

// Fast kernel 2 (power-of-two weight scales, pow2-mode kernel 1 outputs): y [M, N]. tile_t, half_rows:
// the token tile and the count of trailing 256-token rows run as 128-token tiles (0 / -1: chosen).
at::Tensor w4a4_gemm_pow2_sm90(const at::Tensor& codes, const at::Tensor& atok, const at::Tensor& lora_act,
                               const at::Tensor& qweight, const at::Tensor& wexp, const at::Tensor& wbase,
                               const at::Tensor& lora_up, const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& out, int64_t tile_t, int64_t half_rows,
                               int64_t gelu_from) {
  TORCH_CHECK(codes.is_cuda() && codes.dim() == 2, "codes must be a 2-D CUDA tensor");
  TORCH_CHECK(qweight.dim() == 2 && lora_up.dim() == 2 && wexp.dim() == 2, "qweight, lora_up and wexp are 2-D");
  const auto dtype = half_dtype(lora_act, "lora_act");
  const auto st = lora_act.scalar_type();
  const int64_t M = codes.size(0), K = codes.size(1), N = qweight.size(0), rank = lora_up.size(1);
  const int64_t m_al = (M + 3) / 4 * 4, n_al = (N + 15) / 16 * 16;
  at::Tensor y = checked_gemm_output(codes, lora_act, qweight, lora_up, bias, out, st);
  check_tensor(atok, codes, "atok", at::kFloat, {1, m_al});
  check_tensor(wexp, codes, "wexp", at::kByte, {K / 64, n_al});
  check_tensor(wbase, codes, "wbase", at::kFloat, {N});
  const c10::cuda::CUDAGuard guard(codes.device());
  if (M == 0) return y;
  sm90::W4A4Pow2GemmArgs a{};
  a.dtype = dtype;
  a.codes = codes.data_ptr<uint8_t>();
  a.atok = atok.data_ptr<float>();
  a.lora_act = lora_act.data_ptr();
  a.qweight = qweight.data_ptr<uint8_t>();
  a.wexp = wexp.data_ptr<uint8_t>();
  a.wbase = wbase.data_ptr<float>();
  a.lora_up = lora_up.data_ptr();
  a.bias = bias ? bias->data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.M = static_cast<int>(M), a.N = static_cast<int>(N), a.K = static_cast<int>(K), a.rank = static_cast<int>(rank);
  a.m_al = static_cast<int>(m_al), a.n_al = static_cast<int>(n_al);
  a.tile_t = static_cast<int>(tile_t);
  a.half_rows = static_cast<int>(std::max<int64_t>(-1, std::min<int64_t>(half_rows, 1 << 20)));
  a.gelu_from = gelu_channel(gelu_from, N);
  const char* err = sm90::w4a4_gemm_pow2(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
  return y;
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "svdquant compiled kernels";
  m.def("build_info", &build_info, "architectures and kernels compiled into this build");
#ifdef SVDQ_WITH_CUDA
  m.def("w4a16_gemv", &w4a16_gemv, "W4A16 GEMV for up to 8 rows of x (sm_80+)", pybind11::arg("x"),
        pybind11::arg("qweight"), pybind11::arg("wscales"), pybind11::arg("wzeros"), pybind11::arg("bias"));
  m.def("w4a16_dequant", &w4a16_dequant, "W4A16 weight dequantization for a GEMM (sm_80+)", pybind11::arg("qweight"),
        pybind11::arg("wscales"), pybind11::arg("wzeros"), pybind11::arg("out"));
#endif
#ifdef SVDQ_WITH_SM90A
  m.def("act_quant_sm90", &act_quant_sm90, "kernel 1: activation quantize + low-rank down (sm_90a)",
        pybind11::arg("x"), pybind11::arg("smooth"), pybind11::arg("inv_smooth"), pybind11::arg("shift"),
        pybind11::arg("lora_down_p"), pybind11::arg("pow2") = false, pybind11::arg("int8_operands") = false);
  m.def("w4a4_gemm_sm90", &w4a4_gemm_sm90, "kernel 2: W4A4 GEMM + low-rank up + bias (sm_90a)", pybind11::arg("codes"),
        pybind11::arg("ascales"), pybind11::arg("lora_act"), pybind11::arg("qweight"), pybind11::arg("wscales"),
        pybind11::arg("lora_up"), pybind11::arg("bias"), pybind11::arg("out") = pybind11::none(),
        pybind11::arg("gelu_from") = -1);
  m.def("w4a4_gemm_pow2_sm90", &w4a4_gemm_pow2_sm90,
        "fast kernel 2: W4A4 GEMM for power-of-two scales + low-rank up + bias (sm_90a)", pybind11::arg("codes"),
        pybind11::arg("atok"), pybind11::arg("lora_act"), pybind11::arg("qweight"), pybind11::arg("wexp"),
        pybind11::arg("wbase"), pybind11::arg("lora_up"), pybind11::arg("bias"), pybind11::arg("out") = pybind11::none(),
        pybind11::arg("tile_t") = 0, pybind11::arg("half_rows") = -1, pybind11::arg("gelu_from") = -1);
#endif
}
