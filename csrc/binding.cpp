// pe_kernels._C: the thin torch glue of the CUDA kernels.
//
// Each function checks its arguments (TORCH_CHECK messages name the offending values), guards the device, takes
// the current stream, allocates outputs (4-D outputs channels_last) and workspaces, and calls the torch-free
// launchers of kernels.h. Argument conventions follow pe_kernels/reference.py; the Python wrappers in
// pe_kernels/cuda/__init__.py convert inputs first (channels_last contiguous activations and weights,
// per-channel vectors contiguous in the parameter dtype: fp32, fp64 for fp64 activations).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

pe::DType to_pe_dtype(const Tensor& t, const char* fn, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return pe::DType::F16;
    case at::kBFloat16: return pe::DType::BF16;
    case at::kFloat: return pe::DType::F32;
    case at::kDouble: return pe::DType::F64;
    default:
      TORCH_CHECK(false, "pe_kernels._C.", fn, ": ", name, " must be float16, bfloat16, float32 or float64, got ",
                  t.scalar_type());
  }
  return pe::DType::F32;
}

at::ScalarType param_dtype(at::ScalarType act) { return act == at::kDouble ? at::kDouble : at::kFloat; }

void check_activation(const Tensor& t, const char* fn, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "pe_kernels._C.", fn, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == like.device(), "pe_kernels._C.", fn, ": ", name, " is on ", t.device(),
              " but the input is on ", like.device());
  TORCH_CHECK(t.dim() == 4, "pe_kernels._C.", fn, ": ", name, " must be 4-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "pe_kernels._C.", fn, ": ", name, " has dtype ",
              t.scalar_type(), " but the input has dtype ", like.scalar_type());
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), "pe_kernels._C.", fn, ": ", name,
              " must be channels_last contiguous, got shape ", t.sizes(), " strides ", t.strides());
}

void check_same_shape(const Tensor& t, at::IntArrayRef shape, const char* fn, const char* name) {
  TORCH_CHECK(t.sizes() == shape, "pe_kernels._C.", fn, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

// A per-channel vector: 1-D, `n` elements, parameter dtype, contiguous, on the input's device.
void check_vector(const OptTensor& v, int64_t n, const char* fn, const char* name, const Tensor& like) {
  if (!v.has_value()) return;
  const Tensor& t = *v;
  const auto pdt = param_dtype(like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "pe_kernels._C.", fn, ": ", name, " is on ", t.device(),
              " but the input is on ", like.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "pe_kernels._C.", fn, ": ", name, " must have shape (", n,
              "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == pdt, "pe_kernels._C.", fn, ": ", name, " must be ", pdt, " for ",
              like.scalar_type(), " activations, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "pe_kernels._C.", fn, ": ", name, " must be contiguous, got strides ",
              t.strides());
}

const void* cptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }
void* mptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

void check_cuda(cudaError_t err, const char* fn, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "pe_kernels._C.", fn, ": ", what, " failed: ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
}

std::vector<int64_t> pair_arg(const std::vector<int64_t>& v, const char* fn, const char* name) {
  TORCH_CHECK(v.size() == 2 || v.size() == 1, "pe_kernels._C.", fn, ": ", name,
              " must have 1 or 2 elements, got ", v.size());
  return v.size() == 2 ? v : std::vector<int64_t>{v[0], v[0]};
}

pe::ConvShape conv_shape(const Tensor& x, const Tensor& w, const std::vector<int64_t>& stride_in,
                         const std::vector<int64_t>& padding_in, const std::vector<int64_t>& dilation_in,
                         int64_t groups, const char* fn) {
  TORCH_CHECK(w.dim() == 4, "pe_kernels._C.", fn, ": weight must be 4-D (K, C/groups, R, S), got shape ",
              w.sizes());
  const auto stride = pair_arg(stride_in, fn, "stride");
  const auto padding = pair_arg(padding_in, fn, "padding");
  const auto dilation = pair_arg(dilation_in, fn, "dilation");
  pe::ConvShape s;
  const std::string err = pe::make_conv_shape(s, x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), w.size(1),
                                              w.size(2), w.size(3), stride[0], stride[1], padding[0], padding[1],
                                              dilation[0], dilation[1], groups);
  TORCH_CHECK(err.empty(), "pe_kernels._C.", fn, ": ", err);
  return s;
}

