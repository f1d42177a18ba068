//! Rebuild when bpf-linker changes (as aya-template does): the object depends on the linker.
fn main() {
    let bpf_linker = which::which("bpf-linker").expect(
        "bpf-linker not found: run `cargo xtask setup` (it builds bpf-linker against LLVM 22)",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
