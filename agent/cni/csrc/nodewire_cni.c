/* nodewire-cni: a chained CNI plugin (CNI spec 1.1.0; network configurations of 0.3.0 to 1.1.0).
 *
 * It runs after the node's primary plugin (bridge, flannel, Calico, ...) and changes nothing on the
 * pod's network: ADD tells the nodewire agent who the pod is (container id, netns, interface, the IPs
 * and interfaces of prevResult, K8S_POD_* from CNI_ARGS) and prints prevResult as its own result;
 * CHECK sends the same (so an agent that missed the ADD adopts the pod); DEL, GC and STATUS forward
 * theirs. Every call is one JSON line to the agent's API socket (agent/api.py) and one line back.
 *
 * One static executable (no interpreter, no shared library on the node), built by agent/cni/build.py,
 * which passes the numbers it shares with the agent (-D). Keys of its entry in the conflist:
 *
 *     {"type": "nodewire-cni", "socket": "/run/nodewire/.../api.sock", "failOpen": true,
 *      "timeout": 5, "logFile": "/var/log/nodewire-cni.log"}
 *
 * failOpen (default true): when the agent cannot be reached, ADD and CHECK succeed with a logged
 * warning (the pod's network works without nodewire; the agent recovers the pod when it starts).
 * With failOpen false they fail with code 11 (try again later). DEL and GC always succeed.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "json.h"

#ifndef NW_DEFAULT_SOCKET
#error "NW_DEFAULT_SOCKET (the agent's default API socket) is not defined: build with agent/cni/build.py"
#endif
#ifndef NW_MAX_LINE
#error "NW_MAX_LINE (agent/api.py MAX_LINE) is not defined: build with agent/cni/build.py"
#endif

#define SPEC_VERSION "1.1.0"
/* 0.3.x results have the same shape as 0.4.0's for what this plugin reads and echoes (flannel's
 * conflist still says 0.3.1), so they are accepted too; CHECK does not exist before 0.4.0. */
static const char *const SUPPORTED[] = {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"};
#define NSUPPORTED (sizeof SUPPORTED / sizeof SUPPORTED[0])

/* Error codes of the CNI spec ("Error" section); 100+ are this plugin's own. */
enum {
    ERR_INCOMPATIBLE_VERSION = 1,
    ERR_UNKNOWN_CONTAINER = 3,
    ERR_INVALID_ENV = 4,
    ERR_IO = 5,
    ERR_DECODE = 6,
    ERR_INVALID_CONFIG = 7,
    ERR_TRY_AGAIN_LATER = 11,
    ERR_NOT_AVAILABLE = 50,
    ERR_AGENT_REFUSED = 100,
};

struct conf {
    struct jnode *root, *version, *prev;
    int fail_open;
    const char *socket, *log_file;
    double timeout;
};

/* The outcome of a call to the agent: ok, unavailable (nobody answered), or an error answer. */
enum call_status { CALL_OK, CALL_UNAVAILABLE, CALL_REFUSED };
struct call {
    enum call_status status;
    int code;          /* CALL_REFUSED: the CNI code (3 for not_found, else 100) */
    struct jbuf why;   /* the message */
    struct jbuf agent_code;
};

static const struct jnode *out_version;  /* the cniVersion errors carry once the config is read */

static void die(int code, const char *details, const char *fmt, ...) __attribute__((noreturn, format(printf, 3, 4)));

/* {"cniVersion":..,"code":N,"msg":..,"details":..} on stdout, exit 1 (the spec's error result). */
__attribute__((noreturn)) static void emit_error(int code, const char *msg, const char *details) {
    struct jbuf b = {0};
    jb_key(&b, 1, "cniVersion");
    if (out_version)
        jb_raw(&b, out_version->raw, out_version->rawlen);
    else
        jb_lit(&b, "\"" SPEC_VERSION "\"");
    char num[16];
    snprintf(num, sizeof num, "%d", code);
    jb_key(&b, 0, "code");
    jb_lit(&b, num);
    jb_key(&b, 0, "msg");
    jb_cstr(&b, msg);
    if (details && *details) {
        jb_key(&b, 0, "details");
        jb_cstr(&b, details);
    }
    fprintf(stdout, "{%s}\n", b.p);
    fflush(stdout);
    exit(1);
}

static void die(int code, const char *details, const char *fmt, ...) {
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    emit_error(code, msg, details);
}

void nw_oom(void) { emit_error(ERR_IO, "nodewire-cni: out of memory", NULL); }

static void logline(const struct conf *c, const char *level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void logline(const struct conf *c, const char *level, const char *fmt, ...) {
    char ts[32], msg[4096];
    time_t now = time(NULL);
    struct tm tm;
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&now, &tm));
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    const char *cid = getenv("CNI_CONTAINERID");
    int fd = 2;
    if (c->log_file && *c->log_file)
        fd = open(c->log_file, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0)
        return;  /* a log that cannot be written never fails a pod */
    dprintf(fd, "ts=%s level=%s plugin=nodewire-cni container=%s msg=%s\n", ts, level, cid ? cid : "-", msg);
    if (fd != 2)
        close(fd);
}

