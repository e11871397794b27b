// BatchNorm pieces of the kernel family (torch-free): finalize, running-stat update, apply, apply-backward.
//
//   stats:     (2, K) = [mean, M2] over n = count rows (M2 = sum of squared deviations, conv_fwd.cu)
//   finalize:  var = M2/n (biased), invstd = 1/sqrt(var + eps),
//              scale = weight*invstd, shift = bias - mean*scale                       (weight/bias optional)
//   running:   r_mean = (1-m)*r_mean + m*mean,  r_var = (1-m)*r_var + m*M2/(n-1)      (BatchNorm2d, unbiased)
//   apply:     out = relu?(y*scale + shift + residual*residual_scale + residual_shift)
//   backward:  g = grad_out, zeroed where out <= 0 if relu (NaN passes, as torch's threshold_backward);
//              grad_y = g*scale; grad_residual = g*residual_scale;
//              per-channel sums of g, g*y, g*residual in one pass (per-block partials + fixed-order reduce);
//              the scale gradients' sums g*y, g*residual centred on the channel's row 0 (common.cuh).
// The elementwise kernels view an NHWC tensor as rows x K: block (32 channels) x (8 row lanes), 64 rows per
// block; each thread loads its channel's parameters once. Nothing is clamped: a NaN M2 gives NaN, as in torch.
//
// Status: compile-checked for sm_80/sm_90 only; never run on a GPU (see csrc/README.md).
#include "common.cuh"
#include "kernels.h"

namespace pe {

__device__ __forceinline__ float rsqrt_acc(float v) { return 1.0f / sqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return 1.0 / sqrt(v); }

template <typename Acc>
__global__ void bn_finalize_kernel(const Acc* __restrict__ stats, int64_t K, Acc count,
                                   const Acc* __restrict__ weight, const Acc* __restrict__ bias, Acc eps,
                                   Acc* __restrict__ scale, Acc* __restrict__ shift) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const Acc mean = stats[k];
  const Acc var = stats[K + k] / count;  // biased; M2 >= 0 or NaN, no clamp
  const Acc invstd = rsqrt_acc(var + eps);
  const Acc sc = weight != nullptr ? weight[k] * invstd : invstd;
  scale[k] = sc;
  shift[k] = bias != nullptr ? bias[k] - mean * sc : -mean * sc;
}

template <typename Acc>
__global__ void bn_running_update_kernel(const Acc* __restrict__ stats, int64_t K, Acc count_m1,
                                         Acc* __restrict__ running_mean, Acc* __restrict__ running_var,
                                         Acc momentum) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const Acc mean = stats[k];
  const Acc var = stats[K + k] / count_m1;  // unbiased; NaN propagates
  running_mean[k] = running_mean[k] * (Acc(1) - momentum) + momentum * mean;
  running_var[k] = running_var[k] * (Acc(1) - momentum) + momentum * var;
}

template <typename T>
__global__ void __launch_bounds__(kEwChannels* kEwRowLanes) bn_apply_kernel(const BnApplyArgs a) {
  using Acc = typename Cvt<T>::Acc;
  const int64_t k = int64_t(blockIdx.y) * kEwChannels + threadIdx.x;
  if (k >= a.K) return;  // no barrier in this kernel
  const Acc sc = static_cast<const Acc*>(a.scale)[k];
  const Acc sh = static_cast<const Acc*>(a.shift)[k];
  const Acc rsc = a.residual_scale != nullptr ? static_cast<const Acc*>(a.residual_scale)[k] : Acc(1);
  const Acc rsh = a.residual_shift != nullptr ? static_cast<const Acc*>(a.residual_shift)[k] : Acc(0);
  const T* __restrict__ y = static_cast<const T*>(a.y);
  const T* __restrict__ res = static_cast<const T*>(a.residual);
  T* __restrict__ out = static_cast<T*>(a.out);
  const int64_t row0 = int64_t(blockIdx.x) * kEwRowsPerBlock;
#pragma unroll 4
  for (int t = threadIdx.y; t < kEwRowsPerBlock; t += kEwRowLanes) {
    const int64_t m = row0 + t;
    if (m >= a.rows) break;
    const int64_t off = m * a.K + k;
    Acc v = Cvt<T>::to_acc(y[off]) * sc + sh;
    if (res != nullptr) v = v + (Cvt<T>::to_acc(res[off]) * rsc + rsh);
    if (a.relu) v = relu(v);
    out[off] = Cvt<T>::from_acc(v);
  }
}

