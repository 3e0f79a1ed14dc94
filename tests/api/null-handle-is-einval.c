/* Every call given a NULL handle, plan, target or storage fails with
 * EINVAL (NULL or -1) and never crashes; what the call would have taken
 * (an fd, a storage) is still released. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "apitest.h"

static int freed;

static void
count_free (void *user_data)
{
  freed++;
}

#define NULL_INT(call) \
  do { check ((call) == -1, "%s did not return -1", #call); \
       check_error (EINVAL, "NULL"); } while (0)
#define NULL_PTR(call) \
  do { check ((call) == NULL, "%s did not return NULL", #call); \
       check_error (EINVAL, "NULL"); } while (0)

static void
handle_calls (void)
{
  const char *keys[] = { "scsi0", NULL };
  uint64_t v;

  NULL_INT (fleece_connect (NULL, "/run/qemu-server/100.qmp"));
  NULL_INT (fleece_set_vmid (NULL, 100));
  NULL_INT (fleece_get_vmid (NULL));
  NULL_INT (fleece_set_state_dir (NULL, "/var/lib/fleece"));
  NULL_INT (fleece_set_engine (NULL, FLEECE_ENGINE_AUTO));
  NULL_INT (fleece_get_engine (NULL));
  NULL_INT (fleece_set_qmp_timeout (NULL, 1000));
  NULL_INT (fleece_set_drives (NULL, keys));
  NULL_INT (fleece_set_plan_flags (NULL, 0));
  NULL_INT (fleece_set_image_format (NULL, "raw"));
  NULL_INT (fleece_set_bwlimit (NULL, 0));
  NULL_INT (fleece_set_bitmap (NULL, "b", FLEECE_BITMAP_USE));
  NULL_INT (fleece_set_cbw_timeout (NULL, 0));
  NULL_INT (fleece_set_log_callback (NULL, NULL, NULL, count_free));
  NULL_INT (fleece_set_progress_callback (NULL, NULL, NULL, count_free));
  NULL_INT (fleece_set_record_callback (NULL, NULL, NULL, NULL, count_free));
  NULL_PTR (fleece_plan (NULL));
  NULL_INT (fleece_attach (NULL, NULL, 0));
  NULL_INT (fleece_start (NULL, NULL, NULL, 0));
  NULL_INT (fleece_wait (NULL, 0));
  NULL_INT (fleece_get_progress (NULL, &v, &v));
  NULL_INT (fleece_get_drive_progress (NULL, "scsi0", &v, &v));
  NULL_INT (fleece_get_stat (NULL, NULL, FLEECE_STAT_DONE, &v));
  NULL_PTR (fleece_get_drive_result (NULL, "scsi0"));
  NULL_INT (fleece_get_drive_elapsed_ms (NULL, "scsi0"));
  NULL_PTR (fleece_get_record (NULL));
  NULL_PTR (fleece_get_status (NULL, 0));
  NULL_INT (fleece_cleanup (NULL, 0));
  /* Signal-safe: errno only, no message. */
  errno = 0;
  check (fleece_cancel (NULL) == -1 && errno == EINVAL, "cancel: errno %d", errno);
  /* Not taken by a handle: the free functions are not called. */
  check (freed == 0, "free function called %d times", freed);
}

static void
plan_calls (void)
{
  NULL_INT (fleece_plan_get_drive_count (NULL));
  NULL_PTR (fleece_plan_to_json (NULL));
  NULL_INT (fleece_plan_get_skipped_count (NULL));
  /* Per drive: a NULL plan has no drive i. */
  check (fleece_plan_get_key (NULL, 0) == NULL, "key");
  check_error (EINVAL, "no drive 0");
  check (fleece_plan_get_device (NULL, 0) == NULL, "device");
  check (fleece_plan_get_size (NULL, 0) == -1, "size");
  check (fleece_plan_get_fleeced (NULL, 0) == -1, "fleeced");
  check (fleece_plan_get_reason (NULL, 0) == NULL, "reason");
  check (fleece_plan_get_image (NULL, 0) == NULL, "image");
  check (fleece_plan_get_format (NULL, 0) == NULL, "format");
  check (fleece_plan_get_cluster_size (NULL, 0) == -1, "cluster size");
  check_error (EINVAL, "no drive 0");
  check (fleece_plan_get_skipped_name (NULL, 0) == NULL, "skipped name");
  check (fleece_plan_get_skipped_reason (NULL, 0) == NULL, "skipped reason");
  check_error (EINVAL, "no skipped entry 0");
}

static void
object_calls (void)
{
  NULL_INT (fleece_target_set_base (NULL, "/backup"));
  NULL_INT (fleece_storage_set_option (NULL, "conf", "/etc/ceph/ceph.conf"));
  NULL_INT (fleece_storage_set_alloc_callback (NULL, NULL));
  NULL_INT (fleece_storage_set_remove_callback (NULL, NULL));
  NULL_INT (fleece_storage_set_path_callback (NULL, NULL));
  NULL_INT (fleece_storage_set_blockdev_callback (NULL, NULL));
  fleece_free (NULL);
  fleece_plan_free (NULL);
  fleece_target_free (NULL);
  fleece_storage_free (NULL);
}

/* A handle with a NULL plan, target or storage. */
static void
null_arguments (void)
{
  struct fleece_handle *h = fleece_new ();

  check (h != NULL, "%s", fleece_get_error ());
  check (fleece_set_storage (h, NULL) == -1, "set_storage");
  check_error (EINVAL, "storage is NULL");
  fleece_free (h);
}

/* fleece_connect_fd and fleece_set_storage take what they are given,
 * also when the handle is NULL. */
static void
ownership_kept (void)
{
  struct fleece_storage *st = fleece_storage_new_callback ("x", 0, NULL, count_free);
  int sv[2];

  check (socketpair (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
  check (fleece_connect_fd (NULL, sv[0]) == -1, "connect_fd");
  check_error (EINVAL, "NULL");
  check (fcntl (sv[0], F_GETFD) == -1 && errno == EBADF, "fd %d left open", sv[0]);
  close (sv[1]);
  check (st != NULL, "%s", fleece_get_error ());
  check (fleece_set_storage (NULL, st) == -1, "set_storage");
  check_error (EINVAL, "NULL");
  check (freed == 1, "storage freed %d times", freed);
}

int
main (void)
{
  handle_calls ();
  plan_calls ();
  object_calls ();
  null_arguments ();
  ownership_kept ();
  return EXIT_SUCCESS;
}
