// Fused grouped implicit-GEMM convolution, backward (NHWC activations, KRSC weights). Torch-free.
//
// 1. Epilogue backward (elementwise over rows = N*P*Q, K channels, per-channel sums in one pass):
//      z = acc*out_scale + out_shift + residual;  dz = grad_y, zeroed where z <= 0 if out_relu (NaN z passes,
//      as torch's threshold_backward)
//      dacc = dz*out_scale + grad_stats[0]/n + 2*grad_stats[1]*(acc_s - mean)  (stored in T: the input of 2 and 3)
//      with stats = [mean, M2] the forward's statistics over n = N*P*Q rows of acc_s = stored<T>(acc) (acc rounded
//      to T, as the forward took them; acc itself in fp32/fp64): d mean/d acc = 1/n, d M2/d acc = 2*(acc_s - mean).
//      Without grad_stats the statistics term is absent, not 0 * (acc - mean): a NaN acc must not make dacc NaN.
//      grad_residual = dz; grad_out_shift = sum dz; grad_out_scale = sum dz*acc; grad_bias = sum dacc
//      (sum dz*acc centred on the channel's acc at row 0: common.cuh, "Centred scale-gradient sums")
//    With `acc` (recomputed by the forward kernel with acc_out) the ReLU mask is z <= 0, z rounded exactly as the
//    forward epilogue rounds it (mul_rn/add_rn: bitwise the z the forward's y was made from); without it the mask
//    is y <= 0 (y = T(relu(z)), equal unless z rounds to zero in T). Against a float64 oracle either may flip
//    where |z| is within rounding of 0 (tests/test_cuda_ops.py: _kink_band).
// 2. Dgrad: per group g, GEMM over rows (n, h, w) of the input, columns c < C/groups, reduction
//    red = (r, s, k), k fastest:  dx'[n,h,w,g*Cg+c] = sum dacc[n,p,q,g*Kg+k] * w[g*Kg+k, r, s, c] over the taps
//    with h = p*sh - ph + r*dh, w = q*sw - pw + s*dw (p, q integral and in range). dx' is rounded to T (as the
//    reference's conv backward returns T), then the prologue backward: pre = x*in_scale + in_shift,
//    d = dx' zeroed where pre <= 0 if in_relu (NaN passes), grad_x = d*in_scale, grad_in_scale = sum d*x,
//    grad_in_shift = sum d (sum d*x centred on the channel's x at row 0: common.cuh).
// 3. Wgrad: per group g, GEMM over rows k < K/groups, columns red = (r, s, c), reduction over the N*P*Q output
//    pixels m:  dw[g*Kg+k, r, s, c] = sum_m dacc[m, g*Kg+k] * x'[m; r, s, c]  with x' the prologue-applied input.
//    The m range is cut into plan.splits contiguous chunks (grid.z = groups x splits); each writes its fp32
//    (fp64) partial product to workspace[split][K][R*S*Cg]; a second kernel sums the splits in order and casts.
// All per-channel and per-split reductions are fixed-order (no atomics): results are deterministic.
//
// Status: compile-checked for sm_80/sm_90 only; never run on a GPU (see csrc/README.md).
#include "common.cuh"
#include "kernels.h"

