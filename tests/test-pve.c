/* The Proxmox engine end to end, against pve-double (a stand-in for
 * Proxmox's patched QEMU that proxies to a real stock QEMU with no guest
 * OS and answers as the real one was seen to): engine choice, the bytes
 * backed up while the guest overwrites what is not backed up yet, EFI disk
 * and TPM state not fleeced, odd raw sizes through the sector-count check,
 * the patched QEMU's refusals, the warning path without backup-fleecing,
 * the legacy HMP attach with nasty paths, cleanup cancelling an active
 * backup before detaching, a full fleecing storage, and backup access.
 *
 * The double stays for what the real patched QEMU cannot be made to do
 * here: versions before 10.0 (HMP attach), a QEMU without backup-fleecing,
 * an order check (a detach under a running backup, which deadlocks the
 * real one, is logged as DEADLOCK), the exact commands sent.  The same
 * lifecycle against the real patched QEMU is test-pve-real.c. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <check.h>
#include <glib/gstdio.h>

#include "testlib.h"
#include "engine.h"
#include "fleece/fleece.h"

#define MiB (1024 * 1024)
#define VMID 100

/* ---- the HMP attach's quoting (no QEMU needed) ---------------------------- */

/* What monitor/hmp.c's get_str() makes of a quoted argument (NULL where it
 * refuses), and what QemuOpts makes of "key=value,..." (value of key). */
static char *
hmp_unquote (const char *p, const char **end)
{
  GString *s = g_string_new (NULL);

  if (*p != '"')
    goto fail;
  for (p++; *p && *p != '"'; p++) {
    if (*p == '\\') {
      p++;
      switch (*p) {
      case 'n': g_string_append_c (s, '\n'); break;
      case 'r': g_string_append_c (s, '\r'); break;
      case '\\': case '\'': case '"': g_string_append_c (s, *p); break;
      default: goto fail;
      }
    } else {
      g_string_append_c (s, *p);
    }
  }
  if (*p != '"')
    goto fail;
  *end = p + 1;
  if (s->len > 1023)
    goto fail;
  return g_string_free (s, FALSE);
 fail:
  g_string_free (s, TRUE);
  return NULL;
}

static char *
qemu_opts_value (const char *opts, const char *key)
{
  const char *p = opts;

  while (*p) {
    const char *eq = strchr (p, '=');
    GString *v = g_string_new (NULL);
    bool match;

    ck_assert_ptr_nonnull (eq);
    match = (size_t) (eq - p) == strlen (key) && strncmp (p, key, eq - p) == 0;
    for (p = eq + 1; *p; p++) {
      if (*p == ',') {
        if (p[1] != ',')
          break;
        p++;
      }
      g_string_append_c (v, *p);
    }
    if (*p == ',')
      p++;
    if (match)
      return g_string_free (v, FALSE);
    g_string_free (v, TRUE);
  }
  return NULL;
}

static char *
roundtrip (const char *path)
{
  g_autoptr (GError) err = NULL;
  g_autofree char *cmd = fleece_pve_drive_add_command (path, "drive-scsi0-fleecing",
                                                       "raw", 4096, &err);
  g_autofree char *opts = NULL;
  const char *end = NULL;

  ck_assert_msg (cmd, "%s", err ? err->message : "?");
  ck_assert (g_str_has_prefix (cmd, "drive_add auto \""));
  opts = hmp_unquote (cmd + strlen ("drive_add auto "), &end);
  ck_assert_msg (opts, "HMP would refuse: %s", cmd);
  ck_assert_str_eq (end, "");
  {
    g_autofree char *id = qemu_opts_value (opts, "id");
    g_autofree char *ifv = qemu_opts_value (opts, "if");
    g_autofree char *size = qemu_opts_value (opts, "size");
    ck_assert_str_eq (id, "drive-scsi0-fleecing");
    ck_assert_str_eq (ifv, "none");
    ck_assert_str_eq (size, "4096");
  }
  return qemu_opts_value (opts, "file");
}

START_TEST (test_hmp_quoting)
{
  static const char *const nasty[] = {
    "/var/lib/vz/images/100/vm-100-fleece-0.raw",
    "/st,orage/a,,b,/vm-100-fleece-0.raw",
    "/with \"quotes\" and 'single'/x.raw",
    "/back\\slash\\\\/x\\\".raw",
    "/new\nline\r/x.raw",
    "/ends with backslash\\",
    "/,format=qcow2,file=/etc/passwd",
    "/\"\",\\,\\\\,,\"/x",
    "/tab\there/x.raw",
    "rbd:pool/vm-100-fleece-0:conf=/etc/pve/ceph.conf",
  };
  g_autoptr (GError) err = NULL;
  g_autofree char *cmd = NULL;
  g_autofree char *longpath = NULL;

  cmd = fleece_pve_drive_add_command ("/a,b", "drive-scsi0-fleecing", "raw", 512, &err);
  ck_assert_str_eq (cmd, "drive_add auto \"file=/a,,b,if=none,id=drive-scsi0-fleecing,"
                         "format=raw,discard=unmap,size=512\"");
  g_free (cmd);
  cmd = fleece_pve_drive_add_command ("/x\"y\\z\n", "drive-scsi0-fleecing", "qcow2", 0, &err);
  ck_assert_str_eq (cmd, "drive_add auto \"file=/x\\\"y\\\\z\\n,if=none,"
                         "id=drive-scsi0-fleecing,format=qcow2,discard=unmap\"");

  for (size_t i = 0; i < G_N_ELEMENTS (nasty); i++) {
    g_autofree char *back = roundtrip (nasty[i]);
    ck_assert_msg (g_strcmp0 (back, nasty[i]) == 0, "'%s' came back as '%s'", nasty[i], back);
  }
  /* Random bytes from the special ones and a few letters. */
  {
    static const char alphabet[] = ",\"\\'\n\r =ab/ ";
    GRand *r = g_rand_new_with_seed (5);
    for (int n = 0; n < 500; n++) {
      char buf[64];
      int len = g_rand_int_range (r, 1, sizeof buf);
      g_autofree char *back = NULL;
      for (int i = 0; i < len; i++)
        buf[i] = alphabet[g_rand_int_range (r, 0, sizeof alphabet - 1)];
      buf[len] = '\0';
      back = roundtrip (buf);
      ck_assert_msg (g_strcmp0 (back, buf) == 0, "'%s' came back as '%s'", buf, back);
    }
    g_rand_free (r);
  }
  /* HMP would silently cut a longer argument: refused instead. */
  longpath = g_strnfill (1000, 'x');
  longpath[0] = '/';
  g_clear_error (&err);
  ck_assert_ptr_null (fleece_pve_drive_add_command (longpath, "drive-scsi0-fleecing",
                                                    "raw", 512, &err));
  ck_assert_int_eq (err->code, ENAMETOOLONG);
}
END_TEST

/* ---- a VM behind pve-double ------------------------------------------------ */

/* Proxmox-like: EFI disk, two SCSI disks (one of a size that is no whole
 * KiB, like the TPM state), the TPM state attached for the backup only (no
 * guest device), a virtio-blk disk. */
