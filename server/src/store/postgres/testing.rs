//! A PostgreSQL store for tests: a fresh schema per store in the database
//! `HUDDLE_TEST_POSTGRES` names, dropped when the store is.

use super::*;

/// The variable naming the test database; without it the PostgreSQL
/// tests are skipped.
pub const DATABASE_VAR: &str = "HUDDLE_TEST_POSTGRES";

/// A [`PgStore`] in a schema of its own, dropped with it.
pub struct TestPg {
    store: Option<PgStore>,
    url: String,
    schema: String,
}

impl std::ops::Deref for TestPg {
    type Target = PgStore;
    fn deref(&self) -> &PgStore {
        self.store.as_ref().expect("open until dropped")
    }
}

impl TestPg {
    /// A second store on the same schema, as a second DS process would
    /// open it.
    pub fn another(&self) -> PgStore {
        PgStore::open_with(self.config(), 4).expect("a second connection")
    }

    /// The connection settings of this store's schema.
    pub fn config(&self) -> ::postgres::Config {
        config(&self.url, &self.schema)
    }
}

fn config(url: &str, schema: &str) -> ::postgres::Config {
    let mut c: ::postgres::Config = url.parse().expect("a valid HUDDLE_TEST_POSTGRES");
    c.options(&format!("-c search_path={schema}"));
    c
}

/// A store in a new schema of the test database, or `None` (with a note
/// on stderr) when `HUDDLE_TEST_POSTGRES` is not set. Panics if it is set
/// and the database cannot be reached: a run that was asked to test
/// PostgreSQL must not pass without it.
pub fn store(test: &str) -> Option<TestPg> {
    let Ok(url) = std::env::var(DATABASE_VAR) else {
        eprintln!(
            "skipped {test} on PostgreSQL: {DATABASE_VAR} is not set (for example \
             postgres://root@127.0.0.1:5432/test)"
        );
        return None;
    };
    let schema = format!("huddle_test_{}", hex::encode(rand::random::<[u8; 8]>()));
    let mut admin = ::postgres::Client::connect(&url, ::postgres::NoTls)
        .unwrap_or_else(|e| panic!("{DATABASE_VAR}={url}: cannot connect: {e}"));
    admin
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .expect("creating a test schema");
    let store = PgStore::open_with(config(&url, &schema), 4).expect("opening the test store");
    Some(TestPg {
        store: Some(store),
        url,
        schema,
    })
}

impl Drop for TestPg {
    fn drop(&mut self) {
        drop(self.store.take());
        if let Ok(mut admin) = ::postgres::Client::connect(&self.url, ::postgres::NoTls) {
            let _ = admin.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.schema));
        }
    }
}

impl PgStore {
    /// Rows in `table` (a name from [`MIGRATIONS`]).
    pub fn count_rows_for_tests(&self, table: &str) -> u64 {
        self.txn(|t| {
            u(t.query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .map_err(pg)?
                .get(0))
        })
        .expect("counting rows")
    }
}
