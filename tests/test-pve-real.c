/* The Proxmox engine end to end against Proxmox's real patched QEMU
 * (pve-qemu-kvm: $FLEECE_PVE_QEMU names its qemu-system-x86_64, e.g. a
 * build of pve-qemu or a Proxmox host's /usr/bin/kvm; its vma tool is
 * next to it or in PATH).  Without one the suite is skipped (exit 77).
 *
 * VMs of both shapes qemu-server starts: the qemu-server 8 shape built
 * here (-drive, EFI vars on -drive if=pflash,unit=1, the TPM state as a
 * -drive drive-tpmstate0-backup) and qemu-server 9 command lines from its
 * cfg2cmd fixtures ($FLEECE_QEMU_SERVER_SRC, tl-cfg2cmd.h; those cases
 * are skipped with a message without it).
 *
 * What it proves: a VMA archive (to a file, and through a pipe into zstd)
 * holds the point-in-time bytes of every drive while the guest overwrites
 * data ahead of the backup (checked with vma extract, which fails on a
 * missing cluster; vma verify does not); a cancelled backup is ended
 * before its fleecing images are detached (same handle, and from the
 * record after the process died), nothing is left and the partial archive
 * does not extract; the patched QEMU's own size-mismatch and missing-image
 * refusals reach the caller; backup access leaves snapshot-access nodes
 * that read back over NBD as the setup-time content while the guest
 * writes on; and pve-double (tests/pve-double.c, what test-pve.c runs on)
 * gives the same answers as the real patched QEMU to what the Proxmox
 * engine relies on ($FLEECE_PVE_DOUBLE over stock $FLEECE_QEMU). */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
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
#define KiB G_GUINT64_CONSTANT (1024)
#define VMID 100
#define EFI_VARS_SIZE (528 * KiB)  /* a 4m OVMF efidisk */
/* The patched QEMU copies a fleeced drive in chunks of at least 4 MiB and
 * limits the speed between chunks, so a data disk is a few chunks long
 * for the guest's writes to land ahead of its job. */
#define DATA_DISK_MAX (8 * MiB)
#define VMA_KIB_PER_S 4096

static char *vma_bin;              /* the patched QEMU's vma tool */
static char *stock_qemu;           /* $FLEECE_QEMU as given: stock QEMU, or NULL */

/* ---- VMs -------------------------------------------------------------------- */

typedef struct {
  TlVm *tl;            /* disks (in key order), dirs, QEMU */
  TlCfgVm *cfg;        /* a qemu-server 9 fixture, or NULL for the -drive VM */
  GString *log;        /* the library's log */
} Vm;

/* The qemu-server 8 shape: the EFI vars on pflash1, two SCSI disks (one of
 * a size that is no whole KiB), the TPM state attached for the backup only
 * (no guest device, read-only), a virtio-blk disk. */
static const TlDisk drive_disks[] = {
  { "efidisk0", "raw", EFI_VARS_SIZE, "none", false },
  { "scsi0", "qcow2", 12 * MiB, "scsi", true },
  { "scsi1", "raw", 8 * MiB + 1536, "scsi", true },
  { "tpmstate0", "raw", 1 * MiB + 1536, "none", false },
  { "virtio0", "raw", 8 * MiB, "virtio", true },
};

static const char *const firmware_dirs[] = {
  "/usr/share/seabios", "/usr/lib/ipxe/qemu", "/usr/share/qemu", NULL,
};

static void
add_arg2 (GPtrArray *a, const char *opt, char *val)
{
  g_ptr_array_add (a, g_strdup (opt));
  g_ptr_array_add (a, val);
}

/* What qemu-server 8 gives QEMU for the EFI disk and, during a backup, the
 * TPM state: pflash0 (firmware code, read-only), pflash1 drive-efidisk0,
 * and drive-tpmstate0-backup without a device. */
