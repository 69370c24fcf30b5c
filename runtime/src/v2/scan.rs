//! The request most clients send, read without serde's per-element work: a JSON body whose
//! inputs give `datatype` and `shape` before a `data` array of plain decimal numbers (FP32 or
//! FP64), as tritonclient and the peer harness write them. serde_json spends most of such a
//! request's parse on the numbers (22% of the server's CPU serving a 784-element CNN input at 8
//! clients, docs/benchmarks.md, "The request's numbers without serde"); here eight digits are read
//! at a time and the value is formed as serde_json forms it (the digits as an integer, divided by
//! the power of ten), so the tensor's bytes are the same.
//!
//! Anything else is not read here: [`request`] gives up (`None`) at the first thing it does not
//! take, and the caller parses the whole body with serde as before. So this path decides no
//! error and no unusual case: escaped strings, exponents, more digits than a `u64` holds, data
//! before its datatype, other datatypes, a wrong element count, a value out of FP32's range,
//! unknown fields, duplicates and malformed JSON all go to serde. Exponents matter most: Python's
//! `json` writes one for any value under 1e-4, so a large input from Python (150k elements) usually
//! holds one and is scanned up to it, then read by serde (measured in docs/benchmarks.md). The small members (`id`,
//! `parameters`, `outputs`, `shape`) are found here and read by serde from their own bytes.

use serde_json::{Map, Value};

use super::elements::encode_float;
use super::raw::{RawData, RawInput, RawOutput, RawRequest, elements_of};
use crate::tensor::DataType;

/// The deepest nesting read here (below it, serde's limit of 128 applies as before).
const MAX_DEPTH: usize = 32;

/// The significand's bound before another digit: below it, `10 * s + 9` cannot overflow where
/// serde_json's would not (it switches to its slower path only near `u64::MAX`).
const BEFORE_DIGIT: u64 = 1_000_000_000_000_000_000;
/// The same before eight digits at once.
const BEFORE_EIGHT: u64 = 100_000_000_000;

/// serde_json's powers of ten for the same digit counts (exact up to 10^22).
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

/// The request as serde would read it, or `None` where this path does not take it.
pub(super) fn request(json: &[u8]) -> Option<RawRequest<'_>> {
    let mut c = Cursor { text: json, at: 0 };
    let (mut id, mut parameters, mut inputs, mut outputs) = (None, None, None, None);
    c.ws();
    c.eat(b'{')?;
    c.members(|c, key| match key {
        b"id" => once(&mut id, serde_json::from_slice::<Option<String>>(c.value()?).ok()?),
        b"parameters" => once(&mut parameters, serde_json::from_slice::<Map<String, Value>>(c.value()?).ok()?),
        b"inputs" => once(&mut inputs, c.list(Cursor::input)?),
        b"outputs" => once(&mut outputs, serde_json::from_slice::<Option<Vec<RawOutput>>>(c.value()?).ok()?),
        _ => None,
    })?;
    c.ws();
    (c.at == json.len()).then_some(())?;
    Some(RawRequest {
        id: id.flatten(),
        parameters: parameters.unwrap_or_default(),
        inputs: inputs?,
        outputs: outputs.flatten(),
    })
}

/// Sets a member read once; `None` (serde's "duplicate field") the second time.
fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    slot.replace(value).is_none().then_some(())
}

