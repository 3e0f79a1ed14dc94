/* Unit tests of libfleece/storage.c: the directory storage (names, exact
 * sizes, sparseness, no overwrite, free), the callback storage and the
 * description kept in the record.  Needs qemu-img for the qcow2 cases. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define MIB (1024 * 1024)

/* An alias, so that g_autoptr works for json-c objects here without
 * clashing with a definition for json_object elsewhere. */
typedef json_object TJson;
static void
tjson_put (TJson *o)
{
  json_object_put (o);
}
G_DEFINE_AUTOPTR_CLEANUP_FUNC (TJson, tjson_put)

static char *tmpdir;   /* per test; the storage directory is tmpdir/images */
static char *imgdir;

static void
rm_rf (const char *path)
{
  struct stat sb;

  if (lstat (path, &sb) != 0)
    return;
  if (S_ISDIR (sb.st_mode)) {
    GDir *d = g_dir_open (path, 0, NULL);
    const char *name;

    while (d && (name = g_dir_read_name (d))) {
      g_autofree char *child = g_build_filename (path, name, NULL);
      rm_rf (child);
    }
    if (d)
      g_dir_close (d);
    rmdir (path);
  } else {
    unlink (path);
  }
}

static void
setup (void)
{
  tmpdir = g_dir_make_tmp ("fleece-test-storage-XXXXXX", NULL);
  ck_assert_ptr_nonnull (tmpdir);
  imgdir = g_build_filename (tmpdir, "images", NULL);
  ck_assert_int_eq (mkdir (imgdir, 0755), 0);
}

static void
teardown (void)
{
  g_unsetenv ("FLEECE_QEMU_IMG");
  rm_rf (tmpdir);
  g_free (imgdir);
  g_free (tmpdir);
  imgdir = tmpdir = NULL;
}

#define assert_error(err, want, substr) \
  do { \
    ck_assert_msg ((err) != NULL, "expected an error containing \"%s\"", \
                   (substr)); \
    ck_assert_msg ((err)->domain == FLEECE_ERROR, "domain of: %s", \
                   (err)->message); \
    ck_assert_msg ((err)->code == (want), "code %d != %d: %s", (err)->code, \
                   (want), (err)->message); \
    ck_assert_msg (strstr ((err)->message, (substr)) != NULL, \
                   "\"%s\" not in: %s", (substr), (err)->message); \
  } while (0)

#define assert_api_error(want, substr) \
  do { \
    const char *m_ = fleece_get_error (); \
    ck_assert_msg (m_ != NULL, "no error set"); \
    ck_assert_msg (fleece_get_errno () == (want), "errno %d != %d: %s", \
                   fleece_get_errno (), (want), m_); \
    ck_assert_msg (strstr (m_, (substr)) != NULL, "\"%s\" not in: %s", \
                   (substr), m_); \
  } while (0)

static int
count_entries (const char *dir)
{
  GDir *d = g_dir_open (dir, 0, NULL);
  int n = 0;

  ck_assert_ptr_nonnull (d);
  while (g_dir_read_name (d))
    n++;
  g_dir_close (d);
  return n;
}

static bool
have_qemu_img (void)
{
  g_autofree char *p = g_find_program_in_path ("qemu-img");

  if (!p)
    fprintf (stderr, "qemu-img not found: qcow2 checks skipped\n");
  return p != NULL;
}

/* `qemu-img info --output=json` of path, as JSON. */
static json_object *
qemu_img_info (const char *path)
{
  const char *argv[] = {
    "qemu-img", "info", "--output=json", "-f", "qcow2", path, NULL
  };
  g_autofree char *out = NULL;
  g_autofree char *errout = NULL;
  g_autoptr (GError) err = NULL;
  int status = 0;
  json_object *info;

  ck_assert_msg (g_spawn_sync (NULL, (char **) argv, NULL,
                               G_SPAWN_SEARCH_PATH, NULL, NULL, &out, &errout,
                               &status, &err),
                 "qemu-img info: %s", err ? err->message : "");
  ck_assert_msg (status == 0, "qemu-img info failed: %s", errout);
  info = json_tokener_parse (out);
  ck_assert_ptr_nonnull (info);
  return info;
}

static int64_t
json_int (json_object *o, const char *key)
{
  json_object *v = NULL;

  ck_assert_msg (json_object_object_get_ex (o, key, &v), "no %s", key);
  return json_object_get_int64 (v);
}

static struct fleece_storage *
new_dir_storage (void)
{
  struct fleece_storage *st = fleece_storage_new_dir (imgdir);

  ck_assert_msg (st != NULL, "%s", fleece_get_error ());
  return st;
}