/* -- the configuration on stdin ---------------------------------------------------------------- */
static char *read_stdin(size_t *n) {
    size_t cap = 65536, len = 0;
    char *buf = malloc(cap);
    if (!buf)
        nw_oom();
    for (;;) {
        if (len == cap) {
            if (cap > NW_MAX_LINE)
                die(ERR_DECODE, NULL, "network configuration on stdin is larger than %d bytes", NW_MAX_LINE);
            char *p = realloc(buf, cap *= 2);
            if (!p)
                nw_oom();
            buf = p;
        }
        ssize_t r = read(0, buf + len, cap - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            die(ERR_IO, NULL, "reading the network configuration from stdin: %s", strerror(errno));
        if (r == 0)
            break;
        len += (size_t)r;
    }
    if (len > NW_MAX_LINE)
        die(ERR_DECODE, NULL, "network configuration on stdin is larger than %d bytes", NW_MAX_LINE);
    *n = len;
    return buf;
}

static const char *str_key(struct jnode *root, const char *key, const char *dflt) {
    struct jnode *n = json_get(root, key);
    if (!n)
        return dflt;
    if (n->type != J_STR)
        die(ERR_INVALID_CONFIG, NULL, "nodewire-cni config: %s has the wrong type", key);
    if (strlen(n->str) != n->len)  /* a \u0000 inside: no path can hold it */
        die(ERR_INVALID_CONFIG, NULL, "nodewire-cni config: %s holds a NUL character", key);
    return n->str;
}

static void read_conf(struct conf *c) {
    size_t n;
    char *text = read_stdin(&n);
    struct jerr err;
    c->root = json_parse(text, n, &err);
    if (!c->root)
        die(ERR_DECODE, err.msg, "network configuration on stdin is not JSON");
    if (c->root->type != J_OBJ)
        die(ERR_DECODE, NULL, "network configuration on stdin is not a JSON object");
    c->version = json_get(c->root, "cniVersion");
    int ok = 0;
    for (size_t i = 0; i < NSUPPORTED; i++)
        ok |= json_is_str(c->version, SUPPORTED[i]);
    if (!ok) {
        struct jbuf r = {0}, d = {0};
        jb_repr(&r, c->version);
        jb_lit(&d, "supported: ");
        for (size_t i = 0; i < NSUPPORTED; i++) {
            jb_lit(&d, i ? ", " : "");
            jb_lit(&d, SUPPORTED[i]);
        }
        die(ERR_INCOMPATIBLE_VERSION, d.p, "cniVersion %s is not supported", r.p);
    }
    out_version = c->version;
    struct jnode *fo = json_get(c->root, "failOpen"), *to = json_get(c->root, "timeout");
    if (fo && fo->type != J_TRUE && fo->type != J_FALSE)
        die(ERR_INVALID_CONFIG, NULL, "nodewire-cni config: failOpen has the wrong type");
    c->fail_open = !fo || fo->type == J_TRUE;
    c->socket = str_key(c->root, "socket", "");
    if (!*c->socket)
        c->socket = NW_DEFAULT_SOCKET;
    c->log_file = str_key(c->root, "logFile", NULL);
    if (to && to->type != J_NUM)
        die(ERR_INVALID_CONFIG, NULL, "nodewire-cni config: timeout has the wrong type");
    c->timeout = to ? to->num : 5.0;
    if (!(c->timeout > 0) || !isfinite(c->timeout))
        die(ERR_INVALID_CONFIG, NULL, "nodewire-cni config: timeout must be a positive number of seconds");
    c->prev = json_get(c->root, "prevResult");
}

/* -- the agent's API --------------------------------------------------------------------------- */
static int io_failed(struct call *r, const struct conf *c, int e) {
    r->status = CALL_UNAVAILABLE;
    char m[512];
    snprintf(m, sizeof m, "agent at %s: %s", c->socket,
             (e == EAGAIN || e == EWOULDBLOCK || e == EINPROGRESS) ? "timed out" : strerror(e));
    jb_lit(&r->why, m);
    return -1;
}

static int roundtrip(const struct conf *c, const struct jbuf *req, struct jbuf *answer, struct call *r) {
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(c->socket) >= sizeof sa.sun_path) {
        r->status = CALL_UNAVAILABLE;
        jb_lit(&r->why, "agent at ");
        jb_lit(&r->why, c->socket);
        jb_lit(&r->why, ": AF_UNIX path too long");
        return -1;
    }
    strcpy(sa.sun_path, c->socket);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return io_failed(r, c, errno);
    double t = c->timeout > 1e6 ? 1e6 : c->timeout;
    struct timeval tv = {.tv_sec = (time_t)t, .tv_usec = (suseconds_t)((t - (double)(time_t)t) * 1e6)};
    if (tv.tv_sec == 0 && tv.tv_usec == 0)
        tv.tv_usec = 1;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);  /* also bounds connect() on AF_UNIX */
    int rc = -1;
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        io_failed(r, c, errno);
        goto out;
    }
    for (size_t off = 0; off < req->len;) {
        ssize_t w = send(fd, req->p + off, req->len - off, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno != EPIPE) {  /* EPIPE: the agent answered (refused) and closed; read it */
            io_failed(r, c, errno);
            goto out;
        }
        if (w < 0)
            break;
        off += (size_t)w;
    }
    char chunk[65536];
    while (!answer->len || answer->p[answer->len - 1] != '\n') {
        ssize_t n = recv(fd, chunk, sizeof chunk, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            io_failed(r, c, errno);
            goto out;
        }
        if (n == 0 || answer->len + (size_t)n > (size_t)NW_MAX_LINE + 1)
            break;
        jb_raw(answer, chunk, (size_t)n);
    }
    rc = 0;
