#!/usr/bin/env bash
# Keying benchmark: tkg's keyer vs FFmpeg chromakey + despill on a generated ground-truth set.
# Installs the Debian packages the set is drawn from (icons, fonts) and ffmpeg, then runs
# examples/key_bench.rs with the keyer optimised as in a release build (only tkg and imageproc
# are rebuilt; the other dependencies are already optimised in the dev profile).
#
#   bash benches/key_bench.sh            # full set (about 10 minutes on 2 cores)
#   bash benches/key_bench.sh --quick    # a smaller set and grid (about 2 minutes)
#   bash benches/key_bench.sh --worst    # also list tkg's worst images on stderr
#   bash benches/key_bench.sh --keyability  # fit the keyability score's weights (about 20 s)
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v ffmpeg >/dev/null || need+=(ffmpeg)
[ -e /usr/share/icons/Adwaita/512x512/devices/computer.png ] || need+=(adwaita-icon-theme)
[ -e /usr/share/icons/oxygen/base/256x256/apps/clock.png ] || need+=(oxygen-icon-theme)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf ] || need+=(fonts-dejavu-core)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
opt=()
for p in tkg imageproc; do
  opt+=(--config "profile.dev.package.$p.opt-level=3"
        --config "profile.dev.package.$p.debug-assertions=false"
        --config "profile.dev.package.$p.overflow-checks=false")
done
exec cargo run --example key_bench "${opt[@]}" -- "$@"
