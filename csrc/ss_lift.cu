// The lift as one memory-bound pass (ss_lift.h). Each thread writes 16 bytes of x' (8 output
// pairs) with one vector store; its 8 input pairs are 2-byte loads of a stretch of at most 5 pairs
// of x that its warp's neighbours also read, so they come from L1. Launched through the C ABI
// rather than Triton: a Triton launch from Python costs ~50 us of host time (tools/gpu_host_cost.py),
// which outside CUDA graphs is on the step's critical path.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "ss_lift.h"

namespace {

constexpr int kThreads = 256;
constexpr int kPairsPerThread = 8;  // 16 bytes

__global__ void __launch_bounds__(kThreads) lift_pairs(const uint16_t* __restrict__ src, uint4* __restrict__ dst,
                                                       int64_t m, int64_t mp, int64_t kp, int64_t chunks, int64_t ng,
                                                       int64_t src_stride, int64_t dst_stride, int p, int w, int inf) {
  // one flat index over (row, 16-byte chunk of the row): any M in one launch
  const int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t row = idx / chunks;
  const int64_t chunk = idx - row * chunks;
  if (row >= mp) return;
  const uint16_t* s = src + row * src_stride;
  uint16_t v[kPairsPerThread];
  const int64_t o0 = chunk * kPairsPerThread;
  const int two_w = 2 * w;
  int64_t g = o0 / two_w;
  int r = int(o0 - g * two_w);
#pragma unroll
  for (int i = 0; i < kPairsPerThread; ++i) {
    const int j = r >> 1, h = r & 1;
    const int64_t from = inf ? g * p + j : g * p + j + h;
    const bool ok = row < m && g < ng && from < kp && !(inf && h);
    v[i] = ok ? s[from] : uint16_t(0);
    if (++r == two_w) { r = 0; ++g; }
  }
  uint4 out;
  out.x = uint32_t(v[0]) | (uint32_t(v[1]) << 16);
  out.y = uint32_t(v[2]) | (uint32_t(v[3]) << 16);
  out.z = uint32_t(v[4]) | (uint32_t(v[5]) << 16);
  out.w = uint32_t(v[6]) | (uint32_t(v[7]) << 16);
  dst[row * dst_stride + chunk] = out;
}

}  // namespace

extern "C" ss_status ss_lift_codes(const ss_lift_args* a) {
  if (a == nullptr || a->src == nullptr || a->dst == nullptr) return SS_ERR_ARG;
  if (a->m < 0 || a->mp < a->m || a->k <= 0 || a->k % 2 || a->kq <= 0 || a->kq % 16 || a->p < 1 || a->w < 1 ||
      a->src_stride < a->k || a->src_stride % 2 || a->dst_stride < a->kq || a->dst_stride % 16 ||
      (reinterpret_cast<uintptr_t>(a->src) & 1) || (reinterpret_cast<uintptr_t>(a->dst) & 15))
    return SS_ERR_ARG;
  if (a->mp == 0) return SS_OK;
  const int64_t kp = a->k / 2, chunks = a->kq / 16;
  const int64_t ng = (a->k + 2 * int64_t(a->p) - 1) / (2 * int64_t(a->p));  // groups of L = 2p codes
  const int64_t blocks = (a->mp * chunks + kThreads - 1) / kThreads;
  if (blocks > INT32_MAX) return SS_ERR_ARG;
  lift_pairs<<<unsigned(blocks), kThreads, 0, static_cast<cudaStream_t>(a->stream)>>>(
      static_cast<const uint16_t*>(a->src), static_cast<uint4*>(a->dst), a->m, a->mp, kp, chunks, ng,
      a->src_stride / 2, a->dst_stride / 16, a->p, a->w, a->inf);
  return cudaPeekAtLastError() == cudaSuccess ? SS_OK : SS_ERR_LAUNCH;
}
