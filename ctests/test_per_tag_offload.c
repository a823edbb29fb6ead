/* Offload one tag while another stays mapped and usable; wake one tag at a time; free in
 * every state. */
#include "common.h"

int main(void) {
  void *a = alloc_tagged(16 * MIB, "a");
  void *b = alloc_tagged(16 * MIB, "b");
  void *c = alloc_tagged(16 * MIB, "c");
  device_fill(a, 16 * MIB, 1);
  device_fill(b, 16 * MIB, 2);
  device_fill(c, 16 * MIB, 3);
  const char *ta[] = {"a"}, *tb[] = {"b"};
  CHECK_OK(devmem_offload(ta, 1));
  CHECK_OK(devmem_offload(tb, 1));
  devmem_allocation_info info;
  CHECK_OK(devmem_get_allocation_info(c, &info));
  CHECK(info.state == DEVMEM_STATE_MAPPED);
  CHECK(device_mismatches(c, 16 * MIB, 3) == 0);
  CHECK_OK(devmem_wake_up(ta, 1));
  CHECK(device_mismatches(a, 16 * MIB, 1) == 0);
  CHECK_OK(devmem_get_allocation_info(b, &info));
  CHECK(info.state == DEVMEM_STATE_OFFLOADED);
  /* Free b while offloaded, c while mapped, a after a discard. */
  CHECK_OK(devmem_free(b));
  CHECK_OK(devmem_free(c));
  CHECK_OK(devmem_discard(ta, 1));
  CHECK_OK(devmem_free(a));
  devmem_stats s;
  CHECK_OK(devmem_get_stats(NULL, &s));
  CHECK(s.allocations.current == 0 && s.offloaded_bytes.current == 0);
  printf("test_per_tag_offload: ok\n");
  return 0;
}
