/*
 * Codebook GEMM: y = x · Wᵀ + b where W (N x K) is held as b-bit indices into
 * small fp32 tables (one per output row, per group of a row, or one per tensor),
 * never as fp32 weights.
 *
 * In-memory index layout (per row, blocks of 64 weights; the packed file keeps
 * its plain bit stream and is converted at load by ws_cb_from_stream):
 *   4 bits: 32 bytes; sub-block s (16 bytes) holds weight 32s+j in the low nibble
 *           of byte j and weight 32s+16+j in the high nibble, so one 16-byte load
 *           widened to dwords gives 16 indices for one register-table lookup and a
 *           shift by 4 gives the next 16.
 *   2 bits: 16 bytes; byte j holds weight 16t+j in bits 2t..2t+1 (t = 0..3).
 *   3 bits: 24 bytes; the low two bits as the 2-bit layout, then a 64-bit
 *           little-endian word whose bit i is bit 2 of weight i.
 *   8 bits: 64 bytes, one index per byte (tables of 32..256 entries: 5..8 bits).
 * 1-bit codebooks use the 2-bit layout (their tables are padded to 4 entries).
 * Rows are padded to whole blocks with index 0; padded weights are never used.
 *
 * Table for weight (n, k): tab + n * tab_stride + (k / group) * entries
 * (tab_stride = 0 for one table per tensor; group = K for one table per row).
 *
 * Strategies:
 *   small M ("fused"): each row's indices are decoded into registers and FMA'd against
 *     up to 8 input rows a pass; the layer is read once per pass.  AVX-512 looks 16
 *     weights up in a one-register table (vpermps); AVX2 looks 32 up in the table's
 *     four byte planes (vpshufb) and assembles their fp32 values with unpacks.
 *   large M ("tile"): 32 rows are decoded and transposed into a k-major tile
 *     (weights of 32 outputs for each k) that stays in L2, then a 12 x 32
 *     broadcast micro-kernel runs over the input rows, the output written row-major;
 *     optionally in bf16: on AMX tiles where the CPU has them (the bf16 tile is AMX's
 *     B operand as it is), else vdpbf16ps on k-pairs (AVX512_BF16).
 * Every path (portable C, AVX2, AVX-512) computes the same sums; the choice is
 * made at run time (ws_cb_isa), never at build time: no -march flags.
 *
 * Threads: a small pthread pool of our own (not OpenMP, whose runtime would be a
 * second one beside torch's), whose idle workers poll for 300 us, yielding the core
 * to torch's own threads, and then sleep (see pool_spin_ns for why so long).
 *
 * Plain C loaded with ctypes by weightshare/kernels/__init__.py, but for one METH_FASTCALL entry (the
 * per-layer call, where ctypes' argument conversion would cost as much as a small layer).
 */
#include <Python.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define WS_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define WS_PARALLEL_WORK 12e6 /* multiply-adds (~250 us on one core) above which a layer always splits */
#define WS_SMALL_WORK 1e6     /* and below which it never does */
#define PF_BYTES 4096          /* how far ahead the fused path prefetches a layer's indices */

#define ISA_PORTABLE 0
#define ISA_AVX2 1
#define ISA_AVX512 2
#define MODE_FP32 0
#define MODE_BF16 1

typedef struct {
    const uint8_t *idx;   /* N rows of row_bytes */
    const float *tab;     /* tables, fp32 */
    int64_t N, K;         /* outputs, inputs */
    int64_t group;        /* weights per table within a row (K for one per row) */
    int64_t tab_stride;   /* floats between the tables of consecutive rows (0: one table) */
    int64_t row_bytes;
    int bits;             /* layout: 2, 3, 4 or 8 */
    int entries;          /* table entries: 4 (1-2 bits), 8, 16, 32..256 */
} layer_t;

/* ------------------------------------------------------------------ layout */

static int block_bytes(int bits) {
    switch (bits) {
    case 2: return 16;
    case 3: return 24;
    case 4: return 32;
    default: return 64;
    }
}

int64_t ws_cb_row_bytes(int bits, int64_t K) { return ((K + 63) / 64) * block_bytes(bits); }

static inline int label_at(const uint8_t *row, int bits, int64_t k) {
    const int64_t b = k >> 6;
    const int j = (int)(k & 63);
    switch (bits) {
    case 4: {
        const uint8_t *p = row + b * 32 + (j >> 5) * 16;
        const int jj = j & 31;
        return jj < 16 ? (p[jj] & 15) : (p[jj - 16] >> 4);
    }
    case 2:
        return (row[b * 16 + (j & 15)] >> (2 * (j >> 4))) & 3;
    case 3: {
        const uint8_t *p = row + b * 24;
        return ((p[j & 15] >> (2 * (j >> 4))) & 3) | (((p[16 + (j >> 3)] >> (j & 7)) & 1) << 2);
    }
    default:
        return row[b * 64 + j];
    }
}

/* One row of labels (values < 2^bits, zero-padded to whole blocks) into the layout. */
static void encode_row(const uint8_t *lab, int bits, int64_t K, uint8_t *out) {
    const int64_t nb = (K + 63) / 64;
    uint8_t l[64];
    for (int64_t b = 0; b < nb; b++) {
        const int64_t k0 = b * 64;
        const int64_t n = K - k0 < 64 ? K - k0 : 64;
        memset(l, 0, sizeof l);
        memcpy(l, lab + k0, (size_t)n);
        uint8_t *p = out + b * block_bytes(bits);
        switch (bits) {
        case 4:
            for (int s = 0; s < 2; s++)
                for (int j = 0; j < 16; j++) p[16 * s + j] = (uint8_t)((l[32 * s + j] & 15) | (l[32 * s + 16 + j] << 4));
            break;
        case 2:
        case 3:
            for (int j = 0; j < 16; j++) {
                int v = 0;
                for (int t = 0; t < 4; t++) v |= (l[16 * t + j] & 3) << (2 * t);
                p[j] = (uint8_t)v;
            }
            if (bits == 3)
                for (int q = 0; q < 8; q++) {
                    int v = 0;
                    for (int i = 0; i < 8; i++) v |= ((l[8 * q + i] >> 2) & 1) << i;
                    p[16 + q] = (uint8_t)v;
                }
            break;
        default:
            memcpy(p, l, 64);
        }
    }
}

/* The packed file's little-endian bit stream (value i in bits [i*fbits, (i+1)*fbits)),
   rows of K values, into the layout of `bits`.  `stream` holds stream_bytes bytes. */
int ws_cb_from_stream(const uint8_t *stream, int64_t stream_bytes, int fbits, int64_t N, int64_t K, int bits,
                      uint8_t *out) {
    if (fbits < 1 || fbits > 8 || (fbits <= 2 && bits != 2) || (fbits == 3 && bits != 3) || (fbits == 4 && bits != 4) ||
        (fbits > 4 && bits != 8))
        return -1;
    if ((N * K * fbits + 7) / 8 > stream_bytes) return -2;
    uint8_t *lab = (uint8_t *)malloc((size_t)(K > 0 ? K : 1));
    if (!lab) return -3;
    const int64_t rb = ws_cb_row_bytes(bits, K);
    const unsigned mask = (1u << fbits) - 1;
    for (int64_t n = 0; n < N; n++) {
        int64_t pos = n * K * fbits;
        if (fbits == 4 && (pos & 7) == 0) {
            const uint8_t *s = stream + (pos >> 3);
            for (int64_t k = 0; k + 1 < K; k += 2) {
                lab[k] = s[k >> 1] & 15;
                lab[k + 1] = s[k >> 1] >> 4;
            }
            if (K & 1) lab[K - 1] = s[K >> 1] & 15;
        } else {
            for (int64_t k = 0; k < K; k++, pos += fbits) {
                const int64_t byte = pos >> 3;
                unsigned v = stream[byte];
                if (byte + 1 < stream_bytes) v |= (unsigned)stream[byte + 1] << 8;
                lab[k] = (uint8_t)((v >> (pos & 7)) & mask);
            }
        }
        encode_row(lab, bits, K, out + n * rb);
    }
    free(lab);
    return 0;
}

/* The layout back into labels, N x K row-major (for saving and for tests). */
void ws_cb_to_labels(const uint8_t *idx, int bits, int64_t N, int64_t K, uint8_t *labels) {
    const int64_t rb = ws_cb_row_bytes(bits, K);
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) labels[n * K + k] = (uint8_t)label_at(idx + n * rb, bits, k);
}

/* Dense-and-sparse outliers: y (M x N) += x (M x K) . S^T, S in CSR (row pointer crow[N+1], columns,
   values).  A few thousand entries per layer.  One row of x: a short dot product per output over x's
   row, which stays in L1.  More rows: SB rows of x at a time, transposed so that each entry's SB
   inputs are contiguous and the inner loop is SB independent multiply-adds (vectorised by the
   compiler at any ISA level) instead of one dependent chain per row. */
#define WS_SB 16
/* one row of x: a short dot product per output */
static void sparse_row(const float *xr, const int64_t *crow, const int64_t *col, const float *val, int64_t N, float *yr) {
    for (int64_t r = 0; r < N; r++) {
        float acc = 0.0f;
        for (int64_t j = crow[r]; j < crow[r + 1]; j++) acc += val[j] * xr[col[j]];
        yr[r] += acc;
    }
}

/* rows [m0, m0 + mb) of x (mb <= SB) transposed into xt (K x SB), sums into yt (N x SB), then added to y */
static void sparse_block(const float *x, int64_t m0, int64_t mb, int64_t K, const int64_t *crow, const int64_t *col,
                         const float *val, int64_t N, float *y, float *xt) {
    for (int64_t k = 0; k < K; k++)
        for (int64_t i = 0; i < WS_SB; i++) xt[k * WS_SB + i] = i < mb ? x[(m0 + i) * K + k] : 0.0f;
    float *yt = xt + K * WS_SB; /* the block's sums, (N, SB): written in order, added to y row by row */
    for (int64_t r = 0; r < N; r++) {
        float acc[WS_SB] = {0};
        for (int64_t j = crow[r]; j < crow[r + 1]; j++) {
            const float v = val[j], *xc = xt + col[j] * WS_SB;
            for (int i = 0; i < WS_SB; i++) acc[i] += v * xc[i];
        }
        memcpy(yt + r * WS_SB, acc, sizeof acc);
    }
    for (int64_t i = 0; i < mb; i++) {
        float *yr = y + (m0 + i) * N;
        for (int64_t r = 0; r < N; r++) yr[r] += yt[r * WS_SB + i];
    }
}

/* ------------------------------------------------------------------ thread pool */

typedef void (*task_fn)(void *ctx, int tid, int nth);

#define MAX_THREADS 256
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t pool_busy = PTHREAD_MUTEX_INITIALIZER; /* one caller at a time */
static int pool_workers = 0;
static task_fn pool_fn;
static void *pool_ctx;
static int pool_nth;
static _Atomic uint64_t pool_gen = 0;
static _Atomic uint64_t pool_left = 0;
static _Atomic int pool_awake = 0;       /* workers polling for work (not asleep) */
static _Atomic uint64_t pool_kick = 0;   /* bumped to wake sleeping workers without work */
/* How long an idle worker keeps polling before it sleeps.  Waking a sleeping thread costs 60-100 us
   on a virtual machine, more than a whole small layer; while a model runs, the next large layer comes
   within a millisecond (an LLM decode step runs norms, rotary embeddings and attention between them:
   polling 1 ms instead of 0.3 found the worker awake for every layer of a 1.2 B Llama step, 3-5 %
   faster).  The poll yields the core, so torch's own threads run meanwhile. */
