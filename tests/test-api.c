/* The public API without QEMU: per-thread errors, _free(NULL), argument
 * checks and their messages.  Links only the public library. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <check.h>
#include <glib.h>

#include <fleece/fleece.h>

#define ck_assert_error(errnum, substr) do {                            \
    ck_assert_int_eq (fleece_get_errno (), (errnum));                   \
    ck_assert_ptr_nonnull (fleece_get_error ());                        \
    ck_assert_msg (strstr (fleece_get_error (), (substr)) != NULL,      \
                   "error '%s' lacks '%s'", fleece_get_error (), (substr)); \
  } while (0)

static int
store_nothing (void *user_data, uint32_t vmid, const char *json, char **reason)
{
  return 0;
}

START_TEST (test_version)
{
  ck_assert_str_eq (fleece_get_version (), "1.0.0");
}
END_TEST

START_TEST (test_free_null)
{
  fleece_free (NULL);
  fleece_plan_free (NULL);
  fleece_storage_free (NULL);
  fleece_target_free (NULL);
}
END_TEST

START_TEST (test_settings)
{
  struct fleece_handle *h = fleece_new ();
  const char *bad_keys[] = { "scsi0", "a,b", NULL };
  const char *good_keys[] = { "scsi0", "efidisk0", NULL };

  ck_assert_ptr_nonnull (h);
  ck_assert_int_eq (fleece_set_vmid (h, 0), -1);
  ck_assert_error (EINVAL, "fleece_set_vmid: invalid vmid 0");
  ck_assert_int_eq (fleece_set_vmid (h, 1000000000u), -1);
  ck_assert_int_eq (fleece_set_vmid (h, 100), 0);
  ck_assert_uint_eq (fleece_get_vmid (h), 100);

  ck_assert_int_eq (fleece_set_drives (h, bad_keys), -1);
  ck_assert_error (EINVAL, "invalid drive key 'a,b'");
  ck_assert_int_eq (fleece_set_drives (h, good_keys), 0);
  ck_assert_int_eq (fleece_set_drives (h, NULL), 0);

  ck_assert_int_eq (fleece_set_image_format (h, "vmdk"), -1);
  ck_assert_error (EINVAL, "unknown image format 'vmdk'");
  ck_assert_int_eq (fleece_set_image_format (h, "qcow2"), 0);
  ck_assert_int_eq (fleece_set_image_format (h, NULL), 0);

  ck_assert_int_eq (fleece_set_engine (h, 7), -1);
  ck_assert_error (EINVAL, "unknown engine 7");
  ck_assert_int_eq (fleece_get_engine (h), -1);
  ck_assert_error (ENOTCONN, "fleece_connect");

  ck_assert_int_eq (fleece_set_plan_flags (h, 0x80), -1);
  ck_assert_error (EINVAL, "unknown plan flags 0x80");
  ck_assert_int_eq (fleece_set_qmp_timeout (h, 0), -1);
  ck_assert_int_eq (fleece_set_bitmap (h, "", FLEECE_BITMAP_USE), -1);
  ck_assert_error (EINVAL, "invalid bitmap name");
  ck_assert_int_eq (fleece_set_state_dir (h, ""), -1);
  ck_assert_int_eq (fleece_set_storage (h, NULL), -1);
  ck_assert_int_eq (fleece_set_record_callback (h, NULL, store_nothing, NULL, NULL), -1);
  ck_assert_error (EINVAL, "give both load and store callbacks");
  fleece_free (h);
}
END_TEST

START_TEST (test_not_connected)
{
  struct fleece_handle *h = fleece_new ();
  g_autofree char *dir = g_dir_make_tmp ("fleece-api-XXXXXX", NULL);
  g_autofree char *sock = g_build_filename (dir, "none.sock", NULL);

  ck_assert_int_eq (fleece_cleanup (h, 0), -1);
  ck_assert_error (EINVAL, "fleece_set_vmid");
  ck_assert_int_eq (fleece_set_vmid (h, 100), 0);
  ck_assert_ptr_null (fleece_plan (h));
  ck_assert_error (ENOTCONN, "fleece_plan: not connected");
  ck_assert_int_eq (fleece_attach (h, NULL, 0), -1);
  ck_assert_error (ENOTCONN, "fleece_attach: not connected");
  ck_assert_int_eq (fleece_wait (h, 0), -1);
  ck_assert_error (EINVAL, "no backup is running");
  ck_assert_int_eq (fleece_cancel (h), -1);
  ck_assert_int_eq (fleece_connect (h, sock), -1);
  ck_assert_int_eq (fleece_get_errno (), ECONNREFUSED);
  ck_assert_msg (strstr (fleece_get_error (), "fleece_connect: ") == fleece_get_error (),
                 "%s", fleece_get_error ());
  ck_assert_msg (strstr (fleece_get_error (), sock) != NULL, "%s", fleece_get_error ());
  /* A failed connect leaves the handle unconnected. */
  ck_assert_ptr_null (fleece_plan (h));
  ck_assert_error (ENOTCONN, "not connected");
  ck_assert_int_eq (fleece_connect_fd (h, -1), -1);
  ck_assert_error (EBADF, "invalid file descriptor");
  fleece_free (h);
  rmdir (dir);
}
END_TEST