static const TlDisk disks[] = {
  { "efidisk0", "raw", 528 * 1024, "virtio", false },
  { "scsi0", "qcow2", 16 * MiB, "scsi", true },
  { "scsi1", "raw", 8 * MiB + 1536, "scsi", true },
  { "tpmstate0", "raw", 4 * MiB + 1536, "none", false },
  { "virtio0", "raw", 8 * MiB, "virtio", true },
};
#define NDISKS G_N_ELEMENTS (disks)

typedef struct {
  TlVm *tl;            /* QEMU, disks, storage, target, state */
  char *plain;         /* a QMP socket of the stock QEMU itself */
  GString *log;
  GPid dbl;            /* pve-double */
  char *dbl_sock;
  char *dbl_log;
} Vm;

static bool
legacy_version (const char *version)
{
  return version && atoi (version) < 10;
}

static void
double_start (Vm *vm, const char *version, bool no_fleecing)
{
  const char *bin = g_getenv ("FLEECE_PVE_DOUBLE");
  g_autoptr (GPtrArray) argv = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GError) err = NULL;
  gint64 deadline = g_get_monotonic_time () + 20 * G_USEC_PER_SEC;

  ck_assert_msg (bin && *bin, "FLEECE_PVE_DOUBLE is not set (run through meson test)");
  g_ptr_array_add (argv, g_strdup (bin));
  g_ptr_array_add (argv, g_strdup_printf ("--listen=%s", vm->dbl_sock));
  g_ptr_array_add (argv, g_strdup_printf ("--qemu=%s", vm->tl->q->qmp_path));
  g_ptr_array_add (argv, g_strdup_printf ("--log=%s", vm->dbl_log));
  if (version)
    g_ptr_array_add (argv, g_strdup_printf ("--version=%s", version));
  if (no_fleecing)
    g_ptr_array_add (argv, g_strdup ("--no-backup-fleecing"));
  g_ptr_array_add (argv, NULL);
  ck_assert_msg (g_spawn_async (NULL, (char **) argv->pdata, NULL, G_SPAWN_DO_NOT_REAP_CHILD,
                                NULL, NULL, &vm->dbl, &err), "%s", err ? err->message : "");
  while (!g_file_test (vm->dbl_sock, G_FILE_TEST_EXISTS)) {
    ck_assert_msg (g_get_monotonic_time () < deadline, "pve-double did not come up");
    ck_assert_msg (waitpid (vm->dbl, NULL, WNOHANG) == 0, "pve-double exited");
    g_usleep (10 * 1000);
  }
}

static void
double_stop (Vm *vm)
{
  if (vm->dbl <= 0)
    return;
  kill (vm->dbl, SIGTERM);
  waitpid (vm->dbl, NULL, 0);
  g_spawn_close_pid (vm->dbl);
  vm->dbl = 0;
}

/* version: what the double reports (NULL: the stock QEMU's); before 10.0
 * the TPM backup drive is a BlockBackend, as qemu-server attached it. */
static Vm *
vm_start (const char *version, bool no_fleecing)
{
  Vm *vm = g_new0 (Vm, 1);
  g_autoptr (GPtrArray) args = g_ptr_array_new_with_free_func (g_free);

  vm->tl = tl_vm_new ("pve", disks, NDISKS, 1);
  /* tl_vm_start leaves the "none" disk (the TPM state) to us: it is
   * attached for the backup only, without a guest device. */
  for (size_t i = 0; i < NDISKS; i++) {
    const TlDisk *d = &disks[i];

    if (strcmp (d->bus, "none") != 0)
      continue;
    if (legacy_version (version)) {
      g_ptr_array_add (args, g_strdup ("-drive"));
      g_ptr_array_add (args, g_strdup_printf (
        "file=%s,if=none,id=drive-%s-backup,format=%s", vm->tl->paths[i], d->key, d->format));
    } else {
      g_ptr_array_add (args, g_strdup ("-blockdev"));
      g_ptr_array_add (args, g_strdup_printf (
        "driver=%s,node-name=drive-%s-backup,file.driver=file,file.filename=%s",
        d->format, d->key, vm->tl->paths[i]));
    }
  }
  vm->plain = g_build_filename (vm->tl->dir, "plain.sock", NULL);
  g_ptr_array_add (args, g_strdup ("-qmp"));
  g_ptr_array_add (args, g_strdup_printf ("unix:%s,server=on,wait=off", vm->plain));
  g_ptr_array_add (args, NULL);
  tl_vm_start (vm->tl, (const char *const *) args->pdata);
  vm->log = g_string_new (NULL);
  vm->dbl_sock = g_build_filename (vm->tl->dir, "pve.sock", NULL);
  vm->dbl_log = g_build_filename (vm->tl->dir, "double.log", NULL);
  double_start (vm, version, no_fleecing);
  return vm;
}

static void
vm_stop (Vm *vm)
{
  double_stop (vm);
  g_free (vm->plain);
  g_free (vm->dbl_sock);
  g_free (vm->dbl_log);
  g_string_free (vm->log, TRUE);
  tl_vm_stop (vm->tl);
  g_free (vm);
}

static struct fleece_handle *
handle_on (Vm *vm, const char *sock, int engine)
{
  struct fleece_handle *h = fleece_new ();

  ck_assert_int_eq (fleece_set_log_callback (h, tl_log_cb, vm->log, NULL), 0);
  ck_assert_int_eq (fleece_set_state_dir (h, vm->tl->state), 0);
  ck_assert_int_eq (fleece_set_vmid (h, VMID), 0);
  ck_assert_int_eq (fleece_set_engine (h, engine), 0);
  ck_assert_msg (fleece_connect (h, sock) == 0, "%s", fleece_get_error ());
  return h;
}

/* A handle on the double with the directory storage. */
static struct fleece_handle *
vm_handle (Vm *vm)
{
  struct fleece_handle *h = handle_on (vm, vm->dbl_sock, FLEECE_ENGINE_AUTO);

  ck_assert_int_eq (fleece_get_engine (h), FLEECE_ENGINE_PVE);
  ck_assert_int_eq (fleece_set_storage (h, fleece_storage_new_dir (vm->tl->storage)), 0);
  return h;
}

static struct fleece_plan *
plan_checked (struct fleece_handle *h, Vm *vm)
{
  return tl_plan (h, vm->log);
}

static struct fleece_target *
vma_target (Vm *vm)
{
  g_autofree char *file = g_build_filename (vm->tl->target, "vzdump-qemu-100.vma", NULL);
  g_autofree char *conf = g_build_filename (vm->tl->dir, "qemu-server.conf", NULL);
  g_autofree char *json = NULL;
  struct fleece_target *t;

  ck_assert (g_file_set_contents (conf, "memory: 512\n", -1, NULL));
  json = g_strdup_printf ("{\"backup-file\": \"%s\", \"format\": \"vma\", "
                          "\"config-file\": \"%s\", \"max-workers\": 4}", file, conf);
  t = fleece_target_new_pve (json);
  ck_assert_msg (t, "%s", fleece_get_error ());
  return t;
}

