/* Helpers of the small API tests (apitest.h). */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <glib.h>

#include "apitest.h"

void
at_check_error (const char *file, int line, int errnum, const char *substr)
{
  const char *msg = fleece_get_error ();

  if (fleece_get_errno () != errnum || !msg || !strstr (msg, substr)) {
    fprintf (stderr, "%s:%d: expected errno %d (%s) and \"%s\", got errno %d: %s\n",
             file, line, errnum, strerror (errnum), substr, fleece_get_errno (),
             msg ? msg : "(no message)");
    exit (EXIT_FAILURE);
  }
}

int64_t
at_now_ms (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- cleaning up at exit ------------------------------------------- */

static GPtrArray *tmpdirs;
static AtQemu *running_qemu;
static pid_t owner;

static int
remove_entry (const char *path, const struct stat *sb, int type,
              struct FTW *ftw)
{
  remove (path);
  return 0;
}

static void
at_exit (void)
{
  /* Not in a forked child: the parent owns these. */
  if (getpid () != owner)
    return;
  if (running_qemu)
    at_qemu_stop (running_qemu);
  for (guint i = 0; tmpdirs && i < tmpdirs->len; i++)
    nftw (tmpdirs->pdata[i], remove_entry, 16, FTW_DEPTH | FTW_PHYS);
  if (tmpdirs)
    g_ptr_array_unref (tmpdirs);
  tmpdirs = NULL;
}

char *
at_tmpdir (const char *tag)
{
  g_autofree char *tmpl = g_strdup_printf ("fleece-api-%s-XXXXXX", tag);
  char *dir = g_dir_make_tmp (tmpl, NULL);

  check (dir != NULL, "cannot make a scratch dir: %s", strerror (errno));
  if (!tmpdirs) {
    tmpdirs = g_ptr_array_new_with_free_func (g_free);
    owner = getpid ();
    atexit (at_exit);
  }
  g_ptr_array_add (tmpdirs, g_strdup (dir));
  return dir;
}

/* ---- QEMU ------------------------------------------------------------ */

static void
make_disk (const char *path, uint64_t size, bool fill)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  char buf[65536];

  check (fd >= 0, "%s: %s", path, strerror (errno));
  check (ftruncate (fd, (off_t) size) == 0, "%s", strerror (errno));
  memset (buf, 0xa5, sizeof buf);
  for (uint64_t off = 0; fill && off < size; off += sizeof buf)
    check (pwrite (fd, buf, sizeof buf, (off_t) off) == sizeof buf, "%s",
           strerror (errno));
  close (fd);
}

static bool
socket_answers (const char *path)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  bool ok;

  g_strlcpy (sun.sun_path, path, sizeof sun.sun_path);
  ok = connect (fd, (struct sockaddr *) &sun, sizeof sun) == 0;
  close (fd);
  return ok;
}

static char *
qemu_binary (void)
{
  const char *env = g_getenv ("FLEECE_QEMU");
  char *bin = env && *env ? g_strdup (env) : g_find_program_in_path ("qemu-system-x86_64");

  if (!bin) {
    printf ("SKIP: no qemu-system-x86_64 (set FLEECE_QEMU)\n");
    exit (77);
  }
  return bin;
}

