/* guest-bench: what applications inside a VM feel during a backup
 * (issue 16), run by `bench/run guest`.
 *
 *   guest-bench SECTION... --out DIR --guest DIR --fleece PATH [options]
 *
 * SECTION: latency, throughput, slow, scale.  The guest (a Debian kernel,
 * busybox and bench/guest/probe.c in an initramfs, built by
 * build-guest.sh) boots in a QEMU configured like qemu-server 9's
 * defaults; the probe inside issues O_DIRECT writes and times them with
 * the guest's CLOCK_MONOTONIC, on commands sent over virtio-serial.
 *
 * Backups are made three ways, side by side in one run:
 * - the library, through the `fleece` command (`fleece backup ... --json`,
 *   SIGTERM cancels and cleans up);
 * - graphs built here over QMP: a backup without fleecing (plain
 *   blockdev-backup from the device's root, QEMU's job defaults), the
 *   graph Proxmox's patched QEMU builds (cbw + snapshot-access, 16
 *   workers, 4 MiB job cluster, fleecing image attached as qemu-server
 *   attaches it: cache.direct, io_uring), and the library's graph with one
 *   choice changed (a "variant");
 * - no backup at all (the floor).
 *
 * Results: DIR/guest-<section>.md (Markdown), data files for gnuplot,
 * DIR/guest-meta (accelerator, kernel, QEMU). */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../bench-util.h"

#define VMID 100
#define MAXD 64
#define CBW_CLUSTER (64 * KiB)   /* the fleecing qcow2's cluster: cbw's unit */

static const char *jstr (json_object *o, const char *key);
static int64_t jint (json_object *o, const char *key);

/* ---- options ------------------------------------------------------------ */

typedef struct {
  const char *out;
  const char *guest;        /* directory with vmlinuz, initramfs.gz */
  const char *fleece;       /* the fleece command */
  const char *slowfs;       /* bench/guest/slowfs, built */
  int reps;
  double secs;              /* latency: measuring time per backup run */
  double tp_secs;           /* throughput: per workload */
  int tp_reps;              /* throughput: repetitions */
  char **modes;             /* latency modes */
  char **tp_modes;          /* throughput modes */
  gboolean no_kvm;
  gboolean quick;
} Opts;

static Opts opt;

/* ---- modes: how a backup is made ------------------------------------------ */

enum { K_NONE, K_PLAIN, K_LIB, K_GRAPH };

typedef struct {
  const char *name;
  const char *desc;
  int kind;
  /* K_GRAPH: the graph's choices */
  const char *fmt;          /* fleecing image format */
  int direct;               /* fleecing image cache.direct */
  gboolean uring;           /* fleecing image file aio=io_uring (else QEMU's threads) */
  int workers;              /* x-perf.max-workers, 0: QEMU's default (64) */
  int64_t cluster;          /* x-perf.min-cluster-size, 0: none */
  int64_t cbw_cluster;      /* copy-before-write min-cluster-size, 0: none */
  gboolean no_discard;      /* no discard-source */
  gboolean sync_top;        /* sync "top": unallocated areas are skipped */
  gboolean no_flush;        /* fleecing image cache.no-flush */
  /* K_LIB: further `fleece backup` arguments */
  const char *lib_args;
} Mode;

static const Mode modes[] = {
  { "none", "no backup: the floor", K_NONE },
  { "plain", "backup without fleecing: blockdev-backup from the device's root, "
    "QEMU's job defaults (64 workers), built here over QMP", K_PLAIN },
  { "lib", "libfleece: the fleece command (qcow2 fleecing image in the page cache, "
    "8 workers, 1 MiB job cluster)", K_LIB },
  { "libplain", "libfleece without fleecing: fleece backup --no-fleecing (8 workers)",
    K_LIB, .lib_args = "--no-fleecing" },
  { "pve", "Proxmox's default: the graph its patched QEMU builds (16 workers, 4 MiB "
    "job cluster), fleecing image attached as qemu-server does (qcow2, cache.direct, "
    "io_uring)", K_GRAPH, "qcow2", 1, TRUE, 16, 4 * MiB },
  { "hb", "the library's graph built here (check: should equal lib)", K_GRAPH,
    "qcow2", 0, FALSE, 8, 1 * MiB },
  { "direct", "library's graph, fleecing image cache.direct=on + io_uring "
    "(Proxmox's attach)", K_GRAPH, "qcow2", 1, TRUE, 8, 1 * MiB },
  { "uring", "library's graph, fleecing image aio=io_uring (page cache)", K_GRAPH,
    "qcow2", 0, TRUE, 8, 1 * MiB },
  { "w16c4m", "library's graph, Proxmox's job: 16 workers, 4 MiB cluster", K_GRAPH,
    "qcow2", 0, FALSE, 16, 4 * MiB },
  { "raw", "library's graph, raw fleecing image", K_GRAPH, "raw", 0, FALSE, 8, 1 * MiB },
  { "w1", "library's graph, 1 worker", K_GRAPH, "qcow2", 0, FALSE, 1, 1 * MiB },
  { "nodisc", "library's graph without discard-source (diagnosis: the fleecing image "
    "keeps every copy)", K_GRAPH, "qcow2", 0, FALSE, 8, 1 * MiB, .no_discard = TRUE },
  { "rawnodisc", "library's graph, raw image, no discard-source (diagnosis)", K_GRAPH,
    "raw", 0, FALSE, 8, 1 * MiB, .no_discard = TRUE },
  { "noflush", "library's graph, fleecing image cache.no-flush=on (qcow2's ordering "
    "flushes of its metadata skipped)", K_GRAPH, "qcow2", 0, FALSE, 8, 1 * MiB, .no_flush = TRUE },
  { "top", "library's graph with sync \"top\" (unallocated areas skipped; for sources "
    "without a backing file and targets that read as zeroes)", K_GRAPH, "qcow2", 0, FALSE,
    8, 1 * MiB, .sync_top = TRUE },
};

static const Mode *
mode_by_name (const char *name)
{
  for (size_t i = 0; i < G_N_ELEMENTS (modes); i++)
    if (strcmp (modes[i].name, name) == 0)
      return &modes[i];
  die ("unknown mode '%s'", name);
}

/* ---- the VM -------------------------------------------------------------- */

typedef struct {
  char *key;               /* scsi0, virtio0 */
  gboolean scsi;
  uint64_t size;
  char *path;              /* qcow2 source image */
  char *tgt;               /* NBD target file */
  char *gdev;              /* the guest's device: /dev/sda, /dev/vda */
} Disk;

typedef struct {
  char *dir;
  char *lib_sock, *own_sock, *ev_sock, *ctl_sock, *console, *qsd_sock, *nbd_sock, *trace;
  /* QEMU's events, with QEMU's timestamps, from a monitor of their own */
  GThread *ev_thread;
  int ev_fd;
  GMutex ev_lock;
  GArray *ev_stop, *ev_resume;   /* seconds */
  pid_t qemu, qsd;
  Qmp *own, *qsdq;
  int ctl;
  GString *ctlbuf;
  const char *accel;       /* kvm or tcg */
  const char *aio;         /* the sources' aio: io_uring, or threads if refused */
  char *kernel;
  gboolean boot;
  size_t n;
  Disk d[MAXD];
  uint64_t target_bps;
  gboolean null_target;    /* exports discard writes and read as zeroes */
} Vm;

static Vm *
vm_new (const char *tag)
{
  Vm *vm = g_new0 (Vm, 1);
  g_autoptr (GError) err = NULL;
  g_autofree char *tmpl = g_strdup_printf ("fleece-guest-%s-XXXXXX", tag);

  vm->dir = g_dir_make_tmp (tmpl, &err);
  if (!vm->dir)
    die ("%s", err->message);
  vm->lib_sock = g_strdup_printf ("%s/lib.sock", vm->dir);
  vm->own_sock = g_strdup_printf ("%s/own.sock", vm->dir);
  vm->ev_sock = g_strdup_printf ("%s/ev.sock", vm->dir);
  vm->ev_fd = -1;
  vm->ev_stop = g_array_new (FALSE, FALSE, sizeof (double));
  vm->ev_resume = g_array_new (FALSE, FALSE, sizeof (double));
  g_mutex_init (&vm->ev_lock);
  vm->ctl_sock = g_strdup_printf ("%s/ctl.sock", vm->dir);
  vm->console = g_strdup_printf ("%s/console.log", vm->dir);
  vm->qsd_sock = g_strdup_printf ("%s/qsd.sock", vm->dir);
  vm->nbd_sock = g_strdup_printf ("%s/nbd.sock", vm->dir);
  vm->trace = g_strdup_printf ("%s/trace.log", vm->dir);
  vm->ctl = -1;
  vm->ctlbuf = g_string_new (NULL);
  return vm;
}

static void
run_argv (const char *const *argv)
{
  run_cmd ((char *const *) argv);
}

/* A qcow2 source image; the first fill bytes hold data (non-zero, a
 * different byte per 64 MiB), the rest is unallocated. */
static void
vm_add_disk (Vm *vm, const char *key, gboolean scsi, uint64_t size, uint64_t fill)
{
  Disk *k = &vm->d[vm->n++];
  g_autofree char *sz = g_strdup_printf ("%" G_GUINT64_FORMAT, size);

  k->key = g_strdup (key);
  k->scsi = scsi;
  k->size = size;
  k->path = g_strdup_printf ("%s/vm-%d-disk-%zu.qcow2", vm->dir, VMID, vm->n - 1);
  k->tgt = g_strdup_printf ("%s/backup-%s.raw", vm->dir, key);
  {
    const char *argv[] = { "qemu-img", "create", "-q", "-f", "qcow2", k->path, sz, NULL };
    run_argv (argv);
  }
  if (fill) {
    g_autoptr (GPtrArray) a = g_ptr_array_new_with_free_func (g_free);
    g_ptr_array_add (a, g_strdup ("qemu-io"));
    g_ptr_array_add (a, g_strdup ("-f"));
    g_ptr_array_add (a, g_strdup ("qcow2"));
    /* Data at the start, or (less than a tenth of the disk) in 64 MiB
     * pieces spread evenly, so a job's progress rate is steady. */
    uint64_t pieces = (fill + 64 * MiB - 1) / (64 * MiB);
    uint64_t stride = fill * 10 <= size ? size / pieces : 64 * MiB;
    for (uint64_t i = 0, off = 0; off < fill; off += 64 * MiB, i++) {
      g_ptr_array_add (a, g_strdup ("-c"));
      g_ptr_array_add (a, g_strdup_printf ("write -q -P 0x%02x %" G_GUINT64_FORMAT " %" G_GUINT64_FORMAT,
                                           (unsigned) (0x11 + i % 0xe0), (guint64) (i * stride),
                                           (guint64) MIN (64 * MiB, fill - off)));
    }
    g_ptr_array_add (a, g_strdup (k->path));
    g_ptr_array_add (a, NULL);
    run_cmd ((char *const *) a->pdata);
  }
}

static void
qsd_set_rate (Vm *vm, uint64_t bps)
{
  if (!vm->qsdq || !vm->target_bps)
    return;
  json_object_put (qmp_do (vm->qsdq, "qom-set",
                           json_parse ("{\"path\": \"slow\", \"property\": \"limits\", "
                                       "\"value\": {\"bps-write\": %" G_GUINT64_FORMAT "}}",
                                       bps)));
}

/* The backup target: qemu-storage-daemon exporting one raw file per drive
 * over NBD, named after the drive's key (what `fleece --target-nbd`
 * expects); with bps, all exports behind one throttle group. */
static void
vm_start_target (Vm *vm, uint64_t bps)
{
  g_autoptr (GPtrArray) a = g_ptr_array_new_with_free_func (g_free);
  g_autofree char *log = g_strdup_printf ("%s/qsd.log", vm->dir);

  vm->target_bps = bps;
  g_ptr_array_add (a, g_strdup ("qemu-storage-daemon"));
  g_ptr_array_add (a, g_strdup ("--chardev"));
  g_ptr_array_add (a, g_strdup_printf ("socket,id=qmp0,path=%s,server=on,wait=off", vm->qsd_sock));
  g_ptr_array_add (a, g_strdup ("--monitor"));
  g_ptr_array_add (a, g_strdup ("chardev=qmp0"));
  if (bps) {
    g_ptr_array_add (a, g_strdup ("--object"));
    g_ptr_array_add (a, g_strdup_printf ("throttle-group,id=slow,limits.bps-write=%" G_GUINT64_FORMAT, bps));
  }
  for (size_t i = 0; i < vm->n; i++) {
    if (vm->null_target) {
      /* Writes go nowhere: a 1 TiB target needs no space. */
      g_ptr_array_add (a, g_strdup ("--blockdev"));
      g_ptr_array_add (a, g_strdup_printf ("driver=null-co,node-name=t-%s,size=%" G_GUINT64_FORMAT
                                           ",read-zeroes=on", vm->d[i].key, vm->d[i].size));
      continue;
    }
    make_sparse_file (vm->d[i].tgt, vm->d[i].size);
    g_ptr_array_add (a, g_strdup ("--blockdev"));
    g_ptr_array_add (a, g_strdup_printf ("driver=file,node-name=f-%s,filename=%s,discard=unmap",
                                         vm->d[i].key, vm->d[i].tgt));
    g_ptr_array_add (a, g_strdup ("--blockdev"));
    if (bps)
      g_ptr_array_add (a, g_strdup_printf ("driver=throttle,node-name=t-%s,throttle-group=slow,file=f-%s",
                                           vm->d[i].key, vm->d[i].key));
    else
      g_ptr_array_add (a, g_strdup_printf ("driver=raw,node-name=t-%s,file=f-%s,discard=unmap",
                                           vm->d[i].key, vm->d[i].key));
  }
  g_ptr_array_add (a, g_strdup ("--nbd-server"));
  g_ptr_array_add (a, g_strdup_printf ("addr.type=unix,addr.path=%s", vm->nbd_sock));
  for (size_t i = 0; i < vm->n; i++) {
    g_ptr_array_add (a, g_strdup ("--export"));
    g_ptr_array_add (a, g_strdup_printf ("type=nbd,id=e-%s,node-name=t-%s,name=%s,writable=on",
                                         vm->d[i].key, vm->d[i].key, vm->d[i].key));
  }
  g_ptr_array_add (a, NULL);
  vm->qsd = spawn_logged ((char *const *) a->pdata, log);
  vm->qsdq = qmp_open (vm->qsd_sock);
}

/* qemu-server 9's -blockdev for a qcow2 on a directory storage: throttle
 * (empty limits) over qcow2 over file, cache.direct, io_uring, discard and
 * detect-zeroes unmap on every layer. */
