/* Baseline for the cold-sleep target: maps and populates N bytes of fresh huge-page host memory
 * the way devmem's host store does (256 MiB chunks, MADV_HUGEPAGE, one write per 4 KiB page
 * split across threads), without registering it with the driver, and prints the seconds.
 *   cc -O2 -pthread -o populate bench/populate.c && ./populate BYTES THREADS CHUNK_BYTES */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

struct slice { char *base; size_t len; };

static void *populate(void *arg) {
  struct slice *s = arg;
  for (size_t off = 0; off < s->len; off += 4096) ((volatile char *)s->base)[off] = 0;
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 4) { fprintf(stderr, "usage: populate BYTES THREADS CHUNK_BYTES\n"); return 2; }
  size_t total = strtoull(argv[1], NULL, 10), chunk = strtoull(argv[3], NULL, 10);
  int threads = atoi(argv[2]);
  if (threads < 1 || threads > 256 || chunk == 0) return 2;
  pthread_t tid[256];
  struct slice sl[256];
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  size_t nchunks = (total + chunk - 1) / chunk;
  char **bases = calloc(nchunks, sizeof *bases);
  for (size_t c = 0; c < nchunks; c++) {
    char *base = mmap(NULL, chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) { perror("mmap"); return 1; }
    madvise(base, chunk, MADV_HUGEPAGE);
    size_t step = ((chunk / threads + (2u << 20) - 1) / (2u << 20)) * (2u << 20);
    int n = 0;
    for (size_t off = 0; off < chunk; off += step, n++) {
      sl[n].base = base + off;
      sl[n].len = chunk - off < step ? chunk - off : step;
      pthread_create(&tid[n], NULL, populate, &sl[n]);
    }
    for (int i = 0; i < n; i++) pthread_join(tid[i], NULL);
    bases[c] = base;
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  printf("%.6f\n", (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9);
  for (size_t c = 0; c < nchunks; c++) munmap(bases[c], chunk);
  free(bases);
  return 0;
}
