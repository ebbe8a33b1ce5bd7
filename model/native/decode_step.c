/*
 * A GPT-2 decode step for the CPU, float32, in one OpenMP parallel region.
 *
 * A decode step of a few rows reads every weight once, so on a CPU it takes as long as reading
 * ~500 MB (gpt2) from memory, plus whatever else it does. Run as ~200 separate torch calls it
 * adds ~3 ms of dispatch, small kernels and thread wake-ups to each ~20 ms step, and each linear
 * layer's matrix-vector product is one more parallel region whose threads start and stop. Here
 * the whole step is one region: the threads stream the weights, meet at a barrier where the
 * data dependences need it (~10 per layer), and do the small work (LayerNorm, attention, GELU)
 * in between.
 *
 * Linear layers. A weight is either row-major (out, in), as torch stores nn.Linear's, or
 * column-major (its transpose (in, out) contiguous, see model/weight_layout.py). Column-major:
 * each thread takes a contiguous band of the input features, so it reads one contiguous part of
 * the weight from start to end, and accumulates a partial output; the partials are summed
 * afterwards. Row-major: each thread takes a contiguous band of output features (dot products).
 * Either way each thread streams its own contiguous part of the weight, which is what the
 * hardware prefetchers do best.
 *
 * int8 weights (model/quantize.py: integers per output channel times a scale) are read as int8,
 * one byte per weight. Where the CPU has int8 dot products (AVX512-VNNI) and the caller asks for
 * them (Linear.int8_dot), each row of activations is rounded to 8 bits on its own scale
 * (max|x| / 127; torch's int8 layers use one 7-bit scale for the whole batch) and multiplied
 * with them, 64 weights an instruction: reading the weights, not widening them, then sets the
 * pace. Otherwise the weights are widened to float32 in registers and the activations stay
 * float32, so the step computes exactly what a float32 model with the dequantized weights
 * would. The KV cache may be float32 or bfloat16 (rounded to nearest even on the way in, as
 * torch rounds).
 *
 * Everything is computed in float32 with the same formulas as model/gpt2.py (tanh GELU, the
 * LayerNorm's biased variance, attention scaled by 1/sqrt(head_dim)); only the order of the
 * sums differs, so the logits agree with torch's to float rounding (~1e-5).
 *
 * The caller (model/native_decode.py) checks shapes, dtypes and contiguity; this file trusts
 * what it is given.
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <string.h>

/* int8 weights through the CPU's int8 dot products (AVX512-VNNI) where it has them */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define INT8_DOT 1
#else
#define INT8_DOT 0
#endif

#define GPTSERVE_NATIVE_ABI 4
#define MAX_ROWS 16
#define TILE_BYTES (256 * 1024) /* a column-major band's partial outputs kept per pass */

typedef struct {
    const float *weight; /* (out, in) row-major, or (in, out) contiguous when column_major */
    const float *bias;   /* (out) or NULL */
    int in_features, out_features, column_major;
    /* int8 weights instead (weight NULL): (in, out) contiguous, output o's are scales[o] times
     * the stored integers */
    const signed char *qweight;
    const float *scales;
    /* int8_dot: qweight is (out, in) row-major instead, wsum[o] the sum of row o's integers,
     * and the activations are rounded to 8 bits per row to multiply with the CPU's int8 dot
     * products (only where gptserve_int8_dot() says the build has them) */
    const int *wsum;
    int int8_dot;
} Linear;

typedef struct {
    const float *ln_1_weight, *ln_1_bias;
    Linear qkv, out;
    const float *ln_2_weight, *ln_2_bias;
    Linear up, down;
} Block;

typedef struct {
    int n_layer, n_embd, n_head, vocab_size;
    float eps;
    const float *wte; /* (vocab, n_embd); column-major when wte_column_major */
    int wte_column_major;
    const float *wpe; /* (positions, n_embd) row-major */
    const Block *blocks;
    const float *ln_f_weight, *ln_f_bias;
    Linear head;
} Model;

enum Epilogue { STORE, GELU, ADD_TO };

int gptserve_native_abi(void) { return GPTSERVE_NATIVE_ABI; }
int gptserve_int8_dot(void) { return INT8_DOT; }
int gptserve_max_rows(void) { return MAX_ROWS; }

static int max_out(const Model *m) {
    int widest = 4 * m->n_embd;
    return m->head.out_features > widest ? m->head.out_features : widest;
}

/* Floats of workspace a call of `rows` rows over a cache of `max_len` positions needs. */
size_t gptserve_workspace_floats(const Model *m, int rows, int max_len, int threads) {
    size_t c = (size_t)m->n_embd, r = (size_t)rows, t = (size_t)threads;
    return r * c             /* x: the residual stream */
           + t * r * c       /* each thread's LayerNorm output */
           + r * 3 * c       /* q, k, v */
           + r * c           /* attention output */
           + r * 4 * c       /* GELU(up) */
           + t * r * (size_t)max_out(m) /* partial outputs of the linears */
           + t * (size_t)max_len        /* attention scores */
           + t * (r * c + r + 16)       /* each thread's 8-bit activations (int8_dot) */
           + 64;                        /* alignment slack */
}

/* exp(r) for the reduced argument |r| <= ln(2)/2, in Horner form; r a float or a floats16 */
#define EXP_POLY(r)                                                                             \
    ((((((1.9875691500e-4f * (r) + 1.3981999507e-3f) * (r) + 8.3334519073e-3f) * (r) +          \
        4.1665795894e-2f) * (r) + 1.6666665459e-1f) * (r) + 5.0000001201e-1f) * (r) * (r) +     \
     (r) + 1.0f)

/* exp(x) for the softmax: Cody-Waite range reduction and a degree-6 polynomial. Relative error
 * ~2e-7 over the clamped range; below it the result is ~1e-38 instead of 0, which no sum
 * notices. exp16 below is the same on 16 floats at a time (the bit cast here keeps compilers
 * from vectorizing loops over this one). */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    const float p = EXP_POLY(r);
    union { int i; float f; } scale;
    scale.i = ((int)n + 127) << 23;
    return p * scale.f;
}

/* GPT-2's GELU, tanh form: 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))), with
 * tanh(z) = 1 - 2 / (exp(2z) + 1). */
