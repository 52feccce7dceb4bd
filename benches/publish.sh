#!/usr/bin/env bash
# Regenerates BENCHMARKS.md from the repository root: bash benches/publish.sh
# Every figure in it is the verbatim output of the command printed above it;
# nothing in that file is edited by hand. Takes about 25 minutes (plus a
# release build); run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin ca
# The benches built first, so their compiler output stays out of the file.
cargo bench --locked --no-run --bench cfssl --bench instructions
cargo bench --locked --no-run --bench provider --features provider-compare
CA=target/release/ca
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out=$work/BENCHMARKS.md

section() { printf '\n## %s\n\n%s\n' "$1" "$2" >> "$out"; }
# run CMD...: the command, then what it printed.
run() {
  { printf '\n```sh\n%s\n```\n```\n' "$*"; "$@" 2>&1; printf '```\n'; } >> "$out"
}

{
  echo "# Benchmarks"
  echo
  echo "Written by \`bash benches/publish.sh\` on $(date -u +%Y-%m-%d). Each block is what the"
  echo "command above it printed on this machine, client and server side by side on its"
  echo "cores; nothing here is edited by hand. \`ca bench --help\` explains every figure;"
  echo "the README's *Measuring* section says how to measure your own deployment."
  echo
  echo "## Machine"
  echo
  echo '```'
  echo "cores: $(nproc)  $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "memory: $(free -g | awk '/^Mem:/ {print $2}') GiB  kernel: $(uname -r)"
  echo "$(rustc --version)  load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo '```'
} > "$out"

section "Warm: renewing agents" "64 calls in flight on 8 long-lived TLS connections; P-256 CA and CSRs, RS256 service-account tokens (2048-bit issuer key), 30 s after a 2 s warm-up."
run $CA bench warm --duration 30s --json-file "$work/warm-on.json"

section "Warm, audit line on and off" "The CA's per-certificate audit line on (log level info) and off (warn): three interleaved pairs of 15 s warm runs (one run alone swings by about 5% on this machine), then the medians."
run python3 -c '
import json, statistics, subprocess, sys
ca, work = sys.argv[1:3]
runs = {"on": [], "off": []}
for i in range(3):
    for audit in ("on", "off"):
        path = f"{work}/audit-{audit}-{i}.json"
        cmd = [ca, "bench", "warm", "--duration", "15s", "--no-floor", "--audit", audit, "--json-file", path]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        report = json.load(open(path))
        rate, cpu = report["certs_per_sec"], report["server"]["cpu_us_per_cert"]
        runs[audit].append((rate, cpu))
        shown = " ".join(cmd[1:8])
        print(f"pair {i + 1}, audit {audit:3}: {rate:8.0f} certs/s  {cpu:6.1f} us server CPU per certificate  (ca {shown})")
rate_on = statistics.median(r for r, _ in runs["on"])
rate_off = statistics.median(r for r, _ in runs["off"])
cpu_on = statistics.median(c for _, c in runs["on"])
cpu_off = statistics.median(c for _, c in runs["off"])
print(f"medians: audit on {rate_on:.0f} certs/s, {cpu_on:.1f} us; audit off {rate_off:.0f} certs/s, {cpu_off:.1f} us")
print(f"the audit line costs {100 * (1 - rate_on / rate_off):.1f}% of throughput, {100 * (cpu_on / cpu_off - 1):.1f}% of server CPU per certificate")
' "$CA" "$work"

section "Cold: starting pods" "A new TCP + TLS 1.3 + HTTP/2 connection per certificate, 64 at a time from 16 loopback source addresses, then the same with TLS session resumption (a reconnecting agent)."
run $CA bench cold --duration 30s --json-file "$work/cold.json"
run $CA bench cold --duration 30s --resume
run python3 -c '
import json, sys
warm, cold = (json.load(open(f)) for f in sys.argv[1:3])
w, c = warm["server"]["cpu_us_per_cert"], cold["server"]["cpu_us_per_cert"]
print(f"server CPU per certificate: cold {c:.1f} us / warm {w:.1f} us = {c / w:.2f}x")
h = cold["floor"]["connection"]
hs, kx, cv = h["total_us"], h["key_exchange_us"], h["handshake_sign_us"]
print(f"a new connection adds {c - w:.1f} us: the handshake unavoidable work {hs:.1f} us (X25519 {kx:.1f} + P-256 CertificateVerify {cv:.1f}),")
print(f"and {c - w - hs:.1f} us more (TCP in the kernel, the handshake hashing and records, the certificate chain, HTTP/2 set-up)")
' "$work/warm-on.json" "$work/cold.json"

section "Burst: a node pool scaling up" "10,000 distinct identities fire at once, each on a new connection (one loopback source address per 48)."
run $CA bench burst --identities 10000

section "RSA-2048 CA" "The same warm and cold runs with an RSA-2048 root signing the leaves (and the CA's TLS certificate)."
run $CA bench warm --duration 30s --ca-key rsa-2048
run $CA bench cold --duration 30s --ca-key rsa-2048

section "Agent: 1,000 SDS streams" "A real ca agent (sidecar mode, 6 s certificates) with 1,000 SDS streams shaped as 500 real Envoys: one Unix-socket HTTP/2 connection each, one StreamSecrets stream per resource name (default, ROOTCA), a 61,000-byte node on each first request, every push ACKed; through 5 rotations: the time from the agent obtaining each certificate to the last stream receiving it, and the agent's memory. Then the worst case: each of the 1,000 streams on a connection of its own."
run $CA bench agent --streams 1000 --rotations 5
run $CA bench agent --streams 1000 --rotations 5 --shape one-stream-per-connection

section "A peer: cfssl side by side" "cfssl 1.2.0 (Debian golang-cfssl) /api/v1/cfssl/sign over plain HTTP/1.1 (no authentication) against our CreateCertificate over TLS with token authentication, one after the other in one run: same P-256 CA, 64 in flight, 30 s each. cfssl takes 64 connections (HTTP/1.1 carries one request at a time), ours 8."
run cargo bench --locked --bench cfssl

section "RSA-2048 and the crypto provider" "ring (the default) against aws-lc-rs per operation (thread CPU time), and what a switch would change per certificate, from ca bench runs with an RSA-2048 CA. aws-lc-rs is built only for this bench (feature provider-compare)."
run cargo bench --locked --bench provider --features provider-compare

section "Instructions per operation (callgrind)" "Counted by valgrind, so the same on a busy machine: the signing path in-process (token check, CSR check, sign, the audit line), one whole call over TLS and HTTP/2 (client included), and one SDS push per stream. The expected counts live in benches/instructions.expected; the command fails when a count moves more than 2%."
run cargo bench --locked --bench instructions

section "Soak: ten minutes of everything" "A started CA under a paced load (500 CreateCertificate calls/s, 8 in flight, 10 s certificates), 4 real ca agents in node mode with 3 workloads each on 6 s certificates (a renewal every ~3 s per workload), one SDS stream per workload ACKing every push and checking every certificate (SPIFFE ID, validity, a path with rustls-webpki to the pushed ROOTCA and to the CA's bundle), and in the middle a whole ca rotate-root (prepare, activate, retire, each on its gate) with everything running. RSS and open descriptors of the CA and each agent sampled every 5 s; start and end after a 30 s warm-up. The run fails on any error or on growth beyond +4 MiB RSS or +2 descriptors in any process."
run $CA bench soak --duration 10m

mv "$out" BENCHMARKS.md
echo "wrote BENCHMARKS.md"
