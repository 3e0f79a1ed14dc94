/* Fleece.xs - the XS layer of the Perl binding of libfleece 1.0.
 *
 * Thin on purpose: one Perl package per C object and one method per C
 * function, named after it (fleece_set_vmid -> Fleece::Raw::Handle::set_vmid,
 * fleece_plan_get_key -> Fleece::Raw::Plan::get_key).  Options given by name,
 * plans as Perl data, JSON and fork safety live in lib/Fleece.pm.
 *
 * What the XS does that the .pm cannot:
 *  - Objects are blessed scalar refs holding a C pointer; DESTROY frees and
 *    zeroes it.  A method keeps its object alive until the calling statement
 *    ends, so a callback that drops the last reference cannot free a handle
 *    or plan the library is still using.
 *  - A failed call croaks with a Fleece::Error object (lib/Fleece/Error.pm):
 *    the library's message without the C function name in front, its errno
 *    and that function, after freeing what the XS allocated for it.
 *  - Callbacks are Perl code refs called through trampolines under G_EVAL,
 *    each registered with the library together with a free function that
 *    drops the binding's reference to the code: the library decides when a
 *    callback is gone, the .pm pins nothing.  An exception in a callback
 *    that can fail (storage, record) becomes the failure's reason string
 *    and errno (a Fleece::Error's code, else errno if the Perl code left
 *    one, else EIO by the library); the exceptions of log and progress
 *    callbacks, which cannot fail a call, are passed to warn() once per
 *    call.
 *  - wait() waits in slices of the library's own poll interval and runs
 *    Perl's deferred signal handlers between them, so that a %SIG handler
 *    calling cancel() (which is async-signal-safe in the library) or dying
 *    ends a wait without timeout.
 *  - The handle remembers the pid that made it: in another process (after
 *    fork) no Perl callback runs, and DESTROY only releases the child's
 *    copies of the socket and lock file descriptors, which does not disturb
 *    QEMU or the parent's run (flock locks belong to the open file, which
 *    the parent still holds). */

#define PERL_NO_GET_CONTEXT
#include "EXTERN.h"
#include "perl.h"
#include "XSUB.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <fleece/fleece.h>

/* fleece_wait() looks at the backup every 250 ms and lets go of the monitor
 * in between: a slice of the same length adds no QMP traffic. */
#define PF_WAIT_SLICE_MS 250

/* A handle. */
typedef struct {
  struct fleece_handle *h;
  pid_t pid;            /* the process that created it */
  bool busy;            /* inside a library call */
  SV *warnings;         /* exceptions of log/progress callbacks, this call */
} PFHandle;

/* The user data of a log or progress callback. */
typedef struct {
  SV *cb;
  PFHandle *ph;         /* outlives it: fleece_free() frees this first */
} PFCallback;

/* The user data of the record callbacks. */
typedef struct {
  SV *load;
  SV *store;
  pid_t pid;
} PFRecord;

/* The user data of a callback storage; the storage owns it. */
typedef struct {
  SV *alloc;
  SV *remove;
  SV *path;
  SV *blockdev;
  pid_t pid;
} PFStorageCb;

/* A storage until fleece_set_storage() takes it. */
typedef struct {
  struct fleece_storage *st;
  PFStorageCb *cb;      /* NULL for built-in storages */
} PFStorage;

typedef struct fleece_plan PFPlan;
typedef struct fleece_target PFTarget;

/* Argument types with checks (see typemap). */
typedef uint32_t PF_U32;
typedef uint64_t PF_U64;
typedef unsigned PF_UINT;
typedef int PF_INT;
typedef const char *PF_STR;     /* a defined string without NUL bytes */
typedef const char *PF_OPTSTR;  /* the same, or undef for NULL */
typedef SV *PF_CODE;            /* a code ref or undef */

/* ---- errors ------------------------------------------------------------ */

/* Croak with a Fleece::Error: the library's "fleece_xxx: message" split
 * into the function and the message an admin reads. */
static void
pf_croak_error (pTHX_ const char *msg, int errnum)
{
  HV *hv = newHV ();
  const char *rest = msg ? msg : "unknown error (libfleece gave no message)";
  SV *fn = newSV (0);
  SV *rv;

  if (msg && strncmp (msg, "fleece_", 7) == 0) {
    const char *sep = strstr (msg, ": ");
    size_t n = sep ? (size_t) (sep - msg) : 0;

    if (sep && strspn (msg, "abcdefghijklmnopqrstuvwxyz0123456789_") == n) {
      sv_setpvn (fn, msg, n);
      rest = sep + 2;
    }
  }
  hv_stores (hv, "message", newSVpv (rest, 0));
  hv_stores (hv, "code", newSViv (errnum));
  hv_stores (hv, "function", fn);
  rv = sv_bless (newRV_noinc ((SV *) hv), gv_stashpvs ("Fleece::Error", GV_ADD));
  croak_sv (sv_2mortal (rv));
}

/* Croak with the library's last error. */
static void
pf_fail (pTHX)
{
  pf_croak_error (aTHX_ fleece_get_error (), fleece_get_errno ());
}

/* ---- argument conversion -------------------------------------------- */

static void *
pf_unwrap (pTHX_ SV *sv, const char *class, const char *what)
{
  SV *obj;
  void *p;

  if (!sv_isobject (sv) || !sv_derived_from (sv, class))
    croak ("Fleece: %s is not a %s object\n", what, class);
  obj = SvRV (sv);
  p = INT2PTR (void *, SvIV (obj));
  if (!p)
    croak ("Fleece: this %s has been freed or given away\n", class);
  /* Alive until the caller's statement ends, whatever callbacks do. */
  SvREFCNT_inc_simple_void_NN (obj);
  sv_2mortal (obj);
  return p;
}

