/* The durable record of a run and the per-VM lock.
 *
 * The record is what fleece_cleanup() recovers from after a crash, so it is
 * written atomically (a reader sees the old record or the new one, never a
 * mix) and durably before the library acts on it.  A record that cannot be
 * trusted is never guessed at: loading it fails with a message that says
 * which record and what to do about it. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "internal.h"

/* 2: files and images carry the identity that proves them ours (1.0). */
#define RECORD_VERSION 2
/* Far above any real record (a few hundred bytes per drive); a larger one
 * is garbage, and refusing it bounds what a load reads into memory. */
#define RECORD_MAX_SIZE (1024 * 1024)

static bool
rs_check (const FleeceRecordStore *rs, GError **err)
{
  if (!rs) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "no record store");
    return false;
  }
  if (rs->load || rs->store) {
    if (!rs->load || !rs->store) {
      g_set_error (err, FLEECE_ERROR, EINVAL,
                   "both the record load and store callbacks are required");
      return false;
    }
    return true;
  }
  if (!rs->dir || !*rs->dir) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "the state directory is empty");
    return false;
  }
  return true;
}

static bool
rs_is_callback (const FleeceRecordStore *rs)
{
  return rs->load != NULL;
}

static char *
record_path (const char *dir, uint32_t vmid)
{
  g_autofree char *base = g_strdup_printf ("%" PRIu32 ".json", vmid);
  return g_build_filename (dir, base, NULL);
}

/* What is wrong with record as the record of vmid, or NULL. */
static char *
record_problem (json_object *record, uint32_t vmid)
{
  json_object *v;
  int64_t n;

  if (!json_object_is_type (record, json_type_object))
    return g_strdup_printf ("it is a JSON %s, not an object",
                            json_type_to_name (json_object_get_type (record)));
  if (!json_object_object_get_ex (record, "version", &v) ||
      !json_object_is_type (v, json_type_int))
    return g_strdup ("it has no \"version\" number");
  n = json_object_get_int64 (v);
  if (n != RECORD_VERSION)
    return g_strdup_printf ("its version %" PRId64 " is not %d, the only "
                            "version this libfleece reads", n, RECORD_VERSION);
  if (!json_object_object_get_ex (record, "vmid", &v) ||
      !json_object_is_type (v, json_type_int))
    return g_strdup ("it has no \"vmid\" number");
  n = json_object_get_int64 (v);
  if (n != (int64_t) vmid)
    return g_strdup_printf ("it is the record of VM %" PRId64 ", not of VM %"
                            PRIu32, n, vmid);
  /* The engines walk it with json-c's array functions, which assert on the
   * type. */
  if (json_object_object_get_ex (record, "drives", &v)) {
    if (!json_object_is_type (v, json_type_array))
      return g_strdup ("its \"drives\" is not an array");
    for (size_t i = 0; i < json_object_array_length (v); i++)
      if (!json_object_is_type (json_object_array_get_idx (v, i), json_type_object))
        return g_strdup_printf ("its drive %zu is not an object", i);
  }
  return NULL;
}

/* Parse and check len bytes of buf as the record of vmid.  where names the
 * record and fix says how to get rid of it, for the error message. */
