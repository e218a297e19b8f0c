/* layerline's quantized matmul kernels: y = x @ W^T computed straight from GGUF blocks.

   W is a matrix of N rows (output features) by K columns (input features), stored row by row in one of GGML's
   block formats exactly as a GGUF file holds it (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
   F16, BF16, F32). As llama.cpp does, the activations x (float32) are quantized to 8 bits per value first, in
   blocks matching the weight type (32 values with one float scale for the legacy types, 256 values with sums of
   every 16 for the k-quants), and each output is a sum of integer dot products scaled by the two blocks' scales.
   The weights are never expanded to floats in memory: a row's blocks are decoded in registers as they stream by.

   Also here: dequantizing rows of W to float32 (the reference the tests compare with, the embedding lookup and the
   tile-wise path for many rows), quantizing float32 weights to Q8_0 / Q4_1 blocks (quantization at load), and the
   small fusions a transformer layer wants around its matmuls (RMSNorm of the input, SwiGLU of the input, adding
   into the output).

   Portable C11 with AVX2 paths (selected at compile time: the library is built on the machine that runs it, with
   -march=native) and plain C for everything else. Threads: OpenMP over output rows, as many as the caller says
   (torch's count: OpenMP's own setting is per calling thread, and a stage computes on a thread torch never set);
   the library is loaded into a process that already holds torch's OpenMP runtime, so both share one pool.
   This file knows nothing of models, files or Python. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LL_AVX2 1
#include <immintrin.h>
#else
#define LL_AVX2 0
#endif

/* VNNI (AVX512-VNNI with VL, or AVX-VNNI): one instruction for "unsigned bytes times signed bytes, summed in fours,
   added to int32 lanes"; the same integers as AVX2's maddubs + madd (no sum here can saturate an int16). */
#if LL_AVX2 && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LL_VNNI 1
#define dpbusd(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif LL_AVX2 && defined(__AVXVNNI__)
#define LL_VNNI 1
#define dpbusd(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#else
#define LL_VNNI 0
#endif

/* GGML type numbers (gguf.GGMLQuantizationType) */
enum {
    T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_BF16 = 30
};

#define QK 32    /* values per legacy block */
#define QKK 256  /* values per k-quant super-block */

typedef uint16_t f16_t;

typedef struct { f16_t d; uint8_t qs[16]; } blk_q4_0;
typedef struct { f16_t d, m; uint8_t qs[16]; } blk_q4_1;
typedef struct { f16_t d; uint8_t qh[4]; uint8_t qs[16]; } blk_q5_0;
typedef struct { f16_t d, m; uint8_t qh[4]; uint8_t qs[16]; } blk_q5_1;
typedef struct { f16_t d; int8_t qs[32]; } blk_q8_0;
typedef struct { uint8_t scales[16]; uint8_t qs[64]; f16_t d, dmin; } blk_q2_k;
typedef struct { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; f16_t d; } blk_q3_k;
typedef struct { f16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } blk_q4_k;
typedef struct { f16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } blk_q5_k;
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; f16_t d; } blk_q6_k;

/* Activation blocks. a8: 32 values, scale d, s = d * sum(qs). k8: 256 values, scale d, sums of every 16. */
typedef struct { float d, s; int8_t qs[32]; } act_a8;
typedef struct { float d; int16_t bsums[16]; int8_t qs[256]; } act_k8;

_Static_assert(sizeof(blk_q4_0) == 18, "q4_0");
_Static_assert(sizeof(blk_q4_1) == 20, "q4_1");
_Static_assert(sizeof(blk_q5_0) == 22, "q5_0");
_Static_assert(sizeof(blk_q5_1) == 24, "q5_1");
_Static_assert(sizeof(blk_q8_0) == 34, "q8_0");
_Static_assert(sizeof(blk_q2_k) == 84, "q2_k");
_Static_assert(sizeof(blk_q3_k) == 110, "q3_k");
_Static_assert(sizeof(blk_q4_k) == 144, "q4_k");
_Static_assert(sizeof(blk_q5_k) == 176, "q5_k");
_Static_assert(sizeof(blk_q6_k) == 210, "q6_k");
_Static_assert(sizeof(act_a8) == 40, "a8");
_Static_assert(sizeof(act_k8) == 292, "k8");

/* ---------------------------------------------------------------- half and bfloat16 */

static inline float f16_to_f32(f16_t h) {
#if LL_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            man &= 0x3ff;
            bits = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline f16_t f32_to_f16(float f) {
#if LL_AVX2
    return _cvtss_sh(f, 0);
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    uint32_t man = x & 0x7fffff;
    if (((x >> 23) & 0xff) == 0xff) return (f16_t)(sign | 0x7c00 | (man ? 0x200 : 0));
    if (exp >= 31) return (f16_t)(sign | 0x7c00);
    if (exp <= 0) {
        if (exp < -10) return (f16_t)sign;
        man |= 0x800000;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (f16_t)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)exp << 10) | (man >> 13), rem = man & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++;
    return (f16_t)half;
#endif
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline int nearest_int(float f) { return (int)lrintf(f); }

/* ---------------------------------------------------------------- block geometry */

static int64_t block_values(int t) {
    switch (t) {
        case T_F32: case T_F16: case T_BF16: return 1;
        case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: case T_Q8_0: return QK;
        case T_Q2_K: case T_Q3_K: case T_Q4_K: case T_Q5_K: case T_Q6_K: return QKK;
        default: return 0;
    }
}

static int64_t block_bytes(int t) {
    switch (t) {
        case T_F32: return 4;
        case T_F16: case T_BF16: return 2;
        case T_Q4_0: return sizeof(blk_q4_0);
        case T_Q4_1: return sizeof(blk_q4_1);
        case T_Q5_0: return sizeof(blk_q5_0);
        case T_Q5_1: return sizeof(blk_q5_1);
        case T_Q8_0: return sizeof(blk_q8_0);
        case T_Q2_K: return sizeof(blk_q2_k);
        case T_Q3_K: return sizeof(blk_q3_k);
        case T_Q4_K: return sizeof(blk_q4_k);
        case T_Q5_K: return sizeof(blk_q5_k);
        case T_Q6_K: return sizeof(blk_q6_k);
        default: return 0;
    }
}

static int is_kquant(int t) { return t == T_Q2_K || t == T_Q3_K || t == T_Q4_K || t == T_Q5_K || t == T_Q6_K; }
static int is_float(int t) { return t == T_F32 || t == T_F16 || t == T_BF16; }

/* activation kinds: 0 = float32 as is, 1 = a8 blocks, 2 = k8 blocks */
static int act_kind(int t) { return is_float(t) ? 0 : (is_kquant(t) ? 2 : 1); }

static int64_t act_row_bytes(int kind, int64_t k) {
    if (kind == 0) return k * 4;
    if (kind == 1) return (k / QK) * (int64_t)sizeof(act_a8);
    return (k / QKK) * (int64_t)sizeof(act_k8);
}

int64_t ll_row_bytes(int t, int64_t k) {
    int64_t bv = block_values(t);
    if (bv == 0 || k % bv) return -1;
    return k / bv * block_bytes(t);
}

int ll_supported(int t) { return block_values(t) != 0; }

int ll_simd(void) { return LL_AVX2 ? (LL_VNNI ? 3 : 2) : 0; }

/* The size of the team a parallel region asked for `nthreads` gets (1 without OpenMP). */
int ll_threads(int nthreads) {
    int n = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp master
        n = omp_get_num_threads();
    }
#endif
    return n;
}

/* ---------------------------------------------------------------- quantizing activations */

static void quantize_a8(const float *x, int64_t k, act_a8 *out) {
    for (int64_t b = 0; b < k / QK; b++, x += QK) {
        float amax = 0.f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127.f, id = d ? 1.f / d : 0.f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            int q = nearest_int(x[j] * id);
            out[b].qs[j] = (int8_t)q;
            sum += q;
        }
        out[b].d = d;
        out[b].s = d * (float)sum;
    }
}

static void quantize_k8(const float *x, int64_t k, act_k8 *out) {
    for (int64_t b = 0; b < k / QKK; b++, x += QKK) {
        float amax = 0.f;
        for (int j = 0; j < QKK; j++) amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127.f, id = d ? 1.f / d : 0.f;
        for (int g = 0; g < 16; g++) {
            int sum = 0;
            for (int j = 0; j < 16; j++) {
                int q = nearest_int(x[g * 16 + j] * id);
                out[b].qs[g * 16 + j] = (int8_t)q;
                sum += q;
            }
            out[b].bsums[g] = (int16_t)sum;
        }
        out[b].d = d;
    }
}

