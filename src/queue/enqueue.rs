//! Turning image URIs into jobs and publishing them (`cinflow enqueue`,
//! `cinflow enqueue-train`).

use super::messages::{new_job_id, JobMessage, TrainMessage, JOB_SCHEMA};
use super::{confirm_channel, connect, declare_topology, publish_json, AmqpConfig, QueueError};

/// How images become slides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Grouping {
    /// Images in the same folder (key prefix) are one slide, named after the folder.
    Folder,
    /// Every image is its own slide, named after the file.
    Image,
}

/// Letters, digits, '.', '_', '-' and ':' kept; anything else becomes '_'.
fn slide_name(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-:".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(200)
        .collect();
    if cleaned.is_empty() {
        "slide".into()
    } else {
        cleaned
    }
}

/// Groups `s3://` image URIs into one job per slide (order of first appearance).
pub fn group_into_jobs(
    uris: &[String],
    grouping: Grouping,
    model: Option<&str>,
) -> Vec<JobMessage> {
    // (group key, slide id, images)
    let mut slides: Vec<(&str, String, Vec<String>)> = Vec::new();
    for uri in uris {
        let key = uri.strip_prefix("s3://").unwrap_or(uri);
        let (folder, file) = key.rsplit_once('/').unwrap_or(("", key));
        let (group, name) = match grouping {
            Grouping::Folder => (folder, folder.rsplit('/').next().unwrap_or(folder)),
            Grouping::Image => (key, file.rsplit_once('.').map_or(file, |(stem, _)| stem)),
        };
        match slides.iter_mut().find(|s| s.0 == group) {
            Some(s) => s.2.push(uri.clone()),
            None => slides.push((group, slide_name(name), vec![uri.clone()])),
        }
    }
    slides
        .into_iter()
        .map(|(_, slide_id, images)| JobMessage {
            schema: JOB_SCHEMA.into(),
            job_id: new_job_id(),
            slide_id,
            images,
            model: model.map(str::to_string),
            accession_id: None,
            patient_id: None,
            specimen_id: None,
        })
        .collect()
}

/// Declares the topology and publishes each job with confirms; returns the job ids.
pub async fn publish_jobs(
    cfg: &AmqpConfig,
    jobs: &[JobMessage],
) -> Result<Vec<String>, QueueError> {
    let conn = connect(cfg, "cinflow-enqueue").await?;
    let ch = confirm_channel(&conn).await?;
    declare_topology(&ch, cfg).await?;
    let mut ids = Vec::with_capacity(jobs.len());
    for job in jobs {
        let payload = serde_json::to_vec(job).expect("job serialises");
        publish_json(
            &ch,
            cfg,
            &cfg.jobs_exchange,
            super::INFER_KEY,
            &job.job_id,
            &payload,
            None,
        )
        .await?;
        ids.push(job.job_id.clone());
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(ids)
}

/// Declares the topology and publishes a training job with confirms.
pub async fn publish_train(cfg: &AmqpConfig, job: &TrainMessage) -> Result<(), QueueError> {
    let conn = connect(cfg, "cinflow-enqueue-train").await?;
    let ch = confirm_channel(&conn).await?;
    declare_topology(&ch, cfg).await?;
    let payload = serde_json::to_vec(job).expect("train job serialises");
    publish_json(
        &ch,
        cfg,
        &cfg.jobs_exchange,
        super::TRAIN_KEY,
        &job.job_id,
        &payload,
        None,
    )
    .await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_group_by_folder_or_one_per_slide() {
        let uris: Vec<String> = [
            "s3://b/scans/S-001/a.jpg",
            "s3://b/scans/S-002/c.jpg",
            "s3://b/scans/S-001/b.jpg",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let jobs = group_into_jobs(&uris, Grouping::Folder, None);
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].slide_id, "S-001");
        assert_eq!(jobs[0].images, vec![uris[0].clone(), uris[2].clone()]);
        assert!(jobs.iter().all(|j| j.validate().is_ok()));
        let jobs = group_into_jobs(&uris, Grouping::Image, Some("current"));
        assert_eq!(jobs.len(), 3);
        assert_eq!(jobs[1].slide_id, "c");
        assert_ne!(jobs[0].job_id, jobs[1].job_id);
    }
}
