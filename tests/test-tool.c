/* The fleece command, run as a separate process against a real QEMU (no
 * guest OS): usage errors, backups to a directory and over NBD with the
 * bytes checked against the point in time, --json parsed, signals (mid
 * backup, and while another client holds the monitor), cleanup after
 * kill -9, status, plan, an incremental chain restored, a VMA archive on
 * standard output (Proxmox's patched QEMU, when $FLEECE_PVE_QEMU names
 * it), and an interrupted demo.
 *
 * Usage: test-tool /path/to/fleece */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <check.h>
#include <glib/gstdio.h>

#include "testlib.h"

#define MiB (1024 * 1024)
#define VMID "100"
#define A(...) ((const char *const[]) { __VA_ARGS__, NULL })

static const char *fleece_bin;

/* ---- running the command -------------------------------------------- */

typedef struct {
  GPid pid;
  int out_fd;
  int err_fd;
  GString *out;
  GString *err;
} Run;

static void
child_setup (gpointer data)
{
  prctl (PR_SET_PDEATHSIG, SIGKILL);
}

/* fleece with args, in directory cwd (NULL: ours), FLEECE_STATE_DIR unset
 * unless env_extra sets it. */
static Run *
run_start_in (const char *cwd, const char *const *args, const char *const *env_extra)
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
  if (!g_spawn_async_with_pipes (cwd, (char **) argv->pdata, envp,
                                 G_SPAWN_DO_NOT_REAP_CHILD, child_setup, NULL,
                                 &r->pid, NULL, &r->out_fd, &r->err_fd, &err))
    ck_abort_msg ("cannot run %s: %s", fleece_bin, err->message);
  r->out = g_string_new (NULL);
  r->err = g_string_new (NULL);
  return r;
}

static Run *
run_start (const char *const *args, const char *const *env_extra)
{
  return run_start_in (NULL, args, env_extra);
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

/* Wait until stdout (or stderr) contains needle. */
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
  { "scsi0", "qcow2", 8 * MiB, "scsi", true },
  { "scsi1", "raw", 4 * MiB + 4096, "scsi", true },
  { "virtio0", "raw", 4 * MiB, "virtio", true },
};
#define NDISKS G_N_ELEMENTS (disks)

static TlVm *
vm_start (void)
{
  TlVm *vm = tl_vm_new ("tool", disks, NDISKS, 11);

  tl_vm_start (vm, NULL);
  return vm;
}

static void
write_at (TlVm *vm, size_t disk, unsigned pattern, uint64_t off, uint64_t len)
{
  g_autofree char *cmd = g_strdup_printf ("write -P 0x%02x %" G_GUINT64_FORMAT
                                          " %" G_GUINT64_FORMAT, pattern, off, len);
  tl_guest_io (vm->q, tl_disk_qdev (&vm->disks[disk]), cmd);
}

static void
assert_dir_empty (const char *dir)
{
  g_auto (GStrv) files = tl_list_dir (dir);
  ck_assert_msg (g_strv_length (files) == 0, "%s not empty: %s", dir, files[0]);
}

static char *
private_dir (TlVm *vm, const char *name)
{
  char *d = g_build_filename (vm->dir, name, NULL);
  ck_assert_int_eq (g_mkdir (d, 0700), 0);
  return d;
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

static json_object *
jget (json_object *o, const char *key)
{
  json_object *v;
  ck_assert_msg (json_object_object_get_ex (o, key, &v), "no \"%s\" in %s", key,
                 json_object_to_json_string (o));
  return v;
}

static const char *
jstr (json_object *o, const char *key)
{
  json_object *v = jget (o, key);
  return v ? json_object_get_string (v) : NULL;
}

static size_t
count_events (GPtrArray *events, const char *name)
{
  size_t n = 0;
  for (guint i = 0; i < events->len; i++)
    n += g_strcmp0 (jstr (events->pdata[i], "event"), name) == 0;
  return n;
}

static json_object *
find_event (GPtrArray *events, const char *name)
{
  for (guint i = 0; i < events->len; i++)
    if (g_strcmp0 (jstr (events->pdata[i], "event"), name) == 0)
      return events->pdata[i];
  ck_abort_msg ("no %s event", name);
  return NULL;
}

/* ---- usage errors, and what needs no QEMU ------------------------- */

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
#define B(...) A ("backup", "--vmid", "100", "--qmp", "q.sock", "--fleecing-storage", dir, __VA_ARGS__)
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
  assert_usage (B ("--target-dir", dir, "--vmid", "200"),
                "--vmid was given twice ('100' and '200')");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", ""), "--qmp needs a PATH, not an empty string");
  assert_usage (B ("--target-dir", dir, "--devices", ""), "--devices needs a LIST");
  assert_usage (B ("--target-dir", dir, "--devices", "scsi0,,virtio0"), "--devices takes");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", "q.sock", "--fleecing-storage", dir),
                "missing target: give --target-dir DIR, --target-nbd");
  assert_usage (B ("--target-dir", dir, "--target-nbd", "nbd+unix:///?socket=/x"),
                "--target-dir and --target-nbd exclude each other");
  assert_usage (B ("--target-dir", dir, "--engine", "xen"),
                "--engine must be auto, qemu or pve, not 'xen'");
  assert_usage (B ("--vma", "/b/x.vma", "--engine", "qemu"),
                "--vma/--pve-args need --engine pve (or auto)");
  assert_usage (B ("--vma", "/b/x.vma", "--target-dir", dir),
                "leave out --target-dir and --target-nbd");
  assert_usage (B ("--vma", "-", "--pve-args", "{}"), "--pve-args cannot be added");
  assert_usage (B ("--pve-args", "[1]"), "--pve-args must be a JSON object");
  assert_usage (B ("--target-dir", dir, "--target-format", "vmdk"),
                "--target-format must be raw or qcow2");
  assert_usage (B ("--target-nbd", "nbd+unix:///?socket=/x", "--target-format", "raw"),
                "--target-format applies to --target-dir only");
  assert_usage (B ("--target-dir", dir, "--bwlimit", "-5"), "--bwlimit must be a number of KiB/s");
  assert_usage (B ("--target-dir", dir, "--cbw-timeout", "99999999999"),
                "--cbw-timeout must be a number of seconds");
  assert_usage (B ("--target-nbd", "http://example.com/"), "fleece_target_new_nbd");
  assert_usage (B ("--target-dir", dir, "extra"), "unexpected argument 'extra'");
  /* Issue 18: the chain's rules. */
  assert_usage (B ("--target-dir", dir, "--bitmap", "b", "--incremental", "b"),
                "--bitmap (a full backup that starts the bitmap) and --incremental exclude");
  assert_usage (B ("--target-dir", dir, "--base", dir), "--base is the previous backup");
  assert_usage (B ("--target-dir", dir, "--incremental", "b"),
                "--incremental into --target-dir needs --base DIR");
  assert_usage (B ("--target-dir", dir, "--incremental", "b", "--base", dir,
                   "--target-format", "raw"),
                "an incremental backup into a directory is a qcow2 image over the "
                "previous backup (--base), not a raw image");
  /* Issue 19: RBD options belong to an RBD storage. */
  assert_usage (B ("--target-dir", dir, "--rbd-conf", "/etc/ceph/ceph.conf"),
                "--rbd-conf, --rbd-id and --rbd-keyring are for an RBD fleecing storage");
  assert_usage (A ("backup", "--vmid", "100", "--qmp", "q.sock", "--fleecing-storage",
                   "rbd:", "--target-dir", dir), "give rbd:POOL or rbd:POOL/NAMESPACE");
  assert_usage (A ("backup", "--vmid"), "missing argument for --vmid");
  assert_usage (A ("plan", "--vmid", "100", "--fleecing-storage", dir), "fleece plan: missing --qmp");
  assert_usage (A ("status"), "fleece status: missing --vmid");
  assert_usage (A ("status", "--vmid", "x"), "fleece status: --vmid must be a number");
  assert_usage (A ("cleanup", "--vmid", "100", "now"), "fleece cleanup: unexpected argument 'now'");
  assert_usage (A ("restore", "--out", dir), "fleece restore: missing --target-dir DIR");
  assert_usage (A ("restore", "--target-dir", dir, "--out", "/nonexistent-out"),
                "--out /nonexistent-out: no such directory");
  assert_usage (A ("restore", "--target-dir", dir, "--out", dir, "--format", "vmdk"),
                "--format must be raw or qcow2");
  assert_usage (A ("demo", "--fast"), "fleece demo: unknown option --fast");
