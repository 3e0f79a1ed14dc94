/* fleece cleanup: undo what a crashed or killed run left
 * (fleece_cleanup()), from its record or, without one, from what QEMU
 * shows. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "fleece-tool.h"

/* fleece_get_status()'s summary: none, active, crashed or leftovers; NULL
 * if it cannot be had (cleanup then says so itself). */
static char *
run_state (struct fleece_handle *h)
{
  char *text = fleece_get_status (h, 0);
  g_autoptr (json_object) st = text ? json_tokener_parse (text) : NULL;
  json_object *run;

  free (text);
  return st && json_object_object_get_ex (st, "run", &run) && run
         ? g_strdup (json_object_get_string (run)) : NULL;
}

static bool
record_left (struct fleece_handle *h)
{
  char *rec = fleece_get_record (h);

  free (rec);
  return rec != NULL;
}

int
tool_cmd_cleanup (int argc, char **argv)
{
  ToolOpts o;
  Ui ui = { .cmd = "cleanup" };
  g_autofree char *before = NULL;
  struct fleece_handle *h;
  int rc = TOOL_EXIT_FAILED;

  tool_parse_options (TOOL_CMD_CLEANUP, "cleanup", "Undo what a crashed or "
                      "killed backup left.", "Exit status: 0 nothing is left, "
                      "1 cleanup failed (what is left is still recorded; run "
                      "it again), 2 usage error.\nSee fleece(1).", argc, argv, &o);
  ui.vmid = o.vmid;
  ui.verbose = o.verbose;
  h = tool_handle_new (ui.cmd, &o, &ui);
  if (o.qmp && fleece_connect (h, o.qmp) < 0)
    ui_say (&ui, "warning: %s; going on with the QMP socket in the record",
            tool_error ());
  before = run_state (h);
  /* Signals must not cut a cleanup short: they are noted, nothing more. */
  tool_catch_signals ();
  if (fleece_cleanup (h, 0) < 0)
    ui_say (&ui, "%s%s", tool_error (), fleece_get_errno () == EBUSY
            ? " (a fleece backup of this VM is running: stop it, it cleans up "
              "after itself)"
            : fleece_get_errno () == EXDEV ? " (give that storage with "
              "--fleecing-storage)" : "");
  else if (record_left (h))
    ui_say (&ui, "the record of VM %u is still there; run 'fleece cleanup' "
            "again", ui.vmid);
  else {
    rc = TOOL_EXIT_OK;
    if (g_strcmp0 (before, "none") == 0)
      printf ("fleece cleanup: VM %u has no record; nothing to clean up\n", ui.vmid);
    else
      printf ("fleece cleanup: VM %u cleaned up; nothing is left\n", ui.vmid);
  }
  fleece_free (h);
  tool_opts_clear (&o);
  return rc;
}
