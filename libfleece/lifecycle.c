/* The lifecycle skeleton: fleece_attach(), fleece_start(), fleece_wait(),
 * fleece_cancel() and fleece_cleanup() call the engine's operations
 * (engine.h) in order; what is the same for both engines is here: the
 * lock, the record, the run marker, the images, the waiting.
 *
 * A reader follows one backup top to bottom: fleece_plan() (plan.c), then
 * fleece_attach() -> allocate_images() -> ops->attach, fleece_start() ->
 * ops->start, fleece_wait() -> ops->poll, fleece_cleanup() -> undo_run()
 * -> ops->undo and free_images(). */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uuid/uuid.h>

#include "handle.h"
#include "target.h"

/* Between two looks at a running backup the monitor is free. */
#define POLL_INTERVAL_MS 250

/* ---- the run on a handle -------------------------------------------- */

static bool
take_lock (struct fleece_handle *h, bool create, GError **err)
{
  int fd;

  if (h->lock_fd >= 0)
    return true;
  fd = fleece_lock_vm (h->set.state_dir, h->set.vmid, create, err);
  if (fd == -1)
    return false;
  h->lock_fd = fd;            /* or FLEECE_LOCK_NO_DIR */
  return true;
}

static void
drop_lock (struct fleece_handle *h)
{
  if (h->lock_fd >= 0)
    close (h->lock_fd);
  h->lock_fd = -1;
}

static void
end_run (struct fleece_handle *h)
{
  char buf[64];

  drop_lock (h);
  g_clear_pointer (&h->run.record, json_object_put);
  fleece_plan_free (h->run.plan);
  h->run.plan = NULL;
  g_clear_pointer (&h->run.failure, g_free);
  h->run.cancel_sent = h->run.finishing = false;
  h->state = FLEECE_STATE_IDLE;
  h->cancel_requested = 0;
  while (read (h->cancel_pipe[0], buf, sizeof buf) > 0)
    ;
}

static void
drain_cancel_pipe (struct fleece_handle *h)
{
  char buf[64];

  while (read (h->cancel_pipe[0], buf, sizeof buf) > 0)
    ;
}

static bool
cancelled_error (GError *err)
{
  return g_error_matches (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_CANCELLED);
}

/* ---- the record of a new run ------------------------------------------ */

static json_object *
record_drive_new (const FleeceDrive *d, struct fleece_storage *st,
                  const char *run)
{
  json_object *j = fleece_drive_to_json (d);
  g_autofree char *pending = NULL;

  fleece_jset_str (j, "root", d->root);
  /* Write-ahead: the run-tagged name the image is made under proves it
   * ours until its identity is recorded. */
  if (d->fleeced && st)
    pending = fleece_storage_pending_name (st, d->image, run);
  fleece_jset_str (j, "pending", pending);
  fleece_jset_str (j, "volid", NULL);
  return j;
}

static json_object *
record_new (struct fleece_handle *h, struct fleece_plan *p, const char *run)
{
  json_object *r = json_object_new_object ();
  json_object *drives = json_object_new_array ();

  fleece_jset_int (r, "version", 2);
  fleece_jset_int (r, "vmid", h->set.vmid);
  fleece_jset_str (r, "engine", p->engine);
  fleece_jset_str (r, "run", run);
  fleece_jset_str (r, "qmp", fleece_conn_path (h->conn));
  fleece_jset_str (r, "state", "attaching");
  fleece_jset_int (r, "created", g_get_real_time () / G_USEC_PER_SEC);
  fleece_jset_int (r, "pid", getpid ());
  if (h->storage)
    json_object_object_add (r, "storage", fleece_storage_describe (h->storage));
  fleece_jset_str (r, "bitmap", h->set.bitmap);
  fleece_jset_str (r, "bitmap-mode", !h->set.bitmap ? NULL
                   : h->set.bitmap_mode == FLEECE_BITMAP_NEW ? "new" : "use");
  for (guint i = 0; i < p->drives->len; i++)
    json_object_array_add (drives, record_drive_new (p->drives->pdata[i],
                                                     h->storage, run));
  json_object_object_add (r, "drives", drives);
  return r;
}

