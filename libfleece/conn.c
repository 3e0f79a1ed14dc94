/* The handle's way to QEMU's monitor: a connection for the duration of a
 * call (see conn.h for why). */
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "conn.h"

struct FleeceConn {
  char *path;            /* connect here for each call */
  FleeceQmp *qmp;        /* live connection, or NULL */
  bool adopted;          /* qmp came from the caller's fd: keep it */
  int timeout_ms;
  int greeting_timeout_ms;
  int cancel_fd;
  unsigned connects;
};

FleeceConn *
fleece_conn_new (void)
{
  FleeceConn *c = g_new0 (FleeceConn, 1);

  c->timeout_ms = FLEECE_QMP_DEFAULT_TIMEOUT_MS;
  c->greeting_timeout_ms = FLEECE_QMP_DEFAULT_GREETING_TIMEOUT_MS;
  c->cancel_fd = -1;
  return c;
}

static void
drop (FleeceConn *c)
{
  g_clear_pointer (&c->qmp, fleece_qmp_free);
  c->adopted = false;
}

void
fleece_conn_free (FleeceConn *c)
{
  if (!c)
    return;
  drop (c);
  g_free (c->path);
  g_free (c);
}

void
fleece_conn_set_path (FleeceConn *c, const char *path)
{
  drop (c);
  g_free (c->path);
  c->path = g_strdup (path);
}

bool
fleece_conn_adopt_fd (FleeceConn *c, int fd, GError **err)
{
  g_autoptr (FleeceQmp) q = fleece_qmp_new ();

  drop (c);
  g_clear_pointer (&c->path, g_free);
  fleece_qmp_set_timeout (q, c->timeout_ms);
  fleece_qmp_set_cancel_fd (q, c->cancel_fd);
  if (!fleece_qmp_connect_fd (q, fd, err))
    return false;
  c->qmp = g_steal_pointer (&q);
  c->adopted = true;
  c->connects++;
  return true;
}

const char *
fleece_conn_path (FleeceConn *c)
{
  return c->path;
}

bool
fleece_conn_configured (FleeceConn *c)
{
  return c->path || c->adopted;
}

void
fleece_conn_set_timeout (FleeceConn *c, int timeout_ms)
{
  c->timeout_ms = timeout_ms;
  if (c->qmp)
    fleece_qmp_set_timeout (c->qmp, timeout_ms);
}

void
fleece_conn_set_greeting_timeout (FleeceConn *c, int timeout_ms)
{
  c->greeting_timeout_ms = timeout_ms > 0 ? timeout_ms
                                          : FLEECE_QMP_DEFAULT_GREETING_TIMEOUT_MS;
}

void
fleece_conn_set_cancel_fd (FleeceConn *c, int fd)
{
  c->cancel_fd = fd;
  if (c->qmp)
    fleece_qmp_set_cancel_fd (c->qmp, fd);
}

FleeceQmp *
fleece_conn_get (FleeceConn *c, GError **err)
{
  g_autoptr (FleeceQmp) q = NULL;

  /* A connection an error broke is of no more use; the next command of
   * the call connects again (an adopted fd cannot). */
  if (c->qmp && !c->adopted && !fleece_qmp_is_connected (c->qmp))
    g_clear_pointer (&c->qmp, fleece_qmp_free);
  if (c->qmp)
    return c->qmp;
  if (!c->path) {
    g_set_error (err, FLEECE_ERROR, ENOTCONN,
                 c->adopted ? "the QMP connection was lost"
                            : "not connected: call fleece_connect() first");
    return NULL;
  }
  q = fleece_qmp_new ();
  fleece_qmp_set_timeout (q, c->timeout_ms);
  fleece_qmp_set_greeting_timeout (q, c->greeting_timeout_ms);
  fleece_qmp_set_cancel_fd (q, c->cancel_fd);
  if (!fleece_qmp_connect_unix (q, c->path, err))
    return NULL;
  c->connects++;
  c->qmp = g_steal_pointer (&q);
  return c->qmp;
}

void
fleece_conn_release (FleeceConn *c)
{
  if (!c->adopted)
    g_clear_pointer (&c->qmp, fleece_qmp_free);
}

json_object *
fleece_conn_execute_timeout (FleeceConn *c, const char *cmd, json_object *args,
                             int timeout_ms, GError **err)
{
  FleeceQmp *q = fleece_conn_get (c, err);

  if (!q) {
    json_object_put (args);
    return NULL;
  }
  return fleece_qmp_execute_timeout (q, cmd, args, timeout_ms, err);
}

json_object *
fleece_conn_execute (FleeceConn *c, const char *cmd, json_object *args,
                     GError **err)
{
  return fleece_conn_execute_timeout (c, cmd, args, -1, err);
}

json_object *
fleece_conn_execute_fd (FleeceConn *c, const char *cmd, json_object *args,
                        int fd, GError **err)
{
  FleeceQmp *q = fleece_conn_get (c, err);

  if (!q) {
    json_object_put (args);
    return NULL;
  }
  return fleece_qmp_execute_fd (q, cmd, args, fd, err);
}

bool
fleece_conn_do (FleeceConn *c, const char *cmd, json_object *args,
                GError **err)
{
  json_object *r = fleece_conn_execute (c, cmd, args, err);

  if (!r)
    return false;
  json_object_put (r);
  return true;
}

bool
fleece_conn_hmp (FleeceConn *c, const char *line, int timeout_ms,
                 const char *expect, GError **err)
{
  json_object *args = json_object_new_object ();
  g_autoptr (json_object) r = NULL;
  g_autofree char *out = NULL;

  json_object_object_add (args, "command-line", json_object_new_string (line));
  r = fleece_conn_execute_timeout (c, "human-monitor-command", args,
                                   timeout_ms, err);
  if (!r)
    return false;
  out = g_strstrip (g_strdup (json_object_get_string (r)));
  if (g_strcmp0 (out, expect) != 0) {
    g_set_error (err, FLEECE_ERROR, EIO, "HMP %s: %s", line,
                 *out ? out : "(no answer)");
    return false;
  }
  return true;
}

json_object *
fleece_conn_wait_event (FleeceConn *c, FleeceQmpEventMatch match, void *opaque,
                        int timeout_ms, GError **err)
{
  FleeceQmp *q = fleece_conn_get (c, err);

  return q ? fleece_qmp_wait_event (q, match, opaque, timeout_ms, err) : NULL;
}

bool
fleece_conn_sleep (FleeceConn *c, int ms, GError **err)
{
  struct pollfd pfd = { .fd = c->cancel_fd, .events = POLLIN };
  gint64 end = g_get_monotonic_time () + (gint64) ms * 1000;

  fleece_conn_release (c);
  for (;;) {
    gint64 left = (end - g_get_monotonic_time () + 999) / 1000;
    int r;

    if (left <= 0)
      return true;
    r = poll (&pfd, 1, (int) MIN (left, G_MAXINT));
    if (r > 0 && c->cancel_fd >= 0) {
      g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_CANCELLED,
                   "cancelled");
      return false;
    }
    if (r < 0 && errno != EINTR)
      return true;
  }
}

unsigned
fleece_conn_connects (FleeceConn *c)
{
  return c->connects;
}
