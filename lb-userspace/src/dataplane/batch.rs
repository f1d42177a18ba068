//! The `bpf(2)` map commands aya does not have: batch lookup, update and delete
//! (`BPF_MAP_*_BATCH`, thousands of entries per system call, where aya's API makes one or two
//! per entry: a million entries take seconds instead of a fraction), and single deletes on a
//! descriptor of our own. Used for the flow table (walks, `xlb flows flush`) and the door's LPM
//! tries (the deny list, the VIPs' source lists).

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

/// `union bpf_attr` as the batch commands read it (linux/bpf.h, the `batch` member).
#[repr(C)]
#[derive(Default)]
pub(super) struct BatchAttr {
    pub(super) in_batch: u64,
    pub(super) out_batch: u64,
    pub(super) keys: u64,
    pub(super) values: u64,
    pub(super) count: u32,
    pub(super) map_fd: u32,
    pub(super) elem_flags: u64,
    pub(super) flags: u64,
}

pub(super) const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
/// ENOTSUPP, the kernel's own "not supported" (no libc name).
const ENOTSUPP: i32 = 524;

/// `union bpf_attr` as `BPF_MAP_DELETE_ELEM` reads it (linux/bpf.h: map_fd, then the key pointer
/// 8-byte aligned, the value pointer and flags that deletion leaves unused).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The `bpf(2)` system call with command `cmd` and `attr` as its `union bpf_attr` (a `repr(C)`
/// struct, or a zeroed byte array with the used fields written in): the call's value (a new fd
/// for `BPF_OBJ_GET`, 0 for most commands). The one wrapper of the data path's raw calls.
///
/// # Safety
/// `attr` must have the layout the kernel reads for `cmd` (bytes past the used fields zero), and
/// every pointer in it must be valid for what the kernel does with it during the call.
pub(super) unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: guaranteed by the caller; `attr` itself is valid for `size_of::<A>()` bytes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, size_of::<A>() as u32) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Whether an error means "this kernel or map type has no batch command" (then the caller goes
/// entry by entry): EINVAL before 5.6, ENOTSUPP or EOPNOTSUPP for a map type without it. The
/// kernel refuses those before it changes anything.
pub(super) fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP)
    )
}

/// Write `keys[i] → values[i]` into the map `fd` with one `BPF_MAP_UPDATE_BATCH` call. `K` and
/// `V` must be the map's key and value types: plain `repr(C)` integers of the map's sizes.
pub(super) fn update<K, V>(fd: BorrowedFd<'_>, keys: &[K], values: &[V]) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` points at `keys.len()` keys and values of the map's types, alive and
    // unchanged for the call; the kernel only reads them and writes `attr.count`.
    unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) }.map(drop)
}

/// Delete `keys` with one `BPF_MAP_DELETE_BATCH` call: `Ok(keys.len())`, or the error with how
/// many keys were deleted before it (the kernel stops at the first key it cannot delete; the
/// count is meaningful for ENOENT, which only a key it reached can cause).
fn delete_batch<K>(fd: BorrowedFd<'_>, keys: &[K]) -> Result<usize, (usize, io::Error)> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` points at `keys.len()` keys of the map's key type (plain `repr(C)`
    // integers), alive and unchanged for the call; the kernel only reads them and writes
    // `attr.count`.
    match unsafe { bpf(BPF_MAP_DELETE_BATCH, &mut attr) } {
        Ok(_) => Ok(keys.len()),
        Err(e) => Err(((attr.count as usize).min(keys.len()), e)),
    }
}

fn delete_elem<K>(fd: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        ..ElemAttr::default()
    };
    // SAFETY: `attr` points at one key of the map's key type, alive for the call; the kernel
    // only reads it.
    unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut attr) }.map(drop)
}

/// Delete the entries of `keys` from the map `fd` (of key type `K`), `chunk` per
/// `BPF_MAP_DELETE_BATCH` where the kernel has it, one `BPF_MAP_DELETE_ELEM` per key otherwise.
/// How many were deleted: a key that is not there (evicted, or deleted by someone else since it
/// was read) is skipped.
pub(super) fn delete_all<K>(fd: BorrowedFd<'_>, keys: &[K], chunk: usize) -> io::Result<u64> {
    let (mut done, mut deleted) = (0, 0u64);
    while done < keys.len() {
        match delete_batch(fd, &keys[done..keys.len().min(done + chunk)]) {
            Ok(n) => {
                deleted += n as u64;
                done += n;
            }
            // The key after the `n` deleted ones is gone already: skip it.
            Err((n, e)) if e.raw_os_error() == Some(libc::ENOENT) => {
                deleted += n as u64;
                done += n + 1;
            }
            Err((_, e)) if unsupported(&e) => {
                for key in &keys[done..] {
                    match delete_elem(fd, key) {
                        Ok(()) => deleted += 1,
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(e),
                    }
                }
                return Ok(deleted);
            }
            Err((_, e)) => return Err(e),
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_have_the_kernels_layout() {
        // linux/bpf.h: in_batch, out_batch, keys, values (u64), count, map_fd (u32), elem_flags,
        // flags (u64).
        assert_eq!(size_of::<BatchAttr>(), 56);
        assert_eq!(std::mem::offset_of!(BatchAttr, count), 32);
        assert_eq!(std::mem::offset_of!(BatchAttr, map_fd), 36);
        assert_eq!(std::mem::offset_of!(BatchAttr, flags), 48);
        // map_fd (u32), key, value, flags (u64, 8-byte aligned).
        assert_eq!(std::mem::offset_of!(ElemAttr, key), 8);
        assert_eq!(size_of::<ElemAttr>(), 32);
    }
}
