# shellcheck shell=bash
# What every script here shares: timed stages, one way to fail, and pinned Python venvs.
# Sourced, never run:  . "$(dirname "$0")/lib.sh"  (or the path from the repository root)
#
#   STAGE_PREFIX   put before every stage name (test-arm.sh names its target there)
#   STAGE_DISK     if set, a stage's end line also says how much disk is free (CI fills
#                  disks with target/ trees; the line says where the space went)
#   STAGE_LOG      if set, a file that gets "NAME<TAB>SECONDS" per finished stage
#   DIE_PREFIX     what an error message starts with (default: the script's name)

# Whole seconds are what CI's logs compare; sub-second stages are not worth a clock.
stage() {
  local name=${STAGE_PREFIX:-}$1
  shift
  local t0=$SECONDS
  echo "==> $name"
  "$@"
  local took=$((SECONDS - t0))
  if [ -n "${STAGE_DISK:-}" ]; then
    echo "<== $name: $took s (disk free: $(df -h --output=avail . | tail -1 | tr -d ' '))"
  else
    echo "<== $name: $took s"
  fi
  if [ -n "${STAGE_LOG:-}" ]; then
    printf '%s\t%s\n' "$name" "$took" >>"$STAGE_LOG"
  fi
}

die() {
  echo "${DIE_PREFIX:-${0##*/}}: $*" >&2
  exit 1
}

# ensure_venv VENV MARKER REQUIREMENTS...
# Makes VENV if it is missing and (re)installs the pinned REQUIREMENTS files whenever
# their contents changed since the last install: MARKER (a file name inside VENV) keeps
# the sha256 of what was installed. Two scripts can share one venv with their own
# markers (models/build.sh and models/train/run.sh do).
ensure_venv() {
  local venv=$1 marker=$2
  shift 2
  local want have=""
  want=$(cat "$@" | sha256sum | cut -d' ' -f1)
  [ -f "$venv/$marker" ] && have=$(cat "$venv/$marker")
  if [ -x "$venv/bin/python" ] && [ "$want" = "$have" ]; then
    return
  fi
  command -v python3 >/dev/null || die "python3 is missing (scripts/setup.sh installs it)"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || die "cannot create $venv (on Debian: apt-get install python3-venv)"
  fi
  local reqs=() f
  for f in "$@"; do reqs+=(-r "$f"); done
  echo "installing $* into $venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${reqs[@]}"
  echo "$want" >"$venv/$marker"
}