static inline float gelu(float u) {
    float z = 0.7978845608028654f * (u + 0.044715f * u * u * u);
    float tanh_z = 1.0f - 2.0f / (exp_approx(2.0f * z) + 1.0f);
    return 0.5f * u * (1.0f + tanh_z);
}

/* The same GELU on 16 floats at a time, in GCC's vector extension: the scalar form's bit cast
 * keeps compilers from vectorizing it, and here a vector cast reinterprets the bits. */
typedef float floats16 __attribute__((vector_size(64)));
typedef int ints16 __attribute__((vector_size(64)));

static inline floats16 splat(float value) { return (floats16){0} + value; }

/* where `when` is all ones, a; else b */
static inline floats16 pick(ints16 when, floats16 a, floats16 b) {
    return (floats16)(((ints16)a & when) | ((ints16)b & ~when));
}

static inline floats16 exp16(floats16 x) {
    x = pick(x < splat(-87.0f), splat(-87.0f), x);
    x = pick(x > splat(88.0f), splat(88.0f), x);
    const floats16 scaled = x * 1.44269504088896341f + 0.5f;
    ints16 whole = __builtin_convertvector(scaled, ints16);
    whole += __builtin_convertvector(whole, floats16) > scaled; /* floor: -1 where rounded up */
    const floats16 n = __builtin_convertvector(whole, floats16);
    floats16 r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    return EXP_POLY(r) * (floats16)((whole + 127) << 23);
}

static void gelu_range(float *restrict x, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        floats16 u;
        memcpy(&u, x + i, sizeof u);
        const floats16 z = 0.7978845608028654f * (u + 0.044715f * u * u * u);
        const floats16 tanh_z = 1.0f - 2.0f / (exp16(2.0f * z) + 1.0f);
        u = 0.5f * u * (1.0f + tanh_z);
        memcpy(x + i, &u, sizeof u);
    }
    for (; i < n; i++) x[i] = gelu(x[i]);
}

static void layer_norm(const float *x, float *out, int rows, int width, const float *weight,
                       const float *bias, float eps) {
    for (int r = 0; r < rows; r++) {
        const float *row = x + (size_t)r * width;
        float *dst = out + (size_t)r * width;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int c = 0; c < width; c++) sum += row[c];
        float mean = sum / (float)width, squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int c = 0; c < width; c++) squares += (row[c] - mean) * (row[c] - mean);
        float inv = 1.0f / sqrtf(squares / (float)width + eps);
#pragma omp simd
        for (int c = 0; c < width; c++) dst[c] = (row[c] - mean) * inv * weight[c] + bias[c];
    }
}

/* Column-major, one step of eight weight rows (input features i .. i + 7) for a group of R
 * rows (a constant where it is inlined, so the row loop unrolls), over the outputs
 * [o0, o0 + n): every weight is loaded once for all R rows. Defined for float32 weights and for
 * int8 ones, each widened to float once for all R rows (the scale is applied to the sums, in
 * linear_finish). */
