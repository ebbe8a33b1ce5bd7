/*
 * Float32 linear layers on Intel's AMX tiles, each product as three bfloat16 products (bf16x3).
 *
 * AMX multiplies bfloat16 matrices 16x32 by 32x16 in one instruction and accumulates in
 * float32: ~16 times the multiply rate of AVX-512 float32, but bfloat16 keeps 8 bits of
 * mantissa where float32 keeps 24. Writing each float32 number as the sum of two bfloat16 ones,
 * x = hi(x) + lo(x) with hi(x) = bf16(x) and lo(x) = bf16(x - hi(x)) (16 bits of mantissa
 * together), a product is
 *
 *     x * w = hi(x) hi(w) + hi(x) lo(w) + lo(x) hi(w) + lo(x) lo(w)
 *
 * and the last term, ~2^-16 of the product, is dropped: three AMX products, accumulated in
 * float32, in place of one float32 product. torch calls this precision "high" (its
 * float32_matmul_precision), against "highest" for float32 kernels. The weights are split once,
 * when they are packed; the activations on every call. On a gpt2 step the logits come out
 * within ~6e-5 of float32's (float32's own rounding: ~1e-5), and the start-up checks that on
 * the served model before it takes this kernel (model/bf16x3_linear.py).
 *
 * Layout. A weight (out, in) row-major is packed as tiles of 32 inputs x 16 outputs, the input
 * pairs interleaved as AMX wants them (16 rows of 16 pairs): for each block of 16 outputs, for
 * each block of 32 inputs, the hi tile and then the lo tile, 1 KiB each, so one block of outputs
 * is one contiguous stream. `out` is padded with zero rows to a multiple of 32, `in` with zero
 * columns to a multiple of 32. The activations are split into the same tiled form (16 rows x
 * 32 inputs per tile) in caller-provided scratch.
 *
 * Work. Each thread takes a contiguous range of pairs of output blocks (32 outputs) and, for
 * each 32 rows of activations, keeps four float32 accumulator tiles (2 row blocks x 2 output
 * blocks); per 32 inputs it loads 2 activation and 2 weight tiles at a time, ten loads for
 * twelve products. For many rows (a prompt) it walks a few pairs of output blocks (a panel
 * that stays in L2) over all the rows before the next panel.
 *
 * Each output is a sum over the inputs in a fixed order whatever the number of rows or the
 * row's place among them, so a row's result does not depend on its batch.
 */
#include <stddef.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define BF16X3 1
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define BF16X3 0
#endif

#define X3_TILE 512 /* bfloat16 numbers in a tile: 16 rows x 64 bytes */
#define L2_AHEAD 8  /* steps of 32 inputs the weights are prefetched into L2 ahead */

void gptserve_gelu_range(float *x, int n); /* decode_step.c: GPT-2's GELU in place */

static int round_up(int n, int to) { return (n + to - 1) / to * to; }

/* Bytes of scratch a call with `rows` rows of `in` inputs needs. */
size_t gptserve_bf16x3_scratch_bytes(int rows, int in) {
    return (size_t)round_up(rows, 16) * round_up(in, 32) * 2 * sizeof(unsigned short) + 64;
}

/* Bytes of a packed weight of (out, in). */
size_t gptserve_bf16x3_packed_bytes(int out, int in) {
    return (size_t)round_up(out, 32) * round_up(in, 32) * 2 * sizeof(unsigned short);
}

#if BF16X3

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    unsigned char palette, start_row, reserved[14];
    unsigned short colsb[16];
    unsigned char rows[16];
} TileConfig;

/* 1 where this build has AMX and the kernel lets this process use the tile registers. */
int gptserve_bf16x3_ready(void) {
    static int ready = -1;
    if (ready < 0) ready = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return ready;
}

static void configure_tiles(void) {
    TileConfig config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.colsb[t] = 64;
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
}

static inline __m512 widen(__m256bh h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
}

/* Up to 16 rows of x (`rows` of them, `in` wide, row stride `stride`) into hi and lo tiles
 * [in / 32][16][32]; missing rows and inputs are zeros. */
