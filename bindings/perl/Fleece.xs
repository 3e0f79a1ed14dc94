/* Fleece.xs - the XS layer of the Perl binding of libfleece.
 *
 * Thin on purpose: one Perl package per C object and one method per C
 * function, named after it (fleece_set_vmid -> Fleece::Raw::Handle::set_vmid,
 * fleece_plan_get_key -> Fleece::Raw::Plan::get_key).  Options given by name,
 * plans as Perl data and fork safety live in lib/Fleece.pm.
 *
 * What the XS does that the .pm cannot:
 *  - Objects are blessed scalar refs holding a C pointer; DESTROY frees and
 *    zeroes it.  A method keeps its object alive until the calling statement
 *    ends, so a callback that drops the last reference cannot free a handle
 *    or plan the library is still using.
 *  - A failed call croaks with fleece_get_error(), after freeing what the
 *    XS allocated for it.
 *  - Callbacks are Perl code refs called through trampolines under G_EVAL.
 *    An exception becomes a callback failure (-1 or NULL, errno EIO) for the
 *    callbacks that can fail, and its text is kept on the handle: appended
 *    to the croak message if the call fails, else given to warn(), so that
 *    it is reported exactly once.
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
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <fleece/fleece.h>

/* A handle and the Perl callbacks registered on it. */
typedef struct {
  struct fleece_handle *h;
  pid_t pid;            /* the process that created it */
  bool busy;            /* inside a library call */
  SV *log_cb;
  SV *progress_cb;
  SV *load_cb;
  SV *store_cb;
  SV *errors;           /* exceptions of callbacks during the current call */
} PFHandle;

/* The opaque of a callback storage. */
typedef struct {
  PFHandle *owner;      /* the handle it was given to, or NULL */
  pid_t pid;
  SV *alloc_cb;
  SV *free_cb;
  SV *path_cb;
} PFStorageCb;

