/* The compiled twin of pop3proto/_purecore.py; see _speedups.h for the
 * interface and _purecore.py for the contract. Byte-identical results are
 * required: the test suite compares both on random input.
 *
 * Wire data is only ever addressed through (pointer, length) pairs: no C
 * string function touches it, and every read is checked against `end`.
 */
#include <string.h>

#include "_speedups.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* AVX2 where the compiler can target it per function and the CPU has it
 * (checked at run time); SSE2 (always there on x86-64) or memchr otherwise. */
#if !defined(P3_AVX2)
#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 5))
#define P3_AVX2 1
#else
#define P3_AVX2 0
#endif
#endif
#if P3_AVX2
#include <immintrin.h>
#endif

#define NOTFOUND ((size_t)-1)
#define MAX_DIGITS 19
#define MAX_NUMBER UINT64_C(0x7FFFFFFFFFFFFFFF)
#define MAX_UID 70

/* Index of the first "\n." pair in b[i:end] (both bytes inside), or NOTFOUND.
 * The vector loops compare 64 candidate positions per round, reading
 * b[i:i+65] (each position and the byte after it). */
static size_t find_nl_dot_tail(const unsigned char *b, size_t i, size_t end)
{
    while (i + 1 < end) {
        const unsigned char *q = memchr(b + i, '\n', end - 1 - i);
        size_t k;
        if (q == NULL)
            return NOTFOUND;
        k = (size_t)(q - b);
        if (b[k + 1] == '.')
            return k;
        i = k + 1;
    }
    return NOTFOUND;
}

#if defined(__SSE2__)
#define P3_LOAD(p) _mm_loadu_si128((const __m128i *)(const void *)(p))
#define P3_PAIRS(p) \
    _mm_and_si128(_mm_cmpeq_epi8(P3_LOAD(p), nl), _mm_cmpeq_epi8(P3_LOAD((p) + 1), dot))

static size_t find_nl_dot_sse2(const unsigned char *b, size_t i, size_t end)
{
    const __m128i nl = _mm_set1_epi8('\n');
    const __m128i dot = _mm_set1_epi8('.');
    while (end - i >= 65) {
        __m128i m0 = P3_PAIRS(b + i);
        __m128i m1 = P3_PAIRS(b + i + 16);
        __m128i m2 = P3_PAIRS(b + i + 32);
        __m128i m3 = P3_PAIRS(b + i + 48);
        if (_mm_movemask_epi8(_mm_or_si128(_mm_or_si128(m0, m1), _mm_or_si128(m2, m3)))) {
            uint64_t mask = (uint64_t)(unsigned)_mm_movemask_epi8(m0)
                            | (uint64_t)(unsigned)_mm_movemask_epi8(m1) << 16
                            | (uint64_t)(unsigned)_mm_movemask_epi8(m2) << 32
                            | (uint64_t)(unsigned)_mm_movemask_epi8(m3) << 48;
            return i + (size_t)__builtin_ctzll(mask);
        }
        i += 64;
    }
    return find_nl_dot_tail(b, i, end);
}
#undef P3_PAIRS
#undef P3_LOAD
#endif

#if P3_AVX2
#define P3_LOAD(p) _mm256_loadu_si256((const __m256i *)(const void *)(p))
#define P3_PAIRS(p) \
    _mm256_and_si256(_mm256_cmpeq_epi8(P3_LOAD(p), nl), _mm256_cmpeq_epi8(P3_LOAD((p) + 1), dot))

__attribute__((target("avx2"))) static size_t find_nl_dot_avx2(const unsigned char *b, size_t i,
                                                                size_t end)
{
    const __m256i nl = _mm256_set1_epi8('\n');
    const __m256i dot = _mm256_set1_epi8('.');
    while (end - i >= 65) {
        __m256i m0 = P3_PAIRS(b + i);
        __m256i m1 = P3_PAIRS(b + i + 32);
        __m256i any = _mm256_or_si256(m0, m1);
        if (!_mm256_testz_si256(any, any)) {
            uint64_t mask = (uint64_t)(unsigned)_mm256_movemask_epi8(m0)
                            | (uint64_t)(unsigned)_mm256_movemask_epi8(m1) << 32;
            return i + (size_t)__builtin_ctzll(mask);
        }
        i += 64;
    }
    return find_nl_dot_tail(b, i, end);
}
#undef P3_PAIRS
#undef P3_LOAD
#endif

/* The highest vector level the search loops may use: 0 none, 1 SSE2,
 * 2 AVX2. Lowered only by tests, to run every loop on the same input. */
static volatile int simd_limit = 2;

int p3_simd_level(int limit)
{
    int level = 0;
    if (limit >= 0)
        simd_limit = limit;
#if defined(__SSE2__)
    level = 1;
#endif
#if P3_AVX2
    if (__builtin_cpu_supports("avx2"))
        level = 2;
#endif
    return level < simd_limit ? level : simd_limit;
}