#define DEFINE_COLUMN_STEP8(NAME, T)                                                            \
    static inline __attribute__((always_inline)) void NAME(const T *w, int out, const float *x, \
                                                           int in, int R, float *partial,       \
                                                           int o0, int n) {                     \
        float xs[4][8];                                                                         \
        for (int r = 0; r < R; r++)                                                             \
            for (int k = 0; k < 8; k++) xs[r][k] = x[(size_t)r * in + k];                       \
        _Pragma("omp simd") for (int o = 0; o < n; o++) {                                       \
            const float w0 = w[o], w1 = w[out + o], w2 = w[2 * out + o], w3 = w[3 * out + o];   \
            const float w4 = w[4 * out + o], w5 = w[5 * out + o], w6 = w[6 * out + o];          \
            const float w7 = w[7 * out + o];                                                    \
            for (int r = 0; r < R; r++) {                                                       \
                const float *c = xs[r];                                                         \
                partial[(size_t)r * out + o0 + o] += c[0] * w0 + c[1] * w1 + c[2] * w2 +        \
                                                     c[3] * w3 + c[4] * w4 + c[5] * w5 +        \
                                                     c[6] * w6 + c[7] * w7;                     \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_COLUMN_STEP8(column_step8, float)
DEFINE_COLUMN_STEP8(column_step8_int8, signed char)

/* Steps of eight weight rows from i on, up to i1, through STEP over WEIGHTS (float32 or int8),
 * for the rows in groups of up to four (each group size a constant for column_step8's unroll). */
#define COLUMN_STEPS(STEP, WEIGHTS)                                                             \
    for (; i + 8 <= i1; i += 8) {                                                               \
        const __typeof__(*(WEIGHTS)) *w = (WEIGHTS) + (size_t)i * out + o0;                    \
        for (int r0 = 0; r0 < rows; r0 += 4) {                                                  \
            const float *xr = x + (size_t)r0 * in + i;                                          \
            float *pr = partial + (size_t)r0 * out;                                             \
            switch (rows - r0 < 4 ? rows - r0 : 4) {                                            \
            case 1: STEP(w, out, xr, in, 1, pr, o0, n); break;                                  \
            case 2: STEP(w, out, xr, in, 2, pr, o0, n); break;                                  \
            case 3: STEP(w, out, xr, in, 3, pr, o0, n); break;                                  \
            default: STEP(w, out, xr, in, 4, pr, o0, n); break;                                 \
            }                                                                                   \
        }                                                                                       \
    }

/* Column-major: this thread's band of input features [i0, i1), partial sums over it for every
 * output and row, in tiles of outputs small enough to stay in cache across the band. Each
 * eight weight rows are read from memory once and used by the rows in groups of up to four. */
static void column_band(const Linear *L, const float *x, int rows, float *partial, int i0,
                        int i1) {
    const int in = L->in_features, out = L->out_features;
    int tile = TILE_BYTES / (4 * rows);
    tile = tile >= out ? out : (tile & ~15);
    for (int o0 = 0; o0 < out; o0 += tile) {
        const int n = o0 + tile <= out ? tile : out - o0;
        for (int r = 0; r < rows; r++) memset(partial + (size_t)r * out + o0, 0, sizeof(float) * n);
        int i = i0;
        if (L->qweight)
            COLUMN_STEPS(column_step8_int8, L->qweight)
        else
            COLUMN_STEPS(column_step8, L->weight)
        for (; i < i1; i++) {
            for (int r = 0; r < rows; r++) {
                const float c = x[(size_t)r * in + i];
                float *acc = partial + (size_t)r * out + o0;
                if (L->qweight) {
                    const signed char *q = L->qweight + (size_t)i * out + o0;
#pragma omp simd
                    for (int o = 0; o < n; o++) acc[o] += c * (float)q[o];
                } else {
                    const float *w = L->weight + (size_t)i * out + o0;
#pragma omp simd
                    for (int o = 0; o < n; o++) acc[o] += c * w[o];
                }
            }
        }
    }
}

/* Row-major: dot products for the outputs [o0, o1), four weight rows at a time. */
static void row_band(const Linear *L, const float *x, int rows, float *result, int o0, int o1) {
    const int in = L->in_features, out = L->out_features;
    int o = o0;
    for (; o + 4 <= o1; o += 4) {
        const float *w0 = L->weight + (size_t)o * in;
        const float *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
        for (int r = 0; r < rows; r++) {
            const float *xr = x + (size_t)r * in;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
            for (int i = 0; i < in; i++) {
                a0 += w0[i] * xr[i];
                a1 += w1[i] * xr[i];
                a2 += w2[i] * xr[i];
                a3 += w3[i] * xr[i];
            }
            float *dst = result + (size_t)r * out + o;
            dst[0] = a0, dst[1] = a1, dst[2] = a2, dst[3] = a3;
        }
    }
    for (; o < o1; o++) {
        const float *w = L->weight + (size_t)o * in;
        for (int r = 0; r < rows; r++) {
            const float *xr = x + (size_t)r * in;
            float a = 0.0f;
#pragma omp simd reduction(+ : a)
            for (int i = 0; i < in; i++) a += w[i] * xr[i];
            result[(size_t)r * out + o] = a;
        }
    }
}

#if INT8_DOT
/* Rows of x (rows, in) rounded to 8 bits, each on its own scale: q = round(x * 127 / max|x|) +
 * 128, in 1..255 (unsigned, as the dot product instruction takes them), and the row's step
 * max|x| / 127 into steps[r]. */
static void quantize_rows(const float *x, int rows, int in, unsigned char *q, float *steps) {
    for (int r = 0; r < rows; r++) {
        const float *row = x + (size_t)r * in;
        __m512 tops = _mm512_setzero_ps();
        int i = 0;
        for (; i + 16 <= in; i += 16)
            tops = _mm512_max_ps(tops, _mm512_abs_ps(_mm512_loadu_ps(row + i)));
        float top = _mm512_reduce_max_ps(tops);
        for (; i < in; i++) top = fmaxf(top, fabsf(row[i]));
        const float inv = top > 0.0f ? 127.0f / top : 0.0f;
        steps[r] = top / 127.0f;
        unsigned char *qr = q + (size_t)r * in;
        /* clamped first: a NaN or infinite activation gives an edge value, not undefined
         * behaviour (the logits are NaN or meaningless then either way); converted rounding
         * to nearest even, as nearbyintf does */
        const __m512 scale = _mm512_set1_ps(inv), low = _mm512_set1_ps(-127.0f);
        const __m512 high = _mm512_set1_ps(127.0f);
        const __m512i zero_point = _mm512_set1_epi32(128);
        for (i = 0; i + 16 <= in; i += 16) {
            const __m512 v = _mm512_min_ps(
                _mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(row + i), scale), low), high);
            const __m512i n = _mm512_add_epi32(_mm512_cvtps_epi32(v), zero_point);
            _mm_storeu_si128((__m128i *)(qr + i), _mm512_cvtepi32_epi8(n));
        }
        for (; i < in; i++)
            qr[i] = (unsigned char)((int)nearbyintf(fminf(fmaxf(row[i] * inv, -127.0f), 127.0f)) +
                                    128);
    }
}

/* N (a constant where inlined) int8 weight rows from w (stride in) against one row of 8-bit
 * activations: the integer dot products, less 128 times the rows' sums, times the step. */
static inline __attribute__((always_inline)) void
int8_dots(const signed char *w, int in, const int *wsum, const unsigned char *q, float step,
          const int N, float *dst) {
    __m512i acc[4];
    for (int j = 0; j < N; j++) acc[j] = _mm512_setzero_si512();
    int i = 0;
    for (; i + 64 <= in; i += 64) {
        const __m512i xv = _mm512_loadu_si512(q + i);
        for (int j = 0; j < N; j++)
            acc[j] = _mm512_dpbusd_epi32(acc[j], xv, _mm512_loadu_si512(w + (size_t)j * in + i));
    }
    if (i < in) {
        const __mmask64 m = ~0ULL >> (64 - (in - i));
        const __m512i xv = _mm512_maskz_loadu_epi8(m, q + i);
        for (int j = 0; j < N; j++)
            acc[j] = _mm512_dpbusd_epi32(acc[j], xv,
                                         _mm512_maskz_loadu_epi8(m, w + (size_t)j * in + i));
    }
    for (int j = 0; j < N; j++)
        dst[j] = (float)(_mm512_reduce_add_epi32(acc[j]) - 128 * wsum[j]) * step;
}

/* Row-major int8 with the dot products: the outputs [o0, o1), four weight rows at a time, into
 * result (rows, out), before their scales and biases (linear_finish applies them). */
static void int8_row_band(const Linear *L, const unsigned char *q, const float *steps, int rows,
                          float *result, int o0, int o1) {
    const int in = L->in_features, out = L->out_features;
    int o = o0;
    for (; o + 4 <= o1; o += 4)
        for (int r = 0; r < rows; r++)
            int8_dots(L->qweight + (size_t)o * in, in, L->wsum + o, q + (size_t)r * in, steps[r],
                      4, result + (size_t)r * out + o);
    for (; o < o1; o++)
        for (int r = 0; r < rows; r++)
            int8_dots(L->qweight + (size_t)o * in, in, L->wsum + o, q + (size_t)r * in, steps[r],
                      1, result + (size_t)r * out + o);
}
#endif

/* x (rows, in) through a linear layer, inside the parallel region: every thread computes its
 * band into `partials` (one block of rows * out per thread); returns how many blocks hold
 * partial sums (the threads' count for column-major, 1 for row-major, whose threads each
 * write final sums for their outputs into the first block). Ends with a barrier. */
static int linear_partials(const Linear *L, const float *x, int rows, float *partials,
                           float *scratch) {
    const int thread = omp_get_thread_num(), threads = omp_get_num_threads();
#if INT8_DOT
    if (L->int8_dot) { /* each thread rounds the rows itself: cheaper than a barrier */
        const int out = L->out_features;
        float *steps = scratch;
        unsigned char *q = (unsigned char *)(scratch + 16 * ((rows + 15) / 16));
        quantize_rows(x, rows, L->in_features, q, steps);
        int band = (out + threads - 1) / threads;
        band = (band + 15) & ~15;
        int o0 = thread * band, o1 = o0 + band;
        if (o1 > out) o1 = out;
        if (o0 > out) o0 = out;
        int8_row_band(L, q, steps, rows, partials, o0, o1);
#pragma omp barrier
        return 1;
    }
#else
    (void)scratch; /* int8_dot is never set without INT8_DOT: the caller asks first */
#endif
    if (L->column_major || L->qweight) {
        const int in = L->in_features;
        int band = (in + threads - 1) / threads;
        band = (band + 7) & ~7;
        int i0 = thread * band, i1 = i0 + band;
        if (i1 > in) i1 = in;
        if (i0 > in) i0 = in;
        column_band(L, x, rows, partials + (size_t)thread * rows * L->out_features, i0, i1);
#pragma omp barrier
        return threads;
    }
    const int out = L->out_features;
    int band = (out + threads - 1) / threads;
    band = (band + 15) & ~15;
    int o0 = thread * band, o1 = o0 + band;
    if (o1 > out) o1 = out;
    if (o0 > out) o0 = out;
    row_band(L, x, rows, partials, o0, o1);
#pragma omp barrier
    return 1;
}

/* Sum the partial outputs, add the bias and apply the epilogue into dst (rows, out): STORE
 * writes, GELU writes gelu(.), ADD_TO adds to dst (the residual). Work-shared; ends with the
 * loop's barrier. */
static void linear_finish(const Linear *L, const float *partials, int blocks, int rows,
                          float *dst, enum Epilogue epilogue) {
    const int out = L->out_features;
    const size_t block = (size_t)rows * out;
#pragma omp for schedule(static)
    for (int o0 = 0; o0 < out; o0 += 64) {
        const int o1 = o0 + 64 <= out ? o0 + 64 : out;
        for (int r = 0; r < rows; r++) {
            const size_t at = (size_t)r * out;
            float *d = dst + at;
#pragma omp simd
            for (int o = o0; o < o1; o++) {
                float sum = 0.0f;
                for (int b = 0; b < blocks; b++) sum += partials[b * block + at + o];
                if (L->scales) sum *= L->scales[o];
                if (L->bias) sum += L->bias[o];
                if (epilogue == ADD_TO) sum += d[o];
                d[o] = sum;
            }
            if (epilogue == GELU) gelu_range(d + o0, o1 - o0);
        }
    }
}

/* bfloat16 keys and values: the upper half of a float32's bits, rounded to nearest even on the
 * way in as torch rounds them. */
static inline float from_bf16(unsigned short h) {
    union { unsigned int u; float f; } c;
    c.u = (unsigned int)h << 16;
    return c.f;
}

static inline unsigned short to_bf16(float f) {
    union { unsigned int u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN: torch's quiet NaN */
    return (unsigned short)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

/* One row's attention for one head over its first `length` positions: keys and values of
 * type T, read as float through LOAD. */
#define DEFINE_ATTEND(NAME, T, LOAD)                                                            \
    static void NAME(const float *q, const T *keys, const T *values, int length, int head_dim,  \
                     float *scores, float *out) {                                               \
        const float scale = 1.0f / sqrtf((float)head_dim);                                      \
        float top = -INFINITY;                                                                  \
        for (int t = 0; t < length; t++) {                                                      \
            const T *k = keys + (size_t)t * head_dim;                                           \
            float dot = 0.0f;                                                                   \
            _Pragma("omp simd reduction(+ : dot)") for (int d = 0; d < head_dim; d++) dot +=    \
                q[d] * LOAD(k[d]);                                                              \
            scores[t] = dot * scale;                                                            \
            top = scores[t] > top ? scores[t] : top;                                            \
        }                                                                                       \
        float total = 0.0f;                                                                     \
        _Pragma("omp simd reduction(+ : total)") for (int t = 0; t < length; t++) {             \
            scores[t] = exp_approx(scores[t] - top);                                            \
            total += scores[t];                                                                 \
        }                                                                                       \
        for (int d = 0; d < head_dim; d++) out[d] = 0.0f;                                       \
        for (int t = 0; t < length; t++) {                                                      \
            const T *v = values + (size_t)t * head_dim;                                         \
            const float w = scores[t];                                                          \
            _Pragma("omp simd") for (int d = 0; d < head_dim; d++) out[d] += w * LOAD(v[d]);    \
        }                                                                                       \
        const float inv = 1.0f / total;                                                         \
        for (int d = 0; d < head_dim; d++) out[d] *= inv;                                       \
    }

#define AS_FLOAT(v) (v)
DEFINE_ATTEND(attend_f32, float, AS_FLOAT)
DEFINE_ATTEND(attend_bf16, unsigned short, from_bf16)

/* The same attention for batched steps, 16 floats at a time, for head sizes of 32, 64, 96 or
 * 128 (GPT-2's are 64). A row and head's keys (~100 at a time) are
 * a short stream, so keys are scored sixteen at a time (independent sums, reduced together):
 * memory, not arithmetic, then sets the pace.
 *
 * A bfloat16 value is the top half of a float32's bits, so a 32-bit lane holding two of them
 * gives the odd one by masking off the low half and the even one by shifting it up: no
 * shuffles. The bfloat16 path keeps vectors of even and of odd elements (the query arranged
 * the same way, the output put back in order at the end). Scores and sums are float32. */
typedef unsigned int words16 __attribute__((vector_size(64)));

/* vector i of a key or value row: float32, 16 elements from 16 * i; bfloat16, the even (i even)
 * or odd elements of the 32 from 32 * (i / 2) */
static inline __attribute__((always_inline)) floats16 lanes(const char *row, int i, int bf16) {
    if (!bf16) {
        floats16 v;
        memcpy(&v, row + 64 * i, sizeof v);
        return v;
    }
    words16 w;
    memcpy(&w, row + 64 * (i / 2), sizeof w);
    return (floats16)(i % 2 ? w & 0xffff0000u : w << 16);
}

/* Lanes of two vectors picked by constant indices (0-15 from a, 16-31 from b): GCC's and
 * clang's spellings of the same vector extension. */
#ifdef __clang__
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (ints16){__VA_ARGS__})
#endif

/* the sum of a vector's 16 lanes, as a tree of shuffles (a loop over lanes is a chain of 16
 * dependent additions) */
static inline float sum16(floats16 v) {
    v += SHUFFLE(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += SHUFFLE(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += SHUFFLE(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += SHUFFLE(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
}

/* the lane sums of 16 vectors, as one vector (lane j: the sum of a[j]'s lanes): each level
 * adds pairs of vectors' halves, so 15 additions do the work of 16 sum16s (60 + their shuffles) */
static inline floats16 sum16x16(const floats16 a[16]) {
    floats16 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = SHUFFLE(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22,
                       23) +
               SHUFFLE(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                       29, 30, 31);
    for (int i = 0; i < 4; i++)
        c[i] = SHUFFLE(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25,
                       26, 27) +
               SHUFFLE(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28,
                       29, 30, 31);
    for (int i = 0; i < 2; i++)
        d[i] = SHUFFLE(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25,
                       28, 29) +
               SHUFFLE(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26,
                       27, 30, 31);
    return SHUFFLE(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           SHUFFLE(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* a query's n vectors in the order `lanes` reads a row (even and odd elements for bfloat16),
 * times `scale` */
static inline void arrange_query(const float *q, int n, int bf16, float scale, floats16 *qv) {
    for (int i = 0; i < n; i++) {
        for (int l = 0; l < 16; l++) qv[i][l] = q[bf16 ? 32 * (i / 2) + 2 * l + i % 2 : 16 * i + l];
        qv[i] *= scale;
    }
}

/* n accumulated vectors (in `lanes` order) times `scale`, back in the head's order */
static inline void put_in_order(const floats16 *acc, int n, int bf16, float scale, float *out) {
    for (int i = 0; i < n; i++) {
        const floats16 o = acc[i] * scale;
        for (int l = 0; l < 16; l++) out[bf16 ? 32 * (i / 2) + 2 * l + i % 2 : 16 * i + l] = o[l];
    }
}

/* scores[t] = q . key t (qv arranged and scaled), for the `length` rows from `keys`: sixteen
 * keys at a time, reduced together */
static inline __attribute__((always_inline)) void
score_keys(const floats16 *qv, const char *keys, size_t row, int bf16, int length, const int n,
           const char *prefetch, float *restrict scores) {
    int t = 0;
    for (; t + 16 <= length; t += 16) {
        const char *k = keys + t * row;
        if (prefetch)
            for (size_t b = 0; b < 16 * row; b += 64) __builtin_prefetch(prefetch + t * row + b);
        floats16 a[16];
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++) {
            a[j] = qv[0] * lanes(k + j * row, 0, bf16);
#pragma GCC unroll 8
            for (int i = 1; i < n; i++) a[j] += qv[i] * lanes(k + j * row, i, bf16);
        }
        const floats16 s = sum16x16(a);
        memcpy(scores + t, &s, sizeof s);
    }
    for (; t < length; t++) {
        floats16 a = {0};
        for (int i = 0; i < n; i++) a += qv[i] * lanes(keys + t * row, i, bf16);
        scores[t] = sum16(a);
    }
}

/* softmax numerators of scores[0..length) in place (exp(s - max)); returns their sum */
static inline float exp_scores(float *restrict scores, int length) {
    floats16 tops = splat(-INFINITY);
    int t;
    for (t = 0; t + 16 <= length; t += 16) {
        floats16 s;
        memcpy(&s, scores + t, sizeof s);
        tops = pick(s > tops, s, tops);
    }
    float top = -INFINITY;
    for (int i = 0; i < 16; i++) top = tops[i] > top ? tops[i] : top;
    for (; t < length; t++) top = scores[t] > top ? scores[t] : top;
    floats16 totals = {0};
    for (t = 0; t + 16 <= length; t += 16) {
        floats16 s;
        memcpy(&s, scores + t, sizeof s);
        s = exp16(s - top);
        memcpy(scores + t, &s, sizeof s);
        totals += s;
    }
    float total = sum16(totals);
    for (; t < length; t++) total += scores[t] = exp_approx(scores[t] - top);
    return total;
}

/* acc += sum over t < length of weights[t] * value row t */
static inline __attribute__((always_inline)) void
add_values(const float *weights, const char *values, size_t row, int bf16, int length,
           const int n, floats16 *acc) {
    floats16 acc2[8];
    for (int i = 0; i < n; i++) acc2[i] = (floats16){0};
    int t = 0;
    for (; t + 2 <= length; t += 2) {
        const char *v = values + t * row;
#pragma GCC unroll 8
        for (int i = 0; i < n; i++) {
            acc[i] += weights[t] * lanes(v, i, bf16);
            acc2[i] += weights[t + 1] * lanes(v + row, i, bf16);
        }
    }
    if (t < length)
        for (int i = 0; i < n; i++) acc[i] += weights[t] * lanes(values + t * row, i, bf16);
    for (int i = 0; i < n; i++) acc[i] += acc2[i];
}

static inline __attribute__((always_inline)) void
attend_wide_n(const float *q, const char *keys, const char *values, const int bf16, int length,
              const int n, float *restrict scores, float *out) {
    const size_t row = (size_t)n * 16 * (bf16 ? 2 : 4);
    floats16 qv[8], acc[8];
    arrange_query(q, n, bf16, 1.0f / sqrtf((float)(16 * n)), qv);
    /* the values' lines are fetched while the keys are scored */
    score_keys(qv, keys, row, bf16, length, n, values, scores);
    const float total = exp_scores(scores, length);
    for (int i = 0; i < n; i++) acc[i] = (floats16){0};
    add_values(scores, values, row, bf16, length, n, acc);
    put_in_order(acc, n, bf16, 1.0f / total, out);
}

/* One row's attention for one head: attend_wide_n with the head size and the cache's type known
 * to the compiler, or the plain loop for head sizes it has no case for */
static void attend_wide(const float *q, const char *keys, const char *values, int bf16, int length,
                        int D, float *scores, float *out) {
#define ATTEND_CASE(N)                                                                      \
    case N:                                                                                 \
        if (bf16)                                                                           \
            attend_wide_n(q, keys, values, 1, length, N, scores, out);                      \
        else                                                                                \
            attend_wide_n(q, keys, values, 0, length, N, scores, out);                      \
        return;
    switch (D % 16 ? 0 : D / 16) { /* the cases cover whole multiples of 16 only */
        ATTEND_CASE(2)
        ATTEND_CASE(4)
        ATTEND_CASE(6)
        ATTEND_CASE(8)
    default: /* other sizes: the plain loop (gptserve_attend routes them there already) */
        if (bf16)
            attend_bf16(q, (const unsigned short *)keys, (const unsigned short *)values, length, D,
                        scores, out);
        else
            attend_f32(q, (const float *)keys, (const float *)values, length, D, scores, out);
    }
#undef ATTEND_CASE
}

/* Row r's key and value for head h, from qkv (rows, 3C), into the cache at `at` (float32, or
 * bfloat16 rounded to nearest even). */
static void store_key_value(const float *qkv, void *k_cache, void *v_cache, int kv_bf16,
                            size_t at, int C, int D, int r, int h) {
    const float *key = qkv + (size_t)r * 3 * C + C + h * D, *value = key + C;
    if (kv_bf16) {
        unsigned short *k = (unsigned short *)k_cache + at, *v = (unsigned short *)v_cache + at;
        for (int d = 0; d < D; d++) k[d] = to_bf16(key[d]), v[d] = to_bf16(value[d]);
    } else {
        memcpy((float *)k_cache + at, key, sizeof(float) * D);
        memcpy((float *)v_cache + at, value, sizeof(float) * D);
    }
}

static float *aligned(float *p) { return (float *)(((size_t)p + 63) & ~(size_t)63); }

/*
 * Feed tokens[r] at positions[r] of cache slot slots[r], for each of `rows` rows, and write the
 * logits (rows, vocab) to `logits`. Each row's key and value are stored in the cache (layout
 * (n_layer, num_slots, n_head, max_len, head_dim), float32, or bfloat16 with kv_bf16) before
 * any row attends, so rows of
 * one slot at consecutive positions attend causally over each other (a speculative check).
 * Returns 0, or -1 when `rows` is out of range.
 */
int gptserve_decode(const Model *m, void *k_cache, void *v_cache, int kv_bf16, int num_slots,
                    int max_len, int rows, const int *tokens, const int *slots,
                    const int *positions, int threads, float *workspace, float *logits) {
    if (rows < 1 || rows > MAX_ROWS) return -1;
    const int C = m->n_embd, H = m->n_head, D = C / H;
    float *x = aligned(workspace);
    float *norms = x + (size_t)rows * C;
    float *qkv = norms + (size_t)threads * rows * C;
    float *att = qkv + (size_t)rows * 3 * C;
    float *act = att + (size_t)rows * C;
    float *partials = act + (size_t)rows * 4 * C;
    float *scores = partials + (size_t)threads * rows * max_out(m);
    float *int8_scratch = scores + (size_t)threads * max_len;
    const size_t head_stride = (size_t)max_len * D;
    const size_t layer_stride = (size_t)num_slots * H * head_stride;

#pragma omp parallel num_threads(threads)
    {
        const int thread = omp_get_thread_num();
        float *norm = norms + (size_t)thread * rows * C;
        float *my_scores = scores + (size_t)thread * max_len;
        float *q8 = int8_scratch + (size_t)thread * ((size_t)rows * C + rows + 16);

#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++) {
            const int token = tokens[r];
            const float *pos = m->wpe + (size_t)positions[r] * C;
            float *dst = x + (size_t)r * C;
            if (m->wte_column_major) {
                for (int c = 0; c < C; c++) dst[c] = m->wte[(size_t)c * m->vocab_size + token] + pos[c];
            } else {
                const float *tok = m->wte + (size_t)token * C;
                for (int c = 0; c < C; c++) dst[c] = tok[c] + pos[c];
            }
        }

        for (int l = 0; l < m->n_layer; l++) {
            const Block *b = &m->blocks[l];
            const size_t layer_at = l * layer_stride;

            layer_norm(x, norm, rows, C, b->ln_1_weight, b->ln_1_bias, m->eps);
            int blocks = linear_partials(&b->qkv, norm, rows, partials, q8);
            linear_finish(&b->qkv, partials, blocks, rows, qkv, STORE);

            /* every row's key and value into the cache, before anyone attends */
#pragma omp for schedule(static)
            for (int item = 0; item < rows * H; item++) {
                const int r = item / H, h = item % H;
                const size_t at = layer_at + (size_t)slots[r] * H * head_stride + h * head_stride +
                                  (size_t)positions[r] * D;
                store_key_value(qkv, k_cache, v_cache, kv_bf16, at, C, D, r, h);
            }
#pragma omp for schedule(static)
            for (int item = 0; item < rows * H; item++) {
                const int r = item / H, h = item % H;
                const size_t at = layer_at + (size_t)slots[r] * H * head_stride + h * head_stride;
                const float *query = qkv + (size_t)r * 3 * C + h * D;
                float *dst = att + (size_t)r * C + h * D;
                const size_t width = kv_bf16 ? 2 : 4;
                attend_wide(query, (const char *)k_cache + at * width,
                            (const char *)v_cache + at * width, kv_bf16, positions[r] + 1, D,
                            my_scores, dst);
            }

            blocks = linear_partials(&b->out, att, rows, partials, q8);
            linear_finish(&b->out, partials, blocks, rows, x, ADD_TO);

            layer_norm(x, norm, rows, C, b->ln_2_weight, b->ln_2_bias, m->eps);
            blocks = linear_partials(&b->up, norm, rows, partials, q8);
            linear_finish(&b->up, partials, blocks, rows, act, GELU);
            blocks = linear_partials(&b->down, act, rows, partials, q8);
            linear_finish(&b->down, partials, blocks, rows, x, ADD_TO);
        }

        layer_norm(x, norm, rows, C, m->ln_f_weight, m->ln_f_bias, m->eps);
        const int blocks = linear_partials(&m->head, norm, rows, partials, q8);
        linear_finish(&m->head, partials, blocks, rows, logits, STORE);
    }
    return 0;
}


/*
 * For decode batches whose layers run on torch's kernels: store each row's key and value from
 * `qkv` (rows, 3 * n_head * head_dim) at positions[r] of slot slots[r] in layer `layer` of the
 * cache, the same bytes as torch's indexed assignment writes (bfloat16 rounded to nearest even),
 * without its per-call indexing work. Returns 0.
 */
int gptserve_store_kv(const float *qkv, void *k_cache, void *v_cache, int kv_bf16, int layer,
                      int num_slots, int max_len, int n_head, int head_dim, int rows,
                      const int *slots, const int *positions) {
    const int H = n_head, D = head_dim, C = H * D;
    const size_t head_stride = (size_t)max_len * D;
    const size_t layer_at = (size_t)layer * num_slots * H * head_stride;
    for (int r = 0; r < rows; r++) {
        for (int h = 0; h < H; h++) {
            const size_t at = layer_at + (size_t)slots[r] * H * head_stride + h * head_stride +
                              (size_t)positions[r] * D;
            store_key_value(qkv, k_cache, v_cache, kv_bf16, at, C, D, r, h);
        }
    }
    return 0;
}

/* GPT-2's GELU (tanh form) over n floats, in place: for up-projections whose kernel does not
 * apply it itself (torch's int8 ones), where torch's own GELU pass takes ~0.1 ms per layer at
 * 32 rows. */
void gptserve_gelu(float *x, long n, int threads) {
#pragma omp parallel num_threads(threads)
    {
        const long part = (n + omp_get_num_threads() - 1) / omp_get_num_threads();
        const long start = part * omp_get_thread_num();
        const long end = start + part < n ? start + part : n;
        if (start < end) gelu_range(x + start, (int)(end - start));
    }
}

/* The same GELU over n floats in place, on the calling thread: for matmul_bf16x3.c's outputs. */
void gptserve_gelu_range(float *x, int n) { gelu_range(x, n); }

#define SHARED_CHUNK 32 /* rows of a shared-prefix group attended together */

/* Floats of workspace per thread that the attention below needs over a cache of `max_len`
 * positions: one row's scores, or a chunk of a shared-prefix group's queries, sums and scores
 * (SharedSpace), with room to align each thread's part to 64 bytes. */
size_t gptserve_attend_floats(int max_len, int shared) {
    const size_t group = (2 * SHARED_CHUNK * 8 * 16 + SHARED_CHUNK) + SHARED_CHUNK * (size_t)(max_len + 16);
    return (shared ? group : (size_t)max_len + 16) + 16;
}

/*
 * For decode batches whose layers run on torch's kernels: each row's attention in layer `layer`
 * over its own slot's positions 0..positions[r] (its key and value there already stored), from
 * the queries in `qkv` (rows, 3 * n_head * head_dim) into `out` (rows, n_head * head_dim), in
 * float32; only the `count` rows listed in `only`, unless it is NULL. Unlike a padded batch
 * attention, a row reads only its own keys. Returns 0.
 */
int gptserve_attend(const float *qkv, const void *k_cache, const void *v_cache, int kv_bf16,
                    int layer, int num_slots, int max_len, int n_head, int head_dim, int rows,
                    const int *slots, const int *positions, const int *only, int count,
                    float *out, float *workspace, int threads) {
    if (!only) count = rows;
    const int H = n_head, D = head_dim, C = H * D;
    const size_t head_stride = (size_t)max_len * D, width = kv_bf16 ? 2 : 4;
    const size_t layer_at = (size_t)layer * num_slots * H * head_stride;
#pragma omp parallel num_threads(threads)
    {
        float *scores = workspace + (size_t)omp_get_thread_num() * gptserve_attend_floats(max_len, 0);
#pragma omp for schedule(static)
        for (int item = 0; item < count * H; item++) {
            const int r = only ? only[item / H] : item / H, h = item % H;
            const size_t at = layer_at + (size_t)slots[r] * H * head_stride + h * head_stride;
            const float *query = qkv + (size_t)r * 3 * C + h * D;
            float *dst = out + (size_t)r * C + h * D;
            if (item + 1 < count * H) { /* the next item's first keys, while this one runs */
                const int r2 = only ? only[(item + 1) / H] : (item + 1) / H, h2 = (item + 1) % H;
                const char *next = (const char *)k_cache +
                                   (layer_at + (size_t)slots[r2] * H * head_stride +
                                    h2 * head_stride) * width;
                for (size_t b = 0; b < 16 * D * width; b += 64) __builtin_prefetch(next + b);
            }
            attend_wide(query, (const char *)k_cache + at * width,
                        (const char *)v_cache + at * width, kv_bf16, positions[r] + 1, D, scores,
                        dst);
        }
    }
    return 0;
}

/* One head's attention for up to SHARED_CHUNK rows of a shared-prefix group: the prefix's keys
 * and values (slot `prefix`, positions below P) are read in blocks of PREFIX_BLOCK that stay in
 * the first-level cache while every row uses them; each row's own keys and values (its slot,
 * positions P..its position) after them, under one softmax. */
#define PREFIX_BLOCK 64

/* a thread's workspace for attend_group_n (in the caller's memory, not on the thread's stack,
 * which OMP_STACKSIZE may keep small) */
typedef struct {
    floats16 queries[SHARED_CHUNK][8], sums[SHARED_CHUNK][8];
    float totals[SHARED_CHUNK];
    float scores[]; /* SHARED_CHUNK rows of max_len + 16 */
} SharedSpace;

static inline __attribute__((always_inline)) void
attend_group_n(const float *qkv, const char *k_layer, const char *v_layer, const int bf16,
               size_t slot_bytes, size_t head_bytes, int C, int h, const int *group, int count,
               const int *slots, const int *positions, int prefix, int P, int stride,
               const int n, SharedSpace *space, float *out) {
    const int D = 16 * n;
    const size_t row = (size_t)D * (bf16 ? 2 : 4);
    const char *prefix_keys = k_layer + prefix * slot_bytes + h * head_bytes;
    const char *prefix_values = v_layer + prefix * slot_bytes + h * head_bytes;
    floats16(*qv)[8] = space->queries, (*acc)[8] = space->sums;
    float *totals = space->totals, *scores = space->scores;
    for (int g = 0; g < count; g++) {
        arrange_query(qkv + (size_t)group[g] * 3 * C + h * D, n, bf16, 1.0f / sqrtf((float)D),
                      qv[g]);
        for (int i = 0; i < n; i++) acc[g][i] = (floats16){0};
    }
    for (int t = 0; t < P; t += PREFIX_BLOCK) {
        const int block = P - t < PREFIX_BLOCK ? P - t : PREFIX_BLOCK;
        for (int g = 0; g < count; g++)
            score_keys(qv[g], prefix_keys + t * row, row, bf16, block, n, NULL,
                       scores + (size_t)g * stride + t);
    }
    for (int g = 0; g < count; g++) {
        const int r = group[g], own = positions[r] + 1 - P;
        const size_t at = slots[r] * slot_bytes + h * head_bytes + P * row;
        float *mine = scores + (size_t)g * stride;
        score_keys(qv[g], k_layer + at, row, bf16, own, n, NULL, mine + P);
        totals[g] = exp_scores(mine, P + own);
        add_values(mine + P, v_layer + at, row, bf16, own, n, acc[g]);
    }
    for (int t = 0; t < P; t += PREFIX_BLOCK) {
        const int block = P - t < PREFIX_BLOCK ? P - t : PREFIX_BLOCK;
        for (int g = 0; g < count; g++)
            add_values(scores + (size_t)g * stride + t, prefix_values + t * row, row, bf16, block,
                       n, acc[g]);
    }
    for (int g = 0; g < count; g++)
        put_in_order(acc[g], n, bf16, 1.0f / totals[g], out + (size_t)group[g] * C + h * D);
}

/*
 * The attention of a group of decode rows that share their first `prefix_len` tokens, in layer
 * `layer`: their keys and values there are read once, from slot `prefix_slot`, for all of them
 * (a few-shot header, n choices of one prompt), and each row's own after that from its slot, as
 * gptserve_attend would read them all from its own slot. group_rows: `group_size` indices into
 * the batch's rows, slots, positions; every position is at least prefix_len. Float32 scores and
 * sums. Returns 0, or -1 where the head size is not one attend_wide takes (the caller uses
 * torch's then).
 */
int gptserve_attend_shared(const float *qkv, const void *k_cache, const void *v_cache,
                           int kv_bf16, int layer, int num_slots, int max_len, int n_head,
                           int head_dim, const int *slots, const int *positions, int group_size,
                           const int *group_rows, int prefix_slot, int prefix_len, float *out,
                           float *workspace, int threads) {
    const int H = n_head, D = head_dim, C = H * D;
    if (D % 32 != 0 || D > 128) return -1;
    const size_t width = kv_bf16 ? 2 : 4, head_bytes = (size_t)max_len * D * width;
    const size_t slot_bytes = H * head_bytes;
    const char *k_layer = (const char *)k_cache + (size_t)layer * num_slots * slot_bytes;
    const char *v_layer = (const char *)v_cache + (size_t)layer * num_slots * slot_bytes;
    const int chunks = (group_size + SHARED_CHUNK - 1) / SHARED_CHUNK, stride = max_len + 16;
#pragma omp parallel num_threads(threads)
    {
        const size_t floats = gptserve_attend_floats(max_len, 1);
        SharedSpace *space = (SharedSpace *)aligned(workspace + omp_get_thread_num() * floats);
#pragma omp for schedule(static)
        for (int item = 0; item < H * chunks; item++) {
            const int h = item % H, first = item / H * SHARED_CHUNK;
            const int count = group_size - first < SHARED_CHUNK ? group_size - first : SHARED_CHUNK;
#define SHARED_CASE(N)                                                                          \
    case N:                                                                                     \
        if (kv_bf16)                                                                            \
            attend_group_n(qkv, k_layer, v_layer, 1, slot_bytes, head_bytes, C, h,              \
                           group_rows + first, count, slots, positions, prefix_slot,            \
                           prefix_len, stride, N, space, out);                                  \
        else                                                                                    \
            attend_group_n(qkv, k_layer, v_layer, 0, slot_bytes, head_bytes, C, h,              \
                           group_rows + first, count, slots, positions, prefix_slot,            \
                           prefix_len, stride, N, space, out);                                  \
        break;
            switch (D / 16) {
                SHARED_CASE(2)
                SHARED_CASE(4)
                SHARED_CASE(6)
                SHARED_CASE(8)
            }
#undef SHARED_CASE
        }
    }
    return 0;
}

/* The index of each row's largest value (the first, on ties), for `rows` rows of `n` floats:
 * greedy decoding's choice, in two vector passes over logits the step has just written (the
 * maximum, then where it first is). torch's argmax path there takes ~0.3 ms: a handful of ops,
 * each touching code and data that the weight stream has pushed out of the caches. A row with
 * a NaN gives the first NaN's index, as torch's argmax does. */
void gptserve_argmax(const float *x, long rows, long n, long *out) {
    for (long r = 0; r < rows; r++) {
        const float *row = x + r * n;
        floats16 tops = splat(-INFINITY);
        ints16 nan = {0};
        long i = 0;
        for (; i + 16 <= n; i += 16) {
            floats16 v;
            memcpy(&v, row + i, sizeof v);
            nan |= v != v;
            tops = pick(v > tops, v, tops);
        }
        float top = -INFINITY;
        int any_nan = 0;
        for (int l = 0; l < 16; l++) {
            top = tops[l] > top ? tops[l] : top;
            any_nan |= nan[l];
        }
        for (; i < n; i++) {
            top = row[i] > top ? row[i] : top;
            any_nan |= row[i] != row[i];
        }
        long best = 0;
        for (i = 0; i < n; i++) /* the first NaN, else the first maximum */
            if (any_nan ? row[i] != row[i] : row[i] == top) {
                best = i;
                break;
            }
        out[r] = best;
    }
}
