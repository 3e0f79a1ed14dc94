/* Probing QEMU, choosing the engine, and the public lifecycle calls, which
 * check their preconditions here and leave the QMP work to the engine. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uuid/uuid.h>

#include "internal.h"
#include "engine.h"

static const FleeceEngineOps *
ops_by_name (const char *name)
{
  if (g_strcmp0 (name, "qemu") == 0)
    return &fleece_engine_qemu_ops;
  if (g_strcmp0 (name, "pve") == 0)
    return &fleece_engine_pve_ops;
  return NULL;
}

const FleeceEngineOps *
fleece_engine_ops (struct fleece_handle *h)
{
  return h->engine == FLEECE_ENGINE_PVE ? &fleece_engine_pve_ops
                                        : &fleece_engine_qemu_ops;
}

bool
fleece_engine_probe (struct fleece_handle *h, GError **err)
{
  g_autoptr (FleeceQmpSchema) s = NULL;
  FleeceFeatures *f = &h->features;
  const char *cbw = "copy-before-write";

  memset (f, 0, sizeof *f);
  s = fleece_qmp_schema_load (h->qmp, err);
  if (!s)
    return false;
  f->cbw = fleece_qmp_schema_has_driver (s, cbw);
  f->cbw_bitmap = f->cbw && fleece_qmp_schema_driver_has_member (s, cbw, "bitmap");
  f->cbw_on_cbw_error = f->cbw && fleece_qmp_schema_driver_has_member (s, cbw, "on-cbw-error");
  f->cbw_timeout = f->cbw && fleece_qmp_schema_driver_has_member (s, cbw, "cbw-timeout");
  f->cbw_min_cluster_size = f->cbw && fleece_qmp_schema_driver_has_member (s, cbw, "min-cluster-size");
  f->snapshot_access = fleece_qmp_schema_has_driver (s, "snapshot-access");
  f->discard_source = fleece_qmp_schema_command_has_arg (s, "blockdev-backup", "discard-source");
  f->perf_min_cluster_size =
    fleece_qmp_schema_arg_has_member (s, "blockdev-backup", "x-perf", "min-cluster-size");
  f->perf_max_workers =
    fleece_qmp_schema_arg_has_member (s, "blockdev-backup", "x-perf", "max-workers");
  fleece_qmp_get_version (h->qmp, &f->qemu_major, &f->qemu_minor, &f->qemu_micro);

  f->pve_support = fleece_qmp_schema_has_command (s, "query-proxmox-support");
  if (f->pve_support) {
    g_autoptr (GError) perr = NULL;
    g_autoptr (json_object) r =
      fleece_qmp_execute (h->qmp, "query-proxmox-support", NULL, &perr);
    json_object *v;

    if (!r)
      fleece_log (h, FLEECE_LOG_WARNING, "query-proxmox-support failed: %s",
                  perr->message);
    else {
      if (json_object_object_get_ex (r, "backup-fleecing", &v))
        f->pve_backup_fleecing = json_object_get_boolean (v);
      if (json_object_object_get_ex (r, "backup-access-api", &v))
        f->pve_backup_access = json_object_get_boolean (v);
    }
  }
  f->loaded = true;
  return fleece_engine_choose (h, err);
}

bool
fleece_engine_choose (struct fleece_handle *h, GError **err)
{
  switch (h->engine_request) {
  case FLEECE_ENGINE_PVE:
    /* A patched QEMU without backup-fleecing still has its backup command:
     * the engine's plan warns and backs up without fleecing if allowed
     * (FLEECE_PLAN_FLEECING_OPTIONAL), as qemu-server does. */
    if (!h->features.pve_support) {
      g_set_error (err, FLEECE_ERROR, ENOTSUP,
                   "the Proxmox engine needs Proxmox's patched QEMU "
                   "(query-proxmox-support); this QEMU %d.%d.%d is not "
                   "Proxmox's",
                   h->features.qemu_major, h->features.qemu_minor,
                   h->features.qemu_micro);
      return false;
    }
    h->engine = FLEECE_ENGINE_PVE;
    break;
  case FLEECE_ENGINE_QEMU:
    h->engine = FLEECE_ENGINE_QEMU;
    break;
  default:
    h->engine = h->features.pve_backup_fleecing ? FLEECE_ENGINE_PVE
                                                : FLEECE_ENGINE_QEMU;
    if (h->features.pve_support && !h->features.pve_backup_fleecing)
      fleece_log (h, FLEECE_LOG_WARNING,
                  "running QEMU version does not support backup fleecing - "
                  "using the stock QEMU engine");
    break;
  }
  return true;
}

