#!/usr/bin/env bash
# Install the Vantage probe as a systemd service (Raspberry Pi OS, Debian, Ubuntu).
#
#   sudo ./deploy/install.sh                      # from the checkout this script is in
#   sudo ./deploy/install.sh --from vantage_probe-0.1.0-py3-none-any.whl
#   sudo ./deploy/install.sh --uninstall          # keeps /var/lib/vantage (measurements)
#   sudo ./deploy/install.sh --uninstall --purge  # removes everything, the user too
#   ./deploy/install.sh --dry-run                 # print every action, change nothing
#   ./deploy/install.sh --root /tmp/stage         # install into a staging root (CI)
#
# Options:
#   --from PATH    a checkout (a directory with pyproject.toml) or a wheel to install;
#                  default: the checkout this script lives in
#   --root DIR     install under DIR instead of /: no user is created, nothing is
#                  chowned and systemd is not touched (each skipped step is printed)
#   --dry-run      print each action instead of doing it
#   --uninstall    stop and remove the service, the virtualenv and the command; the
#                  config is removed only if unchanged; /var/lib/vantage is kept
#   --purge        with --uninstall: also remove /var/lib/vantage, /etc/vantage and
#                  the vantage user
#   --offline      install without a network: the virtualenv uses the system's Python
#                  packages (--system-site-packages) and pip installs Vantage alone
#                  (--no-deps --no-build-isolation --no-index; needs setuptools and
#                  wheel on the system); the IP databases are not fetched (unless
#                  --geoip-from names a mirror). Tests use it.
#   --no-download  do not fetch the IP databases
#   --geoip-from URL  fetch them from this mirror of DB-IP's free downloads
#                  (files dbip-asn-lite-YYYY-MM.mmdb.gz, dbip-country-lite-...);
#                  also with --offline (a mirror on the local network)
#   --no-enable    install the unit, but do not enable or start it
#   --add-user USER  add USER to the vantage group, so that USER's own `vantage status`
#                  and `vantage export` can read the probe's data (default: the user
#                  who ran sudo, $SUDO_USER)
#   --no-add-user  add nobody to the group
#   -h, --help     this text
#
# Environment: VANTAGE_INSTALL_OFFLINE=1 is --offline; PYTHON names the Python that
# creates the virtualenv (default python3, 3.11 or newer).
#
# Running it again is safe: what is already in place is left alone ("unchanged"), the
# config file is never overwritten, and the last line says how many things changed.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SERVICE_USER=vantage
PYTHON=${PYTHON:-python3}

from=""
root=""
dry_run=0
uninstall=0
purge=0
offline=0
download=1
geoip_from=""
enable=1
# The volunteer who ran `sudo ./install.sh` joins the vantage group (status, export).
add_user=${SUDO_USER:-}
[[ $add_user == root ]] && add_user=""
[[ ${VANTAGE_INSTALL_OFFLINE:-0} == 1 ]] && offline=1

