/* slowfs: a FUSE pass-through file system whose writes can be made slow,
 * for bench/guest's "slow fleecing storage" section.  The library's
 * directory storage needs a directory it can create images in, so a
 * throttled block node (one exported file) would not do.
 *
 *   slowfs BACKING_DIR MOUNTPOINT DELAY_MS
 *
 * Runs in the foreground.  SIGUSR1 makes every write (and fallocate)
 * wait DELAY_MS before it is done, SIGUSR2 makes them fast again: the
 * images are created and formatted fast, then the storage turns slow
 * while the backup runs.  SIGTERM/SIGINT unmount.  Multi-threaded, so a
 * slow write does not hold up the file system's other requests. */
#define FUSE_USE_VERSION 31
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

static char backing[PATH_MAX];
static long delay_ms;
static volatile sig_atomic_t slow;

static void
on_usr (int sig)
{
  slow = sig == SIGUSR1;
}

static void
real (char *out, const char *path)
{
  snprintf (out, PATH_MAX, "%s%s", backing, path);
}

static void
maybe_wait (void)
{
  if (slow) {
    struct timespec ts = { delay_ms / 1000, (delay_ms % 1000) * 1000000L };
    while (nanosleep (&ts, &ts) != 0 && errno == EINTR)
      ;
  }
}

static void *
s_init (struct fuse_conn_info *conn, struct fuse_config *cfg)
{
  (void) conn;
  cfg->use_ino = 1;
  /* Pass-through: the kernel must not cache what the backing files say. */
  cfg->entry_timeout = 0;
  cfg->attr_timeout = 0;
  cfg->negative_timeout = 0;
  return NULL;
}

static int
s_getattr (const char *path, struct stat *st, struct fuse_file_info *fi)
{
  char p[PATH_MAX];
  if (fi)
    return fstat ((int) fi->fh, st) == 0 ? 0 : -errno;
  real (p, path);
  return lstat (p, st) == 0 ? 0 : -errno;
}

static int
s_access (const char *path, int mask)
{
  char p[PATH_MAX];
  real (p, path);
  return access (p, mask) == 0 ? 0 : -errno;
}

static int
s_readdir (const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
           struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
  char p[PATH_MAX];
  DIR *d;
  struct dirent *e;

  (void) off;
  (void) fi;
  (void) flags;
  real (p, path);
  if (!(d = opendir (p)))
    return -errno;
  while ((e = readdir (d))) {
    struct stat st = { .st_ino = e->d_ino, .st_mode = (mode_t) e->d_type << 12 };
    if (fill (buf, e->d_name, &st, 0, 0))
      break;
  }
  closedir (d);
  return 0;
}

static int
s_mkdir (const char *path, mode_t mode)
{
  char p[PATH_MAX];
  real (p, path);
  return mkdir (p, mode) == 0 ? 0 : -errno;
}

static int
s_unlink (const char *path)
{
  char p[PATH_MAX];
  real (p, path);
  return unlink (p) == 0 ? 0 : -errno;
}

static int
s_rmdir (const char *path)
{
  char p[PATH_MAX];
  real (p, path);
  return rmdir (p) == 0 ? 0 : -errno;
}

static int
s_rename (const char *from, const char *to, unsigned int flags)
{
  char a[PATH_MAX], b[PATH_MAX];
  if (flags)
    return -EINVAL;
  real (a, from);
  real (b, to);
  return rename (a, b) == 0 ? 0 : -errno;
}

/* The library publishes a new image under its name with a hard link. */
static int
s_link (const char *from, const char *to)
{
  char a[PATH_MAX], b[PATH_MAX];
  real (a, from);
  real (b, to);
  return link (a, b) == 0 ? 0 : -errno;
}

static int
s_chmod (const char *path, mode_t mode, struct fuse_file_info *fi)
{
  char p[PATH_MAX];
  if (fi)
    return fchmod ((int) fi->fh, mode) == 0 ? 0 : -errno;
  real (p, path);
  return chmod (p, mode) == 0 ? 0 : -errno;
}

