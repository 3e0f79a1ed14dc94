/* The stock-QEMU engine end to end on a real QEMU (no guest OS), in both
 * shapes qemu-server starts VMs in (8: -drive; 9: -blockdev throttle nodes,
 * the EFI disk on -machine pflash1): a slowed backup, guest writes ahead of
 * the backup cursor through the devices, and checks of the bytes backed
 * up, the block graph left in QEMU and the files left in the storage.
 * Fixtures from qemu-server's own cfg2cmd expectations run when
 * $FLEECE_QEMU_SERVER_SRC names its source tree (tl-cfg2cmd.h). */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <check.h>
#include <glib/gstdio.h>

#include "testlib.h"
#include "tl-cfg2cmd.h"
#include "fleece/fleece.h"

#define MiB (1024 * 1024)
#define VMID 100
#define VMID_STR "100"

/* Proxmox-like: the EFI vars disk on the second flash device, SCSI disks
 * on virtio-scsi, a virtio-blk disk, the TPM state attached for the backup
 * only (the last two and the EFI disk never fleeced), qcow2 and raw
 * sources, an odd size.  Besides: the firmware code on pflash0 and a
 * CD-ROM with a medium, which are never backed up. */
static const TlDisk disks[] = {
  { "efidisk0", "raw", 528 * 1024, "pflash", false },
  { "scsi0", "qcow2", 16 * MiB, "scsi", true },
  { "scsi1", "raw", 8 * MiB + 4096, "scsi", true },
  { "tpmstate0", "raw", 4 * MiB, "none", false },
  { "virtio0", "raw", 8 * MiB, "virtio", true },
};
#define NDISKS G_N_ELEMENTS (disks)
#define TPM 3   /* index of tpmstate0 */

typedef enum { SHAPE_DRIVE, SHAPE_BLOCKDEV } Shape;

typedef struct {
  TlVm *tl;            /* QEMU, disks, storage, target, state */
  GString *log;
  Shape shape;
} Vm;

/* qemu-server's TPM backup drive (no guest device) and a CD-ROM with an
 * ISO, in the VM's shape. */
static void
shape_args (Vm *vm, GPtrArray *args)
{
  g_autofree char *iso = g_build_filename (vm->tl->dir, "cd.iso", NULL);
  const char *tpm = vm->tl->paths[TPM];

  ck_assert (g_file_set_contents (iso, "CD001", 5, NULL));
  ck_assert_int_eq (truncate (iso, MiB), 0);
  if (vm->shape == SHAPE_DRIVE) {
    g_ptr_array_add (args, g_strdup ("-drive"));
    g_ptr_array_add (args, g_strdup_printf ("file=%s,if=none,id=drive-tpmstate0-backup,"
                                            "format=raw", tpm));
    g_ptr_array_add (args, g_strdup ("-drive"));
    g_ptr_array_add (args, g_strdup_printf ("file=%s,if=none,id=drive-ide2,media=cdrom,"
                                            "format=raw,readonly=on", iso));
  } else {
    g_ptr_array_add (args, g_strdup ("-blockdev"));
    g_ptr_array_add (args, g_strdup_printf (
      "{\"driver\":\"raw\",\"node-name\":\"drive-tpmstate0-backup\",\"read-only\":true,"
      "\"file\":{\"driver\":\"file\",\"filename\":\"%s\",\"node-name\":\"tpmstate0-backup-file\","
      "\"read-only\":true}}", tpm));
    g_ptr_array_add (args, g_strdup ("-object"));
    g_ptr_array_add (args, g_strdup ("{\"id\":\"throttle-drive-ide2\",\"limits\":{},"
                                     "\"qom-type\":\"throttle-group\"}"));
    g_ptr_array_add (args, g_strdup ("-blockdev"));
    g_ptr_array_add (args, g_strdup_printf (
      "{\"driver\":\"throttle\",\"file\":{\"driver\":\"raw\",\"file\":{\"driver\":\"file\","
      "\"filename\":\"%s\",\"node-name\":\"eide2\",\"read-only\":true},\"node-name\":\"fide2\","
      "\"read-only\":true},\"node-name\":\"drive-ide2\",\"read-only\":true,"
      "\"throttle-group\":\"throttle-drive-ide2\"}", iso));
  }
  g_ptr_array_add (args, g_strdup ("-device"));
  g_ptr_array_add (args, g_strdup ("ide-cd,bus=ide.1,unit=0,drive=drive-ide2,id=ide2"));
}

/* extra_qmp: the file name of a second QMP socket in the VM's dir, or
 * NULL (a QMP monitor serves one client at a time: a second handle needs
 * its own). */
static Vm *
vm_start_with (Shape shape, const char *extra_qmp)
{
  Vm *vm = g_new0 (Vm, 1);
  g_autoptr (GPtrArray) args = g_ptr_array_new_with_free_func (g_free);

  vm->shape = shape;
  vm->tl = tl_vm_new ("life", disks, NDISKS, 1);
  shape_args (vm, args);
  if (extra_qmp) {
    g_ptr_array_add (args, g_strdup ("-qmp"));
    g_ptr_array_add (args, g_strdup_printf ("unix:%s/%s,server=on,wait=off",
                                            vm->tl->dir, extra_qmp));
  }
  g_ptr_array_add (args, NULL);
  if (shape == SHAPE_DRIVE)
    tl_vm_start (vm->tl, (const char *const *) args->pdata);
  else
    tl_vm_start_blockdev (vm->tl, (const char *const *) args->pdata);
  vm->log = g_string_new (NULL);
  return vm;
}

static Vm *
vm_start (Shape shape)
{
  return vm_start_with (shape, NULL);
}

static void
vm_stop (Vm *vm)
{
  tl_vm_stop (vm->tl);
  g_string_free (vm->log, TRUE);
  g_free (vm);
}

static struct fleece_handle *
vm_handle (Vm *vm)
{
  struct fleece_handle *h = tl_handle (vm->tl, VMID, vm->log);

  ck_assert_int_eq (fleece_get_engine (h), FLEECE_ENGINE_QEMU);
  return h;
}

static struct fleece_target *
dir_target (const char *dir, const char *format)
{
  struct fleece_target *t = fleece_target_new_dir (dir, format);

  ck_assert_msg (t != NULL, "%s", fleece_get_error ());
  return t;
}

static void
assert_new_data (Vm *vm, unsigned pattern)
{
  for (size_t i = 0; i < NDISKS; i++) {
    uint64_t size = 0;
    g_autofree guint8 *now = NULL;

    if (strcmp (disks[i].bus, "none") == 0)
      continue;
    now = tl_read_image (vm->tl->paths[i], disks[i].format, &size);
    ck_assert_msg (now[size - 1] == pattern, "%s does not hold the guest's write",
                   disks[i].key);
  }
}

