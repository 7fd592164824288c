//! Test support: a deterministic generator of hostile JSON for the property tests of the
//! decoders (`events::conformance`, `api::orders`). A failing case names its seed;
//! `PAYSTREAM_FUZZ_CASES` and `PAYSTREAM_FUZZ_SEED` run longer campaigns (`scripts/fuzz.sh`).

use serde_json::{json, Value};

/// A small deterministic generator (SplitMix64): a failing case is reproduced by its seed.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Values that sit on or just past the schemas' edges, and the wrong types.
pub(crate) fn hostile(rng: &mut Rng) -> Value {
    let long = |n: usize, c: char| Value::String(std::iter::repeat_n(c, n).collect());
    let values = [
        Value::Null,
        json!(true),
        json!(false),
        json!(0),
        json!(1),
        json!(-1),
        json!(2),
        json!(i64::MAX),
        json!(i64::MIN),
        json!(-i64::MAX),
        json!(i64::MAX as u64 + 1),
        json!(u64::MAX),
        json!(1.0),
        json!(1.5),
        json!(-300.0),
        json!(1e20),
        json!(""),
        json!("x"),
        json!("CNY"),
        json!("cny"),
        json!("CN"),
        json!("CNYY"),
        json!("ÄBC"),
        json!("CNY\n"),
        long(64, 'x'),
        long(65, 'x'),
        long(64, 'é'),
        long(255, 'y'),
        long(256, 'y'),
        json!("2026-01-01T00:00:00Z"),
        json!("2026-01-01T08:00:00+08:00"),
        json!("2026-13-01T00:00:00Z"),
        json!("2026-01-01"),
        json!("yesterday"),
        json!("0b6c1f2e-4d3a-4f5b-9c8d-7e6f5a4b3c2d"),
        json!("0b6c1f2e4d3a4f5b9c8d7e6f5a4b3c2d"),
        json!("{0b6c1f2e-4d3a-4f5b-9c8d-7e6f5a4b3c2d}"),
        json!("OrderCreated"),
        json!("AccountDebited"),
        json!("AccountCredited"),
        json!("INSUFFICIENT_BALANCE"),
        json!("ORDER_NOT_FOUND"),
        json!("NOT_A_REASON"),
        json!([]),
        json!([1]),
        json!([{"sku": "B", "qty": 2, "priceFen": 5}]),
        json!({}),
        json!({"sku": "A", "qty": 1, "priceFen": 1}),
        json!({"nested": {"deeper": [null]}}),
    ];
    values[rng.below(values.len())].clone()
}

/// Every path into `value` (object keys and array indices), the root included.
fn paths(value: &Value, prefix: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(prefix.clone());
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                prefix.push(Step::Key(key.clone()));
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                prefix.push(Step::Index(i));
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn at<'a>(value: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    path.iter().try_fold(value, |v, step| match step {
        Step::Key(k) => v.get_mut(k),
        Step::Index(i) => v.get_mut(*i),
    })
}

/// One random change somewhere in `value`.
pub(crate) fn mutate(value: &mut Value, rng: &mut Rng) {
    let mut all = Vec::new();
    paths(value, &mut Vec::new(), &mut all);
    let path = all[rng.below(all.len())].clone();
    match rng.below(4) {
        // Remove it from its parent.
        0 if !path.is_empty() => {
            let (last, parent) = path.split_last().unwrap_or_else(|| unreachable!());
            match (at(value, parent), last) {
                (Some(Value::Object(map)), Step::Key(k)) => {
                    map.remove(k);
                }
                (Some(Value::Array(items)), Step::Index(i)) if *i < items.len() => {
                    items.remove(*i);
                }
                _ => {}
            }
        }
        // Add a field or an element next to it.
        1 => match at(value, &path) {
            Some(Value::Object(map)) => {
                let keys = ["extra", "amountFen", "eventId", "payload", "userId", "qty"];
                map.insert(keys[rng.below(keys.len())].to_owned(), hostile(rng));
            }
            Some(Value::Array(items)) => {
                let copy = items.first().cloned().unwrap_or(Value::Null);
                items.push(if rng.below(2) == 0 {
                    copy
                } else {
                    hostile(rng)
                });
            }
            _ => {}
        },
        // Replace it.
        _ => {
            if let Some(slot) = at(value, &path) {
                *slot = hostile(rng);
            }
        }
    }
}

/// A number the decoder refuses on purpose though JSON Schema calls it an integer: written
/// with a fraction or exponent, or outside i64.
pub(crate) fn has_lenient_integer(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.as_i64().is_none(),
        Value::Array(items) => items.iter().any(has_lenient_integer),
        Value::Object(map) => map.values().any(has_lenient_integer),
        _ => false,
    }
}

pub(crate) fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
