/* fleece(1): fleecing backups of running QEMU VMs from the command line.
 *
 * Built on the public API of libfleece only.  One file per command
 * (cmd-*.c, demo.c); their options come from one table (options.c), the
 * handle is set up in one place (setup.c), output is ui.c's. */
#include <locale.h>
#include <stdio.h>
#include <string.h>

#include "fleece-tool.h"

static const struct {
  const char *name;
  int (*run) (int argc, char **argv);
  const char *summary;
} commands[] = {
  { "backup", tool_cmd_backup,
    "back up a running VM's drives (plan, attach, start, wait, clean up)" },
  { "plan", tool_cmd_plan, "show what a backup would do; changes nothing" },
  { "status", tool_cmd_status, "show a VM's record and what QEMU shows of a run" },
  { "cleanup", tool_cmd_cleanup, "undo what a crashed or killed backup left" },
  { "restore", tool_cmd_restore, "turn a backup chain into plain images" },
  { "demo", tool_demo,
    "back up a throwaway VM to a slow target, with and without fleecing" },
};

static void
print_help (void)
{
  printf ("Usage: fleece COMMAND [OPTION...]\n\n"
          "Fleecing backups of running QEMU virtual machines over QMP.\n\n"
          "Commands:\n");
  for (size_t i = 0; i < G_N_ELEMENTS (commands); i++)
    printf ("  %-8s %s\n", commands[i].name, commands[i].summary);
  printf ("\nRun 'fleece COMMAND --help' for a command's options.\n"
          "  -h, --help     show this help\n"
          "  -V, --version  show the version\n\n"
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
    tool_usage_error (NULL, "missing command: backup, plan, status, cleanup, "
                      "restore or demo; see 'fleece --help'");
  if (strcmp (cmd, "--help") == 0 || strcmp (cmd, "-h") == 0 ||
      strcmp (cmd, "help") == 0) {
    print_help ();
    return TOOL_EXIT_OK;
  }
  if (strcmp (cmd, "--version") == 0 || strcmp (cmd, "-V") == 0) {
    printf ("fleece %s (libfleece %s)\n", FLEECE_TOOL_VERSION, fleece_get_version ());
    return TOOL_EXIT_OK;
  }
  for (size_t i = 0; i < G_N_ELEMENTS (commands); i++)
    if (strcmp (cmd, commands[i].name) == 0)
      return commands[i].run (argc - 1, argv + 1);
  if (cmd[0] == '-')
    tool_usage_error (NULL, "unknown option %s; see 'fleece --help'", cmd);
  tool_usage_error (NULL, "unknown command '%s'; the commands are backup, plan, "
                    "status, cleanup, restore and demo", cmd);
}
