/* The cfg2cmd fixture helper (tl-cfg2cmd.h): QEMU started from
 * qemu-server's own command lines comes up with every drive where the
 * helper says it is.  Needs $FLEECE_QEMU_SERVER_SRC (a qemu-server source
 * tree); without it every test is skipped with a message. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <glib/gstdio.h>

#include "tl-cfg2cmd.h"

#define MiB (G_GUINT64_CONSTANT (1024) * 1024)

static bool
have_source (const char *test)
{
  g_autoptr (GError) err = NULL;

  if (tl_cfg2cmd_dir (&err))
    return true;
  fprintf (stderr, "%s: SKIPPED: %s\n", test, err->message);
  return false;
}

static json_object *
find_block (json_object *blocks, const TlCfgDrive *d)
{
  size_t n = json_object_array_length (blocks);

  for (size_t i = 0; i < n; i++) {
    json_object *b = json_object_array_get_idx (blocks, i);
    json_object *v;
    const char *qdev;

    if (!json_object_object_get_ex (b, "qdev", &v))
      continue;
    qdev = json_object_get_string (v);
    if (g_strcmp0 (qdev, d->io_dev) == 0 || g_strcmp0 (qdev, d->qdev_id) == 0)
      return b;
  }
  return NULL;
}

static const char *
jstr (json_object *o, const char *key)
{
  json_object *v;

  return o && json_object_object_get_ex (o, key, &v)
         ? json_object_get_string (v) : NULL;
}

/* Every drive the helper lists is in query-block where it says (node,
 * BlockBackend name, size, read-only), and every guest device's drive is
 * one the helper lists (pflash0, the firmware code, aside). */
static void
check_drives (TlCfgVm *vm)
{
  json_object *blocks = tl_qmp (vm->q, "query-block", NULL);
  size_t n = json_object_array_length (blocks);
  size_t seen = 0;

  for (size_t i = 0; i < vm->ndrives; i++) {
    const TlCfgDrive *d = &vm->drives[i];
    json_object *b, *ins, *img, *v;

    if (!d->attached)
      continue;
    b = find_block (blocks, d);
    ck_assert_msg (b, "%s: drive %s (qdev %s) not in query-block: %s",
                   vm->name, d->key, d->io_dev,
                   json_object_to_json_string (blocks));
    seen++;
    if (d->blk_name)
      ck_assert_str_eq (jstr (b, "device"), d->blk_name);
    else
      ck_assert_str_eq (jstr (b, "device"), "");
    if (!d->path) {
      ck_assert_msg (!json_object_object_get_ex (b, "inserted", &ins),
                     "%s: %s should be an empty CD-ROM", vm->name, d->key);
      continue;
    }
    ck_assert_msg (json_object_object_get_ex (b, "inserted", &ins),
                   "%s: %s has no medium", vm->name, d->key);
    if (d->top_node)
      ck_assert_str_eq (jstr (ins, "node-name"), d->top_node);
    ck_assert (json_object_object_get_ex (ins, "image", &img)
               && json_object_object_get_ex (img, "virtual-size", &v));
    ck_assert_msg ((uint64_t) json_object_get_int64 (v) == d->size,
                   "%s: %s is %" G_GINT64_FORMAT " bytes, expected %"
                   G_GUINT64_FORMAT, vm->name, d->key,
                   (gint64) json_object_get_int64 (v), (guint64) d->size);
    ck_assert (json_object_object_get_ex (ins, "ro", &v));
    ck_assert_msg (json_object_get_boolean (v) == d->read_only,
                   "%s: %s ro %d", vm->name, d->key,
                   json_object_get_boolean (v));
  }
  for (size_t i = 0; i < n; i++) {
    const char *qdev = jstr (json_object_array_get_idx (blocks, i), "qdev");

    if (qdev && strcmp (qdev, "/machine/system.flash0") != 0)
      ck_assert_msg (seen-- > 0, "%s: query-block has a device the helper "
                     "does not list: %s", vm->name, qdev);
  }
  json_object_put (blocks);
}

/* Writes through each writable drive's guest device reach its image. */
static void
check_guest_io (TlCfgVm *vm)
{
  for (size_t i = 0; i < vm->ndrives; i++) {
    const TlCfgDrive *d = &vm->drives[i];

    if (!d->attached || !d->path || d->read_only || !d->io_dev)
      continue;
    tl_cfg2cmd_guest_io (vm, d->key, "write -P 0xa5 4096 4096");
    tl_cfg2cmd_guest_io (vm, d->key, "read -P 0xa5 4096 4096");
    if (!vm->snapshot && strcmp (d->format, "raw") == 0
        && g_strv_length (d->layers) == 1) {
      g_autofree guint8 *buf = tl_read_file (d->path, 4096, 16);

      for (size_t j = 0; j < 16; j++)
        ck_assert_int_eq (buf[j], 0xa5);
    }
  }
}