/* A storage until fleece_set_storage() takes it. */
typedef struct {
  struct fleece_storage *st;
  PFStorageCb *cb;      /* NULL for the directory storage */
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

static void
pf_enter (pTHX_ PFHandle *ph)
{
  if (ph->busy)
    croak ("Fleece: the handle's methods cannot be called from its own "
           "callbacks\n");
  ph->busy = true;
  if (ph->errors) {
    SvREFCNT_dec (ph->errors);
    ph->errors = NULL;
  }
}

/* End a call: croak with the library's error (and any callback exceptions)
 * if it failed, else warn about callback exceptions the call survived. */
static void
pf_leave (pTHX_ PFHandle *ph, bool failed)
{
  SV *errors = ph->errors;

  ph->busy = false;
  ph->errors = NULL;
  if (errors)
    sv_2mortal (errors);
  if (failed) {
    const char *msg = fleece_get_error ();
    SV *e = sv_2mortal (newSVpv (msg ? msg : "libfleece: unknown error", 0));

    if (errors)
      sv_catpvf (e, " (%" SVf ")", SVfARG (errors));
    sv_catpvs (e, "\n");
    croak_sv (e);
  }
  if (errors)
    warn ("Fleece: %" SVf "\n", SVfARG (errors));
}

/* For calls without a handle: croak with the library's error. */
static void
pf_fail (pTHX)
{
  const char *msg = fleece_get_error ();
  croak ("%s\n", msg ? msg : "libfleece: unknown error");
}

/* ---- callbacks ------------------------------------------------------------ */

/* Whether Perl code may run for a handle made in process pid: not in a
 * forked child, and not during global destruction (the callback's closure
 * may be half torn down). */
static bool
pf_may_call (pTHX_ pid_t pid)
{
  return pid == getpid () && PL_phase != PERL_PHASE_DESTRUCT;
}

static void
pf_note_error (pTHX_ PFHandle *ph, const char *what, const char *fmt, ...)
{
  va_list ap;
  SV *msg = sv_2mortal (newSVpvf ("the Perl %s callback ", what));

  va_start (ap, fmt);
  sv_vcatpvf (msg, fmt, &ap);
  va_end (ap);
  /* One line per exception; "die" messages end with a newline. */
  while (SvCUR (msg) && SvPVX (msg)[SvCUR (msg) - 1] == '\n')
    SvCUR_set (msg, SvCUR (msg) - 1);
  if (!ph) {
    warn ("Fleece: %" SVf "\n", SVfARG (msg));
    return;
  }
  if (!ph->errors)
    ph->errors = newSVpvs ("");
  /* A callback that dies every time (progress, say) is reported once. */
  else if (ninstr (SvPVX (ph->errors), SvEND (ph->errors), SvPVX (msg), SvEND (msg)))
    return;
  else
    sv_catpvs (ph->errors, "; ");
  sv_catsv (ph->errors, msg);
}

/* Call cb with the arguments the caller pushed (after ENTER, SAVETMPS,
 * PUSHMARK), in scalar context, catching exceptions.  Returns a copy of the
 * result (the caller owns it), or NULL if cb died; $@ is left as it was. */
static SV *
pf_call (pTHX_ PFHandle *ph, SV *cb, const char *what)
{
  dSP;
  SV *ret = NULL;
  int count;

  save_scalar (PL_errgv);
  count = call_sv (cb, G_SCALAR | G_EVAL);
  SPAGAIN;
  if (SvTRUE (ERRSV))
    pf_note_error (aTHX_ ph, what, "died: %" SVf, SVfARG (ERRSV));
  else if (count == 1)
    ret = newSVsv (TOPs);
  SP -= count;
  PUTBACK;
  return ret;
}

/* A malloc'd copy of a string result, or NULL after noting why not. */
static char *
pf_result_str (pTHX_ PFHandle *ph, SV *ret, const char *what,
               const char *expected)
{
  STRLEN len;
  const char *s;

  if (!SvOK (ret)) {
    pf_note_error (aTHX_ ph, what, "returned undef, not %s", expected);
    return NULL;
  }
  s = SvPV (ret, len);
  if (len == 0 || memchr (s, '\0', len)) {
    pf_note_error (aTHX_ ph, what, "returned %s, not %s",
                   len ? "a string with a NUL byte" : "an empty string",
                   expected);
    return NULL;
  }
  return strdup (s);    /* the library releases it with free() */
}

/* For callbacks whose failure the library sees: whether to run the Perl
 * code, else why not, noted. */
static bool
pf_forked_check (pTHX_ PFHandle *ph, pid_t pid, const char *what)
{
  if (pf_may_call (aTHX_ pid))
    return true;
  if (pid != getpid ())
    pf_note_error (aTHX_ ph, what,
                   "was not run: the handle was made in process %ld, this is "
                   "%ld (fork)", (long) pid, (long) getpid ());
  else
    pf_note_error (aTHX_ ph, what,
                   "was not run: Perl is in global destruction (clean up "
                   "before the program ends)");
  return false;
}

static const char *const level_names[] = { "error", "warning", "info", "debug" };

static void
pf_log_cb (void *opaque, int level, const char *msg)
{
  PFHandle *ph = opaque;
  dTHX;
  SV *ret;

  if (!pf_may_call (aTHX_ ph->pid)) {
    /* At exit a warning such as "handle freed with a run still set up"
     * must not be lost. */
    if (ph->pid == getpid () && level >= 0 && level <= FLEECE_LOG_WARNING)
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
    ret = pf_call (aTHX_ ph, ph->log_cb, "log");
    FREETMPS;
    LEAVE;
  }
  SvREFCNT_dec (ret);
}

static void
pf_progress_cb (void *opaque, const char *drive, uint64_t done, uint64_t total)
{
  PFHandle *ph = opaque;
  dTHX;
  SV *ret;

  if (!pf_may_call (aTHX_ ph->pid))
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
    ret = pf_call (aTHX_ ph, ph->progress_cb, "progress");
    FREETMPS;
    LEAVE;
  }
  SvREFCNT_dec (ret);
}

static int
pf_record_load_cb (void *opaque, uint32_t vmid, char **json)
{
  PFHandle *ph = opaque;
  dTHX;
  SV *ret;
  char *out = NULL;

  *json = NULL;
  if (!pf_forked_check (aTHX_ ph, ph->pid, "record load"))
    goto fail;
  {
    dSP;
    ENTER;
    SAVETMPS;
    PUSHMARK (SP);
    mXPUSHu ((UV) vmid);
    PUTBACK;
    ret = pf_call (aTHX_ ph, ph->load_cb, "record load");
    FREETMPS;
    LEAVE;
  }
  if (!ret)
    goto fail;
  if (SvOK (ret)) {     /* undef: there is no record */
    out = pf_result_str (aTHX_ ph, ret, "record load", "the record");
    if (!out) {
      SvREFCNT_dec (ret);
      goto fail;
    }
  }
  SvREFCNT_dec (ret);
  *json = out;
  return 0;

 fail:
  errno = EIO;
  return -1;
}

