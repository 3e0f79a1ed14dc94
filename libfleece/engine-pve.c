/* The Proxmox engine: Proxmox's patched QEMU builds the fleecing graph
 * itself inside its QMP "backup" command when given fleecing: true
 * (pve-qemu, "PVE backup: add fleecing option").  This engine does what
 * qemu-server does around that command (docs/design.md):
 *
 *   attach   allocate one image per fleeced drive and attach it as
 *            <device>-fleecing: a blockdev format node over a file node, or
 *            (patched QEMUs before 10.0, which look the image up by
 *            BlockBackend name) an HMP drive_add;
 *   start    backup {devlist, fleecing: true, <the caller's arguments>};
 *   poll     query-backup (and query-jobs for per-drive progress);
 *   cancel   backup-cancel;
 *   cleanup  cancel an active backup and wait for its end (detaching under a
 *            running job deadlocks the patched QEMU), detach every
 *            *-fleecing node, free the images.
 *
 * Backup access for external providers (pve-qemu 9.2+) replaces backup by
 * backup-access-setup, which leaves one snapshot-access node per drive for
 * the caller to export over NBD (their names are in the record), and
 * cancel/cleanup by backup-access-teardown.
 *
 * Every QMP command this engine sends is built in the "commands" section.
 * The record is written before each step that creates something, so that a
 * cleanup in another process can undo a run interrupted at any point. */
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/statvfs.h>

#include "internal.h"
#include "engine.h"
#include "target.h"

/* qemu-server's timeout for drive_add: storage may be slow to open. */
#define HMP_ATTACH_TIMEOUT_MS 60000
/* How long a cancelled backup may take to end before cleanup gives up. */
#define BACKUP_END_TIMEOUT_MS 120000
/* QEMU's node names and HMP's string arguments (monitor/hmp.c copies each
 * into a 1024-byte buffer and silently truncates the rest). */
#define NODE_NAME_MAX 31
#define HMP_STRING_MAX 1023
/* The patched QEMU's cbw-timeout, fixed in its code. */
#define PVE_CBW_TIMEOUT 45

/* ---- names ----------------------------------------------------------- */

/* What the patched QEMU looks up for a device: "<device>-fleecing". */
static char *fleecing_id (const char *device) { return g_strdup_printf ("%s-fleecing", device); }
/* qemu-server drops the "drive-" prefix to stay within 31 characters. */
static char *fleecing_file_node (const char *key) { return g_strdup_printf ("%s-fleecing-file", key); }

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
qmp_do (struct fleece_handle *h, const char *cmd, json_object *args, GError **err)
{
  json_object *r = fleece_qmp_execute (h->qmp, cmd, args, err);
  if (!r)
    return false;
  json_object_put (r);
  return true;
}

/* HMP prints its errors as text; an empty answer is success. */
static bool
hmp_do (struct fleece_handle *h, const char *line, int timeout_ms,
        const char *expect, GError **err)
{
  g_autoptr (json_object) args = json_object_new_object ();
  g_autoptr (json_object) r = NULL;
  g_autofree char *out = NULL;

  fleece_jset_str (args, "command-line", line);
  r = fleece_qmp_execute_timeout (h->qmp, "human-monitor-command",
                                  g_steal_pointer (&args), timeout_ms, err);
  if (!r)
    return false;
  out = g_strstrip (g_strdup (json_object_get_string (r)));
  if (g_strcmp0 (out, expect) != 0) {
    g_set_error (err, FLEECE_ERROR, EIO, "HMP %s: %s", line,
                 *out ? out : "(no answer)");
    return false;
  }
  return true;
}

/* qemu-server's blockdev attach: format node <device>-fleecing over file
 * node <key>-fleecing-file, discard and zero detection passed down so the
 * backup's discard-source frees space, no throttle node on top. */
static bool
cmd_attach_blockdev (struct fleece_handle *h, FleeceDrive *d, const char *path,
                     GError **err)
{
  g_autofree char *node = fleecing_id (d->device);
  g_autofree char *fnode = fleecing_file_node (d->key);
  json_object *a, *file;

  if (!g_path_is_absolute (path)) {
    g_set_error (err, FLEECE_ERROR, ENOTSUP,
                 "the fleecing image %s has the path '%s', which is not a "
                 "local file or block device; the blockdev attach needs one",
                 d->image, path);
    return false;
  }
  a = json_object_new_object ();
  file = json_object_new_object ();
  fleece_jset_str (file, "driver",
            g_file_test (path, G_FILE_TEST_IS_REGULAR) ? "file" : "host_device");
  fleece_jset_str (file, "filename", path);
  fleece_jset_str (file, "node-name", fnode);
  fleece_jset_str (file, "discard", "unmap");
  fleece_jset_str (file, "detect-zeroes", "unmap");
  fleece_jset_str (a, "driver", d->format);
  fleece_jset_str (a, "node-name", node);
  fleece_jset_str (a, "discard", "unmap");
  fleece_jset_str (a, "detect-zeroes", "unmap");
  json_object_object_add (a, "file", file);
  /* Storages round sizes up (LVM extents, KiB for raw): raw takes the exact
   * size, qcow2 was created with it. */
  if (strcmp (d->format, "raw") == 0)
    json_object_object_add (a, "size", json_object_new_int64 ((int64_t) d->size));
  return qmp_do (h, "blockdev-add", a, err);
}

