/* A small JSON reader and writer for nodewire-cni (RFC 8259, strict).
 *
 * The reader builds a tree whose nodes keep a pointer to their own text in the input, so a value the
 * plugin only passes on (prevResult, its ips and interfaces, the network name) is written out exactly
 * as it came in, and decodes every string (escapes resolved, UTF-8 checked) for the values it reads.
 * Bounded: input size is the caller's (it reads at most a limit), nesting depth is JSON_MAX_DEPTH.
 * Nothing is freed: the process lives for one CNI call.
 */
#ifndef NW_JSON_H
#define NW_JSON_H

#include <stddef.h>

#define JSON_MAX_DEPTH 64  /* a CNI result is 4-5 deep; deeper input is refused, never a stack overflow */

enum jtype { J_NULL, J_FALSE, J_TRUE, J_NUM, J_STR, J_ARR, J_OBJ };

struct jnode {
    enum jtype type;
    const char *raw;      /* the value's text in the input (strings with their quotes) */
    size_t rawlen;
    char *str;            /* J_STR: decoded bytes, NUL-terminated (may also hold NULs) */
    size_t len;
    double num;           /* J_NUM */
    struct jnode *child;  /* J_ARR / J_OBJ: first element or member */
    struct jnode *next;   /* the next element or member of the parent */
    struct jnode *key;    /* a member of a J_OBJ: its key (a J_STR) */
};

struct jerr {
    char msg[160];        /* "Expecting value at line 1 column 5 (char 4)" */
};

/* The value filling text[0:n] (surrounded by JSON whitespace only), or NULL with err set. */
struct jnode *json_parse(const char *text, size_t n, struct jerr *err);

/* The last member named key (as json.loads keeps the last of duplicate keys), or NULL. */
struct jnode *json_get(const struct jnode *obj, const char *key);
int json_is_str(const struct jnode *n, const char *s);
/* Python's truth value of a JSON value: absent, null, false, 0, "", [], {} are false. */
int json_truthy(const struct jnode *n);

/* Output: a growing buffer (exits with code 5 "out of memory" when malloc fails). */
struct jbuf {
    char *p;
    size_t len, cap;
};

void jb_raw(struct jbuf *b, const char *s, size_t n);
void jb_lit(struct jbuf *b, const char *s);
/* s[0:n] as a JSON string: quotes, escapes, and U+FFFD for each byte that is not valid UTF-8. */
void jb_str(struct jbuf *b, const char *s, size_t n);
void jb_cstr(struct jbuf *b, const char *s);
void jb_key(struct jbuf *b, int first, const char *key);  /* ,"key": */
/* A node as its input text, or `fallback` (JSON text) when it is absent or falsy (Python's `x or []`). */
void jb_node_or(struct jbuf *b, const struct jnode *n, const char *fallback);
/* A value like Python's %r of it, for messages: 'text', None, True, 12. */
void jb_repr(struct jbuf *b, const struct jnode *n);

__attribute__((noreturn)) void nw_oom(void);  /* provided by the plugin: print a CNI error and exit */

#endif
