/* Allocation and free through both APIs, lookups, statistics, and vLLM's primitives over a
 * caller-reserved range. */
#include "common.h"

#include <string.h>

int main(void) {
  size_t granularity = 0;
  CHECK_OK(devmem_granularity(0, &granularity));
  CHECK(granularity >= 4096 && (granularity & (granularity - 1)) == 0);

  const size_t sizes[] = {1, granularity, granularity + 1, 64 * MIB};
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
    void *p = alloc_tagged(sizes[i], "weights");
    device_fill(p, sizes[i], i);
    CHECK(device_mismatches(p, sizes[i], i) == 0);
    devmem_allocation_info info;
    CHECK_OK(devmem_get_allocation_info((char *)p + sizes[i] - 1, &info));
    CHECK(info.ptr == (uint64_t)(uintptr_t)p);
    CHECK(info.requested_size == sizes[i]);
    CHECK(info.size % granularity == 0 && info.size >= sizes[i]);
    CHECK(info.state == DEVMEM_STATE_MAPPED);
    CHECK(strcmp(info.tag, "weights") == 0);
    CHECK_OK(devmem_free(p));
  }

  /* PyTorch's pluggable-allocator entry points. */
  void *q = my_malloc((ssize_t)(3 * MIB), 0, NULL);
  CHECK(q != NULL);
  device_fill(q, 3 * MIB, 7);
  CHECK(device_mismatches(q, 3 * MIB, 7) == 0);
  my_free(q, 12345, 0, NULL); /* the recorded size is used */
  CHECK(devmem_last_error_status() == DEVMEM_STATUS_SUCCESS);

  devmem_stats stats;
  CHECK_OK(devmem_get_stats(NULL, &stats));
  CHECK(stats.allocations.current == 0);
  CHECK(stats.allocations.total == 5);
  CHECK(stats.mapped_bytes.current == 0);
  CHECK(stats.mapped_bytes.peak >= 64 * MIB);

  /* vLLM's create_and_map / unmap_and_release over a range the caller reserved through the
   * CUDA driver (CUDA only). */
  const char *backend = getenv("DEVMEM_BACKEND");
  if (backend && strcmp(backend, "level_zero") == 0) {
    printf("test_alloc_free: ok (granularity %zu; Level Zero: CUDA primitives skipped)\n", granularity);
    return 0;
  }
  unsigned long long va = driver_reserve(2 * granularity, granularity);
  unsigned long long handle = 0;
  CHECK(create_and_map(0, (ssize_t)(2 * granularity), va, &handle) == DEVMEM_STATUS_SUCCESS);
  CHECK(handle != 0);
  device_fill((void *)(uintptr_t)va, 2 * granularity, 3);
  CHECK(device_mismatches((void *)(uintptr_t)va, 2 * granularity, 3) == 0);
  CHECK(unmap_and_release(0, (ssize_t)(2 * granularity), va, &handle) == DEVMEM_STATUS_SUCCESS);
  driver_free_va(va, 2 * granularity);

  printf("test_alloc_free: ok (granularity %zu)\n", granularity);
  return 0;
}
