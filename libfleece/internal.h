/* libfleece internals shared between the library's files.
 *
 * Files depend only on files below them (docs/design.md, "Layers"):
 *
 *   handle.c state.c       the handle, its settings and which call is
 *   plan.c lifecycle.c     allowed when; the plan; the lifecycle skeleton
 *   status.c               (attach, start, wait, cancel, cleanup), status
 *        |
 *   engine-qemu.c engine-pve.c   the engines' operations (engine.h)
 *        |
 *   engine-common.c        what both engines do the same way
 *        |
 *   drives.c storage*.c target.c record.c safefs.c image.c conn.c probe.c
 *        |
 *   qmp.c qmp-schema.c errors.c json.c
 *
 * The public handle (struct fleece_handle) is defined in handle.h and seen
 * only by the top row; engines get a FleeceCtx / FleeceRun (below).
 */
#ifndef FLEECE_INTERNAL_H
#define FLEECE_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <glib.h>
#include <json-c/json.h>

#include "fleece/fleece.h"
#include "qmp.h"
#include "conn.h"

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
/* A caller's callback failed: err gets what + its reason (freed here) or,
 * without one, the errno it left (saved_errno, EIO if 0). */
void fleece_error_from_callback (GError **err, int saved_errno, char *reason,
                                 const char *fmt, ...) G_GNUC_PRINTF (4, 5);

/* ---- json.c ------------------------------------------------------- */

/* Member key of o as a string / bool / integer (NULL, false, 0 if absent
 * or null); set member key to a string or null, or to an integer. */
const char *fleece_jstr (json_object *o, const char *key);
bool fleece_jbool (json_object *o, const char *key);
int64_t fleece_jint (json_object *o, const char *key);
json_object *fleece_jobj (json_object *o, const char *key);
void fleece_jset_str (json_object *o, const char *key, const char *val);
void fleece_jset_int (json_object *o, const char *key, int64_t val);
void fleece_jset_bool (json_object *o, const char *key, bool val);
/* An array member's length, 0 if absent or not an array. */
size_t fleece_jlen (json_object *o, const char *key);
/* {"type": type, "data": data} for a QMP transaction. */
json_object *fleece_jaction (const char *type, json_object *data);

/* ---- safefs.c ----------------------------------------------------- */

/* dir is absolute, a directory (not a symlink), owned by the effective
 * user, not writable by group or others, and so are its parents (or they
 * are root's and sticky).  what names it in errors ("state directory"). */
bool fleece_dir_check_private (const char *dir, const char *what, GError **err);
/* The same, creating a missing dir (0700) first. */
bool fleece_dir_ensure_private (const char *dir, const char *what, GError **err);
int fleece_dir_open (const char *dir, GError **err);
/* {"dev", "ino"} of a file. */
json_object *fleece_file_id_json (const struct stat *sb);
/* Create dir/tmp, a run-tagged name (sparse, size bytes, 0600, O_EXCL);
 * *id gets its identity.  Then (once the identity is recorded) publish it
 * as dir/name with a hard link that never replaces; tmp stays until
 * fleece_file_commit() (after the name is recorded). */
bool fleece_file_create (const char *dir, const char *tmp, uint64_t size,
                         json_object **id, GError **err);
bool fleece_file_publish (const char *dir, const char *tmp, const char *name,
                          GError **err);
void fleece_file_commit (const char *dir, const char *tmp);
/* Remove dir/name if it is the file id (or tmp's file) names: 0 removed or
 * absent, 1 present but not provably ours (kept), -1 error. */
int fleece_file_remove (const char *dir, const char *name, const char *tmp,
                        json_object *id, GError **err);

/* ---- image.c ------------------------------------------------------ */

/* Write qcow2 metadata for size bytes into the new, empty file path
 * (qemu-img; for the Proxmox engine's HMP attach). */
bool fleece_image_format_qcow2 (const char *path, uint64_t size, GError **err);

/* ---- storage.c ---------------------------------------------------- */

/* One fleecing image of a run, as the storage made it.  Made in three
 * steps, each recorded before the next, so a crash at any point leaves a
 * record that proves which images are the run's:
 *   alloc    under a run-tagged pending name (nobody else makes that
 *            name), giving its identity;
 *   publish  under its real name, never replacing an existing image;
 *   commit   drop what the pending name left (once volid is recorded).
 * A caller's storage allocates under the real name at once (its volid is
 * the identity) and has nothing to publish or commit. */
typedef struct {
  char *volid;              /* the storage's name for it, once published */
  json_object *identity;    /* proof it is this run's ({"dev","ino"},
                             * {"rbd-id"}, or for a caller's storage the
                             * volid it returned) */
  char *pending;            /* the run-tagged name, or NULL */
  bool unformatted;         /* qcow2 left empty: QEMU writes the metadata */
} FleeceImage;

