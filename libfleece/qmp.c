/* QMP transport: one blocking connection to a QMP monitor.
 *
 * The socket is read in chunks and fed to a json_tokener that lives as long
 * as the connection, so a message may arrive in any number of pieces and
 * several messages may share one read; the newline QEMU puts after each
 * message is only whitespace to us.  A message that grows beyond the size
 * limit stops the reading before json-c buffers more of it, and the
 * connection is then closed, because the rest of the stream cannot be
 * framed any more.  The same holds for malformed JSON and I/O errors: such
 * a connection is "broken", and every later call fails with the error that
 * broke it instead of hanging on a stream in an unknown state.
 *
 * Replies carry the "id" we sent.  Anything else read while waiting for a
 * reply is either an event (queued, oldest dropped beyond the bound) or a
 * late reply to a command that already timed out (ignored).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"

G_DEFINE_QUARK (fleece-qmp-error-quark, fleece_qmp_error)

/* Deep enough for any reply QEMU sends (nested backing chains in
 * query-block), shallow enough to bound the tokener's stack. */
#define QMP_MAX_DEPTH 256
#define QMP_READ_CHUNK 65536

struct FleeceQmp {
  int fd;
  bool connected;          /* greeting read and capabilities negotiated */
  int timeout_ms;
  int greeting_timeout_ms;
  int cancel_fd;           /* -1, or readable when waits must give up */
  size_t max_message;

  json_tokener *tok;
  size_t msg_bytes;        /* bytes of the current message fed so far */
  guint8 *rbuf;            /* read but not yet fed to the tokener */
  size_t rpos, rlen;

  GQueue events;           /* json_object* */
  unsigned next_id;
  unsigned round_trips;
  int major, minor, micro;
  char *last_class;
  char *last_desc;

  /* Set once the connection cannot be used any more. */
  int broken_code;
  char *broken_msg;
};

FleeceQmp *
fleece_qmp_new (void)
{
  FleeceQmp *q = g_new0 (FleeceQmp, 1);

  q->fd = -1;
  q->timeout_ms = FLEECE_QMP_DEFAULT_TIMEOUT_MS;
  q->greeting_timeout_ms = FLEECE_QMP_DEFAULT_GREETING_TIMEOUT_MS;
  q->cancel_fd = -1;
  q->max_message = FLEECE_QMP_DEFAULT_MAX_MESSAGE;
  q->tok = json_tokener_new_ex (QMP_MAX_DEPTH);
  /* Strict: QEMU emits standard JSON, so anything json-c would merely
   * tolerate (comments, single quotes) means we are not talking to QMP.
   * Not JSON_TOKENER_VALIDATE_UTF8: json-c 0.16 rejects a valid multi-byte
   * character split between two reads. */
  json_tokener_set_flags (q->tok, JSON_TOKENER_STRICT
                          | JSON_TOKENER_ALLOW_TRAILING_CHARS);
  q->rbuf = g_malloc (QMP_READ_CHUNK);
  g_queue_init (&q->events);
  return q;
}

static void
clear_events (FleeceQmp *q)
{
  json_object *ev;

  while ((ev = g_queue_pop_head (&q->events)))
    json_object_put (ev);
}

static void
close_fd (FleeceQmp *q)
{
  if (q->fd >= 0)
    close (q->fd);
  q->fd = -1;
}

/* Forget everything about a previous connection. */
static void
reset_connection (FleeceQmp *q)
{
  close_fd (q);
  q->connected = false;
  json_tokener_reset (q->tok);
  q->msg_bytes = 0;
  q->rpos = q->rlen = 0;
  clear_events (q);
  q->next_id = 0;
  q->round_trips = 0;
  q->major = q->minor = q->micro = 0;
  g_clear_pointer (&q->last_class, g_free);
  g_clear_pointer (&q->last_desc, g_free);
  q->broken_code = 0;
  g_clear_pointer (&q->broken_msg, g_free);
}

