/* Storage for fleecing images: the built-in directory storage and the
 * caller's callbacks behind one interface.
 *
 * Image names come from the plan, but volids also come back from the
 * durable record, which is a file anyone with access to the state dir can
 * edit; so the directory storage validates every name and volid it is given
 * and never builds a path outside its directory. */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "internal.h"

typedef enum {
  STORAGE_DIR,
  STORAGE_CALLBACK,
} StorageType;

struct fleece_storage {
  StorageType type;
  unsigned flags;

  /* STORAGE_DIR */
  char *dir;                    /* absolute, canonical (no trailing '/') */

  /* STORAGE_CALLBACK */
  fleece_storage_alloc_fn alloc;
  fleece_storage_free_fn free_image;
  fleece_storage_path_fn path;
  void *opaque;
  fleece_free_fn free_opaque;
};

#define STORAGE_KNOWN_FLAGS \
  (FLEECE_STORAGE_QCOW2 | FLEECE_STORAGE_DISCARD | FLEECE_STORAGE_PATH)

/* ---- names ---------------------------------------------------------- */

static const char *
skip_digits (const char *p)
{
  const char *start = p;

  while (*p >= '0' && *p <= '9')
    p++;
  return p > start ? p : NULL;
}

/* Whether name is vm-<digits>-fleece-<digits>(.raw|.qcow2)?, exactly.
 * Parsed by hand rather than with GRegex: PCRE's "$" also matches before a
 * trailing newline, which would let "vm-1-fleece-0.raw\n" through.  Every
 * accepted byte is from [a-z0-9.-] and there is no '/', so the name is one
 * path component and cannot be "." or "..".  *suffix is set to the format
 * the name carries, or NULL. */
static bool
valid_image_name (const char *name, const char **suffix)
{
  const char *p = name;

  *suffix = NULL;
  if (!name || strlen (name) > NAME_MAX)
    return false;
  if (!g_str_has_prefix (p, "vm-"))
    return false;
  if (!(p = skip_digits (p + strlen ("vm-"))))
    return false;
  if (!g_str_has_prefix (p, "-fleece-"))
    return false;
  if (!(p = skip_digits (p + strlen ("-fleece-"))))
    return false;
  if (*p == '\0')
    return true;
  if (strcmp (p, ".raw") == 0) {
    *suffix = "raw";
    return true;
  }
  if (strcmp (p, ".qcow2") == 0) {
    *suffix = "qcow2";
    return true;
  }
  return false;
}

static bool
check_image_name (const char *name, const char *what, GError **err)
{
  const char *suffix;
  g_autofree char *shown = NULL;

  if (valid_image_name (name, &suffix))
    return true;
  shown = name ? g_strescape (name, NULL) : g_strdup ("(null)");
  g_set_error (err, FLEECE_ERROR, EINVAL,
               "invalid %s \"%s\": expected vm-<vmid>-fleece-<n> with an "
               "optional .raw or .qcow2 suffix", what, shown);
  return false;
}

/* ---- construction ----------------------------------------------------- */

static struct fleece_storage *
storage_new_dir (const char *dir, GError **err)
{
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
  if (stat (dir, &sb) != 0) {
    int e = errno;
    g_set_error (err, FLEECE_ERROR, e, "directory %s: %s", dir,
                 g_strerror (e));
    return NULL;
  }
  if (!S_ISDIR (sb.st_mode)) {
    g_set_error (err, FLEECE_ERROR, ENOTDIR, "%s is not a directory", dir);
    return NULL;
  }

  st = g_new0 (struct fleece_storage, 1);
  st->type = STORAGE_DIR;
  st->flags = FLEECE_STORAGE_QCOW2 | FLEECE_STORAGE_DISCARD |
              FLEECE_STORAGE_PATH;
  st->dir = g_canonicalize_filename (dir, NULL);
  return st;
}

FLEECE_API struct fleece_storage *
fleece_storage_new_dir (const char *dir)
{
  g_autoptr (GError) err = NULL;
  struct fleece_storage *st = storage_new_dir (dir, &err);

  if (!st)
    fleece_error_set_gerror (__func__, err);
  return st;
}

/* On failure opaque stays the caller's: free_opaque is not called, since no
 * object took it. */
FLEECE_API struct fleece_storage *
fleece_storage_new_callback (unsigned flags,
                             fleece_storage_alloc_fn alloc,
                             fleece_storage_free_fn free_image,
                             fleece_storage_path_fn path,
                             void *opaque, fleece_free_fn free_opaque)
{
  struct fleece_storage *st;

  if (flags & ~STORAGE_KNOWN_FLAGS) {
    fleece_error_set (__func__, EINVAL, "unknown flags 0x%x",
                      flags & ~STORAGE_KNOWN_FLAGS);
    return NULL;
  }
  if (!alloc || !free_image || !path) {
    fleece_error_set (__func__, EINVAL,
                      "the alloc, free and path callbacks are all required "
                      "(missing:%s%s%s)", alloc ? "" : " alloc",
                      free_image ? "" : " free", path ? "" : " path");
    return NULL;
  }

  st = g_new0 (struct fleece_storage, 1);
  st->type = STORAGE_CALLBACK;
  st->flags = flags;
  st->alloc = alloc;
  st->free_image = free_image;
  st->path = path;
  st->opaque = opaque;
  st->free_opaque = free_opaque;
  return st;
}

