/* Shared helpers for libfleece's tests (see testlib.h). */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
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

/* A raw file of exactly size bytes holding the pattern: no qemu-img run
 * (each costs ~0.1 s, and a VM has several disks). */
static void
make_raw (const char *path, uint64_t size, unsigned seed)
{
  int fd = open (path, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);

  ck_assert_msg (fd >= 0, "cannot create %s: %s", path, g_strerror (errno));
  ck_assert_msg (ftruncate (fd, (off_t) size) == 0, "%s: %s", path, g_strerror (errno));
  close (fd);
  write_pattern (path, size, seed);
}

char *
tl_make_image (TlQemu *q, const char *name, const char *format,
               uint64_t size, unsigned seed)
{
  char *path = g_build_filename (q->dir, name, NULL);

  if (strcmp (format, "raw") == 0) {
    make_raw (path, size, seed);
  } else {
    /* Write the pattern into a raw file and convert: one qemu-img run
     * instead of one qemu-io write per block, and convert keeps the exact
     * virtual size (a qcow2 image's is a multiple of 512). */
    g_autofree char *raw = g_strdup_printf ("%s.tl-raw", path);
    const char *convert[] = { "qemu-img", "convert", "-q", "-f", "raw",
                              "-O", format, raw, path, NULL };
    uint64_t vsize;

    ck_assert_msg (size % 512 == 0, "%s: a %s image's size is a multiple of 512, "
                   "not %" G_GUINT64_FORMAT, path, format, (guint64) size);
    make_raw (raw, size, seed);
    run_tool (convert);
    g_unlink (raw);
    vsize = virtual_size (path, format);
    ck_assert_msg (vsize == size, "%s: virtual size %" G_GUINT64_FORMAT " != %"
                   G_GUINT64_FORMAT " bytes", path, (guint64) vsize, (guint64) size);
  }
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

/* The firmware code for a VM with an EFI disk: zeroes of OVMF_CODE_4M's
 * size (the guest never runs). */
static char *
pflash_code (TlVm *vm)
{
  char *path = g_build_filename (vm->dir, "pflash0-code.fd", NULL);
  int fd = open (path, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);

  ck_assert_msg (fd >= 0 && ftruncate (fd, 3653632) == 0, "%s: %s", path,
                 g_strerror (errno));
  close (fd);
  return path;
}

/* qemu-server 8's shape: -drive if=none,id=drive-<key> and the device, the
 * EFI disk as -drive if=pflash,unit=1. */
static void
drive_args (TlVm *vm, size_t i, const char *code, GPtrArray *args)
{
  const TlDisk *d = &vm->disks[i];

  g_ptr_array_add (args, g_strdup ("-drive"));
  if (strcmp (d->bus, "pflash") == 0) {
    g_ptr_array_add (args, g_strdup_printf (
      "if=pflash,unit=0,format=raw,readonly=on,file=%s", code));
    g_ptr_array_add (args, g_strdup ("-drive"));
    g_ptr_array_add (args, g_strdup_printf (
      "if=pflash,unit=1,id=drive-%s,format=%s,file=%s", d->key, d->format,
      vm->paths[i]));
    return;
  }
  g_ptr_array_add (args, g_strdup_printf (
    "file=%s,if=none,id=drive-%s,format=%s,discard=unmap",
    vm->paths[i], d->key, d->format));
}

/* qemu-server 9's shape: a throttle node drive-<key> (in its own throttle
 * group) over the format node f<key> over the file node e<key>; devices
 * attach by node name, the EFI disk is -machine pflash1. */
static void
blockdev_args (TlVm *vm, size_t i, const char *code, GPtrArray *args)
{
  const TlDisk *d = &vm->disks[i];
  const char *discard = strcmp (d->bus, "pflash") == 0 ? "ignore" : "unmap";

  if (strcmp (d->bus, "pflash") == 0) {
    g_ptr_array_add (args, g_strdup ("-blockdev"));
    g_ptr_array_add (args, g_strdup_printf (
      "{\"driver\":\"raw\",\"file\":{\"driver\":\"file\",\"filename\":\"%s\"},"
      "\"node-name\":\"pflash0\",\"read-only\":true}", code));
    g_ptr_array_add (args, g_strdup ("-machine"));
    g_ptr_array_add (args, g_strdup_printf ("pflash0=pflash0,pflash1=drive-%s", d->key));
  }
  g_ptr_array_add (args, g_strdup ("-object"));
  g_ptr_array_add (args, g_strdup_printf (
    "{\"id\":\"throttle-drive-%s\",\"limits\":{},\"qom-type\":\"throttle-group\"}",
    d->key));
  g_ptr_array_add (args, g_strdup ("-blockdev"));
  g_ptr_array_add (args, g_strdup_printf (
    "{\"detect-zeroes\":\"%s\",\"discard\":\"%s\",\"driver\":\"throttle\","
    "\"file\":{\"cache\":{\"direct\":false,\"no-flush\":false},\"detect-zeroes\":\"%s\","
    "\"discard\":\"%s\",\"driver\":\"%s\",\"file\":{\"aio\":\"threads\","
    "\"cache\":{\"direct\":false,\"no-flush\":false},\"detect-zeroes\":\"%s\","
    "\"discard\":\"%s\",\"driver\":\"file\",\"filename\":\"%s\",\"node-name\":\"e%s\","
    "\"read-only\":false},\"node-name\":\"f%s\",\"read-only\":false},"
    "\"node-name\":\"drive-%s\",\"read-only\":false,"
    "\"throttle-group\":\"throttle-drive-%s\"}",
    strcmp (discard, "unmap") == 0 ? "unmap" : "on", discard,
    strcmp (discard, "unmap") == 0 ? "unmap" : "on", discard, d->format,
    strcmp (discard, "unmap") == 0 ? "unmap" : "on", discard, vm->paths[i],
    d->key, d->key, d->key, d->key));
}

static void
vm_start (TlVm *vm, bool blockdev, const char *const *extra_args)
{
  g_autoptr (GPtrArray) args = g_ptr_array_new_with_free_func (g_free);
  g_autofree char *code = NULL;
  bool scsi = false;

  for (size_t i = 0; i < vm->ndisks; i++) {
    const TlDisk *d = &vm->disks[i];

    if (strcmp (d->bus, "none") == 0)
      continue;
    if (strcmp (d->bus, "pflash") == 0) {
      ck_assert_msg (!code, "one pflash disk per VM");
      code = pflash_code (vm);
    }
    (blockdev ? blockdev_args : drive_args) (vm, i, code, args);
    if (strcmp (d->bus, "pflash") == 0)
      continue;
    /* One controller for all SCSI disks, as Proxmox's scsihw. */
    if (strcmp (d->bus, "scsi") == 0 && !scsi) {
      g_ptr_array_add (args, g_strdup ("-device"));
      g_ptr_array_add (args, g_strdup ("virtio-scsi-pci,id=scsihw0"));
      scsi = true;
    }
    g_ptr_array_add (args, g_strdup ("-device"));
    if (strcmp (d->bus, "scsi") == 0)
      g_ptr_array_add (args, g_strdup_printf (
        "scsi-hd,bus=scsihw0.0,drive=drive-%s,id=%s%s%s", d->key, d->key,
        blockdev ? ",device_id=drive-" : "", blockdev ? d->key : ""));
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
  tl_vm_record_before (vm);
}

void
tl_vm_start (TlVm *vm, const char *const *extra_args)
{
  vm_start (vm, false, extra_args);
}

void
tl_vm_start_blockdev (TlVm *vm, const char *const *extra_args)
{
  vm_start (vm, true, extra_args);
}

void
tl_vm_record_before (TlVm *vm)
{
  g_strfreev (vm->nodes_before);
  g_strfreev (vm->roots_before);
  g_free (vm->graph_before);
  vm->nodes_before = tl_node_names (vm->q);
  vm->roots_before = tl_device_roots (vm->q);
  vm->graph_before = tl_block_graph (vm->q);
}

uint64_t
tl_vm_overwrite_tail (TlVm *vm, unsigned pattern)
{
  uint64_t total = 0;

  for (size_t i = 0; i < vm->ndisks; i++) {
    const TlDisk *d = &vm->disks[i];
    uint64_t len = MIN ((uint64_t) 1024 * 1024, d->size / 2);
    uint64_t off = (d->size - len) & ~(uint64_t) 4095;
    g_autofree char *cmd = NULL;

    if (strcmp (d->bus, "none") == 0)
      continue;
    /* qemu-io through a device writes whole sectors. */
    len = (d->size - off) & ~(uint64_t) 511;
    cmd = g_strdup_printf ("write -P 0x%02x %" G_GUINT64_FORMAT " %"
                           G_GUINT64_FORMAT, pattern, off, len);
    tl_guest_io (vm->q, tl_disk_qdev (d), cmd);
    total += len;
  }
  return total;
}

static void
die_with_parent (gpointer data)
{
  prctl (PR_SET_PDEATHSIG, SIGTERM);
}

GPid
tl_vm_nbd_target_sized (TlVm *vm, const char *key, int64_t delta, char **uri)
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
    int64_t size = (int64_t) vm->disks[i].size;

    if (key && strcmp (key, vm->disks[i].key) == 0)
      size += delta;
    ck_assert (fd >= 0 && ftruncate (fd, (off_t) size) == 0);
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

GPid
tl_vm_nbd_target (TlVm *vm, char **uri)
{
  return tl_vm_nbd_target_sized (vm, NULL, 0, uri);
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
  g_strfreev (vm->roots_before);
  g_free (vm->graph_before);
  tl_tmpdir_free (vm->dir);
  g_free (vm);
}

const char *
tl_disk_qdev (const TlDisk *d)
{
  static char buf[128];

  if (strcmp (d->bus, "pflash") == 0)
    return "/machine/system.flash1";
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
    "Cannot", "cannot", "No such", "Unknown", "unknown",
    "Permission conflict", NULL,
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

uint64_t
tl_dir_allocated_bytes (const char *dir)
{
  g_auto (GStrv) files = tl_list_dir (dir);
  uint64_t held = 0;

  for (char **f = files; *f; f++) {
    g_autofree char *path = g_build_filename (dir, *f, NULL);
    held += tl_allocated_bytes (path);
  }
  return held;
}

/* ---- the block graph ------------------------------------------------ */

char **
tl_device_roots (TlQemu *q)
{
  json_object *blocks = tl_qmp (q, "query-block", NULL);
  GPtrArray *roots = g_ptr_array_new ();

  ck_assert (json_object_is_type (blocks, json_type_array));
  for (size_t i = 0; i < json_object_array_length (blocks); i++) {
    json_object *b = json_object_array_get_idx (blocks, i);
    json_object *qdev = NULL, *dev = NULL, *inserted, *node;
    const char *who;

    if (!json_object_object_get_ex (b, "inserted", &inserted)
        || !json_object_object_get_ex (inserted, "node-name", &node))
      continue;
    json_object_object_get_ex (b, "qdev", &qdev);
    json_object_object_get_ex (b, "device", &dev);
    who = qdev && *json_object_get_string (qdev) ? json_object_get_string (qdev)
                                                 : json_object_get_string (dev);
    g_ptr_array_add (roots, g_strdup_printf ("%s=%s", who,
                                             json_object_get_string (node)));
  }
  json_object_put (blocks);
  return sorted_strv (roots);
}

static const char *
jstr_or (json_object *o, const char *key, const char *dflt)
{
  json_object *v;

  if (!json_object_object_get_ex (o, key, &v) || !json_object_is_type (v, json_type_string))
    return dflt;
  return json_object_get_string (v);
}

static char *
perm_list (json_object *edge, const char *key)
{
  json_object *perms;
  g_autoptr (GPtrArray) names = g_ptr_array_new ();

  if (json_object_object_get_ex (edge, key, &perms))
    for (size_t i = 0; i < json_object_array_length (perms); i++)
      g_ptr_array_add (names, (char *) json_object_get_string (
                         json_object_array_get_idx (perms, i)));
  g_ptr_array_sort (names, compare_strings);
  g_ptr_array_add (names, NULL);
  return g_strjoinv ("|", (char **) names->pdata);
}

/* Graph node id -> a stable name: the node name, the job id, or for an
 * anonymous BlockBackend (a -blockdev device's) "bb(<its root child>)". */
static GHashTable *
graph_names (json_object *graph)
{
  GHashTable *names = g_hash_table_new_full (g_int64_hash, g_int64_equal, g_free, g_free);
  json_object *nodes, *edges;

  json_object_object_get_ex (graph, "nodes", &nodes);
  json_object_object_get_ex (graph, "edges", &edges);
  for (size_t i = 0; i < json_object_array_length (nodes); i++) {
    json_object *n = json_object_array_get_idx (nodes, i), *id;
    gint64 *key = g_new (gint64, 1);

    json_object_object_get_ex (n, "id", &id);
    *key = json_object_get_int64 (id);
    g_hash_table_insert (names, key, g_strdup (jstr_or (n, "name", "")));
  }
  for (size_t i = 0; i < json_object_array_length (edges); i++) {
    json_object *e = json_object_array_get_idx (edges, i), *parent, *child;
    gint64 p, c;
    const char *pname;

    json_object_object_get_ex (e, "parent", &parent);
    json_object_object_get_ex (e, "child", &child);
    p = json_object_get_int64 (parent);
    c = json_object_get_int64 (child);
    pname = g_hash_table_lookup (names, &p);
    if (pname && !*pname && g_hash_table_lookup (names, &c)) {
      gint64 *key = g_new (gint64, 1);

      *key = p;
      g_hash_table_insert (names, key, g_strdup_printf (
        "bb(%s)", (char *) g_hash_table_lookup (names, &c)));
    }
  }
  return names;
}

/* node name -> driver, from query-named-block-nodes. */
static GHashTable *
node_drivers (TlQemu *q)
{
  json_object *nodes = tl_qmp (q, "query-named-block-nodes", tl_json ("{\"flat\": true}"));
  GHashTable *drv = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);

  for (size_t i = 0; i < json_object_array_length (nodes); i++) {
    json_object *n = json_object_array_get_idx (nodes, i);

    g_hash_table_insert (drv, g_strdup (jstr_or (n, "node-name", "")),
                         g_strdup (jstr_or (n, "drv", "?")));
  }
  json_object_put (nodes);
  return drv;
}

char *
tl_block_graph (TlQemu *q)
{
  json_object *graph = tl_qmp (q, "x-debug-query-block-graph", NULL), *nodes, *edges;
  g_autoptr (GHashTable) names = graph_names (graph);
  g_autoptr (GHashTable) drivers = node_drivers (q);
  g_autoptr (GPtrArray) lines = g_ptr_array_new_with_free_func (g_free);
  GString *out = g_string_new (NULL);

  json_object_object_get_ex (graph, "nodes", &nodes);
  json_object_object_get_ex (graph, "edges", &edges);
  for (size_t i = 0; i < json_object_array_length (nodes); i++) {
    json_object *n = json_object_array_get_idx (nodes, i), *id;
    gint64 key;
    const char *name;

    json_object_object_get_ex (n, "id", &id);
    key = json_object_get_int64 (id);
    name = g_hash_table_lookup (names, &key);
    g_ptr_array_add (lines, g_strdup_printf (
      "node %s %s %s", jstr_or (n, "type", "?"), name,
      (char *) (g_hash_table_lookup (drivers, name) ?: "-")));
  }
  for (size_t i = 0; i < json_object_array_length (edges); i++) {
    json_object *e = json_object_array_get_idx (edges, i), *parent, *child;
    g_autofree char *perm = perm_list (e, "perm");
    g_autofree char *shared = perm_list (e, "shared-perm");
    gint64 p, c;

    json_object_object_get_ex (e, "parent", &parent);
    json_object_object_get_ex (e, "child", &child);
    p = json_object_get_int64 (parent);
    c = json_object_get_int64 (child);
    g_ptr_array_add (lines, g_strdup_printf (
      "edge %s -%s-> %s perm=%s shared=%s", (char *) g_hash_table_lookup (names, &p),
      jstr_or (e, "name", "?"), (char *) g_hash_table_lookup (names, &c), perm, shared));
  }
  json_object_put (graph);
  g_ptr_array_sort (lines, compare_strings);
  for (guint i = 0; i < lines->len; i++)
    g_string_append_printf (out, "%s\n", (char *) lines->pdata[i]);
  return g_string_free (out, FALSE);
}

char **
tl_run_markers (TlQemu *q)
{
  json_object *objs = tl_qmp (q, "qom-list", tl_json ("{\"path\": \"/objects\"}"));
  GPtrArray *found = g_ptr_array_new ();

  for (size_t i = 0; i < json_object_array_length (objs); i++) {
    const char *name = jstr_or (json_object_array_get_idx (objs, i), "name", "");

    if (g_str_has_prefix (name, "fleece-run-"))
      g_ptr_array_add (found, g_strdup (name));
  }
  json_object_put (objs);
  return sorted_strv (found);
}

static int64_t
bitmap_count_on (json_object *nodes, const char *node, const char *name, bool *found)
{
  for (size_t i = 0; i < json_object_array_length (nodes); i++) {
    json_object *n = json_object_array_get_idx (nodes, i), *bms;

    if (g_strcmp0 (jstr_or (n, "node-name", NULL), node) != 0)
      continue;
    *found = true;
    if (!json_object_object_get_ex (n, "dirty-bitmaps", &bms))
      return -1;
    for (size_t j = 0; j < json_object_array_length (bms); j++) {
      json_object *b = json_object_array_get_idx (bms, j), *count;

      if (g_strcmp0 (jstr_or (b, "name", NULL), name) == 0
          && json_object_object_get_ex (b, "count", &count))
        return json_object_get_int64 (count);
    }
    return -1;
  }
  return -1;
}

int64_t
tl_bitmap_count (TlQemu *q, const char *node, const char *name)
{
  json_object *nodes = tl_qmp (q, "query-named-block-nodes", tl_json ("{\"flat\": true}"));
  bool found = false;
  int64_t count = bitmap_count_on (nodes, node, name, &found);

  if (!found) {
    g_autofree char *root = tl_device_root (q, node);

    ck_assert_msg (root != NULL, "no node or device %s", node);
    count = bitmap_count_on (nodes, root, name, &found);
  }
  json_object_put (nodes);
  return count;
}

/* ---- the library ---------------------------------------------------- */

void
tl_log_cb (void *user_data, int level, const char *msg)
{
  if (user_data)
    g_string_append_printf (user_data, "%d: %s\n", level, msg);
  static gint64 t0;

  if (!t0)
    t0 = g_get_monotonic_time ();
  if (g_getenv ("FLEECE_TEST_VERBOSE"))
    fprintf (stderr, "# %.3f libfleece %d: %s\n",
             (double) (g_get_monotonic_time () - t0) / G_USEC_PER_SEC, level, msg);
}

struct fleece_handle *
tl_handle_on (TlVm *vm, uint32_t vmid, GString *log, const char *qmp_path)
{
  struct fleece_handle *h = fleece_new ();

  ck_assert_msg (h != NULL, "fleece_new: %s", fleece_get_error ());
  ck_assert_int_eq (fleece_set_log_callback (h, tl_log_cb, log, NULL), 0);
  ck_assert_msg (fleece_set_state_dir (h, vm->state) == 0, "%s", fleece_get_error ());
  ck_assert_msg (fleece_set_vmid (h, vmid) == 0, "%s", fleece_get_error ());
  if (qmp_path)
    ck_assert_msg (fleece_connect (h, qmp_path) == 0, "fleece_connect %s: %s",
                   qmp_path, fleece_get_error ());
  ck_assert_msg (fleece_set_storage (h, fleece_storage_new_dir (vm->storage)) == 0,
                 "%s", fleece_get_error ());
  return h;
}

struct fleece_handle *
tl_handle (TlVm *vm, uint32_t vmid, GString *log)
{
  return tl_handle_on (vm, vmid, log, vm->q->qmp_path);
}

struct fleece_plan *
tl_plan (struct fleece_handle *h, GString *log)
{
  struct fleece_plan *p = fleece_plan (h);

  ck_assert_msg (p != NULL, "fleece_plan: %s\n%s", fleece_get_error (),
                 log ? log->str : "");
  return p;
}

int
tl_wait_end (struct fleece_handle *h, int poll_ms)
{
  int r;

  while ((r = fleece_wait (h, poll_ms)) == 0)
    ;
  return r;
}

void
tl_assert_nothing_left (TlVm *vm, uint32_t vmid)
{
  g_auto (GStrv) nodes = tl_node_names (vm->q);
  g_auto (GStrv) files = tl_list_dir (vm->storage);
  g_auto (GStrv) markers = tl_run_markers (vm->q);
  g_auto (GStrv) roots = tl_device_roots (vm->q);
  g_autofree char *nb = g_strjoinv (",", vm->nodes_before);
  g_autofree char *na = g_strjoinv (",", nodes);
  g_autofree char *record = g_strdup_printf ("%s/%" PRIu32 ".json", vm->state, vmid);

  ck_assert_msg (strcmp (na, nb) == 0, "nodes now: %s\nnodes before: %s", na, nb);
  ck_assert_msg (tl_job_count (vm->q) == 0, "jobs are left");
  ck_assert_msg (g_strv_length (files) == 0, "storage not empty: %s", files[0]);
  ck_assert_msg (!g_file_test (record, G_FILE_TEST_EXISTS), "the record %s is left", record);
  ck_assert_msg (g_strv_length (markers) == 0, "run marker %s is left", markers[0]);
  if (vm->roots_before) {
    g_autofree char *rb = g_strjoinv (",", vm->roots_before);
    g_autofree char *ra = g_strjoinv (",", roots);

    ck_assert_msg (strcmp (ra, rb) == 0, "device roots now: %s\nbefore: %s", ra, rb);
  } else {
    for (char **r = roots; *r; r++)
      ck_assert_msg (!strstr (strchr (*r, '='), "fleece"), "device %s", *r);
  }
}

void
tl_assert_graph_unchanged (TlVm *vm)
{
  g_autofree char *now = tl_block_graph (vm->q);

  ck_assert_msg (vm->graph_before, "no graph recorded (tl_vm_record_before)");
  ck_assert_msg (strcmp (now, vm->graph_before) == 0,
                 "the block graph changed;\nbefore:\n%snow:\n%s", vm->graph_before, now);
}

void
tl_assert_image_equals (const char *path, const char *format,
                        const guint8 *expect, uint64_t size, const char *what)
{
  uint64_t got_size = 0;
  g_autofree guint8 *got = tl_read_image (path, format, &got_size);

  ck_assert_msg (got_size == size, "%s: %s has %" G_GUINT64_FORMAT " bytes, not %"
                 G_GUINT64_FORMAT, what, path, (guint64) got_size, (guint64) size);
  for (uint64_t off = 0; off < size; off += 512) {
    size_t len = (size_t) MIN ((uint64_t) 512, size - off);

    if (memcmp (got + off, expect + off, len) != 0)
      ck_abort_msg ("%s: %s differs from what was expected at byte %" G_GUINT64_FORMAT
                    " (sector %" G_GUINT64_FORMAT ": got 0x%02x..., expected 0x%02x...)",
                    what, path, (guint64) off, (guint64) off / 512, got[off], expect[off]);
  }
}

void
tl_check_point_in_time (TlVm *vm, guint8 **snapshot, const char *target_dir,
                        const char *format)
{
  for (size_t i = 0; i < vm->ndisks; i++) {
    g_autofree char *name = g_strdup_printf ("%s.%s", vm->disks[i].key, format);
    g_autofree char *path = g_build_filename (target_dir, name, NULL);
    g_autofree char *what = g_strdup_printf ("the backup of %s at its point in time",
                                             vm->disks[i].key);

    tl_assert_image_equals (path, format, snapshot[i], vm->disks[i].size, what);
  }
}

/* ---- mounts ----------------------------------------------------------- */

/* A failed test ends with _exit() before its umount: a guard process (out
 * of the process group Check kills, holding none of the test's fds)
 * detaches the mount once every copy of a pipe's write end, i.e. the test
 * process, is gone. */
static void
unmount_when_gone (const char *dir)
{
  int fds[2];
  pid_t pid;

  ck_assert_int_eq (pipe2 (fds, O_CLOEXEC), 0);
  pid = fork ();
  ck_assert_int_ge (pid, 0);
  if (pid == 0) {
    int null = open ("/dev/null", O_RDWR);
    char c;

    setsid ();
    if (null < 0 || dup2 (fds[0], 3) < 0 || dup2 (null, 0) < 0 || dup2 (null, 1) < 0 ||
        dup2 (null, 2) < 0)
      _exit (1);
    close_range (4, ~0U, 0);
    while (read (3, &c, 1) < 0 && errno == EINTR)
      ;
    umount2 (dir, MNT_DETACH);
    _exit (0);
  }
  close (fds[0]);
}

void
tl_mount_tmpfs (const char *dir, const char *size)
{
  g_autofree char *opts = g_strdup_printf ("size=%s,mode=0700", size);

  ck_assert_msg (mount ("tmpfs", dir, "tmpfs", 0, opts) == 0,
                 "mount tmpfs on %s: %s (the qemu suite runs as root)", dir,
                 g_strerror (errno));
  unmount_when_gone (dir);
}

int
tl_run_tool (const char *const *argv, char **output)
{
  g_autoptr (GError) err = NULL;
  g_autofree char *out = NULL;
  g_autofree char *errout = NULL;
  int status;

  ck_assert_msg (g_spawn_sync (NULL, (char **) argv, NULL,
                               G_SPAWN_SEARCH_PATH | G_SPAWN_STDIN_FROM_DEV_NULL, NULL, NULL,
                               &out, &errout, &status, &err),
                 "%s: %s", argv[0], err ? err->message : "");
  if (output)
    *output = g_strconcat (out, errout, NULL);
  return status;
}

json_object *
tl_record_access (struct fleece_handle *h, const char *key)
{
  g_autofree char *rec = fleece_get_record (h);
  json_object *r, *drives, *acc = NULL;

  ck_assert_msg (rec, "%s", fleece_get_error ());
  r = tl_json ("%s", rec);
  ck_assert (json_object_object_get_ex (r, "drives", &drives));
  for (size_t i = 0; i < json_object_array_length (drives); i++) {
    json_object *d = json_object_array_get_idx (drives, i), *k, *a;
    if (json_object_object_get_ex (d, "key", &k)
        && g_strcmp0 (json_object_get_string (k), key) == 0
        && json_object_object_get_ex (d, "access", &a))
      acc = json_object_get (a);
  }
  json_object_put (r);
  ck_assert_msg (acc, "no access entry for %s in %s", key, rec);
  return acc;
}