#undef B
  tl_tmpdir_free (dir);
}
END_TEST

START_TEST (test_help_and_version)
{
  g_autofree char *out = NULL, *err = NULL;
  g_autofree char *expect = g_strdup_printf ("fleece %s (libfleece %s)",
                                             fleece_get_version (), fleece_get_version ());

  ck_assert_int_eq (run_sync (A ("--version"), &out, &err), 0);
  ck_assert_msg (g_str_has_prefix (out, expect), "%s", out);
  g_free (out);
  g_free (err);
  ck_assert_int_eq (run_sync (A ("--help"), &out, &err), 0);
  ck_assert_ptr_nonnull (strstr (out, "backup"));
  ck_assert_ptr_nonnull (strstr (out, "restore"));
  ck_assert_ptr_nonnull (strstr (out, "demo"));
  g_free (out);
  g_free (err);
  ck_assert_int_eq (run_sync (A ("backup", "--help"), &out, &err), 0);
  ck_assert_ptr_nonnull (strstr (out, "--target-nbd"));
  ck_assert_ptr_nonnull (strstr (out, "--bitmap"));
  ck_assert_ptr_nonnull (strstr (out, "--rbd-keyring"));
}
END_TEST

/* Until the library has RBD, the storage cannot be made: the library's
 * reason reaches the user, exit 1 (it is no usage error).  With RBD, the
 * options are taken and the missing QEMU is what fails. */
START_TEST (test_rbd_storage)
{
  char *dir = tl_tmpdir_new ("tool-rbd");
  g_autofree char *out = NULL, *err = NULL;
  int rc = run_sync (A ("backup", "--vmid", "100", "--qmp", "/nonexistent/q.sock",
                        "--fleecing-storage", "rbd:rbd/ns1", "--rbd-conf", "/etc/ceph/ceph.conf",
                        "--rbd-id", "admin", "--rbd-keyring", "/etc/ceph/k", "--target-dir", dir),
                     &out, &err);

  ck_assert_msg (rc == 1, "exit %d: %s", rc, err);
  if (strstr (err, "--fleecing-storage"))
    ck_assert_msg (strstr (err, "librbd"), "%s", err);
  else
    ck_assert_msg (strstr (err, "cannot connect to QEMU"), "%s", err);
  tl_tmpdir_free (dir);
}
END_TEST

/* cleanup with a state directory that does not exist creates nothing. */
START_TEST (test_cleanup_creates_nothing)
{
  char *dir = tl_tmpdir_new ("tool-nodir");
  g_autofree char *missing = g_build_filename (dir, "nonexistent", NULL);
  g_autofree char *state = g_build_filename (missing, "x", NULL);
  g_autofree char *out = NULL, *err = NULL;

  ck_assert_int_eq (run_sync (A ("cleanup", "--vmid", VMID, "--state-dir", state),
                              &out, &err), 0);
  ck_assert_msg (strstr (out, "has no record; nothing to clean up"), "%s%s", out, err);
  ck_assert_msg (!g_file_test (missing, G_FILE_TEST_EXISTS), "cleanup created %s", missing);
  tl_tmpdir_free (dir);
}
END_TEST

/* status shows a record's strings escaped: a record cannot drive the
 * terminal. */