static char *
new_run_id (void)
{
  uuid_t u;
  char run[37];

  uuid_generate (u);
  uuid_unparse_lower (u, run);
  return g_strdup (run);
}

/* ---- undoing a run --------------------------------------------------- */

/* Free the run's images, only in the storage they live in and only those
 * provably its own; false (the record must stay) if any may be left. */
static bool
free_images (FleeceCtx *ctx, json_object *record, GError **err)
{
  json_object *drives = fleece_record_drives (record);
  json_object *desc = fleece_jobj (record, "storage");
  bool matches = fleece_storage_matches (ctx->storage, desc), ok = true;

  if (fleece_storage_is_callers (ctx->storage))
    fleece_conn_release (ctx->conn);

  for (size_t i = 0; drives && i < json_object_array_length (drives); i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    g_autoptr (GError) ferr = NULL;
    int r;

    if (!fleece_jbool (d, "fleeced") ||
        (!fleece_jstr (d, "volid") && !fleece_jstr (d, "pending") && !fleece_jobj (d, "identity")))
      continue;
    if (!matches) {
      g_autofree char *where = fleece_storage_desc_name (desc);
      if (ok)
        g_set_error (err, FLEECE_ERROR, EXDEV, "the fleecing images of VM %"
                     G_GINT64_FORMAT " are in %s, not in the storage given now%s; "
                     "set that storage to free them (the record is kept)",
                     fleece_jint (record, "vmid"), where,
                     ctx->storage ? "" : " (none)");
      ok = false;
      continue;
    }
    r = fleece_storage_remove (ctx->storage, d, fleece_jstr (record, "run"), &ferr);
    if (r < 0 && ok)
      g_propagate_error (err, g_steal_pointer (&ferr));
    else if (r > 0)
      fleece_log (ctx, FLEECE_LOG_WARNING, "%s", ferr->message);
    ok = ok && r >= 0;
    if (r >= 0) {
      fleece_jset_str (d, "volid", NULL);
      fleece_jset_str (d, "pending", NULL);
      json_object_object_del (d, "identity");
    }
  }
  return ok;
}

/* Target files of a run that did not succeed are not a backup: remove
 * those the run created (proven by inode), or the next run into the same
 * directory finds them. */
static bool
remove_unfinished_targets (FleeceCtx *ctx, json_object *record, GError **err)
{
  json_object *drives = fleece_record_drives (record);
  bool ok = true;

  if (g_strcmp0 (fleece_jstr (record, "state"), "succeeded") == 0)
    return true;
  for (size_t i = 0; drives && i < json_object_array_length (drives); i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    g_autoptr (GError) terr = NULL;
    int r = fleece_target_remove_file (d, fleece_jstr (record, "run"), &terr);

    if (r < 0 && ok)
      g_propagate_error (err, g_steal_pointer (&terr));
    else if (r > 0)
      fleece_log (ctx, FLEECE_LOG_WARNING, "the target file of %s is not the "
                  "one the run created: left in place", fleece_jstr (d, "key"));
    else if (r == 0 && fleece_jobj (d, "target-file") &&
             fleece_jobj (fleece_jobj (d, "target-file"), "identity"))
      fleece_log (ctx, FLEECE_LOG_INFO, "removed the unfinished backup of %s",
                  fleece_jstr (d, "key"));
    ok = ok && r >= 0;
    if (r >= 0)
      json_object_object_del (d, "target-file");
  }
  return ok;
}

/* The QEMU part of undoing record: only while QEMU holds no other run's
 * marker (a run of another state dir may have started since, with the
 * same node names); the run's own marker goes in any case. */
