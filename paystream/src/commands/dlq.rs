//! `paystream dlq list | show | replay`: the operator's view of the dead-letter topic.

use anyhow::Context as _;
use clap::Subcommand;
use paystream_processors::db::Pool;
use paystream_processors::dlq::tool as dlq_tool;
use paystream_processors::settings::Settings;

#[derive(Subcommand)]
pub enum DlqCommand {
    /// List dead letters, grouped by original topic and error class.
    List {
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// One JSON object per dead letter instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter: every header, the key and the original payload.
    Show {
        /// partition:offset on the dead-letter topic, as `list` prints it.
        id: String,
    },
    /// Re-publish selected dead letters to their original topic, with their original key,
    /// headers and eventId (dedupe keeps a second replay harmless). Parked ones are skipped.
    Replay {
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Replay every dead letter (required when no filter is given).
        #[arg(long)]
        all: bool,
        /// Say what would be replayed; publish and record nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also replay dead letters that were replayed before (see dlq_replays).
        #[arg(long)]
        force: bool,
        /// Messages per second (default: dlq.replay_rate_per_s).
        #[arg(long)]
        rate: Option<f64>,
        /// Who replays, for the record in dlq_replays (default: $USER).
        #[arg(long, env = "USER", default_value = "unknown")]
        operator: String,
    },
}

#[derive(clap::Args)]
pub struct DlqFilterArgs {
    /// A dead letter by partition:offset (repeatable).
    #[arg(long = "id")]
    ids: Vec<String>,
    /// Topic the message was consumed from.
    #[arg(long)]
    original_topic: Option<String>,
    /// Error class, e.g. NOT_JSON, SCHEMA_VIOLATION, INVALID_AMOUNT.
    #[arg(long)]
    error_class: Option<String>,
    /// eventType of the payload, e.g. OrderCreated.
    #[arg(long)]
    event_type: Option<String>,
    /// Consumer group that dead-lettered it.
    #[arg(long)]
    group: Option<String>,
    /// Dead-lettered at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Dead-lettered before this time (RFC 3339).
    #[arg(long)]
    until: Option<chrono::DateTime<chrono::Utc>>,
}

impl DlqFilterArgs {
    fn to_filter(&self) -> anyhow::Result<dlq_tool::Filter> {
        let ids = self
            .ids
            .iter()
            .map(|id| {
                dlq_tool::parse_id(id)
                    .with_context(|| format!("--id {id:?} is not partition:offset"))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(dlq_tool::Filter {
            ids,
            original_topic: self.original_topic.clone(),
            error_class: self.error_class.clone(),
            event_type: self.event_type.clone(),
            consumer_group: self.group.clone(),
            since: self.since,
            until: self.until,
        })
    }
}

pub async fn run(settings: &Settings, pool: &Pool, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { filter, json } => {
            let letters = read_dead_letters(settings, &filter.to_filter()?).await?;
            list(settings, &letters, json);
            Ok(())
        }
        DlqCommand::Show { id } => show(settings, &id).await,
        DlqCommand::Replay {
            filter,
            all,
            dry_run,
            force,
            rate,
            operator,
        } => {
            let filter = filter.to_filter()?;
            if filter.is_empty() && !all {
                anyhow::bail!(
                    "say which dead letters to replay (--id, --error-class, ...) or pass --all"
                );
            }
            let letters = read_dead_letters(settings, &filter).await?;
            let options = dlq_tool::ReplayOptions {
                dry_run,
                force,
                rate: rate.unwrap_or(settings.dlq.replay_rate_per_s),
                operator,
            };
            let report = dlq_tool::replay(settings, pool, &letters, &options, |done, total| {
                eprint!("\rreplaying {done}/{total}");
                if done == total {
                    eprintln!();
                }
            })
            .await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}

async fn read_dead_letters(
    settings: &Settings,
    filter: &dlq_tool::Filter,
) -> anyhow::Result<Vec<dlq_tool::DeadLetter>> {
    let reader_settings = settings.clone();
    let all = tokio::task::spawn_blocking(move || dlq_tool::read_all(&reader_settings))
        .await
        .context("The dead-letter reader stopped")?
        .context("Failed to read the dead-letter topic")?;
    Ok(all.into_iter().filter(|dl| filter.matches(dl)).collect())
}

fn list(settings: &Settings, letters: &[dlq_tool::DeadLetter], json: bool) {
    if json {
        for dl in letters {
            println!("{}", dl.summary());
        }
        return;
    }
    println!(
        "{} dead letter(s) on {}",
        letters.len(),
        settings.topics.dead_letter
    );
    let mut groups: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for dl in letters {
        let key = (
            dl.original_topic().unwrap_or_default(),
            dl.error_class().unwrap_or_default(),
        );
        *groups.entry(key).or_default() += 1;
    }
    for ((topic, class), n) in &groups {
        println!("  {topic:<24} {class:<28} {n}");
    }
    if !letters.is_empty() {
        println!(
            "\n{:<10} {:<26} {:<24} {:<28} {:<20} ATTEMPTS",
            "ID", "DEAD-LETTERED AT", "ORIGINAL TOPIC", "ERROR CLASS", "EVENT TYPE"
        );
    }
    for dl in letters {
        println!(
            "{:<10} {:<26} {:<24} {:<28} {:<20} {}{}",
            dl.id(),
            dl.timestamp
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_default(),
            dl.original_topic().unwrap_or_default(),
            dl.error_class().unwrap_or_default(),
            dl.event_type().unwrap_or_else(|| "-".into()),
            dl.attempts(),
            if dl.parked() { " (parked)" } else { "" },
        );
    }
}

async fn show(settings: &Settings, id: &str) -> anyhow::Result<()> {
    let (partition, offset) =
        dlq_tool::parse_id(id).with_context(|| format!("{id:?} is not partition:offset"))?;
    let filter = dlq_tool::Filter {
        ids: vec![(partition, offset)],
        ..Default::default()
    };
    let letters = read_dead_letters(settings, &filter).await?;
    let dl = letters
        .first()
        .with_context(|| format!("no dead letter {id} on {}", settings.topics.dead_letter))?;
    println!("{}", serde_json::to_string_pretty(&dl.detail())?);
    Ok(())
}