Tensor workspace(int64_t bytes, const Tensor& like) {
  return at::empty({bytes > 0 ? bytes : 0}, like.options().dtype(at::kByte));
}

Tensor empty_cl(at::IntArrayRef shape, const Tensor& like) {
  return at::empty(shape, like.options().memory_format(at::MemoryFormat::ChannelsLast));
}

// A (2, K) per-channel pair (statistics or their gradient): parameter dtype, contiguous, on the input's device.
void check_stats_pair(const Tensor& t, int64_t K, const char* fn, const char* name, const Tensor& like) {
  const auto pdt = param_dtype(like.scalar_type());
  TORCH_CHECK(t.device() == like.device() && t.dim() == 2 && t.size(0) == 2 && t.size(1) == K &&
                  t.scalar_type() == pdt && t.is_contiguous(),
              "pe_kernels._C.", fn, ": ", name, " must be a contiguous (2, ", K, ") ", pdt, " tensor on ",
              like.device(), ", got shape ", t.sizes(), " dtype ", t.scalar_type(), " device ", t.device(),
              " strides ", t.strides());
}

// ------------------------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> conv_fused(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                      const OptTensor& in_scale, const OptTensor& in_shift, bool in_relu,
                                      const OptTensor& out_scale, const OptTensor& out_shift,
                                      const OptTensor& residual, bool out_relu, std::vector<int64_t> stride,
                                      std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                                      bool compute_stats, bool allow_tf32) {
  const char* fn = "conv_fused";
  const pe::DType dt = to_pe_dtype(x, fn, "x");
  check_activation(x, fn, "x", x);
  check_activation(weight, fn, "weight", x);
  const pe::ConvShape s = conv_shape(x, weight, stride, padding, dilation, groups, fn);
  check_vector(bias, s.K, fn, "bias", x);
  check_vector(in_scale, s.C, fn, "in_scale", x);
  check_vector(in_shift, s.C, fn, "in_shift", x);
  check_vector(out_scale, s.K, fn, "out_scale", x);
  check_vector(out_shift, s.K, fn, "out_shift", x);
  if (residual.has_value()) {
    check_activation(*residual, fn, "residual", x);
    check_same_shape(*residual, {s.N, s.K, s.P, s.Q}, fn, "residual");
  }
  const pe::LaunchPlan plan = pe::plan_conv_fwd(s, dt, allow_tf32, compute_stats);
  TORCH_CHECK(plan.error.empty(), "pe_kernels._C.", fn, ": ", plan.error);

  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  Tensor y = empty_cl({s.N, s.K, s.P, s.Q}, x);
  const auto pdt = param_dtype(x.scalar_type());
  Tensor stats = compute_stats ? at::empty({2, s.K}, x.options().dtype(pdt)) : at::empty({0}, x.options().dtype(pdt));
  Tensor ws = workspace(plan.workspace_bytes, x);

  pe::ConvFwdArgs a;
  a.shape = s;
  a.x = x.data_ptr();
  a.w = weight.data_ptr();
  a.bias = cptr(bias);
  a.in_scale = cptr(in_scale);
  a.in_shift = cptr(in_shift);
  a.out_scale = cptr(out_scale);
  a.out_shift = cptr(out_shift);
  a.residual = cptr(residual);
  a.y = y.data_ptr();
  a.stats = compute_stats ? stats.data_ptr() : nullptr;
  a.workspace = plan.workspace_bytes > 0 ? ws.data_ptr() : nullptr;
  a.in_relu = in_relu;
  a.out_relu = out_relu;
  check_cuda(pe::conv_fwd(a, dt, allow_tf32, stream), fn, "forward kernel launch");
  return {y, stats};
}

