/* Fixtures from qemu-server's own test expectations: a throwaway QEMU
 * started from the exact command line qemu-server generates for a VM
 * config, with local images.
 *
 * qemu-server's src/test/cfg2cmd/<name>.conf holds a VM config and
 * <name>.conf.cmd the QEMU command line qemu-server builds from it
 * (qemu-server 9: every drive a -blockdev throttle node drive-<key> over a
 * format node over a file/host_device node, the EFI vars disk on
 * -machine pflash1; older pinned machine versions: -drive).  The files are
 * read at run time from the qemu-server source tree named by
 * $FLEECE_QEMU_SERVER_SRC; nothing of them is part of this project.
 *
 * The command line is kept as it is, except (each change is listed in
 * TlCfgVm.changes):
 *   - dropped: -id, -pidfile, -daemonize, -vnc, -spice, -nographic, -iscsi,
 *     -cpu (host/enforce models need KVM), the QMP and qmeventd monitors
 *     (the QEMU gets testlib's two QMP sockets instead), swtpm
 *     (chardev/tpmdev/tpm-tis), -netdev and the net devices using them,
 *     vfio-pci, spice chardevs, chardev backends and devices this QEMU does
 *     not have (and the devices using such chardevs), -bios, -boot
 *     splash=;
 *   - added: -L for the distribution's firmware dirs (SeaBIOS, VGA BIOS,
 *     iPXE ROMs), which a QEMU built from source does not find;
 *   - -readconfig pve-q35*.cfg: replaced by the devices it defines that
 *     the fixtures use (ehci, the pcidmi bridge with pci.0-pci.2, the root
 *     ports ich9-pcie-port-1..4);
 *   - -machine: "+pveN" dropped from the type (q35+pve0 -> q35,
 *     pc-i440fx-10.0+pve0 -> pc-i440fx-10.0), accel= dropped (the QEMU
 *     runs with -accel tcg -S -nodefaults -display none);
 *   - images: every file/host_device leaf becomes a local file of the
 *     node's format (host_device -> file driver on a regular file), the
 *     firmware code (pflash0) a zeroed local file of a valid pflash size,
 *     chardev socket paths local; aio=io_uring becomes threads and
 *     cache.direct false only where this QEMU or file system cannot do
 *     them.
 * Fixtures that need what cannot run here (rbd, iscsi, nbd sources, SEV,
 * hugepages, a machine type newer than the QEMU) fail with
 * TL_CFG2CMD_ERROR_UNSUPPORTED: skip them.
 *
 * Like testlib's helpers these assert (Check): call them inside a test. */
#ifndef FLEECE_TL_CFG2CMD_H
#define FLEECE_TL_CFG2CMD_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <glib.h>

#include "testlib.h"

#define TL_CFG2CMD_ERROR (tl_cfg2cmd_error_quark ())
GQuark tl_cfg2cmd_error_quark (void);

typedef enum {
  /* $FLEECE_QEMU_SERVER_SRC unset, or no src/test/cfg2cmd below it */
  TL_CFG2CMD_ERROR_NO_SOURCE,
  /* no <fixture>.conf.cmd there */
  TL_CFG2CMD_ERROR_NO_FIXTURE,
  /* needs what cannot run here (rbd/iscsi/nbd storage, SEV, hugepages, a
   * block device model this QEMU lacks) */
  TL_CFG2CMD_ERROR_UNSUPPORTED,
  /* a command line this helper does not understand */
  TL_CFG2CMD_ERROR_PARSE,
} TlCfg2cmdError;

