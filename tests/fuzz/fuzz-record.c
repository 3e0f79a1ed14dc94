/* Fuzz target: the durable record (libfleece/record.c) and what the
 * engines do with one when QEMU is gone (fleece_cleanup()).
 *
 * The input is the content of a record file.  It is loaded from a file
 * and through the load callback; a record that loads is then cleaned up
 * through the public API, sandboxed: its QMP socket is replaced by one
 * that does not exist (the fuzzer must not talk to sockets on the host)
 * and a directory storage is pointed at a scratch directory (it must not
 * free files elsewhere).  Checked: no crash, leak or hang; a record
 * refused is refused with a message. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <glib/gstdio.h>

#include "internal.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

#define VMID 100

static char *scratch;     /* state dir and storage live here */
static char *state;
static char *storage;
static char *record_path;

static void
remove_scratch (void)
{
  g_autofree char *lock = g_build_filename (state, "100.lock", NULL);

  g_unlink (record_path);
  g_unlink (lock);
  g_rmdir (state);
  g_rmdir (storage);
  g_rmdir (scratch);
}

static void
setup (void)
{
  if (scratch)
    return;
  /* tmpfs if there is one: cleanup syncs the record's directory. */
  scratch = g_mkdtemp (g_build_filename (g_file_test ("/dev/shm", G_FILE_TEST_IS_DIR)
                                         ? "/dev/shm" : g_get_tmp_dir (),
                                         "fleece-fuzz-record-XXXXXX", NULL));
  if (!scratch)
    abort ();
  atexit (remove_scratch);
  state = g_build_filename (scratch, "state", NULL);
  storage = g_build_filename (scratch, "storage", NULL);
  record_path = g_build_filename (state, "100.json", NULL);
  g_mkdir (state, 0700);
  g_mkdir (storage, 0700);
}

static int
load_cb (void *opaque, uint32_t vmid, char **json)
{
  *json = strdup (opaque);
  return *json ? 0 : -1;
}

static int
store_cb (void *opaque, uint32_t vmid, const char *json)
{
  return 0;
}

static void
sandbox (json_object *record)
{
  json_object *st, *type;
  char *sock = g_build_filename (scratch, "no-qemu.sock", NULL);

  json_object_object_add (record, "qmp", json_object_new_string (sock));
  g_free (sock);
  if (json_object_object_get_ex (record, "storage", &st) &&
      json_object_is_type (st, json_type_object) &&
      json_object_object_get_ex (st, "type", &type) &&
      json_object_is_type (type, json_type_string) &&
      strcmp (json_object_get_string (type), "dir") == 0)
    json_object_object_add (st, "dir", json_object_new_string (storage));
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  FleeceRecordStore rs = { 0 };
  GError *err = NULL;
  json_object *record;
  char *text;

  setup ();
  rs.dir = state;
  if (!g_file_set_contents (record_path, (const char *) data, (gssize) size, NULL))
    return 0;

  record = fleece_record_load (&rs, VMID, &err);
  g_clear_error (&err);

  /* The callback path reads a C string. */
  text = g_strndup ((const char *) data, size);
  rs.load = load_cb;
  rs.store = store_cb;
  rs.opaque = text;
  {
    json_object *r2 = fleece_record_load (&rs, VMID, &err);
    if (r2)
      json_object_put (r2);
    g_clear_error (&err);
  }
  g_free (text);

  if (record) {
    struct fleece_handle *h = fleece_new ();
    const char *json;
    json_object *st;

    if (json_object_object_get_ex (record, "storage", &st)) {
      struct fleece_storage *s = fleece_storage_from_description (st, &err);
      fleece_storage_free (s);
      g_clear_error (&err);
    }
    sandbox (record);
    json = json_object_to_json_string_ext (record, JSON_C_TO_STRING_PLAIN);
    if (g_file_set_contents (record_path, json, -1, NULL)) {
      fleece_set_state_dir (h, state);
      fleece_set_vmid (h, VMID);
      fleece_set_qmp_timeout (h, 1000);
      if (fleece_cleanup (h) != 0 && !fleece_get_error ())
        abort ();   /* a failure must say why */
    }
    fleece_free (h);
    json_object_put (record);
  }
  g_unlink (record_path);
  return 0;
}
