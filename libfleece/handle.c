/* The handle: construction, connection, settings, callbacks and logging.
 * Which call is allowed when is in state.c. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <glib-unix.h>

#include "handle.h"
#include "storage.h"

#define FLEECE_DEFAULT_STATE_DIR "/var/lib/fleece"
#define FLEECE_DEFAULT_CBW_TIMEOUT 45   /* Proxmox's: VirtIO-win gives up at 60 s */
#define FLEECE_MAX_VMID 999999999u
#define FLEECE_MAX_KEY_CHARS 31         /* a QEMU id */

FLEECE_API struct fleece_handle *
fleece_new (void)
{
  struct fleece_handle *h = g_new0 (struct fleece_handle, 1);
  const char *env = g_getenv ("FLEECE_STATE_DIR");

  if (!g_unix_open_pipe (h->cancel_pipe, FD_CLOEXEC, NULL)) {
    g_free (h);
    fleece_error_set (__func__, errno ? errno : EMFILE, "cannot create a pipe");
    return NULL;
  }
  fcntl (h->cancel_pipe[0], F_SETFL, O_NONBLOCK);
  fcntl (h->cancel_pipe[1], F_SETFL, O_NONBLOCK);
  h->pid = getpid ();
  /* A relative one is kept as it is: every use refuses it by name. */
  h->set.state_dir = g_strdup (env && *env ? env : FLEECE_DEFAULT_STATE_DIR);
  h->set.engine_request = FLEECE_ENGINE_AUTO;
  h->set.qmp_timeout_ms = FLEECE_QMP_DEFAULT_TIMEOUT_MS;
  h->set.cbw_timeout = FLEECE_DEFAULT_CBW_TIMEOUT;
  h->engine = -1;
  h->lock_fd = -1;
  h->conn = fleece_conn_new ();
  h->ctx.conn = h->conn;
  h->ctx.set = &h->set;
  h->ctx.features = &h->features;
  h->ctx.cb = &h->cb;
  return h;
}

static void
clear_callbacks (struct fleece_handle *h)
{
  if (h->cb.log_free)
    h->cb.log_free (h->cb.log_data);
  if (h->cb.progress_free)
    h->cb.progress_free (h->cb.progress_data);
  if (h->record_free)
    h->record_free (h->record_data);
  memset (&h->cb, 0, sizeof h->cb);
  h->record_free = NULL;
}

FLEECE_API void
fleece_free (struct fleece_handle *h)
{
  bool owner;

  if (!h)
    return;
  owner = h->pid == getpid ();
  if (owner && h->state != FLEECE_STATE_IDLE)
    fleece_log (&h->ctx, FLEECE_LOG_WARNING,
                "handle freed with a run still set up; fleece_cleanup() for "
                "VM %u will undo it from the record", h->set.vmid);
  fleece_plan_free (h->run.plan);
  g_free (h->run.failure);
  if (h->run.record)
    json_object_put (h->run.record);
  fleece_conn_free (h->conn);
  fleece_storage_free (h->storage);
  clear_callbacks (h);
  g_free (h->set.state_dir);
  g_strfreev (h->set.drives);
  g_free (h->set.image_format);
  g_free (h->set.bitmap);
  /* A child closes only its copies: the parent's lock stays held. */
  if (h->lock_fd >= 0)
    close (h->lock_fd);
  close (h->cancel_pipe[0]);
  close (h->cancel_pipe[1]);
  g_free (h);
}

void
fleece_log (const FleeceCtx *ctx, int level, const char *fmt, ...)
{
  va_list ap;
  g_autofree char *msg = NULL;

  if (!ctx->cb->log)
    return;
  va_start (ap, fmt);
  msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  ctx->cb->log (ctx->cb->log_data, level, msg);
}

FleeceRecordStore
fleece_handle_record_store (struct fleece_handle *h)
{
  FleeceRecordStore rs = {
    .dir = h->set.state_dir,
    .load = h->record_load,
    .store = h->record_store,
    .user_data = h->record_data,
  };
  return rs;
}

const FleeceEngineOps *
fleece_handle_ops (struct fleece_handle *h)
{
  return h->engine == FLEECE_ENGINE_PVE ? &fleece_engine_pve_ops
                                        : &fleece_engine_qemu_ops;
}

void
fleece_handle_release (struct fleece_handle *h)
{
  fleece_conn_release (h->conn);
}

