/* The Proxmox engine: Proxmox's patched QEMU builds the fleecing graph
 * itself inside its QMP "backup" command when given fleecing: true
 * (pve-qemu, "PVE backup: add fleecing option").  This engine does what
 * qemu-server does around that command (docs/design.md):
 *
 *   attach   attach each image the skeleton allocated as <device>-fleecing:
 *            a blockdev format node over the storage's protocol node (QEMU
 *            10 and qemu-server 9), or (patched QEMUs before 10.0, which
 *            look the image up by BlockBackend name) an HMP drive_add;
 *   start    backup {devlist, fleecing: true, <the caller's arguments>}
 *            (a VMA into an fd: getfd, backup-file /dev/fdname/<name>);
 *   poll     query-backup (and query-jobs for per-drive progress);
 *   cancel   backup-cancel;
 *   undo     cancel an active backup of ours and wait for its end
 *            (detaching under a running job deadlocks the patched QEMU),
 *            detach the run's *-fleecing nodes.
 *
 * Backup access for external providers (pve-qemu 9.2+) replaces backup by
 * backup-access-setup, which leaves one snapshot-access node per drive for
 * the caller to export over NBD (their names are in the record), and
 * cancel/undo by backup-access-teardown.
 *
 * Every QMP command this engine sends is built in the "commands" section. */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "engine.h"
#include "target.h"

/* qemu-server's timeout for drive_add: storage may be slow to open. */
#define HMP_ATTACH_TIMEOUT_MS 60000
/* How long a cancelled backup may take to end before cleanup gives up. */
#define BACKUP_END_TIMEOUT_MS 120000
#define BACKUP_END_POLL_MS 100
/* QEMU's node names and HMP's string arguments (monitor/hmp.c copies each
 * into a 1024-byte buffer and silently truncates the rest). */
#define NODE_NAME_MAX 31
#define HMP_STRING_MAX 1023
/* The patched QEMU's cbw-timeout, fixed in its code. */
#define PVE_CBW_TIMEOUT 45

/* ---- names ----------------------------------------------------------- */

/* What the patched QEMU looks up for a device: "<device>-fleecing". */
static char *fleecing_id (const char *device) { return g_strdup_printf ("%s-fleecing", device); }
/* qemu-server drops the "drive-" prefix to stay within 31 characters:
 * scsi0-fleecing-file, tpmstate0-backup-fleecing-file. */
static char *
fleecing_file_node (const char *device)
{
  return g_strdup_printf ("%s-fleecing-file",
                          g_str_has_prefix (device, "drive-") ? device + 6 : device);
}
/* A VMA archive's fd, as QEMU's getfd names it. */
static char *vma_fdname (const char *run) { return g_strdup_printf ("fleece-vma-%.8s", run); }

static bool
is_fleecing_name (const char *name)
{
  return name && g_str_has_suffix (name, "-fleecing");
}

/* ---- HMP quoting (exported for the tests) ----------------------------- */

/* A QemuOpts value: a comma ends the value unless doubled. */
static void
append_opts_value (GString *s, const char *value)
{
  for (const char *c = value; *c; c++) {
    if (*c == ',')
      g_string_append_c (s, ',');
    g_string_append_c (s, *c);
  }
}

/* An HMP string argument in double quotes: monitor/hmp.c's get_str() knows
 * the escapes \\ \" \' \n \r and nothing else; any other byte stands for
 * itself.  The decoded string must fit its 1024-byte buffer, or HMP cuts it
 * off without a word (a truncated path would open another file). */
static bool
append_hmp_quoted (GString *s, const char *arg, GError **err)
{
  if (strlen (arg) > HMP_STRING_MAX) {
    g_set_error (err, FLEECE_ERROR, ENAMETOOLONG,
                 "the drive_add options are %zu bytes, HMP takes at most %d "
                 "(the fleecing image path is too long for the HMP attach)",
                 strlen (arg), HMP_STRING_MAX);
    return false;
  }
  g_string_append_c (s, '"');
  for (const char *c = arg; *c; c++) {
    switch (*c) {
    case '\\': g_string_append (s, "\\\\"); break;
    case '"':  g_string_append (s, "\\\""); break;
    case '\n': g_string_append (s, "\\n"); break;
    case '\r': g_string_append (s, "\\r"); break;
    default:   g_string_append_c (s, *c); break;
    }
  }
  g_string_append_c (s, '"');
  return true;
}

char *
fleece_pve_drive_add_command (const char *path, const char *id,
                              const char *format, uint64_t size, GError **err)
{
  g_autoptr (GString) opts = g_string_new ("file=");
  g_autoptr (GString) cmd = g_string_new ("drive_add auto ");

  if (!path || !*path || !id || !*id || !format || !*format) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "drive_add needs a path, an id and a format");
    return NULL;
  }
  append_opts_value (opts, path);
  g_string_append (opts, ",if=none,id=");
  append_opts_value (opts, id);
  g_string_append (opts, ",format=");
  append_opts_value (opts, format);
  g_string_append (opts, ",discard=unmap");
  if (size)
    g_string_append_printf (opts, ",size=%" PRIu64, size);
  if (!append_hmp_quoted (cmd, opts->str, err))
    return NULL;
  return g_string_free (g_steal_pointer (&cmd), FALSE);
}

/* ---- commands --------------------------------------------------------- */

static bool
qmp_do (FleeceCtx *ctx, const char *cmd, json_object *args, GError **err)
{
  return fleece_conn_do (ctx->conn, cmd, args, err);
}

/* Patched QEMUs before 10.0 find the fleecing image only as a BlockBackend
 * (blk_by_name); 10.0 also takes a node name, which qemu-server's blockdev
 * switch relies on.  No capability reports it, so the version decides. */
static bool
attach_by_hmp (FleeceCtx *ctx)
{
  return ctx->features->qemu_major < 10;
}

/* qemu-server's blockdev attach: format node <device>-fleecing over the
 * storage's protocol node <key>-fleecing-file (added here, or before for
 * QEMU to format it), discard and zero detection passed down so the
 * backup's discard-source frees space, no throttle node on top. */
