/* Backups with the fleecing images on Ceph RBD, end to end: the library's
 * RBD storage (libfleece/storage-rbd.c) against a real throwaway Ceph
 * cluster and a real QEMU (stock engine, no guest OS).
 *
 *   - a slowed backup with guest writes ahead of it holds the point in
 *     time, its images live in the pool while it runs and are freed as it
 *     proceeds, and nothing is left in QEMU or the pool;
 *   - a process killed at three points (image made but its id not
 *     recorded, image renamed but not recorded, mid-backup) is undone by
 *     fleece_cleanup() from another process;
 *   - an image of the same name that is not the run's is never touched;
 *   - a full pool fails the backup with the reason, not the guest's writes;
 *   - a cleanup through another RBD storage refuses and names the pool;
 *   - a key instead of a conf reaches QEMU as a secret object, removed
 *     again;
 *   - Proxmox's patched QEMU built without rbd is refused at plan time,
 *     and one built with it ($FLEECE_PVE_QEMU_RBD) writes a VMA that
 *     extracts to the point in time;
 *   - the fleece command (argv[1]) with --fleecing-storage rbd:POOL.
 *
 * One cluster for all cases ($FLEECE_CEPH_UP, tl-ceph.h); skipped (77)
 * with the reason when it or Ceph's packages are missing. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <check.h>

#include "testlib.h"
#include "tl-ceph.h"
#include "rbd.h"
#include "tl-only.h"

#define MiB ((uint64_t) 1024 * 1024)
#define VMID 100

static TlCeph *ceph;

/* A 24 MiB raw disk (the one the guest writes ahead of the backup) and an
 * odd-sized qcow2 one: RBD images are made at exactly each size. */
static const TlDisk disks[] = {
  { "scsi0", "raw", 24 * MiB, "scsi", true },
  { "scsi1", "qcow2", 8 * MiB + 4096, "scsi", true },
};
#define NDISKS G_N_ELEMENTS (disks)

/* ---- helpers ----------------------------------------------------------- */

/* A time limit in seconds, 6 times as long under valgrind (meson's
 * valgrind setup sets FLEECE_UNDER_VALGRIND). */
static gint64
slow (gint64 seconds)
{
  return g_getenv ("FLEECE_UNDER_VALGRIND") ? 6 * seconds : seconds;
}

/* The RBD storage of the test cluster with its conf (ns may be NULL). */
static struct fleece_storage *
conf_storage (const char *pool, const char *ns)
{
  struct fleece_storage *st = fleece_storage_new_rbd (pool, ns);

  ck_assert_msg (st != NULL, "fleece_storage_new_rbd: %s", fleece_get_error ());
  ck_assert_msg (fleece_storage_set_option (st, "conf", ceph->conf) == 0, "%s",
                 fleece_get_error ());
  return st;
}

/* A handle for vm with storage st (taken), on qmp (NULL: not connected,
 * cleanup reaches the QEMU the record names). */
static struct fleece_handle *
rbd_handle (TlVm *vm, const char *qmp, struct fleece_storage *st, GString *log)
{
  struct fleece_handle *h = tl_handle_on (vm, VMID, log, qmp);

  ck_assert_msg (fleece_set_storage (h, st) == 0, "%s", fleece_get_error ());
  return h;
}

/* The test's own view of the pool (never the library's connection). */
static FleeceRbd *
inspector (const char *ns)
{
  g_autoptr (GError) err = NULL;
  FleeceRbd *r = fleece_rbd_new (ceph->pool, ns, &err);

  ck_assert_msg (r != NULL, "%s", err ? err->message : "");
  ck_assert (fleece_rbd_set_option (r, "conf", ceph->conf, &err));
  return r;
}

/* The images in the pool (namespace ns) as "a,b" (g_free). */
static char *
pool_images (FleeceRbd *r)
{
  g_autoptr (GError) err = NULL;
  g_auto (GStrv) names = fleece_rbd_list (r, &err);

  ck_assert_msg (names != NULL, "%s", err ? err->message : "");
  return g_strjoinv (",", names);
}

static uint64_t
usage (FleeceRbd *r, const char *name, bool exact)
{
  g_autoptr (GError) err = NULL;
  uint64_t n = 0;

  ck_assert_msg (fleece_rbd_image_usage (r, name, exact, &n, &err), "%s",
                 err ? err->message : "");
  return n;
}

/* Nothing in the pool (namespace ns), not even in its RBD trash. */
static void
assert_pool_empty (const char *ns)
{
  g_autoptr (FleeceRbd) r = inspector (ns);
  g_autofree char *names = pool_images (r);
  g_autofree char *trash = ns
    ? tl_ceph_cmd_ok (ceph, "rbd", "trash", "ls", "--namespace", ns, ceph->pool, NULL)
    : tl_ceph_cmd_ok (ceph, "rbd", "trash", "ls", ceph->pool, NULL);

  ck_assert_msg (*names == '\0', "images left in %s%s%s: %s", ceph->pool,
                 ns ? "/" : "", ns ? ns : "", names);
  ck_assert_msg (*g_strstrip (trash) == '\0', "trash left: %s", trash);
}

static json_object *
jget (json_object *o, const char *key)
{
  json_object *v = NULL;

  return o && json_object_object_get_ex (o, key, &v) ? v : NULL;
}

/* The record of h, parsed (put it). */
static json_object *
record_of (struct fleece_handle *h)
{
  g_autofree char *text = fleece_get_record (h);
  json_object *o;

  ck_assert_msg (text != NULL, "no record: %s", fleece_get_error ());
  o = json_tokener_parse (text);
  ck_assert_msg (o != NULL, "bad record: %s", text);
  return o;
}

/* The record's entry for drive key. */
static json_object *
record_drive (json_object *rec, const char *key)
{
  json_object *drives = jget (rec, "drives");

  for (size_t i = 0; drives && i < json_object_array_length (drives); i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    if (g_strcmp0 (json_object_get_string (jget (d, "key")), key) == 0)
      return d;
  }
  ck_abort_msg ("no drive %s in the record %s", key, json_object_to_json_string (rec));
  return NULL;
}

