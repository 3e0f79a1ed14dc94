/* What both engines do the same way: the record of a run, progress, the
 * run marker, QEMU queries, jobs, qcow2 formatting, and the explanation
 * of a broken snapshot. */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "engine.h"

#define JOB_END_TIMEOUT_MS 120000
#define MARKER_PREFIX "fleece-run-"

const FleeceEngineOps *
fleece_engine_ops_by_name (const char *name)
{
  if (g_strcmp0 (name, "qemu") == 0)
    return &fleece_engine_qemu_ops;
  if (g_strcmp0 (name, "pve") == 0)
    return &fleece_engine_pve_ops;
  return NULL;
}

/* ---- the run's record ------------------------------------------------ */

/* The caller's record store may take its time or talk to QEMU itself
 * (qemu-server locks the VM config): the monitor is free meanwhile. */
bool
fleece_run_save (FleeceRun *run, GError **err)
{
  if (run->rs.store)
    fleece_conn_release (run->ctx->conn);
  return fleece_record_store (&run->rs, run->vmid, run->record, err);
}

void
fleece_run_set_state (FleeceRun *run, const char *state)
{
  fleece_jset_str (run->record, "state", state);
}

json_object *
fleece_record_drives (json_object *record)
{
  json_object *drives = fleece_jobj (record, "drives");

  return drives && json_object_is_type (drives, json_type_array) ? drives : NULL;
}

json_object *
fleece_run_drive (FleeceRun *run, const char *key)
{
  json_object *drives = fleece_record_drives (run->record);

  for (size_t i = 0; drives && i < json_object_array_length (drives); i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    if (g_strcmp0 (fleece_jstr (d, "key"), key) == 0)
      return d;
  }
  return NULL;
}

void
fleece_run_mark_running (FleeceRun *run)
{
  g_autoptr (GError) err = NULL;
  GPtrArray *drives = run->plan->drives;

  fleece_run_set_state (run, "running");
  if (!fleece_run_save (run, &err))
    fleece_log (run->ctx, FLEECE_LOG_WARNING, "cannot update the record: %s",
                err->message);
  for (guint i = 0; i < drives->len; i++) {
    FleeceDrive *d = drives->pdata[i];
    d->started_us = g_get_monotonic_time ();
    d->total = d->size;
  }
}

/* ---- progress -------------------------------------------------------- */

void
fleece_drive_set_progress (FleeceRun *run, FleeceDrive *d, uint64_t done,
                           uint64_t total)
{
  const FleeceCallbacks *cb = run->ctx->cb;

  /* QEMU counts whole job clusters, past the end of a disk whose size is
   * not a multiple of them: report bytes of the disk. */
  if (total)
    d->total = MIN (total, d->size);
  done = MIN (done, d->total);
  /* A job's offset may step back (a retried request): show no such
   * thing. */
  if (done < d->done)
    done = d->done;
  if (done != d->done && cb->progress)
    cb->progress (cb->progress_data, d->key, done, d->total);
  d->done = done;
}

FleeceDrive *
fleece_run_drive_by_device (FleeceRun *run, const char *device)
{
  GPtrArray *drives = run->plan->drives;

  for (guint i = 0; i < drives->len; i++)
    if (g_strcmp0 (((FleeceDrive *) drives->pdata[i])->device, device) == 0)
      return drives->pdata[i];
  return NULL;
}

bool
fleece_drive_has_device (const FleeceDrive *d)
{
  return d->qdev != NULL;
}

/* Images are numbered over the fleeced drives only, in key order (as
 * qemu-server numbers them): again after a drive stopped being fleeced. */
static void
renumber_images (struct fleece_plan *p)
{
  unsigned n = 0;

  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    bool suffixed = d->image && g_str_has_suffix (d->image, d->format);

    if (!d->fleeced)
      continue;
    g_free (d->image);
    d->image = suffixed ? g_strdup_printf ("vm-%u-fleece-%u.%s", p->vmid, n, d->format)
                        : g_strdup_printf ("vm-%u-fleece-%u", p->vmid, n);
    n++;
  }
}