// Returns the gradients in the order of reference.CONV_GRAD_NAMES:
// x, weight, bias, in_scale, in_shift, out_scale, out_shift, residual (None where not needed or absent).
std::vector<OptTensor> conv_fused_backward(
    const Tensor& grad_y, const OptTensor& grad_stats, const Tensor& x, const Tensor& weight, const OptTensor& bias,
    const OptTensor& in_scale, const OptTensor& in_shift, bool in_relu, const OptTensor& out_scale,
    const OptTensor& out_shift, const OptTensor& residual, bool out_relu, std::vector<int64_t> stride,
    std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, const Tensor& y,
    std::vector<bool> needs_grad, const OptTensor& stats, bool allow_tf32) {
  const char* fn = "conv_fused_backward";
  TORCH_CHECK(needs_grad.size() == 8, "pe_kernels._C.", fn, ": needs_grad must have 8 entries, got ",
              needs_grad.size());
  const pe::DType dt = to_pe_dtype(x, fn, "x");
  check_activation(x, fn, "x", x);
  check_activation(weight, fn, "weight", x);
  const pe::ConvShape s = conv_shape(x, weight, stride, padding, dilation, groups, fn);
  check_activation(grad_y, fn, "grad_y", x);
  check_same_shape(grad_y, {s.N, s.K, s.P, s.Q}, fn, "grad_y");
  check_activation(y, fn, "y", x);
  check_same_shape(y, {s.N, s.K, s.P, s.Q}, fn, "y");
  check_vector(bias, s.K, fn, "bias", x);
  check_vector(in_scale, s.C, fn, "in_scale", x);
  check_vector(in_shift, s.C, fn, "in_shift", x);
  check_vector(out_scale, s.K, fn, "out_scale", x);
  check_vector(out_shift, s.K, fn, "out_shift", x);
  if (residual.has_value()) {
    check_activation(*residual, fn, "residual", x);
    check_same_shape(*residual, {s.N, s.K, s.P, s.Q}, fn, "residual");
  }
  // grad_stats and the forward's stats ([mean, M2]): empty tensors count as absent; stats is needed (and read)
  // only with grad_stats.
  const bool has_gs = grad_stats.has_value() && grad_stats->numel() > 0;
  const bool has_st = stats.has_value() && stats->numel() > 0;
  TORCH_CHECK_VALUE(!has_gs || has_st, "pe_kernels._C.", fn, ": grad_stats is given but stats (the forward's (2, ",
                    s.K, ") statistics [mean, M2]) is missing");
  if (has_gs) {
    check_stats_pair(*grad_stats, s.K, fn, "grad_stats", x);
    check_stats_pair(*stats, s.K, fn, "stats", x);
  }
  const bool need_x = needs_grad[0], need_w = needs_grad[1];
  const bool need_b = needs_grad[2] && bias.has_value();
  const bool need_is = needs_grad[3] && in_scale.has_value();
  const bool need_ish = needs_grad[4] && in_shift.has_value();
  const bool need_os = needs_grad[5] && out_scale.has_value();
  const bool need_osh = needs_grad[6] && out_shift.has_value();
  const bool need_res = needs_grad[7] && residual.has_value();

  const pe::LaunchPlan ew = pe::plan_rows_channels(s.M(), s.K, 3, dt);
  TORCH_CHECK(ew.error.empty(), "pe_kernels._C.", fn, ": ", ew.error);
  const bool run_dgrad = need_x || need_is || need_ish;
  const pe::LaunchPlan dplan = pe::plan_conv_dgrad(s, dt, allow_tf32, need_is || need_ish);
  if (run_dgrad) TORCH_CHECK(dplan.error.empty(), "pe_kernels._C.", fn, ": ", dplan.error);
  const pe::LaunchPlan wplan = pe::plan_conv_wgrad(s, dt, allow_tf32);
  if (need_w) TORCH_CHECK(wplan.error.empty(), "pe_kernels._C.", fn, ": ", wplan.error);

  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const auto popts = x.options().dtype(param_dtype(x.scalar_type()));

  // The accumulator (conv + bias) is needed for grad out_scale and the grad of M2 (2*(acc - mean)); it is
  // recomputed by the forward kernel (same prologue), which also makes the ReLU mask exact.
  OptTensor acc;
  if (need_os || has_gs) {
    const pe::LaunchPlan fplan = pe::plan_conv_fwd(s, dt, allow_tf32, false);
    TORCH_CHECK(fplan.error.empty(), "pe_kernels._C.", fn, ": ", fplan.error);
    acc = at::empty({s.M() * s.K}, popts);
    pe::ConvFwdArgs f;
    f.shape = s;
    f.x = x.data_ptr();
    f.w = weight.data_ptr();
    f.bias = cptr(bias);
    f.in_scale = cptr(in_scale);
    f.in_shift = cptr(in_shift);
    f.in_relu = in_relu;
    f.acc_out = acc->data_ptr();
    check_cuda(pe::conv_fwd(f, dt, allow_tf32, stream), fn, "accumulator recompute launch");
  }

  Tensor grad_acc = empty_cl({s.N, s.K, s.P, s.Q}, x);
  OptTensor g_res, g_os, g_osh, g_b;
  if (need_res) g_res = empty_cl({s.N, s.K, s.P, s.Q}, x);
  if (need_os) g_os = at::empty({s.K}, popts);
  if (need_osh) g_osh = at::empty({s.K}, popts);
  if (need_b) g_b = at::empty({s.K}, popts);
  {
    Tensor ws = workspace(ew.workspace_bytes, x);
    pe::ConvEpilogueBwdArgs e;
    e.rows = s.M();
    e.K = s.K;
    e.grad_y = grad_y.data_ptr();
    e.y = y.data_ptr();
    e.acc = cptr(acc);
    e.out_scale = cptr(out_scale);
    e.out_shift = cptr(out_shift);
    e.residual = cptr(residual);
    e.grad_stats = has_gs ? grad_stats->data_ptr() : nullptr;
    e.stats = has_gs ? stats->data_ptr() : nullptr;
    e.out_relu = out_relu;
    e.grad_acc = grad_acc.data_ptr();
    e.grad_residual = mptr(g_res);
    e.grad_out_scale = mptr(g_os);
    e.grad_out_shift = mptr(g_osh);
    e.grad_bias = mptr(g_b);
    e.workspace = ws.data_ptr();
    check_cuda(pe::conv_epilogue_bwd(e, dt, stream), fn, "epilogue backward launch");
  }

  OptTensor g_x, g_is, g_ish, g_w;
  if (run_dgrad) {
    g_x = empty_cl({s.N, s.C, s.H, s.W}, x);
    if (need_is) g_is = at::empty({s.C}, popts);
    if (need_ish) g_ish = at::empty({s.C}, popts);
    Tensor ws = workspace(dplan.workspace_bytes, x);
    pe::ConvDgradArgs d;
    d.shape = s;
    d.grad_acc = grad_acc.data_ptr();
    d.w = weight.data_ptr();
    d.x = x.data_ptr();
    d.in_scale = cptr(in_scale);
    d.in_shift = cptr(in_shift);
    d.in_relu = in_relu;
    d.grad_x = g_x->data_ptr();
    d.grad_in_scale = mptr(g_is);
    d.grad_in_shift = mptr(g_ish);
    d.workspace = dplan.workspace_bytes > 0 ? ws.data_ptr() : nullptr;
    check_cuda(pe::conv_dgrad(d, dt, allow_tf32, stream), fn, "dgrad launch");
  }
  if (need_w) {
    g_w = empty_cl(weight.sizes(), x);
    Tensor ws = workspace(wplan.workspace_bytes, x);
    pe::ConvWgradArgs wg;
    wg.shape = s;
    wg.grad_acc = grad_acc.data_ptr();
    wg.x = x.data_ptr();
    wg.in_scale = cptr(in_scale);
    wg.in_shift = cptr(in_shift);
    wg.in_relu = in_relu;
    wg.grad_w = g_w->data_ptr();
    wg.workspace = ws.data_ptr();
    check_cuda(pe::conv_wgrad(wg, dt, allow_tf32, stream), fn, "wgrad launch");
  }
  return {need_x ? g_x : std::nullopt, g_w, g_b, g_is, g_ish, g_os, g_osh, g_res};
}

