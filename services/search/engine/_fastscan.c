/*
 * _fastscan: the engine's hot byte loops in C, working directly on (memory-mapped) buffers.
 *
 * verify.py and trigrams.py call these; their Python docstrings say what each result means,
 * this file only says how it is computed.
 *
 *   find_literal(data, needle, folded, guard, limit, line_type) -> list[line_type] | None
 *       Every line of `data` containing `needle` (ASCII-case-insensitively when `folded`; the
 *       needle is then given lower-cased), as line_type(line_number, line_start, line_end,
 *       ranges) tuples: the same leftmost, non-overlapping occurrences bytes.find yields; at
 *       most `limit` lines when limit > 0. With `folded` and `guard`, None when data holds
 *       KELVIN SIGN or LONG S (the caller then asks RE2, whose (?i) matches them to k and s).
 *   needle_lines(data, needle, folded, guard) -> list[tuple[int, int, int]] | None
 *       (line_number, line_start, line_end) of every distinct line containing `needle`: the
 *       candidate lines a regex prefilter hands to RE2; None as above.
 *   any_whole_word(data, lines) -> bool
 *       Whether any range of any (line_number, line_start, line_end, ranges) line is a whole
 *       word by rank.is_whole_word's rule (ASCII word bytes, as RE2's \b).
 *   invert_postings(docs) -> tuple[bytes, bytes, bytes]
 *       The posting lists of documents 0..n-1 given each one's distinct trigram ids (uint32
 *       buffers): ascending trigram ids (uint32), run starts with a final end (int64) and
 *       the ordinals grouped by trigram, ascending within each (uint32), by counting sort.
 *   scan_literal(data, needle, folded, guard) -> tuple[bytes, int, int] | None
 *       find_literal's lines as one packed int64 buffer instead of Python objects, with the
 *       counts of lines and matches: per line
 *       line_number, line_start, line_end, range_count, then range_count (start, end) pairs
 *       relative to line_start (the "groups" layout render_lines reads); None as above.
 *   count_literal(data, needle, folded, guard) -> tuple[int, int] | None
 *       (matching lines, matches) of find_literal, without building anything per line.
 *   render_lines(data, groups, path, json, context) -> bytes
 *       The output lines of one file's matches in the groups layout: `path:N:text` per
 *       match and `path-N-text` per context line, `--` between non-adjacent groups (grep
 *       and ripgrep's format), or with `json` ripgrep's JSON Lines for the file (`rg
 *       --json`): a `begin` record, one `match` or `context` record per printed line
 *       (`lines.text` with the line's newline, `line_number`, `absolute_offset`, and
 *       `submatches` with each range's text and bytes relative to the line) and an `end`
 *       record with the file's statistics; `path` is given already rendered (a JSON string
 *       literal in json mode), and services/cli/render.py's Printer prints the same bytes.
 *   render_json(data, groups, path, context) -> tuple[bytes, int, int, int, float]
 *       render_lines' JSON records with the statistics of its `end` record: (records,
 *       matched lines, matches, bytes printed before `end`, elapsed seconds).
 *   distinct_trigrams(data) -> bytes
 *       The distinct ASCII-folded trigram ids of `data` (uint32, native byte order, first
 *       occurrence order), leaving out trigrams that contain a newline byte.
 *
 * Every scan runs with the GIL released (the input buffer is held by a Py_buffer, so it
 * cannot go away), writing into a plain C array; Python objects are built afterwards.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* memmem, memrchr */
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TRIGRAM_SPACE (1u << 24)

static unsigned char fold_table[256];

static void init_fold_table(void) {
    for (int i = 0; i < 256; i++) {
        fold_table[i] = (unsigned char)((i >= 'A' && i <= 'Z') ? i + ('a' - 'A') : i);
    }
}

/* A growable array of int64 values, filled without the GIL. */
typedef struct {
    int64_t *items;
    size_t len;
    size_t cap;
} i64vec;

static int vec_push(i64vec *v, int64_t value) {
    if (v->len == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 256;
        int64_t *grown = realloc(v->items, cap * sizeof(int64_t));
        if (grown == NULL) {
            return -1;
        }
        v->items = grown;
        v->cap = cap;
    }
    v->items[v->len++] = value;
    return 0;
}

/*
 * find_needle is memmem, faster for the needles a search has. glibc's memmem walks a
 * two-byte needle a byte at a time (1.6-1.8 GB/s over Linux's content here, so a count of
 * `ab` over 947 MB took 0.55 s) and longer ones at ~10 GB/s. With SSE2 (every x86-64) this
 * tests 16 positions per step for the needle's first and last bytes and compares the rest
 * only where both match: ~15-19 GB/s whatever the needle. A needle whose first and last
 * bytes keep matching where the rest does not (`aaaab` over `aaaa...`) would make that
 * quadratic, so the bytes compared in vain are budgeted: past one per byte scanned (plus
 * 1 KiB per call), the rest of the haystack goes to memmem, which is linear. A call's waste is
 * thus at most min(m, ~17 + 1024/m) bytes per byte its caller moves past (every caller moves
 * at least the needle's length per hit): linear in the haystack for any needle. Without SSE2
 * it is memmem.
 */
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

static const unsigned char *find_needle(const unsigned char *hay, size_t n, const unsigned char *needle, size_t m) {
    if (m == 0) {
        return hay;
    }
    if (n < m) {
        return NULL;
    }
    if (m == 1) {
        return memchr(hay, needle[0], n);
    }
    size_t i = 0;
#if defined(__SSE2__)
    const __m128i first = _mm_set1_epi8((char)needle[0]);
    const __m128i last = _mm_set1_epi8((char)needle[m - 1]);
    size_t wasted = 0; /* bytes compared at candidates that were not the needle */
    /* Both 16-byte loads stay inside the haystack: i + m - 1 + 16 <= n. */
    while (n - i >= m + 15) {
        __m128i a = _mm_loadu_si128((const __m128i *)(const void *)(hay + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(hay + i + m - 1));
        unsigned mask = (unsigned)_mm_movemask_epi8(_mm_and_si128(_mm_cmpeq_epi8(a, first), _mm_cmpeq_epi8(b, last)));
        while (mask != 0) {
            unsigned bit = (unsigned)__builtin_ctz(mask);
            if (m <= 2 || memcmp(hay + i + bit + 1, needle + 1, m - 2) == 0) {
                return hay + i + bit;
            }
            wasted += m - 2;
            mask &= mask - 1;
        }
        i += 16;
        if (wasted > i + 1024) {
            break; /* a needle that defeats the filter: memmem (linear) from here */
        }
    }
#endif
    return memmem(hay + i, n - i, needle, m);
}

/* find_run returns the start of the first run of at least m consecutive bytes of `set` (256
 * flags) in hay[0:n], or NULL. It probes every m-th byte: a probe outside the set rules out
 * every run through it, so a rare class skips m bytes a probe (`[A-Z]{20,}` reads about one
 * byte in twenty); a probe inside it is widened to its run, back to the last byte known to be
 * outside and forward to m bytes or the run's end. No byte is read more than twice. */
static const unsigned char *find_run(const unsigned char *hay, size_t n, const unsigned char *set, size_t m) {
    if (m == 0) {
        return hay;
    }
    size_t floor = 0; /* hay[floor - 1] is outside the set (or floor is 0) */
    size_t i = m - 1; /* no run of m starts before i - m + 1 */
    while (i < n) {
        if (!set[hay[i]]) {
            floor = i + 1;
            i += m;
            continue;
        }
        size_t j = i;
        while (j > floor && set[hay[j - 1]]) {
            j--;
        }
        size_t k = i + 1;
        while (k < n && k - j < m && set[hay[k]]) {
            k++;
        }
        if (k - j >= m) {
            return hay + j;
        }
        floor = k + 1; /* hay[k] is outside the set, or k is n */
        i = k + m;
    }
    return NULL;
}

static const unsigned char *find_bytes(const unsigned char *hay, Py_ssize_t hay_len,
                                       const unsigned char *needle, Py_ssize_t needle_len) {
    if (hay_len < needle_len) {
        return NULL;
    }
    return find_needle(hay, (size_t)hay_len, needle, (size_t)needle_len);
}

static Py_ssize_t count_newlines(const unsigned char *p, Py_ssize_t n) {
    Py_ssize_t count = 0;
    /* A plain loop: gcc vectorises it, and line spans between hits are short. */
    for (Py_ssize_t i = 0; i < n; i++) {
        count += p[i] == '\n';
    }
    return count;
}

/* Per-thread scratch for folded copies, grown as needed: a fresh malloc per document of a
   few hundred KiB costs page faults (mmap'd allocations) on every call. */
static _Thread_local unsigned char *fold_buf;
static _Thread_local size_t fold_cap;

/*
 * folded_copy returns an ASCII-lower-cased copy of data in the thread's scratch buffer (NULL
 * when memory ran out). With `guard` it sets *unsafe when data holds KELVIN SIGN (E2 84 AA)
 * or LONG S (C5 BF): RE2's (?i) lets those match `k` and `s`, which ASCII folding would miss.
 */
static unsigned char *folded_copy(const unsigned char *data, Py_ssize_t n, int guard, int *unsafe) {
    size_t need = n > 0 ? (size_t)n : 1;
    if (fold_cap < need) {
        unsigned char *grown = realloc(fold_buf, need);
        if (grown == NULL) {
            return NULL;
        }
        fold_buf = grown;
        fold_cap = need;
    }
    unsigned char *out = fold_buf;
    /* Branch-free so gcc vectorises it (about 10x a table lookup per byte); `rare` notes the
       last bytes of KELVIN SIGN and LONG S in the same pass, so the exact check below runs
       only on the rare documents that might hold them. */
    unsigned char rare = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = data[i];
        out[i] = (unsigned char)(c | ((unsigned char)(c - 'A') < 26u) << 5);
        rare |= (unsigned char)((c == 0xAA) | (c == 0xBF));
    }
    if (guard && rare &&
        (find_needle(data, (size_t)n, (const unsigned char *)"\xE2\x84\xAA", 3) != NULL ||
         find_needle(data, (size_t)n, (const unsigned char *)"\xC5\xBF", 2) != NULL)) {
        *unsafe = 1;
    }
    return out;
}

/*
 * scan_lines records the lines holding the needle as groups in `out`:
 * line_number, line_start, line_end, range_count, then range_count (start, end) pairs
 * relative to line_start (range_count is 0 and no pairs follow when with_ranges is 0).
 * Returns 0, or -1 when memory ran out.
 */
static int scan_lines(const unsigned char *hay, Py_ssize_t n, const unsigned char *needle,
                      Py_ssize_t m, Py_ssize_t limit, int with_ranges, i64vec *out) {
    Py_ssize_t line_number = 1, counted = 0, found = 0;
    const unsigned char *hit = find_bytes(hay, n, needle, m);
    while (hit != NULL) {
        Py_ssize_t pos = hit - hay;
        const unsigned char *nl = memrchr(hay + counted, '\n', (size_t)(pos - counted));
        Py_ssize_t start = nl ? (nl - hay) + 1 : counted;
        const unsigned char *eol = memchr(hay + pos, '\n', (size_t)(n - pos));
        Py_ssize_t end = eol ? eol - hay : n;
        line_number += count_newlines(hay + counted, start - counted);
        counted = start;
        if (vec_push(out, line_number) || vec_push(out, start) || vec_push(out, end)) {
            return -1;
        }
        size_t count_at = out->len;
        if (vec_push(out, 0)) {
            return -1;
        }
        if (with_ranges) {
            int64_t ranges = 0;
            /* The needle has no newline, so every hit that starts in this line ends in it. */
            while (hit != NULL) {
                pos = hit - hay;
                if (vec_push(out, pos - start) || vec_push(out, pos - start + m)) {
                    return -1;
                }
                ranges++;
                hit = find_bytes(hay + pos + m, end - (pos + m), needle, m);
            }
            out->items[count_at] = ranges;
        }
        found++;
        if (found == limit || end >= n) {
            break;
        }
        hit = find_bytes(hay + end + 1, n - end - 1, needle, m);
    }
    return 0;
}

typedef struct {
    Py_buffer data;
    const unsigned char *needle;
    Py_ssize_t needle_len;
} scan_args;