void
fleece_qmp_free (FleeceQmp *q)
{
  if (!q)
    return;
  reset_connection (q);
  json_tokener_free (q->tok);
  g_free (q->rbuf);
  g_free (q);
}

void
fleece_qmp_set_timeout (FleeceQmp *q, int timeout_ms)
{
  q->timeout_ms = timeout_ms;
}

void
fleece_qmp_set_max_message (FleeceQmp *q, size_t bytes)
{
  q->max_message = bytes ? bytes : FLEECE_QMP_DEFAULT_MAX_MESSAGE;
}

void
fleece_qmp_set_greeting_timeout (FleeceQmp *q, int timeout_ms)
{
  q->greeting_timeout_ms = timeout_ms;
}

void
fleece_qmp_set_cancel_fd (FleeceQmp *q, int fd)
{
  q->cancel_fd = fd;
}

/* Record err as the reason the connection is unusable and close it, so
 * that QEMU's monitor is released and a writer on the other side does not
 * block on a full socket buffer. */
static void
mark_broken (FleeceQmp *q, const GError *err)
{
  if (q->broken_msg)
    return;
  q->broken_code = err->code;
  q->broken_msg = g_strdup (err->message);
  close_fd (q);
}

static bool
check_usable (FleeceQmp *q, GError **err)
{
  if (q->broken_msg) {
    g_set_error (err, FLEECE_QMP_ERROR, q->broken_code,
                 "QMP connection unusable after an earlier error: %s",
                 q->broken_msg);
    return false;
  }
  if (q->fd < 0 || !q->connected) {
    g_set_error_literal (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_IO,
                         "QMP connection is not connected");
    return false;
  }
  return true;
}

/* ---- deadlines and raw I/O ----------------------------------------- */

/* A deadline in monotonic microseconds; -1 for none. */
static gint64
deadline_after (int timeout_ms)
{
  if (timeout_ms < 0)
    return -1;
  return g_get_monotonic_time () + (gint64) timeout_ms * 1000;
}

/* Wait until fd is ready for events or the deadline passes, giving up
 * when cancel_fd (if >= 0) is readable.  Returns 1 when ready, 0 on
 * timeout, -2 when cancelled, -1 with errno on error. */
static int
wait_fd (int fd, short events, gint64 deadline, int cancel_fd)
{
  for (;;) {
    struct pollfd pfd[2] = {
      { .fd = fd, .events = events },
      { .fd = cancel_fd, .events = POLLIN },
    };
    int ms = -1;
    int r;

    if (deadline >= 0) {
      gint64 left = deadline - g_get_monotonic_time ();
      /* Round up so that we do not spin with 0 ms polls just before the
       * deadline. */
      ms = left <= 0 ? 0 : (int) MIN ((left + 999) / 1000, G_MAXINT);
    }
    r = poll (pfd, cancel_fd >= 0 ? 2 : 1, ms);
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0)
      return -1;
    if (cancel_fd >= 0 && pfd[1].revents)
      return -2;
    if (r == 0)
      return 0;
    return 1;
  }
}

static void
set_cancelled (GError **err, const char *what)
{
  g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_CANCELLED,
               "cancelled %s", what);
}

/* *sent tells how much went out, so that a timeout before the first byte
 * need not break the connection. */
/* Send buf[off..len) once the socket takes it; with pass_fd >= 0 the
 * first bytes carry that fd (SCM_RIGHTS), as QMP's getfd and add-fd
 * expect. */
