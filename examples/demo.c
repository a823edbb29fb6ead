/* devmem demo: allocate "weights" and a "kv_cache", sleep (weights offloaded to host memory,
 * KV cache discarded), show the device memory given back, wake, and check every weight byte.
 *
 *   demo [GiB of weights] [GiB of kv cache]
 *
 * Runs on whatever driver devmem loads: the real libcuda, or the emulator when
 * DEVMEM_CUDA_LIBRARY points at it. */
#include <devmem.h>

#include <stdio.h>
#include <stdlib.h>

#include "../ctests/common.h"

int main(int argc, char **argv) {
  double wgib = argc > 1 ? atof(argv[1]) : 2.0;
  double kvgib = argc > 2 ? atof(argv[2]) : 2.0;
  const size_t chunk = 256 * MIB;
  size_t nw = (size_t)(wgib * 1024.0 * 1024.0 * 1024.0) / chunk;
  size_t nkv = (size_t)(kvgib * 1024.0 * 1024.0 * 1024.0) / chunk;
  if (nw == 0) nw = 1;
  if (nkv == 0) nkv = 1;
  void **w = calloc(nw, sizeof *w), **kv = calloc(nkv, sizeof *kv);
  CHECK(w && kv);

  printf("devmem %s on %s\n", devmem_version(),
         on_emulator() ? "the CUDA driver EMULATOR (no GPU)" : "the CUDA driver (GPU)");
  for (size_t i = 0; i < nw; i++) {
    w[i] = alloc_tagged(chunk, "weights");
    device_fill(w[i], chunk, i + 1);
  }
  for (size_t i = 0; i < nkv; i++) kv[i] = alloc_tagged(chunk, "kv_cache");
  size_t free0, total, free1, free2;
  CHECK_OK(devmem_mem_get_info(0, &free0, &total));
  printf("allocated %.2f GiB of weights and %.2f GiB of KV cache; device free %.2f of %.2f GiB\n",
         nw * chunk / 1073741824.0, nkv * chunk / 1073741824.0, free0 / 1073741824.0,
         total / 1073741824.0);

  const char *offload[] = {"weights"};
  CHECK_OK(devmem_sleep(offload, 1));
  devmem_transfer t;
  CHECK_OK(devmem_get_last_transfer(&t));
  CHECK_OK(devmem_mem_get_info(0, &free1, &total));
  printf("sleep: freed %.2f GiB (%.2f GiB saved to host, %.2f GiB discarded) in %.3f s; device free now %.2f GiB\n",
         t.bytes_freed / 1073741824.0, t.bytes_saved / 1073741824.0,
         t.bytes_discarded / 1073741824.0, t.seconds, free1 / 1073741824.0);

  CHECK_OK(devmem_wake_up(NULL, 0));
  CHECK_OK(devmem_get_last_transfer(&t));
  CHECK_OK(devmem_mem_get_info(0, &free2, &total));
  printf("wake: mapped %.2f GiB, restored %.2f GiB in %.3f s; device free now %.2f GiB\n",
         t.bytes_mapped / 1073741824.0, t.bytes_restored / 1073741824.0, t.seconds,
         free2 / 1073741824.0);

  size_t bad = 0;
  for (size_t i = 0; i < nw; i++) bad += device_mismatches(w[i], chunk, i + 1);
  printf("checked %.2f GiB of weights after wake: %zu bytes differ\n", nw * chunk / 1073741824.0, bad);
  for (size_t i = 0; i < nw; i++) CHECK_OK(devmem_free(w[i]));
  for (size_t i = 0; i < nkv; i++) CHECK_OK(devmem_free(kv[i]));
  free(w);
  free(kv);
  return bad == 0 ? 0 : 1;
}