/* ---- the public lifecycle ------------------------------------------ */

static bool
need_connection (struct fleece_handle *h, const char *func)
{
  if (!h->qmp) {
    fleece_error_set (func, ENOTCONN,
                      "not connected: call fleece_connect() first");
    return false;
  }
  if (!h->vmid) {
    fleece_error_set (func, EINVAL, "no vmid: call fleece_set_vmid() first");
    return false;
  }
  return true;
}

static bool
take_lock (struct fleece_handle *h, GError **err)
{
  if (h->lock_fd >= 0)
    return true;
  h->lock_fd = fleece_lock_vm (h->state_dir, h->vmid, err);
  return h->lock_fd >= 0;
}

static void
release_run (struct fleece_handle *h)
{
  if (h->lock_fd >= 0) {
    close (h->lock_fd);
    h->lock_fd = -1;
  }
  if (h->record) {
    json_object_put (h->record);
    h->record = NULL;
  }
  fleece_plan_free (h->run_plan);
  h->run_plan = NULL;
  g_clear_pointer (&h->failure, g_free);
  h->cancelled = false;
  h->state = FLEECE_STATE_IDLE;
}

/* Undo what record describes and remove it.  Assumes the lock is held. */
static bool
cleanup_record (struct fleece_handle *h, json_object *record, GError **err)
{
  FleeceRecordStore rs = fleece_handle_record_store (h);
  json_object *v;
  const FleeceEngineOps *ops;
  const char *engine = NULL;

  if (json_object_object_get_ex (record, "engine", &v))
    engine = json_object_get_string (v);
  ops = ops_by_name (engine);
  if (!ops) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "the record of VM %u names an unknown engine '%s'",
                 h->vmid, engine ? engine : "");
    return false;
  }
  /* A connection broken by QEMU's death (or an earlier error) is useless:
   * reconnect, which also tells whether QEMU is gone. */
  if (h->qmp && !fleece_qmp_is_connected (h->qmp))
    g_clear_pointer (&h->qmp, fleece_qmp_free);
  if (!h->qmp && json_object_object_get_ex (record, "qmp", &v) &&
      json_object_get_string (v)) {
    g_autoptr (GError) cerr = NULL;
    const char *path = json_object_get_string (v);

    /* A QEMU that is dying may still accept and then drop the connection
     * (EOF, reset): try again until it answers or is gone. */
    for (int i = 0; !fleece_handle_open (h, path, &cerr) && i < 10; i++) {
      if (g_error_matches (cerr, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_NO_PEER) ||
          g_error_matches (cerr, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_TIMEOUT))
        break;
      g_clear_error (&cerr);
      g_usleep (200 * 1000);
    }
    if (!h->qmp) {
      /* Only a QEMU that is gone has nothing left to undo: one that does
       * not answer still holds our nodes and writes to our images. */
      if (!g_error_matches (cerr, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_NO_PEER)) {
        g_propagate_prefixed_error (err, g_steal_pointer (&cerr),
                                    "cannot clean up VM %u: its QEMU is there "
                                    "but cannot be used (is another client "
                                    "on its QMP socket?): ", h->vmid);
        return false;
      }
      fleece_log (h, FLEECE_LOG_WARNING,
                  "QEMU of VM %u is gone (%s): nothing to undo there, "
                  "freeing the images only", h->vmid, cerr->message);
    }
  }
  if (!h->storage && json_object_object_get_ex (record, "storage", &v)) {
    g_autoptr (GError) serr = NULL;
    h->storage = fleece_storage_from_description (v, &serr);
    if (!h->storage)
      fleece_log (h, FLEECE_LOG_WARNING, "%s", serr->message);
  }
  if (!ops->cleanup (h, record, err))
    return false;
  return fleece_record_remove (&rs, h->vmid, err);
}

