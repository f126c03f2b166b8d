//! The command line: `serve`, `check`, `mock-agent` and `demo`. Each command builds its Pingora
//! server through `crate::server` and runs it; output meant for people and test harnesses goes
//! to stdout (one `listening` line per listener), logs to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{AuthMode, Config, UpstreamDialect};
use crate::mock::{Dialect, MockAgent};
use crate::server;

/// Sluice: durable, resumable agent runs in front of an LLM agent backend.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve {
        /// Configuration file.
        #[arg(long, default_value = "config/sluice.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file and print the effective configuration.
    Check {
        /// Configuration file.
        #[arg(long, default_value = "config/sluice.toml")]
        config: PathBuf,
    },
    /// Run the simulated agent backend (scenarios picked by the message text).
    MockAgent {
        /// Listen address (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: String,
        /// Backend dialect: `agentflow` (POST /agents/{id}/run, AgentFlow SSE), `ui-message`
        /// (POST /api/invokeAgent, AI SDK v5 UI-message stream) or `poll` (POST
        /// /api/invokeAgent answers 202, GET /api/getConversation shows the run).
        #[arg(long, value_enum, default_value = "agentflow")]
        dialect: Dialect,
    },
    /// Run the gateway and the mock agent together, and print commands to try.
    Demo {
        /// Gateway listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Admin listen address.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: String,
        /// The dialect the demo's mock agent speaks (the gateway is configured to match).
        #[arg(long, value_enum, default_value = "agentflow")]
        dialect: Dialect,
        /// Gateway instances to start, as child processes sharing one log in Redis (more than
        /// one needs `--redis`). Instance i listens on the `--listen` and `--admin-listen`
        /// ports plus i - 1.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        instances: u16,
        /// Redis (or Valkey) URL for the shared store (`[store] backend = "redis"`), such as
        /// redis://127.0.0.1:6379. Without it the demo uses the embedded memory store.
        #[arg(long, value_name = "URL")]
        redis: Option<String>,
    },
}

/// Exit code for a bad configuration (EX_USAGE-like, as linkerd does).
const EXIT_CONFIG: u8 = 64;

/// Run a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                for warning in c.warnings() {
                    eprintln!("sluice: warning: {warning}");
                }
                println!("# {}: valid\n{}", config.display(), c.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sluice: {}: {e}", config.display());
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Serve { config: path } => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("sluice: {}: {e}", path.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            serve(config, None)
        }
        Command::MockAgent { listen, dialect } => {
            let mut srv = server::new_server(&mock_config());
            let mock = MockAgent::new().with_dialect(dialect);
            match server::add_local_app(&mut srv, "sluice mock agent", mock, &listen) {
                Ok(addr) => announce(&format!(
                    "mock-agent listening on http://{addr} (dialect {})",
                    dialect.name()
                )),
                Err(e) => return fail(&format!("cannot listen on {listen}: {e}")),
            }
            srv.run_forever()
        }
        Command::Demo {
            listen,
            admin_listen,
            dialect,
            instances,
            redis,
        } => {
            let mut config = mock_config();
            config.server.listen = listen;
            config.server.admin_listen = admin_listen;
            config.upstream.dialect = match dialect {
                Dialect::AgentFlow => UpstreamDialect::Agentflow,
                Dialect::UiMessage => UpstreamDialect::UiMessage,
                Dialect::Poll => UpstreamDialect::Poll,
            };
            match &redis {
                Some(url) => crate::demo::use_redis(&mut config, url),
                None if instances > 1 => {
                    eprintln!(
                        "sluice: demo --instances {instances} needs --redis URL: the instances \
                         share their log through Redis (Redis 7+ or Valkey 7.2+; \
                         `make demo-cluster` starts one), e.g. \
                         sluice demo --instances {instances} --redis redis://127.0.0.1:6379"
                    );
                    return ExitCode::from(EXIT_CONFIG);
                }
                None => {}
            }
            if let (Some(_), Err(e)) = (&redis, config.validate()) {
                return fail(&format!("demo: {e}"));
            }
            if instances > 1 {
                return crate::demo::cluster(config, dialect, instances);
            }
            serve(config, Some(dialect))
        }
    }
}

fn mock_config() -> Config {
    Config::parse("[auth]\nmode = \"disabled\"\n").expect("the minimal config is valid")
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("sluice: {msg}");
    ExitCode::FAILURE
}

fn announce(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Run the gateway; with `demo`, beside a mock agent speaking that dialect.
fn serve(mut config: Config, demo: Option<Dialect>) -> ExitCode {
    let mut srv = server::new_server(&config);
    let demo = if let Some(dialect) = demo {
        let identity = match crate::demo::Identity::generate() {
            Ok(i) => i,
            Err(e) => return fail(&format!("cannot generate the demo keys: {e}")),
        };
        let mock = MockAgent::new()
            .with_dialect(dialect)
            .with_jwks(identity.jwks.clone());
        match server::add_local_app(&mut srv, "sluice mock agent", mock, "127.0.0.1:0") {
            Ok(addr) => {
                config.upstream.urls = vec![format!("http://{addr}")];
                identity.configure(&mut config, addr);
                Some((addr, identity))
            }
            Err(e) => return fail(&format!("cannot start the mock agent: {e}")),
        }
    } else {
        None
    };
    for warning in config.warnings() {
        log::warn!("{warning}");
    }
    let insecure_jwks = crate::config::UpstreamUrl::parse(&config.auth.jwks_url)
        .is_ok_and(|u| u.is_insecure_remote());
    if config.auth.mode == AuthMode::Jwt && insecure_jwks {
        log::warn!(
            "auth.jwks_url {:?} is plain http to a host that is not loopback (allowed by \
             auth.allow_insecure_jwks): anyone on that path can serve keys and mint tokens",
            config.auth.jwks_url
        );
    }
    if config.auth.mode == AuthMode::Disabled {
        log::warn!(
            "authentication is DISABLED ([auth] mode = \"disabled\"): every request acts as \
             organisation {:?}, user {:?}",
            config.auth.dev_organization,
            config.auth.dev_user
        );
    }
    let page = demo
        .as_ref()
        .map(|(_, identity)| crate::demo::page(&identity.admin_token));
    let listening = match server::add_gateway(&mut srv, config, page) {
        Ok(l) => l,
        Err(e) => return fail(&format!("cannot start: {e}")),
    };
    announce(&format!(
        "sluice listening on http://{} (admin http://{})",
        listening.api, listening.admin
    ));
    if let Some((mock, identity)) = demo {
        announce(&crate::demo::instructions(
            listening.api,
            listening.admin,
            mock,
            &identity,
        ));
    }
    srv.run_forever()
}
