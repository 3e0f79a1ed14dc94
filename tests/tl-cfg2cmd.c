/* Fixtures from qemu-server's cfg2cmd expectations (see tl-cfg2cmd.h). */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <check.h>
#include <glib/gstdio.h>
#include <json-c/json.h>

#include "tl-cfg2cmd.h"

#define MiB (G_GUINT64_CONSTANT (1024) * 1024)
#define DEFAULT_SIZE (64 * MiB)
/* OVMF's vars sizes and the code sizes that go with them: code + vars is
 * 2 MiB (OVMF_CODE.fd, 2m vars) or 4 MiB (OVMF_CODE_4M*.fd, 4m vars). */
#define EFI_VARS_2M 131072
#define EFI_VARS_4M 540672
#define EFI_CODE_2M 1966080
#define EFI_CODE_4M 3653632

G_DEFINE_QUARK (tl-cfg2cmd-error-quark, tl_cfg2cmd_error)

/* ---- the QEMU binary and what it can do -------------------------------- */

static const char *
qemu_binary (void)
{
  const char *b = g_getenv ("FLEECE_QEMU");

  return b && *b ? b : "qemu-system-x86_64";
}

/* Parsers of "-<option> help" output into a set of names. */
typedef void (*HelpParser) (const char *out, GHashTable *names);

/* name "virtio-blk-pci", bus PCI, alias "virtio-blk" */
static void
parse_devices (const char *out, GHashTable *names)
{
  for (const char *p = out; (p = strstr (p, "name \"")); ) {
    const char *start = p + 6;
    const char *end = strchr (start, '"');
    const char *eol = strchr (start, '\n');
    const char *alias;

    if (!end)
      break;
    g_hash_table_add (names, g_strndup (start, (gsize) (end - start)));
    alias = strstr (end, "alias \"");
    if (alias && (!eol || alias < eol)) {
      const char *a = alias + 7;
      const char *aend = strchr (a, '"');

      if (aend)
        g_hash_table_add (names, g_strndup (a, (gsize) (aend - a)));
    }
    p = end;
  }
}

/* "pc-i440fx-9.2        Standard PC ..." after a header line */
static void
parse_machines (const char *out, GHashTable *names)
{
  g_auto (GStrv) lines = g_strsplit (out, "\n", -1);

  for (size_t i = 1; lines[i]; i++) {
    const char *sp = strchr (lines[i], ' ');

    if (sp && sp > lines[i])
      g_hash_table_add (names, g_strndup (lines[i], (gsize) (sp - lines[i])));
  }
}

/* "Available chardev backend types:" then one per line, indented */
static void
parse_chardevs (const char *out, GHashTable *names)
{
  g_auto (GStrv) lines = g_strsplit (out, "\n", -1);

  for (size_t i = 1; lines[i]; i++) {
    g_autofree char *name = g_strstrip (g_strdup (lines[i]));

    if (*name)
      g_hash_table_add (names, g_steal_pointer (&name));
  }
}

typedef struct {
  const char *option;     /* -device, -machine, -chardev */
  HelpParser parse;
  GHashTable *names;      /* for the binary cached_for */
  char *cached_for;
} HelpCache;

/* What "qemu -<option> help" lists, cached per binary. */
static GHashTable *
qemu_help (HelpCache *c)
{
  const char *argv[] = { qemu_binary (), c->option, "help", NULL };
  g_autofree char *out = NULL;
  g_autoptr (GError) err = NULL;
  int status;

  if (c->names && g_strcmp0 (c->cached_for, qemu_binary ()) == 0)
    return c->names;
  if (c->names)
    g_hash_table_unref (c->names);
  g_free (c->cached_for);
  c->cached_for = g_strdup (qemu_binary ());
  c->names = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  if (!g_spawn_sync (NULL, (char **) argv, NULL,
                     G_SPAWN_SEARCH_PATH | G_SPAWN_STDIN_FROM_DEV_NULL
                     | G_SPAWN_STDERR_TO_DEV_NULL, NULL, NULL, &out, NULL,
                     &status, &err))
    ck_abort_msg ("cannot run %s %s help: %s", qemu_binary (), c->option,
                  err->message);
  c->parse (out, c->names);
  return c->names;
}

static HelpCache help_devices = { "-device", parse_devices, NULL, NULL };
static HelpCache help_machines = { "-machine", parse_machines, NULL, NULL };
static HelpCache help_chardevs = { "-chardev", parse_chardevs, NULL, NULL };

/* Whether this QEMU opens a file node with these options: it says so by
 * starting (QMP on stdin, then quit) or not. */
static bool
qemu_opens (const char *dir, const char *file_options)
{
  g_autofree char *img = g_build_filename (dir, "probe.img", NULL);
  g_autofree char *blockdev = NULL;
  g_autofree char *out = NULL;
  g_autofree char *errout = NULL;
  int status = -1, fd;
  const char *argv[] = {
    "/bin/sh", "-c",
    "printf '%s' '{\"execute\":\"qmp_capabilities\"}"
    "{\"execute\":\"quit\"}' | exec \"$0\" -machine none -nodefaults"
    " -display none -qmp stdio -blockdev \"$1\"",
    qemu_binary (), NULL, NULL };

  fd = open (img, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
  ck_assert_msg (fd >= 0 && ftruncate (fd, (off_t) MiB) == 0,
                 "cannot create %s", img);
  close (fd);
  blockdev = g_strdup_printf ("{\"driver\":\"file\",\"filename\":\"%s\","
                              "\"node-name\":\"probe\",%s}", img,
                              file_options);
  argv[4] = blockdev;
  if (!g_spawn_sync (NULL, (char **) argv, NULL, G_SPAWN_SEARCH_PATH
                     | G_SPAWN_STDIN_FROM_DEV_NULL, NULL, NULL, &out,
                     &errout, &status, NULL))
    status = -1;
  g_unlink (img);
  return status == 0;
}

/* ---- shell words, QEMU option strings ---------------------------------- */

/* Split a shell command line as qemu-server's tests write it: words
 * separated by blanks, 'single quotes', "double quotes", backslash escapes
 * and backslash-newline continuations. */
static GPtrArray *
shell_split (const char *text, GError **err)
{
  GPtrArray *words = g_ptr_array_new_with_free_func (g_free);
  GString *w = NULL;
  const char *p = text;

  while (*p) {
    if (*p == '\\' && p[1] == '\n') {
      p += 2;
      continue;
    }
    if (*p == ' ' || *p == '\t' || *p == '\n') {
      if (w)
        g_ptr_array_add (words, g_string_free (g_steal_pointer (&w), FALSE));
      p++;
      continue;
    }
    if (!w && *p == '#') {
      while (*p && *p != '\n')
        p++;
      continue;
    }
    if (!w)
      w = g_string_new (NULL);
    if (*p == '\'') {
      const char *end = strchr (p + 1, '\'');

      if (!end)
        goto unterminated;
      g_string_append_len (w, p + 1, end - p - 1);
      p = end + 1;
    } else if (*p == '"') {
      for (p++; *p && *p != '"'; p++) {
        if (*p == '\\' && p[1] && strchr ("\"\\$`\n", p[1]))
          p++;
        g_string_append_c (w, *p);
      }
      if (!*p)
        goto unterminated;
      p++;
    } else if (*p == '\\' && p[1]) {
      g_string_append_c (w, p[1]);
      p += 2;
    } else {
      g_string_append_c (w, *p++);
    }
  }
  if (w)
    g_ptr_array_add (words, g_string_free (w, FALSE));
  return words;

unterminated:
  if (w)
    g_string_free (w, TRUE);
  g_ptr_array_unref (words);
  g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
               "unterminated quote");
  return NULL;
}

/* A QEMU option string "a=1,b,c=x,,y" as an ordered list of key/value
 * (value NULL for a bare word); the first bare word is `implied`'s value. */
typedef struct {
  GPtrArray *keys;
  GPtrArray *vals;
  char *implied;
  bool first_bare;      /* the implied key was written without "key=" */
} Kv;

