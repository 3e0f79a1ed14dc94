/* The lifecycle's order: nothing to wait for before a start, nothing to
 * start before an attach, no second start, no figures and no cancel
 * without a run; after cleanup the handle is idle again. */
#include <errno.h>
#include <string.h>

#include "apitest.h"

int
main (void)
{
  AtQemu *q = at_qemu_start (16 * 1024 * 1024, true);
  struct fleece_handle *h = at_handle (q);
  struct fleece_plan *p = fleece_plan (h);
  struct fleece_target *t = fleece_target_new_dir (q->target, "raw");
  uint64_t v;

  check (p && t, "%s", fleece_get_error ());
  check (fleece_wait (h, 0) == -1, "wait before start");
  check_error (EINVAL, "no backup is running: call fleece_start() first");
  check (fleece_start (h, p, t, 0) == -1, "start before attach");
  check_error (EINVAL, "nothing attached: call fleece_attach() with this plan first");
  check (fleece_get_stat (h, NULL, FLEECE_STAT_DONE, &v) == -1, "stat");
  check_error (EBUSY, "no backup is set up");
  errno = 0;
  check (fleece_cancel (h) == -1 && errno == EINVAL, "cancel without a run");

  check (fleece_attach (h, p, 0) == 0, "%s", fleece_get_error ());
  check (fleece_wait (h, 0) == -1, "wait before start");
  check_error (EINVAL, "no backup is running");
  check (fleece_get_stat (h, NULL, FLEECE_STAT_TOTAL, &v) == 0, "%s", fleece_get_error ());
  check (fleece_start (h, p, NULL, 0) == -1, "start without target");
  check_error (EINVAL, "target is NULL");
  check (fleece_set_bwlimit (h, 64) == 0, "%s", fleece_get_error ());
  check (fleece_start (h, p, t, 0) == 0, "%s", fleece_get_error ());
  check (fleece_start (h, p, t, 0) == -1, "second start");
  check_error (EINVAL, "the backup was started already");

  check (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());
  check (fleece_wait (h, 0) == -1, "wait after cleanup");
  check_error (EINVAL, "no backup is running");
  errno = 0;
  check (fleece_cancel (h) == -1 && errno == EINVAL, "cancel after cleanup");
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  at_qemu_stop (q);
  return EXIT_SUCCESS;
}
