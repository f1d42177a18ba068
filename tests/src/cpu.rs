//! Pinning a measuring thread to one CPU: the data path's next-hop cache and counters are per
//! CPU, so a thread that migrates between runs would see cold caches and split counters.

use anyhow::{Result, bail};

/// Pin the calling thread (only it) to `cpu`.
pub fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is empty; the call only affects this thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