static UV
pf_sv_to_uv (pTHX_ SV *sv, UV max, const char *what)
{
  UV v = 0;
  bool ok = false;

  SvGETMAGIC (sv);
  if (!SvOK (sv))
    ;
  else if (SvIOK (sv)) {
    if (SvIsUV (sv)) {
      v = SvUVX (sv);
      ok = true;
    } else if (SvIVX (sv) >= 0) {
      v = (UV) SvIVX (sv);
      ok = true;
    }
  } else if (SvNOK (sv)) {
    NV n = SvNVX (sv);
    if (n >= 0 && n <= (NV) max && n == (NV) (UV) n) {
      v = (UV) n;
      ok = true;
    }
  } else {
    STRLEN len;
    const char *s = SvPV_nomg (sv, len);
    int f = grok_number (s, len, &v);

    ok = (f & IS_NUMBER_IN_UV) &&
         !(f & (IS_NUMBER_NEG | IS_NUMBER_NOT_INT | IS_NUMBER_GREATER_THAN_UV_MAX |
                IS_NUMBER_INFINITY | IS_NUMBER_NAN));
  }
  if (!ok || v > max)
    croak ("Fleece: %s must be an integer from 0 to %" UVuf ", not '%" SVf "'\n",
           what, max, SVfARG (SvOK (sv) ? sv : sv_2mortal (newSVpvs ("undef"))));
  return v;
}

static int
pf_sv_to_int (pTHX_ SV *sv, const char *what)
{
  IV v = 0;
  bool ok = false;

  SvGETMAGIC (sv);
  if (SvOK (sv) && looks_like_number (sv)) {
    NV n = SvNV_nomg (sv);
    v = SvIV_nomg (sv);
    ok = n == (NV) v && v >= INT_MIN && v <= INT_MAX;
  }
  if (!ok)
    croak ("Fleece: %s must be an integer from %d to %d, not '%" SVf "'\n",
           what, INT_MIN, INT_MAX,
           SVfARG (SvOK (sv) ? sv : sv_2mortal (newSVpvs ("undef"))));
  return (int) v;
}

static const char *
pf_sv_to_str (pTHX_ SV *sv, bool nullable, const char *what)
{
  STRLEN len;
  const char *s;

  SvGETMAGIC (sv);
  if (!SvOK (sv)) {
    if (nullable)
      return NULL;
    croak ("Fleece: %s is undefined\n", what);
  }
  s = SvPV_nomg (sv, len);
  if (memchr (s, '\0', len))
    croak ("Fleece: %s contains a NUL byte\n", what);
  return s;
}

static SV *
pf_sv_to_code (pTHX_ SV *sv, const char *what)
{
  SvGETMAGIC (sv);
  if (!SvOK (sv))
    return NULL;
  if (!SvROK (sv) || SvTYPE (SvRV (sv)) != SVt_PVCV)
    croak ("Fleece: the %s callback must be a code reference\n", what);
  return sv;
}

/* ---- calls into the library --------------------------------------------- */

/* Pass on what the log and progress callbacks threw during the call. */
static void
pf_flush_warnings (pTHX_ PFHandle *ph)
{
  SV *w = ph->warnings;

  ph->warnings = NULL;
  if (w) {
    sv_2mortal (w);
    warn ("Fleece: %" SVf "\n", SVfARG (w));
  }
}

static void
pf_enter (pTHX_ PFHandle *ph)
{
  if (ph->busy)
    croak ("Fleece: the handle's methods cannot be called from its own "
           "callbacks\n");
  /* Left by a wait() a signal handler died out of. */
  pf_flush_warnings (aTHX_ ph);
  ph->busy = true;
}

/* End a call: croak with the library's error if it failed. */
static void
pf_leave (pTHX_ PFHandle *ph, bool failed)
{
  ph->busy = false;
  pf_flush_warnings (aTHX_ ph);
  if (failed)
    pf_fail (aTHX);
}

/* ---- callbacks ------------------------------------------------------------ */

/* Whether Perl code may run for an object made in process pid: not in a
 * forked child, and not during global destruction (the callback's closure
 * may be half torn down). */
static bool
pf_may_call (pTHX_ pid_t pid)
{
  return pid == getpid () && PL_phase != PERL_PHASE_DESTRUCT;
}

/* A malloc'd copy of an SV's text without trailing newlines (die messages
 * end with one); the library releases it with free(). */
static char *
pf_text (pTHX_ SV *sv)
{
  STRLEN len;
  const char *s = SvPV (sv, len);
  char *out;

  while (len && (s[len - 1] == '\n' || s[len - 1] == '\r'))
    len--;
  out = malloc (len + 1);
  if (out) {
    memcpy (out, s, len);
    out[len] = '\0';
    /* The library's messages are one line. */
    for (char *c = out; (c = strchr (c, '\n')); )
      *c = ' ';
  }
  return out;
}

static char *
pf_reason (const char *fmt, ...)
{
  va_list ap;
  char *s;
  int n;

  va_start (ap, fmt);
  n = vsnprintf (NULL, 0, fmt, ap);
  va_end (ap);
  if (n < 0 || !(s = malloc ((size_t) n + 1)))
    return NULL;
  va_start (ap, fmt);
  vsnprintf (s, (size_t) n + 1, fmt, ap);
  va_end (ap);
  return s;
}

/* Why a callback may not run, as its failure's reason (NULL: it may). */
static char *
pf_refusal (pTHX_ pid_t pid, const char *what)
{
  if (pf_may_call (aTHX_ pid))
    return NULL;
  if (pid != getpid ())
    return pf_reason ("the Perl %s callback was not run: it belongs to "
                      "process %ld, this is %ld (fork)", what, (long) pid,
                      (long) getpid ());
  return pf_reason ("the Perl %s callback was not run: Perl is in global "
                    "destruction (clean up before the program ends)", what);
}

