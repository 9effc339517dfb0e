//! [`Kernel::apply`] as its steps: rulesets written and flipped, the guarded cgroups listed,
//! what is missing attached (pins of a previous run adopted), and only then what is no longer
//! wanted detached and the policies that are gone retired.

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
};

use agent_common::{
    POLICY_NAME_LEN, PolicyState, STATE_ACTIVE, STATE_AUDIT, STATE_CONTAINERS, ruleset_ids,
};
use anyhow::Context as _;
use aya::Ebpf;

use super::{
    AppliedPolicy, ApplyReport, Kernel, SocketGuard, Target, assign_slots, detach_pin,
    programs::{self, Hook},
    remove_version_dir, state_name, version_dirs,
};
use crate::config::Mode;

/// How long old rulesets stay after a flip. A program decides in microseconds; this is
/// far longer than any decision in flight.
const FLIP_GRACE: std::time::Duration = std::time::Duration::from_millis(20);

/// The AF_PACKET guards, in order of preference.
const SOCKET_GUARDS: [SocketGuard; 3] = [
    SocketGuard::Lsm,
    SocketGuard::Fentry,
    SocketGuard::Tracepoint,
];

/// What the steps of one [`Kernel::apply`] share.
struct Pass<'t> {
    targets: &'t [Target],
    /// The slots' states before this apply.
    states: Vec<PolicyState>,
    /// The link pins found before this apply (a previous run's, or the policy's before a
    /// reload).
    existing: HashSet<String>,
    /// Each target's slot.
    slots: Vec<u32>,
    /// The link pins to keep (adopted or attached now); the rest is detached.
    wanted: HashSet<String>,
    report: ApplyReport,
}

impl Kernel {
    /// Makes the kernel enforce exactly `targets`.
    pub fn apply(&mut self, targets: &[Target]) -> anyhow::Result<ApplyReport> {
        // What is there now (states, link pins) and which slot each policy gets; nothing
        // changes if this fails.
        let mut pass = self.plan(targets)?;

        // 1. Rulesets: write the new one and flip to it; drop the old ones after a grace
        // period, so a program that read the old id just before the flip still finds it.
        let retired = self.write_and_flip_rulesets(&mut pass)?;
        self.drop_retired_rulesets(retired)?;

        // 2. Which cgroups are guarded, for the LSM hook.
        let cgroups = self.set_guarded_cgroups(&pass)?;

        // 3. Attach what is missing (new before old). An attachment pinned already (this build,
        // same program, slot and cgroup) is adopted as it is: a restart re-attaches nothing.
        self.attach_cgroup_hooks(&mut pass, &cgroups)?;
        // The global AF_PACKET guard: BPF LSM where active, else fentry, else a tracepoint.
        self.attach_socket_guard(&mut pass);
        if self.socket_guard == SocketGuard::None {
            // Keep whatever guard an earlier run attached rather than end up with none.
            self.keep_earlier_socket_guard(&mut pass);
        }
        // Process records (global tracepoints).
        self.attach_process_tracepoints(&mut pass);

        // 4. Detach what is no longer wanted, including everything pinned under an older
        // layout version (its programs use maps this agent no longer writes). Only now:
        // every guard that stays is attached (or adopted) above.
        self.detach_unwanted(&mut pass)?;

        // 5. Retire policies that are gone (their links are detached now).
        self.retire_removed_policies(&mut pass)?;
        Ok(pass.report)
    }

