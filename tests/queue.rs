//! The broker side against the real RabbitMQ on 127.0.0.1:5672: the topology is
//! idempotent, `enqueue` publishes one confirmed, persistent job per slide with
//! message_id = job_id, a rejected job is dead-lettered into the DLQ, and a
//! message that no queue takes is an error, not a silent drop.

mod common;

use lapin::options::{BasicGetOptions, BasicNackOptions};

use cinflow::queue::enqueue::{group_into_jobs, publish_jobs, Grouping};
use cinflow::queue::messages::JobMessage;
use cinflow::queue::{
    confirm_channel, connect, declare_topology, delete_topology, publish_json, AmqpConfig,
    QueueError,
};

fn config() -> AmqpConfig {
    common::amqp_config(&common::unique_prefix("q"))
}

async fn get(ch: &lapin::Channel, queue: &str) -> Option<lapin::message::BasicGetMessage> {
    for _ in 0..50 {
        if let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            return Some(m);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test]
async fn enqueue_publishes_jobs_that_dead_letter_when_rejected() {
    let cfg = config();
    let conn = connect(&cfg, "cinflow-test").await.unwrap();
    let ch = confirm_channel(&conn).await.unwrap();
    declare_topology(&ch, &cfg).await.unwrap();
    declare_topology(&ch, &cfg).await.unwrap(); // idempotent

    let uris: Vec<String> = [
        "s3://b/scan/S1/a.jpg",
        "s3://b/scan/S2/a.jpg",
        "s3://b/scan/S1/b.jpg",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let jobs = group_into_jobs(&uris, Grouping::Folder, None);
    let ids = publish_jobs(&cfg, &jobs).await.unwrap();
    assert_eq!(ids.len(), 2);

    let first = get(&ch, &cfg.infer_queue)
        .await
        .expect("a job in the queue");
    let job = JobMessage::parse(&first.delivery.data).unwrap();
    assert_eq!(job.job_id, ids[0]);
    assert_eq!(job.slide_id, "S1");
    assert_eq!(job.images.len(), 2);
    let props = &first.delivery.properties;
    assert_eq!(
        props.message_id().as_ref().map(|m| m.to_string()),
        Some(ids[0].clone())
    );
    assert_eq!(*props.delivery_mode(), Some(2), "persistent");

    // Rejected without requeue: the broker dead-letters it into the DLQ.
    first
        .delivery
        .nack(BasicNackOptions {
            requeue: false,
            ..Default::default()
        })
        .await
        .unwrap();
    let dead = get(&ch, &cfg.infer_dlq())
        .await
        .expect("the job in the DLQ");
    assert_eq!(
        JobMessage::parse(&dead.delivery.data).unwrap().job_id,
        ids[0]
    );

    let second = get(&ch, &cfg.infer_queue).await.expect("the second job");
    assert_eq!(
        JobMessage::parse(&second.delivery.data).unwrap().job_id,
        ids[1]
    );

    // A routing key no queue is bound to: returned, reported, not lost silently.
    let e = publish_json(&ch, &cfg, &cfg.jobs_exchange, "nowhere", "m1", b"{}", None)
        .await
        .unwrap_err();
    assert!(matches!(e, QueueError::Unroutable { .. }), "{e}");

    delete_topology(&ch, &cfg).await.unwrap();
}

#[tokio::test]
async fn an_unreachable_broker_is_a_clear_error() {
    let cfg = AmqpConfig {
        url: "amqp://guest:secret@127.0.0.1:9/%2f".into(),
        ..config()
    };
    let e = connect(&cfg, "cinflow-test").await.unwrap_err().to_string();
    assert!(e.contains("127.0.0.1:9") && !e.contains("secret"), "{e}");
}

#[tokio::test]
async fn enqueue_command_turns_an_s3_prefix_into_one_job_per_slide() {
    use cinflow::storage::ObjectStore;

    let s3 = common::s3_config();
    let p = common::unique_prefix("scans");
    let (s3b, pb) = (s3.clone(), p.clone());
    // The S3 store blocks on its own runtime: use it from a blocking thread.
    tokio::task::spawn_blocking(move || {
        let store = cinflow::storage::S3Store::new(&s3b).unwrap();
        for k in ["S-7/1.jpg", "S-7/2.jpg", "S-8/1.tif", "S-8/notes.txt"] {
            store
                .put(&format!("{pb}/{k}"), b"x", "application/octet-stream")
                .unwrap();
        }
    })
    .await
    .unwrap();

    let cfg = config();
    let stdout = common::output_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_cinflow"))
            .args(["enqueue", "--prefix"])
            .arg(format!("s3://{}/{p}/", s3.bucket))
            .args(["--jobs-exchange", &cfg.jobs_exchange])
            .args(["--infer-queue", &cfg.infer_queue])
            .args(["--train-queue", &cfg.train_queue])
            .args(["--results-exchange", &cfg.results_exchange]),
    );
    let lines: Vec<Vec<&str>> = stdout.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!((lines[0][1], lines[0][2]), ("S-7", "2 image(s)"));
    assert_eq!((lines[1][1], lines[1][2]), ("S-8", "1 image(s)"));

    let conn = connect(&cfg, "cinflow-test").await.unwrap();
    let ch = confirm_channel(&conn).await.unwrap();
    for line in &lines {
        let m = get(&ch, &cfg.infer_queue).await.expect("a job");
        let job = JobMessage::parse(&m.delivery.data).unwrap();
        assert_eq!(job.job_id, line[0]);
        assert!(job
            .images
            .iter()
            .all(|u| u.starts_with("s3://") && !u.ends_with(".txt")));
    }
    delete_topology(&ch, &cfg).await.unwrap();
}

/// `rabbitmqctl list_queues name arguments`, as text lines.
fn queue_arguments() -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name", "arguments"])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn queues_dead_letter_at_least_once_and_old_queues_are_named() {
    let cfg = config();
    let conn = connect(&cfg, "cinflow-test").await.unwrap();
    let ch = confirm_channel(&conn).await.unwrap();
    declare_topology(&ch, &cfg).await.unwrap();
    let listed = queue_arguments();
    let delay = AmqpConfig::delay_queue(&cfg.infer_queue);
    for q in [&cfg.infer_queue, &cfg.train_queue, &delay] {
        let line = listed
            .lines()
            .find(|l| l.split_whitespace().next() == Some(q.as_str()))
            .unwrap_or_else(|| panic!("{q} not in\n{listed}"));
        assert!(
            line.contains("at-least-once") && line.contains("reject-publish"),
            "{line}"
        );
    }
    delete_topology(&ch, &cfg).await.unwrap();

    // A queue as an earlier release declared it: the declaration is refused
    // and the error says which queue and where the migration is described.
    let old = config();
    let mut args = lapin::types::FieldTable::default();
    let text = |s: &str| lapin::types::AMQPValue::LongString(s.into());
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert(
        "x-delivery-limit".into(),
        lapin::types::AMQPValue::LongInt(5),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        text(&old.dead_letter_exchange()),
    );
    args.insert("x-dead-letter-routing-key".into(), text(&old.infer_dlq()));
    ch.queue_declare(
        old.infer_queue.as_str().into(),
        lapin::options::QueueDeclareOptions::durable(),
        args,
    )
    .await
    .unwrap();
    let conn2 = connect(&old, "cinflow-test").await.unwrap();
    let ch2 = conn2.create_channel().await.unwrap();
    let e = declare_topology(&ch2, &old).await.unwrap_err();
    assert!(matches!(e, QueueError::Inequivalent { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains(&old.infer_queue) && text.contains("Upgrading the queues"),
        "{text}"
    );
    assert!(!cinflow::retry::Transient::is_transient(&e));

    // `cinflow queues migrate` recreates it and keeps its messages.
    for id in ["waiting-1", "waiting-2"] {
        publish_json(&ch, &old, "", &old.infer_queue, id, b"{}", None)
            .await
            .unwrap();
    }
    let migrated = cinflow::queue::migrate::migrate(&conn2, &old)
        .await
        .unwrap();
    assert_eq!(migrated[0].queue, old.infer_queue);
    assert_eq!(migrated[0].messages, Some(2));
    assert_eq!(migrated[1].messages, None, "{migrated:?}");
    let line = queue_arguments()
        .lines()
        .find(|l| l.split_whitespace().next() == Some(old.infer_queue.as_str()))
        .unwrap()
        .to_string();
    assert!(line.contains("at-least-once"), "{line}");
    let ch3 = confirm_channel(&conn2).await.unwrap();
    let mut ids = Vec::new();
    while let Some(m) = get(&ch3, &old.infer_queue).await {
        ids.push(
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .to_string(),
        );
        if ids.len() == 2 {
            break;
        }
    }
    assert_eq!(ids, ["waiting-1", "waiting-2"]);
    // Again: nothing to do.
    let again = cinflow::queue::migrate::migrate(&conn2, &old)
        .await
        .unwrap();
    assert!(again.iter().all(|m| m.messages.is_none()), "{again:?}");
    delete_topology(&ch3, &old).await.unwrap();
}

#[tokio::test]
async fn listing_dead_letters_counts_no_delivery_however_often() {
    use cinflow::queue::deadletters::{list, WorkQueue, REASON_HEADER};
    let cfg = config();
    let conn = connect(&cfg, "cinflow-test").await.unwrap();
    let ch = confirm_channel(&conn).await.unwrap();
    declare_topology(&ch, &cfg).await.unwrap();
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        REASON_HEADER.into(),
        lapin::types::AMQPValue::LongString("test: why".into()),
    );
    for id in ["dead-1", "dead-2"] {
        publish_json(
            &ch,
            &cfg,
            "",
            &cfg.infer_dlq(),
            id,
            b"{}",
            Some(headers.clone()),
        )
        .await
        .unwrap();
    }
    let route = WorkQueue::Infer.route(&cfg, "unused");
    // More than the 20 counted returns after which RabbitMQ 4.0-4.2 drop a
    // quorum queue's message.
    for _ in 0..25 {
        let listed = list(&ch, &cfg, &route, 100).await.unwrap();
        let ids: Vec<&str> = listed.iter().map(|d| d.message_id.as_str()).collect();
        assert_eq!(ids, ["dead-1", "dead-2"]);
        assert!(listed.iter().all(|d| d.reason == "test: why"));
    }
    for id in ["dead-1", "dead-2"] {
        let m = get(&ch, &cfg.infer_dlq())
            .await
            .expect("still dead-lettered");
        let h = m.delivery.properties.headers().clone().unwrap_or_default();
        assert_eq!(
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .as_str(),
            id
        );
        // Never returned through the broker: no delivery counted (the
        // header is absent, or 0 on brokers that always set it).
        let counted = match h.inner().get("x-delivery-count") {
            None => 0,
            Some(lapin::types::AMQPValue::LongLongInt(n)) => *n,
            Some(lapin::types::AMQPValue::LongInt(n)) => i64::from(*n),
            Some(other) => panic!("{other:?}"),
        };
        assert_eq!(counted, 0, "{:?}", h.inner());
        assert!(h.inner().contains_key(REASON_HEADER));
        m.delivery.ack(Default::default()).await.unwrap();
    }
    delete_topology(&ch, &cfg).await.unwrap();
}

#[tokio::test]
async fn migrating_while_a_publisher_sends_loses_no_message() {
    let old = config();
    let conn = connect(&old, "cinflow-test").await.unwrap();
    let ch = confirm_channel(&conn).await.unwrap();
    // The work queue as an earlier release declared and bound it.
    ch.exchange_declare(
        old.jobs_exchange.as_str().into(),
        lapin::ExchangeKind::Direct,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        old.infer_queue.as_str().into(),
        lapin::options::QueueDeclareOptions::durable(),
        args,
    )
    .await
    .unwrap();
    ch.queue_bind(
        old.infer_queue.as_str().into(),
        old.jobs_exchange.as_str().into(),
        cinflow::queue::INFER_KEY.into(),
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
    let publish = |ch: lapin::Channel, old: AmqpConfig, id: String| async move {
        publish_json(
            &ch,
            &old,
            &old.jobs_exchange,
            cinflow::queue::INFER_KEY,
            &id,
            b"{}",
            None,
        )
        .await
        .map(|()| id)
    };
    let mut sent = std::collections::BTreeSet::new();
    for i in 0..200 {
        sent.insert(
            publish(ch.clone(), old.clone(), format!("before-{i:03}"))
                .await
                .unwrap(),
        );
    }
    // A publisher that goes on sending through the exchange while the queue
    // is moved, as `cinflow enqueue` and `cinflow watch` would.
    let publisher = {
        let old = old.clone();
        tokio::spawn(async move {
            let conn = connect(&old, "cinflow-test-publisher").await.unwrap();
            let ch = confirm_channel(&conn).await.unwrap();
            let mut sent = Vec::new();
            let t = std::time::Instant::now();
            let mut i = 0;
            while t.elapsed() < std::time::Duration::from_secs(4) {
                let id = format!("during-{i:05}");
                // Mandatory: a moment with no queue bound would be an error.
                sent.push(publish(ch.clone(), old.clone(), id).await.unwrap());
                i += 1;
            }
            sent
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let migrated = cinflow::queue::migrate::migrate(&conn, &old).await.unwrap();
    assert!(migrated[0].messages.is_some(), "{migrated:?}");
    sent.extend(publisher.await.unwrap());
    let ch2 = confirm_channel(&conn).await.unwrap();
    let mut found = std::collections::BTreeSet::new();
    while let Some(m) = ch2
        .basic_get(
            old.infer_queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        found.insert(
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .to_string(),
        );
    }
    let lost: Vec<&String> = sent.difference(&found).collect();
    assert!(
        lost.is_empty(),
        "{} of {} messages lost: {:?}",
        lost.len(),
        sent.len(),
        &lost[..lost.len().min(10)]
    );
    delete_topology(&ch2, &old).await.unwrap();
}
