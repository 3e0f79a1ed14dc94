/* fleece restore: turn the newest backup of a chain (a full backup, or an
 * incremental whose qcow2 images have the previous backup as their
 * backing files) into plain images, one per drive, with qemu-img.
 *
 * Every chain is checked first with "qemu-img info --backing-chain" and
 * the links it uses are shown; nothing is written before every drive's
 * chain is complete.  An image is converted under a temporary name in the
 * output directory and linked to its name, so an existing file is never
 * overwritten. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fleece-tool.h"

typedef struct {
  char *key;
  char *path;           /* the newest image: <dir>/<key>.<format> */
  const char *format;   /* qcow2 or raw, from its name */
  char *out;            /* <out>/<key>.<format> */
  uint64_t size;
} Image;

static void
image_free (Image *im)
{
  g_free (im->key);
  g_free (im->path);
  g_free (im->out);
  g_free (im);
}

static gint
by_name (gconstpointer a, gconstpointer b)
{
  return strcmp (*(char *const *) a, *(char *const *) b);
}

static const char *
qemu_img (void)
{
  const char *b = g_getenv ("FLEECE_QEMU_IMG");
  return b && *b ? b : "qemu-img";
}

/* <key>.qcow2 and <key>.raw of dir, in key order; the library names
 * backup images so.  Temporary and hidden files are not backups. */
static GPtrArray *
find_images (const char *dir, GError **err)
{
  g_autoptr (GDir) d = g_dir_open (dir, 0, err);
  g_autoptr (GPtrArray) names = g_ptr_array_new_with_free_func (g_free);
  GPtrArray *images = g_ptr_array_new_with_free_func ((GDestroyNotify) image_free);
  const char *name;

  while (d && (name = g_dir_read_name (d)))
    if (name[0] != '.' && (g_str_has_suffix (name, ".qcow2") || g_str_has_suffix (name, ".raw")))
      g_ptr_array_add (names, g_strdup (name));
  g_ptr_array_sort (names, by_name);
  for (guint i = 0; i < names->len; i++) {
    const char *n = names->pdata[i];
    const char *dot = strrchr (n, '.');
    Image *im = g_new0 (Image, 1);

    im->key = g_strndup (n, (gsize) (dot - n));
    im->format = strcmp (dot, ".qcow2") == 0 ? "qcow2" : "raw";
    im->path = g_build_filename (dir, n, NULL);
    if (images->len && strcmp (((Image *) images->pdata[images->len - 1])->key, im->key) == 0) {
      g_set_error (err, G_FILE_ERROR, G_FILE_ERROR_EXIST, "%s has both %s.raw "
                   "and %s.qcow2: which one is the backup?", dir, im->key, im->key);
      image_free (im);
      g_ptr_array_unref (images);
      return NULL;
    }
    g_ptr_array_add (images, im);
  }
  if (d && !images->len && err && !*err)
    g_set_error (err, G_FILE_ERROR, G_FILE_ERROR_NOENT, "%s holds no backup "
                 "images (<drive>.qcow2 or <drive>.raw)", dir);
  if (!d || !images->len) {
    g_ptr_array_unref (images);
    return NULL;
  }
  return images;
}

static const char *
jstr (json_object *o, const char *key)
{
  json_object *v;
  return json_object_object_get_ex (o, key, &v) && v ? json_object_get_string (v) : NULL;
}

/* One link of a chain: every link below the newest must say its format,
 * or qemu-img would guess it from the content (a guest's disk may look
 * like anything); every link has the drive's size. */
static bool
check_link (Image *im, json_object *link, json_object *below, GString *shown,
            GError **err)
{
  const char *file = jstr (link, "filename"), *bfmt = jstr (link, "backing-filename-format");
  json_object *vs;
  uint64_t size;

  if (!json_object_object_get_ex (link, "virtual-size", &vs)) {
    g_set_error (err, G_FILE_ERROR, G_FILE_ERROR_INVAL, "%s: qemu-img gives no "
                 "size of %s", im->key, file ? file : "?");
    return false;
  }
  size = (uint64_t) json_object_get_int64 (vs);
  if (!im->size)
    im->size = size;
  g_string_append_printf (shown, "%s%s (%s)", shown->len ? " -> " : "", file,
                          jstr (link, "format"));
  if (size != im->size) {
    g_set_error (err, G_FILE_ERROR, G_FILE_ERROR_INVAL, "%s: %s has %" G_GUINT64_FORMAT
                 " bytes, the newest image %" G_GUINT64_FORMAT ": not one drive's "
                 "chain", im->key, file, size, im->size);
    return false;
  }
  if (below && !bfmt) {
    g_set_error (err, G_FILE_ERROR, G_FILE_ERROR_INVAL, "%s: %s names its "
                 "backing file without its format; restore it by hand", im->key,
                 file);
    return false;
  }
  return true;
}

/* qemu-img info --backing-chain: every link exists and is sound; shows
 * the chain. */
