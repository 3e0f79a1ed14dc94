/* Backup targets: a directory of images, an NBD server, an open file
 * descriptor, or (Proxmox engine) the patched QEMU's own backup
 * arguments. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"
#include "target.h"

FLEECE_API struct fleece_target *
fleece_target_new_dir (const char *dir, const char *format)
{
  struct fleece_target *t;

  if (!dir || !g_path_is_absolute (dir)) {
    fleece_error_set (__func__, EINVAL,
                      "the target directory '%s' must be an absolute path",
                      dir ? dir : "(null)");
    return NULL;
  }
  if (!g_file_test (dir, G_FILE_TEST_IS_DIR)) {
    fleece_error_set (__func__, ENOENT,
                      "the target directory %s does not exist", dir);
    return NULL;
  }
  /* The images get the guest's data and are removed again if the run
   * fails: nobody else may plant or swap names in the directory. */
  {
    g_autoptr (GError) err = NULL;
    if (!fleece_dir_check_private (dir, "target directory", &err)) {
      fleece_error_set_gerror (__func__, err);
      return NULL;
    }
  }
  if (!format)
    format = "raw";
  if (strcmp (format, "raw") != 0 && strcmp (format, "qcow2") != 0) {
    fleece_error_set (__func__, EINVAL,
                      "unknown target format '%s': use \"raw\" or \"qcow2\"",
                      format);
    return NULL;
  }
  t = g_new0 (struct fleece_target, 1);
  t->kind = FLEECE_TARGET_DIR;
  t->fd = -1;
  t->dir = g_canonicalize_filename (dir, NULL);
  t->format = g_strdup (format);
  return t;
}

/* nbd+unix:///[export]?socket=PATH and nbd://HOST[:PORT][/export]; the
 * export name of each drive is its key, so a path in the URI is refused
 * rather than silently ignored. */
FLEECE_API struct fleece_target *
fleece_target_new_nbd (const char *uri)
{
  g_autoptr (GUri) u = NULL;
  g_autoptr (GError) err = NULL;
  struct fleece_target *t;
  const char *scheme, *path;

  if (!uri) {
    fleece_error_set (__func__, EINVAL, "the NBD URI is NULL");
    return NULL;
  }
  u = g_uri_parse (uri, G_URI_FLAGS_NONE, &err);
  if (!u) {
    fleece_error_set (__func__, EINVAL, "invalid NBD URI '%s': %s", uri,
                      err->message);
    return NULL;
  }
  scheme = g_uri_get_scheme (u);
  path = g_uri_get_path (u);
  if (path && *path && strcmp (path, "/") != 0) {
    fleece_error_set (__func__, EINVAL,
                      "NBD URI '%s' names an export; leave it out: each "
                      "drive is written to the export named after its key "
                      "(e.g. scsi0)", uri);
    return NULL;
  }

  t = g_new0 (struct fleece_target, 1);
  t->kind = FLEECE_TARGET_NBD;
  t->fd = -1;
  if (g_strcmp0 (scheme, "nbd+unix") == 0) {
    const char *query = g_uri_get_query (u);
    g_autoptr (GHashTable) params = NULL;
    const char *sock;

    if (query)
      params = g_uri_parse_params (query, -1, "&", G_URI_PARAMS_NONE, NULL);
    sock = params ? g_hash_table_lookup (params, "socket") : NULL;
    if (!sock || !*sock) {
      fleece_target_free (t);
      fleece_error_set (__func__, EINVAL,
                        "NBD URI '%s' lacks ?socket=PATH", uri);
      return NULL;
    }
    /* QEMU resolves a relative path against its own working directory. */
    t->nbd_socket = g_canonicalize_filename (sock, NULL);
  } else if (g_strcmp0 (scheme, "nbd") == 0) {
    const char *host = g_uri_get_host (u);
    int port = g_uri_get_port (u);

    if (!host || !*host) {
      fleece_target_free (t);
      fleece_error_set (__func__, EINVAL, "NBD URI '%s' lacks a host", uri);
      return NULL;
    }
    t->nbd_host = g_strdup (host);
    t->nbd_port = port > 0 ? port : 10809;
  } else {
    fleece_target_free (t);
    fleece_error_set (__func__, EINVAL,
                      "unsupported NBD URI scheme '%s': use nbd:// or "
                      "nbd+unix://", scheme ? scheme : "");
    return NULL;
  }
  t->uri = g_strdup (uri);
  return t;
}

