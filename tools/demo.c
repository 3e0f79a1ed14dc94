/* fleece demo: what fleecing is for, shown on a throwaway VM.
 *
 * Starts a QEMU with no guest OS and disks shaped like a Proxmox VM (an
 * OVMF VM's EFI vars disk on pflash, SCSI disks on virtio-scsi, a
 * virtio-blk disk, qcow2 and raw), and a deliberately slow backup target:
 * qemu-storage-daemon exporting one file per drive over NBD behind one
 * throttle group.  Then, while writing 64 KiB blocks through the guest
 * devices ahead of the backup:
 *   1. no backup (the latency floor),
 *   2. a backup without fleecing (guest writes wait for the slow target;
 *      kept short and cancelled),
 *   3. a backup with fleecing (guest writes wait for local storage only),
 * and checks that every drive's backup equals its content at the point in
 * time the backup started.  Everything lives in one temporary directory,
 * the record included, and is removed at the end or on SIGINT/SIGTERM. */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fleece/fleece.h"
#include "fleece-tool.h"

#define MiB (1024 * 1024)
#define DEMO_VMID 100
#define WRITE_SIZE (64 * 1024)
/* The backup target's speed: all drives share it, like one slow link. */
#define TARGET_BPS (8 * MiB)
#define BASELINE_WRITES 24
/* Backups without fleecing, one guest write each (see phase_plain). */
#define NOFLEECE_ROUNDS 3
#define FLEECE_MAX_WRITES 400
/* Writes land this far ahead of the backup's progress on the drive. */
#define LEAD_MIN (1 * MiB)
#define LEAD_MAX (4 * MiB)
#define START_TIMEOUT_US (20 * G_USEC_PER_SEC)
#define QUIT_TIMEOUT_US (5 * G_USEC_PER_SEC)
/* HMP qemu-io blocks for as long as the guest write does. */
#define HMP_TIMEOUT_MS (120 * 1000)
#define HMP_PROMPT "(qemu) "

typedef struct {
  const char *key;
  const char *format;
  uint64_t size;
  const char *bus;      /* pflash, scsi, virtio */
  bool written;         /* the demo's guest writes go here */
} DemoDisk;

static const DemoDisk disks[] = {
  { "efidisk0", "raw", 528 * 1024, "pflash", false },
  { "scsi0", "qcow2", 16 * MiB, "scsi", true },
  { "scsi1", "raw", 12 * MiB, "scsi", true },
  { "virtio0", "raw", 8 * MiB, "virtio", true },
};
#define NDISKS G_N_ELEMENTS (disks)

enum { PHASE_IDLE, PHASE_PLAIN, PHASE_FLEECE, NPHASES };

typedef struct {
  uint64_t done, total;
  gint64 done_us;
} DemoProgress;

/* The demo's own monitor of its QEMU: HMP, for guest writes through the
 * devices (qemu-io -d), which is no business of the library's. */
typedef struct {
  int fd;
  GString *in;
} Hmp;

typedef struct {
  gint64 start_us;
  char *tmp;
  char *src[NDISKS];
  char *tgt[NDISKS];
  char *storage;
  char *state;
  char *nbd_sock;
  char *qemu_log;
  GPid qemu_pid;
  GPid qsd_pid;
  Hmp *mon;             /* the demo's own monitor (guest writes) */
  struct fleece_handle *h;
  bool running;         /* a backup is started on h and not ended */
  GArray *lat[NPHASES]; /* gint64 microseconds */
  DemoProgress prog[NDISKS];
  gint64 backup_start_us;
  gint64 backup_end_us;
  uint64_t fleece_peak;
  uint64_t fleece_final;
  char *pit[NDISKS];    /* sha256 of each drive at the point in time */
  char *got[NDISKS];    /* sha256 of each backup */
  char *image[NDISKS];  /* fleecing image of each drive, NULL if none */
  GString *warnings;
  GRand *rand;
  unsigned next_disk;
} Demo;

/* ---- small helpers -------------------------------------------------- */

static uint64_t
total_size (void)
{
  uint64_t sum = 0;
  for (size_t i = 0; i < NDISKS; i++)
    sum += disks[i].size;
  return sum;
}

static void
say (const char *fmt, ...) G_GNUC_PRINTF (1, 2);

static void
say (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vprintf (fmt, ap);
  va_end (ap);
  fflush (stdout);
}

static bool
fail (GError **err, const char *fmt, ...) G_GNUC_PRINTF (2, 3);

static bool
fail (GError **err, const char *fmt, ...)
{
  va_list ap;

  if (err && !*err) {
    va_start (ap, fmt);
    *err = g_error_new_valist (G_FILE_ERROR, G_FILE_ERROR_FAILED, fmt, ap);
    va_end (ap);
  }
  return false;
}

static bool
interrupted (GError **err)
{
  if (!tool_signal)
    return false;
  fail (err, "interrupted by %s", tool_signal_name (tool_signal));
  return true;
}

static const char *
qemu_binary (void)
{
  const char *b = g_getenv ("FLEECE_QEMU");
  return b && *b ? b : "qemu-system-x86_64";
}

static int
remove_entry (const char *path, const struct stat *st, int type,
              struct FTW *ftw)
{
  remove (path);
  return 0;
}

