/* Callback storages QEMU reaches by the storage's own definition (issue 14):
 * images that are NBD exports of a qemu-storage-daemon (a network block
 * store, as RBD is: the blockdev callback gives QEMU {"driver": "nbd",
 * ...}), and images that are loop block devices (the path callback gives a
 * device: the library attaches it as host_device).  Stock engine on stock
 * QEMU; the Proxmox engine on the patched QEMU when $FLEECE_PVE_QEMU names
 * one.  Checked: the node QEMU built, the point-in-time bytes while the
 * guest overwrites data ahead of the backup, discard reaching the store,
 * and nothing left in QEMU, the store or the record. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <check.h>
#include <glib/gstdio.h>

#include "internal.h"
#include "testlib.h"

#define VMID 100
#define MiB (1024 * 1024)

static const TlDisk disks[] = {
  { "scsi0", "raw", 16 * MiB, "scsi", true },
  { "virtio0", "qcow2", 8 * MiB, "virtio", true },
};

/* ---- a qemu-storage-daemon exporting images over NBD ----------------- */

typedef struct {
  char *dir;              /* images and sockets */
  char *nbd;              /* the NBD server's socket */
  GPid pid;
  FleeceQmp *q;
  unsigned allocs, removes;
} Qsd;

static void
qsd_start (Qsd *s, const char *dir)
{
  g_autofree char *qmp = g_build_filename (dir, "qsd-qmp.sock", NULL);
  g_autofree char *chardev = g_strdup_printf ("socket,path=%s,server=on,wait=off,id=m", qmp);
  g_autofree char *srv = NULL;
  g_autoptr (GError) err = NULL;
  const char *bin = g_getenv ("FLEECE_QSD") ? g_getenv ("FLEECE_QSD") : "qemu-storage-daemon";

  s->dir = g_strdup (dir);
  s->nbd = g_build_filename (dir, "qsd-nbd.sock", NULL);
  srv = g_strdup_printf ("addr.type=unix,addr.path=%s", s->nbd);
  {
    const char *argv[] = { bin, "--chardev", chardev, "--monitor", "chardev=m",
                           "--nbd-server", srv, NULL };
    ck_assert_msg (g_spawn_async (NULL, (char **) argv, NULL,
                                  G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD,
                                  NULL, NULL, &s->pid, &err), "%s", err->message);
  }
  s->q = fleece_qmp_new ();
  for (int i = 0; i < 100 && !fleece_qmp_connect_unix (s->q, qmp, NULL); i++)
    g_usleep (100 * 1000);
  ck_assert_msg (fleece_qmp_is_connected (s->q), "qemu-storage-daemon did not come up");
}

static void
qsd_stop (Qsd *s)
{
  fleece_qmp_free (s->q);
  kill (s->pid, SIGTERM);
  waitpid (s->pid, NULL, 0);
  g_spawn_close_pid (s->pid);
  g_free (s->dir);
  g_free (s->nbd);
}

static char *
image_file (Qsd *s, const char *name)
{
  g_autofree char *base = g_strdup_printf ("%s.img", name);
  return g_build_filename (s->dir, base, NULL);
}

/* A new empty file of size bytes at path, or false and *reason. */
static bool
new_sparse_file (const char *path, uint64_t size, char **reason)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);

  if (fd < 0 || ftruncate (fd, (off_t) size) != 0) {
    *reason = strdup (g_strerror (errno));
    if (fd >= 0)
      close (fd);
    return false;
  }
  close (fd);
  return true;
}

static json_object *
qsd_do (Qsd *s, const char *cmd, json_object *args, char **reason)
{
  g_autoptr (GError) err = NULL;
  json_object *r = fleece_qmp_execute (s->q, cmd, args, &err);

  if (!r && reason)
    *reason = strdup (err->message);
  return r;
}