// Partials layout: workspace[(q*row_blocks + blockIdx.x)*K + k], q = 0: sum g, 1: sum g*y, 2: sum g*residual
// (1 and 2 centred on the channel's row 0: common.cuh).
template <typename T>
__global__ void __launch_bounds__(kEwChannels* kEwRowLanes) bn_apply_bwd_kernel(const BnApplyBwdArgs a) {
  using Acc = typename Cvt<T>::Acc;
  const int64_t k = int64_t(blockIdx.y) * kEwChannels + threadIdx.x;
  const bool valid_k = k < a.K;
  const T* __restrict__ gout = static_cast<const T*>(a.grad_out);
  const T* __restrict__ y = static_cast<const T*>(a.y);
  const T* __restrict__ res = static_cast<const T*>(a.residual);
  const T* __restrict__ out = static_cast<const T*>(a.out);
  T* __restrict__ gy = static_cast<T*>(a.grad_y);
  T* __restrict__ gres = static_cast<T*>(a.grad_residual);
  const bool want_sy = a.grad_scale != nullptr;
  const bool want_sr = a.grad_residual_scale != nullptr && res != nullptr;
  Acc sc = Acc(0), rsc = Acc(1);
  if (valid_k) {
    sc = static_cast<const Acc*>(a.scale)[k];
    if (a.residual_scale != nullptr) rsc = static_cast<const Acc*>(a.residual_scale)[k];
  }
  Acc s_g = Acc(0), s_gy = Acc(0), s_gr = Acc(0);
  const int64_t row0 = int64_t(blockIdx.x) * kEwRowsPerBlock;
  // Centred sums (common.cuh): sum g*(y - y0) here; the block holding row 0 hands y0 (r0) to the reduction in
  // the output vector, which adds y0 * sum g once.
  Acc y0 = Acc(0), r0 = Acc(0);
  if (valid_k) {
    if (want_sy) y0 = shift_or_zero(Cvt<T>::to_acc(y[k]));
    if (want_sr) r0 = shift_or_zero(Cvt<T>::to_acc(res[k]));
    if (blockIdx.x == 0 && threadIdx.y == 0 && a.workspace != nullptr) {
      if (want_sy) static_cast<Acc*>(a.grad_scale)[k] = y0;
      if (want_sr) static_cast<Acc*>(a.grad_residual_scale)[k] = r0;
    }
#pragma unroll 4
    for (int t = threadIdx.y; t < kEwRowsPerBlock; t += kEwRowLanes) {
      const int64_t m = row0 + t;
      if (m >= a.rows) break;
      const int64_t off = m * a.K + k;
      Acc g = Cvt<T>::to_acc(gout[off]);
      if (a.relu && Cvt<T>::to_acc(out[off]) <= Acc(0)) g = Acc(0);  // NaN out passes g, as torch
      if (gy != nullptr) gy[off] = Cvt<T>::from_acc(g * sc);
      if (gres != nullptr) gres[off] = Cvt<T>::from_acc(g * rsc);
      s_g += g;
      if (want_sy) s_gy += g * (Cvt<T>::to_acc(y[off]) - y0);
      if (want_sr) s_gr += g * (Cvt<T>::to_acc(res[off]) - r0);
    }
  }
  const Acc sums[3] = {s_g, s_gy, s_gr};
  write_lane_partials<Acc, 3>(sums, static_cast<Acc*>(a.workspace), a.K, k, valid_k);
}

template <typename Acc>
static cudaError_t bn_finalize_impl(const void* stats, int64_t K, double count, const void* weight,
                                    const void* bias, double eps, void* scale, void* shift, cudaStream_t stream) {
  if (K <= 0) return cudaSuccess;
  bn_finalize_kernel<Acc><<<static_cast<unsigned>(ceil_div(K, 256)), 256, 0, stream>>>(
      static_cast<const Acc*>(stats), K, static_cast<Acc>(count), static_cast<const Acc*>(weight),
      static_cast<const Acc*>(bias), static_cast<Acc>(eps), static_cast<Acc*>(scale), static_cast<Acc*>(shift));
  return cudaGetLastError();
}

cudaError_t bn_finalize(const void* stats, int64_t K, double count, const void* weight, const void* bias, double eps,
                        void* scale, void* shift, DType t, cudaStream_t stream) {
  if (t == DType::F64) return bn_finalize_impl<double>(stats, K, count, weight, bias, eps, scale, shift, stream);
  return bn_finalize_impl<float>(stats, K, count, weight, bias, eps, scale, shift, stream);
}

template <typename Acc>
static cudaError_t bn_running_impl(const void* stats, int64_t K, double count, void* rm, void* rv, double momentum,
                                   cudaStream_t stream) {
  if (K <= 0) return cudaSuccess;
  bn_running_update_kernel<Acc><<<static_cast<unsigned>(ceil_div(K, 256)), 256, 0, stream>>>(
      static_cast<const Acc*>(stats), K, static_cast<Acc>(count - 1.0), static_cast<Acc*>(rm),
      static_cast<Acc*>(rv), static_cast<Acc>(momentum));
  return cudaGetLastError();
}