/* ---- the plan ---------------------------------------------------------- */

static int
skipped_index (struct fleece_plan *p, const char *name)
{
  for (int i = 0; i < fleece_plan_get_skipped_count (p); i++)
    if (strcmp (fleece_plan_get_skipped_name (p, i), name) == 0)
      return i;
  return -1;
}

/* What is never backed up is listed with why: the firmware code and the
 * CD-ROM, by the names QEMU gives them in each shape. */
static void
assert_skipped (Vm *vm, struct fleece_plan *p)
{
  bool drive = vm->shape == SHAPE_DRIVE;
  int code = skipped_index (p, drive ? "pflash0" : "/machine/system.flash0");
  int cd = skipped_index (p, drive ? "drive-ide2" : "ide2");
  g_autofree char *json = fleece_plan_to_json (p);

  ck_assert_msg (code >= 0 && cd >= 0, "skipped list misses pflash0 or ide2: %s", json);
  ck_assert_int_eq (fleece_plan_get_skipped_count (p), 2);
  ck_assert_ptr_nonnull (strstr (fleece_plan_get_skipped_reason (p, code), "firmware code"));
  ck_assert_ptr_nonnull (strstr (fleece_plan_get_skipped_reason (p, cd), "CD-ROM"));
  ck_assert_ptr_null (fleece_plan_get_skipped_name (p, 2));
  ck_assert_ptr_nonnull (strstr (json, "CD-ROM"));
}

START_TEST (test_plan_shape)
{
  Vm *vm = vm_start ((Shape) _i);
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_plan *p = tl_plan (h, vm->log);
  g_autofree char *json = NULL;
  const char *restrict_to[] = { "virtio0", "efidisk0", NULL };
  const char *unknown[] = { "scsi7", NULL };

  ck_assert_int_eq (fleece_plan_get_drive_count (p), NDISKS);
  for (int i = 0; i < (int) NDISKS; i++) {
    /* qemu-server attaches the TPM state as drive-tpmstate0-backup. */
    g_autofree char *dev = g_strdup_printf ("drive-%s%s", disks[i].key,
                                            i == TPM ? "-backup" : "");

    ck_assert_str_eq (fleece_plan_get_key (p, i), disks[i].key);
    /* Named by the config key in both shapes: drive-efidisk0, never
     * QEMU's system.flash1. */
    ck_assert_str_eq (fleece_plan_get_device (p, i), dev);
    ck_assert_int_eq (fleece_plan_get_size (p, i), (int64_t) disks[i].size);
    ck_assert_int_eq (fleece_plan_get_fleeced (p, i), disks[i].fleeced);
  }
  /* n counts only fleeced drives, in sorted key order. */
  ck_assert_str_eq (fleece_plan_get_image (p, 1), "vm-100-fleece-0.qcow2");
  ck_assert_str_eq (fleece_plan_get_image (p, 2), "vm-100-fleece-1.qcow2");
  ck_assert_str_eq (fleece_plan_get_image (p, 4), "vm-100-fleece-2.qcow2");
  ck_assert_ptr_null (fleece_plan_get_image (p, 0));
  ck_assert_ptr_null (fleece_plan_get_image (p, TPM));
  ck_assert_ptr_nonnull (strstr (fleece_plan_get_reason (p, 0), "EFI disk or TPM state"));
  /* The TPM state has no guest device: nothing writes it meanwhile. */
  ck_assert_ptr_nonnull (strstr (fleece_plan_get_reason (p, TPM), "no guest device"));
  ck_assert_int_eq (fleece_plan_get_cluster_size (p, 1), 65536);
  ck_assert_int_eq (fleece_plan_get_fleeced (p, 99), -1);
  ck_assert_ptr_nonnull (strstr (fleece_get_error (), "no drive 99"));
  ck_assert_int_eq (fleece_plan_get_size (p, -1), -1);
  assert_skipped (vm, p);
  json = fleece_plan_to_json (p);
  ck_assert_msg (strstr (json, "\"image\":\"vm-100-fleece-2.qcow2\"") ||
                 strstr (json, "\"image\": \"vm-100-fleece-2.qcow2\""), "%s", json);
  fleece_plan_free (p);

  /* raw forced; all drives (the EFI disk too, not the TPM state, which
   * has no device) */
  ck_assert_int_eq (fleece_set_image_format (h, "raw"), 0);
  ck_assert_int_eq (fleece_set_plan_flags (h, FLEECE_PLAN_ALL_DRIVES), 0);
  p = tl_plan (h, vm->log);
  ck_assert_str_eq (fleece_plan_get_image (p, 0), "vm-100-fleece-0.raw");
  ck_assert_int_eq (fleece_plan_get_fleeced (p, TPM), 0);
  ck_assert_str_eq (fleece_plan_get_image (p, 4), "vm-100-fleece-3.raw");
  ck_assert_int_eq (fleece_plan_get_cluster_size (p, 0), 0);
  fleece_plan_free (p);

  /* restricted */
  ck_assert_int_eq (fleece_set_plan_flags (h, 0), 0);
  ck_assert_int_eq (fleece_set_drives (h, restrict_to), 0);
  p = tl_plan (h, vm->log);
  ck_assert_int_eq (fleece_plan_get_drive_count (p), 2);
  ck_assert_str_eq (fleece_plan_get_key (p, 0), "efidisk0");
  ck_assert_int_eq (fleece_plan_get_fleeced (p, 0), 0);
  ck_assert_str_eq (fleece_plan_get_image (p, 1), "vm-100-fleece-0.raw");
  fleece_plan_free (p);
  ck_assert_int_eq (fleece_set_drives (h, unknown), 0);
  ck_assert_ptr_null (fleece_plan (h));
  ck_assert_msg (strstr (fleece_get_error (), "drive 'scsi7' not found; the VM has: "
                         "efidisk0, scsi0, scsi1, tpmstate0, virtio0"), "%s", fleece_get_error ());

  fleece_free (h);
  vm_stop (vm);
}
END_TEST

/* ---- a whole backup ---------------------------------------------------- */

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

/* While the backup runs each fleeced device sits on its cbw filter, which
 * sits on the device's old node; no other device moved. */
