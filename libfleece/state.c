/* Which public call may run when: one table, checked in one place (as
 * libnbd's permitted_states).  fleece(3) prints the same table. */
#include <errno.h>
#include <unistd.h>

#include "handle.h"

#define S(x) (1u << FLEECE_STATE_##x)
#define ANY (S (IDLE) | S (ATTACHED) | S (RUNNING) | S (FINISHED) | S (FAILED))
#define SET_UP (S (ATTACHED) | S (RUNNING) | S (FINISHED) | S (FAILED))

enum { NEED_VMID = 1, NEED_QEMU = 2 };

static const struct {
  unsigned states;
  unsigned needs;
  const char *refusal;          /* why, when the state is not permitted */
} table[CALL__COUNT] = {
  [CALL_CONNECT]        = { S (IDLE), 0,
                            "a run is set up; call fleece_cleanup() first" },
  [CALL_SET_RUN]        = { S (IDLE), 0,
                            "cannot change settings while a run is set up "
                            "(until fleece_cleanup())" },
  [CALL_SET_UNTIL_START] = { S (IDLE) | S (ATTACHED), 0,
                             "the backup has started" },
  [CALL_SET_ANY]        = { ANY, 0, NULL },
  [CALL_GET]            = { ANY, 0, NULL },
  [CALL_PLAN]           = { ANY, NEED_VMID | NEED_QEMU, NULL },
  [CALL_ATTACH]         = { S (IDLE), NEED_VMID | NEED_QEMU,
                            "a run is already set up on this handle; call "
                            "fleece_cleanup() first" },
  [CALL_START]          = { S (ATTACHED), NEED_VMID | NEED_QEMU, NULL },
  [CALL_WAIT]           = { S (RUNNING) | S (FINISHED) | S (FAILED), NEED_VMID,
                            "no backup is running: call fleece_start() first" },
  [CALL_RUN_INFO]       = { SET_UP, 0, "no backup is set up" },
  [CALL_RECORD]         = { ANY, NEED_VMID, NULL },
  [CALL_CLEANUP]        = { ANY, NEED_VMID, NULL },
};

static const char *
start_refusal (FleeceState st)
{
  return st == FLEECE_STATE_IDLE
    ? "nothing attached: call fleece_attach() with this plan first"
    : "the backup was started already";
}

bool
fleece_call_check (struct fleece_handle *h, FleeceCall call, const char *func)
{
  FleeceState st;

  if (!h) {
    fleece_error_set (func, EINVAL, "the handle is NULL");
    return false;
  }
  /* A child after fork() shares the parent's lock fd and run: touching
   * either would tear down the parent's backup. */
  if (h->pid != getpid ()) {
    fleece_error_set (func, EPERM, "the handle belongs to process %ld; it "
                      "cannot be used after fork()", (long) h->pid);
    return false;
  }
  st = (FleeceState) h->state;
  if (!(table[call].states & (1u << st))) {
    fleece_error_set (func, call == CALL_START || call == CALL_WAIT ? EINVAL : EBUSY,
                      "%s", call == CALL_START ? start_refusal (st) : table[call].refusal);
    return false;
  }
  if ((table[call].needs & NEED_VMID) && !h->set.vmid) {
    fleece_error_set (func, EINVAL, "no vmid: call fleece_set_vmid() first");
    return false;
  }
  if ((table[call].needs & NEED_QEMU) && !fleece_conn_configured (h->conn)) {
    fleece_error_set (func, ENOTCONN, "not connected: call fleece_connect() first");
    return false;
  }
  return true;
}
