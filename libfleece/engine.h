/* Engines: the same lifecycle over stock QEMU (the graph built with public
 * QMP, engine-qemu.c) or Proxmox's patched QEMU (its backup command with
 * fleecing: true, engine-pve.c).
 *
 * lifecycle.c calls an engine's operations in order and never the other
 * way round:
 *
 *   check_plan   (fleece_plan)     what QEMU must be able to do for a plan
 *   attach       (fleece_attach)   add the images the skeleton allocated
 *   start        (fleece_start)    build the graph / start the backup
 *   poll         (fleece_wait)     one look at the jobs, per-drive progress
 *   cancel       (fleece_wait)     ask QEMU to stop the backup
 *   undo         (failures, fleece_cleanup)   remove from QEMU what a record
 *                describes, strictly in the order that avoids "in use"
 *   find         (attach, status, cleanup)    what QEMU shows of any run,
 *                as a record to undo when the real one is gone
 *
 * Engines get a FleeceCtx / FleeceRun: the connection, settings, storage,
 * callbacks, and the run's plan and record; engine-common.c has what both
 * do the same way. */
#ifndef FLEECE_ENGINE_H
#define FLEECE_ENGINE_H

#include "internal.h"

G_BEGIN_DECLS

/* One run: what the skeleton set up and the engine adds to. */
typedef struct {
  FleeceCtx *ctx;
  struct fleece_plan *plan;     /* a reference, from attach to cleanup */
  json_object *record;          /* the durable record (saved by the engine
                                 * before each step that creates something) */
  FleeceRecordStore rs;
  uint32_t vmid;
  char *failure;                /* first failure of the running backup */
  bool cancel_sent;             /* the cancel went to QEMU */
  bool finishing;               /* all data out, the backup ends */
  bool totals_known;            /* the engine reports the figures below */
  bool target_zeroed;           /* every target reads as zeroes until
                                 * written (fresh files of a full backup) */
  uint64_t zero, reused, dirty; /* the whole backup's (Proxmox engine) */
} FleeceRun;

typedef struct {
  const char *name;            /* "qemu" or "pve" */
  /* Checks the running QEMU has what p needs (warnings via the log); may
   * turn fleecing off (FLEECE_PLAN_FLEECING_OPTIONAL). */
  bool (*check_plan) (FleeceCtx *ctx, struct fleece_plan *p, GError **err);
  /* Whether qcow2 images of the directory storage may come as empty
   * files (the engine has QEMU write the metadata). */
  bool (*formats_images) (FleeceCtx *ctx);
  /* Add the engine's own members to a new record. */
  void (*record_init) (FleeceRun *run);
  bool (*attach) (FleeceRun *run, GError **err);
  bool (*start) (FleeceRun *run, struct fleece_target *t, GError **err);
  /* One look: 1 ended well, 0 running, -1 failed (err says why). */
  int (*poll) (FleeceRun *run, GError **err);
  bool (*cancel) (FleeceRun *run, GError **err);
  /* Remove from QEMU what record describes; keep_images: back to
   * "attached" after a failed start. */
  bool (*undo) (FleeceCtx *ctx, json_object *record, bool keep_images,
                GError **err);
  /* What QEMU shows of a libfleece (or qemu-server) run, as a record
   * {"engine", "drives": [...], "traces": [names]} fit for undo, or NULL
   * with no error when there is nothing. */
  json_object *(*find) (FleeceCtx *ctx, GError **err);
} FleeceEngineOps;

extern const FleeceEngineOps fleece_engine_qemu_ops;
extern const FleeceEngineOps fleece_engine_pve_ops;

/* engine-pve.c, for its tests: the HMP command line that attaches a
 * fleecing image as a BlockBackend (qemu-server before the blockdev
 * switch), quoted for HMP and QemuOpts; size 0 leaves size= out. */
char *fleece_pve_drive_add_command (const char *path, const char *id,
                                    const char *format, uint64_t size,
                                    GError **err);

/* ---- engine-common.c ---------------------------------------------- */

const FleeceEngineOps *fleece_engine_ops_by_name (const char *name);

/* Store run->record durably. */
bool fleece_run_save (FleeceRun *run, GError **err);
void fleece_run_set_state (FleeceRun *run, const char *state);
/* The record's entry of drive key, and the record's drives array. */
json_object *fleece_run_drive (FleeceRun *run, const char *key);
json_object *fleece_record_drives (json_object *record);
/* The backup runs: the record says so (a failure to store that is only
 * logged: the record of a started run already lists all there is to
 * undo), and every drive's clock starts. */
void fleece_run_mark_running (FleeceRun *run);
/* Record progress of d, never past its size, never backwards, and tell
 * the caller's progress callback when it moved. */
void fleece_drive_set_progress (FleeceRun *run, FleeceDrive *d, uint64_t done,
                                uint64_t total);
FleeceDrive *fleece_run_drive_by_device (FleeceRun *run, const char *device);

