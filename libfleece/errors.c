/* Per-thread error state of the public API, and the GError domain used
 * inside the library.  GErrors are converted to (message, errno) at the
 * public boundary by fleece_error_set_gerror(). */
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Per thread, so that fleece_get_error() works without a handle (also when
 * fleece_new() or a connect failed) and threads do not see each other's
 * errors.  The message is freed by the thread's next error; GLib's GPrivate
 * frees it at thread exit. */
typedef struct {
  char *msg;
  int errnum;
} ErrorState;

static void
error_state_free (void *p)
{
  ErrorState *e = p;
  if (e) {
    g_free (e->msg);
    g_free (e);
  }
}

static GPrivate error_key = G_PRIVATE_INIT (error_state_free);

static ErrorState *
error_state (void)
{
  ErrorState *e = g_private_get (&error_key);
  if (!e) {
    e = g_new0 (ErrorState, 1);
    g_private_set (&error_key, e);
  }
  return e;
}

G_DEFINE_QUARK (fleece-error-quark, fleece_error)

void
fleece_error_set (const char *func, int errnum, const char *fmt, ...)
{
  ErrorState *e = error_state ();
  va_list ap;
  g_autofree char *msg = NULL;

  va_start (ap, fmt);
  msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);

  g_free (e->msg);
  e->msg = g_strdup_printf ("%s: %s", func, msg);
  e->errnum = errnum;
  errno = errnum;
}

int
fleece_error_errno (const GError *err)
{
  if (!err)
    return 0;
  if (err->domain == FLEECE_ERROR)
    return err->code;
  if (err->domain == FLEECE_QMP_ERROR) {
    switch ((FleeceQmpErrorCode) err->code) {
    case FLEECE_QMP_ERROR_IO:        return EIO;
    case FLEECE_QMP_ERROR_EOF:       return ECONNRESET;
    case FLEECE_QMP_ERROR_TIMEOUT:   return ETIMEDOUT;
    case FLEECE_QMP_ERROR_PROTOCOL:  return EPROTO;
    case FLEECE_QMP_ERROR_TOO_LARGE: return EMSGSIZE;
    case FLEECE_QMP_ERROR_COMMAND:   return EIO;
    case FLEECE_QMP_ERROR_NO_PEER:   return ECONNREFUSED;
    case FLEECE_QMP_ERROR_BUSY:      return EBUSY;
    case FLEECE_QMP_ERROR_CANCELLED: return ECANCELED;
    }
  }
  return EIO;
}

void
fleece_error_set_gerror (const char *func, const GError *err)
{
  if (!err) {
    fleece_error_set (func, EIO, "unknown error");
    return;
  }
  fleece_error_set (func, fleece_error_errno (err), "%s", err->message);
}

void
fleece_error_from_callback (GError **err, int saved_errno, char *reason,
                            const char *fmt, ...)
{
  va_list ap;
  g_autofree char *what = NULL;
  int e = saved_errno ? saved_errno : EIO;

  va_start (ap, fmt);
  what = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  if (reason && *reason)
    g_set_error (err, FLEECE_ERROR, e, "%s: %s", what, reason);
  else
    g_set_error (err, FLEECE_ERROR, e, "%s: %s", what,
                 saved_errno ? g_strerror (saved_errno) : "no reason given");
  free (reason);
}

FLEECE_API const char *
fleece_get_error (void)
{
  return error_state ()->msg;
}

FLEECE_API int
fleece_get_errno (void)
{
  return error_state ()->errnum;
}

FLEECE_API const char *
fleece_get_version (void)
{
  return FLEECE_VERSION_STRING;
}