static int64_t pool_spin_ns = 1000000;

static inline void cpu_relax(void) {
#ifdef WS_X86
    _mm_pause();
#endif
}

static inline int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* poll `word` until it differs from `seen` or spin_ns pass; returns its last value */
static uint64_t poll_change(_Atomic uint64_t *word, uint64_t seen, int64_t spin_ns) {
    uint64_t g = atomic_load_explicit(word, memory_order_acquire);
    if (g != seen || spin_ns <= 0) return g;
    const int64_t deadline = now_ns() + spin_ns;
    for (;;) {
        for (int i = 0; i < 32; i++) {
            cpu_relax();
            if ((g = atomic_load_explicit(word, memory_order_acquire)) != seen) return g;
        }
        if (now_ns() > deadline) return g;
        sched_yield();
    }
}

static uint64_t pool_born[MAX_THREADS]; /* the generation a worker was created in: it has not seen the next */

static void *worker_main(void *arg) {
    const int tid = (int)(intptr_t)arg;
    uint64_t seen = pool_born[tid]; /* not pool_gen: the caller may bump it before this thread runs */
    for (;;) {
        atomic_fetch_add(&pool_awake, 1);
        uint64_t g = poll_change(&pool_gen, seen, pool_spin_ns);
        atomic_fetch_sub(&pool_awake, 1);
        if (g == seen) {
            pthread_mutex_lock(&pool_mu);
            const uint64_t kick = atomic_load(&pool_kick);
            while ((g = atomic_load(&pool_gen)) == seen && atomic_load(&pool_kick) == kick)
                pthread_cond_wait(&pool_wake, &pool_mu);
            pthread_mutex_unlock(&pool_mu);
            if (g == seen) continue; /* kicked awake: poll again */
        }
        seen = g;
        if (tid < pool_nth) pool_fn(pool_ctx, tid, pool_nth);
        if (atomic_fetch_sub_explicit(&pool_left, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&pool_mu);
            pthread_cond_signal(&pool_done);
            pthread_mutex_unlock(&pool_mu);
        }
    }
    return NULL;
}

static void pool_after_fork(void) {
    /* the workers do not exist in a forked child: start afresh */
    pthread_mutex_init(&pool_mu, NULL);
    pthread_mutex_init(&pool_busy, NULL);
    pthread_cond_init(&pool_wake, NULL);
    pthread_cond_init(&pool_done, NULL);
    pool_workers = 0;
    atomic_store(&pool_gen, 0);
    atomic_store(&pool_left, 0);
}

static int pool_grow(int want) {
    static int registered = 0;
    if (!registered) {
        pthread_atfork(NULL, NULL, pool_after_fork);
        registered = 1;
    }
    while (pool_workers < want) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pool_born[pool_workers + 1] = atomic_load(&pool_gen);
        int rc = pthread_create(&th, &attr, worker_main, (void *)(intptr_t)(pool_workers + 1));
        pthread_attr_destroy(&attr);
        if (rc) break;
        pool_workers++;
    }
    return pool_workers;
}

/* fn(ctx, tid, nth) for tid in 0..nth-1, tid 0 on the calling thread. */
static void parallel(task_fn fn, void *ctx, int nth) {
    if (nth > MAX_THREADS) nth = MAX_THREADS;
    if (nth <= 1 || pthread_mutex_trylock(&pool_busy) != 0) { /* nested or concurrent callers run alone */
        fn(ctx, 0, 1);
        return;
    }
    if (pool_grow(nth - 1) < nth - 1) nth = pool_workers + 1;
    pool_fn = fn;
    pool_ctx = ctx;
    pool_nth = nth;
    atomic_store(&pool_left, pool_workers);
    pthread_mutex_lock(&pool_mu);
    atomic_fetch_add_explicit(&pool_gen, 1, memory_order_release);
    pthread_cond_broadcast(&pool_wake);
    pthread_mutex_unlock(&pool_mu);
    fn(ctx, 0, nth);
    if (atomic_load_explicit(&pool_left, memory_order_acquire) > 0) {
        /* the workers started with this call: they finish within a few microseconds of us */
        const int64_t deadline = now_ns() + 200000;
        while (atomic_load_explicit(&pool_left, memory_order_acquire) > 0 && now_ns() < deadline)
            for (int i = 0; i < 32; i++) cpu_relax();
    }
    if (atomic_load(&pool_left) > 0) {
        pthread_mutex_lock(&pool_mu);
        while (atomic_load(&pool_left) > 0) pthread_cond_wait(&pool_done, &pool_mu);
        pthread_mutex_unlock(&pool_mu);
    }
    pthread_mutex_unlock(&pool_busy);
}

/* Whether `want` workers are polling now (then a parallel region costs about a microsecond); if not,
   wake the sleeping ones so that the layers that follow find them polling, and say no. */
static int pool_ready(int want) {
    if (want <= 0) return 1;
    if (pool_workers >= want && atomic_load(&pool_awake) >= want) return 1;
    if (pthread_mutex_trylock(&pool_busy) == 0) { /* not while another caller runs a region */
        pool_grow(want);
        pthread_mutex_lock(&pool_mu);
        atomic_fetch_add(&pool_kick, 1);
        pthread_cond_broadcast(&pool_wake);
        pthread_mutex_unlock(&pool_mu);
        pthread_mutex_unlock(&pool_busy);
    }
    return 0;
}

void ws_cb_set_spin(int microseconds) { pool_spin_ns = microseconds < 0 ? 0 : (int64_t)microseconds * 1000; }

static void split(int64_t n, int tid, int nth, int64_t *a, int64_t *b) {
    *a = n * tid / nth;
    *b = n * (tid + 1) / nth;
}

/* scratch per thread: the decoded tile (and bf16 copies of the input rows) */
static __thread float *scratch = NULL;
static __thread size_t scratch_size = 0;

static float *get_scratch(size_t floats) {
    if (floats > scratch_size) {
        free(scratch);
        scratch = (float *)aligned_alloc(64, ((floats * sizeof(float) + 63) / 64) * 64);
        scratch_size = scratch ? floats : 0;
    }
    return scratch;
}

/* ------------------------------------------------------------------ portable C */

/* Dense-and-sparse outliers: y (M x N) += x (M x K) . S^T, S in CSR (row pointer crow[N+1], columns,
   values).  A few thousand entries per layer.  One row of x: a short dot product per output over x's
   row, which stays in L1.  More rows: SB rows of x at a time, transposed so that each entry's SB
   inputs are contiguous and the inner loop is SB independent multiply-adds (vectorised by the
   compiler at any ISA level) instead of one dependent chain per row; the blocks split over threads. */
typedef struct {
    const float *x;
    int64_t M, K, N;
    const int64_t *crow, *col;
    const float *val;
    float *y;
} sparse_ctx;

static void task_sparse(void *p, int tid, int nth) {
    sparse_ctx *c = (sparse_ctx *)p;
    int64_t b0, b1;
    split((c->M + WS_SB - 1) / WS_SB, tid, nth, &b0, &b1);
    if (b0 >= b1) return;
    float *xt = get_scratch((size_t)(c->K + c->N) * WS_SB);
    for (int64_t b = b0; b < b1; b++) {
        const int64_t m0 = b * WS_SB, mb = c->M - m0 < WS_SB ? c->M - m0 : WS_SB;
        if (xt)
            sparse_block(c->x, m0, mb, c->K, c->crow, c->col, c->val, c->N, c->y, xt);
        else /* no memory for the transposed block: the plain loop */
            for (int64_t m = m0; m < m0 + mb; m++) sparse_row(c->x + m * c->K, c->crow, c->col, c->val, c->N, c->y + m * c->N);
    }
}

void ws_sparse_add(const float *x, int64_t M, int64_t K, const int64_t *crow, const int64_t *col,
                   const float *val, int64_t N, float *y, int nthreads) {
    if (M == 1) {
        sparse_row(x, crow, col, val, N, y);
        return;
    }
    sparse_ctx c = {x, M, K, N, crow, col, val, y};
    const double work = (double)crow[N] * (double)M; /* multiply-adds */
    const int nth = nthreads > 1 && work >= WS_SMALL_WORK / 4 && M > WS_SB ? nthreads : 1;
    parallel(task_sparse, &c, nth);
}

/* whether AVX2 decodes this layer by byte planes (2-4 bits, one table per whole 64-weight blocks) */
static int planes_fit(const layer_t *L) { return L->bits != 8 && (L->group == L->K || L->group % 64 == 0); }

/* the group of weight k, for k in the zero-padded tail as well (which keeps the row's last table) */
static inline int64_t last_group(const layer_t *L, int64_t k) {
    const int64_t g = k / L->group, last = L->K / L->group - 1;
    return g < last ? g : last;
}

static inline const float *table_of(const layer_t *L, int64_t n, int64_t k) {
    return L->tab + n * L->tab_stride + (k / L->group) * L->entries;
}

static void decode_row_c(const layer_t *L, int64_t n, int64_t k0, int64_t k1, float *out) {
    const uint8_t *row = L->idx + n * L->row_bytes;
    for (int64_t k = k0; k < k1; k++) out[k - k0] = table_of(L, n, k)[label_at(row, L->bits, k)];
}

typedef struct {
    const layer_t *L;
    const float *x;
    int64_t M, ldx;
    const float *bias;
    float *y;
    int64_t ldy;
    int mode;
    int isa;
    const float *xi; /* fused path: x in passes of at most 16 (AVX2: 8) rows, each [Kp/V][rows][V], zero-padded */
    int64_t Kp;      /* K rounded up to a whole block of 64 */
    _Atomic int64_t *next; /* fused path: the next unclaimed row (threads take chunks of rows as they go) */
} gemm_t;

static void task_portable(void *p, int tid, int nth) {
    const gemm_t *g = (const gemm_t *)p;
    const layer_t *L = g->L;
    int64_t n0, n1;
    split(L->N, tid, nth, &n0, &n1);
    float *w = get_scratch((size_t)L->K + 1);
    if (!w) return;
    for (int64_t n = n0; n < n1; n++) {
        decode_row_c(L, n, 0, L->K, w);
        for (int64_t m = 0; m < g->M; m++) {
            const float *x = g->x + m * g->ldx;
            float s = 0.f;
            for (int64_t k = 0; k < L->K; k++) s += x[k] * w[k];
            g->y[m * g->ldy + n] = s + (g->bias ? g->bias[n] : 0.f);
        }
    }
}

/* Weights of a row per pass of the fused path (a multiple of 64): MB interleaved input rows of that
   length take about 24 KB, so they stay in L1 while every row of W streams past them. */
static int64_t chunk_len(int MB, int V) {
    (void)V;
    int64_t c = ((MB == 1 ? 32768 : 24576) / (4 * MB)) & ~(int64_t)63; /* one input row: 8192 weights, 32 KB */
    return c < 64 ? 64 : c;
}

/* x rows [m0, m0 + mb) as [Kp/V][mb][V] (zero past K), the fused path's input.  `order` (or NULL for the
   natural one): the weight of a 64-block that each of its 64 positions holds, the order in which the AVX2
   byte-plane decode produces weights, so that the kernel's loads of x need no shuffle. */
