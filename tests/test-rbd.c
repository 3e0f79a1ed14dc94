/* The RBD building blocks (libfleece/rbd.c) against a real, throwaway Ceph
 * cluster and a real QEMU: exact sizes, never reusing or removing an image
 * that is not ours, QEMU's rbd driver with a conf and with a key secret,
 * discard freeing space, a full pool, a dead cluster.
 *
 * Needs $FLEECE_CEPH_UP (tl-ceph.h); skipped (77) otherwise.  The unit
 * cases (names, options, JSON) run without a cluster: "test-rbd unit". */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <unistd.h>

#include <check.h>
#include <rbd/librbd.h>

#include "internal.h"
#include "rbd.h"
#include "tl-ceph.h"
#include "tl-only.h"

#define KiB 1024ull
#define MiB (1024ull * 1024)

static TlCeph *ceph;        /* the main cluster */
static TlCeph *ceph_full;   /* a small one that we fill */

/* ---- helpers ----------------------------------------------------------- */

#define assert_error(e, want, substr)                                        \
  do {                                                                       \
    ck_assert_msg ((e) != NULL, "expected an error");                        \
    ck_assert_msg ((e)->domain == FLEECE_ERROR && (e)->code == (want),       \
                   "expected %s, got %s: %s", g_strerror (want),             \
                   g_strerror ((e)->code), (e)->message);                    \
    ck_assert_msg (strstr ((e)->message, (substr)) != NULL,                  \
                   "\"%s\" not in \"%s\"", (substr), (e)->message);          \
  } while (0)

static FleeceRbd *
rbd_with (TlCeph *c, const char *ns, const char *object_size)
{
  g_autoptr (GError) err = NULL;
  FleeceRbd *r = fleece_rbd_new (c->pool, ns, &err);

  ck_assert_msg (r != NULL, "%s", err ? err->message : "");
  ck_assert (fleece_rbd_set_option (r, "conf", c->conf, &err));
  if (object_size)
    ck_assert (fleece_rbd_set_option (r, "object-size", object_size, &err));
  return r;
}

static char *
create_ok (FleeceRbd *r, const char *name, uint64_t size)
{
  g_autoptr (GError) err = NULL;
  char *id = NULL;

  ck_assert_msg (fleece_rbd_create (r, name, size, &id, &err),
                 "create %s: %s", name, err ? err->message : "");
  ck_assert (id != NULL && *id);
  return id;
}

static void
remove_ok (FleeceRbd *r, const char *name, const char *id)
{
  g_autoptr (GError) err = NULL;

  ck_assert_msg (fleece_rbd_remove (r, name, id, &err), "remove %s: %s", name,
                 err ? err->message : "");
}

static bool
listed (FleeceRbd *r, const char *name)
{
  g_autoptr (GError) err = NULL;
  g_auto (GStrv) names = fleece_rbd_list (r, &err);

  ck_assert_msg (names != NULL, "%s", err ? err->message : "");
  return g_strv_contains ((const char *const *) names, name);
}

/* The id `rbd info` shows (g_free), or NULL if there is no such image. */
static char *
cli_id (TlCeph *c, const char *spec)
{
  g_autofree char *out = tl_ceph_cmd (c, NULL, "rbd", "info", "--format",
                                      "json", spec, NULL);
  json_object *o, *v;
  char *id = NULL;

  if (!out)
    return NULL;
  o = json_tokener_parse (out);
  if (o && json_object_object_get_ex (o, "id", &v))
    id = g_strdup (json_object_get_string (v));
  json_object_put (o);
  return id;
}

static bool
trash_empty (TlCeph *c, const char *ns)
{
  g_autofree char *out = NULL;

  if (ns)
    out = tl_ceph_cmd_ok (c, "rbd", "trash", "ls", "--namespace", ns, c->pool,
                          NULL);
  else
    out = tl_ceph_cmd_ok (c, "rbd", "trash", "ls", c->pool, NULL);
  return *g_strstrip (out) == '\0';
}

static uint64_t
usage (FleeceRbd *r, const char *name, bool exact)
{
  g_autoptr (GError) err = NULL;
  uint64_t n = 0;

  ck_assert_msg (fleece_rbd_image_usage (r, name, exact, &n, &err), "%s",
                 err ? err->message : "");
  return n;
}

/* Attach name in q as a raw node "<node>" over "<node>-rbd" with
 * discard=unmap and plug it into a scsi-hd "<dev>" (SCSI: unplugs without
 * a guest).  secret_id: also object-add the secret. */
static void
qemu_attach (TlcQemu *q, FleeceRbd *r, const char *name, const char *node,
             const char *dev, const char *secret_id)
{
  g_autoptr (GError) err = NULL;
  g_autofree char *file_node = g_strdup_printf ("%s-rbd", node);
  json_object *bd = fleece_rbd_blockdev (r, name, file_node, secret_id);
  json_object *args = json_object_new_object ();
  g_autofree char *e = NULL;

  if (secret_id) {
    json_object *sec = fleece_rbd_secret_object (r, secret_id, &err);
    ck_assert_msg (sec != NULL, "secret: %s", err ? err->message : "none needed?");
    json_object_put (tlc_qmp (q, "object-add", sec));
  }
  json_object_object_add (args, "driver", json_object_new_string ("raw"));
  json_object_object_add (args, "node-name", json_object_new_string (node));
  json_object_object_add (args, "discard", json_object_new_string ("unmap"));
  json_object_object_add (args, "file", bd);
  json_object *ret = tlc_qmp_try (q, "blockdev-add", args, &e);
  ck_assert_msg (ret != NULL, "blockdev-add: %s", e);
  json_object_put (ret);
  json_object_put (tlc_qmp (q, "device_add", tlc_json (
      "{\"driver\": \"scsi-hd\", \"id\": \"%s\", \"drive\": \"%s\", "
      "\"bus\": \"scsihw0.0\"}", dev, node)));
}

static void
qemu_detach (TlcQemu *q, const char *node, const char *dev)
{
  json_object_put (tlc_qmp (q, "device_del", tlc_json ("{\"id\": \"%s\"}", dev)));
  /* scsi-hd goes at once; its BlockBackend with it. */
  for (int i = 0; i < 100; i++) {
    g_autofree char *e = NULL;
    json_object *r = tlc_qmp_try (q, "blockdev-del",
                                  tlc_json ("{\"node-name\": \"%s\"}", node), &e);
    if (r) {
      json_object_put (r);
      return;
    }
    g_usleep (50000);
  }
  ck_abort_msg ("blockdev-del %s never succeeded", node);
}

/* A time limit in seconds, 6 times as long under valgrind (meson's
 * valgrind setup sets FLEECE_UNDER_VALGRIND). */
static gint64
slow (gint64 seconds)
{
  return g_getenv ("FLEECE_UNDER_VALGRIND") ? 6 * seconds : seconds;
}

