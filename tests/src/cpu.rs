//! Pinning a measuring thread to one CPU: the data path's next-hop cache and counters are per
//! CPU, so a thread that migrates between runs would see cold caches and split counters.

use anyhow::{Result, bail};

const SET_SIZE: usize = std::mem::size_of::<libc::cpu_set_t>();

/// The CPUs the calling thread may run on, in order.
pub fn allowed() -> Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; the call reads only this thread's affinity.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, SET_SIZE, &mut allowed) != 0 {
            bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &allowed))
            .collect())
    }
}

/// Pin the calling thread (only it) to `cpu`.
pub fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: as above; the call sets only this thread's affinity.
    unsafe {
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        if libc::sched_setaffinity(0, SET_SIZE, &one) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Pin the calling thread (only it) to the first CPU it may run on; returns that CPU.
pub fn pin_to_one() -> Result<usize> {
    let Some(&cpu) = allowed()?.first() else {
        bail!("sched_getaffinity: no CPU allowed");
    };
    pin_to(cpu)?;
    Ok(cpu)
}
