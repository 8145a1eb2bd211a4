// One configuration of ss_configs.h per object file (compiled with -DSS_CFG_ID=<id>), so that the
// build runs them in parallel and a subset can be built while developing.
#include "ss_configs.h"
#include "ss_gemm.cuh"

#ifndef SS_CFG_ID
#error "compile with -DSS_CFG_ID=<index into SS_CONFIG_LIST>"
#endif

#define SS_CAT_(a, b) a##b
#define SS_CAT(a, b) SS_CAT_(a, b)

namespace ss {
#define SS_ALIAS(ID, IN, OUT, TM, TN, TK, CM, CN, ...) \
  using SS_CAT(Cfg, ID) = Config<IN, OUT, TM, TN, TK, CM, CN, __VA_ARGS__>;
SS_CONFIG_LIST(SS_ALIAS)
#undef SS_ALIAS
}  // namespace ss

extern "C" int SS_CAT(ss_config_info_, SS_CFG_ID)(ss_config_info* info) {
  *info = ss::Kernel<ss::SS_CAT(Cfg, SS_CFG_ID)>::info();
  return 0;
}
