/* devmem's preload library (torch_memory_saver's preload mode), run under LD_PRELOAD against a
 * program that allocates through the CUDA runtime's cudaMalloc/cudaFree (here the stand-in
 * runtime, cudart_standin.c, on the emulator): allocations of an interesting thread are
 * devmem's and sleep with their tag, every other one is the runtime's and untouched; a foreign
 * or doubly freed pointer gets the runtime's error, never a crash. */
#include <dlfcn.h>
#include <pthread.h>
#include <string.h>

#include "common.h"

int cudaMalloc(void **ptr, size_t size);
int cudaFree(void *ptr);
int standin_live(void);

typedef void (*set_bool_fn)(_Bool);
typedef void (*set_str_fn)(const char *);

static void *control(const char *name) {
  void *f = dlsym(RTLD_DEFAULT, name);
  if (f == NULL) {
    fprintf(stderr, "%s not found: run this test with LD_PRELOAD naming devmem's preload library\n", name);
    exit(1);
  }
  return f;
}

static int is_devmem(void *p) {
  devmem_allocation_info info;
  return devmem_get_allocation_info(p, &info) == DEVMEM_STATUS_SUCCESS;
}

static devmem_state state_of(void *p) {
  devmem_allocation_info info;
  CHECK_OK(devmem_get_allocation_info(p, &info));
  return info.state;
}

static void *other_thread(void *arg) {
  (void)arg;
  void *p = NULL;
  /* The switch is per thread: this thread never turned it on. */
  CHECK(cudaMalloc(&p, MIB) == 0);
  CHECK(!is_devmem(p));
  CHECK(cudaFree(p) == 0);
  return NULL;
}

int main(void) {
  set_bool_fn set_interesting = (set_bool_fn)(uintptr_t)control("tms_set_interesting_region");
  set_bool_fn set_backup = (set_bool_fn)(uintptr_t)control("tms_set_enable_cpu_backup");
  set_str_fn set_tag = (set_str_fn)(uintptr_t)control("tms_set_current_tag");

  /* Outside a region: the runtime's memory. */
  void *outside = NULL;
  CHECK(cudaMalloc(&outside, MIB) == 0);
  CHECK(!is_devmem(outside));
  CHECK(standin_live() == 1);
  memset(outside, 0x5a, MIB);

  /* Inside: devmem's, under the devmem tag of (tag, cpu backup). */
  set_interesting(1);
  set_tag("weights");
  set_backup(1);
  void *w = NULL;
  CHECK(cudaMalloc(&w, 4 * MIB) == 0);
  set_tag("kv");
  set_backup(0);
  void *kv = NULL;
  CHECK(cudaMalloc(&kv, 2 * MIB) == 0);
  pthread_t t;
  CHECK(pthread_create(&t, NULL, other_thread, NULL) == 0);
  CHECK(pthread_join(t, NULL) == 0);
  set_interesting(0);
  CHECK(is_devmem(w) && is_devmem(kv));
  CHECK(standin_live() == 1);
  devmem_allocation_info info;
  CHECK_OK(devmem_get_allocation_info(w, &info));
  CHECK(strcmp(info.tag, "weights:cpu_backup") == 0);
  CHECK_OK(devmem_get_allocation_info(kv, &info));
  CHECK(strcmp(info.tag, "kv") == 0);
  device_fill(w, 4 * MIB, 7);

  const char *offload[] = {"weights:cpu_backup"};
  const char *discard[] = {"kv"};
  CHECK_OK(devmem_sleep_tags(offload, 1, discard, 1));
  CHECK(state_of(w) == DEVMEM_STATE_OFFLOADED && state_of(kv) == DEVMEM_STATE_DISCARDED);
  for (size_t i = 0; i < MIB; i++) CHECK(((unsigned char *)outside)[i] == 0x5a);
  CHECK_OK(devmem_wake_up(NULL, 0));
  CHECK(device_mismatches(w, 4 * MIB, 7) == 0);

  /* Frees: devmem's once, then the runtime's error; a foreign pointer is the runtime's. */
  CHECK(cudaFree(w) == 0);
  CHECK(cudaFree(w) != 0);
  CHECK(cudaFree(kv) == 0);
  CHECK(cudaFree(outside) == 0);
  CHECK(standin_live() == 0);
  CHECK(cudaFree(outside) != 0);
  CHECK(cudaFree(NULL) == 0);
  CHECK(!is_devmem(w));
  puts("preload: ok");
  return 0;
}
