// The transfer engine's same-host CUDA IPC path: export, mapping and one-kernel copies.
//
// Note [CUDA IPC path]
// Rationale. UCX's cuda_ipc transport moves a KV handoff as one operation per (layer, block)
// chunk: thousands of copy-engine submissions of 64 KiB each, about 10 GB/s where the GPU copies
// at 1.4 TB/s. Gather -> one put -> scatter would pass over HBM three times (at best a third of
// a copy). Instead, between processes of one host, the initiator maps the peer's memory into its
// own address space and one kernel (csrc/cuda/chunk_copy.cu) copies every chunk straight from
// source to destination: one read and one write of each byte.
//
// Approach.
// * Export: registering a `cuda` region also makes a Descriptor for it: the cudaIpcMemHandle of
//   the allocation holding it (its base comes from the driver's RANGE_START_ADDR, reached through
//   cudaGetDriverEntryPointByVersion: the extension links static cudart only and never libcuda,
//   so `import kvbm` works without a driver), the region's offset in that allocation, this
//   host's identity (boot id + hostname), a per-process token and the GPU's PCI bus id. Memory
//   that cannot be exported (VMM / expandable segments, stream-ordered pools, a range over two
//   allocations, no GPU) simply has no descriptor; such regions use UCX as before.
// * The descriptor is opaque bytes in the engine metadata (kvbm/transfer.py). A peer on the same
//   host maps it lazily, on the first transfer that needs it, with cudaIpcOpenMemHandle(...,
//   cudaIpcMemLazyEnablePeerAccess) on the device of the local memory of that transfer (a
//   descriptor from this very process needs no mapping: the address is already valid here). A
//   mapping that fails is remembered and the region stays on UCX.
// * Copy: when every local range of a put/get lies in this engine's `cuda` regions of one device
//   and every remote range in a region mapped over IPC, the engine writes the (src, dst) pair
//   table into a pinned staging slot, uploads it on its own stream, launches the kernel and
//   records the slot's event. The engine's progress (its thread, or the caller's wait) polls the
//   event; once complete the notification, if any, goes out on the ordinary UCX AM path, so the
//   receiver sees it only after the bytes are in place, exactly as on the UCX path.
//
// Limits.
// * Lifetime: a Mapping is shared by the remote region and every copy in flight that uses it;
//   it is closed (cudaIpcCloseMemHandle) when the peer's endpoint is closed or failed and the
//   last such copy completed, or when the engine shuts down. The exporter must keep the memory
//   allocated while peers hold mappings (the same rule as for its UCX registration). A peer that
//   dies is not noticed by the copy itself: its memory stays mapped until the endpoint closes.
// * Slots: a staging slot is reused only after the event recorded after its kernel completed.
// * The copy runs on SMs of the initiator's GPU (a few percent of them for a few hundred us per
//   handoff); ordering with the caller's own streams is the caller's business as with UCX: data
//   must be complete before put() is called.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "csrc/status.h"

namespace kvbm::transfer::cuda_ipc {

inline constexpr size_t kHandleBytes = 64;  // sizeof(cudaIpcMemHandle_t)

// What a peer needs to map one registered CUDA region; travels encoded as opaque bytes.
struct Descriptor {
  std::string handle;      // cudaIpcMemHandle_t of the allocation holding the region
  uint64_t offset = 0;     // region start - allocation base
  int32_t device = -1;     // exporter's device ordinal (meaningful in the exporting process only)
  uint64_t process = 0;    // exporter's process token (see process_token)
  std::string host;        // exporter's host identity (see host_identity)
  std::string pci_bus_id;  // exporter's GPU, for messages
};
std::string encode(const Descriptor& d);
// InvalidArgument when `blob` is not an encoded Descriptor.
StatusOr<Descriptor> decode(const std::string& blob);

// "<boot id>/<hostname>": equal for two processes of one running host.
const std::string& host_identity();
// Random per process (re-drawn after fork): equal only within one process.
uint64_t process_token();

// Whether this build and machine can run the IPC path: CUDA compiled in and a device present.
bool available();

// Exports [addr, addr + length) of CUDA memory. Sets *device to the memory's device ordinal (-1
// when unknown) and returns the encoded Descriptor, or "" with *why_not saying why the memory
// cannot be exported. Never fails otherwise.
std::string export_region(uint64_t addr, uint64_t length, int* device, std::string* why_not);

// A peer's allocation mapped into this process for kernels on one device.
class Mapping {
 public:
  Mapping(uint64_t base, int device, bool owned) : base_(base), device_(device), owned_(owned) {}
  ~Mapping();  // cudaIpcCloseMemHandle when owned
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  uint64_t base() const { return base_; }  // the allocation's base address in this process
  int device() const { return device_; }

 private:
  uint64_t base_;
  int device_;
  bool owned_;
};

// The IPC side of one remote region, kept by the endpoint (guarded by the engine's lock).
class RemoteState {
 public:
  // From the region's descriptor bytes ("" = none). InvalidArgument when malformed.
  static StatusOr<RemoteState> from_blob(const std::string& blob);
  // True when a mapping exists or may be tried (same host, not failed).
  bool usable() const { return kind_ == Kind::kUsable; }
  // The mapping for kernels on `device`, opened on first use; region_addr is the region's address
  // in the exporter. A failure marks the region unusable (later transfers go to UCX at once).
  StatusOr<std::shared_ptr<Mapping>> map(int device, uint64_t region_addr);
  uint64_t offset() const { return desc_.offset; }
  // "none", "other host", "not mapped", "mapped", or "failed: <why>".
  std::string describe() const;
  // Drops this region's references to its mappings (copies in flight keep theirs).
  void unmap() { maps_.clear(); }

 private:
  enum class Kind { kNone, kOtherHost, kUsable, kFailed };
  Kind kind_ = Kind::kNone;
  Descriptor desc_;
  std::string why_;
  std::vector<std::shared_ptr<Mapping>> maps_;  // one per device that used the region
};

struct CopySlot;

// The engine's copy queues: per device one non-blocking stream and a pool of staging slots
// (pinned host table + device table + event). Not thread-safe: the engine calls it under its lock.
class Copier {
 public:
  struct Ticket {
    int device = -1;
    CopySlot* slot = nullptr;
  };
  Copier();
  ~Copier();  // waits for the streams, frees slots and streams
  Copier(const Copier&) = delete;
  Copier& operator=(const Copier&) = delete;

  // Queues one kernel copying n chunks on `device`. fill(pairs, lengths) writes 2n addresses
  // (src, dst, ...) and, when per_chunk, n lengths into pinned staging; else every chunk is
  // `length` bytes. total_bytes sizes the launch. On error nothing stays queued or reserved.
  StatusOr<Ticket> submit(int device, uint64_t n, bool per_chunk, uint64_t length, uint64_t total_bytes,
                          const std::function<void(uint64_t* pairs, uint64_t* lengths)>& fill);
  // Ok(true) once the ticket's copy completed, Ok(false) while it runs, its CUDA error otherwise.
  // own_thread: called on the engine's progress thread, which keeps the ticket's device current
  // (restoring the previous one would make that thread create a context on device 0).
  StatusOr<bool> query(const Ticket& t, bool own_thread);
  // Returns the ticket's slot to the pool (only after query said it is complete or failed).
  void release(const Ticket& t);
  // Waits for everything queued (engine shutdown).
  void synchronize();

 private:
  struct Queue;
  StatusOr<Queue*> queue(int device);
  std::vector<std::unique_ptr<Queue>> queues_;
};

}  // namespace kvbm::transfer::cuda_ipc
