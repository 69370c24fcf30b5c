//! PostgreSQL's side of the query layer: placeholders, parameters and result columns.
//!
//! Parameters go to the server as text (bytes for BYTEA) and the server parses them into
//! whatever type it inferred for the placeholder, as SQLite's loose typing would take them; a
//! result column is read by its type into a [`Value`]. Statements are prepared once per
//! connection and kept.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::sync::Arc;

use bytes::BytesMut;
use postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

use super::value::{Error, Result, Value};

/// A PostgreSQL connection and its prepared statements.
pub struct Pg {
    url: String,
    client: postgres::Client,
    statements: HashMap<String, postgres::Statement>,
}

impl Pg {
    pub fn connect(url: &str) -> Result<Pg> {
        let client = postgres::Client::connect(url, postgres::NoTls)?;
        Ok(Pg { url: url.to_owned(), client, statements: HashMap::new() })
    }

    /// Connects again when the server closed the connection (a restart, a failover). Called
    /// only between transactions: a transaction's statements never straddle two connections.
    pub fn reconnect_if_closed(&mut self) -> Result<()> {
        if self.client.is_closed() {
            tracing::warn!("the database connection closed; connecting again");
            *self = Pg::connect(&self.url)?;
        }
        Ok(())
    }

    fn statement(&mut self, sql: &str) -> Result<postgres::Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(&placeholders(sql))?;
        // A console's queries are a fixed set (the fleet filter's few dozen shapes included).
        if self.statements.len() < 512 {
            self.statements.insert(sql.to_owned(), s.clone());
        }
        Ok(s)
    }

    pub fn batch(&mut self, sql: &str) -> Result<()> {
        Ok(self.client.batch_execute(sql)?)
    }
}

pub fn execute(pg: &mut Pg, sql: &str, values: &[Value]) -> Result<u64> {
    let s = pg.statement(sql)?;
    let params: Vec<Param<'_>> = values.iter().map(Param).collect();
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
    Ok(pg.client.execute(&s, &refs)?)
}

/// A query's column names and rows.
pub type Rows = (Arc<[String]>, Vec<Vec<Value>>);

/// Runs a query: its column names and rows.
pub fn query(pg: &mut Pg, sql: &str, values: &[Value]) -> Result<Rows> {
    let s = pg.statement(sql)?;
    let params: Vec<Param<'_>> = values.iter().map(Param).collect();
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
    let rows = pg.client.query(&s, &refs)?;
    let names: Arc<[String]> = s.columns().iter().map(|c| c.name().to_owned()).collect();
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let values = (0..row.len()).map(|i| column(row, i)).collect::<Result<Vec<_>>>()?;
        out.push(values);
    }
    Ok((names, out))
}

/// `?N` becomes `$N`, and a bare `?` the next number; string literals are left alone.
pub fn placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let (mut quoted, mut next) = (false, 0);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => {
                out.push('$');
                if chars.peek().is_some_and(char::is_ascii_digit) {
                    while let Some(d) = chars.next_if(char::is_ascii_digit) {
                        out.push(d);
                    }
                } else {
                    next += 1;
                    out.push_str(&next.to_string());
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// A parameter, sent as text the server parses into the placeholder's type (bytes for BYTEA).
#[derive(Debug)]
struct Param<'a>(&'a Value);

impl ToSql for Param<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        let text = match self.0 {
            Value::Null => return Ok(IsNull::Yes),
            Value::Blob(b) if *ty == Type::BYTEA => {
                out.extend_from_slice(b);
                return Ok(IsNull::No);
            }
            Value::Blob(_) => return Err(format!("bytes bound where the query takes {ty}").into()),
            Value::Integer(n) => n.to_string(),
            Value::Real(x) if x.is_nan() => "NaN".into(),
            Value::Real(x) if x.is_infinite() => if *x > 0.0 { "Infinity" } else { "-Infinity" }.into(),
            Value::Real(x) => x.to_string(),
            Value::Text(t) => t.clone(),
        };
        out.extend_from_slice(text.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn encode_format(&self, ty: &Type) -> postgres::types::Format {
        match self.0 {
            Value::Blob(_) if *ty == Type::BYTEA => postgres::types::Format::Binary,
            _ => postgres::types::Format::Text,
        }
    }

    to_sql_checked!();
}

fn column(row: &postgres::Row, i: usize) -> Result<Value> {
    let ty = row.columns()[i].type_().clone();
    let v = match ty {
        Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map(|b| Value::Integer(b as i64)),
        Type::INT2 => row.try_get::<_, Option<i16>>(i)?.map(|n| Value::Integer(n.into())),
        Type::INT4 => row.try_get::<_, Option<i32>>(i)?.map(|n| Value::Integer(n.into())),
        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Value::Integer),
        Type::FLOAT4 => row.try_get::<_, Option<f32>>(i)?.map(|x| Value::Real(x.into())),
        Type::FLOAT8 => row.try_get::<_, Option<f64>>(i)?.map(Value::Real),
        Type::NUMERIC => row.try_get::<_, Option<Numeric>>(i)?.map(|n| n.0),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            row.try_get::<_, Option<String>>(i)?.map(Value::Text)
        }
        Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob),
        other => return Err(Error::Column(format!("column {}: type {other} is not read", row.columns()[i].name()))),
    };
    Ok(v.unwrap_or(Value::Null))
}

