//! Which backend runs an agent: the adapters built from `[upstream]` and its
//! `[[upstream.routes]]`, and the [`Routes`] adapter that hands each run to the first route whose
//! agent patterns match (else to the default backend), and a taken-over run to the same adapter
//! to continue it. Nothing downstream knows which adapter ran: they all write the same log
//! vocabulary.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use super::agentflow::{AgentFlowAdapter, AgentFlowSettings};
use super::invoke::InvokeTarget;
use super::poll::{PollAdapter, PollSettings};
use super::ui_message::{UiMessageAdapter, UiMessageSettings};
use super::{Adapter, Ending, RunJob, RunSink};
use crate::config::{agent_matches, Config, UpstreamDialect, UpstreamUrl};

/// The agent id as routes see it: a string as is, a number in decimal.
pub fn agent_key(agent: &Value) -> String {
    match agent {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Runs each job on the adapter its agent is routed to.
pub struct Routes {
    routes: Vec<(Vec<String>, Arc<dyn Adapter>)>,
    default: Arc<dyn Adapter>,
}

impl Routes {
    /// Routes over `routes` (agent patterns, adapter), falling back to `default`.
    pub fn new(routes: Vec<(Vec<String>, Arc<dyn Adapter>)>, default: Arc<dyn Adapter>) -> Self {
        Routes { routes, default }
    }

    /// The adapter for `agent`.
    pub fn pick(&self, agent: &Value) -> &Arc<dyn Adapter> {
        let key = agent_key(agent);
        self.routes
            .iter()
            .find(|(patterns, _)| patterns.iter().any(|p| agent_matches(p, &key)))
            .map_or(&self.default, |(_, a)| a)
    }

    /// The adapters the configuration asks for.
    pub fn from_config(config: &Config) -> Routes {
        let u = &config.upstream;
        let default = adapter(
            config,
            u.dialect,
            config.upstream_urls(),
            &u.invoke_path,
            &u.conversation_path,
        );
        let routes = u
            .routes
            .iter()
            .map(|r| {
                let urls = r
                    .urls
                    .iter()
                    .filter_map(|u| UpstreamUrl::parse(u).ok())
                    .collect();
                let a = adapter(
                    config,
                    r.dialect,
                    urls,
                    r.invoke_path.as_deref().unwrap_or(&u.invoke_path),
                    r.conversation_path
                        .as_deref()
                        .unwrap_or(&u.conversation_path),
                );
                (r.agents.clone(), a)
            })
            .collect();
        Routes::new(routes, default)
    }
}

fn adapter(
    config: &Config,
    dialect: UpstreamDialect,
    upstreams: Vec<UpstreamUrl>,
    invoke_path: &str,
    conversation_path: &str,
) -> Arc<dyn Adapter> {
    let u = &config.upstream;
    let target = || InvokeTarget::new(upstreams.clone(), invoke_path.into(), u.connect_timeout.0);
    match dialect {
        UpstreamDialect::Agentflow => Arc::new(AgentFlowAdapter::new(AgentFlowSettings {
            upstreams: upstreams.clone(),
            connect_timeout: u.connect_timeout.0,
            idle_timeout: u.idle_timeout.0,
            max_event_bytes: u.max_event_bytes,
        })),
        UpstreamDialect::UiMessage => Arc::new(UiMessageAdapter::new(
            target(),
            UiMessageSettings {
                idle_timeout: u.idle_timeout.0,
                max_event_bytes: u.max_event_bytes,
            },
        )),
        UpstreamDialect::Poll => Arc::new(PollAdapter::new(
            target(),
            PollSettings {
                interval_min: u.poll_interval_min.0,
                interval_max: u.poll_interval_max.0,
                backoff: u.poll_backoff,
                timeout: u.poll_timeout.0,
                max_connections: u.poll_max_connections,
                max_failures: u.poll_max_failures,
                conversation_path: conversation_path.into(),
                idle_timeout: u.idle_timeout.0,
                max_snapshot_bytes: u.poll_max_snapshot_bytes,
            },
        )),
    }
}

#[async_trait]
impl Adapter for Routes {
    async fn run(&self, job: &RunJob, sink: &RunSink) -> Ending {
        self.pick(&job.run.agent_id).run(job, sink).await
    }

    async fn resume(&self, job: &RunJob, mark: Option<&str>, sink: &RunSink) -> Ending {
        self.pick(&job.run.agent_id).resume(job, mark, sink).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Nothing;

    #[async_trait]
    impl Adapter for Nothing {
        async fn run(&self, _: &RunJob, _: &RunSink) -> Ending {
            Ending::Closed
        }
    }

    #[test]
    fn the_first_matching_route_wins() {
        let (poll, ui, default): (Arc<dyn Adapter>, Arc<dyn Adapter>, Arc<dyn Adapter>) =
            (Arc::new(Nothing), Arc::new(Nothing), Arc::new(Nothing));
        let routes = Routes::new(
            vec![
                (vec!["legacy-*".into(), "7".into()], poll.clone()),
                (vec!["*-bot".into()], ui.clone()),
            ],
            default.clone(),
        );
        assert!(Arc::ptr_eq(routes.pick(&json!("legacy-bot")), &poll));
        assert!(Arc::ptr_eq(routes.pick(&json!(7)), &poll));
        assert!(Arc::ptr_eq(routes.pick(&json!("support-bot")), &ui));
        assert!(Arc::ptr_eq(routes.pick(&json!(70)), &default));
        assert_eq!(agent_key(&json!(12)), "12");
        assert_eq!(agent_key(&json!("x")), "x");
    }

    /// Resumes with its name.
    struct Named(&'static str);

    #[async_trait]
    impl Adapter for Named {
        async fn run(&self, _: &RunJob, _: &RunSink) -> Ending {
            Ending::Closed
        }
        async fn resume(&self, _: &RunJob, mark: Option<&str>, _: &RunSink) -> Ending {
            Ending::Backend(
                crate::store::RunStatus::Stopped,
                format!("{} {}", self.0, mark.unwrap_or("")),
            )
        }
    }

    #[tokio::test]
    async fn a_taken_over_run_resumes_on_its_agents_adapter() {
        let routes = Routes::new(
            vec![(
                vec!["legacy-*".into()],
                Arc::new(Named("poll")) as Arc<dyn Adapter>,
            )],
            Arc::new(Named("default")),
        );
        let store = crate::ingest::testing::Recorder::new();
        let mut run = store.new_run("hi", "u1").await;
        let sink = RunSink::new(store.clone(), run.run_id.clone(), None);
        for (agent, want) in [("legacy-1", "poll 9"), ("other", "default 9")] {
            run.agent_id = json!(agent);
            let job = RunJob {
                run: run.clone(),
                agent_path: agent.into(),
                body: json!({}),
                bearer: None,
                backend_thread: None,
            };
            assert_eq!(
                routes.resume(&job, Some("9"), &sink).await,
                Ending::Backend(crate::store::RunStatus::Stopped, want.into())
            );
        }
    }
}
