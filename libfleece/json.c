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

void
fleece_jset_int (json_object *o, const char *key, int64_t val)
{
  json_object_object_add (o, key, json_object_new_int64 (val));
}

void
fleece_jset_bool (json_object *o, const char *key, bool val)
{
  json_object_object_add (o, key, json_object_new_boolean (val));
}

json_object *
fleece_jobj (json_object *o, const char *key)
{
  json_object *v;

  if (!o || !json_object_object_get_ex (o, key, &v))
    return NULL;
  return v;
}

size_t
fleece_jlen (json_object *o, const char *key)
{
  json_object *v = fleece_jobj (o, key);

  return v && json_object_is_type (v, json_type_array) ? json_object_array_length (v) : 0;
}

json_object *
fleece_jaction (const char *type, json_object *data)
{
  json_object *a = json_object_new_object ();

  fleece_jset_str (a, "type", type);
  json_object_object_add (a, "data", data);
  return a;
}