static void
remove_tree (const char *dir)
{
  nftw (dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static uint64_t
allocated_in (const char *dir)
{
  g_autoptr (GDir) d = g_dir_open (dir, 0, NULL);
  const char *name;
  uint64_t sum = 0;

  while (d && (name = g_dir_read_name (d))) {
    g_autofree char *path = g_build_filename (dir, name, NULL);
    struct stat st;
    if (stat (path, &st) == 0)
      sum += (uint64_t) st.st_blocks * 512;
  }
  return sum;
}

static bool
run_tool (const char *const *argv, GError **err)
{
  g_autofree char *errout = NULL;
  int status = 0;

  if (!g_spawn_sync (NULL, (char **) argv, NULL,
                     G_SPAWN_SEARCH_PATH | G_SPAWN_STDIN_FROM_DEV_NULL |
                     G_SPAWN_STDOUT_TO_DEV_NULL, NULL, NULL, NULL, &errout,
                     &status, err))
    return false;
  if (!g_spawn_check_wait_status (status, NULL))
    return fail (err, "%s failed: %s", argv[0], g_strstrip (errout));
  return true;
}

static char *
sha256_file (const char *path, GError **err)
{
  g_autoptr (GChecksum) sum = g_checksum_new (G_CHECKSUM_SHA256);
  g_autofree guint8 *buf = g_malloc (MiB);
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  ssize_t n;

  if (fd < 0) {
    fail (err, "cannot open %s: %s", path, g_strerror (errno));
    return NULL;
  }
  while ((n = read (fd, buf, MiB)) > 0 || (n < 0 && errno == EINTR))
    if (n > 0)
      g_checksum_update (sum, buf, n);
  close (fd);
  if (n < 0) {
    fail (err, "cannot read %s: %s", path, g_strerror (errno));
    return NULL;
  }
  return g_strdup (g_checksum_get_string (sum));
}

/* The guest-visible content's sha256 (qcow2 through qemu-img; -U: QEMU has
 * it open). */
static char *
sha256_image (Demo *d, const char *path, const char *format, GError **err)
{
  g_autofree char *raw = NULL;
  char *sum;

  if (strcmp (format, "raw") == 0)
    return sha256_file (path, err);
  raw = g_build_filename (d->tmp, "pit.raw", NULL);
  {
    const char *argv[] = { "qemu-img", "convert", "-U", "-f", format, "-O",
                           "raw", path, raw, NULL };
    if (!run_tool (argv, err))
      return NULL;
  }
  sum = sha256_file (raw, err);
  unlink (raw);
  return sum;
}

/* Random bytes, so that every block differs and none is all zero. */
static bool
write_random (Demo *d, const char *path, uint64_t size, GError **err)
{
  g_autofree guint32 *buf = g_malloc (MiB);
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

  if (fd < 0)
    return fail (err, "cannot create %s: %s", path, g_strerror (errno));
  for (uint64_t off = 0; off < size; off += MiB) {
    size_t len = (size_t) MIN ((uint64_t) MiB, size - off);
    for (size_t i = 0; i < len / 4; i++)
      buf[i] = g_rand_int (d->rand);
    if (pwrite (fd, buf, len, (off_t) off) != (ssize_t) len) {
      close (fd);
      return fail (err, "cannot write %s: %s", path, g_strerror (errno));
    }
  }
  return close (fd) == 0 || fail (err, "cannot write %s", path);
}

/* ---- processes ------------------------------------------------------ */

static void
child_setup (gpointer data)
{
  /* Its own process group: a Ctrl-C reaches the demo only, which stops
   * things in order.  Dies with the demo even if the demo is killed. */
  setpgid (0, 0);
  prctl (PR_SET_PDEATHSIG, SIGKILL);
  if (getppid () != GPOINTER_TO_INT (data))
    _exit (127);
}

static bool
reap (GPid *pid, int flags)
{
  int status;
  pid_t r;

  if (*pid <= 0)
    return true;
  do
    r = waitpid (*pid, &status, flags);
  while (r < 0 && errno == EINTR && !(flags & WNOHANG));
  if (r == 0 || (r < 0 && errno == EINTR))
    return false;
  g_spawn_close_pid (*pid);
  *pid = 0;
  return true;
}

static bool
spawn (Demo *d, GPtrArray *argv, const char *log, GPid *pid, GError **err)
{
  g_autofree char *log_path = g_build_filename (d->tmp, log, NULL);
  int log_fd = open (log_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  int null_fd = open ("/dev/null", O_RDONLY | O_CLOEXEC);
  bool ok;

  g_ptr_array_add (argv, NULL);
  ok = log_fd >= 0 && null_fd >= 0 &&
       g_spawn_async_with_fds (d->tmp, (char **) argv->pdata, NULL,
                               G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD,
                               child_setup, GINT_TO_POINTER (getpid ()), pid,
                               null_fd, log_fd, log_fd, err);
  if (log_fd >= 0)
    close (log_fd);
  if (null_fd >= 0)
    close (null_fd);
  return ok || fail (err, "cannot start %s", (char *) argv->pdata[0]);
}

/* ---- the demo's HMP monitor ---------------------------------------- */

static void
hmp_free (Hmp *m)
{
  if (!m)
    return;
  if (m->fd >= 0)
    close (m->fd);
  g_string_free (m->in, TRUE);
  g_free (m);
}

/* Read until the prompt ends what came in; a signal interrupts. */
static bool
hmp_read_prompt (Hmp *m, int timeout_ms, GError **err)
{
  gint64 deadline = g_get_monotonic_time () + (gint64) timeout_ms * 1000;
  char buf[4096];

  while (!g_str_has_suffix (m->in->str, HMP_PROMPT)) {
    struct pollfd p = { .fd = m->fd, .events = POLLIN };
    gint64 left = (deadline - g_get_monotonic_time ()) / 1000;
    ssize_t n;

    if (interrupted (err))
      return false;
    if (left <= 0)
      return fail (err, "QEMU's monitor did not answer within %d s", timeout_ms / 1000);
    if (poll (&p, 1, (int) MIN (left, 1000)) <= 0)
      continue;
    n = read (m->fd, buf, sizeof buf);
    if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN))
      return fail (err, "QEMU's monitor closed the connection");
    if (n > 0)
      g_string_append_len (m->in, buf, n);
  }
  return true;
}

static Hmp *
hmp_connect (const char *path, GError **err)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  Hmp *m = g_new0 (Hmp, 1);

  m->in = g_string_new (NULL);
  m->fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  g_strlcpy (sun.sun_path, path, sizeof sun.sun_path);
  if (m->fd < 0 || connect (m->fd, (struct sockaddr *) &sun, sizeof sun) < 0 ||
      !hmp_read_prompt (m, 5000, err)) {
    fail (err, "cannot connect to %s: %s", path, g_strerror (errno));
    hmp_free (m);
    return NULL;
  }
  return m;
}

