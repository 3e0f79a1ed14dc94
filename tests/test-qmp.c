/* Unit tests of the QMP transport (qmp.c) and of the handle's connection
 * per call (conn.c) against a scripted peer.
 *
 * Each test runs a script in a thread on the other end of a socketpair (or
 * of a unix socket for connect_unix).  The script reads the client's
 * requests as JSON and answers with exact bytes, so framing, ids, events
 * and failures can be staged precisely.  The peer never calls Check (its
 * assertions would fire in the wrong thread); it records the first failure
 * and the test asserts on it after joining.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <check.h>

#include "internal.h"
#include "testlib.h"

#define PEER_READ_TIMEOUT_MS 5000

typedef json_object TJson;
G_DEFINE_AUTOPTR_CLEANUP_FUNC (TJson, json_object_put)

typedef struct Peer Peer;
typedef void (*PeerScript) (Peer *p);

struct Peer {
  int fd;                 /* the peer's end */
  int listen_fd;          /* accept fd from this first, if >= 0 */
  int client_fd;          /* the client's end (socketpair only) */
  PeerScript script;
  GThread *thread;
  char *failure;
  json_tokener *tok;
  char rbuf[4096];
  size_t rpos, rlen;
  GPtrArray *ids;         /* ids of all requests read */
  json_object *last_args; /* arguments of the last request */
  const void *data;       /* per test */
  GMutex lock;            /* "go": the client lets a script go on */
  GCond cond;
  bool go;
};

/* The client tells the peer to go on (p_wait_go) at a point of its own
 * choosing, so that a script's timing never depends on how fast the
 * client runs (valgrind makes it slow). */
static void
p_let_go (Peer *p)
{
  g_mutex_lock (&p->lock);
  p->go = true;
  g_cond_signal (&p->cond);
  g_mutex_unlock (&p->lock);
}

static void
p_wait_go (Peer *p)
{
  g_mutex_lock (&p->lock);
  while (!p->go)
    g_cond_wait (&p->cond, &p->lock);
  p->go = false;
  g_mutex_unlock (&p->lock);
}

static void G_GNUC_PRINTF (2, 3)
p_fail (Peer *p, const char *fmt, ...)
{
  va_list ap;

  if (p->failure)
    return;
  va_start (ap, fmt);
  p->failure = g_strdup_vprintf (fmt, ap);
  va_end (ap);
}

/* Send bytes; returns false if the client went away. */
static bool
p_send_len (Peer *p, const char *buf, size_t len)
{
  size_t off = 0;

  while (off < len) {
    ssize_t n = send (p->fd, buf + off, len - off, MSG_NOSIGNAL);

    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return false;
    off += (size_t) n;
  }
  return true;
}

static void
p_send (Peer *p, const char *text)
{
  if (!p_send_len (p, text, strlen (text)))
    p_fail (p, "peer: send failed: %s", g_strerror (errno));
}

static void G_GNUC_PRINTF (2, 3)
p_sendf (Peer *p, const char *fmt, ...)
{
  g_autofree char *text = NULL;
  va_list ap;

  va_start (ap, fmt);
  text = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  p_send (p, text);
}

/* Read the next request; NULL at EOF or on failure (recorded). */
static json_object *
p_read (Peer *p)
{
  for (;;) {
    struct pollfd pfd = { .fd = p->fd, .events = POLLIN };
    ssize_t n;

    while (p->rpos < p->rlen) {
      json_object *obj = json_tokener_parse_ex (p->tok, p->rbuf + p->rpos,
                                                (int) (p->rlen - p->rpos));
      enum json_tokener_error e = json_tokener_get_error (p->tok);

      if (obj) {
        p->rpos += json_tokener_get_parse_end (p->tok);
        json_tokener_reset (p->tok);
        return obj;
      }
      if (e != json_tokener_continue) {
        p_fail (p, "peer: client sent bad JSON: %s",
                json_tokener_error_desc (e));
        return NULL;
      }
      p->rpos = p->rlen;
    }
    p->rpos = p->rlen = 0;
    if (poll (&pfd, 1, PEER_READ_TIMEOUT_MS) == 0) {
      p_fail (p, "peer: no request within %d ms", PEER_READ_TIMEOUT_MS);
      return NULL;
    }
    n = recv (p->fd, p->rbuf, sizeof p->rbuf, 0);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return NULL;
    p->rlen = (size_t) n;
  }
}

/* Read a request for command; returns its id (g_free) or NULL. */
static char *
p_expect (Peer *p, const char *command)
{
  g_autoptr (TJson) req = p_read (p);
  json_object *v;

  if (!req) {
    p_fail (p, "peer: EOF while expecting '%s'", command);
    return NULL;
  }
  if (!json_object_object_get_ex (req, "execute", &v)
      || strcmp (json_object_get_string (v), command) != 0) {
    p_fail (p, "peer: expected '%s', got %s", command,
            json_object_to_json_string (req));
    return NULL;
  }
  if (!json_object_object_get_ex (req, "id", &v)
      || !json_object_is_type (v, json_type_string)) {
    p_fail (p, "peer: request without a string id: %s",
            json_object_to_json_string (req));
    return NULL;
  }
  g_ptr_array_add (p->ids, g_strdup (json_object_get_string (v)));
  json_object_put (p->last_args);
  p->last_args = NULL;
  if (json_object_object_get_ex (req, "arguments", &v))
    p->last_args = json_object_get (v);
  return g_strdup (p->ids->pdata[p->ids->len - 1]);
}

#define GREETING \
  "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 3, \"minor\": 1, " \
  "\"major\": 10}, \"package\": \"test\"}, \"capabilities\": [\"oob\"]}}\r\n"

static void
p_greet (Peer *p)
{
  g_autofree char *id = NULL;

  p_send (p, GREETING);
  id = p_expect (p, "qmp_capabilities");
  if (id)
    p_sendf (p, "{\"return\": {}, \"id\": \"%s\"}\r\n", id);
}

static gpointer
peer_thread (gpointer data)
{
  Peer *p = data;

  if (p->listen_fd >= 0) {
    struct pollfd pfd = { .fd = p->listen_fd, .events = POLLIN };

    if (poll (&pfd, 1, PEER_READ_TIMEOUT_MS) <= 0) {
      p_fail (p, "peer: nobody connected");
      return NULL;
    }
    p->fd = accept (p->listen_fd, NULL, NULL);
    if (p->fd < 0) {
      p_fail (p, "peer: accept: %s", g_strerror (errno));
      return NULL;
    }
  }
  p->script (p);
  /* The client sees EOF from here on. */
  close (p->fd);
  p->fd = -1;
  return NULL;
}

static Peer *
peer_new (PeerScript script, const void *data)
{
  Peer *p = g_new0 (Peer, 1);

  p->fd = p->listen_fd = p->client_fd = -1;
  p->script = script;
  p->data = data;
  p->tok = json_tokener_new ();
  p->ids = g_ptr_array_new_with_free_func (g_free);
  g_mutex_init (&p->lock);
  g_cond_init (&p->cond);
  return p;
}

/* A peer on a socketpair; p->client_fd is the client's end. */
static Peer *
peer_start (PeerScript script, const void *data)
{
  Peer *p = peer_new (script, data);
  int sv[2];

  ck_assert_int_eq (socketpair (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv),
                    0);
  p->client_fd = sv[0];
  p->fd = sv[1];
  p->thread = g_thread_new ("qmp-peer", peer_thread, p);
  return p;
}

/* Join the peer and fail the test if its script failed. */
static void
peer_finish (Peer *p)
{
  g_autofree char *failure = NULL;

  g_thread_join (p->thread);
  failure = g_steal_pointer (&p->failure);
  if (p->listen_fd >= 0)
    close (p->listen_fd);
  json_tokener_free (p->tok);
  json_object_put (p->last_args);
  g_ptr_array_unref (p->ids);
  g_mutex_clear (&p->lock);
  g_cond_clear (&p->cond);
  g_free (p);
  ck_assert_msg (failure == NULL, "%s", failure);
}

static FleeceQmp *
connect_peer (Peer *p)
{
  g_autoptr (GError) err = NULL;
  FleeceQmp *q = fleece_qmp_new ();

  ck_assert_msg (fleece_qmp_connect_fd (q, p->client_fd, &err), "%s",
                 err ? err->message : "");
  return q;
}

static gint64
now_ms (void)
{
  return g_get_monotonic_time () / 1000;
}

static bool
match_name (const char *event, json_object *data, void *opaque)
{
  return strcmp (event, opaque) == 0;
}

/* ---- negotiation ----------------------------------------------------- */

static void
script_negotiation (Peer *p)
{
  g_autofree char *id = NULL;

  p_greet (p);
  if (p->last_args)
    p_fail (p, "peer: qmp_capabilities has arguments");
  id = p_expect (p, "query-status");
  if (id)
    p_sendf (p, "{\"return\": {\"status\": \"prelaunch\"}, \"id\": \"%s\"}\n",
             id);
  id = (g_free (id), p_expect (p, "query-status"));
  if (id)
    p_sendf (p, "{\"return\": {\"status\": \"paused\"}, \"id\": \"%s\"}\n",
             id);
  if (p->ids->len == 3) {
    if (strcmp (p->ids->pdata[0], "fleece-1") != 0
        || strcmp (p->ids->pdata[1], "fleece-2") != 0
        || strcmp (p->ids->pdata[2], "fleece-3") != 0)
      p_fail (p, "peer: ids %s %s %s", (char *) p->ids->pdata[0],
              (char *) p->ids->pdata[1], (char *) p->ids->pdata[2]);
  }
}