/* A TCP port nothing listens on. */
static int
dead_port (void)
{
  struct sockaddr_in sa = { .sin_family = AF_INET };
  socklen_t len = sizeof sa;
  int fd = socket (AF_INET, SOCK_STREAM, 0), port;

  sa.sin_addr.s_addr = htonl (INADDR_LOOPBACK);
  ck_assert (bind (fd, (struct sockaddr *) &sa, sizeof sa) == 0);
  getsockname (fd, (struct sockaddr *) &sa, &len);
  port = ntohs (sa.sin_port);
  close (fd);
  return port;
}

/* ---- unit: no cluster -------------------------------------------------- */

START_TEST (test_names)
{
  static const char *const bad[] = {
    "", "a/b", "a@b", "a:b", "-x", ".", "..", "a b", "a\nb", "a\\b", "ä",
    "a,b", "a=b", "a;b", "a\"b", NULL,
  };
  g_autofree char *longname = g_strnfill (256, 'a');
  g_autofree char *maxname = g_strnfill (255, 'a');

  for (size_t i = 0; bad[i]; i++) {
    g_autoptr (GError) e1 = NULL, e2 = NULL;
    ck_assert_ptr_null (fleece_rbd_new (bad[i], NULL, &e1));
    assert_error (e1, EINVAL, "invalid RBD pool name");
    if (*bad[i]) {
      ck_assert_ptr_null (fleece_rbd_new ("rbd", bad[i], &e2));
      assert_error (e2, EINVAL, "invalid RBD namespace name");
    }
  }
  {
    g_autoptr (GError) e = NULL;
    ck_assert_ptr_null (fleece_rbd_new (longname, NULL, &e));
    assert_error (e, EINVAL, "1 to 255");
  }
  {
    g_autoptr (GError) e = NULL;
    g_autoptr (FleeceRbd) r = fleece_rbd_new (maxname, "ns.1_a+b-c", &e);
    ck_assert_ptr_nonnull (r);
    ck_assert_ptr_null (fleece_rbd_new (NULL, NULL, NULL));
  }
  {
    /* an empty namespace is the default one */
    g_autoptr (FleeceRbd) r = fleece_rbd_new ("rbd", "", NULL);
    ck_assert_str_eq (fleece_rbd_spec (r), "rbd");
    g_autoptr (FleeceRbd) r2 = fleece_rbd_new ("rbd", "ns", NULL);
    ck_assert_str_eq (fleece_rbd_spec (r2), "rbd/ns");
  }
  {
    /* image names and ids are checked before anything connects */
    g_autoptr (FleeceRbd) r = fleece_rbd_new ("rbd", NULL, NULL);
    g_autoptr (GError) e1 = NULL, e2 = NULL, e3 = NULL, e4 = NULL;
    char *id = NULL;
    ck_assert (!fleece_rbd_create (r, "../x", 1024, &id, &e1));
    assert_error (e1, EINVAL, "invalid RBD image name");
    ck_assert (!fleece_rbd_remove (r, "vm-1-fleece-0", "../12", &e2));
    assert_error (e2, EINVAL, "invalid RBD image id");
    ck_assert (!fleece_rbd_remove (r, "vm-1-fleece-0", "", &e3));
    assert_error (e3, EINVAL, "invalid RBD image id");
    ck_assert (!fleece_rbd_create (r, "vm-1-fleece-0", 0, &id, &e4));
    assert_error (e4, EINVAL, "size of 0");
  }
  {
    /* more objects than an object map takes: said before connecting */
    g_autoptr (FleeceRbd) r = fleece_rbd_new ("rbd", NULL, NULL);
    g_autoptr (GError) e = NULL;
    char *id = NULL;
    ck_assert (fleece_rbd_set_option (r, "object-size", "64K", NULL));
    ck_assert (!fleece_rbd_create (r, "vm-1-fleece-0", 256000000ull * 65536 + 1,
                                   &id, &e));
    assert_error (e, EFBIG, "use object-size 131072 or more");
  }
}
END_TEST

START_TEST (test_options)
{
  g_autoptr (FleeceRbd) r = fleece_rbd_new ("rbd", NULL, NULL);
  static const char *const bad_sizes[] = {
    "0", "2K", "3000", "5M", "64M", "4096x", "-4096", "", "1e6",
    "99999999999999999999", NULL,
  };
  static const struct { const char *v; uint64_t n; } good_sizes[] = {
    { "4096", 4096 }, { "4K", 4096 }, { "64k", 65536 }, { "1M", MiB },
    { "4MiB", 4 * MiB }, { "33554432", 32 * MiB },
  };

  ck_assert_uint_eq (fleece_rbd_object_size (r), FLEECE_RBD_DEFAULT_OBJECT_SIZE);
  for (size_t i = 0; bad_sizes[i]; i++) {
    g_autoptr (GError) e = NULL;
    ck_assert_msg (!fleece_rbd_set_option (r, "object-size", bad_sizes[i], &e),
                   "%s taken", bad_sizes[i]);
    assert_error (e, EINVAL, "power of two");
  }
  for (size_t i = 0; i < G_N_ELEMENTS (good_sizes); i++) {
    ck_assert (fleece_rbd_set_option (r, "object-size", good_sizes[i].v, NULL));
    ck_assert_uint_eq (fleece_rbd_object_size (r), good_sizes[i].n);
  }
  {
    g_autoptr (GError) e = NULL;
    ck_assert (!fleece_rbd_set_option (r, "pool", "x", &e));
    assert_error (e, EINVAL, "known: conf, id, keyring, key, mon_host, object-size");
  }
  {
    g_autoptr (GError) e1 = NULL, e2 = NULL, e3 = NULL;
    ck_assert (!fleece_rbd_set_option (r, "conf", "ceph.conf", &e1));
    assert_error (e1, EINVAL, "not an absolute path");
    ck_assert (!fleece_rbd_set_option (r, "keyring", "a/keyring", &e2));
    assert_error (e2, EINVAL, "not an absolute path");
    ck_assert (!fleece_rbd_set_option (r, "conf", "/etc/ceph\n/x", &e3));
    assert_error (e3, EINVAL, "control characters");
  }
  {
    g_autoptr (GError) e1 = NULL, e2 = NULL, e3 = NULL;
    ck_assert (!fleece_rbd_set_option (r, "id", "client.admin", &e1));
    assert_error (e1, EINVAL, "without \"client.\"");
    ck_assert (!fleece_rbd_set_option (r, "id", "a b", &e2));
    assert_error (e2, EINVAL, "client id");
    ck_assert (!fleece_rbd_set_option (r, "id", "", &e3));
    ck_assert (fleece_rbd_set_option (r, "id", "fleece", NULL));
  }
  {
    g_autoptr (GError) e1 = NULL, e2 = NULL, e3 = NULL;
    ck_assert (!fleece_rbd_set_option (r, "key", "not base64!", &e1));
    assert_error (e1, EINVAL, "not a base64 cephx key");
    ck_assert (!fleece_rbd_set_option (r, "key", "AAAA", &e2));
    ck_assert (fleece_rbd_set_option (r, "key",
               "AQBn1ypnAAAAABAAtGQ0VYgo4c0ywDQKx5tQ3Q==", NULL));
    ck_assert (!fleece_rbd_set_option (r, "keyring", "/etc/ceph/k", &e3));
    assert_error (e3, EINVAL, "exclude each other");
  }
  {
    static const char *const bad_mons[] = {
      "", ",", "a:b", "[v2:1.2.3.4:3300,v1:1.2.3.4:6789]", "1.2.3.4:0",
      "1.2.3.4:70000", "::1", "[]:1", "a_b", NULL,
    };
    for (size_t i = 0; bad_mons[i]; i++) {
      g_autoptr (GError) e = NULL;
      ck_assert_msg (!fleece_rbd_set_option (r, "mon_host", bad_mons[i], &e),
                     "%s taken", bad_mons[i]);
      ck_assert_int_eq (e->code, EINVAL);
    }
    ck_assert (fleece_rbd_set_option (r, "mon_host",
               "10.0.0.1, 10.0.0.2:3300;[fd00::3]:6789 mon4.example", NULL));
  }
  {
    g_autoptr (GError) e1 = NULL, e2 = NULL;
    ck_assert (!fleece_rbd_set_option (r, "timeout", "0", &e1));
    ck_assert (!fleece_rbd_set_option (r, "timeout", "3601", &e2));
    ck_assert (fleece_rbd_set_option (r, "timeout", "5", NULL));
    ck_assert (fleece_rbd_set_option (r, "busy-timeout", "0", NULL));
  }
  ck_assert_uint_eq (fleece_rbd_features (),
                     RBD_FEATURE_LAYERING | RBD_FEATURE_EXCLUSIVE_LOCK
                     | RBD_FEATURE_OBJECT_MAP | RBD_FEATURE_FAST_DIFF);
}
END_TEST

