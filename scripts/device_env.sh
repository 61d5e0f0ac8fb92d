# Sourced by the scripts for a lent GPU machine (gpu_train.sh, gpu_daemon_check.sh): there torch
# and torchvision are installed but nanoseg is not, and no package index is reachable. Wheels in
# .whl/ (scripts/device_wheels.sh, carried with the working tree) go to /tmp/site, the project's
# packages are linked under their import names, and both are put on PYTHONPATH. Sets: repo, py.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
export NANOSEG_CACHE=${NANOSEG_CACHE:-/tmp/nanoseg-cache} PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
if [ -n "${FORCE_PATHS:-}" ] || ! $py -c "import nanoseg_training" 2>/dev/null; then
    if [ -d "$repo/.whl" ] && [ -z "${NO_WHEELS:-}" ]; then
        $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$repo"/.whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
    fi
    mkdir -p /tmp/pkgs
    ln -sfn "$repo/nanoseg" /tmp/pkgs/nanoseg
    ln -sfn "$repo/offline_training" /tmp/pkgs/nanoseg_training
    ln -sfn "$repo/daemon" /tmp/pkgs/nanoseg_daemon
    ln -sfn "$repo/simulator" /tmp/pkgs/nanoseg_sim
    export PYTHONPATH=/tmp/pkgs:$repo:${PYTHONPATH:-}
fi
nanoseg() { $py -m nanoseg.cli "$@"; }
