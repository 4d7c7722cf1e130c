//! `cargo xtask demo`: the main job end to end on a small realistic data set.
//!
//! Services (found or started), a fresh `smartbeak_demo` database, migrations, then the
//! database demo: seed orgs, domains, content and metrics, read the analytics aggregates back
//! and show the pool's settings and figures.

use anyhow::{Context, Result};
use xshell::{Shell, cmd};

use crate::services::Services;
use crate::test::FreshDatabase;

pub(crate) struct Demo;

impl Demo {
    pub(crate) fn run(&self, sh: &Shell) -> Result<()> {
        let services = Services::find_or_start()?;
        let database = FreshDatabase::named(sh, &services, "smartbeak_demo")?;
        let _env = [
            sh.push_env("DATABASE_URL", &database.url),
            sh.push_env("REDIS_URL", &services.redis_url),
        ];
        eprintln!("xtask: building the demo");
        cmd!(
            sh,
            "cargo build --quiet -p smartbeak-database --bin smartbeak-migrate --example demo"
        )
        .run()
        .context("build failed")?;
        cmd!(
            sh,
            "cargo run --quiet -p smartbeak-database --bin smartbeak-migrate"
        )
        .run()
        .context("migrations failed")?;
        cmd!(sh, "cargo run --quiet -p smartbeak-database --example demo")
            .run()
            .context("the database demo failed")?;
        Ok(())
    }
}
