// Fused grouped implicit-GEMM convolution, forward (NHWC activations, KRSC weights). Torch-free.
//
// Per group g, a GEMM  Y_g[m, k] = sum_{red} A[m, red] * B[red, k]  with
//   m   = (n, p, q)  over N*P*Q output pixels          (grid.x, BM rows per CTA)
//   k   in [0, K/groups)                               (grid.y = column tiles x groups, BN per CTA)
//   red = (r, s, c) over R*S*C/groups, c fastest       (BK per main-loop step)
//   A[m, red] = prologue(x[n, p*sh - ph + r*dh, q*sw - pw + s*dw, g*Cg + c]), 0 outside the image (padding stays
//               zero: the prologue is applied to in-bounds elements only)
//   B[red, k] = w[g*Kg + k, r, s, c]
// Prologue: x' = T(relu?(x*in_scale[c] + in_shift[c])) computed in fp32 (fp64), as the reference rounds x' to T.
// Epilogue: acc = Y + bias; y = T(relu?(acc*out_scale + out_shift + residual)) or, with acc_out, acc itself.
// Statistics (BatchNorm's, numerically stable): stats[0, k] = mean of acc_s over the n = N*P*Q rows, stats[1, k] =
// M2 = sum (acc_s - mean)^2, with acc_s = stored<T>(acc) = acc rounded to T and back (fp16/bf16; acc itself for
// fp32/fp64): the values the BN apply will read from the stored y (.lab/CONTRACT.md, issue 10). Per CTA, two
// passes over the accumulator tile in shared memory give, per channel and over its valid rows, count c_t, mean_t
// and M2_t = sum (acc_s - mean_t)^2 (partial buffer, 3 x m_tiles x K); a second
// kernel merges the row tiles in increasing order with Chan et al.'s formula
//   n = nA + nB, d = meanB - meanA, mean = meanA + d*nB/n, M2 = M2A + M2B + d^2*nA*nB/n
// (count-0 tiles skipped). No atomics: results are deterministic. No clamping: a NaN or Inf acc gives NaN M2.
//
// Status: compile-checked for sm_80/sm_90 only; never run on a GPU (see csrc/README.md).
#include <climits>

#include "common.cuh"
#include "kernels.h"

