// The training step allocates and frees tensors of a few MiB thousands of times a second; glibc's
// malloc hands such blocks back to the kernel each time (page faults were ~10% of a step under
// perf), mimalloc keeps them. Measured with `illmrec bench step`: see README.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` of mimalloc.h (v2 and v3): libmimalloc-sys names no constant for it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> anyhow::Result<()> {
    // mimalloc still gives freed pages back to the kernel a while after they fall idle (1 s in its
    // v3, which libmimalloc-sys builds; 10 ms in v2), and the next step faults them in again,
    // zeroed: on SmolLM2 `bench llm --shapes 1x512` (2 threads) took 20,067 page faults and 15.6
    // CPU seconds that way, 1,734 and 12.5 s with purging off, at the same peak RSS (the step
    // reaches its peak anyway). MIMALLOC_PURGE_DELAY, when set, wins.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide allocator option; mimalloc reads it on each purge decision.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    let result = illmrec::cli::main();
    // The last spans (and the error's) reach the collector only if the provider is flushed.
    illmrec::telemetry::shutdown();
    match result? {
        0 => Ok(()),
        status => std::process::exit(status),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_delay_option_is_the_one_with_mimallocs_default_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: reads an allocator option. Its default: 1000 ms in mimalloc v3, 10 in v2.
            let delay = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
            assert!(delay == 1000 || delay == 10, "option {} reads {delay}", super::MI_OPTION_PURGE_DELAY);
        }
    }
}
