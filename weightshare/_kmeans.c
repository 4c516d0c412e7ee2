/*
 * Exact weighted 1-D k-means: the dynamic program over sorted values
 *   D[m][i] = min_{j<i} D[m-1][j] + SSE(points j..i-1)
 * solved layer by layer with the divide-and-conquer optimisation, which is
 * valid because the SSE of an interval satisfies the quadrangle inequality
 * (so the optimal split index is monotone in i).  Cost per layer is
 * O(n log n) evaluations of an O(1) interval cost from prefix sums.
 *
 * This file is plain C with no Python API: weightshare/kmeans.py loads it
 * with ctypes, which releases the GIL, so batches of rows are solved on
 * several threads from Python.  One large problem (a whole tensor of
 * distinct fp32 values) is split instead inside each layer: the two halves
 * of a divide-and-conquer step are independent, so they run on threads.
 * PyInit_ exists only so that setuptools can build and locate it as an
 * extension module.
 *
 * Rows (one table per channel: a few hundred distinct values each) take a
 * third schedule on CPUs with AVX2, layer_levels_avx2, chosen at run time (the
 * file is built without -march flags); other CPUs run layer_dc / layer_sweep.
 */
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

typedef struct {
    const double *P0, *P1, *P2; /* prefix sums of w, w*x, w*x^2 (centred x) */
    /* Unit-weight problems (every value counted once or a whole number of times):
       the weight of points j..i-1 is the integer C[i] - C[j], so the division in
       SSE = S2 - S1^2/S0 becomes a multiplication by inv[C[i] - C[j]], and
       E[j] = D[j] - P2[j] folds the S2 term out of the search.  A division costs
       several multiplications' time and it sits in the innermost loop.
       inv is NULL for general (real-valued) weights. */
    const int32_t *C;
    const double *inv;
    double *E;
    int distinct; /* C[j] == j: unit weights, no value repeated */
} prefix_t;

static inline double seg_cost(const prefix_t *p, int64_t j, int64_t i) {
    double w = p->P0[i] - p->P0[j];
    if (w <= 0.0) return 0.0;
    double s = p->P1[i] - p->P1[j];
    double c = (p->P2[i] - p->P2[j]) - s * s / w;
    return c > 0.0 ? c : 0.0;
}

/* Best split for points [0, i): argmin over j in [jlo, jhi] of Dp[j] + SSE(j, i).
   Most searches in the divide-and-conquer are a few entries long, so this is
   a plain inlined loop (a vectorised two-pass version measured slower). */
static inline int64_t best_split(const prefix_t *p, const double *Dp, int64_t i, int64_t jlo, int64_t jhi,
                                 double *best_out) {
    const double P0i = p->P0[i], P1i = p->P1[i], P2i = p->P2[i];
    double best = INFINITY;
    int64_t bj = jlo;
    if (p->inv && p->distinct) {
        /* every point counted once: the weight of points j..i-1 is i - j */
        const double *E = p->E, *P1 = p->P1, *inv = p->inv + i;
        for (int64_t j = jlo; j <= jhi; j++) {
            double s = P1i - P1[j];
            double v = E[j] - s * s * inv[-j];
            if (v < best) { best = v; bj = j; }
        }
        *best_out = best + P2i;
        return bj;
    }
    if (p->inv) {
        const double *E = p->E, *P1 = p->P1, *inv = p->inv;
        const int32_t *C = p->C;
        const int32_t Ci = C[i];
        for (int64_t j = jlo; j <= jhi; j++) {
            double s = P1i - P1[j];
            double v = E[j] - s * s * inv[Ci - C[j]];
            if (v < best) { best = v; bj = j; }
        }
        *best_out = best + P2i;
        return bj;
    }
    for (int64_t j = jlo; j <= jhi; j++) {
        double w = P0i - p->P0[j], s = P1i - p->P1[j];
        double c = (P2i - p->P2[j]) - s * s / w; /* w > 0: every point has positive weight */
        double v = Dp[j] + (c > 0.0 ? c : 0.0);
        if (v < best) { best = v; bj = j; }
    }
    *best_out = best;
    return bj;
}

