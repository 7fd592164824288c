//! Value types built once at the edge, so the rest of the code cannot hold an invalid one.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A positive amount of minor currency units (fen for CNY). Zero and negative amounts are
/// not money to move; signed deltas live in the ledger as plain `i64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Amount(i64);

impl Amount {
    pub fn new(fen: i64) -> Option<Self> {
        (fen > 0).then_some(Self(fen))
    }

    pub fn fen(self) -> i64 {
        self.0
    }

    /// Reads a JSON number as an amount: an integer in `1..=i64::MAX`, nothing else
    /// (no floats, no strings, no zero, no overflow).
    pub fn from_json(value: &serde_json::Value) -> Option<Self> {
        value.as_i64().and_then(Self::new)
    }
}

/// An ISO 4217 alphabetic code: three ASCII upper-case letters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

impl Currency {
    pub const CNY: Currency = Currency(*b"CNY");

    pub fn parse(code: &str) -> Option<Self> {
        let bytes: [u8; 3] = code.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(u8::is_ascii_uppercase)
            .then_some(Self(bytes))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII upper-case letters are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let code = <&str>::deserialize(d)?;
        Currency::parse(code)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid ISO 4217 code {code:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn amount_accepts_only_positive_integers_that_fit_i64() {
        assert_eq!(Amount::from_json(&json!(1)).map(Amount::fen), Some(1));
        assert_eq!(
            Amount::from_json(&json!(i64::MAX)).map(Amount::fen),
            Some(i64::MAX)
        );
        for bad in [
            json!(0),
            json!(-5),
            json!(1.5),
            json!("10"),
            json!(u64::MAX),
            json!(null),
        ] {
            assert_eq!(Amount::from_json(&bad), None, "{bad} must be rejected");
        }
    }

    #[test]
    fn currency_is_three_upper_case_letters() {
        assert_eq!(Currency::parse("CNY"), Some(Currency::CNY));
        for bad in ["cny", "CN", "CNYY", "C1Y", "", "人民币"] {
            assert_eq!(Currency::parse(bad), None, "{bad:?} must be rejected");
        }
    }
}