/* Run an HMP command; its output (g_free).  HMP echoes the line as it is
 * typed, redrawing it, and ends the echo with CR LF: the output is what
 * follows, up to the next prompt. */
static char *
hmp_command (Hmp *m, const char *line, GError **err)
{
  g_autofree char *sent = g_strdup_printf ("%s\n", line);
  const char *out;

  g_string_truncate (m->in, 0);
  if (write (m->fd, sent, strlen (sent)) != (ssize_t) strlen (sent)) {
    fail (err, "cannot write to QEMU's monitor: %s", g_strerror (errno));
    return NULL;
  }
  if (!hmp_read_prompt (m, HMP_TIMEOUT_MS, err))
    return NULL;
  out = strstr (m->in->str, "\r\n");
  out = out ? out + 2 : m->in->str + m->in->len;
  return g_strndup (out, (gsize) (m->in->str + m->in->len - strlen (HMP_PROMPT) - out));
}

/* ---- processes, continued ------------------------------------------ */

/* Wait for a process just started to create its socket. */
static bool
wait_socket (Demo *d, GPid *pid, const char *sock, const char *what,
             const char *log, GError **err)
{
  gint64 deadline = g_get_monotonic_time () + START_TIMEOUT_US;

  while (!g_file_test (sock, G_FILE_TEST_EXISTS)) {
    if (interrupted (err))
      return false;
    if (reap (pid, WNOHANG) || g_get_monotonic_time () > deadline) {
      g_autofree char *log_path = g_build_filename (d->tmp, log, NULL);
      g_autofree char *text = NULL;

      g_file_get_contents (log_path, &text, NULL, NULL);
      return fail (err, "%s %s: %s", what,
                   *pid ? "did not come up within 20 s" : "exited while starting",
                   text && *text ? g_strstrip (text) : "(no output)");
    }
    g_usleep (20 * 1000);
  }
  return true;
}

/* SIGTERM makes QEMU and qemu-storage-daemon flush and exit; a process
 * that does not within a few seconds is killed. */
static void
stop_process (GPid *pid)
{
  gint64 deadline = g_get_monotonic_time () + QUIT_TIMEOUT_US;

  if (*pid <= 0)
    return;
  kill (*pid, SIGTERM);
  while (!reap (pid, WNOHANG)) {
    if (g_get_monotonic_time () > deadline) {
      kill (*pid, SIGKILL);
      reap (pid, 0);
      break;
    }
    g_usleep (10 * 1000);
  }
}

static bool
start_target (Demo *d, GError **err)
{
  g_autoptr (GPtrArray) argv = g_ptr_array_new_with_free_func (g_free);

  g_ptr_array_add (argv, g_strdup ("qemu-storage-daemon"));
  g_ptr_array_add (argv, g_strdup ("--object"));
  g_ptr_array_add (argv, g_strdup_printf ("throttle-group,id=slow,limits.bps-write=%d",
                                          TARGET_BPS));
  for (size_t i = 0; i < NDISKS; i++) {
    g_ptr_array_add (argv, g_strdup ("--blockdev"));
    g_ptr_array_add (argv, g_strdup_printf ("driver=file,node-name=f-%s,filename=%s",
                                            disks[i].key, d->tgt[i]));
    g_ptr_array_add (argv, g_strdup ("--blockdev"));
    g_ptr_array_add (argv, g_strdup_printf ("driver=throttle,node-name=t-%s,"
                                            "throttle-group=slow,file=f-%s",
                                            disks[i].key, disks[i].key));
  }
  g_ptr_array_add (argv, g_strdup ("--nbd-server"));
  g_ptr_array_add (argv, g_strdup_printf ("addr.type=unix,addr.path=%s", d->nbd_sock));
  for (size_t i = 0; i < NDISKS; i++) {
    g_ptr_array_add (argv, g_strdup ("--export"));
    g_ptr_array_add (argv, g_strdup_printf ("type=nbd,id=e-%s,node-name=t-%s,name=%s,"
                                            "writable=on", disks[i].key,
                                            disks[i].key, disks[i].key));
  }
  if (!spawn (d, argv, "qsd.log", &d->qsd_pid, err))
    return false;
  return wait_socket (d, &d->qsd_pid, d->nbd_sock, "qemu-storage-daemon",
                      "qsd.log", err);
}

