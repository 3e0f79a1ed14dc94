/* The handle's way to QEMU's monitor (internal).
 *
 * QEMU's QMP monitor serves one client at a time, and qemu-server connects
 * for each of its commands.  So the library connects only while a public
 * call runs: the first command of a call connects (greeting, capabilities),
 * the end of the call lets go, and a wait between two polls holds nothing.
 * Only a connection adopted from the caller's fd stays for the handle's
 * life.
 *
 * A cancel fd, when armed, makes every wait give up at once (connect,
 * greeting, reply, event, the sleeps between polls). */
#ifndef FLEECE_CONN_H
#define FLEECE_CONN_H

#include <stdbool.h>
#include <glib.h>
#include <json-c/json.h>

#include "qmp.h"

G_BEGIN_DECLS

typedef struct FleeceConn FleeceConn;

FleeceConn *fleece_conn_new (void);
void fleece_conn_free (FleeceConn *c);
G_DEFINE_AUTOPTR_CLEANUP_FUNC (FleeceConn, fleece_conn_free)

/* Connect to path for each call (replacing an earlier path or fd). */
void fleece_conn_set_path (FleeceConn *c, const char *path);
/* Keep an already connected fd for good (closed by free; also on error). */
bool fleece_conn_adopt_fd (FleeceConn *c, int fd, GError **err);
/* The socket path, or NULL for an adopted fd or before any. */
const char *fleece_conn_path (FleeceConn *c);
/* A path or an fd was given. */
bool fleece_conn_configured (FleeceConn *c);

void fleece_conn_set_timeout (FleeceConn *c, int timeout_ms);
/* How long the next connects wait for a greeting (<= 0: the default). */
void fleece_conn_set_greeting_timeout (FleeceConn *c, int timeout_ms);
/* -1 disarms; see fleece_qmp_set_cancel_fd(). */
void fleece_conn_set_cancel_fd (FleeceConn *c, int fd);

/* The live connection, connecting first if there is none. */
FleeceQmp *fleece_conn_get (FleeceConn *c, GError **err);
/* Let go of the monitor (not of an adopted fd). */
void fleece_conn_release (FleeceConn *c);

/* Commands on the live connection (connecting first).  args is consumed. */
json_object *fleece_conn_execute (FleeceConn *c, const char *cmd,
                                  json_object *args, GError **err);
json_object *fleece_conn_execute_timeout (FleeceConn *c, const char *cmd,
                                          json_object *args, int timeout_ms,
                                          GError **err);
/* A command that takes fd along (SCM_RIGHTS): getfd, add-fd. */
json_object *fleece_conn_execute_fd (FleeceConn *c, const char *cmd,
                                     json_object *args, int fd, GError **err);
/* The same when only success matters. */
bool fleece_conn_do (FleeceConn *c, const char *cmd, json_object *args,
                     GError **err);
/* HMP through human-monitor-command; success only if its output, stripped,
 * equals expect (HMP reports errors as text). */
bool fleece_conn_hmp (FleeceConn *c, const char *line, int timeout_ms,
                      const char *expect, GError **err);
/* Wait up to timeout_ms for an event that match accepts (on the live
 * connection: events sent while disconnected are lost, so callers also
 * look at QEMU's state). */
json_object *fleece_conn_wait_event (FleeceConn *c, FleeceQmpEventMatch match,
                                     void *opaque, int timeout_ms,
                                     GError **err);
/* Let go of the monitor and sleep ms; false with FLEECE_QMP_ERROR_CANCELLED
 * if the cancel fd becomes readable meanwhile. */
bool fleece_conn_sleep (FleeceConn *c, int ms, GError **err);

/* Connections made so far (for tests and benchmarks). */
unsigned fleece_conn_connects (FleeceConn *c);

G_END_DECLS

#endif
