/*
 * A fake libnvidia-ml.so.1 for tests on machines without a GPU.
 *
 * The real nvidia-ml-py (pynvml) loads it as it loads NVIDIA's library and
 * calls the same symbols with the same calling conventions. The world it
 * reports comes from a state file (path in FAKE_NVML_STATE) that is re-read
 * on every call, and parsed again when its content changed, so a test can
 * change the world while an agent runs. Writers must replace the file atomically (temp file + rename): a
 * reader then sees either the old or the new file, never half of one.
 *
 * State file: one record per line, fields separated by spaces or tabs, `#`
 * starts a comment, blank lines are ignored. Values are percent-escaped
 * (`%20` for a space, `%25` for `%`, `%23` for `#`, `%3D` for `=`).
 *
 *   driver 550.54.15
 *   nvml 12.550.54.15                 (default: "12." + driver)
 *   device 0 uuid=GPU-... name=NVIDIA%20A100-SXM4-40GB total=42949672960
 *            [used=N] [reserved=N] [mig=0|1|na] [mig_pending=0|1]
 *            [minor=N] [util_gpu=N] [util_mem=N]
 *   process 0 pid=1234 used=536870912|na [gi=N] [ci=N] [type=compute|graphics]
 *   error nvmlDeviceGetComputeRunningProcesses_v3 15 [device=N] [times=N] [id=TAG]
 *
 * - device lines come in index order 0, 1, 2...; a process line names a
 *   device declared above it.
 * - mig=na (the default): the card does not support MIG
 *   (nvmlDeviceGetMigMode answers NOT_SUPPORTED). gi/ci default to
 *   0xFFFFFFFF (NVML's "not applicable") unless the device is in MIG mode,
 *   then to 0.
 * - used=na on a process: NVML_VALUE_NOT_AVAILABLE_ulonglong (all ones).
 * - error: the named function (exact symbol name; a trailing `*` matches a
 *   prefix) returns the code, only for that device index if device= is
 *   given, only the first N matching calls if times= is given. The count is
 *   kept in this process's memory keyed by the line's text, so re-reading the
 *   file does not reset it; id= only makes otherwise equal lines distinct.
 *   The check happens once the device is known (handle or index resolved);
 *   nvmlShutdown and nvmlErrorString never read the file.
 * - A malformed line is ignored and reported once on stderr.
 *
 * Conventions followed (NVML's nvml.h): every call but nvmlInit*,
 * nvmlErrorString and nvmlShutdown returns UNINITIALIZED before init; init is
 * reference counted; a missing or unreadable state file makes nvmlInit* return
 * DRIVER_NOT_LOADED and other calls UNKNOWN; a handle whose device is no
 * longer in the state file gives GPU_IS_LOST; string buffers too small give
 * INSUFFICIENT_SIZE; process lists follow the count-query protocol (see
 * list_processes). Symbols not defined here are missing, which pynvml reports
 * as NVMLError_FunctionNotFound. One mutex serialises every call, parse
 * included.
 *
 * Test controls, not NVML: fakeNvmlReset() forgets init references, "times"
 * counters, reported lines and the parsed state; fakeNvmlSetStatePath(path) overrides the
 * environment variable (NULL: back to it).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25
#define NVML_ERROR_UNKNOWN 999

#define NVML_VALUE_NOT_AVAILABLE_ULL 0xFFFFFFFFFFFFFFFFULL
#define NVML_INSTANCE_NOT_APPLICABLE 0xFFFFFFFFU

/* Opaque to callers; a handle points into `handles`, one per device index. */
struct fake_device_handle {
    unsigned int index;
};
typedef struct fake_device_handle *nvmlDevice_t;

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

/* nvml.h: NVML_STRUCT_VERSION(Memory, 2) = sizeof | 2 << 24 = 0x02000028. */
#define nvmlMemory_v2 ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2U << 24)))

/* nvmlProcessInfo_v2_t and nvmlProcessInfo_t (v3) share this layout. */
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

