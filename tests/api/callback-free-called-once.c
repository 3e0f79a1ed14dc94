/* Every callback's free function is called exactly once: when the
 * callback is replaced (also by NULL), when the object holding it is
 * freed, when a storage the handle took is replaced or refused; never
 * for user data no object took. */
#include <errno.h>
#include <string.h>

#include "apitest.h"

enum { LOG_A, LOG_B, PROGRESS, RECORD, RECORD2, STORAGE, STORAGE2, REFUSED, N };
static int freed[N];
static int tags[N] = { LOG_A, LOG_B, PROGRESS, RECORD, RECORD2, STORAGE, STORAGE2, REFUSED };

static void
count_free (void *user_data)
{
  freed[*(int *) user_data]++;
}

static void
log_fn (void *user_data, int level, const char *msg)
{
}

static void
progress_fn (void *user_data, const char *drive, uint64_t done, uint64_t total)
{
}

static int
load_fn (void *user_data, uint32_t vmid, char **json, char **reason)
{
  *json = NULL;
  return 0;
}

static int
store_fn (void *user_data, uint32_t vmid, const char *json, char **reason)
{
  return 0;
}

static int
alloc_fn (void *user_data, const char *name, const char *format,
          uint64_t size, char **volid, char **reason)
{
  return -1;
}

static int
remove_fn (void *user_data, const char *volid, char **reason)
{
  return -1;
}

static char *
path_fn (void *user_data, const char *volid, char **reason)
{
  return NULL;
}

#define FREED(i, n) check (freed[i] == (n), #i " freed %d times, not %d", freed[i], (n))

static struct fleece_storage *
storage (int tag)
{
  struct fleece_storage *st = fleece_storage_new_callback ("pve:x", 0, &tags[tag],
                                                           count_free);

  check (st != NULL, "%s", fleece_get_error ());
  return st;
}

static void
complete (struct fleece_storage *st)
{
  check (fleece_storage_set_alloc_callback (st, alloc_fn) == 0 &&
         fleece_storage_set_remove_callback (st, remove_fn) == 0 &&
         fleece_storage_set_path_callback (st, path_fn) == 0,
         "%s", fleece_get_error ());
}

int
main (void)
{
  struct fleece_handle *h = fleece_new ();
  struct fleece_storage *st = storage (STORAGE), *st2 = storage (STORAGE2);

  check (fleece_set_log_callback (h, log_fn, &tags[LOG_A], count_free) == 0, "log");
  check (fleece_set_log_callback (h, log_fn, &tags[LOG_B], count_free) == 0, "log");
  FREED (LOG_A, 1);
  FREED (LOG_B, 0);
  check (fleece_set_log_callback (h, NULL, NULL, NULL) == 0, "log");
  FREED (LOG_B, 1);

  check (fleece_set_progress_callback (h, progress_fn, &tags[PROGRESS], count_free) == 0,
         "progress");
  check (fleece_set_record_callback (h, load_fn, store_fn, &tags[RECORD], count_free) == 0,
         "record");
  check (fleece_set_record_callback (h, load_fn, store_fn, &tags[RECORD2], count_free) == 0,
         "record");
  FREED (RECORD, 1);
  /* A refused replacement leaves the callback (and its data) in place. */
  check (fleece_set_record_callback (h, load_fn, NULL, &tags[RECORD], count_free) == -1,
         "half a record store");
  check_error (EINVAL, "give both load and store callbacks");
  FREED (RECORD, 1);
  FREED (RECORD2, 0);

  complete (st);
  complete (st2);
  check (fleece_set_storage (h, st) == 0, "%s", fleece_get_error ());
  check (fleece_set_storage (h, st2) == 0, "%s", fleece_get_error ());
  FREED (STORAGE, 1);
  /* Incomplete: refused, and freed because the handle took it. */
  check (fleece_set_storage (h, storage (REFUSED)) == -1, "incomplete storage");
  check_error (EINVAL, "lacks callbacks");
  FREED (REFUSED, 1);
  /* Not taken by any object: not freed. */
  check (fleece_storage_new_callback ("", 0, &tags[REFUSED], count_free) == NULL, "id");
  FREED (REFUSED, 1);

  fleece_free (h);
  FREED (LOG_A, 1);
  FREED (LOG_B, 1);
  FREED (PROGRESS, 1);
  FREED (RECORD, 1);
  FREED (RECORD2, 1);
  FREED (STORAGE, 1);
  FREED (STORAGE2, 1);
  return EXIT_SUCCESS;
}
