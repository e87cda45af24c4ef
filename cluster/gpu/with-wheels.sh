#!/usr/bin/env bash
# Run a Python script of this tree on a GPU host without network access, with the packages of
# `make gpu-wheels` (build/gpu-wheels/site.tar.xz): unpack the archive to a temporary folder, put it
# and the source tree on PYTHONPATH (nothing is pip-installed; the host's own torch and friends are
# used), run the script, tee its output to <out>/<script>.log, where <out> is the output folder given
# by the OUT environment variable (optional; default build/gpu-check). OUT is exported to the script.
#   usage: cluster/gpu/with-wheels.sh ARCHIVE SCRIPT|-m MODULE [ARGS...]   (GPU_PYTHON picks the interpreter)
set -euo pipefail
archive=$1
script=$2
shift 2
root=$(cd "$(dirname "$0")/../.." && pwd)
python=${GPU_PYTHON:-python3}
out=${OUT:-$root/build/gpu-check}
if [ ! -f "$archive" ]; then
    echo "error: no $archive here; run \`make gpu-wheels\` on a machine with the package index first" >&2
    exit 2
fi
mkdir -p "$out"
scratch=$(mktemp -d "${TMPDIR:-/tmp}/synfer-gpu-XXXXXX")
trap 'rm -rf "$scratch"' EXIT
began=$(date +%s)
site=$("$python" "$root/cluster/gpu/wheels.py" unpack "$archive" "$scratch")
echo "unpacked in $(( $(date +%s) - began )) s" >&2
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
export OUT="$out"
cd "$root"
status=0
log=$(basename "$script" .py)
[ "$script" = -m ] && log=$1  # `with-wheels.sh ARCHIVE -m pytest ...`
"$python" "$script" "$@" 2>&1 | tee "$out/$log.log" || status=${PIPESTATUS[0]}
exit "$status"