/* The errno a dying callback stands for: a Fleece::Error's code, else what
 * the Perl code left in errno ($!), else 0 (the library says EIO). */
static int
pf_exception_errno (pTHX_ SV *e, int saved)
{
  if (sv_isobject (e) && sv_derived_from (e, "Fleece::Error") &&
      SvTYPE (SvRV (e)) == SVt_PVHV) {
    SV **code = hv_fetchs ((HV *) SvRV (e), "code", 0);
    if (code && SvIOK (*code) && SvIV (*code) > 0)
      return (int) SvIV (*code);
  }
  return saved;
}

/* Call cb with the arguments the caller pushed (after ENTER, SAVETMPS,
 * PUSHMARK), in scalar context, catching exceptions.  Returns a copy of the
 * result (the caller owns it), or NULL if cb died; then *reason (if
 * reason) is the exception's text and *err its errno, else the exception
 * is noted on ph (if ph) for warn().  $@ and errno are left as they were. */
static SV *
pf_call (pTHX_ SV *cb, PFHandle *ph, const char *what, char **reason,
         int *err)
{
  dSP;
  SV *ret = NULL;
  int count, saved = errno, e;

  save_scalar (PL_errgv);
  errno = 0;
  count = call_sv (cb, G_SCALAR | G_EVAL);
  e = errno;
  SPAGAIN;
  if (SvTRUE (ERRSV)) {
    if (reason) {
      *reason = pf_text (aTHX_ ERRSV);
      *err = pf_exception_errno (aTHX_ ERRSV, e);
    } else if (ph) {
      SV *msg = sv_2mortal (newSVpvf ("the Perl %s callback died: ", what));
      char *t = pf_text (aTHX_ ERRSV);

      sv_catpv (msg, t ? t : "?");
      free (t);
      /* A callback that dies every time (progress, say) is reported once. */
      if (!ph->warnings)
        ph->warnings = newSVsv (msg);
      else if (!ninstr (SvPVX (ph->warnings), SvEND (ph->warnings), SvPVX (msg), SvEND (msg))) {
        sv_catpvs (ph->warnings, "; ");
        sv_catsv (ph->warnings, msg);
      }
    }
  } else if (count == 1)
    ret = newSVsv (TOPs);
  SP -= count;
  PUTBACK;
  errno = saved;
  return ret;
}

/* A malloc'd copy of a string result, or NULL with *reason saying why. */
static char *
pf_result_str (pTHX_ SV *ret, const char *what, const char *expected,
               char **reason)
{
  STRLEN len;
  const char *s;

  if (!SvOK (ret)) {
    *reason = pf_reason ("the Perl %s callback returned undef, not %s", what,
                         expected);
    return NULL;
  }
  s = SvPV (ret, len);
  if (len == 0 || memchr (s, '\0', len)) {
    *reason = pf_reason ("the Perl %s callback returned %s, not %s", what,
                         len ? "a string with a NUL byte" : "an empty string",
                         expected);
    return NULL;
  }
  return strdup (s);
}

/* The end of a failed trampoline: errno for the library (0: it says EIO). */
static void
pf_failed (int err)
{
  errno = err;
}

static const char *const level_names[] = { "error", "warning", "info", "debug" };

static void
pf_log_cb (void *opaque, int level, const char *msg)
{
  PFCallback *c = opaque;
  dTHX;
  SV *ret;

  if (!pf_may_call (aTHX_ c->ph->pid)) {
    /* At exit a warning such as "handle freed with a run still set up"
     * must not be lost. */
    if (c->ph->pid == getpid () && level >= 0 && level <= FLEECE_LOG_WARNING)
      warn ("Fleece: %s: %s\n", level_names[level], msg);
    return;
  }
  {
    dSP;
    ENTER;
    SAVETMPS;
    PUSHMARK (SP);
    EXTEND (SP, 2);
    mPUSHi (level);
    mPUSHp (msg, strlen (msg));
    PUTBACK;
    ret = pf_call (aTHX_ c->cb, c->ph, "log", NULL, NULL);
    FREETMPS;
    LEAVE;
  }
  SvREFCNT_dec (ret);
}

static void
pf_progress_cb (void *opaque, const char *drive, uint64_t done, uint64_t total)
{
  PFCallback *c = opaque;
  dTHX;
  SV *ret;

  if (!pf_may_call (aTHX_ c->ph->pid))
    return;
  {
    dSP;
    ENTER;
    SAVETMPS;
    PUSHMARK (SP);
    EXTEND (SP, 3);
    mPUSHp (drive, strlen (drive));
    mPUSHu ((UV) done);
    mPUSHu ((UV) total);
    PUTBACK;
    ret = pf_call (aTHX_ c->cb, c->ph, "progress", NULL, NULL);
    FREETMPS;
    LEAVE;
  }
  SvREFCNT_dec (ret);
}

static void
pf_callback_free (void *opaque)
{
  PFCallback *c = opaque;
  dTHX;

  SvREFCNT_dec (c->cb);
  Safefree (c);
}