static void
write_file (const char *path, const char *content)
{
  ck_assert (g_file_set_contents (path, content, -1, NULL));
}

/* ---- directory storage ---------------------------------------------- */

START_TEST (test_dir_new)
{
  struct fleece_storage *st;
  g_autofree char *missing = g_build_filename (tmpdir, "missing", NULL);
  g_autofree char *file = g_build_filename (tmpdir, "file", NULL);
  g_autofree char *trailing = g_strconcat (imgdir, "/", NULL);
  g_autoptr (TJson) desc = NULL;

  st = new_dir_storage ();
  ck_assert_uint_eq (fleece_storage_flags (st),
                     FLEECE_STORAGE_QCOW2 | FLEECE_STORAGE_DISCARD |
                     FLEECE_STORAGE_PATH);
  fleece_storage_free (st);

  /* A trailing slash is dropped from the kept (described) directory. */
  st = fleece_storage_new_dir (trailing);
  ck_assert_ptr_nonnull (st);
  desc = fleece_storage_describe (st);
  ck_assert_str_eq (json_object_get_string (json_object_object_get (desc,
                                                                    "dir")),
                    imgdir);
  fleece_storage_free (st);

  ck_assert_ptr_null (fleece_storage_new_dir ("relative/images"));
  assert_api_error (EINVAL, "fleece_storage_new_dir: ");
  assert_api_error (EINVAL, "relative/images");
  assert_api_error (EINVAL, "absolute");

  ck_assert_ptr_null (fleece_storage_new_dir (missing));
  assert_api_error (ENOENT, missing);

  write_file (file, "x");
  ck_assert_ptr_null (fleece_storage_new_dir (file));
  assert_api_error (ENOTDIR, file);

  ck_assert_ptr_null (fleece_storage_new_dir (NULL));
  assert_api_error (EINVAL, "fleece_storage_new_dir");
  ck_assert_ptr_null (fleece_storage_new_dir (""));
  assert_api_error (EINVAL, "fleece_storage_new_dir");

  fleece_storage_free (NULL);
}
END_TEST

START_TEST (test_dir_raw)
{
  struct fleece_storage *st = new_dir_storage ();
  const uint64_t size = 40 * MIB + 4096;
  g_autoptr (GError) err = NULL;
  g_autofree char *volid = NULL;
  g_autofree char *path = NULL;
  g_autofree char *volid2 = NULL;
  g_autofree char *path2 = NULL;
  g_autofree char *expect = g_build_filename (imgdir, "vm-100-fleece-0.raw",
                                              NULL);
  struct stat sb;

  ck_assert_msg (fleece_storage_alloc_image (st, "vm-100-fleece-0.raw", "raw",
                                             size, &volid, NULL, &err),
                 "%s", err ? err->message : "");
  ck_assert_str_eq (volid, "vm-100-fleece-0.raw");
  path = fleece_storage_image_path (st, volid, &err);
  ck_assert_ptr_nonnull (path);
  ck_assert_str_eq (path, expect);

  ck_assert_int_eq (stat (path, &sb), 0);
  ck_assert_msg (S_ISREG (sb.st_mode), "not a regular file");
  ck_assert_uint_eq ((uint64_t) sb.st_size, size);
  /* Sparse: nothing allocated (allow a block of slack). */
  ck_assert_msg ((uint64_t) sb.st_blocks * 512 <= 64 * 1024,
                 "%llu bytes allocated", (unsigned long long) sb.st_blocks * 512);
  /* Guest data: only the owner may read it. */
  ck_assert_uint_eq (sb.st_mode & 07777, 0600);

  /* Raw takes any byte count, and a name without suffix. */
  ck_assert_msg (fleece_storage_alloc_image (st, "vm-100-fleece-1", "raw",
                                             1001, &volid2, NULL, &err),
                 "%s", err ? err->message : "");
  path2 = fleece_storage_image_path (st, volid2, &err);
  ck_assert_ptr_nonnull (path2);
  ck_assert_int_eq (stat (path2, &sb), 0);
  ck_assert_uint_eq ((uint64_t) sb.st_size, 1001);

  fleece_storage_free (st);
}
END_TEST

