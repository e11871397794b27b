// Device building blocks shared by the conv and BN kernels (torch-free; included by the .cu files only).
//
//  * Cvt<T>: conversions between the activation type T and its accumulator type (fp32; fp64 for double).
//  * TileMma<T, MODE, BM, BN, BK, THREADS>: multiplies one BM x BK tile of A by one BK x BN tile of B held in
//    shared memory (A as a[row][k], B as b[col][k], both with leading dimension LDS) into per-thread
//    accumulators, and stores the BM x BN result as Acc into shared memory with leading dimension LDC.
//    MODE WMMA16: fp16/bf16 WMMA m16n16k16 (fp32 accumulate); TF32: WMMA m16n16k8 TF32; SIMT: CUDA-core FMA.
//  * fill_tile: cooperative gather of a tile through a functor (bounds and masks live in the functor).
//  * reduce_partials_kernel: fixed-order sum of per-tile partials (deterministic per-channel reductions).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "tiling.h"

namespace pe {

template <typename T>
struct Cvt {  // float (fp32 and TF32 paths)
  using Acc = float;
  static __device__ __forceinline__ float to_acc(T v) { return v; }
  static __device__ __forceinline__ T from_acc(float v) { return v; }
};
template <>
struct Cvt<__half> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Cvt<double> {
  using Acc = double;
  static __device__ __forceinline__ double to_acc(double v) { return v; }
  static __device__ __forceinline__ double from_acc(double v) { return v; }
};

// acc as it is stored in the activation type T and read back: fp16/bf16 round to T; the identity for fp32 and
// fp64. The BatchNorm statistics (and the backward's acc - mean) are taken of these values, since the BN apply
// reads the stored (rounded) y: statistics of the unrounded acc would turn the rounding into (y - mean) * invstd,
// up to 1/sqrt(eps) times it at a constant channel (.lab/CONTRACT.md, issue 10).
template <typename T>
__device__ __forceinline__ typename Cvt<T>::Acc stored(typename Cvt<T>::Acc v) {
  return Cvt<T>::to_acc(Cvt<T>::from_acc(v));
}

// Rounded products and sums the compiler never contracts into an fma. The forward epilogue and the backward's
// recomputation of z = acc*out_scale + out_shift + residual both use them, so that the backward's ReLU mask from
// the recomputed acc is bitwise the forward's (a contracted fma there could decide z <= 0 differently when
// acc*out_scale rounds to -out_shift).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <typename A>
__device__ __forceinline__ A relu(A v) {
  return v < A(0) ? A(0) : v;  // NaN stays NaN, as torch.relu
}

// The shift of a centred scale-gradient sum (below): v itself where finite, else 0 (then the plain sum).
template <typename A>
__device__ __forceinline__ A shift_or_zero(A v) {
  return isfinite(v) ? v : A(0);
}

// ---------------------------------------------------------------------------------------------------------
// Tile multiply.

template <typename T, Math MODE, int BM, int BN, int BK, int THREADS>
struct TileMma;

// Tensor cores, fp16 / bf16 inputs, fp32 accumulators. 4 warps (or BM*BN/1024), each owning a 32x32 sub-tile
// as 2x2 fragments of 16x16. Pointer/ldm requirements of load/store_matrix_sync: every fragment pointer is a
// multiple of 32 bytes from a 128-byte-aligned base (row offsets are multiples of 16 rows x LDS, LDS = BK + 8
// elements = 80 bytes for BK = 32 -> 1280 bytes per 16 rows; column offsets multiples of 16 elements).
template <typename T, int BM, int BN, int BK, int THREADS>
struct TileMma<T, Math::WMMA16, BM, BN, BK, THREADS> {
  using Acc = float;
  static constexpr int LDS = BK + 8;
  static constexpr int LDC = BN + 4;
  static constexpr int WARPS_N = BN / 32;
  static constexpr int WARPS_M = BM / 32;
  static_assert(WARPS_M * WARPS_N * 32 == THREADS, "one warp per 32x32 sub-tile");
  static_assert(BK % 16 == 0, "BK must be a multiple of the WMMA k (16)");
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(c[i][j], 0.0f);
  }
  __device__ __forceinline__ void step(const T* a, const T* b) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], a + (wm * 32 + i * 16) * LDS + kk, LDS);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], b + (wn * 32 + j * 16) * LDS + kk, LDS);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(c[i][j], fa[i], fb[j], c[i][j]);
    }
  }
  __device__ __forceinline__ void store(float* cs) {
    const int warp = threadIdx.x / 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, c[i][j], LDC,
                                        nvcuda::wmma::mem_row_major);
  }
};

