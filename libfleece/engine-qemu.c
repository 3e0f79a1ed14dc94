/* The stock QEMU engine: builds over public QMP the graph that Proxmox's
 * patched QEMU builds inside its backup command (docs/design.md):
 *
 *   [device] --root--> [cbw] <--file-- [snapshot-access] --> backup job
 *                      |file  |target
 *                      v      v
 *                  [source] [fleecing image]
 *
 * Every QMP command this engine sends is built in the "commands" section
 * below, so the sequence can be read top to bottom.  The record is written
 * before each step that creates something, so that cleanup can undo a run
 * interrupted at any point. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "internal.h"
#include "engine.h"
#include "target.h"

#define MIN_JOB_CLUSTER (4u * 1024 * 1024)  /* RBD objects; see the seed */
/* Requests of one job in flight (QEMU's default is 64): as fast or faster
 * on local targets, and guest writes queue behind fewer of the job's
 * requests (docs/benchmarks.md: p99 of guest writes during a fleecing
 * backup and throughput both improve). */
#define JOB_MAX_WORKERS 8
#define JOB_END_TIMEOUT_MS 120000

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

/* ---- commands -------------------------------------------------------- */

static bool
qmp_do (struct fleece_handle *h, const char *cmd, json_object *args,
        GError **err)
{
  json_object *r = fleece_qmp_execute (h->qmp, cmd, args, err);
  if (!r)
    return false;
  json_object_put (r);
  return true;
}

static json_object *
bitmap_ref (const char *node, const char *name)
{
  json_object *b = json_object_new_object ();
  fleece_jset_str (b, "node", node);
  fleece_jset_str (b, "name", name);
  return b;
}

static char *
cbw_bitmap_name (const char *bitmap)
{
  return g_strdup_printf ("fleece-cbw-%s", bitmap);
}

/* The job's cluster: discard is aligned inwards to it, so it must cover
 * the fleecing image's cluster (or RBD object): 4 MiB in a caller's
 * storage, 1 MiB in the directory storage, where 4 MiB chunks cost QEMU
 * twice the CPU per byte and held fleecing backups to 58% of the
 * throughput of plain ones (docs/benchmarks.md). */
static uint64_t
job_cluster (struct fleece_handle *h, FleeceDrive *d)
{
  return MAX (fleece_storage_min_job_cluster (h->storage, MIN_JOB_CLUSTER),
              d->cluster_size);
}

/* The incremental job reads whole job clusters around each dirty bit, and
 * snapshot-access refuses reads outside cbw's bitmap (EACCES): cbw gets a
 * copy of the bitmap coarsened to the job's cluster. */
static bool
cmd_add_cbw_bitmap (struct fleece_handle *h, FleeceDrive *d, GError **err)
{
  g_autofree char *coarse = cbw_bitmap_name (h->bitmap);
  json_object *add = bitmap_ref (d->root, coarse);
  json_object *merge = json_object_new_object ();
  json_object *from = json_object_new_array ();

  json_object_object_add (add, "granularity",
                          json_object_new_int64 ((int64_t) job_cluster (h, d)));
  json_object_object_add (add, "persistent", json_object_new_boolean (false));
  if (!qmp_do (h, "block-dirty-bitmap-add", add, err))
    return false;
  fleece_jset_str (merge, "node", d->root);
  fleece_jset_str (merge, "target", coarse);
  json_object_array_add (from, bitmap_ref (d->root, h->bitmap));
  json_object_object_add (merge, "bitmaps", from);
  return qmp_do (h, "block-dirty-bitmap-merge", merge, err);
}

/* cbw copied the coarse bitmap when it opened; drop ours. */
static void
cmd_del_cbw_bitmap (struct fleece_handle *h, const char *root, const char *bitmap)
{
  g_autoptr (GError) err = NULL;
  g_autofree char *coarse = cbw_bitmap_name (bitmap);

  if (!qmp_do (h, "block-dirty-bitmap-remove", bitmap_ref (root, coarse), &err))
    fleece_log (h, FLEECE_LOG_DEBUG, "%s", err->message);
}

/* The protocol node of an image file (or of a caller's block device). */
static json_object *
file_node_args (const char *path, const char *node)
{
  json_object *file = json_object_new_object ();

  fleece_jset_str (file, "driver",
            g_file_test (path, G_FILE_TEST_IS_REGULAR) ? "file" : "host_device");
  fleece_jset_str (file, "filename", path);
  fleece_jset_str (file, "node-name", node);
  fleece_jset_str (file, "discard", "unmap");
  return file;
}

static bool
cmd_add_file_node (struct fleece_handle *h, const char *path, const char *node,
                   GError **err)
{
  return qmp_do (h, "blockdev-add", file_node_args (path, node), err);
}

/* QEMU writes qcow2 metadata for size bytes into the file under node, in a
 * job: blockdev-create returns before it is done (settle_jobs() waits).
 * Options as qemu-img's defaults: 64 KiB clusters, no preallocation. */
static bool
cmd_format_qcow2 (struct fleece_handle *h, const char *job, const char *node,
                  uint64_t size, GError **err)
{
  json_object *a = json_object_new_object ();
  json_object *o = json_object_new_object ();

  fleece_jset_str (o, "driver", "qcow2");
  fleece_jset_str (o, "file", node);
  json_object_object_add (o, "size", json_object_new_int64 ((int64_t) size));
  fleece_jset_str (a, "job-id", job);
  json_object_object_add (a, "options", o);
  return qmp_do (h, "blockdev-create", a, err);
}

/* The fleecing image: format node over file node, discard passed down so
 * the backup's discard-source frees space in the storage.  The file node
 * is added inline, or was added before (file_added) for QEMU to format. */
static bool
cmd_add_fleecing (struct fleece_handle *h, FleeceDrive *d, const char *path,
                  bool file_added, GError **err)
{
  g_autofree char *node = fleecing_node (d->key);
  g_autofree char *fnode = fleecing_file_node (d->key);
  json_object *a = json_object_new_object ();

  fleece_jset_str (a, "driver", d->format);
  fleece_jset_str (a, "node-name", node);
  fleece_jset_str (a, "discard", "unmap");
  fleece_jset_str (a, "detect-zeroes", "unmap");
  if (file_added)
    fleece_jset_str (a, "file", fnode);
  else
    json_object_object_add (a, "file", file_node_args (path, fnode));
  /* Storages round sizes up (LVM extents); raw takes the exact size. */
  if (strcmp (d->format, "raw") == 0)
    json_object_object_add (a, "size", json_object_new_int64 ((int64_t) d->size));
  return qmp_do (h, "blockdev-add", a, err);
}

static bool
cmd_add_cbw (struct fleece_handle *h, FleeceDrive *d, GError **err)
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
  if (h->cbw_timeout)
    json_object_object_add (a, "cbw-timeout", json_object_new_int64 (h->cbw_timeout));
  if (h->bitmap) {
    g_autofree char *coarse = cbw_bitmap_name (h->bitmap);
    json_object_object_add (a, "bitmap", bitmap_ref (d->root, coarse));
  }
  return qmp_do (h, "blockdev-add", a, err);
}

