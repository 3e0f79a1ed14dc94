/* fleece_plan(): the VM's drives (drives.c), restricted to the caller's,
 * and per drive whether it is fleeced and how its image is named, sized
 * and formatted; then the engine says whether QEMU can do it.  Changes
 * nothing in QEMU or in storage. */
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "handle.h"

/* QEMU's node names are at most 31 characters; the longest we derive from
 * a key is "<key>-fleecing-file" / "drive-<key>-fleecing" (15 more). */
#define FLEECE_MAX_KEY_LEN 16
#define QCOW2_DEFAULT_CLUSTER (64 * 1024)

void
fleece_drive_free (FleeceDrive *d)
{
  if (!d)
    return;
  g_free (d->key);
  g_free (d->device);
  g_free (d->qdev);
  g_free (d->root);
  g_free (d->reason);
  g_free (d->image);
  g_free (d->format);
  g_free (d->volid);
  g_free (d->result);
  g_free (d);
}

static void
skipped_free (FleeceSkipped *s)
{
  g_free (s->name);
  g_free (s->reason);
  g_free (s);
}

struct fleece_plan *
fleece_plan_new (uint32_t vmid)
{
  struct fleece_plan *p = g_new0 (struct fleece_plan, 1);

  p->vmid = vmid;
  p->refs = 1;
  p->drives = g_ptr_array_new_with_free_func ((GDestroyNotify) fleece_drive_free);
  p->skipped = g_ptr_array_new_with_free_func ((GDestroyNotify) skipped_free);
  return p;
}

struct fleece_plan *
fleece_plan_ref (struct fleece_plan *p)
{
  p->refs++;
  return p;
}

FLEECE_API void
fleece_plan_free (struct fleece_plan *p)
{
  if (!p || --p->refs > 0)
    return;
  g_ptr_array_unref (p->drives);
  g_ptr_array_unref (p->skipped);
  g_free (p->engine);
  g_free (p);
}

void
fleece_plan_skip (struct fleece_plan *p, const char *name, const char *fmt, ...)
{
  FleeceSkipped *s = g_new0 (FleeceSkipped, 1);
  va_list ap;

  va_start (ap, fmt);
  s->reason = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  s->name = g_strdup (name);
  g_ptr_array_add (p->skipped, s);
}

FleeceDrive *
fleece_plan_drive_by_key (struct fleece_plan *p, const char *key)
{
  for (guint i = 0; i < p->drives->len; i++)
    if (g_strcmp0 (((FleeceDrive *) p->drives->pdata[i])->key, key) == 0)
      return p->drives->pdata[i];
  return NULL;
}

static bool
has_prefix_and_digit (const char *key, const char *prefix)
{
  size_t n = strlen (prefix);
  return strncmp (key, prefix, n) == 0 && g_ascii_isdigit (key[n]);
}

bool
fleece_key_is_small_state (const char *key)
{
  return has_prefix_and_digit (key, "efidisk") || has_prefix_and_digit (key, "tpmstate");
}

/* ---- deciding -------------------------------------------------------- */

/* Restrict to the caller's drives (every one named must exist); the
 * others are skipped as not asked for. */
static bool
restrict_drives (const FleeceSettings *set, struct fleece_plan *p, GError **err)
{
  if (!set->drives)
    return true;
  for (char **k = set->drives; *k; k++) {
    if (!fleece_plan_drive_by_key (p, *k)) {
      g_autoptr (GString) have = g_string_new (NULL);
      for (guint i = 0; i < p->drives->len; i++)
        g_string_append_printf (have, "%s%s", i ? ", " : "",
                                ((FleeceDrive *) p->drives->pdata[i])->key);
      g_set_error (err, FLEECE_ERROR, ENOENT, "drive '%s' not found; the VM "
                   "has: %s", *k, have->len ? have->str : "no drives");
      return false;
    }
  }
  for (guint i = p->drives->len; i-- > 0;) {
    FleeceDrive *d = p->drives->pdata[i];
    if (!g_strv_contains ((const char *const *) set->drives, d->key)) {
      fleece_plan_skip (p, d->key, "not among the drives asked for");
      g_ptr_array_remove_index (p->drives, i);
    }
  }
  return true;
}