static json_object *
record_parse (const char *buf, size_t len, uint32_t vmid, const char *where,
              const char *fix, GError **err)
{
  g_autofree char *problem = NULL;
  json_tokener *tok = NULL;
  json_object *record = NULL;

  if (len > RECORD_MAX_SIZE) {
    g_set_error (err, FLEECE_ERROR, EFBIG,
                 "%s is larger than %d bytes, so it is not a record of this "
                 "library; %s", where, RECORD_MAX_SIZE, fix);
    return NULL;
  }
  if (len == 0)
    problem = g_strdup ("it is empty");
  else if (memchr (buf, '\0', len))
    problem = g_strdup ("it contains a NUL byte");
  else {
    enum json_tokener_error jerr;
    size_t end;

    tok = json_tokener_new ();
    record = json_tokener_parse_ex (tok, buf, (int) len);
    jerr = json_tokener_get_error (tok);
    end = json_tokener_get_parse_end (tok);
    if (!record && jerr == json_tokener_continue) {
      /* A top-level number or literal ends only with the input: say so by
       * passing the terminating NUL. */
      record = json_tokener_parse_ex (tok, "", 1);
      jerr = json_tokener_get_error (tok);
      end = len;
    }
    if (!record) {
      if (jerr == json_tokener_success)
        problem = g_strdup ("it is a JSON null, not an object");
      else if (jerr == json_tokener_error_parse_eof)
        problem = g_strdup ("its JSON is incomplete (truncated?)");
      else
        problem = g_strdup_printf ("it is not JSON (%s at byte %zu)",
                                   json_tokener_error_desc (jerr), end);
    } else {
      while (end < len && g_ascii_isspace (buf[end]))
        end++;
      if (end < len)
        problem = g_strdup_printf ("it has data after the JSON value (at "
                                   "byte %zu)", end);
      else
        problem = record_problem (record, vmid);
    }
    json_tokener_free (tok);
  }

  if (problem) {
    if (record)
      json_object_put (record);
    g_set_error (err, FLEECE_ERROR, EBADMSG,
                 "%s cannot be used: %s; %s", where, problem, fix);
    return NULL;
  }
  return record;
}

/* ---- files ---------------------------------------------------------- */

static bool
fsync_dir (const char *dir, GError **err)
{
  int fd = open (dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  int e;

  if (fd < 0) {
    e = errno;
    g_set_error (err, FLEECE_ERROR, e, "cannot open directory %s: %s", dir,
                 g_strerror (e));
    return false;
  }
  /* Some file systems cannot sync a directory (EINVAL); their renames are
   * as durable as they get. */
  if (fsync (fd) != 0 && errno != EINVAL) {
    e = errno;
    close (fd);
    g_set_error (err, FLEECE_ERROR, e, "cannot sync directory %s: %s", dir,
                 g_strerror (e));
    return false;
  }
  close (fd);
  return true;
}

static bool
write_all (int fd, const char *buf, size_t len)
{
  while (len > 0) {
    ssize_t n = write (fd, buf, len);

    if (n < 0) {
      if (errno == EINTR)
        continue;
      return false;
    }
    buf += n;
    len -= (size_t) n;
  }
  return true;
}

/* The record file at path in dir, opened for reading: its fd, or -1 with
 * err set, or -1 with err unset when there is none (no state directory:
 * create nothing; no file). */
static int
open_record (const char *dir, const char *path, GError **err)
{
  struct stat dsb;
  int fd, e;

  if (!g_path_is_absolute (dir)) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "the state directory '%s' is "
                 "not an absolute path (FLEECE_STATE_DIR?)", dir);
    return -1;
  }
  if (lstat (dir, &dsb) != 0 && errno == ENOENT)
    return -1;
  if (!fleece_dir_check_private (dir, "state directory", err))
    return -1;
  /* O_NONBLOCK: opening a FIFO put in the record's place would wait for a
   * writer forever; the type is checked by read_record (for a regular
   * file the flag changes nothing).  O_NOFOLLOW: a symlink is never a
   * record. */
  fd = open (path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK | O_NOFOLLOW);
  if (fd >= 0)
    return fd;
  e = errno;
  if (e == ELOOP)
    g_set_error (err, FLEECE_ERROR, EBADMSG,
                 "record %s is a symbolic link, not a record of this "
                 "library; remove it", path);
  else if (e != ENOENT)
    g_set_error (err, FLEECE_ERROR, e, "cannot open record %s: %s", path,
                 g_strerror (e));
  return -1;
}

/* The bytes of the open record fd (g_free; *len of them), which must be a
 * regular file of ours of at most RECORD_MAX_SIZE bytes. */