static bool
cmd_set_drive (struct fleece_handle *h, const char *qdev, const char *node,
               GError **err)
{
  json_object *a = json_object_new_object ();
  fleece_jset_str (a, "path", qdev);
  fleece_jset_str (a, "property", "drive");
  fleece_jset_str (a, "value", node);
  return qmp_do (h, "qom-set", a, err);
}

static bool
cmd_add_snapshot_access (struct fleece_handle *h, FleeceDrive *d, GError **err)
{
  g_autofree char *node = snap_node (d->key);
  g_autofree char *cbw = cbw_node (d->key);
  json_object *a = json_object_new_object ();

  fleece_jset_str (a, "driver", "snapshot-access");
  fleece_jset_str (a, "node-name", node);
  fleece_jset_str (a, "file", cbw);
  /* Without it discard-source silently does nothing. */
  fleece_jset_str (a, "discard", "unmap");
  return qmp_do (h, "blockdev-add", a, err);
}

static bool
cmd_add_target (struct fleece_handle *h, const struct fleece_target *t,
                FleeceDrive *d, bool file_added, GError **err)
{
  g_autofree char *node = target_node (d->key);
  g_autofree char *fnode = target_file_node (d->key);
  return qmp_do (h, "blockdev-add",
                 fleece_target_blockdev (t, d->key, node, fnode, file_added),
                 err);
}

static json_object *
backup_action (struct fleece_handle *h, FleeceDrive *d)
{
  g_autofree char *job = job_id (d->key);
  g_autofree char *src = d->fleeced ? snap_node (d->key) : g_strdup (d->root);
  g_autofree char *tgt = target_node (d->key);
  json_object *a = json_object_new_object ();
  json_object *act = json_object_new_object ();

  fleece_jset_str (a, "job-id", job);
  fleece_jset_str (a, "device", src);
  fleece_jset_str (a, "target", tgt);
  if (h->bitmap) {
    fleece_jset_str (a, "sync", "incremental");
    fleece_jset_str (a, "bitmap", h->bitmap);
  } else {
    fleece_jset_str (a, "sync", "full");
  }
  /* We read the final status from query-jobs, then dismiss. */
  json_object_object_add (a, "auto-dismiss", json_object_new_boolean (false));
  if (h->bwlimit_kib)
    json_object_object_add (a, "speed",
                            json_object_new_int64 ((int64_t) (h->bwlimit_kib * 1024)));
  if (d->fleeced && h->features.discard_source)
    json_object_object_add (a, "discard-source", json_object_new_boolean (true));
  if (h->features.perf_max_workers ||
      (d->fleeced && h->features.perf_min_cluster_size)) {
    json_object *perf = json_object_new_object ();

    if (h->features.perf_max_workers)
      json_object_object_add (perf, "max-workers", json_object_new_int (JOB_MAX_WORKERS));
    /* Discard is aligned inwards to the job's cluster: it must cover the
     * fleecing image's cluster (or RBD object). */
    if (d->fleeced && h->features.perf_min_cluster_size)
      json_object_object_add (perf, "min-cluster-size",
                              json_object_new_int64 ((int64_t) job_cluster (h, d)));
    json_object_object_add (a, "x-perf", perf);
  }
  fleece_jset_str (act, "type", "blockdev-backup");
  json_object_object_add (act, "data", a);
  return act;
}

static json_object *
action (const char *type, json_object *data)
{
  json_object *a = json_object_new_object ();
  fleece_jset_str (a, "type", type);
  json_object_object_add (a, "data", data);
  return a;
}

/* Incremental through snapshot-access: blockdev-backup looks the bitmap up
 * on its source node only, so the source's bitmap is handed over to a copy
 * on the snapshot-access node and cleared on the source, in the same
 * transaction as the jobs (the copy is the point in time; the source goes
 * on tracking new writes).  A failed run merges the copy back (cleanup). */
static void
bitmap_handover (struct fleece_handle *h, FleeceDrive *d, json_object *actions)
{
  g_autofree char *snap = snap_node (d->key);
  json_object *add = bitmap_ref (snap, h->bitmap);
  json_object *merge = json_object_new_object ();
  json_object *from = json_object_new_array ();

  json_object_array_add (actions, action ("block-dirty-bitmap-add", add));
  fleece_jset_str (merge, "node", snap);
  fleece_jset_str (merge, "target", h->bitmap);
  json_object_array_add (from, bitmap_ref (d->root, h->bitmap));
  json_object_object_add (merge, "bitmaps", from);
  json_object_array_add (actions, action ("block-dirty-bitmap-merge", merge));
  json_object_array_add (actions, action ("block-dirty-bitmap-clear",
                                          bitmap_ref (d->root, h->bitmap)));
}

/* Give a failed incremental run's dirty bits back to the source bitmap. */
static void
cmd_bitmap_restore (struct fleece_handle *h, const char *root, const char *snap,
                    const char *name)
{
  g_autoptr (GError) err = NULL;
  json_object *merge = json_object_new_object ();
  json_object *from = json_object_new_array ();

  fleece_jset_str (merge, "node", root);
  fleece_jset_str (merge, "target", name);
  json_object_array_add (from, bitmap_ref (snap, name));
  json_object_object_add (merge, "bitmaps", from);
  if (!qmp_do (h, "block-dirty-bitmap-merge", merge, &err))
    fleece_log (h, FLEECE_LOG_DEBUG, "no bitmap to give back on %s: %s", snap,
                err->message);
  else
    fleece_log (h, FLEECE_LOG_INFO, "gave the dirty bitmap %s of the failed "
                "backup back to %s", name, root);
}

/* All jobs in one transaction: one point in time for drives backed up
 * directly, and a failure of one cancels all (grouped). */
static bool
cmd_start_jobs (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  json_object *a = json_object_new_object ();
  json_object *actions = json_object_new_array ();
  json_object *props = json_object_new_object ();

  if (h->bitmap) {
    /* Bitmap actions refuse the grouped completion mode: hand over first,
     * in a transaction of their own (the vCPUs are stopped meanwhile). */
    json_object *handover = json_object_new_array ();
    json_object *ha = json_object_new_object ();

    for (guint i = 0; i < p->drives->len; i++)
      if (((FleeceDrive *) p->drives->pdata[i])->fleeced)
        bitmap_handover (h, p->drives->pdata[i], handover);
    json_object_object_add (ha, "actions", handover);
    if (json_object_array_length (handover) == 0)
      json_object_put (ha);
    else if (!qmp_do (h, "transaction", ha, err)) {
      json_object_put (a);
      json_object_put (actions);
      json_object_put (props);
      return false;
    }
  }
  for (guint i = 0; i < p->drives->len; i++)
    json_object_array_add (actions, backup_action (h, p->drives->pdata[i]));
  fleece_jset_str (props, "completion-mode", "grouped");
  json_object_object_add (a, "actions", actions);
  json_object_object_add (a, "properties", props);
  return qmp_do (h, "transaction", a, err);
}

static bool
cmd_del (struct fleece_handle *h, const char *node, GError **err)
{
  json_object *a = json_object_new_object ();
  fleece_jset_str (a, "node-name", node);
  return qmp_do (h, "blockdev-del", a, err);
}