START_TEST (test_negotiation)
{
  Peer *p = peer_start (script_negotiation, NULL);
  g_autoptr (FleeceQmp) q = fleece_qmp_new ();
  g_autoptr (GError) err = NULL;
  g_autoptr (TJson) r1 = NULL;
  g_autoptr (TJson) r2 = NULL;
  json_object *v;
  int major = -1, minor = -1, micro = -1;

  ck_assert (!fleece_qmp_is_connected (q));
  ck_assert (fleece_qmp_connect_fd (q, p->client_fd, &err));
  ck_assert (fleece_qmp_is_connected (q));
  fleece_qmp_get_version (q, &major, &minor, &micro);
  ck_assert_int_eq (major, 10);
  ck_assert_int_eq (minor, 1);
  ck_assert_int_eq (micro, 3);
  /* qmp_capabilities is a command sent, too. */
  ck_assert_uint_eq (fleece_qmp_round_trips (q), 1);

  r1 = fleece_qmp_execute (q, "query-status", NULL, &err);
  ck_assert_msg (r1 != NULL, "%s", err ? err->message : "");
  ck_assert (json_object_object_get_ex (r1, "status", &v));
  ck_assert_str_eq (json_object_get_string (v), "prelaunch");
  r2 = fleece_qmp_execute (q, "query-status", NULL, &err);
  ck_assert (r2 != NULL);
  ck_assert (json_object_object_get_ex (r2, "status", &v));
  ck_assert_str_eq (json_object_get_string (v), "paused");
  ck_assert_uint_eq (fleece_qmp_round_trips (q), 3);
  peer_finish (p);
}
END_TEST

static void
script_bad_greeting (Peer *p)
{
  p_send (p, "{\"return\": {}}\n");
  /* The client must not send anything before a greeting. */
  if (p_read (p))
    p_fail (p, "peer: client sent a request after a bad greeting");
}

START_TEST (test_bad_greeting)
{
  Peer *p = peer_start (script_bad_greeting, NULL);
  g_autoptr (FleeceQmp) q = fleece_qmp_new ();
  g_autoptr (GError) err = NULL;
  g_autoptr (GError) err2 = NULL;

  ck_assert (!fleece_qmp_connect_fd (q, p->client_fd, &err));
  ck_assert (g_error_matches (err, FLEECE_QMP_ERROR,
                              FLEECE_QMP_ERROR_PROTOCOL));
  ck_assert_msg (strstr (err->message, "greeting"), "%s", err->message);
  ck_assert (!fleece_qmp_is_connected (q));
  /* The failed connection was closed: the peer sees EOF. */
  peer_finish (p);
  ck_assert_ptr_null (fleece_qmp_execute (q, "query-status", NULL, &err2));
  ck_assert (g_error_matches (err2, FLEECE_QMP_ERROR,
                              FLEECE_QMP_ERROR_PROTOCOL));
  ck_assert_msg (strstr (err2->message, "unusable"), "%s", err2->message);
}
END_TEST

static void
script_capabilities_refused (Peer *p)
{
  g_autofree char *id = NULL;

  p_send (p, GREETING);
  id = p_expect (p, "qmp_capabilities");
  if (id)
    p_sendf (p, "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": "
             "\"Capabilities negotiation is already complete\"}, "
             "\"id\": \"%s\"}\n", id);
}

START_TEST (test_capabilities_refused)
{
  Peer *p = peer_start (script_capabilities_refused, NULL);
  g_autoptr (FleeceQmp) q = fleece_qmp_new ();
  g_autoptr (GError) err = NULL;

  ck_assert (!fleece_qmp_connect_fd (q, p->client_fd, &err));
  ck_assert (g_error_matches (err, FLEECE_QMP_ERROR,
                              FLEECE_QMP_ERROR_COMMAND));
  ck_assert_str_eq (err->message, "qmp_capabilities: Capabilities "
                    "negotiation is already complete");
  ck_assert (!fleece_qmp_is_connected (q));
  peer_finish (p);
}
END_TEST

static void
script_greet_and_status (Peer *p)
{
  g_autofree char *id = NULL;

  p_greet (p);
  id = p_expect (p, "query-status");
  if (id)
    p_sendf (p, "{\"return\": {\"status\": \"running\"}, \"id\": \"%s\"}\n",
             id);
}

START_TEST (test_connect_unix)
{
  g_autofree char *dir = tl_tmpdir_new ("qmp-unix");
  g_autofree char *path = g_build_filename (dir, "qmp.sock", NULL);
  g_autofree char *missing = g_build_filename (dir, "missing.sock", NULL);
  g_autofree char *longpath = NULL;
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  g_autoptr (FleeceQmp) q = fleece_qmp_new ();
  g_autoptr (GError) err = NULL;
  g_autoptr (TJson) ret = NULL;
  Peer *p = peer_new (script_greet_and_status, NULL);

  /* Errors first: a path that does not fit sun_path, a missing socket. */
  longpath = g_strnfill (sizeof sun.sun_path, 'x');
  ck_assert (!fleece_qmp_connect_unix (q, longpath, &err));
  ck_assert (g_error_matches (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_IO));
  ck_assert_msg (strstr (err->message, "too long"), "%s", err->message);
  g_clear_error (&err);
  ck_assert (!fleece_qmp_connect_unix (q, missing, &err));
  /* Nobody listens: told apart from other I/O errors (QEMU is gone). */
  ck_assert (g_error_matches (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_NO_PEER));
  ck_assert_msg (strstr (err->message, missing)
                 && strstr (err->message, g_strerror (ENOENT)), "%s",
                 err->message);
  g_clear_error (&err);

  p->listen_fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ck_assert_int_ge (p->listen_fd, 0);
  g_strlcpy (sun.sun_path, path, sizeof sun.sun_path);
  ck_assert_int_eq (bind (p->listen_fd, (struct sockaddr *) &sun, sizeof sun),
                    0);
  ck_assert_int_eq (listen (p->listen_fd, 1), 0);
  p->thread = g_thread_new ("qmp-peer", peer_thread, p);

  ck_assert_msg (fleece_qmp_connect_unix (q, path, &err), "%s",
                 err ? err->message : "");
  ck_assert (fleece_qmp_is_connected (q));
  ret = fleece_qmp_execute (q, "query-status", NULL, &err);
  ck_assert_msg (ret != NULL, "%s", err ? err->message : "");
  peer_finish (p);
  tl_tmpdir_free (g_steal_pointer (&dir));
}
END_TEST

/* ---- ids and events ------------------------------------------------- */

static void
script_id_matching (Peer *p)
{
  g_autofree char *id = NULL;
  json_object *v;

  p_greet (p);
  id = p_expect (p, "query-block");
  if (!id)
    return;
  /* The arguments arrive intact, quoting included. */
  if (!json_object_object_get_ex (p->last_args, "device", &v)
      || strcmp (json_object_get_string (v), "a\"b\\c\n/d") != 0)
    p_fail (p, "peer: bad arguments %s",
            json_object_to_json_string (p->last_args));
  p_send (p, "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, "
          "\"event\": \"EV_A\", \"data\": {\"n\": 1}}\n");
  p_send (p, "{\"event\": \"EV_B\", \"data\": {\"n\": 2}, "
          "\"timestamp\": {\"seconds\": 1, \"microseconds\": 3}}\n");
  p_send (p, "{\"return\": {\"wrong\": true}, \"id\": \"other-7\"}\n");
  p_send (p, "{\"return\": {\"wrong\": true}, \"id\": 2}\n");
  p_send (p, "{\"event\": \"EV_A\", \"data\": {\"n\": 3}, "
          "\"timestamp\": {\"seconds\": 1, \"microseconds\": 4}}\n");
  p_sendf (p, "{\"return\": [{\"device\": \"drive-scsi0\"}], \"id\": \"%s\"}\n",
           id);
  /* One event without data, sent once the client has seen that nothing
   * is readable yet, for wait_event. */
  p_wait_go (p);
  p_send (p, "{\"event\": \"EV_C\", "
          "\"timestamp\": {\"seconds\": 2, \"microseconds\": 0}}\n");
  p_send (p, "{\"event\": \"EV_D\", \"data\": {}, "
          "\"timestamp\": {\"seconds\": 2, \"microseconds\": 1}}\n");
  /* Keep the connection open until the client is done. */
  if (p_read (p))
    p_fail (p, "peer: unexpected request");
}

static int
event_n (json_object *ev)
{
  json_object *data, *n;

  ck_assert (json_object_object_get_ex (ev, "data", &data));
  ck_assert (json_object_object_get_ex (data, "n", &n));
  return json_object_get_int (n);
}

static const char *
event_of (json_object *ev)
{
  json_object *v;

  ck_assert (json_object_object_get_ex (ev, "event", &v));
  return json_object_get_string (v);
}

