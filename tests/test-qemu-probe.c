/* Against a real QEMU: connect over the library's socket, probe features
 * from query-qmp-schema, HMP, and the testlib helpers that the other
 * integration tests rely on (images, guest writes, node queries). */
#include <stdlib.h>
#include <string.h>

#include <check.h>

#include "testlib.h"

#define MiB (1024u * 1024u)

START_TEST (test_schema_probe)
{
  TlQemu *qemu = tl_qemu_start (NULL);
  g_autoptr (FleeceQmp) q = fleece_qmp_new ();
  g_autoptr (GError) err = NULL;
  g_autoptr (FleeceQmpSchema) s = NULL;
  g_autofree char *version = NULL;
  g_autofree char *expect = NULL;
  int major = 0, minor = -1, micro = -1;

  ck_assert_msg (fleece_qmp_connect_unix (q, qemu->qmp_path, &err), "%s",
                 err ? err->message : "");
  fleece_qmp_get_version (q, &major, &minor, &micro);
  ck_assert_int_ge (major, 10);
  ck_assert_int_ge (minor, 0);
  ck_assert_int_ge (micro, 0);

  s = fleece_qmp_schema_load (q, &err);
  ck_assert_msg (s != NULL, "%s", err ? err->message : "");
  ck_assert (fleece_qmp_schema_has_command (s, "blockdev-backup"));
  ck_assert (fleece_qmp_schema_has_command (s, "blockdev-add"));
  /* Only Proxmox's patched QEMU has it. */
  ck_assert (!fleece_qmp_schema_has_command (s, "query-proxmox-support"));
  ck_assert (!fleece_qmp_schema_has_command (s, "no-such-command"));

  ck_assert (fleece_qmp_schema_command_has_arg (s, "blockdev-backup",
                                                "discard-source"));
  ck_assert (fleece_qmp_schema_command_has_arg (s, "blockdev-backup",
                                                "x-perf"));
  ck_assert (!fleece_qmp_schema_command_has_arg (s, "blockdev-backup",
                                                 "no-such-arg"));
  /* blockdev-add's argument is the BlockdevOptions union: its variants'
   * members count. */
  ck_assert (fleece_qmp_schema_command_has_arg (s, "blockdev-add",
                                                "on-cbw-error"));
  ck_assert (fleece_qmp_schema_arg_has_member (s, "blockdev-backup",
                                               "x-perf",
                                               "min-cluster-size"));
  ck_assert (!fleece_qmp_schema_arg_has_member (s, "blockdev-backup",
                                                "x-perf", "no-such-member"));

  ck_assert (fleece_qmp_schema_driver_has_member (s, "copy-before-write",
                                                  "min-cluster-size"));
  ck_assert (fleece_qmp_schema_driver_has_member (s, "copy-before-write",
                                                  "on-cbw-error"));
  ck_assert (fleece_qmp_schema_driver_has_member (s, "copy-before-write",
                                                  "cbw-timeout"));
  ck_assert (fleece_qmp_schema_driver_has_member (s, "copy-before-write",
                                                  "bitmap"));
  ck_assert (fleece_qmp_schema_driver_has_member (s, "copy-before-write",
                                                  "target"));
  ck_assert (!fleece_qmp_schema_driver_has_member (s, "copy-before-write",
                                                   "no-such-member"));
  ck_assert (!fleece_qmp_schema_driver_has_member (s, "raw", "bitmap"));
  ck_assert (!fleece_qmp_schema_driver_has_member (s, "no-such-driver",
                                                   "file"));
  ck_assert (fleece_qmp_schema_has_driver (s, "snapshot-access"));
  ck_assert (fleece_qmp_schema_has_driver (s, "copy-before-write"));
  ck_assert (fleece_qmp_schema_has_driver (s, "qcow2"));
  ck_assert (!fleece_qmp_schema_has_driver (s, "no-such-driver"));

  version = fleece_qmp_hmp (q, "info version", &err);
  ck_assert_msg (version != NULL, "%s", err ? err->message : "");
  expect = g_strdup_printf ("%d.%d.%d", major, minor, micro);
  ck_assert_msg (g_str_has_prefix (version, expect), "'%s' vs %s", version,
                 expect);
  /* query-qmp-schema, human-monitor-command, qmp_capabilities. */
  ck_assert_uint_eq (fleece_qmp_round_trips (q), 3);

  /* The test's own connection is a separate monitor. */
  ck_assert (fleece_qmp_is_connected (qemu->qmp));
  g_clear_pointer (&q, fleece_qmp_free);
  tl_qemu_stop (qemu);
}
END_TEST

