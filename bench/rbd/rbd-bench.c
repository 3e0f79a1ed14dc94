/* rbd-bench: the object size of RBD fleecing images, measured (issue 19).
 *
 *   rbd-bench CONF OUTDIR [--quick] [--reps N] [--only NAME,...]
 *
 * CONF is the ceph.conf of a cluster with an "rbd" pool (bench/rbd/run
 * starts a throwaway one).  For each variant, a throwaway QEMU (q35, TCG,
 * -S, no guest OS) gets the fleecing graph built by hand over QMP, as the
 * stock engine builds it:
 *
 *   scsi-hd sd0 -> copy-before-write cbw (on-cbw-error break-snapshot,
 *                  cbw-timeout 45) -> file: source (local qcow2)
 *                                   -> target: fleecing image
 *   snapshot-access snap (discard unmap) -> blockdev-backup (discard-source,
 *                  x-perf {min-cluster-size, max-workers 8}) -> null-co
 *
 * with the fleecing image a raw RBD image (discard unmap) of the variant's
 * object size, created by libfleece's rbd.c, or for reference a local
 * qcow2 (the directory storage) or no fleecing at all.
 *
 * Two sections:
 *   latency  the job is rate-limited (a slow target); guest writes
 *            (HMP qemu-io -d sd0 "write -P x <off> 64k") land ahead of the
 *            backup cursor, each in a cluster nobody copied yet, so each
 *            one waits for copy-before-write to copy a cluster to the
 *            fleecing image.  Latency is qemu-io's own timing of the write.
 *            The fleecing image's usage (whole RADOS objects, as rbd du;
 *            and exact extents, as rbd diff) is sampled during the run
 *            (peak) and read when the job has concluded (left).
 *   throughput  the first THR_PRECOPY bytes of the disk are first written
 *            by the guest (so copy-before-write copied them to the
 *            fleecing image), then an unthrottled backup to null-co runs;
 *            MiB/s of the whole disk, and usage left afterwards.
 *
 * Results: OUTDIR/results.tsv (one line per run), OUTDIR/summary.md (the
 * tables), progress on stderr.  Benchmarks only: dies on errors. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bench-util.h"
#include "internal.h"
#include "rbd.h"

/* rbd.c's GError domain; the rest of libfleece is not linked in. */
G_DEFINE_QUARK (fleece-error-quark, fleece_error)

#define POOL "rbd"
#define IMAGE "vm-900-fleece-0"

typedef enum { ST_NONE, ST_QCOW2, ST_RBD } StorageKind;

typedef struct {
  const char *name;          /* column in the tables */
  StorageKind kind;
  uint64_t object_size;      /* RBD object size */
  uint64_t job_cluster;      /* x-perf.min-cluster-size */
  bool no_object_map;        /* RBD image with layering only (made by the
                              * rbd CLI, not rbd.c) */
  bool latency, throughput;  /* in which sections */
  const char *desc;
} Setup;

static const Setup variants[] = {
  { "none", ST_NONE, 0, 0, false, true, false,
    "no fleecing, no backup: the guest write alone" },
  { "qcow2-local", ST_QCOW2, 0, 1 * MiB, false, true, true,
    "directory storage: local qcow2 (64 KiB clusters), job cluster 1 MiB" },
  { "rbd-4M", ST_RBD, 4 * MiB, 4 * MiB, false, true, true,
    "RBD, 4 MiB objects (Ceph's default), job cluster 4 MiB" },
  { "rbd-1M", ST_RBD, 1 * MiB, 1 * MiB, false, true, true,
    "RBD, 1 MiB objects, job cluster 1 MiB" },
  { "rbd-256K", ST_RBD, 256 * KiB, 256 * KiB, false, true, true,
    "RBD, 256 KiB objects, job cluster 256 KiB" },
  { "rbd-64K", ST_RBD, 64 * KiB, 64 * KiB, false, true, true,
    "RBD, 64 KiB objects, job cluster 64 KiB" },
  { "rbd-256K-job1M", ST_RBD, 256 * KiB, 1 * MiB, false, true, true,
    "RBD, 256 KiB objects, job cluster 1 MiB" },
  { "rbd-64K-job1M", ST_RBD, 64 * KiB, 1 * MiB, false, true, true,
    "RBD, 64 KiB objects, job cluster 1 MiB" },
  { "rbd-4M-job1M", ST_RBD, 4 * MiB, 1 * MiB, false, true, false,
    "RBD, 4 MiB objects but job cluster 1 MiB (discards smaller than an object)" },
  { "rbd-1M-noomap", ST_RBD, 1 * MiB, 1 * MiB, true, true, true,
    "RBD, 1 MiB objects, features layering only (no exclusive-lock, object-map, fast-diff)" },
};