/* The commands the library sent the double, "<command> <arguments>". */
static char **
sent (Vm *vm)
{
  g_autofree char *text = NULL;
  g_auto (GStrv) lines = NULL;
  GPtrArray *out = g_ptr_array_new ();

  ck_assert (g_file_get_contents (vm->dbl_log, &text, NULL, NULL));
  lines = g_strsplit (text, "\n", -1);
  for (char **l = lines; *l; l++)
    if (g_str_has_prefix (*l, "> "))
      g_ptr_array_add (out, g_strdup (*l + 2));
  g_ptr_array_add (out, NULL);
  return (char **) g_ptr_array_free (out, FALSE);
}

static int
first_sent_after (char **cmds, int after, const char *prefix)
{
  for (int i = after + 1; cmds[i]; i++)
    if (g_str_has_prefix (cmds[i], prefix))
      return i;
  return -1;
}

static int
first_sent (char **cmds, const char *prefix)
{
  return first_sent_after (cmds, -1, prefix);
}

static int
first_sent_in (Vm *vm, const char *prefix)
{
  g_auto (GStrv) cmds = sent (vm);
  return first_sent (cmds, prefix);
}

static bool
double_log_has (Vm *vm, const char *what)
{
  g_autofree char *text = NULL;
  ck_assert (g_file_get_contents (vm->dbl_log, &text, NULL, NULL));
  return strstr (text, what) != NULL;
}

/* The backup arguments the double got. */
static json_object *
backup_args (Vm *vm)
{
  g_auto (GStrv) cmds = sent (vm);
  int i = first_sent (cmds, "backup {");
  ck_assert_msg (i >= 0, "no backup command sent");
  return tl_json ("%s", cmds[i] + strlen ("backup "));
}

static const char *
jget (json_object *o, const char *key)
{
  json_object *v;
  return json_object_object_get_ex (o, key, &v) ? json_object_get_string (v) : NULL;
}

/* Right after the start, as in the patched QEMU: one job per device, named
 * after it, the last device of devlist running, the others "created". */
static void
assert_jobs_in_turn (Vm *vm)
{
  g_autoptr (FleeceQmp) q = fleece_qmp_new ();
  g_autoptr (GError) err = NULL;
  g_autoptr (json_object) jobs = NULL;
  g_autoptr (GString) seen = g_string_new (NULL);

  ck_assert_msg (fleece_qmp_connect_unix (q, vm->dbl_sock, &err), "%s", err->message);
  jobs = fleece_qmp_execute (q, "query-jobs", NULL, &err);
  ck_assert_msg (jobs, "%s", err->message);
  for (size_t i = 0; i < NDISKS; i++) {
    g_autofree char *id = g_strdup_printf ("drive-%s%s", disks[i].key,
                                           strcmp (disks[i].bus, "none") == 0 ? "-backup" : "");
    for (size_t j = 0; j < json_object_array_length (jobs); j++) {
      json_object *job = json_object_array_get_idx (jobs, j);
      if (g_strcmp0 (jget (job, "id"), id) == 0)
        g_string_append_printf (seen, "%s=%s ", id, jget (job, "status"));
    }
  }
  ck_assert_str_eq (seen->str, "drive-efidisk0=created drive-scsi0=created drive-scsi1=created "
                               "drive-tpmstate0-backup=created drive-virtio0=running ");
}

/* Everything undone (testlib: nodes, jobs, storage, record, run marker,
 * device roots), no -fleecing BlockBackend left, and never a fleecing
 * image detached under a running backup. */
static void
assert_nothing_left (Vm *vm)
{
  json_object *blocks = tl_qmp (vm->tl->q, "query-block", NULL);

  tl_assert_nothing_left (vm->tl, VMID);
  for (size_t i = 0; i < json_object_array_length (blocks); i++) {
    const char *dev = jget (json_object_array_get_idx (blocks, i), "device");
    ck_assert_msg (!dev || !strstr (dev, "fleecing"), "%s is left", dev);
  }
  json_object_put (blocks);
  ck_assert_msg (!double_log_has (vm, "DEADLOCK"), "a fleecing image was detached "
                 "under a running backup");
}

static void
overwrite_tail (Vm *vm, unsigned pattern)
{
  ck_assert_uint_gt (tl_vm_overwrite_tail (vm->tl, pattern), 0);
}

/* The raw file the double wrote for each drive in place of the VMA. */
static void
assert_backup_equals (Vm *vm, guint8 **pit)
{
  for (size_t i = 0; i < NDISKS; i++) {
    g_autofree char *name = g_strdup_printf ("%s%s.raw", disks[i].key,
                                             strcmp (disks[i].bus, "none") == 0 ? "-backup" : "");
    g_autofree char *path = g_build_filename (vm->tl->target, name, NULL);
    uint64_t size = 0;
    g_autofree guint8 *got = tl_read_image (path, "raw", &size);

    ck_assert_msg (size == disks[i].size, "%s: backup has %" G_GUINT64_FORMAT
                   " bytes, the disk %" G_GUINT64_FORMAT, name, size, disks[i].size);
    ck_assert_msg (memcmp (got, pit[i], size) == 0,
                   "%s: the backup differs from the point-in-time content", name);
  }
}

static int
wait_done (struct fleece_handle *h)
{
  return tl_wait_end (h, 500);
}

/* A caller's storage from its three callbacks (path-based). */
static struct fleece_storage *
callback_storage (const char *id, unsigned flags, void *user_data,
                  fleece_storage_alloc_fn alloc, fleece_storage_remove_fn remove,
                  fleece_storage_path_fn path)
{
  struct fleece_storage *st = fleece_storage_new_callback (id, flags | FLEECE_STORAGE_PATH,
                                                           user_data, NULL);

  ck_assert_msg (st, "%s", fleece_get_error ());
  ck_assert_int_eq (fleece_storage_set_alloc_callback (st, alloc), 0);
  ck_assert_int_eq (fleece_storage_set_remove_callback (st, remove), 0);
  ck_assert_int_eq (fleece_storage_set_path_callback (st, path), 0);
  return st;
}

/* ---- engine choice ---------------------------------------------------------- */

START_TEST (test_engine_choice)
{
  Vm *vm = vm_start (NULL, false);
  struct fleece_handle *h;

  /* Auto: the double reports backup-fleecing. */
  h = handle_on (vm, vm->dbl_sock, FLEECE_ENGINE_AUTO);
  ck_assert_int_eq (fleece_get_engine (h), FLEECE_ENGINE_PVE);
  /* The caller can force the stock engine on a patched QEMU. */
  ck_assert_int_eq (fleece_set_engine (h, FLEECE_ENGINE_QEMU), 0);
  ck_assert_int_eq (fleece_get_engine (h), FLEECE_ENGINE_QEMU);
  fleece_free (h);

  /* Plain QEMU: stock engine; the Proxmox one refused clearly. */
  h = handle_on (vm, vm->plain, FLEECE_ENGINE_AUTO);
  ck_assert_int_eq (fleece_get_engine (h), FLEECE_ENGINE_QEMU);
  ck_assert_int_eq (fleece_set_engine (h, FLEECE_ENGINE_PVE), -1);
  ck_assert_int_eq (fleece_get_errno (), ENOTSUP);
  ck_assert_msg (strstr (fleece_get_error (), "is not Proxmox's"), "%s", fleece_get_error ());
  fleece_free (h);

  /* Forced before connecting. */
  h = handle_on (vm, vm->dbl_sock, FLEECE_ENGINE_PVE);
  ck_assert_int_eq (fleece_get_engine (h), FLEECE_ENGINE_PVE);
  fleece_free (h);
  vm_stop (vm);
}
END_TEST

