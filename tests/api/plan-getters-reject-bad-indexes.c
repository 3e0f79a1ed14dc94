/* On a real plan, an index outside it is -1 / NULL with EINVAL; inside it
 * the values are the drive's. */
#include <errno.h>
#include <string.h>

#include "apitest.h"

#define SIZE (64 * 1024 * 1024)

int
main (void)
{
  AtQemu *q = at_qemu_start (SIZE, false);
  struct fleece_handle *h = at_handle (q);
  struct fleece_plan *p = fleece_plan (h);
  int n;

  check (p != NULL, "%s", fleece_get_error ());
  n = fleece_plan_get_drive_count (p);
  check (n == 1, "drives: %d", n);
  check (strcmp (fleece_plan_get_key (p, 0), "scsi0") == 0, "key");
  check (fleece_plan_get_size (p, 0) == SIZE, "size");
  check (fleece_plan_get_fleeced (p, 0) == 1, "fleeced");
  check (fleece_plan_get_cluster_size (p, 0) >= 0, "cluster size");
  for (int i = -1; i <= n; i += n + 1) {
    check (fleece_plan_get_key (p, i) == NULL, "key %d", i);
    check_error (EINVAL, "no drive");
    check (fleece_plan_get_device (p, i) == NULL, "device %d", i);
    check (fleece_plan_get_size (p, i) == -1, "size %d", i);
    check (fleece_plan_get_fleeced (p, i) == -1, "fleeced %d", i);
    check (fleece_plan_get_reason (p, i) == NULL, "reason %d", i);
    check (fleece_plan_get_image (p, i) == NULL, "image %d", i);
    check (fleece_plan_get_format (p, i) == NULL, "format %d", i);
    check (fleece_plan_get_cluster_size (p, i) == -1, "cluster %d", i);
    check_error (EINVAL, "(it has 1)");
  }
  n = fleece_plan_get_skipped_count (p);
  check (n >= 0, "skipped");
  check (fleece_plan_get_skipped_name (p, n) == NULL, "skipped name past the end");
  check_error (EINVAL, "no skipped entry");
  check (fleece_plan_get_skipped_reason (p, -1) == NULL, "skipped reason -1");
  check_error (EINVAL, "no skipped entry -1");
  fleece_plan_free (p);
  fleece_free (h);
  at_qemu_stop (q);
  return EXIT_SUCCESS;
}