/* Same as ctypes' c_nvmlProcessInfo_v3_t and c_nvmlMemory_v2_t on LP64. */
_Static_assert(sizeof(nvmlProcessInfo_t) == 24, "process info is 24 bytes");
_Static_assert(offsetof(nvmlProcessInfo_t, usedGpuMemory) == 8, "usedGpuMemory at 8");
_Static_assert(offsetof(nvmlProcessInfo_t, computeInstanceId) == 20, "ci at 20");
_Static_assert(sizeof(nvmlMemory_v2_t) == 40, "memory v2 is 40 bytes");

#define MAX_DEVICES 64
#define MAX_PROCESSES 8192
#define MAX_ERRORS 256
#define MAX_COUNTERS 1024
#define MAX_WARNED 256
#define MAX_TOKENS 32
#define LINE_LEN 1024
#define STR_LEN 96 /* NVML_DEVICE_NAME_V2_BUFFER_SIZE, NVML_DEVICE_UUID_V2_BUFFER_SIZE */
#define VERSION_LEN 80 /* NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE */
#define FUNCTION_LEN 128

struct fake_device {
    char uuid[STR_LEN];
    char name[STR_LEN];
    unsigned long long total, used, reserved;
    int mig_supported;
    unsigned int mig_current, mig_pending;
    unsigned int minor;
    unsigned int util_gpu, util_mem;
};

struct fake_process {
    unsigned int device;
    unsigned int pid;
    unsigned long long used;
    unsigned int gi, ci;
    int graphics;
};

struct fake_error {
    char function[FUNCTION_LEN];
    int prefix; /* function ended in '*' */
    nvmlReturn_t code;
    int device; /* -1: any */
    unsigned int times; /* 0: every call */
    unsigned int counter;
};

struct fake_state {
    char driver[VERSION_LEN];
    char nvml[VERSION_LEN];
    unsigned int n_devices;
    struct fake_device devices[MAX_DEVICES];
    unsigned int n_processes;
    struct fake_process processes[MAX_PROCESSES];
    unsigned int n_errors;
    struct fake_error errors[MAX_ERRORS];
};

