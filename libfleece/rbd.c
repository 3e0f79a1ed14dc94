/* Ceph RBD building blocks of the RBD fleecing storage: images created and
 * removed with librbd, and QEMU's rbd driver options for them (rbd.h).
 *
 * Image features.  New images get layering, exclusive-lock, object-map and
 * fast-diff, with the object size as stripe unit and stripe count 1:
 *   - object-map + fast-diff (which need exclusive-lock) make librbd know
 *     which RADOS objects exist: "rbd du" and diff_iterate with
 *     whole_object are read from the object map instead of listing
 *     objects, so space accounting is instant and exact per object, and
 *     a discard of an object that is not there costs no OSD round trip.
 *     A whole-object discard (what the backup job's discard-source sends
 *     when its cluster is a multiple of the object size) removes the
 *     object and clears its bit, so the space comes back at once.
 *   - exclusive-lock: required by object-map; one writer (QEMU) at a time
 *     is what a fleecing image has anyway.
 *   - layering: no cost, and what every other image of the pool has.
 *   - not deep-flatten (only matters for clones with snapshots, which
 *     fleecing images never have) nor journaling (doubles the writes).
 *   - striping: explicit stripe unit = object size, count 1, so a
 *     ceph.conf with rbd_default_stripe_* cannot spread one job cluster
 *     over several objects (a discard would then free nothing).
 *
 * Removal never deletes another image than the one the caller names by
 * id: see fleece_rbd_remove(). */
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <rados/librados.h>
#include <rbd/librbd.h>

#include "internal.h"
#include "rbd.h"

#define FLEECE_RBD_FEATURES                                              \
  (RBD_FEATURE_LAYERING | RBD_FEATURE_EXCLUSIVE_LOCK |                    \
   RBD_FEATURE_OBJECT_MAP | RBD_FEATURE_FAST_DIFF)

/* librbd refuses an object map of more objects (cls_rbd's
 * MAX_OBJECT_MAP_OBJECT_COUNT): with 64 KiB objects images end at 15.2
 * TiB, with 1 MiB at 244 TiB. */
#define OBJECT_MAP_MAX_OBJECTS 256000000ull

#define NAME_MAX_LEN 255
#define ID_MAX_LEN 64

struct FleeceRbd {
  char *pool;
  char *ns;                 /* NULL: the default namespace */
  char *spec;               /* pool[/ns], for messages */
  char *conf;
  char *id;                 /* client id, "admin" unless set */
  char *keyring;
  char *key;                /* base64, never in messages or descriptions */
  char *mon_host;
  uint64_t object_size;
  unsigned timeout;         /* s */
  unsigned busy_timeout;    /* s */
  /* the connection, once made */
  rados_t cluster;
  rados_ioctx_t io;
  char *fsid;
};

static const char *const known_keys =
  "conf, id, keyring, key, mon_host, object-size, timeout, busy-timeout";

/* ---- names and values --------------------------------------------- */

static bool
valid_name (const char *s)
{
  size_t n;

  if (!s)
    return false;
  n = strlen (s);
  if (n == 0 || n > NAME_MAX_LEN || s[0] == '-' || strcmp (s, ".") == 0
      || strcmp (s, "..") == 0)
    return false;
  for (const char *p = s; *p; p++)
    if (!g_ascii_isalnum (*p) && !strchr ("._+-", *p))
      return false;
  return true;
}

static bool
check_name (const char *s, const char *what, GError **err)
{
  if (valid_name (s))
    return true;
  g_set_error (err, FLEECE_ERROR, EINVAL,
               "invalid RBD %s name \"%s\": 1 to %d characters of A-Z a-z "
               "0-9 . _ + -, not starting with '-'", what,
               s ? s : "(null)", NAME_MAX_LEN);
  return false;
}

/* RBD image ids are lower-case hex (client instance id + random). */
static bool
check_image_id (const char *id, GError **err)
{
  size_t n = id ? strlen (id) : 0;

  if (n > 0 && n <= ID_MAX_LEN) {
    const char *p = id;
    while (*p && g_ascii_isalnum (*p))
      p++;
    if (!*p)
      return true;
  }
  g_set_error (err, FLEECE_ERROR, EINVAL, "invalid RBD image id \"%s\"",
               id ? id : "(null)");
  return false;
}

static bool
check_abs_path (const char *key, const char *v, GError **err)
{
  if (v[0] != '/' || strlen (v) > PATH_MAX) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "RBD option %s: \"%s\" is not an absolute path", key, v);
    return false;
  }
  for (const char *p = v; *p; p++)
    if ((unsigned char) *p < 0x20 || *p == 0x7f) {
      g_set_error (err, FLEECE_ERROR, EINVAL,
                   "RBD option %s: the path has control characters", key);
      return false;
    }
  return true;
}

/* A cephx key: base64 of at least 16 bytes. */
static bool
check_key (const char *v, GError **err)
{
  size_t n = strlen (v);
  gsize dlen = 0;
  guchar *d;

  for (const char *p = v; *p; p++)
    if (!g_ascii_isalnum (*p) && *p != '+' && *p != '/' && *p != '=')
      goto bad;
  if (n == 0 || n % 4 != 0 || n > 1024)
    goto bad;
  d = g_base64_decode (v, &dlen);
  if (d)
    memset (d, 0, dlen);
  g_free (d);
  if (dlen >= 16)
    return true;
bad:
  g_set_error (err, FLEECE_ERROR, EINVAL,
               "RBD option key: not a base64 cephx key (as in a keyring's "
               "\"key = ...\" line)");
  return false;
}

static bool
parse_uint (const char *v, uint64_t max, bool suffixes, uint64_t *out)
{
  char *end;
  guint64 n, mult = 1;

  if (!v || !g_ascii_isdigit (v[0]))
    return false;
  errno = 0;
  n = g_ascii_strtoull (v, &end, 10);
  if (errno)
    return false;
  if (suffixes && *end) {
    switch (*end) {
    case 'k': case 'K': mult = 1024; break;
    case 'm': case 'M': mult = 1024 * 1024; break;
    default: return false;
    }
    end++;
    if (*end == 'i' || *end == 'I')
      end++;
    if (*end == 'b' || *end == 'B')
      end++;
  }
  if (*end || n > max / mult)
    return false;
  *out = n * mult;
  return true;
}

/* One monitor of a mon_host list as QEMU's InetSocketAddressBase. */
typedef struct {
  char *host;
  char *port;
} MonAddr;

static void
mon_addr_clear (gpointer p)
{
  MonAddr *m = p;
  g_free (m->host);
  g_free (m->port);
}

