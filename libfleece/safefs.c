/* Files the library creates and may later remove, in directories it trusts.
 *
 * The library never removes a file it cannot prove it created in the run:
 * files are created with O_EXCL under a name that carries the run's id,
 * their device and inode are recorded, and only then do they get their
 * real name (a hard link, which fails rather than replace anything).  A
 * later removal checks the name still refers to that inode.  Everything
 * goes through a directory fd and *at() calls without following symlinks,
 * and directories it writes records or images to must be owned by the
 * caller's effective user and not writable by group or others (ssh's
 * StrictModes rule): in such a directory nobody else can swap names. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "internal.h"

/* A parent of a trusted directory may be writable by others only if it is
 * root's and sticky (/tmp): then nobody else can rename our entry. */
static bool
parent_ok (const struct stat *sb)
{
  if (sb->st_uid != 0 && sb->st_uid != geteuid ())
    return false;
  if ((sb->st_mode & (S_IWGRP | S_IWOTH)) == 0)
    return true;
  return sb->st_uid == 0 && (sb->st_mode & S_ISVTX);
}

static bool
check_parents (const char *dir, const char *what, GError **err)
{
  g_autofree char *real = NULL;
  g_autofree char *parent = g_path_get_dirname (dir);
  char *slash;

  real = realpath (parent, NULL);
  if (!real) {
    int e = errno;
    g_set_error (err, FLEECE_ERROR, e, "%s %s: %s", what, parent, g_strerror (e));
    return false;
  }
  for (;;) {
    struct stat sb;

    if (stat (*real ? real : "/", &sb) != 0 || !parent_ok (&sb)) {
      g_set_error (err, FLEECE_ERROR, EPERM,
                   "%s %s is inside %s, which other users can change "
                   "(owned by uid %u or writable by group or others without "
                   "being root's and sticky); use a directory only you can "
                   "change", what, dir, *real ? real : "/", (unsigned) sb.st_uid);
      return false;
    }
    if (!*real)
      return true;
    slash = strrchr (real, '/');
    *slash = '\0';
  }
}

bool
fleece_dir_check_private (const char *dir, const char *what, GError **err)
{
  struct stat sb;

  if (!dir || !g_path_is_absolute (dir)) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "%s '%s' is not an absolute path", what, dir ? dir : "");
    return false;
  }
  if (lstat (dir, &sb) != 0) {
    int e = errno;
    g_set_error (err, FLEECE_ERROR, e, "%s %s: %s", what, dir, g_strerror (e));
    return false;
  }
  if (S_ISLNK (sb.st_mode)) {
    g_set_error (err, FLEECE_ERROR, ELOOP,
                 "%s %s is a symbolic link; give the directory it points to",
                 what, dir);
    return false;
  }
  if (!S_ISDIR (sb.st_mode)) {
    g_set_error (err, FLEECE_ERROR, ENOTDIR, "%s %s is not a directory", what, dir);
    return false;
  }
  if (sb.st_uid != geteuid () || (sb.st_mode & (S_IWGRP | S_IWOTH))) {
    g_set_error (err, FLEECE_ERROR, EPERM,
                 "%s %s must be owned by uid %u and not writable by group or "
                 "others (it is owned by uid %u, mode %03o): other users could "
                 "plant or swap files in it", what, dir, (unsigned) geteuid (),
                 (unsigned) sb.st_uid, (unsigned) (sb.st_mode & 07777));
    return false;
  }
  return check_parents (dir, what, err);
}