/* Fill Dc[i], T[i] for i in [lo, hi] knowing the argmin lies in [optlo, opthi].
   Tp (may be NULL) is the previous layer's argmin: opt[c-1][i] <= opt[c][i]
   (Knuth's monotonicity across layers) narrows every search from below;
   it holds entries up to i = tphi. */
static void layer_dc(const prefix_t *p, const double *Dp, double *Dc, int32_t *T, const int32_t *Tp,
                     int64_t tphi, int64_t lo, int64_t hi, int64_t optlo, int64_t opthi) {
    while (lo <= hi) {
        if (hi - lo < 4) {
            /* short runs: sweep i upwards with opt[c][i-1] <= opt[c][i]; cheaper than recursing */
            int64_t jl = optlo;
            for (int64_t i = lo; i <= hi; i++) {
                int64_t jlo = jl;
                if (Tp) { int32_t t = Tp[i < tphi ? i : tphi]; if (t > jlo) jlo = t; }
                int64_t jhi = opthi < i - 1 ? opthi : i - 1;
                double best;
                int64_t bj = best_split(p, Dp, i, jlo, jhi, &best);
                Dc[i] = best; T[i] = (int32_t)bj; jl = bj;
            }
            return;
        }
        int64_t mid = lo + (hi - lo) / 2;
        int64_t jhi = opthi < mid - 1 ? opthi : mid - 1;
        int64_t jlo = optlo;
        if (Tp) { /* the previous layer stops at tphi; opt is monotone, so a lower i bounds too */
            int32_t t = Tp[mid < tphi ? mid : tphi];
            if (t > jlo) jlo = t;
        }
        double best;
        int64_t bj = best_split(p, Dp, mid, jlo, jhi, &best);
        Dc[mid] = best;
        T[mid] = (int32_t)bj;
        /* recurse on the smaller side, loop on the other: bounded stack */
        if (mid - lo < hi - mid) {
            layer_dc(p, Dp, Dc, T, Tp, tphi, lo, mid - 1, optlo, bj);
            lo = mid + 1; optlo = bj;
        } else {
            layer_dc(p, Dp, Dc, T, Tp, tphi, mid + 1, hi, bj, opthi);
            hi = mid - 1; opthi = bj;
        }
    }
}

/* layer_dc with the top `depth` levels of its recursion split over threads:
   after the middle point's argmin is known, the left half runs on a new
   thread while this one takes the right.  The split points are the ones
   layer_dc itself would take, so the result is bit for bit the same for any
   number of threads.  Halves shorter than PAR_MIN points stay on one thread
   (a thread costs tens of microseconds; a point about 20 ns). */
#define PAR_MIN 8192
typedef struct {
    const prefix_t *p;
    const double *Dp;
    double *Dc;
    int32_t *T;
    const int32_t *Tp;
    int64_t tphi, lo, hi, optlo, opthi;
    int depth;
} dc_job;

static void layer_dc_par(const dc_job *job);

static void *dc_thread(void *arg) {
    layer_dc_par((const dc_job *)arg);
    return NULL;
}

static void layer_dc_par(const dc_job *job) {
    const int64_t lo = job->lo, hi = job->hi;
    if (job->depth <= 0 || hi - lo < 2 * PAR_MIN) {
        layer_dc(job->p, job->Dp, job->Dc, job->T, job->Tp, job->tphi, lo, hi, job->optlo, job->opthi);
        return;
    }
    int64_t mid = lo + (hi - lo) / 2;
    int64_t jhi = job->opthi < mid - 1 ? job->opthi : mid - 1;
    int64_t jlo = job->optlo;
    if (job->Tp) {
        int32_t t = job->Tp[mid < job->tphi ? mid : job->tphi];
        if (t > jlo) jlo = t;
    }
    double best;
    int64_t bj = best_split(job->p, job->Dp, mid, jlo, jhi, &best);
    job->Dc[mid] = best;
    job->T[mid] = (int32_t)bj;
    dc_job left = *job, right = *job;
    left.hi = mid - 1; left.opthi = bj; left.depth = job->depth - 1;
    right.lo = mid + 1; right.optlo = bj; right.depth = job->depth - 1;
    pthread_t th;
    int spawned = pthread_create(&th, NULL, dc_thread, &left) == 0;
    if (!spawned) layer_dc_par(&left); /* no thread to be had: the same work, in turn */
    layer_dc_par(&right);
    if (spawned) pthread_join(th, NULL);
}