typedef struct {
  uint64_t disk;             /* source size */
  int writes;                /* guest writes per latency run */
  uint64_t speed;            /* job speed in the latency section (B/s) */
  uint64_t precopy;          /* bytes written before the throughput backup */
  int reps;
  char **only;
} Config;

static Config cfg = {
  .disk = 1024 * MiB,
  .writes = 60,
  .speed = 24 * MiB,
  .precopy = 256 * MiB,
  .reps = 3,
};

static const char *conf_path;
static const char *outdir;
static char *src_image;       /* the qcow2 source, made once */
static FILE *tsv;

/* ---- QEMU ------------------------------------------------------------- */

typedef struct {
  pid_t pid;
  char *dir, *log, *sock;
  Qmp *qmp;
} Vm;

static Vm *
vm_start (void)
{
  Vm *vm = g_new0 (Vm, 1);
  g_autofree char *qmparg = NULL, *bd = NULL;

  vm->dir = g_dir_make_tmp ("fleece-rbd-bench-XXXXXX", NULL);
  if (!vm->dir)
    die ("mkdtemp");
  vm->log = g_build_filename (vm->dir, "qemu.log", NULL);
  vm->sock = g_build_filename (vm->dir, "qmp.sock", NULL);
  qmparg = g_strdup_printf ("unix:%s,server=on,wait=off", vm->sock);
  bd = g_strdup_printf ("{\"driver\": \"qcow2\", \"node-name\": \"src\", "
                        "\"discard\": \"unmap\", \"file\": {\"driver\": "
                        "\"file\", \"filename\": \"%s\"}}", src_image);
  {
    char *argv[] = {
      (char *) "qemu-system-x86_64", (char *) "-machine", (char *) "q35",
      (char *) "-accel", (char *) "tcg", (char *) "-S",
      (char *) "-nodefaults", (char *) "-display", (char *) "none",
      (char *) "-qmp", qmparg, (char *) "-device",
      (char *) "virtio-scsi-pci,id=scsihw0", (char *) "-blockdev", bd, NULL,
    };
    vm->pid = spawn_logged (argv, vm->log);
  }
  vm->qmp = qmp_open (vm->sock);
  return vm;
}

static void
vm_stop (Vm *vm)
{
  char *e = NULL;
  json_object_put (qmp_try (vm->qmp, "quit", NULL, &e));
  g_free (e);
  qmp_close (vm->qmp);
  stop_pid (vm->pid);
  rm_rf (vm->dir);
  g_free (vm->dir);
  g_free (vm->log);
  g_free (vm->sock);
  g_free (vm);
}

static goffset
log_size (Vm *vm)
{
  struct stat st;
  return stat (vm->log, &st) == 0 ? st.st_size : 0;
}

