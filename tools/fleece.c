/* fleece(1): fleecing backups of running QEMU VMs from the command line.
 *
 * Built on the public API of libfleece only.  Each subcommand parses its
 * own options (GOptionContext), validates every value up front (exit 2 with
 * a one-line message naming the fix), then drives the library.  backup
 * always ends with fleece_cleanup(), also after a failure or a signal. */
#include <errno.h>
#include <locale.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fleece/fleece.h"
#include "fleece-tool.h"

#define DEFAULT_STATE_DIR "/var/lib/fleece"
#define STATUS_QMP_TIMEOUT_MS 3000
#define VMID_MAX 999999999u
/* The TTY display is redrawn at most this often. */
#define DRAW_INTERVAL_US (200 * 1000)
/* Without a TTY: a line per drive at each 10 % or after this long. */
#define PLAIN_INTERVAL_US (60 * G_USEC_PER_SEC)
/* --json progress events, per drive. */
#define JSON_INTERVAL_US (1 * G_USEC_PER_SEC)
/* The rate is measured over the last few seconds. */
#define RATE_SAMPLES 16
#define RATE_SAMPLE_US (300 * 1000)

static gint64 tool_start_us;

/* ---- option helpers ------------------------------------------------- */

/* --progress / --no-progress: the last one given wins. */
static int progress_choice = -1;

static gboolean
on_progress_opt (const char *name, const char *value, gpointer data,
                 GError **err)
{
  progress_choice = strcmp (name, "--no-progress") != 0;
  return TRUE;
}

static void
parse_options (const char *cmd, GOptionEntry *entries, const char *params,
               const char *summary, const char *description, int *argc,
               char ***argv)
{
  g_autoptr (GOptionContext) ctx = g_option_context_new (params);
  g_autoptr (GError) err = NULL;
  g_autofree char *prgname = g_strdup_printf ("fleece %s", cmd);

  g_set_prgname (prgname);
  g_option_context_set_summary (ctx, summary);
  if (description)
    g_option_context_set_description (ctx, description);
  g_option_context_add_main_entries (ctx, entries, NULL);
  if (!g_option_context_parse (ctx, argc, argv, &err)) {
    /* GLib's "Unknown option --x" reads better lower-cased here. */
    err->message[0] = g_ascii_tolower (err->message[0]);
    tool_usage_error (cmd, "%s; see 'fleece %s --help'", err->message, cmd);
  }
  if (*argc > 1)
    tool_usage_error (cmd, "unexpected argument '%s'; see 'fleece %s --help'",
                      (*argv)[1], cmd);
}

static uint32_t
need_vmid (const char *cmd, const char *s)
{
  uint64_t v;

  if (!s)
    tool_usage_error (cmd, "missing --vmid ID (the VM's id, e.g. --vmid 100)");
  if (!tool_parse_u64 (s, 1, VMID_MAX, &v))
    tool_usage_error (cmd, "--vmid must be a number from 1 to %u, not '%s'",
                      VMID_MAX, s);
  return (uint32_t) v;
}

/* Paths go into the durable record, which a later "fleece cleanup" run
 * from another directory reads: make them absolute. */
static char *
abs_path (const char *p)
{
  return p ? g_canonicalize_filename (p, NULL) : NULL;
}

static char *
need_dir (const char *cmd, const char *opt, const char *value,
          const char *example)
{
  char *dir;

  if (!value)
    tool_usage_error (cmd, "missing %s DIR (%s)", opt, example);
  if (!*value)
    tool_usage_error (cmd, "%s needs a directory, e.g. %s", opt, example);
  dir = abs_path (value);
  if (!g_file_test (dir, G_FILE_TEST_IS_DIR))
    tool_usage_error (cmd, "%s %s: no such directory; create it first", opt,
                      value);
  return dir;
}

/* "drive-scsi0,virtio1" -> {"scsi0", "virtio1", NULL} */
static char **
parse_devices (const char *cmd, const char *value)
{
  g_auto (GStrv) parts = g_strsplit (value, ",", -1);
  g_autoptr (GPtrArray) keys = g_ptr_array_new_with_free_func (g_free);

  for (size_t i = 0; parts[i]; i++) {
    const char *k = g_strstrip (parts[i]);

    if (g_str_has_prefix (k, "drive-"))
      k += strlen ("drive-");
    if (!*k)
      tool_usage_error (cmd, "--devices takes a comma-separated list of "
                        "drives, e.g. --devices scsi0,drive-virtio1");
    if (!g_ptr_array_find_with_equal_func (keys, k, g_str_equal, NULL))
      g_ptr_array_add (keys, g_strdup (k));
  }
  g_ptr_array_add (keys, NULL);
  return (char **) g_ptr_array_free (g_steal_pointer (&keys), FALSE);
}

static const char *
last_error (void)
{
  const char *e = fleece_get_error ();
  return e ? e : "unknown error";
}

static const char *
engine_name (struct fleece_handle *h)
{
  switch (fleece_get_engine (h)) {
  case FLEECE_ENGINE_QEMU: return "qemu";
  case FLEECE_ENGINE_PVE: return "pve";
  default: return "?";
  }
}

/* ---- output: JSON events and the progress display ------------------ */

typedef struct {
  char *key;
  char *device;
  char *image;          /* NULL if not fleeced */
  char *target;         /* where the backup goes, for the report */
  bool fleeced;
  uint64_t size;
  uint64_t done, total;
  gint64 done_us;       /* when done reached total (monotonic), 0 if not */
  const char *result;
  /* rate: samples of (time, done) */
  gint64 st[RATE_SAMPLES];
  uint64_t sd[RATE_SAMPLES];
  int ns;
  /* plain lines */
  int last_decile;
  gint64 last_line_us;
  /* JSON events */
  gint64 last_event_us;
  uint64_t last_event_done;
} Drive;

typedef struct {
  const char *cmd;
  bool json;
  bool progress;
  bool tty;
  bool verbose;
  uint32_t vmid;
  GPtrArray *drives;    /* Drive */
  gint64 start_us;      /* the jobs started (monotonic), 0 before */
  int live_lines;       /* lines of the TTY display on screen */
  gint64 last_draw_us;
} Ui;

/* Seconds with millisecond precision, printed as such (not 0.0719999...). */
static json_object *
jseconds (gint64 us)
{
  char text[32];

  g_snprintf (text, sizeof text, "%.3f", (double) us / G_USEC_PER_SEC);
  return json_object_new_double_s (g_ascii_strtod (text, NULL), text);
}