/* "host", "host:port", "[v6]", "[v6]:port", separated by , ; or spaces. */
static GArray *
parse_mon_host (const char *v, GError **err)
{
  g_autoptr (GArray) out = g_array_new (FALSE, TRUE, sizeof (MonAddr));
  g_auto (GStrv) items = NULL;

  g_array_set_clear_func (out, mon_addr_clear);
  items = g_strsplit_set (v, ",; \t", -1);
  for (char **it = items; *it; it++) {
    const char *s = *it, *port = NULL;
    g_autofree char *host = NULL;
    MonAddr m;

    if (!*s)
      continue;
    if (s[0] == '[') {
      const char *close = strchr (s, ']');
      if (!close || close == s + 1)
        goto bad;
      host = g_strndup (s + 1, close - s - 1);
      if (close[1] == ':')
        port = close + 2;
      else if (close[1])
        goto bad;
      for (const char *p = host; *p; p++)
        if (!g_ascii_isxdigit (*p) && *p != ':' && *p != '.')
          goto bad;
    } else {
      const char *colon = strchr (s, ':');
      if (colon && strchr (colon + 1, ':'))
        goto bad;           /* a bare IPv6 address, or v1:/v2: prefixes */
      host = colon ? g_strndup (s, colon - s) : g_strdup (s);
      port = colon ? colon + 1 : NULL;
      if (!*host)
        goto bad;
      for (const char *p = host; *p; p++)
        if (!g_ascii_isalnum (*p) && *p != '.' && *p != '-')
          goto bad;
    }
    if (port) {
      uint64_t pn;
      if (!parse_uint (port, 65535, false, &pn) || pn == 0)
        goto bad;
    }
    m.host = g_steal_pointer (&host);
    m.port = g_strdup (port ? port : "6789");
    g_array_append_val (out, m);
    continue;
bad:
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "RBD option mon_host: \"%s\" is not host[:port] (IPv6 as "
                 "[address]:port; no v1:/v2: prefixes)", s);
    return NULL;
  }
  if (out->len == 0) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "RBD option mon_host is empty");
    return NULL;
  }
  return g_steal_pointer (&out);
}

static void
set_str (char **field, const char *v)
{
  g_free (*field);
  *field = g_strdup (v);
}

static void
free_key (FleeceRbd *r)
{
  if (r->key) {
    memset (r->key, 0, strlen (r->key));
    g_free (r->key);
    r->key = NULL;
  }
}

/* ---- construction -------------------------------------------------- */

FleeceRbd *
fleece_rbd_new (const char *pool, const char *ns, GError **err)
{
  FleeceRbd *r;

  if (!check_name (pool, "pool", err))
    return NULL;
  if (ns && *ns && !check_name (ns, "namespace", err))
    return NULL;
  r = g_new0 (FleeceRbd, 1);
  r->pool = g_strdup (pool);
  r->ns = ns && *ns ? g_strdup (ns) : NULL;
  r->spec = r->ns ? g_strdup_printf ("%s/%s", pool, ns) : g_strdup (pool);
  r->id = g_strdup ("admin");
  r->object_size = FLEECE_RBD_DEFAULT_OBJECT_SIZE;
  r->timeout = FLEECE_RBD_DEFAULT_TIMEOUT;
  r->busy_timeout = FLEECE_RBD_DEFAULT_BUSY_TIMEOUT;
  return r;
}

/* object-size, timeout and busy-timeout. */
static bool
set_number_option (FleeceRbd *r, const char *key, const char *value, GError **err)
{
  bool busy = key[0] == 'b';
  uint64_t n;

  if (key[0] == 'o') {
    if (!parse_uint (value, UINT64_MAX, true, &n) || n < FLEECE_RBD_MIN_OBJECT_SIZE
        || n > FLEECE_RBD_MAX_OBJECT_SIZE || (n & (n - 1)) != 0) {
      g_set_error (err, FLEECE_ERROR, EINVAL,
                   "RBD option object-size: \"%s\" is not a power of two "
                   "from 4K to 32M", value);
      return false;
    }
    r->object_size = n;
    return true;
  }
  if (!parse_uint (value, 3600, false, &n) || (!busy && n == 0)) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "RBD option %s: \"%s\" is not %s to 3600 (seconds)", key,
                 value, busy ? "0" : "1");
    return false;
  }
  if (busy)
    r->busy_timeout = n;
  else
    r->timeout = n;
  return true;
}

bool
fleece_rbd_set_option (FleeceRbd *r, const char *key, const char *value,
                       GError **err)
{
  if (!r || !key || !value) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "RBD option: key and value needed");
    return false;
  }
  if (r->cluster) {
    g_set_error (err, FLEECE_ERROR, EBUSY,
                 "RBD option %s: the storage is connected already", key);
    return false;
  }
  if (strcmp (key, "conf") == 0 || strcmp (key, "keyring") == 0) {
    if (!check_abs_path (key, value, err))
      return false;
    if (key[0] == 'k' && r->key) {
      g_set_error (err, FLEECE_ERROR, EINVAL,
                   "RBD options key and keyring exclude each other");
      return false;
    }
    set_str (key[0] == 'c' ? &r->conf : &r->keyring, value);
  } else if (strcmp (key, "id") == 0) {
    if (g_str_has_prefix (value, "client.")) {
      g_set_error (err, FLEECE_ERROR, EINVAL,
                   "RBD option id: give the client id without \"client.\" "
                   "(\"%s\")", value + strlen ("client."));
      return false;
    }
    if (!check_name (value, "client id", err))
      return false;
    set_str (&r->id, value);
  } else if (strcmp (key, "key") == 0) {
    if (r->keyring) {
      g_set_error (err, FLEECE_ERROR, EINVAL,
                   "RBD options key and keyring exclude each other");
      return false;
    }
    if (!check_key (value, err))
      return false;
    free_key (r);
    r->key = g_strdup (value);
  } else if (strcmp (key, "mon_host") == 0) {
    g_autoptr (GArray) a = parse_mon_host (value, err);
    if (!a)
      return false;
    set_str (&r->mon_host, value);
  } else if (strcmp (key, "object-size") == 0 || strcmp (key, "timeout") == 0
             || strcmp (key, "busy-timeout") == 0) {
    return set_number_option (r, key, value, err);
  } else {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "unknown RBD storage option \"%s\" (known: %s)", key,
                 known_keys);
    return false;
  }
  return true;
}

uint64_t
fleece_rbd_object_size (const FleeceRbd *r)
{
  return r->object_size;
}

const char *
fleece_rbd_spec (const FleeceRbd *r)
{
  return r->spec;
}

uint64_t
fleece_rbd_features (void)
{
  return FLEECE_RBD_FEATURES;
}

void
fleece_rbd_free (FleeceRbd *r)
{
  if (!r)
    return;
  if (r->io)
    rados_ioctx_destroy (r->io);
  if (r->cluster)
    rados_shutdown (r->cluster);
  g_free (r->pool);
  g_free (r->ns);
  g_free (r->spec);
  g_free (r->conf);
  g_free (r->id);
  g_free (r->keyring);
  free_key (r);
  g_free (r->mon_host);
  g_free (r->fsid);
  g_free (r);
}

