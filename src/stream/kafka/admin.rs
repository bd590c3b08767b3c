//! Topic creation for commands that set up their own topics (demo, bench, replay).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use thiserror::Error;

use super::config::client_config;

/// How long the broker may take to create the topics.
const CREATE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why topics could not be created.
#[derive(Debug, Error)]
pub enum AdminError {
    /// The admin client could not be created or the request failed.
    #[error("creating topics: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    /// The broker refused one topic.
    #[error("creating topic {topic}: {code}")]
    Refused {
        /// The topic.
        topic: String,
        /// The broker's error.
        code: rdkafka::types::RDKafkaErrorCode,
    },
}

/// Creates the topics that do not exist yet, with `partitions` partitions each.
pub async fn ensure_topics(
    brokers: &str,
    extra: &[(String, String)],
    topics: &[&str],
    partitions: i32,
) -> Result<(), AdminError> {
    let admin: AdminClient<DefaultClientContext> = client_config(brokers, extra, &[]).create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(CREATE_TIMEOUT));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) => {}
            Err((topic, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic, "topic exists");
            }
            Err((topic, code)) => return Err(AdminError::Refused { topic, code }),
        }
    }
    Ok(())
}