/* The driver QEMU shows for node name, or NULL (g_free). */
static char *
node_driver (TlQemu *q, const char *name)
{
  json_object *nodes = tl_qmp (q, "query-named-block-nodes", NULL);
  char *drv = NULL;

  for (size_t i = 0; i < json_object_array_length (nodes); i++) {
    json_object *n = json_object_array_get_idx (nodes, i);
    if (g_strcmp0 (json_object_get_string (jget (n, "node-name")), name) == 0)
      drv = g_strdup (json_object_get_string (jget (n, "drv")));
  }
  json_object_put (nodes);
  return drv;
}

/* Whether /objects in q has an object id. */
static bool
has_object (TlQemu *q, const char *id)
{
  json_object *objs = tl_qmp (q, "qom-list", tl_json ("{\"path\": \"/objects\"}"));
  bool found = false;

  for (size_t i = 0; i < json_object_array_length (objs); i++)
    found = found || g_strcmp0 (json_object_get_string (
              jget (json_object_array_get_idx (objs, i), "name")), id) == 0;
  json_object_put (objs);
  return found;
}

/* Every fleeced drive's image is in the pool under the plan's name, at
 * exactly the drive's size, with the run's object size, and its id is
 * the one the record holds. */
static void
assert_images_recorded (struct fleece_handle *h, struct fleece_plan *p,
                        FleeceRbd *r)
{
  json_object *rec = record_of (h);

  for (int i = 0; i < fleece_plan_get_drive_count (p); i++) {
    const char *name = fleece_plan_get_image (p, i);
    json_object *d = record_drive (rec, fleece_plan_get_key (p, i));
    const char *rid = json_object_get_string (jget (jget (d, "identity"), "rbd-id"));
    g_autoptr (GError) err = NULL;
    g_autofree char *id = fleece_rbd_image_id (r, name, &err);
    uint64_t size = 0, osize = 0, features = 0;

    ck_assert_msg (id != NULL, "%s: %s", name, err ? err->message : "");
    ck_assert_msg (g_strcmp0 (rid, id) == 0, "%s: the record says id %s, the pool %s",
                   name, rid, id);
    ck_assert_str_eq (json_object_get_string (jget (d, "volid")), name);
    ck_assert (fleece_rbd_image_info (r, name, &size, &osize, &features, &err));
    ck_assert_uint_eq (size, (uint64_t) fleece_plan_get_size (p, i));
    ck_assert_uint_eq (osize, FLEECE_RBD_DEFAULT_OBJECT_SIZE);
  }
  json_object_put (rec);
}

/* The guest sees what it wrote: len bytes of pattern at off. */
static void
assert_guest_data (TlVm *vm, const char *qdev, unsigned pattern, uint64_t off,
                   uint64_t len)
{
  g_autofree char *cmd = g_strdup_printf ("read -P 0x%02x %" G_GUINT64_FORMAT
                                          " %" G_GUINT64_FORMAT, pattern, off, len);
  tl_guest_io (vm->q, qdev, cmd);
}

static TlVm *
vm_start (const char *tag, const TlDisk *d, size_t n, unsigned seed)
{
  TlVm *vm = tl_vm_new (tag, d, n, seed);

  tl_vm_start (vm, NULL);
  return vm;
}

/* ---- 1. point in time, images freed as the backup proceeds ------------- */

/* The whole backup: the images are in the pool, the guest overwrites 9 MiB
 * of scsi0 ahead of the slowed backup (copy-before-write puts the old data
 * into the image), the job frees it again as it passes, the backup holds
 * the point in time and nothing is left in QEMU or the pool. */
