/* Test helpers for the Ceph RBD tests: a throwaway single-node Ceph
 * cluster per test program, and a minimal QEMU with a QMP client.
 *
 * The cluster comes from the script named by $FLEECE_CEPH_UP
 * ("ceph-up.sh [start] DIR" prints DIR/ceph.conf, "ceph-up.sh stop DIR"
 * ends it; one mon and one memstore OSD on 127.0.0.1, pool "rbd", cephx
 * with client.admin's key in DIR/keyring).  Without the script or the Ceph
 * packages, tests are skipped (exit 77) with the reason on stderr.
 *
 * The QEMU helper is deliberately independent of libfleece's QMP code, so
 * these tests keep working while the library core changes. */
#ifndef FLEECE_TL_CEPH_H
#define FLEECE_TL_CEPH_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <glib.h>
#include <json-c/json.h>

/* Exit status meson and automake take as "skipped". */
#define TL_SKIP 77

/* NULL when Ceph tests can run here, else why not (static string). */
const char *tl_ceph_skip_reason (void);
/* Print "SKIP: <reason>" and exit(TL_SKIP) unless Ceph tests can run. */
void tl_ceph_require (void);

typedef struct {
  char *dir;         /* the cluster's directory (made by the script) */
  char *conf;        /* DIR/ceph.conf */
  char *keyring;     /* DIR/keyring (client.admin) */
  char *admin_key;   /* client.admin's base64 key */
  char *mon_v1;      /* "127.0.0.1:<port>": the mon's msgr v1 address */
  char *mon_v2;      /* "127.0.0.1:<port>": the mon's msgr v2 address */
  char *pool;        /* "rbd" */
} TlCeph;

/* Start a cluster in a new scratch dir fleece-ceph-<tag>-XXXXXX; env is a
 * NULL-terminated list of extra "CEPH_UP_...=value" settings (may be NULL),
 * e.g. "CEPH_UP_STORE_MB=64".  The cluster is stopped by tl_ceph_stop, and
 * also when the process exits or gets SIGTERM/SIGINT/SIGALRM/SIGHUP
 * (meson's timeout), so no daemons outlive a test run.  Aborts the
 * program (exit 1) if the cluster does not come up. */
TlCeph *tl_ceph_start (const char *tag, const char *const *env);
void tl_ceph_stop (TlCeph *c);

/* Run a Ceph command line tool ("rbd", "ceph", "rados") against the
 * cluster (-c conf is prepended); returns its stdout (g_free) or NULL,
 * with its stderr in *errout (g_free, may be NULL). */
char *tl_ceph_cmd (TlCeph *c, char **errout, const char *tool, ...)
  G_GNUC_NULL_TERMINATED;
/* Same, aborting the test (ck_abort) if it fails. */
char *tl_ceph_cmd_ok (TlCeph *c, const char *tool, ...) G_GNUC_NULL_TERMINATED;

/* Set an option of the running OSD through its admin socket (no mgr
 * needed), e.g. osd_mon_report_interval. */
void tl_ceph_osd_config (TlCeph *c, const char *option, const char *value);

/* ---- a throwaway QEMU ------------------------------------------------ */

typedef struct {
  GPid pid;
  char *dir;          /* scratch dir: qmp.sock, qemu.log */
  char *log;          /* QEMU's stdout and stderr: HMP qemu-io prints here */
  int fd;             /* QMP socket */
  GString *buf;       /* unread bytes from QMP */
} TlcQemu;

/* qemu-system-x86_64 ($FLEECE_QEMU overrides) -machine q35 -accel tcg -S
 * -nodefaults -display none -qmp unix:<dir>/qmp.sock -device
 * virtio-scsi-pci,id=scsihw0 (plug scsi-hd disks into bus scsihw0.0);
 * capabilities negotiated.  Dies with the process that started it.  Aborts the test if
 * QEMU does not come up in 20 s. */
TlcQemu *tlc_qemu_start (void);
/* quit, then SIGKILL after 5 s; removes its dir. */
void tlc_qemu_stop (TlcQemu *q);
/* SIGKILL, as a crash would (no quit). */
void tlc_qemu_kill (TlcQemu *q);

/* A QMP command (args consumed, may be NULL): the "return" value (put it),
 * or NULL with the error's desc in *errmsg (g_free). */
json_object *tlc_qmp_try (TlcQemu *q, const char *cmd, json_object *args,
                          char **errmsg);
/* Same, aborting the test on a QMP error. */
json_object *tlc_qmp (TlcQemu *q, const char *cmd, json_object *args);
/* HMP command line; returns the HMP reply plus what QEMU printed on its
 * stdout meanwhile (g_free). */
char *tlc_hmp (TlcQemu *q, const char *line);
/* HMP qemu-io -d <qdev> "<cmd>", aborting the test if it reports an
 * error (e.g. "Pattern verification failed"). */
void tlc_qemu_io (TlcQemu *q, const char *qdev, const char *cmd);
/* Same on a BlockBackend without a device (HMP drive_add's), by name. */
void tlc_qemu_io_blk (TlcQemu *q, const char *blk, const char *cmd);
/* tlc_qemu_io's output (g_free), not judged. */
char *tlc_qemu_io_out (TlcQemu *q, const char *qdev, const char *cmd);

/* QEMU's output so far (bytes), and what it printed since (g_free):
 * qemu-io's aio_write prints "wrote ..." when the write completes. */
goffset tlc_qemu_log_size (TlcQemu *q);
char *tlc_qemu_log_since (TlcQemu *q, goffset from);

/* json_tokener_parse of a printf-formatted literal; aborts on bad JSON. */
json_object *tlc_json (const char *fmt, ...) G_GNUC_PRINTF (1, 2);

/* Scratch dir /tmp/fleece-<tag>-XXXXXX (or under $TMPDIR); rm -rf'd by
 * tlc_rmtree. */
char *tlc_tmpdir (const char *tag);
void tlc_rmtree (const char *dir);

#endif