/* Fill Dc[i], T[i] for i in [lo, hi] by a downward sweep with Knuth's two bounds
   opt[c-1][i] <= opt[c][i] <= opt[c][i+1].  No recursion and no bookkeeping per i,
   but the band between the bounds is about i / (c (c-1)) wide: it beats divide and
   conquer (about 6 evaluations per i) only in the later layers (see solve_one). */
static void layer_sweep(const prefix_t *p, const double *Dp, double *Dc, int32_t *T, const int32_t *Tp,
                        int64_t tphi, int64_t lo, int64_t hi, int64_t optlo) {
    int64_t jup = hi - 1;
    for (int64_t i = hi; i >= lo; i--) {
        int64_t jlo = optlo;
        int32_t t = Tp[i < tphi ? i : tphi];
        if (t > jlo) jlo = t;
        int64_t jhi = jup < i - 1 ? jup : i - 1;
        double best;
        int64_t bj = best_split(p, Dp, i, jlo, jhi, &best);
        Dc[i] = best;
        T[i] = (int32_t)bj;
        jup = bj;
    }
}

/*
 * Rows, on CPUs with AVX2: divide and conquer in breadth-first order.  Every
 * point at one depth of the recursion is independent of the others once the
 * coarser depths are done: point t at step s searches between the argmins of
 * t - s and t + s (Knuth's bounds, with the previous layer's argmin from
 * below).  Run depth by depth, the searches form a flat loop with no chain of
 * dependent results, so the CPU overlaps several, and each search is four
 * candidates per vector step.  About 70 % of windows on rows of a few hundred
 * values hold at most four candidates; they take one step and find their
 * argmin from a lane mask, with no loop.  layer_dc's recursion serialises the
 * same searches (each waits for its parent's argmin) and measured 1.5x slower.
 *
 * Ties keep the lowest index, and the arithmetic is best_split's in the same
 * order (no FMA), so a search returns what best_split would for its window.
 * Unit weights and distinct values only (the E / reciprocal form).
 * rinv[M - d] = 1/d makes the reciprocals of consecutive candidates
 * contiguous.  work holds 4 (hi - lo) + 32 int32: the argmins with the two
 * bounds, and the window lists.
 * E and P1 are read up to 3 entries past the last candidate (padded, masked).
 */
#define LEVELS_MAX (2 * PAR_MIN) /* longer problems keep layer_dc: its threads, and depth-first stays in cache */