/* qemu-server before the blockdev switch: a BlockBackend named
 * <device>-fleecing, found by name by the patched QEMU. */
static bool
cmd_attach_hmp (struct fleece_handle *h, FleeceDrive *d, const char *path,
                GError **err)
{
  g_autofree char *id = fleecing_id (d->device);
  g_autofree char *line = fleece_pve_drive_add_command (
    path, id, d->format, strcmp (d->format, "raw") == 0 ? d->size : 0, err);

  return line && hmp_do (h, line, HMP_ATTACH_TIMEOUT_MS, "OK", err);
}

static bool
cmd_drive_del (struct fleece_handle *h, const char *id, GError **err)
{
  g_autofree char *line = g_strdup_printf ("drive_del %s", id);
  return hmp_do (h, line, -1, "", err);
}

static bool
cmd_blockdev_del (struct fleece_handle *h, const char *node, GError **err)
{
  json_object *a = json_object_new_object ();
  fleece_jset_str (a, "node-name", node);
  return qmp_do (h, "blockdev-del", a, err);
}

static json_object *
cmd_query_backup (struct fleece_handle *h, GError **err)
{
  return fleece_qmp_execute (h->qmp, "query-backup", NULL, err);
}

static bool
cmd_backup_cancel (struct fleece_handle *h, GError **err)
{
  return qmp_do (h, "backup-cancel", NULL, err);
}

/* The patched QEMU's backup: the caller's arguments (VMA backup-file and
 * format, or PBS's) unchanged, plus the drives and fleecing. */
static json_object *
cmd_backup (struct fleece_handle *h, struct fleece_plan *p,
            const struct fleece_target *t, bool fleecing, GError **err)
{
  json_object *a = NULL;
  g_autoptr (GString) devlist = g_string_new (NULL);

  if (json_object_deep_copy (t->pve_args, &a, NULL) != 0 || !a) {
    g_set_error (err, FLEECE_ERROR, ENOMEM, "cannot copy the backup arguments");
    return NULL;
  }
  for (guint i = 0; i < p->drives->len; i++)
    g_string_append_printf (devlist, "%s%s", i ? "," : "",
                            ((FleeceDrive *) p->drives->pdata[i])->device);
  fleece_jset_str (a, "devlist", devlist->str);
  if (fleecing)
    json_object_object_add (a, "fleecing", json_object_new_boolean (true));
  if (h->bwlimit_kib)
    json_object_object_add (a, "speed",
                            json_object_new_int64 ((int64_t) (h->bwlimit_kib * 1024)));
  return fleece_qmp_execute (h->qmp, "backup", a, err);
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
  json_object *m;

  if (!json_object_object_get_ex (t->pve_args, "bitmap-mode", &m) || !m)
    return "none";
  if (json_object_is_type (m, json_type_object))
    return fleece_jstr (m, key) ? fleece_jstr (m, key) : "none";
  return json_object_get_string (m);
}

static json_object *
cmd_backup_access_setup (struct fleece_handle *h, struct fleece_plan *p,
                         const struct fleece_target *t, GError **err)
{
  json_object *a = json_object_new_object ();
  json_object *devices = json_object_new_array ();

  fleece_jset_str (a, "target-id", fleece_jstr (t->pve_args, "target-id"));
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    json_object *dev = json_object_new_object ();

    fleece_jset_str (dev, "device", d->device);
    fleece_jset_str (dev, "bitmap-mode", bitmap_mode (t, d->key));
    json_object_array_add (devices, dev);
  }
  json_object_object_add (a, "devices", devices);
  return fleece_qmp_execute (h->qmp, "backup-access-setup", a, err);
}

static bool
cmd_backup_access_teardown (struct fleece_handle *h, const char *target_id,
                            bool success, GError **err)
{
  json_object *a = json_object_new_object ();

  fleece_jset_str (a, "target-id", target_id);
  json_object_object_add (a, "success", json_object_new_boolean (success));
  return qmp_do (h, "backup-access-teardown", a, err);
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
  json_object *img, *v;
  guint64 *size = g_new0 (guint64, 1);

  if (json_object_object_get_ex (info, "image", &img) &&
      json_object_object_get_ex (img, "virtual-size", &v))
    *size = (guint64) json_object_get_int64 (v);
  g_hash_table_replace (t, g_strdup (name), size);
}

