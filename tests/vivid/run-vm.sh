#!/usr/bin/env bash
# Runs a test binary (static, or dynamic with its libraries bundled) inside a QEMU guest booting Debian's stock kernel with the
# real vivid V4L2 driver loaded, and exits with the test's exit status.
#
#   tests/vivid/run-vm.sh --arch x86_64|aarch64 --binary PATH [--timeout SECONDS]
#                         [--file SRC:DEST]... [--script FILE] -- ARGS...
#
# The binary becomes /test in the guest and runs as `/test ARGS`. With --script, the
# guest runs `sh /script ARGS` instead (the script calls /test itself), so a test can
# drive a long-running program such as the daemon. --file puts more files (a model, a
# config) into the guest at DEST.
#
# Why a VM: neither the dev machines nor CI have /dev/video*, and a container cannot
# load kernel modules. What the runs show (and take) on arm64: docs/arm.md.
#
# Exit status: the guest test's own status (0-255), or 125 when the harness could not
# get a verdict (no marker from the guest, module load failure, download failure),
# or 2 for bad usage. Guest console output goes to stdout, harness messages to stderr.
#
# Environment:
#   SHELFWATCH_VM_CACHE    cache dir (default: <repo>/target/vivid-cache). Holds the
#                          downloaded .debs and a prepared kernel+modules per arch.
#                          Delete it to pick up a newer Debian kernel.
#   SHELFWATCH_VM_MEM      guest RAM (default 512M)
#   SHELFWATCH_VIVID_PARAMS vivid module parameters (default "n_devs=1 node_types=0x1";
#                          add multiplanar=2 to test the multi-planar API)
#   SHELFWATCH_VM_KEEP     if set, keep the work dir (initramfs tree, console log)
set -euo pipefail

readonly marker=SHELFWATCH-VM-EXIT
readonly error_marker=SHELFWATCH-VM-ERROR
readonly harness_fail=125

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$script_dir/../.." && pwd)

log() { printf 'run-vm: %s\n' "$*" >&2; }
die() { log "error: $*"; exit "$harness_fail"; }
usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
  exit 2
}

# Wall-clock stage timing with sub-second resolution; EPOCHREALTIME's decimal separator
# follows the locale, so strip whatever it is and work in microseconds.
now_us() { local t=${EPOCHREALTIME}; echo "${t//[^0-9]/}"; }
fmt_s() { printf '%d.%d' "$(($1 / 1000000))" "$((($1 % 1000000) / 100000))"; }
declare -a timings=()
stage_start=0
stage_begin() { stage_start=$(now_us); log "== $1"; }
stage_end() {
  local d=$(($(now_us) - stage_start))
  timings+=("$1 $(fmt_s "$d") s")
  log "== $1 done in $(fmt_s "$d") s"
}

# ---------------------------------------------------------------- arguments
arch="" binary="" timeout_s=240 script=""
guest_args=() extra_files=()
while (($#)); do
  case $1 in
    --arch) arch=${2:-}; shift 2 || usage ;;
    --binary) binary=${2:-}; shift 2 || usage ;;
    --timeout) timeout_s=${2:-}; shift 2 || usage ;;
    --file) extra_files+=("${2:-}"); shift 2 || usage ;;
    --script) script=${2:-}; shift 2 || usage ;;
    --) shift; guest_args=("$@"); break ;;
    -h | --help) usage ;;
    *) log "unknown argument: $1"; usage ;;
  esac
