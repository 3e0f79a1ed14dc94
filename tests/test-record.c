/* Unit tests of libfleece/record.c: the durable record (version 2) in a
 * file (atomic replacement, modes, corrupt records) and through callbacks
 * (with their reasons), and the per-VM lock across fds and processes.
 *
 * The safety rules of issue 12: the record and the lock are opened with
 * O_NOFOLLOW and must be the effective user's; the state dir must pass
 * ssh's StrictModes rule (safefs.c); and what only reads (a load, a lock
 * probe) never creates the state dir. */
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

#include "internal.h"

/* An alias, so that g_autoptr works for json-c objects here without
 * clashing with a definition for json_object elsewhere. */
typedef json_object TJson;
static void
tjson_put (TJson *o)
{
  json_object_put (o);
}
G_DEFINE_AUTOPTR_CLEANUP_FUNC (TJson, tjson_put)

#define RECORD_LIMIT (1024 * 1024)

static char *tmpdir;
static char *statedir;  /* tmpdir/a/b/state: missing until the first store */

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
  tmpdir = g_dir_make_tmp ("fleece-test-record-XXXXXX", NULL);
  ck_assert_ptr_nonnull (tmpdir);
  statedir = g_build_filename (tmpdir, "a", "b", "state", NULL);
}

static void
teardown (void)
{
  rm_rf (tmpdir);
  g_free (statedir);
  g_free (tmpdir);
  statedir = tmpdir = NULL;
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

static FleeceRecordStore
file_store (void)
{
  FleeceRecordStore rs = { .dir = statedir };
  return rs;
}

static json_object *
make_record (uint32_t vmid, const char *extra)
{
  g_autofree char *s = g_strdup_printf (
    "{\"version\":2,\"vmid\":%u,\"images\":[\"vm-%u-fleece-0.qcow2\"],"
    "\"storage\":{\"type\":\"dir\",\"dir\":\"/var/lib/vz/images\"},"
    "\"extra\":\"%s\"}", vmid, vmid, extra);
  json_object *o = json_tokener_parse (s);

  ck_assert_ptr_nonnull (o);
  return o;
}

static gint
cmp_names (gconstpointer a, gconstpointer b)
{
  return strcmp (*(char *const *) a, *(char *const *) b);
}

/* Sorted names in dir. */
static char **
list_dir (const char *dir)
{
  GDir *d = g_dir_open (dir, 0, NULL);
  GPtrArray *a = g_ptr_array_new ();
  const char *name;

  ck_assert_ptr_nonnull (d);
  while ((name = g_dir_read_name (d)))
    g_ptr_array_add (a, g_strdup (name));
  g_dir_close (d);
  g_ptr_array_sort (a, cmp_names);
  g_ptr_array_add (a, NULL);
  return (char **) g_ptr_array_free (a, FALSE);
}

static char *
list_dir_str (const char *dir)
{
  g_auto (GStrv) names = list_dir (dir);
  return g_strjoinv (",", names);
}

static guint
count_entries (const char *dir)
{
  g_auto (GStrv) names = list_dir (dir);
  return g_strv_length (names);
}

/* ---- files ---------------------------------------------------------- */

START_TEST (test_round_trip)
{
  FleeceRecordStore rs = file_store ();
  g_autoptr (TJson) rec = make_record (100, "first");
  g_autoptr (TJson) loaded = NULL;
  g_autoptr (GError) err = NULL;
  g_autofree char *path = g_build_filename (statedir, "100.json", NULL);
  struct stat sb;

  ck_assert (!g_file_test (statedir, G_FILE_TEST_EXISTS));
  ck_assert_msg (fleece_record_store (&rs, 100, rec, &err), "%s",
                 err ? err->message : "");

  /* The state dir was created with its parents, private. */
  ck_assert_int_eq (stat (statedir, &sb), 0);
  ck_assert (S_ISDIR (sb.st_mode));
  ck_assert_uint_eq (sb.st_mode & 07777, 0700);

  ck_assert_int_eq (stat (path, &sb), 0);
  ck_assert (S_ISREG (sb.st_mode));
  ck_assert_uint_eq (sb.st_mode & 07777, 0600);

  loaded = fleece_record_load (&rs, 100, &err);
  ck_assert_msg (loaded != NULL, "%s", err ? err->message : "no record");
  ck_assert (json_object_equal (rec, loaded));

  /* A relative state dir would depend on the cwd: refused, nothing made. */
  {
    g_autofree char *cwd = g_get_current_dir ();
    g_autofree char *rel_abs = g_build_filename (tmpdir, "rel", NULL);
    FleeceRecordStore rel = { .dir = "rel/state" };
    g_autoptr (GError) rerr = NULL;

    ck_assert_int_eq (chdir (tmpdir), 0);
    ck_assert (!fleece_record_store (&rel, 100, rec, &rerr));
    ck_assert_int_eq (chdir (cwd), 0);
    assert_error (rerr, EINVAL, "not an absolute path");
    ck_assert (!g_file_test (rel_abs, G_FILE_TEST_EXISTS));
  }
}
END_TEST

START_TEST (test_atomic_replace)
{
  FleeceRecordStore rs = file_store ();
  g_autoptr (GError) err = NULL;
  g_autofree char *names = NULL;
  g_autofree char *path = g_build_filename (statedir, "100.json", NULL);
  g_autofree char *text = NULL;
  g_autoptr (TJson) first = make_record (100, "run 0");
  g_autoptr (TJson) loaded = NULL;
  g_autoptr (TJson) last = NULL;
  char buf[4096];
  ssize_t n;
  struct stat sb;
  int old_fd, i;

  ck_assert (fleece_record_store (&rs, 100, first, &err));
  /* Hold the first file open: a replacement by rename leaves it unlinked
   * and unchanged; a rewrite in place would change what it reads. */
  old_fd = open (path, O_RDONLY | O_CLOEXEC);
  ck_assert_int_ge (old_fd, 0);

  for (i = 1; i < 5; i++) {
    g_autofree char *extra = g_strdup_printf ("run %d", i);
    g_autoptr (TJson) rec = make_record (100, extra);

    ck_assert_msg (fleece_record_store (&rs, 100, rec, &err), "%s",
                   err ? err->message : "");
  }

  ck_assert_int_eq (fstat (old_fd, &sb), 0);
  ck_assert_uint_eq (sb.st_nlink, 0);
  n = pread (old_fd, buf, sizeof buf - 1, 0);
  ck_assert_int_gt (n, 0);
  buf[n] = '\0';
  ck_assert_msg (strstr (buf, "run 0") != NULL, "%s", buf);
  close (old_fd);

  /* No temporary files left, the mode is kept private. */
  ck_assert_int_eq (stat (path, &sb), 0);
  ck_assert_uint_eq (sb.st_mode & 07777, 0600);
  names = list_dir_str (statedir);
  ck_assert_str_eq (names, "100.json");

  /* The last one won, and it is readable JSON text. */
  ck_assert (g_file_get_contents (path, &text, NULL, NULL));
  ck_assert_msg (strstr (text, "run 4") != NULL, "%s", text);
  last = make_record (100, "run 4");
  loaded = fleece_record_load (&rs, 100, &err);
  ck_assert_ptr_nonnull (loaded);
  ck_assert (json_object_equal (last, loaded));
}
END_TEST

START_TEST (test_store_refuses)
{
  FleeceRecordStore rs = file_store ();
  g_autoptr (TJson) arr = json_tokener_parse ("[1,2]");
  g_autoptr (TJson) nover = json_tokener_parse ("{\"vmid\":100}");
  g_autoptr (TJson) v1 = json_tokener_parse ("{\"version\":1,\"vmid\":100}");
  g_autoptr (TJson) other = make_record (101, "");
  g_autoptr (TJson) big = make_record (100, "");
  g_autofree char *huge = g_malloc (RECORD_LIMIT + 1);

  {
    g_autoptr (GError) err = NULL;
    ck_assert (!fleece_record_store (&rs, 100, NULL, &err));
    assert_error (err, EINVAL, "fleece_record_remove");
  }
  {
    g_autoptr (GError) err = NULL;
    ck_assert (!fleece_record_store (&rs, 100, arr, &err));
    assert_error (err, EINVAL, "not an object");
  }
  {
    g_autoptr (GError) err = NULL;
    ck_assert (!fleece_record_store (&rs, 100, nover, &err));
    assert_error (err, EINVAL, "no \"version\"");
  }
  {
    g_autoptr (GError) err = NULL;
    ck_assert (!fleece_record_store (&rs, 100, v1, &err));
    assert_error (err, EINVAL, "version 1 is not 2");
  }
  {
    g_autoptr (GError) err = NULL;
    ck_assert (!fleece_record_store (&rs, 100, other, &err));
    assert_error (err, EINVAL, "record of VM 101, not of VM 100");
  }
  {
    g_autoptr (GError) err = NULL;
    memset (huge, 'x', RECORD_LIMIT);
    huge[RECORD_LIMIT] = '\0';
    json_object_object_add (big, "pad", json_object_new_string (huge));
    ck_assert (!fleece_record_store (&rs, 100, big, &err));
    assert_error (err, EFBIG, "over the limit");
  }
  /* Nothing was written, not even a temporary file. */
  ck_assert (!g_file_test (statedir, G_FILE_TEST_EXISTS) ||
             count_entries (statedir) == 0);
}
END_TEST

START_TEST (test_load_missing)
{
  FleeceRecordStore rs = file_store ();
  g_autoptr (GError) err = NULL;
  g_autoptr (TJson) rec = make_record (100, "");

  /* No state dir at all. */
  ck_assert_ptr_null (fleece_record_load (&rs, 100, &err));
  ck_assert_ptr_null (err);

  /* A state dir with another VM's record. */
  ck_assert (fleece_record_store (&rs, 100, rec, &err));
  ck_assert_ptr_null (fleece_record_load (&rs, 101, &err));
  ck_assert_ptr_null (err);
}
END_TEST

static void
write_raw (const char *path, const char *data, gssize len)
{
  g_autoptr (GError) err = NULL;

  ck_assert_msg (g_file_set_contents (path, data, len, &err), "%s",
                 err ? err->message : "");
}

START_TEST (test_load_corrupt)
{
  static const struct {
    const char *data;
    gssize len;
    const char *substr;
  } cases[] = {
    { "hello world", -1, "is not JSON" },
    { "{\"version\":2,\"vmid\":100,\"images\":[\"vm-100-fl", -1,
      "incomplete (truncated?)" },
    { "{\"version\":2,\"vmid\":100,\"images\":[", -1,
      "incomplete (truncated?)" },
    { "{\"version\":2,\"vmid\":101}", -1, "record of VM 101, not of VM 100" },
    { "{\"version\":2,\"vmid\":\"100\"}", -1, "no \"vmid\" number" },
    { "{\"version\":2}", -1, "no \"vmid\" number" },
    { "{\"version\":1,\"vmid\":100}", -1, "version 1 is not 2" },
    { "{\"vmid\":100}", -1, "no \"version\" number" },
    { "[1,2,3]", -1, "JSON array, not an object" },
    { "null", -1, "JSON null, not an object" },
    { "\"text\"", -1, "JSON string, not an object" },
    { "123", -1, "JSON int, not an object" },
    { "{\"version\":2 \"vmid\":100}", -1, "is not JSON" },
    { "", 0, "it is empty" },
    { "   \n", -1, "incomplete" },
    { "{\"version\":2,\"vmid\":100}\0garbage", 33, "NUL byte" },
    { "{\"version\":2,\"vmid\":100} {}", -1, "data after the JSON value" },
    { "{\"version\":2,\"vmid\":100}}", -1, "data after the JSON value" },
  };
  FleeceRecordStore rs = file_store ();
  g_autofree char *path = g_build_filename (statedir, "100.json", NULL);
  g_autofree char *fix = g_strdup_printf ("remove %s after checking nothing "
                                          "of VM 100 is attached", path);
  size_t i;

  ck_assert_int_eq (g_mkdir_with_parents (statedir, 0700), 0);
  for (i = 0; i < G_N_ELEMENTS (cases); i++) {
    g_autoptr (GError) err = NULL;
    json_object *rec;

    write_raw (path, cases[i].data, cases[i].len);
    rec = fleece_record_load (&rs, 100, &err);
    ck_assert_msg (rec == NULL, "case %zu loaded", i);
    assert_error (err, EBADMSG, cases[i].substr);
    assert_error (err, EBADMSG, fix);
  }

  /* A trailing newline (as written by store) is fine. */
  {
    g_autoptr (GError) err = NULL;
    g_autoptr (TJson) rec = NULL;

    write_raw (path, "{\"version\":2,\"vmid\":100}\n\n", -1);
    rec = fleece_record_load (&rs, 100, &err);
    ck_assert_msg (rec != NULL, "%s", err ? err->message : "");
  }

  /* A directory where the record should be. */
  {
    g_autoptr (GError) err = NULL;

    ck_assert_int_eq (unlink (path), 0);
    ck_assert_int_eq (mkdir (path, 0700), 0);
    ck_assert_ptr_null (fleece_record_load (&rs, 100, &err));
    assert_error (err, EBADMSG, "not a regular file");
    ck_assert_int_eq (rmdir (path), 0);
  }
}
END_TEST

START_TEST (test_load_oversized)
{
  FleeceRecordStore rs = file_store ();
  g_autofree char *path = g_build_filename (statedir, "100.json", NULL);
  g_autofree char *data = NULL;
  const char *rec = "{\"version\":2,\"vmid\":100}";
  size_t len = RECORD_LIMIT + 1;
  g_autoptr (GError) err = NULL;
  g_autoptr (TJson) ok = NULL;

  /* Valid JSON padded with whitespace to one byte over the limit: refused
   * for its size alone. */
  ck_assert_int_eq (g_mkdir_with_parents (statedir, 0700), 0);
  data = g_malloc (len);
  memset (data, ' ', len);
  memcpy (data, rec, strlen (rec));
  write_raw (path, data, (gssize) len);
  ck_assert_ptr_null (fleece_record_load (&rs, 100, &err));
  assert_error (err, EFBIG, "larger than 1048576 bytes");
  assert_error (err, EFBIG, path);
  assert_error (err, EFBIG, "after checking nothing of VM 100 is attached");
  g_clear_error (&err);

  /* Exactly at the limit is fine. */
  write_raw (path, data, (gssize) len - 1);
  ok = fleece_record_load (&rs, 100, &err);
  ck_assert_msg (ok != NULL, "%s", err ? err->message : "");
}
END_TEST

START_TEST (test_remove)
{
  FleeceRecordStore rs = file_store ();
  g_autoptr (TJson) rec = make_record (100, "");
  g_autoptr (TJson) other = make_record (101, "");
  g_autoptr (TJson) still = NULL;
  g_autoptr (GError) err = NULL;
  g_autofree char *names = NULL;

  /* Nothing to remove, not even a state dir: fine. */
  ck_assert_msg (fleece_record_remove (&rs, 100, &err), "%s",
                 err ? err->message : "");

  ck_assert (fleece_record_store (&rs, 100, rec, &err));
  ck_assert (fleece_record_store (&rs, 101, other, &err));
  ck_assert_msg (fleece_record_remove (&rs, 100, &err), "%s",
                 err ? err->message : "");
  ck_assert_ptr_null (fleece_record_load (&rs, 100, &err));
  ck_assert_ptr_null (err);
  ck_assert (fleece_record_remove (&rs, 100, &err));

  /* Only that VM's record went. */
  still = fleece_record_load (&rs, 101, &err);
  ck_assert_ptr_nonnull (still);
  names = list_dir_str (statedir);
  ck_assert_str_eq (names, "101.json");
}
END_TEST

START_TEST (test_bad_store)
{
  FleeceRecordStore empty = { .dir = "" };
  g_autoptr (TJson) rec = make_record (100, "");
  g_autoptr (GError) e1 = NULL;
  g_autoptr (GError) e2 = NULL;
  g_autoptr (GError) e3 = NULL;

  ck_assert_ptr_null (fleece_record_load (&empty, 100, &e1));
  assert_error (e1, EINVAL, "state directory is empty");
  ck_assert (!fleece_record_store (NULL, 100, rec, &e2));
  assert_error (e2, EINVAL, "no record store");
  ck_assert (!fleece_record_remove (&empty, 100, &e3));
  assert_error (e3, EINVAL, "state directory is empty");
}
END_TEST

/* ---- the safety rules ------------------------------------------------- */

#define NOBODY 65534

static char *
state_file (const char *name)
{
  return g_build_filename (statedir, name, NULL);
}

static void
make_statedir (void)
{
  ck_assert_int_eq (g_mkdir_with_parents (statedir, 0700), 0);
}

/* A symlink in the record's place is refused, never read or written
 * through: a store replaces the link itself, a remove removes only it. */
START_TEST (test_record_symlink_refused)
{
  FleeceRecordStore rs = file_store ();
  g_autofree char *path = state_file ("100.json");
  g_autofree char *victim = g_build_filename (tmpdir, "victim.json", NULL);
  g_autofree char *content = NULL;
  const char *valid = "{\"version\":2,\"vmid\":100}";
  g_autoptr (TJson) rec = make_record (100, "new");
  g_autoptr (GError) err = NULL;
  struct stat sb;

  make_statedir ();
  write_raw (victim, valid, -1);
  ck_assert_int_eq (symlink (victim, path), 0);
  ck_assert_ptr_null (fleece_record_load (&rs, 100, &err));
  assert_error (err, EBADMSG, "is a symbolic link");
  g_clear_error (&err);

  ck_assert_msg (fleece_record_remove (&rs, 100, &err), "%s",
                 err ? err->message : "");
  ck_assert_int_eq (lstat (path, &sb), -1);
  ck_assert (g_file_get_contents (victim, &content, NULL, NULL));
  ck_assert_str_eq (content, valid);
  g_clear_pointer (&content, g_free);

  ck_assert_int_eq (symlink (victim, path), 0);
  ck_assert_msg (fleece_record_store (&rs, 100, rec, &err), "%s",
                 err ? err->message : "");
  ck_assert_int_eq (lstat (path, &sb), 0);
  ck_assert (S_ISREG (sb.st_mode));
  ck_assert (g_file_get_contents (victim, &content, NULL, NULL));
  ck_assert_str_eq (content, valid);
}
END_TEST

/* A symlink in the lock's place: no lock is taken through it and nothing
 * is created where it points, also when it dangles. */
START_TEST (test_lock_symlink_refused)
{
  g_autofree char *lock = state_file ("100.lock");
  g_autofree char *dangling = g_build_filename (tmpdir, "created", NULL);
  g_autofree char *existing = g_build_filename (tmpdir, "existing", NULL);
  g_autoptr (GError) e1 = NULL;
  g_autoptr (GError) e2 = NULL;
  struct stat sb;

  make_statedir ();
  ck_assert_int_eq (symlink (dangling, lock), 0);
  ck_assert_int_eq (fleece_lock_vm (statedir, 100, true, &e1), -1);
  assert_error (e1, EPERM, "it is a symbolic link; remove it");
  ck_assert_int_eq (lstat (dangling, &sb), -1);
  ck_assert_int_eq (fleece_lock_probe (statedir, 100), -1);
  ck_assert_int_eq (lstat (dangling, &sb), -1);

  ck_assert_int_eq (unlink (lock), 0);
  write_raw (existing, "", 0);
  ck_assert_int_eq (symlink (existing, lock), 0);
  ck_assert_int_eq (fleece_lock_vm (statedir, 100, false, &e2), -1);
  assert_error (e2, EPERM, "symbolic link");
  ck_assert_int_eq (lstat (lock, &sb), 0);
  ck_assert (S_ISLNK (sb.st_mode));
}
END_TEST

/* Another user's record or lock in our state dir was not made by us. */
START_TEST (test_foreign_record_and_lock_refused)
{
  FleeceRecordStore rs = file_store ();
  g_autofree char *path = state_file ("100.json");
  g_autofree char *lock = state_file ("100.lock");
  g_autofree char *uid = g_strdup_printf ("of uid %u", (unsigned) geteuid ());
  g_autoptr (GError) e1 = NULL;
  g_autoptr (GError) e2 = NULL;

  if (geteuid () != 0) {
    fprintf (stderr, "SKIP: not root: cannot give files to nobody\n");
    return;
  }
  make_statedir ();
  write_raw (path, "{\"version\":2,\"vmid\":100}", -1);
  ck_assert_int_eq (chown (path, NOBODY, NOBODY), 0);
  ck_assert_ptr_null (fleece_record_load (&rs, 100, &e1));
  assert_error (e1, EBADMSG, "is not a regular file");
  assert_error (e1, EBADMSG, uid);

  write_raw (lock, "", 0);
  ck_assert_int_eq (chown (lock, NOBODY, NOBODY), 0);
  ck_assert_int_eq (fleece_lock_vm (statedir, 100, true, &e2), -1);
  assert_error (e2, EPERM, "lock file");
  assert_error (e2, EPERM, uid);
}
END_TEST

/* A FIFO in the record's place would block a reader forever. */
START_TEST (test_record_fifo_refused)
{
  FleeceRecordStore rs = file_store ();
  g_autofree char *path = state_file ("100.json");
  g_autoptr (GError) err = NULL;

  make_statedir ();
  ck_assert_int_eq (mkfifo (path, 0600), 0);
  ck_assert_ptr_null (fleece_record_load (&rs, 100, &err));
  assert_error (err, EBADMSG, "is not a regular file");
}
END_TEST

/* Every way in refuses a state dir others can change, and says how to
 * fix it. */
static void
assert_statedir_refused (const char *substr)
{
  FleeceRecordStore rs = file_store ();
  g_autoptr (TJson) rec = make_record (100, "");
  g_autoptr (GError) e1 = NULL;
  g_autoptr (GError) e2 = NULL;
  g_autoptr (GError) e3 = NULL;
  g_autoptr (GError) e4 = NULL;
  g_autoptr (TJson) none = NULL;

  none = fleece_record_load (&rs, 100, &e1);
  ck_assert_ptr_null (none);
  ck_assert_msg (e1 != NULL, "load accepted the state dir");
  ck_assert_msg (strstr (e1->message, substr), "%s", e1->message);
  ck_assert (!fleece_record_store (&rs, 100, rec, &e2));
  ck_assert_msg (strstr (e2->message, substr), "%s", e2->message);
  ck_assert_int_eq (fleece_lock_vm (statedir, 100, true, &e3), -1);
  ck_assert_msg (strstr (e3->message, substr), "%s", e3->message);
  ck_assert_int_eq (fleece_lock_vm (statedir, 100, false, &e4), -1);
  ck_assert_msg (strstr (e4->message, substr), "%s", e4->message);
  ck_assert_uint_eq (count_entries (statedir), 0);
}

START_TEST (test_statedir_group_writable_refused)
{
  make_statedir ();
  ck_assert_int_eq (chmod (statedir, 0770), 0);
  assert_statedir_refused ("must be owned by uid 0 and not writable by group "
                           "or others (it is owned by uid 0, mode 770)");
  ck_assert_int_eq (chmod (statedir, 0702), 0);
  assert_statedir_refused ("not writable by group or others");
}
END_TEST

START_TEST (test_statedir_foreign_refused)
{
  if (geteuid () != 0) {
    fprintf (stderr, "SKIP: not root: cannot give the dir to nobody\n");
    return;
  }
  make_statedir ();
  ck_assert_int_eq (chown (statedir, NOBODY, NOBODY), 0);
  assert_statedir_refused ("owned by uid 65534");
}
END_TEST

START_TEST (test_statedir_parent_open_refused)
{
  g_autofree char *parent = g_path_get_dirname (statedir);

  make_statedir ();
  ck_assert_int_eq (chmod (parent, 0777), 0);
  assert_statedir_refused ("use a directory only you can change");
}
END_TEST

START_TEST (test_statedir_symlink_refused)
{
  g_autofree char *real = g_build_filename (tmpdir, "real-state", NULL);
  g_autofree char *parent = g_path_get_dirname (statedir);

  ck_assert_int_eq (mkdir (real, 0700), 0);
  ck_assert_int_eq (g_mkdir_with_parents (parent, 0700), 0);
  ck_assert_int_eq (symlink (real, statedir), 0);
  {
    FleeceRecordStore rs = file_store ();
    g_autoptr (TJson) rec = make_record (100, "");
    g_autoptr (GError) e1 = NULL;
    g_autoptr (GError) e2 = NULL;

    ck_assert (!fleece_record_store (&rs, 100, rec, &e1));
    assert_error (e1, ELOOP, "give the directory it points to");
    ck_assert_int_eq (fleece_lock_vm (statedir, 100, true, &e2), -1);
    assert_error (e2, ELOOP, "symbolic link");
  }
  ck_assert_uint_eq (count_entries (real), 0);
}
END_TEST

/* What only reads (a load, a lock probe, a lock without create, the
 * public read-only calls) creates no state dir. */
START_TEST (test_read_only_creates_nothing)
{
  FleeceRecordStore rs = file_store ();
  g_autofree char *parent = g_build_filename (tmpdir, "a", NULL);
  g_autoptr (GError) err = NULL;
  struct fleece_handle *h = fleece_new ();
  char *text;

  ck_assert_ptr_null (fleece_record_load (&rs, 100, &err));
  ck_assert_ptr_null (err);
  ck_assert_int_eq (fleece_lock_probe (statedir, 100), 0);
  ck_assert_int_eq (fleece_lock_vm (statedir, 100, false, &err), FLEECE_LOCK_NO_DIR);
  ck_assert_ptr_null (err);

  ck_assert_int_eq (fleece_set_state_dir (h, statedir), 0);
  ck_assert_int_eq (fleece_set_vmid (h, 100), 0);
  ck_assert_ptr_null (fleece_get_record (h));
  ck_assert_int_eq (fleece_get_errno (), ENOENT);
  text = fleece_get_status (h, 0);
  ck_assert_msg (text != NULL, "%s", fleece_get_error ());
  ck_assert_msg (strstr (text, "\"run\":\"none\""), "%s", text);
  ck_assert_msg (strstr (text, "\"lock\":\"free\""), "%s", text);
  free (text);
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);
  fleece_free (h);
  ck_assert (!g_file_test (parent, G_FILE_TEST_EXISTS));
}
END_TEST

