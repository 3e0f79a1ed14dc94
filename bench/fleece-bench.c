/* fleece-bench: libfleece's benchmarks (issue #7), run by bench/run.
 *
 *   fleece-bench latency    --out DIR [--reps N] [--variants a,b,...]
 *   fleece-bench throughput --out DIR [--reps N] [--variants a,b,...]
 *   fleece-bench control    --out DIR [--reps N] [--drives 1,16,64]
 *
 * Every section starts its own throwaway QEMU (no guest OS, -S, TCG) and
 * drives it through the public libfleece API.  The library talks to QEMU
 * through a proxy (bench-util.c) that counts QMP round trips and can change
 * the library's commands the way a change of the library's defaults would
 * (a "variant"), so choices such as the fleecing image's cache mode or the
 * job's x-perf settings are measured on the library's real code path.
 * Guest writes are HMP "qemu-io -d <device>" writes through the guest
 * device (so through the copy-before-write filter), as in `fleece demo`.
 *
 * Each section writes DIR/<section>.md (a Markdown fragment) and data files
 * for gnuplot; bench/run assembles docs/benchmarks.md. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fleece/fleece.h"
#include "bench-util.h"

#define VMID 100
#define WRITE_SIZE (64 * KiB)
#define MAXD 64

/* ---- variants: the library's defaults, and what they could be ------------ */

/* "lib": exactly what the library sends today; the others change one
 * choice (or, "old", restore the defaults before issue 7). */
static const Variant variants[] = {
  { "lib", "the library measured, unchanged" },
  { "raw", "raw sparse fleecing image", .format = "raw" },
  { "old", "the job settings before issue 7: QEMU's default 64 workers, "
    "job min-cluster-size 4 MiB", .max_workers = 64, .job_min_cluster = 4 * MiB,
    .plain_max_workers = 64 },
  { "plainold", "without fleecing, QEMU's default 64 workers (before issue 7)",
    .plain_max_workers = 64 },
  { "noflush", "qcow2, cache.no-flush=on", .no_flush = 1 },
  { "uring", "qcow2, aio=io_uring", .aio = "io_uring" },
  { "rawuring", "raw, aio=io_uring", .format = "raw", .aio = "io_uring" },
  { "nounref", "qcow2, discard-no-unref=on", .discard_no_unref = 1 },
  { "premeta", "qcow2 preallocation=metadata", .format = "qcow2",
    .create_opts = "preallocation=metadata" },
  { "c1m", "qcow2 cluster_size=1M", .format = "qcow2",
    .create_opts = "cluster_size=1M" },
  { "direct", "qcow2, cache.direct=on", .cache_direct = 1 },
  { "rawdirect", "raw, cache.direct=on", .format = "raw", .cache_direct = 1 },
  { "falloc", "raw preallocation=falloc (not thin)", .format = "raw",
    .create_opts = "preallocation=falloc" },
  { "mw1", "qcow2, x-perf max-workers=1", .max_workers = 1 },
  { "mw4", "qcow2, x-perf max-workers=4", .max_workers = 4 },
  { "mw16", "qcow2, x-perf max-workers=16", .max_workers = 16 },
  { "rawmw16", "raw, x-perf max-workers=16", .format = "raw", .max_workers = 16 },
  { "rawmw4", "raw, x-perf max-workers=4", .format = "raw", .max_workers = 4 },
  { "mc1m", "qcow2, x-perf max-chunk=1M", .max_chunk = 1 * MiB },
  { "cl64k", "raw, job min-cluster-size 64 KiB", .format = "raw",
    .job_min_cluster = 64 * KiB },
  { "nfnu", "qcow2 no-flush + discard-no-unref", .no_flush = 1,
    .discard_no_unref = 1 },
  { "cbw1m", "qcow2, cbw min-cluster-size 1M", .cbw_min_cluster = 1 * MiB },
  { "plainnocr", "without fleecing, x-perf use-copy-range=false", .plain_no_copy_range = 1 },
  { "plainmw8", "without fleecing, x-perf max-workers=8 set by the proxy (diagnosis: "
    "the library's own setting)", .plain_max_workers = 8 },
  { "plainmw8nocr", "without fleecing, x-perf max-workers=8, use-copy-range=false",
    .plain_max_workers = 8, .plain_no_copy_range = 1 },
  { "mw2", "qcow2, x-perf max-workers=2", .max_workers = 2 },
  { "nodisc", "qcow2, no discard-source (diagnosis)", .no_discard_source = 1 },
};

static const Variant *
variant_by_name (const char *name)
{
  for (size_t i = 0; i < G_N_ELEMENTS (variants); i++)
    if (strcmp (variants[i].name, name) == 0)
      return &variants[i];
  die ("unknown variant '%s'", name);
}

/* ---- the VM ------------------------------------------------------------- */

typedef struct {
  char *key;
  const char *bus;     /* scsi, virtio */
  uint64_t size;
  char *src;
  char *tgt;           /* NBD target file (latency) */
  bool control;        /* not backed up: writes there show what the backup
                        * costs a drive it does not touch */
} Disk;

typedef struct {
  char *dir;
  char *lib_sock, *own_sock, *qsd_sock, *nbd_sock;
  pid_t qemu, qsd;
  Qmp *own, *qsdq;
  size_t n;
  Disk d[MAXD];
  uint64_t target_bps;  /* 0: no storage daemon */
} Vm;

static char *
qdev_of (const Disk *k)
{
  if (strcmp (k->bus, "virtio") == 0)
    return g_strdup_printf ("/machine/peripheral/%s/virtio-backend", k->key);
  return g_strdup (k->key);
}

static void
vm_add_disk (Vm *vm, const char *key, const char *bus, uint64_t size, int fill)
{
  Disk *k = &vm->d[vm->n++];

  k->key = g_strdup (key);
  k->bus = bus;
  k->size = size;
  k->src = g_strdup_printf ("%s/%s.raw", vm->dir, key);
  k->tgt = g_strdup_printf ("%s/backup-%s.raw", vm->dir, key);
  if (fill)
    make_random_file (k->src, size, (uint32_t) vm->n * 7919u);
  else
    make_sparse_file (k->src, size);
}

static Vm *
vm_new (const char *tag)
{
  Vm *vm = g_new0 (Vm, 1);
  g_autoptr (GError) err = NULL;
  g_autofree char *tmpl = g_strdup_printf ("fleece-bench-%s-XXXXXX", tag);

  vm->dir = g_dir_make_tmp (tmpl, &err);
  if (!vm->dir)
    die ("%s", err->message);
  vm->lib_sock = g_strdup_printf ("%s/lib.sock", vm->dir);
  vm->own_sock = g_strdup_printf ("%s/own.sock", vm->dir);
  vm->qsd_sock = g_strdup_printf ("%s/qsd.sock", vm->dir);
  vm->nbd_sock = g_strdup_printf ("%s/nbd.sock", vm->dir);
  return vm;
}

static void
qsd_set_rate (Vm *vm, uint64_t bps)
{
  json_object *r = qmp_do (vm->qsdq, "qom-set",
                           json_parse ("{\"path\": \"slow\", \"property\": \"limits\", "
                                       "\"value\": {\"bps-write\": %" G_GUINT64_FORMAT "}}",
                                       bps));
  json_object_put (r);
}

