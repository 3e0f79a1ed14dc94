/* libfleece internals shared between the library's files. */
#ifndef FLEECE_INTERNAL_H
#define FLEECE_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <glib.h>
#include <json-c/json.h>

#include "fleece/fleece.h"
#include "qmp.h"

G_BEGIN_DECLS

G_DEFINE_AUTOPTR_CLEANUP_FUNC (json_object, json_object_put)

/* ---- errors.c ---------------------------------------------------- */

/* GError domain of the library; the code is an errno value. */
#define FLEECE_ERROR (fleece_error_quark ())
GQuark fleece_error_quark (void);

/* Set this thread's error: "<func>: <message>". */
void fleece_error_set (const char *func, int errnum, const char *fmt, ...)
  G_GNUC_PRINTF (3, 4);
/* Set this thread's error from a GError (any domain). */
void fleece_error_set_gerror (const char *func, const GError *err);
/* The errno that best describes err. */
int fleece_error_errno (const GError *err);

/* ---- json.c ------------------------------------------------------- */

/* Member key of o as a string / bool / integer (NULL, false, 0 if absent
 * or null); set member key to a string or null. */
const char *fleece_jstr (json_object *o, const char *key);
bool fleece_jbool (json_object *o, const char *key);
int64_t fleece_jint (json_object *o, const char *key);
void fleece_jset_str (json_object *o, const char *key, const char *val);

/* ---- image.c ------------------------------------------------------ */

/* Create path as a new file (never over an existing one), mode 0600,
 * sparse and of size bytes. */
bool fleece_image_create_file (const char *path, uint64_t size, GError **err);
/* Write qcow2 metadata for size bytes into the new file path (qemu-img). */
bool fleece_image_format_qcow2 (const char *path, uint64_t size, GError **err);

/* ---- storage.c ---------------------------------------------------- */

unsigned fleece_storage_flags (const struct fleece_storage *st);
/* The smallest backup job cluster whose discards free space in st: 1 MiB
 * for the directory storage, fallback for a caller's. */
uint64_t fleece_storage_min_job_cluster (const struct fleece_storage *st,
                                         uint64_t fallback);
/* Allocate name (already suffixed when the storage is path-based).  With
 * unformatted, the directory storage leaves a qcow2 image an empty file and
 * sets *unformatted: the caller has QEMU write the metadata
 * (blockdev-create); without, or from a caller's storage, images come
 * complete. */
bool fleece_storage_alloc_image (struct fleece_storage *st, const char *name,
                                 const char *format, uint64_t size,
                                 char **volid, bool *unformatted,
                                 GError **err);
bool fleece_storage_free_image (struct fleece_storage *st, const char *volid,
                                GError **err);
char *fleece_storage_image_path (struct fleece_storage *st, const char *volid,
                                 GError **err);
/* A JSON description kept in the record, so that a cleanup in another
 * process can rebuild a directory storage ({"type":"dir","dir":...}) or
 * knows it needs the caller's ({"type":"callback"}). */
json_object *fleece_storage_describe (const struct fleece_storage *st);
struct fleece_storage *fleece_storage_from_description (json_object *desc,
                                                        GError **err);

/* ---- record.c ----------------------------------------------------- */

typedef struct {
  char *dir;                      /* state dir, for files and locks */
  fleece_record_load_fn load;     /* or NULL: file in dir */
  fleece_record_store_fn store;
  void *opaque;
} FleeceRecordStore;

/* Returns the record (new reference), NULL with no error if there is none,
 * NULL with err set on failure or if it is corrupt or for another vmid. */
json_object *fleece_record_load (const FleeceRecordStore *rs, uint32_t vmid,
                                 GError **err);
/* Writes the record durably (file: write, fsync, rename, fsync dir). */
bool fleece_record_store (const FleeceRecordStore *rs, uint32_t vmid,
                          json_object *record, GError **err);
bool fleece_record_remove (const FleeceRecordStore *rs, uint32_t vmid,
                           GError **err);

/* Per-VM lock: returns an fd holding the lock, or -1 with err set
 * ("another run holds the lock for VM 100").  Released by close(). */
int fleece_lock_vm (const char *state_dir, uint32_t vmid, GError **err);

/* ---- the handle ---------------------------------------------------- */

typedef struct {
  bool loaded;
  bool pve_support;             /* query-proxmox-support exists */
  bool pve_backup_fleecing;     /* ... and reports backup-fleecing */
  bool pve_backup_access;       /* ... and reports backup-access-api */
  bool cbw;                     /* copy-before-write driver */
  bool cbw_bitmap;
  bool cbw_on_cbw_error;
  bool cbw_timeout;
  bool cbw_min_cluster_size;
  bool snapshot_access;
  bool discard_source;          /* blockdev-backup discard-source */
  bool perf_min_cluster_size;   /* blockdev-backup x-perf.min-cluster-size */
  bool perf_max_workers;        /* blockdev-backup x-perf.max-workers */
  int qemu_major, qemu_minor, qemu_micro;
} FleeceFeatures;