static void split_block(const float *x, int rows, int in, int stride, unsigned short *hi,
                        unsigned short *lo) {
    const int padded = round_up(in, 32);
    for (int r = 0; r < 16; r++) {
        for (int k = 0; k < padded; k += 16) {
            unsigned short *h = hi + (size_t)(k / 32) * X3_TILE + r * 32 + (k & 31);
            unsigned short *l = lo + (h - hi);
            const int left = in - k;
            if (r >= rows || left <= 0) {
                memset(h, 0, 32);
                memset(l, 0, 32);
                continue;
            }
            const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
            const __m512 v = _mm512_maskz_loadu_ps(mask, x + (size_t)r * stride + k);
            const __m256bh high = _mm512_cvtneps_pbh(v);
            const __m256bh low = _mm512_cvtneps_pbh(_mm512_sub_ps(v, widen(high)));
            _mm256_storeu_si256((__m256i *)h, (__m256i)high);
            _mm256_storeu_si256((__m256i *)l, (__m256i)low);
        }
    }
}

/* One accumulator tile (16 rows x 16 outputs) plus bias, GELU'd if asked, into y. */
static void emit(float *tile, int rows, int o0, int out, const float *bias, int gelu, float *y,
                 int row0) {
    const int cols = out - o0 < 16 ? out - o0 : 16;
    if (rows <= 0 || cols <= 0) return;
    for (int r = 0; r < rows; r++) {
        float *t = tile + r * 16;
        if (bias)
            for (int c = 0; c < 16; c++) t[c] += bias[o0 + c < out ? o0 + c : 0];
        if (gelu) gptserve_gelu_range(t, 16);
        memcpy(y + (size_t)(row0 + r) * out + o0, t, cols * sizeof(float));
    }
}

#endif

/* Pack w (out, in) row-major into `packed` (gptserve_bf16x3_packed_bytes). Returns 0, or -1
 * where this build has no AMX. */
int gptserve_bf16x3_pack(const float *w, int out, int in, unsigned short *packed) {
#if BF16X3
    const int blocks = round_up(out, 32) / 16, kblocks = round_up(in, 32) / 32;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) {
        for (int kb = 0; kb < kblocks; kb++) {
            unsigned short *hi = packed + ((size_t)b * kblocks + kb) * 2 * X3_TILE;
            unsigned short *lo = hi + X3_TILE;
            for (int n = 0; n < 16; n++) { /* outputs */
                const int o = b * 16 + n;
                for (int half = 0; half < 32; half += 16) { /* inputs kb * 32 + half + i */
                    const int left = o < out ? in - (kb * 32 + half) : 0;
                    const __mmask16 mask = left >= 16  ? (__mmask16)0xffff
                                           : left <= 0 ? (__mmask16)0
                                                       : (__mmask16)((1u << left) - 1);
                    /* padded outputs (o >= out) read nothing: their mask is empty and the row is w's first */
                    const float *row = w + (size_t)(o < out ? o : 0) * in;
                    const __m512 v = _mm512_maskz_loadu_ps(mask, row + kb * 32 + half);
                    const __m256bh high = _mm512_cvtneps_pbh(v);
                    const __m256bh low = _mm512_cvtneps_pbh(_mm512_sub_ps(v, widen(high)));
                    unsigned short h[16], l[16];
                    _mm256_storeu_si256((__m256i *)h, (__m256i)high);
                    _mm256_storeu_si256((__m256i *)l, (__m256i)low);
                    for (int i = 0; i < 16; i++) { /* input pair (half + i) / 2, member i % 2 */
                        const int at = (half + i) / 2 * 32 + n * 2 + i % 2;
                        hi[at] = h[i];
                        lo[at] = l[i];
                    }
                }
            }
        }
    }
    return 0;
#else
    (void)w, (void)out, (void)in, (void)packed;
    return -1;
#endif
}

/*
 * y (rows, out) = x (rows, in) @ w.T + bias, GELU'd where `gelu`; x's rows `stride` floats
 * apart, w packed by gptserve_bf16x3_pack, bias NULL for none. Returns 0, or -1 where this build
 * has no AMX or the tiles are not granted (gptserve_bf16x3_ready).
 */