FLEECE_API struct fleece_target *
fleece_target_new_pve (const char *json_args)
{
  json_object *args;
  struct fleece_target *t;

  args = json_args ? json_tokener_parse (json_args) : NULL;
  if (!args || !json_object_is_type (args, json_type_object)) {
    if (args)
      json_object_put (args);
    fleece_error_set (__func__, EINVAL,
                      "the backup arguments must be a JSON object, e.g. "
                      "{\"backup-file\": \"/backup/vm.vma\", \"format\": "
                      "\"vma\"}");
    return NULL;
  }
  t = g_new0 (struct fleece_target, 1);
  t->kind = FLEECE_TARGET_PVE;
  t->fd = -1;
  t->pve_args = args;
  return t;
}

FLEECE_API struct fleece_target *
fleece_target_new_fd (int fd, const char *format)
{
  struct fleece_target *t;
  int flags;

  if (fd < 0 || (flags = fcntl (fd, F_GETFL)) < 0) {
    fleece_error_set (__func__, EBADF, "invalid file descriptor %d", fd);
    return NULL;
  }
  if (!format || (strcmp (format, "vma") != 0 && strcmp (format, "raw") != 0)) {
    close (fd);
    fleece_error_set (__func__, EINVAL, "unknown fd target format '%s': use "
                      "\"vma\" (Proxmox engine) or \"raw\" (stock engine, "
                      "one drive)", format ? format : "(null)");
    return NULL;
  }
  if ((flags & O_ACCMODE) == O_RDONLY ||
      (strcmp (format, "raw") == 0 && (flags & O_ACCMODE) != O_RDWR)) {
    close (fd);
    fleece_error_set (__func__, EBADF, "file descriptor %d is not open %s; "
                      "the backup is written to it%s", fd,
                      strcmp (format, "raw") == 0 ? "read-write" : "for writing",
                      strcmp (format, "raw") == 0 ? " (QEMU opens an image "
                      "read-write)" : "");
    return NULL;
  }
  t = g_new0 (struct fleece_target, 1);
  t->kind = FLEECE_TARGET_FD;
  t->fd = fd;
  t->format = g_strdup (format);
  return t;
}

FLEECE_API int
fleece_target_set_pve_args (struct fleece_target *t, const char *json_args)
{
  static const char *const ours[] = { "backup-file", "format", "devlist", "fleecing", NULL };
  json_object *args;

  if (!t || t->kind != FLEECE_TARGET_FD || strcmp (t->format, "vma") != 0) {
    fleece_error_set (__func__, EINVAL, "%s", t ? "backup arguments are for "
                      "\"vma\" fd targets (fleece_target_new_fd()); a Proxmox "
                      "target takes them in fleece_target_new_pve()"
                      : "target is NULL");
    return -1;
  }
  args = json_args ? json_tokener_parse (json_args) : NULL;
  if (!args || !json_object_is_type (args, json_type_object)) {
    if (args)
      json_object_put (args);
    fleece_error_set (__func__, EINVAL, "the backup arguments must be a JSON "
                      "object, e.g. {\"config-file\": \"/run/vzdump/qemu-server.conf\"}");
    return -1;
  }
  for (size_t i = 0; ours[i]; i++)
    if (json_object_object_get_ex (args, ours[i], NULL)) {
      json_object_put (args);
      fleece_error_set (__func__, EINVAL, "the backup arguments must not "
                        "contain \"%s\": the fd target sets it", ours[i]);
      return -1;
    }
  if (t->pve_args)
    json_object_put (t->pve_args);
  t->pve_args = args;
  return 0;
}

FLEECE_API int
fleece_target_set_base (struct fleece_target *t, const char *base_dir)
{
  if (!t || t->kind != FLEECE_TARGET_DIR) {
    fleece_error_set (__func__, EINVAL, "%s", t ? "a base is for directory "
                      "targets (fleece_target_new_dir())" : "target is NULL");
    return -1;
  }
  if (base_dir && (!g_path_is_absolute (base_dir) ||
                   !g_file_test (base_dir, G_FILE_TEST_IS_DIR))) {
    fleece_error_set (__func__, EINVAL, "the base directory '%s' must be an "
                      "existing absolute path (the previous backup of the "
                      "chain)", base_dir);
    return -1;
  }
  g_free (t->base);
  t->base = base_dir ? g_canonicalize_filename (base_dir, NULL) : NULL;
  return 0;
}

FLEECE_API void
fleece_target_free (struct fleece_target *t)
{
  if (!t)
    return;
  g_free (t->dir);
  g_free (t->format);
  g_free (t->uri);
  g_free (t->nbd_socket);
  g_free (t->nbd_host);
  g_free (t->base);
  if (t->pve_args)
    json_object_put (t->pve_args);
  if (t->fd >= 0)
    close (t->fd);
  g_free (t);
}