static int
pf_record_load_cb (void *opaque, uint32_t vmid, char **json, char **reason)
{
  PFRecord *r = opaque;
  dTHX;
  SV *ret;
  int err = 0;

  *json = NULL;
  if ((*reason = pf_refusal (aTHX_ r->pid, "record load")))
    goto fail;
  {
    dSP;
    ENTER;
    SAVETMPS;
    PUSHMARK (SP);
    mXPUSHu ((UV) vmid);
    PUTBACK;
    ret = pf_call (aTHX_ r->load, NULL, "record load", reason, &err);
    FREETMPS;
    LEAVE;
  }
  if (!ret)
    goto fail;
  /* undef: there is no record. */
  if (SvOK (ret) && !(*json = pf_result_str (aTHX_ ret, "record load",
                                             "the record", reason)))
    err = EINVAL;
  SvREFCNT_dec (ret);
  if (*reason)
    goto fail;
  return 0;

 fail:
  pf_failed (err);
  return -1;
}

static int
pf_record_store_cb (void *opaque, uint32_t vmid, const char *json,
                    char **reason)
{
  PFRecord *r = opaque;
  dTHX;
  SV *ret;
  int err = 0;

  if ((*reason = pf_refusal (aTHX_ r->pid, "record store")))
    goto fail;
  {
    dSP;
    ENTER;
    SAVETMPS;
    PUSHMARK (SP);
    EXTEND (SP, 2);
    mPUSHu ((UV) vmid);
    if (json)
      mPUSHp (json, strlen (json));
    else
      PUSHs (&PL_sv_undef);
    PUTBACK;
    ret = pf_call (aTHX_ r->store, NULL, "record store", reason, &err);
    FREETMPS;
    LEAVE;
  }
  if (!ret)
    goto fail;
  SvREFCNT_dec (ret);
  return 0;

 fail:
  pf_failed (err);
  return -1;
}

static void
pf_record_free (void *opaque)
{
  PFRecord *r = opaque;
  dTHX;

  SvREFCNT_dec (r->load);
  SvREFCNT_dec (r->store);
  Safefree (r);
}

/* Call a storage callback with string arguments (and, for alloc, a size);
 * the copy of its result, or NULL with *reason and *err. */
static SV *
pf_storage_call (pTHX_ PFStorageCb *s, SV *cb, const char *what,
                 const char *a1, const char *a2, const uint64_t *size,
                 char **reason, int *err)
{
  SV *ret;

  *err = 0;
  if ((*reason = pf_refusal (aTHX_ s->pid, what)))
    return NULL;
  {
    dSP;
    ENTER;
    SAVETMPS;
    PUSHMARK (SP);
    EXTEND (SP, 3);
    mPUSHp (a1, strlen (a1));
    if (a2)
      mPUSHp (a2, strlen (a2));
    if (size)
      mPUSHu ((UV) *size);
    PUTBACK;
    ret = pf_call (aTHX_ cb, NULL, what, reason, err);
    FREETMPS;
    LEAVE;
  }
  return ret;
}

static int
pf_storage_alloc_cb (void *opaque, const char *name, const char *format,
                     uint64_t size, char **volid, char **reason)
{
  PFStorageCb *s = opaque;
  dTHX;
  int err;
  SV *ret = pf_storage_call (aTHX_ s, s->alloc, "storage alloc", name, format,
                             &size, reason, &err);

  if (ret) {
    *volid = pf_result_str (aTHX_ ret, "storage alloc", "a volume id", reason);
    SvREFCNT_dec (ret);
    if (*volid)
      return 0;
    err = EINVAL;
  }
  pf_failed (err);
  return -1;
}

static int
pf_storage_remove_cb (void *opaque, const char *volid, char **reason)
{
  PFStorageCb *s = opaque;
  dTHX;
  int err;
  SV *ret = pf_storage_call (aTHX_ s, s->remove, "storage remove", volid, NULL,
                             NULL, reason, &err);

  if (ret) {
    SvREFCNT_dec (ret);
    return 0;
  }
  pf_failed (err);
  return -1;
}

/* path and blockdev: a string result, or NULL. */
static char *
pf_storage_string_cb (PFStorageCb *s, SV *cb, const char *what,
                      const char *expected, const char *volid, char **reason)
{
  dTHX;
  int err;
  char *out = NULL;
  SV *ret = pf_storage_call (aTHX_ s, cb, what, volid, NULL, NULL, reason, &err);

  if (ret) {
    out = pf_result_str (aTHX_ ret, what, expected, reason);
    SvREFCNT_dec (ret);
    err = EINVAL;
  }
  if (!out)
    pf_failed (err);
  return out;
}

static char *
pf_storage_path_cb (void *opaque, const char *volid, char **reason)
{
  PFStorageCb *s = opaque;
  return pf_storage_string_cb (s, s->path, "storage path", "a path", volid, reason);
}

/* The .pm encodes a hash ref as JSON before it gets here. */
static char *
pf_storage_blockdev_cb (void *opaque, const char *volid, char **reason)
{
  PFStorageCb *s = opaque;
  return pf_storage_string_cb (s, s->blockdev, "storage blockdev",
                               "a blockdev definition", volid, reason);
}

static void
pf_storage_cb_free (void *opaque)
{
  PFStorageCb *s = opaque;
  dTHX;

  SvREFCNT_dec (s->alloc);
  SvREFCNT_dec (s->remove);
  SvREFCNT_dec (s->path);
  SvREFCNT_dec (s->blockdev);
  Safefree (s);
}

/* Replace *slot with a copy of the code ref cb (or NULL). */
static void
pf_keep (pTHX_ SV **slot, SV *cb)
{
  SV *old = *slot;

  *slot = cb ? newSVsv (cb) : NULL;
  SvREFCNT_dec (old);
}

static SV *
pf_wrap (pTHX_ const char *class, void *p)
{
  return sv_setref_pv (newSV (0), class, p);
}

