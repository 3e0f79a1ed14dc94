/* The lifecycle on VMs as qemu-server 9 starts them, for both engines.
 *
 * Each fixture is QEMU started from one of qemu-server's own cfg2cmd
 * command lines (tl-cfg2cmd.h; $FLEECE_QEMU_SERVER_SRC, else every test is
 * skipped with a message), with small local images: the stock engine on
 * stock QEMU ($FLEECE_QEMU) backing up into a directory, the Proxmox
 * engine on Proxmox's patched QEMU ($FLEECE_PVE_QEMU, else those cases are
 * skipped with a message) into a VMA archive.  Each proves: every drive is
 * planned and backed up under its config key (efidisk0, not the QOM path
 * system.flash1; tpmstate0 from qemu-server's drive-tpmstate0-backup),
 * the EFI disk and the TPM state are not fleeced, what is not backed up is
 * in the plan's skipped list with why (firmware code, CD-ROMs); the backup
 * holds the point-in-time bytes while the guest overwrites data ahead of
 * the jobs; after the cleanup nothing is left and the block graph equals
 * the one before, node for node and edge for edge.
 *
 * Iothreads: the stock engine re-points devices (qom-set drive), which
 * QEMU 10.0.0 to 10.0.2 can crash on for a device in an iothread; there
 * the library refuses with ENOTSUP and says what to do, and that refusal
 * is what is tested.  The stock engine's lifecycle on iothread devices
 * runs only when $FLEECE_QEMU is 10.0.3 or later, and is untested where
 * the installed QEMU is older (Debian's bookworm-backports has 10.0.2).
 * The Proxmox engine does not re-point devices and is tested with
 * iothreads. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <check.h>
#include <glib/gstdio.h>

#include "tl-cfg2cmd.h"
#include "fleece/fleece.h"

#define MiB (G_GUINT64_CONSTANT (1024) * 1024)
#define VMID 8006
/* Both engines copy a fleeced drive in chunks of at least 4 MiB and limit
 * the speed between chunks: 8 MiB disks are two chunks, the guest's
 * writes to the last MiB land ahead of the job. */
#define DISK_MAX (8 * MiB)
#define STOCK_KIB_PER_S 2048      /* the jobs run side by side */
#define PVE_KIB_PER_S 4096        /* one after another */
#define PATTERN 0xee

static char *stock_qemu;          /* $FLEECE_QEMU */
static char *pve_qemu;            /* $FLEECE_PVE_QEMU, or NULL */
static char *vma_bin;             /* the patched QEMU's vma tool */

typedef enum { STOCK, PVE } Engine;

typedef struct {
  TlCfgVm *cfg;
  TlVm *tl;            /* cfg->vm: the backed-up drives in key order */
  GString *log;
  Engine engine;
} Vm;

/* ---- the fixture ----------------------------------------------------------- */

/* The fixture on the engine's QEMU with the TPM state attached as
 * qemu-server's backup does; NULL (and why) when it cannot run here. */
static Vm *
vm_start (const char *fixture, Engine engine)
{
  const TlCfgOpts opts = { .max_size = DISK_MAX, .default_size = DISK_MAX };
  g_autoptr (GError) err = NULL;
  Vm *vm;

  if (engine == PVE && !pve_qemu) {
    fprintf (stderr, "SKIPPED (%s, Proxmox engine): set FLEECE_PVE_QEMU to Proxmox's "
             "patched qemu-system-x86_64\n", fixture);
    return NULL;
  }
  g_setenv ("FLEECE_QEMU", engine == PVE ? pve_qemu : stock_qemu, TRUE);
  vm = g_new0 (Vm, 1);
  if (!(vm->cfg = tl_cfg2cmd_new (fixture, &opts, &err))) {
    ck_assert_msg (err->code != TL_CFG2CMD_ERROR_PARSE, "%s", err->message);
    fprintf (stderr, "SKIPPED (%s): %s\n", fixture, err->message);
    g_free (vm);
    return NULL;
  }
  tl_cfg2cmd_launch (vm->cfg, NULL);
  if (tl_cfg2cmd_drive (vm->cfg, "tpmstate0"))
    tl_cfg2cmd_attach_tpm_backup (vm->cfg);
  vm->tl = vm->cfg->vm;
  tl_vm_record_before (vm->tl);
  vm->log = g_string_new (NULL);
  vm->engine = engine;
  return vm;
}

