// Process-exit safety: devmem calls from a static destructor and from an atexit handler, after
// main has returned, must neither crash nor hang; the process exits with status 0.
#include <devmem.h>

#include <cstdio>
#include <cstdlib>

namespace {

void* g_weights = nullptr;

void at_exit_handler() {
  // The runtime may be tearing down: any status is acceptable, a crash is not.
  const char* tags[] = {"weights"};
  devmem_status st = devmem_sleep(tags, 1);
  std::printf("atexit: devmem_sleep -> %s\n", devmem_status_string(st));
  std::fflush(stdout);
}

struct LateUser {
  ~LateUser() {
    devmem_status wake = devmem_wake_up(nullptr, 0);
    devmem_status freed = devmem_free(g_weights);
    std::printf("static destructor: wake -> %s, free -> %s\n", devmem_status_string(wake),
                devmem_status_string(freed));
    std::fflush(stdout);
  }
};

LateUser g_late_user;

}  // namespace

int main() {
  if (devmem_set_current_tag("weights") != DEVMEM_STATUS_SUCCESS) return 1;
  if (devmem_malloc(8u << 20, 0, &g_weights) != DEVMEM_STATUS_SUCCESS) return 1;
  void* leaked = nullptr;  // never freed: exit must not trip over it
  if (devmem_malloc(4u << 20, 0, &leaked) != DEVMEM_STATUS_SUCCESS) return 1;
  std::atexit(at_exit_handler);
  std::printf("test_exit: main returns\n");
  return 0;
}