static bool
query_attached (struct fleece_handle *h, Attached *a, GError **err)
{
  g_autoptr (json_object) blocks = NULL;
  g_autoptr (json_object) nodes = NULL;
  json_object *args = json_object_new_object ();

  attached_clear (a);
  json_object_object_add (args, "flat", json_object_new_boolean (true));
  if (!(nodes = fleece_qmp_execute (h->qmp, "query-named-block-nodes", args, err)) ||
      !(blocks = fleece_qmp_execute (h->qmp, "query-block", NULL, err)))
    return false;
  a->backends = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  a->nodes = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  for (size_t i = 0; i < json_object_array_length (nodes); i++) {
    json_object *n = json_object_array_get_idx (nodes, i);
    if (fleece_jstr (n, "node-name"))
      put_size (a->nodes, fleece_jstr (n, "node-name"), n);
  }
  for (size_t i = 0; i < json_object_array_length (blocks); i++) {
    json_object *b = json_object_array_get_idx (blocks, i), *ins;
    const char *dev = fleece_jstr (b, "device");
    if (dev && *dev && json_object_object_get_ex (b, "inserted", &ins))
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

/* Patched QEMUs before 10.0 find the fleecing image only as a BlockBackend
 * (blk_by_name); 10.0 also takes a node name, which qemu-server's blockdev
 * switch relies on.  No capability reports it, so the version decides. */
static bool
attach_by_hmp (struct fleece_handle *h)
{
  return h->features.qemu_major < 10;
}

static json_object *
record_new (struct fleece_handle *h, struct fleece_plan *p)
{
  json_object *r = fleece_run_record_new (h, p, "pve");
  json_object *drives;

  fleece_jset_str (r, "attach", attach_by_hmp (h) ? "hmp" : "blockdev");
  fleece_jset_str (r, "mode", NULL);
  fleece_jset_str (r, "target-id", NULL);
  fleece_jset_str (r, "backup-uuid", NULL);
  json_object_object_get_ex (r, "drives", &drives);
  for (guint i = 0; i < p->drives->len; i++)
    fleece_jset_str (json_object_array_get_idx (drives, i), "device",
                     ((FleeceDrive *) p->drives->pdata[i])->device);
  return r;
}

/* ---- cleanup, shared by failures and fleece_cleanup() -------------------- */

static bool
any_event (const char *event, json_object *data, void *opaque)
{
  return true;
}

/* Sleep until the next QMP event, at most wait_ms. */
static bool
wait_a_little (struct fleece_handle *h, int wait_ms, GError **err)
{
  g_autoptr (GError) werr = NULL;
  json_object *ev = fleece_qmp_wait_event (h->qmp, any_event, NULL, wait_ms, &werr);

  if (ev)
    json_object_put (ev);
  else if (werr && !g_error_matches (werr, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_TIMEOUT)) {
    g_propagate_error (err, g_steal_pointer (&werr));
    return false;
  }
  return true;
}

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

/* An active backup holds the fleecing images: detaching them under it
 * deadlocks the patched QEMU.  Cancel ours (tear down a backup access) and
 * wait until query-backup no longer says active (backup-cancel returns
 * before the jobs end). */
static bool
end_backup (struct fleece_handle *h, json_object *record, GError **err)
{
  gint64 deadline = g_get_monotonic_time () + BACKUP_END_TIMEOUT_MS * 1000LL;
  bool cancelled = false;

  for (;;) {
    g_autoptr (json_object) st = cmd_query_backup (h, err);

    if (!st)
      return false;
    if (g_strcmp0 (fleece_jstr (st, "status"), "active") != 0)
      return true;
    if (!backup_is_ours (record, st)) {
      g_set_error (err, FLEECE_ERROR, EBUSY,
                   "a backup that libfleece did not start runs in the QEMU of "
                   "VM %u (query-backup: uuid %s, started %" PRId64 "); its "
                   "fleecing images must stay until it ends", h->vmid,
                   fleece_jstr (st, "uuid") ? fleece_jstr (st, "uuid") : "?",
                   fleece_jint (st, "start-time"));
      return false;
    }
    if (!cancelled && is_access (record)) {
      /* Success only on the handle whose run it is, not cancelled: the
       * bitmap then tracks from this backup on.  A crashed run failed. */
      bool success = h->record && h->state == FLEECE_STATE_RUNNING && !h->cancelled &&
                     g_strcmp0 (fleece_jstr (h->record, "run"), fleece_jstr (record, "run")) == 0;

      fleece_log (h, FLEECE_LOG_INFO, "tearing down the backup access of VM %u (%s)",
                  h->vmid, success ? "success" : "failure");
      if (!cmd_backup_access_teardown (h, fleece_jstr (record, "target-id"), success, err))
        return false;
      cancelled = true;
    } else if (!cancelled) {
      fleece_log (h, FLEECE_LOG_INFO, "cancelling the running backup of VM %u",
                  h->vmid);
      if (!cmd_backup_cancel (h, err))
        return false;
      cancelled = true;
    }
    if (g_get_monotonic_time () > deadline) {
      g_set_error (err, FLEECE_ERROR, ETIMEDOUT,
                   "the backup of VM %u did not end within %d s of being "
                   "cancelled; run the cleanup again later", h->vmid,
                   BACKUP_END_TIMEOUT_MS / 1000);
      return false;
    }
    if (!wait_a_little (h, 100, err))
      return false;
  }
}

/* Detach what QEMU has under -fleecing names, as qemu-server does: every
 * such BlockBackend (drive_del) and node (blockdev-del), then file nodes a
 * format node left behind.  only: restrict to these names (NULL: all). */
static bool
detach_fleecing (struct fleece_handle *h, GHashTable *only, GError **err)
{
  /* Before attaching, anything found is a leftover of an unrecorded run. */
  int level = only ? FLEECE_LOG_WARNING : FLEECE_LOG_INFO;
  const char *what = only ? "detaching leftover" : "detaching";
  Attached a = { 0 };
  GHashTableIter it;
  gpointer name;
  bool ok = false;

  if (!query_attached (h, &a, err))
    goto out;
  g_hash_table_iter_init (&it, a.backends);
  while (g_hash_table_iter_next (&it, &name, NULL)) {
    if (!is_fleecing_name (name) || (only && !g_hash_table_contains (only, name)))
      continue;
    fleece_log (h, level, "%s %s", what, (const char *) name);
    if (!cmd_drive_del (h, name, err))
      goto out;
  }
  g_hash_table_iter_init (&it, a.nodes);
  while (g_hash_table_iter_next (&it, &name, NULL)) {
    if (!is_fleecing_name (name) || (only && !g_hash_table_contains (only, name)) ||
        g_hash_table_contains (a.backends, name))
      continue;
    fleece_log (h, level, "%s %s", what, (const char *) name);
    if (!cmd_blockdev_del (h, name, err))
      goto out;
  }
  /* A file node added inline goes with its parent; one added on its own
   * (or left by a failed add) stays. */
  if (!query_attached (h, &a, err))
    goto out;
  g_hash_table_iter_init (&it, a.nodes);
  while (g_hash_table_iter_next (&it, &name, NULL)) {
    if (!g_str_has_suffix (name, "-fleecing-file") ||
        (only && !g_hash_table_contains (only, name)))
      continue;
    if (!cmd_blockdev_del (h, name, err))
      goto out;
  }
  ok = true;
 out:
  attached_clear (&a);
  return ok;
}

static bool
pve_cleanup (struct fleece_handle *h, json_object *record, GError **err)
{
  if (h->qmp && (!end_backup (h, record, err) || !detach_fleecing (h, NULL, err)))
    return false;
  return fleece_free_recorded_images (h, record, err);
}

/* ---- plan and attach -------------------------------------------------------- */

static bool
pve_check_plan (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  const FleeceFeatures *f = &h->features;
  FleeceDrive *unfleeced = NULL;
  bool any_fleeced = false;

  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    any_fleeced |= d->fleeced;
    if (!d->fleeced && !fleece_key_is_small_state (d->key) && !unfleeced)
      unfleeced = d;
  }
  if (h->bitmap) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "the Proxmox engine has no bitmap of its own: incremental "
                 "backups are PBS's \"use-dirty-bitmap\" in the backup "
                 "arguments (fleece_target_new_pve())");
    return false;
  }
  if (!any_fleeced)
    return true;

  if (!f->pve_backup_fleecing) {
    if (!(h->plan_flags & FLEECE_PLAN_FLEECING_OPTIONAL)) {
      g_set_error (err, FLEECE_ERROR, ENOTSUP,
                   "running QEMU version does not support backup fleecing "
                   "(QEMU %d.%d.%d: query-proxmox-support lacks "
                   "backup-fleecing); update pve-qemu-kvm and restart the "
                   "VM, plan with FLEECE_PLAN_NO_FLEECING, or allow backing "
                   "up without with FLEECE_PLAN_FLEECING_OPTIONAL",
                   f->qemu_major, f->qemu_minor, f->qemu_micro);
      return false;
    }
    /* qemu-server's behaviour. */
    fleece_log (h, FLEECE_LOG_WARNING,
                "running QEMU version does not support backup fleecing - "
                "continuing without");
    p->no_fleecing = true;
    for (guint i = 0; i < p->drives->len; i++) {
      FleeceDrive *d = p->drives->pdata[i];
      if (!d->fleeced)
        continue;
      d->fleeced = false;
      g_clear_pointer (&d->image, g_free);
      g_clear_pointer (&d->format, g_free);
      d->cluster_size = 0;
      g_free (d->reason);
      d->reason = g_strdup ("running QEMU version does not support backup fleecing");
    }
    return true;
  }

  /* backup {fleecing: true} wants an image for every drive but EFI disks
   * and TPM state; there is no per-drive choice. */
  if (unfleeced) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "the patched QEMU fleeces every drive but EFI disks and TPM "
                 "state, or none: drive %s is not fleeced (%s); leave it out "
                 "with fleece_set_drives() or plan with FLEECE_PLAN_NO_FLEECING",
                 unfleeced->key, unfleeced->reason ? unfleeced->reason : "?");
    return false;
  }
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    g_autofree char *id = fleecing_id (d->device);

    if (d->fleeced && strlen (id) > NODE_NAME_MAX) {
      g_set_error (err, FLEECE_ERROR, ENAMETOOLONG,
                   "the fleecing image of %s would be named %s, longer than "
                   "QEMU's %d characters", d->key, id, NODE_NAME_MAX);
      return false;
    }
  }
  if (h->cbw_timeout != PVE_CBW_TIMEOUT)
    fleece_log (h, FLEECE_LOG_WARNING,
                "the patched QEMU always uses a copy-before-write timeout of "
                "%d s; the %u s set is ignored", PVE_CBW_TIMEOUT, h->cbw_timeout);
  return true;
}

