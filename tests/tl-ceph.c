/* Test helpers for the Ceph RBD tests (see tl-ceph.h). */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <check.h>

#include "tl-ceph.h"

/* ---- can we? -------------------------------------------------------- */

const char *
tl_ceph_skip_reason (void)
{
  static const char *const tools[] = {
    "ceph-mon", "ceph-osd", "ceph", "rbd", "ceph-authtool", "monmaptool", NULL,
  };
  static char reason[512];
  const char *script = g_getenv ("FLEECE_CEPH_UP");

  if (!script || !*script)
    return "FLEECE_CEPH_UP is not set (the path of ceph-up.sh, which starts "
           "a throwaway Ceph cluster)";
  if (!g_file_test (script, G_FILE_TEST_IS_EXECUTABLE)
      || g_file_test (script, G_FILE_TEST_IS_DIR)) {
    g_snprintf (reason, sizeof reason,
                "FLEECE_CEPH_UP=%s is not an executable file", script);
    return reason;
  }
  for (size_t i = 0; tools[i]; i++) {
    g_autofree char *p = g_find_program_in_path (tools[i]);
    if (!p) {
      g_snprintf (reason, sizeof reason,
                  "%s is not installed (Debian packages ceph-mon ceph-osd "
                  "ceph-common)", tools[i]);
      return reason;
    }
  }
  return NULL;
}

void
tl_ceph_require (void)
{
  const char *why = tl_ceph_skip_reason ();

  if (why) {
    fprintf (stderr, "SKIP: Ceph tests: %s\n", why);
    exit (TL_SKIP);
  }
}

/* ---- scratch dirs ----------------------------------------------------- */

static void new_session (gpointer data);

/* Check ends a failed test with exit() in its forked child, so the test's
 * own cleanup never runs.  A janitor per process (a shell out of our
 * process group, ignoring the signals that end a test run) removes the
 * scratch dirs still there once every copy of its socket is closed, i.e.
 * when the test process has ended in whatever way.  Janitors are spawned
 * without GLib's intermediate child (DO_NOT_REAP; they are reaped by init
 * once we are gone): under valgrind, an intermediate child that exits
 * would report the threads' memory of librados as its leaks. */
static int dir_janitor = -1;
static pid_t dir_janitor_owner;

