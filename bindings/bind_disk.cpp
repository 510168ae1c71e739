// Bindings for the disk tier's byte mover (tiers/disk_store.h). No logic: argument conversion,
// keeping Python buffers alive while IO is in flight, and Status -> exception.
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bindings/common.h"
#include "tiers/disk_store.h"

namespace kvbm::bind {
namespace {

// A batch plus the Python objects whose memory it reads or writes. Destroying it waits for
// the IO to finish so that memory is never freed under a running transfer.
struct PyDiskIoHandle {
  std::shared_ptr<DiskIoBatch> batch;
  std::vector<py::object> owners;
  std::vector<std::string> keys;  // block hashes the ops point into
  ~PyDiskIoHandle() {
    if (batch && !batch->done()) {
      py::gil_scoped_release nogil;
      (void)batch->wait(-1);
    }
  }
};

std::vector<DiskOp> make_ops(const std::vector<uint64_t>& slots, const py::sequence& buffers,
                             const std::vector<uint64_t>& lengths, const std::vector<uint32_t>* crcs,
                             bool writable, std::vector<py::object>* owners,
                             const std::vector<std::string>* keys) {
  const size_t n = slots.size();
  if (static_cast<size_t>(py::len(buffers)) != n)
    fail(Code::kInvalidArgument, "buffers: " + std::to_string(py::len(buffers)) + " given for " +
                                     std::to_string(n) + " slots");
  if (!lengths.empty() && lengths.size() != n)
    fail(Code::kInvalidArgument, "lengths: " + std::to_string(lengths.size()) + " given for " +
                                     std::to_string(n) + " slots");
  if (crcs && crcs->size() != n)
    fail(Code::kInvalidArgument, "expected_crcs: " + std::to_string(crcs->size()) + " given for " +
                                     std::to_string(n) + " slots");
  if (keys && !keys->empty() && keys->size() != n)
    fail(Code::kInvalidArgument, "keys: " + std::to_string(keys->size()) + " given for " + std::to_string(n) +
                                     " slots");
  std::vector<DiskOp> ops(n);
  owners->reserve(n);
  for (size_t i = 0; i < n; ++i) {
    py::handle obj = buffers[i];
    uint64_t want = lengths.empty() ? 0 : lengths[i];
    std::string what = "buffers[" + std::to_string(i) + "]";
    ByteView v = get_bytes(obj, writable, what.c_str(), py::isinstance<py::int_>(obj) ? want : 0);
    if (want != 0 && v.size < want)
      fail(Code::kInvalidArgument, what + ": has " + std::to_string(v.size) + " bytes, length is " +
                                       std::to_string(want));
    ops[i].slot = slots[i];
    ops[i].buf = v.data;
    ops[i].length = want ? want : v.size;
    ops[i].expected_crc = crcs ? (*crcs)[i] : 0;
    if (keys && !keys->empty()) {
      const std::string& k = (*keys)[i];
      if (k.empty() || k.size() > kMaxKeyBytes)
        fail(Code::kInvalidArgument, "keys[" + std::to_string(i) + "]: a block hash of " + std::to_string(k.size()) +
                                         " bytes (1.." + std::to_string(kMaxKeyBytes) + ")");
      ops[i].key = reinterpret_cast<const uint8_t*>(k.data());
      ops[i].key_len = static_cast<uint32_t>(k.size());
    }
    owners->push_back(std::move(v.owner));
  }
  return ops;
}

py::dict stats_dict(const DiskStoreStats& s) {
  py::dict d;
  d["writes"] = s.writes;
  d["reads"] = s.reads;
  d["bytes_written"] = s.bytes_written;
  d["bytes_read"] = s.bytes_read;
  d["write_errors"] = s.write_errors;
  d["read_errors"] = s.read_errors;
  d["enospc"] = s.enospc;
  d["checksum_failures"] = s.checksum_failures;
  d["syncs"] = s.syncs;
  d["record_mismatches"] = s.record_mismatches;
  d["grows"] = s.grows;
  return d;
}

}  // namespace
}  // namespace kvbm::bind

