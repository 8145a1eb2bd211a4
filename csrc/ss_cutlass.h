/* SlideSparse CUTLASS SM90 sparse GEMM: the C ABI of libslidesparse_cutlass.so.
 *
 * Python reaches it through ctypes (slidesparse/kernels/cutlass_sparse.py), which mirrors every
 * struct below field by field: keep the two in step (ss_abi_version() guards it).
 *
 * out [M, N] (row-major) = (x' [M, K'] @ W'^T) * s_tok[m] * s_ch[n] + bias[n], W' [N, K'] 2:4.
 * All pointers are device pointers; every length is int64. Nothing here allocates device memory,
 * synchronises, or touches a stream other than the one passed.
 */
#ifndef SLIDESPARSE_CUTLASS_H
#define SLIDESPARSE_CUTLASS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SS_ABI_VERSION 2

typedef enum {
  SS_OK = 0,
  SS_ERR_CONFIG = 1,           /* no such configuration index */
  SS_ERR_MODE = 2,             /* split-K / stream-K asked of a configuration without that scheduler */
  SS_ERR_CANNOT_IMPLEMENT = 3, /* CUTLASS rejected the problem (alignment, layout) */
  SS_ERR_WORKSPACE = 4,        /* workspace smaller than ss_workspace_size said */
  SS_ERR_INIT = 5,             /* parameter set-up failed (TMA descriptors, workspace init) */
  SS_ERR_LAUNCH = 6,           /* the launch failed (see ss_last_cuda_error) */
  SS_ERR_DEVICE = 7,           /* no usable device / not compute capability 9.0 */
  SS_ERR_ARG = 8               /* a bad argument (null pointer, negative size) */
} ss_status;

enum { SS_DTYPE_FP8E4M3 = 0, SS_DTYPE_INT8 = 1, SS_DTYPE_BF16 = 2, SS_DTYPE_FP16 = 3 };
enum { SS_SCHED_PINGPONG = 0, SS_SCHED_COOPERATIVE = 1, SS_SCHED_STREAMK = 2 };
/* Decomposition of a stream-K configuration's work (the others run data-parallel only). */
enum { SS_MODE_DATA_PARALLEL = 0, SS_MODE_SPLITK = 1, SS_MODE_STREAMK = 2 };
/* Tile rasterisation of the persistent schedulers (GEMM frame: M = channels, N = tokens). */
enum { SS_RASTER_HEURISTIC = 0, SS_RASTER_ALONG_M = 1, SS_RASTER_ALONG_N = 2 };

typedef struct {
  const void* x;        /* x' [m, k] row-major, int8 or fp8 e4m3 */
  const void* w_values; /* compressed W' values [n, round_up(k, 32) / 2] row-major */
  const void* w_meta;   /* W' metadata, ss_meta_bytes(n, k) bytes, CUTLASS's SM90 layout */
  const float* s_tok;   /* [m] */
  const float* s_ch;    /* [n] */
  const void* bias;     /* [n] in the output dtype, or NULL */
  void* out;            /* [m, n] row-major, bf16 or fp16 */
  int64_t m, n, k;
  int32_t mode;         /* SS_MODE_* */
  int32_t splits;       /* split-K factor (SS_MODE_SPLITK), else ignored */
  void* workspace;
  size_t workspace_bytes;
  void* stream;         /* cudaStream_t */
  int32_t device;       /* the device the pointers live on (the current device) */
  int32_t swizzle;      /* max swizzle of the tile order (1, 2, 4, 8): L2 reuse between CTAs */
  int32_t raster;       /* SS_RASTER_* */
} ss_args;

typedef ss_status (*ss_run_fn)(const ss_args*, int sm_count);
typedef ss_status (*ss_workspace_fn)(const ss_args*, int sm_count, size_t* bytes);

typedef struct {
  int32_t in_dtype, out_dtype;
  int32_t tile_m, tile_n, tile_k; /* GEMM frame: tile_m output channels, tile_n tokens */
  int32_t cluster_m, cluster_n;
  int32_t schedule;               /* SS_SCHED_* */
  int32_t stages;                 /* mainloop pipeline stages */
  int32_t smem_bytes;             /* dynamic shared memory per CTA */
  int32_t threads;
  int32_t plain_epilogue;         /* 1: acc -> out only (measurement of the epilogue's share) */
  ss_run_fn run;
  ss_workspace_fn workspace_size;
} ss_config_info;

int ss_abi_version(void);
int ss_num_configs(void);                 /* compiled configurations */
const char* ss_config_name(int index);    /* NULL past the end */
int ss_config_info_get(int index, ss_config_info* info);
/* Bytes of the compressed values and of the metadata for an [n, k] weight (k = the GEMM's K'). */
int64_t ss_values_bytes(int64_t n, int64_t k);
int64_t ss_meta_bytes(int64_t n, int64_t k);
ss_status ss_workspace_size(int index, const ss_args* args, size_t* bytes);
ss_status ss_run(int index, const ss_args* args);
/* CUTLASS's own SM90 compressor (dense [n, k] 2:4 row-major -> values, metadata), kept as the
 * reference that tests compare the Python layout transform with. dtype: SS_DTYPE_FP8E4M3/INT8. */
ss_status ss_compress_reference(int dtype, const void* dense, void* values, void* meta,
                                int64_t n, int64_t k, void* stream);
const char* ss_last_cuda_error(void);     /* thread-local; "" if none */
const char* ss_build_info(void);          /* CUTLASS version, nvcc version, arch */

#ifdef __cplusplus
}
#endif
#endif
