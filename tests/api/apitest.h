/* Helpers of the small API tests in tests/api/ (libnbd's tests/ style:
 * one program per behaviour, exit 0 when it holds, 77 to skip when a
 * dependency cannot exist here, 1 with a message when it does not hold).
 * They link only the public library. */
#ifndef FLEECE_APITEST_H
#define FLEECE_APITEST_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>

#include <fleece/fleece.h>

/* Fail the test with a message unless cond holds. */
#define check(cond, ...) \
  do { \
    if (!(cond)) { \
      fprintf (stderr, "%s:%d: %s: ", __FILE__, __LINE__, #cond); \
      fprintf (stderr, __VA_ARGS__); \
      fprintf (stderr, "\n"); \
      exit (EXIT_FAILURE); \
    } \
  } while (0)

/* The last call failed with errnum (and its message contains substr). */
#define check_error(errnum, substr) \
  at_check_error (__FILE__, __LINE__, (errnum), (substr))
void at_check_error (const char *file, int line, int errnum,
                     const char *substr);

/* A scratch directory (0700) removed when the test exits. */
char *at_tmpdir (const char *tag);

/* A throwaway QEMU (no guest): q35, TCG, paused (-S), one raw disk of
 * size bytes (filled with a non-zero pattern when fill is true) on a
 * scsi-hd scsi0 with drive drive-scsi0; its QMP socket free for the
 * library.  Exits 77 if there is no QEMU ($FLEECE_QEMU, else
 * qemu-system-x86_64 on PATH).  Killed when the test exits. */
typedef struct {
  pid_t pid;
  char *dir;          /* scratch: socket, disk, storage, state, target */
  char *qmp;          /* QMP socket path */
  char *storage;      /* dir/storage (made, 0700) */
  char *state;        /* dir/state (not made) */
  char *target;       /* dir/target (made, 0700) */
} AtQemu;

AtQemu *at_qemu_start (uint64_t size, bool fill);
void at_qemu_stop (AtQemu *q);

/* A handle for VM 100 of q: state dir, directory storage, connected. */
struct fleece_handle *at_handle (AtQemu *q);
/* at_handle, planned and attached (*plan is the caller's). */
struct fleece_handle *at_attached (AtQemu *q, struct fleece_plan **plan);
/* at_attached, and a backup started into q's target dir, slowed to
 * kib_per_s so that it runs until cancelled. */
struct fleece_handle *at_running (AtQemu *q, struct fleece_plan **plan,
                                  uint64_t kib_per_s);

/* Monotonic milliseconds. */
int64_t at_now_ms (void);

#endif
