/* Feature probing from query-qmp-schema.
 *
 * Introspection masks the names of everything but commands, events and
 * builtins ("39", "q_obj_blockdev-backup-arg" on older builds), so every
 * lookup starts at a command and follows the type names the schema itself
 * gives.  Introspection flattens struct bases into "members"; what remains
 * of a union is its "variants", each naming an object type whose members
 * are accepted when the tag has that value.
 */
#include <string.h>

#include "internal.h"

/* Types can refer to each other (recursive structs like
 * BlockdevOptionsQuorum's children); a depth limit ends any cycle. */
#define SCHEMA_MAX_DEPTH 16

struct FleeceQmpSchema {
  json_object *entries;   /* the query-qmp-schema array */
  GHashTable *by_name;    /* name -> entry, borrowed from entries */
};

FleeceQmpSchema *
fleece_qmp_schema_load (FleeceQmp *q, GError **err)
{
  json_object *ret = fleece_qmp_execute (q, "query-qmp-schema", NULL, err);
  FleeceQmpSchema *s;
  size_t n;

  if (!ret)
    return NULL;
  if (!json_object_is_type (ret, json_type_array)) {
    g_set_error (err, FLEECE_QMP_ERROR, FLEECE_QMP_ERROR_PROTOCOL,
                 "query-qmp-schema: expected an array, got %.200s",
                 json_object_to_json_string (ret));
    json_object_put (ret);
    return NULL;
  }

  s = g_new0 (FleeceQmpSchema, 1);
  s->entries = ret;
  s->by_name = g_hash_table_new (g_str_hash, g_str_equal);
  n = json_object_array_length (ret);
  for (size_t i = 0; i < n; i++) {
    json_object *e = json_object_array_get_idx (ret, i);
    json_object *name;

    if (json_object_object_get_ex (e, "name", &name)
        && json_object_is_type (name, json_type_string))
      g_hash_table_insert (s->by_name,
                           (gpointer) json_object_get_string (name), e);
  }
  return s;
}

void
fleece_qmp_schema_free (FleeceQmpSchema *s)
{
  if (!s)
    return;
  g_hash_table_destroy (s->by_name);
  json_object_put (s->entries);
  g_free (s);
}

static const char *
str_member (json_object *obj, const char *key)
{
  json_object *v;

  if (json_object_object_get_ex (obj, key, &v)
      && json_object_is_type (v, json_type_string))
    return json_object_get_string (v);
  return NULL;
}

/* obj's member key if it is an array (json-c asserts on the type). */
static json_object *
array_member (json_object *obj, const char *key)
{
  json_object *v;

  if (json_object_object_get_ex (obj, key, &v)
      && json_object_is_type (v, json_type_array))
    return v;
  return NULL;
}

/* The entry named name if its meta-type is meta_type. */
static json_object *
lookup (FleeceQmpSchema *s, const char *name, const char *meta_type)
{
  json_object *e;
  const char *meta;

  if (!s || !name)
    return NULL;
  e = g_hash_table_lookup (s->by_name, name);
  meta = str_member (e, "meta-type");
  if (!meta || strcmp (meta, meta_type) != 0)
    return NULL;
  return e;
}

/* The type of object type_name's member, searching the variants too;
 * NULL if there is no such member. */
static const char *
member_type (FleeceQmpSchema *s, const char *type_name, const char *member,
             int depth)
{
  json_object *obj = lookup (s, type_name, "object");
  json_object *list;
  size_t n;

  if (!obj || depth > SCHEMA_MAX_DEPTH)
    return NULL;

  if ((list = array_member (obj, "members"))) {
    n = json_object_array_length (list);
    for (size_t i = 0; i < n; i++) {
      json_object *m = json_object_array_get_idx (list, i);
      const char *name = str_member (m, "name");

      if (name && strcmp (name, member) == 0) {
        const char *type = str_member (m, "type");
        /* A member is there even if its type were missing. */
        return type ? type : "any";
      }
    }
  }
  if ((list = array_member (obj, "variants"))) {
    n = json_object_array_length (list);
    for (size_t i = 0; i < n; i++) {
      json_object *v = json_object_array_get_idx (list, i);
      const char *t = member_type (s, str_member (v, "type"), member,
                                   depth + 1);
      if (t)
        return t;
    }
  }
  return NULL;
}

