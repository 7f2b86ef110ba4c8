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
			next[j] = off[j];  /* the slot of backend j's next preference: offset + k * skip mod m */
		int64_t filled = 0;
		while (filled < m) {
			for (int64_t j = 0; j < n && filled < m; j++) {
				int64_t c = next[j];
				while (e[c] >= 0) {  /* stepping by skip without a division: c < m, skip < m */
					c += sk[j];
					if (c >= m)
						c -= m;
				}
				e[c] = (int32_t)j;
				c += sk[j];
				next[j] = c >= m ? c - m : c;
				filled++;
			}
		}
	}
	free(next);
	return 0;
}
