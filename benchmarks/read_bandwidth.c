/* A memory reader for benchmarks/compare.py's bandwidth bound: each OpenMP thread reads its
 * share of `n` floats as `streams` sequential streams side by side (16 floats a load), the way
 * a matrix-vector product reads several weight rows at once. One stream per thread reads
 * slower than several on the machines this is measured on, so the bound takes the best.
 *
 *   cc -O3 -march=native -fopenmp -fPIC -shared read_bandwidth.c -o read_bandwidth.so
 */
#include <omp.h>

#define MAX_STREAMS 8

typedef float floats16 __attribute__((vector_size(64)));

/* the sum of x[0..n) (n a multiple of 16 * streams * threads; the rest is not read) */
float read_streams(const float *x, long n, int streams) {
    if (streams < 1) streams = 1;
    if (streams > MAX_STREAMS) streams = MAX_STREAMS;
    float total = 0;
#pragma omp parallel reduction(+ : total)
    {
        const long share = n / 16 / omp_get_num_threads(), length = share / streams;
        const floats16 *base = (const floats16 *)x + share * omp_get_thread_num();
        floats16 acc[MAX_STREAMS] = {0};
        for (long i = 0; i < length; i++)
            for (int s = 0; s < streams; s++) acc[s] += base[s * length + i];
        for (int s = 1; s < streams; s++) acc[0] += acc[s];
        for (int j = 0; j < 16; j++) total += acc[0][j];
    }
    return total;
}