START_TEST (test_dir_qcow2)
{
  struct fleece_storage *st;
  /* 40 MiB + 4 KiB; and 5 sectors, the size of a small TPM state. */
  const uint64_t sizes[] = { 40 * MIB + 4096, 5 * 512 };
  size_t i;

  if (!have_qemu_img ())
    return;
  st = new_dir_storage ();
  for (i = 0; i < G_N_ELEMENTS (sizes); i++) {
    g_autoptr (GError) err = NULL;
    g_autofree char *name = g_strdup_printf ("vm-100-fleece-%zu.qcow2", i);
    g_autofree char *volid = NULL;
    g_autofree char *path = NULL;
    g_autoptr (TJson) info = NULL;
    json_object *fs = NULL;
    struct stat sb;

    ck_assert_msg (fleece_storage_alloc_image (st, name, "qcow2", sizes[i],
                                               &volid, NULL, &err),
                   "%s", err ? err->message : "");
    ck_assert_str_eq (volid, name);
    path = fleece_storage_image_path (st, volid, &err);
    ck_assert_ptr_nonnull (path);

    info = qemu_img_info (path);
    ck_assert_str_eq (json_object_get_string (json_object_object_get (info,
                                                                      "format")),
                      "qcow2");
    ck_assert_int_eq (json_int (info, "virtual-size"), (int64_t) sizes[i]);
    ck_assert_int_eq (json_int (info, "cluster-size"), 65536);
    /* Thin: no preallocation. */
    ck_assert_int_eq (stat (path, &sb), 0);
    ck_assert_msg ((uint64_t) sb.st_blocks * 512 < 1 * MIB,
                   "%llu bytes allocated",
                   (unsigned long long) sb.st_blocks * 512);
    ck_assert_uint_eq (sb.st_mode & 07777, 0600);
    fs = json_object_object_get (info, "format-specific");
    ck_assert_ptr_nonnull (fs);
  }
  fleece_storage_free (st);
}
END_TEST

/* For the stock engine: qcow2 left an empty file for QEMU to format (and
 * no qemu-img run: a failing one is installed), raw complete as always. */
START_TEST (test_dir_unformatted)
{
  struct fleece_storage *st = new_dir_storage ();
  g_autofree char *fake = g_build_filename (imgdir, "..", "qemu-img-fails", NULL);
  struct stat sb;

  ck_assert (g_file_set_contents (fake, "#!/bin/sh\nexit 1\n", -1, NULL));
  ck_assert_int_eq (chmod (fake, 0755), 0);
  g_setenv ("FLEECE_QEMU_IMG", fake, TRUE);
  {
    g_autoptr (GError) err = NULL;
    g_autofree char *volid = NULL;
    g_autofree char *path = NULL;
    bool unformatted = false;

    ck_assert_msg (fleece_storage_alloc_image (st, "vm-100-fleece-0.qcow2",
                                               "qcow2", 40 * MIB, &volid,
                                               &unformatted, &err),
                   "%s", err ? err->message : "");
    ck_assert (unformatted);
    path = fleece_storage_image_path (st, volid, &err);
    ck_assert_int_eq (stat (path, &sb), 0);
    ck_assert_msg (S_ISREG (sb.st_mode), "not a regular file");
    ck_assert_int_eq (sb.st_size, 0);
    ck_assert_uint_eq (sb.st_mode & 07777, 0600);
    /* Still never over an existing file. */
    g_clear_pointer (&volid, g_free);
    ck_assert (!fleece_storage_alloc_image (st, "vm-100-fleece-0.qcow2",
                                            "qcow2", 40 * MIB, &volid,
                                            &unformatted, &err));
    assert_error (err, EEXIST, "already exists");
  }
  {
    g_autoptr (GError) err = NULL;
    g_autofree char *volid = NULL;
    g_autofree char *path = NULL;
    bool unformatted = true;

    ck_assert_msg (fleece_storage_alloc_image (st, "vm-100-fleece-1.raw", "raw",
                                               MIB + 512, &volid, &unformatted,
                                               &err),
                   "%s", err ? err->message : "");
    ck_assert (!unformatted);
    path = fleece_storage_image_path (st, volid, &err);
    ck_assert_int_eq (stat (path, &sb), 0);
    ck_assert_int_eq (sb.st_size, MIB + 512);
  }
  g_unsetenv ("FLEECE_QEMU_IMG");
  unlink (fake);
  fleece_storage_free (st);
}
END_TEST

START_TEST (test_dir_qcow2_unaligned)
{
  struct fleece_storage *st = new_dir_storage ();
  g_autoptr (GError) err = NULL;
  char *volid = NULL;

  /* qemu-img would round this up silently. */
  ck_assert (!fleece_storage_alloc_image (st, "vm-100-fleece-0.qcow2",
                                          "qcow2", 5 * 512 + 100, &volid, NULL,
                                          &err));
  assert_error (err, EINVAL, "multiple of 512");
  ck_assert_ptr_null (volid);
  ck_assert_int_eq (count_entries (imgdir), 0);
  fleece_storage_free (st);
}
END_TEST