static void
assert_filters_in_place (Vm *vm)
{
  for (size_t i = 0; i < NDISKS; i++) {
    g_autofree char *root = NULL;

    if (strcmp (disks[i].bus, "none") == 0)
      continue;
    root = tl_device_root (vm->tl->q, tl_disk_qdev (&disks[i]));
    if (disks[i].fleeced) {
      g_autofree char *cbw = g_strdup_printf ("%s-fleece-cbw", disks[i].key);
      ck_assert_str_eq (root, cbw);
    } else {
      ck_assert_ptr_null (strstr (root, "fleece"));
    }
  }
}

static json_object *
status_of (struct fleece_handle *h)
{
  g_autofree char *text = fleece_get_status (h, 0);
  json_object *o;

  ck_assert_msg (text != NULL, "%s", fleece_get_error ());
  o = json_tokener_parse (text);
  ck_assert_msg (o != NULL, "status is not JSON: %s", text);
  return o;
}

static const char *
jstr (json_object *o, const char *key)
{
  json_object *v;

  return o && json_object_object_get_ex (o, key, &v) && json_object_is_type (v, json_type_string)
         ? json_object_get_string (v) : NULL;
}

static json_object *
jobj (json_object *o, const char *key)
{
  json_object *v;

  return o && json_object_object_get_ex (o, key, &v) ? v : NULL;
}

static size_t
jlen (json_object *o, const char *key)
{
  json_object *a = jobj (o, key);

  return a && json_object_is_type (a, json_type_array) ? json_object_array_length (a) : 0;
}

/* Status while the handle's own backup runs: our lock, our record, our
 * run marker alive in QEMU, our nodes and jobs as traces. */
static void
assert_status_active (struct fleece_handle *h)
{
  json_object *st = status_of (h), *qemu = jobj (st, "qemu");
  json_object *record = jobj (st, "record"), *run0;
  const char *text = json_object_to_json_string (st);

  ck_assert_msg (g_strcmp0 (jstr (st, "run"), "active") == 0, "%s", text);
  ck_assert_msg (g_strcmp0 (jstr (st, "lock"), "ours") == 0, "%s", text);
  ck_assert_msg (record && jstr (record, "run"), "%s", text);
  ck_assert_msg (json_object_get_boolean (jobj (qemu, "reachable")), "%s", text);
  ck_assert_msg (jlen (qemu, "runs") == 1, "%s", text);
  run0 = json_object_array_get_idx (jobj (qemu, "runs"), 0);
  ck_assert_str_eq (jstr (run0, "run"), jstr (record, "run"));
  ck_assert_msg (json_object_get_boolean (jobj (run0, "alive")), "%s", text);
  ck_assert_msg (jlen (qemu, "traces") > 0, "%s", text);
  ck_assert_ptr_nonnull (strstr (text, "fleece-scsi0"));
  json_object_put (st);
}

static void
assert_status_none (struct fleece_handle *h)
{
  json_object *st = status_of (h), *qemu = jobj (st, "qemu");
  const char *text = json_object_to_json_string (st);

  ck_assert_msg (g_strcmp0 (jstr (st, "run"), "none") == 0, "%s", text);
  ck_assert_msg (g_strcmp0 (jstr (st, "lock"), "free") == 0, "%s", text);
  ck_assert_msg (!jobj (st, "record") || json_object_is_type (jobj (st, "record"), json_type_null),
                 "%s", text);
  ck_assert_msg (jlen (qemu, "runs") == 0 && jlen (qemu, "traces") == 0, "%s", text);
  json_object_put (st);
}

static uint64_t
allocated_in_storage (Vm *vm)
{
  uint64_t sum = 0;

  for (int i = 0; i < 3; i++) {
    g_autofree char *name = g_strdup_printf ("vm-100-fleece-%d.qcow2", i);
    g_autofree char *path = g_build_filename (vm->tl->storage, name, NULL);
    sum += tl_allocated_bytes (path);
  }
  return sum;
}

/* A qcow2 image's cluster size, from qemu-img info. */
static int64_t
qcow2_cluster_size (const char *path)
{
  g_autofree char *out = NULL;
  json_object *info, *cs;
  int64_t r;

  ck_assert_int_eq (tl_run_tool ((const char *const[]) { "qemu-img", "info", "-U",
                                                         "--output=json", path, NULL }, &out), 0);
  info = json_tokener_parse (out);
  ck_assert_msg (info && json_object_object_get_ex (info, "cluster-size", &cs), "%s", out);
  r = json_object_get_int64 (cs);
  json_object_put (info);
  return r;
}

/* Small disks' qcow2 targets keep qcow2's 64 KiB clusters, fleeced or
 * not (test_sparse_source has a large one). */
static void
assert_target_clusters (Vm *vm)
{
  for (size_t i = 0; i < NDISKS; i++) {
    g_autofree char *name = g_strdup_printf ("%s.qcow2", disks[i].key);
    g_autofree char *path = g_build_filename (vm->tl->target, name, NULL);

    ck_assert_msg (qcow2_cluster_size (path) == 64 * 1024,
                   "%s: cluster size %" G_GINT64_FORMAT, name, qcow2_cluster_size (path));
  }
}

/* The whole job: a slowed backup of every drive while the guest overwrites
 * what is not backed up yet; the backup holds the point in time, the guest
 * its writes, QEMU the graph it had. */
