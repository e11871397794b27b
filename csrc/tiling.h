// Tile configurations, grid dimensions and workspace sizes of every launch (pure host arithmetic).
//
// The kernels (.cu) and the binding both take their numbers from here, and tests/test_cuda_host.py checks them
// on CPU through csrc/host_capi.cpp. Nothing here depends on the GPU that runs the kernels: the split counts of
// the deterministic reductions depend on shapes only, so results are bitwise reproducible across devices.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "conv_params.h"

namespace pe {

// How the tile GEMM multiplies: WMMA fp16/bf16 (fp32 accumulate), WMMA TF32 (fp32 in, fp32 accumulate), or
// CUDA-core FMA in the accumulator type (fp32 without TF32, fp64).
enum class Math : int { SIMT = 0, WMMA16 = 1, TF32 = 2 };

inline Math select_math(DType t, bool allow_tf32) {
  if (t == DType::F16 || t == DType::BF16) return Math::WMMA16;
  if (t == DType::F32 && allow_tf32) return Math::TF32;
  return Math::SIMT;
}

// Tile shapes compiled into the kernels (explicit instantiations in conv_fwd.cu / conv_bwd.cu must match).
struct TileShape {
  int bm, bn, bk, threads;
};
// Tensor-core tiles: 4 warps, each a 32x32 sub-tile of WMMA 16x16 fragments.
constexpr TileShape kTileTC64x64{64, 64, 32, 128};
constexpr TileShape kTileTC128x32{128, 32, 32, 128};  // narrow groups (K/groups <= 32)
// CUDA-core tile: 256 threads, 4x4 outputs each.
constexpr TileShape kTileSIMT64x64{64, 64, 16, 256};

// Elementwise / per-channel-reduction kernels: blocks of (32 channels) x (8 row lanes), 64 rows per block.
constexpr int kEwChannels = 32;
constexpr int kEwRowLanes = 8;
constexpr int kEwRowsPerBlock = 64;

// Rows of forward statistics partials per row tile: count, mean, M2 (sum of squared deviations from the mean).
constexpr int64_t kFwdStatsRows = 3;

constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxGridX = 2147483647LL;

// Which forward tile a shape uses: 0 = TC 64x64, 1 = TC 128x32, 2 = SIMT 64x64.
inline int select_fwd_tile(Math math, int64_t Kg) {
  if (math == Math::SIMT) return 2;
  return Kg <= 32 ? 1 : 0;
}
inline TileShape tile_by_id(int id) {
  return id == 1 ? kTileTC128x32 : (id == 2 ? kTileSIMT64x64 : kTileTC64x64);
}

struct LaunchPlan {
  int tile_id = 0;           // index for tile_by_id
  TileShape tile{};          // bm x bn output tile, bk reduction step
  int64_t grid_x = 0, grid_y = 0, grid_z = 0;
  int64_t m_tiles = 0;       // row tiles (the count of per-tile partial statistics)
  int64_t n_tiles = 0;       // column tiles per group
  int64_t splits = 1;        // wgrad: reduction splits
  int64_t chunk = 0;         // wgrad: reduction rows per split (multiple of bk)
  int64_t workspace_bytes = 0;
  std::string error;         // non-empty: this launch is impossible (message names the values)
};

inline std::string grid_error(const char* what, int64_t x, int64_t y, int64_t z) {
  if (x <= kMaxGridX && y <= kMaxGridYZ && z <= kMaxGridYZ) return "";
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s: grid (%lld, %lld, %lld) exceeds the CUDA limits (2^31-1, 65535, 65535)",
                what, (long long)x, (long long)y, (long long)z);
  return buf;
}

// Forward: per group g a GEMM of (M = N*P*Q) x (Kg) over R*S*Cg. grid.x = row tiles, grid.y = column tiles x
// groups. Workspace: per-row-tile partial statistics [count, mean, M2], 3 x m_tiles x K in the accumulator type.
inline LaunchPlan plan_conv_fwd(const ConvShape& s, DType t, bool allow_tf32, bool compute_stats) {
  LaunchPlan p;
  p.tile_id = select_fwd_tile(select_math(t, allow_tf32), s.Kg);
  p.tile = tile_by_id(p.tile_id);
  p.m_tiles = ceil_div(s.M(), p.tile.bm);
  p.n_tiles = ceil_div(s.Kg, p.tile.bn);
  p.grid_x = p.m_tiles;
  p.grid_y = p.n_tiles * s.groups;
  p.grid_z = 1;
  p.workspace_bytes = compute_stats ? kFwdStatsRows * p.m_tiles * s.K * acc_bytes(t) : 0;
  p.error = grid_error("conv_fused forward", p.grid_x, p.grid_y, p.grid_z);
  return p;
}

