#!/usr/bin/env bash
# test.sh — the project's one test command: sets up what is missing (./setup.sh, fast when done), checks ruff,
# then runs pytest inside a fresh network namespace holding only `lo`, so no DDS packet can leave the machine.
#   ./test.sh                 default suite (no `slow` tests)
#   ./test.sh -m slow         heavy runs;  any pytest arguments pass through
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$ROOT"
VENV=${REFINEVLA_VENV:-$ROOT/.venv}
"$ROOT/setup.sh"
# shellcheck disable=SC1091
. "$VENV/refinevla_env.sh"
export FASTRTPS_DEFAULT_PROFILES_FILE="$REFINEVLA_FASTDDS_LOOPBACK"
unset ROS_AUTOMATIC_DISCOVERY_RANGE ROS_LOCALHOST_ONLY
export ROS_LOG_DIR=${ROS_LOG_DIR:-$(mktemp -d /tmp/refinevla-roslog.XXXX)}

echo "[test] ruff check" >&2
"$VENV/bin/ruff" check "$ROOT"

ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(-m "not slow")
set +e
if unshare -n true 2>/dev/null; then
  echo "[test] pytest inside a network namespace with only loopback" >&2
  unshare -n bash -c 'ip link set lo up && REFINEVLA_NETNS=1 exec "$0" -m pytest "$@"' "$VENV/bin/python" "${ARGS[@]}"
else
  echo "[test] WARNING: cannot create a network namespace (unshare -n); DDS is restricted to 127.0.0.1 by profile" >&2
  "$VENV/bin/python" -m pytest "${ARGS[@]}"
fi
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "[test] pytest collected no tests for: ${ARGS[*]}" >&2; rc=0; fi
exit $rc
