/* The stock QEMU engine: builds over public QMP the graph that Proxmox's
 * patched QEMU builds inside its backup command (docs/design.md):
 *
 *   [device] --root--> [cbw] <--file-- [snapshot-access] --> backup job
 *                      |file  |target
 *                      v      v
 *               [old root] [fleecing image]
 *
 * The old root is whatever node the device used: a qemu-server 9 drive's
 * throttle node (so its limits keep applying to guest I/O), or the format
 * node of a -drive.  Every QMP command this engine sends is built in the
 * "commands" section below, so the sequence can be read top to bottom.
 * The record is written before each step that creates something, so that
 * cleanup can undo a run interrupted at any point. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine.h"
#include "target.h"

/* Requests of one job in flight (QEMU's default is 64): as fast or faster
 * on local targets, and guest writes queue behind fewer of the job's
 * requests (docs/benchmarks.md). */
#define JOB_MAX_WORKERS 8
#define JOB_END_TIMEOUT_MS 120000
#define JOB_POLL_MS 100

/* ---- names --------------------------------------------------------- */

/* All at most 31 characters for keys of at most 16 (plan.c checks). */
static char *fleecing_node (const char *key) { return g_strdup_printf ("drive-%s-fleecing", key); }
static char *fleecing_file_node (const char *key) { return g_strdup_printf ("%s-fleecing-file", key); }
static char *cbw_node (const char *key) { return g_strdup_printf ("%s-fleece-cbw", key); }
static char *snap_node (const char *key) { return g_strdup_printf ("%s-fleece-snap", key); }
static char *target_node (const char *key) { return g_strdup_printf ("%s-fleece-tgt", key); }
static char *target_file_node (const char *key) { return g_strdup_printf ("%s-fleece-tf", key); }
static char *job_id (const char *key) { return g_strdup_printf ("fleece-%s", key); }
/* blockdev-create jobs writing the qcow2 metadata of the fleecing image
 * and of a directory target's image. */
static char *format_job_id (const char *key) { return g_strdup_printf ("fleece-format-%s", key); }
static char *target_format_job_id (const char *key) { return g_strdup_printf ("fleece-format-target-%s", key); }
/* The coarse copy of an incremental's bitmap that cbw gets, the copy the
 * incremental's job reads (on its source node), and the copy of a bitmap
 * a full backup restarts (each given back if the run fails). */
static char *cbw_bitmap_name (const char *b) { return g_strdup_printf ("fleece-cbw-%s", b); }
static char *inc_bitmap_name (const char *b) { return g_strdup_printf ("fleece-inc-%s", b); }
static char *old_bitmap_name (const char *b) { return g_strdup_printf ("fleece-old-%s", b); }
/* An fd target's fd set, as QEMU names it in a file name. */
#define FD_TARGET_FDSET_OPAQUE "libfleece target"

/* ---- commands -------------------------------------------------------- */

static json_object *
bitmap_ref (const char *node, const char *name)
{
  json_object *b = json_object_new_object ();
  fleece_jset_str (b, "node", node);
  fleece_jset_str (b, "name", name);
  return b;
}

static json_object *
merge_args (const char *node, const char *target, const char *from_node,
            const char *from_name)
{
  json_object *m = json_object_new_object ();
  json_object *from = json_object_new_array ();

  fleece_jset_str (m, "node", node);
  fleece_jset_str (m, "target", target);
  json_object_array_add (from, bitmap_ref (from_node, from_name));
  json_object_object_add (m, "bitmaps", from);
  return m;
}

static bool
qmp_do (FleeceCtx *ctx, const char *cmd, json_object *args, GError **err)
{
  return fleece_conn_do (ctx->conn, cmd, args, err);
}

/* The job's cluster: discard is aligned inwards to it, so it must cover
 * the fleecing image's allocation unit (storage.c: 1 MiB for directories,
 * the object size for RBD, 4 MiB for a caller's storage). */
static uint64_t
job_cluster (FleeceCtx *ctx, const FleeceDrive *d)
{
  return MAX (fleece_storage_min_job_cluster (ctx->storage), d->cluster_size);
}

/* The incremental job reads whole job clusters around each dirty bit, and
 * snapshot-access refuses reads outside cbw's bitmap (EACCES): cbw gets a
 * copy of the bitmap coarsened to the job's cluster. */
static bool
cmd_add_cbw_bitmap (FleeceCtx *ctx, const FleeceDrive *d, const char *bnode,
                    GError **err)
{
  g_autofree char *coarse = cbw_bitmap_name (ctx->set->bitmap);
  json_object *add = bitmap_ref (bnode, coarse);

  fleece_jset_int (add, "granularity", (int64_t) job_cluster (ctx, d));
  fleece_jset_bool (add, "persistent", false);
  return qmp_do (ctx, "block-dirty-bitmap-add", add, err) &&
         qmp_do (ctx, "block-dirty-bitmap-merge",
                 merge_args (bnode, coarse, bnode, ctx->set->bitmap), err);
}

/* cbw copied the coarse bitmap when it opened; drop ours. */
static void
cmd_del_cbw_bitmap (FleeceCtx *ctx, const char *bnode, const char *bitmap)
{
  g_autoptr (GError) err = NULL;
  g_autofree char *coarse = cbw_bitmap_name (bitmap);

  if (!qmp_do (ctx, "block-dirty-bitmap-remove", bitmap_ref (bnode, coarse), &err))
    fleece_log (ctx, FLEECE_LOG_DEBUG, "%s", err->message);
}

/* The fleecing image's format node over its file node. */
static bool
cmd_add_fleecing (FleeceCtx *ctx, const FleeceDrive *d, GError **err)
{
  g_autofree char *node = fleecing_node (d->key);
  g_autofree char *fnode = fleecing_file_node (d->key);

  return fleece_add_image_format (ctx, d, node, fnode, err);
}

static bool
cmd_add_cbw (FleeceCtx *ctx, const FleeceDrive *d, const char *bnode,
             GError **err)
{
  g_autofree char *node = cbw_node (d->key);
  g_autofree char *target = fleecing_node (d->key);
  json_object *a = json_object_new_object ();

  fleece_jset_str (a, "driver", "copy-before-write");
  fleece_jset_str (a, "node-name", node);
  fleece_jset_str (a, "file", d->root);
  fleece_jset_str (a, "target", target);
  /* A failed or slow copy must break the backup, never the guest write. */
  fleece_jset_str (a, "on-cbw-error", "break-snapshot");
  if (ctx->set->cbw_timeout)
    fleece_jset_int (a, "cbw-timeout", ctx->set->cbw_timeout);
  if (ctx->set->bitmap && ctx->set->bitmap_mode == FLEECE_BITMAP_USE) {
    g_autofree char *coarse = cbw_bitmap_name (ctx->set->bitmap);
    json_object_object_add (a, "bitmap", bitmap_ref (bnode, coarse));
  }
  return qmp_do (ctx, "blockdev-add", a, err);
}

static bool
cmd_set_drive (FleeceCtx *ctx, const char *qdev, const char *node, GError **err)
{
  json_object *a = json_object_new_object ();

  fleece_jset_str (a, "path", qdev);
  fleece_jset_str (a, "property", "drive");
  fleece_jset_str (a, "value", node);
  return qmp_do (ctx, "qom-set", a, err);
}

static bool
cmd_add_snapshot_access (FleeceCtx *ctx, const FleeceDrive *d, GError **err)
{
  g_autofree char *node = snap_node (d->key);
  g_autofree char *cbw = cbw_node (d->key);
  json_object *a = json_object_new_object ();

  fleece_jset_str (a, "driver", "snapshot-access");
  fleece_jset_str (a, "node-name", node);
  fleece_jset_str (a, "file", cbw);
  /* Without it discard-source silently does nothing. */
  fleece_jset_str (a, "discard", "unmap");
  return qmp_do (ctx, "blockdev-add", a, err);
}

static bool
cmd_del (FleeceCtx *ctx, const char *node, GError **err)
{
  json_object *a = json_object_new_object ();

  fleece_jset_str (a, "node-name", node);
  return qmp_do (ctx, "blockdev-del", a, err);
}