static bool
cmd_job (struct fleece_handle *h, const char *cmd, const char *id, GError **err)
{
  json_object *a = json_object_new_object ();
  fleece_jset_str (a, "id", id);
  return qmp_do (h, cmd, a, err);
}

/* ---- queries ---------------------------------------------------------- */

/* node-name -> virtual size, of every named node. */
static GHashTable *
query_nodes (struct fleece_handle *h, GError **err)
{
  g_autoptr (json_object) r = NULL;
  json_object *args = json_object_new_object ();
  GHashTable *nodes;

  json_object_object_add (args, "flat", json_object_new_boolean (true));
  r = fleece_qmp_execute (h->qmp, "query-named-block-nodes", args, err);
  if (!r)
    return NULL;
  nodes = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  for (size_t i = 0; i < json_object_array_length (r); i++) {
    json_object *n = json_object_array_get_idx (r, i), *img, *v;
    const char *name = fleece_jstr (n, "node-name");
    guint64 *size = g_new0 (guint64, 1);

    if (json_object_object_get_ex (n, "image", &img) &&
        json_object_object_get_ex (img, "virtual-size", &v))
      *size = (guint64) json_object_get_int64 (v);
    if (name)
      g_hash_table_replace (nodes, g_strdup (name), size);
    else
      g_free (size);
  }
  return nodes;
}

/* QOM device path -> current root node name. */
static GHashTable *
query_roots (struct fleece_handle *h, GError **err)
{
  g_autoptr (json_object) r = fleece_qmp_execute (h->qmp, "query-block", NULL, err);
  GHashTable *roots;

  if (!r)
    return NULL;
  roots = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  for (size_t i = 0; i < json_object_array_length (r); i++) {
    json_object *b = json_object_array_get_idx (r, i), *ins;
    const char *qdev = fleece_jstr (b, "qdev");
    g_autofree char *path = NULL;

    if (!qdev || !json_object_object_get_ex (b, "inserted", &ins))
      continue;
    if (qdev[0] != '/')
      path = g_strdup_printf ("/machine/peripheral/%s", qdev);
    else if (g_str_has_suffix (qdev, "/virtio-backend"))
      path = g_strndup (qdev, strlen (qdev) - strlen ("/virtio-backend"));
    else
      path = g_strdup (qdev);
    if (fleece_jstr (ins, "node-name"))
      g_hash_table_replace (roots, g_steal_pointer (&path),
                            g_strdup (fleece_jstr (ins, "node-name")));
  }
  return roots;
}

/* ---- the record -------------------------------------------------------- */

static json_object *
record_new (struct fleece_handle *h, struct fleece_plan *p)
{
  json_object *r = fleece_run_record_new (h, p, "qemu");
  json_object *drives;

  json_object_object_add (r, "paused-by-us", json_object_new_boolean (false));
  fleece_jset_str (r, "bitmap", h->bitmap);
  json_object_object_get_ex (r, "drives", &drives);
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    json_object *j = json_object_array_get_idx (drives, i);

    fleece_jset_str (j, "qdev", d->qdev);
    fleece_jset_str (j, "root", d->root);
    fleece_jset_str (j, "target-file", NULL);
  }
  return r;
}

/* ---- cleanup, shared by failures and fleece_cleanup() -------------------- */

typedef enum {
  JOB_NONE,
  JOB_BACKUP,           /* fleece-<key> */
  JOB_FORMAT,           /* blockdev-create of the fleecing image */
  JOB_TARGET_FORMAT,    /* blockdev-create of a directory target's image */
} JobKind;

/* Which of the jobs a run makes for the drives (record entries) id is, and
 * for which drive (*entry). */
static JobKind
job_kind (json_object *drives, const char *id, json_object **entry)
{
  for (size_t i = 0; i < json_object_array_length (drives); i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    const char *key = fleece_jstr (d, "key");
    g_autofree char *j = job_id (key);
    g_autofree char *f = format_job_id (key);
    g_autofree char *tf = target_format_job_id (key);
    JobKind k = g_strcmp0 (j, id) == 0 ? JOB_BACKUP
      : g_strcmp0 (f, id) == 0 ? JOB_FORMAT
      : g_strcmp0 (tf, id) == 0 ? JOB_TARGET_FORMAT : JOB_NONE;

    if (k != JOB_NONE) {
      *entry = d;
      return k;
    }
  }
  return JOB_NONE;
}

static bool
any_event (const char *event, json_object *data, void *opaque)
{
  return true;
}

/* Wait until the jobs of drives (record entries; see job_kind()) have
 * ended, and dismiss them: backup jobs with backups, blockdev-create jobs
 * with formats.  With cancel, those still running are cancelled first, and
 * how they ended does not matter (cancelled jobs end in errors); without,
 * the first error a job ended with is the result.  job-cancel returns
 * before the job has ended, blockdev-create before the job has written
 * anything: both are waited for here. */
static bool
settle_jobs (struct fleece_handle *h, json_object *drives, bool backups,
             bool formats, bool cancel, GError **err)
{
  gint64 deadline = g_get_monotonic_time () + JOB_END_TIMEOUT_MS * 1000LL;
  g_autoptr (GHashTable) cancelled = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  g_autoptr (GError) job_err = NULL;

  for (;;) {
    g_autoptr (json_object) jobs = fleece_qmp_execute (h->qmp, "query-jobs", NULL, err);
    bool pending = false;

    if (!jobs)
      return false;
    for (size_t i = 0; i < json_object_array_length (jobs); i++) {
      json_object *j = json_object_array_get_idx (jobs, i);
      const char *id = fleece_jstr (j, "id"), *status = fleece_jstr (j, "status");
      json_object *d = NULL;
      JobKind kind = id ? job_kind (drives, id, &d) : JOB_NONE;

      if (kind == JOB_NONE || (kind == JOB_BACKUP ? !backups : !formats))
        continue;
      if (g_strcmp0 (status, "concluded") == 0) {
        if (!cancel && !job_err && fleece_jstr (j, "error")) {
          const char *image = fleece_jstr (d, kind == JOB_FORMAT ? "image"
                                           : "target-file");
          if (kind == JOB_BACKUP || !image)
            job_err = g_error_new (FLEECE_ERROR, EIO, "job %s failed: %s",
                                   id, fleece_jstr (j, "error"));
          else
            job_err = g_error_new (FLEECE_ERROR, EIO, "QEMU could not write "
                                   "the qcow2 metadata of %s (job %s): %s",
                                   image, id, fleece_jstr (j, "error"));
        }
        if (!cmd_job (h, "job-dismiss", id, err))
          return false;
        continue;
      }
      if (g_strcmp0 (status, "null") == 0)
        continue;
      pending = true;
      if (cancel && !g_hash_table_contains (cancelled, id)) {
        g_autoptr (GError) cerr = NULL;
        fleece_log (h, FLEECE_LOG_INFO, "cancelling job %s", id);
        /* It may conclude meanwhile and refuse: the next round dismisses it. */
        if (!cmd_job (h, "job-cancel", id, &cerr))
          fleece_log (h, FLEECE_LOG_DEBUG, "job-cancel %s: %s", id, cerr->message);
        g_hash_table_add (cancelled, g_strdup (id));
      }
    }
    if (!pending)
      break;
    if (g_get_monotonic_time () > deadline) {
      g_set_error (err, FLEECE_ERROR, ETIMEDOUT,
                   "jobs of VM %u did not end within %d s%s; run the cleanup "
                   "again later", h->vmid, JOB_END_TIMEOUT_MS / 1000,
                   cancel ? " of being cancelled" : "");
      return false;
    }
    /* Wake on the next event (JOB_STATUS_CHANGE), at most 200 ms later. */
    {
      g_autoptr (GError) werr = NULL;
      json_object *ev = fleece_qmp_wait_event (h->qmp, any_event, NULL, 200, &werr);
      if (ev)
        json_object_put (ev);
      else if (werr && !g_error_matches (werr, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_TIMEOUT)) {
        g_propagate_error (err, g_steal_pointer (&werr));
        return false;
      }
    }
  }
  if (job_err) {
    g_propagate_error (err, g_steal_pointer (&job_err));
    return false;
  }
  return true;
}

