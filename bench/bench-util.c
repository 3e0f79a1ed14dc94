/* Helpers shared by the benchmark (see bench-util.h). */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench-util.h"

void
die (const char *fmt, ...)
{
  va_list ap;

  fflush (stdout);
  fprintf (stderr, "fleece-bench: ");
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fprintf (stderr, "\n");
  /* Children die with us (PR_SET_PDEATHSIG). */
  exit (1);
}

void
note (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fflush (stderr);
}

double
loadavg1 (void)
{
  double l = -1;
  FILE *f = fopen ("/proc/loadavg", "r");

  if (f) {
    if (fscanf (f, "%lf", &l) != 1)
      l = -1;
    fclose (f);
  }
  return l;
}

gint64
now_us (void)
{
  return g_get_monotonic_time ();
}

/* ---- processes ---------------------------------------------------- */

pid_t
spawn_logged (char *const *argv, const char *log)
{
  pid_t parent = getpid ();
  pid_t pid = fork ();

  if (pid < 0)
    die ("fork: %s", g_strerror (errno));
  if (pid == 0) {
    int fd = open (log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int nul = open ("/dev/null", O_RDONLY | O_CLOEXEC);

    prctl (PR_SET_PDEATHSIG, SIGKILL);
    if (getppid () != parent)
      _exit (127);
    setpgid (0, 0);
    if (fd >= 0) {
      dup2 (fd, 1);
      dup2 (fd, 2);
    }
    if (nul >= 0)
      dup2 (nul, 0);
    execvp (argv[0], argv);
    _exit (127);
  }
  return pid;
}

void
stop_pid (pid_t pid)
{
  gint64 deadline = now_us () + 5 * G_USEC_PER_SEC;
  int st;

  if (pid <= 0)
    return;
  kill (pid, SIGTERM);
  while (waitpid (pid, &st, WNOHANG) == 0) {
    if (now_us () > deadline) {
      kill (pid, SIGKILL);
      waitpid (pid, &st, 0);
      return;
    }
    g_usleep (10000);
  }
}

void
run_cmd (char *const *argv)
{
  g_autofree char *errout = NULL;
  g_autoptr (GError) err = NULL;
  int status;

  if (!g_spawn_sync (NULL, (char **) argv, NULL,
                     G_SPAWN_SEARCH_PATH | G_SPAWN_STDOUT_TO_DEV_NULL, NULL,
                     NULL, NULL, &errout, &status, &err))
    die ("%s: %s", argv[0], err->message);
  if (!g_spawn_check_wait_status (status, NULL))
    die ("%s failed: %s", argv[0], errout ? errout : "");
}

static int
rm_entry (const char *path, const struct stat *st, int type, struct FTW *ftw)
{
  remove (path);
  return 0;
}

void
rm_rf (const char *dir)
{
  nftw (dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

uint64_t
allocated_bytes (const char *path)
{
  struct stat st;
  return stat (path, &st) == 0 ? (uint64_t) st.st_blocks * 512 : 0;
}

void
make_random_file (const char *path, uint64_t size, uint32_t seed)
{
  size_t chunk = 4 * MiB;
  g_autofree uint64_t *buf = g_malloc (chunk);
  uint64_t x = 0x9e3779b97f4a7c15ull ^ seed;
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

  if (fd < 0)
    die ("create %s: %s", path, g_strerror (errno));
  for (uint64_t off = 0; off < size; off += chunk) {
    size_t len = (size_t) MIN ((uint64_t) chunk, size - off);
    for (size_t i = 0; i < len / 8; i++) {
      /* xorshift64*: fast, never all-zero blocks. */
      x ^= x >> 12;
      x ^= x << 25;
      x ^= x >> 27;
      buf[i] = x * 0x2545F4914F6CDD1Dull;
    }
    if (pwrite (fd, buf, len, (off_t) off) != (ssize_t) len)
      die ("write %s: %s", path, g_strerror (errno));
  }
  if (close (fd) != 0)
    die ("close %s", path);
}

void
make_sparse_file (const char *path, uint64_t size)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0 || ftruncate (fd, (off_t) size) != 0 || close (fd) != 0)
    die ("create %s: %s", path, g_strerror (errno));
}

/* ---- QMP client ----------------------------------------------------- */

json_object *
json_parse (const char *fmt, ...)
{
  va_list ap;
  g_autofree char *s = NULL;
  json_object *o;

  va_start (ap, fmt);
  s = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  o = json_tokener_parse (s);
  if (!o)
    die ("bad JSON: %s", s);
  return o;
}

static int
unix_connect (const char *path)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  int fd;

  if (strlen (path) >= sizeof sa.sun_path)
    die ("socket path too long: %s", path);
  strcpy (sa.sun_path, path);
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    die ("socket: %s", g_strerror (errno));
  if (connect (fd, (struct sockaddr *) &sa, sizeof sa) != 0) {
    close (fd);
    return -1;
  }
  return fd;
}