static bool
undo_in_qemu (FleeceCtx *ctx, json_object *record, GError **err)
{
  const char *run = fleece_jstr (record, "run");
  const FleeceEngineOps *ops = fleece_engine_ops_by_name (fleece_jstr (record, "engine"));
  g_autoptr (GPtrArray) markers = fleece_markers (ctx, err);
  const FleeceMarker *ours, *other = NULL;

  if (!markers)
    return false;
  ours = fleece_marker_find (markers, run);
  for (guint i = 0; i < markers->len; i++)
    if (markers->pdata[i] != ours)
      other = markers->pdata[i];
  if (other)
    fleece_log (ctx, FLEECE_LOG_WARNING, "QEMU holds another run (%s, process "
                "%ld) now: leaving its graph alone; the run %s has nothing left "
                "there", other->run, other->pid, run);
  else if (!ops) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "the record names an unknown "
                 "engine '%s'", fleece_jstr (record, "engine"));
    return false;
  } else if (!ops->undo (ctx, record, false, err))
    return false;
  else
    fleece_del_storage_objects (ctx, record);
  return !ours || fleece_marker_del (ctx, ours, err);
}

/* Can QEMU be reached?  A QEMU that is gone has nothing to undo; one that
 * does not answer still holds our nodes and writes to our images. */
static bool
qemu_reachable (FleeceCtx *ctx, bool *gone, GError **err)
{
  g_autoptr (GError) cerr = NULL;

  *gone = false;
  /* A QEMU that is dying may accept and then drop the connection. */
  for (int i = 0; i < 10; i++) {
    if (fleece_conn_get (ctx->conn, &cerr))
      return true;
    if (g_error_matches (cerr, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_NO_PEER)) {
      *gone = true;
      fleece_log (ctx, FLEECE_LOG_WARNING, "QEMU is gone (%s): nothing to undo "
                  "there", cerr->message);
      return true;
    }
    if (g_error_matches (cerr, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_BUSY) ||
        g_error_matches (cerr, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_TIMEOUT))
      break;
    g_clear_error (&cerr);
    g_usleep (200 * 1000);
  }
  g_propagate_prefixed_error (err, g_steal_pointer (&cerr), "cannot undo the run "
                              "in QEMU: it is there but cannot be used: ");
  return false;
}

/* Undo everything record describes and retire it, or keep it (false) when
 * something may be left.  A handle that is not connected reaches the QEMU
 * the record names, for this call only. */
static bool
undo_run (FleeceCtx *ctx, const FleeceRecordStore *rs, json_object *record,
          GError **err)
{
  g_autoptr (FleeceConn) own = NULL;
  FleeceCtx c = *ctx;
  bool gone = false;

  if (!fleece_conn_configured (ctx->conn) && fleece_jstr (record, "qmp")) {
    c.conn = own = fleece_conn_new ();
    fleece_conn_set_timeout (own, ctx->set->qmp_timeout_ms);
    fleece_conn_set_path (own, fleece_jstr (record, "qmp"));
  }
  /* A run over the caller's connection names no socket: without one,
   * QEMU may still hold the images, so they stay. */
  if (!fleece_conn_configured (c.conn)) {
    g_set_error (err, FLEECE_ERROR, ENOTCONN, "the run of VM %" G_GINT64_FORMAT
                 " used the caller's QMP connection (its record names no "
                 "socket): connect the handle to the VM's QEMU "
                 "(fleece_connect_fd()) to clean it up", fleece_jint (record, "vmid"));
    return false;
  }
  if (!qemu_reachable (&c, &gone, err) || (!gone && !undo_in_qemu (&c, record, err)))
    return false;
  if (!free_images (&c, record, err) || !remove_unfinished_targets (&c, record, err)) {
    g_autoptr (GError) serr = NULL;
    if (!fleece_record_store (rs, (uint32_t) fleece_jint (record, "vmid"), record, &serr))
      fleece_log (&c, FLEECE_LOG_WARNING, "%s", serr->message);
    return false;
  }
  return fleece_record_remove (rs, (uint32_t) fleece_jint (record, "vmid"), err);
}

/* A failed attach or start: undo what the run made, keeping the record for
 * fleece_cleanup() if that fails too (the step's own error is the
 * caller's). */
static void
roll_back (struct fleece_handle *h)
{
  g_autoptr (GError) uerr = NULL;

  fleece_handle_arm_cancel (h, false);
  if (!undo_run (&h->ctx, &h->run.rs, h->run.record, &uerr))
    fleece_log (&h->ctx, FLEECE_LOG_ERROR, "undoing the failed step failed "
                "too: %s; fleece_cleanup() will retry from the record",
                uerr->message);
}