static int
pf_record_store_cb (void *opaque, uint32_t vmid, const char *json)
{
  PFHandle *ph = opaque;
  dTHX;
  SV *ret;

  if (!pf_forked_check (aTHX_ ph, ph->pid, "record store"))
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
    ret = pf_call (aTHX_ ph, ph->store_cb, "record store");
    FREETMPS;
    LEAVE;
  }
  if (!ret)
    goto fail;
  SvREFCNT_dec (ret);
  return 0;

 fail:
  errno = EIO;
  return -1;
}

static int
pf_storage_alloc_cb (void *opaque, const char *name, const char *format,
                     uint64_t size, char **volid)
{
  PFStorageCb *cb = opaque;
  dTHX;
  SV *ret;
  char *out;

  if (!pf_forked_check (aTHX_ cb->owner, cb->pid, "storage alloc"))
    goto fail;
  {
    dSP;
    ENTER;
    SAVETMPS;
    PUSHMARK (SP);
    EXTEND (SP, 3);
    mPUSHp (name, strlen (name));
    mPUSHp (format, strlen (format));
    mPUSHu ((UV) size);
    PUTBACK;
    ret = pf_call (aTHX_ cb->owner, cb->alloc_cb, "storage alloc");
    FREETMPS;
    LEAVE;
  }
  if (!ret)
    goto fail;
  out = pf_result_str (aTHX_ cb->owner, ret, "storage alloc", "a volume id");
  SvREFCNT_dec (ret);
  if (!out)
    goto fail;
  *volid = out;
  return 0;

 fail:
  errno = EIO;
  return -1;
}

static int
pf_storage_free_cb (void *opaque, const char *volid)
{
  PFStorageCb *cb = opaque;
  dTHX;
  SV *ret;

  if (!pf_forked_check (aTHX_ cb->owner, cb->pid, "storage free"))
    goto fail;
  {
    dSP;
    ENTER;
    SAVETMPS;
    PUSHMARK (SP);
    mXPUSHp (volid, strlen (volid));
    PUTBACK;
    ret = pf_call (aTHX_ cb->owner, cb->free_cb, "storage free");
    FREETMPS;
    LEAVE;
  }
  if (!ret)
    goto fail;
  SvREFCNT_dec (ret);
  return 0;

 fail:
  errno = EIO;
  return -1;
}

static char *
pf_storage_path_cb (void *opaque, const char *volid)
{
  PFStorageCb *cb = opaque;
  dTHX;
  SV *ret;
  char *out;

  if (!pf_forked_check (aTHX_ cb->owner, cb->pid, "storage path"))
    goto fail;
  {
    dSP;
    ENTER;
    SAVETMPS;
    PUSHMARK (SP);
    mXPUSHp (volid, strlen (volid));
    PUTBACK;
    ret = pf_call (aTHX_ cb->owner, cb->path_cb, "storage path");
    FREETMPS;
    LEAVE;
  }
  if (!ret)
    goto fail;
  out = pf_result_str (aTHX_ cb->owner, ret, "storage path", "a path");
  SvREFCNT_dec (ret);
  if (!out)
    goto fail;
  return out;

 fail:
  errno = EIO;
  return NULL;
}

