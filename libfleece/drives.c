/* The VM's drives as QEMU shows them, named by the VM config's keys.
 *
 * qemu-server starts VMs in two shapes (docs/design.md, "Drive
 * discovery"):
 *  - qemu-server 8 and older: -drive if=none,id=drive-<key> and a device
 *    id=<key>: query-block names the BlockBackend drive-<key>.
 *  - qemu-server 9 (QEMU 10): -blockdev, a throttle node drive-<key> over
 *    a format node f<hash> over a file/host_device node e<hash>, the
 *    device attached by node name (scsi-hd also carries
 *    device_id=drive-<key>): query-block shows an anonymous BlockBackend
 *    whose root node is drive-<key>, and the device by its qdev id (or,
 *    for virtio-blk, the QOM path of its virtio-backend child).
 * The EFI vars disk is on the machine's second flash device
 * (-machine pflash1=drive-efidisk0 or -drive if=pflash,unit=1), qdev
 * /machine/system.flash1: key efidisk0, as qemu-server maps it; the first
 * flash device holds the firmware code and is never backed up.  For a
 * backup qemu-server attaches the TPM state as drive-tpmstate<N>-backup
 * without a guest device (a BlockBackend with -drive, a node with
 * -blockdev).  Everything else QEMU has is listed as skipped, with why. */
#include <errno.h>
#include <string.h>

#include "internal.h"

#define PFLASH_CODE "/machine/system.flash0"
#define PFLASH_VARS "/machine/system.flash1"

/* "drive-<key>" -> key, else NULL. */
static const char *
drive_prefixed (const char *name)
{
  if (name && g_str_has_prefix (name, "drive-") && name[6])
    return name + 6;
  return NULL;
}

/* qemu-server attaches the swtpm state for the backup only, as
 * drive-tpmstate<N>-backup: key "tpmstate<N>". */
static char *
tpm_backup_key (const char *name)
{
  const char *p;

  if (!name || !g_str_has_prefix (name, "drive-tpmstate") ||
      !g_str_has_suffix (name, "-backup"))
    return NULL;
  p = name + strlen ("drive-tpmstate");
  if (!g_ascii_isdigit (*p))
    return NULL;
  while (g_ascii_isdigit (*p))
    p++;
  if (strcmp (p, "-backup") != 0)
    return NULL;
  return g_strndup (name + strlen ("drive-"), (size_t) (p - name) - strlen ("drive-"));
}

/* The QOM path of the device whose "drive" property holds the
 * BlockBackend: query-block names it by id ("scsi0") or by QOM path
 * (virtio-blk's BlockBackend hangs off <id>/virtio-backend; the property
 * lives on the proxy). */
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

/* The config key of a drive with a guest device: its drive-<key> node
 * (qemu-server 9) or BlockBackend (qemu-server 8), else the device's id. */
static char *
drive_key (const char *device, const char *node, const char *qom)
{
  const char *k;

  if (g_strcmp0 (qom, PFLASH_VARS) == 0)
    return g_strdup ("efidisk0");
  if ((k = drive_prefixed (node)) || (k = drive_prefixed (device)))
    return g_strdup (k);
  if (qom && g_str_has_prefix (qom, "/machine/peripheral/") &&
      !strchr (qom + strlen ("/machine/peripheral/"), '/'))
    return g_strdup (qom + strlen ("/machine/peripheral/"));
  return NULL;
}

static bool
has_key (struct fleece_plan *p, const char *key)
{
  return fleece_plan_drive_by_key (p, key) != NULL;
}

/* device: the name the patched QEMU's devlist takes (drive-<key>, or
 * drive-tpmstate<N>-backup); NULL for drive-<key>. */
static void
add_drive (struct fleece_plan *p, char *key, const char *device,
           const char *qom, const char *node, uint64_t size)
{
  FleeceDrive *d = g_new0 (FleeceDrive, 1);

  d->key = key;
  d->device = device ? g_strdup (device) : g_strdup_printf ("drive-%s", key);
  d->qdev = g_strdup (qom);
  d->root = g_strdup (node);
  d->size = size;
  g_ptr_array_add (p->drives, d);
}

/* Does what the top layer of the image below image's filters has not
 * allocated read as zeroes (sync "top" may skip it)?  query-block nests each node's filtered or
 * backing child as "backing-image": throttle → qcow2 → (backing).  Only a
 * qcow2 image with neither a backing child nor a backing file name
 * qualifies: where it has a backing file its unallocated areas hold the
 * backing file's data, and a backup that skipped them would lose it. */