/* ---- attach ------------------------------------------------------------ */

/* The record of a run that died: undo it if its images are in our storage
 * (a record is retired only once its images are freed where they live). */
static bool
retire_old_record (struct fleece_handle *h, GError **err)
{
  FleeceRecordStore rs = fleece_handle_record_store (h);
  g_autoptr (json_object) old = fleece_record_load (&rs, h->set.vmid, err);
  g_autoptr (GError) uerr = NULL;

  if (!old)
    return *err == NULL;
  fleece_log (&h->ctx, FLEECE_LOG_WARNING, "VM %u has the record of an earlier "
              "run (%s); cleaning it up first", h->set.vmid, fleece_jstr (old, "run"));
  if (undo_run (&h->ctx, &rs, old, &uerr))
    return true;
  g_propagate_prefixed_error (err, g_steal_pointer (&uerr), "an earlier run of "
                              "VM %u could not be cleaned up: ", h->set.vmid);
  return false;
}

static bool
refuse_other_runs (struct fleece_handle *h, const char *run, GError **err)
{
  g_autoptr (GPtrArray) markers = fleece_markers (&h->ctx, err);
  g_autoptr (json_object) found = NULL;

  if (!markers)
    return false;
  for (guint i = 0; i < markers->len; i++) {
    const FleeceMarker *m = markers->pdata[i];
    g_autofree char *who = NULL;

    if (g_strcmp0 (m->run, run) == 0)
      continue;
    who = fleece_marker_alive (m) ? g_strdup_printf ("process %ld runs it", m->pid)
                                  : g_strdup ("its process is gone (crashed)");
    g_set_error (err, FLEECE_ERROR, EBUSY, "VM %u has another libfleece run "
                 "(%s) set up in QEMU: %s; see fleece_get_status() (fleece "
                 "status), then fleece_cleanup() (fleece cleanup)", h->set.vmid,
                 m->run, who);
    return false;
  }
  if (run)
    return true;
  if (!(found = fleece_handle_ops (h)->find (&h->ctx, err)))
    return *err == NULL;
  g_set_error (err, FLEECE_ERROR, EBUSY, "VM %u has fleecing nodes or jobs in "
               "QEMU (%s) of a run that is active or crashed; see "
               "fleece_get_status() (fleece status), then fleece_cleanup() "
               "(fleece cleanup)", h->set.vmid,
               json_object_to_json_string (fleece_jobj (found, "traces")));
  return false;
}

/* Phase 1 of allocate_images(): every image under its pending name, its
 * identity in the record (a caller's storage: under its real name, each
 * recorded at once, since nothing else proves it ours). */
static bool
alloc_pending (FleeceRun *run, FleeceImage *imgs, GError **err)
{
  FleeceCtx *ctx = run->ctx;
  bool unformatted_ok = fleece_engine_ops_by_name (run->plan->engine)->formats_images (ctx);
  const char *id = fleece_jstr (run->record, "run");

  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    json_object *e = fleece_run_drive (run, d->key);

    if (!d->fleeced)
      continue;
    if (!fleece_storage_alloc (ctx->storage, d->image, d->format, d->size, id,
                               unformatted_ok, &imgs[i], err))
      return false;
    json_object_object_add (e, "identity", json_object_get (imgs[i].identity));
    fleece_jset_bool (e, "unformatted", imgs[i].unformatted);
    if (imgs[i].volid) {
      fleece_jset_str (e, "volid", imgs[i].volid);
      if (!fleece_run_save (run, err))
        return false;
    }
  }
  return true;
}

/* Allocate every fleecing image in three steps, each recorded before the
 * next (see FleeceImage): a crash at any point leaves a record that
 * proves which images are the run's, and two record writes serve all
 * images of a storage with pending names. */
