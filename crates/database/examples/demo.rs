//! The database layer end to end: seeds a small realistic data set into `DATABASE_URL`
//! (already migrated), reads the analytics aggregates back through the analytics pool, and
//! prints what it did, with the session settings the server sees and the pool's figures.
//!
//! Run it through `cargo xtask demo`, which provides the database.

use std::time::Duration;

use smartbeak_database::{Database, DatabaseConfig};
use uuid::Uuid;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = DatabaseConfig::from_env()?;
    println!("database: {}", config.url);
    let db = Database::connect(config, "smartbeak-demo").await?;

    let (first_org, summary) = seed(&db).await?;
    println!(
        "seeded: {} orgs, {} domains, {} content items, {} keyword rows, {} performance rows",
        summary.0, summary.1, summary.2, summary.3, summary.4
    );
    // `cargo xtask demo` reads this line to create an api key for that org.
    println!("demo org id: {first_org}");

    // Analytics reads go to the replica while it answers (ANALYTICS_DB_URL), else the primary.
    let (_, source) = db
        .run_analytics(async |conn| sqlx::query("SELECT 1").execute(conn).await)
        .await?;
    println!("analytics reads served by: {}", source.as_str());
    let domains: Vec<(Uuid, String, String)> = db
        .run_analytics(async |conn| sqlx::query_as(
                "SELECT d.id, d.name, o.name FROM domains d JOIN orgs o ON o.id = d.org_id ORDER BY o.name, d.name",
            )
            .fetch_all(conn).await)
        .await?
        .0;
    for (id, domain, org) in &domains {
        let keywords: Vec<(String, f64, f64, i64, i64, f64)> = db
            .run_analytics(async |conn| {
                sqlx::query_as(
                    "SELECT keyword, avg(search_volume)::float8, avg(position), sum(clicks)::int8, \
                     sum(impressions)::int8, avg(ctr) FROM keyword_metrics WHERE domain_id = $1 \
                     GROUP BY keyword ORDER BY sum(clicks) DESC LIMIT 3",
                )
                .bind(id)
                .fetch_all(conn)
                .await
            })
            .await?
            .0;
        let (views, visitors, revenue): (i64, i64, i64) = db
            .run_analytics(async |conn| sqlx::query_as(
                    "SELECT coalesce(sum(page_views), 0)::int8, coalesce(sum(unique_visitors), 0)::int8, \
                     coalesce(sum(revenue_cents), 0)::int8 FROM content_performance WHERE domain_id = $1",
                )
                .bind(id)
                .fetch_one(conn).await)
            .await?
            .0;
        println!(
            "{org} / {domain}: {views} page views, {visitors} visitors, revenue {}.{:02}",
            revenue / 100,
            revenue % 100
        );
        for (keyword, volume, position, clicks, impressions, ctr) in keywords {
            println!(
                "    {keyword:<28} volume {volume:>7.0}  position {position:>5.1}  clicks {clicks:>5}  impressions {impressions:>6}  ctr {:>5.2}%",
                ctr * 100.0
            );
        }
    }

    let (statement_timeout, idle_tx, app) = db
        .run(async |conn| {
            let statement_timeout: String = sqlx::query_scalar("SHOW statement_timeout")
                .fetch_one(&mut *conn)
                .await?;
            let idle_tx: String = sqlx::query_scalar("SHOW idle_in_transaction_session_timeout")
                .fetch_one(&mut *conn)
                .await?;
            let app: String = sqlx::query_scalar("SHOW application_name")
                .fetch_one(&mut *conn)
                .await?;
            Ok((statement_timeout, idle_tx, app))
        })
        .await?;
    println!(
        "session as the server sees it: application_name={app} statement_timeout={statement_timeout} idle_in_transaction_session_timeout={idle_tx}"
    );
    let m = db.metrics();
    println!(
        "pool: {} open ({} idle, {} in use) of max {}; {} acquires, {} query errors, {} timeouts",
        m.primary.size,
        m.primary.idle,
        m.primary.in_use,
        m.primary.max,
        m.acquires_total,
        m.query_errors_total,
        m.query_timeouts_total
    );
    db.close(Duration::from_secs(5)).await?;
    println!("demo finished: pools closed");
    Ok(())
}