/* Does a value of type type_name (an object, or an array or alternate that
 * can hold one) have member? */
static bool
type_has_member (FleeceQmpSchema *s, const char *type_name,
                 const char *member, int depth)
{
  json_object *e, *list;

  if (!s || !type_name || depth > SCHEMA_MAX_DEPTH)
    return false;
  if (lookup (s, type_name, "object"))
    return member_type (s, type_name, member, depth) != NULL;
  if ((e = lookup (s, type_name, "array")))
    return type_has_member (s, str_member (e, "element-type"), member,
                            depth + 1);
  if ((e = lookup (s, type_name, "alternate"))
      && (list = array_member (e, "members"))) {
    size_t n = json_object_array_length (list);

    for (size_t i = 0; i < n; i++) {
      json_object *m = json_object_array_get_idx (list, i);

      if (type_has_member (s, str_member (m, "type"), member, depth + 1))
        return true;
    }
  }
  return false;
}

static const char *
command_arg_type (FleeceQmpSchema *s, const char *command)
{
  return str_member (lookup (s, command, "command"), "arg-type");
}

/* blockdev-add's argument type: BlockdevOptions, a union on "driver". */
static json_object *
blockdev_options (FleeceQmpSchema *s)
{
  return lookup (s, command_arg_type (s, "blockdev-add"), "object");
}

bool
fleece_qmp_schema_has_command (FleeceQmpSchema *s, const char *command)
{
  return lookup (s, command, "command") != NULL;
}

bool
fleece_qmp_schema_command_has_arg (FleeceQmpSchema *s, const char *command,
                                   const char *arg)
{
  return member_type (s, command_arg_type (s, command), arg, 0) != NULL;
}

bool
fleece_qmp_schema_arg_has_member (FleeceQmpSchema *s, const char *command,
                                  const char *arg, const char *member)
{
  const char *type = member_type (s, command_arg_type (s, command), arg, 0);

  return type_has_member (s, type, member, 0);
}

bool
fleece_qmp_schema_driver_has_member (FleeceQmpSchema *s, const char *driver,
                                     const char *member)
{
  json_object *opts = blockdev_options (s);
  json_object *variants;
  size_t n;

  if (!opts || !(variants = array_member (opts, "variants")))
    return false;
  n = json_object_array_length (variants);
  for (size_t i = 0; i < n; i++) {
    json_object *v = json_object_array_get_idx (variants, i);
    const char *c = str_member (v, "case");

    if (c && strcmp (c, driver) == 0)
      return member_type (s, str_member (v, "type"), member, 0) != NULL;
  }
  return false;
}

static bool
name_in_list (json_object *list, const char *value)
{
  size_t n = json_object_array_length (list);

  for (size_t i = 0; i < n; i++) {
    json_object *m = json_object_array_get_idx (list, i);
    /* "members" holds {"name": ...} objects, the older "values" plain
     * strings. */
    const char *name = json_object_is_type (m, json_type_string)
                       ? json_object_get_string (m) : str_member (m, "name");

    if (name && strcmp (name, value) == 0)
      return true;
  }
  return false;
}

bool
fleece_qmp_schema_has_driver (FleeceQmpSchema *s, const char *driver)
{
  json_object *opts = blockdev_options (s);
  json_object *list;
  json_object *e;
  const char *type = NULL;

  if (!opts)
    return false;
  type = member_type (s, str_member (opts, "name"), "driver", 0);
  e = lookup (s, type, "enum");
  if (!e)
    return false;
  if ((list = array_member (e, "members")))
    return name_in_list (list, driver);
  if ((list = array_member (e, "values")))
    return name_in_list (list, driver);
  return false;
}