/* qemu-io's own time of one write (ms), from "... and X ops/sec)". */
static double
guest_write (Vm *vm, uint64_t off, int pattern)
{
  g_autofree char *line = g_strdup_printf (
      "qemu-io -d sd0 \"write -P %d %" G_GUINT64_FORMAT " 64k\"", pattern, off);
  goffset before = log_size (vm);
  g_autofree char *out = hmp (vm->qmp, line);
  g_autofree char *all = NULL;
  gsize n = 0;
  const char *p;
  double ops;

  if (!g_file_get_contents (vm->log, &all, &n, NULL) || (goffset) n <= before)
    die ("qemu-io printed nothing for %s", line);
  p = strstr (all + before, " ops/sec)");
  if (strstr (all + before, "failed") || !p)
    die ("%s: %s", line, all + before);
  while (p > all + before && p[-1] != ' ')
    p--;
  ops = g_ascii_strtod (p, NULL);
  if (ops <= 0)
    die ("%s: no timing in %s", line, all + before);
  return 1000.0 / ops;
}

/* ---- the graph ---------------------------------------------------------- */

typedef struct {
  const Setup *v;
  Vm *vm;
  FleeceRbd *rbd;
  char *image_id;
  char *qcow2;
} Run;

static FleeceRbd *
new_rbd (uint64_t object_size)
{
  g_autoptr (GError) err = NULL;
  g_autofree char *os = g_strdup_printf ("%" G_GUINT64_FORMAT, object_size);
  FleeceRbd *r = fleece_rbd_new (POOL, NULL, &err);

  if (!r || !fleece_rbd_set_option (r, "conf", conf_path, &err)
      || (object_size && !fleece_rbd_set_option (r, "object-size", os, &err)))
    die ("rbd: %s", err->message);
  return r;
}

static void
cli (const char *const *argv)
{
  run_cmd ((char *const *) argv);
}

/* Make the fleecing image and add it (node "fl"), cbw over src, the
 * guest device on cbw, snapshot-access, the null-co target. */
static void
graph_setup (Run *run)
{
  const Setup *v = run->v;
  g_autoptr (GError) err = NULL;
  json_object *fl = NULL;

  run->vm = vm_start ();
  if (v->kind == ST_NONE) {
    json_object_put (qmp_do (run->vm->qmp, "device_add", json_parse (
        "{\"driver\": \"scsi-hd\", \"id\": \"sd0\", \"drive\": \"src\", "
        "\"bus\": \"scsihw0.0\"}")));
    return;
  }
  if (v->kind == ST_RBD) {
    run->rbd = new_rbd (v->object_size);
    if (v->no_object_map) {
      g_autofree char *os = g_strdup_printf ("%" G_GUINT64_FORMAT, v->object_size);
      g_autofree char *sz = g_strdup_printf ("%" G_GUINT64_FORMAT "B", cfg.disk);
      const char *argv[] = { "rbd", "-c", conf_path, "create", "--size", sz,
                             "--object-size", os, "--image-feature",
                             "layering", POOL "/" IMAGE, NULL };
      cli (argv);
      run->image_id = fleece_rbd_image_id (run->rbd, IMAGE, &err);
    } else if (!fleece_rbd_create (run->rbd, IMAGE, cfg.disk, &run->image_id,
                                   &err))
      die ("create: %s", err->message);
    if (!run->image_id)
      die ("image id: %s", err ? err->message : "?");
    fl = json_object_new_object ();
    json_object_object_add (fl, "driver", json_object_new_string ("raw"));
    json_object_object_add (fl, "file",
                            fleece_rbd_blockdev (run->rbd, IMAGE, "fl-file", NULL));
  } else {
    g_autofree char *sz = g_strdup_printf ("%" G_GUINT64_FORMAT, cfg.disk);
    run->qcow2 = g_build_filename (run->vm->dir, "fleece.qcow2", NULL);
    const char *argv[] = { "qemu-img", "create", "-q", "-f", "qcow2",
                           run->qcow2, sz, NULL };
    cli (argv);
    fl = json_parse ("{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", "
                     "\"node-name\": \"fl-file\", \"filename\": \"%s\", "
                     "\"discard\": \"unmap\"}}", run->qcow2);
  }
  json_object_object_add (fl, "node-name", json_object_new_string ("fl"));
  json_object_object_add (fl, "discard", json_object_new_string ("unmap"));
  json_object_object_add (fl, "detect-zeroes", json_object_new_string ("unmap"));
  json_object_put (qmp_do (run->vm->qmp, "blockdev-add", fl));
  json_object_put (qmp_do (run->vm->qmp, "blockdev-add", json_parse (
      "{\"driver\": \"copy-before-write\", \"node-name\": \"cbw\", "
      "\"file\": \"src\", \"target\": \"fl\", \"on-cbw-error\": "
      "\"break-snapshot\", \"cbw-timeout\": 45}")));
  json_object_put (qmp_do (run->vm->qmp, "device_add", json_parse (
      "{\"driver\": \"scsi-hd\", \"id\": \"sd0\", \"drive\": \"cbw\", "
      "\"bus\": \"scsihw0.0\"}")));
  json_object_put (qmp_do (run->vm->qmp, "blockdev-add", json_parse (
      "{\"driver\": \"snapshot-access\", \"node-name\": \"snap\", "
      "\"file\": \"cbw\", \"discard\": \"unmap\"}")));
  json_object_put (qmp_do (run->vm->qmp, "blockdev-add", json_parse (
      "{\"driver\": \"null-co\", \"node-name\": \"tgt\", \"size\": %"
      G_GUINT64_FORMAT "}", cfg.disk)));
}

