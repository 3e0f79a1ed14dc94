/* fleece_cancel() from another thread wakes a fleece_wait(h, -1) blocked
 * on a backup that would run for minutes: -1 with ECANCELED, promptly. */
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "apitest.h"

#define SIZE (16 * 1024 * 1024)
#define CANCEL_AFTER_MS 700
#define PROMPT_MS 5000

static struct fleece_handle *h;
static int cancel_rc = 1;
static int64_t cancelled_ms;

static void *
canceller (void *arg)
{
  usleep (CANCEL_AFTER_MS * 1000);
  cancelled_ms = at_now_ms ();
  cancel_rc = fleece_cancel (h);
  return NULL;
}

int
main (void)
{
  AtQemu *q = at_qemu_start (SIZE, true);
  struct fleece_plan *p;
  pthread_t t;
  int64_t woke;
  int r;

  h = at_running (q, &p, 64);
  check (pthread_create (&t, NULL, canceller, NULL) == 0, "pthread_create");
  r = fleece_wait (h, -1);
  woke = at_now_ms ();
  check (pthread_join (t, NULL) == 0, "pthread_join");
  check (r == -1, "wait returned %d", r);
  check_error (ECANCELED, "fleece_wait: ");
  check (cancel_rc == 0, "fleece_cancel returned %d", cancel_rc);
  check (woke >= cancelled_ms, "woke before the cancel");
  check (woke - cancelled_ms < PROMPT_MS, "woke %lld ms after the cancel",
         (long long) (woke - cancelled_ms));
  printf ("fleece_wait returned %lld ms after the cancel\n",
          (long long) (woke - cancelled_ms));
  check (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());
  fleece_plan_free (p);
  fleece_free (h);
  at_qemu_stop (q);
  return EXIT_SUCCESS;
}
