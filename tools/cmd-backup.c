/* fleece backup: plan, attach, start, wait, and always clean up.
 *
 * A signal (SIGINT, SIGTERM, SIGHUP) calls fleece_cancel() from the
 * handler; fleece_wait(h, -1) then sends the cancel to QEMU and returns,
 * and the command cleans up like after any other end. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fleece-tool.h"

typedef struct {
  ToolOpts o;
  Ui ui;
  struct fleece_handle *h;
  struct fleece_target *t;
  struct fleece_plan *p;
  bool incremental;
  const char *format;           /* of --target-dir images */
  bool set_up;                  /* a run may be set up: clean up */
  const char *result;           /* ok, failed, cancelled */
  char *error;
  int sig;
  const char *cleanup;          /* ok, skipped, failed */
  char *cleanup_error;
} Backup;

static void
set_error (Backup *b, const char *fmt, ...) G_GNUC_PRINTF (2, 3);

static void
set_error (Backup *b, const char *fmt, ...)
{
  va_list ap;

  if (b->error)
    return;
  va_start (ap, fmt);
  b->error = g_strdup_vprintf (fmt, ap);
  va_end (ap);
}

/* ---- the command line ---------------------------------------------- */

static void
check_target_opts (const char *cmd, const ToolOpts *o)
{
  bool pve = o->vma || o->pve_args;

  if (pve && (o->target_dir || o->target_nbd))
    tool_usage_error (cmd, "--vma/--pve-args write through Proxmox's QEMU; "
                      "leave out --target-dir and --target-nbd");
  if (pve && o->engine == FLEECE_ENGINE_QEMU)
    tool_usage_error (cmd, "--vma/--pve-args need --engine pve (or auto)");
  if (o->vma && strcmp (o->vma, "-") == 0 && o->pve_args)
    tool_usage_error (cmd, "--vma - writes the archive to standard output; "
                      "--pve-args cannot be added to it");
  if (!pve && o->target_dir && o->target_nbd)
    tool_usage_error (cmd, "--target-dir and --target-nbd exclude each other; "
                      "give one");
  if (!pve && !o->target_dir && !o->target_nbd)
    tool_usage_error (cmd, "missing target: give --target-dir DIR, "
                      "--target-nbd nbd+unix:///?socket=PATH, or --vma FILE");
  if (o->target_format && !o->target_dir)
    tool_usage_error (cmd, "--target-format applies to --target-dir only");
  if (o->target_format && strcmp (o->target_format, "raw") != 0 &&
      strcmp (o->target_format, "qcow2") != 0)
    tool_usage_error (cmd, "--target-format must be raw or qcow2, not '%s'",
                      o->target_format);
  if (o->target_dir && !g_file_test (o->target_dir, G_FILE_TEST_IS_DIR))
    tool_usage_error (cmd, "--target-dir %s: no such directory; create it "
                      "first", o->target_dir);
  if (o->vma && strcmp (o->vma, "-") == 0 && isatty (STDOUT_FILENO))
    tool_usage_error (cmd, "--vma -: standard output is a terminal; pipe it "
                      "to a compressor or redirect it to a file");
}

/* --bitmap starts a chain, --incremental continues it: into a directory
 * as a qcow2 image over the previous backup (--base). */
static void
check_bitmap_opts (const char *cmd, const ToolOpts *o)
{
  if (o->bitmap && o->incremental)
    tool_usage_error (cmd, "--bitmap (a full backup that starts the bitmap) "
                      "and --incremental exclude each other");
  if (o->base && !o->incremental)
    tool_usage_error (cmd, "--base is the previous backup of an incremental "
                      "chain: give --incremental NAME too");
  if (o->base && !o->target_dir)
    tool_usage_error (cmd, "--base applies to --target-dir only");
  if (o->incremental && o->target_dir && o->target_format &&
      strcmp (o->target_format, "qcow2") != 0)
    tool_usage_error (cmd, "an incremental backup into a directory is a qcow2 "
                      "image over the previous backup (--base), not a %s "
                      "image: leave out --target-format %s", o->target_format,
                      o->target_format);
  if (o->incremental && o->target_dir && !o->base)
    tool_usage_error (cmd, "--incremental into --target-dir needs --base DIR, "
                      "the previous backup of the chain (the full backup "
                      "made with --bitmap %s, or the last incremental)",
                      o->incremental);
  if (o->base && !g_file_test (o->base, G_FILE_TEST_IS_DIR))
    tool_usage_error (cmd, "--base %s: no such directory", o->base);
}

