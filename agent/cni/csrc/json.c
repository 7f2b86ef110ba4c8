/* JSON reader and writer of nodewire-cni: see json.h. Grammar from RFC 8259 (sections 2-8); NaN and
 * Infinity, which Python's json accepts, are refused, as the runtime's Go decoder refuses them. */
#include "json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct parser {
    const char *s, *end, *start;
    int depth;
    struct jerr *err;
};

static void *xcalloc(size_t n) {
    void *p = calloc(1, n);
    if (!p)
        nw_oom();
    return p;
}

static struct jnode *fail(struct parser *p, const char *what) {
    if (p->err->msg[0])
        return NULL;  /* the innermost error is the one to report */
    size_t pos = (size_t)(p->s - p->start), line = 1, col = 1;
    for (const char *c = p->start; c < p->s; c++) {
        if (*c == '\n') {
            line++;
            col = 1;
        } else {
            col++;
        }
    }
    snprintf(p->err->msg, sizeof p->err->msg, "%s: line %zu column %zu (char %zu)", what, line, col, pos);
    return NULL;
}

static void skip_ws(struct parser *p) {
    while (p->s < p->end && (*p->s == ' ' || *p->s == '\t' || *p->s == '\n' || *p->s == '\r'))
        p->s++;
}

static int hex4(const char *s, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return -1;
    }
    *out = v;
    return 0;
}

