/* Flags no version defines are EINVAL, and the refused call changes
 * nothing: the same call with 0 then works. */
#include <errno.h>
#include <string.h>
#include <stdlib.h>

#include "apitest.h"

int
main (void)
{
  AtQemu *q = at_qemu_start (16 * 1024 * 1024, false);
  struct fleece_handle *h = at_handle (q);
  struct fleece_plan *p = fleece_plan (h);
  struct fleece_target *t = fleece_target_new_dir (q->target, "raw");
  char *status;

  check (p && t, "%s", fleece_get_error ());
  check (fleece_get_status (h, 1) == NULL, "status with flags");
  check_error (EINVAL, "fleece_get_status: unknown flags");
  check (fleece_attach (h, p, 1) == -1, "attach with flags");
  check_error (EINVAL, "fleece_attach: unknown flags: none are defined, pass 0");
  check (fleece_attach (h, p, 0) == 0, "%s", fleece_get_error ());
  check (fleece_start (h, p, t, 0x80000000u) == -1, "start with flags");
  check_error (EINVAL, "fleece_start: unknown flags");
  check (fleece_cleanup (h, 2) == -1, "cleanup with flags");
  check_error (EINVAL, "fleece_cleanup: unknown flags");
  /* The run is still set up, the lock still ours. */
  status = fleece_get_status (h, 0);
  check (status && strstr (status, "\"lock\":\"ours\"") &&
         strstr (status, "\"run\":\"active\""), "%s", status);
  free (status);
  check (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());

  check (fleece_set_plan_flags (h, 0x100) == -1, "plan flags");
  check_error (EINVAL, "unknown plan flags 0x100");
  check (fleece_set_bitmap (h, "b", 3) == -1, "bitmap mode");
  check_error (EINVAL, "unknown bitmap mode 3");
  check (fleece_storage_new_callback ("x", 0x80, NULL, NULL) == NULL, "storage flags");
  check_error (EINVAL, "unknown flags 0x80");
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  at_qemu_stop (q);
  return EXIT_SUCCESS;
}
