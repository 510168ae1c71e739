#include "transfer/ucx_api.h"

#include <dlfcn.h>

#include <mutex>

namespace kvbm::ucx {
namespace {

std::mutex g_mu;
Api g_api;
bool g_loaded = false;

StatusOr<void*> open_lib(const std::string& dir, const char* soname) {
  std::string path = dir.empty() ? std::string(soname) : dir + "/" + soname;
  // RTLD_LOCAL: UCX's symbols stay out of the global namespace (UCXX or NIXL's own UCX copy
  // may share the process). libucp's RPATH ($ORIGIN) finds libuct/libucs/libucm beside it.
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* err = dlerror();
    return Status(Code::kUnsupported, "UCX is not available: cannot load " + path + ": " +
                                          (err ? err : "unknown dlopen error") +
                                          " (install the `ucx` extra: pip install 'kvblockmgr[ucx]')");
  }
  return h;
}

}  // namespace

StatusOr<const Api*> load(const std::string& lib_dir) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_loaded) return static_cast<const Api*>(&g_api);
  // libucs first so that libucp's dependency resolves to the same copy (as libucx.load_library does).
  auto ucs = open_lib(lib_dir, "libucs.so.0");
  if (!ucs.ok()) return ucs.status();
  auto ucp = open_lib(lib_dir, "libucp.so.0");
  if (!ucp.ok()) return ucp.status();
  Api a;
  a.lib_dir = lib_dir;
#define KVBM_UCX_RESOLVE(fn)                                                                    \
  {                                                                                             \
    void* sym = dlsym(ucp.value(), #fn);                                                        \
    if (!sym) sym = dlsym(ucs.value(), #fn);                                                    \
    if (!sym)                                                                                   \
      return Status(Code::kUnsupported,                                                         \
                    std::string("UCX is not usable: symbol ") + #fn + " missing in " +          \
                        (lib_dir.empty() ? std::string("libucp.so.0") : lib_dir + "/libucp.so.0") + \
                        " (kvbm needs UCX >= 1.14)");                                           \
    a.fn = reinterpret_cast<decltype(a.fn)>(sym);                                              \
  }
  KVBM_UCX_FUNCTIONS(KVBM_UCX_RESOLVE)
#undef KVBM_UCX_RESOLVE
  g_api = a;
  g_loaded = true;
  return static_cast<const Api*>(&g_api);
}

const Api* api() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_loaded ? &g_api : nullptr;
}

std::string status_text(ucs_status_t s) {
  const Api* a = api();
  std::string text = a ? a->ucs_status_string(s) : "UCX status";
  return text + " (" + std::to_string(static_cast<int>(s)) + ")";
}

}  // namespace kvbm::ucx
