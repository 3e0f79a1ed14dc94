/* probe: the guest side of bench/guest, a static program in the guest's
 * initramfs.  It serves line commands from the host on a virtio-serial port
 * (or any tty/character device) and answers with what the guest's
 * applications would feel: O_DIRECT writes timed with CLOCK_MONOTONIC.
 *
 *   probe serve PORT            serve commands read from PORT
 *   probe PROBE-COMMAND ...     run one command, answer on stdout (tests)
 *
 * Commands, one line each, "key=value" arguments:
 *
 *   ping                        -> ok pong uptime_ms=N
 *   size dev=D                  -> ok bytes=N
 *   w dev=D off=O len=L seed=S  one write; -> ok ns=N
 *   run dev=D bs=B pattern=seq|rand qd=Q secs=T off=O range=R seed=S
 *       [raw=1] [every_us=N]    writes for T seconds (qd > 1: Linux AIO);
 *                               -> "sec I BYTES" lines, "q P NS" quantile
 *                               lines, "raw US,US,..." lines if raw=1,
 *                               then ok ios=N bytes=N ns=N
 *   r dev=D off=O len=L         one read; -> ok ns=N
 *   v dev=D off=O len=L seed=S  read back, compare with what "w" wrote;
 *                               -> ok bad=N (4 KiB blocks that differ)
 *   sh CMD...                   -> "| line" output lines, ok rc=N
 *
 * Every answer ends with one line starting "ok" or "err"; data lines
 * come before it.  Numbers are decimal; raw latencies are microseconds,
 * 500 to a line, so a 100 000-sample run is about 600 KB: a moment on
 * virtio-serial, where a 16550 UART at 115200 baud would need a minute.
 *
 * QD > 1 uses Linux native AIO through raw syscalls rather than threads:
 * one thread keeps exactly Q requests in flight with O_DIRECT (truly
 * asynchronous on a block device), so on a guest with one vCPU the
 * latencies are the device's and not the wake-up time of 32 threads
 * competing for that vCPU; and a static binary needs no libaio.
 *
 * Data: each 4 KiB block written by "w" holds xorshift64 output seeded
 * with (seed, offset), never zero (detect-zeroes=unmap would turn a zero
 * write into a discard), so "v" can prove the guest's data intact.
 * "run" writes a fixed non-zero buffer stamped with offset and seed. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define BLK 4096u
#define MAX_SAMPLES (4u << 20)   /* 4 Mi latencies: 16 MiB of RAM */
#define MAX_SECS 600
#define MAX_QD 256

static int out_fd = 1;

static uint64_t
now_ns (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000000ull + (uint64_t) ts.tv_nsec;
}

/* Answers go out whole: a short write on a port or tty is retried. */
static void
out_raw (const char *s, size_t len)
{
  while (len) {
    ssize_t n = write (out_fd, s, len);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      _exit (3);   /* the host is gone: nothing left to report to */
    s += n;
    len -= (size_t) n;
  }
}

static void __attribute__ ((format (printf, 1, 2)))
say (const char *fmt, ...)
{
  char buf[8192];
  va_list ap;
  int n;

  va_start (ap, fmt);
  n = vsnprintf (buf, sizeof buf - 1, fmt, ap);
  va_end (ap);
  if (n < 0)
    return;
  if ((size_t) n > sizeof buf - 2)
    n = sizeof buf - 2;
  buf[n++] = '\n';
  out_raw (buf, (size_t) n);
}

/* ---- arguments ---------------------------------------------------------- */

typedef struct {
  int n;
  char *k[32], *v[32];
} Args;

static void
parse_args (char *line, Args *a)
{
  char *save = NULL, *tok;

  a->n = 0;
  for (tok = strtok_r (line, " \t", &save); tok && a->n < 32;
       tok = strtok_r (NULL, " \t", &save)) {
    char *eq = strchr (tok, '=');
    a->k[a->n] = tok;
    a->v[a->n] = eq ? (*eq = '\0', eq + 1) : (char *) "";
    a->n++;
  }
}

static const char *
arg (const Args *a, const char *key, const char *def)
{
  for (int i = 0; i < a->n; i++)
    if (strcmp (a->k[i], key) == 0)
      return a->v[i];
  return def;
}

/* Sizes take K/M/G suffixes (binary). */
static uint64_t
num (const Args *a, const char *key, uint64_t def)
{
  const char *s = arg (a, key, NULL);
  char *end;
  uint64_t x;

  if (!s || !*s)
    return def;
  x = strtoull (s, &end, 0);
  switch (*end) {
  case 'k': case 'K': x <<= 10; break;
  case 'm': case 'M': x <<= 20; break;
  case 'g': case 'G': x <<= 30; break;
  case 't': case 'T': x <<= 40; break;
  default: break;
  }
  return x;
}

