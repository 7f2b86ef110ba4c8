/* The one log2 histogram slot function of every nodewire program (observe, rdma).
 *
 * Slots are upper-inclusive powers of two, the convention of an OpenTelemetry explicit-bucket
 * histogram: slot s counts values v with 2^(s-1) < v <= 2^s (slot 0: v <= 1). User space exports
 * slot s as the bucket with upper bound 2^s (or, as an OTel base-2 exponential histogram of scale 0,
 * as bucket index s-1, whose range (2^(s-1), 2^s] is the same), so counts pass through unchanged.
 * (bcc's bpf_log2l() is lower-inclusive, hence our own.)
 *
 * NW_HIST_SLOTS is not defined here: agent/histogram.py owns it (HIST_SLOTS) and passes it
 * as -DNW_HIST_SLOTS, so C and Python cannot disagree.
 */
#ifndef NODEWIRE_HIST_H
#define NODEWIRE_HIST_H

#ifndef NW_HIST_SLOTS
#error "NW_HIST_SLOTS comes from agent/histogram.py: compile with its hist_cflags()"
#endif

static __always_inline __u32 nw_floor_log2(__u64 v)
{
	__u32 r = 0;
	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) { r += 1; }
	return r;
}

/* The slot of v; the last slot (NW_HIST_SLOTS - 1) is the catch-all (+Inf). */
static __always_inline __u32 nw_hist_slot(__u64 v)
{
	if (v <= 1)
		return 0;
	__u32 s = nw_floor_log2(v - 1) + 1;
	return s < NW_HIST_SLOTS ? s : NW_HIST_SLOTS - 1;
}

#endif /* NODEWIRE_HIST_H */
