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
 *    fleece_get_errno(), which need no handle.  A NULL handle, plan,
 *    storage or target is EINVAL, never a crash.
 *  - Strings returned as "const char *" belong to the object they came from
 *    and live as long as it does; strings returned as "char *" are the
 *    caller's and are released with free().
 *  - Every callback is registered with its user data and a free function,
 *    called once when the callback is replaced or its object is freed.
 *  - A handle may be used by one thread at a time; only fleece_cancel() may
 *    be called from another thread (or a signal handler) meanwhile.
 *    Different handles may be used from different threads concurrently.
 *  - A handle belongs to the process that created it: in a child after
 *    fork() every call but fleece_free() fails with EPERM and touches
 *    nothing.
 *  - The handle holds QEMU's QMP monitor only while it is inside a call
 *    (QEMU serves one monitor client at a time), except with
 *    fleece_connect_fd().
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

/* The API this header describes; additions get a FLEECE_HAVE_* macro. */
#define FLEECE_VERSION_MAJOR 1
#define FLEECE_VERSION_MINOR 0

/* ------------------------------------------------------------------ */
/* Version and errors                                                  */
/* ------------------------------------------------------------------ */

/* The library's version, e.g. "1.0.0". */
FLEECE_API const char *fleece_get_version (void);

/* The message of the last failed call in this thread, or NULL if none.
 * Messages start with the name of the API call that failed. */
FLEECE_API const char *fleece_get_error (void);

/* The errno of the last failed call in this thread (0 if not known). */
FLEECE_API int fleece_get_errno (void);

/* ------------------------------------------------------------------ */
/* Callbacks                                                           */
/* ------------------------------------------------------------------ */

/* Called once with the user data when a callback is replaced or the object
 * holding it is freed (may be NULL). */
typedef void (*fleece_free_fn) (void *user_data);

/* Log levels passed to the log callback. */
#define FLEECE_LOG_ERROR   0
#define FLEECE_LOG_WARNING 1
#define FLEECE_LOG_INFO    2
#define FLEECE_LOG_DEBUG   3

/* Receives the library's log messages (e.g. for a backup task log). */
typedef void (*fleece_log_fn) (void *user_data, int level, const char *msg);

/* Receives progress of one drive while a backup runs.  drive is the drive
 * key (e.g. "scsi0"); done and total are bytes. */
typedef void (*fleece_progress_fn) (void *user_data, const char *drive,
                                    uint64_t done, uint64_t total);

/* The durable record.  The library writes what it is about to do before it
 * allocates an image or adds a node, so that fleece_cleanup() can recover
 * after a crash at any point.
 *
 * load:  set *json to a malloc'd copy of the record for vmid, or to NULL if
 *        there is none; return 0, or -1 on failure.
 * store: make json the record for vmid durably before returning (json ==
 *        NULL removes the record); return 0, or -1 on failure.
 * On failure a callback may set errno and *reason to a malloc'd message
 * saying why; the library frees it and puts it into its error. */
typedef int (*fleece_record_load_fn) (void *user_data, uint32_t vmid,
                                      char **json, char **reason);
typedef int (*fleece_record_store_fn) (void *user_data, uint32_t vmid,
                                       const char *json, char **reason);

/* ------------------------------------------------------------------ */
/* Storage for fleecing images                                         */
/* ------------------------------------------------------------------ */

struct fleece_storage;

/* What a storage can do (fleece_storage_new_callback flags). */
#define FLEECE_STORAGE_QCOW2   0x1u  /* can hold qcow2 images */
#define FLEECE_STORAGE_DISCARD 0x2u  /* frees space on discard (thin) */
#define FLEECE_STORAGE_PATH    0x4u  /* path-based: names get .<format> */

/* The built-in directory storage.  dir must be an absolute path to a
 * directory owned by the caller's effective user and not writable by group
 * or others.  Raw images are sparse files of exactly the source size,
 * qcow2 images have exactly the source's virtual size.  Image names never
 * escape dir, and only images created by this library in the run, proven
 * by device and inode, are ever removed. */
FLEECE_API struct fleece_storage *fleece_storage_new_dir (const char *dir);

/* The built-in Ceph RBD storage: raw images vm-<vmid>-fleece-<n> in pool
 * (namespace ns, or NULL), created and removed with librbd and attached
 * with QEMU's rbd driver.  Options: fleece_storage_set_option().  Fails
 * with ENOTSUP when the library was built without librbd. */
FLEECE_API struct fleece_storage *fleece_storage_new_rbd (const char *pool,
                                                          const char *ns);

/* A storage option by name, e.g. for RBD "conf" (ceph.conf path), "id"
 * (client id, default "admin"), "keyring", "object-size" (bytes).  Unknown
 * keys are EINVAL.  Only before the storage is given to a handle. */
