/* Sleep with weights offloaded and the KV cache discarded; every weight byte back after wake;
 * the device memory really returned to the driver while asleep. */
#include "common.h"

#define NW 4
#define NKV 2

int main(void) {
  const size_t wsize = 64 * MIB, kvsize = 128 * MIB;
  void *w[NW], *kv[NKV];
  for (int i = 0; i < NW; i++) {
    w[i] = alloc_tagged(wsize, "weights");
    device_fill(w[i], wsize, (uint64_t)i + 1);
  }
  for (int i = 0; i < NKV; i++) kv[i] = alloc_tagged(kvsize, "kv_cache");

  size_t free_awake = 0, free_asleep = 0, free_woken = 0, total = 0;
  CHECK_OK(devmem_mem_get_info(0, &free_awake, &total));

  const char *offload[] = {"weights"};
  CHECK_OK(devmem_sleep(offload, 1));
  devmem_transfer t;
  CHECK_OK(devmem_get_last_transfer(&t));
  const size_t all = NW * wsize + NKV * kvsize;
  CHECK(t.bytes_freed == all);
  CHECK(t.bytes_saved == NW * wsize);
  CHECK(t.bytes_discarded == NKV * kvsize);
  double sleep_s = t.seconds;
  CHECK_OK(devmem_mem_get_info(0, &free_asleep, &total));
  /* The driver may round its own bookkeeping: allow 2 MiB of slack. */
  CHECK(free_asleep + 2 * MIB >= free_awake + all);

  devmem_allocation_info info;
  CHECK_OK(devmem_get_allocation_info(w[0], &info));
  CHECK(info.state == DEVMEM_STATE_OFFLOADED && info.handle == 0);
  CHECK_OK(devmem_get_allocation_info(kv[0], &info));
  CHECK(info.state == DEVMEM_STATE_DISCARDED);

  CHECK_OK(devmem_wake_up(NULL, 0));
  CHECK_OK(devmem_get_last_transfer(&t));
  CHECK(t.bytes_mapped == all && t.bytes_restored == NW * wsize);
  CHECK_OK(devmem_mem_get_info(0, &free_woken, &total));
  CHECK(free_woken <= free_awake + 2 * MIB);

  size_t checked = 0;
  for (int i = 0; i < NW; i++) {
    CHECK(device_mismatches(w[i], wsize, (uint64_t)i + 1) == 0);
    checked += wsize;
  }
  for (int i = 0; i < NKV; i++) {
    device_fill(kv[i], kvsize, 99);
    CHECK(device_mismatches(kv[i], kvsize, 99) == 0);
  }
  for (int i = 0; i < NW; i++) CHECK_OK(devmem_free(w[i]));
  for (int i = 0; i < NKV; i++) CHECK_OK(devmem_free(kv[i]));
  printf("test_sleep_wake: ok: freed %zu bytes while asleep (mem_get_info +%zu), sleep %.4f s, "
         "wake %.4f s, %zu weight bytes identical\n",
         all, free_asleep - free_awake, sleep_s, t.seconds, checked);
  return 0;
}