/* Only drives that are backed up get node names derived from their key. */
static bool
check_keys (struct fleece_plan *p, GError **err)
{
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];

    if (strlen (d->key) > FLEECE_MAX_KEY_LEN) {
      g_set_error (err, FLEECE_ERROR, ENAMETOOLONG,
                   "drive key '%s' is longer than %d characters: the node "
                   "names derived from it would exceed QEMU's 31-character "
                   "limit; restrict the backup to other drives",
                   d->key, FLEECE_MAX_KEY_LEN);
      return false;
    }
  }
  return true;
}

/* Why d is not fleeced, or NULL. */
static const char *
unfleeced_reason (const FleeceSettings *set, const struct fleece_plan *p,
                  const FleeceDrive *d)
{
  if (p->no_fleecing)
    return "fleecing disabled";
  /* The stock engine puts its filter in front of a guest device; the
   * patched QEMU fleeces a drive by its name (backup access needs every
   * drive fleeced, qemu-server's TPM backup drive included). */
  if (!fleece_drive_has_device (d) && strcmp (p->engine, "qemu") == 0)
    return "no guest device writes it: backed up directly";
  if (fleece_key_is_small_state (d->key) && !(set->plan_flags & FLEECE_PLAN_ALL_DRIVES))
    return "EFI disk or TPM state: too small to be worth fleecing";
  if (d->size == 0)
    return "empty drive";
  return NULL;
}

static const char *
choose_format (const FleeceSettings *set, unsigned flags, const FleeceDrive *d,
               GError **err)
{
  const char *fmt = set->image_format ? set->image_format
    : (flags & FLEECE_STORAGE_QCOW2) && d->size % 512 == 0 ? "qcow2" : "raw";

  if (strcmp (fmt, "qcow2") == 0 && !(flags & FLEECE_STORAGE_QCOW2)) {
    g_set_error (err, FLEECE_ERROR, ENOTSUP,
                 "the fleecing storage cannot hold qcow2 images; use raw");
    return NULL;
  }
  if (strcmp (fmt, "qcow2") == 0 && d->size % 512) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "drive %s has %" G_GUINT64_FORMAT " bytes, not a multiple "
                 "of 512: its fleecing image must be raw", d->key, d->size);
    return NULL;
  }
  return fmt;
}

/* Whether QEMU can open rbd nodes.  The schema lists "rbd" whatever QEMU
 * was built with (pve-qemu's --disable-rbd, a Debian QEMU without the
 * module package qemu-block-extra), so ask it to open one that cannot
 * open: without the driver QEMU says "Unknown driver" at once; with it,
 * reading the conf fails before anything connects. */
static bool
qemu_has_rbd (FleeceCtx *ctx, bool *has, GError **err)
{
  json_object *a = json_object_new_object ();
  g_autoptr (GError) e = NULL;

  fleece_jset_str (a, "driver", "rbd");
  fleece_jset_str (a, "node-name", "fleece-rbd-probe");
  fleece_jset_str (a, "pool", "fleece-probe");
  fleece_jset_str (a, "image", "fleece-probe");
  fleece_jset_str (a, "conf", "/proc/self/fleece-no-such-conf");
  *has = true;
  if (fleece_conn_do (ctx->conn, "blockdev-add", a, &e)) {
    a = json_object_new_object ();
    fleece_jset_str (a, "node-name", "fleece-rbd-probe");
    return fleece_conn_do (ctx->conn, "blockdev-del", a, err);
  }
  if (!g_error_matches (e, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_COMMAND)) {
    g_propagate_error (err, g_steal_pointer (&e));
    return false;
  }
  *has = !strstr (e->message, "Unknown driver");
  return true;
}

/* QEMU must reach the storage's images. */
static bool
check_storage_driver (FleeceCtx *ctx, GError **err)
{
  bool has = false;

  if (g_strcmp0 (fleece_storage_type (ctx->storage), "rbd") != 0)
    return true;
  if (ctx->features->rbd && !qemu_has_rbd (ctx, &has, err))
    return false;
  if (has)
    return true;
  g_set_error (err, FLEECE_ERROR, ENOTSUP, "this QEMU %d.%d.%d has no rbd "
               "block driver for the RBD fleecing storage (Debian: install "
               "qemu-block-extra and restart the VM; a QEMU built "
               "without rbd cannot use it)", ctx->features->qemu_major,
               ctx->features->qemu_minor, ctx->features->qemu_micro);
  return false;
}

