/* The fleece command, run as a separate process against a real QEMU (no
 * guest OS): usage errors, backups to a directory and over NBD with the
 * bytes checked against the point in time, --json parsed, SIGTERM mid-backup,
 * cleanup after kill -9, plan, status, and an interrupted demo.
 *
 * Usage: test-tool /path/to/fleece */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
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

#define MiB (1024 * 1024)
#define VMID "100"

static const char *fleece_bin;

/* ---- running the command -------------------------------------------- */

typedef struct {
  GPid pid;
  int out_fd;
  int err_fd;
  GString *out;
  GString *err;
  size_t out_seen;      /* bytes of out already returned as lines */
  size_t err_seen;
} Run;

static void
child_setup (gpointer data)
{
  prctl (PR_SET_PDEATHSIG, SIGKILL);
}

static Run *
run_start (const char *const *args, const char *const *env_extra)
{
  Run *r = g_new0 (Run, 1);
  g_autoptr (GPtrArray) argv = g_ptr_array_new ();
  g_auto (GStrv) envp = g_get_environ ();
  g_autoptr (GError) err = NULL;

  g_ptr_array_add (argv, (char *) fleece_bin);
  for (size_t i = 0; args[i]; i++)
    g_ptr_array_add (argv, (char *) args[i]);
  g_ptr_array_add (argv, NULL);
  envp = g_environ_unsetenv (envp, "FLEECE_STATE_DIR");
  for (size_t i = 0; env_extra && env_extra[i]; i += 2)
    envp = g_environ_setenv (envp, env_extra[i], env_extra[i + 1], TRUE);
  if (!g_spawn_async_with_pipes (NULL, (char **) argv->pdata, envp,
                                 G_SPAWN_DO_NOT_REAP_CHILD, child_setup, NULL,
                                 &r->pid, NULL, &r->out_fd, &r->err_fd, &err))
    ck_abort_msg ("cannot run %s: %s", fleece_bin, err->message);
  r->out = g_string_new (NULL);
  r->err = g_string_new (NULL);
  return r;
}

/* Read what is available (waiting up to timeout_ms); false on EOF of both. */
static bool
run_read (Run *r, int timeout_ms)
{
  struct pollfd p[2] = {
    { .fd = r->out_fd, .events = POLLIN },
    { .fd = r->err_fd, .events = POLLIN },
  };
  char buf[65536];

  if (r->out_fd < 0 && r->err_fd < 0)
    return false;
  if (poll (p, 2, timeout_ms) <= 0)
    return true;
  for (int i = 0; i < 2; i++) {
    int *fd = i ? &r->err_fd : &r->out_fd;
    ssize_t n;

    if (*fd < 0 || !(p[i].revents & (POLLIN | POLLHUP | POLLERR)))
      continue;
    n = read (*fd, buf, sizeof buf);
    if (n > 0)
      g_string_append_len (i ? r->err : r->out, buf, n);
    else if (n == 0 || errno != EINTR) {
      close (*fd);
      *fd = -1;
    }
  }
  return true;
}

/* Wait until stdout (or stderr) has a line containing needle. */
static void
run_wait_for (Run *r, bool on_stderr, const char *needle, int timeout_s)
{
  gint64 deadline = g_get_monotonic_time () + (gint64) timeout_s * G_USEC_PER_SEC;
  GString *s = on_stderr ? r->err : r->out;

  while (!strstr (s->str, needle)) {
    ck_assert_msg (g_get_monotonic_time () < deadline,
                   "no '%s' within %d s; stdout:\n%s\nstderr:\n%s", needle,
                   timeout_s, r->out->str, r->err->str);
    if (!run_read (r, 100))
      ck_abort_msg ("fleece ended before '%s'; stdout:\n%s\nstderr:\n%s",
                    needle, r->out->str, r->err->str);
  }
}

/* Wait for the end; the exit status, or 128 + the signal. */
static int
run_finish (Run *r, int timeout_s)
{
  gint64 deadline = g_get_monotonic_time () + (gint64) timeout_s * G_USEC_PER_SEC;
  int status;

  while (run_read (r, 100))
    if (g_get_monotonic_time () > deadline) {
      kill (r->pid, SIGKILL);
      ck_abort_msg ("fleece did not end within %d s; stdout:\n%s\nstderr:\n%s",
                    timeout_s, r->out->str, r->err->str);
    }
  ck_assert_int_eq (waitpid (r->pid, &status, 0), r->pid);
  g_spawn_close_pid (r->pid);
  return WIFEXITED (status) ? WEXITSTATUS (status) : 128 + WTERMSIG (status);
}

static void
run_free (Run *r)
{
  g_string_free (r->out, TRUE);
  g_string_free (r->err, TRUE);
  g_free (r);
}

/* Run to the end; returns the exit status, output in *out / *err. */
static int
run_sync_env (const char *const *args, const char *const *env, char **out,
              char **err)
{
  Run *r = run_start (args, env);
  int rc = run_finish (r, 120);

  if (out)
    *out = g_strdup (r->out->str);
  if (err)
    *err = g_strdup (r->err->str);
  run_free (r);
  return rc;
}

