#!/usr/bin/env bash
# Regenerates docs/tensorboard.png: what RepresentationMonitor shows in TensorBoard after the main job.
#   bash examples/tensorboard_screenshot.sh [LOG_DIR]
# Needs Chromium (Debian: apt-get install chromium). Without LOG_DIR it first runs the main job
# (python examples/ssl_digits.py, about a minute) into a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
log_dir="${1:-}"
if [ -z "$log_dir" ]; then
    log_dir="$(mktemp -d)/ssl_digits"
    python examples/ssl_digits.py --log-dir "$log_dir"
fi
port=6199
tensorboard --logdir "$log_dir" --port "$port" --host 127.0.0.1 >/dev/null 2>&1 &
tb_pid=$!
trap 'kill $tb_pid 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 1; done
filter='repr/val/(backbone|projector)/(rankme|lidar|normalized_std|lid|spectrum)$'
url="http://127.0.0.1:$port/?tagFilter=$(python -c "import urllib.parse,sys; print(urllib.parse.quote(sys.argv[1], safe=''))" "$filter")#timeseries"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --window-size=1900,1500 \
    --hide-scrollbars --virtual-time-budget=90000 --screenshot=docs/tensorboard.png "$url" >/dev/null 2>&1
echo "wrote docs/tensorboard.png from $log_dir"
