//! Builds the eBPF crate (nightly, bpfel-unknown-none, bpf-linker) and leaves the object in OUT_DIR
//! for `ebpf_object.rs` to embed.

/// What the object is built from, relative to this package's root. Cargo resolves relative
/// `rerun-if-changed` paths against the package root of the tree it is building, so a copy of the
/// tree that keeps its `target/` watches its own sources. aya-build's own watch is the absolute
/// path of the tree the script last ran in: in such a copy it points at the original tree, edits
/// to the copy's eBPF sources went unnoticed and a stale object was embedded.
const EBPF_INPUTS: &[&str] = &[
    "../lb-ebpf/src",
    "../lb-ebpf/build.rs",
    "../lb-ebpf/Cargo.toml",
    "../lb-common/src",
    "../lb-common/Cargo.toml",
    "../Cargo.lock",
    "build.rs",
];

fn main() -> anyhow::Result<()> {
    for path in EBPF_INPUTS {
        println!("cargo::rerun-if-changed={path}");
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow::anyhow!("lb-userspace has no parent directory"))?
        .join("lb-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    // The test-only second build (`--features layout-test`) embeds a data path built the same way.
    let features: &[&str] = if std::env::var_os("CARGO_FEATURE_LAYOUT_TEST").is_some() {
        &["layout-test"]
    } else {
        &[]
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir,
            features,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