/* ---- the whole job ----------------------------------------------------------- */

START_TEST (test_backup_point_in_time)
{
  Vm *vm = vm_start (NULL, false);
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_plan *p = plan_checked (h, vm);
  struct fleece_target *t = vma_target (vm);
  guint8 **pit = tl_vm_snapshot (vm->tl);
  g_autoptr (json_object) args = NULL;
  g_autofree char *manifest = NULL;
  uint64_t done = 0, total = 0, held = 0;
  int r;

  /* EFI disk and TPM state are not fleeced; the TPM state is backed up as
   * qemu-server attached it. */
  ck_assert_uint_eq (fleece_plan_get_drive_count (p), NDISKS);
  for (size_t i = 0; i < NDISKS; i++) {
    ck_assert_str_eq (fleece_plan_get_key (p, i), disks[i].key);
    ck_assert_uint_eq (fleece_plan_get_size (p, i), disks[i].size);
    ck_assert_int_eq (fleece_plan_get_fleeced (p, i), disks[i].fleeced);
  }
  ck_assert_str_eq (fleece_plan_get_device (p, 3), "drive-tpmstate0-backup");
  /* qcow2 of the exact byte count, also for the fractional KiB. */
  ck_assert_str_eq (fleece_plan_get_format (p, 2), "qcow2");
  ck_assert_str_eq (fleece_plan_get_format (p, 1), "qcow2");

  /* 4 MiB/s per job, the jobs one after another: ~9 s, time to write
   * ahead. */
  ck_assert_int_eq (fleece_set_bwlimit (h, 4096), 0);
  ck_assert_msg (fleece_attach (h, p, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  {
    g_auto (GStrv) files = tl_list_dir (vm->tl->storage);
    g_autofree char *list = g_strjoinv (",", files);
    ck_assert_str_eq (list, "vm-100-fleece-0.qcow2,vm-100-fleece-1.qcow2,vm-100-fleece-2.qcow2");
  }
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  assert_jobs_in_turn (vm);

  overwrite_tail (vm, 0xee);
  /* Still running: the overwrites were ahead of the backup, and the old
   * data went to the fleecing images. */
  ck_assert_int_eq (fleece_wait (h, 0), 0);
  {
    g_auto (GStrv) files = tl_list_dir (vm->tl->storage);
    for (char **f = files; *f; f++) {
      g_autofree char *path = g_build_filename (vm->tl->storage, *f, NULL);
      held += tl_allocated_bytes (path);
    }
    ck_assert_msg (held >= 2 * MiB, "fleecing images hold only %" G_GUINT64_FORMAT " bytes",
                   held);
  }

  r = wait_done (h);
  ck_assert_msg (r == 1, "%s\n%s", fleece_get_error (), vm->log->str);
  ck_assert_int_eq (fleece_get_progress (h, &done, &total), 0);
  ck_assert_uint_eq (done, total);
  {
    uint64_t d = 0, tt = 0;
    ck_assert_int_eq (fleece_get_drive_progress (h, "scsi1", &d, &tt), 0);
    ck_assert_uint_eq (tt, disks[2].size);
    ck_assert_uint_eq (d, tt);
  }

  /* What the patched QEMU got: the drives, fleecing, the speed, and the
   * caller's arguments unchanged. */
  args = backup_args (vm);
  ck_assert_str_eq (jget (args, "devlist"),
                    "drive-efidisk0,drive-scsi0,drive-scsi1,drive-tpmstate0-backup,drive-virtio0");
  ck_assert_str_eq (jget (args, "fleecing"), "true");
  ck_assert_str_eq (jget (args, "speed"), "4194304");
  ck_assert_str_eq (jget (args, "format"), "vma");
  ck_assert_str_eq (jget (args, "max-workers"), "4");
  ck_assert_ptr_nonnull (strstr (jget (args, "backup-file"), "vzdump-qemu-100.vma"));
  ck_assert_ptr_nonnull (strstr (jget (args, "config-file"), "qemu-server.conf"));
  /* In the patched QEMU, only the three disks went through fleecing. */
  {
    g_autofree char *file = g_build_filename (vm->tl->target, "vzdump-qemu-100.vma", NULL);
    ck_assert (g_file_get_contents (file, &manifest, NULL, NULL));
    ck_assert_msg (strstr (manifest, "\"device\":\"drive-efidisk0\",\"size\":540672,"
                                     "\"file\""), "%s", manifest);
    for (size_t i = 0; i < NDISKS; i++) {
      g_autofree char *want = g_strdup_printf ("%s.raw\",\"fleeced\":%s}", disks[i].key,
                                               disks[i].fleeced ? "true" : "false");
      if (strcmp (disks[i].bus, "none") == 0)
        want = (g_free (want), g_strdup ("tpmstate0-backup.raw\",\"fleeced\":false}"));
      ck_assert_msg (strstr (manifest, want), "%s not in %s", want, manifest);
    }
    ck_assert_ptr_nonnull (strstr (manifest, "memory: 512"));
  }

  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());
  assert_nothing_left (vm);
  assert_backup_equals (vm, pit);

  tl_vm_snapshot_free (vm->tl, pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}
END_TEST

/* ---- the legacy HMP attach, odd raw sizes, nasty paths ------------------------- */

/* A caller's storage like LVM: raw only, sizes rounded up to 4 MiB extents,
 * in a directory whose name needs quoting on HMP. */
typedef struct {
  char *dir;
} Lvm;

static int
lvm_alloc (void *opaque, const char *name, const char *format, uint64_t size,
           char **volid, char **reason)
{
  Lvm *l = opaque;
  g_autofree char *path = g_build_filename (l->dir, name, NULL);
  uint64_t extent = 4 * MiB;
  int fd;

  ck_assert_str_eq (format, "raw");
  fd = open (path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0 || ftruncate (fd, (off_t) ((size + extent - 1) / extent * extent)) < 0)
    return -1;
  close (fd);
  *volid = strdup (name);
  return 0;
}

static int
lvm_free (void *opaque, const char *volid, char **reason)
{
  Lvm *l = opaque;
  g_autofree char *path = g_build_filename (l->dir, volid, NULL);
  return unlink (path) == 0 || errno == ENOENT ? 0 : -1;
}

static char *
lvm_path (void *opaque, const char *volid, char **reason)
{
  Lvm *l = opaque;
  g_autofree char *path = g_build_filename (l->dir, volid, NULL);
  return strdup (path);
}

START_TEST (test_legacy_hmp_odd_sizes)
{
  Vm *vm = vm_start ("9.2.0", false);
  struct fleece_handle *h = handle_on (vm, vm->dbl_sock, FLEECE_ENGINE_AUTO);
  Lvm lvm = { .dir = g_build_filename (vm->tl->storage, "we,ird \"st\\orage\"", NULL) };
  struct fleece_plan *p;
  struct fleece_target *t = vma_target (vm);
  guint8 **pit = tl_vm_snapshot (vm->tl);
  g_auto (GStrv) cmds = NULL;
  json_object *blocks;
  int attached = 0;

  ck_assert_int_eq (g_mkdir (lvm.dir, 0700), 0);
  ck_assert_int_eq (fleece_get_engine (h), FLEECE_ENGINE_PVE);
  ck_assert_int_eq (fleece_set_storage (h, callback_storage (
    "test:lvm", FLEECE_STORAGE_DISCARD, &lvm, lvm_alloc, lvm_free, lvm_path)), 0);
  p = plan_checked (h, vm);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);

  /* BlockBackends named <device>-fleecing on the exact paths, with the
   * drive's exact size although the storage rounded up. */
  blocks = tl_qmp (vm->tl->q, "query-block", NULL);
  for (size_t i = 0; i < json_object_array_length (blocks); i++) {
    json_object *b = json_object_array_get_idx (blocks, i), *ins, *img, *v;
    const char *dev = jget (b, "device");
    g_autofree char *want = NULL;

    if (!dev || !g_str_has_suffix (dev, "-fleecing"))
      continue;
    attached++;
    ck_assert (json_object_object_get_ex (b, "inserted", &ins));
    ck_assert (json_object_object_get_ex (ins, "image", &img));
    ck_assert (json_object_object_get_ex (img, "virtual-size", &v));
    for (size_t k = 0; k < NDISKS; k++) {
      g_autofree char *id = g_strdup_printf ("drive-%s-fleecing", disks[k].key);
      if (strcmp (id, dev) == 0)
        ck_assert_uint_eq ((uint64_t) json_object_get_int64 (v), disks[k].size);
    }
    /* With size= QEMU names the file json:{..., "file": {"filename": ...}}. */
    want = g_strdup_printf ("%s/vm-100-fleece-", lvm.dir);
    {
      const char *file = jget (ins, "file");
      json_object *spec, *f, *fn;

      ck_assert_msg (g_str_has_prefix (file, "json:"), "%s", file);
      spec = tl_json ("%s", file + strlen ("json:"));
      ck_assert (json_object_object_get_ex (spec, "file", &f));
      ck_assert (json_object_object_get_ex (f, "filename", &fn));
      ck_assert_msg (g_str_has_prefix (json_object_get_string (fn), want), "%s", file);
      json_object_put (spec);
    }
  }
  json_object_put (blocks);
  ck_assert_int_eq (attached, 3);

  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  ck_assert_int_eq (wait_done (h), 1);
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());

  cmds = sent (vm);
  ck_assert_int_ge (first_sent (cmds, "human-monitor-command {\"command-line\":"
                                      "\"drive_add auto"), 0);
  ck_assert_int_ge (first_sent (cmds, "human-monitor-command {\"command-line\":"
                                      "\"drive_del drive-scsi1-fleecing"), 0);
  ck_assert_int_lt (first_sent (cmds, "blockdev-add"), 0);
  assert_backup_equals (vm, pit);
  {
    g_auto (GStrv) left = tl_list_dir (lvm.dir);
    ck_assert_uint_eq (g_strv_length (left), 0);
  }
  g_rmdir (lvm.dir);
  assert_nothing_left (vm);

  tl_vm_snapshot_free (vm->tl, pit);
  g_free (lvm.dir);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}