static char *
disk_blockdev (const Disk *k, size_t i, const char *aio)
{
  return g_strdup_printf (
    "{\"detect-zeroes\":\"unmap\",\"discard\":\"unmap\",\"driver\":\"throttle\","
    "\"file\":{\"cache\":{\"direct\":true,\"no-flush\":false},\"detect-zeroes\":\"unmap\","
    "\"discard\":\"unmap\",\"driver\":\"qcow2\",\"file\":{\"aio\":\"%s\",\"cache\":"
    "{\"direct\":true,\"no-flush\":false},\"detect-zeroes\":\"unmap\",\"discard\":\"unmap\","
    "\"driver\":\"file\",\"filename\":\"%s\",\"node-name\":\"e%zu-%s\",\"read-only\":false},"
    "\"node-name\":\"f%zu-%s\",\"read-only\":false},\"node-name\":\"drive-%s\","
    "\"read-only\":false,\"throttle-group\":\"throttle-drive-%s\"}",
    aio, k->path, i, k->key, i, k->key, k->key, k->key);
}

static GPtrArray *
qemu_argv (Vm *vm, const char *accel, const char *aio)
{
  GPtrArray *a = g_ptr_array_new_with_free_func (g_free);
  size_t nscsi = 0;
  gboolean bridges = vm->n > 8;

#define ADD(...) g_ptr_array_add (a, g_strdup_printf (__VA_ARGS__))
  ADD ("qemu-system-x86_64");
  ADD ("-name");
  ADD ("fleece-bench-guest");
  ADD ("-machine");
  ADD ("pc");            /* i440fx, as qemu-server's default machine */
  ADD ("-accel");
  ADD ("%s", accel);
  ADD ("-smp");
  ADD ("1");
  ADD ("-m");
  ADD ("256");
  ADD ("-nodefaults");
  ADD ("-no-user-config");
  ADD ("-display");
  ADD ("none");
  ADD ("-no-reboot");
  ADD ("-chardev");
  ADD ("socket,id=qmp,path=%s,server=on,wait=off", vm->lib_sock);
  ADD ("-mon");
  ADD ("chardev=qmp,mode=control");
  ADD ("-chardev");
  ADD ("socket,id=own,path=%s,server=on,wait=off", vm->own_sock);
  ADD ("-mon");
  ADD ("chardev=own,mode=control");
  ADD ("-chardev");
  ADD ("socket,id=ev,path=%s,server=on,wait=off", vm->ev_sock);
  ADD ("-mon");
  ADD ("chardev=ev,mode=control");
  /* For the breakdown: trace events are switched on over QMP, into here. */
  ADD ("-D");
  ADD ("%s", vm->trace);
  ADD ("-msg");
  ADD ("timestamp=on");
  if (vm->boot) {
    ADD ("-kernel");
    ADD ("%s/vmlinuz", opt.guest);
    ADD ("-initrd");
    ADD ("%s/initramfs.gz", opt.guest);
    ADD ("-append");
    ADD ("console=ttyS0 quiet panic=-1 edd=off fleece.disks=%zu", vm->n);
    ADD ("-serial");
    ADD ("file:%s", vm->console);
    ADD ("-device");
    ADD ("virtio-serial-pci,id=vser0");
    ADD ("-chardev");
    ADD ("socket,id=ctl,path=%s,server=on,wait=off", vm->ctl_sock);
    ADD ("-device");
    ADD ("virtserialport,bus=vser0.0,chardev=ctl,name=fleece.ctl");
  } else {
    ADD ("-S");
  }
  if (bridges)
    for (int b = 1; b <= 3; b++) {
      ADD ("-device");
      ADD ("pci-bridge,id=pci.%d,chassis_nr=%d,bus=pci.0,addr=0x%x", b, b,
           b == 1 ? 0x1e : b == 2 ? 0x1f : 0x5);
    }
  for (size_t i = 0; i < vm->n; i++) {
    Disk *k = &vm->d[i];
    ADD ("-object");
    ADD ("{\"id\":\"throttle-drive-%s\",\"limits\":{},\"qom-type\":\"throttle-group\"}", k->key);
    ADD ("-blockdev");
    g_ptr_array_add (a, disk_blockdev (k, i, aio));
    if (k->scsi) {
      /* virtio-scsi-single: one controller per disk.  No iothread: QEMU
       * 10.0.0-10.0.2 can crash on qom-set drive for a device in an
       * iothread, which every fleecing graph does. */
      ADD ("-device");
      if (bridges)
        ADD ("virtio-scsi-pci,id=virtioscsi%zu,bus=pci.%zu,addr=0x%zx", nscsi,
             1 + nscsi / 31, 1 + nscsi % 31);
      else
        ADD ("virtio-scsi-pci,id=virtioscsi%zu", nscsi);
      ADD ("-device");
      ADD ("scsi-hd,bus=virtioscsi%zu.0,channel=0,scsi-id=0,lun=%zu,drive=drive-%s,id=%s,"
           "device_id=drive-%s,write-cache=on", nscsi, nscsi, k->key, k->key, k->key);
      nscsi++;
    } else {
      ADD ("-device");
      ADD ("virtio-blk-pci,drive=drive-%s,id=%s,write-cache=on", k->key, k->key);
    }
  }
#undef ADD
  g_ptr_array_add (a, NULL);
  return a;
}

static int
unix_connect_once (const char *path)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  int fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

  g_strlcpy (sa.sun_path, path, sizeof sa.sun_path);
  if (fd >= 0 && connect (fd, (struct sockaddr *) &sa, sizeof sa) == 0)
    return fd;
  if (fd >= 0)
    close (fd);
  return -1;
}

static gboolean
pid_alive (pid_t pid)
{
  int st;
  return pid > 0 && waitpid (pid, &st, WNOHANG) == 0;
}

static char *
slurp (const char *path)
{
  char *s = NULL;
  if (!g_file_get_contents (path, &s, NULL, NULL))
    return g_strdup ("");
  return s;
}

/* Start QEMU and wait for the guest's READY line.  Returns FALSE if QEMU
 * died or the guest did not come up in time (the caller tries otherwise). */
static gboolean
vm_try_start (Vm *vm, const char *accel, const char *aio, double timeout_s)
{
  g_autoptr (GPtrArray) a = qemu_argv (vm, accel, aio);
  g_autofree char *log = g_strdup_printf ("%s/qemu-%s-%s.log", vm->dir, accel, aio);
  gint64 deadline = now_us () + (gint64) (timeout_s * G_USEC_PER_SEC);

  unlink (vm->console);
  vm->qemu = spawn_logged ((char *const *) a->pdata, log);
  for (;;) {
    g_autofree char *con = NULL;
    g_autofree char *qlog = NULL;
    if (!pid_alive (vm->qemu)) {
      qlog = slurp (log);
      note ("  QEMU (%s, aio=%s) exited: %s", accel, aio, qlog);
      vm->qemu = 0;
      return FALSE;
    }
    if (!vm->boot) {
      int fd = unix_connect_once (vm->own_sock);
      if (fd >= 0) {
        close (fd);
        break;
      }
    } else {
      con = slurp (vm->console);
      if (strstr (con, "fleece-guest: READY")) {
        const char *k = strstr (con, "fleece-guest: kernel ");
        if (k)
          vm->kernel = g_strndup (k + 21, strcspn (k + 21, ","));
        break;
      }
    }
    if (now_us () > deadline) {
      note ("  guest (%s) not ready after %.0f s; console: %s\n", accel, timeout_s,
            con ? con : "");
      stop_pid (vm->qemu);
      vm->qemu = 0;
      return FALSE;
    }
    g_usleep (50000);
  }
  vm->accel = accel;
  vm->aio = aio;
  return TRUE;
}

static void
ctl_connect (Vm *vm)
{
  gint64 deadline = now_us () + 10 * G_USEC_PER_SEC;

  while ((vm->ctl = unix_connect_once (vm->ctl_sock)) < 0) {
    if (now_us () > deadline)
      die ("cannot connect to the guest's control port %s", vm->ctl_sock);
    g_usleep (20000);
  }
}

static GPtrArray *ctl_cmd (Vm *vm, double timeout_s, const char *fmt, ...) G_GNUC_PRINTF (3, 4);

/* One probe command; returns its lines, the last one "ok ..." or
 * "err ...". */
static GPtrArray *
ctl_cmd (Vm *vm, double timeout_s, const char *fmt, ...)
{
  GPtrArray *lines = g_ptr_array_new_with_free_func (g_free);
  g_autofree char *cmd = NULL;
  g_autofree char *line = NULL;
  gint64 deadline = now_us () + (gint64) (timeout_s * G_USEC_PER_SEC);
  va_list ap;

  va_start (ap, fmt);
  cmd = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  line = g_strdup_printf ("%s\n", cmd);
  if (write (vm->ctl, line, strlen (line)) != (ssize_t) strlen (line))
    die ("guest control port: %s", g_strerror (errno));
  for (;;) {
    char *nl = memchr (vm->ctlbuf->str, '\n', vm->ctlbuf->len);
    char tmp[65536];
    struct pollfd pfd = { .fd = vm->ctl, .events = POLLIN };
    gint64 left;
    ssize_t n;

    if (nl) {
      size_t len = (size_t) (nl - vm->ctlbuf->str);
      char *l = g_strndup (vm->ctlbuf->str, len);
      g_string_erase (vm->ctlbuf, 0, (gssize) len + 1);
      g_ptr_array_add (lines, l);
      if (g_str_has_prefix (l, "ok") || g_str_has_prefix (l, "err"))
        return lines;
      continue;
    }
    left = deadline - now_us ();
    if (left <= 0)
      die ("the guest did not answer '%s' within %.0f s", cmd, timeout_s);
    if (poll (&pfd, 1, (int) MIN (left / 1000 + 1, 1000)) <= 0)
      continue;
    n = read (vm->ctl, tmp, sizeof tmp);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      die ("guest control port closed (during '%s')", cmd);
    g_string_append_len (vm->ctlbuf, tmp, n);
  }
}

static const char *
ctl_last (GPtrArray *l)
{
  return l->pdata[l->len - 1];
}

static uint64_t
kv_u64 (const char *line, const char *key)
{
  g_autofree char *k = g_strdup_printf (" %s=", key);
  const char *s = strstr (line, k);
  return s ? g_ascii_strtoull (s + strlen (k), NULL, 10) : 0;
}

static gpointer
ev_reader (gpointer data)
{
  Vm *vm = data;
  GString *buf = g_string_new (NULL);
  char tmp[8192];
  ssize_t n;

  while ((n = read (vm->ev_fd, tmp, sizeof tmp)) > 0 || (n < 0 && errno == EINTR)) {
    char *nl;
    if (n <= 0)
      continue;
    g_string_append_len (buf, tmp, n);
    while ((nl = memchr (buf->str, '\n', buf->len))) {
      g_autofree char *line = g_strndup (buf->str, (gsize) (nl - buf->str));
      json_object *o = json_tokener_parse (line), *ts;
      const char *ev = jstr (o, "event");
      g_string_erase (buf, 0, nl - buf->str + 1);
      if (ev && (strcmp (ev, "STOP") == 0 || strcmp (ev, "RESUME") == 0) &&
          json_object_object_get_ex (o, "timestamp", &ts)) {
        double t = jint (ts, "seconds") + jint (ts, "microseconds") / 1e6;
        g_mutex_lock (&vm->ev_lock);
        g_array_append_val (strcmp (ev, "STOP") == 0 ? vm->ev_stop : vm->ev_resume, t);
        g_mutex_unlock (&vm->ev_lock);
      }
      if (o)
        json_object_put (o);
    }
  }
  g_string_free (buf, TRUE);
  return NULL;
}

static void
ev_start (Vm *vm)
{
  const char *caps = "{\"execute\": \"qmp_capabilities\"}\n";
  gint64 deadline = now_us () + 10 * G_USEC_PER_SEC;

  while ((vm->ev_fd = unix_connect_once (vm->ev_sock)) < 0) {
    if (now_us () > deadline)
      die ("cannot connect to %s", vm->ev_sock);
    g_usleep (20000);
  }
  if (write (vm->ev_fd, caps, strlen (caps)) < 0)
    die ("event monitor: %s", g_strerror (errno));
  vm->ev_thread = g_thread_new ("qemu-events", ev_reader, vm);
}

/* The last pause of the vCPUs (STOP to RESUME), seconds; -1 if none. */
static double
vm_last_pause (Vm *vm)
{
  double d = -1;
  g_mutex_lock (&vm->ev_lock);
  if (vm->ev_stop->len && vm->ev_resume->len)
    d = g_array_index (vm->ev_resume, double, vm->ev_resume->len - 1) -
        g_array_index (vm->ev_stop, double, vm->ev_stop->len - 1);
  g_mutex_unlock (&vm->ev_lock);
  return d;
}

/* Start QEMU: KVM first if /dev/kvm is usable (nested KVM was seen to hang
 * Debian's 6.1 kernel early in boot: 20 s for the READY line), else TCG;
 * aio=io_uring as qemu-server, threads if this QEMU or kernel refuses it. */
static void
vm_start (Vm *vm, gboolean boot)
{
  /* Once KVM failed here it fails again: the later VMs go to TCG at once. */
  static gboolean kvm_failed;
  const char *accels[2] = { NULL, NULL };
  size_t na = 0;

  vm->boot = boot;
  if (!opt.no_kvm && !kvm_failed && access ("/dev/kvm", R_OK | W_OK) == 0)
    accels[na++] = "kvm";
  accels[na++] = "tcg";
  for (size_t i = 0; i < na; i++) {
    /* TCG: 64 virtio-scsi controllers on a busy host took ~3 minutes. */
    double timeout = strcmp (accels[i], "kvm") == 0 ? 20 : 400;
    if (vm_try_start (vm, accels[i], "io_uring", timeout) ||
        vm_try_start (vm, accels[i], "threads", timeout))
      break;
    if (strcmp (accels[i], "kvm") == 0) {
      kvm_failed = TRUE;
      note ("  KVM did not boot the guest: TCG for this and every later VM\n");
    }
  }
  if (!vm->accel)
    die ("QEMU did not start (logs in %s)", vm->dir);
  vm->own = qmp_open (vm->own_sock);
  ev_start (vm);
  if (boot) {
    g_autoptr (GPtrArray) l = NULL;
    ctl_connect (vm);
    l = ctl_cmd (vm, 30, "ping");
    if (!g_str_has_prefix (ctl_last (l), "ok"))
      die ("guest: %s", ctl_last (l));
    /* The guest names disks in bus order: sd* for SCSI, vd* for virtio. */
    for (size_t i = 0, s = 0, v = 0; i < vm->n; i++) {
      size_t x = vm->d[i].scsi ? s++ : v++;
      const char *p = vm->d[i].scsi ? "sd" : "vd";
      vm->d[i].gdev = x < 26 ? g_strdup_printf ("/dev/%s%c", p, (char) ('a' + x))
                             : g_strdup_printf ("/dev/%s%c%c", p, (char) ('a' + x / 26 - 1),
                                                (char) ('a' + x % 26));
    }
  }
  note ("  VM up: %s, aio=%s%s%s\n", vm->accel, vm->aio, vm->kernel ? ", guest kernel " : "",
        vm->kernel ? vm->kernel : "");
}

