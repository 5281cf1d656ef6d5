//! The `sdserve` binary: parses the command line and dispatches.

use clap::Parser;
use sdserve::cli::{Cli, Command, describe_error, run_download, run_generate, run_serve};

fn main() -> std::process::ExitCode {
    sdserve::alloc::tune();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let result = match &cli.command {
        Command::Generate(args) => run_generate(args).map(|paths| {
            for p in paths {
                println!("{}", p.display());
            }
        }),
        Command::Download(args) => run_download(args).map(|dir| println!("{}", dir.display())),
        Command::Serve(args) => run_serve(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe_error(&e));
            match e {
                sdserve::Error::InvalidRequest { .. } => std::process::ExitCode::from(2),
                _ => std::process::ExitCode::FAILURE,
            }
        }
    }
}
