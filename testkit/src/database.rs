//! A throwaway PostgreSQL database for each test or benchmark run.
//!
//! Tests never mock PostgreSQL. Each one creates a database of its own on the real
//! server (`TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`,
//! names the server and a database to connect to for creating it), so tests running in
//! parallel never see each other's batches, and the database is dropped (its
//! connections closed first) when the [`TestDatabase`] is.

use sqlx::{Connection, PgConnection};

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database that lives as long as the test holding it.
pub struct TestDatabase {
    pub name: String,
    /// `DATABASE_URL` pointing at this database.
    pub url: String,
    admin_url: String,
}

impl TestDatabase {
    /// Creates a database named after `label` plus a random suffix.
    pub async fn new(label: &str) -> Self {
        let admin_url =
            std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.into());
        let name = format!(
            "spillway_test_{}_{}",
            label.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!("cannot connect to PostgreSQL at {admin_url} to create test database {name} (is PostgreSQL running? `./manage.sh test` starts it): {e}")
        });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let _ = admin.close().await;
        let url = match admin_url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("TEST_DATABASE_URL {admin_url} names no database"),
        };
        TestDatabase {
            name,
            url,
            admin_url,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop cannot await and may run in a runtime that is shutting down: the
        // database is dropped from a small runtime on a thread of its own. FORCE closes
        // the connections a pool of the test still holds.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(async {
                    let mut admin = PgConnection::connect(&admin_url).await?;
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await?;
                    admin.close().await
                })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}: {dropped:?}", self.name);
        }
    }
}