/* A JOB_STATUS_CHANGE that ends one of the jobs in the set opaque. */
static bool
job_end_event (const char *event, json_object *data, void *opaque)
{
  const char *id = fleece_jstr (data, "id"), *status = fleece_jstr (data, "status");

  return strcmp (event, "JOB_STATUS_CHANGE") == 0 && id &&
         g_hash_table_contains (opaque, id) &&
         (g_strcmp0 (status, "concluded") == 0 || g_strcmp0 (status, "null") == 0);
}

/* Wait until the jobs in ids (emptied meanwhile) have ended, by their
 * events and without sending a command: the commands of a setup are then
 * the same whatever the timing (test-faults kills the caller at each of
 * them by number).  Only when no event comes for 2 s (events dropped from a
 * full queue) does a query-jobs look. */
static bool
await_jobs (struct fleece_handle *h, GHashTable *ids, GError **err)
{
  gint64 deadline = g_get_monotonic_time () + JOB_END_TIMEOUT_MS * 1000LL;

  while (g_hash_table_size (ids) > 0) {
    g_autoptr (GError) werr = NULL;
    g_autoptr (json_object) ev = fleece_qmp_wait_event (h->qmp, job_end_event, ids,
                                                        2000, &werr);
    g_autoptr (json_object) jobs = NULL;
    json_object *data;

    if (ev) {
      if (json_object_object_get_ex (ev, "data", &data))
        g_hash_table_remove (ids, fleece_jstr (data, "id"));
      continue;
    }
    if (!g_error_matches (werr, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_TIMEOUT)) {
      g_propagate_error (err, g_steal_pointer (&werr));
      return false;
    }
    if (g_get_monotonic_time () > deadline) {
      g_set_error (err, FLEECE_ERROR, ETIMEDOUT,
                   "jobs of VM %u did not end within %d s", h->vmid,
                   JOB_END_TIMEOUT_MS / 1000);
      return false;
    }
    if (!(jobs = fleece_qmp_execute (h->qmp, "query-jobs", NULL, err)))
      return false;
    {
      g_autoptr (GHashTable) running = g_hash_table_new (g_str_hash, g_str_equal);
      GHashTableIter it;
      gpointer id;

      for (size_t i = 0; i < json_object_array_length (jobs); i++) {
        json_object *j = json_object_array_get_idx (jobs, i);
        const char *st = fleece_jstr (j, "status");
        if (fleece_jstr (j, "id") && g_strcmp0 (st, "concluded") != 0 &&
            g_strcmp0 (st, "null") != 0)
          g_hash_table_add (running, (gpointer) fleece_jstr (j, "id"));
      }
      g_hash_table_iter_init (&it, ids);
      while (g_hash_table_iter_next (&it, &id, NULL))
        if (!g_hash_table_contains (running, id))
          g_hash_table_iter_remove (&it);
    }
  }
  return true;
}

static bool
del_if_present (struct fleece_handle *h, GHashTable *nodes, const char *node,
                GError **err)
{
  if (!node || !g_hash_table_contains (nodes, node))
    return true;
  if (!cmd_del (h, node, err))
    return false;
  g_hash_table_remove (nodes, node);
  return true;
}

typedef char *(*NodeNameFn) (const char *key);

/* Delete, for every drive (record entries), the nodes names (NULL-ended)
 * make of its key, if present; with requery, *nodes is refreshed first. */
static bool
del_layer (struct fleece_handle *h, json_object *drives, GHashTable **nodes,
           const NodeNameFn *names, bool requery, GError **err)
{
  if (requery) {
    g_hash_table_unref (*nodes);
    if (!(*nodes = query_nodes (h, err)))
      return false;
  }
  for (size_t i = 0; i < json_object_array_length (drives); i++) {
    const char *key = fleece_jstr (json_object_array_get_idx (drives, i), "key");

    for (const NodeNameFn *f = names; *f; f++) {
      g_autofree char *node = (*f) (key);
      if (!del_if_present (h, *nodes, node, err))
        return false;
    }
  }
  return true;
}

/* Teardown strictly in the order that avoids "in use" and permission
 * conflicts: snapshot-access, re-point the device, cbw, targets, fleecing
 * image.  Every step tolerates "already gone". */