namespace pe {

// ------------------------------------------------------------------------------------------------------------
// 1. Epilogue backward. Partials: q = 0: sum dz, 1: sum dz*acc (centred), 2: sum dacc.

template <typename T>
__global__ void __launch_bounds__(kEwChannels* kEwRowLanes) conv_epilogue_bwd_kernel(const ConvEpilogueBwdArgs a) {
  using Acc = typename Cvt<T>::Acc;
  const int64_t k = int64_t(blockIdx.y) * kEwChannels + threadIdx.x;
  const bool valid_k = k < a.K;
  const T* __restrict__ gy = static_cast<const T*>(a.grad_y);
  const T* __restrict__ y = static_cast<const T*>(a.y);
  const Acc* __restrict__ acc = static_cast<const Acc*>(a.acc);
  const T* __restrict__ res = static_cast<const T*>(a.residual);
  T* __restrict__ gacc = static_cast<T*>(a.grad_acc);
  T* __restrict__ gres = static_cast<T*>(a.grad_residual);
  // dacc = dz*os (+ gs_mean + gs_m2x2*(acc_s - mean) with grad_stats).
  const bool has_gs = a.grad_stats != nullptr;
  Acc os = Acc(1), osh = Acc(0), gs_mean = Acc(0), gs_m2x2 = Acc(0), mean = Acc(0);
  if (valid_k) {
    if (a.out_scale != nullptr) os = static_cast<const Acc*>(a.out_scale)[k];
    if (a.out_shift != nullptr) osh = static_cast<const Acc*>(a.out_shift)[k];
    if (has_gs) {
      gs_mean = static_cast<const Acc*>(a.grad_stats)[k] / static_cast<Acc>(a.rows);
      gs_m2x2 = Acc(2) * static_cast<const Acc*>(a.grad_stats)[a.K + k];
      mean = static_cast<const Acc*>(a.stats)[k];
    }
  }
  Acc s_dz = Acc(0), s_dzacc = Acc(0), s_dacc = Acc(0);
  const int64_t row0 = int64_t(blockIdx.x) * kEwRowsPerBlock;
  // Centred sum (common.cuh): sum dz*(acc - acc0) here; the block holding row 0 hands acc0 to the reduction in
  // grad_out_scale, which adds acc0 * sum dz once.
  Acc acc0 = Acc(0);
  if (valid_k) {
    if (acc != nullptr) acc0 = shift_or_zero(acc[k]);
    if (blockIdx.x == 0 && threadIdx.y == 0 && a.workspace != nullptr && a.grad_out_scale != nullptr)
      static_cast<Acc*>(a.grad_out_scale)[k] = acc0;
#pragma unroll 2
    for (int t = threadIdx.y; t < kEwRowsPerBlock; t += kEwRowLanes) {
      const int64_t m = row0 + t;
      if (m >= a.rows) break;
      const int64_t off = m * a.K + k;
      Acc dz = Cvt<T>::to_acc(gy[off]);
      const Acc av = acc != nullptr ? acc[off] : Acc(0);
      if (a.out_relu) {
        Acc z;
        if (acc != nullptr) {
          // Rounded as the forward epilogue rounds it (no fma; os = 1, osh = 0 when absent are exact), so that
          // this mask is bitwise the forward's, the one its y was made with.
          z = add_rn(mul_rn(av, os), osh);
          if (res != nullptr) z = add_rn(z, Cvt<T>::to_acc(res[off]));
        } else {
          z = Cvt<T>::to_acc(y[off]);
        }
        if (z <= Acc(0)) dz = Acc(0);  // NaN z passes dz, as torch's threshold_backward
      }
      // The statistics term only with grad_stats: without it, 0 * (acc - mean) would turn a NaN (or Inf) acc into a
      // NaN dacc, and so NaN dgrad/wgrad/grad_bias where torch passes finite gradients (the ReLU backward passes
      // dz at a NaN z). acc_s = stored<T>(acc): the values the forward's statistics were taken of (identity in
      // fp32/fp64). The explicit fmas keep the rounding of the former dz*os + gs_mean + gs_m2x2*(acc - mean)
      // (contracted to these two fmas), so fp32/fp64 results are unchanged; a plain expression let the compiler
      // reuse dz*os and round twice.
      Acc da = dz * os;
      if (has_gs) da = fma(gs_m2x2, stored<T>(av) - mean, fma(dz, os, gs_mean));
      gacc[off] = Cvt<T>::from_acc(da);
      if (gres != nullptr) gres[off] = Cvt<T>::from_acc(dz);
      s_dz += dz;
      s_dzacc += dz * (av - acc0);
      s_dacc += da;
    }
  }
  const Acc sums[3] = {s_dz, s_dzacc, s_dacc};
  write_lane_partials<Acc, 3>(sums, static_cast<Acc*>(a.workspace), a.K, k, valid_k);
}

template <typename T>
cudaError_t launch_conv_epilogue_bwd(const ConvEpilogueBwdArgs& a, cudaStream_t stream) {
  using Acc = typename Cvt<T>::Acc;
  const LaunchPlan plan = plan_rows_channels(a.rows, a.K, 3, DType::F32);
  if (!plan.error.empty()) return cudaErrorInvalidConfiguration;
  if (a.K == 0) return cudaSuccess;
  if (a.grad_acc == nullptr) return cudaErrorInvalidValue;
  const bool sums = a.grad_out_scale != nullptr || a.grad_out_shift != nullptr || a.grad_bias != nullptr;
  if (a.grad_out_scale != nullptr && a.acc == nullptr) return cudaErrorInvalidValue;
  if (a.grad_stats != nullptr && (a.acc == nullptr || a.stats == nullptr)) return cudaErrorInvalidValue;
  if (a.rows > 0) {
    if (sums && a.workspace == nullptr) return cudaErrorInvalidValue;
    ConvEpilogueBwdArgs b = a;
    if (!sums) b.workspace = nullptr;
    dim3 grid(static_cast<unsigned>(plan.grid_x), static_cast<unsigned>(plan.grid_y));
    conv_epilogue_bwd_kernel<T><<<grid, dim3(kEwChannels, kEwRowLanes), 0, stream>>>(b);
    PE_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (sums) {
    PartialOuts<Acc> outs{{static_cast<Acc*>(a.grad_out_shift), static_cast<Acc*>(a.grad_out_scale),
                           static_cast<Acc*>(a.grad_bias), nullptr}};
    outs.centred = 0b010u;  // sum dz*acc: centred on acc0 (common.cuh); sum dz is q = 0
    outs.g_q = 0;
    PE_RETURN_IF_ERROR(launch_reduce_partials<Acc>(static_cast<const Acc*>(a.workspace), 3, plan.m_tiles, a.K,
                                                   outs, stream));
  }
  return cudaSuccess;
}

template cudaError_t launch_conv_epilogue_bwd<__half>(const ConvEpilogueBwdArgs&, cudaStream_t);
template cudaError_t launch_conv_epilogue_bwd<__nv_bfloat16>(const ConvEpilogueBwdArgs&, cudaStream_t);
template cudaError_t launch_conv_epilogue_bwd<float>(const ConvEpilogueBwdArgs&, cudaStream_t);
template cudaError_t launch_conv_epilogue_bwd<double>(const ConvEpilogueBwdArgs&, cudaStream_t);

cudaError_t conv_epilogue_bwd(const ConvEpilogueBwdArgs& a, DType t, cudaStream_t stream) {
  switch (t) {
    case DType::F16: return launch_conv_epilogue_bwd<__half>(a, stream);
    case DType::BF16: return launch_conv_epilogue_bwd<__nv_bfloat16>(a, stream);
    case DType::F32: return launch_conv_epilogue_bwd<float>(a, stream);
    case DType::F64: return launch_conv_epilogue_bwd<double>(a, stream);
  }
  return cudaErrorInvalidValue;
}

// ------------------------------------------------------------------------------------------------------------
// 2. Dgrad. Partials (when the prologue has parameters): q = 0: sum d*x (centred), 1: sum d; 2 x m_tiles x C.

template <typename T, Math MODE, int BM, int BN, int BK, int THREADS>
__global__ void __launch_bounds__(THREADS) conv_dgrad_kernel(const ConvDgradArgs a) {
  using Mma = TileMma<T, MODE, BM, BN, BK, THREADS>;
  using Acc = typename Cvt<T>::Acc;
  constexpr int LDS = Mma::LDS, LDC = Mma::LDC;
  __shared__ __align__(128) TileSmem<T, Acc, BM, BN, LDS, LDC> sm;
  __shared__ int64_t row_base[BM];  // n*P*Q*K of the row's image, or -1 past the last row
  __shared__ int row_h[BM], row_w[BM];  // h + pad_h, w + pad_w

  const ConvShape& s = a.shape;
  const int tid = threadIdx.x;
  const int64_t Mx = s.Mx();
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  const int n_tiles = static_cast<int>(ceil_div(s.Cg, BN));
  const int g = blockIdx.y / n_tiles;
  const int c0 = (blockIdx.y % n_tiles) * BN;
  const int Kg = static_cast<int>(s.Kg), Cg = static_cast<int>(s.Cg), S = static_cast<int>(s.S);
  const int RS = static_cast<int>(s.R * s.S);
  const int P = static_cast<int>(s.P), Q = static_cast<int>(s.Q);
  const int sh = static_cast<int>(s.stride_h), sw = static_cast<int>(s.stride_w);
  const int dh = static_cast<int>(s.dil_h), dw = static_cast<int>(s.dil_w);
  const int RSK = static_cast<int>(s.RSK());
  const int64_t C = s.C, K = s.K;
  const T* __restrict__ dacc = static_cast<const T*>(a.grad_acc);
  const T* __restrict__ w = static_cast<const T*>(a.w);

  for (int i = tid; i < BM; i += THREADS) {
    const int64_t m = m0 + i;
    if (m < Mx) {
      const int64_t HW = s.H * s.W;
      const int64_t n = m / HW;
      const int64_t hw = m - n * HW;
      const int64_t h = hw / s.W, wi = hw - (hw / s.W) * s.W;
      row_base[i] = n * s.P * s.Q * K;
      row_h[i] = static_cast<int>(h + s.pad_h);
      row_w[i] = static_cast<int>(wi + s.pad_w);
    } else {
      row_base[i] = -1;
      row_h[i] = 0;
      row_w[i] = 0;
    }
  }
  __syncthreads();

  const T zero = Cvt<T>::from_acc(Acc(0));
  auto load_a = [&](int red0) {
    return [&, red0](int i, int kk) -> T {
      const int red = red0 + kk;
      const int64_t base = row_base[i];
      if (red >= RSK || base < 0) return zero;
      const int rs = red / Kg;
      const int k = red - rs * Kg;
      const int r = rs / S, ss = rs - (rs / S) * S;
      const int th = row_h[i] - r * dh, tw = row_w[i] - ss * dw;
      if (th < 0 || tw < 0) return zero;
      const int p = th / sh, q = tw / sw;
      if (p * sh != th || q * sw != tw || p >= P || q >= Q) return zero;
      return dacc[base + (int64_t(p) * Q + q) * K + g * Kg + k];
    };
  };
  // B[red, c] = w[g*Kg + k, r, s, c]: contiguous along c, so consecutive threads walk columns.
  auto load_b = [&](int red0) {
    return [&, red0](int j, int kk) -> T {
      const int red = red0 + kk;
      const int c = c0 + j;
      if (red >= RSK || c >= Cg) return zero;
      const int rs = red / Kg;
      const int k = red - rs * Kg;
      return w[(int64_t(g * Kg + k) * RS + rs) * Cg + c];
    };
  };

  Mma mma;
  mma.zero();
  for (int red0 = 0; red0 < RSK; red0 += BK) {
    fill_tile<BM, BK, LDS, THREADS, true>(sm.ab.a, load_a(red0));
    fill_tile<BN, BK, LDS, THREADS, false>(sm.ab.b, load_b(red0));
    __syncthreads();
    mma.step(sm.ab.a, sm.ab.b);
    __syncthreads();
  }
  mma.store(sm.c);
  __syncthreads();

  const T* __restrict__ x = static_cast<const T*>(a.x);
  const Acc* __restrict__ in_scale = static_cast<const Acc*>(a.in_scale);
  const Acc* __restrict__ in_shift = static_cast<const Acc*>(a.in_shift);
  const bool prologue = in_scale != nullptr || in_shift != nullptr || a.in_relu;
  T* __restrict__ gx = static_cast<T*>(a.grad_x);
  for (int e = tid; e < BM * BN; e += THREADS) {
    const int i = e / BN, j = e % BN;
    const int64_t m = m0 + i;
    const int c = c0 + j;
    if (m >= Mx || c >= Cg) continue;
    const int gc = g * Cg + c;
    const int64_t off = m * C + gc;
    // dx' as the reference's conv backward returns it: rounded to T.
    Acc d = Cvt<T>::to_acc(Cvt<T>::from_acc(sm.c[i * LDC + j]));
    if (prologue) {
      const Acc sc = in_scale != nullptr ? in_scale[gc] : Acc(1);
      if (a.in_relu) {
        const Acc pre = Cvt<T>::to_acc(x[off]) * sc + (in_shift != nullptr ? in_shift[gc] : Acc(0));
        if (pre <= Acc(0)) d = Acc(0);  // NaN pre passes d, as torch's threshold_backward
      }
      sm.c[i * LDC + j] = d;  // masked d, for the column sums below (owned by this thread)
      d = d * sc;
    }
    gx[off] = Cvt<T>::from_acc(d);
  }

  if (a.workspace != nullptr) {
    __syncthreads();
    Acc* __restrict__ part = static_cast<Acc*>(a.workspace);
    const int64_t m_tiles = gridDim.x;
    const int rows = static_cast<int>(Mx - m0 < BM ? Mx - m0 : BM);
    for (int j = tid; j < BN; j += THREADS) {
      const int c = c0 + j;
      if (c >= Cg) continue;
      const int gc = g * Cg + c;
      // Centred (common.cuh): sum d*(x - x0) here, x0 = the channel's x at row 0 (0 if not finite); the tile
      // holding row 0 hands x0 to the reduction in grad_in_scale, which adds x0 * sum d once.
      const Acc x0 = shift_or_zero(Cvt<T>::to_acc(x[gc]));
      if (blockIdx.x == 0 && a.grad_in_scale != nullptr) static_cast<Acc*>(a.grad_in_scale)[gc] = x0;
      Acc s_dx = Acc(0), s_d = Acc(0);
      for (int i = 0; i < rows; ++i) {
        const Acc d = sm.c[i * LDC + j];
        s_dx += d * (Cvt<T>::to_acc(x[(m0 + i) * C + gc]) - x0);
        s_d += d;
      }
      part[int64_t(blockIdx.x) * C + gc] = s_dx;
      part[(m_tiles + blockIdx.x) * C + gc] = s_d;
    }
  }
}

template <typename T, Math MODE, int TILE>
cudaError_t launch_conv_dgrad(const ConvDgradArgs& a, const LaunchPlan& plan, cudaStream_t stream) {
  constexpr TileShape ts = TILE == 2 ? kTileSIMT64x64 : kTileTC64x64;
  using Acc = typename Cvt<T>::Acc;
  dim3 grid(static_cast<unsigned>(plan.grid_x), static_cast<unsigned>(plan.grid_y), 1);
  conv_dgrad_kernel<T, MODE, ts.bm, ts.bn, ts.bk, ts.threads><<<grid, ts.threads, 0, stream>>>(a);
  PE_RETURN_IF_ERROR(cudaGetLastError());
  if (a.workspace != nullptr) {
    PartialOuts<Acc> outs{{static_cast<Acc*>(a.grad_in_scale), static_cast<Acc*>(a.grad_in_shift), nullptr, nullptr}};
    outs.centred = 0b01u;  // sum d*x: centred on x0 (common.cuh); sum d is q = 1
    outs.g_q = 1;
    PE_RETURN_IF_ERROR(launch_reduce_partials<Acc>(static_cast<const Acc*>(a.workspace), 2, plan.m_tiles,
                                                   a.shape.C, outs, stream));
  }
  return cudaSuccess;
}

template cudaError_t launch_conv_dgrad<__half, Math::WMMA16, 0>(const ConvDgradArgs&, const LaunchPlan&,
                                                                cudaStream_t);
template cudaError_t launch_conv_dgrad<__nv_bfloat16, Math::WMMA16, 0>(const ConvDgradArgs&, const LaunchPlan&,
                                                                       cudaStream_t);
template cudaError_t launch_conv_dgrad<float, Math::TF32, 0>(const ConvDgradArgs&, const LaunchPlan&, cudaStream_t);
template cudaError_t launch_conv_dgrad<float, Math::SIMT, 2>(const ConvDgradArgs&, const LaunchPlan&, cudaStream_t);
template cudaError_t launch_conv_dgrad<double, Math::SIMT, 2>(const ConvDgradArgs&, const LaunchPlan&, cudaStream_t);

cudaError_t conv_dgrad(const ConvDgradArgs& a_in, DType t, bool allow_tf32, cudaStream_t stream) {
  ConvDgradArgs a = a_in;
  const bool partials = a.grad_in_scale != nullptr || a.grad_in_shift != nullptr;
  if (!partials) a.workspace = nullptr;
  const LaunchPlan plan = plan_conv_dgrad(a.shape, t, allow_tf32, partials);
  if (!plan.error.empty()) return cudaErrorInvalidConfiguration;
  if (a.grad_x == nullptr) return cudaErrorInvalidValue;
  if (partials && a.workspace == nullptr) return cudaErrorInvalidValue;
  if (a.shape.Mx() == 0) {
    PE_RETURN_IF_ERROR(zero_bytes(a.grad_in_scale, a.shape.C * acc_bytes(t), stream));
    return zero_bytes(a.grad_in_shift, a.shape.C * acc_bytes(t), stream);
  }
  switch (t) {
    case DType::F16: return launch_conv_dgrad<__half, Math::WMMA16, 0>(a, plan, stream);
    case DType::BF16: return launch_conv_dgrad<__nv_bfloat16, Math::WMMA16, 0>(a, plan, stream);
    case DType::F32:
      if (select_math(t, allow_tf32) == Math::TF32) return launch_conv_dgrad<float, Math::TF32, 0>(a, plan, stream);
      return launch_conv_dgrad<float, Math::SIMT, 2>(a, plan, stream);
    case DType::F64: return launch_conv_dgrad<double, Math::SIMT, 2>(a, plan, stream);
  }
  return cudaErrorInvalidValue;
}

// ------------------------------------------------------------------------------------------------------------
// 3. Wgrad.

template <typename T, Math MODE, int BM, int BN, int BK, int THREADS>
__global__ void __launch_bounds__(THREADS) conv_wgrad_kernel(const ConvWgradArgs a, const int64_t splits,
                                                              const int64_t chunk) {
  using Mma = TileMma<T, MODE, BM, BN, BK, THREADS>;
  using Acc = typename Cvt<T>::Acc;
  constexpr int LDS = Mma::LDS, LDC = Mma::LDC;
  __shared__ __align__(128) TileSmem<T, Acc, BM, BN, LDS, LDC> sm;
  __shared__ int64_t red_base[BK];  // per reduction row m of this step: n*H*W*C, or -1 past the range
  __shared__ int red_h[BK], red_w[BK];

  const ConvShape& s = a.shape;
  const int tid = threadIdx.x;
  const int g = static_cast<int>(blockIdx.z / splits);
  const int64_t split = blockIdx.z - int64_t(g) * splits;
  const int k0 = blockIdx.y * BM;   // rows: output channels within the group
  const int col0 = blockIdx.x * BN;  // columns: (r, s, c) within the group
  const int Kg = static_cast<int>(s.Kg);
  const int RSC = static_cast<int>(s.RSC());
  const int64_t K = s.K, M = s.M();
  const int64_t m_begin = split * chunk;
  const int64_t m_end = m_begin + chunk < M ? m_begin + chunk : M;

  const T* __restrict__ dacc = static_cast<const T*>(a.grad_acc);
  const InputGather<T> gather(s, a.x, a.in_scale, a.in_shift, a.in_relu);
  const T zero = Cvt<T>::from_acc(Acc(0));

  // A[k, m] = dacc[m, g*Kg + k]: contiguous along the row index k, so consecutive threads walk rows.
  auto load_a = [&](int64_t mr) {
    return [&, mr](int i, int kk) -> T {
      const int k = k0 + i;
      const int64_t m = mr + kk;
      if (k >= Kg || m >= m_end) return zero;
      return dacc[m * K + g * Kg + k];
    };
  };
  // B[m, col] = x'(m; r, s, c): contiguous along c, so consecutive threads walk columns.
  auto load_b = [&](int64_t) {
    return [&](int j, int kk) -> T { return gather(red_base[kk], red_h[kk], red_w[kk], col0 + j, g); };
  };

  Mma mma;
  mma.zero();
  for (int64_t mr = m_begin; mr < m_end; mr += BK) {
    // The previous step ended with __syncthreads, so the table can be rewritten.
    for (int kk = tid; kk < BK; kk += THREADS) {
      const int64_t m = mr + kk;
      if (m < m_end) {
        output_pixel_origin(s, m, red_base[kk], red_h[kk], red_w[kk]);
      } else {
        red_base[kk] = -1;
        red_h[kk] = 0;
        red_w[kk] = 0;
      }
    }
    __syncthreads();
    fill_tile<BM, BK, LDS, THREADS, false>(sm.ab.a, load_a(mr));
    fill_tile<BN, BK, LDS, THREADS, false>(sm.ab.b, load_b(mr));
    __syncthreads();
    mma.step(sm.ab.a, sm.ab.b);
    __syncthreads();
  }
  mma.store(sm.c);
  __syncthreads();

  Acc* __restrict__ ws = static_cast<Acc*>(a.workspace);
  for (int e = tid; e < BM * BN; e += THREADS) {
    const int i = e / BN, j = e % BN;
    const int k = k0 + i, col = col0 + j;
    if (k >= Kg || col >= RSC) continue;
    ws[(split * K + g * Kg + k) * RSC + col] = sm.c[i * LDC + j];
  }
}

template <typename T>
__global__ void wgrad_reduce_kernel(const typename Cvt<T>::Acc* __restrict__ ws, int64_t splits, int64_t numel,
                                    T* __restrict__ grad_w) {
  using Acc = typename Cvt<T>::Acc;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel;
       idx += int64_t(gridDim.x) * blockDim.x) {
    Acc v = Acc(0);
    for (int64_t sp = 0; sp < splits; ++sp) v += ws[sp * numel + idx];
    grad_w[idx] = Cvt<T>::from_acc(v);
  }
}

template <typename T, Math MODE, int TILE>
cudaError_t launch_conv_wgrad(const ConvWgradArgs& a, const LaunchPlan& plan, cudaStream_t stream) {
  constexpr TileShape ts = TILE == 2 ? kTileSIMT64x64 : kTileTC64x64;
  using Acc = typename Cvt<T>::Acc;
  dim3 grid(static_cast<unsigned>(plan.grid_x), static_cast<unsigned>(plan.grid_y),
            static_cast<unsigned>(plan.grid_z));
  conv_wgrad_kernel<T, MODE, ts.bm, ts.bn, ts.bk, ts.threads>
      <<<grid, ts.threads, 0, stream>>>(a, plan.splits, plan.chunk);
  PE_RETURN_IF_ERROR(cudaGetLastError());
  const int64_t numel = a.shape.K * a.shape.RSC();
  const int64_t blocks = std::min<int64_t>(ceil_div(numel, 256), 65535);
  wgrad_reduce_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      static_cast<const Acc*>(a.workspace), plan.splits, numel, static_cast<T*>(a.grad_w));
  return cudaGetLastError();
}