FLEECE_API int fleece_storage_set_option (struct fleece_storage *st,
                                          const char *key, const char *value);

/* A storage implemented by the caller (e.g. Proxmox's PVE::Storage).  id
 * names it in the record (e.g. "pve:local-lvm"): a cleanup frees the
 * images of a run only through a storage with the same id.  Register the
 * callbacks below; alloc, remove and one of path or blockdev are required
 * before fleece_set_storage() takes it. */
FLEECE_API struct fleece_storage *
fleece_storage_new_callback (const char *id, unsigned flags, void *user_data,
                             fleece_free_fn free_fn);

/* alloc:    allocate an image called name (e.g. "vm-100-fleece-0.qcow2") of
 *           format "raw" or "qcow2" whose virtual size is exactly size
 *           bytes; set *volid to a malloc'd identifier for it; 0 or -1.
 *           Must fail, not reuse, if an image of that name exists.
 * remove:   free the image volid; one that does not exist is not an error;
 *           0 or -1.
 * path:     a malloc'd path of volid that QEMU can open (a file or a block
 *           device), or NULL on failure.
 * blockdev: a malloc'd JSON object, QEMU's BlockdevOptions of the image's
 *           protocol layer (e.g. {"driver": "rbd", "pool": ..., "image":
 *           ...} or {"driver": "host_device", "filename": ..., "aio":
 *           "native"}), or NULL on failure; the library adds the format
 *           layer and its own node names and asks for discard.
 * On failure a callback may set errno and *reason (malloc'd, freed by the
 * library). */
typedef int (*fleece_storage_alloc_fn) (void *user_data, const char *name,
                                        const char *format, uint64_t size,
                                        char **volid, char **reason);
typedef int (*fleece_storage_remove_fn) (void *user_data, const char *volid,
                                         char **reason);
typedef char *(*fleece_storage_path_fn) (void *user_data, const char *volid,
                                         char **reason);
typedef char *(*fleece_storage_blockdev_fn) (void *user_data,
                                             const char *volid,
                                             char **reason);

FLEECE_API int fleece_storage_set_alloc_callback (struct fleece_storage *st,
                                                  fleece_storage_alloc_fn fn);
FLEECE_API int fleece_storage_set_remove_callback (struct fleece_storage *st,
                                                   fleece_storage_remove_fn fn);
FLEECE_API int fleece_storage_set_path_callback (struct fleece_storage *st,
                                                 fleece_storage_path_fn fn);
FLEECE_API int
fleece_storage_set_blockdev_callback (struct fleece_storage *st,
                                      fleece_storage_blockdev_fn fn);

FLEECE_API void fleece_storage_free (struct fleece_storage *st);

/* ------------------------------------------------------------------ */
/* Backup targets                                                      */
/* ------------------------------------------------------------------ */

struct fleece_target;

/* One image per drive in dir, named <drive key>.<format>; format is "raw"
 * or "qcow2" and the image has exactly the drive's size.  Files are
 * created, never overwritten. */
FLEECE_API struct fleece_target *fleece_target_new_dir (const char *dir,
                                                        const char *format);

/* For an incremental backup into a directory: base_dir holds the previous
 * backup of the chain (full or incremental, <drive key>.<format>).  Each
 * new image is a qcow2 image whose backing file is the previous one (a
 * relative path, backing format recorded), so the newest image of a chain
 * reads as the whole disk at its point in time. */
FLEECE_API int fleece_target_set_base (struct fleece_target *t,
                                       const char *base_dir);

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

/* Write the backup to an open file descriptor, which the target takes (and
 * closes when freed, also when this call fails).  format "vma": a VMA
 * archive of every drive (Proxmox engine; fd may be a pipe, e.g. to a
 * compressor; the fd is handed to QEMU with SCM_RIGHTS).  format "raw":
 * the image of a single-drive plan (stock engine; fd must be a regular
 * file or block device opened for writing). */
FLEECE_API struct fleece_target *fleece_target_new_fd (int fd,
                                                       const char *format);

/* A "vma" fd target: more arguments of the patched QEMU's backup command,
 * as a JSON object passed through, e.g. {"config-file":
 * "/run/vzdump/qemu-server.conf", "firewall-file": ...} (as qemu-server's
 * archive_vma gives them); "backup-file", "format", "devlist" and
 * "fleecing" are the library's. */
FLEECE_API int fleece_target_set_pve_args (struct fleece_target *t,
                                           const char *json_args);

FLEECE_API void fleece_target_free (struct fleece_target *t);

/* ------------------------------------------------------------------ */
/* The handle: one VM                                                  */
/* ------------------------------------------------------------------ */

struct fleece_handle;

FLEECE_API struct fleece_handle *fleece_new (void);
FLEECE_API void fleece_free (struct fleece_handle *h);

