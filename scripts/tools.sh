#!/usr/bin/env bash
# Make sure the command-line tools the tests drive are installed: nginx, promtool, amtool, chromium, node/npm.
#
#   scripts/tools.sh ensure   install what is missing (Debian packages, as root); exit 1 if anything stays missing
#   scripts/tools.sh check    only check; exit 1 if anything is missing
#
# Tests never skip when a tool is missing: a missing tool is a red CI, and this script says how to fix it.
set -euo pipefail

log() { printf 'tools: %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

# command → Debian package that provides it (one per line: "command package").
TOOLS=(
    "nginx nginx-light"
    "promtool prometheus"
    "amtool prometheus-alertmanager"
    "prometheus-alertmanager prometheus-alertmanager"  # the server itself: tests/deploy/test_alertmanager.py
    "chromium chromium"
    "openssl openssl"
    "node nodejs"
    "npm npm"
    "kubectl kubectl"
)

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"
    elif have sudo; then sudo -n "$@"
    else log "need root to run: $*"; return 1
    fi
}

missing() {
    local entry cmd pkg
    for entry in "${TOOLS[@]}"; do
        read -r cmd pkg <<<"$entry"
        have "$cmd" || [[ -x /usr/sbin/$cmd ]] || printf '%s\n' "$pkg"
    done
}

case "${1:-ensure}" in
    check)
        pkgs=$(missing)
        [[ -z $pkgs ]] || { log "missing Debian packages: $(echo $pkgs)"; exit 1; }
        ;;
    ensure)
        pkgs=$(missing)
        if [[ -n $pkgs ]]; then
            log "installing: $(echo $pkgs)"
            # shellcheck disable=SC2086
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs >&2 \
                || { as_root apt-get update -q >&2 && as_root env DEBIAN_FRONTEND=noninteractive \
                        apt-get install -y -q --no-install-recommends $pkgs >&2; } \
                || { log "apt-get install failed for: $(echo $pkgs)"; exit 1; }
            pkgs=$(missing)
            [[ -z $pkgs ]] || { log "still missing after install: $(echo $pkgs)"; exit 1; }
        fi
        ;;
    *) log "usage: $0 ensure|check"; exit 2 ;;
esac