static bool
undo_graph (struct fleece_handle *h, json_object *record, bool keep_images,
            GError **err)
{
  json_object *drives;
  g_autoptr (GHashTable) nodes = NULL;
  g_autoptr (GHashTable) roots = NULL;
  size_t n;

  if (!json_object_object_get_ex (record, "drives", &drives) ||
      !json_object_is_type (drives, json_type_array)) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "the record of VM %u has no drives",
                 h->vmid);
    return false;
  }
  n = json_object_array_length (drives);
  if (!settle_jobs (h, drives, true, true, true, err))
    return false;
  if (!(nodes = query_nodes (h, err)) || !(roots = query_roots (h, err)))
    return false;

  for (size_t i = 0; i < n; i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    g_autofree char *snap = snap_node (fleece_jstr (d, "key"));

    if (fleece_jstr (record, "bitmap") && g_strcmp0 (fleece_jstr (record, "state"), "succeeded") != 0 &&
        g_hash_table_contains (nodes, snap) && fleece_jstr (d, "root"))
      cmd_bitmap_restore (h, fleece_jstr (d, "root"), snap, fleece_jstr (record, "bitmap"));
    /* A crash between adding cbw's coarse bitmap and dropping it. */
    if (fleece_jstr (record, "bitmap") && fleece_jbool (d, "fleeced") && fleece_jstr (d, "root") &&
        g_hash_table_contains (nodes, fleece_jstr (d, "root")) &&
        g_strcmp0 (fleece_jstr (record, "state"), "starting") == 0)
      cmd_del_cbw_bitmap (h, fleece_jstr (d, "root"), fleece_jstr (record, "bitmap"));
    if (!del_if_present (h, nodes, snap, err))
      return false;
  }
  for (size_t i = 0; i < n; i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    g_autofree char *cbw = cbw_node (fleece_jstr (d, "key"));
    const char *qdev = fleece_jstr (d, "qdev"), *root = fleece_jstr (d, "root");
    const char *cur = qdev ? g_hash_table_lookup (roots, qdev) : NULL;

    /* Re-point only devices that point at our filter: qom-set to the node
     * a device already uses aborts QEMU 10.0.2. */
    if (cur && strcmp (cur, cbw) == 0) {
      if (!root || !g_hash_table_contains (nodes, root)) {
        g_set_error (err, FLEECE_ERROR, ENOENT,
                     "device %s uses %s but its original node '%s' is gone; "
                     "it cannot be restored", qdev, cbw, root ? root : "");
        return false;
      }
      if (!cmd_set_drive (h, qdev, root, err))
        return false;
    }
  }
  /* Children added inline go with their parent, those added on their own
   * (to be formatted) stay: look again before each layer, once for all
   * drives (once per drive made cleanup quadratic: 2.2 s for 64 drives,
   * docs/benchmarks.md).  A target's file node goes also when the images
   * stay: the target file itself is removed. */
  {
    static const NodeNameFn filters[] = { cbw_node, target_node, NULL };
    static const NodeNameFn images[] = { target_file_node, fleecing_node, NULL };
    static const NodeNameFn target_files[] = { target_file_node, NULL };
    static const NodeNameFn image_files[] = { fleecing_file_node, NULL };

    if (!del_layer (h, drives, &nodes, filters, false, err) ||
        !del_layer (h, drives, &nodes, keep_images ? target_files : images, true, err) ||
        (!keep_images && !del_layer (h, drives, &nodes, image_files, true, err)))
      return false;
  }

  if (fleece_jbool (record, "paused-by-us")) {
    g_autoptr (json_object) st = fleece_qmp_execute (h->qmp, "query-status", NULL, err);
    if (!st)
      return false;
    if (!fleece_jbool (st, "running") && !qmp_do (h, "cont", NULL, err))
      return false;
    json_object_object_add (record, "paused-by-us", json_object_new_boolean (false));
  }
  return true;
}

/* Target files we created for a run that did not succeed are not a backup:
 * remove them, or the next run into the same directory finds them. */
static void
remove_unfinished_targets (struct fleece_handle *h, json_object *record)
{
  json_object *drives;

  if (g_strcmp0 (fleece_jstr (record, "state"), "succeeded") == 0 ||
      !json_object_object_get_ex (record, "drives", &drives))
    return;
  for (size_t i = 0; i < json_object_array_length (drives); i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    const char *path = fleece_jstr (d, "target-file");

    if (path && unlink (path) == 0)
      fleece_log (h, FLEECE_LOG_INFO, "removed the unfinished backup %s", path);
  }
}

static bool
qemu_cleanup (struct fleece_handle *h, json_object *record, GError **err)
{
  if (h->qmp && !undo_graph (h, record, false, err))
    return false;
  if (!fleece_free_recorded_images (h, record, err))
    return false;
  remove_unfinished_targets (h, record);
  return true;
}

/* Back to "attached" after a failed start: the images stay. */
static bool
undo_start (struct fleece_handle *h, json_object *record, GError **err)
{
  return undo_graph (h, record, true, err);
}

/* ---- attach ---------------------------------------------------------------- */

/* The QOM property of path, or NULL (g_free) if it has none or it is empty. */
static char *
qom_get_str (struct fleece_handle *h, const char *path, const char *prop)
{
  json_object *a = json_object_new_object ();
  g_autoptr (json_object) r = NULL;
  const char *v;

  fleece_jset_str (a, "path", path);
  fleece_jset_str (a, "property", prop);
  r = fleece_qmp_execute (h->qmp, "qom-get", a, NULL);
  if (!r || !json_object_is_type (r, json_type_string))
    return NULL;
  v = json_object_get_string (r);
  return v && *v ? g_strdup (v) : NULL;
}

/* Does the device (virtio-blk) or its controller (virtio-scsi, through the
 * bus it sits on) run its I/O in an iothread? */
static bool
uses_iothread (struct fleece_handle *h, const char *qdev)
{
  g_autofree char *io = qom_get_str (h, qdev, "iothread");
  g_autofree char *bus = NULL;
  g_autofree char *ctrl = NULL;
  g_autofree char *ctrl_io = NULL;

  if (io)
    return true;
  if (!(bus = qom_get_str (h, qdev, "parent_bus")))
    return false;
  ctrl = g_path_get_dirname (bus);
  ctrl_io = qom_get_str (h, ctrl, "iothread");
  return ctrl_io != NULL;
}

/* QEMU 10.0.0 to 10.0.2 can crash on qom-set drive of a device whose
 * BlockBackend is in an iothread (missing return in set_drive_helper,
 * fixed in 10.0.3): refuse rather than kill the VM. */
static bool
check_iothread_bug (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  const FleeceFeatures *f = &h->features;
  g_autoptr (json_object) threads = NULL;

  if (!(f->qemu_major == 10 && f->qemu_minor == 0 && f->qemu_micro <= 2))
    return true;
  if (!(threads = fleece_qmp_execute (h->qmp, "query-iothreads", NULL, err)))
    return false;
  if (json_object_array_length (threads) == 0)
    return true;
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    if (d->fleeced && uses_iothread (h, d->qdev)) {
      g_set_error (err, FLEECE_ERROR, ENOTSUP,
                   "drive %s runs in an iothread, and QEMU %d.%d.%d can crash "
                   "the VM when a fleecing filter is put in front of such a "
                   "device (fixed in QEMU 10.0.3): upgrade QEMU, or back up "
                   "this drive without fleecing", d->key, f->qemu_major,
                   f->qemu_minor, f->qemu_micro);
      return false;
    }
  }
  return true;
}

/* Incremental needs the bitmap on every drive's root node. */
static bool
check_bitmaps (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  json_object *args = json_object_new_object ();
  g_autoptr (json_object) nodes = NULL;

  json_object_object_add (args, "flat", json_object_new_boolean (true));
  if (!(nodes = fleece_qmp_execute (h->qmp, "query-named-block-nodes", args, err)))
    return false;
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    bool found = false;

    for (size_t j = 0; j < json_object_array_length (nodes) && !found; j++) {
      json_object *n = json_object_array_get_idx (nodes, j), *bms;
      if (g_strcmp0 (fleece_jstr (n, "node-name"), d->root) != 0 ||
          !json_object_object_get_ex (n, "dirty-bitmaps", &bms) ||
          !json_object_is_type (bms, json_type_array))
        continue;
      for (size_t k = 0; k < json_object_array_length (bms) && !found; k++)
        found = g_strcmp0 (fleece_jstr (json_object_array_get_idx (bms, k), "name"),
                           h->bitmap) == 0;
    }
    if (!found) {
      g_set_error (err, FLEECE_ERROR, ENOENT,
                   "drive %s has no dirty bitmap '%s' on its node %s: add it "
                   "with block-dirty-bitmap-add, or back up in full",
                   d->key, h->bitmap, d->root);
      return false;
    }
  }
  return true;
}