// Tensor cores, fp32 inputs rounded to TF32, fp32 accumulators (m16n16k8). LDS = BK + 4 floats (16-byte
// multiple as ldm requires; 16 rows x 144 bytes = 2304 = 72 x 32 bytes).
template <int BM, int BN, int BK, int THREADS>
struct TileMma<float, Math::TF32, BM, BN, BK, THREADS> {
  using Acc = float;
  static constexpr int LDS = BK + 4;
  static constexpr int LDC = BN + 4;
  static constexpr int WARPS_N = BN / 32;
  static constexpr int WARPS_M = BM / 32;
  static_assert(WARPS_M * WARPS_N * 32 == THREADS, "one warp per 32x32 sub-tile");
  static_assert(BK % 8 == 0, "BK must be a multiple of the TF32 WMMA k (8)");
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float> c[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(c[i][j], 0.0f);
  }
  __device__ __forceinline__ void step(const float* a, const float* b) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fa[i], a + (wm * 32 + i * 16) * LDS + kk, LDS);
#pragma unroll
        for (int t = 0; t < fa[i].num_elements; ++t) fa[i].x[t] = wmma::__float_to_tf32(fa[i].x[t]);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(fb[j], b + (wn * 32 + j * 16) * LDS + kk, LDS);
#pragma unroll
        for (int t = 0; t < fb[j].num_elements; ++t) fb[j].x[t] = wmma::__float_to_tf32(fb[j].x[t]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(c[i][j], fa[i], fb[j], c[i][j]);
    }
  }
  __device__ __forceinline__ void store(float* cs) {
    const int warp = threadIdx.x / 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, c[i][j], LDC,
                                        nvcuda::wmma::mem_row_major);
  }
};

// CUDA cores: 256 threads as 16x16; thread (tx, ty) owns rows ty + 16*i and columns tx + 16*j. LDS = BK + 1
// keeps the 16 column reads of a half-warp on distinct banks; the row reads are broadcasts.
template <typename T, int BM, int BN, int BK, int THREADS>
struct TileMma<T, Math::SIMT, BM, BN, BK, THREADS> {
  using Acc = typename Cvt<T>::Acc;
  static constexpr int LDS = BK + 1;
  static constexpr int LDC = BN + 1;
  static_assert(THREADS == 256, "SIMT tile uses 16x16 threads");
  static_assert(BM % 16 == 0 && BN % 16 == 0, "SIMT tile must be a multiple of 16");
  static constexpr int TM = BM / 16, TN = BN / 16;
  Acc c[TM][TN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) c[i][j] = Acc(0);
  }
  __device__ __forceinline__ void step(const T* a, const T* b) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll 4
    for (int kk = 0; kk < BK; ++kk) {
      Acc av[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) av[i] = Cvt<T>::to_acc(a[(ty + 16 * i) * LDS + kk]);
#pragma unroll
      for (int j = 0; j < TN; ++j) bv[j] = Cvt<T>::to_acc(b[(tx + 16 * j) * LDS + kk]);
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) c[i][j] = fma(av[i], bv[j], c[i][j]);
    }
  }
  __device__ __forceinline__ void store(Acc* cs) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) cs[(ty + 16 * i) * LDC + tx + 16 * j] = c[i][j];
  }
};

// Shared memory of one GEMM tile: the A/B staging buffers and the Acc result tile alias each other (the
// result is stored only after the last __syncthreads of the main loop).
template <typename T, typename Acc, int BM, int BN, int LDS, int LDC>
union TileSmem {
  struct {
    T a[BM * LDS];
    T b[BN * LDS];
  } ab;
  Acc c[BM * LDC];
};

// ---------------------------------------------------------------------------------------------------------
// Implicit-GEMM gathers shared by forward (A operand) and wgrad (B operand).