/* run_scan returns 0, -1 when memory ran out, or 1 when `guard` found KELVIN SIGN or LONG S. */
static int run_scan(scan_args *a, int folded, int guard, Py_ssize_t limit, int with_ranges, i64vec *out) {
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS;
    const unsigned char *hay = a->data.buf;
    int unsafe = 0;
    if (folded) {
        hay = folded_copy(hay, a->data.len, guard, &unsafe);
    }
    if (hay == NULL) {
        rc = -1;
    } else if (guard && unsafe) {
        rc = 1;
    } else {
        rc = scan_lines(hay, a->data.len, a->needle, a->needle_len, limit, with_ranges, out);
    }
    Py_END_ALLOW_THREADS;
    return rc;
}

static PyObject *new_line(PyTypeObject *line_type, const int64_t *group, Py_ssize_t *used) {
    int64_t count = group[3];
    PyObject *ranges = PyTuple_New((Py_ssize_t)count);
    if (ranges == NULL) {
        return NULL;
    }
    for (int64_t i = 0; i < count; i++) {
        PyObject *pair = Py_BuildValue("(LL)", (long long)group[4 + 2 * i], (long long)group[5 + 2 * i]);
        if (pair == NULL) {
            Py_DECREF(ranges);
            return NULL;
        }
        PyTuple_SET_ITEM(ranges, (Py_ssize_t)i, pair);
    }
    *used = 4 + 2 * (Py_ssize_t)count;
    /* line_type is a tuple subclass without instance dict (a NamedTuple): fill its items directly,
       as structseq does, instead of a Python-level __new__ call per line. */
    PyObject *line = line_type->tp_alloc(line_type, 4);
    if (line == NULL) {
        Py_DECREF(ranges);
        return NULL;
    }
    PyObject *a = PyLong_FromLongLong(group[0]);
    PyObject *b = PyLong_FromLongLong(group[1]);
    PyObject *c = PyLong_FromLongLong(group[2]);
    if (a == NULL || b == NULL || c == NULL) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        Py_XDECREF(c);
        Py_DECREF(ranges);
        Py_DECREF(line);
        return NULL;
    }
    PyTuple_SET_ITEM(line, 0, a);
    PyTuple_SET_ITEM(line, 1, b);
    PyTuple_SET_ITEM(line, 2, c);
    PyTuple_SET_ITEM(line, 3, ranges);
    return line;
}

static int parse_needle(PyObject *needle_obj, scan_args *a) {
    if (!PyBytes_Check(needle_obj)) {
        PyErr_SetString(PyExc_TypeError, "needle must be bytes");
        return -1;
    }
    a->needle = (const unsigned char *)PyBytes_AS_STRING(needle_obj);
    a->needle_len = PyBytes_GET_SIZE(needle_obj);
    if (a->needle_len == 0 || memchr(a->needle, '\n', (size_t)a->needle_len) != NULL) {
        PyErr_SetString(PyExc_ValueError, "needle must be non-empty and hold no newline");
        return -1;
    }
    return 0;
}

static PyObject *fastscan_find_literal(PyObject *self, PyObject *args) {
    (void)self;
    scan_args a;
    PyObject *needle_obj;
    int folded, guard;
    Py_ssize_t limit;
    PyTypeObject *line_type;
    if (!PyArg_ParseTuple(args, "y*OppnO!", &a.data, &needle_obj, &folded, &guard, &limit, &PyType_Type,
                          &line_type)) {
        return NULL;
    }
    if (!PyType_IsSubtype(line_type, &PyTuple_Type) || line_type->tp_itemsize != sizeof(PyObject *) ||
        line_type->tp_dictoffset != 0) {
        PyBuffer_Release(&a.data);
        PyErr_SetString(PyExc_TypeError, "line_type must be a tuple subclass without instance dict");
        return NULL;
    }
    if (parse_needle(needle_obj, &a) < 0) {
        PyBuffer_Release(&a.data);
        return NULL;
    }
    i64vec out = {NULL, 0, 0};
    int rc = run_scan(&a, folded, guard, limit, 1, &out);
    PyBuffer_Release(&a.data);
    if (rc != 0) {
        free(out.items);
        if (rc > 0) {
            Py_RETURN_NONE;
        }
        return PyErr_NoMemory();
    }
    PyObject *lines = PyList_New(0);
    if (lines == NULL) {
        free(out.items);
        return NULL;
    }
    for (size_t at = 0; at < out.len;) {
        Py_ssize_t used = 0;
        PyObject *line = new_line(line_type, out.items + at, &used);
        if (line == NULL || PyList_Append(lines, line) < 0) {
            Py_XDECREF(line);
            Py_DECREF(lines);
            free(out.items);
            return NULL;
        }
        Py_DECREF(line);
        at += (size_t)used;
    }
    free(out.items);
    return lines;
}

static PyObject *fastscan_needle_lines(PyObject *self, PyObject *args) {
    (void)self;
    scan_args a;
    PyObject *needle_obj;
    int folded, guard;
    if (!PyArg_ParseTuple(args, "y*Opp", &a.data, &needle_obj, &folded, &guard)) {
        return NULL;
    }
    if (parse_needle(needle_obj, &a) < 0) {
        PyBuffer_Release(&a.data);
        return NULL;
    }
    i64vec out = {NULL, 0, 0};
    int rc = run_scan(&a, folded, guard, -1, 0, &out);
    PyBuffer_Release(&a.data);
    if (rc != 0) {
        free(out.items);
        if (rc > 0) {
            Py_RETURN_NONE;
        }
        return PyErr_NoMemory();
    }
    PyObject *lines = PyList_New((Py_ssize_t)(out.len / 4));
    if (lines == NULL) {
        free(out.items);
        return NULL;
    }
    for (size_t i = 0; i < out.len / 4; i++) {
        const int64_t *g = out.items + 4 * i;
        PyObject *item = Py_BuildValue("(LLL)", (long long)g[0], (long long)g[1], (long long)g[2]);
        if (item == NULL) {
            Py_DECREF(lines);
            free(out.items);
            return NULL;
        }
        PyList_SET_ITEM(lines, (Py_ssize_t)i, item);
    }
    free(out.items);
    return lines;
}

/* literal_counted parses (data, needle, folded, guard), scans with ranges into `out` and
   counts its lines and matches: scan_literal and count_literal share it. Returns 0, 1 when
   `guard` found KELVIN SIGN or LONG S, or -1 with a Python error set. */
static int literal_counted(PyObject *args, i64vec *out, long long *lines, long long *matches) {
    scan_args a;
    PyObject *needle_obj;
    int folded, guard;
    if (!PyArg_ParseTuple(args, "y*Opp", &a.data, &needle_obj, &folded, &guard)) {
        return -1;
    }
    if (parse_needle(needle_obj, &a) < 0) {
        PyBuffer_Release(&a.data);
        return -1;
    }
    int rc = run_scan(&a, folded, guard, -1, 1, out);
    PyBuffer_Release(&a.data);
    if (rc < 0) {
        PyErr_NoMemory();
        return -1;
    }
    *lines = 0;
    *matches = 0;
    for (size_t at = 0; rc == 0 && at + 4 <= out->len;) {
        ++*lines;
        *matches += out->items[at + 3];
        at += 4 + 2 * (size_t)out->items[at + 3];
    }
    return rc;
}

/* packed_groups hands `out` over as (its int64 groups as bytes, lines, matches) and frees it. */
static PyObject *packed_groups(i64vec *out, long long lines, long long matches) {
    PyObject *packed = PyBytes_FromStringAndSize(out->items != NULL ? (const char *)out->items : "",
                                                 (Py_ssize_t)(out->len * sizeof(int64_t)));
    free(out->items);
    out->items = NULL;
    if (packed == NULL) {
        return NULL;
    }
    return Py_BuildValue("(NLL)", packed, lines, matches);
}

static PyObject *fastscan_scan_literal(PyObject *self, PyObject *args) {
    (void)self;
    i64vec out = {NULL, 0, 0};
    long long lines, matches;
    int rc = literal_counted(args, &out, &lines, &matches);
    if (rc != 0) {
        free(out.items);
        if (rc < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    return packed_groups(&out, lines, matches);
}

static PyObject *fastscan_count_literal(PyObject *self, PyObject *args) {
    (void)self;
    i64vec out = {NULL, 0, 0};
    long long lines, matches;
    int rc = literal_counted(args, &out, &lines, &matches);
    free(out.items);
    if (rc != 0) {
        if (rc < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(LL)", lines, matches);
}

/* A growable byte buffer, filled without the GIL. */
typedef struct {
    char *data;
    size_t len;
    size_t cap;
} bytebuf;

static int buf_reserve(bytebuf *b, size_t more) {
    if (b->len + more <= b->cap) {
        return 0;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more) {
        cap *= 2;
    }
    char *grown = realloc(b->data, cap);
    if (grown == NULL) {
        return -1;
    }
    b->data = grown;
    b->cap = cap;
    return 0;
}

static int buf_put(bytebuf *b, const void *src, size_t n) {
    if (buf_reserve(b, n)) {
        return -1;
    }
    memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

static int buf_num(bytebuf *b, long long v) {
    char tmp[24];
    int n = snprintf(tmp, sizeof tmp, "%lld", v);
    return buf_put(b, tmp, (size_t)n);
}

/* buf_json_text appends text as the inside of a JSON string (the input is valid UTF-8: files
   that are not are never indexed, so only quotes, backslashes and control bytes need escaping),
   escaped as serde_json (ripgrep) and Python's json escape them: \t \r \b \f short, any other
   control byte as \u00xx, DEL and non-ASCII as they are. A line never holds its '\n'. */
static int buf_json_text(bytebuf *b, const unsigned char *p, size_t n) {
    static const char hex[] = "0123456789abcdef";
    if (buf_reserve(b, n + 2)) {
        return -1;
    }
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            continue;
        }
        if (buf_put(b, p + run, i - run)) {
            return -1;
        }
        run = i + 1;
        char esc[6] = {'\\', 0, 0, 0, 0, 0};
        size_t len = 2;
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\t': esc[1] = 't'; break;
        case '\r': esc[1] = 'r'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        default:
            esc[1] = 'u'; esc[2] = '0'; esc[3] = '0'; esc[4] = hex[c >> 4]; esc[5] = hex[c & 15];
            len = 6;
        }
        if (buf_put(b, esc, len)) {
            return -1;
        }
    }
    return buf_put(b, p + run, n - run);
}

#include <time.h> /* clock_gettime: the elapsed time of a JSON `end` record */

/* BUF_LIT appends a string literal. */
#define BUF_LIT(b, s) buf_put((b), (s), sizeof(s) - 1)

typedef struct {
    bytebuf out;
    const unsigned char *hay; /* the file's content */
    Py_ssize_t n;             /* its length */
    const unsigned char *path;
    size_t path_len;
    int json;
    long long matched_lines; /* the JSON `end` record's statistics */
    long long matches;
    long long bytes_printed;
    double elapsed;
} render_state;

/* emit_json appends ripgrep's `match` (`ranges` non-NULL) or `context` record for the line
   hay[start:stop]: its text gets the newline back unless it is the file's unterminated last
   line, and a range outside the line is an error (-2) rather than a read past it. */
static int emit_json(render_state *r, long long number, Py_ssize_t start, Py_ssize_t stop, const int64_t *ranges,
                     int64_t range_count) {
    bytebuf *b = &r->out;
    const unsigned char *text = r->hay + start;
    size_t len = (size_t)(stop - start);
    if ((ranges ? BUF_LIT(b, "{\"type\":\"match\",\"data\":{\"path\":{\"text\":")
                : BUF_LIT(b, "{\"type\":\"context\",\"data\":{\"path\":{\"text\":")) ||
        buf_put(b, r->path, r->path_len) || BUF_LIT(b, "},\"lines\":{\"text\":\"") || buf_json_text(b, text, len) ||
        (stop < r->n && BUF_LIT(b, "\\n")) || BUF_LIT(b, "\"},\"line_number\":") || buf_num(b, number) ||
        BUF_LIT(b, ",\"absolute_offset\":") || buf_num(b, start) || BUF_LIT(b, ",\"submatches\":[")) {
        return -1;
    }
    for (int64_t i = 0; ranges && i < range_count; i++) {
        int64_t s = ranges[2 * i], e = ranges[2 * i + 1];
        if (s < 0 || e < s || (size_t)e > len) {
            return -2;
        }
        if ((i && BUF_LIT(b, ",")) || BUF_LIT(b, "{\"match\":{\"text\":\"") ||
            buf_json_text(b, text + s, (size_t)(e - s)) || BUF_LIT(b, "\"},\"start\":") || buf_num(b, s) ||
            BUF_LIT(b, ",\"end\":") || buf_num(b, e) || BUF_LIT(b, "}")) {
            return -1;
        }
    }
    if (ranges) {
        r->matched_lines++;
        r->matches += range_count;
    }
    return BUF_LIT(b, "]}}\n");
}

/* emit_line appends one output line hay[start:stop]: a match (`ranges` non-NULL) or a context line. */
static int emit_line(render_state *r, long long number, Py_ssize_t start, Py_ssize_t stop, const int64_t *ranges,
                     int64_t range_count) {
    if (r->json) {
        return emit_json(r, number, start, stop, ranges, range_count);
    }
    bytebuf *b = &r->out;
    char sep = ranges ? ':' : '-';
    return buf_put(b, r->path, r->path_len) || buf_put(b, &sep, 1) || buf_num(b, number) || buf_put(b, &sep, 1) ||
                   buf_put(b, r->hay + start, (size_t)(stop - start)) || buf_put(b, "\n", 1)
               ? -1
               : 0;
}

static double seconds_since(const struct timespec *from) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - from->tv_sec) + (double)(now.tv_nsec - from->tv_nsec) / 1e9;
}

