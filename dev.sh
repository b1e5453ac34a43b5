#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs torch (the CPU build when
# there is no CUDA) and this package, then runs the main job or the tests.
#   ./dev.sh train [args for scripts/train_mllm.py]   the main job (embedded default: tiny, synthetic, CPU)
#   ./dev.sh test  [pytest args]                      the test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VIQ_VENV:-.venv}
PY="$VENV/bin/python"

setup() {
    if [ ! -x "$PY" ]; then
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
    [ -f "$stamp" ] && return 0
    "$PY" -m pip install -q --upgrade pip
    if ! "$PY" -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            "$PY" -m pip install -q "torch>=2.6"
        else
            # Without CUDA, pin the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
            "$PY" -m pip install -q "torch==2.13.0"
        fi
    fi
    "$PY" -m pip install -q -e ".[dev]"
    touch "$stamp"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    train)
        setup
        case $VENV in /*) export PATH="$VENV/bin:$PATH" ;; *) export PATH="$PWD/$VENV/bin:$PATH" ;; esac
        exec deepspeed scripts/train_mllm.py "$@"
        ;;
    test)
        setup
        # pytest exits 5 when nothing was collected; that must fail, never pass silently.
        exec "$PY" -m pytest "$@"
        ;;
    *)
        echo "usage: ./dev.sh train [train_mllm.py args] | ./dev.sh test [pytest args]" >&2
        exit 2
        ;;
esac