// Output pixel m = (n, p, q) -> offset of image n in x (n*H*W*C) and the top-left input coordinate of its
// receptive field (p*sh - ph, q*sw - pw). m must be < N*P*Q.
__device__ __forceinline__ void output_pixel_origin(const ConvShape& s, int64_t m, int64_t& base, int& h0, int& w0) {
  const int64_t PQ = s.P * s.Q;
  const int64_t n = m / PQ;
  const int64_t pq = m - n * PQ;
  const int64_t p = pq / s.Q, q = pq - (pq / s.Q) * s.Q;
  base = n * s.H * s.W * s.C;
  h0 = static_cast<int>(p * s.stride_h - s.pad_h);
  w0 = static_cast<int>(q * s.stride_w - s.pad_w);
}

// x'(pixel; red) for red = (r, s, c), c fastest, in group g: the prologue-applied input, T(relu?(x*in_scale +
// in_shift)) computed in Acc, or zero outside the image (padding stays zero) or past the reduction length.
template <typename T>
struct InputGather {
  using Acc = typename Cvt<T>::Acc;
  const T* __restrict__ x;
  const Acc* __restrict__ in_scale;
  const Acc* __restrict__ in_shift;
  bool in_relu, prologue;
  int H, W, S, Cg, RSC, dh, dw;
  int64_t C;

  __device__ __forceinline__ InputGather(const ConvShape& s, const void* x_, const void* in_scale_,
                                         const void* in_shift_, bool in_relu_)
      : x(static_cast<const T*>(x_)),
        in_scale(static_cast<const Acc*>(in_scale_)),
        in_shift(static_cast<const Acc*>(in_shift_)),
        in_relu(in_relu_),
        prologue(in_scale_ != nullptr || in_shift_ != nullptr || in_relu_),
        H(static_cast<int>(s.H)), W(static_cast<int>(s.W)), S(static_cast<int>(s.S)), Cg(static_cast<int>(s.Cg)),
        RSC(static_cast<int>(s.RSC())), dh(static_cast<int>(s.dil_h)), dw(static_cast<int>(s.dil_w)), C(s.C) {}

  // base < 0 marks a row past the end.
  __device__ __forceinline__ T operator()(int64_t base, int h0, int w0, int red, int g) const {
    const T zero = Cvt<T>::from_acc(Acc(0));
    if (red >= RSC || base < 0) return zero;
    const int rs = red / Cg;
    const int c = red - rs * Cg;
    const int r = rs / S, ss = rs - (rs / S) * S;
    const int h = h0 + r * dh, wi = w0 + ss * dw;
    if (h < 0 || h >= H || wi < 0 || wi >= W) return zero;
    const int gc = g * Cg + c;
    T v = x[base + (int64_t(h) * W + wi) * C + gc];
    if (prologue) {
      Acc t = Cvt<T>::to_acc(v);
      if (in_scale != nullptr) t = t * in_scale[gc];
      if (in_shift != nullptr) t = t + in_shift[gc];
      if (in_relu) t = relu(t);
      v = Cvt<T>::from_acc(t);
    }
    return v;
  }
};

// Centred scale-gradient sums. A BatchNorm scale gradient sum_rows g*v (v: the normalised value's input) reaches
// the BN weight as sum g*v - mean * sum g (bn_finalize backward): formed plainly, the fp32 rounding of sum g*v
// (~ rows * u * |mean| * sum |g|) survives that cancellation and is multiplied by invstd (up to 1/sqrt(eps) at a
// constant channel, where the exact answer is 0). So these sums are formed around a shift v0 per channel, as
// reference.sum_centred / triton bn_apply.sum_centred do (with the mean there): the kernels accumulate
// sum g*(v - v0) in their usual per-lane / per-tile partials, and the fixed-order reduction adds v0 * (sum g)
// once, with sum g summed from the same partials in the same order as the sum g output (bitwise that value). At a
// constant channel v - v0 = 0 at every row and the result is fl(v0 * sum g): what the backward's
// mean * sum g subtracts, exactly when the mean is v0. v0 = the channel's value at row 0, or 0 where that is not
// finite (shift_or_zero: then the plain sum, so a NaN/Inf there poisons nothing it did not before); v0 = 0 adds
// nothing (not 0 * sum g: an Inf sum g stays out). The block (tile) holding row 0 writes v0 into the output
// vector; reduce_partials_kernel reads it back (stream order) for the quantities marked in PartialOuts::centred.

