use std::process::ExitCode;

fn main() -> ExitCode {
    tkg::cli::install_panic_hook();
    match tkg::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{}", tkg::cli::one_line_error(&err));
            ExitCode::from(tkg::cli::exit_code(&err))
        }
    }
}