static void interleave_rows(const float *x, int64_t ldx, int64_t m0, int mb, int64_t K, int64_t Kp, int V,
                            const uint8_t *order, float *out) {
    for (int64_t k0 = 0; k0 < Kp; k0 += V)
        for (int m = 0; m < mb; m++) {
            const float *xr = x + (m0 + m) * ldx;
            float *o = out + (k0 * mb) + m * V;
            for (int j = 0; j < V; j++) {
                const int64_t k = order ? (k0 & ~(int64_t)63) + order[(k0 + j) & 63] : k0 + j;
                o[j] = k < K ? xr[k] : 0.f;
            }
        }
}

#ifdef WS_X86
/* ------------------------------------------------------------------ AVX2 */

#define AVX2 __attribute__((target("avx2,fma")))

#define INLINE inline __attribute__((always_inline))
typedef void (*fused_fn)(const gemm_t *, int64_t, int64_t, int64_t);

/* Byte planes, the AVX2 decode of 2-, 3- and 4-bit indices.  A table of up to 16 fp32 entries is held as four
   16-byte planes, plane j holding byte j of every entry (in both 128-bit lanes), so one vpshufb looks up byte j
   of 32 weights and eight unpacks assemble their fp32 values: 12 shuffles for 32 weights, exact, where the
   two-vpermps-and-blend lookup takes about 20 (and vpermps is the slower shuffle on AMD's cores).  The
   weights come out in an order of their own (PLANE_ORDER); the fused path lays out x in that order. */
static AVX2 INLINE void planes_avx2(const float *t, const int E, __m256i P[4]) {
    const __m128i bytes = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    __m128i q[4]; /* q[i] dword j: byte j of entries 4i..4i+3 */
    for (int i = 0; i < 4; i++)
        q[i] = 4 * i < E ? _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(t + 4 * i)), bytes) : _mm_setzero_si128();
    const __m128i a = _mm_unpacklo_epi32(q[0], q[1]), b = _mm_unpacklo_epi32(q[2], q[3]);
    const __m128i c = _mm_unpackhi_epi32(q[0], q[1]), d = _mm_unpackhi_epi32(q[2], q[3]);
    P[0] = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(a, b));
    P[1] = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(a, b));
    P[2] = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(c, d));
    P[3] = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(c, d));
}

/* 32 table indices (bytes < 16; lane 0 weights A..A+15, lane 1 weights B..B+15) to fp32 weights:
   w[i] = weights A+4i..A+4i+3 then B+4i..B+4i+3 */
static AVX2 INLINE void lookup32_avx2(const __m256i I, const __m256i P[4], __m256 w[4]) {
    const __m256i b0 = _mm256_shuffle_epi8(P[0], I), b1 = _mm256_shuffle_epi8(P[1], I);
    const __m256i b2 = _mm256_shuffle_epi8(P[2], I), b3 = _mm256_shuffle_epi8(P[3], I);
    const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
    const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
    w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
    w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
    w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
    w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
}

/* bit 2 of 32 weights (bit i of `bits32` is weight i: 0..15 to lane 0, 16..31 to lane 1) as 4 or 0 per byte */
static AVX2 INLINE __m256i high_bit_avx2(uint32_t bits32) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i h = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits32), spread), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(h, bit), _mm256_set1_epi8(4));
}

/* The two index vectors of a 64-block (2, 3 or 4 bits): I[0] covers positions 0-31 of PLANE_ORDER, I[1] 32-63. */
static AVX2 INLINE void block_indices_avx2(const uint8_t *p, const int BITS, __m256i I[2]) {
    if (BITS == 4) { /* lane 0 of a load is sub-block 0 (weights 0-15 low nibbles, 16-31 high), lane 1 sub-block 1 */
        const __m256i v = _mm256_loadu_si256((const __m256i *)p), m = _mm256_set1_epi8(15);
        I[0] = _mm256_and_si256(v, m);                         /* weights 0-15 | 32-47 */
        I[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);   /* weights 16-31 | 48-63 */
    } else { /* byte j holds weight 16t + j in bits 2t..2t+1 */
        const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p)), m = _mm256_set1_epi8(3);
        I[0] = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), m); /* 0-15 | 16-31 */
        I[1] = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)), m); /* 32-47 | 48-63 */
        if (BITS == 3) {
            uint64_t hb;
            memcpy(&hb, p + 16, 8);
            I[0] = _mm256_or_si256(I[0], high_bit_avx2((uint32_t)hb));
            I[1] = _mm256_or_si256(I[1], high_bit_avx2((uint32_t)(hb >> 32)));
        }
    }
}

/* The first weight of each 16-weight lane run of a block's two index vectors (lb: 0 for 2-3 bits, 1 for 4):
   A and B of I[0], then of I[1]. */
static const int PLANE_FIRST[2][4] = {{0, 16, 32, 48}, {0, 32, 16, 48}};
/* PLANE_ORDER[lb][j]: the weight of a 64-block at position j of the byte-plane decode's output */
static uint8_t PLANE_ORDER[2][64];
static void plane_order_init(void) {
    for (int lb = 0; lb < 2; lb++)
        for (int j = 0; j < 64; j++) {
            const int v = j / 8, l = j % 8, half = v / 4, i = v % 4;
            PLANE_ORDER[lb][j] = (uint8_t)(PLANE_FIRST[lb][2 * half + (l >= 4)] + 4 * i + (l & 3));
        }
}

static AVX2 inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static AVX2 inline __m256 maskload8(const float *p, int64_t left) {
    if (left >= 8) return _mm256_loadu_ps(p);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left), lane));
}

/* Small M on AVX2, 2-4 bits with one table per row (or per tensor) or groups of whole 64-blocks: R rows of W
   decoded 32 weights at a time by byte planes and FMA'd against MB input rows (x in PLANE_ORDER). */
static AVX2 INLINE void fused_rows_avx2(const gemm_t *g, int64_t m0, int64_t n, int64_t kc0, int64_t kc1, const int BITS,
                                        const int MB, const int R) {
    const layer_t *L = g->L;
    const int E = L->entries, BB = block_bytes(BITS);
    /* one set of accumulators unless a single one would carry the whole FMA chain (more sets spill on AVX2's
       16 registers and measured slower) */
    const int SETS = R * MB >= 2 ? 1 : 2;
    const float *xc = g->xi + m0 * g->Kp;
    const uint8_t *row[2];
    const float *rt[2];
    __m256i P[2][4];
    const int64_t gb = L->group == L->K ? INT64_MAX : L->group / 64; /* blocks per table */
    for (int r = 0; r < R; r++) {
        row[r] = L->idx + (n + r) * L->row_bytes;
        rt[r] = L->tab + (n + r) * L->tab_stride;
        planes_avx2(rt[r] + (gb == INT64_MAX ? 0 : (kc0 / 64 / gb) * E), E, P[r]);
    }
    __m256 acc[2][8][2];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++)
            for (int s = 0; s < SETS; s++) acc[r][m][s] = _mm256_setzero_ps();
    const int64_t group_bytes = (int64_t)R * L->row_bytes;
    const int64_t ahead = group_bytes * (group_bytes >= PF_BYTES ? 1 : (PF_BYTES + group_bytes - 1) / group_bytes);
    const int whole = kc0 == 0 && kc1 >= g->Kp;
    for (int64_t b = kc0 / 64; b < kc1 / 64; b++) {
        if (gb != INT64_MAX && b % gb == 0 && b > kc0 / 64)
            for (int r = 0; r < R; r++) planes_avx2(rt[r] + (b / gb) * E, E, P[r]);
        if (whole)
            for (int64_t off = 0; off < R * BB; off += 64)
                _mm_prefetch((const char *)(row[0] + ahead + b * R * BB + off), _MM_HINT_T0);
        else if ((b * BB) % 64 < BB)
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(row[r] + ahead + b * BB), _MM_HINT_T0);
        const float *xb = xc + b * 64 * MB;
        for (int r = 0; r < R; r++) {
            __m256i I[2];
            block_indices_avx2(row[r] + b * BB, BITS, I);
            for (int h = 0; h < 2; h++) { /* 32 weights at a time: fewer vectors live than a whole block */
                __m256 w[4];
                lookup32_avx2(I[h], P[r], w);
                for (int v = 0; v < 4; v++)
                    for (int m = 0; m < MB; m++) {
                        const int u = 4 * h + v;
                        acc[r][m][u % SETS] = _mm256_fmadd_ps(w[v], _mm256_load_ps(xb + (u * MB + m) * 8), acc[r][m][u % SETS]);
                    }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) {
            __m256 a = acc[r][m][0];
            for (int s = 1; s < SETS; s++) a = _mm256_add_ps(a, acc[r][m][s]);
            float *yv = g->y + (m0 + m) * g->ldy + n + r;
            *yv = hsum256(a) + (kc0 ? *yv : g->bias ? g->bias[n + r] : 0.f);
        }
}

/* Weights 8u..8u+7 of a 64-block (u = 0..7) in natural order, one vector: the table lookup for 5-8-bit
   tables (a gather) and for groups that are not whole blocks (two 8-entry vpermps and a blend). */
static AVX2 inline __m256 decode8_avx2(const uint8_t *blk, int bits, int u, const float *t) {
    if (bits == 4) {
        /* sub-block s = u/4; within it: u%4 = 0: bytes 0-7 low, 1: bytes 8-15 low, 2: 0-7 high, 3: 8-15 high */
        const int s = u >> 2, q = u & 3;
        __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 16 * s + 8 * (q & 1))));
        if (q >= 2) d = _mm256_srli_epi32(d, 4);
        const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(t), d);
        const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(t + 8), d);
        return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(d, 28)));
    }
    if (bits == 2 || bits == 3) {
        const int tt = u >> 1, h = u & 1; /* weights 16tt + 8h + i */
        __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 8 * h)));
        d = _mm256_and_si256(_mm256_srlv_epi32(d, _mm256_set1_epi32(2 * tt)), _mm256_set1_epi32(3));
        if (bits == 3) {
            const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
            const __m256i hb = _mm256_and_si256(_mm256_set1_epi32(blk[16 + u]), bit);
            d = _mm256_or_si256(d, _mm256_and_si256(_mm256_cmpeq_epi32(hb, bit), _mm256_set1_epi32(4)));
        }
        /* 2 bits: a table of 4 entries (not 8 to load) */
        return _mm256_permutevar8x32_ps(bits == 3 ? _mm256_loadu_ps(t) : _mm256_broadcast_ps((const __m128 *)t), d);
    }
    const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 8 * u)));
    return _mm256_i32gather_ps(t, d, 4);
}