/* ---- callbacks ---------------------------------------------------------- */

typedef struct {
  char *json;          /* the stored record, malloc'd */
  uint32_t vmid;
  int loads, stores, removes;
  int fail_errno;      /* load/store fail with this errno ... */
  const char *reason;  /* ... and this reason (may be NULL) */
  bool fail_load, fail_store;
  const char *serve;   /* if set, load returns a copy of this */
} Mem;

static int
mem_fail (Mem *m, char **reason)
{
  if (m->reason)
    *reason = strdup (m->reason);
  errno = m->fail_errno;
  return -1;
}

static int
mem_load (void *user_data, uint32_t vmid, char **json, char **reason)
{
  Mem *m = user_data;

  m->loads++;
  if (m->fail_load)
    return mem_fail (m, reason);
  if (m->serve)
    *json = strdup (m->serve);
  else
    *json = m->json && m->vmid == vmid ? strdup (m->json) : NULL;
  /* A reason given with success is freed, not shown. */
  *reason = strdup ("ignored");
  return 0;
}

static int
mem_store (void *user_data, uint32_t vmid, const char *json, char **reason)
{
  Mem *m = user_data;

  if (m->fail_store)
    return mem_fail (m, reason);
  if (!json) {
    m->removes++;
    free (m->json);
    m->json = NULL;
    return 0;
  }
  m->stores++;
  free (m->json);
  m->json = strdup (json);
  m->vmid = vmid;
  return 0;
}