START_TEST (test_id_matching_and_events)
{
  Peer *p = peer_start (script_id_matching, NULL);
  g_autoptr (FleeceQmp) q = connect_peer (p);
  g_autoptr (GError) err = NULL;
  g_autoptr (TJson) ret = NULL;
  g_autoptr (TJson) ev1 = NULL;
  g_autoptr (TJson) ev2 = NULL;
  g_autoptr (TJson) ev3 = NULL;
  g_autoptr (TJson) ev4 = NULL;
  g_autoptr (TJson) ev5 = NULL;
  json_object *v;
  gint64 t0;

  ret = fleece_qmp_execute (q, "query-block",
                            tl_json ("{\"device\": \"a\\\"b\\\\c\\n/d\"}"),
                            &err);
  ck_assert_msg (ret != NULL, "%s", err ? err->message : "");
  ck_assert (json_object_is_type (ret, json_type_array));
  ck_assert_int_eq (json_object_array_length (ret), 1);
  ck_assert (json_object_object_get_ex (json_object_array_get_idx (ret, 0),
                                        "device", &v));
  ck_assert_str_eq (json_object_get_string (v), "drive-scsi0");

  /* The events that came before the reply are queued in order. */
  ck_assert_uint_eq (fleece_qmp_queued_events (q), 3);
  ck_assert_ptr_null (fleece_qmp_take_event (q, match_name, "EV_C"));
  ev1 = fleece_qmp_take_event (q, match_name, "EV_B");
  ck_assert_ptr_nonnull (ev1);
  ck_assert_int_eq (event_n (ev1), 2);
  ck_assert (json_object_object_get_ex (ev1, "timestamp", NULL));
  ck_assert_uint_eq (fleece_qmp_queued_events (q), 2);
  ev2 = fleece_qmp_take_event (q, match_name, "EV_A");
  ck_assert_int_eq (event_n (ev2), 1);
  ev3 = fleece_qmp_take_event (q, NULL, NULL);
  ck_assert_str_eq (event_of (ev3), "EV_A");
  ck_assert_int_eq (event_n (ev3), 3);
  ck_assert_uint_eq (fleece_qmp_queued_events (q), 0);

  /* Nothing readable yet: timeout 0 returns at once. */
  t0 = now_ms ();
  ck_assert_ptr_null (fleece_qmp_wait_event (q, match_name, "EV_D", 0, &err));
  ck_assert (g_error_matches (err, FLEECE_QMP_ERROR,
                              FLEECE_QMP_ERROR_TIMEOUT));
  ck_assert_int_lt (now_ms () - t0, 500);
  g_clear_error (&err);
  p_let_go (p);

  /* EV_C arrives first and is queued while we wait for EV_D. */
  ev4 = fleece_qmp_wait_event (q, match_name, "EV_D", 2000, &err);
  ck_assert_msg (ev4 != NULL, "%s", err ? err->message : "");
  ck_assert_str_eq (event_of (ev4), "EV_D");
  ck_assert_uint_eq (fleece_qmp_queued_events (q), 1);
  ev5 = fleece_qmp_wait_event (q, match_name, "EV_C", 0, &err);
  ck_assert_ptr_nonnull (ev5);
  ck_assert (!json_object_object_get_ex (ev5, "data", NULL));

  /* No more events: a bounded wait times out after about its timeout. */
  t0 = now_ms ();
  ck_assert_ptr_null (fleece_qmp_wait_event (q, NULL, NULL, 150, &err));
  ck_assert (g_error_matches (err, FLEECE_QMP_ERROR,
                              FLEECE_QMP_ERROR_TIMEOUT));
  ck_assert_int_ge (now_ms () - t0, 145);
  ck_assert_int_lt (now_ms () - t0, 1000);
  ck_assert (fleece_qmp_is_connected (q));

  g_clear_pointer (&q, fleece_qmp_free);
  peer_finish (p);
}
END_TEST

/* ---- error replies ---------------------------------------------------- */

static void
script_error_reply (Peer *p)
{
  g_autofree char *id = NULL;

  p_greet (p);
  id = p_expect (p, "blockdev-del");
  if (id)
    p_sendf (p, "{\"id\": \"%s\", \"error\": {\"class\": \"DeviceNotFound\", "
             "\"desc\": \"Failed to find node with node-name='x'\"}}\n", id);
  g_free (id);
  id = p_expect (p, "query-status");
  if (id)
    p_sendf (p, "{\"return\": {}, \"id\": \"%s\"}\n", id);
  g_free (id);
  /* QEMU answers without an id when it could not parse the request. */
  id = p_expect (p, "query-name");
  if (id)
    p_send (p, "{\"return\": {\"stray\": true}}\n"
            "{\"error\": {\"class\": \"GenericError\", \"desc\": "
            "\"JSON parse error, invalid keyword 'x'\"}}\n");
}

START_TEST (test_error_reply)
{
  Peer *p = peer_start (script_error_reply, NULL);
  g_autoptr (FleeceQmp) q = connect_peer (p);
  g_autoptr (GError) err = NULL;
  g_autoptr (TJson) ret = NULL;

  ck_assert_ptr_null (fleece_qmp_last_error_class (q));
  ck_assert_ptr_null (fleece_qmp_last_error_desc (q));
  ck_assert_ptr_null (fleece_qmp_execute (q, "blockdev-del",
                                          tl_json ("{\"node-name\": \"x\"}"),
                                          &err));
  ck_assert (g_error_matches (err, FLEECE_QMP_ERROR,
                              FLEECE_QMP_ERROR_COMMAND));
  ck_assert_str_eq (err->message,
                    "blockdev-del: Failed to find node with node-name='x'");
  ck_assert_str_eq (fleece_qmp_last_error_class (q), "DeviceNotFound");
  ck_assert_str_eq (fleece_qmp_last_error_desc (q),
                    "Failed to find node with node-name='x'");
  /* An error reply leaves the connection usable. */
  ck_assert (fleece_qmp_is_connected (q));
  ret = fleece_qmp_execute (q, "query-status", NULL, NULL);
  ck_assert_ptr_nonnull (ret);
  /* An error without an id is about the request in flight (a reply
   * without an id and no error is not). */
  g_clear_error (&err);
  ck_assert_ptr_null (fleece_qmp_execute (q, "query-name", NULL, &err));
  ck_assert (g_error_matches (err, FLEECE_QMP_ERROR,
                              FLEECE_QMP_ERROR_COMMAND));
  ck_assert_str_eq (err->message,
                    "query-name: JSON parse error, invalid keyword 'x'");
  ck_assert_str_eq (fleece_qmp_last_error_class (q), "GenericError");
  peer_finish (p);
}
END_TEST

/* ---- timeouts --------------------------------------------------------- */

static void
script_timeout (Peer *p)
{
  g_autofree char *id1 = NULL;
  g_autofree char *id2 = NULL;
  g_autofree char *id3 = NULL;

  p_greet (p);
  id1 = p_expect (p, "slow-1");
  id2 = p_expect (p, "slow-2");
  id3 = p_expect (p, "fast");
  if (!id1 || !id2 || !id3)
    return;
  /* Late replies to the commands that timed out come first. */
  p_sendf (p, "{\"return\": \"stale-1\", \"id\": \"%s\"}\n", id1);
  p_sendf (p, "{\"return\": \"stale-2\", \"id\": \"%s\"}\n", id2);
  p_sendf (p, "{\"return\": \"fresh\", \"id\": \"%s\"}\n", id3);
}

START_TEST (test_timeout)
{
  Peer *p = peer_start (script_timeout, NULL);
  g_autoptr (FleeceQmp) q = connect_peer (p);
  g_autoptr (GError) err = NULL;
  g_autoptr (TJson) ret = NULL;
  gint64 t0, dt;

  fleece_qmp_set_timeout (q, 300);
  t0 = now_ms ();
  ck_assert_ptr_null (fleece_qmp_execute (q, "slow-1", NULL, &err));
  dt = now_ms () - t0;
  ck_assert (g_error_matches (err, FLEECE_QMP_ERROR,
                              FLEECE_QMP_ERROR_TIMEOUT));
  ck_assert_msg (strstr (err->message, "'slow-1'"), "%s", err->message);
  ck_assert_int_ge (dt, 295);
  ck_assert_int_lt (dt, 1500);
  g_clear_error (&err);

  /* A per-call timeout overrides the connection's. */
  fleece_qmp_set_timeout (q, 5000);
  t0 = now_ms ();
  ck_assert_ptr_null (fleece_qmp_execute_timeout (q, "slow-2", NULL, 100,
                                                  &err));
  dt = now_ms () - t0;
  ck_assert (g_error_matches (err, FLEECE_QMP_ERROR,
                              FLEECE_QMP_ERROR_TIMEOUT));
  ck_assert_int_ge (dt, 95);
  ck_assert_int_lt (dt, 2000);
  g_clear_error (&err);

  /* The connection survives a timeout; late replies are not mistaken for
   * the answer to the next command. */
  ck_assert (fleece_qmp_is_connected (q));
  ret = fleece_qmp_execute_timeout (q, "fast", NULL, 2000, &err);
  ck_assert_msg (ret != NULL, "%s", err ? err->message : "");
  ck_assert_str_eq (json_object_get_string (ret), "fresh");
  ck_assert_uint_eq (fleece_qmp_round_trips (q), 4);
  peer_finish (p);
}
END_TEST

/* ---- broken connections --------------------------------------------- */

static void
script_eof_mid_reply (Peer *p)
{
  g_autofree char *id = NULL;

  p_greet (p);
  id = p_expect (p, "query-block");
  if (id)
    p_sendf (p, "{\"id\": \"%s\", \"return\": [{\"device\": \"drive-", id);
}

START_TEST (test_eof_mid_reply)
{
  Peer *p = peer_start (script_eof_mid_reply, NULL);
  g_autoptr (FleeceQmp) q = connect_peer (p);
  g_autoptr (GError) err = NULL;
  g_autoptr (GError) err2 = NULL;
  g_autoptr (GError) err3 = NULL;
  gint64 t0 = now_ms ();

  ck_assert_ptr_null (fleece_qmp_execute (q, "query-block", NULL, &err));
  ck_assert (g_error_matches (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_EOF));
  ck_assert_str_eq (err->message, "QMP connection closed by QEMU while "
                    "waiting for the reply to 'query-block'");
  ck_assert (!fleece_qmp_is_connected (q));
  /* Later calls fail at once, naming the cause. */
  ck_assert_ptr_null (fleece_qmp_execute (q, "query-status", NULL, &err2));
  ck_assert (g_error_matches (err2, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_EOF));
  ck_assert_msg (strstr (err2->message, "closed by QEMU"), "%s",
                 err2->message);
  ck_assert_ptr_null (fleece_qmp_wait_event (q, NULL, NULL, -1, &err3));
  ck_assert (g_error_matches (err3, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_EOF));
  ck_assert_int_lt (now_ms () - t0, 1000);
  peer_finish (p);
}
END_TEST

typedef struct {
  const char *bytes;
  const char *expect;     /* in the error message */
} GarbageCase;

static const GarbageCase garbage_cases[] = {
  { "this is not json\n", "malformed JSON" },
  { "{\"return\": {}, \"id\": }\n", "malformed JSON" },
  { "[1, 2, 3]\n", "not a JSON object" },
  { "\xff\xfe{}\n", "malformed JSON" },
  { "\"just a string\"\n", "not a JSON object" },
  { "\0\0\0\n", "malformed JSON" },
};

