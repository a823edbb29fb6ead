/* A stand-in for the CUDA runtime's allocation entry points, for testing devmem's preload
 * library (torch_memory_saver's preload mode) without a GPU. Allocations are host memory, as
 * the driver emulator's device memory is; like the real runtime, cudaFree of a pointer it did
 * not hand out (or handed out and freed already) is cudaErrorInvalidValue, cudaFree(NULL) is
 * cudaSuccess. standin_live() counts the runtime's live allocations. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>

enum { SUCCESS = 0, INVALID_VALUE = 1, MEMORY_ALLOCATION = 2, INVALID_DEVICE = 101, MAX_LIVE = 4096 };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static void *live[MAX_LIVE];
static int n_live;
static _Thread_local int current_device;

int cudaMalloc(void **ptr, size_t size) {
  if (ptr == NULL) return INVALID_VALUE;
  if (size == 0) { *ptr = NULL; return SUCCESS; }
  void *p = NULL;
  if (posix_memalign(&p, 256, size) != 0) return MEMORY_ALLOCATION;
  pthread_mutex_lock(&lock);
  if (n_live == MAX_LIVE) { pthread_mutex_unlock(&lock); free(p); return MEMORY_ALLOCATION; }
  live[n_live++] = p;
  pthread_mutex_unlock(&lock);
  *ptr = p;
  return SUCCESS;
}

int cudaFree(void *ptr) {
  if (ptr == NULL) return SUCCESS;
  pthread_mutex_lock(&lock);
  for (int i = 0; i < n_live; i++) {
    if (live[i] == ptr) {
      live[i] = live[--n_live];
      pthread_mutex_unlock(&lock);
      free(ptr);
      return SUCCESS;
    }
  }
  pthread_mutex_unlock(&lock);
  return INVALID_VALUE;
}

int cudaGetDevice(int *device) {
  if (device == NULL) return INVALID_VALUE;
  *device = current_device;
  return SUCCESS;
}

int cudaSetDevice(int device) {
  if (device < 0 || device > 7) return INVALID_DEVICE;
  current_device = device;
  return SUCCESS;
}

int standin_live(void) {
  pthread_mutex_lock(&lock);
  int n = n_live;
  pthread_mutex_unlock(&lock);
  return n;
}
