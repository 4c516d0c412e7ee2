/*
 * HashedNets kernels: W[i,j] = s(i,j) * theta[h(i,j)] and its transpose
 * (the gradient dL/dtheta_k = sum over h(i,j) = k of s(i,j) dL/dW[i,j]),
 * with the index and sign recomputed from the seed on every call, so no
 * per-weight index is ever stored.
 *
 *   u        = j / g, the unit of g consecutive columns (g = 1: each weight; g = kh*kw: a conv kernel)
 *   x        = XXH32 of the 8 bytes (i, u) as two little-endian uint32, with the layer seed
 *   xxhash:   b = floor((x >> 1) * K / 2^31),  s = bit 0 of x ? -1 : +1
 *   modular:  b = (seed + i*u) mod K,          s as above   (the index (w0 + i*j) mod N)
 *   h        = b * g + j mod g                 (theta holds K units of g values)
 *
 * Index and sign come from disjoint bits of one XXH32 value.  The index maps the
 * top 31 bits onto 0..K-1 by a multiplication (Lemire's range reduction), not a
 * division; the modular index steps through a row by adding i mod K.  Within a
 * row the hash state after the row word is fixed, so each weight costs the j
 * word and the avalanche: two 32-bit multiplies, computed in blocks that the
 * compiler vectorises (AVX2 where the CPU has it, chosen at load time).
 *
 * Plain C with no Python API, loaded with ctypes (which releases the GIL);
 * PyInit_ exists only so that setuptools builds and locates it as an extension module.
 */
#include <Python.h>
#include <stdint.h>

#define Q1 0x9E3779B1U
#define Q2 0x85EBCA77U
#define Q3 0xC2B2AE3DU
#define Q4 0x27D4EB2FU
#define Q5 0x165667B1U
#define BLOCK 256

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTORISED __attribute__((target_clones("avx2", "default")))
#else
#define VECTORISED
#endif

static inline uint32_t rotl32(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

/* The XXH32 state of a row after its first word (i): shared by every weight of the row. */
static inline uint32_t row_state(uint32_t i, uint32_t seed) {
    return rotl32(seed + Q5 + 8U + i * Q3, 17) * Q4;
}

/* XXH32 of (i, j) from the row state: the second word and the avalanche. */
static inline uint32_t finish(uint32_t state, uint32_t j) {
    uint32_t h = rotl32(state + j * Q3, 17) * Q4;
    h ^= h >> 15;
    h *= Q2;
    h ^= h >> 13;
    h *= Q3;
    h ^= h >> 16;
    return h;
}

/* The XXH32 value itself, for tests against the reference implementation. */
uint32_t ws_xxh32_pair(uint32_t i, uint32_t j, uint32_t seed) { return finish(row_state(i, seed), j); }

/* Index and sign of single weights (i, j0 .. j0+n-1), n <= BLOCK: the g = 1 path, vectorised. */
VECTORISED
static void block1(uint32_t i, uint32_t j0, int n, uint32_t seed, int modular, int sign, uint32_t K,
                   uint32_t *restrict idx, float *restrict sgn) {
    uint32_t state = row_state(i, seed);
    for (int t = 0; t < n; t++) {
        uint32_t x = finish(state, j0 + (uint32_t)t);
        idx[t] = (uint32_t)(((uint64_t)(x >> 1) * K) >> 31);
        sgn[t] = (sign && (x & 1U)) ? -1.0f : 1.0f;
    }
    if (modular) {
        uint64_t v = ((uint64_t)seed + (uint64_t)i * j0) % K, step = i % K;
        for (int t = 0; t < n; t++) {
            idx[t] = (uint32_t)v;
            v += step;
            if (v >= K) v -= K;
        }
    }
}

/* The same for units of g columns: one draw per unit, g consecutive values of theta. */
static void block(uint32_t i, uint32_t j0, int n, uint32_t seed, int modular, int sign, uint32_t K, uint32_t g,
                  uint32_t *restrict idx, float *restrict sgn) {
    if (g == 1) {
        block1(i, j0, n, seed, modular, sign, K, idx, sgn);
        return;
    }
    uint32_t state = row_state(i, seed);
    for (int t = 0; t < n; t++) {
        uint32_t j = j0 + (uint32_t)t, u = j / g;
        uint32_t x = finish(state, u);
        uint64_t b = modular ? ((uint64_t)seed + (uint64_t)i * u) % K : ((uint64_t)(x >> 1) * K) >> 31;
        idx[t] = (uint32_t)(b * g + j % g);
        sgn[t] = (sign && (x & 1U)) ? -1.0f : 1.0f;
    }
}

/* idx[(i-r0)*cols+j] = h(i,j), sgn[...] = s(i,j) for rows r0..r1-1: the portable path
   (other dtypes, other devices), a block of rows at a time. */
void ws_hash_index(int64_t r0, int64_t r1, int64_t cols, uint32_t seed, int modular, int sign, int64_t K,
                   int64_t g, int64_t *idx, int8_t *sgn) {
    uint32_t h[BLOCK];
    float s[BLOCK];
    for (int64_t i = r0; i < r1; i++)
        for (int64_t j = 0; j < cols; j += BLOCK) {
            int n = cols - j < BLOCK ? (int)(cols - j) : BLOCK;
            block((uint32_t)i, (uint32_t)j, n, seed, modular, sign, (uint32_t)K, (uint32_t)g, h, s);
            for (int t = 0; t < n; t++) {
                idx[(i - r0) * cols + j + t] = h[t];
                sgn[(i - r0) * cols + j + t] = (int8_t)s[t];
            }
        }
}

/* out[i*cols+j] = s(i,j) * theta[h(i,j)] for rows r0..r1-1. */
void ws_hash_expand_f32(const float *theta, int64_t K, int64_t g, int64_t r0, int64_t r1, int64_t cols,
                        uint32_t seed, int modular, int sign, float *out) {
    uint32_t h[BLOCK];
    float s[BLOCK];
    for (int64_t i = r0; i < r1; i++)
        for (int64_t j = 0; j < cols; j += BLOCK) {
            int n = cols - j < BLOCK ? (int)(cols - j) : BLOCK;
            block((uint32_t)i, (uint32_t)j, n, seed, modular, sign, (uint32_t)K, (uint32_t)g, h, s);
            float *o = out + i * cols + j;
            for (int t = 0; t < n; t++) o[t] = s[t] * theta[h[t]];
        }
}

/* gtheta[h(i,j)] += s(i,j) * grad[i*cols+j] over all rows (one thread: the sums collide). */
void ws_hash_scatter_f32(const float *grad, int64_t K, int64_t g, int64_t rows, int64_t cols, uint32_t seed,
                         int modular, int sign, float *gtheta) {
    uint32_t h[BLOCK];
    float s[BLOCK];
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j += BLOCK) {
            int n = cols - j < BLOCK ? (int)(cols - j) : BLOCK;
            block((uint32_t)i, (uint32_t)j, n, seed, modular, sign, (uint32_t)K, (uint32_t)g, h, s);
            const float *g = grad + i * cols + j;
            for (int t = 0; t < n; t++) gtheta[h[t]] += s[t] * g[t];
        }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hash_core", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__hash_core(void) { return PyModule_Create(&module); }