static json_object *
perf_args (FleeceCtx *ctx, const FleeceDrive *d)
{
  const FleeceFeatures *f = ctx->features;
  json_object *perf = json_object_new_object ();

  if (f->perf_max_workers)
    fleece_jset_int (perf, "max-workers", JOB_MAX_WORKERS);
  /* Discard is aligned inwards to the job's cluster: it must cover the
   * fleecing image's allocation unit. */
  if (d->fleeced && f->perf_min_cluster_size)
    fleece_jset_int (perf, "min-cluster-size", (int64_t) job_cluster (ctx, d));
  return perf;
}

/* What a full backup copies.  "top" skips what the source's top layer
 * never allocated, where that reads as zeroes and the target does too
 * already: a sparse disk then costs what it holds, not its size ("full"
 * writes zeroes over every unallocated area: an NBD request per job chunk,
 * a raw file allocated to its full size).  A fleeced drive's job reads
 * snapshot-access, which reports every area as allocated: "full" there. */
static const char *
full_sync (const FleeceDrive *d, bool target_zeroed)
{
  return !d->fleeced && d->unallocated_zero && target_zeroed ? "top" : "full";
}

static json_object *
backup_action (FleeceCtx *ctx, const FleeceDrive *d, bool target_zeroed)
{
  g_autofree char *job = job_id (d->key);
  g_autofree char *src = d->fleeced ? snap_node (d->key) : g_strdup (d->root);
  g_autofree char *tgt = target_node (d->key);
  g_autofree char *inc = NULL;
  json_object *a = json_object_new_object ();
  bool incremental = ctx->set->bitmap && ctx->set->bitmap_mode == FLEECE_BITMAP_USE;

  fleece_jset_str (a, "job-id", job);
  fleece_jset_str (a, "device", src);
  fleece_jset_str (a, "target", tgt);
  fleece_jset_str (a, "sync", incremental ? "bitmap" : full_sync (d, target_zeroed));
  /* The copy is the run's read-only manifest: the job never changes it
   * (on success it would become the job's successor, holding only what
   * was written to the job's source meanwhile), so a failed run gives
   * back exactly the bits it took, whichever jobs completed. */
  if (incremental) {
    fleece_jset_str (a, "bitmap", inc = inc_bitmap_name (ctx->set->bitmap));
    fleece_jset_str (a, "bitmap-mode", "never");
  }
  /* We read the final status from query-jobs, then dismiss.  Each job
   * waits in "pending" until all have done their work and poll finalizes
   * them together: a small drive's job finalizing early drains its nodes
   * while the others still write, which stalled the main loop (and with
   * it the guest) for seconds behind a slow shared target. */
  fleece_jset_bool (a, "auto-dismiss", false);
  fleece_jset_bool (a, "auto-finalize", false);
  if (ctx->set->bwlimit_kib)
    fleece_jset_int (a, "speed", (int64_t) (ctx->set->bwlimit_kib * 1024));
  if (d->fleeced && ctx->features->discard_source)
    fleece_jset_bool (a, "discard-source", true);
  json_object_object_add (a, "x-perf", perf_args (ctx, d));
  return fleece_jaction ("blockdev-backup", a);
}

static bool
cmd_job (FleeceCtx *ctx, const char *cmd, const char *id, GError **err)
{
  return fleece_job_do (ctx, cmd, id, err);
}

/* ---- the node a dirty bitmap lives on ---------------------------------- */

typedef struct {
  char *node;            /* where the drive's bitmap is (or goes) */
  bool exists;           /* the bitmap is there now */
  bool persistent;       /* a new one can be persistent there (qcow2) */
} BitmapHome;

static void
bitmap_home_clear (BitmapHome *b)
{
  g_clear_pointer (&b->node, g_free);
}

/* Filters the guest's writes pass before its image (qemu-server 9: a
 * throttle node per drive): a bitmap may be on any node of the chain. */
static bool
is_filter (const char *drv)
{
  static const char *const filters[] = {
    "throttle", "copy-on-read", "preallocate", "compress", "blkdebug",
    "blkverify", NULL
  };
  return drv && g_strv_contains (filters, drv);
}

/* The "file" child of node in x-debug-query-block-graph. */
static const char *
graph_file_child (json_object *graph, const char *node)
{
  json_object *nodes = fleece_jobj (graph, "nodes"), *edges = fleece_jobj (graph, "edges");
  int64_t id = -1;

  for (size_t i = 0; nodes && i < json_object_array_length (nodes); i++)
    if (g_strcmp0 (fleece_jstr (json_object_array_get_idx (nodes, i), "name"), node) == 0)
      id = fleece_jint (json_object_array_get_idx (nodes, i), "id");
  for (size_t i = 0; edges && id >= 0 && i < json_object_array_length (edges); i++) {
    json_object *e = json_object_array_get_idx (edges, i);
    if (fleece_jint (e, "parent") != id || g_strcmp0 (fleece_jstr (e, "name"), "file"))
      continue;
    for (size_t j = 0; j < json_object_array_length (nodes); j++) {
      json_object *n = json_object_array_get_idx (nodes, j);
      if (fleece_jint (n, "id") == fleece_jint (e, "child"))
        return fleece_jstr (n, "name");
    }
  }
  return NULL;
}

static json_object *
named_node (json_object *nodes, const char *name)
{
  for (size_t i = 0; name && i < json_object_array_length (nodes); i++)
    if (g_strcmp0 (fleece_jstr (json_object_array_get_idx (nodes, i), "node-name"), name) == 0)
      return json_object_array_get_idx (nodes, i);
  return NULL;
}

static bool
has_bitmap (json_object *node, const char *name)
{
  json_object *bms = fleece_jobj (node, "dirty-bitmaps");

  for (size_t k = 0; bms && json_object_is_type (bms, json_type_array) &&
                     k < json_object_array_length (bms); k++)
    if (g_strcmp0 (fleece_jstr (json_object_array_get_idx (bms, k), "name"), name) == 0)
      return true;
  return false;
}

/* Walk from root through filters to the image: the first node with the
 * bitmap is its home; without one, the image's format node is. */
static bool
find_bitmap_home (FleeceCtx *ctx, const char *root, BitmapHome *home,
                  GError **err)
{
  json_object *args = json_object_new_object ();
  g_autoptr (json_object) nodes = NULL;
  g_autoptr (json_object) graph = NULL;
  const char *name = root;

  fleece_jset_bool (args, "flat", true);
  if (!(nodes = fleece_conn_execute (ctx->conn, "query-named-block-nodes", args, err)) ||
      !(graph = fleece_conn_execute (ctx->conn, "x-debug-query-block-graph", NULL, err)))
    return false;
  for (int depth = 0; name && depth < 8; depth++) {
    json_object *n = named_node (nodes, name);
    const char *drv = fleece_jstr (n, "drv");

    if (n && has_bitmap (n, ctx->set->bitmap)) {
      home->node = g_strdup (name);
      home->exists = true;
      return true;
    }
    if (!is_filter (drv)) {
      home->node = g_strdup (name);
      home->persistent = g_strcmp0 (drv, "qcow2") == 0;
      return true;
    }
    name = graph_file_child (graph, name);
  }
  g_set_error (err, FLEECE_ERROR, ENOENT, "cannot find the image below node "
               "%s for the dirty bitmap %s", root, ctx->set->bitmap);
  return false;
}

/* ---- the record ------------------------------------------------------------ */

static void
qemu_record_init (FleeceRun *run)
{
  json_object *drives = fleece_record_drives (run->record);

  fleece_jset_bool (run->record, "paused-by-us", false);
  for (size_t i = 0; i < json_object_array_length (drives); i++)
    fleece_jset_str (json_object_array_get_idx (drives, i), "target-file", NULL);
}

/* ---- undo, shared by failures and fleece_cleanup() ----------------------- */

typedef enum {
  JOB_NONE,
  JOB_BACKUP,           /* fleece-<key> */
  JOB_FORMAT,           /* blockdev-create of the fleecing image */
  JOB_TARGET_FORMAT,    /* blockdev-create of a directory target's image */
} JobKind;

/* Which of the jobs a run makes for the drives (record entries) id is. */
static JobKind
job_kind (json_object *drives, const char *id)
{
  for (size_t i = 0; id && i < json_object_array_length (drives); i++) {
    const char *key = fleece_jstr (json_object_array_get_idx (drives, i), "key");
    g_autofree char *j = job_id (key);
    g_autofree char *f = format_job_id (key);
    g_autofree char *tf = target_format_job_id (key);

    if (g_strcmp0 (j, id) == 0)
      return JOB_BACKUP;
    if (g_strcmp0 (f, id) == 0)
      return JOB_FORMAT;
    if (g_strcmp0 (tf, id) == 0)
      return JOB_TARGET_FORMAT;
  }
  return JOB_NONE;
}

