/* fault-proxy: a QMP man-in-the-middle that injects faults, for
 * tests/test-faults.c (and by hand, see docs/reliability.md).
 *
 *   fault-proxy LISTEN_SOCKET UPSTREAM_SOCKET
 *
 * Listens on LISTEN_SOCKET; every client is connected to UPSTREAM_SOCKET
 * (QEMU's QMP monitor) and the messages are passed through whole, byte for
 * byte.  The library needs no test hooks: the proxy counts the client's
 * commands and does one thing at the N-th command (1-based) of an armed
 * session.
 *
 * The library connects for each public call (and fleece_wait for each
 * look at the jobs), so a session spans connections: every connection
 * accepted after "arm" belongs to it, and N counts the commands of all of
 * them in order (each connection's qmp_capabilities included), until
 * "end".  A sequence of library calls is faulted at one point of it.
 *
 * Control, one line each on stdin; answers on stdout:
 *
 *   arm MODE N PID [ARG [NAME]]
 *                         start a session (ending one still armed without
 *                         a report); answers "armed".  With NAME, N counts
 *                         only the commands called NAME, and N = 0 faults
 *                         every one of them.  Modes:
 *     count      pass everything through, only count
 *     send       SIGKILL PID when the client sends command N (QEMU never
 *                sees it) and drop the connection
 *     reply      forward command N, SIGKILL PID when QEMU's reply arrives
 *                (QEMU did it, the client never learns) and drop the
 *                connection
 *     close      close the connection instead of forwarding reply N
 *     truncate   forward the first half of reply N, then close
 *     malformed  replace reply N with malformed JSON (connection stays)
 *     oversize   replace reply N with a reply of ARG MiB (default 17)
 *     events     before reply N, inject a burst of unexpected events
 *                (unknown names, our job ids with wrong states, a
 *                2000-event flood), then forward the reply
 *     delay      hold reply N (and what follows) for ARG ms
 *     refuse     answer command N with a QMP error (GenericError)
 *                instead of passing it to QEMU
 *   mask NAME             in replies to query-qmp-schema on later
 *                         connections, drop every enum value, member and
 *                         entity called NAME (a QEMU lacking a feature);
 *                         answers "masked"
 *   unmask                answers "unmasked"
 *   end                   end the session; answers
 *     end commands=C connections=K fired=0|1 at=NAME cmds=NAME,NAME,...
 *                         where C counts the session's commands, K its
 *                         connections and at names command N ("-" if
 *                         there were fewer).  Its connections still open
 *                         pass through from then on.
 *
 * Connections outside a session pass through silently.
 *
 * It exits when stdin closes.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#define MAX_PAIRS 8
#define READ_CHUNK 65536
#define MAX_DEPTH 256

typedef enum {
  MODE_NONE, MODE_COUNT, MODE_SEND, MODE_REPLY, MODE_CLOSE, MODE_TRUNCATE,
  MODE_MALFORMED, MODE_OVERSIZE, MODE_EVENTS, MODE_DELAY, MODE_REFUSE,
} Mode;

static const char *const mode_names[] = {
  "none", "count", "send", "reply", "close", "truncate", "malformed",
  "oversize", "events", "delay", "refuse", NULL,
};

typedef struct {
  int from, to;
  char *buf;
  size_t len, cap;
  size_t parsed;          /* bytes of buf already fed to tok */
  json_tokener *tok;
  bool raw;               /* not JSON any more: forward as is */
} Dir;

/* The armed session: what to do at which command of the connections
 * accepted since "arm". */
typedef struct {
  bool active;
  Mode mode;
  unsigned n;
  pid_t pid;
  long arg;
  char *name;             /* count only commands of this name, or NULL */
  unsigned named;         /* commands of that name seen */
  unsigned count;         /* commands seen */
  unsigned connections;
  bool fired;
  char *cmds;             /* comma separated names, for the report */
  char *at;               /* name of command N */
} Session;

typedef struct {
  bool used;
  bool armed;             /* belongs to the session */
  Dir up;                 /* client -> QEMU */
  Dir down;               /* QEMU -> client */
  char *target_id;        /* JSON text of command N's id, if it came here */
  char *schema_ids;       /* ids of query-qmp-schema commands, as JSON */
  long long hold_until_ms;
} Pair;

