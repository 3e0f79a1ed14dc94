/* The one option table of the fleece command: every option of every
 * command, which commands take it, and where its value goes.  Each
 * command builds its GOptionContext from it, so --vmid, --qmp,
 * --state-dir, ... are defined, parsed and checked in one place. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fleece-tool.h"

#define VMID_MAX 999999999u

#define BACKUP TOOL_CMD_BACKUP
#define PLAN TOOL_CMD_PLAN
#define STATUS TOOL_CMD_STATUS
#define CLEANUP TOOL_CMD_CLEANUP
#define RESTORE TOOL_CMD_RESTORE
#define VM_CMDS (BACKUP | PLAN | STATUS | CLEANUP)

typedef enum {
  ARG_FLAG,             /* gboolean */
  ARG_STRING,           /* char *, given once */
  ARG_PATH,             /* char *, given once, made absolute */
  ARG_PROGRESS,         /* --progress / --no-progress: the last one wins */
} ArgKind;

typedef struct {
  const char *name;
  char short_name;
  unsigned cmds;        /* TOOL_CMD_* taking it */
  unsigned required;    /* TOOL_CMD_* requiring it */
  ArgKind kind;
  size_t offset;        /* of its field in ToolOpts */
  const char *arg;      /* GOption's arg_description */
  const char *help;
} ToolOption;

#define F(field) offsetof (ToolOpts, field)

/* In the order --help lists them, which is also the order in which
 * missing required options are reported. */
static const ToolOption options[] = {
  { "vmid", 0, VM_CMDS, VM_CMDS, ARG_STRING, F (vmid_s), "ID",
    "The VM's id, 1 to 999999999" },
  { "qmp", 0, VM_CMDS, BACKUP | PLAN, ARG_PATH, F (qmp), "PATH",
    "The VM's QMP socket (status, cleanup: default the one in the record)" },
  { "fleecing-storage", 0, BACKUP | PLAN | CLEANUP, 0, ARG_STRING, F (storage),
    "DIR|rbd:POOL[/NS]", "Where the fleecing images go: a directory on fast "
    "local storage, or a Ceph RBD pool (required unless --no-fleecing)" },
  { "rbd-conf", 0, BACKUP | PLAN | CLEANUP, 0, ARG_PATH, F (rbd_conf), "FILE",
    "RBD storage: the ceph.conf to use" },
  { "rbd-id", 0, BACKUP | PLAN | CLEANUP, 0, ARG_STRING, F (rbd_id), "ID",
    "RBD storage: the Ceph client id" },
  { "rbd-keyring", 0, BACKUP | PLAN | CLEANUP, 0, ARG_PATH, F (rbd_keyring),
    "FILE", "RBD storage: the keyring of the client" },
  { "state-dir", 0, VM_CMDS, 0, ARG_PATH, F (state_dir), "DIR",
    "Where records and locks live (default: libfleece's, $FLEECE_STATE_DIR "
    "or /var/lib/fleece)" },
  { "engine", 0, BACKUP | PLAN, 0, ARG_STRING, F (engine_s), "ENGINE",
    "auto (Proxmox's if QEMU has it), qemu (stock QEMU, graph built over "
    "QMP) or pve (Proxmox's patched QEMU)" },
  { "devices", 0, BACKUP | PLAN, 0, ARG_STRING, F (devices_s), "LIST",
    "Only these drives (drive-scsi0 or scsi0, comma-separated)" },
  { "all-drives", 0, BACKUP | PLAN, 0, ARG_FLAG, F (all_drives), NULL,
    "Fleece the EFI disk and TPM state too" },
  { "no-fleecing", 0, BACKUP | PLAN, 0, ARG_FLAG, F (no_fleecing), NULL,
    "Back up without fleecing (guest writes wait for the target)" },
  { "fleecing-optional", 0, BACKUP, 0, ARG_FLAG, F (fleecing_optional), NULL,
    "If QEMU cannot fleece, warn and back up without (qemu-server's way)" },
  { "target-dir", 0, BACKUP | RESTORE, RESTORE, ARG_PATH, F (target_dir), "DIR",
    "backup: write DIR/<drive>.<format>; restore: the newest backup of a chain" },
  { "target-format", 0, BACKUP, 0, ARG_STRING, F (target_format), "FORMAT",
    "Format of the images in --target-dir: raw (default) or qcow2" },
  { "target-nbd", 0, BACKUP, 0, ARG_STRING, F (target_nbd), "URI",
    "Write to an NBD server, one export per drive named after its key "
    "(nbd+unix:///?socket=PATH or nbd://HOST[:PORT])" },
  { "vma", 0, BACKUP, 0, ARG_STRING, F (vma), "FILE",
    "Proxmox engine: write a VMA archive to FILE, or with - to standard "
    "output (implies --engine pve)" },
  { "pve-args", 0, BACKUP, 0, ARG_STRING, F (pve_args), "JSON",
    "Proxmox engine: further arguments of QMP backup as a JSON object, "
    "passed through" },
  { "bitmap", 0, BACKUP, 0, ARG_STRING, F (bitmap), "NAME",
    "A full backup that starts (or restarts) the dirty bitmap NAME at its "
    "point in time: the first link of an incremental chain" },
  { "incremental", 0, BACKUP, 0, ARG_STRING, F (incremental), "NAME",
    "Back up what the dirty bitmap NAME marks since the last backup" },
  { "base", 0, BACKUP, 0, ARG_PATH, F (base), "DIR",
    "With --incremental and --target-dir: the previous backup of the chain" },
  { "bwlimit", 0, BACKUP, 0, ARG_STRING, F (bwlimit_s), "KIB",
    "Limit each drive's backup to KIB KiB/s (0: no limit)" },
  { "cbw-timeout", 0, BACKUP, 0, ARG_STRING, F (cbw_timeout_s), "SECONDS",
    "How long a guest write may wait for its copy (0: forever; default: "
    "libfleece's)" },
  { "out", 0, RESTORE, RESTORE, ARG_PATH, F (out), "DIR",
    "Write the restored images to DIR/<drive>.<format>" },
  { "format", 0, RESTORE, 0, ARG_STRING, F (format), "FORMAT",
    "Format of the restored images: raw (default) or qcow2" },
  { "json", 0, BACKUP | PLAN | STATUS, 0, ARG_FLAG, F (json), NULL,
    "Print JSON (backup: events, one per line, ending with the result)" },
  { "progress", 0, BACKUP, 0, ARG_PROGRESS, 0, NULL,
    "Show progress (the default)" },
  { "no-progress", 0, BACKUP, 0, ARG_PROGRESS, 0, NULL,
    "Do not show progress" },
  { "verbose", 'v', BACKUP | PLAN | CLEANUP | RESTORE, 0, ARG_FLAG, F (verbose),
    NULL, "Also show the library's informational messages" },
};