static ssize_t
send_some (int fd, const char *buf, size_t len, int pass_fd)
{
  union {
    char buf[CMSG_SPACE (sizeof (int))];
    struct cmsghdr align;
  } control;
  struct iovec iov = { .iov_base = (void *) buf, .iov_len = len };
  struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
  struct cmsghdr *cmsg;

  if (pass_fd < 0)
    return send (fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
  memset (&control, 0, sizeof control);
  msg.msg_control = control.buf;
  msg.msg_controllen = sizeof control.buf;
  cmsg = CMSG_FIRSTHDR (&msg);
  cmsg->cmsg_level = SOL_SOCKET;
  cmsg->cmsg_type = SCM_RIGHTS;
  cmsg->cmsg_len = CMSG_LEN (sizeof (int));
  memcpy (CMSG_DATA (cmsg), &pass_fd, sizeof (int));
  return sendmsg (fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
}

static bool
send_all (FleeceQmp *q, const char *command, const char *buf, size_t len,
          int pass_fd, gint64 deadline, size_t *sent, GError **err)
{
  size_t off = 0;

  *sent = 0;

  while (off < len) {
    ssize_t n;
    int r = wait_fd (q->fd, POLLOUT, deadline, q->cancel_fd);

    if (r == -2) {
      g_autofree char *what = g_strdup_printf ("while sending '%s'", command);
      set_cancelled (err, what);
      return false;
    }
    if (r < 0) {
      g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_IO,
                   "QMP poll failed while sending '%s': %s", command,
                   g_strerror (errno));
      return false;
    }
    if (r == 0) {
      g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_TIMEOUT,
                   "timed out sending '%s' to QMP", command);
      return false;
    }
    /* MSG_NOSIGNAL: a peer that went away must be an error, not SIGPIPE. */
    n = send_some (q->fd, buf + off, len - off, off == 0 ? pass_fd : -1);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
        continue;
      if (errno == EPIPE || errno == ECONNRESET)
        g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_EOF,
                     "QMP connection closed by QEMU while sending '%s'",
                     command);
      else
        g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_IO,
                     "QMP write of '%s' failed: %s", command,
                     g_strerror (errno));
      return false;
    }
    off += (size_t) n;
    *sent = off;
  }
  return true;
}

/* ---- reading messages ---------------------------------------------- */

/* Feed buffered bytes to the tokener.  Returns a complete message, or NULL
 * with *err unset when more bytes are needed, or NULL with *err set. */
static json_object *
parse_buffered (FleeceQmp *q, const char *waiting_for, GError **err)
{
  while (q->rpos < q->rlen) {
    const char *p = (const char *) q->rbuf + q->rpos;
    size_t avail = q->rlen - q->rpos;
    size_t n;
    json_object *obj;
    enum json_tokener_error jerr;

    /* Whitespace between messages belongs to no message. */
    if (q->msg_bytes == 0 && g_ascii_isspace (*p)) {
      q->rpos++;
      continue;
    }
    if (q->msg_bytes >= q->max_message) {
      g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_TOO_LARGE,
                   "QMP message %s exceeds the limit of %zu bytes",
                   waiting_for, q->max_message);
      return NULL;
    }
    /* Never hand json-c more than the limit allows, so its buffers stay
     * bounded by max_message. */
    n = MIN (avail, q->max_message - q->msg_bytes);
    n = MIN (n, (size_t) G_MAXINT);
    obj = json_tokener_parse_ex (q->tok, p, (int) n);
    jerr = json_tokener_get_error (q->tok);
    if (obj) {
      size_t used = json_tokener_get_parse_end (q->tok);

      json_tokener_reset (q->tok);
      q->rpos += used;
      q->msg_bytes = 0;
      if (!json_object_is_type (obj, json_type_object)) {
        g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_PROTOCOL,
                     "unexpected QMP message %s: not a JSON object: %.200s",
                     waiting_for, json_object_to_json_string (obj));
        json_object_put (obj);
        return NULL;
      }
      return obj;
    }
    if (jerr != json_tokener_continue) {
      g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_PROTOCOL,
                   "malformed JSON from QMP %s: %s", waiting_for,
                   json_tokener_error_desc (jerr));
      return NULL;
    }
    q->rpos += n;
    q->msg_bytes += n;
  }
  return NULL;
}

/* Read one message.  Returns NULL with err set; on timeout (code TIMEOUT)
 * the connection stays usable, any other error breaks it.  waiting_for
 * words the error messages ("while waiting for the reply to 'x'"). */