    /// The slots' states, the link pins, and the slot of each target.
    fn plan<'t>(&self, targets: &'t [Target]) -> anyhow::Result<Pass<'t>> {
        let states = self.maps.states()?;
        let existing = self.link_pins()?;
        let slots = assign_slots(targets, &states, &existing)?;
        Ok(Pass {
            targets,
            states,
            existing,
            slots,
            wanted: HashSet::new(),
            report: ApplyReport::default(),
        })
    }

    /// Writes each policy's new ruleset and flips its state to it; returns the rulesets the
    /// flips retired.
    fn write_and_flip_rulesets(&mut self, pass: &mut Pass) -> anyhow::Result<Vec<u32>> {
        // Any policy's selectors may take a container below any guarded cgroup.
        let containers = if pass.targets.iter().any(|t| t.selectors) {
            STATE_CONTAINERS
        } else {
            0
        };
        let mut retired = Vec::new();
        for (t, &slot) in pass.targets.iter().zip(&pass.slots) {
            let st = pass.states[slot as usize];
            let [a, b] = ruleset_ids(slot);
            let active = st.flags & STATE_ACTIVE != 0;
            let (new, old) = if active && st.ruleset == a {
                (b, a)
            } else {
                (a, b)
            };
            self.maps.clear_ruleset(new)?;
            self.maps.write_ruleset(new, &t.compiled)?;
            for (ip, value) in &t.learned {
                self.maps.write_exact(new, *ip, value)?;
            }
            // Before the flip and before any attach: a guarded process's DNS never goes
            // anywhere but the proxy.
            self.maps.set_dns_proxy(slot, t.dns_proxy)?;
            let mut name = [0u8; POLICY_NAME_LEN];
            name[..t.name.len()].copy_from_slice(t.name.as_bytes());
            let flags = STATE_ACTIVE
                | containers
                | if t.mode == Mode::Audit {
                    STATE_AUDIT
                } else {
                    0
                };
            self.maps.set_state(
                slot,
                &PolicyState {
                    ruleset: new,
                    flags,
                    name,
                    hostnames: t.hostnames,
                },
            )?;
            retired.push(old);
            pass.report.policies.push(AppliedPolicy {
                name: t.name.clone(),
                slot,
                ruleset: new,
                mode: t.mode,
                entries: t.compiled.len(),
                cgroups: t.cgroups.len(),
            });
        }
        Ok(retired)
    }

    /// Clears the retired rulesets, after [`FLIP_GRACE`].
    fn drop_retired_rulesets(&mut self, retired: Vec<u32>) -> anyhow::Result<()> {
        if !retired.is_empty() {
            std::thread::sleep(FLIP_GRACE);
        }
        for old in retired {
            self.maps.clear_ruleset(old)?;
        }
        Ok(())
    }

    /// Writes GUARDED_CGROUPS (cgroup id → slot); returns each guarded cgroup as (slot, path,
    /// id).
    fn set_guarded_cgroups<'t>(
        &mut self,
        pass: &Pass<'t>,
    ) -> anyhow::Result<Vec<(u32, &'t PathBuf, u64)>> {
        let mut guarded = HashMap::new();
        let mut cgroup_ids = Vec::new();
        for (t, &slot) in pass.targets.iter().zip(&pass.slots) {
            for cg in &t.cgroups {
                let id = std::fs::metadata(cg)
                    .with_context(|| format!("reading cgroup {}", cg.display()))?
                    .ino();
                guarded.insert(id, slot);
                cgroup_ids.push((slot, cg, id));
            }
        }
        self.maps.set_guarded(&guarded)?;
        Ok(cgroup_ids)
    }

    /// Every cgroup hook on every guarded cgroup: adopted if pinned, else attached and pinned
    /// (one object per slot).
    fn attach_cgroup_hooks(
        &mut self,
        pass: &mut Pass,
        cgroups: &[(u32, &PathBuf, u64)],
    ) -> anyhow::Result<()> {
        let mut loaded: HashMap<u32, Ebpf> = HashMap::new();
        for &(slot, cg, id) in cgroups {
            let cgroup =
                File::open(cg).with_context(|| format!("opening cgroup {}", cg.display()))?;
            for hook in Hook::ALL {
                let pin = format!("{}-{slot}-{id}-{}", hook.program(), self.object_id);
                if pass.existing.contains(&pin) {
                    pass.report.adopted += 1;
                } else {
                    let ebpf = match loaded.entry(slot) {
                        Entry::Occupied(e) => e.into_mut(),
                        Entry::Vacant(v) => v.insert(programs::load_object(
                            &self.root.join("maps"),
                            slot,
                            &self.params,
                        )?),
                    };
                    let link = programs::attach(ebpf, hook, &cgroup).with_context(|| {
                        format!("attaching {} to {}", hook.program(), cg.display())
                    })?;
                    link.pin(self.links_dir().join(&pin))
                        .with_context(|| format!("pinning link {pin}"))?;
                    pass.report.attached += 1;
                }
                pass.wanted.insert(pin);
            }
        }
        Ok(())
    }

    /// The AF_PACKET guard a previous run pinned, else the first of [`SOCKET_GUARDS`] that
    /// attaches (the LSM only where the kernel lists it); `SocketGuard::None` if none does.
    fn attach_socket_guard(&mut self, pass: &mut Pass) {
        let pin_of = |g: SocketGuard| format!("{}-{}", g.pin_program(), self.object_id);
        if let Some(g) = SOCKET_GUARDS
            .into_iter()
            .find(|g| pass.existing.contains(&pin_of(*g)))
        {
            pass.report.adopted += 1;
            pass.wanted.insert(pin_of(g));
            self.socket_guard = g;
        } else {
            self.socket_guard = SocketGuard::None;
            for g in SOCKET_GUARDS {
                if g == SocketGuard::Lsm && !self.lsm_listed {
                    continue;
                }
                let pin = pin_of(g);
                let attached =
                    programs::load_object(&self.root.join("maps"), u32::MAX, &self.params)
                        .and_then(|mut ebpf| match g {
                            SocketGuard::Lsm => programs::attach_lsm(&mut ebpf),
                            SocketGuard::Fentry => programs::attach_socket_fentry(&mut ebpf),
                            _ => programs::attach_socket_tracepoint(&mut ebpf),
                        })
                        .and_then(|link| Ok(link.pin(self.links_dir().join(&pin))?));
                match attached {
                    Ok(_) => {
                        pass.report.attached += 1;
                        pass.wanted.insert(pin);
                        self.socket_guard = g;
                        break;
                    }
                    Err(e) => tracing::warn!("AF_PACKET guard {g:?} could not be attached: {e:#}"),
                }
            }
        }
    }

    /// Keeps an AF_PACKET guard pinned by an earlier run (of another build) when no guard
    /// could be adopted or attached.
    fn keep_earlier_socket_guard(&mut self, pass: &mut Pass) {
        for g in SOCKET_GUARDS {
            if let Some(old) = pass
                .existing
                .iter()
                .find(|p| p.starts_with(&format!("{}-", g.pin_program())))
            {
                tracing::warn!("keeping the earlier AF_PACKET guard {old}");
                pass.wanted.insert(old.clone());
                self.socket_guard = g;
                break;
            }
        }
    }

    /// The process-event tracepoints: adopted if pinned, else attached; where one fails, an
    /// older attachment of it is kept and `process_events` is false.
    fn attach_process_tracepoints(&mut self, pass: &mut Pass) {
        self.process_events = true;
        for (program, event) in programs::PROCESS_TRACEPOINTS {
            let pin = format!("{program}-{}", self.object_id);
            if pass.existing.contains(&pin) {
                pass.report.adopted += 1;
                pass.wanted.insert(pin);
                continue;
            }
            let attached = programs::load_object(&self.root.join("maps"), u32::MAX, &self.params)
                .and_then(|mut ebpf| programs::attach_process_tracepoint(&mut ebpf, program, event))
                .and_then(|link| Ok(link.pin(self.links_dir().join(&pin))?));
            match attached {
                Ok(_) => {
                    pass.report.attached += 1;
                    pass.wanted.insert(pin);
                }
                Err(e) => {
                    tracing::error!("process records ({event}) unavailable: {e:#}");
                    self.process_events = false;
                    // Keep an older attachment rather than none.
                    if let Some(old) = pass
                        .existing
                        .iter()
                        .find(|p| p.starts_with(&format!("{program}-")))
                    {
                        pass.wanted.insert(old.clone());
                    }
                }
            }
        }
    }

    /// Detaches the link pins not wanted, then removes the pins of older layout versions.
    fn detach_unwanted(&mut self, pass: &mut Pass) -> anyhow::Result<()> {
        for pin in pass.existing.difference(&pass.wanted) {
            detach_pin(&self.links_dir().join(pin))?;
            pass.report.detached += 1;
        }
        if let Some(pin_dir) = self.root.parent() {
            for dir in version_dirs(pin_dir)? {
                if dir != self.root {
                    let (links, _) = remove_version_dir(&dir)?;
                    tracing::info!(
                        "removed pins of an older layout: {} ({links} attachments)",
                        dir.display()
                    );
                    pass.report.detached += links;
                }
            }
        }
        Ok(())
    }

    /// Clears the state, DNS redirect, open connections, containers and rulesets of every
    /// slot that was active and has no target now.
    fn retire_removed_policies(&mut self, pass: &mut Pass) -> anyhow::Result<()> {
        let kept: HashSet<u32> = pass.slots.iter().copied().collect();
        for (slot, st) in pass.states.iter().enumerate() {
            let slot = slot as u32;
            if st.flags & STATE_ACTIVE != 0 && !kept.contains(&slot) {
                self.maps.set_state(slot, &PolicyState::default())?;
                self.maps.set_dns_proxy(slot, None)?;
                self.maps.forget_open_connections(slot)?;
                self.maps.forget_containers(slot)?;
                for r in ruleset_ids(slot) {
                    self.maps.clear_ruleset(r)?;
                }
                pass.report.removed_policies.push(state_name(st));
            }
        }
        Ok(())
    }
}