/* ---- the connection ------------------------------------------------ */

/* "the Ceph cluster of /etc/ceph/ceph.conf (monitors ...)" */
static char *
cluster_desc (FleeceRbd *r, rados_t cluster)
{
  char mons[1024] = "";

  if (cluster)
    rados_conf_get (cluster, "mon_host", mons, sizeof mons);
  if (!mons[0] && r->mon_host)
    g_strlcpy (mons, r->mon_host, sizeof mons);
  if (r->conf)
    return g_strdup_printf ("the Ceph cluster of %s (monitors %s)", r->conf,
                            mons[0] ? mons : "none configured");
  return g_strdup_printf ("the Ceph cluster at monitors %s",
                          mons[0] ? mons : "(none configured: set conf or mon_host)");
}

/* Does something accept TCP connections at host:port within 1 s? */
static bool
tcp_answers (const char *host, const char *port)
{
  struct addrinfo hints = { .ai_socktype = SOCK_STREAM,
                            .ai_flags = AI_NUMERICSERV };
  struct addrinfo *res = NULL;
  bool ok = false;

  if (getaddrinfo (host, port, &hints, &res) != 0)
    return false;
  for (struct addrinfo *a = res; a && !ok; a = a->ai_next) {
    int fd = socket (a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                     a->ai_protocol);
    struct pollfd pfd = { .fd = fd, .events = POLLOUT };
    int soerr = 0;
    socklen_t len = sizeof soerr;

    if (fd < 0)
      continue;
    if (connect (fd, a->ai_addr, a->ai_addrlen) == 0
        || (errno == EINPROGRESS && poll (&pfd, 1, 1000) == 1
            && getsockopt (fd, SOL_SOCKET, SO_ERROR, &soerr, &len) == 0
            && soerr == 0))
      ok = true;
    close (fd);
  }
  freeaddrinfo (res);
  return ok;
}

/* The first monitor of a mon_host value (Ceph's syntax: "a,b:6789",
 * "[v2:1.2.3.4:3300,v1:1.2.3.4:6789]") that answers on TCP, as
 * "host:port" (g_free), or NULL.  IPv4 and names only: a hint for an
 * error message, not a client. */
static char *
answering_monitor (const char *mon_host)
{
  g_auto (GStrv) items = g_strsplit_set (mon_host ? mon_host : "", ",; []", -1);

  for (char **it = items; *it; it++) {
    const char *s = *it, *colon;
    g_autofree char *host = NULL;

    if (g_str_has_prefix (s, "v1:") || g_str_has_prefix (s, "v2:")
        || g_str_has_prefix (s, "any:"))
      s = strchr (s, ':') + 1;
    if (!*s || strchr (s, '/'))
      continue;
    colon = strchr (s, ':');
    if (colon && strchr (colon + 1, ':'))
      continue;                 /* IPv6 */
    host = colon ? g_strndup (s, colon - s) : g_strdup (s);
    if (colon ? tcp_answers (host, colon + 1)
        : tcp_answers (host, "3300") || tcp_answers (host, "6789"))
      return colon ? g_strdup (s) : g_strdup (host);
  }
  return NULL;
}

static bool
conf_set (rados_t cluster, const char *k, const char *v, GError **err)
{
  int rc = rados_conf_set (cluster, k, v);
  if (rc < 0) {
    g_set_error (err, FLEECE_ERROR, -rc, "could not set Ceph option %s: %s",
                 k, g_strerror (-rc));
    return false;
  }
  return true;
}

/* The client's settings, before connecting: the caller's conf (as QEMU
 * does: it must be readable; without one, Ceph's default conf is read if
 * there is one), the timeouts, then monitors and credentials. */
static bool
configure_cluster (FleeceRbd *r, rados_t cluster, GError **err)
{
  g_autofree char *tmo = g_strdup_printf ("%u", r->timeout);
  int rc = rados_conf_read_file (cluster, r->conf);

  if (rc < 0 && r->conf) {
    g_set_error (err, FLEECE_ERROR, -rc, "could not read the Ceph config %s: %s",
                 r->conf, g_strerror (-rc));
    return false;
  }
  /* A library has no admin socket in its caller's process (it would also
   * collide with QEMU's for the same client name), and says what went
   * wrong through its errors, not on the caller's stderr. */
  if (!conf_set (cluster, "admin_socket", "", err)
      || !conf_set (cluster, "log_to_stderr", "false", err)
      || !conf_set (cluster, "err_to_stderr", "false", err)
      || !conf_set (cluster, "client_mount_timeout", tmo, err)
      || !conf_set (cluster, "rados_mon_op_timeout", tmo, err)
      || !conf_set (cluster, "rados_osd_op_timeout", tmo, err)
      || (r->mon_host && !conf_set (cluster, "mon_host", r->mon_host, err))
      || (r->keyring && !conf_set (cluster, "keyring", r->keyring, err)))
    return false;
  if (r->key && (rc = rados_conf_set (cluster, "key", r->key)) < 0) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "Ceph did not take the key: %s",
                 g_strerror (-rc));
    return false;
  }
  return true;
}

/* Why rados_connect failed with rc, in words that say what to check. */
static void
connect_error (FleeceRbd *r, rados_t cluster, const char *client, int rc,
               GError **err)
{
  g_autofree char *desc = cluster_desc (r, cluster);

  switch (-rc) {
  case ETIMEDOUT: {
    /* librados says the same when no monitor is reachable and when they
     * are but refuse the key: tell the two apart. */
    char mons[1024] = "";
    g_autofree char *up = NULL;
    rados_conf_get (cluster, "mon_host", mons, sizeof mons);
    up = answering_monitor (mons);
    if (up)
      g_set_error (err, FLEECE_ERROR, EACCES,
                   "could not connect to %s as %s within %u s: the monitor "
                   "at %s answers, but did not let %s in (wrong key or "
                   "keyring, or no such client?)", desc, client,
                   r->timeout, up, client);
    else
      g_set_error (err, FLEECE_ERROR, ETIMEDOUT,
                   "could not connect to %s as %s within %u s: no monitor "
                   "answered (is the cluster up and reachable?)", desc,
                   client, r->timeout);
    break;
  }
  case EACCES:
  case EPERM:
    g_set_error (err, FLEECE_ERROR, EACCES,
                 "%s refused %s: %s (wrong key or keyring, or no such "
                 "client?)", desc, client, g_strerror (-rc));
    break;
  case ENOENT:
  case EINVAL:
    g_set_error (err, FLEECE_ERROR, -rc,
                 "could not connect to %s as %s: %s (no monitors or no "
                 "key configured?)", desc, client, g_strerror (-rc));
    break;
  default:
    g_set_error (err, FLEECE_ERROR, -rc, "could not connect to %s as %s: %s",
                 desc, client, g_strerror (-rc));
  }
}