static json_object *
read_message (FleeceQmp *q, gint64 deadline, int timeout_ms,
              const char *waiting_for, GError **err)
{
  for (;;) {
    GError *local = NULL;
    json_object *obj = parse_buffered (q, waiting_for, &local);
    ssize_t n;
    int r;

    if (obj)
      return obj;
    if (local) {
      mark_broken (q, local);
      g_propagate_error (err, local);
      return NULL;
    }

    q->rpos = q->rlen = 0;
    r = wait_fd (q->fd, POLLIN, deadline, q->cancel_fd);
    if (r == -2) {
      set_cancelled (err, waiting_for);
      return NULL;
    }
    if (r == 0) {
      g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_TIMEOUT,
                   "timed out after %d ms %s", timeout_ms, waiting_for);
      return NULL;
    }
    if (r > 0) {
      n = recv (q->fd, q->rbuf, QMP_READ_CHUNK, MSG_DONTWAIT);
      if (n > 0) {
        q->rlen = (size_t) n;
        continue;
      }
      if (n == 0) {
        local = g_error_new (FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_EOF,
                             "QMP connection closed by QEMU %s", waiting_for);
        mark_broken (q, local);
        g_propagate_error (err, local);
        return NULL;
      }
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
        continue;
    }
    local = g_error_new (FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_IO,
                         "QMP read failed %s: %s", waiting_for,
                         g_strerror (errno));
    mark_broken (q, local);
    g_propagate_error (err, local);
    return NULL;
  }
}

static const char *
event_name (json_object *msg)
{
  json_object *ev;

  if (json_object_object_get_ex (msg, "event", &ev)
      && json_object_is_type (ev, json_type_string))
    return json_object_get_string (ev);
  return NULL;
}

static void
queue_event (FleeceQmp *q, json_object *ev)
{
  /* Nobody waits for most events; keeping the newest ones bounds memory
   * while the ones a caller is about to wait for stay. */
  while (g_queue_get_length (&q->events) >= FLEECE_QMP_MAX_QUEUED_EVENTS) {
    json_object *old = g_queue_pop_head (&q->events);

    g_debug ("QMP event queue full, dropping %s", event_name (old));
    json_object_put (old);
  }
  g_queue_push_tail (&q->events, ev);
}

static bool
event_matches (json_object *ev, FleeceQmpEventMatch match, void *opaque)
{
  json_object *data = NULL;

  if (!match)
    return true;
  json_object_object_get_ex (ev, "data", &data);
  return match (event_name (ev), data, opaque);
}

/* ---- connecting ----------------------------------------------------- */

static bool
negotiate (FleeceQmp *q, GError **err)
{
  g_autoptr (json_object) greeting = NULL;
  json_object *qmp, *version, *qemu, *v;
  json_object *ret;
  GError *local = NULL;
  gint64 deadline = deadline_after (q->greeting_timeout_ms);

  /* QEMU (10.0 at least) may send an event before the greeting: a monitor
   * stays in command mode after its client leaves, and an event emitted
   * between accepting the next client and greeting it goes out first.
   * Connecting per call makes that common: skip such events. */
  while ((greeting = read_message (q, deadline, q->greeting_timeout_ms,
                                   "while waiting for the QMP greeting", &local))
         && event_name (greeting))
    g_clear_pointer (&greeting, json_object_put);
  if (!greeting && local->code == FLEECE_QMP_ERROR_TIMEOUT) {
    /* QEMU greets at once; a socket that accepts and stays silent is a
     * monitor serving another client, which has us queued. */
    g_clear_error (&local);
    local = g_error_new (FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_BUSY,
                         "another client holds the QMP monitor (it accepted "
                         "the connection but sent no greeting within %d ms)",
                         q->greeting_timeout_ms);
  }
  if (!greeting) {
    /* A greeting that never comes leaves the stream in an unknown state. */
    mark_broken (q, local);
    g_propagate_error (err, local);
    return false;
  }
  if (!json_object_object_get_ex (greeting, "QMP", &qmp)
      || !json_object_is_type (qmp, json_type_object)) {
    local = g_error_new (FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_PROTOCOL,
                         "expected the QMP greeting, got: %.200s",
                         json_object_to_json_string (greeting));
    mark_broken (q, local);
    g_propagate_error (err, local);
    return false;
  }
  if (json_object_object_get_ex (qmp, "version", &version)
      && json_object_object_get_ex (version, "qemu", &qemu)) {
    if (json_object_object_get_ex (qemu, "major", &v))
      q->major = json_object_get_int (v);
    if (json_object_object_get_ex (qemu, "minor", &v))
      q->minor = json_object_get_int (v);
    if (json_object_object_get_ex (qemu, "micro", &v))
      q->micro = json_object_get_int (v);
  }

  q->connected = true;
  ret = fleece_qmp_execute (q, "qmp_capabilities", NULL, err);
  if (!ret) {
    q->connected = false;
    return false;
  }
  json_object_put (ret);
  return true;
}

