/* Discard releases memory without copies; the allocation is usable after wake. */
#include "common.h"

int main(void) {
  void *kv = alloc_tagged(32 * MIB, "kv_cache");
  void *w = alloc_tagged(8 * MIB, "weights");
  device_fill(w, 8 * MIB, 5);
  size_t before = 0, after = 0, total = 0;
  CHECK_OK(devmem_mem_get_info(0, &before, &total));
  const char *tags[] = {"kv_cache"};
  CHECK_OK(devmem_discard(tags, 1));
  devmem_transfer t;
  CHECK_OK(devmem_get_last_transfer(&t));
  CHECK(t.bytes_discarded == 32 * MIB && t.bytes_saved == 0);
  CHECK_OK(devmem_mem_get_info(0, &after, &total));
  CHECK(after + 2 * MIB >= before + 32 * MIB);
  devmem_stats s;
  CHECK_OK(devmem_get_stats("kv_cache", &s));
  CHECK(s.discarded_bytes.current == 32 * MIB && s.mapped_bytes.current == 0);
  /* The weights were not touched. */
  CHECK(device_mismatches(w, 8 * MIB, 5) == 0);
  /* Discarding again is a no-op. */
  CHECK_OK(devmem_discard(tags, 1));
  CHECK_OK(devmem_get_last_transfer(&t));
  CHECK(t.allocations == 0);
  CHECK_OK(devmem_wake_up(tags, 1));
  device_fill(kv, 32 * MIB, 6);
  CHECK(device_mismatches(kv, 32 * MIB, 6) == 0);
  CHECK_OK(devmem_free(kv));
  CHECK_OK(devmem_free(w));
  printf("test_discard: ok\n");
  return 0;
}