static void quantize_act(int kind, const float *x, int64_t k, void *out) {
    if (kind == 1) quantize_a8(x, k, (act_a8 *)out);
    else if (kind == 2) quantize_k8(x, k, (act_k8 *)out);
    else memcpy(out, x, (size_t)k * 4);
}

/* ---------------------------------------------------------------- k-quant scale unpacking */

static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

static inline void q3k_scales(const uint8_t *raw, int8_t *out16) {
    const uint32_t kmask1 = 0x03030303, kmask2 = 0x0f0f0f0f;
    uint32_t aux[4];
    memcpy(aux, raw, 12);
    uint32_t tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
    aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
    aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
    aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
    memcpy(out16, aux, 16);
    for (int i = 0; i < 16; i++) out16[i] = (int8_t)(out16[i] - 32);
}

/* The fields of super-block i of a Q4_K or Q5_K row (qh = NULL for Q4_K). */
static inline void q45k_block(int t, const void *w, int64_t i, const uint8_t **scales, const uint8_t **ql,
                              const uint8_t **qh, float *d, float *dmin) {
    if (t == T_Q4_K) {
        const blk_q4_k *b = (const blk_q4_k *)w + i;
        *scales = b->scales, *ql = b->qs, *qh = NULL, *d = f16_to_f32(b->d), *dmin = f16_to_f32(b->dmin);
    } else {
        const blk_q5_k *b = (const blk_q5_k *)w + i;
        *scales = b->scales, *ql = b->qs, *qh = b->qh, *d = f16_to_f32(b->d), *dmin = f16_to_f32(b->dmin);
    }
}

/* ---------------------------------------------------------------- dequantizing one row */