// ------------------------------------------------------------------------------------------------------------

void check_stats(const Tensor& stats, const char* fn) {
  TORCH_CHECK(stats.is_cuda(), "pe_kernels._C.", fn, ": stats must be a CUDA tensor, got device ",
              stats.device());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2, "pe_kernels._C.", fn, ": stats must have shape (2, K), got ",
              stats.sizes());
  TORCH_CHECK(stats.scalar_type() == at::kFloat || stats.scalar_type() == at::kDouble, "pe_kernels._C.", fn,
              ": stats must be float32 or float64, got ", stats.scalar_type());
  TORCH_CHECK(stats.is_contiguous(), "pe_kernels._C.", fn, ": stats must be contiguous, got strides ",
              stats.strides());
}

// Per-channel vectors next to `stats`: same dtype and device, shape (K,), contiguous.
void check_param(const OptTensor& v, const Tensor& stats, const char* fn, const char* name) {
  if (!v.has_value()) return;
  TORCH_CHECK(v->device() == stats.device(), "pe_kernels._C.", fn, ": ", name, " is on ", v->device(),
              " but stats is on ", stats.device());
  TORCH_CHECK(v->dim() == 1 && v->size(0) == stats.size(1), "pe_kernels._C.", fn, ": ", name,
              " must have shape (", stats.size(1), "), got ", v->sizes());
  TORCH_CHECK(v->scalar_type() == stats.scalar_type(), "pe_kernels._C.", fn, ": ", name, " must be ",
              stats.scalar_type(), " like stats, got ", v->scalar_type());
  TORCH_CHECK(v->is_contiguous(), "pe_kernels._C.", fn, ": ", name, " must be contiguous");
}