static bool
start_vm (Demo *d, GError **err)
{
  g_autoptr (GPtrArray) argv = g_ptr_array_new_with_free_func (g_free);
  g_autofree char *lib = g_build_filename (d->tmp, "qmp.sock", NULL);
  g_autofree char *own = g_build_filename (d->tmp, "demo.sock", NULL);
  g_autofree char *code = g_build_filename (d->tmp, "OVMF_CODE.fd", NULL);
  bool scsi = false;
  int fd;

  /* OVMF's code on pflash0 is what pflash1 (the EFI vars) needs beside
   * it; the VM never runs, so zeroes do. */
  fd = open (code, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0 || ftruncate (fd, 2 * MiB) < 0 || close (fd) < 0)
    return fail (err, "cannot create %s: %s", code, g_strerror (errno));

  g_ptr_array_add (argv, g_strdup (qemu_binary ()));
  g_ptr_array_add (argv, g_strdup ("-machine"));
  g_ptr_array_add (argv, g_strdup ("q35"));
  g_ptr_array_add (argv, g_strdup ("-accel"));
  g_ptr_array_add (argv, g_strdup ("tcg"));
  g_ptr_array_add (argv, g_strdup ("-S"));
  g_ptr_array_add (argv, g_strdup ("-nodefaults"));
  g_ptr_array_add (argv, g_strdup ("-display"));
  g_ptr_array_add (argv, g_strdup ("none"));
  /* A QMP monitor for the library, an HMP one for the demo's guest
   * writes. */
  g_ptr_array_add (argv, g_strdup ("-qmp"));
  g_ptr_array_add (argv, g_strdup_printf ("unix:%s,server=on,wait=off", lib));
  g_ptr_array_add (argv, g_strdup ("-monitor"));
  g_ptr_array_add (argv, g_strdup_printf ("unix:%s,server=on,wait=off", own));
  g_ptr_array_add (argv, g_strdup ("-drive"));
  g_ptr_array_add (argv, g_strdup_printf ("if=pflash,unit=0,format=raw,readonly=on,file=%s",
                                          code));
  for (size_t i = 0; i < NDISKS; i++) {
    const DemoDisk *k = &disks[i];

    g_ptr_array_add (argv, g_strdup ("-drive"));
    if (strcmp (k->bus, "pflash") == 0) {
      g_ptr_array_add (argv, g_strdup_printf ("if=pflash,unit=1,id=drive-%s,format=%s,file=%s",
                                              k->key, k->format, d->src[i]));
      continue;
    }
    g_ptr_array_add (argv, g_strdup_printf ("file=%s,if=none,id=drive-%s,format=%s,"
                                            "discard=unmap", d->src[i], k->key,
                                            k->format));
    if (strcmp (k->bus, "scsi") == 0 && !scsi) {
      g_ptr_array_add (argv, g_strdup ("-device"));
      g_ptr_array_add (argv, g_strdup ("virtio-scsi-pci,id=scsihw0"));
      scsi = true;
    }
    g_ptr_array_add (argv, g_strdup ("-device"));
    if (strcmp (k->bus, "scsi") == 0)
      g_ptr_array_add (argv, g_strdup_printf ("scsi-hd,bus=scsihw0.0,scsi-id=%zu,"
                                              "drive=drive-%s,id=%s", i, k->key,
                                              k->key));
    else
      g_ptr_array_add (argv, g_strdup_printf ("virtio-blk-pci,drive=drive-%s,id=%s",
                                              k->key, k->key));
  }
  if (!spawn (d, argv, "qemu.log", &d->qemu_pid, err))
    return false;
  if (!wait_socket (d, &d->qemu_pid, own, "QEMU", "qemu.log", err))
    return false;
  d->mon = hmp_connect (own, err);
  return d->mon != NULL;
}

/* ---- guest writes --------------------------------------------------- */

static const char *
qdev_of (const DemoDisk *k, char *buf, size_t len)
{
  if (strcmp (k->bus, "virtio") == 0)
    g_snprintf (buf, len, "/machine/peripheral/%s/virtio-backend", k->key);
  else
    g_snprintf (buf, len, "%s", k->key);
  return buf;
}

static bool
guest_io (Demo *d, size_t disk, const char *cmd, GError **err)
{
  char qdev[128];
  g_autofree char *line = g_strdup_printf ("qemu-io -d %s \"%s\"",
                                           qdev_of (&disks[disk], qdev, sizeof qdev), cmd);
  g_autofree char *out = hmp_command (d->mon, line, err);

  if (!out)
    return false;
  g_strstrip (out);
  if (*out)
    return fail (err, "%s: %s", line, out);
  return true;
}

/* One 64 KiB write at a random place in [from, to) of a drive; its latency
 * goes to phase. */