/* "times" counters outlive re-reads: keyed by the error line's text. */
struct fake_counter {
    char key[LINE_LEN];
    unsigned int fired;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned int init_count;
static struct fake_state state;
static struct fake_device_handle handles[MAX_DEVICES];
static struct fake_counter counters[MAX_COUNTERS];
static unsigned int n_counters;
static unsigned long long warned[MAX_WARNED];
static unsigned int n_warned;
static char state_path_override[PATH_MAX];

/* ---- parsing ---------------------------------------------------------- */

static unsigned long long fnv1a(const char *s)
{
    unsigned long long h = 1469598103934665603ULL;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

/* One stderr line per distinct malformed line and process, not per re-read. */
static void warn(const char *path, unsigned int lineno, const char *why, const char *text)
{
    unsigned long long h = fnv1a(text) ^ fnv1a(why);
    for (unsigned int i = 0; i < n_warned; i++)
        if (warned[i] == h)
            return;
    if (n_warned < MAX_WARNED)
        warned[n_warned++] = h;
    fprintf(stderr, "fake_nvml: %s:%u: ignored line (%s): %s\n", path, lineno, why, text);
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decode `in` into `out` (size `size`); -1 on a bad escape, NUL or overflow. */
static int unescape(const char *in, char *out, size_t size)
{
    size_t n = 0;
    while (*in) {
        int c = (unsigned char)*in;
        if (c == '%') {
            int hi = hexval(in[1]), lo = hi < 0 ? -1 : hexval(in[2]);
            if (hi < 0 || lo < 0)
                return -1;
            c = hi * 16 + lo;
            in += 3;
        } else {
            in++;
        }
        if (c == 0 || n + 1 >= size)
            return -1;
        out[n++] = (char)c;
    }
    out[n] = '\0';
    return 0;
}

static int parse_ull(const char *s, unsigned long long *out)
{
    char *end;
    if (*s < '0' || *s > '9')
        return -1;
    errno = 0;
    *out = strtoull(s, &end, 10);
    return (errno || *end) ? -1 : 0;
}

static int parse_uint(const char *s, unsigned int *out)
{
    unsigned long long v;
    if (parse_ull(s, &v) || v > UINT_MAX)
        return -1;
    *out = (unsigned int)v;
    return 0;
}

/* "used=na" -> NVML_VALUE_NOT_AVAILABLE_ulonglong. */
static int parse_usage(const char *s, unsigned long long *out)
{
    if (strcmp(s, "na") == 0) {
        *out = NVML_VALUE_NOT_AVAILABLE_ULL;
        return 0;
    }
    return parse_ull(s, out);
}

/* Split `key=value`; returns the value or NULL. */
static char *split_option(char *token)
{
    char *eq = strchr(token, '=');
    if (!eq || eq == token)
        return NULL;
    *eq = '\0';
    return eq + 1;
}

static const char *parse_driver(char **tok, int n, char *dest)
{
    if (n != 2)
        return "expected one version";
    if (unescape(tok[1], dest, VERSION_LEN))
        return "bad version";
    return NULL;
}

static const char *parse_device(char **tok, int n)
{
    struct fake_device d;
    unsigned int index;
    int have_uuid = 0, have_total = 0, have_pending = 0, have_minor = 0;

    if (n < 2 || parse_uint(tok[1], &index))
        return "expected a device index";
    if (index != state.n_devices)
        return "device indices must be 0, 1, 2... in order";
    if (index >= MAX_DEVICES)
        return "too many devices";
    memset(&d, 0, sizeof d);
    strcpy(d.name, "Fake GPU");
    for (int i = 2; i < n; i++) {
        char *key = tok[i], *value = split_option(tok[i]);
        int bad;
        if (!value)
            return "expected key=value";
        if (strcmp(key, "uuid") == 0)
            bad = unescape(value, d.uuid, sizeof d.uuid), have_uuid = 1;
        else if (strcmp(key, "name") == 0)
            bad = unescape(value, d.name, sizeof d.name);
        else if (strcmp(key, "total") == 0)
            bad = parse_ull(value, &d.total), have_total = 1;
        else if (strcmp(key, "used") == 0)
            bad = parse_ull(value, &d.used);
        else if (strcmp(key, "reserved") == 0)
            bad = parse_ull(value, &d.reserved);
        else if (strcmp(key, "mig") == 0) {
            bad = 0;
            d.mig_supported = strcmp(value, "na") != 0;
            if (d.mig_supported)
                bad = parse_uint(value, &d.mig_current) || d.mig_current > 1;
        } else if (strcmp(key, "mig_pending") == 0)
            bad = parse_uint(value, &d.mig_pending) || d.mig_pending > 1, have_pending = 1;
        else if (strcmp(key, "minor") == 0)
            bad = parse_uint(value, &d.minor), have_minor = 1;
        else if (strcmp(key, "util_gpu") == 0)
            bad = parse_uint(value, &d.util_gpu) || d.util_gpu > 100;
        else if (strcmp(key, "util_mem") == 0)
            bad = parse_uint(value, &d.util_mem) || d.util_mem > 100;
        else
            return "unknown device key";
        if (bad)
            return "bad device value";
    }
    if (!have_uuid || !have_total)
        return "device needs uuid= and total=";
    if (!have_pending)
        d.mig_pending = d.mig_current;
    if (!have_minor)
        d.minor = index;
    state.devices[state.n_devices++] = d;
    return NULL;
}

static const char *parse_process(char **tok, int n)
{
    struct fake_process p;
    int have_pid = 0, have_used = 0, have_gi = 0, have_ci = 0;

    memset(&p, 0, sizeof p);
    if (n < 2 || parse_uint(tok[1], &p.device))
        return "expected a device index";
    if (p.device >= state.n_devices)
        return "process on a device not declared above it";
    if (state.n_processes >= MAX_PROCESSES)
        return "too many processes";
    for (int i = 2; i < n; i++) {
        char *key = tok[i], *value = split_option(tok[i]);
        int bad;
        if (!value)
            return "expected key=value";
        if (strcmp(key, "pid") == 0)
            bad = parse_uint(value, &p.pid), have_pid = 1;
        else if (strcmp(key, "used") == 0)
            bad = parse_usage(value, &p.used), have_used = 1;
        else if (strcmp(key, "gi") == 0)
            bad = parse_uint(value, &p.gi), have_gi = 1;
        else if (strcmp(key, "ci") == 0)
            bad = parse_uint(value, &p.ci), have_ci = 1;
        else if (strcmp(key, "type") == 0) {
            bad = strcmp(value, "compute") != 0 && strcmp(value, "graphics") != 0;
            p.graphics = strcmp(value, "graphics") == 0;
        } else
            return "unknown process key";
        if (bad)
            return "bad process value";
    }
    if (!have_pid || !have_used)
        return "process needs pid= and used=";
    {
        const struct fake_device *d = &state.devices[p.device];
        unsigned int dflt = (d->mig_supported && d->mig_current) ? 0 : NVML_INSTANCE_NOT_APPLICABLE;
        if (!have_gi)
            p.gi = dflt;
        if (!have_ci)
            p.ci = dflt;
    }
    state.processes[state.n_processes++] = p;
    return NULL;
}

static int counter_slot(const char *key, unsigned int *slot)
{
    for (unsigned int i = 0; i < n_counters; i++)
        if (strcmp(counters[i].key, key) == 0) {
            *slot = i;
            return 0;
        }
    if (n_counters >= MAX_COUNTERS)
        return -1;
    strcpy(counters[n_counters].key, key);
    counters[n_counters].fired = 0;
    *slot = n_counters++;
    return 0;
}

static const char *parse_error(char **tok, int n, const char *key)
{
    struct fake_error e;
    unsigned int code;
    size_t len;

    memset(&e, 0, sizeof e);
    e.device = -1;
    if (n < 3)
        return "expected a function and a return code";
    len = strlen(tok[1]);
    if (len == 0 || len >= sizeof e.function)
        return "bad function name";
    for (size_t i = 0; i < len; i++) {
        char c = tok[1][i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '_' || (c == '*' && i == len - 1);
        if (!ok)
            return "bad function name";
    }
    memcpy(e.function, tok[1], len + 1);
    if (e.function[len - 1] == '*') {
        e.prefix = 1;
        e.function[len - 1] = '\0';
    }
    if (parse_uint(tok[2], &code) || code > INT_MAX)
        return "bad return code";
    e.code = (nvmlReturn_t)code;
    for (int i = 3; i < n; i++) {
        char *k = tok[i], *value = split_option(tok[i]);
        unsigned int v;
        if (!value)
            return "expected key=value";
        if (strcmp(k, "device") == 0) {
            if (parse_uint(value, &v) || v >= MAX_DEVICES)
                return "bad device";
            e.device = (int)v;
        } else if (strcmp(k, "times") == 0) {
            if (parse_uint(value, &v) || v == 0)
                return "bad times";
            e.times = v;
        } else if (strcmp(k, "id") != 0)
            return "unknown error key";
    }
    if (state.n_errors >= MAX_ERRORS)
        return "too many errors";
    if (e.times && counter_slot(key, &e.counter))
        return "too many counted errors";
    state.errors[state.n_errors++] = e;
    return NULL;
}

static void parse_line(char *line, const char *path, unsigned int lineno)
{
    char *tok[MAX_TOKENS];
    char key[LINE_LEN] = "";
    int n = 0;
    size_t keylen = 0;
    const char *why;
    char *p = strchr(line, '#');

    if (p)
        *p = '\0';
    /* Tokenize in place and keep the tokens joined by single spaces as the
     * line's identity (for messages and "times" counters). */
    for (p = line; *p;) {
        while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')
            p++;
        if (!*p)
            break;
        if (n == MAX_TOKENS) {
            warn(path, lineno, "too many fields", key);
            return;
        }
        tok[n] = p;
        while (*p && *p != ' ' && *p != '\t' && *p != '\r' && *p != '\n')
            p++;
        if (*p)
            *p++ = '\0';
        {
            size_t len = strlen(tok[n]);
            if (keylen)
                key[keylen++] = ' ';
            memcpy(key + keylen, tok[n], len); /* fits: the line was shorter than LINE_LEN */
            keylen += len;
            key[keylen] = '\0';
        }
        n++;
    }
    if (n == 0)
        return;
    if (strcmp(tok[0], "driver") == 0)
        why = parse_driver(tok, n, state.driver);
    else if (strcmp(tok[0], "nvml") == 0)
        why = parse_driver(tok, n, state.nvml);
    else if (strcmp(tok[0], "device") == 0)
        why = parse_device(tok, n);
    else if (strcmp(tok[0], "process") == 0)
        why = parse_process(tok, n);
    else if (strcmp(tok[0], "error") == 0)
        why = parse_error(tok, n, key);
    else
        why = "unknown record";
    if (why)
        warn(path, lineno, why, key);
}

static const char *state_path(void)
{
    if (state_path_override[0])
        return state_path_override;
    return getenv("FAKE_NVML_STATE");
}

/* The file as last parsed: an unchanged file is not parsed again. Reading it
 * is a single read(2); parsing hundreds of lines on every call would make the
 * fake, not the code under test, dominate a benchmark. */
static char *last_text;
static size_t last_len;
static char last_path[4096];

/* The whole file in a malloc'ed buffer (NUL-terminated); NULL when unreadable. */
static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "re");
    size_t cap = 1 << 16, n = 0;
    char *buf;

    if (!f)
        return NULL;
    buf = malloc(cap + 1);
    while (buf) {
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (n < cap) {
            if (ferror(f)) {
                free(buf);
                buf = NULL;
            }
            break;
        }
        char *bigger = realloc(buf, 2 * cap + 1);
        if (!bigger) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = bigger;
        cap *= 2;
    }
    fclose(f);
    if (buf) {
        buf[n] = '\0';
        *len = n;
    }
    return buf;
}

/* Re-read the whole world; 0 on success, -1 when the file cannot be read. */
static int load_state(void)
{
    char line[LINE_LEN];
    unsigned int lineno = 0;
    const char *path = state_path();
    FILE *f;
    char *text;
    size_t len = 0;
    int failed;

    if (!path || !*path)
        return -1;
    text = slurp(path, &len);
    if (!text)
        return -1;
    if (last_text && len == last_len && strcmp(path, last_path) == 0 &&
        memcmp(text, last_text, len) == 0) {
        free(text);
        return 0;
    }
    free(last_text);
    last_text = text;
    last_len = len;
    snprintf(last_path, sizeof last_path, "%s", path);
    f = fmemopen(text, len ? len : 1, "r");
    if (!f)
        return -1;
    strcpy(state.driver, "550.54.15");
    state.nvml[0] = '\0';
    state.n_devices = state.n_processes = state.n_errors = 0;
    while (fgets(line, sizeof line, f)) {
        size_t len = strlen(line);
        lineno++;
        if (len == sizeof line - 1 && line[len - 1] != '\n' && !feof(f)) {
            int c;
            line[64] = '\0';
            warn(path, lineno, "line too long", line);
            while ((c = fgetc(f)) != EOF && c != '\n')
                ;
            continue;
        }
        parse_line(line, path, lineno);
    }
    failed = ferror(f);
    fclose(f);
    if (!state.nvml[0] && strlen(state.driver) + 4 <= sizeof state.nvml) {
        memcpy(state.nvml, "12.", 3);
        strcpy(state.nvml + 3, state.driver);
    }
    return failed ? -1 : 0;
}

/* ---- call plumbing (all under `lock`) --------------------------------- */

static nvmlReturn_t injected(const char *function, int device)
{
    for (unsigned int i = 0; i < state.n_errors; i++) {
        struct fake_error *e = &state.errors[i];
        int match = e->prefix ? strncmp(e->function, function, strlen(e->function)) == 0
                              : strcmp(e->function, function) == 0;
        if (!match || (e->device >= 0 && e->device != device))
            continue;
        if (e->times) {
            if (counters[e->counter].fired >= e->times)
                continue;
            counters[e->counter].fired++;
        }
        return e->code;
    }
    return NVML_SUCCESS;
}

/* Every call but init/shutdown/errorString starts here. */
static nvmlReturn_t enter(void)
{
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (load_state() != 0)
        return NVML_ERROR_UNKNOWN;
    return NVML_SUCCESS;
}

static struct fake_device_handle *handle_for(unsigned int index)
{
    handles[index].index = index;
    return &handles[index];
}

/* The device behind a handle, after the injected-error check for `function`. */
static nvmlReturn_t enter_device(const char *function, nvmlDevice_t handle,
                                 const struct fake_device **device, unsigned int *index)
{
    uintptr_t p = (uintptr_t)handle, base = (uintptr_t)handles;
    unsigned int i;
    nvmlReturn_t rc = enter();

    if (rc != NVML_SUCCESS)
        return rc;
    if (p < base || p >= base + sizeof handles || (p - base) % sizeof handles[0])
        return NVML_ERROR_INVALID_ARGUMENT;
    i = (unsigned int)((p - base) / sizeof handles[0]);
    if (i >= state.n_devices)
        return NVML_ERROR_GPU_IS_LOST;
    rc = injected(function, (int)i);
    if (rc != NVML_SUCCESS)
        return rc;
    *device = &state.devices[i];
    if (index)
        *index = i;
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_string(char *buf, unsigned int length, const char *value)
{
    size_t need = strlen(value) + 1;
    if (!buf)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (need > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buf, value, need);
    return NVML_SUCCESS;
}

#define LOCKED(expr)                                                                               \
    do {                                                                                           \
        nvmlReturn_t rc_;                                                                          \
        pthread_mutex_lock(&lock);                                                                 \
        rc_ = (expr);                                                                              \
        pthread_mutex_unlock(&lock);                                                               \
        return rc_;                                                                                \
    } while (0)

/* ---- init, shutdown, errors ------------------------------------------- */

static nvmlReturn_t do_init(const char *function)
{
    nvmlReturn_t rc;
    if (load_state() != 0)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    rc = injected(function, -1);
    if (rc == NVML_SUCCESS)
        init_count++;
    return rc;
}

nvmlReturn_t nvmlInit(void) { LOCKED(do_init("nvmlInit")); }
nvmlReturn_t nvmlInit_v2(void) { LOCKED(do_init("nvmlInit_v2")); }

nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    LOCKED(do_init("nvmlInitWithFlags"));
}

static nvmlReturn_t do_shutdown(void)
{
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    init_count--;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlShutdown(void) { LOCKED(do_shutdown()); }

/* NVML's own texts (nvmlErrorString of driver 550). */
const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 5: return "Already Initialized";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 8: return "Insufficient External Power";
    case 9: return "Driver Not Loaded";
    case 10: return "Timeout";
    case 11: return "Interrupt request issue";
    case 12: return "NVML Shared Library Not Found";
    case 13: return "Function Not Found";
    case 14: return "Corrupted infoROM";
    case 15: return "GPU is lost";
    case 16: return "GPU requires restart";
    case 17: return "The operating system has blocked the request.";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    case 19: return "In use by another client";
    case 20: return "Insufficient Memory";
    case 21: return "No data";
    case 25: return "Argument version mismatch";
    case 26: return "Deprecated";
    case 27: return "Not Ready";
    case 28: return "GPU not found";
    case 29: return "Invalid state";
    default: return "Unknown Error";
    }
}

/* ---- system ------------------------------------------------------------ */

static nvmlReturn_t system_string(const char *function, char *buf, unsigned int length, int nvml)
{
    nvmlReturn_t rc = enter();
    if (rc == NVML_SUCCESS)
        rc = injected(function, -1);
    if (rc == NVML_SUCCESS)
        rc = copy_string(buf, length, nvml ? state.nvml : state.driver);
    return rc;
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    LOCKED(system_string("nvmlSystemGetDriverVersion", version, length, 0));
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    LOCKED(system_string("nvmlSystemGetNVMLVersion", version, length, 1));
}

/* ---- devices ----------------------------------------------------------- */

static nvmlReturn_t device_count(const char *function, unsigned int *count)
{
    nvmlReturn_t rc = enter();
    if (rc == NVML_SUCCESS)
        rc = count ? injected(function, -1) : NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS)
        *count = state.n_devices;
    return rc;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
    LOCKED(device_count("nvmlDeviceGetCount_v2", count));
}