static void
vm_stop (Vm *vm)
{
  g_string_free (vm->log, TRUE);
  tl_cfg2cmd_stop (vm->cfg);
  g_free (vm);
}

/* A data disk the guest writes: a device, writable, not EFI vars/TPM. */
static const TlCfgDrive *
data_drive (Vm *vm, size_t i)
{
  const TlCfgDrive *c = tl_cfg2cmd_drive (vm->cfg, vm->tl->disks[i].key);

  return c && c->io_dev && !c->read_only && !tl_qs_is_small_state (c->key) ? c : NULL;
}

static bool
has_data_disk (Vm *vm)
{
  for (size_t i = 0; i < vm->tl->ndisks; i++)
    if (data_drive (vm, i))
      return true;
  return false;
}

static bool
has_iothread (Vm *vm)
{
  for (size_t i = 0; i < vm->tl->ndisks; i++) {
    const TlCfgDrive *c = tl_cfg2cmd_drive (vm->cfg, vm->tl->disks[i].key);
    if (c && c->iothread)
      return true;
  }
  return false;
}

/* Overwrite the last MiB of every data disk through its guest device. */
static void
overwrite_tails (Vm *vm)
{
  for (size_t i = 0; i < vm->tl->ndisks; i++) {
    const TlDisk *d = &vm->tl->disks[i];
    uint64_t off = (d->size - MIN (MiB, d->size / 2)) & ~G_GUINT64_CONSTANT (4095);
    uint64_t len = (d->size - off) & ~G_GUINT64_CONSTANT (511);
    g_autofree char *cmd = g_strdup_printf ("write -P 0x%02x %" G_GUINT64_FORMAT " %"
                                            G_GUINT64_FORMAT, PATTERN, off, len);

    if (data_drive (vm, i))
      tl_cfg2cmd_guest_io (vm->cfg, d->key, cmd);
  }
}

/* The guest's writes reached the images: the backup's old bytes are the
 * point in time, not the present.  (A flush first: QEMU keeps qcow2
 * metadata in its cache.) */
static void
assert_overwritten (Vm *vm)
{
  for (size_t i = 0; i < vm->tl->ndisks; i++) {
    uint64_t size = 0;
    g_autofree guint8 *now = NULL;

    if (!data_drive (vm, i))
      continue;
    tl_cfg2cmd_guest_io (vm->cfg, vm->tl->disks[i].key, "flush");
    now = tl_read_image (vm->tl->paths[i], vm->tl->disks[i].format, &size);
    ck_assert_msg (now[(size & ~G_GUINT64_CONSTANT (511)) - 1] == PATTERN,
                   "%s: the guest's write is not in the image", vm->tl->disks[i].key);
  }
}

/* ---- the plan ------------------------------------------------------------------ */

/* Every backed-up drive under its config key and qemu-server's device
 * name, with its exact size, fleeced unless EFI vars or TPM state; the
 * rest of what QEMU has in the skipped list with why: the firmware code
 * when there is an EFI disk, every CD-ROM, nothing else. */
static void
assert_plan (Vm *vm, struct fleece_plan *p)
{
  unsigned cdroms = 0, firmware = 0, cdroms_skipped = 0;
  g_autoptr (GString) skipped = g_string_new (NULL);

  ck_assert_int_eq (fleece_plan_get_drive_count (p), (int) vm->tl->ndisks);
  for (int i = 0; i < (int) vm->tl->ndisks; i++) {
    const TlDisk *d = &vm->tl->disks[i];
    g_autofree char *dev = tl_qs_device_of (d->key);

    ck_assert_str_eq (fleece_plan_get_key (p, i), d->key);
    ck_assert_str_eq (fleece_plan_get_device (p, i), dev);
    ck_assert_int_eq (fleece_plan_get_size (p, i), (int64_t) d->size);
    ck_assert_msg (fleece_plan_get_fleeced (p, i) == !tl_qs_is_small_state (d->key),
                   "%s: fleeced %d (%s)", d->key, fleece_plan_get_fleeced (p, i),
                   fleece_plan_get_reason (p, i));
  }
  for (size_t i = 0; i < vm->cfg->ndrives; i++)
    cdroms += vm->cfg->drives[i].cdrom && vm->cfg->drives[i].attached;
  for (int i = 0; i < fleece_plan_get_skipped_count (p); i++) {
    const char *name = fleece_plan_get_skipped_name (p, i);
    const char *why = fleece_plan_get_skipped_reason (p, i);

    g_string_append_printf (skipped, "%s (%s); ", name, why);
    ck_assert_msg (name && *name && why && *why, "a skipped entry without name or reason");
    firmware += strstr (why, "firmware code") != NULL;
    cdroms_skipped += strstr (why, "CD-ROM") != NULL || strcmp (why, "no medium") == 0;
  }
  if (g_getenv ("FLEECE_TEST_VERBOSE"))
    fprintf (stderr, "# %s: skipped %s\n", vm->cfg->name, skipped->str);
  ck_assert_msg (firmware == (vm->cfg->pflash0 ? 1u : 0u) && cdroms_skipped == cdroms &&
                 (unsigned) fleece_plan_get_skipped_count (p) == firmware + cdroms,
                 "%s: skipped %s(expected the firmware code %d, %u CD-ROMs)", vm->cfg->name,
                 skipped->str, vm->cfg->pflash0 != NULL, cdroms);
}