void
fleece_handle_arm_cancel (struct fleece_handle *h, bool armed)
{
  fleece_conn_set_cancel_fd (h->conn, armed ? h->cancel_pipe[0] : -1);
}

/* ---- connecting ------------------------------------------------------ */

static bool
choose_engine (struct fleece_handle *h, int request, GError **err)
{
  g_autoptr (GString) warning = g_string_new (NULL);

  if (!fleece_choose_engine (&h->features, request, &h->engine, warning, err))
    return false;
  if (warning->len)
    fleece_log (&h->ctx, FLEECE_LOG_WARNING, "%s", warning->str);
  return true;
}

/* Probe once and let go: every later call connects for its own time. */
static int
finish_connect (struct fleece_handle *h, const char *func)
{
  g_autoptr (GError) err = NULL;
  bool ok = fleece_probe (h->conn, &h->features, &err) &&
            choose_engine (h, h->set.engine_request, &err);

  fleece_handle_release (h);
  if (!ok) {
    fleece_conn_set_path (h->conn, NULL);
    h->engine = -1;
    fleece_error_set_gerror (func, err);
    return -1;
  }
  return 0;
}

static bool
not_connected (struct fleece_handle *h, const char *func)
{
  if (fleece_conn_configured (h->conn)) {
    fleece_error_set (func, EISCONN, "the handle is already connected");
    return false;
  }
  return true;
}

FLEECE_API int
fleece_connect (struct fleece_handle *h, const char *qmp_path)
{
  g_autofree char *abs = NULL;

  if (!fleece_call_check (h, CALL_CONNECT, __func__) || !not_connected (h, __func__))
    return -1;
  if (!qmp_path || !*qmp_path) {
    fleece_error_set (__func__, EINVAL, "the QMP socket path is empty");
    return -1;
  }
  /* Later calls (and the record) must reach the same socket from any
   * working directory. */
  abs = g_canonicalize_filename (qmp_path, NULL);
  fleece_conn_set_timeout (h->conn, h->set.qmp_timeout_ms);
  fleece_conn_set_path (h->conn, abs);
  return finish_connect (h, __func__);
}

FLEECE_API int
fleece_connect_fd (struct fleece_handle *h, int fd)
{
  g_autoptr (GError) err = NULL;

  if (fd < 0) {
    fleece_error_set (__func__, EBADF, "invalid file descriptor %d", fd);
    return -1;
  }
  if (!fleece_call_check (h, CALL_CONNECT, __func__) || !not_connected (h, __func__)) {
    close (fd);
    return -1;
  }
  fleece_conn_set_timeout (h->conn, h->set.qmp_timeout_ms);
  if (!fleece_conn_adopt_fd (h->conn, fd, &err)) {
    fleece_error_set_gerror (__func__, err);
    return -1;
  }
  return finish_connect (h, __func__);
}

/* ---- settings ------------------------------------------------------------ */

FLEECE_API int
fleece_set_vmid (struct fleece_handle *h, uint32_t vmid)
{
  if (!fleece_call_check (h, CALL_SET_RUN, __func__))
    return -1;
  if (vmid == 0 || vmid > FLEECE_MAX_VMID) {
    fleece_error_set (__func__, EINVAL, "invalid vmid %u: must be 1 to %u",
                      vmid, FLEECE_MAX_VMID);
    return -1;
  }
  h->set.vmid = vmid;
  return 0;
}

FLEECE_API int64_t
fleece_get_vmid (struct fleece_handle *h)
{
  if (!fleece_call_check (h, CALL_GET, __func__))
    return -1;
  if (!h->set.vmid) {
    fleece_error_set (__func__, EINVAL, "no vmid is set");
    return -1;
  }
  return h->set.vmid;
}

FLEECE_API int
fleece_set_state_dir (struct fleece_handle *h, const char *dir)
{
  if (!fleece_call_check (h, CALL_SET_RUN, __func__))
    return -1;
  if (!dir || !g_path_is_absolute (dir)) {
    fleece_error_set (__func__, EINVAL, "the state directory '%s' is not an "
                      "absolute path", dir ? dir : "");
    return -1;
  }
  g_free (h->set.state_dir);
  h->set.state_dir = g_canonicalize_filename (dir, NULL);
  return 0;
}

