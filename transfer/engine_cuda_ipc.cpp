// The transfer engine's members of the CUDA IPC path (Note [CUDA IPC path] in cuda_ipc.h):
// posting one batch as a chunk-copy kernel, completing copies (and then notifying), and the
// per-peer state. Path selection itself happens in Endpoint::transfer (engine.cpp), in the same
// pass that validates every entry.
#include <algorithm>
#include <thread>

#include "transfer/engine.h"

namespace kvbm::transfer {

StatusOr<std::shared_ptr<Request>> Endpoint::transfer_ipc_locked(Op op, const uint64_t* local, const uint64_t* remote,
                                                                 const uint64_t* lengths, size_t n, size_t n_lengths,
                                                                 const std::vector<Item>& items, int device,
                                                                 std::shared_ptr<Request> req) {
  Engine* eng = engine_.get();
  // Map each remote region used (first use opens it); delta turns the peer's address into ours.
  std::vector<uint64_t> delta(remote_.size(), 0);
  std::vector<char> seen(remote_.size(), 0);
  for (const Item& it : items) {
    if (seen[it.remote]) continue;
    seen[it.remote] = 1;
    RemoteRegion& rr = remote_[it.remote];
    StatusOr<std::shared_ptr<cuda_ipc::Mapping>> m = rr.ipc.map(device, rr.addr);
    if (!m.ok()) return std::shared_ptr<Request>();  // remembered in rr.ipc: this and later batches use UCX
    delta[it.remote] = m.value()->base() + rr.ipc.offset() - rr.addr;
    req->keep_.push_back(std::move(m.value()));
  }
  const bool per_chunk = n_lengths != 1;
  auto fill = [&](uint64_t* pairs, uint64_t* lens) {
    for (size_t i = 0; i < n; ++i) {
      const uint64_t peer = remote[i] + delta[items[i].remote];
      pairs[2 * i] = op == Op::kPut ? local[i] : peer;
      pairs[2 * i + 1] = op == Op::kPut ? peer : local[i];
      if (lens) lens[i] = lengths[i];
    }
  };
  StatusOr<cuda_ipc::Copier::Ticket> t = eng->copier_->submit(device, n, per_chunk, lengths[0], req->bytes_, fill);
  if (!t.ok()) return t.status();
  req->cuda_ipc_ = true;
  req->ticket_ = t.value();
  eng->ipc_pending_.push_back(req);  // poll_ipc_locked completes it (and notifies) once the event fired
  eng->wake();
  return req;
}

unsigned Engine::poll_ipc_locked() {
  if (ipc_pending_.empty()) return 0;
  // Swapped out: notifying below may call UCX, whose callbacks may queue more.
  std::vector<std::shared_ptr<Request>> todo;
  todo.swap(ipc_pending_);
  unsigned n = 0;
  const bool own_thread = std::this_thread::get_id() == thread_.get_id();
  for (auto& r : todo) {
    if (!r->cuda_ipc_) {  // a flush waiting for earlier copies
      bool all = std::all_of(r->after_.begin(), r->after_.end(), [](const auto& d) { return d->done(); });
      if (!all) {
        ipc_pending_.push_back(std::move(r));
        continue;
      }
      r->after_.clear();
      r->finish(Status::Ok());
      ++n;
      continue;
    }
    StatusOr<bool> q = copier_->query(r->ticket_, own_thread);
    if (q.ok() && !q.value()) {
      ipc_pending_.push_back(std::move(r));
      continue;
    }
    copier_->release(r->ticket_);
    r->keep_.clear();  // the copy no longer needs the peer's memory mapped
    ++n;
    if (!q.ok()) {
      r->finish(q.status());
    } else if (r->has_notify_) {
      send_notify_locked(r, r->endpoint_.lock().get());  // the data is complete: now tell the peer
    } else {
      r->finish(Status::Ok());
    }
  }
  return n;
}

bool Endpoint::cuda_ipc() const {
  std::lock_guard<std::recursive_mutex> lock(engine_->mu_);
  if (!engine_->copier_) return false;
  return std::any_of(remote_.begin(), remote_.end(), [](const RemoteRegion& r) { return r.ipc.usable(); });
}

std::vector<std::pair<uint64_t, std::string>> Endpoint::cuda_ipc_states() const {
  std::lock_guard<std::recursive_mutex> lock(engine_->mu_);
  std::vector<std::pair<uint64_t, std::string>> out;
  for (const auto& r : remote_) out.emplace_back(r.addr, r.ipc.describe());
  return out;
}

}  // namespace kvbm::transfer
