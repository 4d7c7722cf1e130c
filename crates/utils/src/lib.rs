//! Shared async utilities of the smartbeak services: an HTTP client with
//! retry, deadlines and cancellation ([`fetch`]), cache stampede protection
//! ([`singleflight`]), and bounded concurrency with batch helpers
//! ([`concurrency`]).
#![warn(missing_docs)]

pub mod concurrency;
pub mod fetch;
pub mod singleflight;