static void dequant_row(int t, const void *src, int64_t k, float *y) {
    int64_t nb = k / block_values(t);
    switch (t) {
        case T_F32: memcpy(y, src, (size_t)k * 4); return;
        case T_F16: { const f16_t *s = src; for (int64_t i = 0; i < k; i++) y[i] = f16_to_f32(s[i]); return; }
        case T_BF16: { const uint16_t *s = src; for (int64_t i = 0; i < k; i++) y[i] = bf16_to_f32(s[i]); return; }
        case T_Q4_0: {
            const blk_q4_0 *b = src;
            for (int64_t i = 0; i < nb; i++, y += QK) {
                float d = f16_to_f32(b[i].d);
                for (int j = 0; j < 16; j++) {
                    y[j] = ((b[i].qs[j] & 0xF) - 8) * d;
                    y[j + 16] = ((b[i].qs[j] >> 4) - 8) * d;
                }
            }
            return;
        }
        case T_Q4_1: {
            const blk_q4_1 *b = src;
            for (int64_t i = 0; i < nb; i++, y += QK) {
                float d = f16_to_f32(b[i].d), m = f16_to_f32(b[i].m);
                for (int j = 0; j < 16; j++) {
                    y[j] = (b[i].qs[j] & 0xF) * d + m;
                    y[j + 16] = (b[i].qs[j] >> 4) * d + m;
                }
            }
            return;
        }
        case T_Q5_0: {
            const blk_q5_0 *b = src;
            for (int64_t i = 0; i < nb; i++, y += QK) {
                float d = f16_to_f32(b[i].d);
                uint32_t qh;
                memcpy(&qh, b[i].qh, 4);
                for (int j = 0; j < 16; j++) {
                    int h0 = ((qh >> j) << 4) & 0x10, h1 = (qh >> (j + 12)) & 0x10;
                    y[j] = (((b[i].qs[j] & 0xF) | h0) - 16) * d;
                    y[j + 16] = (((b[i].qs[j] >> 4) | h1) - 16) * d;
                }
            }
            return;
        }
        case T_Q5_1: {
            const blk_q5_1 *b = src;
            for (int64_t i = 0; i < nb; i++, y += QK) {
                float d = f16_to_f32(b[i].d), m = f16_to_f32(b[i].m);
                uint32_t qh;
                memcpy(&qh, b[i].qh, 4);
                for (int j = 0; j < 16; j++) {
                    int h0 = ((qh >> j) << 4) & 0x10, h1 = (qh >> (j + 12)) & 0x10;
                    y[j] = ((b[i].qs[j] & 0xF) | h0) * d + m;
                    y[j + 16] = ((b[i].qs[j] >> 4) | h1) * d + m;
                }
            }
            return;
        }
        case T_Q8_0: {
            const blk_q8_0 *b = src;
            for (int64_t i = 0; i < nb; i++, y += QK) {
                float d = f16_to_f32(b[i].d);
                for (int j = 0; j < QK; j++) y[j] = b[i].qs[j] * d;
            }
            return;
        }
        case T_Q2_K: {
            const blk_q2_k *b = src;
            for (int64_t i = 0; i < nb; i++) {
                float d = f16_to_f32(b[i].d), dmin = f16_to_f32(b[i].dmin);
                const uint8_t *q = b[i].qs;
                int is = 0;
                for (int n = 0; n < QKK; n += 128) {
                    int shift = 0;
                    for (int j = 0; j < 4; j++) {
                        uint8_t sc = b[i].scales[is++];
                        float dl = d * (sc & 0xF), ml = dmin * (sc >> 4);
                        for (int l = 0; l < 16; l++) *y++ = dl * ((q[l] >> shift) & 3) - ml;
                        sc = b[i].scales[is++];
                        dl = d * (sc & 0xF), ml = dmin * (sc >> 4);
                        for (int l = 0; l < 16; l++) *y++ = dl * ((q[l + 16] >> shift) & 3) - ml;
                        shift += 2;
                    }
                    q += 32;
                }
            }
            return;
        }
        case T_Q3_K: {
            const blk_q3_k *b = src;
            for (int64_t i = 0; i < nb; i++) {
                float d = f16_to_f32(b[i].d);
                int8_t sc[16];
                q3k_scales(b[i].scales, sc);
                const uint8_t *q = b[i].qs, *hm = b[i].hmask;
                uint8_t m = 1;
                int is = 0;
                for (int n = 0; n < QKK; n += 128) {
                    int shift = 0;
                    for (int j = 0; j < 4; j++) {
                        float dl = d * sc[is++];
                        for (int l = 0; l < 16; l++) *y++ = dl * ((int)((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4));
                        dl = d * sc[is++];
                        for (int l = 0; l < 16; l++)
                            *y++ = dl * ((int)((q[l + 16] >> shift) & 3) - ((hm[l + 16] & m) ? 0 : 4));
                        shift += 2;
                        m <<= 1;
                    }
                    q += 32;
                }
            }
            return;
        }
        case T_Q4_K: {
            const blk_q4_k *b = src;
            for (int64_t i = 0; i < nb; i++) {
                float d = f16_to_f32(b[i].d), dmin = f16_to_f32(b[i].dmin);
                const uint8_t *q = b[i].qs;
                for (int j = 0; j < 8; j += 2, q += 32) {
                    uint8_t sc, m;
                    scale_min_k4(j, b[i].scales, &sc, &m);
                    float d1 = d * sc, m1 = dmin * m;
                    scale_min_k4(j + 1, b[i].scales, &sc, &m);
                    float d2 = d * sc, m2 = dmin * m;
                    for (int l = 0; l < 32; l++) *y++ = d1 * (q[l] & 0xF) - m1;
                    for (int l = 0; l < 32; l++) *y++ = d2 * (q[l] >> 4) - m2;
                }
            }
            return;
        }
        case T_Q5_K: {
            const blk_q5_k *b = src;
            for (int64_t i = 0; i < nb; i++) {
                float d = f16_to_f32(b[i].d), dmin = f16_to_f32(b[i].dmin);
                const uint8_t *ql = b[i].qs, *qh = b[i].qh;
                uint8_t u1 = 1, u2 = 2;
                for (int j = 0; j < 8; j += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
                    uint8_t sc, m;
                    scale_min_k4(j, b[i].scales, &sc, &m);
                    float d1 = d * sc, m1 = dmin * m;
                    scale_min_k4(j + 1, b[i].scales, &sc, &m);
                    float d2 = d * sc, m2 = dmin * m;
                    for (int l = 0; l < 32; l++) *y++ = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
                    for (int l = 0; l < 32; l++) *y++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
                }
            }
            return;
        }
        case T_Q6_K: {
            const blk_q6_k *b = src;
            for (int64_t i = 0; i < nb; i++) {
                float d = f16_to_f32(b[i].d);
                const uint8_t *ql = b[i].ql, *qh = b[i].qh;
                const int8_t *sc = b[i].scales;
                for (int n = 0; n < QKK; n += 128) {
                    for (int l = 0; l < 32; l++) {
                        int is = l / 16;
                        int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                        int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                        int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                        int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                        y[l] = d * sc[is + 0] * q1;
                        y[l + 32] = d * sc[is + 2] * q2;
                        y[l + 64] = d * sc[is + 4] * q3;
                        y[l + 96] = d * sc[is + 6] * q4;
                    }
                    y += 128;
                    ql += 64;
                    qh += 32;
                    sc += 8;
                }
            }
            return;
        }
        default: return;
    }
}

/* ---------------------------------------------------------------- dot products, plain C */

static float dot_ref(int t, const void *w, const void *xa, int64_t k) {
    int64_t nb = k / block_values(t);
    switch (t) {
        case T_F32: case T_F16: case T_BF16: {
            const float *x = xa;
            float s = 0.f;
            if (t == T_F32) { const float *p = w; for (int64_t i = 0; i < k; i++) s += p[i] * x[i]; }
            else if (t == T_F16) { const f16_t *p = w; for (int64_t i = 0; i < k; i++) s += f16_to_f32(p[i]) * x[i]; }
            else { const uint16_t *p = w; for (int64_t i = 0; i < k; i++) s += bf16_to_f32(p[i]) * x[i]; }
            return s;
        }
        case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: case T_Q8_0: {
            const act_a8 *x = xa;
            float acc = 0.f;
            for (int64_t i = 0; i < nb; i++) {
                int sumi = 0;
                float dw, mw = 0.f;
                int off = 0;
                if (t == T_Q8_0) {
                    const blk_q8_0 *b = (const blk_q8_0 *)w + i;
                    for (int j = 0; j < QK; j++) sumi += b->qs[j] * x[i].qs[j];
                    acc += f16_to_f32(b->d) * x[i].d * sumi;
                    continue;
                }
                if (t == T_Q4_0 || t == T_Q4_1) {
                    const uint8_t *qs = t == T_Q4_0 ? ((const blk_q4_0 *)w)[i].qs : ((const blk_q4_1 *)w)[i].qs;
                    for (int j = 0; j < 16; j++) sumi += (qs[j] & 0xF) * x[i].qs[j] + (qs[j] >> 4) * x[i].qs[j + 16];
                    if (t == T_Q4_0) { dw = f16_to_f32(((const blk_q4_0 *)w)[i].d); off = 8; }
                    else { dw = f16_to_f32(((const blk_q4_1 *)w)[i].d); mw = f16_to_f32(((const blk_q4_1 *)w)[i].m); }
                } else {
                    const uint8_t *qs = t == T_Q5_0 ? ((const blk_q5_0 *)w)[i].qs : ((const blk_q5_1 *)w)[i].qs;
                    const uint8_t *qhp = t == T_Q5_0 ? ((const blk_q5_0 *)w)[i].qh : ((const blk_q5_1 *)w)[i].qh;
                    uint32_t qh;
                    memcpy(&qh, qhp, 4);
                    for (int j = 0; j < 16; j++) {
                        int h0 = ((qh >> j) << 4) & 0x10, h1 = (qh >> (j + 12)) & 0x10;
                        sumi += ((qs[j] & 0xF) | h0) * x[i].qs[j] + ((qs[j] >> 4) | h1) * x[i].qs[j + 16];
                    }
                    if (t == T_Q5_0) { dw = f16_to_f32(((const blk_q5_0 *)w)[i].d); off = 16; }
                    else { dw = f16_to_f32(((const blk_q5_1 *)w)[i].d); mw = f16_to_f32(((const blk_q5_1 *)w)[i].m); }
                }
                /* sum_j (dw (q_j - off) + mw) dx x_j = dw dx sumi + (mw - off dw) s */
                acc += dw * x[i].d * sumi + (mw - off * dw) * x[i].s;
            }
            return acc;
        }
        case T_Q2_K: {
            const blk_q2_k *b = w;
            const act_k8 *x = xa;
            float acc = 0.f;
            for (int64_t i = 0; i < nb; i++) {
                const uint8_t *q = b[i].qs;
                const int8_t *xq = x[i].qs;
                int sumi = 0, summ = 0, is = 0;
                for (int n = 0; n < QKK; n += 128, q += 32) {
                    for (int shift = 0; shift < 8; shift += 2) {
                        for (int h = 0; h < 2; h++, is++) {
                            int s = 0;
                            for (int l = 0; l < 16; l++) s += ((q[l + 16 * h] >> shift) & 3) * xq[l];
                            xq += 16;
                            sumi += (b[i].scales[is] & 0xF) * s;
                            summ += (b[i].scales[is] >> 4) * x[i].bsums[is];
                        }
                    }
                }
                acc += x[i].d * (f16_to_f32(b[i].d) * sumi - f16_to_f32(b[i].dmin) * summ);
            }
            return acc;
        }
        case T_Q3_K: {
            const blk_q3_k *b = w;
            const act_k8 *x = xa;
            float acc = 0.f;
            for (int64_t i = 0; i < nb; i++) {
                int8_t sc[16];
                q3k_scales(b[i].scales, sc);
                const uint8_t *q = b[i].qs, *hm = b[i].hmask;
                const int8_t *xq = x[i].qs;
                int sumi = 0, is = 0;
                uint8_t m = 1;
                for (int n = 0; n < QKK; n += 128, q += 32) {
                    for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
                        for (int h = 0; h < 2; h++, is++) {
                            int s = 0;
                            for (int l = 0; l < 16; l++) {
                                int v = (int)((q[l + 16 * h] >> shift) & 3) - ((hm[l + 16 * h] & m) ? 0 : 4);
                                s += v * xq[l];
                            }
                            xq += 16;
                            sumi += sc[is] * s;
                        }
                    }
                }
                acc += x[i].d * f16_to_f32(b[i].d) * sumi;
            }
            return acc;
        }
        case T_Q4_K: case T_Q5_K: {
            const act_k8 *x = xa;
            float acc = 0.f;
            for (int64_t i = 0; i < nb; i++) {
                const uint8_t *scales, *ql, *qh;
                float d, dmin;
                q45k_block(t, w, i, &scales, &ql, &qh, &d, &dmin);
                const int8_t *xq = x[i].qs;
                int sumi = 0, summ = 0;
                for (int j = 0; j < 8; j += 2, ql += 32) {
                    uint8_t sc1, m1, sc2, m2;
                    scale_min_k4(j, scales, &sc1, &m1);
                    scale_min_k4(j + 1, scales, &sc2, &m2);
                    int s1 = 0, s2 = 0;
                    for (int l = 0; l < 32; l++) {
                        int lo = ql[l] & 0xF, hi = ql[l] >> 4;
                        if (qh) {
                            lo += (qh[l] >> j) & 1 ? 16 : 0;
                            hi += (qh[l] >> (j + 1)) & 1 ? 16 : 0;
                        }
                        s1 += lo * xq[l];
                        s2 += hi * xq[l + 32];
                    }
                    xq += 64;
                    sumi += sc1 * s1 + sc2 * s2;
                    summ += m1 * (x[i].bsums[2 * j] + x[i].bsums[2 * j + 1]) +
                            m2 * (x[i].bsums[2 * j + 2] + x[i].bsums[2 * j + 3]);
                }
                acc += x[i].d * (d * sumi - dmin * summ);
            }
            return acc;
        }
        case T_Q6_K: {
            const blk_q6_k *b = w;
            const act_k8 *x = xa;
            float acc = 0.f;
            for (int64_t i = 0; i < nb; i++) {
                const uint8_t *ql = b[i].ql, *qh = b[i].qh;
                const int8_t *sc = b[i].scales, *xq = x[i].qs;
                int sumi = 0;
                for (int n = 0; n < QKK; n += 128, ql += 64, qh += 32, sc += 8, xq += 128) {
                    int s[8] = {0};
                    for (int l = 0; l < 32; l++) {
                        int is = l / 16;
                        s[is + 0] += ((int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32) * xq[l];
                        s[is + 2] += ((int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32) * xq[l + 32];
                        s[is + 4] += ((int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32) * xq[l + 64];
                        s[is + 6] += ((int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32) * xq[l + 96];
                    }
                    for (int g = 0; g < 8; g++) sumi += sc[g] * s[g];
                }
                acc += x[i].d * f16_to_f32(b[i].d) * sumi;
            }
            return acc;
        }
        default: return 0.f;
    }
}

/* ---------------------------------------------------------------- dot products, AVX2 */

#if LL_AVX2
static inline float hsum8(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* 16 bytes of nibbles -> 32 bytes: the low nibbles, then the high ones (GGML's order within a block) */
static inline __m256i nibbles32(const uint8_t *p) {
    __m128i t = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0xF));
}

/* 32 bits -> 32 bytes, 0xFF where the bit is set (bit i -> byte i) */
static inline __m256i bits32(const uint8_t *p) {
    uint32_t x32;
    memcpy(&x32, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x32), shuf);
    bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

/* unsigned bytes u (< 128) times signed bytes s, summed in fours -> 8 int32 */
static inline __m256i dot_us(__m256i u, __m256i s) {
#if LL_VNNI
    return dpbusd(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

#define LL_INLINE static inline __attribute__((always_inline))

/* Each kernel below decodes a block of the weight row once and takes its dot product with R activation rows
   (R <= 4, a compile-time constant after inlining): x rows are lx bytes apart, results go to out[0..R). */

LL_INLINE void rows_legacy(int t, const void *w, const char *xa, int64_t lx, int64_t nb, const int R, float *out) {
    __m256 acc[4];
    float corr[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), corr[r] = 0.f;
    const __m256i h16 = _mm256_set1_epi8(0x10);
    for (int64_t i = 0; i < nb; i++) {
        __m256i q;
        float dw, mw = 0.f;
        int sign = 0;
        switch (t) {
            case T_Q4_0: {
                const blk_q4_0 *b = (const blk_q4_0 *)w + i;
                q = nibbles32(b->qs), dw = f16_to_f32(b->d), mw = -8.f * dw;
                break;
            }
            case T_Q4_1: {
                const blk_q4_1 *b = (const blk_q4_1 *)w + i;
                q = nibbles32(b->qs), dw = f16_to_f32(b->d), mw = f16_to_f32(b->m);
                break;
            }
            case T_Q5_0: {
                const blk_q5_0 *b = (const blk_q5_0 *)w + i;
                q = _mm256_or_si256(nibbles32(b->qs), _mm256_and_si256(bits32(b->qh), h16));
                dw = f16_to_f32(b->d), mw = -16.f * dw;
                break;
            }
            case T_Q5_1: {
                const blk_q5_1 *b = (const blk_q5_1 *)w + i;
                q = _mm256_or_si256(nibbles32(b->qs), _mm256_and_si256(bits32(b->qh), h16));
                dw = f16_to_f32(b->d), mw = f16_to_f32(b->m);
                break;
            }
            default: { /* Q8_0: signed weights */
                const blk_q8_0 *b = (const blk_q8_0 *)w + i;
                q = _mm256_loadu_si256((const __m256i *)b->qs), dw = f16_to_f32(b->d), sign = 1;
                break;
            }
        }
        const __m256i uq = sign ? _mm256_sign_epi8(q, q) : q;
        for (int r = 0; r < R; r++) {
            const act_a8 *x = (const act_a8 *)(xa + r * lx) + i;
            __m256i xv = _mm256_loadu_si256((const __m256i *)x->qs);
            if (sign) xv = _mm256_sign_epi8(xv, q);
            __m256i p = dot_us(uq, xv);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x->d), _mm256_cvtepi32_ps(p), acc[r]);
            corr[r] += mw * x->s;
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum8(acc[r]) + corr[r];
}

LL_INLINE void rows_q45k(int t, const void *w, const char *xa, int64_t lx, int64_t nb, const int R, float *out) {
    const __m256i m4 = _mm256_set1_epi8(0xF), one = _mm256_set1_epi8(1);
    __m256 acc[4];
    float corr[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), corr[r] = 0.f;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *scales, *ql, *qh;
        float d, dmin;
        q45k_block(t, w, i, &scales, &ql, &qh, &d, &dmin);
        uint8_t sc[8], mn[8];
        for (int j = 0; j < 8; j++) scale_min_k4(j, scales, &sc[j], &mn[j]);
        __m256i hbits = qh ? _mm256_loadu_si256((const __m256i *)qh) : _mm256_setzero_si256();
        __m256i sumi[4];
        for (int r = 0; r < R; r++) sumi[r] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++, ql += 32) {
            __m256i q = _mm256_loadu_si256((const __m256i *)ql);
            __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            if (qh) {
                __m256i hl = _mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j), one);
                __m256i hh = _mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j + 1), one);
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(hl, 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(hh, 4));
            }
            const __m256i s1 = _mm256_set1_epi16(sc[2 * j]), s2 = _mm256_set1_epi16(sc[2 * j + 1]);
            for (int r = 0; r < R; r++) {
                const int8_t *xq = ((const act_k8 *)(xa + r * lx))[i].qs + 64 * j;
                __m256i pl = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xq));
                __m256i ph = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + 32)));
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(pl, s1));
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(ph, s2));
            }
        }
        for (int r = 0; r < R; r++) {
            const act_k8 *x = (const act_k8 *)(xa + r * lx) + i;
            int summ = 0;
            for (int j = 0; j < 8; j++) summ += mn[j] * (x->bsums[2 * j] + x->bsums[2 * j + 1]);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * x->d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            corr[r] -= dmin * x->d * summ;
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum8(acc[r]) + corr[r];
}