/* json_end appends ripgrep's `end` record; `elapsed` is written as serde writes a Duration
   and as render.py's _duration does (whole seconds, nanoseconds, and six decimals). */
static int json_end(render_state *r) {
    bytebuf *b = &r->out;
    long long whole = (long long)r->elapsed;
    long long nanos = (long long)((r->elapsed - (double)whole) * 1e9);
    char human[48];
    int human_len = snprintf(human, sizeof human, "%.6fs", r->elapsed);
    return BUF_LIT(b, "{\"type\":\"end\",\"data\":{\"path\":{\"text\":") || buf_put(b, r->path, r->path_len) ||
                   BUF_LIT(b, "},\"binary_offset\":null,\"stats\":{\"elapsed\":{\"secs\":") || buf_num(b, whole) ||
                   BUF_LIT(b, ",\"nanos\":") || buf_num(b, nanos) || BUF_LIT(b, ",\"human\":\"") ||
                   buf_put(b, human, (size_t)human_len) ||
                   BUF_LIT(b, "\"},\"searches\":1,\"searches_with_match\":1,\"bytes_searched\":") || buf_num(b, r->n) ||
                   BUF_LIT(b, ",\"bytes_printed\":") || buf_num(b, r->bytes_printed) ||
                   BUF_LIT(b, ",\"matched_lines\":") || buf_num(b, r->matched_lines) || BUF_LIT(b, ",\"matches\":") ||
                   buf_num(b, r->matches) || BUF_LIT(b, "}}}\n")
               ? -1
               : 0;
}

/* render_file renders the groups into r->out without the GIL: 0, -1 (no memory) or -2 (groups
   that do not describe lines of the data). */
static int render_file(render_state *r, const int64_t *g, size_t count, Py_ssize_t context) {
    const unsigned char *hay = r->hay;
    Py_ssize_t n = r->n;
    struct timespec started;
    clock_gettime(CLOCK_MONOTONIC, &started);
    int rc = 0;
    if (r->json) {
        rc = BUF_LIT(&r->out, "{\"type\":\"begin\",\"data\":{\"path\":{\"text\":") ||
                     buf_put(&r->out, r->path, r->path_len) || BUF_LIT(&r->out, "}}}\n")
                 ? -1
                 : 0;
    }
    long long last_printed = 0; /* line number of the last line written */
    Py_ssize_t last_end = 0;    /* byte offset just past that line's newline */
    for (size_t at = 0; at + 4 <= count && rc == 0;) {
        long long number = g[at];
        Py_ssize_t start = g[at + 1], end = g[at + 2];
        int64_t ranges = g[at + 3];
        if (start < 0 || end < start || end > n || ranges < 0 || at + 4 + 2 * (size_t)ranges > count) {
            rc = -2;
            break;
        }
        const int64_t *pairs = g + at + 4;
        at += 4 + 2 * (size_t)ranges;
        long long next_number = at + 4 <= count ? g[at] : -1;
        /* Context before: up to `context` lines, not re-printing what was written. */
        long long first = number - context;
        if (first <= last_printed) {
            first = last_printed + 1;
        }
        if (first < 1) {
            first = 1;
        }
        if (!r->json && context && last_printed && first > last_printed + 1) {
            rc = buf_put(&r->out, "--\n", 3);
        }
        Py_ssize_t pos = start;
        for (long long k = number - first; k > 0; k--) { /* walk back k lines */
            pos = pos > 0 ? pos - 1 : 0;
            while (pos > 0 && hay[pos - 1] != '\n') {
                pos--;
            }
        }
        for (long long line = first; line < number && rc == 0; line++) {
            const unsigned char *eol = memchr(hay + pos, '\n', (size_t)(start - pos));
            Py_ssize_t stop = eol ? eol - hay : start;
            rc = emit_line(r, line, pos, stop, NULL, 0);
            pos = stop + 1;
        }
        if (rc == 0) {
            rc = emit_line(r, number, start, end, pairs, ranges);
        }
        last_printed = number;
        last_end = end < n ? end + 1 : n;
        /* Context after: stop before the next match's line (it prints itself). */
        for (long long line = number + 1; line <= number + context && rc == 0 && last_end < n; line++) {
            if (next_number > 0 && line >= next_number) {
                break;
            }
            const unsigned char *eol = memchr(hay + last_end, '\n', (size_t)(n - last_end));
            Py_ssize_t stop = eol ? eol - hay : n;
            rc = emit_line(r, line, last_end, stop, NULL, 0);
            last_printed = line;
            last_end = stop < n ? stop + 1 : n;
        }
    }
    if (rc == 0 && r->json) {
        r->bytes_printed = (long long)r->out.len;
        r->elapsed = seconds_since(&started);
        rc = json_end(r);
    }
    return rc;
}

/* render_call parses (data, groups, path[, json], context) and renders; NULL with an exception set on error. */
static PyObject *render_call(PyObject *args, int with_json_flag, render_state *r) {
    Py_buffer data, groups, path;
    int json = 1;
    Py_ssize_t context;
    if (with_json_flag ? !PyArg_ParseTuple(args, "y*y*y*pn", &data, &groups, &path, &json, &context)
                       : !PyArg_ParseTuple(args, "y*y*y*n", &data, &groups, &path, &context)) {
        return NULL;
    }
    memset(r, 0, sizeof *r);
    r->hay = data.buf;
    r->n = data.len;
    r->path = path.buf;
    r->path_len = (size_t)path.len;
    r->json = json;
    int rc;
    Py_BEGIN_ALLOW_THREADS;
    rc = render_file(r, groups.buf, (size_t)groups.len / sizeof(int64_t), context < 0 ? 0 : context);
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&data);
    PyBuffer_Release(&groups);
    PyBuffer_Release(&path);
    if (rc != 0) {
        free(r->out.data);
        if (rc == -2) {
            PyErr_SetString(PyExc_ValueError, "groups do not describe lines of data");
            return NULL;
        }
        return PyErr_NoMemory();
    }
    PyObject *result = PyBytes_FromStringAndSize(r->out.data ? r->out.data : "", (Py_ssize_t)r->out.len);
    free(r->out.data);
    return result;
}

static PyObject *fastscan_render_lines(PyObject *self, PyObject *args) {
    (void)self;
    render_state r;
    return render_call(args, 1, &r);
}

static PyObject *fastscan_render_json(PyObject *self, PyObject *args) {
    (void)self;
    render_state r;
    PyObject *records = render_call(args, 0, &r);
    if (records == NULL) {
        return NULL;
    }
    return Py_BuildValue("(NLLLd)", records, r.matched_lines, r.matches, r.bytes_printed, r.elapsed);
}

/* One bit per trigram id, per thread: threads extract documents in parallel without the GIL. */
static _Thread_local uint8_t *seen_bits;

static PyObject *fastscan_distinct_trigrams(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*", &data)) {
        return NULL;
    }
    Py_ssize_t n = data.len;
    if (n < 3) {
        PyBuffer_Release(&data);
        return PyBytes_FromStringAndSize("", 0);
    }
    /* At most one id per offset and at most TRIGRAM_SPACE distinct ids. */
    size_t cap = (size_t)(n - 2) < TRIGRAM_SPACE ? (size_t)(n - 2) : TRIGRAM_SPACE;
    uint32_t *ids = malloc(cap * sizeof(uint32_t));
    size_t count = 0;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS;
    if (seen_bits == NULL) {
        seen_bits = calloc(TRIGRAM_SPACE / 8, 1);
    }
    if (ids == NULL || seen_bits == NULL) {
        failed = 1;
    } else {
        const unsigned char *p = data.buf;
        uint8_t *seen = seen_bits;
        uint32_t window = ((uint32_t)fold_table[p[0]] << 8) | fold_table[p[1]];
        for (Py_ssize_t i = 2; i < n; i++) {
            window = ((window << 8) | fold_table[p[i]]) & 0xFFFFFFu;
            uint32_t bit = 1u << (window & 7);
            if (seen[window >> 3] & bit) {
                continue;
            }
            if (p[i] == '\n' || p[i - 1] == '\n' || p[i - 2] == '\n') {
                continue;
            }
            seen[window >> 3] |= (uint8_t)bit;
            ids[count++] = window;
        }
        /* Clear only what this document set, so the table is clean for the next one. */
        for (size_t i = 0; i < count; i++) {
            seen[ids[i] >> 3] = 0;
        }
    }
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&data);
    if (failed) {
        free(ids);
        return PyErr_NoMemory();
    }
    PyObject *result = PyBytes_FromStringAndSize((const char *)ids, (Py_ssize_t)(count * sizeof(uint32_t)));
    free(ids);
    return result;
}

static int is_word_byte(unsigned char b) {
    return (b >= '0' && b <= '9') || (b >= 'A' && b <= 'Z') || (b >= 'a' && b <= 'z') || b == '_';
}

/* The same test as rank.is_whole_word on line = data[line_start:line_end]. */
static int whole_word(const unsigned char *line, Py_ssize_t len, Py_ssize_t start, Py_ssize_t end) {
    if (end <= start || start < 0 || end > len) {
        return 0;
    }
    int left_ok = start == 0 || !is_word_byte(line[start - 1]) || !is_word_byte(line[start]);
    int right_ok = end == len || !is_word_byte(line[end]) || !is_word_byte(line[end - 1]);
    return left_ok && right_ok;
}

static PyObject *fastscan_any_whole_word(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data;
    PyObject *lines;
    if (!PyArg_ParseTuple(args, "y*O", &data, &lines)) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(lines, "lines must be a sequence");
    if (seq == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    int found = 0;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n && !found; i++) {
        Py_ssize_t line_start, line_end;
        PyObject *ranges;
        PyObject *line = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(line) || PyTuple_GET_SIZE(line) != 4) {
            PyErr_SetString(PyExc_TypeError, "lines must hold (line_number, start, end, ranges) tuples");
            goto fail;
        }
        line_start = PyLong_AsSsize_t(PyTuple_GET_ITEM(line, 1));
        line_end = PyLong_AsSsize_t(PyTuple_GET_ITEM(line, 2));
        if (PyErr_Occurred()) {
            goto fail;
        }
        if (line_start < 0 || line_end < line_start || line_end > data.len) {
            PyErr_SetString(PyExc_ValueError, "line outside the data");
            goto fail;
        }
        ranges = PyTuple_GET_ITEM(line, 3);
        if (!PyTuple_Check(ranges)) {
            PyErr_SetString(PyExc_TypeError, "ranges must be a tuple");
            goto fail;
        }
        for (Py_ssize_t r = 0; r < PyTuple_GET_SIZE(ranges) && !found; r++) {
            PyObject *pair = PyTuple_GET_ITEM(ranges, r);
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
                PyErr_SetString(PyExc_TypeError, "a range must be a (start, end) tuple");
                goto fail;
            }
            Py_ssize_t start = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 0));
            Py_ssize_t end = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 1));
            if (PyErr_Occurred()) {
                goto fail;
            }
            found = whole_word((const unsigned char *)data.buf + line_start, line_end - line_start, start, end);
        }
    }
    Py_DECREF(seq);
    PyBuffer_Release(&data);
    return PyBool_FromLong(found);
fail:
    Py_DECREF(seq);
    PyBuffer_Release(&data);
    return NULL;
}

