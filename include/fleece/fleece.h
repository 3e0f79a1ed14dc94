/* libfleece - fleecing backups of running QEMU virtual machines over QMP.
 *
 * The one public header.  It depends on nothing but the C standard library:
 * no GLib or json-c types appear here, so it compiles alone with
 * -std=c99 -pedantic and as C++.
 *
 * Conventions (see fleece(3)):
 *  - Every object is an opaque handle with a _new/_free pair;
 *    _free(NULL) is a no-op.
 *  - Calls return -1 (or NULL) on failure.  The message and errno of the
 *    last failure are kept per thread and read with fleece_get_error() and
 *    fleece_get_errno(), which need no handle.
 *  - Strings returned as "const char *" belong to the object they came from
 *    and live as long as it does; strings returned as "char *" are the
 *    caller's and are released with free().
 *  - A handle may be used by one thread at a time.  Different handles may be
 *    used from different threads concurrently.
 */

#ifndef FLEECE_H
#define FLEECE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__) && defined(FLEECE_BUILDING_LIBRARY)
#define FLEECE_API __attribute__((visibility("default")))
#else
#define FLEECE_API
#endif

/* Feature macros: one per addition to the API, so callers can test for it. */
#define FLEECE_HAVE_LIFECYCLE 1
#define FLEECE_HAVE_DIR_TARGET 1
#define FLEECE_HAVE_NBD_TARGET 1
#define FLEECE_HAVE_PVE_TARGET 1
#define FLEECE_HAVE_DRIVE_RESULT 1   /* fleece_get_drive_result/_elapsed_ms */
#define FLEECE_HAVE_PLAN_FLEECING_OPTIONAL 1

/* ------------------------------------------------------------------ */
/* Version and errors                                                  */
/* ------------------------------------------------------------------ */

/* The library's version, e.g. "0.1.0". */
FLEECE_API const char *fleece_get_version (void);

/* The message of the last failed call in this thread, or NULL if none.
 * Messages start with the name of the API call that failed. */
FLEECE_API const char *fleece_get_error (void);

/* The errno of the last failed call in this thread (0 if not known). */
FLEECE_API int fleece_get_errno (void);

/* ------------------------------------------------------------------ */
/* Callbacks                                                           */
/* ------------------------------------------------------------------ */

/* Log levels passed to the log callback. */
#define FLEECE_LOG_ERROR   0
#define FLEECE_LOG_WARNING 1
#define FLEECE_LOG_INFO    2
#define FLEECE_LOG_DEBUG   3

/* Receives the library's log messages (e.g. for a backup task log). */
typedef void (*fleece_log_fn) (void *opaque, int level, const char *msg);

/* Receives progress of one drive while a backup runs.  drive is the drive
 * key (e.g. "scsi0"); done and total are bytes. */
typedef void (*fleece_progress_fn) (void *opaque, const char *drive,
                                    uint64_t done, uint64_t total);

/* The durable record.  The library writes what it is about to do before it
 * allocates an image or adds a node, so that fleece_cleanup() can recover
 * after a crash at any point.
 *
 * load: set *json to a malloc'd copy of the record for vmid, or to NULL if
 *       there is none; return 0, or -1 on failure.
 * store: make json the record for vmid durably before returning (json ==
 *       NULL removes the record); return 0, or -1 on failure. */
typedef int (*fleece_record_load_fn) (void *opaque, uint32_t vmid, char **json);
typedef int (*fleece_record_store_fn) (void *opaque, uint32_t vmid,
                                       const char *json);

/* Storage for fleecing images.
 *
 * alloc: allocate an image called name (e.g. "vm-100-fleece-0.qcow2") of
 *        format "raw" or "qcow2" whose virtual size is exactly size bytes;
 *        set *volid to a malloc'd identifier for it; return 0 or -1.
 * free:  free the image volid; an image that does not exist is not an
 *        error; return 0 or -1.
 * path:  return a malloc'd path of volid that QEMU can open (a file or a
 *        block device), or NULL on failure. */