LL_INLINE void rows_q6k(const void *w, const char *xa, int64_t lx, int64_t nb, const int R, float *out) {
    const blk_q6_k *b = w;
    const __m256i m4 = _mm256_set1_epi8(0xF), m2 = _mm256_set1_epi8(3);
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *ql = b[i].ql, *qh = b[i].qh;
        const int8_t *sc = b[i].scales;
        __m256i sumi[4];
        for (int r = 0; r < R; r++) sumi[r] = _mm256_setzero_si256();
        for (int n = 0; n < 2; n++, ql += 64, qh += 32, sc += 8) {
            __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
            __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
            __m256i h = _mm256_loadu_si256((const __m256i *)qh);
            __m256i q[4], s[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(h, m2), 4));
            q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m2), 4));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m2), 4));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m2), 4));
            for (int g = 0; g < 4; g++) s[g] = _mm256_set_m128i(_mm_set1_epi16(sc[2 * g + 1]), _mm_set1_epi16(sc[2 * g]));
            for (int r = 0; r < R; r++) {
                const int8_t *xq = ((const act_k8 *)(xa + r * lx))[i].qs + 128 * n;
                for (int g = 0; g < 4; g++) {
                    __m256i p = _mm256_maddubs_epi16(q[g], _mm256_loadu_si256((const __m256i *)(xq + 32 * g)));
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(p, s[g]));
                }
            }
        }
        for (int r = 0; r < R; r++) {
            const act_k8 *x = (const act_k8 *)(xa + r * lx) + i;
            int off = 0;
            for (int g = 0; g < 16; g++) off += b[i].scales[g] * x->bsums[g];
            /* the values are q - 32: take 32 * sum_g sc_g * bsum_g off */
            __m256i v = _mm256_sub_epi32(sumi[r], _mm256_setr_epi32(32 * off, 0, 0, 0, 0, 0, 0, 0));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(f16_to_f32(b[i].d) * x->d), _mm256_cvtepi32_ps(v), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum8(acc[r]);
}

LL_INLINE void rows_float(int t, const void *w, const char *xa, int64_t lx, int64_t k, const int R, float *out) {
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        __m256 wv;
        if (t == T_F32) wv = _mm256_loadu_ps((const float *)w + i);
        else if (t == T_F16) wv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const f16_t *)w + i)));
        else wv = _mm256_castsi256_ps(_mm256_slli_epi32(
                 _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i))), 16));
        for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps((const float *)(xa + r * lx) + i), acc[r]);
    }
    for (int r = 0; r < R; r++) {
        float s = hsum8(acc[r]);
        const float *x = (const float *)(xa + r * lx);
        for (int64_t j = i; j < k; j++) {
            float wv = t == T_F32 ? ((const float *)w)[j]
                                  : (t == T_F16 ? f16_to_f32(((const f16_t *)w)[j]) : bf16_to_f32(((const uint16_t *)w)[j]));
            s += wv * x[j];
        }
        out[r] = s;
    }
}

