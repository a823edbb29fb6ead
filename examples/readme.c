#include <devmem.h>
#include <stdio.h>

/* Prints the library's message for a failed call; returns 1 on success. */
static int ok(devmem_status st, const char *what) {
  if (st == DEVMEM_STATUS_SUCCESS) return 1;
  char msg[512];
  devmem_last_error_message(msg, sizeof msg);
  /* msg says what failed (the call, its error, the pointer or tag) without the status's
     name; devmem_status_string(st) gives that */
  fprintf(stderr, "%s: %s\n", what, msg);
  return 0;
}

int main(void) {
  void *weights = NULL, *kv = NULL;
  if (!ok(devmem_set_current_tag("weights"), "tag") ||     /* later allocations on this thread */
      !ok(devmem_malloc(256u << 20, /*device=*/0, &weights), "malloc weights") ||
      !ok(devmem_set_current_tag("kv_cache"), "tag") ||
      !ok(devmem_malloc(512u << 20, 0, &kv), "malloc kv cache"))
    return 1;

  const char *offload[] = {"weights"};
  if (!ok(devmem_sleep(offload, 1), "sleep"))   /* weights saved to host, kv cache discarded */
    return 1;
  /* ... every byte of device memory is free for someone else ... */
  devmem_status st = devmem_wake_up(NULL, 0);     /* same addresses, weights restored */
  if (st == DEVMEM_STATUS_OUT_OF_MEMORY) {
    /* the device is full: free something, then call devmem_wake_up again */
  }
  if (!ok(st, "wake") || !ok(devmem_free(weights), "free") || !ok(devmem_free(kv), "free"))
    return 1;
  puts("slept and woke 768 MiB");
  return 0;
}