static void
run_full_backup (Shape shape, const char *target_format)
{
  Vm *vm = vm_start (shape);
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_plan *p = tl_plan (h, vm->log);
  struct fleece_target *t = dir_target (vm->tl->target, target_format);
  guint8 **pit = tl_vm_snapshot (vm->tl);
  uint64_t done = 0, total = 0, peak, after;
  int r;

  /* 4 MiB/s per job: the 8 MiB disks take ~2 s, time to write ahead (also
   * under valgrind). */
  ck_assert_int_eq (fleece_set_bwlimit (h, 4096), 0);
  ck_assert_msg (fleece_attach (h, p, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  {
    g_auto (GStrv) files = tl_list_dir (vm->tl->storage);
    g_autofree char *list = g_strjoinv (",", files);
    ck_assert_str_eq (list, "vm-100-fleece-0.qcow2,vm-100-fleece-1.qcow2,vm-100-fleece-2.qcow2");
  }
  assert_fleecing_images (vm);
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  tl_vm_overwrite_tail (vm->tl, 0xee);
  /* The old data of the three fleeced disks' last MiB went to the
   * fleecing images, not to the slow target. */
  peak = allocated_in_storage (vm);
  ck_assert_msg (peak >= 3 * MiB, "fleecing images hold %" G_GUINT64_FORMAT
                 " bytes after 3 MiB were overwritten", peak);
  assert_filters_in_place (vm);
  assert_status_active (h);

  while ((r = fleece_wait (h, 500)) == 0) {
    ck_assert_int_eq (fleece_get_progress (h, &done, &total), 0);
    ck_assert_uint_le (done, total);
  }
  ck_assert_msg (r == 1, "%s\n%s", fleece_get_error (), vm->log->str);
  ck_assert_int_eq (fleece_get_progress (h, &done, &total), 0);
  ck_assert_uint_eq (done, total);
  ck_assert_str_eq (fleece_get_drive_result (h, "scsi0"), "ok");
  ck_assert_str_eq (fleece_get_drive_result (h, "efidisk0"), "ok");

  /* discard-source freed what the backup copied. */
  after = allocated_in_storage (vm);
  ck_assert_msg (after < peak / 2, "fleecing images still hold %" G_GUINT64_FORMAT
                 " of %" G_GUINT64_FORMAT " bytes after the backup", after, peak);

  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());
  tl_assert_nothing_left (vm->tl, VMID);
  tl_assert_graph_unchanged (vm->tl);
  assert_status_none (h);
  tl_check_point_in_time (vm->tl, pit, vm->tl->target, target_format);
  assert_new_data (vm, 0xee);
  if (strcmp (target_format, "qcow2") == 0)
    assert_target_clusters (vm);

  tl_vm_snapshot_free (vm->tl, pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}

START_TEST (test_full_backup_drive_raw)
{
  run_full_backup (SHAPE_DRIVE, "raw");
}
END_TEST

START_TEST (test_full_backup_blockdev_qcow2)
{
  run_full_backup (SHAPE_BLOCKDEV, "qcow2");
}
END_TEST

/* ---- one run per VM ---------------------------------------------------- */

/* A second run on the same VM is refused while one is set up, whatever
 * handle or monitor it comes through. */
START_TEST (test_second_run_refused)
{
  Vm *vm = vm_start_with (SHAPE_BLOCKDEV, "qmp2.sock");
  g_autofree char *qmp2 = g_build_filename (vm->tl->dir, "qmp2.sock", NULL);
  struct fleece_handle *h1 = vm_handle (vm);
  struct fleece_handle *h2 = tl_handle_on (vm->tl, VMID, vm->log, qmp2);
  struct fleece_plan *p1 = tl_plan (h1, vm->log);
  struct fleece_plan *p2 = tl_plan (h2, vm->log);

  ck_assert_int_eq (fleece_attach (h1, p1, 0), 0);
  ck_assert_int_eq (fleece_attach (h2, p2, 0), -1);
  ck_assert_int_eq (fleece_get_errno (), EBUSY);
  ck_assert_msg (strstr (fleece_get_error (), "another run holds the lock for VM 100"),
                 "%s", fleece_get_error ());
  ck_assert_int_eq (fleece_cleanup (h2, 0), -1);
  ck_assert_int_eq (fleece_get_errno (), EBUSY);
  /* Settings that shape a run are refused while it is set up. */
  ck_assert_int_eq (fleece_set_bitmap (h1, "b0", FLEECE_BITMAP_NEW), -1);
  ck_assert_int_eq (fleece_get_errno (), EBUSY);
  ck_assert_int_eq (fleece_cleanup (h1, 0), 0);
  tl_assert_nothing_left (vm->tl, VMID);
  tl_assert_graph_unchanged (vm->tl);
  fleece_plan_free (p1);
  fleece_plan_free (p2);
  fleece_free (h1);
  fleece_free (h2);
  vm_stop (vm);
}
END_TEST

/* ---- interrupted runs -------------------------------------------------- */

/* The library in a forked child: no Check calls there, the child must
 * never return into the test. */
static G_GNUC_NORETURN void
child_backup (Vm *vm, int ready)
{
  struct fleece_handle *h = fleece_new ();
  struct fleece_plan *p;
  struct fleece_target *t = fleece_target_new_dir (vm->tl->target, "raw");

  if (fleece_set_state_dir (h, vm->tl->state) < 0 || fleece_set_vmid (h, VMID) < 0 ||
      fleece_connect (h, vm->tl->q->qmp_path) < 0 ||
      fleece_set_storage (h, fleece_storage_new_dir (vm->tl->storage)) < 0 ||
      fleece_set_bwlimit (h, 512) < 0 || !(p = fleece_plan (h)) ||
      fleece_attach (h, p, 0) < 0 || fleece_start (h, p, t, 0) < 0) {
    fprintf (stderr, "child: %s\n", fleece_get_error ());
    _exit (1);
  }
  if (write (ready, "s", 1) != 1)
    _exit (1);
  pause ();
  _exit (0);
}

/* A process killed mid-backup: status says "crashed", cleanup from the
 * record alone restores everything. */
START_TEST (test_kill9_then_cleanup)
{
  Vm *vm = vm_start (SHAPE_BLOCKDEV);
  int pipefd[2];
  pid_t pid;
  char c;

  ck_assert_int_eq (pipe (pipefd), 0);
  pid = fork ();
  ck_assert_int_ge (pid, 0);
  if (pid == 0)
    child_backup (vm, pipefd[1]);
  close (pipefd[1]);
  ck_assert_msg (read (pipefd[0], &c, 1) == 1, "the child failed to start the backup");
  close (pipefd[0]);
  ck_assert_int_gt (tl_job_count (vm->tl->q), 0);
  kill (pid, SIGKILL);
  waitpid (pid, NULL, 0);
  /* The guest keeps writing through the filters meanwhile. */
  tl_vm_overwrite_tail (vm->tl, 0x77);

  {
    struct fleece_handle *h = tl_handle_on (vm->tl, VMID, vm->log, NULL);
    g_autofree char *rec = fleece_get_record (h);
    json_object *st;

    ck_assert_ptr_nonnull (rec);
    ck_assert_ptr_nonnull (strstr (rec, "\"state\""));
    /* Not connected: status reaches the QEMU the record names. */
    st = status_of (h);
    ck_assert_msg (g_strcmp0 (jstr (st, "run"), "crashed") == 0, "%s",
                   json_object_to_json_string (st));
    ck_assert_str_eq (jstr (st, "lock"), "free");
    ck_assert_int_eq (jlen (jobj (st, "qemu"), "runs"), 1);
    ck_assert (!json_object_get_boolean (jobj (json_object_array_get_idx (
      jobj (jobj (st, "qemu"), "runs"), 0), "alive")));
    json_object_put (st);
    ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
    tl_assert_nothing_left (vm->tl, VMID);
    tl_assert_graph_unchanged (vm->tl);
    assert_new_data (vm, 0x77);
    ck_assert_ptr_null (fleece_get_record (h));
    ck_assert_int_eq (fleece_get_errno (), ENOENT);
    /* Nothing left to do is success. */
    ck_assert_int_eq (fleece_cleanup (h, 0), 0);
    fleece_free (h);
  }
  vm_stop (vm);
}
END_TEST

/* Cancel mid-backup: fleece_wait reports it, cleanup leaves nothing (and
 * no unfinished target file). */
START_TEST (test_cancel)
{
  Vm *vm = vm_start (SHAPE_DRIVE);
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_plan *p = tl_plan (h, vm->log);
  struct fleece_target *t = dir_target (vm->tl->target, "raw");
  g_auto (GStrv) left = NULL;

  fleece_set_bwlimit (h, 512);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  ck_assert_int_eq (fleece_start (h, p, t, 0), 0);
  ck_assert_int_eq (fleece_wait (h, 300), 0);
  ck_assert_int_eq (fleece_cancel (h), 0);
  ck_assert_int_eq (tl_wait_end (h, 1000), -1);
  ck_assert_int_eq (fleece_get_errno (), ECANCELED);
  ck_assert_ptr_nonnull (strstr (fleece_get_error (), "cancelled"));
  ck_assert_str_eq (fleece_get_drive_result (h, "scsi0"), "cancelled");
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);
  tl_assert_nothing_left (vm->tl, VMID);
  tl_assert_graph_unchanged (vm->tl);
  left = tl_list_dir (vm->tl->target);
  ck_assert_msg (g_strv_length (left) == 0, "target holds %s", left[0]);
  /* No run: cancel is EINVAL (without an error text: it is signal-safe). */
  errno = 0;
  ck_assert_int_eq (fleece_cancel (h), -1);
  ck_assert_int_eq (errno, EINVAL);
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
  Vm *vm = vm_start (SHAPE_DRIVE);
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_plan *p = tl_plan (h, vm->log);
  struct fleece_target *t = dir_target (vm->tl->target, "raw");
  g_autofree char *record = g_strdup_printf ("%s/%d.json", vm->tl->state, VMID);
  g_auto (GStrv) files = NULL;

  fleece_set_bwlimit (h, 512);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  ck_assert_int_eq (fleece_start (h, p, t, 0), 0);
  ck_assert_int_eq (kill (vm->tl->q->pid, SIGKILL), 0);
  while (tl_qemu_alive (vm->tl->q))
    g_usleep (10 * 1000);
  ck_assert_int_eq (fleece_wait (h, 10000), -1);
  ck_assert_msg (strstr (fleece_get_error (), vm->tl->q->qmp_path) &&
                 strstr (fleece_get_error (), "Connection refused"), "%s", fleece_get_error ());
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());
  files = tl_list_dir (vm->tl->storage);
  ck_assert_msg (g_strv_length (files) == 0, "storage not empty: %s", files[0]);
  ck_assert (!g_file_test (record, G_FILE_TEST_EXISTS));
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}
END_TEST