pe::DType stats_dtype(const Tensor& stats) { return stats.scalar_type() == at::kDouble ? pe::DType::F64 : pe::DType::F32; }

std::tuple<Tensor, Tensor> bn_finalize(const Tensor& stats, int64_t count, const OptTensor& weight,
                                       const OptTensor& bias, double eps) {
  const char* fn = "bn_finalize";
  check_stats(stats, fn);
  check_param(weight, stats, fn, "weight");
  check_param(bias, stats, fn, "bias");
  TORCH_CHECK_VALUE(count > 0, "pe_kernels._C.", fn, ": count must be positive, got ", count);
  const c10::cuda::OptionalCUDAGuard guard(stats.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(stats.get_device()).stream();
  Tensor scale = at::empty({stats.size(1)}, stats.options());
  Tensor shift = at::empty({stats.size(1)}, stats.options());
  check_cuda(pe::bn_finalize(stats.data_ptr(), stats.size(1), static_cast<double>(count), cptr(weight), cptr(bias),
                             eps, scale.data_ptr(), shift.data_ptr(), stats_dtype(stats), stream),
             fn, "kernel launch");
  return {scale, shift};
}

void bn_running_update(const Tensor& stats, int64_t count, Tensor running_mean, Tensor running_var,
                       double momentum) {
  const char* fn = "bn_running_update";
  check_stats(stats, fn);
  TORCH_CHECK_VALUE(count >= 2, "Expected more than 1 value per channel when training, got count=", count);
  check_param(running_mean, stats, fn, "running_mean");
  check_param(running_var, stats, fn, "running_var");
  const c10::cuda::OptionalCUDAGuard guard(stats.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(stats.get_device()).stream();
  check_cuda(pe::bn_running_update(stats.data_ptr(), stats.size(1), static_cast<double>(count),
                                   running_mean.data_ptr(), running_var.data_ptr(), momentum, stats_dtype(stats),
                                   stream),
             fn, "kernel launch");
}

Tensor bn_apply(const Tensor& y, const Tensor& scale, const Tensor& shift, const OptTensor& residual,
                const OptTensor& residual_scale, const OptTensor& residual_shift, bool relu) {
  const char* fn = "bn_apply";
  const pe::DType dt = to_pe_dtype(y, fn, "y");
  check_activation(y, fn, "y", y);
  const int64_t K = y.size(1);
  check_vector(scale, K, fn, "scale", y);
  check_vector(shift, K, fn, "shift", y);
  check_vector(residual_scale, K, fn, "residual_scale", y);
  check_vector(residual_shift, K, fn, "residual_shift", y);
  if (residual.has_value()) {
    check_activation(*residual, fn, "residual", y);
    check_same_shape(*residual, y.sizes(), fn, "residual");
  }
  const int64_t rows = y.size(0) * y.size(2) * y.size(3);
  const pe::LaunchPlan plan = pe::plan_rows_channels(rows, K, 0, dt);
  TORCH_CHECK(plan.error.empty(), "pe_kernels._C.", fn, ": ", plan.error);
  const c10::cuda::OptionalCUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(y.get_device()).stream();
  Tensor out = empty_cl(y.sizes(), y);
  pe::BnApplyArgs a;
  a.rows = rows;
  a.K = K;
  a.y = y.data_ptr();
  a.scale = scale.data_ptr();
  a.shift = shift.data_ptr();
  a.residual = cptr(residual);
  a.residual_scale = cptr(residual_scale);
  a.residual_shift = cptr(residual_shift);
  a.relu = relu;
  a.out = out.data_ptr();
  check_cuda(pe::bn_apply(a, dt, stream), fn, "kernel launch");
  return out;
}

// Returns the gradients in the order of reference.APPLY_GRAD_NAMES:
// y, scale, shift, residual, residual_scale, residual_shift.
std::vector<OptTensor> bn_apply_backward(const Tensor& grad_out, const Tensor& y, const Tensor& scale,
                                         const Tensor& shift, const OptTensor& residual,
                                         const OptTensor& residual_scale, const OptTensor& residual_shift,
                                         bool relu, const Tensor& out, std::vector<bool> needs_grad) {
  const char* fn = "bn_apply_backward";
  TORCH_CHECK(needs_grad.size() == 6, "pe_kernels._C.", fn, ": needs_grad must have 6 entries, got ",
              needs_grad.size());
  const pe::DType dt = to_pe_dtype(y, fn, "y");
  check_activation(y, fn, "y", y);
  check_activation(grad_out, fn, "grad_out", y);
  check_same_shape(grad_out, y.sizes(), fn, "grad_out");
  check_activation(out, fn, "out", y);
  check_same_shape(out, y.sizes(), fn, "out");
  const int64_t K = y.size(1);
  check_vector(scale, K, fn, "scale", y);
  check_vector(shift, K, fn, "shift", y);
  check_vector(residual_scale, K, fn, "residual_scale", y);
  check_vector(residual_shift, K, fn, "residual_shift", y);
  if (residual.has_value()) {
    check_activation(*residual, fn, "residual", y);
    check_same_shape(*residual, y.sizes(), fn, "residual");
  }
  const int64_t rows = y.size(0) * y.size(2) * y.size(3);
  const pe::LaunchPlan plan = pe::plan_rows_channels(rows, K, 3, dt);
  TORCH_CHECK(plan.error.empty(), "pe_kernels._C.", fn, ": ", plan.error);
  const bool has_res = residual.has_value();
  const bool need_y = needs_grad[0], need_sc = needs_grad[1], need_sh = needs_grad[2];
  const bool need_r = needs_grad[3] && has_res;
  const bool need_rsc = needs_grad[4] && has_res && residual_scale.has_value();
  const bool need_rsh = needs_grad[5] && has_res && residual_shift.has_value();

  const c10::cuda::OptionalCUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(y.get_device()).stream();
  const auto popts = y.options().dtype(param_dtype(y.scalar_type()));
  OptTensor g_y, g_sc, g_sh, g_r, g_rsc, g_rsh;
  if (need_y) g_y = empty_cl(y.sizes(), y);
  if (need_sc) g_sc = at::empty({K}, popts);
  if (need_sh) g_sh = at::empty({K}, popts);
  if (need_r) g_r = empty_cl(y.sizes(), y);
  if (need_rsc) g_rsc = at::empty({K}, popts);
  if (need_rsh) g_rsh = at::empty({K}, popts);
  Tensor ws = workspace(plan.workspace_bytes, y);
  pe::BnApplyBwdArgs a;
  a.rows = rows;
  a.K = K;
  a.grad_out = grad_out.data_ptr();
  a.y = y.data_ptr();
  a.scale = scale.data_ptr();
  a.residual = cptr(residual);
  a.residual_scale = cptr(residual_scale);
  a.out = out.data_ptr();
  a.relu = relu;
  a.grad_y = mptr(g_y);
  a.grad_residual = mptr(g_r);
  a.grad_scale = mptr(g_sc);
  a.grad_shift = mptr(g_sh);
  a.grad_residual_scale = mptr(g_rsc);
  a.grad_residual_shift = mptr(g_rsh);
  a.workspace = ws.data_ptr();
  check_cuda(pe::bn_apply_bwd(a, dt, stream), fn, "kernel launch");
  return {g_y, g_sc, g_sh, g_r, g_rsc, g_rsh};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pe_kernels CUDA kernels (compile-checked; see csrc/README.md). Call through pe_kernels.cuda.";
  m.def("conv_fused", &conv_fused, "fused grouped conv forward -> (y, stats)");
  m.def("conv_fused_backward", &conv_fused_backward, "fused grouped conv backward -> 8 optional gradients");
  m.def("bn_finalize", &bn_finalize, "BN stats -> (scale, shift)");
  m.def("bn_running_update", &bn_running_update, "BN running statistics update, in place");
  m.def("bn_apply", &bn_apply, "BN apply (+ residual tail, ReLU)");
  m.def("bn_apply_backward", &bn_apply_backward, "BN apply backward -> 6 optional gradients");
}