/* Use QEMU's QMP unix socket qmp_path: connect once to read the greeting
 * and probe what QEMU can do (this chooses the engine), then let go.  Every
 * later call that talks to QEMU connects again for as long as it runs, so
 * other clients of the monitor (qemu-server) are never kept waiting
 * between calls.  A monitor that accepts but does not greet within a few
 * seconds is EBUSY "another client holds the QMP monitor". */
FLEECE_API int fleece_connect (struct fleece_handle *h, const char *qmp_path);

/* The same over an already connected socket, which the handle keeps (and
 * with it the monitor) until freed; the handle takes fd and closes it
 * when freed (also when this call fails). */
FLEECE_API int fleece_connect_fd (struct fleece_handle *h, int fd);

/* Settings.  Each returns 0, or -1 for a bad value.  Settings that shape a
 * run are refused with EBUSY from fleece_attach() until fleece_cleanup();
 * fleece(3) lists which call is allowed in which state. */

/* The Proxmox VM id (1 to 999999999): images are named vm-<vmid>-fleece-<n>
 * and records and locks are kept per vmid.  Required. */
FLEECE_API int fleece_set_vmid (struct fleece_handle *h, uint32_t vmid);
/* The vmid, or -1 (EINVAL) if none is set. */
FLEECE_API int64_t fleece_get_vmid (struct fleece_handle *h);

/* Where records and locks live; default $FLEECE_STATE_DIR, else
 * /var/lib/fleece.  An absolute path; it (and a default one the library
 * creates, 0700) must be owned by the caller's effective user and not
 * writable by group or others. */
FLEECE_API int fleece_set_state_dir (struct fleece_handle *h, const char *dir);

/* The storage for fleecing images; the handle takes ownership of st (also
 * when this call fails). */
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

/* Dirty bitmaps (stock engine).  name is a dirty bitmap on the source node
 * of every backed-up drive:
 *  FLEECE_BITMAP_USE  incremental: back up what the bitmap marks; from the
 *                     backup's point in time it tracks the next one.
 *  FLEECE_BITMAP_NEW  a full backup that (re)starts the bitmap at its
 *                     point in time (added, persistent where the image
 *                     format allows, or cleared, in the transaction that
 *                     starts the jobs): the first link of a chain with no
 *                     gap.  A failed run leaves the bitmap as it was.
 * name NULL (mode ignored): a full backup, no bitmap. */
#define FLEECE_BITMAP_USE 1
#define FLEECE_BITMAP_NEW 2
FLEECE_API int fleece_set_bitmap (struct fleece_handle *h, const char *name,
                                  int mode);

/* copy-before-write timeout in seconds (default 45; 0 disables).  May
 * change until fleece_start(). */
FLEECE_API int fleece_set_cbw_timeout (struct fleece_handle *h,
                                       unsigned seconds);

/* Callbacks; fn NULL removes one.  The previous one's free_fn is called. */
FLEECE_API int fleece_set_log_callback (struct fleece_handle *h,
                                        fleece_log_fn fn, void *user_data,
                                        fleece_free_fn free_fn);
FLEECE_API int fleece_set_progress_callback (struct fleece_handle *h,
                                             fleece_progress_fn fn,
                                             void *user_data,
                                             fleece_free_fn free_fn);
/* Keep the record through callbacks instead of a file in the state dir
 * (both or neither). */
FLEECE_API int fleece_set_record_callback (struct fleece_handle *h,
                                           fleece_record_load_fn load,
                                           fleece_record_store_fn store,
                                           void *user_data,
                                           fleece_free_fn free_fn);

/* ------------------------------------------------------------------ */
/* The lifecycle                                                       */
/* ------------------------------------------------------------------ */

struct fleece_plan;

/* Read the VM's drives and decide, per drive, whether it is backed up and
 * fleeced, the image's name, format and size.  Changes nothing in QEMU or
 * storage. */
FLEECE_API struct fleece_plan *fleece_plan (struct fleece_handle *h);
FLEECE_API void fleece_plan_free (struct fleece_plan *p);

/* The drives to back up, in sorted drive-key order (-1 for a NULL plan). */
FLEECE_API int fleece_plan_get_drive_count (struct fleece_plan *p);
FLEECE_API const char *fleece_plan_get_key (struct fleece_plan *p, int i);
FLEECE_API const char *fleece_plan_get_device (struct fleece_plan *p, int i);
/* Exact size in bytes, or -1. */
FLEECE_API int64_t fleece_plan_get_size (struct fleece_plan *p, int i);
/* 1 if drive i is fleeced, 0 if not (see fleece_plan_get_reason), -1 on a
 * bad index. */
