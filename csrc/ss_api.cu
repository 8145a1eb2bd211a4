// The C ABI (ss_cutlass.h): the table of compiled configurations and CUTLASS's reference
// compressor. The GEMM instances live in their own objects (ss_instance.cu, one per id); an id
// that was not built resolves to a null weak symbol and is left out of the table.
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>

#include <cuda_runtime.h>

#include "cutlass/version.h"
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"

#include "ss_configs.h"
#include "ss_cutlass.h"
#include "ss_layout.cuh"

#define SS_DECLARE(ID, ...) extern "C" __attribute__((weak)) int ss_config_info_##ID(ss_config_info*);
SS_CONFIG_LIST(SS_DECLARE)
#undef SS_DECLARE

namespace {

thread_local std::string g_cuda_error;

struct Entry {
  ss_config_info info;
  char name[64];
};

struct Table {
  Entry entries[SS_NUM_CONFIGS];
  int count = 0;
  Table() {
    using InfoFn = int (*)(ss_config_info*);
    InfoFn fns[] = {
#define SS_FN(ID, ...) ss_config_info_##ID,
        SS_CONFIG_LIST(SS_FN)
#undef SS_FN
    };
    static const char* dtype[] = {"fp8", "int8", "bf16", "fp16"};
    static const char* sched[] = {"pingpong", "coop", "streamk"};
    for (InfoFn fn : fns) {
      if (fn == nullptr) continue;
      Entry& e = entries[count++];
      fn(&e.info);
      const ss_config_info& i = e.info;
      std::snprintf(e.name, sizeof(e.name), "%s_%s_%s_%dx%dx%d_c%dx%d%s", dtype[i.in_dtype], dtype[i.out_dtype],
                    sched[i.schedule], i.tile_m, i.tile_n, i.tile_k, i.cluster_m, i.cluster_n,
                    i.plain_epilogue ? "_plain" : "");
    }
  }
};

Table const& table() {
  static Table t;
  return t;
}

// The persistent schedulers size their grid by the SM count; asking the runtime every call would
// cost a little host time, so it is read once per device.
int sm_count(int device) {
  static int cache[64] = {};
  if (device < 0 || device >= 64) return 0;
  if (cache[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
    cache[device] = n;
  }
  return cache[device];
}

int64_t round_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

ss_status record(ss_status st) {
  if (st == SS_ERR_LAUNCH || st == SS_ERR_INIT) {
    cudaError_t e = cudaGetLastError();  // clears a sticky launch error for the next call
    g_cuda_error = e == cudaSuccess ? "" : cudaGetErrorString(e);
  }
  return st;
}

ss_status validate(const ss_args* a) {
  if (a == nullptr || a->x == nullptr || a->w_values == nullptr || a->w_meta == nullptr ||
      a->s_tok == nullptr || a->s_ch == nullptr || a->out == nullptr)
    return SS_ERR_ARG;
  // CUTLASS's problem shape is int32 per extent; the strides and offsets are int64.
  if (a->m <= 0 || a->n <= 0 || a->k <= 0 || a->m > INT32_MAX || a->n > INT32_MAX || a->k > INT32_MAX)
    return SS_ERR_ARG;
  return SS_OK;
}

template <class In>
ss_status compress_reference(const void* dense, void* values, void* meta, int64_t n, int64_t k,
                             cudaStream_t stream) {
  using Problem = cute::Shape<int, int, int, int>;
  using Kernel = cutlass::transform::kernel::StructuredSparseCompressor<
      Problem, In, cutlass::layout::RowMajor, ss::SparseConfigFor<In>, cutlass::arch::Sm90>;
  using Compressor = cutlass::transform::device::TransformUniversalAdapter<Kernel>;
  Problem problem{int(n), 1, int(k), 1};
  cutlass::gemm::TagToStrideA_t<cutlass::layout::RowMajor> stride_a{};
  cute::get<0>(stride_a) = k;
  typename Compressor::Arguments args{problem, {dense, stride_a, values, meta}, {}};
  if (Compressor::can_implement(args) != cutlass::Status::kSuccess) return SS_ERR_CANNOT_IMPLEMENT;
  Compressor op;
  // the kernel keeps its tiles in shared memory; the workspace CUTLASS sizes is never read
  if (op.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return SS_ERR_INIT;
  if (op.run(stream) != cutlass::Status::kSuccess) return SS_ERR_LAUNCH;
  return cudaPeekAtLastError() == cudaSuccess ? SS_OK : SS_ERR_LAUNCH;
}

}  // namespace

extern "C" {

int ss_abi_version(void) { return SS_ABI_VERSION; }
int ss_num_configs(void) { return table().count; }

const char* ss_config_name(int index) {
  return index >= 0 && index < table().count ? table().entries[index].name : nullptr;
}

int ss_config_info_get(int index, ss_config_info* info) {
  if (index < 0 || index >= table().count || info == nullptr) return SS_ERR_CONFIG;
  *info = table().entries[index].info;
  return SS_OK;
}

// Sizes follow Sm90GemmSparseConfig::fill_layoutA / fill_layoutE for 8-bit inputs: values are
// [n, round_up(k, 32) / 2] bytes; metadata has one bit per logical element over n and k rounded
// up to its (64, 128) atom.
int64_t ss_values_bytes(int64_t n, int64_t k) { return n * (round_up(k, 32) / 2); }
int64_t ss_meta_bytes(int64_t n, int64_t k) { return round_up(n, 64) * round_up(k, 128) / 8; }

ss_status ss_workspace_size(int index, const ss_args* args, size_t* bytes) {
  if (index < 0 || index >= table().count) return SS_ERR_CONFIG;
  ss_status st = validate(args);
  if (st != SS_OK || bytes == nullptr) return st != SS_OK ? st : SS_ERR_ARG;
  int sms = sm_count(args->device);
  if (sms == 0) return SS_ERR_DEVICE;
  return table().entries[index].info.workspace_size(args, sms, bytes);
}

ss_status ss_run(int index, const ss_args* args) {
  if (index < 0 || index >= table().count) return SS_ERR_CONFIG;
  ss_status st = validate(args);
  if (st != SS_OK) return st;
  int sms = sm_count(args->device);
  if (sms == 0) return SS_ERR_DEVICE;
  g_cuda_error.clear();
  return record(table().entries[index].info.run(args, sms));
}

ss_status ss_compress_reference(int dtype, const void* dense, void* values, void* meta, int64_t n, int64_t k,
                                void* stream) {
  if (dense == nullptr || values == nullptr || meta == nullptr || n <= 0 || k <= 0 || n > INT32_MAX ||
      k > INT32_MAX)
    return SS_ERR_ARG;
  g_cuda_error.clear();
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == SS_DTYPE_FP8E4M3) return record(compress_reference<cutlass::float_e4m3_t>(dense, values, meta, n, k, s));
  if (dtype == SS_DTYPE_INT8) return record(compress_reference<int8_t>(dense, values, meta, n, k, s));
  return SS_ERR_ARG;
}

const char* ss_last_cuda_error(void) { return g_cuda_error.c_str(); }

const char* ss_build_info(void) {
  static char buf[160];
  std::snprintf(buf, sizeof(buf), "CUTLASS %d.%d.%d, nvcc %d.%d, sm_90a", CUTLASS_MAJOR, CUTLASS_MINOR,
                CUTLASS_PATCH, __CUDACC_VER_MAJOR__, __CUDACC_VER_MINOR__);
  return buf;
}

}  // extern "C"