static int
connect_retry (const char *path)
{
  gint64 deadline = now_us () + 20 * G_USEC_PER_SEC;
  int fd;

  while ((fd = unix_connect (path)) < 0) {
    if (now_us () > deadline)
      die ("cannot connect to %s", path);
    g_usleep (20000);
  }
  return fd;
}

static json_object *
qmp_read (Qmp *q)
{
  for (;;) {
    char *nl = memchr (q->buf->str, '\n', q->buf->len);
    char tmp[65536];
    struct pollfd pfd = { .fd = q->fd, .events = POLLIN };
    ssize_t n;

    if (nl) {
      size_t len = (size_t) (nl - q->buf->str) + 1;
      json_object *o;
      *nl = '\0';
      o = json_tokener_parse (q->buf->str);
      g_string_erase (q->buf, 0, (gssize) len);
      if (!o)
        die ("bad QMP message");
      return o;
    }
    if (poll (&pfd, 1, 300 * 1000) <= 0)
      die ("QMP: no answer within 300 s");
    n = read (q->fd, tmp, sizeof tmp);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      die ("QMP connection closed");
    g_string_append_len (q->buf, tmp, n);
  }
}

Qmp *
qmp_open (const char *path)
{
  Qmp *q = g_new0 (Qmp, 1);
  json_object *greeting, *r;

  q->fd = connect_retry (path);
  q->buf = g_string_new (NULL);
  greeting = qmp_read (q);
  json_object_put (greeting);
  r = qmp_do (q, "qmp_capabilities", NULL);
  json_object_put (r);
  return q;
}

void
qmp_close (Qmp *q)
{
  if (!q)
    return;
  close (q->fd);
  g_string_free (q->buf, TRUE);
  g_free (q);
}

json_object *
qmp_try (Qmp *q, const char *cmd, json_object *args, char **err)
{
  json_object *req = json_object_new_object ();
  g_autofree char *id = g_strdup_printf ("b%u", ++q->next_id);
  g_autofree char *line = NULL;
  size_t off = 0, len;

  json_object_object_add (req, "execute", json_object_new_string (cmd));
  if (args)
    json_object_object_add (req, "arguments", args);
  json_object_object_add (req, "id", json_object_new_string (id));
  line = g_strdup_printf ("%s\n", json_object_to_json_string_ext (req, JSON_C_TO_STRING_PLAIN));
  json_object_put (req);
  len = strlen (line);
  while (off < len) {
    ssize_t n = write (q->fd, line + off, len - off);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      die ("QMP write: %s", g_strerror (errno));
    off += (size_t) n;
  }
  for (;;) {
    json_object *m = qmp_read (q), *v, *ret;
    if (json_object_object_get_ex (m, "event", NULL) ||
        !json_object_object_get_ex (m, "id", &v) ||
        strcmp (json_object_get_string (v), id) != 0) {
      json_object_put (m);
      continue;
    }
    if (json_object_object_get_ex (m, "return", &ret)) {
      json_object_get (ret);
      json_object_put (m);
      return ret;
    }
    if (err) {
      json_object *e, *desc;
      *err = g_strdup (json_object_object_get_ex (m, "error", &e) &&
                       json_object_object_get_ex (e, "desc", &desc)
                       ? json_object_get_string (desc) : "error");
    }
    json_object_put (m);
    return NULL;
  }
}