static void
watch_dir (const char *dir)
{
  static const char sh[] =
    "trap '' INT TERM HUP ALRM; "
    "while IFS= read -r d; do set -- \"$@\" \"$d\"; done; "
    "exec rm -rf -- \"$@\"";
  g_autofree char *line = g_strdup_printf ("%s\n", dir);

  if (dir_janitor < 0 || dir_janitor_owner != getpid ()) {
    const char *argv[] = { "/bin/sh", "-c", sh, NULL };
    int sv[2];

    if (dir_janitor >= 0)
      close (dir_janitor);
    dir_janitor = -1;
    if (socketpair (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
      return;
    if (g_spawn_async_with_fds (NULL, (char **) argv, NULL,
                                G_SPAWN_DO_NOT_REAP_CHILD, new_session, NULL,
                                NULL, sv[1], -1, -1, NULL)) {
      dir_janitor = sv[0];
      dir_janitor_owner = getpid ();
    } else {
      close (sv[0]);
    }
    close (sv[1]);
  }
  if (dir_janitor >= 0)
    send (dir_janitor, line, strlen (line), MSG_NOSIGNAL);
}

static char *
make_tmpdir (const char *tag, bool watched)
{
  g_autofree char *tmpl = g_strdup_printf ("fleece-%s-XXXXXX", tag);
  g_autoptr (GError) err = NULL;
  char *dir = g_dir_make_tmp (tmpl, &err);

  if (!dir) {
    fprintf (stderr, "tl-ceph: cannot create a scratch dir: %s\n", err->message);
    exit (1);
  }
  if (watched)
    watch_dir (dir);
  return dir;
}

char *
tlc_tmpdir (const char *tag)
{
  return make_tmpdir (tag, true);
}

static int
remove_entry (const char *path, const struct stat *st, int type,
              struct FTW *ftw)
{
  remove (path);
  return 0;
}

void
tlc_rmtree (const char *dir)
{
  if (dir)
    nftw (dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* ---- the cluster ------------------------------------------------------ */

static void
new_session (gpointer data)
{
  /* Out of the test's process group, which Check kills after each test. */
  setsid ();
}

/* A janitor stops the cluster when the test program ends in whatever
 * way (even SIGKILL): a shell, not our child and out of our process group,
 * ignoring the signals that end a test run, that waits for EOF on a
 * socket only this process (and the children Check forks) holds. */
static int
start_janitor (const char *script, const char *dir)
{
  static const char sh[] =
    "trap '' INT TERM HUP ALRM; cat >/dev/null; "
    "exec \"$0\" stop \"$1\" >/dev/null 2>&1";
  const char *argv[] = { "/bin/sh", "-c", sh, script, dir, NULL };
  g_autoptr (GError) err = NULL;
  int sv[2];

  if (socketpair (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
    return -1;
  if (!g_spawn_async_with_fds (NULL, (char **) argv, NULL,
                               G_SPAWN_DO_NOT_REAP_CHILD, new_session, NULL,
                               NULL, sv[1], -1, -1, &err)) {
    fprintf (stderr, "tl-ceph: no janitor for %s: %s\n", dir, err->message);
    close (sv[0]);
    close (sv[1]);
    return -1;
  }
  close (sv[1]);
  return sv[0];
}

/* The TlCeph of a janitor fd (for tl_ceph_stop). */
typedef struct {
  TlCeph pub;
  int janitor;
} TlCephPriv;

static char *
conf_value (const char *text, const char *key)
{
  g_auto (GStrv) lines = g_strsplit (text, "\n", -1);

  for (char **l = lines; *l; l++) {
    char *s = g_strstrip (*l), *eq = strchr (s, '=');
    if (!eq)
      continue;
    *eq = '\0';
    if (strcmp (g_strstrip (s), key) == 0)
      return g_strdup (g_strstrip (eq + 1));
  }
  return NULL;
}

TlCeph *
tl_ceph_start (const char *tag, const char *const *env)
{
  const char *script = g_getenv ("FLEECE_CEPH_UP");
  g_autofree char *scratch = NULL, *out = NULL, *errout = NULL;
  g_autofree char *conftext = NULL, *mons = NULL, *keytext = NULL;
  g_autoptr (GError) err = NULL;
  g_auto (GStrv) envp = g_get_environ ();
  TlCephPriv *p;
  TlCeph *c;
  int status = 0;
  gint64 t0 = g_get_monotonic_time ();
  char *v1, *v2;

  tl_ceph_require ();
  for (size_t i = 0; env && env[i]; i++) {
    g_auto (GStrv) kv = g_strsplit (env[i], "=", 2);
    envp = g_environ_setenv (envp, kv[0], kv[1] ? kv[1] : "", TRUE);
  }
  scratch = g_strdup_printf ("ceph-%s", tag);
  p = g_new0 (TlCephPriv, 1);
  c = &p->pub;
  /* ceph-up.sh creates the dir (and refuses one it did not make); its own
   * janitor, not the scratch dir one, removes it: stopping needs what is
   * in it. */
  c->dir = make_tmpdir (scratch, false);
  rmdir (c->dir);
  p->janitor = start_janitor (script, c->dir);
  {
    const char *argv[] = { script, "start", c->dir, NULL };
    if (!g_spawn_sync (NULL, (char **) argv, envp, G_SPAWN_DEFAULT, NULL, NULL,
                       &out, &errout, &status, &err)
        || !g_spawn_check_wait_status (status, NULL)) {
      fprintf (stderr, "tl-ceph: %s start %s failed: %s\n%s\n", script, c->dir,
               err ? err->message : "", errout ? errout : "");
      tl_ceph_stop (c);
      exit (1);
    }
  }
  c->conf = g_strdup (g_strstrip (out));
  if (!g_file_get_contents (c->conf, &conftext, NULL, NULL)) {
    fprintf (stderr, "tl-ceph: no conf at %s\n", c->conf);
    tl_ceph_stop (c);
    exit (1);
  }
  /* mon host = [v2:127.0.0.1:P,v1:127.0.0.1:P1] */
  mons = conf_value (conftext, "mon host");
  v2 = mons ? strstr (mons, "v2:") : NULL;
  v1 = mons ? strstr (mons, "v1:") : NULL;
  if (!v1 || !v2) {
    fprintf (stderr, "tl-ceph: no v1/v2 mon address in %s\n", c->conf);
    tl_ceph_stop (c);
    exit (1);
  }
  c->mon_v1 = g_strndup (v1 + 3, strcspn (v1 + 3, ",]"));
  c->mon_v2 = g_strndup (v2 + 3, strcspn (v2 + 3, ",]"));
  c->keyring = conf_value (conftext, "keyring");
  if (!c->keyring)
    c->keyring = g_build_filename (c->dir, "keyring", NULL);
  if (g_file_get_contents (c->keyring, &keytext, NULL, NULL)) {
    char *sec = strstr (keytext, "[client.admin]");
    if (sec) {
      char *end = strchr (sec + 1, '[');
      if (end)
        *end = '\0';
      c->admin_key = conf_value (sec, "key");
    }
  }
  c->pool = g_strdup ("rbd");
  fprintf (stderr, "tl-ceph: cluster %s up in %.1f s (mon %s)\n", c->dir,
           (g_get_monotonic_time () - t0) / 1e6, c->mon_v2);
  return c;
}

void
tl_ceph_stop (TlCeph *c)
{
  TlCephPriv *p = (TlCephPriv *) c;
  const char *script = g_getenv ("FLEECE_CEPH_UP");

  if (!c)
    return;
  if (script) {
    const char *argv[] = { script, "stop", c->dir, NULL };
    g_spawn_sync (NULL, (char **) argv, NULL, G_SPAWN_STDOUT_TO_DEV_NULL,
                  NULL, NULL, NULL, NULL, NULL, NULL);
  }
  if (p->janitor >= 0)
    close (p->janitor);
  g_free (c->dir);
  g_free (c->conf);
  g_free (c->keyring);
  if (c->admin_key)
    memset (c->admin_key, 0, strlen (c->admin_key));
  g_free (c->admin_key);
  g_free (c->mon_v1);
  g_free (c->mon_v2);
  g_free (c->pool);
  g_free (p);
}

static char *
vcmd (TlCeph *c, char **errout, const char *tool, va_list ap)
{
  g_autoptr (GPtrArray) argv = g_ptr_array_new ();
  g_autoptr (GError) err = NULL;
  char *out = NULL, *errs = NULL;
  const char *a;
  int status = 0;

  g_ptr_array_add (argv, (char *) "timeout");
  g_ptr_array_add (argv, (char *) "60");
  g_ptr_array_add (argv, (char *) tool);
  g_ptr_array_add (argv, (char *) "-c");
  g_ptr_array_add (argv, c->conf);
  while ((a = va_arg (ap, const char *)))
    g_ptr_array_add (argv, (char *) a);
  g_ptr_array_add (argv, NULL);
  if (!g_spawn_sync (NULL, (char **) argv->pdata, NULL, G_SPAWN_SEARCH_PATH,
                     NULL, NULL, &out, &errs, &status, &err)) {
    if (errout)
      *errout = g_strdup (err->message);
    g_free (errs);
    return NULL;
  }
  if (!g_spawn_check_wait_status (status, NULL)) {
    if (errout)
      *errout = errs;
    else
      g_free (errs);
    g_free (out);
    return NULL;
  }
  if (errout)
    *errout = errs;
  else
    g_free (errs);
  return out;
}

char *
tl_ceph_cmd (TlCeph *c, char **errout, const char *tool, ...)
{
  va_list ap;
  char *out;

  va_start (ap, tool);
  out = vcmd (c, errout, tool, ap);
  va_end (ap);
  return out;
}

char *
tl_ceph_cmd_ok (TlCeph *c, const char *tool, ...)
{
  g_autofree char *errs = NULL;
  va_list ap;
  char *out;

  va_start (ap, tool);
  out = vcmd (c, &errs, tool, ap);
  va_end (ap);
  ck_assert_msg (out != NULL, "%s failed: %s", tool, errs ? errs : "?");
  return out;
}

void
tl_ceph_osd_config (TlCeph *c, const char *option, const char *value)
{
  g_autofree char *asok = g_build_filename (c->dir, "run", "osd.0.asok", NULL);
  const char *argv[] = { "ceph", "--admin-daemon", asok, "config", "set",
                         option, value, NULL };
  int status = 0;

  g_spawn_sync (NULL, (char **) argv, NULL,
                G_SPAWN_SEARCH_PATH | G_SPAWN_STDOUT_TO_DEV_NULL
                | G_SPAWN_STDERR_TO_DEV_NULL, NULL, NULL, NULL, NULL, &status,
                NULL);
}

/* ---- QEMU -------------------------------------------------------------- */

static void
qemu_child_setup (gpointer data)
{
  prctl (PR_SET_PDEATHSIG, SIGKILL);
}

static bool
qmp_read_msg (TlcQemu *q, json_object **msg, gint64 deadline)
{
  for (;;) {
    char *nl = memchr (q->buf->str, '\n', q->buf->len);
    char chunk[4096];
    ssize_t n;

    if (nl) {
      *nl = '\0';
      *msg = json_tokener_parse (q->buf->str);
      g_string_erase (q->buf, 0, nl - q->buf->str + 1);
      if (*msg)
        return true;
      continue;
    }
    if (g_get_monotonic_time () > deadline)
      return false;
    n = read (q->fd, chunk, sizeof chunk);
    if (n > 0)
      g_string_append_len (q->buf, chunk, n);
    else if (n == 0 || (errno != EAGAIN && errno != EINTR))
      return false;
    else
      g_usleep (2000);
  }
}

TlcQemu *
tlc_qemu_start (void)
{
  TlcQemu *q = g_new0 (TlcQemu, 1);
  const char *bin = g_getenv ("FLEECE_QEMU");
  g_autofree char *sock = NULL, *qmparg = NULL;
  g_autoptr (GError) err = NULL;
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  json_object *greeting = NULL, *r;
  gint64 deadline = g_get_monotonic_time () + 20 * G_USEC_PER_SEC;
  int logfd;

  q->dir = tlc_tmpdir ("rbd-qemu");
  q->log = g_build_filename (q->dir, "qemu.log", NULL);
  sock = g_build_filename (q->dir, "qmp.sock", NULL);
  qmparg = g_strdup_printf ("unix:%s,server=on,wait=off", sock);
  {
    const char *argv[] = {
      bin && *bin ? bin : "qemu-system-x86_64", "-machine", "q35", "-accel",
      "tcg", "-S", "-nodefaults", "-display", "none", "-qmp", qmparg,
      /* q35's root bus takes no hotplug: the SCSI HBA is there from the
       * start, SCSI disks are plugged into it (and unplugged without a
       * guest). */
      "-device", "virtio-scsi-pci,id=scsihw0", NULL,
    };
    logfd = open (q->log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    ck_assert_int_ge (logfd, 0);
    ck_assert_msg (g_spawn_async_with_fds (NULL, (char **) argv, NULL,
                                           G_SPAWN_SEARCH_PATH
                                           | G_SPAWN_DO_NOT_REAP_CHILD,
                                           qemu_child_setup, NULL, &q->pid,
                                           -1, logfd, logfd, &err),
                   "cannot start QEMU: %s", err ? err->message : "?");
    close (logfd);
  }
  g_strlcpy (sa.sun_path, sock, sizeof sa.sun_path);
  for (;;) {
    q->fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (connect (q->fd, (struct sockaddr *) &sa, sizeof sa) == 0)
      break;
    close (q->fd);
    q->fd = -1;
    ck_assert_msg (g_get_monotonic_time () < deadline,
                   "QEMU did not open its QMP socket in 20 s");
    g_usleep (20000);
  }
  fcntl (q->fd, F_SETFL, O_NONBLOCK);
  q->buf = g_string_new ("");
  ck_assert_msg (qmp_read_msg (q, &greeting, deadline), "no QMP greeting");
  json_object_put (greeting);
  r = tlc_qmp (q, "qmp_capabilities", NULL);
  json_object_put (r);
  return q;
}

static void
reap (TlcQemu *q, gint64 wait_us)
{
  gint64 deadline = g_get_monotonic_time () + wait_us;
  int status;

  while (waitpid (q->pid, &status, WNOHANG) == 0) {
    if (g_get_monotonic_time () > deadline) {
      kill (q->pid, SIGKILL);
      waitpid (q->pid, &status, 0);
      break;
    }
    g_usleep (20000);
  }
}

static void
qemu_free (TlcQemu *q)
{
  if (q->fd >= 0)
    close (q->fd);
  if (q->buf)
    g_string_free (q->buf, TRUE);
  tlc_rmtree (q->dir);
  g_free (q->dir);
  g_free (q->log);
  g_free (q);
}

void
tlc_qemu_stop (TlcQemu *q)
{
  char *e = NULL;
  json_object *r;

  if (!q)
    return;
  r = tlc_qmp_try (q, "quit", NULL, &e);
  json_object_put (r);
  g_free (e);
  reap (q, 5 * G_USEC_PER_SEC);
  qemu_free (q);
}

void
tlc_qemu_kill (TlcQemu *q)
{
  kill (q->pid, SIGKILL);
  reap (q, 5 * G_USEC_PER_SEC);
  qemu_free (q);
}

json_object *
tlc_qmp_try (TlcQemu *q, const char *cmd, json_object *args, char **errmsg)
{
  json_object *req = json_object_new_object ();
  const char *text;
  gint64 deadline = g_get_monotonic_time () + 120 * G_USEC_PER_SEC;
  size_t off = 0, len;

  *errmsg = NULL;
  json_object_object_add (req, "execute", json_object_new_string (cmd));
  if (args)
    json_object_object_add (req, "arguments", args);
  text = json_object_to_json_string_ext (req, JSON_C_TO_STRING_PLAIN);
  len = strlen (text);
  while (off < len) {
    ssize_t n = send (q->fd, text + off, len - off, MSG_NOSIGNAL);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      g_usleep (1000);
      continue;
    }
    if (n < 0) {
      json_object_put (req);
      *errmsg = g_strdup_printf ("QMP send: %s", g_strerror (errno));
      return NULL;
    }
    off += n;
  }
  send (q->fd, "\n", 1, MSG_NOSIGNAL);
  json_object_put (req);
  for (;;) {
    json_object *msg = NULL, *v;
    if (!qmp_read_msg (q, &msg, deadline)) {
      *errmsg = g_strdup_printf ("QMP %s: no reply (QEMU gone?)", cmd);
      return NULL;
    }
    if (json_object_object_get_ex (msg, "return", &v)) {
      json_object_get (v);
      json_object_put (msg);
      return v;
    }
    if (json_object_object_get_ex (msg, "error", &v)) {
      json_object *d;
      *errmsg = g_strdup (json_object_object_get_ex (v, "desc", &d)
                          ? json_object_get_string (d) : "?");
      json_object_put (msg);
      return NULL;
    }
    json_object_put (msg);      /* an event */
  }
}

json_object *
tlc_qmp (TlcQemu *q, const char *cmd, json_object *args)
{
  g_autofree char *e = NULL;
  json_object *r = tlc_qmp_try (q, cmd, args, &e);

  ck_assert_msg (r != NULL, "QMP %s: %s", cmd, e);
  return r;
}

goffset
tlc_qemu_log_size (TlcQemu *q)
{
  struct stat st;
  return stat (q->log, &st) == 0 ? st.st_size : 0;
}

char *
tlc_qemu_log_since (TlcQemu *q, goffset from)
{
  g_autofree char *all = NULL;
  gsize n = 0;

  if (!g_file_get_contents (q->log, &all, &n, NULL) || (goffset) n <= from)
    return g_strdup ("");
  return g_strndup (all + from, n - from);
}

char *
tlc_hmp (TlcQemu *q, const char *line)
{
  goffset before = tlc_qemu_log_size (q);
  json_object *args = json_object_new_object ();
  json_object *r;
  g_autofree char *since = NULL;
  GString *out = g_string_new ("");

  json_object_object_add (args, "command-line", json_object_new_string (line));
  r = tlc_qmp (q, "human-monitor-command", args);
  g_string_append (out, json_object_get_string (r));
  json_object_put (r);
  /* qemu-io prints on QEMU's stdout before the HMP command returns. */
  since = tlc_qemu_log_since (q, before);
  g_string_append (out, since);
  return g_string_free (out, FALSE);
}

static const char *const io_bad[] = {
  "failed", "Error", "error", "not found", "Invalid", "invalid", "Cannot",
  "cannot", "No such", NULL,
};

char *
tlc_qemu_io_out (TlcQemu *q, const char *qdev, const char *cmd)
{
  g_autofree char *line = g_strdup_printf ("qemu-io -d %s \"%s\"", qdev, cmd);
  return tlc_hmp (q, line);
}

void
tlc_qemu_io (TlcQemu *q, const char *qdev, const char *cmd)
{
  g_autofree char *out = tlc_qemu_io_out (q, qdev, cmd);

  for (size_t i = 0; io_bad[i]; i++)
    ck_assert_msg (!strstr (out, io_bad[i]), "qemu-io %s \"%s\": %s", qdev,
                   cmd, out);
}

void
tlc_qemu_io_blk (TlcQemu *q, const char *blk, const char *cmd)
{
  g_autofree char *line = g_strdup_printf ("qemu-io %s \"%s\"", blk, cmd);
  g_autofree char *out = tlc_hmp (q, line);

  for (size_t i = 0; io_bad[i]; i++)
    ck_assert_msg (!strstr (out, io_bad[i]), "qemu-io %s \"%s\": %s", blk,
                   cmd, out);
}

json_object *
tlc_json (const char *fmt, ...)
{
  g_autofree char *s = NULL;
  json_object *o;
  va_list ap;

  va_start (ap, fmt);
  s = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  o = json_tokener_parse (s);
  ck_assert_msg (o != NULL, "bad JSON: %s", s);
  return o;
}