START_TEST (test_status_escapes)
{
  char *dir = tl_tmpdir_new ("tool-esc");
  g_autofree char *state = g_build_filename (dir, "state", NULL);
  g_autofree char *record = g_build_filename (state, VMID ".json", NULL);
  g_autofree char *out = NULL, *err = NULL;
  const char *text =
    "{\"version\": 2, \"vmid\": 100, \"state\": \"running\\u001b[31m\", "
    "\"engine\": \"qemu\", \"run\": \"\\u001b]0;owned\\u0007\", "
    "\"qmp\": \"/nonexistent/\\u001b[2Jq.sock\", \"created\": 1, \"pid\": 999999, "
    "\"drives\": [{\"key\": \"scsi0\\u001b[H\", \"fleeced\": true, "
    "\"image\": \"vm-100-fleece-0.qcow2\", \"volid\": \"/x/\\u009b31m\"}]}";

  ck_assert_int_eq (g_mkdir (state, 0700), 0);
  ck_assert (g_file_set_contents (record, text, -1, NULL));
  ck_assert_int_eq (chmod (record, 0600), 0);
  ck_assert_int_eq (run_sync (A ("status", "--vmid", VMID, "--state-dir", state), &out, &err), 0);
  ck_assert_msg (!strchr (out, '\033') && !strchr (out, '\007') && !strstr (out, "\xc2\x9b"),
                 "control characters reached the terminal: %s", out);
  ck_assert_msg (strstr (out, "state running\\x1b[31m"), "%s", out);
  ck_assert_msg (strstr (out, "scsi0\\x1b[H"), "%s", out);
  ck_assert_msg (strstr (out, "/x/\\xc2\\x9b31m"), "%s", out);
  ck_assert_msg (strstr (out, "its process is gone: 'fleece cleanup --vmid 100 --state-dir "), "%s", out);
  g_clear_pointer (&out, g_free);
  g_clear_pointer (&err, g_free);
  ck_assert_int_eq (run_sync (A ("status", "--vmid", VMID, "--state-dir", state, "--json"),
                              &out, &err), 0);
  ck_assert_msg (!strchr (out, '\033'), "%s", out);
  tl_tmpdir_free (dir);
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
    ck_assert_ptr_null (jget (d, "error"));
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
  json_object *plan, *result, *totals;
  int rc;

  run_wait_for (r, false, "\"event\":\"started\"", 30);
  tl_vm_overwrite_tail (vm, 0xee);
  rc = run_finish (r, 60);
  ck_assert_msg (rc == 0, "exit %d\n%s\n%s", rc, r->out->str, r->err->str);

  events = parse_events (r->out->str);
  plan = events->pdata[0];
  ck_assert_str_eq (jstr (plan, "event"), "plan");
  ck_assert_uint_eq (json_object_array_length (jget (plan, "drives")), NDISKS);
  ck_assert_uint_eq (count_events (events, "started"), 1);
  ck_assert_uint_ge (count_events (events, "progress"), 1);
  ck_assert_uint_eq (count_events (events, "drive-done"), NDISKS);
  totals = find_event (events, "backup-progress");
  ck_assert_uint_le ((uint64_t) json_object_get_int64 (jget (totals, "done")),
                     (uint64_t) json_object_get_int64 (jget (totals, "total")));
  ck_assert_str_eq (jstr (find_event (events, "cleanup"), "result"), "ok");
  result = events->pdata[events->len - 1];
  ck_assert_str_eq (jstr (result, "event"), "result");
  ck_assert_str_eq (jstr (result, "result"), "ok");
  ck_assert_ptr_null (jget (result, "error"));
  ck_assert_str_eq (jstr (result, "cleanup"), "ok");
  ck_assert_int_eq (json_object_get_int (jget (result, "vmid")), 100);
  ck_assert (json_object_get_boolean (jget (result, "fleecing")));
  check_result_drives (result, "qcow2", vm);

  tl_assert_nothing_left (vm, 100);
  tl_check_point_in_time (vm, pit, vm->target, "qcow2");
  g_ptr_array_unref (events);
  run_free (r);
  tl_vm_snapshot_free (vm, pit);
  tl_vm_stop (vm);
}
END_TEST

/* The NBD target, with a relative socket= (resolved against the command's
 * working directory, not QEMU's); human output; --devices with ids and
 * keys. */
START_TEST (test_backup_nbd)
{
  TlVm *vm = vm_start ();
  guint8 **pit = tl_vm_snapshot (vm);
  g_autofree char *abs_uri = NULL;
  GPid qsd = tl_vm_nbd_target (vm, &abs_uri);
  const char *const args[] = {
    "backup", "--qmp", vm->q->qmp_path, "--vmid", VMID,
    "--fleecing-storage", vm->storage, "--target-nbd", "nbd+unix:///?socket=nbd.sock",
    "--state-dir", vm->state, "--bwlimit", "4096",
    "--devices", "drive-scsi0,scsi1,efidisk0,drive-virtio0", NULL,
  };
  Run *r = run_start_in (vm->dir, args, NULL);
  int rc, status;

  run_wait_for (r, true, "fleece backup: started", 30);
  tl_vm_overwrite_tail (vm, 0x5a);
  rc = run_finish (r, 60);
  ck_assert_msg (rc == 0, "exit %d\n%s\n%s", rc, r->out->str, r->err->str);
  ck_assert_msg (strstr (r->out->str, "fleece backup: VM 100 backed up in"), "%s", r->out->str);
  ck_assert_msg (strstr (r->out->str, "(export scsi0)"), "%s", r->out->str);
  ck_assert_msg (strstr (r->err->str, "fleece backup: scsi0 done: 8.0 MiB in"), "%s",
                 r->err->str);
  run_free (r);
  kill (qsd, SIGTERM);
  ck_assert_int_eq (waitpid (qsd, &status, 0), qsd);
  g_spawn_close_pid (qsd);

  tl_assert_nothing_left (vm, 100);
  tl_check_point_in_time (vm, pit, vm->target, "raw");
  tl_vm_snapshot_free (vm, pit);
  tl_vm_stop (vm);
}
END_TEST

/* --vma on Proxmox's QEMU (tests/pve-double standing in for it): the
 * archive arguments reach QEMU's backup command (the double writes a raw
 * file per drive beside the archive); the report names the archive, never
 * "(null)". */
