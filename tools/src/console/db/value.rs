//! Values crossing the query layer: what a parameter binds and what a row's column holds, the
//! same for both engines (SQLite's five storage classes, which PostgreSQL's types map onto).

use std::fmt;

/// One parameter or column value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// A query layer error: the engine's own, a row that was not there, or a column whose value
/// does not convert to the type asked for.
#[derive(Debug)]
pub enum Error {
    Sqlite(rusqlite::Error),
    Postgres(postgres::Error),
    NoRows,
    Column(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Sqlite(e) => write!(f, "{e}"),
            // The server's message (`db error: ...` hides it behind the source chain).
            Error::Postgres(e) => match e.as_db_error() {
                Some(db) => write!(f, "{}: {}", db.severity(), db.message()),
                None => write!(f, "{e}"),
            },
            Error::NoRows => f.write_str("no row where one was expected"),
            Error::Column(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Error {
        match e {
            rusqlite::Error::QueryReturnedNoRows => Error::NoRows,
            e => Error::Sqlite(e),
        }
    }
}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Error {
        Error::Postgres(e)
    }
}

/// `Ok(None)` for a query that found no row.
pub trait OptionalExtension<T> {
    fn optional(self) -> Result<Option<T>>;
}

impl<T> OptionalExtension<T> for Result<T> {
    fn optional(self) -> Result<Option<T>> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(Error::NoRows) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A Rust value bound as a parameter.
pub trait ToSql {
    fn to_value(&self) -> Value;
}

macro_rules! to_sql_int {
    ($($t:ty),*) => {$(
        impl ToSql for $t {
            fn to_value(&self) -> Value {
                Value::Integer(*self as i64)
            }
        }
    )*};
}
to_sql_int!(i32, i64, u32, u8);

impl ToSql for bool {
    fn to_value(&self) -> Value {
        Value::Integer(*self as i64)
    }
}

impl ToSql for f64 {
    fn to_value(&self) -> Value {
        Value::Real(*self)
    }
}

impl ToSql for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}

impl ToSql for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}

impl ToSql for [u8] {
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}

impl ToSql for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}

impl ToSql for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}

impl<T: ToSql + ?Sized> ToSql for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}

impl<T: ToSql> ToSql for Option<T> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToSql::to_value)
    }
}

impl<T: ToSql + ?Sized> ToSql for Box<T> {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}

/// A query's parameters: `params![a, b]`, an array of one type, or a slice of `&dyn ToSql`.
pub trait Params {
    fn values(self) -> Vec<Value>;
}

impl Params for &[&dyn ToSql] {
    fn values(self) -> Vec<Value> {
        self.iter().map(|p| p.to_value()).collect()
    }
}

impl<T: ToSql, const N: usize> Params for [T; N] {
    fn values(self) -> Vec<Value> {
        self.iter().map(ToSql::to_value).collect()
    }
}

/// Parameters for a query: `params![id, name]` (each anything [`ToSql`]).
macro_rules! params {
    () => { &[] as &[&dyn $crate::console::db::value::ToSql] };
    ($($p:expr),+ $(,)?) => { &[$(&$p as &dyn $crate::console::db::value::ToSql),+] as &[&dyn $crate::console::db::value::ToSql] };
}
pub(crate) use params;

/// A column value read as a Rust type.
pub trait FromSql: Sized {
    fn from_value(v: &Value) -> Result<Self, String>;
}

impl FromSql for i64 {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Integer(n) => Ok(*n),
            // PostgreSQL's NUMERIC (a SUM of BIGINTs) holding a whole number.
            Value::Real(x) if x.fract() == 0.0 && x.abs() < 9.0e15 => Ok(*x as i64),
            other => Err(format!("{other:?} is not an integer")),
        }
    }
}

impl FromSql for u32 {
    fn from_value(v: &Value) -> Result<Self, String> {
        let n = i64::from_value(v)?;
        u32::try_from(n).map_err(|_| format!("{n} is out of range for u32"))
    }
}

impl FromSql for bool {
    fn from_value(v: &Value) -> Result<Self, String> {
        Ok(i64::from_value(v)? != 0)
    }
}

impl FromSql for f64 {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Real(x) => Ok(*x),
            Value::Integer(n) => Ok(*n as f64),
            other => Err(format!("{other:?} is not a number")),
        }
    }
}

impl FromSql for String {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            other => Err(format!("{other:?} is not text")),
        }
    }
}

impl FromSql for Vec<u8> {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Blob(b) => Ok(b.clone()),
            other => Err(format!("{other:?} is not a blob")),
        }
    }
}

impl FromSql for Value {
    fn from_value(v: &Value) -> Result<Self, String> {
        Ok(v.clone())
    }
}

impl<T: FromSql> FromSql for Option<T> {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_convert_both_ways_and_wrong_types_say_so() {
        let p: Vec<Value> = params![1i64, "a", Some(2.5), None::<i64>, true, vec![1u8]].values();
        assert_eq!(
            p,
            [
                Value::Integer(1),
                Value::Text("a".into()),
                Value::Real(2.5),
                Value::Null,
                Value::Integer(1),
                Value::Blob(vec![1])
            ]
        );
        assert_eq!(i64::from_value(&Value::Real(3.0)), Ok(3));
        assert!(i64::from_value(&Value::Real(3.5)).unwrap_err().contains("not an integer"));
        assert_eq!(Option::<String>::from_value(&Value::Null), Ok(None));
        assert_eq!(bool::from_value(&Value::Integer(1)), Ok(true));
        assert!(u32::from_value(&Value::Integer(-1)).unwrap_err().contains("out of range"));
        assert!(String::from_value(&Value::Integer(1)).unwrap_err().contains("not text"));
    }
}
