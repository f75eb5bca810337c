#!/usr/bin/env bash
# Run the poise benchmark: installs nginx-light, haproxy and wrk when they are missing (only when
# running as root, via apt-get), then runs `python bench/run.py "$@"` from the project root.
#   bench/bench.sh --scenarios small --duration 8 --warmup 2
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

missing=()
have nginx || missing+=(nginx-light)
have haproxy || missing+=(haproxy)
have wrk || missing+=(wrk)

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bench.sh: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y "${missing[@]}" || { apt-get update && apt-get install -y "${missing[@]}"; }
    else
        echo "bench.sh: missing ${missing[*]}; as root run: apt-get install -y ${missing[*]}" >&2
    fi
fi

python="${PYTHON:-$(command -v python || command -v python3)}"
exec "$python" bench/run.py "$@"