static bool
qemu_check_plan (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  const FleeceFeatures *f = &h->features;
  bool any_fleeced = false;

  if (h->bitmap && !check_bitmaps (h, p, err))
    return false;
  for (guint i = 0; i < p->drives->len; i++)
    any_fleeced |= ((FleeceDrive *) p->drives->pdata[i])->fleeced;
  if (!any_fleeced)
    return true;
  if ((!f->cbw || !f->snapshot_access || !f->cbw_on_cbw_error || !f->cbw_timeout) &&
      (h->plan_flags & FLEECE_PLAN_FLEECING_OPTIONAL)) {
    fleece_log (h, FLEECE_LOG_WARNING,
                "running QEMU version does not support backup fleecing - "
                "continuing without");
    for (guint i = 0; i < p->drives->len; i++) {
      FleeceDrive *d = p->drives->pdata[i];
      if (d->fleeced) {
        d->fleeced = false;
        g_clear_pointer (&d->image, g_free);
        g_clear_pointer (&d->format, g_free);
        d->cluster_size = 0;
        g_free (d->reason);
        d->reason = g_strdup ("the running QEMU cannot fleece");
      }
    }
    return true;
  }
  if (!f->cbw || !f->snapshot_access || !f->cbw_on_cbw_error || !f->cbw_timeout) {
    g_set_error (err, FLEECE_ERROR, ENOTSUP,
                 "QEMU %d.%d.%d lacks %s, which fleecing needs (QEMU >= 7.1; "
                 "9.2 or later recommended)",
                 f->qemu_major, f->qemu_minor, f->qemu_micro,
                 !f->cbw ? "the copy-before-write driver"
                 : !f->snapshot_access ? "the snapshot-access driver"
                 : "copy-before-write's on-cbw-error/cbw-timeout");
    return false;
  }
  if (!check_iothread_bug (h, p, err))
    return false;
  if (h->bitmap && !f->cbw_bitmap) {
    g_set_error (err, FLEECE_ERROR, ENOTSUP,
                 "QEMU %d.%d.%d lacks copy-before-write's bitmap option, which "
                 "incremental fleecing needs (QEMU >= 7.0)",
                 f->qemu_major, f->qemu_minor, f->qemu_micro);
    return false;
  }
  if (!f->discard_source)
    fleece_log (h, FLEECE_LOG_WARNING,
                "QEMU %d.%d.%d lacks blockdev-backup discard-source (QEMU >= "
                "9.1): fleecing images keep every copied cluster until the end",
                f->qemu_major, f->qemu_minor, f->qemu_micro);
  if (!f->perf_min_cluster_size)
    fleece_log (h, FLEECE_LOG_WARNING,
                "QEMU %d.%d.%d lacks backup x-perf.min-cluster-size (QEMU >= "
                "9.2): discard may not free space in images with large "
                "clusters", f->qemu_major, f->qemu_minor, f->qemu_micro);
  return true;
}

/* Leftover fleecing nodes of these drives from a run we have no record of
 * (e.g. Proxmox's own): detach them, as qemu-server does before attaching. */
static bool
remove_leftovers (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  g_autoptr (GHashTable) nodes = NULL;
  g_autoptr (json_object) keys = json_object_new_array ();
  guint before;

  /* A run that died while QEMU formatted its images left the jobs. */
  for (guint i = 0; i < p->drives->len; i++) {
    json_object *k = json_object_new_object ();
    fleece_jset_str (k, "key", ((FleeceDrive *) p->drives->pdata[i])->key);
    json_object_array_add (keys, k);
  }
  if (!settle_jobs (h, keys, false, true, true, err) ||
      !(nodes = query_nodes (h, err)))
    return false;
  before = g_hash_table_size (nodes);
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    g_autofree char *snap = snap_node (d->key);
    g_autofree char *fl = fleecing_node (d->key);
    g_autofree char *ff = fleecing_file_node (d->key);

    if (g_hash_table_contains (nodes, snap) || g_hash_table_contains (nodes, fl) ||
        g_hash_table_contains (nodes, ff))
      fleece_log (h, FLEECE_LOG_WARNING, "removing leftover fleecing nodes of %s",
                  d->key);
    if (!del_if_present (h, nodes, snap, err) || !del_if_present (h, nodes, fl, err))
      return false;
  }
  /* A file node added inline went with its format node: look again, once
   * for all drives, and only if something was deleted. */
  if (g_hash_table_size (nodes) != before) {
    g_hash_table_unref (nodes);
    if (!(nodes = query_nodes (h, err)))
      return false;
  }
  for (guint i = 0; i < p->drives->len; i++) {
    g_autofree char *ff = fleecing_file_node (((FleeceDrive *) p->drives->pdata[i])->key);

    if (!del_if_present (h, nodes, ff, err))
      return false;
  }
  return true;
}

static bool
verify_sizes (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  g_autoptr (GHashTable) nodes = query_nodes (h, err);

  if (!nodes)
    return false;
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    g_autofree char *node = fleecing_node (d->key);
    guint64 *size;

    if (!d->fleeced)
      continue;
    size = g_hash_table_lookup (nodes, node);
    if (!size) {
      g_set_error (err, FLEECE_ERROR, ENOENT, "%s is missing after attaching", node);
      return false;
    }
    if (*size != d->size) {
      g_set_error (err, FLEECE_ERROR, EINVAL,
                   "size mismatch for %s: %" G_GUINT64_FORMAT " != %"
                   G_GUINT64_FORMAT " bytes (the source)", node, *size, d->size);
      return false;
    }
  }
  return true;
}

/* The record's drive entries (record_new() always makes the array). */
static json_object *
record_drives (struct fleece_handle *h)
{
  json_object *drives = NULL;
  json_object_object_get_ex (h->record, "drives", &drives);
  return drives;
}

/* Images from the directory storage in qcow2 come as empty files: QEMU
 * writes their metadata, one blockdev-create job per image started as soon
 * as its file node exists and all awaited together.  For 64 drives that
 * adds ~110 ms to attaching raw images, running qemu-img 64 times added
 * ~500 ms (docs/benchmarks.md). */
static bool
attach_images (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  g_autofree bool *formatting = g_new0 (bool, p->drives->len + 1);
  g_autoptr (GHashTable) jobs = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);

  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    g_autofree char *path = NULL;
    g_autofree char *fnode = fleecing_file_node (d->key);
    g_autofree char *job = format_job_id (d->key);

    if (!d->fleeced)
      continue;
    if (!fleece_storage_alloc_image (h->storage, d->image, d->format, d->size,
                                     &d->volid, &formatting[i], err))
      return false;
    fleece_jset_str (fleece_run_record_drive (h, d->key), "volid", d->volid);
    if (!fleece_run_record_save (h, err))
      return false;
    if (!(path = fleece_storage_image_path (h->storage, d->volid, err)))
      return false;
    if (formatting[i]) {
      if (!cmd_add_file_node (h, path, fnode, err) ||
          !cmd_format_qcow2 (h, job, fnode, d->size, err))
        return false;
      g_hash_table_add (jobs, g_steal_pointer (&job));
    } else if (!cmd_add_fleecing (h, d, path, false, err)) {
      return false;
    }
  }
  if (g_hash_table_size (jobs) > 0 &&
      (!await_jobs (h, jobs, err) ||
       !settle_jobs (h, record_drives (h), false, true, false, err)))
    return false;
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];

    if (!d->fleeced)
      continue;
    if (formatting[i] && !cmd_add_fleecing (h, d, NULL, true, err))
      return false;
    fleece_log (h, FLEECE_LOG_INFO, "attached %s (%s, %" G_GUINT64_FORMAT
                " bytes) for %s", d->image, d->format, d->size, d->key);
  }
  return verify_sizes (h, p, err);
}