START_TEST (test_backup_vma_pve)
{
  TlVm *vm = vm_start ();
  guint8 **pit = tl_vm_snapshot (vm);
  const char *bin = g_getenv ("FLEECE_PVE_DOUBLE");
  g_autofree char *dsock = g_build_filename (vm->dir, "pve.sock", NULL);
  g_autofree char *listen = g_strdup_printf ("--listen=%s", dsock);
  g_autofree char *upstream = g_strdup_printf ("--qemu=%s", vm->q->qmp_path);
  g_autofree char *vma = g_build_filename (vm->target, "vzdump-qemu-100.vma", NULL);
  g_autofree char *shown = g_strdup_printf ("%s (VMA)", vma);
  const char *dargv[] = { bin, listen, upstream, NULL };
  const char *const args[] = {
    "backup", "--qmp", dsock, "--vmid", VMID,
    "--fleecing-storage", vm->storage, "--vma", vma,
    "--state-dir", vm->state, NULL,
  };
  g_autoptr (GError) err = NULL;
  GPid dpid;
  Run *r;
  int rc;

  ck_assert_msg (bin && *bin, "FLEECE_PVE_DOUBLE is not set (run through meson test)");
  ck_assert_msg (g_spawn_async (NULL, (char **) dargv, NULL, G_SPAWN_DO_NOT_REAP_CHILD,
                                child_setup, NULL, &dpid, &err), "%s", err ? err->message : "");
  for (int i = 0; i < 2000 && !g_file_test (dsock, G_FILE_TEST_EXISTS); i++)
    g_usleep (10000);

  r = run_start (args, NULL);
  rc = run_finish (r, 120);
  ck_assert_msg (rc == 0, "exit %d\n%s\n%s", rc, r->out->str, r->err->str);
  ck_assert_msg (!strstr (r->out->str, "(null)") && !strstr (r->err->str, "(null)"),
                 "%s%s", r->out->str, r->err->str);
  ck_assert_msg (strstr (r->out->str, shown), "%s", r->out->str);
  ck_assert_msg (strstr (r->out->str, "fleece backup: VM 100 backed up in"), "%s", r->out->str);
  run_free (r);

  kill (dpid, SIGTERM);
  waitpid (dpid, NULL, 0);
  g_spawn_close_pid (dpid);
  tl_assert_nothing_left (vm, 100);
  tl_check_point_in_time (vm, pit, vm->target, "raw");
  tl_vm_snapshot_free (vm, pit);
  tl_vm_stop (vm);
}
END_TEST

/* SIGTERM mid-backup: fleece_cancel() from the handler, cleaned up, exit
 * 1, nothing left (not even the unfinished backup images). */
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
  gint64 t0;
  int rc;

  run_wait_for (r, false, "\"event\":\"started\"", 30);
  ck_assert_int_gt (tl_job_count (vm->q), 0);
  {
    g_auto (GStrv) files = tl_list_dir (vm->storage);
    ck_assert_uint_eq (g_strv_length (files), 3);
  }
  t0 = g_get_monotonic_time ();
  kill (r->pid, SIGTERM);
  rc = run_finish (r, 30);
  ck_assert_msg (rc == 1, "exit %d\n%s\n%s", rc, r->out->str, r->err->str);
  /* No polling slices: the cancel goes out at once. */
  ck_assert_msg (g_get_monotonic_time () - t0 < 5 * G_USEC_PER_SEC, "took %.1f s",
                 (double) (g_get_monotonic_time () - t0) / G_USEC_PER_SEC);
  events = parse_events (r->out->str);
  result = events->pdata[events->len - 1];
  ck_assert_str_eq (jstr (result, "event"), "result");
  ck_assert_str_eq (jstr (result, "result"), "cancelled");
  ck_assert_str_eq (jstr (result, "signal"), "SIGTERM");
  ck_assert_str_eq (jstr (result, "cleanup"), "ok");
  ck_assert_str_eq (jstr (json_object_array_get_idx (jget (result, "drives"), 1), "result"),
                    "cancelled");
  ck_assert_msg (strstr (r->err->str, "cancelled on SIGTERM"), "%s", r->err->str);

  tl_assert_nothing_left (vm, 100);
  assert_dir_empty (vm->target);
  g_ptr_array_unref (events);
  run_free (r);
  tl_vm_stop (vm);
}
END_TEST

/* kill -9 mid-backup: status shows the run (fleece_get_status()), cleanup
 * undoes it from the record, a second cleanup has nothing to do. */
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
  g_autofree char *out = NULL, *err = NULL;
  Run *r = run_start (args, NULL);
  json_object *st, *qemu;

  run_wait_for (r, false, "\"event\":\"started\"", 30);
  kill (r->pid, SIGKILL);
  ck_assert_int_eq (run_finish (r, 10), 128 + SIGKILL);
  run_free (r);
  ck_assert_int_gt (tl_job_count (vm->q), 0);

  ck_assert_int_eq (run_sync_env (A ("status", "--vmid", VMID, "--json"), env, &out, &err), 0);
  st = json_tokener_parse (out);
  ck_assert_msg (st != NULL, "status --json: %s", out);
  ck_assert_str_eq (jstr (jget (st, "record"), "state"), "running");
  ck_assert_str_eq (jstr (st, "run"), "crashed");
  ck_assert_str_eq (jstr (st, "lock"), "free");
  qemu = jget (st, "qemu");
  ck_assert (json_object_get_boolean (jget (qemu, "reachable")));
  ck_assert_uint_eq (json_object_array_length (jget (qemu, "runs")), 1);
  ck_assert (!json_object_get_boolean (jget (json_object_array_get_idx (jget (qemu, "runs"), 0),
                                             "alive")));
  ck_assert_uint_gt (json_object_array_length (jget (qemu, "traces")), 0);
  json_object_put (st);
  g_clear_pointer (&out, g_free);
  g_clear_pointer (&err, g_free);
  ck_assert_int_eq (run_sync_env (A ("status", "--vmid", VMID), env, &out, &err), 0);
  ck_assert_msg (strstr (out, "record: state running"), "%s", out);
  ck_assert_msg (strstr (out, "drive-scsi0-fleecing"), "%s", out);

  ck_assert_msg (strstr (out, "'fleece cleanup --vmid 100 --fleecing-storage "), "%s", out);
  g_clear_pointer (&out, g_free);
  g_clear_pointer (&err, g_free);

  /* The images are freed only through the storage they are in: cleanup
   * must be given it. */
  tl_vm_overwrite_tail (vm, 0x77);
  ck_assert_int_eq (run_sync_env (A ("cleanup", "--vmid", VMID), env, &out, &err), 1);
  ck_assert_msg (strstr (err, "give that storage with --fleecing-storage"), "%s", err);
  g_clear_pointer (&out, g_free);
  g_clear_pointer (&err, g_free);
  ck_assert_msg (run_sync_env (A ("cleanup", "--vmid", VMID, "--fleecing-storage", vm->storage),
                               env, &out, &err) == 0, "%s%s", out, err);
  ck_assert_msg (strstr (out, "VM 100 cleaned up; nothing is left"), "%s%s", out, err);
  tl_assert_nothing_left (vm, 100);
  assert_dir_empty (vm->target);
  g_clear_pointer (&out, g_free);
  g_clear_pointer (&err, g_free);
  ck_assert_int_eq (run_sync_env (A ("cleanup", "--vmid", VMID), env, &out, &err), 0);
  ck_assert_msg (strstr (out, "has no record; nothing to clean up"), "%s%s", out, err);
  g_clear_pointer (&out, g_free);
  g_clear_pointer (&err, g_free);
  ck_assert_int_eq (run_sync_env (A ("status", "--vmid", VMID, "--qmp", vm->q->qmp_path),
                                  env, &out, &err), 0);
  ck_assert_msg (strstr (out, "Nothing is set up for VM 100."), "%s%s", out, err);
  tl_vm_stop (vm);
}
END_TEST