/* A new raw image file exported as <name> (the volid). */
static int
qsd_alloc (void *user_data, const char *name, const char *format,
           uint64_t size, char **volid, char **reason)
{
  Qsd *s = user_data;
  g_autofree char *path = image_file (s, name);
  json_object *r;

  if (strcmp (format, "raw") != 0) {
    *reason = strdup ("this store holds raw images only");
    return -1;
  }
  if (!new_sparse_file (path, size, reason))
    return -1;
  r = qsd_do (s, "blockdev-add", tl_json ("{\"driver\": \"raw\", \"node-name\": \"%s\", "
                                         "\"discard\": \"unmap\", \"file\": {\"driver\": "
                                         "\"file\", \"filename\": \"%s\", \"discard\": "
                                         "\"unmap\"}}", name, path), reason);
  if (!r)
    return -1;
  json_object_put (r);
  r = qsd_do (s, "block-export-add", tl_json ("{\"type\": \"nbd\", \"id\": \"%s\", "
                                             "\"node-name\": \"%s\", \"writable\": "
                                             "true, \"name\": \"%s\"}", name, name, name),
              reason);
  if (!r)
    return -1;
  json_object_put (r);
  s->allocs++;
  *volid = strdup (name);
  return 0;
}

static int
qsd_remove (void *user_data, const char *volid, char **reason)
{
  Qsd *s = user_data;
  g_autofree char *path = image_file (s, volid);
  json_object *r;

  /* The export goes once its client (QEMU) has let go. */
  r = qsd_do (s, "block-export-del", tl_json ("{\"id\": \"%s\"}", volid), NULL);
  if (r)
    json_object_put (r);
  for (int i = 0; i < 100; i++) {
    if ((r = qsd_do (s, "blockdev-del", tl_json ("{\"node-name\": \"%s\"}", volid), NULL)))
      break;
    g_usleep (50 * 1000);
  }
  if (!r && g_file_test (path, G_FILE_TEST_EXISTS)) {
    *reason = strdup ("the export's node is still in use");
    return -1;
  }
  if (r)
    json_object_put (r);
  unlink (path);
  s->removes++;
  return 0;
}

static char *
qsd_blockdev (void *user_data, const char *volid, char **reason)
{
  Qsd *s = user_data;

  return g_strdup_printf ("{\"driver\": \"nbd\", \"server\": {\"type\": \"unix\", "
                          "\"path\": \"%s\"}, \"export\": \"%s\"}", s->nbd, volid);
}

static struct fleece_storage *
qsd_storage (Qsd *s)
{
  struct fleece_storage *st = fleece_storage_new_callback ("qsd:test", FLEECE_STORAGE_DISCARD,
                                                           s, NULL);

  ck_assert_ptr_nonnull (st);
  ck_assert_int_eq (fleece_storage_set_alloc_callback (st, qsd_alloc), 0);
  ck_assert_int_eq (fleece_storage_set_remove_callback (st, qsd_remove), 0);
  ck_assert_int_eq (fleece_storage_set_blockdev_callback (st, qsd_blockdev), 0);
  return st;
}

/* ---- loop block devices ------------------------------------------------ */

typedef struct {
  char *dir;
  GHashTable *files;      /* /dev/loopN -> backing file */
} Loops;

static char *
run_out (const char *const *argv, char **reason)
{
  g_autofree char *out = NULL;
  g_autofree char *errout = NULL;
  int status = 0;

  if (!g_spawn_sync (NULL, (char **) argv, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL,
                     &out, &errout, &status, NULL) ||
      !WIFEXITED (status) || WEXITSTATUS (status) != 0) {
    if (reason)
      *reason = strdup (errout && *errout ? g_strstrip (errout) : "failed");
    return NULL;
  }
  return g_strdup (g_strstrip (out));
}

static int
loop_alloc (void *user_data, const char *name, const char *format,
            uint64_t size, char **volid, char **reason)
{
  Loops *l = user_data;
  g_autofree char *path = g_build_filename (l->dir, name, NULL);
  char *dev;

  if (!new_sparse_file (path, size, reason))
    return -1;
  {
    const char *argv[] = { "losetup", "-f", "--show", path, NULL };
    if (!(dev = run_out (argv, reason)))
      return -1;
  }
  g_hash_table_insert (l->files, g_strdup (dev), g_steal_pointer (&path));
  *volid = strdup (dev);
  g_free (dev);
  return 0;
}

