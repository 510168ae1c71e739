// DiskStore: the byte-moving half of the local SSD tier.
//
// Note [Disk tier split]
// The disk tier is two halves that may live in different processes (vLLM's scheduler decides,
// its worker moves bytes):
//   * DiskStore (this file, native): fixed-size slots in a few large slab files, slot reads and
//     writes by slot number, O_DIRECT with aligned bounce buffers, a pool of IO threads, async
//     handles, CRC32C computed on every write and verified on every read against the value the
//     caller expects.
//   * DiskCatalog (kvbm/tiers/disk.py): the persistent LMDB catalog (block hash -> slot, length,
//     checksum, namespace, times, hits), the free-slot map and eviction bookkeeping.
// DiskStore knows nothing about hashes; it never decides which slot to use.
//
// Geometry: slot s lives in slab file `slab-NNNNN.kvbm` number s / slots_per_slab at byte
// offset (s % slots_per_slab) * slot_size. slot_size is a multiple of kDiskAlignment (4096), so
// every slot starts on an aligned offset and a whole-slot transfer is a legal O_DIRECT request.
//
// Preallocation: by default each slab is fallocate()d to its full size when opened. On ext4 and
// XFS an O_DIRECT write that extends a file (or fills a hole) takes the inode lock exclusively
// and commits metadata per write, which serialises the IO threads; writes into preallocated
// space run concurrently (measured on ext4: 4 threads writing fresh 1 MiB slots went from ~70%
// of a raw sequential O_DIRECT write to ~100%). Preallocation is best effort: where it fails
// (ENOSPC, EFBIG, a file system without fallocate) or would pass RLIMIT_FSIZE, the slab stays
// sparse and grows as slots are written; prealloc_error() says why. A slab shorter than a
// slot's end therefore means that slot was never completely written (or the slab was cut).
//
// Growth on demand (grow_bytes > 0, preallocate off): nothing is reserved at open; before a write
// past the space already allocated in its slab, the IO thread fallocate()s the slab up to the
// write's end rounded up to grow_bytes (never past the slab's full size or RLIMIT_FSIZE). The
// files then occupy about what was written, plus less than one grow_bytes per slab, and writes
// still land in allocated space (the concurrent fast path above) except at most one per chunk.
// A failed fallocate is not an error: the write goes on and fills a hole (or fails by itself).
//
// O_DIRECT: requested by default. When the file system refuses it (open() or the first aligned
// read fails with EINVAL), the store falls back to buffered IO and reports it through
// o_direct_active() / fallback_reason() so the Python side can warn. Caller buffers that are
// not 4096-aligned or whose length is not a multiple of 4096 go through a per-thread aligned
// bounce buffer; aligned full-slot buffers are transferred in place.
//
// Durability (DiskSync): with kBatch a write batch is complete only after every slab it touched
// has been fdatasync'ed; with kEach every op is followed by its own fdatasync. Either way
// "handle done" means "data on stable storage" and the catalog may commit. With kNone the data
// is in the OS (page cache or device) when the handle completes: safe against a killed process,
// not against power loss.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "csrc/status.h"