static int
run_sync (const char *const *args, char **out, char **err)
{
  return run_sync_env (args, NULL, out, err);
}

/* ---- a Proxmox-shaped VM -------------------------------------------- */

static const TlDisk disks[] = {
  { "efidisk0", "raw", 528 * 1024, "virtio", false },
  { "scsi0", "qcow2", 16 * MiB, "scsi", true },
  { "scsi1", "raw", 8 * MiB + 4096, "scsi", true },
  { "virtio0", "raw", 8 * MiB, "virtio", true },
};
#define NDISKS G_N_ELEMENTS (disks)

static TlVm *
vm_start (void)
{
  TlVm *vm = tl_vm_new ("tool", disks, NDISKS, 11);

  tl_vm_start (vm, NULL);
  return vm;
}

/* Overwrite the last 1 MiB of every disk through the guest device, ahead of
 * the backup, which starts at 0. */
static void
overwrite_tail (TlVm *vm, unsigned pattern)
{
  for (size_t i = 0; i < NDISKS; i++) {
    uint64_t len = MIN ((uint64_t) MiB, disks[i].size / 2);
    uint64_t off = (disks[i].size - len) & ~(uint64_t) 4095;
    g_autofree char *cmd = g_strdup_printf ("write -P 0x%02x %" G_GUINT64_FORMAT
                                            " %" G_GUINT64_FORMAT, pattern, off,
                                            disks[i].size - off);
    tl_guest_io (vm->q, tl_disk_qdev (&disks[i]), cmd);
  }
}

static void
assert_equals_pit (const char *path, const char *format, const guint8 *pit,
                   uint64_t size)
{
  uint64_t got_size = 0;
  g_autofree guint8 *got = tl_read_image (path, format, &got_size);

  ck_assert_msg (got_size == size, "%s: %" G_GUINT64_FORMAT " bytes, the disk has %"
                 G_GUINT64_FORMAT, path, got_size, size);
  ck_assert_msg (memcmp (got, pit, size) == 0,
                 "%s differs from the point-in-time content", path);
}

static void
assert_nothing_left (TlVm *vm)
{
  g_auto (GStrv) nodes = tl_node_names (vm->q);
  g_auto (GStrv) files = tl_list_dir (vm->storage);
  g_autofree char *nb = g_strjoinv (",", vm->nodes_before);
  g_autofree char *na = g_strjoinv (",", nodes);
  g_autofree char *record = g_strdup_printf ("%s/%s.json", vm->state, VMID);

  ck_assert_str_eq (na, nb);
  ck_assert_int_eq (tl_job_count (vm->q), 0);
  ck_assert_msg (g_strv_length (files) == 0, "storage not empty: %s", files[0]);
  ck_assert_msg (!g_file_test (record, G_FILE_TEST_EXISTS), "the record is left");
  for (size_t i = 0; i < NDISKS; i++) {
    g_autofree char *root = tl_device_root (vm->q, disks[i].key);
    ck_assert_ptr_nonnull (root);
    ck_assert_msg (strstr (root, "fleece") == NULL, "%s still uses %s", disks[i].key, root);
  }
}

/* ---- JSON output ---------------------------------------------------- */

static void
put_json (gpointer o)
{
  json_object_put (o);
}

/* Every line of out parsed. */
static GPtrArray *
parse_events (const char *out)
{
  GPtrArray *events = g_ptr_array_new_with_free_func (put_json);
  g_auto (GStrv) lines = g_strsplit (out, "\n", -1);

  for (size_t i = 0; lines[i]; i++) {
    json_object *o;
    if (!*lines[i])
      continue;
    o = json_tokener_parse (lines[i]);
    ck_assert_msg (o && json_object_is_type (o, json_type_object),
                   "not a JSON object: %s", lines[i]);
    g_ptr_array_add (events, o);
  }
  return events;
}

static const char *
jstr (json_object *o, const char *key)
{
  json_object *v;
  ck_assert_msg (json_object_object_get_ex (o, key, &v), "no \"%s\" in %s", key,
                 json_object_to_json_string (o));
  return v ? json_object_get_string (v) : NULL;
}

static json_object *
jget (json_object *o, const char *key)
{
  json_object *v;
  ck_assert_msg (json_object_object_get_ex (o, key, &v), "no \"%s\" in %s", key,
                 json_object_to_json_string (o));
  return v;
}

static size_t
count_events (GPtrArray *events, const char *name)
{
  size_t n = 0;
  for (guint i = 0; i < events->len; i++)
    n += g_strcmp0 (jstr (events->pdata[i], "event"), name) == 0;
  return n;
}

/* ---- usage errors --------------------------------------------------- */

static void
assert_usage (const char *const *args, const char *message)
{
  g_autofree char *out = NULL, *err = NULL;
  int rc = run_sync (args, &out, &err);

  ck_assert_msg (rc == 2, "exit %d, not 2, for '%s'; stderr: %s", rc, message, err);
  ck_assert_msg (strstr (err, message), "stderr lacks '%s': %s", message, err);
  ck_assert_msg (g_str_has_prefix (err, "fleece"), "stderr: %s", err);
  ck_assert_msg (strchr (err, '\n') == err + strlen (err) - 1,
                 "not one line: %s", err);
  ck_assert_str_eq (out, "");
}

