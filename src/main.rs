//! The `bearerd` command; all of it is in the library ([`bearerd::command`]), so that the
//! program is compiled as one crate.

fn main() -> std::process::ExitCode {
    bearerd::command::main()
}