/* One round over the jobs of drives: dismiss the concluded ones, cancel
 * the others (once, remembered in cancelled).  Returns whether any is
 * still pending, or -1. */
static int
settle_round (FleeceCtx *ctx, json_object *drives, GHashTable *cancelled,
              GError **err)
{
  g_autoptr (json_object) jobs = fleece_query_jobs (ctx, err);
  int pending = 0;

  if (!jobs)
    return -1;
  for (size_t i = 0; i < json_object_array_length (jobs); i++) {
    json_object *j = json_object_array_get_idx (jobs, i);
    const char *id = fleece_jstr (j, "id"), *status = fleece_jstr (j, "status");
    g_autoptr (GError) cerr = NULL;

    if (job_kind (drives, id) == JOB_NONE || g_strcmp0 (status, "null") == 0)
      continue;
    if (g_strcmp0 (status, "concluded") == 0) {
      if (!cmd_job (ctx, "job-dismiss", id, err))
        return -1;
      continue;
    }
    pending = 1;
    if (g_hash_table_contains (cancelled, id))
      continue;
    fleece_log (ctx, FLEECE_LOG_INFO, "cancelling job %s", id);
    /* It may conclude meanwhile and refuse: the next round dismisses it. */
    if (!cmd_job (ctx, "job-cancel", id, &cerr))
      fleece_log (ctx, FLEECE_LOG_DEBUG, "job-cancel %s: %s", id, cerr->message);
    g_hash_table_add (cancelled, g_strdup (id));
  }
  return pending;
}

/* Cancel the run's jobs and wait until they have really ended (job-cancel
 * returns first), dismissing them; the monitor is free between looks. */
static bool
settle_jobs (FleeceCtx *ctx, json_object *drives, GError **err)
{
  gint64 deadline = g_get_monotonic_time () + JOB_END_TIMEOUT_MS * 1000LL;
  g_autoptr (GHashTable) cancelled = g_hash_table_new_full (g_str_hash, g_str_equal,
                                                            g_free, NULL);
  int pending;

  while ((pending = settle_round (ctx, drives, cancelled, err)) > 0) {
    if (g_get_monotonic_time () > deadline) {
      g_set_error (err, FLEECE_ERROR, ETIMEDOUT, "the jobs did not end within "
                   "%d s of being cancelled; run the cleanup again later",
                   JOB_END_TIMEOUT_MS / 1000);
      return false;
    }
    fleece_conn_sleep (ctx->conn, JOB_POLL_MS, NULL);
  }
  return pending == 0;
}

static void
bitmap_cmd (FleeceCtx *ctx, const char *cmd, json_object *args)
{
  g_autoptr (GError) err = NULL;

  if (!qmp_do (ctx, cmd, args, &err))
    fleece_log (ctx, FLEECE_LOG_DEBUG, "%s: %s", cmd, err->message);
}

/* Put the drive's bitmap back as the run found it unless it succeeded:
 * an incremental's copy merged back, a restarted bitmap's old bits merged
 * back (or a new one removed).  Failures here mean there was nothing to
 * give back (the run died before its transaction). */
static void
bitmap_undo (FleeceCtx *ctx, json_object *record, json_object *d)
{
  const char *b = fleece_jstr (record, "bitmap"), *bnode = fleece_jstr (d, "bitmap-node");
  const char *copy = fleece_jstr (d, "bitmap-copy-node");
  bool ok = g_strcmp0 (fleece_jstr (record, "state"), "succeeded") == 0;
  g_autofree char *old = b ? old_bitmap_name (b) : NULL;
  g_autofree char *inc = b ? inc_bitmap_name (b) : NULL;

  if (!b || !bnode)
    return;
  if (g_strcmp0 (fleece_jstr (record, "state"), "starting") == 0)
    cmd_del_cbw_bitmap (ctx, bnode, b);
  if (g_strcmp0 (fleece_jstr (record, "bitmap-mode"), "use") == 0 && copy) {
    if (!ok)
      bitmap_cmd (ctx, "block-dirty-bitmap-merge", merge_args (bnode, b, copy, inc));
    bitmap_cmd (ctx, "block-dirty-bitmap-remove", bitmap_ref (copy, inc));
  } else if (fleece_jbool (d, "bitmap-existed")) {
    if (!ok)
      bitmap_cmd (ctx, "block-dirty-bitmap-merge", merge_args (bnode, b, bnode, old));
    bitmap_cmd (ctx, "block-dirty-bitmap-remove", bitmap_ref (bnode, old));
  } else if (!ok && g_strcmp0 (fleece_jstr (record, "bitmap-mode"), "new") == 0) {
    bitmap_cmd (ctx, "block-dirty-bitmap-remove", bitmap_ref (bnode, b));
  }
}

static bool
del_if_present (FleeceCtx *ctx, GHashTable *nodes, const char *node,
                GError **err)
{
  if (!node || !g_hash_table_contains (nodes, node))
    return true;
  if (!cmd_del (ctx, node, err))
    return false;
  g_hash_table_remove (nodes, node);
  return true;
}

typedef char *(*NodeNameFn) (const char *key);

/* Delete, for every drive (record entries), the nodes names (NULL-ended)
 * make of its key, if present; with requery, *nodes is refreshed first. */
static bool
del_layer (FleeceCtx *ctx, json_object *drives, GHashTable **nodes,
           const NodeNameFn *names, bool requery, GError **err)
{
  if (requery) {
    g_hash_table_unref (*nodes);
    if (!(*nodes = fleece_query_nodes (ctx, err)))
      return false;
  }
  for (size_t i = 0; i < json_object_array_length (drives); i++) {
    const char *key = fleece_jstr (json_object_array_get_idx (drives, i), "key");

    for (const NodeNameFn *f = names; *f; f++) {
      g_autofree char *node = (*f) (key);
      if (!del_if_present (ctx, *nodes, node, err))
        return false;
    }
  }
  return true;
}

/* Re-point only devices that point at our filter: qom-set to the node a
 * device already uses aborts QEMU 10.0.2.  The graph after cleanup equals
 * the graph before: each device gets exactly the node it had. */
static bool
restore_devices (FleeceCtx *ctx, json_object *drives, GHashTable *nodes,
                 GError **err)
{
  g_autoptr (GHashTable) roots = fleece_query_roots (ctx, err);

  if (!roots)
    return false;
  for (size_t i = 0; i < json_object_array_length (drives); i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    g_autofree char *cbw = cbw_node (fleece_jstr (d, "key"));
    const char *qdev = fleece_jstr (d, "qdev"), *root = fleece_jstr (d, "root");
    const char *cur = qdev ? g_hash_table_lookup (roots, qdev) : NULL;

    if (!cur || strcmp (cur, cbw) != 0)
      continue;
    if (!root || !g_hash_table_contains (nodes, root)) {
      g_set_error (err, FLEECE_ERROR, ENOENT, "device %s uses %s but its "
                   "original node '%s' is gone; it cannot be restored", qdev,
                   cbw, root ? root : "");
      return false;
    }
    if (!cmd_set_drive (ctx, qdev, root, err))
      return false;
  }
  return true;
}

static bool
resume_vm (FleeceCtx *ctx, json_object *record, GError **err)
{
  g_autoptr (json_object) st = NULL;

  if (!fleece_jbool (record, "paused-by-us"))
    return true;
  if (!(st = fleece_conn_execute (ctx->conn, "query-status", NULL, err)))
    return false;
  if (!fleece_jbool (st, "running") && !qmp_do (ctx, "cont", NULL, err))
    return false;
  fleece_jset_bool (record, "paused-by-us", false);
  return true;
}

static void
remove_fd_target (FleeceCtx *ctx, json_object *record)
{
  json_object *a;

  if (!fleece_jobj (record, "fdset-id"))
    return;
  a = json_object_new_object ();
  fleece_jset_int (a, "fdset-id", fleece_jint (record, "fdset-id"));
  bitmap_cmd (ctx, "remove-fd", a);
  json_object_object_del (record, "fdset-id");
}

/* Teardown strictly in the order that avoids "in use" and permission
 * conflicts: jobs, bitmaps and snapshot-access, re-point the devices, cbw
 * and targets, the fleecing images.  Every step tolerates "already
 * gone". */
