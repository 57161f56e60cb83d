#!/usr/bin/env bash
# The container path, for real, on this machine (on demand, not in the test suite: ~10 min the
# first time, 8 of them building images; ~2.5-3.5 min once they are built): builds the site and server images, starts a TLS
# federation of containers on 127.0.0.1 (SuperLink with node authentication, three SuperNodes each
# with its SuperExec, the ServerApp's SuperExec), runs the site preflight inside the site image,
# runs one stage to completion, checks results.json and that the site whose node config demands
# DP-SGD refused the dp=off run while the run went on without it. Stops everything it started, by
# container id; exits non-zero when any step fails.
#
#   bash deploy/containers/check.sh          # from the repository root, in its environment
#
# No container registry is reachable here, so Flower's images are replaced by stand-ins built
# locally with the same layout and entry points (standin/Containerfile on a debootstrap'ed Debian),
# passed to the app's Containerfile through its BASE_IMAGE build argument. PyTorch's CPU index is
# not reachable either: the images get PyPI's (CUDA) torch build of the lock, from this machine's
# disk where it lies there. Podman runs with runc (crun refuses this kernel's cgroups) and the
# host network.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
WORK=${CHECK_WORK:-/var/tmp/meduniverse-containers}
PORT=${CHECK_PORT:-29192}  # the SuperLink's one port; SuperNodes' runtime APIs are PORT+2..PORT+4
FLWR_VERSION=1.42.0
STANDIN=localhost/meduniverse-standin
SITE_IMAGE=localhost/meduniverse-site:check
SERVER_IMAGE=localhost/meduniverse-server:check
PYTHON=${PYTHON:-python3}
RUN_ID=check-$$
# this sandbox refuses raising these rlimits (podman's defaults are higher than its own)
LIMITS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=32768:32768)
PODMAN=(podman --runtime runc)
CONTAINERS=()
VOLUMES=()

step() { printf '\n== %s (%ds)\n' "$*" "$SECONDS"; }
fail() { echo "check.sh: FAILED: $*" >&2; exit 1; }

