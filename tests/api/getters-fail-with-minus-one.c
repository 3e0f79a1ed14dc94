/* Getters that can fail return -1 (or NULL) with the reason, never a
 * value that could be taken for a real one. */
#include <errno.h>
#include <string.h>

#include "apitest.h"

int
main (void)
{
  struct fleece_handle *h = fleece_new ();
  uint64_t done = 7, total = 7, v = 7;

  check (fleece_get_vmid (h) == -1, "vmid");
  check_error (EINVAL, "fleece_get_vmid: no vmid is set");
  check (fleece_get_engine (h) == -1, "engine");
  check_error (ENOTCONN, "fleece_get_engine: the engine is chosen when connecting");

  /* Nothing is set up: no figures. */
  check (fleece_get_progress (h, &done, &total) == -1, "progress");
  check_error (EBUSY, "no backup is set up");
  check (done == 7 && total == 7, "outputs written on failure");
  check (fleece_get_drive_progress (h, "scsi0", &done, &total) == -1, "drive progress");
  check_error (EBUSY, "no backup is set up");
  check (fleece_get_stat (h, NULL, FLEECE_STAT_DONE, &v) == -1, "stat");
  check_error (EBUSY, "no backup is set up");
  check (fleece_get_stat (h, "scsi0", FLEECE_STAT_TOTAL, &v) == -1, "drive stat");
  check (v == 7, "output written on failure");
  check (fleece_get_drive_elapsed_ms (h, "scsi0") == -1, "elapsed");
  check_error (EBUSY, "no backup is set up");
  check (fleece_get_drive_result (h, "scsi0") == NULL, "result");
  check_error (EBUSY, "no backup is set up");

  check (fleece_set_vmid (h, 100) == 0, "%s", fleece_get_error ());
  check (fleece_get_vmid (h) == 100, "vmid after set");
  check (fleece_set_vmid (h, 999999999u) == 0, "largest vmid");
  check (fleece_get_vmid (h) == 999999999, "largest vmid read back");
  fleece_free (h);
  return EXIT_SUCCESS;
}