typedef int (*fleece_storage_alloc_fn) (void *opaque, const char *name,
                                        const char *format, uint64_t size,
                                        char **volid);
typedef int (*fleece_storage_free_fn) (void *opaque, const char *volid);
typedef char *(*fleece_storage_path_fn) (void *opaque, const char *volid);

/* Called when the object holding opaque is freed. */
typedef void (*fleece_free_fn) (void *opaque);

/* ------------------------------------------------------------------ */
/* Storage for fleecing images                                         */
/* ------------------------------------------------------------------ */

struct fleece_storage;

/* What a storage can do (fleece_storage_new_callback flags). */
#define FLEECE_STORAGE_QCOW2   0x1u  /* can hold qcow2 images */
#define FLEECE_STORAGE_DISCARD 0x2u  /* frees space on discard (thin) */
#define FLEECE_STORAGE_PATH    0x4u  /* path-based: names get .<format> */

/* The built-in directory storage: raw images are sparse files of exactly
 * the source size, qcow2 images are created with exactly the source's
 * virtual size.  Image names never escape dir. */
FLEECE_API struct fleece_storage *fleece_storage_new_dir (const char *dir);

/* A storage implemented by the caller (e.g. Proxmox's PVE::Storage). */
FLEECE_API struct fleece_storage *
fleece_storage_new_callback (unsigned flags,
                             fleece_storage_alloc_fn alloc,
                             fleece_storage_free_fn free_image,
                             fleece_storage_path_fn path,
                             void *opaque, fleece_free_fn free_opaque);

FLEECE_API void fleece_storage_free (struct fleece_storage *st);

/* ------------------------------------------------------------------ */
/* Backup targets                                                      */
/* ------------------------------------------------------------------ */

struct fleece_target;

/* One image per drive in dir, named <drive key>.<format>; format is "raw"
 * or "qcow2" and the image has exactly the drive's size. */
FLEECE_API struct fleece_target *fleece_target_new_dir (const char *dir,
                                                        const char *format);

/* An NBD server with one writable export per drive key, e.g.
 * "nbd+unix:///?socket=/run/backup.sock" or "nbd://127.0.0.1:10809". */
FLEECE_API struct fleece_target *fleece_target_new_nbd (const char *uri);

/* Proxmox engine only: extra arguments of the patched QEMU's QMP "backup"
 * command, passed through unchanged, as a JSON object, e.g.
 * {"backup-file": "/backup/vm.vma", "format": "vma"}.
 * {"target-id": ID, "bitmap-mode": "none"|"new"|"use"} (the mode may also
 * be an object by drive key) asks instead for backup access for an external
 * provider (pve-qemu 9.2+, plan with FLEECE_PLAN_ALL_DRIVES): fleece_start()
 * leaves per drive a snapshot-access node to export over NBD, listed in the
 * record (fleece_get_record(): drives[].access); fleece_wait() returns 0
 * while it is set up; fleece_cancel() ends it as failed, fleece_cleanup()
 * on the same handle as successful. */
FLEECE_API struct fleece_target *fleece_target_new_pve (const char *json_args);

FLEECE_API void fleece_target_free (struct fleece_target *t);

/* ------------------------------------------------------------------ */
/* The handle: one VM's QMP connection                                 */
/* ------------------------------------------------------------------ */

struct fleece_handle;

FLEECE_API struct fleece_handle *fleece_new (void);
FLEECE_API void fleece_free (struct fleece_handle *h);

/* Connect to QEMU's QMP unix socket, read the greeting and negotiate
 * capabilities. */
FLEECE_API int fleece_connect (struct fleece_handle *h, const char *qmp_path);

/* The same over an already connected socket; the handle takes fd and closes
 * it when freed (also when this call fails). */
FLEECE_API int fleece_connect_fd (struct fleece_handle *h, int fd);