START_TEST (test_dir_qemu_img_override)
{
  struct fleece_storage *st = new_dir_storage ();
  g_autofree char *failing = g_build_filename (tmpdir, "failing-qemu-img",
                                               NULL);
  g_autofree char *wrapper = g_build_filename (tmpdir, "wrapper-qemu-img",
                                               NULL);
  g_autofree char *marker = g_build_filename (tmpdir, "wrapper-ran", NULL);
  g_autofree char *script = NULL;
  g_autofree char *volid = NULL;

  write_file (failing,
              "#!/bin/sh\necho 'fake qemu-img: out of cheese' >&2\nexit 3\n");
  ck_assert_int_eq (chmod (failing, 0755), 0);
  script = g_strdup_printf ("#!/bin/sh\necho \"$@\" > '%s'\n"
                            "exec qemu-img \"$@\"\n", marker);
  write_file (wrapper, script);
  ck_assert_int_eq (chmod (wrapper, 0755), 0);

  /* A failing qemu-img: its stderr is in the error, no file is left. */
  {
    g_autoptr (GError) err = NULL;

    g_setenv ("FLEECE_QEMU_IMG", failing, TRUE);
    ck_assert (!fleece_storage_alloc_image (st, "vm-7-fleece-0.qcow2",
                                            "qcow2", MIB, &volid, NULL, &err));
    assert_error (err, EIO, "fake qemu-img: out of cheese");
    assert_error (err, EIO, "exited with status 3");
    ck_assert_int_eq (count_entries (imgdir), 0);
  }

  /* A missing binary says how to point at the right one. */
  {
    g_autoptr (GError) err = NULL;

    g_setenv ("FLEECE_QEMU_IMG", "/nonexistent/qemu-img", TRUE);
    ck_assert (!fleece_storage_alloc_image (st, "vm-7-fleece-0.qcow2",
                                            "qcow2", MIB, &volid, NULL, &err));
    assert_error (err, ENOENT, "FLEECE_QEMU_IMG");
    ck_assert_int_eq (count_entries (imgdir), 0);
  }

  /* The override is what runs, with an argv (the name is not split). */
  if (have_qemu_img ()) {
    g_autoptr (GError) err = NULL;
    g_autofree char *args = NULL;

    g_setenv ("FLEECE_QEMU_IMG", wrapper, TRUE);
    ck_assert_msg (fleece_storage_alloc_image (st, "vm-7-fleece-0.qcow2",
                                               "qcow2", MIB, &volid, NULL, &err),
                   "%s", err ? err->message : "");
    ck_assert (g_file_get_contents (marker, &args, NULL, NULL));
    ck_assert_msg (strstr (args, "create") && strstr (args, "qcow2") &&
                   strstr (args, "vm-7-fleece-0.qcow2 1048576"), "%s", args);
  }
  fleece_storage_free (st);
}
END_TEST

START_TEST (test_dir_bad_names)
{
  static const char *const bad[] = {
    "../x", "a/b", "vm-1-fleece-0.raw\n", "foo", "", ".", "..",
    "/etc/passwd", "vm-1-fleece-0.raw/..", "../vm-1-fleece-0.raw",
    "vm-1-fleece-0.raw.", "vm-1-fleece-0.vmdk", "vm--fleece-0",
    "vm-1-fleece-", "vm-1-fleece-0.", "vm-x-fleece-0", " vm-1-fleece-0",
    "vm-1-fleece-0 ", "VM-1-FLEECE-0", "vm-1-fleece-0\n.raw",
  };
  struct fleece_storage *st = new_dir_storage ();
  g_autofree char *outside = g_build_filename (tmpdir, "x", NULL);
  size_t i;

  for (i = 0; i < G_N_ELEMENTS (bad); i++) {
    g_autoptr (GError) e1 = NULL;
    g_autoptr (GError) e2 = NULL;
    g_autoptr (GError) e3 = NULL;
    char *volid = NULL;
    char *path;

    ck_assert_msg (!fleece_storage_alloc_image (st, bad[i], "raw", MIB,
                                                &volid, NULL, &e1),
                   "accepted name #%zu", i);
    ck_assert_ptr_null (volid);
    ck_assert_msg (e1 && e1->code == EINVAL, "#%zu", i);
    if (*bad[i])
      assert_error (e1, EINVAL, "vm-<vmid>-fleece-<n>");

    /* Volids come back from the record: the same check applies. */
    ck_assert (!fleece_storage_free_image (st, bad[i], &e2));
    ck_assert_int_eq (e2->code, EINVAL);
    path = fleece_storage_image_path (st, bad[i], &e3);
    ck_assert_msg (path == NULL, "path for #%zu: %s", i, path);
    ck_assert_int_eq (e3->code, EINVAL);
  }
  /* The newline is shown escaped, not raw. */
  {
    g_autoptr (GError) err = NULL;
    char *volid = NULL;

    ck_assert (!fleece_storage_alloc_image (st, "vm-1-fleece-0.raw\n", "raw",
                                            MIB, &volid, NULL, &err));
    assert_error (err, EINVAL, "\"vm-1-fleece-0.raw\\n\"");
  }

  ck_assert_int_eq (count_entries (imgdir), 0);
  ck_assert (!g_file_test (outside, G_FILE_TEST_EXISTS));
  fleece_storage_free (st);
}
END_TEST