START_TEST (test_callbacks)
{
  Mem m = { 0 };
  FleeceRecordStore rs = {
    .dir = tmpdir, .load = mem_load, .store = mem_store, .user_data = &m,
  };
  g_autoptr (TJson) rec = make_record (100, "cb");
  g_autoptr (TJson) loaded = NULL;
  g_autoptr (GError) err = NULL;

  ck_assert_ptr_null (fleece_record_load (&rs, 100, &err));
  ck_assert_ptr_null (err);
  ck_assert_int_eq (m.loads, 1);

  ck_assert_msg (fleece_record_store (&rs, 100, rec, &err), "%s",
                 err ? err->message : "");
  ck_assert_int_eq (m.stores, 1);
  ck_assert_uint_eq (m.vmid, 100);
  /* One line: a caller keeps it in a config of single-line values. */
  ck_assert_ptr_null (strchr (m.json, '\n'));
  loaded = fleece_record_load (&rs, 100, &err);
  ck_assert_ptr_nonnull (loaded);
  ck_assert (json_object_equal (rec, loaded));

  ck_assert (fleece_record_remove (&rs, 100, &err));
  ck_assert_int_eq (m.removes, 1);
  ck_assert_ptr_null (m.json);
  ck_assert_ptr_null (fleece_record_load (&rs, 100, &err));
  ck_assert_ptr_null (err);

  /* Nothing went to the state dir. */
  ck_assert_uint_eq (count_entries (tmpdir), 0);
}
END_TEST

