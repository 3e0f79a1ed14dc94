/* Engines: the same lifecycle over stock QEMU (the graph built with public
 * QMP, engine-qemu.c) or Proxmox's patched QEMU (its backup command with
 * fleecing: true, engine-pve.c).  engine.c probes QEMU and dispatches. */
#ifndef FLEECE_ENGINE_H
#define FLEECE_ENGINE_H

#include "internal.h"

G_BEGIN_DECLS

typedef struct {
  const char *name;            /* "qemu" or "pve" */
  /* Checks the running QEMU has what plan needs (warnings via the log). */
  bool (*check_plan) (struct fleece_handle *h, struct fleece_plan *p,
                      GError **err);
  bool (*attach) (struct fleece_handle *h, struct fleece_plan *p, GError **err);
  bool (*start) (struct fleece_handle *h, struct fleece_plan *p,
                 struct fleece_target *t, GError **err);
  /* Updates per-drive progress; returns 1 ended well, 0 running, -1 failed. */
  int (*poll) (struct fleece_handle *h, int timeout_ms, GError **err);
  bool (*cancel) (struct fleece_handle *h, GError **err);
  /* Undo what record describes (h->qmp may be NULL if QEMU is gone). */
  bool (*cleanup) (struct fleece_handle *h, json_object *record, GError **err);
} FleeceEngineOps;

extern const FleeceEngineOps fleece_engine_qemu_ops;
extern const FleeceEngineOps fleece_engine_pve_ops;

/* engine-pve.c, for its tests: the HMP command line that attaches a
 * fleecing image as a BlockBackend (qemu-server before the blockdev
 * switch), quoted for HMP and QemuOpts; size 0 leaves size= out. */
char *fleece_pve_drive_add_command (const char *path, const char *id,
                                    const char *format, uint64_t size,
                                    GError **err);

/* The engine h uses (h->engine chosen at connect). */
const FleeceEngineOps *fleece_engine_ops (struct fleece_handle *h);

/* Undo a failed attach or start with ops->cleanup and remove the record;
 * the step's own error is kept by the caller, failures of the undo are
 * logged (and the record kept for fleece_cleanup()). */
void fleece_run_rollback (struct fleece_handle *h, const FleeceEngineOps *ops);

/* The backup runs: the record says so (a failure to store that is only
 * logged: the record of a started run already lists all there is to
 * undo), and every drive's clock starts. */
void fleece_run_mark_running (struct fleece_handle *h, struct fleece_plan *p);

/* What every engine's attach does around its own attach_images: write the
 * new record (taking it) before anything is allocated, then mark the run
 * "attached"; a failure rolls back from the record. */
bool fleece_run_attach (struct fleece_handle *h, struct fleece_plan *p,
                        json_object *record,
                        bool (*attach_images) (struct fleece_handle *h,
                                               struct fleece_plan *p,
                                               GError **err),
                        const FleeceEngineOps *ops, GError **err);

/* After connecting: load features and choose the engine. */
bool fleece_engine_probe (struct fleece_handle *h, GError **err);
/* (Re)choose h->engine from h->engine_request and h->features. */
bool fleece_engine_choose (struct fleece_handle *h, GError **err);

G_END_DECLS

#endif
