/* fleece status: what the library knows of a VM's runs, read-only
 * (fleece_get_status(): the record, the lock, what QEMU shows).  Every
 * string from the record or from QEMU is shown escaped: a record is a
 * file, and what it says must not drive the terminal. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "fleece-tool.h"

static json_object *
jget (json_object *o, const char *key)
{
  json_object *v;
  return o && json_object_object_get_ex (o, key, &v) ? v : NULL;
}

/* A string member, escaped, or "?" (g_free). */
static char *
jesc (json_object *o, const char *key)
{
  json_object *v = jget (o, key);
  return v ? tool_escape (json_object_get_string (v)) : g_strdup ("?");
}

/* The record's fleecing storage as --fleecing-storage takes it, or NULL
 * (g_free). */
static char *
storage_arg (json_object *rec)
{
  json_object *st = jget (rec, "storage");
  const char *type = st ? json_object_get_string (jget (st, "type")) : NULL;

  if (g_strcmp0 (type, "dir") == 0 && jget (st, "dir"))
    return tool_escape (json_object_get_string (jget (st, "dir")));
  if (g_strcmp0 (type, "rbd") == 0 && jget (st, "pool")) {
    g_autofree char *pool = jesc (st, "pool");
    g_autofree char *ns = jget (st, "namespace") ? jesc (st, "namespace") : NULL;
    return g_strdup_printf ("rbd:%s%s%s", pool, ns ? "/" : "", ns ? ns : "");
  }
  return NULL;
}

static void
print_record_drive (json_object *d)
{
  g_autofree char *key = jesc (d, "key");
  json_object *f = jget (d, "fleeced");

  if (!f || !json_object_get_boolean (f)) {
    printf ("          %-10s not fleeced\n", key);
  } else {
    g_autofree char *image = jesc (d, "image");
    g_autofree char *volid = jget (d, "volid") ? jesc (d, "volid") : NULL;
    printf ("          %-10s fleeced, image %s%s%s\n", key, image,
            volid ? " at " : " (not allocated)", volid ? volid : "");
  }
}

