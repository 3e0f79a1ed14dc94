/* The handle (internal; only the top layer sees it: handle.c, state.c,
 * plan.c, lifecycle.c, status.c). */
#ifndef FLEECE_HANDLE_H
#define FLEECE_HANDLE_H

#include <signal.h>

#include "internal.h"
#include "engine.h"

G_BEGIN_DECLS

/* The run set up on a handle.  Every state but IDLE counts as "a run is
 * set up": settings that shape a run are refused, cleanup ends it. */
typedef enum {
  FLEECE_STATE_IDLE,
  FLEECE_STATE_ATTACHED,
  FLEECE_STATE_RUNNING,
  FLEECE_STATE_FINISHED,
  FLEECE_STATE_FAILED,
} FleeceState;

/* Every public call that takes a handle, for the permitted-states table
 * (state.c). */
typedef enum {
  CALL_CONNECT,
  CALL_SET_RUN,          /* settings that shape a run (vmid, storage, ...) */
  CALL_SET_UNTIL_START,  /* bwlimit, cbw-timeout */
  CALL_SET_ANY,          /* log/progress callbacks, QMP timeout */
  CALL_GET,              /* vmid, engine */
  CALL_PLAN,
  CALL_ATTACH,
  CALL_START,
  CALL_WAIT,
  CALL_RUN_INFO,         /* progress, stats, drive results */
  CALL_RECORD,           /* get_record, get_status */
  CALL_CLEANUP,
  CALL__COUNT,
} FleeceCall;

struct fleece_handle {
  pid_t pid;                    /* the process that owns the handle */
  FleeceSettings set;
  FleeceCallbacks cb;
  fleece_record_load_fn record_load;
  fleece_record_store_fn record_store;
  void *record_data;
  fleece_free_fn record_free;
  struct fleece_storage *storage;
  FleeceConn *conn;
  FleeceFeatures features;
  int engine;                   /* chosen at connect, -1 before */
  FleeceCtx ctx;                /* what engines see: points into the above */

  volatile sig_atomic_t state;  /* FleeceState; read by fleece_cancel() */
  volatile sig_atomic_t cancel_requested;
  int cancel_pipe[2];           /* readable once a cancel is requested */
  int lock_fd;
  FleeceRun run;
};

/* Check that call func (the public name, for errors) may run on h now:
 * h not NULL, the owning process, the state (table in state.c), a vmid
 * and a connection when the call needs them.  Sets the error if not. */
bool fleece_call_check (struct fleece_handle *h, FleeceCall call,
                        const char *func);
/* The record store h is configured with. */
FleeceRecordStore fleece_handle_record_store (struct fleece_handle *h);
/* The engine ops of h's engine. */
const FleeceEngineOps *fleece_handle_ops (struct fleece_handle *h);
/* The end of a call that talked to QEMU: let go of the monitor. */
void fleece_handle_release (struct fleece_handle *h);
/* Arm (or disarm) the cancel pipe for QMP waits. */
void fleece_handle_arm_cancel (struct fleece_handle *h, bool armed);

G_END_DECLS

#endif