cudaError_t bn_running_update(const void* stats, int64_t K, double count, void* running_mean, void* running_var,
                              double momentum, DType t, cudaStream_t stream) {
  if (count < 2) return cudaErrorInvalidValue;  // the binding raises the readable error first
  if (t == DType::F64) return bn_running_impl<double>(stats, K, count, running_mean, running_var, momentum, stream);
  return bn_running_impl<float>(stats, K, count, running_mean, running_var, momentum, stream);
}

template <typename T>
cudaError_t launch_bn_apply(const BnApplyArgs& a, cudaStream_t stream) {
  const LaunchPlan plan = plan_rows_channels(a.rows, a.K, 0, DType::F32);
  if (!plan.error.empty()) return cudaErrorInvalidConfiguration;
  if (a.rows == 0 || a.K == 0) return cudaSuccess;
  dim3 grid(static_cast<unsigned>(plan.grid_x), static_cast<unsigned>(plan.grid_y));
  bn_apply_kernel<T><<<grid, dim3(kEwChannels, kEwRowLanes), 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bn_apply_bwd(const BnApplyBwdArgs& a, cudaStream_t stream) {
  using Acc = typename Cvt<T>::Acc;
  const LaunchPlan plan = plan_rows_channels(a.rows, a.K, 3, DType::F32);
  if (!plan.error.empty()) return cudaErrorInvalidConfiguration;
  const bool sums = a.grad_scale != nullptr || a.grad_shift != nullptr || a.grad_residual_scale != nullptr ||
                    a.grad_residual_shift != nullptr;
  if (a.K == 0) return cudaSuccess;
  if (a.rows > 0) {
    if (sums && a.workspace == nullptr) return cudaErrorInvalidValue;
    BnApplyBwdArgs b = a;
    if (!sums) b.workspace = nullptr;
    dim3 grid(static_cast<unsigned>(plan.grid_x), static_cast<unsigned>(plan.grid_y));
    bn_apply_bwd_kernel<T><<<grid, dim3(kEwChannels, kEwRowLanes), 0, stream>>>(b);
    PE_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (sums) {
    // q = 0 (sum g) feeds both grad_shift and grad_residual_shift: reduce it twice rather than copy.
    const Acc* part = static_cast<const Acc*>(a.workspace);
    PartialOuts<Acc> outs{{static_cast<Acc*>(a.grad_shift), static_cast<Acc*>(a.grad_scale),
                           static_cast<Acc*>(a.grad_residual_scale), nullptr}};
    outs.centred = 0b110u;  // sum g*y, sum g*residual: centred on y0, r0 (common.cuh); sum g is q = 0
    outs.g_q = 0;
    PE_RETURN_IF_ERROR(launch_reduce_partials<Acc>(part, 3, plan.m_tiles, a.K, outs, stream));
    if (a.grad_residual_shift != nullptr) {
      PartialOuts<Acc> o2{{static_cast<Acc*>(a.grad_residual_shift), nullptr, nullptr, nullptr}};
      PE_RETURN_IF_ERROR(launch_reduce_partials<Acc>(part, 1, plan.m_tiles, a.K, o2, stream));
    }
  }
  return cudaSuccess;
}

template cudaError_t launch_bn_apply<__half>(const BnApplyArgs&, cudaStream_t);
template cudaError_t launch_bn_apply<__nv_bfloat16>(const BnApplyArgs&, cudaStream_t);
template cudaError_t launch_bn_apply<float>(const BnApplyArgs&, cudaStream_t);
template cudaError_t launch_bn_apply<double>(const BnApplyArgs&, cudaStream_t);
template cudaError_t launch_bn_apply_bwd<__half>(const BnApplyBwdArgs&, cudaStream_t);
template cudaError_t launch_bn_apply_bwd<__nv_bfloat16>(const BnApplyBwdArgs&, cudaStream_t);
template cudaError_t launch_bn_apply_bwd<float>(const BnApplyBwdArgs&, cudaStream_t);
template cudaError_t launch_bn_apply_bwd<double>(const BnApplyBwdArgs&, cudaStream_t);

cudaError_t bn_apply(const BnApplyArgs& a, DType t, cudaStream_t stream) {
  switch (t) {
    case DType::F16: return launch_bn_apply<__half>(a, stream);
    case DType::BF16: return launch_bn_apply<__nv_bfloat16>(a, stream);
    case DType::F32: return launch_bn_apply<float>(a, stream);
    case DType::F64: return launch_bn_apply<double>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t bn_apply_bwd(const BnApplyBwdArgs& a, DType t, cudaStream_t stream) {
  switch (t) {
    case DType::F16: return launch_bn_apply_bwd<__half>(a, stream);
    case DType::BF16: return launch_bn_apply_bwd<__nv_bfloat16>(a, stream);
    case DType::F32: return launch_bn_apply_bwd<float>(a, stream);
    case DType::F64: return launch_bn_apply_bwd<double>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pe