static bool
qemu_undo (FleeceCtx *ctx, json_object *record, bool keep_images, GError **err)
{
  static const NodeNameFn snaps[] = { snap_node, NULL };
  static const NodeNameFn filters[] = { cbw_node, target_node, NULL };
  static const NodeNameFn images[] = { target_file_node, fleecing_node, NULL };
  static const NodeNameFn target_files[] = { target_file_node, NULL };
  static const NodeNameFn image_files[] = { fleecing_file_node, NULL };
  json_object *drives = fleece_record_drives (record);
  g_autoptr (GHashTable) nodes = NULL;

  if (!drives) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "the record has no drives");
    return false;
  }
  if (!settle_jobs (ctx, drives, err))
    return false;
  for (size_t i = 0; i < json_object_array_length (drives); i++)
    bitmap_undo (ctx, record, json_object_array_get_idx (drives, i));
  /* Children added inline go with their parent, those added on their own
   * (to be formatted) stay: look again before each layer, once for all
   * drives (once per drive made cleanup quadratic). */
  if (!(nodes = fleece_query_nodes (ctx, err)) ||
      !del_layer (ctx, drives, &nodes, snaps, false, err) ||
      !restore_devices (ctx, drives, nodes, err) ||
      !del_layer (ctx, drives, &nodes, filters, false, err) ||
      !del_layer (ctx, drives, &nodes, keep_images ? target_files : images, true, err) ||
      (!keep_images && !del_layer (ctx, drives, &nodes, image_files, true, err)))
    return false;
  remove_fd_target (ctx, record);
  return resume_vm (ctx, record, err);
}

/* ---- what QEMU shows of a run, without its record ------------------------ */

/* The key a node or job name of this engine (or qemu-server's fleecing
 * names) is made of, or NULL. */
static char *
key_of_name (const char *name)
{
  static const char *const suffixes[] = {
    "-fleece-cbw", "-fleece-snap", "-fleece-tgt", "-fleece-tf",
    "-fleecing-file", NULL
  };
  static const char *const prefixes[] = {
    "fleece-format-target-", "fleece-format-", "fleece-", NULL
  };

  if (g_str_has_prefix (name, "drive-") && g_str_has_suffix (name, "-fleecing"))
    return g_strndup (name + 6, strlen (name) - 6 - strlen ("-fleecing"));
  for (size_t i = 0; suffixes[i]; i++)
    if (g_str_has_suffix (name, suffixes[i]) && strlen (name) > strlen (suffixes[i]))
      return g_strndup (name, strlen (name) - strlen (suffixes[i]));
  for (size_t i = 0; prefixes[i]; i++)
    if (g_str_has_prefix (name, prefixes[i]) && name[strlen (prefixes[i])])
      return g_strdup (name + strlen (prefixes[i]));
  return NULL;
}

static void
found_add (GHashTable *keys, json_object *traces, const char *name)
{
  g_autofree char *key = key_of_name (name);

  if (!key)
    return;
  json_object_array_add (traces, json_object_new_string (name));
  g_hash_table_add (keys, g_steal_pointer (&key));
}

/* The drives' entries: the device now on our cbw and the node below it
 * (cbw's file child), so that undo re-points exactly that. */
static json_object *
found_drives (FleeceCtx *ctx, GHashTable *keys, GError **err)
{
  g_autoptr (GHashTable) roots = fleece_query_roots (ctx, err);
  g_autoptr (json_object) graph = NULL;
  json_object *drives = json_object_new_array ();
  GHashTableIter it;
  gpointer key;

  if (!roots || !(graph = fleece_conn_execute (ctx->conn, "x-debug-query-block-graph", NULL, err))) {
    json_object_put (drives);
    return NULL;
  }
  g_hash_table_iter_init (&it, keys);
  while (g_hash_table_iter_next (&it, &key, NULL)) {
    g_autofree char *cbw = cbw_node (key);
    json_object *d = json_object_new_object ();
    GHashTableIter rit;
    gpointer qdev, node;

    fleece_jset_str (d, "key", key);
    g_hash_table_iter_init (&rit, roots);
    while (g_hash_table_iter_next (&rit, &qdev, &node))
      if (strcmp (node, cbw) == 0) {
        fleece_jset_str (d, "qdev", qdev);
        fleece_jset_str (d, "root", graph_file_child (graph, cbw));
      }
    json_object_array_add (drives, d);
  }
  return drives;
}

/* The files of fleecing images QEMU has attached under our names. */
static json_object *
found_images (FleeceCtx *ctx, json_object *nodes)
{
  json_object *images = json_object_new_array ();

  for (size_t i = 0; i < json_object_array_length (nodes); i++) {
    json_object *n = json_object_array_get_idx (nodes, i);
    const char *name = fleece_jstr (n, "node-name");

    if (name && g_str_has_suffix (name, "-fleecing-file") && fleece_jstr (n, "file"))
      json_object_array_add (images, json_object_new_string (fleece_jstr (n, "file")));
  }
  return images;
}

static json_object *
qemu_find (FleeceCtx *ctx, GError **err)
{
  json_object *args = json_object_new_object ();
  g_autoptr (json_object) nodes = NULL;
  g_autoptr (json_object) jobs = NULL;
  g_autoptr (GHashTable) keys = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  json_object *traces = json_object_new_array (), *found, *drives;

  fleece_jset_bool (args, "flat", true);
  if (!(nodes = fleece_conn_execute (ctx->conn, "query-named-block-nodes", args, err)) ||
      !(jobs = fleece_query_jobs (ctx, err))) {
    json_object_put (traces);
    return NULL;
  }
  for (size_t i = 0; i < json_object_array_length (nodes); i++)
    if (fleece_jstr (json_object_array_get_idx (nodes, i), "node-name"))
      found_add (keys, traces, fleece_jstr (json_object_array_get_idx (nodes, i), "node-name"));
  for (size_t i = 0; i < json_object_array_length (jobs); i++)
    if (fleece_jstr (json_object_array_get_idx (jobs, i), "id"))
      found_add (keys, traces, fleece_jstr (json_object_array_get_idx (jobs, i), "id"));
  if (json_object_array_length (traces) == 0) {
    json_object_put (traces);
    return NULL;
  }
  if (!(drives = found_drives (ctx, keys, err))) {
    json_object_put (traces);
    return NULL;
  }
  found = json_object_new_object ();
  fleece_jset_str (found, "engine", "qemu");
  fleece_jset_str (found, "state", "found");
  json_object_object_add (found, "drives", drives);
  json_object_object_add (found, "traces", traces);
  json_object_object_add (found, "images", found_images (ctx, nodes));
  return found;
}

/* ---- plan ------------------------------------------------------------------ */

/* The QOM property of path, or NULL (g_free) if it has none or it is empty. */
static char *
qom_get_str (FleeceCtx *ctx, const char *path, const char *prop)
{
  json_object *a = json_object_new_object ();
  g_autoptr (json_object) r = NULL;
  const char *v;

  fleece_jset_str (a, "path", path);
  fleece_jset_str (a, "property", prop);
  r = fleece_conn_execute (ctx->conn, "qom-get", a, NULL);
  if (!r || !json_object_is_type (r, json_type_string))
    return NULL;
  v = json_object_get_string (r);
  return v && *v ? g_strdup (v) : NULL;
}

/* Does the device (virtio-blk) or its controller (virtio-scsi, through the
 * bus it sits on) run its I/O in an iothread? */
static bool
uses_iothread (FleeceCtx *ctx, const char *qdev)
{
  g_autofree char *io = qom_get_str (ctx, qdev, "iothread");
  g_autofree char *bus = NULL;
  g_autofree char *ctrl = NULL;
  g_autofree char *ctrl_io = NULL;

  if (io)
    return true;
  if (!(bus = qom_get_str (ctx, qdev, "parent_bus")))
    return false;
  ctrl = g_path_get_dirname (bus);
  ctrl_io = qom_get_str (ctx, ctrl, "iothread");
  return ctrl_io != NULL;
}

/* QEMU 10.0.0 to 10.0.2 can crash on qom-set drive of a device whose
 * BlockBackend is in an iothread (missing return in set_drive_helper,
 * fixed in 10.0.3): refuse rather than kill the VM. */
