#!/bin/bash
# Node 20's test runner has no glob support: find the test files ourselves. Arguments narrow the set
# (a folder or file under test/); tests run one file at a time because they share loop devices and 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
roots=("${@:-test}")
mapfile -t files < <(find "${roots[@]}" -name '*.test.ts' | sort)
[ ${#files[@]} -gt 0 ] || { echo "no test files under ${roots[*]}" >&2; exit 1; }
exec node --import tsx --test --test-concurrency=1 --test-reporter=spec "${files[@]}"