END_TEST

/* ---- the patched QEMU's refusals -------------------------------------------------- */

START_TEST (test_refusals)
{
  Vm *vm = vm_start (NULL, false);
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_plan *p = plan_checked (h, vm);
  struct fleece_target *t = vma_target (vm);
  g_autofree char *vma = g_build_filename (vm->tl->target, "vzdump-qemu-100.vma", NULL);
  char *e = NULL;
  json_object *r;

  /* A leftover of a run nobody recorded: attach refuses, only a cleanup
   * removes it. */
  r = tl_qmp (vm->tl->q, "blockdev-add", tl_json ("{\"driver\": \"null-co\", \"node-name\": "
                                              "\"drive-scsi1-fleecing\", \"size\": 4096}"));
  json_object_put (r);
  ck_assert_int_eq (fleece_attach (h, p, 0), -1);
  ck_assert_int_eq (fleece_get_errno (), EBUSY);
  ck_assert_msg (strstr (fleece_get_error (), "drive-scsi1-fleecing"), "%s", fleece_get_error ());
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  ck_assert_msg (strstr (vm->log->str, "1: VM 100 has no record, but QEMU shows a run"),
                 "%s", vm->log->str);
  ck_assert_msg (strstr (vm->log->str, "detaching drive-scsi1-fleecing"), "%s", vm->log->str);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);

  /* The seed's sector-count check. */
  r = tl_qmp (vm->tl->q, "block_resize",
              tl_json ("{\"node-name\": \"drive-scsi0-fleecing\", \"size\": %d}", 16 * MiB + 512));
  json_object_put (r);
  ck_assert_int_eq (fleece_start (h, p, t, 0), -1);
  ck_assert_int_eq (fleece_get_errno (), EINVAL);
  ck_assert_msg (strstr (fleece_get_error (), "fleece_start: the fleecing image of scsi0 "
                         "(vm-100-fleece-0.qcow2) has 32769 sectors of 512 bytes, the drive "
                         "32768 (16777216 bytes)"), "%s", fleece_get_error ());
  ck_assert_msg (strstr (fleece_get_error (),
                         "Size mismatch for 'drive-scsi0-fleecing' - sector count 32769 != 32768"),
                 "%s", fleece_get_error ());
  ck_assert (!g_file_test (vma, G_FILE_TEST_EXISTS));

  /* An image gone from QEMU. */
  r = tl_qmp_try (vm->tl->q, "blockdev-del", tl_json ("{\"node-name\": \"drive-scsi0-fleecing\"}"),
                  &e);
  ck_assert_msg (r, "%s", e);
  json_object_put (r);
  ck_assert_int_eq (fleece_start (h, p, t, 0), -1);
  ck_assert_int_eq (fleece_get_errno (), ENOENT);
  ck_assert_msg (strstr (fleece_get_error (), "QEMU has no fleecing image "
                         "drive-scsi0-fleecing for scsi0"), "%s", fleece_get_error ());
  ck_assert_msg (strstr (fleece_get_error (), "Device 'drive-scsi0-fleecing' not found"),
                 "%s", fleece_get_error ());

  /* Arguments the plan owns are refused. */
  {
    struct fleece_target *bad = fleece_target_new_pve ("{\"backup-file\": \"/x\", "
                                                       "\"devlist\": \"drive-scsi0\"}");
    ck_assert_int_eq (fleece_start (h, p, bad, 0), -1);
    ck_assert_int_eq (fleece_get_errno (), EINVAL);
    ck_assert_ptr_nonnull (strstr (fleece_get_error (), "\"devlist\""));
    fleece_target_free (bad);
    bad = fleece_target_new_pve ("{\"target-id\": \"x\", \"backup-file\": \"/x\"}");
    ck_assert_int_eq (fleece_start (h, p, bad, 0), -1);
    ck_assert_int_eq (fleece_get_errno (), EINVAL);
    ck_assert_ptr_nonnull (strstr (fleece_get_error (), "unknown backup access argument"));
    fleece_target_free (bad);
    bad = fleece_target_new_dir (vm->tl->target, "raw");
    ck_assert_int_eq (fleece_start (h, p, bad, 0), -1);
    ck_assert_ptr_nonnull (strstr (fleece_get_error (), "fleece_target_new_pve"));
    fleece_target_free (bad);
  }

  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());
  assert_nothing_left (vm);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}
