//! Workspace-level black-box tests: each module starts real binaries against real services.

mod api;