/* Per-thread counting table for invert_postings: one int32 per trigram id (64 MiB, zero pages
   until touched), reset through the ids a call touched so it is reused without re-zeroing. */
static _Thread_local int32_t *invert_counts;

static PyObject *fastscan_invert_postings(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *docs;
    if (!PyArg_ParseTuple(args, "O", &docs)) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(docs, "docs must be a sequence of uint32 buffers");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t ndocs = PySequence_Fast_GET_SIZE(seq);
    Py_buffer *views = PyMem_Calloc((size_t)(ndocs > 0 ? ndocs : 1), sizeof(Py_buffer));
    PyObject *result = NULL;
    Py_ssize_t held = 0;
    size_t pairs = 0;
    if (views == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (; held < ndocs; held++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, held), &views[held], PyBUF_C_CONTIGUOUS) < 0) {
            goto done;
        }
        if (views[held].len % 4 != 0) {
            PyBuffer_Release(&views[held]);
            PyErr_SetString(PyExc_ValueError, "a document's ids must be uint32");
            goto done;
        }
        pairs += (size_t)views[held].len / 4;
    }
    if (ndocs > INT32_MAX || pairs > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "too many documents or pairs for int32 counting");
        goto done;
    }
    uint32_t *present = NULL;
    int64_t *starts = NULL;
    uint32_t *ordinals = malloc((pairs ? pairs : 1) * sizeof(uint32_t));
    size_t distinct = 0;
    int failed = ordinals == NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (!failed && invert_counts == NULL) {
        invert_counts = calloc(TRIGRAM_SPACE, sizeof(int32_t));
    }
    if (!failed && invert_counts != NULL) {
        int32_t *counts = invert_counts;
        /* Counting: ids are distinct within a document and below 2^24 (checked here). */
        for (Py_ssize_t d = 0; d < ndocs && !failed; d++) {
            const uint32_t *ids = views[d].buf;
            size_t n = (size_t)views[d].len / 4;
            for (size_t i = 0; i < n; i++) {
                if (ids[i] >= TRIGRAM_SPACE) {
                    failed = 2;
                    break;
                }
                if (counts[ids[i]]++ == 0) {
                    distinct++;
                }
            }
        }
        if (!failed) {
            present = malloc((distinct ? distinct : 1) * sizeof(uint32_t));
            starts = malloc((distinct + 1) * sizeof(int64_t));
            failed = present == NULL || starts == NULL;
        }
        if (!failed) {
            /* Ascending ids with their run starts; counts become each run's write cursor. */
            size_t k = 0;
            int64_t at = 0;
            for (uint32_t id = 0; id < TRIGRAM_SPACE && k < distinct; id++) {
                int32_t c = counts[id];
                if (c == 0) {
                    continue;
                }
                present[k] = id;
                starts[k++] = at;
                counts[id] = (int32_t)at;
                at += c;
            }
            starts[distinct] = at;
            for (Py_ssize_t d = 0; d < ndocs; d++) {
                const uint32_t *ids = views[d].buf;
                size_t n = (size_t)views[d].len / 4;
                for (size_t i = 0; i < n; i++) {
                    ordinals[counts[ids[i]]++] = (uint32_t)d;
                }
            }
        }
        /* Leave the table zeroed for the next call, whatever happened above. */
        for (Py_ssize_t d = 0; d < ndocs; d++) {
            const uint32_t *ids = views[d].buf;
            size_t n = (size_t)views[d].len / 4;
            for (size_t i = 0; i < n; i++) {
                if (ids[i] < TRIGRAM_SPACE) {
                    counts[ids[i]] = 0;
                }
            }
        }
    } else {
        failed = 1;
    }
    Py_END_ALLOW_THREADS;
    if (failed == 2) {
        PyErr_SetString(PyExc_ValueError, "trigram id out of range");
    } else if (failed) {
        PyErr_NoMemory();
    } else {
        result = Py_BuildValue("(y#y#y#)", (const char *)present, (Py_ssize_t)(distinct * sizeof(uint32_t)),
                               (const char *)starts, (Py_ssize_t)((distinct + 1) * sizeof(int64_t)),
                               (const char *)ordinals, (Py_ssize_t)(pairs * sizeof(uint32_t)));
    }
    free(present);
    free(starts);
    free(ordinals);
done:
    for (Py_ssize_t d = 0; d < held; d++) {
        PyBuffer_Release(&views[d]);
    }
    PyMem_Free(views);
    Py_DECREF(seq);
    return result;
}

/* ---- Regexes: RE2 through _re2shim.cc, whole files at a time ----
 *
 *   regex_compile(pattern, case_sensitive, literal, run_set=None, run_len=0) -> capsule
 *       RE2 compiled with verify.compile_regex's options (`pattern` already wrapped by it);
 *       ValueError with RE2's message when RE2 rejects it. `run_set` (256 flag bytes, no
 *       newline) and `run_len` describe a run every match holds: run_len bytes in a row, each
 *       flagged (verify.class_run). The whole-buffer scans below then give RE2 only the lines
 *       holding such a run, found by find_run.
 *   regex_scan(regex, data, lines, limit) -> tuple[bytes, int, int]
 *       verify.LineMatcher's regex strategy natively: every matching line in the groups
 *       layout (see scan_literal), with the counts of lines and matches; at most `limit`
 *       lines when limit > 0. `lines` None scans the whole buffer (one RE2 call per
 *       matching line to find it, then one per further match in the line; with a run, one
 *       per line holding it); otherwise it lists the (line_number, line_start, line_end)
 *       lines to try (a prefilter's).
 *   regex_count(regex, data, lines) -> int
 *       The number of matching lines, one RE2 call per matching (or listed) line.
 *   regex_scan_needle(regex, data, needle, folded, guard, limit) -> tuple[bytes, int, int] | None
 *   regex_count_needle(regex, data, needle, folded, guard) -> int | None
 *       regex_scan and regex_count over the lines holding `needle`, a literal every match
 *       contains (found as find_literal finds it: find_needle, on the folded copy when `folded`),
 *       in one pass: no list of lines crosses into Python, and RE2 reads only those lines.
 *       None when `guard` finds KELVIN SIGN or LONG S (scan the whole buffer instead).
 *
 * Matches never span a newline (RE2's never_nl), `^`/`$` are multi-line, and within a line
 * matches are leftmost-first and non-overlapping with an empty match abutting the previous
 * one skipped, exactly as verify.py's Python loops did.
 */
void *kdb_re2_new(const char *pattern, size_t len, int case_sensitive, int literal, char *error,
                  size_t error_cap);
void kdb_re2_free(void *re);
int kdb_re2_match(const void *re, const char *data, size_t len, size_t pos, size_t endpos, size_t *start,
                  size_t *end);
int kdb_re2_test(const void *re, const char *data, size_t len, size_t pos, size_t endpos);

#define REGEX_CAPSULE "kotadb._fastscan.regex"

/* A compiled regex: RE2, and optionally a run every match holds (run_len bytes in a row, each
 * of run_set; verify.py's class_run), which whole-buffer scans use to find the lines worth
 * giving RE2. */
typedef struct {
    void *re;
    size_t run_len; /* 0: no run */
    unsigned char run_set[256];
} kdb_regex;

static void regex_capsule_free(PyObject *capsule) {
    kdb_regex *rx = PyCapsule_GetPointer(capsule, REGEX_CAPSULE);
    if (rx != NULL) {
        kdb_re2_free(rx->re);
        PyMem_Free(rx);
    }
}

static const kdb_regex *regex_of(PyObject *capsule) {
    return PyCapsule_GetPointer(capsule, REGEX_CAPSULE);
}