/* one row whose table changes inside a block, or 5-8-bit tables: one vector at a time, x in natural order */
static AVX2 INLINE void fused_vec_avx2(const gemm_t *g, int64_t m0, int64_t n, int64_t kc0, int64_t kc1, const int BITS,
                                       const int MB) {
    const layer_t *L = g->L;
    const int64_t K = L->K;
    const float *xc = g->xi + m0 * g->Kp;
    const uint8_t *row = L->idx + n * L->row_bytes;
    const float *rt = L->tab + n * L->tab_stride;
    const int SETS = MB >= 4 ? 1 : 2;
    __m256 acc[8][2];
    for (int m = 0; m < MB; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    const int64_t gv = L->group == K ? INT64_MAX : L->group / 8;
    int64_t gi = last_group(L, kc0), left = gv == INT64_MAX ? gv : gv - (kc0 % L->group) / 8;
    const float *t = rt + gi * L->entries;
    for (int64_t k = kc0; k < kc1; k += 8) {
        if (left == 0) {
            gi = last_group(L, k);
            t = rt + gi * L->entries;
            left = gv;
        }
        left--;
        if ((k & 63) == 0) _mm_prefetch((const char *)(row + (k >> 6) * block_bytes(BITS) + PF_BYTES), _MM_HINT_T0);
        const __m256 w = decode8_avx2(row + (k >> 6) * block_bytes(BITS), BITS, (int)((k >> 3) & 7), t);
        const float *xv = xc + (k >> 3) * MB * 8;
        const int s = SETS == 1 ? 0 : (int)((k >> 3) & 1);
        for (int m = 0; m < MB; m++) acc[m][s] = _mm256_fmadd_ps(w, _mm256_load_ps(xv + 8 * m), acc[m][s]);
    }
    for (int m = 0; m < MB; m++) {
        float *yv = g->y + (m0 + m) * g->ldy + n;
        const __m256 a = SETS == 1 ? acc[m][0] : _mm256_add_ps(acc[m][0], acc[m][1]);
        *yv = hsum256(a) + (kc0 ? *yv : g->bias ? g->bias[n] : 0.f);
    }
}

static AVX2 INLINE void fused_avx2(const gemm_t *g, int64_t m0, int64_t n0, int64_t n1, const int BITS, const int MB) {
    const layer_t *L = g->L;
    const int64_t KCH = chunk_len(MB, 8);
    for (int64_t kc0 = 0; kc0 < g->Kp; kc0 += KCH) {
        const int64_t kc1 = g->Kp - kc0 < KCH ? g->Kp : kc0 + KCH;
        int64_t n = n0;
        if (BITS != 8 && planes_fit(L)) {
            const int R = MB <= 4 ? 2 : 1;
            for (; n + R <= n1; n += R) fused_rows_avx2(g, m0, n, kc0, kc1, BITS, MB, R);
            for (; n < n1; n++) fused_rows_avx2(g, m0, n, kc0, kc1, BITS, MB, 1);
        } else {
            for (; n < n1; n++) fused_vec_avx2(g, m0, n, kc0, kc1, BITS, MB);
        }
    }
}

#define FUSED_AVX2_1(BITS, MB) \
    static AVX2 void fused_avx2_##BITS##_##MB(const gemm_t *g, int64_t m0, int64_t n0, int64_t n1) { fused_avx2(g, m0, n0, n1, BITS, MB); }
#define FUSED_AVX2_BITS(BITS) FUSED_AVX2_1(BITS, 1) FUSED_AVX2_1(BITS, 2) FUSED_AVX2_1(BITS, 3) FUSED_AVX2_1(BITS, 4) \
    FUSED_AVX2_1(BITS, 5) FUSED_AVX2_1(BITS, 6) FUSED_AVX2_1(BITS, 7) FUSED_AVX2_1(BITS, 8)
FUSED_AVX2_BITS(2)
FUSED_AVX2_BITS(3)
FUSED_AVX2_BITS(4)
FUSED_AVX2_BITS(8)
#define FUSED_ROW8(ISA, B) {ISA##_##B##_1, ISA##_##B##_2, ISA##_##B##_3, ISA##_##B##_4, ISA##_##B##_5, ISA##_##B##_6, ISA##_##B##_7, ISA##_##B##_8}
static const fused_fn fused_avx2_tab[4][16] = {FUSED_ROW8(fused_avx2, 2), FUSED_ROW8(fused_avx2, 3), FUSED_ROW8(fused_avx2, 4),
                                               FUSED_ROW8(fused_avx2, 8)};

static int bits_slot(int bits) { return bits == 2 ? 0 : bits == 3 ? 1 : bits == 4 ? 2 : 3; }

/* rows split over threads; input rows in passes of at most mb_max */
static void task_fused(void *p, int tid, int nth, const fused_fn tab[4][16], int mb_max) {
    const gemm_t *g = (const gemm_t *)p;
    const int64_t N = g->L->N;
    (void)tid;
    /* Rows in chunks claimed as threads go (one thread: one chunk of all rows): a static half each
       leaves one thread waiting whenever the other starts late or runs slower (a busy neighbour, a
       core shared with torch's threads) */
    int64_t chunk = nth == 1 ? N : (N / (8 * nth)) & ~(int64_t)3;
    chunk = chunk < 16 ? 16 : chunk;
    for (;;) {
        const int64_t n0 = atomic_fetch_add_explicit(g->next, chunk, memory_order_relaxed);
        if (n0 >= N) return;
        const int64_t n1 = N - n0 < chunk ? N : n0 + chunk;
        for (int64_t m0 = 0; m0 < g->M; m0 += mb_max)
            tab[bits_slot(g->L->bits)][g->M - m0 < mb_max ? g->M - m0 - 1 : mb_max - 1](g, m0, n0, n1);
    }
}

static void task_fused_avx2(void *p, int tid, int nth) { task_fused(p, tid, nth, fused_avx2_tab, 8); }

/* Large M, AVX2: 16 rows decoded and transposed (8x8 blocks) into a k-major tile, then a 6 x 16 micro-kernel. */
static AVX2 inline void transpose8(__m256 r[8]) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

#define NR2 16
/* tile[k][16] for k in [k0, k0 + kc) (kc a multiple of 8), rows n0.. n0+nr-1 (missing rows zero) */
#define DECODE_TILE_AVX2(BITS)                                                                                   \
    static AVX2 void tile_avx2_##BITS(const layer_t *L, int64_t n0, int nr, int64_t k0, int64_t kc, float *tile) { \
        for (int half = 0; half < 2; half++) {                                                                   \
            const float *t[8] = {0};                                                                             \
            const uint8_t *rows[8];                                                                              \
            const float *rt[8];                                                                                  \
            for (int r = 0; r < 8; r++) {                                                                        \
                const int64_t n = n0 + 8 * half + r < n0 + nr ? n0 + 8 * half + r : -1;                          \
                rows[r] = n >= 0 ? L->idx + n * L->row_bytes : NULL;                                             \
                rt[r] = n >= 0 ? L->tab + n * L->tab_stride : NULL;                                              \
            }                                                                                                    \
            int64_t gcur = -1;                                                                                   \
            for (int64_t k = k0; k < k0 + kc; k += 8) {                                                          \
                const int64_t gi = last_group(L, k);                                                             \
                if (gi != gcur) {                                                                                \
                    for (int r = 0; r < 8; r++)                                                                  \
                        if (rows[r]) t[r] = rt[r] + gi * L->entries;                                             \
                    gcur = gi;                                                                                   \
                }                                                                                                \
                __m256 v[8];                                                                                     \
                for (int r = 0; r < 8; r++)                                                                      \
                    v[r] = rows[r] ? decode8_avx2(rows[r] + (k >> 6) * block_bytes(BITS), BITS, (int)((k >> 3) & 7), t[r]) \
                                   : _mm256_setzero_ps();                                                        \
                transpose8(v);                                                                                   \
                for (int j = 0; j < 8; j++) _mm256_store_ps(tile + (k - k0 + j) * NR2 + 8 * half, v[j]);         \
            }                                                                                                    \
        }                                                                                                        \
    }
DECODE_TILE_AVX2(2)
DECODE_TILE_AVX2(3)
DECODE_TILE_AVX2(4)
DECODE_TILE_AVX2(8)

typedef void (*tile_fn)(const layer_t *, int64_t, int, int64_t, int64_t, float *);
static const tile_fn tile_avx2_tab[4] = {tile_avx2_2, tile_avx2_3, tile_avx2_4, tile_avx2_8};

/* x rows [0, mr) x columns [k0, k0+kc) (kc a multiple of 8; columns past K and rows past mr are zero)
   as a panel [kc][6], so that the micro-kernel's broadcasts read one stream */
static AVX2 void pack_panel_avx2(const float *x, int64_t ldx, int mr, int64_t k0, int64_t kc, int64_t K, float *xp) {
    const __m256i six = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
    for (int64_t k = k0; k < k0 + kc; k += 8) {
        __m256 v[8];
        for (int m = 0; m < 8; m++) v[m] = m < mr && K - k > 0 ? maskload8(x + m * ldx + k, K - k) : _mm256_setzero_ps();
        transpose8(v);
        for (int j = 0; j < 8; j++) _mm256_maskstore_ps(xp + (k - k0 + j) * 6, six, v[j]);
    }
}

/* y[0..mr)[0..nr) (+)= panel · tile over kc: 6 x 16 accumulators in 12 registers.  Named variables, not an
   array: GCC keeps an array of twelve vectors in memory and stores all of them on every k (2.5x slower). */
static AVX2 void ukernel_avx2(const float *xp, const float *tile, int64_t kc, float *y, int64_t ldy, int mr, int nr,
                              int accumulate, const float *bias) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t k = 0; k < kc; k++) {
        const __m256 w0 = _mm256_load_ps(tile + k * NR2), w1 = _mm256_load_ps(tile + k * NR2 + 8);
        const float *xk = xp + k * 6;
        __m256 xv = _mm256_broadcast_ss(xk);
        c00 = _mm256_fmadd_ps(xv, w0, c00), c01 = _mm256_fmadd_ps(xv, w1, c01);
        xv = _mm256_broadcast_ss(xk + 1);
        c10 = _mm256_fmadd_ps(xv, w0, c10), c11 = _mm256_fmadd_ps(xv, w1, c11);
        xv = _mm256_broadcast_ss(xk + 2);
        c20 = _mm256_fmadd_ps(xv, w0, c20), c21 = _mm256_fmadd_ps(xv, w1, c21);
        xv = _mm256_broadcast_ss(xk + 3);
        c30 = _mm256_fmadd_ps(xv, w0, c30), c31 = _mm256_fmadd_ps(xv, w1, c31);
        xv = _mm256_broadcast_ss(xk + 4);
        c40 = _mm256_fmadd_ps(xv, w0, c40), c41 = _mm256_fmadd_ps(xv, w1, c41);
        xv = _mm256_broadcast_ss(xk + 5);
        c50 = _mm256_fmadd_ps(xv, w0, c50), c51 = _mm256_fmadd_ps(xv, w1, c51);
    }
    float buf[6][16];
    _mm256_storeu_ps(buf[0], c00), _mm256_storeu_ps(buf[0] + 8, c01);
    _mm256_storeu_ps(buf[1], c10), _mm256_storeu_ps(buf[1] + 8, c11);
    _mm256_storeu_ps(buf[2], c20), _mm256_storeu_ps(buf[2] + 8, c21);
    _mm256_storeu_ps(buf[3], c30), _mm256_storeu_ps(buf[3] + 8, c31);
    _mm256_storeu_ps(buf[4], c40), _mm256_storeu_ps(buf[4] + 8, c41);
    _mm256_storeu_ps(buf[5], c50), _mm256_storeu_ps(buf[5] + 8, c51);
    for (int m = 0; m < mr; m++) {
        float *yr = y + m * ldy;
        for (int j = 0; j < nr; j++) yr[j] = (accumulate ? yr[j] : (bias ? bias[j] : 0.f)) + buf[m][j];
    }
}
#endif /* WS_X86 */

/* ------------------------------------------------------------------ AVX-512 */
#ifdef WS_X86
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define AVX512BF __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

typedef struct {
    __m512 a, b, c, d;
    const float *p;
} lut512_t;

