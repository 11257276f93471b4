#!/usr/bin/env bash
# Lints what cargo does not: every shell script with shellcheck (.shellcheckrc), every
# Python file with ruff (ruff.toml). Installs them when missing: shellcheck from Debian,
# ruff pinned (scripts/lint-requirements.txt) in a venv outside the tree,
# ${SHELFWATCH_LINT_VENV:-$HOME/.cache/shelfwatch/lint-venv}. .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib.sh
. scripts/lib.sh

if ! command -v shellcheck >/dev/null; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends shellcheck
fi
venv=${SHELFWATCH_LINT_VENV:-$HOME/.cache/shelfwatch/lint-venv}
ensure_venv "$venv" .requirements.sha256 scripts/lint-requirements.txt

# Tracked files only: target/ and venvs hold other people's scripts.
mapfile -t shell < <(git ls-files '*.sh' .ci/run)
echo "shellcheck $(shellcheck --version | sed -n 's/^version: //p'): ${#shell[@]} scripts"
shellcheck --external-sources "${shell[@]}"
mapfile -t python < <(git ls-files '*.py')
echo "$("$venv/bin/ruff" --version): ${#python[@]} Python files"
"$venv/bin/ruff" check --no-cache "${python[@]}"

# The integration tests start every child process through tests/it/util.rs (spawn,
# output, status), which holds the lock that keeps a fork under qemu-user from copying a
# thread mid-way (see FORK there). A direct Command::spawn/output/status elsewhere would
# bring back the hang that lock removed, so it is refused here.
direct=$(grep -nE '^\s*\.(spawn|output|status)\(\)|Command::new\(.*\.(spawn|output|status)\(\)' \
  tests/it/*.rs | grep -v '^tests/it/util.rs:' || true)
if [[ -n $direct ]]; then
  echo "error: start child processes through tests/it/util.rs (spawn, output, status):" >&2
  echo "$direct" >&2
  exit 1
fi
echo "integration tests: every child process started through tests/it/util.rs"
