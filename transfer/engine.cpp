#include "transfer/engine.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "transfer/ucx_api.h"

namespace kvbm::transfer {

namespace {

constexpr unsigned kNotifyAmId = 0x6b76;        // "kv": the AM id of kvbm notifications
constexpr size_t kMaxNotifyBytes = 4096;        // kept eager: one message, no rendezvous
using Clock = std::chrono::steady_clock;

const ucx::Api& U() { return *ucx::api(); }

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

Status peer_status(const std::string& peer, const char* what, ucs_status_t s) {
  return PeerError("peer '" + peer + "': " + what + ": " + ucx::status_text(s));
}

// What a UCX request callback gets as user_data: a strong ref to the Request, freed there.
struct Pending {
  std::shared_ptr<Request> req;
  Engine* engine;
  bool notify_next;  // after this flush, send the request's notification
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// UCX callbacks (C ABI types), friends of Engine.
struct Callbacks {
  static void send_done(void* request, ucs_status_t status, void* user_data);
  static void ep_error(void* arg, ucp_ep_h ep, ucs_status_t status);
  static ucs_status_t am(void* arg, const void* header, size_t header_length, void* data, size_t length,
                         const ucp_am_recv_param_t* param);
};

// ---------------------------------------------------------------------------------------------
// Request

Status Request::status() const {
  std::lock_guard<std::mutex> lock(mu_);
  return status_;
}

void Request::finish(Status s) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (done_.load(std::memory_order_relaxed)) return;
    status_ = std::move(s);
    done_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
}

Status Request::wait(double timeout_s) {
  auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(timeout_s < 0 ? 1e9 : timeout_s));
  std::shared_ptr<Engine> eng = engine_.lock();
  if (eng && !eng->options().progress_thread) {
    // Caller-driven progress: this thread runs the worker until the request is done.
    auto last_event = Clock::now();
    const auto spin = std::chrono::microseconds(eng->options().spin_us);
    while (!done()) {
      if (eng->closed()) break;
      auto now = Clock::now();
      if (eng->progress() > 0) last_event = now;
      if (done()) break;
      if (now >= deadline)
        return Timeout("transfer not complete after " + std::to_string(timeout_s) + " s (" +
                       std::to_string(count_) + " operations, " + std::to_string(bytes_) + " bytes)");
      if (now - last_event >= spin) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count();
        eng->sleep_on_worker(static_cast<int>(std::min<int64_t>(100, std::max<int64_t>(1, left))));
        last_event = Clock::now();
      }
    }
  }
  if (eng && !done()) {
    // The progress thread completes the request: poll for a short while before sleeping on the
    // condition variable, whose wake-up costs more than a small batch takes. Yielding keeps a
    // loaded machine's cores for the progress thread and the peer.
    const auto spin_end = Clock::now() + std::chrono::microseconds(std::min<int64_t>(eng->options().spin_us, 50));
    while (!done() && Clock::now() < spin_end) std::this_thread::yield();
  }
  eng.reset();
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_until(lock, deadline, [&] { return done_.load(std::memory_order_acquire); }))
    return Timeout("transfer not complete after " + std::to_string(timeout_s) + " s (" + std::to_string(count_) +
                   " operations, " + std::to_string(bytes_) + " bytes)");
  return status_;
}

// ---------------------------------------------------------------------------------------------
// Engine

StatusOr<std::shared_ptr<Engine>> Engine::create(const EngineOptions& opts) {
  auto api = ucx::load(opts.ucx_lib_dir);
  if (!api.ok()) return api.status();
  if (opts.spin_us < 0) return InvalidArgument("spin_us must be >= 0, got " + std::to_string(opts.spin_us));
  std::shared_ptr<Engine> e(new Engine(opts));
  Status st = e->init();
  if (!st.ok()) {
    e->shutdown();
    return st;
  }
  return e;
}