static Vm *
vm_drive_start (void)
{
  Vm *vm = g_new0 (Vm, 1);
  g_autoptr (GPtrArray) args = g_ptr_array_new_with_free_func (g_free);
  g_autofree char *code = NULL;
  int fd;

  vm->log = g_string_new (NULL);
  vm->tl = tl_vm_new ("pve-real", drive_disks, G_N_ELEMENTS (drive_disks), 1);
  code = g_build_filename (vm->tl->dir, "pflash0-code.fd", NULL);
  fd = open (code, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  ck_assert (fd >= 0 && ftruncate (fd, (off_t) (2 * MiB)) == 0);
  close (fd);
  for (size_t i = 0; firmware_dirs[i]; i++)
    if (g_file_test (firmware_dirs[i], G_FILE_TEST_IS_DIR))
      add_arg2 (args, "-L", g_strdup (firmware_dirs[i]));
  add_arg2 (args, "-drive", g_strdup_printf ("if=pflash,unit=0,format=raw,readonly=on,file=%s",
                                             code));
  add_arg2 (args, "-drive", g_strdup_printf ("if=pflash,unit=1,id=drive-efidisk0,format=raw,"
                                             "file=%s", vm->tl->paths[0]));
  add_arg2 (args, "-drive", g_strdup_printf ("file=%s,if=none,id=drive-tpmstate0-backup,"
                                             "format=raw,readonly=on", vm->tl->paths[3]));
  g_ptr_array_add (args, NULL);
  tl_vm_start (vm->tl, (const char *const *) args->pdata);
  return vm;
}

/* A qemu-server 9 fixture with small images, the TPM state attached as
 * qemu-server's backup does; NULL (and a message) if it cannot run. */
static Vm *
vm_fixture_start (const char *fixture, uint64_t max_size)
{
  Vm *vm = g_new0 (Vm, 1);
  const TlCfgOpts opts = { .max_size = max_size, .default_size = max_size };
  g_autoptr (GError) err = NULL;

  vm->cfg = tl_cfg2cmd_new (fixture, &opts, &err);
  if (!vm->cfg) {
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
  return vm;
}

static void
vm_stop (Vm *vm)
{
  g_string_free (vm->log, TRUE);
  if (vm->cfg)
    tl_cfg2cmd_stop (vm->cfg);
  else
    tl_vm_stop (vm->tl);
  g_free (vm);
}

/* What HMP qemu-io -d takes for the guest device of disk i, or NULL if the
 * guest cannot write it (the TPM state: no device). */
static const char *
guest_dev (Vm *vm, size_t i)
{
  const TlDisk *d = &vm->tl->disks[i];

  if (vm->cfg) {
    const TlCfgDrive *c = tl_cfg2cmd_drive (vm->cfg, d->key);
    return c && !c->read_only ? c->io_dev : NULL;
  }
  if (strcmp (d->key, "efidisk0") == 0)
    return "/machine/system.flash1";
  return strcmp (d->bus, "none") == 0 ? NULL : tl_disk_qdev (d);
}

/* Overwrite the last 1 MiB (half of a smaller disk) of every data disk
 * (and the EFI vars too if efi) through its guest device: ahead of the
 * backup, whose jobs start at 0 and run one after another. */
static void
overwrite_tail (Vm *vm, unsigned pattern, bool efi)
{
  for (size_t i = 0; i < vm->tl->ndisks; i++) {
    const TlDisk *d = &vm->tl->disks[i];
    uint64_t len = MIN (MiB, d->size / 2);
    uint64_t off = (d->size - len) & ~G_GUINT64_CONSTANT (4095);
    const char *dev = guest_dev (vm, i);
    g_autofree char *cmd = NULL;

    if (!dev || (tl_qs_is_small_state (d->key) && !efi))
      continue;
    len = (d->size - off) & ~G_GUINT64_CONSTANT (511);
    cmd = g_strdup_printf ("write -P 0x%02x %" G_GUINT64_FORMAT " %" G_GUINT64_FORMAT,
                           pattern, off, len);
    tl_guest_io (vm->tl->q, dev, cmd);
  }
}

/* The guest's writes went through: every disk overwrite_tail wrote now
 * ends in pattern (so a backup holding the old bytes holds the point in
 * time, not the present).  (A flush first: QEMU keeps qcow2 metadata in
 * its cache.) */
static void
assert_overwritten (Vm *vm, unsigned pattern, bool efi)
{
  for (size_t i = 0; i < vm->tl->ndisks; i++) {
    const TlDisk *d = &vm->tl->disks[i];
    uint64_t size = 0;
    g_autofree guint8 *now = NULL;

    if (!guest_dev (vm, i) || (tl_qs_is_small_state (d->key) && !efi))
      continue;
    tl_guest_io (vm->tl->q, guest_dev (vm, i), "flush");
    now = tl_read_image (vm->tl->paths[i], d->format, &size);
    ck_assert_msg (now[(size & ~G_GUINT64_CONSTANT (511)) - 1] == pattern,
                   "%s: the guest's write is not in the image", d->key);
  }
}

static bool
has_data_disk (Vm *vm)
{
  for (size_t i = 0; i < vm->tl->ndisks; i++)
    if (guest_dev (vm, i) && !tl_qs_is_small_state (vm->tl->disks[i].key))
      return true;
  return false;
}

static struct fleece_handle *
vm_handle (Vm *vm)
{
  struct fleece_handle *h = tl_handle (vm->tl, VMID, vm->log);

  ck_assert_int_eq (fleece_get_engine (h), FLEECE_ENGINE_PVE);
  return h;
}

static bool
qemu_answers (Vm *vm)
{
  g_autofree char *e = NULL;
  json_object *r = tl_qmp_try (vm->tl->q, "query-status", NULL, &e);

  json_object_put (r);
  return r != NULL;
}

/* Nothing of the run is left, the graph is as before, and QEMU still
 * serves its monitor (detaching a fleecing image under a running backup
 * deadlocks the patched QEMU). */
static void
assert_nothing_left (Vm *vm)
{
  ck_assert_msg (qemu_answers (vm), "QEMU does not answer:\n%s", vm->log->str);
  tl_assert_nothing_left (vm->tl, VMID);
  tl_assert_graph_unchanged (vm->tl);
}

/* The library cancelled (or tore down) the backup before it detached the
 * first fleecing image. */
static void
assert_ended_before_detach (Vm *vm, const char *end_line)
{
  const char *end = strstr (vm->log->str, end_line);
  const char *detach = strstr (vm->log->str, "detaching ");

  ck_assert_msg (end, "no \"%s\" in the log:\n%s", end_line, vm->log->str);
  ck_assert_msg (detach && detach > end, "detached before \"%s\":\n%s", end_line,
                 vm->log->str);
}

/* ---- VMA ---------------------------------------------------------------------- */

static struct fleece_target *
vma_file_target (Vm *vm, const char *archive)
{
  g_autofree char *conf = g_build_filename (vm->tl->dir, "qemu-server.conf", NULL);
  g_autofree char *json = NULL;
  struct fleece_target *t;

  ck_assert (g_file_set_contents (conf, "memory: 512\n# fleece test\n", -1, NULL));
  json = g_strdup_printf ("{\"backup-file\": \"%s\", \"format\": \"vma\", "
                          "\"config-file\": \"%s\"}", archive, conf);
  t = fleece_target_new_pve (json);
  ck_assert_msg (t, "%s", fleece_get_error ());
  return t;
}

static void
run_tool_ok (const char *const *argv)
{
  g_autofree char *out = NULL;
  int status = tl_run_tool (argv, &out);

  ck_assert_msg (WIFEXITED (status) && WEXITSTATUS (status) == 0, "%s %s failed:\n%s",
                 argv[0], argv[1], out);
}

static int
vma_extract (const char *archive, char **output)
{
  g_autofree char *dir = g_strconcat (archive, ".extract", NULL);
  const char *argv[] = { vma_bin, "extract", archive, dir, NULL };

  return tl_run_tool (argv, output);
}

/* The archive extracts (vma extract checks every cluster of every
 * stream), with the config and exactly the VM's drives, each equal to its
 * point-in-time content. */
static void
assert_vma_holds (Vm *vm, const char *archive, bool config, guint8 **pit)
{
  g_autofree char *dir = g_strconcat (archive, ".extract", NULL);
  g_autofree char *out = NULL;
  g_autofree char *conf = g_build_filename (dir, "qemu-server.conf", NULL);
  g_auto (GStrv) files = NULL;
  g_autofree char *list = NULL;
  int status = vma_extract (archive, &out);

  ck_assert_msg (WIFEXITED (status) && WEXITSTATUS (status) == 0,
                 "vma extract %s failed:\n%s", archive, out);
  files = tl_list_dir (dir);
  ck_assert_msg (g_strv_length (files) == vm->tl->ndisks + config, "%s holds %s",
                 archive, (list = g_strjoinv (" ", files)));
  ck_assert_msg (g_file_test (conf, G_FILE_TEST_EXISTS) == config, "config in the archive: %d",
                 !config);
  for (size_t i = 0; i < vm->tl->ndisks; i++) {
    g_autofree char *dev = tl_qs_device_of (vm->tl->disks[i].key);
    g_autofree char *name = g_strdup_printf ("disk-%s.raw", dev);
    g_autofree char *path = g_build_filename (dir, name, NULL);
    g_autofree char *what = g_strdup_printf ("%s in the VMA", vm->tl->disks[i].key);

    tl_assert_image_equals (path, "raw", pit[i], vm->tl->disks[i].size, what);
  }
}

/* The archive of a cancelled backup does not extract. */
static void
assert_vma_incomplete (const char *archive)
{
  g_autofree char *out = NULL;
  int status = vma_extract (archive, &out);

  ck_assert_msg (!(WIFEXITED (status) && WEXITSTATUS (status) == 0),
                 "vma extract took the archive of a cancelled backup:\n%s", out);
  ck_assert_msg (strstr (out, "missing cluster"), "vma extract: %s", out);
}

/* The plan of a default Proxmox-engine run: every drive of the VM under
 * its config key and qemu-server's device name, all but the EFI disk and
 * the TPM state fleeced, and the firmware code among the skipped. */
static void
assert_plan (Vm *vm, struct fleece_plan *p)
{
  bool firmware = false;

  ck_assert_int_eq (fleece_plan_get_drive_count (p), (int) vm->tl->ndisks);
  for (int i = 0; i < (int) vm->tl->ndisks; i++) {
    const TlDisk *d = &vm->tl->disks[i];
    g_autofree char *dev = tl_qs_device_of (d->key);

    ck_assert_str_eq (fleece_plan_get_key (p, i), d->key);
    ck_assert_str_eq (fleece_plan_get_device (p, i), dev);
    ck_assert_int_eq (fleece_plan_get_size (p, i), (int64_t) d->size);
    ck_assert_int_eq (fleece_plan_get_fleeced (p, i), !tl_qs_is_small_state (d->key));
  }
  for (int i = 0; i < fleece_plan_get_skipped_count (p); i++) {
    const char *why = fleece_plan_get_skipped_reason (p, i);

    ck_assert_msg (why && *why, "%s skipped without a reason",
                   fleece_plan_get_skipped_name (p, i));
    firmware |= strstr (why, "firmware code") != NULL;
  }
  /* A VM with an EFI disk has the firmware code on pflash0. */
  if (!vm->cfg || vm->cfg->pflash0)
    ck_assert_msg (firmware, "pflash0 is not among the skipped drives");
}

/* The guest overwrites the tails right after the start: the old bytes go
 * to the fleecing images while the backup still runs. */
static void
race_the_backup (Vm *vm, struct fleece_handle *h)
{
  uint64_t before = tl_dir_allocated_bytes (vm->tl->storage), after;

  overwrite_tail (vm, 0xee, false);
  ck_assert_msg (fleece_wait (h, 0) == 0, "the backup ended before the guest wrote: "
                 "it does not race the backup (lower the speed)");
  after = tl_dir_allocated_bytes (vm->tl->storage);
  ck_assert_msg (after >= before + MiB, "the fleecing images hold only %"
                 G_GUINT64_FORMAT " bytes (%" G_GUINT64_FORMAT " before the writes)",
                 after, before);
}

/* attach, start, the guest races the backup, wait, clean up: the archive
 * is the point in time, nothing is left. */
static void
run_vma (Vm *vm, struct fleece_target *t, uint64_t kib_per_s)
{
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_plan *p = tl_plan (h, vm->log);
  bool race = has_data_disk (vm);
  int r;

  assert_plan (vm, p);
  ck_assert_int_eq (fleece_set_bwlimit (h, kib_per_s), 0);
  ck_assert_msg (fleece_attach (h, p, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  if (race)
    race_the_backup (vm, h);
  r = tl_wait_end (h, 200);
  ck_assert_msg (r == 1, "%s\n%s", fleece_get_error (), vm->log->str);
  for (size_t i = 0; i < vm->tl->ndisks; i++)
    ck_assert_str_eq (fleece_get_drive_result (h, vm->tl->disks[i].key), "ok");
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  assert_nothing_left (vm);
  if (race)
    assert_overwritten (vm, 0xee, false);
  fleece_plan_free (p);
  fleece_free (h);
}

static void
vma_to_file (Vm *vm)
{
  g_autofree char *archive = g_build_filename (vm->tl->target, "vzdump-qemu-100.vma", NULL);
  struct fleece_target *t = vma_file_target (vm, archive);
  guint8 **pit = tl_vm_snapshot (vm->tl);

  run_vma (vm, t, VMA_KIB_PER_S);
  assert_vma_holds (vm, archive, true, pit);
  tl_vm_snapshot_free (vm->tl, pit);
  fleece_target_free (t);
}

/* qemu-server 8: -drive, the EFI vars on pflash1, the TPM state as a
 * BlockBackend without a device. */
START_TEST (test_vma_drive_shape)
{
  Vm *vm = vm_drive_start ();

  vma_to_file (vm);
  vm_stop (vm);
}
END_TEST

/* qemu-server 9: throttle nodes over format and file nodes, the EFI vars
 * on -machine pflash1, the TPM state as a node without a BlockBackend,
 * virtio-scsi-single (a controller per disk). */
START_TEST (test_vma_blockdev_shape)
{
  static const char *const fixtures[] = { "scsihw-virtio-scsi-single",
                                          "efi-secboot-and-tpm-q35" };

  for (size_t i = 0; i < G_N_ELEMENTS (fixtures); i++) {
    Vm *vm = vm_fixture_start (fixtures[i], DATA_DISK_MAX);

    if (!vm)
      continue;
    vma_to_file (vm);
    vm_stop (vm);
  }
}
END_TEST

/* ---- a VMA archive through a pipe ------------------------------------------------ */

/* zstd reading the pipe's other end into file. */
static GPid
spawn_compressor (int read_fd, const char *file)
{
  const char *argv[] = { "zstd", "-q", "-c", NULL };
  g_autoptr (GError) err = NULL;
  int out = open (file, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  GPid pid;

  ck_assert_int_ge (out, 0);
  ck_assert_msg (g_spawn_async_with_fds (NULL, (char **) argv, NULL,
                                         G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD,
                                         NULL, NULL, &pid, read_fd, out, -1, &err),
                 "zstd: %s", err ? err->message : "");
  close (out);
  return pid;
}

/* What vzdump does: the VMA into a pipe, a compressor at the other end;
 * here on a qemu-server 9 VM with iothreads (the Proxmox engine never
 * re-points devices, so iothreads are safe on it). */
START_TEST (test_vma_pipe)
{
  g_autofree char *have_zstd = g_find_program_in_path ("zstd");
  g_autofree char *zst = NULL, *archive = NULL;
  struct fleece_target *t;
  guint8 **pit;
  int pfd[2], status;
  GPid zstd;
  Vm *vm;

  if (!have_zstd) {
    fprintf (stderr, "SKIPPED (test_vma_pipe): no zstd in PATH\n");
    return;
  }
  if (!(vm = vm_fixture_start ("bootorder", DATA_DISK_MAX)))
    return;
  zst = g_build_filename (vm->tl->target, "vzdump-qemu-100.vma.zst", NULL);
  archive = g_build_filename (vm->tl->target, "vzdump-qemu-100.vma", NULL);
  ck_assert_int_eq (pipe2 (pfd, O_CLOEXEC), 0);
  zstd = spawn_compressor (pfd[0], zst);
  close (pfd[0]);
  t = fleece_target_new_fd (pfd[1], "vma");
  ck_assert_msg (t, "%s", fleece_get_error ());
  pit = tl_vm_snapshot (vm->tl);
  run_vma (vm, t, VMA_KIB_PER_S);
  /* The last writer gone, zstd ends. */
  fleece_target_free (t);
  ck_assert_int_eq (waitpid (zstd, &status, 0), zstd);
  g_spawn_close_pid (zstd);
  ck_assert_msg (WIFEXITED (status) && WEXITSTATUS (status) == 0, "zstd failed");
  {
    const char *argv[] = { "zstd", "-q", "-d", zst, "-o", archive, NULL };
    run_tool_ok (argv);
  }
  /* An fd target has no way to add qemu-server's config: none. */
  assert_vma_holds (vm, archive, false, pit);
  tl_vm_snapshot_free (vm->tl, pit);
  vm_stop (vm);
}
END_TEST

/* ---- cancel before detach ------------------------------------------------------------ */

#define SLOW_KIB_PER_S 1024
/* The VMA writer writes whole extents of 59 64 KiB clusters: a backup
 * cancelled before the first is out leaves an empty archive. */
#define VMA_EXTENT (59 * 64 * KiB)

/* attach and start a backup slow enough to cancel it midway, and wait
 * until it has written data (the archive then has a header and clusters,
 * and lacks the rest). */
static void
start_slow (Vm *vm, struct fleece_handle *h, struct fleece_plan *p,
            struct fleece_target *t)
{
  uint64_t done = 0, total = 0;

  ck_assert_int_eq (fleece_set_bwlimit (h, SLOW_KIB_PER_S), 0);
  ck_assert_msg (fleece_attach (h, p, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  for (int i = 0; i < 50 && done <= VMA_EXTENT; i++) {
    ck_assert_int_eq (fleece_wait (h, 100), 0);
    ck_assert_int_eq (fleece_get_progress (h, &done, &total), 0);
  }
  ck_assert_msg (done > VMA_EXTENT && done < total, "progress %" G_GUINT64_FORMAT " of %"
                 G_GUINT64_FORMAT, done, total);
}

/* fleece_cancel midway.  With wait, fleece_wait sends the cancel and
 * reports it, then the cleanup detaches what the ended backup held;
 * without, the cleanup itself cancels and waits for the end before it
 * detaches. */
static void
cancel_on_handle (Vm *vm, bool wait)
{
  g_autofree char *archive = g_build_filename (vm->tl->target, wait ? "cancelled.vma"
                                                                    : "cleaned.vma", NULL);
  struct fleece_target *t = vma_file_target (vm, archive);
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_plan *p = tl_plan (h, vm->log);

  start_slow (vm, h, p, t);
  ck_assert_int_eq (fleece_cancel (h), 0);
  if (wait) {
    ck_assert_int_eq (tl_wait_end (h, 200), -1);
    ck_assert_int_eq (fleece_get_errno (), ECANCELED);
    ck_assert_str_eq (fleece_get_drive_result (h, "scsi0"), "cancelled");
  }
  g_string_truncate (vm->log, 0);
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  if (!wait)
    assert_ended_before_detach (vm, "cancelling the running backup");
  assert_nothing_left (vm);
  assert_vma_incomplete (archive);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
}

/* The process running the backup dies; a cleanup from its record alone
 * cancels the backup and waits for its end before it detaches anything. */
static void
cancel_after_crash (Vm *vm)
{
  g_autofree char *archive = g_build_filename (vm->tl->target, "crashed.vma", NULL);
  struct fleece_handle *h;
  int pipefd[2];
  pid_t pid;
  char c;

  ck_assert_int_eq (pipe (pipefd), 0);
  pid = fork ();
  ck_assert_int_ge (pid, 0);
  if (pid == 0) {
    struct fleece_handle *ch = fleece_new ();
    struct fleece_target *t = vma_file_target (vm, archive);
    struct fleece_plan *p;
    uint64_t done = 0, total;

    if (fleece_set_state_dir (ch, vm->tl->state) < 0 || fleece_set_vmid (ch, VMID) < 0 ||
        fleece_connect (ch, vm->tl->q->qmp_path) < 0 ||
        fleece_set_storage (ch, fleece_storage_new_dir (vm->tl->storage)) < 0 ||
        fleece_set_bwlimit (ch, SLOW_KIB_PER_S) < 0 || !(p = fleece_plan (ch)) ||
        fleece_attach (ch, p, 0) < 0 || fleece_start (ch, p, t, 0) < 0) {
      fprintf (stderr, "child: %s\n", fleece_get_error ());
      _exit (1);
    }
    while (done <= VMA_EXTENT && fleece_wait (ch, 100) == 0)
      fleece_get_progress (ch, &done, &total);
    if (write (pipefd[1], "s", 1) != 1)
      _exit (1);
    pause ();
    _exit (0);
  }
  close (pipefd[1]);
  ck_assert_msg (read (pipefd[0], &c, 1) == 1, "the child did not start the backup");
  close (pipefd[0]);
  kill (pid, SIGKILL);
  waitpid (pid, NULL, 0);
  ck_assert_int_gt (tl_job_count (vm->tl->q), 0);

  /* Not connected: the record names the QEMU and the storage. */
  g_string_truncate (vm->log, 0);
  h = tl_handle_on (vm->tl, VMID, vm->log, NULL);
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  assert_ended_before_detach (vm, "cancelling the running backup");
  assert_nothing_left (vm);
  assert_vma_incomplete (archive);
  fleece_free (h);
}

START_TEST (test_cancel_before_detach)
{
  Vm *vm = vm_drive_start ();

  cancel_on_handle (vm, true);
  cancel_on_handle (vm, false);
  cancel_after_crash (vm);
  vm_stop (vm);
}
END_TEST

/* ---- the patched QEMU's refusals ------------------------------------------------------ */

/* A caller's storage that allocates qcow2 images one MiB larger than
 * asked for. */
static int
big_alloc (void *user_data, const char *name, const char *format, uint64_t size,
           char **volid, char **reason)
{
  g_autofree char *path = g_build_filename (user_data, name, NULL);
  g_autofree char *bytes = g_strdup_printf ("%" G_GUINT64_FORMAT, size + MiB);
  const char *argv[] = { "qemu-img", "create", "-q", "-f", format, path, bytes, NULL };

  if (g_file_test (path, G_FILE_TEST_EXISTS)) {
    *reason = strdup ("exists");
    return -1;
  }
  run_tool_ok (argv);
  *volid = strdup (name);
  return 0;
}

static int
big_remove (void *user_data, const char *volid, char **reason)
{
  g_autofree char *path = g_build_filename (user_data, volid, NULL);

  return unlink (path) == 0 || errno == ENOENT ? 0 : -1;
}

static char *
big_path (void *user_data, const char *volid, char **reason)
{
  return g_build_filename (user_data, volid, NULL);
}

static void
wrong_size_storage (Vm *vm)
{
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_storage *st = fleece_storage_new_callback ("test:big", FLEECE_STORAGE_QCOW2 |
                                                           FLEECE_STORAGE_PATH,
                                                           vm->tl->storage, NULL);
  struct fleece_plan *p;

  ck_assert_int_eq (fleece_storage_set_alloc_callback (st, big_alloc), 0);
  ck_assert_int_eq (fleece_storage_set_remove_callback (st, big_remove), 0);
  ck_assert_int_eq (fleece_storage_set_path_callback (st, big_path), 0);
  ck_assert_int_eq (fleece_set_storage (h, st), 0);
  p = tl_plan (h, vm->log);
  ck_assert_int_eq (fleece_attach (h, p, 0), -1);
  ck_assert_int_eq (fleece_get_errno (), EINVAL);
  ck_assert_msg (strstr (fleece_get_error (), "size mismatch for drive-scsi0-fleecing"),
                 "%s", fleece_get_error ());
  assert_nothing_left (vm);
  fleece_plan_free (p);
  fleece_free (h);
}

/* Images changed behind the library's back between attach and start: the
 * patched QEMU's own words reach the caller. */
static void
changed_images (Vm *vm)
{
  g_autofree char *archive = g_build_filename (vm->tl->target, "refused.vma", NULL);
  struct fleece_target *t = vma_file_target (vm, archive);
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_plan *p = tl_plan (h, vm->log);
  int64_t size = fleece_plan_get_size (p, 0);
  g_autofree char *mismatch = NULL;
  json_object *r;

  ck_assert_str_eq (fleece_plan_get_key (p, 0), "scsi0");
  ck_assert_msg (fleece_attach (h, p, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  r = tl_qmp (vm->tl->q, "block_resize", tl_json ("{\"node-name\": \"drive-scsi0-fleecing\", "
                                                  "\"size\": %" G_GINT64_FORMAT "}", size + 512));
  json_object_put (r);
  ck_assert_int_eq (fleece_start (h, p, t, 0), -1);
  ck_assert_int_eq (fleece_get_errno (), EINVAL);
  mismatch = g_strdup_printf ("Size mismatch for 'drive-scsi0-fleecing' - sector count %"
                              G_GINT64_FORMAT " != %" G_GINT64_FORMAT, size / 512 + 1,
                              size / 512);
  ck_assert_msg (strstr (fleece_get_error (), mismatch), "%s", fleece_get_error ());
  ck_assert_msg (strstr (fleece_get_error (), "fleece_start: the fleecing image of scsi0"),
                 "%s", fleece_get_error ());
  ck_assert (!g_file_test (archive, G_FILE_TEST_EXISTS));

  r = tl_qmp (vm->tl->q, "blockdev-del", tl_json ("{\"node-name\": \"drive-scsi0-fleecing\"}"));
  json_object_put (r);
  ck_assert_int_eq (fleece_start (h, p, t, 0), -1);
  ck_assert_int_eq (fleece_get_errno (), ENOENT);
  ck_assert_msg (strstr (fleece_get_error (), "Device 'drive-scsi0-fleecing' not found"),
                 "%s", fleece_get_error ());
  ck_assert_msg (strstr (fleece_get_error (), "QEMU has no fleecing image "
                         "drive-scsi0-fleecing for scsi0"), "%s", fleece_get_error ());

  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  assert_nothing_left (vm);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
}

START_TEST (test_refusals)
{
  Vm *vm = vm_fixture_start ("simple1", 4 * MiB);

  if (!vm)
    return;
  wrong_size_storage (vm);
  changed_images (vm);
  vm_stop (vm);
}
END_TEST

/* ---- backup access for external providers ----------------------------------------------- */

static const char *
jstr (json_object *o, const char *key)
{
  json_object *v;
  return json_object_object_get_ex (o, key, &v) ? json_object_get_string (v) : NULL;
}

static void
wait_exports_gone (Vm *vm)
{
  for (int i = 0; i < 100; i++) {
    json_object *r = tl_qmp (vm->tl->q, "query-block-exports", NULL);
    size_t n = json_object_array_length (r);

    json_object_put (r);
    if (n == 0)
      return;
    g_usleep (20 * 1000);
  }
  ck_abort_msg ("the NBD exports do not go away");
}

/* What a provider does: export each snapshot-access node over NBD (on the
 * test's own monitor) and read it; it holds the setup-time content. */
static void
read_exports (Vm *vm, struct fleece_handle *h, guint8 **pit)
{
  g_autofree char *sock = g_build_filename (vm->tl->dir, "nbd.sock", NULL);
  json_object *r;

  r = tl_qmp (vm->tl->q, "nbd-server-start",
              tl_json ("{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"%s\"}}}", sock));
  json_object_put (r);
  for (size_t i = 0; i < vm->tl->ndisks; i++) {
    const TlDisk *d = &vm->tl->disks[i];
    json_object *acc = tl_record_access (h, d->key);
    g_autofree char *uri = g_strdup_printf ("nbd+unix:///%s?socket=%s", d->key, sock);
    g_autofree char *out = g_strdup_printf ("%s/%s.export", vm->tl->target, d->key);
    g_autofree char *what = g_strdup_printf ("the NBD export of %s", d->key);
    const char *convert[] = { "qemu-img", "convert", "-q", "-f", "raw", "-O", "raw", uri, out,
                              NULL };

    ck_assert_uint_eq ((uint64_t) json_object_get_int64 (json_object_object_get (acc, "size")),
                       d->size);
    r = tl_qmp (vm->tl->q, "block-export-add",
                tl_json ("{\"type\": \"nbd\", \"id\": \"exp-%s\", \"node-name\": \"%s\","
                         " \"name\": \"%s\", \"writable\": false}", d->key,
                         jstr (acc, "node-name"), d->key));
    json_object_put (r);
    run_tool_ok (convert);
    tl_assert_image_equals (out, "raw", pit[i], d->size, what);
    r = tl_qmp (vm->tl->q, "block-export-del", tl_json ("{\"id\": \"exp-%s\"}", d->key));
    json_object_put (r);
    json_object_put (acc);
  }
  wait_exports_gone (vm);
  r = tl_qmp (vm->tl->q, "nbd-server-stop", NULL);
  json_object_put (r);
}

/* backup-access-setup for every drive (the patched QEMU wants a
 * <device>-fleecing for each, EFI disk and TPM state included), the
 * guest writes on, the exports read as at the setup; the cleanup tears
 * the access down as successful before it detaches. */
static void
run_access (Vm *vm)
{
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_target *t = fleece_target_new_pve ("{\"target-id\": \"t1\", "
                                                   "\"bitmap-mode\": \"none\"}");
  guint8 **pit = tl_vm_snapshot (vm->tl);
  struct fleece_plan *p;

  ck_assert_int_eq (fleece_set_plan_flags (h, FLEECE_PLAN_ALL_DRIVES), 0);
  p = tl_plan (h, vm->log);
  ck_assert_int_eq (fleece_plan_get_drive_count (p), (int) vm->tl->ndisks);
  for (int i = 0; i < (int) vm->tl->ndisks; i++)
    ck_assert_int_eq (fleece_plan_get_fleeced (p, i), 1);
  ck_assert_msg (fleece_attach (h, p, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  overwrite_tail (vm, 0xa5, true);
  read_exports (vm, h, pit);
  ck_assert_int_eq (fleece_wait (h, 100), 0);
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  assert_ended_before_detach (vm, "tearing down the backup access (success)");
  assert_nothing_left (vm);
  assert_overwritten (vm, 0xa5, true);
  tl_vm_snapshot_free (vm->tl, pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
}

START_TEST (test_access_drive_shape)
{
  Vm *vm = vm_drive_start ();

  run_access (vm);
  vm_stop (vm);
}
END_TEST

START_TEST (test_access_blockdev_shape)
{
  static const char *const fixtures[] = { "efi-secboot-and-tpm-q35", "simple-virtio-blk" };

  for (size_t i = 0; i < G_N_ELEMENTS (fixtures); i++) {
    Vm *vm = vm_fixture_start (fixtures[i], 2 * MiB);

    if (!vm)
      continue;
    run_access (vm);
    vm_stop (vm);
  }
}
END_TEST

/* ---- pve-double answers as the real patched QEMU --------------------------------- */

/* One line per answer: "return <json>" or "<class>: <desc>". */
static void
say (GString *out, FleeceQmp *q, const char *what, const char *cmd, json_object *args)
{
  g_autoptr (GError) err = NULL;
  json_object *r = fleece_qmp_execute (q, cmd, args, &err);

  if (r)
    g_string_append_printf (out, "%s: return %s\n", what,
                            json_object_to_json_string_ext (r, JSON_C_TO_STRING_PLAIN));
  else
    g_string_append_printf (out, "%s: %s: %s\n", what, fleece_qmp_last_error_class (q),
                            fleece_qmp_last_error_desc (q) ? fleece_qmp_last_error_desc (q)
                                                           : err->message);
  json_object_put (r);
}

static void
must (FleeceQmp *q, const char *cmd, json_object *args)
{
  g_autoptr (GError) err = NULL;
  json_object *r = fleece_qmp_execute (q, cmd, args, &err);

  ck_assert_msg (r, "%s: %s", cmd, err->message);
  json_object_put (r);
}

/* A qcow2 image attached as node name of size bytes. */
static void
add_image (FleeceQmp *q, Vm *vm, const char *name, uint64_t size)
{
  g_autofree char *path = g_strdup_printf ("%s/%s.qcow2", vm->tl->dir, name);
  g_autofree char *bytes = g_strdup_printf ("%" G_GUINT64_FORMAT, size);
  const char *argv[] = { "qemu-img", "create", "-q", "-f", "qcow2", path, bytes, NULL };

  g_unlink (path);
  run_tool_ok (argv);
  must (q, "blockdev-add", tl_json ("{\"driver\": \"qcow2\", \"node-name\": \"%s\", "
                                    "\"file\": {\"driver\": \"file\", \"filename\": \"%s\"}}",
                                    name, path));
}

static gint
cmp_str (gconstpointer a, gconstpointer b)
{
  return strcmp (*(char *const *) a, *(char *const *) b);
}

/* "id=status ..." of the jobs, in id order. */
static char *
job_states (FleeceQmp *q)
{
  g_autoptr (GError) err = NULL;
  json_object *jobs = fleece_qmp_execute (q, "query-jobs", NULL, &err);
  g_autoptr (GPtrArray) lines = g_ptr_array_new_with_free_func (g_free);

  ck_assert_msg (jobs, "%s", err->message);
  for (size_t i = 0; i < json_object_array_length (jobs); i++) {
    json_object *j = json_object_array_get_idx (jobs, i);
    g_ptr_array_add (lines, g_strdup_printf ("%s=%s", jstr (j, "id"), jstr (j, "status")));
  }
  json_object_put (jobs);
  g_ptr_array_sort (lines, cmp_str);
  g_ptr_array_add (lines, NULL);
  return g_strjoinv (" ", (char **) lines->pdata);
}

/* The answers of a Proxmox QMP endpoint (the drive VM behind it) to what
 * the Proxmox engine relies on. */
static char *
pve_transcript (FleeceQmp *q, Vm *vm)
{
  GString *out = g_string_new (NULL);
  g_autofree char *file = g_build_filename (vm->tl->target, "t.vma", NULL);
  g_autofree char *args = g_strdup_printf ("{\"backup-file\": \"%s\", \"format\": \"vma\", "
                                           "\"devlist\": \"drive-efidisk0,drive-scsi0\", "
                                           "\"fleecing\": true, \"speed\": 1048576}", file);
  const char *access = "{\"target-id\": \"x\", \"devices\": [{\"device\": \"drive-efidisk0\"},"
                       " {\"device\": \"drive-scsi0\"}]}";
  g_autofree char *jobs = NULL;
  json_object *st;

  say (out, q, "query-backup before any", "query-backup", NULL);
  say (out, q, "backup without a fleecing image", "backup", tl_json ("%s", args));
  add_image (q, vm, "drive-scsi0-fleecing", 6 * MiB);
  say (out, q, "backup with a small one", "backup", tl_json ("%s", args));
  must (q, "blockdev-del", tl_json ("{\"node-name\": \"drive-scsi0-fleecing\"}"));
  add_image (q, vm, "drive-scsi0-fleecing", 12 * MiB);
  say (out, q, "access without the EFI disk's", "backup-access-setup", tl_json ("%s", access));
  ck_assert (!g_file_test (file, G_FILE_TEST_EXISTS));
  must (q, "backup", tl_json ("%s", args));
  /* The last device first; the EFI disk is never fleeced. */
  for (int i = 0; i < 100; i++) {
    g_free (jobs);
    jobs = job_states (q);
    if (strstr (jobs, "drive-scsi0=running"))
      break;
    g_usleep (20 * 1000);
  }
  g_string_append_printf (out, "jobs: %s\n", jobs);
  say (out, q, "cancel", "backup-cancel", NULL);
  st = fleece_qmp_execute (q, "query-backup", NULL, NULL);
  ck_assert_ptr_nonnull (st);
  g_string_append_printf (out, "at once: status %s, errmsg %s, jobs [%s]\n", jstr (st, "status"),
                          jstr (st, "errmsg"), (g_free (jobs), jobs = job_states (q)));
  json_object_put (st);
  say (out, q, "detach", "blockdev-del", tl_json ("{\"node-name\": \"drive-scsi0-fleecing\"}"));
  say (out, q, "cancel again", "backup-cancel", NULL);
  return g_string_free (out, FALSE);
}

static const char pve_answers[] =
  "query-backup before any: return {\"finishing\":false}\n"
  "backup without a fleecing image: DeviceNotFound: Device 'drive-scsi0-fleecing' not found\n"
  "backup with a small one: GenericError: Size mismatch for 'drive-scsi0-fleecing' - sector "
  "count 12288 != 24576\n"
  "access without the EFI disk's: DeviceNotFound: Device 'drive-efidisk0-fleecing' not found\n"
  "jobs: drive-efidisk0=created drive-scsi0=running\n"
  "cancel: return {}\n"
  "at once: status error, errmsg backup canceled, jobs []\n"
  "detach: return {}\n"
  "cancel again: return {}\n";

/* pve-double, the stand-in test-pve.c runs on, over a stock QEMU. */
static GPid
double_start (Vm *vm, const char *sock)
{
  g_autofree char *listen = g_strdup_printf ("--listen=%s", sock);
  g_autofree char *qemu = g_strdup_printf ("--qemu=%s", vm->tl->q->qmp_path);
  const char *argv[] = { g_getenv ("FLEECE_PVE_DOUBLE"), listen, qemu, NULL };
  g_autoptr (GError) err = NULL;
  GPid pid;

  ck_assert_msg (g_spawn_async (NULL, (char **) argv, NULL, G_SPAWN_DO_NOT_REAP_CHILD, NULL,
                                NULL, &pid, &err), "%s", err ? err->message : "");
  for (int i = 0; i < 1000 && !g_file_test (sock, G_FILE_TEST_EXISTS); i++)
    g_usleep (10 * 1000);
  ck_assert_msg (g_file_test (sock, G_FILE_TEST_EXISTS), "pve-double did not come up");
  return pid;
}

static char *
transcript_of (bool through_double)
{
  Vm *vm;
  g_autoptr (FleeceQmp) q = fleece_qmp_new ();
  g_autoptr (GError) err = NULL;
  g_autofree char *sock = NULL;
  GPid dbl = 0;
  char *text;

  /* The double runs over stock QEMU. */
  if (through_double)
    g_setenv ("FLEECE_QEMU", stock_qemu, TRUE);
  vm = vm_drive_start ();
  g_setenv ("FLEECE_QEMU", g_getenv ("FLEECE_PVE_QEMU"), TRUE);
  sock = through_double ? g_build_filename (vm->tl->dir, "pve.sock", NULL)
                        : g_strdup (vm->tl->q->qmp_path);
  if (through_double)
    dbl = double_start (vm, sock);
  ck_assert_msg (fleece_qmp_connect_unix (q, sock, &err), "%s", err->message);
  text = pve_transcript (q, vm);
  g_clear_pointer (&q, fleece_qmp_free);
  if (dbl > 0) {
    kill (dbl, SIGTERM);
    waitpid (dbl, NULL, 0);
    g_spawn_close_pid (dbl);
  }
  vm_stop (vm);
  return text;
}

/* The answers the Proxmox engine relies on, from the real patched QEMU,
 * and the same from pve-double (when the suite is given it). */
START_TEST (test_double_answers_as_real)
{
  g_autofree char *real = transcript_of (false);
  g_autofree char *dbl = NULL;

  ck_assert_str_eq (real, pve_answers);
  if (!g_getenv ("FLEECE_PVE_DOUBLE") || !stock_qemu) {
    fprintf (stderr, "test_double_answers_as_real: no FLEECE_PVE_DOUBLE or FLEECE_QEMU: "
             "pve-double not compared\n");
    return;
  }
  dbl = transcript_of (true);
  ck_assert_str_eq (dbl, pve_answers);
}
END_TEST

/* ---- main -------------------------------------------------------------------------------- */

static Suite *
pve_real_suite (void)
{
  Suite *s = suite_create ("pve-real");
  TCase *tc = tcase_create ("pve-real");

  tcase_set_timeout (tc, 180);
  tcase_add_test (tc, test_vma_drive_shape);
  tcase_add_test (tc, test_vma_blockdev_shape);
  tcase_add_test (tc, test_vma_pipe);
  tcase_add_test (tc, test_cancel_before_detach);
  tcase_add_test (tc, test_refusals);
  tcase_add_test (tc, test_access_drive_shape);
  tcase_add_test (tc, test_access_blockdev_shape);
  tcase_add_test (tc, test_double_answers_as_real);
  suite_add_tcase (s, tc);
  return s;
}

/* The patched QEMU's vma tool: next to its QEMU (a build tree, or
 * /usr/bin on a Proxmox host), else in PATH. */
static char *
find_vma (const char *qemu)
{
  g_autofree char *dir = g_path_get_dirname (qemu);
  char *vma = g_build_filename (dir, "vma", NULL);

  if (g_file_test (vma, G_FILE_TEST_IS_EXECUTABLE))
    return vma;
  g_free (vma);
  return g_find_program_in_path ("vma");
}

int
main (void)
{
  const char *qemu = g_getenv ("FLEECE_PVE_QEMU");
  SRunner *sr;
  int failed;

  if (!qemu || !*qemu || !g_file_test (qemu, G_FILE_TEST_IS_EXECUTABLE)) {
    printf ("SKIP: the pve-real suite needs Proxmox's patched QEMU: set FLEECE_PVE_QEMU to "
            "its qemu-system-x86_64 (%s)\n", qemu && *qemu ? "not an executable" : "unset");
    return 77;
  }
  if (!(vma_bin = find_vma (qemu))) {
    printf ("SKIP: no vma tool next to %s or in PATH\n", qemu);
    return 77;
  }
  /* testlib and tl-cfg2cmd start $FLEECE_QEMU. */
  if (g_getenv ("FLEECE_QEMU") && *g_getenv ("FLEECE_QEMU"))
    stock_qemu = g_strdup (g_getenv ("FLEECE_QEMU"));
  g_setenv ("FLEECE_QEMU", qemu, TRUE);
  sr = srunner_create (pve_real_suite ());
  srunner_run_all (sr, CK_VERBOSE);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  g_free (vma_bin);
  g_free (stock_qemu);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