static const TlCfgOpts small = {
  .max_size = 16 * MiB, .fill = TL_CFG_FILL_SPARSE,
};

/* ---- the fixtures the lifecycle tests use ------------------------------ */

START_TEST (test_efi_raw)
{
  TlCfgVm *vm;
  const TlCfgDrive *efi;

  if (!have_source (__func__))
    return;
  TL_CFG2CMD_START_OR_SKIP (vm, "efi-raw", NULL);
  check_drives (vm);
  ck_assert (vm->blockdev);
  ck_assert_uint_eq (vm->ndrives, 1);
  efi = tl_cfg2cmd_drive (vm, "efidisk0");
  ck_assert (efi && efi->efidisk && efi->blockdev && efi->backed_up);
  /* The EFI vars disk is exactly the JSON size; the code file beside it
   * makes 2 MiB of flash. */
  ck_assert_uint_eq (efi->size, 131072);
  ck_assert_str_eq (efi->size_from, "json");
  ck_assert_str_eq (efi->top_node, "drive-efidisk0");
  ck_assert_str_eq (efi->qom_path, "/machine/system.flash1");
  ck_assert_ptr_null (efi->qdev_id);
  ck_assert_ptr_nonnull (vm->pflash0);
  ck_assert_uint_eq (vm->vm->ndisks, 1);
  ck_assert_str_eq (vm->vm->disks[0].key, "efidisk0");
  ck_assert (!vm->vm->disks[0].fleeced);
  /* /machine/system.flash1 addresses the pflash device for qemu-io -d */
  tl_cfg2cmd_guest_io (vm, "efidisk0", "write -P 0x5c 0 65536");
  {
    g_autofree guint8 *buf = tl_read_file (efi->path, 0, 65536);

    for (size_t i = 0; i < 65536; i++)
      ck_assert_int_eq (buf[i], 0x5c);
  }
  tl_cfg2cmd_stop (vm);
}
END_TEST

START_TEST (test_efi_secboot_tpm_q35)
{
  TlCfgVm *vm;
  const TlCfgDrive *efi, *tpm;
  json_object *nodes;
  bool found = false;

  if (!have_source (__func__))
    return;
  TL_CFG2CMD_START_OR_SKIP (vm, "efi-secboot-and-tpm-q35", NULL);
  check_drives (vm);
  ck_assert (vm->q35);
  efi = tl_cfg2cmd_drive (vm, "efidisk0");
  ck_assert (efi && efi->size == 540672);
  tpm = tl_cfg2cmd_drive (vm, "tpmstate0");
  ck_assert (tpm && !tpm->attached && tpm->size == 4 * MiB);
  ck_assert_uint_eq (vm->vm->ndisks, 1);

  /* What qemu-server's backup attaches for the swtpm state */
  tl_cfg2cmd_attach_tpm_backup (vm);
  ck_assert_uint_eq (vm->vm->ndisks, 2);
  ck_assert_str_eq (vm->vm->disks[1].key, "tpmstate0");
  nodes = tl_qmp (vm->q, "query-named-block-nodes",
                  tl_json ("{\"flat\": true}"));
  for (size_t i = 0; i < json_object_array_length (nodes); i++) {
    json_object *nd = json_object_array_get_idx (nodes, i), *img, *v;

    if (g_strcmp0 (jstr (nd, "node-name"), "drive-tpmstate0-backup") != 0)
      continue;
    ck_assert (json_object_object_get_ex (nd, "image", &img)
               && json_object_object_get_ex (img, "virtual-size", &v));
    ck_assert_int_eq (json_object_get_int64 (v), 4 * MiB);
    found = true;
  }
  json_object_put (nodes);
  ck_assert (found);
  tl_cfg2cmd_detach_tpm_backup (vm);
  tl_cfg2cmd_stop (vm);
}
END_TEST