nvmlReturn_t nvmlDeviceGetCount(unsigned int *count)
{
    LOCKED(device_count("nvmlDeviceGetCount", count));
}

static nvmlReturn_t handle_by_index(const char *function, unsigned int index, nvmlDevice_t *device)
{
    nvmlReturn_t rc = enter();
    if (rc != NVML_SUCCESS)
        return rc;
    if (!device || index >= state.n_devices)
        return NVML_ERROR_INVALID_ARGUMENT;
    rc = injected(function, (int)index);
    if (rc == NVML_SUCCESS)
        *device = handle_for(index);
    return rc;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    LOCKED(handle_by_index("nvmlDeviceGetHandleByIndex_v2", index, device));
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    LOCKED(handle_by_index("nvmlDeviceGetHandleByIndex", index, device));
}

static nvmlReturn_t handle_by_uuid(const char *uuid, nvmlDevice_t *device)
{
    nvmlReturn_t rc = enter();
    if (rc != NVML_SUCCESS)
        return rc;
    if (!uuid || !device)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = 0; i < state.n_devices; i++) {
        if (strcmp(state.devices[i].uuid, uuid) != 0)
            continue;
        rc = injected("nvmlDeviceGetHandleByUUID", (int)i);
        if (rc == NVML_SUCCESS)
            *device = handle_for(i);
        return rc;
    }
    return NVML_ERROR_NOT_FOUND;
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    LOCKED(handle_by_uuid(uuid, device));
}