/* Settings.  Each returns 0, or -1 for a bad value. */

/* The Proxmox VM id (1 to 999999999): images are named vm-<vmid>-fleece-<n>
 * and records and locks are kept per vmid.  Required. */
FLEECE_API int fleece_set_vmid (struct fleece_handle *h, uint32_t vmid);
FLEECE_API uint32_t fleece_get_vmid (struct fleece_handle *h);

/* Where records and locks live; default $FLEECE_STATE_DIR, else
 * /var/lib/fleece. */
FLEECE_API int fleece_set_state_dir (struct fleece_handle *h, const char *dir);

/* The storage for fleecing images; the handle takes ownership of st. */
FLEECE_API int fleece_set_storage (struct fleece_handle *h,
                                   struct fleece_storage *st);

/* Engines. */
#define FLEECE_ENGINE_AUTO 0  /* probe QEMU: PVE if it can, else QEMU */
#define FLEECE_ENGINE_QEMU 1  /* stock QEMU >= 9.2, graph built over QMP */
#define FLEECE_ENGINE_PVE  2  /* Proxmox's patched QEMU, backup fleecing=true */
FLEECE_API int fleece_set_engine (struct fleece_handle *h, int engine);
/* After connecting: the engine in use (never FLEECE_ENGINE_AUTO), or -1. */
FLEECE_API int fleece_get_engine (struct fleece_handle *h);

/* Timeout of one QMP command in milliseconds (default 60000). */
FLEECE_API int fleece_set_qmp_timeout (struct fleece_handle *h,
                                       unsigned timeout_ms);

/* Restrict the plan to these drive keys (NULL-terminated, e.g. {"scsi0",
 * NULL}); NULL means every drive. */
FLEECE_API int fleece_set_drives (struct fleece_handle *h,
                                  const char *const *keys);

/* Plan flags. */
#define FLEECE_PLAN_ALL_DRIVES  0x1u  /* fleece efidisk/tpmstate too */
#define FLEECE_PLAN_NO_FLEECING 0x2u  /* back up without fleecing */
#define FLEECE_PLAN_FLEECING_OPTIONAL 0x4u /* QEMU cannot fleece: warn and
                                            * back up without (else fail) */
FLEECE_API int fleece_set_plan_flags (struct fleece_handle *h, unsigned flags);

/* Force the fleecing image format ("raw" or "qcow2"); NULL chooses qcow2
 * where the storage supports it. */
FLEECE_API int fleece_set_image_format (struct fleece_handle *h,
                                        const char *format);

/* Speed limit in KiB/s of each drive's backup job (QEMU limits jobs one
 * by one); 0 is unlimited.  May change until fleece_start(). */
FLEECE_API int fleece_set_bwlimit (struct fleece_handle *h, uint64_t kib_per_s);

/* Incremental backup: the name of a dirty bitmap on every backed-up drive's
 * source node; NULL for a full backup. */
FLEECE_API int fleece_set_bitmap (struct fleece_handle *h, const char *name);

/* copy-before-write timeout in seconds (default 45; 0 disables).  May
 * change until fleece_start(). */
FLEECE_API int fleece_set_cbw_timeout (struct fleece_handle *h,
                                       unsigned seconds);

FLEECE_API int fleece_set_log_callback (struct fleece_handle *h,
                                        fleece_log_fn fn, void *opaque);
FLEECE_API int fleece_set_progress_callback (struct fleece_handle *h,
                                             fleece_progress_fn fn,
                                             void *opaque);
/* Keep the record through callbacks instead of a file in the state dir. */
FLEECE_API int fleece_set_record_callback (struct fleece_handle *h,
                                           fleece_record_load_fn load,
                                           fleece_record_store_fn store,
                                           void *opaque);

/* ------------------------------------------------------------------ */
/* The lifecycle                                                       */
/* ------------------------------------------------------------------ */

struct fleece_plan;