/* ---- other targets ------------------------------------------------------ */

/* An NBD target (how a remote backup server is reached): a
 * qemu-storage-daemon with one export per drive key. */
START_TEST (test_nbd_target)
{
  Vm *vm = vm_start (SHAPE_BLOCKDEV);
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_plan *p = tl_plan (h, vm->log);
  g_autofree char *uri = NULL;
  GPid qsd = tl_vm_nbd_target (vm->tl, &uri);
  struct fleece_target *t = fleece_target_new_nbd (uri);
  guint8 **pit = tl_vm_snapshot (vm->tl);
  int status;

  ck_assert_ptr_nonnull (t);
  fleece_set_bwlimit (h, 8192);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  tl_vm_overwrite_tail (vm->tl, 0x99);
  ck_assert_msg (tl_wait_end (h, 500) == 1, "%s\n%s", fleece_get_error (), vm->log->str);
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);
  tl_assert_nothing_left (vm->tl, VMID);
  tl_assert_graph_unchanged (vm->tl);
  kill (qsd, SIGTERM);
  waitpid (qsd, &status, 0);
  g_spawn_close_pid (qsd);
  tl_check_point_in_time (vm->tl, pit, vm->tl->target, "raw");

  tl_vm_snapshot_free (vm->tl, pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}
END_TEST

/* An fd target: the raw image of one drive written to a regular file the
 * caller opened (QEMU gets its own copy of the fd). */
START_TEST (test_fd_target)
{
  Vm *vm = vm_start (SHAPE_BLOCKDEV);
  struct fleece_handle *h = vm_handle (vm);
  const char *one[] = { "scsi1", NULL };
  g_autofree char *path = g_build_filename (vm->tl->target, "scsi1.img", NULL);
  struct fleece_plan *p;
  struct fleece_target *t;
  guint8 **pit = tl_vm_snapshot (vm->tl);
  int fd;

  /* Refused: a read-only fd, an unknown format, VMA on the stock engine,
   * two drives into one fd. */
  fd = open (path, O_RDONLY | O_CREAT | O_CLOEXEC, 0600);
  ck_assert_int_ge (fd, 0);
  ck_assert_ptr_null (fleece_target_new_fd (fd, "raw"));
  ck_assert_int_eq (fleece_get_errno (), EBADF);
  ck_assert_int_eq (fcntl (fd, F_GETFD), -1);   /* taken and closed */
  ck_assert_ptr_null (fleece_target_new_fd (open (path, O_RDWR | O_CLOEXEC), "qcow2"));
  ck_assert_int_eq (fleece_get_errno (), EINVAL);
  /* QEMU's backup job wants a target of the drive's size. */
  ck_assert_int_eq (truncate (path, (off_t) disks[2].size), 0);
  p = tl_plan (h, vm->log);
  t = fleece_target_new_fd (open (path, O_RDWR | O_CLOEXEC), "raw");
  ck_assert_ptr_nonnull (t);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  ck_assert_int_eq (fleece_start (h, p, t, 0), -1);
  ck_assert_int_eq (fleece_get_errno (), EINVAL);
  ck_assert_msg (strstr (fleece_get_error (), "an fd target holds one drive"), "%s",
                 fleece_get_error ());
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);
  fleece_target_free (t);
  fleece_plan_free (p);

  ck_assert_int_eq (fleece_set_drives (h, one), 0);
  p = tl_plan (h, vm->log);
  t = fleece_target_new_fd (open (path, O_RDWR | O_CLOEXEC), "vma");
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  ck_assert_int_eq (fleece_start (h, p, t, 0), -1);
  ck_assert_msg (strstr (fleece_get_error (), "VMA archives need Proxmox's QEMU"), "%s",
                 fleece_get_error ());
  fleece_target_free (t);

  /* The backup, while the guest overwrites its tail. */
  t = fleece_target_new_fd (open (path, O_RDWR | O_CLOEXEC), "raw");
  fleece_set_bwlimit (h, 8192);
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  tl_guest_io (vm->tl->q, "scsi1", "write -P 0x66 7M 1M");
  ck_assert_msg (tl_wait_end (h, 500) == 1, "%s\n%s", fleece_get_error (), vm->log->str);
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);
  tl_assert_nothing_left (vm->tl, VMID);
  tl_assert_graph_unchanged (vm->tl);
  {
    /* No fd set is left in QEMU either. */
    json_object *fdsets = tl_qmp (vm->tl->q, "query-fdsets", NULL);
    ck_assert_msg (json_object_array_length (fdsets) == 0, "fd sets left: %s",
                   json_object_to_json_string (fdsets));
    json_object_put (fdsets);
  }
  tl_assert_image_equals (path, "raw", pit[2], disks[2].size,
                          "the fd target's image of scsi1");

  tl_vm_snapshot_free (vm->tl, pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}