/// Inserts two orgs with domains, content and 30 days of metrics, all in one transaction.
/// Values follow a fixed pattern, so two runs print the same figures.
async fn seed(db: &Database) -> anyhow::Result<(Uuid, (usize, usize, usize, usize, usize))> {
    let orgs = [
        ("Acme Media", &["acme-recipes.com", "acme-travel.io"][..]),
        ("Northwind Labs", &["northwind.dev"][..]),
    ];
    let keywords = [
        "best pasta recipe",
        "quick dinner ideas",
        "budget travel europe",
        "rust async tutorial",
        "postgres connection pool",
    ];
    let mut tx = db.begin().await?;
    let mut first_org = None;
    let (mut n_domains, mut n_content, mut n_kw, mut n_perf) = (0, 0, 0, 0);
    for (o, (org, domains)) in orgs.iter().enumerate() {
        let org_id = Uuid::new_v4();
        first_org.get_or_insert(org_id);
        tx.run(async |conn| {
            sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, $2)")
                .bind(org_id)
                .bind(org)
                .execute(conn)
                .await
        })
        .await?;
        for (d, domain) in domains.iter().enumerate() {
            let domain_id = Uuid::new_v4();
            n_domains += 1;
            tx.run(async |conn| {
                sqlx::query("INSERT INTO domains (id, org_id, name) VALUES ($1, $2, $3)")
                    .bind(domain_id)
                    .bind(org_id)
                    .bind(domain)
                    .execute(conn)
                    .await
            })
            .await?;
            let mut content_ids = Vec::new();
            for c in 0..4 {
                let id = Uuid::new_v4();
                content_ids.push(id);
                n_content += 1;
                let status = if c < 3 { "published" } else { "draft" };
                tx.run(async |conn| sqlx::query(
                    "INSERT INTO content_items (id, domain_id, title, slug, body, status, published_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $6 = 'published' THEN now() END)",
                )
                .bind(id)
                .bind(domain_id)
                .bind(format!("Article {} on {domain}", c + 1))
                .bind(format!("article-{}", c + 1))
                .bind("Lorem ipsum dolor sit amet.")
                .bind(status)
                .execute(conn).await).await?;
            }
            let seed = (o * 7 + d * 3) as i64;
            for day in 0..30i64 {
                for (k, keyword) in keywords.iter().enumerate() {
                    let k = k as i64;
                    let impressions = 500 + (seed + day * 13 + k * 101) % 900;
                    let clicks = impressions * (3 + (day + k) % 7) / 100;
                    n_kw += 1;
                    tx.run(async |conn| sqlx::query(
                        "INSERT INTO keyword_metrics (domain_id, keyword, search_volume, position, clicks, impressions, ctr, recorded_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, now() - make_interval(days => $8))",
                    )
                    .bind(domain_id)
                    .bind(keyword)
                    .bind((1000 + (seed + k * 977) % 9000) as i32)
                    .bind(1.0 + ((seed + day + k * 5) % 40) as f64 / 2.0)
                    .bind(clicks)
                    .bind(impressions)
                    .bind(clicks as f64 / impressions as f64)
                    .bind(day as i32)
                    .execute(conn).await).await?;
                }
                for (c, content_id) in content_ids.iter().enumerate() {
                    let views = 100 + (seed + day * 17 + c as i64 * 53) % 400;
                    n_perf += 1;
                    tx.run(async |conn| sqlx::query(
                        "INSERT INTO content_performance (domain_id, content_id, page_views, unique_visitors, bounce_rate, conversions, revenue_cents, recorded_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, now() - make_interval(days => $8))",
                    )
                    .bind(domain_id)
                    .bind(content_id)
                    .bind(views)
                    .bind(views * 7 / 10)
                    .bind(0.3 + (day % 5) as f64 / 20.0)
                    .bind(views / 50)
                    .bind(views * 12)
                    .bind(day as i32)
                    .execute(conn).await).await?;
                }
            }
        }
    }
    tx.commit().await?;
    let first_org = first_org.ok_or_else(|| anyhow::anyhow!("no org seeded"))?;
    Ok((first_org, (orgs.len(), n_domains, n_content, n_kw, n_perf)))
}