static bool
timed_write (Demo *d, int phase, size_t disk, uint64_t from, uint64_t to,
             GError **err)
{
  uint64_t blocks = (to - from) / WRITE_SIZE;
  uint64_t off = (from + WRITE_SIZE - 1) / WRITE_SIZE * WRITE_SIZE;
  g_autofree char *cmd = NULL;
  gint64 t0, dt;

  if (blocks > 1)
    off += (uint64_t) g_rand_int_range (d->rand, 0, (gint32) (blocks - 1)) * WRITE_SIZE;
  if (off + WRITE_SIZE > disks[disk].size)
    off = disks[disk].size / WRITE_SIZE * WRITE_SIZE - WRITE_SIZE;
  cmd = g_strdup_printf ("write -P 0x%02x %" G_GUINT64_FORMAT " %d",
                         0x40 + phase * 0x10 + (int) (d->lat[phase]->len % 16),
                         off, WRITE_SIZE);
  t0 = g_get_monotonic_time ();
  if (!guest_io (d, disk, cmd, err))
    return false;
  dt = g_get_monotonic_time () - t0;
  g_array_append_val (d->lat[phase], dt);
  return true;
}

/* The next written drive with room ahead of the backup; -1 if none. */
static int
pick_disk (Demo *d, uint64_t lead)
{
  for (size_t n = 0; n < NDISKS; n++) {
    size_t i = d->next_disk++ % NDISKS;
    const DemoProgress *p = &d->prog[i];

    if (disks[i].written && p->done + lead + WRITE_SIZE <= disks[i].size && !p->done_us)
      return (int) i;
  }
  return -1;
}

/* A write ahead of where the backup is on the next drive; false with
 * *none set if every drive is (nearly) backed up. */
static bool
write_ahead (Demo *d, int phase, bool *none, GError **err)
{
  uint64_t lead = LEAD_MIN + (uint64_t) g_rand_int_range (d->rand, 0, (LEAD_MAX - LEAD_MIN) / WRITE_SIZE) * WRITE_SIZE;
  int i = pick_disk (d, lead);

  *none = i < 0;
  if (i < 0)
    return true;
  return timed_write (d, phase, (size_t) i, d->prog[i].done + lead,
                      d->prog[i].done + lead + WRITE_SIZE, err);
}

/* ---- the library ---------------------------------------------------- */

static void
on_log (void *opaque, int level, const char *msg)
{
  Demo *d = opaque;

  if (level <= FLEECE_LOG_WARNING)
    g_string_append_printf (d->warnings, "  %s: %s\n",
                            level == FLEECE_LOG_ERROR ? "error" : "warning", msg);
}

static void
on_progress (void *opaque, const char *key, uint64_t done, uint64_t total)
{
  Demo *d = opaque;

  for (size_t i = 0; i < NDISKS; i++) {
    DemoProgress *p = &d->prog[i];
    if (strcmp (disks[i].key, key) != 0)
      continue;
    p->done = done;
    p->total = total;
    if (!p->done_us && total && done >= total)
      p->done_us = g_get_monotonic_time ();
  }
}

static bool
lib_fail (GError **err, const char *what)
{
  const char *e = fleece_get_error ();
  return fail (err, "%s: %s", what, e ? e : "unknown error");
}

/* Plan, attach and start a backup of every drive to the NBD target. */
static bool
backup_start (Demo *d, unsigned flags, struct fleece_plan **plan, GError **err)
{
  g_autofree char *uri = g_strdup_printf ("nbd+unix:///?socket=%s", d->nbd_sock);
  struct fleece_target *t = fleece_target_new_nbd (uri);
  bool ok;

  memset (d->prog, 0, sizeof d->prog);
  if (!t)
    return lib_fail (err, "NBD target");
  ok = fleece_set_plan_flags (d->h, flags) == 0 &&
       (*plan = fleece_plan (d->h)) != NULL &&
       fleece_attach (d->h, *plan, 0) == 0 &&
       fleece_start (d->h, *plan, t, 0) == 0;
  fleece_target_free (t);
  if (!ok)
    return lib_fail (err, "starting the backup");
  d->running = true;
  d->backup_start_us = g_get_monotonic_time ();
  return true;
}

/* Wait for the backup to end; 1 finished, -1 failed or cancelled. */
static int
backup_wait (Demo *d, int timeout_ms)
{
  int r = fleece_wait (d->h, timeout_ms);

  if (r != 0) {
    d->running = false;
    d->backup_end_us = g_get_monotonic_time ();
  }
  return r;
}

static void
backup_cancel_and_wait (Demo *d)
{
  if (!d->running)
    return;
  fleece_cancel (d->h);
  backup_wait (d, -1);
}

/* ---- the phases ----------------------------------------------------- */

static gint
cmp_i64 (gconstpointer a, gconstpointer b)
{
  gint64 x = *(const gint64 *) a, y = *(const gint64 *) b;
  return x < y ? -1 : x > y;
}

/* The q-quantile (nearest rank) of a phase's latencies. */
static gint64
quantile (GArray *a, double q)
{
  size_t rank;

  if (!a->len)
    return 0;
  g_array_sort (a, cmp_i64);
  rank = (size_t) (q * a->len + 0.999999);
  return g_array_index (a, gint64, MIN (MAX (rank, 1), a->len) - 1);
}

static char *
latency_summary (GArray *a)
{
  g_autofree char *p50 = tool_duration (quantile (a, 0.5));
  g_autofree char *max = tool_duration (quantile (a, 1.0));
  return g_strdup_printf ("%u writes, p50 %s, max %s", a->len, p50, max);
}

