#!/usr/bin/env bash
# Python 3.14 and 3.15 for the test suite, from Debian sid, in a chroot.
#
# Neither Python is on this machine's pyenv or on PyPI, and no prebuilt Python may be downloaded;
# Debian sid packages both (python3.14, python3.15). This script keeps a minimal sid root made
# with debootstrap outside the checkout (default /var/tmp/offload-py314, so git clean, ruff and
# pytest never see it), one venv per Python inside it, and runs commands there with this
# checkout bind-mounted at the same path.
#
#   .ci/py314.sh check               exit 0 if this machine can do it, else 77 and the reason
#   .ci/py314.sh setup               make the root and the venvs (~2 min the first time; idempotent)
#   .ci/py314.sh test [--python 3.14|3.15] [--extras all,dask] [--] [pytest args...]
#                                    install the checkout (those extras and the `test` dependency
#                                    group) into that Python's venv and run pytest there
#   .ci/py314.sh run CMD [ARGS...]   run any command in the root, in the checkout (venv-3.14 on PATH;
#                                    OFFLOAD_PY=3.15 for the other one)
#   .ci/py314.sh shell               an interactive shell there
#   .ci/py314.sh status              what exists and what is mounted
#   .ci/py314.sh teardown            unmount anything left mounted and delete the root
#
# Needs Linux and root (debootstrap, mount, chroot). Mounts (proc, /dev, /dev/shm, /dev/pts, the
# checkout, pip's local package directories) exist only while a command runs and are undone on
# any exit, error or signal; `teardown` also removes mounts left by a killed run.
#
# No host is named here: the Debian mirror is the one in this machine's apt sources (or
# OFFLOAD_SID_MIRROR), and pip inside the root uses this machine's pip configuration (its config
# files are copied in, its PIP_* variables passed on, uv's index settings translated), so it
# reaches the same package registry.
#
# Environment: OFFLOAD_SID_ROOT (the root's directory), OFFLOAD_SID_MIRROR (a Debian mirror URL
# instead of apt's), OFFLOAD_PY (the Python of `run`/`shell`, default 3.14).
set -euo pipefail

CHECKOUT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
ROOT=${OFFLOAD_SID_ROOT:-/var/tmp/offload-py314}
ROOT=${ROOT%/}
PYTHONS=(3.14 3.15)
VENVS=/opt/offload
# python3.15 is in sid too, so the root carries both. zstandard has no cp315 wheel yet: pip
# builds it from its sdist, hence the C compiler and python3.15-dev.
PACKAGES=python3.14,python3.14-venv,python3.15,python3.15-venv,python3.15-dev,gcc,libc6-dev
# PostgreSQL's server programs for the job-store tests (they start their own server), installed
# with apt after debootstrap, with a policy-rc.d that keeps the packaged cluster from starting.
SERVER_PACKAGES="postgresql"
READY="$ROOT/.offload-ready"
SKIP=77

