/* Times each CUDA VMM driver call devmem makes for one allocation (median of N), straight on
 * libcuda, so devmem's my_malloc/my_free can be compared with the driver's own floor.
 *   cc -O2 -o vmm_costs bench/vmm_costs.c -ldl && ./vmm_costs [MiB] */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int (*fn_t)();
static void *lib;
static fn_t sym(const char *n) {
  void *s = dlsym(lib, n);
  if (!s) { fprintf(stderr, "missing %s\n", n); exit(1); }
  fn_t f;
  memcpy(&f, &s, sizeof f);
  return f;
}
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
static int cmp(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return (x > y) - (x < y); }
#define N 200
#define STEPS 8
static const char *names[STEPS] = {"cuMemAddressReserve", "cuMemCreate", "cuMemMap", "cuMemSetAccess",
                                   "cuCtxSynchronize", "cuMemUnmap", "cuMemRelease", "cuMemAddressFree"};

struct prop { int type, handles; int loc_type, loc_id; void *win; unsigned char comp, rdma; unsigned short usage; unsigned char reserved[4]; };
struct access { int loc_type, loc_id; int flags; };

int main(int argc, char **argv) {
  size_t size = (size_t)(argc > 1 ? atoi(argv[1]) : 32) << 20;
  lib = dlopen("libcuda.so.1", RTLD_NOW);
  if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 1; }
  int dev = 0; void *ctx = NULL;
  sym("cuInit")(0);
  sym("cuDeviceGet")(&dev, 0);
  sym("cuDevicePrimaryCtxRetain")(&ctx, dev);
  sym("cuCtxSetCurrent")(ctx);
  struct prop p; memset(&p, 0, sizeof p);
  p.type = 1; p.handles = 1 /* posix fd */; p.loc_type = 1; p.loc_id = 0;
  struct access a = {1, 0, 3};
  double t[STEPS][N];
  for (int i = 0; i < N; i++) {
    unsigned long long va = 0, h = 0; double t0;
    t0 = now(); if (sym("cuMemAddressReserve")(&va, size, (size_t)2 << 20, 0ull, 0ull)) return 2; t[0][i] = now() - t0;
    t0 = now(); if (sym("cuMemCreate")(&h, size, &p, 0ull)) return 3; t[1][i] = now() - t0;
    t0 = now(); if (sym("cuMemMap")(va, size, (size_t)0, h, 0ull)) return 4; t[2][i] = now() - t0;
    t0 = now(); if (sym("cuMemSetAccess")(va, size, &a, (size_t)1)) return 5; t[3][i] = now() - t0;
    t0 = now(); sym("cuCtxSynchronize")(); t[4][i] = now() - t0;
    t0 = now(); if (sym("cuMemUnmap")(va, size)) return 6; t[5][i] = now() - t0;
    t0 = now(); if (sym("cuMemRelease")(h)) return 7; t[6][i] = now() - t0;
    t0 = now(); if (sym("cuMemAddressFree")(va, size)) return 8; t[7][i] = now() - t0;
  }
  printf("driver VMM call costs for %zu MiB (median / p90 of %d, microseconds)\n", size >> 20, N);
  for (int s = 0; s < STEPS; s++) {
    qsort(t[s], N, sizeof(double), cmp);
    printf("  %-20s %8.1f %8.1f\n", names[s], t[s][N / 2], t[s][N * 9 / 10]);
  }
  return 0;
}