Status Engine::init() {
  ucp_config_t* config = nullptr;
  ucs_status_t s = U().ucp_config_read(nullptr, nullptr, &config);
  if (s != UCS_OK) return ConfigError("ucp_config_read: " + ucx::status_text(s));
  auto modify = [&](const char* key, const std::string& val) -> Status {
    if (val.empty()) return Status::Ok();
    ucs_status_t ms = U().ucp_config_modify(config, key, val.c_str());
    if (ms != UCS_OK) return ConfigError(std::string("UCX option ") + key + "='" + val + "' rejected: " + ucx::status_text(ms));
    return Status::Ok();
  };
  Status st = modify("TLS", opts_.transports);
  if (st.ok()) st = modify("NET_DEVICES", opts_.net_devices);
  // Transports without native RMA (tcp) emulate put/get with active messages; above the
  // rendezvous threshold every fragment then waits for a handshake. Eager fragments measured
  // 2.0-2.6x faster over tcp on the GPU machine's host (docs/transfer.md); the user's
  // UCX_RNDV_THRESH still wins.
  if (st.ok() && std::getenv("UCX_RNDV_THRESH") == nullptr) st = modify("RNDV_THRESH", "inf");
  if (!st.ok()) {
    U().ucp_config_release(config);
    return st;
  }
  ucp_params_t params;
  std::memset(&params, 0, sizeof(params));
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED | UCP_PARAM_FIELD_NAME;
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  params.mt_workers_shared = 0;
  params.name = opts_.name.empty() ? "kvbm" : opts_.name.c_str();
  s = U().ucp_init_version(UCP_API_MAJOR, UCP_API_MINOR, &params, config, &ctx_);
  U().ucp_config_release(config);
  if (s != UCS_OK) {
    ctx_ = nullptr;
    return ConfigError("ucp_init (TLS='" + opts_.transports + "', NET_DEVICES='" + opts_.net_devices +
                       "'): " + ucx::status_text(s));
  }
  ucp_worker_params_t wp;
  std::memset(&wp, 0, sizeof(wp));
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;  // every call is made under mu_
  s = U().ucp_worker_create(ctx_, &wp, &worker_);
  if (s != UCS_OK) {
    worker_ = nullptr;
    return Internal("ucp_worker_create: " + ucx::status_text(s));
  }
  ucp_address_t* addr = nullptr;
  size_t addr_len = 0;
  s = U().ucp_worker_get_address(worker_, &addr, &addr_len);
  if (s != UCS_OK) return Internal("ucp_worker_get_address: " + ucx::status_text(s));
  address_.assign(reinterpret_cast<const char*>(addr), addr_len);
  U().ucp_worker_release_address(worker_, addr);

  ucp_am_handler_param_t hp;
  std::memset(&hp, 0, sizeof(hp));
  hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG |
                  UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
  hp.id = kNotifyAmId;
  hp.flags = UCP_AM_FLAG_WHOLE_MSG;
  hp.cb = &Callbacks::am;
  hp.arg = this;
  s = U().ucp_worker_set_am_recv_handler(worker_, &hp);
  if (s != UCS_OK) return Internal("ucp_worker_set_am_recv_handler: " + ucx::status_text(s));

  s = U().ucp_worker_get_efd(worker_, &efd_);
  if (s != UCS_OK) return Internal("ucp_worker_get_efd: " + ucx::status_text(s));
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  if (wake_fd_ < 0 || epoll_fd_ < 0) return IoError(std::string("eventfd/epoll_create1: ") + std::strerror(errno));
  for (int fd : {efd_, wake_fd_}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0)
      return IoError(std::string("epoll_ctl: ") + std::strerror(errno));
  }
  if (opts_.cuda_ipc && cuda_ipc::available()) {
    copier_ = std::make_unique<cuda_ipc::Copier>();
    ipc_enabled_ = true;
  }
  if (opts_.progress_thread) thread_ = std::thread([this] { thread_main(); });
  return Status::Ok();
}

Engine::~Engine() { shutdown(); }

std::string Engine::ucx_version() const { return U().ucp_get_version_string(); }

void Engine::wake() {
  if (sleeping_.load()) {
    uint64_t one = 1;
    ssize_t r = ::write(wake_fd_, &one, sizeof(one));
    (void)r;
  }
}

void Engine::thread_main() {
  // Spin while there was an event in the last spin_us; otherwise arm the worker and sleep on its
  // event fd (plus our wake fd, written by submitters that find the thread asleep). On a few shared
  // cores spinning steals the CPU the peer needs; measured in docs/transfer.md.
  auto last_event = Clock::now();
  const auto spin = std::chrono::microseconds(opts_.spin_us);
  while (!stop_.load()) {
    // A submitter is waiting for the lock: let it in before progressing again.
    while (lock_waiters_.load(std::memory_order_relaxed) > 0 && !stop_.load()) std::this_thread::yield();
    unsigned n;
    {
      std::lock_guard<std::recursive_mutex> lock(mu_);
      n = progress_locked();
    }
    auto now = Clock::now();
    if (n > 0) {
      last_event = now;
      continue;
    }
    if (now - last_event < spin) continue;
    if (!sleep_on_worker(100)) continue;
    last_event = Clock::now();
  }
}