out:
    close(fd);
    return rc;
}

/* One request {"method":..,"params":{..}} and its answer; `params` is the members' JSON text. */
static void agent_call(const struct conf *c, const char *method, const char *params, struct call *r) {
    struct jbuf req = {0}, answer = {0};
    memset(r, 0, sizeof *r);
    jb_lit(&r->why, "");
    jb_lit(&req, "{\"method\": ");
    jb_cstr(&req, method);
    jb_lit(&req, ", \"params\": {");
    jb_lit(&req, params);
    jb_lit(&req, "}}\n");
    if (roundtrip(c, &req, &answer, r) < 0)
        return;
    struct jerr err;
    size_t n = answer.len && answer.p[answer.len - 1] == '\n' ? answer.len - 1 : answer.len;
    struct jnode *a = n ? json_parse(answer.p, n, &err) : NULL;
    if (!a || a->type != J_OBJ) {
        r->status = CALL_UNAVAILABLE;
        jb_lit(&r->why, "agent at ");
        jb_lit(&r->why, c->socket);
        jb_lit(&r->why, " closed the connection without an answer");
        return;
    }
    struct jnode *e = json_get(a, "error");
    if (!e)
        return;
    struct jnode *code = json_get(e, "code"), *msg = json_get(e, "message");
    r->status = CALL_REFUSED;
    r->code = json_is_str(code, "not_found") ? ERR_UNKNOWN_CONTAINER : ERR_AGENT_REFUSED;
    if (r->code == ERR_AGENT_REFUSED)
        jb_lit(&r->why, "nodewire agent: ");
    if (msg && msg->type == J_STR)
        jb_raw(&r->why, msg->str, strlen(msg->str));
    jb_lit(&r->agent_code, "");
    if (code && code->type == J_STR)
        jb_raw(&r->agent_code, code->str, strlen(code->str));
}

