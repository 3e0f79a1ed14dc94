/* Unit tests of the storage interface (storage.h): the directory storage
 * (storage-dir.c) over safefs.c, and the caller's callback storage
 * (storage.c).
 *
 * What they hold the library to (issue 12): an image is made in three
 * steps (alloc under a run-tagged pending name, publish under its real
 * name with a hard link that never replaces anything, commit), and is
 * removed only while its name still refers to the device and inode
 * recorded; a file that was there before, was put in its place since, or a
 * symlink, is left alone.  Directories must pass ssh's StrictModes rule;
 * the unprivileged cases run in a child as nobody.  Needs qemu-img for the
 * qcow2 cases. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "storage.h"

#define MIB (1024 * 1024)
#define RUN "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
#define NOBODY 65534
#define OTHER_UID 1             /* daemon: neither root nor nobody */

/* An alias, so that g_autoptr works for json-c objects here without
 * clashing with a definition for json_object elsewhere. */
typedef json_object TJson;
static void
tjson_put (TJson *o)
{
  json_object_put (o);
}
G_DEFINE_AUTOPTR_CLEANUP_FUNC (TJson, tjson_put)

static char *basedir;  /* per test case, removed also after failures */
static char *tmpdir;   /* per test, 0755 so that nobody can reach inside */
static char *imgdir;   /* tmpdir/images, the storage directory */

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

/* In the runner, around each test case: a failed test (a forked child
 * that ends at once) leaves its scratch dir inside basedir. */
static void
case_setup (void)
{
  basedir = g_dir_make_tmp ("fleece-test-storage-XXXXXX", NULL);
  if (!basedir || chmod (basedir, 0755) != 0)
    abort ();
}

static void
case_teardown (void)
{
  rm_rf (basedir);
  g_clear_pointer (&basedir, g_free);
}

