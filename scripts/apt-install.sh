# Sourced by the test scripts (test.sh, compose-test.sh):
# `apt_install PACKAGE...` installs what a test needs with apt-get
# (`apt-get update` first), as root or through sudo; with no package it
# does nothing. The caller defines `step` for its progress line.
apt_install() {
  [ $# -gt 0 ] || return 0
  step "installing $* (apt-get)"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}
