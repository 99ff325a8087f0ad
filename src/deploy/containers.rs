//! The container stage inside a deployment: build the installed release's images, activate
//! it, start its containers behind the health gate, and roll back when they are unhealthy.
//! The stage itself (compose, builds, containers) is [`crate::containers`]; this is the glue
//! that ties it to `current` and `state.json`.

use std::collections::BTreeMap;
use std::path::Path;

use super::{DeployError, Deployer, Request};
use crate::config::envfile::EnvFile;
use crate::containers::{ClearReport, ContainerError, Engine, ReleaseRef};
use crate::contract::host::Manifest;
use crate::contract::now_rfc3339;
use crate::contract::state::{Attempt, Outcome, Stage};

impl Deployer {
    /// True when containers are enabled and `dir` holds the compose file.
    pub(super) fn has_containers(&self, dir: &Path) -> bool {
        self.cfg.containers.enabled && dir.join(&self.cfg.containers.compose_file).is_file()
    }

    /// The Docker engine, waiting for it (with backoff) the first time.
    async fn engine(&self) -> Result<&Engine, DeployError> {
        if let Some(engine) = self.engine.get() {
            return Ok(engine);
        }
        self.reporter.stage(Stage::WaitingForDocker, None);
        let settings = &self.cfg.containers;
        let engine = self
            .cancellable(Engine::connect_with(
                settings.engine_wait.0,
                settings.engine_timeout.0,
            ))
            .await?;
        let reporter = self.reporter.clone();
        let engine = engine.with_step_hook(std::sync::Arc::new(move |service, step, steps| {
            reporter.build_step(service, step, steps)
        }));
        Ok(self.engine.get_or_init(|| async { engine }).await)
    }

    /// Builds the release's images, activates it, and starts its containers behind the health
    /// gate; an unhealthy start is rolled back to the previous release.
    pub(super) async fn build_and_run(
        &self,
        req: &Request,
        dir: &Path,
        env: &BTreeMap<String, String>,
        manifest: &Manifest,
    ) -> Result<(), DeployError> {
        let engine = self.engine().await?;
        let app = &self.cfg.app;
        let settings = &self.cfg.containers;
        let id = manifest.id.as_str();
        let release = ReleaseRef {
            id,
            dir,
            commit: manifest.commit(),
        };
        let project = Engine::load_project(app, &release, env, settings)?;
        let before = self.host().load()?;
        let previous = before
            .current
            .clone()
            .filter(|p| p.id != id && self.has_containers(&self.layout.release_dir(&p.id)));
        let previous_dir = previous.as_ref().map(|p| self.layout.release_dir(&p.id));
        let previous_ref = previous
            .as_ref()
            .zip(previous_dir.as_deref())
            .map(|(p, dir)| ReleaseRef {
                id: &p.id,
                dir,
                commit: p.commit.as_deref(),
            });
        if req.clear_cache {
            self.reporter.stage(Stage::ClearingCaches, None);
            let dirs = self.layout.release_dirs()?;
            let report = engine
                .clear_cache(app, &dirs, &settings.clear_paths)
                .await?;
            tracing::info!(?report, "caches cleared");
        }
        self.reporter.stage(Stage::Building, Some(id.to_string()));
        let build = engine.build(&project, &release, previous_ref.as_ref(), req.force_rebuild);
        let built = self
            .cancellable(async {
                tokio::time::timeout(settings.build_timeout.0, build)
                    .await
                    .unwrap_or_else(|_| {
                        Err(ContainerError::BuildTimeout {
                            release: id.to_string(),
                            limit: settings.build_timeout.0,
                        })
                    })
            })
            .await?;
        for s in &built.services {
            tracing::info!(
                service = %s.service,
                image = %s.image,
                steps = s.steps,
                cache_hits = s.cache_hits,
                seconds = s.duration.as_secs_f64(),
                "built"
            );
        }
        self.reporter.build_report(
            built.cache_hits() as u64,
            built
                .services
                .iter()
                .map(|s| s.cacheable_steps as u64)
                .sum(),
        );
        // From here on the work is not interruptible: a half-started release would be worse.
        self.reporter.stage(Stage::Starting, Some(id.to_string()));
        self.host().activate(manifest, self.cfg.releases.keep)?;
        let previous_project = match &previous_ref {
            Some(p) => Engine::load_project(app, p, env, settings).ok(),
            None => None,
        };
        let previous_pair = previous_project.as_ref().zip(previous_ref.as_ref());
        if let Err(e) = engine.up(&project, &release, previous_pair, settings).await {
            self.host().revert(&before)?;
            // Only a rollback that restarted the previous release's containers may say so;
            // anything else (no previous release, the restart failed too, an engine error)
            // is a failure, reported as what it is.
            return Err(match e {
                e @ (ContainerError::RolledBack { .. }
                | ContainerError::StartFailed {
                    rolled_back_to: Some(_),
                    ..
                }) => DeployError::RolledBack(Box::new(e)),
                e => DeployError::from(e),
            });
        }
        tracing::info!(release = %id, "containers healthy");
        let keep: Vec<String> = self.layout.release_ids()?;
        match engine.retain(app, &keep).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(images = n, "removed images of releases no longer kept"),
            Err(error) => tracing::warn!(%error, "could not remove old release images"),
        }
        Ok(())
    }

    /// Points `current` back at `id` (default: the previous good release) and, when the
    /// release has containers, starts them again from its release-tagged images.
    pub async fn rollback(&self, id: Option<&str>) -> Result<String, DeployError> {
        let _lock = self.layout.lock()?;
        let target = self.host().rollback_target(id)?;
        let manifest = self.layout.manifest(&target)?;
        let started_at = now_rfc3339();
        let dir = self.layout.release_dir(&target);
        if self.has_containers(&dir) {
            let env = EnvFile::load(&self.cfg.environment_file)?;
            let settings = &self.cfg.containers;
            let release = ReleaseRef {
                id: &target,
                dir: &dir,
                commit: manifest.commit(),
            };
            let project = Engine::load_project(&self.cfg.app, &release, &env.vars, settings)?;
            self.reporter.stage(Stage::Starting, Some(target.clone()));
            self.engine()
                .await?
                .rollback(&project, &release, settings)
                .await?;
        }
        let attempt = Attempt {
            started_at,
            finished_at: now_rfc3339(),
            outcome: Outcome::RolledBack,
            trigger: "rollback".into(),
            artifact: Some(manifest.artifact.clone()),
            release: Some(target.clone()),
            error: None,
            exit_code: 0,
        };
        let state = self.host().roll_back_to(&manifest, attempt.clone())?;
        self.reporter
            .serving(state.current.clone(), Some(attempt.clone()));
        self.report_outward(&attempt, state.current.as_ref(), false, None)
            .await;
        tracing::info!(release = %target, "rolled back");
        Ok(target)
    }

    /// Removes the project's images, the builder cache and the app cache paths in every
    /// release, so the next build starts from nothing.
    pub async fn clear_cache(&self) -> Result<ClearReport, DeployError> {
        let _lock = self.layout.lock()?;
        let dirs = self.layout.release_dirs()?;
        let settings = &self.cfg.containers;
        Ok(self
            .engine()
            .await?
            .clear_cache(&self.cfg.app, &dirs, &settings.clear_paths)
            .await?)
    }
}
