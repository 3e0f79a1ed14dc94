/* fleece_plan(): read the VM's drives from QEMU and decide, per drive,
 * whether it is fleeced and how the image is named, sized and formatted.
 * Changes nothing in QEMU or in storage. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "engine.h"

/* QEMU's node names are at most 31 characters; the longest we derive from a
 * key is "<key>-fleecing-file" / "<key>-fleece-tf" (15 more). */
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

static int
drive_cmp (gconstpointer a, gconstpointer b)
{
  const FleeceDrive *x = *(FleeceDrive *const *) a;
  const FleeceDrive *y = *(FleeceDrive *const *) b;
  return strcmp (x->key, y->key);
}

static bool
has_prefix_and_digit (const char *key, const char *prefix)
{
  size_t n = strlen (prefix);
  return strncmp (key, prefix, n) == 0 && g_ascii_isdigit (key[n]);
}

/* EFI vars and TPM state are tiny: Proxmox never fleeces them. */
bool
fleece_key_is_small_state (const char *key)
{
  return has_prefix_and_digit (key, "efidisk") ||
         has_prefix_and_digit (key, "tpmstate");
}

/* The QOM path of the device whose "drive" property we re-point.  query-block
 * names it by id ("scsi0") or, for a BlockBackend attached to a child
 * (virtio-blk's "virtio-backend"), by the child's QOM path. */
static char *
qom_device_path (const char *qdev)
{
  if (!qdev || !*qdev)
    return NULL;
  if (qdev[0] != '/')
    return g_strdup_printf ("/machine/peripheral/%s", qdev);
  if (g_str_has_suffix (qdev, "/virtio-backend"))
    return g_strndup (qdev, strlen (qdev) - strlen ("/virtio-backend"));
  return g_strdup (qdev);
}

/* drive-scsi0 -> scsi0; a -blockdev drive with no BlockBackend name is
 * named after its device id. */
static char *
drive_key (const char *device, const char *qom_path)
{
  if (device && g_str_has_prefix (device, "drive-") && device[6])
    return g_strdup (device + 6);
  if (device && *device)
    return g_strdup (device);
  if (qom_path)
    return g_path_get_basename (qom_path);
  return NULL;
}

static bool
key_wanted (struct fleece_handle *h, const char *key)
{
  if (!h->drives)
    return true;
  return g_strv_contains ((const char *const *) h->drives, key);
}

struct fleece_plan *
fleece_plan_new (uint32_t vmid)
{
  struct fleece_plan *p = g_new0 (struct fleece_plan, 1);
  p->vmid = vmid;
  p->refs = 1;
  p->drives = g_ptr_array_new_with_free_func ((GDestroyNotify) fleece_drive_free);
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
  g_free (p->engine);
  g_free (p);
}

/* qemu-server attaches a VM's TPM state to QEMU only for the backup (swtpm
 * owns it otherwise), with no guest device, as drive-tpmstate<N>-backup: a
 * BlockBackend before its blockdev switch, a node after.  The Proxmox
 * engine backs it up under that name; *key gets "tpmstate<N>". */
static bool
tpm_backup_name (const char *name, char **key)
{
  const char *p;

  if (!name || !g_str_has_prefix (name, "drive-tpmstate") ||
      !g_str_has_suffix (name, "-backup"))
    return false;
  p = name + strlen ("drive-tpmstate");
  if (!g_ascii_isdigit (*p))
    return false;
  while (g_ascii_isdigit (*p))
    p++;
  if (strcmp (p, "-backup") != 0)
    return false;
  *key = g_strndup (name + strlen ("drive-"), (size_t) (p - name) - strlen ("drive-"));
  return true;
}

static bool
has_key (struct fleece_plan *p, const char *key)
{
  for (guint i = 0; i < p->drives->len; i++)
    if (strcmp (((FleeceDrive *) p->drives->pdata[i])->key, key) == 0)
      return true;
  return false;
}

