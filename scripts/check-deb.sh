#!/usr/bin/env bash
# Checks a shelfwatch package made by scripts/package.sh:
#
#   scripts/check-deb.sh target/debian/shelfwatch_<version>_<arch>.deb
#
# 1. lintian, failing on any error or warning that packaging/debian/lintian-overrides
#    (installed by the package, so lintian reads it from the .deb) does not justify.
# 2. For a package of the host's architecture: a real install into a throwaway Debian
#    bookworm root (debootstrap --variant=minbase), then what a user relies on: the
#    system user in group video, the conffile, the unit and its enablement, the models
#    found where the binary looks for them, the man pages, an upgrade over itself that
#    keeps an edited conffile, and a purge that removes the user and the state.
#    ARM packages get the lintian pass only.
#
# Debian packages these scripts rely on (CI installs them; root is needed for chroot):
#   lintian debootstrap man-db groff-base dpkg-dev binutils-aarch64-linux-gnu
#   binutils-arm-linux-gnueabihf util-linux tar gzip
# and cargo-deb from crates.io (`cargo install cargo-deb --locked`).
#
# The first run downloads the base system from deb.debian.org (1 to 1.5 min here) and
# keeps it as a tar (170 MB) in target/check-deb/, or in $CHECK_DEB_CACHE when set (a
# directory that outlives the checkout, for CI's fresh clones); later runs unpack it in
# about 5 s. DEBIAN_MIRROR overrides the mirror; delete the tar to refresh the base.
set -euo pipefail

# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