json_object *
fleece_target_describe (const struct fleece_target *t)
{
  json_object *o = json_object_new_object ();

  switch (t->kind) {
  case FLEECE_TARGET_DIR:
    json_object_object_add (o, "type", json_object_new_string ("dir"));
    json_object_object_add (o, "dir", json_object_new_string (t->dir));
    json_object_object_add (o, "format", json_object_new_string (t->format));
    break;
  case FLEECE_TARGET_NBD:
    json_object_object_add (o, "type", json_object_new_string ("nbd"));
    json_object_object_add (o, "uri", json_object_new_string (t->uri));
    break;
  case FLEECE_TARGET_PVE:
    json_object_object_add (o, "type", json_object_new_string ("pve"));
    break;
  case FLEECE_TARGET_FD:
    json_object_object_add (o, "type", json_object_new_string ("fd"));
    json_object_object_add (o, "format", json_object_new_string (t->format));
    break;
  }
  if (t->base)
    json_object_object_add (o, "base", json_object_new_string (t->base));
  return o;
}

char *
fleece_target_file_name (const struct fleece_target *t, const char *key)
{
  return g_strdup_printf ("%s.%s", key, t->format);
}

char *
fleece_target_dir_path (const struct fleece_target *t, const char *key)
{
  g_autofree char *name = fleece_target_file_name (t, key);
  return g_build_filename (t->dir, name, NULL);
}

/* to (absolute, canonical) as seen from the directory from: "../b/x". */
static char *
relative_path (const char *from, const char *to)
{
  g_auto (GStrv) f = g_strsplit (from + 1, "/", -1);
  g_auto (GStrv) t = g_strsplit (to + 1, "/", -1);
  g_autoptr (GString) r = g_string_new (NULL);
  guint i = 0, nf = g_strv_length (f), nt = g_strv_length (t);

  if (nf == 1 && !*f[0])
    nf = 0;                     /* from is "/" */
  while (i < nf && i + 1 < nt && strcmp (f[i], t[i]) == 0)
    i++;
  for (guint j = i; j < nf; j++)
    g_string_append (r, "../");
  for (guint j = i; j < nt; j++)
    g_string_append_printf (r, "%s%s", t[j], j + 1 < nt ? "/" : "");
  return g_string_free (g_steal_pointer (&r), FALSE);
}

/* The base image of key: <base>/<key>.qcow2, else <key>.raw.  Relative,
 * so that the chain can move as a whole, and from the target directory,
 * since QEMU resolves a backing file against its image's directory. */
bool
fleece_target_backing (const struct fleece_target *t, const char *key,
                       char **backing, const char **backing_fmt,
                       GError **err)
{
  static const char *const fmts[] = { "qcow2", "raw", NULL };

  for (size_t i = 0; fmts[i]; i++) {
    g_autofree char *name = g_strdup_printf ("%s.%s", key, fmts[i]);
    g_autofree char *path = g_build_filename (t->base, name, NULL);
    struct stat sb;

    if (lstat (path, &sb) == 0 && S_ISREG (sb.st_mode)) {
      *backing = relative_path (t->dir, path);
      *backing_fmt = fmts[i];
      return true;
    }
  }
  g_set_error (err, FLEECE_ERROR, ENOENT,
               "the base %s has no image of %s (%s.qcow2 or %s.raw): is it a "
               "backup of this VM?", t->base, key, key, key);
  return false;
}

static char *
pending_file_name (const char *name, const char *run)
{
  return g_strdup_printf (".%s.%.8s.new", name, run);
}

bool
fleece_target_create_file (const struct fleece_target *t, const char *key,
                           uint64_t size, const char *run, json_object *entry,
                           GError **err)
{
  g_autofree char *name = fleece_target_file_name (t, key);
  g_autofree char *pending = pending_file_name (name, run);
  bool qcow2 = strcmp (t->format, "qcow2") == 0;
  json_object *tf = json_object_new_object (), *id = NULL;

  /* Write-ahead: the pending name proves the file ours until the identity
   * is in the record. */
  fleece_jset_str (tf, "dir", t->dir);
  fleece_jset_str (tf, "name", name);
  fleece_jset_str (tf, "pending", pending);
  json_object_object_add (entry, "target-file", tf);
  /* pending stays until the record holds the identity, so a crash after
   * the link still leaves a name that proves the file ours. */
  if (!fleece_file_create (t->dir, pending, qcow2 ? 0 : size, &id, err))
    return false;
  json_object_object_add (tf, "identity", id);
  if (!fleece_file_publish (t->dir, pending, name, err)) {
    fleece_file_commit (t->dir, pending);
    json_object_object_del (entry, "target-file");
    return false;
  }
  return true;
}

void
fleece_target_commit_file (json_object *entry)
{
  json_object *tf = fleece_jobj (entry, "target-file");

  if (tf && fleece_jstr (tf, "pending") && fleece_jobj (tf, "identity")) {
    fleece_file_commit (fleece_jstr (tf, "dir"), fleece_jstr (tf, "pending"));
    fleece_jset_str (tf, "pending", NULL);
  }
}