namespace kvbm {

constexpr uint64_t kDiskAlignment = 4096;

// Note [Records name themselves]
// Every slot on disk is a record: one 4096-byte header page followed by the block's bytes (so a
// slot occupies slot_size + kRecordHeader bytes of its slab and the data stays O_DIRECT-aligned).
// The header, little-endian:
//   0 magic "KVBMREC1"   8 u32 version (kRecordVersion)   12 u32 CRC32C of bytes [16, 64 + key_len)
//  16 u64 slot  24 u64 length  32 u32 CRC32C of the data  36 u32 key_len (1..kMaxKeyBytes)
//  40 u64 written (us since the epoch)  48 u8[16] namespace digest  64 u8[key_len] block hash
// A read checks all of it against what the caller expects (slot, length, the store's namespace,
// the block hash when given, then the data CRC): a record that does not match is a checksum-coded
// miss, counted in record_mismatches, never served. The catalog can be rebuilt from the headers
// (scan_headers) when it is lost or damaged.
constexpr uint64_t kRecordHeader = 4096;
constexpr uint32_t kRecordVersion = 1;
constexpr uint32_t kMaxKeyBytes = 256;
constexpr uint64_t kNamespaceBytes = 16;

// A valid record header found by DiskStore::scan_headers.
struct RecordHeaderInfo {
  uint64_t slot = 0, length = 0, written_us = 0;
  uint32_t crc = 0;
  std::string key, ns;
};

struct DiskStoreConfig {
  std::string dir;              // existing, writable directory (read-only opening needs it readable)
  uint64_t slot_size = 0;       // bytes per slot, a multiple of kDiskAlignment
  uint64_t num_slots = 0;       // total slots (capacity = num_slots * slot_size)
  uint64_t slots_per_slab = 0;  // slots per slab file (0 = all in one slab)
  int io_threads = 4;           // IO worker threads (1..256)
  bool o_direct = true;         // try O_DIRECT; fall back to buffered IO if refused
  bool read_only = false;       // open slabs O_RDONLY, refuse writes
  bool preallocate = true;      // fallocate each slab to its full size at open (best effort)
  uint64_t grow_bytes = 0;      // with preallocate off: allocate slabs in chunks of this size as written
  std::string ns;               // namespace digest stamped into / checked in every record (0 or 16 bytes)
};

// One slot transfer. For writes `buf` is the source; for reads the destination (`length`
// bytes must be writable there). `length` <= slot_size.
struct DiskOp {
  uint64_t slot = 0;
  uint8_t* buf = nullptr;
  uint64_t length = 0;
  uint32_t expected_crc = 0;  // reads: checked when verify is on
  const uint8_t* key = nullptr;  // the block hash: written into the header / checked on read
  uint32_t key_len = 0;          // writes: 1..kMaxKeyBytes; reads: 0 = do not check the hash
};

// Outcome of one op. `crc` is the CRC32C of the bytes written (writes) or read (reads).
// `sys_errno` is the errno of a failed system call (0 otherwise), e.g. ENOSPC.
struct DiskOpResult {
  Status status;
  uint32_t crc = 0;
  int sys_errno = 0;
};

enum class DiskIoKind : int { kWrite = 0, kRead = 1 };

// When written data is forced to stable storage.
enum class DiskSync : int { kNone = 0, kBatch = 1, kEach = 2 };

// A batch of slot transfers in flight. Shared between the submitter and the IO threads.
class DiskIoBatch {
 public:
  DiskIoBatch(DiskIoKind kind, std::vector<DiskOp> ops, int flag);
  DiskIoKind kind() const { return kind_; }
  size_t size() const { return ops_.size(); }
  bool done() const { return remaining_.load(std::memory_order_acquire) == 0; }
  // Blocks until done or until timeout_s (< 0: forever) passes. Returns Timeout if not done.
  Status wait(double timeout_s);
  // Valid once done(): per-op outcomes, in submission order.
  const std::vector<DiskOpResult>& results() const { return results_; }
  const std::vector<DiskOp>& ops() const { return ops_; }

 private:
  friend class DiskStore;
  DiskIoKind kind_;
  std::vector<DiskOp> ops_;
  std::vector<DiskOpResult> results_;
  int flag_;                            // writes: a DiskSync; reads: 1 = verify crc
  std::atomic<size_t> remaining_;       // ops (plus the sync step) not finished yet
  std::atomic<size_t> ops_left_;        // ops not finished yet
  std::mutex mu_;
  std::condition_variable cv_;
};

struct DiskStoreStats {
  uint64_t writes = 0, reads = 0;                 // ops completed successfully
  uint64_t bytes_written = 0, bytes_read = 0;
  uint64_t write_errors = 0, read_errors = 0;     // IO errors (incl. ENOSPC, short reads)
  uint64_t enospc = 0;                            // writes refused for lack of space (ENOSPC/EFBIG/EDQUOT)
  uint64_t checksum_failures = 0;                 // reads whose CRC32C did not match
  uint64_t syncs = 0;                             // fdatasync calls
  uint64_t record_mismatches = 0;                 // reads whose record header did not match
  uint64_t grows = 0;                             // fallocate calls of growth on demand
};

class DiskStore {
 public:
  // Validates the config, opens/creates the slab files and starts the IO threads.
  // ConfigError names a bad field; IoError names the path and errno text.
  static StatusOr<std::unique_ptr<DiskStore>> open(const DiskStoreConfig& cfg);
  ~DiskStore();
  DiskStore(const DiskStore&) = delete;
  DiskStore& operator=(const DiskStore&) = delete;

