#!/usr/bin/env bash
# Builds the normd container image from deploy/Dockerfile with podman, offline from any
# container registry, and runs it for real: health through the image's HEALTHCHECK, a model
# created and trained with the image's normctl, /metrics scraped, a graceful stop, a restart
# on the same volume that finds the model again, a 2-rank data-parallel job in one container,
# and the Kubernetes MPIJob of deploy/k8s/mpi as the MPI Operator would run it (a launcher and a
# worker container, rank 1 started over SSH). Prints the image size, the build time and the
# time to healthy.
#
# Run by `make test-image` and by ctest (label "image"). Needs root (rootful podman) and the
# Debian mirror that apt uses; installs podman, runc and mmdebstrap when missing.
#
# The podman flags below are this machine's quirks (no Docker engine, cgroup v1, a sandbox in
# which runc cannot set its default rlimits; host networking and chroot build isolation keep
# the test free of CNI and nested namespaces). They belong here, not in user-facing
# instructions, where plain `docker build` / `docker run` work.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${NORMD_TEST_IMAGE:-localhost/normd:test}
BASE=docker.io/library/debian:bookworm-slim
PODMAN_RUN=(podman --runtime runc run --network host
  --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
T0=$(date +%s%3N)
SUFFIX="$$"
CTR="normd-image-test-$SUFFIX"
WORKER_CTR="normd-image-test-worker-$SUFFIX"
VOL="normd-image-test-data-$SUFFIX"
WORK=$(mktemp -d /tmp/normd-image-test.XXXXXX)

log() {
  local now
  now=$(date +%s%3N)
  printf '[test-image %7.1fs] %s\n' "$(((now - T0)))e-3" "$*"
}
fail() {
  log "FAIL: $*"
  if podman container exists "$CTR" 2>/dev/null; then
    echo "--- container log ---"
    podman logs "$CTR" 2>&1 | tail -40 || true
  fi
  if podman container exists "$WORKER_CTR" 2>/dev/null; then
    echo "--- worker container log ---"
    podman logs "$WORKER_CTR" 2>&1 | tail -40 || true
  fi
  exit 1
}
cleanup() {
  podman rm -f -t 2 -v "$CTR" >/dev/null 2>&1 || true
  podman rm -f -t 2 "$WORKER_CTR" >/dev/null 2>&1 || true
  podman volume rm -f "$VOL" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" -eq 0 ] || fail "needs root (rootful podman); run as root or with sudo"

# --- tools -------------------------------------------------------------------------------------
missing=()
for tool in podman runc mmdebstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- base image: debian:bookworm-slim made from Debian packages --------------------------------
if ! podman image exists "$BASE"; then
  # The Debian mirror apt already uses (one-line or deb822 sources).
  mirror=$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list \
    /etc/apt/sources.list.d/ 2>/dev/null | head -n1 | tr -d ' ' || true)
  mirror=${mirror%/}
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
  log "building $BASE with mmdebstrap from $mirror"
  # minbase with the official slim image's dpkg filters (no docs, man pages or locales), /usr
  # merged by symlinks (not by the usrmerge package, which pulls in perl) and no translated
  # package lists, so image sizes measured here match a real build.
  mmdebstrap --variant=minbase --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/groff/*' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --aptopt='Acquire::Languages "none"' \
    bookworm "$WORK/rootfs.tar" \
    "deb $mirror bookworm main" \
    "deb $mirror bookworm-updates main" \
    "deb $mirror-security bookworm-security main"
  podman import --change 'CMD ["bash"]' "$WORK/rootfs.tar" "$BASE" >/dev/null
  rm -f "$WORK/rootfs.tar"
fi
log "base image $BASE: $(podman image inspect -f '{{.Size}}' "$BASE") bytes"

# --- build ---------------------------------------------------------------------------------
old_id=$(podman image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
t_build=$(date +%s%3N)
# --format docker keeps HEALTHCHECK (the OCI image format has no field for it).
podman build --isolation chroot --pull=never --format docker \
  --build-arg BUILD_JOBS="$(nproc)" -f deploy/Dockerfile -t "$IMAGE" . \
  || fail "podman build"
build_ms=$(($(date +%s%3N) - t_build))
new_id=$(podman image inspect -f '{{.Id}}' "$IMAGE")
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
  podman rmi "$old_id" >/dev/null 2>&1 || true   # the previous test image, now untagged
fi
size=$(podman image inspect -f '{{.Size}}' "$IMAGE")
log "built $IMAGE in $((build_ms / 1000)) s, size $((size / 1024 / 1024)) MiB"

# --- image metadata --------------------------------------------------------------------------
inspect() { podman image inspect -f "$1" "$IMAGE"; }
[ "$(inspect '{{.Config.User}}')" = "10001:10001" ] || fail "image user is not 10001:10001"
inspect '{{json .Config.ExposedPorts}}' | grep -q '"50051/tcp"' || fail "50051 not exposed"
inspect '{{json .Config.ExposedPorts}}' | grep -q '"9464/tcp"' || fail "9464 not exposed"
inspect '{{json .Config.Volumes}}' | grep -q '"/var/lib/normd"' || fail "no data volume"
env_json=$(inspect '{{json .Config.Env}}')
for kv in NORMD_LISTEN=0.0.0.0:50051 NORMD_METRICS=0.0.0.0:9464 NORMD_DATA_DIR=/var/lib/normd; do
  grep -q "\"$kv\"" <<<"$env_json" || fail "image env lacks $kv"
done
inspect '{{json .Config.Healthcheck}}' | grep -q 'normctl.*health' || fail "no HEALTHCHECK"

# Only shared libraries in the runtime stage: nothing unresolved, no toolchain.
# shellcheck disable=SC2016
"${PODMAN_RUN[@]}" --rm --entrypoint /bin/sh "$IMAGE" -c '
  set -e
  ldd /usr/local/bin/normd /usr/local/bin/normctl > /tmp/ldd.txt
  if grep "not found" /tmp/ldd.txt; then exit 11; fi
  for t in c++ g++ gcc cmake make; do if command -v $t; then exit 12; fi; done
  if [ -d /usr/include/grpcpp ]; then exit 13; fi
  test "$(id -u)" = 10001
  test "$(id -gn)" = normd' 2>>"$WORK/podman-run.err" || fail "runtime stage check (exit $?)"
# The image's own configuration passes the server's validation.
"${PODMAN_RUN[@]}" --rm "$IMAGE" --check-config >/dev/null 2>>"$WORK/podman-run.err" \
  || fail "normd --check-config in the image"

# --- run ---------------------------------------------------------------------------------
free_port() {
  /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
GRPC_PORT=$(free_port)
METRICS_PORT=$(free_port)
SERVER=127.0.0.1:$GRPC_PORT

start_container() {
  # The Kubernetes securityContext of deploy/k8s/statefulset.yaml, applied here so the image
  # is proven to run under it: read-only root filesystem with a /tmp tmpfs (the pod's
  # emptyDir), no capabilities, no privilege escalation.
  # stderr kept aside: podman complains that it cannot schedule periodic healthchecks without
  # systemd; the test runs the HEALTHCHECK itself with `podman healthcheck run`.
  "${PODMAN_RUN[@]}" -d --name "$CTR" -v "$VOL:/var/lib/normd" \
    --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
    -e NORMD_LISTEN="$SERVER" -e NORMD_METRICS="127.0.0.1:$METRICS_PORT" "$IMAGE" \
    >/dev/null 2>>"$WORK/podman-run.err"
}
normctl() { podman exec -i "$CTR" normctl --server "$SERVER" "$@"; }

t_run=$(date +%s%3N)
start_container || fail "podman run"
t_started=$(date +%s%3N)
until podman healthcheck run "$CTR" >/dev/null 2>&1; do
  [ "$(podman inspect -f '{{.State.Running}}' "$CTR")" = true ] || fail "container exited"
  [ $(($(date +%s%3N) - t_run)) -lt 60000 ] || fail "not healthy within 60 s"
  sleep 0.1
done
healthy_ms=$(($(date +%s%3N) - t_run))
log "healthy $healthy_ms ms after podman run ($((t_started - t_run)) ms to start the container)"

# A model created and trained with the image's normctl, from a spec and CSV streamed into the
# container's /tmp.
cat > "$WORK/spec.json" <<'EOF'
{
  "inputShape": ["4"],
  "layers": [
    {"name": "fc1", "linear": {"inFeatures": "4", "outFeatures": "16"}},
    {"name": "bn1", "batchNorm1d": {"numFeatures": "16"}},
    {"name": "act1", "relu": {}},
    {"name": "head", "linear": {"inFeatures": "16", "outFeatures": "2"}}
  ],
  "loss": "LOSS_CROSS_ENTROPY",
  "optimizer": {"sgd": {"lr": 0.1, "momentum": 0.9}},
  "seed": "3"
}
EOF
/usr/bin/python3 - "$WORK/train.csv" <<'EOF'
import random, sys
random.seed(5)
with open(sys.argv[1], "w") as f:
    f.write("x0,x1,x2,x3,label\n")
    for _ in range(256):
        x = [random.gauss(0, 1) for _ in range(4)]
        f.write(",".join(f"{v:.5f}" for v in x) + f",{int(x[0] + x[1] > 0)}\n")
EOF
podman exec -i "$CTR" sh -c 'cat > /tmp/spec.json' < "$WORK/spec.json" || fail "copy spec"
podman exec -i "$CTR" sh -c 'cat > /tmp/train.csv' < "$WORK/train.csv" || fail "copy csv"
normctl create --spec /tmp/spec.json --id image-test || fail "normctl create"
normctl train image-test --data /tmp/train.csv --label-column label --epochs 2 --batch 32 \
  --progress lines || fail "normctl train"
model_step() {  # the model's step as normctl in the container reports it
  normctl get image-test --json | /usr/bin/python3 -c \
    'import json, sys; print(int(json.load(sys.stdin).get("step", 0)))'
}
step=$(model_step) || fail "normctl get"
log "model image-test at step $step"
[ "$step" -eq 16 ] || fail "expected step 16 (2 epochs x 8 batches of 32), got $step"

# Metrics from the image's exporter.
curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" > "$WORK/metrics.txt" || fail "scrape /metrics"
steps=$(awk '/^normd_train_steps_total\{.*model="image-test"/ { print $2 }' "$WORK/metrics.txt")
log "scraped $(grep -c '^normd_' "$WORK/metrics.txt") normd_* samples; train steps of image-test: ${steps:-none}"
[ "${steps%.*}" = "$step" ] || fail "normd_train_steps_total{model=\"image-test\"} is '${steps:-missing}', expected $step"
for m in normd_build_info normd_models normd_samples_total normd_rpc_duration_seconds_bucket \
         normd_bn_mean_shift_count process_resident_memory_bytes; do
  grep -q "^$m" "$WORK/metrics.txt" || fail "metric $m missing"
done

# Graceful stop: SIGTERM to normd (PID 1) drains and exits 0 well before podman's SIGKILL.
t_stop=$(date +%s%3N)
podman stop -t 30 "$CTR" >/dev/null 2>>"$WORK/podman-run.err" || fail "podman stop"
stop_ms=$(($(date +%s%3N) - t_stop))
code=$(podman inspect -f '{{.State.ExitCode}}' "$CTR")
log "stopped in $stop_ms ms, exit code $code"
[ "$code" = 0 ] || fail "normd exited with $code on SIGTERM"
podman rm "$CTR" >/dev/null 2>>"$WORK/podman-run.err"

# Same volume, new container: the model is restored from its checkpoint, as non-root.
start_container || fail "podman run (restart)"
until podman healthcheck run "$CTR" >/dev/null 2>&1; do
  [ "$(podman inspect -f '{{.State.Running}}' "$CTR")" = true ] || fail "restarted container exited"
  sleep 0.1
done
step2=$(model_step) || fail "model image-test not restored from the volume"
[ "$step2" = "$step" ] || fail "restored model is at step $step2, expected $step"
log "restarted on the same volume: image-test restored at step $step2"
podman stop -t 30 "$CTR" >/dev/null 2>>"$WORK/podman-run.err"
podman rm "$CTR" >/dev/null 2>>"$WORK/podman-run.err"

# The same image as a data-parallel job of 2 ranks (normd-mpirun, Open MPI inside the image) on
# the same volume: rank 0 restores the model and hands it to rank 1, trains on, both replicas
# stay identical, and a stop drains, saves and exits 0.
"${PODMAN_RUN[@]}" -d --name "$CTR" -v "$VOL:/var/lib/normd" \
  --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
  -e NORMD_LISTEN="$SERVER" -e NORMD_METRICS="127.0.0.1:$METRICS_PORT" \
  -e NORMD_COMPUTE_THREADS=1 --entrypoint /usr/local/bin/normd-mpirun "$IMAGE" \
  -np 2 --oversubscribe --mca btl self,vader --mca btl_vader_single_copy_mechanism none \
  /usr/local/bin/normd \
  >/dev/null 2>>"$WORK/podman-run.err" || fail "podman run (2-rank job)"
t_job=$(date +%s%3N)
until podman healthcheck run "$CTR" >/dev/null 2>&1; do
  [ "$(podman inspect -f '{{.State.Running}}' "$CTR")" = true ] || fail "the job exited"
  [ $(($(date +%s%3N) - t_job)) -lt 60000 ] || fail "the job was not healthy within 60 s"
  sleep 0.1
done
[ "$(model_step)" = "$step" ] || fail "the job restored image-test at step $(model_step)"
# /tmp is a tmpfs of the container: the CSV goes in again.
podman exec -i "$CTR" sh -c 'cat > /tmp/train.csv' < "$WORK/train.csv" || fail "copy csv (job)"
normctl train image-test --data /tmp/train.csv --label-column label --epochs 1 --batch 32 \
  --progress lines || fail "normctl train (2-rank job)"
step3=$(model_step)
[ "$step3" -eq $((step + 8)) ] || fail "the job's model is at step $step3, expected $((step + 8))"
normctl replicas | tee "$WORK/replicas.txt" || fail "normctl replicas: the ranks differ"
grep -q "world size: 2" "$WORK/replicas.txt" || fail "the job is not 2 ranks"
podman stop -t 30 "$CTR" >/dev/null 2>>"$WORK/podman-run.err" || fail "podman stop (job)"
code=$(podman inspect -f '{{.State.ExitCode}}' "$CTR")
[ "$code" = 0 ] || fail "the job exited with $code on SIGTERM"
podman rm "$CTR" >/dev/null 2>>"$WORK/podman-run.err"
log "2-rank job in the image: restored step $step, trained to $step3, replicas identical, exit 0"

# --- the Kubernetes MPIJob, without a cluster ---------------------------------------------------
# deploy/k8s/mpi run as the MPI Operator runs it, in two containers of the image: a worker with the
# manifest's command line, user and confinement (the unprivileged sshd), a launcher with the
# manifest's command and arguments (normd-mpirun, rank 0), and what the operator adds between them:
# its kind of SSH key (ECDSA P-521, PEM) laid out as its Secret volume (id_rsa, id_rsa.pub,
# authorized_keys; root's, mode 0644) at sshAuthMountPath in both, a hostfile at /etc/mpi/hostfile
# naming the two pods, and the OMPI_MCA_* variables it sets on the launcher. The pods' names resolve
# to 127.0.0.1 (the launcher: Open MPI finds it local and starts rank 0 itself) and 127.0.0.2 (the
# worker: mpirun starts rank 1 through its sshd, on the port the image's ssh client configuration
# names). Loopback only: the worker's sshd also gets `-o ListenAddress=127.0.0.2` (the host's
# network is shared) and Open MPI's TCP traffic is kept on lo.
t_k8s=$(date +%s%3N)
k8s_vars=$(/usr/bin/python3 - deploy/k8s/mpi <<'EOF'
import os, shlex, sys
import yaml
docs = []
for name in ("mpijob.yaml", "configmap.yaml"):
    with open(os.path.join(sys.argv[1], name)) as f:
        docs += [d for d in yaml.safe_load_all(f) if d]
job = next(d for d in docs if d["kind"] == "MPIJob")
config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
launcher = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]
worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
def out(name, *values):
    print(f"{name}=({' '.join(shlex.quote(str(v)) for v in values)})")
def user(spec):
    return f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}"
lc, wc = launcher["containers"][0], worker["containers"][0]
out("K8S_LAUNCHER_CMD", *lc["command"], *lc.get("args", []))
out("K8S_WORKER_CMD", *wc["command"], *wc.get("args", []))
out("K8S_LAUNCHER_USER", user(launcher))
out("K8S_WORKER_USER", user(worker))
out("K8S_SSH_MOUNT", job["spec"]["sshAuthMountPath"])
out("K8S_SSH_PORT", next(p["containerPort"] for p in wc["ports"] if p["name"] == "ssh"))
out("K8S_SLOTS", job["spec"]["slotsPerWorker"])
out("K8S_ENV", *(f"{k}={v}" for k, v in config.items()
                 if k not in ("NORMD_LISTEN", "NORMD_METRICS")))
EOF
) || fail "reading deploy/k8s/mpi"
eval "$k8s_vars"
mkdir -m 0755 "$WORK/ssh" "$WORK/mpi"
"${PODMAN_RUN[@]}" --rm --user 0 -v "$WORK/ssh:/keys" --entrypoint ssh-keygen "$IMAGE" \
  -q -t ecdsa -b 521 -m PEM -N '' -C '' -f /keys/id_rsa 2>>"$WORK/podman-run.err" \
  || fail "ssh-keygen in the image"
cp "$WORK/ssh/id_rsa.pub" "$WORK/ssh/authorized_keys"
chown root:root "$WORK/ssh"/* && chmod 0644 "$WORK/ssh"/*
printf '%s slots=%s\n' normd-launcher.normd.default.svc "${K8S_SLOTS[0]}" \
  normd-worker-0.normd.default.svc "${K8S_SLOTS[0]}" > "$WORK/mpi/hostfile"
chmod 0444 "$WORK/mpi/hostfile"
k8s_env=()
# shellcheck disable=SC2153  # K8S_* are set by the eval above
for kv in "${K8S_ENV[@]}"; do k8s_env+=(-e "$kv"); done
"${PODMAN_RUN[@]}" -d --name "$WORKER_CTR" --user "${K8S_WORKER_USER[0]}" \
  --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
  -v "$WORK/ssh:${K8S_SSH_MOUNT[0]}:ro" "${k8s_env[@]}" -e K_MPI_JOB_ROLE=worker \
  --entrypoint "${K8S_WORKER_CMD[0]}" "$IMAGE" "${K8S_WORKER_CMD[@]:1}" \
  -o ListenAddress=127.0.0.2 >/dev/null 2>>"$WORK/podman-run.err" || fail "podman run (worker)"
# The worker's startup probe: its sshd accepts connections on the manifest's port.
until (exec 3<>"/dev/tcp/127.0.0.2/${K8S_SSH_PORT[0]}") 2>/dev/null; do
  [ "$(podman inspect -f '{{.State.Running}}' "$WORKER_CTR")" = true ] \
    || fail "the worker's sshd exited"
  [ $(($(date +%s%3N) - t_k8s)) -lt 30000 ] \
    || fail "the worker's sshd is not listening on ${K8S_SSH_PORT[0]}"
  sleep 0.1
done
log "MPIJob worker: sshd listening on ${K8S_SSH_PORT[0]}, $(($(date +%s%3N) - t_k8s)) ms in"
"${PODMAN_RUN[@]}" -d --name "$CTR" --user "${K8S_LAUNCHER_USER[0]}" -v "$VOL:/var/lib/normd" \
  --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
  -v "$WORK/ssh:${K8S_SSH_MOUNT[0]}:ro" -v "$WORK/mpi:/etc/mpi:ro" \
  --add-host normd-launcher.normd.default.svc:127.0.0.1 \
  --add-host normd-worker-0.normd.default.svc:127.0.0.2 \
  "${k8s_env[@]}" -e NORMD_LISTEN="$SERVER" -e NORMD_METRICS="127.0.0.1:$METRICS_PORT" \
  -e K_MPI_JOB_ROLE=launcher -e OMPI_MCA_orte_keep_fqdn_hostnames=true \
  -e OMPI_MCA_orte_default_hostfile=/etc/mpi/hostfile \
  -e OMPI_MCA_plm_rsh_args="-o ConnectionAttempts=10" \
  -e OMPI_MCA_orte_set_default_slots="${K8S_SLOTS[0]}" \
  -e OMPI_MCA_btl_tcp_if_include=lo -e OMPI_MCA_oob_tcp_if_include=lo \
  --entrypoint "${K8S_LAUNCHER_CMD[0]}" "$IMAGE" "${K8S_LAUNCHER_CMD[@]:1}" \
  >/dev/null 2>>"$WORK/podman-run.err" || fail "podman run (launcher)"
until podman healthcheck run "$CTR" >/dev/null 2>&1; do
  [ "$(podman inspect -f '{{.State.Running}}' "$CTR")" = true ] || fail "the launcher exited"
  [ $(($(date +%s%3N) - t_k8s)) -lt 60000 ] || fail "the launcher was not healthy within 60 s"
  sleep 0.1
done
log "MPIJob launcher: healthy, $(($(date +%s%3N) - t_k8s)) ms in"
procs() {  # the command names of a container's processes
  podman exec "$1" sh -c 'cat /proc/[0-9]*/comm' 2>/dev/null | sort
}
worker_procs=$(procs "$WORKER_CTR")
[ "$(grep -cx normd <<<"$worker_procs")" = 1 ] || fail "no rank in the worker container"
grep -qx orted <<<"$worker_procs" || fail "no orted in the worker container"
[ "$(procs "$CTR" | grep -cx normd)" = 1 ] || fail "the launcher does not run exactly rank 0"
[ "$(model_step)" = "$step3" ] || fail "the MPIJob restored image-test at step $(model_step)"
podman exec -i "$CTR" sh -c 'cat > /tmp/train.csv' < "$WORK/train.csv" || fail "copy csv (MPIJob)"
normctl train image-test --data /tmp/train.csv --label-column label --epochs 1 --batch 32 \
  --progress lines || fail "normctl train (MPIJob)"