static void
kv_free (Kv *kv)
{
  if (!kv)
    return;
  g_ptr_array_unref (kv->keys);
  g_ptr_array_unref (kv->vals);
  g_free (kv->implied);
  g_free (kv);
}

G_DEFINE_AUTOPTR_CLEANUP_FUNC (Kv, kv_free)

static Kv *
kv_parse (const char *s, const char *implied)
{
  Kv *kv = g_new0 (Kv, 1);
  g_autoptr (GString) cur = g_string_new (NULL);

  kv->keys = g_ptr_array_new_with_free_func (g_free);
  kv->vals = g_ptr_array_new_with_free_func (g_free);
  kv->implied = g_strdup (implied);
  for (const char *p = s;; p++) {
    if (*p == ',' && p[1] == ',') {
      g_string_append_c (cur, ',');
      p++;
      continue;
    }
    if (*p && *p != ',') {
      g_string_append_c (cur, *p);
      continue;
    }
    if (cur->len) {
      char *eq = strchr (cur->str, '=');

      if (eq) {
        g_ptr_array_add (kv->keys, g_strndup (cur->str,
                                              (gsize) (eq - cur->str)));
        g_ptr_array_add (kv->vals, g_strdup (eq + 1));
      } else if (implied && kv->keys->len == 0) {
        kv->first_bare = true;
        g_ptr_array_add (kv->keys, g_strdup (implied));
        g_ptr_array_add (kv->vals, g_strdup (cur->str));
      } else {
        g_ptr_array_add (kv->keys, g_strdup (cur->str));
        g_ptr_array_add (kv->vals, NULL);
      }
    }
    g_string_truncate (cur, 0);
    if (!*p)
      break;
  }
  return kv;
}

static int
kv_index (const Kv *kv, const char *key)
{
  for (guint i = 0; i < kv->keys->len; i++)
    if (strcmp (kv->keys->pdata[i], key) == 0)
      return (int) i;
  return -1;
}

static const char *
kv_get (const Kv *kv, const char *key)
{
  int i = kv_index (kv, key);

  return i < 0 ? NULL : kv->vals->pdata[i];
}

static void
kv_set (Kv *kv, const char *key, const char *val)
{
  int i = kv_index (kv, key);

  if (i < 0) {
    g_ptr_array_add (kv->keys, g_strdup (key));
    g_ptr_array_add (kv->vals, g_strdup (val));
  } else {
    g_free (kv->vals->pdata[i]);
    kv->vals->pdata[i] = g_strdup (val);
  }
}

static void
kv_del (Kv *kv, const char *key)
{
  int i = kv_index (kv, key);

  if (i >= 0) {
    g_ptr_array_remove_index (kv->keys, (guint) i);
    g_ptr_array_remove_index (kv->vals, (guint) i);
  }
}

static char *
kv_string (const Kv *kv)
{
  GString *s = g_string_new (NULL);

  for (guint i = 0; i < kv->keys->len; i++) {
    const char *k = kv->keys->pdata[i];
    const char *v = kv->vals->pdata[i];

    if (s->len)
      g_string_append_c (s, ',');
    if (!(i == 0 && kv->first_bare && strcmp (k, kv->implied) == 0)) {
      g_string_append (s, k);
      if (v)
        g_string_append_c (s, '=');
    }
    for (; v && *v; v++) {
      if (*v == ',')
        g_string_append_c (s, ',');
      g_string_append_c (s, *v);
    }
  }
  return g_string_free (s, FALSE);
}

/* ---- the VM config ----------------------------------------------------- */

static bool
is_drive_key (const char *key)
{
  static const char *const prefixes[] = {
    "ide", "sata", "scsi", "virtio", "efidisk", "tpmstate", NULL,
  };

  for (size_t i = 0; prefixes[i]; i++) {
    size_t n = strlen (prefixes[i]);

    if (strncmp (key, prefixes[i], n) == 0 && key[n]) {
      for (const char *d = key + n; *d; d++)
        if (!g_ascii_isdigit (*d))
          return false;
      return true;
    }
  }
  return false;
}

/* The config's main section: key -> value (the snapshots that follow a
 * "[name]" line are not the running VM). */
static GHashTable *
read_conf (const char *path, char **description)
{
  GHashTable *conf = g_hash_table_new_full (g_str_hash, g_str_equal, g_free,
                                            g_free);
  g_autofree char *text = NULL;
  g_auto (GStrv) lines = NULL;

  if (!g_file_get_contents (path, &text, NULL, NULL))
    return conf;
  lines = g_strsplit (text, "\n", -1);
  for (size_t i = 0; lines[i]; i++) {
    const char *l = lines[i];
    const char *colon;

    if (g_str_has_prefix (l, "# TEST:") && description && !*description)
      *description = g_strstrip (g_strdup (l + 7));
    if (l[0] == '[')
      break;
    if (l[0] == '#' || !(colon = strchr (l, ':')))
      continue;
    g_hash_table_replace (conf, g_strndup (l, (gsize) (colon - l)),
                          g_strstrip (g_strdup (colon + 1)));
  }
  return conf;
}

/* A property of a drive's config value ("local:100/x.raw,size=4M"). */
static char *
conf_drive_prop (GHashTable *conf, const char *key, const char *prop)
{
  const char *v = g_hash_table_lookup (conf, key);
  g_autoptr (Kv) kv = NULL;

  if (!v)
    return NULL;
  kv = kv_parse (v, "file");
  return g_strdup (kv_get (kv, prop));
}

/* qemu-server's disk sizes: a number with an optional K/M/G/T suffix
 * (binary), bytes without. */
static bool
parse_size (const char *s, uint64_t *out)
{
  char *end = NULL;
  double v;
  double mult = 1;

  if (!s || !*s)
    return false;
  v = g_ascii_strtod (s, &end);
  if (end == s || v < 0)
    return false;
  switch (g_ascii_toupper (*end)) {
  case 'K': mult = 1024.0; end++; break;
  case 'M': mult = 1024.0 * 1024; end++; break;
  case 'G': mult = 1024.0 * 1024 * 1024; end++; break;
  case 'T': mult = 1024.0 * 1024 * 1024 * 1024; end++; break;
  case '\0': break;
  default: return false;
  }
  if (*end)
    return false;
  *out = (uint64_t) (v * mult);
  return true;
}

/* ---- building the fixture ---------------------------------------------- */

typedef struct {
  TlCfgDrive d;
  GPtrArray *layers;     /* local image paths, top first */
  GPtrArray *layer_fmts; /* their formats */
  bool json_size;
} Drive;

typedef struct {
  TlCfgVm *vm;
  const TlCfgOpts *opts;
  GHashTable *conf;
  GHashTable *drives;         /* key -> Drive */
  GHashTable *by_node;        /* top node / BlockBackend name -> Drive */
  GHashTable *dropped_chardevs;
  GHashTable *controller_iothread; /* controller id -> iothread */
  GPtrArray *argv;
  GPtrArray *changes;
  bool io_uring;
  bool odirect;
  char *pflash0_node;         /* -blockdev node of the firmware code */
  bool pflash0_done;
  uint64_t efi_size;          /* JSON size of drive-efidisk0, if any */
} Build;

static void
change (Build *b, const char *fmt, ...) G_GNUC_PRINTF (2, 3);

static void
change (Build *b, const char *fmt, ...)
{
  va_list ap;
  char *s;

  va_start (ap, fmt);
  s = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  for (guint i = 0; i < b->changes->len; i++)
    if (strcmp (b->changes->pdata[i], s) == 0) {
      g_free (s);
      return;
    }
  g_ptr_array_add (b->changes, s);
}

static void
arg2 (Build *b, const char *opt, const char *val)
{
  g_ptr_array_add (b->argv, g_strdup (opt));
  if (val)
    g_ptr_array_add (b->argv, g_strdup (val));
}

