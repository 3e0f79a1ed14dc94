/* The stock-QEMU engine end to end on a real QEMU (no guest OS): a VM shaped
 * like a Proxmox one, a slowed backup, guest writes ahead of the backup
 * cursor through the devices, and checks of the bytes backed up, the nodes
 * left in QEMU and the files left in the storage. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <check.h>
#include <glib/gstdio.h>

#include "testlib.h"
#include "fleece/fleece.h"

#define MiB (1024 * 1024)
#define VMID 100

/* Proxmox-like: SCSI disks on virtio-scsi, a virtio-blk disk, an EFI disk
 * and a TPM state (the last two never fleeced), qcow2 and raw sources, an
 * odd size. */
static const TlDisk disks[] = {
  { "efidisk0", "raw", 528 * 1024, "virtio", false },
  { "scsi0", "qcow2", 16 * MiB, "scsi", true },
  { "scsi1", "raw", 8 * MiB + 4096, "scsi", true },
  { "tpmstate0", "raw", 4 * MiB, "virtio", false },
  { "virtio0", "raw", 8 * MiB, "virtio", true },
};
#define NDISKS G_N_ELEMENTS (disks)

typedef struct {
  TlVm *tl;            /* QEMU, disks, storage, target, state */
  GString *log;
} Vm;

static void
log_cb (void *opaque, int level, const char *msg)
{
  g_string_append_printf (opaque, "[%d] %s\n", level, msg);
}

static Vm *
vm_start_with (const char *extra_qmp);

static Vm *
vm_start (void)
{
  return vm_start_with (NULL);
}

static Vm *
vm_start_with (const char *extra_qmp)
{
  Vm *vm = g_new0 (Vm, 1);
  g_autofree char *opt = NULL;
  const char *extra[] = { "-qmp", NULL, NULL };

  vm->tl = tl_vm_new ("disks", disks, NDISKS, 1);
  /* A QMP monitor serves one client at a time: a second handle needs its
   * own. */
  if (extra_qmp)
    extra[1] = opt = g_strdup_printf ("unix:%s/%s,server=on,wait=off", vm->tl->dir, extra_qmp);
  tl_vm_start (vm->tl, extra_qmp ? extra : NULL);
  vm->log = g_string_new (NULL);
  return vm;
}

static void
vm_stop (Vm *vm)
{
  tl_vm_stop (vm->tl);
  g_string_free (vm->log, TRUE);
  g_free (vm);
}

static struct fleece_handle *
vm_handle_on (Vm *vm, const char *qmp_path)
{
  struct fleece_handle *h = fleece_new ();

  ck_assert_ptr_nonnull (h);
  fleece_set_log_callback (h, log_cb, vm->log);
  ck_assert_int_eq (fleece_set_state_dir (h, vm->tl->state), 0);
  ck_assert_int_eq (fleece_set_vmid (h, VMID), 0);
  ck_assert_msg (fleece_connect (h, qmp_path) == 0, "%s", fleece_get_error ());
  ck_assert_int_eq (fleece_get_engine (h), FLEECE_ENGINE_QEMU);
  ck_assert_int_eq (fleece_set_storage (h, fleece_storage_new_dir (vm->tl->storage)), 0);
  return h;
}

static struct fleece_handle *
vm_handle (Vm *vm)
{
  return vm_handle_on (vm, vm->tl->q->qmp_path);
}

/* Overwrite the last 1 MiB of every disk (or all of a small one) through
 * the guest device: ahead of the backup cursor, which starts at 0. */
static uint64_t
overwrite_tail (Vm *vm, unsigned pattern)
{
  uint64_t total = 0;

  for (size_t i = 0; i < NDISKS; i++) {
    uint64_t len = MIN ((uint64_t) MiB, disks[i].size / 2);
    uint64_t off = (disks[i].size - len) & ~(uint64_t) 4095;
    g_autofree char *cmd = NULL;

    len = disks[i].size - off;
    cmd = g_strdup_printf ("write -P 0x%02x %" G_GUINT64_FORMAT " %" G_GUINT64_FORMAT,
                           pattern, off, len);
    tl_guest_io (vm->tl->q, tl_disk_qdev (&disks[i]), cmd);
    total += len;
  }
  return total;
}