static void
setup (void)
{
  tmpdir = g_build_filename (basedir, "test-XXXXXX", NULL);
  ck_assert_ptr_nonnull (g_mkdtemp (tmpdir));
  ck_assert_int_eq (chmod (tmpdir, 0755), 0);
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
cmp_names (const void *a, const void *b)
{
  return strcmp (*(char *const *) a, *(char *const *) b);
}

/* The names in dir, sorted, comma separated. */
static char *
list_dir (const char *dir)
{
  GDir *d = g_dir_open (dir, 0, NULL);
  g_autoptr (GPtrArray) a = g_ptr_array_new_with_free_func (g_free);
  const char *name;

  ck_assert_ptr_nonnull (d);
  while ((name = g_dir_read_name (d)))
    g_ptr_array_add (a, g_strdup (name));
  g_dir_close (d);
  g_ptr_array_sort (a, cmp_names);
  g_ptr_array_add (a, NULL);
  return g_strjoinv (",", (char **) a->pdata);
}

#define assert_dir(dir, expect) \
  do { \
    g_autofree char *l_ = list_dir (dir); \
    ck_assert_str_eq (l_, (expect)); \
  } while (0)

static bool
have_qemu_img (void)
{
  g_autofree char *p = g_find_program_in_path ("qemu-img");

  if (!p)
    fprintf (stderr, "qemu-img not found: qcow2 checks skipped\n");
  return p != NULL;
}

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

static void
write_file (const char *path, const char *content)
{
  ck_assert (g_file_set_contents (path, content, -1, NULL));
}

static char *
read_file (const char *path)
{
  char *content = NULL;

  ck_assert_msg (g_file_get_contents (path, &content, NULL, NULL), "%s", path);
  return content;
}

static struct fleece_storage *
dir_storage (const char *dir)
{
  struct fleece_storage *st = fleece_storage_new_dir (dir);

  ck_assert_msg (st != NULL, "%s", fleece_get_error ());
  return st;
}

/* Allocate and publish name as a run of the library does (the commit is
 * the caller's); aborts the test on failure. */
static void
alloc_ok (struct fleece_storage *st, const char *name, const char *format,
          uint64_t size, bool may_leave_unformatted, FleeceImage *img)
{
  g_autoptr (GError) err = NULL;

  ck_assert_msg (fleece_storage_alloc (st, name, format, size, RUN,
                                       may_leave_unformatted, img, &err),
                 "%s", err ? err->message : "");
  ck_assert_msg (fleece_storage_publish (st, name, img, &err), "%s",
                 err ? err->message : "");
}

/* The record entry of a drive whose image is img (before the commit, as a
 * crash would leave it, the pending name is still in it). */
static json_object *
entry_of (const char *image, const FleeceImage *img)
{
  json_object *e = json_object_new_object ();

  fleece_jset_str (e, "image", image);
  fleece_jset_str (e, "volid", img ? img->volid : NULL);
  fleece_jset_str (e, "pending", img ? img->pending : NULL);
  if (img && img->identity)
    json_object_object_add (e, "identity", json_object_get (img->identity));
  return e;
}

/* The entry the record holds before the image is allocated: the planned
 * name and the run-tagged pending name, nothing else. */
static json_object *
planned_entry (struct fleece_storage *st, const char *image)
{
  g_autofree char *pending = fleece_storage_pending_name (st, image, RUN);
  json_object *e = json_object_new_object ();

  fleece_jset_str (e, "image", image);
  fleece_jset_str (e, "pending", pending);
  fleece_jset_str (e, "volid", NULL);
  return e;
}

static int
remove_entry (struct fleece_storage *st, json_object *entry, GError **err)
{
  return fleece_storage_remove (st, entry, RUN, err);
}

static char *
img_path (const char *name)
{
  return g_build_filename (imgdir, name, NULL);
}

/* ---- the directory storage: construction ------------------------------ */

START_TEST (test_dir_new)
{
  struct fleece_storage *st;
  g_autofree char *missing = g_build_filename (tmpdir, "missing", NULL);
  g_autofree char *file = g_build_filename (tmpdir, "file", NULL);
  g_autofree char *trailing = g_strconcat (imgdir, "/", NULL);
  g_autoptr (TJson) desc = NULL;

  st = dir_storage (imgdir);
  ck_assert_uint_eq (fleece_storage_flags (st),
                     FLEECE_STORAGE_QCOW2 | FLEECE_STORAGE_DISCARD |
                     FLEECE_STORAGE_PATH);
  fleece_storage_free (st);

  /* A trailing slash is dropped from the kept (described) directory. */
  st = dir_storage (trailing);
  desc = fleece_storage_describe (st);
  ck_assert_str_eq (fleece_jstr (desc, "dir"), imgdir);
  fleece_storage_free (st);

  ck_assert_ptr_null (fleece_storage_new_dir ("relative/images"));
  assert_api_error (EINVAL, "fleece_storage_new_dir: ");
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

/* Others could plant or swap names in these: refused, saying why. */
START_TEST (test_dir_new_refuses_unsafe_dirs)
{
  g_autofree char *link = g_build_filename (tmpdir, "link", NULL);
  g_autofree char *shared = g_build_filename (tmpdir, "shared", NULL);
  g_autofree char *foreign = g_build_filename (tmpdir, "foreign", NULL);

  ck_assert_int_eq (symlink (imgdir, link), 0);
  ck_assert_ptr_null (fleece_storage_new_dir (link));
  assert_api_error (ELOOP, "symbolic link");

  ck_assert_int_eq (mkdir (shared, 0700), 0);
  ck_assert_int_eq (chmod (shared, 0770), 0);
  ck_assert_ptr_null (fleece_storage_new_dir (shared));
  assert_api_error (EPERM, "not writable by group or others");
  ck_assert_int_eq (chmod (shared, 0703), 0);
  ck_assert_ptr_null (fleece_storage_new_dir (shared));
  assert_api_error (EPERM, "mode 703");

  ck_assert_int_eq (mkdir (foreign, 0700), 0);
  ck_assert_int_eq (chown (foreign, NOBODY, NOBODY), 0);
  ck_assert_ptr_null (fleece_storage_new_dir (foreign));
  assert_api_error (EPERM, "owned by uid 65534");
}
END_TEST

/* ---- allocation ------------------------------------------------------- */

START_TEST (test_dir_raw_exact_sparse_private)
{
  struct fleece_storage *st = dir_storage (imgdir);
  const uint64_t size = 40 * MIB + 4096;
  FleeceImage img = { 0 };
  g_autofree char *path = img_path ("vm-100-fleece-0.raw");
  g_autofree char *pending = NULL;
  struct stat sb, psb;

  g_autoptr (GError) err = NULL;

  /* First only under the run-tagged name. */
  ck_assert_msg (fleece_storage_alloc (st, "vm-100-fleece-0.raw", "raw", size,
                                       RUN, false, &img, &err), "%s",
                 err ? err->message : "");
  ck_assert_ptr_null (img.volid);
  ck_assert_str_eq (img.pending, ".vm-100-fleece-0.raw.0f1e2d3c.new");
  assert_dir (imgdir, ".vm-100-fleece-0.raw.0f1e2d3c.new");
  ck_assert (fleece_storage_publish (st, "vm-100-fleece-0.raw", &img, &err));
  ck_assert_str_eq (img.volid, "vm-100-fleece-0.raw");
  ck_assert (!img.unformatted);
  ck_assert_int_eq (lstat (path, &sb), 0);
  ck_assert (S_ISREG (sb.st_mode));
  ck_assert_uint_eq ((uint64_t) sb.st_size, size);
  ck_assert_msg ((uint64_t) sb.st_blocks * 512 <= 64 * 1024,
                 "%llu bytes allocated", (unsigned long long) sb.st_blocks * 512);
  /* Guest data: only the owner may read it. */
  ck_assert_uint_eq (sb.st_mode & 07777, 0600);
  /* The identity is the file's. */
  ck_assert_int_eq (fleece_jint (img.identity, "dev"), (int64_t) sb.st_dev);
  ck_assert_int_eq (fleece_jint (img.identity, "ino"), (int64_t) sb.st_ino);

  /* Until the volid is recorded, the run-tagged name is a second link of
   * the same file. */
  pending = img_path (img.pending);
  ck_assert_int_eq (lstat (pending, &psb), 0);
  ck_assert_uint_eq (psb.st_ino, sb.st_ino);
  ck_assert_uint_eq (sb.st_nlink, 2);
  fleece_storage_commit (st, &img);
  ck_assert_ptr_null (img.pending);
  ck_assert_int_eq (lstat (pending, &psb), -1);
  assert_dir (imgdir, "vm-100-fleece-0.raw");

  fleece_image_clear (&img);
  fleece_storage_free (st);
}
END_TEST

START_TEST (test_dir_qcow2)
{
  /* 40 MiB + 4 KiB; and 5 sectors, the size of a small TPM state. */
  const uint64_t sizes[] = { 40 * MIB + 4096, 5 * 512 };
  struct fleece_storage *st;

  if (!have_qemu_img ())
    return;
  st = dir_storage (imgdir);
  for (size_t i = 0; i < G_N_ELEMENTS (sizes); i++) {
    g_autofree char *name = g_strdup_printf ("vm-100-fleece-%zu.qcow2", i);
    g_autofree char *path = img_path (name);
    g_autoptr (TJson) info = NULL;
    FleeceImage img = { 0 };
    struct stat sb;

    alloc_ok (st, name, "qcow2", sizes[i], false, &img);
    ck_assert (!img.unformatted);
    info = qemu_img_info (path);
    ck_assert_str_eq (fleece_jstr (info, "format"), "qcow2");
    ck_assert_int_eq (fleece_jint (info, "virtual-size"), (int64_t) sizes[i]);
    ck_assert_int_eq (fleece_jint (info, "cluster-size"), 65536);
    ck_assert_int_eq (lstat (path, &sb), 0);
    ck_assert_msg ((uint64_t) sb.st_blocks * 512 < MIB, "%llu bytes allocated",
                   (unsigned long long) sb.st_blocks * 512);
    ck_assert_uint_eq (sb.st_mode & 07777, 0600);
    /* qemu-img wrote into the file the run created: same inode. */
    ck_assert_int_eq (fleece_jint (img.identity, "ino"), (int64_t) sb.st_ino);
    fleece_storage_commit (st, &img);
    fleece_image_clear (&img);
  }
  fleece_storage_free (st);
}
END_TEST

/* For the stock engine: qcow2 left an empty file for QEMU to format (no
 * qemu-img run: a failing one is installed), raw complete as always. */
START_TEST (test_dir_unformatted)
{
  struct fleece_storage *st = dir_storage (imgdir);
  g_autofree char *fake = g_build_filename (tmpdir, "qemu-img-fails", NULL);
  g_autofree char *qpath = img_path ("vm-100-fleece-0.qcow2");
  g_autofree char *rpath = img_path ("vm-100-fleece-1.raw");
  FleeceImage q = { 0 }, r = { 0 };
  struct stat sb;

  write_file (fake, "#!/bin/sh\nexit 1\n");
  ck_assert_int_eq (chmod (fake, 0755), 0);
  g_setenv ("FLEECE_QEMU_IMG", fake, TRUE);

  alloc_ok (st, "vm-100-fleece-0.qcow2", "qcow2", 40 * MIB, true, &q);
  ck_assert (q.unformatted);
  ck_assert_int_eq (lstat (qpath, &sb), 0);
  ck_assert (S_ISREG (sb.st_mode));
  ck_assert_int_eq (sb.st_size, 0);
  ck_assert_uint_eq (sb.st_mode & 07777, 0600);

  alloc_ok (st, "vm-100-fleece-1.raw", "raw", MIB + 512, true, &r);
  ck_assert (!r.unformatted);
  ck_assert_int_eq (lstat (rpath, &sb), 0);
  ck_assert_int_eq (sb.st_size, MIB + 512);

  fleece_image_clear (&q);
  fleece_image_clear (&r);
  fleece_storage_free (st);
}
END_TEST

START_TEST (test_dir_qcow2_unaligned)
{
  struct fleece_storage *st = dir_storage (imgdir);
  g_autoptr (GError) err = NULL;
  FleeceImage img = { 0 };

  /* qemu-img would round this up silently. */
  ck_assert (!fleece_storage_alloc (st, "vm-100-fleece-0.qcow2", "qcow2",
                                    5 * 512 + 100, RUN, false, &img, &err));
  assert_error (err, EINVAL, "multiple of 512");
  ck_assert_ptr_null (img.volid);
  assert_dir (imgdir, "");
  fleece_storage_free (st);
}
END_TEST

/* qemu-img fails after the file was made: the error carries its stderr,
 * and the record entry as it stands then (planned name and pending name,
 * no identity yet) is enough to remove it. */
START_TEST (test_dir_qemu_img_failure_is_undone_from_the_record)
{
  struct fleece_storage *st = dir_storage (imgdir);
  g_autofree char *failing = g_build_filename (tmpdir, "failing-qemu-img", NULL);
  g_autoptr (TJson) entry = planned_entry (st, "vm-7-fleece-0.qcow2");
  g_autoptr (GError) err = NULL;
  g_autoptr (GError) rerr = NULL;
  FleeceImage img = { 0 };

  write_file (failing,
              "#!/bin/sh\necho 'fake qemu-img: out of cheese' >&2\nexit 3\n");
  ck_assert_int_eq (chmod (failing, 0755), 0);
  g_setenv ("FLEECE_QEMU_IMG", failing, TRUE);
  ck_assert (!fleece_storage_alloc (st, "vm-7-fleece-0.qcow2", "qcow2", MIB,
                                    RUN, false, &img, &err));
  assert_error (err, EIO, "fake qemu-img: out of cheese");
  assert_error (err, EIO, "exited with status 3");
  fleece_image_clear (&img);
  assert_dir (imgdir, ".vm-7-fleece-0.qcow2.0f1e2d3c.new");

  ck_assert_int_eq (remove_entry (st, entry, &rerr), 0);
  ck_assert_ptr_null (rerr);
  assert_dir (imgdir, "");
  fleece_storage_free (st);
}
END_TEST

START_TEST (test_dir_qemu_img_missing)
{
  struct fleece_storage *st = dir_storage (imgdir);
  g_autoptr (GError) err = NULL;
  FleeceImage img = { 0 };

  g_setenv ("FLEECE_QEMU_IMG", "/nonexistent/qemu-img", TRUE);
  ck_assert (!fleece_storage_alloc (st, "vm-7-fleece-0.qcow2", "qcow2", MIB,
                                    RUN, false, &img, &err));
  assert_error (err, ENOENT, "FLEECE_QEMU_IMG");
  fleece_image_clear (&img);
  fleece_storage_free (st);
}
END_TEST

static const char *const bad_names[] = {
  "../x", "a/b", "vm-1-fleece-0.raw\n", "foo", "", ".", "..",
  "/etc/passwd", "vm-1-fleece-0.raw/..", "../vm-1-fleece-0.raw",
  "vm-1-fleece-0.raw.", "vm-1-fleece-0.vmdk", "vm--fleece-0",
  "vm-1-fleece-", "vm-1-fleece-0.", "vm-x-fleece-0", " vm-1-fleece-0",
  "vm-1-fleece-0 ", "VM-1-FLEECE-0", "vm-1-fleece-0\n.raw",
};

START_TEST (test_dir_bad_names)
{
  struct fleece_storage *st = dir_storage (imgdir);
  g_autofree char *outside = g_build_filename (tmpdir, "x", NULL);

  for (size_t i = 0; i < G_N_ELEMENTS (bad_names); i++) {
    g_autoptr (GError) e1 = NULL;
    g_autoptr (GError) e2 = NULL;
    g_autoptr (GError) e3 = NULL;
    g_autoptr (GError) e4 = NULL;
    g_autoptr (TJson) entry = json_object_new_object ();
    g_autoptr (TJson) bd = NULL;
    g_autofree char *path = NULL;
    FleeceImage img = { 0 };

    ck_assert_msg (!fleece_storage_alloc (st, bad_names[i], "raw", MIB, RUN,
                                          false, &img, &e1),
                   "accepted name #%zu", i);
    ck_assert_ptr_null (img.volid);
    assert_error (e1, EINVAL, "vm-<vmid>-fleece-<n>");
    /* Names come back from the record: the same check applies. */
    fleece_jset_str (entry, "volid", bad_names[i]);
    ck_assert_int_eq (remove_entry (st, entry, &e2), -1);
    assert_error (e2, EINVAL, "vm-<vmid>-fleece-<n>");
    path = fleece_storage_path (st, bad_names[i], &e3);
    ck_assert_msg (path == NULL, "path for #%zu: %s", i, path);
    assert_error (e3, EINVAL, "vm-<vmid>-fleece-<n>");
    bd = fleece_storage_blockdev (st, bad_names[i], "n", &e4);
    ck_assert_ptr_null (bd);
    assert_error (e4, EINVAL, "vm-<vmid>-fleece-<n>");
  }
  /* The newline is shown escaped, not raw. */
  {
    g_autoptr (GError) err = NULL;
    FleeceImage img = { 0 };

    ck_assert (!fleece_storage_alloc (st, "vm-1-fleece-0.raw\n", "raw", MIB,
                                      RUN, false, &img, &err));
    assert_error (err, EINVAL, "\"vm-1-fleece-0.raw\\n\"");
  }
  assert_dir (imgdir, "");
  ck_assert (!g_file_test (outside, G_FILE_TEST_EXISTS));
  fleece_storage_free (st);
}
END_TEST

/* A tampered record names a pending file outside the storage, a file
 * that is not a pending name, or a dotfile that is not this run's pending
 * name: refused, nothing removed. */
START_TEST (test_dir_bad_pending_names)
{
  static const char *const bad[] = {
    "../victim", "sub/x", "victim", ".victim",
    ".vm-1-fleece-0.raw.ffffffff.new",   /* another run's */
  };
  struct fleece_storage *st = dir_storage (imgdir);
  g_autofree char *victim = g_build_filename (tmpdir, "victim", NULL);
  g_autofree char *inside = img_path ("victim");
  g_autofree char *dotted = img_path (".victim");
  g_autofree char *other = img_path (".vm-1-fleece-0.raw.ffffffff.new");

  write_file (victim, "keep");
  write_file (inside, "keep");
  write_file (dotted, "keep");
  write_file (other, "keep");
  for (size_t i = 0; i < G_N_ELEMENTS (bad); i++) {
    g_autoptr (TJson) entry = json_object_new_object ();
    g_autoptr (GError) err = NULL;

    fleece_jset_str (entry, "image", "vm-1-fleece-0.raw");
    fleece_jset_str (entry, "pending", bad[i]);
    ck_assert_int_eq (remove_entry (st, entry, &err), -1);
    assert_error (err, EINVAL, "is not the run's");
  }
  ck_assert (g_file_test (victim, G_FILE_TEST_IS_REGULAR));
  ck_assert (g_file_test (inside, G_FILE_TEST_IS_REGULAR));
  ck_assert (g_file_test (dotted, G_FILE_TEST_IS_REGULAR));
  ck_assert (g_file_test (other, G_FILE_TEST_IS_REGULAR));
  fleece_storage_free (st);
}
END_TEST

START_TEST (test_dir_format_must_match_name)
{
  struct fleece_storage *st = dir_storage (imgdir);
  g_autoptr (GError) err = NULL;
  FleeceImage img = { 0 };

  ck_assert (!fleece_storage_alloc (st, "vm-1-fleece-0.raw", "qcow2", MIB, RUN,
                                    false, &img, &err));
  assert_error (err, EINVAL, "does not match its format");
  assert_dir (imgdir, "");
  fleece_storage_free (st);
}
END_TEST

/* ---- never over what is there, never anything it cannot prove -------- */

/* Issue 12, item 2: Proxmox's own fleecing images use these names.  The
 * publish fails and removes the pending file; no record entry the run can
 * have written then (planned names; with the pending file's identity; or
 * the name alone) removes the image that was there. */
START_TEST (test_dir_existing_image_is_never_removed)
{
  static const char *const formats[] = { "raw", "qcow2" };
  struct fleece_storage *st = dir_storage (imgdir);

  for (size_t i = 0; i < G_N_ELEMENTS (formats); i++) {
    g_autofree char *name = g_strdup_printf ("vm-100-fleece-0.%s", formats[i]);
    g_autofree char *path = img_path (name);
    g_autofree char *content = NULL;
    g_autoptr (TJson) planned = planned_entry (st, name);
    g_autoptr (TJson) with_id = NULL;
    g_autoptr (TJson) named = json_object_new_object ();
    g_autoptr (TJson) forged = json_object_new_object ();
    g_autoptr (GError) err = NULL;
    g_autoptr (GError) e1 = NULL;
    g_autoptr (GError) e2 = NULL;
    g_autoptr (GError) e3 = NULL;
    g_autoptr (GError) e4 = NULL;
    FleeceImage img = { 0 };

    write_file (path, "precious");
    ck_assert_msg (fleece_storage_alloc (st, name, formats[i], MIB, RUN, true,
                                         &img, &err), "%s", err ? err->message : "");
    with_id = entry_of (name, &img);
    ck_assert (!fleece_storage_publish (st, name, &img, &err));
    assert_error (err, EEXIST, "already exists; not overwriting it");
    assert_error (err, EEXIST, path);
    ck_assert_ptr_null (img.volid);
    fleece_image_clear (&img);
    /* No pending name is left behind. */
    {
      g_autofree char *expect = g_strdup (name);
      assert_dir (imgdir, expect);
    }

    ck_assert_int_eq (remove_entry (st, planned, &e1), 0);
    ck_assert_int_eq (remove_entry (st, with_id, &e2), 1);
    assert_error (e2, EEXIST, "left in place");
    fleece_jset_str (named, "volid", name);
    ck_assert_int_eq (remove_entry (st, named, &e3), 0);
    fleece_jset_str (forged, "volid", name);
    json_object_object_add (forged, "identity",
                            json_tokener_parse ("{\"dev\": 0, \"ino\": 1}"));
    ck_assert_int_eq (remove_entry (st, forged, &e4), 1);

    content = read_file (path);
    ck_assert_str_eq (content, "precious");
    ck_assert_int_eq (unlink (path), 0);
  }
  fleece_storage_free (st);
}
END_TEST

START_TEST (test_dir_remove_proven)
{
  struct fleece_storage *st = dir_storage (imgdir);
  FleeceImage img = { 0 };
  g_autoptr (TJson) entry = NULL;
  g_autoptr (GError) err = NULL;

  alloc_ok (st, "vm-100-fleece-0.raw", "raw", MIB, false, &img);
  fleece_storage_commit (st, &img);
  entry = entry_of ("vm-100-fleece-0.raw", &img);
  ck_assert_int_eq (remove_entry (st, entry, &err), 0);
  assert_dir (imgdir, "");
  /* Already gone is not an error. */
  ck_assert_int_eq (remove_entry (st, entry, &err), 0);
  ck_assert_ptr_null (err);
  fleece_image_clear (&img);
  fleece_storage_free (st);
}
END_TEST

/* A crash between the steps: the pending name proves the file the run's
 * (also while the record has no identity yet), and every link goes. */
START_TEST (test_dir_remove_before_commit)
{
  struct fleece_storage *st = dir_storage (imgdir);
  FleeceImage img = { 0 };
  g_autoptr (TJson) planned = planned_entry (st, "vm-100-fleece-0.raw");
  g_autoptr (GError) err = NULL;

  ck_assert (fleece_storage_alloc (st, "vm-100-fleece-0.raw", "raw", MIB, RUN,
                                   false, &img, &err));
  assert_dir (imgdir, ".vm-100-fleece-0.raw.0f1e2d3c.new");
  ck_assert_int_eq (remove_entry (st, planned, &err), 0);
  assert_dir (imgdir, "");
  fleece_image_clear (&img);

  alloc_ok (st, "vm-100-fleece-0.raw", "raw", MIB, false, &img);
  assert_dir (imgdir, ".vm-100-fleece-0.raw.0f1e2d3c.new,vm-100-fleece-0.raw");
  ck_assert_int_eq (remove_entry (st, planned, &err), 0);
  assert_dir (imgdir, "");
  fleece_image_clear (&img);
  fleece_storage_free (st);
}
END_TEST

START_TEST (test_dir_replaced_file_is_kept)
{
  struct fleece_storage *st = dir_storage (imgdir);
  g_autofree char *path = img_path ("vm-100-fleece-0.raw");
  g_autofree char *elsewhere = g_build_filename (tmpdir, "moved", NULL);
  g_autofree char *content = NULL;
  FleeceImage img = { 0 };
  g_autoptr (TJson) entry = NULL;
  g_autoptr (GError) err = NULL;

  alloc_ok (st, "vm-100-fleece-0.raw", "raw", MIB, false, &img);
  fleece_storage_commit (st, &img);
  entry = entry_of ("vm-100-fleece-0.raw", &img);
  /* Someone moved it away and put another file under the name. */
  ck_assert_int_eq (rename (path, elsewhere), 0);
  write_file (path, "someone else's");
  ck_assert_int_eq (remove_entry (st, entry, &err), 1);
  assert_error (err, EEXIST, "is not the file the run created");
  assert_error (err, EEXIST, path);
  content = read_file (path);
  ck_assert_str_eq (content, "someone else's");
  fleece_image_clear (&img);
  fleece_storage_free (st);
}
END_TEST

/* The same when the image was deleted first: ext4 and tmpfs hand the
 * freed inode number to the next file at once, so device and inode alone
 * would take the newcomer for the run's image. */
START_TEST (test_dir_replaced_file_reusing_the_inode_is_kept)
{
  struct fleece_storage *st = dir_storage (imgdir);
  g_autofree char *path = img_path ("vm-100-fleece-0.raw");
  g_autofree char *content = NULL;
  FleeceImage img = { 0 };
  g_autoptr (TJson) entry = NULL;
  g_autoptr (GError) err = NULL;
  struct stat sb;

  alloc_ok (st, "vm-100-fleece-0.raw", "raw", MIB, false, &img);
  fleece_storage_commit (st, &img);
  entry = entry_of ("vm-100-fleece-0.raw", &img);
  ck_assert_int_eq (unlink (path), 0);
  write_file (path, "someone else's");
  ck_assert_int_eq (lstat (path, &sb), 0);
  if (fleece_jint (img.identity, "ino") != (int64_t) sb.st_ino)
    fprintf (stderr, "note: the inode number was not reused here\n");
  ck_assert_int_eq (remove_entry (st, entry, &err), 1);
  content = read_file (path);
  ck_assert_str_eq (content, "someone else's");
  fleece_image_clear (&img);
  fleece_storage_free (st);
}
END_TEST

/* A symlink in the image's place is never followed, not even to the very
 * inode the run created (a link to it elsewhere), and never removed. */
START_TEST (test_dir_symlink_is_never_followed_or_removed)
{
  struct fleece_storage *st = dir_storage (imgdir);
  g_autofree char *path = img_path ("vm-100-fleece-0.raw");
  g_autofree char *elsewhere = g_build_filename (tmpdir, "kept-link", NULL);
  FleeceImage img = { 0 };
  g_autoptr (TJson) entry = NULL;
  g_autoptr (GError) err = NULL;
  struct stat sb;

  alloc_ok (st, "vm-100-fleece-0.raw", "raw", MIB, false, &img);
  fleece_storage_commit (st, &img);
  entry = entry_of ("vm-100-fleece-0.raw", &img);
  ck_assert_int_eq (link (path, elsewhere), 0);
  ck_assert_int_eq (unlink (path), 0);
  ck_assert_int_eq (symlink (elsewhere, path), 0);

  ck_assert_int_eq (remove_entry (st, entry, &err), 1);
  assert_error (err, EEXIST, "left in place");
  ck_assert_int_eq (lstat (path, &sb), 0);
  ck_assert (S_ISLNK (sb.st_mode));
  ck_assert_int_eq (lstat (elsewhere, &sb), 0);
  ck_assert (S_ISREG (sb.st_mode));
  ck_assert_int_eq (fleece_jint (img.identity, "ino"), (int64_t) sb.st_ino);
  fleece_image_clear (&img);
  fleece_storage_free (st);
}
END_TEST

/* Creating never goes through a symlink: not one in the image's place,
 * not one in the pending name's place. */
START_TEST (test_dir_alloc_never_follows_symlinks)
{
  struct fleece_storage *st = dir_storage (imgdir);
  g_autofree char *target = g_build_filename (tmpdir, "target", NULL);
  g_autofree char *image_link = img_path ("vm-100-fleece-0.raw");
  g_autofree char *pending_link = img_path (".vm-100-fleece-1.raw.0f1e2d3c.new");
  g_autoptr (GError) e1 = NULL;
  g_autoptr (GError) e2 = NULL;
  FleeceImage img = { 0 };

  ck_assert_int_eq (symlink (target, image_link), 0);
  ck_assert (fleece_storage_alloc (st, "vm-100-fleece-0.raw", "raw", MIB, RUN,
                                   false, &img, &e1));
  ck_assert (!fleece_storage_publish (st, "vm-100-fleece-0.raw", &img, &e1));
  assert_error (e1, EEXIST, "already exists");
  ck_assert (!g_file_test (target, G_FILE_TEST_EXISTS));
  fleece_image_clear (&img);

  ck_assert_int_eq (symlink (target, pending_link), 0);
  ck_assert (!fleece_storage_alloc (st, "vm-100-fleece-1.raw", "raw", MIB, RUN,
                                    false, &img, &e2));
  ck_assert_int_eq (e2->code, EEXIST);
  ck_assert (!g_file_test (target, G_FILE_TEST_EXISTS));
  assert_dir (imgdir, ".vm-100-fleece-1.raw.0f1e2d3c.new,vm-100-fleece-0.raw");
  fleece_image_clear (&img);
  fleece_storage_free (st);
}
END_TEST

START_TEST (test_dir_blockdev_and_path)
{
  struct fleece_storage *st = dir_storage (imgdir);
  g_autoptr (GError) err = NULL;
  g_autoptr (TJson) bd = fleece_storage_blockdev (st, "vm-1-fleece-0.qcow2",
                                                  "scsi0-fleecing-file", &err);
  g_autofree char *path = fleece_storage_path (st, "vm-1-fleece-0.qcow2", &err);
  g_autofree char *expect = img_path ("vm-1-fleece-0.qcow2");

  ck_assert_ptr_nonnull (bd);
  ck_assert_str_eq (fleece_jstr (bd, "driver"), "file");
  ck_assert_str_eq (fleece_jstr (bd, "filename"), expect);
  ck_assert_str_eq (fleece_jstr (bd, "node-name"), "scsi0-fleecing-file");
  ck_assert_str_eq (path, expect);
  ck_assert_ptr_null (fleece_storage_qemu_objects (st, "x", &err));
  ck_assert_ptr_null (err);
  ck_assert_uint_eq (fleece_storage_min_job_cluster (st), MIB);
  fleece_storage_free (st);
}
END_TEST

/* ---- describe and match (the record's storage) ------------------------ */

START_TEST (test_dir_describe_and_match)
{
  g_autofree char *moved = g_build_filename (tmpdir, "moved", NULL);
  g_autofree char *other = g_build_filename (tmpdir, "other", NULL);
  struct fleece_storage *st = dir_storage (imgdir);
  struct fleece_storage *again = dir_storage (imgdir);
  struct fleece_storage *st_other, *replaced;
  g_autoptr (TJson) desc = fleece_storage_describe (st);
  g_autoptr (TJson) cb = json_tokener_parse ("{\"type\": \"callback\", \"id\": \"x\"}");
  g_autoptr (TJson) parsed = NULL;
  struct stat sb;

  ck_assert_int_eq (stat (imgdir, &sb), 0);
  ck_assert_str_eq (fleece_jstr (desc, "type"), "dir");
  ck_assert_str_eq (fleece_jstr (desc, "dir"), imgdir);
  ck_assert_int_eq (fleece_jint (desc, "dev"), (int64_t) sb.st_dev);
  ck_assert_int_eq (fleece_jint (desc, "ino"), (int64_t) sb.st_ino);
  /* Through text, as it goes through the record. */
  parsed = json_tokener_parse (json_object_to_json_string (desc));
  ck_assert (fleece_storage_matches (st, parsed));
  ck_assert (fleece_storage_matches (again, parsed));
  ck_assert (!fleece_storage_matches (st, cb));
  ck_assert (!fleece_storage_matches (st, NULL));
  ck_assert (!fleece_storage_matches (NULL, parsed));

  ck_assert_int_eq (mkdir (other, 0700), 0);
  st_other = dir_storage (other);
  ck_assert (!fleece_storage_matches (st_other, parsed));

  /* The same path, another directory: not the storage the record means. */
  ck_assert_int_eq (rename (imgdir, moved), 0);
  ck_assert_int_eq (mkdir (imgdir, 0700), 0);
  replaced = dir_storage (imgdir);
  ck_assert (!fleece_storage_matches (replaced, parsed));

  fleece_storage_free (st);
  fleece_storage_free (again);
  fleece_storage_free (st_other);
  fleece_storage_free (replaced);
}
END_TEST

START_TEST (test_desc_names)
{
  static const struct { const char *json, *name; } cases[] = {
    { "{\"type\": \"dir\", \"dir\": \"/var/lib/fleece\"}", "directory /var/lib/fleece" },
    { "{\"type\": \"rbd\", \"pool\": \"p\"}", "RBD pool p" },
    { "{\"type\": \"rbd\", \"pool\": \"p\", \"namespace\": \"n\"}", "RBD pool p/n" },
    { "{\"type\": \"callback\", \"id\": \"pve:local-lvm\"}",
      "the caller's storage \"pve:local-lvm\"" },
    { "{\"type\": \"nfs\"}", "an unknown storage" },
    { "[]", "an unknown storage" },
  };

  for (size_t i = 0; i < G_N_ELEMENTS (cases); i++) {
    g_autoptr (TJson) desc = json_tokener_parse (cases[i].json);
    g_autofree char *name = fleece_storage_desc_name (desc);

    ck_assert_str_eq (name, cases[i].name);
  }
}
END_TEST

START_TEST (test_valid_names)
{
  const char *suffix = "unset";

  ck_assert (fleece_storage_valid_name ("vm-100-fleece-0", false, &suffix));
  ck_assert_ptr_null (suffix);
  ck_assert (!fleece_storage_valid_name ("vm-100-fleece-0.raw", false, &suffix));
  ck_assert (fleece_storage_valid_name ("vm-100-fleece-0.raw", true, &suffix));
  ck_assert_str_eq (suffix, "raw");
  ck_assert (fleece_storage_valid_name ("vm-100-fleece-12.qcow2", true, &suffix));
  ck_assert_str_eq (suffix, "qcow2");
  for (size_t i = 0; i < G_N_ELEMENTS (bad_names); i++)
    ck_assert_msg (!fleece_storage_valid_name (bad_names[i], true, &suffix),
                   "#%zu", i);
  ck_assert (!fleece_storage_valid_name (NULL, true, &suffix));
}
END_TEST

/* ---- StrictModes (safefs.c) ------------------------------------------------ */

static char *
make_dir (const char *parent, const char *name, mode_t mode, uid_t uid)
{
  char *dir = g_build_filename (parent, name, NULL);

  ck_assert_int_eq (mkdir (dir, 0700), 0);
  ck_assert_int_eq (chmod (dir, mode), 0);
  ck_assert_int_eq (chown (dir, uid, (gid_t) -1), 0);
  return dir;
}

/* Does dir pass?  Else: does the error have code and substr? */
static void
assert_private (const char *dir, int code, const char *substr)
{
  g_autoptr (GError) err = NULL;
  bool ok = fleece_dir_check_private (dir, "test directory", &err);

  if (!code) {
    ck_assert_msg (ok, "%s refused: %s", dir, err ? err->message : "");
    return;
  }
  ck_assert_msg (!ok, "%s accepted", dir);
  assert_error (err, code, substr);
}

/* As root (euid 0): the directory itself. */
START_TEST (test_private_dir_as_root)
{
  g_autofree char *ok = make_dir (tmpdir, "ok", 0755, 0);
  g_autofree char *group = make_dir (tmpdir, "group", 0775, 0);
  g_autofree char *others = make_dir (tmpdir, "others", 0757, 0);
  g_autofree char *sticky = make_dir (tmpdir, "sticky", 01777, 0);
  g_autofree char *foreign = make_dir (tmpdir, "foreign", 0700, NOBODY);
  g_autofree char *link = g_build_filename (tmpdir, "link", NULL);
  g_autofree char *file = g_build_filename (tmpdir, "file", NULL);
  g_autofree char *missing = g_build_filename (tmpdir, "missing", NULL);

  if (geteuid () != 0) {
    fprintf (stderr, "SKIP: not root: ownership cases need root\n");
    return;
  }
  ck_assert_int_eq (symlink (ok, link), 0);
  write_file (file, "x");
  assert_private (ok, 0, NULL);
  assert_private (group, EPERM, "not writable by group or others");
  assert_private (others, EPERM, "mode 757");
  /* Sticky does not make the directory itself safe: only its parents. */
  assert_private (sticky, EPERM, "mode 1777");
  assert_private (foreign, EPERM, "owned by uid 65534");
  assert_private (link, ELOOP, "symbolic link; give the directory it points to");
  assert_private (file, ENOTDIR, "is not a directory");
  assert_private (missing, ENOENT, missing);
  assert_private ("relative", EINVAL, "not an absolute path");
  assert_private (NULL, EINVAL, "not an absolute path");
}
END_TEST

/* As root: the parents (root is the euid and root, so only modes count). */
START_TEST (test_private_dir_parents_as_root)
{
  g_autofree char *shared = make_dir (tmpdir, "shared", 0777, 0);
  g_autofree char *in_shared = make_dir (shared, "d", 0700, 0);
  g_autofree char *sticky = make_dir (tmpdir, "sticky", 01777, 0);
  g_autofree char *in_sticky = make_dir (sticky, "d", 0700, 0);
  g_autofree char *foreign = make_dir (tmpdir, "foreign", 0755, OTHER_UID);
  g_autofree char *in_foreign = make_dir (foreign, "d", 0700, 0);
  g_autofree char *deep = make_dir (in_shared, "deeper", 0700, 0);

  if (geteuid () != 0) {
    fprintf (stderr, "SKIP: not root: ownership cases need root\n");
    return;
  }
  assert_private (in_shared, EPERM, "other users can change");
  assert_private (in_shared, EPERM, shared);
  assert_private (deep, EPERM, shared);
  assert_private (in_sticky, 0, NULL);
  /* A parent owned by someone else can be renamed under us. */
  assert_private (in_foreign, EPERM, "owned by uid 1");
}
END_TEST

/* The unprivileged cases, in a child that is nobody: euid-owned passes,
 * root-owned is not the euid's, parents may be root's or the euid's, a
 * writable parent only root's and sticky.  Returns the first failure
 * (g_free) or NULL. */
static char *
check_as_nobody (const char *base)
{
  static const struct {
    const char *dir;
    bool ok;
    const char *substr;
  } cases[] = {
    { "mine", true, NULL },
    { "roots", false, "must be owned by uid 65534" },
    { "mine-parent/d", true, NULL },
    { "root-sticky/d", true, NULL },
    { "root-open/d", false, "other users can change" },
    { "mine-open/d", false, "other users can change" },
    { "mine-sticky/d", false, "other users can change" },
    { "other-parent/d", false, "owned by uid 1" },
  };

  for (size_t i = 0; i < G_N_ELEMENTS (cases); i++) {
    g_autofree char *dir = g_build_filename (base, cases[i].dir, NULL);
    g_autoptr (GError) err = NULL;
    bool ok = fleece_dir_check_private (dir, "test directory", &err);

    if (ok != cases[i].ok)
      return g_strdup_printf ("%s: %s", dir, ok ? "accepted" : err->message);
    if (!ok && !strstr (err->message, cases[i].substr))
      return g_strdup_printf ("%s: \"%s\" not in: %s", dir, cases[i].substr,
                              err->message);
  }
  return NULL;
}

/* The same as nobody through the public storage: it works there. */
static char *
alloc_as_nobody (const char *base)
{
  g_autofree char *dir = g_build_filename (base, "mine", NULL);
  struct fleece_storage *st = fleece_storage_new_dir (dir);
  g_autoptr (GError) err = NULL;
  g_autoptr (TJson) entry = NULL;
  FleeceImage img = { 0 };
  char *failure = NULL;

  if (!st)
    return g_strdup (fleece_get_error ());
  if (!fleece_storage_alloc (st, "vm-1-fleece-0.raw", "raw", MIB, RUN, false,
                             &img, &err) ||
      !fleece_storage_publish (st, "vm-1-fleece-0.raw", &img, &err))
    failure = g_strdup (err->message);
  else {
    fleece_storage_commit (st, &img);
    entry = entry_of ("vm-1-fleece-0.raw", &img);
    if (fleece_storage_remove (st, entry, RUN, &err) != 0)
      failure = g_strdup (err ? err->message : "kept");
  }
  fleece_image_clear (&img);
  fleece_storage_free (st);
  return failure;
}

/* Run fn (base) as nobody in a child; the child's verdict comes back
 * through a pipe ("ok", or the failure).  Its exit status is not the
 * verdict: under valgrind it reports the leaks of whatever test failed
 * before in the same process. */
static void
run_as_nobody (char *(*fn) (const char *), const char *base)
{
  char buf[1024] = "";
  int pfd[2], status = 0;
  ssize_t n;
  pid_t pid;

  ck_assert_int_eq (pipe (pfd), 0);
  pid = fork ();
  ck_assert_int_ge (pid, 0);
  if (pid == 0) {
    char *failure;

    close (pfd[0]);
    if (setresgid (NOBODY, NOBODY, NOBODY) != 0 ||
        setresuid (NOBODY, NOBODY, NOBODY) != 0)
      failure = g_strdup_printf ("cannot become nobody: %s", g_strerror (errno));
    else
      failure = fn (base);
    if (write (pfd[1], failure ? failure : "ok", failure ? strlen (failure) : 2) < 0)
      _exit (3);
    g_free (failure);
    close (pfd[1]);
    _exit (0);
  }
  close (pfd[1]);
  n = read (pfd[0], buf, sizeof buf - 1);
  close (pfd[0]);
  ck_assert_int_eq (waitpid (pid, &status, 0), pid);
  ck_assert_msg (n > 0, "the child as nobody said nothing (status 0x%x)", status);
  ck_assert_msg (strcmp (buf, "ok") == 0, "as nobody: %s", buf);
}

START_TEST (test_private_dir_as_nobody)
{
  g_autofree char *d1 = NULL, *d2 = NULL, *d3 = NULL, *d4 = NULL, *d5 = NULL;
  g_autofree char *d6 = NULL;

  if (geteuid () != 0) {
    fprintf (stderr, "SKIP: not root: cannot become nobody\n");
    return;
  }
  g_free (make_dir (tmpdir, "mine", 0700, NOBODY));
  g_free (make_dir (tmpdir, "roots", 0755, 0));
  d1 = make_dir (tmpdir, "mine-parent", 0755, NOBODY);
  g_free (make_dir (d1, "d", 0700, NOBODY));
  d2 = make_dir (tmpdir, "root-sticky", 01777, 0);
  g_free (make_dir (d2, "d", 0700, NOBODY));
  d3 = make_dir (tmpdir, "root-open", 0777, 0);
  g_free (make_dir (d3, "d", 0700, NOBODY));
  d4 = make_dir (tmpdir, "mine-open", 0777, NOBODY);
  g_free (make_dir (d4, "d", 0700, NOBODY));
  d5 = make_dir (tmpdir, "mine-sticky", 01777, NOBODY);
  g_free (make_dir (d5, "d", 0700, NOBODY));
  d6 = make_dir (tmpdir, "other-parent", 0755, OTHER_UID);
  g_free (make_dir (d6, "d", 0700, NOBODY));
  run_as_nobody (check_as_nobody, tmpdir);
  run_as_nobody (alloc_as_nobody, tmpdir);
}
END_TEST

/* ---- the caller's callback storage ------------------------------------------- */

typedef struct {
  int allocs, removes, paths, blockdevs, freed;
  int fail_errno;           /* alloc/remove/path/blockdev fail with it */
  const char *reason;       /* ... and this reason (may be NULL) */
  bool no_volid;
  const char *path_answer;  /* what path returns */
  const char *blockdev_answer;
  char *name, *format, *volid;
  uint64_t size;
} Fake;

static int
fail_with (Fake *f, char **reason)
{
  if (f->reason)
    *reason = strdup (f->reason);
  errno = f->fail_errno;
  return -1;
}

static bool
failing (const Fake *f)
{
  return f->fail_errno || f->reason;
}

static int
fake_alloc (void *user_data, const char *name, const char *format,
            uint64_t size, char **volid, char **reason)
{
  Fake *f = user_data;

  f->allocs++;
  free (f->name);
  free (f->format);
  f->name = strdup (name);
  f->format = strdup (format);
  f->size = size;
  if (failing (f))
    return fail_with (f, reason);
  if (!f->no_volid) {
    char buf[256];

    snprintf (buf, sizeof buf, "store:%s", name);
    *volid = strdup (buf);
  }
  return 0;
}

static int
fake_remove (void *user_data, const char *volid, char **reason)
{
  Fake *f = user_data;

  f->removes++;
  free (f->volid);
  f->volid = strdup (volid);
  return failing (f) ? fail_with (f, reason) : 0;
}

static char *
fake_path (void *user_data, const char *volid, char **reason)
{
  Fake *f = user_data;

  f->paths++;
  if (failing (f)) {
    fail_with (f, reason);
    return NULL;
  }
  return f->path_answer ? strdup (f->path_answer) : NULL;
}

static char *
fake_blockdev (void *user_data, const char *volid, char **reason)
{
  Fake *f = user_data;

  f->blockdevs++;
  if (failing (f)) {
    fail_with (f, reason);
    return NULL;
  }
  return f->blockdev_answer ? strdup (f->blockdev_answer) : NULL;
}

static void
fake_free_data (void *user_data)
{
  Fake *f = user_data;

  f->freed++;
}

static void
fake_clear (Fake *f)
{
  free (f->name);
  free (f->format);
  free (f->volid);
}

/* A complete callback storage "pve:local-lvm" over f. */
static struct fleece_storage *
fake_storage (Fake *f, unsigned flags, bool with_path, bool with_blockdev)
{
  struct fleece_storage *st = fleece_storage_new_callback ("pve:local-lvm",
                                                           flags, f,
                                                           fake_free_data);

  ck_assert_msg (st != NULL, "%s", fleece_get_error ());
  ck_assert_int_eq (fleece_storage_set_alloc_callback (st, fake_alloc), 0);
  ck_assert_int_eq (fleece_storage_set_remove_callback (st, fake_remove), 0);
  if (with_path)
    ck_assert_int_eq (fleece_storage_set_path_callback (st, fake_path), 0);
  if (with_blockdev)
    ck_assert_int_eq (fleece_storage_set_blockdev_callback (st, fake_blockdev), 0);
  return st;
}

START_TEST (test_callback_new_args)
{
  Fake f = { 0 };
  g_autofree char *long_id = g_strnfill (257, 'x');
  g_autofree char *max_id = g_strnfill (256, 'x');
  struct fleece_storage *st;

  ck_assert_ptr_null (fleece_storage_new_callback (NULL, 0, &f, fake_free_data));
  assert_api_error (EINVAL, "fleece_storage_new_callback: the storage id");
  ck_assert_ptr_null (fleece_storage_new_callback ("", 0, &f, fake_free_data));
  assert_api_error (EINVAL, "printable");
  ck_assert_ptr_null (fleece_storage_new_callback ("a\nb", 0, &f, fake_free_data));
  assert_api_error (EINVAL, "printable");
  ck_assert_ptr_null (fleece_storage_new_callback (long_id, 0, &f, fake_free_data));
  assert_api_error (EINVAL, "1 to 256");
  ck_assert_ptr_null (fleece_storage_new_callback ("x", 0x100, &f, fake_free_data));
  assert_api_error (EINVAL, "unknown flags 0x100");
  /* No object took user_data: it stays the caller's. */
  ck_assert_int_eq (f.freed, 0);

  st = fleece_storage_new_callback (max_id, FLEECE_STORAGE_QCOW2, &f,
                                    fake_free_data);
  ck_assert_ptr_nonnull (st);
  ck_assert_uint_eq (fleece_storage_flags (st), FLEECE_STORAGE_QCOW2);
  fleece_storage_free (st);
  ck_assert_int_eq (f.freed, 1);
}
END_TEST

START_TEST (test_callback_setters_refuse)
{
  Fake f = { 0 };
  struct fleece_storage *dir = dir_storage (imgdir);
  struct fleece_storage *st = fake_storage (&f, 0, true, false);
  struct fleece_handle *h = fleece_new ();

  ck_assert_int_eq (fleece_storage_set_alloc_callback (dir, fake_alloc), -1);
  assert_api_error (EINVAL, "not a callback storage");
  ck_assert_int_eq (fleece_storage_set_path_callback (NULL, fake_path), -1);
  assert_api_error (EINVAL, "storage is NULL");
  ck_assert_int_eq (fleece_storage_set_option (st, "conf", "/x"), -1);
  assert_api_error (EINVAL, "has no options");
  ck_assert_int_eq (fleece_storage_set_option (dir, "conf", "/x"), -1);
  assert_api_error (EINVAL, "has no options");

  /* Given to a handle, a storage is fixed. */
  ck_assert_int_eq (fleece_set_storage (h, st), 0);
  ck_assert_int_eq (fleece_storage_set_blockdev_callback (st, fake_blockdev), -1);
  assert_api_error (EBUSY, "belongs to a handle");
  ck_assert_int_eq (fleece_storage_set_option (st, "id", "admin"), -1);
  assert_api_error (EBUSY, "belongs to a handle");
  ck_assert_int_eq (f.freed, 0);
  fleece_free (h);
  ck_assert_int_eq (f.freed, 1);
  fleece_storage_free (dir);
}
END_TEST

/* A storage without the callbacks a run needs is refused by the handle,
 * which took it (and so frees it, once). */
START_TEST (test_callback_incomplete)
{
  static const struct {
    bool alloc, remove, path, blockdev;
    const char *missing;
  } cases[] = {
    { false, true, true, false, "missing: alloc)" },
    { true, false, false, true, "missing: remove)" },
    { true, true, false, false, "missing: path/blockdev)" },
    { false, false, false, false, "missing: alloc remove path/blockdev)" },
  };

  for (size_t i = 0; i < G_N_ELEMENTS (cases); i++) {
    Fake f = { 0 };
    struct fleece_handle *h = fleece_new ();
    struct fleece_storage *st = fleece_storage_new_callback ("c", 0, &f,
                                                             fake_free_data);

    if (cases[i].alloc)
      fleece_storage_set_alloc_callback (st, fake_alloc);
    if (cases[i].remove)
      fleece_storage_set_remove_callback (st, fake_remove);
    if (cases[i].path)
      fleece_storage_set_path_callback (st, fake_path);
    if (cases[i].blockdev)
      fleece_storage_set_blockdev_callback (st, fake_blockdev);
    ck_assert_int_eq (fleece_set_storage (h, st), -1);
    assert_api_error (EINVAL, "fleece_set_storage: storage c lacks callbacks");
    assert_api_error (EINVAL, cases[i].missing);
    ck_assert_int_eq (f.freed, 1);
    fleece_free (h);
    ck_assert_int_eq (f.freed, 1);
  }
}
END_TEST

START_TEST (test_callback_alloc_and_identity)
{
  Fake f = { 0 };
  struct fleece_storage *st = fake_storage (&f, FLEECE_STORAGE_QCOW2, true, false);
  g_autoptr (TJson) desc = fleece_storage_describe (st);
  g_autoptr (TJson) other = json_tokener_parse ("{\"type\": \"callback\", \"id\": \"pve:other\"}");
  g_autoptr (TJson) dir = json_tokener_parse ("{\"type\": \"dir\", \"dir\": \"/\"}");
  FleeceImage img = { 0 };

  alloc_ok (st, "vm-100-fleece-0", "qcow2", 40 * MIB + 4096, false, &img);
  ck_assert_int_eq (f.allocs, 1);
  ck_assert_str_eq (f.name, "vm-100-fleece-0");
  ck_assert_str_eq (f.format, "qcow2");
  ck_assert_uint_eq (f.size, 40 * MIB + 4096);
  ck_assert_str_eq (img.volid, "store:vm-100-fleece-0");
  /* The volid the storage returned in this run is the proof. */
  ck_assert_str_eq (json_object_get_string (img.identity), "store:vm-100-fleece-0");
  ck_assert_ptr_null (img.pending);
  ck_assert_ptr_null (fleece_storage_pending_name (st, "vm-100-fleece-0", RUN));

  ck_assert_str_eq (fleece_jstr (desc, "type"), "callback");
  ck_assert_str_eq (fleece_jstr (desc, "id"), "pve:local-lvm");
  ck_assert_int_eq (fleece_jint (desc, "flags"), FLEECE_STORAGE_QCOW2);
  ck_assert (fleece_storage_matches (st, desc));
  ck_assert (!fleece_storage_matches (st, other));
  ck_assert (!fleece_storage_matches (st, dir));
  ck_assert_uint_eq (fleece_storage_min_job_cluster (st), 4 * MIB);
  fleece_image_clear (&img);
  fleece_storage_free (st);
  ck_assert_int_eq (f.freed, 1);
  fake_clear (&f);
}
END_TEST

START_TEST (test_callback_no_qcow2)
{
  Fake f = { 0 };
  struct fleece_storage *st = fake_storage (&f, FLEECE_STORAGE_DISCARD, true, false);
  g_autoptr (GError) err = NULL;
  FleeceImage img = { 0 };

  ck_assert (!fleece_storage_alloc (st, "vm-1-fleece-0", "qcow2", MIB, RUN,
                                    false, &img, &err));
  assert_error (err, EINVAL, "cannot hold qcow2");
  ck_assert_int_eq (f.allocs, 0);
  fleece_storage_free (st);
  fake_clear (&f);
}
END_TEST

/* What the callbacks say reaches the error: the reason, else the errno
 * they left, else that none was given. */
START_TEST (test_callback_reasons)
{
  Fake f = { 0 };
  struct fleece_storage *st = fake_storage (&f, 0, true, false);
  FleeceImage img = { 0 };

  f.fail_errno = ENOSPC;
  f.reason = "thin pool pve/data is 100% full";
  {
    g_autoptr (GError) err = NULL;
    ck_assert (!fleece_storage_alloc (st, "vm-1-fleece-0", "raw", MIB, RUN,
                                      false, &img, &err));
    assert_error (err, ENOSPC, "the storage pve:local-lvm could not allocate "
                  "image vm-1-fleece-0 (raw, 1048576 bytes): thin pool "
                  "pve/data is 100% full");
  }
  f.reason = NULL;
  f.fail_errno = EDQUOT;
  {
    g_autoptr (GError) err = NULL;
    ck_assert (!fleece_storage_alloc (st, "vm-1-fleece-0", "raw", MIB, RUN,
                                      false, &img, &err));
    assert_error (err, EDQUOT, g_strerror (EDQUOT));
  }
  f.fail_errno = 0;
  f.reason = "";
  {
    g_autoptr (GError) err = NULL;
    ck_assert (!fleece_storage_alloc (st, "vm-1-fleece-0", "raw", MIB, RUN,
                                      false, &img, &err));
    assert_error (err, EIO, "no reason given");
  }
  f.reason = NULL;
  f.no_volid = true;
  {
    g_autoptr (GError) err = NULL;
    ck_assert (!fleece_storage_alloc (st, "vm-1-fleece-0", "raw", MIB, RUN,
                                      false, &img, &err));
    assert_error (err, EIO, "returned success but no volume id");
  }
  f.reason = "lvremove: Logical volume in use";
  {
    g_autoptr (GError) err = NULL;
    g_autoptr (TJson) e = json_tokener_parse ("{\"volid\": \"v\", \"identity\": \"v\"}");

    ck_assert_int_eq (fleece_storage_remove (st, e, RUN, &err), -1);
    assert_error (err, EIO, "could not free volume v: lvremove: Logical volume in use");
  }
  f.reason = "no such volume";
  {
    g_autoptr (GError) err = NULL;
    ck_assert_ptr_null (fleece_storage_path (st, "v", &err));
    assert_error (err, EIO, "has no path for volume v: no such volume");
  }
  f.reason = NULL;
  f.path_answer = "";
  {
    g_autoptr (GError) err = NULL;
    ck_assert_ptr_null (fleece_storage_path (st, "v", &err));
    assert_error (err, EIO, "returned an empty path");
  }
  fleece_image_clear (&img);
  fleece_storage_free (st);
  fake_clear (&f);
}
END_TEST

/* The caller's remove is asked only for a volume its alloc returned in the
 * run (the record entry's identity). */
START_TEST (test_callback_remove_only_own)
{
  Fake f = { 0 };
  struct fleece_storage *st = fake_storage (&f, 0, true, false);
  g_autoptr (TJson) none = json_tokener_parse ("{\"image\": \"vm-1-fleece-0\", "
                                               "\"volid\": null}");
  g_autoptr (TJson) unproven = json_tokener_parse ("{\"volid\": \"store:a\"}");
  g_autoptr (TJson) mismatch = json_tokener_parse ("{\"volid\": \"store:a\", "
                                                   "\"identity\": \"store:b\"}");
  g_autoptr (TJson) own = json_tokener_parse ("{\"volid\": \"store:a\", "
                                              "\"identity\": \"store:a\"}");
  g_autoptr (GError) err = NULL;

  ck_assert_int_eq (fleece_storage_remove (st, none, RUN, &err), 0);
  ck_assert_int_eq (fleece_storage_remove (st, unproven, RUN, &err), 0);
  ck_assert_int_eq (fleece_storage_remove (st, mismatch, RUN, &err), 0);
  ck_assert_int_eq (f.removes, 0);
  ck_assert_int_eq (fleece_storage_remove (st, own, RUN, &err), 0);
  ck_assert_int_eq (f.removes, 1);
  ck_assert_str_eq (f.volid, "store:a");
  fleece_storage_free (st);
  fake_clear (&f);
}
END_TEST

/* The blockdev callback's JSON is checked: an object with a "driver";
 * the library sets its own node name and asks for discard. */
START_TEST (test_callback_blockdev_json)
{
  static const struct { const char *answer, *substr; } bad[] = {
    { "not json", "not a JSON object with a \"driver\" string: not json" },
    { "[1, 2]", "not a JSON object with a \"driver\"" },
    { "{}", "not a JSON object with a \"driver\"" },
    { "\"rbd\"", "not a JSON object with a \"driver\"" },
    { "{\"driver\": 5}", "not a JSON object with a \"driver\" string" },
  };
  Fake f = { 0 };
  struct fleece_storage *st = fake_storage (&f, 0, false, true);

  f.blockdev_answer = "{\"driver\": \"rbd\", \"pool\": \"p\", \"image\": "
                      "\"vm-1-fleece-0\", \"node-name\": \"theirs\"}";
  {
    g_autoptr (GError) err = NULL;
    g_autoptr (TJson) bd = fleece_storage_blockdev (st, "v", "scsi0-fleecing-file", &err);

    ck_assert_msg (bd != NULL, "%s", err ? err->message : "");
    ck_assert_str_eq (fleece_jstr (bd, "driver"), "rbd");
    ck_assert_str_eq (fleece_jstr (bd, "pool"), "p");
    ck_assert_str_eq (fleece_jstr (bd, "node-name"), "scsi0-fleecing-file");
    ck_assert_str_eq (fleece_jstr (bd, "discard"), "unmap");
  }
  for (size_t i = 0; i < G_N_ELEMENTS (bad); i++) {
    g_autoptr (GError) err = NULL;

    f.blockdev_answer = bad[i].answer;
    ck_assert_ptr_null (fleece_storage_blockdev (st, "v", "n", &err));
    assert_error (err, EINVAL, "the storage pve:local-lvm has no QEMU blockdev "
                  "definition for volume v");
    assert_error (err, EINVAL, bad[i].substr);
  }
  f.blockdev_answer = NULL;
  f.reason = "volume v is not active";
  f.fail_errno = ENODEV;
  {
    g_autoptr (GError) err = NULL;
    ck_assert_ptr_null (fleece_storage_blockdev (st, "v", "n", &err));
    assert_error (err, ENODEV, "volume v is not active");
  }
  /* A storage with blockdev only has no local paths. */
  {
    g_autoptr (GError) err = NULL;
    ck_assert_ptr_null (fleece_storage_path (st, "v", &err));
    assert_error (err, ENOTSUP, "blockdev definitions, not paths");
  }
  fleece_storage_free (st);
  fake_clear (&f);
}
END_TEST

/* Without a blockdev callback QEMU opens the path: a file or a block
 * device, never something relative. */
START_TEST (test_callback_blockdev_from_path)
{
  Fake f = { 0 };
  struct fleece_storage *st = fake_storage (&f, 0, true, false);
  g_autofree char *file = g_build_filename (tmpdir, "lv", NULL);

  write_file (file, "");
  f.path_answer = file;
  {
    g_autoptr (GError) err = NULL;
    g_autoptr (TJson) bd = fleece_storage_blockdev (st, "v", "n", &err);

    ck_assert_msg (bd != NULL, "%s", err ? err->message : "");
    ck_assert_str_eq (fleece_jstr (bd, "driver"), "file");
    ck_assert_str_eq (fleece_jstr (bd, "filename"), file);
    ck_assert_str_eq (fleece_jstr (bd, "node-name"), "n");
  }
  f.path_answer = "/dev/null";
  {
    g_autoptr (GError) err = NULL;
    g_autoptr (TJson) bd = fleece_storage_blockdev (st, "v", "n", &err);

    ck_assert_msg (bd != NULL, "%s", err ? err->message : "");
    ck_assert_str_eq (fleece_jstr (bd, "driver"), "host_device");
  }
  f.path_answer = "rbd:pool/image";
  {
    g_autoptr (GError) err = NULL;
    ck_assert_ptr_null (fleece_storage_blockdev (st, "v", "n", &err));
    assert_error (err, ENOTSUP, "give QEMU a blockdev definition instead");
  }
  fleece_storage_free (st);
  fake_clear (&f);
}
END_TEST

START_TEST (test_rbd_not_built)
{
  struct fleece_storage *st = fleece_storage_new_rbd ("rbd", NULL);

  /* Until the RBD storage is wired, a clear ENOTSUP. */
  if (st) {
    fleece_storage_free (st);
    return;
  }
  assert_api_error (ENOTSUP, "fleece_storage_new_rbd: ");
}
END_TEST

static Suite *
storage_suite (void)
{
  Suite *s = suite_create ("storage");
  TCase *tc;

  tc = tcase_create ("dir");
  tcase_add_unchecked_fixture (tc, case_setup, case_teardown);
  tcase_add_checked_fixture (tc, setup, teardown);
  tcase_add_test (tc, test_dir_new);
  tcase_add_test (tc, test_dir_new_refuses_unsafe_dirs);
  tcase_add_test (tc, test_dir_raw_exact_sparse_private);
  tcase_add_test (tc, test_dir_qcow2);
  tcase_add_test (tc, test_dir_unformatted);
  tcase_add_test (tc, test_dir_qcow2_unaligned);
  tcase_add_test (tc, test_dir_qemu_img_failure_is_undone_from_the_record);
  tcase_add_test (tc, test_dir_qemu_img_missing);
  tcase_add_test (tc, test_dir_bad_names);
  tcase_add_test (tc, test_dir_bad_pending_names);
  tcase_add_test (tc, test_dir_format_must_match_name);
  tcase_add_test (tc, test_dir_blockdev_and_path);
  tcase_add_test (tc, test_dir_describe_and_match);
  suite_add_tcase (s, tc);

  tc = tcase_create ("identity");
  tcase_add_unchecked_fixture (tc, case_setup, case_teardown);
  tcase_add_checked_fixture (tc, setup, teardown);
  tcase_add_test (tc, test_dir_existing_image_is_never_removed);
  tcase_add_test (tc, test_dir_remove_proven);
  tcase_add_test (tc, test_dir_remove_before_commit);
  tcase_add_test (tc, test_dir_replaced_file_is_kept);
  tcase_add_test (tc, test_dir_replaced_file_reusing_the_inode_is_kept);
  tcase_add_test (tc, test_dir_symlink_is_never_followed_or_removed);
  tcase_add_test (tc, test_dir_alloc_never_follows_symlinks);
  suite_add_tcase (s, tc);

  tc = tcase_create ("strictmodes");
  tcase_add_unchecked_fixture (tc, case_setup, case_teardown);
  tcase_add_checked_fixture (tc, setup, teardown);
  tcase_add_test (tc, test_private_dir_as_root);
  tcase_add_test (tc, test_private_dir_parents_as_root);
  tcase_add_test (tc, test_private_dir_as_nobody);
  suite_add_tcase (s, tc);

  tc = tcase_create ("callback");
  tcase_add_unchecked_fixture (tc, case_setup, case_teardown);
  tcase_add_checked_fixture (tc, setup, teardown);
  tcase_add_test (tc, test_callback_new_args);
  tcase_add_test (tc, test_callback_setters_refuse);
  tcase_add_test (tc, test_callback_incomplete);
  tcase_add_test (tc, test_callback_alloc_and_identity);
  tcase_add_test (tc, test_callback_no_qcow2);
  tcase_add_test (tc, test_callback_reasons);
  tcase_add_test (tc, test_callback_remove_only_own);
  tcase_add_test (tc, test_callback_blockdev_json);
  tcase_add_test (tc, test_callback_blockdev_from_path);
  tcase_add_test (tc, test_rbd_not_built);
  suite_add_tcase (s, tc);

  tc = tcase_create ("names");
  tcase_add_test (tc, test_desc_names);
  tcase_add_test (tc, test_valid_names);
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