// Row-block partials of the elementwise kernels (block = kEwChannels x kEwRowLanes threads): each thread holds
// NQ sums over its rows; lanes are combined in lane order and written to part[(q*row_blocks + block)*K + k].
// Must be reached by every thread of the block (contains __syncthreads).
template <typename Acc, int NQ>
__device__ __forceinline__ void write_lane_partials(const Acc (&sums)[NQ], Acc* part, int64_t K, int64_t k,
                                                    bool valid_k) {
  __shared__ Acc red[NQ][kEwRowLanes][kEwChannels];
#pragma unroll
  for (int q = 0; q < NQ; ++q) red[q][threadIdx.y][threadIdx.x] = sums[q];
  __syncthreads();
  if (threadIdx.y == 0 && valid_k && part != nullptr) {
    const int64_t row_blocks = gridDim.x;
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
      Acc s = Acc(0);
#pragma unroll
      for (int l = 0; l < kEwRowLanes; ++l) s += red[q][l][threadIdx.x];
      part[(q * row_blocks + blockIdx.x) * K + k] = s;
    }
  }
}

// Cooperative gather of a ROWS x RED tile into dst[row * LDS + k] = f(row, k). RED_FASTEST picks which index
// consecutive threads walk (match it to the contiguous axis of the global tensor for coalescing).
template <int ROWS, int RED, int LDS, int THREADS, bool RED_FASTEST, typename T, typename F>
__device__ __forceinline__ void fill_tile(T* dst, const F& f) {
#pragma unroll 4
  for (int e = threadIdx.x; e < ROWS * RED; e += THREADS) {
    const int r = RED_FASTEST ? e / RED : e % ROWS;
    const int k = RED_FASTEST ? e % RED : e / ROWS;
    dst[r * LDS + k] = f(r, k);
  }
}

// out_q[k] = sum_{t=0}^{T-1} part[(q*T + t)*K + k] for q < nq, in increasing t (deterministic). outs[q] may be
// nullptr (that quantity is not wanted). A quantity q with bit q of `centred` set is a centred sum (above): its
// partials hold g*(v - v0), out_q[k] holds v0 on entry (written by the producing kernel), and
// out_q[k] = sum + v0 * sum_t part[(g_q*T + t)*K + k] (the sum of g, in the same order). grid (ceil(K/256), nq),
// block 256.
template <typename Acc>
struct PartialOuts {
  Acc* out[4];
  unsigned centred = 0;  // bit q: quantity q is centred
  int g_q = 0;           // the quantity holding the sum of g (for the centred ones)
};
template <typename Acc>
__global__ void reduce_partials_kernel(const Acc* __restrict__ part, int64_t T, int64_t K, PartialOuts<Acc> outs) {
  const int q = blockIdx.y;
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  Acc* out = outs.out[q];
  if (k >= K || out == nullptr) return;
  const Acc* p = part + int64_t(q) * T * K + k;
  Acc s = Acc(0);
  for (int64_t t = 0; t < T; ++t) s += p[t * K];
  if (T > 0 && ((outs.centred >> q) & 1u)) {  // T = 0: no kernel wrote v0; the plain (empty) sum
    const Acc v0 = out[k];
    if (v0 != Acc(0)) {
      const Acc* pg = part + int64_t(outs.g_q) * T * K + k;
      Acc s_g = Acc(0);
      for (int64_t t = 0; t < T; ++t) s_g += pg[t * K];
      s = s + v0 * s_g;
    }
  }
  out[k] = s;
}

template <typename Acc>
inline cudaError_t launch_reduce_partials(const Acc* part, int nq, int64_t T, int64_t K, PartialOuts<Acc> outs,
                                          cudaStream_t stream) {
  if (K <= 0 || nq <= 0) return cudaSuccess;
  dim3 grid(static_cast<unsigned>(ceil_div(K, 256)), static_cast<unsigned>(nq));
  reduce_partials_kernel<Acc><<<grid, 256, 0, stream>>>(part, T, K, outs);
  return cudaGetLastError();
}

// Zero-fill helper for outputs of empty problems (N = 0).
inline cudaError_t zero_bytes(void* p, int64_t bytes, cudaStream_t stream) {
  if (p == nullptr || bytes <= 0) return cudaSuccess;
  return cudaMemsetAsync(p, 0, static_cast<size_t>(bytes), stream);
}

#define PE_RETURN_IF_ERROR(expr)            \
  do {                                      \
    cudaError_t pe_err_ = (expr);           \
    if (pe_err_ != cudaSuccess) return pe_err_; \
  } while (0)

}  // namespace pe
