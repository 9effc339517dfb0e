//! Process records of guarded tasks: the `sched_process_exec` and `sched_process_exit` raw
//! tracepoints (no tracefs, BPF LSM, kprobes or trampolines needed). Kernel struct fields are
//! read at offsets the agent finds in the kernel's BTF (`TASK_OFFSETS`).

use agent_common::event::{ARGS_LEN, ExecEvent, ExitEvent, FILENAME_LEN, TaskOffsets, kind};
use aya_ebpf::{
    Global,
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{
            bpf_get_current_task, bpf_ktime_get_boot_ns, bpf_probe_read_kernel_str,
            bpf_probe_read_user,
        },
    },
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};

use crate::{
    emit::{self, Origin},
    guarded_slot_of_current_task,
    maps::EVENTS,
};

/// Field offsets, set at load time by the agent; `valid == 0` means "read no fields".
#[unsafe(no_mangle)]
static TASK_OFFSETS: Global<TaskOffsets> = Global::new(TaskOffsets {
    task_real_parent: 0,
    task_tgid: 0,
    task_exit_code: 0,
    task_start_boottime: 0,
    task_mm: 0,
    mm_arg_start: 0,
    mm_arg_end: 0,
    task_signal: 0,
    task_group_leader: 0,
    signal_live: 0,
    signal_flags: 0,
    signal_group_exit_code: 0,
    bprm_filename: 0,
    valid: 0,
});

#[inline(always)]
fn field<T>(base: u64, offset: u32) -> Option<T> {
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }.ok()
}

/// [`field`] of a guarded task's own structures, which should always be readable: a failure
/// means the offsets from BTF are wrong, and the kernel's log says so.
#[inline(always)]
fn own_field<T>(base: u64, offset: u32) -> Option<T> {
    match unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) } {
        Ok(v) => Some(v),
        Err(e) => {
            crate::klog::task_field_unreadable(offset, e);
            None
        }
    }
}

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn proc_exec(ctx: RawTracePointContext) -> i32 {
    let Some(slot) = guarded_slot_of_current_task() else {
        return 0;
    };
    let flags = emit::wakeup_flags(core::mem::size_of::<ExecEvent>() as u64);
    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        emit::lost();
        return 0;
    };
    let e = entry.as_mut_ptr();
    let off = TASK_OFFSETS.load();
    unsafe {
        (*e).hdr = emit::header(kind::PROC_EXEC, slot, &Origin::Task);
        (*e).ppid = 0;
        (*e).args_len = 0;
        (*e).args_total = 0;
        (*e).filename_len = 0;
        if off.valid != 0 {
            let bprm: u64 = ctx.arg(2);
            if let Some(src) = own_field::<u64>(bprm, off.bprm_filename) {
                let n = bpf_probe_read_kernel_str(
                    (*e).filename.as_mut_ptr().cast(),
                    FILENAME_LEN as u32,
                    src as *const _,
                );
                if n > 0 {
                    (*e).filename_len = n as u32;
                }
            }
            let task = bpf_get_current_task();
            if let Some(parent) = own_field::<u64>(task, off.task_real_parent) {
                (*e).ppid = field::<u32>(parent, off.task_tgid).unwrap_or(0);
            }
            if let Some(mm) = own_field::<u64>(task, off.task_mm) {
                let start = field::<u64>(mm, off.mm_arg_start).unwrap_or(0);
                let end = field::<u64>(mm, off.mm_arg_end).unwrap_or(0);
                if end > start {
                    let total = end - start;
                    let n = if total > ARGS_LEN as u64 {
                        ARGS_LEN as u32
                    } else {
                        total as u32
                    };
                    if bpf_probe_read_user((*e).args.as_mut_ptr().cast(), n, start as *const _) == 0
                    {
                        (*e).args_len = n;
                    }
                    (*e).args_total = total as u32;
                }
            }
        }
    }
    entry.submit(flags);
    0
}

/// `signal_struct::flags`: the whole group is exiting (include/linux/sched/signal.h).
const SIGNAL_GROUP_EXIT: u32 = 0x4;

/// `sched_process_exit(struct task_struct *p, …)`: the current task is the one exiting.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn proc_exit(_ctx: RawTracePointContext) -> i32 {
    let off = TASK_OFFSETS.load();
    let task = unsafe { bpf_get_current_task() };
    // One record per process, when its last thread exits: `signal->live` has already been
    // decremented for this thread. Without the offsets, fall back to the main thread.
    let signal = if off.valid != 0 {
        field::<u64>(task, off.task_signal)
    } else {
        None
    };
    let last = match signal {
        Some(sig) => field::<i32>(sig, off.signal_live) == Some(0),
        None => {
            let pid_tgid = bpf_get_current_pid_tgid();
            pid_tgid as u32 == (pid_tgid >> 32) as u32
        }
    };
    if !last {
        return 0;
    }
    let Some(slot) = guarded_slot_of_current_task() else {
        return 0;
    };
    let mut event = ExitEvent {
        hdr: emit::header(kind::PROC_EXIT, slot, &Origin::Task),
        ..ExitEvent::default()
    };
    if let Some(sig) = signal {
        // A group exit (exit_group(), a fatal signal) carries the process's status; otherwise
        // it is the last thread's own.
        let flags = field::<u32>(sig, off.signal_flags).unwrap_or(0);
        event.exit_code = if flags & SIGNAL_GROUP_EXIT != 0 {
            field::<u32>(sig, off.signal_group_exit_code).unwrap_or(0)
        } else {
            field::<u32>(task, off.task_exit_code).unwrap_or(0)
        };
        let leader = field::<u64>(task, off.task_group_leader).unwrap_or(task);
        if let Some(start) = field::<u64>(leader, off.task_start_boottime) {
            event.lifetime_ns = unsafe { bpf_ktime_get_boot_ns() }.saturating_sub(start);
        }
    }
    let flags = emit::wakeup_flags(core::mem::size_of::<ExitEvent>() as u64);
    if EVENTS.output::<ExitEvent>(&event, flags).is_err() {
        emit::lost();
    }
    0
}