/* ---- data ----------------------------------------------------------------- */

static uint64_t
mix (uint64_t x)
{
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x ? x : 0x9e3779b97f4a7c15ull;
}

/* The content "w" writes to the 4 KiB block at off with seed. */
static void
fill_block (uint64_t *p, uint64_t off, uint64_t seed)
{
  uint64_t x = mix (seed * 0x9e3779b97f4a7c15ull ^ off);

  for (unsigned i = 0; i < BLK / 8; i++) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    p[i] = x * 0x2545f4914f6cdd1dull | 1;   /* never a zero word */
  }
}

static void *
aligned (size_t len)
{
  void *p = NULL;
  if (posix_memalign (&p, 4096, len ? len : 4096) != 0)
    return NULL;
  return p;
}

static int
open_dev (const char *dev, int flags)
{
  int fd = open (dev, flags | O_DIRECT | O_CLOEXEC);
  if (fd < 0)
    say ("err open %s: %s", dev, strerror (errno));
  return fd;
}

/* ---- commands ------------------------------------------------------------ */

static void
cmd_size (const Args *a)
{
  uint64_t bytes = 0;
  int fd = open_dev (arg (a, "dev", ""), O_RDONLY);

  if (fd < 0)
    return;
  if (ioctl (fd, BLKGETSIZE64, &bytes) != 0)
    say ("err BLKGETSIZE64: %s", strerror (errno));
  else
    say ("ok bytes=%llu", (unsigned long long) bytes);
  close (fd);
}

static void
cmd_write (const Args *a)
{
  uint64_t off = num (a, "off", 0), len = num (a, "len", 65536), seed = num (a, "seed", 1);
  uint64_t t0, t1;
  uint8_t *buf;
  ssize_t n;
  int fd;

  if (!len || len % BLK || off % BLK) {
    say ("err off and len must be multiples of 4096");
    return;
  }
  if ((fd = open_dev (arg (a, "dev", ""), O_WRONLY)) < 0)
    return;
  buf = aligned (len);
  for (uint64_t i = 0; i < len; i += BLK)
    fill_block ((uint64_t *) (buf + i), off + i, seed);
  /* Only the system call is timed: the data is ready before. */
  t0 = now_ns ();
  n = pwrite (fd, buf, len, (off_t) off);
  t1 = now_ns ();
  if (n != (ssize_t) len)
    say ("err pwrite at %llu: %s", (unsigned long long) off,
         n < 0 ? strerror (errno) : "short write");
  else
    say ("ok ns=%llu", (unsigned long long) (t1 - t0));
  free (buf);
  close (fd);
}

static void
cmd_read (const Args *a)
{
  uint64_t off = num (a, "off", 0), len = num (a, "len", 65536), t0, t1;
  uint8_t *buf;
  ssize_t n;
  int fd;

  if (!len || len % BLK || off % BLK) {
    say ("err off and len must be multiples of 4096");
    return;
  }
  if ((fd = open_dev (arg (a, "dev", ""), O_RDONLY)) < 0)
    return;
  buf = aligned (len);
  t0 = now_ns ();
  n = pread (fd, buf, len, (off_t) off);
  t1 = now_ns ();
  if (n != (ssize_t) len)
    say ("err pread at %llu: %s", (unsigned long long) off,
         n < 0 ? strerror (errno) : "short read");
  else
    say ("ok ns=%llu", (unsigned long long) (t1 - t0));
  free (buf);
  close (fd);
}

static void
cmd_verify (const Args *a)
{
  uint64_t off = num (a, "off", 0), len = num (a, "len", 65536), seed = num (a, "seed", 1);
  uint64_t exp[BLK / 8], bad = 0, first = UINT64_MAX;
  uint8_t *buf;
  int fd;

  if (!len || len % BLK || off % BLK) {
    say ("err off and len must be multiples of 4096");
    return;
  }
  if ((fd = open_dev (arg (a, "dev", ""), O_RDONLY)) < 0)
    return;
  buf = aligned (len);
  if (pread (fd, buf, len, (off_t) off) != (ssize_t) len) {
    say ("err pread at %llu: %s", (unsigned long long) off, strerror (errno));
  } else {
    for (uint64_t i = 0; i < len; i += BLK) {
      fill_block (exp, off + i, seed);
      if (memcmp (exp, buf + i, BLK) != 0) {
        bad++;
        if (first == UINT64_MAX)
          first = off + i;
      }
    }
    if (bad)
      say ("ok bad=%llu first=%llu", (unsigned long long) bad, (unsigned long long) first);
    else
      say ("ok bad=0");
  }
  free (buf);
  close (fd);
}

