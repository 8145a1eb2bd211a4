/* SlideSparse's lift of 1-byte activation codes, in the same library as the GEMM (ss_lift.cu).
 *
 * x [m, k] codes (k even) -> x' [mp, kq]: every group of L codes becomes L/2 - 1 overlapping 2:4
 * windows of 4 (stride 2); for 2_inf (p = 1, w = 1) each pair becomes (pair, 0, 0). Columns past
 * the last group and rows m..mp are zeros (the GEMM's padding). Works on 2-byte pairs: output pair
 * o = (group g, window j, half h) is input pair g*p + j + h (2_inf: h = 1 is zero).
 *
 * A symbol of its own, looked up by name, so a library built before it still loads (the Python side
 * then lifts with its Triton kernel).
 */
#ifndef SLIDESPARSE_LIFT_H
#define SLIDESPARSE_LIFT_H

#include <stdint.h>

#include "ss_cutlass.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  const void* src;   /* x [m, k] row-major codes, 2-byte aligned rows */
  void* dst;         /* x' [mp, kq] row-major, 16-byte aligned, kq a multiple of 16 */
  int64_t m, mp;     /* rows of x, rows of x' (mp >= m; rows m..mp are written as zeros) */
  int64_t k, kq;     /* columns of x (even), of x' */
  int64_t src_stride, dst_stride;  /* row strides in bytes (src even, dst a multiple of 16) */
  int32_t p;         /* pairs per source group: L / 2 (2_inf: 1) */
  int32_t w;         /* windows per group: L / 2 - 1 (2_inf: 1) */
  int32_t inf;       /* 1 for 2_inf */
  int32_t pad_;
  void* stream;      /* cudaStream_t */
} ss_lift_args;

ss_status ss_lift_codes(const ss_lift_args* args);

#ifdef __cplusplus
}
#endif
#endif
