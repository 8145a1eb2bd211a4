// SlideSparse: one CUTLASS SM90 structured-sparse GEMM configuration, with the scales and the bias
// in an epilogue visitor tree (EVT).
//
// Orientation. CUTLASS's SM90 sparse mainloop takes the sparse operand as A, so the layer computes
//     D [N, M] = W' [N, K'] (2:4, compressed) x x'^T [K', M]
// in GEMM terms (GEMM-M = output channels N, GEMM-N = tokens M). W' is K-major (RowMajor A), x' is
// K-major (ColumnMajor B: x' [M, K'] row-major), both as the 8-bit wgmma wants them. D is stored
// ColumnMajor with leading dimension N, which is byte for byte out [M, N] row-major: no transpose
// pass, and the next layer reads it as is.
//
// Epilogue, per element (n, m) of D, in fp32 with one rounding to the output type:
//     D = fma(s_ch[n], s_tok[m] * acc, bias[n])
// s_ch and bias are per GEMM row (column broadcasts), s_tok is per GEMM column (row broadcast).
// A null bias pointer reads as 0 (Sm90ColBroadcast's null default), so one kernel serves both.
#pragma once

#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"

#include "ss_cutlass.h"
#include "ss_layout.cuh"

namespace ss {

using namespace cute;

// Schedules: ping-pong (two consumer warp groups alternate whole tiles), cooperative (both split
// one tile), cooperative with the stream-K tile scheduler (data-parallel, split-K or stream-K,
// chosen per call; its partial sums go through a workspace).
struct Pingpong {};
struct Cooperative {};
struct StreamK {};

// Epilogues: Scaled is the product (scales, bias, one rounding); Plain only converts the
// accumulator to the output type. Plain exists to measure the epilogue's share of the time (the
// same mainloop and store with and without the visitor tree); it is never offered for serving.
struct Scaled {};
struct Plain {};

template <class In> struct InTraits;
template <> struct InTraits<cutlass::float_e4m3_t> {
  using Acc = float;
  // FP8 fast accumulation: the wgmma accumulates without the periodic promotion to a separate
  // fp32 register set. vLLM's dense CUTLASS FP8 kernels (our baseline) use it too; the GPU tests
  // bound its error against the float64 reference.
  template <class S> using Kernel = cute::conditional_t<cute::is_same_v<S, Pingpong>,
      cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum,
      cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum>;
  static constexpr int code = SS_DTYPE_FP8E4M3;
};
template <> struct InTraits<int8_t> {
  using Acc = int32_t;
  template <class S> using Kernel = cute::conditional_t<cute::is_same_v<S, Pingpong>,
      cutlass::gemm::KernelTmaWarpSpecializedPingpong,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>;
  static constexpr int code = SS_DTYPE_INT8;
};

template <class Out> struct OutTraits;
template <> struct OutTraits<cutlass::bfloat16_t> { static constexpr int code = SS_DTYPE_BF16; };
template <> struct OutTraits<cutlass::half_t> { static constexpr int code = SS_DTYPE_FP16; };

template <class In_, class Out_, int TM, int TN, int TK, int CM, int CN, class Sched_, class Epi_ = Scaled>
struct Config {
  using In = In_;
  using Out = Out_;
  using Sched = Sched_;
  static constexpr bool kPlain = cute::is_same_v<Epi_, Plain>;
  using Acc = typename InTraits<In>::Acc;
  using TileShape = Shape<Int<TM>, Int<TN>, Int<TK>>;
  using ClusterShape = Shape<Int<CM>, Int<CN>, _1>;
  static constexpr bool kPingpong = cute::is_same_v<Sched, Pingpong>;
  static constexpr bool kStreamK = cute::is_same_v<Sched, StreamK>;
  using KernelSchedule = typename InTraits<In>::template Kernel<Sched>;
  using EpilogueSchedule = cute::conditional_t<kPingpong, cutlass::epilogue::TmaWarpSpecialized,
                                               cutlass::epilogue::TmaWarpSpecializedCooperative>;
  using TileScheduler = cute::conditional_t<kStreamK, cutlass::gemm::StreamKScheduler,
                                            cutlass::gemm::PersistentScheduler>;
  // Every configuration shares one compressed layout: the metadata atom is (64, min(TK, 128))
  // (Sm90GemmSparseConfig), so TK must be at least 128 for the weight to be compressed once.
  static_assert(TK >= 128, "TK < 128 would change the metadata layout");
};

template <class Cfg>
struct Kernel {
  using In = typename Cfg::In;
  using Out = typename Cfg::Out;
  using Acc = typename Cfg::Acc;
  using TileShape = typename Cfg::TileShape;
  static constexpr auto RoundStyle = cutlass::FloatRoundStyle::round_to_nearest;