/* r->io on the pool, in the namespace if one is given (which must
 * exist: librbd would otherwise fail later with less to go on). */
static bool
open_pool (FleeceRbd *r, rados_t cluster, GError **err)
{
  bool exists = false;
  int rc = rados_ioctx_create (cluster, r->pool, &r->io);

  if (rc < 0) {
    g_autofree char *desc = cluster_desc (r, cluster);
    if (rc == -ENOENT)
      g_set_error (err, FLEECE_ERROR, ENOENT, "there is no pool '%s' in %s",
                   r->pool, desc);
    else
      g_set_error (err, FLEECE_ERROR, -rc, "could not open pool '%s' of %s: %s",
                   r->pool, desc, g_strerror (-rc));
    r->io = NULL;
    return false;
  }
  if (!r->ns)
    return true;
  rados_ioctx_set_namespace (r->io, r->ns);
  rc = rbd_namespace_exists (r->io, r->ns, &exists);
  if (rc >= 0 && exists)
    return true;
  if (rc < 0)
    g_set_error (err, FLEECE_ERROR, -rc,
                 "could not look up RBD namespace '%s' of pool '%s': %s",
                 r->ns, r->pool, g_strerror (-rc));
  else
    g_set_error (err, FLEECE_ERROR, ENOENT,
                 "there is no RBD namespace '%s' in pool '%s' (create it "
                 "with: rbd namespace create %s)", r->ns, r->pool, r->spec);
  rados_ioctx_destroy (r->io);
  r->io = NULL;
  return false;
}

bool
fleece_rbd_connect (FleeceRbd *r, GError **err)
{
  rados_t cluster = NULL;
  g_autofree char *client = NULL;
  char fsid[64] = "";
  int rc;

  if (r->io)
    return true;
  client = g_strdup_printf ("client.%s", r->id);
  rc = rados_create2 (&cluster, "ceph", client, 0);
  if (rc < 0) {
    g_set_error (err, FLEECE_ERROR, -rc, "could not set up librados for %s: %s",
                 client, g_strerror (-rc));
    return false;
  }
  if (!configure_cluster (r, cluster, err))
    goto fail;
  if ((rc = rados_connect (cluster)) < 0) {
    connect_error (r, cluster, client, rc, err);
    goto fail;
  }
  if (!open_pool (r, cluster, err))
    goto fail;
  if (rados_cluster_fsid (cluster, fsid, sizeof fsid) > 0)
    r->fsid = g_strdup (fsid);
  r->cluster = cluster;
  return true;

fail:
  rados_shutdown (cluster);
  return false;
}

/* ---- pool fullness ------------------------------------------------- */

/* The flags_names of the pool in the osdmap (g_free), or NULL. */
static char *
pool_flags (FleeceRbd *r)
{
  const char *cmd[] = { "{\"prefix\": \"osd dump\", \"format\": \"json\"}" };
  char *out = NULL, *outs = NULL;
  size_t outlen = 0, outslen = 0;
  char *flags = NULL;
  json_object *dump, *pools;

  if (rados_mon_command (r->cluster, cmd, 1, "", 0, &out, &outlen, &outs,
                         &outslen) < 0)
    goto done;
  /* outbuf is not NUL-terminated */
  {
    json_tokener *tok = json_tokener_new ();
    dump = out && outlen > 0 && outlen < INT_MAX
      ? json_tokener_parse_ex (tok, out, (int) outlen) : NULL;
    if (dump && json_tokener_get_error (tok) != json_tokener_success) {
      json_object_put (dump);
      dump = NULL;
    }
    json_tokener_free (tok);
  }
  if (dump && json_object_object_get_ex (dump, "pools", &pools)
      && json_object_is_type (pools, json_type_array)) {
    for (size_t i = 0; i < json_object_array_length (pools); i++) {
      json_object *p = json_object_array_get_idx (pools, i), *v;
      if (json_object_object_get_ex (p, "pool_name", &v)
          && g_strcmp0 (json_object_get_string (v), r->pool) == 0
          && json_object_object_get_ex (p, "flags_names", &v)) {
        flags = g_strdup (json_object_get_string (v));
        break;
      }
    }
  }
  json_object_put (dump);
done:
  if (out)
    rados_buffer_free (out);
  if (outs)
    rados_buffer_free (outs);
  return flags;
}

static bool
has_flag (const char *flags, const char *flag)
{
  g_auto (GStrv) v = g_strsplit (flags ? flags : "", ",", -1);
  return g_strv_contains ((const char *const *) v, flag);
}

bool
fleece_rbd_check_space (FleeceRbd *r, GError **err)
{
  g_autofree char *flags = NULL;

  if (!fleece_rbd_connect (r, err))
    return false;
  flags = pool_flags (r);
  if (has_flag (flags, "full_quota")) {
    g_set_error (err, FLEECE_ERROR, EDQUOT,
                 "pool '%s' has reached its quota (Ceph pool flags: %s)",
                 r->pool, flags);
    return false;
  }
  if (has_flag (flags, "full")) {
    g_set_error (err, FLEECE_ERROR, ENOSPC,
                 "pool '%s' is full: its OSDs have no space left, writes to "
                 "it wait until space is freed (Ceph pool flags: %s)",
                 r->pool, flags);
    return false;
  }
  return true;
}

/* Replace a write error that may come from a full pool with the real
 * cause. */
static void
explain_write_error (FleeceRbd *r, int rc, GError **err, const char *fmt, ...)
  G_GNUC_PRINTF (4, 5);

static void
explain_write_error (FleeceRbd *r, int rc, GError **err, const char *fmt, ...)
{
  g_autofree char *what = NULL;
  g_autoptr (GError) full = NULL;
  va_list ap;

  va_start (ap, fmt);
  what = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  if ((rc == -ETIMEDOUT || rc == -ENOSPC || rc == -EDQUOT)
      && !fleece_rbd_check_space (r, &full)) {
    g_set_error (err, FLEECE_ERROR, full->code, "%s: %s", what, full->message);
    return;
  }
  if (rc == -ETIMEDOUT)
    g_set_error (err, FLEECE_ERROR, ETIMEDOUT,
                 "%s: no answer from the cluster within %u s", what, r->timeout);
  else
    g_set_error (err, FLEECE_ERROR, -rc, "%s: %s", what, g_strerror (-rc));
}

/* ---- images -------------------------------------------------------- */

static bool
image_get_id (rbd_image_t img, char **id, GError **err, const char *name)
{
  char buf[ID_MAX_LEN + 1];
  int rc = rbd_get_id (img, buf, sizeof buf);

  if (rc < 0) {
    g_set_error (err, FLEECE_ERROR, -rc, "could not read the id of RBD image "
                 "'%s': %s", name, g_strerror (-rc));
    return false;
  }
  *id = g_strdup (buf);
  return true;
}