[ $# -eq 1 ] || die "usage: scripts/check-deb.sh DEB"
deb=$(realpath -e "$1") || die "no such file: $1"
repo=$(cd "$(dirname "$0")/.." && pwd)
arch=$(dpkg-deb -f "$deb" Architecture)
package=$(dpkg-deb -f "$deb" Package)
[ "$package" = shelfwatch ] || die "$deb is not a shelfwatch package ($package)"

# The maintainer scripts as cargo-deb assembled them: it pastes the systemd snippets
# over every #DEBHELPER# token, wherever that is, so check the result and not the
# templates in packaging/debian/.
echo "==> maintainer scripts"
scripts=$(mktemp -d)
dpkg-deb --ctrl-tarfile "$deb" | tar -C "$scripts" -x
for s in preinst postinst prerm postrm; do
  [ -f "$scripts/$s" ] || continue
  sh -n "$scripts/$s" || die "$s: syntax error"
  if grep -q DEBHELPER "$scripts/$s"; then die "$s: a #DEBHELPER# token was left in"; fi
done
user_line=$(grep -n 'adduser --quiet --system' "$scripts/postinst" | head -n 1 | cut -d: -f1)
helper_line=$(grep -n 'deb-systemd-helper' "$scripts/postinst" | head -n 1 | cut -d: -f1)
if ! [ "${user_line:-0}" -gt 0 ] || ! [ "$user_line" -lt "${helper_line:-0}" ]; then
  die "postinst: the user must be created before the unit is enabled or restarted"
fi
# A first install must not start the daemon (why: [package.metadata.deb] in Cargo.toml);
# an upgrade restarts it only if it was running (try-restart).
if grep -q 'deb-systemd-invoke start' "$scripts/postinst"; then die "postinst starts the service"; fi
grep -q 'deb-systemd-invoke try-restart' "$scripts/postinst" || die "postinst does not try-restart on upgrade"
rm -rf "$scripts"
echo "<== maintainer scripts: ok"

echo "==> lintian $deb"
t0=$SECONDS
# First for the log: every tag down to info, and the overridden ones as "O:" lines
# with their justification, so a reviewer sees what is being waived. The verdict comes
# from a second run, because with --show-overrides lintian (2.116) counts overridden
# tags as failures. --fail-on error,warning: a warning fails the check too.
lintian --allow-root --display-info --show-overrides --tag-display-limit 0 "$deb" || true
lintian --allow-root --fail-on error,warning "$deb" >/dev/null ||
  die "lintian found errors or warnings (above); fix them or justify an override in packaging/debian/lintian-overrides"
echo "<== lintian: $((SECONDS - t0)) s"

if [ "$arch" != "$(dpkg --print-architecture)" ]; then
  echo "check-deb.sh: $arch package on a $(dpkg --print-architecture) host: install test skipped"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || die "the install test needs root (debootstrap, chroot, mount)"

cache=${CHECK_DEB_CACHE:-$repo/target/check-deb}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
base=$cache/$suite-minbase-adduser.tar
mkdir -p "$cache"

root=""
# Everything mounted below $1, deepest first. Checked before any rm -rf: removing a
# root with the host's /proc still mounted in it would reach into the host.
unmount_below() {
  local dir=$1 m
  awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
    while read -r m; do umount "$m" || umount -l "$m"; done
}
cleanup() {
  local status=$?
  if [ -n "$root" ] && [ -d "$root" ]; then
    unmount_below "$root"
    # --one-file-system: even if an unmount failed, never descend into a mount.
    rm -rf --one-file-system "$root"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ ! -f "$base" ]; then
  echo "==> debootstrap $suite (minbase, adduser) from $mirror"
  t0=$SECONDS
  root=$(mktemp -d "$cache/debootstrap.XXXXXX")
  # mktemp makes 0700; the tar records "." as it is, and a 0700 / inside the root would
  # lock every user but root out of it.
  chmod 755 "$root"
  # Its progress (a few hundred lines) goes to a log, shown only when it fails.
  debootstrap --variant=minbase --include=adduser "$suite" "$root" "$mirror" \
    >"$cache/debootstrap.log" 2>&1 ||
    { tail -n 40 "$cache/debootstrap.log" >&2; die "debootstrap failed (log: $cache/debootstrap.log)"; }
  # The downloaded .debs are a third of the tree and never needed again.
  chroot "$root" apt-get clean
  tar -C "$root" -cf "$base.tmp" .
  mv "$base.tmp" "$base"
  unmount_below "$root"
  rm -rf --one-file-system "$root"
  root=""
  echo "<== debootstrap: $((SECONDS - t0)) s, cached in $base"
fi

echo "==> install test in a throwaway $suite root"
t0=$SECONDS
root=$(mktemp -d "$cache/root.XXXXXX")
chmod 755 "$root"
tar -C "$root" -xf "$base"
echo "    base system unpacked: $((SECONDS - t0)) s"
cp "$deb" "$root/tmp/shelfwatch.deb"
# The base tar already holds /dev/null, /dev/urandom and the like (debootstrap makes
# them), so only /proc is mounted: no bind mount of the host's /dev to leak or delete.
mount -t proc proc "$root/proc"
# No /run/systemd/system in the root, as in an image build: the maintainer scripts must
# skip systemctl and deb-systemd-invoke on their own, which is part of what is tested.
# env -i: nothing from this shell (SHELFWATCH_MODEL_DIR, SHELFWATCH_LOG) may steer the
# installed binary; it has to find /usr/share/shelfwatch/models by itself.
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
as_shelfwatch() { in_root setpriv --reuid=shelfwatch --regid=shelfwatch --init-groups "$@"; }
fail() { die "install test: $*"; }
ok() { echo "    ok: $*"; }

in_root dpkg -i /tmp/shelfwatch.deb || fail "dpkg -i failed"
ok "dpkg -i"
# cargo-deb ships no md5sums (lintian-overrides says why that is fine): dpkg must have
# made them, and every installed file must match the package.
[ -s "$root/var/lib/dpkg/info/shelfwatch.md5sums" ] || fail "dpkg recorded no md5sums"
in_root dpkg --verify shelfwatch || fail "dpkg --verify shelfwatch"
ok "md5sums recorded by dpkg, dpkg --verify clean"

# The binary was built in a source tree whose models/ it would prefer; that tree is not
# in the root, so a pass here means the packaged fallback works.
[ ! -e "$root$repo/models" ] || fail "$repo/models exists in the root"
as_shelfwatch shelfwatch check-config /etc/shelfwatch/shelfwatch.toml ||
  fail "shelfwatch check-config /etc/shelfwatch/shelfwatch.toml failed (as user shelfwatch)"
ok "check-config /etc/shelfwatch/shelfwatch.toml, as user shelfwatch"
for f in shelf_counter.onnx shelf_counter.labels shelf_counter.toml ssd_mobilenetv2_oidv4.onnx ssd_mobilenetv2_oidv4.labels ssd_mobilenetv2_oidv4.toml \
         ssd_mobilenetv2_oidv4_int8.onnx ssd_mobilenetv2_oidv4_int8.toml \
         efficientnet_lite0.onnx efficientnet_lite0.toml; do
  [ "$(stat -c %a "$root/usr/share/shelfwatch/models/$f" 2>/dev/null)" = 644 ] ||
    fail "/usr/share/shelfwatch/models/$f missing or not mode 644"
done
# A real inference through the installed model (the sha256 in the manifest is checked
# on load), on a photo the repository ships.
photo=$repo/tests/fixtures/photos/coffee.png
if [ -f "$photo" ]; then
  cp "$photo" "$root/tmp/photo.png"
  # The default model, the shelf counter, on a composed shelf of ten products.
  cp "$repo/tests/fixtures/shelves/shelf_02.jpg" "$root/tmp/shelf.jpg"
  out=$(as_shelfwatch shelfwatch detect /tmp/shelf.jpg) || fail "shelfwatch detect failed"
  case $out in *'"model":"shelf_counter"'*) ;; *) fail "unexpected detect output: $out" ;; esac
  n=$(grep -o '"label":"product"' <<<"$out" | wc -l)
  if [ "$n" -lt 9 ] || [ "$n" -gt 11 ]; then
    fail "the packaged shelf counter found $n products on shelf_02.jpg (10 placed)"
  fi
  ok "detect with the packaged default model: $n of 10 products"
  out=$(as_shelfwatch shelfwatch detect --model /usr/share/shelfwatch/models/ssd_mobilenetv2_oidv4.toml /tmp/photo.png) ||
    fail "shelfwatch detect with the SSD failed"
  case $out in *'"model":"ssd_mobilenetv2_oidv4"'*) ;; *) fail "unexpected SSD detect output: $out" ;; esac
  ok "detect with the packaged SSD: ${out:0:160}..."
  out=$(as_shelfwatch shelfwatch detect --model /usr/share/shelfwatch/models/ssd_mobilenetv2_oidv4_int8.toml /tmp/photo.png) ||
    fail "shelfwatch detect with the int8 model failed"
  case $out in *'"model":"ssd_mobilenetv2_oidv4_int8"'*) ;; *) fail "unexpected int8 detect output: $out" ;; esac
  ok "detect with the packaged int8 model"
  # Identification through the packaged embedding model: enrol the photo, find it again.
  as_shelfwatch shelfwatch enroll --gallery /tmp/gallery --sku CUP-1 /tmp/photo.png >/dev/null ||
    fail "shelfwatch enroll with the packaged embedding model failed"
  out=$(as_shelfwatch shelfwatch identify --gallery /tmp/gallery --json /tmp/photo.png) ||
    fail "shelfwatch identify failed"
  case $out in *'"sku":"CUP-1"'*) ;; *) fail "unexpected identify output: $out" ;; esac
  ok "enroll + identify with the packaged embedding model"