static bool
decide (FleeceCtx *ctx, struct fleece_plan *p, GError **err)
{
  unsigned flags = fleece_storage_flags (ctx->storage);
  unsigned n = 0;

  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    const char *why = unfleeced_reason (ctx->set, p, d), *fmt;

    if (why) {
      d->reason = g_strdup (why);
      continue;
    }
    if (!ctx->storage) {
      g_set_error (err, FLEECE_ERROR, EINVAL, "no fleecing storage: call "
                   "fleece_set_storage() or plan with FLEECE_PLAN_NO_FLEECING");
      return false;
    }
    if (n == 0 && !check_storage_driver (ctx, err))
      return false;
    if (!(fmt = choose_format (ctx->set, flags, d, err)))
      return false;
    d->fleeced = true;
    d->format = g_strdup (fmt);
    d->cluster_size = strcmp (fmt, "qcow2") == 0 ? QCOW2_DEFAULT_CLUSTER : 0;
    /* Counting only images actually allocated, in key order, with the
     * format as suffix on path storages: as qemu-server names them. */
    if (flags & FLEECE_STORAGE_PATH)
      d->image = g_strdup_printf ("vm-%u-fleece-%u.%s", p->vmid, n, fmt);
    else
      d->image = g_strdup_printf ("vm-%u-fleece-%u", p->vmid, n);
    n++;
  }
  return true;
}

FLEECE_API struct fleece_plan *
fleece_plan (struct fleece_handle *h)
{
  g_autoptr (GError) err = NULL;
  struct fleece_plan *p;
  const FleeceEngineOps *ops;
  bool ok;

  if (!fleece_call_check (h, CALL_PLAN, __func__))
    return NULL;
  ops = fleece_handle_ops (h);
  p = fleece_plan_new (h->set.vmid);
  p->engine = g_strdup (ops->name);
  p->no_fleecing = (h->set.plan_flags & FLEECE_PLAN_NO_FLEECING) != 0;
  ok = fleece_drives_read (h->conn, p, &err) && restrict_drives (&h->set, p, &err) &&
       check_keys (p, &err) && decide (&h->ctx, p, &err) &&
       ops->check_plan (&h->ctx, p, &err);
  fleece_handle_release (h);
  if (ok && p->drives->len == 0)
    g_set_error (&err, FLEECE_ERROR, ENOENT, "the VM has no drives to back up");
  if (err) {
    fleece_plan_free (p);
    fleece_error_set_gerror (__func__, err);
    return NULL;
  }
  return p;
}

/* ---- inspecting ------------------------------------------------------- */

static FleeceDrive *
plan_drive (struct fleece_plan *p, int i, const char *func)
{
  if (!p || i < 0 || (guint) i >= p->drives->len) {
    fleece_error_set (func, EINVAL, "no drive %d in the plan (it has %d)",
                      i, p ? (int) p->drives->len : 0);
    return NULL;
  }
  return p->drives->pdata[i];
}

FLEECE_API int
fleece_plan_get_drive_count (struct fleece_plan *p)
{
  if (!p) {
    fleece_error_set (__func__, EINVAL, "plan is NULL");
    return -1;
  }
  return (int) p->drives->len;
}

FLEECE_API const char *
fleece_plan_get_key (struct fleece_plan *p, int i)
{
  FleeceDrive *d = plan_drive (p, i, __func__);
  return d ? d->key : NULL;
}

FLEECE_API const char *
fleece_plan_get_device (struct fleece_plan *p, int i)
{
  FleeceDrive *d = plan_drive (p, i, __func__);
  return d ? d->device : NULL;
}

FLEECE_API int64_t
fleece_plan_get_size (struct fleece_plan *p, int i)
{
  FleeceDrive *d = plan_drive (p, i, __func__);
  return d ? (int64_t) d->size : -1;
}

