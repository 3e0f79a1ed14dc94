/* pve-double: a stand-in for Proxmox's patched QEMU in libfleece's tests.
 *
 * Proxmox's QEMU (pve-qemu) is not in Debian, so the Proxmox engine is
 * tested against this QMP peer: it listens on a unix socket for the
 * library, talks QMP to a real stock QEMU, forwards every command it does
 * not implement, and implements Proxmox's own commands by building the
 * same graph underneath with stock QMP:
 *
 *   query-proxmox-support   backup-fleecing / backup-access-api (flags)
 *   backup                  the seed's checks and exact error texts, then
 *                           per device cbw (on-cbw-error break-snapshot,
 *                           cbw-timeout 45) over the device's root +
 *                           qom-set + snapshot-access, and blockdev-backup
 *                           (discard-source, x-perf min-cluster-size) to
 *                           raw files <dir of backup-file>/<drive>.raw in
 *                           place of a VMA archive; job ids are the devices
 *   query-backup, backup-cancel
 *   query-qmp-schema        the above added, so probing finds them
 *   query-version, greeting the version given with --version
 *
 * Patched QEMUs before 10.0 find devices and their -fleecing images only
 * as BlockBackends (drive_add); from 10.0 on also as node names.  The
 * double follows the version it reports.  Detaching a -fleecing image
 * (blockdev-del, HMP drive_del) while a backup runs deadlocks the real
 * QEMU; the double refuses it and logs "DEADLOCK".
 *
 * Every command from the library is logged to --log as "> <command>
 * <arguments>", the double's own commands to stock QEMU as "  up <command>
 * <arguments>", so tests can check what was sent and in which order.
 *
 * It answers as the real patched QEMU (pve-qemu-kvm 10.0.2) was seen to:
 * the error texts and classes of the backup's checks ("Device
 * 'drive-scsi0-fleecing' not found", DeviceNotFound; "Size mismatch for
 * 'drive-scsi0-fleecing' - sector count 65536 != 131072"); one job per
 * device, named after it, the jobs running one after another, the last
 * device of devlist first (the others show status "created"); with
 * fleecing: true drive-efidisk* and drive-tpmstate* never fleeced;
 * backup-cancel ending the backup before it answers (query-backup then
 * says status "error", errmsg "backup canceled"); backup-access-setup
 * wanting a <device>-fleecing for every device, EFI disk included.
 *
 * Deviations: a job waiting its turn is a job underneath held at a crawl
 * (it may copy its first chunk); raw files in place of a VMA archive (only
 * format vma is taken, devlist is required); node names pvedouble<N>-* in
 * place of auto-generated ones. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <glib.h>
#include <json-c/json.h>
#include <uuid/uuid.h>

#include "qmp.h"

#define MIN_JOB_CLUSTER (4 * 1024 * 1024)
#define ACCESS_BITMAP_GRANULARITY (4 * 1024 * 1024)
#define BACKGROUND_BITMAP "backup-access-background-bitmap"
#define CBW_TIMEOUT 45

G_DEFINE_AUTOPTR_CLEANUP_FUNC (json_object, json_object_put)

/* QMP error classes the double answers with. */
typedef enum {
  CLASS_GENERIC,
  CLASS_DEVICE_NOT_FOUND,
  CLASS_COMMAND_NOT_FOUND,
} ErrClass;

#define DOUBLE_ERROR (double_error_quark ())
static GQuark double_error_quark (void);
G_DEFINE_QUARK (pve-double-error, double_error)

typedef struct {
  char *device;       /* as in devlist: drive-scsi0 */
  char *bs;           /* the node backed up (the device's root, or the
                       * throttle node's file child) */
  char *root;         /* the device's root node, restored on teardown */
  char *qdev;         /* QOM path of the device, or NULL */
  uint64_t size;
  char *fleecing;     /* the fleecing node, or NULL if not fleeced */
  uint64_t cluster;   /* its cluster size */
  char *cbw, *snap, *tgt, *tf, *path;
  bool cbw_added, repointed, snap_added, tgt_added, job_started;
  bool held;          /* waits its turn ("created"): held at a crawl */
  int64_t speed;      /* the backup's speed, given when its turn comes */
  bool concluded;
  char *status;       /* the job's last status underneath */
  char *job_error;
  uint64_t done;
  /* backup access */
  char *bitmap;         /* the target's bitmap on bs, or NULL */
  char *bitmap_action;  /* PBSBitmapAction */
  bool cbw_uses_bitmap;
  bool background;      /* BACKGROUND_BITMAP added */
} Dev;

typedef struct {
  time_t start_time, end_time;    /* start_time 0: never started */
  char *uuid;
  char *backup_file;
  char *target_id;
  char *error;                    /* first error: errmsg */
  uint64_t total, transferred;
  GPtrArray *devs;                /* Dev*, while a backup is set up */
  char *config;                   /* config-file contents */
  bool access;                    /* backup-access-setup, no jobs */
  gint64 last_poll_us;
} Backup;

static struct {
  FleeceQmp *up;
  int listen_fd;
  int client_fd;
  json_tokener *tok;
  FILE *log;
  int major, minor, micro;
  bool fleecing, access;
  Backup b;
} D = { .listen_fd = -1, .client_fd = -1 };

/* ---- logging ----------------------------------------------------------- */

static void G_GNUC_PRINTF (1, 2)
logf_ (const char *fmt, ...)
{
  va_list ap;

  if (!D.log)
    return;
  va_start (ap, fmt);
  vfprintf (D.log, fmt, ap);
  va_end (ap);
  fputc ('\n', D.log);
  fflush (D.log);
}

static const char *
js (json_object *o)
{
  return o ? json_object_to_json_string_ext (o, JSON_C_TO_STRING_PLAIN |
                                                JSON_C_TO_STRING_NOSLASHESCAPE)
           : "{}";
}

/* ---- JSON helpers ------------------------------------------------------ */

static const char *
jstr (json_object *o, const char *key)
{
  json_object *v;
  if (!o || !json_object_object_get_ex (o, key, &v) || !v ||
      !json_object_is_type (v, json_type_string))
    return NULL;
  return json_object_get_string (v);
}

static bool
jbool (json_object *o, const char *key)
{
  json_object *v;
  return o && json_object_object_get_ex (o, key, &v) && json_object_get_boolean (v);
}

static int64_t
jint (json_object *o, const char *key)
{
  json_object *v;
  if (!o || !json_object_object_get_ex (o, key, &v) || !v)
    return 0;
  return json_object_get_int64 (v);
}

static void
jset_str (json_object *o, const char *key, const char *val)
{
  json_object_object_add (o, key, val ? json_object_new_string (val) : NULL);
}

static json_object *
jparse (const char *text)
{
  json_object *o = json_tokener_parse (text);
  g_assert (o);
  return o;
}

/* ---- stock QEMU ---------------------------------------------------------- */

/* Execute on stock QEMU; its error text becomes ours (generic class). */
static json_object *
up (const char *cmd, json_object *args, GError **err)
{
  g_autoptr (GError) e = NULL;
  json_object *r;

  logf_ ("  up %s %s", cmd, js (args));
  r = fleece_qmp_execute (D.up, cmd, args, &e);
  if (!r) {
    const char *desc = fleece_qmp_last_error_desc (D.up);
    bool cmd_err = g_error_matches (e, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_COMMAND);
    logf_ ("  up %s failed: %s", cmd, e->message);
    g_set_error (err, DOUBLE_ERROR, CLASS_GENERIC, "%s",
                 cmd_err && desc ? desc : e->message);
  }
  return r;
}

static bool
up_do (const char *cmd, json_object *args, GError **err)
{
  json_object *r = up (cmd, args, err);
  if (!r)
    return false;
  json_object_put (r);
  return true;
}

