//! Accounts and the money they hold: the rules that move money for an order (`rules`, pure)
//! and the account processor that applies them to `order.events` (`processor`). The ledger
//! itself (transfers, entries, balances) is `crate::ledger`.

pub mod processor;
pub mod rules;
pub mod store;