fi

in_root id shelfwatch
in_root id -nG shelfwatch | tr ' ' '\n' | grep -qx video || fail "user shelfwatch is not in group video"
entry=$(in_root getent passwd shelfwatch)
uid=$(echo "$entry" | cut -d: -f3)
[ "$uid" -lt 1000 ] || fail "shelfwatch is not a system user: $entry"
[ "$(echo "$entry" | cut -d: -f6)" = /var/lib/shelfwatch ] || fail "home is not /var/lib/shelfwatch: $entry"
ok "system user shelfwatch (uid $uid) in group video"

conffiles=$(in_root dpkg-query --control-show shelfwatch conffiles)
while read -r f; do echo "    conffile: $f"; done <<<"$conffiles"
echo "$conffiles" | grep -qx /etc/shelfwatch/shelfwatch.toml || fail "/etc/shelfwatch/shelfwatch.toml is not a conffile"

unit=/usr/lib/systemd/system/shelfwatch.service
[ -f "$root$unit" ] || fail "$unit missing"
[ -L "$root/etc/systemd/system/multi-user.target.wants/shelfwatch.service" ] ||
  fail "the unit was not enabled (no multi-user.target.wants link)"
ok "$unit, enabled"

for page in /usr/share/man/man1/shelfwatch.1.gz /usr/share/man/man5/shelfwatch.toml.5.gz; do
  in_root gzip -t "$page" || fail "$page missing or not gzip"
done
[ -f "$root/usr/share/doc/shelfwatch/copyright" ] || fail "no /usr/share/doc/shelfwatch/copyright"
ok "man pages and copyright"

# Upgrade over itself: the postinst runs again with the old version as $2; it must not
# fail on the existing user, and dpkg must keep the admin's edit of the conffile.
echo '# edited by check-deb.sh' >>"$root/etc/shelfwatch/shelfwatch.toml"
in_root dpkg -i /tmp/shelfwatch.deb || fail "reinstall failed"
grep -q 'edited by check-deb.sh' "$root/etc/shelfwatch/shelfwatch.toml" || fail "the conffile edit was lost"
ok "reinstall keeps the user and the edited conffile"

# Some state, as a run of the daemon would leave it, for the purge to remove.
mkdir -p "$root/var/lib/shelfwatch/spool"
echo '{}' >"$root/var/lib/shelfwatch/state.json"
in_root chown -R shelfwatch:shelfwatch /var/lib/shelfwatch
in_root dpkg --remove shelfwatch || fail "dpkg --remove failed"
in_root getent passwd shelfwatch >/dev/null || fail "remove (not purge) deleted the user"
[ -f "$root/var/lib/shelfwatch/state.json" ] || fail "remove (not purge) deleted the state"
in_root dpkg --purge shelfwatch || fail "dpkg --purge failed"
! in_root getent passwd shelfwatch >/dev/null || fail "the user survived the purge"
! in_root getent group shelfwatch >/dev/null || fail "the group survived the purge"
[ ! -e "$root/var/lib/shelfwatch" ] || fail "/var/lib/shelfwatch survived the purge"
[ ! -e "$root/etc/shelfwatch" ] || fail "/etc/shelfwatch survived the purge"
[ ! -e "$root/etc/systemd/system/multi-user.target.wants/shelfwatch.service" ] ||
  fail "the enablement link survived the purge"
ok "purge removed the user, the group, the state, the conffile and the enablement"
echo "<== install test: $((SECONDS - t0)) s"
