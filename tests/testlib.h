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
                         * (virtio-blk-pci), or none: only the image, the
                         * test attaches it (e.g. a backup-only drive) */
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
} TlVm;

/* Scratch dir fleece-<tag>-XXXXXX with an image of each disk (disks[i]
 * filled with seed first_seed + i); no QEMU yet. */
TlVm *tl_vm_new (const char *tag, const TlDisk *disks, size_t ndisks,
                 unsigned first_seed);
/* Start QEMU with the disks then extra_args (NULL-terminated, may be NULL),
 * make storage and target, and record nodes_before. */
void tl_vm_start (TlVm *vm, const char *const *extra_args);
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
/* What HMP qemu-io -d takes for the disk's device: virtio-blk's
 * BlockBackend hangs off the proxy's virtio-backend child.  Static buffer. */
const char *tl_disk_qdev (const TlDisk *d);

/* Execute a QMP command on the test's connection; aborts the test on error.
 * args is consumed.  Returns the "return" value (json_object_put it). */
json_object *tl_qmp (TlQemu *q, const char *command, json_object *args);
/* Same, returning NULL and the error text in *errmsg (g_free) on error. */
json_object *tl_qmp_try (TlQemu *q, const char *command, json_object *args,
                         char **errmsg);
/* Parse a JSON literal (aborts on bad JSON) — handy for arguments. */
json_object *tl_json (const char *fmt, ...) G_GNUC_PRINTF (1, 2);

/* HMP "qemu-io -d <qdev> <cmd>" through the guest device (i.e. through any
 * copy-before-write filter); aborts if HMP reports an error text. */
void tl_guest_io (TlQemu *q, const char *qdev, const char *io_command);

/* Sorted list of node names from query-named-block-nodes (g_strfreev). */
char **tl_node_names (TlQemu *q);
/* The root node name of the device with qdev id (from query-block). */
char *tl_device_root (TlQemu *q, const char *qdev);
/* Number of entries in query-jobs. */
int tl_job_count (TlQemu *q);

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

#endif
