/* What the caller can read of a run: progress, figures, per-drive results,
 * the record, and the read-only status of a VM (record, lock, QEMU). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "handle.h"

static char *
json_text (json_object *o)
{
  return strdup (json_object_to_json_string_ext (o, JSON_C_TO_STRING_PRETTY |
                                                    JSON_C_TO_STRING_NOSLASHESCAPE));
}

/* ---- progress and figures --------------------------------------------- */

static FleeceDrive *
run_drive (struct fleece_handle *h, const char *key, const char *func)
{
  FleeceDrive *d;

  if (!fleece_call_check (h, CALL_RUN_INFO, func))
    return NULL;
  if (!key || !(d = fleece_plan_drive_by_key (h->run.plan, key))) {
    fleece_error_set (func, ENOENT, "drive '%s' is not in the backup",
                      key ? key : "(null)");
    return NULL;
  }
  return d;
}

static uint64_t
drive_total (const FleeceDrive *d)
{
  return d->total ? d->total : d->size;
}

static uint64_t
elapsed_ms (const FleeceDrive *d)
{
  gint64 end;

  if (!d->started_us)
    return 0;
  end = d->ended_us ? d->ended_us : g_get_monotonic_time ();
  return (uint64_t) (end - d->started_us) / 1000;
}

/* stat of one drive; false if the engine does not know it. */
static bool
drive_stat (const FleeceRun *run, const FleeceDrive *d, int stat,
            uint64_t *value)
{
  switch (stat) {
  case FLEECE_STAT_DONE:       *value = d->done; return true;
  case FLEECE_STAT_TOTAL:      *value = drive_total (d); return true;
  case FLEECE_STAT_DIRTY:      *value = d->dirty;
                               return run->ctx->set->bitmap &&
                                      run->ctx->set->bitmap_mode == FLEECE_BITMAP_USE;
  case FLEECE_STAT_FINISHING:  *value = run->finishing; return true;
  case FLEECE_STAT_ELAPSED_MS: *value = elapsed_ms (d); return true;
  default:                     return false;
  }
}

/* stat of the whole backup: the engine's own totals, else the drives'. */
static bool
run_stat (const FleeceRun *run, int stat, uint64_t *value)
{
  GPtrArray *drives = run->plan->drives;
  uint64_t v;

  if (run->totals_known && (stat == FLEECE_STAT_ZERO || stat == FLEECE_STAT_REUSED ||
                            stat == FLEECE_STAT_DIRTY)) {
    *value = stat == FLEECE_STAT_ZERO ? run->zero
      : stat == FLEECE_STAT_REUSED ? run->reused : run->dirty;
    return true;
  }
  *value = 0;
  for (guint i = 0; i < drives->len; i++) {
    if (!drive_stat (run, drives->pdata[i], stat, &v))
      return false;
    /* Elapsed and finishing are the backup's, not sums. */
    *value = stat == FLEECE_STAT_ELAPSED_MS || stat == FLEECE_STAT_FINISHING
             ? MAX (*value, v) : *value + v;
  }
  return true;
}

static int
get_stat (struct fleece_handle *h, const char *key, int stat, uint64_t *value,
          const char *func)
{
  FleeceDrive *d = NULL;
  uint64_t v = 0;
  bool known;

  if (key ? !(d = run_drive (h, key, func)) : !fleece_call_check (h, CALL_RUN_INFO, func))
    return -1;
  if (stat < FLEECE_STAT_DONE || stat > FLEECE_STAT_ELAPSED_MS) {
    fleece_error_set (func, EINVAL, "unknown figure %d", stat);
    return -1;
  }
  known = d ? drive_stat (&h->run, d, stat, &v) : run_stat (&h->run, stat, &v);
  if (!known) {
    fleece_error_set (func, ENOTSUP, "the %s engine does not report figure "
                      "%d%s", h->run.plan->engine, stat, d ? " per drive" : "");
    return -1;
  }
  if (value)
    *value = v;
  return 0;
}

FLEECE_API int
fleece_get_stat (struct fleece_handle *h, const char *key, int stat,
                 uint64_t *value)
{
  return get_stat (h, key, stat, value, __func__);
}

FLEECE_API int
fleece_get_progress (struct fleece_handle *h, uint64_t *done, uint64_t *total)
{
  uint64_t d, t;

  if (get_stat (h, NULL, FLEECE_STAT_DONE, &d, __func__) < 0 ||
      get_stat (h, NULL, FLEECE_STAT_TOTAL, &t, __func__) < 0)
    return -1;
  if (done)
    *done = d;
  if (total)
    *total = t;
  return 0;
}

FLEECE_API int
fleece_get_drive_progress (struct fleece_handle *h, const char *key,
                           uint64_t *done, uint64_t *total)
{
  FleeceDrive *d = run_drive (h, key, __func__);

  if (!d)
    return -1;
  if (done)
    *done = d->done;
  if (total)
    *total = drive_total (d);
  return 0;
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

  return d ? (int64_t) elapsed_ms (d) : -1;
}

/* ---- the record and the status ----------------------------------------- */

