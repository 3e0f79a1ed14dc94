/* faultlib: driving the fault proxy (fault-proxy.c) and the harness of the
 * fault and safety tests: a small Proxmox-shaped VM whose guest writes are
 * tracked, the library run in a child process to be killed, and the
 * checks that a VM is exactly as before a run.
 *
 * The library connects to QMP for each public call (and fleece_wait for
 * each look at the jobs), so a fault is armed for a session of the proxy:
 * every connection from fl_proxy_arm() to fl_proxy_end(), its commands
 * counted in order across connections. */
#ifndef FLEECE_FAULTLIB_H
#define FLEECE_FAULTLIB_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <glib.h>

#include "testlib.h"
#include "fleece/fleece.h"

#define FL_VMID 100
#define FL_CHILD_TIMEOUT_MS 60000
#define FL_BWLIMIT_SLOW 1024    /* KiB/s: the 2nd 4 MiB of 8 come after 4 s */

/* FLEECE_FAULTS_SAMPLE=k: of the injection points of a matrix, run only
 * every k-th (shifted by salt, so that matrices sample different
 * commands).  The ASan run sets it; the plain run has all of it. */
bool fl_sampled (unsigned n, unsigned salt);

/* ---- the fault proxy ------------------------------------------------ */

typedef struct FlProxy FlProxy;

/* What a session saw, from fl_proxy_end(). */
typedef struct {
  unsigned commands;
  unsigned connections;
  bool fired;
  char *at;             /* name of command N, "-" if not reached */
  char **cmds;          /* every command, in order */
} FlEnd;

/* Start the proxy listening on path, passing to upstream (QEMU's QMP). */
FlProxy *fl_proxy_start (const char *upstream, const char *path);
void fl_proxy_stop (FlProxy *px);
const char *fl_proxy_path (FlProxy *px);
/* Arm a session: mode at command n (fault-proxy.c lists the modes), pid
 * to SIGKILL for send/reply (0: none), arg for oversize/delay. */
void fl_proxy_arm (FlProxy *px, const char *mode, unsigned n, pid_t pid,
                   long arg);
/* The same counting only the commands called name; n = 0 faults every
 * one of them. */
void fl_proxy_arm_named (FlProxy *px, const char *mode, unsigned n, long arg,
                         const char *name);
/* End the session and read its report into e (cleared first). */
void fl_proxy_end (FlProxy *px, FlEnd *e);
void fl_end_clear (FlEnd *e);
/* Hide name from later query-qmp-schema replies; NULL shows all again. */
void fl_proxy_mask (FlProxy *px, const char *name);

/* ---- the VM ----------------------------------------------------------- */

/* Small and quick, but Proxmox-shaped: an EFI disk backed up without
 * fleecing and a fleeced qcow2 SCSI disk (index FL_FLEECED). */
extern const TlDisk fl_disks[];
#define FL_NDISKS 2
#define FL_FLEECED 1

typedef struct {
  TlVm *tl;             /* QEMU, disks, storage, target, state */
  guint8 *model[FL_NDISKS];  /* what the guest must see */
  GString *log;         /* the library's log */
  FlProxy *px;          /* NULL until fl_vm_proxy() */
  uint32_t vmid;
  unsigned writes;      /* guest writes so far, for distinct patterns */
} FlVm;

/* extra: NULL-terminated extra QEMU arguments or NULL; running: let the
 * vCPUs run (so that start's stop/cont is exercised). */
FlVm *fl_vm_start (const char *tag, const char *const *extra, bool running);
void fl_vm_stop (FlVm *vm);
bool fl_vm_running (FlVm *vm);
/* The proxy between the library and the VM's QMP socket (started on first
 * use at <dir>/proxy.sock); its path. */
const char *fl_vm_proxy (FlVm *vm);
/* A handle for the VM (log, state dir, vmid, its directory storage),
 * connected to qmp_path unless it is NULL. */
struct fleece_handle *fl_vm_handle (FlVm *vm, const char *qmp_path);

/* Write through the guest device (i.e. through any cbw filter) and keep
 * the model in step; every write has its own pattern. */
void fl_guest_write (FlVm *vm, size_t i, uint64_t off, uint64_t len);
/* A write near the end of every disk: ahead of the backup cursor. */
void fl_guest_write_all (FlVm *vm);
void fl_guest_flush (FlVm *vm);

/* The model now, as the point in time of a backup (fl_pit_free). */
guint8 **fl_pit (FlVm *vm);
void fl_pit_free (guint8 **pit);
/* The backup in the target dir (<key>.raw) equals pit. */
void fl_assert_backup (FlVm *vm, guint8 **pit, const char *what);
/* The disks hold what the guest wrote (read while QEMU is gone too). */
void fl_assert_disks (FlVm *vm, const char *what);
/* Remove every file of a directory (the target between runs). */
void fl_empty_dir (const char *dir);

/* The VM is as before any run: node names, device roots, no jobs, no run
 * marker, empty storage, no record (only lock files in the state dir), the
 * vCPUs running, the disks holding what the guest wrote, and a guest write
 * through every device succeeds.  what names the case in failures.  Clears
 * the log. */
void fl_assert_restored (FlVm *vm, const char *what);
/* fleece_cleanup() the way a restarted manager does: a fresh handle that
 * knows the vmid, the state dir and the storage; the record must be gone
 * afterwards. */
void fl_recover (FlVm *vm, const char *what);

/* ---- the library in a child, to be killed ----------------------------- */

typedef enum {
  FL_CHILD_SETUP,       /* connect, plan, attach, start; then pause */
  FL_CHILD_ATTACH,      /* connect, plan, attach; then pause */
  FL_CHILD_CLEANUP,     /* fleece_cleanup from the record */
  FL_CHILD_BACKUP,      /* a whole backup: says "started" after
                         * fleece_start, and "done" once it succeeded and
                         * was cleaned up */
} FlChildJob;

typedef struct {
  FlChildJob job;
  uint64_t bwlimit;     /* KiB/s */
  const char *qmp;      /* NULL: the proxy */
  const char *storage;  /* NULL: the VM's */
  const char *state;    /* NULL: the VM's */
} FlChildSpec;

typedef struct {
  pid_t pid;
  int go;               /* write a byte to let it start */
  int done;             /* it writes a byte when its job is done */
} FlChild;

/* Fork the child; it waits for fl_child_run()/fl_child_go(). */
FlChild fl_child_fork (FlVm *vm, const FlChildSpec *spec);
/* Let it run until the proxy kills it or its job is done (then kill it:
 * the "after the last command" case).  Returns true if the proxy's kill
 * ended it, false if it finished its job.  Reaps it. */
bool fl_child_run (FlChild *c);
/* Let it run and wait until its job is done (it then pauses; a backup
 * child: until it started); false if it died instead (its exit status in
 * *status, if not NULL). */
bool fl_child_go (FlChild *c, int *status);
/* A backup child: wait for it to end; whether it said its backup
 * succeeded.  (Not its exit status: valgrind replaces that when it finds
 * the child's copies of the test's objects lost.) */
bool fl_child_wait (FlChild *c);
/* kill -9 and reap. */
void fl_child_kill (FlChild *c);

#endif