static void
forget_last_run (struct fleece_plan *p)
{
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];

    g_clear_pointer (&d->volid, g_free);
    g_clear_pointer (&d->result, g_free);
    d->done = d->total = 0;
    d->started_us = d->ended_us = 0;
  }
}

FLEECE_API int
fleece_attach (struct fleece_handle *h, struct fleece_plan *p)
{
  g_autoptr (GError) err = NULL;
  g_autoptr (json_object) old = NULL;
  FleeceRecordStore rs = fleece_handle_record_store (h);

  if (!need_connection (h, __func__))
    return -1;
  if (!p) {
    fleece_error_set (__func__, EINVAL, "plan is NULL");
    return -1;
  }
  if (p->vmid != h->vmid) {
    fleece_error_set (__func__, EINVAL,
                      "the plan is for VM %u, the handle for VM %u",
                      p->vmid, h->vmid);
    return -1;
  }
  if (g_strcmp0 (p->engine, fleece_engine_ops (h)->name) != 0) {
    fleece_error_set (__func__, EINVAL,
                      "the plan was made for the %s engine; plan again",
                      p->engine);
    return -1;
  }
  if (h->state != FLEECE_STATE_IDLE) {
    fleece_error_set (__func__, EBUSY,
                      "a run is already set up on this handle; call "
                      "fleece_cleanup() first");
    return -1;
  }
  /* A plan serves one run at a time (a handle holds a reference while it
   * runs) and may serve another after cleanup: that one starts with no
   * progress and no results, or fleece_wait() would take the last run's
   * results as this one's and report success while the jobs still run. */
  if (p->refs > 1) {
    fleece_error_set (__func__, EBUSY,
                      "the plan is in use by another run; plan again");
    return -1;
  }
  forget_last_run (p);
  if (!take_lock (h, &err))
    goto fail;

  /* A previous run that died leaves its record: undo it first. */
  old = fleece_record_load (&rs, h->vmid, &err);
  if (err)
    goto fail;
  if (old) {
    fleece_log (h, FLEECE_LOG_WARNING,
                "VM %u has a record of an earlier run; cleaning it up first",
                h->vmid);
    if (!cleanup_record (h, old, &err))
      goto fail;
  }

  if (!fleece_engine_ops (h)->attach (h, p, &err))
    goto fail;
  h->run_plan = fleece_plan_ref (p);
  h->state = FLEECE_STATE_ATTACHED;
  return 0;

 fail:
  release_run (h);
  fleece_error_set_gerror (__func__, err);
  return -1;
}

FLEECE_API int
fleece_start (struct fleece_handle *h, struct fleece_plan *p,
              struct fleece_target *t)
{
  g_autoptr (GError) err = NULL;

  if (!need_connection (h, __func__))
    return -1;
  if (!p || !t) {
    fleece_error_set (__func__, EINVAL, "%s is NULL", p ? "target" : "plan");
    return -1;
  }
  if (h->state != FLEECE_STATE_ATTACHED || h->run_plan != p) {
    fleece_error_set (__func__, EINVAL,
                      h->state == FLEECE_STATE_IDLE
                        ? "nothing attached: call fleece_attach() with this "
                          "plan first"
                        : h->state == FLEECE_STATE_ATTACHED
                        ? "the plan is not the one attached"
                        : "the backup was started already");
    return -1;
  }
  if (!fleece_engine_ops (h)->start (h, p, t, &err)) {
    fleece_error_set_gerror (__func__, err);
    return -1;
  }
  h->state = FLEECE_STATE_RUNNING;
  return 0;
}

