/* Backup targets (internal view of struct fleece_target). */
#ifndef FLEECE_TARGET_H
#define FLEECE_TARGET_H

#include "internal.h"

G_BEGIN_DECLS

typedef enum {
  FLEECE_TARGET_DIR,
  FLEECE_TARGET_NBD,
  FLEECE_TARGET_PVE,
  FLEECE_TARGET_FD,
} FleeceTargetKind;

struct fleece_target {
  FleeceTargetKind kind;
  char *dir, *format;          /* dir (format also fd: "vma" / "raw") */
  char *base;                  /* dir: the previous backup of the chain */
  char *uri, *nbd_socket, *nbd_host; /* nbd */
  int nbd_port;
  json_object *pve_args;       /* pve; fd (vma): more backup arguments */
  int fd;                      /* fd, -1 once handed over */
};

/* For the record: {"type": ...}. */
json_object *fleece_target_describe (const struct fleece_target *t);
/* dir targets: <key>.<format> (g_free). */
char *fleece_target_file_name (const struct fleece_target *t, const char *key);
/* dir targets: <dir>/<key>.<format> (g_free). */
char *fleece_target_dir_path (const struct fleece_target *t, const char *key);
/* dir targets with a base: the backing file of key's image, relative to
 * the target dir ("../2026-12-01/scsi0.qcow2"), and its format; false with
 * err if the base has no image of key. */
bool fleece_target_backing (const struct fleece_target *t, const char *key,
                            char **backing, const char **backing_fmt,
                            GError **err);
/* dir targets: create the image file of drive key (sparse and size bytes
 * for raw, empty for qcow2) through a run-tagged pending name (run); the
 * record entry gets "target-file" {"dir", "name", "pending", "identity"}. */
bool fleece_target_create_file (const struct fleece_target *t, const char *key,
                                uint64_t size, const char *run,
                                json_object *entry, GError **err);
/* The pending name is no longer needed (the identity is recorded). */
void fleece_target_commit_file (json_object *entry);
/* Remove the file a record entry's "target-file" describes, if provably
 * the run's (run: the record's run id); 0 nothing of ours left, 1 another
 * file has the name, -1. */
int fleece_target_remove_file (json_object *entry, const char *run,
                               GError **err);
/* dir targets: blockdev-add arguments of the file node for drive key. */
json_object *fleece_target_file_blockdev (const struct fleece_target *t,
                                          const char *key,
                                          const char *file_node);
/* blockdev-add arguments of the target node for drive key; a dir target's
 * file node inline, or by name if it was added before (file_added).  A
 * qcow2 image with a backing file is opened without its backing chain:
 * the job writes only what changed. */
json_object *fleece_target_blockdev (const struct fleece_target *t,
                                     const char *key, const char *node,
                                     const char *file_node, bool file_added);
/* fd targets: take the fd (the caller hands it to QEMU, which gets its
 * own copy; ours is closed with the target). */
int fleece_target_fd (const struct fleece_target *t);

G_END_DECLS

#endif
