//! The domain export job (placeholder).
//!
//! The worker that claims `domain_exports` rows (`FOR UPDATE SKIP LOCKED`, a lease renewed by
//! heartbeat, completion fenced by `fencing_token`) and streams CSV / JSON / Markdown is a
//! later issue; the api already writes the queue rows it will claim. Until then this binary
//! says so and exits with code 2, rather than pretending to process exports. It already runs
//! its (empty) async part through `smartbeak_shutdown::run_main`, like every binary, so the
//! worker inherits the bounded runtime teardown.

use std::process::ExitCode;

fn main() -> ExitCode {
    smartbeak_shutdown::run_main(async {
        eprintln!(
            "smartbeak-domain-export: the export worker is not implemented yet; \
             exports requested through the api stay queued until it is (see ARCHITECTURE.md)"
        );
        ExitCode::from(2)
    })
}