FLEECE_API int
fleece_set_storage (struct fleece_handle *h, struct fleece_storage *st)
{
  g_autoptr (GError) err = NULL;

  if (!fleece_call_check (h, CALL_SET_RUN, __func__)) {
    fleece_storage_free (st);
    return -1;
  }
  if (!st) {
    fleece_error_set (__func__, EINVAL, "storage is NULL");
    return -1;
  }
  if (st == h->storage)
    return 0;
  /* Taken by a handle already: it is that handle's to free, not ours. */
  if (st->taken) {
    fleece_error_set (__func__, EBUSY, "the storage belongs to a handle "
                      "already; make a new one for this handle");
    return -1;
  }
  if (!fleece_storage_check_complete (st, &err)) {
    fleece_error_set_gerror (__func__, err);
    fleece_storage_free (st);
    return -1;
  }
  st->taken = true;
  fleece_storage_free (h->storage);
  h->storage = h->ctx.storage = st;
  return 0;
}

FLEECE_API int
fleece_set_engine (struct fleece_handle *h, int engine)
{
  g_autoptr (GError) err = NULL;

  if (!fleece_call_check (h, CALL_SET_RUN, __func__))
    return -1;
  if (engine != FLEECE_ENGINE_AUTO && engine != FLEECE_ENGINE_QEMU &&
      engine != FLEECE_ENGINE_PVE) {
    fleece_error_set (__func__, EINVAL,
                      "unknown engine %d: use FLEECE_ENGINE_AUTO, "
                      "FLEECE_ENGINE_QEMU or FLEECE_ENGINE_PVE", engine);
    return -1;
  }
  if (h->features.loaded && !choose_engine (h, engine, &err)) {
    fleece_error_set_gerror (__func__, err);
    return -1;
  }
  h->set.engine_request = engine;
  return 0;
}

FLEECE_API int
fleece_get_engine (struct fleece_handle *h)
{
  if (!fleece_call_check (h, CALL_GET, __func__))
    return -1;
  if (h->engine < 0) {
    fleece_error_set (__func__, ENOTCONN, "the engine is chosen when "
                      "connecting; call fleece_connect() first");
    return -1;
  }
  return h->engine;
}

FLEECE_API int
fleece_set_qmp_timeout (struct fleece_handle *h, unsigned timeout_ms)
{
  if (!fleece_call_check (h, CALL_SET_ANY, __func__))
    return -1;
  if (timeout_ms == 0 || timeout_ms > INT32_MAX) {
    fleece_error_set (__func__, EINVAL, "invalid QMP timeout %u ms: must be "
                      "1 to %d", timeout_ms, INT32_MAX);
    return -1;
  }
  h->set.qmp_timeout_ms = (int) timeout_ms;
  fleece_conn_set_timeout (h->conn, (int) timeout_ms);
  return 0;
}

/* Drive keys as QEMU ids: a letter, then letters, digits, '-', '_', '.'. */
bool
fleece_valid_drive_key (const char *key)
{
  size_t n = key ? strlen (key) : 0;

  if (n == 0 || n > FLEECE_MAX_KEY_CHARS || !g_ascii_isalpha (key[0]))
    return false;
  for (size_t i = 0; i < n; i++)
    if (!g_ascii_isalnum (key[i]) && !strchr ("-_.", key[i]))
      return false;
  return true;
}

FLEECE_API int
fleece_set_drives (struct fleece_handle *h, const char *const *keys)
{
  if (!fleece_call_check (h, CALL_SET_RUN, __func__))
    return -1;
  if (keys && !keys[0]) {
    fleece_error_set (__func__, EINVAL, "the list of drives is empty; pass "
                      "NULL for every drive");
    return -1;
  }
  for (size_t i = 0; keys && keys[i]; i++) {
    if (!fleece_valid_drive_key (keys[i])) {
      g_autofree char *shown = g_strescape (keys[i], NULL);
      fleece_error_set (__func__, EINVAL, "invalid drive key '%s': use keys "
                        "such as scsi0 or virtio1 (a letter, then letters, "
                        "digits, '-', '_' or '.', at most %d characters)",
                        shown, FLEECE_MAX_KEY_CHARS);
      return -1;
    }
  }
  g_strfreev (h->set.drives);
  h->set.drives = keys ? g_strdupv ((char **) keys) : NULL;
  return 0;
}