static void
script_garbage (Peer *p)
{
  const GarbageCase *c = p->data;
  g_autofree char *id = NULL;

  p_greet (p);
  id = p_expect (p, "query-status");
  if (id)
    p_send_len (p, c->bytes, c->bytes[0] ? strlen (c->bytes) : 4);
  /* The client closes the connection: EOF. */
  if (p_read (p))
    p_fail (p, "peer: request after garbage");
}

START_TEST (test_garbage)
{
  const GarbageCase *c = &garbage_cases[_i];
  Peer *p = peer_start (script_garbage, c);
  g_autoptr (FleeceQmp) q = connect_peer (p);
  g_autoptr (GError) err = NULL;
  g_autoptr (GError) err2 = NULL;

  ck_assert_ptr_null (fleece_qmp_execute (q, "query-status", NULL, &err));
  ck_assert_msg (g_error_matches (err, FLEECE_QMP_ERROR,
                                  FLEECE_QMP_ERROR_PROTOCOL), "%s",
                 err->message);
  ck_assert_msg (strstr (err->message, c->expect), "%s", err->message);
  ck_assert (!fleece_qmp_is_connected (q));
  ck_assert_ptr_null (fleece_qmp_execute (q, "query-status", NULL, &err2));
  ck_assert (g_error_matches (err2, FLEECE_QMP_ERROR,
                              FLEECE_QMP_ERROR_PROTOCOL));
  /* The peer sees EOF without the client being freed: it was closed. */
  peer_finish (p);
}
END_TEST

/* ---- size limit ------------------------------------------------------ */

#define SMALL_MAX 65536

/* A reply exactly len bytes long (without the newline). */
static char *
reply_of_size (const char *id, size_t len)
{
  g_autofree char *head = g_strdup_printf ("{\"id\": \"%s\", \"return\": \"",
                                           id);
  const char *tail = "\"}\n";
  size_t pad = len - strlen (head) - 2;
  g_autofree char *fill = g_strnfill (pad, 'x');

  return g_strconcat (head, fill, tail, NULL);
}

static void
script_limit_boundary (Peer *p)
{
  g_autofree char *id = NULL;
  g_autofree char *reply = NULL;

  p_greet (p);
  id = p_expect (p, "exactly-max");
  if (!id)
    return;
  reply = reply_of_size (id, SMALL_MAX);
  p_send (p, reply);
  g_free (id);
  g_free (reply);
  id = p_expect (p, "one-more");
  if (!id)
    return;
  reply = reply_of_size (id, SMALL_MAX + 1);
  p_send_len (p, reply, strlen (reply));
}

START_TEST (test_limit_boundary)
{
  Peer *p = peer_start (script_limit_boundary, NULL);
  g_autoptr (FleeceQmp) q = connect_peer (p);
  g_autoptr (GError) err = NULL;
  g_autoptr (TJson) ret = NULL;

  fleece_qmp_set_max_message (q, SMALL_MAX);
  ret = fleece_qmp_execute (q, "exactly-max", NULL, &err);
  ck_assert_msg (ret != NULL, "%s", err ? err->message : "");
  ck_assert (json_object_is_type (ret, json_type_string));
  ck_assert_int_gt (json_object_get_string_len (ret), SMALL_MAX - 64);
  ck_assert_ptr_null (fleece_qmp_execute (q, "one-more", NULL, &err));
  ck_assert (g_error_matches (err, FLEECE_QMP_ERROR,
                              FLEECE_QMP_ERROR_TOO_LARGE));
  ck_assert (!fleece_qmp_is_connected (q));
  peer_finish (p);
}
END_TEST

static void
script_huge (Peer *p)
{
  g_autofree char *id = NULL;
  g_autofree char *reply = NULL;

  p_greet (p);
  p_send (p, "{\"event\": \"BEFORE\", \"data\": {}, "
          "\"timestamp\": {\"seconds\": 1, \"microseconds\": 0}}\n");
  id = p_expect (p, "query-block");
  if (!id)
    return;
  reply = reply_of_size (id, 1024 * 1024);
  /* The client gives up after 64 KiB and closes: this send then fails
   * with EPIPE instead of blocking on a full socket. */
  if (p_send_len (p, reply, strlen (reply)))
    p_fail (p, "peer: the client read the whole 1 MiB message");
}

START_TEST (test_too_large)
{
  Peer *p = peer_start (script_huge, NULL);
  g_autoptr (FleeceQmp) q = connect_peer (p);
  g_autoptr (GError) err = NULL;
  g_autoptr (GError) err2 = NULL;
  g_autoptr (GError) err3 = NULL;
  g_autoptr (TJson) ev = NULL;
  gint64 t0 = now_ms ();

  fleece_qmp_set_max_message (q, SMALL_MAX);
  ck_assert_ptr_null (fleece_qmp_execute (q, "query-block", NULL, &err));
  ck_assert (g_error_matches (err, FLEECE_QMP_ERROR,
                              FLEECE_QMP_ERROR_TOO_LARGE));
  ck_assert_msg (strstr (err->message, "65536")
                 && strstr (err->message, "'query-block'"), "%s",
                 err->message);
  ck_assert (!fleece_qmp_is_connected (q));

  /* Unusable from now on: later calls fail at once with the cause. */
  ck_assert_ptr_null (fleece_qmp_execute (q, "query-status", NULL, &err2));
  ck_assert (g_error_matches (err2, FLEECE_QMP_ERROR,
                              FLEECE_QMP_ERROR_TOO_LARGE));
  ck_assert_msg (strstr (err2->message, "unusable"), "%s", err2->message);
  ck_assert_ptr_null (fleece_qmp_wait_event (q, match_name, "X", -1, &err3));
  ck_assert (g_error_matches (err3, FLEECE_QMP_ERROR,
                              FLEECE_QMP_ERROR_TOO_LARGE));
  ck_assert_int_lt (now_ms () - t0, 2000);
  /* Events read before the failure are still there. */
  ev = fleece_qmp_take_event (q, match_name, "BEFORE");
  ck_assert_ptr_nonnull (ev);
  peer_finish (p);
}
END_TEST

/* ---- framing ---------------------------------------------------------- */

static void
send_in_pieces (Peer *p, const char *text, size_t piece, int delay_us)
{
  size_t len = strlen (text);

  for (size_t off = 0; off < len; off += piece) {
    if (!p_send_len (p, text + off, MIN (piece, len - off))) {
      p_fail (p, "peer: send failed");
      return;
    }
    g_usleep (delay_us);
  }
}

static void
script_framing (Peer *p)
{
  g_autofree char *id = NULL;
  g_autofree char *text = NULL;

  p_greet (p);
  id = p_expect (p, "query-a");
  if (!id)
    return;
  /* Four messages without separators, one byte per write. */
  text = g_strdup_printf (
    "{\"event\":\"E1\",\"data\":{\"n\":1},\"timestamp\":{\"seconds\":1,"
    "\"microseconds\":0}}"
    "{\"return\":{\"x\":0},\"id\":\"not-ours\"}"
    "{\"event\":\"E2\",\"data\":{\"n\":2},\"timestamp\":{\"seconds\":1,"
    "\"microseconds\":1}}"
    "{\"return\":{\"text\":\"caf\xc3\xa9 \\\"q\\\" \\u00fc\\n\"},"
    "\"id\":\"%s\"}", id);
  send_in_pieces (p, text, 1, 200);
  g_free (id);
  g_free (text);

  /* A reply and the next event in one write, the reply split in 3-byte
   * pieces first. */
  id = p_expect (p, "query-b");
  if (!id)
    return;
  text = g_strdup_printf ("  \r\n{\"id\": \"%s\", \"return\": [1, 2, "
                          "{\"deep\": [[[[\"v\"]]]]}]}", id);
  send_in_pieces (p, text, 3, 300);
  p_send (p, "\n{\"event\": \"E3\", \"data\": {\"n\": 3}, \"timestamp\": "
          "{\"seconds\": 2, \"microseconds\": 0}}\n{\"event\": \"E4\", "
          "\"data\": {\"n\": 4}, \"timestamp\": {\"seconds\": 2, "
          "\"microseconds\": 1}}\n");
  if (p_read (p))
    p_fail (p, "peer: unexpected request");
}

START_TEST (test_framing)
{
  Peer *p = peer_start (script_framing, NULL);
  g_autoptr (FleeceQmp) q = connect_peer (p);
  g_autoptr (GError) err = NULL;
  g_autoptr (TJson) ra = NULL;
  g_autoptr (TJson) rb = NULL;
  g_autoptr (TJson) e1 = NULL;
  g_autoptr (TJson) e2 = NULL;
  g_autoptr (TJson) e3 = NULL;
  g_autoptr (TJson) e4 = NULL;
  json_object *v;

  ra = fleece_qmp_execute (q, "query-a", NULL, &err);
  ck_assert_msg (ra != NULL, "%s", err ? err->message : "");
  ck_assert (json_object_object_get_ex (ra, "text", &v));
  ck_assert_str_eq (json_object_get_string (v),
                    "caf\xc3\xa9 \"q\" \xc3\xbc\n");
  ck_assert_uint_eq (fleece_qmp_queued_events (q), 2);

  rb = fleece_qmp_execute (q, "query-b", NULL, &err);
  ck_assert_msg (rb != NULL, "%s", err ? err->message : "");
  ck_assert_str_eq (json_object_to_json_string_ext (rb,
                                                    JSON_C_TO_STRING_PLAIN),
                    "[1,2,{\"deep\":[[[[\"v\"]]]]}]");

  e1 = fleece_qmp_take_event (q, NULL, NULL);
  e2 = fleece_qmp_take_event (q, NULL, NULL);
  ck_assert_int_eq (event_n (e1), 1);
  ck_assert_int_eq (event_n (e2), 2);
  /* E3 and E4 came in one read after the reply. */
  e4 = fleece_qmp_wait_event (q, match_name, "E4", 2000, &err);
  ck_assert_msg (e4 != NULL, "%s", err ? err->message : "");
  e3 = fleece_qmp_take_event (q, NULL, NULL);
  ck_assert_ptr_nonnull (e3);
  ck_assert_int_eq (event_n (e3), 3);
  ck_assert_int_eq (event_n (e4), 4);

  g_clear_pointer (&q, fleece_qmp_free);
  peer_finish (p);
}
END_TEST

