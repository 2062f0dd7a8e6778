#!/usr/bin/env bash
# Install the peer routers that `turbofleet bench compare|overhead` measures against, into their own venv
# (default .venv-peers beside the repo root) so their pins never touch the project's .venv.
#   bash bench/install_peers.sh [VENV_DIR]
# - sglang-router (SGLang model gateway) and vllm-router: plain PyPI wheels with a Rust binary inside.
# - lmdeploy's proxy: the lmdeploy wheel without its GPU dependencies, then only what `lmdeploy serve proxy`
#   imports; torch is imported at start-up, a CPU build is enough (torch==2.13.0 lies on disk on these boxes).
set -euo pipefail
VENV="${1:-.venv-peers}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# Keep git from seeing the venv without editing the repo's .gitignore (what Python 3.13's venv does itself).
echo '*' > "$VENV/.gitignore"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
$PIP install --quiet sglang-router vllm-router
$PIP install --quiet --no-deps lmdeploy
$PIP install --quiet torch==2.13.0
$PIP install --quiet fastapi uvicorn aiohttp requests pydantic shortuuid fire pyyaml tqdm transformers \
    mmengine-lite psutil pybase64 pillow
for exe in sglang-router vllm-router lmdeploy; do
    if [ -x "$VENV/bin/$exe" ]; then echo "ok: $VENV/bin/$exe"; else echo "missing: $exe" >&2; fi
done
"$VENV/bin/lmdeploy" serve proxy --help > /dev/null && echo "ok: lmdeploy serve proxy imports"