/* Best effort during teardown: failures are logged. */
static void
up_try (const char *cmd, json_object *args)
{
  g_autoptr (GError) e = NULL;
  up_do (cmd, args, &e);
}

static json_object *
node_args (const char *key, const char *node)
{
  json_object *a = json_object_new_object ();
  jset_str (a, key, node);
  return a;
}

/* query-block's qdev -> the QOM path whose "drive" property we set. */
static char *
qom_path (const char *qdev)
{
  if (!qdev || !*qdev)
    return NULL;
  if (qdev[0] != '/')
    return g_strdup_printf ("/machine/peripheral/%s", qdev);
  if (g_str_has_suffix (qdev, "/virtio-backend"))
    return g_strndup (qdev, strlen (qdev) - strlen ("/virtio-backend"));
  return g_strdup (qdev);
}

/* ---- device lookup, as the patched QEMU's get_single_device_info ------ */

typedef struct {
  char *bs, *root, *qdev;
  uint64_t size, cluster;
} Found;

static void
found_clear (Found *f)
{
  g_clear_pointer (&f->bs, g_free);
  g_clear_pointer (&f->root, g_free);
  g_clear_pointer (&f->qdev, g_free);
}

static void
image_info (json_object *holder, uint64_t *size, uint64_t *cluster)
{
  json_object *img;

  if (json_object_object_get_ex (holder, "image", &img)) {
    *size = (uint64_t) jint (img, "virtual-size");
    *cluster = (uint64_t) jint (img, "cluster-size");
  }
}

/* blk_by_name(name), then (patched QEMU >= 10.0) bdrv_find_node(name)
 * with a throttle node's file child. */
static bool
find_device (const char *name, Found *f, GError **err)
{
  g_autoptr (json_object) blocks = up ("query-block", NULL, err);
  g_autoptr (json_object) nodes = NULL;

  if (!blocks)
    return false;
  for (size_t i = 0; i < json_object_array_length (blocks); i++) {
    json_object *b = json_object_array_get_idx (blocks, i), *ins;

    if (g_strcmp0 (jstr (b, "device"), name) != 0 ||
        !json_object_object_get_ex (b, "inserted", &ins))
      continue;
    f->bs = g_strdup (jstr (ins, "node-name"));
    f->root = g_strdup (f->bs);
    f->qdev = qom_path (jstr (b, "qdev"));
    image_info (ins, &f->size, &f->cluster);
    return true;
  }
  if (D.major >= 10) {
    if (!(nodes = up ("query-named-block-nodes", jparse ("{\"flat\": true}"), err)))
      return false;
    for (size_t i = 0; i < json_object_array_length (nodes); i++) {
      json_object *n = json_object_array_get_idx (nodes, i), *children;

      if (g_strcmp0 (jstr (n, "node-name"), name) != 0)
        continue;
      f->root = g_strdup (name);
      f->bs = g_strdup (name);
      image_info (n, &f->size, &f->cluster);
      if (g_strcmp0 (jstr (n, "drv"), "throttle") == 0 &&
          json_object_object_get_ex (n, "children", &children)) {
        for (size_t c = 0; c < json_object_array_length (children); c++) {
          json_object *ch = json_object_array_get_idx (children, c);
          if (g_strcmp0 (jstr (ch, "child"), "file") == 0) {
            g_free (f->bs);
            f->bs = g_strdup (jstr (ch, "node-name"));
          }
        }
      }
      for (size_t j = 0; j < json_object_array_length (blocks); j++) {
        json_object *b = json_object_array_get_idx (blocks, j), *ins;
        if (json_object_object_get_ex (b, "inserted", &ins) &&
            g_strcmp0 (jstr (ins, "node-name"), name) == 0)
          f->qdev = qom_path (jstr (b, "qdev"));
      }
      return true;
    }
  }
  g_set_error (err, DOUBLE_ERROR, CLASS_DEVICE_NOT_FOUND, "Device '%s' not found", name);
  return false;
}

/* EFI disk and TPM state are never fleeced by the backup command. */
static bool
device_uses_fleecing (const char *device)
{
  return strncmp (device, "drive-efidisk", 13) && strncmp (device, "drive-tpmstate", 14);
}

static int64_t
sectors (uint64_t bytes)
{
  return (int64_t) ((bytes + 511) / 512);
}

/* ---- the backup state ----------------------------------------------------- */

static void
dev_free (Dev *v)
{
  g_free (v->device);
  g_free (v->bs);
  g_free (v->root);
  g_free (v->qdev);
  g_free (v->fleecing);
  g_free (v->cbw);
  g_free (v->snap);
  g_free (v->tgt);
  g_free (v->tf);
  g_free (v->path);
  g_free (v->job_error);
  g_free (v->status);
  g_free (v->bitmap);
  g_free (v->bitmap_action);
  g_free (v);
}

/* The device's current root node, to re-point only what we re-pointed
 * (qom-set to the node a device already uses aborts QEMU 10.0.2). */
static char *
current_root (const char *qdev)
{
  g_autoptr (GError) e = NULL;
  g_autoptr (json_object) blocks = up ("query-block", NULL, &e);

  for (size_t i = 0; blocks && i < json_object_array_length (blocks); i++) {
    json_object *b = json_object_array_get_idx (blocks, i), *ins;
    g_autofree char *p = qom_path (jstr (b, "qdev"));
    if (g_strcmp0 (p, qdev) == 0 && json_object_object_get_ex (b, "inserted", &ins))
      return g_strdup (jstr (ins, "node-name"));
  }
  return NULL;
}

/* The patched QEMU's cleanup_snapshot_access() and job end, over QMP:
 * snapshot-access, the device back on its node, cbw, target. */
static void
dev_teardown (Dev *v)
{
  if (v->job_started)
    up_try ("job-dismiss", node_args ("id", v->device));
  v->job_started = false;
  if (v->snap_added)
    up_try ("blockdev-del", node_args ("node-name", v->snap));
  v->snap_added = false;
  if (v->repointed) {
    g_autofree char *cur = current_root (v->qdev);
    if (g_strcmp0 (cur, v->cbw) == 0) {
      json_object *a = json_object_new_object ();
      jset_str (a, "path", v->qdev);
      jset_str (a, "property", "drive");
      jset_str (a, "value", v->root);
      up_try ("qom-set", a);
    }
  }
  v->repointed = false;
  if (v->cbw_added)
    up_try ("blockdev-del", node_args ("node-name", v->cbw));
  v->cbw_added = false;
  if (v->tgt_added)
    up_try ("blockdev-del", node_args ("node-name", v->tgt));
  v->tgt_added = false;
}

static void
backup_reset (void)
{
  g_clear_pointer (&D.b.uuid, g_free);
  g_clear_pointer (&D.b.backup_file, g_free);
  g_clear_pointer (&D.b.target_id, g_free);
  g_clear_pointer (&D.b.error, g_free);
  g_clear_pointer (&D.b.config, g_free);
  D.b.start_time = D.b.end_time = 0;
  D.b.total = D.b.transferred = 0;
  D.b.access = false;
}

static void
backup_set_error (const char *msg)
{
  if (!D.b.error)
    D.b.error = g_strdup (msg);
}

