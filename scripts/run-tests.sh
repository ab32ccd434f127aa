#!/bin/bash
# Node 20's test runner has no glob support: find the test files ourselves. Arguments narrow the set
# (a folder or file under test/); tests run one file at a time because they share loop devices and 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
# The suite starts with doctor: every program, QEMU driver, device and kernel feature the tests use must be
# here (--for tests), or no test runs and the report says what is missing and which package brings it.
if ! doctor_report=$(bin/snapshift doctor --for tests 2>&1); then
  printf '%s\n' "$doctor_report" >&2
  echo "run-tests: this machine lacks what the tests need (see above); bash scripts/setup.sh installs it" >&2
  exit 2
fi
printf '%s\n' "$doctor_report" | tail -n 1
roots=("${@:-test}")
mapfile -t files < <(find "${roots[@]}" -name '*.test.ts' | sort)
[ ${#files[@]} -gt 0 ] || { echo "no test files under ${roots[*]}" >&2; exit 1; }
exec node --import tsx --test --test-concurrency=1 --test-reporter=spec "${files[@]}"
