/* Soak: N sleep/wake cycles (default 200) with weights offloaded and a KV cache discarded; after
 * every wake the device's free memory must equal what it was before the first sleep (+-2 MiB),
 * every weight byte is checked every 50 cycles, and after the final free the device's free
 * memory is back where it started (+-2 MiB).
 *   soak_gpu [cycles] */
#include "common.h"

#define NW 8
#define NKV 4

static long long diff(size_t a, size_t b) { return (long long)a - (long long)b; }

int main(int argc, char **argv) {
  int cycles = argc > 1 ? atoi(argv[1]) : 200;
  const size_t wsize = 64 * MIB, kvsize = 128 * MIB;
  size_t free_start, free_awake, f, total;
  CHECK_OK(devmem_mem_get_info(0, &free_start, &total));
  void *w[NW], *kv[NKV];
  for (int i = 0; i < NW; i++) {
    w[i] = alloc_tagged(wsize, "weights");
    device_fill(w[i], wsize, (uint64_t)i + 7);
  }
  for (int i = 0; i < NKV; i++) kv[i] = alloc_tagged(kvsize, "kv_cache");
  const char *offload[] = {"weights"};
  /* The first cycle registers the host store, which costs a little device memory. */
  CHECK_OK(devmem_sleep(offload, 1));
  CHECK_OK(devmem_wake_up(NULL, 0));
  CHECK_OK(devmem_mem_get_info(0, &free_awake, &total));
  long long worst = 0;
  double t0 = now_seconds();
  for (int c = 0; c < cycles; c++) {
    CHECK_OK(devmem_sleep(offload, 1));
    CHECK_OK(devmem_wake_up(NULL, 0));
    CHECK_OK(devmem_mem_get_info(0, &f, &total));
    long long d = diff(f, free_awake);
    if (d < 0) d = -d;
    if (d > worst) worst = d;
    if (d > (long long)(2 * MIB)) {
      fprintf(stderr, "cycle %d: free memory after wake %zu, expected %zu\n", c, f, free_awake);
      return 1;
    }
    if (c % 50 == 0)
      for (int i = 0; i < NW; i++) CHECK(device_mismatches(w[i], wsize, (uint64_t)i + 7) == 0);
  }
  double seconds = now_seconds() - t0;
  for (int i = 0; i < NW; i++) CHECK(device_mismatches(w[i], wsize, (uint64_t)i + 7) == 0);
  for (int i = 0; i < NW; i++) CHECK_OK(devmem_free(w[i]));
  for (int i = 0; i < NKV; i++) CHECK_OK(devmem_free(kv[i]));
  size_t released = 0;
  CHECK_OK(devmem_release_host_store(&released));
  CHECK_OK(devmem_mem_get_info(0, &f, &total));
  long long end_diff = diff(f, free_start);
  printf("soak_gpu: %d cycles in %.1f s; free memory after every wake within %lld bytes of the first; "
         "after the final free %+lld bytes vs the start\n",
         cycles, seconds, worst, end_diff);
  if (end_diff > (long long)(2 * MIB) || end_diff < -(long long)(2 * MIB)) return 1;
  return 0;
}