/* -- the commands ------------------------------------------------------------------------------ */
static const char *env_required(const char *name) {
    const char *v = getenv(name);
    if (!v || !*v)
        die(ERR_INVALID_ENV, NULL, "%s is not set", name);
    return v;
}

/* K of CNI_ARGS "K1=V1;K2=V2" (kubelet passes K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID, ...), as a
 * JSON string; the last one given wins, whitespace around keys and values is dropped. */
static void cni_arg(struct jbuf *b, const char *key) {
    const char *args = getenv("CNI_ARGS"), *found = "", *found_end = found;
    for (const char *item = args ? args : ""; item;) {
        const char *end = strchr(item, ';'), *stop = end ? end : item + strlen(item);
        const char *eq = memchr(item, '=', (size_t)(stop - item));
        if (eq) {
            const char *k = item, *ke = eq, *v = eq + 1, *ve = stop;
            while (k < ke && strchr(" \t\n\r\f\v", *k)) k++;
            while (ke > k && strchr(" \t\n\r\f\v", ke[-1])) ke--;
            while (v < ve && strchr(" \t\n\r\f\v", *v)) v++;
            while (ve > v && strchr(" \t\n\r\f\v", ve[-1])) ve--;
            if ((size_t)(ke - k) == strlen(key) && !memcmp(k, key, (size_t)(ke - k)))
                found = v, found_end = ve;
        }
        item = end ? end + 1 : NULL;
    }
    jb_str(b, found, (size_t)(found_end - found));
}

/* The params of cni.add/del/check: who the pod is, and what the primary plugin gave it. */
static char *attachment(const struct conf *c, int need_netns) {
    const char *netns = getenv("CNI_NETNS");
    if (need_netns && (!netns || !*netns))
        die(ERR_INVALID_ENV, NULL, "CNI_NETNS is not set");
    const char *cid = env_required("CNI_CONTAINERID"), *ifname = env_required("CNI_IFNAME");
    struct jnode *prev = c->prev && c->prev->type == J_OBJ ? c->prev : NULL, *name = json_get(c->root, "name");
    struct jbuf b = {0};
    jb_key(&b, 1, "containerID"), jb_cstr(&b, cid);
    jb_key(&b, 0, "ifName"), jb_cstr(&b, ifname);
    jb_key(&b, 0, "netns"), jb_cstr(&b, netns ? netns : "");
    jb_key(&b, 0, "network"), jb_raw(&b, name ? name->raw : "\"\"", name ? name->rawlen : 2);
    jb_key(&b, 0, "cniVersion"), jb_raw(&b, c->version->raw, c->version->rawlen);
    jb_key(&b, 0, "podNamespace"), cni_arg(&b, "K8S_POD_NAMESPACE");
    jb_key(&b, 0, "podName"), cni_arg(&b, "K8S_POD_NAME");
    jb_key(&b, 0, "podUID"), cni_arg(&b, "K8S_POD_UID");
    jb_key(&b, 0, "ips"), jb_node_or(&b, json_get(prev, "ips"), "[]");
    jb_key(&b, 0, "interfaces"), jb_node_or(&b, json_get(prev, "interfaces"), "[]");
    return b.p;
}

/* failOpen: log and carry on; otherwise fail with `code`. */
static void fail_open(const struct conf *c, const char *what, const struct call *r, int code) {
    if (c->fail_open) {
        logline(c, "warning", "%s: %s; passing through (failOpen)", what, r->why.p);
        return;
    }
    die(code, NULL, "%s: %s", what, r->why.p);
}