json_object *
qmp_do (Qmp *q, const char *cmd, json_object *args)
{
  g_autofree char *err = NULL;
  json_object *r = qmp_try (q, cmd, args, &err);
  if (!r)
    die ("QMP %s: %s", cmd, err);
  return r;
}

char *
qmp_qemu_version (Qmp *q)
{
  json_object *r = qmp_do (q, "query-version", NULL), *qemu, *v;
  int64_t x[3] = { 0 };
  const char *k[3] = { "major", "minor", "micro" };
  char *s;

  if (json_object_object_get_ex (r, "qemu", &qemu))
    for (int i = 0; i < 3; i++)
      if (json_object_object_get_ex (qemu, k[i], &v))
        x[i] = json_object_get_int64 (v);
  s = g_strdup_printf ("%" G_GINT64_FORMAT ".%" G_GINT64_FORMAT ".%" G_GINT64_FORMAT,
                       x[0], x[1], x[2]);
  json_object_put (r);
  return s;
}

char *
hmp (Qmp *q, const char *line)
{
  json_object *a = json_object_new_object ();
  json_object *r;
  char *out;

  json_object_object_add (a, "command-line", json_object_new_string (line));
  r = qmp_do (q, "human-monitor-command", a);
  out = g_strdup (json_object_get_string (r));
  json_object_put (r);
  return out;
}

/* ---- the proxy ------------------------------------------------------- */

typedef struct {
  guint count;
  gint64 us;
} CmdStat;

struct Proxy {
  int lib;              /* our end of the socketpair */
  int qemu;
  const Variant *v;
  GThread *thread;
  GMutex lock;
  GHashTable *stats;    /* command -> CmdStat */
  GHashTable *pending;  /* id -> (command, sent_us) */
  guint total;
  gint64 total_us;
  GString *from_lib, *to_qemu, *from_qemu, *to_lib;
};

typedef struct {
  char *cmd;
  gint64 sent;
} Pending;

static void
pending_free (gpointer p)
{
  Pending *x = p;
  g_free (x->cmd);
  g_free (x);
}

static const char *
jstr (json_object *o, const char *key)
{
  json_object *v;
  if (!o || !json_object_object_get_ex (o, key, &v) || !v)
    return NULL;
  return json_object_get_string (v);
}

static void
set_cache (json_object *node, const Variant *v)
{
  json_object *c;

  if (!v->cache_direct && !v->no_flush)
    return;
  c = json_object_new_object ();
  if (v->cache_direct)
    json_object_object_add (c, "direct", json_object_new_boolean (v->cache_direct == 1));
  if (v->no_flush)
    json_object_object_add (c, "no-flush", json_object_new_boolean (true));
  json_object_object_add (node, "cache", c);
}