static bool
qemu_attach (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  return remove_leftovers (h, p, err) &&
         fleece_run_attach (h, p, record_new (h, p), attach_images,
                            &fleece_engine_qemu_ops, err);
}

/* ---- start ------------------------------------------------------------------ */

static bool
create_targets (struct fleece_handle *h, struct fleece_plan *p,
                struct fleece_target *t, GError **err)
{
  bool qcow2;

  if (t->kind != FLEECE_TARGET_DIR)
    return true;
  qcow2 = strcmp (t->format, "qcow2") == 0;
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    g_autofree char *path = fleece_target_dir_path (t, d->key);

    if (qcow2 && d->size % 512) {
      g_set_error (err, FLEECE_ERROR, EINVAL,
                   "cannot back up %s (%" G_GUINT64_FORMAT " bytes) into a "
                   "qcow2 image: qcow2 sizes are multiples of 512 bytes; use "
                   "a raw target", d->key, d->size);
      return false;
    }
    if (!fleece_image_create_file (path, qcow2 ? 0 : d->size, err))
      return false;
    fleece_jset_str (fleece_run_record_drive (h, d->key), "target-file", path);
  }
  return true;
}

/* The target nodes; qcow2 images in a directory are formatted by QEMU, as
 * the fleecing images are (attach_images()). */
static bool
add_targets (struct fleece_handle *h, struct fleece_plan *p,
             struct fleece_target *t, GError **err)
{
  bool qcow2 = t->kind == FLEECE_TARGET_DIR && strcmp (t->format, "qcow2") == 0;
  g_autoptr (GHashTable) jobs = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);

  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    g_autofree char *fnode = target_file_node (d->key);
    g_autofree char *job = target_format_job_id (d->key);

    if (!qcow2) {
      if (!cmd_add_target (h, t, d, false, err))
        return false;
    } else if (!qmp_do (h, "blockdev-add",
                        fleece_target_file_blockdev (t, d->key, fnode), err) ||
               !cmd_format_qcow2 (h, job, fnode, d->size, err)) {
      return false;
    } else {
      g_hash_table_add (jobs, g_steal_pointer (&job));
    }
  }
  if (!qcow2)
    return true;
  if (!await_jobs (h, jobs, err) ||
      !settle_jobs (h, record_drives (h), false, true, false, err))
    return false;
  for (guint i = 0; i < p->drives->len; i++)
    if (!cmd_add_target (h, t, p->drives->pdata[i], true, err))
      return false;
  return true;
}

/* Target files are the backup once the jobs run; before that they are ours
 * to remove. */
static void
remove_new_targets (struct fleece_handle *h)
{
  json_object *drives = record_drives (h);

  if (!drives)
    return;
  for (size_t i = 0; i < json_object_array_length (drives); i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    if (fleece_jstr (d, "target-file")) {
      unlink (fleece_jstr (d, "target-file"));
      fleece_jset_str (d, "target-file", NULL);
    }
  }
}

static bool
insert_filters (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    g_autofree char *cbw = cbw_node (d->key);

    if (!d->fleeced)
      continue;
    if (h->bitmap && !cmd_add_cbw_bitmap (h, d, err))
      return false;
    if (!cmd_add_cbw (h, d, err)) {
      if (h->bitmap)
        cmd_del_cbw_bitmap (h, d->root, h->bitmap);
      return false;
    }
    if (h->bitmap)
      cmd_del_cbw_bitmap (h, d->root, h->bitmap);
    if (!cmd_set_drive (h, d->qdev, cbw, err) ||
        !cmd_add_snapshot_access (h, d, err))
      return false;
  }
  return true;
}

/* The device's root may have changed since planning (a block job, a
 * throttle change); back up and restore the node it uses now. */
static bool
refresh_roots (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  g_autoptr (GHashTable) roots = query_roots (h, err);

  if (!roots)
    return false;
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    const char *cur = g_hash_table_lookup (roots, d->qdev);

    if (!cur) {
      g_set_error (err, FLEECE_ERROR, ENODEV,
                   "drive %s (%s) is gone since the plan was made", d->key, d->qdev);
      return false;
    }
    if (strcmp (cur, d->root) != 0) {
      g_free (d->root);
      d->root = g_strdup (cur);
      fleece_jset_str (fleece_run_record_drive (h, d->key), "root", cur);
    }
  }
  return true;
}

static bool
qemu_start (struct fleece_handle *h, struct fleece_plan *p,
            struct fleece_target *t, GError **err)
{
  g_autoptr (json_object) status = NULL;

  if (t->kind == FLEECE_TARGET_PVE) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "a Proxmox backup target needs the Proxmox engine; use a "
                 "directory or NBD target with stock QEMU");
    return false;
  }
  if (!refresh_roots (h, p, err))
    return false;
  if (!create_targets (h, p, t, err)) {
    remove_new_targets (h);
    return false;
  }
  json_object_object_add (h->record, "target", fleece_target_describe (t));
  fleece_run_record_set_state (h, "starting");

  /* Filters go in one drive at a time: with the vCPUs stopped meanwhile,
   * no guest write lands between the first and the last, so every drive
   * shares one point in time with the jobs' transaction. */
  if (!(status = fleece_qmp_execute (h->qmp, "query-status", NULL, err)))
    goto fail_early;
  if (fleece_jbool (status, "running"))
    json_object_object_add (h->record, "paused-by-us", json_object_new_boolean (true));
  if (!fleece_run_record_save (h, err))
    goto fail_early;
  /* The targets before the vCPUs stop: they take no part in the point in
   * time, and formatting them need not lengthen the pause. */
  if (!add_targets (h, p, t, err))
    goto fail;
  if (fleece_jbool (status, "running") && !qmp_do (h, "stop", NULL, err))
    goto fail;
  if (!insert_filters (h, p, err) || !cmd_start_jobs (h, p, err))
    goto fail;
  if (fleece_jbool (h->record, "paused-by-us")) {
    if (!qmp_do (h, "cont", NULL, err))
      goto fail;
    json_object_object_add (h->record, "paused-by-us", json_object_new_boolean (false));
  }
  fleece_run_mark_running (h, p);
  fleece_log (h, FLEECE_LOG_INFO, "backup of VM %u started (%u drives)",
              h->vmid, p->drives->len);
  return true;

 fail:
  {
    /* Back to "attached": remove what start added, keep the images. */
    g_autoptr (GError) uerr = NULL;
    g_autoptr (json_object) partial = json_object_get (h->record);
    if (h->qmp && !undo_start (h, partial, &uerr))
      fleece_log (h, FLEECE_LOG_ERROR, "undoing the failed start failed too: %s",
                  uerr->message);
  }
 fail_early:
  remove_new_targets (h);
  fleece_run_record_set_state (h, "attached");
  fleece_run_record_save (h, NULL);
  return false;
}