FLEECE_API void
fleece_storage_free (struct fleece_storage *st)
{
  if (!st)
    return;
  if (st->free_opaque)
    st->free_opaque (st->opaque);
  g_free (st->dir);
  g_free (st);
}

unsigned
fleece_storage_flags (const struct fleece_storage *st)
{
  return st ? st->flags : 0;
}

/* The directory storage frees file blocks (raw) or 64 KiB clusters
 * (qcow2), so 1 MiB job clusters still discard; a caller's storage may
 * allocate in units the library cannot know (RBD objects: 4 MiB). */
uint64_t
fleece_storage_min_job_cluster (const struct fleece_storage *st,
                                uint64_t fallback)
{
  return st && st->type == STORAGE_DIR ? 1024 * 1024 : fallback;
}

static bool
storage_check (const struct fleece_storage *st, GError **err)
{
  if (!st) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "no storage for fleecing images is set "
                 "(use fleece_set_storage())");
    return false;
  }
  return true;
}

/* ---- directory storage ---------------------------------------------- */

static bool
dir_alloc (struct fleece_storage *st, const char *name, const char *format,
           uint64_t size, char **volid, bool *unformatted, GError **err)
{
  g_autofree char *path = NULL;
  const char *suffix;
  bool qcow2 = strcmp (format, "qcow2") == 0;

  if (!check_image_name (name, "image name", err))
    return false;
  valid_image_name (name, &suffix);
  if (suffix && strcmp (suffix, format) != 0) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "image name %s does not match its format %s", name, format);
    return false;
  }
  /* qcow2 sizes are whole sectors (qemu-img would silently round up), and
   * the patched QEMU compares sector counts, so an unaligned size would
   * surface later as a confusing mismatch.  Drive sizes in Proxmox are
   * sector multiples. */
  if (qcow2 && size % 512 != 0) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "cannot create qcow2 image %s of %" PRIu64 " bytes: qcow2 "
                 "sizes must be a multiple of 512 bytes (use raw)", name, size);
    return false;
  }

  path = g_build_filename (st->dir, name, NULL);
  if (!fleece_image_create_file (path, qcow2 ? 0 : size, err))
    return false;
  if (qcow2 && unformatted)
    *unformatted = true;
  else if (qcow2 && !fleece_image_format_qcow2 (path, size, err)) {
    unlink (path);
    return false;
  }

  *volid = g_strdup (name);
  return true;
}

static bool
dir_free (struct fleece_storage *st, const char *volid, GError **err)
{
  g_autofree char *path = NULL;

  if (!check_image_name (volid, "volume id", err))
    return false;
  path = g_build_filename (st->dir, volid, NULL);
  if (unlink (path) != 0 && errno != ENOENT) {
    int e = errno;
    g_set_error (err, FLEECE_ERROR, e, "cannot remove image %s: %s", path,
                 g_strerror (e));
    return false;
  }
  return true;
}

static char *
dir_path (struct fleece_storage *st, const char *volid, GError **err)
{
  if (!check_image_name (volid, "volume id", err))
    return NULL;
  return g_build_filename (st->dir, volid, NULL);
}

/* ---- callback storage ------------------------------------------------- */

/* The callbacks may set errno; otherwise a failure is reported as EIO. */
static int
callback_errno (int saved)
{
  return saved ? saved : EIO;
}

static const char *
callback_reason (int saved)
{
  return saved ? g_strerror (saved) : "no reason given";
}

static bool
cb_alloc (struct fleece_storage *st, const char *name, const char *format,
          uint64_t size, char **volid, GError **err)
{
  char *out = NULL;
  int rc, e;

  errno = 0;
  rc = st->alloc (st->opaque, name, format, size, &out);
  e = errno;
  if (rc != 0) {
    free (out);
    g_set_error (err, FLEECE_ERROR, callback_errno (e),
                 "the storage alloc callback failed for image %s (%s, %"
                 PRIu64 " bytes): %s", name, format, size,
                 callback_reason (e));
    return false;
  }
  if (!out || !*out) {
    free (out);
    g_set_error (err, FLEECE_ERROR, EIO,
                 "the storage alloc callback returned success but no volume "
                 "id for image %s", name);
    return false;
  }
  *volid = g_strdup (out);
  free (out);
  return true;
}