static Pair pairs[MAX_PAIRS];
static Session sess;
static char *mask_name;
static const char *upstream_path;

static long long
now_ms (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (long long) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void __attribute__ ((format (printf, 1, 2)))
say (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vprintf (fmt, ap);
  va_end (ap);
  fflush (stdout);
}

static void *
xrealloc (void *p, size_t n)
{
  void *r = realloc (p, n);

  if (!r) {
    fprintf (stderr, "fault-proxy: out of memory\n");
    exit (1);
  }
  return r;
}

static char *
xstrdup (const char *s)
{
  char *r = strdup (s ? s : "");

  if (!r)
    exit (1);
  return r;
}

static void
append_str (char **dst, const char *sep, const char *s)
{
  size_t a = *dst ? strlen (*dst) : 0;
  size_t b = strlen (sep) + strlen (s);

  *dst = xrealloc (*dst, a + b + 1);
  if (a == 0)
    (*dst)[0] = '\0';
  strcat (*dst, a ? sep : "");
  strcat (*dst, s);
}

/* Blocking send of everything (the peers are local and read promptly); a
 * peer that went away is not our problem. */
static bool
send_all (int fd, const char *buf, size_t len)
{
  while (len > 0) {
    ssize_t n = send (fd, buf, len, MSG_NOSIGNAL);

    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return false;
    buf += n;
    len -= (size_t) n;
  }
  return true;
}

static void
dir_init (Dir *d, int from, int to)
{
  memset (d, 0, sizeof *d);
  d->from = from;
  d->to = to;
  d->tok = json_tokener_new_ex (MAX_DEPTH);
}

static void
dir_free (Dir *d)
{
  free (d->buf);
  if (d->tok)
    json_tokener_free (d->tok);
  memset (d, 0, sizeof *d);
}

static void
pair_close (Pair *p)
{
  if (!p->used)
    return;
  close (p->up.from);
  close (p->up.to);
  dir_free (&p->up);
  dir_free (&p->down);
  free (p->target_id);
  free (p->schema_ids);
  memset (p, 0, sizeof *p);
}

static void
kill_client (void)
{
  if (sess.pid > 0)
    kill (sess.pid, SIGKILL);
}

/* Report the session and let its connections pass through from now on. */
static void
session_end (bool report)
{
  if (report)
    say ("end commands=%u connections=%u fired=%d at=%s cmds=%s\n",
         sess.count, sess.connections, sess.fired, sess.at ? sess.at : "-",
         sess.cmds ? sess.cmds : "");
  for (int i = 0; i < MAX_PAIRS; i++) {
    pairs[i].armed = false;
    free (pairs[i].target_id);
    pairs[i].target_id = NULL;
  }
  free (sess.cmds);
  free (sess.at);
  free (sess.name);
  memset (&sess, 0, sizeof sess);
}

/* ---- schema masking --------------------------------------------------- */

static bool
named (json_object *o, const char *name)
{
  json_object *v;

  if (json_object_is_type (o, json_type_string))
    return strcmp (json_object_get_string (o), name) == 0;
  return json_object_is_type (o, json_type_object)
         && json_object_object_get_ex (o, "name", &v)
         && json_object_is_type (v, json_type_string)
         && strcmp (json_object_get_string (v), name) == 0;
}

static void
filter_array (json_object *arr, const char *name)
{
  for (size_t i = json_object_array_length (arr); i-- > 0;)
    if (named (json_object_array_get_idx (arr, i), name))
      json_object_array_del_idx (arr, i, 1);
}

/* Drop name from the schema: entities, enum values, object members. */
static void
mask_schema (json_object *ret, const char *name)
{
  filter_array (ret, name);
  for (size_t i = 0; i < json_object_array_length (ret); i++) {
    json_object *e = json_object_array_get_idx (ret, i), *v;

    if (json_object_object_get_ex (e, "values", &v)
        && json_object_is_type (v, json_type_array))
      filter_array (v, name);
    if (json_object_object_get_ex (e, "members", &v)
        && json_object_is_type (v, json_type_array))
      filter_array (v, name);
    if (json_object_object_get_ex (e, "variants", &v)
        && json_object_is_type (v, json_type_array)) {
      for (size_t j = json_object_array_length (v); j-- > 0;) {
        json_object *c, *var = json_object_array_get_idx (v, j);
        if (json_object_object_get_ex (var, "case", &c) && named (c, name))
          json_object_array_del_idx (v, j, 1);
      }
    }
  }
}

/* ---- faults on replies -------------------------------------------------- */

static void
inject_events (Pair *p)
{
  static const char *const odd[] = {
    "{\"event\": \"FAULT_PROXY_UNKNOWN\", \"data\": {\"x\": [1, 2, {}]}, "
    "\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n",
    "{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"id\": \"fleece-scsi0\", "
    "\"status\": \"concluded\"}, \"timestamp\": {\"seconds\": 1, "
    "\"microseconds\": 2}}\r\n",
    "{\"event\": \"BLOCK_JOB_COMPLETED\", \"data\": {\"device\": "
    "\"fleece-scsi0\", \"type\": \"backup\", \"len\": 1, \"offset\": 1, "
    "\"speed\": 0, \"error\": \"Permission denied\"}, \"timestamp\": "
    "{\"seconds\": 1, \"microseconds\": 2}}\r\n",
    "{\"event\": \"BLOCK_JOB_CANCELLED\", \"data\": {}}\r\n",
    "{\"event\": \"STOP\"}\r\n",
    "{\"event\": \"SHUTDOWN\", \"data\": null}\r\n",
    NULL,
  };
  char ev[256];

  for (size_t i = 0; odd[i]; i++)
    send_all (p->down.to, odd[i], strlen (odd[i]));
  /* More than the library queues: the oldest must be dropped, not kept. */
  for (int i = 0; i < 2000; i++) {
    int n = snprintf (ev, sizeof ev,
                      "{\"event\": \"FAULT_PROXY_FLOOD\", \"data\": "
                      "{\"n\": %d}, \"timestamp\": {\"seconds\": %d, "
                      "\"microseconds\": 0}}\n", i, i);
    send_all (p->down.to, ev, (size_t) n);
  }
}

static void
send_oversize (Pair *p)
{
  static const char head[] = "{\"return\": \"";
  static const char tail[] = "\"}\r\n";
  size_t total = (size_t) (sess.arg > 0 ? sess.arg : 17) * 1024 * 1024;
  char *chunk = xrealloc (NULL, 65536);

  memset (chunk, 'x', 65536);
  if (!send_all (p->down.to, head, sizeof head - 1))
    goto out;
  for (size_t sent = 0; sent < total; sent += 65536)
    if (!send_all (p->down.to, chunk, 65536))
      goto out;       /* the client gave up: what we want */
  send_all (p->down.to, tail, sizeof tail - 1);
 out:
  free (chunk);
}

/* ---- message handling ---------------------------------------------------- */

static const char *
jstr (json_object *o, const char *key)
{
  json_object *v;

  if (!json_object_object_get_ex (o, key, &v) || !v
      || !json_object_is_type (v, json_type_string))
    return NULL;
  return json_object_get_string (v);
}

static char *
id_text (json_object *msg)
{
  json_object *v;

  if (!json_object_object_get_ex (msg, "id", &v))
    return NULL;
  return xstrdup (json_object_to_json_string_ext (v, JSON_C_TO_STRING_PLAIN));
}

/* Answer msg with an error in QEMU's place. */
static bool
refuse (Pair *p, json_object *msg)
{
  char *id = id_text (msg);
  char *err = NULL;
  bool ok;

  append_str (&err, "", "{\"error\": {\"class\": \"GenericError\", "
              "\"desc\": \"fault-proxy: refused\"}");
  if (id) {
    append_str (&err, "", ", \"id\": ");
    append_str (&err, "", id);
  }
  append_str (&err, "", "}\r\n");
  ok = send_all (p->down.to, err, strlen (err));
  free (err);
  free (id);
  if (!ok)
    pair_close (p);
  return ok;
}

/* A message from the client.  Returns false when the pair is gone. */
static bool
client_message (Pair *p, json_object *msg, const char *bytes, size_t len)
{
  const char *cmd = jstr (msg, "execute");

  if (cmd && mask_name && strcmp (cmd, "query-qmp-schema") == 0) {
    char *id = id_text (msg);
    append_str (&p->schema_ids, " ", id ? id : "null");
    free (id);
  }
  if (cmd && p->armed) {
    bool hit;

    sess.count++;
    append_str (&sess.cmds, ",", cmd);
    if (sess.name) {
      hit = strcmp (cmd, sess.name) == 0
            && (++sess.named == sess.n || sess.n == 0);
      if (hit && sess.n == 0)
        sess.fired = false;     /* every one of them */
    } else
      hit = sess.count == sess.n;
    if (hit && !sess.at)
      sess.at = xstrdup (cmd);
    if (sess.mode != MODE_COUNT && hit && !sess.fired) {
      if (sess.mode == MODE_SEND) {
        sess.fired = true;
        kill_client ();
        pair_close (p);
        return false;
      }
      if (sess.mode == MODE_REFUSE) {
        sess.fired = true;
        return refuse (p, msg);
      }
      free (p->target_id);
      p->target_id = id_text (msg);
      if (!p->target_id)
        p->target_id = xstrdup ("(none)");
    }
  }
  if (!send_all (p->up.to, bytes, len)) {
    pair_close (p);
    return false;
  }
  return true;
}

/* id is JSON text: a string id keeps its quotes, so "fleece-2" does not
 * match "fleece-22". */
static bool
is_schema_reply (Pair *p, const char *id)
{
  return p->schema_ids && id && strstr (p->schema_ids, id);
}

typedef enum { GONE, FORWARDED, HOLD } Verdict;

/* A message from QEMU. */
static Verdict
qemu_message (Pair *p, json_object *msg, const char *bytes, size_t len)
{
  bool reply = json_object_object_get_ex (msg, "return", NULL)
               || json_object_object_get_ex (msg, "error", NULL);
  char *id = reply ? id_text (msg) : NULL;
  bool target = reply && p->target_id && !sess.fired
                && (strcmp (p->target_id, "(none)") == 0
                    || (id && strcmp (id, p->target_id) == 0));
  bool ok = true;

  if (reply && mask_name && is_schema_reply (p, id)) {
    json_object *ret;
    if (json_object_object_get_ex (msg, "return", &ret)
        && json_object_is_type (ret, json_type_array)) {
      const char *text;
      mask_schema (ret, mask_name);
      text = json_object_to_json_string_ext (msg, JSON_C_TO_STRING_PLAIN);
      ok = send_all (p->down.to, text, strlen (text))
           && send_all (p->down.to, "\r\n", 2);
      free (id);
      if (!ok)
        pair_close (p);
      return ok ? FORWARDED : GONE;
    }
  }
  free (id);

  if (!target) {
    if (!send_all (p->down.to, bytes, len)) {
      pair_close (p);
      return GONE;
    }
    return FORWARDED;
  }

  sess.fired = true;
  switch (sess.mode) {
  case MODE_REPLY:
    kill_client ();
    pair_close (p);
    return GONE;
  case MODE_CLOSE:
    pair_close (p);
    return GONE;
  case MODE_TRUNCATE:
    send_all (p->down.to, bytes, len / 2);
    pair_close (p);
    return GONE;
  case MODE_MALFORMED:
    {
      static const char bad[] = "{\"return\": {\"fault-proxy\": tru}}\r\n";
      ok = send_all (p->down.to, bad, sizeof bad - 1);
    }
    break;
  case MODE_OVERSIZE:
    send_oversize (p);
    break;
  case MODE_EVENTS:
    inject_events (p);
    ok = send_all (p->down.to, bytes, len);
    break;
  case MODE_DELAY:
    /* This reply and what follows wait in the buffer; see pump(). */
    p->hold_until_ms = now_ms () + (sess.arg > 0 ? sess.arg : 1000);
    return HOLD;
  default:
    ok = send_all (p->down.to, bytes, len);
    break;
  }
  /* Faulting every command of a name: wait for the next one. */
  if (sess.name && sess.n == 0) {
    free (p->target_id);
    p->target_id = NULL;
  }
  if (!ok) {
    pair_close (p);
    return GONE;
  }
  return FORWARDED;
}

/* Forward the complete messages buffered in d.  Returns false when the
 * pair is gone. */
static bool
pump (Pair *p, Dir *d, bool from_client)
{
  while (d->len > 0) {
    json_object *msg;
    enum json_tokener_error jerr;
    Verdict v;
    char *bytes;
    size_t end;

    if (!from_client && p->hold_until_ms) {
      if (now_ms () < p->hold_until_ms)
        return true;
      p->hold_until_ms = 0;
    }
    if (d->raw) {
      if (!send_all (d->to, d->buf, d->len)) {
        pair_close (p);
        return false;
      }
      d->len = 0;
      return true;
    }
    if (d->parsed == d->len)
      return true;
    msg = json_tokener_parse_ex (d->tok, d->buf + d->parsed,
                                 (int) (d->len - d->parsed));
    jerr = json_tokener_get_error (d->tok);
    if (!msg && jerr == json_tokener_continue) {
      d->parsed = d->len;
      return true;
    }
    if (!msg || !json_object_is_type (msg, json_type_object)) {
      /* Not QMP: pass it on and let the other side complain. */
      json_object_put (msg);
      d->raw = true;
      continue;
    }
    end = d->parsed + json_tokener_get_parse_end (d->tok);
    json_tokener_reset (d->tok);
    d->parsed = 0;
    /* The message's bytes leave the buffer before the handler runs, so
     * the handler may close the pair (which frees the buffer). */
    bytes = xrealloc (NULL, end);
    memcpy (bytes, d->buf, end);
    memmove (d->buf, d->buf + end, d->len - end);
    d->len -= end;
    if (from_client)
      v = client_message (p, msg, bytes, end) ? FORWARDED : GONE;
    else
      v = qemu_message (p, msg, bytes, end);
    if (v == HOLD) {
      /* Back in front of the buffer, parsed again when the time comes
       * (fired is set, so then it just passes). */
      if (d->cap < d->len + end) {
        d->cap = d->len + end;
        d->buf = xrealloc (d->buf, d->cap);
      }
      memmove (d->buf + end, d->buf, d->len);
      memcpy (d->buf, bytes, end);
      d->len += end;
    }
    json_object_put (msg);
    free (bytes);
    if (v == GONE)
      return false;
  }
  return true;
}

static bool
read_into (Pair *p, Dir *d, bool from_client)
{
  ssize_t n;

  if (d->cap - d->len < READ_CHUNK) {
    d->cap = d->len + READ_CHUNK;
    d->buf = xrealloc (d->buf, d->cap);
  }
  n = recv (d->from, d->buf + d->len, READ_CHUNK, 0);
  if (n < 0 && (errno == EINTR || errno == EAGAIN))
    return true;
  if (n <= 0) {
    /* Either side gone: the other sees the end too. */
    pump (p, d, from_client);
    if (p->used)
      pair_close (p);
    return false;
  }
  d->len += (size_t) n;
  return pump (p, d, from_client);
}

/* ---- sockets and control -------------------------------------------------- */

static int
unix_socket (const char *path, bool listen_on)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

  if (fd < 0 || strlen (path) >= sizeof sun.sun_path)
    return -1;
  strcpy (sun.sun_path, path);
  if (listen_on) {
    unlink (path);
    if (bind (fd, (struct sockaddr *) &sun, sizeof sun) < 0
        || listen (fd, 8) < 0) {
      close (fd);
      return -1;
    }
  } else if (connect (fd, (struct sockaddr *) &sun, sizeof sun) < 0) {
    close (fd);
    return -1;
  }
  return fd;
}