static void
print_record (json_object *rec, json_object *record_error)
{
  g_autofree char *state = jesc (rec, "state");
  g_autofree char *engine = jesc (rec, "engine");
  g_autofree char *run = jesc (rec, "run");
  g_autofree char *qmp = jesc (rec, "qmp");
  json_object *drives = jget (rec, "drives");
  time_t created = (time_t) json_object_get_int64 (jget (rec, "created"));
  char when[64] = "?";
  struct tm tm;

  if (record_error) {
    g_autofree char *e = tool_escape (json_object_get_string (record_error));
    printf ("  record: cannot be read: %s\n", e);
    return;
  }
  if (!rec) {
    printf ("  record: none\n");
    return;
  }
  if (created && localtime_r (&created, &tm))
    strftime (when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
  printf ("  record: state %s, engine %s, run %s, created %s by process %"
          G_GINT64_FORMAT "\n", state, engine, run, when,
          (gint64) json_object_get_int64 (jget (rec, "pid")));
  printf ("          QMP %s\n", qmp);
  {
    g_autofree char *st = storage_arg (rec);
    if (st)
      printf ("          fleecing storage %s\n", st);
  }
  for (size_t i = 0; drives && json_object_is_type (drives, json_type_array) &&
                     i < json_object_array_length (drives); i++)
    print_record_drive (json_object_array_get_idx (drives, i));
}

static void
print_names (const char *title, json_object *list)
{
  if (!list || !json_object_is_type (list, json_type_array) ||
      !json_object_array_length (list))
    return;
  printf ("        %s:", title);
  for (size_t i = 0; i < json_object_array_length (list); i++) {
    g_autofree char *n = tool_escape (json_object_get_string (json_object_array_get_idx (list, i)));
    printf (" %s", n);
  }
  printf ("\n");
}

static void
print_qemu (json_object *qemu)
{
  json_object *runs = jget (qemu, "runs"), *backup = jget (qemu, "backup");

  if (!qemu) {
    printf ("  QEMU: not asked (no --qmp and no record naming a socket)\n");
    return;
  }
  if (!json_object_get_boolean (jget (qemu, "reachable"))) {
    g_autofree char *e = jesc (qemu, "error");
    printf ("  QEMU: cannot be asked: %s\n", e);
    return;
  }
  printf ("  QEMU: %s\n", jget (qemu, "traces") && json_object_array_length (jget (qemu, "traces"))
          ? "shows libfleece's nodes or jobs" : "shows no libfleece nodes or jobs");
  for (size_t i = 0; runs && i < json_object_array_length (runs); i++) {
    json_object *r = json_object_array_get_idx (runs, i);
    g_autofree char *id = jesc (r, "run");
    printf ("        run %s of process %" G_GINT64_FORMAT " (%s)\n", id,
            (gint64) json_object_get_int64 (jget (r, "pid")),
            json_object_get_boolean (jget (r, "alive")) ? "alive" : "gone");
  }
  print_names ("nodes and jobs", jget (qemu, "traces"));
  if (backup) {
    g_autofree char *st = jesc (backup, "status");
    printf ("        Proxmox backup: %s\n", st);
  }
}

static void
print_advice (uint32_t vmid, const char *run, json_object *rec,
              const char *state_dir)
{
  g_autofree char *st = storage_arg (rec);
  g_autofree char *sd = state_dir ? tool_escape (state_dir) : NULL;
  g_autofree char *args = g_strdup_printf ("%s%s%s%s", st ? " --fleecing-storage " : "",
                                           st ? st : "", sd ? " --state-dir " : "",
                                           sd ? sd : "");

  if (g_strcmp0 (run, "active") == 0)
    printf ("A run of VM %u is active: it cleans up after itself when it ends "
            "(stop it with SIGINT or SIGTERM).\n", vmid);
  else if (g_strcmp0 (run, "crashed") == 0)
    printf ("A run of VM %u is recorded and its process is gone: 'fleece "
            "cleanup --vmid %u%s' undoes it.\n", vmid, vmid, args);
  else if (g_strcmp0 (run, "leftovers") == 0)
    printf ("QEMU shows a run of VM %u that has no record here: 'fleece cleanup "
            "--vmid %u --qmp PATH%s' undoes what QEMU shows.\n", vmid, vmid, args);
  else
    printf ("Nothing is set up for VM %u.\n", vmid);
}

static void
print_status (uint32_t vmid, json_object *st, const char *state_dir)
{
  json_object *run = jget (st, "run");
  g_autofree char *lock = jesc (st, "lock");

  printf ("VM %u\n", vmid);
  print_record (jget (st, "record"), jget (st, "record-error"));
  printf ("  lock: %s\n", lock);
  print_qemu (jget (st, "qemu"));
  print_advice (vmid, run ? json_object_get_string (run) : NULL,
                jget (st, "record"), state_dir);
}

int
tool_cmd_status (int argc, char **argv)
{
  ToolOpts o;
  Ui ui = { .cmd = "status" };
  g_autoptr (json_object) st = NULL;
  struct fleece_handle *h;
  char *text;
  int rc;

  tool_parse_options (TOOL_CMD_STATUS, "status", "Show the record of a VM's "
                      "run and what QEMU shows of it; changes nothing.",
                      "Exit status: 0 the status was shown, 1 it could not be "
                      "(or the record cannot be read), 2 usage error.\nSee "
                      "fleece(1).", argc, argv, &o);
  ui.vmid = o.vmid;
  h = tool_handle_new (ui.cmd, &o, &ui);
  if (o.qmp && fleece_connect (h, o.qmp) < 0)
    ui_say (&ui, "warning: %s; going on without it", tool_error ());
  if (!(text = fleece_get_status (h, 0))) {
    ui_say (&ui, "%s", tool_error ());
    fleece_free (h);
    tool_opts_clear (&o);
    return TOOL_EXIT_FAILED;
  }
  st = json_tokener_parse (text);
  if (o.json)
    printf ("%s\n", text);
  else
    print_status (o.vmid, st, o.state_dir);
  free (text);
  rc = jget (st, "record-error") ? TOOL_EXIT_FAILED : TOOL_EXIT_OK;
  fleece_free (h);
  tool_opts_clear (&o);
  return rc;
}
