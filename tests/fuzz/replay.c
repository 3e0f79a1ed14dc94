/* Runs a fuzz target over files and directories of inputs (the seed
 * corpus), for builds without libFuzzer: the corpus is a regression test
 * in the unit suite, also under valgrind. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <glib.h>

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

static int
replay_file (const char *path)
{
  g_autoptr (GError) err = NULL;
  g_autofree char *data = NULL;
  gsize len = 0;

  if (!g_file_get_contents (path, &data, &len, &err)) {
    fprintf (stderr, "replay: %s\n", err->message);
    return 1;
  }
  LLVMFuzzerTestOneInput ((const uint8_t *) data, len);
  return 0;
}

int
main (int argc, char **argv)
{
  unsigned n = 0;
  int status = 0;

  for (int i = 1; i < argc; i++) {
    GDir *d = g_dir_open (argv[i], 0, NULL);
    const char *name;

    if (!d) {
      status |= replay_file (argv[i]);
      n++;
      continue;
    }
    while ((name = g_dir_read_name (d))) {
      g_autofree char *path = g_build_filename (argv[i], name, NULL);
      status |= replay_file (path);
      n++;
    }
    g_dir_close (d);
  }
  if (n == 0) {
    fprintf (stderr, "replay: no inputs\n");
    return 1;
  }
  printf ("replayed %u inputs\n", n);
  return status;
}
