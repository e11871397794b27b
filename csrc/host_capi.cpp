// C ABI over the pure host arithmetic of conv_params.h / tiling.h, so tests can check it on CPU with ctypes
// (tests/test_cuda_host.py compiles this file with plain g++; it is not part of the extension).
#include <cstring>

#include "conv_params.h"
#include "tiling.h"

namespace {

void copy_error(const std::string& err, char* buf, int len) {
  if (buf == nullptr || len <= 0) return;
  std::strncpy(buf, err.c_str(), static_cast<size_t>(len - 1));
  buf[len - 1] = '\0';
}

// args: N, C, H, W, K, Cw, R, S, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups
std::string shape_from(const int64_t* a, pe::ConvShape& s) {
  return pe::make_conv_shape(s, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12],
                             a[13], a[14]);
}

void plan_out(const pe::LaunchPlan& p, int64_t* out) {
  const int64_t v[] = {p.tile_id, p.tile.bm, p.tile.bn, p.tile.bk, p.tile.threads, p.grid_x, p.grid_y, p.grid_z,
                       p.m_tiles, p.n_tiles, p.splits, p.chunk, p.workspace_bytes};
  std::memcpy(out, v, sizeof v);
}

}  // namespace

extern "C" {

int64_t pe_conv_out_size(int64_t in, int64_t pad, int64_t dil, int64_t k, int64_t stride) {
  return pe::conv_out_size(in, pad, dil, k, stride);
}

// out (11): N, C, H, W, K, R, S, P, Q, Cg, Kg. Returns 0, or 1 with the message in err.
int pe_make_conv_shape(const int64_t* args, int64_t* out, char* err, int errlen) {
  pe::ConvShape s;
  const std::string e = shape_from(args, s);
  copy_error(e, err, errlen);
  const int64_t v[] = {s.N, s.C, s.H, s.W, s.K, s.R, s.S, s.P, s.Q, s.Cg, s.Kg};
  std::memcpy(out, v, sizeof v);
  return e.empty() ? 0 : 1;
}

// kind: 0 forward, 1 dgrad, 2 wgrad. dtype: pe::DType. out (13): tile_id, bm, bn, bk, threads, grid_x, grid_y,
// grid_z, m_tiles, n_tiles, splits, chunk, workspace_bytes. Returns 0, 1 (shape error) or 2 (plan error).
int pe_plan_conv(int kind, int dtype, int allow_tf32, int flag, const int64_t* args, int64_t* out, char* err,
                 int errlen) {
  pe::ConvShape s;
  const std::string e = shape_from(args, s);
  if (!e.empty()) {
    copy_error(e, err, errlen);
    return 1;
  }
  const auto t = static_cast<pe::DType>(dtype);
  pe::LaunchPlan p = kind == 0   ? pe::plan_conv_fwd(s, t, allow_tf32 != 0, flag != 0)
                     : kind == 1 ? pe::plan_conv_dgrad(s, t, allow_tf32 != 0, flag != 0)
                                 : pe::plan_conv_wgrad(s, t, allow_tf32 != 0);
  plan_out(p, out);
  copy_error(p.error, err, errlen);
  return p.error.empty() ? 0 : 2;
}

int pe_plan_rows_channels(int64_t rows, int64_t channels, int64_t n_partials, int dtype, int64_t* out, char* err,
                          int errlen) {
  const pe::LaunchPlan p = pe::plan_rows_channels(rows, channels, n_partials, static_cast<pe::DType>(dtype));
  plan_out(p, out);
  copy_error(p.error, err, errlen);
  return p.error.empty() ? 0 : 2;
}

int pe_select_math(int dtype, int allow_tf32) {
  return static_cast<int>(pe::select_math(static_cast<pe::DType>(dtype), allow_tf32 != 0));
}

}  // extern "C"
