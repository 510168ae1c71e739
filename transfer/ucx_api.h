// The UCP/UCS entry points kvbm uses, resolved at RUN time with dlopen.
//
// Note [UCX loaded at run time]
// kvbm has one native extension and `import kvbm` must work where UCX is not installed. So the
// transfer engine compiles against the UCX headers (from the `libucx` wheel or a system install)
// but never links libucp: the first TransferEngine loads libucp/libucs from a directory the
// Python side finds (the `libucx` package's lib/, or the system loader path) and fills this
// table. A missing or unloadable UCX is a kUnsupported Status naming the path that failed.
#pragma once

#include <ucp/api/ucp.h>
#include <ucs/type/status.h>

#include <string>

#include "csrc/status.h"

namespace kvbm::ucx {

#define KVBM_UCX_FUNCTIONS(X)   \
  X(ucp_config_read)            \
  X(ucp_config_modify)          \
  X(ucp_config_release)         \
  X(ucp_init_version)           \
  X(ucp_cleanup)                \
  X(ucp_get_version_string)     \
  X(ucp_worker_create)          \
  X(ucp_worker_destroy)         \
  X(ucp_worker_progress)        \
  X(ucp_worker_get_efd)         \
  X(ucp_worker_arm)             \
  X(ucp_worker_signal)          \
  X(ucp_worker_get_address)     \
  X(ucp_worker_release_address) \
  X(ucp_worker_set_am_recv_handler) \
  X(ucp_ep_create)              \
  X(ucp_ep_close_nbx)           \
  X(ucp_ep_flush_nbx)           \
  X(ucp_mem_map)                \
  X(ucp_mem_unmap)              \
  X(ucp_rkey_pack)              \
  X(ucp_rkey_buffer_release)    \
  X(ucp_ep_rkey_unpack)         \
  X(ucp_rkey_destroy)           \
  X(ucp_put_nbx)                \
  X(ucp_get_nbx)                \
  X(ucp_am_send_nbx)            \
  X(ucp_request_check_status)   \
  X(ucp_request_free)           \
  X(ucp_request_cancel)         \
  X(ucs_status_string)

struct Api {
#define KVBM_UCX_FIELD(fn) decltype(&::fn) fn = nullptr;
  KVBM_UCX_FUNCTIONS(KVBM_UCX_FIELD)
#undef KVBM_UCX_FIELD
  std::string lib_dir;  // where libucp was loaded from ("" = the system loader path)
};

// Loads UCX once per process from `lib_dir` (a directory holding libucp.so.0, or "" for the
// system loader path). Later calls return the table loaded first; a later call with a
// different directory is not an error (one UCX per process). Thread-safe.
StatusOr<const Api*> load(const std::string& lib_dir);

// The loaded table, or nullptr before a successful load().
const Api* api();

// "UCS_ERR_...: text" for messages.
std::string status_text(ucs_status_t s);

}  // namespace kvbm::ucx