/* The library's command, as it would be with the variant's defaults. */
static void
rewrite (const Variant *v, json_object *msg)
{
  const char *cmd = jstr (msg, "execute");
  json_object *args;

  if (!v || !cmd || !json_object_object_get_ex (msg, "arguments", &args))
    return;
  if (strcmp (cmd, "blockdev-add") == 0) {
    const char *node = jstr (args, "node-name"), *drv = jstr (args, "driver");
    if (node && g_str_has_suffix (node, "-fleecing")) {
      json_object *file;
      set_cache (args, v);
      if (json_object_object_get_ex (args, "file", &file) &&
          json_object_is_type (file, json_type_object)) {
        set_cache (file, v);
        if (v->aio)
          json_object_object_add (file, "aio", json_object_new_string (v->aio));
      }
      if (v->discard_no_unref && g_strcmp0 (drv, "qcow2") == 0)
        json_object_object_add (args, "discard-no-unref", json_object_new_boolean (true));
    }
    /* A file node added on its own, for QEMU to write qcow2 metadata in. */
    if (node && g_str_has_suffix (node, "-fleecing-file")) {
      set_cache (args, v);
      if (v->aio)
        json_object_object_add (args, "aio", json_object_new_string (v->aio));
    }
    if (g_strcmp0 (drv, "copy-before-write") == 0 && v->cbw_min_cluster)
      json_object_object_add (args, "min-cluster-size",
                              json_object_new_int64 (v->cbw_min_cluster));
  } else if (strcmp (cmd, "transaction") == 0) {
    json_object *actions;
    if (!json_object_object_get_ex (args, "actions", &actions))
      return;
    for (size_t i = 0; i < json_object_array_length (actions); i++) {
      json_object *a = json_object_array_get_idx (actions, i), *d, *perf;
      const char *dev;
      bool fleeced;
      if (g_strcmp0 (jstr (a, "type"), "blockdev-backup") != 0 ||
          !json_object_object_get_ex (a, "data", &d))
        continue;
      dev = jstr (d, "device");
      fleeced = dev && g_str_has_suffix (dev, "-fleece-snap");
      if (!fleeced) {
        if (v->plain_max_workers || v->plain_no_copy_range) {
          perf = json_object_new_object ();
          if (v->plain_max_workers)
            json_object_object_add (perf, "max-workers",
                                    json_object_new_int (v->plain_max_workers));
          if (v->plain_no_copy_range)
            json_object_object_add (perf, "use-copy-range", json_object_new_boolean (false));
          json_object_object_add (d, "x-perf", perf);
        }
        continue;
      }
      if (v->no_discard_source)
        json_object_object_del (d, "discard-source");
      if (!json_object_object_get_ex (d, "x-perf", &perf)) {
        perf = json_object_new_object ();
        json_object_object_add (d, "x-perf", perf);
      }
      if (v->job_min_cluster)
        json_object_object_add (perf, "min-cluster-size",
                                json_object_new_int64 (v->job_min_cluster));
      if (v->max_workers)
        json_object_object_add (perf, "max-workers", json_object_new_int (v->max_workers));
      if (v->max_chunk)
        json_object_object_add (perf, "max-chunk", json_object_new_int64 (v->max_chunk));
    }
  }
}

static void
on_command (Proxy *p, const char *line, size_t len)
{
  json_object *m = json_tokener_parse (line);
  const char *cmd, *id;

  if (!m) {
    g_string_append_len (p->to_qemu, line, (gssize) len);
    g_string_append_c (p->to_qemu, '\n');
    return;
  }
  cmd = jstr (m, "execute");
  id = jstr (m, "id");
  rewrite (p->v, m);
  g_mutex_lock (&p->lock);
  if (cmd) {
    CmdStat *s = g_hash_table_lookup (p->stats, cmd);
    if (!s) {
      s = g_new0 (CmdStat, 1);
      g_hash_table_insert (p->stats, g_strdup (cmd), s);
    }
    s->count++;
    p->total++;
    if (id) {
      Pending *x = g_new0 (Pending, 1);
      x->cmd = g_strdup (cmd);
      x->sent = now_us ();
      g_hash_table_replace (p->pending, g_strdup (id), x);
    }
  }
  g_mutex_unlock (&p->lock);
  g_string_append (p->to_qemu, json_object_to_json_string_ext (m, JSON_C_TO_STRING_PLAIN));
  g_string_append_c (p->to_qemu, '\n');
  json_object_put (m);
}

/* A reply's id, found without parsing the whole (possibly large) reply:
 * QEMU writes "id" last. */