static AVX512 inline lut512_t lut512_load(const float *p, int bits, int entries) {
    lut512_t t;
    t.p = p;
    t.a = t.b = t.c = t.d = _mm512_setzero_ps();
    if (bits == 4) {
        t.a = _mm512_loadu_ps(p);
    } else if (bits == 2 || bits == 3) {
        t.a = _mm512_broadcast_f32x4(_mm_loadu_ps(p));
        if (bits == 3) t.b = _mm512_broadcast_f32x4(_mm_loadu_ps(p + 4));
    } else if (entries <= 64) {
        t.a = _mm512_loadu_ps(p);
        t.b = _mm512_loadu_ps(p + 16);
        if (entries == 64) {
            t.c = _mm512_loadu_ps(p + 32);
            t.d = _mm512_loadu_ps(p + 48);
        }
    }
    return t;
}

/* Weights 16v..16v+15 of a 64-block (v = 0..3). */
static AVX512 inline __m512 decode16_avx512(const uint8_t *blk, int bits, int entries, int v, const lut512_t *t) {
    if (bits == 4) {
        __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + 16 * (v >> 1))));
        if (v & 1) d = _mm512_srli_epi32(d, 4);
        return _mm512_permutexvar_ps(d, t->a);
    }
    if (bits == 2 || bits == 3) {
        const __m512i d =
            _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)blk)), _mm512_set1_epi32(2 * v));
        __m512 w = _mm512_permutexvar_ps(d, t->a);
        if (bits == 3) {
            uint16_t hm;
            memcpy(&hm, blk + 16 + 2 * v, 2);
            w = _mm512_mask_permutexvar_ps(w, (__mmask16)hm, d, t->b);
        }
        return w;
    }
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + 16 * v)));
    if (entries <= 32) return _mm512_permutex2var_ps(t->a, d, t->b);
    if (entries == 64) {
        const __m512 lo = _mm512_permutex2var_ps(t->a, d, t->b), hi = _mm512_permutex2var_ps(t->c, d, t->d);
        return _mm512_mask_blend_ps(_mm512_test_epi32_mask(d, _mm512_set1_epi32(32)), lo, hi);
    }
    return _mm512_i32gather_ps(d, t->p, 4);
}

static AVX512 inline __m512 maskload16(const float *p, int64_t left) {
    if (left >= 16) return _mm512_loadu_ps(p);
    if (left <= 0) return _mm512_setzero_ps();
    return _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1), p);
}

/* A whole 64-block with one table: 4 vectors of 16 weights. */
static AVX512 INLINE void block64_512(const uint8_t *p, const int BITS, const int E, const lut512_t *t, __m512 w[4]) {
    if (BITS == 4) {
        const __m512i d0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
        const __m512i d1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16)));
        w[0] = _mm512_permutexvar_ps(d0, t->a);
        w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(d0, 4), t->a);
        w[2] = _mm512_permutexvar_ps(d1, t->a);
        w[3] = _mm512_permutexvar_ps(_mm512_srli_epi32(d1, 4), t->a);
    } else if (BITS == 2 || BITS == 3) {
        const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
        const __m512i d1 = _mm512_srli_epi32(d, 2), d2 = _mm512_srli_epi32(d, 4), d3 = _mm512_srli_epi32(d, 6);
        w[0] = _mm512_permutexvar_ps(d, t->a);
        w[1] = _mm512_permutexvar_ps(d1, t->a);
        w[2] = _mm512_permutexvar_ps(d2, t->a);
        w[3] = _mm512_permutexvar_ps(d3, t->a);
        if (BITS == 3) {
            uint64_t hm;
            memcpy(&hm, p + 16, 8);
            w[0] = _mm512_mask_permutexvar_ps(w[0], (__mmask16)hm, d, t->b);
            w[1] = _mm512_mask_permutexvar_ps(w[1], (__mmask16)(hm >> 16), d1, t->b);
            w[2] = _mm512_mask_permutexvar_ps(w[2], (__mmask16)(hm >> 32), d2, t->b);
            w[3] = _mm512_mask_permutexvar_ps(w[3], (__mmask16)(hm >> 48), d3, t->b);
        }
    } else {
        for (int v = 0; v < 4; v++) w[v] = decode16_avx512(p, 8, E, v, t);
    }
}

/* lane m of the result = the sum of the 16 lanes of v[m] (a transpose-and-add tree: 30 shuffles for 16 sums) */
static AVX512 INLINE __m512 hsum16x16(const __m512 v[16]) {
    __m512 u[8], w[4];
    for (int i = 0; i < 8; i++) u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int j = 0; j < 4; j++) {
        const __m512d a = _mm512_castps_pd(u[2 * j]), b = _mm512_castps_pd(u[2 * j + 1]);
        w[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88), _mm512_shuffle_f32x4(w[2], w[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

/* Small M: R rows of W decoded 16 weights at a time into registers and FMA'd against MB input rows, so
   that each input vector loaded serves R rows (loads, not FMAs, bound this loop otherwise); the layer
   is read once per pass of MB inputs.  Inputs are interleaved ([k/16][m][16]): every load is a
   constant offset from one pointer, and a chunk of k stays in L1 while the rows stream past. */
static AVX512 INLINE void fused_rows_512(const gemm_t *g, int64_t m0, int64_t n, int64_t kc0, int64_t kc1, const int BITS,
                                         const int MB, const int R) {
    const layer_t *L = g->L;
    const int E = L->entries, BB = block_bytes(BITS);
    const int SETS = R * MB >= 8 ? 1 : 2; /* fewer than 8 accumulators: two sets break the latency chain */
    const float *xc = g->xi + m0 * g->Kp;
    const uint8_t *row[2];
    lut512_t t[4];
    for (int r = 0; r < R; r++) {
        row[r] = L->idx + (n + r) * L->row_bytes;
        t[r] = lut512_load(L->tab + (n + r) * L->tab_stride, BITS, E);
    }
    __m512 acc[4][8][2]; /* fixed sizes: arrays sized by parameters would be VLAs, kept on the stack */
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++)
            for (int s = 0; s < SETS; s++) acc[r][m][s] = _mm512_setzero_ps();
    /* the R rows are contiguous: while they are read, the rows PF_BYTES or more ahead are prefetched in step,
       so that a layer streamed from DRAM keeps enough reads in flight (2x the out-of-cache throughput) */
    const int64_t group_bytes = (int64_t)R * L->row_bytes;
    const int64_t ahead = group_bytes * (group_bytes >= PF_BYTES ? 1 : (PF_BYTES + group_bytes - 1) / group_bytes);
    const int whole = kc0 == 0 && kc1 >= g->Kp; /* this pass reads whole rows: sweep the group ahead in order */
    for (int64_t b = kc0 / 64; b < kc1 / 64; b++) {
        const float *xb = xc + b * 64 * MB;
        if (whole) /* R * BB bytes of the rows ahead per block of these: the next group, in address order */
            for (int64_t off = 0; off < R * BB; off += 64)
                _mm_prefetch((const char *)(row[0] + ahead + b * R * BB + off), _MM_HINT_T0);
        else if ((b * BB) % 64 < BB) /* a pass over part of the rows: the same blocks of the rows ahead */
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(row[r] + ahead + b * BB), _MM_HINT_T0);
        for (int v = 0; v < 4; v++) {
            __m512 w[4];
            for (int r = 0; r < R; r++) w[r] = decode16_avx512(row[r] + b * BB, BITS, E, v, &t[r]);
            for (int m = 0; m < MB; m++) {
                const __m512 xv = _mm512_load_ps(xb + (v * MB + m) * 16);
                for (int r = 0; r < R; r++) acc[r][m][v % SETS] = _mm512_fmadd_ps(w[r], xv, acc[r][m][v % SETS]);
            }
        }
    }
    /* R * MB sums, 16 at a time through the transpose-and-add tree; sum j is (row j / MB, input j % MB) */
    float out[64];
    for (int j0 = 0; j0 < R * MB; j0 += 16) {
        __m512 v[16];
        for (int j = 0; j < 16; j++) {
            v[j] = _mm512_setzero_ps();
            if (j0 + j < R * MB)
                for (int s = 0; s < SETS; s++) v[j] = _mm512_add_ps(v[j], acc[(j0 + j) / MB][(j0 + j) % MB][s]);
        }
        _mm512_storeu_ps(out + j0, hsum16x16(v));
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) {
            float *yv = g->y + (m0 + m) * g->ldy + n + r;
            *yv = out[r * MB + m] + (kc0 ? *yv : g->bias ? g->bias[n + r] : 0.f);
        }
}

/* one row whose table changes along it (groups of a multiple of 16 weights): one vector at a time */
static AVX512 INLINE void fused_grouped_512(const gemm_t *g, int64_t m0, int64_t n, int64_t kc0, int64_t kc1,
                                            const int BITS, const int MB) {
    const layer_t *L = g->L;
    const int E = L->entries, BB = block_bytes(BITS);
    const float *xc = g->xi + m0 * g->Kp;
    const uint8_t *row = L->idx + n * L->row_bytes;
    const float *rt = L->tab + n * L->tab_stride;
    __m512 acc[8];
    for (int m = 0; m < MB; m++) acc[m] = _mm512_setzero_ps();
    const int64_t gv = L->group / 16;
    int64_t gi = last_group(L, kc0), left = gv - (kc0 % L->group) / 16;
    lut512_t t = lut512_load(rt + gi * E, BITS, E);
    for (int64_t k = kc0; k < kc1; k += 16) {
        if (left == 0) {
            gi = last_group(L, k);
            t = lut512_load(rt + gi * E, BITS, E);
            left = gv;
        }
        left--;
        const __m512 w = decode16_avx512(row + (k >> 6) * BB, BITS, E, (int)((k >> 4) & 3), &t);
        const float *xv = xc + (k >> 4) * MB * 16;
        for (int m = 0; m < MB; m++) acc[m] = _mm512_fmadd_ps(w, _mm512_load_ps(xv + 16 * m), acc[m]);
    }
    for (int m = 0; m < MB; m++) {
        float *yv = g->y + (m0 + m) * g->ldy + n;
        *yv = _mm512_reduce_add_ps(acc[m]) + (kc0 ? *yv : g->bias ? g->bias[n] : 0.f);
    }
}

static AVX512 INLINE void fused_512(const gemm_t *g, int64_t m0, int64_t n0, int64_t n1, const int BITS, const int MB) {
    const layer_t *L = g->L;
    const int R = BITS == 8 ? 1 : MB <= 4 ? 4 : 2; /* 5..8-bit tables take up to 4 registers a row */
    const int64_t KCH = chunk_len(MB, 16);
    for (int64_t kc0 = 0; kc0 < g->Kp; kc0 += KCH) {
        const int64_t kc1 = g->Kp - kc0 < KCH ? g->Kp : kc0 + KCH;
        int64_t n = n0;
        if (L->group == L->K) {
            for (; n + R <= n1; n += R) fused_rows_512(g, m0, n, kc0, kc1, BITS, MB, R);
            for (; n < n1; n++) fused_rows_512(g, m0, n, kc0, kc1, BITS, MB, 1);
        } else {
            for (; n < n1; n++) fused_grouped_512(g, m0, n, kc0, kc1, BITS, MB);
        }
    }
}

#define FUSED_512_1(BITS, MB) \
    static AVX512 void fused_512_##BITS##_##MB(const gemm_t *g, int64_t m0, int64_t n0, int64_t n1) { fused_512(g, m0, n0, n1, BITS, MB); }
#define FUSED_512_BITS(BITS) FUSED_512_1(BITS, 1) FUSED_512_1(BITS, 2) FUSED_512_1(BITS, 3) FUSED_512_1(BITS, 4) \
    FUSED_512_1(BITS, 5) FUSED_512_1(BITS, 6) FUSED_512_1(BITS, 7) FUSED_512_1(BITS, 8)
FUSED_512_BITS(2)
FUSED_512_BITS(3)
FUSED_512_BITS(4)
FUSED_512_BITS(8)
static const fused_fn fused_512_tab[4][16] = {FUSED_ROW8(fused_512, 2), FUSED_ROW8(fused_512, 3), FUSED_ROW8(fused_512, 4),
                                              FUSED_ROW8(fused_512, 8)};

static void task_fused_512(void *p, int tid, int nth) { task_fused(p, tid, nth, fused_512_tab, 8); }

static AVX512 inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    /* r[4q + j] now holds, for rows 4q..4q+3, column j of each 128-bit lane: combine lanes across q */
    for (int j = 0; j < 4; j++) {
        t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);      /* lanes 0,2 of r[j], 0,2 of r[4+j] */
        t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);  /* lanes 1,3 */
        t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);         /* lane 0 of each: columns j */
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);     /* lane 2: columns 8+j */
        r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88); /* lane 1: columns 4+j */
        r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xDD); /* lane 3: columns 12+j */
    }
}