START_TEST (test_simple_virtio_blk)
{
  TlCfgVm *vm;
  const TlCfgDrive *d, *cd;
  json_object *threads;

  if (!have_source (__func__))
    return;
  TL_CFG2CMD_START_OR_SKIP (vm, "simple-virtio-blk", &small);
  check_drives (vm);
  check_guest_io (vm);
  d = tl_cfg2cmd_drive (vm, "virtio0");
  ck_assert (d && d->blockdev);
  ck_assert_str_eq (d->format, "qcow2");
  ck_assert_str_eq (d->io_dev, "/machine/peripheral/virtio0/virtio-backend");
  ck_assert_str_eq (d->qom_path, "/machine/peripheral/virtio0");
  ck_assert_str_eq (d->iothread, "iothread-virtio0");
  ck_assert_str_eq (d->size_from, "capped");
  cd = tl_cfg2cmd_drive (vm, "ide2");
  ck_assert (cd && cd->cdrom && !cd->path && !cd->backed_up);
  threads = tl_qmp (vm->q, "query-iothreads", NULL);
  ck_assert_uint_eq (json_object_array_length (threads), 1);
  ck_assert_str_eq (jstr (json_object_array_get_idx (threads, 0), "id"),
                    "iothread-virtio0");
  json_object_put (threads);
  tl_cfg2cmd_stop (vm);
}
END_TEST

START_TEST (test_scsihw_virtio_scsi_single)
{
  static const char *const keys[] = {
    "scsi0", "scsi1", "scsi16", "scsi5", "scsi9", NULL,
  };
  TlCfgVm *vm;
  guint8 **snap;

  if (!have_source (__func__))
    return;
  TL_CFG2CMD_START_OR_SKIP (vm, "scsihw-virtio-scsi-single", &small);
  check_drives (vm);
  check_guest_io (vm);
  /* key order is a plain string sort, as the plan's */
  ck_assert_uint_eq (vm->vm->ndisks, 5);
  for (size_t i = 0; keys[i]; i++) {
    const TlCfgDrive *d = tl_cfg2cmd_drive (vm, keys[i]);
    g_autofree char *node = g_strdup_printf ("drive-%s", keys[i]);
    json_object *id;

    ck_assert_str_eq (vm->vm->disks[i].key, keys[i]);
    ck_assert (vm->vm->disks[i].fleeced);
    ck_assert (d && d->blockdev);
    ck_assert_str_eq (d->device_driver, "scsi-hd");
    ck_assert_str_eq (d->device_id_prop, node);
    ck_assert_str_eq (d->qdev_id, keys[i]);
    id = tl_qmp (vm->q, "qom-get", tl_json (
      "{\"path\": \"%s\", \"property\": \"device_id\"}", d->qom_path));
    ck_assert_str_eq (json_object_get_string (id), node);
    json_object_put (id);
  }
  /* host_device leaves became local files, usable as TlVm disks */
  snap = tl_vm_snapshot (vm->vm);
  ck_assert_int_eq (snap[0][4096], 0xa5);
  tl_vm_snapshot_free (vm->vm, snap);
  tl_cfg2cmd_stop (vm);
}
END_TEST

/* ---- more shapes --------------------------------------------------------- */

START_TEST (test_drive_shape)
{
  TlCfgVm *vm;
  const TlCfgDrive *d;

  if (!have_source (__func__))
    return;
  /* a pinned machine version: qemu-server 8's -drive */
  TL_CFG2CMD_START_OR_SKIP (vm, "pinned-version", &small);
  check_drives (vm);
  check_guest_io (vm);
  ck_assert (!vm->blockdev);
  d = tl_cfg2cmd_drive (vm, "scsi0");
  ck_assert (d && !d->blockdev && !d->top_node);
  ck_assert_str_eq (d->blk_name, "drive-scsi0");
  tl_cfg2cmd_stop (vm);
}
END_TEST

START_TEST (test_backing_chain)
{
  TlCfgVm *vm;
  const TlCfgDrive *d;
  guint8 **snap;

  if (!have_source (__func__))
    return;
  TL_CFG2CMD_START_OR_SKIP (vm, "simple-backingchain", &small);
  check_drives (vm);
  check_guest_io (vm);
  d = tl_cfg2cmd_drive (vm, "scsi0");
  ck_assert (d && g_strv_length (d->layers) == 3);
  /* the top image reads through its backing files */
  snap = tl_vm_snapshot (vm->vm);
  ck_assert (memcmp (snap[0], "cfg2cmd seed", 12) == 0);
  tl_vm_snapshot_free (vm->vm, snap);
  tl_cfg2cmd_stop (vm);
}
END_TEST