/* Open name read-only; 0, or -errno with err set (not for ENOENT when
 * quiet_enoent). */
static int
open_ro (FleeceRbd *r, const char *name, rbd_image_t *img, bool quiet_enoent,
         GError **err)
{
  int rc = rbd_open_read_only (r->io, name, img, NULL);

  if (rc < 0) {
    *img = NULL;
    if (rc != -ENOENT || !quiet_enoent)
      g_set_error (err, FLEECE_ERROR, -rc, "could not open RBD image %s/%s: %s",
                   r->spec, name, rc == -ENOENT ? "it does not exist"
                   : g_strerror (-rc));
  }
  return rc;
}

/* A size an RBD image with the storage's object size can have. */
static bool
check_size (FleeceRbd *r, const char *name, uint64_t size, GError **err)
{
  if (size == 0) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "RBD image %s/%s: a size of 0 bytes", r->spec, name);
    return false;
  }
  if ((size + r->object_size - 1) / r->object_size > OBJECT_MAP_MAX_OBJECTS) {
    uint64_t need = r->object_size;
    while ((size + need - 1) / need > OBJECT_MAP_MAX_OBJECTS)
      need *= 2;
    g_set_error (err, FLEECE_ERROR, EFBIG,
                 "RBD image %s/%s of %" G_GUINT64_FORMAT " bytes would have "
                 "more than %llu objects of %" G_GUINT64_FORMAT " bytes, more "
                 "than an RBD object map takes; use object-size %"
                 G_GUINT64_FORMAT " or more", r->spec, name, size,
                 OBJECT_MAP_MAX_OBJECTS, r->object_size, need);
    return false;
  }
  return true;
}

bool
fleece_rbd_create (FleeceRbd *r, const char *name, uint64_t size,
                   char **image_id, GError **err)
{
  rbd_image_options_t opts;
  rbd_image_t img = NULL;
  int rc, order = 0;
  uint64_t actual = 0;

  *image_id = NULL;
  if (!check_name (name, "image", err))
    return false;
  if (!check_size (r, name, size, err))
    return false;
  if (!fleece_rbd_connect (r, err))
    return false;
  while ((1ull << order) < r->object_size)
    order++;
  rbd_image_options_create (&opts);
  rbd_image_options_set_uint64 (opts, RBD_IMAGE_OPTION_FORMAT, 2);
  rbd_image_options_set_uint64 (opts, RBD_IMAGE_OPTION_FEATURES,
                                FLEECE_RBD_FEATURES);
  rbd_image_options_set_uint64 (opts, RBD_IMAGE_OPTION_ORDER, order);
  rbd_image_options_set_uint64 (opts, RBD_IMAGE_OPTION_STRIPE_UNIT,
                                r->object_size);
  rbd_image_options_set_uint64 (opts, RBD_IMAGE_OPTION_STRIPE_COUNT, 1);
  rc = rbd_create4 (r->io, name, size, opts);
  rbd_image_options_destroy (opts);
  if (rc == -EEXIST) {
    g_set_error (err, FLEECE_ERROR, EEXIST,
                 "RBD image %s/%s exists already (not ours: it is left alone)",
                 r->spec, name);
    return false;
  }
  if (rc < 0) {
    explain_write_error (r, rc, err, "could not create RBD image %s/%s "
                         "(%" G_GUINT64_FORMAT " bytes)", r->spec, name, size);
    return false;
  }
  /* The id, from the image we just made (a concurrent remove and
   * re-create of the name in between is not defended against: the window
   * is one round trip, and only another client removing our fresh image
   * could open it). */
  if (open_ro (r, name, &img, false, err) < 0)
    return false;
  if (!image_get_id (img, image_id, err, name))
    goto fail;
  rc = rbd_get_size (img, &actual);
  if (rc < 0 || actual != size) {
    g_set_error (err, FLEECE_ERROR, rc < 0 ? -rc : EIO,
                 "RBD image %s/%s: size %" G_GUINT64_FORMAT " instead of %"
                 G_GUINT64_FORMAT, r->spec, name, actual, size);
    goto fail;
  }
  rbd_close (img);
  return true;

fail:
  rbd_close (img);
  /* Made but unusable: take it away again (by its id, if we learnt it). */
  if (*image_id)
    fleece_rbd_remove (r, name, *image_id, NULL);
  g_clear_pointer (image_id, g_free);
  return false;
}

bool
fleece_rbd_rename (FleeceRbd *r, const char *from, const char *to,
                   const char *image_id, GError **err)
{
  g_autofree char *id = NULL;
  int rc;

  if (!check_name (from, "image", err) || !check_name (to, "image", err) ||
      !check_image_id (image_id, err) ||
      !(id = fleece_rbd_image_id (r, from, err)))
    return false;
  if (strcmp (id, image_id) != 0) {
    g_set_error (err, FLEECE_ERROR, EPERM, "RBD image %s/%s is %s, not %s: "
                 "not renaming it", r->spec, from, id, image_id);
    return false;
  }
  /* librbd refuses an existing destination: nothing is ever replaced. */
  rc = rbd_rename (r->io, from, to);
  if (rc == -EEXIST) {
    g_set_error (err, FLEECE_ERROR, EEXIST, "RBD image %s/%s exists already "
                 "(not ours: it is left alone)", r->spec, to);
    return false;
  }
  if (rc < 0) {
    g_set_error (err, FLEECE_ERROR, -rc, "could not rename RBD image %s/%s to "
                 "%s: %s", r->spec, from, to, g_strerror (-rc));
    return false;
  }
  return true;
}

char *
fleece_rbd_image_id (FleeceRbd *r, const char *name, GError **err)
{
  rbd_image_t img;
  char *id = NULL;

  if (!check_name (name, "image", err) || !fleece_rbd_connect (r, err))
    return NULL;
  if (open_ro (r, name, &img, false, err) < 0)
    return NULL;
  image_get_id (img, &id, err, name);
  rbd_close (img);
  return id;
}

/* Number of watchers of an open image, or -errno. */
static int
count_watchers (rbd_image_t img, char **first)
{
  rbd_image_watcher_t w[16];
  size_t n = G_N_ELEMENTS (w);
  int rc = rbd_watchers_list (img, w, &n);

  if (rc == -ERANGE)
    return (int) n;
  if (rc < 0)
    return rc;
  if (n > 0 && first) {
    g_free (*first);
    *first = g_strdup_printf ("client.%" G_GINT64_FORMAT " at %s", w[0].id,
                              w[0].addr);
  }
  rbd_watchers_list_cleanup (w, n);
  return (int) n;
}

/* The trash entry with id, if any (0, or -ENOENT / -errno). */
static int
trash_get (FleeceRbd *r, const char *id, char **name)
{
  rbd_trash_image_info_t info;
  int rc = rbd_trash_get (r->io, id, &info);

  if (rc < 0)
    return rc;
  *name = g_strdup (info.name);
  rbd_trash_get_cleanup (&info);
  return 0;
}

