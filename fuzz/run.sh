#!/usr/bin/env bash
# Runs every fuzz target for a bounded time and prints, per target, the executions, libFuzzer's
# coverage (`cov:` edges and `ft:` features from its last status line), the corpus it holds
# (`corp:` inputs) and the files in fuzz/corpus/TARGET. Exits non-zero if any target crashed
# (the input is kept in fuzz/artifacts/TARGET/).
#
#   fuzz/run.sh [SECONDS_PER_TARGET]      # default 10; targets run one after another
#   TARGETS="proto server" fuzz/run.sh 60 # a subset
#   JOBS=1 NICE=19 fuzz/run.sh 600        # libFuzzer's -jobs=1 (a child process), niced
#
# Installs cargo-fuzz when missing (idempotent); needs the nightly toolchain. Works from a clean
# checkout with no standard input. Corpora grow in fuzz/corpus/TARGET (not in git), starting
# from the seeds in fuzz/seeds/TARGET; logs are in fuzz/logs/TARGET.log.
set -euo pipefail
exec </dev/null

secs=${1:-10}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz/run.sh: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz/run.sh: installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

targets=${TARGETS:-$(cargo +nightly fuzz list)}
# Inputs larger than these are not tried: the server target's stream and the trace body need
# room for a few requests; the others parse headers and lines.
max_len_of() {
    case $1 in
        server) echo 16384 ;;
        trace) echo 16384 ;;
        handshake) echo 8192 ;;
        *) echo 4096 ;;
    esac
}

# Extra libFuzzer flags per target. The server target's threads are std::thread::scope
# threads: the scope returns once each has finished its closure, while the OS thread may still be
# running its thread-local destructors, so LeakSanitizer's check after an input reports the
# thread's own bookkeeping (its `Thread` handle, its name, the TLS destructor list) as leaked.
# Memory stays bounded by -rss_limit_mb all the same.
extra_flags_of() {
    case $1 in
        server) echo -detect_leaks=0 ;;
        # The handshake must never allocate what a client announces: option data is at most
        # 64 KiB, so any allocation of a megabyte or more is a finding. (A panic's backtrace may
        # itself pass the limit: its message comes first in the log.)
        handshake) echo -malloc_limit_mb=1 ;;
        *) ;;
    esac
}

echo "fuzz/run.sh: building ($(cargo +nightly fuzz --version))"
cargo +nightly fuzz build -O >logs.build 2>&1 || { cat logs.build >&2; exit 1; }
rm -f logs.build
bin_dir=$(pwd)/target/x86_64-unknown-linux-gnu/release

failed=0
printf '%-16s %10s %8s %8s %8s %8s  %s\n' target execs cov ft corp files result
for t in $targets; do
    mkdir -p "corpus/$t" "artifacts/$t" "logs" "seeds/$t"
    log=logs/$t.log
    args=(
        "$here/corpus/$t" "$here/seeds/$t"
        -max_total_time="$secs" -print_final_stats=1
        -timeout=30 -rss_limit_mb=2048 -max_len="$(max_len_of "$t")"
        -artifact_prefix="$here/artifacts/$t/"
    )
    read -r -a extra <<<"$(extra_flags_of "$t")"
    args+=("${extra[@]}")
    rc=0
    if [[ -n ${JOBS:-} ]]; then
        # With -jobs, libFuzzer runs the fuzzing in a child and writes its output to
        # fuzz-0.log in the working directory.
        rm -f "logs/fuzz-0.log"
        (cd logs && nice -n "${NICE:-0}" "$bin_dir/$t" "${args[@]}" -jobs="$JOBS" >"$t.parent.log" 2>&1) || rc=$?
        mv logs/fuzz-0.log "$log" 2>/dev/null || cp "logs/$t.parent.log" "$log"
        grep -q 'ERROR: libFuzzer\|panicked at' "$log" && rc=1
    else
        nice -n "${NICE:-0}" "$bin_dir/$t" "${args[@]}" >"$log" 2>&1 || rc=$?
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    last=$(grep -E '^#[0-9]+.*cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
    cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
    files=$(find "corpus/$t" -type f | wc -l)
    if [[ $rc -eq 0 ]]; then
        result=ok
    else
        result="CRASH (exit $rc; see fuzz/$log and fuzz/artifacts/$t/)"
        failed=1
    fi
    printf '%-16s %10s %8s %8s %8s %8s  %s\n' "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$files" "$result"
done
exit $failed