bool Engine::sleep_on_worker(int max_ms) {
  {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    if (closed_.load() && !worker_) return false;
    if (!orphans_.empty() || !closing_.empty() || !deferred_notify_.empty() || !ipc_pending_.empty()) return false;
    // sleeping_ is set before arming, under the lock: a submitter that posts after this point
    // sees it and writes the wake fd, so no posted operation waits for the timeout.
    sleeping_.store(true);
    if (U().ucp_worker_arm(worker_) == UCS_ERR_BUSY) {
      sleeping_.store(false);
      return false;
    }
  }
  if (!stop_.load()) {
    epoll_event evs[2];
    // A bounded sleep keeps keepalive and peer-failure detection going on an idle engine.
    epoll_wait(epoll_fd_, evs, 2, max_ms);
  }
  sleeping_.store(false);
  uint64_t drain;
  while (::read(wake_fd_, &drain, sizeof(drain)) > 0) {
  }
  return true;
}

unsigned Engine::progress() {
  if (closed_.load()) return 0;
  lock_waiters_.fetch_add(1);
  std::lock_guard<std::recursive_mutex> lock(mu_);
  lock_waiters_.fetch_sub(1);
  if (closed_.load()) return 0;
  return progress_locked();
}

unsigned Engine::progress_locked() {
  unsigned n = 0;
  unsigned k;
  while ((k = U().ucp_worker_progress(worker_)) != 0) n += k;
  n += poll_ipc_locked();
  // Work that must not run inside UCX callbacks.
  if (!deferred_notify_.empty()) {
    std::vector<std::shared_ptr<Request>> todo;
    todo.swap(deferred_notify_);
    for (auto& r : todo) {
      std::shared_ptr<Endpoint> ep = r->endpoint_.lock();
      if (!ep || ep->failed_.load() || !ep->ep_) {
        r->finish(ep ? ep->failure_ : PeerError("notification not sent: endpoint was released"));
        continue;
      }
      send_notify_locked(r, ep.get());
    }
    ++n;
  }
  if (!orphans_.empty()) {
    std::vector<Orphan> todo;
    todo.swap(orphans_);
    for (auto& o : todo) {
      for (ucp_rkey* rk : o.rkeys) U().ucp_rkey_destroy(rk);
      ucp_request_param_t p;
      std::memset(&p, 0, sizeof(p));
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = o.force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
      ucs_status_ptr_t r = U().ucp_ep_close_nbx(o.ep, &p);
      if (r != nullptr && !UCS_PTR_IS_ERR(r)) closing_.push_back(r);
    }
    ++n;
  }
  if (!closing_.empty()) {
    size_t kept = 0;
    for (void* r : closing_) {
      if (U().ucp_request_check_status(r) == UCS_INPROGRESS) {
        closing_[kept++] = r;
      } else {
        U().ucp_request_free(r);
      }
    }
    closing_.resize(kept);
  }
  return n;
}

void Engine::shutdown() {
  if (closed_.exchange(true)) return;
  stop_.store(true);
  if (thread_.joinable()) {
    uint64_t one = 1;
    ssize_t r = ::write(wake_fd_, &one, sizeof(one));
    (void)r;
    thread_.join();
  }
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (worker_) {
    for (auto& w : endpoints_) {
      if (auto ep = w.lock()) ep->fail_locked(PeerError("peer '" + ep->peer_name_ + "': the transfer engine was shut down"));
    }
    auto deadline = Clock::now() + std::chrono::seconds(2);
    progress_locked();
    while ((!closing_.empty() || !orphans_.empty()) && Clock::now() < deadline) progress_locked();
    if (copier_) {
      // Let the copies run out; their notifications then fail on the failed endpoints.
      copier_->synchronize();
      poll_ipc_locked();
      for (auto& r : ipc_pending_) {
        if (r->cuda_ipc_) copier_->release(r->ticket_);
        r->keep_.clear();
        r->finish(PeerError("the transfer engine was shut down"));
      }
      ipc_pending_.clear();
    }
    for (auto& r : deferred_notify_) r->finish(PeerError("the transfer engine was shut down"));
    deferred_notify_.clear();
  }
  copier_.reset();
  for (auto& reg : local_) {
    if (reg->memh && ctx_) U().ucp_mem_unmap(ctx_, reg->memh);
    reg->memh = nullptr;
  }
  local_.clear();
  if (worker_) U().ucp_worker_destroy(worker_);
  worker_ = nullptr;
  if (ctx_) U().ucp_cleanup(ctx_);
  ctx_ = nullptr;
  if (epoll_fd_ >= 0) ::close(epoll_fd_);
  if (wake_fd_ >= 0) ::close(wake_fd_);
  epoll_fd_ = wake_fd_ = -1;
  {
    std::lock_guard<std::mutex> nl(note_mu_);
  }
  note_cv_.notify_all();
}