bool
fleece_image_unallocated_zero (json_object *image)
{
  static const char *const filters[] = { "throttle", "copy-on-read", "preallocate", NULL };

  for (json_object *i = image; i; i = fleece_jobj (i, "backing-image")) {
    const char *fmt = fleece_jstr (i, "format");

    if (fmt && g_strv_contains (filters, fmt))
      continue;
    return g_strcmp0 (fmt, "qcow2") == 0 && !fleece_jobj (i, "backing-image") &&
           !fleece_jstr (i, "backing-filename");
  }
  return false;
}

/* Why a BlockBackend with a medium is not backed up, or NULL if it is. */
static const char *
skip_reason (json_object *b, json_object *ins, const char *qom)
{
  if (g_strcmp0 (qom, PFLASH_CODE) == 0)
    return "firmware code (pflash0): never backed up";
  if (fleece_jbool (b, "removable"))
    return "removable medium (CD-ROM): not backed up";
  if (fleece_jbool (ins, "ro"))
    return "read-only";
  return NULL;
}

static const char *
shown_name (const char *device, const char *qdev, const char *node)
{
  return device && *device ? device : qdev && *qdev ? qdev : node ? node : "?";
}

/* One entry of query-block. */
static bool
read_block (struct fleece_plan *p, json_object *b, GError **err)
{
  json_object *ins = fleece_jobj (b, "inserted");
  const char *device = fleece_jstr (b, "device"), *qdev = fleece_jstr (b, "qdev");
  const char *node = fleece_jstr (ins, "node-name"), *why;
  g_autofree char *qom = qom_device_path (qdev);
  g_autofree char *key = NULL;
  json_object *size = fleece_jobj (fleece_jobj (ins, "image"), "virtual-size");

  if (!ins) {
    fleece_plan_skip (p, shown_name (device, qdev, NULL), "no medium");
    return true;
  }
  if (!qom) {
    if ((key = tpm_backup_key (device)) && !has_key (p, key) && size && node)
      add_drive (p, g_steal_pointer (&key), device, NULL, node,
                 (uint64_t) json_object_get_int64 (size));
    else
      fleece_plan_skip (p, shown_name (device, qdev, node),
                        "not attached to a guest device");
    return true;
  }
  if ((why = skip_reason (b, ins, qom))) {
    fleece_plan_skip (p, shown_name (device, qdev, node), "%s", why);
    return true;
  }
  if (!size || !node) {
    g_set_error (err, FLEECE_ERROR, EPROTO, "query-block gave no size or node "
                 "for %s", shown_name (device, qdev, node));
    return false;
  }
  if (!(key = drive_key (device, node, qom))) {
    fleece_plan_skip (p, shown_name (device, qdev, node), "no drive key: "
                      "neither a drive-<key> node or drive nor a device id");
    return true;
  }
  if (has_key (p, key)) {
    g_set_error (err, FLEECE_ERROR, EPROTO, "two drives of the VM have the key "
                 "%s (%s and another); give their devices distinct ids", key, qom);
    return false;
  }
  add_drive (p, g_steal_pointer (&key), NULL, qom, node,
             (uint64_t) json_object_get_int64 (size));
  return true;
}

/* qemu-server 9's TPM backup drive is a node without a BlockBackend. */
static bool
read_tpm_nodes (FleeceConn *c, struct fleece_plan *p, GError **err)
{
  json_object *args = json_object_new_object ();
  g_autoptr (json_object) nodes = NULL;

  fleece_jset_bool (args, "flat", true);
  if (!(nodes = fleece_conn_execute (c, "query-named-block-nodes", args, err)))
    return false;
  for (size_t i = 0; i < json_object_array_length (nodes); i++) {
    json_object *n = json_object_array_get_idx (nodes, i);
    const char *name = fleece_jstr (n, "node-name");
    json_object *size = fleece_jobj (fleece_jobj (n, "image"), "virtual-size");
    g_autofree char *key = tpm_backup_key (name);

    if (key && size && !has_key (p, key))
      add_drive (p, g_steal_pointer (&key), name, NULL, name,
                 (uint64_t) json_object_get_int64 (size));
  }
  return true;
}

static int
drive_cmp (gconstpointer a, gconstpointer b)
{
  const FleeceDrive *x = *(FleeceDrive *const *) a;
  const FleeceDrive *y = *(FleeceDrive *const *) b;
  return strcmp (x->key, y->key);
}

bool
fleece_drives_read (FleeceConn *c, struct fleece_plan *p, GError **err)
{
  g_autoptr (json_object) blocks = fleece_conn_execute (c, "query-block", NULL, err);

  if (!blocks)
    return false;
  for (size_t i = 0; i < json_object_array_length (blocks); i++)
    if (!read_block (p, json_object_array_get_idx (blocks, i), err))
      return false;
  if (!read_tpm_nodes (c, p, err))
    return false;
  /* Plain string sort, as qemu-server numbers its images. */
  g_ptr_array_sort (p->drives, drive_cmp);
  return true;
}
