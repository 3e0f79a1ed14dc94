/* Helpers shared by the benchmark: processes, a small QMP client, a
 * counting (and optionally rewriting) QMP proxy between libfleece and QEMU,
 * statistics.  Benchmarks only: they die on unexpected errors. */
#ifndef FLEECE_BENCH_UTIL_H
#define FLEECE_BENCH_UTIL_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <glib.h>
#include <json-c/json.h>

#define KiB (1024ull)
#define MiB (1024ull * 1024)
#define GiB (1024ull * MiB)

void die (const char *fmt, ...) G_GNUC_PRINTF (1, 2) G_GNUC_NORETURN;
void note (const char *fmt, ...) G_GNUC_PRINTF (1, 2);
double loadavg1 (void);
gint64 now_us (void);

/* ---- processes ---- */
/* Start argv (NULL-terminated) with stdout/stderr to log; the child dies
 * with us (PR_SET_PDEATHSIG). */
pid_t spawn_logged (char *const *argv, const char *log);
/* SIGTERM, wait up to 5 s, then SIGKILL. */
void stop_pid (pid_t pid);
/* Run and wait; die on failure. */
void run_cmd (char *const *argv);
void rm_rf (const char *dir);
uint64_t allocated_bytes (const char *path);
/* A file of size bytes of non-zero pseudo-random data (seeded). */
void make_random_file (const char *path, uint64_t size, uint32_t seed);
void make_sparse_file (const char *path, uint64_t size);

/* ---- QMP client ---- */
typedef struct {
  int fd;
  GString *buf;
  unsigned next_id;
} Qmp;

/* Connect (retrying up to 20 s while the socket is not there) and
 * negotiate capabilities. */
Qmp *qmp_open (const char *path);
void qmp_close (Qmp *q);
/* The "return" value (json_object_put it); NULL and *err (g_free) on a QMP
 * error; dies on I/O errors. args is consumed. */
json_object *qmp_try (Qmp *q, const char *cmd, json_object *args, char **err);
json_object *qmp_do (Qmp *q, const char *cmd, json_object *args);
/* HMP command; returns its output (g_free). */
char *hmp (Qmp *q, const char *line);
json_object *json_parse (const char *fmt, ...) G_GNUC_PRINTF (1, 2);
/* "major.minor.micro" of the QEMU behind q (g_free). */
char *qmp_qemu_version (Qmp *q);

/* ---- the proxy ---- */
/* What the proxy changes in the library's commands: the library's defaults
 * as they would be after a code change, without changing the library.
 * Zero/NULL fields mean "as the library sends it". */
typedef struct {
  const char *name;          /* short id used in tables and file names */
  const char *desc;          /* what it changes */
  const char *format;        /* fleece_set_image_format(); NULL: library's */
  const char *create_opts;   /* non-NULL: images made by a callback storage
                              * with qemu-img create -f <format> -o <opts>
                              * ("" for none); NULL: library's dir storage */
  int cache_direct;          /* fleecing image nodes: 1 on, 2 off, 0 as is */
  int no_flush;              /* 1 on, 0 as is */
  int discard_no_unref;      /* qcow2 discard-no-unref: 1 on */
  int64_t job_min_cluster;   /* x-perf.min-cluster-size of fleeced jobs */
  int max_workers;           /* x-perf.max-workers */
  int64_t max_chunk;         /* x-perf.max-chunk */
  int64_t cbw_min_cluster;   /* copy-before-write min-cluster-size */
  int plain_max_workers;     /* x-perf.max-workers of jobs without fleecing */
  int plain_no_copy_range;   /* x-perf.use-copy-range=false without fleecing */
  int no_discard_source;     /* drop discard-source (diagnosis only) */
  const char *aio;           /* fleecing image file node: aio mode */
} Variant;

typedef struct Proxy Proxy;
/* Connect to QEMU's socket; *lib_fd is the end to hand to
 * fleece_connect_fd().  v may be NULL (count only). */
Proxy *proxy_start (const char *qemu_sock, const Variant *v, int *lib_fd);
/* Wait until the library closed its end, then free. */
void proxy_stop (Proxy *p);
/* Commands forwarded so far, and microseconds QEMU took to answer them
 * (request forwarded -> reply read), in total and for one command name. */
unsigned proxy_count (Proxy *p, const char *cmd);
gint64 proxy_qemu_us (Proxy *p, const char *cmd);
/* "cmd count time_ms; ..." sorted by count, for the report. */
char *proxy_breakdown (Proxy *p);
void proxy_reset (Proxy *p);

/* ---- statistics ---- */
/* A GArray of doubles, and appending one. */
GArray *dbl_array (void);
void push (GArray *a, double x);
/* dir/name opened for writing; dies if it cannot be. */
FILE *open_out (const char *dir, const char *name);
/* Nearest-rank quantile of an array of doubles (sorted in place). */
double quantile (GArray *a, double q);
int cmp_double (gconstpointer a, gconstpointer b);
double median3 (GArray *a);

#endif