/* A record's target file names <key>.raw or <key>.qcow2 of the entry's
 * drive, the run's own pending name, in a directory only we can change:
 * a tampered record names nothing else. */
static bool
check_target_file (json_object *entry, json_object *tf, const char *run,
                   GError **err)
{
  const char *key = fleece_jstr (entry, "key"), *dir = fleece_jstr (tf, "dir");
  const char *name = fleece_jstr (tf, "name"), *pending = fleece_jstr (tf, "pending");
  g_autofree char *raw = g_strdup_printf ("%s.raw", key ? key : "");
  g_autofree char *qcow2 = g_strdup_printf ("%s.qcow2", key ? key : "");
  g_autofree char *ours = pending_file_name (name ? name : "", run ? run : "");

  if (!key || !fleece_valid_drive_key (key) || !name ||
      (strcmp (name, raw) != 0 && strcmp (name, qcow2) != 0) ||
      (pending && (!run || strcmp (pending, ours) != 0))) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "the record's target file of %s "
                 "is not one this library makes (%s, %s): not touching it",
                 key ? key : "?", name ? name : "?", pending ? pending : "-");
    return false;
  }
  return fleece_dir_check_private (dir, "target directory", err);
}

int
fleece_target_remove_file (json_object *entry, const char *run, GError **err)
{
  json_object *tf = fleece_jobj (entry, "target-file");

  if (!tf || !json_object_is_type (tf, json_type_object))
    return 0;
  if (!check_target_file (entry, tf, run, err))
    return -1;
  return fleece_file_remove (fleece_jstr (tf, "dir"), fleece_jstr (tf, "name"),
                             fleece_jstr (tf, "pending"),
                             fleece_jobj (tf, "identity"), err);
}

int
fleece_target_fd (const struct fleece_target *t)
{
  return t->fd;
}

json_object *
fleece_target_file_blockdev (const struct fleece_target *t, const char *key,
                             const char *file_node)
{
  g_autofree char *path = fleece_target_dir_path (t, key);
  json_object *file = json_object_new_object ();

  json_object_object_add (file, "driver", json_object_new_string ("file"));
  json_object_object_add (file, "filename", json_object_new_string (path));
  json_object_object_add (file, "node-name", json_object_new_string (file_node));
  json_object_object_add (file, "discard", json_object_new_string ("unmap"));
  return file;
}

/* The job writes what it reads as data, zeroes included: a linked
 * clone's unallocated areas read through snapshot-access come as data
 * (QEMU reports them neither allocated nor zero there), and so do the
 * zero-filled areas of any raw disk.  detect-zeroes turns a zero buffer
 * into a write-zeroes request that may unmap: the new file stays sparse,
 * the NBD server gets no zero bytes.  A new directory file reads as
 * zeroes already, an NBD export is the caller's: both only lose zero
 * bytes written as data, never data. */
static void
detect_zeroes (json_object *o)
{
  json_object_object_add (o, "detect-zeroes", json_object_new_string ("unmap"));
  json_object_object_add (o, "discard", json_object_new_string ("unmap"));
}

json_object *
fleece_target_blockdev (const struct fleece_target *t, const char *key,
                        const char *node, const char *file_node,
                        bool file_added)
{
  json_object *o = json_object_new_object ();

  json_object_object_add (o, "node-name", json_object_new_string (node));
  if (t->kind == FLEECE_TARGET_DIR) {
    json_object_object_add (o, "driver", json_object_new_string (t->format));
    json_object_object_add (o, "file", file_added
                            ? json_object_new_string (file_node)
                            : fleece_target_file_blockdev (t, key, file_node));
    if (t->base && strcmp (t->format, "qcow2") == 0)
      json_object_object_add (o, "backing", NULL);
    detect_zeroes (o);
  } else if (t->kind == FLEECE_TARGET_NBD) {
    json_object *server = json_object_new_object ();

    if (t->nbd_socket) {
      json_object_object_add (server, "type", json_object_new_string ("unix"));
      json_object_object_add (server, "path",
                              json_object_new_string (t->nbd_socket));
    } else {
      g_autofree char *port = g_strdup_printf ("%d", t->nbd_port);
      json_object_object_add (server, "type", json_object_new_string ("inet"));
      json_object_object_add (server, "host",
                              json_object_new_string (t->nbd_host));
      json_object_object_add (server, "port", json_object_new_string (port));
    }
    json_object_object_add (o, "driver", json_object_new_string ("nbd"));
    json_object_object_add (o, "server", server);
    json_object_object_add (o, "export", json_object_new_string (key));
    detect_zeroes (o);
  }
  return o;
}