static bool
check_chain (Image *im, GError **err)
{
  const char *argv[] = { qemu_img (), "info", "--backing-chain", "--output=json",
                         "-f", im->format, im->path, NULL };
  g_autofree char *out = NULL, *errout = NULL;
  g_autoptr (json_object) chain = NULL;
  g_autoptr (GString) shown = g_string_new (NULL);
  int status;

  if (!g_spawn_sync (NULL, (char **) argv, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL,
                     &out, &errout, &status, err))
    return false;
  if (!g_spawn_check_wait_status (status, NULL)) {
    g_set_error (err, G_FILE_ERROR, G_FILE_ERROR_FAILED, "%s: the chain is "
                 "broken: %s", im->key, g_strstrip (errout));
    return false;
  }
  chain = json_tokener_parse (out);
  if (!chain || !json_object_is_type (chain, json_type_array) ||
      !json_object_array_length (chain)) {
    g_set_error (err, G_FILE_ERROR, G_FILE_ERROR_FAILED, "%s: cannot read "
                 "what qemu-img info says", im->key);
    return false;
  }
  for (size_t i = 0; i < json_object_array_length (chain); i++)
    if (!check_link (im, json_object_array_get_idx (chain, i),
                     i + 1 < json_object_array_length (chain)
                       ? json_object_array_get_idx (chain, i + 1) : NULL,
                     shown, err))
      return false;
  printf ("fleece restore: %s: %s\n", im->key, shown->str);
  return true;
}

/* Run qemu-img, its messages on our stderr; a signal stops it. */
static bool
run_convert (const char *const *argv, GError **err)
{
  GPid pid;
  int status;
  pid_t r;

  if (!g_spawn_async (NULL, (char **) argv, NULL,
                      G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD |
                      G_SPAWN_STDOUT_TO_DEV_NULL, NULL, NULL, &pid, err))
    return false;
  while ((r = waitpid (pid, &status, 0)) < 0 && errno == EINTR)
    if (tool_signal)
      kill (pid, SIGTERM);
  g_spawn_close_pid (pid);
  if (tool_signal) {
    g_set_error (err, G_FILE_ERROR, G_FILE_ERROR_INTR, "interrupted by %s",
                 tool_signal_name (tool_signal));
    return false;
  }
  if (r < 0 || !WIFEXITED (status) || WEXITSTATUS (status) != 0) {
    g_set_error (err, G_FILE_ERROR, G_FILE_ERROR_FAILED, "qemu-img convert failed");
    return false;
  }
  return true;
}

static bool
convert (Image *im, const char *out_dir, const char *format, GError **err)
{
  g_autofree char *tmpl = g_strdup_printf ("%s/.%s.%s.XXXXXX", out_dir, im->key, format);
  const char *argv[] = { qemu_img (), "convert", "-f", im->format, "-O", format,
                         im->path, tmpl, NULL };
  int fd = g_mkstemp_full (tmpl, O_RDWR | O_CLOEXEC, 0600);
  bool ok;

  if (fd < 0) {
    g_set_error (err, G_FILE_ERROR, g_file_error_from_errno (errno), "cannot "
                 "create a file in %s: %s", out_dir, g_strerror (errno));
    return false;
  }
  close (fd);
  ok = run_convert (argv, err);
  if (ok && link (tmpl, im->out) < 0) {
    g_set_error (err, G_FILE_ERROR, g_file_error_from_errno (errno), "cannot "
                 "create %s: %s", im->out, errno == EEXIST
                 ? "it exists; not overwriting it" : g_strerror (errno));
    ok = false;
  }
  unlink (tmpl);
  if (ok) {
    g_autofree char *size = tool_size (im->size);
    printf ("fleece restore: %s restored to %s (%s)\n", im->key, im->out, size);
    fflush (stdout);
  }
  return ok;
}

static int
restore (const ToolOpts *o, const char *format)
{
  g_autoptr (GError) err = NULL;
  g_autoptr (GPtrArray) images = find_images (o->target_dir, &err);
  struct stat sb;

  for (guint i = 0; images && i < images->len && !err; i++) {
    Image *im = images->pdata[i];
    g_autofree char *name = g_strdup_printf ("%s.%s", im->key, format);

    im->out = g_build_filename (o->out, name, NULL);
    if (lstat (im->out, &sb) == 0)
      g_set_error (&err, G_FILE_ERROR, G_FILE_ERROR_EXIST, "%s exists; not "
                   "overwriting it", im->out);
    else
      check_chain (im, &err);
  }
  fflush (stdout);
  if (!err && tool_signal)
    g_set_error (&err, G_FILE_ERROR, G_FILE_ERROR_INTR, "interrupted by %s",
                 tool_signal_name (tool_signal));
  for (guint i = 0; images && i < images->len && !err; i++)
    convert (images->pdata[i], o->out, format, &err);
  if (err) {
    g_autofree char *msg = tool_escape (err->message);
    fprintf (stderr, "fleece restore: %s\n", msg);
    return TOOL_EXIT_FAILED;
  }
  return TOOL_EXIT_OK;
}

int
tool_cmd_restore (int argc, char **argv)
{
  ToolOpts o;
  const char *format;
  int rc;

  tool_parse_options (TOOL_CMD_RESTORE, "restore", "Turn the newest backup of "
                      "a chain into plain images, one per drive.", "Exit "
                      "status: 0 every drive was restored, 1 a chain is broken "
                      "or qemu-img failed, 2 usage error.\nSee fleece(1).",
                      argc, argv, &o);
  format = o.format ? o.format : "raw";
  if (strcmp (format, "raw") != 0 && strcmp (format, "qcow2") != 0)
    tool_usage_error ("restore", "--format must be raw or qcow2, not '%s'", format);
  if (!g_file_test (o.target_dir, G_FILE_TEST_IS_DIR))
    tool_usage_error ("restore", "--target-dir %s: no such directory", o.target_dir);
  if (!g_file_test (o.out, G_FILE_TEST_IS_DIR))
    tool_usage_error ("restore", "--out %s: no such directory; create it first", o.out);
  tool_catch_signals ();
  rc = restore (&o, format);
  tool_opts_clear (&o);
  return rc;
}