/* On a terminal: a live line per drive and a total, redrawn in place. */
START_TEST (test_progress_tty)
{
  TlVm *vm = vm_start ();
  const char *const argv[] = {
    fleece_bin, "backup", "--qmp", vm->q->qmp_path, "--vmid", VMID,
    "--fleecing-storage", vm->storage, "--target-dir", vm->target,
    "--state-dir", vm->state, "--bwlimit", "4096", NULL,
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
  ck_assert_msg (strstr (screen->str, "\033[5A"), "no redraw: %s", screen->str);
  ck_assert_msg (strstr (screen->str, "scsi0      [####################] 100%  8.0 MiB / 8.0 MiB  done in"),
                 "no final line for scsi0: %s", screen->str);
  ck_assert_msg (strstr (screen->str, "total      ["), "no total line: %s", screen->str);
  ck_assert_msg (strstr (screen->str, "/s  ETA "), "no rate or ETA: %s", screen->str);
  tl_assert_nothing_left (vm, 100);
  tl_vm_stop (vm);
}
END_TEST

/* plan changes nothing and says what backup would do; --devices restricts
 * before anything else (issue 12): a drive key longer than 16 characters
 * elsewhere in the VM does not stop plan or backup of the others, and keys
 * with '.' are accepted. */
/* --no-fleecing needs no storage; then an attach that fails before
 * anything is set up (a state directory that cannot be made): cleanup is
 * "skipped", and no "cleanup failed ... retry" is said. */
static void
no_fleecing_and_failed_attach (TlVm *vm, guint8 **pit)
{
  g_autofree char *t2 = private_dir (vm, "t2");
  g_autofree char *file = g_build_filename (vm->dir, "file", NULL);
  g_autofree char *bad_state = g_build_filename (file, "state", NULL);
  g_autofree char *out = NULL, *err = NULL;
  GPtrArray *events;
  json_object *result, *d;

  ck_assert_msg (run_sync (A ("backup", "--qmp", vm->q->qmp_path, "--vmid", VMID,
                              "--target-dir", t2, "--state-dir", vm->state,
                              "--devices", "scsi0", "--no-fleecing", "--json"),
                           &out, &err) == 0, "%s%s", out, err);
  events = parse_events (out);
  ck_assert (!json_object_get_boolean (jget (events->pdata[0], "fleecing")));
  result = events->pdata[events->len - 1];
  ck_assert_str_eq (jstr (result, "result"), "ok");
  ck_assert (!json_object_get_boolean (jget (result, "fleecing")));
  d = json_object_array_get_idx (jget (result, "drives"), 0);
  ck_assert (!json_object_get_boolean (jget (d, "fleeced")));
  ck_assert_ptr_null (jget (d, "image"));
  {
    g_autofree char *img = g_build_filename (t2, "scsi0.raw", NULL);
    tl_assert_image_equals (img, "raw", pit[0], vm->disks[0].size, "scsi0");
  }
  tl_assert_nothing_left (vm, 100);
  g_ptr_array_unref (events);
  g_clear_pointer (&out, g_free);
  g_clear_pointer (&err, g_free);

  ck_assert (g_file_set_contents (file, "", 0, NULL));
  ck_assert_int_eq (run_sync (A ("backup", "--qmp", vm->q->qmp_path, "--vmid", VMID,
                                 "--fleecing-storage", vm->storage, "--devices", "scsi0",
                                 "--target-nbd", "nbd+unix:///?socket=/nonexistent.sock",
                                 "--state-dir", bad_state, "--json"), &out, &err), 1);
  ck_assert_msg (!strstr (err, "cleanup failed") && !strstr (err, "retry"), "%s", err);
  events = parse_events (out);
  ck_assert_str_eq (jstr (find_event (events, "cleanup"), "result"), "skipped");
  result = events->pdata[events->len - 1];
  ck_assert_str_eq (jstr (result, "result"), "failed");
  ck_assert_str_eq (jstr (result, "cleanup"), "skipped");
  ck_assert_ptr_nonnull (jstr (result, "error"));
  ck_assert_str_eq (jstr (json_object_array_get_idx (jget (result, "drives"), 0), "result"),
                    "not started");
  tl_assert_nothing_left (vm, 100);
  g_ptr_array_unref (events);
}

static const TlDisk odd_disks[] = {
  { "scsi0", "qcow2", 4 * MiB, "scsi", true },
  { "data.disk1", "raw", 2 * MiB, "scsi", true },
  { "a-drive-key-of-26-letters", "raw", 1 * MiB, "scsi", true },
};

START_TEST (test_plan)
{
  TlVm *vm = tl_vm_new ("plan", odd_disks, G_N_ELEMENTS (odd_disks), 21);
  guint8 **pit;
  g_autofree char *out = NULL, *err = NULL;
  g_autofree char *backup = NULL;
  json_object *plan, *drives;

  tl_vm_start (vm, NULL);
  pit = tl_vm_snapshot (vm);
#define P(...) A ("plan", "--qmp", vm->q->qmp_path, "--vmid", VMID, \
                  "--fleecing-storage", vm->storage, __VA_ARGS__)
  ck_assert_int_eq (run_sync (P ("--json"), &out, &err), 1);
  ck_assert_msg (strstr (err, "'a-drive-key-of-26-letters' is longer than 16"), "%s", err);
  g_clear_pointer (&out, g_free);
  g_clear_pointer (&err, g_free);

  ck_assert_msg (run_sync (P ("--devices", "scsi0,drive-data.disk1", "--json"), &out, &err) == 0,
                 "%s", err);
  plan = json_tokener_parse (out);
  ck_assert_msg (plan != NULL, "%s", out);
  drives = jget (plan, "drives");
  ck_assert_uint_eq (json_object_array_length (drives), 2);
  ck_assert_str_eq (jstr (json_object_array_get_idx (drives, 0), "key"), "data.disk1");
  ck_assert_str_eq (jstr (json_object_array_get_idx (drives, 1), "key"), "scsi0");
  ck_assert (json_object_get_boolean (jget (json_object_array_get_idx (drives, 1), "fleeced")));
  ck_assert_uint_eq ((uint64_t) json_object_get_int64 (jget (json_object_array_get_idx (drives, 1),
                                                              "size")), 4 * MiB);
  json_object_put (plan);
  g_clear_pointer (&out, g_free);
  g_clear_pointer (&err, g_free);

  ck_assert_int_eq (run_sync (P ("--devices", "scsi0,data.disk1", "--all-drives"), &out, &err), 0);
  ck_assert_msg (strstr (out, "VM 100: 2 drives, 2 fleeced"), "%s", out);
  ck_assert_msg (strstr (out, "vm-100-fleece-0.qcow2"), "%s", out);
  ck_assert_msg (strstr (out, "not among the drives asked for"), "%s", out);
  g_clear_pointer (&out, g_free);
  g_clear_pointer (&err, g_free);

  ck_assert_int_eq (run_sync (P ("--devices", "scsi7"), &out, &err), 2);
  ck_assert_msg (strstr (err, "fleece plan: --devices: ") && strstr (err, "'scsi7' not found") &&
                 strstr (err, "scsi0"), "%s", err);
#undef P
  g_clear_pointer (&out, g_free);
  g_clear_pointer (&err, g_free);

  ck_assert_msg (run_sync (A ("backup", "--qmp", vm->q->qmp_path, "--vmid", VMID,
                              "--fleecing-storage", vm->storage, "--target-dir", vm->target,
                              "--state-dir", vm->state, "--devices", "data.disk1"),
                           &out, &err) == 0, "%s%s", out, err);
  backup = g_build_filename (vm->target, "data.disk1.raw", NULL);
  tl_assert_image_equals (backup, "raw", pit[1], odd_disks[1].size, "data.disk1");
  tl_assert_nothing_left (vm, 100);
  g_clear_pointer (&out, g_free);
  g_clear_pointer (&err, g_free);
  no_fleecing_and_failed_attach (vm, pit);
  tl_vm_snapshot_free (vm, pit);
  tl_vm_stop (vm);
}
END_TEST