static void
assert_backup_equals (Vm *vm, const char *format, guint8 **pit)
{
  for (size_t i = 0; i < NDISKS; i++) {
    g_autofree char *name = g_strdup_printf ("%s.%s", disks[i].key, format);
    g_autofree char *path = g_build_filename (vm->tl->target, name, NULL);
    uint64_t size = 0;
    g_autofree guint8 *got = tl_read_image (path, format, &size);

    ck_assert_msg (size == disks[i].size, "%s: backup has %" G_GUINT64_FORMAT
                   " bytes, the disk %" G_GUINT64_FORMAT, name, size, disks[i].size);
    ck_assert_msg (memcmp (got, pit[i], size) == 0,
                   "%s: the backup differs from the point-in-time content", name);
  }
}

static void
assert_nothing_left (Vm *vm)
{
  g_auto (GStrv) nodes = tl_node_names (vm->tl->q);
  g_auto (GStrv) files = tl_list_dir (vm->tl->storage);
  g_autofree char *nb = g_strjoinv (",", vm->tl->nodes_before);
  g_autofree char *na = g_strjoinv (",", nodes);
  g_autofree char *record = g_strdup_printf ("%s/%d.json", vm->tl->state, VMID);

  ck_assert_str_eq (na, nb);
  ck_assert_int_eq (tl_job_count (vm->tl->q), 0);
  ck_assert_msg (g_strv_length (files) == 0, "storage not empty: %s", files[0]);
  ck_assert_msg (!g_file_test (record, G_FILE_TEST_EXISTS), "the record is left");
  for (size_t i = 0; i < NDISKS; i++) {
    g_autofree char *root = tl_device_root (vm->tl->q, disks[i].key);

    ck_assert_ptr_nonnull (root);
    ck_assert_msg (strstr (root, "fleece") == NULL, "%s still uses %s", disks[i].key, root);
  }
}

static void
assert_new_data (Vm *vm, unsigned pattern)
{
  for (size_t i = 0; i < NDISKS; i++) {
    uint64_t size = 0;
    g_autofree guint8 *now = tl_read_image (vm->tl->paths[i], disks[i].format, &size);
    ck_assert_uint_eq (now[size - 1], pattern);
  }
}

static struct fleece_plan *
plan_checked (struct fleece_handle *h)
{
  struct fleece_plan *p = fleece_plan (h);
  ck_assert_msg (p != NULL, "%s", fleece_get_error ());
  return p;
}

