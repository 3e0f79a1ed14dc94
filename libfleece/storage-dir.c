/* The built-in directory storage.
 *
 * The directory must be one only the caller's user can change (safefs.c):
 * QEMU opens the images by path and they receive guest data, so nobody
 * else may plant or swap a name in it.  Images are created through a
 * run-tagged name and a hard link (never over an existing file), and are
 * removed only while the name still refers to the inode recorded. */
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "storage.h"

typedef struct {
  char *dir;                   /* absolute, canonical */
  dev_t dev;                   /* the directory's identity, for the record */
  ino_t ino;
} DirStorage;

static DirStorage *
ds (const struct fleece_storage *st)
{
  return st->impl;
}

static uint64_t
dir_min_job_cluster (const struct fleece_storage *st)
{
  /* Files free 4 KiB blocks, qcow2 images 64 KiB clusters: 1 MiB job
   * clusters still discard, and 4 MiB chunks cost QEMU twice the CPU per
   * byte (docs/benchmarks.md). */
  return 1024 * 1024;
}

static char *
dir_pending_name (const struct fleece_storage *st, const char *name,
                  const char *run)
{
  return g_strdup_printf (".%s.%.8s.new", name, run);
}

static bool
dir_check_format (const char *name, const char *format, uint64_t size,
                  GError **err)
{
  const char *suffix;

  if (!fleece_storage_check_name (name, true, "image name", err))
    return false;
  fleece_storage_valid_name (name, true, &suffix);
  if (suffix && strcmp (suffix, format) != 0) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "image name %s does not match its format %s", name, format);
    return false;
  }
  /* qcow2 sizes are whole sectors (qemu-img would silently round up), and
   * the patched QEMU compares sector counts. */
  if (strcmp (format, "qcow2") == 0 && size % 512 != 0) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "cannot create qcow2 image %s of %" PRIu64 " bytes: qcow2 "
                 "sizes must be a multiple of 512 bytes (use raw)", name, size);
    return false;
  }
  return true;
}

static bool
dir_alloc (struct fleece_storage *st, const char *name, const char *format,
           uint64_t size, const char *run, bool may_leave_unformatted,
           FleeceImage *img, GError **err)
{
  bool qcow2 = strcmp (format, "qcow2") == 0;
  g_autofree char *pending = dir_pending_name (st, name, run);
  g_autofree char *path = NULL;

  if (!dir_check_format (name, format, size, err) ||
      !fleece_dir_check_private (ds (st)->dir, "fleecing storage directory", err) ||
      !fleece_file_create (ds (st)->dir, pending, qcow2 ? 0 : size,
                           &img->identity, err))
    return false;
  img->pending = g_steal_pointer (&pending);
  if (!qcow2)
    return true;
  if (may_leave_unformatted) {
    img->unformatted = true;
    return true;
  }
  /* qemu-img rewrites the file in place: the inode stays. */
  path = g_build_filename (ds (st)->dir, img->pending, NULL);
  return fleece_image_format_qcow2 (path, size, err);
}

static bool
dir_publish (struct fleece_storage *st, const char *name, FleeceImage *img,
             GError **err)
{
  if (!fleece_file_publish (ds (st)->dir, img->pending, name, err)) {
    fleece_file_commit (ds (st)->dir, img->pending);
    g_clear_pointer (&img->pending, g_free);
    return false;
  }
  img->volid = g_strdup (name);
  return true;
}

static void
dir_commit (struct fleece_storage *st, FleeceImage *img)
{
  if (img->pending)
    fleece_file_commit (ds (st)->dir, img->pending);
  g_clear_pointer (&img->pending, g_free);
}