/* A callback storage that has not been given to a handle yet. */
static PFStorageCb *
pf_storage_cb (pTHX_ SV *self)
{
  PFStorage *ps = pf_unwrap (aTHX_ self, "Fleece::Raw::Storage", "storage");

  if (!ps->cb)
    croak ("Fleece: only a callback storage takes callbacks\n");
  return ps->cb;
}

/* wait() in slices; between them Perl's deferred signal handlers run (and
 * may cancel, or die out of the wait). */
static double
pf_now_ms (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

static void
pf_not_busy (pTHX_ void *p)
{
  ((PFHandle *) p)->busy = false;
}

static int
pf_wait (pTHX_ PFHandle *ph, int timeout_ms)
{
  double deadline = pf_now_ms () + timeout_ms;
  int r;

  pf_enter (aTHX_ ph);
  /* A signal handler may die out of this: the handle is usable again. */
  ENTER;
  SAVEDESTRUCTOR_X (pf_not_busy, ph);
  for (;;) {
    int slice = PF_WAIT_SLICE_MS;

    if (timeout_ms >= 0) {
      double left = deadline - pf_now_ms ();
      slice = left <= 0 ? 0 : left < slice ? (int) left : slice;
    }
    r = fleece_wait (ph->h, slice);
    if (r != 0 || slice < PF_WAIT_SLICE_MS)
      break;
    /* Not busy meanwhile: a handler may call the handle's methods. */
    ph->busy = false;
    PERL_ASYNC_CHECK ();
    ph->busy = true;
  }
  LEAVE;
  pf_leave (aTHX_ ph, r < 0);
  return r;
}

MODULE = Fleece		PACKAGE = Fleece::Raw		PREFIX = fleece_

PROTOTYPES: DISABLE

BOOT:
{
  HV *stash = gv_stashpv ("Fleece", GV_ADD);
#define C(name, value) newCONSTSUB (stash, name, newSViv (value))
  /* t/api-coverage.t checks that every numeric macro of fleece.h is here. */
  C ("VERSION_MAJOR", FLEECE_VERSION_MAJOR);
  C ("VERSION_MINOR", FLEECE_VERSION_MINOR);
  C ("LOG_ERROR", FLEECE_LOG_ERROR);
  C ("LOG_WARNING", FLEECE_LOG_WARNING);
  C ("LOG_INFO", FLEECE_LOG_INFO);
  C ("LOG_DEBUG", FLEECE_LOG_DEBUG);
  C ("STORAGE_QCOW2", FLEECE_STORAGE_QCOW2);
  C ("STORAGE_DISCARD", FLEECE_STORAGE_DISCARD);
  C ("STORAGE_PATH", FLEECE_STORAGE_PATH);
  C ("ENGINE_AUTO", FLEECE_ENGINE_AUTO);
  C ("ENGINE_QEMU", FLEECE_ENGINE_QEMU);
  C ("ENGINE_PVE", FLEECE_ENGINE_PVE);
  C ("PLAN_ALL_DRIVES", FLEECE_PLAN_ALL_DRIVES);
  C ("PLAN_NO_FLEECING", FLEECE_PLAN_NO_FLEECING);
  C ("PLAN_FLEECING_OPTIONAL", FLEECE_PLAN_FLEECING_OPTIONAL);
  C ("BITMAP_USE", FLEECE_BITMAP_USE);
  C ("BITMAP_NEW", FLEECE_BITMAP_NEW);
  C ("STAT_DONE", FLEECE_STAT_DONE);
  C ("STAT_TOTAL", FLEECE_STAT_TOTAL);
  C ("STAT_ZERO", FLEECE_STAT_ZERO);
  C ("STAT_REUSED", FLEECE_STAT_REUSED);
  C ("STAT_DIRTY", FLEECE_STAT_DIRTY);
  C ("STAT_FINISHING", FLEECE_STAT_FINISHING);
  C ("STAT_ELAPSED_MS", FLEECE_STAT_ELAPSED_MS);
#undef C
}

const char *
fleece_get_version ()

const char *
fleece_get_error ()

int
fleece_get_errno ()


MODULE = Fleece		PACKAGE = Fleece::Raw::Handle

SV *
new (const char *class)
  PREINIT:
    PFHandle *ph;
    struct fleece_handle *h;
  CODE:
    if (!(h = fleece_new ()))
      pf_fail (aTHX);
    Newxz (ph, 1, PFHandle);
    ph->h = h;
    ph->pid = getpid ();
    RETVAL = pf_wrap (aTHX_ class, ph);
  OUTPUT:
    RETVAL

void
DESTROY (SV *self)
  PREINIT:
    PFHandle *ph;
  CODE:
    ph = INT2PTR (PFHandle *, SvIV (SvRV (self)));
    if (!ph)
      XSRETURN_EMPTY;
    sv_setiv (SvRV (self), 0);
    /* Frees the callbacks' user data (their free functions); in a forked
     * child the callbacks are muted (pf_may_call), so this only closes the
     * child's copies of the descriptors and frees memory. */
    fleece_free (ph->h);
    if (ph->warnings && pf_may_call (aTHX_ ph->pid))
      warn ("Fleece: %" SVf "\n", SVfARG (ph->warnings));
    SvREFCNT_dec (ph->warnings);
    Safefree (ph);

void
connect (PFHandle *ph, PF_STR qmp_path)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_connect (ph->h, qmp_path) < 0);

void
connect_fd (PFHandle *ph, PF_INT fd)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_connect_fd (ph->h, fd) < 0);

void
set_vmid (PFHandle *ph, PF_U32 vmid)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_set_vmid (ph->h, vmid) < 0);

IV
get_vmid (PFHandle *ph)
  CODE:
    if ((RETVAL = fleece_get_vmid (ph->h)) < 0)
      pf_fail (aTHX);
  OUTPUT:
    RETVAL