START_TEST (test_targets)
{
  struct fleece_target *t;
  g_autofree char *dir = g_dir_make_tmp ("fleece-api-XXXXXX", NULL);

  ck_assert_ptr_null (fleece_target_new_dir ("relative", "raw"));
  ck_assert_error (EINVAL, "must be an absolute path");
  ck_assert_ptr_null (fleece_target_new_dir ("/nonexistent/x", "raw"));
  ck_assert_error (ENOENT, "does not exist");
  ck_assert_ptr_null (fleece_target_new_dir (dir, "vdi"));
  ck_assert_error (EINVAL, "unknown target format 'vdi'");
  t = fleece_target_new_dir (dir, "qcow2");
  ck_assert_ptr_nonnull (t);
  fleece_target_free (t);

  t = fleece_target_new_nbd ("nbd+unix:///?socket=/run/x.sock");
  ck_assert_ptr_nonnull (t);
  fleece_target_free (t);
  t = fleece_target_new_nbd ("nbd://127.0.0.1:10810");
  ck_assert_ptr_nonnull (t);
  fleece_target_free (t);
  ck_assert_ptr_null (fleece_target_new_nbd ("nbd+unix:///"));
  ck_assert_error (EINVAL, "lacks ?socket=PATH");
  ck_assert_ptr_null (fleece_target_new_nbd ("nbd://host/export"));
  ck_assert_error (EINVAL, "names an export");
  ck_assert_ptr_null (fleece_target_new_nbd ("http://host/"));
  ck_assert_error (EINVAL, "unsupported NBD URI scheme 'http'");
  ck_assert_ptr_null (fleece_target_new_nbd ("::not a uri"));
  ck_assert_error (EINVAL, "invalid NBD URI");

  ck_assert_ptr_null (fleece_target_new_pve ("[1,2]"));
  ck_assert_error (EINVAL, "must be a JSON object");
  ck_assert_ptr_null (fleece_target_new_pve ("{\"backup-file\":"));
  t = fleece_target_new_pve ("{\"backup-file\": \"/b/vm.vma\", \"format\": \"vma\"}");
  ck_assert_ptr_nonnull (t);
  fleece_target_free (t);
  rmdir (dir);
}
END_TEST

START_TEST (test_storage_args)
{
  ck_assert_ptr_null (fleece_storage_new_dir ("relative/dir"));
  ck_assert_int_ne (fleece_get_errno (), 0);
  ck_assert_ptr_null (fleece_storage_new_callback (NULL, 0, NULL, NULL));
  ck_assert_int_eq (fleece_get_errno (), EINVAL);
}
END_TEST

/* Errors are per thread: a failure in one thread is not seen in another. */
static void *
thread_fail (void *arg)
{
  struct fleece_handle *h = fleece_new ();
  char *copy;

  (void) arg;
  fleece_set_vmid (h, 0);
  copy = g_strdup (fleece_get_error ());
  fleece_free (h);
  return copy;
}

START_TEST (test_thread_errors)
{
  struct fleece_handle *h = fleece_new ();
  pthread_t t;
  char *other = NULL;

  fleece_set_image_format (h, "vmdk");
  ck_assert_int_eq (pthread_create (&t, NULL, thread_fail, NULL), 0);
  ck_assert_int_eq (pthread_join (t, (void **) &other), 0);
  ck_assert_ptr_nonnull (other);
  ck_assert_msg (strstr (other, "fleece_set_vmid") != NULL, "%s", other);
  ck_assert_error (EINVAL, "fleece_set_image_format");
  free (other);
  fleece_free (h);
}
END_TEST

static Suite *
api_suite (void)
{
  Suite *s = suite_create ("api");
  TCase *tc = tcase_create ("api");

  tcase_add_test (tc, test_version);
  tcase_add_test (tc, test_free_null);
  tcase_add_test (tc, test_settings);
  tcase_add_test (tc, test_not_connected);
  tcase_add_test (tc, test_targets);
  tcase_add_test (tc, test_storage_args);
  tcase_add_test (tc, test_thread_errors);
  suite_add_tcase (s, tc);
  return s;
}

int
main (void)
{
  SRunner *sr = srunner_create (api_suite ());
  int failed;

  srunner_run_all (sr, CK_NORMAL);
  failed = srunner_ntests_failed (sr);
  srunner_free (sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