static PyObject *fastscan_regex_compile(PyObject *self, PyObject *args) {
    (void)self;
    const char *pattern;
    Py_ssize_t len, run_len = 0;
    int case_sensitive, literal;
    PyObject *run_set = Py_None;
    if (!PyArg_ParseTuple(args, "y#pp|On", &pattern, &len, &case_sensitive, &literal, &run_set, &run_len)) {
        return NULL;
    }
    if (run_set != Py_None) {
        if (!PyBytes_Check(run_set) || PyBytes_GET_SIZE(run_set) != 256 || run_len < 1) {
            PyErr_SetString(PyExc_ValueError, "a run is 256 bytes of flags and a length of at least 1");
            return NULL;
        }
        if (PyBytes_AS_STRING(run_set)['\n']) {
            PyErr_SetString(PyExc_ValueError, "a run cannot hold a newline (matches never span one)");
            return NULL;
        }
    }
    kdb_regex *rx = PyMem_Calloc(1, sizeof *rx);
    if (rx == NULL) {
        return PyErr_NoMemory();
    }
    if (run_set != Py_None) {
        const unsigned char *flags = (const unsigned char *)PyBytes_AS_STRING(run_set);
        for (int b = 0; b < 256; b++) {
            rx->run_set[b] = flags[b] != 0;
        }
        rx->run_len = (size_t)run_len;
    }
    char error[512] = {0};
    Py_BEGIN_ALLOW_THREADS;
    rx->re = kdb_re2_new(pattern, (size_t)len, case_sensitive, literal, error, sizeof error);
    Py_END_ALLOW_THREADS;
    if (rx->re == NULL) {
        PyMem_Free(rx);
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    PyObject *capsule = PyCapsule_New(rx, REGEX_CAPSULE, regex_capsule_free);
    if (capsule == NULL) {
        kdb_re2_free(rx->re);
        PyMem_Free(rx);
    }
    return capsule;
}

/* line_ranges appends the (start, end) pairs, relative to `start`, of every match within
   data[start:end] (one line), given the first match when have_first; returns how many, or
   -1 when memory ran out. */
static Py_ssize_t line_ranges(const void *re, const char *data, size_t len, size_t start, size_t end,
                              int have_first, size_t s, size_t e, i64vec *out) {
    Py_ssize_t n = 0;
    long long last_end = -1;
    int found = have_first ? 1 : kdb_re2_match(re, data, len, start, end, &s, &e);
    while (found) {
        size_t pos;
        if (s == e && (long long)s == last_end) {
            pos = s + 1; /* Rust's find_iter (ripgrep) skips an empty match abutting the last */
        } else {
            if (vec_push(out, (int64_t)(s - start)) < 0 || vec_push(out, (int64_t)(e - start)) < 0) {
                return -1;
            }
            n++;
            if (e == end && e > s) {
                break; /* only an empty match abutting this one could follow */
            }
            last_end = (long long)e;
            pos = e > s ? e : e + 1;
        }
        if (pos > end) {
            break;
        }
        found = kdb_re2_match(re, data, len, pos, end, &s, &e);
    }
    return n;
}

typedef struct {
    const void *re;
    const unsigned char *run_set; /* with run_len > 0, a run every match holds (kdb_regex) */
    size_t run_len;
    const char *data;
    size_t len;
    const int64_t *lines; /* (line_number, start, end) triples, or NULL for the whole buffer */
    size_t line_count;
    Py_ssize_t limit;
    int count_only;
    long long found_lines;
    long long found_matches;
} regex_scan_args;

static int push_header(i64vec *out, long long number, size_t start, size_t end) {
    return vec_push(out, number) < 0 || vec_push(out, (int64_t)start) < 0 || vec_push(out, (int64_t)end) < 0 ||
                   vec_push(out, 0) < 0
               ? -1
               : 0;
}

/* A line filter: the lines holding `needle` (m bytes), or with `set`, a run of m bytes of it. */
typedef struct {
    const unsigned char *needle;
    const unsigned char *set;
    size_t m;
} line_filter;

static int regex_scan_filtered(regex_scan_args *a, const unsigned char *hay, const line_filter *f, i64vec *out);

/* regex_scan_whole finds the matching lines of the whole buffer (verify's _find_regex); with
   a run, only the lines holding one are given to RE2 (regex_scan_filtered). */
static int regex_scan_whole(regex_scan_args *a, i64vec *out) {
    if (a->run_len > 0) {
        line_filter run = {.needle = NULL, .set = a->run_set, .m = a->run_len};
        return regex_scan_filtered(a, (const unsigned char *)a->data, &run, out);
    }
    const char *data = a->data;
    size_t len = a->len;
    int no_last_line = len == 0 || data[len - 1] == '\n';
    long long line_number = 1;
    size_t counted = 0, pos = 0;
    while (pos <= len) {
        size_t s, e;
        if (!kdb_re2_match(a->re, data, len, pos, len, &s, &e) || (s == len && no_last_line)) {
            break;
        }
        const char *next = s < len ? memchr(data + s, '\n', len - s) : NULL;
        size_t end = next != NULL ? (size_t)(next - data) : len;
        a->found_lines++;
        if (!a->count_only) {
            const char *before = s > 0 ? memrchr(data, '\n', s) : NULL;
            size_t start = before != NULL ? (size_t)(before - data) + 1 : 0;
            line_number += count_newlines((const unsigned char *)data + counted, (Py_ssize_t)(start - counted));
            counted = start;
            size_t header = out->len;
            if (push_header(out, line_number, start, end) < 0) {
                return -1;
            }
            Py_ssize_t n = line_ranges(a->re, data, len, start, end, 1, s, e, out);
            if (n < 0) {
                return -1;
            }
            out->items[header + 3] = n;
            a->found_matches += n;
            if (a->found_lines == a->limit) {
                break;
            }
        }
        if (next == NULL) {
            break;
        }
        pos = end + 1;
    }
    return 0;
}

/* regex_scan_listed tries only the listed lines (verify's _find_prefiltered). */
static int regex_scan_listed(regex_scan_args *a, i64vec *out) {
    for (size_t i = 0; i < a->line_count; i++) {
        const int64_t *line = a->lines + 3 * i;
        size_t start = (size_t)line[1], end = (size_t)line[2];
        if (a->count_only) {
            a->found_lines += kdb_re2_test(a->re, a->data, a->len, start, end);
            continue;
        }
        size_t header = out->len;
        if (push_header(out, line[0], start, end) < 0) {
            return -1;
        }
        Py_ssize_t n = line_ranges(a->re, a->data, a->len, start, end, 0, 0, 0, out);
        if (n < 0) {
            return -1;
        }
        if (n == 0) {
            out->len = header;
            continue;
        }
        out->items[header + 3] = n;
        a->found_lines++;
        a->found_matches += n;
        if (a->found_lines == a->limit) {
            break;
        }
    }
    return 0;
}

/* regex_scan_filtered runs RE2 only on the lines the filter finds: those holding the needle
   (found with find_needle in `hay`: data itself, or its folded copy, which has the same
   newlines), or a run of the set (find_run). Every match lies in one line and holds every
   required literal and run, so no other line can match. */
static int regex_scan_filtered(regex_scan_args *a, const unsigned char *hay, const line_filter *f, i64vec *out) {
    const char *data = a->data;
    size_t len = a->len;
    size_t m = f->m;
    long long line_number = 1;
    size_t counted = 0, pos = 0; /* pos is always the start of a line */
    while (pos + m <= len) {
        const unsigned char *hit = f->set != NULL ? find_run(hay + pos, len - pos, f->set, m)
                                                  : find_needle(hay + pos, len - pos, f->needle, m);
        if (hit == NULL) {
            break;
        }
        size_t at = (size_t)(hit - hay);
        const unsigned char *before = at > pos ? memrchr(hay + pos, '\n', at - pos) : NULL;
        size_t start = before != NULL ? (size_t)(before - hay) + 1 : pos;
        const unsigned char *eol = memchr(hay + at, '\n', len - at);
        size_t end = eol != NULL ? (size_t)(eol - hay) : len;
        if (a->count_only) {
            a->found_lines += kdb_re2_test(a->re, data, len, start, end);
        } else {
            line_number += count_newlines(hay + counted, (Py_ssize_t)(start - counted));
            counted = start;
            size_t header = out->len;
            if (push_header(out, line_number, start, end) < 0) {
                return -1;
            }
            Py_ssize_t n = line_ranges(a->re, data, len, start, end, 0, 0, 0, out);
            if (n < 0) {
                return -1;
            }
            if (n == 0) {
                out->len = header;
            } else {
                out->items[header + 3] = n;
                a->found_lines++;
                a->found_matches += n;
                if (a->found_lines == a->limit) {
                    break;
                }
            }
        }
        if (eol == NULL) {
            break;
        }
        pos = end + 1;
    }
    return 0;
}

/* run_needle_regex parses (regex, data, needle, folded, guard) and scans the needle's lines
   without the GIL: 0 on success, 1 when `guard` found KELVIN SIGN or LONG S (the caller
   scans the whole buffer instead), -1 with a Python error set. */
static int run_needle_regex(PyObject *regex, Py_buffer *data, PyObject *needle_obj, int folded, int guard,
                            regex_scan_args *a, i64vec *out) {
    scan_args n;
    const kdb_regex *rx = regex_of(regex);
    if (rx == NULL || parse_needle(needle_obj, &n) < 0) {
        return -1;
    }
    a->re = rx->re;
    a->run_set = rx->run_set;
    a->run_len = rx->run_len; /* used when the guard sends the scan to the whole buffer */
    a->data = (const char *)data->buf;
    a->len = (size_t)data->len;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS;
    const unsigned char *hay = data->buf;
    int unsafe = 0;
    if (folded) {
        hay = folded_copy(hay, data->len, guard, &unsafe);
    }
    if (hay == NULL) {
        rc = -1;
    } else if (guard && unsafe) {
        rc = 1;
    } else {
        line_filter needle = {.needle = n.needle, .set = NULL, .m = (size_t)n.needle_len};
        rc = regex_scan_filtered(a, hay, &needle, out);
    }
    Py_END_ALLOW_THREADS;
    if (rc < 0) {
        PyErr_NoMemory();
    }
    return rc;
}

static PyObject *fastscan_regex_scan_needle(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *regex, *needle;
    Py_buffer data;
    int folded, guard;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "Oy*Oppn", &regex, &data, &needle, &folded, &guard, &limit)) {
        return NULL;
    }
    regex_scan_args a = {.limit = limit, .count_only = 0};
    i64vec out = {NULL, 0, 0};
    int rc = run_needle_regex(regex, &data, needle, folded, guard, &a, &out);
    PyBuffer_Release(&data);
    if (rc != 0) {
        free(out.items);
        if (rc < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    return packed_groups(&out, a.found_lines, a.found_matches);
}

static PyObject *fastscan_regex_count_needle(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *regex, *needle;
    Py_buffer data;
    int folded, guard;
    if (!PyArg_ParseTuple(args, "Oy*Opp", &regex, &data, &needle, &folded, &guard)) {
        return NULL;
    }
    regex_scan_args a = {.limit = -1, .count_only = 1};
    i64vec out = {NULL, 0, 0};
    int rc = run_needle_regex(regex, &data, needle, folded, guard, &a, &out);
    PyBuffer_Release(&data);
    free(out.items);
    if (rc != 0) {
        if (rc < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    return PyLong_FromLongLong(a.found_lines);
}

/* run_regex parses (regex, data, lines) and runs the scan without the GIL; 0 on success, -1
   with a Python error set. */
static int run_regex(PyObject *regex, Py_buffer *data, PyObject *lines, regex_scan_args *a, i64vec *out) {
    const kdb_regex *rx = regex_of(regex);
    if (rx == NULL) {
        return -1;
    }
    a->re = rx->re;
    a->run_set = rx->run_set;
    a->run_len = rx->run_len;
    a->data = (const char *)data->buf;
    a->len = (size_t)data->len;
    a->lines = NULL;
    a->line_count = 0;
    int64_t *triples = NULL;
    if (lines != Py_None) {
        PyObject *seq = PySequence_Fast(lines, "lines must be a sequence of (line_number, start, end)");
        if (seq == NULL) {
            return -1;
        }
        Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
        triples = PyMem_Malloc(sizeof(int64_t) * 3 * (size_t)(count > 0 ? count : 1));
        if (triples == NULL) {
            Py_DECREF(seq);
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < count; i++) {
            long long number, start, end;
            PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
            if (!PyArg_ParseTuple(item, "LLL", &number, &start, &end)) {
                Py_DECREF(seq);
                PyMem_Free(triples);
                return -1;
            }
            if (start < 0 || end < start || (size_t)end > a->len) {
                Py_DECREF(seq);
                PyMem_Free(triples);
                PyErr_SetString(PyExc_ValueError, "a listed line lies outside the data");
                return -1;
            }
            triples[3 * i] = number;
            triples[3 * i + 1] = start;
            triples[3 * i + 2] = end;
        }
        Py_DECREF(seq);
        a->lines = triples;
        a->line_count = (size_t)count;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS;
    rc = triples != NULL ? regex_scan_listed(a, out) : regex_scan_whole(a, out);
    Py_END_ALLOW_THREADS;
    PyMem_Free(triples);
    if (rc < 0) {
        PyErr_NoMemory();
    }
    return rc;
}

static PyObject *fastscan_regex_scan(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *regex, *lines;
    Py_buffer data;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "Oy*On", &regex, &data, &lines, &limit)) {
        return NULL;
    }
    regex_scan_args a = {.limit = limit, .count_only = 0};
    i64vec out = {NULL, 0, 0};
    int rc = run_regex(regex, &data, lines, &a, &out);
    PyBuffer_Release(&data);
    if (rc < 0) {
        free(out.items);
        return NULL;
    }
    return packed_groups(&out, a.found_lines, a.found_matches);
}

static PyObject *fastscan_regex_count(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *regex, *lines;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "Oy*O", &regex, &data, &lines)) {
        return NULL;
    }
    regex_scan_args a = {.limit = -1, .count_only = 1};
    i64vec out = {NULL, 0, 0};
    int rc = run_regex(regex, &data, lines, &a, &out);
    PyBuffer_Release(&data);
    free(out.items);
    if (rc < 0) {
        return NULL;
    }
    return PyLong_FromLongLong(a.found_lines);
}

/* ---- crc32: zlib's CRC-32, folded with carry-less multiplication where the CPU has it ----
 *
 *   crc32(data, value=0) -> int
 *       zlib.crc32(data, value), the same number: the index's lazy checksum blocks are
 *       verified on the query path, and zlib's table-driven loop (~1.3 GB/s here) was the
 *       largest cost of a fresh process's regex scan (690 ms of a 2 s `0x[0-9a-f]{8}` count).
 *
 * With PCLMULQDQ (checked once at run time) the buffer is folded 64 bytes at a time into
 * four 128-bit lanes, the lanes into one, then reduced to 32 bits (Barrett). The constants
 * are x^k mod P(x) for the reflected polynomial 0xEDB88320, the ones Intel's paper "Fast CRC
 * Computation for Generic Polynomials Using PCLMULQDQ" derives; tests compare with zlib.
 */
#include <zlib.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_CLMUL_CRC 1

__attribute__((target("pclmul,sse4.1"))) static uint32_t crc32_clmul(uint32_t crc, const unsigned char *p,
                                                                       size_t len) {
    /* len >= 64 and a multiple of 16; crc is the raw (not inverted) register. */
    const __m128i k1k2 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
    const __m128i k3k4 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
    const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x1f7011641LL, 0x1db710641LL);
    const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
    __m128i x1 = _mm_loadu_si128((const __m128i *)p);
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x4 = _mm_loadu_si128((const __m128i *)(p + 48));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)crc));
    p += 64;
    len -= 64;
#define FOLD(x, k, next)                                                                           \
    do {                                                                                           \
        __m128i lo_ = _mm_clmulepi64_si128((x), (k), 0x00);                                        \
        (x) = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128((x), (k), 0x11), lo_), (next));     \
    } while (0)
    while (len >= 64) {
        FOLD(x1, k1k2, _mm_loadu_si128((const __m128i *)p));
        FOLD(x2, k1k2, _mm_loadu_si128((const __m128i *)(p + 16)));
        FOLD(x3, k1k2, _mm_loadu_si128((const __m128i *)(p + 32)));
        FOLD(x4, k1k2, _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        len -= 64;
    }
    FOLD(x1, k3k4, x2);
    FOLD(x1, k3k4, x3);
    FOLD(x1, k3k4, x4);
    while (len >= 16) {
        FOLD(x1, k3k4, _mm_loadu_si128((const __m128i *)p));
        p += 16;
        len -= 16;
    }
#undef FOLD
    /* 128 -> 64 bits (appending 32 zero bits), 64 -> 32, then Barrett reduction. */
    x2 = _mm_clmulepi64_si128(x1, k3k4, 0x10);
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), x2);
    x2 = _mm_srli_si128(x1, 4);
    x1 = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, mask32), k5, 0x00), x2);
    x2 = x1;
    x1 = _mm_clmulepi64_si128(_mm_and_si128(x1, mask32), poly, 0x10);
    x1 = _mm_clmulepi64_si128(_mm_and_si128(x1, mask32), poly, 0x00);
    return (uint32_t)_mm_extract_epi32(_mm_xor_si128(x1, x2), 1);
}
#endif