/* A failing callback's reason reaches the error; without one, the errno
 * it left; without either, that it gave none. */
START_TEST (test_callback_reasons)
{
  Mem m = { 0 };
  FleeceRecordStore rs = {
    .dir = tmpdir, .load = mem_load, .store = mem_store, .user_data = &m,
  };
  g_autoptr (TJson) rec = make_record (100, "");

  m.fail_load = true;
  m.fail_errno = EROFS;
  m.reason = "cluster file system is read-only (no quorum)";
  {
    g_autoptr (GError) err = NULL;
    ck_assert_ptr_null (fleece_record_load (&rs, 100, &err));
    assert_error (err, EROFS, "record load callback failed for VM 100: "
                  "cluster file system is read-only (no quorum)");
  }
  m.reason = NULL;
  {
    g_autoptr (GError) err = NULL;
    ck_assert_ptr_null (fleece_record_load (&rs, 100, &err));
    assert_error (err, EROFS, g_strerror (EROFS));
  }
  m.fail_load = false;

  m.fail_store = true;
  m.fail_errno = 0;
  m.reason = "config file locked by another task";
  {
    g_autoptr (GError) err = NULL;
    ck_assert (!fleece_record_store (&rs, 100, rec, &err));
    assert_error (err, EIO, "record store callback failed to store the "
                  "record of VM 100: config file locked by another task");
  }
  m.reason = NULL;
  {
    g_autoptr (GError) err = NULL;
    ck_assert (!fleece_record_remove (&rs, 100, &err));
    assert_error (err, EIO, "failed to remove the record of VM 100: no "
                  "reason given");
  }
  free (m.json);
}
END_TEST

