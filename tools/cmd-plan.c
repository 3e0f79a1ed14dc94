/* fleece plan: what a backup would do, per drive; changes nothing. */
#include <stdio.h>
#include <stdlib.h>

#include "fleece-tool.h"

static void
print_plan (Ui *ui, struct fleece_handle *h, struct fleece_plan *p,
            const ToolOpts *o)
{
  int n = fleece_plan_get_drive_count (p), fleeced = 0;
  int skipped = fleece_plan_get_skipped_count (p);

  for (int i = 0; i < n; i++)
    fleeced += fleece_plan_get_fleeced (p, i) == 1;
  printf ("VM %u: %d drive%s, %d fleeced%s%s (engine %s)\n", ui->vmid, n,
          n == 1 ? "" : "s", fleeced, o->storage ? " in " : "",
          o->storage ? o->storage : "", tool_engine_name (fleece_get_engine (h)));
  printf ("  %-10s %-16s %10s  %-7s %-24s %-6s %s\n", "drive", "device",
          "size", "fleeced", "image", "format", "cluster");
  for (int i = 0; i < n; i++) {
    g_autofree char *size = tool_size ((uint64_t) fleece_plan_get_size (p, i));
    g_autofree char *key = tool_escape (fleece_plan_get_key (p, i));
    g_autofree char *dev = tool_escape (fleece_plan_get_device (p, i));
    int64_t cs = fleece_plan_get_cluster_size (p, i);
    g_autofree char *cluster = cs > 0 ? tool_size ((uint64_t) cs) : g_strdup ("-");

    if (fleece_plan_get_fleeced (p, i) == 1)
      printf ("  %-10s %-16s %10s  %-7s %-24s %-6s %s\n", key, dev, size, "yes",
              fleece_plan_get_image (p, i), fleece_plan_get_format (p, i), cluster);
    else
      printf ("  %-10s %-16s %10s  %-7s %s\n", key, dev, size, "no",
              fleece_plan_get_reason (p, i));
  }
  if (skipped > 0)
    printf ("Not backed up:\n");
  for (int i = 0; i < skipped; i++) {
    g_autofree char *name = tool_escape (fleece_plan_get_skipped_name (p, i));
    printf ("  %-27s %s\n", name, fleece_plan_get_skipped_reason (p, i));
  }
}

int
tool_cmd_plan (int argc, char **argv)
{
  ToolOpts o;
  Ui ui = { .cmd = "plan" };
  struct fleece_handle *h;
  struct fleece_plan *p;

  tool_parse_options (TOOL_CMD_PLAN, "plan", "Show what a backup would do; "
                      "changes nothing.", "Exit status: 0 the plan was "
                      "printed, 1 planning failed, 2 usage error.\nSee "
                      "fleece(1).", argc, argv, &o);
  ui.vmid = o.vmid;
  h = tool_handle_new (ui.cmd, &o, &ui);
  if (fleece_connect (h, o.qmp) < 0) {
    ui_say (&ui, "cannot connect to QEMU: %s", tool_error ());
    fleece_free (h);
    tool_opts_clear (&o);
    return TOOL_EXIT_FAILED;
  }
  if (!(p = tool_plan (&ui, h, &o))) {
    ui_say (&ui, "%s", tool_error ());
    fleece_free (h);
    tool_opts_clear (&o);
    return TOOL_EXIT_FAILED;
  }
  if (o.json) {
    char *text = fleece_plan_to_json (p);
    printf ("%s\n", text);
    free (text);
  } else {
    print_plan (&ui, h, p, &o);
  }
  fleece_plan_free (p);
  fleece_free (h);
  tool_opts_clear (&o);
  return TOOL_EXIT_OK;
}