START_TEST (test_usage_errors)
{
  char *dir = tl_tmpdir_new ("tool-usage");
#define A(...) ((const char *const[]) { __VA_ARGS__, NULL })
  assert_usage ((const char *const[]) { NULL }, "missing command");
  assert_usage (A ("frobnicate"), "unknown command 'frobnicate'");
  assert_usage (A ("--frob"), "unknown option --frob");
  assert_usage (A ("backup", "--frob"), "fleece backup: unknown option --frob; see 'fleece backup --help'");
  assert_usage (A ("backup"), "missing --vmid");
  assert_usage (A ("backup", "--vmid", "0"), "--vmid must be a number from 1 to 999999999");
  assert_usage (A ("backup", "--vmid", "1000000000"), "--vmid must be a number from 1 to 999999999");
  assert_usage (A ("backup", "--vmid", "12a"), "--vmid must be a number");
  assert_usage (A ("backup", "--vmid", "100"), "missing --qmp PATH");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", "q.sock"), "missing --fleecing-storage DIR");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", "q.sock", "--fleecing-storage",
                   "/nonexistent-fleece"), "--fleecing-storage /nonexistent-fleece: no such directory");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", "q.sock", "--fleecing-storage", dir),
                "missing target: give --target-dir DIR, --target-nbd");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", "q.sock", "--fleecing-storage", dir,
                   "--target-dir", dir, "--target-nbd", "nbd+unix:///?socket=/x"),
                "--target-dir and --target-nbd exclude each other");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", "q.sock", "--fleecing-storage", dir,
                   "--target-dir", dir, "--engine", "xen"),
                "--engine must be auto, qemu or pve, not 'xen'");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", "q.sock", "--fleecing-storage", dir,
                   "--vma", "/b/x.vma", "--engine", "qemu"),
                "--vma/--pve-args need --engine pve (or auto)");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", "q.sock", "--fleecing-storage", dir,
                   "--vma", "/b/x.vma", "--target-dir", dir),
                "leave out --target-dir and --target-nbd");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", "q.sock", "--fleecing-storage", dir,
                   "--pve-args", "[1]"), "--pve-args must be a JSON object");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", "q.sock", "--fleecing-storage", dir,
                   "--target-dir", dir, "--target-format", "vmdk"),
                "--target-format must be raw or qcow2");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", "q.sock", "--fleecing-storage", dir,
                   "--target-nbd", "nbd+unix:///?socket=/x", "--target-format", "raw"),
                "--target-format applies to --target-dir only");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", "q.sock", "--fleecing-storage", dir,
                   "--target-dir", dir, "--bwlimit", "-5"), "--bwlimit must be a number of KiB/s");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", "q.sock", "--fleecing-storage", dir,
                   "--target-dir", dir, "--cbw-timeout", "99999999999"),
                "--cbw-timeout must be a number of seconds");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", "q.sock", "--fleecing-storage", dir,
                   "--target-dir", dir, "--devices", "scsi0,,virtio0"), "--devices takes");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", "q.sock", "--fleecing-storage", dir,
                   "--target-nbd", "http://example.com/"), "fleece_target_new_nbd");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", "q.sock", "--fleecing-storage", dir,
                   "--target-dir", dir, "extra"), "unexpected argument 'extra'");
  assert_usage (A ("backup", "--vmid"), "missing argument for --vmid");
  assert_usage (A ("plan", "--vmid", "100", "--fleecing-storage", dir), "fleece plan: missing --qmp");
  assert_usage (A ("status"), "fleece status: missing --vmid");
  assert_usage (A ("status", "--vmid", "x"), "fleece status: --vmid must be a number");
  assert_usage (A ("cleanup", "--vmid", "100", "now"), "fleece cleanup: unexpected argument 'now'");
  assert_usage (A ("demo", "--fast"), "fleece demo: unknown option --fast");
#undef A
  tl_tmpdir_free (dir);
}
END_TEST

START_TEST (test_help_and_version)
{
  g_autofree char *out = NULL, *err = NULL;
  const char *const version[] = { "--version", NULL };
  const char *const help[] = { "--help", NULL };
  const char *const backup_help[] = { "backup", "--help", NULL };

  ck_assert_int_eq (run_sync (version, &out, &err), 0);
  ck_assert_msg (g_str_has_prefix (out, "fleece 0.1.0 (libfleece 0.1.0)"), "%s", out);
  g_free (out);
  g_free (err);
  ck_assert_int_eq (run_sync (help, &out, &err), 0);
  ck_assert_ptr_nonnull (strstr (out, "backup"));
  ck_assert_ptr_nonnull (strstr (out, "cleanup"));
  ck_assert_ptr_nonnull (strstr (out, "demo"));
  g_free (out);
  g_free (err);
  ck_assert_int_eq (run_sync (backup_help, &out, &err), 0);
  ck_assert_ptr_nonnull (strstr (out, "--target-nbd"));
  ck_assert_ptr_nonnull (strstr (out, "--no-fleecing"));
}
END_TEST

/* ---- backups -------------------------------------------------------- */