static void
drive_free (gpointer p)
{
  Drive *dr = p;

  if (!dr)
    return;
  g_free (dr->d.key);
  g_free (dr->d.top_node);
  g_free (dr->d.format_node);
  g_free (dr->d.file_node);
  g_free (dr->d.blk_name);
  g_free (dr->d.qdev_id);
  g_free (dr->d.qom_path);
  g_free (dr->d.io_dev);
  g_free (dr->d.device_driver);
  g_free (dr->d.device_id_prop);
  g_free (dr->d.iothread);
  g_free (dr->d.path);
  g_strfreev (dr->d.layers);
  g_free (dr->d.format);
  if (dr->layers)
    g_ptr_array_unref (dr->layers);
  if (dr->layer_fmts)
    g_ptr_array_unref (dr->layer_fmts);
  g_free (dr);
}

static Drive *
drive_get (Build *b, const char *key)
{
  Drive *dr = g_hash_table_lookup (b->drives, key);

  if (!dr) {
    dr = g_new0 (Drive, 1);
    dr->d.key = g_strdup (key);
    dr->layers = g_ptr_array_new_with_free_func (g_free);
    dr->layer_fmts = g_ptr_array_new_with_free_func (g_free);
    dr->d.backed_up = true;
    dr->d.attached = true;
    g_hash_table_insert (b->drives, dr->d.key, dr);
  }
  return dr;
}

/* The local path of a new layer of the drive's image. */
static const char *
drive_add_layer (Build *b, Drive *dr, const char *format)
{
  g_autofree char *name = NULL;

  if (dr->layers->len == 0)
    name = g_strdup_printf ("%s.%s", dr->d.key, format);
  else
    name = g_strdup_printf ("%s-L%u.%s", dr->d.key, dr->layers->len, format);
  g_ptr_array_add (dr->layers, g_build_filename (b->vm->vm->dir, name, NULL));
  g_ptr_array_add (dr->layer_fmts, g_strdup (format));
  return dr->layers->pdata[dr->layers->len - 1];
}

static const char *
json_str (json_object *o, const char *key)
{
  json_object *v;

  return json_object_object_get_ex (o, key, &v) ? json_object_get_string (v)
                                                : NULL;
}

static bool
json_true (json_object *o, const char *key)
{
  json_object *v;

  return json_object_object_get_ex (o, key, &v) && json_object_get_boolean (v);
}

static bool
is_format_driver (const char *drv)
{
  static const char *const formats[] = {
    "raw", "qcow2", "qcow", "vmdk", "vpc", "vdi", "vhdx", "qed", "parallels",
    "cloop", "dmg", "bochs", NULL,
  };

  return drv && g_strv_contains (formats, drv);
}

/* Rewrite a protocol (leaf) node's options for a local file. */
static bool
rewrite_file_node (Build *b, json_object *node, const char *path,
                   GError **err)
{
  const char *drv = json_str (node, "driver");
  json_object *cache;

  if (g_strcmp0 (drv, "file") != 0 && g_strcmp0 (drv, "host_device") != 0
      && g_strcmp0 (drv, "host_cdrom") != 0) {
    g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_UNSUPPORTED,
                 "needs a %s storage", drv ? drv : "(no driver)");
    return false;
  }
  if (strcmp (drv, "file") != 0) {
    change (b, "%s nodes: driver file on a local regular file", drv);
    json_object_object_add (node, "driver", json_object_new_string ("file"));
  }
  json_object_object_add (node, "filename", json_object_new_string (path));
  if (g_strcmp0 (json_str (node, "aio"), "io_uring") == 0 && !b->io_uring) {
    change (b, "aio io_uring -> threads (this QEMU has no io_uring)");
    json_object_object_add (node, "aio", json_object_new_string ("threads"));
  }
  if (json_object_object_get_ex (node, "cache", &cache)
      && json_true (cache, "direct") && !b->odirect) {
    change (b, "cache.direct false (no O_DIRECT on the scratch file system)");
    json_object_object_add (cache, "direct", json_object_new_boolean (0));
    if (g_strcmp0 (json_str (node, "aio"), "native") == 0)
      json_object_object_add (node, "aio", json_object_new_string ("threads"));
  }
  return true;
}

/* Walk a -blockdev tree from a drive's top node: note the node names, the
 * format and size, and give each layer (the node and its backing chain) a
 * local image. */
static bool
walk_blockdev (Build *b, Drive *dr, json_object *node, bool top, int depth,
               GError **err)
{
  const char *drv = json_str (node, "driver");
  const char *name = json_str (node, "node-name");
  json_object *file, *backing, *size;

  if (depth > 16) {
    g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
                 "%s: node tree too deep", dr->d.key);
    return false;
  }
  if (!drv) {
    g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
                 "%s: a node without driver", dr->d.key);
    return false;
  }
  if (is_format_driver (drv)) {
    /* The first format node below the top filters is the drive's. */
    if (!dr->d.format) {
      dr->d.format = g_strdup (drv);
      dr->d.format_node = g_strdup (name);
      if (json_object_object_get_ex (node, "size", &size)) {
        dr->d.size = (uint64_t) json_object_get_int64 (size);
        dr->json_size = true;
      }
    }
    if (!json_object_object_get_ex (node, "file", &file)
        || !json_object_is_type (file, json_type_object)) {
      g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
                   "%s: format node %s without an inline file node",
                   dr->d.key, name ? name : "?");
      return false;
    }
    if (!dr->d.file_node)
      dr->d.file_node = g_strdup (json_str (file, "node-name"));
    if (!rewrite_file_node (b, file, drive_add_layer (b, dr, drv), err))
      return false;
    if (json_object_object_get_ex (node, "backing", &backing)
        && json_object_is_type (backing, json_type_object))
      return walk_blockdev (b, dr, backing, false, depth + 1, err);
    return true;
  }
  if (!top && !json_object_object_get_ex (node, "file", &file)) {
    g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_UNSUPPORTED,
                 "%s: needs a %s storage", dr->d.key, drv);
    return false;
  }
  if (json_object_object_get_ex (node, "file", &file)
      && json_object_is_type (file, json_type_object)) {
    /* A filter (throttle, zeroinit, alloc-track) */
    return walk_blockdev (b, dr, file, false, depth + 1, err);
  }
  g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_UNSUPPORTED,
               "%s: a %s node directly under the device (storage without a "
               "format layer)", dr->d.key, drv);
  return false;
}