/* In place of closing the VMA archive: a manifest of the raw files. */
static void
write_manifest (void)
{
  g_autoptr (json_object) m = json_object_new_object ();
  json_object *devs = json_object_new_array ();

  jset_str (m, "uuid", D.b.uuid);
  jset_str (m, "status", D.b.error ? "error" : "done");
  jset_str (m, "errmsg", D.b.error);
  jset_str (m, "config", D.b.config);
  for (guint i = 0; i < D.b.devs->len; i++) {
    Dev *v = D.b.devs->pdata[i];
    json_object *d = json_object_new_object ();
    jset_str (d, "device", v->device);
    json_object_object_add (d, "size", json_object_new_int64 ((int64_t) v->size));
    jset_str (d, "file", v->path);
    json_object_object_add (d, "fleeced", json_object_new_boolean (v->fleecing != NULL));
    json_object_array_add (devs, d);
  }
  json_object_object_add (m, "devices", devs);
  if (!g_file_set_contents (D.b.backup_file, js (m), -1, NULL))
    logf_ ("cannot write %s", D.b.backup_file);
}

/* strerror text -> errno, to word job errors like the patched QEMU
 * ("job failed with err -13 - Permission denied"). */
static int
errno_of (const char *text)
{
  for (int e = 1; e < 134; e++)
    if (g_strcmp0 (g_strerror (e), text) == 0)
      return e;
  return 0;
}

static void
backup_finish (void)
{
  for (guint i = 0; i < D.b.devs->len; i++) {
    Dev *v = D.b.devs->pdata[i];
    if (v->job_error && strcmp (v->job_error, "Operation canceled") != 0) {
      g_autofree char *msg = NULL;
      int e = errno_of (v->job_error);
      msg = e ? g_strdup_printf ("job failed with err %d - %s", -e, v->job_error)
              : g_strdup_printf ("job failed - %s", v->job_error);
      backup_set_error (msg);
    }
  }
  for (guint i = 0; i < D.b.devs->len; i++)
    if (((Dev *) D.b.devs->pdata[i])->job_error)
      backup_set_error ("job failed with err -125 - Operation canceled");
  for (guint i = 0; i < D.b.devs->len; i++)
    dev_teardown (D.b.devs->pdata[i]);
  write_manifest ();
  D.b.end_time = time (NULL);
  logf_ ("backup %s ended: %s", D.b.uuid, D.b.error ? D.b.error : "done");
  g_clear_pointer (&D.b.devs, g_ptr_array_unref);
}

/* Job statuses in which a job's own work is over (a grouped transaction
 * then waits for the others). */
static bool
work_over (const char *status)
{
  static const char *const over[] = { "waiting", "pending", "aborting", "concluded",
                                      "null", NULL };
  return status && g_strv_contains (over, status);
}

/* The patched QEMU's sequential transaction: once no job runs, the next
 * one (from the end of devlist) starts. */
static void
release_next_job (void)
{
  for (guint i = 0; i < D.b.devs->len; i++) {
    Dev *v = D.b.devs->pdata[i];
    if (v->job_started && !v->held && !work_over (v->status))
      return;
  }
  for (guint i = D.b.devs->len; i-- > 0;) {
    Dev *v = D.b.devs->pdata[i];
    if (v->held) {
      json_object *a = node_args ("device", v->device);

      v->held = false;
      json_object_object_add (a, "speed", json_object_new_int64 (v->speed));
      up_try ("block-job-set-speed", a);
      return;
    }
  }
}

/* Follow the jobs: progress, and the end once all have concluded. */
static void
backup_tick (bool force)
{
  g_autoptr (GError) e = NULL;
  g_autoptr (json_object) jobs = NULL;
  gint64 now = g_get_monotonic_time ();
  guint concluded = 0;
  uint64_t transferred = 0;

  if (!D.b.devs || D.b.access || (!force && now - D.b.last_poll_us < 100 * 1000))
    return;
  D.b.last_poll_us = now;
  if (!(jobs = fleece_qmp_execute (D.up, "query-jobs", NULL, &e)))
    return;
  for (guint i = 0; i < D.b.devs->len; i++) {
    Dev *v = D.b.devs->pdata[i];
    for (size_t j = 0; j < json_object_array_length (jobs); j++) {
      json_object *job = json_object_array_get_idx (jobs, j);
      if (g_strcmp0 (jstr (job, "id"), v->device) != 0)
        continue;
      v->done = (uint64_t) jint (job, "current-progress");
      g_free (v->status);
      v->status = g_strdup (jstr (job, "status"));
      if (g_strcmp0 (jstr (job, "status"), "concluded") == 0 && !v->concluded) {
        v->concluded = true;
        v->job_error = g_strdup (jstr (job, "error"));
      }
    }
    transferred += v->done;
    concluded += v->concluded;
  }
  D.b.transferred = transferred;
  if (concluded == D.b.devs->len)
    backup_finish ();
  else
    release_next_job ();
}

/* ---- backup --------------------------------------------------------------- */

/* QMP cannot create a job without starting it: a job waiting its turn
 * starts at this speed (QEMU's rate limit takes at least 10 bytes/s) in
 * small chunks, so it copies one chunk and then sleeps until its turn
 * gives it its speed. */
#define HELD_SPEED 64
#define HELD_CHUNK (64 * 1024)

static json_object *
blockdev_backup_action (Dev *v, int64_t speed, int64_t max_workers)
{
  json_object *a = json_object_new_object ();
  json_object *act = json_object_new_object ();
  json_object *perf = json_object_new_object ();

  jset_str (a, "job-id", v->device);
  jset_str (a, "device", v->fleecing ? v->snap : v->bs);
  jset_str (a, "target", v->tgt);
  jset_str (a, "sync", "full");
  json_object_object_add (a, "auto-dismiss", json_object_new_boolean (false));
  v->speed = MAX (speed, 0);
  if (v->held)
    json_object_object_add (a, "speed", json_object_new_int64 (HELD_SPEED));
  else if (speed > 0)
    json_object_object_add (a, "speed", json_object_new_int64 (speed));
  if (v->held && !v->fleecing)
    json_object_object_add (perf, "max-chunk", json_object_new_int64 (HELD_CHUNK));
  if (max_workers > 0)
    json_object_object_add (perf, "max-workers", json_object_new_int64 (max_workers));
  if (v->fleecing) {
    /* RBD objects and the fleecing image's clusters: discard must cover
     * them. */
    json_object_object_add (a, "discard-source", json_object_new_boolean (true));
    json_object_object_add (perf, "min-cluster-size",
                            json_object_new_int64 (MAX ((int64_t) MIN_JOB_CLUSTER,
                                                        (int64_t) v->cluster)));
  }
  json_object_object_add (a, "x-perf", perf);
  jset_str (act, "type", "blockdev-backup");
  json_object_object_add (act, "data", a);
  return act;
}

/* The patched QEMU's setup_snapshot_access(): cbw over the device's node
 * (re-pointing the device to it), snapshot-access over cbw. */
static bool
setup_snapshot_access (Dev *v, GError **err)
{
  json_object *a = json_object_new_object ();

  jset_str (a, "driver", "copy-before-write");
  jset_str (a, "node-name", v->cbw);
  jset_str (a, "file", v->bs);
  jset_str (a, "target", v->fleecing);
  jset_str (a, "on-cbw-error", "break-snapshot");
  json_object_object_add (a, "cbw-timeout", json_object_new_int64 (CBW_TIMEOUT));
  if (v->cbw_uses_bitmap) {
    json_object *b = json_object_new_object ();
    jset_str (b, "node", v->bs);
    jset_str (b, "name", v->bitmap);
    json_object_object_add (a, "bitmap", b);
  }
  if (!up_do ("blockdev-add", a, err)) {
    g_prefix_error (err, "appending cbw node for fleecing failed: ");
    return false;
  }
  v->cbw_added = true;
  if (v->qdev) {
    a = json_object_new_object ();
    jset_str (a, "path", v->qdev);
    jset_str (a, "property", "drive");
    jset_str (a, "value", v->cbw);
    if (!up_do ("qom-set", a, err)) {
      g_prefix_error (err, "appending cbw node for fleecing failed: ");
      return false;
    }
    v->repointed = true;
  }
  a = json_object_new_object ();
  jset_str (a, "driver", "snapshot-access");
  jset_str (a, "node-name", v->snap);
  jset_str (a, "file", v->cbw);
  jset_str (a, "discard", "unmap");
  if (!up_do ("blockdev-add", a, err)) {
    g_prefix_error (err, "setting up snapshot access for fleecing failed: ");
    return false;
  }
  v->snap_added = true;
  return true;
}

