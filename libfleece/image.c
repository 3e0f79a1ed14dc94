/* Creating image files of an exact size, for fleecing images in the
 * directory storage and for backup targets in a directory.
 *
 * raw: a sparse file, ftruncate'd to the byte.  qcow2: qemu-img create,
 * which takes ~10 ms here; QMP blockdev-create would need a QEMU connection
 * and a job per image (create, wait, dismiss), so it is not cheaper. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

static const char *
qemu_img_binary (void)
{
  const char *env = g_getenv ("FLEECE_QEMU_IMG");
  return env && *env ? env : "qemu-img";
}

bool
fleece_image_create (const char *path, const char *format, uint64_t size,
                     GError **err)
{
  if (strcmp (format, "raw") == 0) {
    int fd = open (path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
      int e = errno;
      g_set_error (err, FLEECE_ERROR, e, "cannot create %s: %s%s", path,
                   g_strerror (e),
                   e == EEXIST ? " (remove it or choose another place)" : "");
      return false;
    }
    if (ftruncate (fd, (off_t) size) < 0) {
      int e = errno;
      close (fd);
      unlink (path);
      g_set_error (err, FLEECE_ERROR, e, "cannot size %s to %" G_GUINT64_FORMAT
                   " bytes: %s", path, size, g_strerror (e));
      return false;
    }
    close (fd);
    return true;
  }

  if (strcmp (format, "qcow2") == 0) {
    g_autofree char *size_arg = g_strdup_printf ("%" G_GUINT64_FORMAT, size);
    g_autofree char *out = NULL, *errout = NULL;
    const char *argv[] = { qemu_img_binary (), "create", "-q", "-f", "qcow2",
                           "--", path, size_arg, NULL };
    int status = 0;
    GError *spawn_err = NULL;

    if (size % 512) {
      g_set_error (err, FLEECE_ERROR, EINVAL,
                   "cannot create qcow2 image %s of %" G_GUINT64_FORMAT
                   " bytes: qcow2 sizes are multiples of 512; use raw",
                   path, size);
      return false;
    }
    if (g_file_test (path, G_FILE_TEST_EXISTS)) {
      g_set_error (err, FLEECE_ERROR, EEXIST,
                   "cannot create %s: it exists (remove it or choose another "
                   "place)", path);
      return false;
    }
    if (!g_spawn_sync (NULL, (char **) argv, NULL, G_SPAWN_SEARCH_PATH, NULL,
                       NULL, &out, &errout, &status, &spawn_err)) {
      g_set_error (err, FLEECE_ERROR, ENOENT, "cannot run %s: %s",
                   argv[0], spawn_err->message);
      g_error_free (spawn_err);
      return false;
    }
    if (!g_spawn_check_wait_status (status, NULL)) {
      g_strstrip (errout);
      g_set_error (err, FLEECE_ERROR, EIO, "qemu-img create %s failed: %s",
                   path, errout);
      unlink (path);
      return false;
    }
    return true;
  }

  g_set_error (err, FLEECE_ERROR, EINVAL,
               "unknown image format '%s': use raw or qcow2", format);
  return false;
}