static size_t find_nl_dot(const unsigned char *b, size_t i, size_t end)
{
    int limit = simd_limit;
#if P3_AVX2
    if (limit >= 2 && __builtin_cpu_supports("avx2"))
        return find_nl_dot_avx2(b, i, end);
#endif
#if defined(__SSE2__)
    if (limit >= 1)
        return find_nl_dot_sse2(b, i, end);
#endif
    (void)limit;
    return find_nl_dot_tail(b, i, end);
}

/* Index of the first CR or LF in b[i:n], or n. */
static size_t find_eol(const unsigned char *b, size_t i, size_t n)
{
#if defined(__SSE2__)
    const __m128i cr = _mm_set1_epi8('\r');
    const __m128i lf = _mm_set1_epi8('\n');
    const int vector = simd_limit >= 1;
    while (vector && n - i >= 16) {
        __m128i a = _mm_loadu_si128((const __m128i *)(const void *)(b + i));
        unsigned mask = (unsigned)_mm_movemask_epi8(
            _mm_or_si128(_mm_cmpeq_epi8(a, cr), _mm_cmpeq_epi8(a, lf)));
        if (mask)
            return i + (size_t)__builtin_ctz(mask);
        i += 16;
    }
#endif
    while (i < n && b[i] != '\r' && b[i] != '\n')
        i++;
    return i;
}

uint64_t p3_unstuff(const unsigned char *buf, size_t start, size_t end, int at_line_start,
                    char *out, uint64_t *out_len)
{
    /* The data is buf[start:end] minus the stuffing dots. Until the first
     * dot is dropped it is a prefix of the input and nothing is copied; from
     * then on it is built in `out` (o bytes so far). */
    size_t pos = start; /* first byte not yet emitted */
    size_t search = start;
    size_t dot = NOTFOUND;
    size_t o = 0;
    int copied = 0;
    size_t upto, stop;
    uint64_t flags;

    if (at_line_start && buf[start] == '.')
        dot = start;
    for (;;) {
        size_t after;
        unsigned char c;
        if (dot == NOTFOUND) {
            size_t nl = find_nl_dot(buf, search, end);
            if (nl == NOTFOUND)
                break;
            dot = nl + 1;
        }
        /* buf[dot] is a "." at the start of a line. */
        after = dot + 1;
        if (after >= end) {
            /* "." at the end of the buffer: cannot decide yet. */
            upto = stop = dot;
            flags = P3_AT_LINE_START;
            goto finish;
        }
        c = buf[after];
        if (c == '\n') { /* ".\n": terminator (tolerated bare LF) */
            upto = dot;
            stop = after + 1;
            flags = P3_DONE | P3_AT_LINE_START;
            goto finish;
        }
        if (c == '\r') {
            if (after + 1 >= end) {
                upto = stop = dot;
                flags = P3_AT_LINE_START;
                goto finish;
            }
            if (buf[after + 1] == '\n') { /* ".\r\n": terminator */
                upto = dot;
                stop = after + 2;
                flags = P3_DONE | P3_AT_LINE_START;
                goto finish;
            }
        }
        /* A stuffed line: drop the first dot. */
        if (copied) {
            memcpy(out + o, buf + pos, dot - pos);
            o += dot - pos;
        } else {
            o = dot - start;
            memcpy(out, buf + start, o);
            copied = 1;
        }
        pos = after;
        search = after;
        dot = NOTFOUND;
    }
    upto = stop = end;
    flags = buf[end - 1] == '\n' ? P3_AT_LINE_START : 0;
finish:
    if (copied) {
        memcpy(out + o, buf + pos, upto - pos);
        *out_len = o + (upto - pos);
        flags |= P3_COPIED;
    }
    return ((uint64_t)stop << P3_STOP_SHIFT) | ((uint64_t)(stop - upto) << P3_TERM_SHIFT) | flags;
}

