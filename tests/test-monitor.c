/* Sharing QEMU's QMP monitor (issue 14.1).  QEMU serves one client per
 * monitor at a time and qemu-server connects per command, so the library
 * holds the monitor only inside a call: while a backup runs, any other
 * client gets the greeting at once; a monitor another client holds is
 * reported as busy within seconds instead of hanging the caller. */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <check.h>

#include "testlib.h"
#include "fleece/fleece.h"

#define MiB (1024 * 1024)
#define VMID 100
#define ATTEMPTS 100
#define GREETING_LIMIT_US (1 * G_USEC_PER_SEC)

static const TlDisk disks[] = {
  { "scsi0", "raw", 8 * MiB, "scsi", true },
  { "virtio0", "raw", 8 * MiB, "virtio", true },
};
#define NDISKS G_N_ELEMENTS (disks)

/* ---- another client of the monitor --------------------------------------- */

/* Connect to path; -1 on failure. */
static int
connect_unix (const char *path)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

  g_strlcpy (sun.sun_path, path, sizeof sun.sun_path);
  if (fd >= 0 && connect (fd, (struct sockaddr *) &sun, sizeof sun) == 0)
    return fd;
  if (fd >= 0)
    close (fd);
  return -1;
}

/* Read from fd until a line holding the QMP greeting arrives (QEMU may
 * send an event first) or deadline (monotonic us) passes: true if it came. */
static bool
read_greeting (int fd, gint64 deadline)
{
  g_autoptr (GString) buf = g_string_new (NULL);

  for (;;) {
    struct pollfd pfd = { .fd = fd, .events = POLLIN };
    gint64 left = (deadline - g_get_monotonic_time ()) / 1000;
    char chunk[4096];
    ssize_t n;
    char *nl;

    while ((nl = strchr (buf->str, '\n'))) {
      if (g_str_has_prefix (buf->str, "{\"QMP\""))
        return true;
      g_string_erase (buf, 0, nl - buf->str + 1);
    }
    if (left <= 0 || poll (&pfd, 1, (int) left) <= 0)
      return false;
    n = read (fd, chunk, sizeof chunk);
    if (n <= 0)
      return false;
    g_string_append_len (buf, chunk, n);
  }
}

/* A thread that connects ATTEMPTS times, each time waiting for the
 * greeting (no Check calls: the results are checked by the test). */
typedef struct {
  const char *path;
  int slow;              /* attempts without a greeting within the limit */
  gint64 worst_us;
  int done;              /* attempts made */
} Prober;

static gpointer
probe (gpointer data)
{
  Prober *p = data;

  for (int i = 0; i < ATTEMPTS; i++) {
    gint64 t0 = g_get_monotonic_time ();
    int fd = connect_unix (p->path);
    bool greeted = fd >= 0 && read_greeting (fd, t0 + GREETING_LIMIT_US);
    gint64 took = g_get_monotonic_time () - t0;

    if (fd >= 0)
      close (fd);
    p->worst_us = MAX (p->worst_us, took);
    p->slow += !greeted;
    g_atomic_int_inc (&p->done);
    /* Spread the attempts over the library's polls (every 250 ms). */
    g_usleep (20 * 1000);
  }
  return NULL;
}

/* ---- the tests ------------------------------------------------------------- */

/* While a backup runs (throttled: it lasts well beyond the attempts),
 * another client connects 100 times to the library's monitor and gets the
 * greeting within 1 s every time, the backup meanwhile polled by
 * fleece_wait. */
START_TEST (test_monitor_free_while_running)
{
  TlVm *vm = tl_vm_new ("mon", disks, NDISKS, 1);
  GString *log = g_string_new (NULL);
  struct fleece_handle *h;
  struct fleece_plan *p;
  struct fleece_target *t;
  Prober pr = { 0 };
  GThread *thread;
  int waits = 0;
  uint64_t done = 0, total = 0;

  tl_vm_start (vm, NULL);
  h = tl_handle (vm, VMID, log);
  p = tl_plan (h, log);
  t = fleece_target_new_dir (vm->target, "raw");
  /* 8 MiB at 512 KiB/s: 16 s, far beyond the attempts; cancelled after. */
  ck_assert_int_eq (fleece_set_bwlimit (h, 512), 0);
  ck_assert_msg (fleece_attach (h, p, 0) == 0, "%s", fleece_get_error ());
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), log->str);

  pr.path = vm->q->qmp_path;
  thread = g_thread_new ("prober", probe, &pr);
  while (g_atomic_int_get (&pr.done) < ATTEMPTS) {
    ck_assert_msg (fleece_wait (h, 100) == 0, "the backup ended early: %s\n%s",
                   fleece_get_error (), log->str);
    waits++;
  }
  g_thread_join (thread);
  fprintf (stderr, "# %d attempts while the backup ran: slowest greeting %" G_GINT64_FORMAT
           " ms, %d fleece_wait calls\n", ATTEMPTS, pr.worst_us / 1000, waits);
  ck_assert_msg (pr.slow == 0, "%d of %d connection attempts got no greeting within "
                 "1 s while the backup ran (worst %" G_GINT64_FORMAT " ms)", pr.slow,
                 ATTEMPTS, pr.worst_us / 1000);
  /* The library did look at the backup meanwhile, and it still runs. */
  ck_assert_int_gt (waits, 5);
  ck_assert_int_eq (fleece_get_progress (h, &done, &total), 0);
  ck_assert_uint_gt (done, 0);
  ck_assert_uint_lt (done, total);
  ck_assert_int_eq (fleece_wait (h, 0), 0);

  ck_assert_int_eq (fleece_cancel (h), 0);
  ck_assert_int_eq (tl_wait_end (h, 250), -1);
  ck_assert_int_eq (fleece_get_errno (), ECANCELED);
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());
  tl_assert_nothing_left (vm, VMID);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  g_string_free (log, TRUE);
  tl_vm_stop (vm);
}
END_TEST

