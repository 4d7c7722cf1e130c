//! Criterion sections: the breaker (beside failsafe), single-flight (beside moka's
//! `get_with`) and bounded concurrency (beside `buffer_unordered`).

use anyhow::{Result, bail};

use super::Ctx;
use super::model::Section;

pub(crate) fn breaker(_ctx: &Ctx<'_>) -> Result<Section> {
    bail!("not implemented yet")
}

pub(crate) fn singleflight(_ctx: &Ctx<'_>) -> Result<Section> {
    bail!("not implemented yet")
}

pub(crate) fn bounded(_ctx: &Ctx<'_>) -> Result<Section> {
    bail!("not implemented yet")
}
