/* Storage for fleecing images: the public constructors, the caller's
 * callback storage, and the one interface the rest of the library uses
 * (storage.h). */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "storage.h"

#define STORAGE_KNOWN_FLAGS \
  (FLEECE_STORAGE_QCOW2 | FLEECE_STORAGE_DISCARD | FLEECE_STORAGE_PATH)
/* A caller's storage may allocate in units the library cannot know (RBD
 * objects are 4 MiB by default): discard must cover them. */
#define CALLBACK_JOB_CLUSTER (4u * 1024 * 1024)
#define STORAGE_ID_MAX 256

/* ---- names ---------------------------------------------------------- */

static const char *
skip_digits (const char *p)
{
  const char *start = p;

  while (*p >= '0' && *p <= '9')
    p++;
  return p > start ? p : NULL;
}

/* Parsed by hand rather than with GRegex: PCRE's "$" also matches before a
 * trailing newline, which would let "vm-1-fleece-0.raw\n" through.  Every
 * accepted byte is from [a-z0-9.-] and there is no '/', so the name is one
 * path component and cannot be "." or "..". */
bool
fleece_storage_valid_name (const char *name, bool with_suffix,
                           const char **suffix)
{
  const char *p = name;

  *suffix = NULL;
  if (!name || strlen (name) > NAME_MAX || !g_str_has_prefix (p, "vm-"))
    return false;
  if (!(p = skip_digits (p + strlen ("vm-"))) || !g_str_has_prefix (p, "-fleece-"))
    return false;
  if (!(p = skip_digits (p + strlen ("-fleece-"))))
    return false;
  if (*p == '\0')
    return true;
  if (!with_suffix)
    return false;
  if (strcmp (p, ".raw") == 0)
    *suffix = "raw";
  else if (strcmp (p, ".qcow2") == 0)
    *suffix = "qcow2";
  return *suffix != NULL;
}

bool
fleece_storage_check_name (const char *name, bool with_suffix,
                           const char *what, GError **err)
{
  const char *suffix;
  g_autofree char *shown = NULL;

  if (fleece_storage_valid_name (name, with_suffix, &suffix))
    return true;
  shown = name ? g_strescape (name, NULL) : g_strdup ("(null)");
  g_set_error (err, FLEECE_ERROR, EINVAL,
               "invalid %s \"%s\": expected vm-<vmid>-fleece-<n>%s", what,
               shown, with_suffix ? " with an optional .raw or .qcow2 suffix" : "");
  return false;
}

/* ---- the caller's callbacks ------------------------------------------- */

typedef struct {
  char *id;
  fleece_storage_alloc_fn alloc;
  fleece_storage_remove_fn remove;
  fleece_storage_path_fn path;
  fleece_storage_blockdev_fn blockdev;
  void *user_data;
  fleece_free_fn free_fn;
} CbStorage;

static CbStorage *
cbs (const struct fleece_storage *st)
{
  return st->impl;
}

static bool
cb_check_complete (const struct fleece_storage *st, GError **err)
{
  const CbStorage *c = cbs (st);

  if (c->alloc && c->remove && (c->path || c->blockdev))
    return true;
  g_set_error (err, FLEECE_ERROR, EINVAL,
               "storage %s lacks callbacks: alloc, remove and path or "
               "blockdev are required (missing:%s%s%s)", c->id,
               c->alloc ? "" : " alloc", c->remove ? "" : " remove",
               c->path || c->blockdev ? "" : " path/blockdev");
  return false;
}

static uint64_t
cb_min_job_cluster (const struct fleece_storage *st)
{
  return CALLBACK_JOB_CLUSTER;
}

static bool
cb_alloc (struct fleece_storage *st, const char *name, const char *format,
          uint64_t size, const char *run, bool may_leave_unformatted,
          FleeceImage *img, GError **err)
{
  char *volid = NULL, *reason = NULL;
  int rc, e;

  errno = 0;
  rc = cbs (st)->alloc (cbs (st)->user_data, name, format, size, &volid, &reason);
  e = errno;
  if (rc != 0) {
    free (volid);
    fleece_error_from_callback (err, e, reason, "the storage %s could not "
                                "allocate image %s (%s, %" PRIu64 " bytes)",
                                cbs (st)->id, name, format, size);
    return false;
  }
  free (reason);
  if (!volid || !*volid) {
    free (volid);
    g_set_error (err, FLEECE_ERROR, EIO, "the storage %s returned success "
                 "but no volume id for image %s", cbs (st)->id, name);
    return false;
  }
  img->volid = g_strdup (volid);
  /* The caller's storage vouches for its volids: the one it returned in
   * this run is the proof. */
  img->identity = json_object_new_string (volid);
  free (volid);
  return true;
}