LL_INLINE void rows_avx2_R(int t, const void *w, const char *xa, int64_t lx, int64_t k, const int R, float *out) {
    switch (t) {
        case T_Q4_0: rows_legacy(T_Q4_0, w, xa, lx, k / QK, R, out); return;
        case T_Q4_1: rows_legacy(T_Q4_1, w, xa, lx, k / QK, R, out); return;
        case T_Q5_0: rows_legacy(T_Q5_0, w, xa, lx, k / QK, R, out); return;
        case T_Q5_1: rows_legacy(T_Q5_1, w, xa, lx, k / QK, R, out); return;
        case T_Q8_0: rows_legacy(T_Q8_0, w, xa, lx, k / QK, R, out); return;
        case T_Q4_K: rows_q45k(T_Q4_K, w, xa, lx, k / QKK, R, out); return;
        case T_Q5_K: rows_q45k(T_Q5_K, w, xa, lx, k / QKK, R, out); return;
        case T_Q6_K: rows_q6k(w, xa, lx, k / QKK, R, out); return;
        case T_F32: rows_float(T_F32, w, xa, lx, k, R, out); return;
        case T_F16: rows_float(T_F16, w, xa, lx, k, R, out); return;
        case T_BF16: rows_float(T_BF16, w, xa, lx, k, R, out); return;
        default:
            for (int r = 0; r < R; r++) out[r] = dot_ref(t, w, xa + r * lx, k);
            return;
    }
}

static void rows_avx2(int t, const void *w, const char *xa, int64_t lx, int64_t k, int R, float *out) {
    switch (R) {
        case 1: rows_avx2_R(t, w, xa, lx, k, 1, out); return;
        case 2: rows_avx2_R(t, w, xa, lx, k, 2, out); return;
        case 3: rows_avx2_R(t, w, xa, lx, k, 3, out); return;
        default: rows_avx2_R(t, w, xa, lx, k, 4, out); return;
    }
}
#endif

/* out[r] = dot(w row, activation row r) for r < R (R <= 4); activation rows lx bytes apart */
static inline void dot_rows(int t, const void *w, const char *x, int64_t lx, int64_t k, int R, float *out) {
#if LL_AVX2
    rows_avx2(t, w, x, lx, k, R, out);
#else
    for (int r = 0; r < R; r++) out[r] = dot_ref(t, w, x + r * lx, k);
#endif
}

/* ---------------------------------------------------------------- interleaved rows (x8 layout)

   For Q4_0, Q4_1, Q5_0 and Q8_0 a matrix can be laid out again at load, with the same bytes, so that 8 output
   rows are computed at once: for each group of 8 rows and each block of 32 values, the 8 rows' scales (and mins)
   come first, then the values in steps of 4: one 32-byte vector holds values 4s..4s+3 of each of the 8 rows, so
   that multiplying it with the 4 matching activations broadcast to every lane leaves each row's sum in a lane of
   its own (no horizontal sums), and the 8 scales are converted by one instruction. (llama.cpp repacks Q4_0 and
   Q4_K the same way.) 4- and 5-bit values: steps 2c and 2c + 1 share the low and high nibbles of 32 bytes;
   Q5_0's fifth bits are one 32-bit word per step. A group-block takes 8 x the bytes of a block. */

static int x8_type(int t) { return t == T_Q4_0 || t == T_Q4_1 || t == T_Q5_0 || t == T_Q8_0; }

static int64_t x8_quants_offset(int t) {
    switch (t) {
        case T_Q4_1: return 32; /* d[8], m[8] */
        case T_Q5_0: return 48; /* d[8], qh[8 x 32 bits] */
        default: return 16;     /* d[8] */
    }
}

/* value j (0..31) of a source block: the low 4 bits for 4/5-bit types, the whole signed byte for Q8_0 */
static inline int block_value(int t, const uint8_t *blk, int j) {
    if (t == T_Q8_0) return ((const blk_q8_0 *)blk)->qs[j];
    const uint8_t *qs = t == T_Q4_0 ? ((const blk_q4_0 *)blk)->qs
                      : t == T_Q4_1 ? ((const blk_q4_1 *)blk)->qs
                                    : ((const blk_q5_0 *)blk)->qs;
    return (qs[j & 15] >> (j >= 16 ? 4 : 0)) & 0xF;
}

int ll_x8_supported(int t) { return LL_AVX2 && x8_type(t); }

/* An n x k matrix (n a multiple of 8) turned into the x8 layout in place: a group of 8 rows takes the same bytes
in both layouts, so each is copied aside and written back interleaved (no second copy of the matrix, even for a
moment). -1 (and nothing changed) where the layout does not apply. */
int ll_repack_x8(int t, void *w, int64_t n, int64_t k) {
    if (!ll_x8_supported(t) || n % 8 || k % QK) return -1;
    const int64_t nb = k / QK, bb = block_bytes(t), gb = 8 * bb, rb = nb * bb;
    uint8_t *src = (uint8_t *)malloc((size_t)(8 * rb));
    if (!src) return -1;
    for (int64_t g = 0; g < n / 8; g++) {
        uint8_t *group = (uint8_t *)w + g * 8 * rb;
        memcpy(src, group, (size_t)(8 * rb));
        memset(group, 0, (size_t)(8 * rb));
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *o = group + b * gb, *q = o + x8_quants_offset(t);
            for (int l = 0; l < 8; l++) {
                const uint8_t *blk = src + l * rb + b * bb;
                memcpy(o + 2 * l, blk, 2); /* d */
                if (t == T_Q4_1) memcpy(o + 16 + 2 * l, blk + 2, 2); /* m */
                uint32_t qh = 0;
                if (t == T_Q5_0) memcpy(&qh, ((const blk_q5_0 *)blk)->qh, 4);
                for (int j = 0; j < QK; j++) {
                    const int s = j / 4, i = j % 4, v = block_value(t, blk, j);
                    if (t == T_Q8_0) {
                        q[s * 32 + l * 4 + i] = (uint8_t)v;
                    } else {
                        q[(s / 2) * 32 + l * 4 + i] |= (uint8_t)((v & 0xF) << (s % 2 ? 4 : 0));
                    }
                    if (t == T_Q5_0 && ((qh >> j) & 1)) {
                        uint32_t word;
                        memcpy(&word, o + 16 + 4 * s, 4);
                        word |= 1u << (l * 4 + i);
                        memcpy(o + 16 + 4 * s, &word, 4);
                    }
                }
            }
        }
    }
    free(src);
    return 0;
}

/* Row `row` of an x8 matrix, as float32. */
static void dequant_row_x8(int t, const void *w, int64_t row, int64_t k, float *y) {
    const int64_t nb = k / QK, gb = 8 * block_bytes(t), g = row / 8;
    const int l = (int)(row % 8);
    for (int64_t b = 0; b < nb; b++, y += QK) {
        const uint8_t *o = (const uint8_t *)w + (g * nb + b) * gb, *q = o + x8_quants_offset(t);
        f16_t dh, mh = 0;
        memcpy(&dh, o + 2 * l, 2);
        if (t == T_Q4_1) memcpy(&mh, o + 16 + 2 * l, 2);
        const float d = f16_to_f32(dh), m = f16_to_f32(mh);
        for (int j = 0; j < QK; j++) {
            const int s = j / 4, i = j % 4;
            int v;
            if (t == T_Q8_0) {
                v = (int8_t)q[s * 32 + l * 4 + i];
            } else {
                v = (q[(s / 2) * 32 + l * 4 + i] >> (s % 2 ? 4 : 0)) & 0xF;
                if (t == T_Q5_0) {
                    uint32_t word;
                    memcpy(&word, o + 16 + 4 * s, 4);
                    v |= ((word >> (l * 4 + i)) & 1) << 4;
                }
            }
            y[j] = t == T_Q4_0 ? (v - 8) * d : t == T_Q4_1 ? v * d + m : t == T_Q5_0 ? (v - 16) * d : v * d;
        }
    }
}