/* A drive of the fixture, named by its config key. */
typedef struct {
  char *key;            /* config key: scsi0, virtio0, efidisk0, ide2 */
  char *top_node;       /* -blockdev: the throttle node drive-<key>;
                         * -drive: NULL (auto-named node) */
  char *format_node;    /* -blockdev: f<hash> below the throttle node */
  char *file_node;      /* -blockdev: e<hash> below the format node */
  char *blk_name;       /* -drive: the BlockBackend name drive-<key>;
                         * -blockdev: NULL (the BlockBackend has no name) */
  char *qdev_id;        /* the guest device's id (scsi0), NULL for the EFI
                         * disk on pflash1 */
  char *qom_path;       /* /machine/peripheral/<id>, /machine/system.flash1 */
  char *io_dev;         /* what HMP "qemu-io -d" takes for the device:
                         * <id>, /machine/peripheral/<id>/virtio-backend,
                         * /machine/system.flash1 */
  char *device_driver;  /* scsi-hd, virtio-blk-pci, ide-hd, ide-cd, pflash */
  char *device_id_prop; /* scsi-hd's device_id (drive-<key>) or NULL */
  char *iothread;       /* the device's (or its SCSI controller's) iothread */
  char *path;           /* local image (top layer); NULL for an empty CD-ROM
                         * or a drive not attached at start */
  char **layers;        /* all local images, top first (backing chains) */
  char *format;         /* raw, qcow2 (of the top layer) */
  uint64_t size;        /* exact guest-visible size in bytes */
  const char *size_from;/* "json" (the node's size), "conf", "efitype", "empty",
                         * "default" or "capped" */
  bool blockdev;        /* -blockdev (qemu-server 9) or -drive */
  bool read_only;
  bool cdrom;
  bool efidisk;         /* on pflash1 */
  bool attached;        /* in QEMU from the start (tpmstate0: not, see
                         * tl_cfg2cmd_attach_tpm_backup) */
  bool backed_up;       /* qemu-server backs it up: not a CD-ROM */
} TlCfgDrive;

typedef enum {
  TL_CFG_FILL_PATTERN,  /* testlib's pattern in every byte (tl_make_image) */
  TL_CFG_FILL_SPARSE,   /* a 64 KiB pattern block at the start of every
                         * MiB, zeroes (holes) elsewhere: cheap for large
                         * images */
  TL_CFG_FILL_ZERO,     /* sparse zeroes */
} TlCfgFill;

typedef struct {
  uint64_t max_size;    /* cap for sizes from the config or the default
                         * (0: none); sizes from the JSON are exact */
  uint64_t default_size;/* for a drive without any size (0: 64 MiB) */
  TlCfgFill fill;       /* default TL_CFG_FILL_PATTERN */
  unsigned first_seed;  /* pattern seed of the first backed-up drive in key
                         * order, +1 for each next (0: 1) */
} TlCfgOpts;

typedef struct {
  char *name;           /* fixture name, e.g. efi-raw */
  char *cmd_path;       /* .../src/test/cfg2cmd/efi-raw.conf.cmd */
  char *description;    /* the "# TEST:" line of the .conf */
  char *machine;        /* machine type as started (q35, pc, pc-q35-6.1) */
  bool q35;
  bool blockdev;        /* any -blockdev drive (qemu-server 9 shape) */
  bool snapshot;        /* -snapshot (templates): writes to -drive disks go
                         * to a temporary overlay, not to the images */
  TlCfgDrive *drives;   /* every drive of the command line (+ tpmstate0),
                         * sorted by key (plain strcmp) */
  size_t ndrives;
  char *pflash0;        /* local firmware code file, or NULL */
  char **argv;          /* the arguments given to tl_qemu_start */
  char **changes;       /* what was dropped or changed, one per line */
  /* Images and dirs as testlib's TlVm: vm->disks holds one TlDisk (bus
   * "none") per backed-up drive attached at start, in key order, with
   * vm->paths its image; usable with tl_vm_snapshot, tl_vm_nbd_target.
   * vm->q is the QEMU once launched (tl_qemu_stop-compatible). */
  TlVm *vm;
  TlQemu *q;            /* == vm->q */
} TlCfgVm;

