#!/usr/bin/env bash
# The benchmark suite on Python 3.14 (OFFLOAD_PY=3.15 for 3.15) from Debian sid, in the chroot
# of .ci/py314.sh (Linux, root): installs this checkout with the `all` extra and the `bench`
# dependency group into that Python's venv there, then runs `python -m benchmarks ARGS...`.
#
#   bash benchmarks/sid.sh --json benchmarks/results/run-3.14.json     (or: nox -s bench-3.14 -- ...)
#
# The chroot has neither Node.js nor git: `piscina` is skipped there with a note, and
# `offload-previous` runs only from a wheel this host has already built (copied in). Paths given to --json/--chart must lie inside the checkout (it is the only
# directory shared with the chroot).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/py314.sh setup
# The chroot has no git to archive the previous release: hand it the wheels already built on
# this host (benchmarks/_external.py's cache), if any; offload-previous is skipped otherwise.
cache=${OFFLOAD_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/offload-bench}
root=${OFFLOAD_SID_ROOT:-/var/tmp/offload-py314}
for wheels in "$cache"/previous-*/wheel; do
  [ -d "$wheels" ] || continue
  into="$root$HOME/.cache/offload-bench/$(basename "$(dirname "$wheels")")"
  mkdir -p "$into"
  cp -r "$wheels" "$into/"
done
# shellcheck disable=SC2016  # expanded inside the chroot
exec bash .ci/py314.sh run sh -c \
  'python -m pip install -qq --disable-pip-version-check -e ".[all]" --group bench && exec python -m benchmarks "$@"' \
  sh "$@"
