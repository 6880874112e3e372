/* A fake container's only process: wait to be put into the container's cgroup,
 * chroot into the container's root, then sleep until killed.
 *
 *     container_init ROOT PARENT_PID
 *
 * stdin and stdout are pipes from the parent (hack/containers.py): one byte in
 * on stdin means "you are in your cgroup now", one byte out on stdout means
 * "chrooted: /proc/<pid>/root is ROOT". Both are closed afterwards, so a
 * parent with hundreds of containers holds no file descriptor for them.
 *
 * PR_SET_PDEATHSIG kills this process when the thread that started it exits
 * (prctl(2)): a test run that dies leaves no container behind. PARENT_PID
 * closes the race where the parent died before prctl() was called.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    char go;

    if (argc != 3) {
        fprintf(stderr, "usage: %s ROOT PARENT_PID\n", argv[0]);
        return 2;
    }
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) {
        perror("container_init: prctl");
        return 3;
    }
    if (getppid() != (pid_t)atol(argv[2]))
        return 4; /* the parent is gone already */
    for (;;) {
        ssize_t n = read(STDIN_FILENO, &go, 1);
        if (n == 1)
            break;
        if (n < 0 && errno == EINTR)
            continue;
        return 5; /* the parent gave up on us */
    }
    if (chroot(argv[1]) != 0) {
        perror("container_init: chroot");
        return 6;
    }
    if (chdir("/") != 0) {
        perror("container_init: chdir");
        return 7;
    }
    if (write(STDOUT_FILENO, "r", 1) != 1)
        return 8;
    close(STDIN_FILENO);
    close(STDOUT_FILENO);
    for (;;)
        pause();
}