bool
fleece_dir_ensure_private (const char *dir, const char *what, GError **err)
{
  struct stat sb;

  if (dir && g_path_is_absolute (dir) && lstat (dir, &sb) != 0 && errno == ENOENT) {
    g_autofree char *parent = g_path_get_dirname (dir);
    int pfd;

    if (g_mkdir_with_parents (dir, 0700) != 0) {
      int e = errno;
      g_set_error (err, FLEECE_ERROR, e, "cannot create %s %s: %s", what, dir,
                   g_strerror (e));
      return false;
    }
    /* So that the new directory itself survives a crash. */
    if ((pfd = open (parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) >= 0) {
      fsync (pfd);
      close (pfd);
    }
  }
  return fleece_dir_check_private (dir, what, err);
}

int
fleece_dir_open (const char *dir, GError **err)
{
  int fd = open (dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

  if (fd < 0) {
    int e = errno;
    g_set_error (err, FLEECE_ERROR, e, "cannot open directory %s: %s", dir,
                 g_strerror (e));
  }
  return fd;
}

json_object *
fleece_file_id_json (const struct stat *sb)
{
  json_object *o = json_object_new_object ();

  json_object_object_add (o, "dev", json_object_new_int64 ((int64_t) sb->st_dev));
  json_object_object_add (o, "ino", json_object_new_int64 ((int64_t) sb->st_ino));
  return o;
}

/* Inode numbers are reused as soon as a file is deleted (ext4, tmpfs):
 * the birth time, where the file system keeps one, tells a newcomer from
 * the file recorded. */
static void
add_btime (json_object *id, int dfd, const char *name, int flags)
{
  struct statx stx;
  char buf[64];

  if (statx (dfd, name, flags, STATX_BTIME, &stx) != 0 ||
      !(stx.stx_mask & STATX_BTIME))
    return;
  snprintf (buf, sizeof buf, "%lld.%09u", (long long) stx.stx_btime.tv_sec,
            stx.stx_btime.tv_nsec);
  json_object_object_add (id, "btime", json_object_new_string (buf));
}

static bool
same_file (const struct stat *sb, json_object *id, int dfd, const char *name)
{
  g_autoptr (json_object) now = NULL;

  if (!id || (uint64_t) fleece_jint (id, "dev") != (uint64_t) sb->st_dev ||
      (uint64_t) fleece_jint (id, "ino") != (uint64_t) sb->st_ino)
    return false;
  if (!fleece_jstr (id, "btime"))
    return true;
  now = json_object_new_object ();
  add_btime (now, dfd, name, AT_SYMLINK_NOFOLLOW);
  return g_strcmp0 (fleece_jstr (now, "btime"), fleece_jstr (id, "btime")) == 0;
}

/* Create dir/<tmp>, a run-tagged name, as a new regular file of size bytes
 * (sparse), mode 0600, never over an existing one; *id gets its identity. */
bool
fleece_file_create (const char *dir, const char *tmp, uint64_t size,
                    json_object **id, GError **err)
{
  struct stat sb;
  int dfd, fd, e;

  if ((dfd = fleece_dir_open (dir, err)) < 0)
    return false;
  fd = openat (dfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    e = errno;
    close (dfd);
    g_set_error (err, FLEECE_ERROR, e, "cannot create %s/%s: %s", dir, tmp,
                 g_strerror (e));
    return false;
  }
  if (ftruncate (fd, (off_t) size) != 0 || fstat (fd, &sb) != 0) {
    e = errno;
    close (fd);
    unlinkat (dfd, tmp, 0);
    close (dfd);
    g_set_error (err, FLEECE_ERROR, e, "cannot create %s/%s (%" G_GUINT64_FORMAT
                 " bytes): %s", dir, tmp, size, g_strerror (e));
    return false;
  }
  *id = fleece_file_id_json (&sb);
  add_btime (*id, fd, "", AT_EMPTY_PATH);
  close (fd);
  close (dfd);
  return true;
}

/* Give dir/<tmp> its real name: a hard link, which fails rather than
 * replace an existing file.  tmp stays (fleece_file_commit()). */
bool
fleece_file_publish (const char *dir, const char *tmp, const char *name,
                     GError **err)
{
  int dfd, e = 0;

  if ((dfd = fleece_dir_open (dir, err)) < 0)
    return false;
  if (linkat (dfd, tmp, dfd, name, 0) != 0)
    e = errno;
  close (dfd);
  if (e == EEXIST)
    g_set_error (err, FLEECE_ERROR, EEXIST,
                 "%s/%s already exists; not overwriting it (remove it if it "
                 "is a leftover you know, or use another directory)", dir, name);
  else if (e == EPERM || e == ENOSYS || e == EOPNOTSUPP)
    g_set_error (err, FLEECE_ERROR, e, "cannot create %s/%s: the file system of %s "
                 "does not allow hard links (%s), and a new file gets its name by one "
                 "(so that no existing file is ever replaced): use a local file system "
                 "such as ext4 or XFS", dir, name, dir, g_strerror (e));
  else if (e)
    g_set_error (err, FLEECE_ERROR, e, "cannot create %s/%s: %s", dir, name,
                 g_strerror (e));
  return e == 0;
}

void
fleece_file_commit (const char *dir, const char *tmp)
{
  int dfd = open (dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

  if (dfd < 0)
    return;
  unlinkat (dfd, tmp, 0);
  close (dfd);
}

/* Remove dir/<name> if it is the file id names, or (no id recorded) the
 * file dir/<tmp> is; without either nothing of ours was made and name is
 * not looked at (it may be someone else's file that made the create fail).
 * Returns 0 when nothing of ours is left, 1 when name exists but is
 * another file (kept), -1 on error. */
int
fleece_file_remove (const char *dir, const char *name, const char *tmp,
                    json_object *id, GError **err)
{
  g_autoptr (json_object) tmp_id = NULL;
  struct stat sb;
  int dfd, r = 0;

  if ((dfd = open (dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)) < 0) {
    int e = errno;
    if (e == ENOENT)
      return 0;
    g_set_error (err, FLEECE_ERROR, e, "cannot open directory %s: %s", dir,
                 g_strerror (e));
    return -1;
  }
  if (tmp && fstatat (dfd, tmp, &sb, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG (sb.st_mode)) {
    if (!id) {
      id = tmp_id = fleece_file_id_json (&sb);
      add_btime (tmp_id, dfd, tmp, AT_SYMLINK_NOFOLLOW);
    }
    unlinkat (dfd, tmp, 0);
  }
  if (id && name && fstatat (dfd, name, &sb, AT_SYMLINK_NOFOLLOW) == 0) {
    if (!S_ISREG (sb.st_mode) || !same_file (&sb, id, dfd, name))
      r = 1;
    else if (unlinkat (dfd, name, 0) != 0 && errno != ENOENT) {
      int e = errno;
      g_set_error (err, FLEECE_ERROR, e, "cannot remove %s/%s: %s", dir, name,
                   g_strerror (e));
      r = -1;
    }
  }
  close (dfd);
  return r;
}
