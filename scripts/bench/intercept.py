#!/usr/bin/env python3
"""The cost of bearerd's TLS interception against nginx terminating TLS for the same upstream
(issue 24), on loopback. Not part of `make bench`: run it by hand on a quiet machine.

    python3 scripts/bench/intercept.py            # BEARERD_BIN=target/release/bearerd

Targets, each in front of the same upstream (nginx `return 200`, 401 without a Bearer token,
scripts/bench/nginx-upstream.conf.tmpl):
  nginx-tls  nginx terminating TLS (nginx-tls-proxy.conf.tmpl: TLS 1.2/1.3, an ECDSA P-256
             certificate for the bench host, ALPN h2 and http/1.1, keep-alive upstream pool,
             `Authorization: Bearer x`), one worker;
  bearerd    target/release/bearerd with a forward [[listener]] and [listener.intercept]: the
             client sends CONNECT bench.test:443, then TLS with the leaf bearerd mints from its
             CA (ECDSA P-256), then the requests; the token comes from a counting token
             endpoint (scripts/bench/token_endpoint.py), fetched once.
Measured:
  kept-alive  h2load over TLS, HTTP/1.1 (--h1) at BENCH_CONNECTIONS ("1,16") connections and
              HTTP/2 at BENCH_H2 ("1x100": connections x concurrent streams), BENCH_SECONDS
              (10) each. h2load speaks no HTTP proxy protocol, so it connects to a socat
              relay: for bearerd `socat ... PROXY:127.0.0.1:bench.test:443` (socat sends the
              CONNECT once per connection and relays bytes), for nginx a plain TCP relay, so
              that both pay the same relay. h2load's --connect-to keeps `bench.test` as SNI and
              authority. Reported: req/s, and the server's CPU µs per request (utime+stime of
              bearerd, or of nginx's worker, from /proc).
  new tunnels  BENCH_CLIENTS (2) client processes, each for BENCH_SECONDS in a loop: TCP
              connect, (for bearerd: CONNECT and its 200,) a TLS handshake (certificate not
              verified, session not resumed), one GET, close. Reported: tunnels/s and the
              server's CPU µs per tunnel, which is what to compare (the Python clients may be
              the limit of tunnels/s on a small machine).
Each cell runs BENCH_ROUNDS (3) times, targets alternating in order; the medians are printed as
a Markdown table for docs/benchmarks.md. Servers are pinned to the first CPU this process may
use and the load (h2load, socat, clients) to the second (BENCH_SERVER_CPU, BENCH_LOAD_CPU).

Needs nginx, h2load (nghttp2-client), socat and openssl; Python 3.11, standard library only.
Every process it starts is stopped by PID at the end, also on an error or Ctrl-C.
BENCH_KEEP=1 keeps the temporary directory (configs and logs).
"""

import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from multiprocessing import Process, Queue
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HOST = "127.0.0.1"
NAME = "bench.test"
SECONDS = float(os.environ.get("BENCH_SECONDS", "10"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNECTIONS = [int(c) for c in os.environ.get("BENCH_CONNECTIONS", "1,16").split(",") if c]
H2 = [tuple(int(x) for x in cell.split("x"))
      for cell in os.environ.get("BENCH_H2", "1x100").split(",") if cell and cell != "0"]
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "2"))
BEARERD = Path(os.environ.get("BEARERD_BIN", ROOT / "target/release/bearerd"))
CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU = os.environ.get("BENCH_SERVER_CPU", str(CPUS[0]))
LOAD_CPU = os.environ.get("BENCH_LOAD_CPU", str(CPUS[1] if len(CPUS) > 1 else CPUS[0]))
TICKS = os.sysconf("SC_CLK_TCK")