static void
check_result_drives (json_object *result, const char *format, TlVm *vm)
{
  json_object *drives = jget (result, "drives");

  ck_assert_uint_eq (json_object_array_length (drives), NDISKS);
  for (size_t i = 0; i < NDISKS; i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    g_autofree char *target = g_strdup_printf ("%s/%s.%s", vm->target, disks[i].key, format);

    ck_assert_str_eq (jstr (d, "key"), disks[i].key);
    ck_assert_int_eq (json_object_get_boolean (jget (d, "fleeced")), disks[i].fleeced);
    if (disks[i].fleeced)
      ck_assert_msg (g_str_has_prefix (jstr (d, "image"), "vm-100-fleece-"), "%s",
                     jstr (d, "image"));
    else
      ck_assert_ptr_null (jget (d, "image"));
    ck_assert_uint_eq ((uint64_t) json_object_get_int64 (jget (d, "bytes")), disks[i].size);
    ck_assert (json_object_is_type (jget (d, "seconds"), json_type_double));
    ck_assert (json_object_get_double (jget (d, "seconds")) >= 0);
    ck_assert_str_eq (jstr (d, "result"), "ok");
    ck_assert_str_eq (jstr (d, "target"), target);
  }
}

/* A full backup to a directory with --json, the guest writing meanwhile. */
START_TEST (test_backup_dir_json)
{
  TlVm *vm = vm_start ();
  guint8 **pit = tl_vm_snapshot (vm);
  const char *const args[] = {
    "backup", "--qmp", vm->q->qmp_path, "--vmid", VMID,
    "--fleecing-storage", vm->storage, "--target-dir", vm->target,
    "--target-format", "qcow2", "--state-dir", vm->state,
    "--bwlimit", "4096", "--json", NULL,
  };
  Run *r = run_start (args, NULL);
  GPtrArray *events;
  json_object *plan, *result;
  int rc;

  run_wait_for (r, false, "\"event\":\"started\"", 30);
  overwrite_tail (vm, 0xee);
  rc = run_finish (r, 60);
  ck_assert_msg (rc == 0, "exit %d\n%s\n%s", rc, r->out->str, r->err->str);

  events = parse_events (r->out->str);
  plan = events->pdata[0];
  ck_assert_str_eq (jstr (plan, "event"), "plan");
  ck_assert_uint_eq (json_object_array_length (jget (plan, "drives")), NDISKS);
  ck_assert_uint_eq (count_events (events, "started"), 1);
  ck_assert_uint_ge (count_events (events, "progress"), 1);
  ck_assert_uint_eq (count_events (events, "drive-done"), NDISKS);
  ck_assert_uint_eq (count_events (events, "cleanup"), 1);
  result = events->pdata[events->len - 1];
  ck_assert_str_eq (jstr (result, "event"), "result");
  ck_assert_str_eq (jstr (result, "result"), "ok");
  ck_assert_ptr_null (jget (result, "error"));
  ck_assert_str_eq (jstr (result, "cleanup"), "ok");
  ck_assert_int_eq (json_object_get_int (jget (result, "vmid")), 100);
  ck_assert (json_object_get_boolean (jget (result, "fleecing")));
  check_result_drives (result, "qcow2", vm);

  assert_nothing_left (vm);
  for (size_t i = 0; i < NDISKS; i++) {
    g_autofree char *name = g_strdup_printf ("%s.qcow2", disks[i].key);
    g_autofree char *path = g_build_filename (vm->target, name, NULL);
    assert_equals_pit (path, "qcow2", pit[i], disks[i].size);
  }

  g_ptr_array_unref (events);
  run_free (r);
  tl_vm_snapshot_free (vm, pit);
  tl_vm_stop (vm);
}
END_TEST

