//! The SmartBeak HTTP API as a library: the binary (`src/main.rs`) wires it to the process
//! (config, telemetry, signals), tests build the same [`http::app`] router.
//!
//! Codemap: [`config`] (env), [`error`] (the one error shape), [`auth`] (API keys), [`auth_cache`] (their
//! in-process cache, evicted by `LISTEN/NOTIFY` through [`listen`]),
//! [`ratelimit`] (Redis GCRA with fail-open/closed), [`routes`] (handlers by resource),
//! [`analytics`] (single-flight cached aggregates), [`http`] (router and layers), [`serve`] (connections: header-read timeout, cap, drain),
//! [`openapi`] (the generated document), [`idempotency`] (`Idempotency-Key` records), [`state`] (what handlers share), [`jobs`] (the
//! domain export job: its queue, writers and worker), [`startup`] (the start-up wiring the
//! three service binaries share: metrics recorder, database connect and pool handler).

#![warn(missing_docs)]

pub mod analytics;
pub mod auth;
pub mod auth_cache;
pub mod config;
pub mod error;
pub mod http;
pub mod idempotency;
pub mod jobs;
pub mod key_usage;
pub mod listen;
pub mod openapi;
pub mod ratelimit;
pub mod routes;
pub mod serve;
pub mod startup;
pub mod state;

pub use http::app;
pub use state::AppState;