StatusOr<std::shared_ptr<Region>> Engine::register_memory(uint64_t addr, uint64_t length, MemKind kind) {
  if (addr == 0) return InvalidArgument("register: address is null");
  if (length == 0) return InvalidArgument("register: length must be > 0");
  if (addr + length < addr) return InvalidArgument("register: address + length overflows");
  lock_waiters_.fetch_add(1);
  std::lock_guard<std::recursive_mutex> lock(mu_);
  lock_waiters_.fetch_sub(1);
  if (closed_.load()) return Status(Code::kIllegalTransition, "register: the transfer engine is shut down");
  for (auto& r : local_) {
    if (addr < r->addr + r->length && r->addr < addr + length)
      return AlreadyExists("register: [" + hex(addr) + ", +" + std::to_string(length) + ") overlaps region " +
                           std::to_string(r->id) + " [" + hex(r->addr) + ", +" + std::to_string(r->length) + ")");
  }
  ucp_mem_map_params_t mp;
  std::memset(&mp, 0, sizeof(mp));
  mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
  mp.address = reinterpret_cast<void*>(addr);
  mp.length = length;
  mp.memory_type = kind == MemKind::kCuda ? UCS_MEMORY_TYPE_CUDA : UCS_MEMORY_TYPE_HOST;
  ucp_mem_h memh = nullptr;
  ucs_status_t s = U().ucp_mem_map(ctx_, &mp, &memh);
  if (s != UCS_OK)
    return Status(kind == MemKind::kCuda ? Code::kCuda : Code::kIo,
                  std::string("register ") + (kind == MemKind::kCuda ? "CUDA" : "host") + " memory [" + hex(addr) +
                      ", +" + std::to_string(length) + "): ucp_mem_map: " + ucx::status_text(s));
  void* rkey_buf = nullptr;
  size_t rkey_len = 0;
  s = U().ucp_rkey_pack(ctx_, memh, &rkey_buf, &rkey_len);
  if (s != UCS_OK) {
    U().ucp_mem_unmap(ctx_, memh);
    return Internal("ucp_rkey_pack: " + ucx::status_text(s));
  }
  auto reg = std::make_shared<Region>();
  reg->id = next_region_id_++;
  reg->addr = addr;
  reg->length = length;
  reg->kind = kind;
  reg->memh = memh;
  reg->rkey.assign(static_cast<const char*>(rkey_buf), rkey_len);
  if (kind == MemKind::kCuda && copier_) reg->ipc = cuda_ipc::export_region(addr, length, &reg->device, &reg->ipc_note);
  else if (kind == MemKind::kCuda) reg->ipc_note = "the CUDA IPC path is off for this engine";
  U().ucp_rkey_buffer_release(rkey_buf);
  auto pos = std::upper_bound(local_.begin(), local_.end(), addr,
                              [](uint64_t a, const std::shared_ptr<Region>& r) { return a < r->addr; });
  local_.insert(pos, reg);
  return reg;
}

Status Engine::deregister(uint64_t region_id) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  for (auto it = local_.begin(); it != local_.end(); ++it) {
    if ((*it)->id == region_id) {
      if ((*it)->memh && ctx_) U().ucp_mem_unmap(ctx_, (*it)->memh);
      (*it)->memh = nullptr;
      local_.erase(it);
      return Status::Ok();
    }
  }
  return NotFound("deregister: no registered region with id " + std::to_string(region_id));
}

std::vector<std::shared_ptr<Region>> Engine::regions() const {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  return local_;
}

const Region* Engine::lookup_local_locked(uint64_t addr, uint64_t len) const {
  auto it = std::upper_bound(local_.begin(), local_.end(), addr,
                             [](uint64_t a, const std::shared_ptr<Region>& r) { return a < r->addr; });
  if (it == local_.begin()) return nullptr;
  const Region& r = **(it - 1);
  if (addr >= r.addr && addr + len <= r.addr + r.length && addr + len >= addr) return &r;
  return nullptr;
}

