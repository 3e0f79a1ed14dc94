/* faultlib: the fault proxy driver and the fault tests' harness (see
 * faultlib.h). */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <check.h>
#include <glib/gstdio.h>

#include "faultlib.h"

#define MiB (1024 * 1024)

bool
fl_sampled (unsigned n, unsigned salt)
{
  const char *env = g_getenv ("FLEECE_FAULTS_SAMPLE");
  int k = env ? atoi (env) : 1;

  return k <= 1 || (n + salt) % (unsigned) k == 0;
}

/* ------------------------------------------------------------------ */
/* The fault proxy                                                     */
/* ------------------------------------------------------------------ */

struct FlProxy {
  GPid pid;
  int in, out;          /* its stdin, its stdout */
  char *path;           /* where the library connects */
  GString *buf;         /* read, not yet returned */
};

/* The next line the proxy printed (g_free); aborts after timeout_ms. */
static char *
proxy_line (FlProxy *px, int timeout_ms)
{
  gint64 deadline = g_get_monotonic_time () + (gint64) timeout_ms * 1000;

  for (;;) {
    char *nl = strchr (px->buf->str, '\n');
    struct pollfd pfd = { .fd = px->out, .events = POLLIN };
    char chunk[4096];
    ssize_t n;
    int left;

    if (nl) {
      char *line = g_strndup (px->buf->str, (gsize) (nl - px->buf->str));
      g_string_erase (px->buf, 0, nl - px->buf->str + 1);
      return line;
    }
    left = (int) ((deadline - g_get_monotonic_time ()) / 1000);
    ck_assert_msg (left > 0, "the fault proxy said nothing within %d ms", timeout_ms);
    if (poll (&pfd, 1, left) <= 0)
      continue;
    n = read (px->out, chunk, sizeof chunk);
    ck_assert_msg (n > 0, "the fault proxy is gone");
    g_string_append_len (px->buf, chunk, n);
  }
}

static char *
proxy_say (FlProxy *px, const char *cmd)
{
  ck_assert (write (px->in, cmd, strlen (cmd)) == (ssize_t) strlen (cmd));
  ck_assert (write (px->in, "\n", 1) == 1);
  return proxy_line (px, 5000);
}

static void
proxy_expect (FlProxy *px, const char *cmd, const char *expect)
{
  g_autofree char *line = proxy_say (px, cmd);

  ck_assert_msg (strcmp (line, expect) == 0, "fault proxy: '%s' answered '%s'", cmd, line);
}

FlProxy *
fl_proxy_start (const char *upstream, const char *path)
{
  const char *bin = g_getenv ("FLEECE_FAULT_PROXY");
  const char *argv[] = { bin, path, upstream, NULL };
  g_autoptr (GError) err = NULL;
  g_autofree char *line = NULL;
  FlProxy *px = g_new0 (FlProxy, 1);

  ck_assert_msg (bin && *bin, "FLEECE_FAULT_PROXY is not set (run through meson test)");
  if (!g_spawn_async_with_pipes (NULL, (char **) argv, NULL, G_SPAWN_DO_NOT_REAP_CHILD,
                                 NULL, NULL, &px->pid, &px->in, &px->out, NULL, &err))
    ck_abort_msg ("cannot start %s: %s", bin, err->message);
  px->path = g_strdup (path);
  px->buf = g_string_new (NULL);
  line = proxy_line (px, 5000);
  ck_assert_str_eq (line, "ready");
  return px;
}

void
fl_proxy_stop (FlProxy *px)
{
  if (!px)
    return;
  close (px->in);
  close (px->out);
  kill (px->pid, SIGTERM);
  waitpid (px->pid, NULL, 0);
  g_spawn_close_pid (px->pid);
  g_free (px->path);
  g_string_free (px->buf, TRUE);
  g_free (px);
}

const char *
fl_proxy_path (FlProxy *px)
{
  return px->path;
}

void
fl_proxy_arm (FlProxy *px, const char *mode, unsigned n, pid_t pid, long arg)
{
  g_autofree char *cmd = g_strdup_printf ("arm %s %u %d %ld", mode, n, (int) pid, arg);

  proxy_expect (px, cmd, "armed");
}

void
fl_proxy_arm_named (FlProxy *px, const char *mode, unsigned n, long arg, const char *name)
{
  g_autofree char *cmd = g_strdup_printf ("arm %s %u 0 %ld %s", mode, n, arg, name);

  proxy_expect (px, cmd, "armed");
}

void
fl_end_clear (FlEnd *e)
{
  g_free (e->at);
  g_strfreev (e->cmds);
  memset (e, 0, sizeof *e);
}

