//! `cinflow dead-letters list|requeue`: what is in a dead-letter queue and why,
//! and sending messages back once their cause is fixed.

use super::exit::{Exit, Input, Usage};
use crate::queue::deadletters::{list, requeue, WorkQueue};
use crate::queue::{confirm_channel, connect, declare_topology, AmqpConfig};

#[derive(Debug, clap::Args)]
pub struct DeadLettersArgs {
    /// Which work queue's dead letters.
    #[arg(long, value_enum, default_value = "infer")]
    pub queue: WorkQueue,
    /// The LIS bridge's queue (with --queue lis).
    #[arg(long, env = "CINFLOW_LIS_QUEUE", default_value = "cinflow.lis")]
    pub lis_queue: String,
    /// Look at (or send back) at most this many messages.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    #[command(subcommand)]
    pub action: Action,
    #[command(flatten)]
    pub amqp: AmqpConfig,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Print `message_id<TAB>dead_lettered_at<TAB>reason` per message (they stay queued).
    List,
    /// Send messages back to their work queue: the given ids, or all with --all.
    Requeue {
        /// Message ids (job ids) to send back.
        ids: Vec<String>,
        /// Send back every message (up to --limit).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

pub(super) fn run(a: &DeadLettersArgs) -> anyhow::Result<Exit> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let conn = connect(&a.amqp, "cinflow-dead-letters").await?;
        let ch = confirm_channel(&conn).await?;
        declare_topology(&ch, &a.amqp).await?;
        let route = a.queue.route(&a.amqp, &a.lis_queue);
        match &a.action {
            Action::List => {
                for d in list(&ch, &a.amqp, &route, a.limit).await? {
                    println!("{}\t{}\t{}", d.message_id, d.dead_lettered_at, d.reason);
                }
            }
            Action::Requeue { ids, all } => {
                if !*all && ids.is_empty() {
                    return Err(Usage("name message ids, or --all".into()).into());
                }
                let sent = requeue(&ch, &a.amqp, &route, ids, a.limit).await?;
                for id in &sent {
                    println!("{id}");
                }
                eprintln!("sent {} message(s) back to {}", sent.len(), route.queue);
                if let Some(missing) = ids.iter().find(|i| !sent.contains(i)) {
                    return Err(Input(format!("{missing} is not in {}", route.dlq)).into());
                }
            }
        }
        let _ = conn.close(200, "done".into()).await;
        Ok(Exit::Success)
    })
}
