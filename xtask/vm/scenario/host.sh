#!/bin/bash
# The real-host scenario: a new operator puts egress-guard on a Debian 12 OpenHands host with
# systemd and Docker, following docs/operator-guide.md step by step, and checks what the
# README promises. The containers run the test probe (tests/src/bin/probe.rs) and the Docker
# client, from an image imported without a registry.
. /vmtest/lib.sh
deb1=$(ls /vmtest/debs/first/egress-guard_*.deb)
deb2=$(ls /vmtest/debs/upgrade/egress-guard_*.deb)
app=openhands-app
audit=/var/log/egress-guard/audit.jsonl

step "the VPC stand-ins: resolver $VPC_DNS (dnsmasq), time service $VPC_NTP, api.openai.com = $LLM_ADDR"
vpc_stand_ins
docker import /vmtest/probe-image.tar local/probe >/dev/null

step "guide §2: install the package ($(deb_version "$deb1")); the shipped unit starts under systemd"
expect "apt install" "Setting up egress-guard" apt install -y "$deb1"
check "egress-guard.service is active" systemctl is-active egress-guard
expect "READY, with its status" '^enforcing 3 policies' systemctl show -p StatusText --value egress-guard
check "openhands.slice is active" systemctl is-active openhands.slice
expect "the socket guard is the BPF LSM" 'socket guard: lsm' egress-guard status
expect "the unit's exposure score" 'Overall exposure level' sh -c 'systemd-analyze security egress-guard --no-pager | tail -n 1'

step "guide §3(a): Docker puts every container in openhands.slice"
cp /usr/share/doc/egress-guard/daemon.json.example /etc/docker/daemon.json
check "systemctl restart docker" systemctl restart docker
expect "docker info" '^systemd cgroup v2$' docker info --format '{{.CgroupDriver}} cgroup v{{.CgroupVersion}}'

step "guide §3: the OpenHands app, started the usual way"
check "docker run $app" docker run -d --name $app --add-host host.docker.internal:host-gateway \
    -v /var/run/docker.sock:/var/run/docker.sock local/probe /bin/sleep 3600
app_id=$(docker inspect -f '{{.Id}}' $app)
check "its cgroup is under the slice" test -d "/sys/fs/cgroup/openhands.slice/docker-$app_id.scope"
wait_for "egress-guard targets: $app has policy openhands-app" 10 \
    sh -c "egress-guard targets --json | jq -e '.targets[].containers[] | select(.name == \"$app\" and .policy == \"openhands-app\")'"
expect "app: api.openai.com by name (resolv.conf: the VPC resolver)" "^$LLM_ADDR:443 ok" in_ctr $app tcp-name api.openai.com:443
expect "app: NTP to the time service" '^ok' in_ctr $app udp $VPC_NTP:123
expect "app: a site no entry allows, by address" '^EPERM' in_ctr $app tcp $OTHER_ADDR:443
expect "app: a name no entry allows" 'err lookup' in_ctr $app tcp-name attacker.example:443
expect "app: the instance metadata service" '^EPERM' in_ctr $app tcp 169.254.169.254:80
expect "app: the host" '^EPERM' in_ctr $app tcp 172.17.0.1:22
wait_for "records name the app: an allowed net.connect with hostnames" 10 \
    has_record ".type == \"net.connect\" and .verdict == \"allow\" and .container == \"${app_id:0:12}\" and .container_name == \"$app\" and (.hostnames | index(\"api.openai.com\"))"
wait_for "records name the app: the refused name" 10 \
    has_record ".type == \"dns\" and .verdict == \"refuse\" and .query == \"attacker.example\" and .container_name == \"$app\""
# Allowed sends are counted in the kernel and written once per udp_aggregate_seconds (10 s).
wait_for "records name the app: its NTP send, counted" 20 \
    has_record ".type == \"net.send\" and .verdict == \"allow\" and .dst == \"$VPC_NTP\" and .port == 123 and .count >= 1 and .container_name == \"$app\""
wd1=$(systemctl show -p WatchdogTimestampMonotonic --value egress-guard)