static bool
handle_blockdev (Build *b, const char *val, GError **err)
{
  json_object *node = json_tokener_parse (val);
  const char *name;
  bool ok = true;

  if (!node || !json_object_is_type (node, json_type_object)) {
    json_object_put (node);
    g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
                 "-blockdev is not a JSON object: %s", val);
    return false;
  }
  name = json_str (node, "node-name");
  if (g_strcmp0 (name, "pflash0") == 0
      || (name && g_strcmp0 (b->pflash0_node, name) == 0)) {
    json_object *file;

    if (!json_object_object_get_ex (node, "file", &file)
        || !json_object_is_type (file, json_type_object)) {
      g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
                   "pflash0 without an inline file node");
      ok = false;
    } else {
      ok = rewrite_file_node (b, file, b->vm->pflash0, err);
      b->pflash0_done = true;
      change (b, "pflash0 (firmware code): a zeroed local file");
    }
  } else if (name && g_str_has_prefix (name, "drive-")
             && is_drive_key (name + 6)) {
    Drive *dr = drive_get (b, name + 6);

    dr->d.blockdev = true;
    b->vm->blockdev = true;
    dr->d.top_node = g_strdup (name);
    dr->d.read_only = json_true (node, "read-only");
    ok = walk_blockdev (b, dr, node, true, 0, err);
    if (ok && !dr->d.format) {
      g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_UNSUPPORTED,
                   "%s: no format node", dr->d.key);
      ok = false;
    }
    if (ok)
      g_hash_table_insert (b->by_node, dr->d.top_node, dr);
  } else {
    g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
                 "-blockdev of an unknown node %s", name ? name : "(unnamed)");
    ok = false;
  }
  if (ok)
    arg2 (b, "-blockdev", json_object_to_json_string_ext (
            node, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
  json_object_put (node);
  return ok;
}

/* qemu-server 8: -drive if=none,id=drive-<key>,file=... and
 * if=pflash,unit=0|1. */
static bool
handle_drive (Build *b, const char *val, GError **err)
{
  g_autoptr (Kv) kv = kv_parse (val, NULL);
  g_autofree char *s = NULL;
  const char *ifc = kv_get (kv, "if");
  const char *id = kv_get (kv, "id");
  const char *file = kv_get (kv, "file");
  const char *fmt = kv_get (kv, "format");

  if (g_strcmp0 (ifc, "pflash") == 0 && g_strcmp0 (kv_get (kv, "unit"), "0") == 0) {
    kv_set (kv, "file", b->vm->pflash0);
    b->pflash0_done = true;
    change (b, "pflash0 (firmware code): a zeroed local file");
  } else if (id && g_str_has_prefix (id, "drive-") && is_drive_key (id + 6)) {
    Drive *dr = drive_get (b, id + 6);

    dr->d.blk_name = g_strdup (id);
    dr->d.read_only = g_strcmp0 (kv_get (kv, "readonly"), "on") == 0;
    if (g_strcmp0 (kv_get (kv, "media"), "cdrom") == 0) {
      dr->d.cdrom = true;
      dr->d.read_only = true;
    }
    if (file) {
      if (strchr (file, ':') || file[0] != '/') {
        g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_UNSUPPORTED,
                     "%s: needs storage %s", dr->d.key, file);
        return false;
      }
      dr->d.format = g_strdup (fmt ? fmt : "raw");
      kv_set (kv, "file", drive_add_layer (b, dr, dr->d.format));
    }
    if (g_strcmp0 (ifc, "pflash") == 0)
      dr->d.efidisk = true;
    g_hash_table_insert (b->by_node, dr->d.blk_name, dr);
  } else {
    g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
                 "-drive of an unknown kind: %s", val);
    return false;
  }
  if (g_strcmp0 (kv_get (kv, "aio"), "io_uring") == 0 && !b->io_uring) {
    change (b, "aio io_uring -> threads (this QEMU has no io_uring)");
    kv_set (kv, "aio", "threads");
  }
  if (g_strcmp0 (kv_get (kv, "cache"), "none") == 0 && !b->odirect) {
    change (b, "cache none -> writeback (no O_DIRECT on the scratch file "
            "system)");
    kv_set (kv, "cache", "writeback");
    if (g_strcmp0 (kv_get (kv, "aio"), "native") == 0)
      kv_set (kv, "aio", "threads");
  }
  s = kv_string (kv);
  arg2 (b, "-drive", s);
  return true;
}

static bool
handle_device (Build *b, const char *val, GError **err)
{
  g_autoptr (Kv) kv = kv_parse (val, "driver");
  g_autofree char *s = NULL;
  const char *driver = kv_get (kv, "driver");
  const char *id = kv_get (kv, "id");
  const char *drive = kv_get (kv, "drive");
  const char *netdev = kv_get (kv, "netdev");
  const char *chardev = kv_get (kv, "chardev");

  if (!driver) {
    g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
                 "-device without driver: %s", val);
    return false;
  }
  if (netdev) {
    change (b, "dropped net devices (-device %s,...,netdev=...)", driver);
    return true;
  }
  if (g_str_has_prefix (driver, "tpm-")) {
    change (b, "dropped -device %s (swtpm)", driver);
    return true;
  }
  if (strcmp (driver, "vfio-pci") == 0) {
    change (b, "dropped -device vfio-pci (host PCI passthrough)");
    return true;
  }
  if (chardev && g_hash_table_contains (b->dropped_chardevs, chardev)) {
    change (b, "dropped -device %s (its chardev %s is dropped)", driver,
            chardev);
    return true;
  }
  if (!g_hash_table_contains (qemu_help (&help_devices), driver)) {
    if (drive) {
      g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_UNSUPPORTED,
                   "this QEMU has no device %s (for drive %s)", driver, drive);
      return false;
    }
    change (b, "dropped -device %s (not in this QEMU)", driver);
    return true;
  }
  if (id && kv_get (kv, "iothread"))
    g_hash_table_insert (b->controller_iothread, g_strdup (id),
                         g_strdup (kv_get (kv, "iothread")));
  if (drive) {
    Drive *dr = g_hash_table_lookup (b->by_node, drive);

    if (!dr) {
      g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
                   "-device %s: drive %s is not defined before", driver, drive);
      return false;
    }
    dr->d.device_driver = g_strdup (driver);
    dr->d.qdev_id = g_strdup (id);
    dr->d.device_id_prop = g_strdup (kv_get (kv, "device_id"));
    if (id) {
      dr->d.qom_path = g_strdup_printf ("/machine/peripheral/%s", id);
      if (g_str_has_prefix (driver, "virtio-blk"))
        dr->d.io_dev = g_strdup_printf ("/machine/peripheral/%s/virtio-backend",
                                        id);
      else
        dr->d.io_dev = g_strdup (id);
    }
    if (kv_get (kv, "iothread"))
      dr->d.iothread = g_strdup (kv_get (kv, "iothread"));
    else if (kv_get (kv, "bus")) {
      /* scsi-hd on virtioscsiN.0: the controller's iothread */
      g_autofree char *ctrl = g_strdup (kv_get (kv, "bus"));
      char *dot = strrchr (ctrl, '.');

      if (dot)
        *dot = '\0';
      dr->d.iothread = g_strdup (g_hash_table_lookup (b->controller_iothread,
                                                      ctrl));
    }
    if (strstr (driver, "-cd"))
      dr->d.cdrom = true;
  } else if (id && (strcmp (driver, "ide-cd") == 0
                    || strcmp (driver, "scsi-cd") == 0)
             && is_drive_key (id)) {
    /* An empty CD-ROM drive (ide2: none,media=cdrom) */
    Drive *dr = drive_get (b, id);

    dr->d.cdrom = true;
    dr->d.read_only = true;
    dr->d.backed_up = false;
    dr->d.device_driver = g_strdup (driver);
    dr->d.qdev_id = g_strdup (id);
    dr->d.qom_path = g_strdup_printf ("/machine/peripheral/%s", id);
    dr->d.io_dev = g_strdup (id);
  }
  s = kv_string (kv);
  arg2 (b, "-device", s);
  return true;
}

static bool
handle_chardev (Build *b, const char *val, GError **err)
{
  g_autoptr (Kv) kv = kv_parse (val, "backend");
  g_autofree char *s = NULL;
  const char *id = kv_get (kv, "id");
  const char *backend = kv_get (kv, "backend");
  const char *path = kv_get (kv, "path");

  if (!id) {
    g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
                 "-chardev without id: %s", val);
    return false;
  }
  if (strcmp (id, "qmp") == 0 || strcmp (id, "qmp-event") == 0) {
    change (b, "dropped the QMP and qmeventd monitors (testlib's QMP "
            "sockets instead)");
    g_hash_table_add (b->dropped_chardevs, g_strdup (id));
    return true;
  }
  if (strcmp (id, "tpmchar") == 0 || g_str_has_prefix (backend, "spice")) {
    change (b, "dropped -chardev %s (%s)", id,
            strcmp (id, "tpmchar") == 0 ? "swtpm" : "spice");
    g_hash_table_add (b->dropped_chardevs, g_strdup (id));
    return true;
  }
  if (!backend || !g_hash_table_contains (qemu_help (&help_chardevs), backend)) {
    change (b, "dropped -chardev %s (no backend %s in this QEMU)", id,
            backend ? backend : "?");
    g_hash_table_add (b->dropped_chardevs, g_strdup (id));
    return true;
  }
  if (path) {
    g_autofree char *local = g_strdup_printf ("%s/%s.sock", b->vm->vm->dir,
                                              id);

    kv_set (kv, "path", local);
    change (b, "chardev sockets in the scratch dir");
  }
  s = kv_string (kv);
  arg2 (b, "-chardev", s);
  return true;
}