static void
on_reply (Proxy *p, const char *line, size_t len)
{
  /* line is not NUL-terminated: search a copy of its end only. */
  g_autofree char *tail = g_strndup (line + (len > 200 ? len - 200 : 0),
                                     len > 200 ? 200 : len);
  const char *k = NULL, *s;

  for (s = tail; (s = strstr (s, "\"id\": \"")); s++)
    k = s;
  if (k) {
    g_autofree char *id = NULL;
    const char *b = k + strlen ("\"id\": \""), *e = strchr (b, '"');
    Pending *x;
    if (!e)
      return;
    id = g_strndup (b, (gsize) (e - b));
    g_mutex_lock (&p->lock);
    if ((x = g_hash_table_lookup (p->pending, id))) {
      CmdStat *st = g_hash_table_lookup (p->stats, x->cmd);
      gint64 dt = now_us () - x->sent;
      if (st)
        st->us += dt;
      p->total_us += dt;
      g_hash_table_remove (p->pending, id);
    }
    g_mutex_unlock (&p->lock);
  }
}

static bool
pump_in (int fd, GString *buf)
{
  char tmp[65536];
  ssize_t n = read (fd, tmp, sizeof tmp);
  if (n < 0 && (errno == EINTR || errno == EAGAIN))
    return true;
  if (n <= 0)
    return false;
  g_string_append_len (buf, tmp, n);
  return true;
}

static bool
pump_out (int fd, GString *buf)
{
  ssize_t n;
  if (!buf->len)
    return true;
  n = write (fd, buf->str, buf->len);
  if (n < 0 && (errno == EINTR || errno == EAGAIN))
    return true;
  if (n <= 0)
    return false;
  g_string_erase (buf, 0, n);
  return true;
}

static gpointer
proxy_thread (gpointer data)
{
  Proxy *p = data;

  for (;;) {
    struct pollfd pfd[2] = {
      { .fd = p->lib, .events = POLLIN | (p->to_lib->len ? POLLOUT : 0) },
      { .fd = p->qemu, .events = POLLIN | (p->to_qemu->len ? POLLOUT : 0) },
    };
    char *nl;

    if (poll (pfd, 2, -1) < 0) {
      if (errno == EINTR)
        continue;
      break;
    }
    if ((pfd[0].revents & (POLLIN | POLLHUP | POLLERR)) && !pump_in (p->lib, p->from_lib))
      break;
    if ((pfd[1].revents & (POLLIN | POLLHUP | POLLERR)) && !pump_in (p->qemu, p->from_qemu))
      break;
    while ((nl = memchr (p->from_lib->str, '\n', p->from_lib->len))) {
      size_t len = (size_t) (nl - p->from_lib->str);
      *nl = '\0';
      on_command (p, p->from_lib->str, len);
      g_string_erase (p->from_lib, 0, (gssize) len + 1);
    }
    while ((nl = memchr (p->from_qemu->str, '\n', p->from_qemu->len))) {
      size_t len = (size_t) (nl - p->from_qemu->str) + 1;
      on_reply (p, p->from_qemu->str, len);
      g_string_append_len (p->to_lib, p->from_qemu->str, (gssize) len);
      g_string_erase (p->from_qemu, 0, (gssize) len);
    }
    if (!pump_out (p->qemu, p->to_qemu) || !pump_out (p->lib, p->to_lib))
      break;
  }
  close (p->qemu);
  close (p->lib);
  return NULL;
}

