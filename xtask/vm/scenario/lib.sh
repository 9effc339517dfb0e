# Helpers of the real-host scenarios (sourced). Each check prints one line, `ok:` or `FAIL:`
# with what it saw; `finish` prints the verdict the host looks for (VMTEST PASS / FAIL) and,
# on failure, the unit's journal.

fails=0
T0=$(date +%s)

step() { printf '\n== [%4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
ok() { echo "  ok: $*"; }
fail() {
    echo "  FAIL: $*"
    fails=$((fails + 1))
}
# Indented output of a command that failed a check.
show() { sed 's/^/      | /' | head -n "${1:-40}"; }

# check WHAT COMMAND...: the command must succeed.
check() {
    local what=$1 out
    shift
    if out=$("$@" 2>&1); then ok "$what"; else
        fail "$what: \`$*\` failed"
        echo "$out" | show
    fi
}

# check_not WHAT COMMAND...: the command must fail.
check_not() {
    local what=$1 out
    shift
    if out=$("$@" 2>&1); then
        fail "$what: \`$*\` succeeded"
        echo "$out" | show
    else ok "$what"; fi
}

# expect WHAT REGEX COMMAND...: the command's output (stdout and stderr) must match REGEX.
expect() {
    local what=$1 re=$2 out
    shift 2
    out=$("$@" 2>&1)
    if grep -qE -- "$re" <<<"$out"; then
        ok "$what ($(tr '\n' ' ' <<<"$out" | cut -c1-110))"
    else
        fail "$what: wanted /$re/ from \`$*\`, got:"
        echo "$out" | show
    fi
}

# wait_for WHAT SECONDS COMMAND...: polls until the command succeeds.
wait_for() {
    local what=$1 secs=$2 i
    shift 2
    for ((i = 0; i < secs * 4; i++)); do
        if "$@" >/dev/null 2>&1; then
            ok "$what"
            return 0
        fi
        sleep 0.25
    done
    fail "$what: not within ${secs}s"
    return 1
}

# The probe (tests/src/bin/probe.rs) on this host, and in a container (docker exec).
probe() { /vmtest/probe "$@"; }
in_ctr() {
    local c=$1
    shift
    docker exec "$c" /probe "$@"
}

# Audit records (JSON lines) matching a jq filter, counted.
records() { jq -c "select($1)" /var/log/egress-guard/audit.jsonl 2>/dev/null; }
has_record() { [ -n "$(records "$1" | head -n 1)" ]; }

# The VPC around the host, as stand-ins (the VM has no network): the Amazon-provided
# resolver and time service on a dummy interface of the host (as on EC2, where they are
# link-local), and, beyond a router, an "LLM API" that answers for api.openai.com and a site
# no policy allows: in a network namespace of their own behind a veth, since the agent never
# learns this host's own addresses from DNS.
VPC_DNS=169.254.169.253
VPC_NTP=169.254.169.123
LLM_ADDR=10.88.0.10
OTHER_ADDR=10.88.0.11
vpc_stand_ins() {
    modprobe dummy
    ip link add vpc0 type dummy
    ip link set vpc0 up
    for a in $VPC_DNS $VPC_NTP; do ip addr add "$a/32" dev vpc0; done
    ip netns add remote
    ip link add vpc-gw type veth peer name eth0 netns remote
    ip addr add 10.88.0.1/24 dev vpc-gw
    ip link set vpc-gw up
    ip -n remote link set lo up
    ip -n remote link set eth0 up
    for a in $LLM_ADDR $OTHER_ADDR; do ip -n remote addr add "$a/24" dev eth0; done
    ip -n remote route add default via 10.88.0.1
    # The host routes between the containers' bridges and the "VPC" (Docker turns this on
    # too, with its own forwarding rules and masquerading for the bridges).
    echo 1 >/proc/sys/net/ipv4/ip_forward
    dnsmasq --no-resolv --no-hosts --user=root --bind-interfaces --listen-address=$VPC_DNS \
        --address=/api.openai.com/$LLM_ADDR --address=/attacker.example/$OTHER_ADDR \
        --log-queries --log-facility=/var/log/vpc-dns.log --pid-file=/run/vpc-dns.pid
    ip netns exec remote /vmtest/probe serve-forever $LLM_ADDR:443 >/dev/null &
    ip netns exec remote /vmtest/probe serve-forever $OTHER_ADDR:443 >/dev/null &
    ip netns exec remote /vmtest/probe serve-forever $OTHER_ADDR:80 >/dev/null &
    for a in $LLM_ADDR:443 $OTHER_ADDR:443 $OTHER_ADDR:80; do
        for _ in $(seq 1 40); do probe tcp $a >/dev/null && break; sleep 0.25; done
    done
}

# The package version in a .deb file name (egress-guard_VERSION_amd64.deb).
deb_version() { basename "$1" | cut -d_ -f2; }

finish() {
    step "verdict"
    if ((fails)); then
        echo "--- journalctl -u egress-guard (last 150 lines) ---"
        journalctl -u egress-guard --no-pager -n 150 -o short-monotonic
        echo "VMTEST FAIL: $fails check(s) failed"
    else
        echo "VMTEST PASS"
    fi
    sync
}
