//! The subcommands that print for an operator; `main` only parses and dispatches.

pub mod audit;
pub mod dlq;
pub mod outbox;
pub mod up;