step "an OpenHands sandbox the app starts through the Docker socket: the agent server calls the LLM"
# OpenHands V1 runs the agent loop in the sandbox (oh-agent-server-<id>): it reaches the LLM by
# name and the app's webhook on the host gateway, and nothing else.
check "docker run oh-agent-server-1" docker exec $app docker run -d --name oh-agent-server-1 \
    --add-host host.docker.internal:host-gateway --cap-add NET_RAW local/probe /bin/sleep 600
wait_for "egress-guard targets: oh-agent-server-1 has policy openhands-agent-server" 10 \
    sh -c "egress-guard targets --json | jq -e '.targets[].containers[] | select(.name == \"oh-agent-server-1\" and .policy == \"openhands-agent-server\")'"
expect "agent server: api.openai.com by name" "^$LLM_ADDR:443 ok" in_ctr oh-agent-server-1 tcp-name api.openai.com:443
probe serve-forever 172.17.0.1:3000 >/dev/null 2>&1 &  # the app's published port, stood in for
webhook=$!
sleep 0.5
expect "agent server: the app's webhook on the host gateway" '^ok' in_ctr oh-agent-server-1 tcp 172.17.0.1:3000
kill $webhook
expect "agent server: another port of the host" '^EPERM' in_ctr oh-agent-server-1 tcp 172.17.0.1:22
expect "agent server: a site no entry allows, by address" '^EPERM' in_ctr oh-agent-server-1 tcp $OTHER_ADDR:443
expect "agent server: a name no entry allows" 'err lookup' in_ctr oh-agent-server-1 tcp-name attacker.example:443
expect "agent server: the instance metadata service" '^EPERM' in_ctr oh-agent-server-1 tcp 169.254.169.254:80
expect "agent server: the time service" '^EPERM' in_ctr oh-agent-server-1 udp $VPC_NTP:123
expect "agent server: AF_PACKET" '^EPERM' in_ctr oh-agent-server-1 packet
wait_for "records name the agent server: the allowed LLM call, with its hostname" 10 \
    has_record '.type == "net.connect" and .verdict == "allow" and .container_name == "oh-agent-server-1" and .policy == "openhands-agent-server" and (.hostnames | index("api.openai.com"))'
wait_for "records name the agent server: the refused name" 10 \
    has_record '.type == "dns" and .verdict == "refuse" and .query == "attacker.example" and .container_name == "oh-agent-server-1"'
check "docker rm -f oh-agent-server-1" docker exec $app docker rm -f oh-agent-server-1

step "any other container the app starts through the Docker socket (the slice's policy; default bridge, with NET_RAW)"
app_ip=$(docker inspect -f '{{.NetworkSettings.IPAddress}}' $app)
sandbox_checks='
echo "llm: $(/probe tcp '$LLM_ADDR':443)"
echo "name: $(/probe tcp-name api.openai.com:443)"
echo "ntp: $(/probe udp '$VPC_NTP':123)"
echo "host: $(/probe tcp 172.17.0.1:22)"
echo "imds: $(/probe tcp 169.254.169.254:80)"
echo "app: $(/probe tcp '"$app_ip"':8000)"
out=$(/probe packet); echo "packet: $out exit=$?"
echo "loopback: $(/probe tcp 127.0.0.1:9)"
'
out=$(docker exec $app docker run --rm --name openhands-runtime-1 --cap-add NET_RAW local/probe /bin/sh -c "$sandbox_checks" 2>&1)
echo "$out" | show 20
expect_line() { grep -qE "$2" <<<"$out" && ok "sandbox: $1" || fail "sandbox: $1: wanted /$2/"; }
expect_line "the LLM address is refused" '^llm: EPERM'
expect_line "no name resolves" '^name: err lookup'
expect_line "the time service is refused" '^ntp: EPERM'
expect_line "the host is refused" '^host: EPERM'
expect_line "the metadata service is refused" '^imds: EPERM'
expect_line "the app's ports are refused" '^app: EPERM'
expect_line "AF_PACKET fails with EPERM, the process lives" '^packet: EPERM exit=1'
expect_line "its own loopback is not refused" '^loopback: (ok|err)'
wait_for "records name the sandbox: the refused connect" 10 \
    has_record '.type == "net.connect" and .verdict == "deny" and .container_name == "openhands-runtime-1" and .dst == "'$LLM_ADDR'"'