static void
check_numbers (const char *cmd, ToolOpts *o)
{
  if (o->bwlimit_s && !tool_parse_u64 (o->bwlimit_s, 0, UINT64_MAX / 1024, &o->bwlimit))
    tool_usage_error (cmd, "--bwlimit must be a number of KiB/s (0 for no "
                      "limit), not '%s'", o->bwlimit_s);
  if (o->cbw_timeout_s && !tool_parse_u64 (o->cbw_timeout_s, 0, UINT32_MAX, &o->cbw_timeout))
    tool_usage_error (cmd, "--cbw-timeout must be a number of seconds from 0 "
                      "to %u, not '%s'", UINT32_MAX, o->cbw_timeout_s);
}

/* --vma FILE and --pve-args JSON: the patched QEMU's backup arguments. */
static struct fleece_target *
pve_target (const char *cmd, const ToolOpts *o)
{
  g_autoptr (json_object) args = NULL;

  if (o->pve_args) {
    args = json_tokener_parse (o->pve_args);
    if (!args || !json_object_is_type (args, json_type_object))
      tool_usage_error (cmd, "--pve-args must be a JSON object, e.g. "
                        "'{\"format\": \"pbs\", \"backup-file\": \"...\"}'");
  } else {
    args = json_object_new_object ();
  }
  if (o->vma) {
    g_autofree char *abs = g_canonicalize_filename (o->vma, NULL);
    json_object_object_add (args, "backup-file", json_object_new_string (abs));
    json_object_object_add (args, "format", json_object_new_string ("vma"));
  }
  return fleece_target_new_pve (json_object_to_json_string_ext (args, JSON_C_TO_STRING_PLAIN));
}

/* The archive goes to what standard output was; from here on standard
 * output is standard error, so nothing else can end up in the archive. */
static struct fleece_target *
stdout_target (const char *cmd)
{
  int fd = fcntl (STDOUT_FILENO, F_DUPFD_CLOEXEC, 3);

  if (fd < 0 || dup2 (STDERR_FILENO, STDOUT_FILENO) < 0)
    tool_usage_error (cmd, "--vma -: %s", g_strerror (errno));
  return fleece_target_new_fd (fd, "vma");
}

static void
make_target (Backup *b)
{
  const ToolOpts *o = &b->o;
  const char *cmd = b->ui.cmd;

  if (o->vma && strcmp (o->vma, "-") == 0)
    b->t = stdout_target (cmd);
  else if (o->vma || o->pve_args)
    b->t = pve_target (cmd, o);
  else if (o->target_dir)
    b->t = fleece_target_new_dir (o->target_dir, b->format);
  else
    b->t = fleece_target_new_nbd (o->target_nbd);
  if (!b->t || (o->base && fleece_target_set_base (b->t, o->base) < 0))
    tool_usage_error (cmd, "%s", tool_error ());
}

/* Where drive key's backup goes, for people. */
static char *
target_of (const Backup *b, const char *key)
{
  const ToolOpts *o = &b->o;

  if (o->target_dir)
    return g_strdup_printf ("%s/%s.%s", o->target_dir, key, b->format);
  if (o->target_nbd)
    return g_strdup_printf ("%s (export %s)", o->target_nbd, key);
  if (o->vma && strcmp (o->vma, "-") == 0)
    return g_strdup ("standard output (VMA)");
  if (o->vma)
    return g_strdup_printf ("%s (VMA)", o->vma);
  return g_strdup ("Proxmox backup (--pve-args)");
}

static void
configure (Backup *b)
{
  struct fleece_handle *h = b->h;
  const ToolOpts *o = &b->o;

  /* On a patched QEMU without backup-fleecing, auto would pick the stock
   * engine, which cannot write a VMA. */
  if ((o->vma || o->pve_args) && fleece_set_engine (h, FLEECE_ENGINE_PVE) < 0)
    tool_usage_error (b->ui.cmd, "%s", tool_error ());
  if ((o->bwlimit_s && fleece_set_bwlimit (h, o->bwlimit) < 0) ||
      (o->cbw_timeout_s && fleece_set_cbw_timeout (h, (unsigned) o->cbw_timeout) < 0) ||
      (o->bitmap && fleece_set_bitmap (h, o->bitmap, FLEECE_BITMAP_NEW) < 0) ||
      (o->incremental && fleece_set_bitmap (h, o->incremental, FLEECE_BITMAP_USE) < 0))
    tool_usage_error (b->ui.cmd, "%s", tool_error ());
  fleece_set_progress_callback (h, ui_progress, &b->ui, NULL);
}