done
[[ -n $arch && -n $binary ]] || usage
[[ $timeout_s =~ ^[1-9][0-9]*$ ]] || { log "--timeout must be a positive integer"; exit 2; }
for f in "${extra_files[@]}"; do
  [[ $f == *:/* && -f ${f%%:*} ]] || { log "--file $f: want SRC:/DEST with SRC a readable file"; exit 2; }
done
[[ -z $script || -f $script ]] || { log "--script $script: no such file"; exit 2; }

case $arch in
  x86_64)
    deb_arch=amd64 elf_machine=62 qemu_pkg=qemu-system-x86 qemu_bin=qemu-system-x86_64
    qemu_machine=(-M pc) console=ttyS0
    ;;
  aarch64)
    deb_arch=arm64 elf_machine=183 qemu_pkg=qemu-system-arm qemu_bin=qemu-system-aarch64
    qemu_machine=(-M virt -cpu cortex-a72) console=ttyAMA0
    ;;
  *) log "--arch must be x86_64 or aarch64, not '$arch'"; exit 2 ;;
esac

cache=${SHELFWATCH_VM_CACHE:-$repo/target/vivid-cache}
mem=${SHELFWATCH_VM_MEM:-512M}
vivid_params=${SHELFWATCH_VIVID_PARAMS:-n_devs=1 node_types=0x1}

# ---------------------------------------------------------------- binary checks
# A dynamically linked or wrong-arch binary fails inside the guest with a cryptic
# "not found" from the shell, so refuse it here with a message that says why.
[[ -f $binary && -r $binary ]] || { log "--binary $binary: no such readable file"; exit 2; }
elf_u() { od -An -t "u$1" -j "$2" -N "$1" -- "$binary" | tr -d ' \n'; }
[[ $(od -An -c -N4 -- "$binary" | tr -d ' \n') == '177ELF' ]] ||
  { log "--binary $binary is not an ELF file"; exit 2; }
[[ $(elf_u 1 4) == 2 && $(elf_u 1 5) == 1 ]] ||
  { log "--binary $binary is not a 64-bit little-endian ELF"; exit 2; }
[[ $(elf_u 2 18) == "$elf_machine" ]] ||
  { log "--binary $binary is for ELF machine $(elf_u 2 18), not $arch ($elf_machine)"; exit 2; }
# A dynamically linked binary (a plain `cargo build`, which saves CI a second, static
# build of every dependency) gets its interpreter and shared libraries copied into the
# guest, taken from the host for x86_64 and from the cross sysroot for aarch64.
case $arch in
  x86_64) lib_dirs=(/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64) ;;
  aarch64) lib_dirs=(/usr/aarch64-linux-gnu/lib /usr/aarch64-linux-gnu/lib64) ;;
esac
interp=$(readelf -l -- "$binary" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
guest_libs=()
if [[ -n $interp ]]; then
  find_lib() {
    local d
    for d in "${lib_dirs[@]}"; do
      [[ -e $d/$1 ]] && { echo "$d/$1"; return 0; }
    done
    return 1
  }
  declare -A seen=()
  queue=("$binary")
  while ((${#queue[@]})); do
    f=${queue[0]}; queue=("${queue[@]:1}")
    while read -r lib; do
      [[ -n $lib && -z ${seen[$lib]:-} ]] || continue
      seen[$lib]=1
      path=$(find_lib "$lib") || { log "--binary $binary needs $lib, not found in ${lib_dirs[*]}"; exit 2; }
      guest_libs+=("$path")
      queue+=("$path")
    done < <(readelf -d -- "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
  done
  interp_path=$(find_lib "$(basename "$interp")") || { log "interpreter $interp not found"; exit 2; }
fi

workdir=$(mktemp -d "${TMPDIR:-/tmp}/shelfwatch-vm.XXXXXX")
staging=""
# shellcheck disable=SC2317 # only called from the EXIT trap
cleanup() {
  [[ -z $staging ]] || rm -rf -- "$staging"
  if [[ -n ${SHELFWATCH_VM_KEEP:-} ]]; then
    log "kept $workdir (initramfs tree, initrd, console log)"
  else
    rm -rf -- "$workdir"
  fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- host packages
stage_begin install
apt_install() {
  # --no-remove: a machine may carry newer qemu bits (e.g. qemu-utils from backports)
  # that apt would silently remove to make room; fail instead and let a human decide.
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q
    -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0)
  local install=(install -y --no-install-recommends --no-remove "$@")
  if ((EUID != 0)); then
    command -v sudo >/dev/null || die "need $* installed, but not root and no sudo"
    apt=(sudo "${apt[@]}")
  fi
  log "installing $*"
  # Lists may be missing or stale (404 on a superseded version): update once and retry.
  "${apt[@]}" "${install[@]}" >&2 ||
    { "${apt[@]}" update >&2 && "${apt[@]}" "${install[@]}" >&2; } ||
    die "apt-get install $* failed (if apt wanted to remove packages, install them by hand)"
}
need=()
command -v "$qemu_bin" >/dev/null || need+=("$qemu_pkg")
# busybox-static specifically: the host busybox is both our cpio and, for x86_64, the
# guest's userland, and the plain "busybox" package is dynamically linked.
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
  need+=(busybox-static)
((${#need[@]} == 0)) || apt_install "${need[@]}"
host_busybox=$(command -v busybox || true)
[[ -x $host_busybox ]] || host_busybox=/bin/busybox
[[ -x $host_busybox ]] || die "busybox-static installed but no busybox binary found"
stage_end install

# ---------------------------------------------------------------- guest kernel
# Prepared per arch under $cache/$arch/ready: the kernel (vmlinuz, and for x86_64 also
# the unpacked vmlinux), a static busybox of the guest arch, the module closure of
# vivid (decompressed) and its load order. Built once into
# a temp dir and renamed, so an interrupted or concurrent run never sees half of it.
stage_begin download
arch_dir=$cache/$arch
ready=$arch_dir/ready
mkdir -p "$arch_dir/debs"
exec 9>"$arch_dir/.lock"
flock -w 900 9 || die "timed out waiting for another run preparing $arch_dir"

if [[ ! -f $ready/load-order ]]; then
  apt_dir=$cache/apt-$deb_arch
  apt_opts=(-q -o Acquire::Languages=none)
  # As root apt wants to drop to _apt, which cannot write into our cache dir; it
  # then warns and carries on as root anyway. Say so up front to keep logs clean.
  ((EUID != 0)) || apt_opts+=(-o APT::Sandbox::User=root)
  # The guest arch's indexes go into lists/cache dirs of our own, for both arches: the
  # host's apt state and dpkg architectures stay untouched, no root is needed, and
  # both guests get the kernel that is current on the mirror rather than whatever
  # the host's (possibly months old) lists name.
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
  apt_opts+=(-o "APT::Architecture=$deb_arch" -o "APT::Architectures=$deb_arch"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
  apt_update() {
    log "apt-get update ($deb_arch indexes, into $apt_dir)"
    apt-get "${apt_opts[@]}" update >&2
  }
  updated=false
  if ! compgen -G "$apt_dir/lists/*_Packages*" >/dev/null; then
    apt_update || die "apt-get update for $deb_arch failed"
    updated=true
  fi

  kernel_meta=linux-image-$deb_arch
  resolve_kernel() {
    apt-cache "${apt_opts[@]}" depends "$kernel_meta" 2>/dev/null |
      sed -n 's/^ *Depends: \(linux-image-[^ <>]*\).*/\1/p' | head -n1
  }
  kernel_pkg=$(resolve_kernel)
  if [[ -z $kernel_pkg ]] && ! $updated; then
    apt_update || die "apt-get update failed"
    updated=true
    kernel_pkg=$(resolve_kernel)
  fi
  [[ -n $kernel_pkg ]] || die "cannot find which linux-image package $kernel_meta depends on"
  log "guest kernel package: $kernel_pkg ($deb_arch)"

  # Sets $deb to the package's .deb in $arch_dir/debs, downloading it if absent. Not a
  # $(...) function: it must be able to die and to record that the lists were updated.
  deb=""
  fetch_deb() {
    local pkg=$1
    deb=$(compgen -G "$arch_dir/debs/${pkg}_*_$deb_arch.deb" | head -n1 || true)
    if [[ -n $deb ]]; then
      log "reusing $deb"
      return 0
    fi
    log "downloading $pkg"
    if ! (cd "$arch_dir/debs" && apt-get "${apt_opts[@]}" download "$pkg" >&2); then
      # Stale lists name a version the mirror no longer has: refresh once and retry.
      if ! $updated; then
        apt_update || die "apt-get update failed"
        updated=true
      fi
      (cd "$arch_dir/debs" && apt-get "${apt_opts[@]}" download "$pkg" >&2) ||
        die "apt-get download $pkg ($deb_arch) failed"
    fi
    deb=$(compgen -G "$arch_dir/debs/${pkg}_*_$deb_arch.deb" | head -n1 || true)
    [[ -n $deb ]] || die "apt-get download $pkg left no .deb in $arch_dir/debs"
  }
  fetch_deb "$kernel_pkg"
  kernel_deb=$deb

  staging=$(mktemp -d "$arch_dir/ready.tmp.XXXXXX")
  mkdir -p "$staging/modules"
  extract=$workdir/kernel
  log "extracting $(basename "$kernel_deb")"
  dpkg-deb -x "$kernel_deb" "$extract"

  vmlinuz=$(compgen -G "$extract/boot/vmlinuz-*" | head -n1 || true)
  [[ -n $vmlinuz ]] || die "no boot/vmlinuz-* in $kernel_deb"
  cp "$vmlinuz" "$staging/vmlinuz"
  # x86_64: under TCG, SeaBIOS plus the bzImage decompressing itself take ~2.5 s of
  # emulated time per boot, half the run. QEMU can instead enter the uncompressed ELF
  # vmlinux directly through its PVH entry point (CONFIG_PVH), so unpack it once here.
  # The payload's place is in the bzImage setup header; only xz (what Debian uses) is
  # handled, anything else keeps booting the bzImage. (Not "tail | xz": xz stops at the
  # end of the stream, tail then dies of SIGPIPE and pipefail calls that a failure.)
  if [[ $arch == x86_64 ]] && grep -qsx 'CONFIG_PVH=y' "$extract"/boot/config-*; then
    setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$vmlinuz" | tr -d ' ')
    payload_offset=$(od -An -tu4 -j $((0x248)) -N4 "$vmlinuz" | tr -d ' ')
    off=$(((setup_sects + 1) * 512 + payload_offset))
    if [[ $(od -An -tx1 -j "$off" -N6 "$vmlinuz" | tr -d ' \n') == fd377a585a00 ]] &&
      xz -dc --single-stream <(tail -c +$((off + 1)) "$vmlinuz") >"$staging/vmlinux" &&
      [[ $(od -An -c -N4 "$staging/vmlinux" | tr -d ' \n') == '177ELF' ]]; then
      log "unpacked vmlinux for a direct PVH boot"
    else
      log "could not unpack vmlinux from the bzImage; booting the bzImage (slower)"
      rm -f "$staging/vmlinux"
    fi
  fi
  # Bookworm ships /lib/modules; later releases moved to /usr/lib/modules.
  moddir=$( (compgen -G "$extract/lib/modules/*" || compgen -G "$extract/usr/lib/modules/*" ||
    true) | head -n1)
  [[ -d $moddir/kernel ]] || die "no lib/modules/*/kernel in $kernel_deb"

  # Module names are matched with '-' and '_' treated alike, as the kernel does.
  declare -A ko_path=() builtin=() state=()
  while IFS= read -r -d '' f; do
    b=${f##*/} b=${b%%.ko*}
    ko_path[${b//-/_}]=$f
  done < <(find "$moddir/kernel" -type f \( -name '*.ko' -o -name '*.ko.xz' \
    -o -name '*.ko.zst' -o -name '*.ko.gz' \) -print0)
  if [[ -f $moddir/modules.builtin ]]; then
    while IFS= read -r f; do
      b=${f##*/} b=${b%.ko}
      builtin[${b//-/_}]=1
    done <"$moddir/modules.builtin"
  fi

  # The package has no modules.dep, so the load order is the dependency closure of
  # vivid read from each module's own "depends=" modinfo field (for bookworm 6.1:
  # mc videodev videobuf2-common videobuf2-v4l2 rc-core cec v4l2-dv-timings v4l2-tpg
  # videobuf2-memops videobuf2-dma-contig videobuf2-vmalloc vivid). Computing it keeps
  # working when a kernel update adds or drops a dependency or builds one in.
  load_order=()
  add_module() {
    local n=${1//-/_} src dst deps d
    case ${state[$n]:-} in
      loaded) return 0 ;;
      visiting) die "module dependency cycle through $n" ;;
    esac
    src=${ko_path[$n]:-}
    if [[ -z $src ]]; then
      [[ -n ${builtin[$n]:-} ]] || die "module $n is neither in $kernel_pkg nor built in"
      state[$n]=loaded
      return 0
    fi
    state[$n]=visiting
    dst=$staging/modules/$n.ko
    case $src in
      *.ko) cp "$src" "$dst" ;;
      *.ko.xz) xz -dc "$src" >"$dst" ;;
      *.ko.zst) command -v zstd >/dev/null || apt_install zstd; zstd -qdc "$src" >"$dst" ;;
      *.ko.gz) gzip -dc "$src" >"$dst" ;;
    esac
    deps=$(tr '\0' '\n' <"$dst" | LC_ALL=C sed -n 's/^depends=//p' | head -n1)
    local -a dep_list=()
    IFS=, read -ra dep_list <<<"$deps"
    for d in "${dep_list[@]}"; do
      [[ -z $d ]] || add_module "$d"
    done
    state[$n]=loaded
    load_order+=("$n")
  }
  add_module vivid
  printf '%s\n' "${load_order[@]}" >"$staging/load-order"
  log "module load order: ${load_order[*]}"

  if [[ $deb_arch == "$(dpkg --print-architecture)" ]]; then
    cp "$host_busybox" "$staging/busybox"
  else
    fetch_deb busybox-static
    dpkg-deb -x "$deb" "$workdir/busybox"
    bb=$workdir/busybox/bin/busybox
    [[ -f $bb ]] || bb=$workdir/busybox/usr/bin/busybox
    [[ -f $bb ]] || die "no busybox binary in $deb"
    cp "$bb" "$staging/busybox"
  fi
  echo "$kernel_pkg $(dpkg-deb -f "$kernel_deb" Version)" >"$staging/kernel-package"
  rm -rf -- "$extract" "$ready"
  mv "$staging" "$ready"
  staging=""
else
  log "reusing prepared $ready ($(cat "$ready/kernel-package" 2>/dev/null || echo '?'))"
fi
exec 9>&-
stage_end download

# ---------------------------------------------------------------- initramfs
stage_begin initramfs
root=$workdir/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,lib/modules}
cp "$ready/busybox" "$root/bin/busybox"
cp "$ready"/modules/*.ko "$root/lib/modules/"
cp -- "$binary" "$root/test"
# Debug builds carry hundreds of MB of DWARF that the guest would have to unpack into RAM.
case $arch in
  x86_64) strip_tool="strip" ;;
  aarch64) strip_tool=aarch64-linux-gnu-strip ;;
esac
if command -v "$strip_tool" >/dev/null; then
  "$strip_tool" --strip-debug "$root/test"
else
  log "warning: $strip_tool not found; the test binary goes in unstripped"
fi
if [[ -n $interp ]]; then
  mkdir -p "$root/lib" "$root$(dirname "$interp")"
  for l in "${guest_libs[@]}"; do cp -L -- "$l" "$root/lib/"; done
  cp -L -- "$interp_path" "$root$interp"
fi
chmod 755 "$root/bin/busybox" "$root/test"
for f in "${extra_files[@]}"; do
  dest=$root${f#*:}
  mkdir -p "$(dirname "$dest")"
  cp -L -- "${f%%:*}" "$dest"
done

# Quote for the guest's POSIX sh: wrap in '' and turn each ' into '\''.
sq() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }
test_cmd=/test
if [[ -n $script ]]; then
  cp -- "$script" "$root/script"
  test_cmd="/bin/sh /script"
fi
for a in "${guest_args[@]}"; do test_cmd+=" $(sq "$a")"; done

{
  cat <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/ LD_LIBRARY_PATH=/lib
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The console the kernel handed us lives on the rootfs /dev that devtmpfs now hides.
exec </dev/console >/dev/console 2>&1
halt_vm() {
  poweroff -f
  # Should poweroff not stop the machine, a reset does: qemu runs with -no-reboot.
  reboot -f
  while :; do sleep 60; done
}
EOF
  printf 'fail() { echo; echo "%s=$*"; halt_vm; }\n' "$error_marker"
  while IFS= read -r m; do
    params=""
    [[ $m != vivid ]] || params=" $vivid_params"
    printf 'insmod /lib/modules/%s.ko%s || fail "insmod %s failed"\n' "$m" "$params" "$m"
  done <"$ready/load-order"
  cat <<'EOF'
# vivid registers its nodes while loading, but let devtmpfs catch up before failing.
i=0
while [ ! -e /dev/video0 ]; do
  i=$((i + 1))
  [ $i -le 50 ] || fail "vivid loaded but /dev/video0 did not appear"
  sleep 0.1
done
EOF
  printf '%s\n' "$test_cmd"
  # The leading echo puts the marker at a line start even if the test's output did not
  # end with a newline.
  # shellcheck disable=SC2016 # $? and $rc belong to the guest's shell
  printf 'rc=$?\necho\necho "%s=$rc"\nhalt_vm\n' "$marker"
} >"$root/init"
chmod 755 "$root/init"

# Uncompressed: the guest unpacks it under TCG emulation, where inflating costs more
# than copying (4.6 MB: ~50 ms plain, ~90 ms gzipped, and a Rust binary is larger).
initrd=$workdir/initrd.cpio
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | "$host_busybox" cpio -H newc -o 2>/dev/null) >"$initrd"
[[ -s $initrd ]] || die "building the initramfs failed"
log "initramfs $(($(stat -c %s "$initrd") / 1024)) KiB"
stage_end initramfs

# ---------------------------------------------------------------- boot
stage_begin boot
console_log=$workdir/console.log
kernel=$ready/vmlinuz
[[ ! -f $ready/vmlinux ]] || kernel=$ready/vmlinux
qemu=(timeout --kill-after=10 "$timeout_s"
  "$qemu_bin" "${qemu_machine[@]}" -accel tcg -m "$mem" -smp 1
  -nodefaults -display none -no-reboot -nic none -serial stdio
  -kernel "$kernel" -initrd "$initrd"
  -append "console=$console quiet loglevel=3 panic=-1 rdinit=/init")
shown_args=""
((${#guest_args[@]} == 0)) || shown_args=$(printf ' %q' "${guest_args[@]}")
log "running $arch guest (timeout ${timeout_s} s): /test$shown_args"
# Strip the serial console's CRs so CI logs read normally; sed -u streams line by line.
set +e
"${qemu[@]}" </dev/null 2>&1 | sed -u 's/\r$//' | tee "$console_log"
qemu_rc=${PIPESTATUS[0]}
set -e
stage_end boot

summary=$(printf '%s, ' "${timings[@]}")
log "timings: ${summary%, }"

verdict=$(grep -a -E "^$marker=[0-9]+\$" "$console_log" | tail -n1 || true)
if [[ -n $verdict ]]; then
  rc=${verdict#*=}
  log "guest test exited with status $rc"
  exit "$rc"
fi

guest_error=$(grep -a "^$error_marker=" "$console_log" | tail -n1 || true)
if [[ -n $guest_error ]]; then
  log "guest setup failed before the test ran: ${guest_error#*=}"
elif ((qemu_rc == 124 || qemu_rc == 137)); then
  log "no verdict from the guest within $timeout_s s (qemu killed by timeout)"
else
  log "no verdict from the guest: qemu exited with status $qemu_rc before the test finished"
fi
panic=$(grep -a -m1 'Kernel panic' "$console_log" || true)
[[ -z $panic ]] || log "the guest kernel panicked: ${panic#*] }"
if [[ ! -s $console_log ]]; then
  # Seen with too little guest RAM: the CPU resets before the kernel prints anything.
  log "the guest console stayed empty: the kernel never started (too little memory?)"
else
  log "last console lines:"
  tail -n 25 "$console_log" | sed 's/^/run-vm:   | /' >&2
fi
exit "$harness_fail"