usage() {
  sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

note() {
  echo "note: $*"
}

die() {
  echo "install.sh: $*" >&2
  exit 1
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --from) [[ $# -ge 2 ]] || die "--from needs a path"; from=$2; shift 2 ;;
    --root) [[ $# -ge 2 ]] || die "--root needs a directory"; root=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    --offline) offline=1; shift ;;
    --no-download) download=0; shift ;;
    --geoip-from) [[ $# -ge 2 ]] || die "--geoip-from needs a URL"; geoip_from=$2; shift 2 ;;
    --no-enable) enable=0; shift ;;
    --add-user) [[ $# -ge 2 ]] || die "--add-user needs a user name"; add_user=$2; shift 2 ;;
    --no-add-user) add_user=""; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ $purge == 1 && $uninstall == 0 ]] && die "--purge goes with --uninstall"
if [[ -n $root ]]; then
  [[ $root == /* ]] || root="$PWD/$root"
  root=${root%/}
fi
[[ $offline == 1 && -z $geoip_from ]] && download=0
GEOIP_BASE=${geoip_from:-https://download.db-ip.com/free}

# Paths as the installed system sees them, and where this run writes them.
PREFIX=/opt/vantage
ETC=/etc/vantage
DATA=/var/lib/vantage
UNIT=/etc/systemd/system/vantage.service
LINK=/usr/local/bin/vantage
CONFIG=$ETC/vantage.toml
SOURCE_STAMP=$PREFIX/.vantage-source
CONFIG_STAMP=$PREFIX/.vantage-config.sha256
ASN_DB=dbip-asn-lite.mmdb
COUNTRY_DB=dbip-country-lite.mmdb

changes=0

at() { printf '%s%s' "$root" "$1"; }

changed() {
  changes=$((changes + 1))
  if [[ $dry_run == 1 ]]; then echo "would: $*"; else echo "done: $*"; fi
}
same() { echo "unchanged: $*"; }
skipped() { echo "skipped: $*"; }

# Run a command that changes the system, or print it (--dry-run).
run() {
  if [[ $dry_run == 1 ]]; then
    printf '  $'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# On the real system only: users, ownership and systemd are not staged.
real_system() { [[ -z $root ]]; }

systemd_running() { real_system && [[ -d /run/systemd/system ]]; }

if [[ $dry_run == 0 && -z $root && $(id -u) != 0 ]]; then
  die "run it as root (sudo $0), or use --dry-run or --root DIR"
fi

# -- uninstall ---------------------------------------------------------------------------

do_uninstall() {
  if systemd_running && [[ -f $UNIT ]]; then
    changed "stop and disable the service"
    run systemctl disable --now vantage.service || true
  elif ! real_system; then
    skipped "systemctl disable --now vantage (--root: systemd is not touched)"
  fi
  if [[ -f $(at "$UNIT") ]]; then
    changed "remove $(at "$UNIT")"
    run rm -f "$(at "$UNIT")"
    if systemd_running; then run systemctl daemon-reload; fi
  else
    same "no unit at $(at "$UNIT")"
  fi
  local link
  link=$(at "$LINK")
  if [[ -L $link && $(readlink "$link") == "$PREFIX/bin/vantage" ]]; then
    changed "remove the command $link"
    run rm -f "$link"
  fi
  local config stamp=""
  config=$(at "$CONFIG")
  [[ -f $(at "$CONFIG_STAMP") ]] && stamp=$(cat "$(at "$CONFIG_STAMP")")
  if [[ -d $(at "$PREFIX") ]]; then
    changed "remove the virtualenv $(at "$PREFIX")"
    run rm -rf "$(at "$PREFIX")"
  else
    same "no virtualenv at $(at "$PREFIX")"
  fi
  if [[ $purge == 1 ]]; then
    if [[ -d $(at "$ETC") ]]; then
      changed "remove the configuration $(at "$ETC")"
      run rm -rf "$(at "$ETC")"
    fi
    if [[ -d $(at "$DATA") ]]; then
      changed "remove the data $(at "$DATA") (measurements, probe id, consent)"
      run rm -rf "$(at "$DATA")"
    fi
    if real_system && getent passwd "$SERVICE_USER" >/dev/null; then
      changed "remove the user $SERVICE_USER"
      run userdel "$SERVICE_USER"
    elif ! real_system; then
      skipped "userdel $SERVICE_USER (--root)"
    fi
  else
    if [[ -f $config ]]; then
      if [[ -n $stamp && $(sha256sum "$config" | cut -d' ' -f1) == "$stamp" ]]; then
        changed "remove the unchanged configuration $config"
        run rm -f "$config"
        run rmdir --ignore-fail-on-non-empty "$(at "$ETC")"
      else
        echo "kept: $config (changed by you; --purge removes it)"
      fi
    fi
    [[ -d $(at "$DATA") ]] && echo "kept: $(at "$DATA") (measurements; --purge removes it)"
    real_system && getent passwd "$SERVICE_USER" >/dev/null \
      && echo "kept: the user $SERVICE_USER (owns the kept data; --purge removes it)"
  fi
  finish
}

finish() {
  if [[ $changes == 0 ]]; then
    echo "nothing changed"
  elif [[ $dry_run == 1 ]]; then
    echo "$changes change(s) would be made (dry run: nothing was done)"
  else
    echo "$changes change(s) made"
  fi
}

# -- install -----------------------------------------------------------------------------

# A fingerprint of what would be installed: reinstall only when it changes.
source_stamp() {
  if [[ -f $from ]]; then
    sha256sum "$from" | cut -d' ' -f1
    return
  fi
  (
    cd "$from"
    local part parts=()
    for part in pyproject.toml README.md probe schema collectors; do
      if [[ -e $part ]]; then parts+=("$part"); fi
    done
    find "${parts[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' \
      | LC_ALL=C sort | xargs -d '\n' sha256sum | sha256sum | cut -d' ' -f1
  )
}

recent_python() {
  command -v "$1" >/dev/null 2>&1 && "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))'
}

check_python() {
  if ! recent_python "$PYTHON"; then
    local found="" candidate was="not found"
    if command -v "$PYTHON" >/dev/null 2>&1; then was=$("$PYTHON" -V 2>&1); fi
    for candidate in python3.13 python3.12 python3.11; do
      if recent_python "$candidate"; then found=$candidate; break; fi
    done
    if [[ -z $found ]]; then
      die "Vantage needs Python 3.11 or newer ($PYTHON: $was), and none is installed.
  Raspberry Pi OS bullseye (Debian 11) ships Python 3.9: upgrade to bookworm (Debian 12)
  or later, or install a Python 3.11+ and run: sudo PYTHON=/path/to/python3.11 $0"
    fi
    note "$PYTHON is $was: using $found, which is recent enough"
    PYTHON=$found
  fi
  if [[ $offline == 0 ]] && ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    local venv_pkg
    venv_pkg="python3.$("$PYTHON" -c 'import sys; print(sys.version_info[1])')-venv"
    if real_system && command -v apt-get >/dev/null; then
      changed "install python3-venv (virtualenvs need it): apt-get update, then install"
      run apt-get update -qq \
        || die "apt-get update failed: check the network and /etc/apt/sources.list, then run $0 again"
      run apt-get install -y python3-venv "$venv_pkg" || run apt-get install -y python3-venv \
        || die "apt-get cannot install python3-venv: install it by hand, then run $0 again"
    else
      die "$PYTHON cannot make virtualenvs: install python3-venv (or $venv_pkg), then run $0 again"
    fi
  fi
}

ensure_user() {
  if ! real_system; then
    skipped "useradd $SERVICE_USER (--root: users are not staged)"
  elif getent passwd "$SERVICE_USER" >/dev/null; then
    same "user $SERVICE_USER exists"
  else
    changed "create the system user $SERVICE_USER"
    run useradd --system --user-group --home-dir "$DATA" --no-create-home \
      --shell /usr/sbin/nologin --comment "Vantage probe" "$SERVICE_USER"
  fi
}

# ensure_dir PATH MODE [OWNER]
ensure_dir() {
  local path mode=$2 owner=${3:-}
  path=$(at "$1")
  if [[ -d $path ]]; then
    same "directory $path"
  else
    changed "create $path"
    run install -d -m "$mode" "$path"
  fi
  if [[ -z $owner ]]; then
    return
  elif ! real_system; then
    skipped "chown $owner $path (--root)"
  elif [[ $(stat -c %U "$path" 2>/dev/null || true) != "$owner" ]]; then
    changed "give $path to $owner"
    run chown "$owner:$owner" "$path"
  fi
}

ensure_venv() {
  local venv
  venv=$(at "$PREFIX")
  if [[ -x $venv/bin/python ]] && "$venv/bin/python" -c 'import sys' 2>/dev/null; then
    same "virtualenv $venv"
    return
  fi
  changed "create the virtualenv $venv"
  [[ -e $venv ]] && run rm -rf "$venv"
  if [[ $offline == 1 ]]; then
    run "$PYTHON" -m venv --system-site-packages --without-pip "$venv"
  else
    run "$PYTHON" -m venv "$venv"
  fi
}

ensure_package() {
  local venv stamp
  venv=$(at "$PREFIX")
  stamp=$(source_stamp)
  if [[ -x $venv/bin/vantage && -f $(at "$SOURCE_STAMP") && $(cat "$(at "$SOURCE_STAMP")") == "$stamp" ]]; then
    same "Vantage from $from"
    return
  fi
  changed "install Vantage from $from into $venv"
  local pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input)
  if [[ $offline == 1 ]]; then
    run "${pip[@]}" --no-deps --no-build-isolation --no-index "$from"
  else
    run "${pip[@]}" "$from"
    # A wheel of the same version counts as installed: replace it all the same.
    if [[ -f $from ]]; then run "${pip[@]}" --force-reinstall --no-deps "$from"; fi
  fi
  if [[ $dry_run == 0 ]]; then echo "$stamp" >"$(at "$SOURCE_STAMP")"; fi
  if [[ $dry_run == 0 ]] && ! "$venv/bin/python" -c 'import maxminddb.extension' 2>/dev/null; then
    note "maxminddb's C extension was not built here (no compiler or Python headers):" \
      "the pure-Python reader is used instead; IP lookups are slower, results the same"
  fi
}

# The volunteer's own account may read status and export: it joins the service's group.
ensure_group_member() {
  local user=$add_user
  if [[ -z $user ]]; then
    return
  elif ! real_system; then
    skipped "usermod -aG $SERVICE_USER $user (--root)"
  elif ! getent passwd "$user" >/dev/null; then
    note "no user $user: nobody was added to the $SERVICE_USER group"
  elif id -nG "$user" | tr ' ' '\n' | grep -qx "$SERVICE_USER"; then
    same "$user is in the $SERVICE_USER group"
  else
    changed "add $user to the $SERVICE_USER group (status, export; log in again to use it)"
    run usermod -aG "$SERVICE_USER" "$user"
  fi
}

ensure_link() {
  local link
  link=$(at "$LINK")
  if [[ -L $link && $(readlink "$link") == "$PREFIX/bin/vantage" ]]; then
    same "command $link"
    return
  fi
  [[ -e $link && ! -L $link ]] && die "$link exists and is not ours: remove it first"
  changed "link $link -> $PREFIX/bin/vantage"
  run install -d -m 0755 "$(dirname "$link")"
  run ln -sfn "$PREFIX/bin/vantage" "$link"
}

# Fetch DB-IP's free ASN and country databases (CC BY 4.0), this month's or last
# month's, into the data directory. Best effort: without Internet it is skipped.
fetch_databases() {
  if [[ $download == 0 ]]; then
    skipped "IP databases not fetched (--offline or --no-download): $DATA/$ASN_DB, $DATA/$COUNTRY_DB"
    return
  fi
  local kind file python
  python=$(at "$PREFIX")/bin/python
  for kind in asn country; do
    file=$(at "$DATA")/dbip-$kind-lite.mmdb
    if [[ -s $file ]]; then
      same "IP database $file"
      continue
    fi
    if [[ $dry_run == 1 ]]; then
      changed "fetch the DB-IP lite $kind database into $file"
      echo "  \$ $python - <<download $GEOIP_BASE/dbip-$kind-lite-YYYY-MM.mmdb.gz>>"
      continue
    fi
    if ! "$python" - "$GEOIP_BASE" "$kind" "$file" <<'PY'; then
import datetime, gzip, os, shutil, sys, urllib.request
import maxminddb
base, kind, dest = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
first = datetime.date.today().replace(day=1)
last_month = (first - datetime.timedelta(days=1)).replace(day=1)
error = None
for month in (first, last_month):
    url = f"{base}/dbip-{kind}-lite-{month:%Y-%m}.mmdb.gz"
    part = dest + ".part"
    try:
        with urllib.request.urlopen(url, timeout=30) as answer, open(part, "wb") as out:
            with gzip.GzipFile(fileobj=answer) as unzipped:
                shutil.copyfileobj(unzipped, out)
        maxminddb.open_database(part).close()  # a whole, valid database, or nothing
    except Exception as exc:  # offline, not published yet, damaged: try the next
        error = exc
        if os.path.exists(part):
            os.unlink(part)
        continue
    os.replace(part, dest)
    print(f"  fetched {url}")
    sys.exit(0)
print(f"  cannot fetch the {kind} database ({error}); skipped", file=sys.stderr)
sys.exit(1)
PY
      skipped "IP database $file (no Internet?); run this script again later"
      continue
    fi
    changed "fetched the DB-IP lite $kind database into $file"
    if real_system; then chown "$SERVICE_USER:$SERVICE_USER" "$file"; fi
  done
}

ensure_config() {
  local config
  config=$(at "$CONFIG")
  if [[ -f $config ]]; then
    same "configuration $config (never overwritten)"
    local kind
    for kind in asn country; do
      if [[ -s $(at "$DATA")/dbip-$kind-lite.mmdb ]] && ! grep -q "^${kind}_db *=" "$config"; then
        echo "note: $DATA/dbip-$kind-lite.mmdb is there; set vantage.${kind}_db in $CONFIG to use it"
      fi
    done
    return
  fi
  changed "install the configuration $config (from deploy/vantage.toml.example)"
  # The example with this layout switched on: the data directory, and the IP
  # databases that are present.
  local script='s|^# data_dir = "/var/lib/vantage"$|data_dir = "/var/lib/vantage"|'
  [[ -s $(at "$DATA")/$ASN_DB ]] && script+=";s|^# asn_db = |asn_db = |"
  [[ -s $(at "$DATA")/$COUNTRY_DB ]] && script+=";s|^# country_db = |country_db = |"
  if [[ $dry_run == 1 ]]; then
    echo "  \$ sed -e '$script' $SCRIPT_DIR/vantage.toml.example > $config"
    return
  fi
  install -d -m 0755 "$(at "$ETC")"
  sed -e "$script" "$SCRIPT_DIR/vantage.toml.example" >"$config.new"
  chmod 0640 "$config.new"
  if real_system; then chgrp "$SERVICE_USER" "$config.new"; fi
  mv "$config.new" "$config"
  sha256sum "$config" | cut -d' ' -f1 >"$(at "$CONFIG_STAMP")"
  real_system || skipped "chgrp $SERVICE_USER $config (--root)"
}

unit_changed=0
ensure_unit() {
  local unit
  unit=$(at "$UNIT")
  if [[ -f $unit ]] && cmp -s "$SCRIPT_DIR/vantage.service" "$unit"; then
    same "systemd unit $unit"
    return
  fi
  unit_changed=1
  changed "install the systemd unit $unit"
  run install -d -m 0755 "$(dirname "$unit")"
  run install -m 0644 "$SCRIPT_DIR/vantage.service" "$unit"
}

ensure_service() {
  if ! real_system; then
    skipped "systemctl daemon-reload; systemctl enable --now vantage (--root)"
    return
  fi
  if ! systemd_running; then
    if command -v sudo >/dev/null 2>&1; then
      skipped "systemd is not running here: start the probe with 'sudo -u $SERVICE_USER $LINK daemon'"
    else
      skipped "systemd is not running here: start the probe with 'su -s /bin/sh $SERVICE_USER -c \"$LINK daemon\"'"
    fi
    return
  fi
  if [[ $unit_changed == 1 || $package_changed == 1 ]]; then
    run systemctl daemon-reload
  fi
  if [[ $enable == 0 ]]; then
    skipped "systemctl enable --now vantage (--no-enable)"
  elif systemctl is-enabled --quiet vantage.service 2>/dev/null \
    && systemctl is-active --quiet vantage.service 2>/dev/null; then
    if [[ $unit_changed == 1 || $package_changed == 1 ]]; then
      changed "restart the service (new software or unit)"
      run systemctl restart vantage.service
    else
      same "service enabled and running"
    fi
  else
    changed "enable and start the service"
    run systemctl enable --now vantage.service
  fi
}

next_steps() {
  [[ $dry_run == 1 ]] && return
  # Only commands this system has: sudo or su, systemd or not.
  local svc="sudo -u $SERVICE_USER" q="" admin="sudo " edit="sudoedit $CONFIG"
  if ! command -v sudo >/dev/null 2>&1; then
    svc="su -s /bin/sh $SERVICE_USER -c" q="'" admin="" edit="\$EDITOR $CONFIG (as root)"
  fi
  echo
  echo "Next steps:"
  echo "  $svc ${q}vantage consent${q}   # what Vantage does, keeps, shares, risks"
  if systemd_running; then
    echo "  ${admin}systemctl restart vantage   # it measures only once you have consented"
  else
    echo "  $svc ${q}$LINK daemon${q} &   # no systemd here: start the daemon yourself"
  fi
  echo "  ${admin}vantage doctor   # permissions, clock, disk, resolver, database"
  if [[ -n $add_user ]]; then
    echo "  vantage status   # as $add_user, once logged in again (group $SERVICE_USER)"
  else
    echo "  ${admin}vantage status   # or as any member of the $SERVICE_USER group"
  fi
  if systemd_running; then
    echo "  journalctl -u vantage -f   # the daemon's log"
    echo "  $edit   # then: ${admin}systemctl reload vantage"
  else
    echo "  $edit   # then restart the daemon"
  fi
}

do_install() {
  if [[ -z $from ]]; then from=$(dirname "$SCRIPT_DIR"); fi
  [[ $from == /* ]] || from="$PWD/$from"
  if [[ -d $from ]]; then
    [[ -f $from/pyproject.toml ]] || die "--from $from: no pyproject.toml (not a checkout)"
  elif [[ ! -f $from || $from != *.whl ]]; then
    die "--from $from: not a checkout directory or a .whl file"
  fi
  [[ -f $SCRIPT_DIR/vantage.service && -f $SCRIPT_DIR/vantage.toml.example ]] \
    || die "$SCRIPT_DIR must hold vantage.service and vantage.toml.example"
  [[ -n $root ]] && echo "installing into the staging root $root"
  check_python
  ensure_user
  ensure_group_member
  ensure_dir "$ETC" 0755
  ensure_dir "$DATA" 0750 "$SERVICE_USER"
  ensure_venv
  local before=$changes
  ensure_package
  package_changed=$((changes > before ? 1 : 0))
  ensure_link
  fetch_databases
  ensure_config
  ensure_unit
  ensure_service
  finish
  next_steps
}

package_changed=0
if [[ $uninstall == 1 ]]; then
  do_uninstall
else
  do_install
fi