uint64_t p3_stuff(const unsigned char *data, size_t n, int state, int dots, char *out)
{
    /* The output is runs of the input with bytes inserted (a CR before a bare
     * LF, an LF after a bare CR, a dot before a line-starting dot) or one
     * leading LF skipped. `run` is where the pending run starts; a run is
     * flushed to `out` only before an insertion, so while nothing changes
     * nothing is copied. */
    size_t i = 0, run = 0, o = 0;
    int changed = 0;
    int line_start = state & P3_LINE_START;
    int new_state;

#define FLUSH(upto)                                        \
    do {                                                   \
        memcpy(out + o, data + run, (size_t)(upto) - run); \
        o += (size_t)(upto) - run;                         \
        run = (upto);                                      \
        changed = 1;                                       \
    } while (0)

    if ((state & P3_SKIP_LF) && data[0] == '\n') {
        /* The previous chunk ended in a CR that was already sent as CRLF. */
        i = run = 1;
        changed = 1;
        if (n == 1)
            return P3_EMPTY | P3_COPIED;
    }
    new_state = data[n - 1] == '\r' ? P3_SKIP_LF : 0;
    while (i < n) {
        size_t k;
        if (line_start && dots && data[i] == '.') {
            FLUSH(i);
            out[o++] = '.';
        }
        k = find_eol(data, i, n);
        if (k == n) {
            line_start = 0;
            break;
        }
        if (data[k] == '\n') { /* bare LF */
            FLUSH(k);
            out[o++] = '\r';
            i = k + 1;
        } else if (k + 1 < n && data[k + 1] == '\n') { /* CRLF */
            i = k + 2;
        } else { /* bare CR, or a CR ending the chunk */
            FLUSH(k + 1);
            out[o++] = '\n';
            i = k + 1;
        }
        line_start = 1;
    }
#undef FLUSH
    if (line_start)
        new_state |= P3_LINE_START;
    if (!changed)
        return ((uint64_t)n << P3_LEN_SHIFT) | ((uint64_t)new_state << P3_STATE_SHIFT);
    /* run <= n here; the test keeps compilers from assuming otherwise. */
    if (run < n) {
        memcpy(out + o, data + run, n - run);
        o += n - run;
    }
    return ((uint64_t)o << P3_LEN_SHIFT) | ((uint64_t)new_state << P3_STATE_SHIFT) | P3_COPIED;
}

static size_t skip_ws(const unsigned char *b, size_t i, size_t end)
{
    while (i < end && (b[i] == ' ' || b[i] == '\t'))
        i++;
    return i;
}

/* Parse a decimal number at b[*pi:end]; on success store it and advance *pi. */
static int parse_number(const unsigned char *b, size_t *pi, size_t end, uint64_t *value)
{
    size_t i = *pi, j = i, k;
    uint64_t v = 0;
    while (j < end && (unsigned)(b[j] - '0') < 10u)
        j++;
    if (j == i)
        return P3_ERR_NUMBER;
    if (j - i > MAX_DIGITS)
        return P3_ERR_NUMBER_LONG;
    /* At most 19 digits: below 10**19 < 2**64, no overflow. */
    for (k = i; k < j; k++)
        v = v * 10u + (uint64_t)(b[k] - '0');
    if (v > MAX_NUMBER)
        return P3_ERR_NUMBER_LARGE;
    *value = v;
    *pi = j;
    return 0;
}

int p3_parse_listing(const unsigned char *buf, size_t start, size_t end, int numeric,
                     size_t limit, uint64_t *msgs, uint64_t *values, char *uids,
                     uint64_t *res)
{
    size_t pos = start, count = 0, u = 0;
    int err = 0;

    res[2] = 0;
    while (pos < end) {
        const unsigned char *q = memchr(buf + pos, '\n', end - pos);
        size_t nl, le, i, j;
        uint64_t msg, size;
        if (q == NULL)
            break;
        nl = (size_t)(q - buf);
        le = nl;
        if (le > pos && buf[le - 1] == '\r')
            le--;
        if (le - pos == 1 && buf[pos] == '.') {
            pos = nl + 1;
            res[2] = 1;
            break;
        }
        if (count >= limit) {
            err = P3_ERR_TOO_MANY;
            goto fail;
        }
        i = skip_ws(buf, pos, le);
        err = parse_number(buf, &i, le, &msg);
        if (err)
            goto fail;
        if (msg == 0) {
            err = P3_ERR_MSG_ZERO;
            goto fail;
        }
        j = skip_ws(buf, i, le);
        if (j == i) {
            err = P3_ERR_NO_SPACE;
            goto fail;
        }
        if (numeric) {
            err = parse_number(buf, &j, le, &size);
            if (err)
                goto fail;
            /* RFC 1939 §5: text after the size is allowed in a scan listing. */
            if (j < le && buf[j] != ' ' && buf[j] != '\t') {
                err = P3_ERR_SIZE_JUNK;
                goto fail;
            }
            values[count] = size;
        } else {
            /* RFC 1939 §7: a unique-id is 1 to 70 octets from 0x21 to 0x7E. */
            size_t k = j;
            while (k < le && buf[k] >= 0x21 && buf[k] <= 0x7E)
                k++;
            if (k == j) {
                err = P3_ERR_UID_EMPTY;
                goto fail;
            }
            if (k - j > MAX_UID) {
                err = P3_ERR_UID_LONG;
                goto fail;
            }
            if (skip_ws(buf, k, le) != le) {
                err = P3_ERR_UID_OCTET;
                goto fail;
            }
            memcpy(uids + u, buf + j, k - j);
            u += k - j;
            uids[u++] = '\n';
        }
        msgs[count++] = msg;
        pos = nl + 1;
    }
    res[0] = count;
    res[1] = pos;
    res[3] = 0;
    res[4] = u;
    return 0;
fail:
    res[0] = count;
    res[1] = pos;
    res[3] = pos;
    res[4] = u;
    return err;
}
