/* Signals, usage errors and formatting for the fleece command. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fleece-tool.h"

volatile sig_atomic_t tool_signal;
static struct fleece_handle *volatile cancel_target;

/* fleece_cancel() only records the request and wakes fleece_wait(),
 * which sends the cancel to QEMU: safe here, and at once. */
static void
on_signal (int sig)
{
  int saved = errno;

  tool_signal = sig;
  if (cancel_target)
    fleece_cancel (cancel_target);
  errno = saved;
}

void
tool_set_cancel (struct fleece_handle *h)
{
  cancel_target = h;
}

void
tool_catch_signals (void)
{
  struct sigaction sa;
  static const int sigs[] = { SIGINT, SIGTERM, SIGHUP };

  memset (&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigemptyset (&sa.sa_mask);
  /* No SA_RESTART: a poll() waiting for QEMU returns EINTR, so the
   * signal is acted on at once. */
  sa.sa_flags = 0;
  for (size_t i = 0; i < G_N_ELEMENTS (sigs); i++)
    sigaction (sigs[i], &sa, NULL);
  /* A reader of our output that went away must not kill us half-way
   * through a backup: writes fail with EPIPE instead. */
  signal (SIGPIPE, SIG_IGN);
}

const char *
tool_signal_name (int sig)
{
  switch (sig) {
  case SIGINT: return "SIGINT";
  case SIGTERM: return "SIGTERM";
  case SIGHUP: return "SIGHUP";
  default: return "signal";
  }
}

void
tool_usage_error (const char *cmd, const char *fmt, ...)
{
  va_list ap;

  fflush (stdout);
  fprintf (stderr, "fleece%s%s: ", cmd ? " " : "", cmd ? cmd : "");
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fputc ('\n', stderr);
  exit (TOOL_EXIT_USAGE);
}

bool
tool_parse_u64 (const char *s, uint64_t min, uint64_t max, uint64_t *out)
{
  uint64_t v = 0;

  if (!s || !*s || strlen (s) > 20)
    return false;
  for (const char *c = s; *c; c++) {
    if (*c < '0' || *c > '9')
      return false;
    if (v > (UINT64_MAX - (uint64_t) (*c - '0')) / 10)
      return false;
    v = v * 10 + (uint64_t) (*c - '0');
  }
  if (v < min || v > max)
    return false;
  *out = v;
  return true;
}

/* Not g_format_size(): it puts a no-break space between number and unit
 * in UTF-8 locales, which breaks printf's column widths. */
char *
tool_size (uint64_t bytes)
{
  static const char *const units[] = { "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
  double v = (double) bytes;
  size_t u = 0;

  if (bytes < 1024)
    return g_strdup_printf ("%" G_GUINT64_FORMAT " B", (guint64) bytes);
  v /= 1024;
  while (v >= 1024 && u + 1 < G_N_ELEMENTS (units)) {
    v /= 1024;
    u++;
  }
  return g_strdup_printf ("%.1f %s", v, units[u]);
}

char *
tool_duration (gint64 us)
{
  double s = (double) us / G_USEC_PER_SEC;

  if (us < 0)
    us = 0;
  if (us < 10 * 1000)
    return g_strdup_printf ("%.1f ms", (double) us / 1000);
  if (us < 1000 * 1000)
    return g_strdup_printf ("%.0f ms", (double) us / 1000);
  if (s < 60)
    return g_strdup_printf ("%.1f s", s);
  return g_strdup_printf ("%d min %02d s", (int) (s / 60), (int) s % 60);
}

char *
tool_eta (double seconds)
{
  long s = seconds < 0 ? 0 : (long) (seconds + 0.5);

  if (s >= 3600)
    return g_strdup_printf ("%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
  return g_strdup_printf ("%ld:%02ld", s / 60, s % 60);
}

static bool
is_c1 (gunichar c)
{
  return c >= 0x80 && c < 0xa0;
}

char *
tool_escape (const char *s)
{
  GString *r;
  bool utf8;

  if (!s)
    return g_strdup ("(none)");
  utf8 = g_utf8_validate (s, -1, NULL);
  r = g_string_sized_new (strlen (s));
  for (const char *p = s; *p;) {
    unsigned char c = (unsigned char) *p;

    if (c < 0x20 || c == 0x7f || (c >= 0x80 && !utf8)) {
      g_string_append_printf (r, "\\x%02x", c);
      p++;
    } else if (c >= 0x80) {
      const char *next = g_utf8_next_char (p);
      if (is_c1 (g_utf8_get_char (p)))
        for (const char *q = p; q < next; q++)
          g_string_append_printf (r, "\\x%02x", (unsigned char) *q);
      else
        g_string_append_len (r, p, next - p);
      p = next;
    } else {
      g_string_append_c (r, (char) c);
      p++;
    }
  }
  return g_string_free (r, FALSE);
}
