/* A minimal synchronous QMP client for the fleece command.  The library
 * keeps its own client private; the command needs one only to show what
 * QEMU is doing (status) and to drive the demo's throwaway QEMU and
 * storage daemon.  One command at a time; events are skipped. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "fleece-tool.h"

struct ToolQmp {
  int fd;
  int timeout_ms;
  GString *in;
};

G_DEFINE_QUARK (tool-qmp-error-quark, tool_qmp_error)

void
tool_qmp_free (ToolQmp *q)
{
  if (!q)
    return;
  if (q->fd >= 0)
    close (q->fd);
  g_string_free (q->in, TRUE);
  g_free (q);
}

void
tool_qmp_set_timeout (ToolQmp *q, int timeout_ms)
{
  q->timeout_ms = timeout_ms;
}

/* Wait for fd to become ready for events until deadline (monotonic us). */
static bool
wait_fd (ToolQmp *q, short events, gint64 deadline, GError **err)
{
  for (;;) {
    struct pollfd p = { .fd = q->fd, .events = events };
    gint64 left = deadline - g_get_monotonic_time ();
    int r;

    if (left <= 0) {
      g_set_error (err, TOOL_QMP_ERROR, TOOL_QMP_ERROR_TIMEOUT,
                   "QEMU did not answer within %d ms", q->timeout_ms);
      return false;
    }
    r = poll (&p, 1, (int) MIN (left / 1000 + 1, 1000));
    if (r > 0)
      return true;
    if (r < 0 && errno != EINTR) {
      g_set_error (err, TOOL_QMP_ERROR, TOOL_QMP_ERROR_IO, "poll: %s",
                   g_strerror (errno));
      return false;
    }
    /* Only a signal arriving now interrupts: teardown after one still
     * talks to QEMU. */
    if (r < 0 && tool_signal) {
      g_set_error (err, TOOL_QMP_ERROR, TOOL_QMP_ERROR_INTERRUPTED,
                   "interrupted by %s", tool_signal_name (tool_signal));
      return false;
    }
  }
}

/* The next JSON message (one per line), or NULL. */
static json_object *
read_message (ToolQmp *q, gint64 deadline, GError **err)
{
  for (;;) {
    char *nl = memchr (q->in->str, '\n', q->in->len);
    char buf[65536];
    ssize_t n;

    if (nl) {
      size_t len = (size_t) (nl - q->in->str);
      g_autofree char *line = g_strndup (q->in->str, len);
      json_object *msg;

      g_string_erase (q->in, 0, (gssize) len + 1);
      g_strstrip (line);
      if (!*line)
        continue;
      msg = json_tokener_parse (line);
      if (!msg || !json_object_is_type (msg, json_type_object)) {
        json_object_put (msg);
        g_set_error (err, TOOL_QMP_ERROR, TOOL_QMP_ERROR_IO,
                     "QEMU sent something that is not a QMP message: %.80s",
                     line);
        return NULL;
      }
      return msg;
    }
    if (!wait_fd (q, POLLIN, deadline, err))
      return NULL;
    n = read (q->fd, buf, sizeof buf);
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
      continue;
    if (n <= 0) {
      g_set_error (err, TOOL_QMP_ERROR, TOOL_QMP_ERROR_IO,
                   "QEMU closed the QMP connection%s%s", n < 0 ? ": " : "",
                   n < 0 ? g_strerror (errno) : "");
      return NULL;
    }
    g_string_append_len (q->in, buf, n);
  }
}

static bool
write_all (ToolQmp *q, const char *data, size_t len, gint64 deadline,
           GError **err)
{
  while (len) {
    ssize_t n = send (q->fd, data, len, MSG_NOSIGNAL);

    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0 && errno == EAGAIN) {
      if (!wait_fd (q, POLLOUT, deadline, err))
        return false;
      continue;
    }
    if (n < 0) {
      g_set_error (err, TOOL_QMP_ERROR, TOOL_QMP_ERROR_IO,
                   "cannot write to QEMU: %s", g_strerror (errno));
      return false;
    }
    data += n;
    len -= (size_t) n;
  }
  return true;
}

