/* The built-in Ceph RBD storage (storage.h), over rbd.c.
 *
 * Images are raw, named vm-<vmid>-fleece-<n> (no suffix: RBD is not a
 * path storage, as Proxmox names them), made at exactly the drive's size
 * under a run-tagged pending name (vm-100-fleece-0.<run>), whose image id
 * is recorded before the image is renamed to its real name (a rename
 * fails rather than replace an image).  They are removed by name only
 * while the name still refers to the recorded id: an image of the same
 * name that is not the run's (Proxmox's own, a re-created one) is never
 * touched.  QEMU reaches them with its rbd driver; a key QEMU needs goes
 * in as a secret object.  Built without librbd, the constructor says so. */
#include <errno.h>
#include <string.h>

#include "storage.h"

#ifndef FLEECE_HAVE_RBD

struct fleece_storage *
fleece_storage_rbd_new (const char *pool, const char *ns, GError **err)
{
  g_set_error (err, FLEECE_ERROR, ENOTSUP,
               "this libfleece was built without librbd, so it has no RBD "
               "storage; rebuild it with librbd-dev and librados-dev "
               "installed (meson option rbd=enabled)");
  return NULL;
}

#else

#include "rbd.h"

typedef struct {
  FleeceRbd *rbd;
  char *secret_id;          /* the QEMU secret blockdevs name, once made */
} RbdStorage;

static RbdStorage *
rs_ (const struct fleece_storage *st)
{
  return st->impl;
}

static bool
rbd_set_option (struct fleece_storage *st, const char *key, const char *value,
                GError **err)
{
  return fleece_rbd_set_option (rs_ (st)->rbd, key, value, err);
}

/* Discards free whole RADOS objects only: the job's cluster covers one. */
static uint64_t
rbd_min_job_cluster (const struct fleece_storage *st)
{
  return fleece_rbd_object_size (rs_ (st)->rbd);
}

static char *
rbd_pending_name (const struct fleece_storage *st, const char *name,
                  const char *run)
{
  return g_strdup_printf ("%s.%.8s", name, run);
}

static bool
rbd_alloc (struct fleece_storage *st, const char *name, const char *format,
           uint64_t size, const char *run, bool may_leave_unformatted,
           FleeceImage *img, GError **err)
{
  g_autofree char *pending = rbd_pending_name (st, name, run);
  g_autofree char *id = NULL;

  if (!fleece_storage_check_name (name, false, "RBD image name", err))
    return false;
  if (strcmp (format, "raw") != 0) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "RBD image %s: the RBD storage "
                 "holds raw images only", name);
    return false;
  }
  if (!fleece_rbd_create (rs_ (st)->rbd, pending, size, &id, err))
    return false;
  img->identity = json_object_new_object ();
  fleece_jset_str (img->identity, "rbd-id", id);
  img->pending = g_steal_pointer (&pending);
  return true;
}

static bool
rbd_publish (struct fleece_storage *st, const char *name, FleeceImage *img,
             GError **err)
{
  const char *id = fleece_jstr (img->identity, "rbd-id");

  if (!fleece_rbd_rename (rs_ (st)->rbd, img->pending, name, id, err)) {
    g_autoptr (GError) rerr = NULL;
    if (!fleece_rbd_remove (rs_ (st)->rbd, img->pending, id, &rerr))
      g_prefix_error (err, "(and the new image %s stays: %s) ", img->pending,
                      rerr->message);
    return false;
  }
  img->volid = g_strdup (name);
  g_clear_pointer (&img->pending, g_free);
  return true;
}

/* Remove name if it is image id: 0 gone (or never there), 1 another
 * image has the name (kept), -1 error. */
static int
remove_if_ours (RbdStorage *r, const char *name, const char *id, GError **err)
{
  g_autoptr (GError) e = NULL;

  if (fleece_rbd_remove (r->rbd, name, id, &e))
    return 0;
  if (g_error_matches (e, FLEECE_ERROR, EPERM)) {
    g_propagate_error (err, g_steal_pointer (&e));
    return 1;
  }
  g_propagate_error (err, g_steal_pointer (&e));
  return -1;
}