static bool
trash_remove (FleeceRbd *r, const char *id, const char *name, GError **err)
{
  int rc = rbd_trash_remove (r->io, id, true);

  if (rc < 0 && rc != -ENOENT) {
    g_set_error (err, FLEECE_ERROR, -rc,
                 "could not remove RBD image %s/%s (id %s) from the trash: %s",
                 r->spec, name, id, g_strerror (-rc));
    return false;
  }
  return true;
}

/* After a trash move by name took another image than ours (the name was
 * re-pointed in between): put every image of that name that went to the
 * trash since `since` and is not ours back under its name. */
static void
restore_foreign (FleeceRbd *r, const char *name, const char *our_id,
                 time_t since, GString *note)
{
  rbd_trash_image_info_t e[64];
  size_t n = G_N_ELEMENTS (e);

  if (rbd_trash_list (r->io, e, &n) < 0)
    return;
  for (size_t i = 0; i < n; i++) {
    if (strcmp (e[i].name, name) == 0 && strcmp (e[i].id, our_id) != 0
        && e[i].source == RBD_TRASH_IMAGE_SOURCE_USER
        && e[i].deletion_time >= since) {
      int rc = rbd_trash_restore (r->io, e[i].id, name);
      g_string_append_printf (note, "; image %s was put back%s%s", e[i].id,
                              rc < 0 ? " but failed: " : "",
                              rc < 0 ? g_strerror (-rc) : "");
    }
  }
  rbd_trash_list_cleanup (e, n);
}

static bool remove_image (FleeceRbd *r, const char *name,
                          const char *image_id, GError **err);

bool
fleece_rbd_remove (FleeceRbd *r, const char *name, const char *image_id,
                   GError **err)
{
  bool ok;

  if (!check_name (name, "image", err) || !check_image_id (image_id, err)
      || !fleece_rbd_connect (r, err))
    return false;
  /* Removing is what frees a full pool: let its few metadata writes
   * through as "rbd rm" does (the OSDs still refuse them above their
   * failsafe ratio). */
  rados_set_pool_full_try (r->io);
  ok = remove_image (r, name, image_id, err);
  rados_unset_pool_full_try (r->io);
  return ok;
}

typedef enum { IMAGE_OURS, IMAGE_GONE, IMAGE_ERROR } ImageState;

/* Whether name still is the run's image image_id with no one else
 * holding it open (QEMU still attached, or killed and its watch not yet
 * timed out: a trash move would take it from under its user); waits up
 * to the busy timeout for that. */
static ImageState
prove_idle (FleeceRbd *r, const char *name, const char *image_id, GError **err)
{
  rbd_image_t img = NULL;
  g_autofree char *cur = NULL, *tname = NULL, *watcher = NULL;
  gint64 deadline;
  int rc, nw;

  rc = open_ro (r, name, &img, true, err);
  if (rc == -ENOENT)
    return IMAGE_GONE;
  if (rc < 0)
    return IMAGE_ERROR;
  if (!image_get_id (img, &cur, err, name)) {
    rbd_close (img);
    return IMAGE_ERROR;
  }
  if (strcmp (cur, image_id) != 0) {
    rbd_close (img);
    if (trash_get (r, image_id, &tname) == 0)
      trash_remove (r, image_id, name, NULL);
    g_set_error (err, FLEECE_ERROR, EPERM,
                 "RBD image %s/%s is image %s, not %s (the one this run "
                 "created): not removing it", r->spec, name, cur, image_id);
    return IMAGE_ERROR;
  }
  deadline = g_get_monotonic_time () + (gint64) r->busy_timeout * G_USEC_PER_SEC;
  while ((nw = count_watchers (img, &watcher)) > 0
         && g_get_monotonic_time () < deadline)
    g_usleep (250 * 1000);
  rbd_close (img);
  if (nw < 0)
    g_set_error (err, FLEECE_ERROR, -nw,
                 "could not list the watchers of RBD image %s/%s: %s", r->spec,
                 name, g_strerror (-nw));
  else if (nw > 0)
    g_set_error (err, FLEECE_ERROR, EBUSY,
                 "RBD image %s/%s (id %s) is still open by %s%s after %u s: "
                 "not removing it", r->spec, name, image_id, watcher,
                 nw > 1 ? " and others" : "", r->busy_timeout);
  return nw == 0 ? IMAGE_OURS : IMAGE_ERROR;
}

/* An image already gone from its name is done with, unless it is in the
 * trash under our id (a remove that was interrupted): then finish it. */
static bool
remove_gone (FleeceRbd *r, const char *name, const char *image_id, GError **err)
{
  g_autofree char *tname = NULL;

  if (trash_get (r, image_id, &tname) == 0)
    return trash_remove (r, image_id, name, err);
  return true;
}

/* Move name to the RBD trash (which resolves the name once and then
 * works by that id): 1 moved, 0 nothing left to remove, -1 error. */
static int
trash_move_ours (FleeceRbd *r, const char *name, const char *image_id, GError **err)
{
  int rc = rbd_trash_move (r->io, name, 0);

  if (rc == -ENOENT) {
    /* Gone meanwhile - or not: librbd also says ENOENT when it could not
     * add the image to the trash (e.g. the pool is full). */
    rbd_image_t img = NULL;
    g_autofree char *cur = NULL;
    if (open_ro (r, name, &img, true, NULL) == 0) {
      image_get_id (img, &cur, NULL, name);
      rbd_close (img);
    }
    if (!cur || strcmp (cur, image_id) != 0)
      return remove_gone (r, name, image_id, err) ? 0 : -1;
    rc = fleece_rbd_check_space (r, NULL) ? -EIO : -ENOSPC;
  }
  if (rc >= 0)
    return 1;
  if (rc == -ENOSPC)
    g_set_error (err, FLEECE_ERROR, ENOSPC,
                 "could not remove RBD image %s/%s (id %s): pool '%s' is "
                 "full and its OSDs refuse the metadata writes of a remove "
                 "(moving the image to the RBD trash); free space or raise "
                 "the full ratio for a moment (ceph osd set-full-ratio)",
                 r->spec, name, image_id, r->pool);
  else
    explain_write_error (r, rc, err, "could not move RBD image %s/%s (id %s) "
                         "to the trash to remove it", r->spec, name, image_id);
  return -1;
}

