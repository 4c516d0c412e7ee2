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
 * Rows (one table per channel: a few hundred to a few thousand values each,
 * unit weights) are solved without layers, by a price per cluster (see
 * lagr_solve); its inner scan has an AVX2 form chosen at run time (the file
 * is built without -march flags).
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
 * Rows: a price per cluster instead of one layer per cluster (Lagrangian
 * relaxation).  With a price lam on every cluster, the best clustering with
 * any number of clusters,
 *     F[i] = lam + min_{j<i} F[j] + SSE(points j..i-1),
 * takes one pass over the points.  When its optimum has exactly k clusters
 * it is also the best k-clustering: every other k-clustering pays the same
 * k * lam, so one with a lower SSE would have won the pass.  The optimal SSE
 * is convex in k, so such a price exists unless two neighbouring gains
 * SSE(k-1) - SSE(k) and SSE(k) - SSE(k+1) are equal (evenly spaced values
 * can do that); those rows, and any row whose price is not found in
 * LAGR_PASSES passes, take the layered DP.  A pass costs about what one or
 * two of the k - 1 layers cost, and rows of trained weights take about two
 * passes (measured on MiniLM's 52,156 rows; `weightshare bench kmeans`).
 *
 * One pass is the least-weight-subsequence algorithm for costs with the
 * quadrangle inequality (Galil and Park; Hirschberg and Larmore): once a
 * later split j2 is at least as good as j1 for some end point it stays so for
 * every later end point, so the live splits form a queue in which each owns a
 * run of end points.  A new split takes the tail of the queue from the first
 * end point where it wins, found by a short forward scan (four end points per
 * step on AVX2: a new split usually wins about a cluster's length further on)
 * and a binary search past it.
 *
 * The first price is the high-resolution estimate of the k-th cluster's gain
 * (Panter and Dite: SSE(k) ~ W I^3 / (12 k^2) with I the integral of
 * p^(1/3), so the gain is about W I^3 / (6 k^3)), I estimated from the row's
 * own sorted values.  Later prices step by the same law, SSE gain ~ k^-3,
 * until both sides of k are known, then interpolate between them.  The price
 * depends on the row alone, so a result never depends on how rows are batched.
 */
#define LAGR_MAX 16384 /* longer rows keep the layered DP: its threads, and the scans grow with the clusters */
#define LAGR_PASSES 16
#define LAGR_SCAN 32 /* end points scanned before the binary search */

#if defined(__x86_64__) || defined(__i386__)
#define HAVE_AVX2_PATH 1
#else
#define HAVE_AVX2_PATH 0
#endif

typedef struct {
    int32_t *cnt, *par, *cand, *start; /* clusters and split of each end point; the queue of splits */
} lagr_buf;

/* What split j costs end point x, less P2[x] (the same for every split). */
static inline double lagr_val(const prefix_t *p, int64_t j, int64_t x) {
    double s = p->P1[x] - p->P1[j];
    return p->E[j] - s * s * (p->distinct ? p->inv[x - j] : p->inv[p->C[x] - p->C[j]]);
}

/* The first end point x in [a, m] where split i (> b) is at least as good as split b, or m + 1.
   The quadrangle inequality makes "i wins at x" monotone in x, so past the scan a binary search is exact. */
static int64_t first_win_search(const prefix_t *p, int64_t i, int64_t b, int64_t a, int64_t m) {
    int64_t hi = m + 1;
    while (a < hi) {
        int64_t mid = a + (hi - a) / 2;
        if (lagr_val(p, i, mid) <= lagr_val(p, b, mid)) hi = mid;
        else a = mid + 1;
    }
    return a;
}

static int64_t first_win(const prefix_t *p, int64_t i, int64_t b, int64_t a, int64_t m) {
    for (const int64_t stop = a + LAGR_SCAN; a <= m && a < stop; a++)
        if (lagr_val(p, i, a) <= lagr_val(p, b, a)) return a;
    return first_win_search(p, i, b, a, m);
}

#if HAVE_AVX2_PATH
/* first_win for distinct values, four end points per step.  P1 and inv are read up to 3 entries past m
   (finite padding; those lanes are discarded). */
__attribute__((target("avx2"))) static int64_t first_win_avx2(const prefix_t *p, int64_t i, int64_t b, int64_t a,
                                                              int64_t m) {
    const double *P1 = p->P1, *inv = p->inv;
    const __m256d Ei = _mm256_set1_pd(p->E[i]), Eb = _mm256_set1_pd(p->E[b]);
    const __m256d P1i = _mm256_set1_pd(P1[i]), P1b = _mm256_set1_pd(P1[b]);
    for (const int64_t stop = a + LAGR_SCAN; a <= m && a < stop; a += 4) {
        __m256d x = _mm256_loadu_pd(P1 + a);
        __m256d di = _mm256_sub_pd(x, P1i), db = _mm256_sub_pd(x, P1b);
        __m256d vi = _mm256_sub_pd(Ei, _mm256_mul_pd(_mm256_mul_pd(di, di), _mm256_loadu_pd(inv + (a - i))));
        __m256d vb = _mm256_sub_pd(Eb, _mm256_mul_pd(_mm256_mul_pd(db, db), _mm256_loadu_pd(inv + (a - b))));
        int won = _mm256_movemask_pd(_mm256_cmp_pd(vi, vb, _CMP_LE_OQ));
        if (won) {
            int64_t x0 = a + __builtin_ctz(won);
            return x0 <= m ? x0 : m + 1;
        }
    }
    return first_win_search(p, i, b, a, m);
}
#endif

/* One pass at price lam over points 0..m-1; returns the number of clusters of its optimum (q->par holds
   the splits).  p->E[j] becomes F[j] - P2[j]. */
static int64_t lagr_pass(const prefix_t *p, int64_t m, double lam, const lagr_buf *q, int vec) {
    double *E = p->E;
    int32_t *cnt = q->cnt, *par = q->par, *cand = q->cand, *start = q->start;
    int64_t head = 0, tail = 1;
    E[0] = 0.0;
    cnt[0] = 0;
    cand[0] = 0;
    start[0] = 1;
    for (int64_t i = 1; i <= m; i++) {
        while (head + 1 < tail && start[head + 1] <= i) head++;
        const int64_t j = cand[head];
        E[i] = lagr_val(p, j, i) + lam;
        cnt[i] = cnt[j] + 1;
        par[i] = (int32_t)j;
        if (i == m) break;
        /* split i takes over the queue's tail from the first end point where it wins */
        int64_t x = i + 1;
        while (tail > head) {
            const int64_t b = cand[tail - 1], s = start[tail - 1] > i + 1 ? start[tail - 1] : i + 1;
#if HAVE_AVX2_PATH
            x = vec ? first_win_avx2(p, i, b, s, m) : first_win(p, i, b, s, m);
#else
            (void)vec;
            x = first_win(p, i, b, s, m);
#endif
            if (x > s) break;
            tail--; /* i wins from where b starts: b is never needed again */
            x = i + 1;
        }
        if (x <= m) {
            cand[tail] = (int32_t)i;
            start[tail] = (int32_t)x;
            tail++;
        }
    }
    return cnt[m];
}

/* Exactly k clusters of points 0..m-1 (2 <= k < m) by the price search; 0 when no price was found (the caller
   then runs the layered DP), else the passes it took, with the k - 1 splits in q->par. */
static int lagr_solve(const prefix_t *p, const double *u, int64_t m, int64_t k, const lagr_buf *q, int vec) {
    const double W = p->P0[m];
    double I = 0.0; /* the integral of p^(1/3), over blocks of 8 points */
    for (int64_t a = 0, e; a < m - 1; a = e) {
        e = a + 8 < m - 1 ? a + 8 : m - 1;
        double w = u[e] - u[a];
        I += cbrt((p->P0[e] - p->P0[a]) / W * w * w);
    }
    double lam = W * I * I * I / (6.0 * (double)k * (double)k * (double)k);
    if (!(lam > 0.0 && lam < INFINITY)) lam = p->P2[m] / ((double)k * (double)k * (double)k);
    double lo = 0.0, hi = INFINITY; /* prices known to give more (lo) and fewer (hi) than k clusters */
    int64_t mlo = 0, mhi = 0;
    for (int pass = 1; pass <= LAGR_PASSES; pass++) {
        const int64_t got = lagr_pass(p, m, lam, q, vec);
        if (got == k) return pass;
        if (got > k) { lo = lam; mlo = got; }
        else { hi = lam; mhi = got; }
        double next;
        if (lo > 0.0 && hi < INFINITY) {
            if (hi <= lo * (1.0 + 1e-12)) return 0; /* the count jumps over k: equal gains on both sides */
            next = exp(log(lo) + (double)(mlo - k) / (double)(mlo - mhi) * (log(hi) - log(lo)));
            if (!(next > lo && next < hi)) next = sqrt(lo * hi);
        } else {
            const double r = (double)got / (double)k;
            next = lam * r * r * r;
            if (!(next > lo && next < hi)) next = hi < INFINITY ? hi / 4.0 : lam * 4.0;
        }
        lam = next;
    }
    return 0;
}

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
 * allocation failure.  *sse receives the optimal weighted SSE, *passes the
 * price passes that solved it (0: the layered DP did).
 * scratch must hold 8*(n+1)+16 doubles; T must hold k*(n+1) int32.  With unit
 * weights (ws NULL), inv[d] = 1/d for d <= n (zero up to n + 7) and counts
 * holds n+1 int32, and q (when not NULL) the price passes' buffers of n + 2
 * int32 each; otherwise inv is NULL.  path 2 scans with AVX2.  Each layer of
 * the DP runs on up to 2^depth threads.
 */
static int64_t solve_one(const double *xs, const double *ws, int64_t n, int64_t k,
                         double *centroids, double *sse, int64_t *passes, double *scratch, int32_t *counts,
                         const double *inv, int32_t *T, int depth, const lagr_buf *q, int path) {
    double *u = scratch, *P0 = scratch + (n + 1), *P1 = scratch + 2 * (n + 1),
           *P2 = scratch + 3 * (n + 1), *Da = scratch + 4 * (n + 1), *Db = scratch + 5 * (n + 1),
           *E = scratch + 6 * (n + 1);
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
    *passes = 0;
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
    if (q && inv && kk >= 2 && kk < m && m <= LAGR_MAX) {
        const int got = lagr_solve(&p, u, m, kk, q, path == 2 && p.distinct);
        if (got) {
            /* walk the splits back from the last point */
            double total = 0.0;
            for (int64_t c = kk, b = m; c >= 1; c--) {
                const int64_t a = q->par[b];
                centroids[c - 1] = mean + (P1[b] - P1[a]) / (P0[b] - P0[a]);
                total += seg_cost(&p, a, b);
                b = a;
            }
            *sse = total;
            *passes = got;
            return kk;
        }
    }
    double *Dp = Da, *Dc = Db;
    for (int64_t i = 0; i <= m; i++) Dp[i] = seg_cost(&p, 0, i);
    for (int64_t c = 2; c <= kk; c++) {
        int32_t *Tc = T + (c - 1) * (m + 1);
        int32_t *Tp = c > 2 ? T + (c - 2) * (m + 1) : NULL;
        if (inv)
            for (int64_t j = 0; j < m; j++) E[j] = Dp[j] - P2[j];
        if (c < kk) {
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
 * (ws may be NULL for unit weights).  centroids is R*k; nclusters, sse and
 * passes R (passes: the price passes that solved the row, 0 for the layered DP).
 * threads > 1 splits each row's layers over that many threads (for one large
 * row; batches of small rows are split over threads by the caller instead).
 * path: 1 portable, 2 AVX2 (ws_kmeans1d_paths says which run here).
 * Returns 0, -1 when memory could not be allocated, -2 when path cannot run on this CPU.
 */
int ws_kmeans1d_batch(const double *xs, const double *ws, const int64_t *offsets,
                      int64_t r0, int64_t r1, int64_t k, int64_t threads,
                      double *centroids, int64_t *nclusters, double *sse, int64_t *passes, int64_t path) {
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
    /* unit weights: the weight of any run of points is a count <= nmax; the AVX2 scan reads 3 past it */
    double *inv = ws ? NULL : calloc((size_t)nmax + 8, sizeof(double));
    int32_t *counts = ws ? NULL : malloc(sizeof(int32_t) * (size_t)(nmax + 1));
    int32_t *qb = ws ? NULL : malloc(sizeof(int32_t) * 4 * (size_t)(nmax + 2));
    if (!scratch || !T || (!ws && (!inv || !counts || !qb))) {
        free(scratch); free(T); free(inv); free(counts); free(qb);
        return -1;
    }
    if (inv)
        for (int64_t d = 1; d <= nmax; d++) inv[d] = 1.0 / (double)d; /* inv[0] never read: runs hold a point */
    lagr_buf q = {qb, qb + (nmax + 2), qb + 2 * (nmax + 2), qb + 3 * (nmax + 2)};
    for (int64_t r = r0; r < r1; r++) {
        int64_t o = offsets[r], n = offsets[r + 1] - o;
        nclusters[r] = solve_one(xs + o, ws ? ws + o : NULL, n, k, centroids + r * k, sse + r, passes + r,
                                 scratch, counts, inv, T, depth, qb ? &q : NULL, (int)path);
    }
    free(scratch);
    free(T);
    free(inv);
    free(counts);
    free(qb);
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

/*
 * Soft k-means passes for differentiable k-means (training/dkm.py).  For groups of n float32 weights x with
 * centroids c (k per group) and scale s (one per group), the attention of weight i is
 * a_ij = softmax_j(-(x_i - c_j)^2 / s), computed as softmax_j(x_i * 2 c_j / s - c_j^2 / s) (the -x_i^2 / s
 * term is the same for every j).  One pass over groups [g0, g1) does one of:
 *   DKM_STEP  acc1_j += sum_i a_ij, acc2_j += sum_i a_ij x_i       (a soft k-means step's sums)
 *   DKM_OUT   out_i = sum_j a_ij cn_j                               (the forward's output)
 *   DKM_DLAST acc1_j += sum_i g_i a_ij                              (the gradient of the last centroids)
 *   DKM_BACK  one step of the backward pass (training/dkm.py's SoftKMeans.backward writes it out):
 *             out_i += sum_j a_ij u_j - 2/s sum_j dl_ij (x_i - c_j), and when acc1 is given
 *             acc1_j += 2/s sum_i dl_ij (x_i - c_j), with dl the softmax's gradient of
 *             da_ij = u_j (x_i - cn_j) (+ g_i cn_j when g is given).
 * The attention is recomputed in every pass and never stored.  Weights go in blocks of DKM_B so that the
 * loops over a block vectorize (the same code, compiled for AVX2 + FMA and for the baseline).
 */
#define DKM_STEP 0
#define DKM_OUT 1
#define DKM_DLAST 2
#define DKM_BACK 3
#define DKM_KMAX 256

/* e^t for t <= 0 (softmax logits less their maximum): Cephes' polynomial on the reduced argument, 2^n from the
   exponent bits; relative error about 1e-7.  Below -87 it is 0 (float32 has no normal number there).  The scalar
   code and the AVX2 code compute the same polynomial. */
#define DKM_EXP_POLY(P, R) \
    P = 1.9875691500e-4f; P = P * R + 1.3981999507e-3f; P = P * R + 8.3334519073e-3f; \
    P = P * R + 4.1665795894e-2f; P = P * R + 1.6666665459e-1f; P = P * R + 5.0000001201e-1f

static inline float dkm_exp(float t) {
    float z = t < -87.0f ? -87.0f : t;
    float nf = floorf(z * 1.44269504088896341f + 0.5f);
    float r = z - nf * 0.693359375f + nf * 2.12194440e-4f, p;
    DKM_EXP_POLY(p, r);
    union { int32_t i; float f; } two = {((int32_t)nf + 127) << 23};
    return t < -87.0f ? 0.0f : (p * r * r + r + 1.0f) * two.f;
}

/* One weight (value v, output gradient gv) of a pass: the scalar code, and the reference the AVX2 code follows. */
static inline void dkm_one(int mode, float v, float gv, int64_t k, const float *cg, const float *cj, const float *uj,
                           float inv, float *a, float *o, float *S1, float *S2) {
    float m = -INFINITY, z = 0.0f;
    for (int64_t j = 0; j < k; j++) {
        a[j] = v * (2.0f * cg[j] * inv) - cg[j] * cg[j] * inv;
        m = a[j] > m ? a[j] : m;
    }
    for (int64_t j = 0; j < k; j++) {
        a[j] = dkm_exp(a[j] - m);
        z += a[j];
    }
    z = 1.0f / z;
    for (int64_t j = 0; j < k; j++) a[j] *= z;
    if (mode == DKM_STEP) {
        for (int64_t j = 0; j < k; j++) {
            S1[j] += a[j];
            S2[j] += a[j] * v;
        }
    } else if (mode == DKM_DLAST) {
        for (int64_t j = 0; j < k; j++) S1[j] += a[j] * gv;
    } else if (mode == DKM_OUT) {
        float acc = 0.0f;
        for (int64_t j = 0; j < k; j++) acc += a[j] * cj[j];
        *o = acc;
    } else {
        float acc = 0.0f, dot = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            acc += a[j] * uj[j];
            dot += a[j] * (uj[j] * (v - cj[j]) + gv * cj[j]); /* gv is 0 unless g is given */
        }
        for (int64_t j = 0; j < k; j++) {
            float diff = a[j] * (uj[j] * (v - cj[j]) + gv * cj[j] - dot) * (v - cg[j]);
            acc -= 2.0f * inv * diff;
            S1[j] += diff;
        }
        *o += acc;
    }
}

static void dkm_portable(int mode, const float *x, const float *g, int64_t n, int64_t k, const float *c,
                         const float *cn, const float *u, const float *s, float *out, float *acc1, float *acc2,
                         int64_t g0, int64_t g1) {
    float a[DKM_KMAX], S1[DKM_KMAX], S2[DKM_KMAX];
    for (int64_t grp = g0; grp < g1; grp++) {
        const float *cg = c + grp * k, inv = 1.0f / s[grp];
        const float *cj = cn ? cn + grp * k : NULL, *uj = u ? u + grp * k : NULL;
        for (int64_t j = 0; j < k; j++) S1[j] = S2[j] = 0.0f;
        for (int64_t i = 0; i < n; i++)
            dkm_one(mode, x[grp * n + i], g ? g[grp * n + i] : 0.0f, k, cg, cj, uj, inv, a,
                    out ? out + grp * n + i : NULL, S1, S2);
        if (mode == DKM_OUT || (mode == DKM_BACK && !acc1)) continue;
        for (int64_t j = 0; j < k; j++) {
            acc1[grp * k + j] += mode == DKM_BACK ? 2.0f * inv * S1[j] : S1[j];
            if (mode == DKM_STEP) acc2[grp * k + j] += S2[j];
        }
    }
}

#if HAVE_AVX2_PATH
__attribute__((target("avx2,fma"))) static inline __m256 dkm_exp8(__m256 t) {
    __m256 z = _mm256_max_ps(t, _mm256_set1_ps(-87.0f));
    __m256 nf = _mm256_round_ps(_mm256_fmadd_ps(z, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)),
                                _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(nf, _mm256_set1_ps(2.12194440e-4f), _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693359375f), z));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i two = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(nf), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(two)), _mm256_cmp_ps(t, z, _CMP_EQ_OQ));
}