static const ToolOption *
find_option (const char *option_name)
{
  const char *n = option_name;

  while (*n == '-')
    n++;
  for (size_t i = 0; i < G_N_ELEMENTS (options); i++)
    if (strcmp (options[i].name, n) == 0 ||
        (options[i].short_name && n[0] == options[i].short_name && !n[1]))
      return &options[i];
  return NULL;
}

/* Every valued option is stored here, which refuses a second occurrence:
 * "--vmid 100 --vmid 200" is a mistake, not "the last one wins". */
static gboolean
on_value (const char *option_name, const char *value, gpointer data,
          GError **err)
{
  const ToolOption *opt = find_option (option_name);
  ToolOpts *o = data;
  char **slot;

  if (!opt)
    return FALSE;
  if (opt->kind == ARG_PROGRESS) {
    o->progress = strcmp (opt->name, "progress") == 0;
    return TRUE;
  }
  slot = (char **) ((char *) o + opt->offset);
  if (*slot) {
    g_set_error (err, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                 "--%s was given twice ('%s' and '%s'); give it once",
                 opt->name, *slot, value);
    return FALSE;
  }
  if (!*value) {
    g_set_error (err, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                 "--%s needs %s %s, not an empty string", opt->name,
                 strchr ("AEIOU", opt->arg[0]) ? "an" : "a", opt->arg);
    return FALSE;
  }
  /* Paths go into the durable record, which a cleanup run from another
   * directory reads, and to QEMU, whose working directory is not ours. */
  *slot = opt->kind == ARG_PATH ? g_canonicalize_filename (value, NULL)
                                : g_strdup (value);
  return TRUE;
}

static GOptionEntry *
entries_for (unsigned cmd, ToolOpts *o)
{
  GOptionEntry *e = g_new0 (GOptionEntry, G_N_ELEMENTS (options) + 1);
  size_t n = 0;

  for (size_t i = 0; i < G_N_ELEMENTS (options); i++) {
    const ToolOption *opt = &options[i];
    GOptionEntry *x = &e[n];

    if (!(opt->cmds & cmd))
      continue;
    x->long_name = opt->name;
    x->short_name = opt->short_name;
    x->description = opt->help;
    x->arg_description = opt->arg;
    if (opt->kind == ARG_FLAG) {
      x->arg = G_OPTION_ARG_NONE;
      x->arg_data = (char *) o + opt->offset;
    } else {
      x->arg = G_OPTION_ARG_CALLBACK;
      x->arg_data = (gpointer) on_value;
      x->flags = opt->kind == ARG_PROGRESS ? G_OPTION_FLAG_NO_ARG
                 : opt->kind == ARG_PATH ? G_OPTION_FLAG_FILENAME : 0;
    }
    n++;
  }
  return e;
}

/* "drive-scsi0,virtio1" -> {"scsi0", "virtio1", NULL}; the library checks
 * the keys themselves. */
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