static bool
remove_image (FleeceRbd *r, const char *name, const char *image_id,
              GError **err)
{
  g_autofree char *tname = NULL;
  time_t t0;
  int rc;

  switch (prove_idle (r, name, image_id, err)) {
  case IMAGE_GONE:
    return remove_gone (r, name, image_id, err);
  case IMAGE_ERROR:
    return false;
  case IMAGE_OURS:
    break;
  }
  t0 = time (NULL);
  if ((rc = trash_move_ours (r, name, image_id, err)) <= 0)
    return rc == 0;
  /* The delete that follows is by our id only. */
  if (trash_get (r, image_id, &tname) != 0) {
    g_autoptr (GString) note = g_string_new ("");
    restore_foreign (r, name, image_id, t0, note);
    g_set_error (err, FLEECE_ERROR, EAGAIN,
                 "RBD image %s/%s changed while it was being removed: it is no "
                 "longer image %s%s", r->spec, name, image_id, note->str);
    return false;
  }
  rc = rbd_trash_remove (r->io, image_id, true);
  if (rc < 0 && rc != -ENOENT) {
    /* E.g. opened again in the meantime: put it back as it was. */
    int rr = rbd_trash_restore (r->io, image_id, name);
    g_set_error (err, FLEECE_ERROR, -rc,
                 "could not remove RBD image %s/%s (id %s): %s%s", r->spec,
                 name, image_id, g_strerror (-rc),
                 rr < 0 ? " (it stays in the RBD trash; a later remove takes it)"
                 : "");
    return false;
  }
  return true;
}

/* ---- QEMU ---------------------------------------------------------- */

json_object *
fleece_rbd_blockdev (FleeceRbd *r, const char *name, const char *node_name,
                     const char *secret_id)
{
  json_object *o = json_object_new_object ();

  json_object_object_add (o, "driver", json_object_new_string ("rbd"));
  if (node_name)
    json_object_object_add (o, "node-name", json_object_new_string (node_name));
  json_object_object_add (o, "pool", json_object_new_string (r->pool));
  if (r->ns)
    json_object_object_add (o, "namespace", json_object_new_string (r->ns));
  json_object_object_add (o, "image", json_object_new_string (name));
  json_object_object_add (o, "user", json_object_new_string (r->id));
  if (r->conf) {
    json_object_object_add (o, "conf", json_object_new_string (r->conf));
  } else if (r->mon_host) {
    g_autoptr (GArray) mons = parse_mon_host (r->mon_host, NULL);
    json_object *servers = json_object_new_array ();
    for (guint i = 0; mons && i < mons->len; i++) {
      MonAddr *m = &g_array_index (mons, MonAddr, i);
      json_object *s = json_object_new_object ();
      json_object_object_add (s, "host", json_object_new_string (m->host));
      json_object_object_add (s, "port", json_object_new_string (m->port));
      json_object_array_add (servers, s);
    }
    json_object_object_add (o, "server", servers);
  }
  if (secret_id) {
    if (!r->conf) {
      json_object *acr = json_object_new_array ();
      json_object_array_add (acr, json_object_new_string ("cephx"));
      json_object_object_add (o, "auth-client-required", acr);
    }
    json_object_object_add (o, "key-secret", json_object_new_string (secret_id));
  }
  return o;
}

/* client.<id>'s key in a keyring file (g_free). */
static char *
keyring_key (const char *path, const char *id, GError **err)
{
  g_autofree char *text = NULL, *section = NULL;
  g_autoptr (GError) e = NULL;
  g_auto (GStrv) lines = NULL;
  bool in = false;
  char *key = NULL;

  if (!g_file_get_contents (path, &text, NULL, &e)) {
    g_set_error (err, FLEECE_ERROR, e->code == G_FILE_ERROR_NOENT ? ENOENT : EACCES,
                 "could not read the keyring %s: %s", path, e->message);
    return NULL;
  }
  section = g_strdup_printf ("[client.%s]", id);
  lines = g_strsplit (text, "\n", -1);
  memset (text, 0, strlen (text));
  for (char **l = lines; *l && !key; l++) {
    char *s = g_strstrip (*l), *eq;
    if (s[0] == '[') {
      in = strcmp (s, section) == 0;
      continue;
    }
    if (!in || !(eq = strchr (s, '=')))
      continue;
    *eq = '\0';
    if (strcmp (g_strstrip (s), "key") == 0) {
      char *v = g_strstrip (eq + 1);
      if (check_key (v, NULL))
        key = g_strdup (v);
    }
  }
  for (char **l = lines; *l; l++)
    memset (*l, 0, strlen (*l));
  if (!key)
    g_set_error (err, FLEECE_ERROR, ENOKEY,
                 "the keyring %s has no valid key for client.%s", path, id);
  return key;
}

bool
fleece_rbd_qemu_key (FleeceRbd *r, char **key_base64, GError **err)
{
  *key_base64 = NULL;
  if (r->key) {
    *key_base64 = g_strdup (r->key);
    return true;
  }
  if (r->keyring) {
    *key_base64 = keyring_key (r->keyring, r->id, err);
    return *key_base64 != NULL;
  }
  return true;
}

json_object *
fleece_rbd_secret_object (FleeceRbd *r, const char *secret_id, GError **err)
{
  g_autofree char *key = NULL;
  json_object *o;

  if (!fleece_rbd_qemu_key (r, &key, err) || !key)
    return NULL;
  o = json_object_new_object ();
  json_object_object_add (o, "qom-type", json_object_new_string ("secret"));
  json_object_object_add (o, "id", json_object_new_string (secret_id));
  json_object_object_add (o, "data", json_object_new_string (key));
  json_object_object_add (o, "format", json_object_new_string ("base64"));
  memset (key, 0, strlen (key));
  return o;
}

/* QEMU's qemu_rbd_next_tok() splits on ':' (and '/', '@' in the image
 * part) unless escaped with '\'. */
static void
append_escaped (GString *s, const char *v)
{
  for (; *v; v++) {
    if (*v == ':' || *v == '\\')
      g_string_append_c (s, '\\');
    g_string_append_c (s, *v);
  }
}

char *
fleece_rbd_legacy_filename (FleeceRbd *r, const char *name)
{
  GString *s = g_string_new ("rbd:");

  g_string_append_printf (s, "%s/", r->pool);
  if (r->ns)
    g_string_append_printf (s, "%s/", r->ns);
  g_string_append_printf (s, "%s:id=%s", name, r->id);
  if (r->conf) {
    g_string_append (s, ":conf=");
    append_escaped (s, r->conf);
  }
  if (r->keyring) {
    g_string_append (s, ":keyring=");
    append_escaped (s, r->keyring);
  }
  if (r->mon_host && !r->conf) {
    g_autoptr (GArray) mons = parse_mon_host (r->mon_host, NULL);
    g_string_append (s, ":mon_host=");
    for (guint i = 0; mons && i < mons->len; i++) {
      MonAddr *m = &g_array_index (mons, MonAddr, i);
      g_autofree char *one = strchr (m->host, ':')
        ? g_strdup_printf ("[%s]:%s", m->host, m->port)
        : g_strdup_printf ("%s:%s", m->host, m->port);
      if (i)
        g_string_append_c (s, ';');
      append_escaped (s, one);
    }
  }
  return g_string_free (s, FALSE);
}

