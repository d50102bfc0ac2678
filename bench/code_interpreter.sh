#!/usr/bin/env bash
# Code interpreter benchmark (not part of the tests): a fresh `cella serve`, then warm and first
# `run_code` latencies through the official e2b-code-interpreter SDK, and `python3 -c` through
# the process API for comparison. Prints a markdown table.
#
#   bench/code_interpreter.sh                 measure and print
#   bench/code_interpreter.sh --write-docs    ... and update the "Code interpreter" section of
#                                             docs/benchmarks.md
#
# Needs root, a release build (scripts/build) and the code-interpreter template
# (`target/release/cella template build code-interpreter`). Uses the e2e venv (.venv-e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ${EUID} -ne 0 ]]; then
    echo "bench/code_interpreter.sh: must run as root" >&2
    exit 1
fi
venv=.venv-e2e
req=tests/e2e/requirements.txt
stamp=$venv/.requirements.sha256
want=$(sha256sum "$req" | cut -d' ' -f1)
if [[ ! -x $venv/bin/python || ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
    echo "$want" >"$stamp"
fi
exec "$venv/bin/python" bench/code_interpreter.py "$@"
