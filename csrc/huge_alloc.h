// An allocator for the index's big arrays (hash table, entries, policy metadata).
//
// Note [Huge pages for the index]
// At 10M blocks the index's arrays are ~1 GB and every chain lookup touches them at random.
// With 4 KiB pages nearly every touch is also a TLB miss, whose page walk is itself a chain of
// dependent cache misses that prefetching does not hide (a prefetch that misses the TLB is
// dropped or stalls). Arrays of 2 MiB or more are therefore allocated 2 MiB-aligned and marked
// MADV_HUGEPAGE before their first touch, so the kernel backs them with transparent huge pages
// when it can (THP "madvise" or "always"; where THP is off this is a plain aligned allocation).
// The whole 1 GB then fits the second-level TLB. Smaller arrays get 64-byte (cache-line)
// alignment, so fixed-size records never straddle lines more than their size forces.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kvbm {

template <class T>
struct HugePageAllocator {
  using value_type = T;
  static constexpr size_t kHuge = size_t{2} << 20;

  HugePageAllocator() noexcept = default;
  template <class U>
  HugePageAllocator(const HugePageAllocator<U>&) noexcept {}

  T* allocate(size_t n) {
    if (n > static_cast<size_t>(-1) / sizeof(T)) throw std::bad_array_new_length();
    const size_t bytes = n * sizeof(T);
    const size_t align = bytes >= kHuge ? kHuge : 64;
    const size_t rounded = (bytes + align - 1) / align * align;
    void* p = std::aligned_alloc(align, rounded == 0 ? align : rounded);
    if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (align == kHuge) (void)madvise(p, rounded, MADV_HUGEPAGE);  // a hint: failure is harmless
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) noexcept { std::free(p); }

  template <class U>
  bool operator==(const HugePageAllocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const HugePageAllocator<U>&) const noexcept { return false; }
};

}  // namespace kvbm
