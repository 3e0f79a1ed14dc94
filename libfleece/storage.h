/* Storage for fleecing images: one interface, three kinds (internal).
 *
 *   storage-dir.c   the built-in directory storage (files proven ours by
 *                   device and inode)
 *   storage-rbd.c   the built-in Ceph RBD storage (images proven ours by
 *                   their RBD image id)
 *   storage.c       the caller's callbacks, and the public constructors
 *
 * Image names come from the plan, but volids also come back from the
 * durable record; every storage validates the names it is given and never
 * touches an image it cannot prove the run created. */
#ifndef FLEECE_STORAGE_H
#define FLEECE_STORAGE_H

#include "internal.h"

G_BEGIN_DECLS

typedef struct {
  const char *type;            /* "dir", "rbd", "callback" */
  unsigned flags;              /* FLEECE_STORAGE_* */
  bool (*set_option) (struct fleece_storage *st, const char *key,
                      const char *value, GError **err);
  bool (*check_complete) (const struct fleece_storage *st, GError **err);
  uint64_t (*min_job_cluster) (const struct fleece_storage *st);
  char *(*pending_name) (const struct fleece_storage *st, const char *name,
                         const char *run);
  bool (*alloc) (struct fleece_storage *st, const char *name,
                 const char *format, uint64_t size, const char *run,
                 bool may_leave_unformatted, FleeceImage *img, GError **err);
  bool (*publish) (struct fleece_storage *st, const char *name,
                   FleeceImage *img, GError **err);
  void (*commit) (struct fleece_storage *st, FleeceImage *img);
  int (*remove) (struct fleece_storage *st, json_object *entry,
                 const char *run, GError **err);
  json_object *(*blockdev) (struct fleece_storage *st, const char *volid,
                            const char *node, GError **err);
  json_object *(*qemu_objects) (struct fleece_storage *st, const char *prefix,
                                GError **err);
  char *(*path) (struct fleece_storage *st, const char *volid, GError **err);
  json_object *(*describe) (const struct fleece_storage *st);
  bool (*matches) (const struct fleece_storage *st, json_object *desc);
  void (*free) (struct fleece_storage *st);
} FleeceStorageOps;

struct fleece_storage {
  const FleeceStorageOps *ops;
  unsigned flags;
  bool taken;                  /* given to a handle: options are fixed */
  void *impl;                  /* the kind's own data */
};

/* Whether name is vm-<digits>-fleece-<digits>, plus .raw or .qcow2 when
 * with_suffix (then *suffix is the format it names). */
bool fleece_storage_valid_name (const char *name, bool with_suffix,
                                const char **suffix);
bool fleece_storage_check_name (const char *name, bool with_suffix,
                                const char *what, GError **err);

struct fleece_storage *fleece_storage_dir_new (const char *dir, GError **err);
struct fleece_storage *fleece_storage_rbd_new (const char *pool,
                                               const char *ns, GError **err);

G_END_DECLS

#endif
