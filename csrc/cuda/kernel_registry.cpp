#include "kernel_registry.h"

#include <map>
#include <sstream>
#include <string>
#include <tuple>

namespace streamkl {
namespace cuda {
namespace {

using Key = std::tuple<int, int, int, int>;

std::map<Key, LaunchFn>& registry() {
  static std::map<Key, LaunchFn> r;  // function-local: safe against static-initialization order
  return r;
}

Key to_tuple(const KernelKey& k) {
  return Key{static_cast<int>(k.family), static_cast<int>(k.dtype), k.dim_s, k.dim_t};
}

}  // namespace

bool register_kernel(const KernelKey& key, LaunchFn fn) {
  registry()[to_tuple(key)] = fn;
  return true;
}

LaunchFn find_kernel(const KernelKey& key) {
  auto it = registry().find(to_tuple(key));
  return it == registry().end() ? nullptr : it->second;
}

const char* describe_kernels(KernelFamily family) {
  static thread_local std::string text;
  std::ostringstream out;
  for (const auto& entry : registry()) {
    if (std::get<0>(entry.first) != static_cast<int>(family)) continue;
    out << (std::get<1>(entry.first) == static_cast<int>(ElementType::kFloat16) ? "float16" : "bfloat16") << " D_s="
        << std::get<2>(entry.first) << " D_t=" << std::get<3>(entry.first) << "; ";
  }
  text = out.str();
  if (text.empty()) text = "none (all disabled at build time)";
  return text.c_str();
}

}  // namespace cuda
}  // namespace streamkl