/* ---- HMP, round trips, the event bound --------------------------------- */

static void
script_hmp (Peer *p)
{
  g_autofree char *id = NULL;
  json_object *v;

  p_greet (p);
  id = p_expect (p, "human-monitor-command");
  if (!id)
    return;
  if (!json_object_object_get_ex (p->last_args, "command-line", &v)
      || strcmp (json_object_get_string (v), "info version") != 0
      || json_object_object_length (p->last_args) != 1)
    p_fail (p, "peer: bad HMP arguments %s",
            json_object_to_json_string (p->last_args));
  p_sendf (p, "{\"return\": \"10.0.2 (test)\\r\\n\", \"id\": \"%s\"}\n", id);
  g_free (id);
  id = p_expect (p, "human-monitor-command");
  if (id)
    p_sendf (p, "{\"error\": {\"class\": \"GenericError\", \"desc\": "
             "\"Unknown command\"}, \"id\": \"%s\"}\n", id);
  g_free (id);
  id = p_expect (p, "human-monitor-command");
  if (id)
    p_sendf (p, "{\"return\": {}, \"id\": \"%s\"}\n", id);
}

START_TEST (test_hmp)
{
  Peer *p = peer_start (script_hmp, NULL);
  g_autoptr (FleeceQmp) q = connect_peer (p);
  g_autoptr (GError) err = NULL;
  g_autofree char *out = NULL;

  out = fleece_qmp_hmp (q, "info version", &err);
  ck_assert_msg (out != NULL, "%s", err ? err->message : "");
  ck_assert_str_eq (out, "10.0.2 (test)\r\n");
  ck_assert_ptr_null (fleece_qmp_hmp (q, "no such", &err));
  ck_assert (g_error_matches (err, FLEECE_QMP_ERROR,
                              FLEECE_QMP_ERROR_COMMAND));
  ck_assert_str_eq (err->message, "human-monitor-command: Unknown command");
  g_clear_error (&err);
  ck_assert_ptr_null (fleece_qmp_hmp (q, "info status", &err));
  ck_assert (g_error_matches (err, FLEECE_QMP_ERROR,
                              FLEECE_QMP_ERROR_PROTOCOL));
  ck_assert_uint_eq (fleece_qmp_round_trips (q), 4);
  peer_finish (p);
}
END_TEST

static void
script_round_trips (Peer *p)
{
  p_greet (p);
  for (int i = 0; i < 5; i++) {
    g_autofree char *id = p_expect (p, "cmd");

    if (!id)
      return;
    if (i == 2)
      p_sendf (p, "{\"error\": {\"class\": \"GenericError\", \"desc\": "
               "\"no\"}, \"id\": \"%s\"}\n", id);
    else
      p_sendf (p, "{\"return\": %d, \"id\": \"%s\"}\n", i, id);
  }
}

START_TEST (test_round_trips)
{
  Peer *p = peer_start (script_round_trips, NULL);
  g_autoptr (FleeceQmp) q = connect_peer (p);

  ck_assert_uint_eq (fleece_qmp_round_trips (q), 1);
  for (int i = 0; i < 5; i++) {
    g_autoptr (GError) err = NULL;
    g_autoptr (TJson) ret = fleece_qmp_execute (q, "cmd", NULL, &err);

    if (i == 2) {
      ck_assert_ptr_null (ret);
    } else {
      ck_assert_msg (ret != NULL, "%s", err ? err->message : "");
      ck_assert_int_eq (json_object_get_int (ret), i);
    }
    ck_assert_uint_eq (fleece_qmp_round_trips (q), (unsigned) i + 2);
  }
  peer_finish (p);
}
END_TEST

#define OVERFLOW 10

static void
script_event_flood (Peer *p)
{
  g_autofree char *id = NULL;
  g_autoptr (GString) burst = g_string_new (NULL);

  p_greet (p);
  id = p_expect (p, "query-status");
  if (!id)
    return;
  for (int i = 0; i < FLEECE_QMP_MAX_QUEUED_EVENTS + OVERFLOW; i++)
    g_string_append_printf (burst, "{\"event\": \"TICK\", \"data\": "
                            "{\"n\": %d}, \"timestamp\": {\"seconds\": 1, "
                            "\"microseconds\": %d}}\n", i, i);
  g_string_append_printf (burst, "{\"return\": {}, \"id\": \"%s\"}\n", id);
  p_send_len (p, burst->str, burst->len);
}

START_TEST (test_event_queue_bound)
{
  Peer *p = peer_start (script_event_flood, NULL);
  g_autoptr (FleeceQmp) q = connect_peer (p);
  g_autoptr (GError) err = NULL;
  g_autoptr (TJson) ret = NULL;
  int expect = OVERFLOW;
  json_object *ev;

  ret = fleece_qmp_execute (q, "query-status", NULL, &err);
  ck_assert_msg (ret != NULL, "%s", err ? err->message : "");
  ck_assert_uint_eq (fleece_qmp_queued_events (q),
                     FLEECE_QMP_MAX_QUEUED_EVENTS);
  /* The oldest were dropped; the rest come out in order. */
  while ((ev = fleece_qmp_take_event (q, NULL, NULL))) {
    ck_assert_int_eq (event_n (ev), expect);
    json_object_put (ev);
    expect++;
  }
  ck_assert_int_eq (expect, FLEECE_QMP_MAX_QUEUED_EVENTS + OVERFLOW);
  peer_finish (p);
}
END_TEST

/* ---- misuse and a vanished peer -------------------------------------- */

static void
script_greet_only (Peer *p)
{
  p_greet (p);
}

START_TEST (test_peer_gone)
{
  Peer *p = peer_start (script_greet_only, NULL);
  g_autoptr (FleeceQmp) q = connect_peer (p);
  g_autoptr (GError) err = NULL;

  /* The peer has closed its end: writing must not raise SIGPIPE. */
  peer_finish (p);
  ck_assert_ptr_null (fleece_qmp_execute (q, "query-status",
                                          tl_json ("{\"a\": 1}"), &err));
  ck_assert_msg (g_error_matches (err, FLEECE_QMP_ERROR,
                                  FLEECE_QMP_ERROR_EOF), "%s", err->message);
  ck_assert_msg (strstr (err->message, "closed"), "%s", err->message);
  ck_assert (!fleece_qmp_is_connected (q));
}
END_TEST

START_TEST (test_not_connected)
{
  g_autoptr (FleeceQmp) q = fleece_qmp_new ();
  g_autoptr (GError) err = NULL;
  g_autoptr (GError) err2 = NULL;
  int major = -1;

  fleece_qmp_free (NULL);
  /* args are consumed even when nothing is sent (valgrind checks). */
  ck_assert_ptr_null (fleece_qmp_execute (q, "query-status",
                                          tl_json ("{\"a\": [1, 2]}"), &err));
  ck_assert (g_error_matches (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_IO));
  ck_assert_msg (strstr (err->message, "not connected"), "%s",
                 err->message);
  ck_assert_ptr_null (fleece_qmp_wait_event (q, NULL, NULL, 0, &err2));
  ck_assert (g_error_matches (err2, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_IO));
  ck_assert_ptr_null (fleece_qmp_take_event (q, NULL, NULL));
  ck_assert_uint_eq (fleece_qmp_round_trips (q), 0);
  fleece_qmp_get_version (q, &major, NULL, NULL);
  ck_assert_int_eq (major, 0);
}
END_TEST

/* ---- schema walking on masked names ------------------------------------ */

/* A miniature of query-qmp-schema with QEMU's masked type names: a union
 * argument whose variant carries a member, an optional object member, an
 * alternate, and BlockdevOptions with its driver enum ("members" form). */
static const char mini_schema[] =
  "["
  "{\"name\": \"blockdev-add\", \"meta-type\": \"command\", "
  " \"arg-type\": \"7\", \"ret-type\": \"0\"},"
  "{\"name\": \"blockdev-backup\", \"meta-type\": \"command\", "
  " \"arg-type\": \"q_obj_blockdev-backup-arg\", \"ret-type\": \"0\"},"
  "{\"name\": \"union-cmd\", \"meta-type\": \"command\", "
  " \"arg-type\": \"20\", \"ret-type\": \"0\"},"
  "{\"name\": \"0\", \"meta-type\": \"object\", \"members\": []},"
  "{\"name\": \"q_obj_blockdev-backup-arg\", \"meta-type\": \"object\", "
  " \"members\": [{\"name\": \"device\", \"type\": \"str\"},"
  "  {\"name\": \"x-perf\", \"type\": \"31\", \"default\": null},"
  "  {\"name\": \"alt\", \"type\": \"32\"}]},"
  "{\"name\": \"31\", \"meta-type\": \"object\", \"members\": "
  " [{\"name\": \"min-cluster-size\", \"type\": \"int\"}]},"
  "{\"name\": \"32\", \"meta-type\": \"alternate\", \"members\": "
  " [{\"type\": \"str\"}, {\"type\": \"[33]\"}]},"
  "{\"name\": \"[33]\", \"meta-type\": \"array\", \"element-type\": \"33\"},"
  "{\"name\": \"33\", \"meta-type\": \"object\", \"members\": "
  " [{\"name\": \"inner\", \"type\": \"int\"}]},"
  "{\"name\": \"7\", \"meta-type\": \"object\", \"tag\": \"driver\", "
  " \"members\": [{\"name\": \"driver\", \"type\": \"8\"},"
  "  {\"name\": \"node-name\", \"type\": \"str\"}],"
  " \"variants\": [{\"case\": \"copy-before-write\", \"type\": \"9\"},"
  "  {\"case\": \"raw\", \"type\": \"10\"}]},"
  "{\"name\": \"8\", \"meta-type\": \"enum\", \"members\": "
  " [{\"name\": \"copy-before-write\"}, {\"name\": \"raw\"},"
  "  {\"name\": \"snapshot-access\"}]},"
  "{\"name\": \"9\", \"meta-type\": \"object\", \"members\": "
  " [{\"name\": \"file\", \"type\": \"str\"},"
  "  {\"name\": \"min-cluster-size\", \"type\": \"int\"}]},"
  "{\"name\": \"10\", \"meta-type\": \"object\", \"members\": "
  " [{\"name\": \"offset\", \"type\": \"int\"}]},"
  "{\"name\": \"20\", \"meta-type\": \"object\", \"tag\": \"kind\", "
  " \"members\": [{\"name\": \"kind\", \"type\": \"str\"}], "
  " \"variants\": [{\"case\": \"a\", \"type\": \"21\"}]},"
  "{\"name\": \"21\", \"meta-type\": \"object\", \"members\": "
  " [{\"name\": \"only-in-variant\", \"type\": \"int\"}], "
  " \"variants\": [{\"case\": \"b\", \"type\": \"20\"}]},"
  "{\"name\": \"int\", \"meta-type\": \"builtin\", \"json-type\": \"int\"}"
  "]";