END_TEST

/* ---- iothreads on QEMU 10.0.0-10.0.2 ------------------------------------ */

static bool
qemu_10_0_le_2 (TlQemu *q)
{
  json_object *v = tl_qmp (q, "query-version", NULL), *qemu, *n;
  int micro, minor, major;

  json_object_object_get_ex (v, "qemu", &qemu);
  json_object_object_get_ex (qemu, "major", &n); major = json_object_get_int (n);
  json_object_object_get_ex (qemu, "minor", &n); minor = json_object_get_int (n);
  json_object_object_get_ex (qemu, "micro", &n); micro = json_object_get_int (n);
  json_object_put (v);
  return major == 10 && minor == 0 && micro <= 2;
}

/* QEMU 10.0.0-10.0.2 crash on qom-set drive of an iothread device: the
 * plan refuses it with ENOTSUP, names the drive and what to do; without
 * fleecing the drive can still be backed up. */
static void
assert_iothread_guard (TlVm *vm, const char *key)
{
  struct fleece_handle *h = tl_handle (vm, VMID, NULL);
  struct fleece_plan *p = fleece_plan (h);
  g_autofree char *expect = g_strdup_printf ("drive %s runs in an iothread", key);

  if (qemu_10_0_le_2 (vm->q)) {
    ck_assert_ptr_null (p);
    ck_assert_int_eq (fleece_get_errno (), ENOTSUP);
    ck_assert_msg (strstr (fleece_get_error (), expect) &&
                   strstr (fleece_get_error (), "Upgrade QEMU to 10.0.3") &&
                   strstr (fleece_get_error (), "without fleecing"), "%s", fleece_get_error ());
    ck_assert (tl_qemu_alive (vm->q));
    fleece_set_plan_flags (h, FLEECE_PLAN_NO_FLEECING);
    p = fleece_plan (h);
    ck_assert_msg (p != NULL, "%s", fleece_get_error ());
    for (int i = 0; i < fleece_plan_get_drive_count (p); i++)
      ck_assert_int_eq (fleece_plan_get_fleeced (p, i), 0);
  }
  ck_assert_msg (p != NULL, "%s", fleece_get_error ());
  fleece_plan_free (p);
  fleece_free (h);
}

/* The virtio-blk device in an iothread, as qemu-server 9 starts it. */
START_TEST (test_iothread_guard)
{
  char *keep = tl_tmpdir_new ("io");
  TlQemu images = { .dir = keep };
  g_autofree char *img = tl_make_image (&images, "virtio0.raw", "raw", 4 * MiB, 9);
  g_autofree char *bd = g_strdup_printf (
    "{\"driver\":\"throttle\",\"throttle-group\":\"throttle-drive-virtio0\","
    "\"node-name\":\"drive-virtio0\",\"file\":{\"driver\":\"raw\",\"node-name\":\"fvirtio0\","
    "\"file\":{\"driver\":\"file\",\"filename\":\"%s\",\"node-name\":\"evirtio0\"}}}", img);
  const char *args[] = {
    "-object", "iothread,id=iothread-virtio0",
    "-object", "{\"id\":\"throttle-drive-virtio0\",\"limits\":{},\"qom-type\":\"throttle-group\"}",
    "-blockdev", bd,
    "-device", "virtio-blk-pci,drive=drive-virtio0,id=virtio0,iothread=iothread-virtio0",
    NULL };
  TlVm vm = { .dir = keep };

  vm.q = tl_qemu_start (args);
  vm.storage = g_build_filename (keep, "storage", NULL);
  vm.state = g_build_filename (keep, "state", NULL);
  ck_assert_int_eq (g_mkdir (vm.storage, 0700), 0);
  assert_iothread_guard (&vm, "virtio0");
  tl_qemu_stop (vm.q);
  g_free (vm.storage);
  g_free (vm.state);
  tl_tmpdir_free (keep);
}
END_TEST

/* ---- sparse sources ------------------------------------------------------ */

static void
run_ok (const char *const *argv)
{
  g_autofree char *out = NULL;
  int st = tl_run_tool (argv, &out);

  ck_assert_msg (g_spawn_check_wait_status (st, NULL), "%s: %s", argv[0], out);
}

static void
qemu_io_write (const char *img, const char *cmd)
{
  run_ok ((const char *const[]) { "qemu-io", "-f", "qcow2", "-c", cmd, img, NULL });
}

/* A qemu-server 9 shaped virtio-blk drive (throttle → qcow2 → file);
 * QEMU opens the qcow2's backing file from its header. */
static void
add_sparse_drive (GPtrArray *args, const char *key, const char *img)
{
  g_ptr_array_add (args, g_strdup ("-object"));
  g_ptr_array_add (args, g_strdup_printf (
    "{\"id\":\"throttle-drive-%s\",\"limits\":{},\"qom-type\":\"throttle-group\"}", key));
  g_ptr_array_add (args, g_strdup ("-blockdev"));
  g_ptr_array_add (args, g_strdup_printf (
    "{\"driver\":\"throttle\",\"throttle-group\":\"throttle-drive-%s\","
    "\"node-name\":\"drive-%s\",\"file\":{\"driver\":\"qcow2\",\"node-name\":\"f%s\","
    "\"file\":{\"driver\":\"file\",\"filename\":\"%s\",\"node-name\":\"e%s\"}}}",
    key, key, key, img, key));
  g_ptr_array_add (args, g_strdup ("-device"));
  g_ptr_array_add (args, g_strdup_printf ("virtio-blk-pci,drive=drive-%s,id=%s", key, key));
}