START_TEST (test_dir_bad_format)
{
  struct fleece_storage *st = new_dir_storage ();
  char *volid = NULL;

  {
    g_autoptr (GError) err = NULL;
    ck_assert (!fleece_storage_alloc_image (st, "vm-1-fleece-0.raw", "qcow2",
                                            MIB, &volid, NULL, &err));
    assert_error (err, EINVAL, "does not match its format");
  }
  {
    g_autoptr (GError) err = NULL;
    ck_assert (!fleece_storage_alloc_image (st, "vm-1-fleece-0", "vmdk",
                                            MIB, &volid, NULL, &err));
    assert_error (err, EINVAL, "neither raw nor qcow2");
  }
  {
    g_autoptr (GError) err = NULL;
    ck_assert (!fleece_storage_alloc_image (st, "vm-1-fleece-0", NULL, MIB,
                                            &volid, NULL, &err));
    assert_error (err, EINVAL, "neither raw nor qcow2");
  }
  ck_assert_ptr_null (volid);
  ck_assert_int_eq (count_entries (imgdir), 0);
  fleece_storage_free (st);
}
END_TEST

START_TEST (test_dir_no_overwrite)
{
  struct fleece_storage *st = new_dir_storage ();
  static const char *const formats[] = { "raw", "qcow2" };
  size_t i;

  for (i = 0; i < G_N_ELEMENTS (formats); i++) {
    g_autoptr (GError) err = NULL;
    g_autofree char *name = g_strdup_printf ("vm-100-fleece-0.%s",
                                             formats[i]);
    g_autofree char *path = g_build_filename (imgdir, name, NULL);
    g_autofree char *content = NULL;
    char *volid = NULL;

    write_file (path, "precious");
    ck_assert (!fleece_storage_alloc_image (st, name, formats[i], MIB, &volid, NULL,
                                            &err));
    assert_error (err, EEXIST, "already exists");
    assert_error (err, EEXIST, path);
    ck_assert_ptr_null (volid);
    ck_assert (g_file_get_contents (path, &content, NULL, NULL));
    ck_assert_str_eq (content, "precious");
  }

  /* Also a second allocation of our own image. */
  {
    g_autoptr (GError) err = NULL;
    g_autofree char *volid = NULL;
    char *again = NULL;

    ck_assert (fleece_storage_alloc_image (st, "vm-100-fleece-1.raw", "raw",
                                           MIB, &volid, NULL, &err));
    ck_assert (!fleece_storage_alloc_image (st, "vm-100-fleece-1.raw", "raw",
                                            MIB, &again, NULL, &err));
    assert_error (err, EEXIST, "already exists");
  }

  /* A dangling symlink is not followed to create its target. */
  {
    g_autoptr (GError) err = NULL;
    g_autofree char *link = g_build_filename (imgdir, "vm-100-fleece-2.raw",
                                              NULL);
    g_autofree char *target = g_build_filename (tmpdir, "target", NULL);
    char *volid = NULL;

    ck_assert_int_eq (symlink (target, link), 0);
    ck_assert (!fleece_storage_alloc_image (st, "vm-100-fleece-2.raw", "raw",
                                            MIB, &volid, NULL, &err));
    assert_error (err, EEXIST, "already exists");
    ck_assert (!g_file_test (target, G_FILE_TEST_EXISTS));
  }
  fleece_storage_free (st);
}
END_TEST