static int
cb_remove (struct fleece_storage *st, json_object *entry, const char *run,
           GError **err)
{
  const char *volid = fleece_jstr (entry, "volid");
  char *reason = NULL;
  int rc, e;

  /* Without a volid the alloc callback never returned: nothing of ours is
   * known (fleece_get_status() shows the planned name). */
  if (!volid || g_strcmp0 (json_object_get_string (fleece_jobj (entry, "identity")), volid) != 0)
    return 0;
  errno = 0;
  rc = cbs (st)->remove (cbs (st)->user_data, volid, &reason);
  e = errno;
  if (rc != 0) {
    fleece_error_from_callback (err, e, reason, "the storage %s could not "
                                "free volume %s", cbs (st)->id, volid);
    return -1;
  }
  free (reason);
  return 0;
}

static char *
cb_path (struct fleece_storage *st, const char *volid, GError **err)
{
  char *reason = NULL, *out, *ret;
  int e;

  if (!cbs (st)->path) {
    g_set_error (err, FLEECE_ERROR, ENOTSUP, "the storage %s gives QEMU "
                 "blockdev definitions, not paths", cbs (st)->id);
    return NULL;
  }
  errno = 0;
  out = cbs (st)->path (cbs (st)->user_data, volid, &reason);
  e = errno;
  if (!out || !*out) {
    free (out);
    fleece_error_from_callback (err, e, reason ? reason : out ? g_strdup ("it "
                                "returned an empty path") : NULL,
                                "the storage %s has no path for volume %s",
                                cbs (st)->id, volid);
    return NULL;
  }
  free (reason);
  ret = g_strdup (out);
  free (out);
  return ret;
}

/* The caller's JSON object, or a file/host_device node of its path. */
static json_object *
cb_blockdev (struct fleece_storage *st, const char *volid, const char *node,
             GError **err)
{
  g_autofree char *path = NULL;
  char *reason = NULL, *out;
  json_object *o;
  int e;

  if (!cbs (st)->blockdev) {
    if (!(path = cb_path (st, volid, err)))
      return NULL;
    if (!g_path_is_absolute (path)) {
      g_set_error (err, FLEECE_ERROR, ENOTSUP, "the storage %s gave '%s' for "
                   "volume %s, which is not a local file or block device; give "
                   "QEMU a blockdev definition instead (blockdev callback)",
                   cbs (st)->id, path, volid);
      return NULL;
    }
    o = json_object_new_object ();
    fleece_jset_str (o, "driver", g_file_test (path, G_FILE_TEST_IS_REGULAR)
                                  ? "file" : "host_device");
    fleece_jset_str (o, "filename", path);
    fleece_jset_str (o, "node-name", node);
    return o;
  }
  errno = 0;
  out = cbs (st)->blockdev (cbs (st)->user_data, volid, &reason);
  e = errno;
  o = out ? json_tokener_parse (out) : NULL;
  if (!o || !json_object_is_type (o, json_type_object) || !fleece_jobj (o, "driver") ||
      !json_object_is_type (fleece_jobj (o, "driver"), json_type_string)) {
    if (o)
      json_object_put (o);
    fleece_error_from_callback (err, out ? EINVAL : e, out ? g_strdup_printf (
                                "it is not a JSON object with a \"driver\" string: %s",
                                out) : reason, "the storage %s has no QEMU "
                                "blockdev definition for volume %s",
                                cbs (st)->id, volid);
    if (out)
      free (reason);
    free (out);
    return NULL;
  }
  free (out);
  free (reason);
  /* Our node name, and discard passed down so the backup's discard-source
   * frees space in the storage. */
  fleece_jset_str (o, "node-name", node);
  fleece_jset_str (o, "discard", "unmap");
  return o;
}

static json_object *
cb_describe (const struct fleece_storage *st)
{
  json_object *o = json_object_new_object ();

  fleece_jset_str (o, "type", "callback");
  fleece_jset_str (o, "id", cbs (st)->id);
  fleece_jset_int (o, "flags", st->flags);
  return o;
}

static bool
cb_matches (const struct fleece_storage *st, json_object *desc)
{
  return g_strcmp0 (fleece_jstr (desc, "type"), "callback") == 0 &&
         g_strcmp0 (fleece_jstr (desc, "id"), cbs (st)->id) == 0;
}

static void
cb_free (struct fleece_storage *st)
{
  if (cbs (st)->free_fn)
    cbs (st)->free_fn (cbs (st)->user_data);
  g_free (cbs (st)->id);
  g_free (cbs (st));
}