static bool
handle_machine (Build *b, const char *val, GError **err)
{
  g_autoptr (Kv) kv = kv_parse (val, "type");
  g_autofree char *s = NULL;
  const char *type = kv_get (kv, "type");
  const char *pflash0 = kv_get (kv, "pflash0");
  const char *pflash1 = kv_get (kv, "pflash1");

  if (type) {
    g_autofree char *t = g_strdup (type);
    char *plus = strstr (t, "+pve");

    if (plus) {
      *plus = '\0';
      change (b, "-machine type %s -> %s", type, t);
      kv_set (kv, "type", t);
    }
    if (!g_hash_table_contains (qemu_help (&help_machines), t)) {
      g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_UNSUPPORTED,
                   "this QEMU has no machine type %s", t);
      return false;
    }
    g_free (b->vm->machine);
    b->vm->machine = g_strdup (t);
    b->vm->q35 = strstr (t, "q35") != NULL;
  }
  if (kv_get (kv, "accel")) {
    change (b, "-machine accel=%s dropped (-accel tcg)", kv_get (kv, "accel"));
    kv_del (kv, "accel");
  }
  if (pflash0 && strcmp (pflash0, "pflash0") != 0) {
    g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
                 "pflash0=%s is not the node pflash0", pflash0);
    return false;
  }
  if (pflash1) {
    Drive *dr = g_hash_table_lookup (b->by_node, pflash1);

    if (!dr) {
      g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
                   "pflash1=%s is not a drive defined before", pflash1);
      return false;
    }
    dr->d.efidisk = true;
  }
  s = kv_string (kv);
  arg2 (b, "-machine", s);
  return true;
}

/* What -readconfig pve-q35-4.0.cfg (and pve-q35.cfg) defines that the
 * fixtures' devices use: the EHCI controller "ehci", the DMI-PCI bridge
 * with the PCI bridges pci.0-pci.2, and the root ports
 * ich9-pcie-port-1..4. */
static void
q35_readconfig_equivalent (Build *b, const char *file)
{
  static const char *const devices[] = {
    "ich9-usb-ehci1,id=ehci,multifunction=on,bus=pcie.0,addr=1d.7",
    "i82801b11-bridge,id=pcidmi,bus=pcie.0,addr=1e.0",
    "pci-bridge,id=pci.0,bus=pcidmi,addr=1.0,chassis_nr=1",
    "pci-bridge,id=pci.1,bus=pcidmi,addr=2.0,chassis_nr=2",
    "pci-bridge,id=pci.2,bus=pcidmi,addr=3.0,chassis_nr=3",
    "ioh3420,id=ich9-pcie-port-1,multifunction=on,bus=pcie.0,addr=1c.0,"
    "port=1,chassis=1",
    "ioh3420,id=ich9-pcie-port-2,bus=pcie.0,addr=1c.1,port=2,chassis=2",
    "ioh3420,id=ich9-pcie-port-3,bus=pcie.0,addr=1c.2,port=3,chassis=3",
    "ioh3420,id=ich9-pcie-port-4,bus=pcie.0,addr=1c.3,port=4,chassis=4",
    NULL,
  };

  for (size_t i = 0; devices[i]; i++)
    arg2 (b, "-device", devices[i]);
  change (b, "-readconfig %s replaced by -device ehci (ich9-usb-ehci1), "
          "pcidmi (i82801b11-bridge) with pci.0, pci.1, pci.2 (pci-bridge), "
          "ich9-pcie-port-1..4 (ioh3420); its UHCI companions and audio are "
          "left out", file);
}

/* Value-less options of qemu-server's command lines. */
static bool
is_flag (const char *opt)
{
  static const char *const flags[] = {
    "no-shutdown", "daemonize", "nodefaults", "nographic", "snapshot", "S",
    "no-reboot", "no-hpet", "enable-kvm", "no-acpi", NULL,
  };

  return g_strv_contains (flags, opt);
}

static bool
handle_option (Build *b, const char *opt, const char *val, GError **err)
{
  if (strcmp (opt, "blockdev") == 0)
    return handle_blockdev (b, val, err);
  if (strcmp (opt, "drive") == 0)
    return handle_drive (b, val, err);
  if (strcmp (opt, "device") == 0)
    return handle_device (b, val, err);
  if (strcmp (opt, "chardev") == 0)
    return handle_chardev (b, val, err);
  if (strcmp (opt, "machine") == 0)
    return handle_machine (b, val, err);
  if (strcmp (opt, "mon") == 0) {
    g_autoptr (Kv) kv = kv_parse (val, "chardev");
    const char *c = kv_get (kv, "chardev");

    if (c && g_hash_table_contains (b->dropped_chardevs, c))
      return true;
    arg2 (b, "-mon", val);
    return true;
  }
  if (strcmp (opt, "object") == 0) {
    if (strstr (val, "sev-") || strstr (val, "tdx-guest")) {
      g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_UNSUPPORTED,
                   "needs a confidential guest (%s)", val);
      return false;
    }
    if (strstr (val, "memory-backend-file")) {
      g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_UNSUPPORTED,
                   "needs hugepages (%s)", val);
      return false;
    }
    arg2 (b, "-object", val);
    return true;
  }
  if (strcmp (opt, "readconfig") == 0) {
    if (strstr (val, "pve-q35")) {
      q35_readconfig_equivalent (b, val);
      return true;
    }
    g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
                 "-readconfig %s", val);
    return false;
  }
  if (strcmp (opt, "id") == 0 || strcmp (opt, "pidfile") == 0
      || strcmp (opt, "daemonize") == 0 || strcmp (opt, "vnc") == 0
      || strcmp (opt, "spice") == 0 || strcmp (opt, "nographic") == 0
      || strcmp (opt, "iscsi") == 0 || strcmp (opt, "cpu") == 0
      || strcmp (opt, "tpmdev") == 0 || strcmp (opt, "netdev") == 0
      || strcmp (opt, "bios") == 0) {
    change (b, "dropped -%s", opt);
    return true;
  }
  if (strcmp (opt, "boot") == 0) {
    g_autoptr (Kv) kv = kv_parse (val, "order");
    g_autofree char *s = NULL;

    if (kv_get (kv, "splash")) {
      /* QEMU only warns about the missing file, but into the log that
       * tests read */
      kv_del (kv, "splash");
      change (b, "-boot splash= dropped (qemu-server's boot splash file)");
    }
    s = kv_string (kv);
    arg2 (b, "-boot", s);
    return true;
  }
  if (strcmp (opt, "snapshot") == 0)
    b->vm->snapshot = true;
  if (strcmp (opt, "name") == 0 || strcmp (opt, "no-shutdown") == 0
      || strcmp (opt, "smbios") == 0 || strcmp (opt, "smp") == 0
      || strcmp (opt, "nodefaults") == 0 || strcmp (opt, "boot") == 0
      || strcmp (opt, "m") == 0 || strcmp (opt, "global") == 0
      || strcmp (opt, "numa") == 0 || strcmp (opt, "rtc") == 0
      || strcmp (opt, "vga") == 0 || strcmp (opt, "snapshot") == 0
      || strcmp (opt, "S") == 0 || strcmp (opt, "no-reboot") == 0) {
    g_autofree char *o = g_strdup_printf ("-%s", opt);

    arg2 (b, o, val);
    return true;
  }
  g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
               "unknown option -%s", opt);
  return false;
}

/* ---- images ------------------------------------------------------------ */

static void
run (const char *const *argv)
{
  g_autoptr (GError) err = NULL;
  g_autofree char *out = NULL;
  g_autofree char *errout = NULL;
  g_autofree char *cmdline = g_strjoinv (" ", (char **) argv);
  int status = 0;

  if (!g_spawn_sync (NULL, (char **) argv, NULL,
                     G_SPAWN_SEARCH_PATH | G_SPAWN_STDIN_FROM_DEV_NULL, NULL,
                     NULL, &out, &errout, &status, &err)
      || !g_spawn_check_wait_status (status, &err))
    ck_abort_msg ("%s failed: %s\n%s%s", cmdline, err->message,
                  out ? out : "", errout ? errout : "");
}

static void
make_sparse (const char *path, uint64_t size)
{
  int fd = open (path, O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0600);

  ck_assert_msg (fd >= 0 && ftruncate (fd, (off_t) size) == 0,
                 "cannot create %s: %s", path, g_strerror (errno));
  close (fd);
}

