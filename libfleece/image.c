/* qcow2 metadata written by qemu-img.
 *
 * Image files start as files created by safefs.c, never over an existing
 * one: raw ones sparse and of the exact size, qcow2 ones empty.  The qcow2
 * metadata is then written by QEMU (blockdev-create jobs for all images at
 * once, engine-common.c) or, where QEMU cannot (the Proxmox engine's HMP
 * attach, which opens images by file name, as qemu-server's vdisk_alloc
 * does), by qemu-img here.  qemu-img create truncates the file in place:
 * its inode, which proves it ours, stays the same. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "internal.h"

#define QEMU_IMG_DEFAULT "qemu-img"

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