static void
pf_storage_cb_free (void *opaque)
{
  PFStorageCb *cb = opaque;
  dTHX;

  SvREFCNT_dec (cb->alloc_cb);
  SvREFCNT_dec (cb->free_cb);
  SvREFCNT_dec (cb->path_cb);
  Safefree (cb);
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

MODULE = Fleece		PACKAGE = Fleece::Raw		PREFIX = fleece_

PROTOTYPES: DISABLE

BOOT:
{
  HV *stash = gv_stashpv ("Fleece", GV_ADD);
#define C(name, value) newCONSTSUB (stash, name, newSViv (value))
  C ("LOG_ERROR", FLEECE_LOG_ERROR);
  C ("LOG_WARNING", FLEECE_LOG_WARNING);
  C ("LOG_INFO", FLEECE_LOG_INFO);
  C ("LOG_DEBUG", FLEECE_LOG_DEBUG);
  C ("ENGINE_AUTO", FLEECE_ENGINE_AUTO);
  C ("ENGINE_QEMU", FLEECE_ENGINE_QEMU);
  C ("ENGINE_PVE", FLEECE_ENGINE_PVE);
  C ("STORAGE_QCOW2", FLEECE_STORAGE_QCOW2);
  C ("STORAGE_DISCARD", FLEECE_STORAGE_DISCARD);
  C ("STORAGE_PATH", FLEECE_STORAGE_PATH);
  C ("PLAN_ALL_DRIVES", FLEECE_PLAN_ALL_DRIVES);
  C ("PLAN_NO_FLEECING", FLEECE_PLAN_NO_FLEECING);
  /* Additions are guarded by their feature macro, so the binding builds
   * against older and newer headers alike (t/api-coverage.t checks that
   * every macro of the header it is tested with is here). */
#ifdef FLEECE_HAVE_PLAN_FLEECING_OPTIONAL
  C ("PLAN_FLEECING_OPTIONAL", FLEECE_PLAN_FLEECING_OPTIONAL);
  C ("HAVE_PLAN_FLEECING_OPTIONAL", FLEECE_HAVE_PLAN_FLEECING_OPTIONAL);
#endif
  C ("HAVE_LIFECYCLE", FLEECE_HAVE_LIFECYCLE);
  C ("HAVE_DIR_TARGET", FLEECE_HAVE_DIR_TARGET);
  C ("HAVE_NBD_TARGET", FLEECE_HAVE_NBD_TARGET);
  C ("HAVE_PVE_TARGET", FLEECE_HAVE_PVE_TARGET);
#ifdef FLEECE_HAVE_DRIVE_RESULT
  C ("HAVE_DRIVE_RESULT", FLEECE_HAVE_DRIVE_RESULT);
#endif
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
  CODE:
    Newxz (ph, 1, PFHandle);
    ph->h = fleece_new ();
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
    /* In a forked child the callbacks are muted (pf_may_call), so this only
     * closes the child's copies of the descriptors and frees memory. */
    fleece_free (ph->h);
    SvREFCNT_dec (ph->log_cb);
    SvREFCNT_dec (ph->progress_cb);
    SvREFCNT_dec (ph->load_cb);
    SvREFCNT_dec (ph->store_cb);
    if (ph->errors && pf_may_call (aTHX_ ph->pid))
      warn ("Fleece: %" SVf "\n", SVfARG (ph->errors));
    SvREFCNT_dec (ph->errors);
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

UV
get_vmid (PFHandle *ph)
  CODE:
    RETVAL = fleece_get_vmid (ph->h);
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
  CODE:
    ps = pf_unwrap (aTHX_ storage, "Fleece::Raw::Storage", "storage");
    pf_enter (aTHX_ ph);
    if (fleece_set_storage (ph->h, ps->st) < 0)
      pf_leave (aTHX_ ph, true);
    /* The handle owns it now; its callbacks report to this handle. */
    if (ps->cb)
      ps->cb->owner = ph;
    ps->st = NULL;
    ps->cb = NULL;
    sv_setiv (SvRV (storage), 0);
    Safefree (ps);
    pf_leave (aTHX_ ph, false);

void
set_engine (PFHandle *ph, PF_INT engine)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_set_engine (ph->h, engine) < 0);

int
get_engine (PFHandle *ph)
  CODE:
    RETVAL = fleece_get_engine (ph->h);
    if (RETVAL < 0)
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
set_bitmap (PFHandle *ph, PF_OPTSTR name)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_set_bitmap (ph->h, name) < 0);

void
set_cbw_timeout (PFHandle *ph, PF_UINT seconds)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_set_cbw_timeout (ph->h, seconds) < 0);

void
set_log_callback (PFHandle *ph, PF_CODE cb)
  CODE:
    pf_enter (aTHX_ ph);
    if (fleece_set_log_callback (ph->h, cb ? pf_log_cb : NULL, ph) < 0)
      pf_leave (aTHX_ ph, true);
    pf_keep (aTHX_ &ph->log_cb, cb);
    pf_leave (aTHX_ ph, false);

void
set_progress_callback (PFHandle *ph, PF_CODE cb)
  CODE:
    pf_enter (aTHX_ ph);
    if (fleece_set_progress_callback (ph->h, cb ? pf_progress_cb : NULL, ph) < 0)
      pf_leave (aTHX_ ph, true);
    pf_keep (aTHX_ &ph->progress_cb, cb);
    pf_leave (aTHX_ ph, false);

void
set_record_callback (PFHandle *ph, PF_CODE load, PF_CODE store)
  CODE:
    pf_enter (aTHX_ ph);
    if (fleece_set_record_callback (ph->h, load ? pf_record_load_cb : NULL,
                                    store ? pf_record_store_cb : NULL, ph) < 0)
      pf_leave (aTHX_ ph, true);
    pf_keep (aTHX_ &ph->load_cb, load);
    pf_keep (aTHX_ &ph->store_cb, store);
    pf_leave (aTHX_ ph, false);

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
attach (PFHandle *ph, PFPlan *p)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_attach (ph->h, p) < 0);