FLEECE_API int
fleece_wait (struct fleece_handle *h, int timeout_ms)
{
  g_autoptr (GError) err = NULL;
  int r;

  switch (h->state) {
  case FLEECE_STATE_FINISHED:
    return 1;
  case FLEECE_STATE_FAILED:
    fleece_error_set (__func__, h->cancelled ? ECANCELED : EIO, "%s",
                      h->failure ? h->failure : "the backup failed");
    return -1;
  case FLEECE_STATE_RUNNING:
    break;
  default:
    fleece_error_set (__func__, EINVAL,
                      "no backup is running: call fleece_start() first");
    return -1;
  }

  r = fleece_engine_ops (h)->poll (h, timeout_ms, &err);
  if (r == 0)
    return 0;
  if (r > 0) {
    h->state = FLEECE_STATE_FINISHED;
    return 1;
  }
  h->state = FLEECE_STATE_FAILED;
  if (!h->failure)
    h->failure = g_strdup (err ? err->message : "the backup failed");
  fleece_error_set (__func__, h->cancelled ? ECANCELED : fleece_error_errno (err),
                    "%s", h->failure);
  return -1;
}

FLEECE_API int
fleece_cancel (struct fleece_handle *h)
{
  g_autoptr (GError) err = NULL;

  if (h->state != FLEECE_STATE_RUNNING) {
    fleece_error_set (__func__, EINVAL, "no backup is running");
    return -1;
  }
  h->cancelled = true;
  if (!fleece_engine_ops (h)->cancel (h, &err)) {
    fleece_error_set_gerror (__func__, err);
    return -1;
  }
  return 0;
}

FLEECE_API int
fleece_get_progress (struct fleece_handle *h, uint64_t *done, uint64_t *total)
{
  uint64_t d = 0, t = 0;

  if (!h->run_plan) {
    fleece_error_set (__func__, EINVAL, "no backup is set up");
    return -1;
  }
  for (guint i = 0; i < h->run_plan->drives->len; i++) {
    FleeceDrive *dr = h->run_plan->drives->pdata[i];
    d += dr->done;
    t += dr->total ? dr->total : dr->size;
  }
  if (done)
    *done = d;
  if (total)
    *total = t;
  return 0;
}

static FleeceDrive *run_drive (struct fleece_handle *h, const char *key,
                               const char *func);

FLEECE_API int
fleece_get_drive_progress (struct fleece_handle *h, const char *key,
                           uint64_t *done, uint64_t *total)
{
  FleeceDrive *dr = run_drive (h, key, __func__);

  if (!dr)
    return -1;
  if (done)
    *done = dr->done;
  if (total)
    *total = dr->total ? dr->total : dr->size;
  return 0;
}

FLEECE_API char *
fleece_get_record (struct fleece_handle *h)
{
  g_autoptr (GError) err = NULL;
  g_autoptr (json_object) r = NULL;
  FleeceRecordStore rs = fleece_handle_record_store (h);

  if (!h->vmid) {
    fleece_error_set (__func__, EINVAL, "no vmid: call fleece_set_vmid() first");
    return NULL;
  }
  r = fleece_record_load (&rs, h->vmid, &err);
  if (!r) {
    if (err)
      fleece_error_set_gerror (__func__, err);
    else
      fleece_error_set (__func__, ENOENT, "VM %u has no record", h->vmid);
    return NULL;
  }
  return strdup (json_object_to_json_string_ext (r, JSON_C_TO_STRING_PRETTY |
                                                    JSON_C_TO_STRING_NOSLASHESCAPE));
}