static bool
check_iothread_bug (FleeceCtx *ctx, struct fleece_plan *p, GError **err)
{
  const FleeceFeatures *f = ctx->features;
  g_autoptr (json_object) threads = NULL;

  if (!(f->qemu_major == 10 && f->qemu_minor == 0 && f->qemu_micro <= 2))
    return true;
  if (!(threads = fleece_conn_execute (ctx->conn, "query-iothreads", NULL, err)))
    return false;
  for (guint i = 0; json_object_array_length (threads) > 0 && i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];

    if (!d->fleeced || !uses_iothread (ctx, d->qdev))
      continue;
    if (ctx->set->plan_flags & FLEECE_PLAN_FLEECING_OPTIONAL) {
      fleece_log (ctx, FLEECE_LOG_WARNING, "drive %s runs in an iothread, and "
                  "QEMU %d.%d.%d can crash the VM when a fleecing filter goes in "
                  "front of it (fixed in 10.0.3): backing it up without "
                  "fleecing", d->key, f->qemu_major, f->qemu_minor, f->qemu_micro);
      fleece_plan_unfleece (p, d, "runs in an iothread, which QEMU before "
                            "10.0.3 cannot fleece safely");
      continue;
    }
    g_set_error (err, FLEECE_ERROR, ENOTSUP,
                 "drive %s runs in an iothread, and QEMU %d.%d.%d can crash "
                 "the VM when the stock engine puts a fleecing filter in "
                 "front of such a device (fixed in QEMU 10.0.3). Upgrade "
                 "QEMU to 10.0.3 or later, use Proxmox's QEMU (its engine "
                 "does not re-point devices), back this drive up without "
                 "fleecing, or allow that (FLEECE_PLAN_FLEECING_OPTIONAL)",
                 d->key, f->qemu_major, f->qemu_minor, f->qemu_micro);
    return false;
  }
  return true;
}

/* Incremental needs the bitmap on every backed-up drive. */
static bool
check_bitmaps (FleeceCtx *ctx, struct fleece_plan *p, GError **err)
{
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    BitmapHome home = { 0 };
    bool ok = find_bitmap_home (ctx, d->root, &home, err);
    bool exists = home.exists;

    bitmap_home_clear (&home);
    if (!ok)
      return false;
    if (!exists) {
      g_set_error (err, FLEECE_ERROR, ENOENT,
                   "drive %s has no dirty bitmap '%s' (on %s or the image "
                   "below it): start a chain with a full backup that starts "
                   "the bitmap (FLEECE_BITMAP_NEW), or back up in full",
                   d->key, ctx->set->bitmap, d->root);
      return false;
    }
  }
  return true;
}

static const char *
missing_feature (const FleeceFeatures *f)
{
  return !f->cbw ? "the copy-before-write driver"
    : !f->snapshot_access ? "the snapshot-access driver"
    : !f->cbw_on_cbw_error || !f->cbw_timeout ? "copy-before-write's on-cbw-error/cbw-timeout"
    : NULL;
}

static void
warn_missing_extras (FleeceCtx *ctx)
{
  const FleeceFeatures *f = ctx->features;

  if (!f->discard_source)
    fleece_log (ctx, FLEECE_LOG_WARNING, "QEMU %d.%d.%d lacks blockdev-backup "
                "discard-source (QEMU >= 9.1): fleecing images keep every "
                "copied cluster until the end", f->qemu_major, f->qemu_minor,
                f->qemu_micro);
  if (!f->perf_min_cluster_size)
    fleece_log (ctx, FLEECE_LOG_WARNING, "QEMU %d.%d.%d lacks backup "
                "x-perf.min-cluster-size (QEMU >= 9.2): discard may not free "
                "space in images with large clusters", f->qemu_major,
                f->qemu_minor, f->qemu_micro);
}

static bool
qemu_check_plan (FleeceCtx *ctx, struct fleece_plan *p, GError **err)
{
  const FleeceFeatures *f = ctx->features;
  const char *missing = missing_feature (f);
  bool any_fleeced = false;

  if (ctx->set->bitmap && ctx->set->bitmap_mode == FLEECE_BITMAP_USE &&
      !check_bitmaps (ctx, p, err))
    return false;
  for (guint i = 0; i < p->drives->len; i++)
    any_fleeced |= ((FleeceDrive *) p->drives->pdata[i])->fleeced;
  if (!any_fleeced)
    return true;
  if (missing) {
    g_autofree char *why = g_strdup_printf ("QEMU %d.%d.%d lacks %s, which "
                                            "fleecing needs (QEMU >= 7.1; 9.2 "
                                            "or later recommended)", f->qemu_major,
                                            f->qemu_minor, f->qemu_micro, missing);
    return fleece_plan_fleecing_unavailable (ctx, p, why, err);
  }
  if (!check_iothread_bug (ctx, p, err))
    return false;
  if (ctx->set->bitmap && ctx->set->bitmap_mode == FLEECE_BITMAP_USE && !f->cbw_bitmap) {
    g_set_error (err, FLEECE_ERROR, ENOTSUP, "QEMU %d.%d.%d lacks "
                 "copy-before-write's bitmap option, which incremental "
                 "fleecing needs (QEMU >= 7.0)", f->qemu_major, f->qemu_minor,
                 f->qemu_micro);
    return false;
  }
  warn_missing_extras (ctx);
  return true;
}

static bool
qemu_formats_images (FleeceCtx *ctx)
{
  return true;
}

/* ---- attach ---------------------------------------------------------------- */

static bool
verify_sizes (FleeceCtx *ctx, struct fleece_plan *p, GError **err)
{
  g_autoptr (GHashTable) nodes = fleece_query_nodes (ctx, err);

  if (!nodes)
    return false;
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    g_autofree char *node = fleecing_node (d->key);

    if (d->fleeced && !fleece_check_node_size (nodes, node, d, err))
      return false;
  }
  return true;
}

/* Images that came as empty files get their qcow2 metadata from QEMU, one
 * blockdev-create job per image started as soon as its file node exists
 * and all awaited together (for 64 drives that adds ~110 ms to attaching
 * raw images; qemu-img 64 times added ~500 ms, docs/benchmarks.md). */
static bool
add_image_files (FleeceRun *run, GHashTable *jobs, GError **err)
{
  FleeceCtx *ctx = run->ctx;

  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    g_autofree char *fnode = fleecing_file_node (d->key);
    g_autofree char *job = format_job_id (d->key);

    if (!d->fleeced)
      continue;
    if (!fleece_add_image_file (ctx, d, fnode, err))
      return false;
    if (fleece_jbool (fleece_run_drive (run, d->key), "unformatted")) {
      if (!fleece_format_qcow2 (ctx, job, fnode, d->size, 0, NULL, NULL, err))
        return false;
      g_hash_table_insert (jobs, g_steal_pointer (&job), g_strdup (d->image));
    }
  }
  return true;
}

static bool
qemu_attach (FleeceRun *run, GError **err)
{
  g_autoptr (GHashTable) jobs = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);

  if (!fleece_add_storage_objects (run, err) || !add_image_files (run, jobs, err) ||
      (g_hash_table_size (jobs) > 0 && !fleece_finish_format_jobs (run->ctx, jobs, err)))
    return false;
  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];

    if (!d->fleeced)
      continue;
    if (!cmd_add_fleecing (run->ctx, d, err))
      return false;
    fleece_log (run->ctx, FLEECE_LOG_INFO, "attached %s (%s, %" G_GUINT64_FORMAT
                " bytes) for %s", d->image, d->format, d->size, d->key);
  }
  return verify_sizes (run->ctx, run->plan, err);
}

/* ---- start ----------------------------------------------------------------- */

static bool
incremental (FleeceCtx *ctx)
{
  return ctx->set->bitmap && ctx->set->bitmap_mode == FLEECE_BITMAP_USE;
}

static bool
check_target (FleeceRun *run, struct fleece_target *t, GError **err)
{
  const char *why = NULL;

  if (t->kind == FLEECE_TARGET_PVE)
    why = "a Proxmox backup target needs the Proxmox engine; use a directory, "
          "NBD or fd target with stock QEMU";
  else if (t->kind == FLEECE_TARGET_FD && strcmp (t->format, "raw") != 0)
    why = "the stock engine writes a raw image to an fd target (VMA archives "
          "need Proxmox's QEMU)";
  else if (t->kind == FLEECE_TARGET_FD && run->plan->drives->len != 1)
    why = "an fd target holds one drive: restrict the plan to one "
          "(fleece_set_drives())";
  else if (t->kind == FLEECE_TARGET_DIR && t->base && !incremental (run->ctx))
    why = "a base is the previous backup of an incremental chain: set the "
          "bitmap with FLEECE_BITMAP_USE, or drop the base";
  else if (t->kind == FLEECE_TARGET_DIR && incremental (run->ctx) &&
           (strcmp (t->format, "qcow2") != 0 || !t->base))
    why = "an incremental backup into a directory is a qcow2 image over the "
          "previous backup of the chain: use format qcow2 and give the "
          "previous backup's directory as the base (fleece_target_set_base())";
  if (why)
    g_set_error (err, FLEECE_ERROR, EINVAL, "%s", why);
  return why == NULL;
}