/* Every fixture of the tree that can run here comes up as described. */
START_TEST (test_all_fixtures)
{
  g_autoptr (GError) err = NULL;
  g_auto (GStrv) names = NULL;
  const TlCfgOpts tiny = { .max_size = 4 * MiB, .fill = TL_CFG_FILL_ZERO };
  unsigned ran = 0, skipped = 0;

  if (!have_source (__func__))
    return;
  names = tl_cfg2cmd_list (&err);
  ck_assert_msg (names, "%s", err ? err->message : "");
  for (size_t i = 0; names[i]; i++) {
    g_autoptr (GError) e = NULL;
    TlCfgVm *vm = tl_cfg2cmd_new (names[i], &tiny, &e);

    if (!vm) {
      ck_assert_msg (e->code == TL_CFG2CMD_ERROR_UNSUPPORTED,
                     "%s", e->message);
      fprintf (stderr, "test_all_fixtures: skipped %s\n", e->message);
      skipped++;
      continue;
    }
    tl_cfg2cmd_launch (vm, NULL);
    check_drives (vm);
    check_guest_io (vm);
    tl_cfg2cmd_stop (vm);
    ran++;
  }
  fprintf (stderr, "test_all_fixtures: %u ran, %u skipped\n", ran, skipped);
  ck_assert_uint_ge (ran, 4);
}
END_TEST

/* ---- without qemu-server --------------------------------------------------- */

START_TEST (test_no_source)
{
  g_autoptr (GError) err = NULL;
  g_autofree char *saved = g_strdup (g_getenv ("FLEECE_QEMU_SERVER_SRC"));

  g_unsetenv ("FLEECE_QEMU_SERVER_SRC");
  ck_assert_ptr_null (tl_cfg2cmd_new ("efi-raw", NULL, &err));
  ck_assert (g_error_matches (err, TL_CFG2CMD_ERROR,
                              TL_CFG2CMD_ERROR_NO_SOURCE));
  ck_assert (strstr (err->message, "FLEECE_QEMU_SERVER_SRC"));
  g_clear_error (&err);
  g_setenv ("FLEECE_QEMU_SERVER_SRC", "/nonexistent", TRUE);
  ck_assert_ptr_null (tl_cfg2cmd_new ("efi-raw", NULL, &err));
  ck_assert (g_error_matches (err, TL_CFG2CMD_ERROR,
                              TL_CFG2CMD_ERROR_NO_SOURCE));
  if (saved)
    g_setenv ("FLEECE_QEMU_SERVER_SRC", saved, TRUE);
  else
    g_unsetenv ("FLEECE_QEMU_SERVER_SRC");
}
END_TEST

/* A command line of our own, for the parser: quoting, continuations,
 * what is dropped and rewritten, an unsupported storage. */