static bool
phase_idle (Demo *d, GError **err)
{
  say ("[1/3] guest writes, no backup ...... ");
  for (int n = 0; n < BASELINE_WRITES; n++) {
    size_t i;
    do
      i = d->next_disk++ % NDISKS;
    while (!disks[i].written);
    if (interrupted (err) || !timed_write (d, PHASE_IDLE, i, 0, disks[i].size, err))
      return false;
  }
  {
    g_autofree char *s = latency_summary (d->lat[PHASE_IDLE]);
    say ("%s\n", s);
  }
  return true;
}

/* Without fleecing, a guest write ahead of the backup waits until the
 * target has taken what the job already has in flight: for these small
 * drives, nearly the whole backup.  So each run gives one sample: a few
 * runs, each with one write at a later moment, then cancelled. */
static bool
phase_plain (Demo *d, GError **err)
{
  gint64 estimate = (gint64) (total_size () * G_USEC_PER_SEC / TARGET_BPS);
  gint64 spent = 0;

  say ("[2/3] backup without fleecing ...... ");
  for (int round = 0; round < NOFLEECE_ROUNDS; round++) {
    struct fleece_plan *p = NULL;
    gint64 delay = 200 * 1000 + round * estimate * 3 / 4 / NOFLEECE_ROUNDS;
    bool none = false, ok;

    if (!backup_start (d, FLEECE_PLAN_NO_FLEECING, &p, err)) {
      fleece_plan_free (p);
      return false;
    }
    while (d->running && !tool_signal &&
           g_get_monotonic_time () - d->backup_start_us < delay)
      backup_wait (d, 50);
    ok = !interrupted (err) && (!d->running || write_ahead (d, PHASE_PLAIN, &none, err));
    fleece_plan_free (p);
    if (!ok)
      return false;
    /* Its point is the latency, not the backup: stop it. */
    backup_cancel_and_wait (d);
    spent += d->backup_end_us - d->backup_start_us;
    if (fleece_cleanup (d->h, 0) < 0)
      return lib_fail (err, "cleanup");
  }
  {
    g_autofree char *s = latency_summary (d->lat[PHASE_PLAIN]);
    g_autofree char *t = tool_duration (spent);
    say ("%s (%d runs, each cancelled; %s)\n", s, NOFLEECE_ROUNDS, t);
  }
  return true;
}

static bool
phase_fleece (Demo *d, bool *finished, GError **err)
{
  struct fleece_plan *p = NULL;
  bool writing = true;
  int r = 0;

  say ("[3/3] backup with fleecing ......... ");
  /* The point in time: what each drive holds now, flushed to its file. */
  for (size_t i = 0; i < NDISKS; i++) {
    if (disks[i].written && !guest_io (d, i, "flush", err))
      return false;
    if (!(d->pit[i] = sha256_image (d, d->src[i], disks[i].format, err)))
      return false;
  }
  if (!backup_start (d, 0, &p, err))
    goto out;
  for (int j = 0; j < fleece_plan_get_drive_count (p); j++)
    for (size_t i = 0; i < NDISKS; i++)
      if (strcmp (disks[i].key, fleece_plan_get_key (p, j)) == 0 &&
          fleece_plan_get_fleeced (p, j) == 1)
        d->image[i] = g_strdup (fleece_plan_get_image (p, j));
  while ((r = backup_wait (d, 0)) == 0) {
    d->fleece_peak = MAX (d->fleece_peak, allocated_in (d->storage));
    if (interrupted (err))
      goto out;
    if (writing && d->lat[PHASE_FLEECE]->len < FLEECE_MAX_WRITES) {
      bool none;
      if (!write_ahead (d, PHASE_FLEECE, &none, err))
        goto out;
      writing = !none;
      g_usleep (10 * 1000);
    } else {
      r = backup_wait (d, 100);
      if (r != 0)
        break;
    }
  }
  d->fleece_peak = MAX (d->fleece_peak, allocated_in (d->storage));
  if (r < 0) {
    lib_fail (err, "the fleecing backup");
    goto out;
  }
  /* What discard-source left, before cleanup deletes the images. */
  d->fleece_final = allocated_in (d->storage);
  *finished = true;
  if (fleece_cleanup (d->h, 0) < 0) {
    lib_fail (err, "cleanup");
    goto out;
  }
  {
    g_autofree char *s = latency_summary (d->lat[PHASE_FLEECE]);
    g_autofree char *t = tool_duration (d->backup_end_us - d->backup_start_us);
    say ("%s (backup done in %s)\n", s, t);
  }
 out:
  fleece_plan_free (p);
  return !*err;
}

/* The backups, read once the storage daemon has written everything. */
static bool
verify (Demo *d, GError **err)
{
  stop_process (&d->qsd_pid);
  for (size_t i = 0; i < NDISKS; i++)
    if (!(d->got[i] = sha256_file (d->tgt[i], err)))
      return false;
  return true;
}

/* ---- the report ----------------------------------------------------- */

