// kvbm transfer engine: one-sided UCX put/get of many blocks per request.
//
// Note [Transfer engine design]
// * One UCP context and one worker per Engine. All worker calls happen under Engine::mu_ (the
//   worker runs in UCS_THREAD_MODE_SERIALIZED). Progress is driven either by an engine thread
//   (default) or by the callers' own wait()/progress() calls.
//   The thread spins ucp_worker_progress for `spin_us` after the last event, then arms the
//   worker and sleeps on its event fd, so an idle serving process costs no CPU yet still
//   answers tcp-emulated RMA and keepalives. Callers in caller mode wait the same way.
// * Memory is registered with ucp_mem_map (host or CUDA); its packed rkey and the worker
//   address are plain bytes: the Python control plane exchanges them over any channel.
// * A transfer is one native call over arrays of (local address, remote address, length): each
//   entry is checked against the registered local regions and the peer's remote regions
//   (binary search, before anything is issued), then all puts/gets are posted without per-op
//   callbacks and one ucp_ep_flush_nbx completes the Request. An optional notification (a
//   small active message carrying caller bytes) is sent only after that flush completed, so
//   the receiver sees it only once the data is in place.
// * Errors: endpoints are created with UCP_ERR_HANDLING_MODE_PEER unless the engine was built
//   with error_handling=false (needed for shared memory, see ../shared/UCX.md). A failed peer
//   fails every outstanding Request on its endpoint with kPeer; the endpoint is then closed with
//   force and its remote keys released, and later calls on it return kPeer at once. Waits take
//   a timeout (kTimeout); an Endpoint::close(force) cancels what is still in flight.
// * Same host, CUDA memory on both sides: the bytes move by one kernel through CUDA IPC mappings
//   instead of UCX (Note [CUDA IPC path] in cuda_ipc.h); completion, notification and errors
//   follow the same Request protocol, and flush()/close() also wait for those copies.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "csrc/status.h"
#include "transfer/cuda_ipc.h"

// UCX handle types, forward-declared so this header needs no UCX headers.
struct ucp_context;
struct ucp_worker;
struct ucp_ep;
struct ucp_rkey;
struct ucp_mem;

namespace kvbm::transfer {

enum class MemKind : int { kHost = 0, kCuda = 1 };
enum class Op : int { kPut = 0, kGet = 1 };

struct EngineOptions {
  std::string ucx_lib_dir;         // where libucp.so.0 lives ("" = system loader path)
  std::string name;                // this engine's name, carried by its notifications
  std::string transports;          // UCX_TLS for this context ("" = UCX's default/environment)
  std::string net_devices;         // UCX_NET_DEVICES ("" = UCX's default/environment)
  bool error_handling = true;      // endpoints in UCP_ERR_HANDLING_MODE_PEER
  bool progress_thread = true;     // false: progress only inside wait()/progress() calls
  int64_t spin_us = 200;           // progress thread: keep spinning this long after activity
  bool cuda = false;               // ask UCX for CUDA memory support
  bool cuda_ipc = true;            // same-host CUDA IPC path (export cuda regions, map peers' ones)
};

class Engine;
class Endpoint;
struct Callbacks;

// Completion of one batch (or flush, or notification). Thread-safe.
class Request {
 public:
  // True once finished (successfully or not).
  bool done() const { return done_.load(std::memory_order_acquire); }
  // The final status (Ok while not done).
  Status status() const;
  // Waits until done or `timeout_s` elapses (< 0: forever). Returns the request's final status,
  // or kTimeout when the deadline passed first (the request stays in flight).
  Status wait(double timeout_s);
  uint64_t bytes() const { return bytes_; }
  size_t count() const { return count_; }
  // True when the bytes moved through the CUDA IPC path (one kernel), false for UCX.
  bool cuda_ipc() const { return cuda_ipc_; }

 private:
  friend class Engine;
  friend class Endpoint;
  friend struct Callbacks;
  void finish(Status s);