/* ---- the run -------------------------------------------------------- */

static void
add_drives (Backup *b)
{
  int n = fleece_plan_get_drive_count (b->p);

  b->ui.drives = g_ptr_array_new_with_free_func ((GDestroyNotify) ui_drive_free);
  for (int i = 0; i < n; i++) {
    UiDrive *d = g_new0 (UiDrive, 1);
    const char *key = fleece_plan_get_key (b->p, i);

    d->key = g_strdup (key);
    d->device = g_strdup (fleece_plan_get_device (b->p, i));
    d->fleeced = fleece_plan_get_fleeced (b->p, i) == 1;
    d->image = d->fleeced ? g_strdup (fleece_plan_get_image (b->p, i)) : NULL;
    d->size = d->total = (uint64_t) fleece_plan_get_size (b->p, i);
    d->result = g_strdup ("not started");
    d->target = target_of (b, key);
    d->elapsed_ms = -1;
    g_ptr_array_add (b->ui.drives, d);
  }
}

static void
print_header (Backup *b)
{
  Ui *ui = &b->ui;
  guint fleeced = 0;

  if (ui->json) {
    char *text = fleece_plan_to_json (b->p);
    json_object *plan = text ? json_tokener_parse (text) : NULL;
    free (text);
    tool_emit ("plan", plan ? plan : json_object_new_object ());
    return;
  }
  for (guint i = 0; i < ui->drives->len; i++)
    fleeced += ((UiDrive *) ui->drives->pdata[i])->fleeced;
  printf ("fleece backup: VM %u, %u drive%s (%u fleeced)%s\n", ui->vmid,
          ui->drives->len, ui->drives->len == 1 ? "" : "s", fleeced,
          b->incremental ? ", incremental" : "");
  for (guint i = 0; i < ui->drives->len; i++) {
    UiDrive *d = ui->drives->pdata[i];
    g_autofree char *size = tool_size (d->size);
    g_autofree char *reason = NULL;

    if (d->fleeced)
      printf ("  %-10s %10s  fleeced via %s  to %s\n", d->key, size, d->image, d->target);
    else {
      reason = g_strdup (fleece_plan_get_reason (b->p, (int) i));
      printf ("  %-10s %10s  not fleeced (%s)  to %s\n", d->key, size,
              reason ? reason : "", d->target);
    }
  }
  fflush (stdout);
}

/* After a failed attach the library has undone what it did; only a
 * record of this process says that something is left to clean up. */
static bool
own_record_left (struct fleece_handle *h)
{
  char *text = fleece_get_record (h);
  g_autoptr (json_object) rec = text ? json_tokener_parse (text) : NULL;
  json_object *pid;

  free (text);
  return rec && json_object_object_get_ex (rec, "pid", &pid) &&
         json_object_get_int64 (pid) == (int64_t) getpid ();
}

static void
started (Backup *b)
{
  Ui *ui = &b->ui;

  ui->start_us = g_get_monotonic_time ();
  for (guint i = 0; i < ui->drives->len; i++) {
    UiDrive *d = ui->drives->pdata[i];
    g_free (d->result);
    d->result = g_strdup ("running");
  }
  if (ui->json) {
    json_object *ev = json_object_new_object ();
    tool_jadd_u64 (ev, "vmid", ui->vmid);
    tool_jadd_u64 (ev, "drives", ui->drives->len);
    tool_emit ("started", ev);
  } else if (ui->progress && !ui->tty) {
    fprintf (stderr, "fleece backup: started\n");
  }
}

/* The wait: no slices; a signal wakes it through fleece_cancel(). */
static void
wait_end (Backup *b)
{
  int r = fleece_wait (b->h, -1);
  int e = fleece_get_errno ();

  if (r == 1) {
    b->result = "ok";
  } else if (e == ECANCELED && tool_signal) {
    b->result = "cancelled";
    b->sig = tool_signal;
    set_error (b, "the backup was cancelled on %s", tool_signal_name (b->sig));
  } else {
    b->result = e == ECANCELED ? "cancelled" : "failed";
    set_error (b, "%s", tool_error ());
  }
  ui_tick (&b->ui, true);
}

static bool
prepare (Backup *b)
{
  if (fleece_connect (b->h, b->o.qmp) < 0) {
    set_error (b, "cannot connect to QEMU: %s", tool_error ());
    return false;
  }
  if (!(b->p = tool_plan (&b->ui, b->h, &b->o))) {
    set_error (b, "%s", tool_error ());
    return false;
  }
  add_drives (b);
  print_header (b);
  return !tool_signal;
}