START_TEST (test_point_in_time)
{
  TlVm *vm = vm_start ("rbdpit", disks, NDISKS, 1);
  GString *log = g_string_new (NULL);
  struct fleece_handle *h = rbd_handle (vm, vm->q->qmp_path, conf_storage (ceph->pool, NULL), log);
  struct fleece_plan *p = tl_plan (h, log);
  struct fleece_target *t = fleece_target_new_dir (vm->target, "raw");
  g_autoptr (FleeceRbd) r = inspector (NULL);
  guint8 **pit = tl_vm_snapshot (vm);
  uint64_t peak = 0, low_after_peak = UINT64_MAX, u;
  g_autofree char *names = NULL, *drv = NULL;
  int rc, samples = 0;

  ck_assert_str_eq (fleece_plan_get_image (p, 0), "vm-100-fleece-0");
  ck_assert_str_eq (fleece_plan_get_image (p, 1), "vm-100-fleece-1");
  ck_assert_str_eq (fleece_plan_get_format (p, 0), "raw");
  ck_assert_str_eq (fleece_plan_get_format (p, 1), "raw");
  /* 6 MiB/s per job: scsi0 takes 4 s, time to write ahead and watch */
  ck_assert_int_eq (fleece_set_bwlimit (h, 6144), 0);
  ck_assert_msg (fleece_attach (h, p, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  names = pool_images (r);
  ck_assert_str_eq (names, "vm-100-fleece-0,vm-100-fleece-1");
  assert_images_recorded (h, p, r);
  drv = node_driver (vm->q, "scsi0-fleecing-file");
  ck_assert_msg (g_strcmp0 (drv, "rbd") == 0, "scsi0-fleecing-file: driver %s", drv);
  ck_assert_uint_eq (usage (r, "vm-100-fleece-0", true), 0);

  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  tl_guest_io (vm->q, "scsi0", "write -P 0xee 8M 8M");
  tl_vm_overwrite_tail (vm, 0xee);
  while ((rc = fleece_wait (h, 100)) == 0) {
    u = usage (r, "vm-100-fleece-0", false);
    samples++;
    if (u >= peak) {
      peak = u;
      low_after_peak = UINT64_MAX;
    } else
      low_after_peak = MIN (low_after_peak, u);
  }
  ck_assert_msg (rc == 1, "%s\n%s", fleece_get_error (), log->str);
  fprintf (stderr, "test-rbd-backup: vm-100-fleece-0 peak %" G_GUINT64_FORMAT
           " MiB, then down to %" G_GUINT64_FORMAT " MiB while running (%d samples)\n",
           peak / MiB, low_after_peak == UINT64_MAX ? 0 : low_after_peak / MiB, samples);
  /* what copy-before-write copied (8 + 1 MiB), far below the disk */
  ck_assert_msg (peak >= 9 * MiB && peak <= 10 * MiB, "peak %" G_GUINT64_FORMAT, peak);
  ck_assert_msg (low_after_peak < peak, "the image was not freed while the backup ran "
                 "(peak %" G_GUINT64_FORMAT ")", peak);
  /* every copied object freed by the job (exact extents, not only
   * whole objects), the images still there until cleanup; but the last
   * object of scsi1's image holds only 4 KiB of the disk, and librbd
   * ignores discards smaller than rbd_discard_granularity_bytes (64 KiB):
   * that much may stay until cleanup removes the image */
  ck_assert_uint_eq (usage (r, "vm-100-fleece-0", true), 0);
  u = usage (r, "vm-100-fleece-1", true);
  ck_assert_msg (u <= 4096, "vm-100-fleece-1 holds %" G_GUINT64_FORMAT " bytes", u);
  g_free (names);
  names = pool_images (r);
  ck_assert_str_eq (names, "vm-100-fleece-0,vm-100-fleece-1");

  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  tl_assert_nothing_left (vm, VMID);
  tl_assert_graph_unchanged (vm);
  assert_pool_empty (NULL);
  tl_check_point_in_time (vm, pit, vm->target, "raw");
  assert_guest_data (vm, "scsi0", 0xee, 8 * MiB, 8 * MiB);
  assert_guest_data (vm, "scsi0", 0xee, 23 * MiB, MiB);

  tl_vm_snapshot_free (vm, pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  g_string_free (log, TRUE);
  tl_vm_stop (vm);
}
END_TEST

/* ---- 2. a crash at any point, undone by cleanup -------------------------- */

/* The record through callbacks into a file, so that the child can die
 * exactly before a given record write reaches it. */
typedef enum {
  CRASH_BEFORE_ID,      /* images made, their ids not recorded */
  CRASH_BEFORE_VOLID,   /* images renamed to their names, not recorded */
  CRASH_MID_BACKUP,     /* killed by the parent while the backup runs */
} CrashPoint;

typedef struct {
  char *path;
  CrashPoint crash;
} RecordFile;

static int
rec_load (void *user_data, uint32_t vmid, char **json, char **reason)
{
  RecordFile *f = user_data;
  char *text = NULL;

  *json = g_file_get_contents (f->path, &text, NULL, NULL) ? text : NULL;
  return 0;
}

/* Would this record be the first to show what the crash point hides? */
static bool
crash_now (const RecordFile *f, const char *json)
{
  json_object *rec, *drives;
  bool hit = false;

  if (!json || f->crash == CRASH_MID_BACKUP || !(rec = json_tokener_parse (json)))
    return false;
  drives = jget (rec, "drives");
  for (size_t i = 0; drives && i < json_object_array_length (drives); i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    if (f->crash == CRASH_BEFORE_ID)
      hit = hit || jget (jget (d, "identity"), "rbd-id") != NULL;
    else
      hit = hit || json_object_get_string (jget (d, "volid")) != NULL;
  }
  json_object_put (rec);
  return hit;
}

static int
rec_store (void *user_data, uint32_t vmid, const char *json, char **reason)
{
  RecordFile *f = user_data;

  if (crash_now (f, json))
    kill (getpid (), SIGKILL);
  if (!json)
    return unlink (f->path) == 0 || errno == ENOENT ? 0 : -1;
  return g_file_set_contents (f->path, json, -1, NULL) ? 0 : -1;
}

/* h keeps its record in f (which outlives h). */
static void
use_record_file (struct fleece_handle *h, RecordFile *f)
{
  ck_assert_int_eq (fleece_set_record_callback (h, rec_load, rec_store, f, NULL), 0);
}

/* In a forked child (no Check calls there; never returns): a backup of vm
 * with the RBD storage (namespace ns), the record in f; says "s" on ready
 * once it runs, then waits to be killed; f->crash may kill it earlier.
 * start: attach and start (else attach only). */
static G_GNUC_NORETURN void
child_run (TlVm *vm, RecordFile *f, const char *ns, bool start, int ready)
{
  struct fleece_handle *h = fleece_new ();
  struct fleece_storage *st = fleece_storage_new_rbd (ceph->pool, ns);
  struct fleece_target *t = fleece_target_new_dir (vm->target, "raw");
  struct fleece_plan *p;

  if (!st || fleece_storage_set_option (st, "conf", ceph->conf) < 0 ||
      fleece_set_state_dir (h, vm->state) < 0 || fleece_set_vmid (h, VMID) < 0 ||
      (f && fleece_set_record_callback (h, rec_load, rec_store, f, NULL) < 0) ||
      fleece_connect (h, vm->q->qmp_path) < 0 || fleece_set_storage (h, st) < 0 ||
      fleece_set_bwlimit (h, 512) < 0 || !(p = fleece_plan (h)) ||
      fleece_attach (h, p, 0) < 0 || (start && fleece_start (h, p, t, 0) < 0)) {
    fprintf (stderr, "child: %s\n", fleece_get_error ());
    _exit (1);
  }
  if (write (ready, "s", 1) != 1)
    _exit (1);
  pause ();
  _exit (0);
}

/* Fork child_run and wait until it is ready (true) or died (false); *pid
 * is reaped when it died. */
static bool
fork_child (TlVm *vm, RecordFile *f, const char *ns, bool start, pid_t *pid)
{
  int fds[2];
  char c;
  bool ready;

  ck_assert_int_eq (pipe (fds), 0);
  *pid = fork ();
  ck_assert_int_ge (*pid, 0);
  if (*pid == 0) {
    close (fds[0]);
    child_run (vm, f, ns, start, fds[1]);
  }
  close (fds[1]);
  ready = read (fds[0], &c, 1) == 1;
  close (fds[0]);
  return ready;
}

static void
kill_child (pid_t pid)
{
  int status;

  kill (pid, SIGKILL);
  ck_assert_int_eq (waitpid (pid, &status, 0), pid);
  ck_assert (WIFSIGNALED (status) && WTERMSIG (status) == SIGKILL);
}

/* What the pool holds at the crash point, given the run's id. */
static void
assert_crash_left (CrashPoint crash, json_object *rec)
{
  g_autoptr (FleeceRbd) r = inspector (NULL);
  g_autofree char *names = pool_images (r);
  g_autofree char *want = NULL;
  const char *run = json_object_get_string (jget (rec, "run"));

  if (crash == CRASH_BEFORE_ID)
    want = g_strdup_printf ("vm-100-fleece-0.%.8s,vm-100-fleece-1.%.8s", run, run);
  else
    want = g_strdup ("vm-100-fleece-0,vm-100-fleece-1");
  ck_assert_str_eq (names, want);
}

START_TEST (test_crash_then_cleanup)
{
  CrashPoint crash = (CrashPoint) _i;
  TlVm *vm = vm_start ("rbdcrash", disks, NDISKS, 21);
  GString *log = g_string_new (NULL);
  RecordFile f = { g_build_filename (vm->dir, "record.json", NULL), crash };
  struct fleece_handle *h;
  pid_t pid;
  json_object *rec;
  int status;

  if (crash == CRASH_MID_BACKUP) {
    ck_assert_msg (fork_child (vm, &f, NULL, true, &pid), "the child failed");
    ck_assert_int_gt (tl_job_count (vm->q), 0);
    kill_child (pid);
    /* the guest goes on writing through the filters */
    tl_vm_overwrite_tail (vm, 0x77);
  } else {
    /* the child kills itself at the record write */
    ck_assert_msg (!fork_child (vm, &f, NULL, false, &pid), "the child did not crash");
    ck_assert_int_eq (waitpid (pid, &status, 0), pid);
    ck_assert (WIFSIGNALED (status) && WTERMSIG (status) == SIGKILL);
  }

  /* Another process (a handle not connected: the record names QEMU), the
   * same storage. */
  f.crash = CRASH_MID_BACKUP;
  h = rbd_handle (vm, NULL, conf_storage (ceph->pool, NULL), log);
  use_record_file (h, &f);
  rec = record_of (h);
  if (crash != CRASH_MID_BACKUP)
    assert_crash_left (crash, rec);
  json_object_put (rec);
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  ck_assert (!g_file_test (f.path, G_FILE_TEST_EXISTS));
  tl_assert_nothing_left (vm, VMID);
  tl_assert_graph_unchanged (vm);
  assert_pool_empty (NULL);
  if (crash == CRASH_MID_BACKUP)
    assert_guest_data (vm, "scsi0", 0x77, 23 * MiB, MiB);
  /* nothing left to do is success */
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);
  fleece_free (h);
  g_free (f.path);
  g_string_free (log, TRUE);
  tl_vm_stop (vm);
}
END_TEST

/* ---- 3. an image that is not the run's --------------------------------- */

START_TEST (test_existing_image_untouched)
{
  TlVm *vm = vm_start ("rbdexist", disks, NDISKS, 31);
  GString *log = g_string_new (NULL);
  g_autoptr (FleeceRbd) r = inspector (NULL);
  g_autofree char *file = g_build_filename (vm->dir, "theirs.raw", NULL);
  g_autofree char *back = g_build_filename (vm->dir, "back.raw", NULL);
  g_autofree char *id = NULL, *id2 = NULL, *names = NULL, *spec = NULL;
  g_autofree char *theirs = NULL, *now = NULL;
  gsize len = 0;
  struct fleece_handle *h;
  struct fleece_plan *p;

  /* Someone's image of the name the run wants (e.g. Proxmox's own), with
   * data. */
  theirs = g_malloc (4 * MiB);
  for (size_t i = 0; i < 4 * MiB; i++)
    theirs[i] = (char) (i * 7 + i / 4096);
  ck_assert (g_file_set_contents (file, theirs, 4 * MiB, NULL));
  spec = g_strdup_printf ("%s/vm-100-fleece-0", ceph->pool);
  g_free (tl_ceph_cmd_ok (ceph, "rbd", "import", "--no-progress", file, spec, NULL));
  id = fleece_rbd_image_id (r, "vm-100-fleece-0", NULL);
  ck_assert_ptr_nonnull (id);

  h = rbd_handle (vm, vm->q->qmp_path, conf_storage (ceph->pool, NULL), log);
  p = tl_plan (h, log);
  ck_assert_int_eq (fleece_attach (h, p, 0), -1);
  ck_assert_int_eq (fleece_get_errno (), EEXIST);
  ck_assert_msg (strstr (fleece_get_error (), "vm-100-fleece-0"), "%s", fleece_get_error ());
  /* attach undid itself: no record, nothing in QEMU, only their image */
  tl_assert_nothing_left (vm, VMID);
  tl_assert_graph_unchanged (vm);
  names = pool_images (r);
  ck_assert_str_eq (names, "vm-100-fleece-0");
  /* a cleanup (nothing recorded) does not touch it either */
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());

  id2 = fleece_rbd_image_id (r, "vm-100-fleece-0", NULL);
  ck_assert_str_eq (id2, id);
  g_free (tl_ceph_cmd_ok (ceph, "rbd", "export", "--no-progress", spec, back, NULL));
  ck_assert (g_file_get_contents (back, &now, &len, NULL));
  ck_assert_uint_eq (len, 4 * MiB);
  ck_assert_msg (memcmp (now, theirs, 4 * MiB) == 0, "their image's data changed");
  g_free (tl_ceph_cmd_ok (ceph, "rbd", "rm", "--no-progress", spec, NULL));
  assert_pool_empty (NULL);

  fleece_plan_free (p);
  fleece_free (h);
  g_string_free (log, TRUE);
  tl_vm_stop (vm);
}
END_TEST

/* ---- 4. a full pool ------------------------------------------------------ */

/* Ceph's full ratios of the OSDs (full last when raising, first when
 * lowering, so they stay in order). */
static void
set_full_ratios (const char *nearfull, const char *backfillfull, const char *full)
{
  g_free (tl_ceph_cmd_ok (ceph, "ceph", "osd", "set-full-ratio", full, NULL));
  g_free (tl_ceph_cmd_ok (ceph, "ceph", "osd", "set-backfillfull-ratio", backfillfull, NULL));
  g_free (tl_ceph_cmd_ok (ceph, "ceph", "osd", "set-nearfull-ratio", nearfull, NULL));
}

/* Wait until the pool is full (want_full) or has room again. */
static void
wait_pool_full (FleeceRbd *r, bool want_full)
{
  gint64 deadline = g_get_monotonic_time () + slow (60) * G_USEC_PER_SEC;
  g_autoptr (GError) err = NULL;

  for (;;) {
    bool full;
    g_clear_error (&err);
    full = !fleece_rbd_check_space (r, &err);
    if (full == want_full)
      break;
    ck_assert_msg (g_get_monotonic_time () < deadline, "the pool %s full",
                   want_full ? "never became" : "stayed");
    g_usleep (200 * 1000);
  }
  if (want_full)
    ck_assert_msg (err->code == ENOSPC && strstr (err->message, "is full"), "%s",
                   err->message);
}

/* Whatever happened in the test: the cluster takes writes again. */
static void
full_teardown (void)
{
  if (ceph)
    set_full_ratios ("0.85", "0.9", "0.95");
}

/* The test cluster's conf plus a bound on each RADOS operation of its
 * clients (g_free): with it, a write that waits for room in a full pool
 * fails after op_timeout seconds instead of waiting for as long as the
 * pool stays full. */
static char *
conf_with_op_timeout (TlVm *vm, const char *op_timeout)
{
  g_autofree char *text = NULL;
  g_autofree char *more = NULL;
  char *path = g_build_filename (vm->dir, "fleece-ceph.conf", NULL);

  ck_assert (g_file_get_contents (ceph->conf, &text, NULL, NULL));
  more = g_strdup_printf ("%s\n[client]\nrados osd op timeout = %s\n", text, op_timeout);
  ck_assert (g_file_set_contents (path, more, -1, NULL));
  return path;
}

/* Some data in the pool for the OSD to be full with (not zeros: rbd
 * import skips those); its image id (g_free). */
static char *
import_filler (TlVm *vm, FleeceRbd *r)
{
  g_autofree char *file = g_build_filename (vm->dir, "filler.raw", NULL);
  g_autofree char *data = g_malloc (8 * MiB);
  g_autofree char *spec = g_strdup_printf ("%s/filler", ceph->pool);
  char *id;

  for (size_t i = 0; i < 8 * MiB; i++)
    data[i] = (char) (1 + i % 251);
  ck_assert (g_file_set_contents (file, data, 8 * MiB, NULL));
  g_free (tl_ceph_cmd_ok (ceph, "rbd", "import", "--no-progress", file, spec, NULL));
  id = fleece_rbd_image_id (r, "filler", NULL);
  ck_assert_ptr_nonnull (id);
  return id;
}

/* The OSD reaches its full ratio while the backup runs (the ratio is
 * lowered below what the OSD holds: the state a cluster whose OSDs fill
 * up is in).  Writes to the fleecing image then wait: copy-before-write
 * gives up after its timeout and lets the guest's write through, the
 * backup fails saying why, and cleanup leaves nothing, the pool still
 * full.
 *
 * QEMU's copy that waits for room stays in flight after copy-before-write
 * gave up, and QEMU waits for it (holding its main loop) when the job
 * ends or the node goes: the conf bounds it with rados_osd_op_timeout
 * (fleece_storage_new_rbd(3)); without that bound QEMU's monitor stays blocked until
 * the pool has room again. */
START_TEST (test_full_pool)
{
  static const TlDisk one[] = { { "scsi0", "raw", 16 * MiB, "scsi", true } };
  TlVm *vm = vm_start ("rbdfull", one, 1, 41);
  GString *log = g_string_new (NULL);
  g_autofree char *conf = conf_with_op_timeout (vm, "5");
  struct fleece_storage *st = fleece_storage_new_rbd (ceph->pool, NULL);
  struct fleece_handle *h;
  struct fleece_plan *p;
  struct fleece_target *t = fleece_target_new_dir (vm->target, "raw");
  g_autoptr (FleeceRbd) r = inspector (NULL);
  g_autofree char *fid = NULL, *tid = NULL;
  gint64 t0, took;
  const char *msg;

  ck_assert_int_eq (fleece_storage_set_option (st, "conf", conf), 0);
  h = rbd_handle (vm, vm->q->qmp_path, st, log);
  p = tl_plan (h, log);
  /* A remove needs the pool's RBD trash object, which a full pool cannot
   * take: make it now, as any pool that ever had an image removed has. */
  {
    g_autoptr (GError) err = NULL;
    ck_assert (fleece_rbd_create (r, "trash-init", MiB, &tid, &err));
    ck_assert (fleece_rbd_remove (r, "trash-init", tid, &err));
  }
  fid = import_filler (vm, r);
  ck_assert_int_eq (fleece_set_bwlimit (h, 1024), 0);
  ck_assert_int_eq (fleece_set_cbw_timeout (h, 3), 0);
  ck_assert_msg (fleece_attach (h, p, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  set_full_ratios ("0.001", "0.001", "0.001");
  wait_pool_full (r, true);

  /* The guest's write waits for copy-before-write's timeout, then lands. */
  t0 = g_get_monotonic_time ();
  tl_guest_io (vm->q, "scsi0", "write -P 0x5c 12M 1M");
  took = g_get_monotonic_time () - t0;
  ck_assert_msg (took >= 2 * G_USEC_PER_SEC, "the write took only %.1f s: did copy-"
                 "before-write reach the full pool?", took / 1e6);
  assert_guest_data (vm, "scsi0", 0x5c, 12 * MiB, MiB);

  ck_assert_int_eq (tl_wait_end (h, 250), -1);
  msg = fleece_get_error ();
  ck_assert_msg (strstr (msg, "the fleecing storage is full or too slow")
                 && strstr (msg, "vm-100-fleece-0")
                 && strstr (msg, "The guest's writes did not fail"), "%s\n%s", msg, log->str);
  fprintf (stderr, "test-rbd-backup: full pool: %s\n", msg);

  /* Still full: cleanup detaches and removes all the same. */
  ck_assert_msg (!fleece_rbd_check_space (r, NULL), "the pool has room again");
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  tl_assert_nothing_left (vm, VMID);
  tl_assert_graph_unchanged (vm);
  assert_guest_data (vm, "scsi0", 0x5c, 12 * MiB, MiB);
  {
    g_autofree char *names = pool_images (r);
    ck_assert_str_eq (names, "filler");
  }
  full_teardown ();
  wait_pool_full (r, false);
  ck_assert (fleece_rbd_remove (r, "filler", fid, NULL));
  assert_pool_empty (NULL);

  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  g_string_free (log, TRUE);
  tl_vm_stop (vm);
}
END_TEST

/* ---- 5. cleanup through another RBD storage ----------------------------- */

#define NS "fleece-ns"

/* A run in a namespace, crashed after attach: a cleanup given the pool
 * without the namespace, or another pool, refuses and says where the
 * images are; the record and the images stay until the right storage is
 * given. */
START_TEST (test_cleanup_other_storage)
{
  TlVm *vm = vm_start ("rbdother", disks, NDISKS, 51);
  GString *log = g_string_new (NULL);
  g_autoptr (FleeceRbd) rns = NULL;
  g_autofree char *names = NULL, *nsspec = g_strdup_printf ("%s/%s", ceph->pool, NS);
  struct fleece_storage *others[2];
  struct fleece_handle *h;
  pid_t pid;

  g_free (tl_ceph_cmd_ok (ceph, "rbd", "namespace", "create", nsspec, NULL));
  ck_assert_msg (fork_child (vm, NULL, NS, false, &pid), "the child failed");
  kill_child (pid);
  rns = inspector (NS);
  names = pool_images (rns);
  ck_assert_str_eq (names, "vm-100-fleece-0,vm-100-fleece-1");

  others[0] = conf_storage (ceph->pool, NULL);
  others[1] = conf_storage ("rbd-other", NS);
  for (int i = 0; i < 2; i++) {
    json_object *rec;
    h = rbd_handle (vm, NULL, others[i], log);
    ck_assert_int_eq (fleece_cleanup (h, 0), -1);
    ck_assert_int_eq (fleece_get_errno (), EXDEV);
    ck_assert_msg (strstr (fleece_get_error (), "are in RBD pool " "rbd/" NS ","),
                   "%s", fleece_get_error ());
    ck_assert_msg (strstr (fleece_get_error (), "the record is kept"), "%s",
                   fleece_get_error ());
    rec = record_of (h);
    ck_assert_ptr_nonnull (jget (jget (record_drive (rec, "scsi0"), "identity"), "rbd-id"));
    json_object_put (rec);
    g_free (names);
    names = pool_images (rns);
    ck_assert_str_eq (names, "vm-100-fleece-0,vm-100-fleece-1");
    fleece_free (h);
  }
  h = rbd_handle (vm, NULL, conf_storage (ceph->pool, NS), log);
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  tl_assert_nothing_left (vm, VMID);
  tl_assert_graph_unchanged (vm);
  assert_pool_empty (NS);
  assert_pool_empty (NULL);
  fleece_free (h);
  g_free (tl_ceph_cmd_ok (ceph, "rbd", "namespace", "remove", nsspec, NULL));
  g_string_free (log, TRUE);
  tl_vm_stop (vm);
}
END_TEST

/* ---- 6. a key instead of a conf ----------------------------------------- */

/* No ceph.conf for anyone: the monitors and the key (or a keyring the
 * library reads).  QEMU gets the key as a secret object for the run,
 * which is recorded, never written into the record itself, and removed
 * by cleanup. */
START_TEST (test_key_secret)
{
  static const TlDisk one[] = { { "scsi0", "raw", 8 * MiB, "scsi", true } };
  TlVm *vm = vm_start ("rbdkey", one, 1, 61);
  GString *log = g_string_new (NULL);
  struct fleece_storage *st = fleece_storage_new_rbd (ceph->pool, NULL);
  struct fleece_target *t = fleece_target_new_dir (vm->target, "raw");
  guint8 **pit = tl_vm_snapshot (vm);
  struct fleece_handle *h;
  struct fleece_plan *p;
  g_autofree char *secret = NULL, *text = NULL;
  json_object *rec, *objs;

  ck_assert_int_eq (fleece_storage_set_option (st, "mon_host", _i ? ceph->mon_v2 : ceph->mon_v1), 0);
  if (_i == 0)
    ck_assert_int_eq (fleece_storage_set_option (st, "key", ceph->admin_key), 0);
  else
    ck_assert_int_eq (fleece_storage_set_option (st, "keyring", ceph->keyring), 0);
  h = rbd_handle (vm, vm->q->qmp_path, st, log);
  p = tl_plan (h, log);
  ck_assert_msg (fleece_attach (h, p, 0) == 0, "%s\n%s", fleece_get_error (), log->str);

  rec = record_of (h);
  secret = g_strdup_printf ("fleece-%.8s-rbd-key", json_object_get_string (jget (rec, "run")));
  objs = jget (rec, "qemu-objects");
  ck_assert_msg (objs && json_object_array_length (objs) == 1 &&
                 g_strcmp0 (json_object_get_string (json_object_array_get_idx (objs, 0)),
                            secret) == 0, "%s", json_object_to_json_string (rec));
  json_object_put (rec);
  text = fleece_get_record (h);
  ck_assert_msg (!strstr (text, ceph->admin_key), "the key is in the record");
  ck_assert_msg (has_object (vm->q, secret), "no object %s in QEMU", secret);

  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  ck_assert_msg (tl_wait_end (h, 250) == 1, "%s\n%s", fleece_get_error (), log->str);
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  ck_assert_msg (!has_object (vm->q, secret), "object %s left in QEMU", secret);
  tl_assert_nothing_left (vm, VMID);
  tl_assert_graph_unchanged (vm);
  assert_pool_empty (NULL);
  tl_check_point_in_time (vm, pit, vm->target, "raw");

  tl_vm_snapshot_free (vm, pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  g_string_free (log, TRUE);
  tl_vm_stop (vm);
}
END_TEST

/* ---- 7. Proxmox's patched QEMU ------------------------------------------ */

/* A VM of disks d on the patched QEMU at path qemu (NULL: not there, the
 * test is skipped saying so); *has_rbd: whether that build has the rbd
 * driver (its schema lists rbd either way: only opening a node tells). */
static TlVm *
pve_vm_start (const char *qemu, const char *var, const char *tag, const TlDisk *d,
              size_t n, bool *has_rbd)
{
  const char *const fw[] = { "-L", "/usr/share/seabios", "-L", "/usr/lib/ipxe/qemu",
                             "-L", "/usr/share/qemu", NULL };
  g_autofree char *old = g_strdup (g_getenv ("FLEECE_QEMU"));
  g_autofree char *qerr = NULL;
  TlVm *vm;

  if (!qemu || !g_file_test (qemu, G_FILE_TEST_IS_EXECUTABLE)) {
    fprintf (stderr, "%s: skipped: %s does not name Proxmox's qemu-system-x86_64\n",
             tag, var);
    return NULL;
  }
  vm = tl_vm_new (tag, d, n, 71);
  g_setenv ("FLEECE_QEMU", qemu, TRUE);
  tl_vm_start (vm, fw);
  if (old)
    g_setenv ("FLEECE_QEMU", old, TRUE);
  else
    g_unsetenv ("FLEECE_QEMU");
  ck_assert_ptr_null (tl_qmp_try (vm->q, "blockdev-add", tl_json (
      "{\"driver\": \"rbd\", \"node-name\": \"probe\", \"pool\": \"p\", "
      "\"image\": \"i\", \"conf\": \"/nonexistent/ceph.conf\"}"), &qerr));
  *has_rbd = !strstr (qerr, "Unknown driver 'rbd'");
  return vm;
}

/* The patched QEMU as the kit builds it, without rbd: the plan says so
 * before anything is made. */
START_TEST (test_pve_qemu_without_rbd)
{
  static const TlDisk one[] = { { "scsi0", "raw", 4 * MiB, "scsi", true } };
  GString *log;
  TlVm *vm;
  struct fleece_handle *h;
  bool has_rbd = false;

  if (!(vm = pve_vm_start (g_getenv ("FLEECE_PVE_QEMU"), "FLEECE_PVE_QEMU", "rbdpve",
                           one, 1, &has_rbd)))
    return;
  if (has_rbd) {
    /* a pve-qemu with rbd, as Proxmox ships it, makes this test say nothing */
    fprintf (stderr, "test_pve_qemu_without_rbd: skipped: FLEECE_PVE_QEMU has the "
             "rbd driver\n");
    tl_vm_stop (vm);
    return;
  }
  log = g_string_new (NULL);
  h = rbd_handle (vm, vm->q->qmp_path, conf_storage (ceph->pool, NULL), log);
  ck_assert_int_eq (fleece_set_engine (h, FLEECE_ENGINE_PVE), 0);
  ck_assert_ptr_null (fleece_plan (h));
  ck_assert_int_eq (fleece_get_errno (), ENOTSUP);
  ck_assert_msg (strstr (fleece_get_error (), "has no rbd block driver"), "%s",
                 fleece_get_error ());
  tl_assert_nothing_left (vm, VMID);
  assert_pool_empty (NULL);
  fleece_free (h);
  g_string_free (log, TRUE);
  tl_vm_stop (vm);
}
END_TEST

/* The Proxmox engine on a patched QEMU with rbd (as Proxmox ships it):
 * the fleecing images are in the pool while QEMU's own backup job writes
 * a VMA, the guest overwrites data ahead of it, the VMA extracts to the
 * point in time, and nothing is left in QEMU or the pool. */
START_TEST (test_pve_point_in_time)
{
  const char *qemu = g_getenv ("FLEECE_PVE_QEMU_RBD");
  const char *var = "FLEECE_PVE_QEMU_RBD";
  GString *log = NULL;
  TlVm *vm;
  struct fleece_handle *h;
  struct fleece_plan *p;
  struct fleece_target *t;
  g_autoptr (FleeceRbd) r = inspector (NULL);
  g_autofree char *names = NULL, *drv = NULL, *vma = NULL, *args = NULL;
  g_autofree char *bindir = NULL, *vma_bin = NULL, *ex = NULL, *out = NULL;
  guint8 **pit;
  bool has_rbd = false;
  int status = 0;

  if (!qemu || !*qemu) {      /* a Proxmox host's QEMU has rbd */
    qemu = g_getenv ("FLEECE_PVE_QEMU");
    var = "FLEECE_PVE_QEMU_RBD (or FLEECE_PVE_QEMU)";
  }
  if (!(vm = pve_vm_start (qemu, var, "rbdpvepit", disks, NDISKS, &has_rbd)))
    return;
  if (!has_rbd) {
    fprintf (stderr, "test_pve_point_in_time: skipped: %s was built without the rbd "
             "driver; set FLEECE_PVE_QEMU_RBD to one with it\n", qemu);
    tl_vm_stop (vm);
    return;
  }
  log = g_string_new (NULL);
  h = rbd_handle (vm, vm->q->qmp_path, conf_storage (ceph->pool, NULL), log);
  ck_assert_int_eq (fleece_get_engine (h), FLEECE_ENGINE_PVE);
  ck_assert_int_eq (fleece_set_bwlimit (h, 4096), 0);
  p = tl_plan (h, log);
  ck_assert_str_eq (fleece_plan_get_image (p, 0), "vm-100-fleece-0");
  ck_assert_str_eq (fleece_plan_get_format (p, 1), "raw");
  ck_assert_msg (fleece_attach (h, p, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  names = pool_images (r);
  ck_assert_str_eq (names, "vm-100-fleece-0,vm-100-fleece-1");
  assert_images_recorded (h, p, r);
  /* qemu-server's names: the format node <device>-fleecing */
  drv = node_driver (vm->q, "drive-scsi0-fleecing");
  ck_assert_msg (g_strcmp0 (drv, "raw") == 0, "drive-scsi0-fleecing: driver %s", drv);

  pit = tl_vm_snapshot (vm);
  vma = g_build_filename (vm->target, "backup.vma", NULL);
  args = g_strdup_printf ("{\"backup-file\": \"%s\", \"format\": \"vma\"}", vma);
  ck_assert_ptr_nonnull (t = fleece_target_new_pve (args));
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  tl_guest_io (vm->q, "scsi0", "write -P 0xee 8M 8M");
  tl_vm_overwrite_tail (vm, 0xee);
  ck_assert_msg (tl_wait_end (h, 250) == 1, "%s\n%s", fleece_get_error (), log->str);
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  tl_assert_nothing_left (vm, VMID);
  tl_assert_graph_unchanged (vm);
  assert_pool_empty (NULL);
  assert_guest_data (vm, "scsi0", 0xee, 8 * MiB, 8 * MiB);

  bindir = g_path_get_dirname (qemu);
  vma_bin = g_build_filename (bindir, "vma", NULL);
  ex = g_build_filename (vm->target, "ex", NULL);
  {
    const char *argv[] = { vma_bin, "extract", vma, ex, NULL };
    ck_assert (g_spawn_sync (NULL, (char **) argv, NULL, G_SPAWN_STDERR_TO_DEV_NULL, NULL,
                             NULL, &out, NULL, &status, NULL));
    ck_assert_msg (WIFEXITED (status) && WEXITSTATUS (status) == 0, "vma extract: %s", out);
  }
  for (size_t i = 0; i < NDISKS; i++) {
    g_autofree char *name = g_strdup_printf ("disk-drive-%s.raw", disks[i].key);
    g_autofree char *path = g_build_filename (ex, name, NULL);
    tl_assert_image_equals (path, "raw", pit[i], disks[i].size, name);
  }

  tl_vm_snapshot_free (vm, pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  g_string_free (log, TRUE);
  tl_vm_stop (vm);
}
END_TEST

/* ---- 8. the fleece command ------------------------------------------------ */

static const char *fleece_exe;

/* fleece backup --fleecing-storage rbd:POOL --rbd-conf --rbd-id --json: the
 * images are in the pool while it runs, the backup holds the point in
 * time, and the command leaves nothing in QEMU or the pool. */
START_TEST (test_cli_backup)
{
  TlVm *vm = vm_start ("rbdcli", disks, NDISKS, 81);
  g_autoptr (FleeceRbd) r = inspector (NULL);
  g_autofree char *storage = g_strdup_printf ("rbd:%s", ceph->pool);
  const char *argv[] = { fleece_exe, "backup", "--qmp", vm->q->qmp_path, "--vmid", "100",
                         "--fleecing-storage", storage, "--rbd-conf", ceph->conf,
                         "--rbd-id", "admin", "--target-dir", vm->target,
                         "--state-dir", vm->state, "--bwlimit", "4096", "--json", NULL };
  guint8 **pit = tl_vm_snapshot (vm);
  g_autofree char *during = NULL, *err = NULL;
  GString *out = g_string_new (NULL);
  GIOChannel *o, *e;
  g_auto (GStrv) lines = NULL;
  json_object *result, *drives;
  GPid pid;
  int outfd, errfd, status;

  if (!fleece_exe) {
    fprintf (stderr, "test_cli_backup: skipped: no fleece command given\n");
    tl_vm_snapshot_free (vm, pit);
    tl_vm_stop (vm);
    return;
  }
  ck_assert (g_spawn_async_with_pipes (NULL, (char **) argv, NULL, G_SPAWN_DO_NOT_REAP_CHILD,
                                       NULL, NULL, &pid, NULL, &outfd, &errfd, NULL));
  o = g_io_channel_unix_new (outfd);
  e = g_io_channel_unix_new (errfd);
  g_io_channel_set_close_on_unref (o, TRUE);
  g_io_channel_set_close_on_unref (e, TRUE);
  /* the point in time: the "started" event (4 MiB/s: the 24 MiB disk
   * then takes 6 s); the images are in the pool by then */
  for (;;) {
    g_autofree char *line = NULL;
    ck_assert_msg (g_io_channel_read_line (o, &line, NULL, NULL, NULL) == G_IO_STATUS_NORMAL,
                   "fleece ended before it started the backup");
    g_string_append (out, line);
    if (strstr (line, "\"event\":\"started\""))
      break;
  }
  during = pool_images (r);
  tl_vm_overwrite_tail (vm, 0xee);
  {
    g_autofree char *rest = NULL;
    ck_assert (g_io_channel_read_to_end (o, &rest, NULL, NULL) == G_IO_STATUS_NORMAL);
    ck_assert (g_io_channel_read_to_end (e, &err, NULL, NULL) == G_IO_STATUS_NORMAL);
    g_string_append (out, rest);
  }
  g_io_channel_unref (o);
  g_io_channel_unref (e);
  ck_assert_int_eq (waitpid (pid, &status, 0), pid);
  g_spawn_close_pid (pid);
  ck_assert_msg (WIFEXITED (status) && WEXITSTATUS (status) == 0, "status %d\n%s\n%s",
                 status, out->str, err);
  ck_assert_str_eq (during, "vm-100-fleece-0,vm-100-fleece-1");

  lines = g_strsplit (g_strstrip (out->str), "\n", -1);
  result = json_tokener_parse (lines[g_strv_length (lines) - 1]);
  ck_assert_msg (result != NULL, "%s", out->str);
  ck_assert_str_eq (json_object_get_string (jget (result, "result")), "ok");
  ck_assert_str_eq (json_object_get_string (jget (result, "cleanup")), "ok");
  drives = jget (result, "drives");
  ck_assert_uint_eq (json_object_array_length (drives), NDISKS);
  for (size_t i = 0; i < NDISKS; i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    g_autofree char *image = g_strdup_printf ("vm-100-fleece-%zu", i);
    ck_assert_str_eq (json_object_get_string (jget (d, "key")), disks[i].key);
    ck_assert_str_eq (json_object_get_string (jget (d, "image")), image);
    ck_assert_str_eq (json_object_get_string (jget (d, "result")), "ok");
  }
  json_object_put (result);
  tl_assert_nothing_left (vm, VMID);
  tl_assert_graph_unchanged (vm);
  assert_pool_empty (NULL);
  tl_check_point_in_time (vm, pit, vm->target, "raw");

  g_string_free (out, TRUE);
  tl_vm_snapshot_free (vm, pit);
  tl_vm_stop (vm);
}
END_TEST

/* ---- the runner --------------------------------------------------------- */

static Suite *
rbd_backup_suite (void)
{
  Suite *s = suite_create ("rbd-backup");
  TCase *tc = tcase_create ("backup");
  TCase *full = tcase_create ("full");

  tcase_set_timeout (tc, 300);
  ADD (tc, test_point_in_time);
  ADD_LOOP (tc, test_crash_then_cleanup, 3);
  ADD (tc, test_existing_image_untouched);
  ADD (tc, test_cleanup_other_storage);
  ADD_LOOP (tc, test_key_secret, 2);
  ADD (tc, test_pve_qemu_without_rbd);
  ADD (tc, test_pve_point_in_time);
  ADD (tc, test_cli_backup);
  suite_add_tcase (s, tc);
  /* Its own case, last: the ratios are restored (in the runner) even if
   * it fails. */
  tcase_set_timeout (full, 300);
  tcase_add_unchecked_fixture (full, NULL, full_teardown);
  ADD (full, test_full_pool);
  suite_add_tcase (s, full);
  return s;
}

int
main (int argc, char **argv)
{
  SRunner *sr;
  int failed;

  fleece_exe = argc > 1 ? argv[1] : NULL;
  tl_ceph_require ();
  ceph = tl_ceph_start ("backup", NULL);
  /* The OSD reports its usage (and so being full) within a second. */
  tl_ceph_osd_config (ceph, "osd_mon_report_interval", "1");
  tl_ceph_osd_config (ceph, "osd_heartbeat_interval", "1");
  sr = srunner_create (rbd_backup_suite ());
  srunner_run_all (sr, CK_NORMAL);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  tl_ceph_stop (ceph);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