  using LayoutA = cutlass::layout::RowMajor;     // W' [N, K'], K-major
  using LayoutB = cutlass::layout::ColumnMajor;  // x' [M, K'] row-major = K-major B
  using LayoutD = cutlass::layout::ColumnMajor;  // D [N, M] col-major = out [M, N] row-major
  static constexpr int kAlignIn = 16;            // 16 bytes of 8-bit elements (TMA)
  static constexpr int kAlignOut = 8;            // 16 bytes of 16-bit elements

  using ChannelScale = cutlass::epilogue::fusion::Sm90ColBroadcast<
      0, TileShape, float, float, Stride<_1, _0, int64_t>>;
  using TokenScale = cutlass::epilogue::fusion::Sm90RowBroadcast<
      0, TileShape, float, float, Stride<_0, _1, int64_t>>;
  using Bias = cutlass::epilogue::fusion::Sm90ColBroadcast<
      0, TileShape, Out, float, Stride<_1, _0, int64_t>>;
  using ScaledAcc = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, RoundStyle>,
      TokenScale, cutlass::epilogue::fusion::Sm90AccFetch>;
  using ScaledFusion = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, Out, float, RoundStyle>,
      ChannelScale, ScaledAcc, Bias>;
  using PlainFusion = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::epilogue::thread::Identity, Out, float, RoundStyle>,
      cutlass::epilogue::fusion::Sm90AccFetch>;
  using Fusion = cute::conditional_t<Cfg::kPlain, PlainFusion, ScaledFusion>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, typename Cfg::ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, float,
      void, LayoutD, kAlignOut,  // no C operand: nothing is read back
      Out, LayoutD, kAlignOut,
      typename Cfg::EpilogueSchedule, Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      In, LayoutA, kAlignIn, In, LayoutB, kAlignIn, Acc, TileShape, typename Cfg::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Cfg::KernelSchedule>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<
      Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue, typename Cfg::TileScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  using SparseConfig = typename CollectiveMainloop::SparseConfig;
  static_assert(cute::is_same_v<SparseConfig, SparseConfigFor<In>>,
                "this configuration would need its own compressed layout");
  using ElementE = typename CollectiveMainloop::ElementE;
  using StrideB = typename GemmKernel::StrideB;
  using StrideD = typename GemmKernel::StrideD;

