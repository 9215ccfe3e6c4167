#!/usr/bin/env bash
# System packages the project uses: the mosquitto broker, Debian's Fashion-MNIST, and chromium with its
# driver (the dashboard's browser test; skipped without them).
# Installs them when run as root on a Debian-like system; elsewhere says what to install.
set -euo pipefail
have_broker() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }
have_fmnist() { [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; }
have_chromium() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }
if have_broker && have_fmnist && have_chromium; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing mosquitto, dataset-fashion-mnist, chromium and chromium-driver with apt-get"
  if apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto dataset-fashion-mnist \
      chromium chromium-driver; then
    exit 0
  fi
  echo "warning: apt-get failed; going on (nmoe falls back to its embedded amqtt broker, and tests that" \
    "need Fashion-MNIST, or chromium for the dashboard's browser test, are skipped)"
fi
have_broker || echo "note: no mosquitto binary found; nmoe falls back to its embedded amqtt broker." \
  "Install mosquitto (Debian/Ubuntu: apt-get install mosquitto; macOS: brew install mosquitto) for the real one."
have_fmnist || echo "note: Fashion-MNIST not found in /usr/share/datasets/fashion-mnist." \
  "On Debian: apt-get install dataset-fashion-mnist; or put the four IDX .gz files in ./data/fashion-mnist" \
  "or \$NMOE_DATA/fashion-mnist; or let torchvision download them (needs internet)."
have_chromium || echo "note: chromium/chromedriver not found; the dashboard's browser test is skipped." \
  "On Debian: apt-get install chromium chromium-driver."