#if defined(__x86_64__) || defined(__i386__)
#define HAVE_AVX2_PATH 1
__attribute__((target("avx2"))) static void layer_levels_avx2(const prefix_t *p, const double *rinv, int64_t M,
                                                              double *En, int32_t *T, const int32_t *Tp,
                                                              int64_t lo, int64_t hi, int64_t optlo, int64_t opthi,
                                                              int32_t *work) {
    const int64_t N = hi - lo + 1;
    int64_t S = 1;
    while (S * 2 <= N) S *= 2;
    int32_t *Tx = work + 1; /* Tx[t] = argmin of point lo + t; the bounds at t = -1 and t = N */
    Tx[-1] = (int32_t)optlo;
    Tx[N] = (int32_t)opthi;
    const double *E = p->E, *P1 = p->P1, *P2 = p->P2;
    const __m256d inf = _mm256_set1_pd(INFINITY), four = _mm256_set1_pd(4.0), iota = _mm256_set_pd(3, 2, 1, 0);
    /* lanes holding candidates when the window has 1, 2, 3 or 4+ of them */
    static const int64_t valid[4][4] = {{-1, 0, 0, 0}, {-1, -1, 0, 0}, {-1, -1, -1, 0}, {-1, -1, -1, -1}};
    int32_t *shl = work + N + 4, *lgl = shl + 3 * (N / 2 + 2); /* (t, jl, jh) of short and long windows */
    for (int64_t s = S; s >= 1; s >>= 1) {
        /* list the windows of this depth, short (<= 4 candidates) and long apart: written to both lists, kept by
           one (a branch on the length mispredicts about a third of the time, and costs more than the search) */
        int64_t ns = 0, nl = 0;
        for (int64_t t = s - 1; t < N; t += 2 * s) {
            const int64_t i = lo + t;
            int32_t jl = Tx[t - s], jh = Tx[t + s < N ? t + s : N];
            const int32_t q = Tp[i], last = (int32_t)(i - 1);
            jl = q > jl ? q : jl;
            jh = jh < last ? jh : last;
            const int is_long = jh - jl >= 4;
            int32_t *x = shl + 3 * ns, *y = lgl + 3 * nl;
            x[0] = y[0] = (int32_t)t; x[1] = y[1] = jl; x[2] = y[2] = jh;
            nl += is_long; ns += !is_long;
        }
        /* short windows: one step, the argmin is the first lane equal to the minimum */
        for (int64_t g = 0; g < ns; g++) {
            const int32_t *w = shl + 3 * g;
            const int64_t t = w[0], i = lo + t, jl = w[1], span = w[2] - w[1];
            const double *rv = rinv + (M - i);
            const __m256d p1i = _mm256_broadcast_sd(P1 + i);
            __m256d d = _mm256_sub_pd(p1i, _mm256_loadu_pd(P1 + jl));
            __m256d v = _mm256_sub_pd(_mm256_loadu_pd(E + jl), _mm256_mul_pd(_mm256_mul_pd(d, d), _mm256_loadu_pd(rv + jl)));
            v = _mm256_blendv_pd(inf, v, _mm256_loadu_pd((const double *)valid[span]));
            __m256d h = _mm256_min_pd(v, _mm256_permute2f128_pd(v, v, 1));
            h = _mm256_min_pd(h, _mm256_permute_pd(h, 5));
            const double m = _mm256_cvtsd_f64(h);
            const int32_t arg = (int32_t)(jl + __builtin_ctz(_mm256_movemask_pd(_mm256_cmp_pd(v, h, _CMP_EQ_OQ))));
            En[i] = (m + P2[i]) - P2[i]; /* best_split's D, less P2: the next layer's E, with the same rounding */
            T[i] = Tx[t] = arg;
        }
        /* long windows: four candidates per step; each lane keeps its first minimum, then the lowest index
           among the lanes holding the overall one */
        for (int64_t g = 0; g < nl; g++) {
            const int32_t *w = lgl + 3 * g;
            const int64_t t = w[0], i = lo + t, jl = w[1], jh = w[2];
            const double *rv = rinv + (M - i);
            const __m256d p1i = _mm256_broadcast_sd(P1 + i);
            const __m256d jhv = _mm256_set1_pd((double)jh);
            __m256d j = _mm256_add_pd(_mm256_set1_pd((double)jl), iota), best = inf, bidx = j;
            for (int64_t a = jl; a <= jh; a += 4) {
                __m256d d = _mm256_sub_pd(p1i, _mm256_loadu_pd(P1 + a));
                __m256d v = _mm256_sub_pd(_mm256_loadu_pd(E + a), _mm256_mul_pd(_mm256_mul_pd(d, d), _mm256_loadu_pd(rv + a)));
                v = _mm256_blendv_pd(v, inf, _mm256_cmp_pd(j, jhv, _CMP_GT_OQ));
                bidx = _mm256_blendv_pd(bidx, j, _mm256_cmp_pd(v, best, _CMP_LT_OQ));
                best = _mm256_min_pd(v, best);
                j = _mm256_add_pd(j, four);
            }
            __m256d h = _mm256_min_pd(best, _mm256_permute2f128_pd(best, best, 1));
            h = _mm256_min_pd(h, _mm256_permute_pd(h, 5));
            __m256d k = _mm256_blendv_pd(inf, bidx, _mm256_cmp_pd(best, h, _CMP_EQ_OQ));
            k = _mm256_min_pd(k, _mm256_permute2f128_pd(k, k, 1));
            k = _mm256_min_pd(k, _mm256_permute_pd(k, 5));
            const double m = _mm256_cvtsd_f64(h);
            En[i] = (m + P2[i]) - P2[i];
            T[i] = Tx[t] = (int32_t)_mm256_cvtsd_f64(k);
        }
    }
}
#else
#define HAVE_AVX2_PATH 0
#endif

