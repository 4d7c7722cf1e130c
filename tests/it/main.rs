//! Workspace-level black-box tests: each module starts real binaries against real services.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod control_plane;
mod deploy;
mod export_worker;
mod startup;
mod support;