static bool
cmd_attach_blockdev (FleeceCtx *ctx, const FleeceDrive *d, bool file_added,
                     GError **err)
{
  g_autofree char *node = fleecing_id (d->device);
  g_autofree char *fnode = fleecing_file_node (d->device);

  if (!file_added && !fleece_add_image_file (ctx, d, fnode, err))
    return false;
  return fleece_add_image_format (ctx, d, node, fnode, err);
}

/* qemu-server before the blockdev switch: a BlockBackend named
 * <device>-fleecing, found by name by the patched QEMU. */
static bool
cmd_attach_hmp (FleeceCtx *ctx, const FleeceDrive *d, GError **err)
{
  g_autofree char *id = fleecing_id (d->device);
  g_autofree char *path = NULL;
  g_autofree char *line = NULL;

  if (fleece_storage_is_callers (ctx->storage))
    fleece_conn_release (ctx->conn);
  if (!(path = fleece_storage_path (ctx->storage, d->volid, err)))
    return false;
  line = fleece_pve_drive_add_command (path, id, d->format,
                                       strcmp (d->format, "raw") == 0 ? d->size : 0, err);
  return line && fleece_conn_hmp (ctx->conn, line, HMP_ATTACH_TIMEOUT_MS, "OK", err);
}

static bool
cmd_drive_del (FleeceCtx *ctx, const char *id, GError **err)
{
  g_autofree char *line = g_strdup_printf ("drive_del %s", id);
  return fleece_conn_hmp (ctx->conn, line, -1, "", err);
}

static bool
cmd_blockdev_del (FleeceCtx *ctx, const char *node, GError **err)
{
  json_object *a = json_object_new_object ();

  fleece_jset_str (a, "node-name", node);
  return qmp_do (ctx, "blockdev-del", a, err);
}

static json_object *
cmd_query_backup (FleeceCtx *ctx, GError **err)
{
  return fleece_conn_execute (ctx->conn, "query-backup", NULL, err);
}

static bool
cmd_backup_cancel (FleeceCtx *ctx, GError **err)
{
  return qmp_do (ctx, "backup-cancel", NULL, err);
}

/* getfd hands QEMU a copy of the caller's fd under a name. */
static bool
cmd_getfd (FleeceCtx *ctx, const char *name, int fd, GError **err)
{
  json_object *a = json_object_new_object ();
  json_object *r;

  fleece_jset_str (a, "fdname", name);
  if (!(r = fleece_conn_execute_fd (ctx->conn, "getfd", a, fd, err)))
    return false;
  json_object_put (r);
  return true;
}

static void
cmd_closefd (FleeceCtx *ctx, const char *name)
{
  json_object *a = json_object_new_object ();
  g_autoptr (GError) err = NULL;

  fleece_jset_str (a, "fdname", name);
  if (!qmp_do (ctx, "closefd", a, &err))
    fleece_log (ctx, FLEECE_LOG_DEBUG, "%s", err->message);
}

/* The patched QEMU's backup: the caller's arguments (VMA backup-file and
 * format, or PBS's) unchanged, or a VMA into the fd QEMU got as fdname,
 * plus the drives and fleecing. */
static json_object *
cmd_backup (FleeceRun *run, const struct fleece_target *t, const char *fdname,
            bool fleecing, GError **err)
{
  json_object *a = NULL;
  g_autoptr (GString) devlist = g_string_new (NULL);

  if (t->kind == FLEECE_TARGET_FD) {
    g_autofree char *file = g_strconcat ("/dev/fdname/", fdname, NULL);

    if (!t->pve_args)
      a = json_object_new_object ();
    else if (json_object_deep_copy (t->pve_args, &a, NULL) != 0 || !a) {
      g_set_error (err, FLEECE_ERROR, ENOMEM, "cannot copy the backup arguments");
      return NULL;
    }
    fleece_jset_str (a, "format", "vma");
    fleece_jset_str (a, "backup-file", file);
  } else if (json_object_deep_copy (t->pve_args, &a, NULL) != 0 || !a) {
    g_set_error (err, FLEECE_ERROR, ENOMEM, "cannot copy the backup arguments");
    return NULL;
  }
  for (guint i = 0; i < run->plan->drives->len; i++)
    g_string_append_printf (devlist, "%s%s", i ? "," : "",
                            ((FleeceDrive *) run->plan->drives->pdata[i])->device);
  fleece_jset_str (a, "devlist", devlist->str);
  if (fleecing)
    fleece_jset_bool (a, "fleecing", true);
  if (run->ctx->set->bwlimit_kib)
    fleece_jset_int (a, "speed", (int64_t) (run->ctx->set->bwlimit_kib * 1024));
  return fleece_conn_execute (run->ctx->conn, "backup", a, err);
}

static bool
is_access (json_object *record)
{
  return g_strcmp0 (fleece_jstr (record, "mode"), "access") == 0;
}

/* The bitmap mode of drive key: one for all ("use"), or per drive key
 * ({"scsi0": "use", "efidisk0": "none"}); "none" when not given. */
static const char *
bitmap_mode (const struct fleece_target *t, const char *key)
{
  json_object *m = fleece_jobj (t->pve_args, "bitmap-mode");

  if (!m)
    return "none";
  if (json_object_is_type (m, json_type_object))
    return fleece_jstr (m, key) ? fleece_jstr (m, key) : "none";
  return json_object_get_string (m);
}

static json_object *
cmd_backup_access_setup (FleeceRun *run, const struct fleece_target *t,
                         GError **err)
{
  json_object *a = json_object_new_object ();
  json_object *devices = json_object_new_array ();

  fleece_jset_str (a, "target-id", fleece_jstr (t->pve_args, "target-id"));
  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    json_object *dev = json_object_new_object ();

    fleece_jset_str (dev, "device", d->device);
    fleece_jset_str (dev, "bitmap-mode", bitmap_mode (t, d->key));
    json_object_array_add (devices, dev);
  }
  json_object_object_add (a, "devices", devices);
  return fleece_conn_execute (run->ctx->conn, "backup-access-setup", a, err);
}

