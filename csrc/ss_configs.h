// The compiled configurations: X(id, in, out, tile_m, tile_n, tile_k, cluster_m, cluster_n, schedule).
// GEMM frame: tile_m counts output channels (rows of W'), tile_n tokens. Ids are positions in the
// library's table and may change between builds; names are what the tuning table stores.
//
// Chosen for the shapes SlideSparse serves (N 2048..37888, K' 2048..37888, M 1..65536):
//   pingpong 128x128  the usual best large-M FP8/INT8 Hopper tile (vLLM's dense FP8 default)
//   coop 256x128      larger channel tile: the dense x' tile is amortised over 256 weight rows,
//                     and the halved weight bytes over 128 tokens (fewest smem bytes per flop)
//   coop 128x256      the transposed choice, for the widest M
//   streamk 128x64    small and mid M: split-K / stream-K fill the 132 SMs when N/128 tiles do not
//   pingpong 64x64 K256  decode-sized M without splitting: many CTAs, long K steps
// fp16 output gets the two most general ones only (compile time; FP8/INT8 layers output bf16).
#define SS_CONFIG_LIST(X)                                                        \
  X(0,  cutlass::float_e4m3_t, cutlass::bfloat16_t, 128, 128, 128, 2, 1, Pingpong)    \
  X(1,  cutlass::float_e4m3_t, cutlass::bfloat16_t, 256, 128, 128, 2, 1, Cooperative) \
  X(2,  cutlass::float_e4m3_t, cutlass::bfloat16_t, 128, 256, 128, 1, 2, Cooperative) \
  X(3,  cutlass::float_e4m3_t, cutlass::bfloat16_t, 128, 64, 128, 1, 1, StreamK)      \
  X(4,  cutlass::float_e4m3_t, cutlass::bfloat16_t, 64, 64, 256, 1, 1, Pingpong)      \
  X(5,  int8_t, cutlass::bfloat16_t, 128, 128, 128, 2, 1, Pingpong)                   \
  X(6,  int8_t, cutlass::bfloat16_t, 256, 128, 128, 2, 1, Cooperative)                \
  X(7,  int8_t, cutlass::bfloat16_t, 128, 256, 128, 1, 2, Cooperative)                \
  X(8,  int8_t, cutlass::bfloat16_t, 128, 64, 128, 1, 1, StreamK)                     \
  X(9,  int8_t, cutlass::bfloat16_t, 64, 64, 256, 1, 1, Pingpong)                     \
  X(10, cutlass::float_e4m3_t, cutlass::half_t, 128, 128, 128, 2, 1, Pingpong)        \
  X(11, cutlass::float_e4m3_t, cutlass::half_t, 128, 64, 128, 1, 1, StreamK)          \
  X(12, int8_t, cutlass::half_t, 128, 128, 128, 2, 1, Pingpong)                       \
  X(13, int8_t, cutlass::half_t, 128, 64, 128, 1, 1, StreamK)

#define SS_NUM_CONFIGS 14