/* The NBD target: qemu-storage-daemon exporting one file per drive. */
START_TEST (test_backup_nbd)
{
  TlVm *vm = vm_start ();
  guint8 **pit = tl_vm_snapshot (vm);
  g_autofree char *sock = g_build_filename (vm->dir, "nbd.sock", NULL);
  g_autofree char *uri = g_strdup_printf ("nbd+unix:///?socket=%s", sock);
  g_autoptr (GPtrArray) qsd = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GError) err = NULL;
  GPid qsd_pid;
  int status, rc;
  Run *r;

  g_ptr_array_add (qsd, g_strdup ("qemu-storage-daemon"));
  g_ptr_array_add (qsd, g_strdup ("--nbd-server"));
  g_ptr_array_add (qsd, g_strdup_printf ("addr.type=unix,addr.path=%s", sock));
  for (size_t i = 0; i < NDISKS; i++) {
    g_autofree char *name = g_strdup_printf ("nbd-%s.raw", disks[i].key);
    g_autofree char *path = g_build_filename (vm->target, name, NULL);
    int fd = open (path, O_WRONLY | O_CREAT | O_EXCL, 0600);

    ck_assert_int_ge (fd, 0);
    ck_assert_int_eq (ftruncate (fd, (off_t) disks[i].size), 0);
    close (fd);
    g_ptr_array_add (qsd, g_strdup ("--blockdev"));
    g_ptr_array_add (qsd, g_strdup_printf ("driver=file,node-name=f%zu,filename=%s", i, path));
    g_ptr_array_add (qsd, g_strdup ("--export"));
    g_ptr_array_add (qsd, g_strdup_printf ("type=nbd,id=e%zu,node-name=f%zu,name=%s,writable=on",
                                           i, i, disks[i].key));
  }
  g_ptr_array_add (qsd, NULL);
  ck_assert_msg (g_spawn_async (NULL, (char **) qsd->pdata, NULL,
                                G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD,
                                child_setup, NULL, &qsd_pid, &err),
                 "qemu-storage-daemon: %s", err ? err->message : "?");
  for (int i = 0; i < 500 && !g_file_test (sock, G_FILE_TEST_EXISTS); i++)
    g_usleep (10 * 1000);
  ck_assert_msg (g_file_test (sock, G_FILE_TEST_EXISTS), "no NBD socket");

  {
    /* Human output; --devices with an id and a key. */
    const char *const args[] = {
      "backup", "--qmp", vm->q->qmp_path, "--vmid", VMID,
      "--fleecing-storage", vm->storage, "--target-nbd", uri,
      "--state-dir", vm->state, "--bwlimit", "4096",
      "--devices", "drive-scsi0,scsi1,efidisk0,drive-virtio0", NULL,
    };
    r = run_start (args, NULL);
    run_wait_for (r, true, "fleece backup: started", 30);
    overwrite_tail (vm, 0x5a);
    rc = run_finish (r, 60);
    ck_assert_msg (rc == 0, "exit %d\n%s\n%s", rc, r->out->str, r->err->str);
    ck_assert_msg (strstr (r->out->str, "fleece backup: VM 100 backed up in"), "%s", r->out->str);
    ck_assert_msg (strstr (r->out->str, "(export scsi0)"), "%s", r->out->str);
    ck_assert_msg (strstr (r->err->str, "fleece backup: scsi0 done: 16.0 MiB in"), "%s",
                   r->err->str);
    run_free (r);
  }
  kill (qsd_pid, SIGTERM);
  ck_assert_int_eq (waitpid (qsd_pid, &status, 0), qsd_pid);
  g_spawn_close_pid (qsd_pid);

  assert_nothing_left (vm);
  for (size_t i = 0; i < NDISKS; i++) {
    g_autofree char *name = g_strdup_printf ("nbd-%s.raw", disks[i].key);
    g_autofree char *path = g_build_filename (vm->target, name, NULL);
    assert_equals_pit (path, "raw", pit[i], disks[i].size);
  }
  tl_vm_snapshot_free (vm, pit);
  tl_vm_stop (vm);
}
END_TEST

/* --vma on Proxmox's QEMU (tests/pve-double standing in for it): the
 * engine is chosen by probing, the archive arguments reach QEMU's backup
 * command (the double writes a raw file per drive beside the archive). */
START_TEST (test_backup_vma_pve)
{
  TlVm *vm = vm_start ();
  guint8 **pit = tl_vm_snapshot (vm);
  const char *bin = g_getenv ("FLEECE_PVE_DOUBLE");
  g_autofree char *dsock = g_build_filename (vm->dir, "pve.sock", NULL);
  g_autofree char *listen = g_strdup_printf ("--listen=%s", dsock);
  g_autofree char *upstream = g_strdup_printf ("--qemu=%s", vm->q->qmp_path);
  g_autofree char *vma = g_build_filename (vm->target, "vzdump-qemu-100.vma", NULL);
  const char *dargv[] = { bin, listen, upstream, NULL };
  const char *const args[] = {
    "backup", "--qmp", dsock, "--vmid", VMID,
    "--fleecing-storage", vm->storage, "--vma", vma,
    "--state-dir", vm->state, "--json", NULL,
  };
  g_autoptr (GError) err = NULL;
  GPid dpid;
  Run *r;
  GPtrArray *events;
  json_object *result;
  int rc;

  ck_assert_msg (bin && *bin, "FLEECE_PVE_DOUBLE is not set (run through meson test)");
  ck_assert_msg (g_spawn_async (NULL, (char **) dargv, NULL, G_SPAWN_DO_NOT_REAP_CHILD,
                                child_setup, NULL, &dpid, &err), "%s", err ? err->message : "");
  for (int i = 0; i < 2000 && !g_file_test (dsock, G_FILE_TEST_EXISTS); i++)
    g_usleep (10000);

  r = run_start (args, NULL);
  rc = run_finish (r, 120);
  ck_assert_msg (rc == 0, "exit %d\n%s\n%s", rc, r->out->str, r->err->str);
  events = parse_events (r->out->str);
  result = events->pdata[events->len - 1];
  ck_assert_str_eq (jstr (result, "result"), "ok");
  ck_assert_str_eq (jstr (result, "cleanup"), "ok");
  g_ptr_array_unref (events);
  run_free (r);

  kill (dpid, SIGTERM);
  waitpid (dpid, NULL, 0);
  g_spawn_close_pid (dpid);
  assert_nothing_left (vm);
  for (size_t i = 0; i < NDISKS; i++) {
    g_autofree char *name = g_strdup_printf ("%s.raw", disks[i].key);
    g_autofree char *path = g_build_filename (vm->target, name, NULL);
    assert_equals_pit (path, "raw", pit[i], disks[i].size);
  }
  tl_vm_snapshot_free (vm, pit);
  tl_vm_stop (vm);
}
END_TEST