static void
add_tpm_backup_drive (struct fleece_plan *p, const char *name, const char *node,
                      json_object *image)
{
  g_autofree char *key = NULL;
  json_object *v;
  FleeceDrive *d;

  if (!tpm_backup_name (name, &key) || has_key (p, key) || !node ||
      !json_object_object_get_ex (image, "virtual-size", &v))
    return;
  d = g_new0 (FleeceDrive, 1);
  d->key = g_steal_pointer (&key);
  d->device = g_strdup (name);
  d->root = g_strdup (node);
  d->size = (uint64_t) json_object_get_int64 (v);
  g_ptr_array_add (p->drives, d);
}

/* The blockdev-era TPM backup node (query-block lists only BlockBackends). */
static bool
read_tpm_backup_nodes (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  g_autoptr (json_object) nodes = NULL;
  json_object *args = json_object_new_object ();

  json_object_object_add (args, "flat", json_object_new_boolean (true));
  nodes = fleece_qmp_execute (h->qmp, "query-named-block-nodes", args, err);
  if (!nodes)
    return false;
  for (size_t i = 0; i < json_object_array_length (nodes); i++) {
    json_object *n = json_object_array_get_idx (nodes, i), *name, *image;

    if (json_object_object_get_ex (n, "node-name", &name) &&
        json_object_object_get_ex (n, "image", &image))
      add_tpm_backup_drive (p, json_object_get_string (name),
                            json_object_get_string (name), image);
  }
  return true;
}

/* Fill in the drives of p from query-block. */
static bool
read_drives (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  bool pve = g_strcmp0 (p->engine, "pve") == 0;

  g_autoptr (json_object) blocks = NULL;
  size_t n;

  blocks = fleece_qmp_execute (h->qmp, "query-block", NULL, err);
  if (!blocks)
    return false;
  n = json_object_array_length (blocks);
  for (size_t i = 0; i < n; i++) {
    json_object *b = json_object_array_get_idx (blocks, i);
    json_object *inserted = NULL, *image = NULL, *v = NULL;
    const char *device = NULL, *qdev = NULL, *node = NULL;
    g_autofree char *qom = NULL;
    FleeceDrive *d;

    if (json_object_object_get_ex (b, "device", &v))
      device = json_object_get_string (v);
    if (json_object_object_get_ex (b, "qdev", &v))
      qdev = json_object_get_string (v);
    qom = qom_device_path (qdev);
    if (!json_object_object_get_ex (b, "inserted", &inserted))
      continue;                 /* empty drive: nothing to back up */
    if (!qom && pve && json_object_object_get_ex (inserted, "image", &image) &&
        json_object_object_get_ex (inserted, "node-name", &v))
      add_tpm_backup_drive (p, device, json_object_get_string (v), image);
    if (!qom)
      continue;                 /* not attached to a guest device */
    if (json_object_object_get_ex (b, "removable", &v) &&
        json_object_get_boolean (v))
      continue;                 /* CD-ROM: Proxmox does not back them up */
    if (json_object_object_get_ex (inserted, "ro", &v) &&
        json_object_get_boolean (v))
      continue;                 /* firmware code (OVMF pflash0), read-only media */
    if (json_object_object_get_ex (inserted, "node-name", &v))
      node = json_object_get_string (v);
    if (!json_object_object_get_ex (inserted, "image", &image) ||
        !json_object_object_get_ex (image, "virtual-size", &v) || !node) {
      g_set_error (err, FLEECE_ERROR, EPROTO,
                   "query-block gave no size or node for '%s'",
                   device && *device ? device : qdev);
      return false;
    }

    d = g_new0 (FleeceDrive, 1);
    d->key = drive_key (device, qom);
    d->device = g_strdup_printf ("drive-%s", d->key);
    d->qdev = g_steal_pointer (&qom);
    d->root = g_strdup (node);
    d->size = (uint64_t) json_object_get_int64 (v);
    g_ptr_array_add (p->drives, d);
  }
  if (pve && !read_tpm_backup_nodes (h, p, err))
    return false;
  g_ptr_array_sort (p->drives, drive_cmp);
  return true;
}