/* ---- the record ---------------------------------------------------- */

json_object *
fleece_rbd_describe (const FleeceRbd *r)
{
  json_object *o = json_object_new_object ();

  json_object_object_add (o, "type", json_object_new_string ("rbd"));
  json_object_object_add (o, "pool", json_object_new_string (r->pool));
  if (r->ns)
    json_object_object_add (o, "namespace", json_object_new_string (r->ns));
  if (r->conf)
    json_object_object_add (o, "conf", json_object_new_string (r->conf));
  json_object_object_add (o, "id", json_object_new_string (r->id));
  if (r->keyring)
    json_object_object_add (o, "keyring", json_object_new_string (r->keyring));
  if (r->mon_host)
    json_object_object_add (o, "mon_host", json_object_new_string (r->mon_host));
  json_object_object_add (o, "object-size",
                          json_object_new_int64 ((int64_t) r->object_size));
  if (r->key)
    json_object_object_add (o, "key", json_object_new_boolean (true));
  if (r->fsid)
    json_object_object_add (o, "fsid", json_object_new_string (r->fsid));
  return o;
}

static const char *
jstr (json_object *o, const char *key)
{
  json_object *v;

  if (!json_object_object_get_ex (o, key, &v) || !v
      || !json_object_is_type (v, json_type_string))
    return NULL;
  return json_object_get_string (v);
}

FleeceRbd *
fleece_rbd_from_description (json_object *desc, GError **err)
{
  g_autoptr (FleeceRbd) r = NULL;
  static const char *const opts[] = { "conf", "id", "keyring", "mon_host" };
  json_object *v;

  if (!desc || !json_object_is_type (desc, json_type_object)
      || g_strcmp0 (jstr (desc, "type"), "rbd") != 0) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "not a description of an RBD storage");
    return NULL;
  }
  r = fleece_rbd_new (jstr (desc, "pool"), jstr (desc, "namespace"), err);
  if (!r)
    return NULL;
  for (size_t i = 0; i < G_N_ELEMENTS (opts); i++)
    if (jstr (desc, opts[i])
        && !fleece_rbd_set_option (r, opts[i], jstr (desc, opts[i]), err))
      return NULL;
  if (json_object_object_get_ex (desc, "object-size", &v)) {
    g_autofree char *s = g_strdup_printf ("%" G_GINT64_FORMAT,
                                          json_object_get_int64 (v));
    if (!json_object_is_type (v, json_type_int)
        || !fleece_rbd_set_option (r, "object-size", s, err)) {
      if (err && !*err)
        g_set_error (err, FLEECE_ERROR, EINVAL, "RBD description: bad object-size");
      return NULL;
    }
  }
  return g_steal_pointer (&r);
}

bool
fleece_rbd_same (const FleeceRbd *r, json_object *desc)
{
  const char *fsid, *ns;

  if (!r || !desc || g_strcmp0 (jstr (desc, "type"), "rbd") != 0
      || g_strcmp0 (jstr (desc, "pool"), r->pool) != 0)
    return false;
  ns = jstr (desc, "namespace");
  if (g_strcmp0 (ns && *ns ? ns : NULL, r->ns) != 0)
    return false;
  fsid = jstr (desc, "fsid");
  if (fsid && r->fsid)
    return g_ascii_strcasecmp (fsid, r->fsid) == 0;
  if (jstr (desc, "conf") || r->conf)
    return g_strcmp0 (jstr (desc, "conf"), r->conf) == 0;
  return g_strcmp0 (jstr (desc, "mon_host"), r->mon_host) == 0;
}

/* ---- tests and measurements ---------------------------------------- */

static int
usage_cb (uint64_t off, size_t len, int exists, void *arg)
{
  if (exists)
    *(uint64_t *) arg += len;
  return 0;
}

bool
fleece_rbd_image_usage (FleeceRbd *r, const char *name, bool exact,
                        uint64_t *bytes, GError **err)
{
  rbd_image_t img;
  uint64_t size = 0;
  int rc;

  *bytes = 0;
  if (!check_name (name, "image", err) || !fleece_rbd_connect (r, err)
      || open_ro (r, name, &img, false, err) < 0)
    return false;
  rc = rbd_get_size (img, &size);
  if (rc == 0)
    rc = rbd_diff_iterate2 (img, NULL, 0, size, 0, exact ? 0 : 1, usage_cb,
                            bytes);
  rbd_close (img);
  if (rc < 0) {
    g_set_error (err, FLEECE_ERROR, -rc, "could not read the extents of RBD "
                 "image %s/%s: %s", r->spec, name, g_strerror (-rc));
    return false;
  }
  return true;
}

bool
fleece_rbd_image_info (FleeceRbd *r, const char *name, uint64_t *size,
                       uint64_t *object_size, uint64_t *features, GError **err)
{
  rbd_image_t img;
  rbd_image_info_t info;
  uint64_t f = 0;
  int rc;

  if (!check_name (name, "image", err) || !fleece_rbd_connect (r, err)
      || open_ro (r, name, &img, false, err) < 0)
    return false;
  rc = rbd_stat (img, &info, sizeof info);
  if (rc == 0)
    rc = rbd_get_features (img, &f);
  rbd_close (img);
  if (rc < 0) {
    g_set_error (err, FLEECE_ERROR, -rc, "could not stat RBD image %s/%s: %s",
                 r->spec, name, g_strerror (-rc));
    return false;
  }
  if (size)
    *size = info.size;
  if (object_size)
    *object_size = info.obj_size;
  if (features)
    *features = f;
  return true;
}

static int
cmp_names (gconstpointer a, gconstpointer b)
{
  return strcmp (*(char *const *) a, *(char *const *) b);
}

char **
fleece_rbd_list (FleeceRbd *r, GError **err)
{
  rbd_image_spec_t *specs = NULL;
  size_t n = 16;
  GPtrArray *names;
  int rc;

  if (!fleece_rbd_connect (r, err))
    return NULL;
  for (;;) {
    specs = g_new0 (rbd_image_spec_t, n);
    rc = rbd_list2 (r->io, specs, &n);
    if (rc != -ERANGE)
      break;
    g_free (specs);
  }
  if (rc < 0) {
    g_free (specs);
    g_set_error (err, FLEECE_ERROR, -rc, "could not list the RBD images of %s: %s",
                 r->spec, g_strerror (-rc));
    return NULL;
  }
  names = g_ptr_array_new ();
  for (size_t i = 0; i < n; i++)
    g_ptr_array_add (names, g_strdup (specs[i].name));
  rbd_image_spec_list_cleanup (specs, n);
  g_free (specs);
  g_ptr_array_sort (names, cmp_names);
  g_ptr_array_add (names, NULL);
  return (char **) g_ptr_array_free (names, FALSE);
}