/* ---- the lifecycle ---------------------------------------------------------- */

/* The guest overwrites the tails right after the start: the old bytes go
 * to the fleecing images while the backup still runs. */
static void
race_the_backup (Vm *vm, struct fleece_handle *h)
{
  uint64_t before = tl_dir_allocated_bytes (vm->tl->storage), after;

  overwrite_tails (vm);
  ck_assert_msg (fleece_wait (h, 0) == 0, "%s: the backup ended before the guest wrote",
                 vm->cfg->name);
  after = tl_dir_allocated_bytes (vm->tl->storage);
  ck_assert_msg (after >= before + MiB, "%s: the fleecing images hold %"
                 G_GUINT64_FORMAT " bytes, %" G_GUINT64_FORMAT " before the writes",
                 vm->cfg->name, after, before);
}

/* plan, attach, start, race, wait, clean up; the target is the caller's. */
static void
run (Vm *vm, struct fleece_target *t, uint64_t kib_per_s)
{
  struct fleece_handle *h = tl_handle (vm->tl, VMID, vm->log);
  struct fleece_plan *p = tl_plan (h, vm->log);
  bool race = has_data_disk (vm);
  unsigned fleeced = 0;

  ck_assert_int_eq (fleece_get_engine (h), vm->engine == PVE ? FLEECE_ENGINE_PVE
                                                             : FLEECE_ENGINE_QEMU);
  assert_plan (vm, p);
  for (int i = 0; i < fleece_plan_get_drive_count (p); i++)
    fleeced += fleece_plan_get_fleeced (p, i) == 1;
  ck_assert_int_eq (fleece_set_bwlimit (h, kib_per_s), 0);
  ck_assert_msg (fleece_attach (h, p, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  {
    g_auto (GStrv) images = tl_list_dir (vm->tl->storage);
    ck_assert_uint_eq (g_strv_length (images), fleeced);
  }
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  if (race)
    race_the_backup (vm, h);
  ck_assert_msg (tl_wait_end (h, 200) == 1, "%s\n%s", fleece_get_error (), vm->log->str);
  for (size_t i = 0; i < vm->tl->ndisks; i++)
    ck_assert_str_eq (fleece_get_drive_result (h, vm->tl->disks[i].key), "ok");
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  tl_assert_nothing_left (vm->tl, VMID);
  tl_assert_graph_unchanged (vm->tl);
  if (race)
    assert_overwritten (vm);
  fleece_plan_free (p);
  fleece_free (h);
}

/* The stock engine into a directory: exactly <key>.raw per drive, each
 * the point-in-time content. */
static void
lifecycle_stock (Vm *vm)
{
  struct fleece_target *t = fleece_target_new_dir (vm->tl->target, "raw");
  guint8 **pit = tl_vm_snapshot (vm->tl);
  g_autoptr (GString) want = g_string_new (NULL);
  g_auto (GStrv) files = NULL;
  g_autofree char *got = NULL;

  ck_assert_msg (t, "%s", fleece_get_error ());
  run (vm, t, STOCK_KIB_PER_S);
  for (size_t i = 0; i < vm->tl->ndisks; i++)
    g_string_append_printf (want, "%s%s.raw", i ? " " : "", vm->tl->disks[i].key);
  files = tl_list_dir (vm->tl->target);
  got = g_strjoinv (" ", files);
  ck_assert_str_eq (got, want->str);
  tl_check_point_in_time (vm->tl, pit, vm->tl->target, "raw");
  tl_vm_snapshot_free (vm->tl, pit);
  fleece_target_free (t);
}

/* The Proxmox engine into a VMA archive: it extracts (every cluster of
 * every stream there) to disk-drive-<key>.raw per drive (the TPM state
 * as drive-tpmstate0-backup), each the point-in-time content. */
static void
lifecycle_pve (Vm *vm)
{
  g_autofree char *archive = g_build_filename (vm->tl->target, "vzdump-qemu-8006.vma", NULL);
  g_autofree char *dir = g_build_filename (vm->tl->dir, "extract", NULL);
  g_autofree char *json = g_strdup_printf ("{\"backup-file\": \"%s\", \"format\": \"vma\"}",
                                           archive);
  const char *extract[] = { vma_bin, "extract", archive, dir, NULL };
  struct fleece_target *t = fleece_target_new_pve (json);
  guint8 **pit = tl_vm_snapshot (vm->tl);
  g_autofree char *out = NULL;
  g_auto (GStrv) files = NULL;
  int status;

  ck_assert_msg (t, "%s", fleece_get_error ());
  run (vm, t, PVE_KIB_PER_S);
  status = tl_run_tool (extract, &out);
  ck_assert_msg (WIFEXITED (status) && WEXITSTATUS (status) == 0, "vma extract: %s", out);
  files = tl_list_dir (dir);
  ck_assert_uint_eq (g_strv_length (files), vm->tl->ndisks);
  for (size_t i = 0; i < vm->tl->ndisks; i++) {
    g_autofree char *dev = tl_qs_device_of (vm->tl->disks[i].key);
    g_autofree char *name = g_strdup_printf ("disk-%s.raw", dev);
    g_autofree char *path = g_build_filename (dir, name, NULL);
    g_autofree char *what = g_strdup_printf ("%s in the VMA", vm->tl->disks[i].key);

    tl_assert_image_equals (path, "raw", pit[i], vm->tl->disks[i].size, what);
  }
  tl_vm_snapshot_free (vm->tl, pit);
  fleece_target_free (t);
}

/* QEMU 10.0.0 to 10.0.2: qom-set drive crashes a device in an iothread. */
static bool
qemu_has_iothread_bug (Vm *vm)
{
  json_object *v = tl_qmp (vm->tl->q, "query-version", NULL), *q, *x;
  int major, minor, micro;

  ck_assert (json_object_object_get_ex (v, "qemu", &q));
  major = json_object_object_get_ex (q, "major", &x) ? json_object_get_int (x) : 0;
  minor = json_object_object_get_ex (q, "minor", &x) ? json_object_get_int (x) : 0;
  micro = json_object_object_get_ex (q, "micro", &x) ? json_object_get_int (x) : 0;
  json_object_put (v);
  return major == 10 && minor == 0 && micro <= 2;
}

/* The stock engine refuses before it touches anything, and says what to
 * do instead. */
static void
refuse_iothreads (Vm *vm)
{
  struct fleece_handle *h = tl_handle (vm->tl, VMID, vm->log);

  ck_assert_ptr_null (fleece_plan (h));
  ck_assert_int_eq (fleece_get_errno (), ENOTSUP);
  ck_assert_msg (strstr (fleece_get_error (), "runs in an iothread") &&
                 strstr (fleece_get_error (), "10.0.3") &&
                 strstr (fleece_get_error (), "Proxmox's QEMU"), "%s", fleece_get_error ());
  fprintf (stderr, "%s: stock engine with iothreads refused as expected on this QEMU; its "
           "lifecycle there needs QEMU >= 10.0.3 (untested here)\n", vm->cfg->name);
  tl_assert_nothing_left (vm->tl, VMID);
  tl_assert_graph_unchanged (vm->tl);
  fleece_free (h);
}

static void
lifecycle (const char *fixture, Engine engine)
{
  Vm *vm = vm_start (fixture, engine);

  if (!vm)
    return;
  if (engine == PVE)
    lifecycle_pve (vm);
  else if (has_iothread (vm) && qemu_has_iothread_bug (vm))
    refuse_iothreads (vm);
  else
    lifecycle_stock (vm);
  vm_stop (vm);
}

/* ---- the fixtures ------------------------------------------------------------ */

/* i440fx, the EFI vars disk alone on -machine pflash1 (raw, 128 KiB). */
START_TEST (test_efi_raw_stock) { lifecycle ("efi-raw", STOCK); }
END_TEST
START_TEST (test_efi_raw_pve) { lifecycle ("efi-raw", PVE); }
END_TEST

/* q35, 4m EFI vars with secure boot, a TPM: drive-tpmstate0-backup. */
START_TEST (test_efi_tpm_q35_stock) { lifecycle ("efi-secboot-and-tpm-q35", STOCK); }
END_TEST
START_TEST (test_efi_tpm_q35_pve) { lifecycle ("efi-secboot-and-tpm-q35", PVE); }
END_TEST

/* Five SCSI disks, each on its own virtio-scsi controller. */
START_TEST (test_scsi_single_stock) { lifecycle ("scsihw-virtio-scsi-single", STOCK); }
END_TEST
START_TEST (test_scsi_single_pve) { lifecycle ("scsihw-virtio-scsi-single", PVE); }
END_TEST

/* virtio-blk in an iothread, an empty CD-ROM. */
START_TEST (test_virtio_blk_stock) { lifecycle ("simple-virtio-blk", STOCK); }
END_TEST
START_TEST (test_virtio_blk_pve) { lifecycle ("simple-virtio-blk", PVE); }
END_TEST

/* q35, a SCSI disk and four IDE CD-ROMs with media. */
START_TEST (test_q35_ide_stock) { lifecycle ("q35-ide", STOCK); }
END_TEST
START_TEST (test_q35_ide_pve) { lifecycle ("q35-ide", PVE); }
END_TEST

/* qcow2 disks over external-snapshot backing chains. */
START_TEST (test_backing_chain_stock) { lifecycle ("simple-backingchain", STOCK); }
END_TEST
START_TEST (test_backing_chain_pve) { lifecycle ("simple-backingchain", PVE); }
END_TEST

static Suite *
fixtures_suite (void)
{
  Suite *s = suite_create ("fixtures");
  TCase *tc = tcase_create ("fixtures");

  tcase_set_timeout (tc, 120);
  tcase_add_test (tc, test_efi_raw_stock);
  tcase_add_test (tc, test_efi_raw_pve);
  tcase_add_test (tc, test_efi_tpm_q35_stock);
  tcase_add_test (tc, test_efi_tpm_q35_pve);
  tcase_add_test (tc, test_scsi_single_stock);
  tcase_add_test (tc, test_scsi_single_pve);
  tcase_add_test (tc, test_virtio_blk_stock);
  tcase_add_test (tc, test_virtio_blk_pve);
  tcase_add_test (tc, test_q35_ide_stock);
  tcase_add_test (tc, test_q35_ide_pve);
  tcase_add_test (tc, test_backing_chain_stock);
  tcase_add_test (tc, test_backing_chain_pve);
  suite_add_tcase (s, tc);
  return s;
}

/* The patched QEMU and its vma tool (next to it, else in PATH). */
static void
find_pve_qemu (void)
{
  const char *qemu = g_getenv ("FLEECE_PVE_QEMU");
  g_autofree char *dir = NULL;
  g_autofree char *vma = NULL;

  if (!qemu || !*qemu || !g_file_test (qemu, G_FILE_TEST_IS_EXECUTABLE))
    return;
  dir = g_path_get_dirname (qemu);
  vma = g_build_filename (dir, "vma", NULL);
  vma_bin = g_file_test (vma, G_FILE_TEST_IS_EXECUTABLE) ? g_steal_pointer (&vma)
                                                         : g_find_program_in_path ("vma");
  if (vma_bin)
    pve_qemu = g_strdup (qemu);
  else
    fprintf (stderr, "no vma tool next to %s or in PATH: the Proxmox engine's cases "
             "are skipped\n", qemu);
}

int
main (void)
{
  g_autoptr (GError) err = NULL;
  SRunner *sr;
  int failed;

  if (!tl_cfg2cmd_dir (&err)) {
    printf ("SKIP: %s\n", err->message);
    return 77;
  }
  stock_qemu = g_strdup (g_getenv ("FLEECE_QEMU") && *g_getenv ("FLEECE_QEMU")
                         ? g_getenv ("FLEECE_QEMU") : "qemu-system-x86_64");
  find_pve_qemu ();
  sr = srunner_create (fixtures_suite ());
  srunner_run_all (sr, CK_VERBOSE);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  g_free (stock_qemu);
  g_free (pve_qemu);
  g_free (vma_bin);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