void
fleece_plan_unfleece (struct fleece_plan *p, FleeceDrive *d, const char *reason)
{
  d->fleeced = false;
  g_clear_pointer (&d->image, g_free);
  g_clear_pointer (&d->format, g_free);
  d->cluster_size = 0;
  g_free (d->reason);
  d->reason = g_strdup (reason);
  renumber_images (p);
}

bool
fleece_plan_fleecing_unavailable (FleeceCtx *ctx, struct fleece_plan *p,
                                  const char *why, GError **err)
{
  if (!(ctx->set->plan_flags & FLEECE_PLAN_FLEECING_OPTIONAL)) {
    g_set_error (err, FLEECE_ERROR, ENOTSUP, "%s", why);
    return false;
  }
  fleece_log (ctx, FLEECE_LOG_WARNING, "running QEMU version does not support "
              "backup fleecing - continuing without (%s)", why);
  p->no_fleecing = true;
  for (guint i = 0; i < p->drives->len; i++)
    if (((FleeceDrive *) p->drives->pdata[i])->fleeced)
      fleece_plan_unfleece (p, p->drives->pdata[i], "the running QEMU cannot fleece");
  return true;
}

/* ---- queries ---------------------------------------------------------- */

GHashTable *
fleece_query_nodes (FleeceCtx *ctx, GError **err)
{
  g_autoptr (json_object) r = NULL;
  json_object *args = json_object_new_object ();
  GHashTable *nodes;

  fleece_jset_bool (args, "flat", true);
  if (!(r = fleece_conn_execute (ctx->conn, "query-named-block-nodes", args, err)))
    return NULL;
  nodes = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  for (size_t i = 0; i < json_object_array_length (r); i++) {
    json_object *n = json_object_array_get_idx (r, i);
    const char *name = fleece_jstr (n, "node-name");
    guint64 *size;

    if (!name)
      continue;
    size = g_new0 (guint64, 1);
    *size = (guint64) fleece_jint (fleece_jobj (n, "image"), "virtual-size");
    g_hash_table_replace (nodes, g_strdup (name), size);
  }
  return nodes;
}

GHashTable *
fleece_query_roots (FleeceCtx *ctx, GError **err)
{
  g_autoptr (json_object) r = fleece_conn_execute (ctx->conn, "query-block", NULL, err);

  return r ? fleece_roots_of (r, NULL) : NULL;
}

GHashTable *
fleece_roots_of (json_object *blocks, GHashTable *images)
{
  GHashTable *roots = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);

  for (size_t i = 0; i < json_object_array_length (blocks); i++) {
    json_object *b = json_object_array_get_idx (blocks, i);
    const char *qdev = fleece_jstr (b, "qdev");
    const char *node = fleece_jstr (fleece_jobj (b, "inserted"), "node-name");
    g_autofree char *path = NULL;

    if (!qdev || !*qdev || !node)
      continue;
    if (qdev[0] != '/')
      path = g_strdup_printf ("/machine/peripheral/%s", qdev);
    else if (g_str_has_suffix (qdev, "/virtio-backend"))
      path = g_strndup (qdev, strlen (qdev) - strlen ("/virtio-backend"));
    else
      path = g_strdup (qdev);
    if (images)
      g_hash_table_replace (images, g_strdup (path), fleece_jobj (fleece_jobj (b, "inserted"), "image"));
    g_hash_table_replace (roots, g_steal_pointer (&path), g_strdup (node));
  }
  return roots;
}

json_object *
fleece_query_jobs (FleeceCtx *ctx, GError **err)
{
  return fleece_conn_execute (ctx->conn, "query-jobs", NULL, err);
}

bool
fleece_check_node_size (GHashTable *nodes, const char *node,
                        const FleeceDrive *d, GError **err)
{
  guint64 *size = g_hash_table_lookup (nodes, node);

  if (!size) {
    g_set_error (err, FLEECE_ERROR, ENOENT, "%s is missing after attaching", node);
    return false;
  }
  if (*size != d->size) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "size mismatch for %s: %"
                 G_GUINT64_FORMAT " != %" G_GUINT64_FORMAT " bytes (the "
                 "source)", node, *size, d->size);
    return false;
  }
  return true;
}

/* ---- the failure a broken snapshot makes ------------------------------ */

