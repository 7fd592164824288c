//! A record as paystream reads it from the broker: owned bytes, and a fingerprint that says
//! which record sat at an offset.

use rdkafka::message::{BorrowedMessage, Message};

/// A message as read from Kafka, owned.
#[derive(Debug, Clone)]
pub struct InboundMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Headers that could not be read (a name that is not UTF-8); they are not in `headers`.
    pub unreadable_headers: usize,
    /// The message's timestamp in milliseconds, when it has one.
    pub timestamp: Option<i64>,
}

impl InboundMessage {
    /// Copies a fetched record out of the client's buffers.
    pub fn read(m: &BorrowedMessage<'_>) -> Self {
        let (headers, unreadable_headers) = super::read_headers(m);
        if unreadable_headers > 0 {
            tracing::warn!(
                topic = m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                unreadable_headers,
                "a header name is not UTF-8 (the panic above is rdkafka's, caught); the record will be dead-lettered"
            );
        }
        Self {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
            unreadable_headers,
            timestamp: m.timestamp().to_millis(),
        }
    }

    /// The bytes the message holds in memory: key, value and headers.
    pub fn size(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.key.as_ref().map_or(0, Vec::len) + self.payload.as_ref().map_or(0, Vec::len) + headers
    }

    /// See `fingerprint`: what the stored offset remembers of the last message applied.
    pub fn fingerprint(&self) -> i64 {
        fingerprint(self.key.as_deref(), self.payload.as_deref(), self.timestamp)
    }
}

/// A fingerprint of one message: FNV-1a (64 bits) over its key, value and timestamp, each
/// tagged and length-prefixed. It is stored in PostgreSQL and compared across versions of
/// paystream, so it is spelled out here rather than taken from `std::hash`, whose output may
/// change between Rust releases. It tells "the message this database applied" from "another
/// message at the same offset"; it is not a defence against someone forging messages.
pub fn fingerprint(key: Option<&[u8]>, payload: Option<&[u8]>, timestamp: Option<i64>) -> i64 {
    const BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    fn feed(hash: &mut u64, bytes: &[u8]) {
        for byte in bytes {
            *hash ^= u64::from(*byte);
            *hash = hash.wrapping_mul(PRIME);
        }
    }
    fn field(hash: &mut u64, bytes: Option<&[u8]>) {
        match bytes {
            None => feed(hash, &[0]),
            Some(b) => {
                feed(hash, &[1]);
                feed(hash, &(b.len() as u64).to_le_bytes());
                feed(hash, b);
            }
        }
    }
    let mut hash = BASIS;
    field(&mut hash, key);
    field(&mut hash, payload);
    field(
        &mut hash,
        timestamp.map(i64::to_le_bytes).as_ref().map(|b| &b[..]),
    );
    hash as i64
}

#[cfg(test)]
mod tests {
    use super::fingerprint;

    #[test]
    fn a_fingerprint_is_fixed_and_tells_key_value_and_time_apart() {
        // Stored values must stay readable by later versions: pin two (computed separately).
        assert_eq!(
            fingerprint(None, None, None),
            0xd94d_1218_6c0f_2fb7_u64 as i64
        );
        let base = fingerprint(Some(b"7"), Some(b"{}"), Some(1));
        assert_eq!(base, 0x6ce3_1cf1_85bf_7aaf_u64 as i64);
        assert_eq!(base, fingerprint(Some(b"7"), Some(b"{}"), Some(1)));
        assert_ne!(base, fingerprint(Some(b"8"), Some(b"{}"), Some(1)));
        assert_ne!(base, fingerprint(Some(b"7"), Some(b"{ }"), Some(1)));
        assert_ne!(base, fingerprint(Some(b"7"), Some(b"{}"), Some(2)));
        assert_ne!(base, fingerprint(Some(b"7"), Some(b"{}"), None));
        // The length prefix keeps bytes from moving between key and value unnoticed.
        assert_ne!(
            fingerprint(Some(b"7{"), Some(b"}"), Some(1)),
            fingerprint(Some(b"7"), Some(b"{}"), Some(1))
        );
        assert_ne!(
            fingerprint(None, Some(b""), None),
            fingerprint(Some(b""), None, None)
        );
    }
}
