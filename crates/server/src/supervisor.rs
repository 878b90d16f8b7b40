//! The supervisor: owns every task of a process's roles. A task that
//! fails is reported the moment it fails (with its name) and stops the
//! others; after a shutdown request every task gets the drain deadline,
//! then what is left is aborted and named in the log.
//!
//! Nothing else in the server spawns a task that outlives its caller:
//! roles spawn into a supervisor, or await what they spawn.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Tasks of one process and the token that stops them.
pub struct Supervisor<E> {
    tasks: JoinSet<(&'static str, Result<(), E>)>,
    running: Vec<&'static str>,
    shutdown: CancellationToken,
    drain: Duration,
}

impl<E: std::fmt::Display + Send + 'static> Supervisor<E> {
    /// A supervisor whose tasks stop when `shutdown` is cancelled and get
    /// `drain` to finish.
    pub fn new(shutdown: CancellationToken, drain: Duration) -> Self {
        Supervisor {
            tasks: JoinSet::new(),
            running: Vec::new(),
            shutdown,
            drain,
        }
    }

    /// The token every task watches.
    pub fn token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs `task` under the name `name` (used in every log line about it).
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
    {
        self.running.push(name);
        self.tasks.spawn(async move { (name, task.await) });
    }

    /// Asks every task to stop (same as SIGTERM).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until every task has ended. Returns the first failure; a
    /// task that ends on its own (without a shutdown request) stops the
    /// others too, since a role without its peers is not a working server.
    pub async fn wait(mut self) -> Result<(), E> {
        let mut result = Ok(());
        loop {
            let next = if self.shutdown.is_cancelled() {
                match tokio::time::timeout(self.drain, self.tasks.join_next()).await {
                    Ok(n) => n,
                    Err(_) => {
                        warn!(
                            tasks = ?self.running,
                            "tasks did not drain within {:?}; stopping them",
                            self.drain
                        );
                        self.tasks.abort_all();
                        while self.tasks.join_next().await.is_some() {}
                        break;
                    }
                }
            } else {
                self.tasks.join_next().await
            };
            let Some(joined) = next else { break };
            match joined {
                Ok((name, outcome)) => {
                    self.running.retain(|n| *n != name);
                    match outcome {
                        Err(e) => {
                            error!(task = name, error = %e, "task failed; shutting down");
                            self.shutdown.cancel();
                            if result.is_ok() {
                                result = Err(e);
                            }
                        }
                        Ok(()) if !self.shutdown.is_cancelled() => {
                            warn!(task = name, "task ended on its own; shutting down");
                            self.shutdown.cancel();
                        }
                        Ok(()) => info!(task = name, "task stopped"),
                    }
                }
                Err(e) => {
                    error!(error = %e, "a task panicked; shutting down");
                    self.shutdown.cancel();
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failing_task_stops_the_others_and_is_returned() {
        let mut s: Supervisor<String> =
            Supervisor::new(CancellationToken::new(), Duration::from_secs(5));
        let token = s.token();
        s.spawn("waits", async move {
            token.cancelled().await;
            Ok(())
        });
        s.spawn("fails", async { Err("boom".to_string()) });
        assert_eq!(s.wait().await, Err("boom".to_string()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ignores_shutdown_is_aborted_after_the_drain_deadline() {
        let mut s: Supervisor<String> =
            Supervisor::new(CancellationToken::new(), Duration::from_secs(10));
        s.spawn("stuck", std::future::pending());
        s.shutdown();
        let started = tokio::time::Instant::now();
        assert_eq!(s.wait().await, Ok(()));
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }
}