#define NR5 32
/* tile[k][32] fp32 (or, bf16 mode, tile[k/2][32] of bf16 pairs) for k in [k0, k0+kc), kc a multiple of 16 */
#define DECODE_TILE_512(BITS)                                                                                      \
    static AVX512 void tile_512_##BITS(const layer_t *L, int64_t n0, int nr, int64_t k0, int64_t kc, float *tile) { \
        const int E = L->entries;                                                                                  \
        for (int half = 0; half < 2; half++) {                                                                     \
            lut512_t t[16] = {0};                                                                                   \
            const uint8_t *rows[16];                                                                               \
            const float *rt[16];                                                                                   \
            for (int r = 0; r < 16; r++) {                                                                         \
                const int64_t n = 16 * half + r < nr ? n0 + 16 * half + r : -1;                                    \
                rows[r] = n >= 0 ? L->idx + n * L->row_bytes : NULL;                                               \
                rt[r] = n >= 0 ? L->tab + n * L->tab_stride : NULL;                                                \
            }                                                                                                      \
            int64_t gcur = -1;                                                                                     \
            for (int64_t k = k0; k < k0 + kc; k += 16) {                                                           \
                const int64_t gi = last_group(L, k);                                                               \
                if (gi != gcur) {                                                                                  \
                    for (int r = 0; r < 16; r++)                                                                   \
                        if (rows[r]) t[r] = lut512_load(rt[r] + gi * E, BITS, E);                                  \
                    gcur = gi;                                                                                     \
                }                                                                                                  \
                __m512 v[16];                                                                                      \
                for (int r = 0; r < 16; r++)                                                                       \
                    v[r] = rows[r] ? decode16_avx512(rows[r] + (k >> 6) * block_bytes(BITS), BITS, E, (int)((k >> 4) & 3), &t[r]) \
                                   : _mm512_setzero_ps();                                                          \
                transpose16(v);                                                                                    \
                for (int j = 0; j < 16; j++) _mm512_store_ps(tile + (k - k0 + j) * NR5 + 16 * half, v[j]);        \
            }                                                                                                      \
        }                                                                                                          \
    }
DECODE_TILE_512(2)
DECODE_TILE_512(3)
DECODE_TILE_512(4)
DECODE_TILE_512(8)
static const tile_fn tile_512_tab[4] = {tile_512_2, tile_512_3, tile_512_4, tile_512_8};

#define MR5 12
/* x rows [0, mr) x columns [k0, k0+kc) (kc a multiple of 16) as a panel [kc][12], zero past K and mr */
static AVX512 void pack_panel_512(const float *x, int64_t ldx, int mr, int64_t k0, int64_t kc, int64_t K, float *xp,
                                  const int H) {
    const __mmask16 keep = (__mmask16)((1u << H) - 1);
    for (int64_t k = k0; k < k0 + kc; k += 16) {
        __m512 v[16];
        for (int m = 0; m < 16; m++) v[m] = m < mr ? maskload16(x + m * ldx + k, K - k) : _mm512_setzero_ps();
        transpose16(v);
        for (int j = 0; j < 16; j++) _mm512_mask_storeu_ps(xp + (k - k0 + j) * H, keep, v[j]);
    }
}

/* lanes of the two 16-wide halves of a 32-column tile that hold columns < nr */
static AVX512 INLINE void tail_masks(int nr, __mmask16 *m0, __mmask16 *m1) {
    *m0 = (__mmask16)(nr >= 16 ? 0xFFFF : (1u << nr) - 1);
    *m1 = (__mmask16)(nr >= 32 ? 0xFFFF : nr <= 16 ? 0 : (1u << (nr - 16)) - 1);
}

static AVX512 INLINE void store_tile_512(__m512 c[MR5][2], float *y, int64_t ldy, int mr, int nr, int accumulate,
                                         const float *bias) {
    __mmask16 m0, m1;
    tail_masks(nr, &m0, &m1);
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    if (bias && !accumulate) {
        b0 = _mm512_maskz_loadu_ps(m0, bias);
        b1 = _mm512_maskz_loadu_ps(m1, bias + 16);
    }
    for (int m = 0; m < mr; m++) {
        float *yr = y + m * ldy;
        if (accumulate) {
            b0 = _mm512_maskz_loadu_ps(m0, yr);
            b1 = _mm512_maskz_loadu_ps(m1, yr + 16);
        }
        _mm512_mask_storeu_ps(yr, m0, _mm512_add_ps(b0, c[m][0]));
        _mm512_mask_storeu_ps(yr + 16, m1, _mm512_add_ps(b1, c[m][1]));
    }
}

/* y[0..mr)[0..nr) (+)= panel · tile over kc: H x 32 accumulators in 2H registers (rows past mr are zero);
   H = 12 for large M, 8 where M is small (16 inputs are two full panels of 8, not 12 + 4 padded) */
static AVX512 INLINE void ukernel_512_h(const float *xp, const float *tile, int64_t kc, float *y, int64_t ldy, int mr,
                                        int nr, int accumulate, const float *bias, const int H) {
    __m512 c[MR5][2];
    for (int m = 0; m < H; m++) c[m][0] = c[m][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; k++) {
        const __m512 w0 = _mm512_load_ps(tile + k * NR5), w1 = _mm512_load_ps(tile + k * NR5 + 16);
        for (int m = 0; m < H; m++) {
            const __m512 xv = _mm512_set1_ps(xp[k * H + m]);
            c[m][0] = _mm512_fmadd_ps(xv, w0, c[m][0]);
            c[m][1] = _mm512_fmadd_ps(xv, w1, c[m][1]);
        }
    }
    store_tile_512(c, y, ldy, mr, nr, accumulate, bias);
}

static AVX512 void ukernel_512(const float *xp, const float *tile, int64_t kc, float *y, int64_t ldy, int mr, int nr,
                               int accumulate, const float *bias) {
    ukernel_512_h(xp, tile, kc, y, ldy, mr, nr, accumulate, bias, MR5);
}

static AVX512 void ukernel_512_8(const float *xp, const float *tile, int64_t kc, float *y, int64_t ldy, int mr, int nr,
                                 int accumulate, const float *bias) {
    ukernel_512_h(xp, tile, kc, y, ldy, mr, nr, accumulate, bias, 8);
}

/* bf16: the fp32 tile [k][32] as bf16 pairs [k/2][32] (dword j = (w[2p][j], w[2p+1][j])) into out,
   which may be the tile itself (pair p is written after rows 2p and 2p+1 were read) */