/* The device's root may have changed since planning (a block job, a
 * throttle change); back up and restore the node it uses now.  What is
 * below it may have changed too (a snapshot puts an overlay with a backing
 * file under the throttle node): whether sync "top" may skip what the
 * image never allocated is decided again here, from the same reply. */
static bool
refresh_roots (FleeceRun *run, GError **err)
{
  g_autoptr (json_object) blocks = fleece_conn_execute (run->ctx->conn, "query-block", NULL, err);
  g_autoptr (GHashTable) images = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  g_autoptr (GHashTable) roots = blocks ? fleece_roots_of (blocks, images) : NULL;
  GPtrArray *drives = run->plan->drives;

  if (!roots)
    return false;
  for (guint i = 0; i < drives->len; i++) {
    FleeceDrive *d = drives->pdata[i];
    const char *cur = d->qdev ? g_hash_table_lookup (roots, d->qdev) : d->root;

    if (!cur) {
      g_set_error (err, FLEECE_ERROR, ENODEV, "drive %s (%s) is gone since "
                   "the plan was made; plan again", d->key, d->qdev);
      return false;
    }
    if (strcmp (cur, d->root) != 0) {
      g_free (d->root);
      d->root = g_strdup (cur);
      fleece_jset_str (fleece_run_drive (run, d->key), "root", cur);
    }
    d->unallocated_zero = d->qdev &&
      fleece_image_unallocated_zero (g_hash_table_lookup (images, d->qdev));
  }
  return true;
}

/* Where each drive's bitmap is, recorded before anything touches it. */
static bool
record_bitmap_homes (FleeceRun *run, GError **err)
{
  FleeceCtx *ctx = run->ctx;

  for (guint i = 0; ctx->set->bitmap && i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    json_object *e = fleece_run_drive (run, d->key);
    BitmapHome home = { 0 };

    if (!find_bitmap_home (ctx, d->root, &home, err))
      return false;
    fleece_jset_str (e, "bitmap-node", home.node);
    fleece_jset_bool (e, "bitmap-existed", home.exists);
    fleece_jset_bool (e, "bitmap-persistent", home.persistent);
    if (incremental (ctx)) {
      g_autofree char *snap = snap_node (d->key);
      fleece_jset_str (e, "bitmap-copy-node", d->fleeced ? snap : d->root);
    }
    if (!home.exists && !home.persistent && !incremental (ctx))
      fleece_log (ctx, FLEECE_LOG_WARNING, "the dirty bitmap %s of %s cannot be "
                  "persistent on %s (not qcow2): QEMU forgets it when it stops, "
                  "and the next incremental then needs a new full backup",
                  ctx->set->bitmap, d->key, home.node);
    bitmap_home_clear (&home);
  }
  return true;
}

static bool
create_targets (FleeceRun *run, struct fleece_target *t, GError **err)
{
  const char *id = fleece_jstr (run->record, "run");

  for (guint i = 0; t->kind == FLEECE_TARGET_DIR && i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];

    if (strcmp (t->format, "qcow2") == 0 && d->size % 512) {
      g_set_error (err, FLEECE_ERROR, EINVAL, "cannot back up %s (%"
                   G_GUINT64_FORMAT " bytes) into a qcow2 image: qcow2 sizes "
                   "are multiples of 512 bytes; use a raw target", d->key, d->size);
      return false;
    }
    if (!fleece_target_create_file (t, d->key, d->size, id,
                                    fleece_run_drive (run, d->key), err))
      return false;
  }
  return true;
}

/* The fd of a raw target is an image of exactly the drive's size: an
 * empty regular file grows to it. */
static bool
size_fd_target (struct fleece_target *t, const FleeceDrive *d, GError **err)
{
  struct stat sb;

  if (fstat (fleece_target_fd (t), &sb) != 0 || !S_ISREG (sb.st_mode))
    return true;             /* a block device: QEMU checks its size */
  if (sb.st_size == 0 && ftruncate (fleece_target_fd (t), (off_t) d->size) == 0)
    return true;
  if ((uint64_t) sb.st_size == d->size)
    return true;
  g_set_error (err, FLEECE_ERROR, EINVAL, "the fd target has %" G_GINT64_FORMAT
               " bytes, the drive %s %" G_GUINT64_FORMAT ": give an empty file "
               "or one of the drive's size", (gint64) sb.st_size, d->key, d->size);
  return false;
}

/* An fd target: QEMU gets its own copy of the fd in an fd set and opens
 * the set's file name; the image must have the drive's size. */
static bool
add_fd_target (FleeceRun *run, struct fleece_target *t, GError **err)
{
  FleeceDrive *d = run->plan->drives->pdata[0];
  g_autofree char *node = target_node (d->key);
  g_autofree char *fname = NULL;
  json_object *a, *file;
  g_autoptr (json_object) r = NULL;

  if (!size_fd_target (t, d, err))
    return false;
  a = json_object_new_object ();

  fleece_jset_str (a, "opaque", FD_TARGET_FDSET_OPAQUE);
  if (!(r = fleece_conn_execute_fd (run->ctx->conn, "add-fd", a, fleece_target_fd (t), err)))
    return false;
  fleece_jset_int (run->record, "fdset-id", fleece_jint (r, "fdset-id"));
  fname = g_strdup_printf ("/dev/fdset/%" G_GINT64_FORMAT, fleece_jint (r, "fdset-id"));
  a = json_object_new_object ();
  file = json_object_new_object ();
  fleece_jset_str (file, "driver", "file");
  fleece_jset_str (file, "filename", fname);
  fleece_jset_str (a, "driver", "raw");
  fleece_jset_str (a, "node-name", node);
  json_object_object_add (a, "file", file);
  return fleece_run_save (run, err) && qmp_do (run->ctx, "blockdev-add", a, err);
}

/* The cluster of a large fleeced drive's qcow2 target in a full backup:
 * the job's cluster (the job writes whole ones anyway), at most qcow2's
 * 2 MiB.  The job writes zeroes over every area the source does not hold
 * (full_sync()): with 64 KiB clusters that is 128 MiB of zero-flagged L2
 * tables per TiB of disk, with 1 MiB ones 8 MiB and the walk a third
 * faster (bench/findings.md).  But an image's header, L1, refcount table
 * and block take a cluster each: 1 MiB clusters only pay off from about
 * 40 GiB of disk, and an incremental's small image would grow.  An
 * unfleeced drive keeps 64 KiB: its job's cluster follows the target's,
 * and without fleecing a guest write waits for a whole job cluster's copy. */
#define BIG_TARGET_CLUSTER_FROM (64ULL << 30)

static uint64_t
target_cluster (FleeceCtx *ctx, const FleeceDrive *d, bool incremental)
{
  if (!d->fleeced || incremental || d->size < BIG_TARGET_CLUSTER_FROM)
    return 0;
  return MIN (job_cluster (ctx, d), 2 * 1024 * 1024);
}

/* A directory's qcow2 image is formatted by QEMU (as the fleecing images
 * are); an incremental's over the previous backup of the chain. */
static bool
format_dir_targets (FleeceRun *run, struct fleece_target *t, GError **err)
{
  g_autoptr (GHashTable) jobs = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);

  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    g_autofree char *fnode = target_file_node (d->key);
    g_autofree char *job = target_format_job_id (d->key);
    g_autofree char *backing = NULL;
    const char *backing_fmt = NULL;

    if ((t->base && !fleece_target_backing (t, d->key, &backing, &backing_fmt, err)) ||
        !qmp_do (run->ctx, "blockdev-add", fleece_target_file_blockdev (t, d->key, fnode), err) ||
        !fleece_format_qcow2 (run->ctx, job, fnode, d->size, target_cluster (run->ctx, d, t->base != NULL),
                              backing, backing_fmt, err))
      return false;
    g_hash_table_insert (jobs, g_steal_pointer (&job), fleece_target_dir_path (t, d->key));
  }
  return fleece_finish_format_jobs (run->ctx, jobs, err);
}