static void
backup_start (Run *run, uint64_t speed)
{
  json_object_put (qmp_do (run->vm->qmp, "blockdev-backup", json_parse (
      "{\"job-id\": \"bk\", \"device\": \"snap\", \"target\": \"tgt\", "
      "\"sync\": \"full\", \"speed\": %" G_GUINT64_FORMAT ", "
      "\"discard-source\": true, \"auto-dismiss\": false, \"x-perf\": "
      "{\"min-cluster-size\": %" G_GUINT64_FORMAT ", \"max-workers\": 8}}",
      speed, run->v->job_cluster)));
}

/* The job's offset, or -1 once it has concluded (error: die). */
static int64_t
job_offset (Run *run)
{
  json_object *jobs = qmp_do (run->vm->qmp, "query-jobs", NULL);
  int64_t off = -2;

  for (size_t i = 0; i < json_object_array_length (jobs); i++) {
    json_object *j = json_object_array_get_idx (jobs, i), *v;
    if (!json_object_object_get_ex (j, "id", &v)
        || strcmp (json_object_get_string (v), "bk") != 0)
      continue;
    json_object_object_get_ex (j, "status", &v);
    if (strcmp (json_object_get_string (v), "concluded") == 0) {
      if (json_object_object_get_ex (j, "error", &v))
        die ("backup failed: %s", json_object_get_string (v));
      off = -1;
    } else {
      json_object_object_get_ex (j, "current-progress", &v);
      off = json_object_get_int64 (v);
    }
  }
  json_object_put (jobs);
  if (off == -2)
    die ("no job bk");
  return off;
}

static void
backup_finish (Run *run)
{
  while (job_offset (run) >= 0)
    g_usleep (20000);
  json_object_put (qmp_do (run->vm->qmp, "job-dismiss",
                           json_parse ("{\"id\": \"bk\"}")));
}

/* Bytes of the fleecing image: whole objects (rbd du) and exact (rbd
 * diff); st_blocks for the local qcow2. */
static void
fleecing_usage (Run *run, uint64_t *objects, uint64_t *exact)
{
  g_autoptr (GError) err = NULL;

  *objects = *exact = 0;
  if (run->v->kind == ST_QCOW2) {
    *objects = *exact = allocated_bytes (run->qcow2);
  } else if (run->v->kind == ST_RBD) {
    if (!fleece_rbd_image_usage (run->rbd, IMAGE, false, objects, &err)
        || !fleece_rbd_image_usage (run->rbd, IMAGE, true, exact, &err))
      die ("usage: %s", err->message);
  }
}

static void
graph_teardown (Run *run)
{
  g_autoptr (GError) err = NULL;

  vm_stop (run->vm);
  if (run->rbd) {
    if (!fleece_rbd_remove (run->rbd, IMAGE, run->image_id, &err))
      die ("remove: %s", err->message);
    fleece_rbd_free (run->rbd);
  }
  g_free (run->image_id);
  g_free (run->qcow2);
}