static char *
read_record (int fd, const char *path, const char *where, const char *fix,
             size_t *len, GError **err)
{
  g_autofree char *buf = NULL;
  struct stat sb;
  int e;

  if (fstat (fd, &sb) != 0) {
    e = errno;
    g_set_error (err, FLEECE_ERROR, e, "cannot stat record %s: %s", path,
                 g_strerror (e));
    return NULL;
  }
  if (!S_ISREG (sb.st_mode) || sb.st_uid != geteuid ()) {
    g_set_error (err, FLEECE_ERROR, EBADMSG,
                 "%s is not a regular file of uid %u; %s", where,
                 (unsigned) geteuid (), fix);
    return NULL;
  }
  if (sb.st_size > RECORD_MAX_SIZE) {
    g_set_error (err, FLEECE_ERROR, EFBIG,
                 "%s is larger than %d bytes, so it is not a record of this "
                 "library; %s", where, RECORD_MAX_SIZE, fix);
    return NULL;
  }
  /* Read one byte beyond the limit so a file growing meanwhile is still
   * caught by the size check. */
  buf = g_malloc (RECORD_MAX_SIZE + 1);
  *len = 0;
  while (*len < RECORD_MAX_SIZE + 1) {
    ssize_t n = read (fd, buf + *len, RECORD_MAX_SIZE + 1 - *len);

    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0) {
      e = errno;
      g_set_error (err, FLEECE_ERROR, e, "cannot read record %s: %s", path,
                   g_strerror (e));
      return NULL;
    }
    if (n == 0)
      break;
    *len += (size_t) n;
  }
  return g_steal_pointer (&buf);
}

static json_object *
file_load (const char *dir, uint32_t vmid, GError **err)
{
  g_autofree char *path = record_path (dir, vmid);
  g_autofree char *where = NULL, *fix = NULL, *buf = NULL;
  size_t len = 0;
  int fd = open_record (dir, path, err);

  if (fd < 0)
    return NULL;
  where = g_strdup_printf ("record %s", path);
  fix = g_strdup_printf ("remove %s after checking nothing of VM %" PRIu32
                         " is attached", path, vmid);
  buf = read_record (fd, path, where, fix, &len, err);
  close (fd);
  return buf ? record_parse (buf, len, vmid, where, fix, err) : NULL;
}

static bool
file_store (const char *dir, uint32_t vmid, const char *json, size_t len,
            GError **err)
{
  g_autofree char *path = record_path (dir, vmid);
  g_autofree char *tmp = NULL;
  g_autofree char *tmpbase = NULL;
  const char *step;
  int fd, e;

  if (!fleece_dir_ensure_private (dir, "state directory", err))
    return false;

  /* A temporary file in the same directory, so rename() replaces the record
   * atomically.  A crash can leave one behind; it starts with a dot and is
   * never read. */
  tmpbase = g_strdup_printf (".%" PRIu32 ".json.XXXXXX", vmid);
  tmp = g_build_filename (dir, tmpbase, NULL);
  fd = mkostemp (tmp, O_CLOEXEC);  /* mode 0600 */
  if (fd < 0) {
    e = errno;
    g_set_error (err, FLEECE_ERROR, e,
                 "cannot create a temporary file for record %s: %s", path,
                 g_strerror (e));
    return false;
  }

  step = "write";
  if (!write_all (fd, json, len))
    goto fail;
  step = "sync";
  if (fsync (fd) != 0)
    goto fail;
  step = "close";
  if (close (fd) != 0) {
    fd = -1;
    goto fail;
  }
  fd = -1;
  step = "rename";
  if (rename (tmp, path) != 0)
    goto fail;
  return fsync_dir (dir, err);

 fail:
  e = errno;
  if (fd >= 0)
    close (fd);
  unlink (tmp);
  g_set_error (err, FLEECE_ERROR, e, "cannot %s record %s: %s", step,
               strcmp (step, "rename") == 0 ? path : tmp, g_strerror (e));
  return false;
}