wait_for "records name the sandbox: the AF_PACKET socket" 10 \
    has_record '.type == "net.socket" and .verdict == "deny" and .container_name == "openhands-runtime-1"'
wait_for "records name the sandbox: its processes" 10 \
    has_record '.type == "proc.exec" and .container_name == "openhands-runtime-1"'

step "a user-defined network: Docker's embedded DNS (127.0.0.11)"
check "docker network create openhands-net" docker network create openhands-net
check "docker network connect openhands-net $app" docker network connect openhands-net $app
expect "app: api.openai.com through 127.0.0.11" "answers=$LLM_ADDR" in_ctr $app dns 127.0.0.11:53 api.openai.com A
out=$(docker exec $app docker run --rm --name openhands-runtime-2 --network openhands-net local/probe /bin/sh -c \
    'grep nameserver /etc/resolv.conf; /probe tcp-name api.openai.com:443; /probe tcp '$LLM_ADDR':443' 2>&1)
echo "$out" | show 10
grep -q 'nameserver 127.0.0.11' <<<"$out" && ok "sandbox 2 asks Docker's embedded DNS" || fail "sandbox 2: resolv.conf is not 127.0.0.11"
grep -q 'err lookup' <<<"$out" && ok "sandbox 2: no name resolves" || fail "sandbox 2: a name resolved"
grep -qx 'EPERM' <<<"$out" && ok "sandbox 2: the LLM address is refused" || fail "sandbox 2: the LLM address was not refused"
wait_for "records: the refused query of sandbox 2" 10 \
    has_record '.type == "dns" and .verdict == "refuse" and .container_name == "openhands-runtime-2"'

step "guide §4: a changed policy, applied with systemctl reload"
sed -i "s|^  \"api.openai.com:443\",|  \"api.openai.com:443\",\n  \"$OTHER_ADDR:80\",|" /etc/egress-guard/config.toml
check "egress-guard check-config" egress-guard check-config
expect "app: $OTHER_ADDR:80 before the reload" '^EPERM' in_ctr $app tcp $OTHER_ADDR:80
check "systemctl reload egress-guard" systemctl reload egress-guard
wait_for "app: $OTHER_ADDR:80 after the reload" 10 sh -c "docker exec $app /probe tcp $OTHER_ADDR:80 | grep -q '^ok'"
expect "the journal says it applied" 'enforcing;' sh -c "journalctl -u egress-guard --no-pager -n 30 | sed -n '/reloading/,\$p'"
expect "app: $OTHER_ADDR:443 is still refused" '^EPERM' in_ctr $app tcp $OTHER_ADDR:443
cp /etc/egress-guard/config.toml /tmp/config.applied
sed -i "s|\"$OTHER_ADDR:80\",|\"$OTHER_ADDR:80\", \"not-an-entry\",|" /etc/egress-guard/config.toml
check_not "a refused config: systemctl reload fails" systemctl reload egress-guard
expect "and the journal says why" 'reload refused' journalctl -u egress-guard --no-pager -n 20
expect "the running policy stays" '^ok' in_ctr $app tcp $OTHER_ADDR:80
cp /tmp/config.applied /etc/egress-guard/config.toml
wd2=$(systemctl show -p WatchdogTimestampMonotonic --value egress-guard)
if [ "$wd1" != 0 ] && [ "$wd2" != "$wd1" ]; then ok "the watchdog is fed ($wd1 -> $wd2)"; else fail "the watchdog was not fed ($wd1 -> $wd2)"; fi

