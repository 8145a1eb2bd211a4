// The compiled configurations: X(id, in, out, tile_m, tile_n, tile_k, cluster_m, cluster_n, schedule[, epilogue]).
// GEMM frame: tile_m counts output channels (rows of W'), tile_n tokens. Ids are positions in the
// library's table and may change between builds; names are what the tuning table stores.
//
// Chosen for the shapes SlideSparse serves (N 2048..37888, K' 2048..37888, M 1..65536), and revised
// after the first H200 measurement (results/H200/cutlass/run1): at M=16384 coop 128x256 won every
// Qwen2.5-7B layer, 256x128 came second, ping-pong 128x128 third (~30% behind).
//   coop 128x256 c1x2   128 channels x 256 tokens; the pair of CTAs shares (multicasts) the weight tile
//   coop 128x256 c2x1   the same tile, the pair shares the x' tile instead
//   coop 256x128 c2x1   larger channel tile
//   pingpong 128x128    the usual Hopper FP8 choice (vLLM's dense default), for mid M
//   streamk 128x64      small and mid M: split-K / stream-K fill the 132 SMs when N/128 tiles do not
//   pingpong 64x64 K256 decode-sized M without splitting: many CTAs, long K steps
// fp16 output gets the two most general ones only (compile time; FP8/INT8 layers output bf16).
// The last one has the Plain epilogue (acc -> bf16, no scales or bias): it only measures what the
// visitor tree costs on the best large-M tile, and is never listed for serving.
#define SS_CONFIG_LIST(X)                                                        \
  X(0,  cutlass::float_e4m3_t, cutlass::bfloat16_t, 128, 256, 128, 1, 2, Cooperative) \
  X(1,  cutlass::float_e4m3_t, cutlass::bfloat16_t, 128, 256, 128, 2, 1, Cooperative) \
  X(2,  cutlass::float_e4m3_t, cutlass::bfloat16_t, 256, 128, 128, 2, 1, Cooperative) \
  X(3,  cutlass::float_e4m3_t, cutlass::bfloat16_t, 128, 128, 128, 2, 1, Pingpong)    \
  X(4,  cutlass::float_e4m3_t, cutlass::bfloat16_t, 128, 64, 128, 1, 1, StreamK)      \
  X(5,  cutlass::float_e4m3_t, cutlass::bfloat16_t, 64, 64, 256, 1, 1, Pingpong)      \
  X(6,  int8_t, cutlass::bfloat16_t, 128, 256, 128, 1, 2, Cooperative)                \
  X(7,  int8_t, cutlass::bfloat16_t, 128, 256, 128, 2, 1, Cooperative)                \
  X(8,  int8_t, cutlass::bfloat16_t, 256, 128, 128, 2, 1, Cooperative)                \
  X(9,  int8_t, cutlass::bfloat16_t, 128, 128, 128, 2, 1, Pingpong)                   \
  X(10, int8_t, cutlass::bfloat16_t, 128, 64, 128, 1, 1, StreamK)                     \
  X(11, int8_t, cutlass::bfloat16_t, 64, 64, 256, 1, 1, Pingpong)                     \
  X(12, cutlass::float_e4m3_t, cutlass::half_t, 128, 256, 128, 1, 2, Cooperative)     \
  X(13, cutlass::float_e4m3_t, cutlass::half_t, 128, 64, 128, 1, 1, StreamK)          \
  X(14, int8_t, cutlass::half_t, 128, 256, 128, 1, 2, Cooperative)                    \
  X(15, int8_t, cutlass::half_t, 128, 64, 128, 1, 1, StreamK)                     \
  X(16, cutlass::float_e4m3_t, cutlass::bfloat16_t, 128, 256, 128, 1, 2, Cooperative, Plain)

#define SS_NUM_CONFIGS 17
