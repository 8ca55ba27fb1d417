# Sourced by the setup scripts of Python peers: ensure_venv DIR makes a virtualenv at DIR
# (installing Debian's python3-venv when python3 lacks it) unless a complete one is there.
ensure_venv() {
  local venv=$1
  # A venv without pip is one whose creation was cut off (or failed half-way): start it again.
  if [ -x "$venv/bin/python" ] && [ -x "$venv/bin/pip" ]; then
    return 0
  fi
  rm -rf "$venv"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian splits venv support out of python3.
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
  fi
}