/* Drive d of p is not fleeced after all (reason); the other images are
 * numbered again. */
void fleece_plan_unfleece (struct fleece_plan *p, FleeceDrive *d,
                           const char *reason);
/* QEMU cannot fleece: with FLEECE_PLAN_FLEECING_OPTIONAL warn as
 * qemu-server does and plan every drive unfleeced; else ENOTSUP with
 * why. */
bool fleece_plan_fleecing_unavailable (FleeceCtx *ctx, struct fleece_plan *p,
                                       const char *why, GError **err);

/* node-name -> virtual size (guint64*) of every named node. */
GHashTable *fleece_query_nodes (FleeceCtx *ctx, GError **err);
/* QOM device path -> current root node name. */
GHashTable *fleece_query_roots (FleeceCtx *ctx, GError **err);
/* The same from a query-block reply; if images is not NULL, it gets QOM
 * device path -> that device's "inserted"."image" (owned by blocks). */
GHashTable *fleece_roots_of (json_object *blocks, GHashTable *images);
/* The names in QEMU's jobs (query-jobs ids). */
json_object *fleece_query_jobs (FleeceCtx *ctx, GError **err);

/* The failure of a fleeced backup with on-cbw-error=break-snapshot: a copy
 * to the fleecing image failed or timed out, the guest write went through
 * and every later snapshot read fails with EACCES.  Returns the message
 * that says so (with the free space where the image is), or NULL if qerr
 * is not that. */
char *fleece_explain_cbw_failure (FleeceCtx *ctx, const char *what,
                                  const char *image, const char *volid,
                                  unsigned timeout_s, const char *qerr);

/* Is the backup of drive key in p one a copy-before-write filter may
 * guard (a guest device writes it)? */
bool fleece_drive_has_device (const FleeceDrive *d);

/* The run marker: an object QEMU holds while a libfleece run is set up on
 * it, named after the run and the process that owns it; whoever finds one
 * knows a run is active or crashed there, whatever its state dir. */
typedef struct {
  char *run;             /* the run's uuid */
  long pid;              /* the process that set it up */
} FleeceMarker;

char *fleece_marker_id (const char *run);
bool fleece_marker_add (FleeceCtx *ctx, const char *run, GError **err);
bool fleece_marker_del (FleeceCtx *ctx, const FleeceMarker *m, GError **err);
/* The markers QEMU holds (FleeceMarker*), or NULL with err. */
GPtrArray *fleece_markers (FleeceCtx *ctx, GError **err);
const FleeceMarker *fleece_marker_find (GPtrArray *markers, const char *run);
/* Does the process that owns m still run (this one included)? */
bool fleece_marker_alive (const FleeceMarker *m);

/* Wait for the jobs in ids (emptied meanwhile) to end, by their events
 * (within one call: the connection is held); query-jobs when no event
 * comes for a while. */
bool fleece_await_jobs (FleeceCtx *ctx, GHashTable *ids, GError **err);
bool fleece_job_do (FleeceCtx *ctx, const char *cmd, const char *id,
                    GError **err);
/* QEMU objects the storage's images need (an RBD key as a secret), added
 * once per run before the first image, their ids recorded first. */
bool fleece_add_storage_objects (FleeceRun *run, GError **err);
/* Remove the objects a record lists (after the images are detached). */
void fleece_del_storage_objects (FleeceCtx *ctx, json_object *record);
/* blockdev-add the protocol node of d's fleecing image as its storage
 * defines it (a file, a block device, RBD, the caller's definition), named
 * node, with discard and zero detection passed down so the backup's
 * discard-source frees space in the storage. */
bool fleece_add_image_file (FleeceCtx *ctx, const FleeceDrive *d,
                            const char *node, GError **err);
/* blockdev-add d's format node, named node, over its protocol node
 * file_node: raw limited to the drive's exact size, discard and zero
 * detection passed down as for the file. */
bool fleece_add_image_format (FleeceCtx *ctx, const FleeceDrive *d,
                              const char *node, const char *file_node,
                              GError **err);
/* QEMU writes qcow2 metadata for size bytes into the file under node, in
 * a job (blockdev-create: no preallocation, as qemu-img; clusters of
 * cluster_size bytes, 0 for qcow2's 64 KiB); backing / backing_fmt for an
 * incremental image of a chain (or NULL). */
bool fleece_format_qcow2 (FleeceCtx *ctx, const char *job, const char *node,
                          uint64_t size, uint64_t cluster_size,
                          const char *backing, const char *backing_fmt,
                          GError **err);
/* Wait for the blockdev-create jobs in ids (job id -> the image it
 * formats), dismiss them, and fail with the first error one ended with. */
bool fleece_finish_format_jobs (FleeceCtx *ctx, GHashTable *ids, GError **err);
/* Allocate-time checks QEMU can answer: the fleecing node's size equals
 * the drive's. */
bool fleece_check_node_size (GHashTable *nodes, const char *node,
                             const FleeceDrive *d, GError **err);

G_END_DECLS

#endif