/* $FLEECE_QEMU_SERVER_SRC/src/test/cfg2cmd, or NULL with why (static). */
const char *tl_cfg2cmd_dir (GError **err);
/* Names of every fixture there (<name>.conf.cmd), sorted (g_strfreev). */
char **tl_cfg2cmd_list (GError **err);

/* Parse the fixture (a name, or a path to a .conf.cmd), create its images
 * in a scratch dir and build the arguments; no QEMU yet.  opts may be
 * NULL.  NULL with err when the fixture cannot be used here. */
TlCfgVm *tl_cfg2cmd_new (const char *fixture, const TlCfgOpts *opts,
                         GError **err);
/* Start QEMU (tl_qemu_start: -accel tcg -S -nodefaults -display none, the
 * library's QMP socket q->qmp_path and the test's connection q->qmp) with
 * the fixture's arguments then extra_args (may be NULL); make the TlVm's
 * storage and target dirs and record vm->nodes_before.  Fails the test
 * (ck_abort, QEMU's log printed) if QEMU does not come up. */
void tl_cfg2cmd_launch (TlCfgVm *vm, const char *const *extra_args);
/* new + launch with default options. */
TlCfgVm *tl_cfg2cmd_start (const char *fixture, GError **err);
TlCfgVm *tl_cfg2cmd_start_full (const char *fixture, const TlCfgOpts *opts,
                                const char *const *extra_args, GError **err);
/* Stop QEMU, remove the images and free. */
void tl_cfg2cmd_stop (TlCfgVm *vm);

/* The drive with that config key, or NULL. */
const TlCfgDrive *tl_cfg2cmd_drive (const TlCfgVm *vm, const char *key);
/* HMP "qemu-io -d <io_dev> <io_command>" through the drive's guest device
 * (so through anything inserted above its node); aborts on an error. */
void tl_cfg2cmd_guest_io (TlCfgVm *vm, const char *key,
                          const char *io_command);

/* What qemu-server's backup does for a VM with a TPM (tpmstate0 in the
 * config, swtpm in the command line): blockdev-add the state image
 * read-only as format node drive-tpmstate0-backup over file node
 * tpmstate0-backup-file (no throttle node, no device), and add it to
 * vm->disks.  Aborts the test if the fixture has no tpmstate0. */
void tl_cfg2cmd_attach_tpm_backup (TlCfgVm *vm);
/* blockdev-del drive-tpmstate0-backup (tolerates its absence). */
void tl_cfg2cmd_detach_tpm_backup (TlCfgVm *vm);

/* A multi-line description: drives, nodes, devices, changes (g_free). */
char *tl_cfg2cmd_describe (const TlCfgVm *vm);

/* qemu-server's naming: the small state drives (EFI vars, TPM state) that
 * are backed up but never fleeced, and the device name (a VMA's) of
 * drive key (g_free): drive-<key>, the TPM state's drive-<key>-backup. */
bool tl_qs_is_small_state (const char *key);
char *tl_qs_device_of (const char *key);

/* In a Check test: start the fixture into `var` (TlCfgVm *), or print why
 * it cannot run here and return from the test (a skip). */
#define TL_CFG2CMD_START_OR_SKIP(var, fixture, opts)                      \
  do {                                                                    \
    g_autoptr (GError) tl_cfg_err_ = NULL;                                \
    (var) = tl_cfg2cmd_new ((fixture), (opts), &tl_cfg_err_);             \
    if (!(var)) {                                                         \
      if (tl_cfg_err_->code == TL_CFG2CMD_ERROR_PARSE)                    \
        ck_abort_msg ("fixture %s: %s", (fixture), tl_cfg_err_->message); \
      fprintf (stderr, "%s: SKIPPED: %s\n", __func__,                     \
               tl_cfg_err_->message);                                     \
      return;                                                             \
    }                                                                     \
    tl_cfg2cmd_launch ((var), NULL);                                      \
  } while (0)

#endif