static int clmul_usable = -1;

/* crc32_of is zlib's crc32(value, data, n). */
static uint32_t crc32_of(uint32_t value, const unsigned char *data, size_t n) {
#ifdef HAVE_CLMUL_CRC
    if (clmul_usable && n >= 64) {
        size_t body = n & ~(size_t)15;
        uint32_t raw = crc32_clmul(~value, data, body);
        value = ~raw;
        data += body;
        n -= body;
    }
#endif
    /* zlib's crc32 takes a uInt length; feed it in pieces. */
    while (n > 0) {
        uInt piece = n > (1u << 30) ? (1u << 30) : (uInt)n;
        value = (uint32_t)crc32(value, data, piece);
        data += piece;
        n -= piece;
    }
    return value;
}

static PyObject *fastscan_crc32(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data;
    unsigned long value = 0;
    if (!PyArg_ParseTuple(args, "y*|k", &data, &value)) {
        return NULL;
    }
    uint32_t crc;
    if (data.len >= 4096) {
        Py_BEGIN_ALLOW_THREADS;
        crc = crc32_of((uint32_t)value, data.buf, (size_t)data.len);
        Py_END_ALLOW_THREADS;
    } else {
        crc = crc32_of((uint32_t)value, data.buf, (size_t)data.len);
    }
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(crc);
}

static PyObject *fastscan_crc32_accelerated(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(clmul_usable > 0);
}

/* ---- batches: one call per segment for a count over many documents ----
 *
 *   record_spans(table, ordinals, table_start, record_size, base, limit, offset_at, size_at, size_bytes)
 *       -> bytes
 *       For each ordinal (uint32 or int64: ordinals_buffer) the record at table_start +
 *       record_size * ordinal of `table` holds a little-endian u64 offset at byte offset_at
 *       and a size (u32 or u64 by size_bytes) at size_at; the result holds (base + offset,
 *       base + offset + size) per ordinal as int64 pairs. IndexError when a record lies outside `table`, ValueError
 *       when a span ends past `limit`.
 *   split_strings(data, spans, fields, keep) -> list[tuple[str, ...]]
 *       Each span of `data` decoded as UTF-8 (strictly) and split at NUL into exactly
 *       `fields` strings, of which the first `keep` are returned; ValueError otherwise.
 *   verify_blocks(data, spans, block_size, verified, sums) -> int
 *       Checks, once, every block_size block of `data` that an int64 (start, end) span of
 *       `spans` covers: a block whose byte in `verified` (writable) is 0 is checksummed
 *       (crc32 of the block, the last one short) against its uint32 in `sums`, then marked 1.
 *       Returns -1, or the first block that failed (not marked; the blocks checked before it
 *       stay marked). ValueError when a span lies outside `data` or the tables are short.
 *   count_spans(regex, needle, pure, folded, guard, data, spans) -> bytes
 *       The matching lines of each span of `data`, as int64 counts, exactly as verify.py's
 *       LineMatcher.count answers for the span alone: `needle` None counts with RE2
 *       (regex_count); with `pure`, the lines holding the needle (count_literal); otherwise
 *       RE2 over the needle's lines (regex_count_needle); with `folded` and `guard`, a span
 *       holding KELVIN SIGN or LONG S is counted with RE2 instead, as those fall back.
 *
 * A stream that only counts calls these per segment instead of a few Python calls per
 * candidate (37,000 candidates of `^#include <linux/[a-z_]+\.h>$` on Linux); the loops run
 * without the GIL.
 */

static int int64_buffer(PyObject *obj, Py_buffer *view, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0) {
        return -1;
    }
    if (view->len % (Py_ssize_t)sizeof(int64_t) != 0) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "%s must be a buffer of int64 values", what);
        return -1;
    }
    return 0;
}

static uint64_t read_le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) {
        v = (v << 8) | p[i];
    }
    return v;
}

/* records_done releases a record reader's buffers and returns `out`, or NULL with `error` set. */
static PyObject *records_done(Py_buffer *table, Py_buffer *ords, PyObject *out, PyObject *kind, const char *error) {
    PyBuffer_Release(table);
    PyBuffer_Release(ords);
    if (error != NULL) {
        Py_XDECREF(out);
        PyErr_SetString(kind, error);
        return NULL;
    }
    return out;
}

/* ordinals_buffer takes a record reader's ordinals: an array of uint32 ('I', as a roaring
 * bitmap's to_array() gives them, used without a copy) or int64 values (a 'q' array, or bytes);
 * *wide says which. TypeError otherwise. */
static int ordinals_buffer(PyObject *obj, Py_buffer *view, int *wide) {
    if (PyObject_GetBuffer(obj, view, PyBUF_FORMAT) < 0) {
        return -1;
    }
    const char *format = view->format == NULL ? "B" : view->format;
    if (view->itemsize == 4 && (strcmp(format, "I") == 0 || strcmp(format, "L") == 0)) {
        *wide = 0;
        return 0;
    }
    if ((view->itemsize == 8 && (strcmp(format, "q") == 0 || strcmp(format, "l") == 0)) ||
        (view->itemsize == 1 && view->len % 8 == 0)) {
        *wide = 1;
        return 0;
    }
    PyBuffer_Release(view);
    PyErr_SetString(PyExc_TypeError, "ordinals must be an array of int64 or uint32");
    return -1;
}

static int64_t ordinal_at(const Py_buffer *view, int wide, Py_ssize_t i) {
    return wide ? ((const int64_t *)view->buf)[i] : (int64_t)((const uint32_t *)view->buf)[i];
}

/* records_open takes a record reader's ordinals (ordinals_buffer) and counts them; on failure
 * it releases `table` too. */
static int records_open(Py_buffer *table, PyObject *ords_obj, Py_buffer *ords, int *wide, Py_ssize_t *n) {
    if (ordinals_buffer(ords_obj, ords, wide) < 0) {
        PyBuffer_Release(table);
        return -1;
    }
    *n = ords->len / (*wide ? 8 : 4);
    return 0;
}

static PyObject *fastscan_record_spans(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer table, ords;
    PyObject *ords_obj;
    Py_ssize_t table_start, record_size, base, limit, offset_at, size_at, size_bytes;
    if (!PyArg_ParseTuple(args, "y*Onnnnnnn", &table, &ords_obj, &table_start, &record_size, &base, &limit,
                          &offset_at, &size_at, &size_bytes)) {
        return NULL;
    }
    int wide;
    Py_ssize_t n;
    if (records_open(&table, ords_obj, &ords, &wide, &n) < 0) {
        return NULL;
    }
    PyObject *out = NULL;
    const char *error = NULL;
    PyObject *kind = PyExc_ValueError;
    if (table_start < 0 || table_start > table.len || base < 0 || limit < base || (size_bytes != 4 && size_bytes != 8) ||
        offset_at < 0 || size_at < 0 || offset_at + 8 > record_size || size_at + size_bytes > record_size) {
        error = "invalid table layout";
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, 2 * n * (Py_ssize_t)sizeof(int64_t));
    if (out == NULL) {
        goto done;
    }
    int64_t *spans = (int64_t *)PyBytes_AS_STRING(out);
    const unsigned char *rows = table.buf;
    uint64_t room = (uint64_t)(limit - base);
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t ordinal = ordinal_at(&ords, wide, i);
        if (ordinal < 0 || ordinal >= (table.len - table_start) / record_size) {
            error = "a record lies outside the table";
            kind = PyExc_IndexError;
            break;
        }
        const unsigned char *row = rows + table_start + ordinal * record_size;
        uint64_t offset = read_le64(row + offset_at);
        uint64_t size = size_bytes == 8 ? read_le64(row + size_at)
                                        : (uint64_t)row[size_at] | (uint64_t)row[size_at + 1] << 8 |
                                              (uint64_t)row[size_at + 2] << 16 | (uint64_t)row[size_at + 3] << 24;
        if (offset > room || size > room - offset) {
            error = "a span ends past the limit";
            break;
        }
        spans[2 * i] = base + (int64_t)offset;
        spans[2 * i + 1] = base + (int64_t)(offset + size);
    }
done:
    return records_done(&table, &ords, out, kind, error);
}

static PyObject *fastscan_split_strings(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data, spans_view;
    PyObject *spans_obj;
    Py_ssize_t fields, keep;
    if (!PyArg_ParseTuple(args, "y*Onn", &data, &spans_obj, &fields, &keep)) {
        return NULL;
    }
    if (int64_buffer(spans_obj, &spans_view, "spans") < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    const int64_t *spans = spans_view.buf;
    Py_ssize_t n = spans_view.len / (Py_ssize_t)(2 * sizeof(int64_t));
    PyObject *out = NULL;
    if (fields < 1 || keep < 0 || keep > fields) {
        PyErr_SetString(PyExc_ValueError, "invalid field counts");
        goto done;
    }
    out = PyList_New(n);
    if (out == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t start = spans[2 * i], end = spans[2 * i + 1];
        if (start < 0 || end < start || end > data.len) {
            PyErr_SetString(PyExc_ValueError, "a span lies outside the data");
            Py_CLEAR(out);
            goto done;
        }
        PyObject *row = PyTuple_New(keep);
        if (row == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, row);
        const char *p = (const char *)data.buf + start, *stop = (const char *)data.buf + end;
        Py_ssize_t field = 0;
        for (;;) {
            const char *nul = memchr(p, '\0', (size_t)(stop - p));
            const char *piece_end = nul != NULL ? nul : stop;
            /* Every field is decoded, kept or not: bytes.decode() checks the whole record. */
            PyObject *text = PyUnicode_DecodeUTF8(p, piece_end - p, NULL);
            if (text == NULL) {
                Py_CLEAR(out);
                goto done;
            }
            if (field < keep) {
                PyTuple_SET_ITEM(row, field, text);
            } else {
                Py_DECREF(text);
            }
            field++;
            if (nul == NULL || field > fields) {
                break;
            }
            p = nul + 1;
        }
        if (field != fields) {
            PyErr_SetString(PyExc_ValueError, "a span does not hold the expected number of strings");
            Py_CLEAR(out);
            goto done;
        }
    }
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&spans_view);
    return out;
}

static PyObject *fastscan_verify_blocks(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data, spans_view, verified, sums;
    PyObject *spans_obj;
    Py_ssize_t block_size;
    if (!PyArg_ParseTuple(args, "y*Onw*y*", &data, &spans_obj, &block_size, &verified, &sums)) {
        return NULL;
    }
    if (int64_buffer(spans_obj, &spans_view, "spans") < 0) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&verified);
        PyBuffer_Release(&sums);
        return NULL;
    }
    const char *error = NULL;
    Py_ssize_t nblocks = block_size > 0 ? (data.len + block_size - 1) / block_size : 0;
    const int64_t *spans = spans_view.buf;
    Py_ssize_t n = spans_view.len / (Py_ssize_t)(2 * sizeof(int64_t));
    if (block_size <= 0 || spans_view.len % (Py_ssize_t)(2 * sizeof(int64_t)) != 0) {
        error = "spans must be (start, end) pairs and block_size positive";
    } else if (verified.len < nblocks || sums.len < nblocks * (Py_ssize_t)sizeof(uint32_t)) {
        error = "the block tables are shorter than the data's blocks";
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (spans[2 * i] < 0 || spans[2 * i + 1] < spans[2 * i] || spans[2 * i + 1] > data.len) {
                error = "a span lies outside the data";
                break;
            }
        }
    }
    long long failed = -1;
    if (error == NULL) {
        unsigned char *marks = verified.buf;
        const unsigned char *bytes = data.buf;
        const unsigned char *raw_sums = sums.buf;
        Py_BEGIN_ALLOW_THREADS;
        for (Py_ssize_t i = 0; i < n && failed < 0; i++) {
            int64_t start = spans[2 * i], end = spans[2 * i + 1];
            if (end == start) {
                continue;
            }
            for (int64_t block = start / block_size; block <= (end - 1) / block_size; block++) {
                if (marks[block]) {
                    continue;
                }
                Py_ssize_t lo = (Py_ssize_t)block * block_size;
                Py_ssize_t len = data.len - lo < block_size ? data.len - lo : block_size;
                uint32_t want;
                memcpy(&want, raw_sums + 4 * block, sizeof want);
                if (crc32_of(0, bytes + lo, (size_t)len) != want) {
                    failed = block;
                    break;
                }
                marks[block] = 1;
            }
        }
        Py_END_ALLOW_THREADS;
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&spans_view);
    PyBuffer_Release(&verified);
    PyBuffer_Release(&sums);
    if (error != NULL) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    return PyLong_FromLongLong(failed);
}

