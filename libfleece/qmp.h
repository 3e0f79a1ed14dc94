/* QMP transport (internal).
 *
 * One blocking connection to a QMP monitor.  Every message is built and
 * parsed with json-c.  Replies are matched to commands by a unique "id";
 * asynchronous events that arrive meanwhile are queued so that callers can
 * wait for specific ones later.  Memory is bounded: a message longer than
 * the maximum is an error, never an unbounded allocation.
 *
 * Errors are GErrors in the FLEECE_QMP_ERROR domain (codes below).  For a
 * QMP error reply (FLEECE_QMP_ERROR_COMMAND) the message is
 * "<command>: <desc>" and the class and desc are kept on the connection
 * (fleece_qmp_last_error_class / _desc).
 */
#ifndef FLEECE_QMP_H
#define FLEECE_QMP_H

#include <stdbool.h>
#include <stddef.h>
#include <glib.h>
#include <json-c/json.h>

G_BEGIN_DECLS

#define FLEECE_QMP_ERROR (fleece_qmp_error_quark ())
GQuark fleece_qmp_error_quark (void);

typedef enum {
  FLEECE_QMP_ERROR_IO,        /* connect/read/write failed (errno in msg) */
  FLEECE_QMP_ERROR_EOF,       /* the peer closed the connection */
  FLEECE_QMP_ERROR_TIMEOUT,   /* no reply within the timeout */
  FLEECE_QMP_ERROR_PROTOCOL,  /* malformed JSON or unexpected message */
  FLEECE_QMP_ERROR_TOO_LARGE, /* a message exceeded the size limit */
  FLEECE_QMP_ERROR_COMMAND,   /* QEMU answered with an error reply */
  FLEECE_QMP_ERROR_NO_PEER,   /* nobody listens: no socket, or refused */
  FLEECE_QMP_ERROR_BUSY,      /* the socket accepts but QEMU does not greet:
                               * another client holds the monitor */
  FLEECE_QMP_ERROR_CANCELLED, /* the cancel fd became readable */
} FleeceQmpErrorCode;

/* Default limits. */
#define FLEECE_QMP_DEFAULT_TIMEOUT_MS 60000
/* QEMU greets at once unless another client holds the monitor. */
#define FLEECE_QMP_DEFAULT_GREETING_TIMEOUT_MS 5000
#define FLEECE_QMP_DEFAULT_MAX_MESSAGE (16u * 1024 * 1024)
#define FLEECE_QMP_MAX_QUEUED_EVENTS 1024

typedef struct FleeceQmp FleeceQmp;

FleeceQmp *fleece_qmp_new (void);
void fleece_qmp_free (FleeceQmp *q);
G_DEFINE_AUTOPTR_CLEANUP_FUNC (FleeceQmp, fleece_qmp_free)

/* Limits; apply to later calls. */
void fleece_qmp_set_timeout (FleeceQmp *q, int timeout_ms);
void fleece_qmp_set_max_message (FleeceQmp *q, size_t bytes);
void fleece_qmp_set_greeting_timeout (FleeceQmp *q, int timeout_ms);
/* While fd (>= 0) is readable every wait of q (connect, greeting, reply,
 * event) gives up at once with FLEECE_QMP_ERROR_CANCELLED; -1 disarms.
 * A reply given up on leaves the connection usable: its late answer is
 * recognised by its id and ignored. */
void fleece_qmp_set_cancel_fd (FleeceQmp *q, int fd);

/* Connect to a unix socket path, or adopt a connected fd (closed by
 * fleece_qmp_free, also if this fails).  Both read the greeting and send
 * qmp_capabilities. */
bool fleece_qmp_connect_unix (FleeceQmp *q, const char *path, GError **err);
bool fleece_qmp_connect_fd (FleeceQmp *q, int fd, GError **err);
bool fleece_qmp_is_connected (FleeceQmp *q);
/* The greeting's QMP.version.qemu object {major, minor, micro}. */
void fleece_qmp_get_version (FleeceQmp *q, int *major, int *minor, int *micro);

/* Execute a command.  args (may be NULL) is consumed.  Returns a new
 * reference to the "return" value, or NULL with err set. */
json_object *fleece_qmp_execute (FleeceQmp *q, const char *command,
                                 json_object *args, GError **err);

/* Same with a per-call timeout (ms; -1: the connection's default). */
json_object *fleece_qmp_execute_timeout (FleeceQmp *q, const char *command,
                                         json_object *args, int timeout_ms,
                                         GError **err);

/* Execute a command passing fd along (SCM_RIGHTS), for getfd / add-fd. */
json_object *fleece_qmp_execute_fd (FleeceQmp *q, const char *command,
                                    json_object *args, int fd, GError **err);

/* HMP passthrough via human-monitor-command; returns its output text
 * (g_free), or NULL with err set. */
char *fleece_qmp_hmp (FleeceQmp *q, const char *command_line, GError **err);

/* Events.  A matcher returns true for an event it wants; data is the
 * event's "data" member (may be NULL). */
typedef bool (*FleeceQmpEventMatch) (const char *event, json_object *data,
                                     void *opaque);

/* Remove and return the first queued event matching (or NULL if none);
 * does not read from the socket.  The returned object is the whole event
 * message {"event", "data", "timestamp"}. */
json_object *fleece_qmp_take_event (FleeceQmp *q, FleeceQmpEventMatch match,
                                    void *opaque);

/* Like take_event, but reads from the socket until a matching event arrives
 * or timeout_ms passes (-1 forever; 0 only drains what is readable now).
 * Returns NULL and sets FLEECE_QMP_ERROR_TIMEOUT on timeout. */
json_object *fleece_qmp_wait_event (FleeceQmp *q, FleeceQmpEventMatch match,
                                    void *opaque, int timeout_ms,
                                    GError **err);

/* Number of queued events (for tests). */
size_t fleece_qmp_queued_events (FleeceQmp *q);

/* The class and desc of the last error reply (NULL if none yet). */
const char *fleece_qmp_last_error_class (FleeceQmp *q);
const char *fleece_qmp_last_error_desc (FleeceQmp *q);

/* Number of commands sent (round trips) since the connection was made. */
unsigned fleece_qmp_round_trips (FleeceQmp *q);

/* Feature probing from query-qmp-schema, so engines decide by capability,
 * not by version strings. */
typedef struct FleeceQmpSchema FleeceQmpSchema;
FleeceQmpSchema *fleece_qmp_schema_load (FleeceQmp *q, GError **err);
void fleece_qmp_schema_free (FleeceQmpSchema *s);
G_DEFINE_AUTOPTR_CLEANUP_FUNC (FleeceQmpSchema, fleece_qmp_schema_free)
bool fleece_qmp_schema_has_command (FleeceQmpSchema *s, const char *command);
/* Does the command accept this argument (walking its arg-type, including
 * bases and the variants of unions)? */
bool fleece_qmp_schema_command_has_arg (FleeceQmpSchema *s,
                                        const char *command,
                                        const char *arg);
/* Does blockdev-add's BlockdevOptions variant for driver have member? */
bool fleece_qmp_schema_driver_has_member (FleeceQmpSchema *s,
                                          const char *driver,
                                          const char *member);
/* Is driver a value of the BlockdevDriver enum? */
bool fleece_qmp_schema_has_driver (FleeceQmpSchema *s, const char *driver);
/* Does the object type reachable as command's argument arg (e.g.
 * blockdev-backup's x-perf) have member (e.g. min-cluster-size)? */
bool fleece_qmp_schema_arg_has_member (FleeceQmpSchema *s,
                                       const char *command, const char *arg,
                                       const char *member);

G_END_DECLS

#endif