static bool
cmd_backup_access_teardown (FleeceCtx *ctx, const char *target_id,
                            bool success, GError **err)
{
  json_object *a = json_object_new_object ();

  fleece_jset_str (a, "target-id", target_id);
  fleece_jset_bool (a, "success", success);
  return qmp_do (ctx, "backup-access-teardown", a, err);
}

/* ---- queries ------------------------------------------------------------- */

/* What QEMU has attached under -fleecing names: BlockBackends (drive_add)
 * and nodes (blockdev-add), name -> virtual size. */
typedef struct {
  GHashTable *backends;
  GHashTable *nodes;
} Attached;

static void
attached_clear (Attached *a)
{
  g_clear_pointer (&a->backends, g_hash_table_unref);
  g_clear_pointer (&a->nodes, g_hash_table_unref);
}

static void
put_size (GHashTable *t, const char *name, json_object *info)
{
  guint64 *size = g_new0 (guint64, 1);

  *size = (guint64) fleece_jint (fleece_jobj (info, "image"), "virtual-size");
  g_hash_table_replace (t, g_strdup (name), size);
}

static bool
query_attached (FleeceCtx *ctx, Attached *a, GError **err)
{
  g_autoptr (json_object) blocks = NULL;

  attached_clear (a);
  if (!(a->nodes = fleece_query_nodes (ctx, err)) ||
      !(blocks = fleece_conn_execute (ctx->conn, "query-block", NULL, err)))
    return false;
  a->backends = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  for (size_t i = 0; i < json_object_array_length (blocks); i++) {
    json_object *b = json_object_array_get_idx (blocks, i), *ins = fleece_jobj (b, "inserted");
    const char *dev = fleece_jstr (b, "device");

    if (dev && *dev && ins)
      put_size (a->backends, dev, ins);
  }
  return true;
}

/* The size QEMU sees for a fleecing id, looked up like the patched QEMU
 * does: BlockBackend first, then node. */
static guint64 *
attached_size (Attached *a, const char *id)
{
  guint64 *s = g_hash_table_lookup (a->backends, id);
  return s ? s : g_hash_table_lookup (a->nodes, id);
}

/* ---- the record ----------------------------------------------------------- */

static void
pve_record_init (FleeceRun *run)
{
  fleece_jset_str (run->record, "attach", attach_by_hmp (run->ctx) ? "hmp" : "blockdev");
  fleece_jset_str (run->record, "mode", NULL);
  fleece_jset_str (run->record, "target-id", NULL);
  fleece_jset_str (run->record, "backup-uuid", NULL);
}

/* ---- undo ------------------------------------------------------------------- */

/* Is the backup query-backup describes ours?  Ours once we sent backup:
 * by UUID, or any if we died before recording it. */
static bool
backup_is_ours (json_object *record, json_object *status)
{
  const char *state = fleece_jstr (record, "state");
  const char *uuid = fleece_jstr (record, "backup-uuid");

  if (g_strcmp0 (state, "starting") != 0 && g_strcmp0 (state, "running") != 0)
    return false;
  if (is_access (record))
    return !fleece_jstr (status, "backup-file");
  return !uuid || g_strcmp0 (uuid, fleece_jstr (status, "uuid")) == 0;
}

/* Send the cancel of the backup record describes (or tear its access
 * down: as successful only when the owning handle cleans up a run that
 * was not cancelled, so the bitmap then tracks from this backup on). */
static bool
send_end (FleeceCtx *ctx, json_object *record, GError **err)
{
  if (is_access (record)) {
    bool success = fleece_jbool (record, "access-success");

    fleece_log (ctx, FLEECE_LOG_INFO, "tearing down the backup access (%s)",
                success ? "success" : "failure");
    return cmd_backup_access_teardown (ctx, fleece_jstr (record, "target-id"),
                                       success, err);
  }
  fleece_log (ctx, FLEECE_LOG_INFO, "cancelling the running backup");
  return cmd_backup_cancel (ctx, err);
}

/* An active backup holds the fleecing images: detaching them under it
 * deadlocks the patched QEMU.  Cancel ours and wait until query-backup no
 * longer says active (backup-cancel returns before the jobs end); the
 * monitor is free between looks. */
static bool
end_backup (FleeceCtx *ctx, json_object *record, GError **err)
{
  gint64 deadline = g_get_monotonic_time () + BACKUP_END_TIMEOUT_MS * 1000LL;
  bool sent = false;

  for (;;) {
    g_autoptr (json_object) st = cmd_query_backup (ctx, err);

    if (!st)
      return false;
    if (g_strcmp0 (fleece_jstr (st, "status"), "active") != 0)
      return true;
    if (!backup_is_ours (record, st)) {
      g_set_error (err, FLEECE_ERROR, EBUSY, "a backup that libfleece did not "
                   "start runs in QEMU (query-backup: uuid %s, started %"
                   PRId64 "); its fleecing images must stay until it ends",
                   fleece_jstr (st, "uuid") ? fleece_jstr (st, "uuid") : "?",
                   fleece_jint (st, "start-time"));
      return false;
    }
    if (!sent && !send_end (ctx, record, err))
      return false;
    sent = true;
    if (g_get_monotonic_time () > deadline) {
      g_set_error (err, FLEECE_ERROR, ETIMEDOUT, "the backup did not end "
                   "within %d s of being cancelled; run the cleanup again later",
                   BACKUP_END_TIMEOUT_MS / 1000);
      return false;
    }
    fleece_conn_sleep (ctx->conn, BACKUP_END_POLL_MS, NULL);
  }
}

/* The names the record's drives were attached under. */
static GHashTable *
run_names (json_object *record)
{
  GHashTable *names = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  json_object *drives = fleece_record_drives (record);

  for (size_t i = 0; drives && i < json_object_array_length (drives); i++) {
    json_object *d = json_object_array_get_idx (drives, i);

    if (fleece_jstr (d, "device"))
      g_hash_table_add (names, fleecing_id (fleece_jstr (d, "device")));
    if (fleece_jstr (d, "device"))
      g_hash_table_add (names, fleecing_file_node (fleece_jstr (d, "device")));
  }
  return names;
}