void fleece_image_clear (FleeceImage *img);

unsigned fleece_storage_flags (const struct fleece_storage *st);
/* "dir", "rbd" or "callback" (NULL for no storage). */
const char *fleece_storage_type (const struct fleece_storage *st);
/* Is st the caller's (callbacks that may take time or use QEMU's monitor
 * themselves: never call them holding the monitor)? */
bool fleece_storage_is_callers (const struct fleece_storage *st);
/* The smallest backup job cluster whose discards free space in st (its
 * allocation unit: 1 MiB for the directory storage, the object size for
 * RBD, 4 MiB for a caller's). */
uint64_t fleece_storage_min_job_cluster (const struct fleece_storage *st);
/* The storage has every callback it needs (a caller's); EINVAL otherwise. */
bool fleece_storage_check_complete (const struct fleece_storage *st,
                                    GError **err);
/* The run-tagged name of name while it is created (run: the run's id). */
char *fleece_storage_pending_name (const struct fleece_storage *st,
                                   const char *name, const char *run);
/* Allocate name (already suffixed on a path storage) of exactly size
 * bytes, under its pending name where the storage has one (see
 * FleeceImage).  may_leave_unformatted: a qcow2 image of the directory
 * storage may stay an empty file (the engine has QEMU format it). */
bool fleece_storage_alloc (struct fleece_storage *st, const char *name,
                           const char *format, uint64_t size, const char *run,
                           bool may_leave_unformatted, FleeceImage *img,
                           GError **err);
/* Give the image its real name (sets img->volid); EEXIST if an image of
 * that name exists (then the pending one is removed). */
bool fleece_storage_publish (struct fleece_storage *st, const char *name,
                             FleeceImage *img, GError **err);
/* The pending name is no longer needed (the volid is recorded). */
void fleece_storage_commit (struct fleece_storage *st, FleeceImage *img);
/* Free the image a record entry describes (volid, identity, pending), only
 * if provably the run's (run: the record's run id): 0 freed or absent, 1
 * there but not provably ours (kept, *err says which), -1 error. */
int fleece_storage_remove (struct fleece_storage *st, json_object *entry,
                           const char *run, GError **err);
/* QEMU's BlockdevOptions of the image's protocol layer, with node-name. */
json_object *fleece_storage_blockdev (struct fleece_storage *st,
                                      const char *volid, const char *node,
                                      GError **err);
/* QEMU objects the blockdev needs first (object-add arguments), or NULL. */
json_object *fleece_storage_qemu_objects (struct fleece_storage *st,
                                          const char *prefix, GError **err);
/* A local path of the image (for HMP attach and free-space reports), or
 * NULL with err (ENOTSUP for storages QEMU reaches by protocol). */
char *fleece_storage_path (struct fleece_storage *st, const char *volid,
                           GError **err);
/* For the record: {"type": "dir", "dir", "dev", "ino"} /
 * {"type": "rbd", ...} / {"type": "callback", "id"}. */
json_object *fleece_storage_describe (const struct fleece_storage *st);
/* Is st the storage desc describes (the one a record's images are in)? */
bool fleece_storage_matches (const struct fleece_storage *st, json_object *desc);
/* How a person names the storage desc describes ("directory /x", ...). */
char *fleece_storage_desc_name (json_object *desc);

/* ---- record.c ----------------------------------------------------- */

typedef struct {
  const char *dir;                /* state dir, for files and locks */
  fleece_record_load_fn load;     /* or NULL: file in dir */
  fleece_record_store_fn store;
  void *user_data;
} FleeceRecordStore;

/* Returns the record (new reference), NULL with no error if there is none,
 * NULL with err set on failure or if it is corrupt or for another vmid.
 * Creates nothing. */
json_object *fleece_record_load (const FleeceRecordStore *rs, uint32_t vmid,
                                 GError **err);
/* Writes the record durably (file: write, fsync, rename, fsync dir). */
bool fleece_record_store (const FleeceRecordStore *rs, uint32_t vmid,
                          json_object *record, GError **err);
bool fleece_record_remove (const FleeceRecordStore *rs, uint32_t vmid,
                           GError **err);

/* Per-VM lock: returns an fd holding the lock, or -1 with err set
 * ("another run holds the lock for VM 100").  Released by close().
 * Without create, a missing state dir is FLEECE_LOCK_NO_DIR (no lock
 * needed: no run of that dir exists). */
#define FLEECE_LOCK_NO_DIR (-2)
int fleece_lock_vm (const char *state_dir, uint32_t vmid, bool create,
                    GError **err);
/* Is the lock held (1), free (0), or unknown (-1)?  Creates nothing. */
int fleece_lock_probe (const char *state_dir, uint32_t vmid);