static AVX512BF void tile_to_bf16_into(const float *tile, int64_t kc, uint32_t *out) {
    const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t p = 0; p < kc / 2; p++) {
        for (int h = 0; h < 2; h++) {
            const __m512 e = _mm512_load_ps(tile + (2 * p) * NR5 + 16 * h);
            const __m512 o = _mm512_load_ps(tile + (2 * p + 1) * NR5 + 16 * h);
            const __m512 lo = _mm512_permutex2var_ps(e, lo_idx, o), hi = _mm512_permutex2var_ps(e, hi_idx, o);
            _mm512_storeu_si512((__m512i *)(out + p * NR5 + 16 * h), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
}

static AVX512BF void tile_to_bf16(float *tile, int64_t kc) { tile_to_bf16_into(tile, kc, (uint32_t *)tile); }

/* the fp32 panel [kc][12] as bf16 pairs [kc/2][12], in place */
static AVX512BF void panel_to_bf16(float *xp, int64_t kc) {
    uint32_t *out = (uint32_t *)xp;
    const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t p = 0; p < kc / 2; p++) {
        const __m512 e = _mm512_maskz_loadu_ps(0x0FFF, xp + (2 * p) * MR5);
        const __m512 o = _mm512_maskz_loadu_ps(0x0FFF, xp + (2 * p + 1) * MR5);
        const __m512 lo = _mm512_permutex2var_ps(e, lo_idx, o), hi = _mm512_permutex2var_ps(e, hi_idx, o);
        /* dwords 0..11 hold the 12 rows' pairs; written after both rows were read */
        _mm512_mask_storeu_epi32(out + p * MR5, 0x0FFF, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

static AVX512BF void ukernel_512_bf16(const uint32_t *xp, const uint32_t *tile, int64_t kp, float *y, int64_t ldy, int mr,
                                      int nr, int accumulate, const float *bias) {
    __m512 c[MR5][2];
    for (int m = 0; m < MR5; m++) c[m][0] = c[m][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < kp; p++) {
        const __m512bh w0 = (__m512bh)_mm512_load_si512((const __m512i *)(tile + p * NR5));
        const __m512bh w1 = (__m512bh)_mm512_load_si512((const __m512i *)(tile + p * NR5 + 16));
        for (int m = 0; m < MR5; m++) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xp[p * MR5 + m]);
            c[m][0] = _mm512_dpbf16_ps(c[m][0], xv, w0);
            c[m][1] = _mm512_dpbf16_ps(c[m][1], xv, w1);
        }
    }
    store_tile_512(c, y, ldy, mr, nr, accumulate, bias);
}
#endif /* WS_X86 */

/* ------------------------------------------------------------------ tile driver */

/* Blocking (GotoBLAS-style): an M-block of MC input rows is packed into panels once and stays in L2;
   for each K-block of KC, each tile of 32 (AVX2: 16) rows of W is decoded once into a buffer that stays
   in L1 and is reused by every panel.  Threads take M-blocks when M is large, else tiles of N. */
#define MC_ROWS 240 /* a multiple of the micro-kernels' heights (12, 8, 6) */
#define SHORT_M 24  /* up to this many inputs, AVX-512 panels are 8 rows high */
#define KC_COLS 256 /* AVX-512: tile 32 x 256 fp32 = 32 KB; the M-block 240 x 256 fp32 = 240 KB */

static void task_tile(void *p, int tid, int nth) {
#ifdef WS_X86
    const gemm_t *g = (const gemm_t *)p;
    const layer_t *L = g->L;
    const int avx512 = g->isa == ISA_AVX512;
    const int bf16 = avx512 && g->mode == MODE_BF16;
    const int short8 = avx512 && !bf16 && g->M <= SHORT_M; /* few inputs: panels of 8 rows waste less padding */
    const int NRT = avx512 ? NR5 : NR2, MRT = avx512 ? (short8 ? 8 : MR5) : 6, KS = avx512 ? 16 : 8;
    const int64_t ntiles = (L->N + NRT - 1) / NRT, units = (g->M + MRT - 1) / MRT;
    int64_t m_lo = 0, m_hi = g->M, t_lo = 0, t_hi = ntiles;
    if (units >= 8 * nth || ntiles < 2 * nth) { /* rows of x per thread: each packs only its own */
        int64_t u0, u1;
        split(units, tid, nth, &u0, &u1);
        m_lo = u0 * MRT;
        m_hi = u1 * MRT < g->M ? u1 * MRT : g->M;
    } else { /* few inputs, many outputs: tiles per thread, each packs all of x */
        split(ntiles, tid, nth, &t_lo, &t_hi);
    }
    if (m_lo >= m_hi || t_lo >= t_hi) return;
    const int64_t Kp = ((L->K + KS - 1) / KS) * KS;
    float *tile = get_scratch((size_t)(KC_COLS * NRT + MC_ROWS * KC_COLS));
    if (!tile) return;
    float *xp = tile + KC_COLS * NRT;
    /* M-blocks of equal height (at most MC_ROWS): a short last block would decode every tile for a few rows */
    const int64_t nblocks = (m_hi - m_lo + MC_ROWS - 1) / MC_ROWS;
    int64_t mc_even = (m_hi - m_lo + nblocks - 1) / nblocks;
    mc_even = ((mc_even + MRT - 1) / MRT) * MRT;
    for (int64_t mb = m_lo; mb < m_hi; mb += mc_even) {
        const int64_t mc = m_hi - mb < mc_even ? m_hi - mb : mc_even;
        for (int64_t k0 = 0; k0 < Kp; k0 += KC_COLS) {
            const int64_t kc = Kp - k0 < KC_COLS ? Kp - k0 : KC_COLS;
            const int64_t kvalid = L->K - k0 < kc ? L->K - k0 : kc;
            for (int64_t pm = 0; pm < mc; pm += MRT) {
                const int mr = (int)(mc - pm < MRT ? mc - pm : MRT);
                if (avx512) {
                    pack_panel_512(g->x + (mb + pm) * g->ldx, g->ldx, mr, k0, kc, L->K, xp + pm * kc, MRT);
                    if (bf16) panel_to_bf16(xp + pm * kc, kc);
                } else {
                    pack_panel_avx2(g->x + (mb + pm) * g->ldx, g->ldx, mr, k0, kc, L->K, xp + pm * kc);
                }
            }
            for (int64_t t = t_lo; t < t_hi; t++) {
                const int64_t n0 = t * NRT;
                const int nr = (int)(L->N - n0 < NRT ? L->N - n0 : NRT);
                const float *bias = g->bias ? g->bias + n0 : NULL;
                if (avx512) {
                    tile_512_tab[bits_slot(L->bits)](L, n0, nr, k0, kc, tile);
                    if (bf16) tile_to_bf16(tile, kc);
                } else {
                    tile_avx2_tab[bits_slot(L->bits)](L, n0, nr, k0, kc, tile);
                }
                for (int64_t pm = 0; pm < mc; pm += MRT) {
                    const int mr = (int)(mc - pm < MRT ? mc - pm : MRT);
                    float *y = g->y + (mb + pm) * g->ldy + n0;
                    if (bf16)
                        ukernel_512_bf16((const uint32_t *)(xp + pm * kc), (const uint32_t *)tile, (kvalid + 1) / 2, y,
                                         g->ldy, mr, nr, k0 > 0, bias);
                    else if (short8)
                        ukernel_512_8(xp + pm * kc, tile, kvalid, y, g->ldy, mr, nr, k0 > 0, bias);
                    else if (avx512)
                        ukernel_512(xp + pm * kc, tile, kvalid, y, g->ldy, mr, nr, k0 > 0, bias);
                    else
                        ukernel_avx2(xp + pm * kc, tile, kvalid, y, g->ldy, mr, nr, k0 > 0, bias);
                }
            }
        }
    }
#else
    (void)p; (void)tid; (void)nth;
#endif
}

/* ------------------------------------------------------------------ entry points */

static int cpu_has_uncached(int isa) {
#ifdef WS_X86
    __builtin_cpu_init();
    if (isa == ISA_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
    if (isa == 3) return __builtin_cpu_supports("avx512bf16");
#endif
    return isa == ISA_PORTABLE;
}

static int cpu_has(int isa) {
    static int known = -1; /* bit i set: isa i checked and present (bit 4: checked at all) */
    if (known < 0) {
        int k = 16;
        for (int i = 0; i < 4; i++) k |= (cpu_has_uncached(i) ? 1 : 0) << i;
        known = k;
    }
    return (known >> isa) & 1;
}


/* ------------------------------------------------------------------ AMX (bf16 compute, large M) */
#ifdef WS_X86
/* Intel AMX: 8 tile registers of 16 rows x 64 bytes; tdpbf16ps C[16x16 fp32] += A[16x32 bf16] . B[32x16 bf16],
   B in pairs of k ("VNNI" layout): exactly the bf16 tile [k/2][32] this file already decodes into, two
   16-column B tiles 64 bytes apart.  A is x in bf16, row-major.  Used for compute="bf16" where the CPU
   has it (it multiplies about 16x more per cycle than AVX-512 FMAs); elsewhere bf16 uses vdpbf16ps. */
#define AMX_GROUP_BYTES (1 << 20) /* decoded bf16 weight tiles per group: half of a 2 MB L2 */
#define AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config_t;

static int amx_usable(void) {
    static int known = -1;
    if (known >= 0) return known;
    int ok = 0;
    unsigned a, b, c, d;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 24)) && (d & (1u << 22)) && cpu_has(3) &&
        cpu_has(ISA_AVX512)) {
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        if ((lo & (3u << 17)) == (3u << 17)) { /* the OS saves tile state */
#if defined(__linux__) && defined(SYS_arch_prctl)
            /* Linux hands out tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) */
            ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#endif
        }
    }
    known = ok;
    return ok;
}

static AMX void amx_configure(void) {
    amx_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* x rows [m0, m1) as bf16, row-major with Kp columns (zero past K); rows past M are zero too */
static AVX512BF void rows_to_bf16_amx(const float *x, int64_t ldx, int64_t m0, int64_t m1, int64_t M, int64_t K,
                                      int64_t Kp, uint16_t *xb) {
    for (int64_t m = m0; m < m1; m++) {
        uint16_t *o = xb + m * Kp;
        if (m >= M) {
            memset(o, 0, (size_t)Kp * 2);
            continue;
        }
        const float *xr = x + m * ldx;
        for (int64_t k = 0; k < Kp; k += 32) {
            const __m512 a = maskload16(xr + k, K - k), b = maskload16(xr + k + 16, K - k - 16);
            _mm512_storeu_si512((__m512i *)(o + k), (__m512i)_mm512_cvtne2ps_pbh(b, a));
        }
    }
}

typedef struct {
    const gemm_t *g;
    uint16_t *xb;
    int64_t Mp, Kp;
    int phase; /* 0: convert x, 1: multiply */
} amx_ctx;

static AMX void amx_block(const uint16_t *xb, int64_t Kp, const uint32_t *tile, float *y, int64_t ldy, int mr,
                          int nr, const float *bias) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < Kp; k += 32) {
        _tile_loadd(4, xb + k, Kp * 2);             /* A rows 0..15 */
        _tile_loadd(5, xb + 16 * Kp + k, Kp * 2);   /* A rows 16..31 */
        _tile_loadd(6, tile + (k / 2) * NR5, 128);  /* B columns 0..15 */
        _tile_loadd(7, tile + (k / 2) * NR5 + 16, 128); /* B columns 16..31 */
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    float c[4][16][16];
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
    __mmask16 m0, m1;
    tail_masks(nr, &m0, &m1);
    const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
    for (int r = 0; r < mr; r++) {
        const int h = r >> 4, rr = r & 15;
        _mm512_mask_storeu_ps(y + r * ldy, m0, _mm512_add_ps(b0, _mm512_loadu_ps(c[2 * h][rr])));
        _mm512_mask_storeu_ps(y + r * ldy + 16, m1, _mm512_add_ps(b1, _mm512_loadu_ps(c[2 * h + 1][rr])));
    }
}

static AMX void task_amx(void *p, int tid, int nth) {
    const amx_ctx *a = (const amx_ctx *)p;
    const gemm_t *g = a->g;
    const layer_t *L = g->L;
    if (a->phase == 0) {
        int64_t m0, m1;
        split(a->Mp, tid, nth, &m0, &m1);
        rows_to_bf16_amx(g->x, g->ldx, m0, m1, g->M, L->K, a->Kp, a->xb);
        return;
    }
    const int64_t ntiles = (L->N + NR5 - 1) / NR5;
    int64_t t0, t1;
    split(ntiles, tid, nth, &t0, &t1);
    if (t0 >= t1) return;
    /* tiles decoded in groups of at most AMX_GROUP_BYTES of bf16, each group reused by every 32-row block of x,
       so that a block's A tiles stay in L1 while the group's B tiles (in L2) pass by */
    const int64_t tile_bytes = a->Kp * NR5 * 2;
    int64_t group = AMX_GROUP_BYTES / tile_bytes;
    group = group < 1 ? 1 : group;
    float *scratch = get_scratch((size_t)(a->Kp * NR5 + (group * tile_bytes) / 4));
    if (!scratch) return;
    uint32_t *decoded = (uint32_t *)(scratch + a->Kp * NR5);
    amx_configure();
    for (int64_t g0 = t0; g0 < t1; g0 += group) {
        const int64_t g1 = t1 - g0 < group ? t1 : g0 + group;
        for (int64_t t = g0; t < g1; t++) {
            const int64_t n0 = t * NR5;
            tile_512_tab[bits_slot(L->bits)](L, n0, (int)(L->N - n0 < NR5 ? L->N - n0 : NR5), 0, a->Kp, scratch);
            tile_to_bf16_into(scratch, a->Kp, decoded + (t - g0) * (tile_bytes / 4));
        }
        for (int64_t m = 0; m < g->M; m += 32)
            for (int64_t t = g0; t < g1; t++) {
                const int64_t n0 = t * NR5;
                amx_block(a->xb + m * a->Kp, a->Kp, decoded + (t - g0) * (tile_bytes / 4), g->y + m * g->ldy + n0,
                          g->ldy, (int)(g->M - m < 32 ? g->M - m : 32), (int)(L->N - n0 < NR5 ? L->N - n0 : NR5),
                          g->bias ? g->bias + n0 : NULL);
            }
    }
    _tile_release();
}

/* 0 done; 1 not usable here (the caller takes the AVX-512 path) */
static int linear_amx(const gemm_t *g, int nth) {
    if (!amx_usable()) return 1;
    amx_ctx a = {g, NULL, ((g->M + 31) / 32) * 32, ((g->L->K + 31) / 32) * 32, 0};
    a.xb = (uint16_t *)aligned_alloc(64, (size_t)(((a.Mp * a.Kp * 2) + 63) / 64) * 64);
    if (!a.xb) return 1;
    parallel(task_amx, &a, nth);
    a.phase = 1;
    parallel(task_amx, &a, nth);
    free(a.xb);
    return 0;
}
#endif

/* Bit 0: AVX2+FMA, bit 1: AVX-512 (F, BW, VL, DQ), bit 2: AVX512_BF16, bit 3: AMX-BF16 usable; 0: portable C only. */
int ws_cb_isa(void) {
    int isa = (cpu_has(ISA_AVX2) ? 1 : 0) | (cpu_has(ISA_AVX512) ? 2 : 0) | (cpu_has(3) && cpu_has(ISA_AVX512) ? 4 : 0);
#ifdef WS_X86
    isa |= amx_usable() ? 8 : 0;
#endif
    return isa;
}

