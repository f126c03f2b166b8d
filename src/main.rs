//! The `sluice` binary: parse the command line, set up logging, hand over to `sluice::cli`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    sluice::cli::run(sluice::cli::Cli::parse())
}
