//! One query layer over two engines: SQLite (embedded, the default) and PostgreSQL. The
//! queries are written once, in the SQL both engines take, with `?N` placeholders (PostgreSQL
//! gets them as `$N`); values cross as [`Value`]s. The API follows rusqlite's shape, which the
//! console was first written against, so a query reads the same whichever engine runs it.
//!
//! PostgreSQL types each placeholder from its first use: `fleet = ?1 OR ?1 IS NULL`, not the
//! other way round (`?1 IS NULL` alone says nothing of its type), and `CAST(?1 AS BIGINT)` where
//! nothing else says (a placeholder in a SELECT list).

use std::cell::RefCell;
use std::sync::Arc;

use super::pg;
use super::value::{Error, FromSql, Params, Result, Value};

pub(crate) enum Engine {
    Sqlite(rusqlite::Connection),
    Postgres(Box<pg::Pg>),
}

/// A connection to the console's database. Not shared between threads: the console keeps one
/// behind a mutex, and each query runs on a blocking thread.
pub struct Connection {
    engine: RefCell<Engine>,
    in_transaction: std::cell::Cell<bool>,
}

impl Connection {
    pub(crate) fn new(engine: Engine) -> Connection {
        Connection { engine: RefCell::new(engine), in_transaction: Default::default() }
    }

    /// The engine, for one statement. PostgreSQL connects again first if the server closed
    /// the connection, outside a transaction.
    fn engine(&self) -> Result<std::cell::RefMut<'_, Engine>> {
        let mut e = self.engine.borrow_mut();
        if let Engine::Postgres(pg) = &mut *e
            && !self.in_transaction.get()
        {
            pg.reconnect_if_closed()?;
        }
        Ok(e)
    }

    pub fn is_postgres(&self) -> bool {
        matches!(*self.engine.borrow(), Engine::Postgres(_))
    }

    /// Runs one statement; how many rows it changed.
    pub fn execute(&self, sql: &str, params: impl Params) -> Result<usize> {
        let values = params.values();
        match &mut *self.engine()? {
            Engine::Sqlite(c) => {
                let mut s = c.prepare_cached(sql)?;
                Ok(s.execute(rusqlite::params_from_iter(values.iter().map(sqlite_value)))?)
            }
            Engine::Postgres(c) => Ok(pg::execute(c, sql, &values)? as usize),
        }
    }

    /// Runs statements without parameters, separated by semicolons.
    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        match &mut *self.engine()? {
            Engine::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Engine::Postgres(c) => c.batch(sql),
        }
    }

    /// Every row a query returns.
    pub fn query(&self, sql: &str, params: impl Params) -> Result<Vec<Row>> {
        let values = params.values();
        match &mut *self.engine()? {
            Engine::Sqlite(c) => {
                let mut s = c.prepare_cached(sql)?;
                let names: Arc<[String]> = s.column_names().iter().map(|n| n.to_string()).collect();
                let mut rows = s.query(rusqlite::params_from_iter(values.iter().map(sqlite_value)))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let values = (0..names.len()).map(|i| r.get::<_, rusqlite::types::Value>(i).map(from_sqlite));
                    out.push(Row { names: names.clone(), values: values.collect::<Result<_, _>>()? });
                }
                Ok(out)
            }
            Engine::Postgres(c) => {
                let (names, rows) = pg::query(c, sql, &values)?;
                Ok(rows.into_iter().map(|values| Row { names: names.clone(), values }).collect())
            }
        }
    }

    /// The first row of a query, through `f`; [`Error::NoRows`] when there is none.
    pub fn query_row<T>(&self, sql: &str, params: impl Params, f: impl FnOnce(&Row) -> Result<T>) -> Result<T> {
        let rows = self.query(sql, params)?;
        f(rows.first().ok_or(Error::NoRows)?)
    }

    /// A statement to run with [`Statement::query_map`].
    pub fn prepare(&self, sql: &str) -> Result<Statement<'_>> {
        Ok(Statement { conn: self, sql: sql.to_owned() })
    }

    /// Starts a transaction, rolled back unless committed.
    pub fn transaction(&mut self) -> Result<Transaction<'_>> {
        self.execute_batch("BEGIN")?;
        self.in_transaction.set(true);
        Ok(Transaction { conn: self, done: false })
    }
}

/// A query and its rows mapped one by one (rusqlite's `prepare` + `query_map`).
pub struct Statement<'c> {
    conn: &'c Connection,
    sql: String,
}

impl Statement<'_> {
    pub fn query_map<T>(
        &mut self,
        params: impl Params,
        mut f: impl FnMut(&Row) -> Result<T>,
    ) -> Result<std::vec::IntoIter<Result<T>>> {
        let rows = self.conn.query(&self.sql, params)?;
        Ok(rows.iter().map(&mut f).collect::<Vec<_>>().into_iter())
    }
}

/// A transaction: derefs to its connection; [`commit`](Transaction::commit) ends it, and
/// dropping it uncommitted rolls it back.
pub struct Transaction<'c> {
    conn: &'c Connection,
    done: bool,
}

impl Transaction<'_> {
    pub fn commit(mut self) -> Result<()> {
        self.done = true;
        self.conn.in_transaction.set(false);
        self.conn.execute_batch("COMMIT")
    }
}

impl std::ops::Deref for Transaction<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.conn.in_transaction.set(false);
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// One row of a result: its values by position or column name.
#[derive(Debug)]
pub struct Row {
    names: Arc<[String]>,
    values: Vec<Value>,
}

/// A column by position or by name.
pub trait RowIndex {
    fn index(&self, names: &[String]) -> Option<usize>;
}

impl RowIndex for usize {
    fn index(&self, names: &[String]) -> Option<usize> {
        (*self < names.len()).then_some(*self)
    }
}

impl RowIndex for &str {
    fn index(&self, names: &[String]) -> Option<usize> {
        names.iter().position(|n| n == self)
    }
}

impl Row {
    pub fn get<I: RowIndex + std::fmt::Debug, T: FromSql>(&self, idx: I) -> Result<T> {
        let i = idx.index(&self.names).ok_or_else(|| Error::Column(format!("no column {idx:?}")))?;
        T::from_value(&self.values[i]).map_err(|e| Error::Column(format!("column {}: {e}", self.names[i])))
    }
}

fn sqlite_value(v: &Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as S;
    match v {
        Value::Null => S::Null,
        Value::Integer(n) => S::Integer(*n),
        Value::Real(x) => S::Real(*x),
        Value::Text(t) => S::Text(t.clone()),
        Value::Blob(b) => S::Blob(b.clone()),
    }
}

fn from_sqlite(v: rusqlite::types::Value) -> Value {
    use rusqlite::types::Value as S;
    match v {
        S::Null => Value::Null,
        S::Integer(n) => Value::Integer(n),
        S::Real(x) => Value::Real(x),
        S::Text(t) => Value::Text(t),
        S::Blob(b) => Value::Blob(b),
    }
}