static int
rbd_remove (struct fleece_storage *st, json_object *entry, const char *run,
            GError **err)
{
  const char *volid = fleece_jstr (entry, "volid");
  const char *name = volid ? volid : fleece_jstr (entry, "image");
  const char *pending = fleece_jstr (entry, "pending");
  const char *id = fleece_jstr (fleece_jobj (entry, "identity"), "rbd-id");
  g_autofree char *ours = NULL;
  g_autofree char *pending_id = NULL;
  int r;

  /* Names from the record are checked like the plan's. */
  if (!fleece_storage_check_name (name, false, "RBD image name", err))
    return -1;
  ours = rbd_pending_name (st, name, run ? run : "");
  if (pending && (!run || strcmp (pending, ours) != 0)) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "the record's pending name '%s' of "
                 "%s is not the run's (%s): not touching it", pending, name, ours);
    return -1;
  }
  /* No id recorded: only an image under the run-tagged name can be the
   * run's (a crash between creating it and recording its id). */
  if (!id) {
    if (!pending || !(pending_id = fleece_rbd_image_id (rs_ (st)->rbd, pending, NULL)))
      return 0;
    return remove_if_ours (rs_ (st), pending, pending_id, err);
  }
  if (pending && (r = remove_if_ours (rs_ (st), pending, id, err)) != 0)
    return r;
  return remove_if_ours (rs_ (st), name, id, err);
}

static json_object *
rbd_blockdev (struct fleece_storage *st, const char *volid, const char *node,
              GError **err)
{
  if (!fleece_storage_check_name (volid, false, "volume id", err))
    return NULL;
  return fleece_rbd_blockdev (rs_ (st)->rbd, volid, node, rs_ (st)->secret_id);
}

/* The secret QEMU needs for the key (none with a conf QEMU reads itself):
 * one per run, named after prefix; later blockdevs name it. */
static json_object *
rbd_qemu_objects (struct fleece_storage *st, const char *prefix, GError **err)
{
  g_autofree char *id = g_strdup_printf ("%s-rbd-key", prefix);
  json_object *obj = fleece_rbd_secret_object (rs_ (st)->rbd, id, err);
  json_object *list;

  if (!obj)
    return NULL;
  g_free (rs_ (st)->secret_id);
  rs_ (st)->secret_id = g_steal_pointer (&id);
  list = json_object_new_array ();
  json_object_array_add (list, obj);
  return list;
}

static char *
rbd_path (struct fleece_storage *st, const char *volid, GError **err)
{
  g_set_error (err, FLEECE_ERROR, ENOTSUP, "RBD image %s has no local path: "
               "QEMU reaches it with its rbd driver (patched QEMUs before "
               "10.0, which attach fleecing images by drive_add, are not "
               "supported with the RBD storage)", volid);
  return NULL;
}

static json_object *
rbd_describe (const struct fleece_storage *st)
{
  return fleece_rbd_describe (rs_ (st)->rbd);
}

static bool
rbd_matches (const struct fleece_storage *st, json_object *desc)
{
  return g_strcmp0 (fleece_jstr (desc, "type"), "rbd") == 0 &&
         fleece_rbd_same (rs_ (st)->rbd, desc);
}

static void
rbd_free (struct fleece_storage *st)
{
  fleece_rbd_free (rs_ (st)->rbd);
  g_free (rs_ (st)->secret_id);
  g_free (rs_ (st));
}

static const FleeceStorageOps rbd_ops = {
  .type = "rbd",
  .set_option = rbd_set_option,
  .min_job_cluster = rbd_min_job_cluster,
  .pending_name = rbd_pending_name,
  .alloc = rbd_alloc,
  .publish = rbd_publish,
  .remove = rbd_remove,
  .blockdev = rbd_blockdev,
  .qemu_objects = rbd_qemu_objects,
  .path = rbd_path,
  .describe = rbd_describe,
  .matches = rbd_matches,
  .free = rbd_free,
};

struct fleece_storage *
fleece_storage_rbd_new (const char *pool, const char *ns, GError **err)
{
  FleeceRbd *rbd = fleece_rbd_new (pool, ns, err);
  struct fleece_storage *st;

  if (!rbd)
    return NULL;
  st = g_new0 (struct fleece_storage, 1);
  st->ops = &rbd_ops;
  st->flags = FLEECE_STORAGE_DISCARD;
  st->impl = g_new0 (RbdStorage, 1);
  rs_ (st)->rbd = rbd;
  return st;
}

#endif