/* A slow backup target: one NBD export per drive, all behind one throttle
 * group, as in `fleece demo`. */
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
    make_sparse_file (vm->d[i].tgt, vm->d[i].size);
    g_ptr_array_add (a, g_strdup ("--blockdev"));
    g_ptr_array_add (a, g_strdup_printf ("driver=file,node-name=f-%s,filename=%s",
                                         vm->d[i].key, vm->d[i].tgt));
    g_ptr_array_add (a, g_strdup ("--blockdev"));
    if (bps)
      g_ptr_array_add (a, g_strdup_printf ("driver=throttle,node-name=t-%s,throttle-group=slow,file=f-%s",
                                           vm->d[i].key, vm->d[i].key));
    else  /* a fast target: the file, without a throttle */
      g_ptr_array_add (a, g_strdup_printf ("driver=raw,node-name=t-%s,file=f-%s",
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

static void
vm_start (Vm *vm)
{
  g_autoptr (GPtrArray) a = g_ptr_array_new_with_free_func (g_free);
  g_autofree char *log = g_strdup_printf ("%s/qemu.log", vm->dir);
  int ctrl = -1;

  g_ptr_array_add (a, g_strdup ("qemu-system-x86_64"));
  g_ptr_array_add (a, g_strdup ("-machine"));
  g_ptr_array_add (a, g_strdup ("q35"));
  g_ptr_array_add (a, g_strdup ("-accel"));
  g_ptr_array_add (a, g_strdup ("tcg"));
  g_ptr_array_add (a, g_strdup ("-S"));
  g_ptr_array_add (a, g_strdup ("-nodefaults"));
  g_ptr_array_add (a, g_strdup ("-display"));
  g_ptr_array_add (a, g_strdup ("none"));
  g_ptr_array_add (a, g_strdup ("-qmp"));
  g_ptr_array_add (a, g_strdup_printf ("unix:%s,server=on,wait=off", vm->lib_sock));
  g_ptr_array_add (a, g_strdup ("-qmp"));
  g_ptr_array_add (a, g_strdup_printf ("unix:%s,server=on,wait=off", vm->own_sock));
  for (size_t i = 0, nscsi = 0; i < vm->n; i++) {
    Disk *k = &vm->d[i];
    g_ptr_array_add (a, g_strdup ("-drive"));
    g_ptr_array_add (a, g_strdup_printf ("file=%s,if=none,id=drive-%s,format=raw,discard=unmap",
                                         k->src, k->key));
    g_ptr_array_add (a, g_strdup ("-device"));
    if (strcmp (k->bus, "scsi") == 0) {
      /* 16 disks per virtio-scsi controller: no PCI slot per disk. */
      if (nscsi % 16 == 0) {
        ctrl++;
        g_ptr_array_add (a, g_strdup_printf ("virtio-scsi-pci,id=scsihw%d", ctrl));
        g_ptr_array_add (a, g_strdup ("-device"));
      }
      g_ptr_array_add (a, g_strdup_printf ("scsi-hd,bus=scsihw%d.0,scsi-id=%zu,drive=drive-%s,id=%s",
                                           ctrl, nscsi % 16, k->key, k->key));
      nscsi++;
    } else {
      g_ptr_array_add (a, g_strdup_printf ("virtio-blk-pci,drive=drive-%s,id=%s", k->key, k->key));
    }
  }
  g_ptr_array_add (a, NULL);
  vm->qemu = spawn_logged ((char *const *) a->pdata, log);
  vm->own = qmp_open (vm->own_sock);
}

static void
vm_free (Vm *vm)
{
  /* QEMU may close the socket before it answers quit: do not wait. */
  if (vm->own && write (vm->own->fd, "{\"execute\": \"quit\"}\n", 20) < 0)
    note ("quit: %s\n", g_strerror (errno));
  qmp_close (vm->own);
  stop_pid (vm->qemu);
  qmp_close (vm->qsdq);
  stop_pid (vm->qsd);
  rm_rf (vm->dir);
  for (size_t i = 0; i < vm->n; i++) {
    g_free (vm->d[i].key);
    g_free (vm->d[i].src);
    g_free (vm->d[i].tgt);
  }
  g_free (vm->dir);
  g_free (vm->lib_sock);
  g_free (vm->own_sock);
  g_free (vm->qsd_sock);
  g_free (vm->nbd_sock);
  g_free (vm);
}

/* One 64 KiB write through the guest device; milliseconds. */
static double
guest_write (Qmp *q, const Disk *k, uint64_t off, unsigned pattern)
{
  g_autofree char *qdev = qdev_of (k);
  g_autofree char *line = g_strdup_printf ("qemu-io -d %s \"write -P 0x%02x %" G_GUINT64_FORMAT
                                           " %" G_GUINT64_FORMAT "\"", qdev,
                                           0x10 + pattern % 0xe0, off, (guint64) WRITE_SIZE);
  gint64 t0 = now_us ();
  g_autofree char *out = hmp (q, line);
  gint64 dt = now_us () - t0;

  g_strstrip (out);
  if (*out)
    die ("%s: %s", line, out);
  return dt / 1000.0;
}

/* An HMP command that does no I/O: the monitor's own share of a write's
 * latency, and how busy QEMU's main loop is. */
static double
hmp_noop (Qmp *q)
{
  gint64 t0 = now_us ();
  g_autofree char *out = hmp (q, "info version");
  return (now_us () - t0) / 1000.0;
}

/* After a measured write: the no-op, the same cluster written again, and
 * a write to the control drive (outside the backup), if there is one. */
static void
decompose (Vm *vm, const Disk *k, uint64_t off, unsigned pattern, GArray *noop,
           GArray *rewrite, GArray *control, GRand *rand)
{
  const Disk *c = &vm->d[vm->n - 1];
  double x = hmp_noop (vm->own);
  g_array_append_val (noop, x);
  x = guest_write (vm->own, k, off, pattern);
  g_array_append_val (rewrite, x);
  if (c->control) {
    uint64_t coff = (uint64_t) g_rand_int_range (rand, 0, (gint32) (c->size / WRITE_SIZE)) * WRITE_SIZE;
    x = guest_write (vm->own, c, coff, pattern);
    g_array_append_val (control, x);
  }
}

/* ---- one library run ------------------------------------------------------ */

typedef struct {
  char *dir;
  const char *opts;
} CbStore;

static int
cb_alloc (void *opaque, const char *name, const char *format, uint64_t size,
          char **volid, char **reason)
{
  CbStore *s = opaque;
  g_autofree char *path = g_build_filename (s->dir, name, NULL);
  g_autofree char *sz = g_strdup_printf ("%" G_GUINT64_FORMAT, size);
  const char *argv[] = { "qemu-img", "create", "-q", "-f", format, "-o",
                         *s->opts ? s->opts : "", path, sz, NULL };

  if (!*s->opts) {
    argv[5] = path;
    argv[6] = sz;
    argv[7] = NULL;
  }
  run_cmd ((char *const *) argv);
  *volid = strdup (name);
  return 0;
}

static int
cb_free (void *opaque, const char *volid, char **reason)
{
  CbStore *s = opaque;
  g_autofree char *path = g_build_filename (s->dir, volid, NULL);
  unlink (path);
  return 0;
}

static char *
cb_path (void *opaque, const char *volid, char **reason)
{
  CbStore *s = opaque;
  g_autofree char *path = g_build_filename (s->dir, volid, NULL);
  return strdup (path);
}

static void
cb_free_opaque (void *opaque)
{
  CbStore *s = opaque;
  g_free (s->dir);
  g_free (s);
}

typedef struct {
  Vm *vm;
  const Variant *v;
  struct fleece_handle *h;
  Proxy *proxy;
  struct fleece_plan *plan;
  char *storage;
  char *state;
  uint64_t done[MAXD];
  char *image[MAXD];     /* fleecing image file per disk, NULL if none */
  GString *log;
} Run;

static size_t
disk_index (Vm *vm, const char *key)
{
  for (size_t i = 0; i < vm->n; i++)
    if (strcmp (vm->d[i].key, key) == 0)
      return i;
  return (size_t) -1;
}

static void
on_progress (void *opaque, const char *key, uint64_t done, uint64_t total)
{
  Run *r = opaque;
  size_t i = disk_index (r->vm, key);
  if (i != (size_t) -1)
    r->done[i] = done;
}

static void
on_log (void *opaque, int level, const char *msg)
{
  Run *r = opaque;
  if (level <= FLEECE_LOG_WARNING)
    g_string_append_printf (r->log, "%s\n", msg);
}

static void
lib_die (const char *what)
{
  die ("%s: %s", what, fleece_get_error () ? fleece_get_error () : "?");
}

static Run *
run_open (Vm *vm, const Variant *v)
{
  Run *r = g_new0 (Run, 1);
  const char *keys[MAXD + 1];
  struct fleece_storage *st;
  int fd;

  r->vm = vm;
  r->v = v;
  r->log = g_string_new (NULL);
  r->storage = g_strdup_printf ("%s/fleecing", vm->dir);
  r->state = g_strdup_printf ("%s/state", vm->dir);
  g_mkdir_with_parents (r->storage, 0700);
  g_mkdir_with_parents (r->state, 0700);
  {
    size_t n = 0;
    for (size_t i = 0; i < vm->n; i++)
      if (!vm->d[i].control)
        keys[n++] = vm->d[i].key;
    keys[n] = NULL;
  }

  if (v && v->create_opts) {
    CbStore *s = g_new0 (CbStore, 1);
    s->dir = g_strdup (r->storage);
    s->opts = v->create_opts;
    st = fleece_storage_new_callback ("bench:qemu-img", FLEECE_STORAGE_QCOW2 |
                                      FLEECE_STORAGE_DISCARD | FLEECE_STORAGE_PATH,
                                      s, cb_free_opaque);
    if (st && (fleece_storage_set_alloc_callback (st, cb_alloc) < 0
               || fleece_storage_set_remove_callback (st, cb_free) < 0
               || fleece_storage_set_path_callback (st, cb_path) < 0))
      lib_die ("the callback storage");
  } else {
    st = fleece_storage_new_dir (r->storage);
  }
  r->h = fleece_new ();
  if (!st || fleece_set_vmid (r->h, VMID) < 0 ||
      fleece_set_state_dir (r->h, r->state) < 0 ||
      fleece_set_storage (r->h, st) < 0 ||
      fleece_set_drives (r->h, keys) < 0 ||
      (v && v->format && fleece_set_image_format (r->h, v->format) < 0) ||
      fleece_set_log_callback (r->h, on_log, r, NULL) < 0 ||
      fleece_set_progress_callback (r->h, on_progress, r, NULL) < 0)
    lib_die ("setting up the handle");
  r->proxy = proxy_start (vm->lib_sock, v, &fd);
  if (fleece_connect_fd (r->h, fd) < 0)
    lib_die ("fleece_connect_fd");
  return r;
}

static void
run_plan (Run *r, unsigned flags)
{
  memset (r->done, 0, sizeof r->done);
  if (fleece_set_plan_flags (r->h, flags) < 0 || !(r->plan = fleece_plan (r->h)))
    lib_die ("fleece_plan");
}

static void
run_attach_start (Run *r, struct fleece_target *t)
{
  if (fleece_attach (r->h, r->plan, 0) < 0)
    lib_die ("fleece_attach");
  if (fleece_start (r->h, r->plan, t, 0) < 0)
    lib_die ("fleece_start");
  for (int j = 0; j < fleece_plan_get_drive_count (r->plan); j++) {
    size_t i = disk_index (r->vm, fleece_plan_get_key (r->plan, j));
    if (i != (size_t) -1 && fleece_plan_get_fleeced (r->plan, j) == 1)
      r->image[i] = g_build_filename (r->storage, fleece_plan_get_image (r->plan, j), NULL);
  }
}

static void
run_cleanup (Run *r)
{
  if (fleece_cleanup (r->h, 0) < 0)
    lib_die ("fleece_cleanup");
  fleece_plan_free (r->plan);
  r->plan = NULL;
  for (size_t i = 0; i < MAXD; i++)
    g_clear_pointer (&r->image[i], g_free);
}

static void
run_close (Run *r)
{
  if (r->plan)
    run_cleanup (r);
  fleece_free (r->h);
  proxy_stop (r->proxy);
  if (r->log->len)
    note ("  library warnings: %s", r->log->str);
  g_string_free (r->log, TRUE);
  g_free (r->storage);
  g_free (r->state);
  g_free (r);
}

/* ---- options ----------------------------------------------------------- */

typedef struct {
  const char *out;
  int reps;
  char **variants;
  char **drives;
  int quick;
} Opts;

static char *
fmt_ms (double ms)
{
  if (ms >= 1000)
    return g_strdup_printf ("%.2f s", ms / 1000);
  if (ms >= 10)
    return g_strdup_printf ("%.0f ms", ms);
  return g_strdup_printf ("%.2f ms", ms);
}

static char *
fmt_bytes (double b)
{
  if (b >= MiB)
    return g_strdup_printf ("%.2f MiB", b / MiB);
  return g_strdup_printf ("%.0f KiB", b / KiB);
}

/* ---- 1 + 2: guest write latency, fleecing space ------------------------------ */

#define LAT_DISK_SIZE (32 * MiB)
#define LAT_TARGET_BPS (4 * MiB)
#define LAT_INTERVAL_US 25000    /* one write every 25 ms */
#define LAT_LEAD_MIN (1 * MiB)
#define LAT_LEAD_MAX (6 * MiB)
#define FLOOR_WRITES 40      /* per slice: one slice before each backup run */
#define PLAIN_WRITES 4
#define PLAIN_MAX_US (10 * G_USEC_PER_SEC)  /* no new write later: the backup (16 s) is nearly done */
#define PROGRESS_EVERY_US 100000

typedef struct {
  const Variant *v;     /* NULL: floor or no fleecing */
  const char *name;
  GArray *lat;          /* ms, all reps: writes to fresh clusters */
  GArray *noop;         /* ms: an HMP command without I/O after each write */
  GArray *rewrite;      /* ms: the same cluster again (nothing to copy) */
  GArray *control;      /* ms: a write to a drive outside the backup */
  GString *trace;       /* run, seconds since start, drive, ms */
  GArray *rep_p50, *rep_p99;
  /* space, per run and drive */
  GArray *peak_minus_over;  /* bytes */
  GArray *peak, *over, *final;
  GArray *secs;         /* backup duration */
} Mode;

static Mode *
mode_new (const char *name, const Variant *v)
{
  Mode *m = g_new0 (Mode, 1);
  m->name = name;
  m->v = v;
  m->lat = dbl_array ();
  m->noop = dbl_array ();
  m->rewrite = dbl_array ();
  m->control = dbl_array ();
  m->trace = g_string_new (NULL);
  m->rep_p50 = dbl_array ();
  m->rep_p99 = dbl_array ();
  m->peak_minus_over = dbl_array ();
  m->peak = dbl_array ();
  m->over = dbl_array ();
  m->final = dbl_array ();
  m->secs = dbl_array ();
  return m;
}

typedef struct {
  Vm *vm;
  size_t ndata;            /* data drives first, then the control drive */
  GRand *rand;
  guint8 *written[MAXD];   /* per 64 KiB cluster: written during this run */
  unsigned turn;
  unsigned pattern;
} Writer;

static void
writer_reset (Writer *w)
{
  for (size_t i = 0; i < w->ndata; i++) {
    g_free (w->written[i]);
    w->written[i] = g_malloc0 (w->vm->d[i].size / WRITE_SIZE);
  }
}

/* A cluster of disk i not written in this run, lead_min..lead_max ahead of
 * the backup's progress (further ahead if that window is used up); -1 if
 * none is left. */
static int64_t
pick_fresh (Writer *w, size_t i, uint64_t progress, uint64_t lead_min, uint64_t lead_max)
{
  uint64_t n = w->vm->d[i].size / WRITE_SIZE;
  uint64_t lo = (progress + lead_min + WRITE_SIZE - 1) / WRITE_SIZE;
  uint64_t hi = MIN (n, (progress + lead_max) / WRITE_SIZE);

  for (int pass = 0; pass < 2; pass++) {
    g_autoptr (GArray) c = g_array_new (FALSE, FALSE, sizeof (uint64_t));
    for (uint64_t k = lo; k < hi; k++)
      if (!w->written[i][k])
        g_array_append_val (c, k);
    if (c->len) {
      uint64_t k = g_array_index (c, uint64_t, g_rand_int_range (w->rand, 0, (gint32) c->len));
      w->written[i][k] = 1;
      return (int64_t) (k * WRITE_SIZE);
    }
    hi = n;
  }
  return -1;
}

static void
record_rep (Mode *m, GArray *rep)
{
  push (m->rep_p50, quantile (rep, 0.5));
  push (m->rep_p99, quantile (rep, 0.99));
  for (guint i = 0; i < rep->len; i++)
    push (m->lat, g_array_index (rep, double, i));
}


static void
lat_floor (Vm *vm, Writer *w, Mode *m)
{
  g_autoptr (GArray) rep = dbl_array ();
  gint64 next = now_us ();

  writer_reset (w);
  for (int n = 0; n < FLOOR_WRITES; n++) {
    size_t i = w->turn++ % w->ndata;
    int64_t off = pick_fresh (w, i, 0, 0, vm->d[i].size);
    gint64 now = now_us ();
    if (now < next)
      g_usleep ((gulong) (next - now));
    next = now_us () + LAT_INTERVAL_US;
    if (off >= 0) {
      push (rep, guest_write (vm->own, &vm->d[i], (uint64_t) off, w->pattern++));
      decompose (vm, &vm->d[i], (uint64_t) off, w->pattern++, m->noop, m->rewrite,
                 m->control, w->rand);
    }
  }
  record_rep (m, rep);
}

static struct fleece_target *
nbd_target (Vm *vm)
{
  g_autofree char *uri = g_strdup_printf ("nbd+unix:///?socket=%s", vm->nbd_sock);
  struct fleece_target *t = fleece_target_new_nbd (uri);
  if (!t)
    lib_die ("fleece_target_new_nbd");
  return t;
}

/* Without fleecing every write ahead of the backup waits for the slow
 * target, seconds each: a few writes per run, then the run is cancelled
 * (with the target sped up so that cancelling does not wait for the
 * in-flight data at 4 MiB/s). */
static void
lat_plain (Vm *vm, Writer *w, Mode *m, const Variant *v)
{
  g_autoptr (GArray) rep = dbl_array ();
  struct fleece_target *t = nbd_target (vm);
  Run *r = run_open (vm, v);
  gint64 t0;

  writer_reset (w);
  run_plan (r, FLEECE_PLAN_NO_FLEECING);
  run_attach_start (r, t);
  t0 = now_us ();
  g_usleep (300000);
  for (int n = 0; n < PLAIN_WRITES && now_us () - t0 < PLAIN_MAX_US; n++) {
    size_t i = w->turn++ % w->ndata;
    int64_t off;
    if (fleece_wait (r->h, 0) != 0)
      break;
    off = pick_fresh (w, i, r->done[i], LAT_LEAD_MIN, LAT_LEAD_MAX);
    if (off >= 0)
      push (rep, guest_write (vm->own, &vm->d[i], (uint64_t) off, w->pattern++));
  }
  qsd_set_rate (vm, 1024 * MiB);
  fleece_cancel (r->h);
  while (fleece_wait (r->h, 200) == 0)
    ;
  run_close (r);
  qsd_set_rate (vm, vm->target_bps);
  fleece_target_free (t);
  record_rep (m, rep);
}

static void
lat_fleece (Vm *vm, Writer *w, Mode *m)
{
  g_autoptr (GArray) rep = dbl_array ();
  struct fleece_target *t = nbd_target (vm);
  Run *r = run_open (vm, m->v);
  uint64_t peak[MAXD] = { 0 }, over[MAXD] = { 0 };
  gint64 t0, next, last_poll = 0;
  int res = 0;

  writer_reset (w);
  run_plan (r, 0);
  run_attach_start (r, t);
  t0 = now_us ();
  next = t0 + LAT_INTERVAL_US;
  for (;;) {
    gint64 now = now_us ();
    size_t i;
    int64_t off = -1;

    if (now - last_poll >= PROGRESS_EVERY_US) {
      if ((res = fleece_wait (r->h, 0)) != 0)
        break;
      last_poll = now_us ();
      for (size_t k = 0; k < vm->n; k++)
        if (r->image[k])
          peak[k] = MAX (peak[k], allocated_bytes (r->image[k]));
    }
    now = now_us ();
    if (now < next) {
      g_usleep ((gulong) MIN (next - now, 5000));
      continue;
    }
    next += LAT_INTERVAL_US;
    if (next < now)
      next = now + LAT_INTERVAL_US;
    for (size_t tries = 0; tries < w->ndata && off < 0; tries++) {
      i = w->turn++ % w->ndata;
      if (r->done[i] + LAT_LEAD_MIN + WRITE_SIZE <= vm->d[i].size)
        off = pick_fresh (w, i, r->done[i], LAT_LEAD_MIN, LAT_LEAD_MAX);
    }
    if (off < 0)
      continue;
    {
      double x = guest_write (vm->own, &vm->d[i], (uint64_t) off, w->pattern++);
      push (rep, x);
      g_string_append_printf (m->trace, "%u %.3f %zu %.4f\n", m->rep_p50->len,
                              (now_us () - t0) / 1e6, i, x);
    }
    decompose (vm, &vm->d[i], (uint64_t) off, w->pattern++, m->noop, m->rewrite,
               m->control, w->rand);
    over[i] += WRITE_SIZE;
    if (r->image[i])
      peak[i] = MAX (peak[i], allocated_bytes (r->image[i]));
  }
  if (res < 0)
    lib_die ("the fleecing backup");
  push (m->secs, (now_us () - t0) / 1e6);
  for (size_t k = 0; k < vm->n; k++) {
    if (!r->image[k])
      continue;
    peak[k] = MAX (peak[k], allocated_bytes (r->image[k]));
    push (m->peak, (double) peak[k]);
    push (m->over, (double) over[k]);
    push (m->peak_minus_over, (double) peak[k] - (double) over[k]);
    push (m->final, (double) allocated_bytes (r->image[k]));
  }
  run_close (r);
  fleece_target_free (t);
  record_rep (m, rep);
}

static void
write_cdf (const Opts *o, Mode *m)
{
  g_autofree char *name = g_strdup_printf ("lat-%s.dat", m->name);
  FILE *f = open_out (o->out, name);

  g_array_sort (m->lat, cmp_double);
  for (guint i = 0; i < m->lat->len; i++)
    fprintf (f, "%.4f %.6f\n", g_array_index (m->lat, double, i),
             (i + 1.0) / m->lat->len);
  fclose (f);
}

static double
dmax (GArray *a)
{
  return a->len ? quantile (a, 1.0) : 0;
}

static int
cmd_latency (const Opts *o)
{
  Vm *vm = vm_new ("lat");
  g_autoptr (GPtrArray) modes = g_ptr_array_new ();
  Mode *floor_m = mode_new ("floor", NULL);
  Mode *plain_m = mode_new ("nofleece", NULL);
  Writer w = { .vm = vm, .rand = g_rand_new_with_seed (7) };
  char *const default_variants[] = { "lib", "raw", "premeta", "direct", "c1m",
                                     "old", NULL };
  char *const *names = o->variants ? o->variants : default_variants;
  g_autofree char *ver = NULL;
  double load0 = loadavg1 (), load1;
  gint64 t_start = now_us ();
  FILE *md, *f;
  Mode *lib_m = NULL;

  vm_add_disk (vm, "scsi0", "scsi", LAT_DISK_SIZE, 1);
  vm_add_disk (vm, "virtio0", "virtio", LAT_DISK_SIZE, 1);
  vm_add_disk (vm, "scsi1", "scsi", LAT_DISK_SIZE, 1);
  vm->d[2].control = true;
  w.ndata = 2;
  vm_start_target (vm, LAT_TARGET_BPS);
  vm_start (vm);
  ver = qmp_qemu_version (vm->own);

  for (size_t i = 0; names[i]; i++) {
    Mode *m = mode_new (names[i], variant_by_name (names[i]));
    g_ptr_array_add (modes, m);
    if (strcmp (names[i], "lib") == 0)
      lib_m = m;
  }
  if (!lib_m)
    die ("the latency section needs the variant 'lib'");

  for (int rep = 0; rep < o->reps; rep++) {
    note ("latency rep %d/%d (load %.2f): no fleecing", rep + 1, o->reps, loadavg1 ());
    /* The floor is sampled in slices before every backup run, so that it
     * sees the same machine load as the runs. */
    lat_floor (vm, &w, floor_m);
    lat_plain (vm, &w, plain_m, NULL);
    /* Rotate the order so that no variant always runs first. */
    for (guint k = 0; k < modes->len; k++) {
      Mode *m = modes->pdata[(k + (guint) rep) % modes->len];
      note (", %s", m->name);
      lat_floor (vm, &w, floor_m);
      lat_fleece (vm, &w, m);
    }
    note ("\n");
  }
  load1 = loadavg1 ();

  write_cdf (o, floor_m);
  write_cdf (o, plain_m);
  for (guint k = 0; k < modes->len; k++) {
    Mode *m = modes->pdata[k];
    g_autofree char *name = g_strdup_printf ("trace-%s.dat", m->name);
    FILE *tf = open_out (o->out, name);
    fputs ("# run seconds-since-start drive latency-ms\n", tf);
    fputs (m->trace->str, tf);
    fclose (tf);
    write_cdf (o, m);
  }

  /* The variants' p50/p99 for the bar plot. */
  f = open_out (o->out, "variants.dat");
  fprintf (f, "# name p50_ms p99_ms floor_p50 floor_p99\n");
  for (guint k = 0; k < modes->len; k++) {
    Mode *m = modes->pdata[k];
    fprintf (f, "%s %.4f %.4f %.4f %.4f\n", m->name, quantile (m->lat, 0.5),
             quantile (m->lat, 0.99), quantile (floor_m->lat, 0.5),
             quantile (floor_m->lat, 0.99));
  }
  fclose (f);

  md = open_out (o->out, "latency.md");
  {
    double fp50 = quantile (floor_m->lat, 0.5), fp99 = quantile (floor_m->lat, 0.99);
    double pp99 = quantile (plain_m->lat, 0.99);
    double lp99 = quantile (lib_m->lat, 0.99);
    g_autofree char *d = fmt_bytes (LAT_DISK_SIZE);

    fprintf (md, "QEMU %s. VM: q35, TCG, no guest OS (`-S`), two %s raw drives "
             "(scsi0: scsi-hd on virtio-scsi, virtio0: virtio-blk), default cache. "
             "Backup target: qemu-storage-daemon NBD exports behind one throttle "
             "group at %llu MiB/s. Guest writes: 64 KiB HMP `qemu-io -d` writes through "
             "the device (so through copy-before-write), one every %d ms, alternating "
             "drives, each to a 64 KiB cluster not written before in that run, "
             "%llu–%llu MiB ahead of the backup's progress. The latency includes the "
             "HMP round trip, in all modes alike. %d repetitions, modes interleaved "
             "(variant order rotated per repetition). Load average (1 min) %.2f at "
             "the start, %.2f at the end; %.0f s.\n\n",
             ver, d, (unsigned long long) (LAT_TARGET_BPS / MiB), LAT_INTERVAL_US / 1000,
             (unsigned long long) (LAT_LEAD_MIN / MiB), (unsigned long long) (LAT_LEAD_MAX / MiB),
             o->reps, load0, load1, (now_us () - t_start) / 1e6);

    fprintf (md, "| mode | writes | p50 | p99 | max | p99 of each run | p50 / floor | p99 / floor |\n");
    fprintf (md, "|---|---:|---:|---:|---:|---|---:|---:|\n");
    {
      Mode *rows[2 + 64];
      guint nrows = 0;
      rows[nrows++] = floor_m;
      rows[nrows++] = plain_m;
      for (guint k = 0; k < modes->len && nrows < G_N_ELEMENTS (rows); k++)
        rows[nrows++] = modes->pdata[k];
      for (guint k = 0; k < nrows; k++) {
        Mode *m = rows[k];
        g_autofree char *p50 = fmt_ms (quantile (m->lat, 0.5));
        g_autofree char *p99 = fmt_ms (quantile (m->lat, 0.99));
        g_autofree char *mx = fmt_ms (quantile (m->lat, 1.0));
        g_autoptr (GString) reps = g_string_new (NULL);
        const char *label = m == floor_m ? "no backup (floor)"
                            : m == plain_m ? "backup without fleecing"
                            : NULL;
        g_autofree char *vlabel = label ? NULL
                                  : g_strdup_printf ("fleecing: `%s` (%s)", m->name, m->v->desc);
        if (m == floor_m)
          g_string_append_printf (reps, "%u slices of %d writes, one before each backup run",
                                  m->rep_p99->len, FLOOR_WRITES);
        for (guint i = 0; m != floor_m && i < m->rep_p99->len; i++) {
          g_autofree char *x = fmt_ms (g_array_index (m->rep_p99, double, i));
          g_string_append_printf (reps, "%s%s", i ? ", " : "", x);
        }
        fprintf (md, "| %s | %u | %s | %s | %s | %s | %.2f | %.2f |\n",
                 label ? label : vlabel, m->lat->len, p50, p99, mx, reps->str,
                 quantile (m->lat, 0.5) / fp50, quantile (m->lat, 0.99) / fp99);
      }
    }
    fprintf (md, "\nTargets (the library measured, `lib`): fleecing p99 / floor p99 = **%.2f** "
             "(target ≤ 2); no-fleecing p99 / fleecing p99 = **%.0f×** (target ≥ 1000×). "
             "The no-fleecing row has few samples (each write waits seconds; writes "
             "start only in the first 10 s of each run, which is then cancelled), so its "
             "p99 is its maximum; a few of them return at once, because the job's "
             "progress is a byte count, not a position: with many requests in flight "
             "some clusters ahead of it are already copied.\n\n", lp99 / fp99, pp99 / lp99);
    for (guint k = 0; k < modes->len; k++) {
      Mode *m = modes->pdata[k];
      if (m == lib_m)
        continue;
      fprintf (md, "- `%s`: p99 / floor p99 = %.2f, no-fleecing p99 / p99 = %.0f×\n",
               m->name, quantile (m->lat, 0.99) / fp99, pp99 / quantile (m->lat, 0.99));
    }
    fprintf (md, "\nWhere the time goes. After each measured write the same monitor "
             "runs an HMP command without I/O (`info version`: the monitor's own "
             "share, and how busy QEMU's main loop is), writes the same cluster "
             "again (the filter has nothing left to copy there), and writes to a "
             "third drive that is not backed up (no filter: what the running backup "
             "costs a drive it does not touch). p50 / p99 of each:\n\n");
    fprintf (md, "| mode | HMP no-op | write, drive outside the backup | rewrite (no copy) | "
             "fresh write (copy) | fresh − no-op, p50 |\n");
    fprintf (md, "|---|---|---|---|---|---:|\n");
    for (guint k = 0; k <= modes->len; k++) {
      Mode *m = k == 0 ? floor_m : modes->pdata[k - 1];
      double n50 = quantile (m->noop, 0.5);
      g_autofree char *a = fmt_ms (n50);
      g_autofree char *b = fmt_ms (quantile (m->noop, 0.99));
      g_autofree char *c = fmt_ms (quantile (m->control, 0.5));
      g_autofree char *c2 = fmt_ms (quantile (m->control, 0.99));
      g_autofree char *d1 = fmt_ms (quantile (m->rewrite, 0.5));
      g_autofree char *d2 = fmt_ms (quantile (m->rewrite, 0.99));
      g_autofree char *e = fmt_ms (quantile (m->lat, 0.5));
      g_autofree char *f2 = fmt_ms (quantile (m->lat, 0.99));
      g_autofree char *g = fmt_ms (quantile (m->lat, 0.5) - n50);
      fprintf (md, "| %s | %s / %s | %s / %s | %s / %s | %s / %s | %s |\n",
               k == 0 ? "no backup (floor)" : m->name, a, b, c, c2, d1, d2, e, f2, g);
    }
    fprintf (md, "\n");
  }

  /* Fleecing space. */
  {
    FILE *s = open_out (o->out, "space.md");
    fprintf (s, "Same runs as the latency table. Per run and drive: the peak of the "
             "fleecing image's allocated bytes (`st_blocks`, sampled every 100 ms and "
             "after every write), the bytes the guest overwrote ahead of the backup "
             "(distinct 64 KiB clusters), and what was left allocated when the backup "
             "had finished (before cleanup). Target: final ≈ 0, peak ≤ overwritten + "
             "4 MiB.\n\n");
    fprintf (s, "| fleecing | runs×drives | overwritten (median) | peak (median) | "
             "max(peak − overwritten) | final (max) | backup time (median) |\n");
    fprintf (s, "|---|---:|---:|---:|---:|---:|---:|\n");
    for (guint k = 0; k < modes->len; k++) {
      Mode *m = modes->pdata[k];
      g_autofree char *ov = fmt_bytes (quantile (m->over, 0.5));
      g_autofree char *pk = fmt_bytes (quantile (m->peak, 0.5));
      double pmo = dmax (m->peak_minus_over);
      g_autofree char *pm = fmt_bytes (fabs (pmo));
      g_autofree char *fi = fmt_bytes (dmax (m->final));
      fprintf (s, "| `%s` | %u | %s | %s | %s%s%s | %s | %.1f s |\n", m->name, m->peak->len,
               ov, pk, pmo < 0 ? "−" : "", pm, pmo > 4.0 * MiB ? " **over**" : "", fi,
               quantile (m->secs, 0.5));
    }
    fprintf (s, "\n");
    fclose (s);
  }
  fclose (md);
  vm_free (vm);
  g_rand_free (w.rand);
  return 0;
}

/* ---- 3: throughput ----------------------------------------------------------- */

/* CPU seconds (user + system, all threads) a process has used so far. */
static double
cpu_seconds (pid_t pid)
{
  g_autofree char *path = g_strdup_printf ("/proc/%d/stat", (int) pid);
  g_autofree char *text = NULL;
  unsigned long long ut = 0, st = 0;
  const char *p;

  if (!g_file_get_contents (path, &text, NULL, NULL) || !(p = strrchr (text, ')')))
    return 0;
  /* after "(comm)": state ppid pgrp session tty tpgid flags minflt cminflt
   * majflt cmajflt utime stime */
  if (sscanf (p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
    return 0;
  return (double) (ut + st) / (double) sysconf (_SC_CLK_TCK);
}

#define TP_DISK_SIZE (1 * GiB)
#define TP_WRITE_INTERVAL_US 10000

typedef struct {
  Vm *vm;
  volatile gint stop;
  GArray *lat;
  GArray *at;           /* when each write started (us) */
  GRand *rand;
  guint writes;
} Load;

static gpointer
load_thread (gpointer data)
{
  Load *l = data;
  const Disk *k = &l->vm->d[0];
  gint64 next = now_us ();
  unsigned pat = 0;

  while (!g_atomic_int_get (&l->stop)) {
    uint64_t off = (uint64_t) g_rand_int_range (l->rand, 0, (gint32) (k->size / WRITE_SIZE)) * WRITE_SIZE;
    gint64 now = now_us ();
    if (now < next)
      g_usleep ((gulong) (next - now));
    next = now_us () + TP_WRITE_INTERVAL_US;
    push (l->at, (double) now_us ());
    push (l->lat, guest_write (l->vm->own, k, off, pat++));
    l->writes++;
  }
  return NULL;
}

typedef struct {
  const char *name;
  const Variant *v;
  bool fleece;
  bool nbd;         /* target: NBD export of qemu-storage-daemon, else a dir */
  GArray *mibs;     /* MiB/s per run */
  GArray *cpu;      /* QEMU CPU seconds per GiB, per run */
  GArray *lat;      /* guest write ms */
} TpMode;

static double
tp_run (Vm *vm, TpMode *m, const char *tgtdir, GRand *rand)
{
  g_autofree char *uri = g_strdup_printf ("nbd+unix:///?socket=%s", vm->nbd_sock);
  struct fleece_target *t = m->nbd ? fleece_target_new_nbd (uri)
                                   : fleece_target_new_dir (tgtdir, "raw");
  Load l = { .vm = vm, .lat = dbl_array (), .at = dbl_array (), .rand = rand };
  GThread *th;
  Run *r;
  gint64 t0, t1;
  double c0, c1, gib = (double) vm->d[0].size / GiB;
  int res;

  if (!t)
    lib_die ("the target");
  sync ();
  r = run_open (vm, m->v);
  run_plan (r, m->fleece ? 0 : FLEECE_PLAN_NO_FLEECING);
  th = g_thread_new ("load", load_thread, &l);
  g_usleep (200000);
  t0 = now_us ();
  c0 = cpu_seconds (vm->qemu);
  run_attach_start (r, t);
  while ((res = fleece_wait (r->h, -1)) == 0)
    ;
  t1 = now_us ();
  c1 = cpu_seconds (vm->qemu);
  g_atomic_int_set (&l.stop, 1);
  g_thread_join (th);
  if (res < 0)
    lib_die ("the backup");
  run_close (r);
  fleece_target_free (t);
  if (!m->nbd) {
    g_autofree char *f = g_strdup_printf ("%s/%s.raw", tgtdir, vm->d[0].key);
    unlink (f);
  }
  /* Only the writes made while the backup ran. */
  for (guint i = 0; i < l.lat->len; i++) {
    double at = g_array_index (l.at, double, i);
    if (at >= (double) t0 && at <= (double) t1)
      push (m->lat, g_array_index (l.lat, double, i));
  }
  g_array_unref (l.lat);
  g_array_unref (l.at);
  push (m->cpu, (c1 - c0) / gib);
  return (double) vm->d[0].size / MiB / ((t1 - t0) / 1e6);
}

static TpMode *
tp_mode (const char *name, bool nbd)
{
  TpMode *m = g_new0 (TpMode, 1);
  m->name = name;
  m->nbd = nbd;
  if (strcmp (name, "nofleece") != 0) {
    m->v = variant_by_name (name);
    m->fleece = !g_str_has_prefix (name, "plain");
  }
  m->mibs = dbl_array ();
  m->cpu = dbl_array ();
  m->lat = dbl_array ();
  return m;
}

static void
tp_table (FILE *md, GPtrArray *modes, bool nbd)
{
  double base = 0;

  for (guint k = 0; k < modes->len; k++) {
    TpMode *m = modes->pdata[k];
    if (m->nbd == nbd && !m->v)
      base = quantile (m->mibs, 0.5);
  }
  fprintf (md, "| %s | MiB/s (median) | runs | vs. without fleecing | QEMU CPU s/GiB "
           "| guest write p50 | p99 |\n", nbd ? "NBD target" : "directory target");
  fprintf (md, "|---|---:|---|---:|---:|---:|---:|\n");
  for (guint k = 0; k < modes->len; k++) {
    TpMode *m = modes->pdata[k];
    g_autoptr (GString) runs = g_string_new (NULL);
    g_autofree char *p50 = NULL, *p99 = NULL;

    if (m->nbd != nbd)
      continue;
    p50 = fmt_ms (quantile (m->lat, 0.5));
    p99 = fmt_ms (quantile (m->lat, 0.99));
    for (guint i = 0; i < m->mibs->len; i++)
      g_string_append_printf (runs, "%s%.0f", i ? ", " : "", g_array_index (m->mibs, double, i));
    fprintf (md, "| %s%s%s | %.0f | %s | %.0f%% | %.2f | %s | %s |\n",
             m->v ? "`" : "", m->v ? m->name : "without fleecing (the library measured)",
             m->v ? "`" : "", quantile (m->mibs, 0.5), runs->str,
             100.0 * quantile (m->mibs, 0.5) / base, quantile (m->cpu, 0.5), p50, p99);
  }
  fprintf (md, "\n");
}

static int
cmd_throughput (const Opts *o)
{
  Vm *vm = vm_new ("tp");
  g_autofree char *tgtdir = g_strdup_printf ("%s/target", vm->dir);
  char *const default_variants[] = { "lib", "old", "plainold", "plainnocr",
                                     "raw", NULL };
  char *const *names = o->variants ? o->variants : default_variants;
  g_autoptr (GPtrArray) modes = g_ptr_array_new ();
  GRand *rand = g_rand_new_with_seed (11);
  double load0 = loadavg1 (), load1;
  gint64 t_start = now_us ();
  TpMode *warm[2];
  FILE *md;

  g_mkdir_with_parents (tgtdir, 0700);
  vm_add_disk (vm, "scsi0", "scsi", TP_DISK_SIZE, 1);
  vm_start_target (vm, 0);
  vm_start (vm);

  for (int nbd = 0; nbd < 2; nbd++) {
    g_ptr_array_add (modes, tp_mode ("nofleece", nbd));
    for (size_t i = 0; names[i]; i++)
      g_ptr_array_add (modes, tp_mode (names[i], nbd));
  }
  /* Warm the page cache with unmeasured runs. */
  note ("throughput: warm-up");
  for (int nbd = 0; nbd < 2; nbd++)
    warm[nbd] = tp_mode ("nofleece", nbd);
  for (int nbd = 0; nbd < 2; nbd++)
    tp_run (vm, warm[nbd], tgtdir, rand);
  note ("\n");
  /* The modes of one target kind in a block, after an unmeasured run of
   * that kind: a directory run right after an NBD run was 2-3x slower than
   * one after a directory run (ext4 in /tmp here), whatever its settings,
   * identical QMP commands included. */
  for (int rep = 0; rep < o->reps; rep++) {
    guint per_kind = modes->len / 2;

    note ("throughput rep %d/%d (load %.2f):", rep + 1, o->reps, loadavg1 ());
    for (int nbd = 0; nbd < 2; nbd++) {
      tp_run (vm, warm[nbd], tgtdir, rand);
      for (guint k = 0; k < per_kind; k++) {
        TpMode *m = modes->pdata[(guint) nbd * per_kind + (k + (guint) rep) % per_kind];
        double x = tp_run (vm, m, tgtdir, rand);
        push (m->mibs, x);
        note (" %s/%s %.0f", m->name, m->nbd ? "nbd" : "dir", x);
      }
    }
    note ("\n");
  }
  load1 = loadavg1 ();

  md = open_out (o->out, "throughput.md");
  fprintf (md, "One 1 GiB raw drive (scsi-hd, random data, in the page cache after "
           "warm-up runs) backed up through the library to a fast local target: a "
           "directory target (raw file on the same file system, the library's "
           "`fleece_target_new_dir()`), and an NBD export of qemu-storage-daemon "
           "over a unix socket without a throttle (`fleece_target_new_nbd()`). "
           "Steady guest load meanwhile: a 64 KiB write at a random offset every "
           "%d ms through the device (HMP `qemu-io`). Throughput = 1 GiB / time from "
           "fleece_start() to the end reported by fleece_wait(); QEMU CPU = its "
           "user+system time in that interval per GiB (independent of how busy the "
           "machine is); guest write latency of the writes made meanwhile. %d "
           "repetitions; per repetition the directory modes, then the NBD modes, "
           "each block after an unmeasured run to the same kind of target, in an "
           "order rotated per repetition; `sync` before each run. Load average "
           "%.2f at the start, %.2f at the end; %.0f s.\n\n",
           TP_WRITE_INTERVAL_US / 1000, o->reps, load0, load1, (now_us () - t_start) / 1e6);
  tp_table (md, modes, false);
  tp_table (md, modes, true);
  fprintf (md, "Variants: ");
  for (size_t i = 0; names[i]; i++)
    fprintf (md, "%s`%s`: %s", i ? "; " : "", names[i], variant_by_name (names[i])->desc);
  fprintf (md, ".\n\n");
  fclose (md);
  vm_free (vm);
  g_rand_free (rand);
  return 0;
}

/* ---- 4: control-plane cost ------------------------------------------------------ */

#define CP_DISK_SIZE (1 * MiB)

typedef struct {
  GArray *plan, *attach, *start, *setup, *cleanup;  /* ms */
  GArray *rt_setup, *rt_cleanup, *q_setup, *q_cleanup;
  char *breakdown_setup, *breakdown_cleanup;
} CpRes;

static int
cmd_control (const Opts *o)
{
  char *const default_drives[] = { "1", "16", "64", NULL };
  char *const *ns = o->drives ? o->drives : default_drives;
  const Variant *v = o->variants ? variant_by_name (o->variants[0]) : NULL;
  g_autoptr (GPtrArray) res = g_ptr_array_new ();
  double load0 = loadavg1 (), load1;
  gint64 t_start = now_us ();
  FILE *md;

  for (size_t ni = 0; ns[ni]; ni++) {
    int n = atoi (ns[ni]);
    Vm *vm = vm_new ("cp");
    g_autofree char *tgtdir = g_strdup_printf ("%s/target", vm->dir);
    CpRes *c = g_new0 (CpRes, 1);

    if (n < 1 || n > MAXD)
      die ("bad drive count %d", n);
    g_ptr_array_add (res, c);
    c->plan = dbl_array ();
    c->attach = dbl_array ();
    c->start = dbl_array ();
    c->setup = dbl_array ();
    c->cleanup = dbl_array ();
    c->rt_setup = dbl_array ();
    c->rt_cleanup = dbl_array ();
    c->q_setup = dbl_array ();
    c->q_cleanup = dbl_array ();
    g_mkdir_with_parents (tgtdir, 0700);
    for (int i = 0; i < n; i++) {
      g_autofree char *key = g_strdup_printf ("scsi%d", i);
      vm_add_disk (vm, key, "scsi", CP_DISK_SIZE, 0);
    }
    vm_start (vm);
    note ("control %d drives (load %.2f):", n, loadavg1 ());
    for (int rep = 0; rep < o->reps + 1; rep++) {
      struct fleece_target *t = fleece_target_new_dir (tgtdir, "raw");
      Run *r = run_open (vm, v);
      gint64 a, b, cc, d, e, f;
      unsigned rt0, rt1;
      gint64 q0, q1;
      int x;

      sync ();
      proxy_reset (r->proxy);
      a = now_us ();
      run_plan (r, 0);
      b = now_us ();
      if (fleece_attach (r->h, r->plan, 0) < 0)
        lib_die ("fleece_attach");
      cc = now_us ();
      if (fleece_start (r->h, r->plan, t, 0) < 0)
        lib_die ("fleece_start");
      d = now_us ();
      rt0 = proxy_count (r->proxy, NULL);
      q0 = proxy_qemu_us (r->proxy, NULL);
      if (rep == o->reps)
        c->breakdown_setup = proxy_breakdown (r->proxy);
      while ((x = fleece_wait (r->h, -1)) == 0)
        ;
      if (x < 0)
        lib_die ("the backup");
      proxy_reset (r->proxy);
      e = now_us ();
      if (fleece_cleanup (r->h, 0) < 0)
        lib_die ("fleece_cleanup");
      f = now_us ();
      rt1 = proxy_count (r->proxy, NULL);
      q1 = proxy_qemu_us (r->proxy, NULL);
      if (rep == o->reps)
        c->breakdown_cleanup = proxy_breakdown (r->proxy);
      fleece_plan_free (r->plan);
      r->plan = NULL;
      run_close (r);
      fleece_target_free (t);
      for (int i = 0; i < n; i++) {
        g_autofree char *p = g_strdup_printf ("%s/scsi%d.raw", tgtdir, i);
        unlink (p);
      }
      if (rep == 0)
        continue;   /* warm-up */
      push (c->plan, (b - a) / 1000.0);
      push (c->attach, (cc - b) / 1000.0);
      push (c->start, (d - cc) / 1000.0);
      push (c->setup, (d - a) / 1000.0);
      push (c->cleanup, (f - e) / 1000.0);
      push (c->rt_setup, rt0);
      push (c->rt_cleanup, rt1);
      push (c->q_setup, q0 / 1000.0);
      push (c->q_cleanup, q1 / 1000.0);
      note (" %.0f/%.0f ms", (d - a) / 1000.0, (f - e) / 1000.0);
    }
    note ("\n");
    vm_free (vm);
  }
  load1 = loadavg1 ();

  md = open_out (o->out, "control.md");
  fprintf (md, "A VM with N scsi-hd drives (1 MiB raw each, 16 per virtio-scsi "
           "controller), all fleeced (images in a directory storage, in the "
           "library's default format), backed up to a directory target. Setup = "
           "fleece_plan() + fleece_attach() + fleece_start(); cleanup = "
           "fleece_cleanup() after the backup finished. QMP round trips counted by a "
           "proxy between the library and QEMU; \"in QEMU\" is the time from "
           "forwarding a command to reading its reply. Medians of %d runs after a "
           "warm-up run%s. Load average %.2f at the start, %.2f at the end; %.0f s.\n\n",
           o->reps, v ? g_strdup_printf (" (variant `%s`: %s)", v->name, v->desc) : "",
           load0, load1, (now_us () - t_start) / 1e6);
  fprintf (md, "| drives | setup | (plan / attach / start) | round trips | in QEMU | "
           "cleanup | round trips | in QEMU | setup per drive | cleanup per drive |\n");
  fprintf (md, "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (guint k = 0; k < res->len; k++) {
    CpRes *c = res->pdata[k];
    int n = atoi (ns[k]);
    fprintf (md, "| %d | %.0f ms | %.0f / %.0f / %.0f ms | %.0f | %.0f ms | %.0f ms | %.0f | "
             "%.0f ms | %.1f ms | %.1f ms |\n", n,
             quantile (c->setup, 0.5), quantile (c->plan, 0.5), quantile (c->attach, 0.5),
             quantile (c->start, 0.5), quantile (c->rt_setup, 0.5), quantile (c->q_setup, 0.5),
             quantile (c->cleanup, 0.5), quantile (c->rt_cleanup, 0.5),
             quantile (c->q_cleanup, 0.5), quantile (c->setup, 0.5) / n,
             quantile (c->cleanup, 0.5) / n);
  }
  {
    CpRes *c = res->pdata[res->len - 1];
    fprintf (md, "\nQMP commands of one run with %s drives (count, time in QEMU):\n\n"
             "- setup: %s\n- cleanup: %s\n\n", ns[res->len - 1],
             c->breakdown_setup, c->breakdown_cleanup);
  }
  fclose (md);
  return 0;
}

/* ---- main ------------------------------------------------------------------ */

int
main (int argc, char **argv)
{
  Opts o = { .reps = 3 };
  g_autofree char *variant_list = NULL, *drives = NULL, *out = NULL;
  GOptionEntry entries[] = {
    { "out", 'o', 0, G_OPTION_ARG_FILENAME, &out, "output directory", "DIR" },
    { "reps", 'r', 0, G_OPTION_ARG_INT, &o.reps, "repetitions (default 3)", "N" },
    { "variants", 'v', 0, G_OPTION_ARG_STRING, &variant_list, "comma-separated variants", "LIST" },
    { "drives", 'd', 0, G_OPTION_ARG_STRING, &drives, "control: drive counts", "LIST" },
    { NULL }
  };
  g_autoptr (GOptionContext) ctx = g_option_context_new ("latency|throughput|control|variants");
  g_autoptr (GError) err = NULL;

  g_option_context_add_main_entries (ctx, entries, NULL);
  if (!g_option_context_parse (ctx, &argc, &argv, &err))
    die ("%s", err->message);
  if (argc != 2)
    die ("usage: fleece-bench latency|throughput|control|variants --out DIR");
  if (strcmp (argv[1], "variants") == 0) {
    for (size_t i = 0; i < G_N_ELEMENTS (variants); i++)
      printf ("%-10s %s\n", variants[i].name, variants[i].desc);
    return 0;
  }
  o.out = out ? out : ".";
  g_mkdir_with_parents (o.out, 0755);
  if (variant_list)
    o.variants = g_strsplit (variant_list, ",", -1);
  if (drives)
    o.drives = g_strsplit (drives, ",", -1);
  if (o.reps < 1)
    die ("--reps must be at least 1");
  signal (SIGPIPE, SIG_IGN);
  if (strcmp (argv[1], "latency") == 0)
    return cmd_latency (&o);
  if (strcmp (argv[1], "throughput") == 0)
    return cmd_throughput (&o);
  if (strcmp (argv[1], "control") == 0)
    return cmd_control (&o);
  die ("unknown section '%s'", argv[1]);
}