static void
run (Backup *b)
{
  if (!prepare (b))
    return;
  if (fleece_attach (b->h, b->p, 0) < 0) {
    set_error (b, "%s", tool_error ());
    b->set_up = own_record_left (b->h);
    return;
  }
  b->set_up = true;
  if (tool_signal)
    return;
  if (fleece_start (b->h, b->p, b->t, 0) < 0) {
    set_error (b, "%s", tool_error ());
    return;
  }
  started (b);
  wait_end (b);
}

/* ---- the end -------------------------------------------------------- */

/* Per drive, what the library says (before cleanup ends the run). */
static void
collect (Backup *b)
{
  for (guint i = 0; b->ui.drives && i < b->ui.drives->len; i++) {
    UiDrive *d = b->ui.drives->pdata[i];
    const char *r = b->ui.start_us ? fleece_get_drive_result (b->h, d->key) : NULL;
    uint64_t done;

    if (!b->ui.start_us)
      continue;
    if (fleece_get_drive_progress (b->h, d->key, &done, NULL) == 0)
      d->done = MIN (done, d->size);
    d->elapsed_ms = fleece_get_drive_elapsed_ms (b->h, d->key);
    g_free (d->result);
    if (!r)
      d->result = g_strdup (strcmp (b->result, "ok") == 0 ? "ok" : b->result);
    else if (strcmp (r, "ok") == 0 || strcmp (r, "cancelled") == 0)
      d->result = g_strdup (r);
    else {
      d->result = g_strdup ("failed");
      d->error = g_strdup (r);
    }
  }
}

static void
clean_up (Backup *b)
{
  /* From here a signal cancels nothing: cleanup is what makes the VM
   * whole again. */
  tool_set_cancel (NULL);
  b->cleanup = "skipped";
  if (b->set_up) {
    if (fleece_cleanup (b->h, 0) == 0)
      b->cleanup = "ok";
    else {
      b->cleanup = "failed";
      b->cleanup_error = g_strdup_printf ("%s; run 'fleece cleanup --vmid %u%s%s%s%s' "
                                          "to retry", tool_error (), b->ui.vmid,
                                          b->o.storage ? " --fleecing-storage " : "",
                                          b->o.storage ? b->o.storage : "",
                                          b->o.state_dir ? " --state-dir " : "",
                                          b->o.state_dir ? b->o.state_dir : "");
    }
  }
  if (b->ui.json) {
    json_object *ev = json_object_new_object ();
    tool_jadd_str (ev, "result", b->cleanup);
    tool_jadd_str (ev, "error", b->cleanup_error);
    tool_emit ("cleanup", ev);
  }
}

static bool
used_fleecing (const Backup *b)
{
  for (guint i = 0; b->ui.drives && i < b->ui.drives->len; i++)
    if (((UiDrive *) b->ui.drives->pdata[i])->fleeced)
      return true;
  return false;
}

static json_object *
drive_json (const Backup *b, const UiDrive *d)
{
  json_object *j = json_object_new_object ();

  tool_jadd_str (j, "key", d->key);
  tool_jadd_str (j, "device", d->device);
  json_object_object_add (j, "fleeced", json_object_new_boolean (d->fleeced));
  tool_jadd_str (j, "image", d->image);
  tool_jadd_u64 (j, "size", d->size);
  tool_jadd_u64 (j, "bytes", d->done);
  json_object_object_add (j, "seconds", d->elapsed_ms >= 0
                          ? tool_jseconds (d->elapsed_ms * 1000) : NULL);
  tool_jadd_str (j, "result", d->result);
  tool_jadd_str (j, "error", d->error);
  tool_jadd_str (j, "target", d->target);
  return j;
}

static void
report_json (const Backup *b, gint64 end_us)
{
  json_object *ev = json_object_new_object ();
  json_object *drives = json_object_new_array ();

  tool_jadd_u64 (ev, "vmid", b->ui.vmid);
  tool_jadd_str (ev, "result", b->result);
  tool_jadd_str (ev, "error", b->error);
  tool_jadd_str (ev, "signal", b->sig ? tool_signal_name (b->sig) : NULL);
  json_object_object_add (ev, "fleecing", json_object_new_boolean (used_fleecing (b)));
  json_object_object_add (ev, "seconds", tool_jseconds (end_us - tool_start_us));
  tool_jadd_str (ev, "cleanup", b->cleanup);
  tool_jadd_str (ev, "cleanup-error", b->cleanup_error);
  for (guint i = 0; b->ui.drives && i < b->ui.drives->len; i++)
    json_object_array_add (drives, drive_json (b, b->ui.drives->pdata[i]));
  json_object_object_add (ev, "drives", drives);
  tool_emit ("result", ev);
}