bool
fleece_qmp_connect_fd (FleeceQmp *q, int fd, GError **err)
{
  reset_connection (q);
  q->fd = fd;
  if (fd < 0) {
    g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_IO,
                 "invalid QMP file descriptor %d", fd);
    return false;
  }
  return negotiate (q, err);
}

bool
fleece_qmp_connect_unix (FleeceQmp *q, const char *path, GError **err)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  size_t len = strlen (path);
  gint64 deadline;
  int fd;

  reset_connection (q);
  if (len >= sizeof sun.sun_path) {
    g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_IO,
                 "QMP socket path is too long (%zu bytes, at most %zu): %s",
                 len, sizeof sun.sun_path - 1, path);
    return false;
  }
  memcpy (sun.sun_path, path, len + 1);

  /* Non-blocking: a monitor whose listen backlog is full (clients queued
   * behind the one it serves) refuses with EAGAIN instead of accepting,
   * and a blocking connect() would then wait without a bound. */
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_IO,
                 "cannot create a unix socket: %s", g_strerror (errno));
    return false;
  }
  deadline = deadline_after (q->greeting_timeout_ms);
  while (connect (fd, (struct sockaddr *) &sun, sizeof sun) < 0) {
    int e = errno;
    int r = 0;

    if (e == EINTR)
      continue;
    if (e == EAGAIN && (deadline < 0 || g_get_monotonic_time () < deadline)) {
      /* Sleep 50 ms, or until cancelled. */
      r = wait_fd (-1, 0, MIN (deadline_after (50), deadline < 0 ? G_MAXINT64 : deadline),
                   q->cancel_fd);
      if (r != -2)
        continue;
    }
    close (fd);
    if (r == -2)
      set_cancelled (err, "while connecting to the QMP socket");
    else if (e == EAGAIN)
      g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_BUSY,
                   "another client holds the QMP monitor %s (its queue of "
                   "waiting connections is full)", path);
    else
      /* Distinguished so that cleanup can tell "QEMU is gone" from "QEMU
       * is there but does not answer". */
      g_set_error (err, FLEECE_QMP_ERROR,
                   e == ENOENT || e == ECONNREFUSED ? FLEECE_QMP_ERROR_NO_PEER
                                                    : FLEECE_QMP_ERROR_IO,
                   "cannot connect to QMP socket %s: %s", path, g_strerror (e));
    return false;
  }
  q->fd = fd;
  return negotiate (q, err);
}

bool
fleece_qmp_is_connected (FleeceQmp *q)
{
  return q && q->connected && q->fd >= 0 && !q->broken_msg;
}

void
fleece_qmp_get_version (FleeceQmp *q, int *major, int *minor, int *micro)
{
  if (major)
    *major = q->major;
  if (minor)
    *minor = q->minor;
  if (micro)
    *micro = q->micro;
}

/* ---- commands ------------------------------------------------------- */