AtQemu *
at_qemu_start (uint64_t size, bool fill)
{
  AtQemu *q = g_new0 (AtQemu, 1);
  g_autofree char *bin = qemu_binary ();
  g_autofree char *disk = NULL;
  g_autofree char *qmp_arg = NULL;
  g_autofree char *drive_arg = NULL;

  q->dir = at_tmpdir ("qemu");
  q->qmp = g_build_filename (q->dir, "qmp.sock", NULL);
  q->storage = g_build_filename (q->dir, "storage", NULL);
  q->state = g_build_filename (q->dir, "state", NULL);
  q->target = g_build_filename (q->dir, "target", NULL);
  check (mkdir (q->storage, 0700) == 0 && mkdir (q->target, 0700) == 0, "%s",
         strerror (errno));
  disk = g_build_filename (q->dir, "disk.raw", NULL);
  make_disk (disk, size, fill);
  qmp_arg = g_strdup_printf ("unix:%s,server=on,wait=off", q->qmp);
  drive_arg = g_strdup_printf ("if=none,id=drive-scsi0,file=%s,format=raw", disk);
  {
    const char *argv[] = {
      bin, "-machine", "q35", "-accel", "tcg", "-S", "-nodefaults",
      "-display", "none", "-qmp", qmp_arg, "-drive", drive_arg,
      "-device", "virtio-scsi-pci", "-device",
      "scsi-hd,drive=drive-scsi0,id=scsi0", NULL
    };
    g_autoptr (GError) err = NULL;
    GPid pid;

    check (g_spawn_async (NULL, (char **) argv, NULL,
                          G_SPAWN_DO_NOT_REAP_CHILD | G_SPAWN_STDOUT_TO_DEV_NULL,
                          NULL, NULL, &pid, &err), "%s", err ? err->message : "");
    q->pid = pid;
  }
  running_qemu = q;
  for (int i = 0; i < 400 && !socket_answers (q->qmp); i++)
    g_usleep (50 * 1000);
  check (socket_answers (q->qmp), "QEMU did not come up within 20 s");
  return q;
}

void
at_qemu_stop (AtQemu *q)
{
  int status;

  if (!q)
    return;
  if (q->pid > 0) {
    kill (q->pid, SIGTERM);
    for (int i = 0; i < 100 && waitpid (q->pid, &status, WNOHANG) == 0; i++)
      g_usleep (50 * 1000);
    if (kill (q->pid, 0) == 0) {
      kill (q->pid, SIGKILL);
      waitpid (q->pid, &status, 0);
    }
  }
  if (running_qemu == q)
    running_qemu = NULL;
  g_free (q->dir);
  g_free (q->qmp);
  g_free (q->storage);
  g_free (q->state);
  g_free (q->target);
  g_free (q);
}

/* ---- handles ----------------------------------------------------------- */

struct fleece_handle *
at_handle (AtQemu *q)
{
  struct fleece_handle *h = fleece_new ();
  struct fleece_storage *st = fleece_storage_new_dir (q->storage);

  check (h && st, "%s", fleece_get_error ());
  check (fleece_set_vmid (h, 100) == 0, "%s", fleece_get_error ());
  check (fleece_set_state_dir (h, q->state) == 0, "%s", fleece_get_error ());
  check (fleece_set_storage (h, st) == 0, "%s", fleece_get_error ());
  check (fleece_connect (h, q->qmp) == 0, "%s", fleece_get_error ());
  return h;
}

struct fleece_handle *
at_attached (AtQemu *q, struct fleece_plan **plan)
{
  struct fleece_handle *h = at_handle (q);

  *plan = fleece_plan (h);
  check (*plan != NULL, "%s", fleece_get_error ());
  check (fleece_plan_get_drive_count (*plan) == 1, "drives: %d",
         fleece_plan_get_drive_count (*plan));
  check (fleece_attach (h, *plan, 0) == 0, "%s", fleece_get_error ());
  return h;
}

struct fleece_handle *
at_running (AtQemu *q, struct fleece_plan **plan, uint64_t kib_per_s)
{
  struct fleece_handle *h = at_attached (q, plan);
  struct fleece_target *t = fleece_target_new_dir (q->target, "raw");

  check (t != NULL, "%s", fleece_get_error ());
  check (fleece_set_bwlimit (h, kib_per_s) == 0, "%s", fleece_get_error ());
  check (fleece_start (h, *plan, t, 0) == 0, "%s", fleece_get_error ());
  fleece_target_free (t);
  check (fleece_wait (h, 0) == 0, "the backup ended at once: %s",
         fleece_get_error () ? fleece_get_error () : "(ok)");
  return h;
}