/* A backup running in QEMU holds its fleecing images; attaching next to it
 * would fail or, worse, detaching leftovers would deadlock. */
static bool
check_no_backup_running (struct fleece_handle *h, GError **err)
{
  g_autoptr (json_object) st = cmd_query_backup (h, err);

  if (!st)
    return false;
  if (g_strcmp0 (fleece_jstr (st, "status"), "active") == 0) {
    g_set_error (err, FLEECE_ERROR, EBUSY,
                 "a backup already runs in the QEMU of VM %u (query-backup: "
                 "uuid %s); wait for it to end or cancel it", h->vmid,
                 fleece_jstr (st, "uuid") ? fleece_jstr (st, "uuid") : "?");
    return false;
  }
  return true;
}

static bool
verify_sizes (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  Attached a = { 0 };
  bool ok = false;

  if (!query_attached (h, &a, err))
    return false;
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    g_autofree char *id = fleecing_id (d->device);
    guint64 *size;

    if (!d->fleeced)
      continue;
    if (!(size = attached_size (&a, id))) {
      g_set_error (err, FLEECE_ERROR, ENOENT, "%s is missing after attaching", id);
      goto out;
    }
    if (*size != d->size) {
      g_set_error (err, FLEECE_ERROR, EINVAL,
                   "size mismatch for %s: %" G_GUINT64_FORMAT " != %"
                   G_GUINT64_FORMAT " bytes (the drive); the storage gave "
                   "%s another size than asked for", id, *size, d->size,
                   d->image);
      goto out;
    }
  }
  ok = true;
 out:
  attached_clear (&a);
  return ok;
}