/* The vector paths this build and CPU can run: bit 0 portable (always), bit 1 AVX2. */
int ws_kmeans1d_paths(void) {
#if HAVE_AVX2_PATH
    if (__builtin_cpu_supports("avx2")) return 3;
#endif
    return 1;
}

/*
 * Solve one problem on n sorted values xs with weights ws (duplicates allowed,
 * zero weights allowed).  Writes up to k sorted centroids, returns how many
 * (min(k, number of distinct values with positive weight)), or -1 on
 * allocation failure.  *sse receives the optimal weighted SSE.
 * scratch must hold 8*(n+1)+16 doubles; T must hold k*(n+1) int32.  With unit
 * weights (ws NULL), inv[d] = 1/d for d <= n and counts holds n+1 int32;
 * otherwise inv is NULL.  path 2 runs distinct rows on layer_levels_avx2, with
 * its rinv (rinv[M - d] = 1/d) and work; path 1 never does.  Each layer runs
 * on up to 2^depth threads.
 */
static int64_t solve_one(const double *xs, const double *ws, int64_t n, int64_t k,
                         double *centroids, double *sse, double *scratch, int32_t *counts,
                         const double *inv, int32_t *T, int depth, const double *rinv, int64_t M,
                         int32_t *work, int path) {
    /* E and En are followed by 8 padding entries: layer_levels_avx2 reads past the last candidate */
    double *u = scratch, *P0 = scratch + (n + 1), *P1 = scratch + 2 * (n + 1),
           *P2 = scratch + 3 * (n + 1), *Da = scratch + 4 * (n + 1), *Db = scratch + 5 * (n + 1),
           *E = scratch + 6 * (n + 1), *En = scratch + 7 * (n + 1) + 8;
    /* collapse duplicates and zero weights into distinct points u with weight P0 */
    int64_t m = 0;
    double wsum = 0.0, wxsum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double w = ws ? ws[i] : 1.0;
        if (w <= 0.0) continue;
        if (m > 0 && xs[i] == u[m - 1]) {
            P0[m] += w;
        } else {
            u[m] = xs[i];
            m++;
            P0[m] = w;
        }
        wsum += w;
        wxsum += w * xs[i];
    }
    *sse = 0.0;
    if (m == 0) return 0;
    /* centre the values: keeps the prefix sums of x^2 small, so the
       cancellation in SSE = S2 - S1^2/S0 stays at rounding level */
    double mean = wxsum / wsum;
    P0[0] = P1[0] = P2[0] = 0.0;
    for (int64_t i = 0; i < m; i++) {
        double w = P0[i + 1], d = u[i] - mean;
        P1[i + 1] = P1[i] + w * d;
        P2[i + 1] = P2[i] + w * d * d;
        P0[i + 1] = P0[i] + w;
    }
    /* unit weights: P0 holds whole counts, so the reciprocal table applies */
    if (inv) for (int64_t i = 0; i <= m; i++) counts[i] = (int32_t)P0[i];
    prefix_t p = {P0, P1, P2, inv ? counts : NULL, inv, E, inv && m == n};
    int64_t kk = k < m ? k : m;
    double *Dp = Da, *Dc = Db;
    for (int64_t i = 0; i <= m; i++) Dp[i] = seg_cost(&p, 0, i);
    /* rows: breadth-first layers, which also write the next layer's E */
    const int levels = HAVE_AVX2_PATH && path == 2 && p.distinct && m <= LEVELS_MAX && rinv;
    if (levels) { /* what the vector lanes read past the candidates: finite, never chosen */
        for (int64_t j = 0; j < 4; j++) E[m + j] = 0.0;
        memset(En, 0, sizeof(double) * (size_t)(m + 4));
    }
    for (int64_t c = 2; c <= kk; c++) {
        int32_t *Tc = T + (c - 1) * (m + 1);
        int32_t *Tp = c > 2 ? T + (c - 2) * (m + 1) : NULL;
        if (levels && c > 2) {
            double *x = E; E = En; En = x;
            p.E = E;
        } else if (inv)
            for (int64_t j = 0; j < m; j++) E[j] = Dp[j] - P2[j];
        if (c < kk && levels) {
            /* the bound from below, never NULL: layer 1's row (unused by the walk back) holds c - 1 = 1, and
               the previous layer, which stops at hi - 1, repeats its last argmin at hi (argmins are monotone) */
            if (!Tp) {
                Tp = T;
                for (int64_t i = 0; i <= m; i++) T[i] = 1;
            } else
                Tp[m - (kk - c)] = Tp[m - (kk - c) - 1];
#if HAVE_AVX2_PATH
            layer_levels_avx2(&p, rinv, M, En, Tc, Tp, c, m - (kk - c), c - 1, m - 1, work);
#endif
        } else if (c < kk) {
            /* i beyond m - (kk - c) would leave too few points for the later clusters */
            /* the sweep's band (~ m / (c (c-1)) per point) is narrower than divide and
               conquer's ~6 evaluations once 10 c (c-1) >= m (measured with cachegrind
               at m = 384 and 1536, k = 16) */
            if (Tp && 10 * c * (c - 1) >= m)
                layer_sweep(&p, Dp, Dc, Tc, Tp, m - (kk - c) - 1, c, m - (kk - c), c - 1);
            else {
                dc_job job = {&p, Dp, Dc, Tc, Tp, m - (kk - c) - 1, c, m - (kk - c), c - 1, m - 1, depth};
                layer_dc_par(&job);
            }
        } else { /* the last layer is needed at i = m only */
            double best;
            int64_t j0 = Tp && Tp[m - 1] > c - 1 ? Tp[m - 1] : c - 1;
            int64_t bj = best_split(&p, Dp, m, j0, m - 1, &best);
            Dc[m] = best;
            Tc[m] = (int32_t)bj;
        }
        double *tmp = Dp; Dp = Dc; Dc = tmp;
    }
    *sse = Dp[m];
    /* walk the split table back from the last point */
    int64_t b = m;
    for (int64_t c = kk; c >= 1; c--) {
        int64_t a = c > 1 ? T[(c - 1) * (m + 1) + b] : 0;
        double w = P0[b] - P0[a];
        centroids[c - 1] = mean + (P1[b] - P1[a]) / w;
        b = a;
    }
    return kk;
}

