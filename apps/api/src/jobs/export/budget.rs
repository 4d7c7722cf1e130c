//! The byte budget between an export's reader and its writer thread: every data message
//! (a batch of rows, or of `COPY` frames) takes as many bytes of the budget as it holds
//! before it is sent, and gives them back once the writer has encoded it. So at most
//! [`IN_FLIGHT_BYTES`] of data are in flight whatever the rows look like; a single message
//! larger than the whole budget (one huge row) takes all of it and travels alone.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// The default budget: the bytes of data in flight between the reader and the writer
/// (about four batches of [`super::sections::BATCH_BYTES`]).
pub(crate) const IN_FLIGHT_BYTES: usize = 256 * 1024;

/// The budget, with what tests observe of it.
#[derive(Debug)]
pub(crate) struct Budget {
    semaphore: Arc<Semaphore>,
    capacity: usize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    waits: AtomicU64,
}

/// Bytes of the budget a message holds; dropping it gives them back.
#[derive(Debug)]
pub(crate) struct Held {
    _permit: OwnedSemaphorePermit,
    bytes: usize,
    budget: Arc<Budget>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget
            .in_flight
            .fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// The budget is gone (never happens: nothing closes its semaphore).
#[derive(Debug)]
pub(crate) struct Closed;

impl Budget {
    /// A budget of `capacity` bytes (at least 1).
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Arc::new(Self {
            semaphore: Arc::new(Semaphore::new(capacity)),
            capacity,
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            waits: AtomicU64::new(0),
        })
    }

    /// Takes `bytes` of the budget (all of it for a message larger than the budget),
    /// waiting until they are free.
    pub(crate) async fn take(self: &Arc<Self>, bytes: usize) -> Result<Held, Closed> {
        let permits = u32::try_from(bytes.clamp(1, self.capacity)).unwrap_or(u32::MAX);
        let permit = match self.semaphore.clone().try_acquire_many_owned(permits) {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => {
                self.waits.fetch_add(1, Ordering::SeqCst);
                self.semaphore
                    .clone()
                    .acquire_many_owned(permits)
                    .await
                    .map_err(|_| Closed)?
            }
            Err(TryAcquireError::Closed) => return Err(Closed),
        };
        let now = self.in_flight.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Ok(Held {
            _permit: permit,
            bytes,
            budget: self.clone(),
        })
    }

    /// The budget in bytes.
    #[cfg(test)]
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The most bytes of data that were in flight at once (the messages' real sizes).
    #[cfg(test)]
    #[cfg(test)]
    pub(crate) fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// How often the reader had to wait for the budget.
    #[cfg(test)]
    #[cfg(test)]
    pub(crate) fn waits(&self) -> u64 {
        self.waits.load(Ordering::SeqCst)
    }
}