START_TEST (test_callback_bad_records)
{
  Mem m = { 0 };
  FleeceRecordStore rs = {
    .dir = tmpdir, .load = mem_load, .store = mem_store, .user_data = &m,
  };
  FleeceRecordStore half = { .dir = tmpdir, .load = mem_load, .user_data = &m };

  /* What the callback hands back is checked like a file. */
  m.serve = "{\"version\":2,\"vmid\":7}";
  {
    g_autoptr (GError) err = NULL;
    ck_assert_ptr_null (fleece_record_load (&rs, 100, &err));
    assert_error (err, EBADMSG, "record of VM 7, not of VM 100");
    assert_error (err, EBADMSG, "record load callback");
    assert_error (err, EBADMSG, "after checking nothing of VM 100 is "
                  "attached");
  }
  m.serve = "{\"version\":1,\"vmid\":100}";
  {
    g_autoptr (GError) err = NULL;
    ck_assert_ptr_null (fleece_record_load (&rs, 100, &err));
    assert_error (err, EBADMSG, "version 1 is not 2");
  }
  m.serve = "{\"version\":2,";
  {
    g_autoptr (GError) err = NULL;
    ck_assert_ptr_null (fleece_record_load (&rs, 100, &err));
    assert_error (err, EBADMSG, "truncated");
  }
  {
    g_autoptr (GError) err = NULL;
    g_autofree char *huge = g_malloc (RECORD_LIMIT + 2);

    memset (huge, ' ', RECORD_LIMIT + 1);
    huge[RECORD_LIMIT + 1] = '\0';
    memcpy (huge, "{\"version\":2,\"vmid\":100}", 24);
    m.serve = huge;
    ck_assert_ptr_null (fleece_record_load (&rs, 100, &err));
    assert_error (err, EFBIG, "larger than 1048576 bytes");
    m.serve = NULL;
  }
  {
    g_autoptr (GError) err = NULL;
    ck_assert_ptr_null (fleece_record_load (&half, 100, &err));
    assert_error (err, EINVAL, "both the record load and store callbacks");
  }
  free (m.json);
}
END_TEST