static bool
reply_id_is (json_object *msg, const char *id, bool *has_id)
{
  json_object *v;

  *has_id = json_object_object_get_ex (msg, "id", &v);
  return *has_id && json_object_is_type (v, json_type_string)
         && strcmp (json_object_get_string (v), id) == 0;
}

/* Commands whose reply the library walks as an array (QAPI says so): any
 * other reply is the peer's error, reported here, not an assertion in
 * json-c's array functions later. */
static bool
returns_array (const char *command)
{
  static const char *const commands[] = {
    "query-block", "query-named-block-nodes", "query-jobs", "query-iothreads",
    "query-qmp-schema", "backup-access-setup", NULL,
  };

  return g_strv_contains (commands, command);
}

static json_object *
handle_reply (FleeceQmp *q, const char *command, json_object *msg,
              GError **err)
{
  json_object *ret, *error, *v;
  const char *cls = "GenericError";
  const char *desc = "(no description)";

  if (json_object_object_get_ex (msg, "return", &ret)) {
    if (!ret) {
      g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_PROTOCOL,
                   "%s: QMP reply has a null return value", command);
      return NULL;
    }
    if (returns_array (command) && !json_object_is_type (ret, json_type_array)) {
      g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_PROTOCOL,
                   "%s: expected an array in the QMP reply, got %.200s", command,
                   json_object_to_json_string (ret));
      return NULL;
    }
    return json_object_get (ret);
  }

  json_object_object_get_ex (msg, "error", &error);
  if (json_object_object_get_ex (error, "class", &v)
      && json_object_is_type (v, json_type_string))
    cls = json_object_get_string (v);
  if (json_object_object_get_ex (error, "desc", &v)
      && json_object_is_type (v, json_type_string))
    desc = json_object_get_string (v);
  g_free (q->last_class);
  g_free (q->last_desc);
  q->last_class = g_strdup (cls);
  q->last_desc = g_strdup (desc);
  g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_COMMAND, "%s: %s",
               command, desc);
  return NULL;
}

static json_object *
execute (FleeceQmp *q, const char *command, json_object *args, int pass_fd,
         int timeout_ms, GError **err)
{
  g_autoptr (json_object) req = NULL;
  g_autofree char *id = NULL;
  g_autofree char *waiting_for = NULL;
  g_autoptr (GString) line = NULL;
  GError *local = NULL;
  gint64 deadline;
  size_t sent;

  if (!check_usable (q, err)) {
    json_object_put (args);
    return NULL;
  }

  if (timeout_ms < 0)
    timeout_ms = q->timeout_ms;
  deadline = deadline_after (timeout_ms);
  id = g_strdup_printf ("fleece-%u", ++q->next_id);
  req = json_object_new_object ();
  json_object_object_add (req, "execute", json_object_new_string (command));
  if (args)
    json_object_object_add (req, "arguments", args);
  json_object_object_add (req, "id", json_object_new_string (id));

  line = g_string_new (json_object_to_json_string_ext (
                         req, JSON_C_TO_STRING_PLAIN
                         | JSON_C_TO_STRING_NOSLASHESCAPE));
  g_string_append_c (line, '\n');
  if (!send_all (q, command, line->str, line->len, pass_fd, deadline, &sent,
                 &local)) {
    /* Half a command on the wire cannot be taken back: QEMU would read
     * the next one as its continuation. */
    if (sent > 0 || local->code != FLEECE_QMP_ERROR_TIMEOUT)
      mark_broken (q, local);
    g_propagate_error (err, local);
    return NULL;
  }
  q->round_trips++;

  waiting_for = g_strdup_printf ("while waiting for the reply to '%s'",
                                 command);
  for (;;) {
    g_autoptr (json_object) msg = read_message (q, deadline, timeout_ms,
                                              waiting_for, err);
    bool has_id;

    if (!msg)
      return NULL;
    if (event_name (msg)) {
      queue_event (q, g_steal_pointer (&msg));
      continue;
    }
    if (!json_object_object_get_ex (msg, "return", NULL)
        && !json_object_object_get_ex (msg, "error", NULL)) {
      g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_PROTOCOL,
                   "unexpected QMP message %s: %.200s", waiting_for,
                   json_object_to_json_string (msg));
      return NULL;
    }
    if (reply_id_is (msg, id, &has_id))
      return handle_reply (q, command, msg, err);
    /* QEMU answers without an id only when it could not even parse the
     * request (so the id was lost): that error is about the command in
     * flight.  Replies with another id are late answers to commands that
     * timed out. */
    if (!has_id && json_object_object_get_ex (msg, "error", NULL))
      return handle_reply (q, command, msg, err);
    g_debug ("ignoring QMP reply for another command: %.200s",
             json_object_to_json_string (msg));
  }
}