class Procs:
    """Every process started, to stop by PID."""

    def __init__(self):
        self.started = []

    def start(self, argv, cpu, log, **kwargs):
        argv = ["taskset", "-c", cpu, *map(str, argv)]
        popen = subprocess.Popen(argv, stdout=kwargs.pop("stdout", open(log, "wb")),
                                 stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        self.started.append(popen)
        return popen

    def stop_all(self):
        for popen in reversed(self.started):
            if popen.poll() is None:
                # The process group of each: socat's forked children, nginx's worker.
                try:
                    os.killpg(popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for popen in self.started:
            try:
                popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port, what):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def render(template, directory, **values):
    text = (HERE / template).read_text()
    values["DIR"] = directory
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", str(value))
    return text


def start_nginx(procs, template, directory, **values):
    directory.mkdir(exist_ok=True)
    (directory / "nginx.conf").write_text(render(template, directory, **values))
    nginx = procs.start(["nginx", "-p", directory, "-e", directory / "error.log", "-c",
                         directory / "nginx.conf"], SERVER_CPU, directory / "stderr.log")
    wait_port(values["PORT"], template)
    return nginx


def setup(procs, tmp):
    """Starts the upstream, nginx-tls, bearerd and their relays; returns the targets."""
    upstream = free_port()
    start_nginx(procs, "nginx-upstream.conf.tmpl", tmp / "upstream", PORT=upstream)
    # nginx's certificate: ECDSA P-256 for the bench host, as bearerd's leaves.
    nginx_dir = tmp / "nginx-tls"
    nginx_dir.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", nginx_dir / "leaf.key",
                    "-out", nginx_dir / "leaf.pem", "-subj", f"/CN={NAME}", "-addext",
                    f"subjectAltName=DNS:{NAME}", "-days", "1"], check=True,
                   capture_output=True)
    nginx_port = free_port()
    nginx = start_nginx(procs, "nginx-tls-proxy.conf.tmpl", nginx_dir, PORT=nginx_port,
                        UPSTREAM_PORT=upstream)
    time.sleep(0.2)
    nginx_workers = children(nginx.pid)

    token = procs.start([sys.executable, HERE / "token_endpoint.py", "--port", "0", "--delay",
                         "0"], SERVER_CPU, tmp / "token.log", stdout=subprocess.PIPE)
    token_port = int(token.stdout.readline().decode().strip())
    listen, admin = free_port(), free_port()
    (tmp / "bearerd.toml").write_text(f"""\
# Written by scripts/bench/intercept.py.
[admin]
listen = "{HOST}:{admin}"
[log]
level = "warn"
[server]
max_connections = 4096

[[listener]]
listen = "{HOST}:{listen}"
mode = "forward"
[listener.intercept]
ca_cert_file = "ca.pem"
ca_key_file = "ca.key"

[[listener.route]]
name = "bench"
host = "{NAME}"
url = "http://{HOST}:{upstream}"
allow_plain_http = true
[listener.route.token]
url = "http://{HOST}:{token_port}/oauth/token"
client_id = "bench"
client_secret = "bench-secret"
""")
    bearerd = procs.start([BEARERD, "--config", tmp / "bearerd.toml"], SERVER_CPU,
                          tmp / "bearerd.log")
    wait_port(listen, "bearerd")
    deadline = time.monotonic() + 10
    while True:
        try:
            if urllib.request.urlopen(f"http://{HOST}:{admin}/readyz", timeout=1).status == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit("bearerd did not become ready")
        time.sleep(0.05)

    # The relays h2load connects to: the same socat for both, one CONNECT per connection for
    # bearerd.
    relays = {}
    for target, address in [("nginx-tls", f"TCP:{HOST}:{nginx_port}"),
                            ("bearerd", f"PROXY:{HOST}:{NAME}:443,proxyport={listen}")]:
        port = free_port()
        procs.start(["socat", f"TCP-LISTEN:{port},bind={HOST},fork,reuseaddr,backlog=4096",
                     address], LOAD_CPU, tmp / f"socat-{target}.log")
        wait_port(port, f"socat for {target}")
        relays[target] = port
    return {
        "nginx-tls": {"relay": relays["nginx-tls"], "direct": nginx_port, "connect": False,
                      "pids": nginx_workers},
        "bearerd": {"relay": relays["bearerd"], "direct": listen, "connect": True,
                    "pids": [bearerd.pid]},
    }