/* The patched QEMU does its graph work in one bottom half; over QMP the
 * vCPUs are stopped meanwhile so that all drives share one point in time. */
static bool
pause_vm (bool *was_running, GError **err)
{
  g_autoptr (json_object) st = up ("query-status", NULL, err);

  if (!st)
    return false;
  *was_running = jbool (st, "running");
  return !*was_running || up_do ("stop", NULL, err);
}

static bool
resume_vm (bool was_running, bool ok, GError **err)
{
  g_autoptr (GError) cerr = NULL;

  if (!was_running)
    return ok;
  if (!up_do ("cont", NULL, &cerr) && ok) {
    g_propagate_error (err, g_steal_pointer (&cerr));
    return false;
  }
  return ok;
}

/* create_backup_jobs_bh(): targets, snapshot access, and the jobs. */
static bool
setup_jobs (GPtrArray *devs, int64_t speed, int64_t max_workers, GError **err)
{
  json_object *targs, *actions, *props;
  bool running, ok = false;

  if (!pause_vm (&running, err))
    return false;
  for (guint i = 0; i < devs->len; i++) {
    Dev *v = devs->pdata[i];
    json_object *a = json_object_new_object (), *file = json_object_new_object ();

    jset_str (file, "driver", "file");
    jset_str (file, "filename", v->path);
    jset_str (file, "node-name", v->tf);
    jset_str (a, "driver", "raw");
    jset_str (a, "node-name", v->tgt);
    json_object_object_add (a, "file", file);
    if (!up_do ("blockdev-add", a, err))
      goto out;
    v->tgt_added = true;
    if (v->fleecing && !setup_snapshot_access (v, err))
      goto out;
  }

  /* One after another, the last device first (job_txn_new_seq adds each
   * job at the head): all but that one wait their turn. */
  for (guint i = 0; i + 1 < devs->len; i++)
    ((Dev *) devs->pdata[i])->held = true;
  targs = json_object_new_object ();
  actions = json_object_new_array ();
  props = json_object_new_object ();
  for (guint i = 0; i < devs->len; i++)
    json_object_array_add (actions, blockdev_backup_action (devs->pdata[i], speed,
                                                            max_workers));
  jset_str (props, "completion-mode", "grouped");
  json_object_object_add (targs, "actions", actions);
  json_object_object_add (targs, "properties", props);
  if (!up_do ("transaction", targs, err)) {
    g_prefix_error (err, "backup_job_create failed: ");
    goto out;
  }
  for (guint i = 0; i < devs->len; i++)
    ((Dev *) devs->pdata[i])->job_started = true;
  ok = true;
 out:
  return resume_vm (running, ok, err);
}

/* The seed's get_single_device_info(): the device, and its -fleecing image
 * with the same sector count. */
static Dev *
get_single_device_info (const char *name, bool fleecing, GError **err)
{
  Found f = { 0 };
  Dev *v;

  if (!find_device (name, &f, err))
    return NULL;
  v = g_new0 (Dev, 1);
  v->device = g_strdup (name);
  v->bs = g_steal_pointer (&f.bs);
  v->root = g_steal_pointer (&f.root);
  v->qdev = g_steal_pointer (&f.qdev);
  v->size = f.size;
  found_clear (&f);
  if (fleecing) {
    g_autofree char *fid = g_strconcat (name, "-fleecing", NULL);

    if (!find_device (fid, &f, NULL)) {
      g_set_error (err, DOUBLE_ERROR, CLASS_DEVICE_NOT_FOUND, "Device '%s' not found", fid);
      dev_free (v);
      return NULL;
    }
    /* Fleecing image needs to be the same size to act as a cbw target. */
    if (sectors (f.size) != sectors (v->size)) {
      g_set_error (err, DOUBLE_ERROR, CLASS_GENERIC,
                   "Size mismatch for '%s' - sector count %" PRId64 " != %" PRId64,
                   fid, sectors (f.size), sectors (v->size));
      found_clear (&f);
      dev_free (v);
      return NULL;
    }
    v->fleecing = g_steal_pointer (&f.bs);
    v->cluster = f.cluster;
    found_clear (&f);
  }
  return v;
}

static char *
target_path (const char *dir, const char *device)
{
  g_autofree char *name = g_strdup_printf (
    "%s.raw", g_str_has_prefix (device, "drive-") ? device + 6 : device);
  return g_build_filename (dir, name, NULL);
}

static bool
read_config (json_object *args, const char *key, char **out, GError **err)
{
  const char *file = jstr (args, key);

  if (!file)
    return true;
  if (!g_file_get_contents (file, out, NULL, NULL)) {
    g_set_error (err, DOUBLE_ERROR, CLASS_GENERIC, "unable to read file '%s'", file);
    return false;
  }
  return true;
}

static json_object *
handle_backup (json_object *args, GError **err)
{
  const char *backup_file = jstr (args, "backup-file");
  const char *format = jstr (args, "format");
  const char *devlist = jstr (args, "devlist");
  bool fleecing = jbool (args, "fleecing");
  g_autoptr (GPtrArray) devs = g_ptr_array_new_with_free_func ((GDestroyNotify) dev_free);
  g_auto (GStrv) names = NULL;
  g_autofree char *dir = NULL;
  g_autofree char *config = NULL;
  g_autofree char *firewall = NULL;
  uuid_t u;
  char uuid[37];
  uint64_t total = 0;
  int fd;

  if (D.b.devs) {
    g_set_error (err, DOUBLE_ERROR, CLASS_GENERIC,
                 "previous backup for target '%s' not finished", D.b.target_id);
    return NULL;
  }
  if (!backup_file) {
    g_set_error (err, DOUBLE_ERROR, CLASS_GENERIC, "Parameter 'backup-file' is missing");
    return NULL;
  }
  if (format && strcmp (format, "vma") != 0) {
    g_set_error (err, DOUBLE_ERROR, CLASS_GENERIC,
                 "pve-double writes raw files in place of a VMA archive; "
                 "format '%s' is not supported", format);
    return NULL;
  }
  if (!devlist) {
    g_set_error (err, DOUBLE_ERROR, CLASS_GENERIC, "pve-double needs a devlist");
    return NULL;
  }

  /* get_device_info(): every check before anything is created. */
  names = g_strsplit_set (devlist, ",;:", -1);
  for (char **n = names; *n; n++) {
    Dev *v = get_single_device_info (*n, fleecing && device_uses_fleecing (*n), err);

    if (!v)
      return NULL;
    g_ptr_array_add (devs, v);
    total += v->size;
  }
  if (devs->len == 0) {
    g_set_error (err, DOUBLE_ERROR, CLASS_GENERIC, "empty device list");
    return NULL;
  }
  if (!read_config (args, "config-file", &config, err) ||
      !read_config (args, "firewall-file", &firewall, err))
    return NULL;

  /* vma_writer_create(), and one raw file per drive in its place. */
  fd = open (backup_file, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    g_set_error (err, DOUBLE_ERROR, CLASS_GENERIC, "can't open file %s - %s",
                 backup_file, g_strerror (errno));
    return NULL;
  }
  close (fd);
  dir = g_path_get_dirname (backup_file);
  for (guint i = 0; i < devs->len; i++) {
    Dev *v = devs->pdata[i];

    v->path = target_path (dir, v->device);
    v->cbw = g_strdup_printf ("pvedouble%u-cbw", i);
    v->snap = g_strdup_printf ("pvedouble%u-snap", i);
    v->tgt = g_strdup_printf ("pvedouble%u-tgt", i);
    v->tf = g_strdup_printf ("pvedouble%u-tf", i);
    fd = open (v->path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 || ftruncate (fd, (off_t) v->size) < 0) {
      g_set_error (err, DOUBLE_ERROR, CLASS_GENERIC, "register_stream failed: %s: %s",
                   v->path, g_strerror (errno));
      if (fd >= 0)
        close (fd);
      goto fail;
    }
    close (fd);
  }
  if (!setup_jobs (devs, jint (args, "speed"), jint (args, "max-workers"), err))
    goto fail;

  backup_reset ();
  uuid_generate (u);
  uuid_unparse_lower (u, uuid);
  D.b.uuid = g_strdup (uuid);
  D.b.backup_file = g_strdup (backup_file);
  D.b.target_id = g_strdup ("Proxmox");
  D.b.start_time = time (NULL);
  D.b.total = total;
  D.b.config = g_steal_pointer (&config);
  D.b.devs = g_steal_pointer (&devs);
  D.b.last_poll_us = 0;
  logf_ ("backup %s started", uuid);
  {
    json_object *r = json_object_new_object ();
    jset_str (r, "UUID", uuid);
    return r;
  }

 fail:
  for (guint i = 0; i < devs->len; i++) {
    Dev *v = devs->pdata[i];
    dev_teardown (v);
    if (v->path)
      unlink (v->path);
  }
  unlink (backup_file);
  return NULL;
}