static bool
allocate_images (FleeceRun *run, GError **err)
{
  GPtrArray *drives = run->plan->drives;
  FleeceImage *imgs = g_new0 (FleeceImage, drives->len + 1);
  bool ok;

  /* The caller's storage callbacks run with the monitor free. */
  if (fleece_storage_is_callers (run->ctx->storage))
    fleece_conn_release (run->ctx->conn);
  ok = alloc_pending (run, imgs, err) && fleece_run_save (run, err);

  for (guint i = 0; ok && i < drives->len; i++) {
    FleeceDrive *d = drives->pdata[i];

    if (!d->fleeced)
      continue;
    ok = fleece_storage_publish (run->ctx->storage, d->image, &imgs[i], err);
    if (ok) {
      d->volid = g_strdup (imgs[i].volid);
      fleece_jset_str (fleece_run_drive (run, d->key), "volid", d->volid);
    }
  }
  ok = ok && fleece_run_save (run, err);
  for (guint i = 0; ok && i < drives->len; i++) {
    FleeceDrive *d = drives->pdata[i];

    if (!d->fleeced)
      continue;
    fleece_storage_commit (run->ctx->storage, &imgs[i]);
    fleece_jset_str (fleece_run_drive (run, d->key), "pending", NULL);
  }
  for (guint i = 0; i < drives->len; i++)
    fleece_image_clear (&imgs[i]);
  g_free (imgs);
  return ok;
}

static bool
check_attach_args (struct fleece_handle *h, struct fleece_plan *p,
                   unsigned flags, const char *func)
{
  const char *why = NULL;
  int e = EINVAL;

  if (flags)
    why = "unknown flags: none are defined, pass 0";
  else if (!p)
    why = "plan is NULL";
  else if (p->vmid != h->set.vmid)
    why = "the plan is for another VM than the handle's; plan again";
  else if (g_strcmp0 (p->engine, fleece_handle_ops (h)->name) != 0)
    why = "the plan was made for another engine; plan again";
  else if (p->refs > 1)
    e = EBUSY, why = "the plan is in use by another run; plan again";
  if (why)
    fleece_error_set (func, e, "%s", why);
  return why == NULL;
}

/* A plan serves one run at a time and may serve another after cleanup:
 * that one starts with no progress and no results. */
static void
forget_last_run (struct fleece_plan *p)
{
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];

    g_clear_pointer (&d->volid, g_free);
    g_clear_pointer (&d->result, g_free);
    d->pending = false;
    d->done = d->total = d->zero = d->reused = d->dirty = 0;
    d->started_us = d->ended_us = 0;
  }
}

static bool
set_up_run (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  g_autofree char *id = new_run_id ();
  const FleeceEngineOps *ops = fleece_handle_ops (h);

  h->run.ctx = &h->ctx;
  h->run.rs = fleece_handle_record_store (h);
  h->run.vmid = h->set.vmid;
  h->run.plan = fleece_plan_ref (p);
  h->run.record = record_new (h, p, id);
  ops->record_init (&h->run);
  if (!fleece_run_save (&h->run, err))
    return false;
  if (!fleece_marker_add (&h->ctx, id, err) || !refuse_other_runs (h, id, err) ||
      !allocate_images (&h->run, err) || !ops->attach (&h->run, err)) {
    roll_back (h);
    return false;
  }
  fleece_run_set_state (&h->run, "attached");
  if (!fleece_run_save (&h->run, err)) {
    roll_back (h);
    return false;
  }
  return true;
}

FLEECE_API int
fleece_attach (struct fleece_handle *h, struct fleece_plan *p, unsigned flags)
{
  g_autoptr (GError) err = NULL;

  if (!fleece_call_check (h, CALL_ATTACH, __func__) ||
      !check_attach_args (h, p, flags, __func__))
    return -1;
  forget_last_run (p);
  fleece_handle_arm_cancel (h, true);
  h->state = FLEECE_STATE_ATTACHED;     /* cancellable from here on */
  if (!take_lock (h, true, &err) || !retire_old_record (h, &err) ||
      !refuse_other_runs (h, NULL, &err) || !set_up_run (h, p, &err)) {
    fleece_handle_release (h);
    fleece_handle_arm_cancel (h, false);
    end_run (h);
    fleece_error_set (__func__, cancelled_error (err) ? ECANCELED : fleece_error_errno (err),
                      "%s", err->message);
    return -1;
  }
  fleece_handle_release (h);
  fleece_handle_arm_cancel (h, false);
  return 0;
}