static void
vm_free (Vm *vm)
{
  if (vm->ctl >= 0)
    close (vm->ctl);
  if (vm->own && write (vm->own->fd, "{\"execute\": \"quit\"}\n", 20) < 0)
    note ("quit: %s\n", g_strerror (errno));
  qmp_close (vm->own);
  stop_pid (vm->qemu);
  if (vm->ev_thread) {
    shutdown (vm->ev_fd, SHUT_RDWR);
    g_thread_join (vm->ev_thread);
    close (vm->ev_fd);
  }
  g_array_unref (vm->ev_stop);
  g_array_unref (vm->ev_resume);
  g_mutex_clear (&vm->ev_lock);
  g_free (vm->ev_sock);
  qmp_close (vm->qsdq);
  stop_pid (vm->qsd);
  if (!g_getenv ("FLEECE_BENCH_KEEP"))
    rm_rf (vm->dir);
  else
    note ("  kept %s\n", vm->dir);
  for (size_t i = 0; i < vm->n; i++) {
    g_free (vm->d[i].key);
    g_free (vm->d[i].path);
    g_free (vm->d[i].tgt);
    g_free (vm->d[i].gdev);
  }
  g_string_free (vm->ctlbuf, TRUE);
  g_free (vm->kernel);
  g_free (vm->dir);
  g_free (vm->lib_sock);
  g_free (vm->own_sock);
  g_free (vm->ctl_sock);
  g_free (vm->console);
  g_free (vm->qsd_sock);
  g_free (vm->nbd_sock);
  g_free (vm->trace);
  g_free (vm);
}

/* ---- QMP helpers ------------------------------------------------------------ */

static void
qmp_ok (Qmp *q, const char *cmd, json_object *args)
{
  json_object_put (qmp_do (q, cmd, args));
}

static void
qmp_quiet (Qmp *q, const char *cmd, json_object *args)
{
  g_autofree char *err = NULL;
  json_object *r = qmp_try (q, cmd, args, &err);
  if (r)
    json_object_put (r);
}

static const char *
jstr (json_object *o, const char *key)
{
  json_object *v;
  return o && json_object_object_get_ex (o, key, &v) && v ? json_object_get_string (v) : NULL;
}

static int64_t
jint (json_object *o, const char *key)
{
  json_object *v;
  return o && json_object_object_get_ex (o, key, &v) && v ? json_object_get_int64 (v) : 0;
}

/* Progress of the job backing up disk k (any job id ending in -<key>);
 * -1 if there is none; *status gets its status. */
static int64_t
job_progress (Vm *vm, const Disk *k, char **status)
{
  json_object *r = qmp_do (vm->own, "query-jobs", NULL);
  g_autofree char *suffix = g_strdup_printf ("-%s", k->key);
  int64_t p = -1;

  for (size_t i = 0; i < json_object_array_length (r); i++) {
    json_object *j = json_object_array_get_idx (r, i);
    const char *id = jstr (j, "id");
    if (id && g_str_has_suffix (id, suffix) && g_strcmp0 (jstr (j, "type"), "backup") == 0) {
      p = jint (j, "current-progress");
      if (status)
        *status = g_strdup (jstr (j, "status"));
    }
  }
  json_object_put (r);
  return p;
}

/* The job's total-progress (the work it knows of: sync "top" drops what it
 * skips), -1 if there is no job. */
static int64_t
job_total (Vm *vm, const Disk *k)
{
  json_object *r = qmp_do (vm->own, "query-jobs", NULL);
  g_autofree char *suffix = g_strdup_printf ("-%s", k->key);
  int64_t t = -1;

  for (size_t i = 0; i < json_object_array_length (r); i++) {
    json_object *j = json_object_array_get_idx (r, i);
    const char *id = jstr (j, "id");
    if (id && g_str_has_suffix (id, suffix) && g_strcmp0 (jstr (j, "type"), "backup") == 0)
      t = jint (j, "total-progress");
  }
  json_object_put (r);
  return t;
}

/* ---- a backup, made one of the ways -------------------------------------- */

typedef struct {
  Vm *vm;
  const Mode *m;
  uint64_t bwlimit;        /* bytes/s per drive, 0 none */
  int only;                /* back up only this disk; -1: all */
  const char *target_dir;  /* K_LIB: --target-dir (else the NBD exports) */
  const char *target_fmt;
  unsigned cbw_timeout;    /* 0: the default */
  char *fleecing_dir;      /* fleecing storage */
  /* K_LIB */
  pid_t pid;
  int out;
  GThread *reader;
  GMutex lock;
  GCond cond;
  gboolean started, exited;
  GString *events;
  char *result;            /* the "result" event */
  int status;
  /* K_GRAPH / K_PLAIN */
  char *image[MAXD];
  gint64 t_start;
} Backup;

static gpointer
lib_reader (gpointer data)
{
  Backup *b = data;
  GString *buf = g_string_new (NULL);
  char tmp[4096];
  ssize_t n;

  while ((n = read (b->out, tmp, sizeof tmp)) > 0 || (n < 0 && errno == EINTR)) {
    char *nl;
    if (n <= 0)
      continue;
    g_string_append_len (buf, tmp, n);
    while ((nl = memchr (buf->str, '\n', buf->len))) {
      g_autofree char *line = g_strndup (buf->str, (gsize) (nl - buf->str));
      json_object *o = json_tokener_parse (line);
      const char *ev = jstr (o, "event");
      g_string_erase (buf, 0, nl - buf->str + 1);
      g_mutex_lock (&b->lock);
      g_string_append_printf (b->events, "%s\n", line);
      if (g_strcmp0 (ev, "started") == 0)
        b->started = TRUE;
      if (g_strcmp0 (ev, "result") == 0) {
        g_free (b->result);
        b->result = g_strdup (line);
      }
      g_cond_broadcast (&b->cond);
      g_mutex_unlock (&b->lock);
      if (o)
        json_object_put (o);
    }
  }
  g_mutex_lock (&b->lock);
  b->exited = TRUE;
  g_cond_broadcast (&b->cond);
  g_mutex_unlock (&b->lock);
  g_string_free (buf, TRUE);
  return NULL;
}