/* ---- timed runs ---------------------------------------------------------- */

typedef struct {
  int fd;
  uint64_t bs, off, range, seed, pos, rng;
  int rand;
  uint32_t *lat_us;      /* per write, microseconds (saturating) */
  size_t nlat;
  uint64_t sec_bytes[MAX_SECS];
  uint64_t ios, bytes;
  uint64_t t_start;
} Run;

static uint64_t
next_off (Run *r)
{
  uint64_t nblk = r->range / r->bs, k;

  if (r->rand) {
    r->rng ^= r->rng << 13;
    r->rng ^= r->rng >> 7;
    r->rng ^= r->rng << 17;
    k = r->rng % nblk;
  } else {
    k = r->pos++ % nblk;
  }
  return r->off + k * r->bs;
}

static void
stamp (Run *r, uint8_t *buf, uint64_t off)
{
  /* Unique per write and block, so no layer below can dedupe or zero it. */
  for (uint64_t i = 0; i < r->bs; i += BLK) {
    uint64_t *w = (uint64_t *) (buf + i);
    w[0] = off + i;
    w[1] = r->seed;
    w[2] = r->ios;
  }
}

static void
account (Run *r, uint64_t t_submit, uint64_t t_done)
{
  uint64_t us = (t_done - t_submit) / 1000;
  uint64_t sec = (t_done - r->t_start) / 1000000000ull;

  if (r->nlat < MAX_SAMPLES)
    r->lat_us[r->nlat++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t) us;
  if (sec < MAX_SECS)
    r->sec_bytes[sec] += r->bs;
  r->ios++;
  r->bytes += r->bs;
}

static int
run_qd1 (Run *r, uint64_t deadline, uint64_t every_ns)
{
  uint8_t *buf = aligned (r->bs);
  uint64_t next = now_ns ();

  for (unsigned i = 0; i < r->bs / 8; i++)
    ((uint64_t *) buf)[i] = mix (r->seed + i) | 1;
  while (now_ns () < deadline) {
    uint64_t off = next_off (r), t0;
    ssize_t n;

    if (every_ns) {
      uint64_t now = now_ns ();
      if (now < next) {
        struct timespec ts = { (time_t) ((next - now) / 1000000000ull),
                               (long) ((next - now) % 1000000000ull) };
        nanosleep (&ts, NULL);
      }
      next += every_ns;
    }
    stamp (r, buf, off);
    t0 = now_ns ();
    n = pwrite (r->fd, buf, r->bs, (off_t) off);
    if (n != (ssize_t) r->bs) {
      say ("err pwrite at %llu: %s", (unsigned long long) off,
           n < 0 ? strerror (errno) : "short write");
      free (buf);
      return -1;
    }
    account (r, t0, now_ns ());
  }
  free (buf);
  return 0;
}

static long
io_setup_ (unsigned nr, aio_context_t *ctx)
{
  return syscall (SYS_io_setup, nr, ctx);
}

static long
io_destroy_ (aio_context_t ctx)
{
  return syscall (SYS_io_destroy, ctx);
}

static long
io_submit_ (aio_context_t ctx, long n, struct iocb **iocbs)
{
  return syscall (SYS_io_submit, ctx, n, iocbs);
}

static long
io_getevents_ (aio_context_t ctx, long min, long max, struct io_event *ev,
               struct timespec *tmo)
{
  return syscall (SYS_io_getevents, ctx, min, max, ev, tmo);
}