static int
s_truncate (const char *path, off_t size, struct fuse_file_info *fi)
{
  char p[PATH_MAX];
  if (fi)
    return ftruncate ((int) fi->fh, size) == 0 ? 0 : -errno;
  real (p, path);
  return truncate (p, size) == 0 ? 0 : -errno;
}

static int
s_utimens (const char *path, const struct timespec ts[2], struct fuse_file_info *fi)
{
  char p[PATH_MAX];
  if (fi)
    return futimens ((int) fi->fh, ts) == 0 ? 0 : -errno;
  real (p, path);
  return utimensat (AT_FDCWD, p, ts, AT_SYMLINK_NOFOLLOW) == 0 ? 0 : -errno;
}

static int
s_create (const char *path, mode_t mode, struct fuse_file_info *fi)
{
  char p[PATH_MAX];
  int fd;
  real (p, path);
  fd = open (p, fi->flags & ~O_DIRECT, mode);
  if (fd < 0)
    return -errno;
  fi->fh = (uint64_t) fd;
  return 0;
}

static int
s_open (const char *path, struct fuse_file_info *fi)
{
  char p[PATH_MAX];
  int fd;
  real (p, path);
  /* O_DIRECT is the kernel's business on our side of FUSE. */
  fd = open (p, fi->flags & ~O_DIRECT);
  if (fd < 0)
    return -errno;
  fi->fh = (uint64_t) fd;
  return 0;
}

static int
s_read (const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
  ssize_t n;
  (void) path;
  n = pread ((int) fi->fh, buf, size, off);
  return n < 0 ? -errno : (int) n;
}

static int
s_write (const char *path, const char *buf, size_t size, off_t off,
         struct fuse_file_info *fi)
{
  ssize_t n;
  (void) path;
  maybe_wait ();
  n = pwrite ((int) fi->fh, buf, size, off);
  return n < 0 ? -errno : (int) n;
}

static int
s_statfs (const char *path, struct statvfs *st)
{
  char p[PATH_MAX];
  real (p, path);
  return statvfs (p, st) == 0 ? 0 : -errno;
}

static int
s_release (const char *path, struct fuse_file_info *fi)
{
  (void) path;
  close ((int) fi->fh);
  return 0;
}

static int
s_fsync (const char *path, int datasync, struct fuse_file_info *fi)
{
  (void) path;
  return (datasync ? fdatasync ((int) fi->fh) : fsync ((int) fi->fh)) == 0 ? 0 : -errno;
}

static int
s_fallocate (const char *path, int mode, off_t off, off_t len, struct fuse_file_info *fi)
{
  (void) path;
  maybe_wait ();
  return fallocate ((int) fi->fh, mode, off, len) == 0 ? 0 : -errno;
}

static off_t
s_lseek (const char *path, off_t off, int whence, struct fuse_file_info *fi)
{
  off_t r;
  (void) path;
  r = lseek ((int) fi->fh, off, whence);
  return r < 0 ? -errno : r;
}

static const struct fuse_operations ops = {
  .init = s_init,
  .getattr = s_getattr,
  .access = s_access,
  .readdir = s_readdir,
  .mkdir = s_mkdir,
  .unlink = s_unlink,
  .rmdir = s_rmdir,
  .rename = s_rename,
  .link = s_link,
  .chmod = s_chmod,
  .truncate = s_truncate,
  .utimens = s_utimens,
  .create = s_create,
  .open = s_open,
  .read = s_read,
  .write = s_write,
  .statfs = s_statfs,
  .release = s_release,
  .fsync = s_fsync,
  .fallocate = s_fallocate,
  .lseek = s_lseek,
};

int
main (int argc, char **argv)
{
  char *fargv[] = { argv[0], "-f", "-o", "default_permissions", NULL, NULL };
  struct sigaction sa = { .sa_handler = on_usr };

  if (argc != 4 || !realpath (argv[1], backing)) {
    fprintf (stderr, "usage: slowfs BACKING_DIR MOUNTPOINT DELAY_MS\n");
    return 2;
  }
  delay_ms = atol (argv[3]);
  sigaction (SIGUSR1, &sa, NULL);
  sigaction (SIGUSR2, &sa, NULL);
  fargv[4] = argv[2];
  return fuse_main (5, fargv, &ops, NULL);
}