START_TEST (test_dir_free)
{
  struct fleece_storage *st = new_dir_storage ();
  g_autoptr (GError) err = NULL;
  g_autofree char *volid = NULL;
  g_autofree char *path = NULL;

  ck_assert (fleece_storage_alloc_image (st, "vm-100-fleece-0.raw", "raw",
                                         MIB, &volid, NULL, &err));
  path = fleece_storage_image_path (st, volid, &err);
  ck_assert (g_file_test (path, G_FILE_TEST_EXISTS));

  ck_assert_msg (fleece_storage_free_image (st, volid, &err), "%s",
                 err ? err->message : "");
  ck_assert (!g_file_test (path, G_FILE_TEST_EXISTS));
  /* Already gone, and never existed: not errors. */
  ck_assert (fleece_storage_free_image (st, volid, &err));
  ck_assert (fleece_storage_free_image (st, "vm-100-fleece-9.qcow2", &err));
  ck_assert_ptr_null (err);

  ck_assert (!fleece_storage_free_image (st, NULL, &err));
  assert_error (err, EINVAL, "empty");
  fleece_storage_free (st);
}
END_TEST

/* ---- callback storage ------------------------------------------------- */

typedef struct {
  int allocs, frees, paths, freed;
  bool fail_alloc, fail_free, fail_path, no_volid;
  char *name, *format, *volid;
  uint64_t size;
} Fake;

static int
fake_alloc (void *opaque, const char *name, const char *format, uint64_t size,
            char **volid)
{
  Fake *f = opaque;

  f->allocs++;
  free (f->name);
  free (f->format);
  f->name = strdup (name);
  f->format = strdup (format);
  f->size = size;
  if (f->fail_alloc) {
    errno = ENOSPC;
    return -1;
  }
  if (!f->no_volid) {
    char buf[256];
    snprintf (buf, sizeof buf, "fleece-store:%s", name);
    *volid = strdup (buf);
  }
  return 0;
}

static int
fake_free (void *opaque, const char *volid)
{
  Fake *f = opaque;

  f->frees++;
  free (f->volid);
  f->volid = strdup (volid);
  return f->fail_free ? -1 : 0;
}

static char *
fake_path (void *opaque, const char *volid)
{
  Fake *f = opaque;
  char buf[256];

  f->paths++;
  if (f->fail_path)
    return NULL;
  snprintf (buf, sizeof buf, "/dev/fake/%s", volid);
  return strdup (buf);
}

static void
fake_free_opaque (void *opaque)
{
  Fake *f = opaque;

  f->freed++;
}

static void
fake_clear (Fake *f)
{
  free (f->name);
  free (f->format);
  free (f->volid);
}

START_TEST (test_callback)
{
  Fake f = { 0 };
  struct fleece_storage *st;
  g_autoptr (GError) err = NULL;
  g_autofree char *volid = NULL;
  g_autofree char *path = NULL;

  st = fleece_storage_new_callback (FLEECE_STORAGE_QCOW2, fake_alloc,
                                    fake_free, fake_path, &f,
                                    fake_free_opaque);
  ck_assert_ptr_nonnull (st);
  ck_assert_uint_eq (fleece_storage_flags (st), FLEECE_STORAGE_QCOW2);

  ck_assert_msg (fleece_storage_alloc_image (st, "vm-100-fleece-0", "qcow2",
                                             40 * MIB + 4096, &volid, NULL, &err),
                 "%s", err ? err->message : "");
  ck_assert_int_eq (f.allocs, 1);
  ck_assert_str_eq (f.name, "vm-100-fleece-0");
  ck_assert_str_eq (f.format, "qcow2");
  ck_assert_uint_eq (f.size, 40 * MIB + 4096);
  ck_assert_str_eq (volid, "fleece-store:vm-100-fleece-0");

  path = fleece_storage_image_path (st, volid, &err);
  ck_assert_ptr_nonnull (path);
  ck_assert_str_eq (path, "/dev/fake/fleece-store:vm-100-fleece-0");

  ck_assert (fleece_storage_free_image (st, volid, &err));
  ck_assert_int_eq (f.frees, 1);
  ck_assert_str_eq (f.volid, volid);

  /* Failures name the callback. */
  f.fail_alloc = true;
  {
    char *v = NULL;
    ck_assert (!fleece_storage_alloc_image (st, "vm-100-fleece-1", "raw", MIB,
                                            &v, NULL, &err));
    ck_assert_ptr_null (v);
    assert_error (err, ENOSPC, "alloc callback failed for image "
                  "vm-100-fleece-1");
    g_clear_error (&err);
  }
  f.fail_alloc = false;
  f.no_volid = true;
  {
    char *v = NULL;
    ck_assert (!fleece_storage_alloc_image (st, "vm-100-fleece-1", "raw", MIB,
                                            &v, NULL, &err));
    assert_error (err, EIO, "alloc callback returned success but no volume "
                  "id");
    g_clear_error (&err);
  }
  f.fail_free = true;
  ck_assert (!fleece_storage_free_image (st, "vol", &err));
  assert_error (err, EIO, "free callback failed for volume vol");
  g_clear_error (&err);
  f.fail_path = true;
  ck_assert_ptr_null (fleece_storage_image_path (st, "vol", &err));
  assert_error (err, EIO, "path callback failed for volume vol");
  g_clear_error (&err);

  ck_assert_int_eq (f.freed, 0);
  fleece_storage_free (st);
  ck_assert_int_eq (f.freed, 1);
  fake_clear (&f);
}
END_TEST