void
set_state_dir (PFHandle *ph, PF_STR dir)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_set_state_dir (ph->h, dir) < 0);

void
set_storage (PFHandle *ph, SV *storage)
  PREINIT:
    PFStorage *ps;
    int r;
  CODE:
    ps = pf_unwrap (aTHX_ storage, "Fleece::Raw::Storage", "storage");
    pf_enter (aTHX_ ph);
    r = fleece_set_storage (ph->h, ps->st);
    /* The handle took it, also on failure. */
    ps->st = NULL;
    ps->cb = NULL;
    sv_setiv (SvRV (storage), 0);
    Safefree (ps);
    pf_leave (aTHX_ ph, r < 0);

void
set_engine (PFHandle *ph, PF_INT engine)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_set_engine (ph->h, engine) < 0);

int
get_engine (PFHandle *ph)
  CODE:
    if ((RETVAL = fleece_get_engine (ph->h)) < 0)
      pf_fail (aTHX);
  OUTPUT:
    RETVAL

void
set_qmp_timeout (PFHandle *ph, PF_UINT timeout_ms)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_set_qmp_timeout (ph->h, timeout_ms) < 0);

void
set_drives (PFHandle *ph, SV *keys)
  PREINIT:
    AV *av;
    const char **list;
    SSize_t n, i;
    int r;
  CODE:
    SvGETMAGIC (keys);
    if (!SvOK (keys)) {
      pf_enter (aTHX_ ph);
      pf_leave (aTHX_ ph, fleece_set_drives (ph->h, NULL) < 0);
      XSRETURN_EMPTY;
    }
    if (!SvROK (keys) || SvTYPE (SvRV (keys)) != SVt_PVAV)
      croak ("Fleece: drives must be an array reference of drive keys or undef\n");
    av = (AV *) SvRV (keys);
    n = av_top_index (av) + 1;
    /* Freed at the end of the statement, also when croaking. */
    Newxz (list, n + 1, const char *);
    SAVEFREEPV (list);
    for (i = 0; i < n; i++) {
      SV **e = av_fetch (av, i, 0);
      list[i] = pf_sv_to_str (aTHX_ e ? *e : &PL_sv_undef, false, "a drive key");
    }
    pf_enter (aTHX_ ph);
    r = fleece_set_drives (ph->h, list);
    pf_leave (aTHX_ ph, r < 0);

void
set_plan_flags (PFHandle *ph, PF_UINT flags)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_set_plan_flags (ph->h, flags) < 0);

void
set_image_format (PFHandle *ph, PF_OPTSTR format)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_set_image_format (ph->h, format) < 0);

void
set_bwlimit (PFHandle *ph, PF_U64 kib_per_s)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_set_bwlimit (ph->h, kib_per_s) < 0);

void
set_bitmap (PFHandle *ph, PF_OPTSTR name, PF_INT mode)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_set_bitmap (ph->h, name, mode) < 0);

void
set_cbw_timeout (PFHandle *ph, PF_UINT seconds)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_set_cbw_timeout (ph->h, seconds) < 0);

void
set_log_callback (PFHandle *ph, PF_CODE cb)
  ALIAS:
    set_progress_callback = 1
  PREINIT:
    PFCallback *c = NULL;
    int r;
  CODE:
    pf_enter (aTHX_ ph);
    if (cb) {
      Newxz (c, 1, PFCallback);
      c->cb = newSVsv (cb);
      c->ph = ph;
    }
    r = ix == 0
      ? fleece_set_log_callback (ph->h, c ? pf_log_cb : NULL, c, c ? pf_callback_free : NULL)
      : fleece_set_progress_callback (ph->h, c ? pf_progress_cb : NULL, c,
                                      c ? pf_callback_free : NULL);
    if (r < 0 && c)
      pf_callback_free (c);     /* not taken */
    pf_leave (aTHX_ ph, r < 0);

void
set_record_callback (PFHandle *ph, PF_CODE load, PF_CODE store)
  PREINIT:
    PFRecord *rec = NULL;
    int r;
  CODE:
    pf_enter (aTHX_ ph);
    if (load || store) {
      Newxz (rec, 1, PFRecord);
      rec->pid = getpid ();
      rec->load = load ? newSVsv (load) : NULL;
      rec->store = store ? newSVsv (store) : NULL;
    }
    r = fleece_set_record_callback (ph->h, load ? pf_record_load_cb : NULL,
                                    store ? pf_record_store_cb : NULL, rec,
                                    rec ? pf_record_free : NULL);
    if (r < 0 && rec)
      pf_record_free (rec);
    pf_leave (aTHX_ ph, r < 0);

SV *
plan (PFHandle *ph)
  PREINIT:
    PFPlan *p;
  CODE:
    pf_enter (aTHX_ ph);
    p = fleece_plan (ph->h);
    pf_leave (aTHX_ ph, p == NULL);
    RETVAL = pf_wrap (aTHX_ "Fleece::Raw::Plan", p);
  OUTPUT:
    RETVAL

void
attach (PFHandle *ph, PFPlan *p, PF_UINT flags)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_attach (ph->h, p, flags) < 0);

void
start (PFHandle *ph, PFPlan *p, PFTarget *t, PF_UINT flags)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_start (ph->h, p, t, flags) < 0);

int
wait (PFHandle *ph, PF_INT timeout_ms)
  CODE:
    RETVAL = pf_wait (aTHX_ ph, timeout_ms);
  OUTPUT:
    RETVAL