#if LL_AVX2
static inline __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* The 8 rows of group `g` (its first group-block) against R activation rows: out[r * 8 + l] for row l. */
LL_INLINE void x8_rows_R(int t, const char *g, int64_t nb, const char *xa, int64_t lx, const int R, float *out) {
    const __m256i m4 = _mm256_set1_epi8(0xF), h16 = _mm256_set1_epi8(0x10);
#if !LL_VNNI
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    const int64_t gb = 8 * block_bytes(t), qo = x8_quants_offset(t);
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const char *blk = g + b * gb;
        const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        const uint8_t *q = (const uint8_t *)blk + qo;
        __m256i sumi[4];
        for (int r = 0; r < R; r++) sumi[r] = _mm256_setzero_si256();
        if (t == T_Q8_0) {
            for (int s = 0; s < 8; s++) {
                const __m256i w = _mm256_loadu_si256((const __m256i *)(q + 32 * s)), aw = _mm256_sign_epi8(w, w);
                for (int r = 0; r < R; r++) {
                    const __m256i xv = bcast4(((const act_a8 *)(xa + r * lx))[b].qs + 4 * s);
#if LL_VNNI
                    sumi[r] = dpbusd(sumi[r], aw, _mm256_sign_epi8(xv, w));
#else
                    const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w));
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(p, ones));
#endif
                }
            }
        } else {
            for (int c = 0; c < 4; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(q + 32 * c));
                __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                if (t == T_Q5_0) {
                    lo = _mm256_or_si256(lo, _mm256_and_si256(bits32((const uint8_t *)blk + 16 + 8 * c), h16));
                    hi = _mm256_or_si256(hi, _mm256_and_si256(bits32((const uint8_t *)blk + 20 + 8 * c), h16));
                }
                for (int r = 0; r < R; r++) {
                    const int8_t *xs = ((const act_a8 *)(xa + r * lx))[b].qs + 8 * c;
#if LL_VNNI
                    sumi[r] = dpbusd(dpbusd(sumi[r], lo, bcast4(xs)), hi, bcast4(xs + 4));
#else
                    /* two steps' pair sums fit int16: at most 2 x 2 x 31 x 127 */
                    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(xs)),
                                                       _mm256_maddubs_epi16(hi, bcast4(xs + 4)));
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(p, ones));
#endif
                }
            }
        }
        __m256 mv = _mm256_setzero_ps();
        if (t == T_Q4_1) mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16)));
        for (int r = 0; r < R; r++) {
            const act_a8 *x = (const act_a8 *)(xa + r * lx) + b;
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dv, _mm256_set1_ps(x->d)), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            if (t == T_Q4_1) acc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(x->s), acc[r]);
            else if (t == T_Q4_0) acc[r] = _mm256_fmadd_ps(dv, _mm256_set1_ps(-8.f * x->s), acc[r]);
            else if (t == T_Q5_0) acc[r] = _mm256_fmadd_ps(dv, _mm256_set1_ps(-16.f * x->s), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(out + 8 * r, acc[r]);
}

LL_INLINE void x8_rows_t(int t, const char *g, int64_t nb, const char *xa, int64_t lx, int R, float *out) {
    switch (R) {
        case 1: x8_rows_R(t, g, nb, xa, lx, 1, out); return;
        case 2: x8_rows_R(t, g, nb, xa, lx, 2, out); return;
        case 3: x8_rows_R(t, g, nb, xa, lx, 3, out); return;
        default: x8_rows_R(t, g, nb, xa, lx, 4, out); return;
    }
}

/* out[r * 8 + l] = dot(row l of group g, activation row r) for r < R (R <= 4) */
static void x8_rows(int t, const char *g, int64_t nb, const char *xa, int64_t lx, int R, float *out) {
    switch (t) {
        case T_Q4_0: x8_rows_t(T_Q4_0, g, nb, xa, lx, R, out); return;
        case T_Q4_1: x8_rows_t(T_Q4_1, g, nb, xa, lx, R, out); return;
        case T_Q5_0: x8_rows_t(T_Q5_0, g, nb, xa, lx, R, out); return;
        default: x8_rows_t(T_Q8_0, g, nb, xa, lx, R, out); return;
    }
}
#endif

/* ---------------------------------------------------------------- the linear layer */

#define LL_MAX_PARTS 4

/* A matmul weight: up to LL_MAX_PARTS GGUF tensors stacked along the output (q, k and v; gate and up), each of
   its own type, all with k columns. Output columns of part p start at the sum of the earlier parts' n. */
typedef struct {
    int32_t type;
    int32_t layout; /* 0: rows as GGUF stores them; 8: interleaved in groups of 8 rows (ll_repack_x8) */
    int64_t n;
    const void *w;
} ll_part;

typedef struct {
    int32_t nparts;
    int32_t pad;
    int64_t k;
    ll_part parts[LL_MAX_PARTS];
} ll_weight;

enum { PRE_NONE = 0, PRE_RMSNORM = 1, PRE_SWIGLU = 2 };

/* Bytes of scratch `ll_linear` needs for m rows (the transformed input and its quantized forms). */
int64_t ll_scratch_bytes(const ll_weight *wt, int64_t m) {
    int64_t k = wt->k;
    return m * k * 4 + m * (act_row_bytes(1, k) + act_row_bytes(2, k)) + 64;
}

#define ROWS_PER_TASK 16

/* y[m, :] (+)= transform(x[m, :]) @ W^T for m < rows.
   pre = PRE_NONE: x is [rows, k]. PRE_RMSNORM: x is [rows, k]; rms-normalised and multiplied by norm_w first.
   PRE_SWIGLU: x is [rows, 2k] = [gate | up]; silu(gate) * up is the input.
   accumulate = 1 adds into y instead of storing. y rows are ldy floats apart; x rows ldx floats apart. */
void ll_linear(const ll_weight *wt, const float *x, int64_t ldx, int64_t rows, float *y, int64_t ldy, int pre,
               const float *norm_w, float eps, int accumulate, void *scratch, int nthreads) {
    const int64_t k = wt->k;
    float *xin = (float *)scratch;
    char *qa8 = (char *)(xin + rows * k);
    char *qk8 = qa8 + rows * act_row_bytes(1, k);
    const int64_t la8 = act_row_bytes(1, k), lk8 = act_row_bytes(2, k);
    int need[3] = {0, 0, 0};
    for (int p = 0; p < wt->nparts; p++) need[act_kind(wt->parts[p].type)] = 1;
    for (int64_t r = 0; r < rows; r++) {
        const float *src = x + r * ldx;
        float *dst = xin + r * k;
        if (pre == PRE_RMSNORM) {
            double ss = 0.0;
            for (int64_t j = 0; j < k; j++) ss += (double)src[j] * src[j];
            float inv = 1.f / sqrtf((float)(ss / (double)k) + eps);
            for (int64_t j = 0; j < k; j++) dst[j] = src[j] * inv * norm_w[j];
        } else if (pre == PRE_SWIGLU) {
            for (int64_t j = 0; j < k; j++) {
                float g = src[j];
                dst[j] = g / (1.f + expf(-g)) * src[k + j];
            }
        } else {
            memcpy(dst, src, (size_t)k * 4);
        }
        if (need[1]) quantize_act(1, dst, k, qa8 + r * la8);
        if (need[2]) quantize_act(2, dst, k, qk8 + r * lk8);
    }
    /* tasks: (part, block of ROWS_PER_TASK output rows) */
    int64_t starts[LL_MAX_PARTS + 1], cols[LL_MAX_PARTS];
    starts[0] = 0;
    int64_t col = 0;
    for (int p = 0; p < wt->nparts; p++) {
        starts[p + 1] = starts[p] + (wt->parts[p].n + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
        cols[p] = col;
        col += wt->parts[p].n;
    }
    const int64_t ntasks = starts[wt->nparts];
    const int64_t work = col * k * rows;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && work > (1 << 18))
    for (int64_t task = 0; task < ntasks; task++) {
        int p = 0;
        while (task >= starts[p + 1]) p++;
        const ll_part *part = &wt->parts[p];
        const int kind = act_kind(part->type);
        const char *xq = kind == 0 ? (const char *)xin : (kind == 1 ? qa8 : qk8);
        const int64_t lx = kind == 0 ? k * 4 : (kind == 1 ? la8 : lk8);
        const int64_t rb = ll_row_bytes(part->type, k);
        const int64_t n0 = (task - starts[p]) * ROWS_PER_TASK;
        const int64_t n1 = n0 + ROWS_PER_TASK < part->n ? n0 + ROWS_PER_TASK : part->n;
#if LL_AVX2
        if (part->layout == 8) {
            for (int64_t g = n0 / 8; g < n1 / 8; g++) {
                const char *gw = (const char *)part->w + g * 8 * rb;
                for (int64_t r0 = 0; r0 < rows; r0 += 4) {
                    const int R = rows - r0 < 4 ? (int)(rows - r0) : 4;
                    float v[32];
                    x8_rows(part->type, gw, k / QK, xq + r0 * lx, lx, R, v);
                    for (int r = 0; r < R; r++) {
                        float *out = y + (r0 + r) * ldy + cols[p] + 8 * g;
                        for (int l = 0; l < 8; l++) out[l] = accumulate ? out[l] + v[8 * r + l] : v[8 * r + l];
                    }
                }
            }
            continue;
        }
#endif
        for (int64_t n = n0; n < n1; n++) {
            const char *wrow = (const char *)part->w + n * rb;
            for (int64_t r0 = 0; r0 < rows; r0 += 4) {
                const int R = rows - r0 < 4 ? (int)(rows - r0) : 4;
                float v[4];
                dot_rows(part->type, wrow, xq + r0 * lx, lx, k, R, v);
                for (int r = 0; r < R; r++) {
                    float *out = y + (r0 + r) * ldy + cols[p] + n;
                    *out = accumulate ? *out + v[r] : v[r];
                }
            }
        }
    }
}

