/* Maglev table population (Eisenbud et al., NSDI 2016, Pseudocode 1) for many Services at once.
 * offset/skip: s x n, entry: s x m (output, backend index per slot). Built by agent/model/maglev.py
 * with the system C compiler on first use; numpy does the same when no compiler is there. */
#include <stdint.h>
#include <stdlib.h>

int maglev_fill(int64_t s, int64_t n, int64_t m, const int64_t *offset, const int64_t *skip, int32_t *entry)
{
	int64_t *next = calloc((size_t)n, sizeof(int64_t));
	if (!next)
		return -1;
	for (int64_t r = 0; r < s; r++) {
		const int64_t *off = offset + r * n, *sk = skip + r * n;
		int32_t *e = entry + r * m;
		for (int64_t i = 0; i < m; i++)
			e[i] = -1;
		for (int64_t j = 0; j < n; j++)
			next[j] = 0;
		int64_t filled = 0;
		while (filled < m) {
			for (int64_t j = 0; j < n && filled < m; j++) {
				int64_t c = (off[j] + next[j] * sk[j]) % m;
				while (e[c] >= 0) {
					next[j]++;
					c = (off[j] + next[j] * sk[j]) % m;
				}
				e[c] = (int32_t)j;
				next[j]++;
				filled++;
			}
		}
	}
	free(next);
	return 0;
}