static void
script_schema (Peer *p)
{
  g_autofree char *id = NULL;

  p_greet (p);
  id = p_expect (p, "query-qmp-schema");
  if (id)
    p_sendf (p, "{\"return\": %s, \"id\": \"%s\"}\n", mini_schema, id);
}

START_TEST (test_schema_masked)
{
  Peer *p = peer_start (script_schema, NULL);
  g_autoptr (FleeceQmp) q = connect_peer (p);
  g_autoptr (GError) err = NULL;
  g_autoptr (FleeceQmpSchema) s = fleece_qmp_schema_load (q, &err);

  ck_assert_msg (s != NULL, "%s", err ? err->message : "");
  ck_assert (fleece_qmp_schema_has_command (s, "blockdev-backup"));
  ck_assert (!fleece_qmp_schema_has_command (s, "31"));
  ck_assert (!fleece_qmp_schema_has_command (s, "query-proxmox-support"));
  ck_assert (fleece_qmp_schema_command_has_arg (s, "blockdev-backup",
                                                "x-perf"));
  ck_assert (!fleece_qmp_schema_command_has_arg (s, "blockdev-backup",
                                                 "min-cluster-size"));
  /* Members of a variant count; the cycle 20 -> 21 -> 20 ends. */
  ck_assert (fleece_qmp_schema_command_has_arg (s, "union-cmd",
                                                "only-in-variant"));
  ck_assert (!fleece_qmp_schema_command_has_arg (s, "union-cmd", "nope"));
  ck_assert (fleece_qmp_schema_arg_has_member (s, "blockdev-backup",
                                               "x-perf",
                                               "min-cluster-size"));
  ck_assert (!fleece_qmp_schema_arg_has_member (s, "blockdev-backup",
                                                "x-perf", "max-workers"));
  ck_assert (!fleece_qmp_schema_arg_has_member (s, "blockdev-backup",
                                                "device", "x"));
  /* Through an alternate holding an array of objects. */
  ck_assert (fleece_qmp_schema_arg_has_member (s, "blockdev-backup", "alt",
                                               "inner"));
  ck_assert (fleece_qmp_schema_driver_has_member (s, "copy-before-write",
                                                  "min-cluster-size"));
  ck_assert (!fleece_qmp_schema_driver_has_member (s, "raw",
                                                   "min-cluster-size"));
  ck_assert (!fleece_qmp_schema_driver_has_member (s, "snapshot-access",
                                                   "file"));
  ck_assert (fleece_qmp_schema_has_driver (s, "snapshot-access"));
  ck_assert (!fleece_qmp_schema_has_driver (s, "9"));
  ck_assert (!fleece_qmp_schema_has_command (NULL, "blockdev-backup"));
  peer_finish (p);
}
END_TEST

/* ---- the cancel fd ---------------------------------------------------- */

/* A pipe whose read end becomes readable when the test cancels. */
typedef struct {
  int fds[2];
  int delay_ms;
  GThread *thread;
} Canceller;

static void
canceller_fire (Canceller *c)
{
  ck_assert_int_eq (write (c->fds[1], "c", 1), 1);
}

static gpointer
canceller_thread (gpointer data)
{
  Canceller *c = data;

  g_usleep ((gulong) c->delay_ms * 1000);
  if (write (c->fds[1], "c", 1) != 1)
    abort ();
  return NULL;
}

/* Readable at once (delay_ms 0) or from another thread after delay_ms. */
static Canceller *
canceller_new (int delay_ms)
{
  Canceller *c = g_new0 (Canceller, 1);

  ck_assert_int_eq (pipe2 (c->fds, O_CLOEXEC), 0);
  c->delay_ms = delay_ms;
  if (delay_ms == 0)
    canceller_fire (c);
  else
    c->thread = g_thread_new ("canceller", canceller_thread, c);
  return c;
}

static void
canceller_free (Canceller *c)
{
  if (c->thread)
    g_thread_join (c->thread);
  close (c->fds[0]);
  close (c->fds[1]);
  g_free (c);
}

/* A unix socket listening in a scratch dir (backlog as given). */
static int
listen_unix (const char *path, int backlog)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

  ck_assert_int_ge (fd, 0);
  g_strlcpy (sun.sun_path, path, sizeof sun.sun_path);
  ck_assert_int_eq (bind (fd, (struct sockaddr *) &sun, sizeof sun), 0);
  ck_assert_int_eq (listen (fd, backlog), 0);
  return fd;
}

/* Accepted (or connected) and silent until the client lets it go: a
 * monitor that serves another client. */
static void
script_silent (Peer *p)
{
  p_wait_go (p);
}

START_TEST (test_cancel_greeting)
{
  Peer *p = peer_start (script_silent, NULL);
  Canceller *c = canceller_new (0);
  g_autoptr (FleeceQmp) q = fleece_qmp_new ();
  g_autoptr (GError) err = NULL;
  gint64 t0 = now_ms ();

  fleece_qmp_set_cancel_fd (q, c->fds[0]);
  ck_assert (!fleece_qmp_connect_fd (q, p->client_fd, &err));
  ck_assert_msg (g_error_matches (err, FLEECE_QMP_ERROR,
                                  FLEECE_QMP_ERROR_CANCELLED), "%s", err->message);
  ck_assert_msg (strstr (err->message, "greeting"), "%s", err->message);
  /* At once, not after the greeting timeout (5 s). */
  ck_assert_int_lt (now_ms () - t0, 1000);
  ck_assert (!fleece_qmp_is_connected (q));
  p_let_go (p);
  peer_finish (p);
  canceller_free (c);
}
END_TEST

/* A monitor with a full queue of waiting clients refuses connect() with
 * EAGAIN: the library retries until the greeting timeout, or until the
 * cancel fd says stop. */
START_TEST (test_cancel_connect)
{
  g_autofree char *dir = tl_tmpdir_new ("qmp-cancel");
  g_autofree char *path = g_build_filename (dir, "qmp.sock", NULL);
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int lfd = listen_unix (path, 0);
  int queued = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  Canceller *c = canceller_new (0);
  g_autoptr (FleeceQmp) q = fleece_qmp_new ();
  g_autoptr (GError) err = NULL;
  gint64 t0;

  /* The one waiting connection a backlog of 0 holds. */
  g_strlcpy (sun.sun_path, path, sizeof sun.sun_path);
  ck_assert_int_eq (connect (queued, (struct sockaddr *) &sun, sizeof sun), 0);

  fleece_qmp_set_greeting_timeout (q, 300);
  t0 = now_ms ();
  ck_assert (!fleece_qmp_connect_unix (q, path, &err));
  ck_assert_msg (g_error_matches (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_BUSY),
                 "%s", err->message);
  ck_assert_msg (strstr (err->message, "another client holds the QMP monitor"),
                 "%s", err->message);
  ck_assert_int_ge (now_ms () - t0, 295);
  g_clear_error (&err);

  fleece_qmp_set_greeting_timeout (q, 10000);
  fleece_qmp_set_cancel_fd (q, c->fds[0]);
  t0 = now_ms ();
  ck_assert (!fleece_qmp_connect_unix (q, path, &err));
  ck_assert_msg (g_error_matches (err, FLEECE_QMP_ERROR,
                                  FLEECE_QMP_ERROR_CANCELLED), "%s", err->message);
  ck_assert_msg (strstr (err->message, "connecting"), "%s", err->message);
  ck_assert_int_lt (now_ms () - t0, 1000);

  close (queued);
  close (lfd);
  canceller_free (c);
  tl_tmpdir_free (g_steal_pointer (&dir));
}
END_TEST

/* QEMU greets at once; a socket that accepts and stays silent is a monitor
 * busy with another client (qemu-server, a second fleece): EBUSY in the
 * greeting timeout, not a hang. */
START_TEST (test_busy_monitor)
{
  g_autofree char *dir = tl_tmpdir_new ("qmp-busy");
  g_autofree char *path = g_build_filename (dir, "qmp.sock", NULL);
  Peer *p = peer_new (script_silent, NULL);
  g_autoptr (FleeceQmp) q = fleece_qmp_new ();
  g_autoptr (GError) err = NULL;
  gint64 t0, dt;

  p->listen_fd = listen_unix (path, 1);
  p->thread = g_thread_new ("qmp-peer", peer_thread, p);
  fleece_qmp_set_greeting_timeout (q, 400);
  t0 = now_ms ();
  ck_assert (!fleece_qmp_connect_unix (q, path, &err));
  dt = now_ms () - t0;
  ck_assert_msg (g_error_matches (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_BUSY),
                 "%s", err->message);
  ck_assert_msg (strstr (err->message, "another client holds the QMP monitor"),
                 "%s", err->message);
  ck_assert_int_ge (dt, 395);
  ck_assert_int_lt (dt, 3000);
  ck_assert (!fleece_qmp_is_connected (q));
  p_let_go (p);
  peer_finish (p);
  tl_tmpdir_free (g_steal_pointer (&dir));
}
END_TEST

