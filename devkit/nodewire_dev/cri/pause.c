/* The pod sandbox's one process (what registry.k8s.io/pause does): hold the pod's namespaces and
 * wait; exit on SIGTERM/SIGINT, reap any child. Built with `gcc -static` so the image needs nothing else. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }

int main(void) {
    signal(SIGTERM, stop);
    signal(SIGINT, stop);
    signal(SIGCHLD, reap);
    for (;;)
        pause();
}
