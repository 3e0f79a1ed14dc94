/* Incremental backups as a chain a user can restore (issue 18), on a real
 * QEMU in qemu-server 9's shape: a full backup that starts the dirty
 * bitmap at its point in time (FLEECE_BITMAP_NEW), incrementals into
 * directories whose qcow2 images are backed by the previous link, guest
 * writes racing every link, the chain restored with
 *   qemu-img convert -O raw <newest>/<key>.qcow2 out.raw
 * and compared byte for byte; and every way a link can fail, each leaving
 * the bitmap so that a retried incremental is complete. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
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

#define KiB 1024
#define MiB (1024 * 1024)
#define VMID 100
#define BITMAP "b0"

/* A qcow2 disk (its bitmap persistent) and a raw one (its bitmap only in
 * QEMU's memory), both fleeced. */
static const TlDisk disks[] = {
  { "scsi0", "qcow2", 16 * MiB, "scsi", true },
  { "scsi1", "raw", 8 * MiB, "scsi", true },
};
#define NDISKS G_N_ELEMENTS (disks)
#define S0 0
#define S1 1

typedef struct {
  TlVm *tl;
  GString *log;
} Vm;

static Vm *
vm_start (void)
{
  Vm *vm = g_new0 (Vm, 1);

  vm->tl = tl_vm_new ("incr", disks, NDISKS, 1);
  tl_vm_start_blockdev (vm->tl, NULL);
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

/* A directory for one link of the chain, <vm dir>/<name> (g_free). */
static char *
link_dir (Vm *vm, const char *name)
{
  char *dir = g_build_filename (vm->tl->dir, name, NULL);

  ck_assert_int_eq (g_mkdir (dir, 0700), 0);
  return dir;
}

/* Guest write of len bytes at off through disk i's device. */
static void
guest_write (Vm *vm, int i, uint64_t off, uint64_t len, unsigned pattern)
{
  g_autofree char *cmd = g_strdup_printf ("write -P 0x%02x %" G_GUINT64_FORMAT " %"
                                          G_GUINT64_FORMAT, pattern, off, len);

  tl_guest_io (vm->tl->q, tl_disk_qdev (&disks[i]), cmd);
}

/* The bitmap's count on disk i's format node f<key> (where the library
 * puts a new one, below the throttle node), -1 if it has none. */
static int64_t
count (Vm *vm, int i)
{
  g_autofree char *node = g_strdup_printf ("f%s", disks[i].key);

  return tl_bitmap_count (vm->tl->q, node, BITMAP);
}

static gint
compare_strings (gconstpointer a, gconstpointer b)
{
  return strcmp (*(const char *const *) a, *(const char *const *) b);
}

/* Every dirty bitmap QEMU has, "node:name", sorted and joined by ","
 * (g_free): nothing of the library's own (fleece-*) may be left. */
static char *
all_bitmaps (Vm *vm)
{
  json_object *nodes = tl_qmp (vm->tl->q, "query-named-block-nodes",
                               tl_json ("{\"flat\": true}"));
  g_autoptr (GPtrArray) names = g_ptr_array_new_with_free_func (g_free);
  GString *out = g_string_new (NULL);

  for (size_t i = 0; i < json_object_array_length (nodes); i++) {
    json_object *n = json_object_array_get_idx (nodes, i), *name, *bms;

    if (!json_object_object_get_ex (n, "dirty-bitmaps", &bms))
      continue;
    json_object_object_get_ex (n, "node-name", &name);
    for (size_t j = 0; j < json_object_array_length (bms); j++) {
      json_object *b = json_object_array_get_idx (bms, j), *bname, *gran;

      json_object_object_get_ex (b, "name", &bname);
      g_ptr_array_add (names, g_strdup_printf ("%s:%s", json_object_get_string (name),
                                               json_object_get_string (bname)));
      /* Counts below are in 64 KiB units. */
      if (strcmp (json_object_get_string (bname), BITMAP) == 0) {
        ck_assert (json_object_object_get_ex (b, "granularity", &gran));
        ck_assert_int_eq (json_object_get_int64 (gran), 64 * KiB);
      }
    }
  }
  json_object_put (nodes);
  g_ptr_array_sort (names, compare_strings);
  for (guint i = 0; i < names->len; i++)
    g_string_append_printf (out, "%s%s", i ? "," : "", *(char **) &names->pdata[i]);
  return g_string_free (out, FALSE);
}

static void
assert_bitmaps (Vm *vm, const char *expect)
{
  g_autofree char *now = all_bitmaps (vm);

  ck_assert_msg (strcmp (now, expect) == 0, "dirty bitmaps: %s, expected %s", now, expect);
}

#define BOTH_BITMAPS "fscsi0:b0,fscsi1:b0"

/* ---- one link --------------------------------------------------------- */

typedef struct {
  int mode;                 /* FLEECE_BITMAP_NEW or _USE */
  const char *base;         /* previous link's dir (USE) */
  const char *const *keys;  /* fleece_set_drives, or NULL */
  uint64_t bwlimit;         /* KiB/s, 0: unlimited */
} Link;

/* A handle, plan and run of one link, attached and started. */
typedef struct {
  struct fleece_handle *h;
  struct fleece_plan *p;
  struct fleece_target *t;
} Run;

static struct fleece_target *
dir_target (const char *dir, const char *base)
{
  struct fleece_target *t = fleece_target_new_dir (dir, "qcow2");

  ck_assert_msg (t != NULL, "%s", fleece_get_error ());
  ck_assert_msg (fleece_target_set_base (t, base) == 0, "%s", fleece_get_error ());
  return t;
}

static void
run_start (Vm *vm, Run *r, const Link *l, struct fleece_target *t)
{
  r->h = tl_handle (vm->tl, VMID, vm->log);
  ck_assert_int_eq (fleece_set_bitmap (r->h, BITMAP, l->mode), 0);
  ck_assert_int_eq (fleece_set_drives (r->h, l->keys), 0);
  ck_assert_int_eq (fleece_set_bwlimit (r->h, l->bwlimit), 0);
  r->p = tl_plan (r->h, vm->log);
  r->t = t;
  ck_assert_msg (fleece_attach (r->h, r->p, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  ck_assert_msg (fleece_start (r->h, r->p, t, 0) == 0, "%s\n%s", fleece_get_error (),
                 vm->log->str);
}

static void
run_end (Vm *vm, Run *r)
{
  ck_assert_msg (fleece_cleanup (r->h, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  tl_assert_nothing_left (vm->tl, VMID);
  fleece_target_free (r->t);
  fleece_plan_free (r->p);
  fleece_free (r->h);
  memset (r, 0, sizeof *r);
}

/* A link that succeeds, unthrottled and without racing writes. */
static void
link_ok (Vm *vm, const Link *l, const char *dir)
{
  Run r;

  run_start (vm, &r, l, dir_target (dir, l->base));
  ck_assert_msg (tl_wait_end (r.h, 100) == 1, "%s\n%s", fleece_get_error (), vm->log->str);
  run_end (vm, &r);
}

/* The documented restore: qemu-img convert -O raw of the newest image of
 * the chain; it equals expect, the disk at that link's point in time. */
static void
assert_restores (Vm *vm, const char *dir, int i, const guint8 *expect)
{
  g_autofree char *name = g_strdup_printf ("%s.qcow2", disks[i].key);
  g_autofree char *image = g_build_filename (dir, name, NULL);
  g_autofree char *out = g_build_filename (vm->tl->dir, "restored.raw", NULL);
  g_autofree char *what = g_strdup_printf ("%s restored from %s", disks[i].key, dir);
  const char *argv[] = { "qemu-img", "convert", "-O", "raw", image, out, NULL };
  g_autoptr (GError) err = NULL;
  g_autofree char *errout = NULL;
  int status;

  ck_assert_msg (g_spawn_sync (NULL, (char **) argv, NULL,
                               G_SPAWN_SEARCH_PATH | G_SPAWN_STDOUT_TO_DEV_NULL, NULL, NULL,
                               NULL, &errout, &status, &err) &&
                 g_spawn_check_wait_status (status, &err),
                 "qemu-img convert %s: %s %s", image, err ? err->message : "", errout);
  tl_assert_image_equals (out, "raw", expect, disks[i].size, what);
  g_unlink (out);
}

static void
assert_restores_all (Vm *vm, const char *dir, guint8 **pit)
{
  for (int i = 0; i < (int) NDISKS; i++)
    assert_restores (vm, dir, i, pit[i]);
}

/* qemu-img info --backing-chain: depth images, each backed by the previous
 * link through a relative path, backing format recorded. */
static void
assert_chain (const char *dir, const char *key, int depth)
{
  g_autofree char *image = g_strdup_printf ("%s/%s.qcow2", dir, key);
  const char *argv[] = { "qemu-img", "info", "-U", "--backing-chain", "--output=json",
                         image, NULL };
  g_autofree char *out = NULL;
  g_autoptr (GError) err = NULL;
  json_object *chain;
  int status;

  ck_assert (g_spawn_sync (NULL, (char **) argv, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL,
                           &out, NULL, &status, &err) &&
             g_spawn_check_wait_status (status, &err));
  chain = json_tokener_parse (out);
  ck_assert_msg (chain && (int) json_object_array_length (chain) == depth,
                 "%s: a chain of %d expected: %s", image, depth, out);
  for (int k = 0; k + 1 < depth; k++) {
    json_object *img = json_object_array_get_idx (chain, k), *v;

    ck_assert (json_object_object_get_ex (img, "backing-filename", &v));
    ck_assert_msg (g_str_has_prefix (json_object_get_string (v), "../"),
                   "backing file %s is not relative to its image's dir",
                   json_object_get_string (v));
    ck_assert (json_object_object_get_ex (img, "backing-filename-format", &v));
    ck_assert_str_eq (json_object_get_string (v), "qcow2");
  }
  json_object_put (chain);
}

static const Link full_new = { FLEECE_BITMAP_NEW, NULL, NULL, 0 };

/* ---- the chain ---------------------------------------------------------- */

/* Full, incremental, incremental, the guest writing before and during
 * each: every link restores to its own point in time, and writes made
 * while a link runs land in the next one. */
START_TEST (test_three_link_chain)
{
  Vm *vm = vm_start ();
  g_autofree char *full = link_dir (vm, "full");
  g_autofree char *incr1 = link_dir (vm, "incr1");
  g_autofree char *incr2 = link_dir (vm, "incr2");
  const Link l_full = { FLEECE_BITMAP_NEW, NULL, NULL, 8192 };
  const Link l_incr1 = { FLEECE_BITMAP_USE, full, NULL, 1024 };
  const Link l_incr2 = { FLEECE_BITMAP_USE, incr1, NULL, 1024 };
  guint8 **pit0, **pit1, **pit2;
  uint64_t dirty = 0;
  Run r;

  ck_assert_int_eq (count (vm, S0), -1);
  pit0 = tl_vm_snapshot (vm->tl);
  run_start (vm, &r, &l_full, dir_target (full, NULL));
  /* During the full backup, ahead of its cursor: not in the full, so the
   * bitmap (started at the full's point in time) must hold them. */
  guest_write (vm, S0, 12 * MiB, 64 * KiB, 0xa1);
  guest_write (vm, S1, 6 * MiB, 64 * KiB, 0xa2);
  ck_assert_msg (tl_wait_end (r.h, 100) == 1, "%s\n%s", fleece_get_error (), vm->log->str);
  run_end (vm, &r);
  ck_assert_int_eq (count (vm, S0), 64 * KiB);
  ck_assert_int_eq (count (vm, S1), 64 * KiB);
  assert_bitmaps (vm, BOTH_BITMAPS);

  /* Between the links. */
  guest_write (vm, S0, 1 * MiB, 128 * KiB, 0xb1);
  guest_write (vm, S1, 2 * MiB, 64 * KiB, 0xb2);
  pit1 = tl_vm_snapshot (vm->tl);
  run_start (vm, &r, &l_incr1, dir_target (incr1, full));
  ck_assert_int_eq (fleece_get_stat (r.h, "scsi0", FLEECE_STAT_DIRTY, &dirty), 0);
  /* During incr1: over a region it still has to copy (its old content is
   * incr1's), and where nothing was dirty (for incr2). */
  guest_write (vm, S0, 12 * MiB, 64 * KiB, 0xc1);
  guest_write (vm, S0, 15 * MiB, 64 * KiB, 0xc2);
  guest_write (vm, S1, 7 * MiB, 64 * KiB, 0xc3);
  ck_assert_msg (tl_wait_end (r.h, 100) == 1, "%s\n%s", fleece_get_error (), vm->log->str);
  ck_assert_int_eq (fleece_get_stat (r.h, "scsi0", FLEECE_STAT_DIRTY, &dirty), 0);
  ck_assert_msg (dirty >= 192 * KiB && dirty < disks[S0].size,
                 "scsi0: %" G_GUINT64_FORMAT " dirty bytes reported", dirty);
  run_end (vm, &r);
  ck_assert_int_eq (count (vm, S0), 128 * KiB);
  ck_assert_int_eq (count (vm, S1), 64 * KiB);

  guest_write (vm, S1, 0, 64 * KiB, 0xd1);
  pit2 = tl_vm_snapshot (vm->tl);
  run_start (vm, &r, &l_incr2, dir_target (incr2, incr1));
  guest_write (vm, S0, 3 * MiB, 64 * KiB, 0xe1);
  ck_assert_msg (tl_wait_end (r.h, 100) == 1, "%s\n%s", fleece_get_error (), vm->log->str);
  run_end (vm, &r);
  ck_assert_int_eq (count (vm, S0), 64 * KiB);
  ck_assert_int_eq (count (vm, S1), 0);

  assert_chain (incr2, "scsi0", 3);
  assert_chain (incr2, "scsi1", 3);
  assert_restores_all (vm, full, pit0);
  assert_restores_all (vm, incr1, pit1);
  assert_restores_all (vm, incr2, pit2);
  /* The links are not full copies: incr1 holds only what changed. */
  {
    g_autofree char *img = g_build_filename (incr1, "scsi0.qcow2", NULL);
    ck_assert_uint_lt (tl_allocated_bytes (img), 4 * MiB);
  }

  tl_vm_snapshot_free (vm->tl, pit0);
  tl_vm_snapshot_free (vm->tl, pit1);
  tl_vm_snapshot_free (vm->tl, pit2);
  vm_stop (vm);
}
END_TEST

/* ---- failed incrementals ------------------------------------------------ */

/* The chain's start for the failure tests: a full backup with
 * BITMAP_NEW into <dir>/full, then writes W1 the next link must hold:
 * scsi0 {1M, 9M}, scsi1 {2M}. */
static char *
chain_base (Vm *vm)
{
  char *full = link_dir (vm, "full");

  link_ok (vm, &full_new, full);
  guest_write (vm, S0, 1 * MiB, 64 * KiB, 0x11);
  guest_write (vm, S0, 9 * MiB, 64 * KiB, 0x12);
  guest_write (vm, S1, 2 * MiB, 64 * KiB, 0x13);
  ck_assert_int_eq (count (vm, S0), 128 * KiB);
  ck_assert_int_eq (count (vm, S1), 64 * KiB);
  return full;
}

/* Writes W2 while a failing link runs, where nothing is dirty: scsi0
 * {13M}, scsi1 {5M}; and over a dirty region of scsi0 (9M) not copied yet. */
static void
writes_during (Vm *vm)
{
  guest_write (vm, S0, 13 * MiB, 64 * KiB, 0x21);
  guest_write (vm, S0, 9 * MiB, 64 * KiB, 0x22);
  guest_write (vm, S1, 5 * MiB, 64 * KiB, 0x23);
}

/* After a failed link and its cleanup: the bitmap holds W1 and W2, nothing
 * of the library's is left; a retried incremental over the same base
 * restores to its own point in time and leaves the bitmap empty. */
static void
assert_retry_counts (Vm *vm, const char *full, int64_t c0, int64_t c1)
{
  g_autofree char *retry = link_dir (vm, "retry");
  const Link l = { FLEECE_BITMAP_USE, full, NULL, 0 };
  guint8 **pit;

  assert_bitmaps (vm, BOTH_BITMAPS);
  ck_assert_int_eq (count (vm, S0), c0);
  ck_assert_int_eq (count (vm, S1), c1);
  pit = tl_vm_snapshot (vm->tl);
  link_ok (vm, &l, retry);
  assert_restores_all (vm, retry, pit);
  ck_assert_int_eq (count (vm, S0), 0);
  ck_assert_int_eq (count (vm, S1), 0);
  assert_bitmaps (vm, BOTH_BITMAPS);
  tl_vm_snapshot_free (vm->tl, pit);
}

/* W1 (and W2 if written) in the bitmap. */
static void
assert_retry (Vm *vm, const char *full, bool w2)
{
  assert_retry_counts (vm, full, (w2 ? 192 : 128) * KiB, (w2 ? 128 : 64) * KiB);
}

static const Link slow_incr_template = { FLEECE_BITMAP_USE, NULL, NULL, 512 };

/* The NBD target (a backup server) dies mid-backup. */
START_TEST (test_fail_nbd_killed)
{
  Vm *vm = vm_start ();
  g_autofree char *full = chain_base (vm);
  g_autofree char *uri = NULL;
  GPid qsd = tl_vm_nbd_target (vm->tl, &uri);
  Run r;

  run_start (vm, &r, &slow_incr_template, fleece_target_new_nbd (uri));
  writes_during (vm);
  ck_assert_int_eq (fleece_wait (r.h, 200), 0);
  kill (qsd, SIGKILL);
  waitpid (qsd, NULL, 0);
  g_spawn_close_pid (qsd);
  ck_assert_int_eq (tl_wait_end (r.h, 100), -1);
  ck_assert_int_ne (fleece_get_errno (), ECANCELED);
  ck_assert_msg (strstr (fleece_get_error (), "backup of scsi0 failed"), "%s",
                 fleece_get_error ());
  run_end (vm, &r);
  assert_retry (vm, full, true);
  vm_stop (vm);
}
END_TEST

/* A fleecing storage too small for what the guest overwrites: the link
 * fails and says why, the guest's writes succeed. */
START_TEST (test_fail_storage_full)
{
  Vm *vm = vm_start ();
  g_autofree char *full = NULL;
  g_autofree char *fail = NULL;
  Link l = slow_incr_template;
  Run r;

  /* 1 MiB: room for the images' qcow2 metadata, not for 4 MiB of data. */
  tl_mount_tmpfs (vm->tl->storage, "1m");
  full = chain_base (vm);
  fail = link_dir (vm, "fail");
  /* 4 MiB more of scsi0 dirty, which cbw must save when overwritten. */
  guest_write (vm, S0, 4 * MiB, 4 * MiB, 0x14);
  l.base = full;
  run_start (vm, &r, &l, dir_target (fail, full));
  guest_write (vm, S0, 4 * MiB, 4 * MiB, 0x24);
  writes_during (vm);
  ck_assert_int_eq (tl_wait_end (r.h, 100), -1);
  ck_assert_msg (strstr (fleece_get_error (), "the fleecing storage is full or too slow") &&
                 strstr (fleece_get_error (), "guest's writes did not fail"),
                 "%s", fleece_get_error ());
  run_end (vm, &r);
  {
    g_auto (GStrv) left = tl_list_dir (fail);
    ck_assert_msg (g_strv_length (left) == 0, "the failed link left %s", left[0]);
  }
  {
    uint64_t size = 0;
    g_autofree guint8 *now = tl_read_image (vm->tl->paths[S0], "qcow2", &size);
    for (uint64_t off = 4 * MiB; off < 8 * MiB; off += 4096)
      ck_assert_int_eq (now[off], 0x24);
  }
  /* W1, the 4 MiB region and W2. */
  assert_retry_counts (vm, full, (192 + 4096) * KiB, 128 * KiB);
  ck_assert_int_eq (umount (vm->tl->storage), 0);
  vm_stop (vm);
}
END_TEST

/* The caller cancels. */
START_TEST (test_fail_cancel)
{
  Vm *vm = vm_start ();
  g_autofree char *full = chain_base (vm);
  g_autofree char *fail = link_dir (vm, "fail");
  Link l = slow_incr_template;
  Run r;

  l.base = full;
  run_start (vm, &r, &l, dir_target (fail, full));
  writes_during (vm);
  ck_assert_int_eq (fleece_wait (r.h, 200), 0);
  ck_assert_int_eq (fleece_cancel (r.h), 0);
  ck_assert_int_eq (tl_wait_end (r.h, 100), -1);
  ck_assert_int_eq (fleece_get_errno (), ECANCELED);
  run_end (vm, &r);
  assert_retry (vm, full, true);
  vm_stop (vm);
}
END_TEST

/* The process running the link is killed (kill -9); the parent cleans up
 * from the record. */
START_TEST (test_fail_kill9)
{
  Vm *vm = vm_start ();
  g_autofree char *full = chain_base (vm);
  g_autofree char *fail = link_dir (vm, "fail");
  int ready[2];
  pid_t pid;
  char c;

  ck_assert_int_eq (pipe (ready), 0);
  pid = fork ();
  ck_assert_int_ge (pid, 0);
  if (pid == 0) {
    /* No Check calls: the child never returns into the test. */
    struct fleece_handle *h = fleece_new ();
    struct fleece_target *t = fleece_target_new_dir (fail, "qcow2");
    struct fleece_plan *p = NULL;

    if (fleece_set_state_dir (h, vm->tl->state) < 0 || fleece_set_vmid (h, VMID) < 0 ||
        fleece_connect (h, vm->tl->q->qmp_path) < 0 ||
        fleece_set_storage (h, fleece_storage_new_dir (vm->tl->storage)) < 0 ||
        fleece_set_bitmap (h, BITMAP, FLEECE_BITMAP_USE) < 0 ||
        fleece_set_bwlimit (h, 512) < 0 || fleece_target_set_base (t, full) < 0 ||
        !(p = fleece_plan (h)) || fleece_attach (h, p, 0) < 0 ||
        fleece_start (h, p, t, 0) < 0) {
      fprintf (stderr, "child: %s\n", fleece_get_error ());
      _exit (1);
    }
    if (write (ready[1], "s", 1) != 1)
      _exit (1);
    pause ();
    _exit (0);
  }
  close (ready[1]);
  ck_assert_msg (read (ready[0], &c, 1) == 1, "the child could not start the link");
  close (ready[0]);
  writes_during (vm);
  kill (pid, SIGKILL);
  waitpid (pid, NULL, 0);
  {
    struct fleece_handle *h = tl_handle_on (vm->tl, VMID, vm->log, NULL);

    ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
    fleece_free (h);
  }
  tl_assert_nothing_left (vm->tl, VMID);
  assert_retry (vm, full, true);
  vm_stop (vm);
}
END_TEST

/* The NBD export of scsi0 is 1 MiB short: the link cannot start, and
 * nothing of the bitmap has been touched. */
START_TEST (test_fail_wrong_size_export)
{
  Vm *vm = vm_start ();
  g_autofree char *full = chain_base (vm);
  g_autofree char *uri = NULL;
  GPid qsd = tl_vm_nbd_target_sized (vm->tl, "scsi0", -MiB, &uri);
  struct fleece_handle *h = tl_handle (vm->tl, VMID, vm->log);
  struct fleece_target *t = fleece_target_new_nbd (uri);
  struct fleece_plan *p;

  ck_assert_int_eq (fleece_set_bitmap (h, BITMAP, FLEECE_BITMAP_USE), 0);
  p = tl_plan (h, vm->log);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  ck_assert_int_eq (fleece_start (h, p, t, 0), -1);
  ck_assert_msg (strstr (fleece_get_error (), "size"), "%s", fleece_get_error ());
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);
  tl_assert_nothing_left (vm->tl, VMID);
  kill (qsd, SIGTERM);
  waitpid (qsd, NULL, 0);
  g_spawn_close_pid (qsd);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  assert_retry (vm, full, false);
  vm_stop (vm);
}
END_TEST

static bool
efi_copied (struct fleece_handle *h)
{
  uint64_t done = 0, total = 0;

  ck_assert_int_eq (fleece_get_drive_progress (h, "efidisk0", &done, &total), 0);
  return total > 0 && done == total;
}

/* A run that fails after the job of one drive did its work: that drive's
 * bits come back too.  The EFI disk is backed up without fleecing, so
 * nothing else (no discard on the job's source) would mark them again. */
START_TEST (test_fail_after_one_drive_done)
{
  static const TlDisk efi_disks[] = {
    { "efidisk0", "raw", 528 * KiB, "pflash", false },
    { "scsi0", "qcow2", 16 * MiB, "scsi", true },
  };
  Vm *vm = g_new0 (Vm, 1);
  g_autofree char *full = NULL;
  g_autofree char *fail = NULL;
  /* scsi0's second dirty job cluster only after ~4 s. */
  Link l = { FLEECE_BITMAP_USE, NULL, NULL, 256 };
  Run r;

  vm->tl = tl_vm_new ("incr", efi_disks, G_N_ELEMENTS (efi_disks), 1);
  tl_vm_start_blockdev (vm->tl, NULL);
  vm->log = g_string_new (NULL);
  full = link_dir (vm, "full");
  fail = link_dir (vm, "fail");
  link_ok (vm, &full_new, full);
  tl_guest_io (vm->tl->q, "/machine/system.flash1", "write -P 0x61 64k 64k");
  /* One dirty cluster in each of scsi0's first 12 MiB: its job has 12 job
   * clusters to copy, 4 s apart. */
  for (int k = 0; k < 12; k++)
    guest_write (vm, S0, (uint64_t) k * MiB, 64 * KiB, 0x62);
  ck_assert_int_eq (tl_bitmap_count (vm->tl->q, "fefidisk0", BITMAP), 64 * KiB);

  l.base = full;
  run_start (vm, &r, &l, dir_target (fail, full));
  /* The EFI disk's job copies its one dirty cluster at once, then waits
   * for scsi0's. */
  for (int i = 0; i < 100 && !efi_copied (r.h); i++)
    ck_assert_int_eq (fleece_wait (r.h, 100), 0);
  ck_assert (efi_copied (r.h));
  ck_assert_int_eq (fleece_cancel (r.h), 0);
  ck_assert_int_eq (tl_wait_end (r.h, 100), -1);
  ck_assert_int_eq (fleece_get_errno (), ECANCELED);
  run_end (vm, &r);
  ck_assert_int_eq (tl_bitmap_count (vm->tl->q, "fefidisk0", BITMAP), 64 * KiB);
  ck_assert_int_eq (tl_bitmap_count (vm->tl->q, "fscsi0", BITMAP), 12 * 64 * KiB);
  {
    g_autofree char *retry = link_dir (vm, "retry");
    const Link lr = { FLEECE_BITMAP_USE, full, NULL, 0 };
    guint8 **pit = tl_vm_snapshot (vm->tl);

    link_ok (vm, &lr, retry);
    for (int i = 0; i < 2; i++) {
      g_autofree char *name = g_strdup_printf ("%s/%s.qcow2", retry, efi_disks[i].key);
      tl_assert_image_equals (name, "qcow2", pit[i], efi_disks[i].size, name);
    }
    tl_vm_snapshot_free (vm->tl, pit);
  }
  vm_stop (vm);
}
END_TEST

/* ---- a failed full backup that (re)starts the bitmap --------------------- */

/* No bitmap before: the new one goes again. */
START_TEST (test_new_fails_no_bitmap)
{
  Vm *vm = vm_start ();
  g_autofree char *full = link_dir (vm, "full");
  const Link l = { FLEECE_BITMAP_NEW, NULL, NULL, 256 };
  Run r;

  run_start (vm, &r, &l, dir_target (full, NULL));
  /* It is there while the backup runs... */
  ck_assert_int_eq (count (vm, S0), 0);
  guest_write (vm, S0, 9 * MiB, 64 * KiB, 0x31);
  ck_assert_int_eq (count (vm, S0), 64 * KiB);
  ck_assert_int_eq (fleece_cancel (r.h), 0);
  ck_assert_int_eq (tl_wait_end (r.h, 100), -1);
  run_end (vm, &r);
  /* ...and gone with the failed backup: an incremental over it would miss
   * what the full did not copy. */
  assert_bitmaps (vm, "");
  vm_stop (vm);
}
END_TEST

/* A bitmap with bits: a failed restart gives them back (with what was
 * written meanwhile); a successful one starts from its point in time. */
START_TEST (test_new_fails_existing_bitmap)
{
  Vm *vm = vm_start ();
  g_autofree char *full = chain_base (vm);
  g_autofree char *full2 = link_dir (vm, "full2");
  g_autofree char *full3 = link_dir (vm, "full3");
  const Link l = { FLEECE_BITMAP_NEW, NULL, NULL, 256 };
  const Link l_ok = { FLEECE_BITMAP_NEW, NULL, NULL, 8192 };
  Run r;

  run_start (vm, &r, &l, dir_target (full2, NULL));
  /* Restarted at the point in time. */
  ck_assert_int_eq (count (vm, S0), 0);
  writes_during (vm);
  ck_assert_int_eq (fleece_cancel (r.h), 0);
  ck_assert_int_eq (tl_wait_end (r.h, 100), -1);
  run_end (vm, &r);
  assert_retry (vm, full, true);

  /* Now a restart that succeeds, writes racing it. */
  guest_write (vm, S0, 1 * MiB, 64 * KiB, 0x41);
  run_start (vm, &r, &l_ok, dir_target (full3, NULL));
  guest_write (vm, S0, 14 * MiB, 64 * KiB, 0x42);
  ck_assert_msg (tl_wait_end (r.h, 100) == 1, "%s\n%s", fleece_get_error (), vm->log->str);
  run_end (vm, &r);
  ck_assert_int_eq (count (vm, S0), 64 * KiB);
  ck_assert_int_eq (count (vm, S1), 0);
  assert_bitmaps (vm, BOTH_BITMAPS);
  vm_stop (vm);
}
END_TEST

/* ---- what is refused, and a bitmap on one drive only ---------------------- */

START_TEST (test_refused_targets)
{
  Vm *vm = vm_start ();
  g_autofree char *full = chain_base (vm);
  g_autofree char *next = link_dir (vm, "next");
  struct fleece_handle *h = tl_handle (vm->tl, VMID, vm->log);
  struct fleece_target *raw = fleece_target_new_dir (next, "raw");
  struct fleece_target *nobase = fleece_target_new_dir (next, "qcow2");
  struct fleece_target *based = dir_target (next, full);
  struct fleece_plan *p;

  ck_assert_int_eq (fleece_target_set_base (raw, full), 0);
  ck_assert_int_eq (fleece_target_set_base (nobase, "relative/dir"), -1);
  ck_assert_int_eq (fleece_get_errno (), EINVAL);
  {
    struct fleece_target *nbd = fleece_target_new_nbd ("nbd://127.0.0.1");
    ck_assert_int_eq (fleece_target_set_base (nbd, full), -1);
    ck_assert_int_eq (fleece_get_errno (), EINVAL);
    fleece_target_free (nbd);
  }

  ck_assert_int_eq (fleece_set_bitmap (h, BITMAP, FLEECE_BITMAP_USE), 0);
  p = tl_plan (h, vm->log);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  /* A raw incremental into a directory would be a full-size image of
   * zeroes and changes: refused. */
  ck_assert_int_eq (fleece_start (h, p, raw, 0), -1);
  ck_assert_int_eq (fleece_get_errno (), EINVAL);
  ck_assert_msg (strstr (fleece_get_error (), "use format qcow2 and give the previous "
                         "backup's directory as the base"), "%s", fleece_get_error ());
  ck_assert_int_eq (fleece_start (h, p, nobase, 0), -1);
  ck_assert_int_eq (fleece_get_errno (), EINVAL);
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);
  fleece_plan_free (p);
  /* A base without an incremental. */
  ck_assert_int_eq (fleece_set_bitmap (h, NULL, 0), 0);
  p = tl_plan (h, vm->log);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  ck_assert_int_eq (fleece_start (h, p, based, 0), -1);
  ck_assert_msg (strstr (fleece_get_error (), "a base is the previous backup of an "
                         "incremental chain"), "%s", fleece_get_error ());
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);
  tl_assert_nothing_left (vm->tl, VMID);
  {
    g_auto (GStrv) left = tl_list_dir (next);
    ck_assert_msg (g_strv_length (left) == 0, "refused runs left %s", left[0]);
  }
  /* Nothing touched the bitmap. */
  ck_assert_int_eq (count (vm, S0), 128 * KiB);
  ck_assert_int_eq (count (vm, S1), 64 * KiB);
  assert_bitmaps (vm, BOTH_BITMAPS);
  fleece_target_free (raw);
  fleece_target_free (nobase);
  fleece_target_free (based);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}
END_TEST

/* fleece_set_drives ({"scsi0"}) + USE works with the bitmap on scsi0 only;
 * the whole VM is refused, naming the drive without one. */
START_TEST (test_bitmap_on_one_drive)
{
  Vm *vm = vm_start ();
  g_autofree char *full = link_dir (vm, "full");
  g_autofree char *incr = link_dir (vm, "incr");
  const char *const only[] = { "scsi0", NULL };
  const Link l_full = { FLEECE_BITMAP_NEW, NULL, only, 0 };
  const Link l_incr = { FLEECE_BITMAP_USE, full, only, 0 };
  struct fleece_handle *h;
  guint8 **pit;

  link_ok (vm, &l_full, full);
  assert_bitmaps (vm, "fscsi0:b0");
  {
    g_auto (GStrv) files = tl_list_dir (full);
    g_autofree char *list = g_strjoinv (",", files);
    ck_assert_str_eq (list, "scsi0.qcow2");
  }
  guest_write (vm, S0, 5 * MiB, 64 * KiB, 0x51);
  guest_write (vm, S1, 5 * MiB, 64 * KiB, 0x52);

  h = tl_handle (vm->tl, VMID, vm->log);
  ck_assert_int_eq (fleece_set_bitmap (h, BITMAP, FLEECE_BITMAP_USE), 0);
  ck_assert_ptr_null (fleece_plan (h));
  ck_assert_int_eq (fleece_get_errno (), ENOENT);
  ck_assert_msg (strstr (fleece_get_error (), "drive scsi1 has no dirty bitmap 'b0'"),
                 "%s", fleece_get_error ());
  fleece_free (h);

  pit = tl_vm_snapshot (vm->tl);
  link_ok (vm, &l_incr, incr);
  assert_restores (vm, incr, S0, pit[S0]);
  ck_assert_int_eq (count (vm, S0), 0);
  assert_bitmaps (vm, "fscsi0:b0");
  tl_vm_snapshot_free (vm->tl, pit);
  vm_stop (vm);
}
END_TEST

/* One test case per test, so that CK_RUN_CASE=<name> runs one. */
static void
add (Suite *s, const char *name, const TTest *test)
{
  TCase *tc = tcase_create (name);

  tcase_set_timeout (tc, 120);
  tcase_add_test (tc, test);
  suite_add_tcase (s, tc);
}

static Suite *
incremental_suite (void)
{
  Suite *s = suite_create ("incremental");

  add (s, "three_link_chain", test_three_link_chain);
  add (s, "fail_nbd_killed", test_fail_nbd_killed);
  add (s, "fail_storage_full", test_fail_storage_full);
  add (s, "fail_cancel", test_fail_cancel);
  add (s, "fail_kill9", test_fail_kill9);
  add (s, "fail_wrong_size_export", test_fail_wrong_size_export);
  add (s, "fail_after_one_drive_done", test_fail_after_one_drive_done);
  add (s, "new_fails_no_bitmap", test_new_fails_no_bitmap);
  add (s, "new_fails_existing_bitmap", test_new_fails_existing_bitmap);
  add (s, "refused_targets", test_refused_targets);
  add (s, "bitmap_on_one_drive", test_bitmap_on_one_drive);
  return s;
}

int
main (void)
{
  SRunner *sr = srunner_create (incremental_suite ());
  int failed;

  srunner_run_all (sr, CK_VERBOSE);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
