#!/usr/bin/env bash
# The pictures of docs/insertion.md, made with the built-in tiny models (random weights: what
# they draw is noise) and two stand-ins drawn by Python/PIL (a product on a green screen and a
# "photo"), since real weights cannot run where this was written.
#
#   docs/insertion/make_pictures.sh [TKG]      (default: target/release/tkg)
set -euo pipefail
tkg=$(realpath "${1:-target/release/tkg}")
cd "$(dirname "$0")"
rm -f ./*.png
# 1. The generation step on the tiny model (noise: random weights).
"$tkg" -q generate --model tiny-sd15 --prompt "a red vintage car" --seed 42 --steps 20 \
  --width 128 --height 96 --out 1-generated.png >/dev/null
# Stand-ins for what a real model would give: a product on green, and a photo.
python3 - <<'PY'
from PIL import Image, ImageDraw
g = Image.new("RGB", (192, 144), (20, 190, 40))
d = ImageDraw.Draw(g)
d.rounded_rectangle((36, 58, 156, 104), 14, fill=(196, 30, 36))
d.rounded_rectangle((62, 36, 130, 66), 10, fill=(170, 24, 30))
d.rectangle((70, 42, 122, 60), fill=(150, 190, 220))
for x in (64, 128):
    d.ellipse((x - 15, 92, x + 15, 122), fill=(25, 25, 28))
    d.ellipse((x - 6, 101, x + 6, 113), fill=(160, 160, 165))
g.save("2-product-on-green.png")
p = Image.new("RGB", (320, 200))
d = ImageDraw.Draw(p)
for y in range(200):
    c = (int(120 + 60 * y / 200), int(140 + 40 * y / 200), int(190 - 50 * y / 200)) if y < 120 \
        else (int(110 - 30 * (y - 120) / 80), int(84 - 20 * (y - 120) / 80), 60)
    d.line((0, y, 319, y), fill=c)
d.rectangle((220, 40, 290, 120), fill=(90, 70, 60))
p.save("3-photo.png")
PY
# 2. Key it.
"$tkg" -q key 2-product-on-green.png --out 2-product.png >/dev/null
# 3. Place it, with a contact shadow, colour match and harmonisation (tiny model).
"$tkg" -q place 2-product.cutout.png --onto 3-photo.png --at 0.4,0.88 --height 80 \
  --shadow contact --match-colour --harmonize 0.6 --prompt "a car on a road at dusk" \
  --model tiny-sd15 --steps 20 --seed 7 --layers --out 4-scene.png >/dev/null
# The same without harmonisation, to compare.
"$tkg" -q place 2-product.cutout.png --onto 3-photo.png --at 0.4,0.88 --height 80 \
  --shadow contact --out 5-placed.png >/dev/null
rm -f 1-generated.matte.png 2-product.matte.png
ls -l ./*.png