static size_t put_utf8(char *o, unsigned cp) {  /* lone surrogates too (as Python keeps them) */
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Length of the valid UTF-8 sequence at s (RFC 3629 table: no overlongs, no surrogates, <= U+10FFFF), or 0. */
static size_t utf8_len(const unsigned char *s, const unsigned char *end) {
    unsigned char c = s[0];
    size_t n;
    unsigned min, cp;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2, cp = c & 0x1F, min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3, cp = c & 0x0F, min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4, cp = c & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    if ((size_t)(end - s) < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

static struct jnode *parse_string(struct parser *p) {
    struct jnode *n = xcalloc(sizeof *n);
    n->type = J_STR;
    n->raw = p->s++;
    const char *q = p->s;  /* the closing quote bounds the decoded size (never longer than the text) */
    while (q < p->end && *q != '"')
        q += (*q == '\\') ? 2 : 1;
    char *o = n->str = xcalloc((size_t)(q < p->end ? q - p->s : p->end - p->s) + 1);
    for (;;) {
        if (p->s >= p->end)
            return fail(p, "Unterminated string");
        unsigned char c = (unsigned char)*p->s;
        if (c == '"')
            break;
        if (c < 0x20)
            return fail(p, "Invalid control character in string");
        if (c == '\\') {
            if (p->end - p->s < 2)
                return fail(p, "Unterminated string");
            char e = p->s[1];
            const char *simple = strchr("\"\\/bfnrt", e);
            if (e && simple) {
                *o++ = "\"\\/\b\f\n\r\t"[simple - "\"\\/bfnrt"];
                p->s += 2;
                continue;
            }
            unsigned cp, lo;
            if (e != 'u' || p->end - p->s < 6 || hex4(p->s + 2, &cp))
                return fail(p, "Invalid \\escape");
            p->s += 6;
            if (cp >= 0xD800 && cp <= 0xDBFF && p->end - p->s >= 6 && p->s[0] == '\\' && p->s[1] == 'u' &&
                !hex4(p->s + 2, &lo) && lo >= 0xDC00 && lo <= 0xDFFF) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                p->s += 6;
            }
            o += put_utf8(o, cp);
            continue;
        }
        size_t k = utf8_len((const unsigned char *)p->s, (const unsigned char *)p->end);
        if (!k)
            return fail(p, "Invalid UTF-8 in string");
        memcpy(o, p->s, k);
        o += k;
        p->s += k;
    }
    p->s++;
    n->len = (size_t)(o - n->str);
    n->rawlen = (size_t)(p->s - n->raw);
    return n;
}

static int digits(struct parser *p) {
    const char *b = p->s;
    while (p->s < p->end && *p->s >= '0' && *p->s <= '9')
        p->s++;
    return p->s > b;
}

static struct jnode *parse_number(struct parser *p) {
    struct jnode *n = xcalloc(sizeof *n);
    n->type = J_NUM;
    n->raw = p->s;
    if (*p->s == '-')
        p->s++;
    if (p->s < p->end && *p->s == '0')
        p->s++;
    else if (!digits(p))
        return fail(p, "Expecting value");
    if (p->s < p->end && *p->s == '.') {
        p->s++;
        if (!digits(p))
            return fail(p, "Expecting digits after the decimal point");
    }
    if (p->s < p->end && (*p->s == 'e' || *p->s == 'E')) {
        p->s++;
        if (p->s < p->end && (*p->s == '+' || *p->s == '-'))
            p->s++;
        if (!digits(p))
            return fail(p, "Expecting digits in the exponent");
    }
    n->rawlen = (size_t)(p->s - n->raw);
    char tmp[64];
    if (n->rawlen < sizeof tmp) {
        memcpy(tmp, n->raw, n->rawlen);
        tmp[n->rawlen] = 0;
        n->num = strtod(tmp, NULL);
    } else {
        n->num = n->raw[0] == '-' ? -1e308 : 1e308;  /* 64+ characters: huge (or a long fraction; unused here) */
    }
    return n;
}

static struct jnode *parse_value(struct parser *p);

/* Elements of an array or members of an object, after the opening bracket. */
static struct jnode *parse_container(struct parser *p, int obj) {
    struct jnode *n = xcalloc(sizeof *n), **tail = &n->child;
    n->type = obj ? J_OBJ : J_ARR;
    n->raw = p->s++;
    if (++p->depth > JSON_MAX_DEPTH)
        return fail(p, "Nested deeper than 64 levels");
    char close = obj ? '}' : ']';
    skip_ws(p);
    if (p->s < p->end && *p->s == close) {
        p->s++;
    } else {
        for (;;) {
            struct jnode *key = NULL;
            if (obj) {
                skip_ws(p);
                if (p->s >= p->end || *p->s != '"')
                    return fail(p, "Expecting property name enclosed in double quotes");
                if (!(key = parse_string(p)))
                    return NULL;
                skip_ws(p);
                if (p->s >= p->end || *p->s != ':')
                    return fail(p, "Expecting ':' delimiter");
                p->s++;
            }
            struct jnode *v = parse_value(p);
            if (!v)
                return NULL;
            v->key = key;
            *tail = v;
            tail = &v->next;
            skip_ws(p);
            if (p->s < p->end && *p->s == ',') {
                p->s++;
                continue;
            }
            if (p->s < p->end && *p->s == close) {
                p->s++;
                break;
            }
            return fail(p, obj ? "Expecting ',' delimiter or '}'" : "Expecting ',' delimiter or ']'");
        }
    }
    p->depth--;
    n->rawlen = (size_t)(p->s - n->raw);
    return n;
}

static struct jnode *literal(struct parser *p, const char *word, enum jtype t) {
    size_t k = strlen(word);
    if ((size_t)(p->end - p->s) < k || memcmp(p->s, word, k))
        return fail(p, "Expecting value");
    struct jnode *n = xcalloc(sizeof *n);
    n->type = t;
    n->raw = p->s;
    n->rawlen = k;
    p->s += k;
    return n;
}

static struct jnode *parse_value(struct parser *p) {
    skip_ws(p);
    if (p->s >= p->end)
        return fail(p, "Expecting value");
    switch (*p->s) {
    case '{': return parse_container(p, 1);
    case '[': return parse_container(p, 0);
    case '"': return parse_string(p);
    case 'n': return literal(p, "null", J_NULL);
    case 't': return literal(p, "true", J_TRUE);
    case 'f': return literal(p, "false", J_FALSE);
    default:
        if (*p->s == '-' || (*p->s >= '0' && *p->s <= '9'))
            return parse_number(p);
        return fail(p, "Expecting value");
    }
}

struct jnode *json_parse(const char *text, size_t n, struct jerr *err) {
    struct parser p = {.s = text, .end = text + n, .start = text, .err = err};
    err->msg[0] = 0;
    struct jnode *v = parse_value(&p);
    if (!v)
        return NULL;
    skip_ws(&p);
    if (p.s != p.end)
        return fail(&p, "Extra data");
    return v;
}

struct jnode *json_get(const struct jnode *obj, const char *key) {
    struct jnode *found = NULL;
    if (!obj || obj->type != J_OBJ)
        return NULL;
    for (struct jnode *m = obj->child; m; m = m->next)
        if (json_is_str(m->key, key))
            found = m;
    return found;
}

int json_is_str(const struct jnode *n, const char *s) {
    return n && n->type == J_STR && n->len == strlen(s) && !memcmp(n->str, s, n->len);
}

int json_truthy(const struct jnode *n) {
    if (!n)
        return 0;
    switch (n->type) {
    case J_NULL:
    case J_FALSE: return 0;
    case J_NUM: return n->num != 0;
    case J_STR: return n->len > 0;
    case J_ARR:
    case J_OBJ: return n->child != NULL;
    default: return 1;
    }
}

/* -- writer ------------------------------------------------------------------------------------- */
void jb_raw(struct jbuf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            nw_oom();
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

void jb_lit(struct jbuf *b, const char *s) { jb_raw(b, s, strlen(s)); }

void jb_str(struct jbuf *b, const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s, *end = u + n;
    jb_lit(b, "\"");
    while (u < end) {
        char esc[8];
        size_t k = utf8_len(u, end);
        if (*u == '"' || *u == '\\') {
            esc[0] = '\\', esc[1] = (char)*u;
            jb_raw(b, esc, 2);
        } else if (*u < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", *u);
            jb_raw(b, esc, 6);
        } else if (k == 0) {
            jb_lit(b, "\\ufffd");
            k = 1;
        } else {
            jb_raw(b, (const char *)u, k);
        }
        u += k ? k : 1;
    }
    jb_lit(b, "\"");
}

void jb_cstr(struct jbuf *b, const char *s) { jb_str(b, s, strlen(s)); }

void jb_key(struct jbuf *b, int first, const char *key) {  /* json.dumps's default separators */
    if (!first)
        jb_lit(b, ", ");
    jb_cstr(b, key);
    jb_lit(b, ": ");
}

void jb_node_or(struct jbuf *b, const struct jnode *n, const char *fallback) {
    if (json_truthy(n))
        jb_raw(b, n->raw, n->rawlen);
    else
        jb_lit(b, fallback);
}

void jb_repr(struct jbuf *b, const struct jnode *n) {
    if (!n || n->type == J_NULL) {
        jb_lit(b, "None");
    } else if (n->type == J_TRUE || n->type == J_FALSE) {
        jb_lit(b, n->type == J_TRUE ? "True" : "False");
    } else if (n->type == J_STR) {
        jb_lit(b, "'");
        for (size_t i = 0; i < n->len; i++) {
            unsigned char c = (unsigned char)n->str[i];
            char esc[8];
            if (c == '\'' || c == '\\') {
                esc[0] = '\\', esc[1] = (char)c;
                jb_raw(b, esc, 2);
            } else if (c < 0x20 || c == 0x7f) {
                snprintf(esc, sizeof esc, "\\x%02x", c);
                jb_raw(b, esc, 4);
            } else {
                jb_raw(b, (const char *)&c, 1);
            }
        }
        jb_lit(b, "'");
    } else {
        jb_raw(b, n->raw, n->rawlen > 200 ? 200 : n->rawlen);  /* a message, not a copy of the input */
    }
}
