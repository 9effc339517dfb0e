#!/bin/bash
# The kernel matrix: on this distribution kernel, booted as the distribution boots it (no
# `bpf` in lsm=, so the agent falls back to its fentry socket guard), the shipped package and
# unit must load the programs and enforce. A process in openhands.slice (a systemd scope, no
# Docker needed) is refused what the sandbox policy does not allow and is killed when it asks
# for an AF_PACKET socket, through socket() or io_uring; a process outside the slice is not
# touched.
. /vmtest/lib.sh

step "the VPC stand-ins"
vpc_stand_ins
slice() { systemd-run --quiet --scope --slice=openhands.slice "$@"; }

step "install the package; the shipped unit starts"
deb=$(ls /vmtest/debs/first/egress-guard_*.deb)
expect "apt install $(basename "$deb")" "Setting up egress-guard" apt-get install -y "$deb"
check "egress-guard.service is active" systemctl is-active egress-guard
expect "READY with its status" '^enforcing' systemctl show -p StatusText --value egress-guard
check "the kernel runs without the BPF LSM" sh -c '! grep -qw bpf /sys/kernel/security/lsm'
expect "the socket guard is fentry" 'socket guard: fentry' egress-guard status
expect "the log says why and what to do" "add 'bpf' to the kernel's lsm= boot parameter" \
    journalctl -u egress-guard --no-pager -n 50
expect "the unit's exposure score" 'Overall exposure level' sh -c 'systemd-analyze security egress-guard --no-pager | tail -n 1'

step "enforcement"
expect "in openhands.slice: the LLM address is refused" '^EPERM' slice /vmtest/probe tcp $LLM_ADDR:443
expect "outside the slice: the same address is reached" '^ok' probe tcp $LLM_ADDR:443
expect "in openhands.slice: UDP to the time service is refused" '^EPERM' slice /vmtest/probe udp $VPC_NTP:123
expect "in openhands.slice: no name resolves (the sandbox policy has none)" 'err lookup' \
    slice /vmtest/probe tcp-name api.openai.com:443
for how in packet packet-uring; do
    out=$(slice /vmtest/probe $how 2>&1)
    code=$?
    # 137: killed by SIGKILL before the probe could print anything.
    if [ -z "$out" ] && [ "$code" = 137 ]; then
        ok "in openhands.slice: AF_PACKET ($how) kills the process (exit $code)"
    else
        fail "in openhands.slice: AF_PACKET ($how): wanted SIGKILL (exit 137), got '$out', exit $code"
    fi
    expect "outside the slice: AF_PACKET ($how) works" '^ok' probe $how
done
wait_for "a net.connect deny record from the slice" 10 \
    has_record '.type == "net.connect" and .verdict == "deny" and (.cgroup // "" | startswith("/openhands.slice/"))'
wait_for "a proc.exec record of the probe" 10 \
    has_record '.type == "proc.exec" and (.filename // "" | endswith("/probe"))'
wait_for "a net.socket deny record (AF_PACKET)" 10 \
    has_record '.type == "net.socket" and .verdict == "deny" and .family == "packet"'

step "a restart adopts the pins"
check "systemctl restart egress-guard" systemctl restart egress-guard
expect "the log says it adopted" 'adopted=[1-9]' journalctl -u egress-guard --no-pager -n 30
expect "still refused after the restart" '^EPERM' slice /vmtest/probe tcp $LLM_ADDR:443

finish