def h2load(target, connections, streams, h1):
    args = ["taskset", "-c", LOAD_CPU, "h2load", "-t", "1", "-c", str(connections), "-m",
            str(streams), "-D", f"{SECONDS:g}", f"--connect-to={HOST}:{target['relay']}",
            f"https://{NAME}/"]
    if h1:
        args.insert(4, "--h1")
    before = cpu_seconds(target["pids"])
    ran = subprocess.run(args, capture_output=True, text=True)
    out = ran.stdout + ran.stderr
    used = cpu_seconds(target["pids"]) - before
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    status = re.search(r"status codes: (\d+) 2xx", out)
    if not done or not status or int(status.group(1)) == 0:
        sys.exit(f"h2load failed:\n{out}")
    ok = int(status.group(1))
    return {"rps": ok / SECONDS, "cpu_us": used * 1e6 / ok if ok else None,
            "errors": int(done.group(1)) - ok}


def tunnel_client(port, connect, seconds, queue):
    """One client process: new connections in a loop; puts how many completed."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    request = f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode()
    done = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with socket.create_connection((HOST, port)) as raw:
            if connect:
                raw.sendall(f"CONNECT {NAME}:443 HTTP/1.1\r\nHost: {NAME}:443\r\n\r\n".encode())
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    byte = raw.recv(1)
                    if not byte:
                        raise SystemExit("CONNECT: closed")
                    head += byte
                if not head.startswith(b"HTTP/1.1 200"):
                    raise SystemExit(f"CONNECT: {head[:40]!r}")
            with context.wrap_socket(raw, server_hostname=NAME) as tls:
                tls.sendall(request)
                answer = b""
                while chunk := tls.recv(65536):
                    answer += chunk
                if not answer.startswith(b"HTTP/1.1 200"):
                    raise SystemExit(f"GET: {answer[:40]!r}")
        done += 1
    queue.put(done)


def tunnels(target):
    queue = Queue()
    before = cpu_seconds(target["pids"])
    workers = [Process(target=tunnel_client,
                       args=(target["direct"], target["connect"], SECONDS, queue))
               for _ in range(CLIENTS)]
    for worker in workers:
        worker.start()
        os.sched_setaffinity(worker.pid, {int(LOAD_CPU)})
    total = sum(queue.get() for _ in workers)
    for worker in workers:
        worker.join()
    used = cpu_seconds(target["pids"]) - before
    return {"rps": total / SECONDS, "cpu_us": used * 1e6 / total if total else None,
            "errors": 0}


def main():
    for tool in ("nginx", "h2load", "socat", "openssl", "taskset"):
        if not any((Path(d) / tool).exists() for d in os.environ["PATH"].split(":") + ["/usr/sbin"]):
            sys.exit(f"{tool} is missing (apt-get install nginx nghttp2-client socat openssl)")
    if not BEARERD.exists():
        sys.exit(f"{BEARERD} is missing: cargo build --release (or set BEARERD_BIN)")
    os.environ["PATH"] += ":/usr/sbin"
    procs = Procs()
    results = []
    tmp = tempfile.mkdtemp(prefix="bearerd-intercept-bench-")
    if True:
        try:
            targets = setup(procs, Path(tmp))
            cells = [(f"h1 keep-alive, {c} conn", lambda t, c=c: h2load(t, c, 1, True))
                     for c in CONNECTIONS]
            cells += [(f"h2 keep-alive, {c}x{m} streams", lambda t, c=c, m=m: h2load(t, c, m, False))
                      for c, m in H2]
            cells.append((f"new tunnels, {CLIENTS} clients", tunnels))
            order = list(targets)
            for round_ in range(ROUNDS):
                for cell, run in cells:
                    for name in order if round_ % 2 == 0 else reversed(order):
                        measured = run(targets[name])
                        measured.update(cell=cell, target=name, round=round_ + 1)
                        results.append(measured)
                        print(json.dumps(measured), file=sys.stderr)
        finally:
            procs.stop_all()
            if os.environ.get("BENCH_KEEP") == "1":
                print(f"kept {tmp}", file=sys.stderr)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    print("| cell | target | req/s or tunnels/s (median) | server CPU µs each (median) |")
    print("|---|---|---|---|")
    for cell in dict.fromkeys(r["cell"] for r in results):
        for name in dict.fromkeys(r["target"] for r in results):
            rows = [r for r in results if r["cell"] == cell and r["target"] == name]
            rps = statistics.median(r["rps"] for r in rows)
            cpu = statistics.median(r["cpu_us"] for r in rows if r["cpu_us"] is not None)
            print(f"| {cell} | {name} | {rps:,.0f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
