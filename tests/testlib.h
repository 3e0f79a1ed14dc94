/* Shared helpers for libfleece's tests: a throwaway QEMU (no guest OS), a
 * QMP client to it, guest writes through a device, byte comparisons. */
#ifndef FLEECE_TESTLIB_H
#define FLEECE_TESTLIB_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <glib.h>
#include <json-c/json.h>

#include "qmp.h"
#include "fleece/fleece.h"

/* A scratch directory removed (recursively) by tl_tmpdir_free. */
char *tl_tmpdir_new (const char *tag);
void tl_tmpdir_free (char *dir);

/* A throwaway QEMU:
 *   qemu-system-x86_64 -machine q35 -accel tcg -S -nodefaults
 *     -display none -qmp unix:<dir>/qmp.sock,server=on,wait=off <extra>
 * $FLEECE_QEMU overrides the binary.  tl_qemu_start fails the test (ck_abort)
 * if QEMU does not come up within 20 s. */
typedef struct {
  GPid pid;
  char *dir;          /* scratch dir holding the socket and the disks */
  char *qmp_path;     /* <dir>/qmp.sock */
  FleeceQmp *qmp;     /* the test's own connection (a second QMP monitor:
                       * QEMU is started with two -qmp sockets; qmp_path is
                       * left free for the library) */
} TlQemu;

/* extra_args: NULL-terminated extra argv (may be NULL). */
TlQemu *tl_qemu_start (const char *const *extra_args);
/* Quit (QMP quit, then SIGKILL after 5 s) and remove its dir. */
void tl_qemu_stop (TlQemu *q);
/* Whether the QEMU process still runs. */
bool tl_qemu_alive (TlQemu *q);

/* Create an image file in q->dir with qemu-img (format raw or qcow2, exact
 * size in bytes), filled with a deterministic pattern keyed by seed so each
 * drive's content is distinct (written with qemu-io or plain writes).
 * Returns the path (g_free). */
char *tl_make_image (TlQemu *q, const char *name, const char *format,
                     uint64_t size, unsigned seed);

/* A disk of a Proxmox-shaped VM: drive drive-<key> (discard=unmap) on
 * image <key>.<format>, guest device id <key>. */
typedef struct {
  const char *key;      /* drive key */
  const char *format;   /* source format: raw or qcow2 */
  uint64_t size;        /* exact, in bytes */
  const char *bus;      /* scsi (scsi-hd on virtio-scsi-pci scsihw0), virtio
                         * (virtio-blk-pci), pflash (the EFI vars disk on
                         * the second flash device, with zeroed firmware
                         * code on the first; at most one), or none: only
                         * the image, the test attaches it (e.g. a
                         * backup-only drive) */
  bool fleeced;         /* expected to be fleeced by default */
} TlDisk;

/* A QEMU with such disks, and the dirs a backup of it uses.  The disks
 * live in the VM's own dir, which outlives the QEMU. */
typedef struct {
  TlQemu *q;            /* NULL until tl_vm_start */
  char *dir;            /* scratch: the disks, storage, target, state */
  const TlDisk *disks;  /* the test's table, not copied */
  size_t ndisks;
  char **paths;         /* image of disks[i] (NULL-terminated) */
  char *storage;        /* <dir>/storage, the fleecing storage (made) */
  char *target;         /* <dir>/target, the backup target (made) */
  char *state;          /* <dir>/state, the state dir (not made) */
  char **nodes_before;  /* tl_node_names once QEMU is up */
  char **roots_before;  /* tl_device_roots once QEMU is up (NULL for a VM
                         * whose starter does not record them) */
  char *graph_before;   /* tl_block_graph once QEMU is up (or NULL) */
} TlVm;

/* Scratch dir fleece-<tag>-XXXXXX with an image of each disk (disks[i]
 * filled with seed first_seed + i); no QEMU yet. */
TlVm *tl_vm_new (const char *tag, const TlDisk *disks, size_t ndisks,
                 unsigned first_seed);
/* Start QEMU with the disks (qemu-server 8's shape: -drive if=none,
 * id=drive-<key> and the device id=<key>; the EFI disk -drive if=pflash)
 * then extra_args (NULL-terminated, may be NULL), make storage and target,
 * and record nodes_before, roots_before and graph_before. */
