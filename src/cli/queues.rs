//! `cinflow queues migrate`: recreates work queues declared by an earlier
//! release with other arguments (docs/storage-and-broker.md, "Upgrading the queues").

use super::Exit;

use crate::queue::{connect, migrate::migrate, AmqpConfig};

#[derive(Debug, clap::Args)]
pub struct QueuesArgs {
    #[command(subcommand)]
    pub action: QueuesAction,
    #[command(flatten)]
    pub amqp: AmqpConfig,
}

#[derive(Debug, clap::Subcommand)]
pub enum QueuesAction {
    /// Recreate work queues whose arguments are from an earlier release,
    /// keeping their messages (stop the workers first).
    Migrate,
}

pub(super) fn run(a: &QueuesArgs) -> anyhow::Result<Exit> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let conn = connect(&a.amqp, "cinflow-queues").await?;
        match a.action {
            QueuesAction::Migrate => {
                for m in migrate(&conn, &a.amqp).await? {
                    match m.messages {
                        None => println!("{}\tcurrent", m.queue),
                        Some(n) => println!("{}\trecreated\t{n} message(s) kept", m.queue),
                    }
                }
            }
        }
        let _ = conn.close(200, "done".into()).await;
        Ok(Exit::Success)
    })
}