/* ---- start --------------------------------------------------------------- */

FLEECE_API int
fleece_start (struct fleece_handle *h, struct fleece_plan *p,
              struct fleece_target *t, unsigned flags)
{
  g_autoptr (GError) err = NULL;
  bool ok;

  if (!fleece_call_check (h, CALL_START, __func__))
    return -1;
  if (flags || !p || !t || p != h->run.plan) {
    fleece_error_set (__func__, EINVAL, "%s", flags ? "unknown flags: none are "
                      "defined, pass 0" : !p ? "plan is NULL" : !t ? "target is NULL"
                      : "the plan is not the one attached");
    return -1;
  }
  if (h->cancel_requested) {
    fleece_error_set (__func__, ECANCELED, "the run was cancelled before it "
                      "started; call fleece_cleanup()");
    return -1;
  }
  fleece_handle_arm_cancel (h, true);
  ok = fleece_handle_ops (h)->start (&h->run, t, &err);
  fleece_handle_release (h);
  fleece_handle_arm_cancel (h, false);
  if (!ok) {
    fleece_error_set (__func__, cancelled_error (err) ? ECANCELED : fleece_error_errno (err),
                      "%s", err->message);
    return -1;
  }
  h->state = FLEECE_STATE_RUNNING;
  return 0;
}

/* ---- wait and cancel ----------------------------------------------------- */

/* The cancel cannot reach QEMU now (another client holds its monitor):
 * the wait gives up, and fleece_cleanup() stops the jobs later. */
static void
cancel_blocked (struct fleece_handle *h, GError **err)
{
  g_set_error (err, FLEECE_ERROR, ECANCELED, "the backup of VM %u was "
               "cancelled while another client held QEMU's monitor: its jobs "
               "may run until fleece_cleanup()", h->set.vmid);
}

/* false (err set) if the cancel cannot be sent because the monitor is
 * busy. */
static bool
send_cancel (struct fleece_handle *h, GError **err)
{
  g_autoptr (GError) cerr = NULL;
  bool ok = true;

  drain_cancel_pipe (h);
  if (!h->cancel_requested || h->run.cancel_sent)
    return true;
  fleece_handle_arm_cancel (h, false);
  if (fleece_handle_ops (h)->cancel (&h->run, &cerr))
    h->run.cancel_sent = true;
  else if (g_error_matches (cerr, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_BUSY)) {
    cancel_blocked (h, err);
    ok = false;
  } else
    /* A failed cancel is not a cancelled backup: whatever ends it next is
     * reported as what it is. */
    fleece_log (&h->ctx, FLEECE_LOG_WARNING, "cancelling the backup of VM %u "
                "failed: %s", h->set.vmid, cerr->message);
  fleece_handle_arm_cancel (h, true);
  return ok;
}

static int
finish_wait (struct fleece_handle *h, int r, GError *err)
{
  fleece_handle_release (h);
  fleece_handle_arm_cancel (h, false);
  if (r > 0) {
    h->state = FLEECE_STATE_FINISHED;
    return 1;
  }
  if (r == 0)
    return 0;
  h->state = FLEECE_STATE_FAILED;
  if (!h->run.failure)
    h->run.failure = g_strdup (err ? err->message : "the backup failed");
  /* The error says what ended the backup: a cancel that was sent is not
   * why a drive failed for a reason of its own. */
  fleece_error_set ("fleece_wait", err ? fleece_error_errno (err)
                    : h->run.cancel_sent ? ECANCELED : EIO, "%s", h->run.failure);
  return -1;
}

/* One look at the backup; a monitor that is busy (another client) or a
 * cancel arriving meanwhile is no news yet.  A connect waits for the
 * greeting no longer than the wait has left. */
