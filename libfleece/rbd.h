/* Ceph RBD building blocks of the RBD fleecing storage (internal).
 *
 * A FleeceRbd names a pool (and optionally an RBD namespace) of one Ceph
 * cluster, how to reach the cluster (a ceph.conf, or monitor addresses)
 * and as whom (client id, keyring or key).  It creates and removes raw RBD
 * images with librbd, and builds what QEMU's rbd block driver needs to
 * attach them.  It connects lazily, on the first call that needs the
 * cluster, keeps one connection and closes it in fleece_rbd_free().
 *
 * Errors are GErrors of domain FLEECE_ERROR whose code is an errno value.
 * Messages name the pool/namespace/image and, for connection problems, the
 * monitors and the conf; they never contain the key.
 *
 * One FleeceRbd is used by one thread at a time; different FleeceRbds may
 * be used in parallel threads (each has its own librados connection).  A
 * connection does not survive fork() (librados' threads stay in the
 * parent): a child process makes its own FleeceRbd, e.g. with
 * fleece_rbd_from_description().  Built only when librbd is found (meson
 * option "rbd"). */
#ifndef FLEECE_RBD_H
#define FLEECE_RBD_H

#include <stdbool.h>
#include <stdint.h>
#include <glib.h>
#include <json-c/json.h>

G_BEGIN_DECLS

typedef struct FleeceRbd FleeceRbd;

/* The object size of new images when the option "object-size" is not
 * given: 1 MiB, from the measurements in bench/rbd/README.md. */
#define FLEECE_RBD_DEFAULT_OBJECT_SIZE (1024 * 1024)
/* The limits of "object-size": RBD's orders 12 ... 25. */
#define FLEECE_RBD_MIN_OBJECT_SIZE (4 * 1024)
#define FLEECE_RBD_MAX_OBJECT_SIZE (32 * 1024 * 1024)
/* The default of "timeout" (seconds): connecting to the monitors, each
 * monitor command and each OSD operation of this module's own connection
 * (not QEMU's) gives up after it. */
#define FLEECE_RBD_DEFAULT_TIMEOUT 15
/* The default of "busy-timeout" (seconds): how long fleece_rbd_remove()
 * waits for the watchers of an image to go away.  A client that died
 * without closing the image (QEMU killed with SIGKILL) keeps its watch
 * until the OSD times it out (osd_client_watch_timeout, 30 s). */
#define FLEECE_RBD_DEFAULT_BUSY_TIMEOUT 40

/* A storage in pool (namespace ns, NULL or "" for the pool's default
 * namespace) of the cluster the options will name.  Nothing is connected.
 * Pool and namespace names are 1 to 255 characters of A-Z a-z 0-9 . _ + -,
 * not "." or "..", and not starting with "-" (Ceph allows more, but "/",
 * "@" and ":" are separators in RBD image specs and in QEMU's legacy rbd:
 * filenames, and the others are not worth the quoting).  EINVAL
 * otherwise. */
FleeceRbd *fleece_rbd_new (const char *pool, const char *ns, GError **err);

/* Set an option (before the first call that connects; EBUSY after):
 *   conf         absolute path of a ceph.conf; QEMU is given the same path.
 *                Without it, librados and QEMU read Ceph's default conf if
 *                there is one, and "mon_host" names the monitors.
 *   id           client id without "client." (default "admin").
 *   keyring      absolute path of a keyring holding client.<id>'s key.
 *                QEMU has no keyring option: the key is read from this
 *                file and given to QEMU as a secret object.
 *   key          the base64 cephx key of client.<id>, instead of a
 *                keyring; given to QEMU as a secret object.
 *   mon_host     monitors, a list of host[:port] (IPv6 in brackets)
 *                separated by "," ";" or spaces; port 6789 (msgr v1) when
 *                none is given.  For QEMU they become "server" entries.
 *   object-size  bytes (suffix K/M allowed), a power of two from 4 KiB to
 *                32 MiB; default FLEECE_RBD_DEFAULT_OBJECT_SIZE.
 *   timeout      seconds (1 ... 3600) for this module's cluster
 *                operations; default FLEECE_RBD_DEFAULT_TIMEOUT.
 *   busy-timeout seconds (0 ... 3600) fleece_rbd_remove() waits for an
 *                image's watchers; default FLEECE_RBD_DEFAULT_BUSY_TIMEOUT.
 * Unknown keys, bad values, and "key" together with "keyring" are
 * EINVAL (the message lists the known keys). */