END_TEST

/* ---- a patched QEMU without backup-fleecing ------------------------------------- */

START_TEST (test_no_backup_fleecing)
{
  Vm *vm = vm_start (NULL, true);
  struct fleece_handle *h;
  struct fleece_plan *p;
  struct fleece_target *t = vma_target (vm);
  guint8 **pit = tl_vm_snapshot (vm->tl);
  g_autoptr (json_object) args = NULL;

  /* Auto: the stock engine, with qemu-server's warning. */
  h = handle_on (vm, vm->dbl_sock, FLEECE_ENGINE_AUTO);
  ck_assert_int_eq (fleece_get_engine (h), FLEECE_ENGINE_QEMU);
  ck_assert_msg (strstr (vm->log->str, "1: running QEMU version does not support backup "
                         "fleecing - using the stock QEMU engine"), "%s", vm->log->str);
  fleece_free (h);

  /* Forced: a clear error, unless the caller allows going without. */
  h = handle_on (vm, vm->dbl_sock, FLEECE_ENGINE_PVE);
  ck_assert_int_eq (fleece_set_storage (h, fleece_storage_new_dir (vm->tl->storage)), 0);
  ck_assert_ptr_null (fleece_plan (h));
  ck_assert_int_eq (fleece_get_errno (), ENOTSUP);
  ck_assert_msg (strstr (fleece_get_error (),
                         "fleece_plan: running QEMU version does not support backup fleecing"),
                 "%s", fleece_get_error ());
  ck_assert_ptr_nonnull (strstr (fleece_get_error (), "FLEECE_PLAN_NO_FLEECING"));

  g_string_truncate (vm->log, 0);
  ck_assert_int_eq (fleece_set_plan_flags (h, FLEECE_PLAN_FLEECING_OPTIONAL), 0);
  p = plan_checked (h, vm);
  ck_assert_msg (strstr (vm->log->str, "1: running QEMU version does not support backup "
                         "fleecing - continuing without"), "%s", vm->log->str);
  for (size_t i = 0; i < NDISKS; i++)
    ck_assert_int_eq (fleece_plan_get_fleeced (p, i), 0);
  ck_assert_int_eq (fleece_set_bwlimit (h, 8192), 0);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s", fleece_get_error ());
  overwrite_tail (vm, 0x5a);
  ck_assert_int_eq (wait_done (h), 1);
  args = backup_args (vm);
  ck_assert_ptr_null (jget (args, "fleecing"));
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);
  assert_backup_equals (vm, pit);
  assert_nothing_left (vm);

  tl_vm_snapshot_free (vm->tl, pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}
END_TEST

/* ---- cancel, and cleanup of an active backup ---------------------------------------- */

/* Raw images on a storage that rounds up, attached as blockdev nodes with
 * the exact size: the seed's sector-count check takes them.  Then cancel. */
START_TEST (test_cancel)
{
  Vm *vm = vm_start (NULL, false);
  struct fleece_handle *h = handle_on (vm, vm->dbl_sock, FLEECE_ENGINE_AUTO);
  Lvm lvm = { .dir = g_strdup (vm->tl->storage) };
  struct fleece_plan *p;
  struct fleece_target *t = vma_target (vm);
  int r;

  ck_assert_int_eq (fleece_set_storage (h, callback_storage (
    "test:lvm", FLEECE_STORAGE_DISCARD, &lvm, lvm_alloc, lvm_free, lvm_path)), 0);
  p = plan_checked (h, vm);
  ck_assert_str_eq (fleece_plan_get_format (p, 2), "raw");
  ck_assert_int_eq (fleece_set_bwlimit (h, 256), 0);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  {
    g_autofree char *img = g_build_filename (vm->tl->storage, "vm-100-fleece-1.raw", NULL);
    struct stat st;
    ck_assert_int_eq (stat (img, &st), 0);
    ck_assert_int_eq (st.st_size, 12 * MiB);
  }
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s", fleece_get_error ());
  ck_assert_int_ge (first_sent_in (vm, "blockdev-add {\"driver\":\"raw\",\"node-name\":"
                                   "\"drive-scsi1-fleecing\""), 0);
  ck_assert_int_eq (fleece_wait (h, 300), 0);
  ck_assert_int_eq (fleece_cancel (h), 0);
  r = wait_done (h);
  ck_assert_int_eq (r, -1);
  ck_assert_int_eq (fleece_get_errno (), ECANCELED);
  ck_assert_ptr_nonnull (strstr (fleece_get_error (), "cancelled"));
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);
  assert_nothing_left (vm);
  g_free (lvm.dir);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}
END_TEST

/* The process running the backup dies; a cleanup from the record alone
 * must cancel the backup and wait for its end before detaching anything
 * (detaching under a running job deadlocks the patched QEMU). */
