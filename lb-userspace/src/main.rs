//! The `xlb` binary: everything is in the library (`xlb::main`), so every part is testable
//! in-process.

fn main() -> std::process::ExitCode {
    xlb::main()
}