/* ---- sections ------------------------------------------------------------ */

typedef struct {
  GArray *lat;               /* ms, all reps */
  GArray *peak_obj, *left_obj, *left_exact, *copied;   /* bytes per rep */
  GArray *mibs, *thr_left_obj;                         /* throughput */
  GArray *load;
} Result;

static Result results[G_N_ELEMENTS (variants)];

static double
median (GArray *a)
{
  g_autoptr (GArray) c = NULL;
  if (a->len == 0)
    return NAN;
  c = g_array_copy (a);
  return quantile (c, 0.5);
}

static double
q_of (GArray *a, double q)
{
  g_autoptr (GArray) c = NULL;
  if (a->len == 0)
    return NAN;
  c = g_array_copy (a);
  return quantile (c, q);
}

static void
run_latency (const Setup *v, Result *res, int rep)
{
  Run run = { .v = v };
  GRand *rnd = g_rand_new_with_seed (1000 + rep);
  GHashTable *used = g_hash_table_new (g_direct_hash, g_direct_equal);
  uint64_t peak_obj = 0, o = 0, e = 0, cluster;
  double sum = 0;
  int n = 0;

  graph_setup (&run);
  if (v->kind != ST_NONE)
    backup_start (&run, cfg.speed);
  /* the unit copy-before-write copies: the fleecing image's cluster (RBD:
   * its object size; qcow2: 64 KiB) */
  cluster = v->kind == ST_RBD ? v->object_size : 64 * KiB;
  while (n < cfg.writes) {
    int64_t cur = v->kind == ST_NONE ? 0 : job_offset (&run);
    uint64_t lo, off;
    int tries = 0;

    if (cur < 0)
      die ("%s: the backup ended before %d writes (make it slower)", v->name,
           cfg.writes);
    /* ahead of the cursor and of the job's in-flight clusters */
    lo = (uint64_t) cur + MAX (64 * MiB, 16 * MAX (cluster, v->job_cluster));
    if (lo + cluster >= cfg.disk)
      die ("%s: cursor too close to the end", v->name);
    do {
      off = lo + (uint64_t) g_rand_double (rnd) * (cfg.disk - lo - 64 * KiB);
      off &= ~(64 * KiB - 1);
    } while (g_hash_table_contains (used, GSIZE_TO_POINTER (off / MAX (cluster, v->job_cluster)))
             && ++tries < 1000);
    g_hash_table_add (used, GSIZE_TO_POINTER (off / MAX (cluster, v->job_cluster)));
    double ms = guest_write (run.vm, off, 0x40 + n % 64);
    push (res->lat, ms);
    sum += ms;
    n++;
    if (n % 10 == 0 && v->kind != ST_NONE) {
      fleecing_usage (&run, &o, &e);
      peak_obj = MAX (peak_obj, o);
    }
    g_usleep (100 * 1000);
  }
  if (v->kind != ST_NONE) {
    fleecing_usage (&run, &o, &e);
    peak_obj = MAX (peak_obj, o);
    json_object_put (qmp_do (run.vm->qmp, "block-job-set-speed",
                             json_parse ("{\"device\": \"bk\", \"speed\": 0}")));
    backup_finish (&run);
    fleecing_usage (&run, &o, &e);
    push (res->peak_obj, (double) peak_obj);
    push (res->left_obj, (double) o);
    push (res->left_exact, (double) e);
    push (res->copied, (double) cfg.writes * (double) cluster);
  }
  fprintf (tsv, "latency\t%s\t%d\tmean_ms=%.3f\tpeak_obj=%" G_GUINT64_FORMAT
           "\tleft_obj=%" G_GUINT64_FORMAT "\tleft_exact=%" G_GUINT64_FORMAT
           "\tload=%.2f\n", v->name, rep, sum / n, peak_obj, o, e, loadavg1 ());
  fflush (tsv);
  note ("latency %-14s rep %d: mean %.2f ms, peak %.1f MiB, left %.2f MiB (exact %.2f MiB)\n",
        v->name, rep, sum / n, peak_obj / (double) MiB, o / (double) MiB,
        e / (double) MiB);
  graph_teardown (&run);
  g_hash_table_unref (used);
  g_rand_free (rnd);
}