/*
 * Solve rows r0..r1-1 of a batch.  Row r holds the sorted values
 * xs[offsets[r] .. offsets[r+1]) and weights ws at the same positions
 * (ws may be NULL for unit weights).  centroids is R*k, nclusters and sse R.
 * threads > 1 splits each row's layers over that many threads (for one large
 * row; batches of small rows are split over threads by the caller instead).
 * path: 1 portable, 2 AVX2 for rows of distinct values (ws_kmeans1d_paths says which run here).
 * Returns 0, -1 when memory could not be allocated, -2 when path cannot run on this CPU.
 */
int ws_kmeans1d_batch(const double *xs, const double *ws, const int64_t *offsets,
                      int64_t r0, int64_t r1, int64_t k, int64_t threads,
                      double *centroids, int64_t *nclusters, double *sse, int64_t path) {
    if (path == 2 && !(ws_kmeans1d_paths() & 2)) return -2;
    int depth = 0;
    while (depth < 6 && ((int64_t)1 << (depth + 1)) <= threads) depth++;
    int64_t nmax = 0;
    for (int64_t r = r0; r < r1; r++) {
        int64_t n = offsets[r + 1] - offsets[r];
        if (n > nmax) nmax = n;
    }
    double *scratch = malloc(sizeof(double) * (8 * (size_t)(nmax + 1) + 16));
    int32_t *T = malloc(sizeof(int32_t) * (size_t)k * (size_t)(nmax + 1));
    /* unit weights: the weight of any run of points is a count <= nmax */
    double *inv = ws ? NULL : malloc(sizeof(double) * (size_t)(nmax + 1));
    int32_t *counts = ws ? NULL : malloc(sizeof(int32_t) * (size_t)(nmax + 1));
    /* layer_levels_avx2's reversed reciprocals (lanes past a window read rinv[M .. M + 3]) and argmins */
    const int64_t M = nmax + 4;
    double *rinv = ws || nmax > LEVELS_MAX || path != 2 ? NULL : calloc((size_t)(M + 4), sizeof(double));
    int32_t *work = rinv ? malloc(sizeof(int32_t) * (4 * (size_t)nmax + 32)) : NULL;
    if (!scratch || !T || (!ws && (!inv || !counts)) || (rinv && !work) || (!ws && nmax <= LEVELS_MAX && path == 2 && !rinv)) {
        free(scratch); free(T); free(inv); free(counts); free(rinv); free(work);
        return -1;
    }
    if (inv) {
        inv[0] = 0.0; /* never read: every run holds at least one point */
        for (int64_t d = 1; d <= nmax; d++) inv[d] = 1.0 / (double)d;
    }
    if (rinv)
        for (int64_t d = 1; d <= nmax; d++) rinv[M - d] = inv[d];
    for (int64_t r = r0; r < r1; r++) {
        int64_t o = offsets[r], n = offsets[r + 1] - o;
        nclusters[r] = solve_one(xs + o, ws ? ws + o : NULL, n, k,
                                 centroids + r * k, sse + r, scratch, counts, inv, T, depth, rinv, M, work,
                                 (int)path);
    }
    free(scratch);
    free(T);
    free(inv);
    free(counts);
    free(rinv);
    free(work);
    return 0;
}