static char *
free_space (FleeceCtx *ctx, const char *volid)
{
  g_autofree char *path = NULL;
  g_autofree char *dir = NULL;
  struct statvfs sv;

  if (!ctx->storage || !volid || !(path = fleece_storage_path (ctx->storage, volid, NULL)))
    return g_strdup ("");
  dir = g_path_get_dirname (path);
  if (statvfs (dir, &sv) != 0)
    return g_strdup ("");
  return g_strdup_printf (" (%" G_GUINT64_FORMAT " bytes free in %s now)",
                          (guint64) sv.f_bavail * sv.f_frsize, dir);
}

char *
fleece_explain_cbw_failure (FleeceCtx *ctx, const char *what, const char *image,
                            const char *volid, unsigned timeout_s,
                            const char *qerr)
{
  g_autofree char *space = NULL;

  if (!strstr (qerr, "Permission denied") && !strstr (qerr, "err -13 "))
    return NULL;
  space = free_space (ctx, volid);
  return g_strdup_printf (
    "%s failed: copying old data to the fleecing image %s failed or took "
    "longer than the copy-before-write timeout of %u s, so the snapshot "
    "broke; the fleecing storage is full or too slow%s. The guest's writes "
    "did not fail (each waited at most the timeout). (QEMU: %s)", what, image ? image : "", timeout_s,
    space, qerr);
}

/* ---- the run marker ----------------------------------------------------- */

/* fleece-run-<run uuid>.<pid of the process that owns the run>: whoever
 * finds it knows a run is set up on the VM, whatever its state dir, and
 * whether the process that owns it still lives. */
char *
fleece_marker_id (const char *run)
{
  return g_strdup_printf (MARKER_PREFIX "%s.%ld", run, (long) getpid ());
}

/* A secret object: harmless, present in every QEMU build, and its id
 * (unlike a node name) may be long enough for the run's uuid. */
bool
fleece_marker_add (FleeceCtx *ctx, const char *run, GError **err)
{
  json_object *a = json_object_new_object ();
  g_autofree char *id = fleece_marker_id (run);

  fleece_jset_str (a, "qom-type", "secret");
  fleece_jset_str (a, "id", id);
  fleece_jset_str (a, "data", "libfleece");
  return fleece_conn_do (ctx->conn, "object-add", a, err);
}

bool
fleece_marker_del (FleeceCtx *ctx, const FleeceMarker *m, GError **err)
{
  json_object *a = json_object_new_object ();
  g_autofree char *id = g_strdup_printf (MARKER_PREFIX "%s.%ld", m->run, m->pid);

  fleece_jset_str (a, "id", id);
  return fleece_conn_do (ctx->conn, "object-del", a, err);
}

static void
marker_free (FleeceMarker *m)
{
  g_free (m->run);
  g_free (m);
}

bool
fleece_marker_alive (const FleeceMarker *m)
{
  if (m->pid <= 0)
    return false;
  if (m->pid == (long) getpid ())
    return true;
  return kill ((pid_t) m->pid, 0) == 0 || errno == EPERM;
}

GPtrArray *
fleece_markers (FleeceCtx *ctx, GError **err)
{
  json_object *a = json_object_new_object ();
  g_autoptr (json_object) r = NULL;
  GPtrArray *markers;

  fleece_jset_str (a, "path", "/objects");
  if (!(r = fleece_conn_execute (ctx->conn, "qom-list", a, err)))
    return NULL;
  markers = g_ptr_array_new_with_free_func ((GDestroyNotify) marker_free);
  for (size_t i = 0; json_object_is_type (r, json_type_array) &&
                     i < json_object_array_length (r); i++) {
    const char *name = fleece_jstr (json_object_array_get_idx (r, i), "name");
    const char *dot;
    FleeceMarker *m;

    if (!name || !g_str_has_prefix (name, MARKER_PREFIX) || !(dot = strrchr (name, '.')))
      continue;
    m = g_new0 (FleeceMarker, 1);
    m->run = g_strndup (name + strlen (MARKER_PREFIX), (size_t) (dot - name) - strlen (MARKER_PREFIX));
    m->pid = strtol (dot + 1, NULL, 10);
    g_ptr_array_add (markers, m);
  }
  return markers;
}

