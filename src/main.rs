//! The `shelfwatch` binary: parse arguments, set up logging, hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = shelfwatch::cli::Cli::parse();
    shelfwatch::cli::init_logging(&cli.log, cli.log_format);
    shelfwatch::cli::run(cli)
}