/* ---- backup access for external providers (pve-qemu 9.2+) ------------------- */

static bool
bitmap_action_ (const char *node, const char *cmd, const char *name, GError **err)
{
  json_object *a = json_object_new_object ();
  jset_str (a, "node", node);
  jset_str (a, "name", name);
  if (strcmp (cmd, "block-dirty-bitmap-add") == 0)
    json_object_object_add (a, "granularity",
                            json_object_new_int64 (ACCESS_BITMAP_GRANULARITY));
  return up_do (cmd, a, err);
}

static bool
node_has_bitmap (const char *node, const char *name, GError **err)
{
  g_autoptr (json_object) nodes = up ("query-named-block-nodes", jparse ("{\"flat\": true}"), err);

  for (size_t i = 0; nodes && i < json_object_array_length (nodes); i++) {
    json_object *n = json_object_array_get_idx (nodes, i), *bms;
    if (g_strcmp0 (jstr (n, "node-name"), node) != 0 ||
        !json_object_object_get_ex (n, "dirty-bitmaps", &bms))
      continue;
    for (size_t j = 0; j < json_object_array_length (bms); j++)
      if (g_strcmp0 (jstr (json_object_array_get_idx (bms, j), "name"), name) == 0)
        return true;
  }
  return false;
}

/* New writes since the setup are in the background bitmap: after success
 * they become the bitmap (the next incremental); after failure they are
 * added to it. */
static void
access_bitmaps_end (Dev *v, bool success)
{
  if (!v->background)
    return;
  if (v->bitmap) {
    json_object *m = json_object_new_object ();
    json_object *from = json_object_new_array ();

    {
      g_autoptr (GError) e = NULL;
      bitmap_action_ (v->bs, "block-dirty-bitmap-enable", v->bitmap, &e);
    }
    json_object_array_add (from, json_object_new_string (BACKGROUND_BITMAP));
    jset_str (m, "node", v->bs);
    jset_str (m, "target", v->bitmap);
    json_object_object_add (m, "bitmaps", from);
    if (success) {
      json_object *c = json_object_new_object ();
      jset_str (c, "node", v->bs);
      jset_str (c, "name", v->bitmap);
      up_try ("block-dirty-bitmap-clear", c);
    }
    up_try ("block-dirty-bitmap-merge", m);
  }
  {
    g_autoptr (GError) e = NULL;
    bitmap_action_ (v->bs, "block-dirty-bitmap-remove", BACKGROUND_BITMAP, &e);
  }
  v->background = false;
}

static void
access_teardown (bool success)
{
  for (guint i = 0; i < D.b.devs->len; i++) {
    Dev *v = D.b.devs->pdata[i];
    dev_teardown (v);
    access_bitmaps_end (v, success);
  }
  D.b.end_time = time (NULL);
  logf_ ("backup access %s torn down (%s)", D.b.target_id, success ? "success" : "failure");
  g_clear_pointer (&D.b.devs, g_ptr_array_unref);
}

/* The target's bitmap per the requested mode; the bitmap is named after
 * the target.  (The patched QEMU marks a new bitmap all dirty, which QMP
 * cannot: here it starts empty, and cbw gets no bitmap then.) */
static bool
access_bitmap (Dev *v, const char *target_id, const char *mode, GError **err)
{
  bool exists;

  v->bitmap_action = g_strdup ("not-used");
  if (!strcmp (mode, "none") || !strcmp (mode, "new")) {
    exists = node_has_bitmap (v->bs, target_id, NULL);
    if (exists) {
      if (!bitmap_action_ (v->bs, "block-dirty-bitmap-remove", target_id, err))
        return false;
      g_free (v->bitmap_action);
      v->bitmap_action = g_strdup ("not-used-removed");
    }
  }
  if (!strcmp (mode, "new") || !strcmp (mode, "use")) {
    g_free (v->bitmap_action);
    if (node_has_bitmap (v->bs, target_id, NULL)) {
      v->bitmap_action = g_strdup ("used");
      v->cbw_uses_bitmap = true;
    } else {
      if (!bitmap_action_ (v->bs, "block-dirty-bitmap-add", target_id, err))
        return false;
      v->bitmap_action = g_strdup (!strcmp (mode, "use") ? "missing-recreated" : "new");
    }
    v->bitmap = g_strdup (target_id);
  }
  return true;
}

