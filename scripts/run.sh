#!/usr/bin/env bash
# The README's two commands: `bash scripts/run.sh demo` and `bash scripts/run.sh test`.
# Each creates .venv if needed and installs what it needs (torch==2.13.0 first, then the package), once:
# a stamp keyed on pyproject.toml and the constraints makes later runs skip the install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() { echo "usage: bash scripts/run.sh {demo|test|bench} [args...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
command=$1; shift

venv=${MONAI_PATCHQUEUE_VENV:-.venv}
python=${PYTHON:-$(command -v python3.11 || command -v python3)}

setup() {
    local extras=$1
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    local stamp
    stamp="$venv/.installed-$extras-$(cat pyproject.toml .ci/constraints.txt | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        echo "setting up $venv with .[$extras] (once)" >&2
        "$venv/bin/python" -m pip install --quiet --upgrade pip
        "$venv/bin/python" -m pip install --quiet -c .ci/constraints.txt torch==2.13.0
        "$venv/bin/python" -m pip install --quiet -c .ci/constraints.txt -e ".[$extras]"
        touch "$stamp"
    fi
}

case "$command" in
    demo)
        setup demo
        exec "$venv/bin/python" -m monai_patchqueue demo "$@"
        ;;
    test)
        setup dev
        "$venv/bin/python" -m ruff check .
        "$venv/bin/python" -m ruff format --check .
        set +e
        "$venv/bin/python" -m pytest -q "$@"
        status=$?
        set -e
        if [ "$status" -eq 5 ]; then
            echo "pytest collected no tests: failing on purpose" >&2
            exit 1
        fi
        exit "$status"
        ;;
    bench)
        setup dev
        exec "$venv/bin/python" "benchmarks/bench_${1:-samplers}.py" "${@:2}"
        ;;
    *) usage ;;
esac