/* ---- the lock ----------------------------------------------------------- */

/* In a child: try to lock vmid; exit 0 if that gave the expected result
 * (want_busy: refused with EBUSY; else: locked). */
static void G_GNUC_NORETURN
child_try_lock (uint32_t vmid, bool want_busy)
{
  GError *err = NULL;
  int fd = fleece_lock_vm (statedir, vmid, true, &err);
  int ok;

  if (want_busy)
    ok = fd < 0 && err && err->code == EBUSY &&
         strstr (err->message, "another run holds the lock for VM") != NULL;
  else
    ok = fd >= 0;
  if (fd >= 0)
    close (fd);
  g_clear_error (&err);
  _exit (ok ? 0 : 1);
}

static int
run_child (uint32_t vmid, bool want_busy)
{
  pid_t pid = fork ();
  int status = 0;

  ck_assert_int_ge (pid, 0);
  if (pid == 0)
    child_try_lock (vmid, want_busy);
  ck_assert_int_eq (waitpid (pid, &status, 0), pid);
  ck_assert (WIFEXITED (status));
  return WEXITSTATUS (status);
}

START_TEST (test_lock)
{
  g_autoptr (GError) err = NULL;
  /* On the stack, not the heap: the forked children end with _exit(), and
   * under valgrind a heap block whose only pointer was in a register the
   * child clobbered counts as a leak (and fails the child). */
  char lockpath[PATH_MAX], msg[PATH_MAX + 64];
  int fd, fd2, fd3;

  snprintf (lockpath, sizeof lockpath, "%s/100.lock", statedir);
  snprintf (msg, sizeof msg, "another run holds the lock for VM 100 (%s)",
            lockpath);

  /* Creates the state dir. */
  fd = fleece_lock_vm (statedir, 100, true, &err);
  ck_assert_msg (fd >= 0, "%s", err ? err->message : "");
  ck_assert (g_file_test (lockpath, G_FILE_TEST_IS_REGULAR));
  ck_assert (fcntl (fd, F_GETFD) & FD_CLOEXEC);
  ck_assert_int_eq (fleece_lock_probe (statedir, 100), 1);

  /* A second open file in this process is refused. */
  fd2 = fleece_lock_vm (statedir, 100, true, &err);
  ck_assert_int_eq (fd2, -1);
  assert_error (err, EBUSY, msg);
  g_clear_error (&err);

  /* So is another process. */
  ck_assert_int_eq (run_child (100, true), 0);

  /* Another VM is independent. */
  fd3 = fleece_lock_vm (statedir, 101, true, &err);
  ck_assert_msg (fd3 >= 0, "%s", err ? err->message : "");

  /* Closing releases it, for this process and others. */
  close (fd);
  ck_assert_int_eq (fleece_lock_probe (statedir, 100), 0);
  ck_assert_int_eq (run_child (100, false), 0);
  fd = fleece_lock_vm (statedir, 100, false, &err);
  ck_assert_msg (fd >= 0, "%s", err ? err->message : "");
  close (fd);
  close (fd3);

  /* The lock file stays (removing it would race). */
  ck_assert (g_file_test (lockpath, G_FILE_TEST_IS_REGULAR));
}
END_TEST

