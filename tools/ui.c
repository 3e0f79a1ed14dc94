/* What the fleece command shows while it works: JSON events, the
 * library's messages, and a backup's progress (a live display on a
 * terminal, a line per drive at each 10 % otherwise, events with --json).
 * Progress arrives through the library's progress callback, called from
 * inside fleece_wait(): the command never polls. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "fleece-tool.h"

/* The terminal display is redrawn at most this often. */
#define DRAW_INTERVAL_US (200 * 1000)
/* --json progress events, per drive and for the whole backup. */
#define JSON_INTERVAL_US (1 * G_USEC_PER_SEC)
/* The rate is measured over the last samples, this far apart. */
#define RATE_SAMPLE_US (300 * 1000)
#define RATE_SAMPLES 16

gint64 tool_start_us;

/* ---- JSON events ------------------------------------------------------ */

json_object *
tool_jseconds (gint64 us)
{
  char text[32];

  g_snprintf (text, sizeof text, "%.3f", (double) us / G_USEC_PER_SEC);
  return json_object_new_double_s (g_ascii_strtod (text, NULL), text);
}

void
tool_emit (const char *event, json_object *ev)
{
  json_object *o = json_object_new_object ();

  json_object_object_add (o, "event", json_object_new_string (event));
  json_object_object_add (o, "time", tool_jseconds (g_get_monotonic_time () - tool_start_us));
  json_object_object_foreach (ev, k, v)
    json_object_object_add (o, k, json_object_get (v));
  json_object_put (ev);
  printf ("%s\n", json_object_to_json_string_ext (
            o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
  fflush (stdout);
  json_object_put (o);
}

void
tool_jadd_str (json_object *o, const char *k, const char *v)
{
  json_object_object_add (o, k, v ? json_object_new_string (v) : NULL);
}

void
tool_jadd_u64 (json_object *o, const char *k, uint64_t v)
{
  json_object_object_add (o, k, json_object_new_int64 ((int64_t) v));
}

/* ---- messages --------------------------------------------------------- */

void
ui_clear_live (Ui *ui)
{
  if (ui->live_lines) {
    fprintf (stderr, "\033[%dA\r\033[J", ui->live_lines);
    ui->live_lines = 0;
  }
}

void
ui_say (Ui *ui, const char *fmt, ...)
{
  g_autofree char *msg = NULL;
  g_autofree char *shown = NULL;
  va_list ap;

  va_start (ap, fmt);
  msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  shown = tool_escape (msg);
  ui_clear_live (ui);
  fflush (stdout);
  fprintf (stderr, "fleece %s: %s\n", ui->cmd, shown);
}

void
ui_log (void *opaque, int level, const char *msg)
{
  Ui *ui = opaque;
  static const char *const names[] = { "error", "warning", "info", "debug" };
  const char *name = level >= 0 && level <= 3 ? names[level] : "info";

  if (level > FLEECE_LOG_WARNING && !ui->verbose)
    return;
  if (ui->json) {
    json_object *ev = json_object_new_object ();
    tool_jadd_str (ev, "level", name);
    tool_jadd_str (ev, "message", msg);
    tool_emit ("log", ev);
    return;
  }
  if (level <= FLEECE_LOG_WARNING)
    ui_say (ui, "%s: %s", name, msg);
  else
    ui_say (ui, "%s", msg);
}

/* ---- drives and rates ------------------------------------------------- */

UiDrive *
ui_drive (Ui *ui, const char *key)
{
  for (guint i = 0; ui->drives && i < ui->drives->len; i++) {
    UiDrive *d = ui->drives->pdata[i];
    if (strcmp (d->key, key) == 0)
      return d;
  }
  return NULL;
}

void
ui_drive_free (UiDrive *d)
{
  g_free (d->key);
  g_free (d->device);
  g_free (d->image);
  g_free (d->target);
  g_free (d->result);
  g_free (d->error);
  g_free (d);
}

/* Bytes per second over the samples, 0 if not known yet. */
static double
rate_of (const gint64 *st, const uint64_t *sd, int ns)
{
  if (ns < 2 || st[ns - 1] == st[0])
    return 0;
  return (double) (sd[ns - 1] - sd[0]) * G_USEC_PER_SEC / (double) (st[ns - 1] - st[0]);
}

static void
sample (gint64 *st, uint64_t *sd, int *ns, gint64 now, uint64_t done)
{
  if (*ns && now - st[*ns - 1] < RATE_SAMPLE_US)
    return;
  if (*ns == RATE_SAMPLES) {
    memmove (st, st + 1, sizeof st[0] * (RATE_SAMPLES - 1));
    memmove (sd, sd + 1, sizeof sd[0] * (RATE_SAMPLES - 1));
    (*ns)--;
  }
  st[*ns] = now;
  sd[*ns] = done;
  (*ns)++;
}

static void
totals (Ui *ui, uint64_t *done, uint64_t *total)
{
  *done = *total = 0;
  for (guint i = 0; i < ui->drives->len; i++) {
    UiDrive *d = ui->drives->pdata[i];
    *done += d->done;
    *total += d->total;
  }
}

static int
percent (uint64_t done, uint64_t total)
{
  return total ? (int) (done * 100 / total) : 0;
}

/* "[####......] 37%  12.0 MiB / 32.0 MiB  2.0 MiB/s  ETA 0:10" */
static void
append_progress (GString *s, bool bar, uint64_t done, uint64_t total,
                 double rate, gint64 done_us, gint64 start_us)
{
  g_autofree char *ds = tool_size (done);
  g_autofree char *ts = tool_size (total);

  if (bar) {
    int filled = total ? (int) (done * 20 / total) : 0;
    g_string_append_c (s, '[');
    for (int i = 0; i < 20; i++)
      g_string_append_c (s, i < filled ? '#' : '.');
    g_string_append (s, "] ");
  }
  g_string_append_printf (s, "%3d%%  %s / %s", percent (done, total), ds, ts);
  if (done_us) {
    g_autofree char *t = tool_duration (done_us - start_us);
    g_string_append_printf (s, "  done in %s", t);
  } else if (rate > 0) {
    g_autofree char *r = tool_size ((uint64_t) rate);
    g_autofree char *eta = tool_eta ((double) (total - MIN (done, total)) / rate);
    g_string_append_printf (s, "  %s/s  ETA %s", r, eta);
  }
}

static char *
drive_line (Ui *ui, UiDrive *d, bool bar)
{
  GString *s = g_string_new (NULL);

  g_string_append_printf (s, "%-10s ", d->key);
  append_progress (s, bar, d->done, d->total, rate_of (d->st, d->sd, d->ns),
                   d->done_us, ui->start_us);
  return g_string_free (s, FALSE);
}

/* ---- the whole backup's figures ------------------------------------ */

typedef struct {
  uint64_t v[4];        /* zero, reused, dirty, finishing */
  bool known[4];
} Figures;

static const int figure_stat[4] = {
  FLEECE_STAT_ZERO, FLEECE_STAT_REUSED, FLEECE_STAT_DIRTY, FLEECE_STAT_FINISHING,
};
static const char *const figure_name[4] = { "zero", "reused", "dirty", "finishing" };

/* What the engine knows (the Proxmox engine: zero and reused bytes,
 * dirty bytes of an incremental, finishing); ENOTSUP for the rest. */
static void
figures (Ui *ui, Figures *f)
{
  for (int i = 0; i < 4; i++)
    f->known[i] = ui->h && fleece_get_stat (ui->h, NULL, figure_stat[i], &f->v[i]) == 0;
}

/* "zero 1.0 MiB, reused 0 B, dirty 4.0 MiB", what is known of it. */
static void
append_figures (GString *s, const Figures *f)
{
  bool first = true;

  for (int i = 0; i < 3; i++)
    if (f->known[i]) {
      g_autofree char *v = tool_size (f->v[i]);
      g_string_append_printf (s, "%s%s %s", first ? "" : ", ", figure_name[i], v);
      first = false;
    }
}

static char *
total_line (Ui *ui, bool bar, const Figures *f)
{
  GString *s = g_string_new (NULL);
  uint64_t done, total;

  totals (ui, &done, &total);
  g_string_append_printf (s, "%-10s ", "total");
  append_progress (s, bar, done, total, rate_of (ui->tst, ui->tsd, ui->tns),
                   0, ui->start_us);
  if (f->known[0] || f->known[1] || f->known[2])
    g_string_append (s, "  ");
  append_figures (s, f);
  if (f->known[3] && f->v[3])
    g_string_append (s, "  finishing");
  return g_string_free (s, FALSE);
}

/* ---- the three displays ------------------------------------------- */

static void
draw_tty (Ui *ui, const Figures *f)
{
  GString *s = g_string_new (NULL);

  if (ui->live_lines)
    g_string_append_printf (s, "\033[%dA", ui->live_lines);
  for (guint i = 0; i < ui->drives->len; i++) {
    g_autofree char *line = drive_line (ui, ui->drives->pdata[i], true);
    g_string_append_printf (s, "\r\033[K  %s\n", line);
  }
  {
    g_autofree char *line = total_line (ui, true, f);
    g_string_append_printf (s, "\r\033[K  %s\n", line);
  }
  fflush (stdout);
  fputs (s->str, stderr);
  fflush (stderr);
  ui->live_lines = (int) ui->drives->len + 1;
  g_string_free (s, TRUE);
}

static void
events_json (Ui *ui, gint64 now, bool final, const Figures *f)
{
  json_object *ev;
  uint64_t done, total;
  double rate;

  for (guint i = 0; i < ui->drives->len; i++) {
    UiDrive *d = ui->drives->pdata[i];

    rate = rate_of (d->st, d->sd, d->ns);
    if (d->done_us || d->done == d->last_event_done ||
        (!final && now - d->last_event_us < JSON_INTERVAL_US))
      continue;
    ev = json_object_new_object ();
    tool_jadd_str (ev, "drive", d->key);
    tool_jadd_u64 (ev, "done", d->done);
    tool_jadd_u64 (ev, "total", d->total);
    if (rate > 0) {
      tool_jadd_u64 (ev, "rate", (uint64_t) rate);
      tool_jadd_u64 (ev, "eta", (uint64_t) ((double) (d->total - MIN (d->done, d->total)) / rate + 0.5));
    }
    tool_emit ("progress", ev);
    d->last_event_us = now;
    d->last_event_done = d->done;
  }
  if (!final && now - ui->last_totals_us < JSON_INTERVAL_US)
    return;
  ui->last_totals_us = now;
  totals (ui, &done, &total);
  ev = json_object_new_object ();
  tool_jadd_u64 (ev, "done", done);
  tool_jadd_u64 (ev, "total", total);
  rate = rate_of (ui->tst, ui->tsd, ui->tns);
  if (rate > 0)
    tool_jadd_u64 (ev, "rate", (uint64_t) rate);
  for (int i = 0; i < 3; i++)
    if (f->known[i])
      tool_jadd_u64 (ev, figure_name[i], f->v[i]);
  if (f->known[3])
    json_object_object_add (ev, "finishing", json_object_new_boolean (f->v[3] != 0));
  tool_emit ("backup-progress", ev);
}

static void
lines_plain (Ui *ui, const Figures *f)
{
  for (guint i = 0; i < ui->drives->len; i++) {
    UiDrive *d = ui->drives->pdata[i];
    int decile = d->total ? (int) (d->done * 10 / d->total) : 0;

    if (d->done_us || d->done == 0 || decile <= d->last_decile)
      continue;
    {
      g_autofree char *line = drive_line (ui, d, false);
      fprintf (stderr, "fleece %s: %s\n", ui->cmd, line);
    }
    d->last_decile = decile;
  }
  if (f->known[3] && f->v[3] && !ui->finishing) {
    GString *s = g_string_new (NULL);
    append_figures (s, f);
    fprintf (stderr, "fleece %s: finishing%s%s%s\n", ui->cmd, s->len ? " (" : "",
             s->str, s->len ? ")" : "");
    g_string_free (s, TRUE);
  }
}

static void
drive_finished (Ui *ui, UiDrive *d)
{
  if (!ui->progress)
    return;
  if (ui->json) {
    json_object *ev = json_object_new_object ();
    tool_jadd_str (ev, "drive", d->key);
    tool_jadd_u64 (ev, "bytes", d->done);
    json_object_object_add (ev, "seconds", tool_jseconds (d->done_us - ui->start_us));
    tool_emit ("drive-done", ev);
  } else if (!ui->tty) {
    g_autofree char *size = tool_size (d->done);
    g_autofree char *t = tool_duration (d->done_us - ui->start_us);
    fprintf (stderr, "fleece %s: %s done: %s in %s\n", ui->cmd, d->key, size, t);
  }
}

void
ui_progress (void *opaque, const char *key, uint64_t done, uint64_t total)
{
  Ui *ui = opaque;
  UiDrive *d = ui_drive (ui, key);

  if (!d)
    return;
  d->total = total ? MIN (total, d->size) : d->size;
  d->done = MIN (done, d->total);
  if (!d->done_us && d->total && d->done >= d->total) {
    d->done_us = g_get_monotonic_time ();
    drive_finished (ui, d);
  }
  ui_tick (ui, false);
}

void
ui_tick (Ui *ui, bool final)
{
  gint64 now = g_get_monotonic_time ();
  uint64_t done, total;
  Figures f;

  if (!ui->drives || !ui->start_us)
    return;
  for (guint i = 0; i < ui->drives->len; i++) {
    UiDrive *d = ui->drives->pdata[i];
    sample (d->st, d->sd, &d->ns, now, d->done);
  }
  totals (ui, &done, &total);
  sample (ui->tst, ui->tsd, &ui->tns, now, done);
  if (!ui->progress)
    return;
  if (!final && !ui->json && ui->tty && now - ui->last_draw_us < DRAW_INTERVAL_US)
    return;
  figures (ui, &f);
  if (ui->json)
    events_json (ui, now, final, &f);
  else if (ui->tty) {
    draw_tty (ui, &f);
    ui->last_draw_us = now;
  } else
    lines_plain (ui, &f);
  ui->finishing = f.known[3] && f.v[3];
}