int gptserve_bf16x3_linear(const float *x, int rows, int in, int stride,
                           const unsigned short *packed, int out, const float *bias, int gelu,
                           float *y, void *scratch, int threads) {
#if BF16X3
    if (!gptserve_bf16x3_ready()) return -1;
    const int padded_rows = round_up(rows, 16), kblocks = round_up(in, 32) / 32;
    const size_t activations = (size_t)padded_rows * kblocks * 32;
    unsigned short *xh = (unsigned short *)(((size_t)scratch + 63) & ~(size_t)63);
    unsigned short *xl = xh + activations;
    const int pairs = round_up(out, 32) / 32;
    const size_t block_stride = (size_t)kblocks * 2 * X3_TILE; /* one block of 16 outputs */
    /* pairs of output blocks walked over all rows at a time: up to 1 MiB of packed weight
     * (4 KiB per pair per 32 inputs; 768 KiB for gpt2's layers), which stays in L2 */
    int panel = 256 / kblocks;
    panel = panel < 1 ? 1 : panel > 8 ? 8 : panel;
#pragma omp parallel num_threads(threads)
    {
        const int nth = omp_get_num_threads(), me = omp_get_thread_num();
#pragma omp for schedule(static)
        for (int m = 0; m < padded_rows; m += 16) {
            const size_t at = (size_t)m * kblocks * 32;
            split_block(x + (size_t)m * stride, rows - m < 16 ? rows - m : 16, in, stride,
                        xh + at, xl + at);
        }
        configure_tiles();
        float tile[256] __attribute__((aligned(64)));
        const int share = (pairs + nth - 1) / nth;
        const int first = me * share, last = first + share < pairs ? first + share : pairs;
        for (int p0 = first; p0 < last; p0 += panel)
            for (int m = 0; m < padded_rows; m += 32) {
                const int two = padded_rows - m >= 32; /* a second block of 16 rows */
                const unsigned short *a0h = xh + (size_t)m * kblocks * 32;
                const unsigned short *a0l = xl + (size_t)m * kblocks * 32;
                const unsigned short *a1h = a0h + (size_t)16 * kblocks * 32;
                const unsigned short *a1l = a0l + (size_t)16 * kblocks * 32;
                for (int p = p0; p < p0 + panel && p < last; p++) {
                    const unsigned short *w0 = packed + (size_t)2 * p * block_stride;
                    const unsigned short *w1 = w0 + block_stride;
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    for (int kb = 0; kb < kblocks; kb++) {
                        const unsigned short *t0 = w0 + (size_t)kb * 2 * X3_TILE;
                        const unsigned short *t1 = w1 + (size_t)kb * 2 * X3_TILE;
                        const size_t a = (size_t)kb * X3_TILE;
                        /* the weights stream from memory: the next 32 inputs' tiles into L1,
                         * those L2_AHEAD steps on into L2 (~15% off a 32-row gpt2 step) */
                        for (int line = 0; line < 2 * X3_TILE && kb + 1 < kblocks; line += 32) {
                            _mm_prefetch((const char *)(t0 + 2 * X3_TILE + line), _MM_HINT_T0);
                            _mm_prefetch((const char *)(t1 + 2 * X3_TILE + line), _MM_HINT_T0);
                            if (kb + L2_AHEAD < kblocks) {
                                _mm_prefetch((const char *)(t0 + L2_AHEAD * 2 * X3_TILE + line),
                                             _MM_HINT_T1);
                                _mm_prefetch((const char *)(t1 + L2_AHEAD * 2 * X3_TILE + line),
                                             _MM_HINT_T1);
                            }
                        }
                        /* hi(x) hi(w) */
                        _tile_loadd(4, a0h + a, 64);
                        _tile_loadd(6, t0, 64);
                        _tile_loadd(7, t1, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        if (two) {
                            _tile_loadd(5, a1h + a, 64);
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                        /* lo(x) hi(w) */
                        _tile_loadd(4, a0l + a, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        if (two) {
                            _tile_loadd(5, a1l + a, 64);
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                        /* hi(x) lo(w) */
                        _tile_loadd(4, a0h + a, 64);
                        _tile_loadd(6, t0 + X3_TILE, 64);
                        _tile_loadd(7, t1 + X3_TILE, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        if (two) {
                            _tile_loadd(5, a1h + a, 64);
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                    }
                    const int o0 = 32 * p;
                    _tile_stored(0, tile, 64);
                    emit(tile, rows - m < 16 ? rows - m : 16, o0, out, bias, gelu, y, m);
                    _tile_stored(1, tile, 64);
                    emit(tile, rows - m < 16 ? rows - m : 16, o0 + 16, out, bias, gelu, y, m);
                    if (two) {
                        _tile_stored(2, tile, 64);
                        emit(tile, rows - m - 16 < 16 ? rows - m - 16 : 16, o0, out, bias, gelu,
                             y, m + 16);
                        _tile_stored(3, tile, 64);
                        emit(tile, rows - m - 16 < 16 ? rows - m - 16 : 16, o0 + 16, out, bias,
                             gelu, y, m + 16);
                    }
                }
            }
        _tile_release();
    }
    return 0;
#else
    (void)x, (void)rows, (void)in, (void)stride, (void)packed, (void)out, (void)bias, (void)gelu;
    (void)y, (void)scratch, (void)threads;
    return -1;
#endif
}

#if !BF16X3
int gptserve_bf16x3_ready(void) { return 0; }
#endif