FLEECE_API int
fleece_set_plan_flags (struct fleece_handle *h, unsigned flags)
{
  const unsigned known = FLEECE_PLAN_ALL_DRIVES | FLEECE_PLAN_NO_FLEECING |
                         FLEECE_PLAN_FLEECING_OPTIONAL;

  if (!fleece_call_check (h, CALL_SET_RUN, __func__))
    return -1;
  if (flags & ~known) {
    fleece_error_set (__func__, EINVAL, "unknown plan flags 0x%x", flags & ~known);
    return -1;
  }
  h->set.plan_flags = flags;
  return 0;
}

FLEECE_API int
fleece_set_image_format (struct fleece_handle *h, const char *format)
{
  if (!fleece_call_check (h, CALL_SET_RUN, __func__))
    return -1;
  if (format && strcmp (format, "raw") != 0 && strcmp (format, "qcow2") != 0) {
    fleece_error_set (__func__, EINVAL, "unknown image format '%s': use "
                      "\"raw\" or \"qcow2\"", format);
    return -1;
  }
  g_free (h->set.image_format);
  h->set.image_format = g_strdup (format);
  return 0;
}

FLEECE_API int
fleece_set_bwlimit (struct fleece_handle *h, uint64_t kib_per_s)
{
  if (!fleece_call_check (h, CALL_SET_UNTIL_START, __func__))
    return -1;
  if (kib_per_s > INT64_MAX / 1024) {
    fleece_error_set (__func__, ERANGE, "speed limit %" G_GUINT64_FORMAT
                      " KiB/s is too large", kib_per_s);
    return -1;
  }
  h->set.bwlimit_kib = kib_per_s;
  return 0;
}

FLEECE_API int
fleece_set_bitmap (struct fleece_handle *h, const char *name, int mode)
{
  if (!fleece_call_check (h, CALL_SET_RUN, __func__))
    return -1;
  if (name && (!*name || strlen (name) > 1023)) {
    fleece_error_set (__func__, EINVAL,
                      "invalid bitmap name: must be 1 to 1023 characters");
    return -1;
  }
  if (name && mode != FLEECE_BITMAP_USE && mode != FLEECE_BITMAP_NEW) {
    fleece_error_set (__func__, EINVAL, "unknown bitmap mode %d: use "
                      "FLEECE_BITMAP_USE (incremental) or FLEECE_BITMAP_NEW "
                      "(full, starting the bitmap)", mode);
    return -1;
  }
  g_free (h->set.bitmap);
  h->set.bitmap = g_strdup (name);
  h->set.bitmap_mode = name ? mode : 0;
  return 0;
}

FLEECE_API int
fleece_set_cbw_timeout (struct fleece_handle *h, unsigned seconds)
{
  if (!fleece_call_check (h, CALL_SET_UNTIL_START, __func__))
    return -1;
  h->set.cbw_timeout = seconds;
  return 0;
}

/* ---- callbacks ----------------------------------------------------------- */

FLEECE_API int
fleece_set_log_callback (struct fleece_handle *h, fleece_log_fn fn,
                         void *user_data, fleece_free_fn free_fn)
{
  if (!fleece_call_check (h, CALL_SET_ANY, __func__))
    return -1;
  if (h->cb.log_free)
    h->cb.log_free (h->cb.log_data);
  h->cb.log = fn;
  h->cb.log_data = user_data;
  h->cb.log_free = free_fn;
  return 0;
}

FLEECE_API int
fleece_set_progress_callback (struct fleece_handle *h, fleece_progress_fn fn,
                              void *user_data, fleece_free_fn free_fn)
{
  if (!fleece_call_check (h, CALL_SET_ANY, __func__))
    return -1;
  if (h->cb.progress_free)
    h->cb.progress_free (h->cb.progress_data);
  h->cb.progress = fn;
  h->cb.progress_data = user_data;
  h->cb.progress_free = free_fn;
  return 0;
}

FLEECE_API int
fleece_set_record_callback (struct fleece_handle *h,
                            fleece_record_load_fn load,
                            fleece_record_store_fn store, void *user_data,
                            fleece_free_fn free_fn)
{
  if (!fleece_call_check (h, CALL_SET_RUN, __func__))
    return -1;
  if ((load == NULL) != (store == NULL)) {
    fleece_error_set (__func__, EINVAL,
                      "give both load and store callbacks, or neither "
                      "(to keep the record in the state directory)");
    return -1;
  }
  if (h->record_free)
    h->record_free (h->record_data);
  h->record_load = load;
  h->record_store = store;
  h->record_data = user_data;
  h->record_free = free_fn;
  return 0;
}