START_TEST (test_cleanup_cancels_first)
{
  Vm *vm = vm_start (NULL, false);
  int pipefd[2];
  pid_t pid;
  char c;

  ck_assert_int_eq (pipe (pipefd), 0);
  pid = fork ();
  ck_assert_int_ge (pid, 0);
  if (pid == 0) {
    struct fleece_handle *h = vm_handle (vm);
    struct fleece_plan *p = fleece_plan (h);
    struct fleece_target *t = vma_target (vm);

    fleece_set_bwlimit (h, 256);
    if (!p || fleece_attach (h, p, 0) < 0 || fleece_start (h, p, t, 0) < 0) {
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
  kill (pid, SIGKILL);
  waitpid (pid, NULL, 0);
  ck_assert_int_gt (tl_job_count (vm->tl->q), 0);

  {
    /* Not connected: the record knows the double's socket. */
    struct fleece_handle *h = tl_handle_on (vm->tl, VMID, vm->log, NULL);
    g_auto (GStrv) cmds = NULL;
    int cancel, del, query_after = -1;

    ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
    cmds = sent (vm);
    cancel = first_sent (cmds, "backup-cancel");
    del = first_sent (cmds, "blockdev-del");
    ck_assert_int_ge (cancel, 0);
    ck_assert_int_gt (del, cancel);
    ck_assert_int_lt (first_sent (cmds, "human-monitor-command {\"command-line\":\"drive_del"), 0);
    /* It waited for query-backup to stop saying active. */
    for (int i = cancel + 1; i < del; i++)
      if (g_str_has_prefix (cmds[i], "query-backup"))
        query_after = i;
    ck_assert_int_gt (query_after, cancel);
    assert_nothing_left (vm);
    ck_assert (double_log_has (vm, "ended: backup canceled"));
    fleece_free (h);
  }
  vm_stop (vm);
}
END_TEST


/* ---- a fleecing storage that fails ----------------------------------------------------- */

/* Images behind blkdebug that fails every data write with ENOSPC, as a full
 * fleecing storage would: a protocol path, which only the HMP attach takes. */
typedef struct {
  char *dir;
  char *conf;
} Broken;

static int
broken_alloc (void *opaque, const char *name, const char *format, uint64_t size,
              char **volid, char **reason)
{
  Broken *b = opaque;
  g_autofree char *path = g_build_filename (b->dir, name, NULL);
  int fd = open (path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);

  if (fd < 0 || ftruncate (fd, (off_t) size) < 0)
    return -1;
  close (fd);
  *volid = strdup (name);
  return 0;
}

static int
broken_free (void *opaque, const char *volid, char **reason)
{
  Broken *b = opaque;
  g_autofree char *path = g_build_filename (b->dir, volid, NULL);
  return unlink (path) == 0 || errno == ENOENT ? 0 : -1;
}

static char *
broken_path (void *opaque, const char *volid, char **reason)
{
  Broken *b = opaque;
  g_autofree char *path = g_strdup_printf ("blkdebug:%s:%s/%s", b->conf, b->dir, volid);
  return strdup (path);
}

START_TEST (test_cbw_failure)
{
  Vm *vm = vm_start ("9.2.0", false);
  struct fleece_handle *h = handle_on (vm, vm->dbl_sock, FLEECE_ENGINE_PVE);
  Broken b = { .dir = g_strdup (vm->tl->storage),
               .conf = g_build_filename (vm->tl->dir, "full.conf", NULL) };
  struct fleece_plan *p;
  struct fleece_target *t = vma_target (vm);

  ck_assert (g_file_set_contents (b.conf, "[inject-error]\nevent = \"pwritev\"\n"
                                  "iotype = \"write\"\nerrno = \"28\"\n", -1, NULL));
  ck_assert_int_eq (fleece_set_storage (h, callback_storage (
    "test:broken", 0, &b, broken_alloc, broken_free, broken_path)), 0);
  p = plan_checked (h, vm);
  /* Slow enough for the writes to land ahead of the jobs, fast enough for
   * the jobs to reach them soon. */
  ck_assert_int_eq (fleece_set_bwlimit (h, 6144), 0);
  ck_assert_msg (fleece_attach (h, p, 0) == 0, "%s", fleece_get_error ());
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s", fleece_get_error ());
  /* The copies of the old data fail: the guest's writes go through. */
  overwrite_tail (vm, 0x3c);
  ck_assert_int_eq (wait_done (h), -1);
  ck_assert_int_eq (fleece_get_errno (), EIO);
  ck_assert_msg (strstr (fleece_get_error (), "fleece_wait: the backup of VM 100 failed: "
                         "copying old data to the fleecing image vm-100-fleece-"),
                 "%s", fleece_get_error ());
  ck_assert_msg (strstr (fleece_get_error (), " failed or took longer than the "
                         "copy-before-write timeout of 45 s, so the snapshot broke; the "
                         "fleecing storage is full or too slow"), "%s", fleece_get_error ());
  ck_assert_msg (strstr (fleece_get_error (), "(QEMU: job failed with err -13 - "
                         "Permission denied)"), "%s", fleece_get_error ());
  for (size_t i = 0; i < NDISKS; i++) {
    uint64_t size = 0;
    g_autofree guint8 *now = NULL;

    if (strcmp (disks[i].bus, "none") == 0)
      continue;
    now = tl_read_image (vm->tl->paths[i], disks[i].format, &size);
    ck_assert_uint_eq (now[size - 1], 0x3c);
  }
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());
  assert_nothing_left (vm);

  g_free (b.dir);
  g_free (b.conf);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}
END_TEST

/* ---- backup access for external providers ------------------------------------------ */

static void
run_tool (const char *const *argv)
{
  g_autoptr (GError) err = NULL;
  g_autofree char *out = NULL, *errout = NULL;
  int status;

  ck_assert_msg (g_spawn_sync (NULL, (char **) argv, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL,
                               &out, &errout, &status, &err) &&
                 g_spawn_check_wait_status (status, &err),
                 "%s: %s %s", argv[0], err ? err->message : "", errout ? errout : "");
}

/* What a provider does: export the snapshot-access nodes over NBD and read
 * them; they must hold the point-in-time content. */
static void
read_exports (Vm *vm, struct fleece_handle *h, guint8 **pit)
{
  g_autofree char *sock = g_build_filename (vm->tl->dir, "nbd.sock", NULL);
  json_object *r;

  r = tl_qmp (vm->tl->q, "nbd-server-start",
              tl_json ("{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"%s\"}}}", sock));
  json_object_put (r);
  for (size_t i = 0; i < NDISKS; i++) {
    json_object *acc = tl_record_access (h, disks[i].key);
    g_autofree char *uri = g_strdup_printf ("nbd+unix:///%s?socket=%s", disks[i].key, sock);
    g_autofree char *out = g_strdup_printf ("%s/%s.export", vm->tl->target, disks[i].key);
    const char *convert[] = { "qemu-img", "convert", "-q", "-f", "raw", "-O", "raw", uri, out,
                              NULL };
    uint64_t size = 0;
    g_autofree guint8 *got = NULL;

    ck_assert_uint_eq ((uint64_t) json_object_get_int64 (
                         json_object_object_get (acc, "size")), disks[i].size);
    r = tl_qmp (vm->tl->q, "block-export-add",
                tl_json ("{\"type\": \"nbd\", \"id\": \"exp-%s\", \"node-name\": \"%s\","
                         " \"name\": \"%s\"}", disks[i].key, jget (acc, "node-name"),
                         disks[i].key));
    json_object_put (r);
    run_tool (convert);
    got = tl_read_image (out, "raw", &size);
    ck_assert_uint_eq (size, disks[i].size);
    ck_assert_msg (memcmp (got, pit[i], size) == 0, "%s: the export differs from the "
                   "point-in-time content", disks[i].key);
    r = tl_qmp (vm->tl->q, "block-export-del", tl_json ("{\"id\": \"exp-%s\"}", disks[i].key));
    json_object_put (r);
    json_object_put (acc);
  }
  r = tl_qmp (vm->tl->q, "nbd-server-stop", NULL);
  json_object_put (r);
}

static int64_t
bitmap_count (Vm *vm, const char *node_or_device, const char *name)
{
  json_object *nodes = tl_qmp (vm->tl->q, "query-named-block-nodes", tl_json ("{\"flat\": true}"));
  int64_t count = -1;

  for (size_t i = 0; i < json_object_array_length (nodes); i++) {
    json_object *n = json_object_array_get_idx (nodes, i), *bms;
    if (g_strcmp0 (jget (n, "node-name"), node_or_device) != 0 ||
        !json_object_object_get_ex (n, "dirty-bitmaps", &bms))
      continue;
    for (size_t j = 0; j < json_object_array_length (bms); j++) {
      json_object *b = json_object_array_get_idx (bms, j);
      if (g_strcmp0 (jget (b, "name"), name) == 0)
        count = json_object_get_int64 (json_object_object_get (b, "count"));
    }
  }
  json_object_put (nodes);
  return count;
}

START_TEST (test_backup_access)
{
  Vm *vm = vm_start (NULL, false);
  struct fleece_handle *h = vm_handle (vm);
  struct fleece_plan *p;
  struct fleece_target *t;
  guint8 **pit = tl_vm_snapshot (vm->tl);
  g_auto (GStrv) cmds = NULL;
  g_autofree char *scsi0_root = NULL;
  g_autofree char *scsi1_root = NULL;
  int teardown;

  /* Every drive fleeced, EFI disk and TPM state too; refused otherwise. */
  p = plan_checked (h, vm);
  t = fleece_target_new_pve ("{\"target-id\": \"snapshot-access:ext\", \"bitmap-mode\": \"new\"}");
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  ck_assert_int_eq (fleece_start (h, p, t, 0), -1);
  ck_assert_int_eq (fleece_get_errno (), EINVAL);
  ck_assert_msg (strstr (fleece_get_error (), "backup access fleeces every drive, but "
                         "efidisk0 is not fleeced"), "%s", fleece_get_error ());
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);
  fleece_plan_free (p);
  ck_assert_int_eq (fleece_set_plan_flags (h, FLEECE_PLAN_ALL_DRIVES), 0);
  p = plan_checked (h, vm);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s\n%s", fleece_get_error (), vm->log->str);
  cmds = sent (vm);
  ck_assert_int_ge (first_sent (cmds, "backup-access-setup {\"target-id\":\"snapshot-access:ext\","
                                      "\"devices\":[{\"device\":\"drive-efidisk0\",\"bitmap-mode\":"
                                      "\"new\"},"), 0);
  g_strfreev (g_steal_pointer (&cmds));

  /* The guest writes on; the exports keep the point in time. */
  overwrite_tail (vm, 0xa5);
  read_exports (vm, h, pit);
  ck_assert_int_eq (fleece_wait (h, 100), 0);
  {
    json_object *acc = tl_record_access (h, "scsi0");
    ck_assert_str_eq (jget (acc, "bitmap-action"), "new");
    ck_assert_str_eq (jget (acc, "bitmap-name"), "snapshot-access:ext");
    scsi0_root = g_strdup (jget (acc, "bitmap-node-name"));
    json_object_put (acc);
    acc = tl_record_access (h, "scsi1");
    scsi1_root = g_strdup (jget (acc, "bitmap-node-name"));
    json_object_put (acc);
  }

  /* Success: torn down first, then detached; the bitmap now holds what the
   * guest wrote since the setup, for the next incremental backup. */
  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s", fleece_get_error ());
  cmds = sent (vm);
  teardown = first_sent (cmds, "backup-access-teardown {\"target-id\":\"snapshot-access:ext\","
                               "\"success\":true}");
  ck_assert_int_ge (teardown, 0);
  /* Nothing was detached between the setup and the teardown. */
  ck_assert_int_gt (first_sent_after (cmds, first_sent (cmds, "backup-access-setup"),
                                      "blockdev-del"), teardown);
  ck_assert_int_gt (bitmap_count (vm, scsi0_root, "snapshot-access:ext"), 0);
  ck_assert_int_gt (bitmap_count (vm, scsi1_root, "snapshot-access:ext"), 0);
  ck_assert_int_eq (bitmap_count (vm, "drive-tpmstate0-backup", "snapshot-access:ext"), 0);
  assert_nothing_left (vm);
  fleece_target_free (t);
  fleece_plan_free (p);

  /* Again with the bitmap, then cancelled: a failed access. */
  t = fleece_target_new_pve ("{\"target-id\": \"snapshot-access:ext\", \"bitmap-mode\": "
                             "{\"scsi0\": \"use\"}}");
  p = plan_checked (h, vm);
  ck_assert_int_eq (fleece_attach (h, p, 0), 0);
  ck_assert_msg (fleece_start (h, p, t, 0) == 0, "%s", fleece_get_error ());
  {
    json_object *acc = tl_record_access (h, "scsi0");
    ck_assert_str_eq (jget (acc, "bitmap-action"), "used");
    json_object_put (acc);
    /* Mode none drops the bitmap and reports none. */
    acc = tl_record_access (h, "scsi1");
    ck_assert_ptr_null (jget (acc, "bitmap-name"));
    json_object_put (acc);
    ck_assert_int_eq (bitmap_count (vm, scsi1_root, "snapshot-access:ext"), -1);
  }
  ck_assert_int_eq (fleece_cancel (h), 0);
  ck_assert_int_eq (fleece_wait (h, 1000), -1);
  ck_assert_int_eq (fleece_get_errno (), ECANCELED);
  ck_assert_int_eq (fleece_cleanup (h, 0), 0);
  g_strfreev (g_steal_pointer (&cmds));
  cmds = sent (vm);
  ck_assert_int_ge (first_sent (cmds, "backup-access-teardown {\"target-id\":"
                                      "\"snapshot-access:ext\",\"success\":false}"), 0);
  assert_nothing_left (vm);

  tl_vm_snapshot_free (vm->tl, pit);
  fleece_target_free (t);
  fleece_plan_free (p);
  fleece_free (h);
  vm_stop (vm);
}
END_TEST

static Suite *
pve_suite (void)
{
  Suite *s = suite_create ("pve");
  TCase *unit = tcase_create ("unit");
  TCase *tc = tcase_create ("double");

  tcase_add_test (unit, test_hmp_quoting);
  suite_add_tcase (s, unit);
  tcase_set_timeout (tc, 120);
  tcase_add_test (tc, test_engine_choice);
  tcase_add_test (tc, test_backup_point_in_time);
  tcase_add_test (tc, test_legacy_hmp_odd_sizes);
  tcase_add_test (tc, test_refusals);
  tcase_add_test (tc, test_no_backup_fleecing);
  tcase_add_test (tc, test_cancel);
  tcase_add_test (tc, test_cleanup_cancels_first);
  tcase_add_test (tc, test_backup_access);
  tcase_add_test (tc, test_cbw_failure);
  suite_add_tcase (s, tc);
  return s;
}

int
main (void)
{
  SRunner *sr = srunner_create (pve_suite ());
  int failed;

  srunner_run_all (sr, CK_VERBOSE);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
