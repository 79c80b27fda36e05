#!/bin/sh
# Sluice's two front-door commands. Each sets up ./.venv from the project's files (exact
# versions from constraints.txt) on first use, then:
#   ./run.sh dev  [sluice dev options]   run the whole stack locally (Ctrl-C stops it)
#   ./run.sh test [pytest options]       run the test suite
#   ./run.sh bench NAME [options]        run bench/NAME.py (a benchmark; see README)
# PYTHON picks the interpreter a new venv is made with, VENV the venv's directory, relative
# to this checkout (a benchmark venv on an optimized interpreter build beside .venv, say).
set -eu
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

setup() {
    extras="$1"
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$PYTHON" -m venv "$VENV"; then
            echo "run.sh: '$PYTHON -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2
            exit 1
        fi
    fi
    stamp="$VENV/.sluice-installed$extras"
    want="$(cat pyproject.toml constraints.txt | cksum)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".$extras"
        echo "$want" > "$stamp"
    fi
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    dev)
        setup ""
        exec "$VENV/bin/sluice" dev "$@"
        ;;
    test)
        setup "[test]"
        # buf (proto lint / breaking checks) comes from npm; without npm those two tests skip.
        if command -v npm >/dev/null 2>&1 && [ ! -x node_modules/.bin/buf ]; then
            npm ci --no-audit --no-fund --loglevel=error
        fi
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    bench)
        setup "[test]"
        name="${1:?usage: ./run.sh bench NAME [options]}"
        shift
        exec "$VENV/bin/python" -m "bench.$name" "$@"
        ;;
    *)
        echo "usage: ./run.sh dev | ./run.sh test | ./run.sh bench NAME" >&2
        exit 2
        ;;
esac
