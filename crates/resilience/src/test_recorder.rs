//! A minimal in-memory `metrics` recorder for unit tests (install it with
//! `metrics::with_local_recorder`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};

#[derive(Debug, Default)]
pub(crate) struct TestRecorder {
    counters: Mutex<BTreeMap<String, Arc<Cell>>>,
    gauges: Mutex<BTreeMap<String, Arc<Cell>>>,
}

#[derive(Debug, Default)]
struct Cell(AtomicU64);

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::SeqCst);
    }
}

impl GaugeFn for Cell {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::SeqCst);
    }
}

/// `name{k=v,...}` with labels in registration order.
fn render(key: &Key) -> String {
    let labels: Vec<_> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl TestRecorder {
    pub(crate) fn counter(&self, key: &str) -> u64 {
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        counters.get(key).map_or(0, |c| c.0.load(Ordering::SeqCst))
    }

    pub(crate) fn gauge(&self, key: &str) -> Option<f64> {
        let gauges = self.gauges.lock().unwrap_or_else(|e| e.into_inner());
        gauges
            .get(key)
            .map(|c| f64::from_bits(c.0.load(Ordering::SeqCst)))
    }

    fn cell(map: &Mutex<BTreeMap<String, Arc<Cell>>>, key: &Key) -> Arc<Cell> {
        let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(map.entry(render(key)).or_default())
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Self::cell(&self.counters, key))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(Self::cell(&self.gauges, key))
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}