/* Print one event as a line of JSON on stdout; ev is consumed. */
static void
emit (const char *event, json_object *ev)
{
  json_object *o = json_object_new_object ();

  json_object_object_add (o, "event", json_object_new_string (event));
  json_object_object_add (o, "time", jseconds (g_get_monotonic_time () - tool_start_us));
  json_object_object_foreach (ev, k, v)
    json_object_object_add (o, k, json_object_get (v));
  json_object_put (ev);
  printf ("%s\n", json_object_to_json_string_ext (
            o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
  fflush (stdout);
  json_object_put (o);
}

static void
jadd_str (json_object *o, const char *k, const char *v)
{
  json_object_object_add (o, k, v ? json_object_new_string (v) : NULL);
}

static void
jadd_u64 (json_object *o, const char *k, uint64_t v)
{
  json_object_object_add (o, k, json_object_new_int64 ((int64_t) v));
}

static void
jadd_seconds (json_object *o, const char *k, gint64 us)
{
  json_object_object_add (o, k, jseconds (us));
}

static Drive *
ui_drive (Ui *ui, const char *key)
{
  for (guint i = 0; ui->drives && i < ui->drives->len; i++) {
    Drive *d = ui->drives->pdata[i];
    if (strcmp (d->key, key) == 0)
      return d;
  }
  return NULL;
}

static void
drive_free (Drive *d)
{
  g_free (d->key);
  g_free (d->device);
  g_free (d->image);
  g_free (d->target);
  g_free (d);
}

/* Bytes per second over the last samples, 0 if not known yet. */
static double
drive_rate (Drive *d)
{
  if (d->ns < 2 || d->st[d->ns - 1] == d->st[0])
    return 0;
  return (double) (d->sd[d->ns - 1] - d->sd[0]) * G_USEC_PER_SEC
         / (double) (d->st[d->ns - 1] - d->st[0]);
}

static void
drive_sample (Drive *d, gint64 now)
{
  if (d->ns && now - d->st[d->ns - 1] < RATE_SAMPLE_US)
    return;
  if (d->ns == RATE_SAMPLES) {
    memmove (d->st, d->st + 1, sizeof d->st[0] * (RATE_SAMPLES - 1));
    memmove (d->sd, d->sd + 1, sizeof d->sd[0] * (RATE_SAMPLES - 1));
    d->ns--;
  }
  d->st[d->ns] = now;
  d->sd[d->ns] = d->done;
  d->ns++;
}

static int
percent (uint64_t done, uint64_t total)
{
  return total ? (int) (done * 100 / total) : 0;
}

/* "scsi0  12.0 MiB / 32.0 MiB  37%  2.0 MiB/s  ETA 0:10" */
static char *
drive_line (Drive *d, bool bar, gint64 start_us)
{
  g_autofree char *done = tool_size (d->done);
  g_autofree char *total = tool_size (d->total);
  GString *s = g_string_new (NULL);

  g_string_append_printf (s, "%-10s ", d->key);
  if (bar) {
    int filled = d->total ? (int) (d->done * 20 / d->total) : 0;
    g_string_append_c (s, '[');
    for (int i = 0; i < 20; i++)
      g_string_append_c (s, i < filled ? '#' : '.');
    g_string_append (s, "] ");
  }
  g_string_append_printf (s, "%3d%%  %s / %s", percent (d->done, d->total),
                          done, total);
  if (d->done_us) {
    g_autofree char *t = tool_duration (d->done_us - start_us);
    g_string_append_printf (s, "  done in %s", t);
  } else {
    double rate = drive_rate (d);
    if (rate > 0) {
      g_autofree char *r = tool_size ((uint64_t) rate);
      g_autofree char *eta = tool_eta ((double) (d->total - MIN (d->done, d->total)) / rate);
      g_string_append_printf (s, "  %s/s  ETA %s", r, eta);
    }
  }
  return g_string_free (s, FALSE);
}

static void
ui_clear_live (Ui *ui)
{
  if (ui->live_lines) {
    fprintf (stderr, "\033[%dA\r\033[J", ui->live_lines);
    ui->live_lines = 0;
  }
}

static void
ui_draw (Ui *ui)
{
  GString *s = g_string_new (NULL);

  if (ui->live_lines)
    g_string_append_printf (s, "\033[%dA", ui->live_lines);
  for (guint i = 0; i < ui->drives->len; i++) {
    g_autofree char *line = drive_line (ui->drives->pdata[i], true, ui->start_us);
    g_string_append_printf (s, "\r\033[K  %s\n", line);
  }
  fflush (stdout);
  fputs (s->str, stderr);
  fflush (stderr);
  ui->live_lines = (int) ui->drives->len;
  g_string_free (s, TRUE);
}

static void
on_log (void *opaque, int level, const char *msg)
{
  Ui *ui = opaque;
  static const char *const names[] = { "error", "warning", "info", "debug" };
  const char *name = level >= 0 && level <= 3 ? names[level] : "info";

  if (level > FLEECE_LOG_WARNING && !ui->verbose)
    return;
  if (ui->json) {
    json_object *ev = json_object_new_object ();
    jadd_str (ev, "level", name);
    jadd_str (ev, "message", msg);
    emit ("log", ev);
    return;
  }
  ui_clear_live (ui);
  fprintf (stderr, "fleece %s: %s%s%s\n", ui->cmd,
           level <= FLEECE_LOG_WARNING ? name : "",
           level <= FLEECE_LOG_WARNING ? ": " : "", msg);
}

static void
drive_finished (Ui *ui, Drive *d)
{
  if (!ui->progress)
    return;
  if (ui->json) {
    json_object *ev = json_object_new_object ();
    jadd_str (ev, "drive", d->key);
    jadd_u64 (ev, "bytes", d->done);
    jadd_seconds (ev, "seconds", d->done_us - ui->start_us);
    emit ("drive-done", ev);
  } else if (!ui->tty) {
    g_autofree char *size = tool_size (d->done);
    g_autofree char *t = tool_duration (d->done_us - ui->start_us);
    fprintf (stderr, "fleece %s: %s done: %s in %s\n", ui->cmd, d->key, size, t);
  }
}

static void
on_progress (void *opaque, const char *key, uint64_t done, uint64_t total)
{
  Ui *ui = opaque;
  Drive *d = ui_drive (ui, key);

  if (!d)
    return;
  /* QEMU counts progress in whole clusters: a drive whose size is not a
   * multiple of the job's cluster ends "beyond" its size. */
  d->done = MIN (done, d->size);
  d->total = MIN (total, d->size);
  if (!d->done_us && total && done >= total) {
    d->done_us = g_get_monotonic_time ();
    drive_finished (ui, d);
  }
}

/* Called between waits: rates, and whatever display is due. */
static void
ui_tick (Ui *ui, bool final)
{
  gint64 now = g_get_monotonic_time ();

  for (guint i = 0; i < ui->drives->len; i++)
    drive_sample (ui->drives->pdata[i], now);
  if (!ui->progress)
    return;

  if (ui->json) {
    for (guint i = 0; i < ui->drives->len; i++) {
      Drive *d = ui->drives->pdata[i];
      json_object *ev;
      double rate = drive_rate (d);

      if (d->done_us || d->done == d->last_event_done ||
          (!final && now - d->last_event_us < JSON_INTERVAL_US))
        continue;
      ev = json_object_new_object ();
      jadd_str (ev, "drive", d->key);
      jadd_u64 (ev, "done", d->done);
      jadd_u64 (ev, "total", d->total);
      if (rate > 0) {
        jadd_u64 (ev, "rate", (uint64_t) rate);
        json_object_object_add (ev, "eta", json_object_new_int64 (
                                  (int64_t) ((double) (d->total - MIN (d->done, d->total)) / rate + 0.5)));
      }
      emit ("progress", ev);
      d->last_event_us = now;
      d->last_event_done = d->done;
    }
  } else if (ui->tty) {
    if (final || now - ui->last_draw_us >= DRAW_INTERVAL_US) {
      ui_draw (ui);
      ui->last_draw_us = now;
    }
  } else {
    for (guint i = 0; i < ui->drives->len; i++) {
      Drive *d = ui->drives->pdata[i];
      int decile = d->total ? (int) (d->done * 10 / d->total) : 0;

      if (d->done_us || d->done == 0)
        continue;
      if (decile > d->last_decile || now - d->last_line_us >= PLAIN_INTERVAL_US) {
        g_autofree char *line = drive_line (d, false, ui->start_us);
        fprintf (stderr, "fleece %s: %s\n", ui->cmd, line);
        d->last_decile = decile;
        d->last_line_us = now;
      }
    }
  }
}

/* ---- backup --------------------------------------------------------- */

typedef struct {
  char *qmp;
  char *storage;
  char *target_dir;
  char *target_format;
  char *target_nbd;
  char **devices;
  char *bitmap;
  char *state_dir;
  uint64_t bwlimit;
  uint64_t cbw_timeout;
  bool cbw_timeout_set;
  bool all_drives;
  bool no_fleecing;
} BackupOpts;

/* Plan with every drive first, so a --devices naming a drive the VM lacks
 * is a usage error that lists what it has. */
static bool
check_devices (Ui *ui, struct fleece_handle *h, char **devices)
{
  struct fleece_plan *p = fleece_plan (h);
  g_autoptr (GString) have = g_string_new (NULL);
  size_t n;

  if (!p)
    return false;
  n = fleece_plan_get_drive_count (p);
  for (size_t i = 0; i < n; i++)
    g_string_append_printf (have, "%s%s", i ? ", " : "",
                            fleece_plan_get_key (p, i));
  for (size_t j = 0; devices[j]; j++) {
    bool found = false;
    for (size_t i = 0; i < n && !found; i++)
      found = strcmp (fleece_plan_get_key (p, i), devices[j]) == 0;
    if (!found)
      tool_usage_error (ui->cmd, "--devices: VM %u has no drive '%s'; it has %s",
                        ui->vmid, devices[j], have->len ? have->str : "none");
  }
  fleece_plan_free (p);
  return fleece_set_drives (h, (const char *const *) devices) == 0;
}

static void
print_plan_header (Ui *ui, struct fleece_handle *h, struct fleece_plan *p,
                   const BackupOpts *o)
{
  size_t n = fleece_plan_get_drive_count (p);
  size_t fleeced = 0;

  for (size_t i = 0; i < n; i++)
    fleeced += fleece_plan_get_fleeced (p, i) == 1;
  if (ui->json) {
    g_autofree char *text = fleece_plan_to_json (p);
    json_object *plan = text ? json_tokener_parse (text) : NULL;
    emit ("plan", plan ? plan : json_object_new_object ());
    return;
  }
  printf ("fleece backup: VM %u, %zu drive%s (%zu fleeced) to %s%s%s\n",
          ui->vmid, n, n == 1 ? "" : "s", fleeced,
          o->target_dir ? o->target_dir : o->target_nbd,
          o->target_dir ? " as " : "", o->target_dir ? o->target_format : "");
  for (size_t i = 0; i < n; i++) {
    g_autofree char *size = tool_size (fleece_plan_get_size (p, i));
    if (fleece_plan_get_fleeced (p, i) == 1)
      printf ("  %-10s %10s  fleeced via %s/%s\n", fleece_plan_get_key (p, i),
              size, o->storage, fleece_plan_get_image (p, i));
    else
      printf ("  %-10s %10s  not fleeced (%s)\n", fleece_plan_get_key (p, i),
              size, fleece_plan_get_reason (p, i) ? fleece_plan_get_reason (p, i)
                                                  : "");
  }
  fflush (stdout);
}

/* The failed drive's key from "... backup of <key> failed: ...", if any. */
static char *
failed_drive (const char *error)
{
  const char *s = error ? strstr (error, "backup of ") : NULL;
  const char *e;

  if (!s)
    return NULL;
  s += strlen ("backup of ");
  e = strstr (s, " failed");
  return e && e > s && !memchr (s, ' ', (size_t) (e - s)) ? g_strndup (s, (size_t) (e - s))
                                                          : NULL;
}

static void
print_result (Ui *ui, const char *result, const char *error, int sig,
              const char *cleanup_error, gint64 end_us, bool fleecing)
{
  if (ui->json) {
    json_object *ev = json_object_new_object ();
    json_object *drives = json_object_new_array ();

    jadd_u64 (ev, "vmid", ui->vmid);
    jadd_str (ev, "result", result);
    jadd_str (ev, "error", error);
    jadd_str (ev, "signal", sig ? tool_signal_name (sig) : NULL);
    json_object_object_add (ev, "fleecing", json_object_new_boolean (fleecing));
    jadd_seconds (ev, "seconds", end_us - tool_start_us);
    jadd_str (ev, "cleanup", cleanup_error ? "failed" : "ok");
    jadd_str (ev, "cleanup-error", cleanup_error);
    for (guint i = 0; ui->drives && i < ui->drives->len; i++) {
      Drive *d = ui->drives->pdata[i];
      json_object *j = json_object_new_object ();

      jadd_str (j, "key", d->key);
      jadd_str (j, "device", d->device);
      json_object_object_add (j, "fleeced", json_object_new_boolean (d->fleeced));
      jadd_str (j, "image", d->image);
      jadd_u64 (j, "size", d->size);
      jadd_u64 (j, "bytes", d->done);
      if (ui->start_us)
        jadd_seconds (j, "seconds", (d->done_us ? d->done_us : end_us) - ui->start_us);
      else
        json_object_object_add (j, "seconds", NULL);
      jadd_str (j, "result", d->result);
      jadd_str (j, "target", d->target);
      json_object_array_add (drives, j);
    }
    json_object_object_add (ev, "drives", drives);
    emit ("result", ev);
    return;
  }

  {
    g_autofree char *t = tool_duration (end_us - tool_start_us);

    if (strcmp (result, "ok") == 0)
      printf ("fleece backup: VM %u backed up in %s\n", ui->vmid, t);
    else
      printf ("fleece backup: the backup of VM %u %s after %s\n", ui->vmid,
              strcmp (result, "cancelled") == 0 ? "was cancelled" : "failed", t);
  }
  if (ui->drives && ui->drives->len) {
    printf ("  %-10s %-8s %-24s %10s %9s  %-11s %s\n", "drive", "fleeced",
            "image", "bytes", "time", "result", "target");
    for (guint i = 0; i < ui->drives->len; i++) {
      Drive *d = ui->drives->pdata[i];
      g_autofree char *bytes = tool_size (d->done);
      g_autofree char *t = ui->start_us
        ? tool_duration ((d->done_us ? d->done_us : end_us) - ui->start_us)
        : g_strdup ("-");
      printf ("  %-10s %-8s %-24s %10s %9s  %-11s %s\n", d->key,
              d->fleeced ? "yes" : "no", d->image ? d->image : "-", bytes, t,
              d->result, d->target);
    }
  }
  fflush (stdout);
}

static int
run_backup (Ui *ui, struct fleece_handle *h, struct fleece_target *t,
            const BackupOpts *o, const char *qmp)
{
  struct fleece_plan *p = NULL;
  g_autofree char *error = NULL;
  g_autofree char *cleanup_error = NULL;
  g_autofree char *bad = NULL;
  const char *result = "failed";
  bool need_cleanup = false;
  bool cancelled = false;
  int sig = 0;
  int r = -1;

  if (fleece_connect (h, qmp) < 0) {
    error = g_strdup_printf ("cannot connect to QEMU: %s", last_error ());
    goto out;
  }
  if (o->devices && !check_devices (ui, h, o->devices)) {
    error = g_strdup (last_error ());
    goto out;
  }
  if (!(p = fleece_plan (h))) {
    error = g_strdup (last_error ());
    goto out;
  }
  ui->drives = g_ptr_array_new_with_free_func ((GDestroyNotify) drive_free);
  for (size_t i = 0; i < fleece_plan_get_drive_count (p); i++) {
    Drive *d = g_new0 (Drive, 1);
    const char *key = fleece_plan_get_key (p, i);

    d->key = g_strdup (key);
    d->device = g_strdup (fleece_plan_get_device (p, i));
    d->fleeced = fleece_plan_get_fleeced (p, i) == 1;
    d->image = d->fleeced ? g_strdup (fleece_plan_get_image (p, i)) : NULL;
    d->size = d->total = fleece_plan_get_size (p, i);
    d->result = "not started";
    if (o->target_dir)
      d->target = g_strdup_printf ("%s/%s.%s", o->target_dir, key, o->target_format);
    else
      d->target = g_strdup_printf ("%s (export %s)", o->target_nbd, key);
    g_ptr_array_add (ui->drives, d);
  }
  print_plan_header (ui, h, p, o);
  if (tool_signal)
    goto out;

  need_cleanup = true;
  if (fleece_attach (h, p) < 0) {
    /* Another run's lock: its record is not ours to undo. */
    need_cleanup = fleece_get_errno () != EBUSY;
    error = g_strdup (last_error ());
    goto out;
  }
  if (tool_signal)
    goto out;
  if (fleece_start (h, p, t) < 0) {
    error = g_strdup (last_error ());
    goto out;
  }
  ui->start_us = g_get_monotonic_time ();
  for (guint i = 0; i < ui->drives->len; i++)
    ((Drive *) ui->drives->pdata[i])->result = "running";
  if (ui->json) {
    json_object *ev = json_object_new_object ();
    jadd_u64 (ev, "vmid", ui->vmid);
    jadd_u64 (ev, "drives", ui->drives->len);
    emit ("started", ev);
  } else if (ui->progress && !ui->tty) {
    fprintf (stderr, "fleece backup: started\n");
  }

  while ((r = fleece_wait (h, 200)) == 0) {
    if (tool_signal && !cancelled) {
      sig = tool_signal;
      if (ui->json) {
        json_object *ev = json_object_new_object ();
        jadd_str (ev, "signal", tool_signal_name (sig));
        emit ("cancelling", ev);
      } else {
        ui_clear_live (ui);
        fprintf (stderr, "fleece backup: %s received: cancelling the backup "
                 "and cleaning up\n", tool_signal_name (sig));
      }
      if (fleece_cancel (h) < 0)
        on_log (ui, FLEECE_LOG_WARNING, last_error ());
      cancelled = true;
    }
    ui_tick (ui, false);
  }
  ui_tick (ui, true);
  if (r == 1) {
    result = "ok";
  } else if (fleece_get_errno () == ECANCELED && sig) {
    result = "cancelled";
    error = g_strdup_printf ("the backup was cancelled on %s",
                             tool_signal_name (sig));
  } else {
    result = fleece_get_errno () == ECANCELED ? "cancelled" : "failed";
    error = g_strdup (last_error ());
  }

 out:
  if (!ui->start_us && tool_signal) {
    sig = tool_signal;
    if (!error)
      error = g_strdup_printf ("interrupted by %s before the backup started",
                               tool_signal_name (sig));
    result = "cancelled";
  }
  if (need_cleanup && fleece_cleanup (h) < 0)
    cleanup_error = g_strdup_printf ("%s; run 'fleece cleanup --vmid %u' to "
                                     "retry", last_error (), ui->vmid);
  if (ui->json) {
    json_object *ev = json_object_new_object ();
    jadd_str (ev, "result", !need_cleanup ? "skipped" : cleanup_error ? "failed" : "ok");
    jadd_str (ev, "error", cleanup_error);
    emit ("cleanup", ev);
  }

  /* An unfinished backup is of no use, and its images would make the next
   * run to the same directory fail: remove what this run created (the
   * library creates them exclusively once the jobs are set up). */
  if (strcmp (result, "ok") != 0 && o->target_dir && ui->start_us) {
    for (guint i = 0; i < ui->drives->len; i++)
      unlink (((Drive *) ui->drives->pdata[i])->target);
  }

  /* Per-drive results: the library reports one result for the run (the
   * jobs are grouped: one failure cancels the others), and names the
   * drive that failed. */
  bad = strcmp (result, "failed") == 0 ? failed_drive (error) : NULL;
  for (guint i = 0; ui->drives && i < ui->drives->len; i++) {
    Drive *d = ui->drives->pdata[i];
    if (!ui->start_us)
      d->result = "not started";
    else if (strcmp (result, "failed") == 0)
      d->result = !bad || strcmp (bad, d->key) == 0 ? "failed" : "cancelled";
    else
      d->result = result;
  }
  if (error) {
    ui_clear_live (ui);
    if (ui->tty && ui->progress && ui->start_us && !ui->json)
      ui_draw (ui);
    fprintf (stderr, "fleece backup: %s\n", error);
  }
  if (cleanup_error)
    fprintf (stderr, "fleece backup: cleanup failed: %s\n", cleanup_error);
  print_result (ui, result, error, sig, cleanup_error, g_get_monotonic_time (),
                !o->no_fleecing);
  fleece_plan_free (p);
  return strcmp (result, "ok") == 0 && !cleanup_error ? TOOL_EXIT_OK
                                                       : TOOL_EXIT_FAILED;
}

/* --vma FILE and --pve-args JSON: the patched QEMU's backup arguments. */
static struct fleece_target *
pve_target (const char *cmd, const char *vma, const char *json_args)
{
  g_autoptr (json_object) args = NULL;
  struct fleece_target *t;

  if (json_args) {
    args = json_tokener_parse (json_args);
    if (!args || !json_object_is_type (args, json_type_object))
      tool_usage_error (cmd, "--pve-args must be a JSON object, e.g. "
                        "'{\"format\": \"pbs\", \"backup-file\": \"...\"}'");
  } else {
    args = json_object_new_object ();
  }
  if (vma) {
    g_autofree char *abs = g_canonicalize_filename (vma, NULL);
    json_object_object_add (args, "backup-file", json_object_new_string (abs));
    json_object_object_add (args, "format", json_object_new_string ("vma"));
  }
  t = fleece_target_new_pve (json_object_to_json_string_ext (args, JSON_C_TO_STRING_PLAIN));
  if (!t)
    tool_usage_error (cmd, "%s", last_error ());
  return t;
}

static int
cmd_backup (int argc, char **argv)
{
  const char *cmd = "backup";
  g_autofree char *qmp = NULL;
  g_autofree char *vmid_s = NULL;
  g_autofree char *storage = NULL;
  g_autofree char *target_dir = NULL;
  g_autofree char *target_format = NULL;
  g_autofree char *target_nbd = NULL;
  g_autofree char *bwlimit_s = NULL;
  g_autofree char *devices = NULL;
  g_autofree char *bitmap = NULL;
  g_autofree char *cbw_timeout_s = NULL;
  g_autofree char *state_dir = NULL;
  g_autofree char *engine_s = NULL;
  g_autofree char *vma = NULL;
  g_autofree char *pve_args = NULL;
  gboolean all_drives = FALSE, no_fleecing = FALSE, json = FALSE;
  gboolean verbose = FALSE, fleecing_optional = FALSE;
  int engine = FLEECE_ENGINE_AUTO;
  GOptionEntry entries[] = {
    { "qmp", 0, 0, G_OPTION_ARG_FILENAME, &qmp,
      "The VM's QMP socket (required)", "PATH" },
    { "engine", 0, 0, G_OPTION_ARG_STRING, &engine_s,
      "auto (default: Proxmox's if QEMU has it), qemu (stock QEMU, graph "
      "built over QMP) or pve (Proxmox's patched QEMU)", "ENGINE" },
    { "vma", 0, 0, G_OPTION_ARG_FILENAME, &vma,
      "Proxmox engine: write a VMA archive FILE (implies --engine pve)", "FILE" },
    { "pve-args", 0, 0, G_OPTION_ARG_STRING, &pve_args,
      "Proxmox engine: further arguments of QMP backup as a JSON object "
      "(e.g. PBS repository and credentials), passed through", "JSON" },
    { "fleecing-optional", 0, 0, G_OPTION_ARG_NONE, &fleecing_optional,
      "If QEMU cannot fleece, warn and back up without (qemu-server's way)",
      NULL },
    { "vmid", 0, 0, G_OPTION_ARG_STRING, &vmid_s,
      "The VM's id, 1 to 999999999 (required)", "ID" },
    { "fleecing-storage", 0, 0, G_OPTION_ARG_FILENAME, &storage,
      "Directory for the fleecing images: fast local storage (required)", "DIR" },
    { "target-dir", 0, 0, G_OPTION_ARG_FILENAME, &target_dir,
      "Write the backup to DIR/<drive>.<format>", "DIR" },
    { "target-format", 0, 0, G_OPTION_ARG_STRING, &target_format,
      "Format of the images in --target-dir: raw (default) or qcow2", "FORMAT" },
    { "target-nbd", 0, 0, G_OPTION_ARG_STRING, &target_nbd,
      "Write the backup to an NBD server, one export per drive named after "
      "its key (nbd+unix:///?socket=PATH or nbd://HOST[:PORT])", "URI" },
    { "bwlimit", 0, 0, G_OPTION_ARG_STRING, &bwlimit_s,
      "Limit each drive's backup to KIB KiB/s (0: no limit)", "KIB" },
    { "devices", 0, 0, G_OPTION_ARG_STRING, &devices,
      "Back up only these drives (drive-scsi0 or scsi0, comma-separated)",
      "LIST" },
    { "all-drives", 0, 0, G_OPTION_ARG_NONE, &all_drives,
      "Fleece the EFI disk and TPM state too", NULL },
    { "no-fleecing", 0, 0, G_OPTION_ARG_NONE, &no_fleecing,
      "Back up without fleecing (guest writes wait for the target)", NULL },
    { "incremental", 0, 0, G_OPTION_ARG_STRING, &bitmap,
      "Incremental backup with the dirty bitmap BITMAP of each drive", "BITMAP" },
    { "cbw-timeout", 0, 0, G_OPTION_ARG_STRING, &cbw_timeout_s,
      "Copy-before-write timeout in seconds (default 45; 0 disables)", "SECONDS" },
    { "state-dir", 0, 0, G_OPTION_ARG_FILENAME, &state_dir,
      "Where the durable record lives (default $FLEECE_STATE_DIR or "
      DEFAULT_STATE_DIR ")", "DIR" },
    { "json", 0, 0, G_OPTION_ARG_NONE, &json,
      "Print JSON events, one per line, ending with a result object", NULL },
    { "progress", 0, G_OPTION_FLAG_NO_ARG, G_OPTION_ARG_CALLBACK, on_progress_opt,
      "Show progress (the default)", NULL },
    { "no-progress", 0, G_OPTION_FLAG_NO_ARG, G_OPTION_ARG_CALLBACK, on_progress_opt,
      "Do not show progress", NULL },
    { "verbose", 'v', 0, G_OPTION_ARG_NONE, &verbose,
      "Also show the library's informational messages", NULL },
    { NULL },
  };
  BackupOpts o = { 0 };
  Ui ui = { .cmd = cmd };
  struct fleece_handle *h = NULL;
  struct fleece_target *t = NULL;
  struct fleece_storage *st = NULL;
  unsigned flags = 0;
  int rc;

  parse_options (cmd, entries, "",
                 "Back up a running VM's drives with fleecing.",
                 "Exit status: 0 success, 1 the backup failed (everything it "
                 "set up was cleaned up), 2 usage error.\nSee fleece(1).",
                 &argc, &argv);

  ui.vmid = need_vmid (cmd, vmid_s);
  if (!qmp)
    tool_usage_error (cmd, "missing --qmp PATH (the VM's QMP socket, e.g. "
                      "/var/run/qemu-server/%u.qmp)", ui.vmid);
  o.storage = need_dir (cmd, "--fleecing-storage", storage,
                        "a directory on fast local storage");
  if (engine_s) {
    if (strcmp (engine_s, "auto") == 0)
      engine = FLEECE_ENGINE_AUTO;
    else if (strcmp (engine_s, "qemu") == 0)
      engine = FLEECE_ENGINE_QEMU;
    else if (strcmp (engine_s, "pve") == 0)
      engine = FLEECE_ENGINE_PVE;
    else
      tool_usage_error (cmd, "--engine must be auto, qemu or pve, not '%s'",
                        engine_s);
  }
  if ((vma || pve_args) && (target_dir || target_nbd))
    tool_usage_error (cmd, "--vma/--pve-args write through Proxmox's QEMU; "
                      "leave out --target-dir and --target-nbd");
  if ((vma || pve_args) && engine == FLEECE_ENGINE_QEMU)
    tool_usage_error (cmd, "--vma/--pve-args need --engine pve (or auto)");
  if (vma || pve_args) {
    /* On a patched QEMU without backup-fleecing, auto would pick the stock
     * engine, which cannot write a VMA. */
    engine = FLEECE_ENGINE_PVE;
    t = pve_target (cmd, vma, pve_args);
  } else if (target_dir && target_nbd)
    tool_usage_error (cmd, "--target-dir and --target-nbd exclude each other; "
                      "give one");
  else if (!target_dir && !target_nbd)
    tool_usage_error (cmd, "missing target: give --target-dir DIR, "
                      "--target-nbd nbd+unix:///?socket=PATH, or --vma FILE");
  if (target_format && !target_dir)
    tool_usage_error (cmd, "--target-format applies to --target-dir only");
  if (target_format && strcmp (target_format, "raw") != 0 &&
      strcmp (target_format, "qcow2") != 0)
    tool_usage_error (cmd, "--target-format must be raw or qcow2, not '%s'",
                      target_format);
  if (target_dir)
    o.target_dir = need_dir (cmd, "--target-dir", target_dir, "/backup/vm-100");
  o.target_format = g_strdup (target_format ? target_format : "raw");
  o.target_nbd = target_nbd;
  if (bwlimit_s && !tool_parse_u64 (bwlimit_s, 0, UINT64_MAX / 1024, &o.bwlimit))
    tool_usage_error (cmd, "--bwlimit must be a number of KiB/s (0 for no "
                      "limit), not '%s'", bwlimit_s);
  if (cbw_timeout_s) {
    if (!tool_parse_u64 (cbw_timeout_s, 0, UINT32_MAX, &o.cbw_timeout))
      tool_usage_error (cmd, "--cbw-timeout must be a number of seconds from 0 "
                        "to %u, not '%s'", UINT32_MAX, cbw_timeout_s);
    o.cbw_timeout_set = true;
  }
  if (devices)
    o.devices = parse_devices (cmd, devices);
  if (bitmap && !*bitmap)
    tool_usage_error (cmd, "--incremental needs the name of a dirty bitmap");
  o.bitmap = bitmap;
  o.state_dir = abs_path (state_dir);
  o.all_drives = all_drives;
  o.no_fleecing = no_fleecing;

  ui.json = json;
  ui.progress = progress_choice != 0;
  ui.tty = isatty (STDERR_FILENO) && g_strcmp0 (g_getenv ("TERM"), "dumb") != 0;
  ui.verbose = verbose;
  if (json)
    setvbuf (stdout, NULL, _IOLBF, 0);

  /* Bad values the library sees first are usage errors too. */
  if (t)
    ;
  else if (o.target_dir)
    t = fleece_target_new_dir (o.target_dir, o.target_format);
  else
    t = fleece_target_new_nbd (o.target_nbd);
  if (!t)
    tool_usage_error (cmd, "%s", last_error ());
  if (!(st = fleece_storage_new_dir (o.storage)))
    tool_usage_error (cmd, "--fleecing-storage: %s", last_error ());
  h = fleece_new ();
  if (!h)
    tool_usage_error (cmd, "%s", last_error ());
  if (no_fleecing)
    flags |= FLEECE_PLAN_NO_FLEECING;
  if (all_drives)
    flags |= FLEECE_PLAN_ALL_DRIVES;
  if (fleecing_optional)
    flags |= FLEECE_PLAN_FLEECING_OPTIONAL;
  if (fleece_set_engine (h, engine) < 0 ||
      fleece_set_vmid (h, ui.vmid) < 0 ||
      (o.state_dir && fleece_set_state_dir (h, o.state_dir) < 0) ||
      fleece_set_storage (h, st) < 0 ||
      fleece_set_plan_flags (h, flags) < 0 ||
      fleece_set_bwlimit (h, o.bwlimit) < 0 ||
      (o.cbw_timeout_set && fleece_set_cbw_timeout (h, (unsigned) o.cbw_timeout) < 0) ||
      (o.bitmap && fleece_set_bitmap (h, o.bitmap) < 0))
    tool_usage_error (cmd, "%s", last_error ());
  fleece_set_log_callback (h, on_log, &ui);
  fleece_set_progress_callback (h, on_progress, &ui);

  tool_catch_signals ();
  {
    g_autofree char *qmp_abs = abs_path (qmp);
    rc = run_backup (&ui, h, t, &o, qmp_abs);
  }

  fleece_free (h);
  fleece_target_free (t);
  if (ui.drives)
    g_ptr_array_unref (ui.drives);
  g_strfreev (o.devices);
  g_free (o.storage);
  g_free (o.target_dir);
  g_free (o.target_format);
  g_free (o.state_dir);
  return rc;
}

/* ---- plan ----------------------------------------------------------- */

static int
cmd_plan (int argc, char **argv)
{
  const char *cmd = "plan";
  g_autofree char *qmp = NULL;
  g_autofree char *vmid_s = NULL;
  g_autofree char *storage = NULL;
  g_autofree char *devices = NULL;
  gboolean all_drives = FALSE, no_fleecing = FALSE, json = FALSE;
  GOptionEntry entries[] = {
    { "qmp", 0, 0, G_OPTION_ARG_FILENAME, &qmp,
      "The VM's QMP socket (required)", "PATH" },
    { "vmid", 0, 0, G_OPTION_ARG_STRING, &vmid_s,
      "The VM's id, 1 to 999999999 (required)", "ID" },
    { "fleecing-storage", 0, 0, G_OPTION_ARG_FILENAME, &storage,
      "Directory for the fleecing images (required)", "DIR" },
    { "all-drives", 0, 0, G_OPTION_ARG_NONE, &all_drives,
      "Fleece the EFI disk and TPM state too", NULL },
    { "devices", 0, 0, G_OPTION_ARG_STRING, &devices,
      "Only these drives (drive-scsi0 or scsi0, comma-separated)", "LIST" },
    { "no-fleecing", 0, 0, G_OPTION_ARG_NONE, &no_fleecing,
      "Plan a backup without fleecing", NULL },
    { "json", 0, 0, G_OPTION_ARG_NONE, &json,
      "Print the plan as JSON", NULL },
    { NULL },
  };
  Ui ui = { .cmd = cmd };
  g_autofree char *dir = NULL;
  g_autofree char *qmp_abs = NULL;
  g_auto (GStrv) keys = NULL;
  struct fleece_handle *h;
  struct fleece_plan *p;
  struct fleece_storage *st;
  unsigned flags = 0;
  size_t n, fleeced = 0;

  parse_options (cmd, entries, "",
                 "Show what a backup would do; changes nothing.",
                 "Exit status: 0 the plan was printed, 1 planning failed, "
                 "2 usage error.\nSee fleece(1).", &argc, &argv);
  ui.vmid = need_vmid (cmd, vmid_s);
  if (!qmp)
    tool_usage_error (cmd, "missing --qmp PATH (the VM's QMP socket, e.g. "
                      "/var/run/qemu-server/%u.qmp)", ui.vmid);
  dir = need_dir (cmd, "--fleecing-storage", storage,
                  "a directory on fast local storage");
  if (devices)
    keys = parse_devices (cmd, devices);
  ui.json = json;
  if (!(st = fleece_storage_new_dir (dir)))
    tool_usage_error (cmd, "--fleecing-storage: %s", last_error ());
  h = fleece_new ();
  if (no_fleecing)
    flags |= FLEECE_PLAN_NO_FLEECING;
  if (all_drives)
    flags |= FLEECE_PLAN_ALL_DRIVES;
  if (!h || fleece_set_vmid (h, ui.vmid) < 0 || fleece_set_storage (h, st) < 0 ||
      fleece_set_plan_flags (h, flags) < 0)
    tool_usage_error (cmd, "%s", last_error ());
  fleece_set_log_callback (h, on_log, &ui);

  qmp_abs = abs_path (qmp);
  if (fleece_connect (h, qmp_abs) < 0) {
    fprintf (stderr, "fleece plan: cannot connect to QEMU: %s\n", last_error ());
    fleece_free (h);
    return TOOL_EXIT_FAILED;
  }
  if ((keys && !check_devices (&ui, h, keys)) || !(p = fleece_plan (h))) {
    fprintf (stderr, "fleece plan: %s\n", last_error ());
    fleece_free (h);
    return TOOL_EXIT_FAILED;
  }

  n = fleece_plan_get_drive_count (p);
  if (json) {
    g_autofree char *text = fleece_plan_to_json (p);
    printf ("%s\n", text);
  } else {
    for (size_t i = 0; i < n; i++)
      fleeced += fleece_plan_get_fleeced (p, i) == 1;
    printf ("VM %u: %zu drive%s, %zu fleeced in %s (engine %s)\n", ui.vmid, n,
            n == 1 ? "" : "s", fleeced, dir, engine_name (h));
    printf ("  %-10s %-16s %10s  %-7s %-24s %-6s %s\n", "drive", "device",
            "size", "fleeced", "image", "format", "cluster");
    for (size_t i = 0; i < n; i++) {
      g_autofree char *size = tool_size (fleece_plan_get_size (p, i));
      bool f = fleece_plan_get_fleeced (p, i) == 1;
      g_autofree char *cluster = f && fleece_plan_get_cluster_size (p, i)
        ? tool_size (fleece_plan_get_cluster_size (p, i)) : g_strdup ("-");

      if (f)
        printf ("  %-10s %-16s %10s  %-7s %-24s %-6s %s\n",
                fleece_plan_get_key (p, i), fleece_plan_get_device (p, i), size,
                "yes", fleece_plan_get_image (p, i), fleece_plan_get_format (p, i),
                cluster);
      else
        printf ("  %-10s %-16s %10s  %-7s %s\n", fleece_plan_get_key (p, i),
                fleece_plan_get_device (p, i), size, "no",
                fleece_plan_get_reason (p, i) ? fleece_plan_get_reason (p, i) : "");
    }
  }
  fleece_plan_free (p);
  fleece_free (h);
  return TOOL_EXIT_OK;
}

/* ---- status --------------------------------------------------------- */

static const char *
jstr (json_object *o, const char *key)
{
  json_object *v;
  return o && json_object_object_get_ex (o, key, &v) && v ? json_object_get_string (v) : NULL;
}

static const char *
nz (const char *s)
{
  return s ? s : "?";
}

/* What QEMU is doing that concerns fleecing: jobs, fleecing nodes, devices
 * re-pointed at a copy-before-write filter.  The node and job names are the
 * ones fleece(3) documents ("fleece" in each). */
static json_object *
query_qemu (const char *path)
{
  json_object *q = json_object_new_object ();
  g_autoptr (GError) err = NULL;
  g_autoptr (ToolQmp) c = NULL;
  g_autoptr (json_object) status = NULL, jobs = NULL, nodes = NULL, blocks = NULL;
  json_object *jl = json_object_new_array ();
  json_object *nl = json_object_new_array ();
  json_object *dl = json_object_new_array ();

  jadd_str (q, "qmp", path);
  if (!(c = tool_qmp_connect (path, STATUS_QMP_TIMEOUT_MS, &err)) ||
      !(status = tool_qmp_execute (c, "query-status", NULL, &err)) ||
      !(jobs = tool_qmp_execute (c, "query-jobs", NULL, &err)) ||
      !(nodes = tool_qmp_execute (c, "query-named-block-nodes",
                                  json_tokener_parse ("{\"flat\": true}"), &err)) ||
      !(blocks = tool_qmp_execute (c, "query-block", NULL, &err))) {
    json_object_object_add (q, "reachable", json_object_new_boolean (false));
    jadd_str (q, "error", err->message);
    json_object_put (jl);
    json_object_put (nl);
    json_object_put (dl);
    return q;
  }
  json_object_object_add (q, "reachable", json_object_new_boolean (true));
  jadd_str (q, "status", jstr (status, "status"));
  for (size_t i = 0; i < json_object_array_length (jobs); i++) {
    json_object *j = json_object_array_get_idx (jobs, i), *v;
    json_object *o = json_object_new_object ();

    jadd_str (o, "id", jstr (j, "id"));
    jadd_str (o, "type", jstr (j, "type"));
    jadd_str (o, "status", jstr (j, "status"));
    json_object_object_add (o, "done", json_object_object_get_ex (j, "current-progress", &v)
                            ? json_object_get (v) : NULL);
    json_object_object_add (o, "total", json_object_object_get_ex (j, "total-progress", &v)
                            ? json_object_get (v) : NULL);
    jadd_str (o, "error", jstr (j, "error"));
    json_object_array_add (jl, o);
  }
  for (size_t i = 0; i < json_object_array_length (nodes); i++) {
    const char *name = jstr (json_object_array_get_idx (nodes, i), "node-name");
    if (name && strstr (name, "fleec"))
      json_object_array_add (nl, json_object_new_string (name));
  }
  for (size_t i = 0; i < json_object_array_length (blocks); i++) {
    json_object *b = json_object_array_get_idx (blocks, i), *ins;
    const char *root = json_object_object_get_ex (b, "inserted", &ins)
                       ? jstr (ins, "node-name") : NULL;
    if (root && strstr (root, "fleec")) {
      json_object *o = json_object_new_object ();
      jadd_str (o, "device", jstr (b, "device"));
      jadd_str (o, "qdev", jstr (b, "qdev"));
      jadd_str (o, "root", root);
      json_object_array_add (dl, o);
    }
  }
  json_object_object_add (q, "jobs", jl);
  json_object_object_add (q, "fleecing-nodes", nl);
  json_object_object_add (q, "filtered-devices", dl);
  return q;
}

static void
print_status (uint32_t vmid, const char *state_dir, json_object *rec,
              json_object *qemu)
{
  json_object *v;
  bool leftovers = false;

  printf ("VM %u (state directory %s)\n", vmid, state_dir);
  if (!rec) {
    printf ("  record: none\n");
  } else {
    char when[64] = "?";
    json_object *drives;
    time_t created = json_object_object_get_ex (rec, "created", &v)
                     ? (time_t) json_object_get_int64 (v) : 0;
    struct tm tm;

    if (created && localtime_r (&created, &tm))
      strftime (when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
    printf ("  record: state %s, engine %s, run %s, created %s\n",
            jstr (rec, "state") ? jstr (rec, "state") : "?",
            jstr (rec, "engine") ? jstr (rec, "engine") : "?",
            jstr (rec, "run") ? jstr (rec, "run") : "?", when);
    if (jstr (rec, "qmp"))
      printf ("          QMP %s\n", jstr (rec, "qmp"));
    if (json_object_object_get_ex (rec, "drives", &drives)) {
      for (size_t i = 0; i < json_object_array_length (drives); i++) {
        json_object *d = json_object_array_get_idx (drives, i);
        json_object *f = NULL;
        bool fleeced = json_object_object_get_ex (d, "fleeced", &f) &&
                       json_object_get_boolean (f);
        printf ("          %-10s %s%s%s\n", nz (jstr (d, "key")),
                fleeced ? "fleeced, image " : "not fleeced",
                fleeced ? (jstr (d, "volid") ? jstr (d, "volid")
                           : jstr (d, "image") ? jstr (d, "image") : "?") : "",
                fleeced && !jstr (d, "volid") ? " (not allocated)" : "");
      }
    }
  }
  if (!qemu) {
    printf ("  QEMU: not queried (give --qmp PATH)\n");
  } else if (!json_object_get_boolean (json_object_object_get (qemu, "reachable"))) {
    printf ("  QEMU: %s\n", nz (jstr (qemu, "error")));
  } else {
    json_object *jobs = json_object_object_get (qemu, "jobs");
    json_object *nodes = json_object_object_get (qemu, "fleecing-nodes");
    json_object *devs = json_object_object_get (qemu, "filtered-devices");

    printf ("  QEMU: %s, %s\n", nz (jstr (qemu, "qmp")), nz (jstr (qemu, "status")));
    if (!json_object_array_length (jobs))
      printf ("        no block jobs\n");
    for (size_t i = 0; i < json_object_array_length (jobs); i++) {
      json_object *j = json_object_array_get_idx (jobs, i);
      uint64_t done = (uint64_t) json_object_get_int64 (json_object_object_get (j, "done"));
      uint64_t total = (uint64_t) json_object_get_int64 (json_object_object_get (j, "total"));
      g_autofree char *ds = tool_size (done);
      g_autofree char *ts = tool_size (total);

      printf ("        job %s (%s): %s, %s of %s (%d%%)%s%s\n", nz (jstr (j, "id")),
              nz (jstr (j, "type")), nz (jstr (j, "status")), ds, ts, percent (done, total),
              jstr (j, "error") ? ", error: " : "",
              jstr (j, "error") ? jstr (j, "error") : "");
      leftovers |= g_str_has_prefix (nz (jstr (j, "id")), "fleece");
    }
    if (json_object_array_length (nodes)) {
      printf ("        fleecing nodes:");
      for (size_t i = 0; i < json_object_array_length (nodes); i++)
        printf (" %s", json_object_get_string (json_object_array_get_idx (nodes, i)));
      printf ("\n");
      leftovers = true;
    }
    for (size_t i = 0; i < json_object_array_length (devs); i++) {
      json_object *d = json_object_array_get_idx (devs, i);
      printf ("        device %s writes through %s\n",
              nz (jstr (d, "qdev") ? jstr (d, "qdev") : jstr (d, "device")), nz (jstr (d, "root")));
    }
  }
  if (rec)
    printf ("A run is recorded (state %s). If no fleece backup is running for "
            "VM %u, 'fleece cleanup --vmid %u' undoes it.\n",
            jstr (rec, "state") ? jstr (rec, "state") : "?", vmid, vmid);
  else if (leftovers)
    printf ("QEMU has fleecing nodes or jobs but there is no record: they are "
            "from another tool or another state directory.\n");
  else
    printf ("Nothing is set up for VM %u.\n", vmid);
}

static int
cmd_status (int argc, char **argv)
{
  const char *cmd = "status";
  g_autofree char *qmp = NULL;
  g_autofree char *vmid_s = NULL;
  g_autofree char *state_dir = NULL;
  gboolean json = FALSE;
  GOptionEntry entries[] = {
    { "vmid", 0, 0, G_OPTION_ARG_STRING, &vmid_s,
      "The VM's id (required)", "ID" },
    { "qmp", 0, 0, G_OPTION_ARG_FILENAME, &qmp,
      "The VM's QMP socket (default: the one in the record)", "PATH" },
    { "state-dir", 0, 0, G_OPTION_ARG_FILENAME, &state_dir,
      "Where the durable record lives (default $FLEECE_STATE_DIR or "
      DEFAULT_STATE_DIR ")", "DIR" },
    { "json", 0, 0, G_OPTION_ARG_NONE, &json, "Print JSON", NULL },
    { NULL },
  };
  g_autofree char *dir = NULL;
  g_autofree char *qmp_abs = NULL;
  g_autoptr (json_object) rec = NULL;
  g_autoptr (json_object) qemu = NULL;
  struct fleece_handle *h;
  const char *env = g_getenv ("FLEECE_STATE_DIR");
  char *text;
  uint32_t vmid;

  parse_options (cmd, entries, "",
                 "Show what the record says and what QEMU is doing.",
                 "Exit status: 0 the status was shown, 1 the record could not "
                 "be read, 2 usage error.\nSee fleece(1).", &argc, &argv);
  vmid = need_vmid (cmd, vmid_s);
  dir = state_dir ? abs_path (state_dir)
                  : g_strdup (env && *env ? env : DEFAULT_STATE_DIR);
  h = fleece_new ();
  if (!h || fleece_set_vmid (h, vmid) < 0 || fleece_set_state_dir (h, dir) < 0)
    tool_usage_error (cmd, "%s", last_error ());
  text = fleece_get_record (h);
  if (!text && fleece_get_errno () != ENOENT) {
    fprintf (stderr, "fleece status: %s\n", last_error ());
    fleece_free (h);
    return TOOL_EXIT_FAILED;
  }
  fleece_free (h);
  if (text) {
    rec = json_tokener_parse (text);
    free (text);
  }
  qmp_abs = qmp ? abs_path (qmp) : g_strdup (jstr (rec, "qmp"));
  if (qmp_abs)
    qemu = query_qemu (qmp_abs);

  if (json) {
    g_autoptr (json_object) o = json_object_new_object ();
    jadd_u64 (o, "vmid", vmid);
    jadd_str (o, "state-dir", dir);
    json_object_object_add (o, "record", json_object_get (rec));
    json_object_object_add (o, "qemu", json_object_get (qemu));
    printf ("%s\n", json_object_to_json_string_ext (
              o, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_NOSLASHESCAPE));
  } else {
    print_status (vmid, dir, rec, qemu);
  }
  return TOOL_EXIT_OK;
}

/* ---- cleanup -------------------------------------------------------- */

static int
cmd_cleanup (int argc, char **argv)
{
  const char *cmd = "cleanup";
  g_autofree char *qmp = NULL;
  g_autofree char *vmid_s = NULL;
  g_autofree char *state_dir = NULL;
  gboolean verbose = FALSE;
  GOptionEntry entries[] = {
    { "vmid", 0, 0, G_OPTION_ARG_STRING, &vmid_s,
      "The VM's id (required)", "ID" },
    { "qmp", 0, 0, G_OPTION_ARG_FILENAME, &qmp,
      "The VM's QMP socket (default: the one in the record)", "PATH" },
    { "state-dir", 0, 0, G_OPTION_ARG_FILENAME, &state_dir,
      "Where the durable record lives (default $FLEECE_STATE_DIR or "
      DEFAULT_STATE_DIR ")", "DIR" },
    { "verbose", 'v', 0, G_OPTION_ARG_NONE, &verbose,
      "Show each step", NULL },
    { NULL },
  };
  Ui ui = { .cmd = cmd };
  g_autofree char *dir = NULL;
  struct fleece_handle *h;
  char *rec;
  bool had_record;

  parse_options (cmd, entries, "",
                 "Undo what a crashed or killed backup left, from its record.",
                 "Exit status: 0 nothing is left, 1 cleanup failed (the record "
                 "is kept; run it again), 2 usage error.\nSee fleece(1).",
                 &argc, &argv);
  ui.vmid = need_vmid (cmd, vmid_s);
  ui.verbose = verbose;
  dir = abs_path (state_dir);
  h = fleece_new ();
  if (!h || fleece_set_vmid (h, ui.vmid) < 0 ||
      (dir && fleece_set_state_dir (h, dir) < 0))
    tool_usage_error (cmd, "%s", last_error ());
  fleece_set_log_callback (h, on_log, &ui);

  rec = fleece_get_record (h);
  had_record = rec != NULL;
  free (rec);
  if (qmp) {
    g_autofree char *qmp_abs = abs_path (qmp);
    if (fleece_connect (h, qmp_abs) < 0)
      fprintf (stderr, "fleece cleanup: warning: %s; going on with the QMP "
               "socket in the record\n", last_error ());
  }
  /* Signals must not cut a cleanup short: they are noted and ignored. */
  tool_catch_signals ();
  if (fleece_cleanup (h) < 0) {
    fprintf (stderr, "fleece cleanup: %s%s\n", last_error (),
             fleece_get_errno () == EBUSY
               ? " (a fleece backup of this VM is running: stop it, it cleans "
                 "up after itself)" : "");
    fleece_free (h);
    return TOOL_EXIT_FAILED;
  }
  rec = fleece_get_record (h);
  if (rec) {
    free (rec);
    fprintf (stderr, "fleece cleanup: the record of VM %u is still there; "
             "run 'fleece cleanup' again\n", ui.vmid);
    fleece_free (h);
    return TOOL_EXIT_FAILED;
  }
  fleece_free (h);
  printf (had_record ? "fleece cleanup: VM %u cleaned up; nothing is left\n"
                     : "fleece cleanup: VM %u has no record; nothing to clean up\n",
          ui.vmid);
  return TOOL_EXIT_OK;
}

/* ---- main ----------------------------------------------------------- */

static void
print_help (FILE *f)
{
  fprintf (f,
    "Usage: fleece COMMAND [OPTION...]\n"
    "\n"
    "Fleecing backups of running QEMU virtual machines over QMP.\n"
    "\n"
    "Commands:\n"
    "  backup   back up a running VM's drives (plan, attach, start, wait, clean up)\n"
    "  plan     show what a backup would do; changes nothing\n"
    "  status   show the durable record and what QEMU is doing\n"
    "  cleanup  undo what a crashed or killed backup left\n"
    "  demo     back up a throwaway VM to a slow target, with and without fleecing\n"
    "\n"
    "Run 'fleece COMMAND --help' for a command's options.\n"
    "  -h, --help     show this help\n"
    "  -V, --version  show the version\n"
    "\n"
    "Exit status: 0 success, 1 failure, 2 usage error.  See fleece(1).\n");
}

int
main (int argc, char **argv)
{
  const char *cmd = argc > 1 ? argv[1] : NULL;

  tool_start_us = g_get_monotonic_time ();
  /* Messages in the user's charset; numbers (JSON, sizes) always with a
   * decimal point. */
  setlocale (LC_ALL, "");
  setlocale (LC_NUMERIC, "C");
  if (!cmd)
    tool_usage_error (NULL, "missing command: backup, plan, status, cleanup or "
                      "demo; see 'fleece --help'");
  if (strcmp (cmd, "--help") == 0 || strcmp (cmd, "-h") == 0 ||
      strcmp (cmd, "help") == 0) {
    print_help (stdout);
    return TOOL_EXIT_OK;
  }
  if (strcmp (cmd, "--version") == 0 || strcmp (cmd, "-V") == 0) {
    printf ("fleece %s (libfleece %s)\n", FLEECE_TOOL_VERSION, fleece_get_version ());
    return TOOL_EXIT_OK;
  }
  if (strcmp (cmd, "backup") == 0)
    return cmd_backup (argc - 1, argv + 1);
  if (strcmp (cmd, "plan") == 0)
    return cmd_plan (argc - 1, argv + 1);
  if (strcmp (cmd, "status") == 0)
    return cmd_status (argc - 1, argv + 1);
  if (strcmp (cmd, "cleanup") == 0)
    return cmd_cleanup (argc - 1, argv + 1);
  if (strcmp (cmd, "demo") == 0)
    return tool_demo (argc - 1, argv + 1);
  if (cmd[0] == '-')
    tool_usage_error (NULL, "unknown option %s; see 'fleece --help'", cmd);
  tool_usage_error (NULL, "unknown command '%s'; the commands are backup, plan, "
                    "status, cleanup and demo", cmd);
}
