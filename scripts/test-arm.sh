#!/usr/bin/env bash
# Builds shelfwatch for an ARM board and runs its tests here under qemu-user.
#
#   scripts/test-arm.sh aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf [--build-only]
#
# One release build per target serves everything: the tests run on it, and the packages
# (scripts/package.sh) and the arm64 VM test ship its `shelfwatch` binary. The build links
# against glibc 2.31 through cargo-zigbuild so the binary runs on Debian/Raspberry Pi OS
# bullseye and JetPack 5 as well as on bookworm and JetPack 6; the script fails if any
# symbol needs a newer glibc.
#
# Under emulation tract cannot see the CPU it would run on (it reads the host's
# /proc/cpuinfo), so the board's CPU is stated: QEMU_CPU=cortex-a72 (Raspberry Pi 4, and
# no SVE, which qemu's default CPU would offer and no Pi or Jetson has) and, on armv7,
# TRACT_CPU_ARM32_NEON=true. The integration tests' platform module (tests/it/platform.rs)
# then proves the NEON kernels ran.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${1:-}
build_only=${2:-}
case $target in
  aarch64-unknown-linux-gnu)
    gnu=aarch64-linux-gnu qemu=aarch64 cpu=cortex-a72 ;;
  armv7-unknown-linux-gnueabihf)
    # qemu-arm's default CPU is an armv7 with NEON; cortex-a15 names a real one.
    gnu=arm-linux-gnueabihf qemu=arm cpu=cortex-a15 ;;
  *)
    echo "usage: $0 aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf [--build-only]" >&2
    exit 2 ;;
esac
# The oldest glibc among the systems we support (bullseye, JetPack 5 / Ubuntu 20.04).
readonly glibc=2.31

# shellcheck source=lib.sh
. scripts/lib.sh
STAGE_PREFIX="$target: "

PATH=$(bash scripts/zig-venv.sh)/bin:$PATH
export PATH
# Options go before the subcommand's own arguments (and any `-- test-binary args`).
cargo_zig() {
  local sub=$1
  shift
  cargo-zigbuild "$sub" --release --locked --target "$target.$glibc" "$@"
}

stage "build (release, tests included)" cargo_zig test --no-run

bin=${CARGO_TARGET_DIR:-target}/$target/release/shelfwatch
check_glibc() {
  # The highest GLIBC_x.y version any dynamic symbol needs.
  local max
  max=$(readelf --dyn-syms --wide "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' |
    sort -t. -k1,1n -k2,2n -k3,3n | tail -n 1)
  echo "$bin: needs GLIBC_$max at most (limit $glibc); $(stat -c %s "$bin") bytes"
  [[ $(printf '%s\n%s\n' "$max" "$glibc" | sort -t. -k1,1n -k2,2n | tail -n 1) == "$glibc" ]] || {
    echo "error: $bin needs GLIBC_$max, newer than $glibc: it would not start on bullseye or JetPack 5" >&2
    return 1
  }
}
stage "glibc symbol versions" check_glibc
[[ $build_only == --build-only ]] && exit 0

# Integration tests start the `shelfwatch` binary as a child process; binfmt_misc hands
# ARM executables to qemu, which takes its CPU and library root from these variables.
export QEMU_CPU=$cpu QEMU_LD_PREFIX=/usr/$gnu TRACT_CPU_ARM32_NEON=true
[[ -e /proc/sys/fs/binfmt_misc/qemu-$qemu ]] || {
  echo "error: binfmt_misc has no qemu-$qemu entry (scripts/setup.sh --test registers it)" >&2
  exit 1
}
# Inference under qemu is ~100x slower than on a board; tests stretch their waiting
# (never what they check) by this factor.
export SHELFWATCH_TEST_SLOWDOWN=20
# Everything but what needs a broker (the integration tests' mqtt module, against
# mosquitto) or the V4L2 VM: the library's unit tests, the CLI, the fidelity and platform
# checks, the JSON Schemas over a real run, and the daemon's signal and config handling.
# Skipped here: the three daemon tests that replay all 28 scene frames (one of them with
# a decompression bomb among the frames), which take over 3 minutes each
# (and the two replays of the 28 shelf-scenes frames with the counter, one with the SSD)
# under emulation; their logic is target-independent, they run on x86_64, and the
# daemon runs end to end on arm64 in the vivid VM. Likewise the two evaluations over all
# 28 scenes (up to three models each, ~80 inferences): the platform test shows this
# target's detections equal x86_64's, and the COCO evaluation runs here on 6 frames.
# The shelf counter (the default model) counts the eight real-photo composites here too,
# with the scale rule; the 16 hard composites (~70 passes of up to 640 x 480, over 20
# minutes under emulation), the far-view comparison and the view along the aisle (three
# levels, 46 tiles of a 1280 x 960 frame) run on x86_64 only.
# Identification: enrol/identify round trips and the damaged gallery run here; the
# 247-embedding retrieval measurement and the per-SKU daemon runs (a replay, a reload)
# run on x86_64.
# The web server: the token test runs here (the server, its authentication and the API
# on this target); the browser tests need chromium, which is x86_64's, and the metrics,
# limits and flood tests exercise target-independent code.
# Two runs: libtest's --skip matches substrings, and `mqtt::` names the integration
# module but also the library's publish::mqtt unit tests, which do run here.
# Four long runs of target-independent logic stay on x86_64 (over four minutes under
# emulation per target): bench's comparison, the COCO evaluation, the schemas over a real
# run and the SIGHUP reload; the daemon still runs end to end on arm64 in the vivid VM.
# armv7 runs what could differ on a 32-bit board (sizes, offsets, its NEON kernels: the
# unit tests, platform, fidelity, the CLI and daemon checks) and leaves to aarch64 the
# composed-shelf counts (its detections are proven equal to x86_64's by platform::) and
# the comparison of shelfwatch's depthwise kernels with tract's on three detectors (24
# inferences; armv7's kernel is proven by name and by x86_64's detections in platform::,
# and against tract's own op by the unit tests). aarch64 runs that comparison on the
# counter at its own size and on the SSD; the counter again at 640 x 480 (other plane
# widths, other tails of the vector loops: over three minutes under emulation) runs on
# x86_64, the unit tests' random shapes covering the NEON loops' tails here.
long_runs=(--skip cli::bench_compare --skip cli::eval_reads_coco
  --skip schemas::every_message_of_a_real_run --skip daemon::sighup_with_a_broken
  --skip kernels::own_kernels_find_the_same_products_as_tracts_with_the_shelf_counter_at)
