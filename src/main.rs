//! The `ca` binary; everything lives in the library.
fn main() -> std::process::ExitCode {
    workload_ca::cli::main()
}