/* Detach the names of set that are in only and end in suffix (not those
 * in skip). */
static bool
detach_set (FleeceCtx *ctx, GHashTable *set, GHashTable *skip, GHashTable *only,
            const char *suffix, bool backends, GError **err)
{
  GHashTableIter it;
  gpointer name;

  g_hash_table_iter_init (&it, set);
  while (g_hash_table_iter_next (&it, &name, NULL)) {
    if (!g_hash_table_contains (only, name) || !g_str_has_suffix (name, suffix) ||
        (skip && g_hash_table_contains (skip, name)))
      continue;
    fleece_log (ctx, FLEECE_LOG_INFO, "detaching %s", (const char *) name);
    if (!(backends ? cmd_drive_del (ctx, name, err) : cmd_blockdev_del (ctx, name, err)))
      return false;
  }
  return true;
}

/* Detach the run's images: BlockBackends (drive_del), format nodes
 * (blockdev-del), then file nodes a format node left behind (one added on
 * its own, or by a failed add). */
static bool
detach_fleecing (FleeceCtx *ctx, json_object *record, GError **err)
{
  g_autoptr (GHashTable) names = run_names (record);
  Attached a = { 0 };
  bool ok = query_attached (ctx, &a, err) &&
            detach_set (ctx, a.backends, NULL, names, "-fleecing", true, err) &&
            detach_set (ctx, a.nodes, a.backends, names, "-fleecing", false, err) &&
            query_attached (ctx, &a, err) &&
            detach_set (ctx, a.nodes, a.backends, names, "-fleecing-file", false, err);

  attached_clear (&a);
  return ok;
}

static bool
pve_undo (FleeceCtx *ctx, json_object *record, bool keep_images, GError **err)
{
  /* A backup that started took the fd over; one that never did may have
   * left it with the monitor. */
  if (fleece_jstr (record, "fdname") && !fleece_jstr (record, "backup-uuid") && !keep_images)
    cmd_closefd (ctx, fleece_jstr (record, "fdname"));
  if (keep_images)
    return true;            /* a refused backup is undone by QEMU itself */
  return end_backup (ctx, record, err) && detach_fleecing (ctx, record, err);
}

/* ---- what QEMU shows of a run, without its record ------------------------ */

/* An entry {device, key} per <device>-fleecing name in set. */
static void
find_names (GHashTable *set, GHashTable *seen, json_object *drives,
            json_object *traces)
{
  GHashTableIter it;
  gpointer name;

  g_hash_table_iter_init (&it, set);
  while (g_hash_table_iter_next (&it, &name, NULL)) {
    g_autofree char *device = NULL;
    json_object *d;

    if (!is_fleecing_name (name) || g_hash_table_contains (seen, name))
      continue;
    g_hash_table_add (seen, g_strdup (name));
    device = g_strndup (name, strlen (name) - strlen ("-fleecing"));
    d = json_object_new_object ();
    fleece_jset_str (d, "device", device);
    fleece_jset_str (d, "key", g_str_has_prefix (device, "drive-") ? device + 6 : device);
    json_object_array_add (drives, d);
    json_object_array_add (traces, json_object_new_string (name));
  }
}

static json_object *
pve_find (FleeceCtx *ctx, GError **err)
{
  g_autoptr (GHashTable) seen = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  g_autoptr (json_object) st = NULL;
  json_object *found, *drives, *traces;
  Attached a = { 0 };

  g_autoptr (GError) qerr = NULL;

  if (!query_attached (ctx, &a, err)) {
    attached_clear (&a);
    return NULL;
  }
  /* A record of this engine may meet a QEMU that is not Proxmox's. */
  if (!(st = cmd_query_backup (ctx, &qerr)) &&
      !g_error_matches (qerr, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_COMMAND)) {
    attached_clear (&a);
    g_propagate_error (err, g_steal_pointer (&qerr));
    return NULL;
  }
  drives = json_object_new_array ();
  traces = json_object_new_array ();
  find_names (a.backends, seen, drives, traces);
  find_names (a.nodes, seen, drives, traces);
  attached_clear (&a);
  if (st && g_strcmp0 (fleece_jstr (st, "status"), "active") == 0) {
    g_autofree char *b = g_strdup_printf ("backup %s", fleece_jstr (st, "uuid"));
    json_object_array_add (traces, json_object_new_string (b));
  }
  if (json_object_array_length (traces) == 0) {
    json_object_put (drives);
    json_object_put (traces);
    return NULL;
  }
  found = json_object_new_object ();
  fleece_jset_str (found, "engine", "pve");
  fleece_jset_str (found, "state", "found");
  json_object_object_add (found, "drives", drives);
  json_object_object_add (found, "traces", traces);
  if (st)
    json_object_object_add (found, "backup", json_object_get (st));
  return found;
}

/* ---- plan and attach -------------------------------------------------------- */

static bool
check_fleecing_plan (FleeceCtx *ctx, struct fleece_plan *p, GError **err)
{
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    g_autofree char *id = fleecing_id (d->device);

    /* backup {fleecing: true} wants an image for every drive but EFI disks
     * and TPM state; there is no per-drive choice. */
    if (!d->fleeced && !fleece_key_is_small_state (d->key)) {
      g_set_error (err, FLEECE_ERROR, EINVAL, "the patched QEMU fleeces every "
                   "drive but EFI disks and TPM state, or none: drive %s is not "
                   "fleeced (%s); leave it out with fleece_set_drives() or plan "
                   "with FLEECE_PLAN_NO_FLEECING", d->key, d->reason ? d->reason : "?");
      return false;
    }
    if (d->fleeced && strlen (id) > NODE_NAME_MAX) {
      g_set_error (err, FLEECE_ERROR, ENAMETOOLONG, "the fleecing image of %s "
                   "would be named %s, longer than QEMU's %d characters",
                   d->key, id, NODE_NAME_MAX);
      return false;
    }
  }
  if (ctx->set->cbw_timeout != PVE_CBW_TIMEOUT)
    fleece_log (ctx, FLEECE_LOG_WARNING, "the patched QEMU always uses a "
                "copy-before-write timeout of %d s; the %u s set is ignored",
                PVE_CBW_TIMEOUT, ctx->set->cbw_timeout);
  return true;
}