  static typename Gemm::Arguments arguments(ss_args const& a, int sm_count) {
    auto problem = make_shape(int(a.n), int(a.m), int(a.k), 1);
    // packed strides, int64: x' rows are k apart, D's columns (tokens) n apart
    StrideB dB{};
    get<0>(dB) = a.k;
    StrideD dD{};
    get<1>(dD) = a.n;
    typename Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = problem;
    args.mainloop.ptr_A = static_cast<In const*>(a.w_values);
    args.mainloop.layout_a = SparseConfig::fill_layoutA(problem);
    args.mainloop.ptr_B = static_cast<In const*>(a.x);
    args.mainloop.dB = dB;
    args.mainloop.ptr_E = static_cast<ElementE const*>(a.w_meta);
    args.mainloop.layout_e = SparseConfig::fill_layoutE(problem);
    if constexpr (!Cfg::kPlain) {
      auto& f = args.epilogue.thread;
      f = {
          {static_cast<float const*>(a.s_ch), 0.f, {}},                      // ChannelScale
          {{static_cast<float const*>(a.s_tok), 0.f, {}}, {}, {}},           // TokenScale * acc
          {static_cast<Out const*>(a.bias), Out(0), {}},                     // Bias (null: 0)
          {}};
    }
    args.epilogue.ptr_C = nullptr;
    args.epilogue.ptr_D = static_cast<Out*>(a.out);
    args.epilogue.dD = dD;
    args.epilogue.dC = dD;
    args.hw_info.device_id = a.device;
    args.hw_info.sm_count = sm_count;
    // Tile order is a run-time choice (no recompile): with N/128 x M/256 tiles in waves of 132,
    // how consecutive CTAs share weight and x' tiles in L2 depends on the shape.
    using Raster = decltype(args.scheduler.raster_order);
    args.scheduler.max_swizzle_size = a.swizzle > 0 ? a.swizzle : 1;
    args.scheduler.raster_order = a.raster == SS_RASTER_ALONG_M   ? Raster::AlongM
                                  : a.raster == SS_RASTER_ALONG_N ? Raster::AlongN
                                                                  : Raster::Heuristic;
    if constexpr (Cfg::kStreamK) {
      using Mode = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90StreamKParams::DecompositionMode;
      args.scheduler.splits = a.splits > 1 ? a.splits : 1;
      args.scheduler.decomposition_mode =
          a.mode == SS_MODE_STREAMK ? Mode::StreamK
          : a.mode == SS_MODE_SPLITK ? Mode::SplitK
          : Mode::DataParallel;
    }
    return args;
  }

  static ss_status check(ss_args const& a, typename Gemm::Arguments const& args) {
    if (a.mode != SS_MODE_DATA_PARALLEL && !Cfg::kStreamK) return SS_ERR_MODE;
    if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return SS_ERR_CANNOT_IMPLEMENT;
    return SS_OK;
  }

  static ss_status workspace_size(ss_args const* a, int sm_count, size_t* bytes) {
    auto args = arguments(*a, sm_count);
    ss_status st = check(*a, args);
    if (st != SS_OK) return st;
    *bytes = Gemm::get_workspace_size(args);
    return SS_OK;
  }

  static ss_status run(ss_args const* a, int sm_count) {
    auto args = arguments(*a, sm_count);
    ss_status st = check(*a, args);
    if (st != SS_OK) return st;
    size_t need = Gemm::get_workspace_size(args);
    if (need > a->workspace_bytes || (need && a->workspace == nullptr)) return SS_ERR_WORKSPACE;
    auto stream = static_cast<cudaStream_t>(a->stream);
    // initialize() zeroes the stream-K workspace with cudaMemsetAsync on `stream` (capturable)
    // and raises the kernel's dynamic shared-memory limit (a host-side attribute, no sync).
    Gemm gemm;
    if (gemm.initialize(args, a->workspace, stream) != cutlass::Status::kSuccess) return SS_ERR_INIT;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return SS_ERR_LAUNCH;
    return cudaPeekAtLastError() == cudaSuccess ? SS_OK : SS_ERR_LAUNCH;
  }

  static ss_config_info info() {
    ss_config_info i{};
    i.in_dtype = InTraits<In>::code;
    i.out_dtype = OutTraits<Out>::code;
    i.tile_m = size<0>(TileShape{});
    i.tile_n = size<1>(TileShape{});
    i.tile_k = size<2>(TileShape{});
    i.cluster_m = size<0>(typename Cfg::ClusterShape{});
    i.cluster_n = size<1>(typename Cfg::ClusterShape{});
    i.schedule = Cfg::kPingpong ? SS_SCHED_PINGPONG : Cfg::kStreamK ? SS_SCHED_STREAMK : SS_SCHED_COOPERATIVE;
    i.stages = CollectiveMainloop::DispatchPolicy::Stages;
    i.smem_bytes = int(GemmKernel::SharedStorageSize);
    i.threads = int(GemmKernel::MaxThreadsPerBlock);
    i.plain_epilogue = Cfg::kPlain ? 1 : 0;
    i.run = &run;
    i.workspace_size = &workspace_size;
    return i;
  }
};

}  // namespace ss
