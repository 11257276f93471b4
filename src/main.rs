//! The `shelfwatch` binary: parse arguments, set up logging, hand over to the library.

use clap::Parser;

/// Counts allocations for `shelfwatch bench` (one atomic add each).
#[global_allocator]
static ALLOCATOR: shelfwatch::alloc::CountingAllocator = shelfwatch::alloc::CountingAllocator;

fn main() -> std::process::ExitCode {
    abort_on_panic();
    let cli = shelfwatch::cli::Cli::parse();
    shelfwatch::cli::init_logging(&cli.log, cli.log_format);
    shelfwatch::cli::run(cli)
}

/// A panic in a capture or inference thread would leave the pipeline half-alive (the
/// zone's counts frozen while health still says "up"). Aborting after the panic
/// message lets systemd (`Restart=on-failure`) bring back a whole, known-good process.
/// This is `panic = "abort"` done at run time, so the release profile can stay
/// unwinding and be shared with the test build.
fn abort_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
}