StatusOr<std::shared_ptr<Endpoint>> Engine::connect(const std::string& worker_address, const std::string& peer_name) {
  if (worker_address.empty()) return InvalidArgument("connect: worker_address is empty");
  lock_waiters_.fetch_add(1);
  std::lock_guard<std::recursive_mutex> lock(mu_);
  lock_waiters_.fetch_sub(1);
  if (closed_.load()) return Status(Code::kIllegalTransition, "connect: the transfer engine is shut down");
  std::shared_ptr<Endpoint> ep(new Endpoint(shared_from_this(), peer_name));
  ucp_ep_params_t p;
  std::memset(&p, 0, sizeof(p));
  p.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  p.address = reinterpret_cast<const ucp_address_t*>(worker_address.data());
  if (opts_.error_handling) {
    p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    p.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
    p.err_handler.cb = &Callbacks::ep_error;
    p.err_handler.arg = this;
  } else {
    p.err_mode = UCP_ERR_HANDLING_MODE_NONE;
  }
  ucp_ep_h h = nullptr;
  ucs_status_t s = U().ucp_ep_create(worker_, &p, &h);
  if (s != UCS_OK) return peer_status(peer_name, "ucp_ep_create", s);
  ep->ep_ = h;
  endpoints_.erase(std::remove_if(endpoints_.begin(), endpoints_.end(),
                                  [](const std::weak_ptr<Endpoint>& w) { return w.expired(); }),
                   endpoints_.end());
  endpoints_.push_back(ep);
  return ep;
}

void Engine::orphan_locked(ucp_ep* ep, std::vector<ucp_rkey*> rkeys, bool force) {
  if (!ep) return;
  orphans_.push_back({ep, std::move(rkeys), force});
  wake();
}

void Engine::on_ep_error(ucp_ep* ep, const Status& s) {
  for (auto& w : endpoints_) {
    auto e = w.lock();
    if (e && e->ep_ == ep) {
      e->fail_locked(s);
      return;
    }
  }
  // Not found: an endpoint already failed or released, hence already handed to orphans_ (closing
  // it again would be a double close).
}

void Engine::on_notification(Notification n) {
  {
    std::lock_guard<std::mutex> lock(note_mu_);
    notes_.push_back(std::move(n));
  }
  note_cv_.notify_all();
}

std::vector<Notification> Engine::take_notifications(size_t max) {
  if (!opts_.progress_thread) progress();
  std::lock_guard<std::mutex> lock(note_mu_);
  size_t n = max == 0 ? notes_.size() : std::min(max, notes_.size());
  std::vector<Notification> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(std::move(notes_.front()));
    notes_.pop_front();
  }
  return out;
}

bool Engine::wait_notification(double timeout_s) {
  auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(timeout_s < 0 ? 1e9 : timeout_s));
  if (!opts_.progress_thread) {
    for (;;) {
      progress();
      {
        std::lock_guard<std::mutex> lock(note_mu_);
        if (!notes_.empty()) return true;
      }
      if (closed_.load() || Clock::now() >= deadline) return false;
    }
  }
  std::unique_lock<std::mutex> lock(note_mu_);
  return note_cv_.wait_until(lock, deadline, [&] { return !notes_.empty() || closed_.load(); }) && !notes_.empty();
}

void Engine::track_locked(const std::shared_ptr<Request>& r, void* status_ptr, bool notify_next) {
  if (status_ptr == nullptr) {  // completed in place
    complete_locked(r, notify_next);
    return;
  }
  if (UCS_PTR_IS_ERR(status_ptr)) {
    auto ep = r->endpoint_.lock();
    r->finish(peer_status(ep ? ep->peer_name_ : std::string("?"), "request failed", UCS_PTR_STATUS(status_ptr)));
    return;
  }
  // In flight: the callback (given to the *_nbx call with a Pending as user_data) finishes it.
}

void Engine::complete_locked(const std::shared_ptr<Request>& r, bool notify_next) {
  if (notify_next) {
    send_notify_locked(r, r->endpoint_.lock().get());
  } else if (!r->after_.empty()) {
    ipc_pending_.push_back(r);  // a flush: done once the IPC copies before it are
  } else {
    r->finish(Status::Ok());
  }
}

void Engine::send_notify_locked(const std::shared_ptr<Request>& r, Endpoint* ep) {
  if (!ep || !ep->ep_ || ep->failed_.load()) {
    r->finish(ep ? ep->failure_ : PeerError("notification not sent: endpoint was released"));
    return;
  }
  r->notify_sent_ = true;
  auto* pend = new Pending{r, this, false};
  ucp_request_param_t p;
  std::memset(&p, 0, sizeof(p));
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  p.cb.send = &Callbacks::send_done;
  p.user_data = pend;
  p.flags = UCP_AM_SEND_FLAG_EAGER;
  inflight_.fetch_add(1);
  ucs_status_ptr_t sp = U().ucp_am_send_nbx(ep->ep_, kNotifyAmId, r->notify_header_.data(), r->notify_header_.size(),
                                            r->notify_payload_.data(), r->notify_payload_.size(), &p);
  if (sp == nullptr || UCS_PTR_IS_ERR(sp)) {
    inflight_.fetch_sub(1);
    delete pend;
    track_locked(r, sp, false);
  }
}

