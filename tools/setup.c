/* A libfleece handle set up from the shared options: what every command
 * that talks about a VM does the same way. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fleece-tool.h"

const char *
tool_error (void)
{
  const char *e = fleece_get_error ();
  return e ? e : "unknown error";
}

const char *
tool_engine_name (int engine)
{
  switch (engine) {
  case FLEECE_ENGINE_QEMU: return "qemu";
  case FLEECE_ENGINE_PVE: return "pve";
  default: return "?";
  }
}

/* A storage this libfleece cannot provide is no mistake on the command
 * line: exit 1, not 2. */
G_GNUC_NORETURN static void
storage_error (const char *cmd)
{
  if (fleece_get_errno () == ENOTSUP) {
    g_autofree char *msg = tool_escape (tool_error ());
    fflush (stdout);
    fprintf (stderr, "fleece %s: --fleecing-storage: %s\n", cmd, msg);
    exit (TOOL_EXIT_FAILED);
  }
  tool_usage_error (cmd, "--fleecing-storage: %s", tool_error ());
}

/* rbd:POOL[/NAMESPACE] with --rbd-conf, --rbd-id, --rbd-keyring. */
static struct fleece_storage *
rbd_storage (const char *cmd, const ToolOpts *o)
{
  g_auto (GStrv) parts = g_strsplit (o->storage + strlen ("rbd:"), "/", 2);
  const char *keys[] = { "conf", "id", "keyring" };
  const char *values[] = { o->rbd_conf, o->rbd_id, o->rbd_keyring };
  struct fleece_storage *st;

  if (!parts[0] || !*parts[0] || (parts[1] && !*parts[1]))
    tool_usage_error (cmd, "--fleecing-storage %s: give rbd:POOL or "
                      "rbd:POOL/NAMESPACE", o->storage);
  if (!(st = fleece_storage_new_rbd (parts[0], parts[1])))
    storage_error (cmd);
  for (size_t i = 0; i < G_N_ELEMENTS (keys); i++)
    if (values[i] && fleece_storage_set_option (st, keys[i], values[i]) < 0) {
      fleece_storage_free (st);
      storage_error (cmd);
    }
  return st;
}

static void
set_storage (const char *cmd, struct fleece_handle *h, const ToolOpts *o)
{
  struct fleece_storage *st;

  if (g_str_has_prefix (o->storage, "rbd:"))
    st = rbd_storage (cmd, o);
  else if (!(st = fleece_storage_new_dir (o->storage)))
    storage_error (cmd);
  if (fleece_set_storage (h, st) < 0)
    storage_error (cmd);
}

struct fleece_handle *
tool_handle_new (const char *cmd, const ToolOpts *o, Ui *ui)
{
  struct fleece_handle *h = fleece_new ();
  unsigned flags = (o->no_fleecing ? FLEECE_PLAN_NO_FLEECING : 0) |
                   (o->all_drives ? FLEECE_PLAN_ALL_DRIVES : 0) |
                   (o->fleecing_optional ? FLEECE_PLAN_FLEECING_OPTIONAL : 0);

  if (!h) {
    fprintf (stderr, "fleece %s: %s\n", cmd, tool_error ());
    exit (TOOL_EXIT_FAILED);
  }
  fleece_set_log_callback (h, ui_log, ui, NULL);
  if (fleece_set_vmid (h, o->vmid) < 0 ||
      (o->state_dir && fleece_set_state_dir (h, o->state_dir) < 0) ||
      (o->engine >= 0 && fleece_set_engine (h, o->engine) < 0) ||
      (o->devices && fleece_set_drives (h, (const char *const *) o->devices) < 0) ||
      fleece_set_plan_flags (h, flags) < 0)
    tool_usage_error (cmd, "%s", tool_error ());
  if (o->storage)
    set_storage (cmd, h, o);
  return h;
}

struct fleece_plan *
tool_plan (Ui *ui, struct fleece_handle *h, const ToolOpts *o)
{
  struct fleece_plan *p = fleece_plan (h);

  /* The library restricts to --devices before anything else and says
   * which drives the VM has when one is not among them. */
  if (!p && o->devices && fleece_get_errno () == ENOENT)
    tool_usage_error (ui->cmd, "--devices: %s", tool_error ());
  return p;
}
