// Launch API of the CUDA kernels (torch-free). Implemented in conv_fwd.cu, conv_bwd.cu, bn.cu; called by
// binding.cpp. Every pointer is a device pointer; "Acc" means fp32 (fp64 when the activations are fp64);
// "T" is the activation dtype. Optional inputs/outputs are nullptr when absent. Layouts: activations NHWC,
// weights KRSC, per-channel vectors contiguous. Workspaces are sized by the plans in tiling.h.
// Every function launches on `stream`, checks each launch and returns the first CUDA error (cudaSuccess if none).
#pragma once

#include <cuda_runtime_api.h>

#include "conv_params.h"
#include "tiling.h"

namespace pe {

struct ConvFwdArgs {
  ConvShape shape;
  const void* x = nullptr;          // T (N, H, W, C)
  const void* w = nullptr;          // T (K, R, S, C/groups)
  const void* bias = nullptr;       // Acc (K)
  const void* in_scale = nullptr;   // Acc (C)   prologue x*in_scale + in_shift, ReLU if in_relu
  const void* in_shift = nullptr;   // Acc (C)
  const void* out_scale = nullptr;  // Acc (K)   epilogue (acc*out_scale + out_shift + residual), ReLU if out_relu
  const void* out_shift = nullptr;  // Acc (K)
  const void* residual = nullptr;   // T (N, P, Q, K)
  void* y = nullptr;                // T (N, P, Q, K)            written unless acc_out is set
  void* acc_out = nullptr;          // Acc (N, P, Q, K): if set, store acc = conv + bias instead of y
  void* stats = nullptr;            // Acc (2, K): [mean acc, M2 = sum (acc - mean)^2] over N*P*Q (deterministic)
  void* workspace = nullptr;        // plan_conv_fwd(...).workspace_bytes (needed when stats is set)
  bool in_relu = false;
  bool out_relu = false;
};
cudaError_t conv_fwd(const ConvFwdArgs& a, DType t, bool allow_tf32, cudaStream_t stream);

// Backward of the epilogue, elementwise over the (N*P*Q) x K output, with per-channel sums.
//   z = acc*out_scale + out_shift + residual; dz = grad_y, zeroed where z <= 0 if out_relu (NaN passes; z from
//   acc when given, else y is the mask); dacc = dz*out_scale + grad_stats[0]/n + 2*grad_stats[1]*(acc - mean),
//   n = rows, mean = stats[0] (the forward's statistics).
struct ConvEpilogueBwdArgs {
  int64_t rows = 0, K = 0;
  const void* grad_y = nullptr;      // T (rows, K)
  const void* y = nullptr;           // T (rows, K) forward output (ReLU mask when acc is absent)
  const void* acc = nullptr;         // Acc (rows, K) recomputed conv + bias (needed for grad_out_scale, grad_stats)
  const void* out_scale = nullptr;   // Acc (K)
  const void* out_shift = nullptr;   // Acc (K)
  const void* residual = nullptr;    // T (rows, K)
  const void* grad_stats = nullptr;  // Acc (2, K) gradient of [mean, M2]; needs acc and stats
  const void* stats = nullptr;       // Acc (2, K) forward statistics [mean, M2] (read with grad_stats)
  bool out_relu = false;
  void* grad_acc = nullptr;          // T (rows, K)   required: the input of dgrad and wgrad
  void* grad_residual = nullptr;     // T (rows, K) = dz
  void* grad_out_scale = nullptr;    // Acc (K) = sum dz*acc
  void* grad_out_shift = nullptr;    // Acc (K) = sum dz
  void* grad_bias = nullptr;         // Acc (K) = sum dacc
  void* workspace = nullptr;         // plan_rows_channels(rows, K, 3, t).workspace_bytes
};
cudaError_t conv_epilogue_bwd(const ConvEpilogueBwdArgs& a, DType t, cudaStream_t stream);

// Data gradient: transposed grouped implicit GEMM of grad_acc with w, then the prologue backward
// (pre = x*in_scale + in_shift; d = dx' zeroed where pre <= 0 if in_relu, NaN passes; grad_x = d*in_scale; sums
// of d*x and d).
struct ConvDgradArgs {
  ConvShape shape;
  const void* grad_acc = nullptr;    // T (N, P, Q, K)
  const void* w = nullptr;           // T (K, R, S, C/groups)
  const void* x = nullptr;           // T (N, H, W, C)  (read only when the prologue is active)
  const void* in_scale = nullptr;    // Acc (C)
  const void* in_shift = nullptr;    // Acc (C)
  bool in_relu = false;
  void* grad_x = nullptr;            // T (N, H, W, C)
  void* grad_in_scale = nullptr;     // Acc (C)
  void* grad_in_shift = nullptr;     // Acc (C)
  void* workspace = nullptr;         // plan_conv_dgrad(..., partials).workspace_bytes
};
cudaError_t conv_dgrad(const ConvDgradArgs& a, DType t, bool allow_tf32, cudaStream_t stream);

// Weight gradient: grouped implicit GEMM of grad_acc^T with the prologue-applied input over N*P*Q, split into
// plan.splits ranges reduced in fixed order (deterministic).
struct ConvWgradArgs {
  ConvShape shape;
  const void* grad_acc = nullptr;    // T (N, P, Q, K)
  const void* x = nullptr;           // T (N, H, W, C)
  const void* in_scale = nullptr;    // Acc (C)
  const void* in_shift = nullptr;    // Acc (C)
  bool in_relu = false;
  void* grad_w = nullptr;            // T (K, R, S, C/groups)
  void* workspace = nullptr;         // plan_conv_wgrad(...).workspace_bytes
};
cudaError_t conv_wgrad(const ConvWgradArgs& a, DType t, bool allow_tf32, cudaStream_t stream);

// BatchNorm finalize: stats (2, K) = [mean, M2] -> scale, shift (K) (training-mode BN as an affine map, biased
// var = M2/count, no clamp: NaN propagates).
cudaError_t bn_finalize(const void* stats, int64_t K, double count, const void* weight, const void* bias, double eps,
                        void* scale, void* shift, DType t, cudaStream_t stream);
// running = (1 - momentum)*running + momentum*batch (unbiased var = M2/(count-1)), in place; count >= 2 (checked
// by the caller). NaN propagates.
cudaError_t bn_running_update(const void* stats, int64_t K, double count, void* running_mean, void* running_var,
                              double momentum, DType t, cudaStream_t stream);

struct BnApplyArgs {
  int64_t rows = 0, K = 0;
  const void* y = nullptr;               // T (rows, K)
  const void* scale = nullptr;           // Acc (K) required
  const void* shift = nullptr;           // Acc (K) required
  const void* residual = nullptr;        // T (rows, K)
  const void* residual_scale = nullptr;  // Acc (K)
  const void* residual_shift = nullptr;  // Acc (K)
  bool relu = false;
  void* out = nullptr;                   // T (rows, K)
};
cudaError_t bn_apply(const BnApplyArgs& a, DType t, cudaStream_t stream);

// g = grad_out, zeroed where out <= 0 if relu (NaN passes); grad_y = g*scale; grad_scale = sum g*y; grad_shift = sum g;
// grad_residual = g*residual_scale; grad_residual_scale = sum g*residual; grad_residual_shift = sum g.
struct BnApplyBwdArgs {
  int64_t rows = 0, K = 0;
  const void* grad_out = nullptr;        // T (rows, K)
  const void* y = nullptr;               // T (rows, K)
  const void* scale = nullptr;           // Acc (K)
  const void* residual = nullptr;        // T (rows, K)
  const void* residual_scale = nullptr;  // Acc (K)
  const void* out = nullptr;             // T (rows, K) forward output (ReLU mask)
  bool relu = false;
  void* grad_y = nullptr;                // T (rows, K)
  void* grad_residual = nullptr;         // T (rows, K)
  void* grad_scale = nullptr;            // Acc (K)
  void* grad_shift = nullptr;            // Acc (K)
  void* grad_residual_scale = nullptr;   // Acc (K)
  void* grad_residual_shift = nullptr;   // Acc (K)
  void* workspace = nullptr;             // plan_rows_channels(rows, K, 3, t).workspace_bytes
};
cudaError_t bn_apply_bwd(const BnApplyBwdArgs& a, DType t, cudaStream_t stream);

}  // namespace pe
