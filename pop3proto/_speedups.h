/* The compiled twin of pop3proto/_purecore.py: batch loops over whole buffers.
 *
 * Every function takes explicit lengths and reads only inside [start, end) of
 * the buffer it is given; wire data is never treated as a C string (it may hold
 * NUL bytes and is not NUL-terminated). The Python wrapper (_ccore.py) sizes
 * the output arrays and turns the results into Python objects.
 */
#ifndef POP3PROTO_SPEEDUPS_H
#define POP3PROTO_SPEEDUPS_H

#include <stddef.h>
#include <stdint.h>

/* Flags in the state of p3_stuff (same values as _purecore). */
#define P3_LINE_START 1
#define P3_SKIP_LF 2

/* The result of p3_unstuff and p3_stuff is one word: flags in the low bits,
 * the numbers above them (buffers are far below 2**48 bytes). */
#define P3_DONE 1          /* unstuff: the terminating line was consumed */
#define P3_AT_LINE_START 2 /* unstuff: the next byte begins a line */
#define P3_COPIED 4        /* the result was built in `out` */
#define P3_EMPTY 8         /* stuff: the only byte was an LF skipped (state: SKIP_LF cleared) */
#define P3_TERM_SHIFT 4    /* unstuff: 2 bits, length of the terminating line consumed */
#define P3_STATE_SHIFT 8   /* stuff: 2 bits, the new state */
#define P3_STOP_SHIFT 16   /* unstuff: stop */
#define P3_LEN_SHIFT 16    /* stuff: length of the output */

/* Un-stuff buf[start:end] (requires start < end); `out` must have room for
 * end - start bytes. The result holds stop, the flags and the length of the
 * terminating line consumed (term), so the data ends at upto = stop - term.
 * Without P3_COPIED no dot was dropped: the data is buf[start:upto] and `out`
 * was not written. With P3_COPIED the data is out[0:*out_len]. */
uint64_t p3_unstuff(const unsigned char *buf, size_t start, size_t end, int at_line_start,
                    char *out, uint64_t *out_len);

/* Stuff data[0:n] (requires n > 0) into `out`, which must have room for 2 * n
 * bytes (each input byte yields at most two). The result holds the output
 * length and the new state; without P3_COPIED the output is the input
 * unchanged and `out` was not written. With P3_EMPTY the output is empty and
 * the new state is the old one without P3_SKIP_LF. */
uint64_t p3_stuff(const unsigned char *data, size_t n, int state, int dots, char *out);

/* Error codes of p3_parse_listing (0 = success). */
#define P3_ERR_NUMBER 1
#define P3_ERR_NUMBER_LONG 2
#define P3_ERR_NUMBER_LARGE 3
#define P3_ERR_MSG_ZERO 4
#define P3_ERR_NO_SPACE 5
#define P3_ERR_SIZE_JUNK 6
#define P3_ERR_UID_EMPTY 7
#define P3_ERR_UID_LONG 8
#define P3_ERR_UID_OCTET 9
#define P3_ERR_TOO_MANY 10

/* Parse the complete lines of a LIST (numeric) or UIDL listing in
 * buf[start:end]. At most `limit` entries are stored; `msgs` and `values`
 * (sizes, numeric only) must have room for `limit` entries, `uids` (UIDL only)
 * for end - start bytes: the UIDs are written there separated by LF.
 * On return res[0] = entries, res[1] = stop, res[2] = done, res[3] = offset of
 * the offending line (on error), res[4] = bytes written to `uids`.
 * Returns 0 or one of the P3_ERR_* codes. */
int p3_parse_listing(const unsigned char *buf, size_t start, size_t end, int numeric,
                     size_t limit, uint64_t *msgs, uint64_t *values, char *uids,
                     uint64_t *res);

/* Limit the vector instructions the search loops use (0 none, 1 SSE2,
 * 2 AVX2; a negative limit changes nothing) and return the level now in use.
 * For tests, which run every loop on the same input; not thread-safe. */
int p3_simd_level(int limit);

#endif
