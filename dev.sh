#!/usr/bin/env bash
# One-command set-up and run on a fresh machine (needs only python3 and the package registries).
#   ./dev.sh chat [ARGS]   install what is needed, then chat with the default model
#   ./dev.sh test [ARGS]   install what is needed (test extras too), then run ruff and the whole test suite
#   ./dev.sh qianwen ...   any other qianwen command inside the project's environment
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
    "$VENV/bin/ruff" check qianwen tests benchmarks
    set +e
    "$VENV/bin/python" -m pytest -q "$@"
    rc=$?
    [ $rc -eq 5 ] && { echo "no tests ran" >&2; exit 1; }
    exit $rc ;;
  qianwen)
    exec "$VENV/bin/qianwen" "$@" ;;
  *)
    echo "usage: ./dev.sh chat|test|qianwen [ARGS]" >&2; exit 2 ;;
esac
