// The training step allocates and frees tensors of a few MiB thousands of times a second; glibc's
// malloc hands such blocks back to the kernel each time (page faults were ~10% of a step under
// perf), mimalloc keeps them. Measured with `illmrec bench step`: see README.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let result = illmrec::cli::main();
    // The last spans (and the error's) reach the collector only if the provider is flushed.
    illmrec::telemetry::shutdown();
    match result? {
        0 => Ok(()),
        status => std::process::exit(status),
    }
}