FLEECE_API int
fleece_cleanup (struct fleece_handle *h)
{
  g_autoptr (GError) err = NULL;
  g_autoptr (json_object) record = NULL;
  FleeceRecordStore rs = fleece_handle_record_store (h);

  if (!h->vmid) {
    fleece_error_set (__func__, EINVAL, "no vmid: call fleece_set_vmid() first");
    return -1;
  }
  if (!take_lock (h, &err)) {
    fleece_error_set_gerror (__func__, err);
    return -1;
  }
  record = fleece_record_load (&rs, h->vmid, &err);
  if (err) {
    fleece_error_set_gerror (__func__, err);
    if (h->state == FLEECE_STATE_IDLE)
      release_run (h);
    return -1;
  }
  if (record && !cleanup_record (h, record, &err)) {
    /* Keep the lock only while this handle's own run is still set up. */
    if (h->state == FLEECE_STATE_IDLE)
      release_run (h);
    fleece_error_set_gerror (__func__, err);
    return -1;
  }
  release_run (h);
  return 0;
}

void
fleece_drive_set_progress (struct fleece_handle *h, FleeceDrive *d,
                           uint64_t done, uint64_t total)
{
  if (total)
    d->total = total;
  if (done > d->total)
    done = d->total;
  if (done != d->done && h->progress_fn)
    h->progress_fn (h->progress_opaque, d->key, done, d->total);
  d->done = done;
}

static FleeceDrive *
run_drive (struct fleece_handle *h, const char *key, const char *func)
{
  if (!h->run_plan) {
    fleece_error_set (func, EINVAL, "no backup is set up");
    return NULL;
  }
  for (guint i = 0; i < h->run_plan->drives->len; i++) {
    FleeceDrive *d = h->run_plan->drives->pdata[i];
    if (g_strcmp0 (d->key, key) == 0)
      return d;
  }
  fleece_error_set (func, ENOENT, "drive '%s' is not in the backup",
                    key ? key : "(null)");
  return NULL;
}

FLEECE_API const char *
fleece_get_drive_result (struct fleece_handle *h, const char *key)
{
  FleeceDrive *d = run_drive (h, key, __func__);

  if (d && !d->result)
    fleece_error_set (__func__, EAGAIN, "the backup of %s has not ended", key);
  return d ? d->result : NULL;
}

FLEECE_API int64_t
fleece_get_drive_elapsed_ms (struct fleece_handle *h, const char *key)
{
  FleeceDrive *d = run_drive (h, key, __func__);
  gint64 end;

  if (!d)
    return -1;
  if (!d->started_us)
    return 0;
  end = d->ended_us ? d->ended_us : g_get_real_time ();
  return (end - d->started_us) / 1000;
}

bool
fleece_free_recorded_images (struct fleece_handle *h, json_object *record,
                             GError **err)
{
  json_object *drives;
  g_autoptr (GString) failed = g_string_new (NULL);

  if (!json_object_object_get_ex (record, "drives", &drives))
    return true;
  for (size_t i = 0; i < json_object_array_length (drives); i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    const char *volid = fleece_jstr (d, "volid");
    g_autoptr (GError) ferr = NULL;

    if (!fleece_jbool (d, "fleeced"))
      continue;
    /* A crash between allocation and recording the volid: the directory
     * storage's volid is the planned name; a caller's storage needs it. */
    if (!volid) {
      json_object *s;
      if (json_object_object_get_ex (record, "storage", &s) &&
          g_strcmp0 (fleece_jstr (s, "type"), "dir") == 0)
        volid = fleece_jstr (d, "image");
    }
    if (!volid)
      continue;
    if (!h->storage) {
      g_string_append_printf (failed, "%s%s", failed->len ? ", " : "", volid);
      continue;
    }
    if (!fleece_storage_free_image (h->storage, volid, &ferr)) {
      fleece_log (h, FLEECE_LOG_WARNING, "%s", ferr->message);
      g_string_append_printf (failed, "%s%s", failed->len ? ", " : "", volid);
      continue;
    }
    fleece_jset_str (d, "volid", NULL);
  }
  if (failed->len) {
    g_set_error (err, FLEECE_ERROR, EIO,
                 "could not free fleecing images of VM %u: %s%s", h->vmid,
                 failed->str,
                 h->storage ? "" : " (no storage: set it with fleece_set_storage())");
    return false;
  }
  return true;
}