int
cancel (PFHandle *ph)
  CODE:
    /* No busy check and no croak: this is what a %SIG handler calls, also
     * while wait() runs.  0: no run is set up (nothing to cancel). */
    if (fleece_cancel (ph->h) == 0)
      RETVAL = 1;
    else if (errno == EINVAL)
      RETVAL = 0;
    else
      pf_croak_error (aTHX_ errno == EPERM
                      ? "fleece_cancel: the handle belongs to another process (fork)"
                      : "fleece_cancel: cannot cancel", errno);
  OUTPUT:
    RETVAL

void
get_progress (PFHandle *ph)
  PREINIT:
    uint64_t done = 0, total = 0;
  PPCODE:
    if (fleece_get_progress (ph->h, &done, &total) < 0)
      pf_fail (aTHX);
    EXTEND (SP, 2);
    mPUSHu ((UV) done);
    mPUSHu ((UV) total);

void
get_drive_progress (PFHandle *ph, PF_STR key)
  PREINIT:
    uint64_t done = 0, total = 0;
  PPCODE:
    if (fleece_get_drive_progress (ph->h, key, &done, &total) < 0)
      pf_fail (aTHX);
    EXTEND (SP, 2);
    mPUSHu ((UV) done);
    mPUSHu ((UV) total);

SV *
get_stat (PFHandle *ph, PF_OPTSTR key, PF_INT stat)
  PREINIT:
    uint64_t v = 0;
  CODE:
    /* A figure the engine does not know is undef, not a failure. */
    if (fleece_get_stat (ph->h, key, stat, &v) == 0)
      RETVAL = newSVuv ((UV) v);
    else if (fleece_get_errno () == ENOTSUP)
      RETVAL = &PL_sv_undef;
    else
      pf_fail (aTHX);
  OUTPUT:
    RETVAL

SV *
get_drive_result (PFHandle *ph, PF_STR key)
  PREINIT:
    const char *r;
  CODE:
    r = fleece_get_drive_result (ph->h, key);
    /* Still running (EAGAIN) is not a failure: undef. */
    if (!r && fleece_get_errno () != EAGAIN)
      pf_fail (aTHX);
    RETVAL = r ? newSVpv (r, 0) : &PL_sv_undef;
  OUTPUT:
    RETVAL

IV
get_drive_elapsed_ms (PFHandle *ph, PF_STR key)
  CODE:
    if ((RETVAL = fleece_get_drive_elapsed_ms (ph->h, key)) < 0)
      pf_fail (aTHX);
  OUTPUT:
    RETVAL

SV *
get_record (PFHandle *ph)
  PREINIT:
    char *json;
  CODE:
    pf_enter (aTHX_ ph);
    json = fleece_get_record (ph->h);
    /* No record is not a failure: undef. */
    pf_leave (aTHX_ ph, !json && fleece_get_errno () != ENOENT);
    RETVAL = json ? newSVpv (json, 0) : &PL_sv_undef;
    free (json);
  OUTPUT:
    RETVAL

SV *
get_status (PFHandle *ph, PF_UINT flags)
  PREINIT:
    char *json;
  CODE:
    pf_enter (aTHX_ ph);
    json = fleece_get_status (ph->h, flags);
    pf_leave (aTHX_ ph, !json);
    RETVAL = newSVpv (json, 0);
    free (json);
  OUTPUT:
    RETVAL

void
cleanup (PFHandle *ph, PF_UINT flags)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_cleanup (ph->h, flags) < 0);


MODULE = Fleece		PACKAGE = Fleece::Raw::Plan

void
DESTROY (SV *self)
  CODE:
    fleece_plan_free (INT2PTR (PFPlan *, SvIV (SvRV (self))));
    sv_setiv (SvRV (self), 0);

int
get_drive_count (PFPlan *p)
  ALIAS:
    get_skipped_count = 1
  CODE:
    RETVAL = ix == 0 ? fleece_plan_get_drive_count (p) : fleece_plan_get_skipped_count (p);
    if (RETVAL < 0)
      pf_fail (aTHX);
  OUTPUT:
    RETVAL

const char *
get_key (PFPlan *p, PF_INT i)
  ALIAS:
    get_device = 1
    get_skipped_name = 2
    get_skipped_reason = 3
  CODE:
    RETVAL = ix == 0 ? fleece_plan_get_key (p, i)
      : ix == 1 ? fleece_plan_get_device (p, i)
      : ix == 2 ? fleece_plan_get_skipped_name (p, i)
      : fleece_plan_get_skipped_reason (p, i);
    if (!RETVAL)
      pf_fail (aTHX);
  OUTPUT:
    RETVAL

IV
get_size (PFPlan *p, PF_INT i)
  ALIAS:
    get_cluster_size = 1
    get_fleeced = 2
  CODE:
    RETVAL = ix == 0 ? fleece_plan_get_size (p, i)
      : ix == 1 ? fleece_plan_get_cluster_size (p, i)
      : fleece_plan_get_fleeced (p, i);
    if (RETVAL < 0)
      pf_fail (aTHX);
  OUTPUT:
    RETVAL

SV *
get_reason (PFPlan *p, PF_INT i)
  ALIAS:
    get_image = 1
    get_format = 2
  PREINIT:
    const char *s;
  CODE:
    /* NULL is a valid answer (a fleeced drive has no reason, one not
     * fleeced no image): undef; only a bad index croaks. */
    s = ix == 0 ? fleece_plan_get_reason (p, i)
      : ix == 1 ? fleece_plan_get_image (p, i)
      : fleece_plan_get_format (p, i);
    if (!s && (i < 0 || i >= fleece_plan_get_drive_count (p))) {
      fleece_plan_get_key (p, i);       /* sets the error */
      pf_fail (aTHX);
    }
    RETVAL = s ? newSVpv (s, 0) : &PL_sv_undef;
  OUTPUT:
    RETVAL