START_TEST (test_lock_held_by_child)
{
  g_autoptr (GError) err = NULL;
  int ready[2], release[2];
  pid_t pid;
  int status = 0, fd;
  char c;

  ck_assert_int_eq (pipe (ready), 0);
  ck_assert_int_eq (pipe (release), 0);
  pid = fork ();
  ck_assert_int_ge (pid, 0);
  if (pid == 0) {
    GError *cerr = NULL;
    int cfd = fleece_lock_vm (statedir, 100, true, &cerr);

    close (ready[0]);
    close (release[1]);
    c = cfd >= 0 ? 'y' : 'n';
    g_clear_error (&cerr);
    if (write (ready[1], &c, 1) != 1)
      _exit (2);
    /* Hold the lock until the parent closes its end. */
    while (read (release[0], &c, 1) < 0 && errno == EINTR)
      ;
    _exit (cfd >= 0 ? 0 : 1);   /* exit releases the lock */
  }
  close (ready[1]);
  close (release[0]);
  ck_assert_int_eq (read (ready[0], &c, 1), 1);
  ck_assert_int_eq (c, 'y');

  fd = fleece_lock_vm (statedir, 100, true, &err);
  ck_assert_int_eq (fd, -1);
  assert_error (err, EBUSY, "another run holds the lock for VM 100");
  g_clear_error (&err);
  ck_assert_int_eq (fleece_lock_probe (statedir, 100), 1);

  close (release[1]);
  ck_assert_int_eq (waitpid (pid, &status, 0), pid);
  ck_assert (WIFEXITED (status) && WEXITSTATUS (status) == 0);
  close (ready[0]);

  fd = fleece_lock_vm (statedir, 100, true, &err);
  ck_assert_msg (fd >= 0, "%s", err ? err->message : "");
  close (fd);
}
END_TEST