static json_object *
handle_backup_access_setup (json_object *args, GError **err)
{
  const char *target_id = jstr (args, "target-id");
  g_autoptr (GPtrArray) devs = g_ptr_array_new_with_free_func ((GDestroyNotify) dev_free);
  json_object *devices, *ret;
  uint64_t total = 0;
  bool running, ok = true;

  if (D.b.devs) {
    g_set_error (err, DOUBLE_ERROR, CLASS_GENERIC,
                 "previous backup for target '%s' not finished", D.b.target_id);
    return NULL;
  }
  if (!target_id || !json_object_object_get_ex (args, "devices", &devices) ||
      !json_object_is_type (devices, json_type_array)) {
    g_set_error (err, DOUBLE_ERROR, CLASS_GENERIC, "Parameter '%s' is missing",
                 target_id ? "devices" : "target-id");
    return NULL;
  }
  for (size_t i = 0; i < json_object_array_length (devices); i++) {
    json_object *e = json_object_array_get_idx (devices, i);
    const char *mode = jstr (e, "bitmap-mode") ? jstr (e, "bitmap-mode") : "none";
    Dev *v;

    if (strcmp (mode, "none") && strcmp (mode, "new") && strcmp (mode, "use")) {
      g_set_error (err, DOUBLE_ERROR, CLASS_GENERIC,
                   "Parameter 'bitmap-mode' does not accept value '%s'", mode);
      return NULL;
    }
    /* Backup access fleeces every drive, EFI disk and TPM state too. */
    if (!(v = get_single_device_info (jstr (e, "device") ? jstr (e, "device") : "", true, err)))
      return NULL;
    g_ptr_array_add (devs, v);
    v->cbw = g_strdup_printf ("pvedouble%zu-cbw", i);
    v->snap = g_strdup_printf ("pvedouble%zu-snap", i);
    total += v->size;
    if (!access_bitmap (v, target_id, mode, err))
      return NULL;
  }
  if (devs->len == 0) {
    g_set_error (err, DOUBLE_ERROR, CLASS_GENERIC, "empty device list");
    return NULL;
  }

  if (!pause_vm (&running, err))
    return NULL;
  for (guint i = 0; ok && i < devs->len; i++) {
    Dev *v = devs->pdata[i];
    if (v->bitmap) {
      ok = bitmap_action_ (v->bs, "block-dirty-bitmap-add", BACKGROUND_BITMAP, err);
      v->background = ok;
      ok = ok && bitmap_action_ (v->bs, "block-dirty-bitmap-disable", v->bitmap, err);
    }
    if (ok && !setup_snapshot_access (v, err)) {
      g_prefix_error (err, "%s - setting up snapshot access failed: ", v->device);
      ok = false;
    }
  }
  if (!resume_vm (running, ok, err)) {
    for (guint i = 0; i < devs->len; i++) {
      dev_teardown (devs->pdata[i]);
      access_bitmaps_end (devs->pdata[i], false);
    }
    return NULL;
  }

  backup_reset ();
  D.b.uuid = g_strdup ("");
  D.b.target_id = g_strdup (target_id);
  D.b.start_time = time (NULL);
  D.b.total = total;
  D.b.access = true;
  ret = json_object_new_array ();
  for (guint i = 0; i < devs->len; i++) {
    Dev *v = devs->pdata[i];
    json_object *info = json_object_new_object ();

    jset_str (info, "node-name", v->snap);
    jset_str (info, "device", v->device);
    json_object_object_add (info, "size", json_object_new_int64 ((int64_t) v->size));
    if (v->bitmap) {
      jset_str (info, "bitmap-node-name", v->bs);
      jset_str (info, "bitmap-name", v->bitmap);
      jset_str (info, "bitmap-action", v->bitmap_action);
    }
    json_object_array_add (ret, info);
  }
  D.b.devs = g_steal_pointer (&devs);
  logf_ ("backup access %s set up", target_id);
  return ret;
}

static json_object *
handle_backup_access_teardown (json_object *args, GError **err)
{
  const char *target_id = jstr (args, "target-id");

  if (!D.b.target_id || !D.b.devs)
    return json_object_new_object ();         /* nothing to do */
  if (target_id && strcmp (D.b.target_id, target_id) != 0) {
    g_set_error (err, DOUBLE_ERROR, CLASS_GENERIC,
                 "cannot teardown backup access - got target %s instead of %s",
                 target_id, D.b.target_id);
    return NULL;
  }
  if (!D.b.access) {
    g_set_error (err, DOUBLE_ERROR, CLASS_GENERIC,
                 "cannot teardown backup access for PVE - use backup-cancel instead");
    return NULL;
  }
  access_teardown (jbool (args, "success"));
  return json_object_new_object ();
}

static json_object *
handle_query_backup (json_object *args, GError **err)
{
  json_object *r = json_object_new_object ();

  backup_tick (true);
  /* Before any backup the patched QEMU has only this. */
  json_object_object_add (r, "finishing", json_object_new_boolean (false));
  if (!D.b.start_time)
    return r;
  json_object_object_add (r, "start-time", json_object_new_int64 (D.b.start_time));
  if (D.b.backup_file)
    jset_str (r, "backup-file", D.b.backup_file);
  jset_str (r, "uuid", D.b.uuid);
  if (D.b.end_time) {
    jset_str (r, "status", D.b.error ? "error" : "done");
    if (D.b.error)
      jset_str (r, "errmsg", D.b.error);
    json_object_object_add (r, "end-time", json_object_new_int64 (D.b.end_time));
  } else {
    jset_str (r, "status", "active");
  }
  json_object_object_add (r, "total", json_object_new_int64 ((int64_t) D.b.total));
  json_object_object_add (r, "dirty", json_object_new_int64 ((int64_t) D.b.total));
  json_object_object_add (r, "zero-bytes", json_object_new_int64 (0));
  json_object_object_add (r, "transferred", json_object_new_int64 ((int64_t) D.b.transferred));
  json_object_object_add (r, "reused", json_object_new_int64 (0));
  return r;
}

/* The patched QEMU records "backup canceled" as the error even when no
 * backup runs; then it cancels the jobs and waits for them (job_cancel_sync
 * in a bottom half), and the backup ends right after: query-backup then
 * says "error", "backup canceled". */
static json_object *
handle_backup_cancel (json_object *args, GError **err)
{
  gint64 deadline = g_get_monotonic_time () + 60 * G_USEC_PER_SEC;

  if (D.b.start_time)
    backup_set_error ("backup canceled");
  if (!D.b.devs || D.b.access)
    return json_object_new_object ();
  for (guint i = 0; i < D.b.devs->len; i++) {
    Dev *v = D.b.devs->pdata[i];
    if (v->job_started && !v->concluded)
      up_try ("job-cancel", node_args ("id", v->device));
    v->held = false;
  }
  while (D.b.devs && g_get_monotonic_time () < deadline) {
    backup_tick (true);
    if (D.b.devs)
      g_usleep (20 * 1000);
  }
  if (D.b.devs)
    logf_ ("backup %s: the jobs did not end within 60 s of the cancel", D.b.uuid);
  return json_object_new_object ();
}

/* Jobs waiting their turn show status "created" and no progress, as in
 * the patched QEMU's sequential transaction. */
static json_object *
handle_query_jobs (json_object *args, GError **err)
{
  json_object *r = up ("query-jobs", NULL, err);

  for (size_t j = 0; r && D.b.devs && j < json_object_array_length (r); j++) {
    json_object *job = json_object_array_get_idx (r, j);

    for (guint i = 0; i < D.b.devs->len; i++) {
      Dev *v = D.b.devs->pdata[i];
      if (v->held && g_strcmp0 (jstr (job, "id"), v->device) == 0) {
        jset_str (job, "status", "created");
        json_object_object_add (job, "current-progress", json_object_new_int64 (0));
      }
    }
  }
  return r;
}

static json_object *
handle_query_proxmox_support (json_object *args, GError **err)
{
  json_object *r = jparse ("{\"pbs-dirty-bitmap\": true, \"pbs-dirty-bitmap-savevm\": true,"
                           " \"pbs-dirty-bitmap-migration\": true, \"query-bitmap-info\": true,"
                           " \"pbs-masterkey\": true, \"backup-max-workers\": true,"
                           " \"pbs-library-version\": \"1.5.1 (pve-double)\"}");
  /* Older patched QEMUs do not know the members at all. */
  if (D.fleecing)
    json_object_object_add (r, "backup-fleecing", json_object_new_boolean (true));
  if (D.access)
    json_object_object_add (r, "backup-access-api", json_object_new_boolean (true));
  return r;
}