/* Restrict to the caller's drives; every named drive must exist. */
static bool
restrict_drives (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  if (!h->drives)
    return true;
  for (char **k = h->drives; *k; k++) {
    bool found = false;
    for (guint i = 0; i < p->drives->len && !found; i++)
      found = strcmp (((FleeceDrive *) p->drives->pdata[i])->key, *k) == 0;
    if (!found) {
      g_autoptr (GString) have = g_string_new (NULL);
      for (guint i = 0; i < p->drives->len; i++)
        g_string_append_printf (have, "%s%s", i ? ", " : "",
                                ((FleeceDrive *) p->drives->pdata[i])->key);
      g_set_error (err, FLEECE_ERROR, ENOENT,
                   "drive '%s' not found; the VM has: %s", *k,
                   have->len ? have->str : "no drives");
      return false;
    }
  }
  for (guint i = p->drives->len; i-- > 0;)
    if (!key_wanted (h, ((FleeceDrive *) p->drives->pdata[i])->key))
      g_ptr_array_remove_index (p->drives, i);
  return true;
}

static bool
decide (struct fleece_handle *h, struct fleece_plan *p, GError **err)
{
  unsigned flags = h->storage ? fleece_storage_flags (h->storage) : 0;
  unsigned n = 0;

  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    const char *fmt;

    if (strlen (d->key) > FLEECE_MAX_KEY_LEN) {
      g_set_error (err, FLEECE_ERROR, ENAMETOOLONG,
                   "drive key '%s' is longer than %d characters: the node "
                   "names derived from it would exceed QEMU's 31-character "
                   "limit; restrict the backup to other drives",
                   d->key, FLEECE_MAX_KEY_LEN);
      return false;
    }
    if (p->no_fleecing) {
      d->reason = g_strdup ("fleecing disabled");
      continue;
    }
    if (fleece_key_is_small_state (d->key) &&
        !(h->plan_flags & FLEECE_PLAN_ALL_DRIVES)) {
      d->reason = g_strdup ("EFI disk or TPM state: too small to be worth "
                            "fleecing");
      continue;
    }
    if (d->size == 0) {
      d->reason = g_strdup ("empty drive");
      continue;
    }
    if (!h->storage) {
      g_set_error (err, FLEECE_ERROR, EINVAL,
                   "no fleecing storage: call fleece_set_storage() or plan "
                   "with FLEECE_PLAN_NO_FLEECING");
      return false;
    }

    if (h->image_format)
      fmt = h->image_format;
    else if ((flags & FLEECE_STORAGE_QCOW2) && d->size % 512 == 0)
      fmt = "qcow2";
    else
      fmt = "raw";
    if (strcmp (fmt, "qcow2") == 0 && !(flags & FLEECE_STORAGE_QCOW2)) {
      g_set_error (err, FLEECE_ERROR, ENOTSUP,
                   "the fleecing storage cannot hold qcow2 images; use raw");
      return false;
    }
    if (strcmp (fmt, "qcow2") == 0 && d->size % 512) {
      g_set_error (err, FLEECE_ERROR, EINVAL,
                   "drive %s has %" G_GUINT64_FORMAT " bytes, not a multiple "
                   "of 512: its fleecing image must be raw", d->key, d->size);
      return false;
    }

    d->fleeced = true;
    d->format = g_strdup (fmt);
    d->cluster_size = strcmp (fmt, "qcow2") == 0 ? QCOW2_DEFAULT_CLUSTER : 0;
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

  if (!h->qmp) {
    fleece_error_set (__func__, ENOTCONN,
                      "not connected: call fleece_connect() first");
    return NULL;
  }
  if (!h->vmid) {
    fleece_error_set (__func__, EINVAL,
                      "no vmid: call fleece_set_vmid() first");
    return NULL;
  }
  ops = fleece_engine_ops (h);
  p = fleece_plan_new (h->vmid);
  p->engine = g_strdup (ops->name);
  p->no_fleecing = (h->plan_flags & FLEECE_PLAN_NO_FLEECING) != 0;
  if (!read_drives (h, p, &err) || !restrict_drives (h, p, &err) ||
      !decide (h, p, &err) || !ops->check_plan (h, p, &err)) {
    fleece_plan_free (p);
    fleece_error_set_gerror (__func__, err);
    return NULL;
  }
  if (p->drives->len == 0) {
    fleece_plan_free (p);
    fleece_error_set (__func__, ENOENT,
                      "the VM has no drives to back up");
    return NULL;
  }
  return p;
}