static void
assert_json (json_object *o, const char *expected)
{
  json_object *e = json_tokener_parse (expected);
  ck_assert_msg (e && json_object_equal (o, e), "got %s\nwanted %s",
                 json_object_to_json_string (o), expected);
  json_object_put (e);
}

START_TEST (test_qemu_json)
{
  g_autoptr (FleeceRbd) a = fleece_rbd_new ("rbd", "ns1", NULL);
  g_autoptr (FleeceRbd) b = fleece_rbd_new ("pool-2", NULL, NULL);
  g_autoptr (FleeceRbd) c = fleece_rbd_new ("rbd", NULL, NULL);
  g_autoptr (GError) err = NULL;
  json_object *o;
  char *s, *key = NULL;
  g_autofree char *dir = tlc_tmpdir ("rbd-json");
  g_autofree char *keyring = g_build_filename (dir, "keyring", NULL);

  ck_assert (fleece_rbd_set_option (a, "conf", "/etc/pve/ceph:x.conf", NULL));
  ck_assert (fleece_rbd_set_option (a, "id", "fleece", NULL));
  o = fleece_rbd_blockdev (a, "vm-100-fleece-0", "scsi0-fleecing-file", NULL);
  assert_json (o, "{\"driver\": \"rbd\", \"node-name\": \"scsi0-fleecing-file\","
               " \"pool\": \"rbd\", \"namespace\": \"ns1\", \"image\": "
               "\"vm-100-fleece-0\", \"user\": \"fleece\", \"conf\": "
               "\"/etc/pve/ceph:x.conf\"}");
  json_object_put (o);
  /* a conf and no key: QEMU reads the keyring the conf names */
  ck_assert (fleece_rbd_qemu_key (a, &key, NULL));
  ck_assert_ptr_null (key);
  ck_assert_ptr_null (fleece_rbd_secret_object (a, "s0", &err));
  ck_assert_ptr_null (err);
  s = fleece_rbd_legacy_filename (a, "vm-100-fleece-0");
  ck_assert_str_eq (s, "rbd:rbd/ns1/vm-100-fleece-0:id=fleece:conf=/etc/pve/ceph\\:x.conf");
  g_free (s);

  ck_assert (fleece_rbd_set_option (b, "mon_host", "10.1.1.1,[fd00::1]:3300", NULL));
  ck_assert (fleece_rbd_set_option (b, "key",
             "AQBn1ypnAAAAABAAtGQ0VYgo4c0ywDQKx5tQ3Q==", NULL));
  o = fleece_rbd_blockdev (b, "vm-7-fleece-1", NULL, "fleece-rbd-key");
  assert_json (o, "{\"driver\": \"rbd\", \"pool\": \"pool-2\", \"image\": "
               "\"vm-7-fleece-1\", \"user\": \"admin\", \"server\": ["
               "{\"host\": \"10.1.1.1\", \"port\": \"6789\"}, {\"host\": "
               "\"fd00::1\", \"port\": \"3300\"}], \"auth-client-required\": "
               "[\"cephx\"], \"key-secret\": \"fleece-rbd-key\"}");
  json_object_put (o);
  o = fleece_rbd_secret_object (b, "fleece-rbd-key", &err);
  assert_json (o, "{\"qom-type\": \"secret\", \"id\": \"fleece-rbd-key\", "
               "\"data\": \"AQBn1ypnAAAAABAAtGQ0VYgo4c0ywDQKx5tQ3Q==\", "
               "\"format\": \"base64\"}");
  json_object_put (o);
  s = fleece_rbd_legacy_filename (b, "vm-7-fleece-1");
  ck_assert_str_eq (s, "rbd:pool-2/vm-7-fleece-1:id=admin:mon_host=10.1.1.1\\:6789;"
                    "[fd00\\:\\:1]\\:3300");
  ck_assert_ptr_null (strstr (s, "AQB"));
  g_free (s);

  /* keyring without conf: the key comes from the file */
  ck_assert (g_file_set_contents (keyring,
             "[client.admin]\n\tkey = AQBn1ypnAAAAABAAtGQ0VYgo4c0ywDQKx5tQ3Q==\n"
             "\tcaps mon = \"allow *\"\n[client.other]\n\tkey = "
             "AQCn1ypnAAAAABAAtGQ0VYgo4c0ywDQKx5tQ3Q==\n", -1, NULL));
  ck_assert (fleece_rbd_set_option (c, "keyring", keyring, NULL));
  ck_assert (fleece_rbd_qemu_key (c, &key, &err));
  ck_assert_str_eq (key, "AQBn1ypnAAAAABAAtGQ0VYgo4c0ywDQKx5tQ3Q==");
  g_free (key);
  ck_assert (fleece_rbd_set_option (c, "id", "nobody", NULL));
  ck_assert (!fleece_rbd_qemu_key (c, &key, &err));
  assert_error (err, ENOKEY, "no valid key for client.nobody");
  g_clear_error (&err);
  ck_assert (fleece_rbd_set_option (c, "keyring", "/nonexistent/keyring", NULL));
  ck_assert_ptr_null (fleece_rbd_secret_object (c, "x", &err));
  assert_error (err, ENOENT, "could not read the keyring /nonexistent/keyring");
  tlc_rmtree (dir);
}
END_TEST