static nvmlReturn_t device_string(const char *function, nvmlDevice_t handle, char *buf,
                                  unsigned int length, int uuid)
{
    const struct fake_device *d;
    nvmlReturn_t rc = enter_device(function, handle, &d, NULL);
    if (rc == NVML_SUCCESS)
        rc = copy_string(buf, length, uuid ? d->uuid : d->name);
    return rc;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    LOCKED(device_string("nvmlDeviceGetUUID", device, uuid, length, 1));
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    LOCKED(device_string("nvmlDeviceGetName", device, name, length, 0));
}

static nvmlReturn_t device_index(nvmlDevice_t handle, unsigned int *index)
{
    const struct fake_device *d;
    unsigned int i;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetIndex", handle, &d, &i);
    if (rc == NVML_SUCCESS && !index)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS)
        *index = i;
    return rc;
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    LOCKED(device_index(device, index));
}

static nvmlReturn_t device_minor(nvmlDevice_t handle, unsigned int *minor)
{
    const struct fake_device *d;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetMinorNumber", handle, &d, NULL);
    if (rc == NVML_SUCCESS && !minor)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS)
        *minor = d->minor;
    return rc;
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minor)
{
    LOCKED(device_minor(device, minor));
}

static unsigned long long free_memory(const struct fake_device *d)
{
    unsigned long long taken = d->used + d->reserved;
    return taken < d->used || taken > d->total ? 0 : d->total - taken;
}