json_object *
fleece_qmp_execute_timeout (FleeceQmp *q, const char *command,
                            json_object *args, int timeout_ms, GError **err)
{
  return execute (q, command, args, -1, timeout_ms, err);
}

json_object *
fleece_qmp_execute (FleeceQmp *q, const char *command, json_object *args,
                    GError **err)
{
  return execute (q, command, args, -1, -1, err);
}

json_object *
fleece_qmp_execute_fd (FleeceQmp *q, const char *command, json_object *args,
                       int fd, GError **err)
{
  return execute (q, command, args, fd, -1, err);
}

char *
fleece_qmp_hmp (FleeceQmp *q, const char *command_line, GError **err)
{
  g_autoptr (json_object) args = json_object_new_object ();
  g_autoptr (json_object) ret = NULL;

  json_object_object_add (args, "command-line",
                          json_object_new_string (command_line));
  ret = fleece_qmp_execute (q, "human-monitor-command",
                            g_steal_pointer (&args), err);
  if (!ret)
    return NULL;
  if (!json_object_is_type (ret, json_type_string)) {
    g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_PROTOCOL,
                 "human-monitor-command: expected a string, got %.200s",
                 json_object_to_json_string (ret));
    return NULL;
  }
  return g_strdup (json_object_get_string (ret));
}

/* ---- events --------------------------------------------------------- */

json_object *
fleece_qmp_take_event (FleeceQmp *q, FleeceQmpEventMatch match, void *opaque)
{
  for (GList *l = q->events.head; l; l = l->next) {
    json_object *ev = l->data;

    if (event_matches (ev, match, opaque)) {
      g_queue_delete_link (&q->events, l);
      return ev;
    }
  }
  return NULL;
}

json_object *
fleece_qmp_wait_event (FleeceQmp *q, FleeceQmpEventMatch match, void *opaque,
                       int timeout_ms, GError **err)
{
  json_object *ev = fleece_qmp_take_event (q, match, opaque);
  gint64 deadline;

  if (ev)
    return ev;
  if (!check_usable (q, err))
    return NULL;

  deadline = deadline_after (timeout_ms);
  for (;;) {
    g_autoptr (json_object) msg = read_message (q, deadline, timeout_ms,
                                              "while waiting for an event",
                                              err);

    if (!msg)
      return NULL;
    if (!event_name (msg)) {
      /* A late reply to a command that timed out. */
      g_debug ("ignoring QMP message while waiting for an event: %.200s",
               json_object_to_json_string (msg));
      continue;
    }
    if (event_matches (msg, match, opaque))
      return g_steal_pointer (&msg);
    queue_event (q, g_steal_pointer (&msg));
  }
}

size_t
fleece_qmp_queued_events (FleeceQmp *q)
{
  return g_queue_get_length (&q->events);
}

const char *
fleece_qmp_last_error_class (FleeceQmp *q)
{
  return q->last_class;
}

const char *
fleece_qmp_last_error_desc (FleeceQmp *q)
{
  return q->last_desc;
}

unsigned
fleece_qmp_round_trips (FleeceQmp *q)
{
  return q->round_trips;
}