static bool
add_targets (FleeceRun *run, struct fleece_target *t, GError **err)
{
  bool formatted = t->kind == FLEECE_TARGET_DIR && strcmp (t->format, "qcow2") == 0;

  if (t->kind == FLEECE_TARGET_FD)
    return add_fd_target (run, t, err);
  if (formatted && !format_dir_targets (run, t, err))
    return false;
  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    g_autofree char *node = target_node (d->key);
    g_autofree char *fnode = target_file_node (d->key);

    if (!qmp_do (run->ctx, "blockdev-add",
                 fleece_target_blockdev (t, d->key, node, fnode, formatted), err))
      return false;
    fleece_target_commit_file (fleece_run_drive (run, d->key));
  }
  return true;
}

/* cbw of every fleeced drive.  A full backup adds them while the guest
 * runs (a filter sees the guest's writes only once the device is
 * re-pointed: that is the point in time), so the pause stays short also
 * for large disks (adding a cbw node took 40-50 ms per TiB of disk,
 * docs/benchmarks.md).  An incremental adds them in the pause: cbw's copy
 * of the bitmap must hold exactly what the job's copy will. */
static bool
add_filters (FleeceRun *run, GError **err)
{
  FleeceCtx *ctx = run->ctx;

  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    const char *bnode = fleece_jstr (fleece_run_drive (run, d->key), "bitmap-node");
    bool ok;

    if (!d->fleeced)
      continue;
    if (incremental (ctx) && !cmd_add_cbw_bitmap (ctx, d, bnode, err))
      return false;
    ok = cmd_add_cbw (ctx, d, bnode, err);
    if (incremental (ctx))
      cmd_del_cbw_bitmap (ctx, bnode, ctx->set->bitmap);
    if (!ok)
      return false;
  }
  return true;
}

/* The guest's writes go through the filters from here on; snapshot-access
 * only then (while the device still writes to the node below, cbw cannot
 * take the permissions snapshot-access needs). */
static bool
repoint_devices (FleeceRun *run, GError **err)
{
  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    g_autofree char *cbw = cbw_node (d->key);

    if (d->fleeced && (!cmd_set_drive (run->ctx, d->qdev, cbw, err) ||
                       !cmd_add_snapshot_access (run->ctx, d, err)))
      return false;
  }
  return true;
}

/* An incremental hands the drive's bitmap over to a copy on the job's
 * source node (blockdev-backup looks it up there) and clears it: the copy
 * is the backup's point in time, the bitmap goes on tracking new writes. */
static void
bitmap_use_actions (FleeceCtx *ctx, json_object *e, json_object *actions)
{
  const char *b = ctx->set->bitmap, *bnode = fleece_jstr (e, "bitmap-node");
  const char *src = fleece_jstr (e, "bitmap-copy-node");
  g_autofree char *inc = inc_bitmap_name (b);
  json_object *add = bitmap_ref (src, inc);

  fleece_jset_bool (add, "persistent", false);
  /* Frozen at the point in time: recording, the copy would also mark what
   * the job discards on its source (discard-source) and the guest writes
   * to an unfleeced drive, and a failed run would give back more than it
   * took. */
  fleece_jset_bool (add, "disabled", true);
  json_object_array_add (actions, fleece_jaction ("block-dirty-bitmap-add", add));
  json_object_array_add (actions, fleece_jaction ("block-dirty-bitmap-merge",
                                                  merge_args (src, inc, bnode, b)));
  json_object_array_add (actions, fleece_jaction ("block-dirty-bitmap-clear",
                                                  bitmap_ref (bnode, b)));
}

/* A full backup (re)starts the bitmap at its point in time: a new one, or
 * the old one cleared after its bits are kept aside (given back if the
 * run fails). */
static void
bitmap_new_actions (FleeceCtx *ctx, json_object *e, json_object *actions)
{
  const char *b = ctx->set->bitmap, *bnode = fleece_jstr (e, "bitmap-node");
  g_autofree char *old = old_bitmap_name (b);
  json_object *add;

  if (!fleece_jbool (e, "bitmap-existed")) {
    add = bitmap_ref (bnode, b);
    fleece_jset_bool (add, "persistent", fleece_jbool (e, "bitmap-persistent"));
    json_object_array_add (actions, fleece_jaction ("block-dirty-bitmap-add", add));
    return;
  }
  add = bitmap_ref (bnode, old);
  fleece_jset_bool (add, "persistent", false);
  json_object_array_add (actions, fleece_jaction ("block-dirty-bitmap-add", add));
  json_object_array_add (actions, fleece_jaction ("block-dirty-bitmap-merge",
                                                  merge_args (bnode, old, bnode, b)));
  json_object_array_add (actions, fleece_jaction ("block-dirty-bitmap-clear",
                                                  bitmap_ref (bnode, b)));
}

/* One transaction: the bitmaps' actions and every drive's job, so all
 * share one point in time and a chain of backups has no gap.  Bitmap
 * actions refuse the grouped completion mode, so poll does what grouped
 * jobs would: finalize all together, or cancel the rest when one fails
 * (qemu_poll()). */
static bool
cmd_start_jobs (FleeceRun *run, GError **err)
{
  FleeceCtx *ctx = run->ctx;
  json_object *a = json_object_new_object ();
  json_object *actions = json_object_new_array ();

  for (guint i = 0; ctx->set->bitmap && i < run->plan->drives->len; i++) {
    json_object *e = fleece_run_drive (run, ((FleeceDrive *) run->plan->drives->pdata[i])->key);
    if (incremental (ctx))
      bitmap_use_actions (ctx, e, actions);
    else
      bitmap_new_actions (ctx, e, actions);
  }
  for (guint i = 0; i < run->plan->drives->len; i++)
    json_object_array_add (actions, backup_action (ctx, run->plan->drives->pdata[i],
                                                   run->target_zeroed));
  json_object_object_add (a, "actions", actions);
  return qmp_do (ctx, "transaction", a, err);
}

/* Devices are re-pointed one at a time: with the vCPUs stopped meanwhile,
 * no guest write lands between the first and the last, so every drive
 * shares one point in time with the jobs' transaction. */
static bool
pause_and_start (FleeceRun *run, bool running, GError **err)
{
  bool early = !incremental (run->ctx);

  if ((early && !add_filters (run, err)) ||
      (running && !qmp_do (run->ctx, "stop", NULL, err)))
    return false;
  if ((!early && !add_filters (run, err)) || !repoint_devices (run, err) ||
      !cmd_start_jobs (run, err))
    return false;
  if (!running)
    return true;
  if (!qmp_do (run->ctx, "cont", NULL, err))
    return false;
  fleece_jset_bool (run->record, "paused-by-us", false);
  return true;
}

/* A large sparse fleeced disk fills a raw target file: its job writes
 * zeroes over what the disk does not hold (full_sync()), and QEMU
 * allocates them in a raw file.  Say so before it happens. */
static void
warn_raw_fills (FleeceRun *run, const struct fleece_target *t)
{
  if (t->kind != FLEECE_TARGET_DIR || strcmp (t->format, "raw") != 0)
    return;
  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];

    if (!d->fleeced || !d->unallocated_zero || d->size < BIG_TARGET_CLUSTER_FROM)
      continue;
    fleece_log (run->ctx, FLEECE_LOG_WARNING, "%s: its raw target file will take the disk's "
                "full %.1f GiB, however little the disk holds: with fleecing QEMU writes "
                "zeroes over what a sparse disk does not hold; a qcow2 target stays small",
                d->key, (double) d->size / (1 << 30));
  }
}

static bool
prepare_start (FleeceRun *run, struct fleece_target *t, bool *running,
               GError **err)
{
  g_autoptr (json_object) status = NULL;

  if (!check_target (run, t, err) || !refresh_roots (run, err) ||
      !record_bitmap_homes (run, err))
    return false;
  warn_raw_fills (run, t);
  if (!(status = fleece_conn_execute (run->ctx->conn, "query-status", NULL, err)))
    return false;
  *running = fleece_jbool (status, "running");
  json_object_object_add (run->record, "target", fleece_target_describe (t));
  fleece_jset_bool (run->record, "paused-by-us", *running);
  fleece_run_set_state (run, "starting");
  /* Write-ahead: the target files' run-tagged names and the bitmaps'
   * homes are in the record before anything is made. */
  return fleece_run_save (run, err) && create_targets (run, t, err) &&
         fleece_run_save (run, err);
}