namespace pe {

template <typename T, Math MODE, int BM, int BN, int BK, int THREADS>
__global__ void __launch_bounds__(THREADS) conv_fwd_kernel(const ConvFwdArgs a) {
  using Mma = TileMma<T, MODE, BM, BN, BK, THREADS>;
  using Acc = typename Cvt<T>::Acc;
  constexpr int LDS = Mma::LDS, LDC = Mma::LDC;
  __shared__ __align__(128) TileSmem<T, Acc, BM, BN, LDS, LDC> sm;
  __shared__ int64_t row_base[BM];  // n*H*W*C of the row's image, or -1 past the last row
  __shared__ int row_h[BM], row_w[BM];  // top-left input coordinate of the row's receptive field

  const ConvShape& s = a.shape;
  const int tid = threadIdx.x;
  const int64_t M = s.M();
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  const int n_tiles = static_cast<int>(ceil_div(s.Kg, BN));
  const int g = blockIdx.y / n_tiles;
  const int k0 = (blockIdx.y % n_tiles) * BN;
  const int Kg = static_cast<int>(s.Kg);
  const int RSC = static_cast<int>(s.RSC());
  const int64_t K = s.K;

  const T* __restrict__ w = static_cast<const T*>(a.w);
  const InputGather<T> gather(s, a.x, a.in_scale, a.in_shift, a.in_relu);

  for (int i = tid; i < BM; i += THREADS) {
    const int64_t m = m0 + i;
    if (m < M) {
      output_pixel_origin(s, m, row_base[i], row_h[i], row_w[i]);
    } else {
      row_base[i] = -1;
      row_h[i] = 0;
      row_w[i] = 0;
    }
  }
  __syncthreads();

  const T zero = Cvt<T>::from_acc(Acc(0));
  // A tile: rows m0 + i, reduction red0 + kk; consecutive threads walk kk = consecutive channels.
  auto load_a = [&](int red0) {
    return [&, red0](int i, int kk) -> T { return gather(row_base[i], row_h[i], row_w[i], red0 + kk, g); };
  };
  // B tile stored as b[k][red]: w is KRSC, contiguous along red.
  auto load_b = [&](int red0) {
    return [&, red0](int j, int kk) -> T {
      const int red = red0 + kk;
      const int k = k0 + j;
      if (red >= RSC || k >= Kg) return zero;
      return w[int64_t(g * Kg + k) * RSC + red];
    };
  };

  Mma mma;
  mma.zero();
  for (int red0 = 0; red0 < RSC; red0 += BK) {
    fill_tile<BM, BK, LDS, THREADS, true>(sm.ab.a, load_a(red0));
    fill_tile<BN, BK, LDS, THREADS, true>(sm.ab.b, load_b(red0));
    __syncthreads();
    mma.step(sm.ab.a, sm.ab.b);
    __syncthreads();
  }
  mma.store(sm.c);
  __syncthreads();

  // Epilogue: consecutive threads walk consecutive output channels (coalesced NHWC stores).
  const Acc* __restrict__ bias = static_cast<const Acc*>(a.bias);
  const Acc* __restrict__ out_scale = static_cast<const Acc*>(a.out_scale);
  const Acc* __restrict__ out_shift = static_cast<const Acc*>(a.out_shift);
  const T* __restrict__ residual = static_cast<const T*>(a.residual);
  T* __restrict__ y = static_cast<T*>(a.y);
  Acc* __restrict__ acc_out = static_cast<Acc*>(a.acc_out);
  for (int e = tid; e < BM * BN; e += THREADS) {
    const int i = e / BN, j = e % BN;
    const int64_t m = m0 + i;
    const int k = k0 + j;
    if (m >= M || k >= Kg) continue;
    const int gk = g * Kg + k;
    const int64_t off = m * K + gk;
    Acc v = sm.c[i * LDC + j];
    if (bias != nullptr) v = v + bias[gk];
    if (acc_out != nullptr) {
      acc_out[off] = v;
      continue;
    }
    // Uncontracted (mul_rn/add_rn), as the backward recomputes z from acc: its ReLU mask is bitwise this one.
    if (out_scale != nullptr) v = mul_rn(v, out_scale[gk]);
    if (out_shift != nullptr) v = add_rn(v, out_shift[gk]);
    if (residual != nullptr) v = add_rn(v, Cvt<T>::to_acc(residual[off]));
    if (a.out_relu) v = relu(v);
    y[off] = Cvt<T>::from_acc(v);
  }

  if (a.stats != nullptr) {
    // Per channel over this CTA's valid rows (rows in increasing order): the mean first, then the sum of squared
    // deviations from it, both of acc_s = stored<T>(acc + bias) (rounded to T as y is stored; identity in fp32 and
    // fp64). part[(q*m_tiles + tile)*K + k], q = 0: count, 1: mean, 2: M2.
    Acc* __restrict__ part = static_cast<Acc*>(a.workspace);
    const int64_t m_tiles = gridDim.x;
    const int rows = static_cast<int>(M - m0 < BM ? M - m0 : BM);  // >= 1: every row tile holds a row
    for (int j = tid; j < BN; j += THREADS) {
      const int k = k0 + j;
      if (k >= Kg) continue;
      const int gk = g * Kg + k;
      const Acc b = bias != nullptr ? bias[gk] : Acc(0);
      Acc sum = Acc(0);
      for (int i = 0; i < rows; ++i) sum += stored<T>(sm.c[i * LDC + j] + b);
      const Acc mean = sum / Acc(rows);
      Acc m2 = Acc(0);
      for (int i = 0; i < rows; ++i) {
        const Acc d = stored<T>(sm.c[i * LDC + j] + b) - mean;
        m2 += d * d;
      }
      part[int64_t(blockIdx.x) * K + gk] = Acc(rows);
      part[(m_tiles + blockIdx.x) * K + gk] = mean;
      part[(2 * m_tiles + blockIdx.x) * K + gk] = m2;
    }
  }
}

// stats[0, k] = mean, stats[1, k] = M2 over all rows: the row-tile partials [count, mean, M2] of conv_fwd_kernel
// (T tiles) merged in increasing tile order with Chan et al.'s formula, tiles with count 0 skipped (deterministic).
// Empty input: mean = M2 = 0. grid ceil(K/256), block 256, one thread per channel.
template <typename Acc>
__global__ void merge_stats_kernel(const Acc* __restrict__ part, int64_t T, int64_t K, Acc* __restrict__ stats) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const Acc* __restrict__ p_count = part + k;
  const Acc* __restrict__ p_mean = part + T * K + k;
  const Acc* __restrict__ p_m2 = part + 2 * T * K + k;
  Acc n = Acc(0), mean = Acc(0), m2 = Acc(0);
  for (int64_t t = 0; t < T; ++t) {
    const Acc nb = p_count[t * K];
    if (!(nb > Acc(0))) continue;
    if (n == Acc(0)) {  // first non-empty tile: taken as is (no 0 * d^2 that could be 0 * Inf)
      n = nb;
      mean = p_mean[t * K];
      m2 = p_m2[t * K];
      continue;
    }
    // A = the tiles merged so far (n, mean, m2), B = tile t.
    const Acc n_ab = n + nb;
    const Acc d = p_mean[t * K] - mean;
    const Acc dr = d * (nb / n_ab);       // d * nB / n
    mean = mean + dr;
    m2 = m2 + p_m2[t * K] + dr * d * n;  // M2A + M2B + d^2 * nA * nB / n
    n = n_ab;
  }
  stats[k] = mean;
  stats[K + k] = m2;
}