START_TEST (test_plan_shape)
{
  Vm *vm = vm_start ();
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_plan *p = plan_checked (h);
  g_autofree char *json = NULL;
  const char *restrict_to[] = { "virtio0", "efidisk0", NULL };
  const char *unknown[] = { "scsi7", NULL };

  ck_assert_uint_eq (fleece_plan_get_drive_count (p), NDISKS);
  for (size_t i = 0; i < NDISKS; i++) {
    ck_assert_str_eq (fleece_plan_get_key (p, i), disks[i].key);
    ck_assert_uint_eq (fleece_plan_get_size (p, i), disks[i].size);
    ck_assert_int_eq (fleece_plan_get_fleeced (p, i), disks[i].fleeced);
  }
  /* n counts only fleeced drives, in sorted key order. */
  ck_assert_str_eq (fleece_plan_get_image (p, 1), "vm-100-fleece-0.qcow2");
  ck_assert_str_eq (fleece_plan_get_image (p, 2), "vm-100-fleece-1.qcow2");
  ck_assert_str_eq (fleece_plan_get_image (p, 4), "vm-100-fleece-2.qcow2");
  ck_assert_ptr_null (fleece_plan_get_image (p, 0));
  ck_assert_ptr_nonnull (strstr (fleece_plan_get_reason (p, 0), "EFI disk or TPM state"));
  ck_assert_uint_eq (fleece_plan_get_cluster_size (p, 1), 65536);
  ck_assert_int_eq (fleece_plan_get_fleeced (p, 99), -1);
  ck_assert_ptr_nonnull (strstr (fleece_get_error (), "no drive 99"));
  json = fleece_plan_to_json (p);
  ck_assert_ptr_nonnull (strstr (json, "\"image\":\"vm-100-fleece-2.qcow2\"") ?
                         json : strstr (json, "\"image\": \"vm-100-fleece-2.qcow2\""));
  fleece_plan_free (p);

  /* raw forced; all drives */
  ck_assert_int_eq (fleece_set_image_format (h, "raw"), 0);
  ck_assert_int_eq (fleece_set_plan_flags (h, FLEECE_PLAN_ALL_DRIVES), 0);
  p = plan_checked (h);
  ck_assert_str_eq (fleece_plan_get_image (p, 0), "vm-100-fleece-0.raw");
  ck_assert_str_eq (fleece_plan_get_image (p, 4), "vm-100-fleece-4.raw");
  ck_assert_uint_eq (fleece_plan_get_cluster_size (p, 0), 0);
  fleece_plan_free (p);

  /* restricted */
  ck_assert_int_eq (fleece_set_plan_flags (h, 0), 0);
  ck_assert_int_eq (fleece_set_drives (h, restrict_to), 0);
  p = plan_checked (h);
  ck_assert_uint_eq (fleece_plan_get_drive_count (p), 2);
  ck_assert_str_eq (fleece_plan_get_key (p, 0), "efidisk0");
  ck_assert_str_eq (fleece_plan_get_image (p, 1), "vm-100-fleece-0.raw");
  fleece_plan_free (p);
  ck_assert_int_eq (fleece_set_drives (h, unknown), 0);
  ck_assert_ptr_null (fleece_plan (h));
  ck_assert_ptr_nonnull (strstr (fleece_get_error (),
    "drive 'scsi7' not found; the VM has: efidisk0, scsi0, scsi1, tpmstate0, virtio0"));

  fleece_free (h);
  vm_stop (vm);
}
END_TEST

static json_object *
node_named (json_object *nodes, const char *name)
{
  for (size_t i = 0; i < json_object_array_length (nodes); i++) {
    json_object *n = json_object_array_get_idx (nodes, i), *v;
    if (json_object_object_get_ex (n, "node-name", &v) &&
        strcmp (json_object_get_string (v), name) == 0)
      return n;
  }
  return NULL;
}

static int64_t
json_path_int (json_object *o, const char *a, const char *b)
{
  json_object *x, *y;
  ck_assert (json_object_object_get_ex (o, a, &x));
  ck_assert (json_object_object_get_ex (x, b, &y));
  return json_object_get_int64 (y);
}

/* After attach: the fleecing images QEMU wrote the qcow2 metadata of, each
 * of its drive's exact size with 64 KiB clusters over its own file node,
 * and none of the jobs that wrote them left behind. */
static void
assert_fleecing_images (Vm *vm)
{
  json_object *nodes = tl_qmp (vm->tl->q, "query-named-block-nodes", tl_json ("{\"flat\": true}"));

  for (size_t d = 0; d < NDISKS; d++) {
    g_autofree char *fl = g_strdup_printf ("drive-%s-fleecing", disks[d].key);
    g_autofree char *ff = g_strdup_printf ("%s-fleecing-file", disks[d].key);
    json_object *fln = node_named (nodes, fl), *ffn = node_named (nodes, ff), *v;

    if (!disks[d].fleeced) {
      ck_assert_msg (!fln && !ffn, "%s has fleecing nodes", disks[d].key);
      continue;
    }
    ck_assert_msg (fln && ffn, "%s: fleecing nodes missing", disks[d].key);
    ck_assert (json_object_object_get_ex (fln, "drv", &v));
    ck_assert_str_eq (json_object_get_string (v), "qcow2");
    ck_assert (json_object_object_get_ex (ffn, "drv", &v));
    ck_assert_str_eq (json_object_get_string (v), "file");
    ck_assert_int_eq (json_path_int (fln, "image", "virtual-size"), (int64_t) disks[d].size);
    ck_assert_int_eq (json_path_int (fln, "image", "cluster-size"), 65536);
  }
  json_object_put (nodes);
  ck_assert_int_eq (tl_job_count (vm->tl->q), 0);
}

/* The whole job: a slowed backup of every drive while the guest overwrites
 * what is not backed up yet. */