static bool
pve_check_plan (FleeceCtx *ctx, struct fleece_plan *p, GError **err)
{
  const FleeceFeatures *f = ctx->features;
  bool any_fleeced = false;

  if (ctx->set->bitmap) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "the Proxmox engine has no bitmap "
                 "of its own: incremental backups are PBS's \"use-dirty-bitmap\" "
                 "or backup access's \"bitmap-mode\" in the backup arguments "
                 "(fleece_target_new_pve())");
    return false;
  }
  for (guint i = 0; i < p->drives->len; i++)
    any_fleeced |= ((FleeceDrive *) p->drives->pdata[i])->fleeced;
  if (!any_fleeced)
    return true;
  if (!f->pve_backup_fleecing) {
    g_autofree char *why = g_strdup_printf ("running QEMU version does not "
                                            "support backup fleecing (QEMU "
                                            "%d.%d.%d: query-proxmox-support "
                                            "lacks backup-fleecing); update "
                                            "pve-qemu-kvm and restart the VM, "
                                            "plan with FLEECE_PLAN_NO_FLEECING, or "
                                            "allow backing up without with "
                                            "FLEECE_PLAN_FLEECING_OPTIONAL",
                                            f->qemu_major, f->qemu_minor,
                                            f->qemu_micro);
    return fleece_plan_fleecing_unavailable (ctx, p, why, err);
  }
  return check_fleecing_plan (ctx, p, err);
}

/* Blockdev attaches (QEMU 10) can have QEMU format a qcow2 image; drive_add
 * opens a file that must already be one. */
static bool
pve_formats_images (FleeceCtx *ctx)
{
  return !attach_by_hmp (ctx);
}

/* A backup running in QEMU holds its fleecing images: attaching next to it
 * would fail or, worse, later detaching would deadlock. */
static bool
check_no_backup_running (FleeceCtx *ctx, GError **err)
{
  g_autoptr (json_object) st = cmd_query_backup (ctx, err);

  if (!st)
    return false;
  if (g_strcmp0 (fleece_jstr (st, "status"), "active") == 0) {
    g_set_error (err, FLEECE_ERROR, EBUSY, "a backup already runs in QEMU "
                 "(query-backup: uuid %s); wait for it to end or cancel it",
                 fleece_jstr (st, "uuid") ? fleece_jstr (st, "uuid") : "?");
    return false;
  }
  return true;
}

static bool
verify_sizes (FleeceCtx *ctx, struct fleece_plan *p, GError **err)
{
  Attached a = { 0 };
  bool ok = query_attached (ctx, &a, err);

  for (guint i = 0; ok && i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    g_autofree char *id = fleecing_id (d->device);
    guint64 *size = d->fleeced ? attached_size (&a, id) : NULL;

    if (!d->fleeced)
      continue;
    if (!size)
      g_set_error (err, FLEECE_ERROR, ENOENT, "%s is missing after attaching", id);
    else if (*size != d->size)
      g_set_error (err, FLEECE_ERROR, EINVAL, "size mismatch for %s: %"
                   G_GUINT64_FORMAT " != %" G_GUINT64_FORMAT " bytes (the "
                   "drive); the storage gave %s another size than asked for",
                   id, *size, d->size, d->image);
    ok = size && *size == d->size;
  }
  attached_clear (&a);
  return ok;
}

/* qcow2 images the storage left empty: QEMU writes their metadata first,
 * all at once (as the stock engine does). */
static bool
format_images (FleeceRun *run, GError **err)
{
  g_autoptr (GHashTable) jobs = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);

  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    g_autofree char *fnode = fleecing_file_node (d->device);
    g_autofree char *job = g_strdup_printf ("fleece-format-%s", d->key);

    if (!d->fleeced || !fleece_jbool (fleece_run_drive (run, d->key), "unformatted"))
      continue;
    if (!fleece_add_image_file (run->ctx, d, fnode, err) ||
        !fleece_format_qcow2 (run->ctx, job, fnode, d->size, 0, NULL, NULL, err))
      return false;
    g_hash_table_insert (jobs, g_steal_pointer (&job), g_strdup (d->image));
  }
  return g_hash_table_size (jobs) == 0 || fleece_finish_format_jobs (run->ctx, jobs, err);
}

static bool
pve_attach (FleeceRun *run, GError **err)
{
  FleeceCtx *ctx = run->ctx;
  bool hmp = attach_by_hmp (ctx);

  if (!check_no_backup_running (ctx, err) || !fleece_add_storage_objects (run, err) ||
      !format_images (run, err))
    return false;
  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    g_autofree char *id = fleecing_id (d->device);
    bool added = fleece_jbool (fleece_run_drive (run, d->key), "unformatted");

    if (!d->fleeced)
      continue;
    if (!(hmp ? cmd_attach_hmp (ctx, d, err) : cmd_attach_blockdev (ctx, d, added, err))) {
      g_prefix_error (err, "attaching %s as %s: ", d->image, id);
      return false;
    }
    fleece_log (ctx, FLEECE_LOG_INFO, "%s: attached fleecing image %s (%s, %"
                G_GUINT64_FORMAT " bytes) as %s%s", d->device, d->image,
                d->format, d->size, id, hmp ? " (drive_add)" : "");
  }
  return verify_sizes (ctx, run->plan, err);
}

/* ---- start ----------------------------------------------------------------- */

static FleeceDrive *
drive_by_fleecing_id (struct fleece_plan *p, const char *id)
{
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    g_autofree char *fid = fleecing_id (d->device);
    if (strcmp (fid, id) == 0)
      return d;
  }
  return NULL;
}

