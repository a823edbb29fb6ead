#define _POSIX_C_SOURCE 200809L
#include "common.h"

#include <dlfcn.h>
#include <string.h>
#include <time.h>

static char message_buf[2048];

const char *last_message(void) {
  devmem_last_error_message(message_buf, sizeof message_buf);
  return message_buf;
}

void fail_status(const char *file, int line, const char *what, devmem_status st) {
  fprintf(stderr, "%s:%d: %s returned %s: %s\n", file, line, what, devmem_status_string(st),
          last_message());
  exit(1);
}

void expect_status(const char *file, int line, const char *what, devmem_status got,
                   devmem_status expected, const char *needle) {
  const char *msg = last_message();
  if (got != expected || (needle && !strstr(msg, needle))) {
    fprintf(stderr, "%s:%d: %s returned %s (expected %s), message \"%s\" (expected to contain \"%s\")\n",
            file, line, what, devmem_status_string(got), devmem_status_string(expected), msg,
            needle ? needle : "");
    exit(1);
  }
}

typedef int (*htod_fn)(unsigned long long, const void *, size_t);
typedef int (*dtoh_fn)(void *, unsigned long long, size_t);
typedef int (*reserve_fn)(unsigned long long *, size_t, size_t, unsigned long long, unsigned long long);
typedef int (*free_va_fn)(unsigned long long, size_t);

static void *driver(void) {
  static void *lib;
  if (!lib) {
    const char *path = getenv("DEVMEM_CUDA_LIBRARY");
    lib = dlopen(path && *path ? path : "libcuda.so.1", RTLD_NOW);
    if (!lib) {
      fprintf(stderr, "cannot open the driver: %s\n", dlerror());
      exit(1);
    }
  }
  return lib;
}

static void *symbol(const char *name) {
  void *sym = dlsym(driver(), name);
  if (!sym) {
    fprintf(stderr, "driver lacks %s\n", name);
    exit(1);
  }
  return sym;
}

typedef int (*init_fn)(unsigned);
typedef int (*ctx_get_fn)(void **);
typedef int (*ctx_set_fn)(void *);
typedef int (*retain_fn)(void **, int);

/* The copies below go through the CUDA driver (the emulator's CUDA face when devmem runs on
 * its Level Zero face, where both share one memory): make sure a context is current. */
static void ensure_copy_context(void) {
  static int done;
  if (done) return;
  done = 1;
  init_fn init;
  ctx_get_fn get;
  ctx_set_fn set;
  retain_fn retain;
  void *sym_ = symbol("cuInit");
  memcpy(&init, &sym_, sizeof init);
  sym_ = symbol("cuCtxGetCurrent");
  memcpy(&get, &sym_, sizeof get);
  sym_ = symbol("cuCtxSetCurrent");
  memcpy(&set, &sym_, sizeof set);
  sym_ = symbol("cuDevicePrimaryCtxRetain");
  memcpy(&retain, &sym_, sizeof retain);
  void *ctx = NULL;
  CHECK(init(0) == 0);
  CHECK(get(&ctx) == 0);
  if (!ctx) {
    CHECK(retain(&ctx, 0) == 0);
    CHECK(set(ctx) == 0);
  }
}

static uint8_t pattern(uint64_t seed, size_t i) { return (uint8_t)((seed * 31u + i * 7u) % 251u); }

#define CHUNK (16 * MIB)

void device_fill(void *ptr, size_t len, uint64_t seed) {
  ensure_copy_context();
  htod_fn htod;
  void *sym_ = symbol("cuMemcpyHtoD_v2");
  memcpy(&htod, &sym_, sizeof htod);
  uint8_t *buf = malloc(CHUNK);
  CHECK(buf != NULL);
  for (size_t off = 0; off < len; off += CHUNK) {
    size_t n = len - off < CHUNK ? len - off : CHUNK;
    for (size_t i = 0; i < n; i++) buf[i] = pattern(seed, off + i);
    int rc = htod((unsigned long long)(uintptr_t)ptr + off, buf, n);
    if (rc != 0) {
      fprintf(stderr, "cuMemcpyHtoD failed: %d\n", rc);
      exit(1);
    }
  }
  free(buf);
}

size_t device_mismatches(void *ptr, size_t len, uint64_t seed) {
  ensure_copy_context();
  dtoh_fn dtoh;
  void *sym_ = symbol("cuMemcpyDtoH_v2");
  memcpy(&dtoh, &sym_, sizeof dtoh);
  uint8_t *buf = malloc(CHUNK);
  CHECK(buf != NULL);
  size_t bad = 0;
  for (size_t off = 0; off < len; off += CHUNK) {
    size_t n = len - off < CHUNK ? len - off : CHUNK;
    int rc = dtoh(buf, (unsigned long long)(uintptr_t)ptr + off, n);
    if (rc != 0) {
      fprintf(stderr, "cuMemcpyDtoH failed: %d\n", rc);
      exit(1);
    }
    for (size_t i = 0; i < n; i++) bad += buf[i] != pattern(seed, off + i);
  }
  free(buf);
  return bad;
}

unsigned long long driver_reserve(size_t size, size_t alignment) {
  reserve_fn reserve;
  void *sym_ = symbol("cuMemAddressReserve");
  memcpy(&reserve, &sym_, sizeof reserve);
  unsigned long long va = 0;
  CHECK(reserve(&va, size, alignment, 0, 0) == 0);
  return va;
}

void driver_free_va(unsigned long long va, size_t size) {
  free_va_fn free_va;
  void *sym_ = symbol("cuMemAddressFree");
  memcpy(&free_va, &sym_, sizeof free_va);
  CHECK(free_va(va, size) == 0);
}

int on_emulator(void) {
  const char *path = getenv("DEVMEM_CUDA_LIBRARY");
  return path && strstr(path, "emu") != NULL;
}

void *alloc_tagged(size_t size, const char *tag) {
  void *p = NULL;
  CHECK_OK(devmem_set_current_tag(tag));
  CHECK_OK(devmem_malloc(size, 0, &p));
  CHECK(p != NULL);
  return p;
}

double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