static bool
cb_free (struct fleece_storage *st, const char *volid, GError **err)
{
  int rc, e;

  errno = 0;
  rc = st->free_image (st->opaque, volid);
  e = errno;
  if (rc != 0) {
    g_set_error (err, FLEECE_ERROR, callback_errno (e),
                 "the storage free callback failed for volume %s: %s", volid,
                 callback_reason (e));
    return false;
  }
  return true;
}

static char *
cb_path (struct fleece_storage *st, const char *volid, GError **err)
{
  char *out;
  char *ret;
  int e;

  errno = 0;
  out = st->path (st->opaque, volid);
  e = errno;
  if (!out || !*out) {
    free (out);
    g_set_error (err, FLEECE_ERROR, callback_errno (e),
                 "the storage path callback failed for volume %s: %s", volid,
                 out ? "it returned an empty path" : callback_reason (e));
    return NULL;
  }
  ret = g_strdup (out);
  free (out);
  return ret;
}

/* ---- the internal interface ------------------------------------------ */

bool
fleece_storage_alloc_image (struct fleece_storage *st, const char *name,
                            const char *format, uint64_t size, char **volid,
                            bool *unformatted, GError **err)
{
  g_return_val_if_fail (volid != NULL, false);

  if (unformatted)
    *unformatted = false;
  if (!storage_check (st, err))
    return false;
  if (!name || !*name) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "the image name is empty");
    return false;
  }
  if (!format || (strcmp (format, "raw") != 0 && strcmp (format, "qcow2") != 0)) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "image %s: format %s is neither raw nor qcow2", name,
                 format ? format : "(null)");
    return false;
  }
  if (strcmp (format, "qcow2") == 0 && !(st->flags & FLEECE_STORAGE_QCOW2)) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "image %s: the storage cannot hold qcow2 images", name);
    return false;
  }
  if (st->type == STORAGE_DIR)
    return dir_alloc (st, name, format, size, volid, unformatted, err);
  return cb_alloc (st, name, format, size, volid, err);
}

bool
fleece_storage_free_image (struct fleece_storage *st, const char *volid,
                           GError **err)
{
  if (!storage_check (st, err))
    return false;
  if (!volid || !*volid) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "the volume id is empty");
    return false;
  }
  if (st->type == STORAGE_DIR)
    return dir_free (st, volid, err);
  return cb_free (st, volid, err);
}

char *
fleece_storage_image_path (struct fleece_storage *st, const char *volid,
                           GError **err)
{
  if (!storage_check (st, err))
    return NULL;
  if (!volid || !*volid) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "the volume id is empty");
    return NULL;
  }
  if (st->type == STORAGE_DIR)
    return dir_path (st, volid, err);
  return cb_path (st, volid, err);
}

json_object *
fleece_storage_describe (const struct fleece_storage *st)
{
  json_object *o;

  if (!st)
    return NULL;
  o = json_object_new_object ();
  if (st->type == STORAGE_DIR) {
    json_object_object_add (o, "type", json_object_new_string ("dir"));
    json_object_object_add (o, "dir", json_object_new_string (st->dir));
  } else {
    json_object_object_add (o, "type", json_object_new_string ("callback"));
    json_object_object_add (o, "flags", json_object_new_int64 (st->flags));
  }
  return o;
}

struct fleece_storage *
fleece_storage_from_description (json_object *desc, GError **err)
{
  json_object *type = NULL, *dir = NULL;
  const char *t;

  if (!desc || !json_object_is_type (desc, json_type_object) ||
      !json_object_object_get_ex (desc, "type", &type) ||
      !json_object_is_type (type, json_type_string)) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "the record's storage description is not an object with a "
                 "\"type\" string");
    return NULL;
  }
  t = json_object_get_string (type);
  if (strcmp (t, "dir") == 0) {
    g_autoptr (GError) dir_err = NULL;
    struct fleece_storage *st;

    if (!json_object_object_get_ex (desc, "dir", &dir) ||
        !json_object_is_type (dir, json_type_string)) {
      g_set_error (err, FLEECE_ERROR, EINVAL,
                   "the record's directory storage has no \"dir\" string");
      return NULL;
    }
    st = storage_new_dir (json_object_get_string (dir), &dir_err);
    if (!st)
      g_set_error (err, FLEECE_ERROR, dir_err->code,
                   "cannot rebuild the record's directory storage: %s",
                   dir_err->message);
    return st;
  }
  if (strcmp (t, "callback") == 0) {
    g_set_error (err, FLEECE_ERROR, ENOTSUP,
                 "the images were allocated through the caller's storage "
                 "callbacks; the caller must set its storage with "
                 "fleece_set_storage() to clean up");
    return NULL;
  }
  g_set_error (err, FLEECE_ERROR, EINVAL,
               "the record's storage type \"%s\" is unknown", t);
  return NULL;
}