void
fl_proxy_end (FlProxy *px, FlEnd *e)
{
  g_autofree char *line = proxy_say (px, "end");
  char at[128] = "", cmds[16384] = "";
  int fired = 0;

  fl_end_clear (e);
  ck_assert_msg (sscanf (line, "end commands=%u connections=%u fired=%d at=%127s cmds=%16383s",
                         &e->commands, &e->connections, &fired, at, cmds) >= 4,
                 "fault proxy: unexpected '%s'", line);
  e->fired = fired != 0;
  e->at = g_strdup (at);
  e->cmds = g_strsplit (cmds, ",", -1);
}

void
fl_proxy_mask (FlProxy *px, const char *name)
{
  g_autofree char *cmd = name ? g_strdup_printf ("mask %s", name) : g_strdup ("unmask");

  proxy_expect (px, cmd, name ? "masked" : "unmasked");
}

/* ------------------------------------------------------------------ */
/* The VM                                                              */
/* ------------------------------------------------------------------ */

const TlDisk fl_disks[FL_NDISKS] = {
  { "efidisk0", "raw", 528 * 1024, "virtio", false },
  { "scsi0", "qcow2", 8 * MiB, "scsi", true },
};

bool
fl_vm_running (FlVm *vm)
{
  json_object *st = tl_qmp (vm->tl->q, "query-status", NULL), *v;
  bool r = json_object_object_get_ex (st, "running", &v) && json_object_get_boolean (v);

  json_object_put (st);
  return r;
}

FlVm *
fl_vm_start (const char *tag, const char *const *extra, bool running)
{
  FlVm *vm = g_new0 (FlVm, 1);

  vm->vmid = FL_VMID;
  vm->tl = tl_vm_new (tag, fl_disks, FL_NDISKS, 1);
  for (size_t i = 0; i < FL_NDISKS; i++) {
    uint64_t size = 0;

    vm->model[i] = tl_read_image (vm->tl->paths[i], fl_disks[i].format, &size);
    ck_assert_uint_eq (size, fl_disks[i].size);
  }
  tl_vm_start (vm->tl, extra);
  vm->log = g_string_new (NULL);
  if (running) {
    json_object_put (tl_qmp (vm->tl->q, "cont", NULL));
    ck_assert (fl_vm_running (vm));
  }
  return vm;
}

void
fl_vm_stop (FlVm *vm)
{
  fl_proxy_stop (vm->px);
  for (size_t i = 0; i < FL_NDISKS; i++)
    g_free (vm->model[i]);
  g_string_free (vm->log, TRUE);
  tl_vm_stop (vm->tl);
  g_free (vm);
}

const char *
fl_vm_proxy (FlVm *vm)
{
  if (!vm->px) {
    g_autofree char *path = g_build_filename (vm->tl->dir, "proxy.sock", NULL);
    vm->px = fl_proxy_start (vm->tl->q->qmp_path, path);
  }
  return vm->px->path;
}

struct fleece_handle *
fl_vm_handle (FlVm *vm, const char *qmp_path)
{
  return tl_handle_on (vm->tl, vm->vmid, vm->log, qmp_path);
}

void
fl_guest_write (FlVm *vm, size_t i, uint64_t off, uint64_t len)
{
  unsigned pattern = 0x10 + (vm->writes++ % 0xe0);
  g_autofree char *cmd = g_strdup_printf ("write -P 0x%02x %" G_GUINT64_FORMAT " %"
                                          G_GUINT64_FORMAT, pattern, off, len);

  tl_guest_io (vm->tl->q, tl_disk_qdev (&fl_disks[i]), cmd);
  memset (vm->model[i] + off, (int) pattern, len);
}

void
fl_guest_write_all (FlVm *vm)
{
  for (size_t i = 0; i < FL_NDISKS; i++)
    fl_guest_write (vm, i, fl_disks[i].size - 128 * 1024, 64 * 1024);
}

void
fl_guest_flush (FlVm *vm)
{
  for (size_t i = 0; i < FL_NDISKS; i++)
    tl_guest_io (vm->tl->q, tl_disk_qdev (&fl_disks[i]), "flush");
}

guint8 **
fl_pit (FlVm *vm)
{
  guint8 **pit = g_new0 (guint8 *, FL_NDISKS + 1);

  for (size_t i = 0; i < FL_NDISKS; i++)
    pit[i] = g_memdup2 (vm->model[i], fl_disks[i].size);
  return pit;
}

void
fl_pit_free (guint8 **pit)
{
  g_strfreev ((char **) pit);
}

void
fl_assert_backup (FlVm *vm, guint8 **pit, const char *what)
{
  for (size_t i = 0; i < FL_NDISKS; i++) {
    g_autofree char *name = g_strdup_printf ("%s.raw", fl_disks[i].key);
    g_autofree char *path = g_build_filename (vm->tl->target, name, NULL);
    g_autofree char *msg = g_strdup_printf ("%s: the backup of %s", what, fl_disks[i].key);

    tl_assert_image_equals (path, "raw", pit[i], fl_disks[i].size, msg);
  }
}

