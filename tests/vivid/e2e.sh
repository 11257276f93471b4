# shellcheck shell=sh
# Guest side of the daemon's end-to-end test in the vivid VM (busybox sh; /test is the
# shelfwatch binary). Started by scripts/test.sh through tests/vivid/run-vm.sh:
#   run-vm.sh --arch aarch64 --binary shelfwatch --script tests/vivid/e2e.sh \
#     --file tests/vivid/e2e.toml:/e2e.toml --file models/...:/models/... -- 
# Runs `shelfwatch run` on the vivid camera until it has published counts for both
# zones, an out-of-stock event and a health record showing inferred frames, then stops it
# with SIGTERM as systemd would, and checks it exited cleanly.
out=/tmp/shelfwatch/out.jsonl
mkdir -p /tmp/shelfwatch
uname -m
/test check-config /e2e.toml || exit 1
# shellcheck disable=SC2265 # /test is shelfwatch here, not test(1): the & backgrounds it
/test run --config /e2e.toml --log info &
pid=$!

has() { grep -q "$1" "$out" 2>/dev/null; }
done_waiting() {
  has '"type":"state".*"zone":"left"' && has '"type":"state".*"zone":"right"' &&
    has '"event":"out-of-stock"' && has '"frames_processed":[1-9]'
}
i=0
until done_waiting; do
  kill -0 "$pid" 2>/dev/null || { echo "e2e: shelfwatch exited early"; cat "$out"; exit 1; }
  i=$((i + 1))
  [ $i -le 150 ] || { echo "e2e: no counts, events and health within 150 s"; cat "$out"; exit 1; }
  sleep 1
done
kill -TERM "$pid"
wait "$pid"
rc=$?
echo "e2e: published after ${i} s; shelfwatch exited with $rc on SIGTERM"
cat "$out"
[ "$rc" -eq 0 ] || exit 1
# Every health record must show no corrupt frames: vivid delivers whole YUYV frames.
if grep '"type":"health"' "$out" | grep -qv '"frames_corrupt":0'; then
  echo "e2e: corrupt frames reported"; exit 1
fi
echo "e2e: ok"