static int
poll_once (struct fleece_handle *h, gint64 deadline, gint64 *busy_since,
           GError **err)
{
  g_autoptr (GError) perr = NULL;
  gint64 left = deadline < 0 ? G_MAXINT : (deadline - g_get_monotonic_time ()) / 1000;
  unsigned connects = fleece_conn_connects (h->conn);
  int r;

  fleece_conn_set_greeting_timeout (h->conn, (int) MAX (1, MIN (left, G_MAXINT)));
  r = fleece_handle_ops (h)->poll (&h->run, &perr);
  fleece_conn_set_greeting_timeout (h->conn, 0);
  if (r >= 0 || !(cancelled_error (perr) ||
                  g_error_matches (perr, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_BUSY))) {
    *busy_since = 0;
    if (r < 0 && perr->domain == FLEECE_QMP_ERROR)
      g_propagate_prefixed_error (err, g_steal_pointer (&perr), "lost track of "
                                  "the backup of VM %u: ", h->set.vmid);
    else if (r < 0)
      g_propagate_error (err, g_steal_pointer (&perr));
    return r;
  }
  /* Cancelled while connecting: the monitor is busy, the cancel cannot
   * reach QEMU now. */
  if (cancelled_error (perr) && fleece_conn_connects (h->conn) == connects) {
    cancel_blocked (h, err);
    return -1;
  }
  if (cancelled_error (perr))
    return 0;
  if (!*busy_since)
    *busy_since = g_get_monotonic_time ();
  if (g_get_monotonic_time () - *busy_since > (gint64) h->set.qmp_timeout_ms * 1000) {
    g_propagate_prefixed_error (err, g_steal_pointer (&perr), "lost track of the "
                                "backup of VM %u: ", h->set.vmid);
    return -1;
  }
  return 0;
}

FLEECE_API int
fleece_wait (struct fleece_handle *h, int timeout_ms)
{
  g_autoptr (GError) err = NULL;
  gint64 deadline, busy_since = 0;

  if (!fleece_call_check (h, CALL_WAIT, __func__))
    return -1;
  if (h->state == FLEECE_STATE_FINISHED)
    return 1;
  if (h->state == FLEECE_STATE_FAILED)
    return finish_wait (h, -1, NULL);
  deadline = timeout_ms < 0 ? -1 : g_get_monotonic_time () + (gint64) timeout_ms * 1000;
  fleece_handle_arm_cancel (h, true);
  for (;;) {
    gint64 left;
    int r;

    if (!send_cancel (h, &err))
      return finish_wait (h, -1, err);
    if ((r = poll_once (h, deadline, &busy_since, &err)) != 0)
      return finish_wait (h, r, err);
    left = deadline < 0 ? POLL_INTERVAL_MS
      : (deadline - g_get_monotonic_time ()) / 1000;
    if (left <= 0)
      return finish_wait (h, 0, NULL);
    /* Woken early by fleece_cancel(); the monitor is free meanwhile. */
    fleece_conn_sleep (h->conn, (int) MIN (left, POLL_INTERVAL_MS), NULL);
  }
}

/* Async-signal-safe: an atomic flag and a write() to a pipe; no error
 * text (that would allocate). */
FLEECE_API int
fleece_cancel (struct fleece_handle *h)
{
  if (!h || h->pid != getpid () || h->state == FLEECE_STATE_IDLE) {
    errno = !h ? EINVAL : h->pid != getpid () ? EPERM : EINVAL;
    return -1;
  }
  h->cancel_requested = 1;
  if (write (h->cancel_pipe[1], "c", 1) < 0) {
    /* A full pipe already wakes the waiter. */
  }
  return 0;
}

/* ---- cleanup --------------------------------------------------------------- */

/* Backup access ends as successful when the handle whose run it is cleans
 * up while it is set up and was not cancelled. */
static void
mark_access_outcome (struct fleece_handle *h, json_object *record)
{
  if (h->run.record && h->state == FLEECE_STATE_RUNNING && !h->cancel_requested &&
      g_strcmp0 (fleece_jstr (record, "run"), fleece_jstr (h->run.record, "run")) == 0)
    fleece_jset_bool (record, "access-success", true);
}