void
fl_assert_disks (FlVm *vm, const char *what)
{
  for (size_t i = 0; i < FL_NDISKS; i++) {
    uint64_t size = 0;
    g_autofree guint8 *now = tl_read_image (vm->tl->paths[i], fl_disks[i].format, &size);

    ck_assert_uint_eq (size, fl_disks[i].size);
    ck_assert_msg (memcmp (now, vm->model[i], size) == 0,
                   "%s: %s does not hold what the guest wrote", what, fl_disks[i].key);
  }
}

void
fl_empty_dir (const char *dir)
{
  g_auto (GStrv) files = tl_list_dir (dir);

  for (char **f = files; *f; f++) {
    g_autofree char *path = g_build_filename (dir, *f, NULL);
    g_unlink (path);
  }
}

static void
assert_strv_eq (char **now, char **before, const char *what, const char *which,
                const char *log)
{
  g_autofree char *a = g_strjoinv (",", now);
  g_autofree char *b = g_strjoinv (",", before);

  ck_assert_msg (strcmp (a, b) == 0, "%s: %s %s, before %s\n%s", what, which, a, b, log);
}

/* Lock files stay (removing one would let two runs lock different
 * inodes); nothing else: no record, no temporary file. */
static void
assert_state_dir_clean (FlVm *vm, const char *what)
{
  g_auto (GStrv) state = NULL;
  g_autofree char *list = NULL;

  if (!g_file_test (vm->tl->state, G_FILE_TEST_IS_DIR))
    return;
  state = tl_list_dir (vm->tl->state);
  list = g_strjoinv (",", state);
  for (char **f = state; *f; f++)
    ck_assert_msg (g_str_has_suffix (*f, ".lock") && g_ascii_isdigit (**f),
                   "%s: state dir holds %s", what, list);
}

void
fl_assert_restored (FlVm *vm, const char *what)
{
  g_auto (GStrv) nodes = tl_node_names (vm->tl->q);
  g_auto (GStrv) roots = tl_device_roots (vm->tl->q);
  g_auto (GStrv) markers = tl_run_markers (vm->tl->q);
  g_auto (GStrv) files = tl_list_dir (vm->tl->storage);

  assert_strv_eq (nodes, vm->tl->nodes_before, what, "nodes", vm->log->str);
  assert_strv_eq (roots, vm->tl->roots_before, what, "device roots", vm->log->str);
  ck_assert_msg (tl_job_count (vm->tl->q) == 0, "%s: jobs left\n%s", what, vm->log->str);
  ck_assert_msg (!markers[0], "%s: run marker %s left\n%s", what, markers[0], vm->log->str);
  ck_assert_msg (!files[0], "%s: storage holds %s\n%s", what, files[0], vm->log->str);
  assert_state_dir_clean (vm, what);
  ck_assert_msg (fl_vm_running (vm), "%s: the VM is left paused", what);
  fl_guest_write_all (vm);
  fl_assert_disks (vm, what);
  g_string_truncate (vm->log, 0);
}

void
fl_recover (FlVm *vm, const char *what)
{
  struct fleece_handle *h = fl_vm_handle (vm, NULL);
  char *rec;

  ck_assert_msg (fleece_cleanup (h, 0) == 0, "%s: cleanup failed: %s\n%s", what,
                 fleece_get_error (), vm->log->str);
  rec = fleece_get_record (h);
  ck_assert_msg (rec == NULL, "%s: the record is left: %s", what, rec);
  ck_assert_int_eq (fleece_get_errno (), ENOENT);
  fleece_free (h);
}

/* ------------------------------------------------------------------ */
/* The library in a child                                              */
/* ------------------------------------------------------------------ */

/* What the child holds, reachable until it exits (for valgrind). */
static struct {
  struct fleece_handle *h;
  struct fleece_plan *p;
  struct fleece_target *t;
} child_held;

static int
child_setup (FlVm *vm, const FlChildSpec *spec, struct fleece_handle *h)
{
  struct fleece_plan *p;
  struct fleece_target *t;

  if (fleece_connect (h, spec->qmp ? spec->qmp : vm->px->path) < 0 ||
      fleece_set_storage (h, fleece_storage_new_dir (spec->storage ? spec->storage
                                                                   : vm->tl->storage)) < 0 ||
      fleece_set_bwlimit (h, spec->bwlimit) < 0 || !(p = child_held.p = fleece_plan (h)) ||
      fleece_attach (h, p, 0) < 0)
    return -1;
  if (spec->job == FL_CHILD_ATTACH)
    return 0;
  if (!(t = child_held.t = fleece_target_new_dir (vm->tl->target, "raw")) ||
      fleece_start (h, p, t, 0) < 0)
    return -1;
  return 0;
}