/* SIGTERM mid-backup: cancelled, cleaned up, exit 1, nothing left (not even
 * the unfinished backup images). */
START_TEST (test_sigterm)
{
  TlVm *vm = vm_start ();
  const char *const args[] = {
    "backup", "--qmp", vm->q->qmp_path, "--vmid", VMID,
    "--fleecing-storage", vm->storage, "--target-dir", vm->target,
    "--state-dir", vm->state, "--bwlimit", "512", "--json", NULL,
  };
  Run *r = run_start (args, NULL);
  GPtrArray *events;
  json_object *result;
  g_auto (GStrv) targets = NULL;
  int rc;

  run_wait_for (r, false, "\"event\":\"started\"", 30);
  ck_assert_int_gt (tl_job_count (vm->q), 0);
  {
    g_auto (GStrv) files = tl_list_dir (vm->storage);
    ck_assert_uint_eq (g_strv_length (files), 3);
  }
  kill (r->pid, SIGTERM);
  rc = run_finish (r, 30);
  ck_assert_msg (rc == 1, "exit %d\n%s\n%s", rc, r->out->str, r->err->str);
  events = parse_events (r->out->str);
  ck_assert_uint_eq (count_events (events, "cancelling"), 1);
  result = events->pdata[events->len - 1];
  ck_assert_str_eq (jstr (result, "event"), "result");
  ck_assert_str_eq (jstr (result, "result"), "cancelled");
  ck_assert_str_eq (jstr (result, "signal"), "SIGTERM");
  ck_assert_str_eq (jstr (result, "cleanup"), "ok");
  ck_assert_str_eq (jstr (json_object_array_get_idx (jget (result, "drives"), 1), "result"),
                    "cancelled");
  ck_assert_msg (strstr (r->err->str, "cancelled on SIGTERM"), "%s", r->err->str);

  assert_nothing_left (vm);
  targets = tl_list_dir (vm->target);
  ck_assert_msg (g_strv_length (targets) == 0, "target not empty: %s", targets[0]);
  g_ptr_array_unref (events);
  run_free (r);
  tl_vm_stop (vm);
}
END_TEST

/* kill -9 mid-backup: status shows the run, cleanup undoes it from the
 * record, a second cleanup has nothing to do. */
START_TEST (test_kill9_then_cleanup)
{
  TlVm *vm = vm_start ();
  const char *const args[] = {
    "backup", "--qmp", vm->q->qmp_path, "--vmid", VMID,
    "--fleecing-storage", vm->storage, "--target-dir", vm->target,
    "--state-dir", vm->state, "--bwlimit", "512", "--json", NULL,
  };
  /* The state directory from the environment this time. */
  const char *const env[] = { "FLEECE_STATE_DIR", vm->state, NULL };
  const char *const status[] = { "status", "--vmid", VMID, "--json", NULL };
  const char *const status_text[] = { "status", "--vmid", VMID, "--qmp", vm->q->qmp_path,
                                      NULL };
  const char *const cleanup[] = { "cleanup", "--vmid", VMID, NULL };
  g_autofree char *out = NULL, *err = NULL;
  Run *r = run_start (args, NULL);
  json_object *st, *qemu, *jobs;

  run_wait_for (r, false, "\"event\":\"started\"", 30);
  kill (r->pid, SIGKILL);
  ck_assert_int_eq (run_finish (r, 10), 128 + SIGKILL);
  run_free (r);
  ck_assert_int_gt (tl_job_count (vm->q), 0);

  /* status: the record says running, QEMU runs the jobs. */
  ck_assert_int_eq (run_sync_env (status, env, &out, &err), 0);
  st = json_tokener_parse (out);
  ck_assert_msg (st != NULL, "status --json: %s", out);
  ck_assert_str_eq (jstr (st, "state-dir"), vm->state);
  ck_assert_str_eq (jstr (jget (st, "record"), "state"), "running");
  qemu = jget (st, "qemu");
  ck_assert (json_object_get_boolean (jget (qemu, "reachable")));
  jobs = jget (qemu, "jobs");
  ck_assert_uint_eq (json_object_array_length (jobs), NDISKS);
  ck_assert_uint_gt (json_object_array_length (jget (qemu, "fleecing-nodes")), 0);
  ck_assert_uint_eq (json_object_array_length (jget (qemu, "filtered-devices")), 3);
  json_object_put (st);
  g_clear_pointer (&out, g_free);
  g_clear_pointer (&err, g_free);

  overwrite_tail (vm, 0x77);
  ck_assert_int_eq (run_sync_env (cleanup, env, &out, &err), 0);
  ck_assert_msg (strstr (out, "VM 100 cleaned up; nothing is left"), "%s%s", out, err);
  assert_nothing_left (vm);
  g_clear_pointer (&out, g_free);
  g_clear_pointer (&err, g_free);
  ck_assert_int_eq (run_sync_env (cleanup, env, &out, &err), 0);
  ck_assert_msg (strstr (out, "has no record; nothing to clean up"), "%s%s", out, err);
  g_clear_pointer (&out, g_free);
  g_clear_pointer (&err, g_free);
  ck_assert_int_eq (run_sync_env (status_text, env, &out, &err), 0);
  ck_assert_msg (strstr (out, "Nothing is set up for VM 100."), "%s%s", out, err);
  tl_vm_stop (vm);
}
END_TEST