static void
accept_client (int lfd)
{
  int c = accept4 (lfd, NULL, NULL, SOCK_CLOEXEC);
  int u;
  Pair *p = NULL;

  if (c < 0)
    return;
  for (int i = 0; i < MAX_PAIRS && !p; i++)
    if (!pairs[i].used)
      p = &pairs[i];
  u = p ? unix_socket (upstream_path, false) : -1;
  if (u < 0) {
    /* QEMU is gone: so is the client's connection, as it would be. */
    close (c);
    return;
  }
  memset (p, 0, sizeof *p);
  p->used = true;
  dir_init (&p->up, c, u);
  dir_init (&p->down, u, c);
  if (sess.active) {
    p->armed = true;
    sess.connections++;
  }
}

static void
control (char *line)
{
  char mode[32], name[256];
  unsigned n;
  long pid, arg = 0;

  if (sscanf (line, "arm %31s %u %ld %ld %255s", mode, &n, &pid, &arg, name) >= 3) {
    Mode m = MODE_NONE;

    for (int i = 1; mode_names[i]; i++)
      if (strcmp (mode, mode_names[i]) == 0)
        m = (Mode) i;
    if (m == MODE_NONE) {
      say ("error unknown mode %s\n", mode);
      return;
    }
    session_end (false);
    sess.active = true;
    sess.mode = m;
    sess.n = n;
    sess.pid = (pid_t) pid;
    sess.arg = arg;
    if (sscanf (line, "arm %*s %*u %*d %*d %255s", name) == 1)
      sess.name = xstrdup (name);
    say ("armed\n");
  } else if (strcmp (line, "end") == 0) {
    session_end (true);
  } else if (sscanf (line, "mask %255s", name) == 1) {
    free (mask_name);
    mask_name = xstrdup (name);
    say ("masked\n");
  } else if (strncmp (line, "unmask", 6) == 0) {
    free (mask_name);
    mask_name = NULL;
    say ("unmasked\n");
  } else {
    say ("error %s\n", line);
  }
}