START_TEST (test_describe)
{
  g_autoptr (FleeceRbd) a = fleece_rbd_new ("rbd", "ns1", NULL);
  g_autoptr (FleeceRbd) b = NULL;
  g_autoptr (GError) err = NULL;
  json_object *d, *d2;
  const char *text;

  ck_assert (fleece_rbd_set_option (a, "conf", "/etc/ceph/ceph.conf", NULL));
  ck_assert (fleece_rbd_set_option (a, "key",
             "AQBn1ypnAAAAABAAtGQ0VYgo4c0ywDQKx5tQ3Q==", NULL));
  ck_assert (fleece_rbd_set_option (a, "object-size", "256K", NULL));
  d = fleece_rbd_describe (a);
  text = json_object_to_json_string (d);
  ck_assert_ptr_null (strstr (text, "AQBn1"));
  assert_json (d, "{\"type\": \"rbd\", \"pool\": \"rbd\", \"namespace\": \"ns1\","
               " \"conf\": \"/etc/ceph/ceph.conf\", \"id\": \"admin\", "
               "\"object-size\": 262144, \"key\": true}");
  b = fleece_rbd_from_description (d, &err);
  ck_assert_msg (b != NULL, "%s", err ? err->message : "");
  ck_assert_uint_eq (fleece_rbd_object_size (b), 256 * KiB);
  ck_assert (fleece_rbd_same (b, d));
  ck_assert (fleece_rbd_same (a, d));
  d2 = fleece_rbd_describe (b);
  /* no key in b: the description says none is needed */
  assert_json (d2, "{\"type\": \"rbd\", \"pool\": \"rbd\", \"namespace\": \"ns1\","
               " \"conf\": \"/etc/ceph/ceph.conf\", \"id\": \"admin\", "
               "\"object-size\": 262144}");
  json_object_put (d2);

  {
    g_autoptr (FleeceRbd) other_ns = fleece_rbd_new ("rbd", NULL, NULL);
    g_autoptr (FleeceRbd) other_conf = fleece_rbd_new ("rbd", "ns1", NULL);
    g_autoptr (FleeceRbd) other_pool = fleece_rbd_new ("rbd2", "ns1", NULL);
    fleece_rbd_set_option (other_ns, "conf", "/etc/ceph/ceph.conf", NULL);
    fleece_rbd_set_option (other_conf, "conf", "/etc/pve/ceph.conf", NULL);
    fleece_rbd_set_option (other_pool, "conf", "/etc/ceph/ceph.conf", NULL);
    ck_assert (!fleece_rbd_same (other_ns, d));
    ck_assert (!fleece_rbd_same (other_conf, d));
    ck_assert (!fleece_rbd_same (other_pool, d));
    ck_assert (!fleece_rbd_same (a, NULL));
  }
  json_object_put (d);

  {
    static const char *const bad[] = {
      "{}", "{\"type\": \"dir\", \"pool\": \"rbd\"}",
      "{\"type\": \"rbd\"}", "{\"type\": \"rbd\", \"pool\": \"a/b\"}",
      "{\"type\": \"rbd\", \"pool\": \"rbd\", \"conf\": \"rel\"}",
      "{\"type\": \"rbd\", \"pool\": \"rbd\", \"object-size\": 1000}",
      "{\"type\": \"rbd\", \"pool\": \"rbd\", \"object-size\": \"4M\"}",
      "[]", NULL,
    };
    for (size_t i = 0; bad[i]; i++) {
      g_autoptr (GError) e = NULL;
      json_object *o = json_tokener_parse (bad[i]);
      ck_assert_msg (fleece_rbd_from_description (o, &e) == NULL, "%s taken", bad[i]);
      ck_assert_int_eq (e->code, EINVAL);
      json_object_put (o);
    }
  }
}
END_TEST

/* ---- the cluster -------------------------------------------------------- */

START_TEST (test_create_exact_sizes)
{
  static const struct { uint64_t size; const char *osize; } cases[] = {
    { 131072, NULL }, { 540672, "64K" }, { 64 * MiB + 4 * KiB, NULL },
    { 64 * MiB + 4 * KiB, "4M" }, { 540673, "4K" }, { 1, NULL },
    { 10ull * 1024 * MiB + 512, "32M" },
  };

  for (size_t i = 0; i < G_N_ELEMENTS (cases); i++) {
    g_autoptr (FleeceRbd) r = rbd_with (ceph, NULL, cases[i].osize);
    g_autofree char *name = g_strdup_printf ("vm-100-fleece-%zu", i);
    g_autofree char *spec = g_strdup_printf ("rbd/%s", name);
    g_autofree char *id = create_ok (r, name, cases[i].size);
    g_autofree char *cid = cli_id (ceph, spec);
    g_autoptr (GError) err = NULL;
    uint64_t size = 0, osize = 0, features = 0;

    ck_assert (fleece_rbd_image_info (r, name, &size, &osize, &features, &err));
    ck_assert_uint_eq (size, cases[i].size);
    ck_assert_uint_eq (osize, fleece_rbd_object_size (r));
    ck_assert_uint_eq (features, fleece_rbd_features ());
    ck_assert_str_eq (id, cid);
    g_autofree char *id2 = fleece_rbd_image_id (r, name, &err);
    ck_assert_str_eq (id, id2);
    ck_assert_uint_eq (usage (r, name, false), 0);
    ck_assert (listed (r, name));
    remove_ok (r, name, id);
    ck_assert (!listed (r, name));
    ck_assert_ptr_null (cli_id (ceph, spec));
  }
  ck_assert (trash_empty (ceph, NULL));
}
END_TEST

START_TEST (test_create_eexist)
{
  g_autoptr (FleeceRbd) r = rbd_with (ceph, NULL, NULL);
  g_autoptr (GError) err = NULL;
  g_autofree char *before = NULL, *after = NULL, *id = NULL, *ours = NULL;
  char *none = NULL;

  /* someone else's image of the name (qemu-server's own, say) */
  g_free (tl_ceph_cmd_ok (ceph, "rbd", "create", "--size", "1M",
                          "rbd/vm-101-fleece-0", NULL));
  before = cli_id (ceph, "rbd/vm-101-fleece-0");
  ck_assert (!fleece_rbd_create (r, "vm-101-fleece-0", 1 * MiB, &none, &err));
  assert_error (err, EEXIST, "rbd/vm-101-fleece-0 exists already");
  ck_assert_ptr_null (none);
  g_clear_error (&err);
  /* and created twice by us */
  ours = create_ok (r, "vm-101-fleece-1", MiB);
  ck_assert (!fleece_rbd_create (r, "vm-101-fleece-1", 2 * MiB, &none, &err));
  assert_error (err, EEXIST, "exists already");
  g_clear_error (&err);
  id = fleece_rbd_image_id (r, "vm-101-fleece-1", NULL);
  ck_assert_str_eq (id, ours);

  /* Removing with an id that is not that image's touches nothing. */
  ck_assert (!fleece_rbd_remove (r, "vm-101-fleece-0", ours, &err));
  assert_error (err, EPERM, before);
  ck_assert_msg (strstr (err->message, ours), "%s", err->message);
  after = cli_id (ceph, "rbd/vm-101-fleece-0");
  ck_assert_str_eq (before, after);
  ck_assert (trash_empty (ceph, NULL));
  remove_ok (r, "vm-101-fleece-1", ours);
  g_free (tl_ceph_cmd_ok (ceph, "rbd", "rm", "--no-progress",
                          "rbd/vm-101-fleece-0", NULL));
}
END_TEST