// Dgrad: per group a GEMM of (N*H*W) x (Cg) over R*S*Kg (transposed conv). Workspace: per-row-tile partials of
// the prologue gradients (d in_scale, d in_shift), 2 x m_tiles x C, when the prologue has parameters.
inline LaunchPlan plan_conv_dgrad(const ConvShape& s, DType t, bool allow_tf32, bool prologue_partials) {
  LaunchPlan p;
  p.tile_id = select_math(t, allow_tf32) == Math::SIMT ? 2 : 0;
  p.tile = tile_by_id(p.tile_id);
  p.m_tiles = ceil_div(s.Mx(), p.tile.bm);
  p.n_tiles = ceil_div(s.Cg, p.tile.bn);
  p.grid_x = p.m_tiles;
  p.grid_y = p.n_tiles * s.groups;
  p.grid_z = 1;
  p.workspace_bytes = prologue_partials ? 2 * p.m_tiles * s.C * acc_bytes(t) : 0;
  p.error = grid_error("conv_fused backward (dgrad)", p.grid_x, p.grid_y, p.grid_z);
  return p;
}

// Wgrad: per group a GEMM of (Kg) x (R*S*Cg) over M = N*P*Q, split into `splits` contiguous ranges of `chunk`
// rows whose fp32 (fp64) partial products land in a workspace (splits x K x R*S*Cg) and are summed in split
// order by a second kernel. The split count targets ~256 CTAs and caps the workspace at 2^25 elements.
inline LaunchPlan plan_conv_wgrad(const ConvShape& s, DType t, bool allow_tf32) {
  LaunchPlan p;
  p.tile_id = select_math(t, allow_tf32) == Math::SIMT ? 2 : 0;
  p.tile = tile_by_id(p.tile_id);
  const int64_t bk = p.tile.bk;
  p.m_tiles = ceil_div(s.Kg, p.tile.bm);
  p.n_tiles = ceil_div(s.RSC(), p.tile.bn);
  const int64_t base_ctas = p.m_tiles * p.n_tiles * s.groups;
  const int64_t red_steps = std::max<int64_t>(1, ceil_div(s.M(), bk));
  const int64_t wnumel = s.K * s.RSC();
  int64_t splits = std::max<int64_t>(1, ceil_div(256, base_ctas));
  splits = std::min<int64_t>(splits, 64);
  splits = std::min<int64_t>(splits, red_steps);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, (int64_t(1) << 25) / std::max<int64_t>(1, wnumel)));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, kMaxGridYZ / s.groups));
  const int64_t steps_per_split = ceil_div(red_steps, splits);
  p.splits = ceil_div(red_steps, steps_per_split);  // no empty split
  p.chunk = steps_per_split * bk;
  p.grid_x = p.n_tiles;
  p.grid_y = p.m_tiles;
  p.grid_z = s.groups * p.splits;
  p.workspace_bytes = p.splits * wnumel * acc_bytes(t);
  p.error = grid_error("conv_fused backward (wgrad)", p.grid_x, p.grid_y, p.grid_z);
  return p;
}

// Elementwise kernels over an NHWC tensor seen as rows x channels (bn_apply, apply-backward, conv epilogue
// backward). grid.x = row blocks, grid.y = channel blocks; `m_tiles` row blocks of per-channel partials.
inline LaunchPlan plan_rows_channels(int64_t rows, int64_t channels, int64_t n_partials, DType t) {
  LaunchPlan p;
  p.tile = TileShape{kEwRowsPerBlock, kEwChannels, 0, kEwChannels * kEwRowLanes};
  p.m_tiles = ceil_div(rows, kEwRowsPerBlock);
  p.n_tiles = ceil_div(channels, kEwChannels);
  p.grid_x = p.m_tiles;
  p.grid_y = p.n_tiles;
  p.grid_z = 1;
  p.workspace_bytes = n_partials * p.m_tiles * channels * acc_bytes(t);
  p.error = grid_error("elementwise", p.grid_x, p.grid_y, p.grid_z);
  return p;
}

}  // namespace pe
