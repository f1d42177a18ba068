//! Pinning a measuring thread to one CPU: the data path's next-hop cache and counters are per
//! CPU, so a thread that migrates between runs would see cold caches and split counters.

use anyhow::{Result, bail};

/// Pin the calling thread (only it) to the first CPU it may run on; returns that CPU.
pub fn pin_to_one() -> Result<usize> {
    // SAFETY: cpu_set_t is plain data; the calls read and set only this thread's affinity.
    unsafe {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size, &mut allowed) != 0 {
            bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
        }
        let Some(cpu) = (0..libc::CPU_SETSIZE as usize).find(|&c| libc::CPU_ISSET(c, &allowed))
        else {
            bail!("sched_getaffinity: no CPU allowed");
        };
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        if libc::sched_setaffinity(0, size, &one) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
        Ok(cpu)
    }
}
