/* A child after fork() gets EPERM from every call on the parent's handle
 * and touches nothing: the parent's run (its lock, its record, its nodes
 * in QEMU) is intact after the child used and freed the handle, and the
 * parent backs up and cleans up as if nothing happened. */
#include <errno.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "apitest.h"

static struct fleece_handle *h;
static struct fleece_plan *p;
static struct fleece_target *t;
static int failures;

#define EPERM_INT(call) \
  do { if ((call) != -1 || fleece_get_errno () != EPERM) { \
         fprintf (stderr, "child: %s: %s\n", #call, fleece_get_error ()); failures++; } \
  } while (0)
#define EPERM_PTR(call) \
  do { if ((call) != NULL || fleece_get_errno () != EPERM) { \
         fprintf (stderr, "child: %s: %s\n", #call, fleece_get_error ()); failures++; } \
  } while (0)

static void
child (AtQemu *q)
{
  const char *keys[] = { "scsi0", NULL };
  uint64_t v;

  EPERM_INT (fleece_connect (h, q->qmp));
  EPERM_INT (fleece_set_vmid (h, 101));
  EPERM_INT (fleece_get_vmid (h));
  EPERM_INT (fleece_set_state_dir (h, q->dir));
  EPERM_INT (fleece_set_engine (h, FLEECE_ENGINE_QEMU));
  EPERM_INT (fleece_get_engine (h));
  EPERM_INT (fleece_set_qmp_timeout (h, 1000));
  EPERM_INT (fleece_set_drives (h, keys));
  EPERM_INT (fleece_set_plan_flags (h, 0));
  EPERM_INT (fleece_set_image_format (h, "raw"));
  EPERM_INT (fleece_set_bwlimit (h, 0));
  EPERM_INT (fleece_set_bitmap (h, NULL, 0));
  EPERM_INT (fleece_set_cbw_timeout (h, 0));
  EPERM_INT (fleece_set_log_callback (h, NULL, NULL, NULL));
  EPERM_INT (fleece_set_progress_callback (h, NULL, NULL, NULL));
  EPERM_INT (fleece_set_record_callback (h, NULL, NULL, NULL, NULL));
  EPERM_PTR (fleece_plan (h));
  EPERM_INT (fleece_attach (h, p, 0));
  EPERM_INT (fleece_start (h, p, t, 0));
  EPERM_INT (fleece_wait (h, 0));
  EPERM_INT (fleece_get_progress (h, &v, &v));
  EPERM_INT (fleece_get_drive_progress (h, "scsi0", &v, &v));
  EPERM_INT (fleece_get_stat (h, NULL, FLEECE_STAT_DONE, &v));
  EPERM_PTR (fleece_get_drive_result (h, "scsi0"));
  EPERM_INT (fleece_get_drive_elapsed_ms (h, "scsi0"));
  EPERM_PTR (fleece_get_record (h));
  EPERM_PTR (fleece_get_status (h, 0));
  EPERM_INT (fleece_cleanup (h, 0));
  errno = 0;
  if (fleece_cancel (h) != -1 || errno != EPERM) {
    fprintf (stderr, "child: fleece_cancel: errno %d\n", errno);
    failures++;
  }
  /* Frees the child's copy only. */
  fleece_free (h);
}

static void
check_run_intact (AtQemu *q)
{
  struct fleece_handle *other = fleece_new ();
  char *status = fleece_get_status (h, 0);
  char *seen;

  check (status && strstr (status, "\"lock\":\"ours\"") &&
         strstr (status, "\"state\":\"attached\""), "%s", status);
  free (status);
  /* Another process's view: the lock is held. */
  check (fleece_set_vmid (other, 100) == 0 && fleece_set_state_dir (other, q->state) == 0,
         "%s", fleece_get_error ());
  seen = fleece_get_status (other, 0);
  check (seen && strstr (seen, "\"lock\":\"held\""), "%s", seen);
  free (seen);
  fleece_free (other);
}

int
main (void)
{
  AtQemu *q = at_qemu_start (4 * 1024 * 1024, true);
  pid_t pid;
  int status = 0, r;

  h = at_attached (q, &p);
  t = fleece_target_new_dir (q->target, "raw");
  check (t != NULL, "%s", fleece_get_error ());
  fflush (NULL);
  pid = fork ();
  check (pid >= 0, "fork");
  if (pid == 0) {
    child (q);
    _exit (failures ? 1 : 0);
  }
  check (waitpid (pid, &status, 0) == pid, "waitpid");
  check (WIFEXITED (status) && WEXITSTATUS (status) == 0,
         "the child's calls were not all refused with EPERM (status 0x%x)", status);

  check_run_intact (q);
  check (fleece_start (h, p, t, 0) == 0, "%s", fleece_get_error ());
  r = fleece_wait (h, -1);
  check (r == 1, "wait: %d %s", r, fleece_get_error ());
  check (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  at_qemu_stop (q);
  return EXIT_SUCCESS;
}
