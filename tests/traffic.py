"""Traffic for the fault tests: connect to each target in turn, forever, until SIGTERM; then print one
JSON report: attempts and failures per target, and the first failures (when the attempt began, target, errno name).
Standard library only (it runs inside a sandbox pod). Usage: traffic.py HOST:PORT [HOST:PORT ...]"""
import errno
import json
import signal
import socket
import sys
import time

stop = False


def _stop(*_a):
    global stop
    stop = True


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in sys.argv[1:]]
    stats = {f"{h}:{p}": {"attempts": 0, "failed": 0} for h, p in targets}
    failures = []
    while not stop:
        for host, port in targets:
            name = f"{host}:{port}"
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.settimeout(1.0)
            stats[name]["attempts"] += 1
            began = time.time()
            try:
                s.connect((host, port))
                s.sendall(b"x")
                if not s.recv(64):  # the pod server answers with its name: the connection reached one
                    raise ConnectionResetError(errno.ECONNRESET, "closed without an answer")
            except OSError as e:
                stats[name]["failed"] += 1
                if len(failures) < 50:
                    failures.append((began, name, errno.errorcode.get(e.errno or 0, type(e).__name__)))
            finally:
                s.close()
        time.sleep(0.005)
    print(json.dumps({"targets": stats, "failures": failures}), flush=True)


if __name__ == "__main__":
    main()