/* --no-fleecing: the same backup, no image ever allocated. */
START_TEST (test_no_fleecing)
{
  TlVm *vm = vm_start ();
  guint8 **pit = tl_vm_snapshot (vm);
  const char *const args[] = {
    "backup", "--qmp", vm->q->qmp_path, "--vmid", VMID,
    "--fleecing-storage", vm->storage, "--target-dir", vm->target,
    "--state-dir", vm->state, "--no-fleecing", "--json", NULL,
  };
  g_autofree char *out = NULL, *err = NULL;
  GPtrArray *events;
  json_object *result, *drives;

  ck_assert_msg (run_sync (args, &out, &err) == 0, "%s%s", out, err);
  events = parse_events (out);
  ck_assert (!json_object_get_boolean (jget (events->pdata[0], "fleecing")));
  result = events->pdata[events->len - 1];
  ck_assert_str_eq (jstr (result, "result"), "ok");
  ck_assert (!json_object_get_boolean (jget (result, "fleecing")));
  drives = jget (result, "drives");
  ck_assert_uint_eq (json_object_array_length (drives), NDISKS);
  for (size_t i = 0; i < NDISKS; i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    g_autofree char *name = g_strdup_printf ("%s.raw", disks[i].key);
    g_autofree char *path = g_build_filename (vm->target, name, NULL);

    ck_assert (!json_object_get_boolean (jget (d, "fleeced")));
    ck_assert_ptr_null (jget (d, "image"));
    assert_equals_pit (path, "raw", pit[i], disks[i].size);
  }
  assert_nothing_left (vm);
  g_ptr_array_unref (events);
  tl_vm_snapshot_free (vm, pit);
  tl_vm_stop (vm);
}
END_TEST

/* On a terminal: a live line per drive, redrawn in place. */
START_TEST (test_progress_tty)
{
  TlVm *vm = vm_start ();
  const char *const argv[] = {
    fleece_bin, "backup", "--qmp", vm->q->qmp_path, "--vmid", VMID,
    "--fleecing-storage", vm->storage, "--target-dir", vm->target,
    "--state-dir", vm->state, "--bwlimit", "8192", NULL,
  };
  g_auto (GStrv) envp = g_environ_setenv (g_get_environ (), "TERM", "xterm", TRUE);
  g_autoptr (GError) gerr = NULL;
  g_autoptr (GString) screen = g_string_new (NULL);
  int master = posix_openpt (O_RDWR | O_NOCTTY | O_CLOEXEC);
  int slave, null_fd, status;
  GPid pid;
  char buf[4096];
  ssize_t n;

  ck_assert_int_ge (master, 0);
  ck_assert_int_eq (grantpt (master), 0);
  ck_assert_int_eq (unlockpt (master), 0);
  slave = open (ptsname (master), O_RDWR | O_NOCTTY | O_CLOEXEC);
  null_fd = open ("/dev/null", O_RDWR | O_CLOEXEC);
  ck_assert_int_ge (slave, 0);
  ck_assert_msg (g_spawn_async_with_fds (NULL, (char **) argv, envp,
                                         G_SPAWN_DO_NOT_REAP_CHILD, child_setup, NULL,
                                         &pid, null_fd, null_fd, slave, &gerr),
                 "%s", gerr ? gerr->message : "?");
  close (slave);
  close (null_fd);
  /* EIO once the child is gone and the last slave fd closed. */
  while ((n = read (master, buf, sizeof buf)) > 0 || (n < 0 && errno == EINTR))
    if (n > 0)
      g_string_append_len (screen, buf, n);
  close (master);
  ck_assert_int_eq (waitpid (pid, &status, 0), pid);
  ck_assert_msg (WIFEXITED (status) && WEXITSTATUS (status) == 0, "%s", screen->str);
  ck_assert_msg (strstr (screen->str, "\033[4A"), "no redraw: %s", screen->str);
  ck_assert_msg (strstr (screen->str, "scsi0      [####################] 100%  16.0 MiB / 16.0 MiB  done in"),
                 "no final line for scsi0: %s", screen->str);
  ck_assert_msg (strstr (screen->str, "/s  ETA "), "no rate or ETA: %s", screen->str);
  assert_nothing_left (vm);
  tl_vm_stop (vm);
}
END_TEST