struct Cursor<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.text.get(self.at) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.text.get(self.at) == Some(&byte)).then(|| self.at += 1)
    }

    fn next(&mut self) -> Option<u8> {
        let b = *self.text.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    /// An object's members after its `{`, each key handed to `member` with the cursor on its value.
    fn members(&mut self, mut member: impl FnMut(&mut Self, &[u8]) -> Option<()>) -> Option<()> {
        self.ws();
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            let key = self.plain_string()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            member(self, key)?;
            self.ws();
            match self.next()? {
                b',' => self.ws(),
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    /// An array whose elements `item` reads.
    fn list<T>(&mut self, mut item: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        self.eat(b'[')?;
        self.ws();
        let mut out = Vec::new();
        if self.eat(b']').is_some() {
            return Some(out);
        }
        loop {
            out.push(item(self)?);
            self.ws();
            match self.next()? {
                b',' => self.ws(),
                b']' => return Some(out),
                _ => return None,
            }
        }
    }

    /// A string with no escape and no control character: its bytes between the quotes.
    fn plain_string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.at;
        let len = self.text[start..].iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        self.at += len;
        self.eat(b'"')?;
        Some(&self.text[start..start + len])
    }

    /// One input tensor's object.
    fn input(&mut self) -> Option<RawInput<'a>> {
        self.eat(b'{')?;
        let (mut name, mut shape, mut datatype, mut parameters, mut data) = (None, None, None, None, None);
        self.members(|c, key| match key {
            b"name" => once(&mut name, c.utf8()?),
            b"shape" => once(&mut shape, serde_json::from_slice::<Vec<i64>>(c.value()?).ok()?),
            b"datatype" => once(&mut datatype, c.utf8()?),
            b"parameters" => once(&mut parameters, serde_json::from_slice::<Map<String, Value>>(c.value()?).ok()?),
            b"data" => {
                let datatype = DataType::parse(datatype.as_deref()?)?;
                let expected = elements_of(shape.as_deref()?)?;
                once(&mut data, RawData::Decoded(Ok(c.floats(datatype, expected)?)))
            }
            _ => None,
        })?;
        Some(RawInput {
            name: name?,
            shape: shape?,
            datatype: datatype?,
            parameters: parameters.unwrap_or_default(),
            data,
        })
    }

    fn utf8(&mut self) -> Option<String> {
        std::str::from_utf8(self.plain_string()?).ok().map(str::to_owned)
    }

    /// The bytes of one JSON value, for serde to read: found, not checked (serde checks them).
    fn value(&mut self) -> Option<&'a [u8]> {
        let start = self.at;
        let mut depth = 0usize;
        loop {
            match self.next()? {
                b'"' => {
                    while self.next()? != b'"' {
                        if self.text[self.at - 1] == b'\\' {
                            self.next()?;
                        }
                    }
                }
                b'{' | b'[' => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return None;
                    }
                }
                b'}' | b']' => depth = depth.checked_sub(1)?,
                _ => {
                    // A scalar (number or literal) ends before a delimiter.
                    while let Some(&b) = self.text.get(self.at) {
                        if matches!(b, b',' | b'}' | b']' | b' ' | b'\n' | b'\t' | b'\r' | b'"' | b'{' | b'[') {
                            break;
                        }
                        self.at += 1;
                    }
                }
            }
            if depth == 0 {
                return Some(&self.text[start..self.at]);
            }
        }
    }

    /// `data` for a FP32 or FP64 tensor of `expected` elements: nested arrays flattened in
    /// row-major order, as [`super::elements`] does.
    fn floats(&mut self, datatype: DataType, expected: usize) -> Option<Vec<u8>> {
        let size = match datatype {
            DataType::Fp32 => 4,
            DataType::Fp64 => 8,
            _ => return None,
        };
        // Each element takes at least two bytes of text: the shape alone is only the client's claim.
        let room = (self.text.len() - self.at) / 2 + 1;
        let mut sink = Floats { datatype, left: expected, out: Vec::with_capacity(expected.min(room) * size) };
        self.level(&mut sink, 0)?;
        (sink.left == 0).then_some(sink.out)
    }

    fn level(&mut self, sink: &mut Floats, depth: usize) -> Option<()> {
        if depth >= MAX_DEPTH {
            return None;
        }
        self.list(|c| {
            if c.text.get(c.at) == Some(&b'[') {
                return c.level(sink, depth + 1);
            }
            sink.push(c.number()?)
        })
        .map(drop)
    }

    /// A number with no exponent and at most 22 digits after the point, as serde_json forms it:
    /// the digits as a `u64`, divided by the power of ten, then the sign.
    fn number(&mut self) -> Option<f64> {
        let t = self.text;
        let mut i = self.at;
        let negative = t.get(i) == Some(&b'-');
        i += usize::from(negative);
        let mut significand = 0u64;
        match *t.get(i)? {
            // One leading zero only (serde says why a second is wrong).
            b'0' => {
                i += 1;
                if t.get(i).is_some_and(u8::is_ascii_digit) {
                    return None;
                }
            }
            b'1'..=b'9' => i = digits(t, i, &mut significand)?,
            _ => return None,
        }
        let mut after_point = 0;
        if t.get(i) == Some(&b'.') {
            let start = i + 1;
            i = start;
            while significand < BEFORE_EIGHT
                && let Some(eight) = t.get(i..i + 8).and_then(eight_digits)
            {
                significand = significand * 100_000_000 + eight;
                i += 8;
            }
            i = digits(t, i, &mut significand)?;
            after_point = i - start;
            if after_point == 0 {
                return None;
            }
        }
        if matches!(t.get(i), Some(b'e' | b'E')) {
            return None;
        }
        let f = significand as f64 / POW10.get(after_point)?;
        self.at = i;
        Some(if negative { -f } else { f })
    }
}

/// A float tensor's bytes as its elements are read.
struct Floats {
    datatype: DataType,
    /// Elements the shape still holds.
    left: usize,
    out: Vec<u8>,
}

impl Floats {
    /// `None` past the shape or out of FP32's range (serde says which).
    fn push(&mut self, f: f64) -> Option<()> {
        self.left = self.left.checked_sub(1)?;
        encode_float(self.datatype, f, &mut self.out).then_some(())
    }
}

/// Decimal digits from `i` into `significand`; returns where they end. `None` near overflow.
fn digits(t: &[u8], mut i: usize, significand: &mut u64) -> Option<usize> {
    while let Some(&d @ b'0'..=b'9') = t.get(i) {
        if *significand >= BEFORE_DIGIT {
            return None;
        }
        *significand = *significand * 10 + u64::from(d - b'0');
        i += 1;
    }
    Some(i)
}

/// Eight ASCII digits as their value, read as one word; `None` unless all eight are digits.
fn eight_digits(bytes: &[u8]) -> Option<u64> {
    let word = u64::from_le_bytes(bytes.try_into().ok()?);
    // Each byte 0x30..=0x39: its high nibble is 3, and adding 6 leaves it 3.
    let high = 0xF0F0_F0F0_F0F0_F0F0;
    if (word & high) | ((word.wrapping_add(0x0606_0606_0606_0606) & high) >> 4) != 0x3333_3333_3333_3333 {
        return None;
    }
    // Pairs, then fours, then the eight: each step multiplies the higher half in place.
    let v = word - 0x3030_3030_3030_3030;
    let v = v.wrapping_mul(10).wrapping_add(v >> 8);
    let pairs = 0x0000_00FF_0000_00FF;
    let v = (v & pairs)
        .wrapping_mul(100 + (1_000_000 << 32))
        .wrapping_add(((v >> 16) & pairs).wrapping_mul(1 + (10_000 << 32)))
        >> 32;
    Some(v)
}