static int
loop_remove (void *user_data, const char *volid, char **reason)
{
  Loops *l = user_data;
  const char *path = g_hash_table_lookup (l->files, volid);
  const char *argv[] = { "losetup", "-d", volid, NULL };
  g_autofree char *out = NULL;

  if (!path)
    return 0;
  if (!(out = run_out (argv, reason)))
    return -1;
  unlink (path);
  g_hash_table_remove (l->files, volid);
  return 0;
}

static char *
loop_path (void *user_data, const char *volid, char **reason)
{
  return strdup (volid);
}

static bool
loops_available (void)
{
  const char *argv[] = { "losetup", "-f", NULL };
  g_autofree char *dev = run_out (argv, NULL);

  return geteuid () == 0 && dev != NULL && g_file_test ("/dev/loop-control", G_FILE_TEST_EXISTS);
}

/* ---- the backup ------------------------------------------------------------ */

/* The driver of the node QEMU made for key's fleecing image. */
static char *
image_driver (TlQemu *q, const char *node)
{
  g_autoptr (json_object) nodes = tl_qmp (q, "query-named-block-nodes",
                                          tl_json ("{\"flat\": true}"));

  for (size_t i = 0; i < json_object_array_length (nodes); i++) {
    json_object *n = json_object_array_get_idx (nodes, i), *v;

    if (json_object_object_get_ex (n, "node-name", &v) &&
        strcmp (json_object_get_string (v), node) == 0 &&
        json_object_object_get_ex (n, "drv", &v))
      return g_strdup (json_object_get_string (v));
  }
  return NULL;
}

/* Attach, check QEMU reaches the images through driver, start a throttled
 * backup into the VM's directory target, overwrite data ahead of it, and
 * check the backup is the point in time. */