/* Backed up without fleecing to fresh files, a qcow2 disk costs what it
 * holds, not its virtual size: what its image never allocated is skipped,
 * the raw target stays sparse.  A linked clone (qcow2 over a backing
 * file) gets its backing file's data all the same: its unallocated areas
 * are not zeroes.  Fleeced (_i 2), the large disk's qcow2 target has the
 * job's 1 MiB clusters: its job writes zeroes over the unallocated areas,
 * 16 times less metadata so; and the clone's target stays sparse too,
 * though snapshot-access hands its unallocated areas to the job as data
 * (zero bytes, which the target turns back into zeroes).  Fleeced to raw
 * (_i 3) the large disk's file would take its full size: the library
 * warns, and the test cancels the slowed backup.  A snapshot between plan
 * and start (_i 4) puts an overlay with a backing file under the throttle
 * node, whose name stays: start decides again, and copies the base. */
START_TEST (test_sparse_source)
{
  static const char *const formats[] = { "raw", "qcow2", "qcow2", "raw", "qcow2" };
  const char *fmt = formats[_i];
  bool fleeced = _i == 2 || _i == 3;
  char *keep = tl_tmpdir_new ("sparse");
  g_autofree char *sparse = g_build_filename (keep, "sparse.qcow2", NULL);
  g_autofree char *base = g_build_filename (keep, "base.qcow2", NULL);
  g_autofree char *clone = g_build_filename (keep, "clone.qcow2", NULL);
  g_autoptr (GPtrArray) args = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GString) log = g_string_new (NULL);
  TlVm vm = { .dir = keep };
  struct fleece_handle *h;
  struct fleece_plan *p;
  struct fleece_target *t;

  /* 64 GiB holding 1.06 MiB; a clone whose 1 MiB lives in its base. */
  run_ok ((const char *const[]) { "qemu-img", "create", "-q", "-f", "qcow2", sparse, "64G", NULL });
  qemu_io_write (sparse, "write -P 0x11 0 64k");
  qemu_io_write (sparse, "write -P 0x22 20G 1M");
  run_ok ((const char *const[]) { "qemu-img", "create", "-q", "-f", "qcow2", base, "4G", NULL });
  qemu_io_write (base, "write -P 0x5a 1G 1M");
  run_ok ((const char *const[]) { "qemu-img", "create", "-q", "-f", "qcow2", "-b", base,
                                  "-F", "qcow2", clone, "4G", NULL });
  qemu_io_write (clone, "write -P 0x33 3G 64k");

  add_sparse_drive (args, "virtio0", sparse);
  add_sparse_drive (args, "virtio1", clone);
  g_ptr_array_add (args, NULL);
  vm.q = tl_qemu_start ((const char *const *) args->pdata);
  tl_vm_record_before (&vm);
  vm.storage = g_build_filename (keep, "storage", NULL);
  vm.target = g_build_filename (keep, "target", NULL);
  vm.state = g_build_filename (keep, "state", NULL);
  ck_assert_int_eq (g_mkdir (vm.storage, 0700), 0);
  ck_assert_int_eq (g_mkdir (vm.target, 0700), 0);

  h = tl_handle (&vm, VMID, log);
  if (!fleeced)
    ck_assert_int_eq (fleece_set_plan_flags (h, FLEECE_PLAN_NO_FLEECING), 0);
  p = tl_plan (h, log);
  ck_assert_int_eq (fleece_plan_get_drive_count (p), 2);
  ck_assert_int_eq (fleece_plan_get_fleeced (p, 0), fleeced);
  if (_i == 4) {
    g_autofree char *ov = g_build_filename (keep, "overlay.qcow2", NULL);

    run_ok ((const char *const[]) { "qemu-img", "create", "-q", "-f", "qcow2", ov, "64G", NULL });
    json_object_put (tl_qmp (vm.q, "blockdev-add", tl_json (
      "{\"driver\": \"qcow2\", \"node-name\": \"ovirtio0\", \"backing\": null, "
      "\"file\": {\"driver\": \"file\", \"filename\": \"%s\"}}", ov)));
    json_object_put (tl_qmp (vm.q, "blockdev-snapshot", tl_json (
      "{\"node\": \"fvirtio0\", \"overlay\": \"ovirtio0\"}")));
  }
  t = fleece_target_new_dir (vm.target, fmt);
  if (_i == 3)
    ck_assert_int_eq (fleece_set_bwlimit (h, 1), 0);
  ck_assert_msg (t && fleece_attach (h, p, 0) == 0 && fleece_start (h, p, t, 0) == 0,
                 "%s\n%s", fleece_get_error (), log->str);
  ck_assert_msg ((strstr (log->str, "virtio0: its raw target file will take the disk's "
                          "full 64.0 GiB") != NULL) == (_i == 3), "%s", log->str);
  ck_assert_ptr_null (strstr (log->str, "virtio1: its raw"));
  if (_i == 3) {
    ck_assert_int_eq (fleece_cancel (h), 0);
    ck_assert_int_eq (tl_wait_end (h, 50), -1);
    ck_assert_int_eq (fleece_cleanup (h, 0), 0);
    tl_assert_nothing_left (&vm, VMID);
    goto out;
  }
  ck_assert_msg (tl_wait_end (h, 50) == 1, "%s\n%s", fleece_get_error (), log->str);
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);

  {
    g_autofree char *name0 = g_strdup_printf ("virtio0.%s", fmt);
    g_autofree char *name1 = g_strdup_printf ("virtio1.%s", fmt);
    g_autofree char *t0 = g_build_filename (vm.target, name0, NULL);
    g_autofree char *t1 = g_build_filename (vm.target, name1, NULL);

    /* Byte for byte the guest's view, the clone's base data included. */
    run_ok ((const char *const[]) { "qemu-img", "compare", "-U", "-f", "qcow2", "-F", fmt,
                                    sparse, t0, NULL });
    run_ok ((const char *const[]) { "qemu-img", "compare", "-U", "-f", "qcow2", "-F", fmt,
                                    clone, t1, NULL });
    /* The data and (qcow2) its metadata, not 64 GiB nor zero clusters
     * all over (8 bytes of L2 per 64 KiB: 8 MiB for 64 GiB). */
    if (!fleeced && _i != 4)
      ck_assert_msg (tl_allocated_bytes (t0) < 3 * MiB, "%s: %" PRIu64 " bytes allocated",
                     t0, tl_allocated_bytes (t0));
    if (strcmp (fmt, "qcow2") == 0) {
      ck_assert_int_eq (qcow2_cluster_size (t0), fleeced ? MiB : 64 * 1024);
      ck_assert_int_eq (qcow2_cluster_size (t1), 64 * 1024);
    }
    if (fleeced)
      ck_assert_msg (tl_allocated_bytes (t1) < 8 * MiB, "%s: %" PRIu64 " bytes allocated "
                     "for 1.06 MiB of data", t1, tl_allocated_bytes (t1));
    ck_assert_msg (tl_allocated_bytes (t1) >= MiB + 64 * 1024, "%s: %" PRIu64 " bytes allocated",
                   t1, tl_allocated_bytes (t1));
  }