/* Proxmox's commands in the schema, so that probing finds them. */
static json_object *
handle_query_qmp_schema (json_object *args, GError **err)
{
  static const char *const extra =
    "["
    "{\"name\": \"query-proxmox-support\", \"meta-type\": \"command\","
    " \"arg-type\": \"pve-double-empty\", \"ret-type\": \"pve-double-support\"},"
    "{\"name\": \"backup\", \"meta-type\": \"command\","
    " \"arg-type\": \"pve-double-backup-arg\", \"ret-type\": \"pve-double-uuid\"},"
    "{\"name\": \"query-backup\", \"meta-type\": \"command\","
    " \"arg-type\": \"pve-double-empty\", \"ret-type\": \"pve-double-status\"},"
    "{\"name\": \"backup-cancel\", \"meta-type\": \"command\","
    " \"arg-type\": \"pve-double-empty\", \"ret-type\": \"pve-double-empty\"},"
    "{\"name\": \"backup-access-setup\", \"meta-type\": \"command\","
    " \"arg-type\": \"pve-double-access-arg\", \"ret-type\": \"pve-double-empty\"},"
    "{\"name\": \"backup-access-teardown\", \"meta-type\": \"command\","
    " \"arg-type\": \"pve-double-teardown-arg\", \"ret-type\": \"pve-double-empty\"},"
    "{\"name\": \"pve-double-access-arg\", \"meta-type\": \"object\","
    " \"members\": [{\"name\": \"target-id\", \"type\": \"str\"},"
    "  {\"name\": \"devices\", \"type\": \"any\"}]},"
    "{\"name\": \"pve-double-teardown-arg\", \"meta-type\": \"object\","
    " \"members\": [{\"name\": \"target-id\", \"type\": \"str\"},"
    "  {\"name\": \"success\", \"type\": \"bool\"}]},"
    "{\"name\": \"pve-double-empty\", \"meta-type\": \"object\", \"members\": []},"
    "{\"name\": \"pve-double-uuid\", \"meta-type\": \"object\","
    " \"members\": [{\"name\": \"UUID\", \"type\": \"str\"}]},"
    "{\"name\": \"pve-double-support\", \"meta-type\": \"object\","
    " \"members\": [{\"name\": \"backup-fleecing\", \"type\": \"bool\"},"
    "  {\"name\": \"backup-access-api\", \"type\": \"bool\"}]},"
    "{\"name\": \"pve-double-status\", \"meta-type\": \"object\","
    " \"members\": [{\"name\": \"status\", \"type\": \"str\", \"default\": null},"
    "  {\"name\": \"errmsg\", \"type\": \"str\", \"default\": null},"
    "  {\"name\": \"total\", \"type\": \"int\", \"default\": null},"
    "  {\"name\": \"transferred\", \"type\": \"int\", \"default\": null},"
    "  {\"name\": \"uuid\", \"type\": \"str\", \"default\": null}]},"
    "{\"name\": \"pve-double-backup-arg\", \"meta-type\": \"object\","
    " \"members\": [{\"name\": \"backup-file\", \"type\": \"str\"},"
    "  {\"name\": \"format\", \"type\": \"str\", \"default\": null},"
    "  {\"name\": \"config-file\", \"type\": \"str\", \"default\": null},"
    "  {\"name\": \"firewall-file\", \"type\": \"str\", \"default\": null},"
    "  {\"name\": \"devlist\", \"type\": \"str\", \"default\": null},"
    "  {\"name\": \"speed\", \"type\": \"int\", \"default\": null},"
    "  {\"name\": \"max-workers\", \"type\": \"int\", \"default\": null},"
    "  {\"name\": \"fleecing\", \"type\": \"bool\", \"default\": null}]}"
    "]";
  json_object *r = up ("query-qmp-schema", NULL, err);
  g_autoptr (json_object) add = NULL;

  if (!r)
    return NULL;
  add = jparse (extra);
  for (size_t i = 0; i < json_object_array_length (add); i++)
    json_object_array_add (r, json_object_get (json_object_array_get_idx (add, i)));
  return r;
}

static json_object *
version_object (void)
{
  json_object *v = json_object_new_object ();
  json_object *q = json_object_new_object ();
  g_autofree char *pkg = g_strdup_printf ("pve-qemu-kvm_%d.%d.%d-1 (pve-double)",
                                          D.major, D.minor, D.micro);

  json_object_object_add (q, "major", json_object_new_int (D.major));
  json_object_object_add (q, "minor", json_object_new_int (D.minor));
  json_object_object_add (q, "micro", json_object_new_int (D.micro));
  json_object_object_add (v, "qemu", q);
  jset_str (v, "package", pkg);
  return v;
}

static json_object *
handle_query_version (json_object *args, GError **err)
{
  return version_object ();
}

/* Detaching a fleecing image under a running backup deadlocks the patched
 * QEMU: refuse, loudly. */
static bool
deadlock_check (const char *what, const char *name, GError **err)
{
  if (!D.b.devs || !name || !strstr (name, "-fleecing"))
    return true;
  logf_ ("DEADLOCK: %s %s while backup %s is active", what, name, D.b.uuid);
  g_set_error (err, DOUBLE_ERROR, CLASS_GENERIC,
               "pve-double: %s %s while a backup is active would deadlock "
               "the patched QEMU", what, name);
  return false;
}

static json_object *
forward (const char *cmd, json_object *args, GError **err)
{
  return up (cmd, args ? json_object_get (args) : NULL, err);
}

static json_object *
handle_blockdev_del (json_object *args, GError **err)
{
  if (!deadlock_check ("blockdev-del", jstr (args, "node-name"), err))
    return NULL;
  return forward ("blockdev-del", args, err);
}

static json_object *
handle_hmp (json_object *args, GError **err)
{
  const char *line = jstr (args, "command-line");

  if (line && g_str_has_prefix (line, "drive_del ")) {
    g_autofree char *name = g_strstrip (g_strdup (line + strlen ("drive_del ")));
    if (!deadlock_check ("drive_del", name, err))
      return NULL;
  }
  return forward ("human-monitor-command", args, err);
}

static json_object *
handle_capabilities (json_object *args, GError **err)
{
  return json_object_new_object ();
}

typedef json_object *(*Handler) (json_object *args, GError **err);

static const struct {
  const char *name;
  Handler fn;
} handlers[] = {
  { "qmp_capabilities", handle_capabilities },
  { "query-proxmox-support", handle_query_proxmox_support },
  { "query-qmp-schema", handle_query_qmp_schema },
  { "query-version", handle_query_version },
  { "backup", handle_backup },
  { "query-backup", handle_query_backup },
  { "backup-cancel", handle_backup_cancel },
  { "query-jobs", handle_query_jobs },
  { "backup-access-setup", handle_backup_access_setup },
  { "backup-access-teardown", handle_backup_access_teardown },
  { "blockdev-del", handle_blockdev_del },
  { "human-monitor-command", handle_hmp },
};

/* ---- the client connection ----------------------------------------------- */

static void
client_close (void)
{
  if (D.client_fd >= 0)
    close (D.client_fd);
  D.client_fd = -1;
  json_tokener_reset (D.tok);
  logf_ ("client gone");
}

static void
send_msg (json_object *msg)
{
  const char *s = js (msg);
  size_t len = strlen (s), done = 0;

  while (D.client_fd >= 0 && done <= len) {
    const char *p = done < len ? s + done : "\n";
    size_t n = done < len ? len - done : 1;
    ssize_t w = write (D.client_fd, p, n);

    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0) {
      client_close ();
      return;
    }
    done += (size_t) w;
    if (done == len + 1)
      break;
  }
}

static void
forward_events (void)
{
  json_object *ev;

  while ((ev = fleece_qmp_take_event (D.up, NULL, NULL))) {
    if (D.client_fd >= 0)
      send_msg (ev);
    json_object_put (ev);
  }
}