static void
script_reply_late (Peer *p)
{
  g_autofree char *id = NULL;
  g_autofree char *id2 = NULL;

  p_greet (p);
  id = p_expect (p, "slow");
  p_wait_go (p);
  id2 = p_expect (p, "next");
  if (id && id2)
    p_sendf (p, "{\"return\": \"stale\", \"id\": \"%s\"}\n"
             "{\"return\": \"fresh\", \"id\": \"%s\"}\n", id, id2);
}

START_TEST (test_cancel_reply)
{
  Peer *p = peer_start (script_reply_late, NULL);
  g_autoptr (FleeceQmp) q = connect_peer (p);
  g_autoptr (GError) err = NULL;
  g_autoptr (GError) err2 = NULL;
  g_autoptr (TJson) ret = NULL;
  Canceller *c;
  gint64 t0, dt;

  fleece_qmp_set_timeout (q, 20000);
  c = canceller_new (200);
  fleece_qmp_set_cancel_fd (q, c->fds[0]);
  t0 = now_ms ();
  ck_assert_ptr_null (fleece_qmp_execute (q, "slow", NULL, &err));
  dt = now_ms () - t0;
  ck_assert_msg (g_error_matches (err, FLEECE_QMP_ERROR,
                                  FLEECE_QMP_ERROR_CANCELLED), "%s", err->message);
  ck_assert_msg (strstr (err->message, "'slow'"), "%s", err->message);
  ck_assert_int_ge (dt, 150);
  ck_assert_int_lt (dt, 3000);
  /* Its answer comes later and is not taken for the next command's. */
  p_let_go (p);
  fleece_qmp_set_cancel_fd (q, -1);
  ret = fleece_qmp_execute (q, "next", NULL, &err2);
  ck_assert_msg (ret != NULL, "%s", err2 ? err2->message : "");
  ck_assert_str_eq (json_object_get_string (ret), "fresh");
  peer_finish (p);
  canceller_free (c);
}
END_TEST

static void
script_greet_then_wait (Peer *p)
{
  p_greet (p);
  p_wait_go (p);
}

START_TEST (test_cancel_event)
{
  Peer *p = peer_start (script_greet_then_wait, NULL);
  g_autoptr (FleeceQmp) q = connect_peer (p);
  g_autoptr (GError) err = NULL;
  Canceller *c = canceller_new (200);
  gint64 t0, dt;

  fleece_qmp_set_cancel_fd (q, c->fds[0]);
  t0 = now_ms ();
  ck_assert_ptr_null (fleece_qmp_wait_event (q, NULL, NULL, -1, &err));
  dt = now_ms () - t0;
  ck_assert_msg (g_error_matches (err, FLEECE_QMP_ERROR,
                                  FLEECE_QMP_ERROR_CANCELLED), "%s", err->message);
  ck_assert_int_ge (dt, 150);
  ck_assert_int_lt (dt, 3000);
  p_let_go (p);
  peer_finish (p);
  canceller_free (c);
}
END_TEST

/* Disarmed (-1), a readable cancel fd changes nothing. */
START_TEST (test_cancel_disarmed)
{
  Peer *p = peer_start (script_greet_and_status, NULL);
  Canceller *c = canceller_new (0);
  g_autoptr (FleeceQmp) q = fleece_qmp_new ();
  g_autoptr (GError) err = NULL;
  g_autoptr (TJson) ret = NULL;

  fleece_qmp_set_cancel_fd (q, c->fds[0]);
  fleece_qmp_set_cancel_fd (q, -1);
  ck_assert_msg (fleece_qmp_connect_fd (q, p->client_fd, &err), "%s",
                 err ? err->message : "");
  ret = fleece_qmp_execute (q, "query-status", NULL, &err);
  ck_assert_msg (ret != NULL, "%s", err ? err->message : "");
  peer_finish (p);
  canceller_free (c);
}
END_TEST

/* ---- passing an fd (SCM_RIGHTS) ---------------------------------------- */

/* Receive the next bytes with any fd that came along; the bytes go to the
 * peer's buffer for p_expect.  Returns the fd, or -1 if none came. */
static int
p_recv_with_fd (Peer *p)
{
  union {
    char buf[CMSG_SPACE (sizeof (int))];
    struct cmsghdr align;
  } control;
  struct iovec iov = { .iov_base = p->rbuf, .iov_len = sizeof p->rbuf };
  struct msghdr msg = {
    .msg_iov = &iov, .msg_iovlen = 1,
    .msg_control = control.buf, .msg_controllen = sizeof control.buf,
  };
  struct pollfd pfd = { .fd = p->fd, .events = POLLIN };
  struct cmsghdr *cmsg;
  ssize_t n;
  int fd = -1;

  if (poll (&pfd, 1, PEER_READ_TIMEOUT_MS) != 1) {
    p_fail (p, "peer: no request within %d ms", PEER_READ_TIMEOUT_MS);
    return -1;
  }
  n = recvmsg (p->fd, &msg, MSG_CMSG_CLOEXEC);
  if (n <= 0) {
    p_fail (p, "peer: recvmsg: %s", n < 0 ? g_strerror (errno) : "EOF");
    return -1;
  }
  p->rpos = 0;
  p->rlen = (size_t) n;
  for (cmsg = CMSG_FIRSTHDR (&msg); cmsg; cmsg = CMSG_NXTHDR (&msg, cmsg))
    if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS)
      memcpy (&fd, CMSG_DATA (cmsg), sizeof fd);
  return fd;
}

static void
script_getfd (Peer *p)
{
  g_autofree char *id = NULL;
  json_object *v;
  int fd;

  p_greet (p);
  /* A plain command carries no fd. */
  fd = p_recv_with_fd (p);
  id = p_expect (p, "query-status");
  if (fd >= 0) {
    p_fail (p, "peer: query-status came with fd %d", fd);
    close (fd);
  }
  if (id)
    p_sendf (p, "{\"return\": {}, \"id\": \"%s\"}\n", id);
  g_free (id);

  fd = p_recv_with_fd (p);
  id = p_expect (p, "getfd");
  if (!id)
    return;
  if (!json_object_object_get_ex (p->last_args, "fdname", &v)
      || strcmp (json_object_get_string (v), "fleece-target") != 0)
    p_fail (p, "peer: bad getfd arguments %s",
            json_object_to_json_string (p->last_args));
  if (fd < 0)
    p_fail (p, "peer: getfd came without an fd");
  /* Prove it is the client's pipe: write through it. */
  else if (write (fd, "via-scm", 7) != 7)
    p_fail (p, "peer: cannot write to the passed fd: %s", g_strerror (errno));
  if (fd >= 0)
    close (fd);
  p_sendf (p, "{\"return\": {}, \"id\": \"%s\"}\n", id);
}

START_TEST (test_execute_fd)
{
  Peer *p = peer_start (script_getfd, NULL);
  g_autoptr (FleeceQmp) q = connect_peer (p);
  g_autoptr (GError) err = NULL;
  g_autoptr (TJson) r1 = NULL;
  g_autoptr (TJson) r2 = NULL;
  char buf[16] = "";
  int pfd[2];

  ck_assert_int_eq (pipe2 (pfd, O_CLOEXEC), 0);
  r1 = fleece_qmp_execute (q, "query-status", NULL, &err);
  ck_assert_msg (r1 != NULL, "%s", err ? err->message : "");
  r2 = fleece_qmp_execute_fd (q, "getfd",
                              tl_json ("{\"fdname\": \"fleece-target\"}"),
                              pfd[1], &err);
  ck_assert_msg (r2 != NULL, "%s", err ? err->message : "");
  peer_finish (p);
  /* The caller's fd stays the caller's: still open here. */
  ck_assert_int_ne (fcntl (pfd[1], F_GETFD), -1);
  close (pfd[1]);
  ck_assert_int_eq (read (pfd[0], buf, sizeof buf - 1), 7);
  ck_assert_str_eq (buf, "via-scm");
  close (pfd[0]);
}
END_TEST

/* ---- conn.c: a connection per call ---------------------------------------- */

/* Serve n (p->data) connections one after the other; each greets, then
 * answers every "ping" with the connection's number until the client
 * lets go.  A "break" request makes it close the connection at once. */
static void
script_serve (Peer *p)
{
  int n = GPOINTER_TO_INT (p->data);

  for (int conn = 1; conn <= n; conn++) {
    if (conn > 1) {
      struct pollfd pfd = { .fd = p->listen_fd, .events = POLLIN };

      close (p->fd);
      json_tokener_reset (p->tok);
      p->rpos = p->rlen = 0;
      if (poll (&pfd, 1, PEER_READ_TIMEOUT_MS) != 1) {
        p_fail (p, "peer: connection %d never came", conn);
        return;
      }
      p->fd = accept (p->listen_fd, NULL, NULL);
    }
    p_greet (p);
    for (;;) {
      g_autoptr (TJson) req = p_read (p);
      json_object *v, *id;

      if (!req)
        break;
      json_object_object_get_ex (req, "execute", &v);
      json_object_object_get_ex (req, "id", &id);
      if (strcmp (json_object_get_string (v), "break") == 0)
        break;
      p_sendf (p, "{\"return\": %d, \"id\": %s}\n", conn,
               json_object_to_json_string (id));
    }
  }
}

static Peer *
serve_start (const char *path, int connections)
{
  Peer *p = peer_new (script_serve, GINT_TO_POINTER (connections));

  p->listen_fd = listen_unix (path, 4);
  p->thread = g_thread_new ("qmp-peer", peer_thread, p);
  return p;
}