json_object *
fleece_run_record_new (struct fleece_handle *h, struct fleece_plan *p,
                       const char *engine)
{
  json_object *r = json_object_new_object ();
  json_object *drives = json_object_new_array ();
  uuid_t u;
  char run[37];

  uuid_generate (u);
  uuid_unparse_lower (u, run);
  json_object_object_add (r, "version", json_object_new_int (1));
  json_object_object_add (r, "vmid", json_object_new_int64 (h->vmid));
  fleece_jset_str (r, "engine", engine);
  fleece_jset_str (r, "run", run);
  fleece_jset_str (r, "qmp", h->qmp_path);
  fleece_jset_str (r, "state", "attaching");
  json_object_object_add (r, "created",
                          json_object_new_int64 (g_get_real_time () / G_USEC_PER_SEC));
  if (h->storage)
    json_object_object_add (r, "storage", fleece_storage_describe (h->storage));
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    json_object *j = json_object_new_object ();

    fleece_jset_str (j, "key", d->key);
    json_object_object_add (j, "size", json_object_new_int64 ((int64_t) d->size));
    json_object_object_add (j, "fleeced", json_object_new_boolean (d->fleeced));
    fleece_jset_str (j, "image", d->image);
    fleece_jset_str (j, "format", d->format);
    fleece_jset_str (j, "volid", NULL);
    json_object_array_add (drives, j);
  }
  json_object_object_add (r, "drives", drives);
  return r;
}

bool
fleece_run_record_save (struct fleece_handle *h, GError **err)
{
  FleeceRecordStore rs = fleece_handle_record_store (h);
  return fleece_record_store (&rs, h->vmid, h->record, err);
}

void
fleece_run_record_set_state (struct fleece_handle *h, const char *state)
{
  fleece_jset_str (h->record, "state", state);
}

json_object *
fleece_run_record_drive (struct fleece_handle *h, const char *key)
{
  json_object *drives;

  if (!json_object_object_get_ex (h->record, "drives", &drives))
    return NULL;
  for (size_t i = 0; i < json_object_array_length (drives); i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    if (g_strcmp0 (fleece_jstr (d, "key"), key) == 0)
      return d;
  }
  return NULL;
}

void
fleece_run_rollback (struct fleece_handle *h, const FleeceEngineOps *ops)
{
  g_autoptr (GError) uerr = NULL;
  FleeceRecordStore rs = fleece_handle_record_store (h);

  if (!ops->cleanup (h, h->record, &uerr)) {
    fleece_log (h, FLEECE_LOG_ERROR,
                "undoing the failed step failed too: %s; fleece_cleanup() "
                "will retry from the record", uerr->message);
    fleece_run_record_save (h, NULL);
    return;
  }
  if (!fleece_record_remove (&rs, h->vmid, &uerr))
    fleece_log (h, FLEECE_LOG_WARNING, "%s", uerr->message);
}

bool
fleece_run_attach (struct fleece_handle *h, struct fleece_plan *p,
                   json_object *record,
                   bool (*attach_images) (struct fleece_handle *h,
                                          struct fleece_plan *p, GError **err),
                   const FleeceEngineOps *ops, GError **err)
{
  if (h->record)
    json_object_put (h->record);
  h->record = record;
  if (!fleece_run_record_save (h, err))
    return false;
  if (!attach_images (h, p, err)) {
    fleece_run_rollback (h, ops);
    return false;
  }
  fleece_run_record_set_state (h, "attached");
  if (!fleece_run_record_save (h, err)) {
    fleece_run_rollback (h, ops);
    return false;
  }
  return true;
}

void
fleece_run_mark_running (struct fleece_handle *h, struct fleece_plan *p)
{
  g_autoptr (GError) err = NULL;

  fleece_run_record_set_state (h, "running");
  if (!fleece_run_record_save (h, &err))
    fleece_log (h, FLEECE_LOG_WARNING, "cannot update the record: %s", err->message);
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    d->started_us = g_get_real_time ();
    d->total = d->size;
  }
}