/* ---- a monitor held by another client --------------------------------- */

static int
hold_monitor (const char *path)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  char buf[512];

  g_strlcpy (sun.sun_path, path, sizeof sun.sun_path);
  ck_assert (fd >= 0 && connect (fd, (struct sockaddr *) &sun, sizeof sun) == 0);
  /* The greeting: QEMU serves us now, and nobody else. */
  ck_assert_int_gt (read (fd, buf, sizeof buf), 0);
  return fd;
}

/* The target dies mid-backup: the drives' results come from
 * fleece_get_drive_result(), a failed one with its reason. */
static void
failed_drives (TlVm *vm)
{
  g_autofree char *uri = NULL;
  GPid qsd = tl_vm_nbd_target (vm, &uri);
  Run *r = run_start (A ("backup", "--qmp", vm->q->qmp_path, "--vmid", VMID,
                         "--fleecing-storage", vm->storage, "--target-nbd", uri,
                         "--state-dir", vm->state, "--bwlimit", "512", "--json"), NULL);
  GPtrArray *events;
  json_object *result, *drives;
  guint failed = 0;
  int rc;

  run_wait_for (r, false, "\"event\":\"started\"", 30);
  kill (qsd, SIGKILL);
  waitpid (qsd, NULL, 0);
  g_spawn_close_pid (qsd);
  rc = run_finish (r, 60);
  ck_assert_msg (rc == 1, "exit %d\n%s\n%s", rc, r->out->str, r->err->str);
  events = parse_events (r->out->str);
  result = events->pdata[events->len - 1];
  ck_assert_str_eq (jstr (result, "result"), "failed");
  ck_assert_str_eq (jstr (result, "cleanup"), "ok");
  drives = jget (result, "drives");
  for (size_t i = 0; i < json_object_array_length (drives); i++) {
    json_object *d = json_object_array_get_idx (drives, i);
    if (strcmp (jstr (d, "result"), "failed") == 0) {
      failed++;
      ck_assert_msg (jstr (d, "error") && strstr (jstr (d, "error"), jstr (d, "key")),
                     "%s", json_object_to_json_string (d));
    } else {
      ck_assert_msg (strcmp (jstr (d, "result"), "cancelled") == 0 ||
                     strcmp (jstr (d, "result"), "ok") == 0, "%s", jstr (d, "result"));
      ck_assert_ptr_null (jget (d, "error"));
    }
  }
  ck_assert_uint_gt (failed, 0);
  tl_assert_nothing_left (vm, 100);
  g_ptr_array_unref (events);
  run_free (r);
}