/* v1 has no reserved field: its `used` is total - free, reserved included. */
static nvmlReturn_t memory_v1(nvmlDevice_t handle, nvmlMemory_t *memory)
{
    const struct fake_device *d;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetMemoryInfo", handle, &d, NULL);
    if (rc == NVML_SUCCESS && !memory)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS) {
        memory->total = d->total;
        memory->free = free_memory(d);
        memory->used = d->used + d->reserved;
    }
    return rc;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    LOCKED(memory_v1(device, memory));
}

static nvmlReturn_t memory_v2(nvmlDevice_t handle, nvmlMemory_v2_t *memory)
{
    const struct fake_device *d;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetMemoryInfo_v2", handle, &d, NULL);
    if (rc == NVML_SUCCESS && !memory)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS && memory->version != nvmlMemory_v2)
        rc = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (rc == NVML_SUCCESS) {
        memory->total = d->total;
        memory->reserved = d->reserved;
        memory->free = free_memory(d);
        memory->used = d->used;
    }
    return rc;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    LOCKED(memory_v2(device, memory));
}

static nvmlReturn_t mig_mode(nvmlDevice_t handle, unsigned int *current, unsigned int *pending)
{
    const struct fake_device *d;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetMigMode", handle, &d, NULL);
    if (rc == NVML_SUCCESS && (!current || !pending))
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS && !d->mig_supported)
        rc = NVML_ERROR_NOT_SUPPORTED;
    if (rc == NVML_SUCCESS) {
        *current = d->mig_current;
        *pending = d->mig_pending;
    }
    return rc;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode,
                                  unsigned int *pendingMode)
{
    LOCKED(mig_mode(device, currentMode, pendingMode));
}

