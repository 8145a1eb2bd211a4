"""The core everything else builds on, importing nothing of SlideSparse outside this package:

    pattern      Z_L patterns: slide / unslide, lift and its index map, 2:4 pack / unpack, shards
    prune        Z_L magnitude pruning (the mask rule every pruner obeys)
    quant        every quantization scheme (per-row weights and tokens, BitNet ternary)
    format       the checkpoint format: tensor names, the quantization_config block, layer shapes
    checkpoint   reading checkpoints: safetensors headers, the index, dtypes, converted layers
    layout       model layout: architectures, projections, the ignore rule, vLLM's fused per-rank shapes
    tuning       the tuning table (slidesparse_tuning.json) as a typed, validated object
    io           atomic file writes
    text         calibration / evaluation text: reading, tokenizing, fixed windows
    errors       SlideSparseError, the base of every bad-input error
"""
