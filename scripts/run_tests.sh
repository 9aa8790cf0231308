#!/usr/bin/env bash
# Runs the suite (in $VENV, default .venv); pytest's exit code 5 ("no tests collected") is a failure here, not a pass.
set -u
"${VENV:-.venv}"/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