static void
backup_through (TlVm *vm, struct fleece_storage *st, const char *driver)
{
  g_autoptr (GString) log = g_string_new (NULL);
  struct fleece_handle *h = tl_handle (vm, VMID, log);
  struct fleece_plan *p;
  struct fleece_target *t;
  guint8 **pit;

  ck_assert_int_eq (fleece_set_storage (h, st), 0);
  ck_assert_int_eq (fleece_set_bwlimit (h, 2048), 0);
  p = tl_plan (h, log);
  ck_assert_msg (fleece_attach (h, p, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  for (size_t i = 0; i < G_N_ELEMENTS (disks); i++) {
    g_autofree char *node = g_strdup_printf ("%s-fleecing-file", disks[i].key);
    g_autofree char *drv = image_driver (vm->q, node);

    ck_assert_msg (g_strcmp0 (drv, driver) == 0, "%s is %s, not %s", node,
                   drv ? drv : "missing", driver);
  }
  pit = tl_vm_snapshot (vm);
  ck_assert_ptr_nonnull (t = fleece_target_new_dir (vm->target, "raw"));
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  tl_vm_overwrite_tail (vm, 0x5c);
  ck_assert_msg (tl_wait_end (h, 1000) == 1, "%s\n%s", fleece_get_error (), log->str);
  tl_check_point_in_time (vm, pit, vm->target, "raw");
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  tl_vm_snapshot_free (vm, pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  tl_assert_nothing_left (vm, VMID);
}

START_TEST (test_nbd_exports)
{
  TlVm *vm = tl_vm_new ("bd-nbd", disks, G_N_ELEMENTS (disks), 1);
  g_autofree char *store = g_build_filename (vm->dir, "store", NULL);
  g_autoptr (json_object) exports = NULL;
  g_autoptr (json_object) nodes = NULL;
  g_auto (GStrv) left = NULL;
  Qsd s = { 0 };

  ck_assert (g_mkdir (store, 0700) == 0);
  qsd_start (&s, store);
  tl_vm_start (vm, NULL);
  backup_through (vm, qsd_storage (&s), "nbd");
  ck_assert_uint_eq (s.allocs, 2);
  ck_assert_uint_eq (s.removes, 2);
  /* The store's exports and nodes are gone, not only its files. */
  exports = qsd_do (&s, "query-block-exports", NULL, NULL);
  ck_assert_ptr_nonnull (exports);
  ck_assert_uint_eq (json_object_array_length (exports), 0);
  nodes = qsd_do (&s, "query-named-block-nodes", NULL, NULL);
  ck_assert_ptr_nonnull (nodes);
  ck_assert_uint_eq (json_object_array_length (nodes), 0);
  left = tl_list_dir (store);
  for (char **f = left; *f; f++)
    ck_assert_msg (!g_str_has_suffix (*f, ".img"), "%s left in the store", *f);
  tl_vm_stop (vm);
  qsd_stop (&s);
}
END_TEST

/* Discard goes through NBD to the store: the images the backup drained are
 * nearly empty at its end, though the guest overwrote data meanwhile. */
START_TEST (test_nbd_discard)
{
  TlVm *vm = tl_vm_new ("bd-nbd-discard", disks, 1, 1);
  g_autofree char *store = g_build_filename (vm->dir, "store", NULL);
  g_autofree char *img = NULL;
  g_autoptr (GString) log = g_string_new (NULL);
  struct fleece_handle *h;
  struct fleece_plan *p;
  struct fleece_target *t;
  Qsd s = { 0 };
  uint64_t peak = 0, end;

  ck_assert (g_mkdir (store, 0700) == 0);
  qsd_start (&s, store);
  tl_vm_start (vm, NULL);
  h = tl_handle (vm, VMID, log);
  ck_assert_int_eq (fleece_set_storage (h, qsd_storage (&s)), 0);
  ck_assert_int_eq (fleece_set_bwlimit (h, 2048), 0);
  p = tl_plan (h, log);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  img = image_file (&s, fleece_plan_get_image (p, 0));
  ck_assert_ptr_nonnull (t = fleece_target_new_dir (vm->target, "raw"));
  ck_assert_int_eq (fleece_start (h, p, t, 0), 0);
  /* 4 MiB of old data copied to the image ahead of the job. */
  tl_guest_io (vm->q, tl_disk_qdev (&disks[0]), "write -P 0x33 8M 4M");
  peak = tl_allocated_bytes (img);
  ck_assert_msg (tl_wait_end (h, 1000) == 1, "%s\n%s", fleece_get_error (), log->str);
  end = tl_allocated_bytes (img);
  ck_assert_msg (peak >= 4 * MiB, "the copies did not reach the store (%" G_GUINT64_FORMAT
                 " bytes)", peak);
  ck_assert_msg (end <= MiB, "discard did not reach the store: %" G_GUINT64_FORMAT
                 " bytes left of %" G_GUINT64_FORMAT, end, peak);
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  tl_assert_nothing_left (vm, VMID);
  tl_vm_stop (vm);
  qsd_stop (&s);
}
END_TEST

START_TEST (test_loop_devices)
{
  TlVm *vm;
  Loops l = { 0 };
  struct fleece_storage *st;

  if (!loops_available ()) {
    printf ("SKIP test_loop_devices: no loop devices on this machine\n");
    return;
  }
  vm = tl_vm_new ("bd-loop", disks, G_N_ELEMENTS (disks), 1);
  l.dir = g_build_filename (vm->dir, "loops", NULL);
  l.files = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  ck_assert (g_mkdir (l.dir, 0700) == 0);
  st = fleece_storage_new_callback ("loop:test", FLEECE_STORAGE_DISCARD, &l, NULL);
  ck_assert_int_eq (fleece_storage_set_alloc_callback (st, loop_alloc), 0);
  ck_assert_int_eq (fleece_storage_set_remove_callback (st, loop_remove), 0);
  ck_assert_int_eq (fleece_storage_set_path_callback (st, loop_path), 0);
  tl_vm_start (vm, NULL);
  backup_through (vm, st, "host_device");
  ck_assert_uint_eq (g_hash_table_size (l.files), 0);
  tl_vm_stop (vm);
  g_hash_table_unref (l.files);
  g_free (l.dir);
}
END_TEST

/* The Proxmox engine takes the same definitions: a VMA of a VM whose
 * fleecing images are NBD exports extracts to the point in time. */
START_TEST (test_pve_nbd_exports)
{
  const char *pve = g_getenv ("FLEECE_PVE_QEMU");
  static const char *const fw[] = {
    "-L", "/usr/share/seabios", "-L", "/usr/lib/ipxe/qemu", "-L", "/usr/share/qemu", NULL
  };
  g_autofree char *store = NULL, *vma = NULL, *args = NULL, *out = NULL, *bindir = NULL;
  g_autofree char *vma_bin = NULL, *ex = NULL;
  g_autoptr (GString) log = g_string_new (NULL);
  struct fleece_handle *h;
  struct fleece_plan *p;
  struct fleece_target *t;
  TlVm *vm;
  Qsd s = { 0 };
  guint8 **pit;
  int status = 0;

  if (!pve || !g_file_test (pve, G_FILE_TEST_IS_EXECUTABLE)) {
    printf ("SKIP test_pve_nbd_exports: set FLEECE_PVE_QEMU to Proxmox's "
            "patched qemu-system-x86_64\n");
    return;
  }
  g_setenv ("FLEECE_QEMU", pve, TRUE);
  vm = tl_vm_new ("bd-pve", disks, G_N_ELEMENTS (disks), 1);
  store = g_build_filename (vm->dir, "store", NULL);
  ck_assert (g_mkdir (store, 0700) == 0);
  qsd_start (&s, store);
  tl_vm_start (vm, fw);
  h = tl_handle (vm, VMID, log);
  ck_assert_int_eq (fleece_get_engine (h), FLEECE_ENGINE_PVE);
  ck_assert_int_eq (fleece_set_storage (h, qsd_storage (&s)), 0);
  ck_assert_int_eq (fleece_set_bwlimit (h, 2048), 0);
  p = tl_plan (h, log);
  ck_assert_msg (fleece_attach (h, p, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  pit = tl_vm_snapshot (vm);
  vma = g_build_filename (vm->target, "backup.vma", NULL);
  args = g_strdup_printf ("{\"backup-file\": \"%s\", \"format\": \"vma\"}", vma);
  ck_assert_ptr_nonnull (t = fleece_target_new_pve (args));
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  tl_vm_overwrite_tail (vm, 0x6d);
  ck_assert_msg (tl_wait_end (h, 1000) == 1, "%s\n%s", fleece_get_error (), log->str);
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  bindir = g_path_get_dirname (pve);
  vma_bin = g_build_filename (bindir, "vma", NULL);
  ex = g_build_filename (vm->target, "ex", NULL);
  {
    const char *argv[] = { vma_bin, "extract", vma, ex, NULL };
    ck_assert (g_spawn_sync (NULL, (char **) argv, NULL, 0, NULL, NULL, &out, NULL,
                             &status, NULL));
    ck_assert_msg (WIFEXITED (status) && WEXITSTATUS (status) == 0, "vma extract: %s", out);
  }
  for (size_t i = 0; i < G_N_ELEMENTS (disks); i++) {
    g_autofree char *name = g_strdup_printf ("disk-drive-%s.raw", disks[i].key);
    g_autofree char *path = g_build_filename (ex, name, NULL);
    tl_assert_image_equals (path, "raw", pit[i], disks[i].size, name);
  }
  ck_assert_uint_eq (s.removes, 2);
  tl_vm_snapshot_free (vm, pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  tl_assert_nothing_left (vm, VMID);
  tl_vm_stop (vm);
  qsd_stop (&s);
}
END_TEST

int
main (void)
{
  Suite *s = suite_create ("blockdev-storage");
  TCase *tc = tcase_create ("core");
  SRunner *sr;
  int failed;

  tcase_set_timeout (tc, 300);
  tcase_add_test (tc, test_nbd_exports);
  tcase_add_test (tc, test_nbd_discard);
  tcase_add_test (tc, test_loop_devices);
  tcase_add_test (tc, test_pve_nbd_exports);
  suite_add_tcase (s, tc);
  sr = srunner_create (s);
  srunner_run_all (sr, CK_NORMAL);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  return failed ? 1 : 0;
}
