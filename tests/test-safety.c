/* Nothing lost, no one in (issue 12, docs/reliability.md "hostile local
 * user"): each case an admin or a hostile local user could bring about,
 * on a real QEMU where QEMU is involved.
 *
 *  - cleanup deletes only what it can prove the run created: records that
 *    name files outside the run's, images outside the storage, another
 *    storage; leftovers are never forgotten (the record stays);
 *  - a fleecing image that exists already is not overwritten, nor removed
 *    by the rollback;
 *  - state directories others can change are refused, and so are planted
 *    records and lock symlinks (run as nobody);
 *  - one run per VM, whatever the state dir; cleanup from QEMU's state
 *    when the record is gone;
 *  - read-only storage, fork, NULL handles, settings changed under a run,
 *    relative and missing state dirs, cancel while the monitor is busy, a
 *    failed cancel, per-drive progress.
 *
 * Needs root (tmpfs mounts, setresuid to nobody) and QEMU.
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <check.h>
#include <glib/gstdio.h>

#include "faultlib.h"
#include "fleece/fleece.h"
#include "tl-only.h"

#define NOBODY 65534

/* ------------------------------------------------------------------ */
/* Helpers                                                             */
/* ------------------------------------------------------------------ */

/* A run set up by a child that then dies by kill -9: the backup runs on
 * (slowly), the record and the images stay.  storage NULL: the VM's. */
static void
crash_run (FlVm *vm, const char *storage)
{
  FlChildSpec spec = { .job = FL_CHILD_SETUP, .bwlimit = FL_BWLIMIT_SLOW,
                       .qmp = vm->tl->q->qmp_path, .storage = storage };
  FlChild c = fl_child_fork (vm, &spec);
  int status = 0;

  ck_assert_msg (fl_child_go (&c, &status), "the child failed to set up (0x%x)", status);
  fl_child_kill (&c);
}

static char *
record_path (FlVm *vm)
{
  return g_strdup_printf ("%s/%u.json", vm->tl->state, vm->vmid);
}

static json_object *
record_load (FlVm *vm)
{
  g_autofree char *path = record_path (vm);
  json_object *r = json_object_from_file (path);

  ck_assert_msg (r != NULL, "no record %s", path);
  return r;
}

static void
record_save (FlVm *vm, json_object *r)
{
  g_autofree char *path = record_path (vm);

  ck_assert_int_eq (json_object_to_file_ext (path, r, JSON_C_TO_STRING_PLAIN), 0);
}

static bool
record_exists (FlVm *vm)
{
  g_autofree char *path = record_path (vm);

  return g_file_test (path, G_FILE_TEST_EXISTS);
}

/* The record's entry of drive key. */
static json_object *
record_drive (json_object *r, const char *key)
{
  json_object *drives, *v;

  ck_assert (json_object_object_get_ex (r, "drives", &drives));
  for (size_t i = 0; i < json_object_array_length (drives); i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    if (json_object_object_get_ex (d, "key", &v) && strcmp (json_object_get_string (v), key) == 0)
      return d;
  }
  ck_abort_msg ("the record has no drive %s", key);
  return NULL;
}

/* {"dev", "ino"} of path, as records prove files a run's. */
static json_object *
identity_of (const char *path)
{
  struct stat sb;
  json_object *o = json_object_new_object ();

  ck_assert_int_eq (lstat (path, &sb), 0);
  json_object_object_add (o, "dev", json_object_new_int64 ((int64_t) sb.st_dev));
  json_object_object_add (o, "ino", json_object_new_int64 ((int64_t) sb.st_ino));
  return o;
}

/* A file's content, inode and mtime: equal before and after means it was
 * neither replaced nor written. */
static char *
fingerprint (const char *path)
{
  struct stat sb;
  g_autofree char *data = NULL;
  g_autofree char *sum = NULL;
  gsize len = 0;

  if (lstat (path, &sb) != 0)
    return g_strdup_printf ("%s: missing", path);
  ck_assert (g_file_get_contents (path, &data, &len, NULL));
  sum = g_compute_checksum_for_data (G_CHECKSUM_SHA256, (guchar *) data, len);
  return g_strdup_printf ("%s: ino %lu mtime %ld.%09ld size %zu sum %s", path,
                          (unsigned long) sb.st_ino, (long) sb.st_mtim.tv_sec,
                          (long) sb.st_mtim.tv_nsec, (size_t) len, sum);
}

static void
write_file (const char *path, const char *content, mode_t mode)
{
  ck_assert (g_file_set_contents (path, content, -1, NULL));
  ck_assert_int_eq (chmod (path, mode), 0);
}

static char *
private_dir (FlVm *vm, const char *name)
{
  char *dir = g_build_filename (vm->tl->dir, name, NULL);

  ck_assert_int_eq (g_mkdir (dir, 0700), 0);
  return dir;
}

static bool
log_has (FlVm *vm, const char *text)
{
  return strstr (vm->log->str, text) != NULL;
}

/* Run fn in a forked child (no Check calls in fn) and return what it
 * returned (0-255).  Told through a pipe, not the exit status, which
 * valgrind replaces when it finds the child's copies of the test's
 * objects lost. */
static int
in_child (int (*fn) (void *), void *data, bool nobody)
{
  int fds[2];
  unsigned char r = 255;
  pid_t pid;

  ck_assert_int_eq (pipe2 (fds, O_CLOEXEC), 0);
  fflush (NULL);
  pid = fork ();
  ck_assert_int_ge (pid, 0);
  if (pid == 0) {
    close (fds[0]);
    if (nobody && (setgroups (0, NULL) != 0 || setresgid (NOBODY, NOBODY, NOBODY) != 0 ||
                   setresuid (NOBODY, NOBODY, NOBODY) != 0))
      _exit (99);
    r = (unsigned char) fn (data);
    if (write (fds[1], &r, 1) != 1)
      _exit (98);
    _exit (0);
  }
  close (fds[1]);
  ck_assert_int_eq (read (fds[0], &r, 1), 1);
  close (fds[0]);
  ck_assert_int_eq (waitpid (pid, NULL, 0), pid);
  return r;
}

/* Run fn as nobody; it must return 0. */
static void
as_nobody (int (*fn) (void *), void *data)
{
  int r = in_child (fn, data, true);

  ck_assert_msg (r == 0, "the part run as nobody failed (%d)", r);
}

/* A whole backup on h (connected, storage set): the bytes of the backup
 * are the point in time. */
