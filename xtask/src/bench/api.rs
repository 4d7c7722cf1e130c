//! The api: `GET /v1/domains/{id}` at 1,000 and 5,000 connections, limiter on and off, an open-loop run, and the `/healthz` and `pgbench` ceilings.

use anyhow::{Result, bail};

use super::Ctx;
use super::model::Section;

pub(crate) fn api(_ctx: &Ctx<'_>) -> Result<Section> {
    bail!("not implemented yet")
}