START_TEST (test_remove_semantics)
{
  g_autoptr (FleeceRbd) r = rbd_with (ceph, NULL, "64K");
  g_autoptr (GError) err = NULL;
  g_autofree char *id1 = NULL, *id2 = NULL, *id3 = NULL, *now = NULL;

  /* missing: success, also twice */
  remove_ok (r, "vm-102-fleece-0", "1234abcd");
  id1 = create_ok (r, "vm-102-fleece-0", 4 * MiB);
  remove_ok (r, "vm-102-fleece-0", id1);
  remove_ok (r, "vm-102-fleece-0", id1);

  /* re-created by someone else under the same name: never touched */
  id2 = create_ok (r, "vm-102-fleece-0", 4 * MiB);
  g_free (tl_ceph_cmd_ok (ceph, "rbd", "rm", "--no-progress",
                          "rbd/vm-102-fleece-0", NULL));
  g_free (tl_ceph_cmd_ok (ceph, "rbd", "create", "--size", "4M",
                          "rbd/vm-102-fleece-0", NULL));
  now = cli_id (ceph, "rbd/vm-102-fleece-0");
  ck_assert_str_ne (now, id2);
  ck_assert (!fleece_rbd_remove (r, "vm-102-fleece-0", id2, &err));
  assert_error (err, EPERM, now);
  ck_assert_msg (strstr (err->message, id2), "%s", err->message);
  g_clear_error (&err);
  {
    g_autofree char *still = cli_id (ceph, "rbd/vm-102-fleece-0");
    ck_assert_str_eq (still, now);
  }
  ck_assert (trash_empty (ceph, NULL));
  g_free (tl_ceph_cmd_ok (ceph, "rbd", "rm", "--no-progress",
                          "rbd/vm-102-fleece-0", NULL));

  /* a remove interrupted after the trash move: the next one finishes it */
  id3 = create_ok (r, "vm-102-fleece-1", 4 * MiB);
  g_free (tl_ceph_cmd_ok (ceph, "rbd", "trash", "mv", "rbd/vm-102-fleece-1", NULL));
  ck_assert (!trash_empty (ceph, NULL));
  remove_ok (r, "vm-102-fleece-1", id3);
  ck_assert (trash_empty (ceph, NULL));
  ck_assert (!listed (r, "vm-102-fleece-1"));
}
END_TEST

START_TEST (test_namespace)
{
  g_autoptr (FleeceRbd) none = rbd_with (ceph, "nope", NULL);
  g_autoptr (FleeceRbd) r = rbd_with (ceph, "fleece-ns", "1M");
  g_autoptr (FleeceRbd) def = rbd_with (ceph, NULL, NULL);
  g_autoptr (GError) err = NULL;
  g_autofree char *id = NULL, *ls = NULL;
  char *x = NULL;

  ck_assert (!fleece_rbd_create (none, "vm-103-fleece-0", MiB, &x, &err));
  assert_error (err, ENOENT, "no RBD namespace 'nope' in pool 'rbd'");
  ck_assert_msg (strstr (err->message, "rbd namespace create rbd/nope"), "%s",
                 err->message);
  g_clear_error (&err);

  g_free (tl_ceph_cmd_ok (ceph, "rbd", "namespace", "create", "rbd/fleece-ns",
                          NULL));
  id = create_ok (r, "vm-103-fleece-0", 8 * MiB);
  ck_assert (listed (r, "vm-103-fleece-0"));
  ck_assert (!listed (def, "vm-103-fleece-0"));
  ls = tl_ceph_cmd_ok (ceph, "rbd", "ls", "rbd/fleece-ns", NULL);
  ck_assert_msg (strstr (ls, "vm-103-fleece-0"), "%s", ls);
  /* the same name in the default namespace is another image */
  ck_assert (fleece_rbd_remove (def, "vm-103-fleece-0", id, &err));
  ck_assert (listed (r, "vm-103-fleece-0"));
  remove_ok (r, "vm-103-fleece-0", id);
  ck_assert (!listed (r, "vm-103-fleece-0"));
  ck_assert (trash_empty (ceph, "fleece-ns"));
  g_free (tl_ceph_cmd_ok (ceph, "rbd", "namespace", "remove", "rbd/fleece-ns",
                          NULL));
}
END_TEST

START_TEST (test_connect_errors)
{
  g_autofree char *mons = g_strdup_printf ("127.0.0.1:%d", dead_port ());

  {
    /* a dead cluster fails in seconds, naming the monitors */
    g_autoptr (FleeceRbd) r = fleece_rbd_new ("rbd", NULL, NULL);
    g_autoptr (GError) err = NULL;
    gint64 t0 = g_get_monotonic_time ();
    ck_assert (fleece_rbd_set_option (r, "mon_host", mons, NULL));
    ck_assert (fleece_rbd_set_option (r, "key", ceph->admin_key, NULL));
    ck_assert (fleece_rbd_set_option (r, "timeout", "2", NULL));
    ck_assert (!fleece_rbd_connect (r, &err));
    assert_error (err, ETIMEDOUT, mons);
    ck_assert_msg (strstr (err->message, "within 2 s"), "%s", err->message);
    ck_assert_msg (g_get_monotonic_time () - t0 < slow (20) * G_USEC_PER_SEC,
                   "took %.1f s", (g_get_monotonic_time () - t0) / 1e6);
    ck_assert_ptr_null (strstr (err->message, ceph->admin_key));
  }
  {
    g_autoptr (FleeceRbd) r = fleece_rbd_new ("rbd", NULL, NULL);
    g_autoptr (GError) err = NULL;
    ck_assert (fleece_rbd_set_option (r, "conf", "/nonexistent/ceph.conf", NULL));
    ck_assert (!fleece_rbd_connect (r, &err));
    assert_error (err, ENOENT, "could not read the Ceph config /nonexistent/ceph.conf");
  }
  {
    g_autoptr (FleeceRbd) r = fleece_rbd_new ("no-such-pool", NULL, NULL);
    g_autoptr (GError) err = NULL;
    ck_assert (fleece_rbd_set_option (r, "conf", ceph->conf, NULL));
    ck_assert (!fleece_rbd_connect (r, &err));
    assert_error (err, ENOENT, "there is no pool 'no-such-pool'");
    ck_assert_msg (strstr (err->message, ceph->conf), "%s", err->message);
  }
  {
    /* a wrong key */
    g_autoptr (FleeceRbd) r = fleece_rbd_new ("rbd", NULL, NULL);
    g_autoptr (GError) err = NULL;
    ck_assert (fleece_rbd_set_option (r, "mon_host", ceph->mon_v1, NULL));
    ck_assert (fleece_rbd_set_option (r, "key",
               "AQBn1ypnAAAAABAAtGQ0VYgo4c0ywDQKx5tQ3Q==", NULL));
    ck_assert (fleece_rbd_set_option (r, "timeout", "3", NULL));
    ck_assert (!fleece_rbd_connect (r, &err));
    assert_error (err, EACCES, "did not let client.admin in (wrong key");
    ck_assert_msg (strstr (err->message, ceph->mon_v1), "%s", err->message);
  }
  {
    /* options are fixed once connected */
    g_autoptr (FleeceRbd) r = rbd_with (ceph, NULL, NULL);
    g_autoptr (GError) err = NULL;
    json_object *d;
    ck_assert (fleece_rbd_connect (r, NULL));
    ck_assert (!fleece_rbd_set_option (r, "object-size", "64K", &err));
    assert_error (err, EBUSY, "connected already");
    /* the description now names the cluster by fsid */
    d = fleece_rbd_describe (r);
    ck_assert_ptr_nonnull (json_object_object_get (d, "fsid"));
    ck_assert (fleece_rbd_same (r, d));
    json_object_object_add (d, "fsid", json_object_new_string ("00000000-0000-0000-0000-000000000000"));
    ck_assert (!fleece_rbd_same (r, d));
    json_object_put (d);
    ck_assert (fleece_rbd_check_space (r, NULL));
  }
}
END_TEST