out:
  if (_i != 4)
    tl_assert_graph_unchanged (&vm);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  tl_qemu_stop (vm.q);
  g_strfreev (vm.nodes_before);
  g_strfreev (vm.roots_before);
  g_free (vm.graph_before);
  g_free (vm.storage);
  g_free (vm.target);
  g_free (vm.state);
  tl_tmpdir_free (keep);
}
END_TEST

/* ---- qemu-server's own command lines ------------------------------------ */

static const TlCfgOpts small = { .max_size = 8 * MiB, .default_size = 8 * MiB };

START_TEST (test_cfg2cmd_iothread)
{
  TlCfgVm *vm;

  TL_CFG2CMD_START_OR_SKIP (vm, "simple-virtio-blk", &small);
  ck_assert_str_eq (tl_cfg2cmd_drive (vm, "virtio0")->iothread, "iothread-virtio0");
  assert_iothread_guard (vm->vm, "virtio0");
  tl_cfg2cmd_stop (vm);
}
END_TEST

/* A fixture's backup: every drive qemu-server backs up is in the plan by
 * its config key, the EFI disk not fleeced, the rest skipped with a
 * reason; the backup (guest writes racing it) holds the point in time and
 * the graph is as it was, node for node. */
static void
run_fixture (const char *fixture)
{
  TlCfgVm *vm;
  GString *log;
  struct fleece_handle *h;
  struct fleece_plan *p;
  struct fleece_target *t;
  guint8 **pit;
  size_t n = 0;

  TL_CFG2CMD_START_OR_SKIP (vm, fixture, &small);
  log = g_string_new (NULL);
  if (tl_cfg2cmd_drive (vm, "tpmstate0"))
    tl_cfg2cmd_attach_tpm_backup (vm);
  tl_vm_record_before (vm->vm);
  h = tl_handle (vm->vm, VMID, log);
  p = tl_plan (h, log);
  for (size_t i = 0; i < vm->ndrives; i++) {
    const TlCfgDrive *d = &vm->drives[i];
    bool tpm = strcmp (d->key, "tpmstate0") == 0;
    g_autofree char *dev = g_strdup_printf ("drive-%s%s", d->key, tpm ? "-backup" : "");
    int k;

    if (!d->backed_up || !d->attached)
      continue;
    for (k = 0; k < fleece_plan_get_drive_count (p); k++)
      if (strcmp (fleece_plan_get_key (p, k), d->key) == 0)
        break;
    ck_assert_msg (k < fleece_plan_get_drive_count (p), "%s: %s is not in the plan",
                   fixture, d->key);
    ck_assert_str_eq (fleece_plan_get_device (p, k), dev);
    ck_assert_int_eq (fleece_plan_get_size (p, k), (int64_t) d->size);
    ck_assert_int_eq (fleece_plan_get_fleeced (p, k),
                      !d->efidisk && !tpm);
    n++;
  }
  ck_assert_int_eq (fleece_plan_get_drive_count (p), (int) n);
  if (vm->pflash0)
    ck_assert_int_ge (skipped_index (p, "/machine/system.flash0"), 0);
  t = dir_target (vm->vm->target, "raw");
  pit = tl_vm_snapshot (vm->vm);
  fleece_set_bwlimit (h, 8192);
  ck_assert_msg (fleece_attach (h, p, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), log->str);
  for (size_t i = 0; i < vm->ndrives; i++) {
    const TlCfgDrive *d = &vm->drives[i];

    if (d->backed_up && d->attached && d->io_dev && !d->read_only)
      tl_cfg2cmd_guest_io (vm, d->key, "write -P 0x3c 0 64k");
  }
  ck_assert_msg (tl_wait_end (h, 250) == 1, "%s\n%s", fleece_get_error (), log->str);
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);
  tl_assert_nothing_left (vm->vm, VMID);
  tl_assert_graph_unchanged (vm->vm);
  tl_check_point_in_time (vm->vm, pit, vm->vm->target, "raw");
  tl_vm_snapshot_free (vm->vm, pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  g_string_free (log, TRUE);
  tl_cfg2cmd_stop (vm);
}

static const char *const fixtures[] = {
  "efi-secboot-and-tpm-q35", "scsihw-virtio-scsi-single", "efi-raw",
};

START_TEST (test_cfg2cmd_backup)
{
  run_fixture (fixtures[_i]);
}
END_TEST

/* One test case per test, so that CK_RUN_CASE=<name> runs one. */
static void
add (Suite *s, const char *name, const TTest *test, int loop_end)
{
  TCase *tc = tcase_create (name);

  tcase_set_timeout (tc, 120);
  tcase_add_loop_test (tc, test, 0, loop_end);
  suite_add_tcase (s, tc);
}

static Suite *
lifecycle_suite (void)
{
  Suite *s = suite_create ("lifecycle");

  add (s, "plan_shape", test_plan_shape, SHAPE_BLOCKDEV + 1);
  add (s, "full_backup_drive_raw", test_full_backup_drive_raw, 1);
  add (s, "full_backup_blockdev_qcow2", test_full_backup_blockdev_qcow2, 1);
  add (s, "second_run_refused", test_second_run_refused, 1);
  add (s, "kill9_then_cleanup", test_kill9_then_cleanup, 1);
  add (s, "cancel", test_cancel, 1);
  add (s, "qemu_killed", test_qemu_killed, 1);
  add (s, "nbd_target", test_nbd_target, 1);
  add (s, "fd_target", test_fd_target, 1);
  add (s, "iothread_guard", test_iothread_guard, 1);
  add (s, "sparse_source", test_sparse_source, 5);
  add (s, "cfg2cmd_iothread", test_cfg2cmd_iothread, 1);
  add (s, "cfg2cmd_backup", test_cfg2cmd_backup, G_N_ELEMENTS (fixtures));
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
