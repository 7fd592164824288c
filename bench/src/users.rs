//! Which user places each order: every user equally often, or a Zipf distribution over the
//! users' ranks as softwaremill/tb-perf draws accounts (rank `k` of `n` with probability
//! proportional to `1 / k^s`). Under Zipf 1.0 the busiest of 100,000 users places about 8 %
//! of the orders; under Zipf 2.0 about 61 %.

use std::str::FromStr;

use anyhow::Context as _;
use paystream_processors::accounts::store;
use paystream_processors::domain::{Amount, Currency};
use paystream_processors::ledger::{AccountKind, NewTransfer, Postings, TransferKind};
use sqlx::PgPool;

/// The distribution of users over orders (`--skew`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Skew {
    /// Order `i` is user `i mod n`'s: each user equally often.
    Uniform,
    /// Zipf with this exponent, drawn with a fixed seed (the same orders every run).
    Zipf(f64),
}

impl FromStr for Skew {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        if s == "uniform" {
            return Ok(Self::Uniform);
        }
        let exponent = s
            .strip_prefix("zipf:")
            .context("expected uniform or zipf:<exponent>, e.g. zipf:1.0")?;
        let exponent: f64 = exponent
            .parse()
            .with_context(|| format!("{exponent:?} is not a number"))?;
        anyhow::ensure!(
            exponent.is_finite() && exponent > 0.0,
            "the Zipf exponent must be positive"
        );
        Ok(Self::Zipf(exponent))
    }
}

impl std::fmt::Display for Skew {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Uniform => f.write_str("uniform"),
            Self::Zipf(s) => write!(f, "zipf:{s:.1}"),
        }
    }
}

/// The bench's users (ids `first .. first + count`) and who places order `i`.
#[derive(Debug, Clone)]
pub struct Users {
    pub first: i64,
    pub count: i64,
    /// Under Zipf: the cumulative weights of ranks 1..=count, for drawing by bisection.
    cumulative: Option<Vec<f64>>,
    seed: u64,
}

impl Users {
    pub fn new(first: i64, count: i64, skew: Skew) -> Self {
        let cumulative = match skew {
            Skew::Uniform => None,
            Skew::Zipf(s) => {
                let mut total = 0.0;
                Some(
                    (1..=count)
                        .map(|k| {
                            total += (k as f64).powf(-s);
                            total
                        })
                        .collect(),
                )
            }
        };
        Self {
            first,
            count,
            cumulative,
            seed: 0x005E_ED0F_0DE5,
        }
    }

    /// The user of order `i`. The busiest rank is the first user.
    pub fn of(&self, i: u64) -> i64 {
        let Some(cumulative) = &self.cumulative else {
            return self.first + (i as i64 % self.count);
        };
        let total = cumulative.last().copied().unwrap_or(1.0);
        let u = unit(splitmix(self.seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15))) * total;
        let rank = cumulative
            .partition_point(|&c| c <= u)
            .min(cumulative.len() - 1);
        self.first + rank as i64
    }
}

impl Users {
    /// Opens the users' accounts and funds each with `fen` from the funding account, through
    /// the ledger (transfers, entries, hash chains), in a few set-based statements, and
    /// vacuums and analyzes what it loaded (see `load::vacuum_analyze`).
    pub async fn fund(&self, pool: &PgPool, fen: i64) -> anyhow::Result<()> {
        let ids: Vec<i64> = (self.first..self.first + self.count).collect();
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO accounts (kind, user_id, currency) SELECT 'USER', u, 'CNY' FROM unnest($1::bigint[]) AS u",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        let cny = [Currency::CNY.as_str().to_owned()];
        let locks = store::Locks {
            users: &ids,
            ids: &[],
            system: AccountKind::Funding,
            currencies: &cny,
            shard: 0,
        };
        let (accounts, funding): (Vec<_>, Vec<_>) = store::lock_accounts(&mut tx, &locks)
            .await?
            .into_iter()
            .partition(|a| a.kind == AccountKind::User);
        let funding_id = funding
            .first()
            .map(|a| a.id)
            .context("no funding account")?;
        let to: Vec<i64> = accounts.iter().map(|a| a.id).collect();
        let mut postings = Postings::new(accounts.into_iter().chain(funding));
        let amount = Amount::new(fen).context("amount")?;
        for to in to {
            postings
                .post(NewTransfer {
                    kind: TransferKind::Deposit,
                    order_id: None,
                    from: funding_id,
                    to,
                    amount,
                    currency: Currency::CNY,
                    cause_event_id: None,
                    reference: Some("bench".into()),
                })
                .map_err(|e| anyhow::anyhow!("bench deposit refused: {e:?}"))?;
        }
        postings.write(&mut tx).await?;
        tx.commit().await?;
        crate::load::vacuum_analyze(pool, "accounts, transfers, ledger_entries").await
    }
}

/// SplitMix64's output function: a well-mixed 64-bit value from any input.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A value in [0, 1) from 53 random bits.
fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busiest_share(users: &Users, orders: u64) -> f64 {
        let busiest = (0..orders).filter(|&i| users.of(i) == users.first).count();
        busiest as f64 / orders as f64
    }

    #[test]
    fn skews_parse_and_print_as_given() {
        for (text, skew) in [
            ("uniform", Skew::Uniform),
            ("zipf:1.0", Skew::Zipf(1.0)),
            ("zipf:2.0", Skew::Zipf(2.0)),
        ] {
            assert_eq!(text.parse::<Skew>().expect(text), skew);
            assert_eq!(skew.to_string(), text);
        }
        for bad in [
            "", "zipf", "zipf:", "zipf:x", "zipf:-1", "zipf:0", "zipf:NaN", "normal",
        ] {
            assert!(bad.parse::<Skew>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn zipf_gives_the_busiest_user_the_share_its_exponent_says_and_uniform_gives_none_more() {
        let n = 100_000;
        let uniform = Users::new(1, n, Skew::Uniform);
        assert_eq!(uniform.of(0), 1);
        assert_eq!(uniform.of(n as u64), 1);
        assert_eq!(uniform.of(n as u64 - 1), n);
        // 1 / H(100000) = 0.0830 and 1 / zeta(2) truncated at 100000 = 0.6079.
        let zipf1 = busiest_share(&Users::new(1, n, Skew::Zipf(1.0)), 200_000);
        assert!((zipf1 - 0.083).abs() < 0.005, "{zipf1}");
        let zipf2 = busiest_share(&Users::new(1, n, Skew::Zipf(2.0)), 200_000);
        assert!((zipf2 - 0.608).abs() < 0.01, "{zipf2}");
        let users = Users::new(7, n, Skew::Zipf(1.0));
        assert!((0..10_000).all(|i| (7..7 + n).contains(&users.of(i))));
        assert_eq!(users.of(42), users.of(42), "the same orders every run");
    }
}