Proxy *
proxy_start (const char *qemu_sock, const Variant *v, int *lib_fd)
{
  Proxy *p = g_new0 (Proxy, 1);
  int sv[2];

  if (socketpair (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    die ("socketpair: %s", g_strerror (errno));
  p->lib = sv[0];
  *lib_fd = sv[1];
  p->qemu = connect_retry (qemu_sock);
  fcntl (p->lib, F_SETFL, O_NONBLOCK);
  fcntl (p->qemu, F_SETFL, O_NONBLOCK);
  p->v = v;
  g_mutex_init (&p->lock);
  p->stats = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  p->pending = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, pending_free);
  p->from_lib = g_string_new (NULL);
  p->to_qemu = g_string_new (NULL);
  p->from_qemu = g_string_new (NULL);
  p->to_lib = g_string_new (NULL);
  p->thread = g_thread_new ("qmp-proxy", proxy_thread, p);
  return p;
}

void
proxy_stop (Proxy *p)
{
  if (!p)
    return;
  g_thread_join (p->thread);
  g_hash_table_unref (p->stats);
  g_hash_table_unref (p->pending);
  g_string_free (p->from_lib, TRUE);
  g_string_free (p->to_qemu, TRUE);
  g_string_free (p->from_qemu, TRUE);
  g_string_free (p->to_lib, TRUE);
  g_mutex_clear (&p->lock);
  g_free (p);
}

unsigned
proxy_count (Proxy *p, const char *cmd)
{
  unsigned n;
  g_mutex_lock (&p->lock);
  if (cmd) {
    CmdStat *s = g_hash_table_lookup (p->stats, cmd);
    n = s ? s->count : 0;
  } else {
    n = p->total;
  }
  g_mutex_unlock (&p->lock);
  return n;
}

gint64
proxy_qemu_us (Proxy *p, const char *cmd)
{
  gint64 us;
  g_mutex_lock (&p->lock);
  if (cmd) {
    CmdStat *s = g_hash_table_lookup (p->stats, cmd);
    us = s ? s->us : 0;
  } else {
    us = p->total_us;
  }
  g_mutex_unlock (&p->lock);
  return us;
}

static gint
cmp_stat (gconstpointer a, gconstpointer b, gpointer data)
{
  GHashTable *t = data;
  const CmdStat *x = g_hash_table_lookup (t, *(char *const *) a);
  const CmdStat *y = g_hash_table_lookup (t, *(char *const *) b);
  return x->us < y->us ? 1 : x->us > y->us ? -1 : 0;
}

char *
proxy_breakdown (Proxy *p)
{
  GString *s = g_string_new (NULL);
  g_autoptr (GPtrArray) keys = g_ptr_array_new ();
  GHashTableIter it;
  gpointer k;

  g_mutex_lock (&p->lock);
  g_hash_table_iter_init (&it, p->stats);
  while (g_hash_table_iter_next (&it, &k, NULL))
    g_ptr_array_add (keys, k);
  g_ptr_array_sort_with_data (keys, cmp_stat, p->stats);
  for (guint i = 0; i < keys->len; i++) {
    const CmdStat *st = g_hash_table_lookup (p->stats, keys->pdata[i]);
    g_string_append_printf (s, "%s%s ×%u (%.0f ms)", i ? ", " : "",
                            (char *) keys->pdata[i], st->count, st->us / 1000.0);
  }
  g_mutex_unlock (&p->lock);
  return g_string_free (s, FALSE);
}

void
proxy_reset (Proxy *p)
{
  g_mutex_lock (&p->lock);
  g_hash_table_remove_all (p->stats);
  p->total = 0;
  p->total_us = 0;
  g_mutex_unlock (&p->lock);
}

/* ---- statistics -------------------------------------------------------- */

int
cmp_double (gconstpointer a, gconstpointer b)
{
  double x = *(const double *) a, y = *(const double *) b;
  return x < y ? -1 : x > y;
}

GArray *
dbl_array (void)
{
  return g_array_new (FALSE, FALSE, sizeof (double));
}

void
push (GArray *a, double x)
{
  g_array_append_val (a, x);
}

FILE *
open_out (const char *dir, const char *name)
{
  g_autofree char *path = g_build_filename (dir, name, NULL);
  FILE *f = fopen (path, "w");

  if (!f)
    die ("cannot write %s: %s", path, g_strerror (errno));
  return f;
}

double
quantile (GArray *a, double q)
{
  size_t rank;

  if (!a || !a->len)
    return 0;
  g_array_sort (a, cmp_double);
  rank = (size_t) (q * a->len + 0.999999);
  rank = MAX (rank, (size_t) 1);
  rank = MIN (rank, (size_t) a->len);
  return g_array_index (a, double, rank - 1);
}

double
median3 (GArray *a)
{
  return quantile (a, 0.5);
}
