/* Bad input at the C boundary: each gets a documented status and message, never a crash. */
#include "common.h"

#include <string.h>

int main(void) {
  void *p = NULL;
  CHECK_STATUS(devmem_malloc(0, 0, &p), DEVMEM_STATUS_INVALID_ARGUMENT, "size 0");
  CHECK_STATUS(devmem_malloc(SIZE_MAX, 0, &p), DEVMEM_STATUS_INVALID_ARGUMENT, "overflows");
  CHECK_STATUS(devmem_malloc(MIB, 0, NULL), DEVMEM_STATUS_NULL_POINTER, "NULL");
  CHECK_STATUS(devmem_malloc(MIB, -1, &p), DEVMEM_STATUS_INVALID_DEVICE, "negative");
  CHECK_STATUS(devmem_malloc(MIB, 4096, &p), DEVMEM_STATUS_INVALID_DEVICE, "out of range");
  CHECK(p == NULL);
  CHECK(my_malloc(-1, 0, NULL) == NULL);
  CHECK(devmem_last_error_status() == DEVMEM_STATUS_INVALID_ARGUMENT);
  CHECK(my_malloc(0, 0, NULL) == NULL);
  CHECK(devmem_last_error_status() == DEVMEM_STATUS_INVALID_ARGUMENT);

  CHECK_STATUS(devmem_free(NULL), DEVMEM_STATUS_NULL_POINTER, "NULL");
  CHECK_STATUS(devmem_free((void *)0x1000), DEVMEM_STATUS_UNKNOWN_POINTER, "not a live devmem allocation");
  void *q = alloc_tagged(MIB, "x");
  CHECK_OK(devmem_free(q));
  CHECK_STATUS(devmem_free(q), DEVMEM_STATUS_UNKNOWN_POINTER, "already freed");
  my_free(q, 0, 0, NULL); /* double free through PyTorch's entry point: reported, no crash */
  CHECK(devmem_last_error_status() == DEVMEM_STATUS_UNKNOWN_POINTER);

  CHECK_STATUS(devmem_set_current_tag(NULL), DEVMEM_STATUS_INVALID_TAG, "NULL");
  CHECK_STATUS(devmem_set_current_tag(""), DEVMEM_STATUS_INVALID_TAG, "empty");
  CHECK_STATUS(devmem_set_current_tag("\xff\xfe"), DEVMEM_STATUS_INVALID_TAG, "UTF-8");
  char longtag[300];
  memset(longtag, 'x', sizeof longtag - 1);
  longtag[sizeof longtag - 1] = 0;
  CHECK_STATUS(devmem_set_current_tag(longtag), DEVMEM_STATUS_INVALID_TAG, "longer than 255");
  CHECK_STATUS(devmem_sleep(NULL, 1), DEVMEM_STATUS_NULL_POINTER, "tags is NULL");
  const char *with_null[] = {"weights", NULL};
  CHECK_STATUS(devmem_sleep(with_null, 2), DEVMEM_STATUS_INVALID_TAG, "tags[1] is NULL");
  CHECK_STATUS(devmem_wake_up(with_null, 2), DEVMEM_STATUS_INVALID_TAG, "tags[1] is NULL");
  CHECK_STATUS(devmem_offload(with_null, 2), DEVMEM_STATUS_INVALID_TAG, "tags[1]");
  CHECK_STATUS(devmem_discard(with_null, 2), DEVMEM_STATUS_INVALID_TAG, "tags[1]");

  devmem_stats s;
  CHECK_STATUS(devmem_get_stats(NULL, NULL), DEVMEM_STATUS_NULL_POINTER, "NULL");
  CHECK_OK(devmem_get_stats(NULL, &s));
  CHECK(s.unknown_frees == 3);
  size_t f, t;
  CHECK_STATUS(devmem_mem_get_info(0, NULL, &t), DEVMEM_STATUS_NULL_POINTER, "NULL");
  CHECK_STATUS(devmem_mem_get_info(4096, &f, &t), DEVMEM_STATUS_INVALID_DEVICE, "out of range");
  devmem_allocation_info info;
  CHECK_STATUS(devmem_get_allocation_info(q, &info), DEVMEM_STATUS_UNKNOWN_POINTER, "not inside");
  CHECK_STATUS(devmem_get_allocation_info(NULL, &info), DEVMEM_STATUS_NULL_POINTER, "NULL");
  unsigned long long h = 0;
  CHECK(create_and_map(0, (ssize_t)MIB * 2, 0, &h) == DEVMEM_STATUS_NULL_POINTER);
  CHECK(create_and_map(0, (ssize_t)MIB * 2, 0x200000, NULL) == DEVMEM_STATUS_NULL_POINTER);
  CHECK(unmap_and_release(0, -5, 0x200000, &h) == DEVMEM_STATUS_INVALID_ARGUMENT);

  /* Sleep and wake with nothing to do are no-ops, in any order, any number of times. */
  CHECK_OK(devmem_wake_up(NULL, 0));
  CHECK_OK(devmem_sleep(NULL, 0));
  CHECK_OK(devmem_sleep(NULL, 0));
  CHECK_OK(devmem_wake_up(NULL, 0));

  /* Keeping memory for a restart: bad options are refused before the keeper is asked; no
     keeper at the socket is UNSUPPORTED naming it. */
  const char *weights = "weights";
  devmem_keep_options ko;
  memset(&ko, 0, sizeof ko);
  CHECK_STATUS(devmem_keep(&weights, 1, NULL), DEVMEM_STATUS_NULL_POINTER, "options");
  CHECK_STATUS(devmem_keep(&weights, 1, &ko), DEVMEM_STATUS_NULL_POINTER, "instance");
  ko.instance = "";
  CHECK_STATUS(devmem_attach(&weights, 1, &ko), DEVMEM_STATUS_INVALID_ARGUMENT, "instance");
  ko.instance = "c-test";
  ko.rank = 2;
  ko.world = 2;
  CHECK_STATUS(devmem_attach(&weights, 1, &ko), DEVMEM_STATUS_INVALID_ARGUMENT, "rank 2");
  ko.rank = 0;
  ko.world = 1;
  ko.read_only = 1;
  ko.socket = "/nonexistent-devmem-dir/keeper.sock";
  uint64_t released = 0;
  CHECK_STATUS(devmem_release_kept(&weights, 0, &ko, &released), DEVMEM_STATUS_INVALID_ARGUMENT, "no tags");
  CHECK_STATUS(devmem_release_kept(&weights, 1, &ko, &released), DEVMEM_STATUS_UNSUPPORTED, "keeper");

  char small[1];
  CHECK_STATUS(devmem_get_current_tag(small, sizeof small), DEVMEM_STATUS_BUFFER_TOO_SMALL, "needs");
  CHECK(strcmp(devmem_status_string(12345), "DEVMEM_STATUS_UNKNOWN") == 0);
  CHECK(strcmp(devmem_status_string(DEVMEM_STATUS_OUT_OF_MEMORY), "DEVMEM_STATUS_OUT_OF_MEMORY") == 0);
  CHECK(devmem_last_error_message(NULL, 0) > 0 || devmem_last_error_status() == DEVMEM_STATUS_SUCCESS);
  printf("test_bad_input: ok\n");
  return 0;
}