static int check_layer(const layer_t *L) {
    if (L->N < 0 || L->K < 1 || L->group < 1 || L->tab_stride < 0) return -1;
    if (!(L->bits == 2 || L->bits == 3 || L->bits == 4 || L->bits == 8)) return -1;
    if (L->bits == 2 && L->entries != 4) return -1;
    if (L->bits == 3 && L->entries != 8) return -1;
    if (L->bits == 4 && L->entries != 16) return -1;
    if (L->bits == 8 && !(L->entries == 32 || L->entries == 64 || L->entries == 128 || L->entries == 256)) return -1;
    if (L->K % L->group) return -1;
    if (L->row_bytes != ws_cb_row_bytes(L->bits, L->K)) return -1;
    return 0;
}

/* y (M x N, row stride ldy) = x (M x K, row stride ldx) · Wᵀ + bias.
   isa: ISA_PORTABLE / ISA_AVX2 / ISA_AVX512 (the caller checked ws_cb_isa); mode: fp32 or bf16 (AVX-512 only).
   fused_max: the largest M that takes the fused path.  Returns 0, or < 0 for arguments that do not fit. */
int ws_cb_linear(const float *x, int64_t M, int64_t ldx, const uint8_t *idx, const float *tab, int64_t N, int64_t K,
                 int bits, int entries, int64_t group, int64_t tab_stride, const float *bias, float *y, int64_t ldy,
                 int isa, int mode, int fused_max, int nthreads) {
    layer_t L = {idx, tab, N, K, group, tab_stride, ws_cb_row_bytes(bits, K), bits, entries};
    if (check_layer(&L) || M < 0 || ldx < K || ldy < N) return -1;
    if (M == 0 || N == 0) return 0;
    if (isa != ISA_PORTABLE && !cpu_has(isa)) return -2;
    if (mode == MODE_BF16 && !(isa == ISA_AVX512 && cpu_has(3))) mode = MODE_FP32;
    /* a group that ends inside a SIMD vector cannot take one table per vector */
    if (group != K && ((isa == ISA_AVX512 && group % 16) || (isa == ISA_AVX2 && group % 8))) isa = ISA_PORTABLE;
    _Atomic int64_t next_row = 0;
    gemm_t g = {&L, x, M, ldx, bias, y, ldy, mode, isa, NULL, ((K + 63) / 64) * 64, &next_row};
    /* Waking a sleeping thread costs 60-100 us on a virtual machine, a polling one about 1 us.  Large
       layers always split; mid-size ones split only if the workers are polling (else they run on one
       thread and wake the workers for the next layer); small ones never do. */
    /* AVX2's fused path spends more on decoding a weight than on one multiply-add: count it (about three) */
    const double work = (double)N * (double)K * ((double)M + (isa == ISA_AVX2 && M <= fused_max ? 3.0 : 0.0));
    int nth = nthreads < 1 ? 1 : nthreads;
    if (work < WS_SMALL_WORK || N < 64 || (work < WS_PARALLEL_WORK && !pool_ready(nth - 1))) nth = 1;
    if (isa == ISA_PORTABLE) {
        parallel(task_portable, &g, nth);
        return 0;
    }
#ifdef WS_X86
    if (M <= fused_max) {
        const int V = isa == ISA_AVX512 ? 16 : 8, MBX = 8; /* the fused kernels' passes of input rows */
        float *xi = (float *)aligned_alloc(64, (size_t)((M * g.Kp * 4 + 63) / 64) * 64);
        if (!xi) return -3;
        static pthread_once_t order_once = PTHREAD_ONCE_INIT;
        pthread_once(&order_once, plane_order_init);
        const uint8_t *order = isa == ISA_AVX2 && planes_fit(&L) ? PLANE_ORDER[bits == 4] : NULL;
        for (int64_t m0 = 0; m0 < M; m0 += MBX)
            interleave_rows(x, ldx, m0, (int)(M - m0 < MBX ? M - m0 : MBX), K, g.Kp, V, order, xi + m0 * g.Kp);
        g.xi = xi;
        parallel(isa == ISA_AVX512 ? task_fused_512 : task_fused_avx2, &g, nth);
        free(xi);
    } else if (!(mode == MODE_BF16 && isa == ISA_AVX512 && !getenv("WEIGHTSHARE_NO_AMX") && linear_amx(&g, nth) == 0)) {
        parallel(task_tile, &g, nth);
    }
#endif
    return 0;
}

/* ws_cb_linear with the layer's geometry in one array (built once per layer by the caller): g = {indices,
   tables, N, K, bits, entries, group, tab_stride} (pointers as integers).  Fewer arguments to convert per call. */
int ws_cb_linear_g(const int64_t *g, const float *x, int64_t M, const float *bias, float *y, int isa, int mode,
                   int fused_max, int nthreads) {
    return ws_cb_linear(x, M, g[3], (const uint8_t *)(intptr_t)g[0], (const float *)(intptr_t)g[1], g[2], g[3], (int)g[4],
                        (int)g[5], g[6], g[7], bias, y, g[2], isa, mode, fused_max, nthreads);
}

/* out[i] (K floats, row stride ldo) = row rows[i] of W decoded (rows == NULL: rows 0..count-1). */
typedef struct {
    const layer_t *L;
    const int64_t *rows;
    int64_t count;
    float *out;
    int64_t ldo;
    int isa;
} decode_ctx;

#ifdef WS_X86
static AVX512 void decode_row_512(const layer_t *L, int64_t n, float *out) {
    const uint8_t *row = L->idx + n * L->row_bytes;
    const float *rt = L->tab + n * L->tab_stride;
    int64_t gcur = -1;
    lut512_t t;
    for (int64_t k = 0; k < L->K; k += 16) {
        const int64_t gi = last_group(L, k);
        if (gi != gcur) {
            t = lut512_load(rt + gi * L->entries, L->bits, L->entries);
            gcur = gi;
        }
        const __m512 w = decode16_avx512(row + (k >> 6) * block_bytes(L->bits), L->bits, L->entries, (int)((k >> 4) & 3), &t);
        const int64_t left = L->K - k;
        _mm512_mask_storeu_ps(out + k, (__mmask16)(left >= 16 ? 0xFFFF : (1u << left) - 1), w);
    }
}
#endif

#ifdef WS_X86
/* a row decoded by byte planes (2-4 bits, tables per row or per whole blocks), stored in natural order: each
   vector of the lookup is two runs of 4 weights, one per 128-bit half */
static AVX2 void decode_row_avx2(const layer_t *L, int64_t n, float *out) {
    const int lb = L->bits == 4, BB = block_bytes(L->bits);
    const uint8_t *row = L->idx + n * L->row_bytes;
    const float *rt = L->tab + n * L->tab_stride;
    const int64_t gb = L->group == L->K ? INT64_MAX : L->group / 64;
    __m256i P[4];
    float tail[64];
    for (int64_t b = 0; b * 64 < L->K; b++) {
        if (b == 0 || (gb != INT64_MAX && b % gb == 0)) planes_avx2(rt + (gb == INT64_MAX ? 0 : b / gb) * L->entries, L->entries, P);
        __m256i I[2];
        switch (L->bits) {
        case 2: block_indices_avx2(row + b * BB, 2, I); break;
        case 3: block_indices_avx2(row + b * BB, 3, I); break;
        default: block_indices_avx2(row + b * BB, 4, I);
        }
        float *o = L->K - b * 64 >= 64 ? out + b * 64 : tail;
        for (int h = 0; h < 2; h++) {
            __m256 w[4];
            lookup32_avx2(I[h], P, w);
            for (int i = 0; i < 4; i++) {
                _mm_storeu_ps(o + PLANE_FIRST[lb][2 * h] + 4 * i, _mm256_castps256_ps128(w[i]));
                _mm_storeu_ps(o + PLANE_FIRST[lb][2 * h + 1] + 4 * i, _mm256_extractf128_ps(w[i], 1));
            }
        }
        if (o == tail) memcpy(out + b * 64, tail, (size_t)(L->K - b * 64) * sizeof(float));
    }
}
#endif

static void task_decode(void *p, int tid, int nth) {
    const decode_ctx *c = (const decode_ctx *)p;
    int64_t i0, i1;
    split(c->count, tid, nth, &i0, &i1);
    for (int64_t i = i0; i < i1; i++) {
        const int64_t n = c->rows ? c->rows[i] : i;
#ifdef WS_X86
        if (c->isa == ISA_AVX512) {
            decode_row_512(c->L, n, c->out + i * c->ldo);
            continue;
        }
        if (c->isa == ISA_AVX2) {
            decode_row_avx2(c->L, n, c->out + i * c->ldo);
            continue;
        }
#endif
        decode_row_c(c->L, n, 0, c->L->K, c->out + i * c->ldo);
    }
}

int ws_cb_decode_rows(const uint8_t *idx, const float *tab, int64_t N, int64_t K, int bits, int entries, int64_t group,
                      int64_t tab_stride, const int64_t *rows, int64_t count, float *out, int64_t ldo, int isa,
                      int nthreads) {
    layer_t L = {idx, tab, N, K, group, tab_stride, ws_cb_row_bytes(bits, K), bits, entries};
    if (check_layer(&L) || count < 0 || ldo < K) return -1;
    if (rows)
        for (int64_t i = 0; i < count; i++)
            if (rows[i] < 0 || rows[i] >= N) return -4; /* an id outside the table */
    if (!rows && count > N) return -1;
    if (isa != ISA_PORTABLE && !cpu_has(isa)) return -2;
    if (isa == ISA_AVX512 && group != K && group % 16) isa = ISA_PORTABLE;
    if (isa == ISA_AVX2 && !planes_fit(&L)) isa = ISA_PORTABLE;
    decode_ctx c = {&L, rows, count, out, ldo, isa};
    const int nth = (double)count * (double)K < 2e5 ? 1 : nthreads;
    parallel(task_decode, &c, nth);
    return 0;
}

/* setuptools builds this as an extension module.  Everything is called through ctypes but the one call made
   per layer per forward pass: linear_g(geometry, x, M, bias, y, isa, mode, fused_max, nthreads) (addresses
   as integers, bias 0 for none) is ws_cb_linear_g as a METH_FASTCALL function, because a ctypes call with
   nine converted arguments costs about 6 us, as long as a small layer takes.  The GIL is released. */
static PyObject *py_linear_g(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "linear_g takes 9 integer arguments");
        return NULL;
    }
    long long v[9];
    for (int i = 0; i < 9; i++) {
        v[i] = PyLong_AsLongLong(args[i]);
        if (v[i] == -1 && PyErr_Occurred()) return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ws_cb_linear_g((const int64_t *)(intptr_t)v[0], (const float *)(intptr_t)v[1], v[2],
                        v[3] ? (const float *)(intptr_t)v[3] : NULL, (float *)(intptr_t)v[4], (int)v[5], (int)v[6],
                        (int)v[7], (int)v[8]);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

static PyMethodDef methods[] = {{"linear_g", (PyCFunction)(void (*)(void))py_linear_g, METH_FASTCALL, NULL},
                                {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_codebook_core", NULL, -1, methods};
PyMODINIT_FUNC PyInit__codebook_core(void) { return PyModule_Create(&module); }