/* ---- probe.c: what the running QEMU can do ------------------------- */

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
  bool rbd;                     /* the rbd block driver */
  int qemu_major, qemu_minor, qemu_micro;
} FleeceFeatures;

/* Read QEMU's schema and version (and Proxmox's support query). */
bool fleece_probe (FleeceConn *c, FleeceFeatures *f, GError **err);
/* The engine engine_request asks for, given f; warnings through log. */
bool fleece_choose_engine (const FleeceFeatures *f, int engine_request,
                           int *engine, GString *warning, GError **err);

/* ---- settings, callbacks, the context engines see ------------------- */

typedef struct {
  uint32_t vmid;
  char *state_dir;
  int engine_request;
  int qmp_timeout_ms;
  char **drives;         /* restriction, or NULL */
  unsigned plan_flags;
  char *image_format;
  uint64_t bwlimit_kib;
  char *bitmap;
  int bitmap_mode;       /* FLEECE_BITMAP_USE / _NEW when bitmap is set */
  unsigned cbw_timeout;
} FleeceSettings;

typedef struct {
  fleece_log_fn log;
  void *log_data;
  fleece_free_fn log_free;
  fleece_progress_fn progress;
  void *progress_data;
  fleece_free_fn progress_free;
} FleeceCallbacks;

/* What an engine works with: QEMU, the VM's settings, the storage and the
 * caller's callbacks; nothing of the handle's state. */
typedef struct {
  FleeceConn *conn;
  const FleeceSettings *set;
  const FleeceFeatures *features;
  struct fleece_storage *storage;
  const FleeceCallbacks *cb;
} FleeceCtx;

void fleece_log (const FleeceCtx *ctx, int level, const char *fmt, ...)
  G_GNUC_PRINTF (3, 4);

/* ---- plans (plan.c) ------------------------------------------------- */

/* One drive of a plan and, once running, of the run. */
typedef struct {
  char *key;             /* scsi0: the VM config's key */
  char *device;          /* drive-scsi0: what the patched QEMU's devlist names */
  char *qdev;            /* QOM path of the guest device, NULL if none */
  char *root;            /* the device's root node when planned (a
                          * qemu-server 9 drive: its throttle node) */
  uint64_t size;         /* exact virtual size in bytes */
  bool fleeced;
  char *reason;          /* why not fleeced */
  char *image;           /* vm-100-fleece-0.qcow2 */
  char *format;          /* qcow2 / raw */
  uint64_t cluster_size; /* fleecing image cluster size */
  bool unallocated_zero; /* below its filters a qcow2 image without a
                          * backing file: what its top layer has not
                          * allocated reads as zeroes (set by start) */
  /* run state */
  char *volid;
  uint64_t done, total, zero, reused, dirty;
  char *result;          /* "ok", "failed: ...", "cancelled" */
  bool pending;          /* its job did its work, waits to be finalized */
  gint64 started_us, ended_us;   /* monotonic */
} FleeceDrive;

typedef struct {
  char *name;            /* what QEMU calls it (node, device, QOM path) */
  char *reason;
} FleeceSkipped;

struct fleece_plan {
  int refs;              /* the caller's, and the handle's while it runs */
  uint32_t vmid;
  char *engine;
  GPtrArray *drives;     /* FleeceDrive*, sorted by key */
  GPtrArray *skipped;    /* FleeceSkipped* */
  bool no_fleecing;      /* asked for, or QEMU cannot fleece */
};

struct fleece_plan *fleece_plan_new (uint32_t vmid);
struct fleece_plan *fleece_plan_ref (struct fleece_plan *p);
void fleece_drive_free (FleeceDrive *d);
void fleece_plan_skip (struct fleece_plan *p, const char *name,
                       const char *fmt, ...) G_GNUC_PRINTF (3, 4);
FleeceDrive *fleece_plan_drive_by_key (struct fleece_plan *p, const char *key);
/* The plan's description of d (fleece_plan_to_json()'s drives[]). */
json_object *fleece_drive_to_json (const FleeceDrive *d);
/* EFI vars and TPM state: Proxmox never fleeces them. */
bool fleece_key_is_small_state (const char *key);
/* Is key a plausible drive key (scsi0, virtio1, efidisk0)? */
bool fleece_valid_drive_key (const char *key);

/* ---- drives.c: the VM's drives as QEMU shows them ----------------- */

/* Fill p->drives (every drive a guest device writes, and the TPM state
 * drive qemu-server attaches for a backup) and p->skipped from query-block
 * and query-named-block-nodes, sorted by key. */
bool fleece_drives_read (FleeceConn *c, struct fleece_plan *p, GError **err);
/* Whether what the top layer of a query-block "image" (below its filters)
 * has not allocated reads as zeroes: a qcow2 without a backing file. */
bool fleece_image_unallocated_zero (json_object *image);

G_END_DECLS

#endif