static const FleeceStorageOps cb_ops = {
  .type = "callback",
  .check_complete = cb_check_complete,
  .min_job_cluster = cb_min_job_cluster,
  .alloc = cb_alloc,
  .remove = cb_remove,
  .blockdev = cb_blockdev,
  .path = cb_path,
  .describe = cb_describe,
  .matches = cb_matches,
  .free = cb_free,
};

/* ---- public API --------------------------------------------------------- */

FLEECE_API struct fleece_storage *
fleece_storage_new_dir (const char *dir)
{
  g_autoptr (GError) err = NULL;
  struct fleece_storage *st = fleece_storage_dir_new (dir, &err);

  if (!st)
    fleece_error_set_gerror (__func__, err);
  return st;
}

FLEECE_API struct fleece_storage *
fleece_storage_new_rbd (const char *pool, const char *ns)
{
  g_autoptr (GError) err = NULL;
  struct fleece_storage *st = fleece_storage_rbd_new (pool, ns, &err);

  if (!st)
    fleece_error_set_gerror (__func__, err);
  return st;
}

static bool
valid_storage_id (const char *id)
{
  size_t n = id ? strlen (id) : 0;

  if (n == 0 || n > STORAGE_ID_MAX)
    return false;
  for (size_t i = 0; i < n; i++)
    if (!g_ascii_isprint (id[i]))
      return false;
  return true;
}

/* On failure user_data stays the caller's: free_fn is not called, since no
 * object took it. */
FLEECE_API struct fleece_storage *
fleece_storage_new_callback (const char *id, unsigned flags, void *user_data,
                             fleece_free_fn free_fn)
{
  struct fleece_storage *st;
  CbStorage *c;

  if (!valid_storage_id (id)) {
    fleece_error_set (__func__, EINVAL, "the storage id must be 1 to %d "
                      "printable characters (e.g. \"pve:local-lvm\")",
                      STORAGE_ID_MAX);
    return NULL;
  }
  if (flags & ~STORAGE_KNOWN_FLAGS) {
    fleece_error_set (__func__, EINVAL, "unknown flags 0x%x",
                      flags & ~STORAGE_KNOWN_FLAGS);
    return NULL;
  }
  st = g_new0 (struct fleece_storage, 1);
  st->ops = &cb_ops;
  st->flags = flags;
  st->impl = c = g_new0 (CbStorage, 1);
  c->id = g_strdup (id);
  c->user_data = user_data;
  c->free_fn = free_fn;
  return st;
}

static CbStorage *
callback_storage (struct fleece_storage *st, const char *func)
{
  if (!st || st->ops != &cb_ops) {
    fleece_error_set (func, EINVAL, "%s", st ? "not a callback storage "
                      "(made by fleece_storage_new_callback())"
                      : "storage is NULL");
    return NULL;
  }
  if (st->taken) {
    fleece_error_set (func, EBUSY, "the storage belongs to a handle now");
    return NULL;
  }
  return cbs (st);
}

FLEECE_API int
fleece_storage_set_alloc_callback (struct fleece_storage *st,
                                   fleece_storage_alloc_fn fn)
{
  CbStorage *c = callback_storage (st, __func__);
  return c ? (c->alloc = fn, 0) : -1;
}

FLEECE_API int
fleece_storage_set_remove_callback (struct fleece_storage *st,
                                    fleece_storage_remove_fn fn)
{
  CbStorage *c = callback_storage (st, __func__);
  return c ? (c->remove = fn, 0) : -1;
}

FLEECE_API int
fleece_storage_set_path_callback (struct fleece_storage *st,
                                  fleece_storage_path_fn fn)
{
  CbStorage *c = callback_storage (st, __func__);
  return c ? (c->path = fn, 0) : -1;
}

FLEECE_API int
fleece_storage_set_blockdev_callback (struct fleece_storage *st,
                                      fleece_storage_blockdev_fn fn)
{
  CbStorage *c = callback_storage (st, __func__);
  return c ? (c->blockdev = fn, 0) : -1;
}

FLEECE_API int
fleece_storage_set_option (struct fleece_storage *st, const char *key,
                           const char *value)
{
  g_autoptr (GError) err = NULL;

  if (!st || !key) {
    fleece_error_set (__func__, EINVAL, "%s is NULL", st ? "key" : "storage");
    return -1;
  }
  if (st->taken) {
    fleece_error_set (__func__, EBUSY, "the storage belongs to a handle now");
    return -1;
  }
  if (!st->ops->set_option) {
    fleece_error_set (__func__, EINVAL, "the %s storage has no options (not "
                      "even '%s')", st->ops->type, key);
    return -1;
  }
  if (!st->ops->set_option (st, key, value, &err)) {
    fleece_error_set_gerror (__func__, err);
    return -1;
  }
  return 0;
}