  // Queue slot writes, synced as `sync` says (see DiskSync).
  // Errors here are about the request (slot out of range, length > slot_size, read-only
  // store, closed store); IO failures are reported per op in the batch results.
  StatusOr<std::shared_ptr<DiskIoBatch>> submit_write(std::vector<DiskOp> ops, DiskSync sync);
  // Queue slot reads. verify: compare CRC32C of the bytes read with op.expected_crc.
  StatusOr<std::shared_ptr<DiskIoBatch>> submit_read(std::vector<DiskOp> ops, bool verify);

  // fdatasync every slab file. IoError on failure.
  Status sync_all();
  // Waits for queued work, stops the threads, closes the files. Idempotent.
  void close();

  const DiskStoreConfig& config() const { return cfg_; }
  bool o_direct_active() const { return o_direct_active_; }
  const std::string& fallback_reason() const { return fallback_reason_; }
  const std::string& prealloc_error() const { return prealloc_error_; }
  uint64_t num_slabs() const { return fds_.size(); }
  // Bytes a slot occupies in its slab: header page + slot_size.
  uint64_t slot_stride() const { return cfg_.slot_size + kRecordHeader; }
  // Reads the headers of slots [first, first + count) and returns the valid ones (magic, version,
  // header CRC, slot number and namespace all matching); *invalid counts non-empty headers that
  // are not. Synchronous; missing or short slabs simply hold no records.
  Status scan_headers(uint64_t first, uint64_t count, std::vector<RecordHeaderInfo>* out,
                      uint64_t* invalid) const;
  std::string slab_path(uint64_t slab) const;
  DiskStoreStats stats() const;

 private:
  explicit DiskStore(const DiskStoreConfig& cfg);
  Status open_files();
  void preallocate();
  void grow_for(uint64_t slab, uint64_t end);
  void worker_loop();
  void run_op(DiskIoBatch* b, size_t i, uint8_t* bounce, uint8_t* hdr);
  void finish_op(const std::shared_ptr<DiskIoBatch>& b);
  Status validate_ops(const std::vector<DiskOp>& ops) const;
  StatusOr<std::shared_ptr<DiskIoBatch>> submit(DiskIoKind kind, std::vector<DiskOp> ops, int flag);

  DiskStoreConfig cfg_;
  std::vector<int> fds_;
  bool o_direct_active_ = false;
  std::string fallback_reason_;
  std::string prealloc_error_;
  std::mutex grow_mu_;
  std::vector<uint64_t> alloc_end_;  // per slab: bytes known allocated (grow_bytes > 0); grow_mu_
  bool grow_off_ = false;            // the file system refused fallocate: stop trying; grow_mu_
  uint64_t fsize_limit_ = UINT64_MAX;

  struct Task {
    std::shared_ptr<DiskIoBatch> batch;
    size_t index;
  };
  std::mutex qmu_;
  std::condition_variable qcv_;
  std::deque<Task> queue_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;

  struct Counters {
    std::atomic<uint64_t> writes{0}, reads{0}, bytes_written{0}, bytes_read{0}, write_errors{0},
        read_errors{0}, enospc{0}, checksum_failures{0}, syncs{0}, record_mismatches{0}, grows{0};
  };
  mutable Counters ctr_;
};

// Plain sequential O_DIRECT write then read of `total_bytes` in `chunk_bytes` requests at
// queue depth 1, one thread, through a file `path` (created, then removed): the raw baseline the
// disk benchmark compares the tier with. Returns {write_seconds, read_seconds}; with
// fsync_after the write time includes one fdatasync at the end, with sync_every > 0 also one
// after every sync_every chunks (the same flushes as the tier's "batch" durability).
struct RawIoTiming {
  double write_s = 0, read_s = 0;
  bool o_direct = false;
};
StatusOr<RawIoTiming> raw_direct_io(const std::string& path, uint64_t total_bytes, uint64_t chunk_bytes,
                                    bool fsync_after, uint64_t sync_every = 0);

}  // namespace kvbm