say() { printf 'py314.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# ---- can this machine do it? -------------------------------------------------------------------

unavailable() {
  # Print why this machine cannot run the root, or nothing if it can.
  if [ "$(uname -s)" != Linux ]; then
    echo "needs Linux (debootstrap, chroot, bind mounts); this is $(uname -s)"
  elif [ "$(id -u)" != 0 ]; then
    echo "needs root (debootstrap, mount, chroot): run as root, e.g. sudo .ci/py314.sh setup"
  elif ! command -v chroot >/dev/null || ! command -v findmnt >/dev/null \
    || ! command -v flock >/dev/null || ! command -v mount >/dev/null; then
    echo "needs chroot, mount, findmnt and flock (coreutils, util-linux)"
  elif [ ! -f "$READY" ] && ! command -v debootstrap >/dev/null && ! command -v apt-get >/dev/null
  then
    echo "needs debootstrap, or apt-get to install it"
  fi
}

require() {
  local why
  why=$(unavailable)
  [ -z "$why" ] || { say "$why"; exit "$SKIP"; }
}

# ---- mounts ------------------------------------------------------------------------------------

mounts_under() {
  # Every mount point at or below $1, deepest first.
  findmnt -rn -o TARGET | awk -v r="$1" '$0 == r || index($0, r "/") == 1' | sort -r
}

unmount_all() {
  local target left
  while IFS= read -r target; do
    target=$(printf '%b' "$target")  # findmnt -r escapes blanks as \x20
    umount "$target" 2>/dev/null || umount -l "$target" 2>/dev/null || say "could not unmount $target"
  done < <(mounts_under "$ROOT")
  left=$(mounts_under "$ROOT")
  [ -z "$left" ] || { say "still mounted: $left"; return 1; }
}

bind() {
  # bind SOURCE [ro]: SOURCE at the same path inside the root.
  local source=$1 target="$ROOT$1"
  if [ -d "$source" ]; then mkdir -p "$target"; else
    mkdir -p "$(dirname "$target")"
    [ -e "$target" ] || : >"$target"
  fi
  mount --bind "$source" "$target"
  if [ "${2:-}" = ro ]; then mount -o remount,bind,ro "$target"; fi
}

CHILD=
stop_child() {
  [ -n "$CHILD" ] || return 0
  kill -TERM "$CHILD" 2>/dev/null || true
  wait "$CHILD" 2>/dev/null || true
}

lock() {
  # One command in the root at a time: mounts are shared and undone when a command ends.
  exec 9>"$ROOT.lock"
  flock 9
}

enter() {
  # Mount what a command needs; undo it on any exit (the trap), including errors and signals.
  lock
  unmount_all  # whatever a killed run left
  trap 'stop_child; unmount_all' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  bind /dev
  [ ! -d /dev/shm ] || bind /dev/shm
  [ ! -d /dev/pts ] || bind /dev/pts
  sync_host_config
  bind "$CHECKOUT"
}

# ---- the host's network and pip configuration ---------------------------------------------------

PIP_ENV=()

sync_host_config() {
  # Copy name resolution, the CA bundle and pip's configuration in; bind pip's local package
  # directories read-only at their own paths; collect the PIP_* variables to pass on.
  local f kind value
  cp -L /etc/resolv.conf /etc/hosts "$ROOT/etc/" 2>/dev/null || true
  for f in /etc/ssl/certs/ca-certificates.crt ${SSL_CERT_FILE:-} ${REQUESTS_CA_BUNDLE:-} \
    /etc/pip.conf "$HOME/.pip/pip.conf" "${XDG_CONFIG_HOME:-$HOME/.config}/pip/pip.conf" \
    ${PIP_CONFIG_FILE:-}; do
    copy_in "$f"
  done
  local IFS=:
  for f in ${XDG_CONFIG_DIRS:-/etc/xdg}; do
    [ ! -d "$f/pip" ] || { mkdir -p "$ROOT$f"; cp -a "$f/pip" "$ROOT$f/"; }
  done
  unset IFS
  PIP_ENV=()
  while IFS=$'\t' read -r kind value; do
    case $kind in
      env) PIP_ENV+=("$value") ;;
      file) copy_in "$value" ;;
      dir) mountpoint -q "$ROOT$value" || bind "$value" ro ;;
    esac
  done < <(pip_settings)
}

copy_in() {
  [ -n "$1" ] && [ -f "$1" ] || return 0
  mkdir -p "$ROOT$(dirname "$1")"
  cp -L "$1" "$ROOT$1"
}

pip_settings() {
  # Lines "env<TAB>NAME=VALUE", "file<TAB>PATH", "dir<TAB>PATH" from pip's configuration, PIP_*
  # and uv's index settings (files and UV_* variables), which pip in the root does not read.
  local python
  python=$(command -v python3 || true)
  [ -n "$python" ] || { env | grep -E '^PIP_' | sed 's/^/env\t/' || true; return 0; }
  local config
  config=$("$python" -m pip config list 2>/dev/null || true)
  OFFLOAD_PIP_CONFIG=$config "$python" - <<'EOF'
import os, re, shlex, sys
try:
    import tomllib
except ImportError:
    tomllib = None

settings = {}  # pip option name -> value (whitespace-separated lists as pip takes them)
for line in os.environ.get("OFFLOAD_PIP_CONFIG", "").splitlines():
    m = re.match(r"[^.]+\.([a-z-]+)=(.*)$", line.strip())
    if m:
        settings[m[1]] = " ".join(shlex.split(m[2]))
env = {k: v for k, v in os.environ.items() if k.startswith("PIP_") and "\n" not in v}
for k, v in env.items():
    settings[k[4:].lower().replace("_", "-")] = v

# uv's settings, where pip has none of its own.
uv = {}
for path in ("/etc/uv/uv.toml", os.path.expanduser("~/.config/uv/uv.toml")):
    if tomllib and os.path.isfile(path):
        with open(path, "rb") as f:
            data = tomllib.load(f)
        uv.update(data.get("pip", {}))
        uv.update({k: v for k, v in data.items() if k != "pip"})
for name in ("UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_EXTRA_INDEX_URL", "UV_INDEX", "UV_FIND_LINKS"):
    if name in os.environ:
        uv[name[3:].lower().replace("_", "-")] = os.environ[name]
indexes = uv.get("index")
if isinstance(indexes, list):
    for index in indexes:
        key = "default-index" if index.get("default") else "extra-index-url"
        uv[key] = " ".join(filter(None, [uv.get(key, "") if key != "default-index" else "", index.get("url", "")]))
def joined(value):
    return " ".join(value) if isinstance(value, list) else str(value)
for uv_key, pip_key in (("default-index", "index-url"), ("index-url", "index-url"),
                        ("extra-index-url", "extra-index-url"), ("find-links", "find-links")):
    if uv_key in uv and pip_key not in settings:
        settings[pip_key] = joined(uv[uv_key]).replace(",", " ")
        env["PIP_" + pip_key.upper().replace("-", "_")] = settings[pip_key]

for k, v in sorted(env.items()):
    print(f"env\t{k}={v}")
for value in settings.values():
    for token in value.split():
        path = token[len("file://"):] if token.startswith("file://") else token
        if not path.startswith("/") or path == "/":
            continue
        path = os.path.normpath(path)
        if os.path.isfile(path):
            print(f"file\t{path}")
        elif os.path.isdir(path):
            # A local "simple" index links to its files with relative paths (../../files):
            # bind the directory above it.
            if token.startswith("file://") and os.path.basename(path) == "simple":
                path = os.path.dirname(path)
            print(f"dir\t{path}")
EOF
}