static void
lib_start (Backup *b)
{
  Vm *vm = b->vm;
  g_autoptr (GPtrArray) a = g_ptr_array_new_with_free_func (g_free);
  g_autofree char *log = g_strdup_printf ("%s/fleece.log", vm->dir);
  int pfd[2];
  pid_t parent = getpid ();
  gint64 deadline;

  g_ptr_array_add (a, g_strdup (opt.fleece));
  g_ptr_array_add (a, g_strdup ("backup"));
  g_ptr_array_add (a, g_strdup_printf ("--vmid=%d", VMID));
  g_ptr_array_add (a, g_strdup_printf ("--qmp=%s", vm->lib_sock));
  g_ptr_array_add (a, g_strdup_printf ("--fleecing-storage=%s", b->fleecing_dir));
  if (b->target_dir) {
    g_ptr_array_add (a, g_strdup_printf ("--target-dir=%s", b->target_dir));
    g_ptr_array_add (a, g_strdup_printf ("--target-format=%s", b->target_fmt));
  } else {
    g_ptr_array_add (a, g_strdup_printf ("--target-nbd=nbd+unix:///?socket=%s", vm->nbd_sock));
  }
  if (b->only >= 0)
    g_ptr_array_add (a, g_strdup_printf ("--devices=%s", vm->d[b->only].key));
  g_ptr_array_add (a, g_strdup_printf ("--state-dir=%s/state", vm->dir));
  g_ptr_array_add (a, g_strdup ("--json"));
  if (b->bwlimit)
    g_ptr_array_add (a, g_strdup_printf ("--bwlimit=%" G_GUINT64_FORMAT, b->bwlimit / 1024));
  if (b->cbw_timeout)
    g_ptr_array_add (a, g_strdup_printf ("--cbw-timeout=%u", b->cbw_timeout));
  if (b->m->lib_args) {
    g_auto (GStrv) extra = g_strsplit (b->m->lib_args, " ", -1);
    for (char **e = extra; *e; e++)
      g_ptr_array_add (a, g_strdup (*e));
  }
  g_ptr_array_add (a, NULL);

  if (pipe2 (pfd, O_CLOEXEC) != 0)
    die ("pipe: %s", g_strerror (errno));
  b->pid = fork ();
  if (b->pid < 0)
    die ("fork: %s", g_strerror (errno));
  if (b->pid == 0) {
    int fd = open (log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    prctl (PR_SET_PDEATHSIG, SIGKILL);
    if (getppid () != parent)
      _exit (127);
    dup2 (pfd[1], 1);
    if (fd >= 0)
      dup2 (fd, 2);
    execvp (((char **) a->pdata)[0], (char **) a->pdata);
    _exit (127);
  }
  close (pfd[1]);
  b->out = pfd[0];
  b->events = g_string_new (NULL);
  g_mutex_init (&b->lock);
  g_cond_init (&b->cond);
  b->reader = g_thread_new ("fleece-out", lib_reader, b);
  deadline = g_get_monotonic_time () + 120 * G_USEC_PER_SEC;
  g_mutex_lock (&b->lock);
  while (!b->started && !b->exited)
    if (!g_cond_wait_until (&b->cond, &b->lock, deadline))
      break;
  g_mutex_unlock (&b->lock);
  if (!b->started) {
    g_autofree char *l = slurp (log);
    die ("fleece backup did not start: %s%s", b->events->str, l);
  }
}

/* SIGTERM: the command cancels and cleans up.  Returns the result event. */
static void
lib_stop (Backup *b)
{
  int st;

  if (!b->pid)
    return;
  kill (b->pid, SIGTERM);
  waitpid (b->pid, &st, 0);
  b->status = WIFEXITED (st) ? WEXITSTATUS (st) : 128 + WTERMSIG (st);
  g_thread_join (b->reader);
  close (b->out);
  b->pid = 0;
}

static char *
fleecing_image (Backup *b, size_t i)
{
  return g_strdup_printf ("%s/vm-%d-fleece-%zu.%s", b->fleecing_dir, VMID, i, b->m->fmt);
}

static const char *
qdev_path (const Disk *k, char *buf, size_t len)
{
  g_snprintf (buf, len, "/machine/peripheral/%s", k->key);
  return buf;
}

static void
graph_start (Backup *b)
{
  Vm *vm = b->vm;
  Qmp *q = vm->own;
  json_object *actions = json_object_new_array ();
  gboolean fleece = b->m->kind == K_GRAPH;

  for (size_t i = 0; i < vm->n; i++) {
    Disk *k = &vm->d[i];
    if (b->only >= 0 && (size_t) b->only != i)
      continue;
    if (fleece) {
      g_autofree char *sz = g_strdup_printf ("%" G_GUINT64_FORMAT, k->size);
      const char *argv[] = { "qemu-img", "create", "-q", "-f", b->m->fmt, NULL, sz, NULL };
      g_autofree char *cache = NULL;
      b->image[i] = fleecing_image (b, i);
      argv[5] = b->image[i];
      run_argv (argv);
      cache = g_strdup_printf ("\"cache\": {\"direct\": %s, \"no-flush\": %s}",
                               b->m->direct ? "true" : "false", b->m->no_flush ? "true" : "false");
      qmp_ok (q, "blockdev-add",
              json_parse ("{\"driver\": \"%s\", \"node-name\": \"drive-%s-fleecing\", "
                          "\"discard\": \"unmap\", \"detect-zeroes\": \"unmap\", %s, "
                          "\"file\": {\"driver\": \"file\", \"filename\": \"%s\", "
                          "\"node-name\": \"%s-fleecing-file\", \"discard\": \"unmap\", "
                          "\"detect-zeroes\": \"unmap\", %s%s}}",
                          b->m->fmt, k->key, cache, b->image[i], k->key, cache,
                          b->m->uring ? ", \"aio\": \"io_uring\"" : ""));
    }
    qmp_ok (q, "blockdev-add",
            json_parse ("{\"driver\": \"nbd\", \"node-name\": \"%s-hb-tgt\", "
                        "\"server\": {\"type\": \"unix\", \"path\": \"%s\"}, "
                        "\"export\": \"%s\"}", k->key, vm->nbd_sock, k->key));
  }
  /* One point in time for all drives: the vCPUs stop while filters go in. */
  qmp_ok (q, "stop", NULL);
  for (size_t i = 0; i < vm->n; i++) {
    Disk *k = &vm->d[i];
    json_object *perf, *d, *act;
    char qdev[128];

    if (b->only >= 0 && (size_t) b->only != i)
      continue;
    perf = json_object_new_object ();
    d = json_object_new_object ();
    act = json_object_new_object ();

    if (fleece) {
      json_object *cbw = json_parse ("{\"driver\": \"copy-before-write\", \"node-name\": "
                                     "\"%s-hb-cbw\", \"file\": \"drive-%s\", \"target\": "
                                     "\"drive-%s-fleecing\", \"on-cbw-error\": "
                                     "\"break-snapshot\", \"cbw-timeout\": %u}",
                                     k->key, k->key, k->key, b->cbw_timeout ? b->cbw_timeout : 45);
      if (b->m->cbw_cluster)
        json_object_object_add (cbw, "min-cluster-size", json_object_new_int64 (b->m->cbw_cluster));
      qmp_ok (q, "blockdev-add", cbw);
      qmp_ok (q, "qom-set", json_parse ("{\"path\": \"%s\", \"property\": \"drive\", "
                                        "\"value\": \"%s-hb-cbw\"}",
                                        qdev_path (k, qdev, sizeof qdev), k->key));
      qmp_ok (q, "blockdev-add", json_parse ("{\"driver\": \"snapshot-access\", \"node-name\": "
                                             "\"%s-hb-snap\", \"file\": \"%s-hb-cbw\", "
                                             "\"discard\": \"unmap\"}", k->key, k->key));
    }
    {
      g_autofree char *job = g_strdup_printf ("hb-%s", k->key);
      g_autofree char *src = fleece ? g_strdup_printf ("%s-hb-snap", k->key)
                                    : g_strdup_printf ("drive-%s", k->key);
      g_autofree char *tgt = g_strdup_printf ("%s-hb-tgt", k->key);
      json_object_object_add (d, "job-id", json_object_new_string (job));
      json_object_object_add (d, "device", json_object_new_string (src));
      json_object_object_add (d, "target", json_object_new_string (tgt));
    }
    json_object_object_add (d, "sync", json_object_new_string (b->m->sync_top ? "top" : "full"));
    json_object_object_add (d, "auto-dismiss", json_object_new_boolean (FALSE));
    if (b->bwlimit)
      json_object_object_add (d, "speed", json_object_new_int64 ((int64_t) b->bwlimit));
    if (fleece && !b->m->no_discard)
      json_object_object_add (d, "discard-source", json_object_new_boolean (TRUE));
    if (b->m->workers)
      json_object_object_add (perf, "max-workers", json_object_new_int (b->m->workers));
    if (b->m->cluster)
      json_object_object_add (perf, "min-cluster-size", json_object_new_int64 (b->m->cluster));
    json_object_object_add (d, "x-perf", perf);
    json_object_object_add (act, "type", json_object_new_string ("blockdev-backup"));
    json_object_object_add (act, "data", d);
    json_object_array_add (actions, act);
  }
  {
    json_object *args = json_object_new_object ();
    json_object_object_add (args, "actions", actions);
    qmp_ok (q, "transaction", args);
  }
  qmp_ok (q, "cont", NULL);
}

/* Wait until none of our jobs is running any more (cancel returns first). */
static void
graph_wait_jobs (Vm *vm, double timeout_s)
{
  gint64 deadline = now_us () + (gint64) (timeout_s * G_USEC_PER_SEC);

  for (;;) {
    json_object *r = qmp_do (vm->own, "query-jobs", NULL);
    gboolean busy = FALSE;
    for (size_t i = 0; i < json_object_array_length (r); i++) {
      json_object *j = json_object_array_get_idx (r, i);
      const char *id = jstr (j, "id"), *st = jstr (j, "status");
      if (id && g_str_has_prefix (id, "hb-") && g_strcmp0 (st, "concluded") != 0 &&
          g_strcmp0 (st, "null") != 0)
        busy = TRUE;
    }
    json_object_put (r);
    if (!busy)
      return;
    if (now_us () > deadline)
      die ("our backup jobs did not end within %.0f s", timeout_s);
    g_usleep (20000);
  }
}

/* Returns the jobs' error, if any (g_free). */
static char *
graph_stop (Backup *b)
{
  Vm *vm = b->vm;
  Qmp *q = vm->own;
  GString *errors = g_string_new (NULL);
  json_object *r;

  for (size_t i = 0; i < vm->n; i++)
    qmp_quiet (q, "job-cancel", json_parse ("{\"id\": \"hb-%s\"}", vm->d[i].key));
  graph_wait_jobs (vm, 120);
  r = qmp_do (q, "query-jobs", NULL);
  for (size_t i = 0; i < json_object_array_length (r); i++) {
    json_object *j = json_object_array_get_idx (r, i);
    const char *id = jstr (j, "id");
    /* Our own cancel is not an error. */
    if (id && g_str_has_prefix (id, "hb-") && jstr (j, "error") &&
        !strstr (jstr (j, "error"), "canceled"))
      g_string_append_printf (errors, "%s%s: %s", errors->len ? "; " : "", id, jstr (j, "error"));
  }
  json_object_put (r);
  for (size_t i = 0; i < vm->n; i++) {
    Disk *k = &vm->d[i];
    char qdev[128];
    if (b->only >= 0 && (size_t) b->only != i)
      continue;
    qmp_quiet (q, "job-dismiss", json_parse ("{\"id\": \"hb-%s\"}", k->key));
    if (b->m->kind == K_GRAPH) {
      qmp_ok (q, "blockdev-del", json_parse ("{\"node-name\": \"%s-hb-snap\"}", k->key));
      qmp_ok (q, "qom-set", json_parse ("{\"path\": \"%s\", \"property\": \"drive\", "
                                        "\"value\": \"drive-%s\"}",
                                        qdev_path (k, qdev, sizeof qdev), k->key));
      qmp_ok (q, "blockdev-del", json_parse ("{\"node-name\": \"%s-hb-cbw\"}", k->key));
    }
    qmp_ok (q, "blockdev-del", json_parse ("{\"node-name\": \"%s-hb-tgt\"}", k->key));
    if (b->m->kind == K_GRAPH) {
      qmp_ok (q, "blockdev-del", json_parse ("{\"node-name\": \"drive-%s-fleecing\"}", k->key));
      unlink (b->image[i]);
      g_clear_pointer (&b->image[i], g_free);
    }
  }
  if (!errors->len) {
    g_string_free (errors, TRUE);
    return NULL;
  }
  return g_string_free (errors, FALSE);
}

static Backup *
backup_start_ex (Vm *vm, const Mode *m, uint64_t bwlimit, unsigned cbw_timeout,
                 const char *fleecing_dir, int only, const char *target_dir,
                 const char *target_fmt)
{
  Backup *b = g_new0 (Backup, 1);

  b->only = only;
  b->target_dir = target_dir;
  b->target_fmt = target_fmt;
  b->vm = vm;
  b->m = m;
  b->bwlimit = bwlimit;
  b->cbw_timeout = cbw_timeout;
  b->fleecing_dir = fleecing_dir ? g_strdup (fleecing_dir)
                                 : g_strdup_printf ("%s/fleecing", vm->dir);
  g_mkdir_with_parents (b->fleecing_dir, 0700);
  b->t_start = now_us ();
  switch (m->kind) {
  case K_NONE:
    break;
  case K_LIB:
    lib_start (b);
    break;
  default:
    graph_start (b);
  }
  return b;
}

static Backup *
backup_start (Vm *vm, const Mode *m, uint64_t bwlimit, unsigned cbw_timeout,
              const char *fleecing_dir)
{
  return backup_start_ex (vm, m, bwlimit, cbw_timeout, fleecing_dir, -1, NULL, NULL);
}

/* Cancel (or collect) the backup and undo everything; returns what went
 * wrong in the backup itself, NULL if nothing did (g_free). */
static char *
backup_stop (Backup *b, gboolean fast)
{
  char *err = NULL;

  /* Lift the target's limit so cancelling does not wait for the requests
   * queued in the throttle. */
  if (fast)
    qsd_set_rate (b->vm, 0);
  if (b->m->kind == K_LIB) {
    lib_stop (b);
    if (b->result) {
      json_object *o = json_tokener_parse (b->result);
      const char *res = jstr (o, "result"), *e = jstr (o, "error");
      if (g_strcmp0 (res, "ok") != 0 && !(g_strcmp0 (res, "cancelled") == 0 && fast))
        err = g_strdup_printf ("%s: %s", res ? res : "?", e ? e : "");
      if (g_strcmp0 (jstr (o, "cleanup"), "ok") != 0)
        die ("fleece cleanup failed: %s", b->result);
      json_object_put (o);
    } else {
      die ("fleece backup ended without a result (status %d): %s", b->status, b->events->str);
    }
  } else if (b->m->kind != K_NONE) {
    err = graph_stop (b);
  }
  if (fast)
    qsd_set_rate (b->vm, b->vm->target_bps);
  return err;
}

static void
backup_free (Backup *b)
{
  if (!b)
    return;
  if (b->events)
    g_string_free (b->events, TRUE);
  if (b->reader) {
    g_mutex_clear (&b->lock);
    g_cond_clear (&b->cond);
  }
  g_free (b->result);
  g_free (b->fleecing_dir);
  g_free (b);
}

/* ---- output helpers ----------------------------------------------------- */

static char *
fmt_ms (double ms)
{
  if (ms >= 1000)
    return g_strdup_printf ("%.2f s", ms / 1000);
  if (ms >= 10)
    return g_strdup_printf ("%.1f ms", ms);
  return g_strdup_printf ("%.3f ms", ms);
}

static void
write_cdf (const char *name, GArray *a)
{
  FILE *f = open_out (opt.out, name);
  g_autoptr (GArray) c = g_array_sized_new (FALSE, FALSE, sizeof (double), a->len);

  g_array_append_vals (c, a->data, a->len);
  g_array_sort (c, cmp_double);
  for (guint i = 0; i < c->len; i++)
    fprintf (f, "%.4f %.6f\n", g_array_index (c, double, i), (i + 1.0) / c->len);
  if (!c->len)
    fprintf (f, "1 0\n");
  fclose (f);
}

/* ---- 1: latency of writes ahead of the backup cursor ----------------------- */

#define LAT_DISK (512 * MiB)
#define LAT_TARGET_BPS (8 * MiB)
#define LAT_INTERVAL_US 20000
#define LAT_LEAD_MIN (64 * MiB)
#define LAT_LEAD_MAX (192 * MiB)

enum { S_64K, S_4K, NSIZES };
static const uint64_t sizes[NSIZES] = { 64 * KiB, 4 * KiB };
static const char *size_names[NSIZES] = { "64k", "4k" };

typedef struct {
  const Mode *m;
  GArray *lat[NSIZES];          /* ms, fresh clusters, all reps */
  GArray *lat_disk[NSIZES][2];  /* per bus: 0 scsi, 1 virtio */
  GArray *rep_p50[NSIZES], *rep_p99[NSIZES];
  GArray *rewrite;              /* ms: 64 KiB again to a cluster just written */
  GArray *read;                 /* ms: 64 KiB O_DIRECT read of an uncopied cluster */
  GArray *lead;                 /* MiB ahead of the job's progress */
  unsigned early_end;           /* runs in which the backup ended by itself */
  GString *errors;
} LatMode;

typedef struct {
  Vm *vm;
  guint8 *written[MAXD];        /* per 64 KiB cluster: written in this run */
  GRand *rand;
  uint64_t seed;
} Picker;

static void
picker_reset (Picker *p)
{
  for (size_t i = 0; i < p->vm->n; i++) {
    g_free (p->written[i]);
    p->written[i] = g_malloc0 (p->vm->d[i].size / CBW_CLUSTER);
  }
}

/* A cbw cluster of disk i not touched in this run, LEAD_MIN..LEAD_MAX ahead
 * of the job's progress (further ahead if that is used up). */
static int64_t
pick_fresh (Picker *p, size_t i, uint64_t progress)
{
  uint64_t n = p->vm->d[i].size / CBW_CLUSTER;
  uint64_t lo = MIN (n, (progress + LAT_LEAD_MIN) / CBW_CLUSTER);
  uint64_t hi = MIN (n, (progress + LAT_LEAD_MAX) / CBW_CLUSTER);

  for (int pass = 0; pass < 2; pass++) {
    for (int tries = 0; tries < 64 && hi > lo; tries++) {
      uint64_t k = lo + (uint64_t) g_rand_int_range (p->rand, 0, (gint32) (hi - lo));
      if (!p->written[i][k]) {
        p->written[i][k] = 1;
        return (int64_t) (k * CBW_CLUSTER);
      }
    }
    for (uint64_t k = lo; k < hi; k++)
      if (!p->written[i][k]) {
        p->written[i][k] = 1;
        return (int64_t) (k * CBW_CLUSTER);
      }
    hi = n;
  }
  return -1;
}

static double
guest_op (Vm *vm, const char *op, const Disk *k, uint64_t off, uint64_t len, uint64_t seed)
{
  g_autoptr (GPtrArray) l = ctl_cmd (vm, 300, "%s dev=%s off=%" G_GUINT64_FORMAT
                                     " len=%" G_GUINT64_FORMAT " seed=%" G_GUINT64_FORMAT,
                                     op, k->gdev, off, len, seed);
  if (!g_str_has_prefix (ctl_last (l), "ok"))
    die ("guest %s on %s at %" G_GUINT64_FORMAT ": %s", op, k->gdev, off, ctl_last (l));
  return kv_u64 (ctl_last (l), "ns") / 1e6;
}

/* One measuring run.  Every LAT_INTERVAL_US (or at once after a slower
 * one) one operation, so every sample starts from the same idle guest:
 * four writes to fresh clusters ahead of the job (64 KiB and 4 KiB in
 * turn, the disks in turn), then a 64 KiB rewrite of the last one
 * (nothing left to copy) and a 64 KiB read of a fresh cluster (reads
 * copy nothing either).  Backups that stall every write (no fleecing)
 * run until one write of each size was made. */
static void
lat_run (Picker *p, LatMode *lm, int rep, FILE *raw, GArray *trace_ops)
{
  Vm *vm = p->vm;
  GArray *repl[NSIZES] = { dbl_array (), dbl_array () };
  Backup *b;
  gint64 t0, next;
  unsigned n = 0, fresh = 0;
  int64_t last_off = -1;
  size_t last_disk = 0;
  char *err;

  picker_reset (p);
  b = backup_start (vm, lm->m, 0, 0, NULL);
  t0 = next = now_us ();
  for (;; n++) {
    gint64 el = now_us () - t0;
    size_t di = (fresh / NSIZES + (size_t) rep) % vm->n;
    int si = (int) (fresh % NSIZES);
    int kind = n % 6 < 4 ? 0 : n % 6 == 4 ? 1 : 2;   /* fresh, rewrite, read */
    Disk *k;
    g_autofree char *status = NULL;
    int64_t prog = 0, off;
    uint64_t len;
    double ms;
    gint64 now;

    if (el > (gint64) (opt.secs * G_USEC_PER_SEC) &&
        (repl[0]->len && repl[1]->len ? TRUE : el > 90 * G_USEC_PER_SEC))
      break;
    now = now_us ();
    if (now < next)
      g_usleep ((gulong) (next - now));
    next = now_us () + LAT_INTERVAL_US;
    if (kind == 1) {
      if (last_off < 0)
        continue;
      di = last_disk;
    }
    k = &vm->d[di];
    if (lm->m->kind != K_NONE) {
      prog = job_progress (vm, k, &status);
      if (prog < 0 || g_strcmp0 (status, "running") != 0) {
        /* The backup ended (or failed) by itself: stop measuring. */
        lm->early_end++;
        break;
      }
    }
    if (kind == 1) {
      off = last_off;
      len = 64 * KiB;
    } else {
      off = pick_fresh (p, di, (uint64_t) prog);
      len = kind == 2 ? 64 * KiB : sizes[si];
    }
    if (off < 0)
      break;
    ms = guest_op (vm, kind == 2 ? "r" : "w", k, (uint64_t) off, len, ++p->seed);
    if (trace_ops) {
      double rec[5] = { (double) di, (double) off, (double) len, ms, kind };
      g_array_append_vals (trace_ops, rec, 5);
    }
    if (kind == 0) {
      push (lm->lat[si], ms);
      push (lm->lat_disk[si][k->scsi ? 0 : 1], ms);
      push (repl[si], ms);
      push (lm->lead, (off - prog) / (double) MiB);
      last_off = off;
      last_disk = di;
      fresh++;
    } else {
      push (kind == 1 ? lm->rewrite : lm->read, ms);
    }
    fprintf (raw, "%s\t%d\t%s\t%s\t%s\t%.4f\t%.1f\n", lm->m->name, rep,
             len == 4 * KiB ? "4k" : "64k", k->key,
             kind == 0 ? "fresh" : kind == 1 ? "rewrite" : "read", ms,
             (off - prog) / (double) MiB);
  }
  err = backup_stop (b, TRUE);
  if (err) {
    g_string_append_printf (lm->errors, "rep %d: %s; ", rep, err);
    g_free (err);
  }
  backup_free (b);
  if (!trace_ops)
    for (int s = 0; s < NSIZES; s++) {
      push (lm->rep_p50[s], quantile (repl[s], 0.5));
      push (lm->rep_p99[s], quantile (repl[s], 0.99));
    }
  note ("  %-9s rep %d: %u writes, 64k p50 %.3f p99 %.3f ms, 4k p50 %.3f p99 %.3f ms\n",
        lm->m->name, rep, fresh, quantile (repl[0], 0.5), quantile (repl[0], 0.99),
        quantile (repl[1], 0.5), quantile (repl[1], 0.99));
  for (int s = 0; s < NSIZES; s++)
    g_array_unref (repl[s]);
}

static char *
spread (GArray *a)
{
  g_autoptr (GArray) c = g_array_sized_new (FALSE, FALSE, sizeof (double), a->len);
  g_autofree char *lo = NULL, *hi = NULL;
  g_array_append_vals (c, a->data, a->len);
  if (!c->len)
    return g_strdup ("–");
  g_array_sort (c, cmp_double);
  lo = fmt_ms (g_array_index (c, double, 0));
  hi = fmt_ms (g_array_index (c, double, c->len - 1));
  return g_strdup_printf ("%s – %s", lo, hi);
}

/* ---- the breakdown: where a write's time goes, from QEMU's trace -------- */

static const char *trace_events[] = {
  "blk_co_pwritev", "qcow2_writev_start_req", "qcow2_writev_done_req",
};

static void
trace_set (Vm *vm, gboolean on)
{
  for (size_t i = 0; i < G_N_ELEMENTS (trace_events); i++)
    qmp_ok (vm->own, "trace-event-set-state",
            json_parse ("{\"name\": \"%s\", \"enable\": %s}", trace_events[i],
                        on ? "true" : "false"));
}

typedef struct {
  double t;
  char *name, *args;
} TraceEv;

/* "PID@SECONDS.MICROS:event args" (-msg timestamp=on), from offset on. */
static GArray *
trace_read (Vm *vm, long from)
{
  GArray *evs = g_array_new (FALSE, FALSE, sizeof (TraceEv));
  FILE *f = fopen (vm->trace, "r");
  char line[1024];

  if (!f)
    return evs;
  fseek (f, from, SEEK_SET);
  while (fgets (line, sizeof line, f)) {
    char *at = strchr (line, '@'), *colon, *sp;
    TraceEv e;
    if (!at || !(colon = strchr (at, ':')))
      continue;
    e.t = g_ascii_strtod (at + 1, NULL) * 1000.0;   /* ms */
    sp = strchr (colon + 1, ' ');
    if (!sp)
      continue;
    e.name = g_strndup (colon + 1, (gsize) (sp - colon - 1));
    e.args = g_strdup (g_strstrip (sp + 1));
    g_array_append_val (evs, e);
  }
  fclose (f);
  return evs;
}

static long
file_size (const char *path)
{
  struct stat st;
  return stat (path, &st) == 0 ? (long) st.st_size : 0;
}

static char *
targ (const char *args, const char *key)
{
  g_autofree char *k = g_strdup_printf ("%s ", key);
  const char *s = strstr (args, k);
  if (!s)
    return NULL;
  s += strlen (k);
  return g_strndup (s, strcspn (s, " "));
}

/* Components of one guest write, ms. */
enum { B_GUEST, B_QEMU, B_READ, B_FLEECE, B_NEW, B_OTHER, B_OUTSIDE, NB };
static const char *b_names[NB] = {
  "guest write", "in QEMU", "read old (cbw)", "write fleecing image",
  "write new", "rest in QEMU", "guest + virtio + TCG",
};

/* A guest write enters QEMU at blk_co_pwritev (device BlockBackend); a
 * copy shows as a qcow2 write of the whole 64 KiB cbw cluster at the same
 * guest offset, to the fleecing image, before the source's own qcow2
 * write (only guest writes and cbw copies write qcow2 here: the job
 * writes to NBD).  Read old = from entry to the fleecing write's start.
 * Requests may overlap (QD32): everything is matched by offset and
 * length, and a request's end by its coroutine's next done event.  One
 * disk written at a time (qcow2 events do not name the image). */
typedef struct {
  double t;
  char *co;
  gboolean used;
} Q2Start;

static Q2Start *
q2_take (GHashTable *starts, uint64_t off, uint64_t len, double after, double before)
{
  g_autofree char *key = g_strdup_printf ("0x%" G_GINT64_MODIFIER "x:%" G_GUINT64_FORMAT,
                                          (guint64) off, (guint64) len);
  GArray *l = g_hash_table_lookup (starts, key);

  for (guint i = 0; l && i < l->len; i++) {
    Q2Start *q = &g_array_index (l, Q2Start, i);
    if (!q->used && q->t >= after && q->t <= before) {
      q->used = TRUE;
      return q;
    }
  }
  return NULL;
}

static double
q2_done (GHashTable *dones, const char *co, double after)
{
  GArray *l = co ? g_hash_table_lookup (dones, co) : NULL;
  for (guint i = 0; l && i < l->len; i++)
    if (g_array_index (l, double, i) >= after)
      return g_array_index (l, double, i);
  return -1;
}

static void
q2_free_starts (gpointer p)
{
  GArray *l = p;
  for (guint i = 0; i < l->len; i++)
    g_free (g_array_index (l, Q2Start, i).co);
  g_array_unref (l);
}

/* ops: (disk, offset, length, guest ms, kind) per operation, in order; or
 * NULL: every guest write found in the trace (guest ms unknown: 0). */
static void
breakdown_parse (GArray *evs, GArray *ops, GArray *out[NSIZES][NB], unsigned *matched)
{
  g_autoptr (GHashTable) starts = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, q2_free_starts);
  g_autoptr (GHashTable) dones = g_hash_table_new_full (g_str_hash, g_str_equal, g_free,
                                                         (GDestroyNotify) g_array_unref);
  g_autoptr (GArray) entries = g_array_new (FALSE, FALSE, sizeof (double) * 3);  /* t, off, len */

  for (guint j = 0; j < evs->len; j++) {
    TraceEv *e = &g_array_index (evs, TraceEv, j);
    if (strcmp (e->name, "blk_co_pwritev") == 0) {
      g_autofree char *o = targ (e->args, "offset"), *b = targ (e->args, "bytes");
      double x[3] = { e->t, g_ascii_strtod (o ? o : "0", NULL), g_ascii_strtod (b ? b : "0", NULL) };
      g_array_append_vals (entries, x, 1);
    } else if (strcmp (e->name, "qcow2_writev_start_req") == 0) {
      g_autofree char *o = targ (e->args, "offset"), *b = targ (e->args, "bytes");
      g_autofree char *key = g_strdup_printf ("%s:%s", o, b);
      GArray *l = g_hash_table_lookup (starts, key);
      Q2Start q = { e->t, targ (e->args, "co"), FALSE };
      if (!l) {
        l = g_array_new (FALSE, FALSE, sizeof (Q2Start));
        g_hash_table_insert (starts, g_strdup (key), l);
      }
      g_array_append_val (l, q);
    } else if (strcmp (e->name, "qcow2_writev_done_req") == 0) {
      g_autofree char *co = targ (e->args, "co");
      GArray *l = g_hash_table_lookup (dones, co);
      if (!l) {
        l = g_array_new (FALSE, FALSE, sizeof (double));
        g_hash_table_insert (dones, g_strdup (co), l);
      }
      g_array_append_val (l, e->t);
    }
  }

  /* With ops, walk them in order and take the first entry at each one's
   * offset and length after the previous one's. */
  for (guint i = 0, cursor = 0; i < (ops ? ops->len / 5 : entries->len); i++) {
    double *op = ops ? &g_array_index (ops, double, i * 5) : NULL;
    uint64_t off, len;
    int kind = op ? (int) op[4] : 0;
    double t0 = -1, *ent = NULL;
    Q2Start *f = NULL, *src = NULL;
    double tf1 = -1, ts1;

    if (kind == 2)
      continue;
    if (op) {
      off = (uint64_t) op[1];
      len = (uint64_t) op[2];
      for (guint j = cursor; j < entries->len; j++) {
        double *x = (double *) (entries->data + j * sizeof (double) * 3);
        if ((uint64_t) x[1] == off && (uint64_t) x[2] == len) {
          ent = x;
          cursor = j + 1;
          break;
        }
      }
    } else {
      ent = (double *) (entries->data + i * sizeof (double) * 3);
      off = (uint64_t) ent[1];
      len = (uint64_t) ent[2];
    }
    if (!ent)
      continue;
    t0 = ent[0];
    if ((off % CBW_CLUSTER) == 0 && len == CBW_CLUSTER) {
      /* Same offset and length for the copy and the write: the copy is
       * the first of two, if two start before the source write ends. */
      Q2Start *a = q2_take (starts, off, len, t0, G_MAXDOUBLE);
      if (!a)
        continue;
      {
        /* The next guest write to the same place bounds this one's. */
        double a_end = q2_done (dones, a->co, a->t), next_t0 = G_MAXDOUBLE;
        Q2Start *b;
        for (double *x = ent + 3; (char *) x < entries->data + entries->len * sizeof (double) * 3; x += 3)
          if ((uint64_t) x[1] == off && (uint64_t) x[2] == len) {
            next_t0 = x[0];
            break;
          }
        b = q2_take (starts, off, len, a->t, next_t0);
        if (b && b->t >= (a_end >= 0 ? a_end : a->t)) {
          f = a;
          src = b;
        } else {
          if (b)
            b->used = FALSE;
          src = a;
        }
      }
    } else {
      src = q2_take (starts, off, len, t0, G_MAXDOUBLE);
      if (!src)
        continue;
      f = q2_take (starts, off & ~(CBW_CLUSTER - 1), CBW_CLUSTER, t0, src->t);
    }
    ts1 = q2_done (dones, src->co, src->t);
    if (f)
      tf1 = q2_done (dones, f->co, f->t);
    if (ts1 < 0 || (f && tf1 < 0))
      continue;
    (*matched)++;
    if (kind == 1)
      continue;   /* rewrites: matched, not part of the fresh-write breakdown */
    {
      double v[NB];
      int si = len == 4 * KiB ? S_4K : S_64K;
      v[B_QEMU] = ts1 - t0;
      v[B_GUEST] = op ? op[3] : v[B_QEMU];
      v[B_READ] = f ? f->t - t0 : 0;
      v[B_FLEECE] = f ? tf1 - f->t : 0;
      v[B_NEW] = ts1 - src->t;
      v[B_OTHER] = v[B_QEMU] - v[B_READ] - v[B_FLEECE] - v[B_NEW];
      v[B_OUTSIDE] = v[B_GUEST] - v[B_QEMU];
      for (int b = 0; b < NB; b++)
        push (out[si][b], v[b]);
    }
  }
}

