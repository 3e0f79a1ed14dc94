/* What the running QEMU can do, by capability (query-qmp-schema) rather
 * than by version string, and which engine that makes. */
#include <errno.h>
#include <string.h>

#include "internal.h"

static void
probe_pve (FleeceConn *c, FleeceFeatures *f, GError **err)
{
  g_autoptr (GError) perr = NULL;
  g_autoptr (json_object) r = fleece_conn_execute (c, "query-proxmox-support",
                                                   NULL, &perr);

  /* qemu-server treats a failing query as "no fleecing" and goes on. */
  if (!r)
    return;
  f->pve_backup_fleecing = fleece_jbool (r, "backup-fleecing");
  f->pve_backup_access = fleece_jbool (r, "backup-access-api");
}

bool
fleece_probe (FleeceConn *c, FleeceFeatures *f, GError **err)
{
  g_autoptr (FleeceQmpSchema) s = NULL;
  FleeceQmp *q = fleece_conn_get (c, err);
  const char *cbw = "copy-before-write";

  memset (f, 0, sizeof *f);
  if (!q || !(s = fleece_qmp_schema_load (q, err)))
    return false;
  f->cbw = fleece_qmp_schema_has_driver (s, cbw);
  f->cbw_bitmap = f->cbw && fleece_qmp_schema_driver_has_member (s, cbw, "bitmap");
  f->cbw_on_cbw_error = f->cbw && fleece_qmp_schema_driver_has_member (s, cbw, "on-cbw-error");
  f->cbw_timeout = f->cbw && fleece_qmp_schema_driver_has_member (s, cbw, "cbw-timeout");
  f->cbw_min_cluster_size = f->cbw && fleece_qmp_schema_driver_has_member (s, cbw, "min-cluster-size");
  f->snapshot_access = fleece_qmp_schema_has_driver (s, "snapshot-access");
  f->discard_source = fleece_qmp_schema_command_has_arg (s, "blockdev-backup", "discard-source");
  f->perf_min_cluster_size =
    fleece_qmp_schema_arg_has_member (s, "blockdev-backup", "x-perf", "min-cluster-size");
  f->perf_max_workers =
    fleece_qmp_schema_arg_has_member (s, "blockdev-backup", "x-perf", "max-workers");
  f->rbd = fleece_qmp_schema_has_driver (s, "rbd");
  fleece_qmp_get_version (q, &f->qemu_major, &f->qemu_minor, &f->qemu_micro);
  f->pve_support = fleece_qmp_schema_has_command (s, "query-proxmox-support");
  if (f->pve_support)
    probe_pve (c, f, err);
  f->loaded = true;
  return true;
}

bool
fleece_choose_engine (const FleeceFeatures *f, int engine_request, int *engine,
                      GString *warning, GError **err)
{
  switch (engine_request) {
  case FLEECE_ENGINE_PVE:
    /* A patched QEMU without backup-fleecing still has its backup command:
     * the engine's plan warns and backs up without fleecing if allowed
     * (FLEECE_PLAN_FLEECING_OPTIONAL), as qemu-server does. */
    if (!f->pve_support) {
      g_set_error (err, FLEECE_ERROR, ENOTSUP,
                   "the Proxmox engine needs Proxmox's patched QEMU "
                   "(query-proxmox-support); this QEMU %d.%d.%d is not "
                   "Proxmox's", f->qemu_major, f->qemu_minor, f->qemu_micro);
      return false;
    }
    *engine = FLEECE_ENGINE_PVE;
    return true;
  case FLEECE_ENGINE_QEMU:
    *engine = FLEECE_ENGINE_QEMU;
    return true;
  default:
    *engine = f->pve_backup_fleecing ? FLEECE_ENGINE_PVE : FLEECE_ENGINE_QEMU;
    if (f->pve_support && !f->pve_backup_fleecing)
      g_string_assign (warning, "running QEMU version does not support backup "
                       "fleecing - using the stock QEMU engine");
    return true;
  }
}
