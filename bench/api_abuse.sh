#!/usr/bin/env bash
# The API under abuse (issue #18), on loopback, bounded in time (~40 s):
#   1. one account's latency unloaded: p50/p99 of GET /api/v1/snapshots/ at
#      10 requests a second;
#   2. the same while another account floods (4 connections, as fast as
#      they can): how many of the flood's requests got 429, and the first
#      account's p99 against its unloaded p99 (target: within 2x);
#   3. 2,000 connections that sent half a request header, against a server
#      whose file limit is 1,024 (soft and hard): the time a well-formed
#      request takes to be answered (target: within a second).
# Writes the table into docs/BENCHMARKS.md between the "abuse" markers.
#
# Usage: bench/api_abuse.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=$PWD/target/release/blocksnap
work=$(mktemp -d)
server_pid=
trap '[ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$work"' EXIT

store=$work/store
"$bin" --store "$store" init >/dev/null
for id in 1 2; do
  head -c 4M /dev/urandom >"$work/d$id.img"
done
"$bin" --store "$store" server add --id 1 --name quiet --disk "$work/d1.img" --account quiet >/dev/null
"$bin" --store "$store" server add --id 2 --name loud --disk "$work/d2.img" --account loud >/dev/null
"$bin" --store "$store" snapshot create --server 1 --name one >/dev/null
"$bin" --store "$store" snapshot create --server 2 --name two >/dev/null
"$bin" token new --account quiet --name quiet >"$work/quiet"
"$bin" token new --account loud --name loud >"$work/loud"
sed -n 2p "$work/quiet" >"$work/tokens"
sed -n 2p "$work/loud" >>"$work/tokens"
quiet=$(sed -n 1p "$work/quiet")
loud=$(sed -n 1p "$work/loud")

prlimit --nofile=1024:1024 "$bin" --store "$store" serve --listen 127.0.0.1:0 \
  --tokens "$work/tokens" --rate-limit 20 >"$work/out" 2>"$work/err" &
server_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/out" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/^listening on //p' "$work/out")
[ -n "$url" ] || { echo "server did not start:"; cat "$work/err"; exit 1; }

python3 - "$url" "$quiet" "$loud" docs/BENCHMARKS.md <<'PY'
import http.client, resource, socket, sys, threading, time, urllib.parse
url, quiet, loud, doc = sys.argv[1:]
u = urllib.parse.urlparse(url)
host, port = u.hostname, u.port
path = "/api/v1/snapshots/"

def get(conn, token):
    t0 = time.perf_counter()
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    r = conn.getresponse()
    r.read()
    return r.status, time.perf_counter() - t0

def paced(token, seconds, rate=10.0):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    lat, statuses = [], []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        s, d = get(conn, token)
        statuses.append(s)
        lat.append(d)
        time.sleep(max(0.0, 1.0 / rate - d))
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
    return q(0.50), q(0.99), statuses

# 1. unloaded
p50_0, p99_0, st0 = paced(quiet, 8)
# 2. flood from the other account
stop = threading.Event()
counts = {"ok": 0, "throttled": 0, "other": 0}
lock = threading.Lock()
def flood():
    conn = http.client.HTTPConnection(host, port, timeout=10)
    while not stop.is_set():
        try:
            s, _ = get(conn, loud)
        except Exception:
            conn = http.client.HTTPConnection(host, port, timeout=10)
            continue
        with lock:
            counts["ok" if s == 200 else "throttled" if s == 429 else "other"] += 1
floods = [threading.Thread(target=flood) for _ in range(4)]
for t in floods: t.start()
time.sleep(1)
p50_1, p99_1, st1 = paced(quiet, 8)
stop.set()
for t in floods: t.join()
# 3. half-open connections
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
held = []
for _ in range(2000):
    try:
        s = socket.create_connection((host, port), timeout=2)
        s.sendall(b"GET /api/v1/snapshots/ HTTP/1.1\r\nHost: x\r\n")
        held.append(s)
    except OSError:
        pass
t0 = time.perf_counter()
conn = http.client.HTTPConnection(host, port, timeout=30)
status, _ = get(conn, quiet)
answered = time.perf_counter() - t0
for s in held: s.close()

rows = [
    "Command: `bash bench/api_abuse.sh` (loopback; the server's file limit 1,024, soft and hard; `--rate-limit 20`). One run.",
    "",
    "| what | figure |",
    "|---|---|",
    f"| one account's GET, unloaded (10/s): p50 / p99 | {p50_0:.2f} / {p99_0:.2f} ms |",
    f"| the same while another account floods (4 connections, flat out): p50 / p99 | {p50_1:.2f} / {p99_1:.2f} ms |",
    f"| its p99 loaded against unloaded | {p99_1 / p99_0:.2f}x (target: within 2x) |",
    f"| its requests answered 200, unloaded / loaded | {st0.count(200)}/{len(st0)} / {st1.count(200)}/{len(st1)} |",
    f"| the flood's requests: 200 / 429 / other | {counts['ok']} / {counts['throttled']} / {counts['other']} |",
    f"| half-open connections held | {len(held)} |",
    f"| a well-formed request meanwhile: status, time to answer | {status}, {answered * 1000:.1f} ms (target: within 1 s) |",
]
print("\n".join(rows))
text = open(doc).read()
begin, end = "<!-- abuse:begin -->", "<!-- abuse:end -->"
block = begin + "\n" + "\n".join(rows) + "\n" + end
if begin in text:
    a, b = text.index(begin), text.index(end) + len(end)
    text = text[:a] + block + text[b:]
else:
    text += "\n## The API under abuse: `bench/api_abuse.sh`\n\n" + block + "\n"
open(doc, "w").write(text)
PY