/* count_needle_lines counts the lines of hay[0:n] holding needle (scan_lines' lines). */
static long long count_needle_lines(const unsigned char *hay, size_t n, const unsigned char *needle, size_t m) {
    long long lines = 0;
    size_t pos = 0;
    while (pos + m <= n) {
        const unsigned char *hit = find_needle(hay + pos, n - pos, needle, m);
        if (hit == NULL) {
            break;
        }
        lines++;
        size_t after = (size_t)(hit - hay) + m;
        const unsigned char *eol = memchr(hay + after, '\n', n - after);
        if (eol == NULL) {
            break;
        }
        pos = (size_t)(eol - hay) + 1;
    }
    return lines;
}

/* count_one counts the matching lines of one span as LineMatcher.count does; -1 when memory
   ran out (a folded copy). */
static long long count_one(const kdb_regex *rx, const unsigned char *needle, size_t m, int pure, int folded,
                           int guard, const unsigned char *data, size_t len) {
    regex_scan_args a = {.re = rx->re,
                         .run_set = rx->run_set,
                         .run_len = rx->run_len,
                         .data = (const char *)data,
                         .len = len,
                         .limit = -1,
                         .count_only = 1};
    i64vec unused = {NULL, 0, 0}; /* count_only scans push nothing */
    if (needle != NULL) {
        const unsigned char *hay = data;
        int unsafe = 0;
        if (folded) {
            hay = folded_copy(data, (Py_ssize_t)len, guard, &unsafe);
            if (hay == NULL) {
                return -1;
            }
        }
        if (!(guard && unsafe)) {
            if (pure) {
                return count_needle_lines(hay, len, needle, m);
            }
            line_filter filter = {.needle = needle, .set = NULL, .m = m};
            regex_scan_filtered(&a, hay, &filter, &unused);
            return a.found_lines;
        }
    }
    regex_scan_whole(&a, &unused);
    return a.found_lines;
}

static PyObject *fastscan_count_spans(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *regex, *needle_obj, *spans_obj;
    int pure, folded, guard;
    Py_buffer data, spans_view;
    if (!PyArg_ParseTuple(args, "OOpppy*O", &regex, &needle_obj, &pure, &folded, &guard, &data, &spans_obj)) {
        return NULL;
    }
    const kdb_regex *re = regex_of(regex);
    scan_args needle = {.needle = NULL, .needle_len = 0};
    if (re == NULL || (needle_obj != Py_None && parse_needle(needle_obj, &needle) < 0)) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (int64_buffer(spans_obj, &spans_view, "spans") < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    const int64_t *spans = spans_view.buf;
    Py_ssize_t n = spans_view.len / (Py_ssize_t)(2 * sizeof(int64_t));
    const char *error = NULL;
    if (spans_view.len % (Py_ssize_t)(2 * sizeof(int64_t)) != 0) {
        error = "spans must be (start, end) pairs";
    }
    for (Py_ssize_t i = 0; error == NULL && i < n; i++) {
        if (spans[2 * i] < 0 || spans[2 * i + 1] < spans[2 * i] || spans[2 * i + 1] > data.len) {
            error = "a span lies outside the data";
        }
    }
    PyObject *out = NULL;
    if (error == NULL) {
        out = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(int64_t));
    }
    if (out != NULL) {
        int64_t *counts = (int64_t *)PyBytes_AS_STRING(out);
        const unsigned char *bytes = data.buf;
        int failed = 0;
        Py_BEGIN_ALLOW_THREADS;
        for (Py_ssize_t i = 0; i < n; i++) {
            long long found = count_one(re, needle.needle, (size_t)needle.needle_len, pure, folded, guard,
                                        bytes + spans[2 * i], (size_t)(spans[2 * i + 1] - spans[2 * i]));
            if (found < 0) {
                failed = 1;
                break;
            }
            counts[i] = found;
        }
        Py_END_ALLOW_THREADS;
        if (failed) {
            Py_CLEAR(out);
            PyErr_NoMemory();
        }
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&spans_view);
    if (error != NULL) {
        PyErr_SetString(PyExc_ValueError, error);
    }
    return out;
}

/* ---- symbol_hits: the symbols of many documents whose names may match a symbol search ----
 *
 *   symbol_hits(data, spans, needle) -> bytes
 *       Each span of `data` is one document's symbols.bin block (format.py): n records of
 *       eight little-endian u32 (start_line, end_line, start_byte, end_byte, then the byte
 *       lengths of name, kind, qualified name and parent), then those strings in order. n is
 *       not stored in the block: it is the first n whose records and strings fill the span
 *       exactly (a larger n would need more bytes). For each symbol whose name or qualified
 *       name holds `needle` (ASCII, compared with ASCII case folding) or holds any non-ASCII
 *       byte (whose case a search folds beyond ASCII: KELVIN SIGN, LONG S, I WITH DOT ABOVE),
 *       the result holds int64 (span index, symbol index, offset in `data` of its record,
 *       offset of its first string). ValueError when a span lies outside `data` or a block
 *       does not parse. A symbol search decodes only these symbols.
 *   symbol_hits(data, spans, needle, regex, qualified, guard) -> bytes
 *       The same, keeping also each symbol whose subject (its qualified name with
 *       `qualified`, else its name) matches `regex` (from regex_compile, unanchored), or holds
 *       a newline (which RE2 compiled with never_nl would not cross) or a non-ASCII byte (left
 *       to the search's own RE2, which may be another version); with `guard`, the regex is
 *       tried only on the symbols whose name or qualified name holds it as `needle` is held.
 *       `needle` None keeps none by the needle. A regex symbol search screens by its regex
 *       (guarded by text its matches hold, when it has some) and by the text its literal
 *       tiers need.
 */

static int holds_folded(const unsigned char *text, size_t n, const unsigned char *needle, size_t m) {
    for (size_t i = 0; i < n; i++) {
        if (text[i] >= 0x80) {
            return 1;
        }
    }
    if (m == 0) {
        return 1;
    }
    for (size_t i = 0; i + m <= n; i++) {
        size_t j = 0;
        while (j < m && fold_table[text[i + j]] == needle[j]) {
            j++;
        }
        if (j == m) {
            return 1;
        }
    }
    return 0;
}

/* plain_ascii says text holds only ASCII bytes and no newline: the names whose regex match a
   native test may decide (symbol_hits keeps the others for Python's RE2 to judge). */
static int plain_ascii(const unsigned char *text, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (text[i] >= 0x80 || text[i] == '\n') {
            return 0;
        }
    }
    return 1;
}

static uint32_t read_le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static PyObject *fastscan_symbol_hits(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data, spans_view;
    PyObject *spans_obj, *needle_obj, *regex_obj = Py_None, *guard_obj = Py_None;
    int qualified = 0;
    if (!PyArg_ParseTuple(args, "y*OO|OpO", &data, &spans_obj, &needle_obj, &regex_obj, &qualified, &guard_obj)) {
        return NULL;
    }
    const void *re = NULL;
    if (regex_obj != Py_None) {
        const kdb_regex *rx = regex_of(regex_obj);
        if (rx == NULL) {
            PyBuffer_Release(&data);
            return NULL;
        }
        re = rx->re;
    }
    if ((needle_obj != Py_None && !PyBytes_Check(needle_obj)) || (guard_obj != Py_None && !PyBytes_Check(guard_obj))) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_TypeError, "needle and guard must be bytes or None");
        return NULL;
    }
    if (int64_buffer(spans_obj, &spans_view, "spans") < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    const int64_t *spans = spans_view.buf;
    Py_ssize_t n_spans = spans_view.len / (Py_ssize_t)(2 * sizeof(int64_t));
    int use_needle = needle_obj != Py_None;
    size_t m = use_needle ? (size_t)PyBytes_GET_SIZE(needle_obj) : 0;
    int use_guard = guard_obj != Py_None;
    size_t g = use_guard ? (size_t)PyBytes_GET_SIZE(guard_obj) : 0;
    unsigned char folded_needle[256], folded_guard[256];
    const char *error = NULL;
    i64vec out = {NULL, 0, 0};
    int nomem = 0;
    if (m > sizeof folded_needle || g > sizeof folded_guard) {
        error = "the needle is longer than 256 bytes";
    } else {
        for (size_t i = 0; i < m; i++) {
            folded_needle[i] = fold_table[(unsigned char)PyBytes_AS_STRING(needle_obj)[i]];
        }
        for (size_t i = 0; i < g; i++) {
            folded_guard[i] = fold_table[(unsigned char)PyBytes_AS_STRING(guard_obj)[i]];
        }
    }
    /* With a guard inside the needle, a symbol lacking the guard lacks the needle too. */
    int guard_in_needle = use_guard && use_needle && error == NULL && g <= m &&
                          (g == 0 || memmem(folded_needle, m, folded_guard, g) != NULL);
    const unsigned char *bytes = data.buf;
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t s = 0; s < n_spans && error == NULL && !nomem; s++) {
        int64_t start = spans[2 * s], end = spans[2 * s + 1];
        if (start < 0 || end < start || end > data.len) {
            error = "a span lies outside the data";
            break;
        }
        const unsigned char *block = bytes + start;
        uint64_t len = (uint64_t)(end - start);
        /* Find n: records (32 bytes each) and their strings fill the block exactly. */
        uint64_t count = 0, strings = 0;
        while (len != 0 && 32 * count + strings != len) {
            if (32 * (count + 1) > len) {
                error = "a symbols block does not parse";
                break;
            }
            const unsigned char *rec = block + 32 * count;
            strings += (uint64_t)read_le32(rec + 16) + read_le32(rec + 20) + read_le32(rec + 24) + read_le32(rec + 28);
            count++;
            if (32 * count + strings > len) {
                error = "a symbols block does not parse";
                break;
            }
        }
        if (error != NULL) {
            break;
        }
        uint64_t at = 32 * count; /* the current symbol's first string, from the block's start */
        for (uint64_t i = 0; i < count; i++) {
            const unsigned char *rec = block + 32 * i;
            uint32_t name_len = read_le32(rec + 16), kind_len = read_le32(rec + 20);
            uint32_t qual_len = read_le32(rec + 24), parent_len = read_le32(rec + 28);
            const unsigned char *name = block + at;
            const unsigned char *qual = name + name_len + kind_len;
            int guarded = !use_guard || holds_folded(name, name_len, folded_guard, g) ||
                          holds_folded(qual, qual_len, folded_guard, g);
            /* A symbol without the guard cannot hold a needle that contains it: one scan. */
            int keep = use_needle && (guarded || !guard_in_needle) &&
                       (holds_folded(name, name_len, folded_needle, m) || holds_folded(qual, qual_len, folded_needle, m));
            if (!keep && re != NULL && guarded) {
                const char *subject = (const char *)(qualified ? qual : name);
                size_t subject_len = qualified ? qual_len : name_len;
                keep = !plain_ascii((const unsigned char *)subject, subject_len) ||
                       kdb_re2_test(re, subject, subject_len, 0, subject_len);
            }
            if (keep) {
                if (vec_push(&out, s) || vec_push(&out, (int64_t)i) || vec_push(&out, start + 32 * (int64_t)i) ||
                    vec_push(&out, start + (int64_t)at)) {
                    nomem = 1;
                    break;
                }
            }
            at += (uint64_t)name_len + kind_len + qual_len + parent_len;
        }
    }
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&data);
    PyBuffer_Release(&spans_view);
    if (nomem) {
        free(out.items);
        return PyErr_NoMemory();
    }
    if (error != NULL) {
        free(out.items);
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    PyObject *result = PyBytes_FromStringAndSize((const char *)out.items, (Py_ssize_t)(out.len * sizeof(int64_t)));
    free(out.items);
    return result;
}

