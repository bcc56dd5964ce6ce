#!/usr/bin/env bash
# Autobahn TestSuite (fuzzingclient) against the chat example's /ws/echo, run
# with kosoku. Fails unless every case's behavior is OK, NON-STRICT or
# INFORMATIONAL and every behaviorClose is OK or INFORMATIONAL.
#
#   bash .ci/autobahn.sh            # reports in reports/autobahn/ (gitignored)
#
# Environment: AUTOBAHN_OUT (report directory), AUTOBAHN_PARALLELISM (default 2),
# CARGO_TARGET_DIR (honoured by cargo).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${AUTOBAHN_OUT:-reports/autobahn}"
parallelism="${AUTOBAHN_PARALLELISM:-2}"

command -v kosoku >/dev/null || { echo "autobahn: kosoku not on PATH (pip install kosoku)" >&2; exit 1; }

# Debug, with the feature set of .ci/run's "examples build" step, so this
# build is a no-op there; the run takes as long as against a release build
# (~8 s, mostly the fixed waits of cases 5.19/5.20/6.4.*) and a release build
# would add minutes.
bin=$(cargo build --example chat --all-features --message-format=json-render-diagnostics |
  python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "chat" and msg.get("executable"):
        print(msg["executable"])
')
[ -x "$bin" ] || { echo "autobahn: chat example binary not found" >&2; exit 1; }

rm -rf "$out"
mkdir -p "$out"
log="$out/server.log"

# The 9.* cases send messages of up to 16 MiB; the default limits (1 MiB)
# would close them with 1009. Threshold 0 compresses every message of a
# compressed session: RFC 7692 lets a server send small messages
# uncompressed (the crate's default below 256 bytes), but kosoku 0.1's
# checker crashes on that ("Strings must be encoded before hashing").
RUST_LOG="${RUST_LOG:-warn}" "$bin" --addr 127.0.0.1:0 --max-message-size 16777216 --compression-threshold 0 --inflate-limit 0 >"$log" 2>&1 &
server=$!
cleanup() {
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
}
trap cleanup EXIT

addr=""
for _ in $(seq 300); do
  addr=$(sed -n 's/^listening on //p' "$log" | head -n 1)
  [ -n "$addr" ] && break
  kill -0 "$server" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$addr" ]; then
  echo "autobahn: the chat example did not print 'listening on <addr>':" >&2
  cat "$log" >&2
  exit 1
fi
echo "autobahn: server $bin on $addr"

start=$(date +%s)
set +e
kosoku -p "$parallelism" -o "$out" "ws://$addr/ws/echo" 2>&1 | tee "$out/kosoku.log"
kosoku_rc=${PIPESTATUS[0]}
set -e
echo "autobahn: kosoku exited $kosoku_rc after $(($(date +%s) - start)) s"

if ! kill -0 "$server" 2>/dev/null; then
  echo "autobahn: the server died during the run; its log:" >&2
  tail -n 50 "$log" >&2
  exit 1
fi

# Check the per-case results ourselves as well: counts per behavior, and every
# failing case with what the server did.
check_rc=0
python3 - "$out/index.json" <<'EOF' || check_rc=$?
import collections, json, sys

with open(sys.argv[1]) as f:
    index = json.load(f)
cases = {cid: c for agent in index.values() for cid, c in agent.items()}

def key(cid):
    return [int(p) for p in cid.split(".")]

counts = collections.Counter(c["behavior"] for c in cases.values())
print("autobahn: %d cases: %s" % (len(cases), ", ".join("%s %d" % kv for kv in sorted(counts.items()))))
failed = [
    (cid, c) for cid, c in sorted(cases.items(), key=lambda kv: key(kv[0]))
    if c["behavior"] not in ("OK", "NON-STRICT", "INFORMATIONAL")
    or c["behaviorClose"] not in ("OK", "INFORMATIONAL")
]
for cid, c in failed:
    print("autobahn: FAILED %-8s behavior=%s behaviorClose=%s remoteCloseCode=%s"
          % (cid, c["behavior"], c["behaviorClose"], c.get("remoteCloseCode")))
sys.exit(1 if failed or not cases else 0)
EOF

if [ "$kosoku_rc" -ne 0 ] || [ "$check_rc" -ne 0 ]; then
  echo "autobahn: FAILED (reports in $out/index.html, server log $log)" >&2
  exit 1
fi
echo "autobahn: all cases passed"