static FleeceDrive *
plan_drive (struct fleece_plan *p, size_t i, const char *func)
{
  if (!p || i >= p->drives->len) {
    fleece_error_set (func, EINVAL, "no drive %zu in the plan (it has %u)",
                      i, p ? p->drives->len : 0);
    return NULL;
  }
  return p->drives->pdata[i];
}

FLEECE_API size_t
fleece_plan_get_drive_count (struct fleece_plan *p)
{
  return p ? p->drives->len : 0;
}

FLEECE_API const char *
fleece_plan_get_key (struct fleece_plan *p, size_t i)
{
  FleeceDrive *d = plan_drive (p, i, __func__);
  return d ? d->key : NULL;
}

FLEECE_API const char *
fleece_plan_get_device (struct fleece_plan *p, size_t i)
{
  FleeceDrive *d = plan_drive (p, i, __func__);
  return d ? d->device : NULL;
}

FLEECE_API uint64_t
fleece_plan_get_size (struct fleece_plan *p, size_t i)
{
  FleeceDrive *d = plan_drive (p, i, __func__);
  return d ? d->size : 0;
}

FLEECE_API int
fleece_plan_get_fleeced (struct fleece_plan *p, size_t i)
{
  FleeceDrive *d = plan_drive (p, i, __func__);
  return d ? d->fleeced : -1;
}

FLEECE_API const char *
fleece_plan_get_reason (struct fleece_plan *p, size_t i)
{
  FleeceDrive *d = plan_drive (p, i, __func__);
  return d ? d->reason : NULL;
}

FLEECE_API const char *
fleece_plan_get_image (struct fleece_plan *p, size_t i)
{
  FleeceDrive *d = plan_drive (p, i, __func__);
  return d ? d->image : NULL;
}

FLEECE_API const char *
fleece_plan_get_format (struct fleece_plan *p, size_t i)
{
  FleeceDrive *d = plan_drive (p, i, __func__);
  return d ? d->format : NULL;
}

FLEECE_API uint64_t
fleece_plan_get_cluster_size (struct fleece_plan *p, size_t i)
{
  FleeceDrive *d = plan_drive (p, i, __func__);
  return d ? d->cluster_size : 0;
}

static void
add_str (json_object *o, const char *k, const char *v)
{
  json_object_object_add (o, k, v ? json_object_new_string (v) : NULL);
}

FLEECE_API char *
fleece_plan_to_json (struct fleece_plan *p)
{
  g_autoptr (json_object) o = json_object_new_object ();
  json_object *drives = json_object_new_array ();

  if (!p) {
    fleece_error_set (__func__, EINVAL, "plan is NULL");
    return NULL;
  }
  json_object_object_add (o, "vmid", json_object_new_int64 (p->vmid));
  add_str (o, "engine", p->engine);
  json_object_object_add (o, "fleecing",
                          json_object_new_boolean (!p->no_fleecing));
  for (guint i = 0; i < p->drives->len; i++) {
    FleeceDrive *d = p->drives->pdata[i];
    json_object *j = json_object_new_object ();

    add_str (j, "key", d->key);
    add_str (j, "device", d->device);
    add_str (j, "qdev", d->qdev);
    json_object_object_add (j, "size", json_object_new_int64 ((int64_t) d->size));
    json_object_object_add (j, "fleeced", json_object_new_boolean (d->fleeced));
    add_str (j, "reason", d->reason);
    add_str (j, "image", d->image);
    add_str (j, "format", d->format);
    json_object_object_add (j, "cluster-size",
                            json_object_new_int64 ((int64_t) d->cluster_size));
    json_object_array_add (drives, j);
  }
  json_object_object_add (o, "drives", drives);
  return strdup (json_object_to_json_string_ext (o, JSON_C_TO_STRING_PRETTY |
                                                    JSON_C_TO_STRING_NOSLASHESCAPE));
}