static guint64
mix (guint64 x)
{
  x += G_GUINT64_CONSTANT (0x9e3779b97f4a7c15);
  x = (x ^ (x >> 30)) * G_GUINT64_CONSTANT (0xbf58476d1ce4e5b9);
  x = (x ^ (x >> 27)) * G_GUINT64_CONSTANT (0x94d049bb133111eb);
  return x ^ (x >> 31);
}

/* A 64 KiB pattern block at the start of every MiB of a raw file. */
static void
write_sparse_pattern (const char *path, uint64_t size, unsigned seed)
{
  g_autofree guint8 *buf = g_malloc (65536);
  int fd = open (path, O_WRONLY | O_CLOEXEC);

  ck_assert_msg (fd >= 0, "cannot open %s", path);
  for (uint64_t off = 0; off < size; off += MiB) {
    size_t len = (size_t) MIN ((uint64_t) 65536, size - off);

    for (size_t i = 0; i < 65536; i += 8) {
      guint64 v = mix (((guint64) seed << 40) ^ (off + i));

      memcpy (buf + i, &v, 8);
    }
    snprintf ((char *) buf, 64, "cfg2cmd seed %u offset %" G_GUINT64_FORMAT,
              seed, (guint64) off);
    ck_assert_msg (pwrite (fd, buf, len, (off_t) off) == (ssize_t) len,
                   "cannot write %s", path);
  }
  close (fd);
}

static void
make_image (TlCfgVm *vm, Drive *dr, TlCfgFill fill, unsigned seed)
{
  g_autofree char *size_str = g_strdup_printf ("%" G_GUINT64_FORMAT,
                                               (guint64) dr->d.size);
  guint n = dr->layers->len;
  const char *base = dr->layers->pdata[n - 1];
  const char *base_fmt = dr->layer_fmts->pdata[n - 1];

  /* The base (last) layer holds the data; layers above are empty
   * overlays naming it as their backing file. */
  if (fill == TL_CFG_FILL_PATTERN && !dr->d.cdrom) {
    TlQemu images = { 0 };
    g_autofree char *name = g_path_get_basename (base);
    char *made;

    images.dir = vm->vm->dir;
    made = tl_make_image (&images, name, base_fmt, dr->d.size, seed);
    g_free (made);
  } else if (strcmp (base_fmt, "raw") == 0) {
    make_sparse (base, dr->d.size);
    if (fill == TL_CFG_FILL_SPARSE && !dr->d.cdrom)
      write_sparse_pattern (base, dr->d.size, seed);
  } else {
    g_autofree char *raw = g_strdup_printf ("%s.tl-raw", base);
    const char *convert[] = { "qemu-img", "convert", "-q", "-f", "raw", "-O",
                              base_fmt, raw, base, NULL };

    make_sparse (raw, dr->d.size);
    if (fill == TL_CFG_FILL_SPARSE && !dr->d.cdrom)
      write_sparse_pattern (raw, dr->d.size, seed);
    run (convert);
    g_unlink (raw);
  }
  for (guint i = n - 1; i-- > 0; ) {
    const char *create[] = { "qemu-img", "create", "-q", "-f",
                             dr->layer_fmts->pdata[i], "-b",
                             dr->layers->pdata[i + 1], "-F",
                             dr->layer_fmts->pdata[i + 1],
                             dr->layers->pdata[i], size_str, NULL };

    run (create);
  }
}

static bool
odirect_works (const char *dir)
{
  g_autofree char *path = g_build_filename (dir, "odirect.probe", NULL);
  void *buf = NULL;
  bool ok = false;
  int fd = open (path, O_CREAT | O_RDWR | O_DIRECT | O_CLOEXEC, 0600);

  if (fd >= 0 && posix_memalign (&buf, 4096, 4096) == 0) {
    memset (buf, 0, 4096);
    ok = pwrite (fd, buf, 4096, 0) == 4096;
  }
  free (buf);
  if (fd >= 0)
    close (fd);
  g_unlink (path);
  return ok;
}

/* ---- public ------------------------------------------------------------ */

const char *
tl_cfg2cmd_dir (GError **err)
{
  static char *dir;
  const char *src = g_getenv ("FLEECE_QEMU_SERVER_SRC");
  g_autofree char *d = NULL;

  if (!src || !*src) {
    g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_NO_SOURCE,
                 "FLEECE_QEMU_SERVER_SRC is not set: point it to a qemu-server "
                 "source tree (its src/test/cfg2cmd holds the fixtures)");
    return NULL;
  }
  d = g_build_filename (src, "src", "test", "cfg2cmd", NULL);
  if (!g_file_test (d, G_FILE_TEST_IS_DIR)) {
    g_free (d);
    d = g_build_filename (src, "test", "cfg2cmd", NULL);
  }
  if (!g_file_test (d, G_FILE_TEST_IS_DIR)) {
    g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_NO_SOURCE,
                 "FLEECE_QEMU_SERVER_SRC=%s has no src/test/cfg2cmd: not a "
                 "qemu-server source tree", src);
    return NULL;
  }
  if (g_strcmp0 (dir, d) != 0) {
    g_free (dir);
    dir = g_steal_pointer (&d);
  }
  return dir;
}

static gint
compare_names (gconstpointer a, gconstpointer b)
{
  return strcmp (*(char *const *) a, *(char *const *) b);
}

char **
tl_cfg2cmd_list (GError **err)
{
  const char *dir = tl_cfg2cmd_dir (err);
  GPtrArray *names;
  GDir *d;
  const char *n;

  if (!dir || !(d = g_dir_open (dir, 0, err)))
    return NULL;
  names = g_ptr_array_new ();
  while ((n = g_dir_read_name (d)))
    if (g_str_has_suffix (n, ".conf.cmd"))
      g_ptr_array_add (names, g_strndup (n, strlen (n) - strlen (".conf.cmd")));
  g_dir_close (d);
  g_ptr_array_sort (names, compare_names);
  g_ptr_array_add (names, NULL);
  return (char **) g_ptr_array_free (names, FALSE);
}

static gint
compare_drives (gconstpointer a, gconstpointer b)
{
  const Drive *x = *(Drive *const *) a;
  const Drive *y = *(Drive *const *) b;

  return strcmp (x->d.key, y->d.key);
}

static void
vm_add_disk (TlCfgVm *vm, const TlCfgDrive *d)
{
  TlVm *v = vm->vm;
  TlDisk *disks = g_renew (TlDisk, (TlDisk *) v->disks, v->ndisks + 1);
  guint np = v->paths ? g_strv_length (v->paths) : 0;

  disks[v->ndisks] = (TlDisk) {
    .key = d->key, .format = d->format, .size = d->size, .bus = "none",
    .fleeced = !g_str_has_prefix (d->key, "efidisk")
               && !g_str_has_prefix (d->key, "tpmstate"),
  };
  v->disks = disks;
  v->ndisks++;
  v->paths = g_renew (char *, v->paths, np + 2);
  v->paths[np] = g_strdup (d->path);
  v->paths[np + 1] = NULL;
}

static const char *const firmware_dirs[] = {
  "/usr/share/seabios", "/usr/lib/ipxe/qemu", "/usr/share/qemu", NULL,
};

