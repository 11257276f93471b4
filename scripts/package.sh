#!/usr/bin/env bash
# Makes the Debian packages of shelfwatch from release binaries that already exist.
#
#   scripts/package.sh [--target TRIPLE]...
#
# Without --target: the host (amd64 here), aarch64-unknown-linux-gnu (arm64) and
# armv7-unknown-linux-gnueabihf (armhf). The binaries come from the builds the tests use:
#
#   cargo build --release --locked                                          # host
#   scripts/test-arm.sh aarch64-unknown-linux-gnu --build-only              # arm64
#   scripts/test-arm.sh armv7-unknown-linux-gnueabihf --build-only          # armhf
#
# This script never compiles: one release build per target serves the tests and the
# packages (see [profile.release] in Cargo.toml), so a package holds the very binary
# that was tested, and packaging takes seconds instead of a second build. Hence
# `cargo deb --no-build`, which packages what is there and fails when it is not.
#
# The host target (also when named, e.g. --target x86_64-unknown-linux-gnu) is packaged
# from target/release/shelfwatch, what a plain `cargo build --release` writes, with
# `cargo deb --no-build` and no --target; cargo-deb then takes the host architecture.
# (`cargo deb --target x86_64-unknown-linux-gnu` would look in
# target/x86_64-unknown-linux-gnu/release/, which only a build with that --target
# fills.) A cross target is packaged from target/TRIPLE/release/shelfwatch with
# `cargo deb --no-build --target TRIPLE`: cargo-deb rewrites the asset path
# target/release/ in Cargo.toml to target/TRIPLE/release/ itself.
#
# The ARM packages use the "boards" variant of [package.metadata.deb] (Cargo.toml): their
# Depends line is stated there, not computed, because dpkg-shlibdeps only sees the cross
# toolchain's libc. This script checks each ARM binary against it: only glibc's own
# libraries as NEEDED, and no symbol newer than GLIBC_2.31.
#
# Needs (Debian packages): dpkg-dev (dpkg-shlibdeps for the host package), gzip,
# binutils-aarch64-linux-gnu / binutils-arm-linux-gnueabihf (cargo-deb strips the ARM
# binaries with them; they come with the cross compilers); and cargo-deb.
#
# Prints the path and size of each package; they land in target/debian/.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=lib.sh
. scripts/lib.sh

targets=()
while [ $# -gt 0 ]; do
  case $1 in
    --target) [ $# -ge 2 ] || die "--target needs a triple"; targets+=("$2"); shift 2 ;;
    --target=*) targets+=("${1#--target=}"); shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (usage: scripts/package.sh [--target TRIPLE]...)" ;;
  esac
done

host=$(rustc -vV | sed -n 's/^host: //p')
[ -n "$host" ] || die "cannot tell the host triple from rustc -vV"
if [ ${#targets[@]} -eq 0 ]; then
  targets=("$host" aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
fi

cargo deb --version >/dev/null 2>&1 || die "cargo-deb is missing: cargo install cargo-deb --locked"
command -v dpkg-shlibdeps >/dev/null || die "dpkg-shlibdeps is missing: apt-get install dpkg-dev"

# The target directory as cargo sees it (CARGO_TARGET_DIR, build.target-dir): that is
# where cargo-deb looks for the binaries. Reading it does not compile anything.
target_dir=$(cargo metadata --format-version 1 --no-deps --locked |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target_dir" ] || die "cannot read the target directory from cargo metadata"

# Check everything before packaging anything, so a missing binary is reported at once
# and not after minutes of compression.
bins=() args=()
for t in "${targets[@]}"; do
  if [ "$t" = "$host" ]; then
    bin=$target_dir/release/shelfwatch
    build="cargo build --release --locked"
    args+=("")
  else
    bin=$target_dir/$t/release/shelfwatch
    build="scripts/test-arm.sh $t --build-only"
    args+=("--target=$t --variant=boards")
  fi
  [ -x "$bin" ] || die "missing $bin (target $t); build it first with: $build"
  if [ "$t" != "$host" ]; then
    # What the "boards" variant's Depends line promises.
    extra=$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' |
      grep -vxE 'libc\.so\.6|libm\.so\.6|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|ld-linux.*' || true)
    [ -z "$extra" ] || die "$bin needs $extra, which the boards variant's Depends does not name"
    newest=$(readelf --dyn-syms -W "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' |
      sort -t. -k1,1n -k2,2n | tail -n 1)
    [ "$(printf '%s\n2.31\n' "$newest" | sort -t. -k1,1n -k2,2n | tail -n 1)" = 2.31 ] ||
      die "$bin needs GLIBC_$newest, but its package promises libc6 (>= 2.31): build it with scripts/test-arm.sh $t"
  fi
  bins+=("$bin")
done

# cargo-deb copies assets as they are and does not compress man pages; Debian wants
# them gzipped, and -n leaves the name and time stamp out so the bytes depend only on
# the source. The asset paths in Cargo.toml point at target/man/ in the source tree.
mkdir -p target/man
for page in shelfwatch.1 shelfwatch.toml.5; do
  gzip -9n <"packaging/man/$page" >"target/man/$page.gz"
done

# Reproducible packages: every file in the .deb gets the time of the last commit
# (cargo-deb honours SOURCE_DATE_EPOCH), not the time of packaging.
if [ -z "${SOURCE_DATE_EPOCH:-}" ] && epoch=$(git log -1 --format=%ct 2>/dev/null); then
  export SOURCE_DATE_EPOCH=$epoch
fi

changelog_version=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)

out_dir=$target_dir/debian
mkdir -p "$out_dir"
debs=()
for i in "${!targets[@]}"; do
  t=${targets[$i]}
  echo "==> $t (${bins[$i]})"
  # --locked: cargo-deb runs `cargo metadata`, which must not rewrite Cargo.lock.
  # --output names the directory: without it a cross package still lands there, but
  # saying so keeps the path this script prints and the file in agreement.
  # shellcheck disable=SC2086 # args[$i] is empty or one word
  deb=$(cargo deb --no-build --locked --output "$out_dir/" ${args[$i]} | tail -n 1)
  [ -f "$deb" ] || die "cargo deb did not report a package for $t"
  version=$(dpkg-deb -f "$deb" Version)
  [ "$version" = "$changelog_version" ] ||
    die "$deb is version $version but packaging/debian/changelog starts at $changelog_version: add an entry (dch -v $version)"
  # $auto resolves Depends with dpkg-shlibdeps; when it fails cargo-deb only warns and
  # leaves libc6 out, which would make a package that installs and cannot start.
  depends=$(dpkg-deb -f "$deb" Depends)
  case $depends in
    *libc6:*) die "$deb: Depends \"$depends\" is arch-qualified" ;;
    *libc6*) ;;
    *) die "$deb: Depends \"$depends\" lacks libc6: dpkg-shlibdeps failed (see the warnings above)" ;;
  esac
  debs+=("$deb")
done

echo
for deb in "${debs[@]}"; do
  printf '%s\t%s bytes\t%s\n' "$deb" "$(stat -c %s "$deb")" "$(dpkg-deb -f "$deb" Architecture)"
done
