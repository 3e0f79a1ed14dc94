/* The built-in Ceph RBD storage (storage.h), over rbd.c.  Built without
 * librbd, the constructor says so. */
#include <errno.h>

#include "storage.h"

struct fleece_storage *
fleece_storage_rbd_new (const char *pool, const char *ns, GError **err)
{
  g_set_error (err, FLEECE_ERROR, ENOTSUP,
               "this libfleece was built without librbd, so it has no RBD "
               "storage; rebuild it with librbd-dev installed (meson option "
               "rbd=enabled)");
  return NULL;
}