/// NUMERIC (what SUM of a BIGINT column gives): whole numbers as integers, others as reals.
struct Numeric(Value);

impl<'a> FromSql<'a> for Numeric {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Numeric, Box<dyn StdError + Sync + Send>> {
        decode_numeric(raw).map(Numeric).ok_or_else(|| "malformed NUMERIC".into())
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }
}

/// NUMERIC's binary form: digit count, weight (of the first base-10000 digit), sign, display
/// scale, then the digits.
fn decode_numeric(raw: &[u8]) -> Option<Value> {
    let word = |i: usize| raw.get(i * 2..i * 2 + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let (ndigits, weight, sign, scale) = (word(0)? as usize, word(1)? as i16, word(2)?, word(3)?);
    if sign == 0xC000 {
        return Some(Value::Real(f64::NAN));
    }
    let digits: Vec<u16> = (0..ndigits).map(|i| word(4 + i)).collect::<Option<_>>()?;
    let negative = sign == 0x4000;
    let whole = scale == 0 && digits.len() as i32 <= weight as i32 + 1 && weight < 5;
    if whole {
        let mut n: i128 = 0;
        for (i, d) in digits.iter().enumerate() {
            n += *d as i128 * 10_000i128.pow((weight as i32 - i as i32) as u32);
        }
        let n = if negative { -n } else { n };
        if let Ok(n) = i64::try_from(n) {
            return Some(Value::Integer(n));
        }
    }
    let x: f64 = digits.iter().enumerate().map(|(i, d)| *d as f64 * 10_000f64.powi(weight as i32 - i as i32)).sum();
    Some(Value::Real(if negative { -x } else { x }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_outside_string_literals() {
        assert_eq!(placeholders("SELECT ?1, ?12 WHERE a = ?2"), "SELECT $1, $12 WHERE a = $2");
        assert_eq!(placeholders("a = ? AND b LIKE '%?%' AND c = ?"), "a = $1 AND b LIKE '%?%' AND c = $2");
    }

    #[test]
    fn numerics_decode_as_integers_when_whole() {
        let enc = |words: &[u16]| words.iter().flat_map(|w| w.to_be_bytes()).collect::<Vec<u8>>();
        // 12345678 = 1234|5678, weight 1.
        assert_eq!(decode_numeric(&enc(&[2, 1, 0, 0, 1234, 5678])), Some(Value::Integer(12_345_678)));
        assert_eq!(decode_numeric(&enc(&[1, 0, 0x4000, 0, 7])), Some(Value::Integer(-7)));
        // 10000 is one digit 1 at weight 1 (trailing zero digits are dropped).
        assert_eq!(decode_numeric(&enc(&[1, 1, 0, 0, 1])), Some(Value::Integer(10_000)));
        assert_eq!(decode_numeric(&enc(&[0, 0, 0, 0])), Some(Value::Integer(0)));
        // 1.5 = 1 . 5000, weight 0, scale 1.
        assert_eq!(decode_numeric(&enc(&[2, 0, 0, 1, 1, 5000])), Some(Value::Real(1.5)));
        assert_eq!(decode_numeric(&[0, 1]), None);
    }
}