static inline void dequant_any(int t, int layout, const void *w, int64_t row, int64_t k, float *y) {
    if (layout == 8) dequant_row_x8(t, w, row, k, y);
    else dequant_row(t, (const char *)w + row * ll_row_bytes(t, k), k, y);
}

/* Rows [row0, row0 + nrows) of one tensor with k columns (in `layout`), as float32 (out: nrows x k). */
void ll_dequant(int t, int layout, const void *w, int64_t row0, int64_t nrows, int64_t k, float *out, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && nrows * k > (1 << 20))
    for (int64_t r = 0; r < nrows; r++) dequant_any(t, layout, w, row0 + r, k, out + r * k);
}

/* Rows picked by index (an embedding lookup): out[i] = row ids[i] of w, as float32. */
void ll_gather(int t, int layout, const void *w, int64_t k, const int64_t *ids, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) dequant_any(t, layout, w, ids[i], k, out + i * k);
}

/* The dot products of `ll_linear` for one weight tensor against already quantized activations, for the tests:
   x holds rows of activations as `ll_quantize_act` writes them. y: rows x n. */
void ll_gemm(int t, const void *w, int64_t n, int64_t k, const void *xq, int64_t rows, float *y) {
    const int64_t rb = ll_row_bytes(t, k), lx = act_row_bytes(act_kind(t), k);
    for (int64_t i = 0; i < n; i++)
        for (int64_t r0 = 0; r0 < rows; r0 += 4) {
            const int R = rows - r0 < 4 ? (int)(rows - r0) : 4;
            float v[4];
            dot_rows(t, (const char *)w + i * rb, (const char *)xq + r0 * lx, lx, k, R, v);
            for (int r = 0; r < R; r++) y[(r0 + r) * n + i] = v[r];
        }
}

/* The same with the plain C dot products (the reference the SIMD paths are tested against). */
void ll_gemm_ref(int t, const void *w, int64_t n, int64_t k, const void *xq, int64_t rows, float *y) {
    const int64_t rb = ll_row_bytes(t, k), lx = act_row_bytes(act_kind(t), k);
    for (int64_t i = 0; i < n; i++)
        for (int64_t r = 0; r < rows; r++)
            y[r * n + i] = dot_ref(t, (const char *)w + i * rb, (const char *)xq + r * lx, k);
}

int64_t ll_act_bytes(int t, int64_t k) { return act_row_bytes(act_kind(t), k); }

void ll_quantize_act(int t, const float *x, int64_t rows, int64_t k, void *out) {
    const int kind = act_kind(t);
    const int64_t lx = act_row_bytes(kind, k);
    for (int64_t r = 0; r < rows; r++) quantize_act(kind, x + r * k, k, (char *)out + r * lx);
}

/* ---------------------------------------------------------------- quantizing weights at load */

/* Float32 rows (n x k) into Q8_0 (symmetric, 8 bits, a half scale per 32) or Q4_1 (4 bits, a half scale and a
   half minimum per 32) blocks, as llama.cpp's reference quantizers make them. Other types: returns -1. */
