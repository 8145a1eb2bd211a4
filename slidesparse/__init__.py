"""SlideSparse: Z_L-sparse LLM weights on 2:4 Sparse Tensor Cores, served by stock vLLM."""

__version__ = "0.1.0"