static bool
attach_images (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  bool hmp = attach_by_hmp (h);

  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    g_autofree char *path = NULL;
    g_autofree char *id = fleecing_id (d->device);

    if (!d->fleeced)
      continue;
    if (!fleece_storage_alloc_image (h->storage, d->image, d->format, d->size,
                                     &d->volid, NULL, err))
      return false;
    fleece_jset_str (fleece_run_record_drive (h, d->key), "volid", d->volid);
    if (!fleece_run_record_save (h, err))
      return false;
    if (!(path = fleece_storage_image_path (h->storage, d->volid, err)))
      return false;
    if (!(hmp ? cmd_attach_hmp (h, d, path, err) : cmd_attach_blockdev (h, d, path, err))) {
      g_prefix_error (err, "attaching %s as %s: ", d->image, id);
      return false;
    }
    fleece_log (h, FLEECE_LOG_INFO, "%s: attached fleecing image %s (%s, %"
                G_GUINT64_FORMAT " bytes) as %s%s", d->device, d->image,
                d->format, d->size, id, hmp ? " (drive_add)" : "");
  }
  return verify_sizes (h, p, err);
}

static bool
pve_attach (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  g_autoptr (GHashTable) ours = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);

  if (!check_no_backup_running (h, err))
    return false;
  /* Leftovers of these drives from a run we have no record of (e.g.
   * qemu-server's own), as qemu-server does before attaching. */
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    g_hash_table_add (ours, fleecing_id (d->device));
    g_hash_table_add (ours, fleecing_file_node (d->key));
  }
  return detach_fleecing (h, ours, err) &&
         fleece_run_attach (h, p, record_new (h, p), attach_images,
                            &fleece_engine_pve_ops, err);
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

static FleeceDrive *
drive_by_device (struct fleece_plan *p, const char *device)
{
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    if (g_strcmp0 (d->device, device) == 0)
      return d;
  }
  return NULL;
}

/* The patched QEMU's refusals, in terms of what the caller did. */
static void
explain_start_error (struct fleece_handle *h, struct fleece_plan *p,
                     GError **err)
{
  const char *desc = fleece_qmp_last_error_desc (h->qmp);
  g_autoptr (GMatchInfo) m = NULL;
  g_autoptr (GRegex) notfound = NULL;
  g_autoptr (GRegex) mismatch = NULL;
  GError *e = NULL;

  if (!err || !*err || !g_error_matches (*err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_COMMAND) ||
      !desc)
    return;
  notfound = g_regex_new ("^Device '(.*)' not found", 0, 0, NULL);
  mismatch = g_regex_new ("^Size mismatch for '(.*)' - sector count (-?[0-9]+) != (-?[0-9]+)",
                          0, 0, NULL);

  if (g_regex_match (mismatch, desc, 0, &m)) {
    g_autofree char *id = g_match_info_fetch (m, 1);
    g_autofree char *fs = g_match_info_fetch (m, 2);
    g_autofree char *ds = g_match_info_fetch (m, 3);
    FleeceDrive *d = drive_by_fleecing_id (p, id);

    e = g_error_new (FLEECE_ERROR, EINVAL,
                     "the fleecing image of %s (%s) has %s sectors of 512 "
                     "bytes, the drive %s (%" G_GUINT64_FORMAT " bytes): it "
                     "must have the drive's exact size; was it resized after "
                     "fleece_attach()? (QEMU: %s)",
                     d ? d->key : id, d && d->image ? d->image : id, fs, ds,
                     d ? d->size : 0, desc);
    g_clear_error (err);
    g_propagate_error (err, e);
    return;
  }
  g_clear_pointer (&m, g_match_info_unref);
  if (g_regex_match (notfound, desc, 0, &m)) {
    g_autofree char *id = g_match_info_fetch (m, 1);
    FleeceDrive *d;

    if (is_fleecing_name (id)) {
      d = drive_by_fleecing_id (p, id);
      e = g_error_new (FLEECE_ERROR, ENOENT,
                       "QEMU has no fleecing image %s for %s: it was detached "
                       "since fleece_attach()%s (QEMU: %s)", id,
                       d ? d->key : "?",
                       attach_by_hmp (h) ? ""
                       : ", or this patched QEMU looks fleecing images up by "
                         "drive name only (attached as blockdev nodes)", desc);
    } else {
      d = drive_by_device (p, id);
      e = g_error_new (FLEECE_ERROR, ENODEV,
                       "drive %s (%s) is gone from QEMU since the plan was "
                       "made; plan again (QEMU: %s)", d ? d->key : id, id, desc);
    }
  } else {
    e = g_error_new (FLEECE_ERROR, EIO, "the patched QEMU refused the backup: %s",
                     desc);
  }
  g_clear_error (err);
  g_propagate_error (err, e);
}