// ---------------------------------------------------------------------------------------------
// Callbacks

void Callbacks::send_done(void* request, ucs_status_t status, void* user_data) {
  auto* pend = static_cast<Pending*>(user_data);
  Engine* eng = pend->engine;
  std::shared_ptr<Request> r = std::move(pend->req);
  bool notify_next = pend->notify_next;
  delete pend;
  eng->inflight_.fetch_sub(1);
  U().ucp_request_free(request);
  if (status != UCS_OK) {
    auto ep = r->endpoint_.lock();
    std::string peer = ep ? ep->peer_name_ : std::string("?");
    const char* what = r->notify_sent_ ? "notification failed" : "transfer failed";
    Status s = status == UCS_ERR_CANCELED && ep && ep->failed_.load()
                   ? ep->failure_
                   : peer_status(peer, what, status);
    r->finish(s);
    return;
  }
  if (notify_next) {
    eng->deferred_notify_.push_back(std::move(r));  // sent by progress_locked, outside this callback
    return;
  }
  if (!r->after_.empty()) {
    eng->ipc_pending_.push_back(std::move(r));  // a flush: done once the IPC copies before it are
    return;
  }
  r->finish(Status::Ok());
}

void Callbacks::ep_error(void* arg, ucp_ep_h ep, ucs_status_t status) {
  auto* eng = static_cast<Engine*>(arg);
  eng->on_ep_error(ep, PeerError("peer failed: " + ucx::status_text(status)));
}

ucs_status_t Callbacks::am(void* arg, const void* header, size_t header_length, void* data, size_t length,
                           const ucp_am_recv_param_t* param) {
  auto* eng = static_cast<Engine*>(arg);
  if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) return UCS_OK;  // never sent by kvbm: drop
  Notification n;
  n.sender.assign(static_cast<const char*>(header), header_length);
  n.message.assign(static_cast<const char*>(data), length);
  eng->on_notification(std::move(n));
  return UCS_OK;
}

// ---------------------------------------------------------------------------------------------
// Endpoint

Endpoint::~Endpoint() {
  std::lock_guard<std::recursive_mutex> lock(engine_->mu_);
  if (ep_ || !remote_.empty()) {
    std::vector<ucp_rkey*> rkeys;
    drop_remote_locked(&rkeys);
    if (engine_->closed_.load()) return;  // the worker is gone, and with it the endpoint
    engine_->orphan_locked(ep_, std::move(rkeys), failed_.load());
    ep_ = nullptr;
  }
}

void Endpoint::fail_locked(Status s) {
  if (failed_.exchange(true)) return;
  failure_ = PeerError("peer '" + peer_name_ + "': " + s.message());
  std::vector<ucp_rkey*> rkeys;
  drop_remote_locked(&rkeys);
  ucp_ep* h = ep_;
  ep_ = nullptr;
  engine_->orphan_locked(h, std::move(rkeys), true);
}

void Endpoint::drop_remote_locked(std::vector<ucp_rkey*>* rkeys) {
  for (auto& r : remote_) rkeys->push_back(r.rkey);
  remote_.clear();  // CUDA IPC mappings close once the copies in flight released theirs too
}

Status Endpoint::health() const {
  std::lock_guard<std::recursive_mutex> lock(engine_->mu_);
  return failed_.load() ? failure_ : Status::Ok();
}

size_t Endpoint::num_remote_regions() const {
  std::lock_guard<std::recursive_mutex> lock(engine_->mu_);
  return remote_.size();
}

