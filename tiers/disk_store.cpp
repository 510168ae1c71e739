// DiskStore: slab files, O_DIRECT slot IO on a thread pool, CRC32C on write and read.
// See Note [Disk tier split] in disk_store.h.
#include "tiers/disk_store.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <set>

#include "csrc/checksum.h"
#include "csrc/host_copy.h"

namespace kvbm {

namespace {

uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

bool is_aligned(const void* p, uint64_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

bool is_space_errno(int e) { return e == ENOSPC || e == EFBIG || e == EDQUOT; }

struct AlignedBuf {
  uint8_t* p = nullptr;
  explicit AlignedBuf(uint64_t n) {
    void* q = nullptr;
    if (n && posix_memalign(&q, kDiskAlignment, n) == 0) p = static_cast<uint8_t*>(q);
  }
  ~AlignedBuf() { std::free(p); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
};

// Full pwrite; returns 0 or the errno of the failure.
int pwrite_all(int fd, const uint8_t* p, uint64_t n, uint64_t off) {
  while (n > 0) {
    ssize_t w = ::pwrite(fd, p, n, static_cast<off_t>(off));
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (w == 0) return EIO;
    p += w;
    n -= static_cast<uint64_t>(w);
    off += static_cast<uint64_t>(w);
  }
  return 0;
}

// pread until n bytes or end of file; *got receives the count. Returns 0 or errno.
int pread_all(int fd, uint8_t* p, uint64_t n, uint64_t off, uint64_t* got) {
  *got = 0;
  while (n > 0) {
    ssize_t r = ::pread(fd, p, n, static_cast<off_t>(off));
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (r == 0) break;
    p += r;
    n -= static_cast<uint64_t>(r);
    off += static_cast<uint64_t>(r);
    *got += static_cast<uint64_t>(r);
  }
  return 0;
}

// Full pwritev/preadv of a header page plus a data part at `off`. Returns 0 or errno; for reads
// *got receives the bytes read (stops at end of file).
int pv_all(bool write, int fd, uint8_t* hdr, uint8_t* data, uint64_t data_len, uint64_t off, uint64_t* got) {
  struct iovec iov[2] = {{hdr, kRecordHeader}, {data, data_len}};
  int idx = 0;
  uint64_t total = 0;
  while (idx < 2) {
    ssize_t r = write ? ::pwritev(fd, iov + idx, 2 - idx, static_cast<off_t>(off + total))
                      : ::preadv(fd, iov + idx, 2 - idx, static_cast<off_t>(off + total));
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (r == 0) {
      if (write) return EIO;
      break;
    }
    total += static_cast<uint64_t>(r);
    uint64_t left = static_cast<uint64_t>(r);
    while (idx < 2 && left >= iov[idx].iov_len) {
      left -= iov[idx].iov_len;
      ++idx;
    }
    if (idx < 2) {
      iov[idx].iov_base = static_cast<uint8_t*>(iov[idx].iov_base) + left;
      iov[idx].iov_len -= left;
    }
  }
  if (got) *got = total;
  return 0;
}

uint64_t now_us() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

constexpr char kMagic[8] = {'K', 'V', 'B', 'M', 'R', 'E', 'C', '1'};

template <class T>
T get_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <class T>
void put_le(uint8_t* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}

void build_header(uint8_t* h, uint64_t slot, uint64_t length, uint32_t crc, const uint8_t* key, uint32_t key_len,
                  const std::string& ns) {
  std::memset(h, 0, kRecordHeader);
  std::memcpy(h, kMagic, 8);
  put_le<uint32_t>(h + 8, kRecordVersion);
  put_le<uint64_t>(h + 16, slot);
  put_le<uint64_t>(h + 24, length);
  put_le<uint32_t>(h + 32, crc);
  put_le<uint32_t>(h + 36, key_len);
  put_le<uint64_t>(h + 40, now_us());
  std::memcpy(h + 48, ns.data(), kNamespaceBytes);
  std::memcpy(h + 64, key, key_len);
  put_le<uint32_t>(h + 12, crc32c(h + 16, 48 + key_len));
}

// Empty when the header is a well-formed record of `slot` in namespace `ns`; else why not.
std::string header_problem(const uint8_t* h, uint64_t slot, const std::string& ns) {
  if (std::memcmp(h, kMagic, 8) != 0) return "no record header (bad magic)";
  uint32_t ver = get_le<uint32_t>(h + 8);
  if (ver != kRecordVersion) return "record format version " + std::to_string(ver) + " (this kvbm reads " +
                                    std::to_string(kRecordVersion) + ")";
  uint32_t kl = get_le<uint32_t>(h + 36);
  if (kl == 0 || kl > kMaxKeyBytes) return "record key length " + std::to_string(kl) + " out of range";
  if (get_le<uint32_t>(h + 12) != crc32c(h + 16, 48 + kl)) return "record header CRC mismatch";
  if (get_le<uint64_t>(h + 16) != slot)
    return "record of slot " + std::to_string(get_le<uint64_t>(h + 16)) + " found in slot " + std::to_string(slot);
  if (std::memcmp(h + 48, ns.data(), kNamespaceBytes) != 0) return "record of another namespace";
  return std::string();
}

std::string errno_text(int e) { return std::string(std::strerror(e)) + " (errno " + std::to_string(e) + ")"; }

}  // namespace

// ---- DiskIoBatch ----

DiskIoBatch::DiskIoBatch(DiskIoKind kind, std::vector<DiskOp> ops, int flag)
    : kind_(kind), ops_(std::move(ops)), results_(ops_.size()), flag_(flag), remaining_(1),
      ops_left_(ops_.size()) {}

Status DiskIoBatch::wait(double timeout_s) {
  if (done()) return Status::Ok();
  std::unique_lock<std::mutex> lk(mu_);
  if (timeout_s < 0) {
    cv_.wait(lk, [&] { return done(); });
    return Status::Ok();
  }
  auto dl = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  if (!cv_.wait_until(lk, dl, [&] { return done(); }))
    return Timeout("disk IO batch of " + std::to_string(ops_.size()) + " ops not done after " +
                   std::to_string(timeout_s) + " s");
  return Status::Ok();
}

// ---- DiskStore ----

DiskStore::DiskStore(const DiskStoreConfig& cfg) : cfg_(cfg) {}

DiskStore::~DiskStore() { close(); }

std::string DiskStore::slab_path(uint64_t slab) const {
  char name[32];
  std::snprintf(name, sizeof(name), "slab-%05llu.kvbm", static_cast<unsigned long long>(slab));
  return cfg_.dir + "/" + name;
}

StatusOr<std::unique_ptr<DiskStore>> DiskStore::open(const DiskStoreConfig& cfg_in) {
  DiskStoreConfig cfg = cfg_in;
  if (cfg.dir.empty()) return ConfigError("disk dir: empty path");
  struct stat st;
  if (::stat(cfg.dir.c_str(), &st) != 0)
    return ConfigError("disk dir '" + cfg.dir + "': " + errno_text(errno));
  if (!S_ISDIR(st.st_mode)) return ConfigError("disk dir '" + cfg.dir + "' is not a directory");
  if (cfg.slot_size == 0 || cfg.slot_size % kDiskAlignment != 0)
    return ConfigError("disk slot_size " + std::to_string(cfg.slot_size) + " must be a positive multiple of " +
                       std::to_string(kDiskAlignment) + " (the O_DIRECT alignment)");
  if (cfg.num_slots == 0)
    return ConfigError("disk num_slots is 0: capacity must hold at least one slot of " +
                       std::to_string(cfg.slot_size) + " bytes");
  if (cfg.slots_per_slab == 0) cfg.slots_per_slab = cfg.num_slots;
  if (cfg.io_threads < 1 || cfg.io_threads > 256)
    return ConfigError("disk io_threads " + std::to_string(cfg.io_threads) + " must be in [1, 256]");
  if (cfg.ns.empty()) cfg.ns.assign(kNamespaceBytes, '\0');
  if (cfg.ns.size() != kNamespaceBytes)
    return ConfigError("disk namespace digest must be " + std::to_string(kNamespaceBytes) + " bytes, got " +
                       std::to_string(cfg.ns.size()));
  if (cfg.slot_size > (uint64_t{1} << 40)) return ConfigError("disk slot_size " + std::to_string(cfg.slot_size) + " is absurdly large (> 1 TiB)");

  std::unique_ptr<DiskStore> s(new DiskStore(cfg));
  KVBM_RETURN_IF_ERROR(s->open_files());
  for (int i = 0; i < cfg.io_threads; ++i) s->threads_.emplace_back([p = s.get()] { p->worker_loop(); });
  return s;
}

Status DiskStore::open_files() {
  uint64_t nslabs = (cfg_.num_slots + cfg_.slots_per_slab - 1) / cfg_.slots_per_slab;
  bool direct = cfg_.o_direct;
  int base = cfg_.read_only ? O_RDONLY : (O_RDWR | O_CREAT);
  base |= O_CLOEXEC;
  auto close_all = [&] {
    for (int fd : fds_)
      if (fd >= 0) ::close(fd);
    fds_.clear();
  };
  for (int attempt = 0; attempt < 2; ++attempt) {
    bool refused = false;
    for (uint64_t i = 0; i < nslabs; ++i) {
      std::string path = slab_path(i);
      int fd = ::open(path.c_str(), base | (direct ? O_DIRECT : 0), 0644);
      if (fd < 0) {
        int e = errno;
        if (direct && e == EINVAL) {
          refused = true;
          fallback_reason_ = "open(O_DIRECT) of " + path + " failed: " + errno_text(e);
          break;
        }
        if (cfg_.read_only && e == ENOENT) {  // a slab never created: every read of it is a miss
          fds_.push_back(-1);
          continue;
        }
        close_all();
        return IoError("cannot open slab file " + path + ": " + errno_text(e));
      }
      fds_.push_back(fd);
    }
    if (!refused && direct && !fds_.empty() && fds_[0] >= 0) {
      // Some file systems accept O_DIRECT at open and refuse the IO itself.
      AlignedBuf probe(kDiskAlignment);
      ssize_t r = ::pread(fds_[0], probe.p, kDiskAlignment, 0);
      if (r < 0 && errno == EINVAL) {
        refused = true;
        fallback_reason_ = "O_DIRECT read of " + slab_path(0) + " failed: " + errno_text(EINVAL);
      }
    }
    if (!refused) break;
    close_all();
    direct = false;
  }
  o_direct_active_ = direct;
  struct rlimit rl;
  if (::getrlimit(RLIMIT_FSIZE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) fsize_limit_ = rl.rlim_cur;
  if (cfg_.preallocate && !cfg_.read_only) {
    preallocate();
  } else if (cfg_.grow_bytes > 0 && !cfg_.read_only) {
    alloc_end_.assign(fds_.size(), 0);
    for (size_t i = 0; i < fds_.size(); ++i) {
      struct stat st;
      // What a slab already spans counts as allocated: a hole left there is filled by the write.
      if (fds_[i] >= 0 && ::fstat(fds_[i], &st) == 0) alloc_end_[i] = static_cast<uint64_t>(st.st_size);
    }
  }
  return Status::Ok();
}

void DiskStore::grow_for(uint64_t slab, uint64_t end) {
  std::lock_guard<std::mutex> lk(grow_mu_);
  if (grow_off_ || end <= alloc_end_[slab]) return;
  const uint64_t slots = std::min(cfg_.slots_per_slab, cfg_.num_slots - slab * cfg_.slots_per_slab);
  uint64_t want = std::min(slots * slot_stride(), round_up(end, cfg_.grow_bytes));
  want = std::min(want, fsize_limit_);  // past RLIMIT_FSIZE fallocate would raise SIGXFSZ
  if (want <= alloc_end_[slab]) return;
  ctr_.grows.fetch_add(1, std::memory_order_relaxed);
  const uint64_t from = alloc_end_[slab];
  if (::fallocate(fds_[slab], 0, static_cast<off_t>(from), static_cast<off_t>(want - from)) == 0) {
    alloc_end_[slab] = want;
  } else if (errno == EOPNOTSUPP || errno == ENOSYS) {
    grow_off_ = true;  // this file system cannot: writes extend the files themselves
  }  // ENOSPC and the like: the write below reports its own outcome
}

void DiskStore::preallocate() {
  struct rlimit rl;
  uint64_t limit = UINT64_MAX;
  if (::getrlimit(RLIMIT_FSIZE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) limit = rl.rlim_cur;
  for (uint64_t i = 0; i < fds_.size(); ++i) {
    uint64_t slots = std::min(cfg_.slots_per_slab, cfg_.num_slots - i * cfg_.slots_per_slab);
    uint64_t want = slots * slot_stride();
    struct stat st;
    if (::fstat(fds_[i], &st) == 0 && static_cast<uint64_t>(st.st_size) >= want) continue;
    if (want > limit) {  // past RLIMIT_FSIZE fallocate would raise SIGXFSZ
      prealloc_error_ = slab_path(i) + ": " + std::to_string(want) + " bytes exceed RLIMIT_FSIZE " +
                        std::to_string(limit);
      return;
    }
    if (::fallocate(fds_[i], 0, 0, static_cast<off_t>(want)) != 0) {
      prealloc_error_ = "fallocate of " + slab_path(i) + " to " + std::to_string(want) +
                        " bytes failed: " + errno_text(errno);
      return;  // the rest stays sparse too
    }
  }
}

Status DiskStore::validate_ops(const std::vector<DiskOp>& ops) const {
  for (size_t i = 0; i < ops.size(); ++i) {
    const DiskOp& op = ops[i];
    if (op.slot >= cfg_.num_slots)
      return OutOfRange("op " + std::to_string(i) + ": slot " + std::to_string(op.slot) + " >= num_slots " +
                        std::to_string(cfg_.num_slots));
    if (op.length == 0 || op.length > cfg_.slot_size)
      return InvalidArgument("op " + std::to_string(i) + ": length " + std::to_string(op.length) +
                             " must be in [1, slot_size=" + std::to_string(cfg_.slot_size) + "]");
    if (op.buf == nullptr) return InvalidArgument("op " + std::to_string(i) + ": null buffer");
    if (op.key_len > kMaxKeyBytes || (op.key_len > 0 && op.key == nullptr))
      return InvalidArgument("op " + std::to_string(i) + ": block hash of " + std::to_string(op.key_len) +
                             " bytes (1.." + std::to_string(kMaxKeyBytes) + ")");
  }
  return Status::Ok();
}

StatusOr<std::shared_ptr<DiskIoBatch>> DiskStore::submit(DiskIoKind kind, std::vector<DiskOp> ops, int flag) {
  KVBM_RETURN_IF_ERROR(validate_ops(ops));
  auto b = std::make_shared<DiskIoBatch>(kind, std::move(ops), flag);
  {
    std::lock_guard<std::mutex> lk(qmu_);
    if (stopping_ || threads_.empty()) return IllegalTransition("disk store is closed");
    if (b->ops_.empty()) {
      b->remaining_.store(0, std::memory_order_release);
      return b;
    }
    for (size_t i = 0; i < b->ops_.size(); ++i) queue_.push_back(Task{b, i});
  }
  qcv_.notify_all();
  return b;
}

StatusOr<std::shared_ptr<DiskIoBatch>> DiskStore::submit_write(std::vector<DiskOp> ops, DiskSync sync) {
  for (size_t i = 0; i < ops.size(); ++i)
    if (ops[i].key_len == 0)
      return InvalidArgument("op " + std::to_string(i) + ": a write needs the block hash (records name themselves)");
  if (cfg_.read_only) return IllegalTransition("disk store at " + cfg_.dir + " was opened read-only");
  return submit(DiskIoKind::kWrite, std::move(ops), static_cast<int>(sync));
}

StatusOr<std::shared_ptr<DiskIoBatch>> DiskStore::submit_read(std::vector<DiskOp> ops, bool verify) {
  return submit(DiskIoKind::kRead, std::move(ops), verify ? 1 : 0);
}

void DiskStore::worker_loop() {
  AlignedBuf bounce(cfg_.slot_size + kRecordHeader);
  for (;;) {
    Task t;
    {
      std::unique_lock<std::mutex> lk(qmu_);
      qcv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping and drained
      t = std::move(queue_.front());
      queue_.pop_front();
    }
    if (bounce.p == nullptr) {
      t.batch->results_[t.index].status = Internal("cannot allocate a " + std::to_string(cfg_.slot_size) +
                                                   " byte aligned bounce buffer");
    } else {
      run_op(t.batch.get(), t.index, bounce.p + kRecordHeader, bounce.p);
    }
    finish_op(t.batch);
  }
}

void DiskStore::run_op(DiskIoBatch* b, size_t i, uint8_t* bounce, uint8_t* hdr) {
  const DiskOp& op = b->ops_[i];
  DiskOpResult& res = b->results_[i];
  const uint64_t slab = op.slot / cfg_.slots_per_slab;
  const uint64_t off = (op.slot % cfg_.slots_per_slab) * slot_stride();
  const int fd = fds_[slab];
  const bool direct = o_direct_active_;
  const bool in_place = !direct || (is_aligned(op.buf, kDiskAlignment) && op.length % kDiskAlignment == 0);
  const uint64_t io_len = direct ? round_up(op.length, kDiskAlignment) : op.length;
  auto where = [&] {
    return "slot " + std::to_string(op.slot) + " (" + slab_path(slab) + " @ " + std::to_string(off) + ")";
  };

  if (b->kind_ == DiskIoKind::kWrite) {
    res.crc = crc32c(op.buf, op.length);
    uint8_t* src = op.buf;
    if (!in_place) {
      copy_bytes(bounce, op.buf, op.length);
      std::memset(bounce + op.length, 0, io_len - op.length);
      src = bounce;
    }
    build_header(hdr, op.slot, op.length, res.crc, op.key, op.key_len, cfg_.ns);
    if (!alloc_end_.empty()) grow_for(slab, off + kRecordHeader + io_len);
    int e = pv_all(true, fd, hdr, src, io_len, off, nullptr);
    if (e == 0 && b->flag_ == static_cast<int>(DiskSync::kEach)) {
      ctr_.syncs.fetch_add(1, std::memory_order_relaxed);
      if (::fdatasync(fd) != 0) e = errno;
    }
    if (e != 0) {
      res.sys_errno = e;
      res.status = IoError("write of " + where() + " failed: " + errno_text(e));
      ctr_.write_errors.fetch_add(1, std::memory_order_relaxed);
      if (is_space_errno(e)) ctr_.enospc.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    ctr_.writes.fetch_add(1, std::memory_order_relaxed);
    ctr_.bytes_written.fetch_add(op.length, std::memory_order_relaxed);
    return;
  }

  // Read.
  if (fd < 0) {
    res.sys_errno = ENOENT;
    res.status = IoError("read of " + where() + ": slab file does not exist");
    ctr_.read_errors.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  uint8_t* dst = in_place ? op.buf : bounce;
  uint64_t got = 0;
  int e = pv_all(false, fd, hdr, dst, io_len, off, &got);
  if (e != 0 || got < kRecordHeader + op.length) {
    res.sys_errno = e;
    res.status = IoError(e != 0 ? "read of " + where() + " failed: " + errno_text(e)
                                : "short read of " + where() + ": expected " +
                                      std::to_string(kRecordHeader + op.length) + " bytes, got " +
                                      std::to_string(got) + " (slab truncated?)");
    ctr_.read_errors.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  std::string why = header_problem(hdr, op.slot, cfg_.ns);
  if (why.empty() && get_le<uint64_t>(hdr + 24) != op.length)
    why = "record holds " + std::to_string(get_le<uint64_t>(hdr + 24)) + " bytes, expected " +
          std::to_string(op.length);
  if (why.empty() && op.key_len > 0 &&
      (get_le<uint32_t>(hdr + 36) != op.key_len || std::memcmp(hdr + 64, op.key, op.key_len) != 0))
    why = "record of another block hash";
  if (why.empty() && b->flag_ && get_le<uint32_t>(hdr + 32) != op.expected_crc)
    why = "record CRC differs from the catalog's";
  if (!why.empty()) {
    res.status = ChecksumError(why + " at " + where());
    ctr_.record_mismatches.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  if (!in_place) copy_bytes(op.buf, bounce, op.length);  // Note [Host copies]
  res.crc = crc32c(op.buf, op.length);
  if (b->flag_ && res.crc != op.expected_crc) {
    char msg[160];
    std::snprintf(msg, sizeof(msg), "CRC32C mismatch: expected %08x, read %08x", op.expected_crc, res.crc);
    res.status = ChecksumError(std::string(msg) + " at " + where());
    ctr_.checksum_failures.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  ctr_.reads.fetch_add(1, std::memory_order_relaxed);
  ctr_.bytes_read.fetch_add(op.length, std::memory_order_relaxed);
}

Status DiskStore::scan_headers(uint64_t first, uint64_t count, std::vector<RecordHeaderInfo>* out,
                               uint64_t* invalid) const {
  AlignedBuf h(kRecordHeader);
  if (!h.p) return Internal("cannot allocate a header buffer");
  static const uint8_t zeros[64] = {0};
  uint64_t last = std::min(cfg_.num_slots, first + count);
  for (uint64_t s = first; s < last; ++s) {
    const uint64_t slab = s / cfg_.slots_per_slab;
    if (slab >= fds_.size() || fds_[slab] < 0) continue;
    uint64_t got = 0;
    if (pread_all(fds_[slab], h.p, kRecordHeader, (s % cfg_.slots_per_slab) * slot_stride(), &got) != 0 ||
        got < kRecordHeader)
      continue;
    if (std::memcmp(h.p, zeros, 64) == 0) continue;  // never written
    if (!header_problem(h.p, s, cfg_.ns).empty()) {
      ++*invalid;
      continue;
    }
    RecordHeaderInfo r;
    r.slot = s;
    r.length = get_le<uint64_t>(h.p + 24);
    r.crc = get_le<uint32_t>(h.p + 32);
    r.written_us = get_le<uint64_t>(h.p + 40);
    r.ns.assign(reinterpret_cast<const char*>(h.p + 48), kNamespaceBytes);
    r.key.assign(reinterpret_cast<const char*>(h.p + 64), get_le<uint32_t>(h.p + 36));
    if (r.length == 0 || r.length > cfg_.slot_size) {
      ++*invalid;
      continue;
    }
    out->push_back(std::move(r));
  }
  return Status::Ok();
}

void DiskStore::finish_op(const std::shared_ptr<DiskIoBatch>& b) {
  if (b->ops_left_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  // Last op of the batch: sync if asked, then publish completion.
  if (b->kind_ == DiskIoKind::kWrite && b->flag_ == static_cast<int>(DiskSync::kBatch)) {
    std::set<uint64_t> slabs;
    for (size_t i = 0; i < b->ops_.size(); ++i)
      if (b->results_[i].status.ok()) slabs.insert(b->ops_[i].slot / cfg_.slots_per_slab);
    for (uint64_t slab : slabs) {
      ctr_.syncs.fetch_add(1, std::memory_order_relaxed);
      if (::fdatasync(fds_[slab]) != 0) {
        int e = errno;
        for (size_t i = 0; i < b->ops_.size(); ++i) {
          DiskOpResult& r = b->results_[i];
          if (r.status.ok() && b->ops_[i].slot / cfg_.slots_per_slab == slab) {
            r.sys_errno = e;
            r.status = IoError("fdatasync of " + slab_path(slab) + " failed: " + errno_text(e));
            ctr_.write_errors.fetch_add(1, std::memory_order_relaxed);
            if (is_space_errno(e)) ctr_.enospc.fetch_add(1, std::memory_order_relaxed);
          }
        }
      }
    }
  }
  {
    std::lock_guard<std::mutex> lk(b->mu_);
    b->remaining_.store(0, std::memory_order_release);
  }
  b->cv_.notify_all();
}

Status DiskStore::sync_all() {
  for (size_t i = 0; i < fds_.size(); ++i) {
    if (fds_[i] < 0) continue;
    ctr_.syncs.fetch_add(1, std::memory_order_relaxed);
    if (::fdatasync(fds_[i]) != 0) return IoError("fdatasync of " + slab_path(i) + " failed: " + errno_text(errno));
  }
  return Status::Ok();
}

void DiskStore::close() {
  {
    std::lock_guard<std::mutex> lk(qmu_);
    stopping_ = true;
  }
  qcv_.notify_all();
  for (auto& t : threads_) t.join();
  threads_.clear();
  for (int fd : fds_)
    if (fd >= 0) ::close(fd);
  fds_.clear();
}

DiskStoreStats DiskStore::stats() const {
  DiskStoreStats s;
  s.writes = ctr_.writes.load();
  s.reads = ctr_.reads.load();
  s.bytes_written = ctr_.bytes_written.load();
  s.bytes_read = ctr_.bytes_read.load();
  s.write_errors = ctr_.write_errors.load();
  s.read_errors = ctr_.read_errors.load();
  s.enospc = ctr_.enospc.load();
  s.checksum_failures = ctr_.checksum_failures.load();
  s.syncs = ctr_.syncs.load();
  s.record_mismatches = ctr_.record_mismatches.load();
  s.grows = ctr_.grows.load();
  return s;
}

// ---- raw baseline ----

StatusOr<RawIoTiming> raw_direct_io(const std::string& path, uint64_t total_bytes, uint64_t chunk_bytes,
                                    bool fsync_after, uint64_t sync_every) {
  if (chunk_bytes == 0 || chunk_bytes % kDiskAlignment != 0)
    return InvalidArgument("chunk_bytes " + std::to_string(chunk_bytes) + " must be a positive multiple of 4096");
  if (total_bytes < chunk_bytes) return InvalidArgument("total_bytes must be >= chunk_bytes");
  AlignedBuf buf(chunk_bytes);
  if (!buf.p) return Internal("cannot allocate " + std::to_string(chunk_bytes) + " aligned bytes");
  uint64_t x = 0x9E3779B97F4A7C15ull;  // xorshift fill: not zeros, not compressible
  for (uint64_t i = 0; i + 8 <= chunk_bytes; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(buf.p + i, &x, 8);
  }
  RawIoTiming t;
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_DIRECT, 0644);
  t.o_direct = fd >= 0;
  if (fd < 0 && errno == EINVAL) fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return IoError("cannot open " + path + ": " + errno_text(errno));
  const uint64_t n = total_bytes / chunk_bytes;
  using clk = std::chrono::steady_clock;
  auto t0 = clk::now();
  for (uint64_t i = 0; i < n; ++i) {
    int e = pwrite_all(fd, buf.p, chunk_bytes, i * chunk_bytes);
    if (e == 0 && sync_every > 0 && (i + 1) % sync_every == 0 && ::fdatasync(fd) != 0) e = errno;
    if (e) {
      ::close(fd);
      ::unlink(path.c_str());
      return IoError("raw write to " + path + " failed: " + errno_text(e));
    }
  }
  if (fsync_after) ::fdatasync(fd);
  auto t1 = clk::now();
  for (uint64_t i = 0; i < n; ++i) {
    uint64_t got = 0;
    int e = pread_all(fd, buf.p, chunk_bytes, i * chunk_bytes, &got);
    if (e || got != chunk_bytes) {
      ::close(fd);
      ::unlink(path.c_str());
      return IoError("raw read from " + path + " failed: " + (e ? errno_text(e) : std::string("short read")));
    }
  }
  auto t2 = clk::now();
  ::close(fd);
  ::unlink(path.c_str());
  t.write_s = std::chrono::duration<double>(t1 - t0).count();
  t.read_s = std::chrono::duration<double>(t2 - t1).count();
  return t;
}

}  // namespace kvbm