/* The number of the connection that answered a ping. */
static int
ping (FleeceConn *c)
{
  g_autoptr (GError) err = NULL;
  g_autoptr (TJson) r = fleece_conn_execute (c, "ping", NULL, &err);

  ck_assert_msg (r != NULL, "%s", err ? err->message : "");
  return json_object_get_int (r);
}

START_TEST (test_conn_per_call)
{
  g_autofree char *dir = tl_tmpdir_new ("conn");
  g_autofree char *path = g_build_filename (dir, "qmp.sock", NULL);
  Peer *p = serve_start (path, 2);
  g_autoptr (FleeceConn) c = fleece_conn_new ();

  ck_assert (!fleece_conn_configured (c));
  fleece_conn_set_path (c, path);
  ck_assert (fleece_conn_configured (c));
  ck_assert_str_eq (fleece_conn_path (c), path);
  /* Setting the path connects nobody; the first command does. */
  ck_assert_uint_eq (fleece_conn_connects (c), 0);
  ck_assert_int_eq (ping (c), 1);
  ck_assert_int_eq (ping (c), 1);
  ck_assert_uint_eq (fleece_conn_connects (c), 1);
  /* The end of a call lets go of the monitor; the next call connects. */
  fleece_conn_release (c);
  ck_assert_int_eq (ping (c), 2);
  ck_assert_uint_eq (fleece_conn_connects (c), 2);
  fleece_conn_release (c);
  peer_finish (p);
  tl_tmpdir_free (g_steal_pointer (&dir));
}
END_TEST

START_TEST (test_conn_reconnect_after_break)
{
  g_autofree char *dir = tl_tmpdir_new ("conn");
  g_autofree char *path = g_build_filename (dir, "qmp.sock", NULL);
  Peer *p = serve_start (path, 2);
  g_autoptr (FleeceConn) c = fleece_conn_new ();
  g_autoptr (GError) err = NULL;

  fleece_conn_set_path (c, path);
  ck_assert_int_eq (ping (c), 1);
  ck_assert_ptr_null (fleece_conn_execute (c, "break", NULL, &err));
  ck_assert_msg (g_error_matches (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_EOF),
                 "%s", err->message);
  /* Within the same call: the broken connection is replaced lazily. */
  ck_assert_int_eq (ping (c), 2);
  ck_assert_uint_eq (fleece_conn_connects (c), 2);
  fleece_conn_free (g_steal_pointer (&c));
  peer_finish (p);
  tl_tmpdir_free (g_steal_pointer (&dir));
}
END_TEST

static void
script_ping_forever (Peer *p)
{
  p_greet (p);
  for (;;) {
    g_autoptr (TJson) req = p_read (p);
    json_object *id;

    if (!req)
      return;
    json_object_object_get_ex (req, "id", &id);
    p_sendf (p, "{\"return\": 7, \"id\": %s}\n",
             json_object_to_json_string (id));
  }
}

/* The caller's fd is kept for the handle's life: release keeps it, and a
 * broken one is not replaced (there is nowhere to connect to). */
START_TEST (test_conn_adopted_fd)
{
  Peer *p = peer_start (script_ping_forever, NULL);
  g_autoptr (FleeceConn) c = fleece_conn_new ();
  g_autoptr (GError) err = NULL;

  ck_assert_msg (fleece_conn_adopt_fd (c, p->client_fd, &err), "%s",
                 err ? err->message : "");
  ck_assert (fleece_conn_configured (c));
  ck_assert_ptr_null (fleece_conn_path (c));
  ck_assert_int_eq (ping (c), 7);
  fleece_conn_release (c);
  ck_assert_int_eq (ping (c), 7);
  ck_assert_uint_eq (fleece_conn_connects (c), 1);
  /* The peer goes away (its script ends at EOF; shut our side first). */
  shutdown (p->client_fd, SHUT_WR);
  peer_finish (p);
  ck_assert_ptr_null (fleece_conn_execute (c, "ping", NULL, &err));
  g_clear_error (&err);
  ck_assert_ptr_null (fleece_conn_execute (c, "ping", NULL, &err));
  ck_assert_msg (strstr (err->message, "unusable"), "%s", err->message);
  ck_assert_uint_eq (fleece_conn_connects (c), 1);
}
END_TEST

START_TEST (test_conn_not_configured)
{
  g_autoptr (FleeceConn) c = fleece_conn_new ();
  g_autoptr (GError) err = NULL;

  ck_assert_ptr_null (fleece_conn_execute (c, "ping",
                                           tl_json ("{\"a\": [1]}"), &err));
  ck_assert_msg (g_error_matches (err, FLEECE_ERROR, ENOTCONN), "%s",
                 err->message);
  ck_assert_msg (strstr (err->message, "fleece_connect()"), "%s", err->message);
  ck_assert_uint_eq (fleece_conn_connects (c), 0);
}
END_TEST

/* Cancelled, a call does not even wait for the monitor's greeting. */
START_TEST (test_conn_cancel_connect)
{
  g_autofree char *dir = tl_tmpdir_new ("conn");
  g_autofree char *path = g_build_filename (dir, "qmp.sock", NULL);
  Peer *p = peer_new (script_silent, NULL);
  Canceller *can = canceller_new (0);
  g_autoptr (FleeceConn) c = fleece_conn_new ();
  g_autoptr (GError) err = NULL;
  gint64 t0;

  p->listen_fd = listen_unix (path, 1);
  p->thread = g_thread_new ("qmp-peer", peer_thread, p);
  fleece_conn_set_path (c, path);
  fleece_conn_set_cancel_fd (c, can->fds[0]);
  t0 = now_ms ();
  ck_assert_ptr_null (fleece_conn_execute (c, "ping", NULL, &err));
  ck_assert_msg (g_error_matches (err, FLEECE_QMP_ERROR,
                                  FLEECE_QMP_ERROR_CANCELLED), "%s", err->message);
  ck_assert_int_lt (now_ms () - t0, 1000);
  ck_assert_uint_eq (fleece_conn_connects (c), 0);
  p_let_go (p);
  peer_finish (p);
  canceller_free (can);
  tl_tmpdir_free (g_steal_pointer (&dir));
}
END_TEST

START_TEST (test_conn_sleep)
{
  g_autofree char *dir = tl_tmpdir_new ("conn");
  g_autofree char *path = g_build_filename (dir, "qmp.sock", NULL);
  Peer *p = serve_start (path, 2);
  g_autoptr (FleeceConn) c = fleece_conn_new ();
  g_autoptr (GError) err = NULL;
  Canceller *can;
  gint64 t0, dt;

  fleece_conn_set_path (c, path);
  ck_assert_int_eq (ping (c), 1);
  /* A sleep holds nothing: the monitor is let go first. */
  t0 = now_ms ();
  ck_assert (fleece_conn_sleep (c, 100, &err));
  dt = now_ms () - t0;
  ck_assert_int_ge (dt, 95);
  ck_assert_int_lt (dt, 2000);
  ck_assert_int_eq (ping (c), 2);

  /* A cancel wakes it at once. */
  can = canceller_new (200);
  fleece_conn_set_cancel_fd (c, can->fds[0]);
  t0 = now_ms ();
  ck_assert (!fleece_conn_sleep (c, 20000, &err));
  dt = now_ms () - t0;
  ck_assert_msg (g_error_matches (err, FLEECE_QMP_ERROR,
                                  FLEECE_QMP_ERROR_CANCELLED), "%s",
                 err ? err->message : "no error");
  ck_assert_int_ge (dt, 150);
  ck_assert_int_lt (dt, 3000);
  canceller_free (can);
  fleece_conn_free (g_steal_pointer (&c));
  peer_finish (p);
  tl_tmpdir_free (g_steal_pointer (&dir));
}
END_TEST

static Suite *
qmp_suite (void)
{
  Suite *s = suite_create ("qmp");
  TCase *tc = tcase_create ("transport");

  tcase_set_timeout (tc, 30);
  tcase_add_test (tc, test_negotiation);
  tcase_add_test (tc, test_bad_greeting);
  tcase_add_test (tc, test_capabilities_refused);
  tcase_add_test (tc, test_connect_unix);
  tcase_add_test (tc, test_id_matching_and_events);
  tcase_add_test (tc, test_error_reply);
  tcase_add_test (tc, test_timeout);
  tcase_add_test (tc, test_eof_mid_reply);
  tcase_add_loop_test (tc, test_garbage, 0, G_N_ELEMENTS (garbage_cases));
  tcase_add_test (tc, test_limit_boundary);
  tcase_add_test (tc, test_too_large);
  tcase_add_test (tc, test_framing);
  tcase_add_test (tc, test_hmp);
  tcase_add_test (tc, test_round_trips);
  tcase_add_test (tc, test_event_queue_bound);
  tcase_add_test (tc, test_peer_gone);
  tcase_add_test (tc, test_not_connected);
  tcase_add_test (tc, test_schema_masked);
  suite_add_tcase (s, tc);

  tc = tcase_create ("cancel");
  tcase_set_timeout (tc, 30);
  tcase_add_test (tc, test_cancel_greeting);
  tcase_add_test (tc, test_cancel_connect);
  tcase_add_test (tc, test_busy_monitor);
  tcase_add_test (tc, test_cancel_reply);
  tcase_add_test (tc, test_cancel_event);
  tcase_add_test (tc, test_cancel_disarmed);
  tcase_add_test (tc, test_execute_fd);
  suite_add_tcase (s, tc);

  tc = tcase_create ("conn");
  tcase_set_timeout (tc, 30);
  tcase_add_test (tc, test_conn_per_call);
  tcase_add_test (tc, test_conn_reconnect_after_break);
  tcase_add_test (tc, test_conn_adopted_fd);
  tcase_add_test (tc, test_conn_not_configured);
  tcase_add_test (tc, test_conn_cancel_connect);
  tcase_add_test (tc, test_conn_sleep);
  suite_add_tcase (s, tc);
  return s;
}

int
main (void)
{
  SRunner *sr = srunner_create (qmp_suite ());
  int failed;

  srunner_run_all (sr, CK_ENV);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