typedef enum {
  FLEECE_STATE_IDLE,
  FLEECE_STATE_ATTACHED,
  FLEECE_STATE_RUNNING,
  FLEECE_STATE_FINISHED,
  FLEECE_STATE_FAILED,
} FleeceState;

/* One drive of a plan and, once running, of the run. */
typedef struct {
  char *key;             /* scsi0 */
  char *device;          /* drive-scsi0 */
  char *qdev;            /* /machine/peripheral/scsi0 (QOM path of device) */
  char *root;            /* the device's root node when planned */
  uint64_t size;         /* exact virtual size in bytes */
  bool fleeced;
  char *reason;          /* why not fleeced */
  char *image;           /* vm-100-fleece-0.qcow2 */
  char *format;          /* qcow2 / raw */
  uint64_t cluster_size; /* fleecing image cluster size */
  /* run state */
  char *volid;
  uint64_t done, total;
  char *result;          /* "ok", "failed: ...", "cancelled" */
  gint64 started_us, ended_us;
} FleeceDrive;

struct fleece_plan {
  int refs;              /* the caller's, and the handle's while it runs */
  uint32_t vmid;
  char *engine;
  GPtrArray *drives;     /* FleeceDrive*, sorted by key */
  bool no_fleecing;
};

struct fleece_handle {
  FleeceQmp *qmp;
  char *qmp_path;
  uint32_t vmid;
  char *state_dir;
  struct fleece_storage *storage;
  int engine_request;
  int engine;
  int qmp_timeout_ms;
  char **drives;         /* restriction, or NULL */
  unsigned plan_flags;
  char *image_format;
  uint64_t bwlimit_kib;
  char *bitmap;
  unsigned cbw_timeout;
  fleece_log_fn log_fn;
  void *log_opaque;
  fleece_progress_fn progress_fn;
  void *progress_opaque;
  fleece_record_load_fn record_load;
  fleece_record_store_fn record_store;
  void *record_opaque;

  FleeceFeatures features;
  FleeceState state;
  int lock_fd;
  json_object *record;   /* the record of the current run */
  struct fleece_plan *run_plan; /* borrowed from the caller between attach and cleanup */
  char *failure;         /* first failure of the running backup */
  bool cancelled;
};

void fleece_log (struct fleece_handle *h, int level, const char *fmt, ...)
  G_GNUC_PRINTF (3, 4);

/* plan.c */
struct fleece_plan *fleece_plan_new (uint32_t vmid);
struct fleece_plan *fleece_plan_ref (struct fleece_plan *p);
void fleece_drive_free (FleeceDrive *d);
bool fleece_key_is_small_state (const char *key);

/* engine.c: record progress of d, capped at its total, and tell the
 * caller's progress callback when it moved. */
void fleece_drive_set_progress (struct fleece_handle *h, FleeceDrive *d,
                                uint64_t done, uint64_t total);

/* Is key a plausible drive key (scsi0, virtio1, efidisk0)? */
bool fleece_valid_drive_key (const char *key);

/* Connect h to qmp_path and probe QEMU (fleece_connect without the
 * public error conversion). */
bool fleece_handle_open (struct fleece_handle *h, const char *qmp_path,
                         GError **err);

/* engine.c: free the fleecing images a record lists (a volid not yet
 * recorded is the planned name on a directory storage). */
bool fleece_free_recorded_images (struct fleece_handle *h, json_object *record,
                                  GError **err);

/* engine.c: a new record of a run of engine: what every engine records
 * (version, VM, a run id, the QMP socket, state "attaching", the storage;
 * per drive, in plan order, key, size, fleeced, image, format and a null
 * volid); the engine adds its own. */
json_object *fleece_run_record_new (struct fleece_handle *h,
                                    struct fleece_plan *p, const char *engine);
/* engine.c: the record of the run set up on h (h->record): store it
 * durably, set its state, find a drive's entry by key. */
bool fleece_run_record_save (struct fleece_handle *h, GError **err);
void fleece_run_record_set_state (struct fleece_handle *h, const char *state);
json_object *fleece_run_record_drive (struct fleece_handle *h, const char *key);

/* The record store the handle is configured with. */
FleeceRecordStore fleece_handle_record_store (struct fleece_handle *h);

G_END_DECLS

#endif