bool fleece_rbd_set_option (FleeceRbd *r, const char *key, const char *value,
                            GError **err);

/* The object size new images get (bytes): the allocation unit of the
 * storage.  A backup job's cluster must be at least this big, or its
 * discards free nothing. */
uint64_t fleece_rbd_object_size (const FleeceRbd *r);

/* "pool" or "pool/namespace", for messages (static to r). */
const char *fleece_rbd_spec (const FleeceRbd *r);

/* Connect now (the calls below connect on their own when needed).  A
 * cluster that does not answer fails after "timeout" seconds with an
 * error naming the monitors and the conf: ETIMEDOUT when no monitor
 * accepts a TCP connection, EACCES when one does but does not let the
 * client in (wrong key, keyring or id: librados itself only times out);
 * an unreadable conf, a missing pool or namespace is ENOENT. */
bool fleece_rbd_connect (FleeceRbd *r, GError **err);

/* Create the raw RBD image name (format 2) of exactly size bytes with the
 * configured object size and the features layering, exclusive-lock,
 * object-map and fast-diff, and return its RBD image id (g_free).  Never
 * reuses or overwrites: an existing image of that name is EEXIST (the
 * check and the creation are one atomic step in Ceph).  A pool that is
 * full or over its quota is ENOSPC / EDQUOT, saying so.  size must be > 0
 * and at most 256000000 objects (the most an RBD object map takes: 15.2
 * TiB with 64 KiB objects, 244 TiB with 1 MiB ones); larger is EFBIG,
 * naming the object size that would do.
 * The image name follows the pool name rules (the storage layer
 * restricts it further to vm-<vmid>-fleece-<n>). */
bool fleece_rbd_create (FleeceRbd *r, const char *name, uint64_t size,
                        char **image_id, GError **err);

/* Remove the image name only if name refers to the image image_id (the id
 * fleece_rbd_create returned).  Returns true when it is removed or there
 * is no image of that name (nor one with image_id in the RBD trash, left
 * by an interrupted remove: that one is removed by id).
 *   - name refers to another image (a pre-existing or re-created one):
 *     EPERM naming both ids, that image untouched (image_id, if it is in
 *     the trash, is removed all the same);
 *   - the image is open (watchers) for longer than "busy-timeout": EBUSY,
 *     nothing touched.
 * How: the image is opened read-only by name and its id compared; after
 * the watcher check it is moved to the trash by name (librbd resolves the
 * name to an id once, then works by id); the trash entry with image_id is
 * then removed by id, so only image_id's data can ever be deleted.  If the
 * name was re-pointed to another image between the check and the move
 * (someone removed ours and created another), that image is the one that
 * went to the trash: it is restored under its name at once and the call
 * fails with EAGAIN.
 * Removing works on a full pool as far as Ceph lets it (its metadata
 * writes go with FULL_TRY, as "rbd rm"'s do); a pool so full that Ceph
 * refuses even those (e.g. the pool's RBD trash object does not exist
 * yet) is ENOSPC, saying what to do, and the image stays as it was. */
bool fleece_rbd_remove (FleeceRbd *r, const char *name, const char *image_id,
                        GError **err);

/* Rename image from (which must be image_id: EPERM otherwise) to to,
 * never replacing an image: EEXIST if to exists. */
bool fleece_rbd_rename (FleeceRbd *r, const char *from, const char *to,
                        const char *image_id, GError **err);

/* The image id of name (g_free), NULL with ENOENT if there is none. */
char *fleece_rbd_image_id (FleeceRbd *r, const char *name, GError **err);

/* QEMU's BlockdevOptions of the protocol layer for image name (a new
 * reference):
 *   {"driver": "rbd", "pool", ["namespace"], "image", "user",
 *    ["conf"], ["server": [{"host", "port"}], "auth-client-required":
 *    ["cephx"]], ["key-secret": secret_id], ["node-name": node_name]}
 * "conf" when a conf is set; otherwise "server" from mon_host (and no
 * "conf": QEMU then reads Ceph's default conf if there is one).
 * "key-secret" (and, without a conf, auth-client-required cephx) only when
 * secret_id is given: pass the id of the object fleece_rbd_secret_object()
 * made whenever it made one.  node_name and secret_id may be NULL. */