void tl_vm_start (TlVm *vm, const char *const *extra_args);
/* The same in qemu-server 9's shape (QEMU >= 10): every disk a -blockdev
 * throttle node drive-<key> (throttle group throttle-drive-<key>) over a
 * format node f<key> over a file node e<key>, devices attached by node name
 * (scsi-hd with device_id=drive-<key>), the EFI disk as -machine
 * pflash0=pflash0,pflash1=drive-<key>. */
void tl_vm_start_blockdev (TlVm *vm, const char *const *extra_args);
/* Record nodes_before, roots_before and graph_before now (tl_vm_start
 * does; a VM started another way calls it once QEMU is up). */
void tl_vm_record_before (TlVm *vm);
/* Stop its QEMU (if started), remove its dir and free it. */
void tl_vm_stop (TlVm *vm);
/* The guest-visible content of every disk now (the point in time), in the
 * order of the disk table, each checked to be its exact size; free it with
 * tl_vm_snapshot_free. */
guint8 **tl_vm_snapshot (TlVm *vm);
void tl_vm_snapshot_free (TlVm *vm, guint8 **data);
/* A backup target for the VM: qemu-storage-daemon exporting over NBD, at
 * <dir>/nbd.sock, one raw file <target>/<key>.raw of the exact size per
 * disk, named after the key; it dies with the test.  Returns its pid (kill
 * and reap it) and sets *uri (g_free) for fleece_target_new_nbd(). */
GPid tl_vm_nbd_target (TlVm *vm, char **uri);
/* The same with the export of disk key (NULL: none) delta bytes larger
 * (or smaller) than the disk. */
GPid tl_vm_nbd_target_sized (TlVm *vm, const char *key, int64_t delta,
                             char **uri);
/* What HMP qemu-io -d takes for the disk's device: virtio-blk's
 * BlockBackend hangs off the proxy's virtio-backend child, the EFI disk's
 * is /machine/system.flash1.  Static buffer. */
const char *tl_disk_qdev (const TlDisk *d);

/* Overwrite the last 1 MiB (half of a smaller disk) of every disk that has
 * a guest device (bus not "none") through the device with pattern: ahead
 * of a backup's cursor, which starts at 0.  Returns the bytes written. */
uint64_t tl_vm_overwrite_tail (TlVm *vm, unsigned pattern);

/* ---- the library ---------------------------------------------------- */

/* A log callback: appends "<level>: <msg>\n" to the GString user_data (if
 * not NULL); with $FLEECE_TEST_VERBOSE set it also prints the line on
 * stderr. */
void tl_log_cb (void *user_data, int level, const char *msg);
/* A handle for vm: log callback into log (may be NULL), vmid, state dir
 * vm->state, connected to the library's socket vm->q->qmp_path, directory
 * storage vm->storage.  Aborts the test on failure. */
struct fleece_handle *tl_handle (TlVm *vm, uint32_t vmid, GString *log);
/* The same connected to qmp_path instead (a second monitor, a proxy, a
 * double), or not connected at all if qmp_path is NULL (fleece_cleanup
 * then reaches the QEMU the record names). */
struct fleece_handle *tl_handle_on (TlVm *vm, uint32_t vmid, GString *log,
                                    const char *qmp_path);
/* fleece_plan, aborting with the error (and log, if not NULL) on failure. */
struct fleece_plan *tl_plan (struct fleece_handle *h, GString *log);
/* fleece_wait (polling every poll_ms) until the backup ends: 1 or -1. */
int tl_wait_end (struct fleece_handle *h, int poll_ms);

/* Everything a run did is undone: node names equal vm->nodes_before, no
 * jobs, the storage dir empty, no record file <state>/<vmid>.json, no
 * fleece-run-* object in qom-list /objects, every device on its original
 * root node (vm->roots_before; without it, on no node named *fleece*). */
void tl_assert_nothing_left (TlVm *vm, uint32_t vmid);
/* The block graph equals vm->graph_before node for node and edge for edge
 * (names, drivers, edge names and permissions). */
void tl_assert_graph_unchanged (TlVm *vm);