/* plan changes nothing and says what backup would do. */
START_TEST (test_plan)
{
  TlVm *vm = vm_start ();
  const char *const args[] = { "plan", "--qmp", vm->q->qmp_path, "--vmid", VMID,
                               "--fleecing-storage", vm->storage, "--json", NULL };
  const char *const all[] = { "plan", "--qmp", vm->q->qmp_path, "--vmid", VMID,
                              "--fleecing-storage", vm->storage, "--all-drives", NULL };
  const char *const bad[] = { "plan", "--qmp", vm->q->qmp_path, "--vmid", VMID,
                              "--fleecing-storage", vm->storage, "--devices", "scsi7", NULL };
  g_autofree char *out = NULL, *err = NULL;
  json_object *plan, *drives;

  ck_assert_int_eq (run_sync (args, &out, &err), 0);
  plan = json_tokener_parse (out);
  ck_assert_msg (plan != NULL, "%s", out);
  drives = jget (plan, "drives");
  ck_assert_uint_eq (json_object_array_length (drives), NDISKS);
  for (size_t i = 0; i < NDISKS; i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    ck_assert_str_eq (jstr (d, "key"), disks[i].key);
    ck_assert_int_eq (json_object_get_boolean (jget (d, "fleeced")), disks[i].fleeced);
    ck_assert_uint_eq ((uint64_t) json_object_get_int64 (jget (d, "size")), disks[i].size);
  }
  json_object_put (plan);
  g_clear_pointer (&out, g_free);
  g_clear_pointer (&err, g_free);

  ck_assert_int_eq (run_sync (all, &out, &err), 0);
  ck_assert_msg (strstr (out, "VM 100: 4 drives, 4 fleeced"), "%s", out);
  ck_assert_msg (strstr (out, "vm-100-fleece-0.qcow2"), "%s", out);
  g_clear_pointer (&out, g_free);
  g_clear_pointer (&err, g_free);

  ck_assert_int_eq (run_sync (bad, &out, &err), 2);
  ck_assert_msg (strstr (err, "--devices: VM 100 has no drive 'scsi7'; it has efidisk0, "
                         "scsi0, scsi1, virtio0"), "%s", err);
  assert_nothing_left (vm);
  tl_vm_stop (vm);
}
END_TEST

/* ---- the demo ------------------------------------------------------- */

/* Whether a process other than us mentions path on its command line. */
static bool
process_mentions (const char *path)
{
  g_autoptr (GDir) proc = g_dir_open ("/proc", 0, NULL);
  const char *name;

  while (proc && (name = g_dir_read_name (proc))) {
    g_autofree char *file = g_build_filename ("/proc", name, "cmdline", NULL);
    g_autofree char *cmd = NULL;
    gsize len = 0;

    if (!g_ascii_isdigit (name[0]) || !g_file_get_contents (file, &cmd, &len, NULL))
      continue;
    for (gsize i = 0; i + 1 < len; i++)
      if (!cmd[i])
        cmd[i] = ' ';
    if (strstr (cmd, path))
      return true;
  }
  return false;
}

/* Interrupted mid-run (while a guest write waits for the slow target), the
 * demo stops its QEMU and storage daemon and removes its directory. */
START_TEST (test_demo_interrupted)
{
  char *tmp = tl_tmpdir_new ("tool-demo");
  const char *const args[] = { "demo", NULL };
  const char *const env[] = { "TMPDIR", tmp, NULL };
  Run *r = run_start (args, env);
  g_auto (GStrv) left = NULL;
  int rc;

  run_wait_for (r, false, "[2/3]", 60);
  g_usleep (700 * 1000);
  ck_assert_msg (process_mentions (tmp), "the demo's QEMU does not run");
  kill (r->pid, SIGINT);
  rc = run_finish (r, 30);
  ck_assert_msg (rc == 1, "exit %d\n%s\n%s", rc, r->out->str, r->err->str);
  ck_assert_msg (strstr (r->err->str, "interrupted by SIGINT"), "%s", r->err->str);
  left = tl_list_dir (tmp);
  ck_assert_msg (g_strv_length (left) == 0, "left in TMPDIR: %s", left[0]);
  ck_assert_msg (!process_mentions (tmp), "a process of the demo still runs");
  run_free (r);
  tl_tmpdir_free (tmp);
}
END_TEST

static Suite *
tool_suite (void)
{
  Suite *s = suite_create ("tool");
  TCase *plain = tcase_create ("usage");
  TCase *qemu = tcase_create ("qemu");

  tcase_add_test (plain, test_usage_errors);
  tcase_add_test (plain, test_help_and_version);
  suite_add_tcase (s, plain);
  tcase_set_timeout (qemu, 120);
  tcase_add_test (qemu, test_backup_dir_json);
  tcase_add_test (qemu, test_backup_nbd);
  tcase_add_test (qemu, test_backup_vma_pve);
  tcase_add_test (qemu, test_sigterm);
  tcase_add_test (qemu, test_kill9_then_cleanup);
  tcase_add_test (qemu, test_no_fleecing);
  tcase_add_test (qemu, test_progress_tty);
  tcase_add_test (qemu, test_plan);
  tcase_add_test (qemu, test_demo_interrupted);
  suite_add_tcase (s, qemu);
  return s;
}

int
main (int argc, char **argv)
{
  SRunner *sr;
  int failed;

  if (argc != 2) {
    fprintf (stderr, "usage: %s /path/to/fleece\n", argv[0]);
    return 2;
  }
  fleece_bin = argv[1];
  sr = srunner_create (tool_suite ());
  srunner_run_all (sr, CK_VERBOSE);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