/* After the setup: say so, see the backup to its end, clean up. */
static int
child_finish (struct fleece_handle *h, int done)
{
  int r;

  if (write (done, "s", 1) != 1)
    return -1;
  while ((r = fleece_wait (h, 1000)) == 0)
    ;
  if (r != 1 || fleece_cleanup (h, 0) < 0 || write (done, "d", 1) != 1)
    return -1;
  fleece_free (h);
  fleece_plan_free (child_held.p);
  fleece_target_free (child_held.t);
  child_held.h = NULL;
  child_held.p = NULL;
  child_held.t = NULL;
  return 0;
}

/* No Check calls in here: the child must never return into the test. */
static G_GNUC_NORETURN void
child_main (FlVm *vm, const FlChildSpec *spec, int go, int done)
{
  struct fleece_handle *h;
  const char *state = spec->state ? spec->state : vm->tl->state;
  char c;

  prctl (PR_SET_PDEATHSIG, SIGKILL);
  if (read (go, &c, 1) != 1)
    _exit (90);
  h = child_held.h = fleece_new ();
  if (!h || fleece_set_state_dir (h, state) < 0 || fleece_set_vmid (h, vm->vmid) < 0)
    _exit (91);
  if (spec->job == FL_CHILD_CLEANUP) {
    if (fleece_set_storage (h, fleece_storage_new_dir (spec->storage ? spec->storage
                                                                     : vm->tl->storage)) < 0 ||
        fleece_cleanup (h, 0) < 0) {
      fprintf (stderr, "child cleanup: %s\n", fleece_get_error ());
      _exit (92);
    }
  } else if (child_setup (vm, spec, h) < 0) {
    fprintf (stderr, "child: %s\n", fleece_get_error ());
    _exit (93);
  }
  if (spec->job == FL_CHILD_BACKUP) {
    if (child_finish (h, done) < 0) {
      fprintf (stderr, "child backup: %s\n", fleece_get_error ());
      _exit (95);
    }
    _exit (0);
  }
  if (write (done, "d", 1) != 1)
    _exit (94);
  for (;;)
    pause ();
}

FlChild
fl_child_fork (FlVm *vm, const FlChildSpec *spec)
{
  int go[2], done[2];
  FlChild c;

  if (spec->qmp == NULL && spec->job != FL_CHILD_CLEANUP)
    fl_vm_proxy (vm);
  ck_assert_int_eq (pipe2 (go, O_CLOEXEC), 0);
  ck_assert_int_eq (pipe2 (done, O_CLOEXEC), 0);
  fflush (NULL);
  c.pid = fork ();
  ck_assert_int_ge (c.pid, 0);
  if (c.pid == 0) {
    close (go[1]);
    close (done[0]);
    child_main (vm, spec, go[0], done[1]);
  }
  close (go[0]);
  close (done[1]);
  c.go = go[1];
  c.done = done[0];
  return c;
}

static void
child_close (FlChild *c)
{
  close (c->go);
  close (c->done);
  c->go = c->done = -1;
}

bool
fl_child_run (FlChild *c)
{
  gint64 deadline = g_get_monotonic_time () + FL_CHILD_TIMEOUT_MS * 1000LL;
  bool finished = false;
  int status;

  ck_assert_int_eq (write (c->go, "g", 1), 1);
  for (;;) {
    struct pollfd pfd = { .fd = c->done, .events = POLLIN };
    pid_t r = waitpid (c->pid, &status, WNOHANG);

    if (r == c->pid)
      break;
    ck_assert_msg (g_get_monotonic_time () < deadline, "the child hangs");
    if (poll (&pfd, 1, 20) > 0) {
      char b;
      if (read (c->done, &b, 1) == 1) {
        finished = true;
        kill (c->pid, SIGKILL);
      }
    }
  }
  child_close (c);
  ck_assert_msg (WIFSIGNALED (status) && WTERMSIG (status) == SIGKILL,
                 "the child ended with status 0x%x, not by SIGKILL", status);
  return !finished;
}

bool
fl_child_go (FlChild *c, int *status)
{
  char b;

  ck_assert_int_eq (write (c->go, "g", 1), 1);
  if (read (c->done, &b, 1) == 1)
    return true;
  waitpid (c->pid, status, 0);
  child_close (c);
  c->pid = 0;
  return false;
}

bool
fl_child_wait (FlChild *c)
{
  char b = 0;
  bool ok = read (c->done, &b, 1) == 1 && b == 'd';

  ck_assert_int_eq (waitpid (c->pid, NULL, 0), c->pid);
  child_close (c);
  c->pid = 0;
  return ok;
}

void
fl_child_kill (FlChild *c)
{
  if (c->pid > 0) {
    kill (c->pid, SIGKILL);
    waitpid (c->pid, NULL, 0);
  }
  if (c->go >= 0)
    child_close (c);
  c->pid = 0;
}

