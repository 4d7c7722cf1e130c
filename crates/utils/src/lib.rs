//! Shared async utilities of the smartbeak services: an HTTP client built on
//! `smartbeak_resilience::Resilience`, with retry, deadlines and cancellation
//! ([`fetch`]), cache stampede protection
//! ([`singleflight`]), and bounded concurrency with batch helpers
//! ([`concurrency`]).
#![warn(missing_docs)]

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub mod concurrency;
pub mod fetch;
pub mod singleflight;