START_TEST (test_parse)
{
  g_autofree char *dir = tl_tmpdir_new ("cfg2cmd-parse");
  g_autofree char *cmd = g_build_filename (dir, "mine.conf.cmd", NULL);
  g_autofree char *conf = g_build_filename (dir, "mine.conf", NULL);
  g_autofree char *rbd = g_build_filename (dir, "rbd.conf.cmd", NULL);
  g_autoptr (GError) err = NULL;
  TlCfgVm *vm;
  const TlCfgDrive *d;
  bool has_machine = false;

  ck_assert (g_file_set_contents (conf,
    "# TEST: parser\nscsi0: local:1/vm-1-disk-0.raw,size=3M\n"
    "virtio1: local:1/vm-1-disk-1.qcow2,size=1536K\n"
    "[snap]\nscsi0: local:1/vm-1-disk-0.raw,size=9G\n", -1, NULL));
  ck_assert (g_file_set_contents (cmd,
    "/usr/bin/kvm \\\n"
    "  -id 1 \\\n"
    "  -name 'it'\\''s' \\\n"
    "  -chardev 'socket,id=qmp,path=/var/run/qemu-server/1.qmp,server=on,wait=off' \\\n"
    "  -mon 'chardev=qmp,mode=control' \\\n"
    "  -pidfile /var/run/qemu-server/1.pid \\\n"
    "  -daemonize \\\n"
    "  -nodefaults \\\n"
    "  -cpu host,+kvm_pv_eoi \\\n"
    "  -boot \"menu=on,splash=/nonexistent.jpg\" \\\n"
    "  -device 'virtio-scsi-pci,id=scsihw0' \\\n"
    "  -object '{\"id\":\"throttle-drive-scsi0\",\"limits\":{},\"qom-type\":\"throttle-group\"}' \\\n"
    "  -blockdev '{\"driver\":\"throttle\",\"file\":{\"driver\":\"raw\",\"file\":{\"aio\":\"io_uring\",\"driver\":\"host_device\",\"filename\":\"/dev/vg/vm-1-disk-0\",\"node-name\":\"e0\"},\"node-name\":\"f0\"},\"node-name\":\"drive-scsi0\",\"throttle-group\":\"throttle-drive-scsi0\"}' \\\n"
    "  -device 'scsi-hd,bus=scsihw0.0,drive=drive-scsi0,id=scsi0,device_id=drive-scsi0' \\\n"
    "  -drive 'file=/var/lib/vz/images/1/vm-1-disk-1.qcow2,if=none,id=drive-virtio1,format=qcow2,cache=none,aio=io_uring' \\\n"
    "  -device 'virtio-blk-pci,drive=drive-virtio1,id=virtio1' \\\n"
    "  -netdev 'type=tap,id=net0,ifname=tap1i0,script=/x' \\\n"
    "  -device 'virtio-net-pci,mac=A2:C0:43:77:08:A0,netdev=net0,id=net0' \\\n"
    "  -machine 'accel=kvm,type=pc+pve1'\n", -1, NULL));
  vm = tl_cfg2cmd_new (cmd, NULL, &err);
  ck_assert_msg (vm, "%s", err ? err->message : "");
  ck_assert_str_eq (vm->name, "mine");
  ck_assert_str_eq (vm->description, "parser");
  ck_assert_str_eq (vm->machine, "pc");
  ck_assert_uint_eq (vm->ndrives, 2);
  d = tl_cfg2cmd_drive (vm, "scsi0");
  ck_assert (d && d->blockdev && d->size == 3 * MiB);
  ck_assert_str_eq (d->size_from, "conf");
  ck_assert_str_eq (d->format_node, "f0");
  ck_assert_str_eq (d->file_node, "e0");
  d = tl_cfg2cmd_drive (vm, "virtio1");
  ck_assert (d && !d->blockdev && d->size == 1536 * 1024);
  ck_assert_str_eq (d->blk_name, "drive-virtio1");
  for (size_t i = 0; vm->argv[i]; i++) {
    const char *a = vm->argv[i];

    ck_assert_msg (!strstr (a, "/var/run") && !strstr (a, "/dev/vg")
                   && !strstr (a, "/var/lib/vz") && !strstr (a, "pve1")
                   && !strstr (a, "splash") && !strstr (a, "accel")
                   && strcmp (a, "-id") != 0 && strcmp (a, "-cpu") != 0
                   && strcmp (a, "-daemonize") != 0
                   && strcmp (a, "-netdev") != 0
                   && !strstr (a, "virtio-net"), "left in: %s", a);
    if (strcmp (a, "-name") == 0)
      ck_assert_str_eq (vm->argv[i + 1], "it's");
    if (strcmp (a, "-machine") == 0) {
      ck_assert_str_eq (vm->argv[i + 1], "type=pc");
      has_machine = true;
    }
  }
  ck_assert (has_machine);
  tl_cfg2cmd_launch (vm, NULL);
  check_drives (vm);
  check_guest_io (vm);
  tl_cfg2cmd_stop (vm);

  ck_assert (g_file_set_contents (rbd,
    "/usr/bin/kvm \\\n"
    "  -blockdev '{\"driver\":\"throttle\",\"file\":{\"driver\":\"raw\",\"file\":{\"driver\":\"rbd\",\"image\":\"x\",\"node-name\":\"e0\"},\"node-name\":\"f0\"},\"node-name\":\"drive-scsi0\",\"throttle-group\":\"throttle-drive-scsi0\"}'\n",
    -1, NULL));
  g_clear_error (&err);
  ck_assert_ptr_null (tl_cfg2cmd_new (rbd, NULL, &err));
  ck_assert (g_error_matches (err, TL_CFG2CMD_ERROR,
                              TL_CFG2CMD_ERROR_UNSUPPORTED));
  ck_assert_msg (strstr (err->message, "rbd"), "%s", err->message);
  tl_tmpdir_free (g_steal_pointer (&dir));
}
END_TEST

static Suite *
cfg2cmd_suite (void)
{
  Suite *s = suite_create ("cfg2cmd");
  TCase *tc = tcase_create ("fixtures");
  TCase *all = tcase_create ("all");

  tcase_set_timeout (tc, 120);
  tcase_add_test (tc, test_no_source);
  tcase_add_test (tc, test_parse);
  tcase_add_test (tc, test_efi_raw);
  tcase_add_test (tc, test_efi_secboot_tpm_q35);
  tcase_add_test (tc, test_simple_virtio_blk);
  tcase_add_test (tc, test_scsihw_virtio_scsi_single);
  tcase_add_test (tc, test_drive_shape);
  tcase_add_test (tc, test_backing_chain);
  suite_add_tcase (s, tc);
  tcase_set_timeout (all, 600);
  tcase_add_test (all, test_all_fixtures);
  suite_add_tcase (s, all);
  return s;
}

int
main (void)
{
  SRunner *sr = srunner_create (cfg2cmd_suite ());
  int failed;

  srunner_run_all (sr, CK_NORMAL);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
