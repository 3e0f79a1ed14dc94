/* Shared by the fleece command's files: exit codes, signals, formatting,
 * and a small QMP client for what the library's public API does not expose
 * (status's view of QEMU, the demo's guest writes and helper daemons). */
#ifndef FLEECE_TOOL_H
#define FLEECE_TOOL_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <glib.h>
#include <glib/gstdio.h>
#include <json-c/json.h>

G_DEFINE_AUTOPTR_CLEANUP_FUNC (json_object, json_object_put)

#define TOOL_EXIT_OK 0
#define TOOL_EXIT_FAILED 1
#define TOOL_EXIT_USAGE 2

/* ---- signals (util.c) ---------------------------------------------- */

/* The number of the last SIGINT, SIGTERM or SIGHUP received, 0 if none. */
extern volatile sig_atomic_t tool_signal;
/* Catch SIGINT, SIGTERM and SIGHUP into tool_signal (no SA_RESTART, so a
 * blocking poll returns EINTR); ignore SIGPIPE. */
void tool_catch_signals (void);
const char *tool_signal_name (int sig);

/* ---- usage errors (util.c) ----------------------------------------- */

/* "fleece <cmd>: <message>" on stderr, exit 2. */
G_GNUC_NORETURN void tool_usage_error (const char *cmd, const char *fmt, ...)
  G_GNUC_PRINTF (2, 3);

/* A decimal number in [min, max] (digits only); false if not. */
bool tool_parse_u64 (const char *s, uint64_t min, uint64_t max, uint64_t *out);

/* ---- formatting (util.c) ------------------------------------------- */

/* "16.0 MiB", "528.0 KiB", "512 bytes" (g_free). */
char *tool_size (uint64_t bytes);
/* A duration in microseconds: "1.9 ms", "812 ms", "1.6 s", "2 min 05 s"
 * (g_free). */
char *tool_duration (gint64 us);
/* An ETA in seconds as "0:42" or "1:02:03" (g_free). */
char *tool_eta (double seconds);

/* ---- a minimal QMP client (qmp-client.c) --------------------------- */

typedef struct ToolQmp ToolQmp;

#define TOOL_QMP_ERROR (tool_qmp_error_quark ())
GQuark tool_qmp_error_quark (void);
typedef enum {
  TOOL_QMP_ERROR_IO,           /* connect, read or write failed */
  TOOL_QMP_ERROR_TIMEOUT,      /* no answer in time */
  TOOL_QMP_ERROR_INTERRUPTED,  /* a signal arrived (tool_signal is set) */
  TOOL_QMP_ERROR_COMMAND,      /* QEMU answered with an error */
} ToolQmpError;

/* Connect to a QMP unix socket, read the greeting and negotiate
 * capabilities, all within timeout_ms.  A monitor already used by another
 * client accepts the connection but sends no greeting: that times out. */
ToolQmp *tool_qmp_connect (const char *path, int timeout_ms, GError **err);
/* Timeout of each later command. */
void tool_qmp_set_timeout (ToolQmp *q, int timeout_ms);
/* Run a command; args (may be NULL) is consumed.  Returns the "return"
 * value (json_object_put it). */
json_object *tool_qmp_execute (ToolQmp *q, const char *command,
                               json_object *args, GError **err);
/* Run an HMP command line; returns its output (g_free). */
char *tool_qmp_hmp (ToolQmp *q, const char *command_line, GError **err);
void tool_qmp_free (ToolQmp *q);
G_DEFINE_AUTOPTR_CLEANUP_FUNC (ToolQmp, tool_qmp_free)

/* ---- subcommands ----------------------------------------------------- */

int tool_demo (int argc, char **argv);

#endif