static void cmd_add(const struct conf *c) {
    if (!c->prev || c->prev->type != J_OBJ)
        die(ERR_INVALID_CONFIG, NULL, "nodewire-cni is a chained plugin: no prevResult "
                                      "(list it after the primary plugin in a .conflist)");
    struct call r;
    agent_call(c, "cni.add", attachment(c, 1), &r);
    if (r.status != CALL_OK)
        fail_open(c, "ADD not recorded", &r, r.status == CALL_UNAVAILABLE ? ERR_TRY_AGAIN_LATER : r.code);
    /* the result is prevResult, in the configuration's cniVersion */
    struct jbuf b = {0};
    int first = 1, versioned = 0;
    for (struct jnode *m = c->prev->child; m; m = m->next) {
        int is_version = json_is_str(m->key, "cniVersion");
        if (is_version && versioned)
            continue;
        jb_lit(&b, first ? "{" : ", ");
        jb_raw(&b, m->key->raw, m->key->rawlen);
        jb_lit(&b, ": ");
        if (is_version)
            jb_raw(&b, c->version->raw, c->version->rawlen), versioned = 1;
        else
            jb_raw(&b, m->raw, m->rawlen);
        first = 0;
    }
    if (!versioned) {
        jb_lit(&b, first ? "{\"cniVersion\": " : ", \"cniVersion\": ");
        jb_raw(&b, c->version->raw, c->version->rawlen);
    }
    printf("%s}\n", b.p);
}

static void cmd_del(const struct conf *c) {  /* idempotent: the agent, netns or record may be gone */
    struct call r;
    agent_call(c, "cni.del", attachment(c, 0), &r);
    if (r.status != CALL_OK)
        logline(c, "info", "DEL: %s (nothing left to clean up here)", r.why.p);
}

static void cmd_check(const struct conf *c) {
    struct call r;
    agent_call(c, "cni.check", attachment(c, 1), &r);
    if (r.status == CALL_UNAVAILABLE)
        fail_open(c, "CHECK", &r, ERR_TRY_AGAIN_LATER);
    else if (r.status == CALL_REFUSED)
        die(r.code, r.code == ERR_AGENT_REFUSED ? r.agent_code.p : NULL, "%s", r.why.p);
}

static void cmd_status(const struct conf *c) {
    struct call r;
    agent_call(c, "ping", "", &r);
    if (r.status == CALL_UNAVAILABLE && !c->fail_open)
        die(ERR_NOT_AVAILABLE, NULL, "nodewire agent not available: %s", r.why.p);
    if (r.status == CALL_REFUSED)
        die(r.code, r.code == ERR_AGENT_REFUSED ? r.agent_code.p : NULL, "%s", r.why.p);
}

static void cmd_gc(const struct conf *c) {
    struct jbuf b = {0};
    struct jnode *name = json_get(c->root, "name");
    jb_key(&b, 1, "network"), jb_raw(&b, name ? name->raw : "\"\"", name ? name->rawlen : 2);
    jb_key(&b, 0, "validAttachments"), jb_node_or(&b, json_get(c->root, "cni.dev/valid-attachments"), "[]");
    struct call r;
    agent_call(c, "cni.gc", b.p, &r);
    if (r.status != CALL_OK)
        logline(c, "info", "GC: %s (the agent collects at start)", r.why.p);
}

int main(void) {
    static const struct { const char *name; void (*fn)(const struct conf *); } commands[] = {
        {"ADD", cmd_add}, {"DEL", cmd_del}, {"CHECK", cmd_check}, {"STATUS", cmd_status}, {"GC", cmd_gc}};
    signal(SIGPIPE, SIG_IGN);
    const char *command = getenv("CNI_COMMAND");
    command = command ? command : "";
    if (!strcmp(command, "VERSION")) {
        printf("{\"cniVersion\": \"" SPEC_VERSION "\", \"supportedVersions\": [");
        for (size_t i = 0; i < NSUPPORTED; i++)
            printf("%s\"%s\"", i ? ", " : "", SUPPORTED[i]);
        printf("]}\n");
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        if (strcmp(command, commands[i].name))
            continue;
        struct conf c = {0};
        read_conf(&c);
        commands[i].fn(&c);
        return fflush(stdout) ? 1 : 0;
    }
    struct jnode shown = {.type = J_STR, .str = (char *)command, .len = strlen(command)};
    struct jbuf r = {0};
    jb_repr(&r, &shown);
    die(ERR_INVALID_ENV, NULL, "CNI_COMMAND %s is not one of ADD, DEL, CHECK, STATUS, GC, VERSION", r.p);
}