/* Write through the guest device, read back, as QEMU sees it. */
static void
io_roundtrip (TlcQemu *q, FleeceRbd *r, const char *name)
{
  tlc_qemu_io (q, "sd0", "write -P 0x5a 0 1M");
  tlc_qemu_io (q, "sd0", "write -P 0xa5 5M 64k");
  tlc_qemu_io (q, "sd0", "flush");
  tlc_qemu_io (q, "sd0", "read -P 0x5a 0 1M");
  tlc_qemu_io (q, "sd0", "read -P 0xa5 5M 64k");
  tlc_qemu_io (q, "sd0", "read -P 0 1M 4M");
  {
    /* a wrong pattern is noticed (the check above means something) */
    g_autofree char *out = tlc_qemu_io_out (q, "sd0", "read -P 0x11 0 4k");
    ck_assert_msg (strstr (out, "Pattern verification failed"), "%s", out);
  }
  ck_assert_uint_eq (usage (r, name, true), MiB + 64 * KiB);
}

START_TEST (test_qemu_conf)
{
  g_autoptr (FleeceRbd) r = rbd_with (ceph, NULL, "1M");
  g_autofree char *id = create_ok (r, "vm-104-fleece-0", 16 * MiB + 4 * KiB);
  TlcQemu *q = tlc_qemu_start ();
  json_object *nodes;
  bool seen = false;

  qemu_attach (q, r, "vm-104-fleece-0", "fl0", "sd0", NULL);
  /* QEMU sees exactly the size */
  nodes = tlc_qmp (q, "query-named-block-nodes", NULL);
  for (size_t i = 0; i < json_object_array_length (nodes); i++) {
    json_object *n = json_object_array_get_idx (nodes, i), *v, *img;
    if (json_object_object_get_ex (n, "node-name", &v)
        && strcmp (json_object_get_string (v), "fl0") == 0
        && json_object_object_get_ex (n, "image", &img)
        && json_object_object_get_ex (img, "virtual-size", &v)) {
      ck_assert_int_eq (json_object_get_int64 (v), 16 * MiB + 4 * KiB);
      seen = true;
    }
  }
  json_object_put (nodes);
  ck_assert (seen);
  io_roundtrip (q, r, "vm-104-fleece-0");
  qemu_detach (q, "fl0", "sd0");
  tlc_qemu_stop (q);
  remove_ok (r, "vm-104-fleece-0", id);
}
END_TEST

START_TEST (test_qemu_key_secret)
{
  /* No conf for anyone: monitors and the key, as a PVE cluster storage
   * with a key and no ceph.conf would be. */
  const char *mons[] = { ceph->mon_v1, ceph->mon_v2 };

  for (int i = 0; i < 2; i++) {
    g_autoptr (FleeceRbd) r = fleece_rbd_new (ceph->pool, NULL, NULL);
    g_autoptr (GError) err = NULL;
    g_autofree char *id = NULL;
    json_object *bd;
    TlcQemu *q;

    ck_assert (fleece_rbd_set_option (r, "mon_host", mons[i], &err));
    if (i == 0)
      ck_assert (fleece_rbd_set_option (r, "key", ceph->admin_key, &err));
    else
      ck_assert (fleece_rbd_set_option (r, "keyring", ceph->keyring, &err));
    ck_assert (fleece_rbd_set_option (r, "object-size", "1M", &err));
    id = create_ok (r, "vm-105-fleece-0", 8 * MiB);
    bd = fleece_rbd_blockdev (r, "vm-105-fleece-0", NULL, "rbdkey0");
    ck_assert_ptr_null (json_object_object_get (bd, "conf"));
    ck_assert_ptr_nonnull (json_object_object_get (bd, "server"));
    json_object_put (bd);
    q = tlc_qemu_start ();
    qemu_attach (q, r, "vm-105-fleece-0", "fl0", "sd0", "rbdkey0");
    io_roundtrip (q, r, "vm-105-fleece-0");
    qemu_detach (q, "fl0", "sd0");
    tlc_qemu_stop (q);
    remove_ok (r, "vm-105-fleece-0", id);
  }
}
END_TEST

/* Inside an HMP "..." argument, '\\' and '"' are escaped by '\\'
 * (static buffer). */
static const char *
hmp_quote (const char *s)
{
  static char buf[4096];
  size_t n = 0;

  for (; *s && n + 2 < sizeof buf; s++) {
    if (*s == '\\' || *s == '"')
      buf[n++] = '\\';
    buf[n++] = *s;
  }
  buf[n] = '\0';
  return buf;
}

