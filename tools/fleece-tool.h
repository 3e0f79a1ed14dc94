/* Shared by the fleece command's files: exit codes, the option table,
 * signals, output (JSON events, progress, messages) and formatting.  The
 * command sees nothing of libfleece but include/fleece/fleece.h. */
#ifndef FLEECE_TOOL_H
#define FLEECE_TOOL_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <glib.h>
#include <glib/gstdio.h>
#include <json-c/json.h>

#include "fleece/fleece.h"

G_DEFINE_AUTOPTR_CLEANUP_FUNC (json_object, json_object_put)

#define TOOL_EXIT_OK 0
#define TOOL_EXIT_FAILED 1
#define TOOL_EXIT_USAGE 2

/* When the command started (monotonic), for JSON event times. */
extern gint64 tool_start_us;

/* ---- the option table (options.c) ---------------------------------- */

/* The commands an option applies to. */
enum {
  TOOL_CMD_BACKUP = 1u << 0,
  TOOL_CMD_PLAN = 1u << 1,
  TOOL_CMD_STATUS = 1u << 2,
  TOOL_CMD_CLEANUP = 1u << 3,
  TOOL_CMD_RESTORE = 1u << 4,
};

/* Every option of every command, as given (strings are NULL when not
 * given), then checked and converted by tool_parse_options().  Defaults
 * are the library's: what is not given is not set. */
typedef struct {
  /* the VM and the library */
  char *vmid_s;
  char *qmp;                  /* absolute */
  char *state_dir;            /* absolute */
  char *storage;              /* DIR (absolute) or rbd:POOL[/NAMESPACE] */
  char *rbd_conf, *rbd_id, *rbd_keyring;
  char *engine_s;
  char *devices_s;
  gboolean all_drives, no_fleecing, fleecing_optional;
  /* output */
  gboolean json, verbose;
  int progress;               /* -1: not given, 0 or 1: the last one given */
  /* backup */
  char *target_dir, *target_format, *target_nbd, *vma, *pve_args;
  char *bwlimit_s, *cbw_timeout_s;
  char *bitmap, *incremental, *base;
  /* restore */
  char *out, *format;

  /* converted */
  uint32_t vmid;
  int engine;                 /* -1: not given */
  char **devices;             /* drive keys, NULL for every drive */
  uint64_t bwlimit;
  uint64_t cbw_timeout;
} ToolOpts;

/* Parse argv for command cmd (one of TOOL_CMD_*, named name): unknown
 * options, a repeated option, an empty value, a missing required one and
 * bad values are usage errors (exit 2). */
void tool_parse_options (unsigned cmd, const char *name, const char *summary,
                         const char *description, int argc, char **argv,
                         ToolOpts *o);
void tool_opts_clear (ToolOpts *o);

/* ---- the handle (handle.c) ----------------------------------------- */

typedef struct Ui Ui;

/* A handle with what o says of the VM: vmid, state dir, engine, storage,
 * drives, plan flags; the log goes to ui.  Values the library refuses
 * are usage errors (exit 2); a storage this libfleece cannot provide
 * (ENOTSUP, e.g. RBD without librbd) is a failure (exit 1). */
struct fleece_handle *tool_handle_new (const char *cmd, const ToolOpts *o,
                                       Ui *ui);
/* Plan; a --devices naming a drive the VM lacks is a usage error. */
struct fleece_plan *tool_plan (Ui *ui, struct fleece_handle *h,
                               const ToolOpts *o);
const char *tool_engine_name (int engine);
/* The library's last error, never NULL. */
const char *tool_error (void);

/* ---- signals (util.c) ---------------------------------------------- */

/* The number of the last SIGINT, SIGTERM or SIGHUP received, 0 if none. */
extern volatile sig_atomic_t tool_signal;
/* Catch SIGINT, SIGTERM and SIGHUP into tool_signal, and ask the handle
 * set with tool_set_cancel() (if any) to cancel its run, from the handler
 * (fleece_cancel() is async-signal-safe).  No SA_RESTART; SIGPIPE is
 * ignored. */
