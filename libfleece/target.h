/* Backup targets (internal view of struct fleece_target). */
#ifndef FLEECE_TARGET_H
#define FLEECE_TARGET_H

#include "internal.h"

typedef enum {
  FLEECE_TARGET_DIR,
  FLEECE_TARGET_NBD,
  FLEECE_TARGET_PVE,
} FleeceTargetKind;

struct fleece_target {
  FleeceTargetKind kind;
  char *dir, *format;          /* dir */
  char *uri, *nbd_socket, *nbd_host; /* nbd */
  int nbd_port;
  json_object *pve_args;       /* pve */
};

/* For the record: {"type": ...}. */
json_object *fleece_target_describe (const struct fleece_target *t);
/* dir targets: <dir>/<key>.<format> (g_free). */
char *fleece_target_dir_path (const struct fleece_target *t, const char *key);
/* dir targets: blockdev-add arguments of the file node for drive key. */
json_object *fleece_target_file_blockdev (const struct fleece_target *t,
                                          const char *key,
                                          const char *file_node);
/* blockdev-add arguments of the target node for drive key; a dir target's
 * file node inline, or by name if it was added before (file_added). */
json_object *fleece_target_blockdev (const struct fleece_target *t,
                                     const char *key, const char *node,
                                     const char *file_node, bool file_added);

#endif