static int
run_aio (Run *r, unsigned qd, uint64_t deadline)
{
  aio_context_t ctx = 0;
  struct iocb cb[MAX_QD], *one[1];
  struct io_event ev[MAX_QD];
  uint64_t t_sub[MAX_QD];
  uint8_t *bufs;
  unsigned inflight = 0;
  int rc = 0;

  if (io_setup_ (qd, &ctx) != 0) {
    say ("err io_setup: %s", strerror (errno));
    return -1;
  }
  bufs = aligned (r->bs * qd);
  for (uint64_t i = 0; i < r->bs * qd / 8; i++)
    ((uint64_t *) bufs)[i] = mix (r->seed + i) | 1;
  memset (cb, 0, sizeof cb);

  /* Slot i is free when its iocb is not in flight; refill each completed
   * slot at once so Q requests stay queued until the deadline. */
  for (unsigned i = 0; i < qd; i++) {
    uint64_t off = next_off (r);
    uint8_t *buf = bufs + (uint64_t) i * r->bs;
    stamp (r, buf, off);
    cb[i].aio_data = i;
    cb[i].aio_lio_opcode = IOCB_CMD_PWRITE;
    cb[i].aio_fildes = (uint32_t) r->fd;
    cb[i].aio_buf = (uint64_t) (uintptr_t) buf;
    cb[i].aio_nbytes = r->bs;
    cb[i].aio_offset = (int64_t) off;
    one[0] = &cb[i];
    t_sub[i] = now_ns ();
    if (io_submit_ (ctx, 1, one) != 1) {
      say ("err io_submit: %s", strerror (errno));
      rc = -1;
      break;
    }
    inflight++;
  }
  while (inflight) {
    long n = io_getevents_ (ctx, 1, MAX_QD, ev, NULL);
    uint64_t t = now_ns ();

    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0) {
      say ("err io_getevents: %s", strerror (errno));
      rc = -1;
      break;
    }
    for (long j = 0; j < n; j++) {
      unsigned i = (unsigned) ev[j].data;
      inflight--;
      if (ev[j].res != (int64_t) r->bs) {
        if (rc == 0)
          say ("err aio write at %lld: %s", (long long) cb[i].aio_offset,
               ev[j].res < 0 ? strerror ((int) -ev[j].res) : "short write");
        rc = -1;
        continue;
      }
      account (r, t_sub[i], t);
      if (rc == 0 && t < deadline) {
        uint64_t off = next_off (r);
        stamp (r, (uint8_t *) (uintptr_t) cb[i].aio_buf, off);
        cb[i].aio_offset = (int64_t) off;
        one[0] = &cb[i];
        t_sub[i] = now_ns ();
        if (io_submit_ (ctx, 1, one) != 1) {
          say ("err io_submit: %s", strerror (errno));
          rc = -1;
          continue;
        }
        inflight++;
      }
    }
  }
  io_destroy_ (ctx);
  free (bufs);
  return rc;
}

static int
cmp_u32 (const void *a, const void *b)
{
  uint32_t x = *(const uint32_t *) a, y = *(const uint32_t *) b;
  return x < y ? -1 : x > y;
}

static void
cmd_run (const Args *a)
{
  static const double qs[] = { 0.5, 0.9, 0.99, 0.999, 1.0 };
  Run r = { 0 };
  unsigned qd = (unsigned) num (a, "qd", 1);
  double secs = atof (arg (a, "secs", "10"));
  uint64_t every_ns = num (a, "every_us", 0) * 1000;
  uint64_t t_end, deadline;
  int rc;

  r.bs = num (a, "bs", 65536);
  r.off = num (a, "off", 0);
  r.range = num (a, "range", 0);
  r.seed = num (a, "seed", 1);
  r.rng = mix (r.seed) | 1;
  r.rand = strcmp (arg (a, "pattern", "seq"), "rand") == 0;
  if (!r.bs || r.bs % BLK || r.off % BLK || qd < 1 || qd > MAX_QD ||
      secs <= 0 || secs > MAX_SECS) {
    say ("err bad arguments");
    return;
  }
  if ((r.fd = open_dev (arg (a, "dev", ""), O_WRONLY)) < 0)
    return;
  if (!r.range) {
    uint64_t size = 0;
    ioctl (r.fd, BLKGETSIZE64, &size);
    r.range = size > r.off ? size - r.off : 0;
  }
  if (r.range < r.bs) {
    say ("err range smaller than one write");
    close (r.fd);
    return;
  }
  r.lat_us = malloc (sizeof (uint32_t) * MAX_SAMPLES);
  r.t_start = now_ns ();
  deadline = r.t_start + (uint64_t) (secs * 1e9);
  rc = qd == 1 ? run_qd1 (&r, deadline, every_ns) : run_aio (&r, qd, deadline);
  t_end = now_ns ();
  close (r.fd);
  if (rc == 0) {
    for (unsigned s = 0; s < MAX_SECS && s * 1e9 < (double) (t_end - r.t_start); s++)
      say ("sec %u %llu", s, (unsigned long long) r.sec_bytes[s]);
    if (strcmp (arg (a, "raw", "0"), "1") == 0) {
      /* Raw samples in issue order, before sorting for the quantiles. */
      char line[500 * 11 + 8];
      for (size_t i = 0; i < r.nlat; i += 500) {
        size_t len = (size_t) snprintf (line, sizeof line, "raw ");
        for (size_t j = i; j < r.nlat && j < i + 500; j++)
          len += (size_t) snprintf (line + len, sizeof line - len, "%s%u",
                                    j > i ? "," : "", r.lat_us[j]);
        line[len++] = '\n';
        out_raw (line, len);
      }
    }
    qsort (r.lat_us, r.nlat, sizeof (uint32_t), cmp_u32);
    for (unsigned i = 0; i < sizeof qs / sizeof qs[0] && r.nlat; i++) {
      size_t rank = (size_t) (qs[i] * (double) r.nlat + 0.999999);
      rank = rank < 1 ? 1 : rank > r.nlat ? r.nlat : rank;
      say ("q %g %llu", qs[i], (unsigned long long) r.lat_us[rank - 1] * 1000ull);
    }
    say ("ok ios=%llu bytes=%llu ns=%llu samples=%zu", (unsigned long long) r.ios,
         (unsigned long long) r.bytes, (unsigned long long) (t_end - r.t_start), r.nlat);
  }
  free (r.lat_us);
}

