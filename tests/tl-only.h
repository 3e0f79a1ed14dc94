/* Running only some of a test program's cases while debugging one:
 * FLEECE_TEST_ONLY=name[,name...] (the START_TEST names) adds only those
 * to their test cases; unset or empty, all of them. */
#ifndef FLEECE_TL_ONLY_H
#define FLEECE_TL_ONLY_H

#include <stdbool.h>
#include <glib.h>

static inline bool
tl_wanted (const char *name)
{
  const char *only = g_getenv ("FLEECE_TEST_ONLY");
  g_auto (GStrv) names = NULL;

  if (!only || !*only)
    return true;
  names = g_strsplit (only, ",", -1);
  return g_strv_contains ((const char *const *) names, name);
}

#define ADD(tc, t) do { if (tl_wanted (#t)) tcase_add_test ((tc), t); } while (0)
#define ADD_LOOP(tc, t, n) \
  do { if (tl_wanted (#t)) tcase_add_loop_test ((tc), t, 0, (n)); } while (0)

#endif
