#!/usr/bin/env bash
# Fuzz the compiled core under AddressSanitizer + UBSan, the pure core as oracle.
#
#   tests/fuzz/run.sh SECONDS     build (clang, libFuzzer coverage) and fuzz for SECONDS
#   tests/fuzz/run.sh --pytest    build (gcc or $CC) and run tests/test_ccore.py under ASan once
#
# Needs clang for fuzzing (Debian: apt-get install -y clang) and atheris (installed
# with pip if missing). Build products and the corpus go to build/fuzz/ (or
# $FUZZ_BUILD_DIR). Exits non-zero on a crash, a sanitizer report or a mismatch;
# the failing input is left in the build directory (crash-*).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build="${FUZZ_BUILD_DIR:-$root/build/fuzz}"
python="${PYTHON:-python3}"
mode="${1:-60}"

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1:strict_string_checks=1:detect_stack_use_after_return=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
# Every Python object its own malloc block: ASan then sees reads past one.
export PYTHONMALLOC=malloc

if [ "$mode" = "--pytest" ]; then
    shift
    out="$("$python" "$here/build_asan.py" "$build/pytest")"
    module="$(sed -n 1p <<<"$out")"
    runtime="$(sed -n 2p <<<"$out")"
    LD_PRELOAD="$runtime" "$python" "$here/asan_pytest.py" "$module" "$@"
    exit $?
fi

case "$mode" in
    ''|*[!0-9]*) echo "usage: $0 SECONDS | --pytest [pytest args]" >&2; exit 2 ;;
esac
command -v clang >/dev/null || { echo "clang is needed: apt-get install -y clang" >&2; exit 2; }
"$python" -c "import atheris" 2>/dev/null || "$python" -m pip install -q atheris

out="$("$python" "$here/build_asan.py" "$build/libfuzzer" --fuzzer)"
module="$(sed -n 1p <<<"$out")"
runtime="$(sed -n 2p <<<"$out")"
corpus="$build/corpus"
"$python" "$here/fuzz_core.py" --write-seeds "$corpus"
cd "$build"
P3_FUZZ_MODULE="$module" LD_PRELOAD="$runtime" "$python" "$here/fuzz_core.py" \
    -max_total_time="$mode" -timeout=30 -rss_limit_mb=4096 -max_len=16384 -len_control=20 \
    -print_final_stats=1 "$corpus"