START_TEST (test_qemu_legacy_filename)
{
  /* The HMP drive_add path of the Proxmox engine on QEMU < 10. */
  g_autoptr (FleeceRbd) r = rbd_with (ceph, NULL, "1M");
  g_autofree char *id = create_ok (r, "vm-106-fleece-0", 4 * MiB);
  g_autofree char *file = fleece_rbd_legacy_filename (r, "vm-106-fleece-0");
  g_autofree char *line = g_strdup_printf (
      "drive_add auto \"file=%s,if=none,id=drive-scsi0-fleecing,format=raw,"
      "discard=unmap\"", hmp_quote (file));
  TlcQemu *q = tlc_qemu_start ();
  g_autofree char *out = tlc_hmp (q, line);

  ck_assert_msg (strstr (out, "OK"), "%s: %s", line, out);
  tlc_qemu_io_blk (q, "drive-scsi0-fleecing", "write -P 0x33 0 64k");
  tlc_qemu_io_blk (q, "drive-scsi0-fleecing", "read -P 0x33 0 64k");
  g_free (tlc_hmp (q, "drive_del drive-scsi0-fleecing"));

  /* without a conf: monitors in the filename, the key as a secret object
   * named by the protocol node's option file.key-secret */
  {
    g_autoptr (FleeceRbd) k = fleece_rbd_new (ceph->pool, NULL, NULL);
    g_autofree char *file2 = NULL, *line2 = NULL, *out2 = NULL;
    ck_assert (fleece_rbd_set_option (k, "mon_host", ceph->mon_v1, NULL));
    ck_assert (fleece_rbd_set_option (k, "key", ceph->admin_key, NULL));
    json_object_put (tlc_qmp (q, "object-add",
                              fleece_rbd_secret_object (k, "rbdkey1", NULL)));
    file2 = fleece_rbd_legacy_filename (k, "vm-106-fleece-0");
    ck_assert_ptr_null (strstr (file2, ceph->admin_key));
    line2 = g_strdup_printf ("drive_add auto \"file=%s,if=none,id=drive-scsi1-"
                             "fleecing,format=raw,discard=unmap,"
                             "file.key-secret=rbdkey1\"", hmp_quote (file2));
    out2 = tlc_hmp (q, line2);
    ck_assert_msg (strstr (out2, "OK"), "%s: %s", line2, out2);
    tlc_qemu_io_blk (q, "drive-scsi1-fleecing", "read -P 0x33 0 64k");
    g_free (tlc_hmp (q, "drive_del drive-scsi1-fleecing"));
  }
  tlc_qemu_stop (q);
  remove_ok (r, "vm-106-fleece-0", id);
}
END_TEST

START_TEST (test_discard_frees)
{
  g_autoptr (FleeceRbd) r = rbd_with (ceph, NULL, "64K");
  g_autofree char *id = create_ok (r, "vm-107-fleece-0", 4 * MiB);
  TlcQemu *q = tlc_qemu_start ();

  qemu_attach (q, r, "vm-107-fleece-0", "fl0", "sd0", NULL);
  tlc_qemu_io (q, "sd0", "write -P 0x77 0 1M");
  tlc_qemu_io (q, "sd0", "flush");
  ck_assert_uint_eq (usage (r, "vm-107-fleece-0", false), MiB);
  ck_assert_uint_eq (usage (r, "vm-107-fleece-0", true), MiB);
  /* whole objects: freed */
  tlc_qemu_io (q, "sd0", "discard 0 512k");
  tlc_qemu_io (q, "sd0", "flush");
  ck_assert_uint_eq (usage (r, "vm-107-fleece-0", false), 512 * KiB);
  ck_assert_uint_eq (usage (r, "vm-107-fleece-0", true), 512 * KiB);
  tlc_qemu_io (q, "sd0", "read -P 0 0 512k");
  tlc_qemu_io (q, "sd0", "read -P 0x77 512k 512k");
  /* half an object: the object stays (RBD frees whole objects only) */
  tlc_qemu_io (q, "sd0", "discard 512k 32k");
  tlc_qemu_io (q, "sd0", "flush");
  ck_assert_uint_eq (usage (r, "vm-107-fleece-0", false), 512 * KiB);
  tlc_qemu_io (q, "sd0", "read -P 0x77 544k 480k");
  /* the rest, unaligned at both ends: the whole objects inside go */
  tlc_qemu_io (q, "sd0", "discard 540k 484k");
  tlc_qemu_io (q, "sd0", "flush");
  ck_assert_uint_eq (usage (r, "vm-107-fleece-0", false), 64 * KiB);
  qemu_detach (q, "fl0", "sd0");
  tlc_qemu_stop (q);
  remove_ok (r, "vm-107-fleece-0", id);
  ck_assert (trash_empty (ceph, NULL));
}
END_TEST

START_TEST (test_remove_busy)
{
  g_autoptr (FleeceRbd) r = rbd_with (ceph, NULL, "1M");
  g_autofree char *id = create_ok (r, "vm-108-fleece-0", 4 * MiB);
  g_autoptr (GError) err = NULL;
  TlcQemu *q = tlc_qemu_start ();
  gint64 t0;

  qemu_attach (q, r, "vm-108-fleece-0", "fl0", "sd0", NULL);
  tlc_qemu_io (q, "sd0", "write -P 0x11 0 1M");
  {
    g_autoptr (FleeceRbd) r2 = rbd_with (ceph, NULL, NULL);
    ck_assert (fleece_rbd_set_option (r2, "busy-timeout", "1", NULL));
    t0 = g_get_monotonic_time ();
    ck_assert (!fleece_rbd_remove (r2, "vm-108-fleece-0", id, &err));
    assert_error (err, EBUSY, "is still open by client.");
    /* 1 s of waiting, and a few round trips (slow under valgrind) */
    ck_assert_msg (g_get_monotonic_time () - t0 < slow (10) * G_USEC_PER_SEC,
                   "took %.1f s", (g_get_monotonic_time () - t0) / 1e6);
  }
  ck_assert (listed (r, "vm-108-fleece-0"));
  ck_assert (trash_empty (ceph, NULL));
  tlc_qemu_io (q, "sd0", "read -P 0x11 0 1M");
  qemu_detach (q, "fl0", "sd0");
  remove_ok (r, "vm-108-fleece-0", id);
  tlc_qemu_stop (q);
}
END_TEST

START_TEST (test_remove_after_kill)
{
  /* QEMU killed with the image open and locked: its watch lingers until
   * the OSD times it out (30 s); remove waits for that. */
  g_autoptr (FleeceRbd) r = rbd_with (ceph, NULL, "1M");
  g_autofree char *id = create_ok (r, "vm-109-fleece-0", 4 * MiB);
  g_autoptr (FleeceRbd) r2 = rbd_with (ceph, NULL, NULL);
  TlcQemu *q = tlc_qemu_start ();
  gint64 t0;

  qemu_attach (q, r, "vm-109-fleece-0", "fl0", "sd0", NULL);
  tlc_qemu_io (q, "sd0", "write -P 0x11 0 2M");
  tlc_qemu_kill (q);
  t0 = g_get_monotonic_time ();
  remove_ok (r2, "vm-109-fleece-0", id);
  fprintf (stderr, "test-rbd: remove after kill -9 took %.1f s\n",
           (g_get_monotonic_time () - t0) / 1e6);
  ck_assert (!listed (r, "vm-109-fleece-0"));
  ck_assert (trash_empty (ceph, NULL));
}
END_TEST

