/* The handle: construction, connection, settings and logging. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "engine.h"

#define FLEECE_DEFAULT_STATE_DIR "/var/lib/fleece"
#define FLEECE_DEFAULT_CBW_TIMEOUT 45   /* Proxmox's: VirtIO-win gives up at 60 s */
#define FLEECE_MAX_VMID 999999999u

FLEECE_API struct fleece_handle *
fleece_new (void)
{
  struct fleece_handle *h = g_new0 (struct fleece_handle, 1);
  const char *env = g_getenv ("FLEECE_STATE_DIR");

  h->state_dir = g_strdup (env && *env ? env : FLEECE_DEFAULT_STATE_DIR);
  h->engine_request = FLEECE_ENGINE_AUTO;
  h->engine = -1;
  h->qmp_timeout_ms = FLEECE_QMP_DEFAULT_TIMEOUT_MS;
  h->cbw_timeout = FLEECE_DEFAULT_CBW_TIMEOUT;
  h->lock_fd = -1;
  return h;
}

FLEECE_API void
fleece_free (struct fleece_handle *h)
{
  if (!h)
    return;
  if (h->state == FLEECE_STATE_ATTACHED || h->state == FLEECE_STATE_RUNNING)
    fleece_log (h, FLEECE_LOG_WARNING,
                "handle freed with a run still set up; "
                "fleece_cleanup() for VM %u will undo it from the record",
                h->vmid);
  fleece_plan_free (h->run_plan);
  fleece_qmp_free (h->qmp);
  g_free (h->qmp_path);
  g_free (h->state_dir);
  fleece_storage_free (h->storage);
  g_strfreev (h->drives);
  g_free (h->image_format);
  g_free (h->bitmap);
  if (h->record)
    json_object_put (h->record);
  g_free (h->failure);
  if (h->lock_fd >= 0)
    close (h->lock_fd);
  g_free (h);
}

void
fleece_log (struct fleece_handle *h, int level, const char *fmt, ...)
{
  va_list ap;
  g_autofree char *msg = NULL;

  if (!h->log_fn)
    return;
  va_start (ap, fmt);
  msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  h->log_fn (h->log_opaque, level, msg);
}

FleeceRecordStore
fleece_handle_record_store (struct fleece_handle *h)
{
  FleeceRecordStore rs = {
    .dir = h->state_dir,
    .load = h->record_load,
    .store = h->record_store,
    .opaque = h->record_opaque,
  };
  return rs;
}

static bool
connected_check (struct fleece_handle *h, const char *func)
{
  if (h->qmp) {
    fleece_error_set (func, EISCONN, "the handle is already connected");
    return false;
  }
  return true;
}

static int
finish_connect (struct fleece_handle *h, const char *func, FleeceQmp *q)
{
  g_autoptr (GError) err = NULL;

  h->qmp = q;
  if (!fleece_engine_probe (h, &err)) {
    fleece_qmp_free (h->qmp);
    h->qmp = NULL;
    fleece_error_set_gerror (func, err);
    return -1;
  }
  return 0;
}

bool
fleece_handle_open (struct fleece_handle *h, const char *qmp_path, GError **err)
{
  g_autoptr (FleeceQmp) q = fleece_qmp_new ();

  fleece_qmp_set_timeout (q, h->qmp_timeout_ms);
  if (!fleece_qmp_connect_unix (q, qmp_path, err))
    return false;
  h->qmp = g_steal_pointer (&q);
  if (!fleece_engine_probe (h, err)) {
    g_clear_pointer (&h->qmp, fleece_qmp_free);
    return false;
  }
  g_free (h->qmp_path);
  h->qmp_path = g_strdup (qmp_path);
  return true;
}

FLEECE_API int
fleece_connect (struct fleece_handle *h, const char *qmp_path)
{
  g_autoptr (GError) err = NULL;

  if (!qmp_path || !*qmp_path) {
    fleece_error_set (__func__, EINVAL, "the QMP socket path is empty");
    return -1;
  }
  if (!connected_check (h, __func__))
    return -1;
  if (!fleece_handle_open (h, qmp_path, &err)) {
    fleece_error_set_gerror (__func__, err);
    return -1;
  }
  return 0;
}