static void
handle_message (json_object *msg)
{
  const char *cmd = jstr (msg, "execute");
  json_object *args = NULL, *id = NULL;
  g_autoptr (GError) err = NULL;
  g_autoptr (json_object) reply = json_object_new_object ();
  json_object *ret = NULL;
  Handler fn = NULL;

  json_object_object_get_ex (msg, "arguments", &args);
  if (json_object_object_get_ex (msg, "id", &id))
    json_object_object_add (reply, "id", json_object_get (id));
  logf_ ("> %s %s", cmd ? cmd : "(none)", js (args));
  if (!cmd) {
    g_set_error (&err, DOUBLE_ERROR, CLASS_GENERIC, "QMP input lacks member 'execute'");
  } else {
    for (size_t i = 0; i < G_N_ELEMENTS (handlers); i++)
      if (strcmp (handlers[i].name, cmd) == 0)
        fn = handlers[i].fn;
    ret = fn ? fn (args, &err) : forward (cmd, args, &err);
  }
  if (ret) {
    json_object_object_add (reply, "return", ret);
  } else {
    json_object *e = json_object_new_object ();
    const char *cls = "GenericError";

    if (err && err->domain == DOUBLE_ERROR && err->code == CLASS_DEVICE_NOT_FOUND)
      cls = "DeviceNotFound";
    jset_str (e, "class", cls);
    jset_str (e, "desc", err ? err->message : "unknown error");
    json_object_object_add (reply, "error", e);
    logf_ ("< error %s", err ? err->message : "unknown error");
  }
  /* Events that came while the command ran go first, as QEMU sends them. */
  forward_events ();
  send_msg (reply);
}

static void
client_read (void)
{
  char buf[65536];
  ssize_t n = read (D.client_fd, buf, sizeof buf);
  size_t off = 0;

  if (n < 0 && errno == EINTR)
    return;
  if (n <= 0) {
    client_close ();
    return;
  }
  while (off < (size_t) n && D.client_fd >= 0) {
    json_object *msg = json_tokener_parse_ex (D.tok, buf + off, (int) ((size_t) n - off));
    enum json_tokener_error jerr = json_tokener_get_error (D.tok);
    size_t used = json_tokener_get_parse_end (D.tok);

    if (!msg) {
      if (jerr == json_tokener_continue)
        break;
      logf_ ("bad JSON from the client: %s", json_tokener_error_desc (jerr));
      {
        g_autoptr (json_object) r = jparse ("{\"error\": {\"class\": \"GenericError\","
                                            " \"desc\": \"JSON parse error\"}}");
        send_msg (r);
      }
      json_tokener_reset (D.tok);
      break;
    }
    off += used ? used : (size_t) n - off;
    handle_message (msg);
    json_object_put (msg);
    json_tokener_reset (D.tok);
  }
}

static void
client_accept (void)
{
  int fd = accept4 (D.listen_fd, NULL, NULL, SOCK_CLOEXEC);
  g_autoptr (json_object) greeting = json_object_new_object ();
  json_object *qmp = json_object_new_object ();

  if (fd < 0)
    return;
  D.client_fd = fd;
  json_tokener_reset (D.tok);
  json_object_object_add (qmp, "version", version_object ());
  json_object_object_add (qmp, "capabilities", json_object_new_array ());
  json_object_object_add (greeting, "QMP", qmp);
  logf_ ("client connected");
  send_msg (greeting);
}

/* ---- main ----------------------------------------------------------------- */

static bool
connect_upstream (const char *path, GError **err)
{
  gint64 deadline = g_get_monotonic_time () + 20 * G_USEC_PER_SEC;

  D.up = fleece_qmp_new ();
  for (;;) {
    g_clear_error (err);
    if (fleece_qmp_connect_unix (D.up, path, err))
      return true;
    if (g_get_monotonic_time () > deadline)
      return false;
    g_usleep (20 * 1000);
  }
}

/* The socket appears at path only once it listens (bound under a
 * temporary name, then renamed): a client that waits for the file to
 * exist, as the tests do, is never refused by a socket bound but not yet
 * listening. */
static int
listen_on (const char *path)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  g_autofree char *tmp = g_strdup_printf ("%s.new", path);
  int fd;

  if (strlen (tmp) >= sizeof sun.sun_path)
    return -1;
  strcpy (sun.sun_path, tmp);
  unlink (tmp);
  unlink (path);
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 || bind (fd, (struct sockaddr *) &sun, sizeof sun) < 0 || listen (fd, 4) < 0
      || rename (tmp, path) < 0) {
    if (fd >= 0)
      close (fd);
    unlink (tmp);
    return -1;
  }
  return fd;
}

int
main (int argc, char **argv)
{
  g_autofree char *listen_path = NULL;
  g_autofree char *qemu_path = NULL;
  g_autofree char *log_path = NULL;
  g_autofree char *version = NULL;
  gboolean no_fleecing = FALSE, no_access = FALSE;
  GOptionEntry entries[] = {
    { "listen", 0, 0, G_OPTION_ARG_FILENAME, &listen_path, "socket for the library", "PATH" },
    { "qemu", 0, 0, G_OPTION_ARG_FILENAME, &qemu_path, "stock QEMU's QMP socket", "PATH" },
    { "log", 0, 0, G_OPTION_ARG_FILENAME, &log_path, "command trace", "FILE" },
    { "version", 0, 0, G_OPTION_ARG_STRING, &version,
      "report this QEMU version (before 10.0: devices by BlockBackend name only)", "X.Y.Z" },
    { "no-backup-fleecing", 0, 0, G_OPTION_ARG_NONE, &no_fleecing,
      "query-proxmox-support without backup-fleecing", NULL },
    { "no-backup-access", 0, 0, G_OPTION_ARG_NONE, &no_access,
      "query-proxmox-support without backup-access-api", NULL },
    { NULL },
  };
  g_autoptr (GOptionContext) ctx = g_option_context_new ("- Proxmox QEMU test double");
  g_autoptr (GError) err = NULL;

  g_option_context_add_main_entries (ctx, entries, NULL);
  if (!g_option_context_parse (ctx, &argc, &argv, &err) || !listen_path || !qemu_path) {
    fprintf (stderr, "pve-double: %s\n", err ? err->message : "--listen and --qemu are required");
    return 2;
  }
  /* Never outlive the test that started us. */
  prctl (PR_SET_PDEATHSIG, SIGTERM);
  signal (SIGPIPE, SIG_IGN);
  D.fleecing = !no_fleecing;
  D.access = !no_access;
  if (log_path && !(D.log = fopen (log_path, "a"))) {
    fprintf (stderr, "pve-double: cannot open %s: %s\n", log_path, g_strerror (errno));
    return 1;
  }
  if (!connect_upstream (qemu_path, &err)) {
    fprintf (stderr, "pve-double: %s\n", err->message);
    return 1;
  }
  fleece_qmp_get_version (D.up, &D.major, &D.minor, &D.micro);
  if (version && sscanf (version, "%d.%d.%d", &D.major, &D.minor, &D.micro) != 3) {
    fprintf (stderr, "pve-double: bad --version %s\n", version);
    return 2;
  }
  D.tok = json_tokener_new ();
  /* Listening last: the socket's existence tells the test we are ready. */
  if ((D.listen_fd = listen_on (listen_path)) < 0) {
    fprintf (stderr, "pve-double: cannot listen on %s: %s\n", listen_path, g_strerror (errno));
    return 1;
  }
  logf_ ("pve-double %d.%d.%d on %s (backup-fleecing %s)", D.major, D.minor, D.micro,
         listen_path, D.fleecing ? "yes" : "no");

  for (;;) {
    struct pollfd pfd = { .fd = D.client_fd >= 0 ? D.client_fd : D.listen_fd,
                          .events = POLLIN };
    g_autoptr (GError) werr = NULL;
    json_object *ev;

    if (poll (&pfd, 1, 20) > 0) {
      if (D.client_fd >= 0)
        client_read ();
      else
        client_accept ();
    }
    /* Stock QEMU's events: to the client, and a look at the jobs. */
    while ((ev = fleece_qmp_wait_event (D.up, NULL, NULL, 0, &werr))) {
      if (D.client_fd >= 0)
        send_msg (ev);
      json_object_put (ev);
    }
    if (werr && !g_error_matches (werr, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_TIMEOUT)) {
      logf_ ("stock QEMU is gone: %s", werr->message);
      break;
    }
    backup_tick (false);
    forward_events ();
  }
  return 0;
}