# Probes in a loop from the app while the agent goes away and comes back: the allowed
# destination must never fail and the refused one never pass.
through() {
    local what=$1 millis=$2
    shift 2
    docker exec $app /probe loop tcp $LLM_ADDR:443 "$millis" >/tmp/allowed.txt 2>&1 &
    local a=$!
    docker exec $app /probe loop tcp $OTHER_ADDR:443 "$millis" >/tmp/denied.txt 2>&1 &
    local d=$!
    sleep 2
    "$@"
    wait $a $d
    grep -qE '^ok=[1-9][0-9]* eperm=0 err=0' /tmp/allowed.txt &&
        ok "$what: allowed stayed allowed ($(cat /tmp/allowed.txt))" ||
        fail "$what: allowed: $(cat /tmp/allowed.txt)"
    grep -qE '^ok=0 eperm=[1-9][0-9]* err=0' /tmp/denied.txt &&
        ok "$what: refused stayed refused ($(cat /tmp/denied.txt))" ||
        fail "$what: refused: $(cat /tmp/denied.txt)"
}
restarts() { systemctl show -p NRestarts --value egress-guard; }

step "systemctl restart: no gap"
through "restart" 20000 check "systemctl restart egress-guard" systemctl restart egress-guard

step "systemctl kill -s KILL: the pins keep enforcing, systemd brings it back"
n0=$(restarts)
kill_and_wait() {
    systemctl kill -s KILL egress-guard
    wait_for "systemd restarted it" 60 sh -c "[ \$(systemctl show -p NRestarts --value egress-guard) -gt $n0 ] && systemctl is-active -q egress-guard"
}
through "kill -9" 30000 kill_and_wait

step "guide §6: upgrade to $(deb_version "$deb2") with apt install (another build: new programs)"
upgrade() { expect "apt install" "Setting up egress-guard" apt install -y "$deb2"; }
through "upgrade" 45000 upgrade
expect "the new agent attached its programs and detached the old" 'adopted=0 attached=[1-9][0-9]* detached=[1-9]' \
    sh -c "journalctl -u egress-guard --no-pager -n 60 | grep 'enforcing;' | tail -n 1"
check "dpkg has the new version" test "$(dpkg-query -W -f '${Version}' egress-guard)" = "$(deb_version "$deb2")"

step "a host that cannot enforce says so: a broken config"
cp /etc/egress-guard/config.toml /tmp/config.good
echo 'bogus_key = 1' >>/etc/egress-guard/config.toml
out=$(dpkg -i "$deb2" 2>&1)
code=$?
echo "$out" | tail -n 25 | show 25
[ $code != 0 ] && ok "installing the package fails (dpkg -i, exit $code)" || fail "dpkg -i succeeded with a broken config"
grep -q 'NOT ENFORCING' <<<"$out" && ok "and says the host is not enforcing" || fail "no unmissable message"
sleep 15
n1=$(restarts)
sleep 5
expect "the unit stopped retrying: failed" '^failed$' systemctl show -p ActiveState --value egress-guard
expect "at its start limit" 'Start request repeated too quickly' journalctl -u egress-guard --no-pager -n 20
[ "$(restarts)" = "$n1" ] && ok "no more restarts ($n1)" || fail "still restarting ($n1 -> $(restarts))"
expect "the pinned policy still refuses meanwhile" '^EPERM' in_ctr $app tcp $OTHER_ADDR:443
cp /tmp/config.good /etc/egress-guard/config.toml
check "fixed: dpkg --configure -a" dpkg --configure -a
check "egress-guard.service is active again" systemctl is-active egress-guard

step "guide §2: apt remove unguards on purpose; apt purge removes everything"
check "apt remove" apt remove -y egress-guard
check_not "the agent is stopped" systemctl is-active -q egress-guard
check_not "no pins are left" sh -c 'ls /sys/fs/bpf/egress-guard/* >/dev/null 2>&1'
expect "app: the refused site is reachable now (unguarded)" '^ok' in_ctr $app tcp $OTHER_ADDR:443
check "the config stays" test -f /etc/egress-guard/config.toml
check "apt purge" apt purge -y egress-guard
for p in /etc/egress-guard /var/log/egress-guard /var/lib/egress-guard /sys/fs/bpf/egress-guard; do
    check_not "purge removed $p" test -e $p
done

finish