FLEECE_API int
fleece_connect_fd (struct fleece_handle *h, int fd)
{
  g_autoptr (FleeceQmp) q = NULL;
  g_autoptr (GError) err = NULL;

  if (fd < 0) {
    fleece_error_set (__func__, EBADF, "invalid file descriptor %d", fd);
    return -1;
  }
  if (!connected_check (h, __func__)) {
    close (fd);
    return -1;
  }
  q = fleece_qmp_new ();
  fleece_qmp_set_timeout (q, h->qmp_timeout_ms);
  if (!fleece_qmp_connect_fd (q, fd, &err)) {
    fleece_error_set_gerror (__func__, err);
    return -1;
  }
  return finish_connect (h, __func__, g_steal_pointer (&q));
}

/* Settings used only when the jobs start may change until then. */
static bool
settable_until_start (struct fleece_handle *h, const char *func)
{
  if (h->state == FLEECE_STATE_RUNNING) {
    fleece_error_set (func, EBUSY,
                      "cannot change settings of a running backup");
    return false;
  }
  return true;
}

/* Settings that shape a run cannot change while one is set up. */
static bool
settable (struct fleece_handle *h, const char *func)
{
  if (h->state == FLEECE_STATE_ATTACHED || h->state == FLEECE_STATE_RUNNING) {
    fleece_error_set (func, EBUSY,
                      "cannot change settings while a run is set up; "
                      "call fleece_cleanup() first");
    return false;
  }
  return true;
}

FLEECE_API int
fleece_set_vmid (struct fleece_handle *h, uint32_t vmid)
{
  if (!settable (h, __func__))
    return -1;
  if (vmid == 0 || vmid > FLEECE_MAX_VMID) {
    fleece_error_set (__func__, EINVAL,
                      "invalid vmid %u: must be 1 to %u", vmid,
                      FLEECE_MAX_VMID);
    return -1;
  }
  h->vmid = vmid;
  return 0;
}

FLEECE_API uint32_t
fleece_get_vmid (struct fleece_handle *h)
{
  return h->vmid;
}

FLEECE_API int
fleece_set_state_dir (struct fleece_handle *h, const char *dir)
{
  if (!settable (h, __func__))
    return -1;
  if (!dir || !*dir) {
    fleece_error_set (__func__, EINVAL, "the state directory is empty");
    return -1;
  }
  g_free (h->state_dir);
  h->state_dir = g_strdup (dir);
  return 0;
}

FLEECE_API int
fleece_set_storage (struct fleece_handle *h, struct fleece_storage *st)
{
  if (!settable (h, __func__))
    return -1;
  if (!st) {
    fleece_error_set (__func__, EINVAL, "storage is NULL");
    return -1;
  }
  fleece_storage_free (h->storage);
  h->storage = st;
  return 0;
}

FLEECE_API int
fleece_set_engine (struct fleece_handle *h, int engine)
{
  g_autoptr (GError) err = NULL;
  int old;

  if (!settable (h, __func__))
    return -1;
  if (engine != FLEECE_ENGINE_AUTO && engine != FLEECE_ENGINE_QEMU &&
      engine != FLEECE_ENGINE_PVE) {
    fleece_error_set (__func__, EINVAL,
                      "unknown engine %d: use FLEECE_ENGINE_AUTO, "
                      "FLEECE_ENGINE_QEMU or FLEECE_ENGINE_PVE", engine);
    return -1;
  }
  old = h->engine_request;
  h->engine_request = engine;
  if (h->qmp && !fleece_engine_choose (h, &err)) {
    h->engine_request = old;
    fleece_error_set_gerror (__func__, err);
    return -1;
  }
  return 0;
}

FLEECE_API int
fleece_get_engine (struct fleece_handle *h)
{
  if (h->engine < 0) {
    fleece_error_set (__func__, ENOTCONN,
                      "the engine is chosen when connecting; "
                      "call fleece_connect() first");
    return -1;
  }
  return h->engine;
}

FLEECE_API int
fleece_set_qmp_timeout (struct fleece_handle *h, unsigned timeout_ms)
{
  if (timeout_ms == 0 || timeout_ms > INT32_MAX) {
    fleece_error_set (__func__, EINVAL,
                      "invalid QMP timeout %u ms: must be 1 to %d",
                      timeout_ms, INT32_MAX);
    return -1;
  }
  h->qmp_timeout_ms = (int) timeout_ms;
  if (h->qmp)
    fleece_qmp_set_timeout (h->qmp, h->qmp_timeout_ms);
  return 0;
}