StatusOr<uint32_t> Endpoint::add_remote_region(uint64_t addr, uint64_t length, const std::string& rkey,
                                                const std::string& ipc) {
  if (length == 0) return InvalidArgument("add_remote_region: length must be > 0");
  if (rkey.empty()) return InvalidArgument("add_remote_region: rkey is empty");
  if (addr + length < addr) return InvalidArgument("add_remote_region: address + length overflows");
  StatusOr<cuda_ipc::RemoteState> ipc_state = cuda_ipc::RemoteState::from_blob(ipc);
  if (!ipc_state.ok()) return InvalidArgument("add_remote_region: " + ipc_state.status().message());
  engine_->lock_waiters_.fetch_add(1);
  std::lock_guard<std::recursive_mutex> lock(engine_->mu_);
  engine_->lock_waiters_.fetch_sub(1);
  if (failed_.load()) return failure_;
  for (auto& r : remote_) {
    if (addr < r.addr + r.length && r.addr < addr + length)
      return AlreadyExists("add_remote_region: [" + hex(addr) + ", +" + std::to_string(length) +
                           ") overlaps a region already added for peer '" + peer_name_ + "'");
  }
  ucp_rkey_h rk = nullptr;
  ucs_status_t s = U().ucp_ep_rkey_unpack(ep_, rkey.data(), &rk);
  if (s != UCS_OK) return InvalidArgument("add_remote_region: rkey of peer '" + peer_name_ + "' could not be unpacked: " + ucx::status_text(s));
  auto pos = std::upper_bound(remote_.begin(), remote_.end(), addr,
                              [](uint64_t a, const RemoteRegion& r) { return a < r.addr; });
  pos = remote_.insert(pos, RemoteRegion{addr, length, rk, std::move(ipc_state.value())});
  return static_cast<uint32_t>(pos - remote_.begin());
}

StatusOr<std::shared_ptr<Request>> Endpoint::transfer(Op op, const uint64_t* local, const uint64_t* remote,
                                                      const uint64_t* lengths, size_t n, size_t n_lengths,
                                                      const std::string* notify) {
  if (n_lengths != 1 && n_lengths != n)
    return InvalidArgument("lengths: " + std::to_string(n_lengths) + " entries for " + std::to_string(n) +
                           " operations (give 1 or " + std::to_string(n) + ")");
  if (notify && notify->size() > kMaxNotifyBytes)
    return InvalidArgument("notify: " + std::to_string(notify->size()) + " bytes, the limit is " +
                           std::to_string(kMaxNotifyBytes));
  Engine* eng = engine_.get();
  auto req = std::make_shared<Request>();
  req->engine_ = engine_;
  req->endpoint_ = weak_from_this();
  req->count_ = n;
  if (notify) {
    req->has_notify_ = true;
    req->notify_header_ = eng->opts_.name;
    req->notify_payload_ = *notify;
  }
  // Resolve every entry before posting anything: bad input posts nothing. The same pass decides
  // the path: CUDA IPC while every entry qualifies (see transfer() in engine.h), else UCX.
  std::vector<Item> items(n);
  eng->lock_waiters_.fetch_add(1);
  std::lock_guard<std::recursive_mutex> lock(eng->mu_);
  eng->lock_waiters_.fetch_sub(1);
  if (eng->closed_.load()) return Status(Code::kIllegalTransition, "transfer: the transfer engine is shut down");
  if (failed_.load() || !ep_) return failed_.load() ? failure_ : PeerError("peer '" + peer_name_ + "': endpoint is closed");
  bool ipc = eng->copier_ != nullptr && n > 0;
  int device = -1;
  uint64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    uint64_t len = lengths[n_lengths == 1 ? 0 : i];
    if (len == 0) return InvalidArgument("lengths[" + std::to_string(i) + "] is 0");
    const Region* lr = eng->lookup_local_locked(local[i], len);
    if (lr == nullptr)
      return InvalidArgument("local[" + std::to_string(i) + "]: [" + hex(local[i]) + ", +" + std::to_string(len) +
                             ") is not inside one registered local region");
    auto it = std::upper_bound(remote_.begin(), remote_.end(), remote[i],
                               [](uint64_t a, const RemoteRegion& r) { return a < r.addr; });
    if (it == remote_.begin() || remote[i] + len > (it - 1)->addr + (it - 1)->length || remote[i] + len < remote[i])
      return InvalidArgument("remote[" + std::to_string(i) + "]: [" + hex(remote[i]) + ", +" + std::to_string(len) +
                             ") is not inside one region added for peer '" + peer_name_ + "'");
    items[i] = Item{lr, static_cast<uint32_t>(it - 1 - remote_.begin())};
    if (ipc && (lr->kind != MemKind::kCuda || lr->device < 0 || (device >= 0 && lr->device != device) ||
                !(it - 1)->ipc.usable()))
      ipc = false;
    else if (ipc)
      device = lr->device;
    total += len;
  }
  req->bytes_ = total;
  if (ipc) {
    StatusOr<std::shared_ptr<Request>> r =
        transfer_ipc_locked(op, local, remote, lengths, n, n_lengths, items, device, req);
    if (!r.ok() || r.value()) return r;  // posted, or a CUDA error; nullptr: a mapping failed, use UCX
  }
  if (n == 0) {
    // A flush also covers the IPC copies posted to this peer before it.
    for (const auto& r : eng->ipc_pending_)
      if (r->endpoint_.lock().get() == this) req->after_.push_back(r);
  }
  ucp_request_param_t p;
  std::memset(&p, 0, sizeof(p));
  // Entries that continue the previous one on both sides (same registrations) become one
  // operation: runs of consecutive block ids cost one put instead of one per block.
  size_t i = 0;
  while (i < n) {
    uint64_t lo = local[i], ro = remote[i], len = lengths[n_lengths == 1 ? 0 : i];
    size_t j = i + 1;
    while (j < n && local[j] == lo + len && remote[j] == ro + len && items[j].local == items[i].local &&
           items[j].remote == items[i].remote) {
      len += lengths[n_lengths == 1 ? 0 : j];
      ++j;
    }
    ucp_rkey* rkey = remote_[items[i].remote].rkey;
    p.op_attr_mask = UCP_OP_ATTR_FIELD_MEMH;
    p.memh = items[i].local->memh;
    ucs_status_ptr_t sp =
        op == Op::kPut ? U().ucp_put_nbx(ep_, reinterpret_cast<void*>(lo), len, ro, rkey, &p)
                       : U().ucp_get_nbx(ep_, reinterpret_cast<void*>(lo), len, ro, rkey, &p);
    i = j;
    if (sp == nullptr) continue;
    if (UCS_PTR_IS_ERR(sp)) {
      if (failed_.load()) return failure_;
      return peer_status(peer_name_, op == Op::kPut ? "ucp_put_nbx" : "ucp_get_nbx", UCS_PTR_STATUS(sp));
    }
    U().ucp_request_free(sp);  // completes in the background; the flush below covers it
    if (failed_.load()) return failure_;
  }
  auto* pend = new Pending{req, eng, notify != nullptr};
  ucp_request_param_t fp;
  std::memset(&fp, 0, sizeof(fp));
  fp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  fp.cb.send = &Callbacks::send_done;
  fp.user_data = pend;
  eng->inflight_.fetch_add(1);
  ucs_status_ptr_t sp = U().ucp_ep_flush_nbx(ep_, &fp);
  if (sp == nullptr || UCS_PTR_IS_ERR(sp)) {
    eng->inflight_.fetch_sub(1);
    delete pend;
    eng->track_locked(req, sp, notify != nullptr);
  }
  eng->wake();
  return req;
}

