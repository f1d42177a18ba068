//! The compiled XDP object, built from `lb-ebpf` by `build.rs` and embedded in the binary.

/// ELF bytes of lb-ebpf, aligned as aya's loader requires.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
