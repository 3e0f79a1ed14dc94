/* Backup targets: a directory of images, an NBD server, or (Proxmox engine)
 * the patched QEMU's own backup arguments. */
#include <errno.h>
#include <string.h>

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
  t->dir = g_strdup (dir);
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
    t->nbd_socket = g_strdup (sock);
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
  t->pve_args = args;
  return t;
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
  if (t->pve_args)
    json_object_put (t->pve_args);
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
  }
  return o;
}

char *
fleece_target_dir_path (const struct fleece_target *t, const char *key)
{
  g_autofree char *name = g_strdup_printf ("%s.%s", key, t->format);
  return g_build_filename (t->dir, name, NULL);
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
  return file;
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
  }
  return o;
}