static void
convert_vmid (const char *name, ToolOpts *o)
{
  uint64_t v;

  if (!tool_parse_u64 (o->vmid_s, 1, VMID_MAX, &v))
    tool_usage_error (name, "--vmid must be a number from 1 to %u, not '%s'",
                      VMID_MAX, o->vmid_s);
  o->vmid = (uint32_t) v;
}

/* In table order, the vmid checked as soon as it is seen: "--vmid 0" is
 * reported before a missing --qmp. */
static void
check_required (unsigned cmd, const char *name, ToolOpts *o)
{
  for (size_t i = 0; i < G_N_ELEMENTS (options); i++) {
    const ToolOption *opt = &options[i];
    bool given;

    if (opt->kind != ARG_STRING && opt->kind != ARG_PATH)
      continue;
    given = *(char **) ((char *) o + opt->offset) != NULL;
    if (opt->offset == F (vmid_s) && given)
      convert_vmid (name, o);
    if (!(opt->required & cmd) || given)
      continue;
    if (opt->offset == F (vmid_s))
      tool_usage_error (name, "missing --vmid ID (the VM's id, e.g. --vmid 100)");
    if (opt->offset == F (qmp))
      tool_usage_error (name, "missing --qmp PATH (the VM's QMP socket, e.g. "
                        "/var/run/qemu-server/%s.qmp)", o->vmid_s);
    tool_usage_error (name, "missing --%s %s", opt->name, opt->arg);
  }
  if ((cmd & (BACKUP | PLAN)) && !o->storage && !o->no_fleecing)
    tool_usage_error (name, "missing --fleecing-storage DIR (a directory on "
                      "fast local storage, or rbd:POOL for Ceph RBD)");
}

/* The values every command shares. */
static void
convert_common (const char *name, ToolOpts *o)
{
  o->engine = -1;
  if (o->engine_s) {
    static const char *const names[] = { "auto", "qemu", "pve" };
    static const int values[] = { FLEECE_ENGINE_AUTO, FLEECE_ENGINE_QEMU,
                                  FLEECE_ENGINE_PVE };

    for (size_t i = 0; i < G_N_ELEMENTS (names); i++)
      if (strcmp (o->engine_s, names[i]) == 0)
        o->engine = values[i];
    if (o->engine < 0)
      tool_usage_error (name, "--engine must be auto, qemu or pve, not '%s'",
                        o->engine_s);
  }
  if (o->devices_s)
    o->devices = parse_devices (name, o->devices_s);
  if ((o->rbd_conf || o->rbd_id || o->rbd_keyring) &&
      !(o->storage && g_str_has_prefix (o->storage, "rbd:")))
    tool_usage_error (name, "--rbd-conf, --rbd-id and --rbd-keyring are for "
                      "an RBD fleecing storage (--fleecing-storage rbd:POOL)");
}

/* A directory storage must exist: made absolute here, checked by the
 * library. */
static void
convert_storage (const char *name, ToolOpts *o)
{
  char *dir;

  if (!o->storage || g_str_has_prefix (o->storage, "rbd:"))
    return;
  dir = g_canonicalize_filename (o->storage, NULL);
  if (!g_file_test (dir, G_FILE_TEST_IS_DIR))
    tool_usage_error (name, "--fleecing-storage %s: no such directory; create "
                      "it first", o->storage);
  g_free (o->storage);
  o->storage = dir;
}

void
tool_parse_options (unsigned cmd, const char *name, const char *summary,
                    const char *description, int argc, char **argv,
                    ToolOpts *o)
{
  g_autofree char *prgname = g_strdup_printf ("fleece %s", name);
  g_autoptr (GOptionContext) ctx = g_option_context_new ("");
  g_autoptr (GError) err = NULL;
  g_autofree GOptionEntry *entries = NULL;
  GOptionGroup *group;

  memset (o, 0, sizeof *o);
  o->progress = -1;
  g_set_prgname (prgname);
  entries = entries_for (cmd, o);
  group = g_option_group_new (name, summary, "", o, NULL);
  g_option_group_add_entries (group, entries);
  g_option_context_set_main_group (ctx, group);
  g_option_context_set_summary (ctx, summary);
  g_option_context_set_description (ctx, description);
  if (!g_option_context_parse (ctx, &argc, &argv, &err)) {
    /* GLib's "Unknown option --x" reads better lower-cased here. */
    err->message[0] = g_ascii_tolower (err->message[0]);
    tool_usage_error (name, "%s; see 'fleece %s --help'", err->message, name);
  }
  if (argc > 1)
    tool_usage_error (name, "unexpected argument '%s'; see 'fleece %s --help'",
                      argv[1], name);
  check_required (cmd, name, o);
  convert_storage (name, o);
  convert_common (name, o);
}

void
tool_opts_clear (ToolOpts *o)
{
  for (size_t i = 0; i < G_N_ELEMENTS (options); i++)
    if (options[i].kind == ARG_STRING || options[i].kind == ARG_PATH)
      g_free (*(char **) ((char *) o + options[i].offset));
  g_strfreev (o->devices);
  memset (o, 0, sizeof *o);
}