template <typename T, Math MODE, int TILE>
cudaError_t launch_conv_fwd(const ConvFwdArgs& a, const LaunchPlan& plan, cudaStream_t stream) {
  constexpr TileShape ts = TILE == 1 ? kTileTC128x32 : (TILE == 2 ? kTileSIMT64x64 : kTileTC64x64);
  using Acc = typename Cvt<T>::Acc;
  dim3 grid(static_cast<unsigned>(plan.grid_x), static_cast<unsigned>(plan.grid_y), 1);
  conv_fwd_kernel<T, MODE, ts.bm, ts.bn, ts.bk, ts.threads><<<grid, ts.threads, 0, stream>>>(a);
  PE_RETURN_IF_ERROR(cudaGetLastError());
  if (a.stats != nullptr && a.shape.K > 0) {
    merge_stats_kernel<Acc><<<static_cast<unsigned>(ceil_div(a.shape.K, 256)), 256, 0, stream>>>(
        static_cast<const Acc*>(a.workspace), plan.m_tiles, a.shape.K, static_cast<Acc*>(a.stats));
    PE_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

// Explicit instantiations: the tile set of tiling.h (select_fwd_tile) for every math mode.
template cudaError_t launch_conv_fwd<__half, Math::WMMA16, 0>(const ConvFwdArgs&, const LaunchPlan&, cudaStream_t);
template cudaError_t launch_conv_fwd<__half, Math::WMMA16, 1>(const ConvFwdArgs&, const LaunchPlan&, cudaStream_t);
template cudaError_t launch_conv_fwd<__nv_bfloat16, Math::WMMA16, 0>(const ConvFwdArgs&, const LaunchPlan&,
                                                                     cudaStream_t);
template cudaError_t launch_conv_fwd<__nv_bfloat16, Math::WMMA16, 1>(const ConvFwdArgs&, const LaunchPlan&,
                                                                     cudaStream_t);
template cudaError_t launch_conv_fwd<float, Math::TF32, 0>(const ConvFwdArgs&, const LaunchPlan&, cudaStream_t);
template cudaError_t launch_conv_fwd<float, Math::TF32, 1>(const ConvFwdArgs&, const LaunchPlan&, cudaStream_t);
template cudaError_t launch_conv_fwd<float, Math::SIMT, 2>(const ConvFwdArgs&, const LaunchPlan&, cudaStream_t);
template cudaError_t launch_conv_fwd<double, Math::SIMT, 2>(const ConvFwdArgs&, const LaunchPlan&, cudaStream_t);

cudaError_t conv_fwd(const ConvFwdArgs& a, DType t, bool allow_tf32, cudaStream_t stream) {
  const bool stats = a.stats != nullptr;
  const LaunchPlan plan = plan_conv_fwd(a.shape, t, allow_tf32, stats);
  if (!plan.error.empty()) return cudaErrorInvalidConfiguration;  // the binding checks plan.error first
  if (a.shape.M() == 0) return zero_bytes(a.stats, 2 * a.shape.K * acc_bytes(t), stream);  // mean = M2 = 0
  if (stats && a.workspace == nullptr) return cudaErrorInvalidValue;
  const Math math = select_math(t, allow_tf32);
  switch (t) {
    case DType::F16:
      return plan.tile_id == 1 ? launch_conv_fwd<__half, Math::WMMA16, 1>(a, plan, stream)
                               : launch_conv_fwd<__half, Math::WMMA16, 0>(a, plan, stream);
    case DType::BF16:
      return plan.tile_id == 1 ? launch_conv_fwd<__nv_bfloat16, Math::WMMA16, 1>(a, plan, stream)
                               : launch_conv_fwd<__nv_bfloat16, Math::WMMA16, 0>(a, plan, stream);
    case DType::F32:
      if (math == Math::TF32)
        return plan.tile_id == 1 ? launch_conv_fwd<float, Math::TF32, 1>(a, plan, stream)
                                 : launch_conv_fwd<float, Math::TF32, 0>(a, plan, stream);
      return launch_conv_fwd<float, Math::SIMT, 2>(a, plan, stream);
    case DType::F64:
      return launch_conv_fwd<double, Math::SIMT, 2>(a, plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pe