/* Drive keys as QEMU and Proxmox name them: letters, digits, and for
 * non-Proxmox VMs '-' and '_'; anything else cannot be a drive we made. */
bool
fleece_valid_drive_key (const char *key)
{
  size_t n = key ? strlen (key) : 0;

  if (n == 0 || n > 20)
    return false;
  for (size_t i = 0; i < n; i++)
    if (!g_ascii_isalnum (key[i]) && key[i] != '-' && key[i] != '_')
      return false;
  return true;
}

FLEECE_API int
fleece_set_drives (struct fleece_handle *h, const char *const *keys)
{
  if (!settable (h, __func__))
    return -1;
  if (keys) {
    for (size_t i = 0; keys[i]; i++) {
      if (!fleece_valid_drive_key (keys[i])) {
        fleece_error_set (__func__, EINVAL,
                          "invalid drive key '%s': use keys such as scsi0 "
                          "or virtio1 (letters, digits, '-' or '_', at most "
                          "20 characters)", keys[i]);
        return -1;
      }
    }
  }
  g_strfreev (h->drives);
  h->drives = keys ? g_strdupv ((char **) keys) : NULL;
  return 0;
}

FLEECE_API int
fleece_set_plan_flags (struct fleece_handle *h, unsigned flags)
{
  const unsigned known = FLEECE_PLAN_ALL_DRIVES | FLEECE_PLAN_NO_FLEECING |
                         FLEECE_PLAN_FLEECING_OPTIONAL;

  if (!settable (h, __func__))
    return -1;
  if (flags & ~known) {
    fleece_error_set (__func__, EINVAL, "unknown plan flags 0x%x",
                      flags & ~known);
    return -1;
  }
  h->plan_flags = flags;
  return 0;
}

FLEECE_API int
fleece_set_image_format (struct fleece_handle *h, const char *format)
{
  if (!settable (h, __func__))
    return -1;
  if (format && strcmp (format, "raw") != 0 && strcmp (format, "qcow2") != 0) {
    fleece_error_set (__func__, EINVAL,
                      "unknown image format '%s': use \"raw\" or \"qcow2\"",
                      format);
    return -1;
  }
  g_free (h->image_format);
  h->image_format = g_strdup (format);
  return 0;
}

FLEECE_API int
fleece_set_bwlimit (struct fleece_handle *h, uint64_t kib_per_s)
{
  if (!settable_until_start (h, __func__))
    return -1;
  if (kib_per_s > INT64_MAX / 1024) {
    fleece_error_set (__func__, ERANGE, "speed limit %" G_GUINT64_FORMAT
                      " KiB/s is too large", kib_per_s);
    return -1;
  }
  h->bwlimit_kib = kib_per_s;
  return 0;
}

FLEECE_API int
fleece_set_bitmap (struct fleece_handle *h, const char *name)
{
  if (!settable (h, __func__))
    return -1;
  if (name && (!*name || strlen (name) > 1023)) {
    fleece_error_set (__func__, EINVAL,
                      "invalid bitmap name: must be 1 to 1023 characters");
    return -1;
  }
  g_free (h->bitmap);
  h->bitmap = g_strdup (name);
  return 0;
}

FLEECE_API int
fleece_set_cbw_timeout (struct fleece_handle *h, unsigned seconds)
{
  if (!settable_until_start (h, __func__))
    return -1;
  h->cbw_timeout = seconds;
  return 0;
}

FLEECE_API int
fleece_set_log_callback (struct fleece_handle *h, fleece_log_fn fn,
                         void *opaque)
{
  h->log_fn = fn;
  h->log_opaque = opaque;
  return 0;
}

FLEECE_API int
fleece_set_progress_callback (struct fleece_handle *h, fleece_progress_fn fn,
                              void *opaque)
{
  h->progress_fn = fn;
  h->progress_opaque = opaque;
  return 0;
}

FLEECE_API int
fleece_set_record_callback (struct fleece_handle *h,
                            fleece_record_load_fn load,
                            fleece_record_store_fn store, void *opaque)
{
  if (!settable (h, __func__))
    return -1;
  if ((load == NULL) != (store == NULL)) {
    fleece_error_set (__func__, EINVAL,
                      "give both load and store callbacks, or neither "
                      "(to keep the record in the state directory)");
    return -1;
  }
  h->record_load = load;
  h->record_store = store;
  h->record_opaque = opaque;
  return 0;
}
