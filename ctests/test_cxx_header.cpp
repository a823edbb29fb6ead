// The header compiles as C++17 and links from C++.
#include <devmem.h>

#include <cstdio>
#include <cstring>

int main() {
  static_assert(sizeof(devmem_status) == 4, "devmem_status is 32-bit");
  const char* v = devmem_version();
  if (v == nullptr || std::strlen(v) == 0) return 1;
  int count = 0;
  devmem_status st = devmem_device_count(&count);
  if (st != DEVMEM_STATUS_SUCCESS || count < 1) {
    char msg[512];
    devmem_last_error_message(msg, sizeof msg);
    std::fprintf(stderr, "devmem_device_count: %s: %s\n", devmem_status_string(st), msg);
    return 1;
  }
  std::printf("test_cxx_header: ok (devmem %s, %d device(s))\n", v, count);
  return 0;
}
