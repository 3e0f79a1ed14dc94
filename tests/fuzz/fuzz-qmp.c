/* Fuzz target: the QMP reader (libfleece/qmp.c) and the schema walker
 * (libfleece/qmp-schema.c).
 *
 * The input is everything "QEMU" sends on the socket, byte for byte: the
 * greeting, replies, events, garbage.  The library connects over a
 * socketpair and runs a fixed conversation whose ids it numbers
 * fleece-1, fleece-2, ... so the seeds can answer them:
 *
 *   fleece-1  qmp_capabilities     (fleece_qmp_connect_fd)
 *   fleece-2  query-qmp-schema     (fleece_qmp_schema_load + lookups)
 *   fleece-3  query-block
 *             (an event, without reading: fleece_qmp_wait_event 0 ms)
 *   fleece-4  human-monitor-command
 *   fleece-5  getfd                (fleece_qmp_execute_fd: SCM_RIGHTS)
 *
 * Any step may fail; the target checks only that nothing crashes, leaks
 * or hangs (the peer's end is closed after the input, so every read ends).
 * Build and run: tests/fuzz/README in docs/reliability.md. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

/* Small enough that the fuzzer reaches the limit, large enough for the
 * seeds' schema. */
#define FUZZ_MAX_MESSAGE (64 * 1024)

typedef struct {
  int fd;
  const uint8_t *data;
  size_t size;
} Feed;

static void *
feed (void *opaque)
{
  Feed *f = opaque;
  size_t off = 0;

  while (off < f->size) {
    ssize_t n = send (f->fd, f->data + off, f->size - off, MSG_NOSIGNAL);

    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;    /* the library gave up and closed its end */
    off += (size_t) n;
  }
  shutdown (f->fd, SHUT_WR);
  return NULL;
}

static bool
any (const char *event, json_object *data, void *opaque)
{
  return true;
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  FleeceQmp *q;
  FleeceQmpSchema *s;
  json_object *r;
  GError *err = NULL;
  char *text;
  pthread_t writer;
  Feed f;
  int sv[2], pfd[2];

  if (socketpair (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    return 0;
  /* A thread writes, so that inputs larger than the socket buffer work
   * and the library reads them the way it reads QEMU: in pieces. */
  f = (Feed) { .fd = sv[0], .data = data, .size = size };
  if (pthread_create (&writer, NULL, feed, &f) != 0) {
    close (sv[0]);
    close (sv[1]);
    return 0;
  }

  q = fleece_qmp_new ();
  fleece_qmp_set_timeout (q, 5000);
  fleece_qmp_set_max_message (q, FUZZ_MAX_MESSAGE);
  if (!fleece_qmp_connect_fd (q, sv[1], &err))
    goto out;

  s = fleece_qmp_schema_load (q, &err);
  if (s) {
    (void) fleece_qmp_schema_has_driver (s, "copy-before-write");
    (void) fleece_qmp_schema_driver_has_member (s, "copy-before-write", "cbw-timeout");
    (void) fleece_qmp_schema_command_has_arg (s, "blockdev-backup", "discard-source");
    (void) fleece_qmp_schema_arg_has_member (s, "blockdev-backup", "x-perf",
                                             "min-cluster-size");
    (void) fleece_qmp_schema_has_command (s, "query-proxmox-support");
    fleece_qmp_schema_free (s);
  }
  g_clear_error (&err);

  r = fleece_qmp_execute (q, "query-block", NULL, &err);
  if (r)
    json_object_put (r);
  g_clear_error (&err);

  r = fleece_qmp_wait_event (q, any, NULL, 0, &err);
  if (r)
    json_object_put (r);
  g_clear_error (&err);

  text = fleece_qmp_hmp (q, "info block", &err);
  g_free (text);
  g_clear_error (&err);

  if (pipe2 (pfd, O_CLOEXEC) == 0) {
    r = fleece_qmp_execute_fd (q, "getfd",
                               json_tokener_parse ("{\"fdname\": \"fleece-fuzz\"}"),
                               pfd[1], &err);
    if (r)
      json_object_put (r);
    g_clear_error (&err);
    close (pfd[0]);
    close (pfd[1]);
  }
  while ((r = fleece_qmp_take_event (q, NULL, NULL)))
    json_object_put (r);
  (void) fleece_qmp_last_error_class (q);

 out:
  g_clear_error (&err);
  fleece_qmp_free (q);      /* closes sv[1]: a blocked writer gets EPIPE */
  pthread_join (writer, NULL);
  close (sv[0]);
  return 0;
}