static int
dir_remove (struct fleece_storage *st, json_object *entry, const char *run,
            GError **err)
{
  const char *volid = fleece_jstr (entry, "volid");
  const char *image = fleece_jstr (entry, "image");
  const char *pending = fleece_jstr (entry, "pending");
  const char *name = volid ? volid : image;
  g_autofree char *ours = NULL;
  int r;

  /* Names from the record are checked like names from the plan, and the
   * pending name must be the one this run would use: a tampered record
   * names nothing else in the directory. */
  if (!fleece_storage_check_name (name, true, "image name", err))
    return -1;
  ours = dir_pending_name (st, name, run ? run : "");
  if (pending && (!run || strcmp (pending, ours) != 0)) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "the record's pending name '%s' of "
                 "%s is not the run's (%s): not touching it", pending, name, ours);
    return -1;
  }
  r = fleece_file_remove (ds (st)->dir, name, pending,
                          fleece_jobj (entry, "identity"), err);
  if (r == 1)
    g_set_error (err, FLEECE_ERROR, EEXIST,
                 "%s/%s is not the file the run created (another file has "
                 "that name now): left in place", ds (st)->dir, name);
  return r;
}

static json_object *
dir_blockdev (struct fleece_storage *st, const char *volid, const char *node,
              GError **err)
{
  g_autofree char *path = NULL;
  json_object *o;

  if (!fleece_storage_check_name (volid, true, "volume id", err))
    return NULL;
  path = g_build_filename (ds (st)->dir, volid, NULL);
  o = json_object_new_object ();
  fleece_jset_str (o, "driver", "file");
  fleece_jset_str (o, "filename", path);
  fleece_jset_str (o, "node-name", node);
  return o;
}

static char *
dir_path (struct fleece_storage *st, const char *volid, GError **err)
{
  if (!fleece_storage_check_name (volid, true, "volume id", err))
    return NULL;
  return g_build_filename (ds (st)->dir, volid, NULL);
}

static json_object *
dir_describe (const struct fleece_storage *st)
{
  json_object *o = json_object_new_object ();

  fleece_jset_str (o, "type", "dir");
  fleece_jset_str (o, "dir", ds (st)->dir);
  fleece_jset_int (o, "dev", (int64_t) ds (st)->dev);
  fleece_jset_int (o, "ino", (int64_t) ds (st)->ino);
  return o;
}

/* The same directory: the same path and the same inode (a path alone
 * could have been replaced since). */
static bool
dir_matches (const struct fleece_storage *st, json_object *desc)
{
  return g_strcmp0 (fleece_jstr (desc, "type"), "dir") == 0 &&
         g_strcmp0 (fleece_jstr (desc, "dir"), ds (st)->dir) == 0 &&
         (uint64_t) fleece_jint (desc, "dev") == (uint64_t) ds (st)->dev &&
         (uint64_t) fleece_jint (desc, "ino") == (uint64_t) ds (st)->ino;
}

static void
dir_free (struct fleece_storage *st)
{
  g_free (ds (st)->dir);
  g_free (ds (st));
}

static const FleeceStorageOps dir_ops = {
  .type = "dir",
  .min_job_cluster = dir_min_job_cluster,
  .pending_name = dir_pending_name,
  .alloc = dir_alloc,
  .publish = dir_publish,
  .commit = dir_commit,
  .remove = dir_remove,
  .blockdev = dir_blockdev,
  .path = dir_path,
  .describe = dir_describe,
  .matches = dir_matches,
  .free = dir_free,
};

struct fleece_storage *
fleece_storage_dir_new (const char *dir, GError **err)
{
  g_autofree char *canon = NULL;
  struct fleece_storage *st;
  struct stat sb;

  if (!dir || !*dir) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "the directory is empty");
    return NULL;
  }
  /* Relative paths would be resolved against whatever the current
   * directory is when QEMU opens the image or a later cleanup runs. */
  if (!g_path_is_absolute (dir)) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "directory %s is not an absolute path", dir);
    return NULL;
  }
  canon = g_canonicalize_filename (dir, NULL);
  if (!fleece_dir_check_private (canon, "fleecing storage directory", err) ||
      stat (canon, &sb) != 0)
    return NULL;
  st = g_new0 (struct fleece_storage, 1);
  st->ops = &dir_ops;
  st->flags = FLEECE_STORAGE_QCOW2 | FLEECE_STORAGE_DISCARD | FLEECE_STORAGE_PATH;
  st->impl = g_new0 (DirStorage, 1);
  ds (st)->dir = g_steal_pointer (&canon);
  ds (st)->dev = sb.st_dev;
  ds (st)->ino = sb.st_ino;
  return st;
}