static bool
all_bytes (const guint8 *p, size_t len, guint8 v)
{
  for (size_t i = 0; i < len; i++)
    if (p[i] != v)
      return false;
  return true;
}

START_TEST (test_images_and_guest_io)
{
  /* An odd size: 40 MiB + 4 KiB, not a multiple of the 64 KiB block. */
  const uint64_t size = 40 * MiB + 4096;
  TlQemu *probe = tl_qemu_start (NULL);
  g_autofree char *raw_a = tl_make_image (probe, "a.raw", "raw", size, 1);
  g_autofree char *raw_b = tl_make_image (probe, "b.raw", "raw", size, 2);
  g_autofree char *qcow = tl_make_image (probe, "a.qcow2", "qcow2", size, 1);
  g_autofree guint8 *a = NULL, *b = NULL, *c = NULL, *after = NULL;
  g_autofree guint8 *head = NULL;
  g_auto (GStrv) files = NULL;
  g_auto (GStrv) nodes = NULL;
  g_autofree char *drive = NULL;
  g_autofree char *root = NULL;
  uint64_t la = 0, lb = 0, lc = 0, lafter = 0;
  TlQemu *qemu;

  a = tl_read_image (raw_a, "raw", &la);
  b = tl_read_image (raw_b, "raw", &lb);
  c = tl_read_image (qcow, "qcow2", &lc);
  ck_assert_uint_eq (la, size);
  ck_assert_uint_eq (lb, size);
  ck_assert_uint_eq (lc, size);
  /* Same seed, same guest-visible bytes in either format. */
  ck_assert (memcmp (a, c, size) == 0);
  /* Seeds differ everywhere; so do any two blocks, and the tail block. */
  for (uint64_t off = 0; off < size; off += 65536)
    ck_assert_msg (memcmp (a + off, b + off, MIN (65536, size - off)) != 0,
                   "block at %" G_GUINT64_FORMAT " equal for both seeds",
                   (guint64) off);
  ck_assert (memcmp (a, a + 65536, 65536) != 0);
  ck_assert (memcmp (a + 65536, a + 40 * MiB - 65536, 65536) != 0);
  ck_assert (!all_bytes (a + 40 * MiB, 4096, 0));
  head = tl_read_file (raw_a, 65536, 64);
  ck_assert (memcmp (head, a + 65536, 64) == 0);
  ck_assert_uint_ge (tl_allocated_bytes (raw_a), size - 65536);

  files = tl_list_dir (probe->dir);
  ck_assert (g_strv_contains ((const char *const *) files, "a.raw"));
  ck_assert (g_strv_contains ((const char *const *) files, "a.qcow2"));
  ck_assert (g_strv_contains ((const char *const *) files, "qmp.sock"));
  ck_assert (g_strv_contains ((const char *const *) files, "test.sock"));

  /* Writes through the guest device reach the image. */
  drive = g_strdup_printf ("file=%s,if=none,id=drive-scsi0,format=raw",
                           raw_a);
  {
    const char *const args[] = {
      "-drive", drive,
      "-device", "virtio-scsi-pci,id=scsihw0",
      "-device", "scsi-hd,drive=drive-scsi0,id=scsi0",
      NULL,
    };

    qemu = tl_qemu_start (args);
  }
  root = tl_device_root (qemu, "scsi0");
  ck_assert_ptr_nonnull (root);
  nodes = tl_node_names (qemu);
  ck_assert (g_strv_contains ((const char *const *) nodes, root));
  ck_assert_ptr_null (tl_device_root (qemu, "scsi9"));
  ck_assert_int_eq (tl_job_count (qemu), 0);

  tl_guest_io (qemu, "scsi0", "write -P 0xab 0 64k");
  tl_guest_io (qemu, "scsi0", "read -P 0xab 0 64k");
  tl_guest_io (qemu, "scsi0", "flush");
  after = tl_read_image (raw_a, "raw", &lafter);
  ck_assert_uint_eq (lafter, size);
  ck_assert (all_bytes (after, 65536, 0xab));
  ck_assert (memcmp (after + 65536, a + 65536, size - 65536) == 0);

  ck_assert (tl_qemu_alive (qemu));
  tl_qemu_stop (qemu);
  tl_qemu_stop (probe);
}
END_TEST

static Suite *
probe_suite (void)
{
  Suite *s = suite_create ("qemu-probe");
  TCase *tc = tcase_create ("probe");

  tcase_set_timeout (tc, 60);
  tcase_add_test (tc, test_schema_probe);
  tcase_add_test (tc, test_images_and_guest_io);
  suite_add_tcase (s, tc);
  return s;
}

int
main (void)
{
  SRunner *sr = srunner_create (probe_suite ());
  int failed;

  srunner_run_all (sr, CK_ENV);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