  // Weak: a Request may be dropped inside a UCX callback on the progress thread, and must never
  // own the Engine or Endpoint there.
  std::weak_ptr<Engine> engine_;
  std::weak_ptr<Endpoint> endpoint_;
  std::atomic<bool> done_{false};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  Status status_;
  uint64_t bytes_ = 0;
  size_t count_ = 0;
  std::string notify_header_;  // AM header/payload kept alive until sent
  std::string notify_payload_;
  bool has_notify_ = false;
  bool notify_sent_ = false;
  // CUDA IPC path (guarded by the engine's mu_): the kernel's ticket and the mappings it uses,
  // held until it completed; a flush's earlier IPC copies, which it completes after.
  bool cuda_ipc_ = false;
  cuda_ipc::Copier::Ticket ticket_;
  std::vector<std::shared_ptr<cuda_ipc::Mapping>> keep_;
  std::vector<std::shared_ptr<Request>> after_;
};

// Locally registered memory.
struct Region {
  uint64_t id = 0;
  uint64_t addr = 0;
  uint64_t length = 0;
  MemKind kind = MemKind::kHost;
  std::string rkey;  // packed remote key (bytes for the peer)
  ucp_mem* memh = nullptr;
  int device = -1;        // kCuda: the memory's device ordinal (-1: unknown, no CUDA IPC from it)
  std::string ipc;        // kCuda: encoded cuda_ipc::Descriptor for peers ("" = not exported)
  std::string ipc_note;   // why `ipc` is empty (for messages)
};

struct Notification {
  std::string sender;
  std::string message;
};

class Endpoint : public std::enable_shared_from_this<Endpoint> {
 public:
  ~Endpoint();
  const std::string& peer_name() const { return peer_name_; }
  // Adds a region the peer registered (its address range, packed rkey and CUDA IPC descriptor,
  // "" for none); returns its index. InvalidArgument for a bad range, rkey or descriptor.
  StatusOr<uint32_t> add_remote_region(uint64_t addr, uint64_t length, const std::string& rkey,
                                       const std::string& ipc = std::string());
  // Posts n one-sided operations and a flush; `lengths` has n entries, or 1 (same for all).
  // With `notify`, the message is delivered to the peer after the data is complete there.
  // Takes the CUDA IPC path when every local range is in this engine's CUDA regions of one
  // device and every remote range in a region mapped over CUDA IPC (else UCX, as always).
  StatusOr<std::shared_ptr<Request>> transfer(Op op, const uint64_t* local, const uint64_t* remote,
                                              const uint64_t* lengths, size_t n, size_t n_lengths,
                                              const std::string* notify);
  // A notification alone (ordered after earlier transfers' completion only if they were waited on).
  StatusOr<std::shared_ptr<Request>> notify(const std::string& message);
  // Completes when every operation posted so far on this endpoint is complete at the target.
  StatusOr<std::shared_ptr<Request>> flush();
  // Closes the endpoint; outstanding requests finish (force: cancelled with kPeer). Idempotent.
  Status close(bool force, double timeout_s);
  // Ok while usable; the kPeer status after a failure or close.
  Status health() const;
  size_t num_remote_regions() const;
  // Whether a transfer to this peer can take the CUDA IPC path: the engine has it enabled and
  // at least one remote region is exported from this host and not failed to map.
  bool cuda_ipc() const;
  // (addr, state) of each remote region's CUDA IPC side, by address (RemoteState::describe).
  std::vector<std::pair<uint64_t, std::string>> cuda_ipc_states() const;

 private:
  friend class Engine;
  friend struct Callbacks;
  struct RemoteRegion {
    uint64_t addr, length;
    ucp_rkey* rkey;
    cuda_ipc::RemoteState ipc;
  };
  struct Item {           // one resolved entry of a transfer
    const Region* local;  // the registered region holding the local range
    uint32_t remote;      // index of the remote region in remote_
  };
  // mu_ held, entries resolved: posts the IPC kernel, or returns nullptr when a mapping could not
  // be made (the caller then takes the UCX path).
  StatusOr<std::shared_ptr<Request>> transfer_ipc_locked(Op op, const uint64_t* local, const uint64_t* remote,
                                                         const uint64_t* lengths, size_t n, size_t n_lengths,
                                                         const std::vector<Item>& items, int device,
                                                         std::shared_ptr<Request> req);
  void drop_remote_locked(std::vector<ucp_rkey*>* rkeys);  // releases remote_ (rkeys to close, IPC maps)
  Endpoint(std::shared_ptr<Engine> engine, std::string peer_name) : engine_(std::move(engine)), peer_name_(std::move(peer_name)) {}
  void fail_locked(Status s);  // engine mu_ held: mark failed, hand ep and rkeys to the engine to close