START_TEST (test_callback_no_qcow2)
{
  Fake f = { 0 };
  struct fleece_storage *st;
  g_autoptr (GError) err = NULL;
  char *volid = NULL;

  st = fleece_storage_new_callback (FLEECE_STORAGE_DISCARD, fake_alloc,
                                    fake_free, fake_path, &f, NULL);
  ck_assert_ptr_nonnull (st);
  ck_assert (!fleece_storage_alloc_image (st, "vm-1-fleece-0", "qcow2", MIB,
                                          &volid, NULL, &err));
  assert_error (err, EINVAL, "cannot hold qcow2");
  ck_assert_int_eq (f.allocs, 0);
  fleece_storage_free (st);   /* no free_opaque: nothing to call */
  fake_clear (&f);
}
END_TEST

START_TEST (test_callback_new_errors)
{
  Fake f = { 0 };

  ck_assert_ptr_null (fleece_storage_new_callback (0, NULL, fake_free,
                                                   fake_path, &f,
                                                   fake_free_opaque));
  assert_api_error (EINVAL, "fleece_storage_new_callback: ");
  assert_api_error (EINVAL, "alloc");
  ck_assert_ptr_null (fleece_storage_new_callback (0, fake_alloc, fake_free,
                                                   NULL, &f,
                                                   fake_free_opaque));
  assert_api_error (EINVAL, "path");
  ck_assert_ptr_null (fleece_storage_new_callback (0x100, fake_alloc,
                                                   fake_free, fake_path, &f,
                                                   fake_free_opaque));
  assert_api_error (EINVAL, "unknown flags 0x100");
  /* No object took opaque: it stays the caller's. */
  ck_assert_int_eq (f.freed, 0);
}
END_TEST

/* ---- descriptions ------------------------------------------------------ */

START_TEST (test_describe_dir)
{
  struct fleece_storage *st = new_dir_storage ();
  struct fleece_storage *st2;
  g_autoptr (TJson) desc = fleece_storage_describe (st);
  g_autoptr (TJson) desc2 = NULL;
  g_autoptr (TJson) parsed = NULL;
  g_autoptr (GError) err = NULL;
  g_autofree char *p1 = NULL;
  g_autofree char *p2 = NULL;

  ck_assert_str_eq (json_object_get_string (json_object_object_get (desc,
                                                                    "type")),
                    "dir");
  ck_assert_str_eq (json_object_get_string (json_object_object_get (desc,
                                                                    "dir")),
                    imgdir);

  /* Through text, as it goes through the record. */
  parsed = json_tokener_parse (json_object_to_json_string (desc));
  st2 = fleece_storage_from_description (parsed, &err);
  ck_assert_msg (st2 != NULL, "%s", err ? err->message : "");
  ck_assert_uint_eq (fleece_storage_flags (st2), fleece_storage_flags (st));
  desc2 = fleece_storage_describe (st2);
  ck_assert (json_object_equal (desc, desc2));
  p1 = fleece_storage_image_path (st, "vm-1-fleece-0.raw", &err);
  p2 = fleece_storage_image_path (st2, "vm-1-fleece-0.raw", &err);
  ck_assert_str_eq (p1, p2);

  fleece_storage_free (st);
  fleece_storage_free (st2);
}
END_TEST

