// A workspace budget from the environment: STREAMKL_*_WORKSPACE_MB variables name a positive number of MiB (fractions
// allowed). Read at every call, so that tests and benchmarks can change it. Host side, torch only for the error.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include <c10/util/Exception.h>

namespace streamkl {

// Bytes of the budget that `variable` sets, or default_mib MiB when it is unset or empty; ValueError for anything but
// a positive, finite number of MiB of at most 2^40 (so that the byte count fits int64).
inline int64_t workspace_budget_bytes_from_env(const char* variable, double default_mib) {
  double mib = default_mib;
  const char* env = std::getenv(variable);
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    mib = std::strtod(env, &end);
    // (No number in the message: a c10::Error whose message has digits crashes some torch builds' printers.)
    TORCH_CHECK_VALUE(end != env && *end == '\0' && std::isfinite(mib) && mib > 0 && mib <= std::ldexp(1.0, 40),
                      "streamkl: ", std::string(variable), " must be a positive number of MiB, got '",
                      std::string(env), "'");
  }
  return static_cast<int64_t>(mib * 1024.0 * 1024.0);
}

}  // namespace streamkl