static void
run_throughput (const Setup *v, Result *res, int rep)
{
  Run run = { .v = v };
  uint64_t o = 0, e = 0;
  gint64 t0, t1;
  double mibs;

  graph_setup (&run);
  /* the guest rewrites the first part of the disk: cbw copies it */
  for (uint64_t off = 0; off < cfg.precopy; off += 4 * MiB) {
    g_autofree char *line = g_strdup_printf (
        "qemu-io -d sd0 \"write -P 7 %" G_GUINT64_FORMAT " 4M\"", off);
    g_free (hmp (run.vm->qmp, line));
  }
  fleecing_usage (&run, &o, &e);
  if (o < cfg.precopy)
    die ("%s: only %" G_GUINT64_FORMAT " bytes in the fleecing image after "
         "the precopy", v->name, o);
  t0 = now_us ();
  backup_start (&run, 0);
  backup_finish (&run);
  t1 = now_us ();
  mibs = (double) cfg.disk / MiB / ((t1 - t0) / 1e6);
  fleecing_usage (&run, &o, &e);
  push (res->mibs, mibs);
  push (res->thr_left_obj, (double) o);
  fprintf (tsv, "throughput\t%s\t%d\tmibs=%.1f\tleft_obj=%" G_GUINT64_FORMAT
           "\tload=%.2f\n", v->name, rep, mibs, o, loadavg1 ());
  fflush (tsv);
  note ("throughput %-14s rep %d: %.0f MiB/s, left %.2f MiB\n", v->name, rep,
        mibs, o / (double) MiB);
  graph_teardown (&run);
}

static bool
wanted (const Setup *v)
{
  return !cfg.only || g_strv_contains ((const char *const *) cfg.only, v->name);
}

static char *
mib (double b)
{
  if (isnan (b))
    return g_strdup ("-");
  return g_strdup_printf ("%.1f", b / MiB);
}

static void
write_summary (double load0, double load1)
{
  g_autofree char *path = g_build_filename (outdir, "summary.md", NULL);
  FILE *f = fopen (path, "w");

  if (!f)
    die ("%s: %s", path, g_strerror (errno));
  fprintf (f, "Source: local qcow2, %" G_GUINT64_FORMAT " MiB of random data; "
           "target null-co; %d guest writes of 64 KiB per run, each into a "
           "cluster not yet copied, ahead of a backup limited to %"
           G_GUINT64_FORMAT " MiB/s; %d repetitions, variants interleaved; "
           "load average %.2f before, %.2f after.\n\n", (guint64) (cfg.disk / MiB),
           cfg.writes, (guint64) (cfg.speed / MiB), cfg.reps, load0, load1);
  fprintf (f, "| variant | write p50 ms | p90 ms | p99 ms | max ms | copied per run MiB "
           "| fleecing peak MiB (objects) | left after backup MiB (objects / exact) "
           "| throughput MiB/s (%" G_GUINT64_FORMAT " MiB precopied) | left after "
           "throughput run MiB |\n|---|---|---|---|---|---|---|---|---|---|\n",
           (guint64) (cfg.precopy / MiB));
  for (size_t i = 0; i < G_N_ELEMENTS (variants); i++) {
    Result *r = &results[i];
    g_autofree char *cp = mib (median (r->copied)), *pk = mib (median (r->peak_obj));
    g_autofree char *lo = mib (median (r->left_obj)), *le = mib (median (r->left_exact));
    g_autofree char *tl = mib (median (r->thr_left_obj));
    g_autofree char *thr = r->mibs->len
      ? g_strdup_printf ("%.0f", median (r->mibs)) : g_strdup ("-");
    if (r->lat->len == 0 && r->mibs->len == 0)
      continue;
    fprintf (f, "| %s | %.2f | %.2f | %.2f | %.2f | %s | %s | %s / %s | %s | %s |\n",
             variants[i].name, q_of (r->lat, 0.5), q_of (r->lat, 0.9),
             q_of (r->lat, 0.99), q_of (r->lat, 1.0), cp, pk, lo, le, thr, tl);
  }
  fprintf (f, "\nVariants:\n\n");
  for (size_t i = 0; i < G_N_ELEMENTS (variants); i++)
    if (wanted (&variants[i]))
      fprintf (f, "- `%s`: %s\n", variants[i].name, variants[i].desc);
  fclose (f);
}