/* For inspecting the guest from the host (dmesg, /sys, /proc). */
static void
cmd_sh (const char *cmd)
{
  char line[4096];
  FILE *p;
  int st;

  snprintf (line, sizeof line, "%s 2>&1", cmd);
  if (!(p = popen (line, "r"))) {
    say ("err popen: %s", strerror (errno));
    return;
  }
  while (fgets (line, sizeof line, p)) {
    line[strcspn (line, "\n")] = '\0';
    say ("| %s", line);
  }
  st = pclose (p);
  say ("ok rc=%d", WIFEXITED (st) ? WEXITSTATUS (st) : 128);
}

static void
dispatch (char *line)
{
  Args a;
  char *cmd;

  line[strcspn (line, "\r\n")] = '\0';
  while (*line == ' ')
    line++;
  if (!*line)
    return;
  if (strncmp (line, "sh ", 3) == 0) {
    cmd_sh (line + 3);
    return;
  }
  parse_args (line, &a);
  cmd = a.k[0];
  if (strcmp (cmd, "ping") == 0) {
    struct timespec ts;
    clock_gettime (CLOCK_BOOTTIME, &ts);
    say ("ok pong uptime_ms=%lld", (long long) ts.tv_sec * 1000 + ts.tv_nsec / 1000000);
  } else if (strcmp (cmd, "size") == 0) {
    cmd_size (&a);
  } else if (strcmp (cmd, "w") == 0) {
    cmd_write (&a);
  } else if (strcmp (cmd, "r") == 0) {
    cmd_read (&a);
  } else if (strcmp (cmd, "v") == 0) {
    cmd_verify (&a);
  } else if (strcmp (cmd, "run") == 0) {
    cmd_run (&a);
  } else {
    say ("err unknown command '%s'", cmd);
  }
}

static int
serve (const char *port)
{
  char buf[65536];
  size_t have = 0;
  int fd = open (port, O_RDWR | O_NOCTTY | O_CLOEXEC);
  struct termios t;

  if (fd < 0) {
    fprintf (stderr, "probe: open %s: %s\n", port, strerror (errno));
    return 1;
  }
  /* A tty (serial fallback) must pass bytes through unchanged. */
  if (tcgetattr (fd, &t) == 0) {
    cfmakeraw (&t);
    tcsetattr (fd, TCSANOW, &t);
  }
  out_fd = fd;
  for (;;) {
    char *nl;
    ssize_t n = read (fd, buf + have, sizeof buf - 1 - have);

    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0 && errno == EAGAIN) {
      usleep (10000);
      continue;
    }
    if (n == 0) {
      /* virtio-serial reads 0 while the host side is not connected. */
      usleep (50000);
      continue;
    }
    if (n < 0) {
      fprintf (stderr, "probe: read %s: %s\n", port, strerror (errno));
      return 1;
    }
    have += (size_t) n;
    buf[have] = '\0';
    while ((nl = memchr (buf, '\n', have))) {
      size_t len = (size_t) (nl - buf) + 1;
      *nl = '\0';
      dispatch (buf);
      memmove (buf, buf + len, have - len);
      have -= len;
      buf[have] = '\0';
    }
    if (have == sizeof buf - 1)
      have = 0;   /* an overlong line: drop it */
  }
}

int
main (int argc, char **argv)
{
  if (argc == 3 && strcmp (argv[1], "serve") == 0)
    return serve (argv[2]);
  if (argc >= 2) {
    char line[4096] = "";
    for (int i = 1; i < argc; i++) {
      strncat (line, argv[i], sizeof line - strlen (line) - 2);
      strcat (line, " ");
    }
    dispatch (line);
    return 0;
  }
  fprintf (stderr, "usage: probe serve PORT | probe COMMAND [key=value...]\n");
  return 2;
}