static void
run_full_backup (const char *target_format)
{
  Vm *vm = vm_start ();
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_plan *p = plan_checked (h);
  struct fleece_target *t = fleece_target_new_dir (vm->tl->target, target_format);
  guint8 **pit = tl_vm_snapshot (vm->tl);
  uint64_t done = 0, total = 0, peak = 0, written;
  int r;

  ck_assert_ptr_nonnull (t);
  /* 2 MiB/s per job: the 16 MiB disk takes ~8 s, time to write ahead. */
  ck_assert_int_eq (fleece_set_bwlimit (h, 2048), 0);
  ck_assert_msg (fleece_attach (h, p) == 0, "%s", fleece_get_error ());
  {
    g_auto (GStrv) files = tl_list_dir (vm->tl->storage);
    g_autofree char *list = g_strjoinv (",", files);
    ck_assert_str_eq (list, "vm-100-fleece-0.qcow2,vm-100-fleece-1.qcow2,vm-100-fleece-2.qcow2");
  }
  assert_fleecing_images (vm);
  ck_assert_msg (fleece_start (h, p, t) == 0, "%s\n%s", fleece_get_error (), vm->log->str);

  written = overwrite_tail (vm, 0xee);
  /* Old data went to the fleecing images. */
  for (int i = 0; i < 3; i++) {
    g_autofree char *name = g_strdup_printf ("vm-100-fleece-%d.qcow2", i);
    g_autofree char *path = g_build_filename (vm->tl->storage, name, NULL);
    peak += tl_allocated_bytes (path);
  }
  ck_assert_msg (peak >= written - 2 * 4096 - 528 * 1024 / 2 - 2 * MiB,
                 "fleecing images hold %" G_GUINT64_FORMAT " bytes, %"
                 G_GUINT64_FORMAT " were overwritten", peak, written);

  while ((r = fleece_wait (h, 500)) == 0) {
    ck_assert_int_eq (fleece_get_progress (h, &done, &total), 0);
    ck_assert_uint_le (done, total);
  }
  ck_assert_msg (r == 1, "%s\n%s", fleece_get_error (), vm->log->str);
  ck_assert_int_eq (fleece_get_progress (h, &done, &total), 0);
  ck_assert_uint_eq (done, total);

  /* discard-source freed what the backup copied. */
  {
    uint64_t after = 0;
    for (int i = 0; i < 3; i++) {
      g_autofree char *name = g_strdup_printf ("vm-100-fleece-%d.qcow2", i);
      g_autofree char *path = g_build_filename (vm->tl->storage, name, NULL);
      after += tl_allocated_bytes (path);
    }
    ck_assert_msg (after < peak / 2, "fleecing images still hold %" G_GUINT64_FORMAT
                   " of %" G_GUINT64_FORMAT " bytes after the backup", after, peak);
  }

  ck_assert_msg (fleece_cleanup (h) == 0, "%s", fleece_get_error ());
  assert_nothing_left (vm);
  assert_backup_equals (vm, target_format, pit);
  assert_new_data (vm, 0xee);

  tl_vm_snapshot_free (vm->tl, pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}

START_TEST (test_full_backup_raw)
{
  run_full_backup ("raw");
}
END_TEST

START_TEST (test_full_backup_qcow2)
{
  run_full_backup ("qcow2");
}
END_TEST

/* A second run on the same VM is refused while one is set up. */
START_TEST (test_second_run_refused)
{
  Vm *vm = vm_start_with ("qmp2.sock");
  g_autofree char *keep = g_path_get_dirname (vm->tl->paths[0]);
  g_autofree char *qmp2 = g_build_filename (keep, "qmp2.sock", NULL);
  struct fleece_handle *h1 = vm_handle (vm);
  struct fleece_handle *h2 = vm_handle_on (vm, qmp2);
  struct fleece_plan *p1 = plan_checked (h1);
  struct fleece_plan *p2 = plan_checked (h2);

  ck_assert_int_eq (fleece_attach (h1, p1), 0);
  ck_assert_int_eq (fleece_attach (h2, p2), -1);
  ck_assert_int_eq (fleece_get_errno (), EBUSY);
  ck_assert_msg (strstr (fleece_get_error (), "another run holds the lock for VM 100"),
                 "%s", fleece_get_error ());
  ck_assert_int_eq (fleece_cleanup (h2), -1);
  ck_assert_int_eq (fleece_get_errno (), EBUSY);
  ck_assert_int_eq (fleece_cleanup (h1), 0);
  assert_nothing_left (vm);
  fleece_plan_free (p1);
  fleece_plan_free (p2);
  fleece_free (h1);
  fleece_free (h2);
  vm_stop (vm);
}
END_TEST

/* A process killed mid-backup: cleanup from the record alone restores
 * everything. */
START_TEST (test_kill9_then_cleanup)
{
  Vm *vm = vm_start ();
  int pipefd[2];
  pid_t pid;
  char c;

  ck_assert_int_eq (pipe (pipefd), 0);
  pid = fork ();
  ck_assert_int_ge (pid, 0);
  if (pid == 0) {
    struct fleece_handle *h = vm_handle (vm);
    struct fleece_plan *p = fleece_plan (h);
    struct fleece_target *t = fleece_target_new_dir (vm->tl->target, "raw");

    fleece_set_bwlimit (h, 512);
    if (!p || fleece_attach (h, p) < 0 || fleece_start (h, p, t) < 0) {
      fprintf (stderr, "child: %s\n", fleece_get_error ());
      _exit (1);
    }
    if (write (pipefd[1], "s", 1) != 1)
      _exit (1);
    pause ();
    _exit (0);
  }
  close (pipefd[1]);
  ck_assert_int_eq (read (pipefd[0], &c, 1), 1);
  close (pipefd[0]);
  ck_assert_int_gt (tl_job_count (vm->tl->q), 0);
  kill (pid, SIGKILL);
  waitpid (pid, NULL, 0);
  /* The guest keeps writing through the filters meanwhile. */
  overwrite_tail (vm, 0x77);

  {
    struct fleece_handle *h = fleece_new ();
    g_autofree char *rec = NULL;

    fleece_set_log_callback (h, log_cb, vm->log);
    ck_assert_int_eq (fleece_set_state_dir (h, vm->tl->state), 0);
    ck_assert_int_eq (fleece_set_vmid (h, VMID), 0);
    rec = fleece_get_record (h);
    ck_assert_ptr_nonnull (rec);
    ck_assert_ptr_nonnull (strstr (rec, "\"state\""));
    /* Not connected: the record knows the QMP socket and the storage. */
    ck_assert_msg (fleece_cleanup (h) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
    assert_nothing_left (vm);
    assert_new_data (vm, 0x77);
    ck_assert_ptr_null (fleece_get_record (h));
    ck_assert_int_eq (fleece_get_errno (), ENOENT);
    /* Nothing left to do is success. */
    ck_assert_int_eq (fleece_cleanup (h), 0);
    fleece_free (h);
  }
  vm_stop (vm);
}
END_TEST

/* Cancel mid-backup: fleece_wait reports it, cleanup leaves nothing. */
START_TEST (test_cancel)
{
  Vm *vm = vm_start ();
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_plan *p = plan_checked (h);
  struct fleece_target *t = fleece_target_new_dir (vm->tl->target, "raw");
  int r;

  fleece_set_bwlimit (h, 512);
  ck_assert_int_eq (fleece_attach (h, p), 0);
  ck_assert_int_eq (fleece_start (h, p, t), 0);
  ck_assert_int_eq (fleece_wait (h, 300), 0);
  ck_assert_int_eq (fleece_cancel (h), 0);
  while ((r = fleece_wait (h, 1000)) == 0)
    ;
  ck_assert_int_eq (r, -1);
  ck_assert_int_eq (fleece_get_errno (), ECANCELED);
  ck_assert_ptr_nonnull (strstr (fleece_get_error (), "cancelled"));
  ck_assert_int_eq (fleece_cleanup (h), 0);
  assert_nothing_left (vm);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}
END_TEST


/* Incremental: only what the bitmap marks is backed up, at the point in
 * time; the source bitmap then tracks only writes made after it. */
START_TEST (test_incremental)
{
  Vm *vm = vm_start ();
  struct fleece_handle *h = vm_handle (vm);
  const char *only[] = { "scsi0", NULL };
  struct fleece_plan *p;
  struct fleece_target *t = fleece_target_new_dir (vm->tl->target, "raw");
  g_autofree char *root = tl_device_root (vm->tl->q, "scsi0");
  g_autofree char *path = g_build_filename (vm->tl->target, "scsi0.raw", NULL);
  g_autofree guint8 *got = NULL;
  guint8 **pit;
  uint64_t size = 0;
  int r;

  ck_assert_int_eq (fleece_set_bitmap (h, "b0"), 0);
  ck_assert_int_eq (fleece_set_drives (h, only), 0);
  /* No bitmap yet: a clear error at plan time. */
  ck_assert_ptr_null (fleece_plan (h));
  ck_assert_msg (strstr (fleece_get_error (), "drive scsi0 has no dirty bitmap 'b0'"),
                 "%s", fleece_get_error ());

  json_object_put (tl_qmp (vm->tl->q, "block-dirty-bitmap-add",
                           tl_json ("{\"node\": \"%s\", \"name\": \"b0\"}", root)));
  tl_guest_io (vm->tl->q, "scsi0", "write -P 0x22 1M 64k");
  tl_guest_io (vm->tl->q, "scsi0", "write -P 0x23 12M 64k");
  pit = tl_vm_snapshot (vm->tl);

  p = plan_checked (h);
  fleece_set_bwlimit (h, 256);
  ck_assert_int_eq (fleece_attach (h, p), 0);
  ck_assert_msg (fleece_start (h, p, t) == 0, "%s", fleece_get_error ());
  /* Overwrite the dirty regions before the backup gets there. */
  tl_guest_io (vm->tl->q, "scsi0", "write -P 0x33 12M 64k");
  tl_guest_io (vm->tl->q, "scsi0", "write -P 0x34 2M 64k");
  while ((r = fleece_wait (h, 1000)) == 0)
    ;
  ck_assert_msg (r == 1, "%s\n%s", fleece_get_error (), vm->log->str);
  ck_assert_int_eq (fleece_cleanup (h), 0);
  assert_nothing_left (vm);

  got = tl_read_image (path, "raw", &size);
  ck_assert_uint_eq (size, disks[1].size);
  /* dirty at the point in time: backed up with the old content */
  ck_assert_int_eq (memcmp (got + MiB, pit[1] + MiB, 65536), 0);
  ck_assert_int_eq (got[MiB], 0x22);
  ck_assert_int_eq (memcmp (got + 12 * MiB, pit[1] + 12 * MiB, 65536), 0);
  ck_assert_int_eq (got[12 * MiB], 0x23);
  /* The job copies whole clusters (1 MiB with the directory storage)
   * around dirty bits, at the point in time; clusters with no dirty bit
   * are not backed up. */
  ck_assert_int_eq (memcmp (got + MiB, pit[1] + MiB, MiB), 0);
  ck_assert_int_eq (memcmp (got + 12 * MiB, pit[1] + 12 * MiB, MiB), 0);
  for (uint64_t off = 0; off < 16 * MiB; off += 4096)
    if (off / MiB != 1 && off / MiB != 12)
      ck_assert_int_eq (got[off], 0);
  {
    /* The source bitmap now holds only the writes made during the backup. */
    json_object *nodes = tl_qmp (vm->tl->q, "query-named-block-nodes",
                                 tl_json ("{\"flat\": true}"));
    int64_t count = -1;
    for (size_t i = 0; i < json_object_array_length (nodes); i++) {
      json_object *n = json_object_array_get_idx (nodes, i), *v, *bms;
      if (json_object_object_get_ex (n, "node-name", &v) &&
          strcmp (json_object_get_string (v), root) == 0 &&
          json_object_object_get_ex (n, "dirty-bitmaps", &bms) &&
          json_object_array_length (bms) == 1 &&
          json_object_object_get_ex (json_object_array_get_idx (bms, 0), "count", &v))
        count = json_object_get_int64 (v);
    }
    json_object_put (nodes);
    ck_assert_int_eq (count, 2 * 65536);
  }
  tl_vm_snapshot_free (vm->tl, pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}
END_TEST

/* A fleecing storage too small for what the guest overwrites: the backup
 * fails and says why; the guest's writes succeed. */
START_TEST (test_storage_full)
{
  Vm *vm = vm_start ();
  struct fleece_handle *h;
  const char *only[] = { "scsi0", NULL };
  struct fleece_plan *p;
  struct fleece_target *t = fleece_target_new_dir (vm->tl->target, "raw");
  int r;

  /* A 1 MiB tmpfs: room for the qcow2 metadata, not for 4 MiB of data. */
  ck_assert_msg (mount ("tmpfs", vm->tl->storage, "tmpfs", 0, "size=1m,mode=0700") == 0,
                 "mount tmpfs on %s: %s (the qemu suite runs as root)",
                 vm->tl->storage, g_strerror (errno));
  h = vm_handle (vm);
  ck_assert_int_eq (fleece_set_drives (h, only), 0);
  fleece_set_bwlimit (h, 256);
  p = plan_checked (h);
  ck_assert_int_eq (fleece_attach (h, p), 0);
  ck_assert_msg (fleece_start (h, p, t) == 0, "%s", fleece_get_error ());
  tl_guest_io (vm->tl->q, "scsi0", "write -P 0x5a 8M 4M");
  while ((r = fleece_wait (h, 1000)) == 0)
    ;
  ck_assert_int_eq (r, -1);
  ck_assert_msg (strstr (fleece_get_error (), "the fleecing storage is full or too slow") &&
                 strstr (fleece_get_error (), "guest's writes were not affected"),
                 "%s", fleece_get_error ());
  ck_assert_int_eq (fleece_cleanup (h), 0);
  assert_nothing_left (vm);
  {
    uint64_t size = 0;
    g_autofree guint8 *now = tl_read_image (vm->tl->paths[1], "qcow2", &size);
    for (uint64_t off = 8 * MiB; off < 12 * MiB; off += 4096)
      ck_assert_int_eq (now[off], 0x5a);
  }
  ck_assert_int_eq (umount (vm->tl->storage), 0);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}
END_TEST

/* An NBD target (how a remote backup server is reached): a
 * qemu-storage-daemon with one export per drive key. */
START_TEST (test_nbd_target)
{
  Vm *vm = vm_start ();
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_plan *p = plan_checked (h);
  g_autofree char *uri = NULL;
  GPid qsd = tl_vm_nbd_target (vm->tl, &uri);
  struct fleece_target *t;
  guint8 **pit = tl_vm_snapshot (vm->tl);
  int r, status;

  t = fleece_target_new_nbd (uri);
  ck_assert_ptr_nonnull (t);
  fleece_set_bwlimit (h, 2048);
  ck_assert_int_eq (fleece_attach (h, p), 0);
  ck_assert_msg (fleece_start (h, p, t) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  overwrite_tail (vm, 0x99);
  while ((r = fleece_wait (h, 1000)) == 0)
    ;
  ck_assert_msg (r == 1, "%s\n%s", fleece_get_error (), vm->log->str);
  ck_assert_int_eq (fleece_cleanup (h), 0);
  assert_nothing_left (vm);
  kill (qsd, SIGTERM);
  waitpid (qsd, &status, 0);
  g_spawn_close_pid (qsd);
  assert_backup_equals (vm, "raw", pit);

  tl_vm_snapshot_free (vm->tl, pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}
END_TEST


/* QEMU killed mid-backup: the run fails and says so, cleanup frees the
 * images and removes the record (nothing is left to undo in QEMU). */
START_TEST (test_qemu_killed)
{
  Vm *vm = vm_start ();
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_plan *p = plan_checked (h);
  struct fleece_target *t = fleece_target_new_dir (vm->tl->target, "raw");
  g_autofree char *record = g_strdup_printf ("%s/%d.json", vm->tl->state, VMID);
  g_auto (GStrv) files = NULL;

  fleece_set_bwlimit (h, 512);
  ck_assert_int_eq (fleece_attach (h, p), 0);
  ck_assert_int_eq (fleece_start (h, p, t), 0);
  ck_assert_int_eq (kill (vm->tl->q->pid, SIGKILL), 0);
  ck_assert_int_eq (fleece_wait (h, 10000), -1);
  ck_assert_msg (strstr (fleece_get_error (), "lost track of the backup of VM 100"),
                 "%s", fleece_get_error ());
  ck_assert_msg (fleece_cleanup (h) == 0, "%s", fleece_get_error ());
  files = tl_list_dir (vm->tl->storage);
  ck_assert_msg (g_strv_length (files) == 0, "storage not empty: %s", files[0]);
  ck_assert (!g_file_test (record, G_FILE_TEST_EXISTS));
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}
END_TEST


/* QEMU 10.0.0-10.0.2 crash on qom-set drive of an iothread device: the plan
 * refuses it on those versions, names the drive and the fix. */
START_TEST (test_iothread_guard)
{
  char *keep = tl_tmpdir_new ("io");
  TlQemu images = { .dir = keep };
  g_autofree char *img = tl_make_image (&images, "scsi0.raw", "raw", 4 * MiB, 9);
  g_autofree char *drive = g_strdup_printf ("file=%s,if=none,id=drive-scsi0,format=raw", img);
  const char *args[] = { "-object", "iothread,id=io0", "-drive", drive,
                         "-device", "virtio-scsi-pci,id=scsihw0,iothread=io0",
                         "-device", "scsi-hd,bus=scsihw0.0,drive=drive-scsi0,id=scsi0",
                         NULL };
  TlQemu *q = tl_qemu_start (args);
  g_autofree char *storage = g_build_filename (keep, "storage", NULL);
  g_autofree char *state = g_build_filename (keep, "state", NULL);
  struct fleece_handle *h = fleece_new ();
  struct fleece_plan *p;
  json_object *v = tl_qmp (q, "query-version", NULL), *qemu, *n;
  int micro, minor, major;

  json_object_object_get_ex (v, "qemu", &qemu);
  json_object_object_get_ex (qemu, "major", &n); major = json_object_get_int (n);
  json_object_object_get_ex (qemu, "minor", &n); minor = json_object_get_int (n);
  json_object_object_get_ex (qemu, "micro", &n); micro = json_object_get_int (n);
  json_object_put (v);
  ck_assert_int_eq (g_mkdir (storage, 0700), 0);
  fleece_set_state_dir (h, state);
  fleece_set_vmid (h, VMID);
  ck_assert_int_eq (fleece_connect (h, q->qmp_path), 0);
  fleece_set_storage (h, fleece_storage_new_dir (storage));
  p = fleece_plan (h);
  if (major == 10 && minor == 0 && micro <= 2) {
    ck_assert_ptr_null (p);
    ck_assert_msg (strstr (fleece_get_error (), "drive scsi0 runs in an iothread") &&
                   strstr (fleece_get_error (), "10.0.3"), "%s", fleece_get_error ());
    ck_assert (tl_qemu_alive (q));
    /* Without fleecing the drive can still be backed up. */
    fleece_set_plan_flags (h, FLEECE_PLAN_NO_FLEECING);
    p = fleece_plan (h);
  }
  ck_assert_msg (p != NULL, "%s", fleece_get_error ());
  fleece_plan_free (p);
  fleece_free (h);
  tl_qemu_stop (q);
  tl_tmpdir_free (keep);
}
END_TEST

static Suite *
lifecycle_suite (void)
{
  Suite *s = suite_create ("lifecycle");
  TCase *tc = tcase_create ("qemu");

  tcase_set_timeout (tc, 120);
  tcase_add_test (tc, test_plan_shape);
  tcase_add_test (tc, test_full_backup_raw);
  tcase_add_test (tc, test_full_backup_qcow2);
  tcase_add_test (tc, test_second_run_refused);
  tcase_add_test (tc, test_kill9_then_cleanup);
  tcase_add_test (tc, test_cancel);
  tcase_add_test (tc, test_incremental);
  tcase_add_test (tc, test_storage_full);
  tcase_add_test (tc, test_nbd_target);
  tcase_add_test (tc, test_qemu_killed);
  tcase_add_test (tc, test_iothread_guard);
  suite_add_tcase (s, tc);
  return s;
}

int
main (void)
{
  SRunner *sr = srunner_create (lifecycle_suite ());
  int failed;

  srunner_run_all (sr, CK_VERBOSE);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
