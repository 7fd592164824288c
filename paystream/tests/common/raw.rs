//! A producer that is not librdkafka: one Produce request (v3, record batch v2) written by
//! hand on a TCP connection, so a test can send what a well-behaved client never would (a
//! header name that is not UTF-8, for one).

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One record as it goes on the wire: any bytes in key, value, header names and values.
pub struct RawRecord {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Produces `records` to `topic`/`partition` on the broker at `address` (the partition's
/// leader), acks=all; panics unless the broker accepted them.
pub async fn produce(address: &str, topic: &str, partition: i32, records: &[RawRecord]) {
    let batch = record_batch(records);
    let mut body = Vec::new();
    body.extend(0i16.to_be_bytes()); // api key: Produce
    body.extend(3i16.to_be_bytes()); // api version
    body.extend(1i32.to_be_bytes()); // correlation id
    string(&mut body, b"raw-test-producer");
    body.extend((-1i16).to_be_bytes()); // transactional id: null
    body.extend((-1i16).to_be_bytes()); // acks: all
    body.extend(30_000i32.to_be_bytes()); // timeout
    body.extend(1i32.to_be_bytes()); // one topic
    string(&mut body, topic.as_bytes());
    body.extend(1i32.to_be_bytes()); // one partition
    body.extend(partition.to_be_bytes());
    body.extend((batch.len() as i32).to_be_bytes());
    body.extend(batch);

    let mut stream = TcpStream::connect(address)
        .await
        .expect("connect to broker");
    stream
        .write_all(&(body.len() as i32).to_be_bytes())
        .await
        .expect("send");
    stream.write_all(&body).await.expect("send");
    let size = stream.read_i32().await.expect("response size");
    let mut response = vec![0; size as usize];
    stream.read_exact(&mut response).await.expect("response");
    // correlation id, topics (1), name, partitions (1), partition, error code, ...
    let name_len = i16::from_be_bytes([response[8], response[9]]) as usize;
    let at = 10 + name_len + 4 + 4;
    let error = i16::from_be_bytes([response[at], response[at + 1]]);
    assert_eq!(error, 0, "the broker refused the raw produce request");
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend((s.len() as i16).to_be_bytes());
    out.extend(s);
}

/// A record batch (magic 2) holding `records`, without compression or producer id.
fn record_batch(records: &[RawRecord]) -> Vec<u8> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    // Everything the CRC covers: from the attributes to the end.
    let mut tail = Vec::new();
    tail.extend(0i16.to_be_bytes()); // attributes
    tail.extend((records.len() as i32 - 1).to_be_bytes()); // last offset delta
    tail.extend(now.to_be_bytes()); // first timestamp
    tail.extend(now.to_be_bytes()); // max timestamp
    tail.extend((-1i64).to_be_bytes()); // producer id
    tail.extend((-1i16).to_be_bytes()); // producer epoch
    tail.extend((-1i32).to_be_bytes()); // base sequence
    tail.extend((records.len() as i32).to_be_bytes());
    for (delta, record) in records.iter().enumerate() {
        tail.extend(encode_record(delta as i64, record));
    }
    let mut batch = Vec::new();
    batch.extend(0i64.to_be_bytes()); // base offset
    let length = 4 + 1 + 4 + tail.len(); // leader epoch, magic, crc, tail
    batch.extend((length as i32).to_be_bytes());
    batch.extend((-1i32).to_be_bytes()); // partition leader epoch
    batch.push(2); // magic
    batch.extend(crc32c(&tail).to_be_bytes());
    batch.extend(tail);
    batch
}

fn encode_record(offset_delta: i64, record: &RawRecord) -> Vec<u8> {
    let mut body = vec![0]; // attributes
    varint(&mut body, 0); // timestamp delta
    varint(&mut body, offset_delta);
    bytes(&mut body, record.key.as_deref());
    bytes(&mut body, record.value.as_deref());
    varint(&mut body, record.headers.len() as i64);
    for (name, value) in &record.headers {
        bytes(&mut body, Some(name));
        bytes(&mut body, Some(value));
    }
    let mut out = Vec::new();
    varint(&mut out, body.len() as i64);
    out.extend(body);
    out
}

fn bytes(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => varint(out, -1),
        Some(b) => {
            varint(out, b.len() as i64);
            out.extend(b);
        }
    }
}

/// Zig-zag variable-length integer, as the record format writes them.
fn varint(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// CRC-32C (Castagnoli), bit by bit: the batch checksum.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