# ---- the root ----------------------------------------------------------------------------------

debian_mirror() {
  # The first Debian archive URI in apt's sources for this machine's own release (deb822
  # *.sources or one-line *.list), so the mirror is whatever this machine is set up to use.
  if [ -n "${OFFLOAD_SID_MIRROR:-}" ]; then echo "$OFFLOAD_SID_MIRROR"; return; fi
  local codename list='' parts='' f
  # shellcheck disable=SC1091
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  eval "$(apt-config shell list Dir::Etc::sourcelist/f parts Dir::Etc::sourceparts/d)"
  {
    for f in "$list" "$parts"*.list; do
      [ -f "$f" ] || continue
      awk -v cn="$codename" '$1 == "deb" {
          i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
          if ($(i + 1) == cn) print $i }' "$f"
    done
    for f in "$parts"*.sources; do
      [ -f "$f" ] || continue
      awk -v cn="$codename" 'BEGIN { RS = ""; FS = "\n" } {
          uris = ""; suites = ""; types = ""; enabled = 1
          for (i = 1; i <= NF; i++) {
            if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris) }
            if ($i ~ /^Suites:/) suites = " " $i " "
            if ($i ~ /^Types:/) types = " " $i " "
            if ($i ~ /^Enabled:[ \t]*no/) enabled = 0
          }
          if (enabled && types ~ / deb / && index(suites, " " cn " ")) { split(uris, u, " "); print u[1] }
        }' "$f"
    done
  } | head -n 1
}