/*
 * Nearest-centroid labels for rows r0..r1-1: x is R*n (any order), centroids
 * R*k sorted with nclusters[r] valid entries.  Ties go to the lower centroid.
 * Returns 0, or -1 when memory could not be allocated.
 *
 * The label of v is the number of midpoints between neighbouring centroids
 * that lie below v.  A search of fixed depth over the midpoints, padded to a
 * power of two with +inf, has no data-dependent branch: a branchy binary
 * search mispredicts about half its steps on weights, and this pass touches
 * every weight of the model.
 */
int ws_assign_batch(const double *x, int64_t n, const double *centroids,
                    const int64_t *nclusters, int64_t k, int64_t r0, int64_t r1,
                    int32_t *labels) {
    int64_t width = 1;
    while (width < k) width <<= 1;
    double *mids = malloc(sizeof(double) * (size_t)width);
    if (!mids) return -1;
    for (int64_t r = r0; r < r1; r++) {
        const double *c = centroids + r * k;
        int64_t kc = nclusters[r];
        for (int64_t j = 0; j < width; j++)
            mids[j] = j + 1 < kc ? 0.5 * (c[j] + c[j + 1]) : INFINITY;
        const double *xr = x + r * n;
        int32_t *lr = labels + r * n;
        for (int64_t i = 0; i < n; i++) {
            double v = xr[i];
            int64_t lo = 0;
            for (int64_t step = width >> 1; step > 0; step >>= 1)
                lo += (v > mids[lo + step - 1]) ? step : 0;
            lr[i] = (int32_t)lo;
        }
    }
    free(mids);
    return 0;
}

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_kmeans_core",
                                       "exact 1-D k-means core (used through ctypes)", -1, NULL};
PyMODINIT_FUNC PyInit__kmeans_core(void) { return PyModule_Create(&moduledef); }
