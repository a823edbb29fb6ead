/* Helpers shared by devmem's C tests. They run against the real CUDA driver on a GPU machine
 * and against the driver emulator elsewhere; device bytes are moved with the driver's own
 * synchronous copies (loaded at run time, like devmem does), never by dereferencing. */
#ifndef DEVMEM_CTESTS_COMMON_H
#define DEVMEM_CTESTS_COMMON_H

#include <devmem.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define MIB ((size_t)1 << 20)

/* Fails the test with the call, the status name and devmem's message. */
#define CHECK_OK(call)                                                                         \
  do {                                                                                         \
    devmem_status st_ = (call);                                                                \
    if (st_ != DEVMEM_STATUS_SUCCESS) fail_status(__FILE__, __LINE__, #call, st_);             \
  } while (0)

/* Expects a given status and a message containing `needle`. */
#define CHECK_STATUS(call, expected, needle)                                                   \
  expect_status(__FILE__, __LINE__, #call, (call), (expected), (needle))

#define CHECK(cond)                                                                            \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);                 \
      exit(1);                                                                                 \
    }                                                                                          \
  } while (0)

void fail_status(const char *file, int line, const char *what, devmem_status st);
void expect_status(const char *file, int line, const char *what, devmem_status got,
                   devmem_status expected, const char *needle);
const char *last_message(void);

/* Writes the pattern for `seed` into [ptr, ptr+len) on the device. */
void device_fill(void *ptr, size_t len, uint64_t seed);
/* Number of bytes in [ptr, ptr+len) on the device that differ from the pattern for `seed`. */
size_t device_mismatches(void *ptr, size_t len, uint64_t seed);
/* Reserves / frees a VA range through the driver (for create_and_map). */
unsigned long long driver_reserve(size_t size, size_t alignment);
void driver_free_va(unsigned long long va, size_t size);
/* 1 when DEVMEM_CUDA_LIBRARY names the emulator (not a real GPU). */
int on_emulator(void);
void *alloc_tagged(size_t size, const char *tag);
double now_seconds(void);

#endif