static void
lat_breakdown (Picker *p, GPtrArray *lms, FILE *md)
{
  Vm *vm = p->vm;
  FILE *raw = open_out (opt.out, "guest-breakdown.tsv");
  gboolean header = FALSE;

  fprintf (raw, "mode\trep\tsize\tdisk\tkind\tms\tlead_mib\n");
  for (guint j = 0; j < lms->len; j++) {
    LatMode *lm = lms->pdata[j];
    g_autoptr (GArray) ops = g_array_new (FALSE, FALSE, sizeof (double));
    GArray *out[NSIZES][NB];
    g_autoptr (GArray) evs = NULL;
    long from;
    unsigned matched = 0;

    if (lm->m->kind == K_PLAIN || lm->m->lib_args)
      continue;   /* every write waits for the target: nothing to break down */
    for (int s = 0; s < NSIZES; s++)
      for (int b = 0; b < NB; b++)
        out[s][b] = dbl_array ();
    from = file_size (vm->trace);
    trace_set (vm, TRUE);
    lat_run (p, lm, 99, raw, ops);
    trace_set (vm, FALSE);
    evs = trace_read (vm, from);
    breakdown_parse (evs, ops, out, &matched);
    for (guint e = 0; e < evs->len; e++) {
      g_free (g_array_index (evs, TraceEv, e).name);
      g_free (g_array_index (evs, TraceEv, e).args);
    }
    if (!header) {
      fprintf (md, "Where a fresh write's time goes (p50 in ms, one extra traced run per "
               "mode; QEMU trace events `blk_co_pwritev` and `qcow2_writev_start_req`/"
               "`done_req` with timestamps: *read old* is from the write's entry into the "
               "block layer to the start of the copy's write to the fleecing image, so it "
               "includes cbw's bookkeeping; *guest + virtio + TCG* is the guest-measured "
               "latency minus the time in QEMU's block layer):\n\n| mode | size | writes |");
      for (int b = 0; b < NB; b++)
        fprintf (md, " %s |", b_names[b]);
      fprintf (md, "\n|---|---|---|");
      for (int b = 0; b < NB; b++)
        fprintf (md, "---|");
      fprintf (md, "\n");
      header = TRUE;
    }
    for (int s = 0; s < NSIZES; s++) {
      fprintf (md, "| %s | %s | %u |", lm->m->name, size_names[s], out[s][0]->len);
      for (int b = 0; b < NB; b++)
        fprintf (md, " %.3f |", quantile (out[s][b], 0.5));
      fprintf (md, "\n");
    }
    note ("  breakdown %s: %u of %u operations matched in the trace\n", lm->m->name, matched,
          ops->len / 5);
    for (int s = 0; s < NSIZES; s++)
      for (int b = 0; b < NB; b++)
        g_array_unref (out[s][b]);
  }
  if (header)
    fprintf (md, "\n");
  fclose (raw);
}