FLEECE_API int
fleece_plan_get_fleeced (struct fleece_plan *p, int i)
{
  FleeceDrive *d = plan_drive (p, i, __func__);
  return d ? d->fleeced : -1;
}

FLEECE_API const char *
fleece_plan_get_reason (struct fleece_plan *p, int i)
{
  FleeceDrive *d = plan_drive (p, i, __func__);
  return d ? d->reason : NULL;
}

FLEECE_API const char *
fleece_plan_get_image (struct fleece_plan *p, int i)
{
  FleeceDrive *d = plan_drive (p, i, __func__);
  return d ? d->image : NULL;
}

FLEECE_API const char *
fleece_plan_get_format (struct fleece_plan *p, int i)
{
  FleeceDrive *d = plan_drive (p, i, __func__);
  return d ? d->format : NULL;
}

FLEECE_API int64_t
fleece_plan_get_cluster_size (struct fleece_plan *p, int i)
{
  FleeceDrive *d = plan_drive (p, i, __func__);
  return d ? (int64_t) d->cluster_size : -1;
}

static FleeceSkipped *
plan_skipped (struct fleece_plan *p, int i, const char *func)
{
  if (!p || i < 0 || (guint) i >= p->skipped->len) {
    fleece_error_set (func, EINVAL, "no skipped entry %d in the plan (it has %d)",
                      i, p ? (int) p->skipped->len : 0);
    return NULL;
  }
  return p->skipped->pdata[i];
}

FLEECE_API int
fleece_plan_get_skipped_count (struct fleece_plan *p)
{
  if (!p) {
    fleece_error_set (__func__, EINVAL, "plan is NULL");
    return -1;
  }
  return (int) p->skipped->len;
}

FLEECE_API const char *
fleece_plan_get_skipped_name (struct fleece_plan *p, int i)
{
  FleeceSkipped *s = plan_skipped (p, i, __func__);
  return s ? s->name : NULL;
}

FLEECE_API const char *
fleece_plan_get_skipped_reason (struct fleece_plan *p, int i)
{
  FleeceSkipped *s = plan_skipped (p, i, __func__);
  return s ? s->reason : NULL;
}

json_object *
fleece_drive_to_json (const FleeceDrive *d)
{
  json_object *j = json_object_new_object ();

  fleece_jset_str (j, "key", d->key);
  fleece_jset_str (j, "device", d->device);
  fleece_jset_str (j, "qdev", d->qdev);
  fleece_jset_int (j, "size", (int64_t) d->size);
  fleece_jset_bool (j, "fleeced", d->fleeced);
  fleece_jset_str (j, "reason", d->reason);
  fleece_jset_str (j, "image", d->image);
  fleece_jset_str (j, "format", d->format);
  fleece_jset_int (j, "cluster-size", (int64_t) d->cluster_size);
  return j;
}

FLEECE_API char *
fleece_plan_to_json (struct fleece_plan *p)
{
  g_autoptr (json_object) o = NULL;
  json_object *drives, *skipped;

  if (!p) {
    fleece_error_set (__func__, EINVAL, "plan is NULL");
    return NULL;
  }
  o = json_object_new_object ();
  drives = json_object_new_array ();
  skipped = json_object_new_array ();
  fleece_jset_int (o, "vmid", p->vmid);
  fleece_jset_str (o, "engine", p->engine);
  fleece_jset_bool (o, "fleecing", !p->no_fleecing);
  for (guint i = 0; i < p->drives->len; i++)
    json_object_array_add (drives, fleece_drive_to_json (p->drives->pdata[i]));
  for (guint i = 0; i < p->skipped->len; i++) {
    FleeceSkipped *s = p->skipped->pdata[i];
    json_object *j = json_object_new_object ();

    fleece_jset_str (j, "name", s->name);
    fleece_jset_str (j, "reason", s->reason);
    json_object_array_add (skipped, j);
  }
  json_object_object_add (o, "drives", drives);
  json_object_object_add (o, "skipped", skipped);
  return strdup (json_object_to_json_string_ext (o, JSON_C_TO_STRING_PRETTY |
                                                    JSON_C_TO_STRING_NOSLASHESCAPE));
}
