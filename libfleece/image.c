/* Image files: fleecing images in the directory storage and backup targets
 * in a directory.
 *
 * Every image starts as a file created here, never over an existing one:
 * raw ones sparse and of the exact size, qcow2 ones empty.  The qcow2
 * metadata is then written either by QEMU (the stock engine: blockdev-create
 * jobs for all images at once, engine-qemu.c) or by qemu-img (the Proxmox
 * engine, which attaches images by drive_add, as qemu-server's vdisk_alloc
 * does). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "internal.h"

#define QEMU_IMG_DEFAULT "qemu-img"

bool
fleece_image_create_file (const char *path, uint64_t size, GError **err)
{
  int fd;

  if (size > (uint64_t) INT64_MAX) {
    g_set_error (err, FLEECE_ERROR, EFBIG,
                 "cannot create %s: %" PRIu64 " bytes is too large", path, size);
    return false;
  }
  /* O_EXCL: an existing file may be a leftover still attached to a VM, an
   * earlier backup, or someone else's data.  0600: it receives guest data. */
  fd = open (path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    int e = errno;
    if (e == EEXIST)
      g_set_error (err, FLEECE_ERROR, EEXIST,
                   "%s already exists; not overwriting it (if it is a "
                   "leftover of an earlier run, run fleece_cleanup() for "
                   "that VM, or remove it after checking nothing uses it)",
                   path);
    else
      g_set_error (err, FLEECE_ERROR, e, "cannot create %s: %s", path,
                   g_strerror (e));
    return false;
  }
  if (size && ftruncate (fd, (off_t) size) != 0) {
    int e = errno;
    g_set_error (err, FLEECE_ERROR, e,
                 "cannot set the size of %s to %" PRIu64 " bytes: %s", path,
                 size, g_strerror (e));
    close (fd);
    unlink (path);
    return false;
  }
  if (close (fd) != 0) {
    int e = errno;
    g_set_error (err, FLEECE_ERROR, e, "cannot create %s: %s", path,
                 g_strerror (e));
    unlink (path);
    return false;
  }
  return true;
}

/* About 7 ms per image here, nearly all of it starting the process. */
bool
fleece_image_format_qcow2 (const char *path, uint64_t size, GError **err)
{
  const char *env = g_getenv ("FLEECE_QEMU_IMG");
  const char *qemu_img = env && *env ? env : QEMU_IMG_DEFAULT;
  g_autofree char *size_str = g_strdup_printf ("%" PRIu64, size);
  g_autofree char *child_err = NULL;
  g_autoptr (GError) spawn_err = NULL;
  int status = 0;
  /* Default cluster size (64 KiB) and preallocation=off, as blockdev-create
   * makes them: thin, and clusters are reused also on storage without
   * discard.  "--" keeps the path from ever being read as an option. */
  const char *argv[] = {
    qemu_img, "create", "-q", "-f", "qcow2", "--", path, size_str, NULL
  };

  if (!g_spawn_sync (NULL, (char **) argv, NULL,
                     G_SPAWN_SEARCH_PATH | G_SPAWN_STDOUT_TO_DEV_NULL |
                     G_SPAWN_CLOEXEC_PIPES,
                     NULL, NULL, NULL, &child_err, &status, &spawn_err)) {
    int e = spawn_err->domain != G_SPAWN_ERROR ? EIO
      : spawn_err->code == G_SPAWN_ERROR_NOENT ? ENOENT
      : spawn_err->code == G_SPAWN_ERROR_ACCES ? EACCES : EIO;
    g_set_error (err, FLEECE_ERROR, e,
                 "cannot run %s to create %s: %s (set $FLEECE_QEMU_IMG to "
                 "the qemu-img binary)", qemu_img, path, spawn_err->message);
    return false;
  }
  if (!WIFEXITED (status) || WEXITSTATUS (status) != 0) {
    g_autofree char *how = WIFEXITED (status)
      ? g_strdup_printf ("exited with status %d", WEXITSTATUS (status))
      : WIFSIGNALED (status)
      ? g_strdup_printf ("was killed by signal %d", WTERMSIG (status))
      : g_strdup ("failed");
    g_strstrip (child_err);
    g_set_error (err, FLEECE_ERROR, EIO,
                 "%s create -f qcow2 %s %s %s%s%s", qemu_img, path,
                 size_str, how, *child_err ? ": " : "", child_err);
    return false;
  }
  return true;
}
