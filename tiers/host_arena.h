// The host DRAM tier's memory: a fixed-slot arena of `num_slots` x `slot_bytes`.
//
// It only moves bytes; which slot holds which block is the BlockIndex's business, and the
// index's Storing state and pins guarantee that nobody writes a slot that is being read.
// Slots are 4096-byte aligned when slot_bytes is a multiple of 4096 (what the disk tier's
// O_DIRECT path wants), and pinned when CUDA and a GPU are present, so GPU kernels and copy
// engines reach them directly.
#pragma once

#include <cstdint>
#include <memory>

#include "csrc/host_memory.h"
#include "csrc/status.h"

namespace kvbm {

class HostArena {
 public:
  static StatusOr<std::unique_ptr<HostArena>> create(uint32_t num_slots, uint64_t slot_bytes, bool want_pinned,
                                                     bool require_pinned);
  uint32_t num_slots() const { return num_slots_; }
  uint64_t slot_bytes() const { return slot_bytes_; }
  bool pinned() const { return buf_.pinned(); }
  uint8_t* slot_ptr(uint32_t slot) const { return buf_.data() + static_cast<uint64_t>(slot) * slot_bytes_; }
  Status check_slot(uint32_t slot) const;

  // Copy `n` blocks: src_rows[i] (slot_bytes each) -> slot slots[i]; slots equal to kNoSlot
  // are skipped.
  Status write(const uint32_t* slots, size_t n, const uint8_t* const* src_rows);
  // Copy slots[i] -> dst_rows[i].
  Status read(const uint32_t* slots, size_t n, uint8_t* const* dst_rows);

 private:
  HostArena(uint32_t num_slots, uint64_t slot_bytes, HostBuffer buf)
      : num_slots_(num_slots), slot_bytes_(slot_bytes), buf_(std::move(buf)) {}
  uint32_t num_slots_;
  uint64_t slot_bytes_;
  HostBuffer buf_;
};

}  // namespace kvbm
