//! Circuit breakers that stay bounded, retries that do not storm, timeouts
//! and bulkheads, for calls to outside providers ("adapters").
//!
//! (Full model documentation follows in a later commit.)

#![warn(missing_docs)]

pub mod adapter;
pub mod breaker;
pub mod bulkhead;
pub mod clock;
pub mod compose;
pub mod registry;
pub mod retry;
#[cfg(test)]
mod test_recorder;
pub mod timeout;
pub mod verdict;

pub use crate::adapter::AdapterName;
pub use crate::breaker::{
    BreakerConfig, BreakerError, BreakerPolicy, BreakerSnapshot, BreakerState, CallPermit,
    CancelledCalls, CircuitBreaker, ConfigError, PolicyId, Rejection, SlowCallConfig,
};
pub use crate::bulkhead::{Bulkhead, BulkheadConfig, BulkheadFull, BulkheadPermit};
pub use crate::clock::{Clock, ManualClock, SharedClock, StdClock, SystemClock, TokioClock};
pub use crate::compose::{Policy, Resilience, ResilienceConfig, ResilienceError};
pub use crate::registry::{BreakerRegistry, RegistryConfig};
pub use crate::retry::{
    RetryBudget, RetryBudgetConfig, RetryPolicy, parse_retry_after, retry_after_from_headers,
};
pub use crate::timeout::{Elapsed, maybe_timeout, timeout};
pub use crate::verdict::{Verdict, err_is_failure, err_is_transient};