TlCfgVm *
tl_cfg2cmd_new (const char *fixture, const TlCfgOpts *opts_in, GError **err)
{
  TlCfgOpts opts = { 0 };
  g_autofree char *cmd_path = NULL;
  g_autofree char *conf_path = NULL;
  g_autofree char *text = NULL;
  g_autoptr (GPtrArray) words = NULL;
  g_autoptr (GPtrArray) sorted = NULL;
  Build b = { 0 };
  TlCfgVm *vm;
  bool ok = true;
  unsigned seed;

  if (opts_in)
    opts = *opts_in;
  if (!opts.default_size)
    opts.default_size = DEFAULT_SIZE;
  if (!opts.first_seed)
    opts.first_seed = 1;

  if (strchr (fixture, '/')) {
    cmd_path = g_strdup (fixture);
  } else {
    const char *dir = tl_cfg2cmd_dir (err);

    if (!dir)
      return NULL;
    cmd_path = g_strdup_printf ("%s/%s.conf.cmd", dir, fixture);
  }
  if (!g_file_get_contents (cmd_path, &text, NULL, NULL)) {
    g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_NO_FIXTURE,
                 "no fixture %s in this qemu-server tree", cmd_path);
    return NULL;
  }
  conf_path = g_strndup (cmd_path, strlen (cmd_path) - (g_str_has_suffix (
                           cmd_path, ".cmd") ? 4 : 0));
  words = shell_split (text, err);
  if (!words)
    return NULL;
  if (words->len < 1) {
    g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
                 "%s is empty", cmd_path);
    return NULL;
  }

  vm = g_new0 (TlCfgVm, 1);
  vm->cmd_path = g_strdup (cmd_path);
  {
    g_autofree char *base = g_path_get_basename (cmd_path);

    vm->name = g_strndup (base, strlen (base)
                          - (g_str_has_suffix (base, ".conf.cmd") ? 9 : 0));
  }
  vm->vm = g_new0 (TlVm, 1);
  vm->vm->dir = tl_tmpdir_new ("cfg");
  vm->pflash0 = g_build_filename (vm->vm->dir, "pflash0-code.fd", NULL);

  b.vm = vm;
  b.opts = &opts;
  b.conf = read_conf (conf_path, &vm->description);
  b.drives = g_hash_table_new_full (g_str_hash, g_str_equal, NULL, drive_free);
  b.by_node = g_hash_table_new (g_str_hash, g_str_equal);
  b.dropped_chardevs = g_hash_table_new_full (g_str_hash, g_str_equal, g_free,
                                              NULL);
  b.controller_iothread = g_hash_table_new_full (g_str_hash, g_str_equal,
                                                 g_free, g_free);
  b.argv = g_ptr_array_new_with_free_func (g_free);
  b.changes = g_ptr_array_new_with_free_func (g_free);
  b.odirect = odirect_works (vm->vm->dir);
  {
    /* per binary: one QEMU run per process, not per fixture */
    static char *probed_for;
    static bool io_uring;

    if (g_strcmp0 (probed_for, qemu_binary ()) != 0) {
      io_uring = qemu_opens (vm->vm->dir, "\"aio\":\"io_uring\"");
      g_free (probed_for);
      probed_for = g_strdup (qemu_binary ());
    }
    b.io_uring = io_uring;
  }

  /* Firmware (SeaBIOS, VGA BIOS, iPXE ROMs): a QEMU built from source
   * finds none of the distribution's; a packaged QEMU searches these
   * anyway. */
  for (size_t i = 0; firmware_dirs[i]; i++)
    if (g_file_test (firmware_dirs[i], G_FILE_TEST_IS_DIR))
      arg2 (&b, "-L", firmware_dirs[i]);
  change (&b, "-L for the distribution's firmware dirs (a QEMU built from "
          "source has none)");

  for (guint i = 1; ok && i < words->len; i++) {
    const char *w = words->pdata[i];
    const char *opt;
    const char *val = NULL;

    if (w[0] != '-') {
      g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
                   "%s: unexpected word %s", vm->name, w);
      ok = false;
      break;
    }
    opt = w + (w[1] == '-' ? 2 : 1);
    if (!is_flag (opt)) {
      if (i + 1 >= words->len) {
        g_set_error (err, TL_CFG2CMD_ERROR, TL_CFG2CMD_ERROR_PARSE,
                     "%s: -%s without a value", vm->name, opt);
        ok = false;
        break;
      }
      val = words->pdata[++i];
    }
    ok = handle_option (&b, opt, val, err);
  }
  if (ok && !b.vm->machine) {
    vm->machine = g_strdup ("pc");
    change (&b, "no -machine: pc");
  }

  /* TPM: the state is swtpm's while the VM runs; qemu-server attaches it
   * as drive-tpmstate0-backup for a backup. */
  if (ok && g_hash_table_contains (b.conf, "tpmstate0")) {
    Drive *dr = drive_get (&b, "tpmstate0");

    dr->d.attached = false;
    dr->d.format = g_strdup ("raw");
    drive_add_layer (&b, dr, "raw");
  }

  /* Sizes, in key order; then the images. */
  if (ok) {
    GHashTableIter it;
    gpointer v;

    sorted = g_ptr_array_new ();
    g_hash_table_iter_init (&it, b.drives);
    while (g_hash_table_iter_next (&it, NULL, &v))
      g_ptr_array_add (sorted, v);
    g_ptr_array_sort (sorted, compare_drives);
  }
  for (guint i = 0; ok && sorted && i < sorted->len; i++) {
    Drive *dr = sorted->pdata[i];
    g_autofree char *conf_size = conf_drive_prop (b.conf, dr->d.key, "size");
    uint64_t sz = 0;

    if (g_str_has_prefix (dr->d.key, "efidisk"))
      dr->d.efidisk = true;
    if (!dr->layers->len) {
      dr->d.size = 0;   /* an empty CD-ROM drive */
      dr->d.size_from = "empty";
    } else if (dr->json_size) {
      dr->d.size_from = "json";
    } else if (dr->d.efidisk) {
      g_autofree char *efitype = conf_drive_prop (b.conf, dr->d.key, "efitype");

      dr->d.size = g_strcmp0 (efitype, "4m") == 0 ? EFI_VARS_4M : EFI_VARS_2M;
      dr->d.size_from = "efitype";
    } else if (parse_size (conf_size, &sz) && sz > 0) {
      dr->d.size = sz;
      dr->d.size_from = "conf";
    } else {
      dr->d.size = opts.default_size;
      dr->d.size_from = "default";
    }
    if (!dr->json_size && !dr->d.efidisk && opts.max_size
        && dr->d.size > opts.max_size) {
      dr->d.size = opts.max_size;
      dr->d.size_from = "capped";
    }
    if (dr->d.format && strcmp (dr->d.format, "raw") != 0
        && dr->d.size % 512) {
      dr->d.size = (dr->d.size + 511) / 512 * 512;
      change (&b, "%s: size rounded up to a multiple of 512 (%s)", dr->d.key,
              dr->d.format);
    }
    if (dr->d.efidisk && !b.efi_size)
      b.efi_size = dr->d.size;
    if (dr->d.efidisk && !dr->d.io_dev) {
      dr->d.device_driver = g_strdup ("pflash");
      dr->d.qom_path = g_strdup ("/machine/system.flash1");
      dr->d.io_dev = g_strdup ("/machine/system.flash1");
    }
    if (dr->d.cdrom)
      dr->d.backed_up = false;
    if (dr->layers->len) {
      g_ptr_array_add (dr->layers, NULL);
      dr->d.layers = g_strdupv ((char **) dr->layers->pdata);
      g_ptr_array_remove_index (dr->layers, dr->layers->len - 1);
      dr->d.path = g_strdup (dr->layers->pdata[0]);
    }
  }

  if (ok) {
    seed = opts.first_seed;
    for (guint i = 0; i < sorted->len; i++) {
      Drive *dr = sorted->pdata[i];

      if (dr->layers->len)
        make_image (vm, dr, dr->d.cdrom ? TL_CFG_FILL_ZERO : opts.fill,
                    dr->d.backed_up ? seed++ : 0);
    }
    if (b.pflash0_done) {
      make_sparse (vm->pflash0, b.efi_size == EFI_VARS_4M ? EFI_CODE_4M
                                                           : EFI_CODE_2M);
    } else {
      g_clear_pointer (&vm->pflash0, g_free);
    }

    /* The result, sorted by key; vm->disks: backed-up drives attached at
     * start. */
    vm->ndrives = sorted->len;
    vm->drives = g_new0 (TlCfgDrive, sorted->len);
    for (guint i = 0; i < sorted->len; i++) {
      Drive *dr = sorted->pdata[i];

      vm->drives[i] = dr->d;
      memset (&dr->d, 0, sizeof dr->d);
    }
    for (size_t i = 0; i < vm->ndrives; i++)
      if (vm->drives[i].backed_up && vm->drives[i].attached
          && vm->drives[i].path)
        vm_add_disk (vm, &vm->drives[i]);
    if (!vm->vm->paths)
      vm->vm->paths = g_new0 (char *, 1);

    g_ptr_array_add (b.argv, NULL);
    vm->argv = (char **) g_ptr_array_free (g_steal_pointer (&b.argv), FALSE);
    g_ptr_array_add (b.changes, NULL);
    vm->changes = (char **) g_ptr_array_free (g_steal_pointer (&b.changes),
                                              FALSE);
  }

  g_hash_table_unref (b.conf);
  g_hash_table_unref (b.by_node);
  g_hash_table_unref (b.drives);
  g_hash_table_unref (b.dropped_chardevs);
  g_hash_table_unref (b.controller_iothread);
  if (b.argv)
    g_ptr_array_unref (b.argv);
  if (b.changes)
    g_ptr_array_unref (b.changes);
  g_free (b.pflash0_node);
  if (!ok) {
    g_prefix_error (err, "%s: ", vm->name);
    tl_cfg2cmd_stop (vm);
    return NULL;
  }
  return vm;
}