START_TEST (test_describe_callback)
{
  Fake f = { 0 };
  unsigned flags = FLEECE_STORAGE_QCOW2 | FLEECE_STORAGE_DISCARD;
  struct fleece_storage *st;
  g_autoptr (TJson) desc = NULL;
  g_autoptr (TJson) expect = NULL;
  g_autoptr (GError) err = NULL;

  st = fleece_storage_new_callback (flags, fake_alloc, fake_free, fake_path,
                                    &f, fake_free_opaque);
  desc = fleece_storage_describe (st);
  expect = json_tokener_parse ("{\"type\":\"callback\",\"flags\":3}");
  ck_assert_msg (json_object_equal (desc, expect), "%s",
                 json_object_to_json_string (desc));

  ck_assert_ptr_null (fleece_storage_from_description (desc, &err));
  ck_assert_ptr_nonnull (err);
  ck_assert_msg (strstr (err->message, "fleece_set_storage()") != NULL, "%s",
                 err->message);
  ck_assert_int_eq (f.allocs + f.frees + f.paths, 0);
  fleece_storage_free (st);
  ck_assert_ptr_null (fleece_storage_describe (NULL));
}
END_TEST

START_TEST (test_describe_bad)
{
  static const struct {
    const char *json;
    int code;
    const char *substr;
  } cases[] = {
    { "[]", EINVAL, "\"type\"" },
    { "{}", EINVAL, "\"type\"" },
    { "{\"type\":1}", EINVAL, "\"type\"" },
    { "{\"type\":\"nfs\"}", EINVAL, "\"nfs\" is unknown" },
    { "{\"type\":\"dir\"}", EINVAL, "no \"dir\"" },
    { "{\"type\":\"dir\",\"dir\":\"rel\"}", EINVAL, "absolute" },
    { "{\"type\":\"dir\",\"dir\":\"/nonexistent/fleece\"}", ENOENT,
      "/nonexistent/fleece" },
  };
  size_t i;

  for (i = 0; i < G_N_ELEMENTS (cases); i++) {
    g_autoptr (TJson) desc = json_tokener_parse (cases[i].json);
    g_autoptr (GError) err = NULL;

    ck_assert_ptr_nonnull (desc);
    ck_assert_ptr_null (fleece_storage_from_description (desc, &err));
    assert_error (err, cases[i].code, cases[i].substr);
  }
  {
    g_autoptr (GError) err = NULL;
    ck_assert_ptr_null (fleece_storage_from_description (NULL, &err));
    assert_error (err, EINVAL, "\"type\"");
  }
}
END_TEST

START_TEST (test_no_storage)
{
  g_autoptr (GError) e1 = NULL;
  g_autoptr (GError) e2 = NULL;
  g_autoptr (GError) e3 = NULL;
  char *volid = NULL;

  ck_assert_uint_eq (fleece_storage_flags (NULL), 0);
  ck_assert (!fleece_storage_alloc_image (NULL, "vm-1-fleece-0", "raw", MIB,
                                          &volid, NULL, &e1));
  assert_error (e1, EINVAL, "fleece_set_storage()");
  ck_assert (!fleece_storage_free_image (NULL, "vm-1-fleece-0", &e2));
  assert_error (e2, EINVAL, "fleece_set_storage()");
  ck_assert_ptr_null (fleece_storage_image_path (NULL, "vm-1-fleece-0", &e3));
  assert_error (e3, EINVAL, "fleece_set_storage()");
}
END_TEST

static Suite *
storage_suite (void)
{
  Suite *s = suite_create ("storage");
  TCase *tc;

  tc = tcase_create ("dir");
  tcase_add_checked_fixture (tc, setup, teardown);
  tcase_add_test (tc, test_dir_new);
  tcase_add_test (tc, test_dir_raw);
  tcase_add_test (tc, test_dir_qcow2);
  tcase_add_test (tc, test_dir_unformatted);
  tcase_add_test (tc, test_dir_qcow2_unaligned);
  tcase_add_test (tc, test_dir_qemu_img_override);
  tcase_add_test (tc, test_dir_bad_names);
  tcase_add_test (tc, test_dir_bad_format);
  tcase_add_test (tc, test_dir_no_overwrite);
  tcase_add_test (tc, test_dir_free);
  suite_add_tcase (s, tc);

  tc = tcase_create ("callback");
  tcase_add_test (tc, test_callback);
  tcase_add_test (tc, test_callback_no_qcow2);
  tcase_add_test (tc, test_callback_new_errors);
  tcase_add_test (tc, test_no_storage);
  suite_add_tcase (s, tc);

  tc = tcase_create ("describe");
  tcase_add_checked_fixture (tc, setup, teardown);
  tcase_add_test (tc, test_describe_dir);
  tcase_add_test (tc, test_describe_callback);
  tcase_add_test (tc, test_describe_bad);
  suite_add_tcase (s, tc);

  return s;
}

int
main (void)
{
  SRunner *sr = srunner_create (storage_suite ());
  int failed;

  srunner_run_all (sr, CK_ENV);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