/* The image path (raw or qcow2, read with tl_read_image) has exactly size
 * bytes and they equal expect; what names it in the failure message. */
void tl_assert_image_equals (const char *path, const char *format,
                             const guint8 *expect, uint64_t size,
                             const char *what);
/* Every disk of the VM has its backup <target_dir>/<key>.<format> equal to
 * its point-in-time content snapshot[i] (tl_vm_snapshot). */
void tl_check_point_in_time (TlVm *vm, guint8 **snapshot,
                             const char *target_dir, const char *format);

/* Execute a QMP command on the test's connection; aborts the test on error.
 * args is consumed.  Returns the "return" value (json_object_put it). */
json_object *tl_qmp (TlQemu *q, const char *command, json_object *args);
/* Same, returning NULL and the error text in *errmsg (g_free) on error. */
json_object *tl_qmp_try (TlQemu *q, const char *command, json_object *args,
                         char **errmsg);
/* Parse a JSON literal (aborts on bad JSON) — handy for arguments. */
json_object *tl_json (const char *fmt, ...) G_GNUC_PRINTF (1, 2);

/* HMP "qemu-io -d <qdev> <cmd>" through the guest device (i.e. through any
 * copy-before-write filter); aborts if HMP reports an error text (HMP's own,
 * e.g. "Permission conflict", or what qemu-io printed into QEMU's log). */
void tl_guest_io (TlQemu *q, const char *qdev, const char *io_command);

/* Sorted list of node names from query-named-block-nodes (g_strfreev). */
char **tl_node_names (TlQemu *q);
/* The root node name of the device with qdev id (from query-block). */
char *tl_device_root (TlQemu *q, const char *qdev);
/* Number of entries in query-jobs. */
int tl_job_count (TlQemu *q);
/* "<qdev>=<root node>" of every device with a medium, sorted (g_strfreev). */
char **tl_device_roots (TlQemu *q);
/* The block graph (x-debug-query-block-graph) as sorted text lines, one per
 * node ("node <type> <name> <driver>") and one per edge ("edge <parent>
 * -<child name>-> <child> perm=... shared=..."), so two graphs compare
 * with strcmp; anonymous BlockBackends are named after their child (g_free). */
char *tl_block_graph (TlQemu *q);
/* The names of the objects in /objects whose id starts with "fleece-run-"
 * (the library's run markers), sorted (g_strfreev). */
char **tl_run_markers (TlQemu *q);
/* The dirty bitmap name of node (node name, or a BlockBackend/device name
 * query-block knows): its "count" in bytes, or -1 if the node has no such
 * bitmap. */
int64_t tl_bitmap_count (TlQemu *q, const char *node, const char *name);

/* Read len bytes at offset of a file (g_free). */
guint8 *tl_read_file (const char *path, uint64_t offset, size_t len);
/* Read the guest-visible bytes of an image file with qemu-img/qemu-io
 * semantics (raw or qcow2) into a buffer (g_free): uses
 * "qemu-img convert -O raw" to a temp file when format is qcow2. */
guint8 *tl_read_image (const char *path, const char *format, uint64_t *size);
/* Sorted file names in a directory (g_strfreev). */
char **tl_list_dir (const char *dir);
/* Allocated bytes of a file (st_blocks * 512). */
uint64_t tl_allocated_bytes (const char *path);
/* The same summed over the files of a directory (not recursive). */
uint64_t tl_dir_allocated_bytes (const char *dir);

/* Mount a tmpfs of size (e.g. "1m") over dir, mode 0700 (root only); a
 * guard process detaches it if the test dies before its umount (which
 * the test does itself: umount (dir)). */
void tl_mount_tmpfs (const char *dir, const char *size);

/* Run a program (PATH searched, stdin /dev/null): its wait status; what it
 * printed (stdout, then stderr) in *output (g_free) unless output is NULL.
 * Aborts the test if it cannot be started. */
int tl_run_tool (const char *const *argv, char **output);

/* The "access" entry (backup access for external providers) of drive key
 * in h's record (json_object_put); aborts the test if there is none. */
json_object *tl_record_access (struct fleece_handle *h, const char *key);

#endif