step4=$(model_step)
[ "$step4" -eq $((step3 + 8)) ] \
  || fail "the MPIJob's model is at step $step4, expected $((step3 + 8))"
normctl replicas | tee "$WORK/replicas.txt" || fail "normctl replicas (MPIJob): the ranks differ"
grep -q "world size: 2" "$WORK/replicas.txt" || fail "the MPIJob is not 2 ranks"
t_job_stop=$(date +%s%3N)
podman stop -t 30 "$CTR" >/dev/null 2>>"$WORK/podman-run.err" || fail "podman stop (launcher)"
code=$(podman inspect -f '{{.State.ExitCode}}' "$CTR")
[ "$code" = 0 ] || fail "the MPIJob's launcher exited with $code on SIGTERM"
# (Outputs are captured before grep -q reads them: with pipefail, a grep that stops at its first
# match can fail the pipeline with the writer's SIGPIPE.)
! grep -qx normd <<<"$(procs "$WORKER_CTR")" || fail "the worker's rank outlived the job"
log "MPIJob launcher: stopped in $(($(date +%s%3N) - t_job_stop)) ms"
worker_log=$(podman logs "$WORKER_CTR" 2>&1)
grep -q "Accepted publickey for normd" <<<"$worker_log" \
  || fail "the worker's sshd did not log the job key's login"
podman rm "$CTR" >/dev/null 2>>"$WORK/podman-run.err"
podman rm -f -t 2 "$WORKER_CTR" >/dev/null 2>>"$WORK/podman-run.err"
k8s_ms=$(($(date +%s%3N) - t_k8s))
log "MPIJob (launcher + worker over ssh on port ${K8S_SSH_PORT[0]}): restored step $step3," \
  "trained to $step4, replicas identical, exit 0, in $k8s_ms ms"

log "PASS: image $IMAGE size $((size / 1024 / 1024)) MiB ($size bytes), build $((build_ms / 1000)) s, healthy in $healthy_ms ms, stop $stop_ms ms"