void tool_catch_signals (void);
void tool_set_cancel (struct fleece_handle *h);
const char *tool_signal_name (int sig);

/* ---- usage errors and values (util.c) ------------------------------ */

/* "fleece <cmd>: <message>" on stderr, exit 2. */
G_GNUC_NORETURN void tool_usage_error (const char *cmd, const char *fmt, ...)
  G_GNUC_PRINTF (2, 3);
/* A decimal number in [min, max] (digits only); false if not. */
bool tool_parse_u64 (const char *s, uint64_t min, uint64_t max, uint64_t *out);

/* ---- formatting (util.c) ------------------------------------------- */

/* "16.0 MiB", "528.0 KiB", "512 B" (g_free). */
char *tool_size (uint64_t bytes);
/* A duration in microseconds: "1.9 ms", "812 ms", "1.6 s", "2 min 05 s". */
char *tool_duration (gint64 us);
/* An ETA in seconds as "0:42" or "1:02:03". */
char *tool_eta (double seconds);
/* s with control characters (and bytes that are not UTF-8) shown as \xNN,
 * so that a string from a record or from QEMU cannot drive the terminal;
 * "(none)" for NULL (g_free). */
char *tool_escape (const char *s);

/* ---- output (ui.c) ------------------------------------------------- */

/* One drive of a backup, as the command shows it. */
typedef struct {
  char *key;
  char *device;
  char *image;          /* NULL if not fleeced */
  char *target;         /* where its backup goes, for people */
  bool fleeced;
  uint64_t size;
  uint64_t done, total;
  gint64 done_us;       /* when done reached total (monotonic), 0 if not */
  char *result;         /* "not started", "running", "ok", "cancelled",
                         * "failed" */
  char *error;          /* why it failed, or NULL */
  int64_t elapsed_ms;   /* -1 if not known */
  /* the rate: samples of (time, done) */
  gint64 st[16];
  uint64_t sd[16];
  int ns;
  int last_decile;
  gint64 last_line_us;
  gint64 last_event_us;
  uint64_t last_event_done;
} UiDrive;

struct Ui {
  const char *cmd;
  bool json;
  bool progress;
  bool tty;
  bool verbose;
  uint32_t vmid;
  struct fleece_handle *h;  /* for the backup's figures */
  GPtrArray *drives;        /* UiDrive */
  gint64 start_us;          /* the jobs started (monotonic), 0 before */
  int live_lines;
  gint64 last_draw_us;
  gint64 last_totals_us;
  bool finishing;
  /* the whole backup's rate */
  gint64 tst[16];
  uint64_t tsd[16];
  int tns;
};

/* The log callback (user data: the Ui). */
void ui_log (void *opaque, int level, const char *msg);
/* The progress callback (user data: the Ui). */
void ui_progress (void *opaque, const char *key, uint64_t done,
                  uint64_t total);
/* Whatever display is due; final once the backup ended. */
void ui_tick (Ui *ui, bool final);
/* Remove the live display from the terminal (before other messages). */
void ui_clear_live (Ui *ui);
/* "fleece <cmd>: <message>" on stderr, the message escaped. */
void ui_say (Ui *ui, const char *fmt, ...) G_GNUC_PRINTF (2, 3);
void ui_drive_free (UiDrive *d);
UiDrive *ui_drive (Ui *ui, const char *key);

/* Print one JSON event (a line with "event" and "time") on stdout; ev is
 * consumed. */
void tool_emit (const char *event, json_object *ev);
void tool_jadd_str (json_object *o, const char *k, const char *v);
void tool_jadd_u64 (json_object *o, const char *k, uint64_t v);
/* Seconds with millisecond precision, printed as such. */
json_object *tool_jseconds (gint64 us);

/* ---- commands -------------------------------------------------------- */

int tool_cmd_backup (int argc, char **argv);
int tool_cmd_plan (int argc, char **argv);
int tool_cmd_status (int argc, char **argv);
int tool_cmd_cleanup (int argc, char **argv);
int tool_cmd_restore (int argc, char **argv);
int tool_demo (int argc, char **argv);

#endif