int
main (int argc, char **argv)
{
  static char cbuf[4096];
  size_t clen = 0;
  int lfd;

  if (argc != 3) {
    fprintf (stderr, "usage: fault-proxy LISTEN_SOCKET UPSTREAM_SOCKET\n");
    return 2;
  }
  /* A test that dies must not leave us behind. */
  prctl (PR_SET_PDEATHSIG, SIGTERM);
  signal (SIGPIPE, SIG_IGN);
  upstream_path = argv[2];
  lfd = unix_socket (argv[1], true);
  if (lfd < 0) {
    fprintf (stderr, "fault-proxy: cannot listen on %s: %s\n", argv[1],
             strerror (errno));
    return 1;
  }
  say ("ready\n");

  for (;;) {
    struct pollfd pfd[2 + 2 * MAX_PAIRS];
    Pair *owner[2 + 2 * MAX_PAIRS];
    Dir *dirs[2 + 2 * MAX_PAIRS];
    int nfd = 0, timeout = -1;
    long long now = now_ms ();

    pfd[nfd++] = (struct pollfd) { .fd = 0, .events = POLLIN };
    pfd[nfd++] = (struct pollfd) { .fd = lfd, .events = POLLIN };
    for (int i = 0; i < MAX_PAIRS; i++) {
      Pair *p = &pairs[i];

      if (!p->used)
        continue;
      if (p->hold_until_ms) {
        long long left = p->hold_until_ms - now;
        int ms = left < 0 ? 0 : (int) left;
        timeout = timeout < 0 ? ms : (ms < timeout ? ms : timeout);
      }
      owner[nfd] = p;
      dirs[nfd] = &p->up;
      pfd[nfd++] = (struct pollfd) { .fd = p->up.from, .events = POLLIN };
      owner[nfd] = p;
      dirs[nfd] = &p->down;
      pfd[nfd++] = (struct pollfd) { .fd = p->down.from, .events = POLLIN };
    }
    if (poll (pfd, (nfds_t) nfd, timeout) < 0) {
      if (errno == EINTR)
        continue;
      return 1;
    }
    /* Held replies whose time has come. */
    for (int i = 0; i < MAX_PAIRS; i++)
      if (pairs[i].used && pairs[i].hold_until_ms
          && now_ms () >= pairs[i].hold_until_ms)
        pump (&pairs[i], &pairs[i].down, false);

    if (pfd[0].revents) {
      ssize_t n = read (0, cbuf + clen, sizeof cbuf - 1 - clen);
      char *nl;

      if (n <= 0)
        return 0;
      clen += (size_t) n;
      cbuf[clen] = '\0';
      while ((nl = strchr (cbuf, '\n'))) {
        *nl = '\0';
        control (cbuf);
        memmove (cbuf, nl + 1, clen - (size_t) (nl + 1 - cbuf) + 1);
        clen -= (size_t) (nl + 1 - cbuf);
      }
      if (clen == sizeof cbuf - 1)
        clen = 0;
    }
    if (pfd[1].revents & POLLIN)
      accept_client (lfd);
    for (int i = 2; i < nfd; i++) {
      Pair *p = owner[i];

      /* An earlier fd of this round may have closed the pair. */
      if (!p->used || dirs[i]->from != pfd[i].fd || !pfd[i].revents)
        continue;
      read_into (p, dirs[i], dirs[i] == &p->up);
    }
  }
}