if [[ $target == armv7-* ]]; then
  long_runs+=(--skip counter::the_shelf_counter_counts_composed
    --skip kernels::own_kernels_find_the_same_products)
fi
stage "unit tests under qemu-$qemu ($cpu)" cargo_zig test --lib --bins
skips=("${long_runs[@]}"
  --skip mqtt::
  --skip counter::the_shelf_counter_counts_dense_far --skip counter::at_one_fixed_input_size
  --skip counter::a_shelf_seen_along
  --skip daemon::the_daemon_over_the_composed_scenes --skip daemon::after_a_restart
  --skip daemon::a_decompression_bomb_among
  --skip daemon::the_default_counter_counts_unseen --skip daemon::without_an_occluder_model
  --skip cli::eval_finds_every_labelled_cup --skip cli::the_int8_model_keeps
  --skip identify::augmented_views_of_enrolled --skip identify::the_daemon_counts_per_sku
  --skip identify::a_product_enrolled_while
  --skip web::a_zone_drawn --skip web::a_product_enrolled_from --skip web::metrics_parse
  --skip web::without_a_token --skip web::an_oversized --skip web::a_flood)
# Two runs. Under qemu-user a fork copies the emulator, and a fork while another thread of
# the test process runs guest code can leave the child stuck on a lock before it reaches
# exec: once, under load, a CLI test waited 70 minutes. So the modules whose tests start
# processes (the CLI, the daemon) run one test at a time, their own helper threads kept
# still by tests/it/util.rs's FORK lock; the modules that run the models in the test
# process start none (SHELFWATCH_TEST_NO_FORK makes one that does fail) and run two at
# a time, as they always could.
in_process=(counter:: fidelity:: kernels:: platform::)
no_fork() (
  export SHELFWATCH_TEST_NO_FORK=1
  cargo_zig "$@"
)
stage "integration tests, in process, under qemu-$qemu ($cpu)" \
  no_fork test --test it -- "${in_process[@]}" "${skips[@]}"
stage "integration tests that start processes, one at a time, under qemu-$qemu ($cpu)" \
  cargo_zig test --test it -- "${in_process[@]/#/--skip=}" "${skips[@]}" --test-threads=1
if [[ $target == aarch64-* ]]; then
  # The Raspberry Pi 5's Cortex-A76 (and the Jetson Orin's A78AE) has the 8-bit dot
  # product the Pi 4's A72 lacks, and the int8 pointwise kernel runs on it: its unit
  # tests, and the int8 SSD against tract's kernels, again on that CPU, where they must
  # find it (SHELFWATCH_REQUIRE_DOT), not quietly test the plain-Rust kernel alone.
  # The runner of .cargo/config.toml names the A72; children started through binfmt_misc
  # take QEMU_CPU.
  on_a76() (
    export QEMU_CPU=cortex-a76 SHELFWATCH_REQUIRE_DOT=dotprod
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/$gnu -cpu cortex-a76"
    cargo_zig "$@"
  )
  stage "int8 dot-product kernel under qemu-$qemu (cortex-a76)" \
    on_a76 test --lib -- kernels::pointwise
  stage "int8 SSD on the dot-product kernel under qemu-$qemu (cortex-a76)" \
    on_a76 test --test it -- kernels::the_int8_model
fi