/* While another client holds the monitor, SIGINT and SIGTERM end the
 * command within a few seconds, not after the 60 s QMP timeout: backup,
 * which catches them to clean up, once the library gives up with
 * "another client holds the QMP monitor"; plan, which changes nothing, at
 * once. */
START_TEST (test_signal_busy_monitor)
{
  TlVm *vm = vm_start ();
  int fd = hold_monitor (vm->q->qmp_path);
  Run *b = run_start (A ("backup", "--qmp", vm->q->qmp_path, "--vmid", VMID,
                         "--fleecing-storage", vm->storage, "--target-dir", vm->target,
                         "--state-dir", vm->state, "--json"), NULL);
  Run *p = run_start (A ("plan", "--qmp", vm->q->qmp_path, "--vmid", VMID,
                         "--fleecing-storage", vm->storage), NULL);
  gint64 t0;
  GPtrArray *events;
  json_object *result;
  int rb, rp;

  g_usleep (500 * 1000);
  t0 = g_get_monotonic_time ();
  kill (b->pid, SIGINT);
  kill (p->pid, SIGTERM);
  rb = run_finish (b, 15);
  rp = run_finish (p, 15);
  ck_assert_msg (g_get_monotonic_time () - t0 < 8 * G_USEC_PER_SEC, "took %.1f s",
                 (double) (g_get_monotonic_time () - t0) / G_USEC_PER_SEC);
  ck_assert_msg (rb == 1, "backup: exit %d\n%s", rb, b->err->str);
  ck_assert_msg (rp == 128 + SIGTERM, "plan: exit %d\n%s", rp, p->err->str);
  ck_assert_msg (strstr (b->err->str, "another client holds the QMP monitor"), "%s", b->err->str);
  events = parse_events (b->out->str);
  result = events->pdata[events->len - 1];
  ck_assert_str_eq (jstr (result, "result"), "cancelled");
  ck_assert_str_eq (jstr (result, "signal"), "SIGINT");
  ck_assert_str_eq (jstr (result, "cleanup"), "skipped");
  g_ptr_array_unref (events);
  run_free (b);
  run_free (p);
  close (fd);
  tl_assert_nothing_left (vm, 100);
  failed_drives (vm);
  tl_vm_stop (vm);
}
END_TEST

/* ---- an incremental chain, restored (issue 18) ------------------------ */

static const TlDisk chain_disks[] = {
  { "scsi0", "qcow2", 4 * MiB, "scsi", true },
  { "scsi1", "raw", 2 * MiB, "scsi", true },
  { "virtio0", "raw", 4 * MiB, "virtio", true },
};

/* A backup of scsi0 and virtio0 (scsi1 never gets the bitmap: --devices
 * restricts before the bitmap is looked for), the guest writing at off
 * while it runs. */
static void
chain_link (TlVm *vm, const char *const *args, unsigned pattern, uint64_t off)
{
  Run *r = run_start (args, NULL);
  int rc;

  run_wait_for (r, false, "\"event\":\"started\"", 30);
  write_at (vm, 0, pattern, off, 64 * 1024);
  write_at (vm, 2, pattern, off, 64 * 1024);
  rc = run_finish (r, 60);
  ck_assert_msg (rc == 0, "exit %d\n%s\n%s", rc, r->out->str, r->err->str);
  run_free (r);
}

/* A full backup that starts the bitmap, two incrementals, the guest
 * writing during each and between them: restore gives exactly the disks
 * at the last incremental's point in time. */
START_TEST (test_incremental_chain_restore)
{
  TlVm *vm = tl_vm_new ("chain", chain_disks, G_N_ELEMENTS (chain_disks), 31);
  g_autofree char *d0 = NULL, *d1 = NULL, *d2 = NULL, *out = NULL;
  g_autofree char *sout = NULL, *serr = NULL;
  guint8 **pit;

  tl_vm_start (vm, NULL);
  d0 = private_dir (vm, "full");
  d1 = private_dir (vm, "inc1");
  d2 = private_dir (vm, "inc2");
  out = private_dir (vm, "restored");
#define L(...) A ("backup", "--qmp", vm->q->qmp_path, "--vmid", VMID, "--fleecing-storage", \
                  vm->storage, "--state-dir", vm->state, "--devices", "scsi0,virtio0", \
                  "--json", __VA_ARGS__)
  chain_link (vm, L ("--bitmap", "b0", "--target-dir", d0, "--bwlimit", "8192"), 0x11, 3 * MiB);
  write_at (vm, 0, 0x22, 1 * MiB, 128 * 1024);
  write_at (vm, 2, 0x22, 2 * MiB, 128 * 1024);
  chain_link (vm, L ("--incremental", "b0", "--base", d0, "--target-dir", d1), 0x33, 512 * 1024);
  write_at (vm, 0, 0x44, 2 * MiB + 4096, 64 * 1024);
  pit = tl_vm_snapshot (vm);
  chain_link (vm, L ("--incremental", "b0", "--base", d1, "--target-dir", d2), 0x55, 0);
#undef L
  tl_assert_nothing_left (vm, 100);

  ck_assert_msg (run_sync (A ("restore", "--target-dir", d2, "--out", out), &sout, &serr) == 0,
                 "%s%s", sout, serr);
  ck_assert_msg (strstr (sout, "scsi0: ") && strstr (sout, "inc2/scsi0.qcow2 (qcow2) -> ") &&
                 strstr (sout, "inc1/scsi0.qcow2 (qcow2) -> ") && strstr (sout, "full/scsi0.raw (raw)"),
                 "the chain is not shown: %s", sout);
  {
    g_autofree char *r0 = g_build_filename (out, "scsi0.raw", NULL);
    g_autofree char *r2 = g_build_filename (out, "virtio0.raw", NULL);
    g_autofree char *r1 = g_build_filename (out, "scsi1.raw", NULL);

    tl_assert_image_equals (r0, "raw", pit[0], chain_disks[0].size, "restored scsi0");
    tl_assert_image_equals (r2, "raw", pit[2], chain_disks[2].size, "restored virtio0");
    ck_assert (!g_file_test (r1, G_FILE_TEST_EXISTS));
  }
  g_clear_pointer (&sout, g_free);
  g_clear_pointer (&serr, g_free);
  /* Never over an existing file. */
  ck_assert_int_eq (run_sync (A ("restore", "--target-dir", d2, "--out", out), &sout, &serr), 1);
  ck_assert_msg (strstr (serr, "exists; not overwriting it"), "%s", serr);
  tl_vm_snapshot_free (vm, pit);
  tl_vm_stop (vm);
}
END_TEST