/* Read the VM's drives and decide, per drive, whether it is fleeced, the
 * image's name, format and size.  Changes nothing in QEMU or storage. */
FLEECE_API struct fleece_plan *fleece_plan (struct fleece_handle *h);
FLEECE_API void fleece_plan_free (struct fleece_plan *p);

/* Inspect a plan: drives are in sorted drive-key order. */
FLEECE_API size_t fleece_plan_get_drive_count (struct fleece_plan *p);
FLEECE_API const char *fleece_plan_get_key (struct fleece_plan *p, size_t i);
FLEECE_API const char *fleece_plan_get_device (struct fleece_plan *p,
                                               size_t i);
FLEECE_API uint64_t fleece_plan_get_size (struct fleece_plan *p, size_t i);
/* 1 if drive i is fleeced, 0 if not (see fleece_plan_get_reason), -1 on a
 * bad index. */
FLEECE_API int fleece_plan_get_fleeced (struct fleece_plan *p, size_t i);
FLEECE_API const char *fleece_plan_get_reason (struct fleece_plan *p,
                                               size_t i);
FLEECE_API const char *fleece_plan_get_image (struct fleece_plan *p, size_t i);
FLEECE_API const char *fleece_plan_get_format (struct fleece_plan *p,
                                               size_t i);
FLEECE_API uint64_t fleece_plan_get_cluster_size (struct fleece_plan *p,
                                                  size_t i);
/* The whole plan as a JSON document (malloc'd). */
FLEECE_API char *fleece_plan_to_json (struct fleece_plan *p);

/* Allocate the fleecing images and attach them to QEMU.  On failure,
 * undoes what it did. */
FLEECE_API int fleece_attach (struct fleece_handle *h, struct fleece_plan *p);

/* Insert the copy-before-write filters and start the backup of every drive
 * in the plan with one point in time.  Returns once the jobs run. */
FLEECE_API int fleece_start (struct fleece_handle *h, struct fleece_plan *p,
                             struct fleece_target *t);

/* Wait up to timeout_ms (-1: forever) for the backup to end, reporting
 * progress meanwhile.  Returns 1 if it ended successfully, 0 if it is still
 * running, -1 if it failed (the error says why). */
FLEECE_API int fleece_wait (struct fleece_handle *h, int timeout_ms);

/* Ask a running backup to stop; fleece_wait() then reports its end. */
FLEECE_API int fleece_cancel (struct fleece_handle *h);

/* Progress of the whole backup in bytes. */
FLEECE_API int fleece_get_progress (struct fleece_handle *h, uint64_t *done,
                                    uint64_t *total);

/* Progress of one drive (by key, e.g. "scsi0") in bytes. */
FLEECE_API int fleece_get_drive_progress (struct fleece_handle *h,
                                          const char *key, uint64_t *done,
                                          uint64_t *total);

/* How the backup of drive key ended: "ok", "cancelled", or why it failed.
 * NULL while it runs (errno EAGAIN) or for a drive not in the backup. */
FLEECE_API const char *fleece_get_drive_result (struct fleece_handle *h,
                                                const char *key);

/* Milliseconds the backup of drive key ran (so far, while it runs); 0
 * before it started, -1 for a drive not in the backup. */
FLEECE_API int64_t fleece_get_drive_elapsed_ms (struct fleece_handle *h,
                                                const char *key);

/* The durable record of this vmid as a JSON document (malloc'd), or NULL:
 * with errno ENOENT when there is none, else on failure. */
FLEECE_API char *fleece_get_record (struct fleece_handle *h);

/* Undo everything a run of this vmid did, also after the process that ran
 * it died: cancel jobs, restore the devices' nodes, delete added nodes,
 * free images, remove the record.  Nothing left to do is success. */
FLEECE_API int fleece_cleanup (struct fleece_handle *h);

#ifdef __cplusplus
}
#endif

#endif /* FLEECE_H */