FLEECE_API void
fleece_storage_free (struct fleece_storage *st)
{
  if (!st)
    return;
  st->ops->free (st);
  g_free (st);
}

/* ---- the internal interface ------------------------------------------ */

void
fleece_image_clear (FleeceImage *img)
{
  g_clear_pointer (&img->volid, g_free);
  g_clear_pointer (&img->identity, json_object_put);
  g_clear_pointer (&img->pending, g_free);
  img->unformatted = false;
}

const char *
fleece_storage_type (const struct fleece_storage *st)
{
  return st ? st->ops->type : NULL;
}

bool
fleece_storage_is_callers (const struct fleece_storage *st)
{
  return st && st->ops == &cb_ops;
}

unsigned
fleece_storage_flags (const struct fleece_storage *st)
{
  return st ? st->flags : 0;
}

uint64_t
fleece_storage_min_job_cluster (const struct fleece_storage *st)
{
  return st ? st->ops->min_job_cluster (st) : CALLBACK_JOB_CLUSTER;
}

bool
fleece_storage_check_complete (const struct fleece_storage *st, GError **err)
{
  return !st->ops->check_complete || st->ops->check_complete (st, err);
}

char *
fleece_storage_pending_name (const struct fleece_storage *st, const char *name,
                             const char *run)
{
  return st->ops->pending_name ? st->ops->pending_name (st, name, run) : NULL;
}

bool
fleece_storage_alloc (struct fleece_storage *st, const char *name,
                      const char *format, uint64_t size, const char *run,
                      bool may_leave_unformatted, FleeceImage *img,
                      GError **err)
{
  if (strcmp (format, "qcow2") == 0 && !(st->flags & FLEECE_STORAGE_QCOW2)) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "image %s: the storage cannot hold qcow2 images", name);
    return false;
  }
  return st->ops->alloc (st, name, format, size, run, may_leave_unformatted,
                         img, err);
}

bool
fleece_storage_publish (struct fleece_storage *st, const char *name,
                        FleeceImage *img, GError **err)
{
  if (!st->ops->publish) {
    if (!img->volid)
      img->volid = g_strdup (name);
    return true;
  }
  return st->ops->publish (st, name, img, err);
}

void
fleece_storage_commit (struct fleece_storage *st, FleeceImage *img)
{
  if (st->ops->commit)
    st->ops->commit (st, img);
}

int
fleece_storage_remove (struct fleece_storage *st, json_object *entry,
                       const char *run, GError **err)
{
  return st->ops->remove (st, entry, run, err);
}

json_object *
fleece_storage_blockdev (struct fleece_storage *st, const char *volid,
                         const char *node, GError **err)
{
  return st->ops->blockdev (st, volid, node, err);
}

json_object *
fleece_storage_qemu_objects (struct fleece_storage *st, const char *prefix,
                             GError **err)
{
  return st->ops->qemu_objects ? st->ops->qemu_objects (st, prefix, err) : NULL;
}

char *
fleece_storage_path (struct fleece_storage *st, const char *volid, GError **err)
{
  if (!st->ops->path) {
    g_set_error (err, FLEECE_ERROR, ENOTSUP, "the %s storage has no local "
                 "paths", st->ops->type);
    return NULL;
  }
  return st->ops->path (st, volid, err);
}

json_object *
fleece_storage_describe (const struct fleece_storage *st)
{
  return st->ops->describe (st);
}

bool
fleece_storage_matches (const struct fleece_storage *st, json_object *desc)
{
  return st && desc && st->ops->matches (st, desc);
}

char *
fleece_storage_desc_name (json_object *desc)
{
  const char *type = fleece_jstr (desc, "type");

  if (g_strcmp0 (type, "dir") == 0)
    return g_strdup_printf ("directory %s", fleece_jstr (desc, "dir"));
  if (g_strcmp0 (type, "rbd") == 0)
    return g_strdup_printf ("RBD pool %s%s%s", fleece_jstr (desc, "pool"),
                            fleece_jstr (desc, "namespace") ? "/" : "",
                            fleece_jstr (desc, "namespace") ? fleece_jstr (desc, "namespace") : "");
  if (g_strcmp0 (type, "callback") == 0)
    return g_strdup_printf ("the caller's storage \"%s\"", fleece_jstr (desc, "id"));
  return g_strdup ("an unknown storage");
}