/* The marker of run among markers, or NULL. */
const FleeceMarker *
fleece_marker_find (GPtrArray *markers, const char *run)
{
  for (guint i = 0; markers && i < markers->len; i++)
    if (g_strcmp0 (((FleeceMarker *) markers->pdata[i])->run, run) == 0)
      return markers->pdata[i];
  return NULL;
}

/* ---- jobs ---------------------------------------------------------------- */

bool
fleece_job_do (FleeceCtx *ctx, const char *cmd, const char *id, GError **err)
{
  json_object *a = json_object_new_object ();

  fleece_jset_str (a, "id", id);
  return fleece_conn_do (ctx->conn, cmd, a, err);
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

/* Drop from ids the jobs QEMU no longer runs. */
static bool
forget_ended_jobs (FleeceCtx *ctx, GHashTable *ids, GError **err)
{
  g_autoptr (json_object) jobs = fleece_query_jobs (ctx, err);
  g_autoptr (GHashTable) running = g_hash_table_new (g_str_hash, g_str_equal);
  GHashTableIter it;
  gpointer id;

  if (!jobs)
    return false;
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
  return true;
}

/* By events and without sending a command while they come, so that the
 * commands of a setup are the same whatever the timing (the fault tests
 * kill the caller at each of them by number). */
bool
fleece_await_jobs (FleeceCtx *ctx, GHashTable *ids, GError **err)
{
  gint64 deadline = g_get_monotonic_time () + JOB_END_TIMEOUT_MS * 1000LL;

  while (g_hash_table_size (ids) > 0) {
    g_autoptr (GError) werr = NULL;
    g_autoptr (json_object) ev = fleece_conn_wait_event (ctx->conn, job_end_event,
                                                         ids, 2000, &werr);
    if (ev) {
      g_hash_table_remove (ids, fleece_jstr (fleece_jobj (ev, "data"), "id"));
      continue;
    }
    if (!g_error_matches (werr, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_TIMEOUT)) {
      g_propagate_error (err, g_steal_pointer (&werr));
      return false;
    }
    if (g_get_monotonic_time () > deadline) {
      g_set_error (err, FLEECE_ERROR, ETIMEDOUT, "QEMU's jobs did not end "
                   "within %d s", JOB_END_TIMEOUT_MS / 1000);
      return false;
    }
    if (!forget_ended_jobs (ctx, ids, err))
      return false;
  }
  return true;
}

bool
fleece_add_storage_objects (FleeceRun *run, GError **err)
{
  g_autofree char *prefix = g_strdup_printf ("fleece-%.8s", fleece_jstr (run->record, "run"));
  g_autoptr (json_object) objs = NULL;
  g_autoptr (GError) oerr = NULL;
  json_object *ids;

  if (!run->ctx->storage)
    return true;
  if (!(objs = fleece_storage_qemu_objects (run->ctx->storage, prefix, &oerr))) {
    if (!oerr)
      return true;                /* the storage needs none */
    g_propagate_error (err, g_steal_pointer (&oerr));
    return false;
  }
  /* Write-ahead: the ids first, so that undo removes what was added. */
  ids = json_object_new_array ();
  for (size_t i = 0; i < json_object_array_length (objs); i++)
    json_object_array_add (ids, json_object_new_string (
                             fleece_jstr (json_object_array_get_idx (objs, i), "id")));
  json_object_object_add (run->record, "qemu-objects", ids);
  if (!fleece_run_save (run, err))
    return false;
  for (size_t i = 0; i < json_object_array_length (objs); i++)
    if (!fleece_conn_do (run->ctx->conn, "object-add",
                         json_object_get (json_object_array_get_idx (objs, i)), err))
      return false;
  return true;
}

void
fleece_del_storage_objects (FleeceCtx *ctx, json_object *record)
{
  json_object *ids = fleece_jobj (record, "qemu-objects");

  for (size_t i = 0; ids && json_object_is_type (ids, json_type_array) &&
                     i < json_object_array_length (ids); i++) {
    const char *id = json_object_get_string (json_object_array_get_idx (ids, i));
    g_autoptr (GError) e = NULL;
    json_object *a;

    if (!id || !g_str_has_prefix (id, "fleece-"))
      continue;
    a = json_object_new_object ();
    fleece_jset_str (a, "id", id);
    if (!fleece_conn_do (ctx->conn, "object-del", a, &e))
      fleece_log (ctx, FLEECE_LOG_DEBUG, "%s", e->message);
  }
}

bool
fleece_add_image_file (FleeceCtx *ctx, const FleeceDrive *d, const char *node,
                       GError **err)
{
  json_object *file;

  /* The caller's blockdev callback may take its time or use the monitor
   * itself. */
  if (fleece_storage_is_callers (ctx->storage))
    fleece_conn_release (ctx->conn);
  if (!(file = fleece_storage_blockdev (ctx->storage, d->volid, node, err)))
    return false;
  fleece_jset_str (file, "discard", "unmap");
  fleece_jset_str (file, "detect-zeroes", "unmap");
  return fleece_conn_do (ctx->conn, "blockdev-add", file, err);
}

bool
fleece_add_image_format (FleeceCtx *ctx, const FleeceDrive *d, const char *node,
                         const char *file_node, GError **err)
{
  json_object *a = json_object_new_object ();

  fleece_jset_str (a, "driver", d->format);
  fleece_jset_str (a, "node-name", node);
  fleece_jset_str (a, "discard", "unmap");
  fleece_jset_str (a, "detect-zeroes", "unmap");
  fleece_jset_str (a, "file", file_node);
  /* Storages round sizes up (LVM extents, KiB for raw): raw takes the
   * exact size, qcow2 was created with it. */
  if (strcmp (d->format, "raw") == 0)
    fleece_jset_int (a, "size", (int64_t) d->size);
  return fleece_conn_do (ctx->conn, "blockdev-add", a, err);
}

bool
fleece_format_qcow2 (FleeceCtx *ctx, const char *job, const char *node,
                     uint64_t size, uint64_t cluster_size, const char *backing,
                     const char *backing_fmt, GError **err)
{
  json_object *a = json_object_new_object ();
  json_object *o = json_object_new_object ();

  fleece_jset_str (o, "driver", "qcow2");
  fleece_jset_str (o, "file", node);
  fleece_jset_int (o, "size", (int64_t) size);
  if (cluster_size)
    fleece_jset_int (o, "cluster-size", (int64_t) cluster_size);
  if (backing) {
    fleece_jset_str (o, "backing-file", backing);
    fleece_jset_str (o, "backing-fmt", backing_fmt);
  }
  fleece_jset_str (a, "job-id", job);
  json_object_object_add (a, "options", o);
  return fleece_conn_do (ctx->conn, "blockdev-create", a, err);
}

bool
fleece_finish_format_jobs (FleeceCtx *ctx, GHashTable *ids, GError **err)
{
  g_autoptr (GHashTable) pending = g_hash_table_new (g_str_hash, g_str_equal);
  g_autoptr (json_object) jobs = NULL;
  GHashTableIter it;
  gpointer id;
  bool ok = true;

  g_hash_table_iter_init (&it, ids);
  while (g_hash_table_iter_next (&it, &id, NULL))
    g_hash_table_add (pending, id);
  if (!fleece_await_jobs (ctx, pending, err) || !(jobs = fleece_query_jobs (ctx, err)))
    return false;
  for (size_t i = 0; i < json_object_array_length (jobs); i++) {
    json_object *j = json_object_array_get_idx (jobs, i);
    const char *jid = fleece_jstr (j, "id");

    if (!jid || !g_hash_table_contains (ids, jid))
      continue;
    if (ok && fleece_jstr (j, "error")) {
      g_set_error (err, FLEECE_ERROR, EIO, "QEMU could not write the qcow2 "
                   "metadata of %s (job %s): %s",
                   (const char *) g_hash_table_lookup (ids, jid), jid,
                   fleece_jstr (j, "error"));
      ok = false;
    }
    if (g_strcmp0 (fleece_jstr (j, "status"), "concluded") == 0 &&
        !fleece_job_do (ctx, "job-dismiss", jid, ok ? err : NULL) && ok)
      return false;
  }
  return ok;
}