/* ---- progress and the end -------------------------------------------------- */

static FleeceDrive *
drive_by_job (struct fleece_plan *p, const char *id)
{
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    g_autofree char *j = job_id (d->key);
    if (g_strcmp0 (j, id) == 0)
      return d;
  }
  return NULL;
}

/* With on-cbw-error=break-snapshot a failed or timed-out copy to the
 * fleecing image lets the guest write pass and fails every later snapshot
 * read with EACCES: say what really happened. */
static char *
explain_failure (struct fleece_handle *h, FleeceDrive *d, const char *qerr)
{
  if (d->fleeced && strstr (qerr, "Permission denied")) {
    g_autofree char *path = NULL;
    g_autofree char *space = NULL;
    struct statvfs sv;

    if (h->storage && d->volid)
      path = fleece_storage_image_path (h->storage, d->volid, NULL);
    if (path) {
      g_autofree char *dir = g_path_get_dirname (path);
      if (statvfs (dir, &sv) == 0)
        space = g_strdup_printf (" (%" G_GUINT64_FORMAT " bytes free there now)",
                                 (guint64) sv.f_bavail * sv.f_frsize);
    }
    return g_strdup_printf (
      "backup of %s failed: copying old data to the fleecing image %s failed "
      "or took longer than the cbw-timeout of %u s, so the snapshot broke; "
      "the fleecing storage is full or too slow%s. The guest's writes were "
      "not affected. (QEMU: %s)",
      d->key, d->image, h->cbw_timeout, space ? space : "", qerr);
  }
  return g_strdup_printf ("backup of %s failed: %s", d->key, qerr);
}

static int
qemu_poll (struct fleece_handle *h, int timeout_ms, GError **err)
{
  struct fleece_plan *p = h->run_plan;
  gint64 deadline = timeout_ms < 0 ? -1
                    : g_get_monotonic_time () + (gint64) timeout_ms * 1000;

  for (;;) {
    g_autoptr (json_object) jobs = fleece_qmp_execute (h->qmp, "query-jobs", NULL, err);
    guint concluded = 0;
    gint64 now, wait_ms;

    if (!jobs) {
      g_prefix_error (err, "lost track of the backup of VM %u: ", h->vmid);
      return -1;
    }
    for (size_t i = 0; i < json_object_array_length (jobs); i++) {
      json_object *j = json_object_array_get_idx (jobs, i), *v;
      FleeceDrive *d = drive_by_job (p, fleece_jstr (j, "id"));
      uint64_t done = 0, total;

      if (!d || d->result)
        continue;
      /* QEMU counts whole job clusters, past the end of a disk whose size
       * is not a multiple of them: report bytes of the disk. */
      total = d->size;

      if (json_object_object_get_ex (j, "total-progress", &v) && json_object_get_int64 (v) > 0)
        total = MIN ((uint64_t) json_object_get_int64 (v), d->size);  /* incremental: less */
      if (json_object_object_get_ex (j, "current-progress", &v))
        done = MIN ((uint64_t) json_object_get_int64 (v), total);
      if (g_strcmp0 (fleece_jstr (j, "status"), "concluded") == 0 && !fleece_jstr (j, "error"))
        done = total;
      fleece_drive_set_progress (h, d, done, total);
      if (g_strcmp0 (fleece_jstr (j, "status"), "concluded") == 0) {
        const char *e = fleece_jstr (j, "error");
        d->ended_us = g_get_real_time ();
        if (!e)
          d->result = g_strdup ("ok");
        else if (h->cancelled)
          d->result = g_strdup ("cancelled");
        else
          d->result = explain_failure (h, d, e);
      }
    }
    for (guint i = 0; i < p->drives->len; i++)
      concluded += ((FleeceDrive *) p->drives->pdata[i])->result != NULL;

    if (concluded == p->drives->len) {
      const char *failure = NULL;
      bool all_ok = true;

      for (guint i = 0; i < p->drives->len; i++) {
        FleeceDrive *d = p->drives->pdata[i];
        g_autofree char *id = job_id (d->key);
        g_autoptr (GError) derr = NULL;

        if (!cmd_job (h, "job-dismiss", id, &derr))
          fleece_log (h, FLEECE_LOG_WARNING, "%s", derr->message);
        all_ok = all_ok && strcmp (d->result, "ok") == 0;
        /* Grouped jobs cancelled because another failed say "canceled":
         * report the one that failed. */
        if (strcmp (d->result, "ok") != 0 && strcmp (d->result, "cancelled") != 0 &&
            (!failure || strstr (failure, "Operation canceled")))
          failure = d->result;
      }
      /* Every job completed before the cancel took effect: the backup is
       * whole, and a success (as the Proxmox engine reports it), not
       * something cleanup would remove as unfinished. */
      if (h->cancelled && !all_ok) {
        g_set_error (err, FLEECE_ERROR, ECANCELED, "the backup of VM %u was cancelled",
                     h->vmid);
        return -1;
      }
      if (failure) {
        g_set_error (err, FLEECE_ERROR, EIO, "%s", failure);
        return -1;
      }
      fleece_run_record_set_state (h, "succeeded");
      if (!fleece_run_record_save (h, err))
        return -1;
      fleece_log (h, FLEECE_LOG_INFO, "backup of VM %u finished", h->vmid);
      return 1;
    }

    now = g_get_monotonic_time ();
    if (deadline >= 0 && now >= deadline)
      return 0;
    wait_ms = 500;
    if (deadline >= 0)
      wait_ms = MIN (wait_ms, (deadline - now) / 1000 + 1);
    {
      g_autoptr (GError) werr = NULL;
      json_object *ev = fleece_qmp_wait_event (h->qmp, any_event, NULL, (int) wait_ms, &werr);
      if (ev)
        json_object_put (ev);
      else if (werr && !g_error_matches (werr, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_TIMEOUT)) {
        g_propagate_prefixed_error (err, g_steal_pointer (&werr),
                                    "lost track of the backup of VM %u: ", h->vmid);
        return -1;
      }
    }
  }
}

static bool
qemu_cancel (struct fleece_handle *h, GError **err)
{
  struct fleece_plan *p = h->run_plan;

  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    g_autofree char *id = job_id (d->key);
    g_autoptr (GError) cerr = NULL;

    if (d->result)
      continue;
    /* A job that concluded meanwhile refuses; poll reports its end. */
    if (!cmd_job (h, "job-cancel", id, &cerr))
      fleece_log (h, FLEECE_LOG_DEBUG, "job-cancel %s: %s", id, cerr->message);
  }
  return true;
}

const FleeceEngineOps fleece_engine_qemu_ops = {
  .name = "qemu",
  .check_plan = qemu_check_plan,
  .attach = qemu_attach,
  .start = qemu_start,
  .poll = qemu_poll,
  .cancel = qemu_cancel,
  .cleanup = qemu_cleanup,
};