static GError *
size_mismatch_error (FleeceRun *run, GMatchInfo *m, const char *desc)
{
  g_autofree char *id = g_match_info_fetch (m, 1);
  g_autofree char *fs = g_match_info_fetch (m, 2);
  g_autofree char *ds = g_match_info_fetch (m, 3);
  FleeceDrive *d = drive_by_fleecing_id (run->plan, id);

  return g_error_new (FLEECE_ERROR, EINVAL, "the fleecing image of %s (%s) has "
                      "%s sectors of 512 bytes, the drive %s (%" G_GUINT64_FORMAT
                      " bytes): it must have the drive's exact size; was it "
                      "resized after fleece_attach()? (QEMU: %s)",
                      d ? d->key : id, d && d->image ? d->image : id, fs, ds,
                      d ? d->size : 0, desc);
}

static GError *
not_found_error (FleeceRun *run, GMatchInfo *m, const char *desc)
{
  g_autofree char *id = g_match_info_fetch (m, 1);
  FleeceDrive *d;

  if (is_fleecing_name (id)) {
    d = drive_by_fleecing_id (run->plan, id);
    return g_error_new (FLEECE_ERROR, ENOENT, "QEMU has no fleecing image %s "
                        "for %s: it was detached since fleece_attach()%s "
                        "(QEMU: %s)", id, d ? d->key : "?",
                        attach_by_hmp (run->ctx) ? "" : ", or this patched QEMU "
                        "looks fleecing images up by drive name only (attached "
                        "as blockdev nodes)", desc);
  }
  d = fleece_run_drive_by_device (run, id);
  return g_error_new (FLEECE_ERROR, ENODEV, "drive %s (%s) is gone from QEMU "
                      "since the plan was made; plan again (QEMU: %s)",
                      d ? d->key : id, id, desc);
}

/* The patched QEMU's refusals, in terms of what the caller did. */
static void
explain_start_error (FleeceRun *run, const char *cmd, GError **err)
{
  g_autoptr (GMatchInfo) m = NULL;
  g_autoptr (GRegex) notfound = g_regex_new ("^Device '(.*)' not found", 0, 0, NULL);
  g_autoptr (GRegex) mismatch = g_regex_new (
    "^Size mismatch for '(.*)' - sector count (-?[0-9]+) != (-?[0-9]+)", 0, 0, NULL);
  g_autofree char *prefix = g_strdup_printf ("%s: ", cmd);
  const char *desc;
  GError *e;

  if (!g_error_matches (*err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_COMMAND) ||
      !g_str_has_prefix ((*err)->message, prefix))
    return;
  desc = (*err)->message + strlen (prefix);
  if (g_regex_match (mismatch, desc, 0, &m))
    e = size_mismatch_error (run, m, desc);
  else {
    g_clear_pointer (&m, g_match_info_unref);
    if (g_regex_match (notfound, desc, 0, &m))
      e = not_found_error (run, m, desc);
    else
      e = g_error_new (FLEECE_ERROR, EIO, "the patched QEMU refused the backup: %s", desc);
  }
  g_clear_error (err);
  g_propagate_error (err, e);
}

static bool
check_access_args (FleeceRun *run, const struct fleece_target *t, GError **err)
{
  static const char *const modes[] = { "none", "new", "use", NULL };
  const FleeceFeatures *f = run->ctx->features;
  const char *id = fleece_jstr (t->pve_args, "target-id");

  if (!f->pve_backup_access) {
    g_set_error (err, FLEECE_ERROR, ENOTSUP, "running QEMU version does not "
                 "support backup access for external providers (QEMU %d.%d.%d: "
                 "query-proxmox-support lacks backup-access-api; pve-qemu 9.2 or "
                 "later has it)", f->qemu_major, f->qemu_minor, f->qemu_micro);
    return false;
  }
  json_object_object_foreach (t->pve_args, k, v) {
    (void) v;
    if (strcmp (k, "target-id") != 0 && strcmp (k, "bitmap-mode") != 0) {
      g_set_error (err, FLEECE_ERROR, EINVAL, "unknown backup access argument "
                   "\"%s\": it takes \"target-id\" and \"bitmap-mode\"", k);
      return false;
    }
  }
  if (!id || !*id) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "\"target-id\" must be a non-empty string");
    return false;
  }
  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    const char *mode = bitmap_mode (t, d->key);

    if (!d->fleeced) {
      g_set_error (err, FLEECE_ERROR, EINVAL, "backup access fleeces every "
                   "drive, but %s is not fleeced (%s): plan with "
                   "FLEECE_PLAN_ALL_DRIVES", d->key, d->reason ? d->reason : "?");
      return false;
    }
    if (!mode || !g_strv_contains (modes, mode)) {
      g_set_error (err, FLEECE_ERROR, EINVAL, "bitmap mode of %s is '%s': use "
                   "\"none\", \"new\" or \"use\"", d->key, mode ? mode : "");
      return false;
    }
  }
  return true;
}

static void
record_access (FleeceRun *run, json_object *r)
{
  for (size_t i = 0; i < json_object_array_length (r); i++) {
    json_object *info = json_object_array_get_idx (r, i);
    FleeceDrive *d = fleece_run_drive_by_device (run, fleece_jstr (info, "device"));

    if (!d)
      continue;
    json_object_object_add (fleece_run_drive (run, d->key), "access", json_object_get (info));
    fleece_log (run->ctx, FLEECE_LOG_INFO, "%s: snapshot access node %s (%" PRId64
                " bytes)%s%s", d->key, fleece_jstr (info, "node-name"),
                fleece_jint (info, "size"), fleece_jstr (info, "bitmap-name") ? ", bitmap " : "",
                fleece_jstr (info, "bitmap-name") ? fleece_jstr (info, "bitmap-name") : "");
  }
}

/* Backup access: {"target-id": ..., "bitmap-mode": ...} instead of the
 * backup command's arguments. */
