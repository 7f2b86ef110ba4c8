/* Test program for the loader: counts getppid() calls of one process (its tgid in config[0]) in a
 * per-CPU array, from the syscalls:sys_enter_getppid tracepoint. NW_TEST_STEP is what each call
 * adds, so a test can change the program (and its digest) through cflags alone. */
#include <uapi/linux/bpf.h>

#ifndef NW_TEST_STEP
#error "NW_TEST_STEP comes from the test's ProgramSpec cflags"
#endif

BPF_TABLE_PINNED("array", __u32, __u32, nwtest_config_v1, 1, NW_PIN_DIR "/nwtest_config_v1");
BPF_TABLE_PINNED("percpu_array", __u32, __u64, nwtest_calls_v1, 1, NW_PIN_DIR "/nwtest_calls_v1");

int nwtest_count(void *ctx)
{
	__u32 zero = 0;
	__u32 *tgid = nwtest_config_v1.lookup(&zero);
	if (!tgid || *tgid != (__u32)(bpf_get_current_pid_tgid() >> 32))
		return 0;
	__u64 *n = nwtest_calls_v1.lookup(&zero);
	if (n)
		*n += NW_TEST_STEP;  /* per-CPU slot: no atomic needed */
	return 0;
}