/* A run whose process lives (not ours) is never undone from here: it may
 * be a backup of another state dir or record store. */
static bool
refuse_live_runs (struct fleece_handle *h, GPtrArray *markers, GError **err)
{
  for (guint i = 0; i < markers->len; i++) {
    const FleeceMarker *m = markers->pdata[i];

    if (fleece_marker_alive (m) && m->pid != (long) getpid ()) {
      g_set_error (err, FLEECE_ERROR, EBUSY, "VM %u has a libfleece run (%s) "
                   "of process %ld, which is still running (with another state "
                   "directory or record store): stop it, or let it finish, "
                   "then clean up", h->set.vmid, m->run, m->pid);
      return false;
    }
  }
  return true;
}

static void
report_unproven_images (struct fleece_handle *h, json_object *found)
{
  json_object *images = fleece_jobj (found, "images");

  for (size_t i = 0; images && i < json_object_array_length (images); i++)
    fleece_log (&h->ctx, FLEECE_LOG_WARNING, "fleecing image %s was attached: "
                "without the run's record it cannot be proven the run's, so it "
                "is left in place; remove it if it is",
                json_object_get_string (json_object_array_get_idx (images, i)));
}

/* No record (deleted, or another state dir's): undo what QEMU shows of a
 * run whose process is gone; images it cannot prove its own are reported,
 * not removed. */
static bool
undo_from_qemu (struct fleece_handle *h, GError **err)
{
  g_autoptr (json_object) found = NULL;
  g_autoptr (GPtrArray) markers = NULL;
  bool gone = false;

  if (!fleece_conn_configured (h->conn))
    return true;
  if (!qemu_reachable (&h->ctx, &gone, err))
    return false;
  if (gone)
    return true;
  if (!(markers = fleece_markers (&h->ctx, err)) || !refuse_live_runs (h, markers, err))
    return false;
  if (!(found = fleece_handle_ops (h)->find (&h->ctx, err)) && *err)
    return false;
  if (found) {
    fleece_log (&h->ctx, FLEECE_LOG_WARNING, "VM %u has no record, but QEMU "
                "shows a run (%s): undoing it from what QEMU shows", h->set.vmid,
                json_object_to_json_string (fleece_jobj (found, "traces")));
    /* With a marker the backup in QEMU is a libfleece run's (any uuid). */
    if (markers->len)
      fleece_jset_str (found, "state", "running");
    if (!fleece_handle_ops (h)->undo (&h->ctx, found, false, err))
      return false;
    report_unproven_images (h, found);
  }
  for (guint i = 0; i < markers->len; i++)
    if (!fleece_marker_del (&h->ctx, markers->pdata[i], err))
      return false;
  return true;
}

static bool
cleanup (struct fleece_handle *h, GError **err)
{
  FleeceRecordStore rs = fleece_handle_record_store (h);
  g_autoptr (json_object) record = NULL;

  if (!take_lock (h, false, err))
    return false;
  if (!(record = fleece_record_load (&rs, h->set.vmid, err)) && *err)
    return false;
  if (!record)
    return undo_from_qemu (h, err);
  mark_access_outcome (h, record);
  return undo_run (&h->ctx, &rs, record, err);
}

FLEECE_API int
fleece_cleanup (struct fleece_handle *h, unsigned flags)
{
  g_autoptr (GError) err = NULL;
  bool ok;

  if (!fleece_call_check (h, CALL_CLEANUP, __func__))
    return -1;
  if (flags) {
    fleece_error_set (__func__, EINVAL, "unknown flags: none are defined, pass 0");
    return -1;
  }
  fleece_handle_arm_cancel (h, false);
  ok = cleanup (h, &err);
  fleece_handle_release (h);
  /* A failed cleanup keeps the lock only while this handle's own run is
   * still set up (the record says what is left). */
  if (ok || h->state == FLEECE_STATE_IDLE)
    end_run (h);
  if (!ok) {
    fleece_error_set_gerror (__func__, err);
    return -1;
  }
  return 0;
}