int ll_quantize_weights(int t, const float *w, int64_t n, int64_t k, void *out, int nthreads) {
    if (t != T_Q8_0 && t != T_Q4_1) return -1;
    if (k % QK) return -1;
    const int64_t nb = k / QK;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && n * k > (1 << 20))
    for (int64_t r = 0; r < n; r++) {
        const float *x = w + r * k;
        for (int64_t b = 0; b < nb; b++, x += QK) {
            if (t == T_Q8_0) {
                blk_q8_0 *o = (blk_q8_0 *)out + r * nb + b;
                float amax = 0.f;
                for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
                float d = amax / 127.f, id = d ? 1.f / d : 0.f;
                o->d = f32_to_f16(d);
                for (int j = 0; j < QK; j++) o->qs[j] = (int8_t)nearest_int(x[j] * id);
            } else {
                blk_q4_1 *o = (blk_q4_1 *)out + r * nb + b;
                float lo = x[0], hi = x[0];
                for (int j = 1; j < QK; j++) { lo = fminf(lo, x[j]); hi = fmaxf(hi, x[j]); }
                float d = (hi - lo) / 15.f, id = d ? 1.f / d : 0.f;
                o->d = f32_to_f16(d);
                o->m = f32_to_f16(lo);
                for (int j = 0; j < 16; j++) {
                    int a = nearest_int((x[j] - lo) * id), c = nearest_int((x[j + 16] - lo) * id);
                    a = a < 0 ? 0 : (a > 15 ? 15 : a);
                    c = c < 0 ? 0 : (c > 15 ? 15 : c);
                    o->qs[j] = (uint8_t)(a | (c << 4));
                }
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- attention of a decode step */

/* a . b over n floats, in a fixed order (8 lanes, then their sum, then the tail) */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.f;
#if LL_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = hsum8(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Where one row of a decode step keeps its K/V: slot t of kv head h in layer l is at
   k + l * layer_stride + table[t / block_size] * block_stride + h * head_stride + (t % block_size) * slot_stride
   (in floats; a contiguous cache row is one block of all its slots, a paged one a block table), and pos is the
   slot (= position) it writes this step. Rows of one step may belong to different caches (sessions batched). */
typedef struct {
    float *k, *v;
    int64_t layer_stride, block_stride, head_stride, slot_stride, block_size;
    const int64_t *table;
    int64_t pos;
} ll_kvrow;

static inline int64_t kv_slot(const ll_kvrow *kv, int64_t layer, int64_t h, int64_t t) {
    return layer * kv->layer_stride + kv->table[t / kv->block_size] * kv->block_stride + h * kv->head_stride +
           (t % kv->block_size) * kv->slot_stride;
}

/* Slots lo..pos of one (layer, head) a block at a time: for each block its first slot's address (k or v) and the
   slots [j0, j1] of it that are in range. */
#define KV_BLOCKS(kv, store, layer, h, lo, first, j0, j1, body)                                                     \
    do {                                                                                                           \
        const int64_t bs_ = (kv)->block_size, b0_ = (lo) / bs_, b1_ = (kv)->pos / bs_;                              \
        const float *base_ = (store) + (layer) * (kv)->layer_stride + (h) * (kv)->head_stride;                      \
        for (int64_t b_ = b0_; b_ <= b1_; b_++) {                                                                  \
            const float *first = base_ + (kv)->table[b_] * (kv)->block_stride;                                      \
            const int64_t j0 = b_ == b0_ ? (lo) - b0_ * bs_ : 0, j1 = b_ == b1_ ? (kv)->pos - b1_ * bs_ : bs_ - 1;   \
            body                                                                                                   \
        }                                                                                                          \
    } while (0)

/* One (row, kv head) of a decode step's attention in layer `layer`: rotary on k (written to the cache at pos)
   and on the G query heads of this kv head, softmax(q k / sqrt(D)) v over slots [lo, pos] in a fixed order.
   x: the row's projections [(H + 2 Hkv) * D]; c, s: the rotary table at pos; out: the row's [H * D]. */
/* The rotated key and the value of KV head h of a row's new position, into its cache slot. */
static void store_head(const float *x, const float *c, const float *s, const ll_kvrow *kv, int64_t layer, int64_t H,
                       int64_t Hkv, int64_t D, int64_t h) {
    const int64_t half = D / 2;
    const float *kn = x + (H + h) * D, *vn = x + (H + Hkv + h) * D;
    float *kslot = kv->k + kv_slot(kv, layer, h, kv->pos), *vslot = kv->v + kv_slot(kv, layer, h, kv->pos);
    for (int64_t d = 0; d < D; d++) {
        float swapped = d < half ? kn[d + half] : kn[d - half];
        kslot[d] = kn[d] * c[d] + swapped * s[d];
        vslot[d] = vn[d];
    }
}

/* Attention of the query heads of KV head h of a row over its cache slots lo..pos (already stored). */
static void attend_head(const float *x, const float *c, const float *s, const ll_kvrow *kv, int64_t layer,
                        int64_t lo, int64_t H, int64_t Hkv, int64_t D, int64_t h, float scale, float *out) {
    const int64_t G = H / Hkv, half = D / 2;
    const int64_t n = kv->pos - lo + 1;
    float qr[512], p_stack[2048];
    float *p = n <= 2048 ? p_stack : (float *)malloc((size_t)n * sizeof(float));
    for (int64_t g = 0; g < G; g++) {
        const int64_t j = h * G + g;
        const float *qn = x + j * D;
        for (int64_t d = 0; d < D; d++) {
            float swapped = d < half ? qn[d + half] : qn[d - half];
            qr[d] = qn[d] * c[d] + swapped * s[d];
        }
        float m = -INFINITY;
        int64_t t = 0;
        KV_BLOCKS(kv, kv->k, layer, h, lo, kb, j0, j1, {
            for (int64_t j = j0; j <= j1; j++, t++) {
                p[t] = dot_f32(qr, kb + j * kv->slot_stride, D) * scale;
                m = fmaxf(m, p[t]);
            }
        });
        float sum = 0.f;
        for (int64_t t = 0; t < n; t++) {
            p[t] = expf(p[t] - m);
            sum += p[t];
        }
        float *o = out + j * D, inv = 1.f / sum;
        for (int64_t d = 0; d < D; d++) o[d] = 0.f;
        t = 0;
        KV_BLOCKS(kv, kv->v, layer, h, lo, vb, j0, j1, {
            for (int64_t j = j0; j <= j1; j++, t++) {
                const float *vv = vb + j * kv->slot_stride;
                const float w = p[t] * inv;
                for (int64_t d = 0; d < D; d++) o[d] += w * vv[d];
            }
        });
    }
    if (p != p_stack) free(p);
}

/* One quantized transformer layer, as `ll_decode_layers` runs it. */
typedef struct {
    const ll_weight *qkv, *o, *gate_up, *down;
    const float *attn_norm, *mlp_norm;
    const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias; /* NULL: none */
    int64_t window;                                            /* sliding window (0: none) */
} ll_layer;

static void add_bias(float *y, const float *bias, int64_t rows, int64_t n) {
    if (!bias) return;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < n; j++) y[r * n + j] += bias[j];
}

/* Bytes of scratch `ll_decode_layers` needs for `rows` rows. */
int64_t ll_decode_scratch_bytes(const ll_layer *L, int64_t nlayers, int64_t rows, int64_t H, int64_t Hkv, int64_t D,
                                int64_t inter) {
    int64_t lin = 0;
    for (int64_t i = 0; i < nlayers; i++) {
        const ll_weight *w[4] = {L[i].qkv, L[i].o, L[i].gate_up, L[i].down};
        for (int j = 0; j < 4; j++) {
            int64_t b = ll_scratch_bytes(w[j], rows);
            lin = b > lin ? b : lin;
        }
    }
    return 4 * rows * ((H + 2 * Hkv) * D + H * D + 2 * inter) + lin + 256;
}

/* A decode step (one new position per row; rows may be sessions, or the columns of one session's step) through
   `nlayers` quantized layers, in place on h [rows, hidden]:
   per layer h += o(attention(rotary(qkv(rmsnorm(h))))) and h += down(swiglu(gate_up(rmsnorm(h)))), the same calls
   in the same order as the layer-by-layer path, so the numbers are the same; cos, sin: [rows, D] at each row's
   position; kv: where each row keeps its K/V. One call instead of a few dozen from Python per token. */
void ll_decode_layers(const ll_layer *L, int64_t nlayers, float *h, int64_t rows, int64_t hidden, int64_t H,
                      int64_t Hkv, int64_t D, int64_t inter, float eps, const float *cos, const float *sin,
                      const ll_kvrow *kv, float scale, void *scratch, int nthreads) {
    const int64_t nqkv = (H + 2 * Hkv) * D;
    float *qkv = (float *)scratch, *att = qkv + rows * nqkv, *gu = att + rows * H * D;
    void *lin = gu + rows * 2 * inter;
    for (int64_t i = 0; i < nlayers; i++) {
        const ll_layer *l = &L[i];
        ll_linear(l->qkv, h, hidden, rows, qkv, nqkv, PRE_RMSNORM, l->attn_norm, eps, 0, lin, nthreads);
        add_bias(qkv, l->qkv_bias, rows, nqkv);
        int64_t longest = 0;
        for (int64_t b = 0; b < rows; b++) longest = kv[b].pos > longest ? kv[b].pos : longest;
        /* every row's new K/V first: rows may be consecutive positions of one sequence (a speculative step's
           columns), each attending to the ones before it */
        for (int64_t task = 0; task < rows * Hkv; task++)
            store_head(qkv + (task / Hkv) * nqkv, cos + (task / Hkv) * D, sin + (task / Hkv) * D, &kv[task / Hkv], i,
                       H, Hkv, D, task % Hkv);
#pragma omp parallel for schedule(static) num_threads(nthreads) \
    if (nthreads > 1 && rows * Hkv > 1 && rows * Hkv * (longest + 1) * D > (1 << 16))
        for (int64_t task = 0; task < rows * Hkv; task++) {
            const int64_t b = task / Hkv, hh = task % Hkv;
            const int64_t lo = l->window > 0 && kv[b].pos - l->window + 1 > 0 ? kv[b].pos - l->window + 1 : 0;
            attend_head(qkv + b * nqkv, cos + b * D, sin + b * D, &kv[b], i, lo, H, Hkv, D, hh, scale,
                        att + b * H * D);
        }
        ll_linear(l->o, att, H * D, rows, h, hidden, PRE_NONE, NULL, 0.f, 1, lin, nthreads);
        add_bias(h, l->o_bias, rows, hidden);
        ll_linear(l->gate_up, h, hidden, rows, gu, 2 * inter, PRE_RMSNORM, l->mlp_norm, eps, 0, lin, nthreads);
        add_bias(gu, l->gate_up_bias, rows, 2 * inter);
        ll_linear(l->down, gu, 2 * inter, rows, h, hidden, PRE_SWIGLU, NULL, 0.f, 1, lin, nthreads);
        add_bias(h, l->down_bias, rows, hidden);
    }
}

/* `ll_gemm` for a matrix in the x8 layout (tests). */
void ll_gemm_x8(int t, const void *w, int64_t n, int64_t k, const void *xq, int64_t rows, float *y) {
#if LL_AVX2
    const int64_t lx = act_row_bytes(act_kind(t), k), rb = ll_row_bytes(t, k);
    for (int64_t g = 0; g < n / 8; g++)
        for (int64_t r0 = 0; r0 < rows; r0 += 4) {
            const int R = rows - r0 < 4 ? (int)(rows - r0) : 4;
            float v[32];
            x8_rows(t, (const char *)w + g * 8 * rb, k / QK, (const char *)xq + r0 * lx, lx, R, v);
            for (int r = 0; r < R; r++)
                for (int l = 0; l < 8; l++) y[(r0 + r) * n + 8 * g + l] = v[8 * r + l];
        }
#else
    (void)t, (void)w, (void)n, (void)k, (void)xq, (void)rows, (void)y;
#endif
}