FLEECE_API char *
fleece_get_record (struct fleece_handle *h)
{
  g_autoptr (GError) err = NULL;
  g_autoptr (json_object) r = NULL;
  FleeceRecordStore rs;

  if (!fleece_call_check (h, CALL_RECORD, __func__))
    return NULL;
  rs = fleece_handle_record_store (h);
  if (!(r = fleece_record_load (&rs, h->set.vmid, &err))) {
    if (err)
      fleece_error_set_gerror (__func__, err);
    else
      fleece_error_set (__func__, ENOENT, "VM %u has no record", h->set.vmid);
    return NULL;
  }
  return json_text (r);
}

static const char *
lock_state (struct fleece_handle *h)
{
  /* The lock lives in the state dir also when the record is the
   * caller's. */
  if (h->lock_fd >= 0)
    return "ours";
  switch (fleece_lock_probe (h->set.state_dir, h->set.vmid)) {
  case 0:  return "free";
  case 1:  return "held";
  default: return "unknown";
  }
}

/* What QEMU shows: the run markers and the engine's traces (of the
 * record's engine; a handle that is not connected looks at the QEMU the
 * record names, for this call only). */
static json_object *
qemu_status (struct fleece_handle *h, json_object *record)
{
  json_object *q = json_object_new_object ();
  g_autoptr (GError) err = NULL;
  g_autoptr (FleeceConn) own = NULL;
  g_autoptr (GPtrArray) markers = NULL;
  g_autoptr (json_object) found = NULL;
  const FleeceEngineOps *ops = fleece_engine_ops_by_name (fleece_jstr (record, "engine"));
  FleeceCtx c = h->ctx;
  json_object *m;

  if (!fleece_conn_configured (h->conn)) {
    c.conn = own = fleece_conn_new ();
    fleece_conn_set_timeout (own, h->set.qmp_timeout_ms);
    fleece_conn_set_path (own, fleece_jstr (record, "qmp"));
  }
  if (!ops)
    ops = fleece_handle_ops (h);
  if (!(markers = fleece_markers (&c, &err)) ||
      (!(found = ops->find (&c, &err)) && err)) {
    fleece_jset_bool (q, "reachable", false);
    fleece_jset_str (q, "error", err->message);
    return q;
  }
  fleece_jset_bool (q, "reachable", true);
  m = json_object_new_array ();
  for (guint i = 0; i < markers->len; i++) {
    const FleeceMarker *mk = markers->pdata[i];
    json_object *j = json_object_new_object ();

    fleece_jset_str (j, "run", mk->run);
    fleece_jset_int (j, "pid", mk->pid);
    fleece_jset_bool (j, "alive", fleece_marker_alive (mk));
    json_object_array_add (m, j);
  }
  json_object_object_add (q, "runs", m);
  json_object_object_add (q, "traces", found ? json_object_get (fleece_jobj (found, "traces"))
                                             : json_object_new_array ());
  if (found && fleece_jobj (found, "backup"))
    json_object_object_add (q, "backup", json_object_get (fleece_jobj (found, "backup")));
  return q;
}

static bool
live_run_in_qemu (json_object *qemu)
{
  json_object *runs = fleece_jobj (qemu, "runs");

  for (size_t i = 0; runs && i < json_object_array_length (runs); i++)
    if (fleece_jbool (json_object_array_get_idx (runs, i), "alive"))
      return true;
  return false;
}

static const char *
summary (json_object *record, const char *lock, json_object *qemu)
{
  bool in_qemu = fleece_jlen (qemu, "runs") > 0 || fleece_jlen (qemu, "traces") > 0;

  if (!strcmp (lock, "held") || !strcmp (lock, "ours") || live_run_in_qemu (qemu))
    return "active";
  if (record)
    return "crashed";
  return in_qemu ? "leftovers" : "none";
}

FLEECE_API char *
fleece_get_status (struct fleece_handle *h, unsigned flags)
{
  g_autoptr (GError) err = NULL;
  g_autoptr (json_object) o = NULL;
  json_object *record, *qemu = NULL;
  FleeceRecordStore rs;
  const char *lock;

  if (!fleece_call_check (h, CALL_RECORD, __func__))
    return NULL;
  if (flags) {
    fleece_error_set (__func__, EINVAL, "unknown flags: none are defined, pass 0");
    return NULL;
  }
  rs = fleece_handle_record_store (h);
  record = fleece_record_load (&rs, h->set.vmid, &err);
  o = json_object_new_object ();
  fleece_jset_int (o, "vmid", h->set.vmid);
  if (!h->record_load)
    fleece_jset_str (o, "state-dir", h->set.state_dir);
  json_object_object_add (o, "record", record);
  if (err)
    fleece_jset_str (o, "record-error", err->message);
  lock = lock_state (h);
  fleece_jset_str (o, "lock", lock);
  if (fleece_conn_configured (h->conn) || fleece_jstr (record, "qmp")) {
    qemu = qemu_status (h, record);
    fleece_handle_release (h);
  }
  fleece_jset_str (o, "run", summary (record, lock, qemu));
  json_object_object_add (o, "qemu", qemu);
  return json_text (o);
}