static void
backup_works (FlVm *vm, struct fleece_handle *h, const char *what)
{
  struct fleece_plan *p = tl_plan (h, vm->log);
  struct fleece_target *t = fleece_target_new_dir (vm->tl->target, "raw");
  guint8 **pit = fl_pit (vm);

  ck_assert_msg (fleece_attach (h, p, 0) == 0, "%s: %s\n%s", what, fleece_get_error (),
                 vm->log->str);
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s: %s", what, fleece_get_error ());
  fl_guest_write_all (vm);
  ck_assert_msg (tl_wait_end (h, 1000) == 1, "%s: %s", what, fleece_get_error ());
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s: %s", what, fleece_get_error ());
  fl_assert_backup (vm, pit, what);
  fl_pit_free (pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fl_empty_dir (vm->tl->target);
}

/* ------------------------------------------------------------------ */
/* Cleanup deletes only what it can prove                              */
/* ------------------------------------------------------------------ */

/* A target-file entry for a record. */
static json_object *
target_file (const char *dir, const char *name, const char *pending, json_object *identity)
{
  json_object *tf = json_object_new_object ();

  json_object_object_add (tf, "dir", json_object_new_string (dir));
  json_object_object_add (tf, "name", json_object_new_string (name));
  if (pending)
    json_object_object_add (tf, "pending", json_object_new_string (pending));
  if (identity)
    json_object_object_add (tf, "identity", identity);
  return tf;
}

/* A crashed run's record rewritten to name, as the target files, files
 * the library never makes (victim-a with the identity of the run's real
 * target file; victim-a again with victim-b as its "pending" name).
 * Neither victim is removed; a refusal keeps the record, and once the
 * admin took the foreign entries out a cleanup finishes. */
static void
target_files_foreign_names (FlVm *vm, const char *victims)
{
  g_autofree char *a = g_build_filename (victims, "victim-a", NULL);
  g_autofree char *b = g_build_filename (victims, "victim-b", NULL);
  g_autofree char *real = g_build_filename (vm->tl->target, "scsi0.raw", NULL);
  g_autofree char *fa = NULL, *fb = NULL, *after_a = NULL, *after_b = NULL;
  struct fleece_handle *h;
  json_object *r;
  int rc;

  write_file (a, "root's file a", 0600);
  write_file (b, "root's file b", 0600);
  fa = fingerprint (a);
  fb = fingerprint (b);
  crash_run (vm, NULL);
  r = record_load (vm);
  json_object_object_add (record_drive (r, "scsi0"), "target-file",
                          target_file (victims, "victim-a", NULL, identity_of (real)));
  json_object_object_add (record_drive (r, "efidisk0"), "target-file",
                          target_file (victims, "victim-a", "victim-b", NULL));
  record_save (vm, r);
  json_object_put (r);

  h = fl_vm_handle (vm, NULL);
  rc = fleece_cleanup (h, 0);
  after_a = fingerprint (a);
  after_b = fingerprint (b);
  ck_assert_str_eq (after_a, fa);
  ck_assert_str_eq (after_b, fb);
  if (rc != 0) {
    ck_assert_msg (record_exists (vm), "cleanup failed and dropped the record: %s",
                   fleece_get_error ());
    ck_assert_msg (strstr (fleece_get_error (), "victim"), "%s", fleece_get_error ());
    r = record_load (vm);
    json_object_object_del (record_drive (r, "scsi0"), "target-file");
    json_object_object_del (record_drive (r, "efidisk0"), "target-file");
    record_save (vm, r);
    json_object_put (r);
    fl_recover (vm, "target files with foreign names");
  } else
    ck_assert_msg (log_has (vm, "victim"), "the victims went unmentioned:\n%s", vm->log->str);
  fleece_free (h);
  fl_assert_restored (vm, "target files with foreign names");
  fl_empty_dir (vm->tl->target);
}

/* A crashed run's record rewritten so that a target file is another
 * directory's file of the same name (scsi0.raw, root's): its identity is
 * not the run's file's, so it stays, and cleanup says so. */
static void
target_file_elsewhere (FlVm *vm, const char *victims)
{
  g_autofree char *victim = g_build_filename (victims, "scsi0.raw", NULL);
  g_autofree char *real = g_build_filename (vm->tl->target, "scsi0.raw", NULL);
  g_autofree char *before = NULL, *after = NULL;
  json_object *r;

  write_file (victim, "root's scsi0.raw", 0600);
  before = fingerprint (victim);
  crash_run (vm, NULL);
  r = record_load (vm);
  json_object_object_add (record_drive (r, "scsi0"), "target-file",
                          target_file (victims, "scsi0.raw", NULL, identity_of (real)));
  record_save (vm, r);
  json_object_put (r);
  fl_recover (vm, "a target file elsewhere");
  after = fingerprint (victim);
  ck_assert_str_eq (after, before);
  ck_assert_msg (log_has (vm, "target file of scsi0 is not the one the run created"),
                 "%s", vm->log->str);
  fl_assert_restored (vm, "a target file elsewhere");
  fl_empty_dir (vm->tl->target);
}

/* A crashed run's record rewritten so that its image is a victim outside
 * the storage (by name, with the victim's identity): refused, the record
 * stays; once the record is right again cleanup finishes. */
static void
image_outside_storage (FlVm *vm, const char *victims)
{
  g_autofree char *victim = g_build_filename (victims, "vm-100-fleece-0.qcow2", NULL);
  g_autofree char *before = NULL, *after = NULL, *volid = NULL, *path = NULL;
  struct fleece_handle *h;
  json_object *r, *d, *v;

  write_file (victim, "root's image", 0600);
  before = fingerprint (victim);
  crash_run (vm, NULL);
  r = record_load (vm);
  d = record_drive (r, "scsi0");
  ck_assert (json_object_object_get_ex (d, "volid", &v));
  volid = g_strdup (json_object_get_string (v));
  json_object_object_add (d, "volid", json_object_new_string ("../victims/vm-100-fleece-0.qcow2"));
  json_object_object_add (d, "identity", identity_of (victim));
  record_save (vm, r);

  h = fl_vm_handle (vm, NULL);
  ck_assert_int_eq (fleece_cleanup (h, 0), -1);
  ck_assert_msg (strstr (fleece_get_error (), "fleece_cleanup: ") &&
                 strstr (fleece_get_error (), "invalid"), "%s", fleece_get_error ());
  after = fingerprint (victim);
  ck_assert_str_eq (after, before);
  ck_assert (record_exists (vm));
  fleece_free (h);

  json_object_object_add (d, "volid", json_object_new_string (volid));
  json_object_object_del (d, "identity");
  g_free (path);
  path = g_build_filename (vm->tl->storage, volid, NULL);
  json_object_object_add (d, "identity", identity_of (path));
  record_save (vm, r);
  json_object_put (r);
  fl_recover (vm, "image outside the storage");
  fl_assert_restored (vm, "image outside the storage");
  fl_empty_dir (vm->tl->target);
}

START_TEST (test_target_files_elsewhere)
{
  FlVm *vm = fl_vm_start ("safety", NULL, true);
  g_autofree char *victims = private_dir (vm, "victims");

  target_files_foreign_names (vm, victims);
  target_file_elsewhere (vm, victims);
  fl_vm_stop (vm);
}
END_TEST

START_TEST (test_image_outside_storage)
{
  FlVm *vm = fl_vm_start ("safety", NULL, true);
  g_autofree char *victims = private_dir (vm, "victims");

  image_outside_storage (vm, victims);
  fl_vm_stop (vm);
}
END_TEST

/* A crashed run cleaned up with another storage than the record's: the
 * images are not freed through it (nor is a same-named file in it), the
 * record stays and names the storage the images are in; forging the
 * record's storage to the other one frees nothing either. */
START_TEST (test_cleanup_other_storage)
{
  FlVm *vm = fl_vm_start ("safety", NULL, true);
  g_autofree char *other = private_dir (vm, "other");
  g_autofree char *victim = g_build_filename (other, "vm-100-fleece-0.qcow2", NULL);
  g_autofree char *image = g_build_filename (vm->tl->storage, "vm-100-fleece-0.qcow2", NULL);
  g_autofree char *before = NULL, *after = NULL, *image_before = NULL, *image_after = NULL;
  struct fleece_handle *h;
  json_object *r, *st;
  struct stat sb;

  write_file (victim, "another storage's image", 0600);
  before = fingerprint (victim);
  crash_run (vm, NULL);
  image_before = fingerprint (image);

  h = fl_vm_handle (vm, NULL);
  ck_assert_int_eq (fleece_set_storage (h, fleece_storage_new_dir (other)), 0);
  ck_assert_int_eq (fleece_cleanup (h, 0), -1);
  ck_assert_int_eq (fleece_get_errno (), EXDEV);
  ck_assert_msg (strstr (fleece_get_error (), vm->tl->storage) &&
                 strstr (fleece_get_error (), "the record is kept"), "%s", fleece_get_error ());
  fleece_free (h);
  after = fingerprint (victim);
  image_after = fingerprint (image);
  ck_assert_str_eq (after, before);
  ck_assert (record_exists (vm));
  ck_assert (g_file_test (image, G_FILE_TEST_EXISTS));

  /* The record forged to say the images are in the other storage (its
   * path, device and inode): matched, but no file there is the run's. */
  r = record_load (vm);
  st = json_object_new_object ();
  ck_assert_int_eq (stat (other, &sb), 0);
  json_object_object_add (st, "type", json_object_new_string ("dir"));
  json_object_object_add (st, "dir", json_object_new_string (other));
  json_object_object_add (st, "dev", json_object_new_int64 ((int64_t) sb.st_dev));
  json_object_object_add (st, "ino", json_object_new_int64 ((int64_t) sb.st_ino));
  json_object_object_add (r, "storage", st);
  record_save (vm, r);
  json_object_put (r);
  h = fl_vm_handle (vm, NULL);
  ck_assert_int_eq (fleece_set_storage (h, fleece_storage_new_dir (other)), 0);
  fleece_cleanup (h, 0);
  fleece_free (h);
  g_free (after);
  after = fingerprint (victim);
  ck_assert_str_eq (after, before);
  ck_assert_msg (log_has (vm, "vm-100-fleece-0.qcow2"), "%s", vm->log->str);

  /* The real image is still there; a right record and storage free it. */
  g_unlink (victim);
  ck_assert (g_file_test (image, G_FILE_TEST_EXISTS));
  g_unlink (image);
  g_autofree char *rec = record_path (vm);
  g_unlink (rec);
  fl_assert_restored (vm, "cleanup with another storage");
  fl_vm_stop (vm);
}
END_TEST

/* Proxmox's own fleecing images have the names the library would use: an
 * attach that finds one fails with EEXIST, and neither it nor its siblings
 * are touched by the rollback. */
START_TEST (test_existing_image_kept)
{
  FlVm *vm = fl_vm_start ("safety", NULL, true);
  static const char *const names[] = {
    "vm-100-fleece-0.qcow2", "vm-100-fleece-1.qcow2", "vm-100-fleece-0.raw",
  };
  char *before[G_N_ELEMENTS (names)];
  struct fleece_handle *h = fl_vm_handle (vm, vm->tl->q->qmp_path);
  struct fleece_plan *p = tl_plan (h, vm->log);

  for (size_t i = 0; i < G_N_ELEMENTS (names); i++) {
    g_autofree char *path = g_build_filename (vm->tl->storage, names[i], NULL);
    write_file (path, names[i], 0600);
    before[i] = fingerprint (path);
  }
  ck_assert_int_eq (fleece_attach (h, p, 0), -1);
  ck_assert_int_eq (fleece_get_errno (), EEXIST);
  ck_assert_msg (strstr (fleece_get_error (), "vm-100-fleece-0.qcow2 already exists"), "%s",
                 fleece_get_error ());
  for (size_t i = 0; i < G_N_ELEMENTS (names); i++) {
    g_autofree char *path = g_build_filename (vm->tl->storage, names[i], NULL);
    g_autofree char *now = fingerprint (path);

    ck_assert_str_eq (now, before[i]);
    g_free (before[i]);
    g_unlink (path);
  }
  fleece_plan_free (p);
  fleece_free (h);
  fl_assert_restored (vm, "an existing image");
  fl_vm_stop (vm);
}
END_TEST

/* kill -9 of a process that attached, then a run with another fleecing
 * storage: refused, naming the storage the leftovers are in; the record
 * stays; a cleanup with the right storage frees them. */
START_TEST (test_crash_then_other_storage)
{
  FlVm *vm = fl_vm_start ("safety", NULL, true);
  g_autofree char *other = private_dir (vm, "other");
  FlChildSpec spec = { .job = FL_CHILD_ATTACH, .qmp = vm->tl->q->qmp_path };
  FlChild c = fl_child_fork (vm, &spec);
  struct fleece_handle *h;
  struct fleece_plan *p;

  ck_assert (fl_child_go (&c, NULL));
  fl_child_kill (&c);
  h = fl_vm_handle (vm, vm->tl->q->qmp_path);
  ck_assert_int_eq (fleece_set_storage (h, fleece_storage_new_dir (other)), 0);
  p = tl_plan (h, vm->log);
  ck_assert_int_eq (fleece_attach (h, p, 0), -1);
  ck_assert_msg (strstr (fleece_get_error (), "fleece_attach: ") &&
                 strstr (fleece_get_error (), vm->tl->storage), "%s", fleece_get_error ());
  ck_assert (record_exists (vm));
  {
    g_auto (GStrv) files = tl_list_dir (vm->tl->storage);
    g_auto (GStrv) others = tl_list_dir (other);
    ck_assert_msg (files[0] && strcmp (files[0], "vm-100-fleece-0.qcow2") == 0,
                   "the leftover image is gone");
    ck_assert_msg (!others[0], "the other storage holds %s", others[0]);
  }
  fleece_plan_free (p);
  fleece_free (h);
  fl_recover (vm, "crash, then another storage");
  fl_assert_restored (vm, "crash, then another storage");
  fl_vm_stop (vm);
}
END_TEST

/* ------------------------------------------------------------------ */
/* State directories others can change                                 */
/* ------------------------------------------------------------------ */

typedef struct {
  const char *shared;   /* the shared state dir */
  const char *victim;   /* root's file the record names */
  const char *created;  /* where the lock symlink points (must not appear) */
  const char *storage;
} Plant;

/* As nobody: a record whose target file is root's victim, and a lock that
 * is a symlink to a file root would create. */
static int
plant (void *data)
{
  const Plant *pl = data;
  g_autofree char *rec = g_build_filename (pl->shared, "100.json", NULL);
  g_autofree char *lock = g_build_filename (pl->shared, "100.lock", NULL);
  g_autofree char *vdir = g_path_get_dirname (pl->victim);
  g_autofree char *vname = g_path_get_basename (pl->victim);
  g_autofree char *json = g_strdup_printf (
    "{\"version\": 2, \"vmid\": 100, \"engine\": \"qemu\", \"run\": "
    "\"00000000-0000-0000-0000-000000000000\", \"state\": \"running\", "
    "\"storage\": {\"type\": \"dir\", \"dir\": \"%s\"}, \"drives\": [{\"key\": \"scsi0\", "
    "\"fleeced\": false, \"target-file\": {\"dir\": \"%s\", \"name\": \"%s\", "
    "\"pending\": \"%s\"}}]}", pl->storage, vdir, vname, vname);

  if (!g_file_set_contents (rec, json, -1, NULL) || symlink (pl->created, lock) != 0)
    return 1;
  return 0;
}

/* Root's attach, cleanup and status on a state dir: all refused (or, for
 * status, read-only), the victim kept, nothing created. */
static void
refused_state_dir (FlVm *vm, const char *state, const Plant *pl, const char *what)
{
  g_autofree char *before = fingerprint (pl->victim);
  g_autofree char *after = NULL;
  struct fleece_handle *h = fl_vm_handle (vm, vm->tl->q->qmp_path);
  struct fleece_plan *p = tl_plan (h, vm->log);
  char *s;

  ck_assert_int_eq (fleece_set_state_dir (h, state), 0);
  ck_assert_int_eq (fleece_attach (h, p, 0), -1);
  ck_assert_msg (fleece_get_errno () == EPERM && strstr (fleece_get_error (), state),
                 "%s: attach: %s", what, fleece_get_error ());
  ck_assert_int_eq (fleece_cleanup (h, 0), -1);
  ck_assert_msg (fleece_get_errno () == EPERM && strstr (fleece_get_error (), state),
                 "%s: cleanup: %s", what, fleece_get_error ());
  ck_assert_ptr_null (fleece_get_record (h));
  s = fleece_get_status (h, 0);
  free (s);
  after = fingerprint (pl->victim);
  ck_assert_str_eq (after, before);
  ck_assert_msg (!g_file_test (pl->created, G_FILE_TEST_EXISTS), "%s: %s was created", what,
                 pl->created);
  fleece_plan_free (p);
  fleece_free (h);
  fl_assert_restored (vm, what);
}

START_TEST (test_hostile_state_dirs)
{
  FlVm *vm = fl_vm_start ("safety", NULL, true);
  g_autofree char *rootonly = private_dir (vm, "root-only");
  g_autofree char *victim = g_build_filename (rootonly, "victim", NULL);
  g_autofree char *created = g_build_filename (rootonly, "created-by-root", NULL);
  g_autofree char *shared = g_dir_make_tmp ("fleece-shared-XXXXXX", NULL);
  g_autofree char *open_dir = g_build_filename (vm->tl->dir, "world-writable", NULL);
  g_autofree char *foreign = g_build_filename (vm->tl->dir, "nobodys", NULL);
  Plant pl = { shared, victim, created, vm->tl->storage };

  write_file (victim, "root only", 0600);
  /* /tmp-like: world-writable and sticky, so nobody can plant in it. */
  ck_assert_int_eq (chmod (shared, 01777), 0);
  as_nobody (plant, &pl);
  refused_state_dir (vm, shared, &pl, "a shared state dir with planted files");

  ck_assert_int_eq (g_mkdir (open_dir, 0700), 0);
  ck_assert_int_eq (chmod (open_dir, 0777), 0);
  refused_state_dir (vm, open_dir, &pl, "a world-writable state dir");
  ck_assert_int_eq (g_mkdir (foreign, 0700), 0);
  ck_assert_int_eq (chown (foreign, NOBODY, NOBODY), 0);
  refused_state_dir (vm, foreign, &pl, "a state dir owned by nobody");
  {
    g_auto (GStrv) left = tl_list_dir (open_dir);
    g_auto (GStrv) left2 = tl_list_dir (foreign);
    ck_assert_msg (!left[0] && !left2[0], "a refused state dir got files");
  }
  tl_tmpdir_free (g_steal_pointer (&shared));
  fl_vm_stop (vm);
}
END_TEST

/* ------------------------------------------------------------------ */
/* One run per VM; cleanup from QEMU alone                              */
/* ------------------------------------------------------------------ */

/* The nodes with names given by someone (QEMU's own "#block" nodes come
 * and go with the jobs). */
static char **
named_nodes (FlVm *vm)
{
  g_auto (GStrv) all = tl_node_names (vm->tl->q);
  GPtrArray *named = g_ptr_array_new ();

  for (char **n = all; *n; n++)
    if (**n != '#')
      g_ptr_array_add (named, g_strdup (*n));
  g_ptr_array_add (named, NULL);
  return (char **) g_ptr_array_free (named, FALSE);
}

/* While a backup runs (a child, state dir A), a second attach through
 * another state dir and through the same one is refused at once, and so is
 * a cleanup through the other; the running backup completes with the
 * right bytes. */
START_TEST (test_one_run_per_vm)
{
  FlVm *vm = fl_vm_start ("safety", NULL, true);
  g_autofree char *state_b = g_build_filename (vm->tl->dir, "state-b", NULL);
  FlChildSpec spec = { .job = FL_CHILD_BACKUP, .bwlimit = 2048, .qmp = vm->tl->q->qmp_path };
  guint8 **pit = fl_pit (vm);
  FlChild c = fl_child_fork (vm, &spec);
  g_auto (GStrv) during = NULL;
  g_auto (GStrv) after = NULL;

  ck_assert (fl_child_go (&c, NULL));
  during = named_nodes (vm);
  for (int same = 0; same < 2; same++) {
    struct fleece_handle *h = fl_vm_handle (vm, vm->tl->q->qmp_path);
    struct fleece_plan *p;
    gint64 t0 = g_get_monotonic_time ();

    if (!same)
      ck_assert_int_eq (fleece_set_state_dir (h, state_b), 0);
    p = tl_plan (h, vm->log);
    ck_assert_int_eq (fleece_attach (h, p, 0), -1);
    ck_assert_int_eq (fleece_get_errno (), EBUSY);
    ck_assert_msg (strstr (fleece_get_error (), "fleece status") &&
                   (same || strstr (fleece_get_error (), "fleece cleanup")),
                   "%s", fleece_get_error ());
    ck_assert_int_lt (g_get_monotonic_time () - t0, 3 * G_USEC_PER_SEC);
    ck_assert_int_eq (fleece_cleanup (h, 0), -1);
    ck_assert_int_eq (fleece_get_errno (), EBUSY);
    fleece_plan_free (p);
    fleece_free (h);
  }
  after = named_nodes (vm);
  {
    g_autofree char *a = g_strjoinv (",", during), *b = g_strjoinv (",", after);
    ck_assert_str_eq (a, b);
  }
  /* The guest writes meanwhile; the backup is of the point in time. */
  fl_guest_write_all (vm);
  ck_assert_msg (fl_child_wait (&c), "the running backup failed");
  fl_assert_backup (vm, pit, "the backup that ran meanwhile");
  fl_pit_free (pit);
  fl_empty_dir (vm->tl->target);
  fl_assert_restored (vm, "one run per VM");
  /* The refused run left no record (a lock file may stay). */
  if (g_file_test (state_b, G_FILE_TEST_EXISTS)) {
    g_auto (GStrv) left = tl_list_dir (state_b);
    for (char **f = left; *f; f++)
      ck_assert_msg (strcmp (*f, "100.lock") == 0, "state dir B holds %s", *f);
  }
  fl_vm_stop (vm);
}
END_TEST

/* kill -9 mid-backup and the record deleted: cleanup undoes the run from
 * what QEMU shows, reports the image instead of deleting it, and a later
 * backup works. */
START_TEST (test_cleanup_without_record)
{
  FlVm *vm = fl_vm_start ("safety", NULL, true);
  g_autofree char *rec = record_path (vm);
  g_autofree char *image = g_build_filename (vm->tl->storage, "vm-100-fleece-0.qcow2", NULL);
  struct fleece_handle *h;
  struct stat sb_before, sb_after;

  crash_run (vm, NULL);
  ck_assert_int_eq (g_unlink (rec), 0);
  fl_guest_write_all (vm);
  /* The image changes while the backup runs (copy-before-write, discards):
   * what must stay is the file. */
  ck_assert_int_eq (stat (image, &sb_before), 0);
  h = fl_vm_handle (vm, vm->tl->q->qmp_path);
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  ck_assert_msg (log_has (vm, "vm-100-fleece-0.qcow2") && log_has (vm, "left in place"),
                 "%s", vm->log->str);
  ck_assert_int_eq (stat (image, &sb_after), 0);
  ck_assert_uint_eq (sb_after.st_ino, sb_before.st_ino);
  /* QEMU is as before (fl_assert_restored wants the storage empty: the
   * admin removes the reported image). */
  g_unlink (image);
  fl_assert_restored (vm, "cleanup without a record");
  fl_empty_dir (vm->tl->target);
  backup_works (vm, h, "a backup after the cleanup from QEMU");
  fl_assert_restored (vm, "a backup after the cleanup from QEMU");
  fleece_free (h);
  fl_vm_stop (vm);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Read-only storage, fork, NULL, settings under a run                  */
/* ------------------------------------------------------------------ */

static void
remount (const char *dir, bool ro)
{
  ck_assert_msg (mount ("tmpfs", dir, "tmpfs", MS_REMOUNT | (ro ? MS_RDONLY : 0), NULL) == 0,
                 "remount %s: %s", dir, g_strerror (errno));
}

/* A read-only fleecing storage (a tmpfs remounted read-only): the failed
 * attach leaves nothing a cleanup cannot finish (images it never created
 * are no error), and a backup works once it is writable again. */
START_TEST (test_readonly_storage)
{
  FlVm *vm = fl_vm_start ("safety", NULL, true);
  struct fleece_handle *h;
  struct fleece_plan *p;

  tl_mount_tmpfs (vm->tl->storage, "64m");
  remount (vm->tl->storage, true);
  h = fl_vm_handle (vm, vm->tl->q->qmp_path);
  p = tl_plan (h, vm->log);
  ck_assert_int_eq (fleece_attach (h, p, 0), -1);
  ck_assert_msg (fleece_get_errno () == EROFS &&
                 strstr (fleece_get_error (), "Read-only file system"), "%s",
                 fleece_get_error ());
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  ck_assert (!record_exists (vm));
  fleece_plan_free (p);
  fleece_free (h);
  fl_assert_restored (vm, "a read-only storage at attach");

  remount (vm->tl->storage, false);
  h = fl_vm_handle (vm, vm->tl->q->qmp_path);
  backup_works (vm, h, "a backup once the storage is writable");
  fleece_free (h);
  fl_assert_restored (vm, "a backup once the storage is writable");
  ck_assert_int_eq (umount (vm->tl->storage), 0);
  fl_vm_stop (vm);
}
END_TEST

/* In a child after fork: every call on the parent's handle h but
 * fleece_free is refused with EPERM; a bit set per call that is not. */
static int
forked_calls (void *data)
{
  struct fleece_handle *h = data;
  int bad = 0;

  bad |= fleece_cleanup (h, 0) != -1 || fleece_get_errno () != EPERM;
  bad |= (fleece_wait (h, 0) != -1 || fleece_get_errno () != EPERM) << 1;
  bad |= (fleece_cancel (h) != -1 || errno != EPERM) << 2;
  bad |= (fleece_set_vmid (h, 101) != -1 || fleece_get_errno () != EPERM) << 3;
  bad |= (fleece_get_record (h) != NULL || fleece_get_errno () != EPERM) << 4;
  fleece_free (h);
  return bad;
}

/* A child forked after attach: every call but fleece_free fails with
 * EPERM and the parent's run goes on to a good backup. */
START_TEST (test_fork_after_attach)
{
  FlVm *vm = fl_vm_start ("safety", NULL, true);
  struct fleece_handle *h = fl_vm_handle (vm, vm->tl->q->qmp_path);
  struct fleece_plan *p = tl_plan (h, vm->log);
  struct fleece_target *t = fleece_target_new_dir (vm->tl->target, "raw");
  guint8 **pit = fl_pit (vm);
  int bad;

  ck_assert_int_eq (fleece_set_bwlimit (h, 4096), 0);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  ck_assert_int_eq (fleece_start (h, p, t, 0), 0);
  bad = in_child (forked_calls, h, false);
  ck_assert_msg (bad == 0, "the child's calls were not all refused with EPERM (0x%x)", bad);
  fl_guest_write_all (vm);
  ck_assert_msg (tl_wait_end (h, 1000) == 1, "%s", fleece_get_error ());
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);
  fl_assert_backup (vm, pit, "the parent's backup after the fork");
  fl_pit_free (pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  fl_assert_restored (vm, "fork after attach");
  fl_vm_stop (vm);
}
END_TEST

static int
dummy_load (void *user_data, uint32_t vmid, char **json, char **reason)
{
  *json = NULL;
  return 0;
}

static int
dummy_store (void *user_data, uint32_t vmid, const char *json, char **reason)
{
  return 0;
}

#define ASSERT_EINVAL(call) \
  do { \
    ck_assert_msg ((call) == -1, "%s did not fail", #call); \
    ck_assert_msg (fleece_get_errno () == EINVAL, "%s: errno %d", #call, fleece_get_errno ()); \
  } while (0)
#define ASSERT_NULL_EINVAL(call) \
  do { \
    ck_assert_msg ((call) == NULL, "%s did not fail", #call); \
    ck_assert_msg (fleece_get_errno () == EINVAL, "%s: errno %d", #call, fleece_get_errno ()); \
  } while (0)

/* Every call that takes a handle, with NULL: -1 or NULL with EINVAL. */
START_TEST (test_null_handle)
{
  const char *keys[] = { "scsi0", NULL };
  uint64_t a, b;
  struct fleece_plan *p = NULL;

  ASSERT_EINVAL (fleece_connect (NULL, "/tmp/x.sock"));
  {
    int sv[2];

    /* The fd is the call's even when it fails. */
    ck_assert_int_eq (socketpair (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    ASSERT_EINVAL (fleece_connect_fd (NULL, sv[0]));
    ck_assert_int_eq (fcntl (sv[0], F_GETFD), -1);
    close (sv[1]);
  }
  ASSERT_EINVAL (fleece_set_vmid (NULL, 100));
  ASSERT_EINVAL (fleece_get_vmid (NULL));
  ASSERT_EINVAL (fleece_set_state_dir (NULL, "/tmp"));
  ASSERT_EINVAL (fleece_set_storage (NULL, NULL));
  ASSERT_EINVAL (fleece_set_engine (NULL, FLEECE_ENGINE_AUTO));
  ASSERT_EINVAL (fleece_get_engine (NULL));
  ASSERT_EINVAL (fleece_set_qmp_timeout (NULL, 1000));
  ASSERT_EINVAL (fleece_set_drives (NULL, keys));
  ASSERT_EINVAL (fleece_set_plan_flags (NULL, 0));
  ASSERT_EINVAL (fleece_set_image_format (NULL, "raw"));
  ASSERT_EINVAL (fleece_set_bwlimit (NULL, 0));
  ASSERT_EINVAL (fleece_set_bitmap (NULL, "b", FLEECE_BITMAP_USE));
  ASSERT_EINVAL (fleece_set_cbw_timeout (NULL, 1));
  ASSERT_EINVAL (fleece_set_log_callback (NULL, tl_log_cb, NULL, NULL));
  ASSERT_EINVAL (fleece_set_progress_callback (NULL, NULL, NULL, NULL));
  ASSERT_EINVAL (fleece_set_record_callback (NULL, dummy_load, dummy_store, NULL, NULL));
  ASSERT_NULL_EINVAL (fleece_plan (NULL));
  ASSERT_EINVAL (fleece_attach (NULL, p, 0));
  ASSERT_EINVAL (fleece_start (NULL, p, NULL, 0));
  ASSERT_EINVAL (fleece_wait (NULL, 0));
  errno = 0;
  ck_assert_int_eq (fleece_cancel (NULL), -1);
  ck_assert_int_eq (errno, EINVAL);
  ASSERT_EINVAL (fleece_get_progress (NULL, &a, &b));
  ASSERT_EINVAL (fleece_get_drive_progress (NULL, "scsi0", &a, &b));
  ASSERT_EINVAL (fleece_get_stat (NULL, NULL, FLEECE_STAT_DONE, &a));
  ASSERT_NULL_EINVAL (fleece_get_drive_result (NULL, "scsi0"));
  ASSERT_EINVAL (fleece_get_drive_elapsed_ms (NULL, "scsi0"));
  ASSERT_NULL_EINVAL (fleece_get_record (NULL));
  ASSERT_NULL_EINVAL (fleece_get_status (NULL, 0));
  ASSERT_EINVAL (fleece_cleanup (NULL, 0));
  /* And the objects that are not handles. */
  ASSERT_EINVAL (fleece_plan_get_drive_count (NULL));
  ASSERT_EINVAL (fleece_plan_get_size (NULL, 0));
  ASSERT_EINVAL (fleece_plan_get_cluster_size (NULL, 0));
  ASSERT_EINVAL (fleece_plan_get_fleeced (NULL, 0));
  ASSERT_NULL_EINVAL (fleece_plan_get_key (NULL, 0));
  ASSERT_NULL_EINVAL (fleece_plan_to_json (NULL));
  ASSERT_EINVAL (fleece_storage_set_option (NULL, "id", "x"));
  ASSERT_EINVAL (fleece_storage_set_alloc_callback (NULL, NULL));
  ASSERT_EINVAL (fleece_target_set_base (NULL, "/tmp"));
  fleece_free (NULL);
  fleece_plan_free (NULL);
  fleece_storage_free (NULL);
  fleece_target_free (NULL);
}
END_TEST

static int
mem_load (void *user_data, uint32_t vmid, char **json, char **reason)
{
  *json = NULL;
  return 0;
}

static int
mem_store (void *user_data, uint32_t vmid, const char *json, char **reason)
{
  return 0;
}

/* Once fleece_wait returned, the run is still set up until cleanup:
 * settings that shape it are refused (EBUSY), and cleanup still undoes
 * everything.  Progress meanwhile never steps back or passes the size. */
typedef struct {
  GHashTable *last;     /* key -> last done (guint64*) */
  char *bad;            /* first violation */
  unsigned calls;
} Progress;

static void
progress_cb (void *user_data, const char *drive, uint64_t done, uint64_t total)
{
  Progress *pr = user_data;
  guint64 *last = g_hash_table_lookup (pr->last, drive);
  uint64_t size = 0;

  pr->calls++;
  for (size_t i = 0; i < FL_NDISKS; i++)
    if (strcmp (fl_disks[i].key, drive) == 0)
      size = fl_disks[i].size;
  if (!pr->bad && (total != size || done > total || (last && done < *last)))
    pr->bad = g_strdup_printf ("%s: %" G_GUINT64_FORMAT "/%" G_GUINT64_FORMAT " after %"
                               G_GUINT64_FORMAT " (size %" G_GUINT64_FORMAT ")", drive,
                               (guint64) done, (guint64) total, last ? *last : 0,
                               (guint64) size);
  if (!last) {
    last = g_new0 (guint64, 1);
    g_hash_table_insert (pr->last, g_strdup (drive), last);
  }
  *last = done;
}

START_TEST (test_settings_after_wait)
{
  FlVm *vm = fl_vm_start ("safety", NULL, true);
  struct fleece_handle *h = fl_vm_handle (vm, vm->tl->q->qmp_path);
  struct fleece_plan *p = tl_plan (h, vm->log);
  struct fleece_target *t = fleece_target_new_dir (vm->tl->target, "raw");
  g_autofree char *other = private_dir (vm, "other");
  Progress pr = { g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free), NULL, 0 };
  int r;

  ck_assert_int_eq (fleece_set_progress_callback (h, progress_cb, &pr, NULL), 0);
  ck_assert_int_eq (fleece_set_bwlimit (h, 4096), 0);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  ck_assert_int_eq (fleece_start (h, p, t, 0), 0);
  while ((r = fleece_wait (h, 300)) == 0) {
    for (size_t i = 0; i < FL_NDISKS; i++) {
      uint64_t done, total;

      ck_assert_int_eq (fleece_get_drive_progress (h, fl_disks[i].key, &done, &total), 0);
      ck_assert_uint_le (done, total);
      ck_assert_uint_eq (total, fl_disks[i].size);
    }
  }
  ck_assert_msg (r == 1, "%s", fleece_get_error ());
  ck_assert_msg (pr.bad == NULL, "progress: %s", pr.bad);
  ck_assert_uint_gt (pr.calls, 0);
  for (size_t i = 0; i < FL_NDISKS; i++) {
    guint64 *last = g_hash_table_lookup (pr.last, fl_disks[i].key);
    ck_assert_msg (last && *last == fl_disks[i].size, "%s ended at %" G_GUINT64_FORMAT,
                   fl_disks[i].key, last ? *last : 0);
  }

#define ASSERT_EBUSY(call) \
  do { \
    ck_assert_msg ((call) == -1, "%s was allowed after fleece_wait", #call); \
    ck_assert_int_eq (fleece_get_errno (), EBUSY); \
  } while (0)
  ASSERT_EBUSY (fleece_set_vmid (h, 101));
  ASSERT_EBUSY (fleece_set_state_dir (h, other));
  ASSERT_EBUSY (fleece_set_storage (h, fleece_storage_new_dir (other)));
  ASSERT_EBUSY (fleece_set_record_callback (h, mem_load, mem_store, NULL, NULL));
  ASSERT_EBUSY (fleece_set_record_callback (h, NULL, NULL, NULL, NULL));
#undef ASSERT_EBUSY
  ck_assert_int_eq (fleece_get_vmid (h), 100);
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  fl_empty_dir (vm->tl->target);
  fl_assert_restored (vm, "settings after wait");
  g_hash_table_unref (pr.last);
  fl_vm_stop (vm);
}
END_TEST

/* A relative FLEECE_STATE_DIR is refused by name, and nothing is made
 * relative to the working directory. */
START_TEST (test_relative_state_dir)
{
  g_autofree char *dir = tl_tmpdir_new ("statedir");
  g_autofree char *cwd = g_get_current_dir ();
  struct fleece_handle *h;

  ck_assert_int_eq (chdir (dir), 0);
  g_setenv ("FLEECE_STATE_DIR", "relative/state", TRUE);
  h = fleece_new ();
  g_unsetenv ("FLEECE_STATE_DIR");
  ck_assert_int_eq (fleece_set_vmid (h, 100), 0);
  ck_assert_int_eq (fleece_cleanup (h, 0), -1);
  ck_assert_msg (strstr (fleece_get_error (), "relative/state") &&
                 strstr (fleece_get_error (), "not an absolute path"), "%s", fleece_get_error ());
  ck_assert_ptr_null (fleece_get_record (h));
  ck_assert_msg (strstr (fleece_get_error (), "not an absolute path"), "%s", fleece_get_error ());
  ck_assert (!g_file_test ("relative", G_FILE_TEST_EXISTS));
  fleece_free (h);
  ck_assert_int_eq (chdir (cwd), 0);
  tl_tmpdir_free (g_steal_pointer (&dir));
}
END_TEST

/* Calls that only read (record, status) or find nothing to do (cleanup)
 * create no state dir. */
START_TEST (test_missing_state_dir)
{
  g_autofree char *dir = tl_tmpdir_new ("statedir");
  g_autofree char *missing = g_build_filename (dir, "no", "such", "state", NULL);
  struct fleece_handle *h;
  char *s;

  h = fleece_new ();
  ck_assert_int_eq (fleece_set_vmid (h, 100), 0);
  ck_assert_int_eq (fleece_set_state_dir (h, missing), 0);
  ck_assert_ptr_null (fleece_get_record (h));
  ck_assert_int_eq (fleece_get_errno (), ENOENT);
  s = fleece_get_status (h, 0);
  ck_assert_msg (s != NULL, "%s", fleece_get_error ());
  ck_assert_msg (strstr (s, "\"run\":\"none\"") || strstr (s, "\"run\": \"none\""), "%s", s);
  free (s);
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());
  fleece_free (h);
  {
    g_autofree char *no = g_build_filename (dir, "no", NULL);
    ck_assert_msg (!g_file_test (no, G_FILE_TEST_EXISTS), "%s was created", missing);
  }
  tl_tmpdir_free (g_steal_pointer (&dir));
}
END_TEST

/* ------------------------------------------------------------------ */
/* Signals, a busy monitor, a failed cancel                             */
/* ------------------------------------------------------------------ */

static struct fleece_handle *alarm_handle;

static void
on_alarm (int sig)
{
  fleece_cancel (alarm_handle);
}

/* Hold QEMU's monitor as another client (qemu-server) would: connected
 * and greeted; the library's connections then wait. */
static int
hold_monitor (const char *path)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  char buf[4096];

  g_strlcpy (sun.sun_path, path, sizeof sun.sun_path);
  ck_assert_int_eq (connect (fd, (struct sockaddr *) &sun, sizeof sun), 0);
  ck_assert_int_gt (read (fd, buf, sizeof buf), 0);   /* the greeting */
  return fd;
}

static void
alarm_in_ms (int ms)
{
  struct itimerval it = { .it_value = { ms / 1000, (ms % 1000) * 1000 } };

  ck_assert_int_eq (setitimer (ITIMER_REAL, &it, NULL), 0);
}

/* A VM, a handle whose fleece_cancel() SIGALRM calls, a plan, a target. */
static void
busy_monitor_begin (FlVm **vm, struct fleece_handle **h, struct fleece_plan **p,
                    struct fleece_target **t)
{
  struct sigaction sa = { .sa_handler = on_alarm };

  *vm = fl_vm_start ("safety", NULL, true);
  *h = fl_vm_handle (*vm, (*vm)->tl->q->qmp_path);
  *p = tl_plan (*h, (*vm)->log);
  *t = fleece_target_new_dir ((*vm)->tl->target, "raw");
  sigemptyset (&sa.sa_mask);
  ck_assert_int_eq (sigaction (SIGALRM, &sa, NULL), 0);
  alarm_handle = *h;
  ck_assert_int_eq (fleece_set_bwlimit (*h, FL_BWLIMIT_SLOW), 0);
}

static void
busy_monitor_end (FlVm *vm, struct fleece_handle *h, struct fleece_plan *p,
                  struct fleece_target *t)
{
  signal (SIGALRM, SIG_DFL);
  alarm_handle = NULL;
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  fl_vm_stop (vm);
}

/* While fleece_start waits for a monitor another client holds, a
 * fleece_cancel() from a signal handler makes it give up at once. */
START_TEST (test_cancel_busy_monitor_start)
{
  FlVm *vm;
  struct fleece_handle *h;
  struct fleece_plan *p;
  struct fleece_target *t;
  gint64 t0, took;
  int fd, r;

  busy_monitor_begin (&vm, &h, &p, &t);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);

  /* fleece_start waiting for the monitor. */
  fd = hold_monitor (vm->tl->q->qmp_path);
  alarm_in_ms (300);
  t0 = g_get_monotonic_time ();
  r = fleece_start (h, p, t, 0);
  took = (g_get_monotonic_time () - t0) / 1000;
  ck_assert_int_eq (r, -1);
  ck_assert_msg (fleece_get_errno () == ECANCELED, "%s", fleece_get_error ());
  ck_assert_msg (took < 2000, "fleece_start gave up after %" G_GINT64_FORMAT " ms", took);
  close (fd);
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());
  fl_assert_restored (vm, "cancel while fleece_start waits for the monitor");
  busy_monitor_end (vm, h, p, t);
}
END_TEST

/* fleece_wait waiting for the monitor: a cancel ends the wait with
 * ECANCELED at once, not after the QMP timeout; cleanup (once the monitor
 * is free) undoes the run. */
START_TEST (test_cancel_busy_monitor_wait)
{
  FlVm *vm;
  struct fleece_handle *h;
  struct fleece_plan *p;
  struct fleece_target *t;
  gint64 t0, took;
  int fd, r;

  busy_monitor_begin (&vm, &h, &p, &t);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  ck_assert_int_eq (fleece_start (h, p, t, 0), 0);
  fd = hold_monitor (vm->tl->q->qmp_path);
  alarm_in_ms (300);
  t0 = g_get_monotonic_time ();
  r = fleece_wait (h, 20000);
  took = (g_get_monotonic_time () - t0) / 1000;
  close (fd);
  ck_assert_msg (r == -1 && fleece_get_errno () == ECANCELED, "fleece_wait: %d after %"
                 G_GINT64_FORMAT " ms: %s", r, took, fleece_get_error ());
  ck_assert_msg (took < 2000, "fleece_wait gave up after %" G_GINT64_FORMAT " ms", took);
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());
  fl_empty_dir (vm->tl->target);
  fl_assert_restored (vm, "cancel while fleece_wait waits for the monitor");
  busy_monitor_end (vm, h, p, t);
}
END_TEST

/* The cancel QEMU refuses (each job-cancel answered with an error), then
 * the backup fails for real (its NBD target dies; the job-cancels that end
 * the other drive's job then pass): the failure reads as what it is, not
 * "cancelled". */
START_TEST (test_failed_cancel)
{
  FlVm *vm = fl_vm_start ("safety", NULL, true);
  struct fleece_handle *h = fl_vm_handle (vm, fl_vm_proxy (vm));
  struct fleece_plan *p = tl_plan (h, vm->log);
  g_autofree char *uri = NULL;
  GPid qsd = tl_vm_nbd_target (vm->tl, &uri);
  struct fleece_target *t = fleece_target_new_nbd (uri);
  const char *result;
  FlEnd e = { 0 };
  int r;

  ck_assert_int_eq (fleece_set_bwlimit (h, FL_BWLIMIT_SLOW), 0);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s", fleece_get_error ());
  fl_proxy_arm_named (vm->px, "refuse", 0, 0, "job-cancel");
  ck_assert_int_eq (fleece_cancel (h), 0);
  ck_assert_int_eq (fleece_wait (h, 600), 0);
  fl_proxy_end (vm->px, &e);
  ck_assert_msg (e.fired, "no job-cancel was sent (%u commands)", e.commands);
  kill (qsd, SIGKILL);
  waitpid (qsd, NULL, 0);
  g_spawn_close_pid (qsd);
  fl_guest_write_all (vm);
  while ((r = fleece_wait (h, 1000)) == 0)
    ;
  ck_assert_int_eq (r, -1);
  ck_assert_msg (fleece_get_errno () != ECANCELED && !strstr (fleece_get_error (), "cancelled"),
                 "a real failure reads: %s\n%s", fleece_get_error (), vm->log->str);
  result = fleece_get_drive_result (h, "scsi0");
  ck_assert_msg (result && strcmp (result, "cancelled") != 0 && strcmp (result, "ok") != 0,
                 "scsi0: %s", result);
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());
  fl_assert_restored (vm, "a failed cancel");
  fl_empty_dir (vm->tl->target);
  fl_end_clear (&e);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  fl_vm_stop (vm);
}
END_TEST

/* ------------------------------------------------------------------ */
/* main                                                                */
/* ------------------------------------------------------------------ */

int
main (void)
{
  Suite *s = suite_create ("safety");
  TCase *tc = tcase_create ("issue12");
  SRunner *sr;
  int failed;

  tcase_set_timeout (tc, 120);
  ADD (tc, test_null_handle);
  ADD (tc, test_relative_state_dir);
  ADD (tc, test_missing_state_dir);
  ADD (tc, test_target_files_elsewhere);
  ADD (tc, test_image_outside_storage);
  ADD (tc, test_cleanup_other_storage);
  ADD (tc, test_existing_image_kept);
  ADD (tc, test_crash_then_other_storage);
  ADD (tc, test_hostile_state_dirs);
  ADD (tc, test_one_run_per_vm);
  ADD (tc, test_cleanup_without_record);
  ADD (tc, test_readonly_storage);
  ADD (tc, test_fork_after_attach);
  ADD (tc, test_settings_after_wait);
  ADD (tc, test_cancel_busy_monitor_start);
  ADD (tc, test_cancel_busy_monitor_wait);
  ADD (tc, test_failed_cancel);
  suite_add_tcase (s, tc);
  sr = srunner_create (s);
  srunner_run_all (sr, CK_VERBOSE);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