/* Backup access: {"target-id": ..., "bitmap-mode": ...} instead of the
 * backup command's arguments. */
static bool
access_start (struct fleece_handle *h, struct fleece_plan *p,
              struct fleece_target *t, GError **err)
{
  static const char *const modes[] = { "none", "new", "use", NULL };
  g_autoptr (json_object) r = NULL;

  if (!h->features.pve_backup_access) {
    g_set_error (err, FLEECE_ERROR, ENOTSUP,
                 "running QEMU version does not support backup access for "
                 "external providers (QEMU %d.%d.%d: query-proxmox-support "
                 "lacks backup-access-api; pve-qemu 9.2 or later has it)",
                 h->features.qemu_major, h->features.qemu_minor,
                 h->features.qemu_micro);
    return false;
  }
  json_object_object_foreach (t->pve_args, k, v) {
    (void) v;
    if (strcmp (k, "target-id") != 0 && strcmp (k, "bitmap-mode") != 0) {
      g_set_error (err, FLEECE_ERROR, EINVAL,
                   "unknown backup access argument \"%s\": it takes "
                   "\"target-id\" and \"bitmap-mode\"", k);
      return false;
    }
  }
  if (!fleece_jstr (t->pve_args, "target-id") || !*fleece_jstr (t->pve_args, "target-id")) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "\"target-id\" must be a non-empty string");
    return false;
  }
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    const char *mode = bitmap_mode (t, d->key);

    if (!d->fleeced) {
      g_set_error (err, FLEECE_ERROR, EINVAL,
                   "backup access fleeces every drive, but %s is not fleeced "
                   "(%s): plan with FLEECE_PLAN_ALL_DRIVES", d->key,
                   d->reason ? d->reason : "?");
      return false;
    }
    if (!mode || !g_strv_contains (modes, mode)) {
      g_set_error (err, FLEECE_ERROR, EINVAL,
                   "bitmap mode of %s is '%s': use \"none\", \"new\" or \"use\"",
                   d->key, mode ? mode : "");
      return false;
    }
  }
  if (h->bwlimit_kib)
    fleece_log (h, FLEECE_LOG_WARNING,
                "backup access has no job in QEMU: the speed limit is the provider's");

  fleece_jset_str (h->record, "mode", "access");
  fleece_jset_str (h->record, "target-id", fleece_jstr (t->pve_args, "target-id"));
  json_object_object_add (h->record, "target", fleece_target_describe (t));
  fleece_run_record_set_state (h, "starting");
  if (!fleece_run_record_save (h, err))
    goto fail;
  fleece_log (h, FLEECE_LOG_INFO, "setting up backup access %s for VM %u (%u drives)",
              fleece_jstr (t->pve_args, "target-id"), h->vmid, p->drives->len);
  if (!(r = cmd_backup_access_setup (h, p, t, err))) {
    explain_start_error (h, p, err);
    goto fail;
  }
  for (size_t i = 0; i < json_object_array_length (r); i++) {
    json_object *info = json_object_array_get_idx (r, i);
    FleeceDrive *d = drive_by_device (p, fleece_jstr (info, "device"));

    if (!d)
      continue;
    json_object_object_add (fleece_run_record_drive (h, d->key), "access", json_object_get (info));
    fleece_log (h, FLEECE_LOG_INFO, "%s: snapshot access node %s (%" PRId64 " bytes)%s%s",
                d->key, fleece_jstr (info, "node-name"), fleece_jint (info, "size"),
                fleece_jstr (info, "bitmap-name") ? ", bitmap " : "",
                fleece_jstr (info, "bitmap-name") ? fleece_jstr (info, "bitmap-name") : "");
  }
  fleece_run_mark_running (h, p);
  return true;

 fail:
  fleece_jset_str (h->record, "mode", NULL);
  fleece_run_record_set_state (h, "attached");
  fleece_run_record_save (h, NULL);
  return false;
}