static json_object *
execute (ToolQmp *q, const char *command, json_object *args, gint64 deadline,
         GError **err)
{
  g_autoptr (json_object) req = json_object_new_object ();
  g_autofree char *text = NULL;

  json_object_object_add (req, "execute", json_object_new_string (command));
  if (args)
    json_object_object_add (req, "arguments", args);
  text = g_strdup_printf ("%s\n", json_object_to_json_string_ext (
                            req, JSON_C_TO_STRING_PLAIN));
  if (!write_all (q, text, strlen (text), deadline, err))
    return NULL;
  for (;;) {
    g_autoptr (json_object) msg = read_message (q, deadline, err);
    json_object *v;

    if (!msg)
      return NULL;
    if (json_object_object_get_ex (msg, "return", &v))
      return json_object_get (v);
    if (json_object_object_get_ex (msg, "error", &v)) {
      json_object *desc = NULL;

      json_object_object_get_ex (v, "desc", &desc);
      g_set_error (err, TOOL_QMP_ERROR, TOOL_QMP_ERROR_COMMAND, "%s: %s",
                   command, desc ? json_object_get_string (desc) : "error");
      return NULL;
    }
    /* an event: not ours to handle */
  }
}

ToolQmp *
tool_qmp_connect (const char *path, int timeout_ms, GError **err)
{
  g_autoptr (ToolQmp) q = g_new0 (ToolQmp, 1);
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  gint64 deadline = g_get_monotonic_time () + (gint64) timeout_ms * 1000;
  g_autoptr (json_object) greeting = NULL;
  g_autoptr (json_object) caps = NULL;
  GError *gerr = NULL;

  q->fd = -1;
  q->in = g_string_new (NULL);
  q->timeout_ms = timeout_ms;
  if (strlen (path) >= sizeof sa.sun_path) {
    g_set_error (err, TOOL_QMP_ERROR, TOOL_QMP_ERROR_IO,
                 "the socket path %s is too long", path);
    return NULL;
  }
  strcpy (sa.sun_path, path);
  q->fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (q->fd < 0 || connect (q->fd, (struct sockaddr *) &sa, sizeof sa) < 0) {
    g_set_error (err, TOOL_QMP_ERROR, TOOL_QMP_ERROR_IO,
                 "cannot connect to %s: %s", path, g_strerror (errno));
    return NULL;
  }
  fcntl (q->fd, F_SETFL, fcntl (q->fd, F_GETFL) | O_NONBLOCK);
  if (!(greeting = read_message (q, deadline, &gerr))) {
    if (g_error_matches (gerr, TOOL_QMP_ERROR, TOOL_QMP_ERROR_TIMEOUT))
      g_prefix_error (&gerr, "%s is busy (another client, e.g. a running "
                      "backup, holds it): ", path);
    g_propagate_error (err, g_steal_pointer (&gerr));
    return NULL;
  }
  if (!json_object_object_get_ex (greeting, "QMP", NULL)) {
    g_set_error (err, TOOL_QMP_ERROR, TOOL_QMP_ERROR_IO,
                 "%s is not a QMP socket (no greeting)", path);
    return NULL;
  }
  if (!(caps = execute (q, "qmp_capabilities", NULL, deadline, err)))
    return NULL;
  return g_steal_pointer (&q);
}

json_object *
tool_qmp_execute (ToolQmp *q, const char *command, json_object *args,
                  GError **err)
{
  return execute (q, command, args,
                  g_get_monotonic_time () + (gint64) q->timeout_ms * 1000, err);
}

char *
tool_qmp_hmp (ToolQmp *q, const char *command_line, GError **err)
{
  json_object *args = json_object_new_object ();
  g_autoptr (json_object) r = NULL;

  json_object_object_add (args, "command-line",
                          json_object_new_string (command_line));
  r = tool_qmp_execute (q, "human-monitor-command", args, err);
  if (!r)
    return NULL;
  return g_strdup (json_object_get_string (r));
}