static bool
qemu_start (FleeceRun *run, struct fleece_target *t, GError **err)
{
  g_autoptr (GError) uerr = NULL;
  bool running = false;

  /* The files of a directory without a base are new (O_EXCL): sparse
   * raw, or qcow2 without a backing file. */
  run->target_zeroed = t->kind == FLEECE_TARGET_DIR && !t->base;
  if (prepare_start (run, t, &running, err) &&
      add_targets (run, t, err) && fleece_run_save (run, err) &&
      pause_and_start (run, running, err)) {
    fleece_run_mark_running (run);
    fleece_log (run->ctx, FLEECE_LOG_INFO, "backup of VM %u started (%u drives)",
                run->vmid, run->plan->drives->len);
    return true;
  }
  /* Back to "attached": remove what start added, keep the images. */
  if (!qemu_undo (run->ctx, run->record, true, &uerr))
    fleece_log (run->ctx, FLEECE_LOG_ERROR, "undoing the failed start failed "
                "too: %s", uerr->message);
  g_clear_error (&uerr);
  for (guint i = 0; i < run->plan->drives->len; i++) {
    json_object *e = fleece_run_drive (run, ((FleeceDrive *) run->plan->drives->pdata[i])->key);
    if (fleece_target_remove_file (e, fleece_jstr (run->record, "run"), &uerr) == 0)
      json_object_object_del (e, "target-file");
    g_clear_error (&uerr);
  }
  json_object_object_del (run->record, "target");
  fleece_run_set_state (run, "attached");
  fleece_run_save (run, NULL);
  return false;
}

/* ---- progress and the end ---------------------------------------------------- */

static FleeceDrive *
drive_by_job (struct fleece_plan *p, const char *id)
{
  for (guint i = 0; id && i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    g_autofree char *j = job_id (d->key);
    if (strcmp (j, id) == 0)
      return d;
  }
  return NULL;
}

static char *
drive_failure (FleeceRun *run, FleeceDrive *d, const char *qerr)
{
  g_autofree char *what = g_strdup_printf ("backup of %s", d->key);
  char *why = d->fleeced ? fleece_explain_cbw_failure (run->ctx, what, d->image,
                                                       d->volid, run->ctx->set->cbw_timeout,
                                                       qerr) : NULL;
  return why ? why : g_strdup_printf ("backup of %s failed: %s", d->key, qerr);
}

/* Progress of one job; its result once it concluded.  Returns whether
 * it waits in "pending" (done, not finalized). */
static bool
update_drive (FleeceRun *run, json_object *j)
{
  FleeceDrive *d = drive_by_job (run->plan, fleece_jstr (j, "id"));
  const char *status = fleece_jstr (j, "status"), *e = fleece_jstr (j, "error");
  bool concluded = g_strcmp0 (status, "concluded") == 0;
  bool pending = g_strcmp0 (status, "pending") == 0;
  uint64_t total, done;

  if (!d || d->result)
    return false;
  /* An incremental's job counts only the dirty clusters. */
  total = fleece_jint (j, "total-progress") > 0 ? (uint64_t) fleece_jint (j, "total-progress")
                                                : d->size;
  done = (uint64_t) MAX (fleece_jint (j, "current-progress"), 0);
  if (incremental (run->ctx))
    d->dirty = MIN (total, d->size);
  fleece_drive_set_progress (run, d, (concluded || pending) && !e ? total : done, total);
  d->pending = pending;
  if (!concluded)
    return pending;
  d->ended_us = g_get_monotonic_time ();
  /* Only a job the cancel ended is "cancelled": one QEMU refused to
   * cancel may fail for a reason of its own. */
  d->result = !e ? g_strdup ("ok")
    : run->cancel_sent && strstr (e, "Operation canceled") ? g_strdup ("cancelled")
    : drive_failure (run, d, e);
  return false;
}

/* Grouped jobs would cancel the others when one fails; ours (a
 * transaction with bitmap actions cannot be grouped) are cancelled here,
 * pending ones included. */
static void
cancel_rest (FleeceRun *run)
{
  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    g_autofree char *id = job_id (d->key);
    g_autoptr (GError) cerr = NULL;

    if (!d->result && !cmd_job (run->ctx, "job-cancel", id, &cerr))
      fleece_log (run->ctx, FLEECE_LOG_DEBUG, "job-cancel %s: %s", id, cerr->message);
  }
}

/* Every job has done its work: finalize them all at once. */
static bool
finalize_all (FleeceRun *run, GError **err)
{
  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    g_autofree char *id = job_id (d->key);

    if (!d->result && !cmd_job (run->ctx, "job-finalize", id, err))
      return false;
  }
  return true;
}

/* Every job has concluded: dismiss them and sum up. */
static int
conclude (FleeceRun *run, GError **err)
{
  const char *failure = NULL;
  bool all_ok = true;

  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    g_autofree char *id = job_id (d->key);
    g_autoptr (GError) derr = NULL;

    if (!cmd_job (run->ctx, "job-dismiss", id, &derr))
      fleece_log (run->ctx, FLEECE_LOG_WARNING, "%s", derr->message);
    all_ok = all_ok && strcmp (d->result, "ok") == 0;
    /* Jobs cancelled because another failed say "canceled": report the
     * one that failed. */
    if (strcmp (d->result, "ok") != 0 && strcmp (d->result, "cancelled") != 0 &&
        (!failure || strstr (failure, "Operation canceled")))
      failure = d->result;
  }
  /* Every job completed before the cancel took effect: the backup is
   * whole, and a success (as the Proxmox engine reports it). */
  if (run->cancel_sent && !all_ok && (!failure || strstr (failure, "Operation canceled"))) {
    g_set_error (err, FLEECE_ERROR, ECANCELED, "the backup of VM %u was "
                 "cancelled", run->vmid);
    return -1;
  }
  if (failure) {
    g_set_error (err, FLEECE_ERROR, EIO, "%s", failure);
    return -1;
  }
  fleece_run_set_state (run, "succeeded");
  if (!fleece_run_save (run, err))
    return -1;
  fleece_log (run->ctx, FLEECE_LOG_INFO, "backup of VM %u finished", run->vmid);
  return 1;
}

static int
qemu_poll (FleeceRun *run, GError **err)
{
  g_autoptr (json_object) jobs = fleece_query_jobs (run->ctx, err);
  guint ended = 0, failed = 0, pending = 0;

  if (!jobs)
    return -1;
  for (size_t i = 0; i < json_object_array_length (jobs); i++)
    pending += update_drive (run, json_object_array_get_idx (jobs, i));
  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    ended += d->result != NULL;
    failed += d->result && strcmp (d->result, "ok") != 0;
  }
  run->finishing = ended + pending == run->plan->drives->len;
  if (ended == run->plan->drives->len)
    return conclude (run, err);
  /* Jobs that did their work before a cancel reached them are finalized:
   * a backup whose every job got that far is whole. */
  if (failed)
    cancel_rest (run);
  else if (run->finishing && !finalize_all (run, err))
    return -1;
  return 0;
}

static bool
qemu_cancel (FleeceRun *run, GError **err)
{
  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    g_autofree char *id = job_id (d->key);
    g_autoptr (GError) cerr = NULL;

    if (d->result || d->pending)
      continue;
    /* A job that concluded meanwhile refuses; poll reports its end. */
    if (!cmd_job (run->ctx, "job-cancel", id, &cerr)) {
      if (!g_error_matches (cerr, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_COMMAND)) {
        g_propagate_error (err, g_steal_pointer (&cerr));
        return false;
      }
      fleece_log (run->ctx, FLEECE_LOG_DEBUG, "job-cancel %s: %s", id, cerr->message);
    }
  }
  return true;
}

const FleeceEngineOps fleece_engine_qemu_ops = {
  .name = "qemu",
  .check_plan = qemu_check_plan,
  .formats_images = qemu_formats_images,
  .record_init = qemu_record_init,
  .attach = qemu_attach,
  .start = qemu_start,
  .poll = qemu_poll,
  .cancel = qemu_cancel,
  .undo = qemu_undo,
  .find = qemu_find,
};