static bool
access_start (FleeceRun *run, struct fleece_target *t, GError **err)
{
  g_autoptr (json_object) r = NULL;

  if (!check_access_args (run, t, err))
    return false;
  if (run->ctx->set->bwlimit_kib)
    fleece_log (run->ctx, FLEECE_LOG_WARNING, "backup access has no job in QEMU: "
                "the speed limit is the provider's");
  fleece_jset_str (run->record, "mode", "access");
  fleece_jset_str (run->record, "target-id", fleece_jstr (t->pve_args, "target-id"));
  json_object_object_add (run->record, "target", fleece_target_describe (t));
  fleece_run_set_state (run, "starting");
  if (!fleece_run_save (run, err))
    return false;
  fleece_log (run->ctx, FLEECE_LOG_INFO, "setting up backup access %s for VM %u "
              "(%u drives)", fleece_jstr (t->pve_args, "target-id"), run->vmid,
              run->plan->drives->len);
  if (!(r = cmd_backup_access_setup (run, t, err))) {
    explain_start_error (run, "backup-access-setup", err);
    return false;
  }
  record_access (run, r);
  fleece_run_mark_running (run);
  return true;
}

static bool
check_backup_args (FleeceRun *run, const struct fleece_target *t, GError **err)
{
  static const char *const ours[] = { "devlist", "fleecing", NULL };

  if (t->kind == FLEECE_TARGET_FD) {
    if (strcmp (t->format, "vma") == 0)
      return true;
    g_set_error (err, FLEECE_ERROR, EINVAL, "the Proxmox engine writes a VMA "
                 "archive to an fd target (fleece_target_new_fd (fd, \"vma\"))");
    return false;
  }
  if (t->kind != FLEECE_TARGET_PVE) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "the Proxmox engine backs up "
                 "through the patched QEMU's backup command: make the target "
                 "with fleece_target_new_pve() or fleece_target_new_fd()");
    return false;
  }
  for (size_t i = 0; ours[i]; i++)
    if (json_object_object_get_ex (t->pve_args, ours[i], NULL)) {
      g_set_error (err, FLEECE_ERROR, EINVAL, "the backup arguments must not "
                   "contain \"%s\": libfleece sets it from the plan", ours[i]);
      return false;
    }
  if (run->ctx->set->bwlimit_kib && json_object_object_get_ex (t->pve_args, "speed", NULL)) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "both fleece_set_bwlimit() and "
                 "\"speed\" in the backup arguments: set one");
    return false;
  }
  return true;
}

/* fleecing: true when a drive other than efidisk/tpmstate is fleeced
 * (the patched QEMU never fleeces those two). */
static bool
wants_fleecing (FleeceRun *run)
{
  bool fleecing = false;

  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    if (!d->fleeced)
      continue;
    if (fleece_key_is_small_state (d->key))
      fleece_log (run->ctx, FLEECE_LOG_WARNING, "%s: the patched QEMU's backup "
                  "never fleeces EFI disks and TPM state; its fleecing image "
                  "stays unused", d->key);
    else
      fleecing = true;
  }
  return fleecing;
}

/* A VMA into the caller's fd: QEMU gets its own copy, by name. */
static bool
hand_over_fd (FleeceRun *run, struct fleece_target *t, char **fdname,
              GError **err)
{
  if (t->kind != FLEECE_TARGET_FD)
    return true;
  *fdname = vma_fdname (fleece_jstr (run->record, "run"));
  fleece_jset_str (run->record, "fdname", *fdname);
  return fleece_run_save (run, err) &&
         cmd_getfd (run->ctx, *fdname, fleece_target_fd (t), err);
}

/* The patched QEMU undoes a refused backup itself: back to "attached". */
static bool
back_to_attached (FleeceRun *run, const char *fdname)
{
  if (fdname)
    cmd_closefd (run->ctx, fdname);
  fleece_jset_str (run->record, "fdname", NULL);
  fleece_jset_str (run->record, "mode", NULL);
  fleece_run_set_state (run, "attached");
  fleece_run_save (run, NULL);
  return false;
}

static bool
pve_start (FleeceRun *run, struct fleece_target *t, GError **err)
{
  g_autoptr (json_object) r = NULL;
  g_autofree char *fdname = NULL;
  bool fleecing;

  if (t->kind == FLEECE_TARGET_PVE && fleece_jobj (t->pve_args, "target-id"))
    return access_start (run, t, err) || back_to_attached (run, NULL);
  if (!check_backup_args (run, t, err))
    return false;
  fleecing = wants_fleecing (run);
  /* Ours from here on, also if we die before QEMU answers. */
  fleece_jset_str (run->record, "mode", "backup");
  json_object_object_add (run->record, "target", fleece_target_describe (t));
  fleece_run_set_state (run, "starting");
  if (fleece_run_save (run, err) && hand_over_fd (run, t, &fdname, err)) {
    fleece_log (run->ctx, FLEECE_LOG_INFO, "starting the backup of VM %u (%u "
                "drives%s)", run->vmid, run->plan->drives->len,
                fleecing ? ", with fleecing" : "");
    if ((r = cmd_backup (run, t, fdname, fleecing, err))) {
      fleece_jset_str (run->record, "backup-uuid", fleece_jstr (r, "UUID"));
      run->totals_known = true;       /* zero until the first look */
      fleece_run_mark_running (run);
      return true;
    }
    explain_start_error (run, "backup", err);
  }
  return back_to_attached (run, fdname);
}

/* ---- progress and the end ---------------------------------------------------- */

/* The patched QEMU names each drive's job after the device; a job that is
 * gone after we saw it has finished (sequential jobs dismiss themselves). */
static bool
update_drive_progress (FleeceRun *run, GError **err)
{
  g_autoptr (json_object) jobs = fleece_query_jobs (run->ctx, err);
  g_autoptr (GHashTable) seen = g_hash_table_new (g_str_hash, g_str_equal);
  GPtrArray *drives = run->plan->drives;

  if (!jobs)
    return false;
  for (size_t i = 0; i < json_object_array_length (jobs); i++) {
    json_object *j = json_object_array_get_idx (jobs, i);
    FleeceDrive *d = fleece_run_drive_by_device (run, fleece_jstr (j, "id"));

    if (!d)
      continue;
    g_hash_table_add (seen, d);
    fleece_drive_set_progress (run, d, (uint64_t) MAX (fleece_jint (j, "current-progress"), 0),
                               (uint64_t) MAX (fleece_jint (j, "total-progress"), 0));
  }
  for (guint i = 0; i < drives->len; i++) {
    FleeceDrive *d = drives->pdata[i];
    if (!g_hash_table_contains (seen, d) && d->done && !d->ended_us) {
      d->ended_us = g_get_monotonic_time ();
      fleece_drive_set_progress (run, d, d->total, d->total);
    }
  }
  return true;
}