SV *
to_json (PFPlan *p)
  PREINIT:
    char *json;
  CODE:
    if (!(json = fleece_plan_to_json (p)))
      pf_fail (aTHX);
    RETVAL = newSVpv (json, 0);
    free (json);
  OUTPUT:
    RETVAL


MODULE = Fleece		PACKAGE = Fleece::Raw::Storage

SV *
new_dir (const char *class, PF_STR dir)
  PREINIT:
    PFStorage *ps;
    struct fleece_storage *st;
  CODE:
    if (!(st = fleece_storage_new_dir (dir)))
      pf_fail (aTHX);
    Newxz (ps, 1, PFStorage);
    ps->st = st;
    RETVAL = pf_wrap (aTHX_ class, ps);
  OUTPUT:
    RETVAL

SV *
new_rbd (const char *class, PF_STR pool, PF_OPTSTR ns)
  PREINIT:
    PFStorage *ps;
    struct fleece_storage *st;
  CODE:
    if (!(st = fleece_storage_new_rbd (pool, ns)))
      pf_fail (aTHX);
    Newxz (ps, 1, PFStorage);
    ps->st = st;
    RETVAL = pf_wrap (aTHX_ class, ps);
  OUTPUT:
    RETVAL

SV *
new_callback (const char *class, PF_STR id, PF_UINT flags)
  PREINIT:
    PFStorage *ps;
    PFStorageCb *cb;
    struct fleece_storage *st;
  CODE:
    Newxz (cb, 1, PFStorageCb);
    cb->pid = getpid ();
    if (!(st = fleece_storage_new_callback (id, flags, cb, pf_storage_cb_free))) {
      Safefree (cb);    /* still ours: the library did not take it */
      pf_fail (aTHX);
    }
    Newxz (ps, 1, PFStorage);
    ps->st = st;
    ps->cb = cb;
    RETVAL = pf_wrap (aTHX_ class, ps);
  OUTPUT:
    RETVAL

void
set_option (SV *self, PF_STR key, PF_OPTSTR value)
  PREINIT:
    PFStorage *ps;
  CODE:
    ps = pf_unwrap (aTHX_ self, "Fleece::Raw::Storage", "storage");
    if (fleece_storage_set_option (ps->st, key, value) < 0)
      pf_fail (aTHX);

void
set_alloc_callback (SV *self, PF_CODE fn)
  ALIAS:
    set_remove_callback = 1
    set_path_callback = 2
    set_blockdev_callback = 3
  PREINIT:
    PFStorage *ps;
    PFStorageCb *cb;
    int r;
  CODE:
    cb = pf_storage_cb (aTHX_ self);
    ps = INT2PTR (PFStorage *, SvIV (SvRV (self)));
    switch (ix) {
    case 0:
      r = fleece_storage_set_alloc_callback (ps->st, fn ? pf_storage_alloc_cb : NULL);
      break;
    case 1:
      r = fleece_storage_set_remove_callback (ps->st, fn ? pf_storage_remove_cb : NULL);
      break;
    case 2:
      r = fleece_storage_set_path_callback (ps->st, fn ? pf_storage_path_cb : NULL);
      break;
    default:
      r = fleece_storage_set_blockdev_callback (ps->st, fn ? pf_storage_blockdev_cb : NULL);
      break;
    }
    if (r < 0)
      pf_fail (aTHX);
    pf_keep (aTHX_ ix == 0 ? &cb->alloc : ix == 1 ? &cb->remove
             : ix == 2 ? &cb->path : &cb->blockdev, fn);

void
DESTROY (SV *self)
  PREINIT:
    PFStorage *ps;
  CODE:
    ps = INT2PTR (PFStorage *, SvIV (SvRV (self)));
    if (!ps)
      XSRETURN_EMPTY;
    sv_setiv (SvRV (self), 0);
    fleece_storage_free (ps->st);       /* also frees ps->cb */
    Safefree (ps);


MODULE = Fleece		PACKAGE = Fleece::Raw::Target

SV *
new_dir (const char *class, PF_STR dir, PF_OPTSTR format)
  PREINIT:
    PFTarget *t;
  CODE:
    if (!(t = fleece_target_new_dir (dir, format)))
      pf_fail (aTHX);
    RETVAL = pf_wrap (aTHX_ class, t);
  OUTPUT:
    RETVAL

SV *
new_nbd (const char *class, PF_STR uri)
  ALIAS:
    new_pve = 1
  PREINIT:
    PFTarget *t;
  CODE:
    if (!(t = ix == 0 ? fleece_target_new_nbd (uri) : fleece_target_new_pve (uri)))
      pf_fail (aTHX);
    RETVAL = pf_wrap (aTHX_ class, t);
  OUTPUT:
    RETVAL

SV *
new_fd (const char *class, PF_INT fd, PF_STR format)
  PREINIT:
    PFTarget *t;
  CODE:
    /* The target takes fd, also when this fails. */
    if (!(t = fleece_target_new_fd (fd, format)))
      pf_fail (aTHX);
    RETVAL = pf_wrap (aTHX_ class, t);
  OUTPUT:
    RETVAL

void
set_base (PFTarget *t, PF_OPTSTR base_dir)
  CODE:
    if (fleece_target_set_base (t, base_dir) < 0)
      pf_fail (aTHX);

void
set_pve_args (PFTarget *t, PF_STR json_args)
  CODE:
    if (fleece_target_set_pve_args (t, json_args) < 0)
      pf_fail (aTHX);

void
DESTROY (SV *self)
  CODE:
    fleece_target_free (INT2PTR (PFTarget *, SvIV (SvRV (self))));
    sv_setiv (SvRV (self), 0);