  std::shared_ptr<Engine> engine_;
  std::string peer_name_;
  ucp_ep* ep_ = nullptr;
  std::vector<RemoteRegion> remote_;  // sorted by addr (guarded by engine mu_)
  Status failure_;                    // guarded by engine mu_
  std::atomic<bool> failed_{false};
};

class Engine : public std::enable_shared_from_this<Engine> {
 public:
  static StatusOr<std::shared_ptr<Engine>> create(const EngineOptions& opts);
  ~Engine();

  const EngineOptions& options() const { return opts_; }
  const std::string& address() const { return address_; }
  std::string ucx_version() const;

  StatusOr<std::shared_ptr<Region>> register_memory(uint64_t addr, uint64_t length, MemKind kind);
  Status deregister(uint64_t region_id);
  std::vector<std::shared_ptr<Region>> regions() const;

  StatusOr<std::shared_ptr<Endpoint>> connect(const std::string& worker_address, const std::string& peer_name);

  // Notifications received so far (up to max; 0 = all), oldest first.
  std::vector<Notification> take_notifications(size_t max);
  // Waits until at least one notification is queued or timeout (< 0: forever); returns whether one is.
  bool wait_notification(double timeout_s);

  // Drives the worker once (any mode); returns the number of events processed.
  unsigned progress();
  // Stops the thread, closes endpoints, unmaps memory, destroys the worker. Idempotent.
  void shutdown();
  bool closed() const { return closed_.load(); }
  // Whether this engine runs the CUDA IPC path (option on, CUDA compiled in, a device present).
  bool cuda_ipc() const { return ipc_enabled_; }

 private:
  friend class Endpoint;
  friend class Request;
  explicit Engine(EngineOptions o) : opts_(std::move(o)) {}
  Status init();
  void thread_main();
  // Arms the worker and waits on its event fd (or the wake fd) up to max_ms; false if it could not arm.
  bool sleep_on_worker(int max_ms);
  unsigned progress_locked();  // mu_ held: progress + deferred work
  void wake();
  // Takes the result of a *_nbx call made for `r`: finishes r now or tracks the UCX request.
  void track_locked(const std::shared_ptr<Request>& r, void* status_ptr, bool notify_next);
  void send_notify_locked(const std::shared_ptr<Request>& r, Endpoint* ep);
  void orphan_locked(ucp_ep* ep, std::vector<ucp_rkey*> rkeys, bool force);
  void on_ep_error(ucp_ep* ep, const Status& s);
  void on_notification(Notification n);
  friend struct Callbacks;
  // The registered region holding [addr, addr + len), or nullptr.
  const Region* lookup_local_locked(uint64_t addr, uint64_t len) const;
  // Completes IPC copies whose event fired (then notifies) and flushes waiting for them.
  unsigned poll_ipc_locked();
  // A UCX-complete request: notify next, wait for earlier IPC copies, or finish.
  void complete_locked(const std::shared_ptr<Request>& r, bool notify_next);

  EngineOptions opts_;
  std::string address_;
  ucp_context* ctx_ = nullptr;
  ucp_worker* worker_ = nullptr;
  int efd_ = -1, wake_fd_ = -1, epoll_fd_ = -1;

  // Guards the worker and everything below. Recursive: UCX may call our error callback from
  // inside a call we made under the lock.
  mutable std::recursive_mutex mu_;
  std::vector<std::shared_ptr<Region>> local_;  // sorted by addr
  uint64_t next_region_id_ = 1;
  std::vector<std::weak_ptr<Endpoint>> endpoints_;
  std::vector<std::shared_ptr<Request>> deferred_notify_;  // flushed, AM still to send
  struct Orphan {
    ucp_ep* ep;
    std::vector<ucp_rkey*> rkeys;
    bool force;
  };
  std::vector<Orphan> orphans_;   // endpoints to close outside UCX callbacks
  std::vector<void*> closing_;    // ucp_ep_close_nbx requests in progress
  std::unique_ptr<cuda_ipc::Copier> copier_;           // null: no CUDA IPC path (or shut down)
  bool ipc_enabled_ = false;                           // set once by init()
  std::vector<std::shared_ptr<Request>> ipc_pending_;  // IPC copies running, flushes waiting on them

  std::atomic<int> inflight_{0};
  std::atomic<int> lock_waiters_{0};
  std::atomic<bool> sleeping_{false};
  std::atomic<bool> stop_{false};
  std::atomic<bool> closed_{false};
  std::thread thread_;

  std::mutex note_mu_;  // notification queue
  std::condition_variable note_cv_;
  std::deque<Notification> notes_;
};

}  // namespace kvbm::transfer
