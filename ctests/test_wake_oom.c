/* A wake that runs out of device memory undoes its mappings, keeps every backup and reports
 * DEVMEM_STATUS_OUT_OF_MEMORY; after memory is freed a second wake restores every byte. */
#include "common.h"

#define NW 4
#define MAX_BLOCKERS 4096

int main(void) {
  const size_t wsize = 256 * MIB;
  void *w[NW];
  for (int i = 0; i < NW; i++) {
    w[i] = alloc_tagged(wsize, "weights");
    device_fill(w[i], wsize, (uint64_t)i + 40);
  }
  const char *offload[] = {"weights"};
  CHECK_OK(devmem_sleep(offload, 1));

  /* Fill the device with blockers of `wsize` bytes until it is full: less than one weight
   * allocation's worth can be left, so the wake cannot complete. */
  static void *blockers[MAX_BLOCKERS];
  int nb = 0;
  CHECK_OK(devmem_set_current_tag("blocker"));
  while (nb < MAX_BLOCKERS) {
    void *p = NULL;
    devmem_status st = devmem_malloc(wsize, 0, &p);
    if (st == DEVMEM_STATUS_OUT_OF_MEMORY) break;
    CHECK_OK(st);
    blockers[nb++] = p;
  }
  CHECK(nb > 0 && nb < MAX_BLOCKERS);
  /* Give back one blocker: now some but not all of the weights fit, so the wake maps a few
   * and must undo them. */
  CHECK_OK(devmem_free(blockers[--nb]));

  CHECK_STATUS(devmem_wake_up(NULL, 0), DEVMEM_STATUS_OUT_OF_MEMORY, "every backup is kept");
  for (int i = 0; i < NW; i++) {
    devmem_allocation_info info;
    CHECK_OK(devmem_get_allocation_info(w[i], &info));
    CHECK(info.state == DEVMEM_STATE_OFFLOADED);
  }
  /* The failed wake left the device as it found it: one more blocker still fits. */
  void *again = NULL;
  CHECK_OK(devmem_malloc(wsize, 0, &again));
  CHECK_OK(devmem_free(again));

  while (nb > 0) CHECK_OK(devmem_free(blockers[--nb]));
  CHECK_OK(devmem_wake_up(NULL, 0));
  for (int i = 0; i < NW; i++) CHECK(device_mismatches(w[i], wsize, (uint64_t)i + 40) == 0);
  for (int i = 0; i < NW; i++) CHECK_OK(devmem_free(w[i]));
  printf("test_wake_oom: ok (device filled, wake refused with OUT_OF_MEMORY, retried, %zu bytes identical)\n",
         (size_t)NW * wsize);
  return 0;
}