/* query-backup's figures for the whole backup (qemu-server's task log
 * prints them): zero and reused bytes, the dirty total of an incremental,
 * and whether it is finishing. */
static void
update_totals (FleeceRun *run, json_object *st)
{
  run->finishing = fleece_jbool (st, "finishing");
  run->zero = (uint64_t) MAX (fleece_jint (st, "zero-bytes"), 0);
  run->reused = (uint64_t) MAX (fleece_jint (st, "reused"), 0);
  run->dirty = (uint64_t) MAX (fleece_jint (st, "dirty"), 0);
  run->totals_known = true;
}

/* The patched QEMU does not say whose copy failed: name every image. */
static char *
backup_failure (FleeceRun *run, const char *errmsg)
{
  g_autofree char *what = g_strdup_printf ("the backup of VM %u", run->vmid);
  g_autoptr (GString) images = g_string_new (NULL);
  const char *volid = NULL;
  char *why;

  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];

    if (!d->fleeced || !d->volid || fleece_key_is_small_state (d->key))
      continue;
    g_string_append_printf (images, "%s%s", images->len ? ", " : "", d->image);
    volid = volid ? volid : d->volid;
  }
  why = images->len ? fleece_explain_cbw_failure (run->ctx, what, images->str, volid,
                                                  PVE_CBW_TIMEOUT, errmsg) : NULL;
  return why ? why : g_strdup_printf ("the backup of VM %u failed: %s", run->vmid, errmsg);
}

/* done or error: every drive's result, and the run's. */
static int
backup_ended (FleeceRun *run, json_object *st, GError **err)
{
  bool ok = g_strcmp0 (fleece_jstr (st, "status"), "done") == 0;
  const char *msg = fleece_jstr (st, "errmsg");

  for (guint i = 0; i < run->plan->drives->len; i++) {
    FleeceDrive *d = run->plan->drives->pdata[i];
    if (ok)
      fleece_drive_set_progress (run, d, d->size, d->size);
    if (!d->ended_us)
      d->ended_us = g_get_monotonic_time ();
    g_free (d->result);
    d->result = g_strdup (ok ? "ok" : run->cancel_sent ? "cancelled" : "failed");
  }
  if (ok) {
    fleece_run_set_state (run, "succeeded");
    fleece_run_save (run, NULL);
    fleece_log (run->ctx, FLEECE_LOG_INFO, "backup of VM %u finished (%" PRId64
                " bytes transferred)", run->vmid, fleece_jint (st, "transferred"));
    return 1;
  }
  if (run->cancel_sent)
    g_set_error (err, FLEECE_ERROR, ECANCELED, "the backup of VM %u was cancelled",
                 run->vmid);
  else {
    g_autofree char *why = backup_failure (run, msg ? msg : "unknown error");
    g_set_error (err, FLEECE_ERROR, EIO, "%s", why);
  }
  return -1;
}

/* Backup access has no job: the provider reads the exports.  It ends with
 * fleece_cancel() or fleece_cleanup() (or a teardown by someone else). */
static int
access_poll (FleeceRun *run, const char *status, GError **err)
{
  if (run->cancel_sent) {
    g_set_error (err, FLEECE_ERROR, ECANCELED, "the backup access of VM %u "
                 "was torn down as failed", run->vmid);
    return -1;
  }
  if (g_strcmp0 (status, "active") != 0) {
    g_set_error (err, FLEECE_ERROR, EIO, "the backup access of VM %u was torn "
                 "down by someone else", run->vmid);
    return -1;
  }
  return 0;
}

static int
pve_poll (FleeceRun *run, GError **err)
{
  g_autoptr (json_object) st = cmd_query_backup (run->ctx, err);
  const char *uuid = fleece_jstr (run->record, "backup-uuid"), *status;

  if (!st)
    return -1;
  status = fleece_jstr (st, "status");
  if (uuid && g_strcmp0 (fleece_jstr (st, "uuid"), uuid) != 0) {
    g_set_error (err, FLEECE_ERROR, EIO, "lost track of the backup of VM %u: "
                 "QEMU reports another backup (uuid %s, ours %s)", run->vmid,
                 fleece_jstr (st, "uuid") ? fleece_jstr (st, "uuid") : "none", uuid);
    return -1;
  }
  if (is_access (run->record))
    return access_poll (run, status, err);
  if (!update_drive_progress (run, err))
    return -1;
  update_totals (run, st);
  if (g_strcmp0 (status, "done") == 0 || g_strcmp0 (status, "error") == 0)
    return backup_ended (run, st, err);
  if (g_strcmp0 (status, "active") != 0) {
    g_set_error (err, FLEECE_ERROR, EIO, "lost track of the backup of VM %u: "
                 "query-backup says %s", run->vmid, status ? status : "nothing");
    return -1;
  }
  return 0;
}

static bool
pve_cancel (FleeceRun *run, GError **err)
{
  if (is_access (run->record))
    return cmd_backup_access_teardown (run->ctx, fleece_jstr (run->record, "target-id"),
                                       false, err);
  return cmd_backup_cancel (run->ctx, err);
}

const FleeceEngineOps fleece_engine_pve_ops = {
  .name = "pve",
  .check_plan = pve_check_plan,
  .formats_images = pve_formats_images,
  .record_init = pve_record_init,
  .attach = pve_attach,
  .start = pve_start,
  .poll = pve_poll,
  .cancel = pve_cancel,
  .undo = pve_undo,
  .find = pve_find,
};
