/* fleece_cancel() from a signal handler (async-signal-safe) wakes a
 * fleece_wait(h, -1) blocked on a backup that would run for minutes: it
 * returns -1 with ECANCELED within a few poll intervals. */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/time.h>

#include "apitest.h"

/* 16 MiB at 64 KiB/s: 256 s unless cancelled. */
#define SIZE (16 * 1024 * 1024)
#define SIGNAL_AFTER_MS 700
#define PROMPT_MS 5000

static struct fleece_handle *h;
static volatile sig_atomic_t cancel_rc = 1;
static volatile int64_t signalled_ms;

static void
on_alarm (int sig)
{
  int saved = errno;

  signalled_ms = at_now_ms ();
  cancel_rc = fleece_cancel (h);
  errno = saved;
}

int
main (void)
{
  AtQemu *q = at_qemu_start (SIZE, true);
  struct fleece_plan *p;
  struct sigaction sa = { .sa_handler = on_alarm };
  struct itimerval it = { .it_value = { 0, SIGNAL_AFTER_MS * 1000 } };
  int64_t t0, woke;
  int r;

  h = at_running (q, &p, 64);
  sigemptyset (&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  check (sigaction (SIGALRM, &sa, NULL) == 0, "sigaction");
  t0 = at_now_ms ();
  check (setitimer (ITIMER_REAL, &it, NULL) == 0, "setitimer");
  r = fleece_wait (h, -1);
  woke = at_now_ms ();
  check (r == -1, "wait returned %d", r);
  check_error (ECANCELED, "fleece_wait: ");
  check (cancel_rc == 0, "fleece_cancel in the handler returned %d", (int) cancel_rc);
  check (signalled_ms >= t0 && woke >= signalled_ms, "woke before the signal");
  check (woke - signalled_ms < PROMPT_MS, "woke %lld ms after the cancel",
         (long long) (woke - signalled_ms));
  printf ("fleece_wait returned %lld ms after the cancel\n",
          (long long) (woke - signalled_ms));
  check (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());
  fleece_plan_free (p);
  fleece_free (h);
  at_qemu_stop (q);
  return EXIT_SUCCESS;
}
