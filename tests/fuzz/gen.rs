//! Structured values from fuzz bytes: the input read as a stream of choices (like the
//! `arbitrary` crate's `Unstructured`), so that byte mutations become changes of structure.
//! Any byte string gives a value; once the bytes run out every choice is the first one, so
//! generation always ends.

use serde_json::{Map, Number, Value};

/// A cursor over the choice bytes.
pub struct Gen<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Gen<'a> {
    pub fn new(data: &'a [u8]) -> Gen<'a> {
        Gen { data, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    /// In `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n <= 256 {
            usize::from(self.byte()) % n
        } else {
            (usize::from(self.byte()) << 8 | usize::from(self.byte())) % n
        }
    }

    /// True with probability about `num`/256.
    pub fn chance(&mut self, num: u8) -> bool {
        self.byte() < num
    }

    pub fn pick<'b, T>(&mut self, items: &'b [T]) -> &'b T {
        &items[self.below(items.len())]
    }

    /// Up to `max` raw bytes.
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = self.below(max + 1);
        let start = self.pos.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.pos = start + n;
        &self.data[start..end]
    }

    /// A string: usually from `pool`, sometimes raw bytes (lossy UTF-8) or a pool entry with
    /// something appended.
    pub fn string(&mut self, pool: &[&str]) -> String {
        match self.below(8) {
            0..=4 => (*self.pick(pool)).to_owned(),
            5 => String::from_utf8_lossy(self.bytes(12)).into_owned(),
            6 => format!("{}{}", self.pick(pool), self.pick(STRANGE)),
            _ => (*self.pick(STRANGE)).to_owned(),
        }
    }

    /// A JSON number at the edges: small, huge, negative, fractional.
    pub fn number(&mut self) -> Value {
        match self.below(10) {
            0 => Value::from(self.below(4) as u64),
            1 => Value::from(-(self.below(4) as i64)),
            2 => Value::from(u64::MAX - self.below(2) as u64),
            3 => Value::from(i64::MIN + self.below(2) as i64),
            4 => Value::from(1_750_000_000u64 + self.below(20) as u64 - 10),
            5 => Number::from_f64(*self.pick(&[0.5, -0.5, 1e300, -1e300, 1.8e19, 1.0, -0.0]))
                .map_or(Value::Null, Value::Number),
            6 => Value::from(u64::from(self.byte()) << 24 | u64::from(self.byte())),
            _ => Value::from(self.byte()),
        }
    }

    /// Any JSON value, at most `depth` deep, keys and strings mostly from the pools.
    pub fn value(&mut self, depth: u32, keys: &[&str], strings: &[&str]) -> Value {
        let top = if depth == 0 { 5 } else { 8 };
        match self.below(top) {
            0 => Value::Null,
            1 => Value::Bool(self.byte() & 1 == 1),
            2 => self.number(),
            3 | 4 => Value::String(self.string(strings)),
            5 | 6 => {
                let n = self.below(5);
                let mut m = Map::new();
                for _ in 0..n {
                    let k = self.string(keys);
                    let v = self.value(depth - 1, keys, strings);
                    m.insert(k, v);
                }
                Value::Object(m)
            }
            _ => {
                let n = self.below(5);
                Value::Array(
                    (0..n)
                        .map(|_| self.value(depth - 1, keys, strings))
                        .collect(),
                )
            }
        }
    }
}

/// Strings that trip parsers: escapes, controls, lone surrogates' replacements, long text.
pub const STRANGE: &[&str] = &[
    "",
    " ",
    "\n",
    "\r\n",
    "\0",
    "\u{1}",
    "\"",
    "\\",
    "é",
    "\u{FFFD}",
    "😀",
    "\u{2028}",
    "[DONE]",
    "data: x",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
];
