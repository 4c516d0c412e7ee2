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
 * several threads from Python.  PyInit_ exists only so that setuptools can
 * build and locate it as an extension module.
 */
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const double *P0, *P1, *P2; /* prefix sums of w, w*x, w*x^2 (centred x) */
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

/*
 * Solve one problem on n sorted values xs with weights ws (duplicates allowed,
 * zero weights allowed).  Writes up to k sorted centroids, returns how many
 * (min(k, number of distinct values with positive weight)), or -1 on
 * allocation failure.  *sse receives the optimal weighted SSE.
 * scratch must hold 7*(n+1) doubles; T must hold k*(n+1) int32.
 */
static int64_t solve_one(const double *xs, const double *ws, int64_t n, int64_t k,
                         double *centroids, double *sse, double *scratch, int32_t *T) {
    double *u = scratch, *P0 = scratch + (n + 1), *P1 = scratch + 2 * (n + 1),
           *P2 = scratch + 3 * (n + 1), *Da = scratch + 4 * (n + 1), *Db = scratch + 5 * (n + 1),
           *buf = scratch + 6 * (n + 1);
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
    prefix_t p = {P0, P1, P2};
    int64_t kk = k < m ? k : m;
    double *Dp = Da, *Dc = Db;
    for (int64_t i = 0; i <= m; i++) Dp[i] = seg_cost(&p, 0, i);
    for (int64_t c = 2; c <= kk; c++) {
        int32_t *Tc = T + (c - 1) * (m + 1);
        const int32_t *Tp = c > 2 ? T + (c - 2) * (m + 1) : NULL;
        if (c < kk) {
            /* i beyond m - (kk - c) would leave too few points for the later clusters */
            layer_dc(&p, Dp, Dc, Tc, Tp, m - (kk - c) - 1, c, m - (kk - c), c - 1, m - 1);
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
 * Returns 0, or -1 when memory could not be allocated.
 */
int ws_kmeans1d_batch(const double *xs, const double *ws, const int64_t *offsets,
                      int64_t r0, int64_t r1, int64_t k,
                      double *centroids, int64_t *nclusters, double *sse) {
    int64_t nmax = 0;
    for (int64_t r = r0; r < r1; r++) {
        int64_t n = offsets[r + 1] - offsets[r];
        if (n > nmax) nmax = n;
    }
    double *scratch = malloc(sizeof(double) * 7 * (size_t)(nmax + 1));
    int32_t *T = malloc(sizeof(int32_t) * (size_t)k * (size_t)(nmax + 1));
    if (!scratch || !T) { free(scratch); free(T); return -1; }
    for (int64_t r = r0; r < r1; r++) {
        int64_t o = offsets[r], n = offsets[r + 1] - o;
        nclusters[r] = solve_one(xs + o, ws ? ws + o : NULL, n, k,
                                 centroids + r * k, sse + r, scratch, T);
    }
    free(scratch);
    free(T);
    return 0;
}

/*
 * Nearest-centroid labels for rows r0..r1-1: x is R*n (any order), centroids
 * R*k sorted with nclusters[r] valid entries.  Ties go to the lower centroid.
 */
void ws_assign_batch(const double *x, int64_t n, const double *centroids,
                     const int64_t *nclusters, int64_t k, int64_t r0, int64_t r1,
                     int32_t *labels) {
    for (int64_t r = r0; r < r1; r++) {
        const double *c = centroids + r * k;
        int64_t kc = nclusters[r];
        for (int64_t i = 0; i < n; i++) {
            double v = x[r * n + i];
            /* first centroid whose midpoint with the next lies at or above v */
            int64_t lo = 0, hi = kc - 1;
            while (lo < hi) {
                int64_t mid = (lo + hi) / 2;
                if (v <= 0.5 * (c[mid] + c[mid + 1])) hi = mid; else lo = mid + 1;
            }
            labels[r * n + i] = (int32_t)lo;
        }
    }
}

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_kmeans_core",
                                       "exact 1-D k-means core (used through ctypes)", -1, NULL};
PyMODINIT_FUNC PyInit__kmeans_core(void) { return PyModule_Create(&moduledef); }
