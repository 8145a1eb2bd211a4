// The compressed layout every configuration shares (see Config's static_assert on TK).
#pragma once
#include "cute/tensor.hpp"
#include "cutlass/gemm/collective/builders/sm90_sparse_config.inl"

namespace ss {
template <class In>
using SparseConfigFor = cutlass::Sm90GemmSparseConfig<cute::sparse_elem<2, In>, cute::GMMA::Major::K,
                                                      cute::sparse_elem<8, uint8_t>, cute::Int<128>>;
}  // namespace ss