static bool
pve_start (struct fleece_handle *h, struct fleece_plan *p,
           struct fleece_target *t, GError **err)
{
  static const char *const ours[] = { "devlist", "fleecing", NULL };
  g_autoptr (json_object) r = NULL;
  bool fleecing = false;

  if (t->kind != FLEECE_TARGET_PVE) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "the Proxmox engine backs up through the patched QEMU's "
                 "backup command: make the target with fleece_target_new_pve()");
    return false;
  }
  for (size_t i = 0; ours[i]; i++)
    if (json_object_object_get_ex (t->pve_args, ours[i], NULL)) {
      g_set_error (err, FLEECE_ERROR, EINVAL,
                   "the backup arguments must not contain \"%s\": libfleece "
                   "sets it from the plan", ours[i]);
      return false;
    }
  if (h->bwlimit_kib && json_object_object_get_ex (t->pve_args, "speed", NULL)) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "both fleece_set_bwlimit() and \"speed\" in the backup "
                 "arguments: set one");
    return false;
  }
  if (json_object_object_get_ex (t->pve_args, "target-id", NULL))
    return access_start (h, p, t, err);
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    if (!d->fleeced)
      continue;
    if (fleece_key_is_small_state (d->key))
      fleece_log (h, FLEECE_LOG_WARNING,
                  "%s: the patched QEMU's backup never fleeces EFI disks and "
                  "TPM state; its fleecing image stays unused", d->key);
    else
      fleecing = true;
  }

  /* Ours from here on, also if we die before QEMU answers. */
  fleece_jset_str (h->record, "mode", "backup");
  json_object_object_add (h->record, "target", fleece_target_describe (t));
  fleece_run_record_set_state (h, "starting");
  if (!fleece_run_record_save (h, err))
    goto fail;
  fleece_log (h, FLEECE_LOG_INFO, "starting the backup of VM %u (%u drives%s)",
              h->vmid, p->drives->len, fleecing ? ", with fleecing" : "");
  r = cmd_backup (h, p, t, fleecing, err);
  if (!r) {
    explain_start_error (h, p, err);
    goto fail;
  }
  fleece_jset_str (h->record, "backup-uuid", fleece_jstr (r, "UUID"));
  fleece_run_mark_running (h, p);
  return true;

 fail:
  /* The patched QEMU undoes a refused backup itself: back to "attached". */
  fleece_jset_str (h->record, "mode", NULL);
  fleece_run_record_set_state (h, "attached");
  fleece_run_record_save (h, NULL);
  return false;
}

/* ---- progress and the end ---------------------------------------------------- */

static void
set_drive_progress (struct fleece_handle *h, FleeceDrive *d, uint64_t done,
                    uint64_t total)
{
  if (total)
    d->total = total;
  if (done != d->done && h->progress_fn)
    h->progress_fn (h->progress_opaque, d->key, done, d->total);
  d->done = done;
}

/* The patched QEMU names each drive's job after the device; a job that is
 * gone after we saw it has finished (sequential jobs dismiss themselves). */
static bool
update_drive_progress (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  g_autoptr (json_object) jobs = fleece_qmp_execute (h->qmp, "query-jobs", NULL, err);
  g_autoptr (GHashTable) seen = g_hash_table_new (g_str_hash, g_str_equal);

  if (!jobs)
    return false;
  for (size_t i = 0; i < json_object_array_length (jobs); i++) {
    json_object *j = json_object_array_get_idx (jobs, i);
    FleeceDrive *d = drive_by_device (p, fleece_jstr (j, "id"));

    if (!d)
      continue;
    g_hash_table_add (seen, d);
    d->started_us = d->started_us ? d->started_us : g_get_real_time ();
    set_drive_progress (h, d, (uint64_t) fleece_jint (j, "current-progress"),
                        (uint64_t) fleece_jint (j, "total-progress"));
  }
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    if (!g_hash_table_contains (seen, d) && d->done && !d->ended_us) {
      d->ended_us = g_get_real_time ();
      set_drive_progress (h, d, d->total, d->total);
    }
  }
  return true;
}

/* With on-cbw-error=break-snapshot a failed or timed-out copy to the
 * fleecing image lets the guest write pass and fails every later snapshot
 * read with EACCES ("job failed with err -13 - Permission denied"): say
 * what really happened. */
