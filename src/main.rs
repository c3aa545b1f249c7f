mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::install_panic_hook();
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            cli::stdio::err(cli::one_line_error(&err));
            ExitCode::from(cli::exit_code(&err))
        }
    }
}