START_TEST (test_full_pool)
{
  /* The small cluster's OSD holds 64 MiB; Ceph flags its pools full at
   * 95 % and its OSDs refuse even removes above 97 %. */
  g_autoptr (FleeceRbd) r = rbd_with (ceph_full, NULL, "1M");
  g_autoptr (GError) err = NULL;
  g_autofree char *id = NULL, *fid = NULL, *e = NULL, *out = NULL;
  char *none = NULL;
  TlcQemu *q;
  goffset mark;
  gint64 deadline;
  bool full = false, done = false;

  ck_assert (fleece_rbd_set_option (r, "timeout", "3", NULL));
  tl_ceph_osd_config (ceph_full, "osd_mon_report_interval", "1");
  id = create_ok (r, "vm-110-fleece-0", 8 * MiB);
  q = tlc_qemu_start ();
  qemu_attach (q, r, "vm-110-fleece-0", "fl0", "sd0", NULL);
  tlc_qemu_io (q, "sd0", "write -P 0x42 0 1M");

  /* Fill the pool to ~95.8 % with another image. */
  {
    g_autoptr (FleeceRbd) filler = rbd_with (ceph_full, NULL, "4M");
    fid = create_ok (filler, "filler", 512 * MiB);
    out = tl_ceph_cmd (ceph_full, &e, "rbd", "bench", "--io-type", "write",
                       "--io-size", "256K", "--io-total", "63176704",
                       "--io-pattern", "seq", "rbd/filler", NULL);
    ck_assert_msg (out != NULL, "rbd bench: %s", e);
  }
  deadline = g_get_monotonic_time () + 60 * G_USEC_PER_SEC;
  while (!full && g_get_monotonic_time () < deadline) {
    g_clear_error (&err);
    full = !fleece_rbd_check_space (r, &err);
    if (!full)
      g_usleep (250000);
  }
  ck_assert_msg (full, "the pool never became full");
  assert_error (err, ENOSPC, "pool 'rbd' is full");
  g_clear_error (&err);

  /* creating an image: the real cause, in seconds */
  ck_assert (!fleece_rbd_create (r, "vm-110-fleece-1", MiB, &none, &err));
  assert_error (err, ENOSPC, "could not create RBD image rbd/vm-110-fleece-1");
  ck_assert_msg (strstr (err->message, "is full"), "%s", err->message);
  g_clear_error (&err);
  ck_assert (!listed (r, "vm-110-fleece-1"));

  /* a guest write waits (it does not fail) while the pool is full */
  mark = tlc_qemu_log_size (q);
  g_free (tlc_qemu_io_out (q, "sd0", "aio_write -P 0x43 2M 64k"));
  g_usleep (3 * G_USEC_PER_SEC);
  {
    g_autofree char *since = tlc_qemu_log_since (q, mark);
    ck_assert_msg (!strstr (since, "wrote") && !strstr (since, "failed"),
                   "the write did not wait: %s", since);
  }

  /* A full pool takes no new objects, not even the pool's RBD trash
   * object that a remove needs (this pool never had one): the remove
   * fails, saying why and what to do, and leaves the image as it was. */
  {
    g_autoptr (FleeceRbd) r2 = rbd_with (ceph_full, NULL, NULL);
    ck_assert (!fleece_rbd_remove (r2, "filler", fid, &err));
    assert_error (err, ENOSPC, "could not remove RBD image rbd/filler");
    ck_assert_msg (strstr (err->message, "ceph osd set-full-ratio"), "%s",
                   err->message);
    g_clear_error (&err);
    ck_assert (listed (r2, "filler"));
    g_autofree char *fid2 = fleece_rbd_image_id (r2, "filler", NULL);
    ck_assert_str_eq (fid2, fid);
  }
  /* What the message says: raise the full ratio for a moment, remove. */
  g_free (tl_ceph_cmd_ok (ceph_full, "ceph", "osd", "set-full-ratio", "0.98",
                          NULL));
  {
    g_autoptr (FleeceRbd) r2 = rbd_with (ceph_full, NULL, NULL);
    deadline = g_get_monotonic_time () + 30 * G_USEC_PER_SEC;
    while (!fleece_rbd_check_space (r2, NULL)
           && g_get_monotonic_time () < deadline)
      g_usleep (250000);
    remove_ok (r2, "filler", fid);
  }
  g_free (tl_ceph_cmd_ok (ceph_full, "ceph", "osd", "set-full-ratio", "0.95",
                          NULL));
  deadline = g_get_monotonic_time () + 60 * G_USEC_PER_SEC;
  while (!done && g_get_monotonic_time () < deadline) {
    g_autofree char *since = tlc_qemu_log_since (q, mark);
    ck_assert_msg (!strstr (since, "failed"), "%s", since);
    done = strstr (since, "wrote 65536/65536 bytes at offset 2097152") != NULL;
    if (!done)
      g_usleep (250000);
  }
  if (!done) {
    g_autofree char *since = tlc_qemu_log_since (q, mark);
    g_autofree char *flags = tl_ceph_cmd (ceph_full, NULL, "ceph", "osd",
                                          "pool", "ls", "detail", NULL);
    g_clear_error (&err);
    fleece_rbd_check_space (r, &err);
    ck_abort_msg ("the write never completed after space was freed: %s; "
                  "QEMU printed: %s; pools: %s", err ? err->message : "pool ok",
                  since, flags);
  }
  ck_assert (fleece_rbd_check_space (r, NULL));
  tlc_qemu_io (q, "sd0", "read -P 0x43 2M 64k");
  qemu_detach (q, "fl0", "sd0");
  tlc_qemu_stop (q);
  remove_ok (r, "vm-110-fleece-0", id);
}
END_TEST

static Suite *
unit_suite (void)
{
  Suite *s = suite_create ("rbd-unit");
  TCase *tc = tcase_create ("unit");

  ADD (tc, test_names);
  ADD (tc, test_options);
  ADD (tc, test_qemu_json);
  ADD (tc, test_describe);
  suite_add_tcase (s, tc);
  return s;
}

static Suite *
ceph_suite (void)
{
  Suite *s = suite_create ("rbd-ceph");
  TCase *tc = tcase_create ("ceph");

  tcase_set_timeout (tc, 240);
  ADD (tc, test_create_exact_sizes);
  ADD (tc, test_create_eexist);
  ADD (tc, test_remove_semantics);
  ADD (tc, test_namespace);
  ADD (tc, test_connect_errors);
  ADD (tc, test_qemu_conf);
  ADD (tc, test_qemu_key_secret);
  ADD (tc, test_qemu_legacy_filename);
  ADD (tc, test_discard_frees);
  ADD (tc, test_remove_busy);
  ADD (tc, test_remove_after_kill);
  ADD (tc, test_full_pool);
  suite_add_tcase (s, tc);
  return s;
}

int
main (int argc, char **argv)
{
  bool unit_only = argc > 1 && strcmp (argv[1], "unit") == 0;
  SRunner *sr;
  int failed;

  sr = srunner_create (unit_suite ());
  if (!unit_only) {
    tl_ceph_require ();
    ceph = tl_ceph_start ("rbd", NULL);
    ceph_full = tl_ceph_start ("full", (const char *const[]) {
                                 "CEPH_UP_STORE_MB=64", NULL });
    srunner_add_suite (sr, ceph_suite ());
  }
  srunner_run_all (sr, CK_NORMAL);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  tl_ceph_stop (ceph_full);
  tl_ceph_stop (ceph);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