int
main (int argc, char **argv)
{
  g_autofree char *tsvpath = NULL, *raw = NULL;
  double load0;

  if (argc < 3)
    die ("usage: rbd-bench CONF OUTDIR [--quick] [--reps N] [--only a,b]");
  conf_path = argv[1];
  outdir = argv[2];
  for (int i = 3; i < argc; i++) {
    if (strcmp (argv[i], "--quick") == 0) {
      cfg.reps = 1;
      cfg.writes = 30;
      cfg.disk = 512 * MiB;
      cfg.speed = 16 * MiB;
      cfg.precopy = 128 * MiB;
    } else if (strcmp (argv[i], "--reps") == 0 && i + 1 < argc) {
      cfg.reps = atoi (argv[++i]);
    } else if (strcmp (argv[i], "--only") == 0 && i + 1 < argc) {
      cfg.only = g_strsplit (argv[++i], ",", -1);
    } else {
      die ("unknown argument %s", argv[i]);
    }
  }
  g_mkdir_with_parents (outdir, 0755);
  tsvpath = g_build_filename (outdir, "results.tsv", NULL);
  tsv = fopen (tsvpath, "w");
  if (!tsv)
    die ("%s: %s", tsvpath, g_strerror (errno));
  for (size_t i = 0; i < G_N_ELEMENTS (variants); i++) {
    Result *r = &results[i];
    r->lat = g_array_new (FALSE, FALSE, sizeof (double));
    r->peak_obj = g_array_new (FALSE, FALSE, sizeof (double));
    r->left_obj = g_array_new (FALSE, FALSE, sizeof (double));
    r->left_exact = g_array_new (FALSE, FALSE, sizeof (double));
    r->copied = g_array_new (FALSE, FALSE, sizeof (double));
    r->mibs = g_array_new (FALSE, FALSE, sizeof (double));
    r->thr_left_obj = g_array_new (FALSE, FALSE, sizeof (double));
  }

  /* the source: random data, fully allocated qcow2 (64 KiB clusters) */
  raw = g_build_filename (outdir, "source.raw", NULL);
  src_image = g_build_filename (outdir, "source.qcow2", NULL);
  make_random_file (raw, cfg.disk, 42);
  {
    const char *conv[] = { "qemu-img", "convert", "-q", "-f", "raw", "-O",
                           "qcow2", raw, src_image, NULL };
    run_cmd ((char *const *) conv);
  }
  unlink (raw);

  load0 = loadavg1 ();
  for (int rep = 0; rep < cfg.reps; rep++) {
    for (size_t i = 0; i < G_N_ELEMENTS (variants); i++)
      if (variants[i].latency && wanted (&variants[i]))
        run_latency (&variants[i], &results[i], rep);
    for (size_t i = 0; i < G_N_ELEMENTS (variants); i++)
      if (variants[i].throughput && wanted (&variants[i]))
        run_throughput (&variants[i], &results[i], rep);
  }
  write_summary (load0, loadavg1 ());
  unlink (src_image);
  fclose (tsv);
  {
    g_autofree char *sp = g_build_filename (outdir, "summary.md", NULL);
    g_autofree char *text = NULL;
    if (g_file_get_contents (sp, &text, NULL, NULL))
      fputs (text, stdout);
  }
  return 0;
}
