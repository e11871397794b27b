// Pure shape arithmetic and argument validation of the conv kernel family.
//
// Torch-free and CUDA-free on the host side: this header compiles with plain g++ (it is tested on CPU through
// csrc/host_capi.cpp + ctypes) and with nvcc (the structs are passed to kernels by value).
// Layouts: activations NHWC (channels_last), weights KRSC (= a (K, C/groups, R, S) tensor in channels_last).
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

#if defined(__CUDACC__)
#define PE_HD __host__ __device__ __forceinline__
#else
#define PE_HD inline
#endif

namespace pe {

// Activation dtype handled by a launch. Per-channel vectors and statistics are fp32 (fp64 for F64).
enum class DType : int { F16 = 0, BF16 = 1, F32 = 2, F64 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::F32: return "float32";
    case DType::F64: return "float64";
  }
  return "unknown";
}
inline int64_t dtype_bytes(DType t) { return t == DType::F64 ? 8 : (t == DType::F32 ? 4 : 2); }
// Bytes of the accumulator / per-channel type (fp64 only for fp64 activations).
inline int64_t acc_bytes(DType t) { return t == DType::F64 ? 8 : 4; }

PE_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Output size of a convolution along one axis (floor division, as torch). <= 0 means invalid.
PE_HD int64_t conv_out_size(int64_t in, int64_t pad, int64_t dil, int64_t k, int64_t stride) {
  const int64_t span = in + 2 * pad - dil * (k - 1) - 1;
  if (span < 0 || stride <= 0) return 0;
  return span / stride + 1;
}

// Everything a conv kernel needs to know about shapes; passed by value to kernels.
struct ConvShape {
  int64_t N, C, H, W;  // input x (N, C, H, W), stored NHWC
  int64_t K, R, S;     // weight (K, C/groups, R, S), stored KRSC
  int64_t P, Q;        // output (N, K, P, Q), stored NPQK
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t groups, Cg, Kg;  // channels per group: Cg = C/groups (input), Kg = K/groups (output)

  PE_HD int64_t M() const { return N * P * Q; }          // forward GEMM rows (output pixels)
  PE_HD int64_t Mx() const { return N * H * W; }         // dgrad GEMM rows (input pixels)
  PE_HD int64_t RSC() const { return R * S * Cg; }        // forward reduction length per group
  PE_HD int64_t RSK() const { return R * S * Kg; }        // dgrad reduction length per group
};

// Fills `s` from the raw arguments (computing P, Q, Cg, Kg). Returns "" when valid, else a message naming the
// offending values. Limits keep per-element index pieces within int32 where kernels use int32 (the reduction
// index and the channel index); flat offsets are always int64.
inline std::string make_conv_shape(ConvShape& s, int64_t N, int64_t C, int64_t H, int64_t W, int64_t K,
                                   int64_t Cw, int64_t R, int64_t S, int64_t stride_h, int64_t stride_w,
                                   int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups) {
  char buf[512];
  s = ConvShape{};
  if (N < 0 || C <= 0 || H <= 0 || W <= 0) {
    std::snprintf(buf, sizeof buf, "input shape must be (N>=0, C>0, H>0, W>0), got (%lld, %lld, %lld, %lld)",
                  (long long)N, (long long)C, (long long)H, (long long)W);
    return buf;
  }
  if (K <= 0 || Cw <= 0 || R <= 0 || S <= 0) {
    std::snprintf(buf, sizeof buf, "weight shape must be positive, got (%lld, %lld, %lld, %lld)", (long long)K,
                  (long long)Cw, (long long)R, (long long)S);
    return buf;
  }
  if (groups <= 0) {
    std::snprintf(buf, sizeof buf, "groups must be positive, got %lld", (long long)groups);
    return buf;
  }
  if (C % groups != 0 || K % groups != 0) {
    std::snprintf(buf, sizeof buf, "in_channels=%lld and out_channels=%lld must be divisible by groups=%lld",
                  (long long)C, (long long)K, (long long)groups);
    return buf;
  }
  if (Cw * groups != C) {
    std::snprintf(buf, sizeof buf,
                  "weight of shape (%lld, %lld, %lld, %lld) with groups=%lld expects %lld input channels, got %lld",
                  (long long)K, (long long)Cw, (long long)R, (long long)S, (long long)groups,
                  (long long)(Cw * groups), (long long)C);
    return buf;
  }
  if (stride_h <= 0 || stride_w <= 0 || dil_h <= 0 || dil_w <= 0 || pad_h < 0 || pad_w < 0) {
    std::snprintf(buf, sizeof buf,
                  "stride and dilation must be positive and padding non-negative, got stride=(%lld, %lld) "
                  "padding=(%lld, %lld) dilation=(%lld, %lld)",
                  (long long)stride_h, (long long)stride_w, (long long)pad_h, (long long)pad_w, (long long)dil_h,
                  (long long)dil_w);
    return buf;
  }
  const int64_t P = conv_out_size(H, pad_h, dil_h, R, stride_h);
  const int64_t Q = conv_out_size(W, pad_w, dil_w, S, stride_w);
  if (P <= 0 || Q <= 0) {
    std::snprintf(buf, sizeof buf,
                  "output size is empty: input (H=%lld, W=%lld), kernel (%lld, %lld), padding (%lld, %lld), "
                  "dilation (%lld, %lld), stride (%lld, %lld) give (P=%lld, Q=%lld)",
                  (long long)H, (long long)W, (long long)R, (long long)S, (long long)pad_h, (long long)pad_w,
                  (long long)dil_h, (long long)dil_w, (long long)stride_h, (long long)stride_w, (long long)P,
                  (long long)Q);
    return buf;
  }
  const int64_t kInt32Max = 2147483647LL;
  if (C > kInt32Max || K > kInt32Max || R * S * Cw > kInt32Max || R * S * (K / groups) > kInt32Max ||
      H * W > kInt32Max || P * Q > kInt32Max) {
    std::snprintf(buf, sizeof buf,
                  "shape too large for the kernels' int32 channel/reduction/plane indices: C=%lld K=%lld "
                  "R*S*C/groups=%lld H*W=%lld P*Q=%lld (each must be < 2^31)",
                  (long long)C, (long long)K, (long long)(R * S * Cw), (long long)(H * W), (long long)(P * Q));
    return buf;
  }
  s.N = N; s.C = C; s.H = H; s.W = W;
  s.K = K; s.R = R; s.S = S; s.P = P; s.Q = Q;
  s.stride_h = stride_h; s.stride_w = stride_w; s.pad_h = pad_h; s.pad_w = pad_w; s.dil_h = dil_h; s.dil_w = dil_w;
  s.groups = groups; s.Cg = C / groups; s.Kg = K / groups;
  return "";
}

}  // namespace pe
