/* Settings that shape a run are EBUSY from fleece_attach() until
 * fleece_cleanup() and leave the setting as it was; bwlimit and the cbw
 * timeout may change until fleece_start(); the QMP timeout and the log
 * and progress callbacks any time.  After cleanup everything is allowed
 * again. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "apitest.h"

static int freed;

static void
count_free (void *user_data)
{
  freed++;
}

static void
log_fn (void *user_data, int level, const char *msg)
{
}

#define BUSY(call) \
  do { check ((call) == -1, "%s was allowed", #call); \
       check_error (EBUSY, "cannot change settings while a run is set up"); } while (0)

static void
run_settings_busy (struct fleece_handle *h, AtQemu *q)
{
  const char *keys[] = { "scsi0", NULL };
  struct fleece_storage *st = fleece_storage_new_dir (q->storage);
  int sv[2];

  BUSY (fleece_set_vmid (h, 101));
  check (fleece_get_vmid (h) == 100, "vmid changed");
  BUSY (fleece_set_state_dir (h, q->dir));
  BUSY (fleece_set_engine (h, FLEECE_ENGINE_QEMU));
  BUSY (fleece_set_drives (h, keys));
  BUSY (fleece_set_plan_flags (h, FLEECE_PLAN_NO_FLEECING));
  BUSY (fleece_set_image_format (h, "raw"));
  BUSY (fleece_set_bitmap (h, "b", FLEECE_BITMAP_NEW));
  BUSY (fleece_set_record_callback (h, NULL, NULL, NULL, NULL));
  /* The storage is taken (freed) also when refused. */
  check (st != NULL, "%s", fleece_get_error ());
  BUSY (fleece_set_storage (h, st));

  check (fleece_connect (h, q->qmp) == -1, "connect");
  check_error (EBUSY, "a run is set up; call fleece_cleanup() first");
  check (socketpair (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
  check (fleece_connect_fd (h, sv[0]) == -1, "connect_fd");
  check_error (EBUSY, "a run is set up");
  check (fcntl (sv[0], F_GETFD) == -1, "the refused fd was not closed");
  close (sv[1]);
}

int
main (void)
{
  AtQemu *q = at_qemu_start (16 * 1024 * 1024, true);
  struct fleece_plan *p;
  struct fleece_handle *h = at_attached (q, &p);
  struct fleece_target *t = fleece_target_new_dir (q->target, "raw");

  run_settings_busy (h, q);
  check (fleece_attach (h, p, 0) == -1, "attach twice");
  check_error (EBUSY, "a run is already set up on this handle");

  /* Until the start. */
  check (fleece_set_bwlimit (h, 64) == 0, "%s", fleece_get_error ());
  check (fleece_set_cbw_timeout (h, 30) == 0, "%s", fleece_get_error ());
  /* Any time. */
  check (fleece_set_qmp_timeout (h, 30000) == 0, "%s", fleece_get_error ());
  check (fleece_set_log_callback (h, log_fn, NULL, count_free) == 0, "%s",
         fleece_get_error ());
  check (fleece_set_progress_callback (h, NULL, NULL, NULL) == 0, "%s",
         fleece_get_error ());

  check (t && fleece_start (h, p, t, 0) == 0, "%s", fleece_get_error ());
  run_settings_busy (h, q);
  check (fleece_set_bwlimit (h, 0) == -1, "bwlimit while running");
  check_error (EBUSY, "the backup has started");
  check (fleece_set_cbw_timeout (h, 0) == -1, "cbw timeout while running");
  check_error (EBUSY, "the backup has started");
  check (fleece_set_log_callback (h, NULL, NULL, NULL) == 0, "%s", fleece_get_error ());
  check (freed == 1, "log free function called %d times", freed);

  check (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());
  check (fleece_set_vmid (h, 101) == 0, "%s", fleece_get_error ());
  check (fleece_set_image_format (h, "raw") == 0, "%s", fleece_get_error ());
  check (fleece_set_bwlimit (h, 0) == 0, "%s", fleece_get_error ());
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  at_qemu_stop (q);
  return EXIT_SUCCESS;
}