static bool
report (Demo *d)
{
  g_autofree char *peak = tool_size (d->fleece_peak);
  g_autofree char *final = tool_size (d->fleece_final);
  g_autofree char *total = tool_duration (g_get_monotonic_time () - d->start_us);
  gint64 p99_plain = quantile (d->lat[PHASE_PLAIN], 0.99);
  gint64 p99_fleece = quantile (d->lat[PHASE_FLEECE], 0.99);
  size_t equal = 0;
  static const char *const names[NPHASES] = {
    "no backup", "backup without fleecing", "backup with fleecing",
  };

  say ("\nPer drive (backup with fleecing):\n");
  say ("  %-10s %10s  %-8s %-22s %9s  %s\n", "drive", "size", "fleeced",
       "fleecing image", "time", "backup = point in time");
  for (size_t i = 0; i < NDISKS; i++) {
    g_autofree char *size = tool_size (disks[i].size);
    g_autofree char *t = tool_duration ((d->prog[i].done_us ? d->prog[i].done_us
                                         : d->backup_end_us) - d->backup_start_us);
    bool same = d->pit[i] && d->got[i] && strcmp (d->pit[i], d->got[i]) == 0;

    equal += same;
    say ("  %-10s %10s  %-8s %-22s %9s  %s\n", disks[i].key, size,
         d->image[i] ? "yes" : "no", d->image[i] ? d->image[i] : "-",
         t, same ? "yes (sha256)" : "NO");
  }

  say ("\nGuest write latency (64 KiB writes through the guest devices; during a "
       "backup, %d to %d MiB ahead of it):\n", LEAD_MIN / MiB, LEAD_MAX / MiB);
  say ("  %-26s %7s %10s %10s %10s\n", "", "writes", "p50", "p99", "max");
  for (int ph = 0; ph < NPHASES; ph++) {
    g_autofree char *p50 = tool_duration (quantile (d->lat[ph], 0.5));
    g_autofree char *p99 = tool_duration (quantile (d->lat[ph], 0.99));
    g_autofree char *max = tool_duration (quantile (d->lat[ph], 1.0));
    say ("  %-26s %7u %10s %10s %10s\n", names[ph], d->lat[ph]->len, p50, p99, max);
  }
  if (p99_fleece > 0 && p99_plain > 0)
    say ("  p99 with fleecing is %.0fx lower than without\n",
         (double) p99_plain / (double) p99_fleece);

  say ("\nFleecing images: peak %s allocated, %s at the end (discard-source "
       "freed what the backup had copied)\n", peak, final);
  say ("Verification: %zu of %zu backups equal their drive's point-in-time "
       "content\n", equal, NDISKS);
  if (d->warnings->len)
    say ("Library warnings:\n%s", d->warnings->str);
  say ("Finished in %s; the VM, the storage daemon and %s are gone.\n",
       total, d->tmp);
  return equal == NDISKS;
}

/* ---- setup and teardown -------------------------------------------- */

static bool
setup (Demo *d, GError **err)
{
  g_autofree char *lib = g_build_filename (d->tmp, "qmp.sock", NULL);
  const char *only[NDISKS + 1];
  g_autofree char *ver = NULL;

  d->storage = g_build_filename (d->tmp, "fleecing", NULL);
  d->state = g_build_filename (d->tmp, "state", NULL);
  d->nbd_sock = g_build_filename (d->tmp, "nbd.sock", NULL);
  if (g_mkdir (d->storage, 0700) < 0)
    return fail (err, "cannot create %s: %s", d->storage, g_strerror (errno));

  for (size_t i = 0; i < NDISKS; i++) {
    g_autofree char *name = g_strdup_printf ("%s.%s", disks[i].key, disks[i].format);
    g_autofree char *tname = g_strdup_printf ("backup-%s.raw", disks[i].key);
    int fd;

    d->src[i] = g_build_filename (d->tmp, name, NULL);
    d->tgt[i] = g_build_filename (d->tmp, tname, NULL);

    if (strcmp (disks[i].format, "raw") == 0) {
      if (!write_random (d, d->src[i], disks[i].size, err))
        return false;
    } else {
      g_autofree char *raw = g_strdup_printf ("%s.raw", d->src[i]);
      const char *argv[] = { "qemu-img", "convert", "-f", "raw", "-O",
                             disks[i].format, raw, d->src[i], NULL };
      if (!write_random (d, raw, disks[i].size, err) || !run_tool (argv, err))
        return false;
      unlink (raw);
    }
    /* The target: exactly the drive's size, as backup requires. */
    fd = open (d->tgt[i], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || ftruncate (fd, (off_t) disks[i].size) < 0 || close (fd) < 0)
      return fail (err, "cannot create %s: %s", d->tgt[i], g_strerror (errno));
  }
  if (!start_target (d, err) || !start_vm (d, err))
    return false;

  d->h = fleece_new ();
  for (size_t i = 0; i < NDISKS; i++)
    only[i] = disks[i].key;
  only[NDISKS] = NULL;
  fleece_set_log_callback (d->h, on_log, d, NULL);
  fleece_set_progress_callback (d->h, on_progress, d, NULL);
  /* Like Proxmox: the drives in the VM's config, not pflash0 (OVMF's
   * read-only code). */
  if (fleece_set_vmid (d->h, DEMO_VMID) < 0 ||
      fleece_set_state_dir (d->h, d->state) < 0 ||
      fleece_set_storage (d->h, fleece_storage_new_dir (d->storage)) < 0 ||
      fleece_set_drives (d->h, only) < 0 ||
      fleece_connect (d->h, lib) < 0)
    return lib_fail (err, "setting up libfleece");

  /* "10.0.2Debian 1:10.0.2+ds-..." (version and package, unseparated). */
  if (!(ver = hmp_command (d->mon, "info version", err)))
    return false;
  ver[strspn (ver, "0123456789.")] = '\0';
  {
    g_autofree char *tsize = tool_size (total_size ());
    g_autofree char *rate = tool_size (TARGET_BPS);

    say ("VM %d: QEMU %s (no guest OS), %zu drives, %s: efidisk0 (pflash), "
         "scsi0 (qcow2), scsi1, virtio0\n", DEMO_VMID, ver, NDISKS, tsize);
    say ("Backup target: NBD exports of qemu-storage-daemon, all behind one "
         "throttle group of %s/s\n\n", rate);
  }
  return true;
}