void
start (PFHandle *ph, PFPlan *p, PFTarget *t)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_start (ph->h, p, t) < 0);

int
wait (PFHandle *ph, PF_INT timeout_ms)
  CODE:
    pf_enter (aTHX_ ph);
    RETVAL = fleece_wait (ph->h, timeout_ms);
    pf_leave (aTHX_ ph, RETVAL < 0);
  OUTPUT:
    RETVAL

void
cancel (PFHandle *ph)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_cancel (ph->h) < 0);

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

void
cleanup (PFHandle *ph)
  CODE:
    pf_enter (aTHX_ ph);
    pf_leave (aTHX_ ph, fleece_cleanup (ph->h) < 0);


MODULE = Fleece		PACKAGE = Fleece::Raw::Plan

void
DESTROY (SV *self)
  CODE:
    fleece_plan_free (INT2PTR (PFPlan *, SvIV (SvRV (self))));
    sv_setiv (SvRV (self), 0);

UV
get_drive_count (PFPlan *p)
  CODE:
    RETVAL = fleece_plan_get_drive_count (p);
  OUTPUT:
    RETVAL

const char *
get_key (PFPlan *p, PF_U64 i)
  CODE:
    if (!(RETVAL = fleece_plan_get_key (p, i)))
      pf_fail (aTHX);
  OUTPUT:
    RETVAL

const char *
get_device (PFPlan *p, PF_U64 i)
  CODE:
    if (!(RETVAL = fleece_plan_get_device (p, i)))
      pf_fail (aTHX);
  OUTPUT:
    RETVAL

UV
get_size (PFPlan *p, PF_U64 i)
  CODE:
    if (i >= fleece_plan_get_drive_count (p)) {
      fleece_plan_get_size (p, i);      /* sets the error */
      pf_fail (aTHX);
    }
    RETVAL = fleece_plan_get_size (p, i);
  OUTPUT:
    RETVAL

int
get_fleeced (PFPlan *p, PF_U64 i)
  CODE:
    if ((RETVAL = fleece_plan_get_fleeced (p, i)) < 0)
      pf_fail (aTHX);
  OUTPUT:
    RETVAL

SV *
get_reason (PFPlan *p, PF_U64 i)
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
    if (!s && i >= fleece_plan_get_drive_count (p))
      pf_fail (aTHX);
    RETVAL = s ? newSVpv (s, 0) : &PL_sv_undef;
  OUTPUT:
    RETVAL

UV
get_cluster_size (PFPlan *p, PF_U64 i)
  CODE:
    if (i >= fleece_plan_get_drive_count (p)) {
      fleece_plan_get_cluster_size (p, i);
      pf_fail (aTHX);
    }
    RETVAL = fleece_plan_get_cluster_size (p, i);
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
new_callback (const char *class, PF_UINT flags, PF_CODE alloc, PF_CODE free_image, PF_CODE path)
  PREINIT:
    PFStorage *ps;
    PFStorageCb *cb;
    struct fleece_storage *st;
  CODE:
    Newxz (cb, 1, PFStorageCb);
    cb->pid = getpid ();
    st = fleece_storage_new_callback (flags,
                                      alloc ? pf_storage_alloc_cb : NULL,
                                      free_image ? pf_storage_free_cb : NULL,
                                      path ? pf_storage_path_cb : NULL,
                                      cb, pf_storage_cb_free);
    if (!st) {
      Safefree (cb);    /* still ours: the library did not take it */
      pf_fail (aTHX);
    }
    cb->alloc_cb = newSVsv (alloc);
    cb->free_cb = newSVsv (free_image);
    cb->path_cb = newSVsv (path);
    Newxz (ps, 1, PFStorage);
    ps->st = st;
    ps->cb = cb;
    RETVAL = pf_wrap (aTHX_ class, ps);
  OUTPUT:
    RETVAL

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
  PREINIT:
    PFTarget *t;
  CODE:
    if (!(t = fleece_target_new_nbd (uri)))
      pf_fail (aTHX);
    RETVAL = pf_wrap (aTHX_ class, t);
  OUTPUT:
    RETVAL

SV *
new_pve (const char *class, PF_STR json_args)
  PREINIT:
    PFTarget *t;
  CODE:
    if (!(t = fleece_target_new_pve (json_args)))
      pf_fail (aTHX);
    RETVAL = pf_wrap (aTHX_ class, t);
  OUTPUT:
    RETVAL

void
DESTROY (SV *self)
  CODE:
    fleece_target_free (INT2PTR (PFTarget *, SvIV (SvRV (self))));
    sv_setiv (SvRV (self), 0);