static bool
file_remove (const char *dir, uint32_t vmid, GError **err)
{
  g_autofree char *path = record_path (dir, vmid);

  if (unlink (path) != 0) {
    int e = errno;

    if (e == ENOENT)
      return true;
    g_set_error (err, FLEECE_ERROR, e, "cannot remove record %s: %s", path,
                 g_strerror (e));
    return false;
  }
  return fsync_dir (dir, err);
}

/* ---- callbacks ---------------------------------------------------------- */

static json_object *
cb_load (const FleeceRecordStore *rs, uint32_t vmid, GError **err)
{
  g_autofree char *where = NULL;
  g_autofree char *fix = NULL;
  json_object *record;
  char *json = NULL, *reason = NULL;
  int rc, e;

  errno = 0;
  rc = rs->load (rs->user_data, vmid, &json, &reason);
  e = errno;
  if (rc != 0) {
    free (json);
    fleece_error_from_callback (err, e, reason, "the record load callback "
                                "failed for VM %" PRIu32, vmid);
    return NULL;
  }
  free (reason);
  if (!json)
    return NULL;

  where = g_strdup_printf ("the record of VM %" PRIu32 " from the record "
                           "load callback", vmid);
  fix = g_strdup_printf ("remove it from the caller's record store after "
                         "checking nothing of VM %" PRIu32 " is attached",
                         vmid);
  record = record_parse (json, strnlen (json, RECORD_MAX_SIZE + 1), vmid,
                         where, fix, err);
  free (json);
  return record;
}

static bool
cb_store (const FleeceRecordStore *rs, uint32_t vmid, const char *json,
          GError **err)
{
  char *reason = NULL;
  int rc, e;

  errno = 0;
  rc = rs->store (rs->user_data, vmid, json, &reason);
  e = errno;
  if (rc != 0) {
    fleece_error_from_callback (err, e, reason, "the record store callback "
                                "failed to %s the record of VM %" PRIu32,
                                json ? "store" : "remove", vmid);
    return false;
  }
  free (reason);
  return true;
}

/* ---- the internal interface ------------------------------------------ */

json_object *
fleece_record_load (const FleeceRecordStore *rs, uint32_t vmid, GError **err)
{
  if (!rs_check (rs, err))
    return NULL;
  if (rs_is_callback (rs))
    return cb_load (rs, vmid, err);
  return file_load (rs->dir, vmid, err);
}