static void
sec_latency (void)
{
  Vm *vm = vm_new ("lat");
  g_autoptr (GPtrArray) lms = g_ptr_array_new ();
  Picker p = { vm };
  FILE *raw, *md;
  LatMode *floor_m = NULL, *lib = NULL, *plain = NULL, *pve = NULL;
  double load0 = loadavg1 ();

  note ("guest latency: %d reps × %zu modes × %.0f s\n", opt.reps,
        (size_t) g_strv_length (opt.modes), opt.secs);
  vm_add_disk (vm, "scsi0", TRUE, LAT_DISK, LAT_DISK);
  vm_add_disk (vm, "virtio0", FALSE, LAT_DISK, LAT_DISK);
  vm_start_target (vm, LAT_TARGET_BPS);
  vm_start (vm, TRUE);
  p.rand = g_rand_new_with_seed (16);
  for (char **m = opt.modes; *m; m++) {
    LatMode *lm = g_new0 (LatMode, 1);
    lm->m = mode_by_name (*m);
    for (int s = 0; s < NSIZES; s++) {
      lm->lat[s] = dbl_array ();
      lm->lat_disk[s][0] = dbl_array ();
      lm->lat_disk[s][1] = dbl_array ();
      lm->rep_p50[s] = dbl_array ();
      lm->rep_p99[s] = dbl_array ();
    }
    lm->rewrite = dbl_array ();
    lm->read = dbl_array ();
    lm->lead = dbl_array ();
    lm->errors = g_string_new (NULL);
    g_ptr_array_add (lms, lm);
    if (lm->m->kind == K_NONE)
      floor_m = lm;
    if (strcmp (lm->m->name, "lib") == 0)
      lib = lm;
    if (strcmp (lm->m->name, "plain") == 0)
      plain = lm;
    if (strcmp (lm->m->name, "pve") == 0)
      pve = lm;
  }
  /* Warm up: the guest's first writes and QEMU's first requests. */
  for (int i = 0; i < 20; i++)
    guest_op (vm, "w", &vm->d[i % vm->n], (uint64_t) i * CBW_CLUSTER, 64 * KiB, 1);

  raw = open_out (opt.out, "guest-latency.tsv");
  fprintf (raw, "mode\trep\tsize\tdisk\tkind\tms\tlead_mib\n");
  for (int rep = 0; rep < opt.reps; rep++)
    for (guint j = 0; j < lms->len; j++)
      lat_run (&p, lms->pdata[(j + (guint) rep) % lms->len], rep, raw, NULL);
  fclose (raw);

  /* ---- report ---- */
  for (guint j = 0; j < lms->len; j++) {
    LatMode *lm = lms->pdata[j];
    for (int s = 0; s < NSIZES; s++) {
      g_autofree char *name = g_strdup_printf ("guest-lat-%s-%s.dat", lm->m->name, size_names[s]);
      write_cdf (name, lm->lat[s]);
    }
  }
  md = open_out (opt.out, "guest-latency.md");
  fprintf (md, "Guest: %s, QEMU %s, accelerator **%s**, sources aio=%s; two disks "
           "(virtio-scsi-single `scsi0`, virtio-blk `virtio0`) of %llu MiB holding data, "
           "backed up over NBD to qemu-storage-daemon throttled to %llu MiB/s (both "
           "exports share the limit). The probe writes with O_DIRECT at QD1, 64 KiB and "
           "4 KiB in turn and the disks in turn, one write every %d ms, each to a 64 KiB "
           "cluster not written before in that run, %llu–%llu MiB ahead of its job's "
           "progress; latency is the guest's `pwrite()` (CLOCK_MONOTONIC). %d runs of %.0f s "
           "per mode, interleaved; load average %.2f at the start, %.2f at the end.\n\n",
           vm->kernel ? vm->kernel : "?", qmp_qemu_version (vm->own), vm->accel, vm->aio,
           (unsigned long long) (LAT_DISK / MiB), (unsigned long long) (LAT_TARGET_BPS / MiB),
           LAT_INTERVAL_US / 1000, (unsigned long long) (LAT_LEAD_MIN / MiB),
           (unsigned long long) (LAT_LEAD_MAX / MiB), opt.reps, opt.secs, load0, loadavg1 ());
  fprintf (md, "| mode | size | writes | p50 | p90 | p99 | max | p50 / floor | p99 / floor | "
           "per-run p50 | per-run p99 |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (int s = 0; s < NSIZES; s++)
    for (guint j = 0; j < lms->len; j++) {
      LatMode *lm = lms->pdata[j];
      double p50 = quantile (lm->lat[s], 0.5), p99 = quantile (lm->lat[s], 0.99);
      double f50 = floor_m ? quantile (floor_m->lat[s], 0.5) : 0;
      double f99 = floor_m ? quantile (floor_m->lat[s], 0.99) : 0;
      g_autofree char *a = fmt_ms (p50), *b = fmt_ms (quantile (lm->lat[s], 0.9));
      g_autofree char *c = fmt_ms (p99), *d = fmt_ms (quantile (lm->lat[s], 1.0));
      g_autofree char *e = spread (lm->rep_p50[s]), *f = spread (lm->rep_p99[s]);
      fprintf (md, "| %s | %s | %u | %s | %s | %s | %s | %.2f× | %.2f× | %s | %s |\n",
               lm->m->name, size_names[s], lm->lat[s]->len, a, b, c, d,
               f50 > 0 ? p50 / f50 : 0, f99 > 0 ? p99 / f99 : 0, e, f);
    }
  fprintf (md, "\nPer bus (p50 / p99):\n\n| mode | 64k scsi0 | 64k virtio0 | 4k scsi0 | "
           "4k virtio0 | rewrite 64k (p50 / p99) | read 64k (p50 / p99) | errors |\n"
           "|---|---|---|---|---|---|---|---|\n");
  for (guint j = 0; j < lms->len; j++) {
    LatMode *lm = lms->pdata[j];
    fprintf (md, "| %s ", lm->m->name);
    for (int s = 0; s < NSIZES; s++)
      for (int d = 0; d < 2; d++)
        fprintf (md, "| %.3f / %.3f ", quantile (lm->lat_disk[s][d], 0.5),
                 quantile (lm->lat_disk[s][d], 0.99));
    fprintf (md, "| %.3f / %.3f | %.3f / %.3f | %s%s |\n", quantile (lm->rewrite, 0.5),
             quantile (lm->rewrite, 0.99), quantile (lm->read, 0.5), quantile (lm->read, 0.99),
             lm->errors->len ? lm->errors->str : "none",
             lm->early_end ? " (backup ended early)" : "");
  }
  fprintf (md, "\nModes:\n\n");
  for (guint j = 0; j < lms->len; j++) {
    LatMode *lm = lms->pdata[j];
    fprintf (md, "- `%s`: %s\n", lm->m->name, lm->m->desc);
  }
  fprintf (md, "\n");
  if (floor_m && lib) {
    fprintf (md, "Goals (libfleece = `lib`, same run):\n\n| goal | 64 KiB | 4 KiB |\n|---|---|---|\n");
    fprintf (md, "| p50 ≤ 1.1× floor ");
    for (int s = 0; s < NSIZES; s++) {
      double r = quantile (lib->lat[s], 0.5) / quantile (floor_m->lat[s], 0.5);
      fprintf (md, "| %s (%.2f×) ", r <= 1.1 ? "met" : "**missed**", r);
    }
    fprintf (md, "|\n| p99 ≤ 1.1× floor ");
    for (int s = 0; s < NSIZES; s++) {
      double r = quantile (lib->lat[s], 0.99) / quantile (floor_m->lat[s], 0.99);
      fprintf (md, "| %s (%.2f×) ", r <= 1.1 ? "met" : "**missed**", r);
    }
    fprintf (md, "|\n");
    if (plain) {
      fprintf (md, "| p99 ≥ 100× below no fleecing ");
      for (int s = 0; s < NSIZES; s++) {
        double r = quantile (plain->lat[s], 0.99) / quantile (lib->lat[s], 0.99);
        fprintf (md, "| %s (%.0f×) ", r >= 100 ? "met" : "**missed**", r);
      }
      fprintf (md, "|\n");
    }
    if (pve) {
      fprintf (md, "| p99 ≥ 3× better than Proxmox's default ");
      for (int s = 0; s < NSIZES; s++) {
        double r = quantile (pve->lat[s], 0.99) / quantile (lib->lat[s], 0.99);
        fprintf (md, "| %s (%.2f×) ", r >= 3 ? "met" : "**missed**", r);
      }
      fprintf (md, "|\n");
    }
    fprintf (md, "\n");
  }
  lat_breakdown (&p, lms, md);
  fclose (md);
  {
    FILE *f = open_out (opt.out, "guest-latency-modes");
    for (guint j = 0; j < lms->len; j++)
      fprintf (f, "%s ", ((LatMode *) lms->pdata[j])->m->name);
    fprintf (f, "\n");
    fclose (f);
  }
  {
    FILE *f = open_out (opt.out, "guest-meta");
    fprintf (f, "accel=%s\nkernel=%s\nqemu=%s\naio=%s\n", vm->accel, vm->kernel ? vm->kernel : "?",
             qmp_qemu_version (vm->own), vm->aio);
    fclose (f);
  }
  vm_free (vm);
}

/* ---- 2: throughput during a backup to a fast target -------------------------- */

#define TP_DISK (2 * GiB)

typedef struct {
  const char *id;
  const char *name;
  uint64_t bs;
  const char *pattern;
  unsigned qd;
} Workload;

static const Workload workloads_all[] = {
  { "seq1", "seq 64k QD1", 64 * KiB, "seq", 1 },
  { "seq32", "seq 64k QD32", 64 * KiB, "seq", 32 },
  { "rand1", "rand 4k QD1", 4 * KiB, "rand", 1 },
  { "rand32", "rand 4k QD32", 4 * KiB, "rand", 32 },
};
static const Workload *workloads[G_N_ELEMENTS (workloads_all)];
static size_t n_workloads;

typedef struct {
  double mibs, iops, p50, p99, cpu, job_mib;
  gboolean early;
} TpResult;

static double
proc_cpu_s (pid_t pid)
{
  g_autofree char *path = g_strdup_printf ("/proc/%d/stat", pid);
  g_autofree char *st = slurp (path);
  const char *p = strrchr (st, ')');
  unsigned long long ut = 0, stt = 0;

  /* Fields after the command: state is 3rd, utime 14th, stime 15th. */
  if (p && sscanf (p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &stt) == 2)
    return (ut + stt) / (double) sysconf (_SC_CLK_TCK);
  return 0;
}

static TpResult
tp_run (Vm *vm, const Mode *m, const Workload *w, uint64_t bwlimit, double secs)
{
  TpResult r = { 0 };
  Backup *b = backup_start (vm, m, bwlimit, 0, NULL);
  double cpu0 = proc_cpu_s (vm->qemu);
  int64_t prog0 = m->kind != K_NONE ? job_progress (vm, &vm->d[0], NULL) : 0;
  g_autoptr (GPtrArray) l = ctl_cmd (vm, secs + 120,
                                     "run dev=%s bs=%" G_GUINT64_FORMAT " pattern=%s qd=%u secs=%.0f seed=%d",
                                     vm->d[0].gdev, w->bs, w->pattern, w->qd, secs, g_random_int_range (1, 1 << 30));
  const char *last = ctl_last (l);
  char *err;

  r.cpu = proc_cpu_s (vm->qemu) - cpu0;
  if (m->kind != K_NONE) {
    g_autofree char *status = NULL;
    int64_t prog1 = job_progress (vm, &vm->d[0], &status);
    r.early = prog1 < 0 || g_strcmp0 (status, "running") != 0;
    r.job_mib = prog1 >= 0 ? (prog1 - prog0) / (double) MiB / secs : 0;
  }
  err = backup_stop (b, TRUE);
  if (err)
    note ("  %s: backup error: %s\n", m->name, err);
  g_free (err);
  backup_free (b);
  if (!g_str_has_prefix (last, "ok"))
    die ("guest run: %s", last);
  {
    double ns = (double) kv_u64 (last, "ns");
    r.mibs = kv_u64 (last, "bytes") / (double) MiB / (ns / 1e9);
    r.iops = kv_u64 (last, "ios") / (ns / 1e9);
  }
  for (guint i = 0; i < l->len; i++) {
    const char *x = l->pdata[i];
    double q;
    unsigned long long v;
    if (sscanf (x, "q %lf %llu", &q, &v) == 2) {
      if (q == 0.5)
        r.p50 = v / 1e6;
      if (q == 0.99)
        r.p99 = v / 1e6;
    }
  }
  note ("  %-18s %-6s %8.1f MiB/s %9.0f IOPS  p50 %.3f p99 %.3f ms, QEMU CPU %.1f s%s\n",
        w->name, m->name, r.mibs, r.iops, r.p50, r.p99, r.cpu, r.early ? " (backup ended early)" : "");
  return r;
}

static int
tp_cmp (const void *a, const void *b)
{
  double x = ((const TpResult *) a)->mibs, y = ((const TpResult *) b)->mibs;
  return (x > y) - (x < y);
}

static void
sec_throughput (void)
{
  Vm *vm = vm_new ("tp");
  guint nm = g_strv_length (opt.tp_modes);
  g_autofree TpResult *res = g_new0 (TpResult, n_workloads * nm);
  /* Every repetition; res gets the median one's (by MiB/s), lo/hi the spread. */
  size_t reps = (size_t) MAX (opt.tp_reps, 1);
  g_autofree TpResult *all = g_new0 (TpResult, n_workloads * nm * reps);
  g_autofree double *lo = g_new0 (double, n_workloads * nm);
  g_autofree double *hi = g_new0 (double, n_workloads * nm);
  /* Both drives' jobs must outlast the measurement: the job's speed is
   * limited so it copies the disk in about tp_secs + 15 s. */
  uint64_t bwlimit = (uint64_t) (TP_DISK / (opt.tp_secs + 15));
  double load0 = loadavg1 ();
  FILE *md;

  bwlimit -= bwlimit % KiB;
  note ("guest throughput: %zu workloads × %u modes × %.0f s\n", n_workloads, nm,
        opt.tp_secs);
  vm_add_disk (vm, "scsi0", TRUE, TP_DISK, TP_DISK);
  vm_add_disk (vm, "virtio0", FALSE, TP_DISK, TP_DISK);
  vm_start_target (vm, 0);
  vm_start (vm, TRUE);
  /* Rotated per workload and repetition, so no mode always runs first. */
  for (size_t rep = 0; rep < reps; rep++)
    for (size_t w = 0; w < n_workloads; w++)
      for (guint j = 0; j < nm; j++) {
        guint mi = (j + (guint) w + (guint) rep) % nm;

        all[(w * nm + mi) * reps + rep] =
          tp_run (vm, mode_by_name (opt.tp_modes[mi]), workloads[w], bwlimit, opt.tp_secs);
      }
  for (size_t at = 0; at < n_workloads * nm; at++) {
    TpResult *r = &all[at * reps];

    qsort (r, reps, sizeof *r, tp_cmp);
    res[at] = r[(reps - 1) / 2];
    if (reps % 2 == 0)
      res[at].mibs = (r[reps / 2 - 1].mibs + r[reps / 2].mibs) / 2;
    lo[at] = r[0].mibs;
    hi[at] = r[reps - 1].mibs;
  }
  md = open_out (opt.out, "guest-throughput.md");
  fprintf (md, "Guest: %s, QEMU %s, accelerator **%s**. The probe writes to `scsi0` "
           "(virtio-scsi-single, qcow2 of %llu MiB holding data) with O_DIRECT for %.0f s per "
           "workload (QD32: Linux AIO, one thread), while both drives are backed up over NBD "
           "to an unthrottled qemu-storage-daemon export; the jobs are limited to %.0f MiB/s "
           "each so that they outlast the measurement (a longer disk's backup at full speed). "
           "Modes interleaved; load average %.2f at the start, %.2f at the end. *job* is the "
           "scsi0 job's progress during the measurement; *QEMU CPU* the QEMU process's CPU "
           "time in that window.\n\n",
           vm->kernel ? vm->kernel : "?", qmp_qemu_version (vm->own), vm->accel,
           (unsigned long long) (TP_DISK / MiB), opt.tp_secs, bwlimit / (double) MiB, load0,
           loadavg1 ());
  fprintf (md, "%zu repetitions: *MiB/s* is their median, with their range; the other "
           "columns are from the median repetition (the lower of the middle two).\n\n", reps);
  fprintf (md, "| workload | mode | MiB/s | range | IOPS | vs none | p50 | p99 | job MiB/s | QEMU CPU s |\n"
           "|---|---|---|---|---|---|---|---|---|---|\n");
  for (size_t w = 0; w < n_workloads; w++) {
    TpResult *none = NULL;
    for (guint j = 0; j < nm; j++)
      if (strcmp (opt.tp_modes[j], "none") == 0)
        none = &res[w * nm + j];
    for (guint j = 0; j < nm; j++) {
      TpResult *r = &res[w * nm + j];
      g_autofree char *a = fmt_ms (r->p50), *b = fmt_ms (r->p99);
      fprintf (md, "| %s | %s | %.1f | %.1f–%.1f | %.0f | %s%.0f%%%s | %s | %s | %.1f | %.1f |\n",
               workloads[w]->name, opt.tp_modes[j], r->mibs, lo[w * nm + j], hi[w * nm + j], r->iops,
               none && r != none && r->mibs < 0.9 * none->mibs ? "**" : "",
               none ? 100 * r->mibs / none->mibs : 0,
               none && r != none && r->mibs < 0.9 * none->mibs ? "**" : "", a, b,
               r->job_mib, r->cpu);
    }
  }
  fprintf (md, "\nGoal: throughput during a backup ≥ 90%% of no backup (bold: missed).\n\n");

  /* Where the goal is missed: one traced run each of the floor and of
   * the library, to see which part of a write grew. */
  {
    gboolean header = FALSE;
    for (size_t w = 0; w < n_workloads; w++) {
      TpResult *none = NULL, *lib = NULL;
      for (guint j = 0; j < nm; j++) {
        if (strcmp (opt.tp_modes[j], "none") == 0)
          none = &res[w * nm + j];
        if (strcmp (opt.tp_modes[j], "lib") == 0)
          lib = &res[w * nm + j];
      }
      if (!none || !lib || lib->mibs >= 0.9 * none->mibs)
        continue;
      for (int t = 0; t < 2; t++) {
        const Mode *m = mode_by_name (t ? "lib" : "none");
        GArray *out[NSIZES][NB];
        g_autoptr (GArray) evs = NULL;
        long from = file_size (vm->trace);
        unsigned matched = 0;
        int si = workloads[w]->bs == 4 * KiB ? S_4K : S_64K;
        TpResult r;

        for (int s = 0; s < NSIZES; s++)
          for (int b = 0; b < NB; b++)
            out[s][b] = dbl_array ();
        trace_set (vm, TRUE);
        r = tp_run (vm, m, workloads[w], bwlimit, MIN (opt.tp_secs, 8));
        trace_set (vm, FALSE);
        evs = trace_read (vm, from);
        breakdown_parse (evs, NULL, out, &matched);
        for (guint e = 0; e < evs->len; e++) {
          g_free (g_array_index (evs, TraceEv, e).name);
          g_free (g_array_index (evs, TraceEv, e).args);
        }
        if (!header) {
          fprintf (md, "Where a write's time goes where the goal was missed (one traced run "
                   "of %.0f s per mode; QEMU trace events as in the latency section; mean / "
                   "p50 in ms per write inside QEMU's block layer; writes that copied: "
                   "those with a *read old* part):\n\n| workload | mode | MiB/s (traced) | "
                   "writes | copied |", MIN (opt.tp_secs, 8));
          for (int b = B_QEMU; b < B_OUTSIDE; b++)
            fprintf (md, " %s |", b_names[b]);
          fprintf (md, "\n|---|---|---|---|---|");
          for (int b = B_QEMU; b < B_OUTSIDE; b++)
            fprintf (md, "---|");
          fprintf (md, "\n");
          header = TRUE;
        }
        {
          unsigned copied = 0;
          for (guint x = 0; x < out[si][B_READ]->len; x++)
            copied += g_array_index (out[si][B_READ], double, x) > 0;
          fprintf (md, "| %s | %s | %.1f | %u | %u |", workloads[w]->name, m->name, r.mibs,
                   out[si][B_QEMU]->len, copied);
        }
        for (int b = B_QEMU; b < B_OUTSIDE; b++) {
          double sum = 0;
          for (guint x = 0; x < out[si][b]->len; x++)
            sum += g_array_index (out[si][b], double, x);
          fprintf (md, " %.3f / %.3f |", out[si][b]->len ? sum / out[si][b]->len : 0,
                   quantile (out[si][b], 0.5));
        }
        fprintf (md, "\n");
        note ("  breakdown %s %s: %u writes matched\n", workloads[w]->name, m->name, matched);
        for (int s = 0; s < NSIZES; s++)
          for (int b = 0; b < NB; b++)
            g_array_unref (out[s][b]);
      }
    }
    if (header)
      fprintf (md, "\n");
  }
  fclose (md);
  vm_free (vm);
}

/* ---- 3: a fleecing storage slower than the guest's writes ------------------- */

#define SLOW_DISK (256 * MiB)
#define SLOW_DELAY_MS 10000
#define SLOW_CBW_TIMEOUT 3
#define SLOW_WRITES 12

static void
sec_slow (void)
{
  Vm *vm = vm_new ("slow");
  g_autofree char *back = g_strdup_printf ("%s/slow-backing", vm->dir);
  g_autofree char *mnt = g_strdup_printf ("%s/slow-fleecing", vm->dir);
  g_autofree char *log = g_strdup_printf ("%s/slowfs.log", vm->dir);
  g_autofree char *delay = g_strdup_printf ("%d", SLOW_DELAY_MS);
  const char *argv[] = { opt.slowfs, back, mnt, delay, NULL };
  g_autoptr (GArray) lat = dbl_array ();
  g_autoptr (GArray) ops = g_array_new (FALSE, FALSE, sizeof (uint64_t) * 3);
  Picker p = { vm };
  Backup *b;
  pid_t fs;
  gint64 t_slow, t_end;
  uint64_t bad = 0;
  FILE *md;
  char *err;
  json_object *res = NULL;

  note ("guest slow fleecing storage: writes wait %d s, cbw-timeout %d s\n",
        SLOW_DELAY_MS / 1000, SLOW_CBW_TIMEOUT);
  if (!opt.slowfs || access ("/dev/fuse", R_OK | W_OK) != 0) {
    md = open_out (opt.out, "guest-slow.md");
    fprintf (md, "Not run: %s.\n\n", opt.slowfs ? "no /dev/fuse" : "no slowfs (libfuse3-dev)");
    fclose (md);
    vm_free (vm);
    return;
  }
  vm_add_disk (vm, "scsi0", TRUE, SLOW_DISK, SLOW_DISK);
  vm_add_disk (vm, "virtio0", FALSE, SLOW_DISK, SLOW_DISK);
  vm_start_target (vm, LAT_TARGET_BPS);
  vm_start (vm, TRUE);
  g_mkdir_with_parents (back, 0700);
  g_mkdir_with_parents (mnt, 0700);
  fs = spawn_logged ((char *const *) argv, log);
  for (int i = 0; i < 100; i++) {
    g_autofree char *mounts = slurp ("/proc/self/mounts");
    if (strstr (mounts, mnt))
      break;
    g_usleep (50000);
  }
  p.rand = g_rand_new_with_seed (3);
  picker_reset (&p);

  /* Fast while the library creates and formats the images, slow once the
   * backup runs. */
  b = backup_start (vm, mode_by_name ("lib"), 0, SLOW_CBW_TIMEOUT, mnt);
  kill (fs, SIGUSR1);
  t_slow = now_us ();
  for (int n = 0; n < SLOW_WRITES; n++) {
    Disk *k = &vm->d[n % vm->n];
    int64_t prog = job_progress (vm, k, NULL), off;
    uint64_t rec[3];
    double ms;
    off = pick_fresh (&p, (size_t) n % vm->n, (uint64_t) MAX (prog, 0));
    ms = guest_op (vm, "w", k, (uint64_t) off, 64 * KiB, ++p.seed);
    push (lat, ms);
    rec[0] = (uint64_t) n % vm->n;
    rec[1] = (uint64_t) off;
    rec[2] = p.seed;
    g_array_append_vals (ops, rec, 1);
    note ("  write %d (%s at %" G_GINT64_FORMAT " MiB): %.1f ms\n", n, k->key, off / (gint64) MiB, ms);
    g_usleep (100000);
  }
  /* The backup fails on its own: wait for the command to end. */
  g_mutex_lock (&b->lock);
  {
    gint64 deadline = g_get_monotonic_time () + 120 * G_USEC_PER_SEC;
    while (!b->result && !b->exited)
      if (!g_cond_wait_until (&b->cond, &b->lock, deadline))
        break;
  }
  g_mutex_unlock (&b->lock);
  t_end = now_us ();
  err = backup_stop (b, FALSE);
  if (b->result)
    res = json_tokener_parse (b->result);
  kill (fs, SIGUSR2);
  /* The guest's data: every write reads back as written. */
  for (guint i = 0; i < ops->len; i++) {
    uint64_t *rec = (uint64_t *) (ops->data + i * sizeof (uint64_t) * 3);
    g_autoptr (GPtrArray) l = ctl_cmd (vm, 60, "v dev=%s off=%" G_GUINT64_FORMAT " len=%llu seed=%" G_GUINT64_FORMAT,
                                       vm->d[rec[0]].gdev, rec[1], 64 * KiB, rec[2]);
    if (!g_str_has_prefix (ctl_last (l), "ok"))
      die ("verify: %s", ctl_last (l));
    bad += kv_u64 (ctl_last (l), "bad");
  }
  md = open_out (opt.out, "guest-slow.md");
  {
    g_autoptr (GArray) in_order = g_array_copy (lat);   /* quantile() sorts */
    unsigned stalls = 0;
    g_autofree char *mx = fmt_ms (quantile (lat, 1.0)), *md50 = fmt_ms (quantile (lat, 0.5));
    for (guint i = 0; i < lat->len; i++)
      stalls += g_array_index (lat, double, i) > 1000;
    fprintf (md, "The library's directory storage on a FUSE pass-through file system "
             "(`bench/guest/slowfs`) whose writes, once the backup runs, each take %d s; "
             "`fleece backup --cbw-timeout %d`, target throttled to %llu MiB/s; QEMU %s, "
             "accelerator **%s**. The guest writes %d × 64 KiB (O_DIRECT, QD1) to fresh "
             "clusters ahead of the jobs, on both disks.\n\n",
             SLOW_DELAY_MS / 1000, SLOW_CBW_TIMEOUT, (unsigned long long) (LAT_TARGET_BPS / MiB),
             qmp_qemu_version (vm->own), vm->accel, SLOW_WRITES);
    fprintf (md, "| what | result |\n|---|---|\n");
    fprintf (md, "| guest writes that stalled (> 1 s) | %u of %u (one per drive expected: "
             "the first copy times out, the snapshot breaks, later writes are not copied) |\n",
             stalls, lat->len);
    fprintf (md, "| longest guest write | %s (bound: cbw-timeout %d s; the storage would "
             "have taken %d s) |\n", mx, SLOW_CBW_TIMEOUT, SLOW_DELAY_MS / 1000);
    fprintf (md, "| median guest write | %s |\n", md50);
    fprintf (md, "| guest writes: ms, in order | ");
    for (guint i = 0; i < in_order->len; i++)
      fprintf (md, "%s%.0f", i ? ", " : "", g_array_index (in_order, double, i));
    fprintf (md, " |\n");
    fprintf (md, "| backup | %s, exit status %d, %.1f s after the storage turned slow |\n",
             res ? jstr (res, "result") : "no result", b->status, (t_end - t_slow) / 1e6);
    fprintf (md, "| error reported | %s |\n", res && jstr (res, "error") ? jstr (res, "error") : "none");
    fprintf (md, "| cleanup | %s |\n", res ? jstr (res, "cleanup") : "?");
    fprintf (md, "| guest data read back | %s (%u writes, %" G_GUINT64_FORMAT " bad 4 KiB blocks) |\n",
             bad == 0 ? "intact" : "**corrupt**", ops->len, bad);
    {
      /* What the default cbw-timeout (45 s) would meet in this guest. */
      g_autoptr (GPtrArray) l = ctl_cmd (vm, 30, "sh cat /sys/block/%s/device/timeout",
                                         vm->d[0].gdev + 5);
      const char *t = l->len >= 2 ? (const char *) l->pdata[0] : "| ?";
      fprintf (md, "| the guest's SCSI command timeout (`/sys/block/%s/device/timeout`) | %s s |\n\n",
               vm->d[0].gdev + 5, t + 2);
    }
  }
  fclose (md);
  g_free (err);
  if (res)
    json_object_put (res);
  backup_free (b);
  stop_pid (fs);
  /* A FUSE daemon killed hard leaves a dead mount behind. */
  {
    g_autofree char *mounts = slurp ("/proc/self/mounts");
    if (strstr (mounts, mnt)) {
      const char *um[] = { "umount", "-l", mnt, NULL };
      run_argv (um);
    }
  }
  vm_free (vm);
}

/* ---- 4: scale ----------------------------------------------------------------- */

#define SCALE_DRIVES 64

/* The "time" of the first event named name in the command's output. */
static double
event_time (const char *events, const char *name)
{
  g_auto (GStrv) lines = g_strsplit (events, "\n", -1);
  for (char **l = lines; *l; l++) {
    json_object *o = json_tokener_parse (*l);
    double t = -1;
    if (o && g_strcmp0 (jstr (o, "event"), name) == 0) {
      json_object *v;
      if (json_object_object_get_ex (o, "time", &v))
        t = json_object_get_double (v);
    }
    if (o)
      json_object_put (o);
    if (t >= 0)
      return t;
  }
  return -1;
}

/* Until the backup ends by itself or timeout_s: TRUE if it ended. */
static gboolean
backup_wait (Backup *b, double timeout_s)
{
  gint64 deadline = now_us () + (gint64) (timeout_s * G_USEC_PER_SEC);

  if (b->m->kind == K_LIB) {
    gboolean done;
    g_mutex_lock (&b->lock);
    while (!b->result && !b->exited)
      if (!g_cond_wait_until (&b->cond, &b->lock, g_get_monotonic_time () + (deadline - now_us ())))
        break;
    done = b->result != NULL;
    g_mutex_unlock (&b->lock);
    return done;
  }
  for (;;) {
    g_autofree char *status = NULL;
    int64_t p = job_progress (b->vm, &b->vm->d[b->only >= 0 ? b->only : 0], &status);
    if (p < 0 || g_strcmp0 (status, "concluded") == 0)
      return TRUE;
    if (now_us () > deadline)
      return FALSE;
    g_usleep (50000);
  }
}

static char *
fmt_s (double s)
{
  return s >= 10 ? g_strdup_printf ("%.1f s", s) : g_strdup_printf ("%.2f s", s);
}

static void
scale_control (FILE *md)
{
  static const uint64_t sz[2] = { 1 * GiB, 1024 * GiB };
  Vm *vms[2];
  GArray *started[2], *attach[2], *stop[2], *pause[2];
  int reps = opt.quick ? 1 : 3;

  for (int v = 0; v < 2; v++) {
    vms[v] = vm_new (v ? "scale-t" : "scale-g");
    vms[v]->null_target = TRUE;
    for (int i = 0; i < SCALE_DRIVES; i++) {
      g_autofree char *key = g_strdup_printf ("scsi%d", i);
      vm_add_disk (vms[v], key, TRUE, sz[v], 0);
    }
    vm_start_target (vms[v], 0);
    /* The guest booted and idle: the library stops and continues its
     * vCPUs around the filters, so the pause shows (QEMU's STOP/RESUME). */
    vm_start (vms[v], TRUE);
    started[v] = dbl_array ();
    attach[v] = dbl_array ();
    stop[v] = dbl_array ();
    pause[v] = dbl_array ();
  }
  for (int rep = 0; rep < reps; rep++)
    for (int j = 0; j < 2; j++) {
      int v = (j + rep) % 2;
      gint64 t0;
      Backup *b;
      t0 = now_us ();
      b = backup_start (vms[v], mode_by_name ("lib"), 0, 0, NULL);
      double ts = (now_us () - t0) / 1e6, tp = event_time (b->events->str, "plan");
      double tpause = vm_last_pause (vms[v]);
      double tst = event_time (b->events->str, "started");
      gint64 t1 = now_us ();
      g_autofree char *err = backup_stop (b, TRUE);
      double tstop = (now_us () - t1) / 1e6;
      push (started[v], ts);
      push (attach[v], tst - tp);
      push (stop[v], tstop);
      push (pause[v], tpause);
      note ("  %d × %s: started after %.2f s (plan → started %.2f s, vCPUs paused %.2f s), "
            "cancel + cleanup %.2f s%s%s\n", SCALE_DRIVES, v ? "1 TiB" : "1 GiB", ts, tst - tp,
            tpause, tstop, err ? ": " : "", err ? err : "");
      backup_free (b);
    }
  fprintf (md, "**Control plane**: `fleece backup` of %d drives (virtio-scsi-single, a controller "
           "each behind PCI bridges, sparse "
           "qcow2 sources, NBD exports of qemu-storage-daemon's `null-co` as targets), "
           "SIGTERM as soon as it reports `started`; %d runs per size, interleaved, median "
           "(min – max). *to started*: process start to the `started` event (connect, plan, "
           "images, attach, start); *plan → started*: attach + start alone; *cancel + "
           "cleanup*: SIGTERM to exit; *vCPUs paused*: QEMU's STOP to RESUME events (the "
           "library stops the vCPUs while it inserts the filters).\n\n| virtual size | to "
           "started | plan → started | vCPUs paused | cancel + cleanup |\n|---|---|---|---|---|\n",
           SCALE_DRIVES, reps);
  for (int v = 0; v < 2; v++) {
    g_autofree char *a = fmt_s (quantile (started[v], 0.5)), *b = fmt_s (quantile (attach[v], 0.5));
    g_autofree char *c = fmt_s (quantile (stop[v], 0.5));
    g_autofree char *a0 = fmt_s (quantile (started[v], 0)), *a1 = fmt_s (quantile (started[v], 1));
    g_autofree char *b0 = fmt_s (quantile (attach[v], 0)), *b1 = fmt_s (quantile (attach[v], 1));
    g_autofree char *c0 = fmt_s (quantile (stop[v], 0)), *c1 = fmt_s (quantile (stop[v], 1));
    g_autofree char *d = fmt_s (quantile (pause[v], 0.5)), *d0 = fmt_s (quantile (pause[v], 0));
    g_autofree char *d1 = fmt_s (quantile (pause[v], 1));
    fprintf (md, "| %d × %s | %s (%s – %s) | %s (%s – %s) | %s (%s – %s) | %s (%s – %s) |\n",
             SCALE_DRIVES, v ? "1 TiB" : "1 GiB", a, a0, a1, b, b0, b1, d, d0, d1, c, c0, c1);
  }
  fprintf (md, "\n");
  for (int v = 0; v < 2; v++) {
    vm_free (vms[v]);
    g_array_unref (started[v]);
    g_array_unref (attach[v]);
    g_array_unref (stop[v]);
    g_array_unref (pause[v]);
  }
}

typedef struct {
  double secs;          /* to the end, or extrapolated from progress */
  gboolean done;
  double frac;          /* progress when stopped */
  uint64_t alloc;       /* target file's allocated bytes (dir targets) */
  char *err;
} DataRun;

static DataRun
data_run (Vm *vm, const Mode *m, int disk, const char *tdir, const char *tfmt, double cap_s)
{
  DataRun r = { 0 };
  gint64 t0 = now_us ();
  Backup *b = backup_start_ex (vm, m, 0, 0, NULL, disk, tdir, tfmt);
  int64_t prog = 0;

  r.done = backup_wait (b, cap_s);
  r.secs = (now_us () - t0) / 1e6;
  if (!r.done) {
    int64_t total = job_total (vm, &vm->d[disk]);
    prog = job_progress (vm, &vm->d[disk], NULL);
    r.frac = prog > 0 && total > 0 ? prog / (double) total : 0;
  } else {
    r.frac = 1;
  }
  if (tdir) {
    g_autofree char *path = g_strdup_printf ("%s/%s.%s", tdir, vm->d[disk].key, tfmt);
    r.alloc = allocated_bytes (path);
  }
  r.err = backup_stop (b, !r.done);
  if (tdir) {
    g_autofree char *path = g_strdup_printf ("%s/%s.%s", tdir, vm->d[disk].key, tfmt);
    unlink (path);
  }
  backup_free (b);
  note ("  %s of %s (%s%s%s): %s after %.1f s (%.1f%%)%s%s\n", m->name, vm->d[disk].key,
        tdir ? "dir " : "NBD", tdir ? tfmt : "", tdir ? "" : "", r.done ? "done" : "stopped",
        r.secs, 100 * r.frac, r.err ? ": " : "", r.err ? r.err : "");
  return r;
}

static void
scale_data (FILE *md)
{
  Vm *vm = vm_new ("scale-d");
  g_autofree char *tdir = g_strdup_printf ("%s/target", vm->dir);
  const double cap = opt.quick ? 20 : 45;
  DataRun r[12];
  const char *what[12];
  int n = 0;

  vm->null_target = TRUE;
  vm_add_disk (vm, "scsi0", TRUE, 1024 * GiB, 1 * GiB);
  vm_add_disk (vm, "scsi1", TRUE, 16 * GiB, 1 * GiB);
  vm_start_target (vm, 0);
  vm_start (vm, FALSE);
  g_mkdir_with_parents (tdir, 0700);
  what[n] = "library, NBD, 1 TiB";
  r[n++] = data_run (vm, mode_by_name ("lib"), 0, NULL, NULL, cap);
  what[n] = "library, NBD, 16 GiB";
  r[n++] = data_run (vm, mode_by_name ("lib"), 1, NULL, NULL, cap);
  what[n] = "library's graph with sync top, NBD, 1 TiB";
  r[n++] = data_run (vm, mode_by_name ("top"), 0, NULL, NULL, cap);
  what[n] = "library's graph with sync top, NBD, 16 GiB";
  r[n++] = data_run (vm, mode_by_name ("top"), 1, NULL, NULL, cap);
  what[n] = "library, directory raw, 16 GiB";
  r[n++] = data_run (vm, mode_by_name ("lib"), 1, tdir, "raw", cap);
  what[n] = "library, directory qcow2, 16 GiB";
  r[n++] = data_run (vm, mode_by_name ("lib"), 1, tdir, "qcow2", cap);
  what[n] = "library, directory qcow2, 1 TiB";
  r[n++] = data_run (vm, mode_by_name ("lib"), 0, tdir, "qcow2", cap);
  /* Unfleeced (EFI/TPM disks, --no-fleecing): sync top to fresh files. */
  what[n] = "library without fleecing, directory raw, 1 TiB";
  r[n++] = data_run (vm, mode_by_name ("libplain"), 0, tdir, "raw", cap);
  what[n] = "library without fleecing, directory qcow2, 1 TiB";
  r[n++] = data_run (vm, mode_by_name ("libplain"), 0, tdir, "qcow2", cap);
  what[n] = "library without fleecing, NBD, 1 TiB";
  r[n++] = data_run (vm, mode_by_name ("libplain"), 0, NULL, NULL, cap);

  fprintf (md, "**Data, not size**: two qcow2 disks holding the same 1 GiB of data (16 "
           "pieces of 64 MiB spread evenly), one of 1 TiB and one of 16 GiB virtual size, each backed up alone "
           "to completion (or stopped after %.0f s and extrapolated from the job's "
           "progress, total-progress: a `sync: top` job drops what it skips from its total). NBD targets are qemu-storage-daemon `null-co` exports (writes go "
           "nowhere, so a 1 TiB target needs no space; but `null-co` has no write-zeroes, so "
           "the export fills a buffer of zeroes per request: an upper bound of the NBD walk, "
           "a file-backed export is ~9x faster, `bench/findings.md`); directory targets are files in the directory the library "
           "creates (raw: sparse; qcow2: empty, formatted by QEMU). A raw directory target "
           "of 1 TiB is run only without fleecing: with it, it would allocate 1 TiB (`bench/findings.md`). The disk's own 1 GiB "
           "is copied in every case.\n\n| backup | time | target allocated | result |\n"
           "|---|---|---|---|\n", cap);
  for (int i = 0; i < n; i++) {
    g_autofree char *t = r[i].done ? fmt_s (r[i].secs)
                                   : g_strdup_printf ("stopped at %.0f s, %.1f%% done: ~%.0f s "
                                                      "extrapolated", r[i].secs, 100 * r[i].frac,
                                                      r[i].frac > 0 ? r[i].secs / r[i].frac : 0);
    g_autofree char *al = r[i].alloc ? g_strdup_printf ("%.1f MiB", r[i].alloc / (double) MiB)
                                     : g_strdup ("–");
    fprintf (md, "| %s | %s | %s | %s |\n", what[i], t, al, r[i].err ? r[i].err : "ok");
    g_free (r[i].err);
  }
  fprintf (md, "\n");
  vm_free (vm);
}

static void
sec_scale (void)
{
  FILE *md = open_out (opt.out, "guest-scale.md");
  note ("guest scale: %d drives of 1 GiB and 1 TiB; data vs size\n", SCALE_DRIVES);
  fprintf (md, "The control-plane runs boot the guest (idle: the library pauses a running "
           "VM); the data runs have no guest OS (`-S`).\n\n");
  scale_control (md);
  scale_data (md);
  fclose (md);
}

/* ---- main ------------------------------------------------------------------ */

int
main (int argc, char **argv)
{
  g_autofree char *modes_s = NULL, *tp_modes_s = NULL, *wl_s = NULL;
  GOptionEntry entries[] = {
    { "out", 0, 0, G_OPTION_ARG_STRING, &opt.out, "results directory", "DIR" },
    { "guest", 0, 0, G_OPTION_ARG_STRING, &opt.guest, "guest image directory (build-guest.sh)", "DIR" },
    { "fleece", 0, 0, G_OPTION_ARG_STRING, &opt.fleece, "the fleece command", "PATH" },
    { "slowfs", 0, 0, G_OPTION_ARG_STRING, &opt.slowfs, "the slowfs program", "PATH" },
    { "reps", 0, 0, G_OPTION_ARG_INT, &opt.reps, "repetitions (latency)", "N" },
    { "secs", 0, 0, G_OPTION_ARG_DOUBLE, &opt.secs, "seconds per latency run", "S" },
    { "tp-secs", 0, 0, G_OPTION_ARG_DOUBLE, &opt.tp_secs, "seconds per throughput workload", "S" },
    { "tp-reps", 0, 0, G_OPTION_ARG_INT, &opt.tp_reps, "repetitions (throughput)", "N" },
    { "modes", 0, 0, G_OPTION_ARG_STRING, &modes_s, "latency modes", "a,b,..." },
    { "tp-modes", 0, 0, G_OPTION_ARG_STRING, &tp_modes_s, "throughput modes", "a,b,..." },
    { "tp-workloads", 0, 0, G_OPTION_ARG_STRING, &wl_s, "throughput workloads (seq1,seq32,rand1,rand32)", "a,b,..." },
    { "no-kvm", 0, 0, G_OPTION_ARG_NONE, &opt.no_kvm, "TCG only", NULL },
    { "quick", 0, 0, G_OPTION_ARG_NONE, &opt.quick, "a smoke run", NULL },
    { NULL },
  };
  g_autoptr (GOptionContext) ctx = g_option_context_new ("SECTION... (latency throughput slow scale)");
  g_autoptr (GError) err = NULL;

  opt.reps = 3;
  opt.secs = 8;
  opt.tp_secs = 20;
  opt.tp_reps = 2;
  g_option_context_add_main_entries (ctx, entries, NULL);
  if (!g_option_context_parse (ctx, &argc, &argv, &err))
    die ("%s", err->message);
  if (!opt.out || !opt.guest || !opt.fleece)
    die ("--out, --guest and --fleece are required");
  if (opt.quick) {
    opt.reps = 1;
    opt.secs = 4;
    opt.tp_secs = 8;
    opt.tp_reps = 1;
  }
  opt.modes = g_strsplit (modes_s ? modes_s : "none,plain,lib,pve,direct,uring,w16c4m", ",", -1);
  opt.tp_modes = g_strsplit (tp_modes_s ? tp_modes_s : "none,lib,pve,raw", ",", -1);
  {
    g_auto (GStrv) wl = g_strsplit (wl_s ? wl_s : "seq1,seq32,rand1,rand32", ",", -1);
    for (char **w = wl; *w; w++) {
      size_t i;
      for (i = 0; i < G_N_ELEMENTS (workloads_all); i++)
        if (strcmp (workloads_all[i].id, *w) == 0)
          break;
      if (i == G_N_ELEMENTS (workloads_all))
        die ("unknown workload '%s'", *w);
      workloads[n_workloads++] = &workloads_all[i];
    }
  }
  g_mkdir_with_parents (opt.out, 0755);
  signal (SIGPIPE, SIG_IGN);
  for (int i = 1; i < argc; i++) {
    if (strcmp (argv[i], "latency") == 0)
      sec_latency ();
    else if (strcmp (argv[i], "throughput") == 0)
      sec_throughput ();
    else if (strcmp (argv[i], "slow") == 0)
      sec_slow ();
    else if (strcmp (argv[i], "scale") == 0)
      sec_scale ();
    else
      die ("unknown section '%s'", argv[i]);
  }
  return 0;
}
