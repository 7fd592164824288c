//! paystream's core: the event contract, the ledger, the exactly-once consumer framework and
//! its processors, and the outbox relay. The `paystream` binary wires these together.

pub mod accounts;
pub mod api;
pub mod audit;
pub mod backoff;
pub mod consumer;
pub mod db;
pub mod dlq;
pub mod domain;
pub mod events;
pub mod kafka;
pub mod ledger;
pub mod ops;
pub mod orders;
pub mod outbox;
pub mod settings;
pub mod startup;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod testing;
