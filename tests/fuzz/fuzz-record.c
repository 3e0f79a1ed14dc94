/* Fuzz target: the durable record (libfleece/record.c) and what the
 * engines do with one when QEMU is gone (fleece_cleanup()).
 *
 * The input is the content of a record file.  It is loaded from a file
 * and through the load callback; a record that loads is then cleaned up
 * through the public API (status, then cleanup), sandboxed: its QMP
 * socket is replaced by one that does not exist (the fuzzer must not talk
 * to sockets on the host), its directory storage and its target files are
 * pointed at a scratch directory (it must not free files elsewhere), a
 * callback storage gets callbacks that do nothing.  Checked: no crash,
 * leak or hang; a record refused is refused with a message. */
#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <glib/gstdio.h>

#include "internal.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

#define VMID 100

static char *scratch;     /* state dir and storage live here */
static char *state;
static char *storage;
static char *record_path;

static int
remove_entry (const char *path, const struct stat *sb, int type,
              struct FTW *ftw)
{
  remove (path);
  return 0;
}

static void
remove_scratch (void)
{
  nftw (scratch, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
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
load_cb (void *user_data, uint32_t vmid, char **json, char **reason)
{
  *json = strdup (user_data);
  return *json ? 0 : -1;
}

static int
store_cb (void *user_data, uint32_t vmid, const char *json, char **reason)
{
  return 0;
}

static int
storage_alloc (void *user_data, const char *name, const char *format,
               uint64_t size, char **volid, char **reason)
{
  *reason = strdup ("the fuzzer allocates nothing");
  return -1;
}

static int
storage_remove (void *user_data, const char *volid, char **reason)
{
  return 0;
}

static char *
storage_path (void *user_data, const char *volid, char **reason)
{
  return NULL;
}

/* The storage a cleanup frees images through: the scratch directory,
 * described in the record as the run's own, or a callback storage with
 * the record's id whose remove does nothing. */
static struct fleece_storage *
sandbox_storage (json_object *record)
{
  json_object *st = fleece_jobj (record, "storage");
  const char *type = fleece_jstr (st, "type");
  struct fleece_storage *s;

  if (!st || !json_object_is_type (st, json_type_object) || !type)
    return NULL;
  if (strcmp (type, "dir") == 0) {
    struct stat sb;

    if (stat (storage, &sb) != 0)
      return NULL;
    fleece_jset_str (st, "dir", storage);
    fleece_jset_int (st, "dev", (int64_t) sb.st_dev);
    fleece_jset_int (st, "ino", (int64_t) sb.st_ino);
    return fleece_storage_new_dir (storage);
  }
  if (strcmp (type, "callback") != 0 ||
      !(s = fleece_storage_new_callback (fleece_jstr (st, "id"), 0, NULL, NULL)))
    return NULL;
  fleece_storage_set_alloc_callback (s, storage_alloc);
  fleece_storage_set_remove_callback (s, storage_remove);
  fleece_storage_set_path_callback (s, storage_path);
  return s;
}

/* Nothing outside the scratch dir: no QEMU on the host (a socket that
 * does not exist), no target files elsewhere. */
static void
sandbox (json_object *record)
{
  json_object *drives = fleece_jobj (record, "drives");
  char *sock = g_build_filename (scratch, "no-qemu.sock", NULL);

  json_object_object_add (record, "qmp", json_object_new_string (sock));
  g_free (sock);
  for (size_t i = 0; json_object_is_type (drives, json_type_array) &&
                     i < json_object_array_length (drives); i++) {
    json_object *tf = fleece_jobj (json_object_array_get_idx (drives, i), "target-file");

    if (json_object_is_type (tf, json_type_object) && fleece_jobj (tf, "dir"))
      fleece_jset_str (tf, "dir", storage);
  }
}

static void
clean_up_through_the_api (json_object *record)
{
  struct fleece_handle *h = fleece_new ();
  const char *json;
  char *text;

  fleece_set_storage (h, sandbox_storage (record));
  sandbox (record);
  json = json_object_to_json_string_ext (record, JSON_C_TO_STRING_PLAIN);
  if (g_file_set_contents (record_path, json, -1, NULL)) {
    fleece_set_state_dir (h, state);
    fleece_set_vmid (h, VMID);
    fleece_set_qmp_timeout (h, 1000);
    free (fleece_get_record (h));
    text = fleece_get_status (h, 0);
    if (!text && !fleece_get_error ())
      abort ();
    free (text);
    if (fleece_cleanup (h, 0) != 0 && !fleece_get_error ())
      abort ();   /* a failure must say why */
  }
  fleece_free (h);
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
  rs.user_data = text;
  {
    json_object *r2 = fleece_record_load (&rs, VMID, &err);
    if (r2)
      json_object_put (r2);
    g_clear_error (&err);
  }
  g_free (text);

  if (record) {
    clean_up_through_the_api (record);
    json_object_put (record);
  }
  g_unlink (record_path);
  return 0;
}