void
tl_cfg2cmd_launch (TlCfgVm *vm, const char *const *extra_args)
{
  g_autoptr (GPtrArray) args = g_ptr_array_new ();

  for (size_t i = 0; vm->argv[i]; i++)
    g_ptr_array_add (args, vm->argv[i]);
  for (size_t i = 0; extra_args && extra_args[i]; i++)
    g_ptr_array_add (args, (gpointer) extra_args[i]);
  g_ptr_array_add (args, NULL);
  vm->vm->q = tl_qemu_start ((const char *const *) args->pdata);
  vm->q = vm->vm->q;
  if (!vm->vm->storage) {
    vm->vm->storage = g_build_filename (vm->vm->dir, "storage", NULL);
    vm->vm->target = g_build_filename (vm->vm->dir, "target", NULL);
    vm->vm->state = g_build_filename (vm->vm->dir, "state", NULL);
    ck_assert_int_eq (g_mkdir (vm->vm->storage, 0700), 0);
    ck_assert_int_eq (g_mkdir (vm->vm->target, 0700), 0);
  }
  g_strfreev (vm->vm->nodes_before);
  vm->vm->nodes_before = tl_node_names (vm->q);
}

TlCfgVm *
tl_cfg2cmd_start_full (const char *fixture, const TlCfgOpts *opts,
                       const char *const *extra_args, GError **err)
{
  TlCfgVm *vm = tl_cfg2cmd_new (fixture, opts, err);

  if (vm)
    tl_cfg2cmd_launch (vm, extra_args);
  return vm;
}

TlCfgVm *
tl_cfg2cmd_start (const char *fixture, GError **err)
{
  return tl_cfg2cmd_start_full (fixture, NULL, NULL, err);
}

void
tl_cfg2cmd_stop (TlCfgVm *vm)
{
  TlDisk *disks;

  if (!vm)
    return;
  disks = (TlDisk *) vm->vm->disks;
  tl_vm_stop (vm->vm);
  g_free (disks);
  for (size_t i = 0; i < vm->ndrives; i++) {
    Drive tmp = { .d = vm->drives[i] };

    drive_free (g_memdup2 (&tmp, sizeof tmp));
  }
  g_free (vm->drives);
  g_free (vm->name);
  g_free (vm->cmd_path);
  g_free (vm->description);
  g_free (vm->machine);
  g_free (vm->pflash0);
  g_strfreev (vm->argv);
  g_strfreev (vm->changes);
  g_free (vm);
}

const TlCfgDrive *
tl_cfg2cmd_drive (const TlCfgVm *vm, const char *key)
{
  for (size_t i = 0; i < vm->ndrives; i++)
    if (strcmp (vm->drives[i].key, key) == 0)
      return &vm->drives[i];
  return NULL;
}

void
tl_cfg2cmd_guest_io (TlCfgVm *vm, const char *key, const char *io_command)
{
  const TlCfgDrive *d = tl_cfg2cmd_drive (vm, key);

  ck_assert_msg (d && d->io_dev, "%s: no guest device for drive %s",
                 vm->name, key);
  tl_guest_io (vm->q, d->io_dev, io_command);
}

void
tl_cfg2cmd_attach_tpm_backup (TlCfgVm *vm)
{
  TlCfgDrive *d = (TlCfgDrive *) tl_cfg2cmd_drive (vm, "tpmstate0");
  json_object *ret;

  ck_assert_msg (d && d->path, "%s has no tpmstate0", vm->name);
  /* As qemu-server's Blockdev::attach with 'tpm-backup' and 'read-only':
   * format node drive-tpmstate0-backup over file node
   * tpmstate0-backup-file. */
  ret = tl_qmp (vm->q, "blockdev-add", tl_json (
    "{\"driver\": \"raw\", \"node-name\": \"drive-tpmstate0-backup\","
    " \"read-only\": true, \"discard\": \"ignore\", \"detect-zeroes\": \"on\","
    " \"cache\": {\"direct\": false, \"no-flush\": false},"
    " \"file\": {\"driver\": \"file\", \"filename\": \"%s\","
    " \"node-name\": \"tpmstate0-backup-file\", \"read-only\": true,"
    " \"aio\": \"threads\", \"discard\": \"ignore\","
    " \"detect-zeroes\": \"on\","
    " \"cache\": {\"direct\": false, \"no-flush\": false}}}", d->path));
  json_object_put (ret);
  if (!d->attached) {
    d->attached = true;
    g_free (d->top_node);
    d->top_node = g_strdup ("drive-tpmstate0-backup");
    g_free (d->format_node);
    d->format_node = g_strdup ("drive-tpmstate0-backup");
    g_free (d->file_node);
    d->file_node = g_strdup ("tpmstate0-backup-file");
    d->blockdev = true;
    d->read_only = true;
    vm_add_disk (vm, d);
  }
}

void
tl_cfg2cmd_detach_tpm_backup (TlCfgVm *vm)
{
  json_object *ret = tl_qmp_try (vm->q, "blockdev-del", tl_json (
    "{\"node-name\": \"drive-tpmstate0-backup\"}"), NULL);

  json_object_put (ret);
}

char *
tl_cfg2cmd_describe (const TlCfgVm *vm)
{
  GString *s = g_string_new (NULL);

  g_string_append_printf (s, "fixture %s (%s): machine %s, %s\n", vm->name,
                          vm->description ? vm->description : "",
                          vm->machine, vm->blockdev ? "-blockdev" : "-drive");
  for (size_t i = 0; i < vm->ndrives; i++) {
    const TlCfgDrive *d = &vm->drives[i];

    g_string_append_printf (
      s, "  %-10s %s %-6s %10" G_GUINT64_FORMAT " (%s)%s%s%s%s node %s"
      " fmt %s file %s blk %s dev %s id %s qom %s io %s device_id %s"
      " iothread %s image %s\n",
      d->key, d->blockdev ? "blockdev" : "drive", d->format ? d->format : "-",
      (guint64) d->size, d->size_from ? d->size_from : "-",
      d->read_only ? " ro" : "", d->cdrom ? " cdrom" : "",
      d->efidisk ? " efidisk" : "", d->attached ? "" : " not-attached",
      d->top_node ? d->top_node : "-", d->format_node ? d->format_node : "-",
      d->file_node ? d->file_node : "-", d->blk_name ? d->blk_name : "-",
      d->device_driver ? d->device_driver : "-",
      d->qdev_id ? d->qdev_id : "-", d->qom_path ? d->qom_path : "-",
      d->io_dev ? d->io_dev : "-",
      d->device_id_prop ? d->device_id_prop : "-",
      d->iothread ? d->iothread : "-", d->path ? d->path : "-");
  }
  for (size_t i = 0; vm->changes && vm->changes[i]; i++)
    g_string_append_printf (s, "  change: %s\n", vm->changes[i]);
  return g_string_free (s, FALSE);
}

bool
tl_qs_is_small_state (const char *key)
{
  return g_str_has_prefix (key, "efidisk") || g_str_has_prefix (key, "tpmstate");
}

char *
tl_qs_device_of (const char *key)
{
  return g_str_has_prefix (key, "tpmstate") ? g_strdup_printf ("drive-%s-backup", key)
                                            : g_strdup_printf ("drive-%s", key);
}