bool
fleece_record_store (const FleeceRecordStore *rs, uint32_t vmid,
                     json_object *record, GError **err)
{
  g_autofree char *problem = NULL;
  g_autofree char *json = NULL;
  size_t len;

  if (!rs_check (rs, err))
    return false;
  /* Refuse what a load would refuse: better to fail before acting on a
   * record than to find out in a cleanup after a crash. */
  if (!record) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "refusing to store an empty record for VM %" PRIu32
                 " (use fleece_record_remove())", vmid);
    return false;
  }
  problem = record_problem (record, vmid);
  if (problem) {
    g_set_error (err, FLEECE_ERROR, EINVAL,
                 "refusing to store the record of VM %" PRIu32 ": %s", vmid,
                 problem);
    return false;
  }
  /* Files are for people to read; a caller keeps the record in a config
   * whose values are single lines (Proxmox's guest config). */
  if (rs_is_callback (rs))
    json = g_strdup (json_object_to_json_string_ext (record,
                       JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
  else
    json = g_strconcat (json_object_to_json_string_ext (record,
                          JSON_C_TO_STRING_PRETTY |
                          JSON_C_TO_STRING_NOSLASHESCAPE), "\n", NULL);
  len = strlen (json);
  if (len > RECORD_MAX_SIZE) {
    g_set_error (err, FLEECE_ERROR, EFBIG,
                 "refusing to store the record of VM %" PRIu32 ": %zu bytes "
                 "is over the limit of %d", vmid, len, RECORD_MAX_SIZE);
    return false;
  }

  if (rs_is_callback (rs))
    return cb_store (rs, vmid, json, err);
  return file_store (rs->dir, vmid, json, len, err);
}

bool
fleece_record_remove (const FleeceRecordStore *rs, uint32_t vmid,
                      GError **err)
{
  if (!rs_check (rs, err))
    return false;
  if (rs_is_callback (rs))
    return cb_store (rs, vmid, NULL, err);
  return file_remove (rs->dir, vmid, err);
}

/* flock() rather than fcntl() locks: they belong to the open file, so a
 * second open in the same process conflicts too (fcntl locks would not),
 * and closing some other fd of the file does not drop them.  The lock file
 * is never removed: unlinking it would let two runs lock different inodes. */
int
fleece_lock_vm (const char *state_dir, uint32_t vmid, bool create,
                GError **err)
{
  g_autofree char *base = NULL;
  g_autofree char *path = NULL;
  struct stat sb;
  int fd, e;

  if (!state_dir || !*state_dir) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "the state directory is empty");
    return -1;
  }
  if (!g_path_is_absolute (state_dir)) {
    g_set_error (err, FLEECE_ERROR, EINVAL, "the state directory '%s' is not "
                 "an absolute path (FLEECE_STATE_DIR?)", state_dir);
    return -1;
  }
  if (!create && lstat (state_dir, &sb) != 0 && errno == ENOENT)
    return FLEECE_LOCK_NO_DIR;
  if (!(create ? fleece_dir_ensure_private (state_dir, "state directory", err)
               : fleece_dir_check_private (state_dir, "state directory", err)))
    return -1;

  base = g_strdup_printf ("%" PRIu32 ".lock", vmid);
  path = g_build_filename (state_dir, base, NULL);
  /* O_CLOEXEC: a qemu-img spawned meanwhile must not inherit the lock.
   * O_NOFOLLOW: a planted symlink must not make us create or lock a file
   * elsewhere. */
  fd = open (path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW, 0600);
  if (fd < 0) {
    e = errno;
    g_set_error (err, FLEECE_ERROR, e == ELOOP ? EPERM : e,
                 "cannot open lock file %s: %s", path,
                 e == ELOOP ? "it is a symbolic link; remove it" : g_strerror (e));
    return -1;
  }
  if (fstat (fd, &sb) != 0 || !S_ISREG (sb.st_mode) || sb.st_uid != geteuid ()) {
    close (fd);
    g_set_error (err, FLEECE_ERROR, EPERM,
                 "lock file %s is not a regular file of uid %u; remove it",
                 path, (unsigned) geteuid ());
    return -1;
  }
  while (flock (fd, LOCK_EX | LOCK_NB) != 0) {
    e = errno;
    if (e == EINTR)
      continue;
    close (fd);
    if (e == EWOULDBLOCK)
      g_set_error (err, FLEECE_ERROR, EBUSY,
                   "another run holds the lock for VM %" PRIu32 " (%s): it is "
                   "still running; see fleece status", vmid, path);
    else
      g_set_error (err, FLEECE_ERROR, e, "cannot lock %s: %s", path,
                   g_strerror (e));
    return -1;
  }
  return fd;
}

int
fleece_lock_probe (const char *state_dir, uint32_t vmid)
{
  if (!g_path_is_absolute (state_dir))
    return -1;
  g_autofree char *base = g_strdup_printf ("%" PRIu32 ".lock", vmid);
  g_autofree char *path = g_build_filename (state_dir, base, NULL);
  int fd = open (path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW);
  int r;

  if (fd < 0)
    return errno == ENOENT ? 0 : -1;
  r = flock (fd, LOCK_SH | LOCK_NB) == 0 ? 0 : errno == EWOULDBLOCK ? 1 : -1;
  close (fd);
  return r;
}