static void
report_text (const Backup *b, gint64 end_us)
{
  g_autofree char *t = tool_duration (end_us - tool_start_us);
  const Ui *ui = &b->ui;

  if (strcmp (b->result, "ok") == 0)
    printf ("fleece backup: VM %u backed up in %s\n", ui->vmid, t);
  else
    printf ("fleece backup: the backup of VM %u %s after %s\n", ui->vmid,
            strcmp (b->result, "cancelled") == 0 ? "was cancelled" : "failed", t);
  if (!ui->drives || !ui->drives->len)
    return;
  printf ("  %-10s %-8s %-24s %10s %9s  %-11s %s\n", "drive", "fleeced",
          "image", "bytes", "time", "result", "target");
  for (guint i = 0; i < ui->drives->len; i++) {
    UiDrive *d = ui->drives->pdata[i];
    g_autofree char *bytes = tool_size (d->done);
    g_autofree char *dt = d->elapsed_ms >= 0 ? tool_duration (d->elapsed_ms * 1000)
                                             : g_strdup ("-");
    printf ("  %-10s %-8s %-24s %10s %9s  %-11s %s\n", d->key,
            d->fleeced ? "yes" : "no", d->image ? d->image : "-", bytes, dt,
            d->result, d->target);
  }
  for (guint i = 0; i < ui->drives->len; i++) {
    UiDrive *d = ui->drives->pdata[i];
    g_autofree char *why = d->error ? tool_escape (d->error) : NULL;
    if (why)
      printf ("  %s failed: %s\n", d->key, why);
  }
}

static int
finish (Backup *b)
{
  gint64 end_us;

  if (!b->ui.start_us && tool_signal) {
    b->sig = tool_signal;
    set_error (b, "interrupted by %s before the backup started",
               tool_signal_name (b->sig));
    b->result = "cancelled";
  }
  if (!b->result)
    b->result = "failed";
  collect (b);
  clean_up (b);
  if (b->error) {
    ui_clear_live (&b->ui);
    ui_say (&b->ui, "%s", b->error);
  }
  if (b->cleanup_error)
    ui_say (&b->ui, "cleanup failed: %s", b->cleanup_error);
  end_us = g_get_monotonic_time ();
  if (b->ui.json)
    report_json (b, end_us);
  else
    report_text (b, end_us);
  fflush (stdout);
  return strcmp (b->result, "ok") == 0 && strcmp (b->cleanup, "failed") != 0
         ? TOOL_EXIT_OK : TOOL_EXIT_FAILED;
}

int
tool_cmd_backup (int argc, char **argv)
{
  Backup b = { .ui = { .cmd = "backup" } };
  int rc;

  tool_parse_options (TOOL_CMD_BACKUP, "backup", "Back up a running VM's "
                      "drives with fleecing.", "Exit status: 0 success, 1 the "
                      "backup failed (everything it set up was cleaned up), 2 "
                      "usage error.\nSee fleece(1).", argc, argv, &b.o);
  check_target_opts (b.ui.cmd, &b.o);
  check_bitmap_opts (b.ui.cmd, &b.o);
  check_numbers (b.ui.cmd, &b.o);
  b.incremental = b.o.incremental != NULL;
  b.format = b.o.target_format ? b.o.target_format : b.incremental ? "qcow2" : "raw";
  b.ui.vmid = b.o.vmid;
  b.ui.json = b.o.json;
  b.ui.progress = b.o.progress != 0;
  b.ui.verbose = b.o.verbose;
  make_target (&b);
  b.ui.tty = isatty (STDERR_FILENO) && g_strcmp0 (g_getenv ("TERM"), "dumb") != 0;
  b.h = b.ui.h = tool_handle_new (b.ui.cmd, &b.o, &b.ui);
  configure (&b);

  tool_catch_signals ();
  tool_set_cancel (b.h);
  run (&b);
  rc = finish (&b);

  fleece_plan_free (b.p);
  fleece_free (b.h);
  fleece_target_free (b.t);
  if (b.ui.drives)
    g_ptr_array_unref (b.ui.drives);
  g_free (b.error);
  g_free (b.cleanup_error);
  tool_opts_clear (&b.o);
  return rc;
}
