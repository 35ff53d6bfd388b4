# Sourced by .ci/run: a Debian testing ("forky") root with Python 3.14 and 3.15 and
# CPython's own test suites, built with debootstrap, kept between runs on the same
# machine while it still works, and entered with chroot.
#
#   root_ready          build (or reuse) the root; exits with a message naming the
#                       root, not the project, when Debian testing broke it
#   in_root CMD...      run CMD in the project directory inside the root
#
# Debian testing moves: a package can be renamed or removed, and a new upload can
# break an interpreter. Every such failure is reported as the root's, with what to do.

FORKY_ROOT=${TRACESOCK_FORKY_ROOT:-/var/cache/tracesock/forky-root}
FORKY_MIRROR=${TRACESOCK_FORKY_MIRROR:-http://deb.debian.org/debian}
FORKY_VERSIONS="3.14 3.15"
FORKY_PACKAGES="gcc,ca-certificates,iproute2"
for v in $FORKY_VERSIONS; do
    FORKY_PACKAGES="$FORKY_PACKAGES,python$v,python$v-venv,python$v-dev,libpython$v-testsuite"
done
FORKY_STAMP="$FORKY_ROOT/.tracesock-root"
# The interpreters the project was last green on in this root; another version
# (a new upload to testing, seen when the root is rebuilt) is reported as such.
FORKY_KNOWN_GOOD="3.14.8 3.15.0"
PROJECT_DIR=$(pwd)

root_failed() {
    echo "" >&2
    echo "CI: THE DEBIAN TESTING ROOT FAILED, NOT THE PROJECT: $1" >&2
    [ -f "$FORKY_ROOT.log" ] && tail -n 5 "$FORKY_ROOT.log" | sed 's/^/    | /' >&2
    echo "    root: $FORKY_ROOT (packages: $FORKY_PACKAGES)" >&2
    echo "    Debian testing moves: check that the packages above still exist under these" >&2
    echo "    names (https://packages.debian.org/forky/), adjust FORKY_PACKAGES in .ci/root.sh," >&2
    echo "    and remove $FORKY_ROOT to rebuild it; the log is $FORKY_ROOT.log" >&2
    echo "    To pin the root to a day that worked, build it from Debian's snapshot archive:" >&2
    echo "    TRACESOCK_FORKY_MIRROR=http://snapshot.debian.org/archive/debian/YYYYMMDDT000000Z/" >&2
    exit 1
}

# The interpreters' versions, "3.14.8 3.15.0"; a warning when they are not the ones
# the project was last green on, so that a failure after it is read as the root's.
FORKY_CHANGED=""
root_versions() {
    local found="" v
    for v in $FORKY_VERSIONS; do
        found="$found $(chroot "$FORKY_ROOT" "python$v" -c 'import sys; print(sys.version.split()[0])')"
    done
    found=${found# }
    echo "   Python in the root: $found (last known green: $FORKY_KNOWN_GOOD)"
    if [ "$found" != "$FORKY_KNOWN_GOOD" ]; then
        FORKY_CHANGED="$found"
        echo "CI: NOTE: the Debian testing root now has Python $found, not $FORKY_KNOWN_GOOD:" >&2
        echo "    a failure below may be the new interpreter's. Once green, set FORKY_KNOWN_GOOD" >&2
        echo "    in .ci/root.sh; to go back, rebuild from a snapshot (see TRACESOCK_FORKY_MIRROR)." >&2
    fi
}

# A failure of the project's own tests or suites in the root; names a version change.
root_project_failed() {
    echo "CI: $1 in the Debian testing root" >&2
    if [ -n "$FORKY_CHANGED" ]; then
        echo "    (the root's interpreters changed to $FORKY_CHANGED from $FORKY_KNOWN_GOOD: compare" >&2
        echo "    with a root built from a snapshot of the last green day before blaming the project)" >&2
    fi
    exit 1
}

_root_works() {
    [ -f "$FORKY_STAMP" ] && [ "$(cat "$FORKY_STAMP")" = "$FORKY_PACKAGES" ] || return 1
    for v in $FORKY_VERSIONS; do
        chroot "$FORKY_ROOT" "python$v" -c "import test.libregrtest, venv, ssl, _socket" >/dev/null 2>&1 || return 1
    done
}

_root_mounts() {
    mountpoint -q "$FORKY_ROOT/proc" || mount -t proc proc "$FORKY_ROOT/proc"
    mountpoint -q "$FORKY_ROOT/dev" || mount --rbind /dev "$FORKY_ROOT/dev"
    mkdir -p "$FORKY_ROOT$PROJECT_DIR"
    mountpoint -q "$FORKY_ROOT$PROJECT_DIR" || mount --bind "$PROJECT_DIR" "$FORKY_ROOT$PROJECT_DIR"
}

root_unmount() {
    for m in "$FORKY_ROOT$PROJECT_DIR" "$FORKY_ROOT/dev" "$FORKY_ROOT/proc"; do
        mountpoint -q "$m" 2>/dev/null && umount -R "$m" 2>/dev/null
    done
    return 0
}

root_ready() {
    if ! _root_works; then
        echo "== ci: building the Debian testing root at $FORKY_ROOT (about a minute)"
        root_unmount
        rm -rf "$FORKY_ROOT"
        mkdir -p "$(dirname "$FORKY_ROOT")"
        if ! command -v debootstrap >/dev/null; then
            (apt-get update -qq && apt-get install -y -qq debootstrap) >"$FORKY_ROOT.log" 2>&1 \
                || root_failed "could not install debootstrap from Debian's packages"
        fi
        debootstrap --variant=minbase --include="$FORKY_PACKAGES" forky "$FORKY_ROOT" "$FORKY_MIRROR" \
            /usr/share/debootstrap/scripts/sid >>"$FORKY_ROOT.log" 2>&1 \
            || root_failed "debootstrap of forky with these packages failed"
        echo "$FORKY_PACKAGES" >"$FORKY_STAMP"
    else
        echo "== ci: reusing the Debian testing root at $FORKY_ROOT"
    fi
    # What pip needs inside: this machine's CA bundle, resolver, hosts and pip settings.
    cp /etc/ssl/certs/ca-certificates.crt "$FORKY_ROOT/etc/ssl/certs/ca-certificates.crt"
    cp /etc/resolv.conf "$FORKY_ROOT/etc/resolv.conf"
    cp /etc/hosts "$FORKY_ROOT/etc/hosts"
    [ -f /etc/pip.conf ] && cp /etc/pip.conf "$FORKY_ROOT/etc/pip.conf"
    [ -d /etc/xdg/pip ] && mkdir -p "$FORKY_ROOT/etc/xdg" && cp -r /etc/xdg/pip "$FORKY_ROOT/etc/xdg/"
    _root_mounts
    _root_works || root_failed "an interpreter in the root does not start or lacks its test package"
    root_versions
}

in_root() {
    chroot "$FORKY_ROOT" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
        ${TRACESOCK_NO_SPEEDUPS:+TRACESOCK_NO_SPEEDUPS=$TRACESOCK_NO_SPEEDUPS} \
        ${PIP_CERT:+PIP_CERT=$PIP_CERT} ${PIP_DEFAULT_TIMEOUT:+PIP_DEFAULT_TIMEOUT=$PIP_DEFAULT_TIMEOUT} \
        ${SSL_CERT_FILE:+SSL_CERT_FILE=$SSL_CERT_FILE} \
        ${TRACESOCK_CONFORMANCE_REVISION:+TRACESOCK_CONFORMANCE_REVISION=$TRACESOCK_CONFORMANCE_REVISION} \
        sh -c "cd '$PROJECT_DIR' && $*"
}

# Installs the project into a venv of the root's python$1 (a failure here is the root's
# when the interpreter cannot make a venv or pip cannot reach the registry).
root_install() {
    in_root "python$1 -m venv .venv-$1" || root_failed "python$1 -m venv failed inside the root"
    in_root ".venv-$1/bin/pip install -q -e '.[test]'" \
        || root_project_failed "pip install -e '.[test]' failed on Python $1 (the registry, or the project's build)"
}
