#!/bin/sh
# Regenerate pttd's bundled demo speech: daemon/pttd/data/*.wav and demo.json (the known texts
# and the kiosk phrase list), used by `pttd demo`, tests/test_local_engine.py and
# bench/local_bench.py. Needs espeak-ng and sox (apt-get install espeak-ng sox).
#
# Deterministic: fixed espeak-ng voice/speed/pitch/amplitude; sox in repeatable mode (-R) with
# no dither (-D); espeak's own leading/trailing silence trimmed, then normalized to -3 dBFS and
# padded with 0.5 s of digital silence each side; 16 kHz mono PCM16. Keep the total < 300 KB.
set -eu

out="$(cd "$(dirname "$0")/.." && pwd)/daemon/pttd/data"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"

say() {  # say NAME TEXT
    espeak-ng -v en-us -s 165 -p 50 -a 100 -g 0 -w "$tmp/$1.wav" "$2"
    sox -R -D "$tmp/$1.wav" -r 16000 -c 1 -b 16 -e signed-integer "$out/$1.wav" \
        silence 1 0.01 -55d reverse silence 1 0.01 -55d reverse norm -3 pad 0.5 0.5
}

LIGHTS="turn on the kitchen lights"
TIME="what time is it"
MUSIC="play some music"
DICTATION="remind me to buy milk tomorrow"

say lights_on "$LIGHTS"
say time "$TIME"
say music "$MUSIC"
say dictation "$DICTATION"

# Phrases: the three commands plus near neighbours, so grammar mode has real choices to make.
cat > "$out/demo.json" <<JSON
{
  "sample_rate": 16000,
  "phrases": ["$LIGHTS", "turn off the kitchen lights", "$TIME", "$MUSIC", "stop the music",
              "open the front door"],
  "clips": [
    {"file": "lights_on.wav", "text": "$LIGHTS", "kind": "command"},
    {"file": "time.wav", "text": "$TIME", "kind": "command"},
    {"file": "music.wav", "text": "$MUSIC", "kind": "command"},
    {"file": "dictation.wav", "text": "$DICTATION", "kind": "dictation"}
  ]
}
JSON
