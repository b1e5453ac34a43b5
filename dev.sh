#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs torch (the CPU build when
# there is no CUDA), this package and the pinned evaluation frameworks (lm-eval, VLMEvalKit),
# then runs the main job or the tests.
#   ./dev.sh train [args for scripts/train_mllm.py]   the main job (embedded default: tiny, synthetic, CPU)
#   ./dev.sh test  [pytest args]                      the test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VIQ_VENV:-.venv}
PY="$VENV/bin/python"

# The evaluation frameworks the tests run inside, pinned; the files say why.
FRAMEWORKS=requirements/eval-frameworks.txt
SNAPSHOTS=requirements/vlmeval.txt

install_eval_frameworks() {
    # Keep whatever torch is installed: the frameworks must never swap the CPU build for CUDA.
    local torch_pin
    torch_pin="torch==$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
    "$PY" -m pip install -q -r "$FRAMEWORKS" -c <(echo "$torch_pin")
    # VLMEvalKit without its declared dependencies (CUDA torch, torchvision, ~60 more).
    local first=1 spec
    grep -v '^\s*\(#\|$\)' "$SNAPSHOTS" | while read -r spec; do
        if [ "$first" = 1 ]; then
            "$PY" -m pip install -q --no-deps "$spec"
            first=0
        else
            local dir="$VENV/vlmeval-snapshots/${spec/==/-}"
            rm -rf "$dir"
            "$PY" -m pip install -q --no-deps --target "$dir" "$spec"
        fi
    done
}

setup() {
    if [ ! -x "$PY" ]; then
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.installed-$(cat pyproject.toml "$FRAMEWORKS" "$SNAPSHOTS" | sha1sum | cut -c1-12)"
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
    install_eval_frameworks
    touch "$stamp"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    train)
        setup
        export PATH="$(cd "$VENV" && pwd)/bin:$PATH"   # VIQ_VENV may be absolute or relative
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