StatusOr<std::shared_ptr<Request>> Endpoint::notify(const std::string& message) {
  if (message.size() > kMaxNotifyBytes)
    return InvalidArgument("notify: " + std::to_string(message.size()) + " bytes, the limit is " +
                           std::to_string(kMaxNotifyBytes));
  Engine* eng = engine_.get();
  auto req = std::make_shared<Request>();
  req->engine_ = engine_;
  req->endpoint_ = weak_from_this();
  req->has_notify_ = true;
  req->notify_header_ = eng->opts_.name;
  req->notify_payload_ = message;
  eng->lock_waiters_.fetch_add(1);
  std::lock_guard<std::recursive_mutex> lock(eng->mu_);
  eng->lock_waiters_.fetch_sub(1);
  if (eng->closed_.load()) return Status(Code::kIllegalTransition, "notify: the transfer engine is shut down");
  if (failed_.load() || !ep_) return failed_.load() ? failure_ : PeerError("peer '" + peer_name_ + "': endpoint is closed");
  eng->send_notify_locked(req, this);
  eng->wake();
  return req;
}

StatusOr<std::shared_ptr<Request>> Endpoint::flush() {
  return transfer(Op::kPut, nullptr, nullptr, nullptr, 0, 0, nullptr);
}

Status Endpoint::close(bool force, double timeout_s) {
  Engine* eng = engine_.get();
  {
    std::lock_guard<std::recursive_mutex> lock(eng->mu_);
    if (failed_.load() || !ep_) return Status::Ok();
    if (!force) {
      // Graceful: wait for what is in flight first.
    }
  }
  if (!force) {
    auto f = flush();
    if (f.ok()) {
      Status st = f.value()->wait(timeout_s);
      if (!st.ok() && st.code() == Code::kTimeout) force = true;
    }
  }
  std::lock_guard<std::recursive_mutex> lock(eng->mu_);
  if (failed_.load() || !ep_) return Status::Ok();
  failed_.store(true);
  failure_ = PeerError("peer '" + peer_name_ + "': endpoint was closed");
  std::vector<ucp_rkey*> rkeys;
  drop_remote_locked(&rkeys);
  eng->orphan_locked(ep_, std::move(rkeys), force);
  ep_ = nullptr;
  if (!eng->opts_.progress_thread) eng->progress_locked();
  return Status::Ok();
}

}  // namespace kvbm::transfer