static nvmlReturn_t utilization(nvmlDevice_t handle, nvmlUtilization_t *util)
{
    const struct fake_device *d;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetUtilizationRates", handle, &d, NULL);
    if (rc == NVML_SUCCESS && !util)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS) {
        util->gpu = d->util_gpu;
        util->memory = d->util_mem;
    }
    return rc;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization_)
{
    LOCKED(utilization(device, utilization_));
}

/*
 * nvml.h, nvmlDeviceGetComputeRunningProcesses_v3: "To query the number of
 * processes under the device, set infoCount to 0 and infos to NULL":
 * SUCCESS with *infoCount = 0 when there are none, else INSUFFICIENT_SIZE
 * with *infoCount set to the number needed; the same when the caller's
 * array is too small. On success *infoCount is the number filled in.
 */
static nvmlReturn_t list_processes(const char *function, nvmlDevice_t handle,
                                   unsigned int *infoCount, nvmlProcessInfo_t *infos, int graphics)
{
    const struct fake_device *d;
    unsigned int index, n = 0;
    nvmlReturn_t rc = enter_device(function, handle, &d, &index);

    if (rc != NVML_SUCCESS)
        return rc;
    if (!infoCount)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = 0; i < state.n_processes; i++)
        n += state.processes[i].device == index && state.processes[i].graphics == graphics;
    if (*infoCount < n) {
        *infoCount = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    if (n > 0 && !infos)
        return NVML_ERROR_INVALID_ARGUMENT;
    n = 0;
    for (unsigned int i = 0; i < state.n_processes; i++) {
        const struct fake_process *p = &state.processes[i];
        if (p->device != index || p->graphics != graphics)
            continue;
        infos[n].pid = p->pid;
        infos[n].usedGpuMemory = p->used;
        infos[n].gpuInstanceId = p->gi;
        infos[n].computeInstanceId = p->ci;
        n++;
    }
    *infoCount = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_t *infos)
{
    LOCKED(list_processes("nvmlDeviceGetComputeRunningProcesses_v3", device, infoCount, infos, 0));
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_t *infos)
{
    LOCKED(list_processes("nvmlDeviceGetComputeRunningProcesses_v2", device, infoCount, infos, 0));
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device,
                                                      unsigned int *infoCount,
                                                      nvmlProcessInfo_t *infos)
{
    LOCKED(list_processes("nvmlDeviceGetGraphicsRunningProcesses_v3", device, infoCount, infos, 1));
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v2(nvmlDevice_t device,
                                                      unsigned int *infoCount,
                                                      nvmlProcessInfo_t *infos)
{
    LOCKED(list_processes("nvmlDeviceGetGraphicsRunningProcesses_v2", device, infoCount, infos, 1));
}

/* ---- test controls (not NVML) ------------------------------------------ */

/* Forget init references, "times" counters and reported lines. */
void fakeNvmlReset(void)
{
    pthread_mutex_lock(&lock);
    init_count = 0;
    n_counters = 0;
    n_warned = 0;
    /* Parsed errors point at counters: parse again after forgetting them. */
    free(last_text);
    last_text = NULL;
    last_len = 0;
    pthread_mutex_unlock(&lock);
}

/* Read the state from `path` instead of $FAKE_NVML_STATE (NULL: back to the
 * variable); returns -1 when the path is too long. */
int fakeNvmlSetStatePath(const char *path)
{
    int rc = 0;
    pthread_mutex_lock(&lock);
    if (!path)
        state_path_override[0] = '\0';
    else if (strlen(path) >= sizeof state_path_override)
        rc = -1;
    else
        strcpy(state_path_override, path);
    pthread_mutex_unlock(&lock);
    return rc;
}
