/* Small json-c helpers shared by the engines (records and QMP replies). */
#include "internal.h"

const char *
fleece_jstr (json_object *o, const char *key)
{
  json_object *v;

  if (!o || !json_object_object_get_ex (o, key, &v) || !v)
    return NULL;
  return json_object_get_string (v);
}

bool
fleece_jbool (json_object *o, const char *key)
{
  json_object *v;

  return o && json_object_object_get_ex (o, key, &v) && json_object_get_boolean (v);
}

int64_t
fleece_jint (json_object *o, const char *key)
{
  json_object *v;

  if (!o || !json_object_object_get_ex (o, key, &v) || !v)
    return 0;
  return json_object_get_int64 (v);
}

void
fleece_jset_str (json_object *o, const char *key, const char *val)
{
  json_object_object_add (o, key, val ? json_object_new_string (val) : NULL);
}