static char *
explain_failure (struct fleece_handle *h, struct fleece_plan *p, const char *errmsg)
{
  bool fleeced = false;

  for (guint i = 0; i < p->drives->len; i++)
    fleeced |= ((FleeceDrive *) p->drives->pdata[i])->fleeced;
  if (fleeced && (strstr (errmsg, "Permission denied") || strstr (errmsg, "err -13 "))) {
    g_autoptr (GString) space = g_string_new (NULL);

    for (guint i = 0; h->storage && i < p->drives->len; i++) {
      FleeceDrive *d = p->drives->pdata[i];
      g_autofree char *path = NULL;
      g_autofree char *dir = NULL;
      struct statvfs sv;

      if (!d->fleeced || !d->volid ||
          !(path = fleece_storage_image_path (h->storage, d->volid, NULL)))
        continue;
      dir = g_path_get_dirname (path);
      if (statvfs (dir, &sv) == 0) {
        g_string_printf (space, " (%" G_GUINT64_FORMAT " bytes free in %s now)",
                         (guint64) sv.f_bavail * sv.f_frsize, dir);
        break;
      }
    }
    return g_strdup_printf (
      "the backup of VM %u failed: copying old data to a fleecing image "
      "failed or took longer than the patched QEMU's copy-before-write "
      "timeout of %d s, so the snapshot broke; the fleecing storage is full "
      "or too slow%s. The guest's writes were not affected. (QEMU: %s)",
      h->vmid, PVE_CBW_TIMEOUT, space->str, errmsg);
  }
  return g_strdup_printf ("the backup of VM %u failed: %s", h->vmid, errmsg);
}

static int
pve_poll (struct fleece_handle *h, int timeout_ms, GError **err)
{
  struct fleece_plan *p = h->run_plan;
  gint64 deadline = timeout_ms < 0 ? -1
                    : g_get_monotonic_time () + (gint64) timeout_ms * 1000;
  const char *uuid = fleece_jstr (h->record, "backup-uuid");

  for (;;) {
    g_autoptr (json_object) st = cmd_query_backup (h, err);
    const char *status;
    gint64 now, wait_ms;

    if (!st) {
      g_prefix_error (err, "lost track of the backup of VM %u: ", h->vmid);
      return -1;
    }
    status = fleece_jstr (st, "status");
    if (uuid && g_strcmp0 (fleece_jstr (st, "uuid"), uuid) != 0) {
      g_set_error (err, FLEECE_ERROR, EIO,
                   "lost track of the backup of VM %u: QEMU reports another "
                   "backup (uuid %s, ours %s)", h->vmid,
                   fleece_jstr (st, "uuid") ? fleece_jstr (st, "uuid") : "none", uuid);
      return -1;
    }
    if (is_access (h->record)) {
      /* No job: the provider reads the exports.  It ends with fleece_cancel()
       * or fleece_cleanup() (or a teardown by someone else). */
      if (h->cancelled) {
        g_set_error (err, FLEECE_ERROR, ECANCELED,
                     "the backup access of VM %u was torn down as failed", h->vmid);
        return -1;
      }
      if (g_strcmp0 (status, "active") != 0) {
        g_set_error (err, FLEECE_ERROR, EIO,
                     "the backup access of VM %u was torn down by someone else", h->vmid);
        return -1;
      }
    } else if (!update_drive_progress (h, p, err)) {
      return -1;
    }

    if (g_strcmp0 (status, "done") == 0 || g_strcmp0 (status, "error") == 0) {
      bool ok = strcmp (status, "done") == 0;
      const char *msg = fleece_jstr (st, "errmsg");

      for (guint i = 0; i < p->drives->len; i++) {
        FleeceDrive *d = p->drives->pdata[i];
        if (ok)
          set_drive_progress (h, d, d->size, d->size);
        if (!d->ended_us)
          d->ended_us = g_get_real_time ();
        g_free (d->result);
        d->result = g_strdup (ok ? "ok" : h->cancelled ? "cancelled" : "failed");
      }
      if (ok) {
        fleece_log (h, FLEECE_LOG_INFO, "backup of VM %u finished (%" PRId64
                    " bytes transferred)", h->vmid, fleece_jint (st, "transferred"));
        return 1;
      }
      if (h->cancelled) {
        g_set_error (err, FLEECE_ERROR, ECANCELED, "the backup of VM %u was cancelled",
                     h->vmid);
        return -1;
      }
      {
        g_autofree char *why = explain_failure (h, p, msg ? msg : "unknown error");
        g_set_error (err, FLEECE_ERROR, EIO, "%s", why);
      }
      return -1;
    }
    if (g_strcmp0 (status, "active") != 0) {
      g_set_error (err, FLEECE_ERROR, EIO,
                   "lost track of the backup of VM %u: query-backup says %s",
                   h->vmid, status ? status : "nothing");
      return -1;
    }

    now = g_get_monotonic_time ();
    if (deadline >= 0 && now >= deadline)
      return 0;
    wait_ms = 500;
    if (deadline >= 0)
      wait_ms = MIN (wait_ms, (deadline - now) / 1000 + 1);
    if (!wait_a_little (h, (int) wait_ms, err)) {
      g_prefix_error (err, "lost track of the backup of VM %u: ", h->vmid);
      return -1;
    }
  }
}

static bool
pve_cancel (struct fleece_handle *h, GError **err)
{
  if (is_access (h->record))
    return cmd_backup_access_teardown (h, fleece_jstr (h->record, "target-id"), false, err);
  return cmd_backup_cancel (h, err);
}

const FleeceEngineOps fleece_engine_pve_ops = {
  .name = "pve",
  .check_plan = pve_check_plan,
  .attach = pve_attach,
  .start = pve_start,
  .poll = pve_poll,
  .cancel = pve_cancel,
  .cleanup = pve_cleanup,
};
