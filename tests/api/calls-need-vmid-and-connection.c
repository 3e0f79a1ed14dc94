/* The permitted-states table's needs: calls that act for a VM need its
 * vmid first (EINVAL naming fleece_set_vmid), calls that talk to QEMU a
 * connection (ENOTCONN naming fleece_connect); nothing is attempted
 * without them. */
#include <errno.h>
#include <stdlib.h>

#include "apitest.h"

int
main (void)
{
  char *dir = at_tmpdir ("needs");
  struct fleece_handle *h = fleece_new ();

  check (fleece_set_state_dir (h, dir) == 0, "%s", fleece_get_error ());
  check (fleece_plan (h) == NULL, "plan without vmid");
  check_error (EINVAL, "fleece_plan: no vmid: call fleece_set_vmid() first");
  check (fleece_attach (h, NULL, 0) == -1, "attach without vmid");
  check_error (EINVAL, "fleece_attach: no vmid");
  check (fleece_get_record (h) == NULL, "record without vmid");
  check_error (EINVAL, "fleece_get_record: no vmid");
  check (fleece_get_status (h, 0) == NULL, "status without vmid");
  check_error (EINVAL, "fleece_get_status: no vmid");
  check (fleece_cleanup (h, 0) == -1, "cleanup without vmid");
  check_error (EINVAL, "fleece_cleanup: no vmid");

  check (fleece_set_vmid (h, 100) == 0, "%s", fleece_get_error ());
  check (fleece_plan (h) == NULL, "plan unconnected");
  check_error (ENOTCONN, "fleece_plan: not connected: call fleece_connect() first");
  check (fleece_attach (h, NULL, 0) == -1, "attach unconnected");
  check_error (ENOTCONN, "fleece_attach: not connected");
  /* The record's calls need no QEMU. */
  check (fleece_get_record (h) == NULL && fleece_get_errno () == ENOENT,
         "record: %s", fleece_get_error ());
  free (dir);
  fleece_free (h);
  return EXIT_SUCCESS;
}