/* A monitor another client holds: fleece_connect says so (EBUSY) within a
 * few seconds, not after the 60 s command timeout; once it is free the
 * same handle connects. */
START_TEST (test_monitor_held)
{
  TlVm *vm = tl_vm_new ("mon", disks, NDISKS, 1);
  struct fleece_handle *h;
  gint64 t0, took;
  int holder;

  tl_vm_start (vm, NULL);
  holder = connect_unix (vm->q->qmp_path);
  ck_assert_int_ge (holder, 0);
  ck_assert (read_greeting (holder, g_get_monotonic_time () + 5 * G_USEC_PER_SEC));

  h = fleece_new ();
  ck_assert_int_eq (fleece_set_vmid (h, VMID), 0);
  t0 = g_get_monotonic_time ();
  ck_assert_int_eq (fleece_connect (h, vm->q->qmp_path), -1);
  took = g_get_monotonic_time () - t0;
  ck_assert_int_eq (fleece_get_errno (), EBUSY);
  ck_assert_msg (strstr (fleece_get_error (), "another client holds the QMP monitor"),
                 "%s", fleece_get_error ());
  ck_assert_msg (took < 10 * G_USEC_PER_SEC, "fleece_connect took %" G_GINT64_FORMAT
                 " ms to give up", took / 1000);
  /* A failed connect leaves the handle unconnected. */
  ck_assert_int_eq (fleece_get_engine (h), -1);

  close (holder);
  ck_assert_msg (fleece_connect (h, vm->q->qmp_path) == 0, "%s", fleece_get_error ());
  ck_assert_int_eq (fleece_get_engine (h), FLEECE_ENGINE_QEMU);
  fleece_free (h);
  tl_vm_stop (vm);
}
END_TEST

/* A client that holds the monitor for a moment while a backup runs: the
 * wait does not fail (the backup is not lost), returns within the
 * library's greeting timeout, and picks the backup up again once the
 * monitor is free. */
START_TEST (test_monitor_held_while_running)
{
  TlVm *vm = tl_vm_new ("mon", disks, NDISKS, 1);
  GString *log = g_string_new (NULL);
  struct fleece_handle *h;
  struct fleece_plan *p;
  struct fleece_target *t;
  guint8 **pit;
  gint64 t0, took;
  int holder, r;

  tl_vm_start (vm, NULL);
  pit = tl_vm_snapshot (vm);
  h = tl_handle (vm, VMID, log);
  p = tl_plan (h, log);
  t = fleece_target_new_dir (vm->target, "raw");
  ck_assert_int_eq (fleece_set_bwlimit (h, 4096), 0);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s", fleece_get_error ());

  holder = connect_unix (vm->q->qmp_path);
  ck_assert_int_ge (holder, 0);
  ck_assert (read_greeting (holder, g_get_monotonic_time () + 5 * G_USEC_PER_SEC));
  t0 = g_get_monotonic_time ();
  r = fleece_wait (h, 500);
  took = g_get_monotonic_time () - t0;
  ck_assert_msg (r == 0, "fleece_wait with the monitor held: %d: %s", r, fleece_get_error ());
  close (holder);
  tl_vm_overwrite_tail (vm, 0x42);
  ck_assert_msg (tl_wait_end (h, 250) == 1, "%s\n%s", fleece_get_error (), log->str);
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);
  tl_assert_nothing_left (vm, VMID);
  tl_check_point_in_time (vm, pit, vm->target, "raw");
  /* The wait gives up on the busy monitor after the library's greeting
   * timeout (5 s), long before the 60 s command timeout. */
  fprintf (stderr, "# fleece_wait (h, 500) with the monitor held took %" G_GINT64_FORMAT
           " ms\n", took / 1000);
  ck_assert_msg (took < 6500 * 1000, "fleece_wait (h, 500) took %" G_GINT64_FORMAT
                 " ms while another client held the monitor", took / 1000);
  tl_vm_snapshot_free (vm, pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  g_string_free (log, TRUE);
  tl_vm_stop (vm);
}
END_TEST

static Suite *
monitor_suite (void)
{
  Suite *s = suite_create ("monitor");
  TCase *tc = tcase_create ("qemu");

  tcase_set_timeout (tc, 120);
  tcase_add_test (tc, test_monitor_free_while_running);
  tcase_add_test (tc, test_monitor_held);
  tcase_add_test (tc, test_monitor_held_while_running);
  suite_add_tcase (s, tc);
  return s;
}

int
main (void)
{
  SRunner *sr = srunner_create (monitor_suite ());
  int failed;

  srunner_run_all (sr, CK_VERBOSE);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