template cudaError_t launch_conv_wgrad<__half, Math::WMMA16, 0>(const ConvWgradArgs&, const LaunchPlan&,
                                                                cudaStream_t);
template cudaError_t launch_conv_wgrad<__nv_bfloat16, Math::WMMA16, 0>(const ConvWgradArgs&, const LaunchPlan&,
                                                                       cudaStream_t);
template cudaError_t launch_conv_wgrad<float, Math::TF32, 0>(const ConvWgradArgs&, const LaunchPlan&, cudaStream_t);
template cudaError_t launch_conv_wgrad<float, Math::SIMT, 2>(const ConvWgradArgs&, const LaunchPlan&, cudaStream_t);
template cudaError_t launch_conv_wgrad<double, Math::SIMT, 2>(const ConvWgradArgs&, const LaunchPlan&, cudaStream_t);

cudaError_t conv_wgrad(const ConvWgradArgs& a, DType t, bool allow_tf32, cudaStream_t stream) {
  const LaunchPlan plan = plan_conv_wgrad(a.shape, t, allow_tf32);
  if (!plan.error.empty()) return cudaErrorInvalidConfiguration;
  if (a.grad_w == nullptr || a.workspace == nullptr) return cudaErrorInvalidValue;
  // M == 0 still runs: every split writes zeros, so grad_w = 0.
  switch (t) {
    case DType::F16: return launch_conv_wgrad<__half, Math::WMMA16, 0>(a, plan, stream);
    case DType::BF16: return launch_conv_wgrad<__nv_bfloat16, Math::WMMA16, 0>(a, plan, stream);
    case DType::F32:
      if (select_math(t, allow_tf32) == Math::TF32) return launch_conv_wgrad<float, Math::TF32, 0>(a, plan, stream);
      return launch_conv_wgrad<float, Math::SIMT, 2>(a, plan, stream);
    case DType::F64: return launch_conv_wgrad<double, Math::SIMT, 2>(a, plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pe