json_object *fleece_rbd_blockdev (FleeceRbd *r, const char *name,
                                  const char *node_name,
                                  const char *secret_id);

/* The key QEMU must be given as a secret (base64, g_free): the "key"
 * option, or client.<id>'s key read from the "keyring" option's file.
 * Sets *key_base64 to NULL (and returns true) when QEMU needs none (it
 * reads the keyring its conf names, or auth is off).  An unreadable
 * keyring or one without client.<id> is an error. */
bool fleece_rbd_qemu_key (FleeceRbd *r, char **key_base64, GError **err);

/* The object-add arguments of the secret QEMU needs, with id secret_id:
 * {"qom-type": "secret", "id", "data": <base64 key>, "format": "base64"},
 * or NULL without error when none is needed.  Holds the key: never log or
 * record it. */
json_object *fleece_rbd_secret_object (FleeceRbd *r, const char *secret_id,
                                       GError **err);

/* QEMU's legacy filename of the image, for HMP drive_add on QEMU < 10:
 * rbd:<pool>/[<namespace>/]<name>:id=<id>[:conf=<conf>][:keyring=<path>]
 * [:mon_host=<h:p;h:p>], with ':' and '\' in values escaped by '\' as
 * QEMU's parser wants (g_free).  Never the key: when
 * fleece_rbd_secret_object() makes a secret, give its id to drive_add as
 * the drive option file.key-secret=<id> (the protocol node's option; a
 * plain key-secret or password-secret goes to the format node and is
 * ignored, and QEMU then hangs in librados' connect for 300 s).  Inside
 * HMP's "...", '\' and '"' must be escaped once more. */
char *fleece_rbd_legacy_filename (FleeceRbd *r, const char *name);

/* For the durable record (a new reference), never the key:
 * {"type": "rbd", "pool", ["namespace"], ["conf"], "id", ["keyring"],
 *  ["mon_host"], "object-size", ["key": true when a key was given: a
 *  cleanup must be given it again], ["fsid": the cluster's, when
 *  connected]}. */
json_object *fleece_rbd_describe (const FleeceRbd *r);

/* A FleeceRbd from such a description (not connected; the key, if the
 * description says one was used, must be set again with "key").  EINVAL
 * if it is not a valid RBD description. */
FleeceRbd *fleece_rbd_from_description (json_object *desc, GError **err);

/* Is desc (fleece_rbd_describe's) the storage r names: same pool and
 * namespace of the same cluster?  The cluster is compared by fsid when
 * desc has one and r is connected, else by conf path, else by mon_host.
 * The client id, keyring and object size do not matter.  No I/O. */
bool fleece_rbd_same (const FleeceRbd *r, json_object *desc);

/* Does the pool have room?  false with ENOSPC ("pool 'rbd' is full") or
 * EDQUOT (quota reached) when Ceph has flagged the pool full, true
 * otherwise (also when the flags cannot be read).  For explaining writes
 * that stall or fail. */
bool fleece_rbd_check_space (FleeceRbd *r, GError **err);

/* ---- for tests and measurements ---------------------------------- */

/* Bytes of image name that hold data.  exact=false: whole RADOS objects
 * that exist (from the object map: fast, what "rbd du" shows);
 * exact=true: the extents librbd reports without whole_object (what
 * "rbd diff" shows). */
bool fleece_rbd_image_usage (FleeceRbd *r, const char *name, bool exact,
                             uint64_t *bytes, GError **err);

/* Size (bytes), object size and features of image name. */
bool fleece_rbd_image_info (FleeceRbd *r, const char *name, uint64_t *size,
                            uint64_t *object_size, uint64_t *features,
                            GError **err);

/* Sorted names of the images in the pool/namespace (g_strfreev). */
char **fleece_rbd_list (FleeceRbd *r, GError **err);

/* The image features fleece_rbd_create uses (RBD_FEATURE_* bits). */
uint64_t fleece_rbd_features (void);

void fleece_rbd_free (FleeceRbd *r);

G_DEFINE_AUTOPTR_CLEANUP_FUNC (FleeceRbd, fleece_rbd_free)

G_END_DECLS

#endif