/* dkm_portable's work, eight weights at a time; a group's last n % 8 weights take the scalar code. */
__attribute__((target("avx2,fma"))) static void dkm_avx2(int mode, const float *x, const float *g, int64_t n,
        int64_t k, const float *c, const float *cn, const float *u, const float *s, float *out, float *acc1,
        float *acc2, int64_t g0, int64_t g1) {
    __m256 A[DKM_KMAX], V1[DKM_KMAX], V2[DKM_KMAX];
    float P[DKM_KMAX], Q[DKM_KMAX], a[DKM_KMAX], S1[DKM_KMAX], S2[DKM_KMAX];
    for (int64_t grp = g0; grp < g1; grp++) {
        const float *cg = c + grp * k, inv = 1.0f / s[grp];
        const float *cj = cn ? cn + grp * k : NULL, *uj = u ? u + grp * k : NULL;
        for (int64_t j = 0; j < k; j++) {
            P[j] = 2.0f * cg[j] * inv;
            Q[j] = cg[j] * cg[j] * inv;
            V1[j] = V2[j] = _mm256_setzero_ps();
            S1[j] = S2[j] = 0.0f;
        }
        const float *xg = x + grp * n, *gg = g ? g + grp * n : NULL;
        float *og = out ? out + grp * n : NULL;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m256 v = _mm256_loadu_ps(xg + i), gv = gg ? _mm256_loadu_ps(gg + i) : _mm256_setzero_ps();
            __m256 m = _mm256_set1_ps(-INFINITY), z = _mm256_setzero_ps();
            for (int64_t j = 0; j < k; j++) {
                A[j] = _mm256_fmsub_ps(v, _mm256_set1_ps(P[j]), _mm256_set1_ps(Q[j]));
                m = _mm256_max_ps(m, A[j]);
            }
            for (int64_t j = 0; j < k; j++) {
                A[j] = dkm_exp8(_mm256_sub_ps(A[j], m));
                z = _mm256_add_ps(z, A[j]);
            }
            z = _mm256_div_ps(_mm256_set1_ps(1.0f), z);
            for (int64_t j = 0; j < k; j++) A[j] = _mm256_mul_ps(A[j], z);
            if (mode == DKM_STEP) {
                for (int64_t j = 0; j < k; j++) {
                    V1[j] = _mm256_add_ps(V1[j], A[j]);
                    V2[j] = _mm256_fmadd_ps(A[j], v, V2[j]);
                }
            } else if (mode == DKM_DLAST) {
                for (int64_t j = 0; j < k; j++) V1[j] = _mm256_fmadd_ps(A[j], gv, V1[j]);
            } else if (mode == DKM_OUT) {
                __m256 o = _mm256_setzero_ps();
                for (int64_t j = 0; j < k; j++) o = _mm256_fmadd_ps(A[j], _mm256_set1_ps(cj[j]), o);
                _mm256_storeu_ps(og + i, o);
            } else {
                __m256 o = _mm256_setzero_ps(), dot = _mm256_setzero_ps();
                for (int64_t j = 0; j < k; j++) {
                    const __m256 cv = _mm256_set1_ps(cj[j]), uv = _mm256_set1_ps(uj[j]);
                    const __m256 da = _mm256_fmadd_ps(gv, cv, _mm256_mul_ps(uv, _mm256_sub_ps(v, cv)));
                    o = _mm256_fmadd_ps(A[j], uv, o);
                    dot = _mm256_fmadd_ps(A[j], da, dot);
                }
                for (int64_t j = 0; j < k; j++) {
                    const __m256 cv = _mm256_set1_ps(cj[j]), uv = _mm256_set1_ps(uj[j]);
                    const __m256 da = _mm256_fmadd_ps(gv, cv, _mm256_mul_ps(uv, _mm256_sub_ps(v, cv)));
                    const __m256 diff = _mm256_mul_ps(_mm256_mul_ps(A[j], _mm256_sub_ps(da, dot)),
                                                      _mm256_sub_ps(v, _mm256_set1_ps(cg[j])));
                    o = _mm256_fnmadd_ps(_mm256_set1_ps(2.0f * inv), diff, o);
                    V1[j] = _mm256_add_ps(V1[j], diff);
                }
                _mm256_storeu_ps(og + i, _mm256_add_ps(_mm256_loadu_ps(og + i), o));
            }
        }
        for (; i < n; i++)
            dkm_one(mode, xg[i], gg ? gg[i] : 0.0f, k, cg, cj, uj, inv, a, og ? og + i : NULL, S1, S2);
        if (mode == DKM_OUT || (mode == DKM_BACK && !acc1)) continue;
        for (int64_t j = 0; j < k; j++) {
            float t1[8], t2[8];
            _mm256_storeu_ps(t1, V1[j]);
            _mm256_storeu_ps(t2, V2[j]);
            for (int b = 0; b < 8; b++) {
                S1[j] += t1[b];
                S2[j] += t2[b];
            }
            acc1[grp * k + j] += mode == DKM_BACK ? 2.0f * inv * S1[j] : S1[j];
            if (mode == DKM_STEP) acc2[grp * k + j] += S2[j];
        }
    }
}
#endif

/* One pass (see above) over groups [g0, g1) of (groups x n) weights; path 2 runs the AVX2 + FMA build of the
   loops.  Returns -1 for a mode or k it does not take. */
int ws_dkm_pass(int mode, const float *x, const float *g, int64_t n, int64_t k, const float *c, const float *cn,
                const float *u, const float *s, float *out, float *acc1, float *acc2, int64_t g0, int64_t g1,
                int path) {
    if (mode < DKM_STEP || mode > DKM_BACK || k < 1 || k > DKM_KMAX) return -1;
#if HAVE_AVX2_PATH
    if (path == 2) {
        dkm_avx2(mode, x, g, n, k, c, cn, u, s, out, acc1, acc2, g0, g1);
        return 0;
    }
#endif
    dkm_portable(mode, x, g, n, k, c, cn, u, s, out, acc1, acc2, g0, g1);
    return 0;
}

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_kmeans_core",
                                       "exact 1-D k-means core (used through ctypes)", -1, NULL};
PyMODINIT_FUNC PyInit__kmeans_core(void) { return PyModule_Create(&moduledef); }
