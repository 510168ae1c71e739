#include "tiers/host_arena.h"

#include <cstring>
#include <string>

#include "csrc/block_index.h"
#include "csrc/build_info.h"
#include "csrc/host_copy.h"

namespace kvbm {

StatusOr<std::unique_ptr<HostArena>> HostArena::create(uint32_t num_slots, uint64_t slot_bytes, bool want_pinned,
                                                       bool require_pinned) {
  if (num_slots == 0) return InvalidArgument("host arena: capacity holds no block (num_slots == 0)");
  if (slot_bytes == 0) return InvalidArgument("host arena: block_bytes must be positive");
  if (slot_bytes > (uint64_t{1} << 40) / num_slots)
    return InvalidArgument("host arena: " + std::to_string(num_slots) + " x " + std::to_string(slot_bytes) +
                           " bytes is larger than 1 TiB");
  const size_t bytes = static_cast<size_t>(num_slots) * slot_bytes;
  if (require_pinned && !cuda_available())
    return CudaUnavailable("host_pinned=True needs a CUDA build and a usable GPU (cuda_available() is False)");
  auto buf = alloc_host(bytes, want_pinned);
  if (!buf.ok() && want_pinned && !require_pinned) buf = alloc_host(bytes, false);  // pinning failed: pageable
  if (!buf.ok()) return buf.status();
  if (require_pinned && !buf.value().pinned()) return CudaError("host arena: pinned allocation was not possible");
  std::memset(buf.value().data(), 0, bytes);
  return std::unique_ptr<HostArena>(new HostArena(num_slots, slot_bytes, std::move(buf.value())));
}

Status HostArena::check_slot(uint32_t slot) const {
  if (slot >= num_slots_)
    return OutOfRange("host slot " + std::to_string(slot) + " >= " + std::to_string(num_slots_) + " slots");
  return Status::Ok();
}

Status HostArena::write(const uint32_t* slots, size_t n, const uint8_t* const* src_rows) {
  for (size_t i = 0; i < n; ++i)
    if (slots[i] != kNoSlot) KVBM_RETURN_IF_ERROR(check_slot(slots[i]));
  for (size_t i = 0; i < n; ++i)
    if (slots[i] != kNoSlot) copy_bytes(slot_ptr(slots[i]), src_rows[i], slot_bytes_);
  return Status::Ok();
}

Status HostArena::read(const uint32_t* slots, size_t n, uint8_t* const* dst_rows) {
  for (size_t i = 0; i < n; ++i) KVBM_RETURN_IF_ERROR(check_slot(slots[i]));
  for (size_t i = 0; i < n; ++i) copy_bytes(dst_rows[i], slot_ptr(slots[i]), slot_bytes_);  // Note [Host copies]
  return Status::Ok();
}

}  // namespace kvbm