/* ---- VMA on standard output, on Proxmox's patched QEMU ---------------- */

static const TlDisk pve_disks[] = {
  { "scsi0", "raw", 4 * MiB, "scsi", true },
  { "virtio0", "qcow2", 2 * MiB, "virtio", true },
};

static void
sh (const char *script)
{
  const char *argv[] = { "/bin/sh", "-ec", script, NULL };
  g_autofree char *out = NULL, *err = NULL;
  g_autoptr (GError) gerr = NULL;
  int status;

  ck_assert_msg (g_spawn_sync (NULL, (char **) argv, NULL, G_SPAWN_DEFAULT, NULL, NULL,
                               &out, &err, &status, &gerr), "%s", gerr ? gerr->message : "");
  ck_assert_msg (g_spawn_check_wait_status (status, NULL), "%s failed:\n%s%s", script, out, err);
}

/* fleece backup --vma - | zstd: the archive, decompressed and extracted
 * with Proxmox's vma, holds the point in time; people's output went to
 * standard error. */
START_TEST (test_vma_stdout_pve_qemu)
{
  const char *pve = g_getenv ("FLEECE_PVE_QEMU");
  const char *const extra[] = { "-L", "/usr/share/seabios", "-L", "/usr/lib/ipxe/qemu",
                                "-L", "/usr/share/qemu", NULL };
  g_autofree char *old = g_strdup (g_getenv ("FLEECE_QEMU"));
  g_autofree char *vma_bin = NULL, *script = NULL, *zst = NULL, *errlog = NULL;
  g_autofree char *text = NULL, *bindir = NULL, *rc = NULL, *rcfile = NULL;
  TlVm *vm;
  guint8 **pit;

  if (!pve || !g_file_test (pve, G_FILE_TEST_IS_EXECUTABLE)) {
    fprintf (stderr, "test_vma_stdout_pve_qemu: skipped: FLEECE_PVE_QEMU does not name "
             "Proxmox's qemu-system-x86_64\n");
    return;
  }
  bindir = g_path_get_dirname (pve);
  vma_bin = g_build_filename (bindir, "vma", NULL);
  vm = tl_vm_new ("pvevma", pve_disks, G_N_ELEMENTS (pve_disks), 41);
  g_setenv ("FLEECE_QEMU", pve, TRUE);
  tl_vm_start (vm, extra);
  if (old)
    g_setenv ("FLEECE_QEMU", old, TRUE);
  else
    g_unsetenv ("FLEECE_QEMU");
  pit = tl_vm_snapshot (vm);
  zst = g_build_filename (vm->dir, "vzdump.vma.zst", NULL);
  errlog = g_build_filename (vm->dir, "fleece.err", NULL);
  script = g_strdup_printf (
    "cd '%s'; { set +e; '%s' backup --vmid 100 --qmp '%s' --fleecing-storage '%s' "
    "--state-dir '%s' --vma - 2>'%s'; echo $? > rc; } | zstd -q > '%s'",
    vm->dir, fleece_bin, vm->q->qmp_path, vm->storage, vm->state, errlog, zst);
  sh (script);
  rcfile = g_build_filename (vm->dir, "rc", NULL);
  ck_assert (g_file_get_contents (errlog, &text, NULL, NULL));
  ck_assert (g_file_get_contents (rcfile, &rc, NULL, NULL));
  ck_assert_msg (strcmp (rc, "0\n") == 0, "fleece backup exit %s%s", rc, text);
  g_free (script);
  script = g_strdup_printf ("cd '%s'; zstd -q -d vzdump.vma.zst -o vzdump.vma; "
                            "'%s' extract vzdump.vma extracted", vm->dir, vma_bin);
  sh (script);
  ck_assert_msg (strstr (text, "fleece backup: VM 100 backed up in") &&
                 strstr (text, "standard output (VMA)"), "%s", text);
  for (size_t i = 0; i < G_N_ELEMENTS (pve_disks); i++) {
    g_autofree char *name = g_strdup_printf ("extracted/disk-drive-%s.raw", pve_disks[i].key);
    g_autofree char *path = g_build_filename (vm->dir, name, NULL);
    tl_assert_image_equals (path, "raw", pit[i], pve_disks[i].size, name);
  }
  tl_assert_nothing_left (vm, 100);
  tl_vm_snapshot_free (vm, pit);
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
  const char *const env[] = { "TMPDIR", tmp, NULL };
  Run *r = run_start (A ("demo"), env);
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
  tcase_add_test (plain, test_rbd_storage);
  tcase_add_test (plain, test_cleanup_creates_nothing);
  tcase_add_test (plain, test_status_escapes);
  suite_add_tcase (s, plain);
  tcase_set_timeout (qemu, 120);
  tcase_add_test (qemu, test_backup_dir_json);
  tcase_add_test (qemu, test_backup_nbd);
  tcase_add_test (qemu, test_backup_vma_pve);
  tcase_add_test (qemu, test_sigterm);
  tcase_add_test (qemu, test_kill9_then_cleanup);
  tcase_add_test (qemu, test_progress_tty);
  tcase_add_test (qemu, test_plan);
  tcase_add_test (qemu, test_signal_busy_monitor);
  tcase_add_test (qemu, test_incremental_chain_restore);
  tcase_add_test (qemu, test_vma_stdout_pve_qemu);
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
  fleece_bin = g_canonicalize_filename (argv[1], NULL);
  sr = srunner_create (tool_suite ());
  srunner_run_all (sr, CK_VERBOSE);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
