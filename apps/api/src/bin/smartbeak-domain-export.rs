//! The domain export job (placeholder).
//!
//! The worker that claims `domain_exports` rows (`FOR UPDATE SKIP LOCKED`, a lease renewed by
//! heartbeat, completion fenced by `fencing_token`) and streams CSV / JSON / Markdown is a
//! later issue; the api already writes the queue rows it will claim. Until then this binary
//! says so and exits with code 2, rather than pretending to process exports.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "smartbeak-domain-export: the export worker is not implemented yet; \
         exports requested through the api stay queued until it is (see ARCHITECTURE.md)"
    );
    ExitCode::from(2)
}