START_TEST (test_lock_errors)
{
  g_autofree char *file = g_build_filename (tmpdir, "file", NULL);
  g_autoptr (GError) e1 = NULL;
  g_autoptr (GError) e2 = NULL;
  g_autoptr (GError) e3 = NULL;

  ck_assert_int_eq (fleece_lock_vm ("", 100, true, &e1), -1);
  assert_error (e1, EINVAL, "empty");

  /* The state dir path is a file. */
  write_raw (file, "x", -1);
  ck_assert_int_eq (fleece_lock_vm (file, 100, true, &e2), -1);
  assert_error (e2, ENOTDIR, file);
  ck_assert_int_eq (fleece_lock_vm ("relative/state", 100, true, &e3), -1);
  assert_error (e3, EINVAL, "not an absolute path");
}
END_TEST

static Suite *
record_suite (void)
{
  Suite *s = suite_create ("record");
  TCase *tc;

  tc = tcase_create ("file");
  tcase_add_checked_fixture (tc, setup, teardown);
  tcase_add_test (tc, test_round_trip);
  tcase_add_test (tc, test_atomic_replace);
  tcase_add_test (tc, test_store_refuses);
  tcase_add_test (tc, test_load_missing);
  tcase_add_test (tc, test_load_corrupt);
  tcase_add_test (tc, test_load_oversized);
  tcase_add_test (tc, test_remove);
  tcase_add_test (tc, test_bad_store);
  suite_add_tcase (s, tc);

  tc = tcase_create ("safety");
  tcase_add_checked_fixture (tc, setup, teardown);
  tcase_add_test (tc, test_record_symlink_refused);
  tcase_add_test (tc, test_lock_symlink_refused);
  tcase_add_test (tc, test_foreign_record_and_lock_refused);
  tcase_add_test (tc, test_record_fifo_refused);
  tcase_add_test (tc, test_statedir_group_writable_refused);
  tcase_add_test (tc, test_statedir_foreign_refused);
  tcase_add_test (tc, test_statedir_parent_open_refused);
  tcase_add_test (tc, test_statedir_symlink_refused);
  tcase_add_test (tc, test_read_only_creates_nothing);
  suite_add_tcase (s, tc);

  tc = tcase_create ("callback");
  tcase_add_checked_fixture (tc, setup, teardown);
  tcase_add_test (tc, test_callbacks);
  tcase_add_test (tc, test_callback_reasons);
  tcase_add_test (tc, test_callback_bad_records);
  suite_add_tcase (s, tc);

  tc = tcase_create ("lock");
  tcase_add_checked_fixture (tc, setup, teardown);
  tcase_add_test (tc, test_lock);
  tcase_add_test (tc, test_lock_held_by_child);
  tcase_add_test (tc, test_lock_errors);
  suite_add_tcase (s, tc);

  return s;
}

int
main (void)
{
  SRunner *sr = srunner_create (record_suite ());
  int failed;

  srunner_run_all (sr, CK_ENV);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