FLEECE_API int fleece_plan_get_fleeced (struct fleece_plan *p, int i);
FLEECE_API const char *fleece_plan_get_reason (struct fleece_plan *p, int i);
FLEECE_API const char *fleece_plan_get_image (struct fleece_plan *p, int i);
FLEECE_API const char *fleece_plan_get_format (struct fleece_plan *p, int i);
/* The fleecing image's cluster size in bytes (0 for raw), or -1. */
FLEECE_API int64_t fleece_plan_get_cluster_size (struct fleece_plan *p,
                                                 int i);
/* What QEMU has that is not backed up (CD-ROMs, firmware code, drives
 * without a guest device, ...), each with the reason, so nothing is
 * skipped silently. */
FLEECE_API int fleece_plan_get_skipped_count (struct fleece_plan *p);
FLEECE_API const char *fleece_plan_get_skipped_name (struct fleece_plan *p,
                                                     int i);
FLEECE_API const char *fleece_plan_get_skipped_reason (struct fleece_plan *p,
                                                       int i);
/* The whole plan as a JSON document (malloc'd). */
FLEECE_API char *fleece_plan_to_json (struct fleece_plan *p);

/* Allocate the fleecing images and attach them to QEMU.  On failure,
 * undoes what it did.  Refused (EBUSY) while QEMU shows another run's
 * nodes or jobs for this VM, whatever its state directory: that run is
 * active or crashed, see fleece_get_status() and fleece_cleanup().
 * flags: none defined yet, must be 0. */
FLEECE_API int fleece_attach (struct fleece_handle *h, struct fleece_plan *p,
                              unsigned flags);

/* Insert the copy-before-write filters and start the backup of every drive
 * in the plan with one point in time.  Returns once the jobs run.
 * flags: none defined yet, must be 0. */
FLEECE_API int fleece_start (struct fleece_handle *h, struct fleece_plan *p,
                             struct fleece_target *t, unsigned flags);

/* Wait up to timeout_ms (-1: forever) for the backup to end, reporting
 * progress meanwhile; fleece_cancel() wakes it at once.  Returns 1 if it
 * ended successfully, 0 if it is still running, -1 if it failed (the error
 * says why; ECANCELED after fleece_cancel()). */
FLEECE_API int fleece_wait (struct fleece_handle *h, int timeout_ms);

/* Ask the run set up on h to stop.  Thread-safe and async-signal-safe: it
 * only records the request and wakes fleece_wait(), which sends the cancel
 * to QEMU (as does fleece_cleanup(); fleece_start() refuses to start a
 * cancelled run, and a connect or QMP wait in progress gives up with
 * ECANCELED).  Returns 0, or -1 with errno EINVAL (and, being signal-safe,
 * without updating fleece_get_error()) if no run is set up. */
FLEECE_API int fleece_cancel (struct fleece_handle *h);

/* Progress of the whole backup in bytes. */
FLEECE_API int fleece_get_progress (struct fleece_handle *h, uint64_t *done,
                                    uint64_t *total);

/* Progress of one drive (by key, e.g. "scsi0") in bytes. */
FLEECE_API int fleece_get_drive_progress (struct fleece_handle *h,
                                          const char *key, uint64_t *done,
                                          uint64_t *total);

/* Figures of the running or ended backup, of one drive (key) or of the
 * whole backup (key NULL).  ENOTSUP when the engine does not know it. */
#define FLEECE_STAT_DONE       0  /* bytes backed up so far */
#define FLEECE_STAT_TOTAL      1  /* bytes to back up */
#define FLEECE_STAT_ZERO       2  /* of DONE, bytes that were zero */
#define FLEECE_STAT_REUSED     3  /* bytes reused from the previous backup */
#define FLEECE_STAT_DIRTY      4  /* incremental: bytes the bitmap marked */
#define FLEECE_STAT_FINISHING  5  /* 1 once the data is out and it ends */
#define FLEECE_STAT_ELAPSED_MS 6  /* milliseconds since the start */
FLEECE_API int fleece_get_stat (struct fleece_handle *h, const char *key,
                                int stat, uint64_t *value);

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

/* What is known of this vmid's runs, read-only, as a JSON document
 * (malloc'd): the record, whether another process holds the VM's lock,
 * and, when connected, what QEMU shows of libfleece's nodes and jobs (and
 * the patched QEMU's backup); "run" sums it up as "none", "active",
 * "crashed" or "leftovers".  flags: none defined yet, must be 0. */
FLEECE_API char *fleece_get_status (struct fleece_handle *h, unsigned flags);

/* Undo everything a run of this vmid did, also after the process that ran
 * it died: cancel jobs, restore the devices' nodes, delete added nodes,
 * free the images the run created, remove the record.  Without a record,
 * what QEMU shows of a run is undone (images it cannot prove its own are
 * reported, not removed).  Nothing left to do is success.  flags: none
 * defined yet, must be 0. */
FLEECE_API int fleece_cleanup (struct fleece_handle *h, unsigned flags);

#ifdef __cplusplus
}
#endif

#endif /* FLEECE_H */