KVBM_BINDINGS(disk, 20) {
  using namespace kvbm;
  using namespace kvbm::bind;

  m.attr("DISK_ALIGNMENT") = kDiskAlignment;
  m.attr("DISK_RECORD_HEADER") = kRecordHeader;
  m.attr("DISK_RECORD_VERSION") = kRecordVersion;
  m.attr("DISK_MAX_KEY_BYTES") = kMaxKeyBytes;
  // Status codes DiskIoHandle.results() reports per op (0 = ok).
  m.attr("DISK_CODE_IO") = static_cast<int>(Code::kIo);
  m.attr("DISK_CODE_CHECKSUM") = static_cast<int>(Code::kChecksum);

  py::class_<PyDiskIoHandle, std::shared_ptr<PyDiskIoHandle>>(
      m, "DiskIoHandle", "A batch of disk slot transfers in flight. Keeps its buffers alive until done.")
      .def("done", [](const PyDiskIoHandle& h) { return h.batch->done(); }, "True once every op finished.")
      .def(
          "wait",
          [](PyDiskIoHandle& h, std::optional<double> timeout) {
            Status s;
            {
              py::gil_scoped_release nogil;
              s = h.batch->wait(timeout ? *timeout : -1.0);
            }
            check(s);
          },
          py::arg("timeout") = py::none(),
          "Block until done (TransferTimeoutError after `timeout` seconds). IO errors are per op: "
          "see results().")
      .def("__len__", [](const PyDiskIoHandle& h) { return h.batch->size(); })
      .def(
          "results",
          [](const PyDiskIoHandle& h) {
            if (!h.batch->done()) fail(Code::kIllegalTransition, "results(): the disk IO batch is not done");
            const auto& rs = h.batch->results();
            const size_t n = rs.size();
            py::array_t<int32_t> codes(n);
            py::array_t<uint32_t> crcs(n);
            py::array_t<int32_t> errnos(n);
            py::list msgs;
            auto c = codes.mutable_unchecked<1>();
            auto k = crcs.mutable_unchecked<1>();
            auto e = errnos.mutable_unchecked<1>();
            for (size_t i = 0; i < n; ++i) {
              c(i) = static_cast<int32_t>(rs[i].status.code());
              k(i) = rs[i].crc;
              e(i) = rs[i].sys_errno;
              msgs.append(rs[i].status.ok() ? std::string() : rs[i].status.message());
            }
            return py::make_tuple(codes, crcs, errnos, msgs);
          },
          "(codes int32[n] (0 = ok, else a kvbm status code), crcs uint32[n], errnos int32[n], "
          "messages list[str]). Raises StateError before done().");

  py::class_<DiskStore>(m, "DiskStore",
                        "Fixed-size slots in slab files with O_DIRECT IO on a thread pool (no catalog: "
                        "see kvbm.tiers.disk).")
      .def(py::init([](const std::string& dir, uint64_t slot_size, uint64_t num_slots, uint64_t slots_per_slab,
                       int io_threads, bool o_direct, bool read_only, bool preallocate, const py::bytes& ns,
                       uint64_t grow_bytes) {
             DiskStoreConfig c;
             c.dir = dir;
             c.slot_size = slot_size;
             c.num_slots = num_slots;
             c.slots_per_slab = slots_per_slab;
             c.io_threads = io_threads;
             c.o_direct = o_direct;
             c.read_only = read_only;
             c.preallocate = preallocate;
             c.grow_bytes = grow_bytes;
             c.ns = std::string(ns);
             py::gil_scoped_release nogil;
             return check(DiskStore::open(c));
           }),
           py::arg("dir"), py::arg("slot_size"), py::arg("num_slots"), py::arg("slots_per_slab") = 0,
           py::arg("io_threads") = 4, py::arg("o_direct") = true, py::arg("read_only") = false,
           py::arg("preallocate") = true, py::arg("namespace") = py::bytes(""), py::arg("grow_bytes") = 0)
      .def(
          "write",
          [](DiskStore& s, const std::vector<uint64_t>& slots, const py::sequence& buffers,
             const std::vector<uint64_t>& lengths, int sync, const std::vector<std::string>& keys) {
            if (sync < 0 || sync > 2) fail(Code::kInvalidArgument, "sync: must be 0 (none), 1 (batch) or 2 (each), got " + std::to_string(sync));
            auto h = std::make_shared<PyDiskIoHandle>();
            h->keys = keys;
            auto ops = make_ops(slots, buffers, lengths, nullptr, false, &h->owners, &h->keys);
            h->batch = check(s.submit_write(std::move(ops), static_cast<DiskSync>(sync)));
            return h;
          },
          py::arg("slots"), py::arg("buffers"), py::arg("lengths") = std::vector<uint64_t>{},
          py::arg("sync") = 0, py::arg("keys") = std::vector<std::string>{},
          "Queue writes of buffers[i] (lengths[i] bytes, default its size) to slots[i]; returns a "
          "DiskIoHandle. sync: 0 none, 1 fdatasync each slab touched before done, 2 fdatasync after "
          "every op. keys[i]: the block hash written into the record header (required). results() crcs are "
          "CRC32C of the bytes written.")
      .def(
          "read",
          [](DiskStore& s, const std::vector<uint64_t>& slots, const py::sequence& buffers,
             const std::vector<uint64_t>& lengths, const std::vector<uint32_t>& expected_crcs, bool verify,
             const std::vector<std::string>& keys) {
            auto h = std::make_shared<PyDiskIoHandle>();
            h->keys = keys;
            auto ops = make_ops(slots, buffers, lengths, verify ? &expected_crcs : nullptr, true, &h->owners, &h->keys);
            h->batch = check(s.submit_read(std::move(ops), verify));
            return h;
          },
          py::arg("slots"), py::arg("buffers"), py::arg("lengths") = std::vector<uint64_t>{},
          py::arg("expected_crcs") = std::vector<uint32_t>{}, py::arg("verify") = true,
          py::arg("keys") = std::vector<std::string>{},
          "Queue reads of slots[i] into buffers[i]. The record header must name the slot, the store's "
          "namespace, lengths[i] and (when keys are given) keys[i]; with verify, its CRC and the bytes' "
          "CRC32C must equal expected_crcs[i]. An op that fails a check fails with the checksum code "
          "(its buffer then holds garbage).")
      .def(
          "scan_headers",
          [](const DiskStore& s, uint64_t first, uint64_t count) {
            std::vector<RecordHeaderInfo> recs;
            uint64_t invalid = 0;
            {
              py::gil_scoped_release nogil;
              check(s.scan_headers(first, count, &recs, &invalid));
            }
            py::list out;
            for (const auto& r : recs)
              out.append(py::make_tuple(r.slot, py::bytes(r.key), r.length, r.crc, r.written_us));
            return py::make_tuple(out, invalid);
          },
          py::arg("first") = 0, py::arg("count") = UINT64_MAX,
          "Valid record headers of slots [first, first + count): ([(slot, key, length, crc, written_us)], "
          "number of damaged or foreign headers).")
      .def_property_readonly("slot_stride", &DiskStore::slot_stride,
                             "Bytes a slot occupies in its slab (record header + slot_size).")
      .def("sync", [](DiskStore& s) { check(s.sync_all()); }, py::call_guard<py::gil_scoped_release>(),
           "fdatasync every slab file.")
      .def("close", &DiskStore::close, py::call_guard<py::gil_scoped_release>(),
           "Finish queued IO, stop the threads, close the files. Idempotent.")
      .def_property_readonly("o_direct_active", &DiskStore::o_direct_active)
      .def_property_readonly("fallback_reason", &DiskStore::fallback_reason)
      .def_property_readonly("prealloc_error", &DiskStore::prealloc_error,
                             "Why slabs were not (all) preallocated; empty when they were or it was off.")
      .def_property_readonly("slot_size", [](const DiskStore& s) { return s.config().slot_size; })
      .def_property_readonly("num_slots", [](const DiskStore& s) { return s.config().num_slots; })
      .def_property_readonly("slots_per_slab", [](const DiskStore& s) { return s.config().slots_per_slab; })
      .def_property_readonly("num_slabs", &DiskStore::num_slabs)
      .def("slab_path", &DiskStore::slab_path, py::arg("slab"))
      .def("stats", [](const DiskStore& s) { return stats_dict(s.stats()); });

  m.def(
      "raw_direct_io",
      [](const std::string& path, uint64_t total_bytes, uint64_t chunk_bytes, bool fsync_after,
         uint64_t sync_every) {
        StatusOr<RawIoTiming> r = [&] {
          py::gil_scoped_release nogil;
          return raw_direct_io(path, total_bytes, chunk_bytes, fsync_after, sync_every);
        }();
        RawIoTiming t = check(std::move(r));
        py::dict d;
        d["write_s"] = t.write_s;
        d["read_s"] = t.read_s;
        d["o_direct"] = t.o_direct;
        return d;
      },
      py::arg("path"), py::arg("total_bytes"), py::arg("chunk_bytes"), py::arg("fsync_after") = true,
      py::arg("sync_every") = 0,
      "Benchmark baseline: sequential O_DIRECT write then read of total_bytes in chunk_bytes requests "
      "(queue depth 1, one thread) through a temporary file at path; fdatasync at the end (fsync_after) "
      "and every sync_every chunks (> 0). Returns write_s, read_s, o_direct.");
}