in_root() {
  # in_root CMD...: run CMD in the root with a clean environment (HOME, PATH, locale, CI, PIP_*).
  local python=${OFFLOAD_PY:-3.14} dir=$CHECKOUT
  case $PWD/ in "$CHECKOUT"/*) dir=$PWD ;; esac
  local vars=(HOME="$HOME" LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive
    PATH="$VENVS/venv-$python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
  local name
  for name in TERM CI COLUMNS NO_COLOR FORCE_COLOR TZ PYTHONHASHSEED PYTEST_ADDOPTS \
    SSL_CERT_FILE SSL_CERT_DIR REQUESTS_CA_BUNDLE XDG_CONFIG_DIRS XDG_CONFIG_HOME \
    http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    [ -z "${!name+set}" ] || vars+=("$name=${!name}")
  done
  # --default-signal: bash starts a background command with SIGINT and SIGQUIT ignored, and so
  # would everything it runs be (Python would not raise KeyboardInterrupt): undo that.
  # shellcheck disable=SC2054  # the comma belongs to env's option
  local command=(chroot "$ROOT" /usr/bin/env -i -C "$dir" --default-signal=INT,QUIT
    "${vars[@]}" "${PIP_ENV[@]}" "$@")
  if [ -n "${FOREGROUND:-}" ]; then "${command[@]}"; return; fi
  # In the background and waited for, so that a signal to this script is handled at once: the
  # EXIT trap stops the command, then unmounts (a foreground child would delay the trap).
  local status=0
  "${command[@]}" <&0 &
  CHILD=$!
  wait "$CHILD" || status=$?
  CHILD=
  return "$status"
}

make_root() {
  local mirror new="$ROOT.new"
  command -v debootstrap >/dev/null || {
    say "installing debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  mirror=$(debian_mirror)
  [ -n "$mirror" ] || die "no Debian mirror in apt's sources; set OFFLOAD_SID_MIRROR"
  # A half-made root from an interrupted run: nothing may be mounted in it before it goes.
  ROOT=$new unmount_all
  rm -rf --one-file-system "$new"
  say "debootstrap sid into $ROOT (about a minute, ~450 MB)"
  if ! debootstrap --variant=minbase --include="$PACKAGES" sid "$new" "$mirror" \
    >"$ROOT.debootstrap.log" 2>&1; then
    ROOT=$new unmount_all || true
    tail -n 20 "$ROOT.debootstrap.log" >&2
    die "debootstrap failed (whole log: $ROOT.debootstrap.log)"
  fi
  unmount_all
  rm -rf --one-file-system "$ROOT"
  mv "$new" "$ROOT"
}

root_complete() {
  # Are all of $PACKAGES installed in the root?
  local status
  # shellcheck disable=SC2016,SC2086
  status=$(chroot "$ROOT" dpkg-query -W -f='${db:Status-Status}\n' ${PACKAGES//,/ } $SERVER_PACKAGES \
    2>/dev/null) ||
    return 1
  ! grep -qvx installed <<<"$status"
}

setup() {
  require
  mkdir -p "$(dirname "$ROOT")"
  if [ ! -f "$READY" ]; then
    make_root
  fi
  # The mirror may serve a dated snapshot of sid, whose Release apt would call expired.
  echo 'Acquire::Check-Valid-Until "false";' >"$ROOT/etc/apt/apt.conf.d/99offload"
  enter
  if ! root_complete; then
    # A root made before a package was added here, or one that lost it.
    printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"  # no service starts in here
    chmod +x "$ROOT/usr/sbin/policy-rc.d"
    # shellcheck disable=SC2086  # the package list is split on purpose
    in_root sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends "$@" >/dev/null' sh ${PACKAGES//,/ } $SERVER_PACKAGES
  fi
  local python
  for python in "${PYTHONS[@]}"; do
    chroot "$ROOT" "$VENVS/venv-$python/bin/python" -c 'import pip' 2>/dev/null ||
      in_root "python$python" -m venv --clear "$VENVS/venv-$python"
  done
  date -u +%FT%TZ >"$READY"
  unmount_all
  trap - EXIT
}

# ---- commands ----------------------------------------------------------------------------------

cmd_test() {
  local python=3.14 extras=all,dask
  while [ $# -gt 0 ]; do
    case $1 in
      --python) python=$2; shift 2 ;;
      --extras) extras=$2; shift 2 ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  case " ${PYTHONS[*]} " in *" $python "*) ;; *) die "no Python $python here (${PYTHONS[*]})" ;; esac
  setup
  enter
  say "Python $python: installing the checkout [$extras] and the test group"
  OFFLOAD_PY=$python in_root python -m pip install -qq -e ".[$extras]" --group test
  OFFLOAD_PY=$python in_root python -m pytest "$@"
}

cmd_status() {
  echo "root:     $ROOT ($([ -f "$READY" ] && echo "ready since $(cat "$READY")" || echo "not set up"))"
  local python
  for python in "${PYTHONS[@]}"; do
    if [ -x "$ROOT$VENVS/venv-$python/bin/python" ]; then
      echo "python:   $python (venv $VENVS/venv-$python)"
    fi
  done
  local mounted
  mounted=$(mounts_under "$ROOT")
  echo "mounted:  ${mounted:-nothing}"
  local why
  why=$(unavailable)
  echo "usable:   ${why:-yes}"
}

case ${1:-} in
  check)
    why=$(unavailable)
    [ -z "$why" ] || { echo "$why"; exit "$SKIP"; }
    ;;
  setup) setup ;;
  test) shift; cmd_test "$@" ;;
  run)
    shift
    [ $# -gt 0 ] || die "usage: $0 run CMD [ARGS...]"
    setup; enter; in_root "$@"
    ;;
  shell) setup; enter; FOREGROUND=1 in_root bash -i ;;
  status) cmd_status ;;
  teardown)
    if [ "$(id -u)" != 0 ]; then say "needs root"; exit "$SKIP"; fi
    [ -e "$ROOT" ] || [ -e "$ROOT.new" ] || { say "nothing to remove at $ROOT"; exit 0; }
    lock
    unmount_all
    ROOT=$ROOT.new unmount_all
    rm -rf --one-file-system "$ROOT" "$ROOT.new" "$ROOT.debootstrap.log"
    rm -f "$ROOT.lock"
    say "removed $ROOT"
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