/* ---- ranking: a first page's candidate order and its definition checks, without numpy ----
 *
 *   record_facts(table, ordinals, table_start, record_size, field_at, required) -> bytes
 *       The low byte of the little-endian u32 at field_at of each ordinal's record (found as
 *       record_spans finds it, ordinals as it takes them), one byte per ordinal. IndexError
 *       when a record lies outside `table`, ValueError when a field lacks a bit of `required`.
 *   stable_order(keys) -> bytes
 *       The positions 0 .. len(keys) - 1 as int64, ordered by their key byte ascending and,
 *       among equal keys, by position (a counting sort: linear, and stable).
 *   symbols_define(records, count, record_size, ranges) -> bool
 *       Whether an int64 (start, end) range of `ranges` covers some record's name bytes
 *       [start_byte, end_byte), a record being record_size bytes that begin with u32
 *       start_line, end_line, start_byte, end_byte; a record with start_byte >= end_byte
 *       has no name and never counts.
 *   symbols_enclosing(records, count, record_size, lines) -> bytes
 *       For each int64 line number, the index of the innermost record whose
 *       [start_line, end_line] holds it (the shortest, then the one starting last, then the
 *       first recorded), or -1, as int64.
 *
 * A ranked first page did these with numpy, whose import was ~50 ms of a 100 ms CLI search.
 */

static PyObject *fastscan_record_facts(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer table, ords;
    PyObject *ords_obj;
    Py_ssize_t table_start, record_size, field_at;
    unsigned long required;
    if (!PyArg_ParseTuple(args, "y*Onnnk", &table, &ords_obj, &table_start, &record_size, &field_at, &required)) {
        return NULL;
    }
    int wide;
    Py_ssize_t n;
    if (records_open(&table, ords_obj, &ords, &wide, &n) < 0) {
        return NULL;
    }
    PyObject *out = NULL;
    const char *error = NULL;
    PyObject *kind = PyExc_ValueError;
    if (table_start < 0 || table_start > table.len || record_size <= 0 || field_at < 0 || field_at + 4 > record_size) {
        error = "invalid table layout";
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL) {
        goto done;
    }
    unsigned char *facts = (unsigned char *)PyBytes_AS_STRING(out);
    const unsigned char *rows = table.buf;
    int64_t records = (int64_t)((table.len - table_start) / record_size);
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t ordinal = ordinal_at(&ords, wide, i);
        if (ordinal < 0 || ordinal >= records) {
            error = "a record lies outside the table";
            kind = PyExc_IndexError;
            break;
        }
        uint32_t field = read_le32(rows + table_start + ordinal * record_size + field_at);
        if ((field & required) != required) {
            error = "a document record carries no facts";
            break;
        }
        facts[i] = (unsigned char)(field & 0xFF);
    }
done:
    return records_done(&table, &ords, out, kind, error);
}

static PyObject *fastscan_stable_order(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer keys;
    if (!PyArg_ParseTuple(args, "y*", &keys)) {
        return NULL;
    }
    Py_ssize_t n = keys.len;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(int64_t));
    if (out == NULL) {
        PyBuffer_Release(&keys);
        return NULL;
    }
    int64_t *order = (int64_t *)PyBytes_AS_STRING(out);
    const unsigned char *k = keys.buf;
    Py_ssize_t next[256] = {0};
    for (Py_ssize_t i = 0; i < n; i++) {
        next[k[i]]++;
    }
    Py_ssize_t at = 0;
    for (int b = 0; b < 256; b++) {
        Py_ssize_t count = next[b];
        next[b] = at;
        at += count;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        order[next[k[i]]++] = (int64_t)i;
    }
    PyBuffer_Release(&keys);
    return out;
}

/* symbol_records checks that `count` records of record_size bytes (at least the four u32
 * spans) fit in `records`. */
static int symbol_records(const Py_buffer *records, Py_ssize_t count, Py_ssize_t record_size) {
    if (count < 0 || record_size < 16 || (count > 0 && records->len / record_size < count)) {
        PyErr_SetString(PyExc_ValueError, "the symbol records do not fit their buffer");
        return -1;
    }
    return 0;
}

typedef struct {
    int64_t start, end;
} range64;

static int range_order(const void *a, const void *b) {
    int64_t x = ((const range64 *)a)->start, y = ((const range64 *)b)->start;
    return (x > y) - (x < y);
}

static PyObject *fastscan_symbols_define(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer records, ranges_view;
    PyObject *ranges_obj;
    Py_ssize_t count, record_size;
    if (!PyArg_ParseTuple(args, "y*nnO", &records, &count, &record_size, &ranges_obj)) {
        return NULL;
    }
    if (int64_buffer(ranges_obj, &ranges_view, "ranges") < 0) {
        PyBuffer_Release(&records);
        return NULL;
    }
    int found = -1;
    Py_ssize_t m = ranges_view.len / (Py_ssize_t)sizeof(range64);
    range64 *sorted = NULL;
    if (symbol_records(&records, count, record_size) < 0) {
        goto done;
    }
    found = 0;
    if (m == 0 || count == 0) {
        goto done;
    }
    /* Ranges sorted by start, each holding the largest end of it and those before it: a name
     * [s, e) is covered iff the last range starting at or before s reaches e. */
    sorted = malloc((size_t)m * sizeof(range64));
    if (sorted == NULL) {
        found = -1;
        PyErr_NoMemory();
        goto done;
    }
    memcpy(sorted, ranges_view.buf, (size_t)m * sizeof(range64));
    qsort(sorted, (size_t)m, sizeof(range64), range_order);
    for (Py_ssize_t j = 1; j < m; j++) {
        if (sorted[j].end < sorted[j - 1].end) {
            sorted[j].end = sorted[j - 1].end;
        }
    }
    const unsigned char *rec = records.buf;
    for (Py_ssize_t i = 0; i < count && !found; i++, rec += record_size) {
        int64_t s = read_le32(rec + 8), e = read_le32(rec + 12);
        if (s >= e || sorted[0].start > s) {
            continue;
        }
        Py_ssize_t lo = 0, hi = m; /* the last range with start <= s is lo after the search */
        while (hi - lo > 1) {
            Py_ssize_t mid = lo + (hi - lo) / 2;
            if (sorted[mid].start <= s) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        found = sorted[lo].end >= e;
    }
done:
    free(sorted);
    PyBuffer_Release(&records);
    PyBuffer_Release(&ranges_view);
    if (found < 0) {
        return NULL;
    }
    return PyBool_FromLong(found);
}

static PyObject *fastscan_symbols_enclosing(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer records, lines_view;
    PyObject *lines_obj;
    Py_ssize_t count, record_size;
    if (!PyArg_ParseTuple(args, "y*nnO", &records, &count, &record_size, &lines_obj)) {
        return NULL;
    }
    if (int64_buffer(lines_obj, &lines_view, "lines") < 0) {
        PyBuffer_Release(&records);
        return NULL;
    }
    PyObject *out = NULL;
    if (symbol_records(&records, count, record_size) < 0) {
        goto done;
    }
    Py_ssize_t n = lines_view.len / (Py_ssize_t)sizeof(int64_t);
    out = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(int64_t));
    if (out == NULL) {
        goto done;
    }
    int64_t *best = (int64_t *)PyBytes_AS_STRING(out);
    const int64_t *lines = lines_view.buf;
    const unsigned char *base = records.buf;
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t j = 0; j < n; j++) {
        int64_t line = lines[j], pick = -1, pick_width = 0, pick_start = 0;
        const unsigned char *rec = base;
        for (Py_ssize_t i = 0; i < count; i++, rec += record_size) {
            int64_t start = read_le32(rec), end = read_le32(rec + 4);
            if (start > line || end < line) {
                continue;
            }
            int64_t width = end - start;
            if (pick < 0 || width < pick_width || (width == pick_width && start > pick_start)) {
                pick = i;
                pick_width = width;
                pick_start = start;
            }
        }
        best[j] = pick;
    }
    Py_END_ALLOW_THREADS;
done:
    PyBuffer_Release(&records);
    PyBuffer_Release(&lines_view);
    return out;
}

static PyMethodDef fastscan_methods[] = {
    {"record_facts", fastscan_record_facts, METH_VARARGS,
     "record_facts(table, ordinals, table_start, record_size, field_at, required) reads each record's facts byte."},
    {"stable_order", fastscan_stable_order, METH_VARARGS,
     "stable_order(keys) returns the positions ordered by key byte, stably, as int64."},
    {"symbols_define", fastscan_symbols_define, METH_VARARGS,
     "symbols_define(records, count, record_size, ranges) says whether a range covers a symbol's name."},
    {"symbols_enclosing", fastscan_symbols_enclosing, METH_VARARGS,
     "symbols_enclosing(records, count, record_size, lines) returns each line's innermost symbol or -1."},
    {"symbol_hits", fastscan_symbol_hits, METH_VARARGS,
     "symbol_hits(data, spans, needle, regex=None, qualified=False, guard=None) lists the symbols a search may match."},
    {"find_literal", fastscan_find_literal, METH_VARARGS,
     "find_literal(data, needle, folded, guard, limit, line_type) lists the lines holding needle."},
    {"needle_lines", fastscan_needle_lines, METH_VARARGS,
     "needle_lines(data, needle, folded, guard) lists (line_number, start, end) of lines holding needle."},
    {"scan_literal", fastscan_scan_literal, METH_VARARGS,
     "scan_literal(data, needle, folded, guard) returns find_literal's lines packed, with their counts."},
    {"count_literal", fastscan_count_literal, METH_VARARGS,
     "count_literal(data, needle, folded, guard) returns (matching lines, matches)."},
    {"render_lines", fastscan_render_lines, METH_VARARGS,
     "render_lines(data, groups, path, json, context) renders one file's matches as output lines."},
    {"render_json", fastscan_render_json, METH_VARARGS,
     "render_json(data, groups, path, context) renders one file's matches as ripgrep's JSON, with its stats."},
    {"distinct_trigrams", fastscan_distinct_trigrams, METH_VARARGS,
     "distinct_trigrams(data) returns the distinct folded trigram ids without newlines as uint32 bytes."},
    {"any_whole_word", fastscan_any_whole_word, METH_VARARGS,
     "any_whole_word(data, lines) says whether any range of any line is a whole word (rank.is_whole_word)."},
    {"invert_postings", fastscan_invert_postings, METH_VARARGS,
     "invert_postings(docs) inverts per-document trigram ids into (ids, starts, ordinals) as bytes."},
    {"regex_compile", fastscan_regex_compile, METH_VARARGS,
     "regex_compile(pattern, case_sensitive, literal) compiles an RE2 pattern for regex_scan and regex_count."},
    {"regex_scan", fastscan_regex_scan, METH_VARARGS,
     "regex_scan(regex, data, lines, limit) packs the matching lines of data, with (lines, matches) counts."},
    {"regex_count", fastscan_regex_count, METH_VARARGS,
     "regex_count(regex, data, lines) counts the matching lines of data."},
    {"regex_scan_needle", fastscan_regex_scan_needle, METH_VARARGS,
     "regex_scan_needle(regex, data, needle, folded, guard, limit) is regex_scan over the needle's lines."},
    {"regex_count_needle", fastscan_regex_count_needle, METH_VARARGS,
     "regex_count_needle(regex, data, needle, folded, guard) is regex_count over the needle's lines."},
    {"crc32", fastscan_crc32, METH_VARARGS, "crc32(data, value=0) is zlib.crc32(data, value), computed faster."},
    {"crc32_accelerated", fastscan_crc32_accelerated, METH_NOARGS,
     "crc32_accelerated() says whether crc32 folds with PCLMULQDQ on this CPU."},
    {"record_spans", fastscan_record_spans, METH_VARARGS,
     "record_spans(table, ordinals, table_start, record_size, base, limit, offset_at, size_at, size_bytes) "
     "reads an (offset, size) of each record as an int64 span."},
    {"split_strings", fastscan_split_strings, METH_VARARGS,
     "split_strings(data, spans, fields, keep) decodes each span and splits it at NUL into `fields` strings."},
    {"verify_blocks", fastscan_verify_blocks, METH_VARARGS,
     "verify_blocks(data, spans, block_size, verified, sums) checks the unverified blocks the spans cover."},
    {"count_spans", fastscan_count_spans, METH_VARARGS,
     "count_spans(regex, needle, pure, folded, guard, data, spans) counts the matching lines of each span."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastscan_module = {
    PyModuleDef_HEAD_INIT, "_fastscan", "The engine's hot byte loops in C (see _fastscan.c).", -1,
    fastscan_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastscan(void) {
    init_fold_table();
#ifdef HAVE_CLMUL_CRC
    __builtin_cpu_init();
    clmul_usable = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
#else
    clmul_usable = 0;
#endif
    return PyModule_Create(&fastscan_module);
}