/* On a signal: stop the slow target first (the jobs then fail at once
 * instead of draining), let the library clean up while QEMU still runs,
 * then stop QEMU. */
static void
teardown (Demo *d, bool hurry)
{
  if (hurry && d->qsd_pid > 0) {
    kill (d->qsd_pid, SIGKILL);
    reap (&d->qsd_pid, 0);
  }
  if (d->h) {
    backup_cancel_and_wait (d);
    if (fleece_cleanup (d->h, 0) < 0)
      fprintf (stderr, "fleece demo: cleanup: %s\n", fleece_get_error ());
    fleece_free (d->h);
    d->h = NULL;
  }
  g_clear_pointer (&d->mon, hmp_free);
  stop_process (&d->qemu_pid);
  stop_process (&d->qsd_pid);
  remove_tree (d->tmp);
}

static void
parse_args (int argc, char **argv)
{
  GOptionEntry entries[] = { { NULL } };
  g_autoptr (GOptionContext) ctx = g_option_context_new ("");
  g_autoptr (GError) err = NULL;

  g_set_prgname ("fleece demo");
  g_option_context_set_summary (ctx,
    "Back up a throwaway VM (no guest OS) to a deliberately slow target while\n"
    "writing to its disks: guest write latency with and without fleecing,\n"
    "fleecing image size, and a check of every backup.  Needs\n"
    "qemu-system-x86_64, qemu-img and qemu-storage-daemon; takes under a\n"
    "minute; leaves nothing behind.");
  g_option_context_add_main_entries (ctx, entries, NULL);
  if (!g_option_context_parse (ctx, &argc, &argv, &err)) {
    err->message[0] = g_ascii_tolower (err->message[0]);
    tool_usage_error ("demo", "%s; see 'fleece demo --help'", err->message);
  }
  if (argc > 1)
    tool_usage_error ("demo", "unexpected argument '%s'; fleece demo takes no "
                      "arguments", argv[1]);
}

/* QEMU, qemu-img and qemu-storage-daemon, or a message saying what to
 * install. */
static bool
have_programs (void)
{
  const char *const needed[] = { qemu_binary (), "qemu-img", "qemu-storage-daemon", NULL };

  for (size_t i = 0; needed[i]; i++) {
    g_autofree char *p = g_find_program_in_path (needed[i]);
    if (!p) {
      fprintf (stderr, "fleece demo: %s not found in PATH; install it (Debian: "
               "apt install qemu-system-x86 qemu-utils)\n", needed[i]);
      return false;
    }
  }
  return true;
}

static void
demo_clear (Demo *d)
{
  for (size_t i = 0; i < NDISKS; i++) {
    g_free (d->src[i]);
    g_free (d->tgt[i]);
    g_free (d->pit[i]);
    g_free (d->got[i]);
    g_free (d->image[i]);
  }
  for (int ph = 0; ph < NPHASES; ph++)
    g_array_unref (d->lat[ph]);
  g_string_free (d->warnings, TRUE);
  g_rand_free (d->rand);
  g_free (d->storage);
  g_free (d->state);
  g_free (d->nbd_sock);
  g_free (d->qemu_log);
  g_free (d->tmp);
}

int
tool_demo (int argc, char **argv)
{
  g_autoptr (GError) err = NULL;
  Demo demo = { 0 }, *d = &demo;
  bool finished = false, ok = false;

  parse_args (argc, argv);
  if (!have_programs ())
    return TOOL_EXIT_FAILED;
  tool_catch_signals ();
  d->start_us = g_get_monotonic_time ();
  d->tmp = g_dir_make_tmp ("fleece-demo-XXXXXX", &err);
  if (!d->tmp) {
    fprintf (stderr, "fleece demo: %s\n", err->message);
    return TOOL_EXIT_FAILED;
  }
  d->warnings = g_string_new (NULL);
  d->rand = g_rand_new_with_seed (20241126);
  for (int ph = 0; ph < NPHASES; ph++)
    d->lat[ph] = g_array_new (FALSE, FALSE, sizeof (gint64));

  if (setup (d, &err) && phase_idle (d, &err) && phase_plain (d, &err) &&
      phase_fleece (d, &finished, &err) && verify (d, &err)) {
    teardown (d, false);
    ok = report (d) && finished;
  } else {
    bool hurry = tool_signal != 0;
    teardown (d, hurry);
    if (hurry)
      fprintf (stderr, "\nfleece demo: interrupted by %s; stopped the VM and the "
               "storage daemon, cleaned up, removed %s\n",
               tool_signal_name (tool_signal), d->tmp);
    else
      fprintf (stderr, "\nfleece demo: %s\n(everything it started was stopped "
               "and %s removed)\n", err ? err->message : "failed", d->tmp);
  }
  demo_clear (d);
  return ok ? TOOL_EXIT_OK : TOOL_EXIT_FAILED;
}
