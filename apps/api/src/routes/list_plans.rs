//! The list queries' plans under `plan_cache_mode = force_generic_plan` (what a prepared
//! statement runs after five executions): every shape keeps its cursor (and status) in the
//! index condition, so a deep page starts at the cursor instead of scanning like `OFFSET`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use smartbeak_database::Database;
use smartbeak_database::testing::{TestDatabase, explain_generic};
use uuid::Uuid;

/// The plan's `Index Cond` lines, joined.
fn index_conds(plan: &str) -> String {
    plan.lines()
        .filter(|l| l.contains("Index Cond"))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn fixture() -> (TestDatabase, Database, Uuid, Uuid) {
    let tdb = TestDatabase::create().await.unwrap();
    let db = Database::connect(tdb.config(), "smartbeak-list-plans-test")
        .await
        .unwrap();
    let org = crate::auth::create_org(&db, "list plans").await.unwrap();
    let other = crate::auth::create_org(&db, "other org").await.unwrap();
    let domain = crate::jobs::queue::tests::add_domain(&db, org, "plans.example.com").await;
    // Enough rows (mostly another org's / another domain's) that a sequential scan is not
    // the cheap choice, then fresh statistics.
    db.run(async |conn| {
        sqlx::query(
            "INSERT INTO domains (id, org_id, name, created_at) \
             SELECT gen_random_uuid(), CASE WHEN i % 10 = 0 THEN $1 ELSE $2 END, \
                 'd' || i || '.example.com', now() - i * interval '1 second' \
             FROM generate_series(1, 20000) i",
        )
        .bind(org)
        .bind(other)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO content_items (id, domain_id, title, slug, body, status, created_at) \
             SELECT gen_random_uuid(), CASE WHEN i % 10 = 0 THEN $1 \
                 ELSE (SELECT id FROM domains WHERE org_id = $2 LIMIT 1) END, \
                 't', 's' || i, 'b', CASE WHEN i % 2 = 0 THEN 'draft' ELSE 'published' END, \
                 now() - i * interval '1 second' \
             FROM generate_series(1, 20000) i",
        )
        .bind(domain)
        .bind(other)
        .execute(&mut *conn)
        .await?;
        sqlx::raw_sql("ANALYZE domains; ANALYZE content_items")
            .execute(&mut *conn)
            .await
    })
    .await
    .unwrap();
    (tdb, db, org, domain)
}

fn cursor_args() -> [String; 2] {
    [
        "now() - interval '1 hour'".to_owned(),
        format!("'{}'", Uuid::max()),
    ]
}

#[tokio::test]
async fn domain_and_content_lists_keep_the_cursor_in_the_index_condition_of_a_generic_plan() {
    let (tdb, db, org, domain) = fixture().await;
    let mut conn = db.acquire().await.unwrap();

    for with_cursor in [false, true] {
        let sql = super::domains::list_sql(with_cursor);
        let mut types = vec!["uuid", "bigint"];
        let mut args = vec![format!("'{org}'"), "51".to_owned()];
        if with_cursor {
            types.extend(["timestamptz", "uuid"]);
            args.extend(cursor_args());
        }
        let plan = explain_generic(&mut conn, &sql, &types, &args)
            .await
            .unwrap();
        assert!(
            plan.contains("domains_org_cursor_idx"),
            "domains (cursor: {with_cursor}) must scan the cursor index:\n{plan}"
        );
        let cond = index_conds(&plan);
        assert!(
            cond.contains("org_id"),
            "org in the index condition:\n{plan}"
        );
        assert_eq!(
            cond.contains("created_at"),
            with_cursor,
            "the cursor (and only a cursor) in the index condition:\n{plan}"
        );
    }

    for (with_status, with_cursor) in [(false, false), (true, false), (false, true), (true, true)] {
        let sql = super::content::list_sql(with_status, with_cursor);
        let mut types = vec!["uuid", "bigint"];
        let mut args = vec![format!("'{domain}'"), "51".to_owned()];
        if with_status {
            types.push("text");
            args.push("'draft'".into());
        }
        if with_cursor {
            types.extend(["timestamptz", "uuid"]);
            args.extend(cursor_args());
        }
        let plan = explain_generic(&mut conn, &sql, &types, &args)
            .await
            .unwrap();
        let index = if with_status {
            "content_items_domain_status_cursor_idx"
        } else {
            "content_items_domain_cursor_idx"
        };
        assert!(
            plan.contains(index),
            "content ({with_status}, {with_cursor}) must scan {index}:\n{plan}"
        );
        let cond = index_conds(&plan);
        assert_eq!(
            cond.contains("status"),
            with_status,
            "status bound:\n{plan}"
        );
        assert_eq!(
            cond.contains("created_at"),
            with_cursor,
            "cursor bound:\n{plan}"
        );
    }

    drop(conn);
    db.close(std::time::Duration::from_secs(5)).await.unwrap();
    tdb.drop_database().await.unwrap();
}
