/* Shared helpers for libfleece's tests (see testlib.h). */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <check.h>
#include <glib/gstdio.h>

#include "testlib.h"

#define TL_QEMU_START_TIMEOUT_US (20 * G_USEC_PER_SEC)
#define TL_QEMU_QUIT_TIMEOUT_US (5 * G_USEC_PER_SEC)
#define TL_BLOCK 65536

/* ---- cleanup after a failed test ------------------------------------ */

/* Check ends a failed test with _exit() in its forked child, so the test's
 * own cleanup never runs.  QEMU dies with its parent (PR_SET_PDEATHSIG);
 * scratch dirs are removed by a janitor: a shell that reads the dirs from
 * a socket and, when every copy of the socket is closed because the test
 * process ended in whatever way, removes those still there.  It is not
 * our child (GLib reaps it), leaves the process group that Check kills
 * and ignores the signals that end a test run. */
static void
janitor_setup (gpointer data)
{
  /* Out of the test's process group, which Check kills after each test. */
  setsid ();
}

static GMutex janitor_lock;
static int janitor_fd = -1;
static pid_t janitor_owner;

static void
janitor_watch (const char *dir)
{
  static const char script[] =
    "trap '' INT TERM HUP; "
    "while IFS= read -r d; do set -- \"$@\" \"$d\"; done; "
    "exec rm -rf -- \"$@\"";
  const char *argv[] = { "/bin/sh", "-c", script, NULL };
  g_autofree char *line = g_strdup_printf ("%s\n", dir);

  g_mutex_lock (&janitor_lock);
  if (janitor_fd < 0 || janitor_owner != getpid ()) {
    g_autoptr (GError) err = NULL;
    int sv[2];

    /* A process forked by Check gets its own janitor; the parent's keeps
     * watching the parent. */
    if (janitor_fd >= 0)
      close (janitor_fd);
    janitor_fd = -1;
    if (socketpair (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0) {
      if (g_spawn_async_with_fds (NULL, (char **) argv, NULL,
                                  G_SPAWN_DEFAULT, janitor_setup, NULL, NULL,
                                  sv[1], -1, -1, &err)) {
        janitor_fd = sv[0];
        janitor_owner = getpid ();
      } else {
        fprintf (stderr, "testlib: no janitor: %s\n", err->message);
        close (sv[0]);
      }
      close (sv[1]);
    }
  }
  if (janitor_fd >= 0)
    send (janitor_fd, line, strlen (line), MSG_NOSIGNAL);
  g_mutex_unlock (&janitor_lock);
}

static int
remove_entry (const char *path, const struct stat *st, int type,
              struct FTW *ftw)
{
  if (remove (path) < 0 && errno != ENOENT)
    fprintf (stderr, "testlib: cannot remove %s: %s\n", path,
             g_strerror (errno));
  return 0;
}

/* ---- scratch directories -------------------------------------------- */

char *
tl_tmpdir_new (const char *tag)
{
  g_autofree char *tmpl = g_strdup_printf ("fleece-%s-XXXXXX", tag);
  g_autoptr (GError) err = NULL;
  char *dir = g_dir_make_tmp (tmpl, &err);

  ck_assert_msg (dir != NULL, "cannot create a scratch dir: %s",
                 err ? err->message : "?");
  janitor_watch (dir);
  return dir;
}

void
tl_tmpdir_free (char *dir)
{
  if (!dir)
    return;
  nftw (dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
  g_free (dir);
}

/* ---- running tools -------------------------------------------------- */

/* Run argv and abort the test, showing its output, if it fails. */
static void
run_tool (const char *const *argv)
{
  g_autoptr (GError) err = NULL;
  g_autofree char *out = NULL;
  g_autofree char *errout = NULL;
  g_autofree char *cmdline = g_strjoinv (" ", (char **) argv);
  int status = 0;

  if (!g_spawn_sync (NULL, (char **) argv, NULL,
                     G_SPAWN_SEARCH_PATH | G_SPAWN_STDIN_FROM_DEV_NULL,
                     NULL, NULL, &out, &errout, &status, &err))
    ck_abort_msg ("cannot run %s: %s", cmdline, err->message);
  if (!g_spawn_check_wait_status (status, &err))
    ck_abort_msg ("%s failed (%s):\n%s%s", cmdline, err->message, out,
                  errout);
}

static const char *
qemu_binary (void)
{
  const char *b = g_getenv ("FLEECE_QEMU");

  return b && *b ? b : "qemu-system-x86_64";
}

/* ---- QEMU ----------------------------------------------------------- */

static void
child_setup (gpointer data)
{
  pid_t parent = GPOINTER_TO_INT (data);

  /* A test that aborts (Check forks each test) must not leave QEMU
   * running. */
  prctl (PR_SET_PDEATHSIG, SIGKILL);
  if (getppid () != parent)
    _exit (127);
}

static void
print_log (const char *dir)
{
  g_autofree char *log = g_build_filename (dir, "qemu.log", NULL);
  g_autofree char *text = NULL;

  if (g_file_get_contents (log, &text, NULL, NULL))
    fprintf (stderr, "---- %s ----\n%s\n----\n", log, text);
}

/* Whether the child has exited; reaps it (q->pid becomes 0). */
static bool
reap (TlQemu *q, int flags)
{
  int status;
  pid_t r;

  if (q->pid <= 0)
    return true;
  do
    r = waitpid (q->pid, &status, flags);
  while (r < 0 && errno == EINTR);
  if (r == 0)
    return false;
  g_spawn_close_pid (q->pid);
  q->pid = 0;
  return true;
}

TlQemu *
tl_qemu_start (const char *const *extra_args)
{
  TlQemu *q = g_new0 (TlQemu, 1);
  g_autoptr (GPtrArray) argv = g_ptr_array_new_with_free_func (g_free);
  g_autofree char *test_path = NULL;
  g_autofree char *log_path = NULL;
  g_autoptr (GError) err = NULL;
  struct sockaddr_un sun;
  gint64 deadline;
  int log_fd, null_fd;

  q->dir = tl_tmpdir_new ("qemu");
  q->qmp_path = g_build_filename (q->dir, "qmp.sock", NULL);
  test_path = g_build_filename (q->dir, "test.sock", NULL);
  log_path = g_build_filename (q->dir, "qemu.log", NULL);
  ck_assert_msg (strlen (test_path) < sizeof sun.sun_path,
                 "scratch dir %s is too long for a unix socket; set TMPDIR",
                 q->dir);

  g_ptr_array_add (argv, g_strdup (qemu_binary ()));
  g_ptr_array_add (argv, g_strdup ("-machine"));
  g_ptr_array_add (argv, g_strdup ("q35"));
  g_ptr_array_add (argv, g_strdup ("-accel"));
  g_ptr_array_add (argv, g_strdup ("tcg"));
  g_ptr_array_add (argv, g_strdup ("-S"));
  g_ptr_array_add (argv, g_strdup ("-nodefaults"));
  g_ptr_array_add (argv, g_strdup ("-display"));
  g_ptr_array_add (argv, g_strdup ("none"));
  g_ptr_array_add (argv, g_strdup ("-qmp"));
  g_ptr_array_add (argv, g_strdup_printf ("unix:%s,server=on,wait=off",
                                          q->qmp_path));
  g_ptr_array_add (argv, g_strdup ("-qmp"));
  g_ptr_array_add (argv, g_strdup_printf ("unix:%s,server=on,wait=off",
                                          test_path));
  for (size_t i = 0; extra_args && extra_args[i]; i++)
    g_ptr_array_add (argv, g_strdup (extra_args[i]));
  g_ptr_array_add (argv, NULL);

  log_fd = open (log_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  ck_assert_msg (log_fd >= 0, "cannot create %s: %s", log_path,
                 g_strerror (errno));
  null_fd = open ("/dev/null", O_RDONLY | O_CLOEXEC);
  ck_assert_int_ge (null_fd, 0);
  if (!g_spawn_async_with_fds (q->dir, (char **) argv->pdata, NULL,
                               G_SPAWN_SEARCH_PATH
                               | G_SPAWN_DO_NOT_REAP_CHILD,
                               child_setup, GINT_TO_POINTER (getpid ()),
                               &q->pid, null_fd, log_fd, log_fd, &err)) {
    close (log_fd);
    close (null_fd);
    ck_abort_msg ("cannot start %s: %s", qemu_binary (), err->message);
  }
  close (log_fd);
  close (null_fd);

  /* QEMU creates the listening sockets while it starts; connecting early
   * is fine, the greeting comes once its main loop runs. */
  deadline = g_get_monotonic_time () + TL_QEMU_START_TIMEOUT_US;
  q->qmp = fleece_qmp_new ();
  fleece_qmp_set_timeout (q->qmp, TL_QEMU_START_TIMEOUT_US / 1000);
  for (;;) {
    g_clear_error (&err);
    if (g_file_test (test_path, G_FILE_TEST_EXISTS)
        && g_file_test (q->qmp_path, G_FILE_TEST_EXISTS)
        && fleece_qmp_connect_unix (q->qmp, test_path, &err))
      break;
    if (reap (q, WNOHANG)) {
      print_log (q->dir);
      ck_abort_msg ("QEMU exited while starting (log above)");
    }
    if (g_get_monotonic_time () > deadline) {
      print_log (q->dir);
      ck_abort_msg ("QEMU did not come up within 20 s: %s",
                    err ? err->message : "no QMP socket");
    }
    g_usleep (10 * 1000);
  }
  fleece_qmp_set_timeout (q->qmp, FLEECE_QMP_DEFAULT_TIMEOUT_MS);
  return q;
}

bool
tl_qemu_alive (TlQemu *q)
{
  return !reap (q, WNOHANG);
}

void
tl_qemu_stop (TlQemu *q)
{
  gint64 deadline;

  if (!q)
    return;
  if (q->pid > 0 && fleece_qmp_is_connected (q->qmp)) {
    json_object *ret;

    fleece_qmp_set_timeout (q->qmp, TL_QEMU_QUIT_TIMEOUT_US / 1000);
    /* QEMU may close the socket before or after replying: either is a
     * successful quit. */
    ret = fleece_qmp_execute (q->qmp, "quit", NULL, NULL);
    json_object_put (ret);
  }
  fleece_qmp_free (q->qmp);
  q->qmp = NULL;

  deadline = g_get_monotonic_time () + TL_QEMU_QUIT_TIMEOUT_US;
  while (!reap (q, WNOHANG)) {
    if (g_get_monotonic_time () > deadline) {
      fprintf (stderr, "testlib: QEMU %d did not quit, killing it\n",
               (int) q->pid);
      kill (q->pid, SIGKILL);
      reap (q, 0);
      break;
    }
    g_usleep (5 * 1000);
  }

  tl_tmpdir_free (q->dir);
  g_free (q->qmp_path);
  g_free (q);
}

/* ---- images --------------------------------------------------------- */

static inline guint64
splitmix64 (guint64 x)
{
  x += G_GUINT64_CONSTANT (0x9e3779b97f4a7c15);
  x = (x ^ (x >> 30)) * G_GUINT64_CONSTANT (0xbf58476d1ce4e5b9);
  x = (x ^ (x >> 27)) * G_GUINT64_CONSTANT (0x94d049bb133111eb);
  return x ^ (x >> 31);
}

/* The content of 64 KiB block `block` for seed: pseudo-random, so that
 * every block of every seed differs and no block is all zeroes, headed
 * by a readable tag for hexdumps. */
static void
fill_block (guint8 *buf, unsigned seed, guint64 block)
{
  guint64 key = splitmix64 (((guint64) seed << 40) ^ block);

  for (size_t i = 0; i < TL_BLOCK; i += 8) {
    guint64 v = splitmix64 (key + i);

    memcpy (buf + i, &v, 8);
  }
  snprintf ((char *) buf, 64, "fleece seed %u block %" G_GUINT64_FORMAT,
            seed, block);
}

static void
write_pattern (const char *path, uint64_t size, unsigned seed)
{
  g_autofree guint8 *buf = g_malloc (TL_BLOCK);
  int fd = open (path, O_WRONLY | O_CLOEXEC);

  ck_assert_msg (fd >= 0, "cannot open %s: %s", path, g_strerror (errno));
  for (uint64_t off = 0; off < size; off += TL_BLOCK) {
    size_t len = (size_t) MIN ((uint64_t) TL_BLOCK, size - off);
    size_t done = 0;

    fill_block (buf, seed, off / TL_BLOCK);
    while (done < len) {
      ssize_t n = pwrite (fd, buf + done, len - done, (off_t) (off + done));

      if (n < 0 && errno == EINTR)
        continue;
      ck_assert_msg (n > 0, "cannot write %s: %s", path, g_strerror (errno));
      done += (size_t) n;
    }
  }
  ck_assert_int_eq (close (fd), 0);
}

static uint64_t
virtual_size (const char *path, const char *format)
{
  const char *argv[] = { "qemu-img", "info", "-U", "-f", format,
                         "--output=json", path, NULL };
  g_autoptr (GError) err = NULL;
  g_autofree char *out = NULL;
  g_autofree char *errout = NULL;
  json_object *info, *v;
  uint64_t size;
  int status;

  if (!g_spawn_sync (NULL, (char **) argv, NULL,
                     G_SPAWN_SEARCH_PATH | G_SPAWN_STDIN_FROM_DEV_NULL, NULL,
                     NULL, &out, &errout, &status, &err)
      || !g_spawn_check_wait_status (status, &err))
    ck_abort_msg ("qemu-img info %s failed: %s\n%s", path,
                  err ? err->message : "?", errout ? errout : "");
  info = json_tokener_parse (out);
  ck_assert_msg (info && json_object_object_get_ex (info, "virtual-size", &v),
                 "qemu-img info %s: no virtual-size in %s", path, out);
  size = (uint64_t) json_object_get_int64 (v);
  json_object_put (info);
  return size;
}

char *
tl_make_image (TlQemu *q, const char *name, const char *format,
               uint64_t size, unsigned seed)
{
  char *path = g_build_filename (q->dir, name, NULL);
  g_autofree char *size_str = g_strdup_printf ("%" G_GUINT64_FORMAT,
                                               (guint64) size);
  uint64_t vsize;

  if (strcmp (format, "raw") == 0) {
    const char *create[] = { "qemu-img", "create", "-q", "-f", "raw", path,
                             size_str, NULL };

    run_tool (create);
    write_pattern (path, size, seed);
  } else {
    /* Write the pattern into a raw file and convert: one qemu-img run
     * instead of one qemu-io write per block, and convert keeps the exact
     * virtual size. */
    g_autofree char *raw = g_strdup_printf ("%s.tl-raw", path);
    const char *create[] = { "qemu-img", "create", "-q", "-f", "raw", raw,
                             size_str, NULL };
    const char *convert[] = { "qemu-img", "convert", "-q", "-f", "raw",
                              "-O", format, raw, path, NULL };

    run_tool (create);
    write_pattern (raw, size, seed);
    run_tool (convert);
    g_unlink (raw);
  }

  vsize = virtual_size (path, format);
  ck_assert_msg (vsize == size,
                 "%s: virtual size %" G_GUINT64_FORMAT " != %" G_GUINT64_FORMAT
                 " bytes (qcow2 needs a multiple of 512)", path,
                 (guint64) vsize, (guint64) size);
  return path;
}

/* ---- a Proxmox-shaped VM -------------------------------------------- */

TlVm *
tl_vm_new (const char *tag, const TlDisk *disks, size_t ndisks,
           unsigned first_seed)
{
  TlVm *vm = g_new0 (TlVm, 1);
  TlQemu images = { 0 };

  vm->dir = tl_tmpdir_new (tag);
  vm->disks = disks;
  vm->ndisks = ndisks;
  vm->paths = g_new0 (char *, ndisks + 1);
  /* tl_make_image only needs a dir: the images go in the VM's, which
   * outlives the QEMU's (tl_qemu_stop removes that one). */
  images.dir = vm->dir;
  for (size_t i = 0; i < ndisks; i++) {
    const TlDisk *d = &disks[i];
    g_autofree char *name = g_strdup_printf ("%s.%s", d->key, d->format);

    vm->paths[i] = tl_make_image (&images, name, d->format, d->size,
                                  first_seed + (unsigned) i);
  }
  return vm;
}

void
tl_vm_start (TlVm *vm, const char *const *extra_args)
{
  g_autoptr (GPtrArray) args = g_ptr_array_new_with_free_func (g_free);
  bool scsi = false;

  for (size_t i = 0; i < vm->ndisks; i++) {
    const TlDisk *d = &vm->disks[i];

    if (strcmp (d->bus, "none") == 0)
      continue;
    g_ptr_array_add (args, g_strdup ("-drive"));
    g_ptr_array_add (args, g_strdup_printf (
      "file=%s,if=none,id=drive-%s,format=%s,discard=unmap",
      vm->paths[i], d->key, d->format));
    /* One controller for all SCSI disks, as Proxmox's scsihw. */
    if (strcmp (d->bus, "scsi") == 0 && !scsi) {
      g_ptr_array_add (args, g_strdup ("-device"));
      g_ptr_array_add (args, g_strdup ("virtio-scsi-pci,id=scsihw0"));
      scsi = true;
    }
    g_ptr_array_add (args, g_strdup ("-device"));
    if (strcmp (d->bus, "scsi") == 0)
      g_ptr_array_add (args, g_strdup_printf (
        "scsi-hd,bus=scsihw0.0,drive=drive-%s,id=%s", d->key, d->key));
    else
      g_ptr_array_add (args, g_strdup_printf (
        "virtio-blk-pci,drive=drive-%s,id=%s", d->key, d->key));
  }
  for (size_t i = 0; extra_args && extra_args[i]; i++)
    g_ptr_array_add (args, g_strdup (extra_args[i]));
  g_ptr_array_add (args, NULL);
  vm->q = tl_qemu_start ((const char *const *) args->pdata);
  vm->storage = g_build_filename (vm->dir, "storage", NULL);
  vm->target = g_build_filename (vm->dir, "target", NULL);
  vm->state = g_build_filename (vm->dir, "state", NULL);
  ck_assert_int_eq (g_mkdir (vm->storage, 0700), 0);
  ck_assert_int_eq (g_mkdir (vm->target, 0700), 0);
  vm->nodes_before = tl_node_names (vm->q);
}

static void
die_with_parent (gpointer data)
{
  prctl (PR_SET_PDEATHSIG, SIGTERM);
}

GPid
tl_vm_nbd_target (TlVm *vm, char **uri)
{
  g_autofree char *sock = g_build_filename (vm->dir, "nbd.sock", NULL);
  g_autoptr (GPtrArray) argv = g_ptr_array_new_with_free_func (g_free);
  GPid qsd;

  g_ptr_array_add (argv, g_strdup ("qemu-storage-daemon"));
  g_ptr_array_add (argv, g_strdup ("--nbd-server"));
  g_ptr_array_add (argv, g_strdup_printf ("addr.type=unix,addr.path=%s", sock));
  for (size_t i = 0; i < vm->ndisks; i++) {
    g_autofree char *file = g_strdup_printf ("%s/%s.raw", vm->target, vm->disks[i].key);
    int fd = open (file, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);

    ck_assert (fd >= 0 && ftruncate (fd, (off_t) vm->disks[i].size) == 0);
    close (fd);
    g_ptr_array_add (argv, g_strdup ("--blockdev"));
    g_ptr_array_add (argv, g_strdup_printf ("driver=file,filename=%s,node-name=n%zu", file, i));
    g_ptr_array_add (argv, g_strdup ("--export"));
    g_ptr_array_add (argv, g_strdup_printf ("type=nbd,id=e%zu,node-name=n%zu,name=%s,writable=on",
                                            i, i, vm->disks[i].key));
  }
  g_ptr_array_add (argv, NULL);
  ck_assert (g_spawn_async (NULL, (char **) argv->pdata, NULL,
                            G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD, die_with_parent,
                            NULL, &qsd, NULL));
  for (int i = 0; i < 500 && !g_file_test (sock, G_FILE_TEST_EXISTS); i++)
    g_usleep (10000);
  ck_assert_msg (g_file_test (sock, G_FILE_TEST_EXISTS), "qemu-storage-daemon made no %s", sock);
  *uri = g_strdup_printf ("nbd+unix:///?socket=%s", sock);
  return qsd;
}

guint8 **
tl_vm_snapshot (TlVm *vm)
{
  guint8 **data = g_new0 (guint8 *, vm->ndisks);

  for (size_t i = 0; i < vm->ndisks; i++) {
    uint64_t size = 0;
    data[i] = tl_read_image (vm->paths[i], vm->disks[i].format, &size);
    ck_assert_uint_eq (size, vm->disks[i].size);
  }
  return data;
}

void
tl_vm_snapshot_free (TlVm *vm, guint8 **data)
{
  for (size_t i = 0; i < vm->ndisks; i++)
    g_free (data[i]);
  g_free (data);
}

void
tl_vm_stop (TlVm *vm)
{
  if (!vm)
    return;
  tl_qemu_stop (vm->q);
  g_strfreev (vm->paths);
  g_free (vm->storage);
  g_free (vm->target);
  g_free (vm->state);
  g_strfreev (vm->nodes_before);
  tl_tmpdir_free (vm->dir);
  g_free (vm);
}

const char *
tl_disk_qdev (const TlDisk *d)
{
  static char buf[128];

  if (strcmp (d->bus, "virtio") != 0)
    return d->key;
  g_snprintf (buf, sizeof buf, "/machine/peripheral/%s/virtio-backend",
              d->key);
  return buf;
}

/* ---- QMP ------------------------------------------------------------ */

json_object *
tl_qmp_try (TlQemu *q, const char *command, json_object *args,
            char **errmsg)
{
  g_autoptr (GError) err = NULL;
  json_object *ret = fleece_qmp_execute (q->qmp, command, args, &err);

  if (errmsg)
    *errmsg = ret ? NULL : g_strdup (err->message);
  return ret;
}

json_object *
tl_qmp (TlQemu *q, const char *command, json_object *args)
{
  g_autoptr (GError) err = NULL;
  json_object *ret = fleece_qmp_execute (q->qmp, command, args, &err);

  if (!ret)
    ck_abort_msg ("QMP %s failed: %s", command, err->message);
  return ret;
}

json_object *
tl_json (const char *fmt, ...)
{
  g_autofree char *text = NULL;
  enum json_tokener_error jerr;
  json_object *obj;
  va_list ap;

  va_start (ap, fmt);
  text = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  obj = json_tokener_parse_verbose (text, &jerr);
  if (!obj && jerr != json_tokener_success)
    ck_abort_msg ("bad JSON (%s): %s", json_tokener_error_desc (jerr), text);
  return obj;
}

/* The bytes QEMU logged from offset on (g_free). */
static char *
log_tail (TlQemu *q, goffset from)
{
  g_autofree char *log = g_build_filename (q->dir, "qemu.log", NULL);
  g_autofree char *text = NULL;
  gsize len = 0;

  if (!g_file_get_contents (log, &text, &len, NULL) || (gsize) from > len)
    return g_strdup ("");
  return g_strdup (text + from);
}

static goffset
log_size (TlQemu *q)
{
  g_autofree char *log = g_build_filename (q->dir, "qemu.log", NULL);
  struct stat st;

  return stat (log, &st) == 0 ? (goffset) st.st_size : 0;
}

void
tl_guest_io (TlQemu *q, const char *qdev, const char *io_command)
{
  g_autoptr (GError) err = NULL;
  g_autofree char *line = NULL;
  g_autofree char *out = NULL;
  g_autofree char *logged = NULL;
  goffset before = log_size (q);
  static const char *const bad[] = {
    "failed", "Error", "error", "not found", "Invalid", "invalid",
    "Cannot", "cannot", "No such", "Unknown", "unknown", NULL,
  };

  ck_assert_msg (!strchr (io_command, '"'), "quote in qemu-io command %s",
                 io_command);
  line = g_strdup_printf ("qemu-io -d %s \"%s\"", qdev, io_command);
  out = fleece_qmp_hmp (q->qmp, line, &err);
  if (!out)
    ck_abort_msg ("HMP %s: %s", line, err->message);
  /* HMP only returns its own errors ("Error: Device 'x' not found"); the
   * qemu-io command prints its result ("write failed: ...", "Pattern
   * verification failed") on QEMU's stdout, i.e. into the log, before the
   * HMP command returns. */
  logged = log_tail (q, before);
  for (size_t i = 0; bad[i]; i++)
    if (strstr (out, bad[i]) || strstr (logged, bad[i]))
      ck_abort_msg ("HMP %s: %s%s", line, out, logged);
}

static gint
compare_strings (gconstpointer a, gconstpointer b)
{
  return g_strcmp0 (*(const char *const *) a, *(const char *const *) b);
}

/* Sort and steal a GPtrArray of strings into a strv. */
static char **
sorted_strv (GPtrArray *a)
{
  g_ptr_array_sort (a, compare_strings);
  g_ptr_array_add (a, NULL);
  return (char **) g_ptr_array_free (a, FALSE);
}

char **
tl_node_names (TlQemu *q)
{
  json_object *nodes = tl_qmp (q, "query-named-block-nodes",
                               tl_json ("{\"flat\": true}"));
  GPtrArray *names = g_ptr_array_new ();
  size_t n;

  ck_assert (json_object_is_type (nodes, json_type_array));
  n = json_object_array_length (nodes);
  for (size_t i = 0; i < n; i++) {
    json_object *name;

    if (json_object_object_get_ex (json_object_array_get_idx (nodes, i),
                                   "node-name", &name))
      g_ptr_array_add (names, g_strdup (json_object_get_string (name)));
  }
  json_object_put (nodes);
  return sorted_strv (names);
}

/* query-block's qdev is the id for most devices but a QOM path for some
 * (virtio-blk: /machine/peripheral/<id>/virtio-backend). */
static bool
qdev_matches (const char *got, const char *qdev)
{
  g_autofree char *prefix = g_strdup_printf ("/machine/peripheral/%s", qdev);

  if (!got)
    return false;
  if (strcmp (got, qdev) == 0 || strcmp (got, prefix) == 0)
    return true;
  return g_str_has_prefix (got, prefix) && got[strlen (prefix)] == '/';
}

char *
tl_device_root (TlQemu *q, const char *qdev)
{
  json_object *blocks = tl_qmp (q, "query-block", NULL);
  char *root = NULL;
  size_t n;

  ck_assert (json_object_is_type (blocks, json_type_array));
  n = json_object_array_length (blocks);
  for (size_t i = 0; i < n && !root; i++) {
    json_object *b = json_object_array_get_idx (blocks, i);
    json_object *v, *inserted, *node;

    if (!json_object_object_get_ex (b, "qdev", &v)
        || !qdev_matches (json_object_get_string (v), qdev))
      continue;
    if (json_object_object_get_ex (b, "inserted", &inserted)
        && json_object_object_get_ex (inserted, "node-name", &node))
      root = g_strdup (json_object_get_string (node));
  }
  json_object_put (blocks);
  return root;
}

int
tl_job_count (TlQemu *q)
{
  json_object *jobs = tl_qmp (q, "query-jobs", NULL);
  int n;

  ck_assert (json_object_is_type (jobs, json_type_array));
  n = (int) json_object_array_length (jobs);
  json_object_put (jobs);
  return n;
}

/* ---- files ---------------------------------------------------------- */

guint8 *
tl_read_file (const char *path, uint64_t offset, size_t len)
{
  guint8 *buf = g_malloc (len ? len : 1);
  size_t done = 0;
  int fd = open (path, O_RDONLY | O_CLOEXEC);

  ck_assert_msg (fd >= 0, "cannot open %s: %s", path, g_strerror (errno));
  while (done < len) {
    ssize_t n = pread (fd, buf + done, len - done, (off_t) (offset + done));

    if (n < 0 && errno == EINTR)
      continue;
    ck_assert_msg (n >= 0, "cannot read %s: %s", path, g_strerror (errno));
    ck_assert_msg (n > 0, "%s: short read at %" G_GUINT64_FORMAT, path,
                   (guint64) (offset + done));
    done += (size_t) n;
  }
  close (fd);
  return buf;
}

guint8 *
tl_read_image (const char *path, const char *format, uint64_t *size)
{
  g_autoptr (GError) err = NULL;
  g_autofree char *raw = NULL;
  g_autofree char *data = NULL;
  gsize len = 0;

  if (strcmp (format, "raw") == 0) {
    if (!g_file_get_contents (path, &data, &len, &err))
      ck_abort_msg ("%s", err->message);
  } else {
    /* -U: the image may still be open in QEMU (a fleecing image). */
    const char *convert[] = { "qemu-img", "convert", "-q", "-U", "-f",
                              format, "-O", "raw", path, NULL, NULL };
    int fd = g_file_open_tmp ("fleece-read-XXXXXX.raw", &raw, &err);

    ck_assert_msg (fd >= 0, "%s", err ? err->message : "?");
    close (fd);
    convert[9] = raw;
    run_tool (convert);
    if (!g_file_get_contents (raw, &data, &len, &err))
      ck_abort_msg ("%s", err->message);
    g_unlink (raw);
  }
  if (size)
    *size = len;
  return (guint8 *) g_steal_pointer (&data);
}

char **
tl_list_dir (const char *dir)
{
  g_autoptr (GError) err = NULL;
  GDir *d = g_dir_open (dir, 0, &err);
  GPtrArray *names = g_ptr_array_new ();
  const char *name;

  ck_assert_msg (d != NULL, "%s", err ? err->message : dir);
  while ((name = g_dir_read_name (d)))
    g_ptr_array_add (names, g_strdup (name));
  g_dir_close (d);
  return sorted_strv (names);
}

uint64_t
tl_allocated_bytes (const char *path)
{
  struct stat st;

  ck_assert_msg (stat (path, &st) == 0, "stat %s: %s", path,
                 g_strerror (errno));
  return (uint64_t) st.st_blocks * 512;
}
