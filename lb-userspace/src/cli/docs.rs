//! Man pages for every command, generated from the same clap definitions as the parser (so they
//! never disagree with it): `xlb man-pages DIR`, run by `cargo xtask package` for the Debian package.

use super::{CliError, args::Cli};
use clap::CommandFactory;
use std::{fs, path::Path};

/// Write `xlb.1` and one `xlb-<command>.1` per visible subcommand (recursively) into `dir`.
pub(crate) fn man_pages(dir: &Path) -> Result<(), CliError> {
    fs::create_dir_all(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_per_command_that_names_the_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        man_pages(dir.path()).unwrap();
        let main = fs::read_to_string(dir.path().join("xlb.1")).unwrap();
        assert!(
            main.starts_with(".ie"),
            "roff: {}",
            &main[..40.min(main.len())]
        );
        assert!(main.contains("detach"), "{main}");
        let detach = fs::read_to_string(dir.path().join("xlb-detach.1")).unwrap();
        assert!(detach.contains("pin\\-dir"), "{detach}");
        assert!(dir.path().join("xlb-vip-add.1").exists());
        assert!(
            !dir.path().join("xlb-man-pages.1").exists(),
            "hidden commands have no page"
        );
    }
}