cleanup() {
    local status=$?
    if ((${#CONTAINERS[@]})); then
        for id in "${CONTAINERS[@]}"; do  # logs first: they are what a failure is read from
            "${PODMAN[@]}" logs "$id" > "$WORK/logs/${id:0:12}.log" 2>&1 || true
        done
        "${PODMAN[@]}" stop -t 10 "${CONTAINERS[@]}" > /dev/null 2>&1 || true
        "${PODMAN[@]}" rm -f -v "${CONTAINERS[@]}" > /dev/null 2>&1 || true
    fi
    if ((${#VOLUMES[@]})); then
        podman volume rm -f "${VOLUMES[@]}" > /dev/null 2>&1 || true
    fi
    echo "stopped ${#CONTAINERS[@]} containers and ${#VOLUMES[@]} volumes this check started; logs in $WORK/logs"
    ((status == 0)) && echo "check.sh: passed in ${SECONDS}s" || echo "check.sh: exit $status after ${SECONDS}s" >&2
}
trap cleanup EXIT

start() {  # start <name> <podman run arguments...>: detached, host network, id recorded for cleanup
    local name=$1 id
    shift
    id=$("${PODMAN[@]}" run -d --name "$RUN_ID-$name" --network host "${LIMITS[@]}" "$@") \
        || fail "could not start $name"
    CONTAINERS+=("$id")
    echo "$name: ${id:0:12}"
}

step "tools: podman, runc, debootstrap"
if ! command -v podman > /dev/null || ! command -v runc > /dev/null || ! command -v debootstrap > /dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap > /dev/null
fi
"$PYTHON" -c "import deploy.launch, flwr" 2> /dev/null \
    || fail "run from the project's environment (pip install .): $PYTHON cannot import deploy.launch and flwr"
rm -rf "$WORK/logs" && mkdir -p "$WORK/logs"
BUILD=(build --pull=never --network host "${LIMITS[@]}"
       -v /etc/ssl/certs/ca-certificates.crt:/run/pip-ca.crt:ro --build-arg PIP_CERT=/run/pip-ca.crt)

step "stand-ins for Flower's images (flwr/superlink, flwr/supernode, flwr/superexec $FLWR_VERSION)"
if ! podman image exists "$STANDIN/base:$FLWR_VERSION"; then
    if ! podman image exists "$STANDIN/debian:bookworm"; then
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libsqlite3-0 \
            bookworm "$WORK/rootfs" http://deb.debian.org/debian > "$WORK/logs/debootstrap.log" \
            || fail "debootstrap (log: $WORK/logs/debootstrap.log)"
        tar -C "$WORK/rootfs" -c . | podman import - "$STANDIN/debian:bookworm" > /dev/null
        rm -rf "$WORK/rootfs"
    fi
    "${PODMAN[@]}" "${BUILD[@]}" --build-arg FLWR_VERSION="$FLWR_VERSION" -t "$STANDIN/base:$FLWR_VERSION" \
        deploy/containers/standin > "$WORK/logs/build-standin.log" 2>&1 \
        || fail "stand-in base image (log: $WORK/logs/build-standin.log)"
fi
for component in superlink supernode superexec; do  # Flower's images: the base plus one entry point
    printf 'ARG BASE\nFROM ${BASE}\nENTRYPOINT ["flower-%s"]\n' "$component" \
        | "${PODMAN[@]}" build --pull=never -q --build-arg BASE="$STANDIN/base:$FLWR_VERSION" \
            -t "$STANDIN/$component:$FLWR_VERSION" -f - deploy/containers/standin > /dev/null
done

step "the app images on the stand-in SuperExec (deploy/containers/Containerfile)"
for target in site server; do
    image=$SITE_IMAGE && [[ $target == server ]] && image=$SERVER_IMAGE
    started=$SECONDS
    "${PODMAN[@]}" "${BUILD[@]}" -v /opt/pypi-more/files:/wheels:ro --build-arg PIP_FIND_LINKS=/wheels \
        --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
        --build-arg BASE_IMAGE="$STANDIN/superexec:$FLWR_VERSION" \
        -f deploy/containers/Containerfile --target "$target" -t "$image" . > "$WORK/logs/build-$target.log" 2>&1 \
        || fail "$target image (log: $WORK/logs/build-$target.log)"
    echo "$image: built in $((SECONDS - started))s, $(podman image inspect --format '{{.Size}}' "$image" \
        | awk '{printf "%.2f GB", $1 / 1e9}')"
done

step "certificates, node keys and three tiny sites"
rm -rf "$WORK/run" && mkdir -p "$WORK/run"/{state,outputs,flwr-home}
RUNDIR=$WORK/run
"$PYTHON" deploy/make_certs.py --out "$RUNDIR/secrets" --hosts localhost,127.0.0.1 --nodes 3 > /dev/null
"$PYTHON" - "$RUNDIR" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from conftest import write_medmnist  # the tests' tiny MedMNIST-layout files: no download

for index, flag in enumerate(["pneumoniamnist", "bloodmnist", "organamnist"]):
    site = Path(sys.argv[1]) / f"site-{index}"
    site.mkdir()
    write_medmnist(site, flag, n=(64, 24, 24), seed=index)
    # the site's node config: the file its SuperNode and its preflight both read
    floor = 'require-dp = "example"\nmax-epsilon = 8.0\n' if index == 2 else ""
    (site / "node-config.toml").write_text(
        f'dataset = "medmnist:/data/{flag}.npz"\ndata-root = "/data"\ncache-dir = "/var/lib/meduniverse"\n' + floor)
EOF
# the containers run as Flower's user `app` (uid 49999): it reads the keys and data, writes state
chown -R 49999:49999 "$RUNDIR/secrets" "$RUNDIR/state" "$RUNDIR/outputs"
chmod -R a+rX "$RUNDIR"/site-*

step "SuperLink (TLS, node authentication, state on disk) on 127.0.0.1:$PORT"
CERTS=(-v "$RUNDIR/secrets/ca.crt:/app/certificates/ca.crt:ro")
start superlink "${CERTS[@]}" -v "$RUNDIR/secrets/server.pem:/app/certificates/server.pem:ro" \
    -v "$RUNDIR/secrets/server.key:/app/certificates/server.key:ro" -v "$RUNDIR/state:/app/state" \
    "$STANDIN/superlink:$FLWR_VERSION" --host=127.0.0.1 --port="$PORT" --isolation=process \
    --ssl-ca-certfile=certificates/ca.crt --ssl-certfile=certificates/server.pem \
    --ssl-keyfile=certificates/server.key --enable-supernode-auth --database=state/state.db \
    --disable-runtime-dependency-installation
export FLWR_HOME=$RUNDIR/flwr-home
"$PYTHON" - "127.0.0.1:$PORT" "$RUNDIR/secrets/ca.crt" <<'EOF'
import sys
from pathlib import Path

from deploy.flwr_cli import write_connection
from deploy.preflight import _superlink

for _ in range(120):  # the SuperLink answers a TLS handshake once it is up
    if not _superlink(sys.argv[1], Path(sys.argv[2]), False):
        break
    __import__("time").sleep(0.5)
else:
    sys.exit("the SuperLink did not come up in 60 s")
EOF
"$PYTHON" -m deploy.launch connect containers --superlink "127.0.0.1:$PORT" --ca "$RUNDIR/secrets/ca.crt"
"$PYTHON" -m deploy.launch register containers "$RUNDIR"/secrets/node-{0,1,2}.pub

step "the ServerApp's SuperExec (server image, read-only, outputs volume)"
start superexec-serverapp --read-only "${CERTS[@]}" -v "$RUNDIR/outputs:/app/outputs" "$SERVER_IMAGE" \
    --runtime-api-address="127.0.0.1:$PORT" --root-certificates=certificates/ca.crt

for index in 0 1 2; do
    node_port=$((PORT + 2 + index))
    site=$RUNDIR/site-$index
    cache=$RUN_ID-site-$index-cache
    podman volume create "$cache" > /dev/null && VOLUMES+=("$cache")
    SITE_MOUNTS=(--read-only -v "$site:/data:ro" -v "$cache:/var/lib/meduniverse"
                 -v "$site/node-config.toml:/app/node-config.toml:ro")
    KEY=(-v "$RUNDIR/secrets/node-$index:/app/keys/node:ro")
    step "site $index: preflight in the site image, then its SuperNode and SuperExec"
    "${PODMAN[@]}" run --rm --network host "${LIMITS[@]}" "${SITE_MOUNTS[@]}" "${CERTS[@]}" "${KEY[@]}" \
        --entrypoint python "$SITE_IMAGE" -m deploy.launch check --superlink "127.0.0.1:$PORT" \
        --ca /app/certificates/ca.crt --key /app/keys/node --node-config /app/node-config.toml \
        | tee "$WORK/logs/check-site-$index.log"
    grep -q "^check: .* ready" "$WORK/logs/check-site-$index.log" || fail "site $index preflight"
    start "supernode-$index" "${CERTS[@]}" "${KEY[@]}" -v "$site/node-config.toml:/app/node-config.toml:ro" \
        "$STANDIN/supernode:$FLWR_VERSION" --superlink="127.0.0.1:$PORT" \
        --root-certificates=certificates/ca.crt --auth-supernode-private-key=keys/node --isolation=process \
        --host=127.0.0.1 --port="$node_port" --node-config=/app/node-config.toml
    start "superexec-clientapp-$index" "${SITE_MOUNTS[@]}" "$SITE_IMAGE" \
        --runtime-api-address="127.0.0.1:$node_port" --insecure
done

step "three SuperNodes online"
"$PYTHON" - <<'EOF'
import os
import sys
import time

from deploy.flwr_cli import flower_env, supernodes

deadline = time.monotonic() + 120
while sum(node["status"] == "online" for node in supernodes(flower_env(), "containers")) < 3:
    if time.monotonic() > deadline:
        sys.exit("fewer than 3 SuperNodes online after 120 s")
    time.sleep(1)
print("3 SuperNodes online")
EOF

step "one stage, dp=off: sites 0 and 1 train, site 2 (require-dp) refuses"
# the run's app bundle from the app's own files only: `flwr run .` in a working tree also packs
# whatever else lies there (an experiment's outputs; a file name with a comma breaks Flower
# 1.42's bundle hash list, and the ServerApp exits 201)
mkdir -p "$RUNDIR/app" && cp -r pyproject.toml README.md LICENSE meduniverse_flwr "$RUNDIR/app/"
find "$RUNDIR/app" -name __pycache__ -prune -exec rm -rf {} +
started=$SECONDS
(cd "$RUNDIR/app" && timeout 900 flwr run . containers --stream --run-config "schedule='every-stage' num-stages=1 clients-per-stage=3 min-replies=2 \
eval-mode='linear-probe' eval-epochs=1 eval-labels=0 aggregation='weighted' local-epochs=1 probe-epochs=2 batch-size=32 pretrain='none' stage-timeout=600.0 output-dir='/app/outputs'" \
    > "$WORK/logs/flwr-run.log" 2>&1) || fail "flwr run (log: $WORK/logs/flwr-run.log)"
echo "run: $((SECONDS - started))s"
"$PYTHON" - "$RUNDIR/outputs" <<'EOF'
import json
import sys
from pathlib import Path

found = sorted(Path(sys.argv[1]).glob("*/results.json"))
if not found:
    sys.exit(f"no results.json under {sys.argv[1]}")
results = json.loads(found[-1].read_text())
stages = results["stages"]
last = stages[-1]
print(f"{found[-1]}: stages {[s['stage'] for s in stages]}, participants {last['participants']}, "
      f"rejected {last.get('rejected')}")
problems = []
if [s["stage"] for s in stages] != [0, 1]:
    problems.append("expected stages 0 and 1")
if sorted(last["participants"]) != ["bloodmnist", "pneumoniamnist"]:
    problems.append("expected the two sites without a privacy floor to make the stage")
if "privacy floor" not in json.dumps(last.get("rejected")):
    problems.append("expected the require-dp site's refusal (site privacy floor) among the rejected")
if any(task["accuracy"] is None for task in last["per_task"].values()):
    problems.append("a task has no evaluation")
if problems:
    sys.exit("results.json: " + "; ".join(problems))
print("results.json: one stage, two sites trained, the DP-demanding site refused dp=off; every task evaluated")
EOF
